//! What a failed write or flush leaves behind, and that retrying it recovers everything.
//!
//! A disk that fills up (`ENOSPC`, `EFBIG`) fails a write before any of its bytes land. Such a
//! failure must leave the handle as it was, so that once space is freed a `flush()` writes all
//! the metadata the failed one did not: every write that had succeeded reads back, and the
//! image is consistent (at worst with leaked clusters). These tests fail every storage write
//! from the Nth on, for every N a flush makes, then let the disk work again and flush once more.

use std::sync::Arc;

use super::{Image, OpenOptions};
use crate::create::{plan, write_image, CreateOptions};
use crate::format::GuestOffset;
use crate::storage::{FaultyStorage, MemStorage, Storage, StorageOp};

/// A new image of `size` bytes with 512-byte clusters (so a few writes allocate L2 tables,
/// refcount blocks and grow the refcount table), on faulty storage, open for writing.
fn open_new(size: u64) -> (Arc<FaultyStorage<MemStorage>>, Image) {
    let opts = CreateOptions {
        size,
        cluster_size: 512,
        refcount_bits: 16,
        ..CreateOptions::default()
    };
    let base = MemStorage::new(Vec::new());
    write_image(&plan(&opts).unwrap(), &base, None).unwrap();
    let st = Arc::new(FaultyStorage::new(MemStorage::new(base.snapshot())));
    // A cache that holds every table the workload changes: nothing is written back before
    // the flush under test.
    let rw = OpenOptions {
        writable: true,
        cache_size: Some(4 << 20),
        ..OpenOptions::default()
    };
    let img = Image::from_storage(st.clone(), rw).unwrap();
    (st, img)
}

/// Writes that allocate many tables (kept in memory: nothing is flushed yet); returns the
/// guest disk they leave.
fn workload(img: &Image, size: u64) -> Vec<u8> {
    let mut model = vec![0u8; size as usize];
    for k in 0..40u64 {
        let off = (k * 151_111) % (size - 4096);
        let data = vec![(k % 250 + 1) as u8; 1500 + (k as usize % 7) * 300];
        img.write_at(GuestOffset(off), &data).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    model
}

/// Growing the disk moves the L1 table; its flush writes everything the workload changed.
fn grow(img: &Image, model: &mut Vec<u8>) -> Result<(), super::ImageError> {
    let new_size = model.len() as u64 + (2 << 20);
    model.resize(new_size as usize, 0);
    img.resize(new_size)
}

/// The disk's bytes read back through a fresh open, and the check's findings.
fn reopen_and_check(bytes: Vec<u8>, model: &[u8], tag: &str) {
    let img = Image::from_storage(Arc::new(MemStorage::new(bytes)), OpenOptions::default())
        .unwrap_or_else(|e| panic!("{tag}: reopen failed: {e}"));
    let r = img.check().unwrap();
    assert_eq!((r.corruptions, r.check_errors), (0, 0), "{tag}: {r:?}");
    assert!(!img.header().is_corrupt(), "{tag}");
    let mut guest = vec![0u8; model.len()];
    img.read_at(GuestOffset(0), &mut guest).unwrap();
    assert!(guest == model, "{tag}: guest data differs");
}

#[test]
fn a_flush_that_fails_at_any_write_recovers_when_retried() {
    let size = 3u64 << 20;
    // How many storage writes the flush of the resize makes.
    let (st, img) = open_new(size);
    let mut model = workload(&img, size);
    let before = st.count(StorageOp::Write);
    grow(&img, &mut model).unwrap();
    let writes = st.count(StorageOp::Write) - before;
    // Refcount blocks, the refcount table, L2 tables, the moved L1 table, header, decrements.
    assert!(writes >= 20, "{writes}");
    for n in 1..=writes {
        let (st, img) = open_new(size);
        let mut model = workload(&img, size);
        st.fail_from(StorageOp::Write, st.count(StorageOp::Write) + n);
        assert!(grow(&img, &mut model).is_err(), "write {n}");
        // Still full: failing again changes nothing.
        assert!(img.flush().is_err(), "write {n}");
        st.clear_faults();
        img.flush().unwrap();
        drop(img);
        reopen_and_check(st.inner().snapshot(), &model, &format!("write {n}"));
    }
}

#[test]
fn a_failed_barrier_is_retried_too() {
    let size = 3u64 << 20;
    for n in 1..=6 {
        let (st, img) = open_new(size);
        let mut model = workload(&img, size);
        st.fail_nth(StorageOp::Flush, st.count(StorageOp::Flush) + n);
        let first = grow(&img, &mut model);
        st.clear_faults();
        img.flush().unwrap();
        drop(img);
        assert!(first.is_err() || n > 1, "barrier {n}");
        reopen_and_check(st.inner().snapshot(), &model, &format!("barrier {n}"));
    }
}

#[test]
fn a_write_that_fails_keeps_the_writes_before_it() {
    let size = 3u64 << 20;
    let (st, img) = open_new(size);
    let mut model = workload(&img, size);
    grow(&img, &mut model).unwrap();
    // The disk fills up during a large write: it fails, and what it wrote before failing may
    // or may not read back, but every earlier write does once a flush gets through.
    st.fail_from(StorageOp::Write, st.count(StorageOp::Write) + 3);
    let big = vec![0x5a; 64 << 10];
    let err = img.write_at(GuestOffset(1 << 20), &big).unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert!(img.flush().is_err());
    st.clear_faults();
    // The caller retries the failed write, then flushes.
    img.write_at(GuestOffset(1 << 20), &big).unwrap();
    model[1 << 20..(1 << 20) + big.len()].copy_from_slice(&big);
    img.flush().unwrap();
    drop(img);
    reopen_and_check(st.inner().snapshot(), &model, "failed write");
    assert!(st.inner().len().unwrap() > 0);
}
