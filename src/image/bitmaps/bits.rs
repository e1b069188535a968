//! The bits of a persistent bitmap, with no I/O: which bits and data clusters a guest range
//! covers, setting and clearing them in a cluster's bytes, and reading runs of set bits back.
//!
//! Layout (qcow2 spec, "Bitmaps"): bit `n` covers guest bytes `[n·g, (n+1)·g)` for granularity
//! `g`; bits are stored least significant first within a byte, bytes in order, and one data
//! cluster holds `8 · cluster_size` consecutive bits. The last bit may cover a partial
//! granule; bits past the disk's last granule are zero.

use std::ops::Range;

/// The shape of one bitmap over one disk: its granularity, the image's cluster size, and the
/// disk size the bitmap covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// log2 of the guest bytes per bit.
    pub granularity_bits: u32,
    /// Bytes per data cluster.
    pub cluster_size: u64,
    /// Guest bytes covered.
    pub disk_size: u64,
}

impl Shape {
    /// Guest bytes per bit.
    pub fn granularity(self) -> u64 {
        1 << self.granularity_bits
    }

    /// Bits of the whole bitmap.
    pub fn bits(self) -> u64 {
        self.disk_size.div_ceil(self.granularity())
    }

    /// Bits held by one data cluster.
    pub fn bits_per_cluster(self) -> u64 {
        self.cluster_size * 8
    }

    /// Entries of the bitmap table: exactly the clusters the bits need.
    pub fn table_size(self) -> u64 {
        self.bits().div_ceil(8).div_ceil(self.cluster_size)
    }

    /// The bits that cover guest bytes `[offset, offset + len)`, clamped to the disk.
    pub fn bit_range(self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.disk_size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        let g = self.granularity_bits;
        (offset >> g)..end.div_ceil(self.granularity())
    }

    /// The guest bytes bit range `bits` covers, the last granule cut at the disk's end.
    pub fn guest_range(self, bits: Range<u64>) -> Range<u64> {
        let g = self.granularity_bits;
        let start = (bits.start << g).min(self.disk_size);
        let end = (bits.end << g).min(self.disk_size);
        start..end
    }
}

/// Sets bits `[from, to)` of `bytes` (bit indices within the buffer).
pub(crate) fn set_bits(bytes: &mut [u8], from: u64, to: u64) {
    apply(bytes, from, to, |b, mask| *b |= mask);
}

/// Clears bits `[from, to)` of `bytes`.
pub(crate) fn clear_bits(bytes: &mut [u8], from: u64, to: u64) {
    apply(bytes, from, to, |b, mask| *b &= !mask);
}

fn apply(bytes: &mut [u8], from: u64, to: u64, op: impl Fn(&mut u8, u8)) {
    let to = to.min(bytes.len() as u64 * 8);
    let mut bit = from;
    while bit < to {
        let byte = (bit / 8) as usize;
        let first = (bit % 8) as u32;
        if first == 0 && to - bit >= 8 {
            // Whole bytes at a time.
            let whole = ((to - bit) / 8) as usize;
            for b in &mut bytes[byte..byte + whole] {
                op(b, 0xff);
            }
            bit += whole as u64 * 8;
            continue;
        }
        let last = (to - bit).min(8 - u64::from(first)) as u32;
        let mask = (((1u16 << last) - 1) << first) as u8;
        op(&mut bytes[byte], mask);
        bit += u64::from(last);
    }
}

/// Calls `f` with each maximal run `[start, end)` of set bits of `bytes` inside `[from, to)`.
pub(crate) fn for_each_run(bytes: &[u8], from: u64, to: u64, mut f: impl FnMut(u64, u64)) {
    let to = to.min(bytes.len() as u64 * 8);
    let mut run: Option<u64> = None;
    let mut bit = from;
    while bit < to {
        let byte = bytes[(bit / 8) as usize];
        // Whole bytes of one kind are skipped at once.
        if bit % 8 == 0 && to - bit >= 8 && (byte == 0 || byte == 0xff) {
            match (byte, run) {
                (0, Some(start)) => {
                    f(start, bit);
                    run = None;
                }
                (0xff, None) => run = Some(bit),
                _ => {}
            }
            bit += 8;
            continue;
        }
        let set = byte >> (bit % 8) & 1 == 1;
        match (set, run) {
            (true, None) => run = Some(bit),
            (false, Some(start)) => {
                f(start, bit);
                run = None;
            }
            _ => {}
        }
        bit += 1;
    }
    if let Some(start) = run {
        f(start, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(bytes: &[u8], from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for_each_run(bytes, from, to, |a, b| out.push((a, b)));
        out
    }

    #[test]
    fn set_and_read_back_every_small_range() {
        for from in 0..40 {
            for to in from..40 {
                let mut b = [0u8; 5];
                set_bits(&mut b, from, to);
                let expect = if from < to { vec![(from, to)] } else { vec![] };
                assert_eq!(runs(&b, 0, 40), expect, "{from}..{to}");
                for bit in 0..40 {
                    let set = b[bit as usize / 8] >> (bit % 8) & 1 == 1;
                    assert_eq!(set, (from..to).contains(&bit), "bit {bit} of {from}..{to}");
                }
                clear_bits(&mut b, from, to);
                assert_eq!(b, [0u8; 5]);
            }
        }
    }

    #[test]
    fn runs_are_cut_at_the_window_and_merged_across_bytes() {
        let mut b = [0u8; 4];
        set_bits(&mut b, 3, 20);
        set_bits(&mut b, 24, 32);
        assert_eq!(runs(&b, 0, 32), vec![(3, 20), (24, 32)]);
        assert_eq!(runs(&b, 5, 26), vec![(5, 20), (24, 26)]);
        assert_eq!(runs(&b, 0, 1000), vec![(3, 20), (24, 32)]);
    }

    #[test]
    fn lsb_first_within_a_byte() {
        let mut b = [0u8; 2];
        set_bits(&mut b, 0, 1);
        set_bits(&mut b, 9, 10);
        assert_eq!(b, [0x01, 0x02]);
    }

    #[test]
    fn shape_covers_partial_last_granule() {
        let s = Shape {
            granularity_bits: 16,
            cluster_size: 512,
            disk_size: (1 << 20) + 1,
        };
        assert_eq!(s.bits(), 17);
        assert_eq!(s.table_size(), 1);
        assert_eq!(s.bit_range(0, 1), 0..1);
        assert_eq!(s.bit_range(65535, 2), 0..2);
        assert_eq!(s.bit_range(1 << 20, 100), 16..17);
        assert_eq!(s.bit_range(2 << 20, 100), 0..0);
        assert_eq!(s.guest_range(16..17), (1 << 20)..(1 << 20) + 1);
        // 4096 bits per 512-byte cluster: 2^12 bits of 2^9 bytes = 2 MiB per cluster.
        let small = Shape {
            granularity_bits: 9,
            cluster_size: 512,
            disk_size: 64 << 20,
        };
        assert_eq!(small.table_size(), 32);
    }
}
