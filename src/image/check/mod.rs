//! `check` and `check -r`, as qemu-img does them: every cluster's refcount recomputed from the
//! metadata and compared with the refcount structures, every metadata overlap named, and the
//! repairs.
//!
//! | file | concern |
//! |---|---|
//! | `finding.rs` | one finding: its problem with the facts of its kind, severity, qemu-img's line |
//! | `report.rs` | what a check reports: findings, overlaps, counters, exit code |
//! | `counts.rs` | the recomputed per-cluster refcounts and the decoding of refcount blocks |
//! | `walk.rs` | the walk over every table, in qemu-img's order: its state and its steps |
//! | `tables.rs` | the walk's L1 and L2 tables (each L2 table read once) and bitmaps |
//! | `compare.rs` | the walk's refcount blocks, the comparison with the disk, the overlaps |
//! | `repair.rs` | `check -r leaks\|all`: the steps, in order, and the counters of what they fixed |
//! | `fixes.rs` | the steps' edits: refcounts, COPIED flags, unaligned preallocated entries |
//! | `repair_tests.rs` | repair unit tests |
//! | `rebuild.rs` | a damaged refcount structure rebuilt past everything in use |

mod compare;
mod counts;
mod finding;
mod fixes;
mod rebuild;
mod repair;
mod report;
mod tables;
mod walk;

pub(crate) use counts::Counts;
pub use finding::{Finding, FindingKind, L2EntryAt, L2Position, Severity};
pub use repair::{Repair, NEED_REBUILD};
pub use report::{CheckReport, Overlap, Owner};
