//! The server side of the fixed newstyle negotiation as a state machine: bytes from the client
//! go in ([`Handshake::feed`]), bytes to write and decisions come out ([`Step`]).
//!
//! The machine buffers at most one option header or the data of one option (at most
//! [`MAX_OPTION_DATA`] bytes); longer option data up to [`MAX_OPTION_DRAIN`] is discarded as it
//! arrives and answered with `ERR_TOO_BIG`, and anything longer closes the connection before a
//! byte of it is stored. What each option means is in [`options`](super::options).

use std::sync::Arc;

use thiserror::Error;

use super::config::ServerConfig;
use super::options::{Negotiation, Outcome};
use super::wire::{
    put_u16, put_u64, u32_at, u64_at, HandshakeFlags, OptionCode, TransmissionFlags, IHAVEOPT,
    MAX_STRING_LEN, NBDMAGIC, OPTION_HEADER_LEN,
};

/// The most options one handshake may send (`NBD_OPT_ABORT` is always answered); the next one
/// closes the connection, as nbdkit does: the specification lets a server "initiate a hard
/// disconnect" when it "believes a client's behaviour constitutes a denial of service".
pub const MAX_OPTIONS: u32 = 32;
/// The longest option data read and parsed.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// The longest option data discarded (then answered with `ERR_TOO_BIG`); longer closes.
pub const MAX_OPTION_DRAIN: u32 = 1024 * 1024;

/// The server's side of one connection's negotiation.
#[derive(Debug)]
pub struct Handshake {
    negotiation: Negotiation,
    state: State,
    /// The part of the current client flags, option header or option data received so far.
    buf: Vec<u8>,
    /// Options received, counting the current one.
    options: u32,
}

/// Where in the byte stream the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the 32-bit client flags.
    ClientFlags,
    /// Waiting for a 16-byte option header.
    OptionHeader,
    /// Waiting for `len` bytes of data of `option`.
    OptionData { option: u32, len: usize },
    /// Discarding `remaining` more bytes of an over-long `option`.
    Drain { option: u32, remaining: usize },
    /// Negotiation ended (transmission, abort or error); no more input is taken.
    Ended,
}

/// What to do after feeding bytes.
#[derive(Debug)]
pub enum Step {
    /// Write these bytes (possibly none) to the client and keep feeding.
    Continue(Vec<u8>),
    /// Write `reply`, then enter the transmission phase with `negotiated`.
    Done {
        /// The final reply (the `GO` replies, or the `EXPORT_NAME` size and flags).
        reply: Vec<u8>,
        /// What was agreed, and any bytes already received for the transmission phase.
        negotiated: Negotiated,
    },
    /// The client ended the session: write `reply` (best effort; it may be empty) and close.
    Abort {
        /// The `NBD_REP_ACK` to `NBD_OPT_ABORT`, after any earlier replies.
        reply: Vec<u8>,
    },
    /// Write `reply` (the answers to options before the failure, usually none), then close
    /// the connection at once: a hard disconnect, for `error`.
    Close {
        /// Replies to the options handled before the failure.
        reply: Vec<u8>,
        /// Why the connection must be closed.
        error: HandshakeError,
    },
}

impl Step {
    /// The bytes to write, whatever the step.
    pub fn reply(&self) -> &[u8] {
        match self {
            Step::Continue(reply)
            | Step::Done { reply, .. }
            | Step::Abort { reply }
            | Step::Close { reply, .. } => reply,
        }
    }
}

/// How the negotiation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// With `NBD_OPT_EXPORT_NAME` (no information requests, no size constraints agreed).
    ExportName,
    /// With a successful `NBD_OPT_GO`.
    Go,
}

/// A metadata context selected for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The id sent to the client, used in `NBD_REPLY_TYPE_BLOCK_STATUS` chunks.
    pub id: u32,
    /// Its position in the export's [`meta_contexts`](super::ExportConfig::meta_contexts).
    pub index: usize,
    /// Its full name.
    pub name: String,
}

/// What the negotiation agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The chosen export's index in [`ServerConfig::exports`].
    pub export: usize,
    /// Structured replies are in use (also true when extended headers are).
    pub structured_replies: bool,
    /// Extended headers are in use (32-byte requests, extended reply chunks only).
    pub extended_headers: bool,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// The transmission flags sent to the client.
    pub transmission_flags: TransmissionFlags,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in its `GO`, so it must honour the export's
    /// block sizes ("it MUST abide by the size constraints it receives").
    pub block_sizes_acknowledged: bool,
    /// The contexts selected by the last `NBD_OPT_SET_META_CONTEXT`, if it named this export.
    pub meta_contexts: Vec<MetaContext>,
    /// How the negotiation ended.
    pub ended_with: Ending,
    /// Bytes received after the final option: the start of the transmission phase.
    pub leftover: Vec<u8>,
}

impl Handshake {
    /// A negotiation over `config`'s exports.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            negotiation: Negotiation::new(config),
            state: State::ClientFlags,
            buf: Vec::new(),
            options: 0,
        }
    }

    /// The bytes the server sends first: `NBDMAGIC`, `IHAVEOPT` and the handshake flags
    /// (fixed newstyle, no zeroes).
    pub fn greeting(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(super::wire::GREETING_LEN);
        put_u64(&mut out, NBDMAGIC);
        put_u64(&mut out, IHAVEOPT);
        let flags = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
        put_u16(&mut out, flags.bits());
        out
    }

    /// Answers every further option (except `NBD_OPT_ABORT`) with `NBD_REP_ERR_SHUTDOWN`, as
    /// the specification asks of a server being shut down; `NBD_OPT_EXPORT_NAME` closes.
    pub fn shutdown(&mut self) {
        self.negotiation.shutting_down = true;
    }

    /// How many bytes of an incomplete message are held (at most [`MAX_OPTION_DATA`]).
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Takes bytes from the client; every byte is consumed (those after the negotiation end up
    /// in [`Negotiated::leftover`]). The outcome does not depend on how the client's bytes are
    /// split between calls: feeding them one at a time or all at once writes the same replies.
    pub fn feed(&mut self, input: &[u8]) -> Step {
        if self.state == State::Ended {
            return Step::Close {
                reply: Vec::new(),
                error: HandshakeError::Ended,
            };
        }
        let mut out = Vec::new();
        let mut pos = 0;
        let result = self.run(input, &mut pos, &mut out);
        if !matches!(result, Ok(None)) {
            self.state = State::Ended;
            self.buf = Vec::new();
        }
        match result {
            Ok(None) | Ok(Some(Outcome::Continue)) => Step::Continue(out),
            Ok(Some(Outcome::Done(mut negotiated))) => {
                negotiated.leftover = input.get(pos..).unwrap_or_default().to_vec();
                Step::Done {
                    reply: out,
                    negotiated,
                }
            }
            Ok(Some(Outcome::Abort)) => Step::Abort { reply: out },
            Err(error) => Step::Close { reply: out, error },
        }
    }

    /// The client closed its side. Between messages that is a clean end (`Step::Abort` with
    /// nothing to write); inside one it is `Step::Close` with [`HandshakeError::Truncated`].
    pub fn eof(&mut self) -> Step {
        let state = std::mem::replace(&mut self.state, State::Ended);
        let held = std::mem::take(&mut self.buf).len();
        let error = match state {
            State::Ended => HandshakeError::Ended,
            State::ClientFlags | State::OptionHeader if held == 0 => {
                return Step::Abort { reply: Vec::new() };
            }
            _ => HandshakeError::Truncated,
        };
        Step::Close {
            reply: Vec::new(),
            error,
        }
    }

    /// Consumes `input` from `pos` until it runs out or the negotiation ends (`Some`).
    fn run(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<Outcome>, HandshakeError> {
        loop {
            match self.state {
                State::ClientFlags => {
                    let Some(flags) = self.fill(4, input, pos).and_then(|b| u32_at(b, 0)) else {
                        return Ok(None);
                    };
                    self.buf.clear();
                    self.negotiation.client_flags(flags)?;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let Some(header) = self.fill(OPTION_HEADER_LEN, input, pos) else {
                        return Ok(None);
                    };
                    let magic = u64_at(header, 0).unwrap_or_default();
                    let option = u32_at(header, 8).unwrap_or_default();
                    let len = u32_at(header, 12).unwrap_or_default();
                    self.buf.clear();
                    if let Some(outcome) = self.option_header(magic, option, len, out)? {
                        return Ok(Some(outcome));
                    }
                }
                State::OptionData { option, len } => {
                    if self.fill(len, input, pos).is_none() {
                        return Ok(None);
                    }
                    self.state = State::OptionHeader;
                    let data = std::mem::take(&mut self.buf);
                    let outcome = self.negotiation.handle(option, &data, out)?;
                    self.buf = data;
                    self.buf.clear();
                    if !matches!(outcome, Outcome::Continue) {
                        return Ok(Some(outcome));
                    }
                }
                State::Drain { option, remaining } => {
                    let available = input.len().saturating_sub(*pos);
                    let n = remaining.min(available);
                    *pos += n;
                    if n < remaining {
                        self.state = State::Drain {
                            option,
                            remaining: remaining - n,
                        };
                        return Ok(None);
                    }
                    self.negotiation.too_big(option, out);
                    self.state = State::OptionHeader;
                }
                State::Ended => return Err(HandshakeError::Ended),
            }
        }
    }

    /// Checks an option header and picks the next state; `Some` if it ended the negotiation.
    fn option_header(
        &mut self,
        magic: u64,
        option: u32,
        len: u32,
        out: &mut Vec<u8>,
    ) -> Result<Option<Outcome>, HandshakeError> {
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        self.options += 1;
        if option == OptionCode::Abort.code() {
            // Its data is to be ignored, and the connection closes anyway.
            return Ok(Some(self.negotiation.abort(out)));
        }
        if self.options > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions(MAX_OPTIONS));
        }
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if option == OptionCode::ExportName.code() && len_usize > MAX_STRING_LEN {
            // No error reply exists for EXPORT_NAME (QEMU also closes here).
            return Err(HandshakeError::ExportNameTooLong(len));
        }
        if len > MAX_OPTION_DRAIN {
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        self.state = if len > MAX_OPTION_DATA {
            State::Drain {
                option,
                remaining: len_usize,
            }
        } else {
            State::OptionData {
                option,
                len: len_usize,
            }
        };
        Ok(None)
    }

    /// Moves bytes from `input` into the buffer until it holds `need`; then returns it.
    fn fill(&mut self, need: usize, input: &[u8], pos: &mut usize) -> Option<&[u8]> {
        let want = need.saturating_sub(self.buf.len());
        let rest = input.get(*pos..).unwrap_or_default();
        let take = want.min(rest.len());
        self.buf.extend_from_slice(&rest[..take]);
        *pos += take;
        (self.buf.len() >= need).then_some(&self.buf[..])
    }
}

/// Why the connection must be closed during the negotiation (see [`Step::Close`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The client flags lack `NBD_FLAG_C_FIXED_NEWSTYLE`.
    #[error("the client does not speak fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// The client flags have bits this server did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option header without `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// More than [`MAX_OPTIONS`] options.
    #[error("the client sent more than {0} options")]
    TooManyOptions(u32),
    /// Option data longer than [`MAX_OPTION_DRAIN`].
    #[error("option {option} claims {len} bytes of data")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// The claimed data length.
        len: u32,
    },
    /// An `NBD_OPT_EXPORT_NAME` name longer than 4096 bytes.
    #[error("export name of {0} bytes")]
    ExportNameTooLong(u32),
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist.
    #[error("export '{0}' not present")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` after extended headers ("a client MUST NOT use this option").
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameAfterExtendedHeaders,
    /// `NBD_OPT_EXPORT_NAME` while shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The client closed the connection in the middle of a message.
    #[error("the client disconnected in the middle of a message")]
    Truncated,
    /// Input after the negotiation ended.
    #[error("the negotiation has already ended")]
    Ended,
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
