//! Tests of requests with extended headers: 64-bit lengths, `PAYLOAD_LEN`, and block status
//! payloads naming contexts.

use super::*;

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let s = Session {
        size: 1 << 40,
        ..extended_session()
    };
    let (trim, consumed) = request(&extended(0, TRIM, 1, 0, 1 << 39), &s);
    assert_eq!(
        trim,
        Command::Trim {
            offset: 0,
            length: 1 << 39,
            fua: false
        }
    );
    assert_eq!(consumed, 32);
    let r = reject_of(&extended(0, READ, 1, 0, 1 << 33), &s);
    assert_eq!((r.error, r.payload_to_drain), (NbdError::Overflow, 0));
    let (write, _) = request(&extended(PAYLOAD_LEN, WRITE, 1, 0, 4096), &s);
    assert_eq!(
        write,
        Command::Write {
            offset: 0,
            length: 4096,
            fua: false
        }
    );
    // Like QEMU, a write without PAYLOAD_LEN still carries its payload.
    let (write, _) = request(&extended(0, WRITE, 1, 0, 4096), &s);
    assert!(matches!(write, Command::Write { length: 4096, .. }));
    assert_eq!(
        reject_of(&extended(0, WRITE, 1, 0, 1 << 20), &s).payload_to_drain,
        1 << 20
    );
    assert!(parse_request(&extended(0, WRITE, 1, 0, 1 << 33), &s).is_err());
}

#[test]
fn unexpected_payloads_are_drained_or_fatal() {
    let s = extended_session();
    let r = reject_of(&extended(PAYLOAD_LEN, READ, 1, 0, 16), &s);
    assert_eq!((r.error, r.payload_to_drain), (NbdError::Inval, 16));
    assert_eq!(r.message, "this command takes no payload");
    let r = reject_of(&extended(PAYLOAD_LEN, 42, 1, 0, 16), &s);
    assert_eq!((r.error, r.payload_to_drain), (NbdError::Inval, 16));
    let err = parse_request(&extended(PAYLOAD_LEN, TRIM, 1, 0, 1 << 30), &s).unwrap_err();
    assert!(matches!(err, FatalError::PayloadTooLarge { .. }));
}

fn status_payload(effect: u64, ids: &[u32]) -> Vec<u8> {
    let mut out = effect.to_be_bytes().to_vec();
    for id in ids {
        put_u32(&mut out, *id);
    }
    out
}

#[test]
fn block_status_with_a_payload_naming_contexts() {
    let s = extended_session();
    let payload = status_payload(8192, &[2]);
    let header = extended(PAYLOAD_LEN | REQ_ONE, STATUS, 5, 4096, payload.len() as u64);
    let whole = [header.clone(), payload.clone()].concat();
    for n in 32..whole.len() {
        assert_eq!(
            parse_request(&whole[..n], &s),
            Ok(Parse::Incomplete { needed: 44 })
        );
    }
    let (status, consumed) = request(&whole, &s);
    assert_eq!(consumed, 44);
    let expected = Command::BlockStatus {
        offset: 4096,
        length: 8192,
        req_one: true,
        context_ids: Some(vec![2]),
    };
    assert_eq!(status, expected);

    let bad = |payload: &[u8]| {
        let header = extended(PAYLOAD_LEN, STATUS, 5, 0, payload.len() as u64);
        let r = reject_of(&[header, payload.to_vec()].concat(), &s);
        (r.error, r.payload_to_drain)
    };
    assert_eq!(
        bad(&status_payload(512, &[7])),
        (NbdError::Inval, 12),
        "unknown id"
    );
    assert_eq!(
        bad(&status_payload(512, &[0, 0])),
        (NbdError::Inval, 16),
        "repeated id"
    );
    assert_eq!(
        bad(&status_payload(512, &[0, 2, 0])),
        (NbdError::Inval, 20),
        "too many ids"
    );
    assert_eq!(
        bad(&status_payload(512, &[])),
        (NbdError::Inval, 8),
        "no id"
    );
    assert_eq!(bad(&[0; 10]), (NbdError::Inval, 10), "not 8 + 4n");
    assert_eq!(
        bad(&status_payload(0, &[0])),
        (NbdError::Inval, 12),
        "empty range"
    );
    assert_eq!(
        bad(&status_payload(MIB + 1, &[0])),
        (NbdError::Inval, 12),
        "past the end"
    );
    // Without BLOCK_STAT_PAYLOAD advertised the payload form is refused (and drained).
    let plain = Session {
        flags: s.flags - TransmissionFlags::BLOCK_STAT_PAYLOAD,
        ..s.clone()
    };
    let r = reject_of(&whole, &plain);
    assert_eq!((r.error, r.payload_to_drain), (NbdError::Inval, 12));
}
