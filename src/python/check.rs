//! `qcow2ovl._core.check_image`, `repair_image` and `check_repair_mode`: the Rust check and
//! repair behind `Image.check()`, `qcow2ovl.check(path, repair=...)` and `qcow2ovl check [-r]`.
//!
//! A report crosses to Python as a dict keyed by `CheckResult`'s field names; its findings as
//! `(FINDING_FIELDS, rows)`, which `qcow2ovl.records.from_rows` checks against
//! `CheckFinding`'s fields, so a field renamed on one side only fails at once.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::image_err;
use super::image::PyImage;
use crate::image::{CheckReport, Image, ImageError, OpenOptions, Owner, Repair};

/// The owner of a cluster as a dict: `type`, `offset`, `description`, and the indices that
/// apply (`l1_index`, `snapshot`, `refcount_table_index`, `bitmap`, `guest_offset`).
fn owner_dict<'py>(py: Python<'py>, owner: Owner, offset: u64) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("type", owner.type_name())?;
    d.set_item("offset", offset)?;
    d.set_item("description", owner.to_string())?;
    match owner {
        Owner::RefcountBlock(i) => d.set_item("refcount_table_index", i)?,
        Owner::SnapshotL1(s) => d.set_item("snapshot", s + 1)?,
        Owner::ActiveL2(i) => d.set_item("l1_index", i)?,
        Owner::SnapshotL2(s, i) => {
            d.set_item("snapshot", s + 1)?;
            d.set_item("l1_index", i)?;
        }
        Owner::BitmapTable(b) => d.set_item("bitmap", b + 1)?,
        Owner::BitmapData(b, i) => {
            d.set_item("bitmap", b + 1)?;
            d.set_item("index", i)?;
        }
        Owner::Data(s, g) => {
            if let Some(s) = s {
                d.set_item("snapshot", s + 1)?;
            }
            d.set_item("guest_offset", g)?;
        }
        _ => {}
    }
    Ok(d)
}

fn report_dict<'py>(py: Python<'py>, r: &CheckReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("corruptions", r.corruptions)?;
    d.set_item("leaks", r.leaks)?;
    d.set_item("check_errors", r.check_errors)?;
    d.set_item("corruptions_fixed", r.corruptions_fixed)?;
    d.set_item("leaks_fixed", r.leaks_fixed)?;
    d.set_item("image_end_offset", r.image_end_offset)?;
    d.set_item("total_clusters", r.total_clusters)?;
    d.set_item("allocated_clusters", r.allocated_clusters)?;
    d.set_item("fragmented_clusters", r.fragmented_clusters)?;
    d.set_item("compressed_clusters", r.compressed_clusters)?;
    let findings: Vec<_> = r
        .findings
        .iter()
        .map(|f| {
            (
                f.kind_name(),
                f.severity_name(),
                f.times,
                f.offset(),
                f.to_string(),
            )
        })
        .collect();
    d.set_item("findings", (FINDING_FIELDS, findings))?;
    d.set_item("finding_count", r.finding_count)?;
    let overlaps = r
        .overlaps
        .iter()
        .map(|o| {
            let od = PyDict::new(py);
            od.set_item("message", o.to_string())?;
            od.set_item("cluster_offset", o.cluster_offset)?;
            od.set_item("first", owner_dict(py, o.first, o.first_offset)?)?;
            od.set_item("second", owner_dict(py, o.second, o.second_offset)?)?;
            Ok(od)
        })
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("overlaps", overlaps)?;
    d.set_item("overlap_count", r.overlap_count)?;
    d.set_item("unnamed_metadata", r.unnamed_metadata)?;
    d.set_item("used_runs", &r.used_runs)?;
    d.set_item("repair_log", &r.repair_log)?;
    d.set_item("exit_code", r.exit_code())?;
    Ok(d)
}

/// The fields of one finding's row, in `qcow2ovl.records.CheckFinding`'s order.
const FINDING_FIELDS: &[&str] = &["kind", "severity", "times", "offset", "message"];

/// The repair mode `mode` names: `None` (a plain check), `"leaks"` or `"all"`; anything else
/// is a `ValueError`. The one place that validates a repair mode.
fn repair_mode(mode: &Bound<'_, PyAny>) -> PyResult<Option<Repair>> {
    if mode.is_none() {
        return Ok(None);
    }
    match mode.extract::<String>().as_deref() {
        Ok("leaks") => Ok(Some(Repair::Leaks)),
        Ok("all") => Ok(Some(Repair::All)),
        _ => Err(PyValueError::new_err(format!(
            "repair must be None, 'leaks' or 'all', not {}",
            mode.repr()?
        ))),
    }
}

/// Raises `ValueError` unless `mode` is a repair mode (`None`, `"leaks"` or `"all"`), for
/// callers that validate before starting work (`qcow2ovl.fleet.check`).
#[pyfunction]
pub(crate) fn check_repair_mode(mode: &Bound<'_, PyAny>) -> PyResult<()> {
    repair_mode(mode).map(drop)
}

/// Checks an open image (see `Image.check`); `progress(done, total)` is called as L2 tables
/// are walked. Returns the report as a dict (the Python layer builds `CheckResult`). With
/// `details` false only the counters cross (no findings, overlaps or runs): what a verdict
/// needs, without a Python object for each of the findings kept.
#[pyfunction]
#[pyo3(signature = (image, progress = None, details = true))]
pub(crate) fn check_image<'py>(
    py: Python<'py>,
    image: &PyImage,
    progress: Option<Bound<'py, PyAny>>,
    details: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let img = image.image()?;
    let mut report = match progress {
        Some(cb) => {
            let mut failed: Option<PyErr> = None;
            let mut call = |done: u64, total: u64| {
                if failed.is_none() {
                    if let Err(e) = cb.call1((done, total)) {
                        failed = Some(e);
                    }
                }
            };
            let r = img.check_with_progress(&mut call).map_err(image_err)?;
            if let Some(e) = failed {
                return Err(e);
            }
            r
        }
        None => py.detach(|| img.check()).map_err(image_err)?,
    };
    if !details {
        report.findings = Vec::new();
        report.overlaps = Vec::new();
        report.used_runs = Vec::new();
    }
    report_dict(py, &report)
}

/// Opens the image at `path` for repair (writable, allowed when marked corrupt, dirty or with
/// overlapping metadata; the map guards every write), repairs it (`mode`: `"leaks"` or
/// `"all"`) and returns the final check as a dict, with the fixed counters.
#[pyfunction]
pub(crate) fn repair_image<'py>(
    py: Python<'py>,
    path: PathBuf,
    mode: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let Some(mode) = repair_mode(mode)? else {
        return Err(PyValueError::new_err(
            "repair_image needs a repair mode, not None",
        ));
    };
    let options = OpenOptions {
        writable: true,
        repair: true,
        ..OpenOptions::default()
    };
    let name = path.display().to_string();
    let report = py
        .detach(|| {
            let img = Image::open(&path, options)?;
            let report = img.repair(mode).map_err(|e| e.in_file(&name))?;
            img.flush().map_err(|e| e.in_file(&name))?;
            Ok::<_, ImageError>(report)
        })
        .map_err(image_err)?;
    report_dict(py, &report)
}
