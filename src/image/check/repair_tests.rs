//! Unit tests of `check -r`: leaks and all modes, the rebuild, shared clusters left alone, a
//! failing disk at every write, and the repair of a dirty image at a writable open.

use super::*;
use crate::format::entry::OFLAG_COPIED;
use crate::image::testutil::*;
use crate::storage::MemStorage;

fn check(st: &Arc<MemStorage>) -> CheckReport {
    let view = Image::from_storage(st.clone(), OpenOptions::default()).unwrap();
    view.check().unwrap()
}

fn put16(b: &mut [u8], at: u64, v: u16) {
    b[at as usize..at as usize + 2].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn leaks_mode_lowers_leaks_and_leaves_corruptions() {
    // Cluster 5 used with refcount 3 (too low is not the case: too high), cluster 6 leaked.
    let l2 = [5 * CS, OFLAG_COPIED | (6 * CS)];
    let mut b = image(1 << 30, &l2, &[(0, 7), (0, 8), (0, 9)]);
    put16(&mut b, 2 * CS + 2 * 7, 2); // cluster 7: nothing references it
    put16(&mut b, 2 * CS + 2 * 5, 1); // cluster 5 (COPIED clear, refcount 1): a COPIED error
    let (st, img) = open_for_repair(b);
    let r = img.repair(Repair::Leaks).unwrap();
    assert_eq!((r.leaks, r.leaks_fixed), (0, 1), "{:?}", r.findings);
    // Nothing else was wrong once the leak was gone: the COPIED flag was fixed too.
    assert_eq!(
        (r.corruptions, r.corruptions_fixed),
        (0, 1),
        "{:?}",
        r.findings
    );
    assert_eq!(check(&st).exit_code(), 0);
}

#[test]
fn all_mode_raises_refcounts_and_fixes_copied() {
    let l2 = [OFLAG_COPIED | (5 * CS), OFLAG_COPIED | (5 * CS)];
    // Cluster 5 referenced twice with refcount 1: raise to 2, clear both COPIED flags.
    let (st, img) = open_for_repair(image(1 << 30, &l2, &[(0, 7)]));
    assert_eq!(img.repair(Repair::Leaks).unwrap().corruptions, 1);
    let r = img.repair(Repair::All).unwrap();
    assert_eq!(
        (r.corruptions, r.corruptions_fixed),
        (0, 3),
        "{:?}",
        r.findings
    );
    let after = check(&st);
    assert_eq!(after.exit_code(), 0, "{:?}", after.findings);
    let l2_word = u64::from_be_bytes(st.snapshot()[4 * CS as usize..][..8].try_into().unwrap());
    assert_eq!(l2_word, 5 * CS);
}

#[test]
fn zero_refcount_rebuilds_the_structure_at_the_end() {
    let l2 = [OFLAG_COPIED | (5 * CS)];
    let mut b = image(1 << 30, &l2, &[(0, 7)]);
    put16(&mut b, 2 * CS + 2 * 5, 0);
    let len = b.len() as u64;
    let (st, img) = open_for_repair(b);
    let err = img.repair(Repair::Leaks).unwrap_err();
    assert!(err.to_string().contains("rebuild"), "{err}");
    let r = img.repair(Repair::All).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.corruptions_fixed), (0, 0, 1));
    // The new table and block sit past the old end; the old ones are free.
    let view = Image::from_storage(st.clone(), OpenOptions::default()).unwrap();
    assert!(view.header().refcount_table_offset >= len);
    assert_eq!(check(&st).exit_code(), 0);
    // Data unchanged.
    assert!(st.snapshot()[5 * CS as usize..6 * CS as usize]
        .iter()
        .all(|&x| x == 7));
}

#[test]
fn shared_cluster_is_left_and_reported() {
    // Data cluster of guest 0 on the L1 table (cluster 3): refcount 1, two users.
    let l2 = [OFLAG_COPIED | (3 * CS)];
    let (st, img) = open_for_repair(image(1 << 30, &l2, &[]));
    let before = check(&st);
    assert!(!before.overlaps.is_empty());
    let r = img.repair(Repair::All).unwrap();
    assert_eq!(r.corruptions, before.corruptions, "{:?}", r.findings);
    assert_eq!(r.corruptions_fixed, 0);
    assert!(r
        .findings
        .iter()
        .any(|f| matches!(f.kind, FindingKind::RefcountTooLow { cluster: 3, .. })));
    // qemu-img would see the same: the cluster still has refcount 1 and two users.
    let again = check(&st);
    assert!(again.findings.iter().any(|f| matches!(
        f.kind,
        FindingKind::RefcountTooLow {
            cluster: 3,
            refcount: 1,
            ..
        }
    )));
    assert!(!again.overlaps.is_empty());
}

/// A repair that meets a failing disk (every write from the nth on) returns an error or a
/// report, never panics; and once the disk works again, a second repair makes the image
/// clean with the guest data unchanged. Both the in-place and the rebuild paths.
#[test]
fn failing_writes_never_panic_and_a_second_repair_finishes() {
    use crate::format::GuestOffset;
    use crate::storage::{FaultyStorage, StorageOp};
    let l2 = [OFLAG_COPIED | (5 * CS), 6 * CS];
    let mut in_place = image(1 << 30, &l2, &[(0, 1), (0, 2), (0, 3)]);
    put16(&mut in_place, 2 * CS + 2 * 5, 4);
    let mut rebuild = in_place.clone();
    put16(&mut rebuild, 2 * CS + 2 * 6, 0);
    let options = OpenOptions {
        writable: true,
        repair: true,
        ..OpenOptions::default()
    };
    for bytes in [in_place, rebuild] {
        let counting = Arc::new(FaultyStorage::new(MemStorage::new(bytes.clone())));
        let img = Image::from_storage(counting.clone(), options.clone()).unwrap();
        assert_eq!(img.repair(Repair::All).unwrap().exit_code(), 0);
        let writes = counting.count(StorageOp::Write);
        assert!(writes >= 2);
        for n in 1..=writes {
            let st = Arc::new(FaultyStorage::new(MemStorage::new(bytes.clone())));
            let img = Image::from_storage(st.clone(), options.clone()).unwrap();
            st.fail_from(StorageOp::Write, n);
            let _ = img.repair(Repair::All);
            drop(img);
            let again = Arc::new(MemStorage::new(st.inner().snapshot()));
            let img = Image::from_storage(again.clone(), options.clone()).unwrap();
            let r = img.repair(Repair::All).unwrap();
            assert_eq!(
                (r.corruptions, r.leaks, r.check_errors),
                (0, 0, 0),
                "write {n}"
            );
            let mut guest = vec![0u8; 2 * CS as usize];
            img.read_at(GuestOffset(0), &mut guest).unwrap();
            assert!(guest[..CS as usize].iter().all(|&b| b == 1), "write {n}");
            assert!(guest[CS as usize..].iter().all(|&b| b == 2), "write {n}");
            // A refused or failed write may have set the corrupt bit; the clean repair
            // cleared it.
            let view = Image::from_storage(again, OpenOptions::default()).unwrap();
            assert!(
                !view.header().is_corrupt() && !view.header().is_dirty(),
                "write {n}"
            );
        }
    }
}

#[test]
fn dirty_image_is_repaired_at_a_writable_open_only() {
    let l2 = [OFLAG_COPIED | (5 * CS)];
    let mut b = image(1 << 30, &l2, &[(0, 7)]);
    put16(&mut b, 2 * CS + 2 * 5, 0); // a refcount lazy refcounts never wrote
    b[79] |= 1; // incompatible features: dirty
    let on_disk = |st: &Arc<MemStorage>| {
        let view = Image::from_storage(st.clone(), OpenOptions::default()).unwrap();
        (view.header().is_dirty(), view.check().unwrap().exit_code())
    };
    // Read-only, and opened for an explicit repair: left as it is.
    let st = Arc::new(MemStorage::new(b.clone()));
    assert_eq!(on_disk(&st), (true, 2));
    let (st, _img) = open_for_repair(b.clone());
    assert_eq!(on_disk(&st), (true, 2));
    // A normal writable open repairs it first.
    let st = Arc::new(MemStorage::new(b));
    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = Image::from_storage(st.clone(), rw.clone()).unwrap();
    assert!(!img.header().is_dirty());
    assert_eq!(on_disk(&st), (false, 0));
    // ... and says so, once.
    let notes = img.take_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].level, crate::image::NoteLevel::Warning);
    assert!(notes[0].message.contains("repaired at open"), "{notes:?}");
    assert!(notes[0].message.contains("1 corruptions"), "{notes:?}");
    assert!(img.take_notes().is_empty());
    // Autoclear bits (here an unknown one) are dropped at the first write, with a note.
    let mut b = image(1 << 30, &l2, &[(0, 7)]);
    b[95] |= 0x80;
    let st_clear = Arc::new(MemStorage::new(b));
    let img = Image::from_storage(st_clear.clone(), rw).unwrap();
    assert!(img.take_notes().is_empty());
    img.write_at(crate::format::GuestOffset(0), &[1; 512])
        .unwrap();
    let notes = img.take_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].level, crate::image::NoteLevel::Info);
    assert!(notes[0].message.contains("0x80 "), "{notes:?}");
    assert!(notes[0].message.contains("unknown"), "{notes:?}");
    let on_disk = Image::from_storage(st_clear.clone(), OpenOptions::default()).unwrap();
    assert!(on_disk.header().autoclear_features.is_empty());
}
