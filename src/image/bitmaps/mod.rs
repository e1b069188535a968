//! Persistent dirty bitmaps, kept true through every change the engine makes.
//!
//! A bitmap is *consistent* when it was not marked in use at open: its bits say exactly which
//! granules changed since it was created or cleared. A writable handle keeps every consistent
//! bitmap that way, as QEMU does:
//!
//! 1. Before the first change, every consistent bitmap is marked in use on disk
//!    ([`store`](store) has the order of those writes): from then on a crash leaves them
//!    in use, which every reader treats as "unusable", never as stale.
//! 2. Every change of guest data marks the enabled (`auto`) bitmaps first, in memory, at their
//!    granularity: only the data clusters of the bitmap that a change touches are loaded and
//!    held here.
//! 3. At close the bitmaps are stored: new data clusters for the touched ones (none for a
//!    cluster of zeros), a new table and a new directory with `in_use` cleared, then the header
//!    switched to the new directory, then the old structures freed.
//!
//! Bitmaps found in use at open are *inconsistent*: kept as they are on disk, never marked,
//! and refused as a source of dirty extents. With autoclear bit 0 clear, or a version 2 image,
//! there are no bitmaps to keep.

pub(crate) mod bits;
mod edit;
mod revert;
mod store;

#[cfg(test)]
mod crash_tests;

use std::collections::BTreeMap;

use crate::format::{read_u64_table, BitmapDirectoryEntry, BitmapTableEntry};
use crate::image::{Image, ImageError};
use crate::storage::Storage;
use bits::Shape;

/// The bitmaps a writable handle keeps (behind the writer lock).
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    /// Every bitmap as it is now, in directory order (added ones last).
    pub list: Vec<Tracked>,
    /// The directory as it is on disk (what putting the bitmaps in use rewrites in place).
    pub disk: Vec<BitmapDirectoryEntry>,
    /// Bitmaps removed since the last store: their structures are freed by the next one.
    pub dropped: Vec<Tracked>,
    /// Whether the directory on disk marks the consistent bitmaps in use (from the first change
    /// until they are stored).
    pub in_use_on_disk: bool,
    /// Whether bitmaps were added, removed, enabled or disabled since the last store.
    pub directory_changed: bool,
}

/// One bitmap: its directory entry as on disk, and what changed since.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// The directory entry as the scan found it or as last stored, `in_use` set only for an
    /// inconsistent bitmap (the mark a writable handle puts on disk is not recorded here).
    pub entry: BitmapDirectoryEntry,
    /// Found in use at open: unusable, kept unchanged.
    pub inconsistent: bool,
    /// The disk the bits cover (follows resize).
    pub shape: Shape,
    /// The bitmap table on disk, read on first need.
    table: Option<Vec<u64>>,
    /// Data clusters changed in memory since the last store: their whole contents, by index.
    changed: BTreeMap<u64, Box<[u8]>>,
}

impl Bitmaps {
    /// The bitmaps of a freshly scanned image: every directory entry while autoclear bit 0
    /// vouches for the directory (the scan reads it only then), none otherwise.
    pub fn new(entries: &[BitmapDirectoryEntry], cluster_size: u64, disk_size: u64) -> Self {
        Bitmaps {
            list: entries
                .iter()
                .map(|e| Tracked::new(e.clone(), cluster_size, disk_size))
                .collect(),
            disk: entries.to_vec(),
            dropped: Vec::new(),
            in_use_on_disk: false,
            directory_changed: false,
        }
    }

    /// Whether the directory on disk lists a consistent bitmap (one to put in use).
    pub fn any_consistent_on_disk(&self) -> bool {
        self.disk.iter().any(|e| !e.in_use())
    }

    /// Whether the next close must store the bitmaps.
    pub fn store_needed(&self) -> bool {
        self.in_use_on_disk || self.directory_changed
    }

    /// The position of the bitmap called `name`, or the error QEMU gives for a missing one.
    pub fn position(&self, name: &str) -> Result<usize, ImageError> {
        self.list
            .iter()
            .position(|t| t.entry.name == name)
            .ok_or_else(|| not_found(name))
    }

    /// The bitmap called `name`, or the error QEMU gives for a missing one.
    pub fn find_mut(&mut self, name: &str) -> Result<&mut Tracked, ImageError> {
        let i = self.position(name)?;
        Ok(&mut self.list[i])
    }
}

/// QEMU's words for a bitmap that is not there.
fn not_found(name: &str) -> ImageError {
    ImageError::Bitmap(format!("Dirty bitmap '{name}' not found"))
}

/// QEMU's words for a bitmap that was found in use (`qemu-nbd -B`, `qemu-img resize`).
pub(crate) fn inconsistent(name: &str) -> ImageError {
    ImageError::Bitmap(format!(
        "Bitmap '{name}' is inconsistent and cannot be used"
    ))
}

impl Tracked {
    /// A bitmap added now: no bit set, nothing on disk yet.
    fn added(entry: BitmapDirectoryEntry, cluster_size: u64, disk_size: u64) -> Self {
        let mut t = Tracked::new(entry, cluster_size, disk_size);
        t.table = Some(Vec::new());
        t
    }

    fn new(entry: BitmapDirectoryEntry, cluster_size: u64, disk_size: u64) -> Self {
        Tracked {
            inconsistent: entry.in_use(),
            shape: Shape {
                granularity_bits: u32::from(entry.granularity_bits),
                cluster_size,
                disk_size,
            },
            entry,
            table: None,
            changed: BTreeMap::new(),
        }
    }

    /// After a store: the entry and table now on disk, nothing changed since.
    fn stored(&mut self, entry: BitmapDirectoryEntry, table: Option<Vec<u64>>) {
        if let Some(table) = table {
            self.entry = entry;
            self.table = Some(table);
            self.changed.clear();
        }
    }

    /// Whether writes mark this bitmap (consistent and enabled).
    pub fn tracks_writes(&self) -> bool {
        !self.inconsistent && self.entry.auto()
    }

    /// The table on disk (read once; the scan validated the entries of consistent bitmaps).
    fn table(&mut self, storage: &dyn Storage) -> Result<&[u64], ImageError> {
        if self.table.is_none() {
            let mut bytes = vec![0u8; usize::try_from(self.entry.table_bytes()).unwrap_or(0)];
            storage.read_at(self.entry.table_offset, &mut bytes)?;
            self.table = Some(read_u64_table(&bytes));
        }
        Ok(self.table.as_deref().unwrap_or_default())
    }

    /// Data cluster `index` as stored on disk (zeros past the table's end).
    fn stored_cluster(
        &mut self,
        storage: &dyn Storage,
        index: u64,
    ) -> Result<Box<[u8]>, ImageError> {
        let cs = self.shape.cluster_size as usize;
        let entry = self
            .table(storage)?
            .get(index as usize)
            .map_or(BitmapTableEntry(0), |&e| BitmapTableEntry(e));
        let mut bytes = vec![0u8; cs].into_boxed_slice();
        if entry.all_ones() {
            bytes.fill(0xff);
        } else if entry.offset().0 != 0 {
            storage.read_at(entry.offset().0, &mut bytes)?;
        }
        Ok(bytes)
    }

    /// Data cluster `index` as it is now, for changing.
    fn cluster_mut(&mut self, storage: &dyn Storage, index: u64) -> Result<&mut [u8], ImageError> {
        if !self.changed.contains_key(&index) {
            let bytes = self.stored_cluster(storage, index)?;
            self.changed.insert(index, bytes);
        }
        Ok(self
            .changed
            .get_mut(&index)
            .map(|b| &mut b[..])
            .unwrap_or_default())
    }

    /// Sets the bits of guest bytes `[offset, offset + len)`.
    pub fn mark(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<(), ImageError> {
        let bits = self.shape.bit_range(offset, len);
        let per = self.shape.bits_per_cluster();
        let mut at = bits.start;
        while at < bits.end {
            let index = at / per;
            let stop = bits.end.min((index + 1) * per);
            bits::set_bits(
                self.cluster_mut(storage, index)?,
                at - index * per,
                stop - index * per,
            );
            at = stop;
        }
        Ok(())
    }

    /// Clears every bit.
    pub fn clear(&mut self, storage: &dyn Storage) -> Result<(), ImageError> {
        let cs = self.shape.cluster_size as usize;
        self.table(storage)?;
        self.changed = (0..self.shape.table_size())
            .map(|i| (i, vec![0u8; cs].into_boxed_slice()))
            .collect();
        Ok(())
    }

    /// Follows a resize of the disk to `size`: bits past the new end are dropped (so a later
    /// grow does not bring them back), new bits are clear.
    pub fn resize(&mut self, storage: &dyn Storage, size: u64) -> Result<(), ImageError> {
        let old = self.shape;
        self.shape.disk_size = size;
        if size < old.disk_size {
            let per = old.bits_per_cluster();
            let keep_bits = self.shape.bits();
            self.changed.retain(|&i, _| i * per < keep_bits);
            if keep_bits % per != 0 {
                let index = keep_bits / per;
                let from = keep_bits - index * per;
                let bytes = self.cluster_mut(storage, index)?;
                bits::clear_bits(bytes, from, per);
            }
        }
        Ok(())
    }

    /// The dirty guest ranges inside `[offset, offset + len)`, merged, in order.
    pub fn extents(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, ImageError> {
        if self.inconsistent {
            return Err(inconsistent(&self.entry.name));
        }
        let bits = self.shape.bit_range(offset, len);
        let per = self.shape.bits_per_cluster();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = bits.start;
        while at < bits.end {
            let index = at / per;
            let stop = bits.end.min((index + 1) * per);
            let base = index * per;
            let mut add = |a: u64, b: u64| match runs.last_mut() {
                Some(last) if last.1 == base + a => last.1 = base + b,
                _ => runs.push((base + a, base + b)),
            };
            match self.changed.get(&index) {
                Some(bytes) => bits::for_each_run(bytes, at - base, stop - base, &mut add),
                None => {
                    let entry = self
                        .table(storage)?
                        .get(index as usize)
                        .map_or(BitmapTableEntry(0), |&e| BitmapTableEntry(e));
                    if entry.all_ones() {
                        add(at - base, stop - base);
                    } else if entry.offset().0 != 0 {
                        let bytes = self.stored_cluster(storage, index)?;
                        bits::for_each_run(&bytes, at - base, stop - base, &mut add);
                    }
                }
            }
            at = stop;
        }
        // Bits to guest bytes, clipped to the range asked for.
        let end = offset.saturating_add(len).min(self.shape.disk_size);
        Ok(runs
            .into_iter()
            .map(|(a, b)| {
                let r = self.shape.guest_range(a..b);
                let (start, stop) = (r.start.max(offset), r.end.min(end));
                (start, stop - start)
            })
            .filter(|&(_, n)| n > 0)
            .collect())
    }
}

impl Image {
    /// Marks guest bytes `[offset, offset + len)` in every bitmap that tracks writes; called
    /// before the change, with the writer lock held (after `open_for_change`, which put the
    /// bitmaps in use on disk).
    pub(in crate::image) fn mark_bitmaps(
        &self,
        bitmaps: &mut Bitmaps,
        offset: u64,
        len: u64,
    ) -> Result<(), ImageError> {
        for t in bitmaps.list.iter_mut().filter(|t| t.tracks_writes()) {
            t.mark(self.storage.as_ref(), offset, len)?;
        }
        Ok(())
    }

    /// The dirty guest ranges of bitmap `name` inside `[offset, offset + len)`, merged: what
    /// changed since the bitmap was created or last cleared (while it was enabled). An
    /// inconsistent bitmap is refused.
    pub fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, ImageError> {
        match &self.writer {
            Some(lock) => {
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                w.bitmaps
                    .find_mut(name)?
                    .extents(self.storage.as_ref(), offset, len)
            }
            None => {
                let entry = self
                    .scanned
                    .bitmaps
                    .iter()
                    .find(|b| b.name == name)
                    .ok_or_else(|| not_found(name))?;
                let cs = self.geometry.cluster_size();
                Tracked::new(entry.clone(), cs, self.virtual_size()).extents(
                    self.storage.as_ref(),
                    offset,
                    len,
                )
            }
        }
    }

    /// The bitmaps as they are now: `(directory entry, inconsistent)`, in directory order.
    pub fn bitmap_list(&self) -> Vec<(BitmapDirectoryEntry, bool)> {
        match &self.writer {
            Some(lock) => {
                let w = lock.lock().unwrap_or_else(|e| e.into_inner());
                w.bitmaps
                    .list
                    .iter()
                    .map(|t| (t.entry.clone(), t.inconsistent))
                    .collect()
            }
            None => self
                .scanned
                .bitmaps
                .iter()
                .map(|b| (b.clone(), b.in_use()))
                .collect(),
        }
    }
}
