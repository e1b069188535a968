//! The edits of a repair's steps (see `repair.rs`): step 0's unaligned preallocated entries
//! made zero clusters, step 1's refcounts set in place, step 2's COPIED flags made to follow the
//! refcounts; each leaves shared clusters alone and goes through `guarded_write`.

use std::collections::HashSet;
use std::sync::Arc;

use super::{CheckReport, FindingKind, L2Position, Repair};
use crate::format::entry::L2Entry;
use crate::format::HostOffset;
use crate::image::write::l2::Slot;
use crate::image::write::Writer;
use crate::image::WriteKind;
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

impl Image {
    /// Step 0 ([`Repair::All`]): an active L2 entry for a preallocated zero cluster whose
    /// offset is not cluster-aligned cannot be trusted to point anywhere; as qemu-img does, it
    /// becomes a plain zero cluster (the guest reads zeros either way). Returns the entries
    /// fixed.
    pub(super) fn zero_unaligned(
        &self,
        w: &mut Writer,
        before: &CheckReport,
        shared: &HashSet<u64>,
        log: &mut Vec<String>,
    ) -> Result<u64, ImageError> {
        let mut fixed = 0;
        let ext = self.geometry.is_extended_l2();
        for f in &before.findings {
            let FindingKind::PreallocatedUnaligned {
                entry,
                offset,
                at: Some(at),
                ..
            } = f.kind
            else {
                continue;
            };
            let Some(i) = self.pin_entry(at, shared)? else {
                continue;
            };
            let table = HostOffset(at.table);
            let old = self.l2_slot(table, i)?;
            if old.entry != entry {
                continue;
            }
            let zero = if ext {
                // Allocated subclusters (there are none: it holds no data) become zero.
                let bits = old.bitmap | old.bitmap << 32;
                Slot {
                    entry: L2Entry::UNALLOCATED,
                    bitmap: bits & !0xffff_ffff,
                }
            } else {
                Slot::plain(L2Entry::ZERO)
            };
            self.l2_rewrite_broken(table, i, zero)?;
            fixed += 1;
            log.push(format!(
                "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 \
                 entry corrupted."
            ));
        }
        if fixed > 0 {
            self.flush_locked(w)?;
        }
        Ok(fixed)
    }

    /// Pins the active L2 table of the entry at `at` for an edit of the entry, and returns the
    /// entry's index; `None` when the entry may not be
    /// changed: the table is a shared cluster, is no longer referenced there, or its
    /// write-back would cover other metadata (an L2 table a snapshot also uses).
    fn pin_entry(
        &self,
        at: L2Position,
        shared: &HashSet<u64>,
    ) -> Result<Option<usize>, ImageError> {
        let L2Position {
            l1_index,
            table,
            index,
        } = at;
        let cs = self.geometry.cluster_size();
        if table == 0
            || shared.contains(&(table >> self.geometry.cluster_bits()))
            || !self
                .check_overlap(HostOffset(table), cs, MetadataType::ACTIVE_L2)?
                .is_empty()
        {
            return Ok(None);
        }
        if self.l1_entry(l1_index).l2_offset() != HostOffset(table) {
            return Ok(None);
        }
        let Ok(Some(t)) = self.l2_table(l1_index) else {
            return Ok(None);
        };
        self.l2_cache.pin(HostOffset(table), t);
        Ok(usize::try_from(index)
            .ok()
            .filter(|&i| (i as u64) < self.geometry.l2_entries()))
    }

    /// Clears a COPIED flag that an entry of an L2 table shared with a snapshot carries
    /// although its cluster is shared: the dangerous direction (a writer trusting it would
    /// overwrite the snapshot's data in place). The table is rewritten directly as a shared
    /// table (its own cluster is INACTIVE_L2, and ACTIVE_L2 too); only clearing is done here,
    /// never setting. Returns whether the flag was cleared.
    fn clear_copied_in_shared_table(
        &self,
        w: &mut Writer,
        at: L2Position,
        entry: L2Entry,
    ) -> Result<bool, ImageError> {
        let L2Position {
            l1_index,
            table,
            index,
        } = at;
        let g = self.geometry;
        let cs = g.cluster_size();
        let both = MetadataType::ACTIVE_L2 | MetadataType::INACTIVE_L2;
        if table == 0
            || self.l1_entry(l1_index).l2_offset() != HostOffset(table)
            || !g.is_aligned(HostOffset(table))
            || !self
                .check_overlap(HostOffset(table), cs, MetadataType::ACTIVE_L2)?
                .contains(MetadataType::INACTIVE_L2)
            || !self.check_overlap(HostOffset(table), cs, both)?.is_empty()
        {
            return Ok(false);
        }
        let mut bytes = vec![0u8; cs as usize];
        self.storage.read_padded(table, &mut bytes)?;
        let Some(at) = usize::try_from(index.saturating_mul(g.l2_entry_size()))
            .ok()
            .filter(|&at| at + 8 <= bytes.len())
        else {
            return Ok(false);
        };
        let word = L2Entry(u64::from_be_bytes(
            bytes[at..at + 8].try_into().unwrap_or([0; 8]),
        ));
        if word != entry || !word.copied() {
            return Ok(false);
        }
        bytes[at..at + 8].copy_from_slice(&word.with_copied(false).0.to_be_bytes());
        let storage = Arc::clone(&self.storage);
        self.guarded_write(w, WriteKind::SharedL2Table, storage.as_ref(), table, &bytes)?;
        self.l2_cache.forget(HostOffset(table));
        Ok(true)
    }

    /// Step 1 in place: each wrong refcount the mode may fix is set to the recomputed count
    /// (written back by the flush's refcount phase, through `guarded_write`).
    pub(super) fn fix_refcounts(
        &self,
        w: &mut Writer,
        mode: Repair,
        before: &CheckReport,
        shared: &HashSet<u64>,
        log: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        let storage = Arc::clone(&self.storage);
        for f in &before.findings {
            let Some((cluster, refcount, reference)) = f.refcount_mismatch() else {
                continue;
            };
            // Leaks always; refcounts too low only in `all` mode, and not from 0 (a cluster
            // with refcount 0 in use means the structure is rebuilt instead).
            let allowed = refcount > reference || (mode == Repair::All && refcount > 0);
            if allowed && !shared.contains(&cluster) {
                w.refcounts.set(storage.as_ref(), cluster, reference)?;
                log.push(format!(
                    "Repairing cluster {cluster} refcount={refcount} reference={reference}"
                ));
            }
        }
        self.flush_locked(w)
    }

    /// Step 2: COPIED flags of active L1 and L2 entries follow the refcounts on disk (checked
    /// in `mid`, after step 1). Changed in the writer's L1 table and pinned L2 tables, written
    /// back by the flush through `guarded_write`. An entry is left alone when its table or its
    /// target is a shared cluster, or when the table's write-back would cover other metadata.
    /// Returns the flags fixed.
    pub(super) fn fix_copied(
        &self,
        w: &mut Writer,
        mid: &CheckReport,
        shared: &HashSet<u64>,
        log: &mut Vec<String>,
    ) -> Result<u64, ImageError> {
        let cb = self.geometry.cluster_bits();
        let mut fixed = 0;
        for f in &mid.findings {
            let FindingKind::CopiedL1 {
                l1_index,
                entry,
                refcount,
            } = f.kind
            else {
                continue;
            };
            let Ok(i) = usize::try_from(l1_index) else {
                continue;
            };
            let at = w.header.l1_table_offset.saturating_add(8 * l1_index);
            if shared.contains(&(entry.l2_offset().0 >> cb))
                || !self
                    .check_overlap(HostOffset(at), 8, MetadataType::ACTIVE_L1)?
                    .is_empty()
            {
                continue;
            }
            let mut l1 = self.l1.write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = l1.get_mut(i).filter(|s| **s == entry.0) {
                *slot = entry.with_copied(refcount == 1).0;
                w.l1_dirty.insert(i);
                fixed += f.times;
                log.push(format!(
                    "Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} \
                     refcount={refcount}",
                    entry.0
                ));
            }
        }
        for f in &mid.findings {
            let FindingKind::CopiedL2 {
                at,
                entry,
                refcount,
            } = f.kind
            else {
                continue;
            };
            if shared.contains(&(entry.host_offset().0 >> cb)) {
                continue;
            }
            let fixed_here = match self.pin_entry(at, shared)? {
                Some(i) if self.l2_slot(HostOffset(at.table), i)?.entry == entry => {
                    self.l2_set_copied(HostOffset(at.table), i, refcount == 1)?;
                    true
                }
                Some(_) => false,
                None => refcount != 1 && self.clear_copied_in_shared_table(w, at, entry)?,
            };
            if fixed_here {
                fixed += f.times;
                log.push(format!(
                    "Repairing OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                    entry.0
                ));
            }
        }
        Ok(fixed)
    }
}
