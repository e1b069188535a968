//! L1 and L2 table entries (standard, extended and compressed) and big-endian table decoding.
//!
//! Entries are kept as the raw on-disk `u64` so that nothing is lost; the accessors decode the
//! fields the spec defines. Whether reserved bits are set is reported, never silently masked
//! away, because a scanner must flag such entries as corrupt.

use super::offsets::HostOffset;

/// Bit 63 of L1 and standard L2 entries: the refcount of the referenced cluster is exactly 1.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (version 3, not extended L2): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Bits 9–55: a cluster-aligned host offset in L1 and standard L2 entries.
pub const L1_L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0–8 and 56–62).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1–8 and 56–61).
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Size of the compressed-data sectors counted by compressed cluster descriptors.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// An active or snapshot L1 table entry: points at one L2 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// No L2 table: the clusters it would map read from the backing file (or as zeros).
    pub const UNALLOCATED: L1Entry = L1Entry(0);

    /// An entry for an L2 table at `table` that this L1 table alone references (COPIED set).
    pub fn owned_table(table: HostOffset) -> L1Entry {
        L1Entry(table.0 & L1_L2_OFFSET_MASK | OFLAG_COPIED)
    }

    /// The same entry without reserved bits: what a writer puts back when it rewrites the
    /// entry (QEMU also rebuilds a rewritten entry from its offset), so damage is not carried on.
    #[must_use]
    pub fn without_reserved(self) -> L1Entry {
        L1Entry(self.0 & !L1_RESERVED_MASK)
    }

    /// The same entry with COPIED set or cleared.
    #[must_use]
    pub fn with_copied(self, copied: bool) -> L1Entry {
        if copied {
            L1Entry(self.0 | OFLAG_COPIED)
        } else {
            L1Entry(self.0 & !OFLAG_COPIED)
        }
    }

    /// Whether this L1 table alone references an allocated L2 table, which may then be changed
    /// in place.
    pub fn owns_table(self) -> bool {
        self.copied() && self.is_allocated()
    }

    /// Host offset of the L2 table; 0 means the L2 table is not allocated.
    pub fn l2_offset(self) -> HostOffset {
        HostOffset(self.0 & L1_L2_OFFSET_MASK)
    }

    /// Whether the L2 table's refcount is exactly 1 (only meaningful in the active L1 table).
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    /// Whether an L2 table is referenced at all.
    pub fn is_allocated(self) -> bool {
        self.l2_offset().0 != 0
    }

    /// The reserved bits that are set (should be 0).
    pub fn reserved_bits(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// A standard (8-byte) L2 entry, or the first word of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// Unallocated: the cluster reads from the backing file (or as zeros).
    pub const UNALLOCATED: L2Entry = L2Entry(0);

    /// Reads as zeros with no host cluster (the zero flag alone; version 3, standard entries).
    pub const ZERO: L2Entry = L2Entry(OFLAG_ZERO);

    /// Data at the cluster `host`, which this image alone references (COPIED set).
    pub fn owned(host: HostOffset) -> L2Entry {
        L2Entry(host.0 & L1_L2_OFFSET_MASK | OFLAG_COPIED)
    }

    /// Reads as zeros, keeping the cluster `host` that this image alone references (a
    /// preallocated zero cluster; standard entries).
    pub fn owned_zero(host: HostOffset) -> L2Entry {
        L2Entry(host.0 & L1_L2_OFFSET_MASK | OFLAG_COPIED | OFLAG_ZERO)
    }

    /// The cluster this image alone owns and may write in place: not compressed, COPIED set
    /// (refcount 1), and an offset. Offset 0 counts only with an external data file
    /// (`external_data`), where it is a valid position; in the image file it is unallocated.
    pub fn owned_host(self, external_data: bool) -> Option<HostOffset> {
        let host = self.host_offset();
        let owned = !self.is_compressed() && self.copied() && (host.0 != 0 || external_data);
        owned.then_some(host)
    }

    /// Whether the cluster has no data of its own in the image: unallocated, or the zero flag
    /// without a host cluster.
    pub fn has_no_data(self) -> bool {
        self == L2Entry::UNALLOCATED || self == L2Entry::ZERO
    }

    /// Whether this entry describes a compressed cluster (see [`CompressedDescriptor`]).
    pub fn is_compressed(self) -> bool {
        self.0 & OFLAG_COMPRESSED != 0
    }

    /// Whether the cluster's refcount is exactly 1 (only meaningful in active L2 tables).
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    /// Whether the standard cluster reads as zeros (bit 0; version 3 without extended L2).
    /// Always false for compressed entries, where bit 0 belongs to the host offset.
    pub fn is_zero(self) -> bool {
        !self.is_compressed() && self.0 & OFLAG_ZERO != 0
    }

    /// Host offset of a standard cluster (0 if unallocated). Meaningless for compressed
    /// entries; use [`CompressedDescriptor::from_entry`] for those.
    pub fn host_offset(self) -> HostOffset {
        HostOffset(self.0 & L1_L2_OFFSET_MASK)
    }

    /// The reserved bits of a standard entry that are set (should be 0). Not applicable to
    /// compressed entries.
    pub fn reserved_bits(self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.0 & L2_RESERVED_MASK
        }
    }

    /// Whether this is the common case: a standard entry with no flag but COPIED and no
    /// reserved bit (data at [`host_offset`](Self::host_offset), or unallocated when that is 0).
    pub fn is_plain(self) -> bool {
        self.0 & (OFLAG_COMPRESSED | L2_RESERVED_MASK | OFLAG_ZERO) == 0
    }

    /// The compressed cluster this entry describes (its COPIED flag, which a compressed entry
    /// must not have, ignored); `None` when it is not representable.
    pub fn compressed(self, cluster_bits: u32) -> Option<CompressedDescriptor> {
        CompressedDescriptor::from_entry(self.0 & !OFLAG_COPIED, cluster_bits)
    }

    /// The same entry with COPIED set or cleared.
    #[must_use]
    pub fn with_copied(self, copied: bool) -> L2Entry {
        if copied {
            L2Entry(self.0 | OFLAG_COPIED)
        } else {
            L2Entry(self.0 & !OFLAG_COPIED)
        }
    }
}

/// An extended L2 entry (incompatible feature bit 4): a standard entry plus a subcluster bitmap.
///
/// The bitmap's low 32 bits say which of the 32 subclusters are allocated; the high 32 bits say
/// which read as zeros. For compressed clusters the bitmap is reserved and must be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ExtendedL2Entry {
    /// First word: same layout as a standard L2 entry, except that bit 0 is reserved.
    pub entry: u64,
    /// Second word: subcluster allocation (bits 0–31) and zero (bits 32–63) bitmaps.
    pub bitmap: u64,
}

impl ExtendedL2Entry {
    /// Subclusters per cluster with extended L2 entries.
    pub const SUBCLUSTERS: u32 = 32;

    /// The first word as an [`L2Entry`].
    pub fn l2(self) -> L2Entry {
        L2Entry(self.entry)
    }

    /// Allocation bits, one per subcluster (bit x = subcluster x).
    pub fn alloc_bits(self) -> u32 {
        self.bitmap as u32
    }

    /// Reads-as-zero bits, one per subcluster (bit x = subcluster x).
    pub fn zero_bits(self) -> u32 {
        (self.bitmap >> 32) as u32
    }

    /// Whether subcluster `index` (0..32) is allocated; false for indices out of range.
    pub fn is_subcluster_allocated(self, index: u32) -> bool {
        index < Self::SUBCLUSTERS && self.alloc_bits() & (1 << index) != 0
    }

    /// Whether subcluster `index` (0..32) reads as zeros; false for indices out of range.
    pub fn is_subcluster_zero(self, index: u32) -> bool {
        index < Self::SUBCLUSTERS && self.zero_bits() & (1 << index) != 0
    }

    /// Subclusters marked both allocated and zero, which the spec forbids.
    pub fn conflicting_bits(self) -> u32 {
        self.alloc_bits() & self.zero_bits()
    }

    /// Reserved bits set in the first word (bit 0 is reserved here, unlike standard entries).
    pub fn reserved_bits(self) -> u64 {
        if self.l2().is_compressed() {
            0
        } else {
            self.entry & (L2_RESERVED_MASK | OFLAG_ZERO)
        }
    }
}

/// The decoded descriptor of a compressed cluster.
///
/// With `x = 62 - (cluster_bits - 8)`, bits `0..x` hold the (unaligned) host offset of the
/// compressed data and bits `x..62` hold the number of additional 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    /// Host offset of the first byte of compressed data (usually unaligned).
    pub host_offset: HostOffset,
    /// Number of 512-byte sectors the data touches, counting the sector holding `host_offset`.
    pub nb_sectors: u64,
}

impl CompressedDescriptor {
    /// Decodes a compressed L2 entry; `None` if `cluster_bits` is outside 9..=21 (the shift
    /// would be meaningless). Does not check bit 62; callers test [`L2Entry::is_compressed`].
    pub fn from_entry(entry: u64, cluster_bits: u32) -> Option<Self> {
        if !(9..=21).contains(&cluster_bits) {
            return None;
        }
        let size_bits = cluster_bits - 8;
        let x = 62 - size_bits;
        let offset_mask = (1u64 << x) - 1;
        let size_mask = (1u64 << size_bits) - 1;
        Some(CompressedDescriptor {
            host_offset: HostOffset(entry & offset_mask),
            nb_sectors: ((entry >> x) & size_mask) + 1,
        })
    }

    /// Encodes back into an L2 entry (with bit 62 set); `None` if a field does not fit.
    pub fn to_entry(self, cluster_bits: u32) -> Option<u64> {
        if !(9..=21).contains(&cluster_bits) {
            return None;
        }
        let size_bits = cluster_bits - 8;
        let x = 62 - size_bits;
        let extra = self.nb_sectors.checked_sub(1)?;
        if self.host_offset.0 >> x != 0 || extra >> size_bits != 0 {
            return None;
        }
        Some(OFLAG_COMPRESSED | (extra << x) | self.host_offset.0)
    }

    /// The bytes that may hold compressed data, as QEMU reads them:
    /// `[host_offset, host_offset + nb_sectors * 512 - host_offset % 512)`.
    pub fn data_range(self) -> Option<(u64, u64)> {
        let len = self
            .nb_sectors
            .checked_mul(COMPRESSED_SECTOR_SIZE)?
            .checked_sub(self.host_offset.0 % COMPRESSED_SECTOR_SIZE)?;
        let end = self.host_offset.0.checked_add(len)?;
        Some((self.host_offset.0, end))
    }

    /// The whole sectors touched: `[host_offset rounded down to 512, + nb_sectors * 512)`.
    /// This is the range whose clusters QEMU refcounts for a compressed cluster.
    pub fn sector_range(self) -> Option<(u64, u64)> {
        let start = self.host_offset.0 & !(COMPRESSED_SECTOR_SIZE - 1);
        let end = start.checked_add(self.nb_sectors.checked_mul(COMPRESSED_SECTOR_SIZE)?)?;
        Some((start, end))
    }

    /// Whether the host offset uses bits 56 and above, which the spec requires to be zero
    /// (possible only with cluster_bits below 14, where the offset field is wider).
    pub fn offset_exceeds_56_bits(self) -> bool {
        self.host_offset.0 >> 56 != 0
    }
}

/// Decodes a big-endian table of `u64` (L1, L2, refcount or bitmap table). A trailing partial
/// entry is ignored.
pub fn read_u64_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes a table of `u64` as big-endian bytes.
pub fn write_u64_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Decodes an L2 table of extended (16-byte) entries. A trailing partial entry is ignored.
pub fn read_extended_l2_table(bytes: &[u8]) -> Vec<ExtendedL2Entry> {
    read_u64_table(bytes)
        .chunks_exact(2)
        .map(|w| ExtendedL2Entry {
            entry: w[0],
            bitmap: w[1],
        })
        .collect()
}

/// Encodes extended L2 entries as big-endian bytes.
pub fn write_extended_l2_table(entries: &[ExtendedL2Entry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&e.entry.to_be_bytes());
            b[8..].copy_from_slice(&e.bitmap.to_be_bytes());
            b
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_entry_fields() {
        let e = L1Entry(OFLAG_COPIED | 0x0000_0000_0005_0000);
        assert!(e.copied());
        assert!(e.is_allocated());
        assert_eq!(e.l2_offset(), HostOffset(0x50000));
        assert_eq!(e.reserved_bits(), 0);
        let bad = L1Entry(0x0100_0000_0005_0001);
        assert_eq!(bad.reserved_bits(), 0x0100_0000_0000_0001);
        assert_eq!(bad.l2_offset(), HostOffset(0x50000));
        // Rewritten entries lose their reserved bits and keep offset and COPIED.
        let damaged = L1Entry(0xff00_0000_000e_7200);
        assert_eq!(damaged.without_reserved(), L1Entry(OFLAG_COPIED | 0xe7200));
        assert!(!L1Entry(0).is_allocated());
        let owned = L1Entry::owned_table(HostOffset(0x50000));
        assert!(owned.owns_table() && owned.with_copied(false) == L1Entry(0x50000));
        assert!(!L1Entry::UNALLOCATED.with_copied(true).owns_table());
    }

    #[test]
    fn l2_entry_constructors_and_ownership() {
        let host = HostOffset(0x7_0000);
        assert_eq!(L2Entry::owned(host).owned_host(false), Some(host));
        assert!(L2Entry::owned_zero(host).is_zero());
        assert_eq!(L2Entry::owned_zero(host).host_offset(), host);
        // Shared (COPIED clear), compressed and unallocated clusters are not owned.
        assert_eq!(L2Entry(host.0).owned_host(false), None);
        assert_eq!(
            L2Entry(OFLAG_COMPRESSED | OFLAG_COPIED | 0x200).owned_host(false),
            None
        );
        assert_eq!(L2Entry(OFLAG_COPIED).owned_host(false), None);
        // Offset 0 is a valid position in an external data file.
        assert_eq!(L2Entry(OFLAG_COPIED).owned_host(true), Some(HostOffset(0)));
        assert!(L2Entry::UNALLOCATED.has_no_data() && L2Entry::ZERO.has_no_data());
        assert!(!L2Entry::owned_zero(host).has_no_data());
    }

    #[test]
    fn l2_entry_fields() {
        let e = L2Entry(OFLAG_COPIED | 0x7_0000 | OFLAG_ZERO);
        assert!(e.copied() && e.is_zero() && !e.is_compressed());
        assert_eq!(e.host_offset(), HostOffset(0x70000));
        assert_eq!(e.reserved_bits(), 0);
        assert_eq!(L2Entry(0x4000_0000_0000_0002).reserved_bits(), 0);
        assert_eq!(
            L2Entry(0x0100_0000_0000_0002).reserved_bits(),
            0x0100_0000_0000_0002
        );
        // Bit 0 of a compressed entry is part of the offset, not the zero flag.
        assert!(!L2Entry(OFLAG_COMPRESSED | 1).is_zero());
    }

    #[test]
    fn extended_entry_bitmaps() {
        let e = ExtendedL2Entry {
            entry: 0x9_0000 | OFLAG_COPIED,
            bitmap: (0b100u64 << 32) | 0b011,
        };
        assert!(e.is_subcluster_allocated(0) && e.is_subcluster_allocated(1));
        assert!(!e.is_subcluster_allocated(2) && e.is_subcluster_zero(2));
        assert!(!e.is_subcluster_zero(32) && !e.is_subcluster_allocated(99));
        assert_eq!(e.conflicting_bits(), 0);
        assert_eq!(e.reserved_bits(), 0);
        let bad = ExtendedL2Entry {
            entry: 0x9_0001,
            bitmap: (1 << 32) | 1,
        };
        assert_eq!(bad.reserved_bits(), 1);
        assert_eq!(bad.conflicting_bits(), 1);
    }

    #[test]
    fn compressed_descriptor_round_trip_all_cluster_sizes() {
        for bits in 9..=21u32 {
            let x = 62 - (bits - 8);
            let max_sectors = 1u64 << (bits - 8);
            for (off, sectors) in [(0x1234_5677u64, 1u64), (512, max_sectors), (1 << 40, 2)] {
                let d = CompressedDescriptor {
                    host_offset: HostOffset(off),
                    nb_sectors: sectors,
                };
                let e = d.to_entry(bits).unwrap();
                assert_eq!(e >> x & (max_sectors - 1), sectors - 1);
                assert!(L2Entry(e).is_compressed());
                assert_eq!(CompressedDescriptor::from_entry(e, bits), Some(d));
            }
            let too_many = CompressedDescriptor {
                host_offset: HostOffset(0),
                nb_sectors: max_sectors + 1,
            };
            assert_eq!(too_many.to_entry(bits), None);
        }
        assert_eq!(CompressedDescriptor::from_entry(0, 8), None);
    }

    #[test]
    fn compressed_ranges() {
        // 64 KiB clusters: x = 54.
        let e = OFLAG_COMPRESSED | (2u64 << 54) | 0x10_0300;
        let d = CompressedDescriptor::from_entry(e, 16).unwrap();
        assert_eq!(d.host_offset, HostOffset(0x10_0300));
        assert_eq!(d.nb_sectors, 3);
        assert_eq!(
            d.data_range(),
            Some((0x10_0300, 0x10_0300 + 3 * 512 - 0x100))
        );
        assert_eq!(d.sector_range(), Some((0x10_0200, 0x10_0200 + 3 * 512)));
        assert!(!d.offset_exceeds_56_bits());
        let wide = CompressedDescriptor::from_entry(OFLAG_COMPRESSED | (1 << 57), 9).unwrap();
        assert!(wide.offset_exceeds_56_bits());
    }

    #[test]
    fn table_codecs() {
        let t = [1u64, 0xdead_beef_0000_0000, u64::MAX];
        let b = write_u64_table(&t);
        assert_eq!(b.len(), 24);
        assert_eq!(&b[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(read_u64_table(&b), t);
        assert_eq!(read_u64_table(&b[..23]), &t[..2]);
        let x = [ExtendedL2Entry {
            entry: 5,
            bitmap: 6,
        }];
        assert_eq!(read_extended_l2_table(&write_extended_l2_table(&x)), x);
    }
}
