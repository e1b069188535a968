//! What a new image should be (options as a user gives them), the limits on them, and why a
//! creation fails, in QEMU's words.

use std::io;

pub use crate::format::new_image::CompressionType;
use crate::format::FormatError;
use crate::lock::LockError;

/// Largest virtual size a command line accepts (sizes are signed 64-bit in QEMU).
pub const MAX_SIZE_ARGUMENT: u64 = i64::MAX as u64;
pub use crate::format::limits::MAX_IMAGE_LENGTH;
/// Virtual sizes are rounded up to whole 512-byte sectors, silently, as QEMU does.
pub const SECTOR_SIZE: u64 = 512;
/// Extended L2 entries need 512-byte subclusters at least: 32 of them per cluster.
pub const MIN_EXTENDED_L2_CLUSTER_SIZE: u64 = 512 * 32;

/// How much of the image is allocated at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preallocation {
    /// Only the header, refcount structures and the L1 table.
    #[default]
    Off,
    /// Every L2 table and every data cluster is allocated; the file stays sparse.
    Metadata,
    /// As `Metadata`, and the file's space is reserved with `posix_fallocate`.
    Falloc,
    /// As `Metadata`, and the data area is written with zeros.
    Full,
}

/// What the new image should be. Sizes are bytes, as a user gives them; [`plan`] validates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual disk size in bytes (rounded up to a multiple of 512).
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Format version: 2 (QEMU's compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits: a power of two up to 64 (only 16 for version 2).
    pub refcount_bits: u64,
    /// 16-byte L2 entries with 32 subclusters per cluster (version 3).
    pub extended_l2: bool,
    /// Compatible feature "lazy refcounts" (version 3).
    pub lazy_refcounts: bool,
    /// Compression type of compressed clusters.
    pub compression: CompressionType,
    /// Backing file name, stored as given (QEMU looks for a relative one in the image's folder).
    pub backing_file: Option<String>,
    /// Backing file format name, e.g. `qcow2` or `raw`.
    pub backing_format: Option<String>,
    /// External data file name, stored as given (QEMU looks for a relative one in its working
    /// directory).
    pub data_file: Option<String>,
    /// The external data file is a valid raw image by itself.
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// LUKS encryption: the header area to store (made by [`crate::crypto::Luks::create`]
    /// with the secret); the image gets `crypt_method` 2 and the extension pointing at it.
    pub encryption: Option<CryptoArea>,
}

/// The bytes of a new image's LUKS header area (the LUKS header and its key slots, which hold
/// the volume key enciphered with the secret). `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct CryptoArea(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for CryptoArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CryptoArea({} bytes)", self.0.len())
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            encryption: None,
        }
    }
}

/// Why an image could not be created. Every variant but [`CreateError::Io`] is about the
/// options (nothing was written); their messages are QEMU's.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The size does not fit a signed 64-bit integer.
    #[error("Invalid image size specified. Must be between 0 and 9223372036854775807.")]
    SizeOutOfRange,
    /// The version is neither 2 nor 3.
    #[error("Parameter 'version' does not accept value 'v{0}'")]
    InvalidVersion(u32),
    /// Extended L2 entries with version 2.
    #[error(
        "Extended L2 entries are only supported with compatibility level 1.1 and above \
         (use version=v3 or greater)"
    )]
    ExtendedL2NeedsV3,
    /// The cluster size is not a power of two in range.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize,
    /// Extended L2 entries with clusters below 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    /// Preallocation with a backing file needs extended L2 entries (subclusters stay
    /// unallocated, so reads still go to the backing file).
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    BackingWithPreallocation,
    /// A backing format without a backing file.
    #[error("Backing format cannot be used without backing file")]
    BackingFormatWithoutFile,
    /// Lazy refcounts with version 2.
    #[error(
        "Lazy refcounts only supported with compatibility level 1.1 and above \
         (use version=v3 or greater)"
    )]
    LazyRefcountsNeedV3,
    /// The refcount width is not a power of two up to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    /// A refcount width other than 16 with version 2.
    #[error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above \
         (use version=v3 or greater)"
    )]
    RefcountWidthNeedsV3,
    /// `data_file_raw` without a data file.
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutDataFile,
    /// `data_file_raw` with a backing file.
    #[error("Backing file and data-file-raw cannot be used at the same time")]
    BackingWithDataFileRaw,
    /// An external data file with version 2.
    #[error(
        "External data files are only supported with compatibility level 1.1 and above \
         (use version=v3 or greater)"
    )]
    DataFileNeedsV3,
    /// A compression type other than zlib with version 2.
    #[error(
        "Non-zlib compression type is only supported with compatibility level 1.1 and above \
         (use version=v3 or greater)"
    )]
    CompressionNeedsV3,
    /// The size is beyond what QEMU's block layer handles.
    #[error("Could not resize image: offset({size}) exceeds maximum({max})")]
    SizeExceedsMaximum {
        /// The requested size (rounded up to 512).
        size: u64,
        /// [`MAX_IMAGE_LENGTH`].
        max: u64,
    },
    /// The L1 table, refcount table or file would exceed QEMU's limits.
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    TooLarge,
    /// The header, its extensions and the backing file name do not fit in cluster 0, or a name
    /// is longer than the format allows.
    #[error("Could not update qcow2 header: {0}")]
    Header(#[from] FormatError),
    /// The header with its extensions does not fit in the first cluster.
    #[error("Could not update qcow2 header: No space left on device")]
    HeaderTooLarge,
    /// The backing file name is too long, or does not fit in the first cluster.
    #[error("Could not assign backing file '{name}' with format '{format}': {reason}")]
    BackingFile {
        /// The backing file name.
        name: String,
        /// The backing format (`(null)` when none was given, as QEMU prints it).
        format: String,
        /// QEMU's `strerror` text.
        reason: &'static str,
    },
    /// The file is held by another process (QEMU's image locks); nothing was changed.
    #[error("{0}")]
    Lock(#[from] LockError),
    /// Creating or writing a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl CreateError {
    /// Whether the options were at fault (nothing was created); the bindings make this a
    /// `ValueError`.
    pub fn is_invalid_options(&self) -> bool {
        !matches!(self, CreateError::Io { .. } | CreateError::Lock(_))
    }

    pub(super) fn io(what: &'static str, path: &str) -> impl FnOnce(io::Error) -> CreateError {
        let path = path.to_string();
        move |source| CreateError::Io { what, path, source }
    }
}
