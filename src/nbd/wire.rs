//! The protocol's numbers: magics, flag sets, option, reply, command and chunk codes, error
//! values, and the big-endian helpers every encoder and parser here uses.
//!
//! Names follow the NBD specification (`doc/proto.md`) without their `NBD_` prefix. Codes the
//! peer sends (options, commands) are open sets, so they are parsed with `from_u32`/`from_u16`
//! returning `None` for a code this server does not know, never an error.

use bitflags::bitflags;

/// `NBDMAGIC`, the first 8 bytes the server sends (also called `INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic opening every option reply of the fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: a compact (28-byte) request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`: an extended (32-byte) request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC`: a simple (16-byte) reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: a structured reply chunk with a compact (20-byte) header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`: a reply chunk with an extended (32-byte) header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Length of the server's greeting: `NBDMAGIC`, `IHAVEOPT`, 16 bits of handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option header: `IHAVEOPT`, option code, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// The zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Length of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply (before any read data).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a compact structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// The longest string the protocol allows (export names, context names, messages).
pub const MAX_STRING_LEN: usize = 4096;

/// The one context the specification defines: allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's context for the depth in the backing chain that provides each extent.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The prefix of QEMU's dirty bitmap contexts, `qemu:dirty-bitmap:NAME`.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `base:allocation` status bit: the extent is a hole (not allocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status bit: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:` status bit: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

bitflags! {
    /// Handshake flags: the 16 bits the server sends after `IHAVEOPT`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HandshakeFlags: u16 {
        /// The server speaks fixed newstyle negotiation.
        const FIXED_NEWSTYLE = 1 << 0;
        /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Client flags: the 32 bits the client answers the greeting with.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ClientFlags: u32 {
        /// The client speaks fixed newstyle negotiation.
        const FIXED_NEWSTYLE = 1 << 0;
        /// The client wants no zero padding after the `NBD_OPT_EXPORT_NAME` reply.
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Transmission flags: what an export supports, sent with its size.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        /// Always set.
        const HAS_FLAGS = 1 << 0;
        /// The export is read-only.
        const READ_ONLY = 1 << 1;
        /// `NBD_CMD_FLUSH` is supported.
        const SEND_FLUSH = 1 << 2;
        /// The `FUA` command flag is supported.
        const SEND_FUA = 1 << 3;
        /// The export behaves like a rotational medium.
        const ROTATIONAL = 1 << 4;
        /// `NBD_CMD_TRIM` is supported.
        const SEND_TRIM = 1 << 5;
        /// `NBD_CMD_WRITE_ZEROES` (and its `NO_HOLE` flag) is supported.
        const SEND_WRITE_ZEROES = 1 << 6;
        /// The `DF` (don't fragment) read flag is supported; needs structured replies.
        const SEND_DF = 1 << 7;
        /// Several connections to the export see one another's flushed writes.
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_CMD_RESIZE` is supported (experimental `RESIZE` extension).
        const SEND_RESIZE = 1 << 9;
        /// `NBD_CMD_CACHE` is supported.
        const SEND_CACHE = 1 << 10;
        /// The `FAST_ZERO` write-zeroes flag is supported.
        const SEND_FAST_ZERO = 1 << 11;
        /// `NBD_CMD_BLOCK_STATUS` accepts a payload naming contexts; needs extended headers.
        const BLOCK_STAT_PAYLOAD = 1 << 12;
    }
}

bitflags! {
    /// Command flags: the 16 bits of every request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CommandFlags: u16 {
        /// Force unit access: persist before replying.
        const FUA = 1 << 0;
        /// `WRITE_ZEROES`: do not punch a hole.
        const NO_HOLE = 1 << 1;
        /// `READ`: at most one content chunk.
        const DF = 1 << 2;
        /// `BLOCK_STATUS`: one extent per context.
        const REQ_ONE = 1 << 3;
        /// `WRITE_ZEROES`: fail with `ENOTSUP` unless faster than a write.
        const FAST_ZERO = 1 << 4;
        /// Extended headers: the length field is a payload length.
        const PAYLOAD_LEN = 1 << 5;
    }
}

bitflags! {
    /// Structured reply flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ReplyFlags: u16 {
        /// This is the last chunk of the reply.
        const DONE = 1 << 0;
    }
}

/// Declares a `#[repr]` enum with a lookup from its wire value.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])* $name:ident: $repr:ty, $from:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:expr,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// The value for a wire code, or `None` for a code this module does not define.
            pub fn $from(value: $repr) -> Option<Self> {
                match value {
                    $(v if v == $value => Some(Self::$variant),)+
                    _ => None,
                }
            }

            /// The wire code.
            pub fn code(self) -> $repr {
                self as $repr
            }
        }
    };
}

wire_enum! {
    /// Option codes of the fixed newstyle negotiation (`NBD_OPT_*`).
    OptionCode: u32, from_u32 {
        /// Choose an export and end the negotiation (no error reply possible).
        ExportName = 1,
        /// End the negotiation without choosing an export.
        Abort = 2,
        /// List the exports.
        List = 3,
        /// Upgrade to TLS.
        StartTls = 5,
        /// Describe an export.
        Info = 6,
        /// Describe an export and enter transmission.
        Go = 7,
        /// Use structured replies.
        StructuredReply = 8,
        /// List metadata contexts.
        ListMetaContext = 9,
        /// Select metadata contexts.
        SetMetaContext = 10,
        /// Use extended (64-bit) headers.
        ExtendedHeaders = 11,
    }
}

/// The first option reply type that is an error (bit 31).
const REP_ERR: u32 = 1 << 31;

wire_enum! {
    /// Option reply types (`NBD_REP_*`); the errors have bit 31 set.
    OptionReply: u32, from_u32 {
        /// Success (or the end of a list).
        Ack = 1,
        /// An export, in reply to `LIST`.
        Server = 2,
        /// One item of information about an export.
        Info = 3,
        /// One metadata context.
        MetaContext = 4,
        /// The option is not supported.
        ErrUnsup = REP_ERR + 1,
        /// The option is forbidden by policy.
        ErrPolicy = REP_ERR + 2,
        /// The option is malformed or not valid now.
        ErrInvalid = REP_ERR + 3,
        /// The option is not supported on this platform.
        ErrPlatform = REP_ERR + 4,
        /// TLS is required first.
        ErrTlsReqd = REP_ERR + 5,
        /// The export does not exist.
        ErrUnknown = REP_ERR + 6,
        /// The server is shutting down.
        ErrShutdown = REP_ERR + 7,
        /// The client must request `NBD_INFO_BLOCK_SIZE`.
        ErrBlockSizeReqd = REP_ERR + 8,
        /// The request or its reply is too large.
        ErrTooBig = REP_ERR + 9,
        /// Extended headers are required (or already negotiated).
        ErrExtHeaderReqd = REP_ERR + 10,
    }
}

impl OptionReply {
    /// Whether this reply type is an error.
    pub fn is_error(self) -> bool {
        self.code() & REP_ERR != 0
    }
}

wire_enum! {
    /// Information types of `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_*`).
    InfoType: u16, from_u16 {
        /// Size and transmission flags.
        Export = 0,
        /// The canonical export name.
        Name = 1,
        /// A human-readable description.
        Description = 2,
        /// Minimum, preferred and maximum block sizes.
        BlockSize = 3,
    }
}

wire_enum! {
    /// Request types (`NBD_CMD_*`).
    CommandType: u16, from_u16 {
        /// Read data.
        Read = 0,
        /// Write data (a payload follows the header).
        Write = 1,
        /// Disconnect (no reply).
        Disc = 2,
        /// Flush to stable storage.
        Flush = 3,
        /// Discard a range (a hint).
        Trim = 4,
        /// Prefetch a range (a hint).
        Cache = 5,
        /// Write zeros without a payload.
        WriteZeroes = 6,
        /// Query metadata contexts over a range.
        BlockStatus = 7,
        /// Change the export size (experimental `RESIZE` extension).
        Resize = 8,
    }
}

/// The first chunk type that is an error (bit 15).
const REPLY_TYPE_ERR: u16 = 1 << 15;

wire_enum! {
    /// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
    ChunkType: u16, from_u16 {
        /// No payload; only as the final chunk.
        None = 0,
        /// Offset and data.
        OffsetData = 1,
        /// Offset and the length of a range reading as zeros.
        OffsetHole = 2,
        /// Context id and 32-bit (length, status) descriptors.
        BlockStatus = 5,
        /// Context id, count and 64-bit (length, status) descriptors.
        BlockStatusExt = 6,
        /// Error and message.
        Error = REPLY_TYPE_ERR + 1,
        /// Error, message and the offset where it happened.
        ErrorOffset = REPLY_TYPE_ERR + 2,
    }
}

wire_enum! {
    /// The error values the protocol allows in replies (`NBD_E*`).
    NbdError: u32, from_u32 {
        /// Operation not permitted (also: write to a read-only export).
        Perm = 1,
        /// Input/output error.
        Io = 5,
        /// Cannot allocate memory.
        NoMem = 12,
        /// Invalid argument.
        Inval = 22,
        /// No space left on device.
        NoSpc = 28,
        /// Value too large.
        Overflow = 75,
        /// Operation not supported.
        NotSup = 95,
        /// Server is shutting down.
        Shutdown = 108,
    }
}

impl NbdError {
    /// Maps a host `errno` to the protocol's value, as the specification asks (`EDQUOT` and
    /// `EFBIG` become `ENOSPC`, `EROFS` becomes `EPERM`); anything else is `EINVAL`, which the
    /// specification tells clients to assume for unexpected values anyway.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EROFS => Self::Perm,
            libc::EIO => Self::Io,
            libc::ENOMEM => Self::NoMem,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Self::NoSpc,
            libc::EOVERFLOW => Self::Overflow,
            e if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => Self::NotSup,
            libc::ESHUTDOWN => Self::Shutdown,
            _ => Self::Inval,
        }
    }

    /// Maps an I/O error: by its `errno` when it has one, else by its kind (`EIO` by default).
    pub fn from_io_error(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        if let Some(errno) = error.raw_os_error() {
            return Self::from_errno(errno);
        }
        match error.kind() {
            ErrorKind::PermissionDenied => Self::Perm,
            ErrorKind::OutOfMemory => Self::NoMem,
            ErrorKind::InvalidInput => Self::Inval,
            ErrorKind::Unsupported => Self::NotSup,
            _ => Self::Io,
        }
    }

    /// The specification's name, such as `"EINVAL"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::Io => "EIO",
            Self::NoMem => "ENOMEM",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Overflow => "EOVERFLOW",
            Self::NotSup => "ENOTSUP",
            Self::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Appends a big-endian `u16`.
pub fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// Appends a big-endian `u32`.
pub fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// Appends a big-endian `u64`.
pub fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// Reads `N` bytes at `offset`, or `None` if they are not all inside `buf`.
fn array_at<const N: usize>(buf: &[u8], offset: usize) -> Option<[u8; N]> {
    let end = offset.checked_add(N)?;
    let mut out = [0u8; N];
    out.copy_from_slice(buf.get(offset..end)?);
    Some(out)
}

/// Reads a big-endian `u16` at `offset`, or `None` past the end of `buf`.
pub fn u16_at(buf: &[u8], offset: usize) -> Option<u16> {
    array_at(buf, offset).map(u16::from_be_bytes)
}

/// Reads a big-endian `u32` at `offset`, or `None` past the end of `buf`.
pub fn u32_at(buf: &[u8], offset: usize) -> Option<u32> {
    array_at(buf, offset).map(u32::from_be_bytes)
}

/// Reads a big-endian `u64` at `offset`, or `None` past the end of `buf`.
pub fn u64_at(buf: &[u8], offset: usize) -> Option<u64> {
    array_at(buf, offset).map(u64::from_be_bytes)
}

/// A forward reader over a payload whose every read is bounds-checked.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes, or `None` (and nothing consumed) if fewer remain.
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    /// The next big-endian `u16`.
    pub(crate) fn u16(&mut self) -> Option<u16> {
        let v = u16_at(self.buf, self.pos)?;
        self.pos += 2;
        Some(v)
    }

    /// The next big-endian `u32`.
    pub(crate) fn u32(&mut self) -> Option<u32> {
        let v = u32_at(self.buf, self.pos)?;
        self.pos += 4;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_what_the_spec_says() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }

    #[test]
    fn codes_match_the_spec() {
        assert_eq!(OptionCode::ExtendedHeaders.code(), 11);
        assert_eq!(OptionCode::from_u32(4), None, "PEEK_EXPORT is withdrawn");
        assert_eq!(OptionCode::from_u32(7), Some(OptionCode::Go));
        assert_eq!(OptionReply::ErrUnsup.code(), 0x8000_0001);
        assert_eq!(OptionReply::ErrExtHeaderReqd.code(), 0x8000_000a);
        assert!(OptionReply::ErrTooBig.is_error());
        assert!(!OptionReply::MetaContext.is_error());
        assert_eq!(ChunkType::Error.code(), 0x8001);
        assert_eq!(ChunkType::ErrorOffset.code(), 0x8002);
        assert_eq!(ChunkType::from_u16(6), Some(ChunkType::BlockStatusExt));
        assert_eq!(CommandType::from_u16(8), Some(CommandType::Resize));
        assert_eq!(CommandType::from_u16(9), None);
        assert_eq!(InfoType::BlockSize.code(), 3);
        assert_eq!(TransmissionFlags::BLOCK_STAT_PAYLOAD.bits(), 0x1000);
        assert_eq!(CommandFlags::PAYLOAD_LEN.bits(), 0x20);
        let errors = [1, 5, 12, 22, 28, 75, 95, 108];
        for e in errors {
            assert_eq!(NbdError::from_u32(e).map(NbdError::code), Some(e));
        }
        assert_eq!(NbdError::from_u32(0), None);
    }

    #[test]
    fn host_errors_map_as_the_spec_asks() {
        assert_eq!(NbdError::from_errno(libc::EROFS), NbdError::Perm);
        assert_eq!(NbdError::from_errno(libc::EDQUOT), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(libc::EFBIG), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(libc::EOPNOTSUPP), NbdError::NotSup);
        assert_eq!(NbdError::from_errno(libc::ESHUTDOWN), NbdError::Shutdown);
        assert_eq!(NbdError::from_errno(libc::ENOENT), NbdError::Inval);
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(NbdError::from_io_error(&io), NbdError::NoSpc);
        let other = std::io::Error::other("boom");
        assert_eq!(NbdError::from_io_error(&other), NbdError::Io);
        assert_eq!(NbdError::Overflow.to_string(), "EOVERFLOW");
    }

    #[test]
    fn cursor_never_reads_past_the_end() {
        let mut c = Cursor::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.u32(), Some(2));
        assert_eq!(c.u16(), None);
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.bytes(usize::MAX), None);
        assert_eq!(c.bytes(1), Some(&[9u8][..]));
        assert_eq!(c.u32(), None);
        assert_eq!(u64_at(&[0; 7], 0), None);
        assert_eq!(u32_at(&[0, 0, 0, 7], 0), Some(7));
    }
}
