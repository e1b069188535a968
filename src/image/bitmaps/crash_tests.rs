//! A writer crashed at every storage write of two sessions that change a disk with bitmaps
//! and store them at close: no crash point may leave a bitmap that says it is consistent and
//! misses a change.
//!
//! For each crash point and each crash model of `image/crash_tests.rs` (later writes failed,
//! power lost, unflushed writes reordered), the image must pass `qemu-img check` (leaks
//! allowed), and every bitmap that is not in use must mark every guest byte that differs from
//! the disk before the sessions (the disabled one: none). Crash points with the bitmaps in use
//! and with them consistent mid-way must both occur, or the test proves nothing.

use std::process::Command;
use std::sync::{Arc, Mutex};

use super::super::crash_tests::{crashed_images, qemu_check, qemu_img, Op, Recording};
use crate::format::GuestOffset;
use crate::image::{Image, OpenOptions};
use crate::storage::MemStorage;

const SIZE: u64 = 4 << 20;

/// A qemu-img image with 512-byte clusters, some data, and bitmaps `en` (enabled, default
/// granularity), `fine` (512 bytes) and `dis` (disabled).
fn base_image(qemu: &std::path::Path) -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("qcow2ovl-bm-crash-{}.qcow2", std::process::id()));
    let p = path.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(qemu).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p,
        "4M",
    ]);
    run(&["bitmap", "--add", p, "en"]);
    run(&["bitmap", "--add", "-g", "512", p, "fine"]);
    run(&["bitmap", "--add", "--disable", p, "dis"]);
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

/// Two sessions of writes, zeroes and discards, each ended by `close` (which stores).
fn workload(img: &Image) {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _session in 0..2 {
        for i in 0..16 {
            let off = next() % SIZE;
            let len = (next() % 5000 + 1).min(SIZE - off);
            match i % 4 {
                3 => img.write_zeroes(GuestOffset(off), len, true).unwrap(),
                2 => img.discard(GuestOffset(off), len).unwrap(),
                _ => img
                    .write_at(
                        GuestOffset(off),
                        &vec![(next() % 255 + 1) as u8; len as usize],
                    )
                    .unwrap(),
            }
        }
        img.close().unwrap();
    }
}

fn guest(bytes: &[u8]) -> (Image, Vec<u8>) {
    let img = Image::from_storage(
        Arc::new(MemStorage::new(bytes.to_vec())),
        OpenOptions::default(),
    )
    .unwrap();
    let mut data = vec![0u8; SIZE as usize];
    img.read_at(GuestOffset(0), &mut data).unwrap();
    (img, data)
}

#[test]
fn no_crash_point_leaves_a_consistent_bitmap_that_misses_a_change() {
    let Some(qemu) = qemu_img() else {
        eprintln!("qemu-img not installed: bitmap crash test skipped");
        return;
    };
    let base = base_image(&qemu);
    let (_, before) = guest(&base);
    let rec = Arc::new(Recording {
        inner: MemStorage::new(base.clone()),
        log: Mutex::new(Vec::new()),
    });
    let writable = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = Image::from_storage(rec.clone(), writable).unwrap();
    workload(&img);
    drop(img);
    let log = rec.log.lock().unwrap().clone();
    let writes: Vec<usize> = (0..log.len())
        .filter(|&i| matches!(log[i], Op::Write(..)))
        .collect();
    let every: usize = std::env::var("QCOW2OVL_CRASH_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((writes.len() / 60).max(1));
    let (mut in_use, mut consistent_changed) = (0, 0);
    let mut x: u64 = 0x51_7cc1_b727;
    for &n in writes.iter().step_by(every) {
        for (tag, bytes) in crashed_images(&base, &log, n, &mut x) {
            let (corruptions, errors) = qemu_check(&qemu, &bytes, tag, true);
            assert_eq!((corruptions, errors), (0, 0), "crash at op {n}, {tag}");
            let (img, now) = guest(&bytes);
            let changed: Vec<u64> = (0..SIZE)
                .filter(|&i| now[i as usize] != before[i as usize])
                .collect();
            for (entry, inconsistent) in img.bitmap_list() {
                if inconsistent {
                    in_use += 1;
                    continue;
                }
                let dirty = img.dirty_extents(&entry.name, 0, SIZE).unwrap();
                if entry.name == "dis" {
                    assert!(dirty.is_empty(), "crash at op {n}, {tag}: dis marked");
                    continue;
                }
                let covered = |i: u64| dirty.iter().any(|&(a, l)| (a..a + l).contains(&i));
                if let Some(miss) = changed.iter().find(|&&i| !covered(i)) {
                    panic!(
                        "crash at op {n}, {tag}: bitmap {} is consistent but misses guest \
                         byte {miss:#x}",
                        entry.name
                    );
                }
                consistent_changed += usize::from(!changed.is_empty());
            }
        }
    }
    eprintln!(
        "bitmap crash points: {} of {} writes, 3 models each; {in_use} bitmaps in use, \
         {consistent_changed} consistent over a changed disk",
        writes.len().div_ceil(every),
        writes.len()
    );
    assert!(in_use > 0 && consistent_changed > 0);
}
