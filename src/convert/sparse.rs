//! Zero detection: which parts of a buffer of guest bytes are all zeros, judged granule by
//! granule at guest-aligned boundaries, so that a run of zeros is left out of the target only
//! where the target can leave it out whole.

/// Whether every byte of `buf` is zero. An OR over the bytes, which the compiler vectorises,
/// with an early exit every 4 KiB (data is usually non-zero in its first bytes).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// A run of a buffer: `len` bytes from `at` (an index into the buffer), all zeros or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub at: usize,
    pub len: usize,
    pub zero: bool,
}

/// The runs of `buf`, which holds the guest bytes from `start`: cut at the multiples of
/// `granule` (guest offsets), a piece is zero when all its bytes are, adjacent pieces of the
/// same kind merge, and a zero run shorter than `min_zero` bytes is counted as data (`-S`).
/// With `min_zero` 0 the whole buffer is one data run: nothing is left out.
pub(super) fn runs(buf: &[u8], start: u64, granule: u64, min_zero: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    if buf.is_empty() {
        return out;
    }
    if min_zero == 0 {
        out.push(Run {
            at: 0,
            len: buf.len(),
            zero: false,
        });
        return out;
    }
    let granule = granule.max(1);
    let mut at = 0usize;
    while at < buf.len() {
        let pos = start + at as u64;
        let to_boundary = (granule - pos % granule) as usize;
        let len = to_boundary.min(buf.len() - at);
        let zero = is_zero(&buf[at..at + len]);
        match out.last_mut() {
            Some(last) if last.zero == zero => last.len += len,
            _ => out.push(Run { at, len, zero }),
        }
        at += len;
    }
    // Zero runs too short to leave out become data, merged with their neighbours.
    let mut merged: Vec<Run> = Vec::with_capacity(out.len());
    for mut run in out {
        if run.zero && (run.len as u64) < min_zero {
            run.zero = false;
        }
        match merged.last_mut() {
            Some(last) if last.zero == run.zero => last.len += run.len,
            _ => merged.push(run),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(runs: &[Run]) -> Vec<(usize, usize, bool)> {
        runs.iter().map(|r| (r.at, r.len, r.zero)).collect()
    }

    #[test]
    fn zeros_are_found_granule_by_granule() {
        let mut buf = vec![0u8; 16];
        buf[5] = 1;
        buf[12] = 1;
        assert_eq!(
            kinds(&runs(&buf, 0, 4, 1)),
            [(0, 4, true), (4, 4, false), (8, 4, true), (12, 4, false)]
        );
        // Granules follow guest offsets, not the buffer: from guest offset 2 the first
        // granule is 2 bytes long.
        assert_eq!(
            kinds(&runs(&buf, 2, 4, 1)),
            [
                (0, 2, true),
                (2, 4, false),
                (6, 4, true),
                (10, 4, false),
                (14, 2, true)
            ]
        );
    }

    #[test]
    fn short_zero_runs_count_as_data() {
        let mut buf = vec![0u8; 16];
        buf[0] = 1;
        buf[15] = 1;
        // 8 zero bytes between two data granules: left out with -S 8, kept with -S 12.
        assert_eq!(
            kinds(&runs(&buf, 0, 4, 8)),
            [(0, 4, false), (4, 8, true), (12, 4, false)]
        );
        assert_eq!(kinds(&runs(&buf, 0, 4, 12)), [(0, 16, false)]);
    }

    #[test]
    fn min_zero_0_keeps_everything() {
        assert_eq!(kinds(&runs(&[0u8; 8], 0, 4, 0)), [(0, 8, false)]);
        assert!(runs(&[], 0, 4, 1).is_empty());
    }

    #[test]
    fn is_zero_sees_the_last_byte() {
        let mut buf = vec![0u8; 10_000];
        assert!(is_zero(&buf));
        buf[9_999] = 1;
        assert!(!is_zero(&buf));
    }
}
