//! The comparing part of the check's walk: the refcount blocks counted, every recomputed
//! refcount compared with the one on disk, and clusters with two owners named as overlaps.

use std::collections::BTreeMap;

use super::finding::{Finding, FindingKind};
use super::report::{Overlap, Owner, MAX_RUNS};
use super::walk::Checker;
use crate::format::refcount_get;
use crate::format::ReftableEntry;

impl Checker<'_> {
    /// The end of the range of clusters qemu-img compares: the file, grown to the last cluster
    /// referenced past its end.
    pub(super) fn compared_clusters(&self) -> u64 {
        let past = self.refs.past.keys().next_back().map_or(0, |&k| k + 1);
        self.file_clusters.max(past)
    }

    pub(super) fn refblocks(&mut self, reftable: &[u64]) {
        let cs = self.cs;
        for (i, &e) in reftable.iter().enumerate() {
            let off = ReftableEntry(e).block_offset().0;
            let index = i as u64;
            if ReftableEntry(e).reserved_bits() != 0 {
                let kind = FindingKind::ReftableReserved { index, offset: off };
                self.report.add(Finding::once(kind));
                continue;
            }
            if off % cs != 0 {
                let kind = FindingKind::RefblockUnaligned { index, offset: off };
                self.report.add(Finding::once(kind));
                continue;
            }
            let k = off >> self.cb;
            if k >= self.compared_clusters() {
                let kind = FindingKind::RefblockOutside { index, offset: off };
                self.report.add(Finding::once(kind));
                continue;
            }
            if off != 0 {
                self.inc(off, cs, 1);
                if off.saturating_add(cs) < self.img.file_len().saturating_add(cs) {
                    self.refcount_structures.push(k);
                }
                let rc = self.refs.get(k);
                if rc != 1 {
                    self.report
                        .add(Finding::once(FindingKind::RefblockRefcount {
                            index,
                            offset: off,
                            reference: rc,
                        }));
                }
            }
        }
    }

    /// Step 4: on-disk against recomputed refcounts.
    pub(super) fn compare(&mut self) {
        let end = self.compared_clusters();
        let per_block = (self.cs * 8) >> self.order;
        let mut highest: Option<u64> = None;
        // Unreadable refcount blocks: every cluster they cover is a check error.
        let unreadable = std::mem::take(&mut self.unreadable_blocks);
        for &b in &unreadable {
            let first = b * per_block;
            let last = (first + per_block).min(end);
            if first < last {
                let block = ReftableEntry(self.img.scanned.refcount_table[b as usize])
                    .block_offset()
                    .0;
                let kind = FindingKind::RefcountUnreadable {
                    first_cluster: first,
                    block,
                };
                self.report.add(Finding::counted(kind, last - first));
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
            let referenced = u64::from(raw);
            let on_disk = u64::from(self.disk.small[k as usize]);
            if on_disk == referenced && on_disk != u64::from(u8::MAX) {
                if on_disk != 0 {
                    highest = Some(k);
                }
                continue;
            }
            if !unreadable.is_empty() && is_unreadable(k) {
                continue;
            }
            let (on_disk, referenced) = (self.disk.get(k), self.refs.get(k));
            self.compare_one(k, on_disk, referenced, &mut highest);
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
                let off = ReftableEntry(reftable[b as usize]).block_offset().0;
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
                let on_disk = disk_past.get(&k).copied().unwrap_or(0);
                let referenced = self.refs.get(k);
                self.compare_one(k, on_disk, referenced, &mut highest);
            }
        }
        self.unreadable_blocks = unreadable;
        self.report.image_end_offset = highest.map_or(0, |h| h + 1).max(1) << self.cb;
    }

    pub(super) fn push_run(&mut self, start: u64, end: u64) {
        let runs = &mut self.report.used_runs;
        if runs.len() < MAX_RUNS {
            runs.push((start, end - start));
        } else if let Some(last) = runs.last_mut() {
            last.1 = end - last.0;
        }
    }

    pub(super) fn compare_one(
        &mut self,
        k: u64,
        on_disk: u64,
        referenced: u64,
        highest: &mut Option<u64>,
    ) {
        if on_disk > 0 || referenced > 0 {
            *highest = Some(k);
        }
        if on_disk == referenced {
            return;
        }
        let (cluster, offset) = (k, k << self.cb);
        let kind = if on_disk < referenced {
            FindingKind::RefcountTooLow {
                cluster,
                offset,
                refcount: on_disk,
                reference: referenced,
            }
        } else {
            FindingKind::RefcountTooHigh {
                cluster,
                offset,
                refcount: on_disk,
                reference: referenced,
            }
        };
        self.report.add(Finding::once(kind));
    }

    /// Step 6: metadata clusters with two owners that may not share them.
    pub(super) fn overlaps(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::CS;

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
}
