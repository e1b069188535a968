//! Bounds-checked big-endian field access on byte slices.
//!
//! Every qcow2 number is big-endian. These helpers return `None` instead of panicking when a
//! field would run past the end of the slice, so that parsers can turn a short buffer into a
//! [`FormatError::Truncated`](super::FormatError::Truncated) with a useful message.

/// Reads `N` bytes at `offset`, or `None` if they are not all inside `buf`.
pub(crate) fn array<const N: usize>(buf: &[u8], offset: usize) -> Option<[u8; N]> {
    let end = offset.checked_add(N)?;
    let bytes = buf.get(offset..end)?;
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    Some(out)
}

/// Reads a big-endian `u16` at `offset`.
pub(crate) fn u16_at(buf: &[u8], offset: usize) -> Option<u16> {
    array::<2>(buf, offset).map(u16::from_be_bytes)
}

/// Reads a big-endian `u32` at `offset`.
pub(crate) fn u32_at(buf: &[u8], offset: usize) -> Option<u32> {
    array::<4>(buf, offset).map(u32::from_be_bytes)
}

/// Reads a big-endian `u64` at `offset`.
pub(crate) fn u64_at(buf: &[u8], offset: usize) -> Option<u64> {
    array::<8>(buf, offset).map(u64::from_be_bytes)
}

/// Rounds `n` up to the next multiple of 8 (qcow2 pads extensions and table entries to 8).
pub(crate) fn align8(n: u64) -> Option<u64> {
    n.checked_add(7).map(|v| v & !7)
}

/// Appends zero bytes to `out` until its length is a multiple of 8.
pub(crate) fn pad8(out: &mut Vec<u8>) {
    while out.len() % 8 != 0 {
        out.push(0);
    }
}

/// Converts on-disk string bytes (not NUL-terminated) to a `String`, replacing invalid UTF-8.
///
/// qcow2 strings (backing file names, snapshot names, bitmap names) are byte strings; QEMU
/// writes UTF-8 in practice. Lossy conversion keeps parsing total; a name with invalid UTF-8
/// does not round-trip byte for byte, which only matters for images not written by QEMU.
pub(crate) fn string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Converts a `u64` to `usize`, saturating (only used for slice bounds, which then fail cleanly).
pub(crate) fn usize_sat(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_bounds_and_refuses_out_of_bounds() {
        let buf = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&buf, 0), Some(0x0102));
        assert_eq!(u32_at(&buf, 5), Some(0x0607_0809));
        assert_eq!(u32_at(&buf, 6), None);
        assert_eq!(u64_at(&buf, 1), Some(0x0203_0405_0607_0809));
        assert_eq!(u64_at(&buf, usize::MAX), None);
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align8(0), Some(0));
        assert_eq!(align8(1), Some(8));
        assert_eq!(align8(16), Some(16));
        assert_eq!(align8(u64::MAX), None);
        let mut v = vec![1, 2, 3];
        pad8(&mut v);
        assert_eq!(v, vec![1, 2, 3, 0, 0, 0, 0, 0]);
    }
}
