//! The kinds of qcow2 metadata that the overlap checks protect.

use bitflags::bitflags;

bitflags! {
    /// One bit per kind of qcow2 metadata.
    ///
    /// Bits 0–8 are QEMU's `QCow2MetadataOverlap` bits with the same meaning; bits 9 and 10 are
    /// ours (QEMU protects neither the encryption header nor bitmap tables).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
    pub struct MetadataType: u16 {
        /// The image header: cluster 0.
        const MAIN_HEADER = 0x001;
        /// The active L1 table.
        const ACTIVE_L1 = 0x002;
        /// L2 tables referenced by the active L1 table.
        const ACTIVE_L2 = 0x004;
        /// The refcount table.
        const REFCOUNT_TABLE = 0x008;
        /// Refcount blocks referenced by the refcount table.
        const REFCOUNT_BLOCK = 0x010;
        /// The snapshot table.
        const SNAPSHOT_TABLE = 0x020;
        /// L1 tables of internal snapshots.
        const INACTIVE_L1 = 0x040;
        /// L2 tables referenced by snapshot L1 tables.
        const INACTIVE_L2 = 0x080;
        /// The persistent bitmap directory.
        const BITMAP_DIRECTORY = 0x100;
        /// The full-disk encryption (LUKS) header area.
        const CRYPTO_HEADER = 0x200;
        /// Bitmap tables of persistent dirty bitmaps.
        const BITMAP_TABLE = 0x400;
    }
}

impl MetadataType {
    /// Template `none`: no checks.
    pub const TEMPLATE_NONE: Self = Self::empty();
    /// Template `constant`: the checks QEMU can do in constant time.
    pub const TEMPLATE_CONSTANT: Self = Self::MAIN_HEADER
        .union(Self::ACTIVE_L1)
        .union(Self::REFCOUNT_TABLE)
        .union(Self::SNAPSHOT_TABLE)
        .union(Self::BITMAP_DIRECTORY)
        .union(Self::CRYPTO_HEADER);
    /// Template `cached`: `constant` plus everything QEMU keeps in memory.
    pub const TEMPLATE_CACHED: Self = Self::TEMPLATE_CONSTANT
        .union(Self::ACTIVE_L2)
        .union(Self::REFCOUNT_BLOCK)
        .union(Self::INACTIVE_L1)
        .union(Self::BITMAP_TABLE);
    /// Template `all`: every check, including inactive L2 tables.
    pub const TEMPLATE_ALL: Self = Self::all();

    /// Whether clusters holding `self` may also hold `other` in a valid image.
    ///
    /// Every metadata structure is its own allocation, so no cluster holds two kinds of
    /// metadata, with one exception: an L2 table that the active L1 table and a snapshot's L1
    /// table both reference (after a snapshot, until the first write copies it) is ACTIVE_L2
    /// and INACTIVE_L2 at once. Snapshots may also share L2 tables with each other, and an L2
    /// table may be referenced twice — those are the same type again, and a refcount question
    /// rather than a layout one. Partial-cluster structures (the snapshot table, the bitmap
    /// directory, the encryption header) are still allocated in whole clusters of their own.
    pub fn may_share(self, other: MetadataType) -> bool {
        let union = self | other;
        self.is_empty()
            || other.is_empty()
            || union.bits().count_ones() == 1
            || union == Self::ACTIVE_L2 | Self::INACTIVE_L2
    }

    /// QEMU's name for the lowest set bit as used in overlap error messages
    /// (`Preventing invalid write on metadata (overlaps with <name>)`), or `None` if empty.
    pub fn message_name(self) -> Option<&'static str> {
        let lowest = self.bits() & self.bits().wrapping_neg();
        Some(match Self::from_bits_truncate(lowest) {
            Self::MAIN_HEADER => "qcow2_header",
            Self::ACTIVE_L1 => "active L1 table",
            Self::ACTIVE_L2 => "active L2 table",
            Self::REFCOUNT_TABLE => "refcount table",
            Self::REFCOUNT_BLOCK => "refcount block",
            Self::SNAPSHOT_TABLE => "snapshot table",
            Self::INACTIVE_L1 => "inactive L1 table",
            Self::INACTIVE_L2 => "inactive L2 table",
            Self::BITMAP_DIRECTORY => "bitmap directory",
            Self::CRYPTO_HEADER => "encryption header",
            Self::BITMAP_TABLE => "bitmap table",
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_cumulative() {
        assert!(MetadataType::TEMPLATE_CACHED.contains(MetadataType::TEMPLATE_CONSTANT));
        assert!(MetadataType::TEMPLATE_ALL.contains(MetadataType::TEMPLATE_CACHED));
        assert_eq!(
            MetadataType::TEMPLATE_ALL - MetadataType::TEMPLATE_CACHED,
            MetadataType::INACTIVE_L2
        );
        assert_eq!(MetadataType::TEMPLATE_ALL.bits(), 0x7ff);
    }

    #[test]
    fn message_name_is_lowest_bit() {
        let t = MetadataType::ACTIVE_L2 | MetadataType::INACTIVE_L2;
        assert_eq!(t.message_name(), Some("active L2 table"));
        assert_eq!(MetadataType::empty().message_name(), None);
        assert_eq!(
            MetadataType::CRYPTO_HEADER.message_name(),
            Some("encryption header")
        );
    }
}
