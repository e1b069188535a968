//! `convert_disk`: the conversion pipeline for Python, without the GIL.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::image_err;
use super::image::{cache_mode_arg, PyImage};
use super::progress::Reporter;
use crate::convert::{convert, ConvertOptions, RawFile, Source, Target};
use crate::image::ImageError;
use crate::storage::Storage;

/// One end of a conversion as Python hands it over: an open qcow2 image, or a raw file's path.
enum End {
    Image(std::sync::Arc<crate::image::Image>),
    Raw(RawFile),
}

impl End {
    fn from_py(
        obj: &Bound<'_, PyAny>,
        writable: bool,
        force_share: bool,
        cache: &str,
    ) -> PyResult<End> {
        if let Ok(image) = obj.cast::<PyImage>() {
            return Ok(End::Image(image.borrow().image()?));
        }
        let path: PathBuf = obj.extract()?;
        let cache = cache_mode_arg(cache)?;
        let raw = obj
            .py()
            .detach(|| RawFile::open(&path, writable, force_share, cache))
            .map_err(image_err)?;
        Ok(End::Raw(raw))
    }
}

/// Copies the guest disk of `source` (an open `Image`, or the path of a raw file) to `target`
/// (an `Image` opened writable, or the path of an existing raw file at least as long) as
/// `qemu-img convert` does; see `qcow2ovl.convert`. `progress(done, total)` is called with
/// the GIL taken back, with rising byte counts. A raw target is flushed as its `cache` mode
/// says; an image target is left to its owner's close. Returns what was done, as a dict.
#[pyfunction]
#[pyo3(signature = (
    source, target, *, compress = false, min_sparse = 4096, target_is_zero = true,
    target_has_backing = false, source_layers = None, parallel = 8, out_of_order = false, force_share = false,
    cache = "unsafe", progress = None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn convert_disk<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    compress: bool,
    min_sparse: u64,
    target_is_zero: bool,
    target_has_backing: bool,
    source_layers: Option<u32>,
    parallel: usize,
    out_of_order: bool,
    force_share: bool,
    cache: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let from = End::from_py(source, false, force_share, "writeback")?;
    let to = End::from_py(target, true, false, cache)?;
    let options = ConvertOptions {
        compress,
        min_sparse,
        target_is_zero,
        target_has_backing,
        source_layers,
        below_unreadable: false,
        parallel,
        out_of_order,
    };
    let src = match &from {
        End::Image(image) => Source::Image(image),
        End::Raw(raw) => Source::Raw(raw),
    };
    let dst = match &to {
        End::Image(image) => Target::Image(image),
        End::Raw(raw) => Target::Raw(raw),
    };
    let mut reporter = Reporter::new(progress);
    let result = py.detach(|| {
        // Signals (Ctrl-C) are looked at with every chunk: the conversion stops at the next
        // one, with the target consistent, and the exception is raised.
        let stats = convert(&src, &dst, &options, &mut |d, t| reporter.report(d, t))?;
        if let End::Raw(raw) = &to {
            raw.storage
                .flush()
                .map_err(|e| ImageError::Io(e).in_file(&raw.name))?;
        }
        Ok::<_, ImageError>(stats)
    });
    if let Some(e) = reporter.finish() {
        return Err(e);
    }
    let stats = result.map_err(image_err)?;
    let d = PyDict::new(py);
    d.set_item("total", stats.total)?;
    d.set_item("read", stats.read)?;
    d.set_item("written", stats.written)?;
    d.set_item("zeroed", stats.zeroed)?;
    d.set_item("compressed_clusters", stats.compressed_clusters)?;
    Ok(d)
}
