//! What the server offers: its exports ([`ExportConfig`]), each with a size, transmission
//! flags, block size constraints and metadata contexts, validated once into a
//! [`ServerConfig`] that every connection's [`Handshake`](super::Handshake) shares.

use thiserror::Error;

use super::wire::{TransmissionFlags, MAX_STRING_LEN};

/// The largest maximum payload this layer accepts: 32 MiB, the size the specification says no
/// peer should treat as a denial of service, and the limit QEMU's server uses.
pub const MAX_PAYLOAD_CAP: u32 = 32 * 1024 * 1024;
/// The most exports a server may offer (bounds the `NBD_OPT_LIST` reply).
pub const MAX_EXPORTS: usize = 1024;
/// The most metadata contexts one export may offer (bounds the meta context replies).
pub const MAX_META_CONTEXTS: usize = 1024;

/// Block size constraints, as sent in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit and alignment: a power of two, at most 64 KiB.
    pub minimum: u32,
    /// Size and alignment for efficient I/O: a power of two, at least `max(minimum, 512)`.
    pub preferred: u32,
    /// Largest payload of one request: at least `preferred`, at most [`MAX_PAYLOAD_CAP`].
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// The specification's defaults: 1, 4096, 32 MiB.
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD_CAP,
        }
    }
}

/// One export, as the server fills it from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The name clients ask for (may be empty); at most 4096 bytes, no NUL.
    pub name: String,
    /// A human-readable description (`NBD_INFO_DESCRIPTION`, and in `NBD_OPT_LIST`).
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags. `HAS_FLAGS` is always added; `SEND_DF` is only sent once structured
    /// replies are negotiated and `BLOCK_STAT_PAYLOAD` once extended headers and at least one
    /// metadata context are, as the specification requires.
    pub flags: TransmissionFlags,
    /// Block size constraints (always sent in reply to `NBD_OPT_INFO`/`NBD_OPT_GO`).
    pub block_sizes: BlockSizes,
    /// Full names of the metadata contexts offered, such as `base:allocation`,
    /// `qemu:allocation-depth` or `qemu:dirty-bitmap:NAME`. A selected context's id is its
    /// position in this list.
    pub meta_contexts: Vec<String>,
}

impl ExportConfig {
    /// A writable export of `size` bytes with default block sizes, no optional features and no
    /// metadata contexts.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        Self {
            name: name.into(),
            description: None,
            size,
            flags: TransmissionFlags::HAS_FLAGS,
            block_sizes: BlockSizes::default(),
            meta_contexts: Vec::new(),
        }
    }

    /// Checks everything a client could be told about this export.
    fn validate(&self) -> Result<(), ConfigError> {
        check_string("export name", &self.name)?;
        if let Some(description) = &self.description {
            check_string("export description", description)?;
        }
        let b = self.block_sizes;
        let min_ok = b.minimum.is_power_of_two() && b.minimum <= 65536;
        let preferred_ok = b.preferred.is_power_of_two() && b.preferred >= b.minimum.max(512);
        let maximum_ok = b.maximum >= b.preferred && b.maximum <= MAX_PAYLOAD_CAP;
        if !(min_ok && preferred_ok && maximum_ok) {
            return Err(ConfigError::BlockSizes(b));
        }
        if self.flags.contains(TransmissionFlags::SEND_FAST_ZERO)
            && !self.flags.contains(TransmissionFlags::SEND_WRITE_ZEROES)
        {
            return Err(ConfigError::FastZeroWithoutWriteZeroes);
        }
        if self.meta_contexts.len() > MAX_META_CONTEXTS {
            return Err(ConfigError::TooManyMetaContexts(self.meta_contexts.len()));
        }
        for (i, context) in self.meta_contexts.iter().enumerate() {
            check_string("metadata context name", context)?;
            let colon = context.find(':').unwrap_or(0);
            let namespace_ok = colon > 0
                && !context[..colon]
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control());
            // A name ending in ':' would read as a wildcard query and could never be selected.
            if !namespace_ok || context.ends_with(':') {
                return Err(ConfigError::MetaContextName(context.clone()));
            }
            if self.meta_contexts[..i].contains(context) {
                return Err(ConfigError::DuplicateMetaContext(context.clone()));
            }
        }
        Ok(())
    }
}

/// A validated list of exports and negotiation policy, shared by all connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    exports: Vec<ExportConfig>,
    default_export: Option<usize>,
    structured_replies: bool,
    extended_headers: bool,
}

impl ServerConfig {
    /// Validates `exports` (at least one, at most [`MAX_EXPORTS`], distinct names, strings
    /// within the protocol's limits, block sizes as the specification constrains them).
    /// `default_export` is the export a client gets when it asks for the empty name and no
    /// export is named `""`.
    pub fn new(
        exports: Vec<ExportConfig>,
        default_export: Option<usize>,
    ) -> Result<Self, ConfigError> {
        if exports.is_empty() {
            return Err(ConfigError::NoExports);
        }
        if exports.len() > MAX_EXPORTS {
            return Err(ConfigError::TooManyExports(exports.len()));
        }
        for (i, export) in exports.iter().enumerate() {
            export.validate()?;
            if exports[..i].iter().any(|e| e.name == export.name) {
                return Err(ConfigError::DuplicateExport(export.name.clone()));
            }
        }
        if let Some(index) = default_export {
            if index >= exports.len() {
                return Err(ConfigError::DefaultExport(index));
            }
        }
        Ok(Self {
            exports,
            default_export,
            structured_replies: true,
            extended_headers: true,
        })
    }

    /// Whether to accept `NBD_OPT_STRUCTURED_REPLY` (default: yes; else `ERR_UNSUP`).
    pub fn set_structured_replies(&mut self, allowed: bool) {
        self.structured_replies = allowed;
    }

    /// Whether to accept `NBD_OPT_EXTENDED_HEADERS` (default: yes; else `ERR_UNSUP`).
    pub fn set_extended_headers(&mut self, allowed: bool) {
        self.extended_headers = allowed;
    }

    /// Whether `NBD_OPT_STRUCTURED_REPLY` is accepted.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }

    /// Whether `NBD_OPT_EXTENDED_HEADERS` is accepted.
    pub fn extended_headers(&self) -> bool {
        self.extended_headers
    }

    /// The exports, in the order `NBD_OPT_LIST` reports them.
    pub fn exports(&self) -> &[ExportConfig] {
        &self.exports
    }

    /// The export at `index`.
    pub fn export(&self, index: usize) -> Option<&ExportConfig> {
        self.exports.get(index)
    }

    /// The export a client's name selects: an exact (byte-wise) match, else the default export
    /// for the empty name.
    pub fn find_export(&self, name: &[u8]) -> Option<usize> {
        let exact = self.exports.iter().position(|e| e.name.as_bytes() == name);
        match exact {
            Some(i) => Some(i),
            None if name.is_empty() => self.default_export,
            None => None,
        }
    }
}

/// Rejects a string the protocol could not carry.
fn check_string(what: &'static str, s: &str) -> Result<(), ConfigError> {
    if s.len() > MAX_STRING_LEN {
        return Err(ConfigError::StringTooLong {
            what,
            length: s.len(),
        });
    }
    if s.contains('\0') {
        return Err(ConfigError::StringHasNul { what });
    }
    Ok(())
}

/// Why a [`ServerConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// No export at all.
    #[error("an NBD server needs at least one export")]
    NoExports,
    /// More exports than [`MAX_EXPORTS`].
    #[error("{0} exports: at most {MAX_EXPORTS} are supported")]
    TooManyExports(usize),
    /// Two exports with one name.
    #[error("two exports are named '{0}'")]
    DuplicateExport(String),
    /// The default export index is out of range.
    #[error("default export {0} does not exist")]
    DefaultExport(usize),
    /// A string longer than the protocol's 4096 bytes.
    #[error("{what} is {length} bytes long: NBD strings are at most 4096 bytes")]
    StringTooLong {
        /// Which string.
        what: &'static str,
        /// Its length in bytes.
        length: usize,
    },
    /// A string containing NUL.
    #[error("{what} contains a NUL character")]
    StringHasNul {
        /// Which string.
        what: &'static str,
    },
    /// Block sizes the specification does not allow.
    #[error(
        "invalid block sizes {}/{}/{}: the minimum must be a power of two up to 64 KiB, the \
         preferred a power of two of at least the minimum and 512, the maximum between the \
         preferred and 32 MiB",
        .0.minimum, .0.preferred, .0.maximum
    )]
    BlockSizes(BlockSizes),
    /// `SEND_FAST_ZERO` without `SEND_WRITE_ZEROES` (the specification forbids it).
    #[error("SEND_FAST_ZERO needs SEND_WRITE_ZEROES")]
    FastZeroWithoutWriteZeroes,
    /// More contexts than [`MAX_META_CONTEXTS`].
    #[error("{0} metadata contexts: at most {MAX_META_CONTEXTS} are supported")]
    TooManyMetaContexts(usize),
    /// A context name that is not `namespace:leaf`.
    #[error("metadata context '{0}' is not of the form namespace:leaf")]
    MetaContextName(String),
    /// One context offered twice.
    #[error("metadata context '{0}' is offered twice")]
    DuplicateMetaContext(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(export: ExportConfig) -> Result<ServerConfig, ConfigError> {
        ServerConfig::new(vec![export], None)
    }

    #[test]
    fn a_plain_export_is_valid() {
        let mut e = ExportConfig::new("disk", 1 << 20);
        e.meta_contexts = vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()];
        let config = one(e).unwrap();
        assert_eq!(config.find_export(b"disk"), Some(0));
        assert_eq!(config.find_export(b""), None);
        assert_eq!(config.find_export(b"disk2"), None);
        assert!(config.structured_replies() && config.extended_headers());
    }

    #[test]
    fn the_default_export_answers_the_empty_name() {
        let exports = vec![ExportConfig::new("a", 1), ExportConfig::new("b", 2)];
        let config = ServerConfig::new(exports.clone(), Some(1)).unwrap();
        assert_eq!(config.find_export(b""), Some(1));
        let named = vec![ExportConfig::new("", 1), ExportConfig::new("b", 2)];
        assert_eq!(
            ServerConfig::new(named, Some(1)).unwrap().find_export(b""),
            Some(0)
        );
        assert_eq!(
            ServerConfig::new(exports, Some(2)),
            Err(ConfigError::DefaultExport(2))
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert_eq!(ServerConfig::new(vec![], None), Err(ConfigError::NoExports));
        let twice = vec![ExportConfig::new("a", 1), ExportConfig::new("a", 2)];
        assert!(matches!(
            ServerConfig::new(twice, None),
            Err(ConfigError::DuplicateExport(_))
        ));
        let long = ExportConfig::new("x".repeat(4097), 1);
        assert!(matches!(one(long), Err(ConfigError::StringTooLong { .. })));
        assert!(one(ExportConfig::new("x".repeat(4096), 1)).is_ok());
        assert!(matches!(
            one(ExportConfig::new("a\0b", 1)),
            Err(ConfigError::StringHasNul { .. })
        ));
        let mut desc = ExportConfig::new("a", 1);
        desc.description = Some("d".repeat(5000));
        assert!(one(desc).is_err());
        let mut fast = ExportConfig::new("a", 1);
        fast.flags |= TransmissionFlags::SEND_FAST_ZERO;
        assert_eq!(one(fast), Err(ConfigError::FastZeroWithoutWriteZeroes));
    }

    #[test]
    fn block_sizes_follow_the_spec() {
        let sizes = |minimum, preferred, maximum| {
            let mut e = ExportConfig::new("a", 1);
            e.block_sizes = BlockSizes {
                minimum,
                preferred,
                maximum,
            };
            one(e).is_ok()
        };
        assert!(sizes(1, 4096, 32 << 20));
        assert!(sizes(512, 512, 512));
        assert!(sizes(65536, 65536, 1 << 20));
        assert!(!sizes(3, 4096, 1 << 20), "minimum not a power of two");
        assert!(!sizes(1 << 17, 1 << 17, 1 << 20), "minimum above 64 KiB");
        assert!(!sizes(1, 256, 1 << 20), "preferred below 512");
        assert!(!sizes(4096, 2048, 1 << 20), "preferred below minimum");
        assert!(!sizes(1, 4096, 1024), "maximum below preferred");
        assert!(!sizes(1, 4096, u32::MAX), "maximum above the 32 MiB cap");
    }

    #[test]
    fn context_names_need_a_namespace_and_a_leaf() {
        let contexts = |names: &[&str]| {
            let mut e = ExportConfig::new("a", 1);
            e.meta_contexts = names.iter().map(|s| s.to_string()).collect();
            one(e)
        };
        assert!(contexts(&["base:allocation", "qemu:allocation-depth"]).is_ok());
        for bad in ["allocation", ":x", "base:", "qemu:dirty-bitmap:", "a b:c"] {
            assert!(
                matches!(contexts(&[bad]), Err(ConfigError::MetaContextName(_))),
                "{bad} accepted"
            );
        }
        assert!(matches!(
            contexts(&["base:allocation", "base:allocation"]),
            Err(ConfigError::DuplicateMetaContext(_))
        ));
    }
}
