//! On-disk qcow2 structures: parse and serialize from byte slices, no I/O.
//!
//! Everything here is pure: functions take the bytes a caller read and return typed values or
//! a [`FormatError`]. Nothing panics on file data; arithmetic on file-derived values is checked.
//!
//! - [`header`]: the header, feature bits, parse/validate/serialize.
//! - [`extension`]: header extensions (backing format, feature names, bitmaps, crypto, data file).
//! - [`entry`]: L1/L2 entries (standard, extended, compressed) and table codecs.
//! - [`refcount`]: refcount block entries of every width and refcount table entries.
//! - [`snapshot`]: the snapshot table.
//! - [`bitmap`]: the bitmap directory and bitmap table entries.
//! - [`mapping`]: the decoded meaning of an L2 entry for one (sub)cluster.
//! - [`features`]: feature bit and compression type names.
//! - [`offsets`]: typed guest/host offsets and the cluster geometry.
//! - [`limits`]: QEMU's implementation limits and the shared table bounds check.

mod be;
pub mod bitmap;
pub mod entry;
pub mod error;
pub mod extension;
pub mod features;
pub mod header;
pub mod limits;
pub mod mapping;
pub mod new_image;
pub mod offsets;
pub mod refcount;
pub mod snapshot;
#[cfg(test)]
mod testdata;

pub use bitmap::{
    parse_bitmap_directory, serialize_bitmap_directory, BitmapDirectoryEntry, BitmapTableEntry,
};
pub use entry::{
    read_extended_l2_table, read_u64_table, write_extended_l2_table, write_u64_table,
    CompressedDescriptor, ExtendedL2Entry, L1Entry, L2Entry,
};
pub use error::{FormatError, TableKind};
pub use extension::{BitmapsExtension, FeatureName, HeaderExtension};
pub use header::{AutoclearFeatures, CompatibleFeatures, Header, IncompatibleFeatures};
pub use limits::validate_table;
pub use mapping::{L2Mapping, MappingError};
pub use offsets::{ClusterCount, ClusterIndex, Geometry, GuestOffset, HostOffset};
pub use refcount::{max_refcount, refcount_get, refcount_set, ReftableEntry};
pub use snapshot::{parse_snapshot_table, serialize_snapshot_table, SnapshotEntry};

/// A number as C's `%#x` prints it in QEMU's messages: `0x1f`, but `0` for zero (no prefix).
pub fn c_hex(value: u64) -> String {
    if value == 0 {
        "0".to_string()
    } else {
        format!("{value:#x}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn c_hex_prints_as_printf_does() {
        assert_eq!(super::c_hex(0), "0");
        assert_eq!(super::c_hex(0x40200), "0x40200");
    }
}
