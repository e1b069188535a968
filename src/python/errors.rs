//! The one place where core errors become Python exceptions, by kind.

use pyo3::exceptions::{PyMemoryError, PyOSError, PyValueError};
use pyo3::PyErr;

use crate::image::{ErrorKind, ImageError};

pyo3::import_exception!(qcow2ovl.errors, FormatError);
pyo3::import_exception!(qcow2ovl.errors, UnsupportedError);
pyo3::import_exception!(qcow2ovl.errors, CorruptImageError);
pyo3::import_exception!(qcow2ovl.errors, MetadataOverlapError);
pyo3::import_exception!(qcow2ovl.errors, LockError);

/// Maps an image error to its Python exception: `FormatError`, `UnsupportedError`,
/// `CorruptImageError`, `LockError`, `ValueError`, `MemoryError`, or `OSError` with the errno (Python picks
/// the subclass: `FileNotFoundError`, `IsADirectoryError`, ...) and the file name.
pub(crate) fn image_err(e: ImageError) -> PyErr {
    let kind = e.kind();
    match kind {
        ErrorKind::Format => FormatError::new_err(e.to_string()),
        ErrorKind::Unsupported => UnsupportedError::new_err(e.to_string()),
        ErrorKind::CorruptImage => CorruptImageError::new_err(e.to_string()),
        ErrorKind::MetadataOverlap => match &e {
            ImageError::MetadataOverlap {
                message,
                offset,
                size,
                types,
            } => MetadataOverlapError::new_err((message.clone(), types.bits(), *offset, *size)),
            other => MetadataOverlapError::new_err((other.to_string(), 0u16, 0u64, 0u64)),
        },
        ErrorKind::Lock => {
            let path = e.lock_error().and_then(|l| l.path()).unwrap_or_default();
            LockError::new_err((e.message(), path.to_string()))
        }
        ErrorKind::InvalidArgument => PyValueError::new_err(e.message()),
        ErrorKind::OutOfMemory => PyMemoryError::new_err(e.to_string()),
        ErrorKind::Corruption | ErrorKind::Os(_) => {
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
