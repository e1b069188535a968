//! Guest offset → decoded mapping: which L2 entry serves a guest byte, and how far the same
//! kind of mapping (with contiguous host offsets) runs from there.

use super::cache::Table;
use crate::format::entry::L1Entry;
use crate::format::{GuestOffset, HostOffset, L2Mapping};
use crate::image::{Image, ImageError};

/// A run of guest bytes with one kind of mapping.
///
/// `mapping` describes the run's first byte: host offsets in it point at that byte (for
/// compressed clusters the descriptor is the cluster's, and the run stays inside it). Host
/// offsets are contiguous over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// How the first byte is mapped.
    pub mapping: L2Mapping,
    /// Bytes in the run (at least 1 for a non-empty request).
    pub len: u64,
}

impl Image {
    /// The L2 table an L1 entry (at `l1_index` of any L1 table) points to; `None` for no
    /// table. An unaligned offset is corruption (QEMU's words).
    pub(in crate::image) fn l2_table_offset(
        &self,
        l1_index: u64,
        entry: u64,
    ) -> Result<Option<u64>, ImageError> {
        let offset = L1Entry(entry).l2_offset().0;
        if offset == 0 {
            return Ok(None);
        }
        if !self.geometry.is_aligned(HostOffset(offset)) {
            return Err(ImageError::Corruption(format!(
                "L2 table offset {} unaligned (L1 index: {})",
                crate::format::c_hex(offset),
                crate::format::c_hex(l1_index)
            )));
        }
        Ok(Some(offset))
    }

    /// The L2 table of L1 index `l1_index` in the active L1 table, or `None` where the L1
    /// entry is empty (or past the end of the table).
    pub(in crate::image) fn l2_table(&self, l1_index: u64) -> Result<Option<Table>, ImageError> {
        let entry = {
            let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
            match usize::try_from(l1_index).ok().and_then(|i| l1.get(i)) {
                Some(&e) => e,
                None => return Ok(None),
            }
        };
        let Some(offset) = self.l2_table_offset(l1_index, entry)? else {
            return Ok(None);
        };
        let cs = self.geometry.cluster_size() as usize;
        self.l2_cache
            .get_or_load(HostOffset(offset), || {
                let mut bytes = vec![0u8; cs];
                self.storage.read_padded(offset, &mut bytes)?;
                Ok::<_, ImageError>(crate::format::read_u64_table(&bytes))
            })
            .map(Some)
    }

    /// The mapping of guest byte `guest` and how many bytes from it (at most `max_len`, and not
    /// past the L2 table that maps it) share that kind of mapping.
    pub fn mapping(&self, guest: GuestOffset, max_len: u64) -> Result<Extent, ImageError> {
        let g = self.geometry;
        let l1_index = g.l1_index(guest);
        let in_table = guest.0 & (g.bytes_per_l1_entry() - 1);
        let to_table_end = g.bytes_per_l1_entry() - in_table;
        let max_len = max_len.min(to_table_end);
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok(Extent {
                mapping: L2Mapping::Unallocated { host: None },
                len: max_len,
            });
        };
        let external = self.scanned.header.has_external_data_file();
        let words_per_entry = if g.is_extended_l2() { 2 } else { 1 };
        let sub_bits = g.subcluster_bits();
        let subs_per_cluster = 1u64 << (g.cluster_bits() - sub_bits);
        let decode = |sub_index: u64| -> Result<L2Mapping, ImageError> {
            let entry = (sub_index / subs_per_cluster) as usize * words_per_entry;
            let word = table.get(entry).copied().unwrap_or(0);
            let bitmap = if words_per_entry == 2 {
                table.get(entry + 1).copied().unwrap_or(0)
            } else {
                0
            };
            let sub = (sub_index % subs_per_cluster) as u32;
            Ok(L2Mapping::decode(g, word, bitmap, sub, external)?)
        };
        let first_sub = in_table >> sub_bits;
        let in_sub = in_table & (g.subcluster_size() - 1);
        let first = decode(first_sub)?;
        let mut len = g.subcluster_size() - in_sub;
        if let L2Mapping::Compressed(_) = first {
            // A compressed cluster is one unit; the run ends with it.
            let in_cluster = g.in_cluster_offset(guest.0);
            return Ok(Extent {
                mapping: first,
                len: (g.cluster_size() - in_cluster).min(max_len),
            });
        }
        let step = g.subcluster_size();
        let mut prev = first;
        let mut sub = first_sub + 1;
        let subs_in_table = g.l2_entries() * subs_per_cluster;
        while len < max_len && sub < subs_in_table {
            let next = decode(sub)?;
            if !prev.continues_with(&next, step) {
                break;
            }
            prev = next;
            len += step;
            sub += 1;
        }
        let shift = |h: Option<HostOffset>| h.map(|h| HostOffset(h.0 + in_sub));
        let mapping = match first {
            L2Mapping::Data { host } => L2Mapping::Data {
                host: HostOffset(host.0 + in_sub),
            },
            L2Mapping::Zero { host } => L2Mapping::Zero { host: shift(host) },
            L2Mapping::Unallocated { host } => L2Mapping::Unallocated { host: shift(host) },
            other => other,
        };
        Ok(Extent {
            mapping,
            len: len.min(max_len),
        })
    }

    /// Host offset of guest byte `guest` where this image stores it as plain data (in the
    /// external data file when there is one); `None` for zeros, unallocated and compressed
    /// clusters.
    pub fn host_offset(&self, guest: GuestOffset) -> Result<Option<HostOffset>, ImageError> {
        self.check_range("host_offset", guest.0, 1)?;
        Ok(match self.mapping(guest, 1)?.mapping {
            L2Mapping::Data { host } => Some(host),
            _ => None,
        })
    }

    /// Refuses a guest request outside the virtual disk.
    pub(crate) fn check_range(
        &self,
        what: &'static str,
        offset: u64,
        length: u64,
    ) -> Result<(), ImageError> {
        let size = self.virtual_size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ImageError::OutOfRange {
                what,
                offset,
                length,
                size,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::entry::{OFLAG_COPIED, OFLAG_ZERO};
    use crate::image::testutil::*;
    use crate::image::OpenOptions;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn open(bytes: Vec<u8>) -> Image {
        Image::from_storage(Arc::new(MemStorage::new(bytes)), OpenOptions::default()).unwrap()
    }

    #[test]
    fn runs_merge_contiguous_data_and_stop_at_changes() {
        // Clusters 0 and 1 contiguous data, 2 zero, 3 data elsewhere, rest unallocated.
        let l2 = [
            OFLAG_COPIED | (5 * CS),
            OFLAG_COPIED | (6 * CS),
            OFLAG_ZERO,
            OFLAG_COPIED | (8 * CS),
        ];
        let img = open(image(1 << 30, &l2, &[(0, 1), (1, 2), (2, 0), (3, 3)]));
        let e = img.mapping(GuestOffset(100), u64::MAX).unwrap();
        assert_eq!(
            e,
            Extent {
                mapping: L2Mapping::Data {
                    host: HostOffset(5 * CS + 100)
                },
                len: 2 * CS - 100
            }
        );
        let e = img.mapping(GuestOffset(2 * CS), u64::MAX).unwrap();
        assert_eq!(e.mapping, L2Mapping::Zero { host: None });
        assert_eq!(e.len, CS);
        let e = img.mapping(GuestOffset(4 * CS), u64::MAX).unwrap();
        assert_eq!(e.mapping, L2Mapping::Unallocated { host: None });
        // The run stops at the end of the L2 table (512 MiB at 64 KiB clusters).
        assert_eq!(e.len, (512 << 20) - 4 * CS);
        // Past the L1 table's only allocated entry.
        let e = img.mapping(GuestOffset(600 << 20), 10).unwrap();
        assert_eq!(e.len, 10);
        assert_eq!(
            img.host_offset(GuestOffset(CS + 1)).unwrap(),
            Some(HostOffset(6 * CS + 1))
        );
        assert_eq!(img.host_offset(GuestOffset(2 * CS)).unwrap(), None);
        assert!(img.host_offset(GuestOffset(1 << 30)).is_err());
    }

    #[test]
    fn unaligned_entries_are_corruption() {
        let img = open(image(1 << 30, &[OFLAG_COPIED | (5 * CS + 512)], &[(0, 1)]));
        let err = img.mapping(GuestOffset(0), 1).unwrap_err();
        assert_eq!(err.kind(), crate::image::ErrorKind::Corruption);
    }
}
