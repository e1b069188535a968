//! Scan unit tests: a tiny hand-built image, its structures mapped, and the ways a file can be
//! cut short, point at the wrong place or try to make the scan unbounded.

use super::*;
use crate::format::HostOffset;
use crate::problem::ProblemKind;
use crate::storage::MemStorage;

const CS: u64 = 65536;

/// A minimal v3 image: header, reftable at cluster 1, refblock at 2, L1 at 3, L2 at 4.
fn tiny_image() -> Vec<u8> {
    let mut img = vec![0u8; 5 * CS as usize];
    let put32 =
        |img: &mut Vec<u8>, o: usize, v: u32| img[o..o + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |img: &mut Vec<u8>, o: usize, v: u64| img[o..o + 8].copy_from_slice(&v.to_be_bytes());
    img[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut img, 4, 3);
    put32(&mut img, 20, 16);
    put64(&mut img, 24, 1 << 30);
    put32(&mut img, 36, 2);
    put64(&mut img, 40, 3 * CS);
    put64(&mut img, 48, CS);
    put32(&mut img, 56, 1);
    put32(&mut img, 96, 4);
    put32(&mut img, 100, 112);
    put64(&mut img, CS as usize, 2 * CS);
    put64(&mut img, 3 * CS as usize, (1 << 63) | (4 * CS));
    img
}

#[test]
fn a_file_cut_inside_the_fixed_header_says_so() {
    let full = tiny_image();
    for (len, version, needed) in [(100usize, 3u32, 104u64), (72, 3, 104), (60, 2, 72)] {
        let mut bytes = full[..len].to_vec();
        bytes[4..8].copy_from_slice(&version.to_be_bytes());
        let err = scan(&MemStorage::new(bytes), MetadataType::all(), None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("qcow2 header too short: the file is truncated"),
            "{text}"
        );
        assert!(text.contains(&format!("({len} bytes;")), "{text}");
        assert!(text.contains(&format!("needs at least {needed}")), "{text}");
    }
    // The whole fixed header present: judged by its fields (header_length 112 > 104 bytes
    // in the file is a header extension area cut off, read as zeros, as QEMU does).
    let whole = full[..104].to_vec();
    if let Err(err) = scan(&MemStorage::new(whole), MetadataType::all(), None) {
        assert!(!err.to_string().contains("truncated ("), "{err}");
    }
}

#[test]
fn maps_every_structure_of_a_tiny_image() {
    let st = MemStorage::new(tiny_image());
    let s = scan(&st, MetadataType::all(), None).unwrap();
    use MetadataType as T;
    assert_eq!(
        s.map.extents(),
        vec![
            (0, CS, T::MAIN_HEADER),
            (CS, CS, T::REFCOUNT_TABLE),
            (2 * CS, CS, T::REFCOUNT_BLOCK),
            (3 * CS, CS, T::ACTIVE_L1),
            (4 * CS, CS, T::ACTIVE_L2),
        ]
    );
    assert!(s.problems.is_empty());
}

#[test]
fn bad_pointers_are_problems_not_failures() {
    let mut img = tiny_image();
    img[3 * CS as usize + 8..3 * CS as usize + 16].copy_from_slice(&(4 * CS + 512).to_be_bytes());
    let st = MemStorage::new(img);
    let s = scan(&st, MetadataType::all(), None).unwrap();
    assert_eq!(s.problem_count, 1);
    assert!(
        s.problems[0].message.contains("not cluster-aligned"),
        "{:?}",
        s.problems
    );
    assert_eq!(s.problems[0].kind, ProblemKind::Unaligned);
    assert!(!s.blocks_writes);
}

#[test]
fn metadata_on_metadata_is_a_problem_that_blocks_writes() {
    // The second L1 entry points at the refcount block (cluster 2).
    let mut img = tiny_image();
    img[3 * CS as usize + 8..3 * CS as usize + 16].copy_from_slice(&(2 * CS).to_be_bytes());
    let s = scan(&MemStorage::new(img), MetadataType::all(), None).unwrap();
    assert_eq!(s.problem_count, 1, "{:?}", s.problems);
    let p = &s.problems[0];
    assert_eq!(
        p.kind,
        ProblemKind::MetadataOverlap {
            existing: MetadataType::ACTIVE_L2,
            new: MetadataType::REFCOUNT_BLOCK
        }
    );
    assert_eq!(p.offset, HostOffset(2 * CS));
    assert!(
        p.message.starts_with(
            "refcount block (refcount table index 0) at 0x20000 overlaps active L2 table"
        ),
        "{}",
        p.message
    );
    assert!(s.blocks_writes);
    // With the refcount block unchecked, nothing collides.
    let s = scan(
        &MemStorage::new(s_image_with_l1_on_refblock()),
        MetadataType::TEMPLATE_CACHED - MetadataType::REFCOUNT_BLOCK,
        None,
    )
    .unwrap();
    assert!(s.problems.is_empty());
}

fn s_image_with_l1_on_refblock() -> Vec<u8> {
    let mut img = tiny_image();
    img[3 * CS as usize + 8..3 * CS as usize + 16].copy_from_slice(&(2 * CS).to_be_bytes());
    img
}

#[test]
fn a_refcount_table_at_offset_zero_opens_with_a_problem() {
    let mut img = tiny_image();
    img[48..56].copy_from_slice(&0u64.to_be_bytes());
    let s = scan(&MemStorage::new(img), MetadataType::all(), None).unwrap();
    assert!(s.blocks_writes);
    assert!(
        s.problems[0].message.contains("overlaps qcow2_header"),
        "{:?}",
        s.problems
    );
}

#[test]
fn overlapping_snapshot_l1_tables_cannot_make_the_scan_unbounded() {
    // 60000 snapshots, each claiming the same 32 MiB L1 table: 30 billion bytes of "tables"
    // in a 2.7 MB file. The scan must refuse quickly instead of entering or reading them all.
    let mut img = tiny_image();
    let n = 60_000u32;
    let table = 5 * CS as usize;
    img.resize(table + n as usize * 40, 0);
    img[60..64].copy_from_slice(&n.to_be_bytes());
    img[64..72].copy_from_slice(&(5 * CS).to_be_bytes());
    for i in 0..n as usize {
        let e = table + i * 40;
        img[e..e + 8].copy_from_slice(&(3 * CS).to_be_bytes());
        img[e + 8..e + 12].copy_from_slice(&(4u32 << 20).to_be_bytes());
    }
    let st = MemStorage::new(img);
    let start = std::time::Instant::now();
    let err = scan(&st, MetadataType::all(), None).unwrap_err();
    assert!(matches!(err, ScanError::Inconsistent(_)), "{err}");
    assert!(start.elapsed().as_secs() < 10);
}

#[test]
fn random_mutations_never_panic() {
    // A cheap in-process fuzz over the header and tables of a real-shaped image; the Python
    // suite (`tests/test_fuzz.py`) runs the structured corruptions through the bindings.
    let base = tiny_image();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let mut img = base.clone();
        for _ in 0..(next() % 6 + 1) {
            let at = if next() % 2 == 0 {
                (next() % 112) as usize
            } else {
                (next() % img.len() as u64) as usize
            };
            let byte = match next() % 4 {
                0 => 0,
                1 => 0xff,
                2 => 1 << (next() % 8),
                _ => next() as u8,
            };
            img[at] = byte;
        }
        if next() % 8 == 0 {
            img.truncate((next() % img.len() as u64) as usize);
        }
        let _ = scan(&MemStorage::new(img), MetadataType::all(), None);
    }
}

#[test]
fn a_file_cut_inside_the_header_cluster_reads_zeros_there() {
    // Cut right after the header fields: extensions, tables and all read as zeros (as in
    // QEMU), so the header still parses and the tables are simply empty.
    let img = tiny_image()[..112].to_vec();
    let s = scan(&MemStorage::new(img), MetadataType::all(), None).unwrap();
    assert_eq!(s.header.l1_size, 2);
    assert!(s.l1_table.iter().all(|&e| e == 0));
}

#[test]
fn empty_and_short_files_fail_cleanly() {
    for len in [0usize, 3, 50, 99] {
        let st = MemStorage::new(tiny_image()[..len].to_vec());
        let err = scan(&st, MetadataType::all(), None).unwrap_err();
        assert!(matches!(err, ScanError::Format(_)), "{len}: {err}");
    }
}
