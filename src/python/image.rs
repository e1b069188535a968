//! `qcow2ovl._core.Image`: the Rust image behind `qcow2ovl.open()`.

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::{extents_to_py, range_args, types_from_py, types_to_py};
use crate::format::{CompatibleFeatures, Header, IncompatibleFeatures};
use crate::image::{Image, ImageError};
use crate::scan::ScanError;

/// Maps an image error to the exception classes of `qcow2ovl.errors`.
fn image_err(py: Python<'_>, e: ImageError) -> PyErr {
    let class =
        |name: &str| -> PyResult<Bound<'_, PyAny>> { py.import("qcow2ovl.errors")?.getattr(name) };
    let (name, msg) = match &e {
        ImageError::Scan(ScanError::Format(f)) if f.is_unsupported() => {
            ("UnsupportedError", e.to_string())
        }
        ImageError::Scan(ScanError::Format(_) | ScanError::Inconsistent(_)) => {
            ("FormatError", e.to_string())
        }
        ImageError::CorruptReadWrite => ("CorruptImageError", e.to_string()),
        ImageError::Map(_) | ImageError::Scan(ScanError::Map(_)) => {
            return PyValueError::new_err(e.to_string())
        }
        ImageError::Open { source, path } => {
            // Like Python's own open(): errno, strerror, filename.
            let errno = source.raw_os_error().unwrap_or(5);
            let text = std::io::Error::from_raw_os_error(errno).to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            return PyOSError::new_err((errno, text, path.clone()));
        }
        ImageError::Scan(ScanError::Io { source, .. }) => {
            return PyOSError::new_err((source.raw_os_error().unwrap_or(5), e.to_string()))
        }
        ImageError::Io(_) => return PyOSError::new_err(e.to_string()),
    };
    match class(name).and_then(|c| c.call1((msg,))) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// Names of every set feature bit, in QEMU's words, unknown bits by number.
fn feature_names(h: &Header) -> Vec<String> {
    let mut out = Vec::new();
    let known_incompat = [
        (IncompatibleFeatures::DIRTY, "dirty bit"),
        (IncompatibleFeatures::CORRUPT, "corrupt bit"),
        (
            IncompatibleFeatures::EXTERNAL_DATA_FILE,
            "external data file",
        ),
        (IncompatibleFeatures::COMPRESSION_TYPE, "compression type"),
        (IncompatibleFeatures::EXTENDED_L2, "extended L2 entries"),
    ];
    for (bit, name) in known_incompat {
        if h.incompatible_features.contains(bit) {
            out.push(name.to_string());
        }
    }
    if h.compatible_features
        .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    {
        out.push("lazy refcounts".into());
    }
    let autoclear = h.autoclear_features.bits();
    if autoclear & 1 != 0 {
        out.push("bitmaps".into());
    }
    if autoclear & 2 != 0 {
        out.push("raw external data".into());
    }
    let unknown = [
        ("incompatible", h.incompatible_features.bits() & !0x1f),
        ("compatible", h.compatible_features.bits() & !0x1),
        ("autoclear", autoclear & !0x3),
    ];
    for (kind, bits) in unknown {
        for bit in (0..64).filter(|b| bits & (1 << b) != 0) {
            let named = h
                .feature_names()
                .iter()
                .find(|f| u32::from(f.bit) == bit && f.kind == kind_code(kind));
            out.push(match named {
                Some(f) => f.name.clone(),
                None => format!("unknown {kind} feature bit {bit}"),
            });
        }
    }
    out
}

fn kind_code(kind: &str) -> u8 {
    match kind {
        "incompatible" => 0,
        "compatible" => 1,
        _ => 2,
    }
}

/// An open qcow2 image (the Rust side of `qcow2ovl.Image`).
#[pyclass(name = "Image", module = "qcow2ovl._core")]
pub(crate) struct PyImage {
    inner: Option<Image>,
}

impl PyImage {
    fn image(&self) -> PyResult<&Image> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("I/O operation on a closed image"))
    }
}

/// Opens an image (see `qcow2ovl.open`).
#[pyfunction]
#[pyo3(signature = (path, *, writable = false, enabled = 0x7ff, map_memory_limit = None))]
pub(crate) fn open_image(
    py: Python<'_>,
    path: PathBuf,
    writable: bool,
    enabled: i128,
    map_memory_limit: Option<usize>,
) -> PyResult<PyImage> {
    let enabled = types_from_py(enabled)?;
    let image = py
        .detach(|| Image::open(&path, writable, enabled, map_memory_limit))
        .map_err(|e| image_err(py, e))?;
    Ok(PyImage { inner: Some(image) })
}

#[pymethods]
impl PyImage {
    /// Header facts as a dict (the Python layer turns it into `ImageInfo`).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let img = self.image()?;
        let h = img.header();
        let d = PyDict::new(py);
        d.set_item("version", h.version)?;
        d.set_item("virtual_size", h.size)?;
        d.set_item("cluster_size", h.cluster_size())?;
        d.set_item("refcount_bits", h.refcount_bits())?;
        d.set_item(
            "compression_type",
            if h.compression_type == 1 {
                "zstd"
            } else {
                "deflate"
            },
        )?;
        d.set_item("extended_l2", h.is_extended_l2())?;
        d.set_item("crypt_method", h.crypt_method)?;
        d.set_item(
            "lazy_refcounts",
            h.compatible_features
                .contains(CompatibleFeatures::LAZY_REFCOUNTS),
        )?;
        d.set_item("dirty", h.is_dirty())?;
        d.set_item("corrupt", h.is_corrupt())?;
        d.set_item("backing_file", h.backing_file.as_deref())?;
        d.set_item("backing_format", h.backing_format())?;
        d.set_item("data_file", h.data_file())?;
        d.set_item("features", feature_names(h))?;
        d.set_item("l1_table_offset", h.l1_table_offset)?;
        d.set_item("l1_size", h.l1_size)?;
        d.set_item("refcount_table_offset", h.refcount_table_offset)?;
        d.set_item("refcount_table_clusters", h.refcount_table_clusters)?;
        d.set_item("snapshots_offset", h.snapshots_offset)?;
        d.set_item("crypto_header", h.crypto_header())?;
        d.set_item("file_size", img.file_len())?;
        Ok(d)
    }

    /// The snapshot list as dicts.
    fn snapshots<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.image()?
            .snapshots()
            .iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("id", &s.id)?;
                d.set_item("name", &s.name)?;
                d.set_item("l1_table_offset", s.l1_table_offset)?;
                d.set_item("l1_size", s.l1_size)?;
                d.set_item("vm_state_size", s.vm_state_bytes())?;
                d.set_item("date_sec", s.date_sec)?;
                d.set_item("date_nsec", s.date_nsec)?;
                d.set_item("vm_clock_nsec", s.vm_clock_nsec)?;
                d.set_item("disk_size", s.disk_size)?;
                d.set_item("icount", s.icount)?;
                Ok(d)
            })
            .collect()
    }

    /// The persistent bitmaps as dicts.
    fn bitmaps<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.image()?
            .bitmaps()
            .iter()
            .map(|b| {
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

    #[pyo3(signature = (offset, size, ignore = 0))]
    fn check_overlap<'py>(
        &self,
        py: Python<'py>,
        offset: i128,
        size: i128,
        ignore: i128,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (offset, size) = range_args(offset, size)?;
        let ignore = types_from_py(ignore)?;
        let t = self
            .image()?
            .check_overlap(offset, size, ignore)
            .map_err(|e| image_err(py, e))?;
        types_to_py(py, t)
    }

    fn metadata_extents<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(u64, u64, Bound<'py, PyAny>)>> {
        extents_to_py(py, self.image()?.map().extents())
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

    /// `(listed problems, total count)` found by the scan.
    fn problems(&self) -> PyResult<(Vec<String>, usize)> {
        let (list, count) = self.image()?.problems();
        Ok((list.to_vec(), count))
    }

    #[getter]
    fn writable(&self) -> PyResult<bool> {
        Ok(self.image()?.writable())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    /// Flushes and releases the image; further calls raise `ValueError`.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(img) = self.inner.take() {
            py.detach(|| img.flush())?;
        }
        Ok(())
    }
}
