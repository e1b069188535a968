//! Persistent dirty bitmaps: the bitmap directory and bitmap table entries.
//!
//! The directory (located by the bitmaps header extension) is a run of variable-length entries,
//! each 8-aligned: a 24-byte fixed part, extra data, the name, zero padding. Each entry points
//! at a bitmap table: `table_size` u64 entries, each naming one cluster of bitmap data.

use super::be;
use super::error::{fit, FormatError};
use super::extension::MAX_BITMAP_DIRECTORY_SIZE;
use super::limits::MAX_TABLE_END;
use super::offsets::HostOffset;

/// Entry flag bit 0: the bitmap was not saved cleanly; its data may be stale.
pub const BITMAP_FLAG_IN_USE: u32 = 1 << 0;
/// Entry flag bit 1: the bitmap tracks every write (enabled).
pub const BITMAP_FLAG_AUTO: u32 = 1 << 1;
/// Entry flag bit 2 (spec): unknown extra data may be ignored. QEMU treats it as reserved.
pub const BITMAP_FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags QEMU refuses (everything but in_use and auto).
pub const BITMAP_RESERVED_FLAGS: u32 = !(BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// Size of the fixed part of a directory entry.
pub const DIR_ENTRY_HEADER_SIZE: u64 = 24;
/// QEMU's limit on bitmap table entries.
pub const MAX_BITMAP_TABLE_SIZE: u32 = 0x0800_0000;
/// QEMU's limit on bitmap data bytes (`table_size * cluster_size`).
pub const MAX_BITMAP_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest granularity_bits QEMU supports.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity_bits QEMU supports.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name QEMU supports.
pub const MAX_BITMAP_NAME: usize = 1023;
/// Offset bits of a bitmap table entry (bits 9–55).
pub const BITMAP_TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry (1–8 and 56–63).
pub const BITMAP_TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bit 0 of a bitmap table entry with offset 0: the cluster reads as all ones.
pub const BITMAP_TABLE_ALL_ONES: u64 = 1;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapDirectoryEntry {
    /// Cluster-aligned offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// `BITMAP_FLAG_*` bits.
    pub flags: u32,
    /// Bitmap type; 1 (dirty tracking) is the only one defined.
    pub bitmap_type: u8,
    /// log2 of the guest bytes per bitmap bit.
    pub granularity_bits: u8,
    /// Type-specific extra data (none is defined; QEMU refuses it).
    pub extra: Vec<u8>,
    /// The bitmap's name, unique in the directory, non-empty.
    pub name: String,
}

impl BitmapDirectoryEntry {
    /// The on-disk `name_size`.
    pub fn name_size(&self) -> u16 {
        u16::try_from(self.name.len()).unwrap_or(u16::MAX)
    }

    /// The on-disk `extra_data_size`.
    pub fn extra_data_size(&self) -> u32 {
        u32::try_from(self.extra.len()).unwrap_or(u32::MAX)
    }

    /// Whether the in_use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & BITMAP_FLAG_IN_USE != 0
    }

    /// Whether the auto flag is set.
    pub fn auto(&self) -> bool {
        self.flags & BITMAP_FLAG_AUTO != 0
    }

    /// Bytes of the bitmap table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * 8
    }

    /// Size of the entry in the directory, padding included.
    pub fn entry_size(&self) -> u64 {
        let raw = DIR_ENTRY_HEADER_SIZE + self.extra.len() as u64 + self.name.len() as u64;
        raw.div_ceil(8) * 8
    }

    /// QEMU's `check_dir_entry` plus the spec's non-empty name rule, for an image with
    /// `cluster_size` clusters and a `disk_size`-byte virtual disk.
    pub fn validate(&self, cluster_size: u64, disk_size: u64) -> Result<(), FormatError> {
        let fail = |reason: String| {
            Err(FormatError::BitmapConstraints {
                name: self.name.clone(),
                reason,
            })
        };
        if self.name.is_empty() {
            return fail("name is empty".into());
        }
        if self.name.len() > MAX_BITMAP_NAME {
            return fail(format!(
                "name is {} bytes, at most 1023 allowed",
                self.name.len()
            ));
        }
        if self.bitmap_type != BITMAP_TYPE_DIRTY_TRACKING {
            return fail(format!(
                "type is {}, only 1 (dirty tracking) is defined",
                self.bitmap_type
            ));
        }
        if self.flags & BITMAP_RESERVED_FLAGS != 0 {
            return fail(format!(
                "reserved flags {:#x} are set",
                self.flags & BITMAP_RESERVED_FLAGS
            ));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return fail(format!(
                "granularity_bits is {}, must be between 9 and 31",
                self.granularity_bits
            ));
        }
        if self.table_size == 0 {
            return fail("bitmap table size is 0".into());
        }
        if self.table_size > MAX_BITMAP_TABLE_SIZE {
            return fail(format!(
                "bitmap table size {} exceeds 134217728",
                self.table_size
            ));
        }
        if self.table_offset == 0 || cluster_size == 0 || self.table_offset % cluster_size != 0 {
            return fail(format!(
                "bitmap table offset {:#x} is zero or not a multiple of the cluster size",
                self.table_offset
            ));
        }
        if self
            .table_offset
            .checked_add(self.table_bytes())
            .map_or(true, |end| end > MAX_TABLE_END)
        {
            return fail(format!(
                "bitmap table at {:#x} ends beyond 2^63 - 1",
                self.table_offset
            ));
        }
        let phys = u64::from(self.table_size).saturating_mul(cluster_size);
        if phys > MAX_BITMAP_PHYS_SIZE {
            return fail(format!("bitmap data of {phys} bytes exceeds 536870912"));
        }
        // phys <= 2^29, so phys * 8 << 31 fits in 64 bits.
        let covered = (phys * 8) << self.granularity_bits;
        if !self.in_use() && disk_size > covered {
            return fail(format!(
                "bitmap table covers {covered} bytes, less than the disk size {disk_size}"
            ));
        }
        // A consistent bitmap's table has exactly the clusters its data needs: QEMU refuses to
        // load it otherwise (`Could not read bitmap ...: Invalid argument`).
        let bits = disk_size.div_ceil(1u64 << self.granularity_bits);
        let needed = bits.div_ceil(8).div_ceil(cluster_size);
        if !self.in_use() && u64::from(self.table_size) != needed {
            return fail(format!(
                "bitmap table has {} entries, but the disk size {disk_size} needs exactly {needed}",
                self.table_size
            ));
        }
        Ok(())
    }

    /// Appends the entry with zero padding to 8 bytes to `out` (which must be 8-aligned).
    ///
    /// Refuses a name longer than 1023 bytes (QEMU's limit) and extra data that does not fit
    /// its field, instead of truncating lengths; `out` is unchanged on error.
    pub fn serialize_into(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        fit("bitmap name", self.name.len(), 1023)?;
        fit("bitmap extra data", self.extra.len(), u64::from(u32::MAX))?;
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.bitmap_type);
        out.push(self.granularity_bits);
        out.extend_from_slice(&self.name_size().to_be_bytes());
        out.extend_from_slice(&self.extra_data_size().to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        be::pad8(out);
        Ok(())
    }
}

/// Parses and validates a whole bitmap directory, as QEMU's `bitmap_list_load` does.
///
/// `dir` is the directory (`dir_size` bytes from `dir_offset`); it must hold exactly
/// `nb_bitmaps` entries that tile it with no gap or overhang. Each entry must pass
/// [`BitmapDirectoryEntry::validate`] and carry no extra data.
pub fn parse_bitmap_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<BitmapDirectoryEntry>, FormatError> {
    if dir.is_empty() {
        return Err(FormatError::BitmapDirectoryEmpty);
    }
    if dir.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(FormatError::BitmapDirectorySize(dir.len() as u64));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let Some(fixed) = dir.get(pos..pos + DIR_ENTRY_HEADER_SIZE as usize) else {
            return Err(FormatError::BrokenBitmapDirectory(format!(
                "entry at byte {pos} is cut off by the end of the directory"
            )));
        };
        if out.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(FormatError::MoreBitmapsThanHeader(nb_bitmaps));
        }
        let extra_len = be::u32_at(fixed, 20).unwrap_or(0) as usize;
        let name_len = usize::from(be::u16_at(fixed, 18).unwrap_or(0));
        let body = pos + DIR_ENTRY_HEADER_SIZE as usize;
        let raw_end = body.saturating_add(extra_len).saturating_add(name_len);
        let next = raw_end.saturating_add(7) & !7;
        if next > dir.len() {
            return Err(FormatError::BrokenBitmapDirectory(format!(
                "entry at byte {pos} ends at byte {next}, past the directory's {} bytes",
                dir.len()
            )));
        }
        let extra = dir.get(body..body + extra_len).unwrap_or_default();
        let name = be::string(dir.get(body + extra_len..raw_end).unwrap_or_default());
        if extra_len != 0 {
            return Err(FormatError::BitmapExtraData {
                name,
                size: extra_len as u32,
            });
        }
        let entry = BitmapDirectoryEntry {
            table_offset: be::u64_at(fixed, 0).unwrap_or(0),
            table_size: be::u32_at(fixed, 8).unwrap_or(0),
            flags: be::u32_at(fixed, 12).unwrap_or(0),
            bitmap_type: fixed.get(16).copied().unwrap_or(0),
            granularity_bits: fixed.get(17).copied().unwrap_or(0),
            extra: extra.to_vec(),
            name,
        };
        entry.validate(cluster_size, disk_size)?;
        out.push(entry);
        pos = next;
    }
    if (out.len() as u64) < u64::from(nb_bitmaps) {
        return Err(FormatError::FewerBitmapsThanHeader {
            found: out.len() as u32,
            expected: nb_bitmaps,
        });
    }
    Ok(out)
}

/// Serializes directory entries; the result's length is the `dir_size` to record.
pub fn serialize_bitmap_directory(
    entries: &[BitmapDirectoryEntry],
) -> Result<Vec<u8>, FormatError> {
    fit("bitmap directory entry count", entries.len(), 65535)?;
    let mut out = Vec::new();
    for e in entries {
        e.serialize_into(&mut out)?;
    }
    Ok(out)
}

/// A bitmap table entry: one cluster of bitmap data, or an all-zeros/all-ones marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// Host offset of the data cluster; 0 means not allocated (see [`Self::all_ones`]).
    pub fn offset(self) -> HostOffset {
        HostOffset(self.0 & BITMAP_TABLE_OFFSET_MASK)
    }

    /// For an unallocated entry: whether the cluster reads as all ones (else all zeros).
    pub fn all_ones(self) -> bool {
        self.offset().0 == 0 && self.0 & BITMAP_TABLE_ALL_ONES != 0
    }

    /// QEMU's `check_table_entry`: no reserved bits, bit 0 clear when an offset is present,
    /// offset cluster-aligned.
    pub fn check(self, cluster_size: u64) -> Result<(), FormatError> {
        let fail = |reason| {
            Err(FormatError::BitmapTableEntry {
                entry: self.0,
                reason,
            })
        };
        if self.0 & BITMAP_TABLE_RESERVED_MASK != 0 {
            return fail("reserved bits are set");
        }
        let offset = self.offset().0;
        if offset != 0 {
            if self.0 & BITMAP_TABLE_ALL_ONES != 0 {
                return fail("bit 0 is set although a data cluster is allocated");
            }
            if cluster_size == 0 || offset % cluster_size != 0 {
                return fail("offset is not a multiple of the cluster size");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testdata::{self, hex};

    const CS: u64 = 65536;
    const DISK: u64 = 16 << 20;

    fn bm(name: &str) -> BitmapDirectoryEntry {
        BitmapDirectoryEntry {
            table_offset: 0xc0000,
            table_size: 1,
            flags: BITMAP_FLAG_AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            extra: Vec::new(),
            name: name.into(),
        }
    }

    #[test]
    fn table_size_must_match_the_disk_exactly_unless_in_use() {
        // 16 MiB at 64 KiB granularity: 256 bits = 32 bytes: one cluster.
        assert!(bm("a").validate(CS, DISK).is_ok());
        let mut two = bm("a");
        two.table_size = 2;
        let err = two.validate(CS, DISK).unwrap_err().to_string();
        assert!(err.contains("needs exactly 1"), "{err}");
        assert!(
            bm("a").validate(CS, 0).is_err(),
            "an empty disk needs no table"
        );
        two.flags |= BITMAP_FLAG_IN_USE;
        assert!(
            two.validate(CS, DISK).is_ok(),
            "in-use bitmaps are not loaded"
        );
    }

    #[test]
    fn round_trip() {
        let all = vec![bm("a"), bm("a-longer-name-that-spans"), bm("12345678")];
        let bytes = serialize_bitmap_directory(&all).unwrap();
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(
            bytes.len() as u64,
            all.iter().map(|e| e.entry_size()).sum::<u64>()
        );
        assert_eq!(parse_bitmap_directory(&bytes, 3, CS, DISK).unwrap(), all);
    }

    #[test]
    fn count_and_tiling_errors() {
        let bytes = serialize_bitmap_directory(&[bm("a"), bm("b")]).unwrap();
        let e = parse_bitmap_directory(&bytes, 1, CS, DISK)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("More bitmaps found than specified in header extension"),
            "{e}"
        );
        let e = parse_bitmap_directory(&bytes, 3, CS, DISK)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Less bitmaps found than specified in header extension"),
            "{e}"
        );
        let e = parse_bitmap_directory(&bytes[..40], 2, CS, DISK)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Broken bitmap directory"), "{e}");
        let e = parse_bitmap_directory(&bytes[..28], 2, CS, DISK)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Broken bitmap directory"), "{e}");
        let e = parse_bitmap_directory(&[], 2, CS, DISK)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "Requested bitmap directory size is zero");
        let mut x = bm("x");
        x.extra = vec![1, 2];
        let bytes = serialize_bitmap_directory(&[x]).unwrap();
        let err = parse_bitmap_directory(&bytes, 1, CS, DISK).unwrap_err();
        assert!(err.is_unsupported());
        assert!(err
            .to_string()
            .starts_with("Bitmap extra data is not supported"));
    }

    #[test]
    fn constraint_errors() {
        let check = |f: &dyn Fn(&mut BitmapDirectoryEntry)| {
            let mut e = bm("b");
            f(&mut e);
            e.validate(CS, DISK).unwrap_err().to_string()
        };
        let prefix = "Bitmap 'b' doesn't satisfy the constraints";
        for msg in [
            check(&|e| e.table_size = 0),
            check(&|e| e.table_offset = 0),
            check(&|e| e.table_offset = 0xc0200),
            check(&|e| e.table_size = MAX_BITMAP_TABLE_SIZE + 1),
            check(&|e| e.table_size = 8193),
            check(&|e| e.granularity_bits = 8),
            check(&|e| e.granularity_bits = 32),
            check(&|e| e.flags = BITMAP_FLAG_EXTRA_DATA_COMPATIBLE),
            check(&|e| e.bitmap_type = 2),
            check(&|e| e.table_offset = 1 << 63),
        ] {
            assert!(msg.starts_with(prefix), "{msg}");
        }
        let mut e = bm("");
        assert!(e.validate(CS, DISK).is_err());
        e.name = "n".repeat(1024);
        assert!(e.validate(CS, DISK).is_err());
        // One cluster of bitmap at 512-byte granularity covers 256 MiB of disk.
        let mut e = bm("b");
        e.granularity_bits = 9;
        assert!(e.validate(CS, 256 << 20).is_ok());
        let msg = e.validate(CS, (256 << 20) + 1).unwrap_err().to_string();
        assert!(msg.starts_with(prefix), "{msg}");
        // A stale (in_use) bitmap may be too small for the disk.
        e.flags |= BITMAP_FLAG_IN_USE;
        assert!(e.validate(CS, 1 << 40).is_ok());
    }

    #[test]
    fn table_entries() {
        assert!(BitmapTableEntry(0).check(CS).is_ok());
        assert!(BitmapTableEntry(1).check(CS).is_ok());
        assert!(BitmapTableEntry(1).all_ones());
        assert!(BitmapTableEntry(0x20000).check(CS).is_ok());
        assert_eq!(BitmapTableEntry(0x20000).offset(), HostOffset(0x20000));
        assert!(BitmapTableEntry(0x20001).check(CS).is_err());
        assert!(!BitmapTableEntry(0x20001).all_ones());
        assert!(BitmapTableEntry(0x20200).check(CS).is_err());
        assert!(BitmapTableEntry(2).check(CS).is_err());
        assert!(BitmapTableEntry(1 << 56).check(CS).is_err());
    }

    #[test]
    fn real_directory_from_qemu_img() {
        let bytes = hex(testdata::SNAP_BITMAP_BITMAP_DIRECTORY);
        let entries = parse_bitmap_directory(&bytes, 2, CS, DISK).unwrap();
        assert_eq!(entries[0].name, "bm0");
        assert_eq!(entries[0].granularity_bits, 16);
        assert_eq!(entries[1].name, "other");
        assert_eq!(entries[1].granularity_bits, 17);
        assert!(entries
            .iter()
            .all(|e| e.auto() && !e.in_use() && e.table_size == 1));
        assert_eq!(serialize_bitmap_directory(&entries).unwrap(), bytes);
    }
}
