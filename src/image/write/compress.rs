//! Compressed cluster writes (`convert -c`): one whole guest cluster compressed with the image's
//! compression type and packed, byte-granular, after the previous compressed cluster in the same
//! host cluster, as QEMU packs them. Each host cluster touched by a compressed cluster counts
//! it once in its refcount.

use std::borrow::Cow;

use super::guard::WriteKind;
use super::l2::Slot;
use super::Piece;
use crate::format::entry::{L2Entry, COMPRESSED_SECTOR_SIZE};
use crate::format::header::COMPRESSION_ZSTD;
use crate::format::{CompressedDescriptor, GuestOffset, HostOffset};
use crate::image::{Image, ImageError};

/// Raw deflate with the 4 KiB window QEMU's decompressor is limited to.
fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut out = Vec::with_capacity(data.len());
    match z.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Some(out),
        _ => None,
    }
}

impl Image {
    /// Writes the whole guest cluster at `guest` (cluster-aligned; `data` is one cluster, or
    /// the rest of the disk for a last, partial cluster) compressed. Data that does not shrink
    /// is written as a plain cluster, as QEMU does. Returns whether it was stored compressed.
    pub fn write_compressed(&self, guest: GuestOffset, data: &[u8]) -> Result<bool, ImageError> {
        self.check_compressed_write(guest, data)?;
        let packed = self.compress_cluster(data);
        self.write_compressed_with(guest, data, packed.as_deref())
    }

    /// `data` (one cluster, or the disk's last, partial one) compressed with this image's
    /// compression type, or `None` when that does not make it smaller than a cluster. Pure
    /// CPU work, no lock: what [`Image::write_compressed_with`] stores, computed on any thread.
    pub fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        let cs = self.geometry.cluster_size() as usize;
        let cluster: Cow<'_, [u8]> = if data.len() == cs {
            Cow::Borrowed(data)
        } else {
            let mut padded = data.to_vec();
            padded.resize(cs, 0);
            Cow::Owned(padded)
        };
        let packed = if self.scanned.header.compression_type == COMPRESSION_ZSTD {
            zstd::bulk::compress(&cluster, 0).ok()
        } else {
            deflate(&cluster)
        };
        packed.filter(|p| p.len() < cs)
    }

    /// [`Image::write_compressed`] with the compression already done: `packed` must be what
    /// [`Image::compress_cluster`] returned for `data` (`None`: stored as a plain cluster).
    pub fn write_compressed_with(
        &self,
        guest: GuestOffset,
        data: &[u8],
        packed: Option<&[u8]>,
    ) -> Result<bool, ImageError> {
        self.check_compressed_write(guest, data)?;
        let mut w = self.writer("write_compressed")?;
        if w.external_data {
            return Err(ImageError::Unsupported(
                "Compression is not supported with an external data file".into(),
            ));
        }
        self.open_for_guest_change(&mut w, guest.0, data.len() as u64)?;
        let r = match packed {
            None => {
                let piece = Piece {
                    cluster: guest.0,
                    at: 0,
                    bytes: data,
                };
                self.write_piece(&mut w, &piece).map(|()| false)
            }
            Some(bytes) => self.place_compressed(&mut w, guest, bytes).map(|()| true),
        };
        let r = r.and_then(|stored| self.bound_pending_writes(&mut w).map(|()| stored));
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// A compressed write covers one whole, aligned cluster (or the disk's last part), and never
    /// goes into an encrypted image.
    fn check_compressed_write(&self, guest: GuestOffset, data: &[u8]) -> Result<(), ImageError> {
        let g = self.geometry;
        let cs = g.cluster_size();
        if self.is_encrypted() {
            // QEMU stores compressed clusters without the cipher: the guest's data would reach
            // the disk in plaintext.
            return Err(ImageError::Encryption(
                "Compressed writes into encrypted images are refused: compressed clusters are \
                 stored unencrypted"
                    .into(),
            ));
        }
        self.check_range("write_compressed", guest.0, data.len() as u64)?;
        let end = guest.0 + data.len() as u64;
        if !g.is_aligned(HostOffset(guest.0))
            || (data.len() as u64 != cs && end != self.virtual_size())
        {
            return Err(ImageError::OutOfRange {
                what: "write_compressed (one whole, aligned cluster)",
                offset: guest.0,
                length: data.len() as u64,
                size: self.virtual_size(),
            });
        }
        Ok(())
    }

    fn place_compressed(
        &self,
        w: &mut super::Writer,
        guest: GuestOffset,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        let g = self.geometry;
        let len = bytes.len() as u64;
        // After the last compressed cluster if it fits in that host cluster and its refcount
        // can count one more (1-bit refcounts cannot), else at the start of a new cluster.
        let shared = match w.compressed_cursor {
            Some((next, end)) if next + len <= end => {
                let c = next >> g.cluster_bits();
                let max = crate::format::refcount::max_refcount(w.header.refcount_order)
                    .unwrap_or(u64::MAX);
                (w.refcounts.get(self.storage.as_ref(), c)? < max).then_some((next, c))
            }
            _ => None,
        };
        let at = match shared {
            Some((next, c)) => {
                w.refcounts.increment(self.storage.as_ref(), c)?;
                next
            }
            None => self.allocate_cluster(w)?.0,
        };
        w.compressed_cursor = Some((at + len, (at | (g.cluster_size() - 1)) + 1));
        let storage = self.storage.clone();
        self.guarded_write(w, WriteKind::GuestData, storage.as_ref(), at, bytes)?;
        let sectors = ((at % COMPRESSED_SECTOR_SIZE) + len).div_ceil(COMPRESSED_SECTOR_SIZE);
        let entry = CompressedDescriptor {
            host_offset: HostOffset(at),
            nb_sectors: sectors,
        }
        .to_entry(g.cluster_bits())
        .ok_or_else(|| ImageError::Corruption("compressed cluster descriptor overflow".into()))?;
        let l2 = self.l2_for_write(w, g.l1_index(guest))?;
        let i = g.l2_index(guest) as usize;
        // A compressed cluster has no subcluster bits (they are reserved and must be 0).
        let new = Slot::plain(L2Entry(entry));
        self.l2_replace(w, l2, i, new)?.release(w);
        Ok(())
    }
}
