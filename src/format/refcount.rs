//! Refcount block entries of every width, and refcount table entries.
//!
//! A refcount block is one cluster of `2^refcount_order`-bit entries (order 0..=6, 1 to 64
//! bits). Sub-byte widths are packed starting from the least significant bit of each byte;
//! widths of 8 bits and more are big-endian integers.

use super::error::FormatError;
use super::offsets::HostOffset;

/// Offset bits of a refcount table entry (bits 9–63, cluster-aligned refcount block offset).
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry (bits 0–8).
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// Largest valid refcount order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// A refcount table entry: points at one refcount block, 0 if not allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReftableEntry(pub u64);

impl ReftableEntry {
    /// Host offset of the refcount block (0: not allocated, all its refcounts are 0).
    pub fn block_offset(self) -> HostOffset {
        HostOffset(self.0 & REFTABLE_OFFSET_MASK)
    }

    /// Whether a refcount block is allocated.
    pub fn is_allocated(self) -> bool {
        self.block_offset().0 != 0
    }

    /// The reserved bits that are set (should be 0; QEMU treats them as corruption).
    pub fn reserved_bits(self) -> u64 {
        self.0 & REFTABLE_RESERVED_MASK
    }
}

/// The largest refcount an entry of `2^order` bits can hold; `None` for order > 6.
pub fn max_refcount(order: u32) -> Option<u64> {
    match order {
        0..=5 => Some((1u64 << (1u32 << order)) - 1),
        6 => Some(u64::MAX),
        _ => None,
    }
}

/// Refcount entries in a block of `block_len` bytes at `order`.
pub fn entries_per_block(block_len: usize, order: u32) -> Option<usize> {
    if order > MAX_REFCOUNT_ORDER {
        return None;
    }
    block_len.checked_mul(8).map(|bits| bits >> order)
}

/// Checks the order and index and returns the entry width in bits.
fn check(block_len: usize, index: usize, order: u32) -> Result<u32, FormatError> {
    let entries =
        entries_per_block(block_len, order).ok_or(FormatError::RefcountOrderTooLarge(order))?;
    let bits = 1u32 << order;
    if index >= entries {
        return Err(FormatError::RefcountIndexOutOfRange {
            index,
            entries,
            bits,
        });
    }
    Ok(bits)
}

/// Reads refcount entry `index` of `block` at width `2^order` bits.
pub fn refcount_get(block: &[u8], index: usize, order: u32) -> Result<u64, FormatError> {
    let bits = check(block.len(), index, order)?;
    if bits < 8 {
        // Sub-byte: entry i lives in byte i / per_byte, at bit (i % per_byte) * bits.
        let per_byte = (8 / bits) as usize;
        let byte = block.get(index / per_byte).copied().unwrap_or(0);
        let shift = (index % per_byte) as u32 * bits;
        let mask = (1u8 << bits) - 1;
        return Ok(u64::from((byte >> shift) & mask));
    }
    let width = (bits / 8) as usize;
    let start = index * width;
    let bytes = block.get(start..start + width).unwrap_or_default();
    Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Writes `value` into refcount entry `index` of `block` at width `2^order` bits, leaving
/// neighbouring entries untouched. Fails if the value does not fit the width.
pub fn refcount_set(
    block: &mut [u8],
    index: usize,
    order: u32,
    value: u64,
) -> Result<(), FormatError> {
    let bits = check(block.len(), index, order)?;
    if max_refcount(order).is_some_and(|max| value > max) {
        return Err(FormatError::RefcountTooLarge { value, bits });
    }
    if bits < 8 {
        let per_byte = (8 / bits) as usize;
        let shift = (index % per_byte) as u32 * bits;
        let mask = ((1u8 << bits) - 1) << shift;
        if let Some(byte) = block.get_mut(index / per_byte) {
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        return Ok(());
    }
    let width = (bits / 8) as usize;
    let start = index * width;
    if let Some(dst) = block.get_mut(start..start + width) {
        dst.copy_from_slice(&value.to_be_bytes()[8 - width..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_refcounts() {
        assert_eq!(max_refcount(0), Some(1));
        assert_eq!(max_refcount(1), Some(3));
        assert_eq!(max_refcount(2), Some(15));
        assert_eq!(max_refcount(3), Some(255));
        assert_eq!(max_refcount(4), Some(65535));
        assert_eq!(max_refcount(5), Some(u32::MAX as u64));
        assert_eq!(max_refcount(6), Some(u64::MAX));
        assert_eq!(max_refcount(7), None);
    }

    #[test]
    fn sub_byte_packing_from_lsb() {
        let mut b = [0u8; 2];
        refcount_set(&mut b, 0, 0, 1).unwrap();
        refcount_set(&mut b, 9, 0, 1).unwrap();
        assert_eq!(b, [0b0000_0001, 0b0000_0010]);
        let mut b = [0u8; 1];
        refcount_set(&mut b, 1, 1, 3).unwrap();
        refcount_set(&mut b, 3, 1, 1).unwrap();
        assert_eq!(b, [0b0100_1100]);
        assert_eq!(refcount_get(&b, 1, 1).unwrap(), 3);
        assert_eq!(refcount_get(&b, 0, 1).unwrap(), 0);
        let mut b = [0u8; 1];
        refcount_set(&mut b, 1, 2, 0xa).unwrap();
        refcount_set(&mut b, 0, 2, 0x5).unwrap();
        assert_eq!(b, [0xa5]);
    }

    #[test]
    fn wide_entries_are_big_endian() {
        let mut b = [0u8; 16];
        refcount_set(&mut b, 1, 4, 0x0102).unwrap();
        assert_eq!(&b[2..4], &[1, 2]);
        refcount_set(&mut b, 1, 5, 0x0a0b_0c0d).unwrap();
        assert_eq!(&b[4..8], &[0xa, 0xb, 0xc, 0xd]);
        refcount_set(&mut b, 1, 6, u64::MAX - 1).unwrap();
        assert_eq!(refcount_get(&b, 1, 6).unwrap(), u64::MAX - 1);
        refcount_set(&mut b, 3, 3, 200).unwrap();
        assert_eq!(b[3], 200);
    }

    #[test]
    fn every_width_round_trips_without_disturbing_neighbours() {
        for order in 0..=6u32 {
            let max = max_refcount(order).unwrap();
            let mut block = vec![0u8; 64];
            let n = entries_per_block(block.len(), order).unwrap();
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                refcount_set(&mut block, i, order, v).unwrap();
            }
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(
                    refcount_get(&block, i, order).unwrap(),
                    v,
                    "order {order} index {i}"
                );
            }
            assert!(refcount_get(&block, n, order).is_err());
            if order < 6 {
                assert!(matches!(
                    refcount_set(&mut block, 0, order, max + 1),
                    Err(FormatError::RefcountTooLarge { .. })
                ));
            }
        }
        assert!(refcount_get(&[0u8; 8], 0, 7).is_err());
    }

    #[test]
    fn reftable_entries() {
        let e = ReftableEntry(0x0000_0001_0002_0000 | 0x3);
        assert_eq!(e.block_offset(), HostOffset(0x1_0002_0000));
        assert_eq!(e.reserved_bits(), 3);
        assert!(e.is_allocated());
        assert!(!ReftableEntry(0x1ff).is_allocated());
        // Unlike L1/L2 entries, the refcount block offset may use bits 56-63.
        assert_eq!(ReftableEntry(1 << 60).block_offset(), HostOffset(1 << 60));
    }
}
