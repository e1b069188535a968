//! `MetadataMap` and `NaiveChecker` for Python.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use super::convert::{extents_to_py, range_args, types_from_py, types_to_py, u64_arg};
use crate::format::{ClusterCount, HostOffset};
use crate::overlap::{MapError, MetadataMap, MetadataType, NaiveChecker, NaiveLayout};
use crate::storage::{FileStorage, MemStorage, Storage};
use std::sync::Arc;

fn map_err(e: MapError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The metadata map: constant-time metadata overlap checks (see `qcow2ovl.MetadataMap`).
#[pyclass(name = "MetadataMap", module = "qcow2ovl._core")]
pub(crate) struct PyMetadataMap {
    inner: MetadataMap,
}

#[pymethods]
impl PyMetadataMap {
    #[new]
    #[pyo3(signature = (cluster_size, *, enabled = 0x7ff, total_size_limit = None))]
    fn new(cluster_size: u64, enabled: i128, total_size_limit: Option<usize>) -> PyResult<Self> {
        let inner = MetadataMap::new(cluster_size, types_from_py(enabled)?, total_size_limit)
            .map_err(map_err)?;
        Ok(PyMetadataMap { inner })
    }

    #[getter]
    fn cluster_size(&self) -> u64 {
        self.inner.cluster_size()
    }

    #[getter]
    fn enabled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        types_to_py(py, self.inner.enabled())
    }

    #[getter]
    fn total_size_limit(&self) -> Option<usize> {
        self.inner.total_size_limit()
    }

    fn enter(&mut self, offset: i128, nb_clusters: i128, types: i128) -> PyResult<()> {
        let (offset, nb_clusters) = (
            u64_arg("offset", offset)?,
            u64_arg("nb_clusters", nb_clusters)?,
        );
        self.inner
            .enter(
                HostOffset(offset),
                ClusterCount(nb_clusters),
                types_from_py(types)?,
            )
            .map(|_| ())
            .map_err(map_err)
    }

    fn remove(&mut self, offset: i128, nb_clusters: i128, types: i128) -> PyResult<()> {
        let (offset, nb_clusters) = (
            u64_arg("offset", offset)?,
            u64_arg("nb_clusters", nb_clusters)?,
        );
        self.inner
            .remove(
                HostOffset(offset),
                ClusterCount(nb_clusters),
                types_from_py(types)?,
            )
            .map_err(map_err)
    }

    #[pyo3(signature = (offset, size, ignore = 0))]
    fn check<'py>(
        &self,
        py: Python<'py>,
        offset: i128,
        size: i128,
        ignore: i128,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (offset, size) = range_args(offset, size)?;
        let t = self
            .inner
            .check(HostOffset(offset), size, types_from_py(ignore)?)
            .map_err(map_err)?;
        types_to_py(py, t)
    }

    fn is_exact(&self, offset: i128, size: i128) -> PyResult<bool> {
        let (offset, size) = range_args(offset, size)?;
        self.inner
            .is_exact(HostOffset(offset), size)
            .map_err(map_err)
    }

    fn unchecked_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.unchecked_ranges()
    }

    fn extents<'py>(&self, py: Python<'py>) -> PyResult<Vec<(u64, u64, Bound<'py, PyAny>)>> {
        extents_to_py(py, self.inner.extents())
    }

    fn memory_usage(&self) -> usize {
        self.inner.memory_usage()
    }

    fn __len__(&self) -> usize {
        self.inner.metadata_clusters()
    }

    fn __repr__(&self) -> String {
        format!(
            "MetadataMap(cluster_size={}, enabled={:#x}, metadata_clusters={}, memory_usage={})",
            self.inner.cluster_size(),
            self.inner.enabled().bits(),
            self.inner.metadata_clusters(),
            self.inner.memory_usage()
        )
    }
}

/// QEMU's scanning overlap check (the reference oracle and benchmark baseline).
#[pyclass(name = "NaiveChecker", module = "qcow2ovl._core")]
pub(crate) struct PyNaiveChecker {
    inner: NaiveChecker,
}

#[pymethods]
impl PyNaiveChecker {
    #[new]
    #[pyo3(signature = (
        cluster_size, *, enabled = 0x7ff, l1_table_offset = 0, l1_table = Vec::new(),
        refcount_table_offset = 0, refcount_table = Vec::new(), snapshots_offset = 0,
        snapshots_size = 0, snapshots = Vec::new(), bitmap_directory = None,
        bitmap_tables = Vec::new(), crypto_header = None, image = None, image_path = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        cluster_size: u64,
        enabled: i128,
        l1_table_offset: u64,
        l1_table: Vec<u64>,
        refcount_table_offset: u64,
        refcount_table: Vec<u64>,
        snapshots_offset: u64,
        snapshots_size: u64,
        snapshots: Vec<(u64, u32)>,
        bitmap_directory: Option<(u64, u64)>,
        bitmap_tables: Vec<(u64, u32)>,
        crypto_header: Option<(u64, u64)>,
        image: Option<Vec<u8>>,
        image_path: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let reader: Arc<dyn Storage> = match (image, image_path) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err("give image or image_path, not both"))
            }
            (_, Some(path)) => Arc::new(FileStorage::open_read_only(path)?),
            (bytes, None) => Arc::new(MemStorage::new_read_only(bytes.unwrap_or_default())),
        };
        let layout = NaiveLayout {
            cluster_size,
            l1_table_offset,
            l1_table,
            refcount_table_offset,
            refcount_table,
            snapshots_offset,
            snapshots_size,
            snapshots,
            bitmap_directory,
            bitmap_tables,
            crypto_header,
        };
        let inner = NaiveChecker::new(layout, types_from_py(enabled)?, reader)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyNaiveChecker { inner })
    }

    #[pyo3(signature = (offset, size, ignore = 0))]
    fn check<'py>(
        &self,
        py: Python<'py>,
        offset: i128,
        size: i128,
        ignore: i128,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (offset, size) = range_args(offset, size)?;
        let ignore: MetadataType = types_from_py(ignore)?;
        let inner = &self.inner;
        let t = py
            .detach(|| inner.check(offset, size, ignore))
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        types_to_py(py, t)
    }
}
