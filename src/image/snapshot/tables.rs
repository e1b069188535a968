//! The tables a snapshot operation reads and switches: a snapshot's L1 table read from disk,
//! the active L1 table rewritten entry by entry, and the snapshot table written anew.
//!
//! The invariant: the snapshot table is written whole in new clusters and the header switched
//! to it after a barrier, so a crash leaves either the old table or the new one, never a
//! partial one; the old table is freed only after the header no longer points to it.

use super::SnapshotList;
use crate::format::{read_u64_table, serialize_snapshot_table, SnapshotEntry};
use crate::image::write::guard::WriteKind;
use crate::image::write::Writer;
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

impl Image {
    /// The L1 table of snapshot `sn`, from disk.
    pub(super) fn read_snapshot_l1(&self, sn: &SnapshotEntry) -> Result<Vec<u64>, ImageError> {
        sn.check_l1_table(self.geometry.cluster_size())
            .map_err(|e| ImageError::Corruption(format!("Snapshot '{}': {e}", sn.id)))?;
        let mut bytes = Vec::new();
        let n = sn.l1_table_bytes() as usize;
        bytes
            .try_reserve_exact(n)
            .map_err(|_| ImageError::OutOfMemory(n))?;
        bytes.resize(n, 0);
        self.storage.read_padded(sn.l1_table_offset, &mut bytes)?;
        Ok(read_u64_table(&bytes))
    }

    /// Writes the entries of the active L1 table that differ between `old` and `new` in place,
    /// then a barrier, and keeps `new` as the live table.
    pub(super) fn write_active_l1(
        &self,
        w: &mut Writer,
        old: &[u64],
        new: &[u64],
    ) -> Result<(), ImageError> {
        let offset = w.header.l1_table_offset;
        let storage = std::sync::Arc::clone(&self.storage);
        let mut wrote = false;
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            if a != b {
                let at = offset + 8 * i as u64;
                self.guarded_write(
                    w,
                    WriteKind::L1Entries,
                    storage.as_ref(),
                    at,
                    &b.to_be_bytes(),
                )?;
                wrote = true;
            }
        }
        if wrote {
            storage.flush()?;
        }
        *self.l1.write().unwrap_or_else(|e| e.into_inner()) = new.to_vec();
        Ok(())
    }

    /// Writes `list` as the snapshot table in new clusters, switches the header to it, and
    /// frees the old table; each step after a barrier. Every entry is written complete, as
    /// QEMU writes it (an incomplete one gets the size the image had when it was opened).
    pub(super) fn write_snapshot_table(
        &self,
        w: &mut Writer,
        list: Vec<SnapshotEntry>,
    ) -> Result<(), ImageError> {
        let opened_size = self.scanned.header.size;
        let list: Vec<SnapshotEntry> = list.into_iter().map(|e| e.completed(opened_size)).collect();
        let bytes = serialize_snapshot_table(&list)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let storage = std::sync::Arc::clone(&self.storage);
        let old_offset = w.header.snapshots_offset;
        let old_bytes = self
            .snaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .table_bytes;
        let new_offset = if list.is_empty() {
            0
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cs);
            let at = self.allocate_run(w, clusters)?.0;
            self.write_refcounts(w)?;
            self.guarded_write(w, WriteKind::NewTable, storage.as_ref(), at, &bytes)?;
            self.map_enter(w, at, clusters, MetadataType::SNAPSHOT_TABLE)?;
            storage.flush()?;
            at
        };
        w.header.nb_snapshots = list.len() as u32;
        w.header.snapshots_offset = new_offset;
        self.write_header(w)?;
        storage.flush()?;
        if old_offset != 0 && old_bytes > 0 {
            let first = old_offset / cs;
            let last = (old_offset + old_bytes - 1) / cs;
            self.map_remove(first * cs, last - first + 1, MetadataType::SNAPSHOT_TABLE)?;
            // The old table's space goes back to the host file, as QEMU gives it back.
            for c in first..=last {
                w.refcounts.free_later(c);
                w.discard_when_free.push(c);
            }
            self.apply_decrements(w)?;
        }
        *self.snaps.write().unwrap_or_else(|e| e.into_inner()) = SnapshotList {
            entries: list,
            table_bytes: bytes.len() as u64,
        };
        // Where the map's memory limit left ranges to the naive checker, it must know the new
        // table (and the snapshot L1 tables it lists) before the next write.
        self.refresh_fallback(w, &self.l1_table())
    }
}
