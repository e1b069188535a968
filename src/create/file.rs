//! Creating the files of a new image: opened, locked as QEMU locks a file it creates, emptied
//! only once locked, reserved (`falloc`), written, and removed again on failure.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::lock::{FileLock, LockSet, Locking};
use crate::storage::{FileStorage, Storage};

use super::options::*;
use super::plan::*;
use super::write::*;

/// Reserves `[offset, offset + len)` of `file` with `posix_fallocate`.
fn fallocate(file: &File, offset: u64, len: u64, path: &str) -> Result<(), CreateError> {
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let too_big =
        || CreateError::io("could not preallocate", path)(io::ErrorKind::InvalidInput.into());
    let off = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let n = libc::off_t::try_from(len).map_err(|_| too_big())?;
    // SAFETY: the descriptor is open for the lifetime of `file`; posix_fallocate touches no
    // memory of ours.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, n) };
    if rc != 0 {
        return Err(CreateError::io("could not preallocate", path)(
            io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// A file opened for creation, locked as QEMU locks a file it creates.
struct NewFile {
    file: File,
    /// Whether this call made the file (and so may remove it again on failure).
    created: bool,
    _lock: Option<FileLock>,
}

/// Opens a file for creation: refuses an existing one unless `overwrite`. An existing file is
/// opened without truncation, locked (write and resize held, resize not shared: refused while
/// any other process has the image open for writing or reading), and only then emptied, so a
/// file that someone else holds is left byte for byte as it was.
fn open_new(path: &Path, overwrite: bool, locking: Locking) -> Result<NewFile, CreateError> {
    let shown = path.to_string_lossy().into_owned();
    let mut o = OpenOptions::new();
    o.read(true).write(true).create_new(true);
    let (file, created) = match o.open(path) {
        Ok(f) => (f, true),
        Err(e) if overwrite && e.kind() == io::ErrorKind::AlreadyExists => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(CreateError::io("could not create", &shown))?;
            (f, false)
        }
        Err(e) => return Err(CreateError::io("could not create", &shown)(e)),
    };
    let lock = match FileLock::for_mode(&file, &shown, LockSet::CREATE, locking) {
        Ok(lock) => lock,
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            return Err(CreateError::Lock(e));
        }
    };
    if !created {
        file.set_len(0)
            .map_err(CreateError::io("could not truncate", &shown))?;
    }
    Ok(NewFile {
        file,
        created,
        _lock: lock,
    })
}

/// Creates the image at `path` and its external data file. Refuses an existing image or data
/// file unless `overwrite`, and a file another process holds (QEMU's locks, as `locking` says)
/// in every case. On failure nothing that this call created is left behind.
///
/// A relative data file name is used as given, relative to the working directory: QEMU (10.0)
/// creates the data file there and also looks for it there when it opens the image (unlike a
/// backing file, which it looks for next to the image).
pub fn create_file(
    path: &Path,
    opts: &CreateOptions,
    overwrite: bool,
    locking: Locking,
) -> Result<(), CreateError> {
    let plan = plan(opts)?;
    let shown = path.to_string_lossy().into_owned();
    let image_new = open_new(path, overwrite, locking)?;
    let data_path = opts.data_file.as_deref().map(PathBuf::from);
    let data_new = match &data_path {
        Some(p) => match open_new(p, overwrite, locking) {
            Ok(f) => Some(f),
            Err(e) => {
                if image_new.created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        },
        None => None,
    };
    let image_file = &image_new.file;
    let data_file = data_new.as_ref().map(|n| &n.file);
    let result = (|| {
        let image_clone = image_file
            .try_clone()
            .map_err(CreateError::io("could not open", &shown))?;
        let image = FileStorage::from_file(image_clone, true);
        let data = match data_file {
            Some(f) => Some(FileStorage::from_file(
                f.try_clone()
                    .map_err(CreateError::io("could not open", &shown))?,
                true,
            )),
            None => None,
        };
        if plan.preallocation == Preallocation::Falloc {
            // Reserve first, so that a full disk fails before anything is written.
            if let Some((start, len)) = plan.contiguous_data_range() {
                fallocate(image_file, start.0, len, &shown)?;
            }
            if let (Some(f), Some(len)) = (data_file, plan.data_file_len) {
                fallocate(f, 0, len, &shown)?;
            }
        }
        write_image(&plan, &image, data.as_ref().map(|d| d as &dyn Storage))
    })();
    if result.is_err() {
        // The files were emptied (or made) by this call: what is there now is half an image.
        let _ = std::fs::remove_file(path);
        if let Some(p) = &data_path {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}
