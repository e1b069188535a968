//! Creating new images: option validation with QEMU's rules and messages, a pure layout planner,
//! and a writer over [`Storage`].
//!
//! Layout of a new image (cluster indices):
//!
//! | what | where |
//! |---|---|
//! | header | cluster 0 |
//! | refcount table | from cluster 1 |
//! | refcount blocks | right after the refcount table |
//! | active L1 table | right after the refcount blocks (none for a zero-sized image) |
//! | `preallocation=metadata` | each L2 table followed by the data clusters it maps |
//! | `falloc` / `full` | every L2 table, then every data cluster in guest order |
//! | external data file | every L2 table; guest cluster *n* is cluster *n* of the data file |
//!
//! Every cluster from 0 to the end of the layout is in use exactly once, so every refcount is 1
//! and the refcount blocks are "ones up to the end". The refcount structures must count
//! themselves: their size is the fixed point of "blocks covering everything, including the
//! blocks and the table" (see [`refcount_fixpoint`]). While one refcount block covers the
//! whole file (just under 2 GiB with 64 KiB clusters and 16-bit refcounts), with or without
//! `preallocation=metadata`, this is byte for byte QEMU's layout. Beyond that QEMU adds refcount
//! blocks where it runs out of them (after a large L1 table, between data clusters), and for
//! `falloc`/`full` it moves its refcount table behind the L1 table and reuses cluster 1 for an
//! L2 table. We keep the refcount structures together at the front in every case;
//! `qemu-img check` finds either layout clean.
//!
//! Write order (nothing points at a structure before it is complete, the header goes last):
//! the file length, refcount blocks, refcount table, L2 tables, L1 table, zeros for `full`,
//! the external data file, then the header, then a flush.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::format::limits::{MAX_BACKING_FILE_NAME, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
pub use crate::format::new_image::CompressionType;
use crate::format::new_image::{
    extended_l2_entry_for, l1_entry_for, l2_entry_for, new_header, refcount_block_with_ones,
    refcounts_per_block, reftable_entry_for, NewHeaderFields, L1_ENTRY_SIZE, REFTABLE_ENTRY_SIZE,
};
use crate::format::offsets::{MAX_CLUSTER_BITS, MAX_HOST_OFFSET, MIN_CLUSTER_BITS};
use crate::format::refcount::MAX_REFCOUNT_ORDER;
use crate::format::{
    write_extended_l2_table, write_u64_table, ClusterCount, ClusterIndex, FormatError, Geometry,
    GuestOffset, Header, HostOffset,
};
use crate::lock::{FileLock, LockError, LockSet, Locking};
use crate::storage::{FileStorage, Storage};

/// Largest virtual size a command line accepts (sizes are signed 64-bit in QEMU).
pub const MAX_SIZE_ARGUMENT: u64 = i64::MAX as u64;
/// Largest length QEMU's block layer allows for an image: 2^63 - 1 rounded down to 1 GiB.
pub const MAX_IMAGE_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
/// Virtual sizes are rounded up to whole 512-byte sectors, silently, as QEMU does.
pub const SECTOR_SIZE: u64 = 512;
/// Extended L2 entries need 512-byte subclusters at least: 32 of them per cluster.
pub const MIN_EXTENDED_L2_CLUSTER_SIZE: u64 = 512 * 32;
/// Bytes written per call when zero-filling (`preallocation=full`) and batching tables.
const WRITE_CHUNK: usize = 4 << 20;

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

    fn io(what: &'static str, path: &str) -> impl FnOnce(io::Error) -> CreateError {
        let path = path.to_string();
        move |source| CreateError::Io { what, path, source }
    }
}

/// Where data clusters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlacement {
    /// Nothing is preallocated: no L2 tables, no data clusters.
    None,
    /// Each L2 table is followed by the data clusters it maps (QEMU's `metadata` layout).
    Interleaved,
    /// All L2 tables, then all data clusters contiguously (for `falloc` / `full`).
    Contiguous,
    /// L2 tables only; data lives in the external data file at its guest offset.
    External,
}

/// The complete layout of a new image: every table's place and the header pointing at them.
///
/// Only [`plan`] makes one, and it guarantees that the whole layout ends below 2^56 bytes, so
/// the cluster index arithmetic of the methods below cannot overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The header, with every table field filled in.
    pub header: Header,
    /// Cluster size and L2 geometry.
    pub geometry: Geometry,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// First cluster of the refcount table.
    pub reftable: ClusterIndex,
    /// Clusters of the refcount table.
    pub reftable_clusters: ClusterCount,
    /// First refcount block (they are contiguous).
    pub refblocks: ClusterIndex,
    /// Number of refcount blocks.
    pub refblock_count: ClusterCount,
    /// First cluster of the L1 table (meaningless when `l1_entries == 0`).
    pub l1: ClusterIndex,
    /// Entries of the L1 table.
    pub l1_entries: u64,
    /// Clusters of the L1 table.
    pub l1_clusters: ClusterCount,
    /// Number of preallocated L2 tables (0 without preallocation).
    pub l2_tables: ClusterCount,
    /// Guest clusters mapped by preallocation (0 without preallocation).
    pub data_clusters: ClusterCount,
    /// Where data clusters go.
    pub placement: DataPlacement,
    /// The preallocation mode (after QEMU's `data_file_raw` upgrade to `Metadata`).
    pub preallocation: Preallocation,
    /// Clusters in use from cluster 0: each has refcount 1, all others 0.
    pub used_clusters: ClusterCount,
    /// Length of the image file.
    pub file_len: u64,
    /// Length of the external data file, if there is one (the virtual size).
    pub data_file_len: Option<u64>,
}

/// Number of `(refcount blocks, refcount table clusters)` needed so that `clusters` other
/// clusters plus the blocks and the table themselves all have a refcount entry: the fixed
/// point of growing both until nothing more is needed. `None` on overflow.
pub fn refcount_fixpoint(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
) -> Option<(u64, u64)> {
    let per_block = refcounts_per_block(cluster_size, refcount_order)?;
    let per_table_cluster = cluster_size / REFTABLE_ENTRY_SIZE;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = clusters.checked_add(blocks)?.checked_add(table)?;
        let new_blocks = total.div_ceil(per_block);
        let new_table = new_blocks.div_ceil(per_table_cluster).max(1);
        if (new_blocks, new_table) == (blocks, table) {
            return Some((blocks, table));
        }
        // Both only grow, and each step adds a small fraction of the total: this converges in a
        // handful of rounds.
        blocks = new_blocks.max(blocks);
        table = new_table.max(table);
    }
}

/// Validates `opts` in QEMU's order with QEMU's messages and lays the image out.
pub fn plan(opts: &CreateOptions) -> Result<Plan, CreateError> {
    if opts.size > MAX_SIZE_ARGUMENT {
        return Err(CreateError::SizeOutOfRange);
    }
    // Cannot overflow: size <= 2^63 - 1.
    let size = opts.size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let version = opts.version;
    if !(2..=3).contains(&version) {
        return Err(CreateError::InvalidVersion(version));
    }
    let v3 = version == 3;
    if opts.extended_l2 && !v3 {
        return Err(CreateError::ExtendedL2NeedsV3);
    }
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    if !cs.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(CreateError::ClusterSize);
    }
    if opts.extended_l2 && cs < MIN_EXTENDED_L2_CLUSTER_SIZE {
        return Err(CreateError::ExtendedL2ClusterSize);
    }
    let has_backing = opts.backing_file.is_some();
    let mut prealloc = opts.preallocation;
    if has_backing && prealloc != Preallocation::Off && !opts.extended_l2 {
        return Err(CreateError::BackingWithPreallocation);
    }
    if opts.backing_format.is_some() && !has_backing {
        return Err(CreateError::BackingFormatWithoutFile);
    }
    if opts.lazy_refcounts && !v3 {
        return Err(CreateError::LazyRefcountsNeedV3);
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(CreateError::RefcountWidth);
    }
    if !v3 && rb != 16 {
        return Err(CreateError::RefcountWidthNeedsV3);
    }
    let refcount_order = rb.trailing_zeros();
    debug_assert!(refcount_order <= MAX_REFCOUNT_ORDER);
    if opts.data_file_raw && opts.data_file.is_none() {
        return Err(CreateError::DataFileRawWithoutDataFile);
    }
    if opts.data_file_raw && has_backing {
        return Err(CreateError::BackingWithDataFileRaw);
    }
    if opts.data_file_raw && prealloc == Preallocation::Off {
        // A raw data file must read the same through the image: map every cluster 1:1.
        prealloc = Preallocation::Metadata;
    }
    if opts.data_file.is_some() && !v3 {
        return Err(CreateError::DataFileNeedsV3);
    }
    if opts.compression != CompressionType::Zlib && !v3 {
        return Err(CreateError::CompressionNeedsV3);
    }
    if size > MAX_IMAGE_LENGTH {
        return Err(CreateError::SizeExceedsMaximum {
            size,
            max: MAX_IMAGE_LENGTH,
        });
    }
    let geometry = Geometry::new(cluster_bits, opts.extended_l2).ok_or(CreateError::ClusterSize)?;
    let l1_entries = geometry.l1_entries_for(size);
    if l1_entries > MAX_L1_BYTES / L1_ENTRY_SIZE {
        return Err(CreateError::TooLarge);
    }

    let backing_error = |reason| CreateError::BackingFile {
        name: opts.backing_file.clone().unwrap_or_default(),
        format: opts
            .backing_format
            .clone()
            .unwrap_or_else(|| "(null)".into()),
        reason,
    };
    if opts
        .backing_file
        .as_ref()
        .is_some_and(|b| b.len() as u64 > MAX_BACKING_FILE_NAME)
    {
        return Err(backing_error("Invalid argument"));
    }
    let mut header = new_header(&NewHeaderFields {
        version,
        cluster_bits,
        size,
        refcount_order,
        extended_l2: opts.extended_l2,
        lazy_refcounts: opts.lazy_refcounts,
        compression: opts.compression,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        data_file_raw: opts.data_file_raw,
    })?;
    // A header larger than the cluster is refused by the serializer; QEMU words that case
    // differently with and without a backing file, so it is told apart here.
    let header_len = match header.serialize() {
        Ok(bytes) => bytes.len() as u64,
        Err(FormatError::FieldTooLarge {
            field: "qcow2 header",
            ..
        }) => u64::MAX,
        Err(e) => return Err(e.into()),
    };
    if header_len > cs {
        return Err(if has_backing {
            backing_error("No space left on device")
        } else {
            CreateError::HeaderTooLarge
        });
    }

    let external = opts.data_file.is_some();
    let l1_clusters = geometry.bytes_to_clusters(l1_entries * L1_ENTRY_SIZE);
    let (placement, data_clusters) = match (prealloc, external) {
        (Preallocation::Off, _) => (DataPlacement::None, 0),
        (_, true) => (DataPlacement::External, size.div_ceil(cs)),
        (Preallocation::Metadata, false) => (DataPlacement::Interleaved, size.div_ceil(cs)),
        (Preallocation::Falloc | Preallocation::Full, false) => {
            (DataPlacement::Contiguous, size.div_ceil(cs))
        }
    };
    let l2_tables = if placement == DataPlacement::None {
        0
    } else {
        data_clusters.div_ceil(geometry.l2_entries())
    };
    let in_file_data = match placement {
        DataPlacement::Interleaved | DataPlacement::Contiguous => data_clusters,
        DataPlacement::None | DataPlacement::External => 0,
    };
    // Everything but the refcount structures: header, L1, L2 tables, data in the file.
    let others = 1 + l1_clusters.0 + l2_tables + in_file_data;
    let (blocks, table) =
        refcount_fixpoint(others, cs, refcount_order).ok_or(CreateError::TooLarge)?;
    if table.saturating_mul(cs) > MAX_REFTABLE_BYTES {
        return Err(CreateError::TooLarge);
    }
    let used = others + blocks + table;
    let end = used.checked_mul(cs).ok_or(CreateError::TooLarge)?;
    if end > MAX_HOST_OFFSET {
        return Err(CreateError::TooLarge);
    }
    let reftable = ClusterIndex(1);
    let refblocks = ClusterIndex(1 + table);
    let l1 = ClusterIndex(1 + table + blocks);

    header.refcount_table_offset = reftable.0 * cs;
    header.refcount_table_clusters = u32::try_from(table).map_err(|_| CreateError::TooLarge)?;
    header.l1_size = u32::try_from(l1_entries).map_err(|_| CreateError::TooLarge)?;
    header.l1_table_offset = if l1_entries == 0 { 0 } else { l1.0 * cs };

    let file_len = if placement == DataPlacement::None && l1_entries > 0 {
        // Like QEMU: the file ends right after the L1 table's entries.
        l1.0 * cs + l1_entries * L1_ENTRY_SIZE
    } else {
        end
    };
    Ok(Plan {
        header,
        geometry,
        refcount_order,
        reftable,
        reftable_clusters: ClusterCount(table),
        refblocks,
        refblock_count: ClusterCount(blocks),
        l1,
        l1_entries,
        l1_clusters,
        l2_tables: ClusterCount(l2_tables),
        data_clusters: ClusterCount(data_clusters),
        placement,
        preallocation: prealloc,
        used_clusters: ClusterCount(used),
        file_len,
        data_file_len: external.then_some(size),
    })
}

impl Plan {
    fn first_l2(&self) -> u64 {
        self.l1.0 + self.l1_clusters.0
    }

    /// Host cluster of preallocated L2 table `index`.
    pub fn l2_table_cluster(&self, index: u64) -> ClusterIndex {
        let first = self.first_l2();
        match self.placement {
            DataPlacement::Interleaved => {
                ClusterIndex(first + index * (1 + self.geometry.l2_entries()))
            }
            _ => ClusterIndex(first + index),
        }
    }

    /// Where guest cluster `guest` lives: a cluster of the image file, or of the data file
    /// (identity), or nowhere without preallocation.
    pub fn data_cluster(&self, guest: u64) -> Option<ClusterIndex> {
        let per = self.geometry.l2_entries();
        match self.placement {
            DataPlacement::None => None,
            DataPlacement::External => Some(ClusterIndex(guest)),
            DataPlacement::Interleaved => Some(ClusterIndex(
                self.l2_table_cluster(guest / per).0 + 1 + guest % per,
            )),
            DataPlacement::Contiguous => {
                Some(ClusterIndex(self.first_l2() + self.l2_tables.0 + guest))
            }
        }
    }

    /// Host byte range `[start, end)` of the data clusters in the image file (`falloc`/`full`
    /// reserve or zero it); `None` when data does not live in the image file contiguously.
    pub fn contiguous_data_range(&self) -> Option<(HostOffset, u64)> {
        if self.placement != DataPlacement::Contiguous || self.data_clusters.0 == 0 {
            return None;
        }
        let start = self.data_cluster(0)?;
        let start = self.geometry.cluster_start(start)?;
        Some((start, self.data_clusters.0 * self.geometry.cluster_size()))
    }

    fn offset(&self, c: ClusterIndex) -> Result<HostOffset, CreateError> {
        self.geometry.cluster_start(c).ok_or(CreateError::TooLarge)
    }

    /// The bytes of L2 table `index`.
    fn l2_table(&self, index: u64) -> Result<Vec<u8>, CreateError> {
        let per = self.geometry.l2_entries();
        let first = index * per;
        let last = (first + per).min(self.data_clusters.0);
        let mut hosts = Vec::with_capacity(usize::try_from(per).unwrap_or(0));
        for guest in first..last {
            let host = match self.placement {
                // The data file is the guest disk itself: host offset = guest offset.
                DataPlacement::External => {
                    HostOffset(GuestOffset(guest << self.geometry.cluster_bits()).0)
                }
                _ => self.offset(self.data_cluster(guest).ok_or(CreateError::TooLarge)?)?,
            };
            hosts.push(host);
        }
        let mut bytes = if self.geometry.is_extended_l2() {
            let entries: Vec<_> = hosts.into_iter().map(extended_l2_entry_for).collect();
            write_extended_l2_table(&entries)
        } else {
            let entries: Vec<_> = hosts.into_iter().map(l2_entry_for).collect();
            write_u64_table(&entries)
        };
        bytes.resize(self.geometry.cluster_size() as usize, 0);
        Ok(bytes)
    }
}

/// Coalesces writes at increasing contiguous offsets into large ones.
struct Batch<'a> {
    storage: &'a dyn Storage,
    path: &'a str,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> Batch<'a> {
    fn new(storage: &'a dyn Storage, path: &'a str) -> Self {
        Batch {
            storage,
            path,
            start: 0,
            buf: Vec::new(),
        }
    }

    fn write(&mut self, offset: HostOffset, bytes: &[u8]) -> Result<(), CreateError> {
        let contiguous = self.start + self.buf.len() as u64 == offset.0;
        if !contiguous || self.buf.len() + bytes.len() > WRITE_CHUNK {
            self.flush()?;
            self.start = offset.0;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CreateError> {
        if !self.buf.is_empty() {
            self.storage
                .write_at(self.start, &self.buf)
                .map_err(CreateError::io("could not write", self.path))?;
            self.start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Writes zeros over `[start, start + len)`.
fn write_zeros(storage: &dyn Storage, start: u64, len: u64, path: &str) -> Result<(), CreateError> {
    let zeros = vec![0u8; WRITE_CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(WRITE_CHUNK as u64) as usize;
        storage
            .write_at(start + done, &zeros[..n])
            .map_err(CreateError::io("could not write", path))?;
        done += n as u64;
    }
    Ok(())
}

/// Writes the planned image into `image` and sizes `data` (the external data file, when the
/// plan has one); both are expected to be new or truncated. `falloc` space reservation is left to the caller, which owns
/// the files ([`create_file`] does it); everything else, including `full`'s zeros, is here.
pub fn write_image(
    plan: &Plan,
    image: &dyn Storage,
    data: Option<&dyn Storage>,
) -> Result<(), CreateError> {
    let path = "the image";
    let cs = plan.geometry.cluster_size();
    image
        .set_len(plan.file_len)
        .map_err(CreateError::io("could not resize", path))?;
    let mut batch = Batch::new(image, path);

    // Refcount blocks: every used cluster has refcount 1.
    let per_block = refcounts_per_block(cs, plan.refcount_order).ok_or(CreateError::TooLarge)?;
    let full_block = refcount_block_with_ones(cs, plan.refcount_order, per_block)?;
    let mut reftable = Vec::with_capacity(usize::try_from(plan.refblock_count.0).unwrap_or(0));
    for k in 0..plan.refblock_count.0 {
        let at = plan.offset(ClusterIndex(plan.refblocks.0 + k))?;
        let covered_from = k * per_block;
        let ones = plan.used_clusters.0.saturating_sub(covered_from);
        if ones >= per_block {
            batch.write(at, &full_block)?;
        } else {
            batch.write(
                at,
                &refcount_block_with_ones(cs, plan.refcount_order, ones)?,
            )?;
        }
        reftable.push(reftable_entry_for(at));
    }
    let reftable_at = plan.offset(plan.reftable)?;
    batch.write(reftable_at, &write_u64_table(&reftable))?;
    batch.flush()?;

    // L2 tables before the L1 entries that point at them.
    let mut l1 = Vec::with_capacity(usize::try_from(plan.l1_entries).unwrap_or(0));
    for i in 0..plan.l2_tables.0 {
        let at = plan.offset(plan.l2_table_cluster(i))?;
        batch.write(at, &plan.l2_table(i)?)?;
        l1.push(l1_entry_for(at));
    }
    batch.flush()?;
    if plan.l1_entries > 0 {
        l1.resize(
            usize::try_from(plan.l1_entries).map_err(|_| CreateError::TooLarge)?,
            0,
        );
        batch.write(plan.offset(plan.l1)?, &write_u64_table(&l1))?;
        batch.flush()?;
    }

    if plan.preallocation == Preallocation::Full {
        if let Some((start, len)) = plan.contiguous_data_range() {
            write_zeros(image, start.0, len, path)?;
        }
    }
    if let (Some(data), Some(len)) = (data, plan.data_file_len) {
        let dpath = "the data file";
        // Only grown (the caller hands over a new or truncated file): space the caller
        // reserved with `falloc` must stay reserved.
        data.set_len(len)
            .map_err(CreateError::io("could not resize", dpath))?;
        if plan.preallocation == Preallocation::Full {
            write_zeros(data, 0, len, dpath)?;
        }
        data.flush()
            .map_err(CreateError::io("could not flush", dpath))?;
    }

    // The header last: until it is written the file is not a qcow2 image at all.
    image
        .write_at(0, &plan.header.serialize()?)
        .map_err(CreateError::io("could not write", path))?;
    image
        .flush()
        .map_err(CreateError::io("could not flush", path))
}

/// Reserves `[offset, offset + len)` of `file` with `posix_fallocate`.
fn fallocate(file: &File, offset: u64, len: u64, path: &str) -> Result<(), CreateError> {
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let too_big =
        || CreateError::io("could not preallocate", path)(io::ErrorKind::InvalidInput.into());
    let off = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let n = libc::off_t::try_from(len).map_err(|_| too_big())?;
    // SAFETY: the descriptor is open for the lifetime of `file`; posix_fallocate touches no
    // memory of ours.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, n) };
    if rc != 0 {
        return Err(CreateError::io("could not preallocate", path)(
            io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// A file opened for creation, locked as QEMU locks a file it creates.
struct NewFile {
    file: File,
    /// Whether this call made the file (and so may remove it again on failure).
    created: bool,
    _lock: Option<FileLock>,
}

/// Opens a file for creation: refuses an existing one unless `overwrite`. An existing file is
/// opened without truncation, locked (write and resize held, resize not shared: refused while
/// any other process has the image open for writing or reading), and only then emptied, so a
/// file that someone else holds is left byte for byte as it was.
fn open_new(path: &Path, overwrite: bool, locking: Locking) -> Result<NewFile, CreateError> {
    let shown = path.to_string_lossy().into_owned();
    let mut o = OpenOptions::new();
    o.read(true).write(true).create_new(true);
    let (file, created) = match o.open(path) {
        Ok(f) => (f, true),
        Err(e) if overwrite && e.kind() == io::ErrorKind::AlreadyExists => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(CreateError::io("could not create", &shown))?;
            (f, false)
        }
        Err(e) => return Err(CreateError::io("could not create", &shown)(e)),
    };
    let lock = match FileLock::for_mode(&file, &shown, LockSet::CREATE, locking) {
        Ok(lock) => lock,
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            return Err(CreateError::Lock(e));
        }
    };
    if !created {
        file.set_len(0)
            .map_err(CreateError::io("could not truncate", &shown))?;
    }
    Ok(NewFile {
        file,
        created,
        _lock: lock,
    })
}

/// Creates the image at `path` and its external data file. Refuses an existing image or data
/// file unless `overwrite`, and a file another process holds (QEMU's locks, as `locking` says)
/// in every case. On failure nothing that this call created is left behind.
///
/// A relative data file name is used as given, relative to the working directory: QEMU (10.0)
/// creates the data file there and also looks for it there when it opens the image (unlike a
/// backing file, which it looks for next to the image).
pub fn create_file(
    path: &Path,
    opts: &CreateOptions,
    overwrite: bool,
    locking: Locking,
) -> Result<(), CreateError> {
    let plan = plan(opts)?;
    let shown = path.to_string_lossy().into_owned();
    let image_new = open_new(path, overwrite, locking)?;
    let data_path = opts.data_file.as_deref().map(PathBuf::from);
    let data_new = match &data_path {
        Some(p) => match open_new(p, overwrite, locking) {
            Ok(f) => Some(f),
            Err(e) => {
                if image_new.created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        },
        None => None,
    };
    let image_file = &image_new.file;
    let data_file = data_new.as_ref().map(|n| &n.file);
    let result = (|| {
        let image_clone = image_file
            .try_clone()
            .map_err(CreateError::io("could not open", &shown))?;
        let image = FileStorage::from_file(image_clone, true);
        let data = match data_file {
            Some(f) => Some(FileStorage::from_file(
                f.try_clone()
                    .map_err(CreateError::io("could not open", &shown))?,
                true,
            )),
            None => None,
        };
        if plan.preallocation == Preallocation::Falloc {
            // Reserve first, so that a full disk fails before anything is written.
            if let Some((start, len)) = plan.contiguous_data_range() {
                fallocate(image_file, start.0, len, &shown)?;
            }
            if let (Some(f), Some(len)) = (data_file, plan.data_file_len) {
                fallocate(f, 0, len, &shown)?;
            }
        }
        write_image(&plan, &image, data.as_ref().map(|d| d as &dyn Storage))
    })();
    if result.is_err() {
        // The files were emptied (or made) by this call: what is there now is half an image.
        let _ = std::fs::remove_file(path);
        if let Some(p) = &data_path {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{refcount_get, ReftableEntry};
    use crate::overlap::MetadataType;
    use crate::scan::scan;
    use crate::storage::MemStorage;

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            ..Default::default()
        }
    }

    /// Creates in memory, rescans, and checks that exactly the clusters `0..used` have
    /// refcount 1 and that the scan found no problem.
    fn build(o: &CreateOptions) -> (Plan, Vec<u8>) {
        let p = plan(o).unwrap();
        let img = MemStorage::new(Vec::new());
        let data = MemStorage::new(Vec::new());
        let d: Option<&dyn Storage> = o.data_file.as_ref().map(|_| &data as &dyn Storage);
        write_image(&p, &img, d).unwrap();
        let s = scan(&img, MetadataType::all(), None).unwrap();
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.header, p.header);
        let bytes = img.snapshot();
        assert_eq!(bytes.len() as u64, p.file_len);
        let cs = p.geometry.cluster_size() as usize;
        let per = refcounts_per_block(cs as u64, p.refcount_order).unwrap();
        let refcount = |c: u64| -> u64 {
            let e = s
                .refcount_table
                .get((c / per) as usize)
                .copied()
                .unwrap_or(0);
            let b = ReftableEntry(e).block_offset().0 as usize;
            if b == 0 {
                return 0;
            }
            refcount_get(&bytes[b..b + cs], (c % per) as usize, p.refcount_order).unwrap()
        };
        for c in 0..p.used_clusters.0 {
            assert_eq!(refcount(c), 1, "cluster {c}");
        }
        assert_eq!(refcount(p.used_clusters.0), 0);
        assert_eq!(
            p.used_clusters.0,
            p.file_len.div_ceil(cs as u64),
            "every cluster up to the end is used"
        );
        if let Some(len) = p.data_file_len {
            assert_eq!(data.snapshot().len() as u64, len);
        }
        (p, bytes)
    }

    #[test]
    fn default_layout_matches_qemu() {
        let (p, bytes) = build(&opts(1 << 30));
        assert_eq!(p.header.refcount_table_offset, 0x10000);
        assert_eq!(p.header.l1_table_offset, 0x30000);
        assert_eq!(p.header.l1_size, 2);
        assert_eq!(p.file_len, 0x30000 + 16);
        assert_eq!(&bytes[0x10000..0x10008], &0x20000u64.to_be_bytes());
    }

    #[test]
    fn zero_size_has_no_l1() {
        let (p, _) = build(&opts(0));
        assert_eq!(p.header.l1_table_offset, 0);
        assert_eq!(p.file_len, 3 * 65536);
    }

    #[test]
    fn size_rounds_up_to_sectors() {
        let (p, _) = build(&opts(100_000));
        assert_eq!(p.header.size, 100_352);
    }

    #[test]
    fn metadata_preallocation_interleaves_like_qemu() {
        let o = CreateOptions {
            preallocation: Preallocation::Metadata,
            ..opts(1 << 30)
        };
        // Planned only: writing would take a 1 GiB buffer in memory.
        let p = plan(&o).unwrap();
        // QEMU: L2 tables at 0x40000 and 0x20050000, first data cluster at 0x50000.
        assert_eq!(p.file_len, 1_074_135_040);
        assert_eq!(p.l2_table_cluster(0), ClusterIndex(4));
        assert_eq!(p.l2_table_cluster(1), ClusterIndex(0x2005));
        assert_eq!(p.data_cluster(0), Some(ClusterIndex(5)));
        assert_eq!(p.data_cluster(8192), Some(ClusterIndex(0x2006)));
        let small = CreateOptions {
            preallocation: Preallocation::Metadata,
            ..opts(1 << 20)
        };
        let (_, bytes) = build(&small);
        assert_eq!(
            &bytes[0x30000..0x30008],
            &0x8000_0000_0004_0000u64.to_be_bytes()
        );
        assert_eq!(
            &bytes[0x40000..0x40008],
            &0x8000_0000_0005_0000u64.to_be_bytes()
        );
    }

    #[test]
    fn every_variant_rescans_clean() {
        let sizes = [0u64, 65536 + 512, 3 << 20, (1 << 30) + 512];
        for &size in &sizes {
            for prealloc in [
                Preallocation::Off,
                Preallocation::Metadata,
                Preallocation::Falloc,
                Preallocation::Full,
            ] {
                for (cs, ext) in [
                    (512u64, false),
                    (65536, false),
                    (16384, true),
                    (2 << 20, true),
                ] {
                    // Every width on one geometry, the default width on the others.
                    let widths: &[u64] = if cs == 512 {
                        &[1, 2, 4, 8, 16, 32, 64]
                    } else {
                        &[16]
                    };
                    for &rb in widths {
                        let o = CreateOptions {
                            cluster_size: cs,
                            extended_l2: ext,
                            refcount_bits: rb,
                            preallocation: prealloc,
                            ..opts(size)
                        };
                        // Data in memory only for small images.
                        if size < (64 << 20) || prealloc == Preallocation::Off {
                            build(&o);
                        }
                        if size < (64 << 20) {
                            build(&CreateOptions {
                                data_file: Some("data.raw".into()),
                                ..o
                            });
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn refcount_structures_cover_themselves() {
        // 512-byte clusters with 64-bit refcounts: 64 refcounts per block, 64 entries per table
        // cluster, so the table itself spans clusters.
        let o = CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            preallocation: Preallocation::Metadata,
            ..opts(8 << 20)
        };
        let (p, _) = build(&o);
        assert!(p.reftable_clusters.0 > 1);
        for others in [0u64, 1, 63, 64, 4095, 4096, 1 << 20] {
            let (b, t) = refcount_fixpoint(others, 512, 6).unwrap();
            assert!(b * 64 >= others + b + t);
            assert!(t * 64 >= b);
            // Minimal: one block fewer would not do.
            assert!(b == 0 || (b - 1) * 64 < others + b + t);
        }
    }

    #[test]
    fn large_metadata_preallocation_is_planned_fast() {
        for (size, ext) in [(64u64 << 30, false), (1 << 40, false), (1 << 40, true)] {
            let o = CreateOptions {
                extended_l2: ext,
                preallocation: Preallocation::Metadata,
                backing_file: ext.then(|| "base.qcow2".into()),
                ..opts(size)
            };
            let p = plan(&o).unwrap();
            let cs = 65536;
            let data = size / cs;
            assert_eq!(
                p.used_clusters.0,
                1 + p.reftable_clusters.0
                    + p.refblock_count.0
                    + p.l1_clusters.0
                    + p.l2_tables.0
                    + data
            );
            assert!(p.refblock_count.0 * 32768 >= p.used_clusters.0);
        }
    }

    #[test]
    fn qemu_validation_order_and_messages() {
        let err = |o: CreateOptions| plan(&o).unwrap_err().to_string();
        let v2 = |o: CreateOptions| CreateOptions { version: 2, ..o };
        assert!(err(v2(CreateOptions {
            extended_l2: true,
            cluster_size: 1000,
            ..opts(1)
        }))
        .starts_with("Extended L2 entries are only supported with compatibility level 1.1"));
        for cs in [256, 1000, 4 << 20, 0] {
            assert_eq!(
                err(CreateOptions {
                    cluster_size: cs,
                    ..opts(1)
                }),
                "Cluster size must be a power of two between 512 and 2048k"
            );
        }
        assert!(err(CreateOptions {
            extended_l2: true,
            cluster_size: 8192,
            ..opts(1)
        })
        .contains("at least 16384 bytes"));
        assert!(err(CreateOptions {
            backing_file: Some("b".into()),
            preallocation: Preallocation::Metadata,
            ..opts(1)
        })
        .starts_with("Backing file and preallocation"));
        assert_eq!(
            err(CreateOptions {
                backing_format: Some("raw".into()),
                ..opts(1)
            }),
            "Backing format cannot be used without backing file"
        );
        assert!(err(v2(CreateOptions {
            lazy_refcounts: true,
            refcount_bits: 8,
            ..opts(1)
        }))
        .starts_with("Lazy refcounts"));
        for rb in [0, 3, 128] {
            assert!(err(CreateOptions {
                refcount_bits: rb,
                ..opts(1)
            })
            .starts_with("Refcount width must be"));
        }
        assert!(err(v2(CreateOptions {
            refcount_bits: 8,
            ..opts(1)
        }))
        .starts_with("Different refcount widths"));
        assert_eq!(
            err(CreateOptions {
                data_file_raw: true,
                ..opts(1)
            }),
            "data-file-raw requires data-file"
        );
        assert!(err(CreateOptions {
            data_file_raw: true,
            data_file: Some("d".into()),
            backing_file: Some("b".into()),
            ..opts(1)
        })
        .starts_with("Backing file and data-file-raw"));
        assert!(err(v2(CreateOptions {
            data_file: Some("d".into()),
            ..opts(1)
        }))
        .starts_with("External data files"));
        assert!(err(v2(CreateOptions {
            compression: CompressionType::Zstd,
            ..opts(1)
        }))
        .starts_with("Non-zlib compression type"));
        assert!(err(opts(3 << 50)).starts_with("The image size is too large"));
        assert!(err(opts(u64::MAX)).starts_with("Invalid image size"));
        assert!(err(opts(i64::MAX as u64)).starts_with("Could not resize image"));
        assert!(err(CreateOptions {
            version: 4,
            ..opts(1)
        })
        .contains("'version'"));
        assert!(err(CreateOptions {
            backing_file: Some("x".repeat(1024)),
            ..opts(1)
        })
        .starts_with("Could not assign backing file 'xxx"));
        assert!(err(CreateOptions {
            cluster_size: 512,
            backing_file: Some("x".repeat(400)),
            backing_format: Some("raw".into()),
            ..opts(1)
        })
        .ends_with("with format 'raw': No space left on device"));
        // The largest L1 table is fine.
        assert!(plan(&opts(2 << 50)).is_ok());
    }

    #[test]
    fn data_file_raw_forces_metadata_preallocation() {
        let o = CreateOptions {
            data_file: Some("d.raw".into()),
            data_file_raw: true,
            ..opts(1 << 30)
        };
        let (p, bytes) = build(&o);
        assert_eq!(p.placement, DataPlacement::External);
        assert_eq!(p.file_len, 6 * 65536);
        let l2 = p.geometry.cluster_start(p.l2_table_cluster(0)).unwrap().0 as usize;
        assert_eq!(
            &bytes[l2 + 8..l2 + 16],
            &0x8000_0000_0001_0000u64.to_be_bytes()
        );
    }

    #[test]
    fn create_file_refuses_existing_files_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("qcow2ovl-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.qcow2");
        let data = dir.join("a.raw");
        let o = CreateOptions {
            data_file: Some(data.to_string_lossy().into_owned()),
            preallocation: Preallocation::Falloc,
            ..opts(1 << 20)
        };
        create_file(&img, &o, false, Locking::Auto).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().len(), 1 << 20);
        let err = create_file(&img, &o, false, Locking::Auto).unwrap_err();
        assert!(matches!(&err, CreateError::Io { source, .. }
            if source.kind() == io::ErrorKind::AlreadyExists));
        assert!(!err.is_invalid_options());
        // The image is refused before the data file is touched; a refused data file removes
        // the image this call created.
        std::fs::remove_file(&img).unwrap();
        assert!(create_file(&img, &o, false, Locking::Auto).is_err());
        assert!(!img.exists());
        assert!(data.exists());
        create_file(&img, &o, true, Locking::Auto).unwrap();
        let s = scan(
            &FileStorage::open_read_only(&img).unwrap(),
            MetadataType::all(),
            None,
        )
        .unwrap();
        assert!(s.problems.is_empty());
        // Invalid options create nothing.
        let bad = dir.join("bad.qcow2");
        let e = create_file(
            &bad,
            &CreateOptions {
                cluster_size: 3,
                ..opts(1)
            },
            false,
            Locking::Auto,
        );
        assert!(e.is_err_and(|e| e.is_invalid_options()));
        assert!(!bad.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
