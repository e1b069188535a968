//! A bounded cache of metadata tables (L2 tables), kept apart from the I/O that fills it.
//!
//! The cache only decides what stays in memory: callers hand it a loader, and a miss runs the
//! loader *outside* the lock, so one thread's disk read never stalls another thread's hit. Two
//! threads that miss the same table at once both load it and the second insert keeps the first
//! one's copy (identical bytes: a table the writer changes is pinned first, see below).
//!
//! Eviction is least-recently-used, in O(1) per lookup and per eviction (the `lru` crate's
//! linked hash map): with 512-byte clusters the default cache holds 65,536 tables, and a miss
//! of a full cache must not cost a walk over all of them.
//!
//! Tables the writer changed and has not written back are *pinned*: kept apart from the LRU
//! order, never evicted (the cache is their only up-to-date copy), not counted in the capacity.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::format::HostOffset;

/// A table as cached: its big-endian words decoded (two words per entry with extended L2).
pub type Table = Arc<Vec<u64>>;

/// The cache state behind the lock.
#[derive(Debug)]
struct Slots {
    /// Tables as on disk, in least-recently-used order.
    tables: LruCache<u64, Table>,
    /// Tables the writer changed and has not written back yet.
    pinned: HashMap<u64, Table>,
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
        self.tables.get(&offset.0).map(Arc::clone)
    }
}

/// A bounded LRU cache of tables keyed by host offset.
#[derive(Debug)]
pub struct TableCache {
    slots: Mutex<Slots>,
    capacity: NonZeroUsize,
}

impl TableCache {
    /// A cache that holds at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        TableCache {
            slots: Mutex::new(Slots {
                tables: LruCache::new(capacity),
                pinned: HashMap::new(),
                generation: 0,
            }),
            capacity,
        }
    }

    /// How many tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity.get()
    }

    /// How many tables it holds now (pinned ones apart).
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
        // Full: the least recently used table goes.
        slots.tables.push(offset.0, Arc::clone(&loaded));
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
        let t = slots.tables.pop(&offset.0).unwrap_or(table);
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

    /// Moves every pinned table back among the ordinary (evictable) ones, as just used: they
    /// are on disk now. Past the capacity, the least recently used tables go.
    pub fn unpin(&self) {
        let mut slots = self.lock();
        let pinned = std::mem::take(&mut slots.pinned);
        for (o, t) in pinned {
            slots.tables.push(o, t);
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
        slots.tables.pop(&offset.0);
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
    fn pinned_tables_stay_and_unpin_keeps_the_capacity() {
        let cache = TableCache::new(2);
        let load = |o: u64| move || Ok::<_, ()>(vec![o]);
        cache.get_or_load(HostOffset(1), load(1)).unwrap();
        cache.pin(HostOffset(1), Arc::new(vec![0]));
        cache.edit(HostOffset(1), |t| t[0] = 11).unwrap();
        // Two more tables fill the cache; the pinned one is not among them and not evicted.
        cache.get_or_load(HostOffset(2), load(2)).unwrap();
        cache.get_or_load(HostOffset(3), load(3)).unwrap();
        let got = cache
            .get_or_load(HostOffset(1), || Err::<Vec<u64>, _>("not loaded again"))
            .unwrap();
        assert_eq!(got[0], 11);
        assert_eq!((cache.len(), cache.dirty_len()), (2, 1));
        // Unpinned as just used: the least recently used of the others goes.
        cache.unpin();
        assert_eq!((cache.len(), cache.dirty_len()), (2, 0));
        assert!(cache.get_or_load(HostOffset(2), || Err("evicted")).is_err());
        assert!(cache
            .get_or_load(HostOffset(3), || Err::<Vec<u64>, _>("kept"))
            .is_ok());
        cache.forget(HostOffset(3));
        assert!(cache
            .get_or_load(HostOffset(3), || Err("forgotten"))
            .is_err());
    }

    #[test]
    fn a_full_cache_of_many_tables_evicts_in_lru_order() {
        let n = 65_536u64;
        let cache = TableCache::new(n as usize);
        for o in 0..2 * n {
            cache
                .get_or_load(HostOffset(o), || Ok::<_, ()>(vec![o]))
                .unwrap();
        }
        assert_eq!(cache.len(), n as usize);
        // The second half stayed, the first half went.
        assert!(cache
            .get_or_load(HostOffset(2 * n - 1), || Err("gone"))
            .is_ok());
        assert!(cache
            .get_or_load(HostOffset(0), || Err::<Vec<u64>, _>("gone"))
            .is_err());
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
