//! The metadata map: which host clusters hold which kinds of qcow2 metadata.
//!
//! The map answers the pre-write question "does `[offset, offset + size)` touch metadata, and
//! which?" with one hash probe per cluster of the write (usually one cache line for the whole
//! write), independent of how much metadata the image has or how large the file is. Memory grows
//! with the number of metadata clusters held (8 bytes per slot, at most 16 bytes per cluster),
//! never with the host file size. See `docs/design/metadata-map.md` for the measurements.

use super::table::{ClusterTable, Insert, MIN_SLOTS};
use super::types::MetadataType;
pub use crate::format::offsets::MAX_HOST_OFFSET;
use crate::format::{ClusterCount, HostOffset};

/// No qcow2 metadata structure spans more clusters than this in one piece (the largest, a 64 MiB
/// snapshot table or bitmap directory at 512-byte clusters, has 2^17); entering a larger range is
/// refused rather than allocating without bound.
pub const MAX_ENTER_CLUSTERS: u64 = 1 << 24;
/// How many disjoint ranges the map remembers as "not held"; more are merged (conservatively).
const MAX_UNCHECKED: usize = 8;

/// Errors from the map's arguments. The map itself cannot be corrupted by any argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The cluster size is not a power of two between 512 B and 2 MiB.
    #[error("cluster size {0} is not a power of two between 512 and 2097152")]
    BadClusterSize(u64),
    /// `offset + size` does not fit in 64 bits, or the range ends past 2^56.
    #[error("range at offset {offset} with {size} bytes is beyond the largest host offset 2^56")]
    OutOfRange {
        /// Start of the offending range.
        offset: u64,
        /// Its length in bytes (saturated).
        size: u64,
    },
    /// A single enter would cover more clusters than any qcow2 metadata structure can.
    #[error("cannot enter {0} clusters at once (at most {MAX_ENTER_CLUSTERS})")]
    TooLarge(u64),
    /// The memory limit cannot even hold the map's fixed part.
    #[error("total_size_limit {limit} is below the map's minimum of {minimum} bytes")]
    LimitTooSmall {
        /// The limit that was asked for.
        limit: usize,
        /// The smallest limit that works.
        minimum: usize,
    },
}

/// A sorted, bounded set of half-open cluster ranges that the map could not hold.
#[derive(Debug, Clone, Copy, Default)]
struct Unchecked {
    ranges: [(u64, u64); MAX_UNCHECKED],
    len: usize,
}

impl Unchecked {
    fn as_slice(&self) -> &[(u64, u64)] {
        &self.ranges[..self.len]
    }

    /// Whether any remembered range intersects clusters `first..=last`.
    #[inline]
    fn intersects(&self, first: u64, last: u64) -> bool {
        self.as_slice().iter().any(|&(s, e)| s <= last && first < e)
    }

    /// Adds `[start, end)`, merging overlapping or touching ranges; past the bound, the two
    /// ranges with the smallest gap become one range covering the gap too (never less). In
    /// place, without allocating: a scan may add millions of ranges.
    fn add(&mut self, start: u64, end: u64) {
        let mut v = [(0u64, 0u64); MAX_UNCHECKED + 1];
        let mut n = 0;
        let (mut s, mut e) = (start, end);
        let mut placed = false;
        for &(rs, re) in self.as_slice() {
            if re < s {
                v[n] = (rs, re);
                n += 1;
            } else if e < rs {
                if !placed {
                    v[n] = (s, e);
                    n += 1;
                    placed = true;
                }
                v[n] = (rs, re);
                n += 1;
            } else {
                // Overlapping or touching: absorbed into the new range.
                (s, e) = (s.min(rs), e.max(re));
            }
        }
        if !placed {
            v[n] = (s, e);
            n += 1;
        }
        if n > MAX_UNCHECKED {
            let i = (0..n - 1).min_by_key(|&i| v[i + 1].0 - v[i].1).unwrap_or(0);
            v[i].1 = v[i + 1].1;
            v.copy_within(i + 2..n, i + 1);
            n -= 1;
        }
        self.len = n;
        self.ranges[..n].copy_from_slice(&v[..n]);
    }
}

/// The metadata map of one image.
///
/// Semantics (`docs/design/architecture.md`, the check): only `enabled` types are tracked; [`check`](Self::check) rounds the
/// range out to whole clusters and returns the OR of every type present in them, plus
/// `MAIN_HEADER` for any range that starts in cluster 0. [`enter`](Self::enter) ignores an
/// unaligned offset (broken metadata is the scanner's to report); [`remove`](Self::remove) rounds
/// an unaligned range out. A cluster may carry several types; removing one keeps the others.
///
/// Under a `total_size_limit` the map never under-reports: ranges it could not hold are
/// remembered ([`unchecked_ranges`](Self::unchecked_ranges)), a check that touches one returns
/// every enabled type, and [`is_exact`](Self::is_exact) tells the caller to ask the naive checker
/// instead.
#[derive(Debug, Clone)]
pub struct MetadataMap {
    cluster_bits: u32,
    enabled: MetadataType,
    table: ClusterTable,
    /// Largest slot count the limit allows (`usize::MAX` without a limit).
    max_slots: usize,
    limit: Option<usize>,
    unchecked: Unchecked,
}

impl MetadataMap {
    /// An empty map for clusters of `cluster_size` bytes that tracks the `enabled` types and holds
    /// at most `total_size_limit` bytes (struct and allocations together), if given.
    pub fn new(
        cluster_size: u64,
        enabled: MetadataType,
        total_size_limit: Option<usize>,
    ) -> Result<Self, MapError> {
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(MapError::BadClusterSize(cluster_size));
        }
        let fixed = std::mem::size_of::<Self>();
        let max_slots = match total_size_limit {
            None => usize::MAX,
            Some(limit) if limit < fixed => {
                return Err(MapError::LimitTooSmall {
                    limit,
                    minimum: fixed,
                })
            }
            Some(limit) => (limit - fixed) / std::mem::size_of::<u64>(),
        };
        Ok(MetadataMap {
            cluster_bits: cluster_size.trailing_zeros(),
            enabled,
            table: ClusterTable::new(),
            max_slots,
            limit: total_size_limit,
            unchecked: Unchecked::default(),
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The types this map tracks.
    pub fn enabled(&self) -> MetadataType {
        self.enabled
    }

    /// The memory limit, if any.
    pub fn total_size_limit(&self) -> Option<usize> {
        self.limit
    }

    /// Number of clusters that carry at least one type.
    pub fn metadata_clusters(&self) -> usize {
        self.table.len()
    }

    /// The first and last cluster of `[offset, offset + size)` (`size > 0`), rounded out.
    fn cluster_span(&self, offset: u64, size: u64) -> Result<(u64, u64), MapError> {
        let end = offset
            .checked_add(size)
            .ok_or(MapError::OutOfRange { offset, size })?;
        Ok((offset >> self.cluster_bits, (end - 1) >> self.cluster_bits))
    }

    /// `nb_clusters` in bytes, or `OutOfRange` (about the range at `offset`) when that overflows.
    fn clusters_to_bytes(&self, offset: u64, nb_clusters: u64) -> Result<u64, MapError> {
        nb_clusters
            .checked_shl(self.cluster_bits)
            .filter(|s| s >> self.cluster_bits == nb_clusters)
            .ok_or(MapError::OutOfRange {
                offset,
                size: u64::MAX,
            })
    }

    /// Records that `nb_clusters` clusters from `offset` hold metadata of `types`.
    ///
    /// Types that are not enabled are dropped; an offset that is not cluster-aligned is ignored.
    /// Returns the first cluster where the new types met types they may not share a cluster
    /// with ([`MetadataType::may_share`]), with the types that were there before: in a valid
    /// image no two structures share a cluster, except an L2 table used by both the active L1
    /// table and a snapshot. Finding it costs nothing extra: the insert sees the old types.
    pub fn enter(
        &mut self,
        offset: HostOffset,
        nb_clusters: ClusterCount,
        types: MetadataType,
    ) -> Result<Option<(HostOffset, MetadataType)>, MapError> {
        let (offset, nb_clusters) = (offset.0, nb_clusters.0);
        let types = types & self.enabled;
        if nb_clusters > MAX_ENTER_CLUSTERS {
            return Err(MapError::TooLarge(nb_clusters));
        }
        let size = self.clusters_to_bytes(offset, nb_clusters)?;
        match offset.checked_add(size) {
            Some(end) if end <= MAX_HOST_OFFSET => {}
            _ => return Err(MapError::OutOfRange { offset, size }),
        }
        if types.is_empty() || nb_clusters == 0 || offset & (self.cluster_size() - 1) != 0 {
            return Ok(None);
        }
        let first = offset >> self.cluster_bits;
        let mut lost: Option<(u64, u64)> = None;
        let mut collision = None;
        let end = first + nb_clusters;
        // A full table holds no cluster outside its bounds, and can take none: that part of the
        // range is unchecked at once, without probing cluster by cluster (a file can declare
        // tables of billions of clusters; entering them must not cost a probe each).
        let mut probe = first..end;
        if self.table.is_full(self.max_slots) {
            let (lo, hi) = self.table.bounds().unwrap_or((u64::MAX, 0));
            let (a, b) = (first.max(lo), end.min(hi.saturating_add(1)));
            if a >= b {
                self.unchecked.add(first, end);
                return Ok(None);
            }
            if first < a {
                self.unchecked.add(first, a);
            }
            if b < end {
                self.unchecked.add(b, end);
            }
            probe = a..b;
        }
        for c in probe {
            match self.table.or_insert(c, types.bits(), self.max_slots) {
                Insert::Full => {
                    lost = Some(match lost {
                        Some((s, _)) => (s, c + 1),
                        None => (c, c + 1),
                    });
                    continue;
                }
                Insert::Done(before) => {
                    let before = MetadataType::from_bits_truncate(before);
                    if collision.is_none() && !before.may_share(types) {
                        collision = Some((HostOffset(c << self.cluster_bits), before));
                    }
                }
            }
            if let Some((s, e)) = lost.take() {
                self.unchecked.add(s, e);
            }
        }
        if let Some((s, e)) = lost {
            self.unchecked.add(s, e);
        }
        Ok(collision)
    }

    /// Records that `types` no longer live in `nb_clusters` clusters from `offset` (rounded out to
    /// whole clusters when unaligned). Other types in those clusters stay.
    ///
    /// Ranges the map could not hold stay unchecked: what else lives there is unknown.
    pub fn remove(
        &mut self,
        offset: HostOffset,
        nb_clusters: ClusterCount,
        types: MetadataType,
    ) -> Result<(), MapError> {
        let (offset, nb_clusters) = (offset.0, nb_clusters.0);
        let types = types & self.enabled;
        let size = self.clusters_to_bytes(offset, nb_clusters)?;
        if size == 0 || types.is_empty() {
            return Ok(());
        }
        let (first, last) = self.cluster_span(offset, size)?;
        self.table.clear_range(first, last, types.bits());
        Ok(())
    }

    /// The metadata types (of the enabled ones, minus `ignore`) that a write of `size` bytes at
    /// `offset` would touch. Empty when `size` is 0.
    #[inline]
    pub fn check(
        &self,
        offset: HostOffset,
        size: u64,
        ignore: MetadataType,
    ) -> Result<MetadataType, MapError> {
        let offset = offset.0;
        if size == 0 {
            return Ok(MetadataType::empty());
        }
        let (first, last) = self.cluster_span(offset, size)?;
        let mask = self.enabled - ignore;
        if self.unchecked.len != 0 && self.unchecked.intersects(first, last) {
            return Ok(mask);
        }
        let mut bits = if first == last {
            self.table.get(first)
        } else {
            self.table.range_or(first, last)
        };
        if first == 0 {
            bits |= MetadataType::MAIN_HEADER.bits();
        }
        Ok(MetadataType::from_bits_truncate(bits) & mask)
    }

    /// Whether [`check`](Self::check) is exact over `[offset, offset + size)`: false when the
    /// range touches a range the memory limit kept out of the map.
    pub fn is_exact(&self, offset: HostOffset, size: u64) -> Result<bool, MapError> {
        let offset = offset.0;
        if size == 0 {
            return Ok(true);
        }
        let (first, last) = self.cluster_span(offset, size)?;
        Ok(!self.unchecked.intersects(first, last))
    }

    /// The host ranges `(offset, length)` in bytes that the map could not hold.
    pub fn unchecked_ranges(&self) -> Vec<(u64, u64)> {
        self.unchecked
            .as_slice()
            .iter()
            .map(|&(s, e)| (s << self.cluster_bits, (e - s) << self.cluster_bits))
            .collect()
    }

    /// Every metadata extent as `(offset, length, types)` in bytes, sorted, with adjacent clusters
    /// of equal types merged.
    pub fn extents(&self) -> Vec<(u64, u64, MetadataType)> {
        let mut entries: Vec<(u64, u16)> = self.table.iter().collect();
        entries.sort_unstable_by_key(|&(c, _)| c);
        let mut out: Vec<(u64, u64, u16)> = Vec::new();
        for (c, t) in entries {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == c && last.2 == t => last.1 += 1,
                _ => out.push((c, 1, t)),
            }
        }
        out.into_iter()
            .map(|(c, n, t)| {
                (
                    c << self.cluster_bits,
                    n << self.cluster_bits,
                    MetadataType::from_bits_truncate(t),
                )
            })
            .collect()
    }

    /// Bytes this map holds: the struct itself plus its allocations (capacity, not length).
    pub fn memory_usage(&self) -> usize {
        std::mem::size_of::<Self>() + self.table.heap_bytes()
    }

    /// The smallest `total_size_limit` that lets the map allocate its first table.
    pub fn minimum_limit() -> usize {
        std::mem::size_of::<Self>() + MIN_SLOTS * std::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MetadataType as T;

    const CS: u64 = 65536;

    fn map() -> MetadataMap {
        MetadataMap::new(CS, T::all(), None).unwrap()
    }

    #[test]
    fn rejects_bad_cluster_sizes_and_ranges() {
        for cs in [0, 256, 1000, 4 << 20, u64::MAX] {
            assert_eq!(
                MetadataMap::new(cs, T::all(), None).unwrap_err(),
                MapError::BadClusterSize(cs)
            );
        }
        let mut m = map();
        assert!(m.check(HostOffset(u64::MAX), 2, T::empty()).is_err());
        assert!(m
            .enter(
                HostOffset(MAX_HOST_OFFSET - CS),
                ClusterCount(2),
                T::ACTIVE_L2
            )
            .is_err());
        assert!(m
            .enter(
                HostOffset(MAX_HOST_OFFSET - CS),
                ClusterCount(1),
                T::ACTIVE_L2
            )
            .is_ok());
        assert!(m
            .enter(
                HostOffset(0),
                ClusterCount(MAX_ENTER_CLUSTERS + 1),
                T::ACTIVE_L2
            )
            .is_err());
        assert!(m
            .remove(HostOffset(0), ClusterCount(u64::MAX), T::ACTIVE_L2)
            .is_err());
        assert_eq!(
            m.check(HostOffset(MAX_HOST_OFFSET - 1), 1, T::empty()),
            Ok(T::ACTIVE_L2)
        );
    }

    #[test]
    fn header_rule_and_rounding() {
        let mut m = map();
        assert_eq!(m.check(HostOffset(0), 0, T::empty()), Ok(T::empty()));
        assert_eq!(
            m.check(HostOffset(CS - 1), 1, T::empty()),
            Ok(T::MAIN_HEADER)
        );
        assert_eq!(
            m.check(HostOffset(CS - 1), 1, T::MAIN_HEADER),
            Ok(T::empty())
        );
        assert_eq!(m.check(HostOffset(CS), 1, T::empty()), Ok(T::empty()));
        m.enter(HostOffset(3 * CS), ClusterCount(2), T::ACTIVE_L1)
            .unwrap();
        assert_eq!(
            m.check(HostOffset(3 * CS - 1), 1, T::empty()),
            Ok(T::empty())
        );
        assert_eq!(
            m.check(HostOffset(3 * CS - 1), 2, T::empty()),
            Ok(T::ACTIVE_L1)
        );
        assert_eq!(
            m.check(HostOffset(5 * CS - 1), 1, T::empty()),
            Ok(T::ACTIVE_L1)
        );
        assert_eq!(
            m.check(HostOffset(5 * CS), 10 * CS, T::empty()),
            Ok(T::empty())
        );
        assert_eq!(
            m.check(HostOffset(CS - 1), 3 * CS, T::empty()),
            Ok(T::MAIN_HEADER | T::ACTIVE_L1)
        );
    }

    #[test]
    fn unaligned_enter_ignored_unaligned_remove_rounded_out() {
        let mut m = map();
        m.enter(HostOffset(CS + 512), ClusterCount(1), T::ACTIVE_L2)
            .unwrap();
        assert!(m.extents().is_empty());
        m.enter(HostOffset(4 * CS), ClusterCount(3), T::REFCOUNT_BLOCK)
            .unwrap();
        m.remove(HostOffset(5 * CS + 1), ClusterCount(1), T::REFCOUNT_BLOCK)
            .unwrap();
        // [5*CS+1, 6*CS+1) rounds out to clusters 5 and 6.
        assert_eq!(m.extents(), vec![(4 * CS, CS, T::REFCOUNT_BLOCK)]);
    }

    #[test]
    fn several_types_per_cluster_and_merging() {
        let mut m = map();
        m.enter(HostOffset(10 * CS), ClusterCount(4), T::ACTIVE_L2)
            .unwrap();
        m.enter(HostOffset(11 * CS), ClusterCount(2), T::INACTIVE_L2)
            .unwrap();
        assert_eq!(
            m.extents(),
            vec![
                (10 * CS, CS, T::ACTIVE_L2),
                (11 * CS, 2 * CS, T::ACTIVE_L2 | T::INACTIVE_L2),
                (13 * CS, CS, T::ACTIVE_L2),
            ]
        );
        m.remove(HostOffset(10 * CS), ClusterCount(4), T::ACTIVE_L2)
            .unwrap();
        assert_eq!(m.extents(), vec![(11 * CS, 2 * CS, T::INACTIVE_L2)]);
        assert_eq!(
            m.check(HostOffset(12 * CS), 1, T::INACTIVE_L2),
            Ok(T::empty()),
            "ignored types are not reported"
        );
    }

    #[test]
    fn disabled_types_are_not_tracked() {
        let mut m = MetadataMap::new(CS, T::TEMPLATE_CACHED, None).unwrap();
        m.enter(HostOffset(2 * CS), ClusterCount(1), T::INACTIVE_L2)
            .unwrap();
        assert_eq!(m.metadata_clusters(), 0);
        m.enter(
            HostOffset(2 * CS),
            ClusterCount(1),
            T::INACTIVE_L2 | T::ACTIVE_L2,
        )
        .unwrap();
        assert_eq!(m.check(HostOffset(2 * CS), 1, T::empty()), Ok(T::ACTIVE_L2));
        let none = MetadataMap::new(CS, T::empty(), None).unwrap();
        assert_eq!(none.check(HostOffset(0), 1, T::empty()), Ok(T::empty()));
    }

    #[test]
    fn long_runs_and_huge_offsets() {
        let mut m = MetadataMap::new(512, T::all(), None).unwrap();
        // A 32 MiB L1 table at 512-byte clusters: 65536 clusters in one run.
        let base = (1u64 << 55) + 512 * 7;
        m.enter(HostOffset(base), ClusterCount(65536), T::ACTIVE_L1)
            .unwrap();
        assert_eq!(m.extents(), vec![(base, 65536 * 512, T::ACTIVE_L1)]);
        assert_eq!(m.check(HostOffset(base - 1), 1, T::empty()), Ok(T::empty()));
        assert_eq!(
            m.check(HostOffset(base + 65536 * 512), 1 << 40, T::empty()),
            Ok(T::empty())
        );
        assert_eq!(
            m.check(HostOffset(base - 512), 1 << 40, T::empty()),
            Ok(T::ACTIVE_L1)
        );
        // A check longer than the whole table takes the scanning path.
        assert_eq!(
            m.check(HostOffset(512), (1 << 56) - 512, T::empty()),
            Ok(T::ACTIVE_L1)
        );
        m.remove(HostOffset(base + 100 * 512), ClusterCount(10), T::ACTIVE_L1)
            .unwrap();
        assert_eq!(m.extents().len(), 2);
        m.remove(HostOffset(0), ClusterCount(1 << 47), T::all())
            .unwrap();
        assert!(m.extents().is_empty());
        assert!(m.memory_usage() < 1024, "shrinks when emptied");
    }

    #[test]
    fn group_boundaries_and_both_range_strategies() {
        // Clusters 6..=9 straddle the boundary between hash groups 0 (0..8) and 1 (8..16);
        // check every sub-range against a plain model, for tables small enough that long ranges
        // take the scanning path and short ones the probing path (the switch is at a quarter of
        // the table).
        let mut m = map();
        let mut model = std::collections::BTreeMap::new();
        for (c, t) in [
            (6u64, T::ACTIVE_L2),
            (7, T::INACTIVE_L2),
            (8, T::ACTIVE_L2),
            (9, T::REFCOUNT_BLOCK),
            (15, T::ACTIVE_L1),
            (16, T::ACTIVE_L1),
            (40, T::SNAPSHOT_TABLE),
        ] {
            m.enter(HostOffset(c * CS), ClusterCount(1), t).unwrap();
            model.insert(c, t);
        }
        for first in 0..45u64 {
            for last in first..45 {
                let want = model.range(first..=last).fold(
                    if first == 0 {
                        T::MAIN_HEADER
                    } else {
                        T::empty()
                    },
                    |a, (_, &t)| a | t,
                );
                let got = m
                    .check(HostOffset(first * CS), (last - first + 1) * CS, T::empty())
                    .unwrap();
                assert_eq!(got, want, "clusters {first}..={last}");
            }
        }
        // Split a run at a group boundary and merge it back.
        m.remove(HostOffset(8 * CS), ClusterCount(1), T::ACTIVE_L2)
            .unwrap();
        assert_eq!(m.check(HostOffset(8 * CS), 1, T::empty()), Ok(T::empty()));
        m.enter(HostOffset(8 * CS), ClusterCount(1), T::ACTIVE_L2)
            .unwrap();
        let ext = m.extents();
        assert!(ext.contains(&(6 * CS, CS, T::ACTIVE_L2)));
        assert!(ext.contains(&(8 * CS, CS, T::ACTIVE_L2)));
        assert!(ext.contains(&(15 * CS, 2 * CS, T::ACTIVE_L1)), "{ext:?}");
    }

    #[test]
    fn limit_never_under_reports() {
        let limit = MetadataMap::minimum_limit() + 16 * 8;
        let mut m = MetadataMap::new(CS, T::all(), Some(limit)).unwrap();
        for i in 0..1000u64 {
            m.enter(HostOffset((2 + 3 * i) * CS), ClusterCount(1), T::ACTIVE_L2)
                .unwrap();
        }
        assert!(m.memory_usage() <= limit);
        assert!(!m.unchecked_ranges().is_empty());
        for i in 0..1000u64 {
            let off = (2 + 3 * i) * CS;
            let got = m.check(HostOffset(off), 1, T::empty()).unwrap();
            assert!(got.contains(T::ACTIVE_L2), "cluster {i} under-reported");
            if m.is_exact(HostOffset(off), 1).unwrap() {
                assert_eq!(got, T::ACTIVE_L2);
            } else {
                assert_eq!(got, T::all());
            }
        }
        assert!(MetadataMap::new(CS, T::all(), Some(10)).is_err());
    }

    #[test]
    fn a_full_map_takes_far_ranges_whole_and_still_merges_inside_its_bounds() {
        let limit = MetadataMap::minimum_limit() + 16 * 8;
        let mut m = MetadataMap::new(CS, T::all(), Some(limit)).unwrap();
        let mut i = 0;
        while !m.table.is_full(m.max_slots) {
            m.enter(
                HostOffset((100 + 2 * i) * CS),
                ClusterCount(1),
                T::ACTIVE_L2,
            )
            .unwrap();
            i += 1;
        }
        // 65,536 clusters far past everything the map holds: one unchecked
        // range, without a probe per cluster.
        let far = 1u64 << 30;
        m.enter(HostOffset(far * CS), ClusterCount(1 << 16), T::INACTIVE_L1)
            .unwrap();
        assert!(m.unchecked_ranges().contains(&(far * CS, (1 << 16) * CS)));
        assert!(!m.is_exact(HostOffset((far + 12345) * CS), 1).unwrap());
        // Far below them too; and inside the bounds, a present cluster still gains the type.
        m.enter(HostOffset(2 * CS), ClusterCount(10), T::REFCOUNT_BLOCK)
            .unwrap();
        assert!(m.unchecked_ranges().contains(&(2 * CS, 10 * CS)));
        m.enter(HostOffset(100 * CS), ClusterCount(1), T::INACTIVE_L2)
            .unwrap();
        let got = m.check(HostOffset(100 * CS), 1, T::empty()).unwrap();
        assert!(got.contains(T::ACTIVE_L2 | T::INACTIVE_L2), "{got:?}");
    }

    #[test]
    fn unchecked_ranges_merge_conservatively() {
        let mut u = Unchecked::default();
        for i in 0..20u64 {
            u.add(i * 100, i * 100 + 1 + i);
        }
        assert_eq!(u.len, MAX_UNCHECKED);
        for i in 0..20u64 {
            assert!(u.intersects(i * 100, i * 100));
            assert!(u.intersects(i * 100 + i, i * 100 + i));
        }
        u.add(0, 5000);
        assert_eq!(u.as_slice(), &[(0, 5000)]);
    }
}
