//! `qcow2ovl._core.ExtentList`: metadata extents held compactly in Rust (24 bytes each) and
//! handed to Python one tuple at a time, so that an image with millions of metadata clusters
//! costs no millions of Python objects until they are asked for.

use std::sync::Arc;

use pyo3::exceptions::{PyIndexError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PySlice};

use super::args::types_to_py;
use crate::overlap::MetadataType;

type Extents = Arc<Vec<(u64, u64, MetadataType)>>;

/// A read-only sequence of `(offset, length, MetadataType)` tuples.
#[pyclass(name = "ExtentList", module = "qcow2ovl._core", frozen, sequence)]
pub(crate) struct PyExtentList {
    items: Extents,
}

impl PyExtentList {
    pub(crate) fn new(items: Vec<(u64, u64, MetadataType)>) -> Self {
        PyExtentList {
            items: Arc::new(items),
        }
    }
}

fn tuple<'py>(
    py: Python<'py>,
    &(o, l, t): &(u64, u64, MetadataType),
) -> PyResult<Bound<'py, PyAny>> {
    Ok((o, l, types_to_py(py, t)?).into_pyobject(py)?.into_any())
}

#[pymethods]
impl PyExtentList {
    fn __len__(&self) -> usize {
        self.items.len()
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Ok(slice) = index.cast::<PySlice>() {
            let ind = slice.indices(self.items.len() as isize)?;
            let mut out = Vec::with_capacity(ind.slicelength);
            let mut i = ind.start;
            for _ in 0..ind.slicelength {
                out.push(tuple(py, &self.items[i as usize])?);
                i += ind.step;
            }
            return Ok(PyList::new(py, out)?.into_any());
        }
        let i: isize = index
            .extract()
            .map_err(|_| PyTypeError::new_err("ExtentList indices must be integers or slices"))?;
        let n = self.items.len() as isize;
        let j = if i < 0 { i + n } else { i };
        if !(0..n).contains(&j) {
            return Err(PyIndexError::new_err("ExtentList index out of range"));
        }
        tuple(py, &self.items[j as usize])
    }

    fn __iter__(&self) -> PyExtentIter {
        PyExtentIter {
            items: Arc::clone(&self.items),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Ok(n) = other.len() else {
            return Ok(false);
        };
        if n != self.items.len() {
            return Ok(false);
        }
        for (i, item) in other.try_iter()?.enumerate() {
            if !tuple(py, &self.items[i])?.eq(item?)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn __repr__(&self) -> String {
        format!("<ExtentList of {} extents>", self.items.len())
    }
}

/// Iterator over an [`PyExtentList`].
#[pyclass(name = "ExtentIterator", module = "qcow2ovl._core", frozen)]
pub(crate) struct PyExtentIter {
    items: Extents,
    next: std::sync::atomic::AtomicUsize,
}

#[pymethods]
impl PyExtentIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.items.get(i).map(|e| tuple(py, e)).transpose()
    }
}
