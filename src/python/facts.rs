//! Image facts as the Python dicts the package builds its records from: the header's facts
//! (`ImageInfo`), a snapshot entry (`Snapshot`), and the `encrypt` object of a LUKS header in
//! the keys and order of `qemu-img info --output=json`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::crypto::LuksInfo;
use crate::format::features::{compression_name, feature_names};
use crate::format::CompatibleFeatures;
use crate::image::Image;

/// The header's facts (the Python layer turns them into `ImageInfo`).
pub(super) fn info_dict<'py>(py: Python<'py>, img: &Image) -> PyResult<Bound<'py, PyDict>> {
    let h = img.header();
    let d = PyDict::new(py);
    d.set_item("version", h.version)?;
    d.set_item("virtual_size", h.size)?;
    d.set_item("cluster_size", h.cluster_size())?;
    d.set_item("refcount_bits", h.refcount_bits())?;
    d.set_item("compression_type", compression_name(h.compression_type))?;
    d.set_item("extended_l2", h.is_extended_l2())?;
    d.set_item("crypt_method", h.crypt_method)?;
    d.set_item(
        "lazy_refcounts",
        h.compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS),
    )?;
    d.set_item("dirty", h.is_dirty())?;
    d.set_item("corrupt", h.is_corrupt())?;
    d.set_item("backing_file", h.backing_file.as_deref())?;
    d.set_item("backing_format", h.backing_format())?;
    d.set_item("data_file", h.data_file())?;
    d.set_item("features", feature_names(h))?;
    d.set_item("l1_table_offset", h.l1_table_offset)?;
    d.set_item("l1_size", h.l1_size)?;
    d.set_item("refcount_table_offset", h.refcount_table_offset)?;
    d.set_item("refcount_table_clusters", h.refcount_table_clusters)?;
    d.set_item("snapshots_offset", h.snapshots_offset)?;
    d.set_item("crypto_header", h.crypto_header())?;
    d.set_item("file_size", img.file_len())?;
    Ok(d)
}

/// QEMU's `encrypt` object for a LUKS header, its keys in `qemu-img info`'s order (the hash of
/// an essiv IV generator only where there is one; a slot's iterations and stripes only when it
/// is active).
pub(super) fn luks_info_dict<'py>(py: Python<'py>, i: &LuksInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ivgen-alg", i.ivgen_alg.to_string())?;
    d.set_item("detached-header", i.detached_header)?;
    d.set_item("hash-alg", i.hash_alg.to_string())?;
    d.set_item("cipher-alg", i.cipher_alg.to_string())?;
    d.set_item("uuid", &i.uuid)?;
    if let Some(h) = i.ivgen_hash_alg {
        d.set_item("ivgen-hash-alg", h.to_string())?;
    }
    d.set_item("format", "luks")?;
    d.set_item("cipher-mode", i.cipher_mode.to_string())?;
    let slots = i
        .slots
        .iter()
        .map(|s| {
            let slot = PyDict::new(py);
            slot.set_item("active", s.active)?;
            if let Some(n) = s.iters {
                slot.set_item("iters", n)?;
            }
            slot.set_item("key-offset", s.key_offset)?;
            if let Some(n) = s.stripes {
                slot.set_item("stripes", n)?;
            }
            Ok(slot)
        })
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("slots", slots)?;
    d.set_item("payload-offset", i.payload_offset)?;
    d.set_item("master-key-iters", i.master_key_iters)?;
    Ok(d)
}

/// A snapshot entry as the dict `qcow2ovl.Snapshot` is built from.
pub(super) fn snapshot_dict<'py>(
    py: Python<'py>,
    s: &crate::format::SnapshotEntry,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &s.id)?;
    d.set_item("name", &s.name)?;
    d.set_item("l1_table_offset", s.l1_table_offset)?;
    d.set_item("l1_size", s.l1_size)?;
    d.set_item("vm_state_size", s.vm_state_bytes())?;
    d.set_item("date_sec", s.date_sec)?;
    d.set_item("date_nsec", s.date_nsec)?;
    d.set_item("vm_clock_nsec", s.vm_clock_nsec)?;
    d.set_item("disk_size", s.disk_size)?;
    d.set_item("icount", s.icount)?;
    Ok(d)
}
