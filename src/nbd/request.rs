//! The transmission phase's requests: [`parse_request`] reads one header (compact or extended,
//! as negotiated) from the front of a buffer and checks it against the [`Session`], returning
//! a [`Request`] to carry out, a [`Reject`] to answer with an error, or a [`FatalError`] that
//! closes the connection.
//!
//! The checks follow the specification's "SHOULD"s and what nbdkit's `validate_request` and
//! QEMU's `nbd_co_receive_request` do, in this order: unknown command (`EINVAL`); a write,
//! trim, write-zeroes or resize on a read-only export (`EPERM`); flags unknown, not valid for
//! the command or for a feature not advertised (`EINVAL`); a command not advertised (`EINVAL`);
//! a read or write longer than the maximum payload (`EINVAL`, or `EOVERFLOW` for a read with
//! structured replies); a range past the end of the export (`ENOSPC` for writes and write
//! zeroes, as both servers do and the specification suggests, else `EINVAL`); a range not
//! aligned to the minimum block size the client acknowledged (`EINVAL`); an empty block status
//! query (`EINVAL`). `NBD_CMD_DISC` is taken whatever its other fields say.

use thiserror::Error;

use super::config::{ExportConfig, MAX_PAYLOAD_CAP};
use super::handshake::Negotiated;
use super::reply::{Framing, ReplyTo};
use super::wire::{
    u16_at, u32_at, u64_at, CommandFlags, CommandType, NbdError, TransmissionFlags,
    COMPACT_REQUEST_LEN, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC,
};

/// The longest payload a rejected request may carry and still be discarded (64 MiB, twice the
/// largest maximum payload, like nbdkit's limit for skipping a write); a longer one closes the
/// connection.
pub const MAX_DRAIN: u64 = 64 * 1024 * 1024;

/// What the transmission phase of one connection has agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The export size in bytes (update it after a successful resize).
    pub size: u64,
    /// The transmission flags the client was sent.
    pub flags: TransmissionFlags,
    /// Structured replies are in use (also true with extended headers).
    pub structured_replies: bool,
    /// Extended headers are in use.
    pub extended_headers: bool,
    /// The alignment enforced on offsets and lengths (1: none).
    pub min_block: u32,
    /// The longest read or write payload accepted (never more than
    /// [`MAX_PAYLOAD_CAP`](super::MAX_PAYLOAD_CAP)).
    pub max_payload: u32,
    /// The ids of the selected metadata contexts.
    pub meta_context_ids: Vec<u32>,
}

impl Session {
    /// The session a handshake ended with, for `export` (the one it chose). Alignment is only
    /// enforced if the client acknowledged the block sizes in its `NBD_OPT_GO`: QEMU likewise
    /// only expects alignment from clients that asked for `NBD_INFO_BLOCK_SIZE`.
    pub fn new(negotiated: &Negotiated, export: &ExportConfig) -> Self {
        let min_block = if negotiated.block_sizes_acknowledged {
            export.block_sizes.minimum
        } else {
            1
        };
        Self {
            size: export.size,
            flags: negotiated.transmission_flags,
            structured_replies: negotiated.structured_replies || negotiated.extended_headers,
            extended_headers: negotiated.extended_headers,
            min_block,
            max_payload: export.block_sizes.maximum,
            meta_context_ids: negotiated.meta_contexts.iter().map(|c| c.id).collect(),
        }
    }

    /// The size of one request header: 28 bytes, or 32 with extended headers.
    pub fn header_len(&self) -> usize {
        if self.extended_headers {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        }
    }

    /// How replies are to be framed.
    pub fn framing(&self) -> Framing {
        Framing::new(self.structured_replies, self.extended_headers)
    }
}

/// A valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The client's opaque cookie, to echo in every reply.
    pub cookie: u64,
    /// The header's offset (echoed in extended reply headers).
    pub offset: u64,
    /// The header's flags.
    pub flags: CommandFlags,
    /// What to do.
    pub command: Command,
}

impl Request {
    /// Where replies to this request go.
    pub fn reply_to(&self) -> ReplyTo {
        ReplyTo {
            cookie: self.cookie,
            offset: self.offset,
        }
    }
}

/// A validated command. Ranges are within the export; `FUA` on other commands is accepted and
/// may be ignored, as the specification allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes (at most the maximum payload); `df`: send one content chunk.
    Read {
        /// Start of the range.
        offset: u64,
        /// Bytes to read.
        length: u32,
        /// Don't fragment: one data chunk.
        df: bool,
    },
    /// Write the `length` bytes of payload that follow the header (the caller reads them).
    Write {
        /// Start of the range.
        offset: u64,
        /// Payload bytes that follow.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Disconnect: finish outstanding requests, then close; no reply.
    Disc,
    /// Persist everything written so far.
    Flush,
    /// Discard a range (a hint).
    Trim {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u64,
        /// Persist before replying.
        fua: bool,
    },
    /// Prefetch a range (a hint).
    Cache {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u64,
    },
    /// Write zeros over a range.
    WriteZeroes {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u64,
        /// Persist before replying.
        fua: bool,
        /// Keep the range allocated (no hole).
        no_hole: bool,
        /// Fail with `ENOTSUP` unless faster than writing zeros.
        fast_zero: bool,
    },
    /// Report metadata over a range.
    BlockStatus {
        /// Start of the range.
        offset: u64,
        /// Length of the range (a hint; nonzero).
        length: u64,
        /// One extent per context, not longer than `length`.
        req_one: bool,
        /// The contexts to report (from a payload), or `None` for all selected ones.
        context_ids: Option<Vec<u32>>,
    },
    /// Change the export size (experimental `RESIZE` extension: the offset is the new size).
    Resize {
        /// The requested size in bytes.
        size: u64,
    },
}

/// An invalid request: answer it with `error` (and `message` in an error chunk) after
/// discarding the `payload_to_drain` bytes that follow its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The client's cookie.
    pub cookie: u64,
    /// The header's offset.
    pub offset: u64,
    /// The header's command type, as sent (it may be unknown).
    pub command: u16,
    /// The header's flags, as sent.
    pub flags: u16,
    /// The error to reply with.
    pub error: NbdError,
    /// Why, for the client's user (and logs).
    pub message: &'static str,
    /// Payload bytes after the header to read and discard before the next request.
    pub payload_to_drain: u64,
}

impl Reject {
    /// Where the error reply goes.
    pub fn reply_to(&self) -> ReplyTo {
        ReplyTo {
            cookie: self.cookie,
            offset: self.offset,
        }
    }

    /// Whether it was a read: with structured replies, a read must never get a simple reply.
    pub fn is_read(&self) -> bool {
        self.command == CommandType::Read.code()
    }
}

/// The result of looking at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Not a whole request yet: the buffer must hold at least `needed` bytes.
    Incomplete {
        /// Total bytes needed from the start of the buffer.
        needed: usize,
    },
    /// A valid request: `consumed` bytes were its header (and, for a block status with a
    /// payload, that payload); a write's payload follows them and is not counted.
    Request {
        /// The request.
        request: Request,
        /// Bytes of the buffer it used.
        consumed: usize,
    },
    /// An invalid request: `consumed` bytes were its header; its payload (if any) follows.
    Reject {
        /// The rejection.
        reject: Reject,
        /// Bytes of the buffer it used.
        consumed: usize,
    },
}

/// Why the connection must be closed at once.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FatalError {
    /// Not a request header (or the framing not negotiated).
    #[error("bad request magic {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// The magic received.
        found: u32,
        /// The magic the negotiated framing uses.
        expected: u32,
    },
    /// A payload too long to read or to discard.
    #[error("request payload of {length} bytes is over the {limit}-byte limit")]
    PayloadTooLarge {
        /// The payload length claimed.
        length: u64,
        /// The longest payload discarded ([`MAX_DRAIN`]).
        limit: u64,
    },
}

/// The fields of one request header.
#[derive(Debug, Clone, Copy)]
struct Header {
    flags: CommandFlags,
    kind: u16,
    offset: u64,
    length: u64,
    /// The bytes that follow the header.
    payload: u64,
}

/// An error reply decided by validation.
type Refusal = (NbdError, &'static str);

/// What validation made of a header.
enum Checked {
    /// Valid, using `extra` payload bytes after the header.
    Valid { command: Command, extra: usize },
    /// Valid so far, but its payload (`needed` bytes after the header) must be read first.
    NeedPayload(usize),
}

/// Reads one request from the front of `buf` (see the [module](self) for the checks).
pub fn parse_request(buf: &[u8], session: &Session) -> Result<Parse, FatalError> {
    let header_len = session.header_len();
    let (Some(magic), Some(flags), Some(kind), Some(cookie), Some(offset)) = (
        u32_at(buf, 0),
        u16_at(buf, 4),
        u16_at(buf, 6),
        u64_at(buf, 8),
        u64_at(buf, 16),
    ) else {
        return Ok(Parse::Incomplete { needed: header_len });
    };
    let (expected, length) = if session.extended_headers {
        (EXTENDED_REQUEST_MAGIC, u64_at(buf, 24))
    } else {
        (REQUEST_MAGIC, u32_at(buf, 24).map(u64::from))
    };
    let Some(length) = length else {
        return Ok(Parse::Incomplete { needed: header_len });
    };
    if magic != expected {
        return Err(FatalError::BadMagic {
            found: magic,
            expected,
        });
    }
    let flags = CommandFlags::from_bits_retain(flags);
    let command = CommandType::from_u16(kind);
    if command == Some(CommandType::Disc) {
        let request = Request {
            cookie,
            offset,
            flags,
            command: Command::Disc,
        };
        return Ok(Parse::Request {
            request,
            consumed: header_len,
        });
    }
    // A write always carries its payload (QEMU accepts it without PAYLOAD_LEN even with
    // extended headers); otherwise only extended headers with PAYLOAD_LEN do.
    let has_payload = command == Some(CommandType::Write)
        || (session.extended_headers && flags.contains(CommandFlags::PAYLOAD_LEN));
    let payload = if has_payload { length } else { 0 };
    if payload > MAX_DRAIN {
        return Err(FatalError::PayloadTooLarge {
            length: payload,
            limit: MAX_DRAIN,
        });
    }
    let header = Header {
        flags,
        kind,
        offset,
        length,
        payload,
    };
    let body = buf.get(header_len..).unwrap_or_default();
    match check(&header, session, body) {
        Ok(Checked::Valid { command, extra }) => {
            let request = Request {
                cookie,
                offset,
                flags,
                command,
            };
            Ok(Parse::Request {
                request,
                consumed: header_len + extra,
            })
        }
        Ok(Checked::NeedPayload(n)) => Ok(Parse::Incomplete {
            needed: header_len + n,
        }),
        Err((error, message)) => {
            let reject = Reject {
                cookie,
                offset,
                command: kind,
                flags: flags.bits(),
                error,
                message,
                payload_to_drain: payload,
            };
            Ok(Parse::Reject {
                reject,
                consumed: header_len,
            })
        }
    }
}

/// Validates a header; `body` is what the buffer holds after it.
fn check(h: &Header, s: &Session, body: &[u8]) -> Result<Checked, Refusal> {
    use CommandType as T;
    use NbdError::{Inval, NoSpc, Overflow, Perm};
    use TransmissionFlags as F;

    let ty = CommandType::from_u16(h.kind).ok_or((Inval, "unknown command"))?;
    let writes = matches!(ty, T::Write | T::Trim | T::WriteZeroes | T::Resize);
    if writes && s.flags.contains(F::READ_ONLY) {
        return Err((Perm, "the export is read-only"));
    }
    if let Some(message) = flag_error(ty, h.flags, s) {
        return Err((Inval, message));
    }
    let missing = match ty {
        T::Flush => !s.flags.contains(F::SEND_FLUSH),
        T::Trim => !s.flags.contains(F::SEND_TRIM),
        T::WriteZeroes => !s.flags.contains(F::SEND_WRITE_ZEROES),
        T::Cache => !s.flags.contains(F::SEND_CACHE),
        T::Resize => !s.flags.contains(F::SEND_RESIZE),
        T::BlockStatus if !s.structured_replies || s.meta_context_ids.is_empty() => {
            return Err((Inval, "block status needs a negotiated metadata context"));
        }
        T::Read | T::Write | T::Disc | T::BlockStatus => false,
    };
    if missing {
        return Err((Inval, "command not advertised"));
    }
    let fua = h.flags.contains(CommandFlags::FUA);
    let (offset, length) = (h.offset, h.length);
    let valid = |command| Ok(Checked::Valid { command, extra: 0 });
    match ty {
        T::Flush if offset != 0 || length != 0 => Err((Inval, "flush with a nonzero range")),
        T::Flush => valid(Command::Flush),
        T::Disc => valid(Command::Disc),
        T::Resize => valid(Command::Resize { size: offset }),
        T::Read => {
            let length = within_payload(length, s).ok_or_else(|| {
                let error = if s.structured_replies {
                    Overflow
                } else {
                    Inval
                };
                (error, "read longer than the maximum payload")
            })?;
            check_range(s, offset, u64::from(length), Inval)?;
            let df = h.flags.contains(CommandFlags::DF);
            valid(Command::Read { offset, length, df })
        }
        T::Write => {
            let length = within_payload(length, s)
                .ok_or((Inval, "write longer than the maximum payload"))?;
            check_range(s, offset, u64::from(length), NoSpc)?;
            valid(Command::Write {
                offset,
                length,
                fua,
            })
        }
        T::Trim => {
            check_range(s, offset, length, Inval)?;
            valid(Command::Trim {
                offset,
                length,
                fua,
            })
        }
        T::Cache => {
            check_range(s, offset, length, Inval)?;
            valid(Command::Cache { offset, length })
        }
        T::WriteZeroes => {
            check_range(s, offset, length, NoSpc)?;
            let no_hole = h.flags.contains(CommandFlags::NO_HOLE);
            let fast_zero = h.flags.contains(CommandFlags::FAST_ZERO);
            valid(Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast_zero,
            })
        }
        T::BlockStatus => block_status(h, s, body),
    }
}

/// `NBD_CMD_BLOCK_STATUS`, with its optional payload of an effect length and context ids.
fn block_status(h: &Header, s: &Session, body: &[u8]) -> Result<Checked, Refusal> {
    let req_one = h.flags.contains(CommandFlags::REQ_ONE);
    let (length, context_ids, extra) = if h.flags.contains(CommandFlags::PAYLOAD_LEN) {
        // "The payload form MUST occupy 8 + n*4 bytes": an effect length, then context ids;
        // more ids than were selected must repeat one, so such a payload is refused unread.
        let most = (s.meta_context_ids.len() as u64)
            .saturating_mul(4)
            .saturating_add(8);
        if h.payload < 12 || (h.payload - 8) % 4 != 0 || h.payload > most {
            return Err((NbdError::Inval, "malformed block status payload"));
        }
        let needed = usize::try_from(h.payload).unwrap_or(usize::MAX);
        let Some(payload) = body.get(..needed) else {
            return Ok(Checked::NeedPayload(needed));
        };
        let length = u64_at(payload, 0).unwrap_or_default();
        let mut ids = Vec::with_capacity((needed - 8) / 4);
        for chunk in payload[8..].chunks_exact(4) {
            let id = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            if !s.meta_context_ids.contains(&id) || ids.contains(&id) {
                return Err((NbdError::Inval, "unknown or repeated metadata context id"));
            }
            ids.push(id);
        }
        (length, Some(ids), needed)
    } else {
        (h.length, None, 0)
    };
    if length == 0 {
        return Err((NbdError::Inval, "block status of an empty range"));
    }
    check_range(s, h.offset, length, NbdError::Inval)?;
    let command = Command::BlockStatus {
        offset: h.offset,
        length,
        req_one,
        context_ids,
    };
    Ok(Checked::Valid { command, extra })
}

/// Why `flags` are not valid for `ty` in this session, if they are not.
fn flag_error(ty: CommandType, flags: CommandFlags, s: &Session) -> Option<&'static str> {
    use CommandFlags as C;
    use CommandType as T;
    use TransmissionFlags as F;
    let only = |flag: C, command: T| flags.contains(flag) && ty != command;
    let unadvertised = |flag: C, feature: F| flags.contains(flag) && !s.flags.contains(feature);
    if !C::all().contains(flags) {
        Some("unknown command flag")
    } else if unadvertised(C::FUA, F::SEND_FUA) {
        Some("FUA was not advertised")
    } else if only(C::NO_HOLE, T::WriteZeroes) {
        Some("NO_HOLE is only valid for write zeroes")
    } else if only(C::FAST_ZERO, T::WriteZeroes) {
        Some("FAST_ZERO is only valid for write zeroes")
    } else if unadvertised(C::FAST_ZERO, F::SEND_FAST_ZERO) {
        Some("FAST_ZERO was not advertised")
    } else if only(C::DF, T::Read) {
        Some("DF is only valid for reads")
    } else if flags.contains(C::DF) && !(s.structured_replies && s.flags.contains(F::SEND_DF)) {
        Some("DF needs structured replies and SEND_DF")
    } else if only(C::REQ_ONE, T::BlockStatus) {
        Some("REQ_ONE is only valid for block status")
    } else if flags.contains(C::PAYLOAD_LEN) && !s.extended_headers {
        Some("PAYLOAD_LEN needs extended headers")
    } else if flags.contains(C::PAYLOAD_LEN) && !matches!(ty, T::Write | T::BlockStatus) {
        Some("this command takes no payload")
    } else if ty == T::BlockStatus && unadvertised(C::PAYLOAD_LEN, F::BLOCK_STAT_PAYLOAD) {
        Some("block status payloads were not advertised")
    } else {
        None
    }
}

/// `length` as a payload size, if within the maximum payload (and the 32 MiB cap, whatever
/// the session says).
fn within_payload(length: u64, s: &Session) -> Option<u32> {
    let limit = s.max_payload.min(MAX_PAYLOAD_CAP);
    u32::try_from(length).ok().filter(|&n| n <= limit)
}

/// Refuses a range that ends past the export (with `past_end`) or is not aligned.
fn check_range(s: &Session, offset: u64, length: u64, past_end: NbdError) -> Result<(), Refusal> {
    let end = offset.checked_add(length).filter(|&end| end <= s.size);
    let Some(end) = end else {
        return Err((past_end, "range past the end of the export"));
    };
    let min = u64::from(s.min_block.max(1));
    // The last bytes of an export whose size is not aligned stay reachable.
    if offset % min != 0 || (length % min != 0 && end != s.size) {
        return Err((
            NbdError::Inval,
            "range not aligned to the minimum block size",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
