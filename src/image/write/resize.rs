//! Resizing the virtual disk: shrinking only past what is allocated, growing with a larger L1
//! table when needed (written whole in fresh clusters before the header points at it).

use super::refcounts::NewTable;
use super::Writer;
use crate::format::GuestOffset;
use crate::image::bitmaps::inconsistent;
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

impl Image {
    /// Changes the virtual size. Growing may move the L1 table to a larger one; shrinking is
    /// refused while anything is allocated past the new end.
    pub fn resize(&self, new_size: u64) -> Result<(), ImageError> {
        let mut w = self.writer("resize")?;
        // The bitmaps follow the disk, as in QEMU, which refuses while one is inconsistent.
        if let Some(t) = w.bitmaps.list.iter().find(|t| t.inconsistent) {
            return Err(inconsistent(&t.entry.name));
        }
        self.open_for_change(&mut w)?;
        let g = self.geometry;
        let old_size = self.virtual_size();
        if new_size % 512 != 0 {
            return Err(ImageError::OutOfRange {
                what: "resize (the size must be a multiple of 512)",
                offset: new_size,
                length: 0,
                size: old_size,
            });
        }
        if new_size < old_size {
            // Like `qemu-img resize --shrink`: the cluster the new end falls in may stay
            // allocated; nothing may be allocated from the next cluster boundary on.
            let mut at = new_size.div_ceil(g.cluster_size()) * g.cluster_size();
            while at < old_size {
                let e = self.mapping(GuestOffset(at), old_size - at)?;
                let allocated = match e.mapping {
                    crate::format::L2Mapping::Unallocated { host } => host.is_some(),
                    crate::format::L2Mapping::Zero { host } => host.is_some(),
                    _ => true,
                };
                if allocated {
                    return Err(ImageError::Unsupported(format!(
                        "Cannot shrink the image to {new_size} bytes: guest offset {at:#x} is \
                         allocated (discard it first)"
                    )));
                }
                at += e.len;
            }
        }
        self.grow_l1(&mut w, g.l1_entries_for(new_size))?;
        for t in &mut w.bitmaps.list {
            t.resize(self.storage.as_ref(), new_size)?;
        }
        w.header.size = new_size;
        w.header_dirty = true;
        // Grow and shrink both take effect on disk with the next flush; reads see the new size.
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        drop(w);
        self.flush()
    }

    /// Makes the active L1 table at least `needed` entries long: a larger table in a new run of
    /// clusters, which the next flush writes whole before switching the header to it (the old
    /// one is freed after that).
    pub(crate) fn grow_l1(&self, w: &mut Writer, needed: u64) -> Result<(), ImageError> {
        let g = self.geometry;
        let current = self.l1.read().unwrap_or_else(|e| e.into_inner()).len() as u64;
        if needed <= current {
            return Ok(());
        }
        if needed * 8 > crate::format::limits::MAX_L1_BYTES {
            return Err(ImageError::Unsupported(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)"
                    .into(),
            ));
        }
        let clusters = (needed * 8).div_ceil(g.cluster_size());
        let offset = self.allocate_run(w, clusters)?.0;
        self.map_enter(w, offset, clusters, MetadataType::ACTIVE_L1)?;
        let old = NewTable {
            offset: w.header.l1_table_offset,
            clusters: (current * 8).div_ceil(g.cluster_size()),
        };
        if w.l1_moved.is_none() && old.clusters > 0 {
            let first_old = old.offset >> g.cluster_bits();
            for c in first_old..first_old + old.clusters {
                w.refcounts.free_later(c);
            }
            w.l1_moved = Some(old);
        }
        self.l1
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(needed as usize, 0);
        w.header.l1_table_offset = offset;
        w.header.l1_size = needed as u32;
        w.header_dirty = true;
        Ok(())
    }
}
