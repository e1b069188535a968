//! `qcow2ovl._core.Image`: the Rust image behind `qcow2ovl.open()`.
//!
//! Thread safety: the image sits behind a read-write lock as an `Arc`. Every method takes the
//! read lock only long enough to clone the `Arc`, then releases the GIL for its I/O; `close()`
//! takes the write lock to drop the handle's reference. So methods from many threads run in
//! parallel, `close()` from any thread (any number of times) is safe, and a method called after
//! `close()` raises `ValueError`. A read already in flight when another thread closes the image
//! finishes on its own reference.
//!
//! `close()` flushes before it lets go: when the flush fails (a full disk), the handle stays
//! open with every change not yet on disk, so the caller can free space and call `close()` (or
//! `flush()`) again.
//!
//! Notes the engine leaves (a repair at open, autoclear bits dropped) are logged on the
//! `qcow2ovl` logger after each call, with the GIL held.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::args::{limit_obj, range_obj, types_obj, types_to_py, u64_obj};
use super::errors::{image_err, image_err_in};
use super::extents::PyExtentList;
use super::facts;
use crate::format::{GuestOffset, HostOffset};
use crate::image::{Image, ImageError, NoteLevel, OpenOptions, Secret};
use crate::lock::Locking;
use crate::storage::CacheMode;

/// An open qcow2 image (the Rust side of `qcow2ovl.Image`).
/// A list of records as `(field names, rows)`: `qcow2ovl.records.from_rows` checks the names
/// against the Python record's fields before it builds the records from the rows.
type Rows<R> = (&'static [&'static str], Vec<R>);

/// One row of `problems()`, in `qcow2ovl.records.Problem`'s field order.
type ProblemRow = (&'static str, u64, u64, String);
const PROBLEM_FIELDS: &[&str] = &["kind", "offset", "size", "message"];

/// One row of `guest_map()`, in `qcow2ovl.records.GuestExtent`'s field order.
type ExtentRow = (u64, u64, u32, bool, bool, bool, bool, Option<u64>);
/// A guest map entry as a row of [`EXTENT_FIELDS`].
fn extent_row(e: crate::image::GuestExtent) -> ExtentRow {
    let (start, length, depth, offset) = (e.start, e.length, e.depth, e.offset);
    (
        start,
        length,
        depth,
        e.present,
        e.zero,
        e.data,
        e.compressed,
        offset,
    )
}

const EXTENT_FIELDS: &[&str] = &[
    "start",
    "length",
    "depth",
    "present",
    "zero",
    "data",
    "compressed",
    "offset",
];

#[pyclass(name = "Image", module = "qcow2ovl._core")]
pub(crate) struct PyImage {
    inner: RwLock<Option<Arc<Image>>>,
    /// The name errors give as the file (the path, or a file object's name).
    name: Option<String>,
}

impl PyImage {
    /// Wraps an opened image; `name` (else the image's path) names the file in errors.
    /// Logs what the open did on its own (a repair).
    pub(super) fn new(py: Python<'_>, image: Image, name: Option<String>) -> Self {
        let name = name.or_else(|| image.path().map(|p| p.display().to_string()));
        let this = PyImage {
            inner: RwLock::new(Some(Arc::new(image))),
            name,
        };
        if let Ok(img) = this.image() {
            this.log_notes(py, &img);
        }
        this
    }

    /// The Python exception for an error of this image (naming its file).
    fn err(&self, e: ImageError) -> PyErr {
        image_err_in(e, self.name.as_deref())
    }

    /// Logs the engine's notes on the `qcow2ovl` logger, as `"<file>: <message>"`. Best
    /// effort: a logging failure never hides the result of the call.
    fn log_notes(&self, py: Python<'_>, img: &Image) {
        let notes = img.take_notes();
        if notes.is_empty() {
            return;
        }
        let logged = (|| -> PyResult<()> {
            let logger = py
                .import("logging")?
                .call_method1("getLogger", ("qcow2ovl",))?;
            let name = self.name.as_deref().unwrap_or("<image>");
            for n in notes {
                let level = match n.level {
                    NoteLevel::Debug => 10,
                    NoteLevel::Info => 20,
                    NoteLevel::Warning => 30,
                };
                logger.call_method1("log", (level, "%s: %s", name, n.message))?;
            }
            Ok(())
        })();
        drop(logged);
    }

    pub(super) fn image(&self) -> PyResult<Arc<Image>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Arc::clone)
            .ok_or_else(|| PyValueError::new_err("I/O operation on a closed image"))
    }

    /// Runs `op` on the open image without the GIL; its error becomes a Python exception.
    pub(super) fn detached<R: Send>(
        &self,
        py: Python<'_>,
        op: impl FnOnce(&Image) -> Result<R, ImageError> + Send,
    ) -> PyResult<R> {
        let img = self.image()?;
        let result = py.detach(|| op(&img));
        self.log_notes(py, &img);
        result.map_err(|e| self.err(e))
    }

    /// Runs a snapshot operation without the GIL; returns the entry it names as a dict.
    fn snapshot_op<'py>(
        &self,
        py: Python<'py>,
        op: impl FnOnce(&Image) -> Result<crate::format::SnapshotEntry, ImageError> + Send,
    ) -> PyResult<Bound<'py, PyDict>> {
        let entry = self.detached(py, op)?;
        facts::snapshot_dict(py, &entry)
    }
}

/// Opens an image (see `qcow2ovl.open`).
#[pyfunction]
#[pyo3(signature = (
    path, *, writable = false, enabled = None, map_memory_limit = None, cache_size = None,
    snapshot = None, locking = "auto", force_share = false, metadata_only = false,
    cache_mode = "writeback", secret = None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_image(
    py: Python<'_>,
    path: PathBuf,
    writable: bool,
    enabled: Option<&Bound<'_, PyAny>>,
    map_memory_limit: Option<&Bound<'_, PyAny>>,
    cache_size: Option<&Bound<'_, PyAny>>,
    snapshot: Option<String>,
    locking: &str,
    force_share: bool,
    metadata_only: bool,
    cache_mode: &str,
    secret: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyImage> {
    let options = OpenOptions {
        metadata_only,
        cache: cache_mode_arg(cache_mode)?,
        ..open_options(
            writable,
            enabled,
            map_memory_limit,
            cache_size,
            snapshot,
            locking,
            force_share,
            secret,
        )?
    };
    let image = py
        .detach(|| Image::open(&path, options))
        .map_err(image_err)?;
    Ok(PyImage::new(py, image, None))
}

/// Open options from the arguments every open function takes.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_options(
    writable: bool,
    enabled: Option<&Bound<'_, PyAny>>,
    map_memory_limit: Option<&Bound<'_, PyAny>>,
    cache_size: Option<&Bound<'_, PyAny>>,
    snapshot: Option<String>,
    locking: &str,
    force_share: bool,
    secret: Option<&Bound<'_, PyAny>>,
) -> PyResult<OpenOptions> {
    let options = OpenOptions {
        secret: secret.map(secret_arg).transpose()?,
        writable,
        locking: locking_arg(locking)?,
        force_share,
        enabled: match enabled {
            Some(e) => types_obj("enabled", e)?,
            None => crate::overlap::MetadataType::all(),
        },
        map_limit: limit_obj("map_memory_limit", map_memory_limit)?,
        cache_size: limit_obj("cache_size", cache_size)?.map(|v| v as u64),
        snapshot,
        ..OpenOptions::default()
    };
    // Refused before the file is touched, in QEMU's words.
    options.lock_set().map_err(image_err)?;
    Ok(options)
}

/// The secret of an encrypted image from a `str` (its UTF-8 bytes, as QEMU's `data=` takes
/// it) or a bytes-like object; its value never appears in an error.
pub(crate) fn secret_arg(secret: &Bound<'_, PyAny>) -> PyResult<Secret> {
    if let Ok(text) = secret.extract::<String>() {
        return Ok(Secret::new(text.into_bytes()));
    }
    match secret.extract::<Vec<u8>>() {
        Ok(bytes) if !secret.is_instance_of::<pyo3::types::PyList>() => Ok(Secret::new(bytes)),
        _ => Err(PyTypeError::new_err(format!(
            "secret must be str or bytes, not {}",
            secret.get_type().name()?
        ))),
    }
}

/// The cache mode for one of QEMU's `cache=` names; anything else is QEMU's error.
pub(crate) fn cache_mode_arg(name: &str) -> PyResult<CacheMode> {
    CacheMode::parse(name).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The `locking` mode for `"auto"`, `"on"` or `"off"`; anything else is QEMU's error.
pub(crate) fn locking_arg(mode: &str) -> PyResult<Locking> {
    mode.parse::<Locking>().map_err(PyValueError::new_err)
}

/// What opening with `locking=mode` on this system should tell the user, once (`None`: nothing).
#[pyfunction]
pub(crate) fn locking_notice(mode: &str) -> PyResult<Option<&'static str>> {
    Ok(crate::lock::plan(locking_arg(mode)?, crate::lock::ofd_available()).1)
}

#[pymethods]
impl PyImage {
    /// The `encrypt` object of `qemu-img info --output=json` for a LUKS image (QEMU's keys, in
    /// its order), or None when the image is not LUKS-encrypted. A bad header is refused in
    /// QEMU's words, after the file's name.
    fn luks_info<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let found = self.image()?.luks_info();
        let found = match (found, self.name.as_deref()) {
            (Err(e), Some(name)) => return Err(image_err(e.in_file(name))),
            (found, _) => found.map_err(image_err)?,
        };
        found.map(|i| facts::luks_info_dict(py, &i)).transpose()
    }

    /// Header facts as a dict (the Python layer turns it into `ImageInfo`).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        facts::info_dict(py, &*self.image()?)
    }

    /// The snapshot list as dicts (as it is now).
    fn snapshots<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.image()?
            .snapshots()
            .iter()
            .map(|s| facts::snapshot_dict(py, s))
            .collect()
    }

    /// Creates an internal snapshot of the active disk; returns its entry as a dict.
    #[pyo3(signature = (name, id = None, vm_state_size = None))]
    fn create_snapshot<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        id: Option<&str>,
        vm_state_size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let vm_state_size = match vm_state_size {
            Some(v) => u64_obj("vm_state_size", v)?,
            None => 0,
        };
        self.snapshot_op(py, |img| img.create_snapshot(name, id, vm_state_size))
    }

    /// Deletes the snapshot with this id (else name); returns its entry as a dict.
    fn delete_snapshot<'py>(
        &self,
        py: Python<'py>,
        name_or_id: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.snapshot_op(py, |img| img.delete_snapshot(name_or_id))
    }

    /// Reverts the active disk to the snapshot with this id (else name); returns its entry.
    fn apply_snapshot<'py>(
        &self,
        py: Python<'py>,
        name_or_id: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.snapshot_op(py, |img| img.apply_snapshot(name_or_id))
    }

    /// The persistent bitmaps as they are now, as dicts (`flags` has `in_use` for an
    /// inconsistent bitmap only).
    fn bitmaps<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.image()?
            .bitmap_list()
            .iter()
            .map(|(b, _)| {
                let d = PyDict::new(py);
                d.set_item("name", &b.name)?;
                d.set_item("granularity", 1u64 << b.granularity_bits.min(63))?;
                d.set_item("flags", b.flags)?;
                d.set_item("table_offset", b.table_offset)?;
                d.set_item("table_size", b.table_size)?;
                Ok(d)
            })
            .collect()
    }

    #[pyo3(signature = (offset, size, ignore = None))]
    fn check_overlap<'py>(
        &self,
        py: Python<'py>,
        offset: &Bound<'py, PyAny>,
        size: &Bound<'py, PyAny>,
        ignore: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (offset, size) = range_obj(offset, size)?;
        let ignore = match ignore {
            Some(i) => types_obj("ignore", i)?,
            None => crate::overlap::MetadataType::empty(),
        };
        let img = self.image()?;
        let t = py
            .detach(|| img.check_overlap(HostOffset(offset), size, ignore))
            .map_err(image_err)?;
        types_to_py(py, t)
    }

    /// Every metadata extent, as a compact sequence of `(offset, length, types)`.
    fn metadata_extents(&self) -> PyResult<PyExtentList> {
        Ok(PyExtentList::new(self.image()?.map().extents()))
    }

    fn map_memory_usage(&self) -> PyResult<usize> {
        Ok(self.image()?.map().memory_usage())
    }

    fn unchecked_ranges(&self) -> PyResult<Vec<(u64, u64)>> {
        Ok(self.image()?.map().unchecked_ranges())
    }

    fn enabled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        types_to_py(py, self.image()?.map().enabled())
    }

    /// The problems found by the scan as `(PROBLEM_FIELDS, rows)`, and their total count.
    fn problems(&self) -> PyResult<(Rows<ProblemRow>, usize)> {
        let img = self.image()?;
        let (list, count) = img.problems();
        let rows = list
            .iter()
            .map(|p| (p.kind_name(), p.offset.0, p.size, p.message.clone()))
            .collect();
        Ok(((PROBLEM_FIELDS, rows), count))
    }

    /// Guest bytes `[offset, offset + length)` as `bytes`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: &Bound<'py, PyAny>,
        length: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (offset, length) = (u64_obj("offset", offset)?, u64_obj("length", length)?);
        let img = self.image()?;
        img.check_range("read", offset, length).map_err(image_err)?;
        let len = usize::try_from(length)
            .map_err(|_| PyValueError::new_err("length does not fit in memory"))?;
        PyBytes::new_with(py, len, |buf| {
            // The bytes object is not visible to any other thread yet, so filling it without
            // the GIL is safe.
            py.detach(|| img.read_at(GuestOffset(offset), buf))
                .map_err(|e| self.err(e))
        })
    }

    /// Fills `buffer` (any writable, C-contiguous buffer) with guest bytes from `offset`;
    /// returns the number of bytes read (its length).
    fn readinto(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let offset = u64_obj("offset", offset)?;
        let img = self.image()?;
        readinto_buffer(py, &img, offset, buffer, self.name.as_deref())
    }

    /// The guest disk's ranges as `(EXTENT_FIELDS, rows)`, merged as `qemu-img map
    /// --output=json` merges them.
    fn guest_map(&self, py: Python<'_>) -> PyResult<Rows<ExtentRow>> {
        let img = self.image()?;
        let map = py.detach(|| img.guest_map()).map_err(|e| self.err(e))?;
        let mut rows = Vec::new();
        rows.try_reserve_exact(map.len()).map_err(|_| {
            pyo3::exceptions::PyMemoryError::new_err(format!(
                "the guest map's {} entries do not fit in memory (use iter_guest_map)",
                map.len()
            ))
        })?;
        rows.extend(map.into_iter().map(extent_row));
        Ok((EXTENT_FIELDS, rows))
    }

    /// At most `max` rows of the guest map from guest offset `start` (0, or what the previous
    /// call returned), and where the next call starts (the virtual size when done).
    fn guest_map_chunk(
        &self,
        py: Python<'_>,
        start: u64,
        max: usize,
    ) -> PyResult<(Vec<ExtentRow>, u64)> {
        let img = self.image()?;
        let (chunk, next) = py
            .detach(|| img.guest_map_chunk(start, max))
            .map_err(|e| self.err(e))?;
        Ok((chunk.into_iter().map(extent_row).collect(), next))
    }

    /// Writes `data` (any bytes-like object) at guest `offset`.
    fn write(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let offset = u64_obj("offset", offset)?;
        let bytes = bytes_of(data)?;
        self.detached(py, |img| img.write_at(GuestOffset(offset), &bytes))?;
        Ok(bytes.len())
    }

    /// Writes one whole guest cluster compressed; returns whether it was stored compressed.
    fn write_compressed(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let offset = u64_obj("offset", offset)?;
        let bytes = bytes_of(data)?;
        self.detached(py, |img| img.write_compressed(GuestOffset(offset), &bytes))
    }

    /// Makes `[offset, offset + length)` read as zeros.
    #[pyo3(signature = (offset, length, unmap = false))]
    fn write_zeroes(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
        unmap: bool,
    ) -> PyResult<()> {
        let (offset, length) = (u64_obj("offset", offset)?, u64_obj("length", length)?);
        self.detached(py, |img| {
            img.write_zeroes(GuestOffset(offset), length, unmap)
        })
    }

    /// Discards whole clusters of `[offset, offset + length)`.
    fn discard(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (offset, length) = (u64_obj("offset", offset)?, u64_obj("length", length)?);
        self.detached(py, |img| img.discard(GuestOffset(offset), length))
    }

    /// Changes the virtual size.
    fn resize(&self, py: Python<'_>, size: &Bound<'_, PyAny>) -> PyResult<()> {
        let size = u64_obj("size", size)?;
        self.detached(py, |img| img.resize(size))
    }

    /// Opens the backing chain and data file now (see `Image::open_backing_chain`).
    fn open_backing_chain(&self, py: Python<'_>) -> PyResult<()> {
        let image = self.image()?;
        py.detach(|| image.open_backing_chain())
            .map_err(|e| self.err(e))
    }

    /// Writes everything back in order and makes it durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.detached(py, Image::flush)
    }

    /// Host offset of guest byte `offset` where this image stores it as plain data.
    fn host_offset(&self, py: Python<'_>, offset: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        let offset = u64_obj("offset", offset)?;
        let host = self.detached(py, |img| img.host_offset(GuestOffset(offset)))?;
        Ok(host.map(|h| h.0))
    }

    #[getter]
    fn virtual_size(&self) -> PyResult<u64> {
        Ok(self.image()?.virtual_size())
    }

    #[getter]
    fn cache_tables(&self) -> PyResult<usize> {
        Ok(self.image()?.cache_tables())
    }

    #[getter]
    fn writable(&self) -> PyResult<bool> {
        Ok(self.image()?.writable())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Flushes and releases the image; further calls raise `ValueError`. Safe to call again,
    /// from any thread. When the flush fails the image stays open, with every change not yet
    /// on disk, and the error is raised: call `close()` (or `flush()`) again once the cause
    /// (a full disk) is gone. A flush that found corruption closes the handle all the same
    /// (it would write nothing more) and raises the corruption.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.inner.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(img) = taken {
            let flushed = py.detach(|| img.close());
            self.log_notes(py, &img);
            if let Err(e) = flushed {
                if !img.is_poisoned() {
                    let mut slot = self.inner.write().unwrap_or_else(|e| e.into_inner());
                    if slot.is_none() {
                        *slot = Some(img);
                    }
                }
                return Err(self.err(e));
            }
        }
        Ok(())
    }

    /// Releases the image without flushing: changes not yet on disk are lost. For the
    /// finalizer of an image whose `close()` keeps failing; returns whether it was open.
    fn abandon(&self) -> bool {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
    }
}

/// The bytes of any bytes-like object (copied once: the write releases the GIL).
fn bytes_of(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    let view = data
        .py()
        .import("builtins")?
        .getattr("memoryview")?
        .call1((data,))?
        .call_method1("cast", ("B",))?;
    view.call_method0("tobytes")?
        .cast::<PyBytes>()
        .map(|b| b.as_bytes().to_vec())
        .map_err(|_| PyTypeError::new_err("write() needs a bytes-like object"))
}

/// Reads into a Python buffer in place (the full C API has the buffer protocol).
#[cfg(not(feature = "abi3"))]
fn readinto_buffer(
    py: Python<'_>,
    img: &Image,
    offset: u64,
    buffer: &Bound<'_, PyAny>,
    name: Option<&str>,
) -> PyResult<usize> {
    use pyo3::buffer::PyBuffer;
    let view: PyBuffer<u8> = PyBuffer::get(buffer)?;
    if view.readonly() {
        return Err(PyTypeError::new_err("readinto() needs a writable buffer"));
    }
    if !view.is_c_contiguous() {
        return Err(PyTypeError::new_err(
            "readinto() needs a C-contiguous buffer",
        ));
    }
    let len = view.len_bytes();
    img.check_range("read", offset, len as u64)
        .map_err(image_err)?;
    let ptr = view.buf_ptr() as usize;
    py.detach(|| {
        // SAFETY: the exported view keeps the buffer alive and fixed in place for as long as
        // `view` lives (until after this call); it is writable and C-contiguous with `len` bytes.
        // As with `io.RawIOBase.readinto`, concurrent use of the buffer by other threads is the
        // caller's affair.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
        img.read_at(GuestOffset(offset), out)
    })
    .map_err(|e| image_err_in(e, name))?;
    Ok(len)
}

/// The buffer protocol's view (`Py_buffer`). Every CPython 3 lays it out this way; the limited
/// API of Python 3.9 does not declare it, and Python 3.11 added it to the stable ABI unchanged.
#[cfg(feature = "abi3")]
#[repr(C)]
struct RawBuffer {
    buf: *mut std::ffi::c_void,
    obj: *mut pyo3::ffi::PyObject,
    len: pyo3::ffi::Py_ssize_t,
    itemsize: pyo3::ffi::Py_ssize_t,
    readonly: std::ffi::c_int,
    ndim: std::ffi::c_int,
    format: *mut std::ffi::c_char,
    shape: *mut pyo3::ffi::Py_ssize_t,
    strides: *mut pyo3::ffi::Py_ssize_t,
    suboffsets: *mut pyo3::ffi::Py_ssize_t,
    internal: *mut std::ffi::c_void,
}

#[cfg(feature = "abi3")]
extern "C" {
    // Exported by every CPython 3 interpreter (part of the stable ABI since 3.11).
    fn PyObject_GetBuffer(
        obj: *mut pyo3::ffi::PyObject,
        view: *mut RawBuffer,
        flags: std::ffi::c_int,
    ) -> std::ffi::c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

/// `PyBUF_WRITABLE` without shape or strides: a writable, contiguous run of bytes, or an error.
#[cfg(feature = "abi3")]
const PYBUF_WRITABLE: std::ffi::c_int = 0x0001;

/// An exported buffer, released when dropped (with the GIL held: drops happen in the caller).
#[cfg(feature = "abi3")]
struct ExportedBuffer(RawBuffer);

#[cfg(feature = "abi3")]
impl Drop for ExportedBuffer {
    fn drop(&mut self) {
        // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released once.
        unsafe { PyBuffer_Release(&mut self.0) };
    }
}

/// Reads into a Python buffer in place, through the buffer protocol called directly (the
/// limited API of a Python 3.9 abi3 build does not declare it, but every CPython 3 has it).
#[cfg(feature = "abi3")]
fn readinto_buffer(
    py: Python<'_>,
    img: &Image,
    offset: u64,
    buffer: &Bound<'_, PyAny>,
    name: Option<&str>,
) -> PyResult<usize> {
    let mut raw = std::mem::MaybeUninit::<RawBuffer>::zeroed();
    // SAFETY: `buffer` is a live object (we hold the GIL and a reference); `raw` is a writable
    // Py_buffer-sized, zeroed struct that the call fills on success.
    let rc = unsafe { PyObject_GetBuffer(buffer.as_ptr(), raw.as_mut_ptr(), PYBUF_WRITABLE) };
    if rc != 0 {
        return Err(PyErr::take(py).unwrap_or_else(|| {
            PyTypeError::new_err("readinto() needs a writable, contiguous buffer")
        }));
    }
    // SAFETY: PyObject_GetBuffer succeeded, so the struct is initialized.
    let view = ExportedBuffer(unsafe { raw.assume_init() });
    let len = usize::try_from(view.0.len).unwrap_or(0);
    img.check_range("read", offset, len as u64)
        .map_err(image_err)?;
    let ptr = view.0.buf as usize;
    py.detach(|| {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the exported view keeps `len` writable, contiguous bytes at `ptr` alive and
        // in place until it is released (after this call). As with io.RawIOBase.readinto,
        // other threads using the buffer meanwhile are the caller's affair.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
        img.read_at(GuestOffset(offset), out)
    })
    .map_err(|e| image_err_in(e, name))?;
    drop(view);
    Ok(len)
}
