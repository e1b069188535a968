//! qcow2ovl: scan qcow2 images into a compact metadata map and answer metadata overlap
//! queries in constant time.
//!
//! Layers (see `docs/design/architecture.md`): [`format`](mod@format) parses on-disk
//! structures from bytes, [`storage`] does positioned I/O, [`overlap`] holds the metadata map
//! and QEMU's naive reference checker, [`scan`] fills a map from an image, and `python` (behind
//! the `python` feature) exposes all of it to Python; [`image`] is the engine that reads guest
//! data, [`lock`] takes QEMU's image locks on every file it opens, and [`problem`] holds what a
//! scan reports.

#![deny(missing_docs)]

pub mod create;
pub mod format;
pub mod image;
pub mod lock;
pub mod overlap;
pub mod problem;
pub mod scan;
pub mod storage;

#[cfg(feature = "python")]
mod python;
