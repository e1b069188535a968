//! Writing guest data into clusters: in place where this image alone owns the cluster,
//! otherwise into a fresh cluster with the rest of it copied (from the old cluster, the backing
//! file, or zeros), then the L2 entry changed; and the L2 table made ready for that change
//! (allocated, or copied when a snapshot shares it).
//!
//! The write order this protects: the data (and any copy-on-write fill) reaches the disk before
//! the L2 entry that points at it, and the old cluster is released only after nothing refers to
//! it any more.

use super::guard::WriteKind;
use super::l2::Slot;
use super::{Piece, Writer};
use crate::format::entry::L2Entry;
use crate::format::{GuestOffset, HostOffset};
use crate::image::{Image, ImageError};

impl Image {
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
        if !self.l1_entry(l1_index).owns_table() {
            return Ok(false);
        }
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok(false);
        };
        let entry = L2Entry(table.get(g.l2_index(guest) as usize).copied().unwrap_or(0));
        drop(table);
        let host = match entry.owned_host(w.external_data) {
            Some(host) if !entry.is_zero() && g.is_aligned(host) => host,
            _ => return Ok(false),
        };
        let data = self.chain()?.data.clone();
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data.as_ref(),
            host.0 + p.at as u64,
            p.bytes,
        )?;
        Ok(true)
    }

    /// Writes one piece of guest data (inside one cluster); for an encrypted image, widened to
    /// whole sectors first.
    pub(crate) fn write_piece(&self, w: &mut Writer, p: &Piece<'_>) -> Result<(), ImageError> {
        if let Some((at, bytes)) = self.widen_to_sectors(p.cluster, p.at, p.bytes)? {
            let whole = Piece {
                cluster: p.cluster,
                at,
                bytes: &bytes,
            };
            return self.write_piece(w, &whole);
        }
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
        l2_offset: HostOffset,
        i: usize,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size() as usize;
        let entry = self.l2_slot(l2_offset, i)?.entry;
        let owned = entry.owned_host(w.external_data);
        let zero = entry.is_zero();
        let data_storage = self.chain()?.data.clone();
        if let (Some(host), false) = (owned, zero) {
            if !self.geometry.is_aligned(host) {
                return Err(self.poison_if_inconsistent(
                    w,
                    // QEMU's words, naming the guest offset of the write.
                    ImageError::Corruption(format!(
                        "Data cluster offset {} unaligned (guest offset: {})",
                        crate::format::c_hex(host.0),
                        crate::format::c_hex(p.cluster + p.at as u64)
                    )),
                ));
            }
            // Owned data cluster: overwrite in place.
            return self.guarded_write(
                w,
                WriteKind::GuestData,
                data_storage.as_ref(),
                host.0 + p.at as u64,
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
        let target = match owned {
            Some(host) => host, // a preallocated zero cluster this image owns
            None if w.external_data => HostOffset(p.cluster), // mapped one to one
            None => self.allocate_cluster(w)?,
        };
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data_storage.as_ref(),
            target.0,
            &buf,
        )?;
        let new = Slot::plain(L2Entry::owned(target));
        self.l2_replace(w, l2_offset, i, new)?.release(w);
        Ok(())
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

    pub(in crate::image) fn write_piece_extended(
        &self,
        w: &mut Writer,
        p: &Piece<'_>,
        l2_offset: HostOffset,
        i: usize,
    ) -> Result<(), ImageError> {
        let g = self.geometry;
        let scs = g.subcluster_size() as usize;
        let Slot { entry, mut bitmap } = self.l2_slot(l2_offset, i)?;
        let data_storage = self.chain()?.data.clone();
        let owned = entry.owned_host(w.external_data);
        let host = match owned {
            Some(host) => host,
            // A new cluster: for a shared one, the allocated subclusters' data is copied below.
            None if w.external_data => HostOffset(p.cluster),
            None => self.allocate_cluster(w)?,
        };
        if owned.is_none() {
            let (host, old_host) = (host.0, entry.host_offset().0);
            if entry.is_compressed() {
                // Every subcluster of a compressed cluster is data: copy it all.
                let mut buf = vec![0u8; g.cluster_size() as usize];
                self.read_old(p.cluster, &mut buf)?;
                self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), host, &buf)?;
                bitmap = 0xffff_ffff;
            } else if old_host != 0 && bitmap & 0xffff_ffff != 0 {
                let mut buf = vec![0u8; g.cluster_size() as usize];
                // Deciphered at the old place; the write below enciphers it for the new one.
                self.read_data(&data_storage, old_host, p.cluster, &mut buf)?;
                self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), host, &buf)?;
            }
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
                self.read_data(
                    &data_storage,
                    host.0 + lo as u64,
                    p.cluster + lo as u64,
                    part,
                )?;
            } else {
                self.read_old(p.cluster + lo as u64, part)?;
            }
        }
        buf[p.at - span_start..p.at - span_start + p.bytes.len()].copy_from_slice(p.bytes);
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data_storage.as_ref(),
            host.0 + span_start as u64,
            &buf,
        )?;
        for s in first..=last {
            bitmap |= 1 << s;
            bitmap &= !(1u64 << (32 + s));
        }
        let new = Slot {
            entry: L2Entry::owned(host),
            bitmap,
        };
        self.l2_replace(w, l2_offset, i, new)?.release(w);
        Ok(())
    }
}
