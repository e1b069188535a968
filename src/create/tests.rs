//! Unit tests of image creation: layouts against the format layer's scan, and files.

use super::*;
use crate::format::new_image::refcounts_per_block;
use crate::format::ClusterIndex;
use crate::format::{refcount_get, ReftableEntry};
use crate::lock::Locking;
use crate::overlap::MetadataType;
use crate::scan::scan;
use crate::storage::MemStorage;
use crate::storage::{FileStorage, Storage};
use std::io;

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..Default::default()
    }
}

/// Creates in memory, rescans, and checks that exactly the clusters `0..used` have
/// refcount 1 and that the scan found no problem.
fn build(o: &CreateOptions) -> (Plan, Vec<u8>) {
    let p = plan(o).unwrap();
    let img = MemStorage::new(Vec::new());
    let data = MemStorage::new(Vec::new());
    let d: Option<&dyn Storage> = o.data_file.as_ref().map(|_| &data as &dyn Storage);
    write_image(&p, &img, d).unwrap();
    let s = scan(&img, MetadataType::all(), None).unwrap();
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(s.header, p.header);
    let bytes = img.snapshot();
    assert_eq!(bytes.len() as u64, p.file_len);
    let cs = p.geometry.cluster_size() as usize;
    let per = refcounts_per_block(cs as u64, p.refcount_order).unwrap();
    let refcount = |c: u64| -> u64 {
        let e = s
            .refcount_table
            .get((c / per) as usize)
            .copied()
            .unwrap_or(0);
        let b = ReftableEntry(e).block_offset().0 as usize;
        if b == 0 {
            return 0;
        }
        refcount_get(&bytes[b..b + cs], (c % per) as usize, p.refcount_order).unwrap()
    };
    for c in 0..p.used_clusters.0 {
        assert_eq!(refcount(c), 1, "cluster {c}");
    }
    assert_eq!(refcount(p.used_clusters.0), 0);
    assert_eq!(
        p.used_clusters.0,
        p.file_len.div_ceil(cs as u64),
        "every cluster up to the end is used"
    );
    if let Some(len) = p.data_file_len {
        assert_eq!(data.snapshot().len() as u64, len);
    }
    (p, bytes)
}

#[test]
fn default_layout_matches_qemu() {
    let (p, bytes) = build(&opts(1 << 30));
    assert_eq!(p.header.refcount_table_offset, 0x10000);
    assert_eq!(p.header.l1_table_offset, 0x30000);
    assert_eq!(p.header.l1_size, 2);
    assert_eq!(p.file_len, 0x30000 + 16);
    assert_eq!(&bytes[0x10000..0x10008], &0x20000u64.to_be_bytes());
}

#[test]
fn zero_size_has_no_l1() {
    let (p, _) = build(&opts(0));
    assert_eq!(p.header.l1_table_offset, 0);
    assert_eq!(p.file_len, 3 * 65536);
}

#[test]
fn size_rounds_up_to_sectors() {
    let (p, _) = build(&opts(100_000));
    assert_eq!(p.header.size, 100_352);
}

#[test]
fn metadata_preallocation_interleaves_like_qemu() {
    let o = CreateOptions {
        preallocation: Preallocation::Metadata,
        ..opts(1 << 30)
    };
    // Planned only: writing would take a 1 GiB buffer in memory.
    let p = plan(&o).unwrap();
    // QEMU: L2 tables at 0x40000 and 0x20050000, first data cluster at 0x50000.
    assert_eq!(p.file_len, 1_074_135_040);
    assert_eq!(p.l2_table_cluster(0), ClusterIndex(4));
    assert_eq!(p.l2_table_cluster(1), ClusterIndex(0x2005));
    assert_eq!(p.data_cluster(0), Some(ClusterIndex(5)));
    assert_eq!(p.data_cluster(8192), Some(ClusterIndex(0x2006)));
    let small = CreateOptions {
        preallocation: Preallocation::Metadata,
        ..opts(1 << 20)
    };
    let (_, bytes) = build(&small);
    assert_eq!(
        &bytes[0x30000..0x30008],
        &0x8000_0000_0004_0000u64.to_be_bytes()
    );
    assert_eq!(
        &bytes[0x40000..0x40008],
        &0x8000_0000_0005_0000u64.to_be_bytes()
    );
}

#[test]
fn every_variant_rescans_clean() {
    let sizes = [0u64, 65536 + 512, 3 << 20, (1 << 30) + 512];
    for &size in &sizes {
        for prealloc in [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ] {
            for (cs, ext) in [
                (512u64, false),
                (65536, false),
                (16384, true),
                (2 << 20, true),
            ] {
                // Every width on one geometry, the default width on the others.
                let widths: &[u64] = if cs == 512 {
                    &[1, 2, 4, 8, 16, 32, 64]
                } else {
                    &[16]
                };
                for &rb in widths {
                    let o = CreateOptions {
                        cluster_size: cs,
                        extended_l2: ext,
                        refcount_bits: rb,
                        preallocation: prealloc,
                        ..opts(size)
                    };
                    // Data in memory only for small images.
                    if size < (64 << 20) || prealloc == Preallocation::Off {
                        build(&o);
                    }
                    if size < (64 << 20) {
                        build(&CreateOptions {
                            data_file: Some("data.raw".into()),
                            ..o
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn refcount_structures_cover_themselves() {
    // 512-byte clusters with 64-bit refcounts: 64 refcounts per block, 64 entries per table
    // cluster, so the table itself spans clusters.
    let o = CreateOptions {
        cluster_size: 512,
        refcount_bits: 64,
        preallocation: Preallocation::Metadata,
        ..opts(8 << 20)
    };
    let (p, _) = build(&o);
    assert!(p.reftable_clusters.0 > 1);
    for others in [0u64, 1, 63, 64, 4095, 4096, 1 << 20] {
        let (b, t) = refcount_fixpoint(others, 512, 6).unwrap();
        assert!(b * 64 >= others + b + t);
        assert!(t * 64 >= b);
        // Minimal: one block fewer would not do.
        assert!(b == 0 || (b - 1) * 64 < others + b + t);
    }
}

#[test]
fn large_metadata_preallocation_is_planned_fast() {
    for (size, ext) in [(64u64 << 30, false), (1 << 40, false), (1 << 40, true)] {
        let o = CreateOptions {
            extended_l2: ext,
            preallocation: Preallocation::Metadata,
            backing_file: ext.then(|| "base.qcow2".into()),
            ..opts(size)
        };
        let p = plan(&o).unwrap();
        let cs = 65536;
        let data = size / cs;
        assert_eq!(
            p.used_clusters.0,
            1 + p.reftable_clusters.0 + p.refblock_count.0 + p.l1_clusters.0 + p.l2_tables.0 + data
        );
        assert!(p.refblock_count.0 * 32768 >= p.used_clusters.0);
    }
}

#[test]
fn qemu_validation_order_and_messages() {
    let err = |o: CreateOptions| plan(&o).unwrap_err().to_string();
    let v2 = |o: CreateOptions| CreateOptions { version: 2, ..o };
    assert!(err(v2(CreateOptions {
        extended_l2: true,
        cluster_size: 1000,
        ..opts(1)
    }))
    .starts_with("Extended L2 entries are only supported with compatibility level 1.1"));
    for cs in [256, 1000, 4 << 20, 0] {
        assert_eq!(
            err(CreateOptions {
                cluster_size: cs,
                ..opts(1)
            }),
            "Cluster size must be a power of two between 512 and 2048k"
        );
    }
    assert!(err(CreateOptions {
        extended_l2: true,
        cluster_size: 8192,
        ..opts(1)
    })
    .contains("at least 16384 bytes"));
    assert!(err(CreateOptions {
        backing_file: Some("b".into()),
        preallocation: Preallocation::Metadata,
        ..opts(1)
    })
    .starts_with("Backing file and preallocation"));
    assert_eq!(
        err(CreateOptions {
            backing_format: Some("raw".into()),
            ..opts(1)
        }),
        "Backing format cannot be used without backing file"
    );
    assert!(err(v2(CreateOptions {
        lazy_refcounts: true,
        refcount_bits: 8,
        ..opts(1)
    }))
    .starts_with("Lazy refcounts"));
    for rb in [0, 3, 128] {
        assert!(err(CreateOptions {
            refcount_bits: rb,
            ..opts(1)
        })
        .starts_with("Refcount width must be"));
    }
    assert!(err(v2(CreateOptions {
        refcount_bits: 8,
        ..opts(1)
    }))
    .starts_with("Different refcount widths"));
    assert_eq!(
        err(CreateOptions {
            data_file_raw: true,
            ..opts(1)
        }),
        "data-file-raw requires data-file"
    );
    assert!(err(CreateOptions {
        data_file_raw: true,
        data_file: Some("d".into()),
        backing_file: Some("b".into()),
        ..opts(1)
    })
    .starts_with("Backing file and data-file-raw"));
    assert!(err(v2(CreateOptions {
        data_file: Some("d".into()),
        ..opts(1)
    }))
    .starts_with("External data files"));
    assert!(err(v2(CreateOptions {
        compression: CompressionType::Zstd,
        ..opts(1)
    }))
    .starts_with("Non-zlib compression type"));
    assert!(err(opts(3 << 50)).starts_with("The image size is too large"));
    assert!(err(opts(u64::MAX)).starts_with("Invalid image size"));
    assert!(err(opts(i64::MAX as u64)).starts_with("Could not resize image"));
    assert!(err(CreateOptions {
        version: 4,
        ..opts(1)
    })
    .contains("'version'"));
    assert!(err(CreateOptions {
        backing_file: Some("x".repeat(1024)),
        ..opts(1)
    })
    .starts_with("Could not assign backing file 'xxx"));
    assert!(err(CreateOptions {
        cluster_size: 512,
        backing_file: Some("x".repeat(400)),
        backing_format: Some("raw".into()),
        ..opts(1)
    })
    .ends_with("with format 'raw': No space left on device"));
    // The largest L1 table is fine.
    assert!(plan(&opts(2 << 50)).is_ok());
}

#[test]
fn data_file_raw_forces_metadata_preallocation() {
    let o = CreateOptions {
        data_file: Some("d.raw".into()),
        data_file_raw: true,
        ..opts(1 << 30)
    };
    let (p, bytes) = build(&o);
    assert_eq!(p.placement, DataPlacement::External);
    assert_eq!(p.file_len, 6 * 65536);
    let l2 = p.geometry.cluster_start(p.l2_table_cluster(0)).unwrap().0 as usize;
    assert_eq!(
        &bytes[l2 + 8..l2 + 16],
        &0x8000_0000_0001_0000u64.to_be_bytes()
    );
}

#[test]
fn create_file_refuses_existing_files_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("qcow2ovl-create-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("a.qcow2");
    let data = dir.join("a.raw");
    let o = CreateOptions {
        data_file: Some(data.to_string_lossy().into_owned()),
        preallocation: Preallocation::Falloc,
        ..opts(1 << 20)
    };
    create_file(&img, &o, false, Locking::Auto).unwrap();
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 1 << 20);
    let err = create_file(&img, &o, false, Locking::Auto).unwrap_err();
    assert!(matches!(&err, CreateError::Io { source, .. }
        if source.kind() == io::ErrorKind::AlreadyExists));
    assert!(!err.is_invalid_options());
    // The image is refused before the data file is touched; a refused data file removes
    // the image this call created.
    std::fs::remove_file(&img).unwrap();
    assert!(create_file(&img, &o, false, Locking::Auto).is_err());
    assert!(!img.exists());
    assert!(data.exists());
    create_file(&img, &o, true, Locking::Auto).unwrap();
    let s = scan(
        &FileStorage::open_read_only(&img).unwrap(),
        MetadataType::all(),
        None,
    )
    .unwrap();
    assert!(s.problems.is_empty());
    // Invalid options create nothing.
    let bad = dir.join("bad.qcow2");
    let e = create_file(
        &bad,
        &CreateOptions {
            cluster_size: 3,
            ..opts(1)
        },
        false,
        Locking::Auto,
    );
    assert!(e.is_err_and(|e| e.is_invalid_options()));
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
