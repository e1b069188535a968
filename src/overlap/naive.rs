//! QEMU's metadata overlap check, as QEMU does it today: scan the tables on every check.
//!
//! This is the reference the metadata map is tested against and the baseline it is measured
//! against. The algorithm follows `qcow2_check_metadata_overlap`: round the write out to whole
//! clusters, then compare it with the header cluster, the active L1 table, the refcount table,
//! the snapshot table and each snapshot L1 table by one range comparison each, with every active
//! L2 table by a loop over the active L1 table, with every refcount block by a loop over the
//! refcount table, and — in `all` mode — with every inactive L2 table by reading each snapshot's
//! L1 table from the image and looping over it, on every single check. Two differences, both
//! needed for an oracle: the result is the OR of every overlapping type (QEMU stops at the first),
//! and our two extra types (encryption header, bitmap tables) are checked the same naive way.

use std::io;
use std::sync::Arc;

use super::types::MetadataType;
use crate::format::entry::L1Entry;
use crate::format::limits::MAX_L1_BYTES;
use crate::format::refcount::ReftableEntry;
use crate::storage::Storage;

/// Bytes of a snapshot L1 table read at a time: the check never holds a whole table.
const READ_CHUNK: usize = 64 << 10;

/// What QEMU keeps in memory about an image's metadata, in the units QEMU uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NaiveLayout {
    /// Cluster size in bytes (a power of two).
    pub cluster_size: u64,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// The active L1 table's entries (raw, as on disk after byte-swapping).
    pub l1_table: Vec<u64>,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// The refcount table's entries; its byte size is `len * 8`.
    pub refcount_table: Vec<u64>,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Byte size of the snapshot table (0 when there are no snapshots).
    pub snapshots_size: u64,
    /// `(l1_table_offset, l1_size)` of every snapshot; the tables themselves stay on disk.
    pub snapshots: Vec<(u64, u32)>,
    /// `(offset, size)` of the bitmap directory, when the bitmaps autoclear bit is set.
    pub bitmap_directory: Option<(u64, u64)>,
    /// `(offset, entries)` of every bitmap table.
    pub bitmap_tables: Vec<(u64, u32)>,
    /// `(offset, length)` of the encryption header.
    pub crypto_header: Option<(u64, u64)>,
}

/// Why a [`NaiveChecker`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NaiveError {
    /// The cluster size is not a power of two between 512 B and 2 MiB.
    #[error("cluster size {0} is not a power of two between 512 and 2097152")]
    BadClusterSize(u64),
    /// A snapshot L1 table is larger than QEMU allows any L1 table to be.
    #[error("snapshot {index}: L1 table of {entries} entries exceeds the limit of {limit}")]
    SnapshotL1TooLarge {
        /// Position in the snapshot list.
        index: usize,
        /// Its entry count.
        entries: u32,
        /// The most entries an L1 table may have.
        limit: u64,
    },
}

/// QEMU's scanning checker over a [`NaiveLayout`], reading snapshot L1 tables from the image's
/// storage on every `all`-mode check.
pub struct NaiveChecker {
    layout: NaiveLayout,
    enabled: MetadataType,
    /// Index one past the last non-zero refcount table entry (QEMU's
    /// `max_refcount_table_index + 1`): the loop over refcount blocks stops there.
    refcount_table_used: usize,
    storage: Arc<dyn Storage>,
}

impl NaiveChecker {
    /// A checker for `layout` that checks the `enabled` types, reading snapshot L1 tables from
    /// `storage` (bytes past its end read as zeros). Refuses a layout that QEMU's limits forbid,
    /// so that no check can be asked to read more than 32 MiB per snapshot.
    pub fn new(
        layout: NaiveLayout,
        enabled: MetadataType,
        storage: Arc<dyn Storage>,
    ) -> Result<Self, NaiveError> {
        let cs = layout.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(NaiveError::BadClusterSize(cs));
        }
        let limit = MAX_L1_BYTES / 8;
        if let Some((index, &(_, entries))) = layout
            .snapshots
            .iter()
            .enumerate()
            .find(|(_, &(_, n))| u64::from(n) > limit)
        {
            return Err(NaiveError::SnapshotL1TooLarge {
                index,
                entries,
                limit,
            });
        }
        let refcount_table_used = layout
            .refcount_table
            .iter()
            .rposition(|&e| ReftableEntry(e).is_allocated())
            .map_or(0, |i| i + 1);
        Ok(NaiveChecker {
            layout,
            enabled,
            refcount_table_used,
            storage,
        })
    }

    /// The layout being checked.
    pub fn layout(&self) -> &NaiveLayout {
        &self.layout
    }

    /// The OR of every enabled type (minus `ignore`) that `[offset, offset + size)` overlaps.
    ///
    /// Errors only when reading a snapshot L1 table fails (`all` mode) or the range overflows.
    pub fn check(&self, offset: u64, size: u64, ignore: MetadataType) -> io::Result<MetadataType> {
        let chk = self.enabled - ignore;
        let l = &self.layout;
        if size == 0 || chk.is_empty() {
            return Ok(MetadataType::empty());
        }
        let cs = l.cluster_size;
        // Round out to whole clusters, as QEMU does before comparing.
        let start = offset & !(cs - 1);
        let end = offset
            .checked_add(size)
            .and_then(|e| e.checked_add(cs - 1))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?
            & !(cs - 1);
        let hits = |ofs: u64, sz: u64| sz != 0 && ofs < end && start < ofs.saturating_add(sz);
        let mut ret = MetadataType::empty();
        let mut test = |t: MetadataType, hit: &dyn Fn() -> bool| {
            if chk.contains(t) && hit() {
                ret |= t;
            }
        };

        test(MetadataType::MAIN_HEADER, &|| start < cs);
        test(MetadataType::ACTIVE_L1, &|| {
            hits(l.l1_table_offset, l.l1_table.len() as u64 * 8)
        });
        test(MetadataType::REFCOUNT_TABLE, &|| {
            hits(l.refcount_table_offset, l.refcount_table.len() as u64 * 8)
        });
        test(MetadataType::SNAPSHOT_TABLE, &|| {
            hits(l.snapshots_offset, l.snapshots_size)
        });
        test(MetadataType::INACTIVE_L1, &|| {
            l.snapshots
                .iter()
                .any(|&(ofs, n)| hits(ofs, u64::from(n) * 8))
        });
        test(MetadataType::ACTIVE_L2, &|| {
            l.l1_table.iter().any(|&e| {
                let ofs = L1Entry(e).l2_offset().0;
                ofs != 0 && hits(ofs, cs)
            })
        });
        test(MetadataType::REFCOUNT_BLOCK, &|| {
            l.refcount_table[..self.refcount_table_used]
                .iter()
                .any(|&e| {
                    let ofs = ReftableEntry(e).block_offset().0;
                    ofs != 0 && hits(ofs, cs)
                })
        });
        test(MetadataType::BITMAP_DIRECTORY, &|| {
            l.bitmap_directory.is_some_and(|(ofs, sz)| hits(ofs, sz))
        });
        test(MetadataType::CRYPTO_HEADER, &|| {
            l.crypto_header.is_some_and(|(ofs, sz)| hits(ofs, sz))
        });
        test(MetadataType::BITMAP_TABLE, &|| {
            l.bitmap_tables
                .iter()
                .any(|&(ofs, n)| hits(ofs, u64::from(n) * 8))
        });

        if chk.contains(MetadataType::INACTIVE_L2) {
            // QEMU reads every snapshot's L1 table from the image on every check. Read in
            // bounded chunks, and not past the end of the file (zeros hold no entries).
            let file_len = self.storage.len()?;
            let mut buf = vec![0u8; READ_CHUNK];
            'snapshots: for &(l1_ofs, l1_size) in &l.snapshots {
                let table_end = l1_ofs.saturating_add(u64::from(l1_size) * 8).min(file_len);
                let mut at = l1_ofs;
                while at < table_end {
                    let n = (table_end - at).min(READ_CHUNK as u64) as usize;
                    self.storage.read_padded(at, &mut buf[..n])?;
                    at += n as u64;
                    for raw in buf[..n].chunks_exact(8) {
                        let mut be = [0u8; 8];
                        be.copy_from_slice(raw);
                        let ofs = L1Entry(u64::from_be_bytes(be)).l2_offset().0;
                        if ofs != 0 && hits(ofs, cs) {
                            ret |= MetadataType::INACTIVE_L2;
                            break 'snapshots;
                        }
                    }
                }
            }
        }
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FaultyStorage, MemStorage, StorageOp};
    use MetadataType as T;

    const CS: u64 = 4096;

    /// A small layout whose snapshot L1 table lives in an in-memory "file".
    fn checker(enabled: MetadataType) -> NaiveChecker {
        let mut file = vec![0u8; 64 * CS as usize];
        // Snapshot L1 at cluster 20 with one entry pointing at cluster 21.
        file[20 * CS as usize..20 * CS as usize + 8].copy_from_slice(&(21 * CS).to_be_bytes());
        let layout = NaiveLayout {
            cluster_size: CS,
            l1_table_offset: 3 * CS,
            l1_table: vec![(1 << 63) | (5 * CS), 0, 6 * CS],
            refcount_table_offset: CS,
            refcount_table: vec![2 * CS, 0, 0],
            snapshots_offset: 10 * CS,
            snapshots_size: 100,
            snapshots: vec![(20 * CS, 1)],
            bitmap_directory: Some((30 * CS, 200)),
            bitmap_tables: vec![(31 * CS, 2)],
            crypto_header: Some((32 * CS, 2 * CS)),
        };
        NaiveChecker::new(layout, enabled, Arc::new(MemStorage::new(file))).unwrap()
    }

    #[test]
    fn finds_every_type() {
        let c = checker(T::all());
        let at = |cluster: u64| c.check(cluster * CS + 7, 1, T::empty()).unwrap();
        assert_eq!(at(0), T::MAIN_HEADER);
        assert_eq!(at(1), T::REFCOUNT_TABLE);
        assert_eq!(at(2), T::REFCOUNT_BLOCK);
        assert_eq!(at(3), T::ACTIVE_L1);
        assert_eq!(at(4), T::empty());
        assert_eq!(at(5), T::ACTIVE_L2);
        assert_eq!(at(6), T::ACTIVE_L2);
        assert_eq!(at(10), T::SNAPSHOT_TABLE);
        assert_eq!(at(20), T::INACTIVE_L1);
        assert_eq!(at(21), T::INACTIVE_L2);
        assert_eq!(at(30), T::BITMAP_DIRECTORY);
        assert_eq!(at(31), T::BITMAP_TABLE);
        assert_eq!(at(33), T::CRYPTO_HEADER);
        assert_eq!(at(34), T::empty());
        assert_eq!(
            c.check(CS, 3 * CS, T::REFCOUNT_BLOCK).unwrap(),
            T::REFCOUNT_TABLE | T::ACTIVE_L1
        );
    }

    #[test]
    fn cached_mode_reads_nothing() {
        let all = checker(T::all());
        let faulty = Arc::new(FaultyStorage::new(MemStorage::new(vec![
            0;
            64 * CS as usize
        ])));
        faulty.fail_from(StorageOp::Read, 1);
        let mut broken = NaiveChecker::new(all.layout().clone(), T::all(), faulty.clone()).unwrap();
        assert!(broken.check(21 * CS, 1, T::empty()).is_err());
        broken.enabled = T::TEMPLATE_CACHED;
        assert_eq!(broken.check(21 * CS, 1, T::empty()).unwrap(), T::empty());
    }

    #[test]
    fn oversized_snapshot_tables_are_refused_not_read() {
        let mut layout = checker(T::all()).layout().clone();
        layout.snapshots = vec![(0, u32::MAX)];
        let empty: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new()));
        assert!(matches!(
            NaiveChecker::new(layout.clone(), T::all(), empty.clone()),
            Err(NaiveError::SnapshotL1TooLarge { .. })
        ));
        // The largest legal table past the end of the file costs nothing to check.
        layout.snapshots = vec![(0, (MAX_L1_BYTES / 8) as u32)];
        let c = NaiveChecker::new(layout, T::all(), empty).unwrap();
        assert_eq!(
            c.check(40 * CS, 1, T::all() - T::INACTIVE_L2).unwrap(),
            T::empty()
        );
        layout = c.layout().clone();
        layout.cluster_size = 3;
        assert!(NaiveChecker::new(layout, T::all(), Arc::new(MemStorage::default())).is_err());
    }
}
