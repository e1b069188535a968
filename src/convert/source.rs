//! The disk to copy: a qcow2 image (with its backing chain, or one internal snapshot's disk)
//! or a raw file, walked as [`Segment`]s that say what each range holds.

use std::path::Path;

use crate::image::{Image, ImageError};
use crate::lock::{FileLock, LockSet, Locking};
use crate::storage::{CacheMode, FileStorage, Storage};

/// A raw file opened for a conversion, with QEMU's locks for what is done to it.
#[derive(Debug)]
pub struct RawFile {
    /// The file.
    pub storage: FileStorage,
    /// Its name, for errors.
    pub name: String,
    /// Its length when it was opened: a raw disk's size.
    pub size: u64,
    _lock: Option<FileLock>,
}

impl RawFile {
    /// Opens `path`, locked as QEMU locks a raw image it reads (shared with other readers and,
    /// with `force_share`, with writers too) or writes; writes are made durable as `cache`
    /// says.
    pub fn open(
        path: &Path,
        writable: bool,
        force_share: bool,
        cache: CacheMode,
    ) -> Result<Self, ImageError> {
        let name = path.display().to_string();
        let opened = || -> Result<Self, ImageError> {
            let storage = FileStorage::open(path, writable)?.with_cache(cache);
            let set = if writable {
                LockSet::WRITABLE
            } else {
                LockSet::for_read(false, force_share)
            };
            let lock = FileLock::for_mode(storage.file(), &name, set, Locking::Auto)?;
            let size = storage.len()?;
            Ok(RawFile {
                storage,
                name: name.clone(),
                size,
                _lock: lock,
            })
        };
        opened().map_err(|e| e.in_file(&name))
    }
}

/// Where a conversion reads from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A qcow2 image, read through its backing chain.
    Image(&'a Image),
    /// A raw file: its length is the disk's size, its holes read as zeros.
    Raw(&'a RawFile),
}

/// What a range of the source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holds {
    /// Bytes to read (which may still turn out to be zeros).
    Data,
    /// Surely zeros (unallocated without a backing file, a zero cluster, a hole).
    Zero,
    /// Left to the backing file (only when the target has one: its backing file provides it).
    Backing,
}

/// One range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub start: u64,
    pub len: u64,
    pub holds: Holds,
}

/// Entries of the guest map asked for at a time.
const MAP_BATCH: usize = 4096;

impl Source<'_> {
    /// Guest bytes of the disk.
    pub fn size(&self) -> u64 {
        match self {
            Source::Image(image) => image.virtual_size(),
            Source::Raw(raw) => raw.size,
        }
    }

    /// The file errors name.
    pub(super) fn name(&self) -> String {
        match self {
            Source::Image(image) => image
                .path()
                .map_or_else(|| "<image>".to_owned(), |p| p.display().to_string()),
            Source::Raw(raw) => raw.name.clone(),
        }
    }

    /// Fills `buf` with the guest bytes at `offset`.
    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        match self {
            Source::Image(image) => image.read_at(crate::format::GuestOffset(offset), buf),
            Source::Raw(raw) => Ok(raw.storage.read_padded(offset, buf)?),
        }
    }

    /// The segments from `start` on (at least one while `start` is inside the disk), in
    /// order and adjacent. With `layers`, only the image's top `layers` layers count: what they
    /// leave to the layers below is [`Holds::Backing`] (`qemu-img convert -B` copies the top
    /// layer, `qemu-img commit` the layers above its base).
    pub(super) fn segments(
        &self,
        start: u64,
        layers: Option<u32>,
    ) -> Result<Vec<Segment>, ImageError> {
        let size = self.size();
        match self {
            Source::Image(image) => {
                let (map, _) = image.guest_map_chunk(start, MAP_BATCH)?;
                Ok(map
                    .iter()
                    .map(|e| Segment {
                        start: e.start,
                        len: e.length,
                        holds: if layers.is_some_and(|n| e.depth >= n || !e.present) {
                            Holds::Backing
                        } else if e.zero && !e.data {
                            Holds::Zero
                        } else {
                            Holds::Data
                        },
                    })
                    .collect())
            }
            Source::Raw(raw) => {
                let data = raw.storage.next_data(start)?;
                Ok(match data {
                    None => vec![Segment {
                        start,
                        len: size - start,
                        holds: Holds::Zero,
                    }],
                    Some((from, _)) if from > start => vec![Segment {
                        start,
                        len: from.min(size) - start,
                        holds: Holds::Zero,
                    }],
                    Some((_, end)) => vec![Segment {
                        start,
                        len: end.min(size) - start,
                        holds: Holds::Data,
                    }],
                })
            }
        }
    }
}
