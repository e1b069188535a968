//! Creating new images: option validation with QEMU's rules and messages, a pure layout planner,
//! and a writer over [`Storage`].
//!
//! Layout of a new image (cluster indices):
//!
//! | what | where |
//! |---|---|
//! | header | cluster 0 |
//! | refcount table | from cluster 1 |
//! | refcount blocks | right after the refcount table |
//! | active L1 table | right after the refcount blocks (none for a zero-sized image) |
//! | `preallocation=metadata` | each L2 table followed by the data clusters it maps |
//! | `falloc` / `full` | every L2 table, then every data cluster in guest order |
//! | external data file | every L2 table; guest cluster *n* is cluster *n* of the data file |
//! | LUKS header area (encrypted images) | after all of the above, in whole clusters (QEMU sets up encryption once the disk is sized and preallocated) |
//!
//! Every cluster from 0 to the end of the layout is in use exactly once, so every refcount is 1
//! and the refcount blocks are "ones up to the end". The refcount structures must count
//! themselves: their size is the fixed point of "blocks covering everything, including the
//! blocks and the table" (see [`refcount_fixpoint`]). While one refcount block covers the
//! whole file (just under 2 GiB with 64 KiB clusters and 16-bit refcounts), with or without
//! `preallocation=metadata`, this is byte for byte QEMU's layout. Beyond that QEMU adds refcount
//! blocks where it runs out of them (after a large L1 table, between data clusters), and for
//! `falloc`/`full` it moves its refcount table behind the L1 table and reuses cluster 1 for an
//! L2 table. We keep the refcount structures together at the front in every case;
//! `qemu-img check` finds either layout clean.
//!
//! Write order (nothing points at a structure before it is complete, the header goes last):
//! the file length, refcount blocks, refcount table, L2 tables, L1 table, zeros for `full`,
//! the external data file, the LUKS header area, then the header, then a flush.
//!
//! | file | concern |
//! |---|---|
//! | `options.rs` | [`CreateOptions`], limits, [`CreateError`] with QEMU's messages |
//! | `plan.rs` | [`plan`]: validation in QEMU's order and the [`Plan`] of every table |
//! | `write.rs` | [`write_image`]: the ordered writes of a plan into storage |
//! | `file.rs` | [`create_file`]: the files, their locks, `falloc`, clean-up on failure |

mod file;
mod options;
mod plan;
mod write;

pub use file::create_file;
pub use options::*;
pub use plan::{plan, refcount_fixpoint, DataPlacement, Plan};
pub use write::write_image;

#[cfg(test)]
mod tests;
