//! The bitmap operations of `qemu-img bitmap`: add, remove, clear, enable, disable, merge.
//!
//! Each is a change like a write: the bitmaps on disk are put in use first, the operation
//! happens in memory, and the next close stores the result (a new directory, the tables of
//! removed bitmaps freed). Refusals come before anything is written, in QEMU's words.

use crate::format::bitmap::{
    BITMAP_FLAG_AUTO, BITMAP_TYPE_DIRTY_TRACKING, MAX_BITMAP_NAME, MAX_GRANULARITY_BITS,
    MIN_GRANULARITY_BITS,
};
use crate::format::extension::MAX_BITMAPS;
use crate::format::BitmapDirectoryEntry;
use crate::image::write::Writer;
use crate::image::{Image, ImageError};

use super::{inconsistent, Tracked};

/// QEMU's default granularity for a new bitmap: the cluster size, within 4 KiB and 64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

impl Image {
    /// Adds an empty bitmap `name` (QEMU's default granularity when `granularity` is `None`),
    /// enabled (tracking writes) or not.
    pub fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<(), ImageError> {
        let mut w = self.writer("add_bitmap")?;
        let cs = self.geometry.cluster_size();
        let g = granularity.unwrap_or_else(|| default_granularity(cs));
        if !g.is_power_of_two()
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&(g.trailing_zeros() as u8))
        {
            return Err(ImageError::Bitmap(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        if name.is_empty() {
            return Err(ImageError::Bitmap("Bitmap name cannot be empty".into()));
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(ImageError::Bitmap(format!(
                "Can't make bitmap '{name}' persistent: Name length exceeds maximum \
                 ({MAX_BITMAP_NAME} characters)"
            )));
        }
        if w.bitmaps.list.iter().any(|t| t.entry.name == name) {
            return Err(ImageError::Bitmap(format!("Bitmap already exists: {name}")));
        }
        if w.header.version < 3 {
            return Err(ImageError::Bitmap(format!(
                "Can't make bitmap '{name}' persistent: Cannot store dirty bitmaps in qcow2 v2 \
                 files"
            )));
        }
        if w.bitmaps.list.len() >= MAX_BITMAPS as usize {
            return Err(ImageError::Bitmap(format!(
                "Maximum number of persistent bitmaps is already reached ({MAX_BITMAPS})"
            )));
        }
        self.open_for_change(&mut w)?;
        let entry = BitmapDirectoryEntry {
            table_offset: 0,
            table_size: 0,
            flags: if enabled { BITMAP_FLAG_AUTO } else { 0 },
            bitmap_type: BITMAP_TYPE_DIRTY_TRACKING,
            granularity_bits: g.trailing_zeros() as u8,
            extra: Vec::new(),
            name: name.to_string(),
        };
        let size = self.virtual_size();
        w.bitmaps.list.push(Tracked::added(entry, cs, size));
        w.bitmaps.directory_changed = true;
        Ok(())
    }

    /// Removes bitmap `name`, consistent or not; its clusters are freed by the next close.
    pub fn remove_bitmap(&self, name: &str) -> Result<(), ImageError> {
        let mut w = self.writer("remove_bitmap")?;
        let i = w.bitmaps.position(name)?;
        self.open_for_change(&mut w)?;
        let t = w.bitmaps.list.remove(i);
        w.bitmaps.dropped.push(t);
        w.bitmaps.directory_changed = true;
        Ok(())
    }

    /// Clears every bit of bitmap `name`.
    pub fn clear_bitmap(&self, name: &str) -> Result<(), ImageError> {
        let mut w = self.writer("clear_bitmap")?;
        let i = usable(&w, name)?;
        self.open_for_change(&mut w)?;
        w.bitmaps.list[i].clear(self.storage.as_ref())
    }

    /// Enables bitmap `name` (writes mark it) or disables it.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<(), ImageError> {
        let what = if enabled {
            "enable_bitmap"
        } else {
            "disable_bitmap"
        };
        let mut w = self.writer(what)?;
        let i = usable(&w, name)?;
        self.open_for_change(&mut w)?;
        let flags = &mut w.bitmaps.list[i].entry.flags;
        if enabled {
            *flags |= BITMAP_FLAG_AUTO;
        } else {
            *flags &= !BITMAP_FLAG_AUTO;
        }
        w.bitmaps.directory_changed = true;
        Ok(())
    }

    /// Marks in bitmap `target` every range that bitmap `source` marks; `source` is a bitmap
    /// of `source_image` when given (another open image), of this image otherwise.
    pub fn merge_bitmap(
        &self,
        target: &str,
        source: &str,
        source_image: Option<&Image>,
    ) -> Result<(), ImageError> {
        let other = source_image.filter(|&img| !std::ptr::eq(img, self));
        // Read the other image first: its writer lock is never taken while ours is held.
        let extents = match other {
            Some(img) => Some(img.dirty_extents(source, 0, img.virtual_size())?),
            None => None,
        };
        let mut w = self.writer("merge_bitmap")?;
        let t = usable(&w, target)?;
        let size = self.virtual_size();
        let storage = self.storage.as_ref();
        let extents = match extents {
            Some(e) => e,
            None => {
                usable(&w, source)?;
                w.bitmaps.find_mut(source)?.extents(storage, 0, size)?
            }
        };
        self.open_for_change(&mut w)?;
        for (offset, len) in extents {
            w.bitmaps.list[t].mark(storage, offset, len)?;
        }
        Ok(())
    }
}

/// The position of bitmap `name`, refused when it is inconsistent (as QEMU refuses it).
fn usable(w: &Writer, name: &str) -> Result<usize, ImageError> {
    let i = w.bitmaps.position(name)?;
    if w.bitmaps.list[i].inconsistent {
        return Err(inconsistent(name));
    }
    Ok(i)
}
