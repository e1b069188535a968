//! A deterministic in-process fuzzer: a xorshift generator builds plausible client streams,
//! mutates them, and feeds them in random-sized pieces to the [`Handshake`] and to
//! [`parse_request`]. Nothing may panic, buffers stay bounded, the result never depends on
//! how the bytes were split, and every accepted request satisfies the session's rules.

use std::sync::Arc;

use super::wire::{put_u16, put_u32, put_u64, CommandFlags, TransmissionFlags, IHAVEOPT};
use super::*;

const ITERATIONS: usize = 3000;

/// xorshift64*: small, fast, and the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Flips, overwrites, truncates or extends `stream` now and then.
    fn mutate(&mut self, stream: &mut Vec<u8>) {
        if self.chance(30) && !stream.is_empty() {
            for _ in 0..=self.below(4) {
                let i = self.below(stream.len() as u64) as usize;
                stream[i] = if self.chance(50) {
                    stream[i] ^ (1 << self.below(8))
                } else {
                    self.next() as u8
                };
            }
        }
        if self.chance(10) {
            let keep = self.below(stream.len() as u64 + 1) as usize;
            stream.truncate(keep);
        }
        if self.chance(10) {
            let n = self.below(64) as usize;
            stream.extend(self.bytes(n));
        }
    }

    /// The sizes to feed `len` bytes in.
    fn pieces(&mut self, len: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut left = len;
        let max = self.pick(&[1u64, 3, 17, 600, 70_000]);
        while left > 0 {
            let n = (1 + self.below(max) as usize).min(left);
            out.push(n);
            left -= n;
        }
        out
    }
}

fn config() -> Arc<ServerConfig> {
    let mut disk = ExportConfig::new("disk", 1 << 30);
    disk.description = Some("fuzzed".into());
    disk.flags = TransmissionFlags::all() - TransmissionFlags::READ_ONLY;
    disk.meta_contexts = [
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b",
    ]
    .map(String::from)
    .to_vec();
    let other = ExportConfig::new("other", 512);
    Arc::new(ServerConfig::new(vec![disk, other], Some(0)).unwrap())
}

fn name(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => b"disk".to_vec(),
        1 => b"other".to_vec(),
        2 => Vec::new(),
        _ => {
            let n = rng.below(20) as usize;
            rng.bytes(n)
        }
    }
}

fn option_data(rng: &mut Rng, code: u32) -> Vec<u8> {
    let mut out = Vec::new();
    match code {
        1 => out = name(rng),
        6 | 7 => {
            let n = name(rng);
            put_u32(&mut out, n.len() as u32);
            out.extend(n);
            let count = rng.below(5);
            put_u16(&mut out, count as u16);
            for _ in 0..count {
                put_u16(&mut out, rng.below(6) as u16);
            }
        }
        9 | 10 => {
            let n = name(rng);
            put_u32(&mut out, n.len() as u32);
            out.extend(n);
            let count = rng.below(5);
            put_u32(&mut out, count as u32);
            for _ in 0..count {
                let queries: [&[u8]; 6] = [
                    b"base:",
                    b"base:allocation",
                    b"qemu:",
                    b"qemu:dirty-bitmap:b",
                    b"x:",
                    b"zz",
                ];
                let q = if rng.chance(80) {
                    rng.pick(&queries).to_vec()
                } else {
                    rng.bytes(9)
                };
                put_u32(&mut out, q.len() as u32);
                out.extend(q);
            }
        }
        _ if rng.chance(70) => {}
        _ => {
            let n = rng.below(40) as usize;
            out = rng.bytes(n);
        }
    }
    out
}

fn handshake_stream(rng: &mut Rng) -> Vec<u8> {
    let mut s = Vec::new();
    let flags = if rng.chance(95) {
        rng.pick(&[1u32, 3])
    } else {
        rng.next() as u32
    };
    put_u32(&mut s, flags);
    for _ in 0..rng.below(40) {
        let code = match rng.below(10) {
            0 => rng.next() as u32,
            1 => 42,
            _ => rng.pick(&[3u32, 6, 7, 8, 9, 10, 11, 5, 1, 2, 6, 9, 10]),
        };
        // GO, EXPORT_NAME and ABORT end the negotiation: keep them rarer.
        if matches!(code, 1 | 2 | 7) && rng.chance(70) {
            continue;
        }
        let data = option_data(rng, code);
        let len = match rng.below(20) {
            0 => rng.next() as u32,
            1 => rng.pick(&[
                MAX_OPTION_DATA + 1,
                MAX_OPTION_DRAIN,
                MAX_OPTION_DRAIN + 1,
                u32::MAX,
            ]),
            2 => (data.len() as u32)
                .wrapping_add(rng.below(5) as u32)
                .wrapping_sub(2),
            _ => data.len() as u32,
        };
        put_u64(&mut s, IHAVEOPT);
        put_u32(&mut s, code);
        put_u32(&mut s, len);
        s.extend(data);
    }
    rng.mutate(&mut s);
    s
}

/// Everything a handshake run produced, independent of how the input was split.
#[derive(Debug, PartialEq)]
enum End {
    Done(Box<Negotiated>),
    Abort,
    Error(HandshakeError),
}

fn run_handshake(stream: &[u8], pieces: &[usize]) -> (Vec<u8>, End) {
    let mut h = Handshake::new(config());
    let mut replies = Vec::new();
    let mut at = 0;
    for &n in pieces {
        let piece = &stream[at..at + n];
        at += n;
        let step = h.feed(piece);
        assert!(h.buffered_len() <= MAX_OPTION_DATA as usize);
        assert!(
            step.reply().len() <= 64 * 1024,
            "{} bytes of replies",
            step.reply().len()
        );
        match step {
            Step::Continue(r) => replies.extend(r),
            Step::Done {
                reply,
                mut negotiated,
            } => {
                replies.extend(reply);
                negotiated.leftover.extend_from_slice(&stream[at..]);
                return (replies, End::Done(Box::new(negotiated)));
            }
            Step::Abort { reply } => {
                replies.extend(reply);
                return (replies, End::Abort);
            }
            Step::Close { reply, error } => {
                replies.extend(reply);
                return (replies, End::Error(error));
            }
        }
    }
    let end = match h.eof() {
        Step::Abort { reply } if reply.is_empty() => End::Abort,
        Step::Close { reply, error } if reply.is_empty() => End::Error(error),
        other => panic!("eof gave {other:?}"),
    };
    (replies, end)
}

#[test]
fn fuzz_handshake() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ends = [0usize; 3];
    for _ in 0..ITERATIONS {
        let stream = handshake_stream(&mut rng);
        let whole = run_handshake(&stream, &[stream.len()]);
        let pieces = rng.pieces(stream.len());
        let split = run_handshake(&stream, &pieces);
        assert_eq!(whole, split, "stream {stream:02x?}");
        if let End::Done(n) = &whole.1 {
            assert!(n.export < 2);
            assert!(n.transmission_flags.contains(TransmissionFlags::HAS_FLAGS));
            assert!(
                n.structured_replies || !n.transmission_flags.contains(TransmissionFlags::SEND_DF)
            );
            assert!(n.meta_contexts.len() <= 3);
        }
        ends[match whole.1 {
            End::Done(_) => 0,
            End::Abort => 1,
            End::Error(_) => 2,
        }] += 1;
    }
    // The generator reaches every kind of ending.
    assert!(ends.iter().all(|&n| n > ITERATIONS / 50), "{ends:?}");
}

fn session(rng: &mut Rng) -> Session {
    let extended_headers = rng.chance(40);
    let bits = rng.next() as u16 & TransmissionFlags::all().bits();
    Session {
        size: {
            let r = rng.next();
            rng.pick(&[0, 4096, 1 << 20, u64::MAX / 2, r])
        },
        flags: TransmissionFlags::from_bits_retain(bits) | TransmissionFlags::HAS_FLAGS,
        structured_replies: extended_headers || rng.chance(60),
        extended_headers,
        min_block: rng.pick(&[1, 1, 512, 4096]),
        max_payload: rng.pick(&[512, 65536, MAX_PAYLOAD_CAP]),
        meta_context_ids: (0..rng.below(4) as u32).map(|i| i * 3).collect(),
    }
}

fn request_stream(rng: &mut Rng, s: &Session) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(12) {
        let magic = if s.extended_headers {
            0x21e4_1c71
        } else {
            0x2560_9513
        };
        put_u32(
            &mut out,
            if rng.chance(97) {
                magic
            } else {
                rng.next() as u32
            },
        );
        let flags = match rng.below(8) {
            0..=3 => 0,
            4 | 5 => 1 << rng.below(6),
            6 => 0x20 | (1 << rng.below(6)),
            _ => rng.next() as u16,
        };
        put_u16(&mut out, flags);
        let kind = if rng.chance(90) {
            rng.below(10) as u16
        } else {
            rng.next() as u16
        };
        put_u16(&mut out, kind);
        put_u64(&mut out, rng.next());
        let r = rng.next();
        let offset = rng.pick(&[0, 512, 4096, s.size, s.size.saturating_sub(512), r]);
        put_u64(&mut out, offset);
        let max = u64::from(s.max_payload);
        let r = rng.next();
        let length = rng.pick(&[
            0,
            1,
            12,
            512,
            4096,
            max,
            max + 1,
            MAX_DRAIN,
            MAX_DRAIN + 1,
            r,
        ]);
        if s.extended_headers {
            put_u64(&mut out, length);
        } else {
            put_u32(&mut out, length as u32);
        }
        let sent = if s.extended_headers {
            length
        } else {
            u64::from(length as u32)
        };
        // Payloads that fit a test stream are included; longer ones run out the stream.
        if sent <= 8192 && (kind == 1 || flags & 0x20 != 0) {
            if kind == 7 && sent >= 8 {
                let r = rng.next();
                put_u64(&mut out, rng.pick(&[0, 512, r]));
                for _ in 0..(sent - 8) / 4 {
                    put_u32(&mut out, rng.pick(&[0, 3, 6, 7]));
                }
                out.extend(rng.bytes(((sent - 8) % 4) as usize));
            } else {
                out.extend(rng.bytes(sent as usize));
            }
        }
    }
    rng.mutate(&mut out);
    out
}

/// Checks what the validator promises about an accepted request.
fn check_accepted(r: &Request, s: &Session) {
    use TransmissionFlags as F;
    let within = |offset: u64, length: u64| offset.checked_add(length).is_some_and(|e| e <= s.size);
    let writes = matches!(
        r.command,
        Command::Write { .. }
            | Command::Trim { .. }
            | Command::WriteZeroes { .. }
            | Command::Resize { .. }
    );
    assert!(!(writes && s.flags.contains(F::READ_ONLY)), "{r:?}");
    if r.flags.contains(CommandFlags::FUA) && r.command != Command::Disc {
        assert!(s.flags.contains(F::SEND_FUA), "{r:?}");
    }
    match &r.command {
        Command::Read { offset, length, df } => {
            assert!(*length <= s.max_payload && within(*offset, u64::from(*length)));
            assert!(!df || (s.structured_replies && s.flags.contains(F::SEND_DF)));
        }
        Command::Write { offset, length, .. } => {
            assert!(*length <= s.max_payload && within(*offset, u64::from(*length)));
        }
        Command::Trim { offset, length, .. } => {
            assert!(s.flags.contains(F::SEND_TRIM) && within(*offset, *length));
        }
        Command::Cache { offset, length } => {
            assert!(s.flags.contains(F::SEND_CACHE) && within(*offset, *length));
        }
        Command::WriteZeroes {
            offset,
            length,
            fast_zero,
            ..
        } => {
            assert!(s.flags.contains(F::SEND_WRITE_ZEROES) && within(*offset, *length));
            assert!(!fast_zero || s.flags.contains(F::SEND_FAST_ZERO));
        }
        Command::BlockStatus {
            offset,
            length,
            context_ids,
            ..
        } => {
            assert!(*length > 0 && within(*offset, *length) && s.structured_replies);
            assert!(!s.meta_context_ids.is_empty());
            for id in context_ids.iter().flatten() {
                assert!(s.meta_context_ids.contains(id));
            }
        }
        Command::Flush => assert!(s.flags.contains(F::SEND_FLUSH)),
        Command::Resize { .. } => assert!(s.flags.contains(F::SEND_RESIZE)),
        Command::Disc => {}
    }
}

#[test]
fn fuzz_requests() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for _ in 0..ITERATIONS {
        let s = session(&mut rng);
        let stream = request_stream(&mut rng, &s);
        let most = s.header_len() + 8 + 4 * s.meta_context_ids.len();
        let mut buf: Vec<u8> = Vec::new();
        let mut skip = 0u64;
        let mut at = 0;
        'feed: for n in rng.pieces(stream.len()) {
            buf.extend_from_slice(&stream[at..at + n]);
            at += n;
            loop {
                let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(buf.len());
                buf.drain(..drop);
                skip -= drop as u64;
                if skip > 0 {
                    continue 'feed;
                }
                let parsed = match parse_request(&buf, &s) {
                    Ok(parsed) => parsed,
                    Err(_) => break 'feed,
                };
                match parsed {
                    Parse::Incomplete { needed } => {
                        assert!(
                            needed > buf.len() && needed <= most,
                            "{needed} {}",
                            buf.len()
                        );
                        continue 'feed;
                    }
                    Parse::Request { request, consumed } => {
                        assert!(consumed >= s.header_len() && consumed <= buf.len());
                        // The same bytes without what follows give the same answer.
                        let again = parse_request(&buf[..consumed], &s);
                        assert_eq!(
                            again,
                            Ok(Parse::Request {
                                request: request.clone(),
                                consumed
                            })
                        );
                        check_accepted(&request, &s);
                        accepted += 1;
                        if request.command == Command::Disc {
                            break 'feed;
                        }
                        if let Command::Write { length, .. } = request.command {
                            skip = u64::from(length);
                        }
                        buf.drain(..consumed);
                    }
                    Parse::Reject { reject, consumed } => {
                        assert_eq!(consumed, s.header_len());
                        assert!(reject.payload_to_drain <= MAX_DRAIN);
                        rejected += 1;
                        skip = reject.payload_to_drain;
                        buf.drain(..consumed);
                    }
                }
            }
        }
    }
    assert!(
        accepted > ITERATIONS / 4 && rejected > ITERATIONS,
        "{accepted} {rejected}"
    );
}
