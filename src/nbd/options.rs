//! What each option of the fixed newstyle negotiation means: parsing its data, the state it
//! changes (structured replies, extended headers, selected metadata contexts) and the replies
//! it gets. The byte framing around options lives in [`handshake`](super::handshake).

use std::sync::Arc;

use super::config::{ExportConfig, ServerConfig};
use super::handshake::{Ending, HandshakeError, MetaContext, Negotiated};
use super::wire::{
    put_u16, put_u32, put_u64, ClientFlags, Cursor, InfoType, OptionCode, OptionReply,
    TransmissionFlags, EXPORT_NAME_ZEROES, MAX_STRING_LEN, OPTION_REPLY_MAGIC,
};

/// The longest client-supplied name echoed back in an error message (as QEMU does).
const ECHO_LEN: usize = 80;

/// What an option did to the negotiation.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Keep negotiating.
    Continue,
    /// Transmission starts (`leftover` still to be filled by the framing).
    Done(Negotiated),
    /// The client aborted; close after the reply.
    Abort,
}

/// The contexts selected by the last `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone)]
struct MetaSelection {
    /// The export the option named.
    export: usize,
    /// Positions in that export's `meta_contexts`.
    contexts: Vec<usize>,
}

/// The negotiation state of one connection, changed option by option.
#[derive(Debug)]
pub(super) struct Negotiation {
    config: Arc<ServerConfig>,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    meta: Option<MetaSelection>,
    /// Set by [`Handshake::shutdown`](super::Handshake::shutdown).
    pub(super) shutting_down: bool,
}

impl Negotiation {
    /// A fresh negotiation over `config`.
    pub(super) fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            config,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            shutting_down: false,
        }
    }

    /// Takes the client flags: fixed newstyle is required, unknown bits close the connection.
    pub(super) fn client_flags(&mut self, raw: u32) -> Result<(), HandshakeError> {
        let flags = ClientFlags::from_bits(raw).ok_or(HandshakeError::UnknownClientFlags(raw))?;
        if !flags.contains(ClientFlags::FIXED_NEWSTYLE) {
            return Err(HandshakeError::NotFixedNewstyle);
        }
        self.no_zeroes = flags.contains(ClientFlags::NO_ZEROES);
        Ok(())
    }

    /// Answers `NBD_OPT_ABORT` (its data, if any, is ignored as the specification asks).
    pub(super) fn abort(&self, out: &mut Vec<u8>) -> Outcome {
        reply(out, OptionCode::Abort.code(), OptionReply::Ack, &[]);
        Outcome::Abort
    }

    /// Answers an option whose data was too long to read (and has been discarded).
    pub(super) fn too_big(&self, option: u32, out: &mut Vec<u8>) {
        error(out, option, OptionReply::ErrTooBig, "option data too long");
    }

    /// Handles one complete option.
    pub(super) fn handle(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Outcome, HandshakeError> {
        let code = OptionCode::from_u32(option);
        if self.shutting_down && code != Some(OptionCode::Abort) {
            if code == Some(OptionCode::ExportName) {
                return Err(HandshakeError::ShuttingDown);
            }
            error(
                out,
                option,
                OptionReply::ErrShutdown,
                "server is shutting down",
            );
            return Ok(Outcome::Continue);
        }
        let Some(code) = code else {
            let message = format!("unsupported option {option}");
            error(out, option, OptionReply::ErrUnsup, &message);
            return Ok(Outcome::Continue);
        };
        match code {
            OptionCode::Abort => return Ok(self.abort(out)),
            OptionCode::ExportName => return self.export_name(data, out),
            OptionCode::Info | OptionCode::Go => return Ok(self.info(code, data, out)),
            OptionCode::ListMetaContext | OptionCode::SetMetaContext => {
                self.meta_context(code, data, out);
            }
            OptionCode::List
            | OptionCode::StartTls
            | OptionCode::StructuredReply
            | OptionCode::ExtendedHeaders => {
                if data.is_empty() {
                    self.without_data(code, out);
                } else {
                    error(out, option, OptionReply::ErrInvalid, "option takes no data");
                }
            }
        }
        Ok(Outcome::Continue)
    }

    /// The options that take no data: `LIST`, `STARTTLS`, `STRUCTURED_REPLY`,
    /// `EXTENDED_HEADERS`.
    fn without_data(&mut self, code: OptionCode, out: &mut Vec<u8>) {
        let option = code.code();
        match code {
            OptionCode::List => {
                for export in self.config.exports() {
                    let description = export.description.as_deref().unwrap_or("");
                    let name_len = len_u32(export.name.len()).to_be_bytes();
                    let parts = [
                        &name_len[..],
                        export.name.as_bytes(),
                        description.as_bytes(),
                    ];
                    reply(out, option, OptionReply::Server, &parts);
                }
                reply(out, option, OptionReply::Ack, &[]);
            }
            // NOTLS mode: "it MUST respond with NBD_REP_ERR_POLICY (if it does not support TLS
            // for policy reasons)" (QEMU without TLS credentials does the same).
            OptionCode::StartTls => {
                error(out, option, OptionReply::ErrPolicy, "TLS is not configured");
            }
            OptionCode::StructuredReply => {
                if !self.config.structured_replies() {
                    error(
                        out,
                        option,
                        OptionReply::ErrUnsup,
                        "structured replies are disabled",
                    );
                } else if self.extended {
                    let message = "extended headers already negotiated";
                    error(out, option, OptionReply::ErrExtHeaderReqd, message);
                } else if self.structured {
                    let message = "structured replies already negotiated";
                    error(out, option, OptionReply::ErrInvalid, message);
                } else {
                    self.structured = true;
                    reply(out, option, OptionReply::Ack, &[]);
                }
            }
            OptionCode::ExtendedHeaders => {
                if !self.config.extended_headers() {
                    error(
                        out,
                        option,
                        OptionReply::ErrUnsup,
                        "extended headers are disabled",
                    );
                } else if self.extended {
                    let message = "extended headers already negotiated";
                    error(out, option, OptionReply::ErrInvalid, message);
                } else {
                    self.extended = true;
                    reply(out, option, OptionReply::Ack, &[]);
                }
            }
            _ => error(out, option, OptionReply::ErrUnsup, "unsupported option"),
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists, so every failure closes the connection.
    fn export_name(&self, data: &[u8], out: &mut Vec<u8>) -> Result<Outcome, HandshakeError> {
        if self.extended {
            return Err(HandshakeError::ExportNameAfterExtendedHeaders);
        }
        let index = self
            .config
            .find_export(data)
            .ok_or_else(|| HandshakeError::UnknownExport(echo(data)))?;
        let negotiated = self.negotiated(index, false, Ending::ExportName);
        let export = &self.config.exports()[index];
        put_u64(out, export.size);
        put_u16(out, negotiated.transmission_flags.bits());
        if !self.no_zeroes {
            out.extend_from_slice(&[0; EXPORT_NAME_ZEROES]);
        }
        Ok(Outcome::Done(negotiated))
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: name, information requests; `GO` ends on success.
    fn info(&self, code: OptionCode, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let option = code.code();
        let (name, requests) = match parse_info(data) {
            Ok(parsed) => parsed,
            Err(message) => {
                error(out, option, OptionReply::ErrInvalid, message);
                return Outcome::Continue;
            }
        };
        let Some(index) = self.config.find_export(name) else {
            let message = format!("export '{}' not present", echo(name));
            error(out, option, OptionReply::ErrUnknown, &message);
            return Outcome::Continue;
        };
        let export = &self.config.exports()[index];
        if requests.name {
            info(out, option, InfoType::Name, export.name.as_bytes());
        }
        if let (true, Some(description)) = (requests.description, &export.description) {
            info(out, option, InfoType::Description, description.as_bytes());
        }
        let b = export.block_sizes;
        let mut sizes = Vec::with_capacity(12);
        for v in [b.minimum, b.preferred, b.maximum] {
            put_u32(&mut sizes, v);
        }
        info(out, option, InfoType::BlockSize, &sizes);
        let negotiated = self.negotiated(index, requests.block_size, Ending::Go);
        let mut payload = Vec::with_capacity(10);
        put_u64(&mut payload, export.size);
        put_u16(&mut payload, negotiated.transmission_flags.bits());
        info(out, option, InfoType::Export, &payload);
        reply(out, option, OptionReply::Ack, &[]);
        match code {
            OptionCode::Go => Outcome::Done(negotiated),
            _ => Outcome::Continue,
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, code: OptionCode, data: &[u8], out: &mut Vec<u8>) {
        let option = code.code();
        let set = code == OptionCode::SetMetaContext;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts (including
            // when this command fails)."
            self.meta = None;
            if !(self.structured || self.extended) {
                let message = "structured replies must be negotiated first";
                error(out, option, OptionReply::ErrInvalid, message);
                return;
            }
        }
        let query = match parse_meta_query(data, set, &self.config) {
            Ok(query) => query,
            Err(MetaError::Invalid(message)) => {
                error(out, option, OptionReply::ErrInvalid, message);
                return;
            }
            Err(MetaError::Unknown(name)) => {
                let message = format!("export '{name}' not present");
                error(out, option, OptionReply::ErrUnknown, &message);
                return;
            }
        };
        let export = &self.config.exports()[query.export];
        for &i in &query.contexts {
            let id = if set { len_u32(i) } else { 0 };
            let name = export.meta_contexts[i].as_bytes();
            reply(
                out,
                option,
                OptionReply::MetaContext,
                &[&id.to_be_bytes()[..], name],
            );
        }
        reply(out, option, OptionReply::Ack, &[]);
        if set {
            self.meta = Some(MetaSelection {
                export: query.export,
                contexts: query.contexts,
            });
        }
    }

    /// The result of entering transmission with export `index` now.
    fn negotiated(&self, index: usize, acknowledged: bool, ended_with: Ending) -> Negotiated {
        let export = &self.config.exports()[index];
        let meta_contexts: Vec<MetaContext> = match &self.meta {
            Some(selection) if selection.export == index => selection
                .contexts
                .iter()
                .map(|&i| MetaContext {
                    id: len_u32(i),
                    index: i,
                    name: export.meta_contexts[i].clone(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Negotiated {
            export: index,
            structured_replies: self.structured || self.extended,
            extended_headers: self.extended,
            no_zeroes: self.no_zeroes,
            transmission_flags: self.transmission_flags(export, meta_contexts.len()),
            block_sizes_acknowledged: acknowledged,
            meta_contexts,
            ended_with,
            leftover: Vec::new(),
        }
    }

    /// The export's flags as this connection may see them.
    fn transmission_flags(&self, export: &ExportConfig, contexts: usize) -> TransmissionFlags {
        let mut flags = export.flags | TransmissionFlags::HAS_FLAGS;
        if !(self.structured || self.extended) {
            // "MUST leave this flag clear if structured replies have not been negotiated."
            flags.remove(TransmissionFlags::SEND_DF);
        }
        if !self.extended || contexts == 0 {
            // "Servers MUST NOT advertise this bit unless the client successfully negotiates
            // extended headers", "SHOULD NOT ... if the client does not negotiate metacontexts".
            flags.remove(TransmissionFlags::BLOCK_STAT_PAYLOAD);
        }
        flags
    }
}

/// The information items a client asked for.
#[derive(Debug, Default, Clone, Copy)]
struct InfoRequests {
    name: bool,
    description: bool,
    block_size: bool,
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: name length, name, count, info types.
fn parse_info(data: &[u8]) -> Result<(&[u8], InfoRequests), &'static str> {
    let mut c = Cursor::new(data);
    let name = read_name(&mut c)?;
    let count = c.u16().ok_or("inconsistent lengths")?;
    if c.remaining() != usize::from(count) * 2 {
        return Err("inconsistent lengths");
    }
    let mut requests = InfoRequests::default();
    while let Some(item) = c.u16() {
        match InfoType::from_u16(item) {
            Some(InfoType::Name) => requests.name = true,
            Some(InfoType::Description) => requests.description = true,
            Some(InfoType::BlockSize) => requests.block_size = true,
            // EXPORT is always sent; unknown types are ignored as the specification asks.
            Some(InfoType::Export) | None => {}
        }
    }
    Ok((name, requests))
}

/// Reads a 32-bit length and that many bytes of a name: at most 4096 bytes, no NUL.
fn read_name<'a>(c: &mut Cursor<'a>) -> Result<&'a [u8], &'static str> {
    let len = c.u32().ok_or("inconsistent lengths")?;
    let len = usize::try_from(len).map_err(|_| "inconsistent lengths")?;
    let name = c.bytes(len).ok_or("inconsistent lengths")?;
    if len > MAX_STRING_LEN {
        return Err("name too long");
    }
    if name.contains(&0) {
        return Err("name contains NUL");
    }
    Ok(name)
}

/// A parsed meta context option: the export and the contexts its queries matched.
struct MetaQuery {
    export: usize,
    contexts: Vec<usize>,
}

/// Why a meta context option failed.
enum MetaError {
    /// `ERR_INVALID` with this message.
    Invalid(&'static str),
    /// `ERR_UNKNOWN` for this (echoable) export name.
    Unknown(String),
}

/// Parses meta context option data: export name, query count, queries; and matches them.
fn parse_meta_query(data: &[u8], set: bool, config: &ServerConfig) -> Result<MetaQuery, MetaError> {
    let mut c = Cursor::new(data);
    let name = read_name(&mut c).map_err(MetaError::Invalid)?;
    let export = config
        .find_export(name)
        .ok_or_else(|| MetaError::Unknown(echo(name)))?;
    let offered = &config.exports()[export].meta_contexts;
    let count = c.u32().ok_or(MetaError::Invalid("inconsistent lengths"))?;
    // Each query takes at least its 4-byte length: a larger count cannot fit the data.
    if usize::try_from(count).map_or(true, |n| n > c.remaining() / 4) {
        return Err(MetaError::Invalid("inconsistent lengths"));
    }
    let mut selected = vec![count == 0 && !set; offered.len()];
    for _ in 0..count {
        let len = c.u32().ok_or(MetaError::Invalid("inconsistent lengths"))?;
        let len = usize::try_from(len).map_err(|_| MetaError::Invalid("inconsistent lengths"))?;
        let query = c
            .bytes(len)
            .ok_or(MetaError::Invalid("inconsistent lengths"))?;
        if query.contains(&0) {
            return Err(MetaError::Invalid("query contains NUL"));
        }
        // Longer than any context name: it matches nothing (QEMU skips these too).
        if len > MAX_STRING_LEN {
            continue;
        }
        for (flag, context) in selected.iter_mut().zip(offered) {
            *flag |= query_matches(context, query, !set);
        }
    }
    if c.remaining() != 0 {
        return Err(MetaError::Invalid("inconsistent lengths"));
    }
    let contexts = selected
        .iter()
        .enumerate()
        .filter(|(_, &s)| s)
        .map(|(i, _)| i)
        .collect();
    Ok(MetaQuery { export, contexts })
}

/// Whether `query` names `context`: exactly, or (when listing) as a prefix ending in `:`, so
/// that `base:` lists `base:allocation`, `qemu:` every `qemu:` context and
/// `qemu:dirty-bitmap:` every bitmap. Such wildcards select nothing in `SET`, as the
/// specification asks of `base:`. Unknown namespaces simply match nothing.
pub(super) fn query_matches(context: &str, query: &[u8], listing: bool) -> bool {
    if query.ends_with(b":") {
        listing && context.as_bytes().starts_with(query)
    } else {
        context.as_bytes() == query
    }
}

/// A client-supplied name made safe to echo: lossy UTF-8, control characters replaced, at most
/// 80 characters (then `...`).
pub(super) fn echo(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let mut out: String = text
        .chars()
        .take(ECHO_LEN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(ECHO_LEN).is_some() {
        out.push_str("...");
    }
    out
}

/// A length known to be small (names, context indexes) as `u32`.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends one option reply: header, then `parts` as its data.
fn reply(out: &mut Vec<u8>, option: u32, kind: OptionReply, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, kind.code());
    put_u32(out, len_u32(len));
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// Appends an error reply whose data is a message for humans.
fn error(out: &mut Vec<u8>, option: u32, kind: OptionReply, message: &str) {
    debug_assert!(kind.is_error() && message.len() <= MAX_STRING_LEN);
    reply(out, option, kind, &[message.as_bytes()]);
}

/// Appends one `NBD_REP_INFO`: the info type, then its payload.
fn info(out: &mut Vec<u8>, option: u32, kind: InfoType, payload: &[u8]) {
    reply(
        out,
        option,
        OptionReply::Info,
        &[&kind.code().to_be_bytes()[..], payload],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_list_but_do_not_select() {
        assert!(query_matches("base:allocation", b"base:", true));
        assert!(!query_matches("base:allocation", b"base:", false));
        assert!(query_matches("base:allocation", b"base:allocation", false));
        assert!(query_matches("qemu:dirty-bitmap:b", b"qemu:", true));
        assert!(query_matches(
            "qemu:dirty-bitmap:b",
            b"qemu:dirty-bitmap:",
            true
        ));
        assert!(!query_matches(
            "qemu:allocation-depth",
            b"qemu:dirty-bitmap:",
            true
        ));
        assert!(!query_matches("base:allocation", b"base:alloc", true));
        assert!(!query_matches("base:allocation", b"", true));
        assert!(!query_matches("base:allocation", b"x-other:", true));
    }

    #[test]
    fn echoed_names_are_short_and_printable() {
        assert_eq!(echo(b"disk"), "disk");
        assert_eq!(echo(b"a\nb\xff"), "a?b\u{fffd}");
        let long = echo(&[b'x'; 200]);
        assert_eq!(long.len(), 83);
        assert!(long.ends_with("..."));
        assert_eq!(echo(&[b'y'; 80]).len(), 80);
    }

    #[test]
    fn info_data_must_add_up() {
        let mut data = vec![0, 0, 0, 1, b'a', 0, 1, 0, 3];
        assert!(parse_info(&data).is_ok());
        data.push(0);
        assert_eq!(parse_info(&data).err(), Some("inconsistent lengths"));
        assert!(parse_info(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        assert!(parse_info(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(
            parse_info(&[0, 0, 0, 1, 0, 0, 0]).err(),
            Some("name contains NUL")
        );
    }
}
