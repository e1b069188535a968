//! qcow2ovl: a qcow2 engine whose every write is guarded by a compact metadata map that answers
//! "would this write touch metadata, and which?" in constant time.
//!
//! Layers (see `docs/design/architecture.md`): [`format`](mod@format) parses and builds on-disk
//! structures from bytes, [`storage`] does positioned I/O, [`lock`] takes QEMU's image locks on
//! every file the engine opens, [`overlap`] holds the metadata map and QEMU's naive reference
//! checker, [`scan`] reads an image's metadata into a map (and [`problem`] holds what it
//! reports), [`image`] is the open image (reads, guarded writes, snapshots, check and repair),
//! [`create`] makes new images, [`convert`] copies a disk from one image to another, [`crypto`]
//! reads, unlocks and makes LUKS headers and ciphers encrypted guest data, and `python` (behind
//! the `python` feature) exposes all of it to Python.

#![deny(missing_docs)]

pub mod chain;
pub mod convert;
pub mod create;
/// LUKS encryption from bytes: headers parsed and made, key slots unlocked, sectors ciphered.
pub mod crypto;
pub mod format;
pub mod image;
pub mod lock;
/// The NBD protocol, server side, as pure byte-in/byte-out state machines (no I/O).
pub mod nbd;
pub mod overlap;
pub mod problem;
pub mod scan;
/// `qcow2ovl serve`: an NBD server over one image, its writes through the guarded engine.
pub mod serve;
pub mod storage;

#[cfg(feature = "python")]
mod python;
