//! The one place where core errors become Python exceptions, by kind.

use pyo3::exceptions::{PyMemoryError, PyOSError, PyValueError};
use pyo3::PyErr;

use crate::image::{ErrorKind, ImageError};

pyo3::import_exception!(qcow2ovl.errors, FormatError);
pyo3::import_exception!(qcow2ovl.errors, UnsupportedError);
pyo3::import_exception!(qcow2ovl.errors, CorruptImageError);
pyo3::import_exception!(qcow2ovl.errors, MetadataOverlapError);
pyo3::import_exception!(qcow2ovl.errors, LockError);
pyo3::import_exception!(qcow2ovl.errors, InconsistentImageError);
pyo3::import_exception!(qcow2ovl.errors, ReadOnlyImageError);
pyo3::import_exception!(qcow2ovl.errors, SnapshotNotFoundError);
pyo3::import_exception!(qcow2ovl.errors, BitmapError);
pyo3::import_exception!(qcow2ovl.errors, EncryptionError);
/// [`image_err`] for an error met while using an open image named `name`: errors from the disk
/// and refused writes name the image's file (`OSError.filename`) unless they name one already
/// (a backing file's).
pub(crate) fn image_err_in(e: ImageError, name: Option<&str>) -> PyErr {
    match (name, e.kind()) {
        (Some(name), ErrorKind::Os(_) | ErrorKind::Corruption | ErrorKind::ReadOnly) => {
            image_err(e.in_file(name))
        }
        _ => image_err(e),
    }
}

/// Maps an image error to its Python exception: `FormatError`, `UnsupportedError`,
/// `CorruptImageError`, `LockError`, `ReadOnlyImageError`, `SnapshotNotFoundError`,
/// `BitmapError`, `EncryptionError`, `ValueError`,
/// `MemoryError`, or `OSError` with the errno (Python picks
/// the subclass: `FileNotFoundError`, `IsADirectoryError`, ...) and the file name.
pub(crate) fn image_err(e: ImageError) -> PyErr {
    let kind = e.kind();
    match kind {
        ErrorKind::Format => FormatError::new_err(e.to_string()),
        ErrorKind::Unsupported => UnsupportedError::new_err(e.to_string()),
        ErrorKind::CorruptImage => CorruptImageError::new_err(e.to_string()),
        ErrorKind::MetadataOverlap => {
            let mut inner = &e;
            while let ImageError::File { source, .. } = inner {
                inner = source;
            }
            match inner {
                ImageError::MetadataOverlap {
                    message,
                    offset,
                    size,
                    types,
                } => MetadataOverlapError::new_err((message.clone(), types.bits(), *offset, *size)),
                // `kind()` says MetadataOverlap only for that variant.
                other => InconsistentImageError::new_err((libc::EIO, other.to_string())),
            }
        }
        ErrorKind::Lock => {
            let path = e.lock_error().and_then(|l| l.path()).unwrap_or_default();
            LockError::new_err((e.message(), path.to_string()))
        }
        ErrorKind::InvalidArgument => PyValueError::new_err(e.message()),
        ErrorKind::SnapshotNotFound => SnapshotNotFoundError::new_err(e.message()),
        ErrorKind::Bitmap => BitmapError::new_err(e.message()),
        ErrorKind::Encryption => EncryptionError::new_err(e.to_string()),
        ErrorKind::ReadOnly => match e.path() {
            Some(path) => ReadOnlyImageError::new_err((libc::EBADF, e.message(), path.to_string())),
            None => ReadOnlyImageError::new_err((libc::EBADF, e.message())),
        },
        ErrorKind::OutOfMemory => PyMemoryError::new_err(e.to_string()),
        ErrorKind::Corruption => match e.path() {
            Some(path) => {
                InconsistentImageError::new_err((libc::EIO, e.message(), path.to_string()))
            }
            None => InconsistentImageError::new_err((libc::EIO, e.message())),
        },
        ErrorKind::Os(_) => {
            let errno = match kind {
                ErrorKind::Os(n) => n,
                _ => libc::EIO,
            };
            match e.path() {
                Some(path) => PyOSError::new_err((errno, e.message(), path.to_string())),
                None => PyOSError::new_err((errno, e.message())),
            }
        }
    }
}
