//! The open image. For now: the scanned metadata, the map, and the pre-write overlap check that
//! every future write of the engine will go through.

pub mod create;

use std::path::Path;
use std::sync::Arc;

use crate::format::{BitmapDirectoryEntry, Header, SnapshotEntry};
use crate::overlap::{
    MapError, MetadataMap, MetadataType, NaiveChecker, NaiveLayout, SnapshotL1Reader,
};
use crate::scan::{scan, ScanError, ScannedImage};
use crate::storage::{FileStorage, Storage};

/// Why an image could not be opened or checked.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening the file failed.
    #[error("could not open {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The image is malformed, unsupported or unreadable.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// The corrupt bit is set and a read-write open was asked for.
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    CorruptReadWrite,
    /// A check's range is out of bounds.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The fallback (naive) check failed to read a snapshot L1 table.
    #[error("I/O error reading a snapshot L1 table: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads snapshot L1 tables for the naive fallback checker from the image's own storage.
struct StorageReader(Arc<dyn Storage>);

impl SnapshotL1Reader for StorageReader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        // Past the end of the file reads as zeros, as at scan time.
        let len = self.0.len()?;
        let in_file = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[in_file..].fill(0);
        if in_file > 0 {
            self.0.read_at(offset, &mut buf[..in_file])?;
        }
        Ok(())
    }
}

/// An open qcow2 image.
pub struct Image {
    storage: Arc<dyn Storage>,
    writable: bool,
    scanned: ScannedImage,
    /// QEMU's naive checker, built only when the map's memory limit left ranges unchecked:
    /// there, and only there, checks fall back to it.
    fallback: Option<NaiveChecker<StorageReader>>,
}

impl Image {
    /// Opens the image at `path`, scanning the `enabled` metadata types into its map.
    pub fn open(
        path: impl AsRef<Path>,
        writable: bool,
        enabled: MetadataType,
        map_limit: Option<usize>,
    ) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let storage = FileStorage::open(path, writable).map_err(|source| ImageError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_storage(Arc::new(storage), writable, enabled, map_limit)
    }

    /// Opens an image held by any storage.
    pub fn from_storage(
        storage: Arc<dyn Storage>,
        writable: bool,
        enabled: MetadataType,
        map_limit: Option<usize>,
    ) -> Result<Self, ImageError> {
        let scanned = scan(storage.as_ref(), enabled, map_limit)?;
        if writable && scanned.header.is_corrupt() {
            return Err(ImageError::CorruptReadWrite);
        }
        let fallback = (!scanned.map.unchecked_ranges().is_empty()).then(|| {
            NaiveChecker::new(
                naive_layout(&scanned),
                enabled,
                Box::new(StorageReader(Arc::clone(&storage))),
            )
        });
        Ok(Image {
            storage,
            writable,
            scanned,
            fallback,
        })
    }

    /// Whether the image was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.scanned.header
    }

    /// The snapshot list.
    pub fn snapshots(&self) -> &[SnapshotEntry] {
        &self.scanned.snapshots
    }

    /// The persistent bitmaps.
    pub fn bitmaps(&self) -> &[BitmapDirectoryEntry] {
        &self.scanned.bitmaps
    }

    /// The metadata map.
    pub fn map(&self) -> &MetadataMap {
        &self.scanned.map
    }

    /// Non-fatal problems found by the scan, and how many there were in all.
    pub fn problems(&self) -> (&[String], usize) {
        (&self.scanned.problems, self.scanned.problem_count)
    }

    /// The file length at open.
    pub fn file_len(&self) -> u64 {
        self.scanned.file_len
    }

    /// The pre-write check: the metadata types a write of `size` bytes at `offset` would touch,
    /// minus `ignore`. Constant time from the map; where the map's memory limit left the range
    /// unchecked, QEMU's naive algorithm answers instead (exact, slower).
    pub fn check_overlap(
        &self,
        offset: u64,
        size: u64,
        ignore: MetadataType,
    ) -> Result<MetadataType, ImageError> {
        let map = &self.scanned.map;
        let found = map.check(offset, size, ignore)?;
        match &self.fallback {
            Some(naive) if !map.is_exact(offset, size)? => Ok(naive.check(offset, size, ignore)?),
            _ => Ok(found),
        }
    }

    /// Flushes the storage (a no-op for read-only images).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.writable {
            self.storage.flush()
        } else {
            Ok(())
        }
    }
}

/// What QEMU would keep in memory for its naive check, from the scan.
fn naive_layout(s: &ScannedImage) -> NaiveLayout {
    let h = &s.header;
    NaiveLayout {
        cluster_size: h.cluster_size(),
        l1_table_offset: h.l1_table_offset,
        l1_table: s.l1_table.clone(),
        refcount_table_offset: h.refcount_table_offset,
        refcount_table: s.refcount_table.clone(),
        snapshots_offset: h.snapshots_offset,
        snapshots_size: s.snapshot_table_bytes,
        snapshots: s
            .snapshots
            .iter()
            .map(|e| (e.l1_table_offset, e.l1_size))
            .collect(),
        bitmap_directory: h.active_bitmaps_ext().map(|b| (b.dir_offset, b.dir_size)),
        bitmap_tables: s
            .bitmaps
            .iter()
            .map(|b| (b.table_offset, b.table_size))
            .collect(),
        crypto_header: h.crypto_header(),
    }
}
