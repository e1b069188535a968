//! Tests of request parsing and validation: every command, every rejection; what is specific
//! to extended headers is in `request_ext_tests.rs`, with the helpers defined here.

use super::*;
use crate::nbd::handshake::{Ending, MetaContext};
use crate::nbd::wire::{put_u16, put_u32, put_u64};

const MIB: u64 = 1 << 20;
const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const ZEROES: u16 = 6;
const STATUS: u16 = 7;
const RESIZE: u16 = 8;
const FUA: u16 = 1;
const NO_HOLE: u16 = 2;
const DF: u16 = 4;
const REQ_ONE: u16 = 8;
const FAST_ZERO: u16 = 16;
const PAYLOAD_LEN: u16 = 32;

/// A structured-reply session on a 1 MiB export supporting everything, contexts 0 and 2.
fn session() -> Session {
    Session {
        size: MIB,
        flags: TransmissionFlags::all() - TransmissionFlags::READ_ONLY,
        structured_replies: true,
        extended_headers: false,
        min_block: 1,
        max_payload: 64 * 1024,
        meta_context_ids: vec![0, 2],
    }
}

fn extended_session() -> Session {
    Session {
        extended_headers: true,
        ..session()
    }
}

fn compact(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, REQUEST_MAGIC);
    put_u16(&mut out, flags);
    put_u16(&mut out, kind);
    put_u64(&mut out, cookie);
    put_u64(&mut out, offset);
    put_u32(&mut out, length);
    out
}

fn extended(flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, EXTENDED_REQUEST_MAGIC);
    put_u16(&mut out, flags);
    put_u16(&mut out, kind);
    put_u64(&mut out, cookie);
    put_u64(&mut out, offset);
    put_u64(&mut out, length);
    out
}

fn request(buf: &[u8], s: &Session) -> (Command, usize) {
    match parse_request(buf, s).unwrap() {
        Parse::Request { request, consumed } => (request.command, consumed),
        other => panic!("expected a request, got {other:?}"),
    }
}

fn command(flags: u16, kind: u16, offset: u64, length: u32, s: &Session) -> Command {
    request(&compact(flags, kind, 7, offset, length), s).0
}

fn reject_of(buf: &[u8], s: &Session) -> Reject {
    match parse_request(buf, s).unwrap() {
        Parse::Reject { reject, consumed } => {
            assert_eq!(consumed, s.header_len());
            reject
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The error and drain length of rejecting a compact request.
fn rejected(flags: u16, kind: u16, offset: u64, length: u32, s: &Session) -> (NbdError, u64) {
    let r = reject_of(&compact(flags, kind, 7, offset, length), s);
    (r.error, r.payload_to_drain)
}

#[test]
fn headers_are_parsed_only_when_whole() {
    let s = session();
    let buf = compact(0, READ, 1, 0, 512);
    for n in 0..buf.len() {
        assert_eq!(
            parse_request(&buf[..n], &s),
            Ok(Parse::Incomplete { needed: 28 })
        );
    }
    let e = extended_session();
    let buf = extended(0, READ, 1, 0, 512);
    assert_eq!(
        parse_request(&buf[..31], &e),
        Ok(Parse::Incomplete { needed: 32 })
    );
    let Ok(Parse::Request {
        request,
        consumed: 32,
    }) = parse_request(&buf, &e)
    else {
        panic!("extended read");
    };
    assert_eq!(request.cookie, 1);
    assert_eq!(
        request.reply_to(),
        ReplyTo {
            cookie: 1,
            offset: 0
        }
    );
}

#[test]
fn bad_magic_is_fatal() {
    let mut buf = compact(0, READ, 1, 0, 512);
    buf[3] ^= 0xff;
    assert!(matches!(
        parse_request(&buf, &session()),
        Err(FatalError::BadMagic { .. })
    ));
    // Each framing only accepts its own magic.
    let compact_in_extended = [compact(0, READ, 1, 0, 512), vec![0; 4]].concat();
    let err = parse_request(&compact_in_extended, &extended_session()).unwrap_err();
    assert_eq!(
        err,
        FatalError::BadMagic {
            found: REQUEST_MAGIC,
            expected: EXTENDED_REQUEST_MAGIC
        }
    );
    let ext = extended(0, READ, 1, 0, 512);
    assert!(parse_request(&ext, &session()).is_err());
}

#[test]
fn every_command_parses() {
    let s = session();
    let cmd = |flags, kind, offset, length| command(flags, kind, offset, length, &s);
    assert_eq!(
        cmd(DF, READ, 4096, 512),
        Command::Read {
            offset: 4096,
            length: 512,
            df: true
        }
    );
    let (write, consumed) = request(&compact(FUA, WRITE, 3, 0, 4096), &s);
    assert_eq!(
        write,
        Command::Write {
            offset: 0,
            length: 4096,
            fua: true
        }
    );
    assert_eq!(consumed, 28, "the payload is the caller's to read");
    assert_eq!(cmd(0, FLUSH, 0, 0), Command::Flush);
    assert_eq!(
        cmd(FUA, TRIM, 0, 8192),
        Command::Trim {
            offset: 0,
            length: 8192,
            fua: true
        }
    );
    assert_eq!(
        cmd(0, CACHE, 512, 512),
        Command::Cache {
            offset: 512,
            length: 512
        }
    );
    assert_eq!(
        cmd(NO_HOLE | FAST_ZERO | FUA, ZEROES, 0, 65536 * 4),
        Command::WriteZeroes {
            offset: 0,
            length: 262144,
            fua: true,
            no_hole: true,
            fast_zero: true
        }
    );
    assert_eq!(
        cmd(0, STATUS, 512, 4096),
        Command::BlockStatus {
            offset: 512,
            length: 4096,
            req_one: false,
            context_ids: None
        }
    );
    assert_eq!(
        cmd(0, RESIZE, 2 * MIB, 0),
        Command::Resize { size: 2 * MIB }
    );
    // FUA is accepted on every command once advertised.
    assert_eq!(
        cmd(FUA, READ, 0, 1),
        Command::Read {
            offset: 0,
            length: 1,
            df: false
        }
    );
    assert_eq!(cmd(FUA, FLUSH, 0, 0), Command::Flush);
}

#[test]
fn block_status_range_is_checked() {
    let s = session();
    let ok = command(REQ_ONE, STATUS, 0, MIB as u32, &s);
    assert_eq!(
        ok,
        Command::BlockStatus {
            offset: 0,
            length: MIB,
            req_one: true,
            context_ids: None
        }
    );
    assert_eq!(
        rejected(0, STATUS, 0, MIB as u32 + 1, &s),
        (NbdError::Inval, 0)
    );
    assert_eq!(
        rejected(0, STATUS, 512, 0, &s),
        (NbdError::Inval, 0),
        "empty range"
    );
}

#[test]
fn disconnect_ignores_its_other_fields() {
    let s = Session {
        flags: TransmissionFlags::HAS_FLAGS,
        ..session()
    };
    assert_eq!(command(0xffff, DISC, u64::MAX, u32::MAX, &s), Command::Disc);
}

#[test]
fn unknown_commands_and_flags_are_invalid() {
    let s = session();
    assert_eq!(rejected(0, 9, 0, 0, &s), (NbdError::Inval, 0));
    assert_eq!(rejected(0, 0xffff, 0, 0, &s), (NbdError::Inval, 0));
    // An unknown command carries no payload in the compact framing.
    assert_eq!(rejected(0, 9, 0, 1 << 30, &s), (NbdError::Inval, 0));
    assert_eq!(rejected(0x80, READ, 0, 512, &s), (NbdError::Inval, 0));
    assert_eq!(
        rejected(0x80, WRITE, 0, 512, &s),
        (NbdError::Inval, 512),
        "payload drained"
    );
    let r = reject_of(&compact(0x80, READ, 99, 4096, 512), &s);
    assert_eq!(
        (r.cookie, r.offset, r.command, r.flags),
        (99, 4096, READ, 0x80)
    );
    assert!(r.is_read());
    assert_eq!(r.message, "unknown command flag");
    assert_eq!(
        r.reply_to(),
        ReplyTo {
            cookie: 99,
            offset: 4096
        }
    );
}

#[test]
fn flags_must_fit_the_command() {
    let s = session();
    for (flags, kind) in [
        (NO_HOLE, WRITE),
        (FAST_ZERO, TRIM),
        (DF, WRITE),
        (DF, STATUS),
        (REQ_ONE, READ),
        (PAYLOAD_LEN, READ),
        (PAYLOAD_LEN, WRITE),
    ] {
        let (error, _) = rejected(flags, kind, 0, 512, &s);
        assert_eq!(error, NbdError::Inval, "flags {flags:#x} on command {kind}");
    }
}

#[test]
fn flags_for_features_not_advertised_are_invalid() {
    let all = session().flags;
    let without = |flag| Session {
        flags: all - flag,
        ..session()
    };
    let cases = [
        (TransmissionFlags::SEND_FUA, FUA, WRITE),
        (TransmissionFlags::SEND_FUA, FUA, READ),
        (TransmissionFlags::SEND_FAST_ZERO, FAST_ZERO, ZEROES),
        (TransmissionFlags::SEND_DF, DF, READ),
    ];
    for (feature, flags, kind) in cases {
        let (error, _) = rejected(flags, kind, 0, 512, &without(feature));
        assert_eq!(error, NbdError::Inval, "{feature:?}");
    }
    let simple = Session {
        structured_replies: false,
        ..session()
    };
    assert_eq!(
        rejected(DF, READ, 0, 512, &simple).0,
        NbdError::Inval,
        "DF needs structured"
    );
}

#[test]
fn commands_not_advertised_are_invalid() {
    let all = session().flags;
    let without = |flag| Session {
        flags: all - flag,
        ..session()
    };
    let cases = [
        (TransmissionFlags::SEND_FLUSH, FLUSH, 0),
        (TransmissionFlags::SEND_TRIM, TRIM, 512),
        (TransmissionFlags::SEND_WRITE_ZEROES, ZEROES, 512),
        (TransmissionFlags::SEND_CACHE, CACHE, 512),
        (TransmissionFlags::SEND_RESIZE, RESIZE, 0),
    ];
    for (feature, kind, length) in cases {
        let r = reject_of(&compact(0, kind, 1, 0, length), &without(feature));
        assert_eq!(
            (r.error, r.message),
            (NbdError::Inval, "command not advertised")
        );
    }
    let none = Session {
        meta_context_ids: vec![],
        ..session()
    };
    assert_eq!(rejected(0, STATUS, 0, 512, &none).0, NbdError::Inval);
    let simple = Session {
        structured_replies: false,
        ..session()
    };
    assert_eq!(rejected(0, STATUS, 0, 512, &simple).0, NbdError::Inval);
    assert_eq!(
        rejected(0, FLUSH, 512, 0, &session()).0,
        NbdError::Inval,
        "flush range"
    );
    assert_eq!(rejected(0, FLUSH, 0, 1, &session()).0, NbdError::Inval);
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let s = Session {
        flags: session().flags | TransmissionFlags::READ_ONLY,
        ..session()
    };
    assert_eq!(rejected(0, WRITE, 0, 4096, &s), (NbdError::Perm, 4096));
    assert_eq!(rejected(0, TRIM, 0, 4096, &s), (NbdError::Perm, 0));
    assert_eq!(rejected(0, ZEROES, 0, 4096, &s), (NbdError::Perm, 0));
    assert_eq!(rejected(0, RESIZE, 0, 0, &s), (NbdError::Perm, 0));
    // Even past the end or with bad flags: read-only is checked first.
    assert_eq!(rejected(0x80, WRITE, MIB, 4096, &s), (NbdError::Perm, 4096));
    assert!(matches!(
        command(0, READ, 0, 4096, &s),
        Command::Read { .. }
    ));
    assert_eq!(command(0, FLUSH, 0, 0, &s), Command::Flush);
}

#[test]
fn ranges_past_the_end() {
    let s = session();
    assert!(matches!(
        command(0, READ, MIB - 512, 512, &s),
        Command::Read { .. }
    ));
    assert_eq!(rejected(0, READ, MIB - 512, 513, &s), (NbdError::Inval, 0));
    assert_eq!(rejected(0, READ, MIB + 1, 0, &s), (NbdError::Inval, 0));
    assert_eq!(
        rejected(0, READ, u64::MAX, 512, &s),
        (NbdError::Inval, 0),
        "overflow"
    );
    assert_eq!(rejected(0, WRITE, MIB, 512, &s), (NbdError::NoSpc, 512));
    assert_eq!(rejected(0, ZEROES, MIB - 1, 2, &s), (NbdError::NoSpc, 0));
    assert_eq!(rejected(0, TRIM, MIB, 1, &s), (NbdError::Inval, 0));
    assert_eq!(rejected(0, CACHE, u64::MAX, 1, &s), (NbdError::Inval, 0));
    // Empty reads and writes at the end are harmless no-ops.
    assert!(matches!(
        command(0, READ, MIB, 0, &s),
        Command::Read { length: 0, .. }
    ));
    assert!(matches!(
        command(0, WRITE, MIB, 0, &s),
        Command::Write { length: 0, .. }
    ));
}

#[test]
fn payload_limits() {
    let s = session();
    assert!(matches!(
        command(0, READ, 0, 65536, &s),
        Command::Read { .. }
    ));
    let r = reject_of(&compact(0, READ, 1, 0, 65537), &s);
    assert_eq!((r.error, r.payload_to_drain), (NbdError::Overflow, 0));
    let simple = Session {
        structured_replies: false,
        ..session()
    };
    assert_eq!(rejected(0, READ, 0, 65537, &simple), (NbdError::Inval, 0));
    // A write over the maximum is drained up to MAX_DRAIN, beyond that the connection closes.
    assert_eq!(rejected(0, WRITE, 0, 65537, &s), (NbdError::Inval, 65537));
    let limit = MAX_DRAIN as u32;
    assert_eq!(
        rejected(0, WRITE, 0, limit, &s),
        (NbdError::Inval, MAX_DRAIN)
    );
    let err = parse_request(&compact(0, WRITE, 1, 0, limit + 1), &s).unwrap_err();
    assert_eq!(
        err,
        FatalError::PayloadTooLarge {
            length: MAX_DRAIN + 1,
            limit: MAX_DRAIN
        }
    );
    assert!(parse_request(&compact(0, WRITE, 1, 0, u32::MAX), &s).is_err());
    // Effect lengths of commands without payload are only bounded by the export.
    assert!(matches!(
        command(0, TRIM, 0, MIB as u32, &s),
        Command::Trim { .. }
    ));
}

#[test]
fn alignment_is_enforced_only_when_acknowledged() {
    let s = Session {
        min_block: 512,
        size: MIB + 100,
        ..session()
    };
    assert!(matches!(
        command(0, READ, 512, 1024, &s),
        Command::Read { .. }
    ));
    assert_eq!(rejected(0, READ, 100, 512, &s).0, NbdError::Inval);
    assert_eq!(rejected(0, WRITE, 512, 100, &s), (NbdError::Inval, 100));
    assert_eq!(rejected(0, TRIM, 0, 1000, &s).0, NbdError::Inval);
    assert_eq!(rejected(0, STATUS, 1, 512, &s).0, NbdError::Inval);
    // The unaligned tail of the export stays reachable.
    assert!(matches!(
        command(0, READ, MIB, 100, &s),
        Command::Read { .. }
    ));
    let lax = Session { min_block: 1, ..s };
    assert!(matches!(
        command(0, READ, 100, 3, &lax),
        Command::Read { .. }
    ));
}

#[test]
fn session_from_a_negotiation() {
    let mut export = ExportConfig::new("disk", 10 * MIB);
    export.block_sizes.minimum = 512;
    export.block_sizes.maximum = MIB as u32;
    let negotiated = Negotiated {
        export: 0,
        structured_replies: true,
        extended_headers: false,
        no_zeroes: true,
        transmission_flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_DF,
        block_sizes_acknowledged: true,
        meta_contexts: vec![MetaContext {
            id: 3,
            index: 3,
            name: "base:allocation".into(),
        }],
        ended_with: Ending::Go,
        leftover: Vec::new(),
    };
    let s = Session::new(&negotiated, &export);
    assert_eq!(s.size, 10 * MIB);
    assert_eq!((s.min_block, s.max_payload), (512, MIB as u32));
    assert_eq!(s.meta_context_ids, [3]);
    assert_eq!(s.header_len(), 28);
    assert_eq!(s.framing(), Framing::Structured);
    let unacknowledged = Negotiated {
        block_sizes_acknowledged: false,
        ..negotiated
    };
    assert_eq!(Session::new(&unacknowledged, &export).min_block, 1);
}

#[path = "request_ext_tests.rs"]
mod extended_headers;
