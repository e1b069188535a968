//! The backing chain and the external data file.
//!
//! For a read-only image both are opened on the first guest read (or `guest_map`), not at
//! open: inspecting an image's metadata (`info`, `map`, overlap checks) must work even when its
//! backing file is elsewhere. A writable image opens them at open, as QEMU does, so that their
//! locks keep writers of the backing files out from the start.
//! The whole chain below an image is opened at once, so that a loop is found before anything is
//! read. Names are resolved as QEMU 10 resolves them: a backing file name relative to the folder
//! of the image that names it, an external data file name relative to the current directory
//! (QEMU opens the data file by the name as stored, both when it creates and when it opens an
//! image).
//!
//! Every file of the chain is locked as QEMU locks it ([`crate::lock`]) before it is read, and
//! stays locked while the chain is open: no writer of a backing file is let in meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::header::QCOW2_MAGIC;
use crate::image::{BackingChain, Image, ImageError, OpenOptions};
use crate::lock::{FileLock, LockSet};
use crate::overlap::MetadataType;
use crate::storage::{FileStorage, Storage};

/// What an image's unallocated clusters read from.
#[derive(Debug)]
pub enum Backing {
    /// A qcow2 image (with its own chain).
    Qcow2(Box<Image>),
    /// A raw image.
    Raw {
        /// Its file.
        storage: Arc<dyn Storage>,
        /// Its length: the backing disk's size.
        size: u64,
    },
}

impl Backing {
    /// The backing disk's size; reads past it are zeros.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.virtual_size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Reads `buf.len()` bytes of the backing disk at `offset`; what lies past its end reads
    /// as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let inside = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Qcow2(img) => img.read_at(crate::format::GuestOffset(offset), head),
            Backing::Raw { storage, .. } => Ok(storage.read_padded(offset, head)?),
        }
    }
}

/// An image's opened dependencies.
#[derive(Debug)]
pub(crate) struct Chain {
    /// Where guest data lives: the external data file, or the image file itself.
    pub data: Arc<dyn Storage>,
    /// The backing disk, if any.
    pub backing: Option<Backing>,
    /// Locks on the data file and a raw backing file (a qcow2 backing image holds its own),
    /// for as long as the chain is open.
    _locks: Vec<FileLock>,
}

/// Resolves `name` (from an image's header) against the folder of `image`, as QEMU does.
pub(crate) fn resolve(image: Option<&Path>, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.and_then(Path::parent) {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Whether `name` uses a protocol prefix (`nbd:`, `json:`, `https://`...) rather than naming a
/// file: QEMU treats a colon before any slash that way.
pub(crate) fn is_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

impl Image {
    /// Opens (and locks) the backing chain and data file now rather than at the first guest
    /// read, so that a missing or locked file is reported at once (a writable image did so at
    /// open already); a server does this before it accepts a client, as qemu-nbd does.
    pub fn open_backing_chain(&self) -> Result<(), ImageError> {
        self.chain().map(|_| ())
    }

    /// The opened chain, opening it on first use.
    pub(in crate::image) fn chain(&self) -> Result<Arc<Chain>, ImageError> {
        let mut slot = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(chain) = slot.as_ref() {
            return Ok(Arc::clone(chain));
        }
        let mut visited = Vec::new();
        if let Some(p) = &self.path {
            visited.push(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
        }
        let chain = Arc::new(self.open_chain(&mut visited)?);
        *slot = Some(Arc::clone(&chain));
        Ok(chain)
    }

    /// Opens the data file and the whole backing chain; `visited` holds the canonical paths of
    /// the images above (and including) this one.
    fn open_chain(&self, visited: &mut Vec<PathBuf>) -> Result<Chain, ImageError> {
        let header = &self.scanned.header;
        let mut locks = Vec::new();
        let data: Arc<dyn Storage> = if header.has_external_data_file() {
            let name = header.data_file().ok_or_else(|| {
                ImageError::Unsupported("'data-file' is required for this image".into())
            })?;
            let path = PathBuf::from(name);
            let shown = path.display().to_string();
            let file = FileStorage::open(&path, self.options.writable)
                .map_err(|e| ImageError::Io(e).in_file(&shown))?
                .with_cache(self.options.cache);
            let set = match (self.options.writable, self.options.force_share) {
                (true, _) => LockSet::DATA_FILE_WRITABLE,
                (false, false) => LockSet::DATA_FILE_READ_ONLY,
                (false, true) => LockSet::FORCE_SHARE,
            };
            locks.extend(self.lock_file(&file, &shown, set)?);
            Arc::new(file)
        } else {
            Arc::clone(&self.storage)
        };
        let backing = match (&header.backing_file, &self.options.backing) {
            (None, _) | (Some(_), BackingChain::None) => None,
            (Some(name), BackingChain::Above(base))
                if std::fs::canonicalize(resolve(self.path.as_deref(), name))
                    .ok()
                    .as_ref()
                    == Some(base) =>
            {
                None
            }
            (Some(name), _) => Some(self.open_backing(name, visited, &mut locks)?),
        };
        Ok(Chain {
            data,
            backing,
            _locks: locks,
        })
    }

    /// Takes this image's kind of lock on a file of its chain (none under `locking=off`).
    fn lock_file(
        &self,
        file: &FileStorage,
        shown: &str,
        set: LockSet,
    ) -> Result<Option<FileLock>, ImageError> {
        FileLock::for_mode(file.file(), shown, set, self.options.locking)
            .map_err(|e| ImageError::Lock(e).in_file(shown))
    }

    /// Opens a backing file: locked as QEMU locks one (read-only: readers may share it, writers
    /// may not; everything shared under force-share), whatever this image's own access.
    fn open_backing(
        &self,
        name: &str,
        visited: &mut Vec<PathBuf>,
        locks: &mut Vec<FileLock>,
    ) -> Result<Backing, ImageError> {
        if is_protocol(name) {
            return Err(ImageError::Unsupported(format!(
                "Backing file '{name}' uses a protocol; only files are supported"
            )));
        }
        let path = resolve(self.path.as_deref(), name);
        let shown = path.display().to_string();
        let canonical =
            std::fs::canonicalize(&path).map_err(|e| ImageError::Io(e).in_file(&shown))?;
        if visited.contains(&canonical) {
            let mut names: Vec<String> = visited.iter().map(|p| p.display().to_string()).collect();
            names.push(canonical.display().to_string());
            return Err(ImageError::BackingLoop(names.join(" -> ")));
        }
        let file =
            FileStorage::open(&path, false).map_err(|e| ImageError::Io(e).in_file(&shown))?;
        let set = LockSet::for_read(false, self.options.force_share);
        let lock = FileLock::for_mode(file.file(), &shown, set, self.options.locking)
            .map_err(|e| ImageError::Lock(e.in_backing_file()).in_file(&shown))?;
        let storage = Arc::new(file);
        let format = match self.scanned.header.backing_format() {
            Some(f) => f.to_string(),
            None => probe(storage.as_ref()).map_err(|e| e.in_file(&shown))?,
        };
        match format.as_str() {
            "raw" => {
                // QEMU measures disks in 512-byte sectors: a raw file of odd length is a disk
                // rounded up to the next sector, the tail reading as zeros.
                let size = storage.len()?.div_ceil(512) * 512;
                locks.extend(lock);
                Ok(Backing::Raw { storage, size })
            }
            "qcow2" => {
                visited.push(canonical);
                // A backing image is only read: no map, no writer, the same cache budget.
                let options = OpenOptions {
                    enabled: MetadataType::empty(),
                    cache_size: self.options.cache_size,
                    locking: self.options.locking,
                    force_share: self.options.force_share,
                    backing: self.options.backing.clone(),
                    ..OpenOptions::default()
                };
                let mut image =
                    Image::from_storage(storage, options).map_err(|e| e.in_file(&shown))?;
                image.path = Some(path);
                image.lock = lock;
                let chain = image.open_chain(visited)?;
                *image.chain.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(chain));
                visited.pop();
                Ok(Backing::Qcow2(Box::new(image)))
            }
            other => Err(ImageError::Unsupported(format!(
                "Backing file format '{other}' is not supported (only qcow2 and raw)"
            ))
            .in_file(&shown)),
        }
    }
}

/// Guesses a backing file's format from its first bytes, as QEMU does without a backing format:
/// the qcow2 magic with version 2 or 3 is qcow2; other known image magics are refused; anything
/// else is raw.
pub(crate) fn probe(storage: &dyn Storage) -> Result<String, ImageError> {
    let mut head = [0u8; 8];
    storage.read_padded(0, &mut head)?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if magic == QCOW2_MAGIC {
        return match version {
            2 | 3 => Ok("qcow2".into()),
            _ => Err(ImageError::Unsupported(
                "the backing file is in the older qcow format (version 1), not qcow2".into(),
            )),
        };
    }
    let other = [
        (&b"KDMV"[..], "vmdk"),
        (&b"conectix"[..], "vpc"),
        (&b"LUKS\xba\xbe"[..], "luks"),
        (&b"vhdxfile"[..], "vhdx"),
    ];
    for (m, name) in other {
        if head.starts_with(m) {
            return Err(ImageError::Unsupported(format!(
                "Backing file format '{name}' is not supported (only qcow2 and raw)"
            )));
        }
    }
    Ok("raw".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_against_the_image_folder() {
        let img = Path::new("/images/top.qcow2");
        assert_eq!(
            resolve(Some(img), "base.raw"),
            Path::new("/images/base.raw")
        );
        assert_eq!(
            resolve(Some(img), "../b/base"),
            Path::new("/images/../b/base")
        );
        assert_eq!(resolve(Some(img), "/abs/base"), Path::new("/abs/base"));
        assert_eq!(resolve(None, "rel"), Path::new("rel"));
        assert!(is_protocol("nbd://host/x"));
        assert!(is_protocol("json:{}"));
        assert!(!is_protocol("dir/with:colon"));
        assert!(!is_protocol("plain"));
    }
}
