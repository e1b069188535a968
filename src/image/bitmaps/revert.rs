//! Marking what applying an internal snapshot changes.
//!
//! QEMU does not mark its bitmaps when it applies a snapshot, so a backup that trusts one
//! misses the reverted data. Here every guest cluster whose mapping differs between the active
//! L1 table and the snapshot's is marked in every bitmap that tracks writes (a deliberate
//! difference from QEMU): an L1 entry pointing at the same L2 table maps its clusters the same
//! way; otherwise the two tables are compared entry by entry, ignoring the COPIED flag (which
//! says who owns a cluster, not what it holds).

use crate::format::entry::L1Entry;
use crate::image::write::Writer;
use crate::image::{Image, ImageError};

/// The COPIED flag of an L2 entry (bit 63), ignored when mappings are compared.
const COPIED: u64 = 1 << 63;

impl Image {
    /// Marks the clusters whose mapping differs between `old_l1` (the active table, flushed)
    /// and `new_l1` (the snapshot's), then makes the bitmaps follow the disk to `new_size`.
    pub(in crate::image) fn mark_bitmaps_for_revert(
        &self,
        w: &mut Writer,
        old_l1: &[u64],
        new_l1: &[u64],
        new_size: u64,
    ) -> Result<(), ImageError> {
        if w.bitmaps.list.iter().any(|t| t.tracks_writes()) {
            let g = self.geometry;
            let cs = g.cluster_size();
            let per_l1 = g.bytes_per_l1_entry();
            let entry_bytes = g.l2_entry_size() as usize;
            let size = self.virtual_size().max(new_size);
            for i in 0..old_l1.len().max(new_l1.len()) {
                let a = L1Entry(old_l1.get(i).copied().unwrap_or(0)).l2_offset().0;
                let b = L1Entry(new_l1.get(i).copied().unwrap_or(0)).l2_offset().0;
                let base = i as u64 * per_l1;
                if a == b || base >= size {
                    continue;
                }
                let (ta, tb) = (self.raw_l2(a)?, self.raw_l2(b)?);
                let mut run: Option<u64> = None;
                let entries = ta
                    .chunks_exact(entry_bytes)
                    .zip(tb.chunks_exact(entry_bytes));
                for (j, (ea, eb)) in entries.enumerate() {
                    let at = base + j as u64 * cs;
                    let differs = masked(ea) != masked(eb) || ea[8..] != eb[8..];
                    match (differs, run) {
                        (true, None) => run = Some(at),
                        (false, Some(start)) => {
                            self.mark_bitmaps(&mut w.bitmaps, start, at - start)?;
                            run = None;
                        }
                        _ => {}
                    }
                }
                if let Some(start) = run {
                    self.mark_bitmaps(&mut w.bitmaps, start, base + per_l1 - start)?;
                }
            }
        }
        for t in w.bitmaps.list.iter_mut().filter(|t| !t.inconsistent) {
            t.resize(self.storage.as_ref(), new_size)?;
        }
        Ok(())
    }

    /// The L2 table at `offset` as bytes from disk (zeros for no table).
    fn raw_l2(&self, offset: u64) -> Result<Vec<u8>, ImageError> {
        let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
        if offset != 0 {
            self.storage.read_padded(offset, &mut bytes)?;
        }
        Ok(bytes)
    }
}

/// The first 64 bits of an L2 entry without COPIED.
fn masked(entry: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&entry[..8]);
    u64::from_be_bytes(word) & !COPIED
}
