//! QEMU's implementation limits and the shared table bounds check.
//!
//! The spec allows larger tables than QEMU will open; we use QEMU's limits so that an image we
//! accept is one QEMU accepts too, and so that a corrupt size field cannot make us allocate
//! gigabytes.

use super::error::{FormatError, TableKind};

/// Largest L1 table (active or snapshot) QEMU opens: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots QEMU supports.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Size of the fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;
/// Largest snapshot table QEMU reads: 64 MiB.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS;
/// Most extra data bytes per snapshot table entry QEMU accepts.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_FILE_NAME: u64 = 1023;
/// Table ends must stay at or below this (QEMU passes offsets around as `int64_t`).
pub const MAX_TABLE_END: u64 = i64::MAX as u64;
/// Largest length QEMU's block layer allows for an image or a request's end: 2^63 - 1 rounded
/// down to 1 GiB. A new image may not be larger; a refcount block ending past it cannot be read.
pub const MAX_IMAGE_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// QEMU's `qcow2_validate_table`: a table of `entries` entries of `entry_size` bytes at
/// `offset` must be at most `max_bytes` long (`<table> too large`), cluster-aligned and end at
/// or below 2^63 - 1 (`<table> offset invalid`).
pub fn validate_table(
    table: TableKind,
    offset: u64,
    entries: u64,
    entry_size: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    if entry_size == 0 || entries > max_bytes / entry_size {
        return Err(FormatError::TableTooLarge {
            table,
            entries,
            entry_size,
            max_bytes,
        });
    }
    // Cannot overflow: entries * entry_size <= max_bytes.
    let bytes = entries * entry_size;
    let unaligned = cluster_size != 0 && offset % cluster_size != 0;
    if unaligned || MAX_TABLE_END - bytes < offset {
        return Err(FormatError::TableOffsetInvalid {
            table,
            offset,
            bytes,
            cluster_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_table_limits() {
        let ok = validate_table(
            TableKind::ActiveL1,
            0x30000,
            4 << 20,
            8,
            MAX_L1_BYTES,
            65536,
        );
        assert!(ok.is_ok());
        let err = validate_table(
            TableKind::ActiveL1,
            0x30000,
            (4 << 20) + 1,
            8,
            MAX_L1_BYTES,
            512,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Active L1 table too large"));
        let err =
            validate_table(TableKind::SnapshotTable, 0x30200, 1, 40, 40 << 16, 65536).unwrap_err();
        assert!(err.to_string().starts_with("Snapshot table offset invalid"));
        let err = validate_table(
            TableKind::RefcountTable,
            i64::MAX as u64 & !0xffff,
            2,
            65536,
            MAX_REFTABLE_BYTES,
            65536,
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("Reference count table offset invalid"));
        // Zero entries at an aligned offset are fine, even at the very end.
        assert!(validate_table(TableKind::SnapshotL1, 1 << 62, 0, 8, MAX_L1_BYTES, 512).is_ok());
    }
}
