//! Tests of the negotiation's framing with hand-built byte sequences: client flags, export
//! names, limits, draining, end of input, and splitting; the options themselves are tested in
//! `options_tests.rs`, with the helpers defined here.

use super::*;
use crate::nbd::config::{BlockSizes, ExportConfig};
use crate::nbd::wire::{
    put_u32, u16_at, InfoType, OptionReply, EXPORT_NAME_ZEROES, OPTION_REPLY_HEADER_LEN,
    OPTION_REPLY_MAGIC,
};

const MIB: u64 = 1 << 20;
const FIXED: u32 = 1;
const NO_ZEROES: u32 = 2;
const CONTEXTS: [&str; 4] = [
    "base:allocation",
    "qemu:allocation-depth",
    "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:b1",
];

/// Two exports: `disk` (with every context) and `other`.
fn config() -> Arc<ServerConfig> {
    Arc::new(server_config())
}

fn server_config() -> ServerConfig {
    let mut disk = ExportConfig::new("disk", MIB);
    disk.description = Some("a test disk".into());
    disk.flags |= TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_DF
        | TransmissionFlags::BLOCK_STAT_PAYLOAD;
    disk.block_sizes = BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: MIB as u32,
    };
    disk.meta_contexts = CONTEXTS.iter().map(|s| s.to_string()).collect();
    let other = ExportConfig::new("other", 4096);
    ServerConfig::new(vec![disk, other], Some(0)).unwrap()
}

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    put_u32(&mut out, code);
    put_u32(&mut out, data.len() as u32);
    out.extend_from_slice(data);
    out
}

fn opt_header(code: u32, len: u32) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    put_u32(&mut out, code);
    put_u32(&mut out, len);
    out
}

fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, name.len() as u32);
    out.extend_from_slice(name);
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, name.len() as u32);
    out.extend_from_slice(name);
    put_u32(&mut out, queries.len() as u32);
    for q in queries {
        put_u32(&mut out, q.len() as u32);
        out.extend_from_slice(q);
    }
    out
}

/// One parsed option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rep {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

impl Rep {
    fn is(&self, option: OptionCode, kind: OptionReply) -> bool {
        self.option == option.code() && self.kind == kind.code()
    }
}

/// Splits option replies (panics on anything else: test input is ours).
fn replies(mut bytes: &[u8]) -> Vec<Rep> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert_eq!(u64_at(bytes, 0), Some(OPTION_REPLY_MAGIC));
        let len = u32_at(bytes, 16).unwrap() as usize;
        let end = OPTION_REPLY_HEADER_LEN + len;
        out.push(Rep {
            option: u32_at(bytes, 8).unwrap(),
            kind: u32_at(bytes, 12).unwrap(),
            data: bytes[OPTION_REPLY_HEADER_LEN..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
    out
}

/// A handshake past the client flags (fixed newstyle, no zeroes).
fn started(config: Arc<ServerConfig>) -> Handshake {
    let mut h = Handshake::new(config);
    let step = h.feed(&(FIXED | NO_ZEROES).to_be_bytes());
    assert!(matches!(step, Step::Continue(ref r) if r.is_empty()));
    h
}

/// Feeds and expects the connection to be closed without a reply; returns why.
fn closed(h: &mut Handshake, bytes: &[u8]) -> HandshakeError {
    match h.feed(bytes) {
        Step::Close { reply, error } => {
            assert!(reply.is_empty(), "{reply:?}");
            error
        }
        other => panic!("expected Close, got {other:?}"),
    }
}

/// Ends the input and expects a close; returns why.
fn eof_error(h: &mut Handshake) -> HandshakeError {
    match h.eof() {
        Step::Close { reply, error } if reply.is_empty() => error,
        other => panic!("expected Close, got {other:?}"),
    }
}

/// Feeds and expects the negotiation to go on; returns the replies.
fn cont(h: &mut Handshake, bytes: &[u8]) -> Vec<Rep> {
    match h.feed(bytes) {
        Step::Continue(reply) => replies(&reply),
        other => panic!("expected Continue, got {other:?}"),
    }
}

/// Feeds and expects the negotiation to end in transmission.
fn done(h: &mut Handshake, bytes: &[u8]) -> (Vec<u8>, Negotiated) {
    match h.feed(bytes) {
        Step::Done { reply, negotiated } => (reply, negotiated),
        other => panic!("expected Done, got {other:?}"),
    }
}

fn info_of(rep: &Rep) -> (u16, &[u8]) {
    (u16_at(&rep.data, 0).unwrap(), &rep.data[2..])
}

#[test]
fn greeting_is_magic_magic_flags() {
    let h = Handshake::new(config());
    let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
    expected.extend_from_slice(&[0, 3]);
    assert_eq!(h.greeting(), expected);
}

#[test]
fn client_flags_must_be_fixed_newstyle_and_known() {
    let mut h = Handshake::new(config());
    assert_eq!(
        closed(&mut h, &0u32.to_be_bytes()),
        HandshakeError::NotFixedNewstyle
    );
    let mut h = Handshake::new(config());
    assert_eq!(
        closed(&mut h, &[0, 0, 0, 2]),
        HandshakeError::NotFixedNewstyle
    );
    let mut h = Handshake::new(config());
    assert_eq!(
        closed(&mut h, &[0, 0, 0, 5]),
        HandshakeError::UnknownClientFlags(5)
    );
    assert_eq!(closed(&mut h, &[0]), HandshakeError::Ended);
}

#[test]
fn export_name_with_and_without_no_zeroes() {
    for (client, len) in [(FIXED | NO_ZEROES, 10), (FIXED, 10 + EXPORT_NAME_ZEROES)] {
        let mut h = Handshake::new(config());
        h.feed(&client.to_be_bytes());
        let (reply, n) = done(&mut h, &opt(1, b"disk"));
        assert_eq!(reply.len(), len);
        assert_eq!(u64_at(&reply, 0), Some(MIB));
        // No structured replies: SEND_DF and BLOCK_STAT_PAYLOAD are withheld.
        let flags = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA;
        assert_eq!(u16_at(&reply, 8), Some(flags.bits()));
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(n.export, 0);
        assert_eq!(n.ended_with, Ending::ExportName);
        assert_eq!(n.no_zeroes, client & NO_ZEROES != 0);
        assert!(!n.block_sizes_acknowledged && !n.structured_replies && !n.extended_headers);
        assert_eq!(n.transmission_flags, flags);
    }
}

#[test]
fn export_name_keeps_bytes_that_follow() {
    let mut h = started(config());
    let mut bytes = opt(1, b"other");
    bytes.extend_from_slice(b"request bytes");
    let (_, n) = done(&mut h, &bytes);
    assert_eq!(n.export, 1);
    assert_eq!(n.leftover, b"request bytes");
    assert!(n.no_zeroes);
}

#[test]
fn export_name_failures_close() {
    let mut h = started(config());
    assert_eq!(
        closed(&mut h, &opt(1, b"nope")),
        HandshakeError::UnknownExport("nope".into())
    );
    let mut h = started(config());
    assert_eq!(
        closed(&mut h, &opt_header(1, 5000)),
        HandshakeError::ExportNameTooLong(5000)
    );
    assert_eq!(h.buffered_len(), 0);
    let mut h = started(config());
    cont(&mut h, &opt(11, b""));
    assert_eq!(
        closed(&mut h, &opt(1, b"disk")),
        HandshakeError::ExportNameAfterExtendedHeaders
    );
}

#[test]
fn abort_acks_and_ends_whatever_its_length() {
    for bytes in [opt(2, b""), opt(2, b"ignored"), opt_header(2, u32::MAX)] {
        let mut h = started(config());
        match h.feed(&bytes) {
            Step::Abort { reply } => {
                let r = replies(&reply);
                assert_eq!(r.len(), 1);
                assert!(r[0].is(OptionCode::Abort, OptionReply::Ack) && r[0].data.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.buffered_len(), 0);
    }
}

#[test]
fn a_huge_option_length_closes_without_allocating() {
    let mut h = started(config());
    let err = closed(&mut h, &opt_header(7, u32::MAX));
    assert_eq!(
        err,
        HandshakeError::OptionTooLong {
            option: 7,
            len: u32::MAX
        }
    );
    assert_eq!(h.buffered_len(), 0);
    let mut h = started(config());
    assert!(matches!(
        closed(&mut h, &opt_header(42, MAX_OPTION_DRAIN + 1)),
        HandshakeError::OptionTooLong { .. }
    ));
}

#[test]
fn a_long_option_is_drained_then_too_big() {
    let mut h = started(config());
    let len = MAX_OPTION_DATA + 1000;
    assert!(cont(&mut h, &opt_header(7, len)).is_empty());
    let chunk = vec![0xaa; 4096];
    let mut left = len as usize;
    while left > 4096 {
        assert!(cont(&mut h, &chunk).is_empty());
        assert_eq!(h.buffered_len(), 0);
        left -= 4096;
    }
    let mut last = vec![0xaa; left];
    last.extend_from_slice(&opt(3, b""));
    let r = cont(&mut h, &last);
    assert_eq!(r.len(), 4);
    assert!(r[0].is(OptionCode::Go, OptionReply::ErrTooBig));
    assert!(r[3].is(OptionCode::List, OptionReply::Ack));
    // The longest option data that is still read and parsed.
    let r = cont(&mut h, &opt(42, &vec![0; MAX_OPTION_DATA as usize]));
    assert_eq!(r[0].kind, OptionReply::ErrUnsup.code());
}

#[test]
fn at_most_32_options() {
    let mut h = started(config());
    for _ in 0..MAX_OPTIONS {
        cont(&mut h, &opt(3, b""));
    }
    assert_eq!(
        closed(&mut h, &opt(3, b"")),
        HandshakeError::TooManyOptions(32)
    );

    let mut h = started(config());
    let many: Vec<u8> = (0..MAX_OPTIONS).flat_map(|_| opt(42, b"")).collect();
    assert_eq!(cont(&mut h, &many).len(), 32);
    assert!(
        matches!(h.feed(&opt(2, b"")), Step::Abort { .. }),
        "ABORT still answered"
    );

    // Sent all at once, the 32 answers still go out before the connection closes.
    let mut h = started(config());
    let too_many: Vec<u8> = (0..=MAX_OPTIONS).flat_map(|_| opt(3, b"")).collect();
    match h.feed(&too_many) {
        Step::Close { reply, error } => {
            assert_eq!(replies(&reply).len(), 32 * 3);
            assert_eq!(error, HandshakeError::TooManyOptions(32));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_option_magic_closes() {
    let mut h = started(config());
    let mut bytes = opt(3, b"");
    bytes[0] ^= 1;
    assert!(matches!(
        closed(&mut h, &bytes),
        HandshakeError::BadOptionMagic(_)
    ));
}

#[test]
fn eof_and_shutdown() {
    let mut h = Handshake::new(config());
    assert!(matches!(h.eof(), Step::Abort { reply } if reply.is_empty()));
    assert_eq!(eof_error(&mut h), HandshakeError::Ended);
    let mut h = started(config());
    assert!(matches!(h.eof(), Step::Abort { .. }));
    let mut h = started(config());
    cont(&mut h, &opt(7, &go_data(b"disk", &[]))[..10]);
    assert_eq!(h.buffered_len(), 10);
    assert_eq!(eof_error(&mut h), HandshakeError::Truncated);

    let mut h = started(config());
    h.shutdown();
    let r = cont(&mut h, &opt(7, &go_data(b"disk", &[])));
    assert!(r[0].is(OptionCode::Go, OptionReply::ErrShutdown));
    assert_eq!(
        closed(&mut h, &opt(1, b"disk")),
        HandshakeError::ShuttingDown
    );
    let mut h = started(config());
    h.shutdown();
    assert!(matches!(h.feed(&opt(2, b"")), Step::Abort { .. }));
}

/// A whole negotiation as the client sends it.
fn full_negotiation() -> Vec<u8> {
    let mut bytes = (FIXED | NO_ZEROES).to_be_bytes().to_vec();
    bytes.extend(opt(42, b"unknown"));
    bytes.extend(opt(3, b""));
    bytes.extend(opt(8, b""));
    bytes.extend(opt(9, &meta_data(b"disk", &[b"qemu:"])));
    bytes.extend(opt(
        10,
        &meta_data(b"disk", &[b"base:allocation", b"qemu:dirty-bitmap:b0"]),
    ));
    bytes.extend(opt(6, &go_data(b"disk", &[1, 2, 3])));
    bytes.extend(opt_header(77, MAX_OPTION_DATA + 10));
    bytes.extend(vec![7; MAX_OPTION_DATA as usize + 10]);
    bytes.extend(opt(7, &go_data(b"disk", &[3])));
    bytes.extend_from_slice(b"transmission");
    bytes
}

#[test]
fn byte_at_a_time_equals_all_at_once() {
    let bytes = full_negotiation();
    let mut whole = Handshake::new(config());
    let (whole_reply, whole_n) = done(&mut whole, &bytes);
    assert_eq!(whole_n.meta_contexts.len(), 2);
    assert_eq!(whole_n.leftover, b"transmission");

    let mut h = Handshake::new(config());
    let mut reply = Vec::new();
    let mut result = None;
    for (i, b) in bytes.iter().enumerate() {
        match h.feed(&[*b]) {
            Step::Continue(r) => reply.extend(r),
            Step::Done {
                reply: r,
                negotiated,
            } => {
                reply.extend(r);
                result = Some((i, negotiated));
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(h.buffered_len() <= MAX_OPTION_DATA as usize);
    }
    let (i, mut n) = result.expect("negotiation ended");
    assert_eq!(i, bytes.len() - b"transmission".len() - 1);
    assert!(n.leftover.is_empty());
    n.leftover = whole_n.leftover.clone();
    assert_eq!(n, whole_n);
    assert_eq!(reply, whole_reply);
}

#[path = "options_tests.rs"]
mod options;
