//! A bounded cache of metadata tables (L2 tables now; refcount blocks when the writer lands),
//! kept apart from the I/O that fills it.
//!
//! The cache only decides what stays in memory: callers hand it a loader, and a miss runs the
//! loader *outside* the lock, so one thread's disk read never stalls another thread's hit. Two
//! threads that miss the same table at once both load it and the second insert keeps the first
//! one's copy (identical bytes; tables are read-only until the writer adds dirty tracking).
//!
//! Eviction is least-recently-used by a use counter. Finding the oldest entry is a linear scan,
//! paid only on a miss when full, where it is small next to the disk read that follows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::format::HostOffset;

/// A table as cached: its big-endian words decoded (two words per entry with extended L2).
pub type Table = Arc<Vec<u64>>;

/// The LRU state behind the lock.
#[derive(Debug, Default)]
struct Slots {
    tables: HashMap<u64, (Table, u64)>,
    /// Tables the writer changed and has not written back yet: never evicted (the cache is
    /// their only copy), counted apart from the capacity.
    pinned: HashMap<u64, Table>,
    clock: u64,
    /// Bumped by [`TableCache::clear`]: a table loaded from disk before the clear may be stale
    /// and is not inserted after it.
    generation: u64,
}

impl Slots {
    /// The table at `offset` if cached (pinned first), marked as just used.
    fn lookup(&mut self, offset: HostOffset) -> Option<Table> {
        if let Some(table) = self.pinned.get(&offset.0) {
            return Some(Arc::clone(table));
        }
        self.clock += 1;
        let now = self.clock;
        let (table, used) = self.tables.get_mut(&offset.0)?;
        *used = now;
        Some(Arc::clone(table))
    }
}

/// A bounded LRU cache of tables keyed by host offset.
#[derive(Debug)]
pub struct TableCache {
    slots: Mutex<Slots>,
    capacity: usize,
}

impl TableCache {
    /// A cache that holds at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: Mutex::new(Slots::default()),
            capacity: capacity.max(1),
        }
    }

    /// How many tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many tables it holds now.
    pub fn len(&self) -> usize {
        self.lock().tables.len()
    }

    /// Whether it holds no table.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding the lock leaves consistent data (every update is one insert or
        // remove), so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table at `offset`, from the cache or from `load` (called without the lock held).
    pub fn get_or_load<E>(
        &self,
        offset: HostOffset,
        load: impl FnOnce() -> Result<Vec<u64>, E>,
    ) -> Result<Table, E> {
        let generation = {
            let mut slots = self.lock();
            if let Some(table) = slots.lookup(offset) {
                return Ok(table);
            }
            slots.generation
        };
        let loaded: Table = Arc::new(load()?);
        let mut slots = self.lock();
        // Another thread may have loaded (or the writer pinned) it meanwhile: keep that copy.
        if let Some(table) = slots.lookup(offset) {
            return Ok(table);
        }
        if slots.generation != generation {
            // Tables were rewritten on disk while this one was read: use it once, keep none.
            return Ok(loaded);
        }
        let now = slots.clock;
        if slots.tables.len() >= self.capacity {
            let oldest = slots
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&k, _)| k);
            if let Some(k) = oldest {
                slots.tables.remove(&k);
            }
        }
        slots.tables.insert(offset.0, (Arc::clone(&loaded), now));
        Ok(loaded)
    }

    /// Pins the table at `offset` (about to change; the cache is then its only up-to-date copy
    /// until it is written back and [`TableCache::unpin`]ned). `table` is used when it is not
    /// cached yet.
    pub fn pin(&self, offset: HostOffset, table: Table) {
        let mut slots = self.lock();
        if slots.pinned.contains_key(&offset.0) {
            return;
        }
        let t = match slots.tables.remove(&offset.0) {
            Some((t, _)) => t,
            None => table,
        };
        slots.pinned.insert(offset.0, t);
    }

    /// Runs `f` on the pinned table at `offset`, in place (copied first only while a reader
    /// holds the old version). `None` if it is not pinned.
    pub fn edit<R>(&self, offset: HostOffset, f: impl FnOnce(&mut Vec<u64>) -> R) -> Option<R> {
        let mut slots = self.lock();
        slots.pinned.get_mut(&offset.0).map(|t| f(Arc::make_mut(t)))
    }

    /// The pinned (changed, not yet written) tables, by offset.
    pub fn dirty(&self) -> Vec<(u64, Table)> {
        let slots = self.lock();
        let mut out: Vec<(u64, Table)> = slots
            .pinned
            .iter()
            .map(|(&o, t)| (o, Arc::clone(t)))
            .collect();
        out.sort_by_key(|(o, _)| *o);
        out
    }

    /// How many tables are pinned.
    pub fn dirty_len(&self) -> usize {
        self.lock().pinned.len()
    }

    /// Moves every pinned table back among the ordinary (evictable) ones: they are on disk now.
    pub fn unpin(&self) {
        let mut slots = self.lock();
        let pinned = std::mem::take(&mut slots.pinned);
        for (o, t) in pinned {
            slots.clock += 1;
            let now = slots.clock;
            slots.tables.insert(o, (t, now));
        }
        while slots.tables.len() > self.capacity {
            let oldest = slots
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&k, _)| k);
            match oldest {
                Some(k) => {
                    slots.tables.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Forgets every table that is not pinned (after tables were rewritten on disk behind the
    /// cache, as snapshot operations do).
    pub fn clear(&self) {
        let mut slots = self.lock();
        slots.tables.clear();
        slots.generation += 1;
    }

    /// Forgets the table at `offset` (freed), pinned or not.
    pub fn forget(&self, offset: HostOffset) {
        let mut slots = self.lock();
        slots.tables.remove(&offset.0);
        slots.pinned.remove(&offset.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn hits_misses_and_lru_eviction() {
        let cache = TableCache::new(2);
        let loads = Cell::new(0);
        let get = |o: u64| {
            cache
                .get_or_load(HostOffset(o), || {
                    loads.set(loads.get() + 1);
                    Ok::<_, ()>(vec![o])
                })
                .unwrap()
        };
        assert_eq!(get(1)[0], 1);
        assert_eq!(get(2)[0], 2);
        assert_eq!(get(1)[0], 1);
        assert_eq!(loads.get(), 2);
        // 2 is the least recently used: 3 evicts it, 1 stays.
        get(3);
        assert_eq!(cache.len(), 2);
        get(1);
        assert_eq!(loads.get(), 3);
        get(2);
        assert_eq!(loads.get(), 4);
    }

    #[test]
    fn load_errors_are_not_cached() {
        let cache = TableCache::new(4);
        assert_eq!(
            cache.get_or_load(HostOffset(7), || Err::<Vec<u64>, _>("boom")),
            Err("boom")
        );
        assert!(cache.is_empty());
        assert_eq!(cache.capacity(), 4);
        assert_eq!(TableCache::new(0).capacity(), 1);
    }
}
