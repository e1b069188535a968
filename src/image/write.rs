//! Guest writes: data, zeros, discard, resize.
//!
//! Every change is made in memory first (L2 tables pinned in the cache, refcounts in
//! `alloc.rs`, the L1 table) and written back in order by `flush.rs`; guest data is written at
//! once, to clusters that no table on disk references yet or that this image alone owns
//! (COPIED). So at any moment the disk holds a consistent image plus, at worst, clusters that
//! nothing references (leaks).
//!
//! Before an L2 table points to a new cluster, the cluster's refcount has been raised and its
//! data written (the flush writes refcounts, then L2 tables). A cluster shared with a snapshot
//! (COPIED clear) is never written in place: it is copied, and the old one's refcount is
//! dropped only after the table that pointed to it is on disk.

use std::sync::Arc;

use super::alloc::{NewTable, Refcounts};
use super::guard::WriteKind;
use super::{Image, ImageError};
use crate::format::entry::{L1_L2_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::format::header::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::{CompressedDescriptor, Geometry, GuestOffset, Header, HostOffset};
use crate::overlap::MetadataType;
use crate::scan::ScannedImage;

/// How much a [`Note`] matters; the bindings log it at this level on the `qcow2ovl` logger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteLevel {
    /// Routine detail.
    Debug,
    /// Something the engine did on its own that changed the file.
    Info,
    /// The image needed attention (a repair at open).
    Warning,
}

/// Something the engine did on its own initiative (a repair at open, dropped autoclear bits)
/// that a caller may want in a log. Collected by the writer, taken by [`Image::take_notes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// How much it matters.
    pub level: NoteLevel,
    /// What happened, in a sentence.
    pub message: String,
}

/// The writer's state (behind the image's writer lock).
#[derive(Debug)]
pub(crate) struct Writer {
    /// The header as it will be after the next flush.
    pub header: Header,
    /// Refcounts and allocation.
    pub refcounts: Refcounts,
    /// L1 indexes changed since the last flush.
    pub l1_dirty: std::collections::BTreeSet<usize>,
    /// The L1 table moved (resize): the new table must be written whole, then the header, and
    /// the old one freed.
    pub l1_moved: Option<NewTable>,
    /// Header fields changed since the last flush.
    pub header_dirty: bool,
    /// Whether the dirty bit is set on disk (lazy refcounts) and must be cleared by a flush.
    pub dirty_bit_on_disk: bool,
    /// Whether guest data goes to an external data file (identity-mapped, not refcounted).
    pub external_data: bool,
    /// Whether that data file must stay a valid raw image by itself (`data_file_raw`): zeroed
    /// and discarded ranges get zeros written there too.
    pub raw_data: bool,
    /// Set once a write was refused for corruption: the message.
    pub poisoned: Option<String>,
    /// Whether the first change was prepared (autoclear bits cleared).
    pub prepared: bool,
    /// Where the next compressed cluster may go: `(next byte, end of its host cluster)` in the
    /// host cluster that holds the last one (reset at every flush, when clusters may be freed).
    pub compressed_cursor: Option<(u64, u64)>,
    /// Notes not yet taken by [`Image::take_notes`].
    pub notes: Vec<Note>,
}

impl Writer {
    /// The writer for a freshly scanned image.
    pub fn new(scanned: &ScannedImage, geometry: Geometry) -> Result<Self, ImageError> {
        let h = &scanned.header;
        if h.crypt_method != 0 {
            return Err(ImageError::Unsupported(
                "Writing to encrypted images is not supported".into(),
            ));
        }
        Ok(Writer {
            header: h.clone(),
            refcounts: Refcounts::new(
                geometry.cluster_bits(),
                h.refcount_order,
                h.refcount_table_offset,
                scanned.refcount_table.clone(),
            ),
            l1_dirty: Default::default(),
            l1_moved: None,
            header_dirty: false,
            dirty_bit_on_disk: false,
            external_data: h.has_external_data_file(),
            raw_data: h.has_external_data_file()
                && h.autoclear_features
                    .contains(AutoclearFeatures::RAW_EXTERNAL_DATA),
            poisoned: None,
            prepared: false,
            compressed_cursor: None,
            notes: Vec::new(),
        })
    }

    /// Refuses any write once the image was marked corrupt through this handle.
    pub fn refuse_if_poisoned(&self) -> Result<(), ImageError> {
        match &self.poisoned {
            Some(m) => Err(ImageError::Corruption(format!(
                "Image is corrupt ({m}); further writes are refused"
            ))),
            None => Ok(()),
        }
    }
}

/// The host offset of the cluster an L2 entry points to when this image alone owns it: not
/// compressed, COPIED set (refcount 1), and an offset (0 counts only in an external data file,
/// where it is a valid offset). Such a cluster may be written in place.
fn owned_host(entry: u64, external_data: bool) -> Option<u64> {
    let host = entry & L1_L2_OFFSET_MASK;
    let owned =
        entry & OFLAG_COMPRESSED == 0 && entry & OFLAG_COPIED != 0 && (host != 0 || external_data);
    owned.then_some(host)
}

/// Guest bytes of one cluster to write, at an offset inside it.
pub(crate) struct Piece<'a> {
    /// Guest offset of the cluster.
    pub cluster: u64,
    /// Offset of the bytes inside the cluster.
    pub at: usize,
    /// The bytes (all zeros for zero-filling writes).
    pub bytes: &'a [u8],
}

impl Image {
    /// The writer lock, or, for a read-only image, an error naming the operation `what`.
    pub(crate) fn writer(
        &self,
        what: &'static str,
    ) -> Result<std::sync::MutexGuard<'_, Writer>, ImageError> {
        let w = self.writer.as_ref().ok_or(ImageError::ReadOnly(what))?;
        Ok(w.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// What the engine did on its own since the last call (a repair at open, autoclear bits
    /// cleared before the first write), oldest first; empty for read-only images.
    pub fn take_notes(&self) -> Vec<Note> {
        match &self.writer {
            Some(w) => std::mem::take(&mut w.lock().unwrap_or_else(|e| e.into_inner()).notes),
            None => Vec::new(),
        }
    }

    /// Before the first change: autoclear bits of extensions this library does not keep
    /// current are cleared (bitmaps would go stale), as the spec requires. Done at the first
    /// change, not at open, so that a writable open that writes nothing changes nothing.
    fn prepare_for_writing(&self, w: &mut Writer) -> Result<(), ImageError> {
        w.prepared = true;
        let keep = if w.external_data {
            AutoclearFeatures::RAW_EXTERNAL_DATA
        } else {
            AutoclearFeatures::empty()
        };
        let autoclear = w.header.autoclear_features;
        // Bit arithmetic on the raw words: `!keep` on the flags type would keep only the known
        // bits, and unknown autoclear bits must be cleared too.
        let dropped = AutoclearFeatures::from_bits_retain(autoclear.bits() & !keep.bits());
        if w.header.version >= 3 && !dropped.is_empty() {
            w.header.autoclear_features = autoclear & keep;
            self.write_header(w)?;
            self.storage.flush()?;
            let what = if dropped.contains(AutoclearFeatures::BITMAPS) {
                "the persistent bitmaps are no longer valid"
            } else {
                "unknown autoclear features are no longer valid"
            };
            w.notes.push(Note {
                level: NoteLevel::Info,
                message: format!(
                    "cleared autoclear feature bits {:#x} before the first write ({what}: \
                     this library does not keep them up to date)",
                    dropped.bits()
                ),
            });
            // The bitmap directory is no longer metadata the map must protect.
            if !autoclear.contains(AutoclearFeatures::BITMAPS) {
                return Ok(());
            }
            if let Some(ext) = w.header.bitmaps_ext() {
                let cs = self.geometry.cluster_size();
                self.map_remove(
                    ext.dir_offset,
                    ext.dir_size.div_ceil(cs),
                    MetadataType::BITMAP_DIRECTORY,
                )?;
            }
        }
        Ok(())
    }

    /// Sets the dirty bit on disk before the first change when the image uses lazy refcounts.
    pub(crate) fn before_change(&self, w: &mut Writer) -> Result<(), ImageError> {
        w.refuse_if_poisoned()?;
        if !w.prepared {
            self.prepare_for_writing(w)?;
        }
        if Self::lazy_refcounts(w) && !w.dirty_bit_on_disk {
            w.header.incompatible_features |= IncompatibleFeatures::DIRTY;
            self.write_header(w)?;
            self.storage.flush()?;
            w.dirty_bit_on_disk = true;
        }
        Ok(())
    }

    /// Writes `data` at guest offset `guest`.
    pub fn write_at(&self, guest: GuestOffset, data: &[u8]) -> Result<(), ImageError> {
        self.check_range("write", guest.0, data.len() as u64)?;
        let mut w = self.writer("write")?;
        self.before_change(&mut w)?;
        let r = self
            .write_runs(&mut w, guest.0, data)
            .and_then(|()| self.after_change(&mut w));
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Writes `data` at `offset`: runs of whole clusters that map the same way in one host
    /// write each ([`Image::write_run`]), everything else cluster by cluster.
    fn write_runs(&self, w: &mut Writer, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let g = offset + done as u64;
            let at = self.geometry.in_cluster_offset(g);
            let rest = (data.len() - done) as u64;
            if at == 0 && rest >= 2 * cs {
                let n = self.write_run(w, g, &data[done..])?;
                if n > 0 {
                    done += n;
                    continue;
                }
            }
            let len = (cs - at).min(rest) as usize;
            let piece = Piece {
                cluster: g - at,
                at: at as usize,
                bytes: &data[done..done + len],
            };
            self.write_piece(w, &piece)?;
            done += len;
        }
        Ok(())
    }

    /// Writes the longest run of whole clusters from `guest` (cluster-aligned) that one host
    /// write can take: clusters this image owns at contiguous host offsets (overwritten in
    /// place), or clusters with no data of their own (unallocated or plain zero: whole clusters
    /// are written, so nothing needs copying) that get a contiguous run of new clusters.
    /// Standard L2 entries and data in the image file only. Returns the bytes written; 0 when
    /// fewer than two clusters qualify.
    fn write_run(&self, w: &mut Writer, guest: u64, data: &[u8]) -> Result<usize, ImageError> {
        let g = self.geometry;
        let cs = g.cluster_size();
        if g.is_extended_l2() || w.external_data {
            return Ok(0);
        }
        let l1_index = g.l1_index(GuestOffset(guest));
        let first = g.l2_index(GuestOffset(guest)) as usize;
        // Runs of new clusters stay well inside one refcount block's range (see
        // `Refcounts::allocate_run`).
        let max = ((data.len() as u64 / cs) as usize)
            .min(g.l2_entries() as usize - first)
            .min((w.refcounts.per_block() / 4) as usize);
        if max < 2 {
            return Ok(0);
        }
        let l2 = self.l2_for_write(w, l1_index)?;
        let entries: Vec<u64> = self
            .l2_cache
            .edit(HostOffset(l2), |t| t[first..first + max].to_vec())
            .ok_or_else(|| ImageError::Corruption(format!("L2 table at {l2:#x} is not pinned")))?;
        let owned = |e: u64| {
            e & OFLAG_ZERO == 0
                && owned_host(e, false).is_some_and(|h| h != 0 && g.is_aligned(HostOffset(h)))
        };
        // Whole clusters are written, so nothing of the old view (backing file, zeros) is
        // needed: unallocated and plain zero clusters just get new ones.
        let fresh = |e: u64| e == 0 || e == OFLAG_ZERO;
        let base = entries[0] & L1_L2_OFFSET_MASK;
        let k = if owned(entries[0]) {
            entries
                .iter()
                .enumerate()
                .take_while(|&(j, &e)| owned(e) && e & L1_L2_OFFSET_MASK == base + j as u64 * cs)
                .count()
        } else if fresh(entries[0]) {
            entries.iter().take_while(|&&e| fresh(e)).count()
        } else {
            0
        };
        if k < 2 {
            return Ok(0);
        }
        let bytes = &data[..k * cs as usize];
        if owned(entries[0]) {
            let storage = self.storage.clone();
            self.guarded_write(w, WriteKind::GuestData, storage.as_ref(), base, bytes)?;
            return Ok(bytes.len());
        }
        let run = self.allocate_run(w, k as u64)? << g.cluster_bits();
        let storage = self.storage.clone();
        self.guarded_write(w, WriteKind::GuestData, storage.as_ref(), run, bytes)?;
        for j in 0..k {
            self.l2_set(l2, first + j, (run + j as u64 * cs) | OFLAG_COPIED)?;
        }
        Ok(bytes.len())
    }

    /// Calls `f` for every cluster-sized piece of `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Image, &mut Writer, u64, usize, usize, usize) -> Result<(), ImageError>,
        w: &mut Writer,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        let mut done = 0u64;
        while done < len {
            let g = offset + done;
            let at = self.geometry.in_cluster_offset(g);
            let n = (cs - at).min(len - done);
            f(self, w, g - at, at as usize, n as usize, done as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Keeps memory bounded: too many tables waiting for write-back start a flush.
    pub(crate) fn after_change(&self, w: &mut Writer) -> Result<(), ImageError> {
        if self.l2_cache.dirty_len() > self.l2_cache.capacity().max(16) {
            self.flush_locked(w)?;
        }
        w.refcounts.trim(4096);
        Ok(())
    }

    /// The L2 table for L1 index `l1_index`, ready to change: allocated if missing, copied if
    /// shared with a snapshot. Returns its offset; the table is pinned in the cache, where it is
    /// changed in place ([`Image::l2_get`], [`Image::l2_set`]).
    pub(crate) fn l2_for_write(&self, w: &mut Writer, l1_index: u64) -> Result<u64, ImageError> {
        let idx = usize::try_from(l1_index)
            .map_err(|_| ImageError::Corruption("L1 index out of range".into()))?;
        let entry = {
            let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
            *l1.get(idx).ok_or_else(|| {
                ImageError::Corruption(format!("L1 index {idx} past the L1 table"))
            })?
        };
        let words = (self.geometry.cluster_size() / 8) as usize;
        let offset = entry & L1_L2_OFFSET_MASK;
        if offset != 0 && entry & OFLAG_COPIED != 0 {
            let table = self
                .l2_table(l1_index)?
                .ok_or_else(|| ImageError::Corruption("L2 table vanished".into()))?;
            self.l2_cache.pin(HostOffset(offset), table);
            return Ok(offset);
        }
        // A new table, or a copy of one shared with a snapshot.
        let table = if offset == 0 {
            vec![0u64; words]
        } else {
            let old = self
                .l2_table(l1_index)?
                .ok_or_else(|| ImageError::Corruption("L2 table vanished".into()))?;
            w.refcounts
                .free_later(offset >> self.geometry.cluster_bits());
            self.map_remove(offset, 1, MetadataType::ACTIVE_L2)?;
            // Every cluster the copy references is shared with the old table now: no entry
            // of the copy may claim sole ownership (COPIED), whatever the old one said.
            let step = if self.geometry.is_extended_l2() { 2 } else { 1 };
            let mut copy = old.as_ref().clone();
            for e in copy.iter_mut().step_by(step) {
                *e &= !OFLAG_COPIED;
            }
            copy
        };
        let new = self.allocate_metadata(w, MetadataType::ACTIVE_L2)?;
        self.l1.write().unwrap_or_else(|e| e.into_inner())[idx] = new | OFLAG_COPIED;
        w.l1_dirty.insert(idx);
        self.refresh_fallback_now(w)?;
        self.l2_cache.pin(HostOffset(new), Arc::new(table));
        Ok(new)
    }

    /// The common case, without touching any table: the cluster is plain data this image owns
    /// (COPIED) in an L2 table it owns, so the data is overwritten in place. Returns whether
    /// that was the case.
    fn overwrite_in_place(&self, w: &mut Writer, p: &Piece<'_>) -> Result<bool, ImageError> {
        let g = self.geometry;
        let guest = GuestOffset(p.cluster);
        let l1_index = g.l1_index(guest);
        let l1_entry = {
            let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
            usize::try_from(l1_index)
                .ok()
                .and_then(|i| l1.get(i).copied())
                .unwrap_or(0)
        };
        if l1_entry & OFLAG_COPIED == 0 || l1_entry & L1_L2_OFFSET_MASK == 0 {
            return Ok(false);
        }
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok(false);
        };
        let entry = table.get(g.l2_index(guest) as usize).copied().unwrap_or(0);
        drop(table);
        let host = match owned_host(entry, w.external_data) {
            Some(host) if entry & OFLAG_ZERO == 0 && g.is_aligned(HostOffset(host)) => host,
            _ => return Ok(false),
        };
        let data = self.chain()?.data.clone();
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data.as_ref(),
            host + p.at as u64,
            p.bytes,
        )?;
        Ok(true)
    }

    /// Word `i` of the pinned L2 table at `l2`.
    pub(crate) fn l2_get(&self, l2: u64, i: usize) -> Result<u64, ImageError> {
        self.l2_cache
            .edit(HostOffset(l2), |t| t.get(i).copied())
            .flatten()
            .ok_or_else(|| ImageError::Corruption(format!("L2 table at {l2:#x} is not pinned")))
    }

    /// Sets word `i` of the pinned L2 table at `l2`.
    pub(crate) fn l2_set(&self, l2: u64, i: usize, value: u64) -> Result<(), ImageError> {
        self.l2_cache
            .edit(HostOffset(l2), |t| t.get_mut(i).map(|slot| *slot = value))
            .flatten()
            .ok_or_else(|| ImageError::Corruption(format!("L2 table at {l2:#x} is not pinned")))
    }

    /// Allocates a cluster for metadata of `types`, entering it (and any refcount structures
    /// created on the way) into the map.
    fn allocate_metadata(&self, w: &mut Writer, types: MetadataType) -> Result<u64, ImageError> {
        let cluster = self.allocate_cluster(w)?;
        let offset = cluster << self.geometry.cluster_bits();
        self.map_enter(w, offset, 1, types)?;
        Ok(offset)
    }

    /// Allocates one cluster (refcount 1), entering new refcount structures into the map.
    pub(crate) fn allocate_cluster(&self, w: &mut Writer) -> Result<u64, ImageError> {
        let (cluster, created) = w.refcounts.allocate(self.storage.as_ref())?;
        if cluster == 0 {
            return Err(self.refuse_overlap(
                w,
                "Preventing allocation of cluster 0 (the header)".into(),
                0,
                self.geometry.cluster_size(),
                MetadataType::MAIN_HEADER,
            ));
        }
        self.enter_created(w, &created)?;
        Ok(cluster)
    }

    /// Enters refcount blocks and tables created by the allocator into the map.
    fn enter_created(&self, w: &mut Writer, created: &[NewTable]) -> Result<(), ImageError> {
        if created.is_empty() {
            return Ok(());
        }
        for t in created {
            let types = if t.offset == w.refcounts.table_offset {
                MetadataType::REFCOUNT_TABLE
            } else {
                MetadataType::REFCOUNT_BLOCK
            };
            self.map_enter(w, t.offset, t.clusters, types)?;
        }
        if created.iter().any(|t| t.offset == w.refcounts.table_offset) {
            w.header.refcount_table_offset = w.refcounts.table_offset;
            w.header.refcount_table_clusters =
                u32::try_from(w.refcounts.table_clusters()).unwrap_or(u32::MAX);
            w.header_dirty = true;
        }
        self.refresh_fallback_now(w)
    }

    /// Writes one piece of guest data (inside one cluster).
    pub(crate) fn write_piece(&self, w: &mut Writer, p: &Piece<'_>) -> Result<(), ImageError> {
        let g = self.geometry;
        let guest = GuestOffset(p.cluster);
        if !g.is_extended_l2() && self.overwrite_in_place(w, p)? {
            return Ok(());
        }
        let l2_offset = self.l2_for_write(w, g.l1_index(guest))?;
        let i = g.l2_index(guest) as usize;
        if g.is_extended_l2() {
            self.write_piece_extended(w, p, l2_offset, i)?;
        } else {
            self.write_piece_standard(w, p, l2_offset, i)?;
        }
        Ok(())
    }

    fn write_piece_standard(
        &self,
        w: &mut Writer,
        p: &Piece<'_>,
        l2_offset: u64,
        i: usize,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size() as usize;
        let entry = self.l2_get(l2_offset, i)?;
        let host = entry & L1_L2_OFFSET_MASK;
        let owned = owned_host(entry, w.external_data).is_some();
        let zero = entry & OFLAG_COMPRESSED == 0 && entry & OFLAG_ZERO != 0;
        let data_storage = self.chain()?.data.clone();
        if owned && !zero {
            if !self.geometry.is_aligned(HostOffset(host)) {
                return Err(self.poison_if_inconsistent(
                    w,
                    // QEMU's words, naming the guest offset of the write.
                    ImageError::Corruption(format!(
                        "Data cluster offset {} unaligned (guest offset: {})",
                        crate::format::c_hex(host),
                        crate::format::c_hex(p.cluster + p.at as u64)
                    )),
                ));
            }
            // Owned data cluster: overwrite in place.
            return self.guarded_write(
                w,
                WriteKind::GuestData,
                data_storage.as_ref(),
                host + p.at as u64,
                p.bytes,
            );
        }
        // The whole cluster gets new contents: the old view (backing file, zeros, compressed
        // or shared data) with the piece on top.
        let mut buf = vec![0u8; cs];
        if p.bytes.len() < cs && !zero {
            self.read_old(p.cluster, &mut buf)?;
        }
        buf[p.at..p.at + p.bytes.len()].copy_from_slice(p.bytes);
        let target = if owned {
            host // a preallocated zero cluster this image owns
        } else if w.external_data {
            p.cluster // the data file is mapped one to one
        } else {
            self.allocate_cluster(w)? << self.geometry.cluster_bits()
        };
        self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), target, &buf)?;
        self.release_old(w, entry, owned)?;
        self.l2_set(l2_offset, i, target | OFLAG_COPIED)
    }

    /// Reads the guest view at `guest` into `buf`, as far as the virtual disk goes; the part
    /// of a last, partial cluster past the end reads as zeros.
    fn read_old(&self, guest: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let inside = self
            .virtual_size()
            .saturating_sub(guest)
            .min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        self.read_at(GuestOffset(guest), &mut buf[..inside])
    }

    /// Queues the release of what `entry` referenced, unless the cluster stays in use.
    pub(crate) fn release_old(
        &self,
        w: &mut Writer,
        entry: u64,
        kept: bool,
    ) -> Result<(), ImageError> {
        if kept || w.external_data {
            return Ok(());
        }
        let bits = self.geometry.cluster_bits();
        if entry & OFLAG_COMPRESSED != 0 {
            if let Some(d) = CompressedDescriptor::from_entry(entry, bits) {
                if let Some((start, end)) = d.sector_range() {
                    for c in (start >> bits)..=((end - 1) >> bits) {
                        self.refuse_freeing_metadata(w, Some(entry), &[c])?;
                        w.refcounts.free_later(c);
                    }
                }
            }
            return Ok(());
        }
        let host = entry & L1_L2_OFFSET_MASK;
        if host != 0 {
            self.refuse_freeing_metadata(w, Some(entry), &[host >> bits])?;
            w.refcounts.free_later(host >> bits);
        }
        Ok(())
    }

    fn write_piece_extended(
        &self,
        w: &mut Writer,
        p: &Piece<'_>,
        l2_offset: u64,
        i: usize,
    ) -> Result<(), ImageError> {
        let g = self.geometry;
        let scs = g.subcluster_size() as usize;
        let (entry, mut bitmap) = (
            self.l2_get(l2_offset, 2 * i)?,
            self.l2_get(l2_offset, 2 * i + 1)?,
        );
        let data_storage = self.chain()?.data.clone();
        let compressed = entry & OFLAG_COMPRESSED != 0;
        let mut host = entry & L1_L2_OFFSET_MASK;
        let owned = owned_host(entry, w.external_data).is_some();
        if !owned {
            // A new cluster: for a shared one, the allocated subclusters' data is copied over.
            let old_host = host;
            host = if w.external_data {
                p.cluster
            } else {
                self.allocate_cluster(w)? << g.cluster_bits()
            };
            if compressed {
                // Every subcluster of a compressed cluster is data: copy it all.
                let mut buf = vec![0u8; g.cluster_size() as usize];
                self.read_old(p.cluster, &mut buf)?;
                self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), host, &buf)?;
                bitmap = 0xffff_ffff;
            } else if old_host != 0 && bitmap & 0xffff_ffff != 0 {
                let mut buf = vec![0u8; g.cluster_size() as usize];
                data_storage.read_padded(old_host, &mut buf)?;
                self.guarded_write(w, WriteKind::GuestData, data_storage.as_ref(), host, &buf)?;
            }
            self.release_old(w, entry, false)?;
        }
        let first = p.at / scs;
        let last = (p.at + p.bytes.len() - 1) / scs;
        let span_start = first * scs;
        let span_end = (last + 1) * scs;
        let mut buf = vec![0u8; span_end - span_start];
        for s in [first, last] {
            let (lo, hi) = (s * scs, (s + 1) * scs);
            let covered = p.at <= lo && p.at + p.bytes.len() >= hi;
            if covered || bitmap & (1 << (32 + s)) != 0 {
                continue;
            }
            let part = &mut buf[lo - span_start..hi - span_start];
            if bitmap & (1 << s) != 0 {
                data_storage.read_padded(host + lo as u64, part)?;
            } else {
                self.read_old(p.cluster + lo as u64, part)?;
            }
        }
        buf[p.at - span_start..p.at - span_start + p.bytes.len()].copy_from_slice(p.bytes);
        self.guarded_write(
            w,
            WriteKind::GuestData,
            data_storage.as_ref(),
            host + span_start as u64,
            &buf,
        )?;
        for s in first..=last {
            bitmap |= 1 << s;
            bitmap &= !(1u64 << (32 + s));
        }
        self.l2_set(l2_offset, 2 * i, host | OFLAG_COPIED)?;
        self.l2_set(l2_offset, 2 * i + 1, bitmap)
    }

    /// Makes `[offset, offset + len)` read as zeros: whole clusters by the zero flag (version 3;
    /// with `unmap`, their clusters are freed), partial ones by writing zeros. Version 2 images
    /// have no zero flag and get zeros written.
    pub fn write_zeroes(
        &self,
        guest: GuestOffset,
        len: u64,
        unmap: bool,
    ) -> Result<(), ImageError> {
        self.check_range("write_zeroes", guest.0, len)?;
        let mut w = self.writer("write_zeroes")?;
        self.before_change(&mut w)?;
        let cs = self.geometry.cluster_size() as usize;
        let zeros = vec![0u8; cs];
        let v3 = w.header.version >= 3;
        let r = self
            .for_each_piece(
                guest.0,
                len,
                |img, w, cluster, at, n, _| {
                    if v3 && n == cs {
                        img.zero_cluster(w, cluster, unmap, false)
                    } else if v3 && img.geometry.is_extended_l2() {
                        img.zero_subclusters(w, cluster, at, n)
                    } else {
                        let piece = Piece {
                            cluster,
                            at,
                            bytes: &zeros[..n],
                        };
                        img.write_piece(w, &piece)
                    }
                },
                &mut w,
            )
            .and_then(|()| self.after_change(&mut w));
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Discards whole clusters in `[offset, offset + len)` (partial clusters are left alone, as
    /// QEMU does): version 3 clusters then read as zeros, version 2 clusters fall back to the
    /// backing file (or zeros). Their host clusters are freed.
    pub fn discard(&self, guest: GuestOffset, len: u64) -> Result<(), ImageError> {
        self.check_range("discard", guest.0, len)?;
        let mut w = self.writer("discard")?;
        self.before_change(&mut w)?;
        let cs = self.geometry.cluster_size() as usize;
        let v3 = w.header.version >= 3;
        let at_end = guest.0 + len == self.virtual_size();
        let r = self
            .for_each_piece(
                guest.0,
                len,
                |img, w, cluster, _at, n, _| {
                    if n == cs || (at_end && cluster + n as u64 == img.virtual_size()) {
                        img.zero_cluster(w, cluster, true, !v3)
                    } else {
                        Ok(())
                    }
                },
                &mut w,
            )
            .and_then(|()| self.after_change(&mut w));
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Sets one whole cluster to read as zeros (or, with `unallocate`, to unallocated).
    fn zero_cluster(
        &self,
        w: &mut Writer,
        cluster: u64,
        unmap: bool,
        unallocate: bool,
    ) -> Result<(), ImageError> {
        let g = self.geometry;
        let guest = GuestOffset(cluster);
        // Nothing to do for an unallocated cluster that already reads zeros.
        let l1_index = g.l1_index(guest);
        let has_backing = self.scanned.header.backing_file.is_some();
        if self.l2_table(l1_index)?.is_none() && (!has_backing || unallocate) {
            return Ok(());
        }
        let l2_offset = self.l2_for_write(w, l1_index)?;
        let i = g.l2_index(guest) as usize;
        let ext = g.is_extended_l2();
        let entry = self.l2_get(l2_offset, if ext { 2 * i } else { i })?;
        let host = entry & L1_L2_OFFSET_MASK;
        let keep = !unmap && !unallocate && !w.external_data && owned_host(entry, false).is_some();
        self.release_old(w, entry, keep)?;
        if w.raw_data {
            // The raw data file must read as the disk does.
            let zeros = vec![0u8; g.cluster_size() as usize];
            let data = self.chain()?.data.clone();
            self.guarded_write(w, WriteKind::GuestData, data.as_ref(), cluster, &zeros)?;
        }
        if ext {
            self.l2_set(l2_offset, 2 * i, if keep { host | OFLAG_COPIED } else { 0 })?;
            let bitmap = if unallocate { 0 } else { 0xffff_ffffu64 << 32 };
            self.l2_set(l2_offset, 2 * i + 1, bitmap)
        } else {
            let value = match (unallocate, keep) {
                (true, _) => 0,
                (false, true) => host | OFLAG_COPIED | OFLAG_ZERO,
                (false, false) => OFLAG_ZERO,
            };
            self.l2_set(l2_offset, i, value)
        }
    }

    /// Zeroes whole subclusters of one cluster by their zero bits; partial subclusters get
    /// zeros written.
    fn zero_subclusters(
        &self,
        w: &mut Writer,
        cluster: u64,
        at: usize,
        n: usize,
    ) -> Result<(), ImageError> {
        let scs = self.geometry.subcluster_size() as usize;
        let first_full = at.div_ceil(scs);
        let end_full = (at + n) / scs;
        let zeros = vec![0u8; scs];
        // Partial subclusters at either end.
        let head_end = (first_full * scs).min(at + n);
        if at < head_end {
            let piece = Piece {
                cluster,
                at,
                bytes: &zeros[..head_end - at],
            };
            self.write_piece(w, &piece)?;
        }
        if end_full > first_full {
            let guest = GuestOffset(cluster);
            let l2_offset = self.l2_for_write(w, self.geometry.l1_index(guest))?;
            let i = self.geometry.l2_index(guest) as usize;
            let entry = self.l2_get(l2_offset, 2 * i)?;
            let shared = entry & L1_L2_OFFSET_MASK != 0 && owned_host(entry, false).is_none();
            if w.raw_data || entry & OFLAG_COMPRESSED != 0 || shared {
                // Shared or compressed: write zeros (which copies the cluster first).
                let piece = Piece {
                    cluster,
                    at: first_full * scs,
                    bytes: &vec![0u8; (end_full - first_full) * scs],
                };
                self.write_piece(w, &piece)?;
            } else {
                let mut bitmap = self.l2_get(l2_offset, 2 * i + 1)?;
                for s in first_full..end_full {
                    bitmap &= !(1u64 << s);
                    bitmap |= 1u64 << (32 + s);
                }
                self.l2_set(l2_offset, 2 * i + 1, bitmap)?;
            }
        }
        let tail_start = (end_full * scs).max(head_end);
        if tail_start < at + n && end_full >= first_full {
            let piece = Piece {
                cluster,
                at: tail_start,
                bytes: &zeros[..at + n - tail_start],
            };
            self.write_piece(w, &piece)?;
        }
        Ok(())
    }

    /// Changes the virtual size. Growing may move the L1 table to a larger one; shrinking is
    /// refused while anything is allocated past the new end.
    pub fn resize(&self, new_size: u64) -> Result<(), ImageError> {
        let mut w = self.writer("resize")?;
        self.before_change(&mut w)?;
        let g = self.geometry;
        let old_size = self.virtual_size();
        if new_size % 512 != 0 {
            return Err(ImageError::OutOfRange {
                what: "resize (the size must be a multiple of 512)",
                offset: new_size,
                length: 0,
                size: old_size,
            });
        }
        if new_size < old_size {
            // Like `qemu-img resize --shrink`: the cluster the new end falls in may stay
            // allocated; nothing may be allocated from the next cluster boundary on.
            let mut at = new_size.div_ceil(g.cluster_size()) * g.cluster_size();
            while at < old_size {
                let e = self.mapping(GuestOffset(at), old_size - at)?;
                let allocated = match e.mapping {
                    crate::format::L2Mapping::Unallocated { host } => host.is_some(),
                    crate::format::L2Mapping::Zero { host } => host.is_some(),
                    _ => true,
                };
                if allocated {
                    return Err(ImageError::Unsupported(format!(
                        "Cannot shrink the image to {new_size} bytes: guest offset {at:#x} is \
                         allocated (discard it first)"
                    )));
                }
                at += e.len;
            }
        }
        self.grow_l1(&mut w, g.l1_entries_for(new_size))?;
        w.header.size = new_size;
        w.header_dirty = true;
        // Grow and shrink both take effect on disk with the next flush; reads see the new size.
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        drop(w);
        self.flush()
    }

    /// Makes the active L1 table at least `needed` entries long: a larger table in a new run of
    /// clusters, which the next flush writes whole before switching the header to it (the old
    /// one is freed after that).
    pub(crate) fn grow_l1(&self, w: &mut Writer, needed: u64) -> Result<(), ImageError> {
        let g = self.geometry;
        let current = self.l1.read().unwrap_or_else(|e| e.into_inner()).len() as u64;
        if needed <= current {
            return Ok(());
        }
        if needed * 8 > crate::format::limits::MAX_L1_BYTES {
            return Err(ImageError::Unsupported(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)"
                    .into(),
            ));
        }
        let clusters = (needed * 8).div_ceil(g.cluster_size());
        let first = self.allocate_run(w, clusters)?;
        let offset = first << g.cluster_bits();
        self.map_enter(w, offset, clusters, MetadataType::ACTIVE_L1)?;
        let old = NewTable {
            offset: w.header.l1_table_offset,
            clusters: (current * 8).div_ceil(g.cluster_size()),
        };
        if w.l1_moved.is_none() && old.clusters > 0 {
            let first_old = old.offset >> g.cluster_bits();
            for c in first_old..first_old + old.clusters {
                w.refcounts.free_later(c);
            }
            w.l1_moved = Some(old);
        }
        self.l1
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(needed as usize, 0);
        w.header.l1_table_offset = offset;
        w.header.l1_size = needed as u32;
        w.header_dirty = true;
        Ok(())
    }

    /// Allocates `n` contiguous clusters; returns the first.
    pub(crate) fn allocate_run(&self, w: &mut Writer, n: u64) -> Result<u64, ImageError> {
        let (first, created) = w.refcounts.allocate_run(self.storage.as_ref(), n)?;
        self.enter_created(w, &created)?;
        Ok(first)
    }
}
