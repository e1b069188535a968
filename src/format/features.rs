//! Feature bits by name: the words QEMU uses for every known header feature bit, and the
//! compression type names.
//!
//! Everything that prints a feature (the bindings, the CLI) takes the names from here, so that a
//! bit has exactly one name in the project.

use super::header::{
    AutoclearFeatures, CompatibleFeatures, Header, IncompatibleFeatures, COMPRESSION_DEFLATE,
    COMPRESSION_ZSTD,
};

/// Feature name table kind of incompatible bits (as stored in the feature name extension).
const KIND_INCOMPATIBLE: u8 = 0;
/// Feature name table kind of compatible bits.
const KIND_COMPATIBLE: u8 = 1;
/// Feature name table kind of autoclear bits.
const KIND_AUTOCLEAR: u8 = 2;

/// Known incompatible bits with QEMU's names for them.
pub const INCOMPATIBLE_NAMES: [(IncompatibleFeatures, &str); 5] = [
    (IncompatibleFeatures::DIRTY, "dirty bit"),
    (IncompatibleFeatures::CORRUPT, "corrupt bit"),
    (
        IncompatibleFeatures::EXTERNAL_DATA_FILE,
        "external data file",
    ),
    (IncompatibleFeatures::COMPRESSION_TYPE, "compression type"),
    (IncompatibleFeatures::EXTENDED_L2, "extended L2 entries"),
];

/// Known compatible bits with QEMU's names.
pub const COMPATIBLE_NAMES: [(CompatibleFeatures, &str); 1] =
    [(CompatibleFeatures::LAZY_REFCOUNTS, "lazy refcounts")];

/// Known autoclear bits with QEMU's names.
pub const AUTOCLEAR_NAMES: [(AutoclearFeatures, &str); 2] = [
    (AutoclearFeatures::BITMAPS, "bitmaps"),
    (AutoclearFeatures::RAW_EXTERNAL_DATA, "raw external data"),
];

/// Names of every feature bit set in `h`: known bits in QEMU's words, unknown bits from the
/// image's feature name table, else `unknown <kind> feature bit <n>`.
pub fn feature_names(h: &Header) -> Vec<String> {
    let mut out = Vec::new();
    for (bit, name) in INCOMPATIBLE_NAMES {
        if h.incompatible_features.contains(bit) {
            out.push(name.to_string());
        }
    }
    for (bit, name) in COMPATIBLE_NAMES {
        if h.compatible_features.contains(bit) {
            out.push(name.to_string());
        }
    }
    for (bit, name) in AUTOCLEAR_NAMES {
        if h.autoclear_features.contains(bit) {
            out.push(name.to_string());
        }
    }
    let unknown = [
        (
            "incompatible",
            KIND_INCOMPATIBLE,
            h.incompatible_features.bits() & !IncompatibleFeatures::all().bits(),
        ),
        (
            "compatible",
            KIND_COMPATIBLE,
            h.compatible_features.bits() & !CompatibleFeatures::all().bits(),
        ),
        (
            "autoclear",
            KIND_AUTOCLEAR,
            h.autoclear_features.bits() & !AutoclearFeatures::all().bits(),
        ),
    ];
    for (word, kind, bits) in unknown {
        for bit in (0..64u32).filter(|b| bits & (1 << b) != 0) {
            let named = h
                .feature_names()
                .iter()
                .find(|f| u32::from(f.bit) == bit && f.kind == kind);
            out.push(match named {
                Some(f) => f.name.clone(),
                None => format!("unknown {word} feature bit {bit}"),
            });
        }
    }
    out
}

/// QEMU's name for a `compression_type` value: `zlib` (raw deflate streams) or `zstd`.
pub fn compression_name(compression_type: u8) -> &'static str {
    match compression_type {
        COMPRESSION_DEFLATE => "zlib",
        COMPRESSION_ZSTD => "zstd",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_and_unknown_bits() {
        let mut bytes = crate::format::testdata::hex(crate::format::testdata::V2_HEADER);
        bytes.resize(512, 0);
        let mut h = Header::parse(&bytes).unwrap();
        assert!(feature_names(&h).is_empty());
        h.incompatible_features |= IncompatibleFeatures::DIRTY;
        h.compatible_features |= CompatibleFeatures::from_bits_retain(1 << 5);
        h.autoclear_features |= AutoclearFeatures::BITMAPS;
        assert_eq!(
            feature_names(&h),
            vec!["dirty bit", "bitmaps", "unknown compatible feature bit 5"]
        );
        assert_eq!(compression_name(0), "zlib");
        assert_eq!(compression_name(1), "zstd");
    }
}
