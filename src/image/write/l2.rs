//! The active L2 tables as the writer changes them: a table made ready for a change
//! (allocated, or copied when a snapshot shares it) and pinned in the cache, and the typed
//! edits of its slots.
//!
//! The invariant the edits protect: a mapping is replaced only together with the release of
//! what it referenced. [`Image::l2_replace`] checks, before the slot changes, that the clusters
//! about to lose their reference hold no metadata, and hands back a [`Replaced`] that must be
//! released (queued for the refcount drop after the table is on disk); dropping it unused is a
//! compile-time warning. Only a repair rewrites an entry without that
//! ([`Image::l2_rewrite_broken`]): an entry it cannot trust is not trusted to reference anything.

use std::sync::Arc;

use super::Writer;
use crate::format::entry::{L1Entry, L2Entry};
use crate::format::{ClusterIndex, HostOffset};
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

/// What one L2 slot maps: the entry and, with extended L2 entries, its subcluster bitmap (0 for
/// standard entries, which have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::image) struct Slot {
    /// The entry (the first word of an extended entry).
    pub entry: L2Entry,
    /// Subcluster allocation (bits 0–31) and zero (bits 32–63) bits; 0 for standard entries.
    pub bitmap: u64,
}

impl Slot {
    /// A slot with `entry` and no subcluster bits.
    pub fn plain(entry: L2Entry) -> Slot {
        Slot { entry, bitmap: 0 }
    }
}

/// The mapping an L2 edit replaced. The host clusters whose reference it dropped are still
/// counted as in use: [`Replaced::release`] queues their refcount drop.
#[must_use = "the clusters the old mapping referenced must be released"]
#[derive(Debug)]
pub(in crate::image) struct Replaced {
    /// Host clusters that lost their reference (already checked to hold no metadata).
    orphans: Vec<ClusterIndex>,
}

impl Replaced {
    /// Queues the refcount drop of the clusters that lost their reference; the flush applies
    /// it after the L2 table that no longer points to them is on disk.
    pub fn release(self, w: &mut Writer) {
        for c in self.orphans {
            w.refcounts.free_later(c.0);
        }
    }

    /// [`Replaced::release`] for a guest discard or zero write: the clusters this frees are
    /// also given back to the host file once their refcount of 0 is on disk.
    pub fn release_discarding(self, w: &mut Writer) {
        w.discard_when_free.extend(self.orphans.iter().map(|c| c.0));
        self.release(w);
    }
}

impl Image {
    /// Entry `index` of the live active L1 table (unallocated past its end).
    pub(in crate::image) fn l1_entry(&self, index: u64) -> L1Entry {
        let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(index)
            .ok()
            .and_then(|i| l1.get(i).copied())
            .map_or(L1Entry::UNALLOCATED, L1Entry)
    }

    /// The L2 table for L1 index `l1_index`, ready to change: allocated if missing, copied if
    /// shared with a snapshot. Returns its offset; the table is pinned in the cache, where it is
    /// changed in place ([`Image::l2_slot`], [`Image::l2_replace`]).
    pub(in crate::image) fn l2_for_write(
        &self,
        w: &mut Writer,
        l1_index: u64,
    ) -> Result<HostOffset, ImageError> {
        let idx = usize::try_from(l1_index)
            .map_err(|_| ImageError::Corruption("L1 index out of range".into()))?;
        let entry = {
            let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
            L1Entry(*l1.get(idx).ok_or_else(|| {
                ImageError::Corruption(format!("L1 index {idx} past the L1 table"))
            })?)
        };
        let words = (self.geometry.cluster_size() / 8) as usize;
        let offset = entry.l2_offset();
        if entry.owns_table() {
            let table = self
                .l2_table(l1_index)?
                .ok_or_else(|| ImageError::Corruption("L2 table vanished".into()))?;
            self.l2_cache.pin(offset, table);
            return Ok(offset);
        }
        // A new table, or a copy of one shared with a snapshot.
        let table = if !entry.is_allocated() {
            vec![0u64; words]
        } else {
            let old = self
                .l2_table(l1_index)?
                .ok_or_else(|| ImageError::Corruption("L2 table vanished".into()))?;
            w.refcounts
                .free_later(offset.0 >> self.geometry.cluster_bits());
            self.map_remove(offset.0, 1, MetadataType::ACTIVE_L2)?;
            // Every cluster the copy references is shared with the old table now: no entry
            // of the copy may claim sole ownership (COPIED), whatever the old one said.
            let step = if self.geometry.is_extended_l2() { 2 } else { 1 };
            let mut copy = old.as_ref().clone();
            for e in copy.iter_mut().step_by(step) {
                *e = L2Entry(*e).with_copied(false).0;
            }
            copy
        };
        let new = self.allocate_metadata(w, MetadataType::ACTIVE_L2)?;
        self.l1.write().unwrap_or_else(|e| e.into_inner())[idx] = L1Entry::owned_table(new).0;
        w.l1_dirty.insert(idx);
        self.refresh_fallback_now(w)?;
        self.l2_cache.pin(new, Arc::new(table));
        Ok(new)
    }

    /// The word index of slot `index`'s entry in an L2 table (its bitmap follows it with
    /// extended L2 entries).
    fn entry_word(&self, index: usize) -> usize {
        if self.geometry.is_extended_l2() {
            2 * index
        } else {
            index
        }
    }

    /// Edits the pinned L2 table at `l2` with `f`; an error if it is not pinned (an
    /// inconsistency of the writer, not of the image: the slot cannot be changed).
    fn l2_edit<R>(
        &self,
        l2: HostOffset,
        f: impl FnOnce(&mut Vec<u64>) -> Option<R>,
    ) -> Result<R, ImageError> {
        self.l2_cache
            .edit(l2, f)
            .flatten()
            .ok_or_else(|| ImageError::Corruption(format!("L2 table at {:#x} is not pinned", l2.0)))
    }

    /// Slot `index` of the pinned L2 table at `l2`.
    pub(in crate::image) fn l2_slot(
        &self,
        l2: HostOffset,
        index: usize,
    ) -> Result<Slot, ImageError> {
        let word = self.entry_word(index);
        let ext = self.geometry.is_extended_l2();
        self.l2_edit(l2, |t| {
            let entry = L2Entry(*t.get(word)?);
            let bitmap = if ext { *t.get(word + 1)? } else { 0 };
            Some(Slot { entry, bitmap })
        })
    }

    /// Slots `index..index + n` of the pinned L2 table at `l2` (standard entries).
    pub(in crate::image) fn l2_entries(
        &self,
        l2: HostOffset,
        index: usize,
        n: usize,
    ) -> Result<Vec<L2Entry>, ImageError> {
        debug_assert!(!self.geometry.is_extended_l2());
        self.l2_edit(l2, |t| {
            Some(
                t.get(index..index + n)?
                    .iter()
                    .map(|&e| L2Entry(e))
                    .collect(),
            )
        })
    }

    /// The host clusters `entry` references (one for a standard cluster, every cluster its
    /// sectors touch for a compressed one, none for an unallocated or zero-only entry).
    fn referenced_clusters(&self, entry: L2Entry) -> Vec<ClusterIndex> {
        let bits = self.geometry.cluster_bits();
        if entry.is_compressed() {
            let Some((start, end)) = entry.compressed(bits).and_then(|d| d.sector_range()) else {
                return Vec::new();
            };
            return ((start >> bits)..=((end - 1) >> bits))
                .map(ClusterIndex)
                .collect();
        }
        let host = entry.host_offset().0;
        if host == 0 {
            Vec::new()
        } else {
            vec![ClusterIndex(host >> bits)]
        }
    }

    /// Replaces the mapping of slot `index` in the pinned L2 table at `l2` with `new`. Before
    /// the slot changes, the clusters whose reference the old mapping drops are checked
    /// to hold no metadata (a refused edit poisons the handle and changes nothing); they come
    /// back in the [`Replaced`], to be released. With an external data file nothing is
    /// refcounted, so nothing comes back.
    pub(in crate::image) fn l2_replace(
        &self,
        w: &mut Writer,
        l2: HostOffset,
        index: usize,
        new: Slot,
    ) -> Result<Replaced, ImageError> {
        let ext = self.geometry.is_extended_l2();
        debug_assert!(
            ext || new.bitmap == 0,
            "standard entries have no subcluster bits"
        );
        let old = self.l2_slot(l2, index)?.entry;
        // The old reference carries over only where a standard entry keeps its cluster (a
        // preallocated cluster zeroed, an owned cluster rewritten). Every other reference the
        // new entry holds was counted when it was made (an allocation, or the increment of a
        // host cluster that compressed clusters share), so the old one's clusters all go.
        let carried = !old.is_compressed()
            && !new.entry.is_compressed()
            && old.host_offset() == new.entry.host_offset();
        let orphans = if w.external_data || carried {
            Vec::new()
        } else {
            let gone = self.referenced_clusters(old);
            self.refuse_freeing_metadata(w, Some(old), &gone)?;
            gone
        };
        self.l2_store(l2, index, new)?;
        Ok(Replaced { orphans })
    }

    /// Rewrites slot `index` whose entry is broken (a repair): the old entry is not trusted to
    /// reference anything, so nothing is checked or released; the refcount recount that follows
    /// settles whatever it pointed to.
    pub(in crate::image) fn l2_rewrite_broken(
        &self,
        l2: HostOffset,
        index: usize,
        new: Slot,
    ) -> Result<(), ImageError> {
        self.l2_store(l2, index, new)
    }

    /// Stores `new` in slot `index` (both words with extended L2 entries).
    fn l2_store(&self, l2: HostOffset, index: usize, new: Slot) -> Result<(), ImageError> {
        let (word, ext) = (self.entry_word(index), self.geometry.is_extended_l2());
        self.l2_edit(l2, |t| {
            *t.get_mut(word)? = new.entry.0;
            if ext {
                *t.get_mut(word + 1)? = new.bitmap;
            }
            Some(())
        })
    }

    /// Sets or clears the COPIED flag of slot `index` (the mapping stays: nothing to release).
    pub(in crate::image) fn l2_set_copied(
        &self,
        l2: HostOffset,
        index: usize,
        copied: bool,
    ) -> Result<(), ImageError> {
        let word = self.entry_word(index);
        self.l2_edit(l2, |t| {
            let slot = t.get_mut(word)?;
            *slot = L2Entry(*slot).with_copied(copied).0;
            Some(())
        })
    }

    /// Sets the subcluster bitmap of slot `index` (extended L2 entries; the cluster stays).
    pub(in crate::image) fn l2_set_bitmap(
        &self,
        l2: HostOffset,
        index: usize,
        bitmap: u64,
    ) -> Result<(), ImageError> {
        debug_assert!(self.geometry.is_extended_l2());
        let word = self.entry_word(index) + 1;
        self.l2_edit(l2, |t| {
            *t.get_mut(word)? = bitmap;
            Some(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::format::GuestOffset;
    use crate::image::testutil::*;
    use crate::image::{Image, OpenOptions};
    use crate::storage::{MemStorage, Storage};

    fn checked(st: &Arc<MemStorage>) -> (u64, u64) {
        let view = Image::from_storage(Arc::clone(st) as Arc<dyn Storage>, OpenOptions::default())
            .unwrap();
        let r = view.check().unwrap();
        (r.leaks, r.corruptions)
    }

    /// Every kind of replaced mapping releases exactly what it no longer references: a data
    /// cluster replaced by compressed data, compressed data rewritten into the same shared host
    /// cluster (counted anew, so the old reference must still drop), compressed data zeroed, and
    /// a preallocated cluster zeroed in place (kept, nothing released).
    #[test]
    fn replaced_mappings_release_exactly_what_they_dropped() {
        let st = Arc::new(MemStorage::new(image(1 << 30, &[], &[])));
        let img = Image::from_storage(
            Arc::clone(&st) as Arc<dyn Storage>,
            OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let cs = CS as usize;
        let pattern: Vec<u8> = (0..cs).map(|i| (i % 7) as u8).collect();
        img.write_at(GuestOffset(0), &pattern).unwrap();
        img.write_at(GuestOffset(CS), &pattern).unwrap();
        img.flush().unwrap();
        assert_eq!(checked(&st), (0, 0));
        // Data → compressed, then compressed → compressed twice: without a flush in between,
        // all three land in one shared host cluster.
        for _ in 0..3 {
            assert!(img
                .write_compressed(GuestOffset(0), &vec![0u8; cs])
                .unwrap());
        }
        img.flush().unwrap();
        assert_eq!(checked(&st), (0, 0));
        // Compressed → zero flag; preallocated data → zero flag keeping its cluster.
        img.write_zeroes(GuestOffset(0), CS, false).unwrap();
        img.write_zeroes(GuestOffset(CS), CS, false).unwrap();
        img.flush().unwrap();
        assert_eq!(checked(&st), (0, 0));
        // The kept cluster is reused by the next write, in place.
        img.write_at(GuestOffset(CS), &pattern).unwrap();
        img.flush().unwrap();
        assert_eq!(checked(&st), (0, 0));
        let mut back = vec![0u8; cs];
        img.read_at(GuestOffset(CS), &mut back).unwrap();
        assert_eq!(back, pattern);
    }
}
