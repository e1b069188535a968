//! Typed offsets and the cluster geometry that converts between them.
//!
//! A guest offset (position in the virtual disk) and a host offset (position in the image
//! file) are both `u64`; mixing them up is the classic qcow2 bug. The newtypes here make the
//! compiler tell them apart, and [`Geometry`] does the index arithmetic of the two-level
//! mapping (guest offset → L1 index, L2 index, offset within the cluster).

/// Largest cluster_bits QEMU supports (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster_bits the spec allows (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Host offsets stored in L1/L2/bitmap table entries are limited to 56 bits (64 PiB).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// A byte position in the virtual disk seen by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte position in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// The number of a host cluster: `host offset >> cluster_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterIndex(pub u64);

/// A number of clusters (a length, not a position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterCount(pub u64);

/// Cluster size and L2 table layout of one image.
///
/// Invariant: `cluster_bits` is within [`MIN_CLUSTER_BITS`]`..=`[`MAX_CLUSTER_BITS`] (the
/// constructor refuses anything else), so every shift below is in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
}

impl Geometry {
    /// Geometry for `cluster_bits`; `extended_l2` selects 16-byte L2 entries. `None` when
    /// `cluster_bits` is outside 9..=21.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Option<Self> {
        (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS)
            .contains(&cluster_bits)
            .then_some(Geometry {
                cluster_bits,
                extended_l2,
            })
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 16 bytes (extended L2 with subclusters).
    pub fn is_extended_l2(&self) -> bool {
        self.extended_l2
    }

    /// log2 of the subcluster size: cluster_bits − 5 with extended L2 entries (32 subclusters),
    /// else the cluster itself.
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Subcluster size in bytes (the cluster size without extended L2 entries).
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in one L2 table (one cluster).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Guest bytes mapped by one L1 entry (one full L2 table).
    pub fn bytes_per_l1_entry(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    /// L1 entries needed to map `virtual_size` guest bytes (rounded up).
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.bytes_per_l1_entry())
    }

    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, guest: GuestOffset) -> u64 {
        guest.0 >> (self.cluster_bits + self.l2_bits())
    }

    /// Index into the L2 table for a guest offset.
    pub fn l2_index(&self, guest: GuestOffset) -> u64 {
        (guest.0 >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// Offset within its cluster of any byte position.
    pub fn in_cluster_offset(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Whether a host offset is on a cluster boundary.
    pub fn is_aligned(&self, host: HostOffset) -> bool {
        self.in_cluster_offset(host.0) == 0
    }

    /// The first byte of a host cluster, or `None` if it is not representable.
    pub fn cluster_start(&self, cluster: ClusterIndex) -> Option<HostOffset> {
        cluster.0.checked_mul(self.cluster_size()).map(HostOffset)
    }

    /// Clusters needed to hold `bytes` bytes starting on a cluster boundary.
    pub fn bytes_to_clusters(&self, bytes: u64) -> ClusterCount {
        ClusterCount(bytes.div_ceil(self.cluster_size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_standard_64k() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.bytes_per_l1_entry(), 512 << 20);
        let guest = GuestOffset((3 << 29) + (5 << 16) + 17);
        assert_eq!(g.l1_index(guest), 3);
        assert_eq!(g.l2_index(guest), 5);
        assert_eq!(g.in_cluster_offset(guest.0), 17);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.l1_entries_for(0), 0);
    }

    #[test]
    fn geometry_extended_l2_halves_entries() {
        let g = Geometry::new(16, true).unwrap();
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.l2_entry_size(), 16);
        assert_eq!(g.bytes_per_l1_entry(), 256 << 20);
    }

    #[test]
    fn geometry_rejects_bad_cluster_bits() {
        assert!(Geometry::new(8, false).is_none());
        assert!(Geometry::new(22, false).is_none());
        assert!(Geometry::new(9, false).is_some());
        assert!(Geometry::new(21, true).is_some());
    }

    #[test]
    fn cluster_conversions() {
        let g = Geometry::new(12, false).unwrap();
        assert_eq!(g.cluster_start(ClusterIndex(2)), Some(HostOffset(8192)));
        assert_eq!(g.cluster_start(ClusterIndex(u64::MAX)), None);
        assert!(g.is_aligned(HostOffset(4096)));
        assert!(!g.is_aligned(HostOffset(4097)));
        assert_eq!(g.bytes_to_clusters(4097), ClusterCount(2));
    }
}
