//! What a check reports: qemu-img's counters, every finding (see `finding.rs`), and every
//! metadata overlap named by its two owners.

/// Findings kept in the report; the counters count all of them. A file can claim millions of
/// broken entries (a 32 MiB L1 table is 4 Mi of them), and each finding kept becomes a Python
/// object of a few hundred bytes: 1 Mi of them cost 4.4 s and 876 MB for a file that holds
/// 32 MiB of tables, where qemu-img check (which prints and forgets) needs 327 MB.
pub(super) const MAX_FINDINGS: usize = 1 << 16;
/// Overlaps kept in the report; [`CheckReport::overlap_count`] counts all of them.
pub(super) const MAX_OVERLAPS: usize = 100_000;
/// Metadata cluster records kept for naming overlaps (32 bytes each); past this many, the
/// clusters of further structures are still counted but not named in overlaps. A valid image
/// has far fewer (each record is a metadata cluster, or one reference to a shared L2 table); a
/// file whose snapshots claim 32 MiB L1 tables in its holes would otherwise need gigabytes.
pub(super) const MAX_OWNERS: usize = 1 << 22;
/// Runs of referenced clusters kept in [`CheckReport::used_runs`].
pub(super) const MAX_RUNS: usize = 1 << 20;

use super::finding::{Finding, Severity};

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
    /// Metadata clusters past [`MAX_OWNERS`]: counted, but not looked at for overlaps.
    pub unnamed_metadata: u64,
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
        match f.severity() {
            Severity::Corruption => self.corruptions += f.times,
            Severity::Leak => self.leaks += f.times,
            Severity::CheckError => self.check_errors += f.times,
        }
        self.finding_count += 1;
        // Kept while memory allows too: a finding not kept is still counted.
        if self.findings.len() < MAX_FINDINGS && self.findings.try_reserve(1).is_ok() {
            self.findings.push(f);
        }
    }

    pub(super) fn overlap(&mut self, o: Overlap) {
        self.overlap_count += 1;
        if self.overlaps.len() < MAX_OVERLAPS && self.overlaps.try_reserve(1).is_ok() {
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
