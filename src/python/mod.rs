//! PyO3 bindings: a thin layer over the Rust core. No qcow2 rules live here; this layer only
//! converts arguments, maps errors to the Python exceptions of `qcow2ovl.errors`, and releases the
//! GIL around I/O.

mod args;
mod bitmaps;
mod chain;
mod check;
mod convert;
mod create;
mod errors;
mod extents;
mod facts;
mod fileobj;
mod image;
mod map;
mod progress;
mod serve;

use pyo3::prelude::*;

/// The `qcow2ovl._core` extension module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KEY_SECRET_REQUIRED", crate::crypto::KEY_SECRET_REQUIRED)?;
    m.add_class::<map::PyMetadataMap>()?;
    m.add_class::<map::PyNaiveChecker>()?;
    m.add_class::<image::PyImage>()?;
    m.add_class::<serve::PyNbdServer>()?;
    m.add_class::<extents::PyExtentList>()?;
    m.add_class::<extents::PyExtentIter>()?;
    m.add_function(wrap_pyfunction!(image::open_image, m)?)?;
    m.add_function(wrap_pyfunction!(image::locking_notice, m)?)?;
    m.add_function(wrap_pyfunction!(fileobj::open_image_fd, m)?)?;
    m.add_function(wrap_pyfunction!(fileobj::open_image_fileobj, m)?)?;
    m.add_function(wrap_pyfunction!(create::create_image, m)?)?;
    m.add_function(wrap_pyfunction!(check::check_image, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert_disk, m)?)?;
    m.add_function(wrap_pyfunction!(chain::commit_image, m)?)?;
    m.add_function(wrap_pyfunction!(chain::rebase_image, m)?)?;
    m.add_function(wrap_pyfunction!(check::repair_image, m)?)?;
    m.add_function(wrap_pyfunction!(check::check_repair_mode, m)?)?;
    m.add_function(wrap_pyfunction!(bitmaps::dirty_extents, m)?)?;
    m.add_function(wrap_pyfunction!(bitmaps::bitmap_add, m)?)?;
    m.add_function(wrap_pyfunction!(bitmaps::bitmap_remove, m)?)?;
    m.add_function(wrap_pyfunction!(bitmaps::bitmap_clear, m)?)?;
    m.add_function(wrap_pyfunction!(bitmaps::bitmap_enable, m)?)?;
    m.add_function(wrap_pyfunction!(bitmaps::bitmap_merge, m)?)?;
    Ok(())
}
