//! What a freshly created image holds on disk: the header fields and extensions a new image
//! starts with, the entries that point at preallocated tables and clusters, and how many
//! refcount structures cover a given number of clusters.
//!
//! Everything here is pure arithmetic and byte building; the image creator (`create`)
//! decides where things go and does the I/O.

use super::entry::{ExtendedL2Entry, L1_L2_OFFSET_MASK, OFLAG_COPIED};
use super::extension::{
    FeatureName, HeaderExtension, FEATURE_KIND_AUTOCLEAR, FEATURE_KIND_COMPATIBLE,
    FEATURE_KIND_INCOMPATIBLE,
};
use super::header::{
    AutoclearFeatures, CompatibleFeatures, Header, IncompatibleFeatures, COMPRESSION_DEFLATE,
    COMPRESSION_TYPE_OFFSET, COMPRESSION_ZSTD, CRYPT_LUKS, CRYPT_NONE, QCOW2_MAGIC,
    V2_HEADER_LENGTH, V2_REFCOUNT_ORDER,
};
use super::limits::MAX_BACKING_FILE_NAME;
use super::offsets::HostOffset;
use super::refcount::{entries_per_block, max_refcount, refcount_set};
use super::FormatError;

/// Bytes per refcount table entry.
pub const REFTABLE_ENTRY_SIZE: u64 = 8;
/// Bytes per L1 table entry.
pub const L1_ENTRY_SIZE: u64 = 8;

/// `header_length` of a new version 3 image: the 104 fixed bytes plus the compression type
/// byte, padded to a multiple of 8 (extensions must start 8-aligned).
pub const V3_NEW_HEADER_LENGTH: u32 = COMPRESSION_TYPE_OFFSET + 8;

/// The feature name table is only written with clusters larger than this: with small clusters
/// its 392 bytes would leave next to no room for a backing file name in cluster 0.
pub const FEATURE_TABLE_MIN_CLUSTER_SIZE: u64 = 4096;

/// Which compression algorithm compressed clusters of the image use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Deflate (raw zlib stream); the only type version 2 images know.
    #[default]
    Zlib,
    /// Zstandard; needs version 3 and incompatible feature bit 3.
    Zstd,
}

impl CompressionType {
    /// The on-disk `compression_type` byte.
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Zlib => COMPRESSION_DEFLATE,
            CompressionType::Zstd => COMPRESSION_ZSTD,
        }
    }
}

/// The feature name table QEMU writes into every new version 3 image: every feature bit it
/// knows, by kind, with its human-readable name.
pub fn standard_feature_names() -> Vec<FeatureName> {
    let entry = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        entry(FEATURE_KIND_INCOMPATIBLE, 0, "dirty bit"),
        entry(FEATURE_KIND_INCOMPATIBLE, 1, "corrupt bit"),
        entry(FEATURE_KIND_INCOMPATIBLE, 2, "external data file"),
        entry(FEATURE_KIND_INCOMPATIBLE, 3, "compression type"),
        entry(FEATURE_KIND_INCOMPATIBLE, 4, "extended L2 entries"),
        entry(FEATURE_KIND_COMPATIBLE, 0, "lazy refcounts"),
        entry(FEATURE_KIND_AUTOCLEAR, 0, "bitmaps"),
        entry(FEATURE_KIND_AUTOCLEAR, 1, "raw external data"),
    ]
}

/// The header fields of a new image that are not about table placement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewHeaderFields {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the refcount width (must be 4 for version 2).
    pub refcount_order: u32,
    /// 16-byte L2 entries with subclusters (version 3).
    pub extended_l2: bool,
    /// Compatible feature "lazy refcounts" (version 3).
    pub lazy_refcounts: bool,
    /// Compression type (anything but zlib needs version 3).
    pub compression: CompressionType,
    /// Backing file name as it is to be stored.
    pub backing_file: Option<String>,
    /// Backing file format name.
    pub backing_format: Option<String>,
    /// External data file name as it is to be stored (version 3).
    pub data_file: Option<String>,
    /// Autoclear bit "raw external data" (needs a data file).
    pub data_file_raw: bool,
    /// LUKS encryption with a header area of this many bytes (`crypt_method` 2). The
    /// extension's offset is left 0 for the caller, which places the area.
    pub crypto_area_len: Option<u64>,
}

/// Builds the header of a new image: features and extensions as QEMU writes them (backing
/// format, external data file, then the feature name table for version 3 with clusters over
/// 4 KiB), the backing file name after the extensions, table fields zero (the caller fills them
/// in).
///
/// Fails when the backing file name is longer than the spec allows.
pub fn new_header(f: &NewHeaderFields) -> Result<Header, FormatError> {
    let v3 = f.version >= 3;
    let mut incompatible = IncompatibleFeatures::empty();
    let mut compatible = CompatibleFeatures::empty();
    let mut autoclear = AutoclearFeatures::empty();
    if f.data_file.is_some() {
        incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
    }
    if f.compression != CompressionType::Zlib {
        incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
    }
    if f.extended_l2 {
        incompatible |= IncompatibleFeatures::EXTENDED_L2;
    }
    if f.lazy_refcounts {
        compatible |= CompatibleFeatures::LAZY_REFCOUNTS;
    }
    if f.data_file_raw {
        autoclear |= AutoclearFeatures::RAW_EXTERNAL_DATA;
    }
    let mut extensions = Vec::new();
    if let Some(fmt) = &f.backing_format {
        extensions.push(HeaderExtension::BackingFormat(fmt.clone()));
    }
    if let Some(name) = &f.data_file {
        extensions.push(HeaderExtension::ExternalDataFile(name.clone()));
    }
    // QEMU's order: backing format, data file, the encryption header, the feature table.
    if let Some(length) = f.crypto_area_len {
        extensions.push(HeaderExtension::CryptoHeader { offset: 0, length });
    }
    let cluster_size = 1u64.checked_shl(f.cluster_bits).unwrap_or(0);
    if v3 && cluster_size > FEATURE_TABLE_MIN_CLUSTER_SIZE {
        extensions.push(HeaderExtension::FeatureNameTable(standard_feature_names()));
    }
    if let Some(name) = &f.backing_file {
        if name.len() as u64 > MAX_BACKING_FILE_NAME {
            return Err(FormatError::BackingFileNameTooLong {
                size: u32::try_from(name.len()).unwrap_or(u32::MAX),
                offset: 0,
                max: MAX_BACKING_FILE_NAME,
            });
        }
    }
    let mut h = Header {
        magic: QCOW2_MAGIC,
        version: f.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: f.cluster_bits,
        size: f.size,
        crypt_method: if f.crypto_area_len.is_some() {
            CRYPT_LUKS
        } else {
            CRYPT_NONE
        },
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: compatible,
        autoclear_features: autoclear,
        refcount_order: if v3 {
            f.refcount_order
        } else {
            V2_REFCOUNT_ORDER
        },
        header_length: if v3 {
            V3_NEW_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        },
        compression_type: f.compression.to_byte(),
        header_tail: if v3 {
            vec![0; (V3_NEW_HEADER_LENGTH - COMPRESSION_TYPE_OFFSET - 1) as usize]
        } else {
            Vec::new()
        },
        extensions,
        backing_file: f.backing_file.clone(),
    };
    h.fix_layout();
    Ok(h)
}

/// An active L1 entry pointing at an L2 table that only this L1 entry references.
pub fn l1_entry_for(l2_table: HostOffset) -> u64 {
    OFLAG_COPIED | (l2_table.0 & L1_L2_OFFSET_MASK)
}

/// A standard L2 entry mapping a guest cluster to a host cluster referenced only here.
///
/// A preallocated cluster is "allocated, not zero": its host bytes are what the guest reads,
/// which is why the host range must read as zeros (a sparse file or written zeros).
pub fn l2_entry_for(data: HostOffset) -> u64 {
    OFLAG_COPIED | (data.0 & L1_L2_OFFSET_MASK)
}

/// An extended L2 entry for a preallocated cluster: the host cluster is reserved, but every
/// subcluster stays unallocated (the allocation bitmap is empty), so reads fall through to the
/// backing file or zeros until the guest writes. This is what lets preallocation coexist with
/// a backing file.
pub fn extended_l2_entry_for(data: HostOffset) -> ExtendedL2Entry {
    ExtendedL2Entry {
        entry: OFLAG_COPIED | (data.0 & L1_L2_OFFSET_MASK),
        bitmap: 0,
    }
}

/// A refcount table entry pointing at a refcount block.
pub fn reftable_entry_for(block: HostOffset) -> u64 {
    block.0 & super::refcount::REFTABLE_OFFSET_MASK
}

/// Refcount entries in one block of `cluster_size` bytes at `refcount_order`.
pub fn refcounts_per_block(cluster_size: u64, refcount_order: u32) -> Option<u64> {
    let len = usize::try_from(cluster_size).ok()?;
    entries_per_block(len, refcount_order).map(|n| n as u64)
}

/// A refcount block of `cluster_size` bytes whose first `ones` entries are 1 and the rest 0.
pub fn refcount_block_with_ones(
    cluster_size: u64,
    refcount_order: u32,
    ones: u64,
) -> Result<Vec<u8>, FormatError> {
    let len = usize::try_from(cluster_size).map_err(|_| FormatError::RefcountOrderTooLarge(0))?;
    let mut block = vec![0u8; len];
    if max_refcount(refcount_order).is_none() {
        return Err(FormatError::RefcountOrderTooLarge(refcount_order));
    }
    let entries = entries_per_block(len, refcount_order).unwrap_or(0);
    let ones = usize::try_from(ones).unwrap_or(usize::MAX).min(entries);
    let bits = 1usize << refcount_order;
    // Whole bytes first (a pattern repeated per entry, or per byte for sub-byte widths),
    // then the entries sharing the last partial byte one by one.
    let (unit, per_unit) = if bits >= 8 {
        let mut u = vec![0u8; bits / 8];
        if let Some(last) = u.last_mut() {
            *last = 1;
        }
        (u, 1)
    } else {
        let per_byte = 8 / bits;
        let byte = (0..per_byte).fold(0u8, |b, i| b | (1 << (i * bits)));
        (vec![byte], per_byte)
    };
    let whole_units = ones / per_unit;
    for chunk in block.chunks_exact_mut(unit.len()).take(whole_units) {
        chunk.copy_from_slice(&unit);
    }
    for i in whole_units * per_unit..ones {
        refcount_set(&mut block, i, refcount_order, 1)?;
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::refcount::refcount_get;

    #[test]
    fn v3_header_round_trips_with_qemu_layout() {
        let f = NewHeaderFields {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            refcount_order: 4,
            compression: CompressionType::Zstd,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        };
        let mut h = new_header(&f).unwrap();
        assert_eq!(h.header_length, 112);
        // Backing format (8 + 8), feature table (8 + 384), end marker (8).
        assert_eq!(h.backing_file_offset, 112 + 16 + 392 + 8);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        let parsed = Header::parse(&h.serialize().unwrap()).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.compression_type, 1);
        assert_eq!(parsed.feature_names().len(), 8);
    }

    #[test]
    fn small_clusters_have_no_feature_table() {
        let f = NewHeaderFields {
            version: 3,
            cluster_bits: 12,
            refcount_order: 4,
            ..Default::default()
        };
        assert!(new_header(&f).unwrap().extensions.is_empty());
    }

    #[test]
    fn v2_header_has_no_extensions_area_features() {
        let f = NewHeaderFields {
            version: 2,
            cluster_bits: 16,
            refcount_order: 4,
            ..Default::default()
        };
        let h = new_header(&f).unwrap();
        assert_eq!(h.header_length, 72);
        assert!(h.extensions.is_empty());
    }

    #[test]
    fn long_backing_name_is_refused() {
        let f = NewHeaderFields {
            version: 3,
            cluster_bits: 16,
            refcount_order: 4,
            backing_file: Some("a".repeat(1024)),
            ..Default::default()
        };
        assert!(new_header(&f).is_err());
    }

    #[test]
    fn refcount_blocks_of_ones() {
        for order in 0..=6 {
            for ones in [0u64, 1, 5, 8, 9, 63, 64, 4096] {
                let b = refcount_block_with_ones(512, order, ones).unwrap();
                let n = refcounts_per_block(512, order).unwrap();
                for i in 0..n {
                    let want = u64::from(i < ones);
                    assert_eq!(refcount_get(&b, i as usize, order).unwrap(), want);
                }
            }
        }
        assert_eq!(refcounts_per_block(65536, 4), Some(32768));
        assert_eq!(l1_entry_for(HostOffset(0x40000)), 0x8000_0000_0004_0000);
        assert_eq!(extended_l2_entry_for(HostOffset(0x50000)).bitmap, 0);
    }
}
