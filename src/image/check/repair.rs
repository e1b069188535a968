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
//!
//! This file decides the steps and counts what they fixed; the edits of steps 0 to 2 are in
//! `fixes.rs`, the rebuild in `rebuild.rs`, the unit tests in `repair_tests.rs`.

use std::collections::HashSet;
use std::sync::Arc;

use super::Counts;
use super::{CheckReport, FindingKind, Owner};
use crate::format::header::IncompatibleFeatures;
use crate::image::write::Writer;
use crate::image::{ErrorKind, Image, ImageError, OpenOptions};

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

    /// Flushes, then checks what is on disk through a fresh read-only view.
    fn check_through_view(&self, w: &mut Writer) -> Result<(CheckReport, Counts), ImageError> {
        self.flush_locked(w)?;
        let view = Image::from_storage(Arc::clone(&self.storage), OpenOptions::default())?;
        view.check_counts(&mut |_, _| {})
    }
}

#[cfg(test)]
#[path = "repair_tests.rs"]
mod tests;
