//! The recomputed refcounts of a check: a compact per-cluster array, and the decoding of the
//! on-disk refcount blocks into it.

use std::collections::{BTreeMap, HashMap};

use crate::format::refcount_get;
use crate::image::ImageError;

/// Distinct clusters past the end of the file whose references are counted exactly.
pub(super) const MAX_PAST_END: usize = 1 << 20;

/// Per-cluster counts: 8 bits a cluster up to the file's end, values from 255 up in a side
/// table (a cluster shared by more than 254 references is rare), clusters past the end in a
/// sparse table.
pub(crate) struct Counts {
    /// One byte a cluster up to the file's end; 255 means "look in `big`".
    pub(super) small: Vec<u8>,
    big: HashMap<u64, u64>,
    /// Clusters past the end of the file.
    pub(super) past: BTreeMap<u64, u64>,
}

impl Counts {
    pub(super) fn new(clusters: u64) -> Result<Self, ImageError> {
        let n = usize::try_from(clusters).map_err(|_| oom())?;
        let mut small = Vec::new();
        small.try_reserve_exact(n).map_err(|_| oom())?;
        small.resize(n, 0);
        Ok(Counts {
            small,
            big: HashMap::new(),
            past: BTreeMap::new(),
        })
    }

    /// Clusters held in the dense part (the file's clusters).
    pub(in crate::image) fn dense_len(&self) -> u64 {
        self.small.len() as u64
    }

    /// The clusters past the end of the file that have a count, with it.
    pub(in crate::image) fn past_end(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.past.iter().map(|(&k, &v)| (k, v))
    }

    /// Removes one from a cluster's count (not below 0).
    pub(in crate::image) fn decrement(&mut self, c: u64) {
        let v = self.get(c);
        if v > 0 {
            self.set(c, v - 1);
        }
    }

    /// The count of cluster `c`.
    pub(in crate::image) fn get(&self, c: u64) -> u64 {
        match self.small.get(c as usize) {
            Some(&u8::MAX) => self.big.get(&c).copied().unwrap_or(u64::from(u8::MAX)),
            Some(&v) => u64::from(v),
            None => self.past.get(&c).copied().unwrap_or(0),
        }
    }

    /// Sets a count; `false` when a past-the-end cluster could not be recorded (table full).
    pub(super) fn set(&mut self, c: u64, v: u64) -> bool {
        match self.small.get_mut(c as usize) {
            Some(slot) => {
                if v >= u64::from(u8::MAX) {
                    *slot = u8::MAX;
                    self.big.insert(c, v);
                } else {
                    if *slot == u8::MAX {
                        self.big.remove(&c);
                    }
                    *slot = v as u8;
                }
                true
            }
            None => {
                if self.past.len() >= MAX_PAST_END && !self.past.contains_key(&c) {
                    return false;
                }
                self.past.insert(c, v);
                true
            }
        }
    }
}

pub(super) fn oom() -> ImageError {
    ImageError::Unsupported("not enough memory for the check's refcount arrays".into())
}

/// Decodes the refcounts of one block for clusters `first..last` into `out`.
pub(super) fn decode_block(block: &[u8], order: u32, first: u64, last: u64, out: &mut Counts) {
    let n = (last.saturating_sub(first)) as usize;
    match order {
        4 => {
            let start = first as usize;
            match out.small.get_mut(start..start + n) {
                Some(dst)
                    if block
                        .chunks_exact(2)
                        .take(n)
                        .all(|c| c[0] == 0 && c[1] != 0xff) =>
                {
                    for (d, c) in dst.iter_mut().zip(block.chunks_exact(2)) {
                        *d = c[1];
                    }
                }
                _ => {
                    for (j, c) in block.chunks_exact(2).take(n).enumerate() {
                        let v = u16::from_be_bytes([c[0], c[1]]);
                        if v != 0 {
                            out.set(first + j as u64, u64::from(v));
                        }
                    }
                }
            }
        }
        _ => {
            for j in 0..n {
                let v = refcount_get(block, j, order).unwrap_or(0);
                if v != 0 {
                    out.set(first + j as u64, v);
                }
            }
        }
    }
}
