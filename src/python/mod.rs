//! PyO3 bindings: a thin layer over the Rust core.

use pyo3::prelude::*;

/// The `qcow2ovl._core` extension module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
