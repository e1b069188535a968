//! Errors found while parsing or validating on-disk qcow2 structures.
//!
//! Where QEMU reports the same problem, the message starts with QEMU's exact words (so that
//! users and tests can match QEMU's iotests) and any detail follows after `: `.

use std::fmt;

use thiserror::Error;

/// Which table a size or offset check was about; its `Display` is QEMU's name for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    /// The refcount table (header fields `refcount_table_offset`/`refcount_table_clusters`).
    RefcountTable,
    /// The snapshot table (header fields `snapshots_offset`/`nb_snapshots`).
    SnapshotTable,
    /// The active L1 table (header fields `l1_table_offset`/`l1_size`).
    ActiveL1,
    /// The L1 table of an internal snapshot (snapshot table entry fields).
    SnapshotL1,
    /// A persistent bitmap's table (bitmap directory entry fields).
    BitmapTable,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::RefcountTable => "Reference count table",
            TableKind::SnapshotTable => "Snapshot table",
            TableKind::ActiveL1 => "Active L1 table",
            TableKind::SnapshotL1 => "Snapshot L1 table",
            TableKind::BitmapTable => "Bitmap table",
        })
    }
}

/// Describes why a table offset is invalid (the detail after QEMU's `... offset invalid`).
fn offset_problem(offset: u64, bytes: u64, cluster_size: u64) -> String {
    if cluster_size != 0 && offset % cluster_size != 0 {
        format!("offset {offset:#x} is not a multiple of the cluster size {cluster_size}")
    } else {
        format!("offset {offset:#x} + {bytes} bytes ends beyond 2^63 - 1")
    }
}

/// A malformed, inconsistent or unsupported on-disk structure.
///
/// [`FormatError::is_unsupported`] separates "valid but not supported here" (e.g. an unknown
/// incompatible feature) from "broken".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The buffer ends before a structure does (a short read or a file cut off).
    #[error("{what} truncated: needs {needed} bytes, only {available} available")]
    Truncated {
        /// The structure being read, e.g. `qcow2 header` or `snapshot table entry 3`.
        what: String,
        /// Bytes needed from the start of the buffer.
        needed: u64,
        /// Bytes the buffer has.
        available: u64,
    },

    /// Header `magic` is not `QFI\xfb`.
    #[error("Image is not in qcow2 format: magic is {found:#010x}, expected 0x514649fb")]
    BadMagic {
        /// The magic found at offset 0.
        found: u32,
    },

    /// Header `version` is neither 2 nor 3.
    #[error("Unsupported qcow2 version {0}{hint}", hint = qcow1_hint(*.0))]
    UnsupportedVersion(u32),

    /// Header `cluster_bits` is outside 9..=21.
    #[error("Unsupported cluster size: 2^{0}: cluster_bits must be between 9 and 21")]
    UnsupportedClusterSize(u32),

    /// Extended L2 entries with clusters too small for 32 subclusters of at least 512 bytes.
    #[error(
        "Unsupported subcluster size: {subcluster_size}: extended L2 entries need cluster_bits \
         >= 14, image has {cluster_bits}"
    )]
    UnsupportedSubclusterSize {
        /// Header `cluster_bits`.
        cluster_bits: u32,
        /// `cluster_size / 32`.
        subcluster_size: u64,
    },

    /// The file ends inside the fixed header fields of its version (72 bytes for version 2,
    /// 104 for version 3): it was cut short.
    #[error(
        "qcow2 header too short: the file is truncated ({file_len} bytes; a version {version} \
         header needs at least {needed})"
    )]
    FileTruncated {
        /// The file's length.
        file_len: u64,
        /// The header's version field.
        version: u32,
        /// Bytes of fixed header fields that version has.
        needed: u64,
    },

    /// Version 3 `header_length` is below 104.
    #[error("qcow2 header too short: header_length is {0}, version 3 needs at least 104")]
    HeaderTooShort(u32),

    /// Version 3 `header_length` is not a multiple of 8 (the spec requires it; QEMU does not
    /// check).
    #[error("qcow2 header length {0} is not a multiple of 8")]
    HeaderLengthUnaligned(u32),

    /// `header_length` is larger than a cluster.
    #[error(
        "qcow2 header exceeds cluster size: header_length {header_length} > cluster size \
         {cluster_size}"
    )]
    HeaderExceedsCluster {
        /// Header `header_length`.
        header_length: u32,
        /// `1 << cluster_bits`.
        cluster_size: u64,
    },

    /// `backing_file_offset` points past the end of cluster 0.
    #[error(
        "Invalid backing file offset: {offset} is past the end of cluster 0 ({cluster_size} bytes)"
    )]
    InvalidBackingFileOffset {
        /// Header `backing_file_offset`.
        offset: u64,
        /// `1 << cluster_bits`.
        cluster_size: u64,
    },

    /// `backing_file_size` is over 1023 or runs past the end of cluster 0.
    #[error(
        "Backing file name too long: backing_file_size is {size}, at most {max} bytes fit at \
         offset {offset}"
    )]
    BackingFileNameTooLong {
        /// Header `backing_file_size`.
        size: u32,
        /// Header `backing_file_offset`.
        offset: u64,
        /// `min(1023, cluster_size - offset)`.
        max: u64,
    },

    /// An extension's header or data runs past the end of the extension area.
    #[error(
        "Header extension too large: extension {magic:#010x} at offset {offset} needs \
         {length} bytes, only {available} remain before offset {end}"
    )]
    ExtensionTooLarge {
        /// Extension type (0 if even the 8-byte extension header did not fit).
        magic: u32,
        /// Offset of the extension header in cluster 0.
        offset: u64,
        /// Bytes needed (8 for a cut-off extension header, else the data length).
        length: u64,
        /// Bytes left before `end`.
        available: u64,
        /// End of the extension area: `backing_file_offset`, else the cluster size.
        end: u64,
    },

    /// The backing format name does not fit QEMU's 16-byte buffer.
    #[error("ERROR: ext_backing_format: len={0} too large (>=16)")]
    BackingFormatTooLong(u32),

    /// A full-disk-encryption header extension in an image whose crypt method is not LUKS.
    #[error(
        "CRYPTO header extension only expected with LUKS encryption method: crypt_method is {0}"
    )]
    UnexpectedCryptoHeader(u32),

    /// The full-disk-encryption header extension's length is not 16.
    #[error("CRYPTO header extension size {0}, but expected size 16")]
    CryptoHeaderExtensionSize(u32),

    /// The encryption header offset is not cluster-aligned.
    #[error(
        "Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'"
    )]
    CryptoHeaderOffsetUnaligned {
        /// Extension field `offset`.
        offset: u64,
        /// `1 << cluster_bits`.
        cluster_size: u64,
    },

    /// The encryption header area wraps around or ends past 2^63 - 1.
    #[error("Encryption header offset invalid: offset {offset:#x} + length {length} ends beyond 2^63 - 1")]
    CryptoHeaderRange {
        /// Extension field `offset`.
        offset: u64,
        /// Extension field `length`.
        length: u64,
    },

    /// LUKS encryption without the extension that says where the LUKS header is.
    #[error("Missing CRYPTO header for crypt method {0}")]
    MissingCryptoHeader(u32),

    /// `crypt_method` is not 0 (none), 1 (AES) or 2 (LUKS).
    #[error("Unsupported encryption method {0}")]
    UnsupportedCryptMethod(u32),

    /// The bitmaps extension's length is not 24.
    #[error("bitmaps_ext: Invalid extension length: {0}, expected 24")]
    BitmapsExtensionLength(u32),

    /// The bitmaps extension's reserved field is not zero.
    #[error("bitmaps_ext: Reserved field is not zero: {0:#x}")]
    BitmapsExtensionReserved(u32),

    /// More bitmaps than QEMU supports.
    #[error("bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of 65535")]
    TooManyBitmaps(u32),

    /// A bitmaps extension that lists no bitmaps.
    #[error("found bitmaps extension with zero bitmaps")]
    ZeroBitmaps,

    /// The bitmap directory offset is not cluster-aligned.
    #[error(
        "bitmaps_ext: invalid bitmap directory offset: {offset:#x} is not a multiple of the \
         cluster size {cluster_size}"
    )]
    BitmapDirectoryOffset {
        /// Extension field `bitmap_directory_offset`.
        offset: u64,
        /// `1 << cluster_bits`.
        cluster_size: u64,
    },

    /// The bitmap directory is larger than 1024 * 65535 bytes.
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size (67107840)"
    )]
    BitmapDirectorySize(u64),

    /// A bitmap directory of size zero.
    #[error("Requested bitmap directory size is zero")]
    BitmapDirectoryEmpty,

    /// Bitmap directory entries do not tile the directory exactly.
    #[error("Broken bitmap directory: {0}")]
    BrokenBitmapDirectory(String),

    /// The directory holds more entries than the extension's `nb_bitmaps`.
    #[error("More bitmaps found than specified in header extension: nb_bitmaps is {0}")]
    MoreBitmapsThanHeader(u32),

    /// The directory holds fewer entries than the extension's `nb_bitmaps`.
    #[error(
        "Less bitmaps found than specified in header extension: found {found}, nb_bitmaps is \
         {expected}"
    )]
    FewerBitmapsThanHeader {
        /// Entries found.
        found: u32,
        /// Extension field `nb_bitmaps`.
        expected: u32,
    },

    /// A bitmap with type-specific extra data, which no known bitmap type defines.
    #[error("Bitmap extra data is not supported: bitmap '{name}' has {size} bytes")]
    BitmapExtraData {
        /// Bitmap name.
        name: String,
        /// Entry field `extra_data_size`.
        size: u32,
    },

    /// A bitmap directory entry violates the spec's or QEMU's constraints.
    #[error("Bitmap '{name}' doesn't satisfy the constraints: {reason}")]
    BitmapConstraints {
        /// Bitmap name.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A bitmap table entry has reserved bits set or an unaligned offset.
    #[error("Invalid bitmap table entry {entry:#018x}: {reason}")]
    BitmapTableEntry {
        /// The raw entry.
        entry: u64,
        /// What is wrong.
        reason: &'static str,
    },

    /// `refcount_order` is above 6.
    #[error(
        "Reference count entry width too large; may not exceed 64 bits: refcount_order is {0}"
    )]
    RefcountOrderTooLarge(u32),

    /// `compression_type` is neither 0 (deflate) nor 1 (zstd).
    #[error("qcow2: unknown compression type: {0}")]
    UnknownCompressionType(u8),

    /// Deflate compression with incompatible feature bit 3 set.
    #[error("qcow2: Compression type incompatible feature bit must not be set")]
    CompressionBitSet,

    /// A non-deflate compression type without incompatible feature bit 3.
    #[error(
        "qcow2: Compression type incompatible feature bit must be set: compression_type is {0}"
    )]
    CompressionBitMissing(u8),

    /// Incompatible feature bits this implementation does not know.
    #[error("Unsupported qcow2 feature(s): {names}")]
    UnsupportedFeatures {
        /// The unknown bits.
        mask: u64,
        /// Names from the feature name table, then `Unknown incompatible feature: <hex>`.
        names: String,
    },

    /// A value given to a serializer does not fit its on-disk field (a snapshot name longer
    /// than 65535 bytes, a backing file name longer than 1023 bytes, ...).
    #[error("{field} is {len} bytes long; at most {max} fit")]
    FieldTooLarge {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: u64,
        /// The largest length the format allows.
        max: u64,
    },

    /// No refcount table: zero clusters or offset 0.
    #[error(
        "Image does not contain a reference count table: refcount_table_clusters is {clusters}, \
         refcount_table_offset is {offset:#x}"
    )]
    NoRefcountTable {
        /// Header `refcount_table_offset`.
        offset: u64,
        /// Header `refcount_table_clusters`.
        clusters: u32,
    },

    /// A table is larger than QEMU's limit for it.
    #[error("{table} too large: {entries} entries of {entry_size} bytes exceed the limit of {max_bytes} bytes")]
    TableTooLarge {
        /// Which table.
        table: TableKind,
        /// Number of entries (or clusters for the refcount table).
        entries: u64,
        /// Bytes per entry (or the cluster size).
        entry_size: u64,
        /// QEMU's limit in bytes.
        max_bytes: u64,
    },

    /// A table offset is not cluster-aligned or the table ends beyond 2^63 - 1.
    #[error("{table} offset invalid: {}", offset_problem(*.offset, *.bytes, *.cluster_size))]
    TableOffsetInvalid {
        /// Which table.
        table: TableKind,
        /// The table's offset.
        offset: u64,
        /// The table's size in bytes.
        bytes: u64,
        /// `1 << cluster_bits`.
        cluster_size: u64,
    },

    /// The virtual size needs more than `i32::MAX` L1 entries.
    #[error("Image is too big: virtual size {size} needs {needed} L1 entries")]
    ImageTooBig {
        /// Header `size`.
        size: u64,
        /// L1 entries needed.
        needed: u64,
    },

    /// `l1_size` cannot map the whole virtual disk.
    #[error(
        "L1 table is too small: l1_size is {l1_size}, virtual size {size} needs {needed} entries"
    )]
    L1TooSmall {
        /// Header `l1_size`.
        l1_size: u32,
        /// Header `size`.
        size: u64,
        /// L1 entries needed.
        needed: u64,
    },

    /// Autoclear bit 1 (raw external data) without incompatible bit 2 (external data file).
    #[error(
        "data-file-raw requires a data file: autoclear bit 1 is set without incompatible bit 2"
    )]
    RawDataWithoutDataFile,

    /// A snapshot table entry with more than 1024 bytes of extra data.
    #[error(
        "Too much extra metadata in snapshot table entry {index}: extra_data_size {size} > 1024"
    )]
    SnapshotExtraTooLarge {
        /// Entry index (0-based).
        index: u32,
        /// Entry field `extra_data_size`.
        size: u32,
    },

    /// The snapshot table is larger than 64 MiB.
    #[error("Snapshot table is too big: {bytes} bytes after {entries} entries exceed 67108864")]
    SnapshotTableTooBig {
        /// Table bytes up to and including the offending entry.
        bytes: u64,
        /// Entries counted so far.
        entries: u32,
    },

    /// A refcount access outside the block.
    #[error(
        "Refcount index {index} out of range: the block holds {entries} entries of {bits} bits"
    )]
    RefcountIndexOutOfRange {
        /// Requested entry.
        index: usize,
        /// Entries in the block.
        entries: usize,
        /// Refcount width.
        bits: u32,
    },

    /// A refcount value wider than the entry.
    #[error("Refcount value {value} does not fit in {bits} bits")]
    RefcountTooLarge {
        /// Value to store.
        value: u64,
        /// Refcount width.
        bits: u32,
    },
}

/// Checks that `len` fits a field whose largest value is `max`; the error names `field`.
pub fn fit(field: &'static str, len: usize, max: u64) -> Result<u64, FormatError> {
    let len = len as u64;
    if len > max {
        return Err(FormatError::FieldTooLarge { field, len, max });
    }
    Ok(len)
}

/// A note for version 1, which is the older qcow format rather than a qcow2 version.
fn qcow1_hint(version: u32) -> &'static str {
    if version == 1 {
        " (this is an image in the older qcow format, not qcow2)"
    } else {
        ""
    }
}

impl FormatError {
    /// True for structures that are valid per the spec (or plausibly from a newer writer) but
    /// that this implementation, like QEMU, does not support; false for broken images.
    pub fn is_unsupported(&self) -> bool {
        match self {
            FormatError::UnsupportedFeatures { .. }
            | FormatError::UnsupportedVersion(_)
            | FormatError::UnknownCompressionType(_)
            | FormatError::UnsupportedCryptMethod(_)
            | FormatError::UnsupportedSubclusterSize { .. }
            | FormatError::BitmapExtraData { .. } => true,
            // The spec allows any cluster_bits >= 9; above 21 is QEMU's implementation limit.
            FormatError::UnsupportedClusterSize(bits) => *bits > 21,
            _ => false,
        }
    }

    /// Shorthand for a [`FormatError::Truncated`].
    pub(crate) fn truncated(what: impl Into<String>, needed: u64, available: usize) -> Self {
        FormatError::Truncated {
            what: what.into(),
            needed,
            available: available as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_start_with_qemu_phrases() {
        let cases: Vec<(FormatError, &str)> = vec![
            (
                FormatError::TableTooLarge {
                    table: TableKind::ActiveL1,
                    entries: 1 << 30,
                    entry_size: 8,
                    max_bytes: 32 << 20,
                },
                "Active L1 table too large",
            ),
            (
                FormatError::TableOffsetInvalid {
                    table: TableKind::RefcountTable,
                    offset: 0x1234,
                    bytes: 65536,
                    cluster_size: 65536,
                },
                "Reference count table offset invalid: offset 0x1234 is not a multiple",
            ),
            (
                FormatError::TableOffsetInvalid {
                    table: TableKind::SnapshotL1,
                    offset: 1 << 63,
                    bytes: 8,
                    cluster_size: 512,
                },
                "Snapshot L1 table offset invalid: offset 0x8000000000000000 + 8 bytes ends",
            ),
            (
                FormatError::UnsupportedVersion(4),
                "Unsupported qcow2 version 4",
            ),
            (
                FormatError::BadMagic { found: 0 },
                "Image is not in qcow2 format",
            ),
            (
                FormatError::NoRefcountTable {
                    offset: 0,
                    clusters: 0,
                },
                "Image does not contain a reference count table",
            ),
            (
                FormatError::RefcountOrderTooLarge(7),
                "Reference count entry width too large; may not exceed 64 bits",
            ),
        ];
        for (err, prefix) in cases {
            let text = err.to_string();
            assert!(
                text.starts_with(prefix),
                "{text:?} does not start with {prefix:?}"
            );
        }
    }

    #[test]
    fn unsupported_classification() {
        assert!(FormatError::UnknownCompressionType(7).is_unsupported());
        assert!(FormatError::UnsupportedFeatures {
            mask: 32,
            names: String::new()
        }
        .is_unsupported());
        assert!(FormatError::UnsupportedClusterSize(22).is_unsupported());
        assert!(!FormatError::UnsupportedClusterSize(8).is_unsupported());
        assert!(!FormatError::ZeroBitmaps.is_unsupported());
    }
}
