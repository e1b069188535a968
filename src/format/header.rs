//! The qcow2 header (cluster 0): fields, feature bits, parse with validation, serialize.
//!
//! Layout (big-endian): the 72-byte version 2 header, then for version 3 the feature bitmaps,
//! `refcount_order` and `header_length` (104 bytes) and optional additional fields up to
//! `header_length` (`compression_type` at byte 104). Header extensions follow at
//! `header_length`; the backing file name sits at `backing_file_offset`, after the extensions
//! and inside cluster 0.

use bitflags::bitflags;

use super::be;
use super::error::{fit, FormatError, TableKind};
use super::extension::{
    find_feature_names, parse_extensions, BitmapsExtension, ExtensionContext, FeatureName,
    HeaderExtension, FEATURE_KIND_INCOMPATIBLE,
};
use super::limits::{
    validate_table, MAX_BACKING_FILE_NAME, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
    SNAPSHOT_HEADER_SIZE,
};
use super::offsets::Geometry;

/// `QFI\xfb`, the first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Size of the version 2 header (also `header_length` implied for version 2).
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum `header_length` of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Offset of the `compression_type` byte (present when `header_length > 104`).
pub const COMPRESSION_TYPE_OFFSET: u32 = 104;
/// `compression_type` 0: deflate (QEMU calls it zlib).
pub const COMPRESSION_DEFLATE: u8 = 0;
/// `compression_type` 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;
/// `crypt_method` 0: not encrypted.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method` 1: legacy AES-CBC (metadata is still plain, so we can scan it).
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` 2: LUKS, with a header located by the crypto header extension.
pub const CRYPT_LUKS: u32 = 2;
/// Refcount order implied for version 2 images (16-bit refcounts).
pub const V2_REFCOUNT_ORDER: u32 = 4;

bitflags! {
    /// Incompatible feature bits (header bytes 72–79). A reader must refuse unknown bits.
    /// Unknown bits are kept (`from_bits_retain`) so that errors can name them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct IncompatibleFeatures: u64 {
        /// Bit 0: refcounts may be inconsistent; rebuild them before trusting them.
        const DIRTY = 1 << 0;
        /// Bit 1: metadata may be corrupt; the image must not be written.
        const CORRUPT = 1 << 1;
        /// Bit 2: guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// Bit 3: `compression_type` is non-zero.
        const COMPRESSION_TYPE = 1 << 3;
        /// Bit 4: L2 entries are 16 bytes with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

bitflags! {
    /// Compatible feature bits (header bytes 80–87); unknown bits may be ignored.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CompatibleFeatures: u64 {
        /// Bit 0: refcount updates may be postponed (the dirty bit then covers them).
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags! {
    /// Autoclear feature bits (header bytes 88–95); a writer that does not know a bit clears it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AutoclearFeatures: u64 {
        /// Bit 0: the bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// Bit 1: the external data file is a valid raw image by itself.
        const RAW_EXTERNAL_DATA = 1 << 1;
    }
}

/// A parsed qcow2 header with its extensions and backing file name.
///
/// Fields mirror the on-disk header; for version 2 images the version 3 fields hold the values
/// the spec implies (no features, `refcount_order` 4, `header_length` 72).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Always [`QCOW2_MAGIC`] after a successful parse.
    pub magic: u32,
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0, 0 if there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name (≤ 1023).
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Cluster-aligned offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Cluster-aligned offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Cluster-aligned offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (version 3), unknown bits retained.
    pub incompatible_features: IncompatibleFeatures,
    /// Compatible feature bits (version 3), unknown bits retained.
    pub compatible_features: CompatibleFeatures,
    /// Autoclear feature bits (version 3), unknown bits retained.
    pub autoclear_features: AutoclearFeatures,
    /// Refcount width is `1 << refcount_order` bits (≤ 6; 4 for version 2).
    pub refcount_order: u32,
    /// Header size in bytes; extensions start here (72 for version 2).
    pub header_length: u32,
    /// 0 deflate, 1 zstd; 0 when the field is absent (`header_length` ≤ 104).
    pub compression_type: u8,
    /// Header bytes after `compression_type` up to `header_length` (padding and fields from
    /// newer writers), kept so that a rewrite preserves them.
    pub header_tail: Vec<u8>,
    /// Header extensions in on-disk order.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, present iff `backing_file_offset != 0`.
    pub backing_file: Option<String>,
}

/// Bytes of cluster 0 the parser needs, or a `Truncated` error naming them.
fn need(buf: &[u8], needed: u64) -> Result<(), FormatError> {
    if (buf.len() as u64) < needed {
        Err(FormatError::truncated("qcow2 header", needed, buf.len()))
    } else {
        Ok(())
    }
}

/// QEMU's message for unknown incompatible bits: names from the feature name table first (in
/// table order, up to the first unnamed entry), then the remaining bits in hex.
fn unsupported_features(mask: u64, table: &[FeatureName]) -> FormatError {
    let mut names: Vec<String> = Vec::new();
    let mut rest = mask;
    for f in table.iter().take_while(|f| !f.name.is_empty()) {
        if f.kind == FEATURE_KIND_INCOMPATIBLE && f.bit < 64 && rest & (1 << f.bit) != 0 {
            names.push(f.name.clone());
            rest &= !(1u64 << f.bit);
        }
    }
    if rest != 0 {
        names.push(format!("Unknown incompatible feature: {rest:x}"));
    }
    FormatError::UnsupportedFeatures {
        mask,
        names: names.join(", "),
    }
}

impl Header {
    /// Parses and validates the header from the start of the image.
    ///
    /// `cluster0` should hold the first cluster (more is ignored; less works as long as every
    /// structure inside it is covered, else a `Truncated` error says what was cut off). Runs
    /// every check of QEMU's open that needs no file size, in QEMU's order, with QEMU's
    /// messages; see [`FormatError`].
    pub fn parse(cluster0: &[u8]) -> Result<Header, FormatError> {
        need(cluster0, 8)?;
        let u32_at = |o: usize| be::u32_at(cluster0, o).unwrap_or(0);
        let u64_at = |o: usize| be::u64_at(cluster0, o).unwrap_or(0);

        let magic = u32_at(0);
        if magic != QCOW2_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = u32_at(4);
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        need(cluster0, u64::from(V2_HEADER_LENGTH))?;
        let cluster_bits = u32_at(20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(FormatError::UnsupportedClusterSize(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        // Look at nothing past the first cluster: extensions and names must live there.
        let cluster0 = cluster0
            .get(..be::usize_sat(cluster_size))
            .unwrap_or(cluster0);

        let mut h = Header {
            magic,
            version,
            backing_file_offset: u64_at(8),
            backing_file_size: u32_at(16),
            cluster_bits,
            size: u64_at(24),
            crypt_method: u32_at(32),
            l1_size: u32_at(36),
            l1_table_offset: u64_at(40),
            refcount_table_offset: u64_at(48),
            refcount_table_clusters: u32_at(56),
            nb_snapshots: u32_at(60),
            snapshots_offset: u64_at(64),
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: V2_REFCOUNT_ORDER,
            header_length: V2_HEADER_LENGTH,
            compression_type: COMPRESSION_DEFLATE,
            header_tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };

        if version == 3 {
            need(cluster0, u64::from(V3_MIN_HEADER_LENGTH))?;
            h.incompatible_features = IncompatibleFeatures::from_bits_retain(u64_at(72));
            h.compatible_features = CompatibleFeatures::from_bits_retain(u64_at(80));
            h.autoclear_features = AutoclearFeatures::from_bits_retain(u64_at(88));
            h.refcount_order = u32_at(96);
            h.header_length = u32_at(100);
            if h.header_length < V3_MIN_HEADER_LENGTH {
                return Err(FormatError::HeaderTooShort(h.header_length));
            }
        }
        if u64::from(h.header_length) > cluster_size {
            return Err(FormatError::HeaderExceedsCluster {
                header_length: h.header_length,
                cluster_size,
            });
        }
        if h.header_length % 8 != 0 {
            return Err(FormatError::HeaderLengthUnaligned(h.header_length));
        }
        need(cluster0, u64::from(h.header_length))?;
        if h.header_length > COMPRESSION_TYPE_OFFSET {
            let start = COMPRESSION_TYPE_OFFSET as usize;
            h.compression_type = cluster0.get(start).copied().unwrap_or(0);
            h.header_tail = cluster0
                .get(start + 1..h.header_length as usize)
                .unwrap_or_default()
                .to_vec();
        }

        if h.backing_file_offset > cluster_size {
            return Err(FormatError::InvalidBackingFileOffset {
                offset: h.backing_file_offset,
                cluster_size,
            });
        }
        let ext_end = h.extension_area_end();

        h.check_compression_type()?;
        let unknown = h.incompatible_features.bits() & !IncompatibleFeatures::all().bits();
        if unknown != 0 {
            let table = find_feature_names(cluster0, u64::from(h.header_length), ext_end);
            return Err(unsupported_features(unknown, &table));
        }
        if h.is_extended_l2() && cluster_bits < 14 {
            return Err(FormatError::UnsupportedSubclusterSize {
                cluster_bits,
                subcluster_size: cluster_size / 32,
            });
        }
        if h.refcount_order > 6 {
            return Err(FormatError::RefcountOrderTooLarge(h.refcount_order));
        }
        if h.crypt_method > CRYPT_LUKS {
            return Err(FormatError::UnsupportedCryptMethod(h.crypt_method));
        }
        h.check_tables()?;

        let ctx = ExtensionContext {
            cluster_size,
            crypt_method: h.crypt_method,
            bitmaps_consistent: h.autoclear_features.contains(AutoclearFeatures::BITMAPS),
        };
        h.extensions = parse_extensions(cluster0, u64::from(h.header_length), ext_end, &ctx)?;

        if h.autoclear_features
            .contains(AutoclearFeatures::RAW_EXTERNAL_DATA)
            && !h.has_external_data_file()
        {
            return Err(FormatError::RawDataWithoutDataFile);
        }
        if h.crypt_method == CRYPT_LUKS && h.crypto_header().is_none() {
            return Err(FormatError::MissingCryptoHeader(h.crypt_method));
        }

        if h.backing_file_offset != 0 {
            let max = MAX_BACKING_FILE_NAME.min(cluster_size - h.backing_file_offset);
            if u64::from(h.backing_file_size) > max {
                return Err(FormatError::BackingFileNameTooLong {
                    size: h.backing_file_size,
                    offset: h.backing_file_offset,
                    max,
                });
            }
            let end = h.backing_file_offset + u64::from(h.backing_file_size);
            let name = cluster0
                .get(h.backing_file_offset as usize..end as usize)
                .ok_or_else(|| FormatError::truncated("backing file name", end, cluster0.len()))?;
            h.backing_file = Some(be::string(name));
        }
        Ok(h)
    }

    /// QEMU's `validate_compression_type`: 0 or 1, and bit 3 set iff non-zero.
    fn check_compression_type(&self) -> Result<(), FormatError> {
        let bit = self
            .incompatible_features
            .contains(IncompatibleFeatures::COMPRESSION_TYPE);
        match self.compression_type {
            COMPRESSION_DEFLATE if bit => Err(FormatError::CompressionBitSet),
            COMPRESSION_DEFLATE => Ok(()),
            COMPRESSION_ZSTD if !bit => Err(FormatError::CompressionBitMissing(COMPRESSION_ZSTD)),
            COMPRESSION_ZSTD => Ok(()),
            other => Err(FormatError::UnknownCompressionType(other)),
        }
    }

    /// Bounds of the refcount table, snapshot table and active L1 table, and the L1 size.
    fn check_tables(&self) -> Result<(), FormatError> {
        let cluster_size = self.cluster_size();
        // QEMU refuses only a table of zero clusters; a table at offset 0 opens (it then lies
        // on the header, which the scan reports as overlapping metadata).
        if self.refcount_table_clusters == 0 {
            return Err(FormatError::NoRefcountTable {
                offset: self.refcount_table_offset,
                clusters: self.refcount_table_clusters,
            });
        }
        validate_table(
            TableKind::RefcountTable,
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        // Only the fixed part of each entry is known here; parse_snapshot_table checks the
        // real (variable) table size.
        validate_table(
            TableKind::SnapshotTable,
            self.snapshots_offset,
            u64::from(self.nb_snapshots),
            SNAPSHOT_HEADER_SIZE,
            SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
            cluster_size,
        )?;
        validate_table(
            TableKind::ActiveL1,
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        let needed = self.l1_entries_needed();
        if needed > i32::MAX as u64 {
            return Err(FormatError::ImageTooBig {
                size: self.size,
                needed,
            });
        }
        if u64::from(self.l1_size) < needed {
            return Err(FormatError::L1TooSmall {
                l1_size: self.l1_size,
                size: self.size,
                needed,
            });
        }
        Ok(())
    }

    /// Serializes header, extensions, end marker and backing file name.
    ///
    /// Fields are written as stored (use [`Header::fix_layout`] after changing extensions or
    /// the backing file). Extensions start at `header_length`; the name is written at
    /// `backing_file_offset` (capped at 2 MiB, the largest cluster). The result is as long as
    /// the last byte written; the rest of cluster 0 is zero on disk.
    ///
    /// Refuses, instead of writing a header QEMU could not read: a backing file name over 1023
    /// bytes, an extension too large, or a header (with extensions and name) larger than the
    /// cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, FormatError> {
        for ext in &self.extensions {
            ext.serialize_into(&mut Vec::new())?;
        }
        if let Some(name) = &self.backing_file {
            fit("backing file name", name.len(), MAX_BACKING_FILE_NAME)?;
        }
        let out = self.serialize_unchecked();
        fit("qcow2 header", out.len(), self.cluster_size().max(512))?;
        Ok(out)
    }

    /// The header bytes exactly as the fields say, with no check (tests build malformed headers
    /// with it).
    pub(crate) fn serialize_unchecked(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&self.magic.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        out.extend_from_slice(&self.backing_file_size.to_be_bytes());
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.bits().to_be_bytes());
            out.extend_from_slice(&self.compatible_features.bits().to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.bits().to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > COMPRESSION_TYPE_OFFSET {
                out.push(self.compression_type);
                out.extend_from_slice(&self.header_tail);
            }
        }
        // Extensions start exactly at header_length, whatever the tail held.
        out.resize(self.header_length as usize, 0);
        for ext in &self.extensions {
            // Checked by `serialize`; unchecked callers get what fits.
            let _ = ext.serialize_into(&mut out);
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let at = be::usize_sat(self.backing_file_offset).min(2 << 20);
            let end = at + name.len();
            if out.len() < end {
                out.resize(end, 0);
            }
            out[at..end].copy_from_slice(name.as_bytes());
        }
        out
    }

    /// Recomputes `header_length` (version 2), `backing_file_offset` and `backing_file_size`
    /// so that the backing file name directly follows the extension end marker, as QEMU lays
    /// it out. Call after editing `extensions` or `backing_file`.
    pub fn fix_layout(&mut self) {
        if self.version < 3 {
            self.header_length = V2_HEADER_LENGTH;
        }
        let ext_bytes: usize = self
            .extensions
            .iter()
            .map(|e| 8 + e.data().len().div_ceil(8) * 8)
            .sum();
        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = (self.header_length as usize + ext_bytes + 8) as u64;
                self.backing_file_size = u32::try_from(name.len()).unwrap_or(u32::MAX);
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
    }

    /// End of the extension area: the backing file name, else the end of cluster 0.
    pub fn extension_area_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64.checked_shl(self.cluster_bits).unwrap_or(0)
    }

    /// Cluster geometry; `None` only for a hand-built header with invalid `cluster_bits`.
    pub fn geometry(&self) -> Option<Geometry> {
        Geometry::new(self.cluster_bits, self.is_extended_l2())
    }

    /// Width of a refcount entry in bits (1..=64).
    pub fn refcount_bits(&self) -> u64 {
        1u64.checked_shl(self.refcount_order).unwrap_or(0)
    }

    /// Whether L2 entries are extended (16 bytes, subclusters).
    pub fn is_extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.is_extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed to map the whole virtual disk.
    pub fn l1_entries_needed(&self) -> u64 {
        let per_l1 = self.cluster_size().saturating_mul(self.l2_entries());
        if per_l1 == 0 {
            return 0;
        }
        self.size.div_ceil(per_l1)
    }

    /// Bytes of the active L1 table.
    pub fn l1_table_bytes(&self) -> u64 {
        u64::from(self.l1_size) * 8
    }

    /// Bytes of the refcount table.
    pub fn refcount_table_bytes(&self) -> u64 {
        u64::from(self.refcount_table_clusters).saturating_mul(self.cluster_size())
    }

    /// Whether guest data lives in an external data file (incompatible bit 2).
    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::DIRTY)
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::CORRUPT)
    }

    /// The last extension matching `f` (QEMU lets a later duplicate override an earlier one).
    fn last_ext<'a, T>(&'a self, f: impl Fn(&'a HeaderExtension) -> Option<T>) -> Option<T> {
        self.extensions.iter().rev().find_map(f)
    }

    /// `(offset, length)` of the LUKS header, from the crypto header extension.
    pub fn crypto_header(&self) -> Option<(u64, u64)> {
        self.last_ext(|e| match e {
            HeaderExtension::CryptoHeader { offset, length } => Some((*offset, *length)),
            _ => None,
        })
    }

    /// The bitmaps extension as stored, consistent or not.
    pub fn bitmaps_ext(&self) -> Option<&BitmapsExtension> {
        self.last_ext(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(b),
            _ => None,
        })
    }

    /// The bitmaps extension only while autoclear bit 0 vouches for it; this is the one a
    /// scanner should use.
    pub fn active_bitmaps_ext(&self) -> Option<&BitmapsExtension> {
        self.autoclear_features
            .contains(AutoclearFeatures::BITMAPS)
            .then(|| self.bitmaps_ext())
            .flatten()
    }

    /// The backing file format name.
    pub fn backing_format(&self) -> Option<&str> {
        self.last_ext(|e| match e {
            HeaderExtension::BackingFormat(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The external data file name.
    pub fn data_file(&self) -> Option<&str> {
        self.last_ext(|e| match e {
            HeaderExtension::ExternalDataFile(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The feature name table, empty if absent.
    pub fn feature_names(&self) -> &[FeatureName] {
        self.last_ext(|e| match e {
            HeaderExtension::FeatureNameTable(t) => Some(t.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
    }
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
