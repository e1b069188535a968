//! What one L2 entry means for one (sub)cluster: the decoded mapping that engine code matches on
//! instead of testing entry bits.
//!
//! The decoding follows the spec's table of cluster and subcluster types:
//!
//! | entry | extended L2 bitmap | meaning |
//! |---|---|---|
//! | bit 62 set | must be 0 | compressed |
//! | zero flag (standard entries only), offset 0 | – | zeros, no host cluster |
//! | zero flag, offset set | – | zeros, host cluster kept (preallocated) |
//! | offset 0 (no external data file, or COPIED clear) | zero bit of the subcluster | zeros / unallocated (backing file) |
//! | offset set | alloc bit / zero bit of the subcluster | data at offset / zeros / unallocated with a host cluster |
//!
//! With an external data file, offset 0 is a valid data offset; the spec's answer to the
//! ambiguity is the COPIED flag (every data file cluster has refcount 1), so offset 0 with COPIED
//! set is data.

use super::entry::{CompressedDescriptor, L2Entry, L1_L2_OFFSET_MASK};
use super::offsets::{Geometry, HostOffset};

/// Allocation bits of every subcluster (the low word of an extended L2 bitmap).
const ALL_ALLOC_BITS: u64 = 0xffff_ffff;

/// The decoded meaning of one guest (sub)cluster, as [`L2Mapping::decode`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// Not allocated in this image: reads come from the backing file, or are zeros without
    /// one. `host` is the cluster an extended L2 entry keeps for its other subclusters.
    Unallocated {
        /// Host offset of this subcluster inside an allocated cluster, if any.
        host: Option<HostOffset>,
    },
    /// Reads as zeros. `host` is a preallocated cluster the entry keeps, if any.
    Zero {
        /// Host offset of this (sub)cluster's preallocated space, if any.
        host: Option<HostOffset>,
    },
    /// Guest data stored at `host` (in the external data file when there is one).
    Data {
        /// Host offset of the first byte of this (sub)cluster.
        host: HostOffset,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Why an L2 entry cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// An extended L2 bitmap marks a subcluster both allocated and zero, or an unallocated
    /// cluster has allocation bits set.
    #[error("Invalid cluster entry found (L2 bitmap {bitmap:#018x})")]
    InvalidBitmap {
        /// The offending bitmap.
        bitmap: u64,
    },
    /// A data cluster's host offset is not cluster-aligned.
    #[error("Cluster allocation offset {offset:#x} unaligned")]
    Unaligned {
        /// The unaligned offset.
        offset: u64,
    },
}

impl L2Mapping {
    /// Decodes the L2 entry `word` (and, with extended L2 entries, its `bitmap`) for subcluster
    /// `sub` (0 for standard entries). `external_data` says whether the image keeps guest data
    /// in an external data file.
    pub fn decode(
        geometry: Geometry,
        word: u64,
        bitmap: u64,
        sub: u32,
        external_data: bool,
    ) -> Result<L2Mapping, MappingError> {
        let entry = L2Entry(word);
        if entry.is_compressed() {
            let d = CompressedDescriptor::from_entry(word, geometry.cluster_bits())
                .ok_or(MappingError::Unaligned { offset: word })?;
            return Ok(L2Mapping::Compressed(d));
        }
        let offset = word & L1_L2_OFFSET_MASK;
        let allocated = offset != 0 || (external_data && entry.copied());
        let sub_offset = u64::from(sub) << geometry.subcluster_bits();
        let host = HostOffset(offset + sub_offset);
        if !geometry.is_extended_l2() {
            if entry.is_zero() {
                return Ok(L2Mapping::Zero {
                    host: (offset != 0).then_some(host),
                });
            }
            if !allocated {
                return Ok(L2Mapping::Unallocated { host: None });
            }
            if !geometry.is_aligned(HostOffset(offset)) {
                return Err(MappingError::Unaligned { offset });
            }
            return Ok(L2Mapping::Data { host });
        }
        let alloc = bitmap & (1 << sub) != 0;
        let zero = bitmap & (1 << (32 + sub)) != 0;
        if !allocated {
            if bitmap & ALL_ALLOC_BITS != 0 {
                return Err(MappingError::InvalidBitmap { bitmap });
            }
            return Ok(if zero {
                L2Mapping::Zero { host: None }
            } else {
                L2Mapping::Unallocated { host: None }
            });
        }
        if (bitmap >> 32) & bitmap & ALL_ALLOC_BITS != 0 {
            return Err(MappingError::InvalidBitmap { bitmap });
        }
        if !geometry.is_aligned(HostOffset(offset)) {
            return Err(MappingError::Unaligned { offset });
        }
        Ok(if zero {
            L2Mapping::Zero { host: Some(host) }
        } else if alloc {
            L2Mapping::Data { host }
        } else {
            L2Mapping::Unallocated { host: Some(host) }
        })
    }

    /// The host offset this mapping names, if any (not for compressed clusters).
    pub fn host(&self) -> Option<HostOffset> {
        match *self {
            L2Mapping::Unallocated { host } | L2Mapping::Zero { host } => host,
            L2Mapping::Data { host } => Some(host),
            L2Mapping::Compressed(_) => None,
        }
    }

    /// Whether `next` (the mapping of the following subcluster or cluster) continues this one
    /// as one extent: same kind, and host offsets contiguous where there are any.
    pub fn continues_with(&self, next: &L2Mapping, step: u64) -> bool {
        let contiguous = |a: Option<HostOffset>, b: Option<HostOffset>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.0.checked_add(step) == Some(b.0),
            _ => false,
        };
        match (self, next) {
            (L2Mapping::Unallocated { host: a }, L2Mapping::Unallocated { host: b })
            | (L2Mapping::Zero { host: a }, L2Mapping::Zero { host: b }) => contiguous(*a, *b),
            (L2Mapping::Data { host: a }, L2Mapping::Data { host: b }) => {
                contiguous(Some(*a), Some(*b))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::entry::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};

    fn std64k() -> Geometry {
        Geometry::new(16, false).unwrap()
    }

    fn ext64k() -> Geometry {
        Geometry::new(16, true).unwrap()
    }

    #[test]
    fn standard_entries() {
        let g = std64k();
        let d = |w| L2Mapping::decode(g, w, 0, 0, false);
        assert_eq!(d(0), Ok(L2Mapping::Unallocated { host: None }));
        assert_eq!(d(OFLAG_ZERO), Ok(L2Mapping::Zero { host: None }));
        assert_eq!(
            d(0x5_0000 | OFLAG_ZERO),
            Ok(L2Mapping::Zero {
                host: Some(HostOffset(0x5_0000))
            })
        );
        assert_eq!(
            d(OFLAG_COPIED | 0x5_0000),
            Ok(L2Mapping::Data {
                host: HostOffset(0x5_0000)
            })
        );
        assert_eq!(
            d(0x5_0200),
            Err(MappingError::Unaligned { offset: 0x5_0200 })
        );
        assert!(matches!(
            d(OFLAG_COMPRESSED | 0x1234),
            Ok(L2Mapping::Compressed(_))
        ));
    }

    #[test]
    fn offset_zero_with_copied_is_data_in_an_external_data_file() {
        let g = std64k();
        assert_eq!(
            L2Mapping::decode(g, OFLAG_COPIED, 0, 0, true),
            Ok(L2Mapping::Data {
                host: HostOffset(0)
            })
        );
        assert_eq!(
            L2Mapping::decode(g, OFLAG_COPIED, 0, 0, false),
            Ok(L2Mapping::Unallocated { host: None })
        );
    }

    #[test]
    fn extended_entries_per_subcluster() {
        let g = ext64k();
        let word = 0x9_0000;
        let bitmap = (0b100u64 << 32) | 0b011;
        let d = |sub| L2Mapping::decode(g, word, bitmap, sub, false).unwrap();
        assert_eq!(
            d(1),
            L2Mapping::Data {
                host: HostOffset(0x9_0000 + 2048)
            }
        );
        assert_eq!(
            d(2),
            L2Mapping::Zero {
                host: Some(HostOffset(0x9_0000 + 4096))
            }
        );
        assert_eq!(
            d(3),
            L2Mapping::Unallocated {
                host: Some(HostOffset(0x9_0000 + 6144))
            }
        );
        // Unallocated cluster: only zero bits may be set.
        assert_eq!(
            L2Mapping::decode(g, 0, 1 << 33, 1, false),
            Ok(L2Mapping::Zero { host: None })
        );
        assert!(L2Mapping::decode(g, 0, 1, 0, false).is_err());
        // Allocated and zero at once.
        assert!(L2Mapping::decode(g, word, (1 << 32) | 1, 5, false).is_err());
        // Bit 0 is no zero flag with extended entries.
        assert_eq!(
            L2Mapping::decode(g, OFLAG_ZERO, 0, 0, false),
            Ok(L2Mapping::Unallocated { host: None })
        );
    }

    #[test]
    fn continuation() {
        let a = L2Mapping::Data {
            host: HostOffset(0x10000),
        };
        let b = L2Mapping::Data {
            host: HostOffset(0x20000),
        };
        assert!(a.continues_with(&b, 0x10000));
        assert!(!a.continues_with(&b, 0x8000));
        let z = L2Mapping::Zero { host: None };
        assert!(z.continues_with(&z, 0x10000));
        assert!(!z.continues_with(&a, 0x10000));
    }
}
