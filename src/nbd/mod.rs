//! The Network Block Device protocol, server side, without I/O ("sans-IO"): bytes from a
//! client go in, decisions and bytes to send come out. Nothing here touches a socket, a thread
//! or an image; the server loop owns those.
//!
//! A connection starts with [`Handshake`]: write [`Handshake::greeting`], then [`feed`] what
//! the client sends and write what each [`Step`] says until [`Step::Done`] hands over the
//! [`Negotiated`] result (and any bytes already read past the handshake). [`Session::new`]
//! turns that into what the transmission phase needs; [`parse_request`] splits the byte
//! stream into [`Request`]s, or [`Reject`]s to answer with an error, and [`Framing`] encodes
//! the replies. Every length a peer sends is checked before anything is allocated for it.
//!
//! ```text
//! write(handshake.greeting())
//! loop: n = read(buf); step = if n == 0 { handshake.eof() } else { handshake.feed(&buf[..n]) }
//!       write(step.reply()); Continue → loop; Abort | Close → close; Done → transmission
//! transmission: session = Session::new(&negotiated, &config.exports()[negotiated.export])
//!       input = negotiated.leftover; parse_request(&input, &session):
//!       Incomplete { needed } → read more; Request → (Write: read its payload) act, reply;
//!       Reject → discard payload_to_drain bytes, session.framing().error_reply(..);
//!       Err(FatalError) or Disc → close
//! ```
//!
//! The protocol is the NBD specification's `doc/proto.md`, including the `EXTENDED_HEADERS`
//! extension; QEMU's `qemu:` metadata contexts are described in its `docs/interop/nbd.rst`.
//!
//! | file | concern |
//! |---|---|
//! | `wire.rs` | magics, flag sets, option/reply/command/chunk codes, error values, big-endian helpers |
//! | `config.rs` | what the server offers: [`ExportConfig`]s validated into a [`ServerConfig`] |
//! | `handshake.rs` | the negotiation's byte framing and bounds: [`Handshake`], [`Step`], [`Negotiated`] |
//! | `options.rs` | what each option means: its data, the state it changes, its replies |
//! | `request.rs` | the transmission phase's requests: [`Session`], [`parse_request`], validation |
//! | `reply.rs` | simple replies and structured/extended reply chunks: [`Framing`] |
//! | `handshake_tests.rs`, `options_tests.rs` | the negotiation, with hand-built byte sequences for every option and limit |
//! | `request_tests.rs`, `request_ext_tests.rs` | every command and every rejection, compact and extended |
//! | `reply_tests.rs` | every encoder, byte for byte against the specification's layouts |
//! | `fuzz_tests.rs` | a deterministic fuzzer over both parsers, fed in random-sized pieces |
//!
//! [`feed`]: Handshake::feed

mod config;
mod handshake;
mod options;
mod reply;
mod request;
pub mod wire;

#[cfg(test)]
mod fuzz_tests;

pub use config::{
    BlockSizes, ConfigError, ExportConfig, ServerConfig, MAX_EXPORTS, MAX_META_CONTEXTS,
    MAX_PAYLOAD_CAP,
};
pub use handshake::{
    Ending, Handshake, HandshakeError, MetaContext, Negotiated, Step, MAX_OPTIONS, MAX_OPTION_DATA,
    MAX_OPTION_DRAIN,
};
pub use reply::{Extent, Framing, ReplyError, ReplyTo, MAX_EXTENTS};
pub use request::{parse_request, Command, FatalError, Parse, Reject, Request, Session, MAX_DRAIN};
pub use wire::NbdError;
