//! Tests of header parsing and serialization (hand-built headers and real `qemu-img` output).

use super::*;
use crate::format::extension::{FEATURE_KIND_AUTOCLEAR, FEATURE_KIND_COMPATIBLE};
use crate::format::testdata::{self, hex};

/// A small valid version 3 header with 64 KiB clusters and a 1 GiB disk.
fn base_v3() -> Header {
    Header {
        magic: QCOW2_MAGIC,
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 2,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: IncompatibleFeatures::empty(),
        compatible_features: CompatibleFeatures::empty(),
        autoclear_features: AutoclearFeatures::empty(),
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
        header_tail: vec![0; 7],
        extensions: Vec::new(),
        backing_file: None,
    }
}

/// Serializes `h` into a full 64 KiB cluster.
fn cluster(h: &Header) -> Vec<u8> {
    let mut b = h.serialize_unchecked();
    b.resize(65536, 0);
    b
}

/// Parses a mutated copy of `base_v3()` and returns the error text.
fn err_of(f: impl FnOnce(&mut Header)) -> String {
    let mut h = base_v3();
    f(&mut h);
    Header::parse(&cluster(&h)).unwrap_err().to_string()
}

/// Patches raw bytes after serialization and returns the error text.
fn err_of_bytes(f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut b = cluster(&base_v3());
    f(&mut b);
    Header::parse(&b).unwrap_err().to_string()
}

fn assert_starts(text: String, prefix: &str) {
    assert!(
        text.starts_with(prefix),
        "{text:?} should start with {prefix:?}"
    );
}

#[test]
fn round_trip_hand_built() {
    let mut h = base_v3();
    h.extensions = vec![
        HeaderExtension::BackingFormat("raw".into()),
        HeaderExtension::Unknown {
            magic: 0xabcd,
            data: vec![9; 13],
        },
    ];
    h.backing_file = Some("/some/where/base.img".into());
    h.compatible_features = CompatibleFeatures::from_bits_retain(0x8000_0000_0000_0001);
    h.autoclear_features = AutoclearFeatures::from_bits_retain(1 << 40);
    h.fix_layout();
    assert_eq!(h.backing_file_offset, 112 + 16 + 24 + 8);
    let parsed = Header::parse(&cluster(&h)).unwrap();
    assert_eq!(parsed, h);
    assert_eq!(parsed.backing_format(), Some("raw"));
    assert_eq!(parsed.serialize().unwrap(), h.serialize().unwrap());
}

#[test]
fn round_trip_v2_and_header_length_104() {
    let mut h = base_v3();
    h.version = 2;
    h.header_length = 72;
    h.header_tail.clear();
    let parsed = Header::parse(&cluster(&h)).unwrap();
    assert_eq!(parsed, h);
    assert_eq!(h.serialize().unwrap().len(), 80);

    let mut h = base_v3();
    h.header_length = 104;
    h.header_tail.clear();
    assert_eq!(Header::parse(&cluster(&h)).unwrap(), h);

    // Unknown additional header fields past compression_type are kept.
    let mut h = base_v3();
    h.header_length = 128;
    h.header_tail = (1..=23).collect();
    assert_eq!(Header::parse(&cluster(&h)).unwrap(), h);
}

#[test]
fn helpers() {
    let mut h = base_v3();
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.l2_entries(), 8192);
    assert_eq!(h.l1_entries_needed(), 2);
    assert_eq!(h.refcount_table_bytes(), 65536);
    assert_eq!(h.l1_table_bytes(), 16);
    assert!(!h.is_extended_l2() && !h.has_external_data_file());
    h.incompatible_features |= IncompatibleFeatures::EXTENDED_L2;
    assert_eq!(h.l2_entries(), 4096);
    assert_eq!(h.geometry().unwrap().l2_entries(), 4096);
    h.extensions
        .push(HeaderExtension::Bitmaps(BitmapsExtension {
            nb_bitmaps: 1,
            reserved: 0,
            dir_size: 32,
            dir_offset: 0x40000,
        }));
    assert!(h.bitmaps_ext().is_some());
    assert!(h.active_bitmaps_ext().is_none());
    h.autoclear_features |= AutoclearFeatures::BITMAPS;
    assert_eq!(h.active_bitmaps_ext().unwrap().dir_offset, 0x40000);
}

#[test]
fn basic_field_errors() {
    assert_starts(
        err_of(|h| h.magic = 0x5146_49fc),
        "Image is not in qcow2 format",
    );
    assert_starts(err_of(|h| h.version = 4), "Unsupported qcow2 version 4");
    assert_starts(err_of(|h| h.version = 1), "Unsupported qcow2 version 1");
    assert_starts(
        err_of(|h| h.cluster_bits = 8),
        "Unsupported cluster size: 2^8",
    );
    assert_starts(
        err_of(|h| h.cluster_bits = 22),
        "Unsupported cluster size: 2^22",
    );
    assert_starts(
        err_of(|h| {
            h.header_length = 96;
            h.header_tail.clear();
        }),
        "qcow2 header too short",
    );
    assert_starts(
        err_of_bytes(|b| b[100..104].copy_from_slice(&70000u32.to_be_bytes())),
        "qcow2 header exceeds cluster size",
    );
    assert_starts(
        err_of(|h| {
            h.header_length = 108;
            h.header_tail = vec![0; 3];
        }),
        "qcow2 header length 108 is not a multiple of 8",
    );
    assert_starts(
        err_of(|h| h.refcount_order = 7),
        "Reference count entry width too large; may not exceed 64 bits",
    );
    assert_starts(
        err_of(|h| h.crypt_method = 3),
        "Unsupported encryption method 3",
    );
    assert!(Header::parse(&cluster(&base_v3())[..50])
        .unwrap_err()
        .to_string()
        .contains("truncated"));
    assert!(Header::parse(&[]).is_err());
}

#[test]
fn compression_type_errors() {
    assert_starts(
        err_of(|h| h.compression_type = 2),
        "qcow2: unknown compression type: 2",
    );
    assert_starts(
        err_of(|h| h.compression_type = 1),
        "qcow2: Compression type incompatible feature bit must be set",
    );
    assert_starts(
        err_of(|h| h.incompatible_features |= IncompatibleFeatures::COMPRESSION_TYPE),
        "qcow2: Compression type incompatible feature bit must not be set",
    );
    // With header_length 104 the field is absent, so the bit cannot be satisfied.
    assert_starts(
        err_of(|h| {
            h.header_length = 104;
            h.header_tail.clear();
            h.incompatible_features |= IncompatibleFeatures::COMPRESSION_TYPE;
        }),
        "qcow2: Compression type incompatible feature bit must not be set",
    );
    let mut h = base_v3();
    h.compression_type = 1;
    h.incompatible_features |= IncompatibleFeatures::COMPRESSION_TYPE;
    assert!(Header::parse(&cluster(&h)).is_ok());
    assert!(FormatError::UnknownCompressionType(9).is_unsupported());
}

#[test]
fn unknown_incompatible_features_are_named() {
    let table = HeaderExtension::FeatureNameTable(vec![
        FeatureName {
            kind: FEATURE_KIND_COMPATIBLE,
            bit: 5,
            name: "not this one".into(),
        },
        FeatureName {
            kind: FEATURE_KIND_INCOMPATIBLE,
            bit: 5,
            name: "shiny new thing".into(),
        },
        FeatureName {
            kind: FEATURE_KIND_AUTOCLEAR,
            bit: 6,
            name: "nor this".into(),
        },
    ]);
    let mut h = base_v3();
    h.incompatible_features = IncompatibleFeatures::from_bits_retain((1 << 5) | (1 << 6) | 1);
    h.extensions.push(table);
    let err = Header::parse(&cluster(&h)).unwrap_err();
    assert!(err.is_unsupported());
    assert_eq!(
        err.to_string(),
        "Unsupported qcow2 feature(s): shiny new thing, Unknown incompatible feature: 40"
    );
    h.extensions.clear();
    assert_eq!(
        Header::parse(&cluster(&h)).unwrap_err().to_string(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 60"
    );
}

#[test]
fn table_errors() {
    assert_starts(
        err_of(|h| h.refcount_table_clusters = 0),
        "Image does not contain a reference count table",
    );
    // QEMU opens a refcount table at offset 0 (the scan reports it lying on the header).
    let mut h = base_v3();
    h.refcount_table_offset = 0;
    assert!(Header::parse(&cluster(&h)).is_ok());
    assert_starts(
        err_of(|h| h.refcount_table_clusters = 129),
        "Reference count table too large",
    );
    assert_starts(
        err_of(|h| h.refcount_table_offset = 0x10200),
        "Reference count table offset invalid",
    );
    assert_starts(
        err_of(|h| h.refcount_table_offset = 0x7fff_ffff_ffff_0000),
        "Reference count table offset invalid",
    );
    assert_starts(
        err_of(|h| h.nb_snapshots = 65537),
        "Snapshot table too large",
    );
    assert_starts(
        err_of(|h| h.snapshots_offset = 0x100),
        "Snapshot table offset invalid",
    );
    assert_starts(
        err_of(|h| h.l1_size = (4 << 20) + 1),
        "Active L1 table too large",
    );
    assert_starts(
        err_of(|h| h.l1_table_offset = 0x30008),
        "Active L1 table offset invalid",
    );
    assert_starts(
        err_of(|h| h.l1_table_offset = 1 << 63),
        "Active L1 table offset invalid",
    );
    assert_starts(err_of(|h| h.l1_size = 1), "L1 table is too small");
    assert_starts(err_of(|h| h.size = u64::MAX), "Image is too big");
    assert_starts(
        err_of(|h| {
            h.cluster_bits = 12;
            h.header_length = 112;
            h.l1_table_offset = 0x3000;
            h.refcount_table_offset = 0x1000;
            h.incompatible_features |= IncompatibleFeatures::EXTENDED_L2;
        }),
        "Unsupported subcluster size: 128",
    );
}

#[test]
fn serializer_refuses_what_does_not_fit() {
    let mut h = base_v3();
    h.backing_file = Some("y".repeat(1024));
    h.fix_layout();
    assert!(matches!(
        h.serialize(),
        Err(FormatError::FieldTooLarge {
            field: "backing file name",
            len: 1024,
            max: 1023
        })
    ));
    h.backing_file = Some("y".repeat(1023));
    h.fix_layout();
    assert!(h.serialize().is_ok());
}

#[test]
fn backing_file_errors() {
    assert_starts(
        err_of(|h| {
            h.backing_file = Some("x".into());
            h.fix_layout();
            h.backing_file_offset = 65537;
        }),
        "Invalid backing file offset",
    );
    assert_starts(
        err_of(|h| {
            h.backing_file = Some("y".repeat(1024));
            h.fix_layout();
        }),
        "Backing file name too long",
    );
    assert_starts(
        err_of(|h| {
            h.backing_file = Some("z".into());
            h.fix_layout();
            h.backing_file_offset = 65530;
            h.backing_file_size = 7;
        }),
        "Backing file name too long",
    );
    // An extension running into the backing file name is too large.
    assert_starts(
        err_of(|h| {
            h.backing_file = Some("name".into());
            h.extensions
                .push(HeaderExtension::BackingFormat("qcow2".into()));
            h.fix_layout();
            h.backing_file_offset -= 16;
        }),
        "Header extension too large",
    );
}

#[test]
fn feature_dependent_errors() {
    assert_starts(
        err_of(|h| h.autoclear_features |= AutoclearFeatures::RAW_EXTERNAL_DATA),
        "data-file-raw requires a data file",
    );
    assert_starts(
        err_of(|h| h.crypt_method = CRYPT_LUKS),
        "Missing CRYPTO header for crypt method 2",
    );
    assert_starts(
        err_of(|h| {
            h.autoclear_features |= AutoclearFeatures::BITMAPS;
            h.extensions
                .push(HeaderExtension::Bitmaps(BitmapsExtension::default()));
        }),
        "found bitmaps extension with zero bitmaps",
    );
    // AES is accepted: its metadata is plain and can be scanned.
    let mut h = base_v3();
    h.crypt_method = CRYPT_AES;
    assert!(Header::parse(&cluster(&h)).is_ok());
}

/// Parses a real header, checks that serializing it reproduces the image bytes exactly.
fn parse_real(hex_bytes: &str) -> Header {
    let bytes = hex(hex_bytes);
    let mut full = bytes.clone();
    full.resize(65536, 0);
    let h = Header::parse(&full).unwrap();
    let out = h.serialize().unwrap();
    assert!(out.len() <= full.len());
    assert_eq!(
        out[..],
        full[..out.len()],
        "serialize must reproduce qemu-img's bytes"
    );
    assert!(full[out.len()..].iter().all(|&b| b == 0));
    // Parsing just the bytes up to the end marker and backing file works too.
    assert_eq!(Header::parse(&full[..out.len()]).unwrap(), h);
    // One byte less and the parser says what is cut off.
    let err = Header::parse(&full[..out.len() - 1]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    h
}

#[test]
fn real_v3_with_backing_file() {
    let h = parse_real(testdata::V3_BACKING_HEADER);
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.size, 64 << 20);
    assert_eq!(h.backing_file.as_deref(), Some("/tmp/fmtimg/base.qcow2"));
    assert_eq!(h.backing_file_size, 22);
    assert_eq!(h.backing_format(), Some("qcow2"));
    assert_eq!(h.header_length, 112);
    assert_eq!(h.refcount_order, 4);
    let names = h.feature_names();
    assert_eq!(names.len(), 8);
    assert_eq!(names[0].name, "dirty bit");
    assert!(names
        .iter()
        .any(|f| f.kind == 2 && f.bit == 0 && f.name == "bitmaps"));
    assert_eq!(
        (h.l1_table_offset, h.refcount_table_offset),
        (0x30000, 0x10000)
    );
}

#[test]
fn real_v2() {
    let h = parse_real(testdata::V2_HEADER);
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert!(h.extensions.is_empty());
    assert_eq!(h.size, 1 << 30);
}

#[test]
fn real_extended_l2() {
    let h = parse_real(testdata::EXTENDED_L2_HEADER);
    assert!(h.is_extended_l2());
    assert_eq!(h.l2_entries(), 4096);
    assert_eq!(h.l1_size, 4);
}

#[test]
fn real_zstd() {
    let h = parse_real(testdata::ZSTD_HEADER);
    assert_eq!(h.compression_type, COMPRESSION_ZSTD);
    assert!(h
        .incompatible_features
        .contains(IncompatibleFeatures::COMPRESSION_TYPE));
}

#[test]
fn real_luks() {
    let h = parse_real(testdata::LUKS_HEADER);
    assert_eq!(h.crypt_method, CRYPT_LUKS);
    let (offset, length) = h.crypto_header().unwrap();
    assert_eq!(offset % 65536, 0);
    assert!(length > 0);
}

#[test]
fn real_external_data_file() {
    let h = parse_real(testdata::EXTERNAL_DATA_HEADER);
    assert!(h.has_external_data_file());
    assert!(h
        .autoclear_features
        .contains(AutoclearFeatures::RAW_EXTERNAL_DATA));
    assert_eq!(h.data_file(), Some("/tmp/fmtimg/data.raw"));
}

#[test]
fn real_snapshots_and_bitmaps() {
    let h = parse_real(testdata::SNAP_BITMAP_HEADER);
    assert_eq!(h.nb_snapshots, 2);
    assert_eq!(h.snapshots_offset, 0x70000);
    let b = h.active_bitmaps_ext().unwrap();
    assert_eq!((b.nb_bitmaps, b.dir_size, b.dir_offset), (2, 64, 0xb0000));
}
