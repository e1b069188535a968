//! `qcow2ovl._core.bitmap_*` and `dirty_extents`: the persistent-bitmap operations behind
//! `Image.add_bitmap()`, `remove_bitmap()`, `clear_bitmap()`, `enable_bitmap()`,
//! `disable_bitmap()`, `merge_bitmap()` and `dirty_extents()`, each without the GIL.

use pyo3::prelude::*;

use super::errors::image_err;
use super::image::PyImage;

/// The dirty guest ranges `(offset, length)` of bitmap `name` inside `[offset, offset +
/// length)` (to the end of the disk when `length` is `None`), merged.
#[pyfunction]
#[pyo3(signature = (image, name, offset = 0, length = None))]
pub(crate) fn dirty_extents(
    py: Python<'_>,
    image: &PyImage,
    name: &str,
    offset: u64,
    length: Option<u64>,
) -> PyResult<Vec<(u64, u64)>> {
    let img = image.image()?;
    let length = length.unwrap_or_else(|| img.virtual_size().saturating_sub(offset));
    img.check_range("dirty_extents", offset, length)
        .map_err(image_err)?;
    image.detached(py, |img| img.dirty_extents(name, offset, length))
}

/// Adds an empty bitmap (QEMU's default granularity when `granularity` is `None`).
#[pyfunction]
#[pyo3(signature = (image, name, granularity = None, enabled = true))]
pub(crate) fn bitmap_add(
    py: Python<'_>,
    image: &PyImage,
    name: &str,
    granularity: Option<u64>,
    enabled: bool,
) -> PyResult<()> {
    image.detached(py, |img| img.add_bitmap(name, granularity, enabled))
}

/// Removes a bitmap (its clusters are freed when the image is closed).
#[pyfunction]
pub(crate) fn bitmap_remove(py: Python<'_>, image: &PyImage, name: &str) -> PyResult<()> {
    image.detached(py, |img| img.remove_bitmap(name))
}

/// Clears every bit of a bitmap.
#[pyfunction]
pub(crate) fn bitmap_clear(py: Python<'_>, image: &PyImage, name: &str) -> PyResult<()> {
    image.detached(py, |img| img.clear_bitmap(name))
}

/// Enables (`enabled=True`) or disables a bitmap.
#[pyfunction]
pub(crate) fn bitmap_enable(
    py: Python<'_>,
    image: &PyImage,
    name: &str,
    enabled: bool,
) -> PyResult<()> {
    image.detached(py, |img| img.set_bitmap_enabled(name, enabled))
}

/// Marks in bitmap `target` what bitmap `source` of `source_image` (else of `image`) marks.
#[pyfunction]
#[pyo3(signature = (image, target, source, source_image = None))]
pub(crate) fn bitmap_merge(
    py: Python<'_>,
    image: &PyImage,
    target: &str,
    source: &str,
    source_image: Option<&PyImage>,
) -> PyResult<()> {
    let other = source_image.map(PyImage::image).transpose()?;
    image.detached(py, |img| img.merge_bitmap(target, source, other.as_deref()))
}
