//! Conversions between Rust values and their Python faces.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyInt, PyType};

use crate::overlap::MetadataType;

/// A Python int of any size, as far as the bindings care: its value when it fits in an `i128`,
/// else its decimal text (ints beyond ±2^127 are out of every range the bindings
/// accept).
enum PyIntValue {
    Small(i128),
    Huge { text: String },
}

impl PyIntValue {
    /// The value for a message: exact when small, a bound when huge.
    fn describe(&self) -> String {
        match self {
            PyIntValue::Small(v) => v.to_string(),
            PyIntValue::Huge { text, .. } => text.clone(),
        }
    }
}

/// Reads any object with `__index__` (int, bool, `MetadataType`, numpy ints) as a Python int,
/// without PyO3's `OverflowError` for values that do not fit: the caller decides the range and
/// raises `ValueError` naming the argument. Anything else is a `TypeError` naming the argument.
fn py_int(name: &str, value: &Bound<'_, PyAny>) -> PyResult<PyIntValue> {
    let int = if value.is_instance_of::<PyInt>() {
        value.clone()
    } else if value.hasattr("__index__")? {
        value.call_method0("__index__")?
    } else {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int, not {}",
            value.get_type().name()?
        )));
    };
    match int.extract::<i128>() {
        Ok(v) => Ok(PyIntValue::Small(v)),
        Err(_) => Ok(PyIntValue::Huge {
            text: int.str()?.to_string(),
        }),
    }
}

/// An int argument in `0..=max`; anything else (of any size) is a `ValueError` naming `name`.
pub(crate) fn int_in(name: &str, value: &Bound<'_, PyAny>, max: u64) -> PyResult<u64> {
    let v = py_int(name, value)?;
    if let PyIntValue::Small(small) = v {
        if let Ok(u) = u64::try_from(small) {
            if u <= max {
                return Ok(u);
            }
        }
    }
    let bound = if max == u64::MAX {
        "2**64 - 1".to_owned()
    } else {
        max.to_string()
    };
    Err(PyValueError::new_err(format!(
        "{name} must be between 0 and {bound}, not {}",
        v.describe()
    )))
}

/// An unsigned 64-bit int argument (offset, size, count, table entry).
pub(crate) fn u64_obj(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    int_in(name, value, u64::MAX)
}

/// An optional size limit in bytes (`None` means no limit).
pub(crate) fn limit_obj(name: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => {
            let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
            let n = int_in(name, v, max)?;
            Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)))
        }
    }
}

/// A byte range `(offset, size)` from Python ints of any size.
pub(crate) fn range_obj(
    offset: &Bound<'_, PyAny>,
    size: &Bound<'_, PyAny>,
) -> PyResult<(u64, u64)> {
    Ok((u64_obj("offset", offset)?, u64_obj("size", size)?))
}

/// Type bits from a Python int of any size (or `MetadataType`); anything outside the 11 known
/// bits is a `ValueError` naming the argument.
pub(crate) fn types_obj(name: &str, value: &Bound<'_, PyAny>) -> PyResult<MetadataType> {
    let all = MetadataType::all().bits();
    let v = py_int(name, value)?;
    if let PyIntValue::Small(small) = v {
        if let Some(t) = u16::try_from(small).ok().and_then(MetadataType::from_bits) {
            return Ok(t);
        }
        if small >= 0 {
            return Err(PyValueError::new_err(format!(
                "{name}: unknown metadata type bits {:#x} (valid bits are {all:#x})",
                small & !i128::from(all)
            )));
        }
    }
    Err(PyValueError::new_err(format!(
        "{name}: unknown metadata type bits in {} (a set of types is an int between 0 and {all:#x})",
        v.describe()
    )))
}

/// Every possible `MetadataType` value, created on first use: an `IntFlag` costs far more to
/// construct than a check, but building all 2048 up front cost ~20 ms on the first call.
static VALUES: [PyOnceLock<Py<PyAny>>; 1 << 11] = [const { PyOnceLock::new() }; 1 << 11];

/// The Python `qcow2ovl.types.MetadataType` flag for `t`.
pub(crate) fn types_to_py(py: Python<'_>, t: MetadataType) -> PyResult<Bound<'_, PyAny>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let slot = VALUES
        .get(usize::from(t.bits()))
        .ok_or_else(|| PyValueError::new_err("metadata type bits out of range"))?;
    let value = slot.get_or_try_init(py, || {
        let class = CLASS.import(py, "qcow2ovl.types", "MetadataType")?;
        Ok::<_, PyErr>(class.call1((t.bits(),))?.unbind())
    })?;
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
