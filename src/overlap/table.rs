//! The cluster table: an open-addressing hash table from host cluster index to metadata type bits.
//!
//! Every slot is one `u64` that packs the key and the value: `cluster << 16 | types`. Host offsets
//! are below 2^56 and clusters are at least 512 bytes, so a cluster index has at most 47 bits and
//! the packed word never overflows. A slot whose low 16 bits are zero is empty (a present cluster
//! always carries at least one type), so the table needs no separate occupancy array and one
//! probe reads key and answer from the same cache line.
//!
//! Collisions are resolved by linear probing; deletion shifts later entries back instead of
//! leaving tombstones, so a lookup miss always ends at the first empty slot. The load factor is
//! kept between 1/2 and 3/4 (growth by 3/2), which bounds memory at 16 bytes per metadata cluster
//! after a resize and keeps the expected probe length of a miss within one or two cache lines.
//!
//! Locality: the home slot of cluster `c` is `8 * h(c / 8) + c % 8`, so eight consecutive clusters
//! sit in eight consecutive slots (one cache line). A check over a multi-cluster write then touches
//! one line per eight clusters instead of one per cluster. `h` is a seeded 64-bit mixer: the seed
//! is drawn per table, so an image cannot choose metadata offsets that all collide.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Slots per locality group (one 64-byte cache line of `u64` slots).
const GROUP: u64 = 8;
/// Bits of a slot that hold the type bits; the cluster index sits above them.
const TYPE_BITS: u32 = 16;
const TYPE_MASK: u64 = (1 << TYPE_BITS) - 1;
/// The smallest table that is ever allocated, in slots.
pub(crate) const MIN_SLOTS: usize = 16;

/// An open-addressing map from cluster index to a non-empty set of type bits.
#[derive(Debug, Clone)]
pub(crate) struct ClusterTable {
    /// Packed entries; empty slots are 0. Its length is zero or a multiple of [`GROUP`].
    slots: Vec<u64>,
    /// Number of occupied slots.
    len: usize,
    /// Per-table random seed for the home-slot hash.
    seed: u64,
    /// The smallest and largest cluster ever inserted (never narrowed by removals): no cluster
    /// outside is present, which lets a full table refuse a far range without probing it.
    bounds: Option<(u64, u64)>,
}

/// What [`ClusterTable::or_insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    /// The cluster was present or has been added; the types it held before (0 if new).
    Done(u16),
    /// The cluster is new and the table may not grow any further (memory limit).
    Full,
}

/// The finalizer of SplitMix64: a fast bijective mixer whose output bits all depend on every
/// input bit.
#[inline]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl ClusterTable {
    /// An empty table; allocates nothing until the first insertion.
    pub(crate) fn new() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(0x71c0_2ab1);
        ClusterTable {
            slots: Vec::new(),
            len: 0,
            seed: hasher.finish(),
            bounds: None,
        }
    }

    /// Number of clusters present.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by the slot array (its allocation, not just the used part).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<u64>()
    }

    /// Number of slots.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The home slot of `cluster` in a table of `nslots` slots (a non-zero multiple of 8).
    #[inline]
    fn home(&self, cluster: u64, nslots: usize) -> usize {
        let groups = (nslots as u64) / GROUP;
        // Multiply-shift maps the 64-bit hash onto [0, groups) without a division.
        let g = ((mix((cluster / GROUP) ^ self.seed) as u128 * groups as u128) >> 64) as u64;
        (g * GROUP + cluster % GROUP) as usize
    }

    #[inline]
    fn next(i: usize, nslots: usize) -> usize {
        if i + 1 == nslots {
            0
        } else {
            i + 1
        }
    }

    /// The type bits of `cluster`, or 0 if it is absent.
    #[inline]
    pub(crate) fn get(&self, cluster: u64) -> u16 {
        let n = self.slots.len();
        if n == 0 {
            return 0;
        }
        let mut i = self.home(cluster, n);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return 0;
            }
            if s >> TYPE_BITS == cluster {
                return (s & TYPE_MASK) as u16;
            }
            i = Self::next(i, n);
        }
    }

    /// The OR of the type bits of every cluster in `first..=last`.
    ///
    /// Costs one probe per cluster for short ranges and one pass over the table for ranges longer
    /// than the table, so a check never costs more than the larger of its length and the table.
    pub(crate) fn range_or(&self, first: u64, last: u64) -> u16 {
        if self.len == 0 || last < first {
            return 0;
        }
        let count = last - first;
        if count < (self.slots.len() as u64) / 4 {
            let mut acc = 0;
            for c in first..=last {
                acc |= self.get(c);
            }
            acc
        } else {
            self.slots
                .iter()
                .filter(|&&s| s != 0 && (first..=last).contains(&(s >> TYPE_BITS)))
                .fold(0, |acc, &s| acc | (s & TYPE_MASK) as u16)
        }
    }

    /// Adds `types` (non-zero) to `cluster`, growing the table up to `max_slots`.
    pub(crate) fn or_insert(&mut self, cluster: u64, types: u16, max_slots: usize) -> Insert {
        debug_assert!(types != 0 && cluster < (1 << 48));
        let n = self.slots.len();
        if n > 0 {
            let mut i = self.home(cluster, n);
            loop {
                let s = self.slots[i];
                if s == 0 {
                    break;
                }
                if s >> TYPE_BITS == cluster {
                    self.slots[i] = s | u64::from(types);
                    return Insert::Done((s & TYPE_MASK) as u16);
                }
                i = Self::next(i, n);
            }
        }
        if !self.reserve_one(max_slots) {
            return Insert::Full;
        }
        let n = self.slots.len();
        let mut i = self.home(cluster, n);
        while self.slots[i] != 0 {
            i = Self::next(i, n);
        }
        self.slots[i] = cluster << TYPE_BITS | u64::from(types);
        self.len += 1;
        self.bounds = Some(match self.bounds {
            Some((lo, hi)) => (lo.min(cluster), hi.max(cluster)),
            None => (cluster, cluster),
        });
        Insert::Done(0)
    }

    /// The smallest and largest cluster that may be present (`None`: the table is empty).
    pub(crate) fn bounds(&self) -> Option<(u64, u64)> {
        self.bounds
    }

    /// Whether no new cluster can be added under `max_slots` (present ones can still change).
    pub(crate) fn is_full(&self, max_slots: usize) -> bool {
        let n = self.slots.len();
        let wanted = self.len + 1;
        let most = max_slots / GROUP as usize * GROUP as usize;
        n > 0 && n >= most && wanted * 16 > n * 15
    }

    /// Makes room for one more entry. Normally the table grows by 3/2 at load 3/4; under a memory
    /// limit it grows as far as the limit allows and then fills up to load 15/16 (never full, so a
    /// lookup always meets an empty slot).
    fn reserve_one(&mut self, max_slots: usize) -> bool {
        let n = self.slots.len();
        let wanted = self.len + 1;
        if wanted * 4 <= n * 3 {
            return true;
        }
        let grown = round_slots((n + n / 2).max(MIN_SLOTS));
        let target = grown.min(max_slots / GROUP as usize * GROUP as usize);
        // A failed allocation is treated like the memory limit: the caller keeps the cluster
        // as "unchecked" (never under-reported) instead of the process aborting.
        if target > n && wanted * 16 <= target * 15 && self.resize(target) {
            return true;
        }
        wanted * 16 <= n * 15
    }

    /// Removes `types` from `cluster`; drops the cluster when no type is left.
    pub(crate) fn clear_bits(&mut self, cluster: u64, types: u16) {
        let n = self.slots.len();
        if n == 0 {
            return;
        }
        let mut i = self.home(cluster, n);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return;
            }
            if s >> TYPE_BITS == cluster {
                let left = s & !u64::from(types);
                if left & TYPE_MASK != 0 {
                    self.slots[i] = left;
                } else {
                    self.delete_at(i);
                }
                return;
            }
            i = Self::next(i, n);
        }
    }

    /// Removes `types` from every present cluster in `first..=last`, visiting whichever is smaller:
    /// the range or the table.
    pub(crate) fn clear_range(&mut self, first: u64, last: u64, types: u16) {
        if self.len == 0 || last < first {
            return;
        }
        if last - first < (self.slots.len() as u64) / 4 {
            for c in first..=last {
                self.clear_bits(c, types);
            }
        } else {
            let doomed: Vec<u64> = self
                .slots
                .iter()
                .filter(|&&s| s != 0 && (first..=last).contains(&(s >> TYPE_BITS)))
                .map(|&s| s >> TYPE_BITS)
                .collect();
            for c in doomed {
                self.clear_bits(c, types);
            }
        }
        self.maybe_shrink();
    }

    /// Empties slot `i` and shifts back the entries after it whose probe sequence passed over it,
    /// so that no lookup stops early at the hole.
    fn delete_at(&mut self, mut hole: usize) {
        let n = self.slots.len();
        self.slots[hole] = 0;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = Self::next(j, n);
            let s = self.slots[j];
            if s == 0 {
                return;
            }
            let home = self.home(s >> TYPE_BITS, n);
            // The entry at j may move to the hole iff its home is not cyclically within (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = s;
                self.slots[j] = 0;
                hole = j;
            }
        }
    }

    /// Gives memory back once the table is less than a quarter full.
    pub(crate) fn maybe_shrink(&mut self) {
        let n = self.slots.len();
        if n > MIN_SLOTS && self.len * 4 < n {
            let target = if self.len == 0 {
                0
            } else {
                round_slots((self.len * 2).max(MIN_SLOTS))
            };
            self.resize(target);
        }
    }

    /// Rehashes every entry into a fresh array of `nslots` slots (0 frees everything). Returns
    /// false, changing nothing, when the new array cannot be allocated.
    fn resize(&mut self, nslots: usize) -> bool {
        if nslots == 0 {
            self.slots = Vec::new();
            return true;
        }
        let mut slots: Vec<u64> = Vec::new();
        if slots.try_reserve_exact(nslots).is_err() {
            return false;
        }
        slots.resize(nslots, 0);
        let old = std::mem::take(&mut self.slots);
        advise_huge_pages(&slots);
        for s in old.into_iter().filter(|&s| s != 0) {
            let mut i = self.home(s >> TYPE_BITS, nslots);
            while slots[i] != 0 {
                i = Self::next(i, nslots);
            }
            slots[i] = s;
        }
        self.slots = slots;
        true
    }

    /// Every present `(cluster, types)` pair, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u16)> + '_ {
        self.slots
            .iter()
            .filter(|&&s| s != 0)
            .map(|&s| (s >> TYPE_BITS, (s & TYPE_MASK) as u16))
    }
}

/// Asks the kernel to back a large, still untouched slot array with transparent huge pages.
///
/// A check is one random access into the table; with 4 KiB pages a table of tens of MiB costs a
/// TLB miss (a page walk) on top of the cache miss. Best effort: failure changes nothing.
fn advise_huge_pages(slots: &[u64]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(slots);
    if bytes < 2 * HUGE {
        return;
    }
    let start = slots.as_ptr() as usize;
    let aligned = start.next_multiple_of(HUGE);
    let len = (start + bytes - aligned) / HUGE * HUGE;
    // SAFETY: madvise only changes how the kernel backs pages inside this live allocation
    // (`aligned..aligned + len` lies within it); it never changes their contents.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

/// Rounds a slot count up to a whole number of groups.
fn round_slots(n: usize) -> usize {
    n.div_ceil(GROUP as usize) * GROUP as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A small deterministic generator for test data (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn insert_get_remove_against_model() {
        let mut t = ClusterTable::new();
        let mut model: BTreeMap<u64, u16> = BTreeMap::new();
        let mut rng = Rng(0x1234_5678);
        for step in 0..50_000 {
            // A small key space forces collisions, long probe chains and wrap-around.
            let c = rng.next() % 3000 + if step % 7 == 0 { (1 << 47) - 3000 } else { 0 };
            let bits = (rng.next() % 0x7ff + 1) as u16;
            if rng.next() % 3 == 0 {
                t.clear_bits(c, bits);
                if let Some(v) = model.get_mut(&c) {
                    *v &= !bits;
                    if *v == 0 {
                        model.remove(&c);
                    }
                }
                t.maybe_shrink();
            } else {
                assert!(matches!(t.or_insert(c, bits, usize::MAX), Insert::Done(_)));
                *model.entry(c).or_default() |= bits;
            }
            assert_eq!(t.len(), model.len());
        }
        for c in 0..3000 {
            assert_eq!(t.get(c), model.get(&c).copied().unwrap_or(0), "cluster {c}");
        }
        let mut all: Vec<(u64, u16)> = t.iter().collect();
        all.sort_unstable();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn load_stays_between_half_and_three_quarters_when_growing() {
        let mut t = ClusterTable::new();
        for c in 0..100_000u64 {
            t.or_insert(c * 977, 1, usize::MAX);
            if t.len() > MIN_SLOTS {
                assert!(t.len() * 4 <= t.capacity() * 3);
                assert!(t.len() * 2 + GROUP as usize >= t.capacity() || t.len() < 64);
            }
        }
    }

    #[test]
    fn full_table_under_limit_never_loses_an_empty_slot() {
        let mut t = ClusterTable::new();
        let mut full = 0;
        for c in 0..100u64 {
            if t.or_insert(c * 13, 2, 32) == Insert::Full {
                full += 1;
            }
        }
        assert_eq!(t.capacity(), 32);
        assert_eq!(t.len(), 30); // 15/16 of 32
        assert_eq!(full, 70);
        // Misses still terminate and report nothing.
        assert_eq!(t.get(7), 0);
        assert_eq!(t.get(13 * 29), 2);
    }

    #[test]
    fn range_or_both_strategies_agree() {
        let mut t = ClusterTable::new();
        for c in [5u64, 6, 100, 1000, 5000] {
            t.or_insert(c, 1 << (c % 11), usize::MAX);
        }
        let expect = |a: u64, b: u64| {
            [5u64, 6, 100, 1000, 5000]
                .iter()
                .filter(|&&c| a <= c && c <= b)
                .fold(0u16, |acc, &c| acc | 1 << (c % 11))
        };
        for (a, b) in [
            (0, 4),
            (0, 5),
            (6, 6),
            (7, 99),
            (7, 100),
            (0, 10_000),
            (1001, 4999),
        ] {
            assert_eq!(t.range_or(a, b), expect(a, b), "{a}..={b}");
        }
    }
}
