//! Refcount bookkeeping for the writer: the refcount table and blocks in memory, first-fit
//! allocation in cluster numbers, and the queue of decrements.
//!
//! The refcount table and the refcount blocks live here, loaded on demand and kept in memory
//! (clean or dirty) until the ordered write-back in `flush.rs` writes them. Nothing here writes
//! to disk: a change is made in memory and marked dirty, and new tables are described as
//! [`NewTable`]s for the flush to write. That keeps the rules testable without a file:
//!
//! - a cluster is free only when its refcount is 0, and allocation never hands out anything else;
//! - decrements are not applied when asked for but queued ([`Refcounts::free_later`]): the
//!   reference being dropped is still on disk until the L2 or L1 change that drops it is
//!   flushed, and a cluster freed too early could be reused while an on-disk table still points
//!   at it. The flush applies the queue after the tables;
//! - a refcount block is created inside the range it describes (at its first cluster, which is
//!   free because nothing in an undescribed range has a refcount), so it describes itself;
//! - when the refcount table itself is full, a new, larger table is placed with the refcount
//!   blocks that describe it in fresh clusters past every range described so far, and the old
//!   table is freed after the header points at the new one.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::format::refcount::{refcount_get, refcount_set, ReftableEntry};
use crate::image::ImageError;
use crate::storage::Storage;

/// Hashes refcount block indices (small consecutive integers) by one multiplication: the
/// default SipHash made lookups most of the time of walking millions of refcounts (snapshot
/// operations on large images). Keys are not attacker-chosen beyond the table's size.
#[derive(Default)]
struct BlockIndexHasher(u64);

impl Hasher for BlockIndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Fibonacci hashing: spreads consecutive indices over the high bits the table uses.
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A refcount block in memory.
#[derive(Debug)]
struct Block {
    /// Host offset of the block.
    offset: u64,
    /// Its bytes (one cluster).
    data: Vec<u8>,
    /// Changed since it was last written.
    dirty: bool,
}

/// A table the flush must write in full before anything points at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewTable {
    /// Where it goes.
    pub offset: u64,
    /// Its clusters.
    pub clusters: u64,
}

/// Refcounts of one image (the writer's view).
#[derive(Debug)]
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// The refcount table, as it will be after the next flush.
    pub table: Vec<u64>,
    /// Host offset of the refcount table (a new one when it moved and is not yet flushed).
    pub table_offset: u64,
    /// Whether table entries changed since the last flush.
    pub table_dirty: bool,
    /// The previous table, to free once the header points at the new one.
    pub old_table: Option<NewTable>,
    blocks: HashMap<u64, Block, BuildHasherDefault<BlockIndexHasher>>,
    /// Decrements waiting for the tables that drop the references to reach the disk.
    pending: Vec<u64>,
    /// No cluster below this one is free (first-fit search starts here).
    hint: u64,
}

impl Refcounts {
    /// Bookkeeping for a table of `table` entries at `table_offset`.
    pub fn new(cluster_bits: u32, order: u32, table_offset: u64, table: Vec<u64>) -> Self {
        Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_dirty: false,
            old_table: None,
            blocks: HashMap::default(),
            pending: Vec::new(),
            hint: 0,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters one refcount block describes.
    pub fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    /// The refcount table's size in clusters.
    pub fn table_clusters(&self) -> u64 {
        (self.table.len() as u64 * 8).div_ceil(self.cluster_size())
    }

    /// Loads block `index` if the table has one; `None` when the range has no block.
    fn block(
        &mut self,
        storage: &dyn Storage,
        index: u64,
    ) -> Result<Option<&mut Block>, ImageError> {
        let Some(&entry) = usize::try_from(index).ok().and_then(|i| self.table.get(i)) else {
            return Ok(None);
        };
        let offset = ReftableEntry(entry).block_offset().0;
        if offset == 0 {
            return Ok(None);
        }
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(ImageError::Corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                crate::format::c_hex(offset),
                crate::format::c_hex(index)
            )));
        }
        match self.blocks.entry(index) {
            Entry::Occupied(o) => Ok(Some(o.into_mut())),
            Entry::Vacant(v) => {
                let mut data = vec![0u8; 1usize << self.cluster_bits];
                storage.read_padded(offset, &mut data)?;
                Ok(Some(v.insert(Block {
                    offset,
                    data,
                    dirty: false,
                })))
            }
        }
    }

    /// The refcount of `cluster` (0 where no block describes it).
    pub fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64, ImageError> {
        let per = self.per_block();
        let order = self.order;
        match self.block(storage, cluster / per)? {
            None => Ok(0),
            Some(b) => Ok(refcount_get(&b.data, (cluster % per) as usize, order)?),
        }
    }

    /// Sets the refcount of `cluster`, which a block must describe (see [`Refcounts::ensure_block`]).
    pub fn set(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        value: u64,
    ) -> Result<(), ImageError> {
        let per = self.per_block();
        let order = self.order;
        let b = self.block(storage, cluster / per)?.ok_or_else(|| {
            ImageError::Corruption(format!("no refcount block describes cluster {cluster:#x}"))
        })?;
        refcount_set(&mut b.data, (cluster % per) as usize, order, value)?;
        b.dirty = true;
        Ok(())
    }

    /// Adds one to the refcount of an allocated `cluster` now (another compressed cluster in a
    /// host cluster already holding some).
    pub fn increment(&mut self, storage: &dyn Storage, cluster: u64) -> Result<(), ImageError> {
        let v = self.get(storage, cluster)?;
        if v == 0 {
            return Err(ImageError::Corruption(format!(
                "refcount of cluster {cluster:#x} is 0; cannot add a reference"
            )));
        }
        let max = crate::format::refcount::max_refcount(self.order).unwrap_or(u64::MAX);
        if v >= max {
            return Err(ImageError::Unsupported(format!(
                "refcount of cluster {cluster:#x} would exceed {max}"
            )));
        }
        self.set(storage, cluster, v + 1)
    }

    /// Adds `delta` (±1) to the refcount of `cluster` in memory at once and returns the new
    /// value. For snapshot bookkeeping, where the caller orders the block write-back itself:
    /// increments before any table says the cluster is shared, decrements after the last
    /// reference is gone from disk. A cluster freed here may be handed out again.
    pub fn adjust(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        delta: i64,
    ) -> Result<u64, ImageError> {
        let (per, order) = (self.per_block(), self.order);
        let max = crate::format::refcount::max_refcount(order).unwrap_or(u64::MAX);
        let Some(block) = self.block(storage, cluster / per)? else {
            return Err(ImageError::Corruption(format!(
                "no refcount block describes cluster {cluster:#x}, which is in use"
            )));
        };
        let at = (cluster % per) as usize;
        let v = refcount_get(&block.data, at, order)?;
        let new = match delta {
            1 if v == 0 => {
                return Err(ImageError::Corruption(format!(
                    "refcount of cluster {cluster:#x} is 0 while it is in use"
                )))
            }
            1 if v >= max => {
                return Err(ImageError::Unsupported(format!(
                    "Cannot add a reference to cluster {cluster:#x}: its refcount is already \
                     the largest {}-bit refcount ({max})",
                    1u32 << self.order
                )))
            }
            1 => v + 1,
            -1 if v == 0 => {
                return Err(ImageError::Corruption(format!(
                    "refcount of cluster {cluster:#x} is already 0; cannot drop a reference"
                )))
            }
            -1 => v - 1,
            _ => {
                return Err(ImageError::Corruption(format!(
                    "bad refcount change {delta}"
                )))
            }
        };
        refcount_set(&mut block.data, at, order, new)?;
        block.dirty = true;
        if new == 0 {
            self.hint = self.hint.min(cluster);
        }
        Ok(new)
    }

    /// Queues a decrement of `cluster`, applied by [`Refcounts::apply_pending`].
    pub fn free_later(&mut self, cluster: u64) {
        self.pending.push(cluster);
    }

    /// Whether decrements are queued.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Applies every queued decrement; returns the clusters whose refcount reached 0, and the
    /// first cluster whose refcount was already 0.
    ///
    /// A refcount already 0 on a cluster that was referenced is a corruption the image had
    /// before (its refcount was too low): that decrement is skipped, as QEMU skips a free it
    /// cannot make, and the others are still applied, so that the image leaks no more than it
    /// must. The caller reports the corruption once the blocks are written.
    pub fn apply_pending(
        &mut self,
        storage: &dyn Storage,
    ) -> Result<(Vec<u64>, Option<u64>), ImageError> {
        let mut freed = Vec::new();
        let mut underflow = None;
        let pending = std::mem::take(&mut self.pending);
        for (i, &cluster) in pending.iter().enumerate() {
            match self.decrement(storage, cluster, &mut freed) {
                Ok(true) => {}
                Ok(false) => {
                    underflow.get_or_insert(cluster);
                }
                Err(e) => {
                    // An I/O error (a refcount block that cannot be read) keeps this decrement
                    // and the ones after it queued for the next flush; the ones applied stay
                    // applied (their blocks are dirty and will be written).
                    self.pending.extend_from_slice(&pending[i..]);
                    return Err(e);
                }
            }
        }
        Ok((freed, underflow))
    }

    /// Applies one queued decrement; a cluster whose refcount drops to 0 joins `freed`.
    /// Returns false, changing nothing, when the refcount is already 0.
    fn decrement(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        freed: &mut Vec<u64>,
    ) -> Result<bool, ImageError> {
        let v = self.get(storage, cluster)?;
        if v == 0 {
            return Ok(false);
        }
        self.set(storage, cluster, v - 1)?;
        if v == 1 {
            freed.push(cluster);
            self.hint = self.hint.min(cluster);
        }
        Ok(true)
    }

    /// Makes sure a block describes `cluster`, creating it (and growing the table) if needed.
    /// Returns the tables created, for the map and the flush.
    pub fn ensure_block(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
    ) -> Result<Vec<NewTable>, ImageError> {
        let per = self.per_block();
        let index = cluster / per;
        if self.block(storage, index)?.is_some() {
            return Ok(Vec::new());
        }
        if index >= self.table.len() as u64 {
            let mut created = self.grow_table(storage, index)?;
            created.extend(self.ensure_block(storage, cluster)?);
            return Ok(created);
        }
        // Nothing in this range has a refcount, so its first cluster is free: the block goes
        // there and describes itself. The first range starts with the header, which always has
        // a refcount: a missing first block means the refcount structures are broken.
        let at = index * per;
        if at == 0 {
            return Err(ImageError::Corruption(
                "Refcount block for the clusters from 0 is missing (the refcount table entry \
                 is 0); the refcount structures are damaged"
                    .into(),
            ));
        }
        self.create_block(index, at)?;
        Ok(vec![NewTable {
            offset: at << self.cluster_bits,
            clusters: 1,
        }])
    }

    /// Creates block `index` in memory at cluster `at` (inside its own range), refcount 1.
    fn create_block(&mut self, index: u64, at: u64) -> Result<(), ImageError> {
        let offset = at << self.cluster_bits;
        let mut data = vec![0u8; self.cluster_size() as usize];
        refcount_set(&mut data, (at % self.per_block()) as usize, self.order, 1)?;
        self.blocks.insert(
            index,
            Block {
                offset,
                data,
                dirty: true,
            },
        );
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get_mut(i))
            .ok_or_else(|| ImageError::Corruption("refcount table index out of range".into()))?;
        *slot = offset;
        self.table_dirty = true;
        Ok(())
    }

    /// Replaces the refcount table with one that has room for block `index`. The new table and
    /// the blocks describing it go to fresh ranges past everything described so far.
    fn grow_table(
        &mut self,
        storage: &dyn Storage,
        index: u64,
    ) -> Result<Vec<NewTable>, ImageError> {
        let per = self.per_block();
        let cs = self.cluster_size();
        let file_clusters = storage.len()?.div_ceil(cs);
        // First block index past the file and the current table.
        let first = (self.table.len() as u64)
            .max(file_clusters.div_ceil(per))
            .max(index);
        // Entries for: every block up to `first`, plus the blocks of the new region.
        let mut entries = (first + 1).max(self.table.len() as u64 * 3 / 2);
        let (blocks, table_clusters) = loop {
            let table_clusters = (entries * 8).div_ceil(cs);
            // The region holds `blocks` refcount blocks followed by the table; it must fit in
            // the ranges those blocks describe.
            let blocks = (table_clusters + 1).div_ceil(per - 1).max(1);
            if first + blocks <= entries {
                break (blocks, table_clusters);
            }
            entries = first + blocks;
        };
        let entries_rounded = table_clusters * cs / 8;
        let mut table = self.table.clone();
        table.resize(entries_rounded as usize, 0);
        let old = NewTable {
            offset: self.table_offset,
            clusters: self.table_clusters(),
        };
        self.table = table;
        let region = first * per;
        for b in 0..blocks {
            self.create_block(first + b, region + b)?;
        }
        let table_at = region + blocks;
        for c in table_at..table_at + table_clusters {
            let per = self.per_block();
            let order = self.order;
            let block = self
                .blocks
                .get_mut(&(c / per))
                .ok_or_else(|| ImageError::Corruption("new refcount block missing".into()))?;
            refcount_set(&mut block.data, (c % per) as usize, order, 1)?;
        }
        self.table_offset = table_at << self.cluster_bits;
        self.table_dirty = true;
        if old.clusters > 0 {
            // The old table's clusters are freed once the header points at the new table.
            let first_old = old.offset >> self.cluster_bits;
            for c in first_old..first_old + old.clusters {
                self.free_later(c);
            }
            self.old_table = Some(old);
        }
        let mut created: Vec<NewTable> = (0..blocks)
            .map(|b| NewTable {
                offset: (region + b) << self.cluster_bits,
                clusters: 1,
            })
            .collect();
        created.push(NewTable {
            offset: self.table_offset,
            clusters: table_clusters,
        });
        Ok(created)
    }

    /// The first cluster from `c` on whose refcount is 0: scans the loaded blocks' bytes
    /// directly (a full image has millions of clusters before the first free one), and stops
    /// at the first range no block describes.
    fn first_free_from(&mut self, storage: &dyn Storage, mut c: u64) -> Result<u64, ImageError> {
        let (per, order) = (self.per_block(), self.order);
        loop {
            let index = c / per;
            let Some(block) = self.block(storage, index)? else {
                return Ok(c);
            };
            for i in (c % per)..per {
                if refcount_get(&block.data, i as usize, order)? == 0 {
                    return Ok(index * per + i);
                }
            }
            c = (index + 1) * per;
        }
    }

    /// Allocates one free cluster (refcount 0 → 1), first fit from the hint. Returns it and
    /// the metadata tables created on the way.
    pub fn allocate(&mut self, storage: &dyn Storage) -> Result<(u64, Vec<NewTable>), ImageError> {
        let mut created = Vec::new();
        let mut c = self.hint.max(1);
        loop {
            c = self.first_free_from(storage, c)?;
            created.extend(self.ensure_block(storage, c)?);
            if self.get(storage, c)? == 0 {
                self.set(storage, c, 1)?;
                self.hint = c + 1;
                return Ok((c, created));
            }
            c += 1;
        }
    }

    /// Allocates `n` contiguous free clusters (first fit from the hint); returns the first and
    /// the metadata tables created on the way.
    ///
    /// A run longer than half a refcount block's range is refused: refcount blocks are placed at
    /// the start of the range they describe, so such a run may never fit between them.
    pub fn allocate_run(
        &mut self,
        storage: &dyn Storage,
        n: u64,
    ) -> Result<(u64, Vec<NewTable>), ImageError> {
        if n > self.per_block() / 2 {
            return Err(ImageError::Unsupported(format!(
                "cannot allocate {n} contiguous clusters: one refcount block describes only {} \
                 (use larger clusters or narrower refcounts)",
                self.per_block()
            )));
        }
        let mut created = Vec::new();
        let mut start = self.hint.max(1);
        'search: loop {
            start = self.first_free_from(storage, start)?;
            for k in 0..n {
                created.extend(self.ensure_block(storage, start + k)?);
            }
            for k in 0..n {
                if self.get(storage, start + k)? != 0 {
                    start += k + 1;
                    continue 'search;
                }
            }
            for k in 0..n {
                self.set(storage, start + k, 1)?;
            }
            if start == self.hint.max(1) {
                // Nothing below the run is free (the search started there).
                self.hint = start + n;
            }
            return Ok((start, created));
        }
    }

    /// Dirty blocks as `(host offset, bytes)`, by offset; marks them clean.
    pub fn dirty_blocks(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = self
            .blocks
            .values()
            .filter(|b| b.dirty)
            .map(|b| (b.offset, b.data.clone()))
            .collect();
        out.sort_by_key(|(o, _)| *o);
        out
    }

    /// Marks every block clean: what [`Refcounts::dirty_blocks`] returned is on disk (written
    /// and past a barrier). Until then a failed flush leaves them dirty, to be written again.
    pub fn mark_blocks_written(&mut self) {
        for b in self.blocks.values_mut() {
            b.dirty = false;
        }
    }

    /// Drops clean blocks from memory when more than `keep` are loaded.
    pub fn trim(&mut self, keep: usize) {
        if self.blocks.len() > keep {
            self.blocks.retain(|_, b| b.dirty);
        }
    }

    /// The refcount table's bytes.
    pub fn table_bytes(&self) -> Vec<u8> {
        crate::format::write_u64_table(&self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn a_missing_first_block_is_an_error_not_a_loop() {
        let storage = MemStorage::new(vec![0; 4096]);
        let mut rc = Refcounts::new(9, 4, 512, vec![0; 64]);
        let err = rc.allocate(&storage).unwrap_err();
        assert_eq!(err.kind(), crate::image::ErrorKind::Corruption);
    }

    #[test]
    fn blocks_describe_themselves_and_the_table_grows() {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64 table entries.
        let storage = MemStorage::new(vec![0; 4 * 512]);
        let mut first = vec![0u8; 512];
        for c in 0..4 {
            refcount_set(&mut first, c, 6, 1).unwrap();
        }
        storage.write_at(2 * 512, &first).unwrap();
        let mut table = vec![0u64; 64];
        table[0] = 2 * 512;
        let mut rc = Refcounts::new(9, 6, 512, table);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            let (c, _) = rc.allocate(&storage).unwrap();
            assert!(seen.insert(c), "cluster {c} handed out twice");
            assert_eq!(rc.get(&storage, c).unwrap(), 1);
        }
        // 5000 clusters need more than 64 blocks: the table moved and grew.
        assert!(rc.table.len() > 64);
        assert_ne!(rc.table_offset, 512);
        // Every block lies in the range it describes and counts itself.
        for (i, e) in rc.table.clone().into_iter().enumerate() {
            if e != 0 {
                let c = e >> 9;
                assert_eq!(c / 64, i as u64);
                assert_eq!(rc.get(&storage, c).unwrap(), 1);
            }
        }
        // Frees wait until applied; the old table (cluster 1) was queued when it moved.
        rc.free_later(4);
        assert_eq!(rc.get(&storage, 4).unwrap(), 1);
        assert_eq!(rc.apply_pending(&storage).unwrap(), (vec![1, 4], None));
        assert_eq!(rc.allocate(&storage).unwrap().0, 1);
        assert_eq!(rc.allocate(&storage).unwrap().0, 4);
        // A free of a cluster already at 0 is skipped and named; the frees around it happen.
        let (a, _) = rc.allocate(&storage).unwrap();
        let (b, _) = rc.allocate(&storage).unwrap();
        rc.free_later(a);
        rc.free_later(a);
        rc.free_later(b);
        assert_eq!(rc.apply_pending(&storage).unwrap(), (vec![a, b], Some(a)));
        assert_eq!(rc.get(&storage, b).unwrap(), 0);
    }
}
