//! Conversions between Rust values and their Python faces.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::overlap::MetadataType;

/// An offset, size or count from Python. Arguments are taken as `i128` so that a negative or too
/// large int is a `ValueError` naming the argument (PyO3's `u64` conversion would raise
/// `OverflowError`).
pub(crate) fn u64_arg(name: &str, value: i128) -> PyResult<u64> {
    u64::try_from(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be between 0 and 2**64 - 1, not {value}"
        ))
    })
}

/// A byte range `(offset, size)` from Python, each checked by [`u64_arg`].
pub(crate) fn range_args(offset: i128, size: i128) -> PyResult<(u64, u64)> {
    Ok((u64_arg("offset", offset)?, u64_arg("size", size)?))
}

/// Type bits from a Python int (or `MetadataType`); unknown bits are a `ValueError`.
pub(crate) fn types_from_py(bits: i128) -> PyResult<MetadataType> {
    u16::try_from(bits)
        .ok()
        .and_then(MetadataType::from_bits)
        .ok_or_else(|| PyValueError::new_err(format!("unknown metadata type bits {bits:#x}")))
}

/// The Python `qcow2ovl.types.MetadataType` flag for `t`.
///
/// Constructing an `IntFlag` costs far more than a check, so all 2048 possible values are made
/// once and handed out from a table.
pub(crate) fn types_to_py(py: Python<'_>, t: MetadataType) -> PyResult<Bound<'_, PyAny>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static VALUES: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();
    let values = VALUES.get_or_try_init(py, || {
        let class = CLASS.import(py, "qcow2ovl.types", "MetadataType")?;
        (0..=MetadataType::all().bits())
            .map(|bits| Ok(class.call1((bits,))?.unbind()))
            .collect::<PyResult<Vec<_>>>()
    })?;
    let value = values
        .get(usize::from(t.bits()))
        .ok_or_else(|| PyValueError::new_err("metadata type bits out of range"))?;
    Ok(value.bind(py).clone())
}

/// Map extents as Python tuples `(offset, length, MetadataType)`.
pub(crate) fn extents_to_py(
    py: Python<'_>,
    extents: Vec<(u64, u64, MetadataType)>,
) -> PyResult<Vec<(u64, u64, Bound<'_, PyAny>)>> {
    extents
        .into_iter()
        .map(|(o, l, t)| Ok((o, l, types_to_py(py, t)?)))
        .collect()
}
