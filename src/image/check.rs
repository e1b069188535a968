//! `check`: recompute every cluster's refcount from the metadata and compare it with the
//! refcount structures on disk, as `qemu-img check` does, and name every metadata overlap.
//!
//! The walk, in order:
//!
//! 1. The on-disk refcounts of every cluster of the file are decoded once, refcount block by
//!    refcount block, into a compact array (a byte a cluster; larger values in a side table).
//! 2. The header cluster, the active L1 table and every snapshot's L1 table are counted; the L1
//!    entries are gathered and sorted by L2 table offset, so that an L2 table referenced by the
//!    active L1 table and by several snapshots is read **once** and its entries counted with
//!    the number of references as a multiplier (the per-reference findings are multiplied in
//!    the same way, so the counters equal qemu-img's, which reads the table once per reference).
//! 3. The snapshot table, refcount table, encryption header and bitmaps are counted, then the
//!    refcount blocks (each must end with refcount 1).
//! 4. The computed refcounts are compared with the on-disk ones: too low is a corruption, too
//!    high (including "referenced by nothing") is a leak.
//! 5. COPIED flags of active L1 and L2 entries were checked during step 2 against the on-disk
//!    refcounts of step 1, so active L2 tables are not read a second time.
//! 6. Every metadata cluster was recorded with its owner; clusters with two owners that may not
//!    share them, and data clusters landing on metadata, become named [`Overlap`]s.
//!
//! Memory is bounded by the file: two byte arrays and one bit per file cluster, the list of
//! metadata clusters, and one L2 table at a time. References past the end of the file are kept
//! in a sparse table of at most [`MAX_PAST_END`] clusters.

use std::collections::{BTreeMap, HashMap};

use super::{Image, ImageError};
use crate::format::entry::{
    L1_L2_OFFSET_MASK, L1_RESERVED_MASK, L2_RESERVED_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use crate::format::refcount::{REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK};
use crate::format::{max_refcount, refcount_get, CompressedDescriptor, Geometry};
use crate::storage::Storage;

/// Reads ending past this offset fail in QEMU's block layer (the largest length it accepts:
/// 2^63 - 1 rounded down to 1 GiB), so a refcount block there cannot be read.
const MAX_IO_END: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
/// Largest snapshot L1 table QEMU accepts, in entries (32 MiB of entries).
const MAX_SNAPSHOT_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Findings kept in the report; the counters count all of them.
pub const MAX_FINDINGS: usize = 1 << 20;
/// Overlaps kept in the report; [`CheckReport::overlap_count`] counts all of them.
pub const MAX_OVERLAPS: usize = 100_000;
/// Runs of referenced clusters kept in [`CheckReport::used_runs`].
pub const MAX_RUNS: usize = 1 << 20;
/// Distinct clusters past the end of the file whose references are counted exactly.
pub const MAX_PAST_END: usize = 1 << 20;

/// How a finding counts in qemu-img's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Counted in `corruptions`.
    Corruption,
    /// Counted in `leaks`.
    Leak,
    /// Counted in `check_errors` (the check could not look at something).
    CheckError,
    /// Not counted: context for another finding (a reference past the end of the file).
    Info,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// The on-disk refcount is lower than the references found (`cluster`, `refcount`,
    /// `reference`).
    RefcountTooLow,
    /// The on-disk refcount is higher than the references found (a leak; `reference` is 0 for
    /// a cluster nothing references).
    RefcountTooHigh,
    /// The refcount of a cluster cannot be read (its refcount block is unaligned, or lies where
    /// no read can reach).
    RefcountUnreadable,
    /// More references than the refcount width can count.
    RefcountOverflow,
    /// An active L1 entry's COPIED flag disagrees with its L2 table's refcount.
    CopiedL1,
    /// An active L2 entry's COPIED flag disagrees with its data cluster's refcount.
    CopiedL2,
    /// A compressed cluster's entry has the COPIED flag.
    CopiedCompressed,
    /// An L1 entry with reserved bits set.
    L1Reserved,
    /// An L2 entry with reserved bits set.
    L2Reserved,
    /// An L1 entry whose L2 table offset is not cluster-aligned.
    L2TableUnaligned,
    /// An L2 entry whose data cluster is not cluster-aligned.
    DataUnaligned,
    /// An unaligned L2 entry that holds no data (a preallocated zero cluster).
    PreallocatedUnaligned,
    /// Extended L2: a subcluster both allocated and zero.
    SubclusterBitmap,
    /// Extended L2: an unallocated cluster with allocated subclusters.
    UnallocatedSubclusters,
    /// Extended L2: a compressed cluster with a non-zero subcluster bitmap.
    CompressedBitmap,
    /// A compressed cluster in an image with an external data file.
    CompressedDataFile,
    /// Internal snapshots in an image with an external data file.
    SnapshotsDataFile,
    /// A version 3 snapshot table entry with less than the 16 bytes of extra data version 3
    /// requires (`index` is the entry).
    SnapshotIncomplete,
    /// A snapshot L1 table that is not cluster-aligned.
    SnapshotL1Unaligned,
    /// A snapshot L1 table larger than QEMU allows.
    SnapshotL1TooLarge,
    /// A refcount table entry with reserved bits set.
    ReftableReserved,
    /// A refcount table entry pointing at an unaligned refcount block.
    RefblockUnaligned,
    /// A refcount block past the end of the image.
    RefblockOutside,
    /// A refcount block whose recomputed refcount is not 1 (it shares its cluster).
    RefblockRefcount,
    /// The bitmap directory cannot be parsed or a bitmap breaks the format's rules.
    BitmapInvalid,
    /// A bitmap table entry is invalid.
    BitmapEntry,
    /// A table could not be read.
    ReadError,
    /// A referenced region ends a cluster or more past the end of the file (`offset`, length
    /// in `entry`); it is not counted.
    PastEnd,
}

/// One problem found by [`Image::check`]. The fields that do not apply to a kind are 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What it is.
    pub kind: FindingKind,
    /// How it counts.
    pub severity: Severity,
    /// How many times it counts (an L2 table referenced by several L1 tables repeats its
    /// findings, as qemu-img counts them once per reference).
    pub times: u64,
    /// The host offset concerned (a cluster's first byte for refcount findings).
    pub offset: u64,
    /// An index: the cluster number, L1 index, refcount table index or snapshot number.
    pub index: u64,
    /// The raw table entry concerned, or the on-disk refcount.
    pub entry: u64,
    /// The recomputed reference count, where one applies.
    pub reference: u64,
    /// A name (snapshot or bitmap), where one applies.
    pub name: String,
    /// For COPIED findings and unaligned entries in active L2 tables: the host offset of the L2
    /// table holding the entry (`index` is then the active L1 index that references it), so
    /// that repair can find it.
    pub l2_table: u64,
    /// For the same findings: the entry's index in its L2 table.
    pub l2_index: u64,
}

impl Finding {
    fn new(kind: FindingKind, severity: Severity) -> Self {
        Finding {
            kind,
            severity,
            times: 1,
            offset: 0,
            index: 0,
            entry: 0,
            reference: 0,
            name: String::new(),
            l2_table: 0,
            l2_index: 0,
        }
    }

    /// The kind's short name, for bindings and JSON (`refcount-too-low`, ...).
    pub fn kind_name(&self) -> &'static str {
        use FindingKind as K;
        match self.kind {
            K::RefcountTooLow => "refcount-too-low",
            K::RefcountTooHigh => {
                if self.reference == 0 {
                    "leaked-cluster"
                } else {
                    "refcount-too-high"
                }
            }
            K::RefcountUnreadable => "refcount-unreadable",
            K::RefcountOverflow => "refcount-overflow",
            K::CopiedL1 => "copied-flag-l1",
            K::CopiedL2 => "copied-flag-l2",
            K::CopiedCompressed => "copied-flag-compressed",
            K::L1Reserved => "l1-reserved-bits",
            K::L2Reserved => "l2-reserved-bits",
            K::L2TableUnaligned => "l2-table-unaligned",
            K::DataUnaligned => "data-unaligned",
            K::PreallocatedUnaligned => "preallocated-unaligned",
            K::SubclusterBitmap => "subcluster-bitmap",
            K::UnallocatedSubclusters => "unallocated-subclusters",
            K::CompressedBitmap => "compressed-bitmap",
            K::CompressedDataFile => "compressed-data-file",
            K::SnapshotsDataFile => "snapshots-data-file",
            K::SnapshotIncomplete => "snapshot-entry-incomplete",
            K::SnapshotL1Unaligned => "snapshot-l1-unaligned",
            K::SnapshotL1TooLarge => "snapshot-l1-too-large",
            K::ReftableReserved => "reftable-reserved-bits",
            K::RefblockUnaligned => "refblock-unaligned",
            K::RefblockOutside => "refblock-outside-image",
            K::RefblockRefcount => "refblock-refcount",
            K::BitmapInvalid => "bitmap-invalid",
            K::BitmapEntry => "bitmap-table-entry",
            K::ReadError => "read-error",
            K::PastEnd => "past-end-of-file",
        }
    }

    /// The severity's short name (`corruption`, `leak`, `check-error`, `info`).
    pub fn severity_name(&self) -> &'static str {
        match self.severity {
            Severity::Corruption => "corruption",
            Severity::Leak => "leak",
            Severity::CheckError => "check-error",
            Severity::Info => "info",
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use FindingKind as K;
        let times = if self.times > 1 {
            format!(
                " (counted {} times: one per reference to its L2 table)",
                self.times
            )
        } else {
            String::new()
        };
        let (i, o, e, r, n) = (
            self.index,
            self.offset,
            self.entry,
            self.reference,
            &self.name,
        );
        match self.kind {
            K::RefcountTooLow => write!(f, "ERROR cluster {i} refcount={e} reference={r}"),
            K::RefcountTooHigh => write!(f, "Leaked cluster {i} refcount={e} reference={r}"),
            K::RefcountUnreadable => write!(
                f,
                "ERROR cannot read the refcounts of {} clusters from cluster {i}: their \
                 refcount block at {o:#x} is unaligned or out of reach",
                self.times
            ),
            K::RefcountOverflow => write!(
                f,
                "ERROR refcount overflow: cluster at {o:#x} has more references than \
                 refcount entries can count"
            ),
            K::CopiedL1 => write!(
                f,
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={r}"
            ),
            K::CopiedL2 => write!(
                f,
                "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}{times}"
            ),
            K::CopiedCompressed => write!(
                f,
                "ERROR compressed cluster at coffset={o:#x} has the COPIED flag set{times}"
            ),
            K::L1Reserved => write!(f, "ERROR L1 entry {i} has reserved bits set: {e:x}"),
            K::L2Reserved => write!(f, "ERROR L2 entry has reserved bits set: {e:x}{times}"),
            K::L2TableUnaligned => write!(
                f,
                "ERROR l2_offset={o:x}: L2 table is not cluster-aligned (L1 index {i})"
            ),
            K::DataUnaligned => write!(
                f,
                "ERROR offset={o:x}: data cluster is not cluster-aligned (L2 entry {e:x}){times}"
            ),
            K::PreallocatedUnaligned => write!(
                f,
                "ERROR offset={o:x}: preallocated cluster is not cluster-aligned \
                 (L2 entry {e:x}){times}"
            ),
            K::SubclusterBitmap => write!(
                f,
                "ERROR offset={o:x}: subclusters both allocated and zero (bitmap {r:#x}){times}"
            ),
            K::UnallocatedSubclusters => write!(
                f,
                "ERROR unallocated cluster with allocated subclusters (bitmap {r:#x}){times}"
            ),
            K::CompressedBitmap => write!(
                f,
                "ERROR compressed cluster {i} has a subcluster bitmap, entry={e:#x}{times}"
            ),
            K::CompressedDataFile => write!(
                f,
                "ERROR compressed cluster {i} in an image with a data file, entry={e:#x}{times}"
            ),
            K::SnapshotsDataFile => {
                write!(
                    f,
                    "ERROR {i} snapshots in an image with an external data file"
                )
            }
            K::SnapshotIncomplete => write!(
                f,
                "ERROR snapshot table entry {i} is incomplete: {e} bytes of extra data, \
                 version 3 needs 16"
            ),
            K::SnapshotL1Unaligned => write!(
                f,
                "ERROR snapshot {n} l1_offset={o:#x}: L1 table is not cluster-aligned"
            ),
            K::SnapshotL1TooLarge => write!(
                f,
                "ERROR snapshot {n} l1_size={e:#x}: L1 table is larger than QEMU allows"
            ),
            K::ReftableReserved => {
                write!(f, "ERROR refcount table entry {i} has reserved bits set")
            }
            K::RefblockUnaligned => write!(
                f,
                "ERROR refcount block {i} at {o:#x} is not cluster-aligned"
            ),
            K::RefblockOutside => {
                write!(f, "ERROR refcount block {i} at {o:#x} is outside the image")
            }
            K::RefblockRefcount => write!(
                f,
                "ERROR refcount block {i} at {o:#x} refcount={r} (shares its cluster)"
            ),
            K::BitmapInvalid => write!(f, "ERROR bitmap {n}: invalid"),
            K::BitmapEntry => write!(f, "ERROR bitmap {n}: table entry {i} is invalid: {e:#x}"),
            K::ReadError => write!(f, "ERROR cannot read {n} at {o:#x}"),
            K::PastEnd => write!(
                f,
                "ERROR reference to {e:#x} bytes at {o:#x} ends a cluster or more past the end \
                 of the file (not counted){times}"
            ),
        }
    }
}

/// A structure that owns clusters of the file, for naming overlaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The header cluster.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// The refcount table.
    RefcountTable,
    /// Refcount block of this refcount table index.
    RefcountBlock(u64),
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of snapshot number `n` (0-based in the snapshot table).
    SnapshotL1(u32),
    /// The L2 table of this active L1 index.
    ActiveL2(u64),
    /// The L2 table of snapshot `n`, L1 index `i`.
    SnapshotL2(u32, u64),
    /// The bitmap directory.
    BitmapDirectory,
    /// The table of bitmap `n`.
    BitmapTable(u32),
    /// Data cluster `i` of bitmap `n`.
    BitmapData(u32, u64),
    /// The encryption header.
    CryptoHeader,
    /// A guest data cluster: active (`None`) or of a snapshot, at a guest offset.
    Data(Option<u32>, u64),
}

impl Owner {
    /// The owner's short type name (`active-l2`, `refcount-block`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Owner::Header => "header",
            Owner::ActiveL1 => "active-l1",
            Owner::RefcountTable => "refcount-table",
            Owner::RefcountBlock(_) => "refcount-block",
            Owner::SnapshotTable => "snapshot-table",
            Owner::SnapshotL1(_) => "inactive-l1",
            Owner::ActiveL2(_) => "active-l2",
            Owner::SnapshotL2(..) => "inactive-l2",
            Owner::BitmapDirectory => "bitmap-directory",
            Owner::BitmapTable(_) => "bitmap-table",
            Owner::BitmapData(..) => "bitmap-data",
            Owner::CryptoHeader => "crypto-header",
            Owner::Data(..) => "data",
        }
    }

    /// The L1 table an L2 table hangs from (`Some(None)` active, `Some(Some(n))` snapshot).
    fn l1_source(&self) -> Option<Option<u32>> {
        match self {
            Owner::ActiveL2(_) => Some(None),
            Owner::SnapshotL2(s, _) => Some(Some(*s)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Header => f.write_str("the header"),
            Owner::ActiveL1 => f.write_str("the active L1 table"),
            Owner::RefcountTable => f.write_str("the refcount table"),
            Owner::RefcountBlock(i) => write!(f, "refcount block {i}"),
            Owner::SnapshotTable => f.write_str("the snapshot table"),
            Owner::SnapshotL1(s) => write!(f, "the L1 table of snapshot {}", s + 1),
            Owner::ActiveL2(i) => write!(f, "L2 table of L1 index {i}"),
            Owner::SnapshotL2(s, i) => write!(f, "L2 table of snapshot {} L1 index {i}", s + 1),
            Owner::BitmapDirectory => f.write_str("the bitmap directory"),
            Owner::BitmapTable(b) => write!(f, "the table of bitmap {}", b + 1),
            Owner::BitmapData(b, i) => write!(f, "data cluster {i} of bitmap {}", b + 1),
            Owner::CryptoHeader => f.write_str("the encryption header"),
            Owner::Data(None, g) => write!(f, "data cluster of guest offset {g:#x}"),
            Owner::Data(Some(s), g) => {
                write!(f, "data cluster of snapshot {} guest offset {g:#x}", s + 1)
            }
        }
    }
}

/// Two structures sharing a cluster that may not share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The structure recorded first.
    pub first: Owner,
    /// Its start offset.
    pub first_offset: u64,
    /// The structure that lands on it.
    pub second: Owner,
    /// Its start offset.
    pub second_offset: u64,
    /// The first byte of the shared cluster.
    pub cluster_offset: u64,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {:#x} overlaps {} at {:#x}",
            self.second, self.second_offset, self.first, self.first_offset
        )?;
        if self.cluster_offset != self.first_offset || self.cluster_offset != self.second_offset {
            write!(f, " (in the cluster at {:#x})", self.cluster_offset)?;
        }
        Ok(())
    }
}

/// The result of [`Image::check`]: qemu-img's counters, every finding, every overlap.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Refcounts too low and other errors that may damage data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Things the check could not examine.
    pub check_errors: u64,
    /// Corruptions repaired (0 unless the report comes from [`Image::repair`]).
    pub corruptions_fixed: u64,
    /// Leaks repaired (0 unless the report comes from [`Image::repair`]).
    pub leaks_fixed: u64,
    /// One past the last cluster in use (by refcount or by reference), in bytes.
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1 table.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not right after the previous one in their L2 table.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// The findings (at most [`MAX_FINDINGS`]).
    pub findings: Vec<Finding>,
    /// All findings, kept or not.
    pub finding_count: u64,
    /// The overlaps (at most [`MAX_OVERLAPS`]).
    pub overlaps: Vec<Overlap>,
    /// All overlaps, kept or not.
    pub overlap_count: u64,
    /// Runs `(first cluster, clusters)` of the file's clusters that something references (at
    /// most [`MAX_RUNS`]; past that the last run grows to cover the rest).
    pub used_runs: Vec<(u64, u64)>,
    /// What a repair found before it started (the findings' lines), then what it did, one line
    /// each in qemu-img's words (`Repairing cluster ...`), and what it left alone on purpose;
    /// empty for a plain check.
    pub repair_log: Vec<String>,
}

impl CheckReport {
    fn add(&mut self, f: Finding) {
        match f.severity {
            Severity::Corruption => self.corruptions += f.times,
            Severity::Leak => self.leaks += f.times,
            Severity::CheckError => self.check_errors += f.times,
            Severity::Info => {}
        }
        self.finding_count += 1;
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(f);
        }
    }

    fn overlap(&mut self, o: Overlap) {
        self.overlap_count += 1;
        if self.overlaps.len() < MAX_OVERLAPS {
            self.overlaps.push(o);
        }
    }

    /// qemu-img's exit status for this result: 0 clean, 1 check not completed (check errors),
    /// 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Per-cluster counts: 8 bits a cluster up to the file's end, values from 255 up in a side
/// table (a cluster shared by more than 254 references is rare), clusters past the end in a
/// sparse table.
pub(crate) struct Counts {
    small: Vec<u8>,
    big: HashMap<u64, u64>,
    past: BTreeMap<u64, u64>,
}

impl Counts {
    fn new(clusters: u64) -> Result<Self, ImageError> {
        let n = usize::try_from(clusters).map_err(|_| oom())?;
        let mut small = Vec::new();
        small.try_reserve_exact(n).map_err(|_| oom())?;
        small.resize(n, 0);
        Ok(Counts {
            small,
            big: HashMap::new(),
            past: BTreeMap::new(),
        })
    }

    /// Clusters held in the dense part (the file's clusters).
    pub(crate) fn dense_len(&self) -> u64 {
        self.small.len() as u64
    }

    /// The clusters past the end of the file that have a count, with it.
    pub(crate) fn past_end(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.past.iter().map(|(&k, &v)| (k, v))
    }

    /// Removes one from a cluster's count (not below 0).
    pub(crate) fn decrement(&mut self, c: u64) {
        let v = self.get(c);
        if v > 0 {
            self.set(c, v - 1);
        }
    }

    /// The count of cluster `c`.
    pub(crate) fn get(&self, c: u64) -> u64 {
        match self.small.get(c as usize) {
            Some(&u8::MAX) => self.big.get(&c).copied().unwrap_or(u64::from(u8::MAX)),
            Some(&v) => u64::from(v),
            None => self.past.get(&c).copied().unwrap_or(0),
        }
    }

    /// Sets a count; `false` when a past-the-end cluster could not be recorded (table full).
    fn set(&mut self, c: u64, v: u64) -> bool {
        match self.small.get_mut(c as usize) {
            Some(slot) => {
                if v >= u64::from(u8::MAX) {
                    *slot = u8::MAX;
                    self.big.insert(c, v);
                } else {
                    if *slot == u8::MAX {
                        self.big.remove(&c);
                    }
                    *slot = v as u8;
                }
                true
            }
            None => {
                if self.past.len() >= MAX_PAST_END && !self.past.contains_key(&c) {
                    return false;
                }
                self.past.insert(c, v);
                true
            }
        }
    }
}

fn oom() -> ImageError {
    ImageError::Unsupported("not enough memory for the check's refcount arrays".into())
}

/// A reference from an L1 table to an L2 table.
#[derive(Debug, Clone, Copy)]
struct L1Ref {
    l2_offset: u64,
    /// `None`: active; `Some(n)`: snapshot n.
    source: Option<u32>,
    l1_index: u64,
}

/// The state of one check.
struct Checker<'a> {
    img: &'a Image,
    storage: &'a dyn Storage,
    g: Geometry,
    cs: u64,
    cb: u32,
    order: u32,
    refcount_max: u64,
    data_file: bool,
    file_clusters: u64,
    /// On-disk refcounts of the file's clusters.
    disk: Counts,
    /// Refcount table indices whose block is unaligned: their refcounts cannot be read.
    unreadable_blocks: Vec<u64>,
    /// Recomputed references.
    refs: Counts,
    /// Metadata clusters and their owners (`(cluster, owner, owner start offset)`).
    owners: Vec<(u64, Owner, u64)>,
    /// One bit per file cluster: some metadata owns it (set before data clusters are walked).
    meta_bits: Vec<u64>,
    /// Whether metadata lies past the end of the file.
    meta_past_end: bool,
    report: CheckReport,
    progress: &'a mut dyn FnMut(u64, u64),
    /// The clusters counted for the refcount table and the refcount blocks (once each time
    /// they were counted), so that a rebuild can subtract them.
    refcount_structures: Vec<u64>,
}

impl Image {
    /// Checks the image as `qemu-img check` does and names every metadata overlap; see the
    /// module documentation for the walk. Reads every table once; does not write.
    pub fn check(&self) -> Result<CheckReport, ImageError> {
        self.check_with_progress(&mut |_, _| {})
    }

    /// [`Image::check`], calling `progress(done, total)` as L2 tables are walked.
    pub fn check_with_progress(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport, ImageError> {
        self.check_counts(progress).map(|(report, _)| report)
    }

    /// The check, also returning the recomputed reference counts without the references of the
    /// refcount table and refcount blocks themselves: what a rebuilt refcount structure must
    /// hold (before counting its own clusters). Read-only handles only (a writable one checks
    /// through a fresh view).
    pub(crate) fn check_counts(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(CheckReport, Counts), ImageError> {
        // A writable handle's tables have moved on since its scan: check what its flush put on
        // disk, through a fresh read-only view of the same storage.
        if self.writer.is_some() {
            self.flush()?;
            let view = Image::from_storage(
                std::sync::Arc::clone(&self.storage),
                super::OpenOptions::default(),
            )?;
            return view.check_counts(progress);
        }
        let h = self.header();
        let g = self.geometry;
        let cs = g.cluster_size();
        let file_clusters = self.file_len().div_ceil(cs);
        let order = h.refcount_order;
        let refcount_max = max_refcount(order)
            .ok_or_else(|| ImageError::Unsupported(format!("refcount order {order}")))?;
        let meta_words = usize::try_from(file_clusters.div_ceil(64)).map_err(|_| oom())?;
        let mut meta_bits = Vec::new();
        meta_bits.try_reserve_exact(meta_words).map_err(|_| oom())?;
        meta_bits.resize(meta_words, 0);
        let mut c = Checker {
            img: self,
            storage: self.storage.as_ref(),
            g,
            cs,
            cb: g.cluster_bits(),
            order,
            refcount_max,
            data_file: h.has_external_data_file(),
            file_clusters,
            disk: Counts::new(file_clusters)?,
            unreadable_blocks: Vec::new(),
            refs: Counts::new(file_clusters)?,
            owners: Vec::new(),
            meta_bits,
            meta_past_end: false,
            report: CheckReport::default(),
            progress,
            refcount_structures: Vec::new(),
        };
        // The virtual size in whole 512-byte sectors, in clusters (as qemu-img counts it).
        c.report.total_clusters = (h.size / 512 * 512).div_ceil(cs);
        c.load_disk_refcounts()?;
        c.run()?;
        let mut counts = c.refs;
        for k in c.refcount_structures {
            counts.decrement(k);
        }
        Ok((c.report, counts))
    }
}

impl Checker<'_> {
    fn read(&mut self, offset: u64, len: u64, what: &str) -> Option<Vec<u8>> {
        let n = usize::try_from(len).ok()?;
        let mut buf = Vec::new();
        if buf.try_reserve_exact(n).is_err() {
            let mut f = Finding::new(FindingKind::ReadError, Severity::CheckError);
            f.offset = offset;
            f.name = format!("{what} (out of memory)");
            self.report.add(f);
            return None;
        }
        buf.resize(n, 0);
        match self.storage.read_padded(offset, &mut buf) {
            Ok(()) => Some(buf),
            Err(e) => {
                let mut f = Finding::new(FindingKind::ReadError, Severity::CheckError);
                f.offset = offset;
                f.name = format!("{what} ({e})");
                self.report.add(f);
                None
            }
        }
    }

    /// Step 1: decode every refcount block covering the file.
    fn load_disk_refcounts(&mut self) -> Result<(), ImageError> {
        let per_block = (self.cs * 8) >> self.order;
        let blocks = self.file_clusters.div_ceil(per_block);
        let img = self.img;
        let reftable = &img.scanned.refcount_table;
        let n = (blocks as usize).min(reftable.len());
        let mut buf = vec![0u8; self.cs as usize];
        for (i, &e) in reftable.iter().enumerate().take(n) {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % self.cs != 0 || off.saturating_add(self.cs) > MAX_IO_END {
                self.unreadable_blocks.push(i as u64);
                continue;
            }
            if let Err(err) = self.storage.read_padded(off, &mut buf) {
                let mut f = Finding::new(FindingKind::ReadError, Severity::CheckError);
                f.offset = off;
                f.name = format!("refcount block {i} ({err})");
                self.report.add(f);
                continue;
            }
            let first = i as u64 * per_block;
            let last = (first + per_block).min(self.file_clusters);
            decode_block(&buf, self.order, first, last, &mut self.disk);
        }
        Ok(())
    }

    /// The on-disk refcount of any cluster; `None` when its refcount block is unaligned.
    fn disk_refcount(&mut self, cluster: u64) -> Option<u64> {
        if cluster < self.file_clusters {
            let per_block = (self.cs * 8) >> self.order;
            if !self.unreadable_blocks.is_empty()
                && self
                    .unreadable_blocks
                    .binary_search(&(cluster / per_block))
                    .is_ok()
            {
                return None;
            }
            return Some(self.disk.get(cluster));
        }
        self.disk_refcount_past_end(cluster)
    }

    fn disk_refcount_past_end(&mut self, cluster: u64) -> Option<u64> {
        let per_block = (self.cs * 8) >> self.order;
        let idx = cluster / per_block;
        let e = match self.img.scanned.refcount_table.get(idx as usize) {
            Some(&e) => e,
            None => return Some(0),
        };
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Some(0);
        }
        if off % self.cs != 0 || off.saturating_add(self.cs) > MAX_IO_END {
            return None;
        }
        let mut buf = vec![0u8; self.cs as usize];
        if self.storage.read_padded(off, &mut buf).is_err() {
            return None;
        }
        refcount_get(&buf, (cluster % per_block) as usize, self.order).ok()
    }

    /// Adds `times` references to every cluster of `[offset, offset + len)`.
    fn inc(&mut self, offset: u64, len: u64, times: u64) {
        if len == 0 || times == 0 {
            return;
        }
        // A region ending a cluster or more past the end of the file is not counted: it is a
        // corruption of its own (as in qemu-img, which would otherwise grow its array without
        // bound).
        let file_len = self.img.file_len();
        if offset.saturating_add(len) >= file_len.saturating_add(self.cs) {
            let mut f = Finding::new(FindingKind::PastEnd, Severity::Corruption);
            f.offset = offset;
            f.index = offset >> self.cb;
            f.entry = len;
            f.times = times;
            self.report.add(f);
            return;
        }
        let first = offset >> self.cb;
        let last = match offset.checked_add(len - 1) {
            Some(l) => l >> self.cb,
            None => u64::MAX >> self.cb,
        };
        for k in first..=last {
            self.inc_cluster(k, times);
        }
    }

    fn inc_cluster(&mut self, k: u64, times: u64) {
        // Fast path: a small count with room to grow.
        let limit = self.refcount_max.min(u64::from(u8::MAX) - 1);
        if let Some(slot) = self.refs.small.get_mut(k as usize) {
            if let Some(v) = u64::from(*slot).checked_add(times) {
                if v <= limit {
                    *slot = v as u8;
                    return;
                }
            }
        }
        let cur = self.refs.get(k);
        let room = self.refcount_max - cur.min(self.refcount_max);
        let added = times.min(room);
        if added > 0 && !self.refs.set(k, cur + added) {
            // Too many distinct clusters past the end: count the reference as the error that
            // qemu-img would report for it (refcount 0, reference 1).
            let mut f = Finding::new(FindingKind::RefcountTooLow, Severity::Corruption);
            f.index = k;
            f.offset = k << self.cb;
            f.reference = added;
            self.report.add(f);
        }
        if added < times {
            let mut f = Finding::new(FindingKind::RefcountOverflow, Severity::Corruption);
            f.offset = k << self.cb;
            f.index = k;
            f.times = times - added;
            self.report.add(f);
        }
    }

    /// Records `owner` on the clusters of `[offset, offset + len)` (at most the file's clusters
    /// plus one past it, so that absurd lengths stay cheap).
    fn own(&mut self, owner: Owner, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cb;
        let last = offset.saturating_add(len - 1) >> self.cb;
        let last = last.min(first.saturating_add(self.file_clusters));
        for k in first..=last {
            self.owners.push((k, owner, offset));
            if k < self.file_clusters {
                self.meta_bits[(k / 64) as usize] |= 1 << (k % 64);
            } else {
                self.meta_past_end = true;
            }
        }
    }

    fn is_meta(&self, k: u64) -> bool {
        if k < self.file_clusters {
            self.meta_bits[(k / 64) as usize] & (1 << (k % 64)) != 0
        } else {
            self.meta_past_end
        }
    }

    /// A data cluster (or compressed range) of `owner` lands on metadata: name the pair.
    fn data_on_meta(&mut self, owner: Owner, offset: u64, k: u64) {
        let start = self.owners.partition_point(|o| o.0 < k);
        let hits: Vec<(Owner, u64)> = self.owners[start..]
            .iter()
            .take_while(|o| o.0 == k)
            .take(4)
            .map(|o| (o.1, o.2))
            .collect();
        for (first, first_offset) in hits {
            self.report.overlap(Overlap {
                first,
                first_offset,
                second: owner,
                second_offset: offset,
                cluster_offset: k << self.cb,
            });
        }
    }

    fn run(&mut self) -> Result<(), ImageError> {
        let img = self.img;
        let h = img.header();
        let cs = self.cs;

        // The snapshot table entries themselves (qemu-img checks them first).
        if h.version >= 3 {
            for (n, sn) in img.snapshots().iter().enumerate() {
                if sn.extra_data_size() < 16 {
                    let mut f = Finding::new(FindingKind::SnapshotIncomplete, Severity::Corruption);
                    f.index = n as u64;
                    f.entry = u64::from(sn.extra_data_size());
                    self.report.add(f);
                }
            }
        }

        // The header cluster, the active L1 table, the snapshot L1 tables.
        self.inc(0, cs, 1);
        self.own(Owner::Header, 0, cs);
        let mut refs: Vec<L1Ref> = Vec::new();
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > 0 {
            self.inc(h.l1_table_offset, l1_bytes, 1);
            self.own(Owner::ActiveL1, h.l1_table_offset, l1_bytes);
            if let Some(bytes) = self.read(h.l1_table_offset, l1_bytes, "the active L1 table") {
                self.gather_l1(&bytes, None, &mut refs);
            }
        }
        let snapshots = img.snapshots();
        if self.data_file && !snapshots.is_empty() {
            let mut f = Finding::new(FindingKind::SnapshotsDataFile, Severity::Corruption);
            f.index = snapshots.len() as u64;
            self.report.add(f);
        }
        for (n, sn) in snapshots.iter().enumerate() {
            let name = format!("{} ({})", sn.id, sn.name);
            if sn.l1_table_offset % cs != 0 {
                let mut f = Finding::new(FindingKind::SnapshotL1Unaligned, Severity::Corruption);
                f.offset = sn.l1_table_offset;
                f.index = n as u64;
                f.name = name;
                self.report.add(f);
                continue;
            }
            if u64::from(sn.l1_size) > MAX_SNAPSHOT_L1_ENTRIES {
                let mut f = Finding::new(FindingKind::SnapshotL1TooLarge, Severity::Corruption);
                f.entry = u64::from(sn.l1_size);
                f.index = n as u64;
                f.name = name;
                self.report.add(f);
                continue;
            }
            let bytes = u64::from(sn.l1_size) * 8;
            if bytes == 0 {
                continue;
            }
            self.inc(sn.l1_table_offset, bytes, 1);
            self.own(Owner::SnapshotL1(n as u32), sn.l1_table_offset, bytes);
            if let Some(t) = self.read(sn.l1_table_offset, bytes, "a snapshot L1 table") {
                self.gather_l1(&t, Some(n as u32), &mut refs);
            }
        }

        // The other metadata, recorded before the data clusters are walked.
        let snap_bytes = if h.nb_snapshots > 0 {
            img.scanned.snapshot_table_bytes
        } else {
            0
        };
        self.inc(h.snapshots_offset, snap_bytes, 1);
        self.own(Owner::SnapshotTable, h.snapshots_offset, snap_bytes);
        let rt_bytes = img.scanned.refcount_table.len() as u64 * 8;
        self.inc(h.refcount_table_offset, rt_bytes, 1);
        self.own(Owner::RefcountTable, h.refcount_table_offset, rt_bytes);
        if rt_bytes > 0
            && h.refcount_table_offset.saturating_add(rt_bytes) < img.file_len().saturating_add(cs)
        {
            let first = h.refcount_table_offset >> self.cb;
            let last = (h.refcount_table_offset + rt_bytes - 1) >> self.cb;
            self.refcount_structures.extend(first..=last);
        }
        if let Some((offset, length)) = h.crypto_header() {
            self.inc(offset, length, 1);
            self.own(Owner::CryptoHeader, offset, length);
        }
        self.bitmaps();
        let reftable = img.scanned.refcount_table.clone();
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off != 0 && e & REFTABLE_RESERVED_MASK == 0 {
                self.own(Owner::RefcountBlock(i as u64), off, cs);
            }
        }
        for r in &refs {
            let owner = match r.source {
                None => Owner::ActiveL2(r.l1_index),
                Some(s) => Owner::SnapshotL2(s, r.l1_index),
            };
            self.own(owner, r.l2_offset, cs);
        }
        self.owners.sort_by_key(|o| o.0);

        // The L2 tables, each read once.
        self.walk_l2_tables(&mut refs);

        // The refcount blocks, last: each must now have exactly one reference.
        self.refblocks(&reftable);

        self.compare();
        self.overlaps();
        // qemu-img reports COPIED flags last (it checks them in a second pass).
        self.report
            .findings
            .sort_by_key(|f| matches!(f.kind, FindingKind::CopiedL1 | FindingKind::CopiedL2));
        Ok(())
    }

    fn gather_l1(&mut self, bytes: &[u8], source: Option<u32>, refs: &mut Vec<L1Ref>) {
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED_MASK != 0 {
                let mut f = Finding::new(FindingKind::L1Reserved, Severity::Corruption);
                f.index = i as u64;
                f.entry = e;
                self.report.add(f);
            }
            let l2 = e & L1_L2_OFFSET_MASK;
            // Counted even when 0 (QEMU counts cluster 0 for an entry with only flag bits).
            self.inc(l2, self.cs, 1);
            if l2 % self.cs != 0 {
                let mut f = Finding::new(FindingKind::L2TableUnaligned, Severity::Corruption);
                f.offset = l2;
                f.index = i as u64;
                self.report.add(f);
            }
            if source.is_none() {
                // COPIED flag of the L1 entry against the L2 table's on-disk refcount.
                if l2 != 0 {
                    if let Some(rc) = self.disk_refcount(l2 >> self.cb) {
                        if (rc == 1) != (e & OFLAG_COPIED != 0) {
                            let mut f = Finding::new(FindingKind::CopiedL1, Severity::Corruption);
                            f.index = i as u64;
                            f.entry = e;
                            f.reference = rc;
                            f.offset = l2;
                            self.report.add(f);
                        }
                    }
                }
            }
            refs.push(L1Ref {
                l2_offset: l2,
                source,
                l1_index: i as u64,
            });
        }
    }

    fn bitmaps(&mut self) {
        let img = self.img;
        let Some(ext) = img.header().active_bitmaps_ext() else {
            return;
        };
        if ext.nb_bitmaps == 0 {
            return;
        }
        self.inc(ext.dir_offset, ext.dir_size, 1);
        self.own(Owner::BitmapDirectory, ext.dir_offset, ext.dir_size);
        let bitmaps = img.bitmaps();
        if bitmaps.len() as u64 != u64::from(ext.nb_bitmaps) {
            let mut f = Finding::new(FindingKind::BitmapInvalid, Severity::Corruption);
            f.name = "directory".into();
            self.report.add(f);
            return;
        }
        for (n, bm) in bitmaps.iter().enumerate() {
            let tbytes = bm.table_bytes();
            self.inc(bm.table_offset, tbytes, 1);
            self.own(Owner::BitmapTable(n as u32), bm.table_offset, tbytes);
            let Some(t) = self.read(bm.table_offset, tbytes, "a bitmap table") else {
                continue;
            };
            for (i, c) in t.chunks_exact(8).enumerate() {
                let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                let entry = crate::format::BitmapTableEntry(e);
                if entry.check(self.cs).is_err() {
                    let mut f = Finding::new(FindingKind::BitmapEntry, Severity::Corruption);
                    f.index = i as u64;
                    f.entry = e;
                    f.name = bm.name.clone();
                    self.report.add(f);
                    continue;
                }
                let off = entry.offset().0;
                if off != 0 {
                    self.inc(off, self.cs, 1);
                    self.own(Owner::BitmapData(n as u32, i as u64), off, self.cs);
                }
            }
        }
    }

    fn walk_l2_tables(&mut self, refs: &mut [L1Ref]) {
        refs.sort_by_key(|r| (r.l2_offset, r.source.map_or(0, |s| u64::from(s) + 1)));
        let total = refs.len() as u64;
        let table_bytes = self.g.l2_entries() * self.g.l2_entry_size();
        let mut buf = vec![0u8; table_bytes as usize];
        let mut start = 0;
        let mut done = 0u64;
        while start < refs.len() {
            let off = refs[start].l2_offset;
            let end = start + refs[start..].partition_point(|r| r.l2_offset == off);
            let group = &refs[start..end];
            let times = group.len() as u64;
            let active = group.iter().filter(|r| r.source.is_none()).count() as u64;
            let first = group[0];
            start = end;
            done += times;
            if done % 256 < times {
                (self.progress)(done, total);
            }
            if let Err(e) = self.storage.read_padded(off, &mut buf) {
                let mut f = Finding::new(FindingKind::ReadError, Severity::CheckError);
                f.offset = off;
                f.name = format!("an L2 table ({e})");
                self.report.add(f);
                continue;
            }
            let l2 = std::mem::take(&mut buf);
            self.l2_table(&l2, first, times, active);
            buf = l2;
        }
        (self.progress)(total, total);
    }

    /// Counts the entries of one L2 table referenced `times` times, `active` of them from the
    /// active L1 table; `first` names it in overlaps.
    fn l2_table(&mut self, table: &[u8], first: L1Ref, times: u64, active: u64) {
        let ext = self.g.is_extended_l2();
        let esz = self.g.l2_entry_size() as usize;
        let cs = self.cs;
        let guest_base = first.l1_index.saturating_mul(self.g.bytes_per_l1_entry());
        let mut next_contiguous = 0u64;
        let (mut allocated, mut fragmented) = (0u64, 0u64);
        // The fast path below handles clusters that lie in the file, in an image without an
        // external data file, whose refcounts are all readable.
        let fast_end = if self.data_file || !self.unreadable_blocks.is_empty() {
            0
        } else {
            self.img.file_len().min(self.file_clusters << self.cb)
        };
        let copied_pass = active > 0 && first.l2_offset != 0;
        for (i, c) in table.chunks_exact(esz).enumerate() {
            let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            let bitmap = if ext {
                u64::from_be_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]])
            } else {
                0
            };
            if e == 0 && bitmap == 0 {
                continue;
            }
            // Fast path: a standard, aligned data cluster inside the file, nothing odd about it.
            let offset = e & L1_L2_OFFSET_MASK;
            if !ext
                && e & (OFLAG_COMPRESSED | L2_RESERVED_MASK | OFLAG_ZERO) == 0
                && offset != 0
                && offset & (cs - 1) == 0
                && offset < fast_end
            {
                let k = offset >> self.cb;
                if active > 0 {
                    allocated += active;
                    if next_contiguous != 0 && offset != next_contiguous {
                        fragmented += active;
                    }
                    next_contiguous = offset + cs;
                }
                self.inc_cluster(k, times);
                if self.meta_bits[(k / 64) as usize] & (1 << (k % 64)) != 0 {
                    let guest = guest_base.saturating_add((i as u64) << self.cb);
                    self.data_on_meta(Owner::Data(first.source, guest), offset, k);
                }
                if copied_pass {
                    let rc = match self.disk.small[k as usize] {
                        u8::MAX => self.disk.get(k),
                        v => u64::from(v),
                    };
                    if (rc == 1) != (e & OFLAG_COPIED != 0) {
                        let mut f = Finding::new(FindingKind::CopiedL2, Severity::Corruption);
                        f.index = first.l1_index;
                        f.l2_table = first.l2_offset;
                        f.l2_index = i as u64;
                        f.entry = e;
                        f.reference = rc;
                        f.offset = offset;
                        f.times = active;
                        self.report.add(f);
                    }
                }
                continue;
            }
            let compressed = e & OFLAG_COMPRESSED != 0;
            let guest = guest_base.saturating_add((i as u64) << self.cb);
            let data_owner = Owner::Data(first.source, guest);
            if !compressed && e & L2_RESERVED_MASK != 0 {
                self.l2_finding(FindingKind::L2Reserved, e, 0, i, times);
            }
            if compressed {
                if e & OFLAG_COPIED != 0 {
                    let d = CompressedDescriptor::from_entry(e & !OFLAG_COPIED, self.cb);
                    let mut f = Finding::new(FindingKind::CopiedCompressed, Severity::Corruption);
                    f.offset = d.map_or(0, |d| d.host_offset.0);
                    f.entry = e;
                    f.times = times;
                    self.report.add(f);
                }
                if self.data_file {
                    self.l2_finding(FindingKind::CompressedDataFile, e, 0, i, times);
                    continue;
                }
                if bitmap != 0 {
                    self.l2_finding(FindingKind::CompressedBitmap, e, bitmap, i, times);
                    continue;
                }
                let Some((start, end)) =
                    CompressedDescriptor::from_entry(e & !OFLAG_COPIED, self.cb)
                        .and_then(|d| d.data_range())
                else {
                    continue;
                };
                self.inc(start, end - start, times);
                for k in (start >> self.cb)..=((end - 1) >> self.cb) {
                    if self.is_meta(k) {
                        self.data_on_meta(data_owner, start, k);
                    }
                }
                if active > 0 {
                    self.report.allocated_clusters += active;
                    self.report.compressed_clusters += active;
                    self.report.fragmented_clusters += active;
                }
                continue;
            }
            let zero = !ext && e & OFLAG_ZERO != 0;
            let unallocated = offset == 0 && (zero || !(self.data_file && e & OFLAG_COPIED != 0));
            if unallocated {
                if ext && bitmap & 0xffff_ffff != 0 {
                    self.l2_finding(FindingKind::UnallocatedSubclusters, e, bitmap, i, times);
                }
                continue;
            }
            // A normal or preallocated-zero cluster.
            if ext && (bitmap >> 32) & bitmap != 0 {
                self.l2_finding(FindingKind::SubclusterBitmap, e, bitmap, i, times);
            }
            if offset % cs != 0 {
                let has_data = if ext {
                    bitmap & 0xffff_ffff != 0
                } else {
                    e & OFLAG_ZERO == 0
                };
                let kind = if has_data {
                    FindingKind::DataUnaligned
                } else {
                    FindingKind::PreallocatedUnaligned
                };
                let mut f = Finding::new(kind, Severity::Corruption);
                f.offset = offset;
                f.entry = e;
                f.times = times;
                f.reference = bitmap;
                if active > 0 {
                    f.index = first.l1_index;
                    f.l2_table = first.l2_offset;
                    f.l2_index = i as u64;
                }
                self.report.add(f);
            }
            if active > 0 {
                self.report.allocated_clusters += active;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.report.fragmented_clusters += active;
                }
                next_contiguous = offset.wrapping_add(cs);
            }
            if self.data_file {
                continue;
            }
            self.inc(offset, cs, times);
            let k = offset >> self.cb;
            if self.is_meta(k) {
                self.data_on_meta(data_owner, offset, k);
            }
            // qemu-img's COPIED pass skips an L1 entry whose L2 offset is 0 altogether.
            if active > 0 && first.l2_offset != 0 {
                if let Some(rc) = self.disk_refcount(k) {
                    if (rc == 1) != (e & OFLAG_COPIED != 0) {
                        let mut f = Finding::new(FindingKind::CopiedL2, Severity::Corruption);
                        f.index = first.l1_index;
                        f.l2_table = first.l2_offset;
                        f.l2_index = i as u64;
                        f.entry = e;
                        f.reference = rc;
                        f.offset = offset;
                        f.times = active;
                        self.report.add(f);
                    }
                }
            }
        }
        self.report.allocated_clusters += allocated;
        self.report.fragmented_clusters += fragmented;
    }

    fn l2_finding(&mut self, kind: FindingKind, e: u64, bitmap: u64, i: usize, times: u64) {
        let mut f = Finding::new(kind, Severity::Corruption);
        f.entry = e;
        f.reference = bitmap;
        f.index = i as u64;
        f.offset = e & L1_L2_OFFSET_MASK;
        f.times = times;
        self.report.add(f);
    }

    /// The end of the range of clusters qemu-img compares: the file, grown to the last cluster
    /// referenced past its end.
    fn compared_clusters(&self) -> u64 {
        let past = self.refs.past.keys().next_back().map_or(0, |&k| k + 1);
        self.file_clusters.max(past)
    }

    fn refblocks(&mut self, reftable: &[u64]) {
        let cs = self.cs;
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            let mut f = Finding::new(FindingKind::ReftableReserved, Severity::Corruption);
            f.index = i as u64;
            f.offset = off;
            if e & REFTABLE_RESERVED_MASK != 0 {
                self.report.add(f);
                continue;
            }
            if off % cs != 0 {
                f.kind = FindingKind::RefblockUnaligned;
                self.report.add(f);
                continue;
            }
            let k = off >> self.cb;
            if k >= self.compared_clusters() {
                f.kind = FindingKind::RefblockOutside;
                self.report.add(f);
                continue;
            }
            if off != 0 {
                self.inc(off, cs, 1);
                if off.saturating_add(cs) < self.img.file_len().saturating_add(cs) {
                    self.refcount_structures.push(k);
                }
                let rc = self.refs.get(k);
                if rc != 1 {
                    f.kind = FindingKind::RefblockRefcount;
                    f.reference = rc;
                    self.report.add(f);
                }
            }
        }
    }

    /// Step 4: on-disk against recomputed refcounts.
    fn compare(&mut self) {
        let end = self.compared_clusters();
        let per_block = (self.cs * 8) >> self.order;
        let mut highest: Option<u64> = None;
        // Unreadable refcount blocks: every cluster they cover is a check error.
        let unreadable = std::mem::take(&mut self.unreadable_blocks);
        for &b in &unreadable {
            let first = b * per_block;
            let last = (first + per_block).min(end);
            if first < last {
                let mut f = Finding::new(FindingKind::RefcountUnreadable, Severity::CheckError);
                f.index = first;
                f.offset = self.img.scanned.refcount_table[b as usize] & REFTABLE_OFFSET_MASK;
                f.times = last - first;
                self.report.add(f);
            }
        }
        let is_unreadable = |k: u64| unreadable.binary_search(&(k / per_block)).is_ok();
        let n = self.file_clusters;
        let mut run_start: Option<u64> = None;
        for k in 0..n {
            let raw = self.refs.small[k as usize];
            if raw != 0 {
                run_start.get_or_insert(k);
            } else if let Some(s) = run_start.take() {
                self.push_run(s, k);
            }
            let r2 = u64::from(raw);
            let r1 = u64::from(self.disk.small[k as usize]);
            if r1 == r2 && r1 != u64::from(u8::MAX) {
                if r1 != 0 {
                    highest = Some(k);
                }
                continue;
            }
            if !unreadable.is_empty() && is_unreadable(k) {
                continue;
            }
            let (r1, r2) = (self.disk.get(k), self.refs.get(k));
            self.compare_one(k, r1, r2, &mut highest);
        }
        if let Some(s) = run_start {
            self.push_run(s, n);
        }
        // Past the end of the file: the clusters referenced there, and refcounts on disk up to
        // the last of them.
        if end > n {
            let past: Vec<(u64, u64)> = self.refs.past.iter().map(|(&k, &v)| (k, v)).collect();
            let mut disk_past: BTreeMap<u64, u64> = BTreeMap::new();
            let reftable = &self.img.scanned.refcount_table;
            let first_block = n / per_block;
            let last_block = (end - 1) / per_block;
            let mut buf = vec![0u8; self.cs as usize];
            for b in first_block..=last_block.min(reftable.len() as u64 - 1) {
                let off = reftable[b as usize] & REFTABLE_OFFSET_MASK;
                if off == 0 || off % self.cs != 0 {
                    continue;
                }
                if self.storage.read_padded(off, &mut buf).is_err() {
                    continue;
                }
                for j in 0..per_block {
                    let k = b * per_block + j;
                    if k < n || k >= end {
                        continue;
                    }
                    let v = refcount_get(&buf, j as usize, self.order).unwrap_or(0);
                    if v != 0 {
                        disk_past.insert(k, v);
                    }
                }
            }
            let mut keys: Vec<u64> = past.iter().map(|p| p.0).collect();
            keys.extend(disk_past.keys());
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                if is_unreadable(k) {
                    continue;
                }
                let r1 = disk_past.get(&k).copied().unwrap_or(0);
                let r2 = self.refs.get(k);
                self.compare_one(k, r1, r2, &mut highest);
            }
        }
        self.unreadable_blocks = unreadable;
        self.report.image_end_offset = highest.map_or(0, |h| h + 1).max(1) << self.cb;
    }

    fn push_run(&mut self, start: u64, end: u64) {
        let runs = &mut self.report.used_runs;
        if runs.len() < MAX_RUNS {
            runs.push((start, end - start));
        } else if let Some(last) = runs.last_mut() {
            last.1 = end - last.0;
        }
    }

    fn compare_one(&mut self, k: u64, r1: u64, r2: u64, highest: &mut Option<u64>) {
        if r1 > 0 || r2 > 0 {
            *highest = Some(k);
        }
        if r1 == r2 {
            return;
        }
        let (kind, sev) = if r1 < r2 {
            (FindingKind::RefcountTooLow, Severity::Corruption)
        } else {
            (FindingKind::RefcountTooHigh, Severity::Leak)
        };
        let mut f = Finding::new(kind, sev);
        f.index = k;
        f.offset = k << self.cb;
        f.entry = r1;
        f.reference = r2;
        self.report.add(f);
    }

    /// Step 6: metadata clusters with two owners that may not share them.
    fn overlaps(&mut self) {
        let owners = std::mem::take(&mut self.owners);
        let mut start = 0;
        while start < owners.len() {
            let k = owners[start].0;
            let end = start + owners[start..].partition_point(|o| o.0 == k);
            let group = &owners[start..end];
            start = end;
            if group.len() < 2 {
                continue;
            }
            for (j, b) in group.iter().enumerate().skip(1) {
                // Pair each owner with the first earlier one it may not share the cluster with.
                let clash = group[..j].iter().take(64).find(|a| !may_share(a, b));
                if let Some(a) = clash {
                    self.report.overlap(Overlap {
                        first: a.1,
                        first_offset: a.2,
                        second: b.1,
                        second_offset: b.2,
                        cluster_offset: k << self.cb,
                    });
                }
            }
        }
        self.owners = owners;
    }
}

/// Whether two owners of one cluster may share it: the same structure entered twice (a table
/// spanning clusters is entered once per cluster), or one L2 table referenced from different
/// L1 tables (a snapshot shares its L2 tables with the active image or other snapshots).
fn may_share(a: &(u64, Owner, u64), b: &(u64, Owner, u64)) -> bool {
    if a.1 == b.1 && a.2 == b.2 {
        return true;
    }
    match (a.1.l1_source(), b.1.l1_source()) {
        (Some(sa), Some(sb)) => sa != sb && a.2 == b.2,
        _ => false,
    }
}

/// Decodes the refcounts of one block for clusters `first..last` into `out`.
fn decode_block(block: &[u8], order: u32, first: u64, last: u64, out: &mut Counts) {
    let n = (last.saturating_sub(first)) as usize;
    match order {
        4 => {
            let start = first as usize;
            match out.small.get_mut(start..start + n) {
                Some(dst)
                    if block
                        .chunks_exact(2)
                        .take(n)
                        .all(|c| c[0] == 0 && c[1] != 0xff) =>
                {
                    for (d, c) in dst.iter_mut().zip(block.chunks_exact(2)) {
                        *d = c[1];
                    }
                }
                _ => {
                    for (j, c) in block.chunks_exact(2).take(n).enumerate() {
                        let v = u16::from_be_bytes([c[0], c[1]]);
                        if v != 0 {
                            out.set(first + j as u64, u64::from(v));
                        }
                    }
                }
            }
        }
        _ => {
            for j in 0..n {
                let v = refcount_get(block, j, order).unwrap_or(0);
                if v != 0 {
                    out.set(first + j as u64, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::OpenOptions;
    use super::*;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn check(bytes: Vec<u8>) -> CheckReport {
        let img =
            Image::from_storage(Arc::new(MemStorage::new(bytes)), OpenOptions::default()).unwrap();
        img.check().unwrap()
    }

    #[test]
    fn clean_image_checks_clean() {
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let r = check(image(1 << 30, &l2, &[(0, 7)]));
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{:?}",
            r.findings
        );
        assert_eq!(r.allocated_clusters, 1);
        assert_eq!(r.image_end_offset, 6 * CS);
        assert_eq!(r.total_clusters, (1 << 30) / CS);
        assert!(r.overlaps.is_empty());
    }

    #[test]
    fn leak_and_missing_refcount() {
        // Cluster 5 referenced; zero its refcount; raise cluster 6's (a leak).
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7), (0, 8)]);
        b[(2 * CS + 11) as usize] = 0;
        let r = check(b);
        // cluster 5: refcount 0, reference 1; its COPIED flag disagrees too.
        assert_eq!(r.corruptions, 2, "{:?}", r.findings);
        assert_eq!(r.leaks, 1, "{:?}", r.findings);
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn l2_entry_on_refcount_block_is_named() {
        let l2 = [OFLAG_COPIED | (2 * CS)];
        let r = check(image(1 << 30, &l2, &[]));
        let o = &r.overlaps[0];
        assert_eq!(o.first, Owner::RefcountBlock(0));
        assert_eq!(o.second, Owner::Data(None, 0));
        assert_eq!(
            o.to_string(),
            "data cluster of guest offset 0x0 at 0x20000 overlaps refcount block 0 at 0x20000"
        );
    }

    #[test]
    fn unaligned_refcount_block_makes_refcounts_unreadable() {
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7)]);
        // Refcount table entry 0: the block moved 512 bytes off its cluster boundary.
        b[(CS + 6) as usize] = 0x02;
        let r = check(b);
        assert_eq!(r.exit_code(), 1);
        // Every cluster of the file (6) is unreadable; the entry itself is a corruption.
        assert_eq!(r.check_errors, 6, "{:?}", r.findings);
        assert!(r
            .findings
            .iter()
            .any(|f| f.kind == FindingKind::RefblockUnaligned));
    }

    #[test]
    fn l2_tables_shared_across_l1_tables_may_share_but_not_within_one() {
        let l2 = |s, i| (0, Owner::SnapshotL2(s, i), 4 * CS);
        let active = (0, Owner::ActiveL2(0), 4 * CS);
        assert!(may_share(&active, &l2(0, 0)));
        assert!(may_share(&l2(0, 0), &l2(1, 0)));
        assert!(!may_share(&l2(0, 0), &l2(0, 1)));
        assert!(!may_share(&active, &(0, Owner::ActiveL2(1), 4 * CS)));
        assert!(!may_share(&active, &(0, Owner::RefcountBlock(0), 4 * CS)));
    }

    #[test]
    fn truncated_and_garbage_inputs_do_not_panic() {
        let l2 = [
            OFLAG_COMPRESSED | 0x3fff_ffff_ffff_ffff,
            0x00ff_ffff_ffff_fe00,
            OFLAG_COPIED | 0x1234,
        ];
        let r = check(image(1 << 30, &l2, &[]));
        assert!(r.corruptions > 0);
    }
}
