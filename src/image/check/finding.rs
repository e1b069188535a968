//! One problem a check found: what it is, with the facts of its kind, how it counts in
//! qemu-img's counters, and its line in qemu-img's style.

use crate::format::entry::{L1Entry, L2Entry};

/// How a finding counts in qemu-img's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Counted in `corruptions`.
    Corruption,
    /// Counted in `leaks`.
    Leak,
    /// Counted in `check_errors` (the check could not look at something).
    CheckError,
}

/// Where an entry of an active L2 table is, so that a repair can find it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Position {
    /// The active L1 index that references the table.
    pub l1_index: u64,
    /// The table's host offset.
    pub table: u64,
    /// The entry's index in the table.
    pub index: u64,
}

/// An L2 entry as a finding about it names it: its index in its table, the entry and, with
/// extended L2 entries, its subcluster bitmap (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2EntryAt {
    /// The entry's index in its L2 table.
    pub index: u64,
    /// The entry (the first word of an extended entry).
    pub entry: L2Entry,
    /// The subcluster bitmap; 0 for standard entries.
    pub bitmap: u64,
}

/// What a finding is about, with the facts of its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// The on-disk refcount of `cluster` (at `offset`) is lower than the references found.
    RefcountTooLow {
        /// The cluster number.
        cluster: u64,
        /// Its first byte.
        offset: u64,
        /// The refcount on disk.
        refcount: u64,
        /// The references found.
        reference: u64,
    },
    /// The on-disk refcount is higher than the references found: a leak (`reference` is 0 for
    /// a cluster nothing references).
    RefcountTooHigh {
        /// The cluster number.
        cluster: u64,
        /// Its first byte.
        offset: u64,
        /// The refcount on disk.
        refcount: u64,
        /// The references found.
        reference: u64,
    },
    /// The refcounts of the clusters from `first_cluster` (as many as the finding counts)
    /// cannot be read: their refcount block is unaligned, or lies where no read can reach.
    RefcountUnreadable {
        /// The first cluster the block describes.
        first_cluster: u64,
        /// The refcount block's offset.
        block: u64,
    },
    /// More references to `cluster` than the refcount width can count.
    RefcountOverflow {
        /// The cluster number.
        cluster: u64,
        /// Its first byte.
        offset: u64,
    },
    /// An active L1 entry's COPIED flag disagrees with its L2 table's refcount.
    CopiedL1 {
        /// The L1 index.
        l1_index: u64,
        /// The entry.
        entry: L1Entry,
        /// The L2 table's refcount on disk.
        refcount: u64,
    },
    /// An active L2 entry's COPIED flag disagrees with its data cluster's refcount.
    CopiedL2 {
        /// Where the entry is.
        at: L2Position,
        /// The entry.
        entry: L2Entry,
        /// The data cluster's refcount on disk.
        refcount: u64,
    },
    /// A compressed cluster's entry has the COPIED flag.
    CopiedCompressed {
        /// The entry.
        entry: L2Entry,
        /// Where its compressed data starts (0 when the descriptor cannot be decoded).
        offset: u64,
    },
    /// An L1 entry with reserved bits set.
    L1Reserved {
        /// The L1 index.
        l1_index: u64,
        /// The entry.
        entry: L1Entry,
    },
    /// An L2 entry with reserved bits set.
    L2Reserved(L2EntryAt),
    /// An L1 entry whose L2 table offset is not cluster-aligned.
    L2TableUnaligned {
        /// The L1 index.
        l1_index: u64,
        /// The unaligned offset.
        offset: u64,
    },
    /// An L2 entry whose data cluster is not cluster-aligned.
    DataUnaligned {
        /// The entry.
        entry: L2Entry,
        /// Its unaligned offset.
        offset: u64,
    },
    /// An unaligned L2 entry that holds no data (a preallocated zero cluster); `at` is where
    /// it is in an active table (`None` in a snapshot's), for the repair that zeroes it.
    PreallocatedUnaligned {
        /// The entry.
        entry: L2Entry,
        /// Its unaligned offset.
        offset: u64,
        /// Its subcluster bitmap (extended L2 entries; 0 otherwise).
        bitmap: u64,
        /// Where it is, in an active L2 table.
        at: Option<L2Position>,
    },
    /// Extended L2: a subcluster both allocated and zero.
    SubclusterBitmap(L2EntryAt),
    /// Extended L2: an unallocated cluster with allocated subclusters.
    UnallocatedSubclusters(L2EntryAt),
    /// Extended L2: a compressed cluster with a non-zero subcluster bitmap.
    CompressedBitmap(L2EntryAt),
    /// A compressed cluster in an image with an external data file.
    CompressedDataFile(L2EntryAt),
    /// Internal snapshots in an image with an external data file.
    SnapshotsDataFile {
        /// How many.
        snapshots: u64,
    },
    /// A version 3 snapshot table entry with less than the 16 bytes of extra data version 3
    /// requires.
    SnapshotIncomplete {
        /// The entry's position in the snapshot table.
        snapshot: u64,
        /// Its extra data size.
        extra_data: u64,
    },
    /// A snapshot L1 table that is not cluster-aligned.
    SnapshotL1Unaligned {
        /// The snapshot, as `id (name)`.
        name: String,
        /// The unaligned offset.
        offset: u64,
    },
    /// A snapshot L1 table larger than QEMU allows.
    SnapshotL1TooLarge {
        /// The snapshot, as `id (name)`.
        name: String,
        /// Its entry count.
        l1_size: u64,
    },
    /// A refcount table entry with reserved bits set.
    ReftableReserved {
        /// The refcount table index.
        index: u64,
        /// The block offset the entry holds.
        offset: u64,
    },
    /// A refcount table entry pointing at an unaligned refcount block.
    RefblockUnaligned {
        /// The refcount table index.
        index: u64,
        /// The block's offset.
        offset: u64,
    },
    /// A refcount block past the end of the image.
    RefblockOutside {
        /// The refcount table index.
        index: u64,
        /// The block's offset.
        offset: u64,
    },
    /// A refcount block whose recomputed refcount is not 1 (it shares its cluster).
    RefblockRefcount {
        /// The refcount table index.
        index: u64,
        /// The block's offset.
        offset: u64,
        /// The recomputed refcount.
        reference: u64,
    },
    /// The bitmap directory cannot be parsed, or a bitmap breaks the format's rules.
    BitmapInvalid {
        /// The bitmap's name, or `directory`.
        name: String,
    },
    /// A bitmap table entry is invalid.
    BitmapEntry {
        /// The bitmap's name.
        name: String,
        /// The entry's index in the bitmap table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// A table could not be read.
    ReadError {
        /// What, and why (`an L2 table (I/O error)`).
        what: String,
        /// Where it starts.
        offset: u64,
    },
    /// A referenced region ends a cluster or more past the end of the file; its refcount is
    /// not counted (qemu-img counts the finding as a corruption).
    PastEnd {
        /// Where the region starts.
        offset: u64,
        /// Its length in bytes.
        len: u64,
    },
}

/// One problem found by [`Image::check`](crate::image::Image::check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was found.
    pub kind: FindingKind,
    /// How many times it counts (an L2 table referenced by several L1 tables repeats its
    /// findings, as qemu-img counts them once per reference; a range of unreadable refcounts
    /// counts each cluster).
    pub times: u64,
}

impl Finding {
    /// A finding that counts once.
    pub(super) fn once(kind: FindingKind) -> Self {
        Finding { kind, times: 1 }
    }

    /// A finding that counts `times` times.
    pub(super) fn counted(kind: FindingKind, times: u64) -> Self {
        Finding { kind, times }
    }

    /// How it counts: leaks are refcounts higher than the references, check errors what could
    /// not be read, everything else a corruption.
    pub fn severity(&self) -> Severity {
        match self.kind {
            FindingKind::RefcountTooHigh { .. } => Severity::Leak,
            FindingKind::RefcountUnreadable { .. } | FindingKind::ReadError { .. } => {
                Severity::CheckError
            }
            _ => Severity::Corruption,
        }
    }

    /// The host offset the finding concerns (a cluster's first byte for refcount findings); 0
    /// where none applies.
    pub fn offset(&self) -> u64 {
        use FindingKind as K;
        match &self.kind {
            K::RefcountTooLow { offset, .. }
            | K::RefcountTooHigh { offset, .. }
            | K::RefcountOverflow { offset, .. }
            | K::CopiedCompressed { offset, .. }
            | K::L2TableUnaligned { offset, .. }
            | K::DataUnaligned { offset, .. }
            | K::PreallocatedUnaligned { offset, .. }
            | K::SnapshotL1Unaligned { offset, .. }
            | K::ReftableReserved { offset, .. }
            | K::RefblockUnaligned { offset, .. }
            | K::RefblockOutside { offset, .. }
            | K::RefblockRefcount { offset, .. }
            | K::ReadError { offset, .. }
            | K::PastEnd { offset, .. } => *offset,
            K::RefcountUnreadable { block, .. } => *block,
            K::CopiedL1 { entry, .. } => entry.l2_offset().0,
            K::CopiedL2 { entry, .. } => entry.host_offset().0,
            K::L2Reserved(e)
            | K::SubclusterBitmap(e)
            | K::UnallocatedSubclusters(e)
            | K::CompressedBitmap(e)
            | K::CompressedDataFile(e) => e.entry.host_offset().0,
            K::L1Reserved { .. }
            | K::SnapshotsDataFile { .. }
            | K::SnapshotIncomplete { .. }
            | K::SnapshotL1TooLarge { .. }
            | K::BitmapInvalid { .. }
            | K::BitmapEntry { .. } => 0,
        }
    }

    /// For a refcount on disk that differs from the references found (too low or too high):
    /// the cluster, the refcount and the references.
    pub fn refcount_mismatch(&self) -> Option<(u64, u64, u64)> {
        match self.kind {
            FindingKind::RefcountTooLow {
                cluster,
                refcount,
                reference,
                ..
            }
            | FindingKind::RefcountTooHigh {
                cluster,
                refcount,
                reference,
                ..
            } => Some((cluster, refcount, reference)),
            _ => None,
        }
    }

    /// The kind's short name, for bindings and JSON (`refcount-too-low`, ...).
    pub fn kind_name(&self) -> &'static str {
        use FindingKind as K;
        match &self.kind {
            K::RefcountTooLow { .. } => "refcount-too-low",
            K::RefcountTooHigh { reference: 0, .. } => "leaked-cluster",
            K::RefcountTooHigh { .. } => "refcount-too-high",
            K::RefcountUnreadable { .. } => "refcount-unreadable",
            K::RefcountOverflow { .. } => "refcount-overflow",
            K::CopiedL1 { .. } => "copied-flag-l1",
            K::CopiedL2 { .. } => "copied-flag-l2",
            K::CopiedCompressed { .. } => "copied-flag-compressed",
            K::L1Reserved { .. } => "l1-reserved-bits",
            K::L2Reserved(_) => "l2-reserved-bits",
            K::L2TableUnaligned { .. } => "l2-table-unaligned",
            K::DataUnaligned { .. } => "data-unaligned",
            K::PreallocatedUnaligned { .. } => "preallocated-unaligned",
            K::SubclusterBitmap(_) => "subcluster-bitmap",
            K::UnallocatedSubclusters(_) => "unallocated-subclusters",
            K::CompressedBitmap(_) => "compressed-bitmap",
            K::CompressedDataFile(_) => "compressed-data-file",
            K::SnapshotsDataFile { .. } => "snapshots-data-file",
            K::SnapshotIncomplete { .. } => "snapshot-entry-incomplete",
            K::SnapshotL1Unaligned { .. } => "snapshot-l1-unaligned",
            K::SnapshotL1TooLarge { .. } => "snapshot-l1-too-large",
            K::ReftableReserved { .. } => "reftable-reserved-bits",
            K::RefblockUnaligned { .. } => "refblock-unaligned",
            K::RefblockOutside { .. } => "refblock-outside-image",
            K::RefblockRefcount { .. } => "refblock-refcount",
            K::BitmapInvalid { .. } => "bitmap-invalid",
            K::BitmapEntry { .. } => "bitmap-table-entry",
            K::ReadError { .. } => "read-error",
            K::PastEnd { .. } => "past-end-of-file",
        }
    }

    /// The severity's short name (`corruption`, `leak`, `check-error`).
    pub fn severity_name(&self) -> &'static str {
        match self.severity() {
            Severity::Corruption => "corruption",
            Severity::Leak => "leak",
            Severity::CheckError => "check-error",
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
        match &self.kind {
            K::RefcountTooLow {
                cluster,
                refcount,
                reference,
                ..
            } => write!(
                f,
                "ERROR cluster {cluster} refcount={refcount} reference={reference}"
            ),
            K::RefcountTooHigh {
                cluster,
                refcount,
                reference,
                ..
            } => write!(
                f,
                "Leaked cluster {cluster} refcount={refcount} reference={reference}"
            ),
            K::RefcountUnreadable {
                first_cluster,
                block,
            } => write!(
                f,
                "ERROR cannot read the refcounts of {} clusters from cluster {first_cluster}: \
                 their refcount block at {block:#x} is unaligned or out of reach",
                self.times
            ),
            K::RefcountOverflow { offset, .. } => write!(
                f,
                "ERROR refcount overflow: cluster at {offset:#x} has more references than \
                 refcount entries can count"
            ),
            K::CopiedL1 {
                l1_index,
                entry,
                refcount,
            } => write!(
                f,
                "ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={:x} \
                 refcount={refcount}",
                entry.0
            ),
            K::CopiedL2 {
                entry, refcount, ..
            } => write!(
                f,
                "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}{times}",
                entry.0
            ),
            K::CopiedCompressed { offset, .. } => write!(
                f,
                "ERROR compressed cluster at coffset={offset:#x} has the COPIED flag set{times}"
            ),
            K::L1Reserved { l1_index, entry } => write!(
                f,
                "ERROR L1 entry {l1_index} has reserved bits set: {:x}",
                entry.0
            ),
            K::L2Reserved(e) => write!(
                f,
                "ERROR L2 entry has reserved bits set: {:x}{times}",
                e.entry.0
            ),
            K::L2TableUnaligned { l1_index, offset } => write!(
                f,
                "ERROR l2_offset={offset:x}: L2 table is not cluster-aligned (L1 index \
                 {l1_index})"
            ),
            K::DataUnaligned { entry, offset } => write!(
                f,
                "ERROR offset={offset:x}: data cluster is not cluster-aligned (L2 entry {:x})\
                 {times}",
                entry.0
            ),
            K::PreallocatedUnaligned { entry, offset, .. } => write!(
                f,
                "ERROR offset={offset:x}: preallocated cluster is not cluster-aligned \
                 (L2 entry {:x}){times}",
                entry.0
            ),
            K::SubclusterBitmap(e) => write!(
                f,
                "ERROR offset={:x}: subclusters both allocated and zero (bitmap {:#x}){times}",
                e.entry.host_offset().0,
                e.bitmap
            ),
            K::UnallocatedSubclusters(e) => write!(
                f,
                "ERROR unallocated cluster with allocated subclusters (bitmap {:#x}){times}",
                e.bitmap
            ),
            K::CompressedBitmap(e) => write!(
                f,
                "ERROR compressed cluster {} has a subcluster bitmap, entry={:#x}{times}",
                e.index, e.entry.0
            ),
            K::CompressedDataFile(e) => write!(
                f,
                "ERROR compressed cluster {} in an image with a data file, entry={:#x}{times}",
                e.index, e.entry.0
            ),
            K::SnapshotsDataFile { snapshots } => write!(
                f,
                "ERROR {snapshots} snapshots in an image with an external data file"
            ),
            K::SnapshotIncomplete {
                snapshot,
                extra_data,
            } => write!(
                f,
                "ERROR snapshot table entry {snapshot} is incomplete: {extra_data} bytes of \
                 extra data, version 3 needs 16"
            ),
            K::SnapshotL1Unaligned { name, offset } => write!(
                f,
                "ERROR snapshot {name} l1_offset={offset:#x}: L1 table is not cluster-aligned"
            ),
            K::SnapshotL1TooLarge { name, l1_size } => write!(
                f,
                "ERROR snapshot {name} l1_size={l1_size:#x}: L1 table is larger than QEMU allows"
            ),
            K::ReftableReserved { index, .. } => {
                write!(
                    f,
                    "ERROR refcount table entry {index} has reserved bits set"
                )
            }
            K::RefblockUnaligned { index, offset } => write!(
                f,
                "ERROR refcount block {index} at {offset:#x} is not cluster-aligned"
            ),
            K::RefblockOutside { index, offset } => write!(
                f,
                "ERROR refcount block {index} at {offset:#x} is outside the image"
            ),
            K::RefblockRefcount {
                index,
                offset,
                reference,
            } => write!(
                f,
                "ERROR refcount block {index} at {offset:#x} refcount={reference} (shares its \
                 cluster)"
            ),
            K::BitmapInvalid { name } => write!(f, "ERROR bitmap {name}: invalid"),
            K::BitmapEntry { name, index, entry } => write!(
                f,
                "ERROR bitmap {name}: table entry {index} is invalid: {entry:#x}"
            ),
            K::ReadError { what, offset } => write!(f, "ERROR cannot read {what} at {offset:#x}"),
            K::PastEnd { offset, len } => write!(
                f,
                "ERROR reference to {len:#x} bytes at {offset:#x} ends a cluster or more past \
                 the end of the file (not counted){times}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_and_names_follow_the_kind() {
        let leak = Finding::once(FindingKind::RefcountTooHigh {
            cluster: 3,
            offset: 3 << 16,
            refcount: 1,
            reference: 0,
        });
        assert_eq!(leak.severity(), Severity::Leak);
        assert_eq!(leak.kind_name(), "leaked-cluster");
        assert_eq!(leak.offset(), 3 << 16);
        assert_eq!(leak.to_string(), "Leaked cluster 3 refcount=1 reference=0");
        let unreadable = Finding::counted(
            FindingKind::RefcountUnreadable {
                first_cluster: 0,
                block: 0x1234,
            },
            8,
        );
        assert_eq!(unreadable.severity_name(), "check-error");
        assert_eq!(unreadable.offset(), 0x1234);
        let copied = Finding::counted(
            FindingKind::CopiedL2 {
                at: L2Position {
                    l1_index: 0,
                    table: 0x40000,
                    index: 2,
                },
                entry: L2Entry(0x50000),
                refcount: 1,
            },
            2,
        );
        assert_eq!(copied.severity(), Severity::Corruption);
        assert_eq!(copied.offset(), 0x50000);
        assert!(copied
            .to_string()
            .ends_with("(counted 2 times: one per reference to its L2 table)"));
    }
}
