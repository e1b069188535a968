//! Metadata overlap checks: the metadata types, the metadata map and QEMU's naive algorithm.

mod types;

pub use types::MetadataType;
