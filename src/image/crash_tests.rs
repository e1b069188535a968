//! Crash consistency of the writer, with `qemu-img check` as the judge.
//!
//! A workload that allocates L2 tables and refcount blocks, grows the refcount table and moves
//! the L1 table runs once on storage that records every operation. Then, for crash points N
//! (every N locally: `QCOW2OVL_CRASH_EVERY=1`; a sample in CI), the image is rebuilt as the
//! disk could hold it after a crash at N, and checked:
//!
//! - **failed writes**: every write after the Nth fails (the writes before it all landed);
//! - **power loss**: the writes after the last completed flush before N are lost;
//! - **reordering**: power loss, but a random subset of those unflushed writes did land.
//!
//! `qemu-img check` must report no corruption (leaks are allowed) and every byte that a
//! completed `flush()` covered must read back.
//!
//! The workload also creates, applies and deletes internal snapshots. A crash inside one of
//! those may leave a window `qemu-img check` reports although no data is at risk: COPIED set on
//! a cluster whose refcount on disk is 2 while only one reference is left (the other count is
//! a leak). So there the rule is: after `qemu-img check -r leaks`, the only findings allowed
//! are COPIED flags that are *missing* on a cluster with refcount 1 (harmless: the next write
//! copies it once more), never a COPIED flag on a shared cluster, and every snapshot that
//! exists reads exactly as it did when it was created.
//!
//! The suite runs twice: on a plain image, and with every data cluster enciphered by the
//! engine's toy test cipher (an encrypted configuration: unaligned writes widened to whole
//! sectors, copied data enciphered again at its new host offset).

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use super::{Image, OpenOptions, Repair};
use crate::create::{plan, write_image, CreateOptions};
use crate::format::GuestOffset;
use crate::storage::{MemStorage, Storage};

/// One recorded storage operation.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Write(u64, Vec<u8>),
    Flush,
    SetLen(u64),
}

/// Storage that records every change.
#[derive(Debug)]
pub(super) struct Recording {
    pub(super) inner: MemStorage,
    pub(super) log: Mutex<Vec<Op>>,
}

impl Storage for Recording {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(Op::Write(offset, buf.to_vec()));
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Op::Flush);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Op::SetLen(len));
        self.inner.set_len(len)
    }
    /// A discard is recorded as zeros written (the worst a hole can read as): a cluster freed
    /// too early would lose bytes a crash image must still hold.
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_at(offset, &vec![0; len as usize])
    }
}

/// What the disk may hold after a crash at op `n` of `log` (a write), under the three crash
/// models, each tagged: (a) `failed`: the writes up to and including the nth landed, later
/// ones failed; (b) `lost`: power loss, only what the last barrier before it made durable; (c)
/// `reordered`: power loss, with a random subset (drawn from `x`) of the unflushed writes
/// landed.
pub(super) fn crashed_images(
    base: &[u8],
    log: &[Op],
    n: usize,
    x: &mut u64,
) -> [(&'static str, Vec<u8>); 3] {
    let last_flush = log[..n]
        .iter()
        .rposition(|op| matches!(op, Op::Flush))
        .map_or(0, |i| i + 1);
    let mut failed = base.to_vec();
    log[..=n].iter().for_each(|op| apply(&mut failed, op));
    let mut lost = base.to_vec();
    log[..last_flush].iter().for_each(|op| apply(&mut lost, op));
    let mut reordered = lost.clone();
    for op in &log[last_flush..=n] {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        if *x % 2 == 0 {
            apply(&mut reordered, op);
        }
    }
    [("failed", failed), ("lost", lost), ("reordered", reordered)]
}

pub(super) fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(o, b) => {
            let end = *o as usize + b.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*o as usize..end].copy_from_slice(b);
        }
        Op::SetLen(l) => image.resize(*l as usize, 0),
        Op::Flush => {}
    }
}

/// The workload: rounds of scattered writes, each round ending with a flush; returns the guest
/// contents after each round (index 0: before any write) and the op index of each round's
/// completed flush.
/// What the workload did besides writes: the op ranges of snapshot operations, and each
/// snapshot's guest contents.
#[derive(Default)]
struct Snapshots {
    ranges: Vec<(usize, usize)>,
    models: std::collections::HashMap<String, Vec<u8>>,
}

fn workload(
    img: &Image,
    size: u64,
    log: &Mutex<Vec<Op>>,
    snaps: &mut Snapshots,
) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut model = vec![0u8; size as usize];
    let mut models = vec![model.clone()];
    let mut flushes = vec![log.lock().unwrap().len()];
    for round in 0..12u64 {
        for _ in 0..24 {
            let off = next() % size;
            let len = (next() % 3000 + 1).min(size - off);
            let byte = (next() % 255 + 1) as u8;
            let data = vec![byte; len as usize];
            img.write_at(GuestOffset(off), &data).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if round == 5 {
            // Move the L1 table (and keep writing past the old end).
            img.resize(size + (4 << 20)).unwrap();
        }
        if matches!(round, 2 | 7 | 9 | 10) {
            // A flushed state right before the snapshot operation, so that a crash inside it
            // is judged against the disk just before and just after it.
            img.flush().unwrap();
            models.push(model.clone());
            flushes.push(log.lock().unwrap().len());
        }
        let before = log.lock().unwrap().len();
        match round {
            2 | 7 => {
                let name = if round == 2 { "a" } else { "b" };
                img.create_snapshot(name, None, 0).unwrap();
                snaps.models.insert(name.into(), model.clone());
            }
            9 => {
                img.apply_snapshot("a").unwrap();
                model = snaps.models["a"].clone();
                model.resize(img.virtual_size() as usize, 0);
            }
            10 => {
                img.delete_snapshot("b").unwrap();
            }
            _ => {}
        }
        let after = log.lock().unwrap().len();
        if after > before {
            snaps.ranges.push((before, after));
        }
        if round % 4 == 3 {
            let off = next() % (size - 8192);
            img.discard(GuestOffset(off), 8192).unwrap();
            let start = off.div_ceil(512) * 512;
            let end = (off + 8192) / 512 * 512;
            model[start as usize..end as usize].fill(0);
        }
        img.flush().unwrap();
        models.push(model.clone());
        flushes.push(log.lock().unwrap().len());
    }
    (models, flushes)
}

pub(super) fn qemu_img() -> Option<std::path::PathBuf> {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v qemu-img"])
        .output()
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?;
    let p = p.trim();
    (!p.is_empty()).then(|| p.into())
}

/// `(corruptions, check_errors)` from `qemu-img check --output=json`.
pub(super) fn qemu_check(
    qemu: &std::path::Path,
    bytes: &[u8],
    tag: &str,
    keep: bool,
) -> (u64, u64) {
    let path = temp_image(tag);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    let out = std::process::Command::new(qemu)
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if keep && !text.contains("\"corruptions\": 0") && text.contains("\"corruptions\"") {
        eprintln!("kept {}", path.display());
    } else {
        let _ = std::fs::remove_file(&path);
    }
    let field = |k: &str| -> u64 {
        text.split(&format!("\"{k}\": "))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        text.contains("\"image-end-offset\""),
        "qemu-img check failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (field("corruptions"), field("check-errors"))
}

/// The `ERROR` lines of `qemu-img check` after `qemu-img check -r leaks`, and the check errors.
/// A temporary file name of its own for one call: the crash suites run in parallel threads of
/// one process (the plain and the encrypted one), so a name must not repeat.
fn temp_image(tag: &str) -> std::path::PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "qcow2ovl-crash-{}-{call}-{tag}.qcow2",
        std::process::id()
    ))
}

fn qemu_check_after_leak_repair(qemu: &std::path::Path, bytes: &[u8], tag: &str) -> Vec<String> {
    let path = temp_image(&format!("{tag}-leaks"));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(qemu)
            .args(args)
            .arg(&path)
            .output()
            .unwrap()
    };
    run(&["check", "-q", "-r", "leaks", "-f", "qcow2"]);
    let out = run(&["check", "-f", "qcow2"]);
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    text.lines()
        .filter(|l| l.starts_with("ERROR") || l.contains("check failed"))
        .map(str::to_string)
        .collect()
}

/// Whether a `qemu-img check` error line is a COPIED flag missing on a cluster with refcount 1.
fn is_missing_copied(line: &str) -> bool {
    let entry = line
        .split("entry=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    line.starts_with("ERROR OFLAG_COPIED")
        && line.ends_with("refcount=1")
        && entry.is_some_and(|e| e & crate::format::entry::OFLAG_COPIED == 0)
}

#[test]
fn every_crash_point_leaves_a_consistent_image() {
    crash_suite(false);
}

/// The same with every data cluster enciphered (the engine's toy test cipher): the writes that
/// re-encipher copied data (copy-on-write at new host offsets) are crash points too, and what a
/// flush covered deciphers back.
#[test]
fn every_crash_point_of_an_encrypted_image_leaves_a_consistent_image() {
    crash_suite(true);
}

/// `storage` opened with `options`, with the toy cipher when `ciphered`.
fn open_maybe_ciphered(storage: Arc<dyn Storage>, options: OpenOptions, ciphered: bool) -> Image {
    let img = Image::from_storage(storage, options).unwrap();
    if ciphered {
        img.with_test_cipher(Arc::new(crate::image::crypt::test_cipher::XorCipher))
    } else {
        img
    }
}

fn crash_suite(ciphered: bool) {
    let Some(qemu) = qemu_img() else {
        eprintln!("qemu-img not installed: crash test skipped");
        return;
    };
    let size = 6u64 << 20;
    let opts = CreateOptions {
        size,
        cluster_size: 512,
        refcount_bits: 16,
        ..CreateOptions::default()
    };
    let base = MemStorage::new(Vec::new());
    write_image(&plan(&opts).unwrap(), &base, None).unwrap();
    let base_bytes = base.snapshot();
    let rec = Arc::new(Recording {
        inner: MemStorage::new(base_bytes.clone()),
        log: Mutex::new(Vec::new()),
    });
    let img = open_maybe_ciphered(
        rec.clone(),
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
        ciphered,
    );
    let mut snaps = Snapshots::default();
    let (models, flushes) = workload(&img, size, &rec.log, &mut snaps);
    drop(img);
    let log = rec.log.lock().unwrap().clone();
    let writes: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::Write(..)))
        .map(|(i, _)| i)
        .collect();
    let every: usize = std::env::var("QCOW2OVL_CRASH_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((writes.len() / 40).max(1));
    let mut covered = 0;
    let mut inside = 0;
    let mut leaks_fixed = 0;
    let mut x: u64 = 0x9e37_79b9;
    for (k, &n) in writes.iter().enumerate().step_by(every) {
        // The last round whose flush() completed before this write (for the data check).
        let f = flushes.iter().rposition(|&fl| fl <= n).unwrap_or(0);
        for (tag, bytes) in &crashed_images(&base_bytes, &log, n, &mut x) {
            let (tag, bytes) = (*tag, bytes);
            let in_snapshot_op = snaps.ranges.iter().any(|&(a, b)| (a..b).contains(&n));
            let (corruptions, errors) = qemu_check(&qemu, bytes, tag, !in_snapshot_op);
            if in_snapshot_op {
                inside += 1;
                assert_eq!(
                    errors, 0,
                    "crash at write {k} (op {n}), {tag}: check errors"
                );
                let lines = qemu_check_after_leak_repair(&qemu, bytes, tag);
                assert!(
                    lines.iter().all(|l| is_missing_copied(l)),
                    "crash at write {k} (op {n}) in a snapshot operation, {tag}: {lines:?}"
                );
            } else {
                assert_eq!(
                    (corruptions, errors),
                    (0, 0),
                    "crash at write {k} (op {n}), {tag}: qemu-img check found corruption"
                );
            }
            // What the last completed flush covered reads back (the regions written since then
            // may hold either contents; they are taken from the model of the next round).
            let img = open_maybe_ciphered(
                Arc::new(MemStorage::new(bytes.clone())),
                OpenOptions::default(),
                ciphered,
            );
            // Every snapshot that exists reads as it was taken.
            for sn in img.snapshots() {
                let view = open_maybe_ciphered(
                    Arc::new(MemStorage::new(bytes.clone())),
                    OpenOptions {
                        snapshot: Some(sn.id.clone()),
                        ..OpenOptions::default()
                    },
                    ciphered,
                );
                let mut got = vec![0u8; size as usize];
                view.read_at(GuestOffset(0), &mut got).unwrap();
                assert!(
                    got == snaps.models[&sn.name],
                    "crash at write {k}, {tag}: snapshot {} changed",
                    sn.name
                );
            }
            let mut got = vec![0u8; size as usize];
            img.read_at(GuestOffset(0), &mut got).unwrap();
            let before = &models[f];
            let after = models.get(f + 1).unwrap_or(before);
            for (i, (&g, (&b, &a))) in got.iter().zip(before.iter().zip(after)).enumerate() {
                assert!(
                    g == b || g == a,
                    "crash at write {k}, {tag}: guest byte {i} reads {g}, flushed {b}"
                );
            }
            // A killed writer leaves leaks at worst: a leaks-only repair makes the image clean
            // and the guest reads the same. Inside a snapshot operation a COPIED flag may be
            // missing as well (see the module documentation): a full repair sets it.
            let st = Arc::new(MemStorage::new(bytes.clone()));
            let repair = OpenOptions {
                writable: true,
                repair: true,
                ..OpenOptions::default()
            };
            let img = open_maybe_ciphered(st.clone(), repair, ciphered);
            let mode = if in_snapshot_op {
                Repair::All
            } else {
                Repair::Leaks
            };
            let r = img.repair(mode).unwrap();
            let fixed = if in_snapshot_op {
                0
            } else {
                r.corruptions_fixed
            };
            assert_eq!(
                (r.corruptions, r.leaks, r.check_errors, fixed),
                (0, 0, 0, 0),
                "crash at write {k}, {tag}: repair left {:?}",
                r.findings
            );
            leaks_fixed += r.leaks_fixed;
            drop(img);
            let (corruptions, errors) = qemu_check(&qemu, &st.snapshot(), tag, true);
            assert_eq!((corruptions, errors), (0, 0), "crash at write {k}, {tag}");
            let img = open_maybe_ciphered(st, OpenOptions::default(), ciphered);
            let mut again = vec![0u8; size as usize];
            img.read_at(GuestOffset(0), &mut again).unwrap();
            assert!(
                again == got,
                "crash at write {k}, {tag}: repair changed guest data"
            );
        }
        covered += 1;
    }
    eprintln!(
        "crash points covered: {covered} of {} writes ({} ops), 3 crash models each; \
         {inside} checks inside snapshot operations",
        writes.len(),
        log.len()
    );
    assert!(covered > 0);
    assert!(leaks_fixed > 0, "no crash point left a leak to repair");
}

/// A repair interrupted at any write (the later writes failing, or lost with the power) leaves
/// an image no worse than it found it: no corruption it did not have, no check error, the guest
/// reading the same; and a second repair makes it clean. Both ways of repairing refcounts: in
/// place (a leak, a refcount too high, a COPIED flag) and by rebuilding the structure (a
/// refcount of 0 on a used cluster).
#[test]
fn an_interrupted_repair_leaves_the_image_no_worse() {
    use super::testutil::{image, CS};
    use crate::format::entry::OFLAG_COPIED;

    // Guest clusters 0-2 at clusters 5-7 (7 without COPIED: a COPIED error); cluster 8 holds
    // data nothing references (a leak).
    let l2 = [OFLAG_COPIED | (5 * CS), OFLAG_COPIED | (6 * CS), 7 * CS];
    let clean = image(1 << 30, &l2, &[(0, 1), (0, 2), (0, 3), (0, 4)]);
    let mut in_place = clean.clone();
    in_place[(2 * CS + 13) as usize] = 3; // cluster 6: refcount 3, one reference
    let mut rebuild = clean;
    rebuild[(2 * CS + 11) as usize] = 0; // cluster 5: refcount 0, one reference
    let repair = OpenOptions {
        writable: true,
        repair: true,
        ..OpenOptions::default()
    };
    let read_view = |bytes: &[u8]| {
        let img = Image::from_storage(
            Arc::new(MemStorage::new(bytes.to_vec())),
            OpenOptions::default(),
        )
        .unwrap();
        let mut guest = vec![0u8; 3 * CS as usize];
        img.read_at(GuestOffset(0), &mut guest).unwrap();
        (img.check().unwrap(), guest)
    };
    for (case, bytes) in [("in place", in_place), ("rebuild", rebuild)] {
        let (before, guest) = read_view(&bytes);
        assert!(before.corruptions > 0 && before.leaks > 0, "{case}");
        let rec = Arc::new(Recording {
            inner: MemStorage::new(bytes.clone()),
            log: Mutex::new(Vec::new()),
        });
        let img = Image::from_storage(rec.clone(), repair.clone()).unwrap();
        let r = img.repair(Repair::All).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{case}: {:?}", r.findings);
        drop(img);
        let log = rec.log.lock().unwrap().clone();
        let mut points = 0;
        for (n, op) in log.iter().enumerate() {
            if !matches!(op, Op::Write(..)) {
                continue;
            }
            let last_flush = log[..n]
                .iter()
                .rposition(|op| matches!(op, Op::Flush))
                .map_or(0, |i| i + 1);
            let mut failed = bytes.clone();
            log[..=n].iter().for_each(|op| apply(&mut failed, op));
            let mut lost = bytes.clone();
            log[..last_flush].iter().for_each(|op| apply(&mut lost, op));
            for (tag, crashed) in [("failed", failed), ("lost", lost)] {
                let (r, g) = read_view(&crashed);
                assert!(
                    r.corruptions <= before.corruptions && r.check_errors == 0,
                    "{case}, write {n}, {tag}: {:?}",
                    r.findings
                );
                assert!(g == guest, "{case}, write {n}, {tag}: guest data changed");
                let st = Arc::new(MemStorage::new(crashed));
                let img = Image::from_storage(st, repair.clone()).unwrap();
                let again = img.repair(Repair::All).unwrap();
                assert_eq!(
                    (again.corruptions, again.leaks, again.check_errors),
                    (0, 0, 0),
                    "{case}, write {n}, {tag}: {:?}",
                    again.findings
                );
            }
            points += 1;
        }
        assert!(points >= 2, "{case}: {points} writes");
    }
}
