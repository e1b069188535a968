//! `MetadataMap` and `NaiveChecker` for Python.
//!
//! Every int argument is taken as a Python object and converted by `convert`, so that a value
//! out of range — negative, or far beyond 64 bits — is a `ValueError` naming the argument, never
//! PyO3's `OverflowError`. Doc comments below are the classes' `help()` text; each method with
//! defaults also carries a text signature so that `inspect.signature` shows the real defaults.

use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::args::{extents_to_py, int_in, limit_obj, range_obj, types_obj, types_to_py, u64_obj};
use crate::format::{ClusterCount, HostOffset};
use crate::overlap::{MapError, MetadataMap, MetadataType, NaiveChecker, NaiveLayout};
use crate::storage::{FileStorage, MemStorage, Storage};
use std::sync::Arc;

fn map_err(e: MapError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Which host clusters of a qcow2 image hold which metadata; constant-time overlap checks.
///
/// cluster_size is the image's cluster size (a power of two from 512 to 2 MiB). Only the types in
/// enabled are tracked: entering or checking any other type costs nothing. With
/// total_size_limit (bytes), ranges the map cannot hold are remembered as unchecked: check()
/// reports every enabled type there and is_exact() returns False, so the map never
/// under-reports.
///
/// check() rounds a range out to whole clusters and returns the OR of every enabled type in
/// them (plus MAIN_HEADER for a range that starts in cluster 0). Host offsets end at 2**56.
#[pyclass(name = "MetadataMap", module = "qcow2ovl._core")]
pub(crate) struct PyMetadataMap {
    inner: MetadataMap,
}

#[pymethods]
impl PyMetadataMap {
    #[new]
    #[pyo3(
        signature = (cluster_size, *, enabled = None, total_size_limit = None),
        text_signature = "(cluster_size, *, enabled=2047, total_size_limit=None)"
    )]
    fn new(
        cluster_size: &Bound<'_, PyAny>,
        enabled: Option<&Bound<'_, PyAny>>,
        total_size_limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let cluster_size = cluster_size_obj(cluster_size)?;
        let enabled = match enabled {
            Some(e) => types_obj("enabled", e)?,
            None => MetadataType::all(),
        };
        let limit = limit_obj("total_size_limit", total_size_limit)?;
        let inner = MetadataMap::new(cluster_size, enabled, limit).map_err(map_err)?;
        Ok(PyMetadataMap { inner })
    }

    /// The cluster size in bytes.
    #[getter]
    fn cluster_size(&self) -> u64 {
        self.inner.cluster_size()
    }

    /// The metadata types this map tracks (a MetadataType).
    #[getter]
    fn enabled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        types_to_py(py, self.inner.enabled())
    }

    /// The memory limit in bytes given at construction, or None.
    #[getter]
    fn total_size_limit(&self) -> Option<usize> {
        self.inner.total_size_limit()
    }

    /// Record nb_clusters clusters from host offset as holding types (an int or MetadataType).
    ///
    /// Types that are not enabled are dropped. An offset that is not cluster-aligned is not
    /// entered (broken metadata is the scanner's to report). A cluster may hold several types.
    #[pyo3(text_signature = "($self, offset, nb_clusters, types)")]
    fn enter(
        &mut self,
        offset: &Bound<'_, PyAny>,
        nb_clusters: &Bound<'_, PyAny>,
        types: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (offset, nb_clusters) = (
            u64_obj("offset", offset)?,
            u64_obj("nb_clusters", nb_clusters)?,
        );
        self.inner
            .enter(
                HostOffset(offset),
                ClusterCount(nb_clusters),
                types_obj("types", types)?,
            )
            .map(|_| ())
            .map_err(map_err)
    }

    /// Forget types on nb_clusters clusters from host offset; other types there stay.
    ///
    /// An unaligned range is rounded out to whole clusters.
    #[pyo3(text_signature = "($self, offset, nb_clusters, types)")]
    fn remove(
        &mut self,
        offset: &Bound<'_, PyAny>,
        nb_clusters: &Bound<'_, PyAny>,
        types: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (offset, nb_clusters) = (
            u64_obj("offset", offset)?,
            u64_obj("nb_clusters", nb_clusters)?,
        );
        self.inner
            .remove(
                HostOffset(offset),
                ClusterCount(nb_clusters),
                types_obj("types", types)?,
            )
            .map_err(map_err)
    }

    /// The metadata types a write of size bytes at host offset would touch, minus ignore.
    ///
    /// The range is rounded out to whole clusters; the result is the OR of every enabled type in
    /// them (an empty MetadataType means the write is safe). size 0 touches nothing; a range
    /// starting in cluster 0 touches MAIN_HEADER.
    #[pyo3(
        signature = (offset, size, ignore = None),
        text_signature = "($self, offset, size, ignore=0)"
    )]
    fn check<'py>(
        &self,
        py: Python<'py>,
        offset: &Bound<'py, PyAny>,
        size: &Bound<'py, PyAny>,
        ignore: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (offset, size) = range_obj(offset, size)?;
        let ignore = match ignore {
            Some(i) => types_obj("ignore", i)?,
            None => MetadataType::empty(),
        };
        let t = self
            .inner
            .check(HostOffset(offset), size, ignore)
            .map_err(map_err)?;
        types_to_py(py, t)
    }

    /// Whether check() is exact over [offset, offset + size): False where the memory limit
    /// kept ranges out of the map (check() then reports every enabled type).
    #[pyo3(text_signature = "($self, offset, size)")]
    fn is_exact(&self, offset: &Bound<'_, PyAny>, size: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (offset, size) = range_obj(offset, size)?;
        self.inner
            .is_exact(HostOffset(offset), size)
            .map_err(map_err)
    }

    /// Host byte ranges (offset, length) the memory limit kept out of the map.
    #[pyo3(text_signature = "($self)")]
    fn unchecked_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.unchecked_ranges()
    }

    /// Every metadata extent (host offset, length in bytes, MetadataType), sorted, with equal
    /// neighbours merged.
    #[pyo3(text_signature = "($self)")]
    fn extents<'py>(&self, py: Python<'py>) -> PyResult<Vec<(u64, u64, Bound<'py, PyAny>)>> {
        extents_to_py(py, self.inner.extents())
    }

    /// Bytes of memory the map holds.
    #[pyo3(text_signature = "($self)")]
    fn memory_usage(&self) -> usize {
        self.inner.memory_usage()
    }

    /// The number of metadata clusters in the map.
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

/// A cluster size argument: any int outside 64 bits gets the same message as a bad cluster size.
fn cluster_size_obj(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    u64_obj("cluster_size", value).map_err(|e| {
        if e.is_instance_of::<PyValueError>(value.py()) {
            PyValueError::new_err(format!(
                "cluster size {} is not a power of two between 512 and 2097152",
                value.str().map(|s| s.to_string()).unwrap_or_default()
            ))
        } else {
            e
        }
    })
}

/// A list of unsigned 64-bit ints (table entries), each checked and named in errors.
fn u64_list(name: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u64>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .try_iter()?
        .enumerate()
        .map(|(i, item)| u64_obj(&format!("{name}[{i}]"), &item?))
        .collect()
}

/// A pair `(offset, size)` with `size` at most `max_size`.
fn pair(name: &str, value: &Bound<'_, PyAny>, max_size: u64) -> PyResult<(u64, u64)> {
    let tuple = value
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a tuple (offset, size)")))?;
    if tuple.len() != 2 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a tuple (offset, size), not {} items",
            tuple.len()
        )));
    }
    Ok((
        u64_obj(&format!("{name} offset"), &tuple.get_item(0)?)?,
        int_in(&format!("{name} size"), &tuple.get_item(1)?, max_size)?,
    ))
}

/// A list of `(offset, entries)` pairs with 32-bit entry counts.
fn pair_list(name: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(u64, u32)>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .try_iter()?
        .enumerate()
        .map(|(i, item)| {
            let (offset, n) = pair(&format!("{name}[{i}]"), &item?, u64::from(u32::MAX))?;
            Ok((offset, u32::try_from(n).unwrap_or(u32::MAX)))
        })
        .collect()
}

/// An optional `(offset, size)` pair.
fn opt_pair(name: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<(u64, u64)>> {
    match value {
        Some(v) if !v.is_none() => Ok(Some(pair(name, v, u64::MAX)?)),
        _ => Ok(None),
    }
}

/// QEMU's scanning overlap check: the reference the metadata map is tested and measured against.
///
/// cluster_size is the image's cluster size and enabled the types to check. The rest is what
/// QEMU keeps in memory, in its units: l1_table_offset and l1_table (the raw active L1
/// entries), refcount_table_offset and refcount_table (raw entries), snapshots_offset and
/// snapshots_size (the snapshot table), snapshots as (l1_table_offset, l1_size) pairs,
/// bitmap_tables as (offset, entries) pairs, bitmap_directory and crypto_header as
/// (offset, bytes) pairs. All of it is scanned on every check. With INACTIVE_L2 enabled every
/// check also reads each snapshot's L1 table from image (bytes) or image_path (a file), as QEMU
/// does.
#[pyclass(name = "NaiveChecker", module = "qcow2ovl._core")]
pub(crate) struct PyNaiveChecker {
    inner: NaiveChecker,
}

#[pymethods]
impl PyNaiveChecker {
    #[new]
    #[pyo3(
        signature = (
            cluster_size, *, enabled = None, l1_table_offset = None, l1_table = None,
            refcount_table_offset = None, refcount_table = None, snapshots_offset = None,
            snapshots_size = None, snapshots = None, bitmap_directory = None,
            bitmap_tables = None, crypto_header = None, image = None, image_path = None
        ),
        text_signature = "(cluster_size, *, enabled=2047, l1_table_offset=0, l1_table=(), \
            refcount_table_offset=0, refcount_table=(), snapshots_offset=0, snapshots_size=0, \
            snapshots=(), bitmap_directory=None, bitmap_tables=(), crypto_header=None, \
            image=None, image_path=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        cluster_size: &Bound<'_, PyAny>,
        enabled: Option<&Bound<'_, PyAny>>,
        l1_table_offset: Option<&Bound<'_, PyAny>>,
        l1_table: Option<&Bound<'_, PyAny>>,
        refcount_table_offset: Option<&Bound<'_, PyAny>>,
        refcount_table: Option<&Bound<'_, PyAny>>,
        snapshots_offset: Option<&Bound<'_, PyAny>>,
        snapshots_size: Option<&Bound<'_, PyAny>>,
        snapshots: Option<&Bound<'_, PyAny>>,
        bitmap_directory: Option<&Bound<'_, PyAny>>,
        bitmap_tables: Option<&Bound<'_, PyAny>>,
        crypto_header: Option<&Bound<'_, PyAny>>,
        image: Option<Vec<u8>>,
        image_path: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let cluster_size = cluster_size_obj(cluster_size)?;
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(PyValueError::new_err(format!(
                "cluster size {cluster_size} is not a power of two between 512 and 2097152"
            )));
        }
        let offset = |name: &str, v: Option<&Bound<'_, PyAny>>| match v {
            Some(v) => u64_obj(name, v),
            None => Ok(0),
        };
        let enabled = match enabled {
            Some(e) => types_obj("enabled", e)?,
            None => MetadataType::all(),
        };
        let layout = NaiveLayout {
            cluster_size,
            l1_table_offset: offset("l1_table_offset", l1_table_offset)?,
            l1_table: u64_list("l1_table", l1_table)?,
            refcount_table_offset: offset("refcount_table_offset", refcount_table_offset)?,
            refcount_table: u64_list("refcount_table", refcount_table)?,
            snapshots_offset: offset("snapshots_offset", snapshots_offset)?,
            snapshots_size: offset("snapshots_size", snapshots_size)?,
            snapshots: pair_list("snapshots", snapshots)?,
            bitmap_directory: opt_pair("bitmap_directory", bitmap_directory)?,
            bitmap_tables: pair_list("bitmap_tables", bitmap_tables)?,
            crypto_header: opt_pair("crypto_header", crypto_header)?,
        };
        let reader: Arc<dyn Storage> = match (image, image_path) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err("give image or image_path, not both"))
            }
            (_, Some(path)) => Arc::new(FileStorage::open_read_only(path)?),
            (bytes, None) => Arc::new(MemStorage::new_read_only(bytes.unwrap_or_default())),
        };
        let inner = NaiveChecker::new(layout, enabled, reader)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyNaiveChecker { inner })
    }

    /// The metadata types a write of size bytes at host offset would touch, minus ignore,
    /// found the way QEMU finds them: by scanning every table (and, with INACTIVE_L2, reading
    /// every snapshot L1 table) on each call. Same rounding and result as MetadataMap.check.
    #[pyo3(
        signature = (offset, size, ignore = None),
        text_signature = "($self, offset, size, ignore=0)"
    )]
    fn check<'py>(
        &self,
        py: Python<'py>,
        offset: &Bound<'py, PyAny>,
        size: &Bound<'py, PyAny>,
        ignore: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (offset, size) = range_obj(offset, size)?;
        let ignore = match ignore {
            Some(i) => types_obj("ignore", i)?,
            None => MetadataType::empty(),
        };
        // Rounded out to clusters, the range must end within 64 bits: say so, instead of the
        // checker's I/O-style error.
        let cs = self.inner.layout().cluster_size;
        if size != 0
            && offset
                .checked_add(size)
                .and_then(|e| e.checked_add(cs - 1))
                .is_none()
        {
            return Err(PyValueError::new_err(format!(
                "range at offset {offset} with {size} bytes ends beyond 2**64"
            )));
        }
        let inner = &self.inner;
        let t = py
            .detach(|| inner.check(offset, size, ignore))
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        types_to_py(py, t)
    }
}
