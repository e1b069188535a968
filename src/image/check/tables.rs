//! The table part of the check's walk: L1 tables gathered, every L2 table read once and its
//! entries counted (with the number of references as a multiplier), and the bitmaps.

use std::collections::HashMap;

use super::finding::{Finding, FindingKind, L2EntryAt, L2Position};
use super::report::Owner;
use super::walk::{Checker, L1Ref};
use crate::format::{L1Entry, L2Entry};
use crate::storage::table_data_chunks;

/// The L1 tables to gather (the active one, then the snapshots'), grouped by place: tables at
/// one `(offset, size)` are read and gathered once, with their number as a multiplier. A valid
/// image has no two (QEMU copies the L1 table for each snapshot); a file can make 65,536
/// snapshots name one table, which would otherwise be read and walked 65,536 times.
#[derive(Default)]
pub(super) struct L1Tables {
    /// `(offset, bytes, first source, tables, includes the active one)`, by first appearance.
    groups: Vec<(u64, u64, Option<u32>, u64, bool)>,
    index: HashMap<(u64, u64), usize>,
}

impl L1Tables {
    /// Adds the L1 table of `source` (`None`: the active one) at `[offset, offset + bytes)`.
    pub(super) fn add(&mut self, offset: u64, bytes: u64, source: Option<u32>) {
        match self.index.get(&(offset, bytes)) {
            Some(&i) => {
                let group = &mut self.groups[i];
                group.3 += 1;
                group.4 |= source.is_none();
            }
            None => {
                self.index.insert((offset, bytes), self.groups.len());
                self.groups
                    .push((offset, bytes, source, 1, source.is_none()));
            }
        }
    }
}

/// Bytes of a table read at a time.
const TABLE_CHUNK: u64 = 1 << 20;

impl Checker<'_> {
    /// Calls `f(self, index of the chunk's first entry, chunk)` for the parts of the table of
    /// 8-byte entries at `[offset, offset + bytes)` where the file holds data, at most
    /// [`TABLE_CHUNK`] bytes at a time. Entries in holes and past the end are zeros and are
    /// skipped: a table a file claims in a hole costs no read (QEMU reads it whole).
    fn for_each_table_chunk(
        &mut self,
        offset: u64,
        bytes: u64,
        what: &str,
        mut f: impl FnMut(&mut Self, u64, &[u8]),
    ) {
        let storage = self.storage;
        for chunk in table_data_chunks(storage, offset, bytes, TABLE_CHUNK) {
            let (pos, n) = match chunk {
                Ok(c) => c,
                Err(e) => {
                    self.report.add(Finding::once(FindingKind::ReadError {
                        what: format!("{what} ({e})"),
                        offset,
                    }));
                    return;
                }
            };
            let Some(chunk) = self.read(pos, n, what) else {
                return;
            };
            f(self, (pos - offset) / 8, &chunk);
        }
    }

    /// Reads each L1 table once and gathers its entries (see [`L1Tables`]).
    pub(super) fn gather_l1_tables(&mut self, tables: &L1Tables) -> Vec<L1Ref> {
        let mut refs = Vec::new();
        for &(offset, bytes, source, times, active) in &tables.groups {
            let what = if active {
                "the active L1 table"
            } else {
                "a snapshot L1 table"
            };
            let source = if active { None } else { source };
            self.for_each_table_chunk(offset, bytes, what, |c, first, chunk| {
                c.gather_l1(chunk, first, source, times, &mut refs);
            });
        }
        refs
    }

    /// Gathers the entries of part of an L1 table (its first entry is `first`) held by
    /// `times` L1 tables at its place.
    fn gather_l1(
        &mut self,
        bytes: &[u8],
        first: u64,
        source: Option<u32>,
        times: u64,
        refs: &mut Vec<L1Ref>,
    ) {
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            let i = first as usize + i;
            let e = L1Entry(u64::from_be_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
            if e.0 == 0 {
                continue;
            }
            if e.reserved_bits() != 0 {
                let kind = FindingKind::L1Reserved {
                    l1_index: i as u64,
                    entry: e,
                };
                self.report.add(Finding::counted(kind, times));
            }
            let l2 = e.l2_offset().0;
            // Counted even when 0 (QEMU counts cluster 0 for an entry with only flag bits).
            self.inc(l2, self.cs, times);
            if l2 % self.cs != 0 {
                let kind = FindingKind::L2TableUnaligned {
                    l1_index: i as u64,
                    offset: l2,
                };
                self.report.add(Finding::counted(kind, times));
            }
            if source.is_none() {
                // COPIED flag of the L1 entry against the L2 table's on-disk refcount.
                if l2 != 0 {
                    if let Some(rc) = self.disk_refcount(l2 >> self.cb) {
                        if (rc == 1) != e.copied() {
                            self.report.add(Finding::once(FindingKind::CopiedL1 {
                                l1_index: i as u64,
                                entry: e,
                                refcount: rc,
                            }));
                        }
                    }
                }
            }
            refs.push(L1Ref {
                l2_offset: l2,
                source,
                l1_index: i as u64,
                times,
            });
        }
    }

    pub(super) fn bitmaps(&mut self) {
        let img = self.img;
        let Some(ext) = img.header().active_bitmaps_ext() else {
            return;
        };
        if ext.nb_bitmaps == 0 {
            return;
        }
        self.inc(ext.dir_offset, ext.dir_size, 1);
        self.own(Owner::BitmapDirectory, ext.dir_offset, ext.dir_size);
        let bitmaps = img.bitmaps();
        if bitmaps.len() as u64 != u64::from(ext.nb_bitmaps) {
            self.report.add(Finding::once(FindingKind::BitmapInvalid {
                name: "directory".into(),
            }));
            return;
        }
        for (n, bm) in bitmaps.iter().enumerate() {
            let tbytes = bm.table_bytes();
            self.inc(bm.table_offset, tbytes, 1);
            self.own(Owner::BitmapTable(n as u32), bm.table_offset, tbytes);
            self.for_each_table_chunk(bm.table_offset, tbytes, "a bitmap table", |c, first, t| {
                c.bitmap_entries(n, first, t);
            });
        }
    }

    /// Counts the entries of part of bitmap `n`'s table (its first entry is `first`).
    fn bitmap_entries(&mut self, n: usize, first: u64, t: &[u8]) {
        let img = self.img;
        let bm = &img.bitmaps()[n];
        for (i, c) in t.chunks_exact(8).enumerate() {
            let i = first + i as u64;
            let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            let entry = crate::format::BitmapTableEntry(e);
            if entry.check(self.cs).is_err() {
                self.report.add(Finding::once(FindingKind::BitmapEntry {
                    name: bm.name.clone(),
                    index: i,
                    entry: e,
                }));
                continue;
            }
            let off = entry.offset().0;
            if off != 0 {
                self.inc(off, self.cs, 1);
                self.own(Owner::BitmapData(n as u32, i), off, self.cs);
            }
        }
    }

    pub(super) fn walk_l2_tables(&mut self, refs: &mut [L1Ref]) {
        refs.sort_by_key(|r| (r.l2_offset, r.source.map_or(0, |s| u64::from(s) + 1)));
        let total = refs.len() as u64;
        let table_bytes = self.g.l2_entries() * self.g.l2_entry_size();
        let mut buf = vec![0u8; table_bytes as usize];
        let mut start = 0;
        let mut done = 0u64;
        while start < refs.len() {
            let off = refs[start].l2_offset;
            let end = start + refs[start..].partition_point(|r| r.l2_offset == off);
            let group = &refs[start..end];
            let times = group.iter().map(|r| r.times).sum::<u64>();
            let active = group.iter().filter(|r| r.source.is_none()).count() as u64;
            let first = group[0];
            start = end;
            done += group.len() as u64;
            if done % 256 < group.len() as u64 {
                (self.progress)(done, total);
            }
            if off >= self.img.file_len() {
                // All zeros, as every byte past the end reads: no entry to count, and no read
                // (an L1 table can name millions of such tables).
                continue;
            }
            if let Err(e) = self.storage.read_padded(off, &mut buf) {
                self.report.add(Finding::once(FindingKind::ReadError {
                    what: format!("an L2 table ({e})"),
                    offset: off,
                }));
                continue;
            }
            let l2 = std::mem::take(&mut buf);
            self.l2_table(&l2, first, times, active);
            buf = l2;
        }
        (self.progress)(total, total);
    }

    /// Counts the entries of one L2 table referenced `times` times, `active` of them from the
    /// active L1 table; `first` names it in overlaps.
    pub(super) fn l2_table(&mut self, table: &[u8], first: L1Ref, times: u64, active: u64) {
        let ext = self.g.is_extended_l2();
        let esz = self.g.l2_entry_size() as usize;
        let cs = self.cs;
        let guest_base = first.l1_index.saturating_mul(self.g.bytes_per_l1_entry());
        let mut next_contiguous = 0u64;
        let (mut allocated, mut fragmented) = (0u64, 0u64);
        // The fast path below handles clusters that lie in the file, in an image without an
        // external data file, whose refcounts are all readable.
        let fast_end = if self.data_file || !self.unreadable_blocks.is_empty() {
            0
        } else {
            self.img.file_len().min(self.file_clusters << self.cb)
        };
        let copied_pass = active > 0 && first.l2_offset != 0;
        for (i, c) in table.chunks_exact(esz).enumerate() {
            let e = L2Entry(u64::from_be_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
            let bitmap = if ext {
                u64::from_be_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]])
            } else {
                0
            };
            if e.0 == 0 && bitmap == 0 {
                continue;
            }
            // Fast path: a standard, aligned data cluster inside the file, nothing odd about it.
            let offset = e.host_offset().0;
            if !ext && e.is_plain() && offset != 0 && offset & (cs - 1) == 0 && offset < fast_end {
                let k = offset >> self.cb;
                if active > 0 {
                    allocated += active;
                    if next_contiguous != 0 && offset != next_contiguous {
                        fragmented += active;
                    }
                    next_contiguous = offset + cs;
                }
                self.inc_cluster(k, times);
                if self.meta_bits[(k / 64) as usize] & (1 << (k % 64)) != 0 {
                    let guest = guest_base.saturating_add((i as u64) << self.cb);
                    self.data_on_meta(Owner::Data(first.source, guest), offset, k);
                }
                if copied_pass {
                    let rc = match self.disk.small[k as usize] {
                        u8::MAX => self.disk.get(k),
                        v => u64::from(v),
                    };
                    if (rc == 1) != e.copied() {
                        self.copied_l2_finding(first, i, e, rc, active);
                    }
                }
                continue;
            }
            let compressed = e.is_compressed();
            let guest = guest_base.saturating_add((i as u64) << self.cb);
            let data_owner = Owner::Data(first.source, guest);
            if e.reserved_bits() != 0 {
                self.l2_finding(FindingKind::L2Reserved, e, 0, i, times);
            }
            if compressed {
                if e.copied() {
                    let d = e.compressed(self.cb);
                    let kind = FindingKind::CopiedCompressed {
                        entry: e,
                        offset: d.map_or(0, |d| d.host_offset.0),
                    };
                    self.report.add(Finding::counted(kind, times));
                }
                if self.data_file {
                    self.l2_finding(FindingKind::CompressedDataFile, e, 0, i, times);
                    continue;
                }
                if bitmap != 0 {
                    self.l2_finding(FindingKind::CompressedBitmap, e, bitmap, i, times);
                    continue;
                }
                let Some((start, end)) = e.compressed(self.cb).and_then(|d| d.data_range()) else {
                    continue;
                };
                self.inc(start, end - start, times);
                for k in (start >> self.cb)..=((end - 1) >> self.cb) {
                    if self.is_meta(k) {
                        self.data_on_meta(data_owner, start, k);
                    }
                }
                if active > 0 {
                    self.report.allocated_clusters += active;
                    self.report.compressed_clusters += active;
                    self.report.fragmented_clusters += active;
                }
                continue;
            }
            let zero = !ext && e.is_zero();
            let unallocated = offset == 0 && (zero || !(self.data_file && e.copied()));
            if unallocated {
                if ext && bitmap & 0xffff_ffff != 0 {
                    self.l2_finding(FindingKind::UnallocatedSubclusters, e, bitmap, i, times);
                }
                continue;
            }
            // A normal or preallocated-zero cluster.
            if ext && (bitmap >> 32) & bitmap != 0 {
                self.l2_finding(FindingKind::SubclusterBitmap, e, bitmap, i, times);
            }
            if offset % cs != 0 {
                let has_data = if ext {
                    bitmap & 0xffff_ffff != 0
                } else {
                    !e.is_zero()
                };
                let kind = if has_data {
                    FindingKind::DataUnaligned { entry: e, offset }
                } else {
                    FindingKind::PreallocatedUnaligned {
                        entry: e,
                        offset,
                        bitmap,
                        at: (active > 0).then_some(L2Position {
                            l1_index: first.l1_index,
                            table: first.l2_offset,
                            index: i as u64,
                        }),
                    }
                };
                self.report.add(Finding::counted(kind, times));
            }
            if active > 0 {
                self.report.allocated_clusters += active;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.report.fragmented_clusters += active;
                }
                next_contiguous = offset.wrapping_add(cs);
            }
            if self.data_file {
                continue;
            }
            self.inc(offset, cs, times);
            let k = offset >> self.cb;
            if self.is_meta(k) {
                self.data_on_meta(data_owner, offset, k);
            }
            // qemu-img's COPIED pass skips an L1 entry whose L2 offset is 0 altogether.
            if active > 0 && first.l2_offset != 0 {
                if let Some(rc) = self.disk_refcount(k) {
                    if (rc == 1) != e.copied() {
                        self.copied_l2_finding(first, i, e, rc, active);
                    }
                }
            }
        }
        self.report.allocated_clusters += allocated;
        self.report.fragmented_clusters += fragmented;
    }

    /// An active L2 entry whose COPIED flag disagrees with its cluster's on-disk refcount `rc`
    /// (counted `active` times: once per active reference to the table).
    fn copied_l2_finding(&mut self, first: L1Ref, i: usize, e: L2Entry, rc: u64, active: u64) {
        let kind = FindingKind::CopiedL2 {
            at: L2Position {
                l1_index: first.l1_index,
                table: first.l2_offset,
                index: i as u64,
            },
            entry: e,
            refcount: rc,
        };
        self.report.add(Finding::counted(kind, active));
    }

    /// A finding about entry `i` of an L2 table (with its subcluster `bitmap`), counted
    /// `times` times.
    pub(super) fn l2_finding(
        &mut self,
        kind: fn(L2EntryAt) -> FindingKind,
        e: L2Entry,
        bitmap: u64,
        i: usize,
        times: u64,
    ) {
        let at = L2EntryAt {
            index: i as u64,
            entry: e,
            bitmap,
        };
        self.report.add(Finding::counted(kind(at), times));
    }
}
