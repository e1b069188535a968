//! Internal snapshots: create, apply (revert the active disk to a snapshot) and delete.
//!
//! A snapshot is a copy of the active L1 table in new clusters plus an entry in the snapshot
//! table; the L2 tables and data clusters stay where they are, shared. Sharing is what the
//! refcounts say: every cluster reachable from an L1 table counts one reference per L1 table
//! that reaches it (per path: a data cluster in an L2 table that two L1 tables share counts
//! two). COPIED flags in the active tables are exact: set iff the refcount is 1, which is what
//! lets a write go in place; a shared cluster is copied first.
//!
//! Each operation starts from a flushed writer and orders its own writes so that a crash at any
//! point leaves an image whose only damage is leaked references (`qemu-img check -r leaks`
//! makes it clean), with one exception QEMU has too (see `create`):
//!
//! - **create**: the L1 copy is written; the new references are counted on disk (barrier);
//!   COPIED is cleared in the active tables (barrier); then the snapshot table names the
//!   snapshot. A crash after the COPIED barrier and before the table leaves clusters whose
//!   COPIED flag is clear while their true refcount is 1: `qemu-img check` counts those as
//!   corruptions, yet they are harmless (the next write copies the cluster once more). The
//!   opposite order would let a crash leave COPIED set on clusters the snapshot shares, which
//!   a later write would overwrite in place: destroying the snapshot's data.
//! - **delete**: the snapshot table drops the entry first (its references become leaks); then
//!   COPIED is set where a refcount is about to fall to 1; then the refcounts drop.
//! - **apply**: the snapshot's references are counted (barrier); COPIED is cleared in its
//!   tables, which are about to become active; the active L1 table takes its entries (barrier);
//!   then the old active references drop, COPIED set first where a refcount falls to 1.
//!
//! The metadata map follows every step: the L1 copy is INACTIVE_L1, the snapshot's L2 tables
//! INACTIVE_L2 (besides ACTIVE_L2 while the active L1 shares them); a deleted snapshot's L2
//! tables lose INACTIVE_L2 only when no other snapshot uses them; after an apply the active
//! L2 tables are exactly those of the new active L1.

mod references;
mod tables;

use std::collections::HashSet;

use super::write::guard::WriteKind;
use super::write::Writer;
use super::{Image, ImageError};
use crate::format::entry::L1Entry;
use crate::format::limits::MAX_SNAPSHOTS;
use crate::format::{serialize_snapshot_table, write_u64_table, SnapshotEntry};
use crate::overlap::MetadataType;
use references::l2_tables;

/// Longest snapshot name, in bytes: QEMU keeps names in 256-byte buffers, so a longer one would
/// be cut short in `qemu-img snapshot -l` and could not be found by its full name.
pub const MAX_SNAPSHOT_NAME: usize = 255;
/// Longest snapshot id, in bytes (QEMU's 128-byte buffer).
pub const MAX_SNAPSHOT_ID: usize = 127;

/// The snapshot list as it is now.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotList {
    /// The entries, in table order.
    pub entries: Vec<SnapshotEntry>,
    /// Byte length of the table on disk (end of the last entry).
    pub table_bytes: u64,
}

/// The position of `wanted` in `list`: by id first, then by name, as QEMU looks snapshots up.
pub(in crate::image) fn find(list: &[SnapshotEntry], wanted: &str) -> Result<usize, ImageError> {
    list.iter()
        .position(|s| s.id == wanted)
        .or_else(|| list.iter().position(|s| s.name == wanted))
        .ok_or_else(|| ImageError::SnapshotNotFound(wanted.to_string()))
}

/// The next free numeric id: one more than the largest id that starts with digits (QEMU's
/// rule, so ids stay in step with snapshots QEMU creates).
fn next_id(list: &[SnapshotEntry]) -> String {
    let largest = list
        .iter()
        .filter_map(|s| {
            let digits: String = s.id.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    (largest + 1).to_string()
}

/// Refuses names and ids QEMU could not show or find.
fn validate_label(what: &str, text: &str, max: usize) -> Result<(), ImageError> {
    if text.is_empty() {
        return Err(ImageError::InvalidArgument(format!(
            "Snapshot {what} must not be empty"
        )));
    }
    if text.len() > max {
        return Err(ImageError::InvalidArgument(format!(
            "Snapshot {what} is too long ({} bytes; at most {max})",
            text.len()
        )));
    }
    if text.contains('\0') {
        return Err(ImageError::InvalidArgument(format!(
            "Snapshot {what} must not contain NUL characters"
        )));
    }
    Ok(())
}

impl Image {
    /// The snapshot list as it is now.
    pub fn snapshots(&self) -> Vec<SnapshotEntry> {
        self.snaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .clone()
    }

    /// Creates an internal snapshot of the active disk named `name` (unique among the names),
    /// with id `id` (unique; the next free number when `None`). `vm_state_size` is only
    /// recorded: no VM state is stored. Returns the new entry.
    pub fn create_snapshot(
        &self,
        name: &str,
        id: Option<&str>,
        vm_state_size: u64,
    ) -> Result<SnapshotEntry, ImageError> {
        let mut w = self.writer("create_snapshot")?;
        let r = self.create_locked(&mut w, name, id, vm_state_size);
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Deletes the snapshot with id (else name) `wanted`, freeing what only it used.
    pub fn delete_snapshot(&self, wanted: &str) -> Result<SnapshotEntry, ImageError> {
        let mut w = self.writer("delete_snapshot")?;
        let r = self.delete_locked(&mut w, wanted);
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Reverts the active disk to the snapshot with id (else name) `wanted`; the snapshot
    /// stays. The disk size becomes the snapshot's.
    pub fn apply_snapshot(&self, wanted: &str) -> Result<SnapshotEntry, ImageError> {
        let mut w = self.writer("apply_snapshot")?;
        let r = self.apply_locked(&mut w, wanted);
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Snapshots need refcounted clusters: guest data in an external data file has none
    /// (QEMU refuses the same).
    fn snapshots_supported(&self, w: &Writer) -> Result<(), ImageError> {
        w.refuse_if_poisoned()?;
        if w.external_data {
            return Err(ImageError::Unsupported(
                "Internal snapshots are not supported with an external data file".into(),
            ));
        }
        Ok(())
    }

    fn create_locked(
        &self,
        w: &mut Writer,
        name: &str,
        id: Option<&str>,
        vm_state_size: u64,
    ) -> Result<SnapshotEntry, ImageError> {
        self.snapshots_supported(w)?;
        validate_label("name", name, MAX_SNAPSHOT_NAME)?;
        let mut list = self.snapshots();
        let id = match id {
            Some(id) => id.to_string(),
            None => next_id(&list),
        };
        validate_label("id", &id, MAX_SNAPSHOT_ID)?;
        if list.iter().any(|s| s.name == name) {
            return Err(ImageError::InvalidArgument(format!(
                "Snapshot '{name}' already exists"
            )));
        }
        if list.iter().any(|s| s.id == id) {
            return Err(ImageError::InvalidArgument(format!(
                "Snapshot with ID '{id}' already exists"
            )));
        }
        if list.len() as u64 >= MAX_SNAPSHOTS {
            return Err(ImageError::Unsupported(format!(
                "Too many snapshots (at most {MAX_SNAPSHOTS})"
            )));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let l1 = self.l1_table();
        let mut entry = SnapshotEntry {
            l1_table_offset: 0,
            l1_size: l1.len() as u32,
            id,
            name: name.to_string(),
            date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            // The 32-bit field holds the low bits; readers use the 64-bit one (QEMU does both).
            vm_state_size: vm_state_size as u32,
            vm_state_size_large: Some(vm_state_size),
            disk_size: Some(self.virtual_size()),
            // As qemu-img records it: no record/replay instruction count.
            icount: Some(0),
            extra_unknown: Vec::new(),
        };
        list.push(entry.clone());
        // Refused here, before anything changes, if the table could not be written.
        serialize_snapshot_table(&list)?;

        self.open_for_change(w)?;
        self.flush_locked(w)?;
        let storage = std::sync::Arc::clone(&self.storage);
        let g = self.geometry;
        let cs = g.cluster_size();

        // 1. One more reference to everything the active L1 table reaches (in memory; all or
        // nothing, so that a refcount at its maximum refuses the snapshot cleanly).
        self.count_references(w, &l1)?;

        // 2. The L1 copy, in new clusters. Its entries have COPIED clear (everything is shared)
        // and no reserved bits (a damaged entry is not carried into the copy).
        let clusters = (l1.len() as u64 * 8).div_ceil(cs);
        let l1_offset = if clusters == 0 {
            0
        } else {
            self.allocate_run(w, clusters)?.0
        };
        let copy: Vec<u64> = l1
            .iter()
            .map(|&e| L1Entry(e).without_reserved().with_copied(false).0)
            .collect();
        let mut bytes = write_u64_table(&copy);
        bytes.resize((clusters * cs) as usize, 0);
        // A new table is checked against every type, so it enters the map once written.
        self.guarded_write(w, WriteKind::NewTable, storage.as_ref(), l1_offset, &bytes)?;
        self.map_enter(w, l1_offset, clusters, MetadataType::INACTIVE_L1)?;
        storage.flush()?;

        // 3. The new references on disk before any table says the clusters are shared.
        self.write_refcounts(w)?;

        // 4. COPIED cleared in the active tables (every refcount is at least 2 now).
        let active = self.sync_copied(w, &l1)?;
        self.write_active_l1(w, &l1, &active)?;

        // 5. The snapshot table names the snapshot.
        entry.l1_table_offset = l1_offset;
        *list
            .last_mut()
            .ok_or_else(|| ImageError::Corruption("empty list".into()))? = entry.clone();
        self.write_snapshot_table(w, list)?;
        for t in l2_tables(&l1) {
            self.map_enter(w, t, 1, MetadataType::INACTIVE_L2)?;
        }
        self.l2_cache.clear();
        self.flush_locked(w)?;
        Ok(entry)
    }

    fn delete_locked(&self, w: &mut Writer, wanted: &str) -> Result<SnapshotEntry, ImageError> {
        self.snapshots_supported(w)?;
        let mut list = self.snapshots();
        let gone = list.remove(find(&list, wanted)?);
        let sn_l1 = self.read_snapshot_l1(&gone)?;
        self.open_for_change(w)?;
        self.flush_locked(w)?;
        let storage = std::sync::Arc::clone(&self.storage);
        let cs = self.geometry.cluster_size();

        // 1. The table forgets the snapshot: from here on its references are leaks.
        self.write_snapshot_table(w, list)?;

        // Its tables are no longer inactive, except those another snapshot uses.
        let l1_clusters = (u64::from(gone.l1_size) * 8).div_ceil(cs);
        self.map_remove(gone.l1_table_offset, l1_clusters, MetadataType::INACTIVE_L1)?;
        let mut still_used = HashSet::new();
        for other in self.snapshots() {
            still_used.extend(l2_tables(&self.read_snapshot_l1(&other)?));
        }
        for t in l2_tables(&sn_l1) {
            if !still_used.contains(&t) {
                self.map_remove(t, 1, MetadataType::INACTIVE_L2)?;
            }
        }

        // 2. Its references dropped, in memory only.
        let mut freed = self.drop_references(w, &sn_l1)?;
        let l1_first = gone.l1_table_offset / cs;
        for c in l1_first..l1_first + l1_clusters {
            if w.refcounts.adjust(storage.as_ref(), c, -1)? == 0 {
                freed.push(c);
            }
        }

        // 3, 4. COPIED set where a refcount fell to 1, then the refcounts drop on disk.
        self.finish_dropping(w, &freed)?;
        Ok(gone)
    }

    fn apply_locked(&self, w: &mut Writer, wanted: &str) -> Result<SnapshotEntry, ImageError> {
        self.snapshots_supported(w)?;
        let list = self.snapshots();
        let sn = list[find(&list, wanted)?].clone();
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let new_size = sn.disk_size.unwrap_or_else(|| self.virtual_size());
        let g = self.geometry;
        if new_size % 512 != 0 || g.l1_entries_for(new_size) > sn_l1.len() as u64 {
            return Err(ImageError::Corruption(format!(
                "Snapshot '{}' records a disk size of {new_size} bytes that its L1 table of \
                 {} entries does not cover",
                sn.id,
                sn_l1.len()
            )));
        }
        self.open_for_change(w)?;
        self.flush_locked(w)?;
        let old_l1 = self.l1_table();
        // What the revert changes is marked in the bitmaps before it happens.
        self.mark_bitmaps_for_revert(w, &old_l1, &sn_l1, new_size)?;

        // 1. One more reference to everything the snapshot reaches, on disk first.
        self.count_references(w, &sn_l1)?;
        self.write_refcounts(w)?;

        // 2. COPIED cleared in the snapshot's tables, about to be shared with the active L1.
        let taken = self.sync_copied(w, &sn_l1)?;

        // 3. The active L1 table takes the snapshot's entries (a larger table if needed), and
        // the disk its size: one flush writes the L1 table, then the header.
        self.grow_l1(w, sn_l1.len() as u64)?;
        {
            let mut l1 = self.l1.write().unwrap_or_else(|e| e.into_inner());
            for (i, slot) in l1.iter_mut().enumerate() {
                let new = taken.get(i).copied().unwrap_or(0);
                if *slot != new {
                    *slot = new;
                    w.l1_dirty.insert(i);
                }
            }
        }
        w.header.size = new_size;
        w.header_dirty = true;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        let old_tables: HashSet<u64> = l2_tables(&old_l1).collect();
        for t in l2_tables(&taken) {
            self.map_enter(w, t, 1, MetadataType::ACTIVE_L2)?;
        }
        self.flush_locked(w)?;
        let new_tables: HashSet<u64> = l2_tables(&taken).collect();
        for t in old_tables.difference(&new_tables) {
            self.map_remove(*t, 1, MetadataType::ACTIVE_L2)?;
        }

        // 4. The old active references dropped in memory; COPIED set where a refcount fell to
        // 1; then the refcounts drop on disk.
        let freed = self.drop_references(w, &old_l1)?;
        self.finish_dropping(w, &freed)?;
        Ok(sn)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testutil::{image, CS};
    use super::super::OpenOptions;
    use super::*;
    use crate::format::GuestOffset;
    use crate::storage::{MemStorage, Storage};

    const SIZE: u64 = 64 << 20;

    fn rw(st: &Arc<MemStorage>) -> Image {
        let o = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        Image::from_storage(Arc::clone(st) as Arc<dyn Storage>, o).unwrap()
    }

    fn read(img: &Image, at: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        img.read_at(GuestOffset(at), &mut buf).unwrap();
        buf
    }

    /// The live map equals a fresh scan of what is on disk, and the check finds nothing.
    fn assert_consistent(img: &Image, st: &Arc<MemStorage>) {
        img.flush().unwrap();
        let fresh = Image::from_storage(Arc::clone(st) as Arc<dyn Storage>, OpenOptions::default())
            .unwrap();
        assert_eq!(img.map().extents(), fresh.map().extents());
        let r = fresh.check().unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.findings);
    }

    #[test]
    fn create_write_apply_delete() {
        let st = Arc::new(MemStorage::new(image(SIZE, &[], &[])));
        let img = rw(&st);
        img.write_at(GuestOffset(0), &vec![1u8; 3 * CS as usize])
            .unwrap();
        let s1 = img.create_snapshot("one", None, 0).unwrap();
        assert_eq!((s1.id.as_str(), s1.disk_size), ("1", Some(SIZE)));
        assert_consistent(&img, &st);
        // The active tables are shared now: a write copies.
        img.write_at(GuestOffset(CS), &[2u8; 100]).unwrap();
        assert_consistent(&img, &st);
        let s2 = img.create_snapshot("two", None, 0).unwrap();
        assert_eq!(s2.id, "2");
        img.write_at(GuestOffset(5 * CS), &[3u8; 10]).unwrap();
        assert_eq!(read(&img, CS, 1), [2]);
        img.apply_snapshot("one").unwrap();
        assert_eq!(read(&img, CS, 1), [1]);
        assert_eq!(read(&img, 5 * CS, 1), [0]);
        assert_consistent(&img, &st);
        img.delete_snapshot("1").unwrap();
        assert_consistent(&img, &st);
        img.apply_snapshot("two").unwrap();
        assert_eq!(read(&img, CS + 99, 2), [2, 1]);
        img.delete_snapshot("two").unwrap();
        assert_consistent(&img, &st);
        assert!(img.snapshots().is_empty());
        // No snapshot left: the active clusters are owned again and written in place.
        img.write_at(GuestOffset(0), &[9]).unwrap();
        assert_consistent(&img, &st);
    }

    #[test]
    fn names_and_ids_are_checked_before_anything_changes() {
        let st = Arc::new(MemStorage::new(image(SIZE, &[], &[])));
        let img = rw(&st);
        img.create_snapshot("a", Some("7"), 0).unwrap();
        let before = st.snapshot();
        for (name, id) in [
            ("a", None),
            ("b", Some("7")),
            ("", None),
            (&*"x".repeat(256), None),
        ] {
            let e = img.create_snapshot(name, id, 0).unwrap_err();
            assert_eq!(e.kind(), crate::image::ErrorKind::InvalidArgument, "{e}");
        }
        assert_eq!(st.snapshot(), before, "a refused snapshot changed the file");
        assert_eq!(img.create_snapshot("b", None, 0).unwrap().id, "8");
        assert!(img.delete_snapshot("nope").is_err());
    }
}
