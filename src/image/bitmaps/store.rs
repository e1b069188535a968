//! The two moments a writable handle writes the bitmaps, in QEMU's order.
//!
//! **In use, before the first change** ([`Image::put_bitmaps_in_use`]): autoclear bit 0
//! cleared, the directory rewritten in place with `in_use` on every consistent bitmap, bit 0
//! set again, a barrier after each. Bit 0 is clear while the directory is rewritten, so a torn
//! directory is never trusted; once it is set again, a crash leaves the bitmaps in use
//! (inconsistent), never consistent and stale.
//!
//! **Stored, at close** ([`Image::store_bitmaps`]), after a full flush so that they describe
//! what is on disk: for each consistent bitmap a new data cluster for every changed cluster
//! that holds a set bit (none for a cluster of zeros; unchanged clusters keep theirs), a new
//! table, then a new directory with `in_use` cleared, the refcounts of all of them, a barrier;
//! then the header switched to the new directory (bit 0 set), a barrier; then the old
//! directory, the old tables and the replaced data clusters freed. A crash before the switch
//! leaves the old directory, which says "in use", and leaked clusters; after it, only leaks.

use crate::format::bitmap::BITMAP_FLAG_IN_USE;
use crate::format::header::AutoclearFeatures;
use crate::format::{
    serialize_bitmap_directory, write_u64_table, BitmapTableEntry, BitmapsExtension,
    HeaderExtension,
};
use crate::image::write::guard::WriteKind;
use crate::image::write::Writer;
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

/// Clusters of the old structures, freed once the header points at the new directory.
struct OldClusters {
    /// `(offset, clusters, type)` of the old directory and tables.
    tables: Vec<(u64, u64, MetadataType)>,
    /// Data clusters no new table references.
    data: Vec<u64>,
}

impl Image {
    /// Marks every consistent bitmap in use on disk (see the module documentation); done once,
    /// before the first change.
    pub(in crate::image) fn put_bitmaps_in_use(&self, w: &mut Writer) -> Result<(), ImageError> {
        if w.bitmaps.in_use_on_disk || !w.bitmaps.any_consistent_on_disk() {
            return Ok(());
        }
        let Some(ext) = w.header.bitmaps_ext().cloned() else {
            return Ok(());
        };
        let storage = self.storage.as_ref();
        let entries: Vec<_> = w
            .bitmaps
            .disk
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.flags |= BITMAP_FLAG_IN_USE;
                e
            })
            .collect();
        let dir = serialize_bitmap_directory(&entries)?;
        if dir.len() as u64 != ext.dir_size {
            return Err(ImageError::Corruption(format!(
                "the bitmap directory of {} bytes serializes to {} bytes",
                ext.dir_size,
                dir.len()
            )));
        }
        w.header.autoclear_features -= AutoclearFeatures::BITMAPS;
        self.write_header(w)?;
        storage.flush()?;
        self.guarded_write(w, WriteKind::BitmapDirectory, storage, ext.dir_offset, &dir)?;
        storage.flush()?;
        w.header.autoclear_features |= AutoclearFeatures::BITMAPS;
        self.write_header(w)?;
        storage.flush()?;
        w.bitmaps.in_use_on_disk = true;
        Ok(())
    }

    /// Stores the bitmaps (see the module documentation); a no-op unless a change through this
    /// handle put them in use, or bitmaps were added, removed, enabled or disabled. The flush
    /// before it is the caller's.
    pub(in crate::image) fn store_bitmaps(&self, w: &mut Writer) -> Result<(), ImageError> {
        if !w.bitmaps.store_needed() {
            return Ok(());
        }
        let cs = self.geometry.cluster_size();
        let storage = self.storage.as_ref();
        let mut old = OldClusters {
            tables: Vec::new(),
            data: Vec::new(),
        };
        if let Some(ext) = w.header.bitmaps_ext() {
            old.tables.push((
                ext.dir_offset,
                ext.dir_size.div_ceil(cs),
                MetadataType::BITMAP_DIRECTORY,
            ));
        }
        let dropped = std::mem::take(&mut w.bitmaps.dropped);
        let freed = self.dropped_clusters(dropped.iter(), &mut old);
        w.bitmaps.dropped = dropped;
        freed?;

        // New data clusters and tables.
        let mut entries = Vec::with_capacity(w.bitmaps.list.len());
        let mut tables = Vec::with_capacity(w.bitmaps.list.len());
        for i in 0..w.bitmaps.list.len() {
            let (entry, table) = self.store_one(w, i, &mut old)?;
            entries.push(entry);
            tables.push(table);
        }

        // The new directory (none when no bitmap is left), then every refcount, a barrier.
        let mut dir_at = 0;
        let dir = serialize_bitmap_directory(&entries)?;
        if !entries.is_empty() {
            let clusters = (dir.len() as u64).div_ceil(cs);
            dir_at = self.allocate_run(w, clusters)?.0;
            self.guarded_write(w, WriteKind::NewTable, storage, dir_at, &dir)?;
            self.map_enter(w, dir_at, clusters, MetadataType::BITMAP_DIRECTORY)?;
        }
        self.write_refcounts(w)?;
        storage.flush()?;

        // The switch: the extension points at the new directory, or goes with the last bitmap.
        let header = &mut w.header;
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::Bitmaps(_)));
        if entries.is_empty() {
            header.autoclear_features -= AutoclearFeatures::BITMAPS;
        } else {
            header
                .extensions
                .push(HeaderExtension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: entries.len() as u32,
                    reserved: 0,
                    dir_size: dir.len() as u64,
                    dir_offset: dir_at,
                }));
            header.autoclear_features |= AutoclearFeatures::BITMAPS;
        }
        header.fix_layout();
        self.write_header_with_extensions(w)?;
        storage.flush()?;

        // The old structures are unreferenced now.
        for &(offset, clusters, types) in &old.tables {
            self.map_remove(offset, clusters, types)?;
            for c in 0..clusters {
                w.refcounts.free_later(offset / cs + c);
            }
        }
        for &offset in &old.data {
            w.refcounts.free_later(offset / cs);
        }
        self.apply_decrements(w)?;
        for ((t, entry), table) in w.bitmaps.list.iter_mut().zip(&entries).zip(tables) {
            t.stored(entry.clone(), table);
        }
        w.bitmaps.disk = entries;
        w.bitmaps.dropped.clear();
        w.bitmaps.in_use_on_disk = false;
        w.bitmaps.directory_changed = false;
        Ok(())
    }

    /// Adds the table and data clusters of removed bitmaps to `old`. Data clusters are freed
    /// only from a table whose every entry is valid (an inconsistent bitmap's table was never
    /// checked): a cluster leaked is better than one freed that something else uses.
    fn dropped_clusters<'a>(
        &self,
        dropped: impl Iterator<Item = &'a super::Tracked>,
        old: &mut OldClusters,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        let file_len = self.storage.len()?;
        for t in dropped {
            if t.entry.table_offset == 0 {
                continue; // added and removed before any store
            }
            old.tables.push((
                t.entry.table_offset,
                t.entry.table_bytes().div_ceil(cs),
                MetadataType::BITMAP_TABLE,
            ));
            let mut bytes = vec![0u8; usize::try_from(t.entry.table_bytes()).unwrap_or(0)];
            self.storage.read_at(t.entry.table_offset, &mut bytes)?;
            let entries: Vec<BitmapTableEntry> = crate::format::read_u64_table(&bytes)
                .into_iter()
                .map(BitmapTableEntry)
                .collect();
            let valid = entries
                .iter()
                .all(|e| e.check(cs).is_ok() && e.offset().0 < file_len);
            if valid {
                old.data
                    .extend(entries.iter().map(|e| e.offset().0).filter(|&o| o != 0));
            }
        }
        Ok(())
    }

    /// Writes bitmap `i`'s changed data clusters and its new table (an inconsistent one keeps
    /// its own); returns its new directory entry and table, and adds what they replace to `old`.
    fn store_one(
        &self,
        w: &mut Writer,
        i: usize,
        old: &mut OldClusters,
    ) -> Result<(crate::format::BitmapDirectoryEntry, Option<Vec<u64>>), ImageError> {
        let cs = self.geometry.cluster_size();
        let storage = self.storage.as_ref();
        if w.bitmaps.list[i].inconsistent {
            return Ok((w.bitmaps.list[i].entry.clone(), None));
        }
        let n = w.bitmaps.list[i].shape.table_size();
        if n == 0 {
            return Err(ImageError::Bitmap(format!(
                "Bitmap '{}' cannot be stored for a disk of 0 bytes",
                w.bitmaps.list[i].entry.name
            )));
        }
        let old_table = w.bitmaps.list[i].table(storage)?.to_vec();
        let changed = std::mem::take(&mut w.bitmaps.list[i].changed);
        let mut table = vec![0u64; usize::try_from(n).unwrap_or(0)];
        let result = (|| {
            for (index, slot) in table.iter_mut().enumerate() {
                let before = old_table.get(index).copied().unwrap_or(0);
                match changed.get(&(index as u64)) {
                    None => *slot = before,
                    Some(bytes) => {
                        if bytes.iter().any(|&b| b != 0) {
                            let at = self.allocate_cluster(w)?.0;
                            self.guarded_write(w, WriteKind::NewTable, storage, at, bytes)?;
                            *slot = at;
                        }
                        let replaced = BitmapTableEntry(before).offset().0;
                        if replaced != 0 {
                            old.data.push(replaced);
                        }
                    }
                }
            }
            Ok::<(), ImageError>(())
        })();
        // Restored on failure, so that a retried close still has what changed.
        w.bitmaps.list[i].changed = changed;
        result?;
        for &e in old_table.iter().skip(table.len()) {
            let offset = BitmapTableEntry(e).offset().0;
            if offset != 0 {
                old.data.push(offset);
            }
        }
        let bytes = write_u64_table(&table);
        let clusters = (bytes.len() as u64).div_ceil(cs);
        let at = self.allocate_run(w, clusters)?.0;
        self.guarded_write(w, WriteKind::NewTable, storage, at, &bytes)?;
        self.map_enter(w, at, clusters, MetadataType::BITMAP_TABLE)?;
        let t = &w.bitmaps.list[i];
        if t.entry.table_offset != 0 {
            old.tables.push((
                t.entry.table_offset,
                t.entry.table_bytes().div_ceil(cs),
                MetadataType::BITMAP_TABLE,
            ));
        }
        let mut entry = t.entry.clone();
        entry.table_offset = at;
        entry.table_size = u32::try_from(n).unwrap_or(u32::MAX);
        entry.flags &= !BITMAP_FLAG_IN_USE;
        Ok((entry, Some(table)))
    }
}
