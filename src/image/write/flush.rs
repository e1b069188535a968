//! Ordered write-back: what makes every moment on disk a consistent image.
//!
//! Each phase ends with a storage flush (a barrier), because the file system may reorder the
//! writes of one phase; what a later phase writes depends on the earlier phases being durable:
//!
//! 1. guest data: a table must never point at a cluster whose data is not on disk yet;
//! 2. refcount blocks (increments only): a cluster must be counted before anything references
//!    it, or a crash leaves a reference to a free cluster, which the next allocation reuses;
//! 3. the refcount table (new entries, or a whole new table and then the header): new blocks
//!    must be written before the table points at them;
//! 4. L2 tables: they reference data (1) and are counted (2);
//! 5. the L1 table (entries, or a whole new table and then the header) and other header fields:
//!    it references L2 tables (4);
//! 6. decrements: a cluster's refcount drops only after no table on disk references it (4, 5),
//!    so a crash before this phase leaks it and never frees it early; then the clusters a
//!    guest discard freed give their space back to the host file (holes punched), which only
//!    clusters free on disk may do;
//! 7. the dirty bit of lazy refcounts is cleared last, once the refcounts on disk are exact.
//!
//! A crash between phases leaves, at worst, clusters with a refcount that nothing references
//! (leaks), which `qemu-img check -r leaks` reclaims.

use std::collections::HashSet;

use super::guard::WriteKind;
use super::Writer;
use crate::format::header::IncompatibleFeatures;
use crate::format::{write_u64_table, HostOffset};
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

impl Image {
    /// Makes every completed write durable, in the order above (a no-op for read-only images).
    pub fn flush(&self) -> Result<(), ImageError> {
        match &self.writer {
            None => Ok(()),
            Some(lock) => {
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                self.flush_locked(&mut w)
            }
        }
    }

    /// Flushes, then stores the persistent bitmaps that changes through this handle put in use
    /// (QEMU stores them when it closes an image, not at a flush). The handle stays usable; a
    /// later change puts the bitmaps in use again. A handle dropped without `close` leaves them
    /// in use on disk, as a crash would: inconsistent, never stale.
    pub fn close(&self) -> Result<(), ImageError> {
        let Some(lock) = &self.writer else {
            return Ok(());
        };
        let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_locked(&mut w)?;
        if w.poisoned.is_some() {
            return Ok(());
        }
        self.store_bitmaps(&mut w)
            .map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Whether this handle met corruption: it writes nothing more, and a failed `close` need
    /// not be retried.
    pub fn is_poisoned(&self) -> bool {
        self.writer.as_ref().is_some_and(|lock| {
            let w = lock.lock().unwrap_or_else(|e| e.into_inner());
            w.poisoned.is_some()
        })
    }

    /// The flush, with the writer lock held; inconsistencies met on the way are fatal.
    pub(in crate::image) fn flush_locked(&self, w: &mut Writer) -> Result<(), ImageError> {
        self.write_back(w)
            .map_err(|e| self.poison_if_inconsistent(w, e))
    }

    /// The phases of the flush.
    fn write_back(&self, w: &mut Writer) -> Result<(), ImageError> {
        let storage = self.storage.as_ref();
        // 1. Guest data (an external data file only once it was opened: nothing was written to
        // it before).
        let opened = self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match opened {
            Some(chain) if w.external_data => chain.data.flush()?,
            _ => storage.flush()?,
        }
        if w.poisoned.is_some() {
            // Nothing more reaches the disk from a handle that found corruption.
            return Ok(());
        }

        // 2, 3. Refcount increments, then the refcount table.
        self.write_refcounts(w)?;

        // 4. L2 tables.
        let tables = self.l2_cache.dirty();
        for (offset, table) in &tables {
            let bytes = write_u64_table(table);
            self.guarded_write(w, WriteKind::L2Table, storage, *offset, &bytes)?;
        }
        if !tables.is_empty() {
            storage.flush()?;
            self.l2_cache.unpin();
        }

        // 5. The L1 table and the header.
        let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner()).clone();
        let l1_offset = w.header.l1_table_offset;
        if let Some(old) = w.l1_moved.clone() {
            // `l1_moved` is cleared only once the new table and the header are on disk, so a
            // retried flush writes the whole table again (not just the dirty entries).
            let bytes = write_u64_table(&l1);
            self.guarded_write(w, WriteKind::L1Entries, storage, l1_offset, &bytes)?;
            storage.flush()?;
            self.write_header(w)?;
            storage.flush()?;
            w.l1_moved = None;
            w.header_dirty = false;
            w.l1_dirty.clear();
            self.map_remove(old.offset, old.clusters, MetadataType::ACTIVE_L1)?;
        }
        if !w.l1_dirty.is_empty() {
            // Cleared only after the barrier, so a retried flush writes them all again.
            let dirty: Vec<usize> = w.l1_dirty.iter().copied().collect();
            for i in dirty {
                let bytes = l1[i].to_be_bytes();
                self.guarded_write(
                    w,
                    WriteKind::L1Entries,
                    storage,
                    l1_offset + 8 * i as u64,
                    &bytes,
                )?;
            }
            storage.flush()?;
            w.l1_dirty.clear();
        }
        if w.header_dirty {
            self.write_header(w)?;
            storage.flush()?;
            w.header_dirty = false;
        }

        // 6. Decrements. Freed clusters may be reused from here on: no compressed cluster goes
        // into the last one that held some, and no decompressed copy of one is trusted.
        w.compressed_cursor = None;
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.apply_decrements(w)?;

        // 7. Lazy refcounts: the refcounts on disk are exact again.
        if w.dirty_bit_on_disk {
            w.header.incompatible_features -= IncompatibleFeatures::DIRTY;
            self.write_header(w)?;
            storage.flush()?;
            w.dirty_bit_on_disk = false;
        }
        self.refresh_fallback(w, &l1)?;
        Ok(())
    }

    /// Phases 2 and 3: dirty refcount blocks, then the refcount table (and, when the table
    /// moved, the header that points at it), each followed by a barrier.
    pub(in crate::image) fn write_refcounts(&self, w: &mut Writer) -> Result<(), ImageError> {
        let storage = self.storage.as_ref();
        self.write_dirty_blocks(w)?;
        if w.refcounts.table_dirty {
            let bytes = w.refcounts.table_bytes();
            let offset = w.refcounts.table_offset;
            self.guarded_write(w, WriteKind::RefcountTableEntries, storage, offset, &bytes)?;
            storage.flush()?;
            if w.refcounts.old_table.is_some() {
                self.write_header(w)?;
                storage.flush()?;
            }
            w.refcounts.table_dirty = false;
        }
        Ok(())
    }

    /// Phase 6: applies the queued decrements, forgets freed clusters (map and cache) and
    /// writes the changed refcount blocks. Only once no table on disk references what is freed.
    pub(in crate::image) fn apply_decrements(&self, w: &mut Writer) -> Result<(), ImageError> {
        if !w.refcounts.has_pending() {
            return Ok(());
        }
        let (freed, underflow) = w.refcounts.apply_pending(self.storage.as_ref())?;
        let discarded = std::mem::take(&mut w.discard_when_free);
        self.forget_freed(&freed)?;
        w.refcounts.old_table = None;
        self.write_dirty_blocks(w)?;
        match underflow {
            // Found now, made before: the image had a refcount too low. Every other free is on
            // disk; the handle stops here, as at any corruption it meets.
            Some(cluster) => Err(ImageError::Corruption(format!(
                "refcount of cluster {cluster:#x} is already 0; cannot free it"
            ))),
            None => {
                let discarded: HashSet<u64> = discarded.into_iter().collect();
                let mut gone: Vec<u64> = freed
                    .into_iter()
                    .filter(|c| discarded.contains(c))
                    .collect();
                self.discard_free_clusters(&mut gone);
                Ok(())
            }
        }
    }

    /// Gives the space of `clusters` back to the host file, in runs of adjacent clusters
    /// (sorting `clusters`). They must be free on disk already, past the barrier after their
    /// refcount blocks: a crash then finds them free, whatever the holes read as. A failed
    /// discard only leaves the space in use, as in QEMU.
    pub(in crate::image) fn discard_free_clusters(&self, clusters: &mut [u64]) {
        clusters.sort_unstable();
        let cs = self.geometry.cluster_size();
        let mut runs = clusters.chunk_by(|a, b| a + 1 == *b);
        for run in &mut runs {
            let _ = self.storage.discard(run[0] * cs, run.len() as u64 * cs);
        }
    }

    /// Writes the changed refcount blocks, then a barrier.
    fn write_dirty_blocks(&self, w: &mut Writer) -> Result<(), ImageError> {
        let storage = self.storage.as_ref();
        // The blocks stay dirty until they are past the barrier: a flush that fails here (a
        // full disk) writes them all again when it is retried.
        let blocks = w.refcounts.dirty_blocks();
        for (offset, bytes) in &blocks {
            self.guarded_write(w, WriteKind::RefcountBlock, storage, *offset, bytes)?;
        }
        if !blocks.is_empty() {
            storage.flush()?;
            w.refcounts.mark_blocks_written();
        }
        Ok(())
    }

    /// Freed clusters hold no metadata any more: out of the map and the table cache.
    pub(in crate::image) fn forget_freed(&self, freed: &[u64]) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        for c in freed {
            self.map_remove(c * cs, 1, MetadataType::all())?;
            self.l2_cache.forget(HostOffset(c * cs));
        }
        Ok(())
    }
}
