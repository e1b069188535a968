//! Metadata overlap checks: the metadata types, the metadata map and QEMU's naive algorithm.

mod map;
mod naive;
mod table;
mod types;

pub use map::{MapError, MetadataMap, MAX_ENTER_CLUSTERS, MAX_HOST_OFFSET};
pub use naive::{NaiveChecker, NaiveError, NaiveLayout};
pub use types::MetadataType;
