//! The persistent bitmaps: the bitmap directory while autoclear bit 0 vouches for it, and the
//! tables of consistent bitmaps, whose entries QEMU validates at open.

use crate::format::{parse_bitmap_directory, BitmapDirectoryEntry, BitmapTableEntry, Header};
use crate::overlap::MetadataType;

use super::{ScanError, Scanner};

impl Scanner<'_> {
    /// Reads the bitmap directory while autoclear bit 0 vouches for it.
    pub(super) fn scan_bitmaps(
        &mut self,
        header: &Header,
    ) -> Result<Vec<BitmapDirectoryEntry>, ScanError> {
        let Some(ext) = header.active_bitmaps_ext().cloned() else {
            return Ok(Vec::new());
        };
        ext.validate(self.cs)?;
        let dir = self.read(ext.dir_offset, ext.dir_size, "the bitmap directory")?;
        let bitmaps = parse_bitmap_directory(&dir, ext.nb_bitmaps, self.cs, header.size)?;
        self.put(
            ext.dir_offset,
            ext.dir_size,
            MetadataType::BITMAP_DIRECTORY,
            "the bitmap directory",
        )?;
        for b in &bitmaps {
            let what = format!("the table of bitmap '{}'", b.name);
            self.put(
                b.table_offset,
                b.table_bytes(),
                MetadataType::BITMAP_TABLE,
                &what,
            )?;
            // QEMU loads the table of every consistent bitmap at open and refuses the image when
            // an entry is invalid; in-use bitmaps are not loaded. Only what lies in the file's
            // data is read: entries in holes are zeros, which are valid.
            if !b.in_use() {
                let overlap = || format!("Bitmap tables overlap: bitmap '{}'", b.name);
                self.for_each_table_entry(
                    b.table_offset,
                    b.table_bytes(),
                    "a bitmap table",
                    &overlap,
                    |s, _, e| {
                        BitmapTableEntry(e).check(s.cs).map_err(|err| {
                            ScanError::Inconsistent(format!(
                                "Could not read bitmap_table table from image for bitmap '{}': \
                                 {err}",
                                b.name
                            ))
                        })
                    },
                )?;
            }
        }
        Ok(bitmaps)
    }
}
