//! Reads an image's metadata through [`Storage`] and [`format`](crate::format), and fills a
//! [`MetadataMap`] with every extent of every enabled type.
//!
//! What is read at open, and why:
//! - the header cluster, the active L1 table and the refcount table (everything needs them; they
//!   locate the active L2 tables and the refcount blocks, which are not read);
//! - the snapshot table (the snapshot list) and, only when `INACTIVE_L2` is enabled, every
//!   snapshot's L1 table (to locate the inactive L2 tables);
//! - the bitmap directory, while autoclear bit 0 vouches for it (the bitmap list), and the
//!   tables of consistent bitmaps, whose entries QEMU validates at open too.
//!
//! Every size that comes from the file is bounded before anything is allocated for it (the
//! header parser enforces QEMU's table limits, and allocations are fallible), bytes past the end
//! of the file read as zeros, as they do in QEMU, and snapshot L1 tables are read in bounded
//! chunks and only where the file holds data (a table in a hole of a sparse file is all zeros
//! and costs nothing). Pointers that the map cannot hold, and structures that share clusters,
//! are not fatal for a read-only scan; they are listed in [`ScannedImage::problems`].
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | [`scan`]: the header, the active L1 table and the refcount table, what the scan returns ([`ScannedImage`]) and how it fails ([`ScanError`]) |
//! | `scanner.rs` | the scan state: the map being filled, the problems, the budgets; how one structure is entered |
//! | `snapshots.rs` | the snapshot table and the snapshot L1 tables, read in bounded chunks where the file holds data |
//! | `bitmaps.rs` | the bitmap directory and the tables of consistent bitmaps |
//! | `tests.rs` | scan unit tests over hand-built images |

mod bitmaps;
mod scanner;
mod snapshots;
#[cfg(test)]
mod tests;

use std::io;

use crate::format::entry::L1Entry;
use crate::format::offsets::MAX_CLUSTER_BITS;
use crate::format::refcount::ReftableEntry;
use crate::format::{read_u64_table, BitmapDirectoryEntry, FormatError, Header, SnapshotEntry};
use crate::overlap::{MapError, MetadataMap, MetadataType};
use crate::problem::Problem;
use crate::storage::Storage;
use scanner::Scanner;

/// Bytes read to learn the cluster size: the fixed header fields, and the whole of a 512-byte
/// cluster.
const HEADER_PROBE: u64 = 512;
/// Problems listed individually before the rest are only counted.
const MAX_PROBLEMS: usize = 64;
/// Clusters that range structures may claim beyond the file's own clusters (structures that end
/// past the end of the file, e.g. after a crash or a truncation).
const RANGE_SLACK_CLUSTERS: u64 = 1 << 16;
/// The metadata map's memory when no limit is given: this much, plus
/// [`MAP_BYTES_PER_ALLOCATED_CLUSTER`] for every cluster the file really holds. A valid image's
/// metadata lies in clusters the file holds, so its map fits many times over; a file whose
/// tables merely claim to span terabytes of holes cannot make the map grow past it. What does
/// not fit is checked by QEMU's algorithm instead (the map's unchecked ranges).
pub const DEFAULT_MAP_BASE_BYTES: usize = 16 << 20;
/// See [`DEFAULT_MAP_BASE_BYTES`].
pub const MAP_BYTES_PER_ALLOCATED_CLUSTER: usize = 32;

/// The map's memory limit for a file holding `allocated` bytes in clusters of `cluster_size`:
/// `limit` when given, else the default above.
pub fn map_limit_for(limit: Option<usize>, allocated: u64, cluster_size: u64) -> usize {
    limit.unwrap_or_else(|| {
        let clusters = usize::try_from(allocated.div_ceil(cluster_size)).unwrap_or(usize::MAX);
        DEFAULT_MAP_BASE_BYTES
            .saturating_add(clusters.saturating_mul(MAP_BYTES_PER_ALLOCATED_CLUSTER))
    })
}

/// Sparse-table bytes that may be read beyond what the file has allocated (file systems report
/// data in blocks, so a table's data may be counted twice where tables share a block).
const TABLE_READ_SLACK: u64 = 64 << 20;

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// A malformed or unsupported on-disk structure.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The image's structures contradict each other in a way that makes scanning unsafe.
    #[error("{0}")]
    Inconsistent(String),
    /// Reading the image failed.
    #[error("I/O error reading {what}: {source}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The map rejected its configuration (bad memory limit).
    #[error(transparent)]
    Map(#[from] MapError),
    /// Memory for a table could not be reserved.
    #[error("cannot allocate {0} bytes for a metadata table")]
    OutOfMemory(usize),
}

/// Everything the scan learned about an image.
#[derive(Debug)]
pub struct ScannedImage {
    /// The parsed header.
    pub header: Header,
    /// Length of the image file in bytes at open.
    pub file_len: u64,
    /// The active L1 table (raw entries).
    pub l1_table: Vec<u64>,
    /// The refcount table (raw entries).
    pub refcount_table: Vec<u64>,
    /// The snapshot list, in table order.
    pub snapshots: Vec<SnapshotEntry>,
    /// Byte length of the snapshot table (end of the last entry).
    pub snapshot_table_bytes: u64,
    /// The persistent bitmaps, when autoclear bit 0 vouches for the bitmap directory.
    pub bitmaps: Vec<BitmapDirectoryEntry>,
    /// The metadata map over every enabled type.
    pub map: MetadataMap,
    /// Non-fatal inconsistencies found on the way (at most [`MAX_PROBLEMS`] listed).
    pub problems: Vec<Problem>,
    /// How many problems were found in all (more than listed when many).
    pub problem_count: usize,
    /// Whether some problem (listed or not) means the image must not be written.
    pub blocks_writes: bool,
}

/// Refuses a qcow2 file that ends inside the fixed fields of its header version: past the end
/// they would read as zeros and be judged as values (`header_length is 0`), which hides that the
/// file was cut short.
fn check_not_cut_short(probe: &[u8], file_len: u64) -> Result<(), FormatError> {
    let word = |at: usize| {
        probe
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes)
    };
    if word(0) != crate::format::header::QCOW2_MAGIC {
        return Ok(());
    }
    let version = word(4);
    let needed = match version {
        2 => 72,
        3 => 104,
        _ => return Ok(()),
    };
    if file_len < needed {
        return Err(FormatError::FileTruncated {
            file_len,
            version,
            needed,
        });
    }
    Ok(())
}

/// Scans the image in `storage`, tracking the `enabled` types, with an optional memory limit for
/// the map.
pub fn scan(
    storage: &dyn Storage,
    enabled: MetadataType,
    map_limit: Option<usize>,
) -> Result<ScannedImage, ScanError> {
    let file_len = storage.len().map_err(|source| ScanError::Io {
        what: "the image length",
        source,
    })?;
    if file_len == 0 {
        return Err(FormatError::Truncated {
            what: "qcow2 header (the file is empty)".into(),
            needed: 72,
            available: 0,
        }
        .into());
    }
    // Read the fixed fields first, then exactly one cluster (at most 2 MiB; the probe already is
    // a whole 512-byte cluster). Past the end of the file the header cluster reads as zeros, as
    // in QEMU: a file cut inside cluster 0 is judged by what those zeros mean.
    let probe = read_table(storage, 0, HEADER_PROBE, "the header")?;
    check_not_cut_short(&probe, file_len)?;
    let cluster_bits = probe
        .get(20..24)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes);
    let cluster0 = if (10..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        read_table(storage, 0, 1 << cluster_bits, "the header")?
    } else {
        probe
    };
    let header = Header::parse(&cluster0)?;
    drop(cluster0);
    let allocated = storage.allocated_bytes().unwrap_or(file_len);
    let limit = map_limit_for(map_limit, allocated.min(file_len), header.cluster_size());
    let mut s = Scanner {
        storage,
        file_len,
        cs: header.cluster_size(),
        map: MetadataMap::new(header.cluster_size(), enabled, Some(limit))?,
        problems: Vec::new(),
        problem_count: 0,
        blocks_writes: false,
        range_budget: file_len.div_ceil(header.cluster_size()) + RANGE_SLACK_CLUSTERS,
        table_read_budget: allocated.min(file_len).saturating_add(TABLE_READ_SLACK),
    };
    s.put(0, s.cs, MetadataType::MAIN_HEADER, "the header")?;

    let l1_bytes = u64::from(header.l1_size) * 8;
    s.put(
        header.l1_table_offset,
        l1_bytes,
        MetadataType::ACTIVE_L1,
        "the active L1 table",
    )?;
    let l1_table =
        read_u64_table(&s.read(header.l1_table_offset, l1_bytes, "the active L1 table")?);
    for (i, &e) in l1_table.iter().enumerate() {
        let ofs = L1Entry(e).l2_offset().0;
        if ofs != 0 {
            s.put_cluster(ofs, MetadataType::ACTIVE_L2, || {
                format!("L2 table (L1 index {i})")
            });
        }
    }

    let rt_bytes = u64::from(header.refcount_table_clusters) * s.cs;
    s.put(
        header.refcount_table_offset,
        rt_bytes,
        MetadataType::REFCOUNT_TABLE,
        "the refcount table",
    )?;
    let refcount_table =
        read_u64_table(&s.read(header.refcount_table_offset, rt_bytes, "the refcount table")?);
    for (i, &e) in refcount_table.iter().enumerate() {
        let ofs = ReftableEntry(e).block_offset().0;
        if ofs != 0 {
            s.put_cluster(ofs, MetadataType::REFCOUNT_BLOCK, || {
                format!("refcount block (refcount table index {i})")
            });
        }
    }

    let (snapshots, snapshot_table_bytes) = s.scan_snapshots(&header, enabled)?;
    let bitmaps = s.scan_bitmaps(&header)?;
    if let Some((offset, length)) = header.crypto_header() {
        s.put(
            offset,
            length,
            MetadataType::CRYPTO_HEADER,
            "the encryption header",
        )?;
    }

    Ok(ScannedImage {
        header,
        file_len,
        l1_table,
        refcount_table,
        snapshots,
        snapshot_table_bytes,
        bitmaps,
        map: s.map,
        problems: s.problems,
        problem_count: s.problem_count,
        blocks_writes: s.blocks_writes,
    })
}

/// Reads `len` bytes at `offset` into a new buffer; bytes past the end of the file read as
/// zeros. The caller bounds `len`; the allocation is fallible all the same.
fn read_table(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>, ScanError> {
    let len = usize::try_from(len).map_err(|_| ScanError::OutOfMemory(usize::MAX))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| ScanError::OutOfMemory(len))?;
    buf.resize(len, 0);
    storage
        .read_padded(offset, &mut buf)
        .map_err(|source| ScanError::Io { what, source })?;
    Ok(buf)
}
