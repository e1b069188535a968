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

use std::collections::HashSet;
use std::io;

use crate::format::entry::L1Entry;
use crate::format::limits::MAX_SNAPSHOT_TABLE_BYTES;
use crate::format::offsets::MAX_CLUSTER_BITS;
use crate::format::refcount::ReftableEntry;
use crate::format::{
    parse_bitmap_directory, parse_snapshot_table, read_u64_table, BitmapDirectoryEntry,
    BitmapTableEntry, ClusterCount, FormatError, Header, HostOffset, SnapshotEntry,
};
use crate::overlap::{MapError, MetadataMap, MetadataType};
use crate::problem::{Problem, ProblemKind};
use crate::storage::Storage;

/// Bytes read to learn the cluster size: the fixed header fields, and the whole of a 512-byte
/// cluster.
const HEADER_PROBE: u64 = 512;
/// Upper bound of one snapshot table entry: fixed part, extra data, id and name, padding.
const MAX_SNAPSHOT_ENTRY: u64 = 40 + 1024 + 2 * 65535 + 7;
/// Problems listed individually before the rest are only counted.
const MAX_PROBLEMS: usize = 64;
/// Clusters that range structures may claim beyond the file's own clusters (structures that end
/// past the end of the file, e.g. after a crash or a truncation).
const RANGE_SLACK_CLUSTERS: u64 = 1 << 16;
/// Bytes of a snapshot L1 table read at a time.
const L1_READ_CHUNK: u64 = 1 << 20;
/// Snapshot L1 bytes that may be read beyond what the file has allocated (file systems report
/// data in blocks, so a table's data may be counted twice where tables share a block).
const L1_READ_SLACK: u64 = 64 << 20;

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
    let mut s = Scanner {
        storage,
        file_len,
        cs: header.cluster_size(),
        map: MetadataMap::new(header.cluster_size(), enabled, map_limit)?,
        problems: Vec::new(),
        problem_count: 0,
        blocks_writes: false,
        range_budget: file_len.div_ceil(header.cluster_size()) + RANGE_SLACK_CLUSTERS,
        l1_read_budget: allocated.min(file_len).saturating_add(L1_READ_SLACK),
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

/// Scan state: the map being filled and the problems found.
struct Scanner<'a> {
    storage: &'a dyn Storage,
    file_len: u64,
    cs: u64,
    map: MetadataMap,
    problems: Vec<Problem>,
    problem_count: usize,
    blocks_writes: bool,
    /// Clusters that multi-cluster structures may still claim (see [`Scanner::put`]).
    range_budget: u64,
    /// Snapshot L1 bytes (holding data) that may still be read (see
    /// [`Scanner::read_snapshot_l1`]).
    l1_read_budget: u64,
}

impl Scanner<'_> {
    fn read(&self, offset: u64, len: u64, what: &'static str) -> Result<Vec<u8>, ScanError> {
        read_table(self.storage, offset, len, what)
    }

    fn problem(&mut self, kind: ProblemKind, offset: u64, size: u64, message: String) {
        let problem = Problem {
            kind,
            offset: HostOffset(offset),
            size,
            message,
        };
        self.problem_count += 1;
        self.blocks_writes |= problem.blocks_writes();
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        }
    }

    /// Enters `clusters` clusters at `offset` into the map, reporting a structure that lands on
    /// another one it may not share clusters with.
    fn enter(
        &mut self,
        offset: u64,
        clusters: u64,
        types: MetadataType,
        what: &dyn Fn() -> String,
    ) {
        match self
            .map
            .enter(HostOffset(offset), ClusterCount(clusters), types)
        {
            Ok(None) => {}
            Ok(Some((at, existing))) => {
                let message = format!(
                    "{} at {offset:#x} overlaps {} at {:#x}",
                    what(),
                    existing.message_name().unwrap_or("metadata"),
                    at.0
                );
                self.problem(
                    ProblemKind::MetadataOverlap {
                        existing,
                        new: types,
                    },
                    at.0,
                    self.cs,
                    message,
                );
            }
            Err(e) => {
                let message = format!("{} at {offset:#x} cannot be mapped: {e}", what());
                self.problem(ProblemKind::Unmappable, offset, clusters * self.cs, message);
            }
        }
    }

    /// Enters `[offset, offset + len)`, rounded out to clusters, as `types`. A structure the map
    /// cannot hold (unaligned or past 2^56) becomes a problem instead.
    ///
    /// The clusters entered this way are charged to [`Scanner::range_budget`]: in a valid image
    /// the tables, snapshot L1 tables and bitmap tables are distinct clusters of the file, so
    /// together they cannot span (much) more than the file. Without the budget, a header could
    /// declare 65536 snapshots with 32 MiB L1 tables each and make the scan enter billions of
    /// clusters.
    fn put(
        &mut self,
        offset: u64,
        len: u64,
        types: MetadataType,
        what: &str,
    ) -> Result<(), ScanError> {
        if len == 0 {
            return Ok(());
        }
        if offset % self.cs != 0 {
            self.problem(
                ProblemKind::Unaligned,
                offset,
                len,
                format!("{what} at {offset:#x} is not cluster-aligned"),
            );
            return Ok(());
        }
        let clusters = len.div_ceil(self.cs);
        self.range_budget = self.range_budget.checked_sub(clusters).ok_or_else(|| {
            ScanError::Inconsistent(format!(
                "Metadata structures span more clusters than the file holds: {what} at \
                 {offset:#x} ({clusters} clusters) overlaps others or lies far beyond the end \
                 of the file ({} bytes)",
                self.file_len
            ))
        })?;
        let name = || what.to_string();
        self.enter(offset, clusters, types, &name);
        Ok(())
    }

    /// Enters the single cluster at `offset` (a table pointer from an L1, snapshot L1 or refcount
    /// table entry), noting pointers that are unaligned or beyond the end of the file.
    fn put_cluster(&mut self, offset: u64, types: MetadataType, what: impl Fn() -> String) {
        if offset % self.cs != 0 {
            let message = format!("{} offset {offset:#x} is not cluster-aligned", what());
            self.problem(ProblemKind::Unaligned, offset, self.cs, message);
            return;
        }
        if offset >= self.file_len {
            let message = format!(
                "{} at {offset:#x} lies beyond the end of the file ({:#x})",
                what(),
                self.file_len
            );
            self.problem(ProblemKind::BeyondEnd, offset, self.cs, message);
        }
        self.enter(offset, 1, types, &what);
    }

    /// Reads the snapshot table and, when inactive L2 tables are tracked, every snapshot L1 table.
    fn scan_snapshots(
        &mut self,
        header: &Header,
        enabled: MetadataType,
    ) -> Result<(Vec<SnapshotEntry>, u64), ScanError> {
        if header.nb_snapshots == 0 {
            return Ok((Vec::new(), 0));
        }
        // Entries have variable length; read the most the table can span (at most 64 MiB).
        // Past the end of the file every entry is zeros: 40 bytes each. So the buffer needs the
        // part in the file, one entry running out of it, and 40 bytes per remaining entry.
        let nb = u64::from(header.nb_snapshots);
        let in_file = self.file_len.saturating_sub(header.snapshots_offset);
        let bound = (nb * MAX_SNAPSHOT_ENTRY)
            .min(in_file + MAX_SNAPSHOT_ENTRY + nb * 40)
            .min(MAX_SNAPSHOT_TABLE_BYTES);
        let buf = self.read(header.snapshots_offset, bound, "the snapshot table")?;
        let (snapshots, table_bytes) =
            parse_snapshot_table(&buf, header.nb_snapshots, header.version)?;
        drop(buf);
        self.put(
            header.snapshots_offset,
            table_bytes,
            MetadataType::SNAPSHOT_TABLE,
            "the snapshot table",
        )?;

        let mut seen: HashSet<(u64, u32)> = HashSet::new();
        for (i, snap) in snapshots.iter().enumerate() {
            // QEMU opens an image whose snapshot L1 table breaks its limits and refuses only to
            // use that snapshot; so do we, with a problem that keeps writers away (its L2 tables
            // cannot be located, so they cannot be protected).
            if let Err(e) = snap.check_l1_table(self.cs) {
                self.problem(
                    ProblemKind::UnusableSnapshot,
                    snap.l1_table_offset,
                    snap.l1_table_bytes(),
                    format!("Snapshot {i} ('{}'): {e}", snap.id),
                );
                continue;
            }
            let bytes = snap.l1_table_bytes();
            let what = format!("the L1 table of snapshot {i} ('{}')", snap.id);
            self.put(
                snap.l1_table_offset,
                bytes,
                MetadataType::INACTIVE_L1,
                &what,
            )?;
            if enabled.contains(MetadataType::INACTIVE_L2)
                && seen.insert((snap.l1_table_offset, snap.l1_size))
            {
                self.read_snapshot_l1(i, snap.l1_table_offset, bytes)?;
            }
        }
        Ok((snapshots, table_bytes))
    }

    /// Enters the L2 tables that the snapshot L1 table at `[offset, offset + bytes)` references.
    ///
    /// Only the parts of the table where the file holds data are read (holes and the part past
    /// the end of the file are zeros: no entries), in bounded chunks. Distinct snapshot L1 tables
    /// occupy distinct clusters of a valid file, so the data read for all of them together
    /// cannot exceed what the file has allocated; more means they overlap, and reading them
    /// would cost without bound.
    fn read_snapshot_l1(&mut self, index: usize, offset: u64, bytes: u64) -> Result<(), ScanError> {
        let end = offset.saturating_add(bytes).min(self.file_len);
        let mut at = offset;
        let mut buf = Vec::new();
        while at < end {
            let region = self.storage.next_data(at).map_err(|source| ScanError::Io {
                what: "a snapshot L1 table",
                source,
            })?;
            let Some((data_start, data_end)) = region else {
                break;
            };
            // Entries are 8-aligned within the table.
            let start = (data_start.max(at) - offset) / 8 * 8 + offset;
            if start >= end {
                break;
            }
            let stop = data_end.min(end);
            let mut pos = start;
            while pos < stop {
                let n = (stop - pos).min(L1_READ_CHUNK);
                let n = n.div_ceil(8) * 8;
                self.l1_read_budget = self.l1_read_budget.checked_sub(n).ok_or_else(|| {
                    ScanError::Inconsistent(format!(
                        "Snapshot L1 tables overlap: snapshot {index} brings the data read \
                         from them past the {} bytes the file holds",
                        self.storage.allocated_bytes().unwrap_or(self.file_len)
                    ))
                })?;
                buf.clear();
                buf.resize(n as usize, 0);
                self.storage
                    .read_padded(pos, &mut buf)
                    .map_err(|source| ScanError::Io {
                        what: "a snapshot L1 table",
                        source,
                    })?;
                for (k, e) in read_u64_table(&buf).into_iter().enumerate() {
                    let ofs = L1Entry(e).l2_offset().0;
                    if ofs != 0 {
                        let j = (pos - offset) / 8 + k as u64;
                        self.put_cluster(ofs, MetadataType::INACTIVE_L2, || {
                            format!("L2 table of snapshot {index} (L1 index {j})")
                        });
                    }
                }
                pos += n;
            }
            at = pos.max(stop);
        }
        Ok(())
    }

    /// Reads the bitmap directory while autoclear bit 0 vouches for it.
    fn scan_bitmaps(&mut self, header: &Header) -> Result<Vec<BitmapDirectoryEntry>, ScanError> {
        let Some(ext) = header.active_bitmaps_ext().cloned() else {
            return Ok(Vec::new());
        };
        ext.validate(self.cs)?;
        let dir = self.read(ext.dir_offset, ext.dir_size, "the bitmap directory")?;
        let bitmaps = parse_bitmap_directory(&dir, ext.nb_bitmaps, self.cs, header.size)?;
        self.put(
            ext.dir_offset,
            ext.dir_size,
            MetadataType::BITMAP_DIRECTORY,
            "the bitmap directory",
        )?;
        for b in &bitmaps {
            let what = format!("the table of bitmap '{}'", b.name);
            self.put(
                b.table_offset,
                b.table_bytes(),
                MetadataType::BITMAP_TABLE,
                &what,
            )?;
            // QEMU loads the table of every consistent bitmap at open and refuses the image when
            // an entry is invalid; in-use bitmaps are not loaded. (The read is bounded: the
            // table's clusters were just charged to the range budget.)
            if !b.in_use() {
                let table = self.read(b.table_offset, b.table_bytes(), "a bitmap table")?;
                for e in read_u64_table(&table) {
                    BitmapTableEntry(e).check(self.cs).map_err(|err| {
                        ScanError::Inconsistent(format!(
                            "Could not read bitmap_table table from image for bitmap '{}': {err}",
                            b.name
                        ))
                    })?;
                }
            }
        }
        Ok(bitmaps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const CS: u64 = 65536;

    /// A minimal v3 image: header, reftable at cluster 1, refblock at 2, L1 at 3, L2 at 4.
    fn tiny_image() -> Vec<u8> {
        let mut img = vec![0u8; 5 * CS as usize];
        let put32 =
            |img: &mut Vec<u8>, o: usize, v: u32| img[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |img: &mut Vec<u8>, o: usize, v: u64| img[o..o + 8].copy_from_slice(&v.to_be_bytes());
        img[0..4].copy_from_slice(b"QFI\xfb");
        put32(&mut img, 4, 3);
        put32(&mut img, 20, 16);
        put64(&mut img, 24, 1 << 30);
        put32(&mut img, 36, 2);
        put64(&mut img, 40, 3 * CS);
        put64(&mut img, 48, CS);
        put32(&mut img, 56, 1);
        put32(&mut img, 96, 4);
        put32(&mut img, 100, 112);
        put64(&mut img, CS as usize, 2 * CS);
        put64(&mut img, 3 * CS as usize, (1 << 63) | (4 * CS));
        img
    }

    #[test]
    fn a_file_cut_inside_the_fixed_header_says_so() {
        let full = tiny_image();
        for (len, version, needed) in [(100usize, 3u32, 104u64), (72, 3, 104), (60, 2, 72)] {
            let mut bytes = full[..len].to_vec();
            bytes[4..8].copy_from_slice(&version.to_be_bytes());
            let err = scan(&MemStorage::new(bytes), MetadataType::all(), None).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("qcow2 header too short: the file is truncated"),
                "{text}"
            );
            assert!(text.contains(&format!("({len} bytes;")), "{text}");
            assert!(text.contains(&format!("needs at least {needed}")), "{text}");
        }
        // The whole fixed header present: judged by its fields (header_length 112 > 104 bytes
        // in the file is a header extension area cut off, read as zeros, as QEMU does).
        let whole = full[..104].to_vec();
        if let Err(err) = scan(&MemStorage::new(whole), MetadataType::all(), None) {
            assert!(!err.to_string().contains("truncated ("), "{err}");
        }
    }

    #[test]
    fn maps_every_structure_of_a_tiny_image() {
        let st = MemStorage::new(tiny_image());
        let s = scan(&st, MetadataType::all(), None).unwrap();
        use MetadataType as T;
        assert_eq!(
            s.map.extents(),
            vec![
                (0, CS, T::MAIN_HEADER),
                (CS, CS, T::REFCOUNT_TABLE),
                (2 * CS, CS, T::REFCOUNT_BLOCK),
                (3 * CS, CS, T::ACTIVE_L1),
                (4 * CS, CS, T::ACTIVE_L2),
            ]
        );
        assert!(s.problems.is_empty());
    }

    #[test]
    fn bad_pointers_are_problems_not_failures() {
        let mut img = tiny_image();
        img[3 * CS as usize + 8..3 * CS as usize + 16]
            .copy_from_slice(&(4 * CS + 512).to_be_bytes());
        let st = MemStorage::new(img);
        let s = scan(&st, MetadataType::all(), None).unwrap();
        assert_eq!(s.problem_count, 1);
        assert!(
            s.problems[0].message.contains("not cluster-aligned"),
            "{:?}",
            s.problems
        );
        assert_eq!(s.problems[0].kind, ProblemKind::Unaligned);
        assert!(!s.blocks_writes);
    }

    #[test]
    fn metadata_on_metadata_is_a_problem_that_blocks_writes() {
        // The second L1 entry points at the refcount block (cluster 2).
        let mut img = tiny_image();
        img[3 * CS as usize + 8..3 * CS as usize + 16].copy_from_slice(&(2 * CS).to_be_bytes());
        let s = scan(&MemStorage::new(img), MetadataType::all(), None).unwrap();
        assert_eq!(s.problem_count, 1, "{:?}", s.problems);
        let p = &s.problems[0];
        assert_eq!(
            p.kind,
            ProblemKind::MetadataOverlap {
                existing: MetadataType::ACTIVE_L2,
                new: MetadataType::REFCOUNT_BLOCK
            }
        );
        assert_eq!(p.offset, HostOffset(2 * CS));
        assert!(
            p.message.starts_with(
                "refcount block (refcount table index 0) at 0x20000 overlaps active L2 table"
            ),
            "{}",
            p.message
        );
        assert!(s.blocks_writes);
        // With the refcount block unchecked, nothing collides.
        let s = scan(
            &MemStorage::new(s_image_with_l1_on_refblock()),
            MetadataType::TEMPLATE_CACHED - MetadataType::REFCOUNT_BLOCK,
            None,
        )
        .unwrap();
        assert!(s.problems.is_empty());
    }

    fn s_image_with_l1_on_refblock() -> Vec<u8> {
        let mut img = tiny_image();
        img[3 * CS as usize + 8..3 * CS as usize + 16].copy_from_slice(&(2 * CS).to_be_bytes());
        img
    }

    #[test]
    fn a_refcount_table_at_offset_zero_opens_with_a_problem() {
        let mut img = tiny_image();
        img[48..56].copy_from_slice(&0u64.to_be_bytes());
        let s = scan(&MemStorage::new(img), MetadataType::all(), None).unwrap();
        assert!(s.blocks_writes);
        assert!(
            s.problems[0].message.contains("overlaps qcow2_header"),
            "{:?}",
            s.problems
        );
    }

    #[test]
    fn overlapping_snapshot_l1_tables_cannot_make_the_scan_unbounded() {
        // 60000 snapshots, each claiming the same 32 MiB L1 table: 30 billion bytes of "tables"
        // in a 2.7 MB file. The scan must refuse quickly instead of entering or reading them all.
        let mut img = tiny_image();
        let n = 60_000u32;
        let table = 5 * CS as usize;
        img.resize(table + n as usize * 40, 0);
        img[60..64].copy_from_slice(&n.to_be_bytes());
        img[64..72].copy_from_slice(&(5 * CS).to_be_bytes());
        for i in 0..n as usize {
            let e = table + i * 40;
            img[e..e + 8].copy_from_slice(&(3 * CS).to_be_bytes());
            img[e + 8..e + 12].copy_from_slice(&(4u32 << 20).to_be_bytes());
        }
        let st = MemStorage::new(img);
        let start = std::time::Instant::now();
        let err = scan(&st, MetadataType::all(), None).unwrap_err();
        assert!(matches!(err, ScanError::Inconsistent(_)), "{err}");
        assert!(start.elapsed().as_secs() < 10);
    }

    #[test]
    fn random_mutations_never_panic() {
        // A cheap in-process fuzz over the header and tables of a real-shaped image; the Python
        // suite (`tests/test_fuzz.py`) runs the structured corruptions through the bindings.
        let base = tiny_image();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut img = base.clone();
            for _ in 0..(next() % 6 + 1) {
                let at = if next() % 2 == 0 {
                    (next() % 112) as usize
                } else {
                    (next() % img.len() as u64) as usize
                };
                let byte = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    2 => 1 << (next() % 8),
                    _ => next() as u8,
                };
                img[at] = byte;
            }
            if next() % 8 == 0 {
                img.truncate((next() % img.len() as u64) as usize);
            }
            let _ = scan(&MemStorage::new(img), MetadataType::all(), None);
        }
    }

    #[test]
    fn a_file_cut_inside_the_header_cluster_reads_zeros_there() {
        // Cut right after the header fields: extensions, tables and all read as zeros (as in
        // QEMU), so the header still parses and the tables are simply empty.
        let img = tiny_image()[..112].to_vec();
        let s = scan(&MemStorage::new(img), MetadataType::all(), None).unwrap();
        assert_eq!(s.header.l1_size, 2);
        assert!(s.l1_table.iter().all(|&e| e == 0));
    }

    #[test]
    fn empty_and_short_files_fail_cleanly() {
        for len in [0usize, 3, 50, 99] {
            let st = MemStorage::new(tiny_image()[..len].to_vec());
            let err = scan(&st, MetadataType::all(), None).unwrap_err();
            assert!(matches!(err, ScanError::Format(_)), "{len}: {err}");
        }
    }
}
