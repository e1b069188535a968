//! Zero writes and discards: whole clusters by the zero flag (or unallocated), the rest by
//! writing zeros; extended L2 per subcluster.

use super::guard::WriteKind;
use super::l2::Slot;
use super::{Piece, Writer};
use crate::format::entry::L2Entry;
use crate::format::{GuestOffset, L2Mapping};
use crate::image::{Image, ImageError};

impl Image {
    /// Makes `[offset, offset + len)` read as zeros: whole clusters by the zero flag (version 3;
    /// with `unmap`, their clusters are freed), partial ones by writing zeros. Version 2 has no
    /// zero flag: without a backing file a whole cluster (or one whose rest reads zeros
    /// already) is discarded, which makes it read zeros, as QEMU zeroes it; otherwise zeros are
    /// written.
    pub fn write_zeroes(
        &self,
        guest: GuestOffset,
        len: u64,
        unmap: bool,
    ) -> Result<(), ImageError> {
        self.check_range("write_zeroes", guest.0, len)?;
        let mut w = self.writer("write_zeroes")?;
        self.open_for_guest_change(&mut w, guest.0, len)?;
        let cs = self.geometry.cluster_size() as usize;
        let zeros = vec![0u8; cs];
        let v3 = w.header.version >= 3;
        let v2_discards = !v3 && self.scanned.header.backing_file.is_none();
        let r = self
            .for_each_piece(
                guest.0,
                len,
                |img, w, cluster, at, n| {
                    if v2_discards && (n == cs || img.reads_zeros_without_data(w, cluster)?) {
                        img.zero_cluster(w, cluster, true, true, true)
                    } else if v3 && n == cs {
                        img.zero_cluster(w, cluster, unmap, false, false)
                    } else if v3 && img.geometry.is_extended_l2() {
                        img.zero_subclusters(w, cluster, at, n)
                    } else if v3 && img.reads_zeros_without_data(w, cluster)? {
                        // As QEMU does: the rest of the cluster reads zeros already, so the
                        // whole of it is zeroed by its flag instead of written.
                        img.zero_cluster(w, cluster, unmap, false, false)
                    } else {
                        let piece = Piece {
                            cluster,
                            at,
                            bytes: &zeros[..n],
                        };
                        img.write_piece(w, &piece)
                    }
                },
                &mut w,
            )
            .and_then(|()| self.bound_pending_writes(&mut w));
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Discards whole clusters in `[offset, offset + len)` (partial clusters are left alone, as
    /// QEMU does): version 3 clusters then read as zeros, version 2 clusters fall back to the
    /// backing file (or zeros). Their host clusters are freed.
    pub fn discard(&self, guest: GuestOffset, len: u64) -> Result<(), ImageError> {
        self.check_range("discard", guest.0, len)?;
        let mut w = self.writer("discard")?;
        self.open_for_guest_change(&mut w, guest.0, len)?;
        let cs = self.geometry.cluster_size() as usize;
        let v3 = w.header.version >= 3;
        let at_end = guest.0 + len == self.virtual_size();
        let r = self
            .for_each_piece(
                guest.0,
                len,
                |img, w, cluster, _at, n| {
                    if n == cs || (at_end && cluster + n as u64 == img.virtual_size()) {
                        img.zero_cluster(w, cluster, true, !v3, true)
                    } else {
                        Ok(())
                    }
                },
                &mut w,
            )
            .and_then(|()| self.bound_pending_writes(&mut w));
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Makes every cluster of the disk unallocated, so that all of it reads from the backing
    /// file again (what `qemu-img commit` leaves in the image it committed); the host clusters
    /// are freed. What the guest reads is unchanged only if the backing file already holds this
    /// image's data, so the dirty bitmaps are not marked (QEMU's `make_empty` leaves them too).
    pub fn make_empty(&self) -> Result<(), ImageError> {
        let mut w = self.writer("make_empty")?;
        self.open_for_change(&mut w)?;
        let g = self.geometry;
        let size = self.virtual_size();
        let span = g.bytes_per_l1_entry();
        let r = (0..g.l1_entries_for(size)).try_for_each(|l1_index| {
            if self.l2_table(l1_index)?.is_none() {
                return Ok(());
            }
            let start = l1_index * span;
            let len = span.min(size - start);
            self.for_each_piece(
                start,
                len,
                |img, w, cluster, _at, _n| img.zero_cluster(w, cluster, true, true, false),
                &mut w,
            )?;
            self.bound_pending_writes(&mut w)
        });
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Whether guest cluster `cluster` reads as zeros from its metadata alone, with nothing
    /// showing through from a backing file: unallocated without a backing file, or a zero
    /// cluster (standard L2 entries; QEMU's test before zeroing a partial cluster by its flag).
    fn reads_zeros_without_data(&self, w: &Writer, cluster: u64) -> Result<bool, ImageError> {
        if self.scanned.header.backing_file.is_some() || w.external_data {
            return Ok(false);
        }
        let cs = self.geometry.cluster_size();
        let extent = self.mapping(GuestOffset(cluster), cs)?;
        Ok(matches!(
            extent.mapping,
            L2Mapping::Unallocated { .. } | L2Mapping::Zero { .. }
        ))
    }

    /// Whether the whole guest cluster `cluster` is unallocated or zero, with no host cluster
    /// of its own (read from the tables as they are: nothing is allocated or copied to learn it).
    fn reads_zeros_without_host(&self, cluster: u64) -> Result<bool, ImageError> {
        let cs = self.geometry.cluster_size();
        let extent = self.mapping(GuestOffset(cluster), cs)?;
        Ok(extent.len >= cs
            && matches!(
                extent.mapping,
                L2Mapping::Unallocated { host: None } | L2Mapping::Zero { host: None }
            ))
    }

    /// Sets one whole cluster to read as zeros (or, with `unallocate`, to unallocated), as
    /// QEMU does: a zero write sets the zero flag (allocating the L2 table if need be); a
    /// `discard` leaves a cluster without data of its own alone when no backing file shows
    /// through it (it reads zeros already).
    pub(in crate::image) fn zero_cluster(
        &self,
        w: &mut Writer,
        cluster: u64,
        unmap: bool,
        unallocate: bool,
        discard: bool,
    ) -> Result<(), ImageError> {
        let g = self.geometry;
        let guest = GuestOffset(cluster);
        let l1_index = g.l1_index(guest);
        let has_backing = self.scanned.header.backing_file.is_some();
        if self.l2_table(l1_index)?.is_none() && (unallocate || (discard && !has_backing)) {
            return Ok(());
        }
        if discard && !has_backing && self.reads_zeros_without_host(cluster)? {
            return Ok(());
        }
        let l2_offset = self.l2_for_write(w, l1_index)?;
        let i = g.l2_index(guest) as usize;
        let ext = g.is_extended_l2();
        let entry = self.l2_slot(l2_offset, i)?.entry;
        // A preallocated cluster this image owns stays allocated, reading as zeros.
        let kept = match entry.owned_host(false) {
            Some(host) if !unmap && !unallocate && !w.external_data => Some(host),
            _ => None,
        };
        if w.raw_data {
            // The raw data file must read as the disk does.
            let zeros = vec![0u8; g.cluster_size() as usize];
            let data = self.chain()?.data.clone();
            self.guarded_write(w, WriteKind::GuestData, data.as_ref(), cluster, &zeros)?;
        }
        let new = match (ext, unallocate, kept) {
            (_, true, _) => Slot::plain(L2Entry::UNALLOCATED),
            (true, false, kept) => Slot {
                entry: kept.map_or(L2Entry::UNALLOCATED, L2Entry::owned),
                bitmap: 0xffff_ffffu64 << 32, // every subcluster reads as zeros
            },
            (false, false, Some(host)) => Slot::plain(L2Entry::owned_zero(host)),
            (false, false, None) => Slot::plain(L2Entry::ZERO),
        };
        self.l2_replace(w, l2_offset, i, new)?.release_discarding(w);
        Ok(())
    }

    /// Zeroes whole subclusters of one cluster by their zero bits; partial subclusters get
    /// zeros written.
    pub(in crate::image) fn zero_subclusters(
        &self,
        w: &mut Writer,
        cluster: u64,
        at: usize,
        n: usize,
    ) -> Result<(), ImageError> {
        let scs = self.geometry.subcluster_size() as usize;
        let first_full = at.div_ceil(scs);
        let end_full = (at + n) / scs;
        let zeros = vec![0u8; scs];
        // Partial subclusters at either end.
        let head_end = (first_full * scs).min(at + n);
        if at < head_end {
            let piece = Piece {
                cluster,
                at,
                bytes: &zeros[..head_end - at],
            };
            self.write_piece(w, &piece)?;
        }
        if end_full > first_full {
            let guest = GuestOffset(cluster);
            let l2_offset = self.l2_for_write(w, self.geometry.l1_index(guest))?;
            let i = self.geometry.l2_index(guest) as usize;
            let Slot { entry, mut bitmap } = self.l2_slot(l2_offset, i)?;
            let shared = entry.host_offset().0 != 0 && entry.owned_host(false).is_none();
            if w.raw_data || entry.is_compressed() || shared {
                // Shared or compressed: write zeros (which copies the cluster first).
                let piece = Piece {
                    cluster,
                    at: first_full * scs,
                    bytes: &vec![0u8; (end_full - first_full) * scs],
                };
                self.write_piece(w, &piece)?;
            } else {
                for s in first_full..end_full {
                    bitmap &= !(1u64 << s);
                    bitmap |= 1u64 << (32 + s);
                }
                self.l2_set_bitmap(l2_offset, i, bitmap)?;
            }
        }
        let tail_start = (end_full * scs).max(head_end);
        if tail_start < at + n && end_full >= first_full {
            let piece = Piece {
                cluster,
                at: tail_start,
                bytes: &zeros[..at + n - tail_start],
            };
            self.write_piece(w, &piece)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::format::GuestOffset;
    use crate::image::testutil::{created, open_alone as image, CS};

    #[test]
    fn an_emptied_image_allocates_nothing_and_checks_clean() {
        let storage = created(8 << 20);
        let img = image(true, &storage);
        for (at, len, byte) in [
            (0u64, 70_000usize, 1u8),
            (3 << 20, 4096, 2),
            ((8 << 20) - 512, 512, 3),
        ] {
            img.write_at(GuestOffset(at), &vec![byte; len]).unwrap();
        }
        img.write_zeroes(GuestOffset(5 << 20), 1 << 20, false)
            .unwrap();
        img.make_empty().unwrap();
        img.close().unwrap();
        drop(img);

        let img = image(false, &storage);
        let (map, _) = img.guest_map_chunk(0, 1024).unwrap();
        assert!(map.iter().all(|e| !e.present), "{map:?}");
        let mut buf = vec![0xffu8; 8 << 20];
        img.read_at(GuestOffset(0), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let report = img.check().unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?}");
    }

    /// The bytes of host cluster `host` as the storage holds them.
    fn host_bytes(storage: &crate::storage::MemStorage, host: u64) -> Vec<u8> {
        storage.snapshot()[host as usize..(host + CS) as usize].to_vec()
    }

    #[test]
    fn discards_and_snapshot_deletion_give_freed_space_back_other_frees_do_not() {
        let storage = created(8 << 20);
        let img = image(true, &storage);
        let host = |g: u64| img.host_offset(GuestOffset(g)).unwrap().unwrap().0;
        img.write_at(GuestOffset(0), &vec![0xab; 4 * CS as usize])
            .unwrap();
        img.write_at(GuestOffset(1 << 20), &vec![0xcd; CS as usize])
            .unwrap();
        img.write_at(GuestOffset(2 << 20), &vec![0x11; CS as usize])
            .unwrap();
        img.flush().unwrap();
        let (discarded, kept, shared) = (host(CS), host(1 << 20), host(2 << 20));

        // A guest discard: the freed cluster's space goes back (MemStorage reads it as zeros).
        img.discard(GuestOffset(CS), CS).unwrap();
        img.flush().unwrap();
        assert_eq!(host_bytes(&storage, discarded), vec![0; CS as usize]);
        assert_eq!(host_bytes(&storage, kept), vec![0xcd; CS as usize]);

        // A copy-on-write leaves the snapshot's cluster alone; deleting the snapshot frees it
        // and gives it back.
        img.create_snapshot("s", None, 0).unwrap();
        img.write_at(GuestOffset(2 << 20), &vec![0x22; CS as usize])
            .unwrap();
        img.flush().unwrap();
        assert_ne!(host(2 << 20), shared);
        assert_eq!(host_bytes(&storage, shared), vec![0x11; CS as usize]);
        img.delete_snapshot("s").unwrap();
        assert_eq!(host_bytes(&storage, shared), vec![0; CS as usize]);

        // Other frees keep their bytes (QEMU's pass-discard-other is off): the L1 table a
        // resize moved away from.
        let old_l1 = img.header().l1_table_offset;
        img.resize(1 << 40).unwrap();
        img.flush().unwrap();
        assert_ne!(host_bytes(&storage, old_l1), vec![0; CS as usize]);

        let report = img.check().unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?}");
        let mut buf = vec![0u8; 4 * CS as usize];
        img.read_at(GuestOffset(0), &mut buf).unwrap();
        assert!(buf[..CS as usize].iter().all(|&b| b == 0xab));
        assert!(buf[CS as usize..2 * CS as usize].iter().all(|&b| b == 0));
        assert!(buf[2 * CS as usize..].iter().all(|&b| b == 0xab));
    }
}
