//! Reply encoders: simple replies, and structured reply chunks with a compact (20-byte) or an
//! extended (32-byte) header, as the negotiated [`Framing`] says. Every encoder appends to a
//! `Vec<u8>`; a read's data can be sent separately after [`Framing::offset_data_header`].
//!
//! Layouts (all big-endian):
//!
//! | message | fields |
//! |---|---|
//! | simple reply | magic `0x67446698` u32, error u32, cookie u64, then read data if any |
//! | compact chunk header | magic `0x668e33ef` u32, flags u16, type u16, cookie u64, length u32 |
//! | extended chunk header | magic `0x6e8a278c` u32, flags u16, type u16, cookie u64, offset u64 (the request's), length u64 |
//! | `OFFSET_DATA` | offset u64, data |
//! | `OFFSET_HOLE` | offset u64, hole size u32 (also with extended headers) |
//! | `ERROR` | error u32, message length u16, message |
//! | `ERROR_OFFSET` | error u32, message length u16, message, offset u64 |
//! | `BLOCK_STATUS` | context id u32, then (length u32, status u32) per extent |
//! | `BLOCK_STATUS_EXT` | context id u32, extent count u32, then (length u64, status u64) per extent |

use thiserror::Error;

use super::wire::{
    put_u16, put_u32, put_u64, ChunkType, NbdError, ReplyFlags, EXTENDED_REPLY_MAGIC,
    MAX_STRING_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// The most extents in one block status chunk: the specification's "SHOULD NOT send more than
/// 2^20 extents in a single reply chunk".
pub const MAX_EXTENTS: usize = 1 << 20;

/// How replies are framed on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Simple replies only (nothing negotiated).
    Simple,
    /// Structured replies with compact chunk headers (simple replies allowed without data).
    Structured,
    /// Extended headers: extended chunk headers only, never a simple reply.
    Extended,
}

/// Which request a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (only extended headers carry it).
    pub offset: u64,
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// Status flags, as the context defines them (`base:allocation`: hole 1, zero 2;
    /// `qemu:allocation-depth`: the depth).
    pub status: u64,
}

/// A reply that cannot be encoded as asked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    /// A simple reply after extended headers were negotiated.
    #[error("simple replies are not allowed with extended headers")]
    SimpleWithExtendedHeaders,
    /// A chunk although structured replies were not negotiated.
    #[error("structured replies were not negotiated")]
    NotStructured,
    /// A payload too long for a compact chunk header.
    #[error("chunk payload of {0} bytes does not fit a compact header")]
    PayloadTooLong(u64),
    /// `OFFSET_DATA` without data.
    #[error("a data chunk needs at least one byte")]
    EmptyData,
    /// `OFFSET_HOLE` of length zero.
    #[error("a hole chunk needs a nonzero size")]
    EmptyHole,
    /// A block status chunk without extents.
    #[error("a block status chunk needs at least one extent")]
    NoExtents,
    /// More than [`MAX_EXTENTS`] extents.
    #[error("{0} extents in one chunk: at most {MAX_EXTENTS}")]
    TooManyExtents(usize),
    /// An extent of length zero.
    #[error("block status extents must have a nonzero length")]
    EmptyExtent,
    /// An extent length or status too large for `NBD_REPLY_TYPE_BLOCK_STATUS`.
    #[error("extent (length {length}, status {status:#x}) does not fit 32 bits")]
    ExtentTooWide {
        /// The extent's length.
        length: u64,
        /// The extent's status.
        status: u64,
    },
}

impl Framing {
    /// The framing for what was negotiated (extended headers imply structured replies).
    pub fn new(structured_replies: bool, extended_headers: bool) -> Self {
        match (structured_replies, extended_headers) {
            (_, true) => Self::Extended,
            (true, false) => Self::Structured,
            (false, false) => Self::Simple,
        }
    }

    /// A simple reply header (read data, if any, follows it).
    pub fn simple(
        self,
        out: &mut Vec<u8>,
        cookie: u64,
        error: Option<NbdError>,
    ) -> Result<(), ReplyError> {
        if self == Self::Extended {
            return Err(ReplyError::SimpleWithExtendedHeaders);
        }
        put_u32(out, SIMPLE_REPLY_MAGIC);
        put_u32(out, error.map_or(0, NbdError::code));
        put_u64(out, cookie);
        Ok(())
    }

    /// A chunk header for a payload of `payload_len` bytes.
    pub fn chunk_header(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        flags: ReplyFlags,
        kind: ChunkType,
        payload_len: u64,
    ) -> Result<(), ReplyError> {
        match self {
            Self::Simple => return Err(ReplyError::NotStructured),
            Self::Structured => {
                let len = u32::try_from(payload_len)
                    .map_err(|_| ReplyError::PayloadTooLong(payload_len))?;
                put_u32(out, STRUCTURED_REPLY_MAGIC);
                put_u16(out, flags.bits());
                put_u16(out, kind.code());
                put_u64(out, to.cookie);
                put_u32(out, len);
            }
            Self::Extended => {
                put_u32(out, EXTENDED_REPLY_MAGIC);
                put_u16(out, flags.bits());
                put_u16(out, kind.code());
                put_u64(out, to.cookie);
                put_u64(out, to.offset);
                put_u64(out, payload_len);
            }
        }
        Ok(())
    }

    /// `NBD_REPLY_TYPE_NONE`, always final.
    pub fn none(self, out: &mut Vec<u8>, to: ReplyTo) -> Result<(), ReplyError> {
        self.chunk_header(out, to, ReplyFlags::DONE, ChunkType::None, 0)
    }

    /// The header and offset of an `OFFSET_DATA` chunk whose `data_len` bytes the caller sends
    /// next (so that a large read need not be copied).
    pub fn offset_data_header(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        done: bool,
        data_offset: u64,
        data_len: usize,
    ) -> Result<(), ReplyError> {
        if data_len == 0 {
            return Err(ReplyError::EmptyData);
        }
        let len = (data_len as u64).saturating_add(8);
        self.chunk_header(out, to, done_flag(done), ChunkType::OffsetData, len)?;
        put_u64(out, data_offset);
        Ok(())
    }

    /// A whole `OFFSET_DATA` chunk.
    pub fn offset_data(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        done: bool,
        data_offset: u64,
        data: &[u8],
    ) -> Result<(), ReplyError> {
        self.offset_data_header(out, to, done, data_offset, data.len())?;
        out.extend_from_slice(data);
        Ok(())
    }

    /// An `OFFSET_HOLE` chunk: `hole_len` bytes at `hole_offset` read as zeros. The hole size
    /// stays 32 bits with extended headers (the extension defines no wider form).
    pub fn offset_hole(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        done: bool,
        hole_offset: u64,
        hole_len: u32,
    ) -> Result<(), ReplyError> {
        if hole_len == 0 {
            return Err(ReplyError::EmptyHole);
        }
        self.chunk_header(out, to, done_flag(done), ChunkType::OffsetHole, 12)?;
        put_u64(out, hole_offset);
        put_u32(out, hole_len);
        Ok(())
    }

    /// An `ERROR` chunk; the message is cut to the protocol's 4096 bytes.
    pub fn error(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        done: bool,
        error: NbdError,
        message: &str,
    ) -> Result<(), ReplyError> {
        let message = truncate(message);
        let len = 6 + message.len() as u64;
        self.chunk_header(out, to, done_flag(done), ChunkType::Error, len)?;
        error_fields(out, error, message);
        Ok(())
    }

    /// An `ERROR_OFFSET` chunk: the error happened at `error_offset`.
    pub fn error_offset(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        done: bool,
        error: NbdError,
        message: &str,
        error_offset: u64,
    ) -> Result<(), ReplyError> {
        let message = truncate(message);
        let len = 14 + message.len() as u64;
        self.chunk_header(out, to, done_flag(done), ChunkType::ErrorOffset, len)?;
        error_fields(out, error, message);
        put_u64(out, error_offset);
        Ok(())
    }

    /// A block status chunk for one context: `BLOCK_STATUS` (32-bit descriptors) with compact
    /// headers, `BLOCK_STATUS_EXT` (64-bit, with a count) with extended ones, as required.
    pub fn block_status(
        self,
        out: &mut Vec<u8>,
        to: ReplyTo,
        done: bool,
        context_id: u32,
        extents: &[Extent],
    ) -> Result<(), ReplyError> {
        if extents.is_empty() {
            return Err(ReplyError::NoExtents);
        }
        if extents.len() > MAX_EXTENTS {
            return Err(ReplyError::TooManyExtents(extents.len()));
        }
        if extents.iter().any(|e| e.length == 0) {
            return Err(ReplyError::EmptyExtent);
        }
        let count = extents.len() as u64;
        match self {
            Self::Simple => Err(ReplyError::NotStructured),
            Self::Structured => {
                let narrow = |e: &Extent| {
                    Some((u32::try_from(e.length).ok()?, u32::try_from(e.status).ok()?))
                };
                let mut pairs = Vec::with_capacity(extents.len());
                for e in extents {
                    let pair = narrow(e).ok_or(ReplyError::ExtentTooWide {
                        length: e.length,
                        status: e.status,
                    })?;
                    pairs.push(pair);
                }
                let flags = done_flag(done);
                self.chunk_header(out, to, flags, ChunkType::BlockStatus, 4 + 8 * count)?;
                put_u32(out, context_id);
                for (length, status) in pairs {
                    put_u32(out, length);
                    put_u32(out, status);
                }
                Ok(())
            }
            Self::Extended => {
                let flags = done_flag(done);
                self.chunk_header(out, to, flags, ChunkType::BlockStatusExt, 8 + 16 * count)?;
                put_u32(out, context_id);
                put_u32(out, extents.len() as u32);
                for e in extents {
                    put_u64(out, e.length);
                    put_u64(out, e.status);
                }
                Ok(())
            }
        }
    }

    /// The whole reply to a request that failed: a simple reply with the error, or a final
    /// `ERROR` chunk (which also suits a read with structured replies).
    pub fn error_reply(self, out: &mut Vec<u8>, to: ReplyTo, error: NbdError, message: &str) {
        let message = truncate(message);
        match self {
            Self::Simple => {
                put_u32(out, SIMPLE_REPLY_MAGIC);
                put_u32(out, error.code());
                put_u64(out, to.cookie);
            }
            Self::Structured | Self::Extended => {
                // Cannot fail: the payload is at most 6 + 4096 bytes.
                let _ = self.error(out, to, true, error, message);
            }
        }
    }

    /// The whole reply to a request other than a read that succeeded: a simple reply, or a
    /// `NONE` chunk with extended headers.
    pub fn ok_reply(self, out: &mut Vec<u8>, to: ReplyTo) {
        match self {
            Self::Simple | Self::Structured => {
                put_u32(out, SIMPLE_REPLY_MAGIC);
                put_u32(out, 0);
                put_u64(out, to.cookie);
            }
            Self::Extended => {
                // Cannot fail: an empty payload fits every header.
                let _ = self.none(out, to);
            }
        }
    }
}

/// `DONE` if `done`.
fn done_flag(done: bool) -> ReplyFlags {
    if done {
        ReplyFlags::DONE
    } else {
        ReplyFlags::empty()
    }
}

/// `message` cut at a character boundary to at most 4096 bytes.
fn truncate(message: &str) -> &str {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// The error, message length and message shared by the error chunks.
fn error_fields(out: &mut Vec<u8>, error: NbdError, message: &str) {
    put_u32(out, error.code());
    put_u16(out, message.len() as u16);
    out.extend_from_slice(message.as_bytes());
}

#[cfg(test)]
#[path = "reply_tests.rs"]
mod tests;
