//! Images held by Python file objects (`qcow2ovl.open(fileobj)`).
//!
//! Two ways in, chosen by the Python layer:
//!
//! - [`open_image_fd`]: the object has a `fileno()` that is a regular file or block device. The
//!   descriptor is duplicated and read with `pread` like any image file, without the GIL: the
//!   fast path of real files is kept. The duplicate shares the object's open file description
//!   (its access mode), never its cursor (`pread`/`pwrite` do not move it).
//! - [`open_image_fileobj`]: anything else that is seekable (`io.BytesIO`, a member of a zip
//!   or tar archive, a forensic container's stream). [`PyFileStorage`] calls the object's
//!   `seek`/`read`/`write`/`flush`/`truncate` with the GIL held, one call sequence at a time.
//!
//! Either way there is no path: backing files and external data files named in the image
//! resolve against the current directory.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::PyBytes;

use super::errors::image_err;
use super::image::PyImage;
use crate::image::{Image, ImageError};
use crate::storage::{FileStorage, Storage};

/// A [`Storage`] over a Python binary file object, called with the GIL held.
#[derive(Debug)]
pub(crate) struct PyFileStorage {
    file: Py<PyAny>,
    writable: bool,
    /// Serializes each seek-then-read (or write) sequence: the object has one cursor. Waited
    /// for with the GIL released, so a thread inside the object's methods (which may release
    /// the GIL) can always finish.
    cursor: Mutex<()>,
}

impl PyFileStorage {
    /// Wraps `file`; writes are refused unless `writable`.
    pub(crate) fn new(file: Py<PyAny>, writable: bool) -> Self {
        PyFileStorage {
            file,
            writable,
            cursor: Mutex::new(()),
        }
    }

    /// Runs `f` on the object with the GIL and the cursor lock held; a Python exception becomes
    /// an I/O error (with its errno when it is an `OSError` that has one).
    fn call<R>(&self, f: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<R>) -> io::Result<R> {
        Python::attach(|py| {
            let _cursor = self
                .cursor
                .lock_py_attached(py)
                .unwrap_or_else(|e| e.into_inner());
            f(self.file.bind(py)).map_err(|e| io_error(py, &e))
        })
    }
}

/// A Python exception as an I/O error: an `OSError`'s errno is kept (`ENOSPC` stays
/// `ENOSPC`), anything else becomes an error carrying its text.
fn io_error(py: Python<'_>, e: &PyErr) -> io::Error {
    if e.is_instance_of::<PyOSError>(py) {
        let errno = e
            .value(py)
            .getattr("errno")
            .and_then(|n| n.extract::<i32>());
        if let Ok(errno) = errno {
            return io::Error::from_raw_os_error(errno);
        }
    }
    io::Error::other(format!("file object: {e}"))
}

/// Fills `buf` with `read()` calls from the current position; returns the bytes read (fewer
/// only at the end of the file).
fn read_into(f: &Bound<'_, PyAny>, buf: &mut [u8]) -> PyResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        let chunk = f.call_method1("read", (buf.len() - done,))?;
        let chunk = chunk
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("the file object's read() must return bytes"))?;
        let bytes = chunk.as_bytes();
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len().min(buf.len() - done);
        buf[done..done + n].copy_from_slice(&bytes[..n]);
        done += n;
    }
    Ok(done)
}

/// Writes all of `data` with `write()` calls from the current position.
fn write_all(f: &Bound<'_, PyAny>, data: &[u8]) -> PyResult<()> {
    let py = f.py();
    let mut done = 0;
    while done < data.len() {
        let n = f.call_method1("write", (PyBytes::new(py, &data[done..]),))?;
        // Raw files may write less (or nothing, returning None, when they would block).
        let n = if n.is_none() {
            0
        } else {
            n.extract::<usize>()?
        };
        if n == 0 {
            return Err(PyOSError::new_err(
                "the file object's write() wrote nothing",
            ));
        }
        done += n;
    }
    Ok(())
}

/// The object's size: where a seek to its end lands.
fn end_of(f: &Bound<'_, PyAny>) -> PyResult<u64> {
    f.call_method1("seek", (0, 2))?.extract()
}

/// The error for a write to a file object opened read-only.
fn read_only_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

impl Storage for PyFileStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (done, size) = self.call(|f| {
            f.call_method1("seek", (offset,))?;
            let done = read_into(f, buf)?;
            let size = if done < buf.len() { end_of(f)? } else { 0 };
            Ok((done, size))
        })?;
        if done < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at offset {offset} runs past the end ({size} bytes)",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        self.call(|f| {
            f.call_method1("seek", (offset,))?;
            write_all(f, buf)
        })
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.call(|f| f.call_method0("flush").map(drop))
    }

    fn len(&self) -> io::Result<u64> {
        self.call(end_of)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        self.call(|f| {
            let end = end_of(f)?;
            if len < end {
                f.call_method1("truncate", (len,))?;
            } else if len > end {
                // `truncate` does not extend every kind of object (io.BytesIO); a byte at the
                // new end does, and the gap reads as zeros.
                f.call_method1("seek", (len - 1,))?;
                write_all(f, &[0])?;
            }
            Ok(())
        })
    }
}

/// Opens the image in a Python binary file object without a usable `fileno()` (see the
/// module documentation); `name` names it in errors.
#[pyfunction]
#[pyo3(signature = (file, name, *, writable = false, enabled = None, map_memory_limit = None, cache_size = None, snapshot = None, locking = "auto", force_share = false, secret = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_image_fileobj(
    py: Python<'_>,
    file: Py<PyAny>,
    name: String,
    writable: bool,
    enabled: Option<&Bound<'_, PyAny>>,
    map_memory_limit: Option<&Bound<'_, PyAny>>,
    cache_size: Option<&Bound<'_, PyAny>>,
    snapshot: Option<String>,
    locking: &str,
    force_share: bool,
    secret: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyImage> {
    let options = super::image::open_options(
        writable,
        enabled,
        map_memory_limit,
        cache_size,
        snapshot,
        locking,
        force_share,
        secret,
    )?;
    let storage = Arc::new(PyFileStorage::new(file, writable));
    let image = py
        .detach(|| Image::from_storage(storage, options))
        .map_err(|e| image_err(e.in_file(&name)))?;
    Ok(PyImage::new(py, image, Some(name)))
}

/// Opens the image in the regular file or block device behind descriptor `fd` (a file
/// object's `fileno()`), through a duplicate of it read with `pread` (see the module
/// documentation); `name` names it in errors. A writable open needs a descriptor open for
/// writing and not in append mode (which would send every write to the end).
#[pyfunction]
#[pyo3(signature = (fd, name, *, writable = false, enabled = None, map_memory_limit = None, cache_size = None, snapshot = None, locking = "auto", force_share = false, secret = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_image_fd(
    py: Python<'_>,
    fd: i32,
    name: String,
    writable: bool,
    enabled: Option<&Bound<'_, PyAny>>,
    map_memory_limit: Option<&Bound<'_, PyAny>>,
    cache_size: Option<&Bound<'_, PyAny>>,
    snapshot: Option<String>,
    locking: &str,
    force_share: bool,
    secret: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyImage> {
    let options = super::image::open_options(
        writable,
        enabled,
        map_memory_limit,
        cache_size,
        snapshot,
        locking,
        force_share,
        secret,
    )?;
    let storage = duplicate(fd, writable).map_err(|e| image_err(e.in_file(&name)))?;
    // Locked as a path is: the duplicate shares the caller's open file description.
    let image = py
        .detach(|| Image::from_file_storage(storage, &name, options))
        .map_err(|e| image_err(e.in_file(&name)))?;
    Ok(PyImage::new(py, image, Some(name)))
}

/// A checked duplicate of `fd` (see [`FileStorage::duplicate_fd`]).
fn duplicate(fd: i32, writable: bool) -> Result<FileStorage, ImageError> {
    if fd < 0 {
        return Err(ImageError::Io(io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: the descriptor belongs to a file object the caller holds for this whole call;
    // it is only duplicated here (the duplicate is ours), never closed or used after.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    FileStorage::duplicate_fd(borrowed, writable).map_err(|e| {
        // The descriptor's mode does not allow what was asked (a `ValueError`).
        if e.kind() == io::ErrorKind::InvalidInput && e.raw_os_error().is_none() {
            ImageError::InvalidArgument(e.to_string())
        } else {
            ImageError::Io(e)
        }
    })
}
