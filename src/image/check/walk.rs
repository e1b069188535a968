//! The walk of `check`: recompute every cluster's refcount from the metadata and compare it with the
//! refcount structures on disk, as `qemu-img check` does, and name every metadata overlap.
//!
//! The walk, in order:
//!
//! 1. The on-disk refcounts of every cluster of the file are decoded once, refcount block by
//!    refcount block, into a compact array (a byte a cluster; larger values in a side table).
//! 2. The header cluster, the active L1 table and every snapshot's L1 table are counted; the L1
//!    entries are gathered and sorted by L2 table offset, so that an L2 table referenced by the
//!    active L1 table and by several snapshots is read **once** and its entries counted with
//!    the number of references as a multiplier (the per-reference findings are multiplied in
//!    the same way, so the counters equal qemu-img's, which reads the table once per reference).
//! 3. The snapshot table, refcount table, encryption header and bitmaps are counted, then the
//!    refcount blocks (each must end with refcount 1).
//! 4. The computed refcounts are compared with the on-disk ones: too low is a corruption, too
//!    high (including "referenced by nothing") is a leak.
//! 5. COPIED flags of active L1 and L2 entries were checked during step 2 against the on-disk
//!    refcounts of step 1, so active L2 tables are not read a second time.
//! 6. Every metadata cluster was recorded with its owner; clusters with two owners that may not
//!    share them, and data clusters landing on metadata, become named [`Overlap`]s.
//!
//! Memory is bounded by the file: two byte arrays and one bit per file cluster, the list of
//! metadata clusters, and one L2 table at a time. References past the end of the file are kept
//! in a sparse table of at most `MAX_PAST_END` clusters (`counts.rs`).

use super::counts::{decode_block, oom, Counts};
use super::finding::{Finding, FindingKind};
use super::report::{CheckReport, Overlap, Owner, MAX_OWNERS};
use super::tables::L1Tables;
use crate::format::limits::MAX_IMAGE_LENGTH;
use crate::format::ReftableEntry;
use crate::format::{max_refcount, refcount_get, Geometry};
use crate::image::{Image, ImageError};
use crate::storage::Storage;

/// Largest snapshot L1 table QEMU accepts, in entries (32 MiB of entries).
const MAX_SNAPSHOT_L1_ENTRIES: u64 = (32 << 20) / 8;

/// A reference from an L1 table to an L2 table.
#[derive(Debug, Clone, Copy)]
pub(super) struct L1Ref {
    pub(super) l2_offset: u64,
    /// `None`: active; `Some(n)`: snapshot n (the first of the L1 tables at one place).
    pub(super) source: Option<u32>,
    pub(super) l1_index: u64,
    /// The L1 tables at this entry's place that hold it: 1 in a valid image, more where
    /// snapshots name one table (each is a reference to the L2 table).
    pub(super) times: u64,
}

/// The state of one check.
pub(super) struct Checker<'a> {
    pub(super) img: &'a Image,
    pub(super) storage: &'a dyn Storage,
    pub(super) g: Geometry,
    pub(super) cs: u64,
    pub(super) cb: u32,
    pub(super) order: u32,
    pub(super) refcount_max: u64,
    pub(super) data_file: bool,
    pub(super) file_clusters: u64,
    /// On-disk refcounts of the file's clusters.
    pub(super) disk: Counts,
    /// Refcount table indices whose block is unaligned: their refcounts cannot be read.
    pub(super) unreadable_blocks: Vec<u64>,
    /// Recomputed references.
    pub(super) refs: Counts,
    /// Metadata clusters and their owners (`(cluster, owner, owner start offset)`).
    pub(super) owners: Vec<(u64, Owner, u64)>,
    /// One bit per file cluster: some metadata owns it (set before data clusters are walked).
    pub(super) meta_bits: Vec<u64>,
    /// Whether metadata lies past the end of the file.
    pub(super) meta_past_end: bool,
    pub(super) report: CheckReport,
    pub(super) progress: &'a mut dyn FnMut(u64, u64),
    /// The clusters counted for the refcount table and the refcount blocks (once each time
    /// they were counted), so that a rebuild can subtract them.
    pub(super) refcount_structures: Vec<u64>,
}

impl Image {
    /// Checks the image as `qemu-img check` does and names every metadata overlap; see the
    /// module documentation for the walk. Reads every table once; does not write.
    pub fn check(&self) -> Result<CheckReport, ImageError> {
        self.check_with_progress(&mut |_, _| {})
    }

    /// [`Image::check`], calling `progress(done, total)` as L2 tables are walked.
    pub fn check_with_progress(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport, ImageError> {
        self.check_counts(progress).map(|(report, _)| report)
    }

    /// The check, also returning the recomputed reference counts without the references of the
    /// refcount table and refcount blocks themselves: what a rebuilt refcount structure must
    /// hold (before counting its own clusters). Read-only handles only (a writable one checks
    /// through a fresh view).
    pub(in crate::image) fn check_counts(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(CheckReport, Counts), ImageError> {
        // A writable handle's tables have moved on since its scan: check what its flush put on
        // disk, through a fresh read-only view of the same storage.
        if self.writer.is_some() {
            self.flush()?;
            let view = Image::from_storage(
                std::sync::Arc::clone(&self.storage),
                crate::image::OpenOptions::default(),
            )?;
            return view.check_counts(progress);
        }
        let h = self.header();
        let g = self.geometry;
        let cs = g.cluster_size();
        let file_clusters = self.file_len().div_ceil(cs);
        // The counts are arrays over every cluster of the file, as QEMU's are; QEMU refuses a
        // file of more than INT_MAX clusters (a sparse file can claim any length), and so do we.
        if file_clusters > i32::MAX as u64 {
            return Err(ImageError::Io(std::io::Error::from_raw_os_error(
                libc::EFBIG,
            )));
        }
        let order = h.refcount_order;
        let refcount_max = max_refcount(order)
            .ok_or_else(|| ImageError::Unsupported(format!("refcount order {order}")))?;
        let meta_words = usize::try_from(file_clusters.div_ceil(64)).map_err(|_| oom())?;
        let mut meta_bits = Vec::new();
        meta_bits.try_reserve_exact(meta_words).map_err(|_| oom())?;
        meta_bits.resize(meta_words, 0);
        let mut c = Checker {
            img: self,
            storage: self.storage.as_ref(),
            g,
            cs,
            cb: g.cluster_bits(),
            order,
            refcount_max,
            data_file: h.has_external_data_file(),
            file_clusters,
            disk: Counts::new(file_clusters)?,
            unreadable_blocks: Vec::new(),
            refs: Counts::new(file_clusters)?,
            owners: Vec::new(),
            meta_bits,
            meta_past_end: false,
            report: CheckReport::default(),
            progress,
            refcount_structures: Vec::new(),
        };
        // The virtual size in whole 512-byte sectors, in clusters (as qemu-img counts it).
        c.report.total_clusters = (h.size / 512 * 512).div_ceil(cs);
        c.load_disk_refcounts()?;
        c.run()?;
        let mut counts = c.refs;
        for k in c.refcount_structures {
            counts.decrement(k);
        }
        Ok((c.report, counts))
    }
}

impl Checker<'_> {
    pub(super) fn read(&mut self, offset: u64, len: u64, what: &str) -> Option<Vec<u8>> {
        let n = usize::try_from(len).ok()?;
        let mut buf = Vec::new();
        if buf.try_reserve_exact(n).is_err() {
            self.report.add(Finding::once(FindingKind::ReadError {
                what: format!("{what} (out of memory)"),
                offset,
            }));
            return None;
        }
        buf.resize(n, 0);
        match self.storage.read_padded(offset, &mut buf) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.report.add(Finding::once(FindingKind::ReadError {
                    what: format!("{what} ({e})"),
                    offset,
                }));
                None
            }
        }
    }

    /// Step 1: decode every refcount block covering the file.
    pub(super) fn load_disk_refcounts(&mut self) -> Result<(), ImageError> {
        let per_block = (self.cs * 8) >> self.order;
        let blocks = self.file_clusters.div_ceil(per_block);
        let img = self.img;
        let reftable = &img.scanned.refcount_table;
        let n = (blocks as usize).min(reftable.len());
        let mut buf = vec![0u8; self.cs as usize];
        for (i, &e) in reftable.iter().enumerate().take(n) {
            let off = ReftableEntry(e).block_offset().0;
            if off == 0 {
                continue;
            }
            if off % self.cs != 0 || off.saturating_add(self.cs) > MAX_IMAGE_LENGTH {
                self.unreadable_blocks.push(i as u64);
                continue;
            }
            if let Err(err) = self.storage.read_padded(off, &mut buf) {
                self.report.add(Finding::once(FindingKind::ReadError {
                    what: format!("refcount block {i} ({err})"),
                    offset: off,
                }));
                continue;
            }
            let first = i as u64 * per_block;
            let last = (first + per_block).min(self.file_clusters);
            decode_block(&buf, self.order, first, last, &mut self.disk);
        }
        Ok(())
    }

    /// The on-disk refcount of any cluster; `None` when its refcount block is unaligned.
    pub(super) fn disk_refcount(&mut self, cluster: u64) -> Option<u64> {
        if cluster < self.file_clusters {
            let per_block = (self.cs * 8) >> self.order;
            if !self.unreadable_blocks.is_empty()
                && self
                    .unreadable_blocks
                    .binary_search(&(cluster / per_block))
                    .is_ok()
            {
                return None;
            }
            return Some(self.disk.get(cluster));
        }
        self.disk_refcount_past_end(cluster)
    }

    pub(super) fn disk_refcount_past_end(&mut self, cluster: u64) -> Option<u64> {
        let per_block = (self.cs * 8) >> self.order;
        let idx = cluster / per_block;
        let e = match self.img.scanned.refcount_table.get(idx as usize) {
            Some(&e) => e,
            None => return Some(0),
        };
        let off = ReftableEntry(e).block_offset().0;
        if off == 0 {
            return Some(0);
        }
        if off % self.cs != 0 || off.saturating_add(self.cs) > MAX_IMAGE_LENGTH {
            return None;
        }
        let mut buf = vec![0u8; self.cs as usize];
        if self.storage.read_padded(off, &mut buf).is_err() {
            return None;
        }
        refcount_get(&buf, (cluster % per_block) as usize, self.order).ok()
    }

    /// Adds `times` references to every cluster of `[offset, offset + len)`.
    pub(super) fn inc(&mut self, offset: u64, len: u64, times: u64) {
        if len == 0 || times == 0 {
            return;
        }
        // A region ending a cluster or more past the end of the file is not counted: it is a
        // corruption of its own (as in qemu-img, which would otherwise grow its array without
        // bound).
        let file_len = self.img.file_len();
        if offset.saturating_add(len) >= file_len.saturating_add(self.cs) {
            let problem = FindingKind::PastEnd { offset, len };
            self.report.add(Finding::counted(problem, times));
            return;
        }
        let first = offset >> self.cb;
        let last = match offset.checked_add(len - 1) {
            Some(l) => l >> self.cb,
            None => u64::MAX >> self.cb,
        };
        for k in first..=last {
            self.inc_cluster(k, times);
        }
    }

    pub(super) fn inc_cluster(&mut self, k: u64, times: u64) {
        // Fast path: a small count with room to grow.
        let limit = self.refcount_max.min(u64::from(u8::MAX) - 1);
        if let Some(slot) = self.refs.small.get_mut(k as usize) {
            if let Some(v) = u64::from(*slot).checked_add(times) {
                if v <= limit {
                    *slot = v as u8;
                    return;
                }
            }
        }
        let cur = self.refs.get(k);
        let room = self.refcount_max - cur.min(self.refcount_max);
        let added = times.min(room);
        if added > 0 && !self.refs.set(k, cur + added) {
            // Too many distinct clusters past the end: count the reference as the error that
            // qemu-img would report for it (refcount 0, reference 1).
            self.report.add(Finding::once(FindingKind::RefcountTooLow {
                cluster: k,
                offset: k << self.cb,
                refcount: 0,
                reference: added,
            }));
        }
        if added < times {
            let problem = FindingKind::RefcountOverflow {
                cluster: k,
                offset: k << self.cb,
            };
            self.report.add(Finding::counted(problem, times - added));
        }
    }

    /// Records `owner` on the clusters of `[offset, offset + len)` (at most the file's clusters
    /// plus one past it, so that absurd lengths stay cheap).
    pub(super) fn own(&mut self, owner: Owner, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cb;
        let last = offset.saturating_add(len - 1) >> self.cb;
        if last >= self.file_clusters {
            // Past the end of the file a structure is a corruption of its own (`inc` counts
            // it); it is not named in overlaps, so that a table naming millions of tables there
            // costs no owner each.
            self.meta_past_end = true;
        }
        for k in first..last.saturating_add(1).min(self.file_clusters) {
            self.meta_bits[(k / 64) as usize] |= 1 << (k % 64);
            if self.owners.len() < MAX_OWNERS && self.owners.try_reserve(1).is_ok() {
                self.owners.push((k, owner, offset));
            } else {
                self.report.unnamed_metadata += 1;
            }
        }
    }

    pub(super) fn is_meta(&self, k: u64) -> bool {
        if k < self.file_clusters {
            self.meta_bits[(k / 64) as usize] & (1 << (k % 64)) != 0
        } else {
            self.meta_past_end
        }
    }

    /// A data cluster (or compressed range) of `owner` lands on metadata: name the pair.
    pub(super) fn data_on_meta(&mut self, owner: Owner, offset: u64, k: u64) {
        let start = self.owners.partition_point(|o| o.0 < k);
        let hits: Vec<(Owner, u64)> = self.owners[start..]
            .iter()
            .take_while(|o| o.0 == k)
            .take(4)
            .map(|o| (o.1, o.2))
            .collect();
        for (first, first_offset) in hits {
            self.report.overlap(Overlap {
                first,
                first_offset,
                second: owner,
                second_offset: offset,
                cluster_offset: k << self.cb,
            });
        }
    }

    pub(super) fn run(&mut self) -> Result<(), ImageError> {
        let img = self.img;
        let h = img.header();
        let cs = self.cs;

        // The snapshot table entries themselves (qemu-img checks them first).
        if h.version >= 3 {
            for (n, sn) in img.snapshots().iter().enumerate() {
                if sn.extra_data_size() < 16 {
                    self.report
                        .add(Finding::once(FindingKind::SnapshotIncomplete {
                            snapshot: n as u64,
                            extra_data: u64::from(sn.extra_data_size()),
                        }));
                }
            }
        }

        // The header cluster, the active L1 table, the snapshot L1 tables.
        self.inc(0, cs, 1);
        self.own(Owner::Header, 0, cs);
        let mut l1_tables = L1Tables::default();
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > 0 {
            self.inc(h.l1_table_offset, l1_bytes, 1);
            self.own(Owner::ActiveL1, h.l1_table_offset, l1_bytes);
            l1_tables.add(h.l1_table_offset, l1_bytes, None);
        }
        let snapshots = img.snapshots();
        if self.data_file && !snapshots.is_empty() {
            self.report
                .add(Finding::once(FindingKind::SnapshotsDataFile {
                    snapshots: snapshots.len() as u64,
                }));
        }
        for (n, sn) in snapshots.iter().enumerate() {
            let name = format!("{} ({})", sn.id, sn.name);
            if sn.l1_table_offset % cs != 0 {
                self.report
                    .add(Finding::once(FindingKind::SnapshotL1Unaligned {
                        name,
                        offset: sn.l1_table_offset,
                    }));
                continue;
            }
            if u64::from(sn.l1_size) > MAX_SNAPSHOT_L1_ENTRIES {
                self.report
                    .add(Finding::once(FindingKind::SnapshotL1TooLarge {
                        name,
                        l1_size: u64::from(sn.l1_size),
                    }));
                continue;
            }
            let bytes = u64::from(sn.l1_size) * 8;
            if bytes == 0 {
                continue;
            }
            self.inc(sn.l1_table_offset, bytes, 1);
            self.own(Owner::SnapshotL1(n as u32), sn.l1_table_offset, bytes);
            l1_tables.add(sn.l1_table_offset, bytes, Some(n as u32));
        }
        let mut refs = self.gather_l1_tables(&l1_tables);

        // The other metadata, recorded before the data clusters are walked.
        let snap_bytes = if h.nb_snapshots > 0 {
            img.scanned.snapshot_table_bytes
        } else {
            0
        };
        self.inc(h.snapshots_offset, snap_bytes, 1);
        self.own(Owner::SnapshotTable, h.snapshots_offset, snap_bytes);
        let rt_bytes = img.scanned.refcount_table.len() as u64 * 8;
        self.inc(h.refcount_table_offset, rt_bytes, 1);
        self.own(Owner::RefcountTable, h.refcount_table_offset, rt_bytes);
        if rt_bytes > 0
            && h.refcount_table_offset.saturating_add(rt_bytes) < img.file_len().saturating_add(cs)
        {
            let first = h.refcount_table_offset >> self.cb;
            let last = (h.refcount_table_offset + rt_bytes - 1) >> self.cb;
            self.refcount_structures.extend(first..=last);
        }
        if let Some((offset, length)) = h.crypto_header() {
            self.inc(offset, length, 1);
            self.own(Owner::CryptoHeader, offset, length);
        }
        self.bitmaps();
        let reftable = img.scanned.refcount_table.clone();
        for (i, &e) in reftable.iter().enumerate() {
            let off = ReftableEntry(e).block_offset().0;
            if off != 0 && ReftableEntry(e).reserved_bits() == 0 {
                self.own(Owner::RefcountBlock(i as u64), off, cs);
            }
        }
        for r in &refs {
            let owner = match r.source {
                None => Owner::ActiveL2(r.l1_index),
                Some(s) => Owner::SnapshotL2(s, r.l1_index),
            };
            self.own(owner, r.l2_offset, cs);
        }
        self.owners.sort_by_key(|o| o.0);

        // The L2 tables, each read once.
        self.walk_l2_tables(&mut refs);

        // The refcount blocks, last: each must now have exactly one reference.
        self.refblocks(&reftable);

        self.compare();
        self.overlaps();
        // qemu-img reports COPIED flags last (it checks them in a second pass).
        self.report.findings.sort_by_key(|f| {
            matches!(
                f.kind,
                FindingKind::CopiedL1 { .. } | FindingKind::CopiedL2 { .. }
            )
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::entry::{OFLAG_COMPRESSED, OFLAG_COPIED};
    use crate::image::testutil::*;
    use crate::image::OpenOptions;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn check(bytes: Vec<u8>) -> CheckReport {
        let img =
            Image::from_storage(Arc::new(MemStorage::new(bytes)), OpenOptions::default()).unwrap();
        img.check().unwrap()
    }

    #[test]
    fn clean_image_checks_clean() {
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let r = check(image(1 << 30, &l2, &[(0, 7)]));
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{:?}",
            r.findings
        );
        assert_eq!(r.allocated_clusters, 1);
        assert_eq!(r.image_end_offset, 6 * CS);
        assert_eq!(r.total_clusters, (1 << 30) / CS);
        assert!(r.overlaps.is_empty());
    }

    #[test]
    fn leak_and_missing_refcount() {
        // Cluster 5 referenced; zero its refcount; raise cluster 6's (a leak).
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7), (0, 8)]);
        b[(2 * CS + 11) as usize] = 0;
        let r = check(b);
        // cluster 5: refcount 0, reference 1; its COPIED flag disagrees too.
        assert_eq!(r.corruptions, 2, "{:?}", r.findings);
        assert_eq!(r.leaks, 1, "{:?}", r.findings);
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn l2_entry_on_refcount_block_is_named() {
        let l2 = [OFLAG_COPIED | (2 * CS)];
        let r = check(image(1 << 30, &l2, &[]));
        let o = &r.overlaps[0];
        assert_eq!(o.first, Owner::RefcountBlock(0));
        assert_eq!(o.second, Owner::Data(None, 0));
        assert_eq!(
            o.to_string(),
            "data cluster of guest offset 0x0 at 0x20000 overlaps refcount block 0 at 0x20000"
        );
    }

    #[test]
    fn unaligned_refcount_block_makes_refcounts_unreadable() {
        let l2 = [OFLAG_COPIED | (5 * CS)];
        let mut b = image(1 << 30, &l2, &[(0, 7)]);
        // Refcount table entry 0: the block moved 512 bytes off its cluster boundary.
        b[(CS + 6) as usize] = 0x02;
        let r = check(b);
        assert_eq!(r.exit_code(), 1);
        // Every cluster of the file (6) is unreadable; the entry itself is a corruption.
        assert_eq!(r.check_errors, 6, "{:?}", r.findings);
        assert!(r
            .findings
            .iter()
            .any(|f| matches!(f.kind, FindingKind::RefblockUnaligned { .. })));
    }

    #[test]
    fn truncated_and_garbage_inputs_do_not_panic() {
        let l2 = [
            OFLAG_COMPRESSED | 0x3fff_ffff_ffff_ffff,
            0x00ff_ffff_ffff_fe00,
            OFLAG_COPIED | 0x1234,
        ];
        let r = check(image(1 << 30, &l2, &[]));
        assert!(r.corruptions > 0);
    }
}
