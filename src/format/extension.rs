//! Header extensions: the typed records between the header and the backing file name.
//!
//! On disk each extension is `u32 magic, u32 length, data, zero padding to 8`; magic 0 ends the
//! list. The area runs from `header_length` to `backing_file_offset` (or the end of cluster 0
//! when there is no backing file). Unknown extensions are kept byte for byte so that a header
//! rewrite preserves them, as the spec requires.

use super::be;
use super::error::{fit, FormatError};

/// Magic of the end-of-extensions marker.
pub const EXT_END: u32 = 0;
/// Magic of the backing file format name extension.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Magic of the feature name table extension.
pub const EXT_FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// Magic of the persistent bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Magic of the full-disk-encryption header pointer extension.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// Magic of the external data file name extension.
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Feature name table `kind` of incompatible features.
pub const FEATURE_KIND_INCOMPATIBLE: u8 = 0;
/// Feature name table `kind` of compatible features.
pub const FEATURE_KIND_COMPATIBLE: u8 = 1;
/// Feature name table `kind` of autoclear features.
pub const FEATURE_KIND_AUTOCLEAR: u8 = 2;
/// Bytes per feature name table entry (kind, bit, 46-byte name).
pub const FEATURE_NAME_ENTRY_SIZE: usize = 48;
/// Longest feature name: the rest of the 48-byte entry.
pub const FEATURE_NAME_MAX: usize = 46;

/// QEMU's limit on the number of persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory size in bytes (1024 * 65535).
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;
/// Data length of the bitmaps extension.
pub const BITMAPS_EXT_LEN: u32 = 24;
/// Data length of the crypto header extension.
pub const CRYPTO_EXT_LEN: u32 = 16;
/// QEMU's backing format buffer is 16 bytes including the terminating NUL.
pub const MAX_BACKING_FORMAT_LEN: u32 = 15;

/// One entry of the feature name table: a human-readable name for a feature bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear (see the `FEATURE_KIND_*` constants).
    pub kind: u8,
    /// Bit number within the selected feature bitmap (0–63).
    pub bit: u8,
    /// The name; at most 46 bytes on disk, zero-padded.
    pub name: String,
}

/// The persistent bitmaps extension: where the bitmap directory is.
///
/// Only consistent while autoclear feature bit 0 is set; a writer that does not know bitmaps
/// clears that bit, and then the directory must be ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory (1..=65535).
    pub nb_bitmaps: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// Size of the bitmap directory in bytes.
    pub dir_size: u64,
    /// Cluster-aligned offset of the bitmap directory.
    pub dir_offset: u64,
}

impl BitmapsExtension {
    /// QEMU's checks on the extension (it runs them only while autoclear bit 0 is set).
    pub fn validate(&self, cluster_size: u64) -> Result<(), FormatError> {
        if self.reserved != 0 {
            return Err(FormatError::BitmapsExtensionReserved(self.reserved));
        }
        if self.nb_bitmaps > MAX_BITMAPS {
            return Err(FormatError::TooManyBitmaps(self.nb_bitmaps));
        }
        if self.nb_bitmaps == 0 {
            return Err(FormatError::ZeroBitmaps);
        }
        if cluster_size != 0 && self.dir_offset % cluster_size != 0 {
            return Err(FormatError::BitmapDirectoryOffset {
                offset: self.dir_offset,
                cluster_size,
            });
        }
        if self.dir_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(FormatError::BitmapDirectorySize(self.dir_size));
        }
        Ok(())
    }
}

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderExtension {
    /// Format of the backing file, e.g. `qcow2` or `raw` (not NUL-terminated on disk).
    BackingFormat(String),
    /// Names of feature bits, for error messages about features the reader does not know.
    FeatureNameTable(Vec<FeatureName>),
    /// Location of the persistent bitmap directory.
    Bitmaps(BitmapsExtension),
    /// Location of the LUKS header (crypt_method 2 only).
    CryptoHeader {
        /// Cluster-aligned offset of the encryption header.
        offset: u64,
        /// Length of the encryption header in bytes.
        length: u64,
    },
    /// Name of the external data file (incompatible bit 2).
    ExternalDataFile(String),
    /// An extension this implementation does not know, kept verbatim.
    Unknown {
        /// Extension type.
        magic: u32,
        /// Extension data without padding.
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The on-disk type magic.
    pub fn magic(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNameTable(_) => EXT_FEATURE_NAME_TABLE,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::CryptoHeader { .. } => EXT_CRYPTO_HEADER,
            HeaderExtension::ExternalDataFile(_) => EXT_EXTERNAL_DATA_FILE,
            HeaderExtension::Unknown { magic, .. } => *magic,
        }
    }

    /// The extension data as stored on disk, without the 8-byte extension header or padding.
    pub fn data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::ExternalDataFile(s) => {
                s.as_bytes().to_vec()
            }
            HeaderExtension::FeatureNameTable(names) => {
                let mut out = Vec::with_capacity(names.len() * FEATURE_NAME_ENTRY_SIZE);
                for f in names {
                    let mut entry = [0u8; FEATURE_NAME_ENTRY_SIZE];
                    entry[0] = f.kind;
                    entry[1] = f.bit;
                    let name = f.name.as_bytes();
                    let n = name.len().min(FEATURE_NAME_MAX);
                    entry[2..2 + n].copy_from_slice(&name[..n]);
                    out.extend_from_slice(&entry);
                }
                out
            }
            HeaderExtension::Bitmaps(b) => {
                let mut out = Vec::with_capacity(BITMAPS_EXT_LEN as usize);
                out.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                out.extend_from_slice(&b.reserved.to_be_bytes());
                out.extend_from_slice(&b.dir_size.to_be_bytes());
                out.extend_from_slice(&b.dir_offset.to_be_bytes());
                out
            }
            HeaderExtension::CryptoHeader { offset, length } => {
                let mut out = Vec::with_capacity(CRYPTO_EXT_LEN as usize);
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                out
            }
            HeaderExtension::Unknown { data, .. } => data.clone(),
        }
    }

    /// Appends the extension (header, data, zero padding to 8) to `out`. An extension that
    /// cannot fit in the header cluster (2 MiB at most) is refused.
    pub fn serialize_into(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let data = self.data();
        let len = fit("header extension", data.len(), 2 << 20)? as u32;
        out.extend_from_slice(&self.magic().to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&data);
        be::pad8(out);
        Ok(())
    }
}

/// What extension validation needs to know about the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionContext {
    /// `1 << cluster_bits`.
    pub cluster_size: u64,
    /// Header `crypt_method`.
    pub crypt_method: u32,
    /// Whether autoclear bit 0 is set; the bitmaps extension is validated only then.
    pub bitmaps_consistent: bool,
}

/// One raw extension record: its magic and data.
struct RawExtension<'a> {
    magic: u32,
    data: &'a [u8],
}

/// Walks the extension records of `[start, end)` in `cluster0`, calling `f` for each one until
/// the end marker, the end of the area, or an error.
fn walk<'a>(
    cluster0: &'a [u8],
    start: u64,
    end: u64,
    mut f: impl FnMut(RawExtension<'a>) -> Result<(), FormatError>,
) -> Result<(), FormatError> {
    let mut offset = start;
    while offset < end {
        let header_end = offset.saturating_add(8);
        if header_end > end {
            return Err(FormatError::ExtensionTooLarge {
                magic: 0,
                offset,
                length: 8,
                available: end - offset,
                end,
            });
        }
        let at = be::usize_sat(offset);
        let (Some(magic), Some(len)) = (be::u32_at(cluster0, at), be::u32_at(cluster0, at + 4))
        else {
            return Err(FormatError::truncated(
                "qcow2 header extension area",
                header_end,
                cluster0.len(),
            ));
        };
        // QEMU checks the length before looking at the type, so even the end marker must not
        // claim more bytes than the extension area has.
        if u64::from(len) > end - header_end {
            return Err(FormatError::ExtensionTooLarge {
                magic,
                offset,
                length: u64::from(len),
                available: end - header_end,
                end,
            });
        }
        if magic == EXT_END {
            return Ok(());
        }
        let data_end = header_end + u64::from(len);
        let data = cluster0
            .get(be::usize_sat(header_end)..be::usize_sat(data_end))
            .ok_or_else(|| {
                FormatError::truncated("qcow2 header extension area", data_end, cluster0.len())
            })?;
        f(RawExtension { magic, data })?;
        offset = be::align8(data_end).unwrap_or(u64::MAX);
    }
    Ok(())
}

/// Decodes feature name table entries; a trailing partial entry is ignored (as QEMU does).
fn parse_feature_names(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_NAME_ENTRY_SIZE)
        .map(|e| {
            let raw = &e[2..];
            let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            FeatureName {
                kind: e[0],
                bit: e[1],
                name: be::string(&raw[..len]),
            }
        })
        .collect()
}

/// Parses and validates every extension in `[start, end)` of `cluster0`, in on-disk order.
///
/// Checks, with QEMU's messages: each record fits before `end` (`Header extension too large`),
/// the backing format fits QEMU's buffer, the crypto header extension only appears with LUKS
/// and has length 16 and a cluster-aligned offset, the bitmaps extension has length 24 and
/// (while `ctx.bitmaps_consistent`) passes [`BitmapsExtension::validate`].
pub fn parse_extensions(
    cluster0: &[u8],
    start: u64,
    end: u64,
    ctx: &ExtensionContext,
) -> Result<Vec<HeaderExtension>, FormatError> {
    let mut out = Vec::new();
    walk(cluster0, start, end, |raw| {
        let data = raw.data;
        let len = data.len() as u32;
        let ext = match raw.magic {
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT_LEN {
                    return Err(FormatError::BackingFormatTooLong(len));
                }
                HeaderExtension::BackingFormat(be::string(data))
            }
            EXT_FEATURE_NAME_TABLE => HeaderExtension::FeatureNameTable(parse_feature_names(data)),
            EXT_CRYPTO_HEADER => {
                if ctx.crypt_method != 2 {
                    return Err(FormatError::UnexpectedCryptoHeader(ctx.crypt_method));
                }
                let (Some(offset), Some(length), CRYPTO_EXT_LEN) =
                    (be::u64_at(data, 0), be::u64_at(data, 8), len)
                else {
                    return Err(FormatError::CryptoHeaderExtensionSize(len));
                };
                if ctx.cluster_size != 0 && offset % ctx.cluster_size != 0 {
                    return Err(FormatError::CryptoHeaderOffsetUnaligned {
                        offset,
                        cluster_size: ctx.cluster_size,
                    });
                }
                if offset
                    .checked_add(length)
                    .map_or(true, |e| e > i64::MAX as u64)
                {
                    return Err(FormatError::CryptoHeaderRange { offset, length });
                }
                HeaderExtension::CryptoHeader { offset, length }
            }
            EXT_BITMAPS => {
                let (Some(nb_bitmaps), Some(reserved), Some(dir_size), Some(dir_offset), 24) = (
                    be::u32_at(data, 0),
                    be::u32_at(data, 4),
                    be::u64_at(data, 8),
                    be::u64_at(data, 16),
                    len,
                ) else {
                    return Err(FormatError::BitmapsExtensionLength(len));
                };
                let ext = BitmapsExtension {
                    nb_bitmaps,
                    reserved,
                    dir_size,
                    dir_offset,
                };
                if ctx.bitmaps_consistent {
                    ext.validate(ctx.cluster_size)?;
                }
                HeaderExtension::Bitmaps(ext)
            }
            EXT_EXTERNAL_DATA_FILE => HeaderExtension::ExternalDataFile(be::string(data)),
            magic => HeaderExtension::Unknown {
                magic,
                data: data.to_vec(),
            },
        };
        out.push(ext);
        Ok(())
    })?;
    Ok(out)
}

/// Finds the feature name table without validating anything else, for naming unknown
/// incompatible features in an image that cannot be opened. Stops quietly at the first
/// malformed record, like QEMU's best-effort read on that path.
pub fn find_feature_names(cluster0: &[u8], start: u64, end: u64) -> Vec<FeatureName> {
    let mut names = Vec::new();
    let _ = walk(cluster0, start, end, |raw| {
        if raw.magic == EXT_FEATURE_NAME_TABLE {
            names = parse_feature_names(raw.data);
        }
        Ok(())
    });
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: ExtensionContext = ExtensionContext {
        cluster_size: 65536,
        crypt_method: 0,
        bitmaps_consistent: true,
    };

    fn area(exts: &[HeaderExtension]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in exts {
            e.serialize_into(&mut out).unwrap();
        }
        out.extend_from_slice(&[0; 8]);
        out
    }

    fn sample() -> Vec<HeaderExtension> {
        vec![
            HeaderExtension::BackingFormat("qcow2".into()),
            HeaderExtension::FeatureNameTable(vec![
                FeatureName {
                    kind: 0,
                    bit: 0,
                    name: "dirty bit".into(),
                },
                FeatureName {
                    kind: 2,
                    bit: 1,
                    name: "x".repeat(46),
                },
            ]),
            HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: 2,
                reserved: 0,
                dir_size: 64,
                dir_offset: 0x30000,
            }),
            HeaderExtension::ExternalDataFile("/tmp/data.raw".into()),
            HeaderExtension::Unknown {
                magic: 0x1234_5678,
                data: vec![1, 2, 3],
            },
        ]
    }

    #[test]
    fn round_trip() {
        let exts = sample();
        let bytes = area(&exts);
        assert_eq!(bytes.len() % 8, 0);
        let parsed = parse_extensions(&bytes, 0, bytes.len() as u64, &CTX).unwrap();
        assert_eq!(parsed, exts);
        // Parsing without an end marker, up to the exact end of the area, works too.
        let parsed = parse_extensions(&bytes, 0, bytes.len() as u64 - 8, &CTX).unwrap();
        assert_eq!(parsed, exts);
    }

    #[test]
    fn crypto_header_round_trip_and_checks() {
        let luks = ExtensionContext {
            crypt_method: 2,
            ..CTX
        };
        let ext = HeaderExtension::CryptoHeader {
            offset: 0x20000,
            length: 2 << 20,
        };
        let bytes = area(std::slice::from_ref(&ext));
        assert_eq!(parse_extensions(&bytes, 0, 4096, &luks).unwrap(), vec![ext]);
        let err = parse_extensions(&bytes, 0, 4096, &CTX).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("CRYPTO header extension only expected with LUKS encryption method"));
        let bytes = area(&[HeaderExtension::CryptoHeader {
            offset: 0x20001,
            length: 1,
        }]);
        let err = parse_extensions(&bytes, 0, 4096, &luks).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Encryption header offset '131073' is not a multiple of cluster size '65536'"
        );
        let bytes = area(&[HeaderExtension::CryptoHeader {
            offset: 0x20000,
            length: u64::MAX,
        }]);
        let err = parse_extensions(&bytes, 0, 4096, &luks).unwrap_err();
        assert!(matches!(err, FormatError::CryptoHeaderRange { .. }));
        let bytes = area(&[HeaderExtension::Unknown {
            magic: EXT_CRYPTO_HEADER,
            data: vec![0; 8],
        }]);
        let err = parse_extensions(&bytes, 0, 4096, &luks).unwrap_err();
        assert_eq!(
            err.to_string(),
            "CRYPTO header extension size 8, but expected size 16"
        );
    }

    #[test]
    fn too_large() {
        let bytes = area(&[HeaderExtension::Unknown {
            magic: 7,
            data: vec![0; 40],
        }]);
        let err = parse_extensions(&bytes, 0, 40, &CTX).unwrap_err();
        assert!(
            err.to_string().starts_with("Header extension too large"),
            "{err}"
        );
        // The 8-byte extension header itself must fit.
        let err = parse_extensions(&bytes, 0, 4, &CTX).unwrap_err();
        assert!(
            err.to_string().starts_with("Header extension too large"),
            "{err}"
        );
    }

    #[test]
    fn end_marker_length_is_checked_like_any_other() {
        // magic 0 with a length past the area: QEMU checks the length before the type.
        let mut bytes = vec![0u8; 64];
        bytes[4..8].copy_from_slice(&0x10000u32.to_be_bytes());
        let err = parse_extensions(&bytes, 0, 64, &CTX).unwrap_err();
        assert!(
            err.to_string().starts_with("Header extension too large"),
            "{err}"
        );
        bytes[4..8].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(parse_extensions(&bytes, 0, 64, &CTX).unwrap(), vec![]);
    }

    #[test]
    fn truncated_buffer() {
        let bytes = area(&sample());
        let err = parse_extensions(&bytes[..20], 0, 4096, &CTX).unwrap_err();
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn backing_format_limit() {
        let ok = area(&[HeaderExtension::BackingFormat("a".repeat(15))]);
        assert!(parse_extensions(&ok, 0, 4096, &CTX).is_ok());
        let bad = area(&[HeaderExtension::BackingFormat("a".repeat(16))]);
        let err = parse_extensions(&bad, 0, 4096, &CTX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ERROR: ext_backing_format: len=16 too large (>=16)"
        );
    }

    #[test]
    fn bitmaps_checks() {
        let mk = |nb, reserved, dir_size, dir_offset| {
            area(&[HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: nb,
                reserved,
                dir_size,
                dir_offset,
            })])
        };
        let check = |b: Vec<u8>| parse_extensions(&b, 0, 4096, &CTX).unwrap_err().to_string();
        assert!(check(mk(0, 0, 8, 0)).starts_with("found bitmaps extension with zero bitmaps"));
        assert!(check(mk(65536, 0, 8, 0)).starts_with("bitmaps_ext: Image has 65536 bitmaps"));
        assert!(check(mk(1, 1, 8, 0)).starts_with("bitmaps_ext: Reserved field is not zero"));
        assert!(check(mk(1, 0, 8, 512)).starts_with("bitmaps_ext: invalid bitmap directory offset"));
        assert!(check(mk(1, 0, 67107841, 0)).starts_with("bitmaps_ext: bitmap directory size"));
        // Not validated while autoclear bit 0 is clear: QEMU ignores the extension then.
        let lax = ExtensionContext {
            bitmaps_consistent: false,
            ..CTX
        };
        assert!(parse_extensions(&mk(0, 1, 8, 3), 0, 4096, &lax).is_ok());
        // The length is checked regardless.
        let short = area(&[HeaderExtension::Unknown {
            magic: EXT_BITMAPS,
            data: vec![0; 16],
        }]);
        let err = parse_extensions(&short, 0, 4096, &lax).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("bitmaps_ext: Invalid extension length"));
    }

    #[test]
    fn feature_names_lenient() {
        let mut bytes = area(&sample());
        // Corrupt the record after the feature table; find_feature_names still finds the table.
        let names = find_feature_names(&bytes, 0, bytes.len() as u64);
        assert_eq!(names.len(), 2);
        bytes.truncate(10);
        assert!(find_feature_names(&bytes, 0, 4096).is_empty());
        // A partial trailing feature entry is ignored.
        assert_eq!(parse_feature_names(&[0u8; 50]).len(), 1);
    }
}
