//! `commit_image` and `rebase_image`: `qemu-img commit` and `rebase` for Python, without the
//! GIL (`qcow2ovl.commit` and `qcow2ovl.rebase` give them their options and messages).

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::image_err;
use super::image::{cache_mode_arg, locking_arg};
use super::progress::Reporter;
use crate::chain::{commit, rebase, CommitOptions, RebaseOptions};

/// Commits `image` into its backing file, or into `base` further down its chain (named as
/// `qemu-img commit -b` takes it); the top is emptied unless `keep_top` or `base`. Returns
/// `{"base", "emptied", "total", "read", "written", "zeroed"}` (`base` a `str`, `emptied` a
/// `bool`, the rest counts of guest bytes).
#[pyfunction]
#[pyo3(signature = (
    image, *, base = None, keep_top = false, cache = "writeback", locking = "auto",
    progress = None
))]
pub(crate) fn commit_image<'py>(
    py: Python<'py>,
    image: PathBuf,
    base: Option<String>,
    keep_top: bool,
    cache: &str,
    locking: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = CommitOptions {
        base,
        keep_top,
        cache: cache_mode_arg(cache)?,
        locking: locking_arg(locking)?,
    };
    let mut reporter = Reporter::new(progress);
    let result = py.detach(|| commit(&image, &options, &mut |d, t| reporter.report(d, t)));
    if let Some(e) = reporter.finish() {
        return Err(e);
    }
    let stats = result.map_err(image_err)?;
    let d = PyDict::new(py);
    d.set_item("base", stats.base.display().to_string())?;
    d.set_item("emptied", stats.emptied)?;
    d.set_item("total", stats.copied.total)?;
    d.set_item("read", stats.copied.read)?;
    d.set_item("written", stats.copied.written)?;
    d.set_item("zeroed", stats.copied.zeroed)?;
    Ok(d)
}

/// Rebases `image` onto `backing` (format `backing_format`; `None` for no backing file): a safe
/// rebase copies in first what the new backing file reads differently, `header_only` only
/// rewrites the header. Returns `{"compared", "copied"}`.
#[pyfunction]
#[pyo3(signature = (
    image, backing, *, backing_format = None, header_only = false, compress = false,
    cache = "writeback", backing_cache = "writeback", force_share = false, locking = "auto",
    progress = None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rebase_image<'py>(
    py: Python<'py>,
    image: PathBuf,
    backing: Option<String>,
    backing_format: Option<String>,
    header_only: bool,
    compress: bool,
    cache: &str,
    backing_cache: &str,
    force_share: bool,
    locking: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = RebaseOptions {
        backing,
        format: backing_format,
        header_only,
        compress,
        cache: cache_mode_arg(cache)?,
        backing_cache: cache_mode_arg(backing_cache)?,
        force_share,
        locking: locking_arg(locking)?,
    };
    let mut reporter = Reporter::new(progress);
    let result = py.detach(|| rebase(&image, &options, &mut |d, t| reporter.report(d, t)));
    if let Some(e) = reporter.finish() {
        return Err(e);
    }
    let stats = result.map_err(image_err)?;
    let d = PyDict::new(py);
    d.set_item("compared", stats.compared)?;
    d.set_item("copied", stats.copied)?;
    Ok(d)
}
