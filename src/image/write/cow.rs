//! Writing guest data into clusters: in place where this image alone owns the cluster,
//! otherwise into a fresh cluster with the rest of it copied (from the old cluster, the backing
//! file, or zeros), then the L2 entry changed; and the L2 table made ready for that change
//! (allocated, or copied when a snapshot shares it).
//!
//! The write order this protects: the data (and any copy-on-write fill) reaches the disk before
//! the L2 entry that points at it, and the old cluster is released only after nothing refers to
//! it any more.

use std::sync::Arc;

use super::guard::WriteKind;
use super::{owned_host, Piece, Writer};
use crate::format::entry::{L1_L2_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::format::{CompressedDescriptor, GuestOffset, HostOffset};
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

impl Image {
    /// The L2 table for L1 index `l1_index`, ready to change: allocated if missing, copied if
    /// shared with a snapshot. Returns its offset; the table is pinned in the cache, where it is
    /// changed in place ([`Image::l2_get`], [`Image::l2_set`]).
    pub(crate) fn l2_for_write(&self, w: &mut Writer, l1_index: u64) -> Result<u64, ImageError> {
        let idx = usize::try_from(l1_index)
            .map_err(|_| ImageError::Corruption("L1 index out of range".into()))?;
        let entry = {
            let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
            *l1.get(idx).ok_or_else(|| {
                ImageError::Corruption(format!("L1 index {idx} past the L1 table"))
            })?
        };
        let words = (self.geometry.cluster_size() / 8) as usize;
        let offset = entry & L1_L2_OFFSET_MASK;
        if offset != 0 && entry & OFLAG_COPIED != 0 {
            let table = self
                .l2_table(l1_index)?
                .ok_or_else(|| ImageError::Corruption("L2 table vanished".into()))?;
            self.l2_cache.pin(HostOffset(offset), table);
            return Ok(offset);
        }
        // A new table, or a copy of one shared with a snapshot.
        let table = if offset == 0 {
            vec![0u64; words]
        } else {
            let old = self
                .l2_table(l1_index)?
                .ok_or_else(|| ImageError::Corruption("L2 table vanished".into()))?;
            w.refcounts
                .free_later(offset >> self.geometry.cluster_bits());
            self.map_remove(offset, 1, MetadataType::ACTIVE_L2)?;
            // Every cluster the copy references is shared with the old table now: no entry
            // of the copy may claim sole ownership (COPIED), whatever the old one said.
            let step = if self.geometry.is_extended_l2() { 2 } else { 1 };
            let mut copy = old.as_ref().clone();
            for e in copy.iter_mut().step_by(step) {
                *e &= !OFLAG_COPIED;
            }
            copy
        };
        let new = self.allocate_metadata(w, MetadataType::ACTIVE_L2)?;
        self.l1.write().unwrap_or_else(|e| e.into_inner())[idx] = new | OFLAG_COPIED;
        w.l1_dirty.insert(idx);
        self.refresh_fallback_now(w)?;
        self.l2_cache.pin(HostOffset(new), Arc::new(table));
        Ok(new)
    }

    /// The common case, without touching any table: the cluster is plain data this image owns
    /// (COPIED) in an L2 table it owns, so the data is overwritten in place. Returns whether
    /// that was the case.
    pub(in crate::image) fn overwrite_in_place(
        &self,
        w: &mut Writer,
        p: &Piece<'_>,
    ) -> Result<bool, ImageError> {
        let g = self.geometry;
        let guest = GuestOffset(p.cluster);
        let l1_index = g.l1_index(guest);
        let l1_entry = {
            let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
            usize::try_from(l1_index)
                .ok()
                .and_then(|i| l1.get(i).copied())
                .unwrap_or(0)
        };
        if l1_entry & OFLAG_COPIED == 0 || l1_entry & L1_L2_OFFSET_MASK == 0 {
            return Ok(false);
        }
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok(false);
        };
        let entry = table.get(g.l2_index(guest) as usize).copied().unwrap_or(0);
        drop(table);
        let host = match owned_host(entry, w.external_data) {
            Some(host) if entry & OFLAG_ZERO == 0 && g.is_aligned(HostOffset(host)) => host,
            _ => return Ok(false),
        };
        let data = self.chain()?.data.clone();
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data.as_ref(),
            host + p.at as u64,
            p.bytes,
        )?;
        Ok(true)
    }

    /// Word `i` of the pinned L2 table at `l2`.
    pub(crate) fn l2_get(&self, l2: u64, i: usize) -> Result<u64, ImageError> {
        self.l2_cache
            .edit(HostOffset(l2), |t| t.get(i).copied())
            .flatten()
            .ok_or_else(|| ImageError::Corruption(format!("L2 table at {l2:#x} is not pinned")))
    }

    /// Sets word `i` of the pinned L2 table at `l2`.
    pub(crate) fn l2_set(&self, l2: u64, i: usize, value: u64) -> Result<(), ImageError> {
        self.l2_cache
            .edit(HostOffset(l2), |t| t.get_mut(i).map(|slot| *slot = value))
            .flatten()
            .ok_or_else(|| ImageError::Corruption(format!("L2 table at {l2:#x} is not pinned")))
    }

    /// Writes one piece of guest data (inside one cluster).
    pub(crate) fn write_piece(&self, w: &mut Writer, p: &Piece<'_>) -> Result<(), ImageError> {
        let g = self.geometry;
        let guest = GuestOffset(p.cluster);
        if !g.is_extended_l2() && self.overwrite_in_place(w, p)? {
            return Ok(());
        }
        let l2_offset = self.l2_for_write(w, g.l1_index(guest))?;
        let i = g.l2_index(guest) as usize;
        if g.is_extended_l2() {
            self.write_piece_extended(w, p, l2_offset, i)?;
        } else {
            self.write_piece_standard(w, p, l2_offset, i)?;
        }
        Ok(())
    }

    pub(in crate::image) fn write_piece_standard(
        &self,
        w: &mut Writer,
        p: &Piece<'_>,
        l2_offset: u64,
        i: usize,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size() as usize;
        let entry = self.l2_get(l2_offset, i)?;
        let host = entry & L1_L2_OFFSET_MASK;
        let owned = owned_host(entry, w.external_data).is_some();
        let zero = entry & OFLAG_COMPRESSED == 0 && entry & OFLAG_ZERO != 0;
        let data_storage = self.chain()?.data.clone();
        if owned && !zero {
            if !self.geometry.is_aligned(HostOffset(host)) {
                return Err(self.poison_if_inconsistent(
                    w,
                    // QEMU's words, naming the guest offset of the write.
                    ImageError::Corruption(format!(
                        "Data cluster offset {} unaligned (guest offset: {})",
                        crate::format::c_hex(host),
                        crate::format::c_hex(p.cluster + p.at as u64)
                    )),
                ));
            }
            // Owned data cluster: overwrite in place.
            return self.guarded_write(
                w,
                WriteKind::GuestData,
                data_storage.as_ref(),
                host + p.at as u64,
                p.bytes,
            );
        }
        // The whole cluster gets new contents: the old view (backing file, zeros, compressed
        // or shared data) with the piece on top.
        let mut buf = vec![0u8; cs];
        if p.bytes.len() < cs && !zero {
            self.read_old(p.cluster, &mut buf)?;
        }
        buf[p.at..p.at + p.bytes.len()].copy_from_slice(p.bytes);
        let target = if owned {
            host // a preallocated zero cluster this image owns
        } else if w.external_data {
            p.cluster // the data file is mapped one to one
        } else {
            self.allocate_cluster(w)? << self.geometry.cluster_bits()
        };
        self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), target, &buf)?;
        self.release_old(w, entry, owned)?;
        self.l2_set(l2_offset, i, target | OFLAG_COPIED)
    }

    /// Reads the guest view at `guest` into `buf`, as far as the virtual disk goes; the part
    /// of a last, partial cluster past the end reads as zeros.
    pub(in crate::image) fn read_old(&self, guest: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let inside = self
            .virtual_size()
            .saturating_sub(guest)
            .min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        self.read_at(GuestOffset(guest), &mut buf[..inside])
    }

    /// Queues the release of what `entry` referenced, unless the cluster stays in use.
    pub(crate) fn release_old(
        &self,
        w: &mut Writer,
        entry: u64,
        kept: bool,
    ) -> Result<(), ImageError> {
        if kept || w.external_data {
            return Ok(());
        }
        let bits = self.geometry.cluster_bits();
        if entry & OFLAG_COMPRESSED != 0 {
            if let Some(d) = CompressedDescriptor::from_entry(entry, bits) {
                if let Some((start, end)) = d.sector_range() {
                    for c in (start >> bits)..=((end - 1) >> bits) {
                        self.refuse_freeing_metadata(w, Some(entry), &[c])?;
                        w.refcounts.free_later(c);
                    }
                }
            }
            return Ok(());
        }
        let host = entry & L1_L2_OFFSET_MASK;
        if host != 0 {
            self.refuse_freeing_metadata(w, Some(entry), &[host >> bits])?;
            w.refcounts.free_later(host >> bits);
        }
        Ok(())
    }

    pub(in crate::image) fn write_piece_extended(
        &self,
        w: &mut Writer,
        p: &Piece<'_>,
        l2_offset: u64,
        i: usize,
    ) -> Result<(), ImageError> {
        let g = self.geometry;
        let scs = g.subcluster_size() as usize;
        let (entry, mut bitmap) = (
            self.l2_get(l2_offset, 2 * i)?,
            self.l2_get(l2_offset, 2 * i + 1)?,
        );
        let data_storage = self.chain()?.data.clone();
        let compressed = entry & OFLAG_COMPRESSED != 0;
        let mut host = entry & L1_L2_OFFSET_MASK;
        let owned = owned_host(entry, w.external_data).is_some();
        if !owned {
            // A new cluster: for a shared one, the allocated subclusters' data is copied over.
            let old_host = host;
            host = if w.external_data {
                p.cluster
            } else {
                self.allocate_cluster(w)? << g.cluster_bits()
            };
            if compressed {
                // Every subcluster of a compressed cluster is data: copy it all.
                let mut buf = vec![0u8; g.cluster_size() as usize];
                self.read_old(p.cluster, &mut buf)?;
                self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), host, &buf)?;
                bitmap = 0xffff_ffff;
            } else if old_host != 0 && bitmap & 0xffff_ffff != 0 {
                let mut buf = vec![0u8; g.cluster_size() as usize];
                data_storage.read_padded(old_host, &mut buf)?;
                self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), host, &buf)?;
            }
            self.release_old(w, entry, false)?;
        }
        let first = p.at / scs;
        let last = (p.at + p.bytes.len() - 1) / scs;
        let span_start = first * scs;
        let span_end = (last + 1) * scs;
        let mut buf = vec![0u8; span_end - span_start];
        for s in [first, last] {
            let (lo, hi) = (s * scs, (s + 1) * scs);
            let covered = p.at <= lo && p.at + p.bytes.len() >= hi;
            if covered || bitmap & (1 << (32 + s)) != 0 {
                continue;
            }
            let part = &mut buf[lo - span_start..hi - span_start];
            if bitmap & (1 << s) != 0 {
                data_storage.read_padded(host + lo as u64, part)?;
            } else {
                self.read_old(p.cluster + lo as u64, part)?;
            }
        }
        buf[p.at - span_start..p.at - span_start + p.bytes.len()].copy_from_slice(p.bytes);
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data_storage.as_ref(),
            host + span_start as u64,
            &buf,
        )?;
        for s in first..=last {
            bitmap |= 1 << s;
            bitmap &= !(1u64 << (32 + s));
        }
        self.l2_set(l2_offset, 2 * i, host | OFLAG_COPIED)?;
        self.l2_set(l2_offset, 2 * i + 1, bitmap)
    }
}
