//! What a check reports: qemu-img's counters, every finding with its severity, and every
//! metadata overlap named by its two owners.

/// Findings kept in the report; the counters count all of them.
pub(super) const MAX_FINDINGS: usize = 1 << 20;
/// Overlaps kept in the report; [`CheckReport::overlap_count`] counts all of them.
pub(super) const MAX_OVERLAPS: usize = 100_000;
/// Runs of referenced clusters kept in [`CheckReport::used_runs`].
pub(super) const MAX_RUNS: usize = 1 << 20;

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
    pub(super) fn new(kind: FindingKind, severity: Severity) -> Self {
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
    pub(super) fn l1_source(&self) -> Option<Option<u32>> {
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
    pub(super) fn add(&mut self, f: Finding) {
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

    pub(super) fn overlap(&mut self, o: Overlap) {
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
