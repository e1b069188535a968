//! Repair: what `qemu-img check -r leaks|all` does, on a handle opened for it.
//!
//! The repair works from the check's recomputed reference counts, in steps, each ended by a
//! flush (a storage barrier) and followed by a fresh check of what reached the disk:
//!
//! 0. **Unaligned preallocated entries** ([`Repair::All`]): an active L2 entry for a
//!    preallocated zero cluster at an unaligned offset becomes a plain zero cluster, as
//!    qemu-img does (the guest reads zeros either way).
//! 1. **Refcounts.** Leaks (on-disk refcount above the references) are lowered in both modes;
//!    corruptions (below the references) are raised only by [`Repair::All`]. A damaged refcount
//!    structure (a used cluster with refcount 0, which includes a refcount table entry of 0 for
//!    a range in use; an unaligned, out-of-range or reserved-bit refcount table entry; a
//!    refcount block sharing its cluster) cannot be patched in place: [`Repair::All`] rebuilds
//!    it in fresh clusters past everything in use (`rebuild.rs`), and [`Repair::Leaks`]
//!    refuses, as qemu-img does.
//! 2. **COPIED flags** of active L1 and L2 entries are set exactly where the refcount of the
//!    target is now 1 (in [`Repair::Leaks`] mode only when step 1 left nothing wrong, as
//!    qemu-img does: otherwise the refcounts they would follow are not trusted).
//! 3. **Header bits.** When nothing is left wrong, the corrupt and dirty bits are cleared.
//!
//! Every write goes through `guarded_write`, and no repair touches a cluster that two
//! structures use (a named [`Overlap`](super::report::Overlap)): qemu-img would raise its refcount to
//! the number of users and call the image repaired, but the structures still overwrite each
//! other; here the cluster keeps its refcount and the final report keeps the corruption, so
//! that it says what was not repaired.
//!
//! Why the order is crash-safe: raising a refcount and lowering a refcount nothing references
//! are both safe at any moment; a rebuilt structure is written whole and flushed before the one
//! header write that switches to it, and the old structure is never overwritten (a crash before
//! the switch leaves the old image as it was); COPIED flags are written after the refcounts they
//! follow, and a flag left clear is always safe (it only makes writers copy).

use std::collections::HashSet;
use std::sync::Arc;

use super::Counts;
use super::{CheckReport, FindingKind, L2Position, Owner};
use crate::format::entry::L2Entry;
use crate::format::header::IncompatibleFeatures;
use crate::format::HostOffset;
use crate::image::write::l2::Slot;
use crate::image::write::Writer;
use crate::image::WriteKind;
use crate::image::{ErrorKind, Image, ImageError, OpenOptions};
use crate::overlap::MetadataType;

/// What a repair may change (`qemu-img check -r leaks` / `-r all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Lower refcounts that are higher than the references (leaked clusters). Never raises a
    /// refcount, so it cannot make a damaged image worse; refuses when the refcount structure
    /// itself needs rebuilding.
    Leaks,
    /// Leaks, refcounts lower than the references, COPIED flags, and a rebuild of a damaged
    /// refcount structure.
    All,
}

/// The error of a leaks-only repair that found a refcount structure only a rebuild can fix.
pub const NEED_REBUILD: &str =
    "ERROR need to rebuild refcount structures (only a repair of all errors rebuilds them)";

/// The checks a repair's fixed counters come from: before step 1 (after step 0) and between
/// steps 1 and 2, with the entries step 0 zeroed and the COPIED flags step 2 fixed.
struct Steps {
    before: CheckReport,
    mid: CheckReport,
    zeroed: u64,
    copied: u64,
}

/// Findings that mean the refcount structure must be rebuilt rather than patched.
fn needs_rebuild(report: &CheckReport) -> bool {
    report.findings.iter().any(|f| match f.kind {
        FindingKind::RefblockUnaligned { .. }
        | FindingKind::RefblockOutside { .. }
        | FindingKind::RefblockRefcount { .. }
        | FindingKind::ReftableReserved { .. }
        | FindingKind::RefcountUnreadable { .. } => true,
        // A used cluster with refcount 0 may lie in a range with no refcount block at all.
        FindingKind::RefcountTooLow { refcount, .. } => refcount == 0,
        _ => false,
    })
}

/// The corruptions a report counts for COPIED flags (repaired in step 2, counted apart).
fn copied_count(report: &CheckReport) -> u64 {
    report
        .findings
        .iter()
        .filter(|f| {
            matches!(
                f.kind,
                FindingKind::CopiedL1 { .. } | FindingKind::CopiedL2 { .. }
            )
        })
        .map(|f| f.times)
        .sum()
}

/// Whether an owner is part of the refcount structure (which a rebuild replaces).
fn is_refcount_structure(owner: Owner) -> bool {
    matches!(owner, Owner::RefcountTable | Owner::RefcountBlock(_))
}

/// The clusters two structures use, which no repair may touch: their overlaps. When the
/// refcount structure is rebuilt, overlaps with the old one disappear with it and do not count.
fn shared_clusters(report: &CheckReport, cluster_bits: u32, rebuild: bool) -> HashSet<u64> {
    report
        .overlaps
        .iter()
        .filter(|o| {
            !(rebuild && (is_refcount_structure(o.first) || is_refcount_structure(o.second)))
        })
        .map(|o| o.cluster_offset >> cluster_bits)
        .collect()
}

impl Image {
    /// Repairs the image as `qemu-img check -r leaks|all` does (see the module documentation)
    /// and returns the final check, with `corruptions_fixed` and `leaks_fixed` counted as
    /// qemu-img counts them and what remains in `corruptions` and `leaks`. The handle must be
    /// writable; open it with [`OpenOptions::repair`] to reach images marked corrupt or with
    /// overlapping metadata.
    pub fn repair(&self, mode: Repair) -> Result<CheckReport, ImageError> {
        let mut w = self.writer("repair")?;
        self.repair_locked(&mut w, mode)
    }

    /// A writable open of an image whose lazy refcounts were left dirty: repair it as QEMU
    /// does at open (all errors), or refuse the open if that leaves anything wrong.
    pub(in crate::image) fn repair_if_dirty(&mut self) -> Result<(), ImageError> {
        if !self.writable() || self.options.repair || !self.header().is_dirty() {
            return Ok(());
        }
        let r = self.repair(Repair::All).map_err(|e| match e.kind() {
            ErrorKind::Corruption => {
                ImageError::CannotOpenDirty(format!("Could not repair dirty image: {e}"))
            }
            _ => e,
        })?;
        // The header as opened now shows the bits as the repair left them.
        let bits = self.writer("repair")?.header.incompatible_features;
        self.scanned.header.incompatible_features = bits;
        if r.corruptions > 0 || r.check_errors > 0 || r.overlap_count > 0 {
            return Err(ImageError::CannotOpenDirty(format!(
                "Could not repair dirty image: {} corruptions and {} check errors remain; \
                 repair it with 'qcow2ovl check -r all'",
                r.corruptions, r.check_errors
            )));
        }
        self.writer("repair")?.notes.push(crate::image::Note {
            level: crate::image::NoteLevel::Warning,
            message: format!(
                "the image was left dirty (lazy refcounts, not closed cleanly); repaired at \
                 open: {} corruptions and {} leaks fixed",
                r.corruptions_fixed, r.leaks_fixed
            ),
        });
        Ok(())
    }

    fn repair_locked(&self, w: &mut Writer, mode: Repair) -> Result<CheckReport, ImageError> {
        let (first, counts) = self.check_through_view(w)?;
        if first.overlap_count > first.overlaps.len() as u64 {
            return Err(ImageError::Unsupported(format!(
                "{} metadata overlaps: too many to repair around",
                first.overlap_count
            )));
        }
        if mode == Repair::Leaks && needs_rebuild(&first) {
            return Err(ImageError::Corruption(NEED_REBUILD.into()));
        }
        let (first_corruptions, first_leaks) = (first.corruptions, first.leaks);
        // What was found comes first, as qemu-img prints it before repairing.
        let mut log: Vec<String> = first.findings.iter().map(|f| f.to_string()).collect();
        let steps = match self.repair_steps(w, mode, first, counts, &mut log) {
            Ok(steps) => steps,
            // A write the map refused is a repair that could not be made: the image is marked
            // corrupt and the handle refuses further writes; report what is on disk.
            Err(e) if e.kind() == ErrorKind::MetadataOverlap || w.poisoned.is_some() => {
                let (mut after, _) = self.check_through_view(w)?;
                after.corruptions_fixed = first_corruptions.saturating_sub(after.corruptions);
                after.leaks_fixed = first_leaks.saturating_sub(after.leaks);
                log.push(format!("ERROR repair stopped: {e}"));
                after.repair_log = log;
                return Ok(after);
            }
            Err(e) => return Err(e),
        };
        let (mut after, _) = self.check_through_view(w)?;
        // As qemu-img counts: the entries zeroed, the refcount corruptions and leaks fixed in
        // step 1 (the checks before and after it, COPIED flags apart), the COPIED flags.
        let refcount_corruptions =
            |r: &CheckReport| r.corruptions - copied_count(r).min(r.corruptions);
        after.corruptions_fixed = steps.zeroed
            + refcount_corruptions(&steps.before).saturating_sub(refcount_corruptions(&steps.mid))
            + steps.copied;
        after.leaks_fixed = steps.before.leaks.saturating_sub(steps.mid.leaks);
        after.repair_log = log;
        if after.corruptions == 0 && after.check_errors == 0 && after.overlap_count == 0 {
            let bits = IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
            if w.header.incompatible_features.intersects(bits) {
                w.header.incompatible_features -= bits;
                self.write_header(w)?;
                self.storage.flush()?;
            }
            w.dirty_bit_on_disk = false;
        }
        Ok(after)
    }

    /// Steps 0 to 2 (see the module documentation); returns the checks that the fixed
    /// counters are computed from.
    fn repair_steps(
        &self,
        w: &mut Writer,
        mode: Repair,
        first: CheckReport,
        counts: Counts,
        log: &mut Vec<String>,
    ) -> Result<Steps, ImageError> {
        let cb = self.geometry.cluster_bits();
        let (mut before, mut counts) = (first, counts);
        let mut zeroed = 0;
        if mode == Repair::All {
            let shared = shared_clusters(&before, cb, false);
            zeroed = self.zero_unaligned(w, &before, &shared, log)?;
            if zeroed > 0 {
                (before, counts) = self.check_through_view(w)?;
            }
        }
        let rebuild = needs_rebuild(&before);
        let shared = shared_clusters(&before, cb, rebuild);
        for o in &before.overlaps {
            if shared.contains(&(o.cluster_offset >> cb)) {
                log.push(format!(
                    "Not repairing the cluster at {:#x}: two structures use it ({o})",
                    o.cluster_offset
                ));
            }
        }
        if rebuild {
            log.push("Rebuilding refcount structure".into());
            self.rebuild_refcounts(w, &before, &counts, &shared)?;
        } else {
            self.fix_refcounts(w, mode, &before, &shared, log)?;
        }
        let (mid, _) = self.check_through_view(w)?;
        let trusted =
            mid.check_errors == 0 && mid.leaks == 0 && mid.corruptions == copied_count(&mid);
        let copied = if mode == Repair::All || trusted {
            self.fix_copied(w, &mid, &shared, log)?
        } else {
            0
        };
        self.flush_locked(w)?;
        Ok(Steps {
            before,
            mid,
            zeroed,
            copied,
        })
    }

    /// Step 0 ([`Repair::All`]): an active L2 entry for a preallocated zero cluster whose
    /// offset is not cluster-aligned cannot be trusted to point anywhere; as qemu-img does, it
    /// becomes a plain zero cluster (the guest reads zeros either way). Returns the entries
    /// fixed.
    fn zero_unaligned(
        &self,
        w: &mut Writer,
        before: &CheckReport,
        shared: &HashSet<u64>,
        log: &mut Vec<String>,
    ) -> Result<u64, ImageError> {
        let mut fixed = 0;
        let ext = self.geometry.is_extended_l2();
        for f in &before.findings {
            let FindingKind::PreallocatedUnaligned {
                entry,
                offset,
                at: Some(at),
                ..
            } = f.kind
            else {
                continue;
            };
            let Some(i) = self.pin_entry(at, shared)? else {
                continue;
            };
            let table = HostOffset(at.table);
            let old = self.l2_slot(table, i)?;
            if old.entry != entry {
                continue;
            }
            let zero = if ext {
                // Allocated subclusters (there are none: it holds no data) become zero.
                let bits = old.bitmap | old.bitmap << 32;
                Slot {
                    entry: L2Entry::UNALLOCATED,
                    bitmap: bits & !0xffff_ffff,
                }
            } else {
                Slot::plain(L2Entry::ZERO)
            };
            self.l2_rewrite_broken(table, i, zero)?;
            fixed += 1;
            log.push(format!(
                "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 \
                 entry corrupted."
            ));
        }
        if fixed > 0 {
            self.flush_locked(w)?;
        }
        Ok(fixed)
    }

    /// Pins the active L2 table of the entry at `at` for an edit of the entry, and returns the
    /// entry's index; `None` when the entry may not be
    /// changed: the table is a shared cluster, is no longer referenced there, or its
    /// write-back would cover other metadata (an L2 table a snapshot also uses).
    fn pin_entry(
        &self,
        at: L2Position,
        shared: &HashSet<u64>,
    ) -> Result<Option<usize>, ImageError> {
        let L2Position {
            l1_index,
            table,
            index,
        } = at;
        let cs = self.geometry.cluster_size();
        if table == 0
            || shared.contains(&(table >> self.geometry.cluster_bits()))
            || !self
                .check_overlap(HostOffset(table), cs, MetadataType::ACTIVE_L2)?
                .is_empty()
        {
            return Ok(None);
        }
        if self.l1_entry(l1_index).l2_offset() != HostOffset(table) {
            return Ok(None);
        }
        let Ok(Some(t)) = self.l2_table(l1_index) else {
            return Ok(None);
        };
        self.l2_cache.pin(HostOffset(table), t);
        Ok(usize::try_from(index)
            .ok()
            .filter(|&i| (i as u64) < self.geometry.l2_entries()))
    }

    /// Clears a COPIED flag that an entry of an L2 table shared with a snapshot carries
    /// although its cluster is shared: the dangerous direction (a writer trusting it would
    /// overwrite the snapshot's data in place). The table is rewritten directly as a shared
    /// table (its own cluster is INACTIVE_L2, and ACTIVE_L2 too); only clearing is done here,
    /// never setting. Returns whether the flag was cleared.
    fn clear_copied_in_shared_table(
        &self,
        w: &mut Writer,
        at: L2Position,
        entry: L2Entry,
    ) -> Result<bool, ImageError> {
        let L2Position {
            l1_index,
            table,
            index,
        } = at;
        let g = self.geometry;
        let cs = g.cluster_size();
        let both = MetadataType::ACTIVE_L2 | MetadataType::INACTIVE_L2;
        if table == 0
            || self.l1_entry(l1_index).l2_offset() != HostOffset(table)
            || !g.is_aligned(HostOffset(table))
            || !self
                .check_overlap(HostOffset(table), cs, MetadataType::ACTIVE_L2)?
                .contains(MetadataType::INACTIVE_L2)
            || !self.check_overlap(HostOffset(table), cs, both)?.is_empty()
        {
            return Ok(false);
        }
        let mut bytes = vec![0u8; cs as usize];
        self.storage.read_padded(table, &mut bytes)?;
        let Some(at) = usize::try_from(index.saturating_mul(g.l2_entry_size()))
            .ok()
            .filter(|&at| at + 8 <= bytes.len())
        else {
            return Ok(false);
        };
        let word = L2Entry(u64::from_be_bytes(
            bytes[at..at + 8].try_into().unwrap_or([0; 8]),
        ));
        if word != entry || !word.copied() {
            return Ok(false);
        }
        bytes[at..at + 8].copy_from_slice(&word.with_copied(false).0.to_be_bytes());
        let storage = Arc::clone(&self.storage);
        self.guarded_write(w, WriteKind::SharedL2Table, storage.as_ref(), table, &bytes)?;
        self.l2_cache.forget(HostOffset(table));
        Ok(true)
    }

    /// Flushes, then checks what is on disk through a fresh read-only view.
    fn check_through_view(&self, w: &mut Writer) -> Result<(CheckReport, Counts), ImageError> {
        self.flush_locked(w)?;
        let view = Image::from_storage(Arc::clone(&self.storage), OpenOptions::default())?;
        view.check_counts(&mut |_, _| {})
    }

    /// Step 1 in place: each wrong refcount the mode may fix is set to the recomputed count
    /// (written back by the flush's refcount phase, through `guarded_write`).
    fn fix_refcounts(
        &self,
        w: &mut Writer,
        mode: Repair,
        before: &CheckReport,
        shared: &HashSet<u64>,
        log: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        let storage = Arc::clone(&self.storage);
        for f in &before.findings {
            let Some((cluster, refcount, reference)) = f.refcount_mismatch() else {
                continue;
            };
            // Leaks always; refcounts too low only in `all` mode, and not from 0 (a cluster
            // with refcount 0 in use means the structure is rebuilt instead).
            let allowed = refcount > reference || (mode == Repair::All && refcount > 0);
            if allowed && !shared.contains(&cluster) {
                w.refcounts.set(storage.as_ref(), cluster, reference)?;
                log.push(format!(
                    "Repairing cluster {cluster} refcount={refcount} reference={reference}"
                ));
            }
        }
        self.flush_locked(w)
    }

    /// Step 2: COPIED flags of active L1 and L2 entries follow the refcounts on disk (checked
    /// in `mid`, after step 1). Changed in the writer's L1 table and pinned L2 tables, written
    /// back by the flush through `guarded_write`. An entry is left alone when its table or its
    /// target is a shared cluster, or when the table's write-back would cover other metadata.
    /// Returns the flags fixed.
    fn fix_copied(
        &self,
        w: &mut Writer,
        mid: &CheckReport,
        shared: &HashSet<u64>,
        log: &mut Vec<String>,
    ) -> Result<u64, ImageError> {
        let cb = self.geometry.cluster_bits();
        let mut fixed = 0;
        for f in &mid.findings {
            let FindingKind::CopiedL1 {
                l1_index,
                entry,
                refcount,
            } = f.kind
            else {
                continue;
            };
            let Ok(i) = usize::try_from(l1_index) else {
                continue;
            };
            let at = w.header.l1_table_offset.saturating_add(8 * l1_index);
            if shared.contains(&(entry.l2_offset().0 >> cb))
                || !self
                    .check_overlap(HostOffset(at), 8, MetadataType::ACTIVE_L1)?
                    .is_empty()
            {
                continue;
            }
            let mut l1 = self.l1.write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = l1.get_mut(i).filter(|s| **s == entry.0) {
                *slot = entry.with_copied(refcount == 1).0;
                w.l1_dirty.insert(i);
                fixed += f.times;
                log.push(format!(
                    "Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} \
                     refcount={refcount}",
                    entry.0
                ));
            }
        }
        for f in &mid.findings {
            let FindingKind::CopiedL2 {
                at,
                entry,
                refcount,
            } = f.kind
            else {
                continue;
            };
            if shared.contains(&(entry.host_offset().0 >> cb)) {
                continue;
            }
            let fixed_here = match self.pin_entry(at, shared)? {
                Some(i) if self.l2_slot(HostOffset(at.table), i)?.entry == entry => {
                    self.l2_set_copied(HostOffset(at.table), i, refcount == 1)?;
                    true
                }
                Some(_) => false,
                None => refcount != 1 && self.clear_copied_in_shared_table(w, at, entry)?,
            };
            if fixed_here {
                fixed += f.times;
                log.push(format!(
                    "Repairing OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                    entry.0
                ));
            }
        }
        Ok(fixed)
    }
}

#[cfg(test)]
mod tests {
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
}
