//! The references an L1 table holds, counted and dropped in memory, and the COPIED flags made
//! to follow the counts.
//!
//! The invariant: a COPIED flag on disk never claims sole ownership of a cluster that is
//! shared. Counting happens before any flag is cleared (a snapshot), and flags are set only
//! while the disk still holds the higher, older counts (a delete or an apply), so a crash at
//! any step leaves leaks at worst.

use std::ops::ControlFlow;

use crate::format::entry::{L1Entry, L2Entry};
use crate::format::{read_u64_table, write_u64_table, ClusterIndex};
use crate::image::write::guard::WriteKind;
use crate::image::write::Writer;
use crate::image::{Image, ImageError};

/// What a reference walk met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ref {
    /// An L2 table (the cluster of a non-zero L1 entry).
    L2Table,
    /// A cluster an L2 entry references (data, or part of a compressed cluster).
    Data,
}

/// A visitor of references: `Break` stops the walk early.
type Visit<'a> = dyn FnMut(ClusterIndex, Ref) -> Result<ControlFlow<()>, ImageError> + 'a;

/// The L2 table offsets an L1 table references.
pub(super) fn l2_tables(l1: &[u64]) -> impl Iterator<Item = u64> + '_ {
    l1.iter()
        .map(|&e| L1Entry(e).l2_offset().0)
        .filter(|&t| t != 0)
}

impl Image {
    /// After references were dropped in memory (`freed`: the clusters that reached 0): COPIED
    /// is set in the active tables where a refcount fell to 1 while the disk still counts the
    /// old references (so a crash leaves leaks, never a COPIED flag on a shared cluster); then
    /// the lower refcounts are written, and the map and the cache forget the freed clusters.
    pub(super) fn finish_dropping(&self, w: &mut Writer, freed: &[u64]) -> Result<(), ImageError> {
        let l1 = self.l1_table();
        let active = self.sync_copied(w, &l1)?;
        self.write_active_l1(w, &l1, &active)?;
        self.forget_freed(freed)?;
        self.write_refcounts(w)?;
        // What the snapshot alone referenced is free on disk now: the host file gets its space
        // back (QEMU's `pass-discard-snapshot`).
        self.discard_free_clusters(&mut freed.to_vec());
        self.l2_cache.clear();
        self.flush_locked(w)
    }

    /// Calls `f` for every reference an L1 table holds: each L2 table, then each cluster its
    /// entries reference (a compressed cluster: every host cluster its bytes touch), one call
    /// per reference, until `f` breaks. L2 tables are read from disk (callers flush first).
    fn walk_references(&self, l1: &[u64], f: &mut Visit<'_>) -> Result<(), ImageError> {
        let g = self.geometry;
        let (cs, cb) = (g.cluster_size(), g.cluster_bits());
        let step = if g.is_extended_l2() { 2 } else { 1 };
        let mut bytes = vec![0u8; cs as usize];
        for (i, &e) in l1.iter().enumerate() {
            let Some(t) = self.l2_table_offset(i as u64, e)? else {
                continue;
            };
            if f(ClusterIndex(t >> cb), Ref::L2Table)?.is_break() {
                return Ok(());
            }
            self.storage.read_padded(t, &mut bytes)?;
            for e in read_u64_table(&bytes)
                .into_iter()
                .step_by(step)
                .map(L2Entry)
            {
                if e.is_compressed() {
                    if let Some((start, end)) = e.compressed(cb).and_then(|d| d.sector_range()) {
                        for c in (start >> cb)..=((end - 1) >> cb) {
                            if f(ClusterIndex(c), Ref::Data)?.is_break() {
                                return Ok(());
                            }
                        }
                    }
                    continue;
                }
                let host = e.host_offset();
                if host.0 == 0 {
                    continue;
                }
                if !g.is_aligned(host) {
                    return Err(ImageError::Corruption(format!(
                        "Cluster allocation offset {:#x} unaligned (L2 table at {t:#x})",
                        host.0
                    )));
                }
                if f(ClusterIndex(host.0 >> cb), Ref::Data)?.is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Drops (in memory) one reference to everything `l1` reaches; returns the clusters
    /// freed. The caller writes the refcount blocks once nothing on disk references them.
    pub(super) fn drop_references(
        &self,
        w: &mut Writer,
        l1: &[u64],
    ) -> Result<Vec<u64>, ImageError> {
        let storage = std::sync::Arc::clone(&self.storage);
        let mut freed = Vec::new();
        let mut freed_data = Vec::new();
        self.walk_references(l1, &mut |c, kind| {
            if w.refcounts.adjust(storage.as_ref(), c.0, -1)? == 0 {
                freed.push(c.0);
                if kind == Ref::Data {
                    freed_data.push(c);
                }
            }
            Ok(ControlFlow::Continue(()))
        })?;
        self.refuse_freeing_metadata(w, None, &freed_data)?;
        Ok(freed)
    }

    /// Adds one reference (in memory) to everything `l1` reaches. All or nothing: when a
    /// refcount cannot grow, the references added so far are taken back.
    pub(super) fn count_references(&self, w: &mut Writer, l1: &[u64]) -> Result<(), ImageError> {
        let storage = std::sync::Arc::clone(&self.storage);
        let mut done = 0u64;
        let r = self.walk_references(l1, &mut |c, _| {
            w.refcounts.adjust(storage.as_ref(), c.0, 1)?;
            done += 1;
            Ok(ControlFlow::Continue(()))
        });
        if let Err(e) = r {
            let mut undone = 0u64;
            // Best effort: the error that stopped the count is the one reported.
            let _ = self.walk_references(l1, &mut |c, _| {
                if undone == done {
                    return Ok(ControlFlow::Break(()));
                }
                undone += 1;
                w.refcounts.adjust(storage.as_ref(), c.0, -1)?;
                Ok(ControlFlow::Continue(()))
            });
            return Err(e);
        }
        Ok(())
    }

    /// Makes the COPIED flags of the tables `l1` reaches follow the refcounts in memory: set
    /// iff the refcount is 1 (never set in a table that is itself shared). Changed L2 tables
    /// are written, then a barrier. Returns `l1` with its own COPIED flags made exact (the
    /// caller writes it, see [`Image::write_active_l1`]).
    pub(super) fn sync_copied(&self, w: &mut Writer, l1: &[u64]) -> Result<Vec<u64>, ImageError> {
        let g = self.geometry;
        let (cs, cb) = (g.cluster_size(), g.cluster_bits());
        let step = if g.is_extended_l2() { 2 } else { 1 };
        let storage = std::sync::Arc::clone(&self.storage);
        let st = storage.as_ref();
        let mut out = l1.to_vec();
        let mut bytes = vec![0u8; cs as usize];
        let mut wrote = false;
        for (i, slot) in out.iter_mut().enumerate() {
            let Some(t) = self.l2_table_offset(i as u64, *slot)? else {
                *slot = L1Entry(*slot).without_reserved().with_copied(false).0;
                continue;
            };
            let owned = w.refcounts.get(st, t >> cb)? == 1;
            *slot = L1Entry(*slot).without_reserved().with_copied(owned).0;
            st.read_padded(t, &mut bytes)?;
            let mut table = read_u64_table(&bytes);
            let mut changed = false;
            for word in table.iter_mut().step_by(step) {
                let e = L2Entry(*word);
                let host = e.host_offset();
                // Compressed clusters never carry COPIED, and entries without a host cluster
                // (plain zero, unallocated) have nothing to own.
                let want = !e.is_compressed()
                    && host.0 != 0
                    && owned
                    && w.refcounts.get(st, host.0 >> cb)? == 1;
                if want != e.copied() {
                    *word = e.with_copied(want).0;
                    changed = true;
                }
            }
            if changed {
                let kind = if owned {
                    WriteKind::L2Table
                } else {
                    WriteKind::SharedL2Table
                };
                self.guarded_write(w, kind, st, t, &write_u64_table(&table))?;
                wrote = true;
            }
        }
        if wrote {
            st.flush()?;
        }
        Ok(out)
    }
}
