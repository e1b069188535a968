//! Byte-exact tests of the reply encoders against the specification's layouts.

use super::*;

const TO: ReplyTo = ReplyTo {
    cookie: 0x0102_0304_0506_0708,
    offset: 0x1000,
};
const COOKIE: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

fn encode(f: impl FnOnce(&mut Vec<u8>) -> Result<(), ReplyError>) -> Vec<u8> {
    let mut out = Vec::new();
    f(&mut out).unwrap();
    out
}

/// A compact chunk header, by hand.
fn compact_header(flags: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut out = vec![0x66, 0x8e, 0x33, 0xef];
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&COOKIE);
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// An extended chunk header, by hand.
fn extended_header(flags: u16, kind: u16, len: u64) -> Vec<u8> {
    let mut out = vec![0x6e, 0x8a, 0x27, 0x8c];
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&COOKIE);
    out.extend_from_slice(&0x1000u64.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

#[test]
fn framing_follows_the_negotiation() {
    assert_eq!(Framing::new(false, false), Framing::Simple);
    assert_eq!(Framing::new(true, false), Framing::Structured);
    assert_eq!(Framing::new(false, true), Framing::Extended);
    assert_eq!(Framing::new(true, true), Framing::Extended);
}

#[test]
fn simple_replies() {
    let ok = encode(|o| Framing::Simple.simple(o, TO.cookie, None));
    assert_eq!(
        ok,
        [&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0][..], &COOKIE].concat()
    );
    let err = encode(|o| Framing::Structured.simple(o, TO.cookie, Some(NbdError::NoSpc)));
    assert_eq!(
        err,
        [&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28][..], &COOKIE].concat()
    );
    let mut out = Vec::new();
    let refused = Framing::Extended.simple(&mut out, 1, None);
    assert_eq!(refused, Err(ReplyError::SimpleWithExtendedHeaders));
    assert!(out.is_empty());
}

#[test]
fn chunk_headers() {
    let f = ReplyFlags::DONE;
    let compact = encode(|o| Framing::Structured.chunk_header(o, TO, f, ChunkType::Error, 9));
    assert_eq!(compact, compact_header(1, 0x8001, 9));
    assert_eq!(compact.len(), 20);
    let ext = encode(|o| Framing::Extended.chunk_header(o, TO, f, ChunkType::None, 1 << 40));
    assert_eq!(ext, extended_header(1, 0, 1 << 40));
    assert_eq!(ext.len(), 32);
    let mut out = Vec::new();
    let none = ChunkType::None;
    assert_eq!(
        Framing::Structured.chunk_header(&mut out, TO, f, none, 1 << 32),
        Err(ReplyError::PayloadTooLong(1 << 32))
    );
    assert_eq!(
        Framing::Simple.none(&mut out, TO),
        Err(ReplyError::NotStructured)
    );
    assert!(out.is_empty());
}

#[test]
fn none_chunk() {
    assert_eq!(
        encode(|o| Framing::Structured.none(o, TO)),
        compact_header(1, 0, 0)
    );
    assert_eq!(
        encode(|o| Framing::Extended.none(o, TO)),
        extended_header(1, 0, 0)
    );
}

#[test]
fn offset_data_chunks() {
    let data = [9u8, 8, 7];
    let chunk = encode(|o| Framing::Structured.offset_data(o, TO, false, 0x2000, &data));
    let expected = [
        compact_header(0, 1, 11),
        0x2000u64.to_be_bytes().to_vec(),
        data.to_vec(),
    ]
    .concat();
    assert_eq!(chunk, expected);
    let header = encode(|o| Framing::Extended.offset_data_header(o, TO, true, 0x2000, 3));
    assert_eq!(
        header,
        [extended_header(1, 1, 11), 0x2000u64.to_be_bytes().to_vec()].concat()
    );
    let mut out = Vec::new();
    let empty = Framing::Structured.offset_data(&mut out, TO, true, 0, &[]);
    assert_eq!(empty, Err(ReplyError::EmptyData));
}

#[test]
fn offset_hole_chunks() {
    let hole = encode(|o| Framing::Structured.offset_hole(o, TO, true, 0x3000, 0x200));
    let expected = [
        compact_header(1, 2, 12),
        0x3000u64.to_be_bytes().to_vec(),
        vec![0, 0, 2, 0],
    ];
    assert_eq!(hole, expected.concat());
    let ext = encode(|o| Framing::Extended.offset_hole(o, TO, false, 0x3000, 0x200));
    assert_eq!(&ext[..32], &extended_header(0, 2, 12)[..]);
    assert_eq!(ext.len(), 44);
    let mut out = Vec::new();
    assert_eq!(
        Framing::Structured.offset_hole(&mut out, TO, true, 0, 0),
        Err(ReplyError::EmptyHole)
    );
}

#[test]
fn error_chunks() {
    let e = encode(|o| Framing::Structured.error(o, TO, true, NbdError::Io, "bad"));
    let expected = [
        compact_header(1, 0x8001, 9),
        vec![0, 0, 0, 5, 0, 3],
        b"bad".to_vec(),
    ];
    assert_eq!(e, expected.concat());
    let e = encode(|o| Framing::Extended.error_offset(o, TO, false, NbdError::Inval, "x", 0x42));
    let expected = [
        extended_header(0, 0x8002, 15),
        vec![0, 0, 0, 22, 0, 1, b'x'],
        0x42u64.to_be_bytes().to_vec(),
    ];
    assert_eq!(e, expected.concat());
}

#[test]
fn error_messages_are_cut_at_4096_bytes_on_a_char_boundary() {
    let long = "é".repeat(3000); // 6000 bytes, 2 per character
    let e = encode(|o| Framing::Structured.error(o, TO, true, NbdError::Io, &long));
    let message_len = u16::from_be_bytes([e[24], e[25]]) as usize;
    assert_eq!(message_len, 4096);
    assert_eq!(e.len(), 20 + 6 + 4096);
    let odd = format!("a{long}");
    let e = encode(|o| Framing::Structured.error(o, TO, true, NbdError::Io, &odd));
    assert_eq!(u16::from_be_bytes([e[24], e[25]]), 4095);
    assert!(std::str::from_utf8(&e[26..]).is_ok());
}

#[test]
fn block_status_chunks() {
    let extents = [
        Extent {
            length: 4096,
            status: 3,
        },
        Extent {
            length: 512,
            status: 0,
        },
    ];
    let compact = encode(|o| Framing::Structured.block_status(o, TO, false, 7, &extents));
    let expected = [
        compact_header(0, 5, 20),
        vec![0, 0, 0, 7],
        vec![0, 0, 0x10, 0, 0, 0, 0, 3],
        vec![0, 0, 2, 0, 0, 0, 0, 0],
    ];
    assert_eq!(compact, expected.concat());

    let wide = [Extent {
        length: 1 << 33,
        status: 2,
    }];
    let ext = encode(|o| Framing::Extended.block_status(o, TO, true, 7, &wide));
    let expected = [
        extended_header(1, 6, 24),
        vec![0, 0, 0, 7, 0, 0, 0, 1],
        (1u64 << 33).to_be_bytes().to_vec(),
        2u64.to_be_bytes().to_vec(),
    ];
    assert_eq!(ext, expected.concat());
}

#[test]
fn block_status_refuses_what_the_spec_forbids() {
    let mut out = Vec::new();
    let s = Framing::Structured;
    assert_eq!(
        s.block_status(&mut out, TO, true, 0, &[]),
        Err(ReplyError::NoExtents)
    );
    let zero = [Extent {
        length: 0,
        status: 0,
    }];
    assert_eq!(
        s.block_status(&mut out, TO, true, 0, &zero),
        Err(ReplyError::EmptyExtent)
    );
    let long = [Extent {
        length: 1 << 32,
        status: 0,
    }];
    assert!(matches!(
        s.block_status(&mut out, TO, true, 0, &long),
        Err(ReplyError::ExtentTooWide { .. })
    ));
    let wide = [Extent {
        length: 1,
        status: 1 << 32,
    }];
    assert!(s.block_status(&mut out, TO, true, 0, &wide).is_err());
    let one = [Extent {
        length: 1,
        status: 0,
    }];
    assert_eq!(
        Framing::Simple.block_status(&mut out, TO, true, 0, &one),
        Err(ReplyError::NotStructured)
    );
    assert!(out.is_empty());
}

#[test]
fn whole_error_and_success_replies() {
    let mut out = Vec::new();
    Framing::Simple.error_reply(&mut out, TO, NbdError::Perm, "read-only");
    assert_eq!(
        out,
        [&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1][..], &COOKIE].concat()
    );
    let mut out = Vec::new();
    Framing::Structured.error_reply(&mut out, TO, NbdError::Perm, "ro");
    assert_eq!(
        out,
        [
            compact_header(1, 0x8001, 8),
            vec![0, 0, 0, 1, 0, 2, b'r', b'o']
        ]
        .concat()
    );
    let mut out = Vec::new();
    Framing::Structured.ok_reply(&mut out, TO);
    assert_eq!(
        out,
        [&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0][..], &COOKIE].concat()
    );
    let mut out = Vec::new();
    Framing::Extended.ok_reply(&mut out, TO);
    assert_eq!(out, extended_header(1, 0, 0));
}
