//! The read side of the open image: where a guest offset lives, the tables that say so, and
//! the files guest data comes from.
//!
//! | file | concern |
//! |---|---|
//! | `mapping.rs` | guest offset → decoded [`L2Mapping`](crate::format::L2Mapping) extents |
//! | `cache.rs` | the bounded L2 table cache (O(1) LRU; tables the writer changed are pinned) |
//! | `backing.rs` | the backing chain and the external data file, and their locks |
//! | `data.rs` | guest reads: data, zeros, subclusters, compressed clusters, backing files |
//! | `reader.rs` | a long-lived second reader thread for long runs of data |
//! | `guest_map.rs` | `qemu-img map`'s view of the guest disk |

pub(crate) mod backing;
pub(crate) mod cache;
mod data;
mod guest_map;
mod mapping;
pub(in crate::image) mod reader;

pub use backing::Backing;
pub use cache::{Table, TableCache};
pub use guest_map::GuestExtent;
pub use mapping::Extent;
