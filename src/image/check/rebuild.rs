//! Rebuilding a damaged refcount structure (the `-r all` repair of `repair.rs`): new refcount
//! blocks and a new refcount table, holding the check's recomputed counts, written in fresh
//! clusters past everything in use, then switched to by one header write.
//!
//! Why not patch in place: the damage (a refcount table entry of 0 for a range in use, an
//! unaligned or reserved-bit entry, a refcount block on top of other metadata) means the old
//! structure cannot say where a cluster's refcount lives, so nothing written through it can be
//! trusted. Why at the end of the file: the old structure must stay intact until the header no
//! longer points at it (a crash before the switch leaves the image as it was), and nothing may
//! point into the new one (clusters past every reference, counted or not, and past every
//! metadata structure the map knows). The old structure is not counted by the new one: its
//! clusters are simply free afterwards.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::Counts;
use super::{CheckReport, FindingKind};
use crate::format::limits::MAX_REFTABLE_BYTES;
use crate::format::offsets::MAX_HOST_OFFSET;
use crate::format::refcount::{max_refcount, refcount_set};
use crate::format::write_u64_table;
use crate::format::ReftableEntry;
use crate::image::write::Writer;
use crate::image::WriteKind;
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

impl Image {
    /// Step 1 by rebuilding: new refcount blocks and a new refcount table, holding the
    /// recomputed counts, in fresh clusters past everything in use (and past the old
    /// structure, which is left intact until the header no longer points at it). They are
    /// written and flushed, then the header is switched to them in one write. The old
    /// structure is not counted by the new one: its clusters are simply free afterwards.
    pub(in crate::image) fn rebuild_refcounts(
        &self,
        w: &mut Writer,
        before: &CheckReport,
        counts: &Counts,
        shared: &HashSet<u64>,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        let cb = self.geometry.cluster_bits();
        let order = w.header.refcount_order;
        let max = max_refcount(order)
            .ok_or_else(|| ImageError::Unsupported(format!("refcount order {order}")))?;
        let per = (cs * 8) >> order;
        // A cluster two structures use keeps the refcount it had on disk (when it had one):
        // the repair leaves it as it found it.
        let kept: HashMap<u64, u64> = before
            .findings
            .iter()
            .filter_map(|f| f.refcount_mismatch())
            .filter(|&(cluster, refcount, _)| refcount > 0 && shared.contains(&cluster))
            .map(|(cluster, refcount, _)| (cluster, refcount))
            .collect();
        let value = |k: u64| {
            kept.get(&k)
                .copied()
                .unwrap_or_else(|| counts.get(k))
                .min(max)
        };
        let mut used = BTreeSet::new();
        for k in 0..counts.dense_len() {
            if value(k) > 0 {
                used.insert(k / per);
            }
        }
        let mut start = counts.dense_len();
        for (k, _) in counts.past_end() {
            if value(k) > 0 {
                used.insert(k / per);
                start = start.max(k + 1);
            }
        }
        let layout = self.free_layout(before, &used, start, per)?;
        let storage = Arc::clone(&self.storage);
        let mut table = vec![0u64; (layout.table_clusters * cs / 8) as usize];
        for (j, &b) in layout.blocks.iter().enumerate() {
            let at = (layout.start + j as u64) << cb;
            let mut bytes = vec![0u8; cs as usize];
            for i in 0..per {
                let k = b * per + i;
                let v = if layout.contains(k) { 1 } else { value(k) };
                if v > 0 {
                    refcount_set(&mut bytes, i as usize, order, v)?;
                }
            }
            self.guarded_write(w, WriteKind::NewTable, storage.as_ref(), at, &bytes)?;
            table[b as usize] = at;
        }
        let table_offset = layout.table_start() << cb;
        let table_bytes = write_u64_table(&table);
        self.guarded_write(
            w,
            WriteKind::NewTable,
            storage.as_ref(),
            table_offset,
            &table_bytes,
        )?;
        storage.flush()?;

        // The one header write that switches to the new structure.
        let old_table = (w.header.refcount_table_offset, w.refcounts.table_clusters());
        let old_blocks: Vec<u64> = w.refcounts.table.clone();
        w.header.refcount_table_offset = table_offset;
        w.header.refcount_table_clusters = u32::try_from(layout.table_clusters)
            .map_err(|_| ImageError::Unsupported("rebuilt refcount table too large".into()))?;
        self.write_header(w)?;
        storage.flush()?;
        w.refcounts =
            crate::image::write::refcounts::Refcounts::new(cb, order, table_offset, table);

        // The map follows: the old structure is no longer metadata, the new one is.
        // Removing what was never entered (absurd offsets) fails harmlessly.
        let _ = self.map_remove(old_table.0, old_table.1, MetadataType::REFCOUNT_TABLE);
        for e in old_blocks {
            let off = ReftableEntry(e).block_offset().0;
            if off != 0 && off % cs == 0 {
                let _ = self.map_remove(off, 1, MetadataType::REFCOUNT_BLOCK);
            }
        }
        for j in 0..layout.blocks.len() as u64 {
            self.map_enter(w, (layout.start + j) << cb, 1, MetadataType::REFCOUNT_BLOCK)?;
        }
        self.map_enter(
            w,
            table_offset,
            layout.table_clusters,
            MetadataType::REFCOUNT_TABLE,
        )?;
        let l1 = self.l1_table();
        self.refresh_fallback(w, &l1)
    }

    /// Places the rebuilt structure from cluster `start` (past the file and every counted
    /// reference), moved further until it meets nothing: no metadata the map knows (a table
    /// may lie past the end of a truncated file) and no reference past the end of the file
    /// that the check did not count, which would otherwise point into the new structure.
    fn free_layout(
        &self,
        before: &CheckReport,
        used: &BTreeSet<u64>,
        mut start: u64,
        per: u64,
    ) -> Result<NewLayout, ImageError> {
        let cs = self.geometry.cluster_size();
        let cb = self.geometry.cluster_bits();
        let clusters = |off: u64, len: u64| (off >> cb, off.saturating_add(len).div_ceil(cs));
        let map = self.map();
        let mut avoid: Vec<(u64, u64)> = map
            .extents()
            .into_iter()
            .map(|(off, len, _)| clusters(off, len))
            .chain(
                map.unchecked_ranges()
                    .into_iter()
                    .map(|(o, l)| clusters(o, l)),
            )
            .collect();
        drop(map);
        avoid.extend(before.findings.iter().filter_map(|f| match f.kind {
            FindingKind::PastEnd { offset, len } => Some(clusters(offset, len)),
            _ => None,
        }));
        avoid.retain(|&(_, end)| end > start);
        avoid.sort_unstable();
        loop {
            let layout = NewLayout::place(used, start, per, cs)?;
            let end = layout.table_start() + layout.table_clusters;
            match avoid.iter().find(|&&(a, b)| a < end && b > start) {
                Some(&(_, b)) => start = b,
                None => return Ok(layout),
            }
        }
    }
}

/// Where a rebuilt refcount structure goes: `blocks.len()` refcount blocks from cluster
/// `start`, then the refcount table.
#[derive(Debug, PartialEq, Eq)]
struct NewLayout {
    start: u64,
    /// The refcount table indices of the new blocks, in the order they are placed.
    blocks: Vec<u64>,
    table_clusters: u64,
}

impl NewLayout {
    /// Places blocks for the ranges in `used` and for the new structure itself, from cluster
    /// `start`. The structure's size depends on the ranges it covers, which depend on its
    /// size: grow until both agree (a few rounds at most).
    fn place(used: &BTreeSet<u64>, start: u64, per: u64, cs: u64) -> Result<Self, ImageError> {
        let mut layout = NewLayout {
            start,
            blocks: used.iter().copied().collect(),
            table_clusters: 1,
        };
        for _ in 0..64 {
            let end = layout.table_start() + layout.table_clusters;
            let too_far = match end.checked_mul(cs) {
                Some(bytes) => bytes > MAX_HOST_OFFSET,
                None => true,
            };
            if too_far {
                return Err(ImageError::Unsupported(format!(
                    "cannot rebuild the refcount structure: no room for it below {MAX_HOST_OFFSET:#x}"
                )));
            }
            let mut blocks = used.clone();
            blocks.extend(start / per..=(end - 1) / per);
            let entries = blocks.last().map_or(1, |&b| b + 1);
            let table_clusters = entries.saturating_mul(8).div_ceil(cs).max(1);
            if table_clusters.saturating_mul(cs) > MAX_REFTABLE_BYTES {
                return Err(ImageError::Unsupported(format!(
                    "cannot rebuild the refcount structure: a refcount table for clusters up \
                     to {:#x} would exceed {MAX_REFTABLE_BYTES} bytes",
                    start.saturating_add(blocks.len() as u64)
                )));
            }
            let blocks: Vec<u64> = blocks.into_iter().collect();
            if blocks == layout.blocks && table_clusters == layout.table_clusters {
                return Ok(layout);
            }
            layout.blocks = blocks;
            layout.table_clusters = table_clusters;
        }
        Err(ImageError::Unsupported(
            "could not place a rebuilt refcount structure".into(),
        ))
    }

    fn table_start(&self) -> u64 {
        self.start + self.blocks.len() as u64
    }

    /// Whether cluster `k` belongs to the new structure.
    fn contains(&self, k: u64) -> bool {
        k >= self.start && k < self.table_start() + self.table_clusters
    }
}

#[cfg(test)]
mod tests {
    use super::super::Repair;
    use super::*;
    use crate::format::entry::OFLAG_COPIED;
    use crate::image::testutil::*;
    use crate::image::OpenOptions;
    use crate::storage::MemStorage;

    fn repaired(bytes: Vec<u8>) -> (Arc<MemStorage>, CheckReport) {
        let (st, img) = open_for_repair(bytes);
        let r = img.repair(Repair::All).unwrap();
        (st, r)
    }

    fn check(st: &Arc<MemStorage>) -> (Image, CheckReport) {
        let view = Image::from_storage(st.clone(), OpenOptions::default()).unwrap();
        let r = view.check().unwrap();
        (view, r)
    }

    fn put64(b: &mut [u8], at: u64, v: u64) {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn cleared_reftable_entry_is_rebuilt_and_the_old_structure_freed() {
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7)]);
        put64(&mut b, CS, 0);
        let len = b.len() as u64;
        let (st, r) = repaired(b);
        assert!(r
            .repair_log
            .iter()
            .any(|l| l == "Rebuilding refcount structure"));
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{:?}",
            r.findings
        );
        let (view, after) = check(&st);
        assert_eq!(after.exit_code(), 0);
        assert!(view.header().refcount_table_offset >= len);
        // The old refcount table (1) and block (2) are referenced by nothing and free.
        assert!(after.used_runs.iter().all(|&(s, n)| s + n <= 1 || s >= 3));
        let mut got = vec![0u8; 4];
        view.read_at(crate::format::GuestOffset(0), &mut got)
            .unwrap();
        assert_eq!(got, [7; 4]);
    }

    #[test]
    fn refcount_block_on_an_l2_table_is_moved_away() {
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 9)]);
        put64(&mut b, CS + 8, 4 * CS); // refcount table entry 1 -> the L2 table
        let (st, r) = repaired(b);
        assert_eq!(
            (r.corruptions, r.leaks, r.overlap_count),
            (0, 0, 0),
            "{:?}",
            r.findings
        );
        assert_eq!(check(&st).1.exit_code(), 0);
    }

    #[test]
    fn shared_cluster_keeps_its_refcount_in_a_rebuild() {
        // Guest cluster 0 on the L1 table (cluster 3, refcount 1, two users); guest cluster 1
        // at cluster 5 with refcount 0 (which needs the rebuild).
        let l2 = [OFLAG_COPIED | (3 * CS), OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7)]);
        b[(2 * CS + 11) as usize] = 0;
        let (st, r) = repaired(b);
        assert!(r
            .repair_log
            .iter()
            .any(|l| l == "Rebuilding refcount structure"));
        let (_, after) = check(&st);
        let low: Vec<(u64, u64)> = after
            .findings
            .iter()
            .filter_map(|f| match f.kind {
                FindingKind::RefcountTooLow {
                    cluster, refcount, ..
                } => Some((cluster, refcount)),
                _ => None,
            })
            .collect();
        assert_eq!(low, vec![(3, 1)], "{:?}", after.findings);
        assert_eq!(after.overlap_count, 1);
    }

    #[test]
    fn new_structure_stays_clear_of_references_past_the_end() {
        // Guest cluster 1 points one cluster past the end of the file (7 of 6): not counted,
        // and the new structure must not land there.
        let l2 = [OFLAG_COPIED | (5 * CS), OFLAG_COPIED | (7 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7)]);
        b[(2 * CS + 11) as usize] = 0;
        let (st, _) = repaired(b);
        let (view, after) = check(&st);
        assert!(view.header().refcount_table_offset >= 8 * CS);
        assert!(view.refcount_table().iter().all(|&e| e == 0 || e >= 8 * CS));
        // The file grew over cluster 7: the reference now counts, and nothing else uses it.
        assert!(after.overlaps.is_empty());
        assert!(after.findings.iter().any(|f| matches!(
            f.kind,
            FindingKind::RefcountTooLow {
                cluster: 7,
                refcount: 0,
                ..
            }
        )));
    }

    #[test]
    fn layout_past_the_largest_host_offset_is_refused() {
        let used: BTreeSet<u64> = [0].into_iter().collect();
        let err = NewLayout::place(&used, (MAX_HOST_OFFSET >> 9) - 1, 2048, 512).unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
    }

    #[test]
    fn layout_covers_itself() {
        let used: BTreeSet<u64> = [0].into_iter().collect();
        // 512-byte clusters, 16-bit refcounts: 2048 clusters a block; start just below a range.
        let l = NewLayout::place(&used, 2047, 2048, 512).unwrap();
        assert_eq!(l.blocks, vec![0, 1]);
        assert!(l.contains(2047) && l.contains(2049) && !l.contains(2050));
    }
}
