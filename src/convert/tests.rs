//! Conversion unit tests: in-memory qcow2 images and temporary raw files, every mode.

use std::sync::Arc;

use super::*;
use crate::create::{plan, write_image, CreateOptions};
use crate::format::GuestOffset;
use crate::image::{Image, OpenOptions};
use crate::storage::MemStorage;

const MIB: u64 = 1 << 20;

fn new_image(size: u64, cluster_size: u64) -> Image {
    let storage = Arc::new(MemStorage::new(Vec::new()));
    let opts = CreateOptions {
        size,
        cluster_size,
        ..CreateOptions::default()
    };
    write_image(&plan(&opts).unwrap(), storage.as_ref(), None).unwrap();
    Image::from_storage(
        storage,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn disk(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read_at(GuestOffset(0), &mut buf).unwrap();
    buf
}

/// A source with data, zeros written out, a zero run shorter than a cluster, and holes.
fn source() -> Image {
    let src = new_image(9 * MIB, 65536);
    let text: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8 | 1).collect();
    src.write_at(GuestOffset(0), &text).unwrap();
    src.write_at(GuestOffset(3 * MIB), &vec![0u8; MIB as usize])
        .unwrap();
    src.write_at(GuestOffset(4 * MIB + 4096), b"tail of a cluster")
        .unwrap();
    src.write_at(GuestOffset(9 * MIB - 5), b"end!!").unwrap();
    src
}

#[test]
fn every_mode_copies_the_disk() {
    let src = source();
    for (compress, min_sparse, parallel, out_of_order) in [
        (false, 4096, 8, false),
        (false, 0, 1, false),
        (true, 4096, 2, true),
        (false, 65536 * 3, 3, true),
    ] {
        for cluster_size in [4096, 65536, 2 * MIB] {
            let dst = new_image(9 * MIB, cluster_size);
            let options = ConvertOptions {
                compress,
                min_sparse,
                parallel,
                out_of_order,
                ..ConvertOptions::default()
            };
            let mut seen = Vec::new();
            let stats = convert(
                &Source::Image(&src),
                &Target::Image(&dst),
                &options,
                &mut |done, total| {
                    seen.push((done, total));
                    true
                },
            )
            .unwrap();
            assert_eq!(disk(&dst), disk(&src), "{options:?} cluster {cluster_size}");
            assert_eq!(seen.first(), Some(&(0, 9 * MIB)));
            assert_eq!(seen.last(), Some(&(9 * MIB, 9 * MIB)));
            assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
            assert_eq!(stats.compressed_clusters > 0, compress);
            if min_sparse == 0 {
                // Every byte written: the target is fully allocated.
                assert_eq!(stats.written, 9 * MIB);
            } else if cluster_size <= 65536 && min_sparse <= cluster_size {
                // The zeros written out in the source and its holes are not copied.
                assert!(stats.written < 5 * MIB, "{stats:?}");
            } else {
                // Zeros are left out only in runs of whole 2 MiB clusters (or of -S).
                assert!(stats.written < 9 * MIB, "{stats:?}");
            }
        }
    }
}

#[test]
fn zeros_are_written_when_the_target_is_not_zero() {
    let src = source();
    let dst = new_image(9 * MIB, 65536);
    dst.write_at(GuestOffset(0), &vec![0xaau8; 9 * MIB as usize])
        .unwrap();
    let options = ConvertOptions {
        target_is_zero: false,
        ..ConvertOptions::default()
    };
    convert(
        &Source::Image(&src),
        &Target::Image(&dst),
        &options,
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!(disk(&dst), disk(&src));
}

#[test]
fn a_small_target_is_refused() {
    let src = source();
    let dst = new_image(MIB, 65536);
    let err = convert(
        &Source::Image(&src),
        &Target::Image(&dst),
        &ConvertOptions::default(),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("smaller than the source"), "{err}");
}
