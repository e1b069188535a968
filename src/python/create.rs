//! `qcow2ovl._core.create_image`: the Rust image creator behind `qcow2ovl.create()`.

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::u64_obj;
use super::errors::LockError;
use crate::create::{
    create_file, CompressionType, CreateError, CreateOptions, CryptoArea, Preallocation,
};
use crate::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg, Luks, LuksCreateOptions};
use crate::image::Secret;

/// Maps a creation error: option errors are `ValueError` with QEMU's message, I/O errors the
/// `OSError` subclass of their errno (`FileExistsError` for an existing file), with the path.
fn create_err(e: CreateError) -> PyErr {
    match e {
        CreateError::Io { path, source, .. } => match source.raw_os_error() {
            Some(errno) => {
                let text = std::io::Error::from_raw_os_error(errno).to_string();
                let text = text.split(" (os error").next().unwrap_or(&text).to_string();
                PyOSError::new_err((errno, text, path))
            }
            None => PyOSError::new_err(format!("{path}: {source}")),
        },
        CreateError::Lock(lock) => {
            let path = lock.path().unwrap_or_default().to_string();
            LockError::new_err((lock.to_string(), path))
        }
        other => PyValueError::new_err(other.to_string()),
    }
}

/// The compression type enum for `"zlib"` or `"zstd"`.
fn compression_arg(name: &str) -> PyResult<CompressionType> {
    match name {
        "zlib" => Ok(CompressionType::Zlib),
        "zstd" => Ok(CompressionType::Zstd),
        other => Err(PyValueError::new_err(format!(
            "Parameter 'compression-type' does not accept value '{other}'"
        ))),
    }
}

/// The preallocation enum for `"off"`, `"metadata"`, `"falloc"` or `"full"`.
fn preallocation_arg(name: &str) -> PyResult<Preallocation> {
    match name {
        "off" => Ok(Preallocation::Off),
        "metadata" => Ok(Preallocation::Metadata),
        "falloc" => Ok(Preallocation::Falloc),
        "full" => Ok(Preallocation::Full),
        other => Err(PyValueError::new_err(format!(
            "Parameter 'preallocation' does not accept value '{other}'"
        ))),
    }
}

/// Names QEMU's `cipher-alg` takes that this engine has no cipher for.
const QEMU_ONLY_CIPHERS: &[&str] = &[
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];

/// QEMU's refusal of `value` for the creation option `encrypt.NAME`.
fn not_accepted(name: &str, value: &str) -> PyErr {
    PyValueError::new_err(format!(
        "Parameter '{name}' does not accept value '{value}'"
    ))
}

/// The LUKS creation options and secret of `qcow2ovl.create(encrypt=...)`, checked in Python
/// for their keys: `key_secret` (bytes) and the optional algorithm names and `iter_time`.
fn luks_options(encrypt: &Bound<'_, PyDict>) -> PyResult<(LuksCreateOptions, Secret)> {
    let mut opts = LuksCreateOptions::default();
    let text = |key: &str| -> PyResult<Option<String>> {
        encrypt
            .get_item(key)?
            .map(|v| v.extract::<String>())
            .transpose()
    };
    if let Some(name) = text("cipher_alg")? {
        opts.cipher_alg = match CipherAlg::from_name(&name) {
            Some(alg) => alg,
            None if QEMU_ONLY_CIPHERS.contains(&name.as_str()) => {
                return Err(PyValueError::new_err(format!(
                    "Cipher algorithm '{name}' is not supported here (only aes-128, aes-192 and \
                     aes-256)"
                )))
            }
            None => return Err(not_accepted("cipher-alg", &name)),
        };
    }
    if let Some(name) = text("cipher_mode")? {
        opts.cipher_mode =
            CipherMode::from_name(&name).map_err(|_| not_accepted("cipher-mode", &name))?;
    }
    if let Some(name) = text("ivgen_alg")? {
        opts.ivgen_alg =
            IvGenAlg::from_name(&name).map_err(|_| not_accepted("ivgen-alg", &name))?;
    }
    if let Some(name) = text("ivgen_hash_alg")? {
        opts.ivgen_hash_alg =
            Some(HashAlg::from_name(&name).map_err(|_| not_accepted("ivgen-hash-alg", &name))?);
    }
    if let Some(name) = text("hash_alg")? {
        opts.hash_alg = HashAlg::from_name(&name).map_err(|_| not_accepted("hash-alg", &name))?;
    }
    if let Some(ms) = encrypt.get_item("iter_time")? {
        opts.iter_time_ms = u64_obj("iter_time", &ms)?;
    }
    let secret = match encrypt.get_item("key_secret")? {
        Some(v) => Secret::new(v.extract::<Vec<u8>>()?),
        None => return Err(PyValueError::new_err(crate::crypto::KEY_SECRET_REQUIRED)),
    };
    Ok((opts, secret))
}

/// Creates a qcow2 image at `path` (see `qcow2ovl.create`). Releases the GIL while writing.
#[pyfunction]
#[pyo3(signature = (
    path, size, *, cluster_size = None, version = 3, refcount_bits = None, extended_l2 = false,
    lazy_refcounts = false, compression_type = "zlib", backing_file = None, backing_format = None,
    data_file = None, data_file_raw = false, preallocation = "off", overwrite = false,
    locking = "auto", encrypt = None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn create_image(
    py: Python<'_>,
    path: PathBuf,
    size: &Bound<'_, PyAny>,
    cluster_size: Option<&Bound<'_, PyAny>>,
    version: u32,
    refcount_bits: Option<&Bound<'_, PyAny>>,
    extended_l2: bool,
    lazy_refcounts: bool,
    compression_type: &str,
    backing_file: Option<String>,
    backing_format: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    preallocation: &str,
    overwrite: bool,
    locking: &str,
    encrypt: Option<&Bound<'_, PyDict>>,
) -> PyResult<()> {
    let locking = super::image::locking_arg(locking)?;
    let luks = encrypt.map(luks_options).transpose()?;
    let mut opts = CreateOptions {
        size: u64_obj("size", size)?,
        cluster_size: cluster_size.map_or(Ok(65536), |v| u64_obj("cluster_size", v))?,
        version,
        refcount_bits: refcount_bits.map_or(Ok(16), |v| u64_obj("refcount_bits", v))?,
        extended_l2,
        lazy_refcounts,
        compression: compression_arg(compression_type)?,
        backing_file,
        backing_format,
        data_file,
        data_file_raw,
        preallocation: preallocation_arg(preallocation)?,
        encryption: None,
    };
    py.detach(|| {
        if let Some((luks, secret)) = &luks {
            // The key derivation takes `iter_time` of CPU: without the GIL.
            let (area, _) = Luks::create(luks, secret.bytes())
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            opts.encryption = Some(CryptoArea(area.into()));
        }
        create_file(&path, &opts, overwrite, locking).map_err(create_err)
    })
}
