//! Guest writes: data, zeros, discard, resize.
//!
//! Every change is made in memory first (L2 tables pinned in the cache, refcounts in
//! `refcounts.rs`, the L1 table) and written back in order by `flush.rs`; guest data is written at
//! once, to clusters that no table on disk references yet or that this image alone owns
//! (COPIED). So at any moment the disk holds a consistent image plus, at worst, clusters that
//! nothing references (leaks).
//!
//! Before an L2 table points to a new cluster, the cluster's refcount has been raised and its
//! data written (the flush writes refcounts, then L2 tables). A cluster shared with a snapshot
//! (COPIED clear) is never written in place: it is copied, and the old one's refcount is
//! dropped only after the table that pointed to it is on disk.

mod alloc;
mod backing_file;
mod compress;
mod cow;
pub(in crate::image) mod flush;
pub(in crate::image) mod guard;
pub(in crate::image) mod l2;
pub(in crate::image) mod refcounts;
mod reserve;
mod resize;
mod zero;

pub use reserve::Reservation;

use super::bitmaps::Bitmaps;
use super::{Image, ImageError};
use crate::format::entry::L2Entry;
use crate::format::header::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::{Geometry, GuestOffset, Header, HostOffset};
use crate::overlap::MetadataType;
use crate::scan::ScannedImage;
use guard::WriteKind;
use refcounts::{NewTable, Refcounts};

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
    /// Whether the autoclear bits were cleared on disk (done before the first change).
    pub autoclear_cleared: bool,
    /// Where the next compressed cluster may go: `(next byte, end of its host cluster)` in the
    /// host cluster that holds the last one (reset at every flush, when clusters may be freed).
    pub compressed_cursor: Option<(u64, u64)>,
    /// Notes not yet taken by [`Image::take_notes`].
    pub notes: Vec<Note>,
    /// The persistent bitmaps this handle keeps true.
    pub bitmaps: Bitmaps,
    /// Clusters whose queued refcount drop a guest discard or zero write made: the host file
    /// gives their space back once they are free on disk (QEMU's `pass-discard-request`).
    pub discard_when_free: Vec<u64>,
}

impl Writer {
    /// The writer for a freshly scanned image.
    pub fn new(scanned: &ScannedImage, geometry: Geometry) -> Result<Self, ImageError> {
        let h = &scanned.header;
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
            autoclear_cleared: false,
            compressed_cursor: None,
            notes: Vec::new(),
            bitmaps: Bitmaps::new(&scanned.bitmaps, geometry.cluster_size(), h.size),
            discard_when_free: Vec::new(),
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
    pub(in crate::image) fn writer(
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
    /// current are cleared, as the spec requires (bit 0 stays while the bitmaps it vouches for
    /// are kept: the scan read their directory). Done at the first change, not at open, so that
    /// a writable open that writes nothing changes nothing.
    fn prepare_for_writing(&self, w: &mut Writer) -> Result<(), ImageError> {
        w.autoclear_cleared = true;
        let mut keep = if w.external_data {
            AutoclearFeatures::RAW_EXTERNAL_DATA
        } else {
            AutoclearFeatures::empty()
        };
        if !w.bitmaps.list.is_empty() {
            keep |= AutoclearFeatures::BITMAPS;
        }
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
            // A bitmap directory no longer vouched for is not metadata the map must protect.
            if dropped.contains(AutoclearFeatures::BITMAPS) {
                if let Some(ext) = w.header.bitmaps_ext() {
                    let cs = self.geometry.cluster_size();
                    self.map_remove(
                        ext.dir_offset,
                        ext.dir_size.div_ceil(cs),
                        MetadataType::BITMAP_DIRECTORY,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// [`Image::open_for_change`] for a change of guest bytes `[offset, offset + len)`: the
    /// bitmaps that track writes are marked first.
    pub(in crate::image) fn open_for_guest_change(
        &self,
        w: &mut Writer,
        offset: u64,
        len: u64,
    ) -> Result<(), ImageError> {
        // Guest changes of an encrypted image need its cipher (metadata changes do not).
        self.refuse_locked(true)?;
        self.open_for_change(w)?;
        self.mark_bitmaps(&mut w.bitmaps, offset, len)
    }

    /// Readies the image for a change: refused on a poisoned handle; before the first change the
    /// autoclear bits are cleared; before the first change since the bitmaps were last stored
    /// (or opened) they are put in use on disk; with lazy refcounts the dirty bit is set on disk.
    pub(in crate::image) fn open_for_change(&self, w: &mut Writer) -> Result<(), ImageError> {
        w.refuse_if_poisoned()?;
        if !w.autoclear_cleared {
            self.prepare_for_writing(w)?;
        }
        self.put_bitmaps_in_use(w)?;
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
        self.open_for_guest_change(&mut w, guest.0, data.len() as u64)?;
        let r = self
            .write_runs(&mut w, guest.0, data)
            .and_then(|()| self.bound_pending_writes(&mut w));
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
        let entries = self.l2_entries(l2, first, max)?;
        let owned = |e: L2Entry| {
            !e.is_zero()
                && e.owned_host(false)
                    .is_some_and(|h| h.0 != 0 && g.is_aligned(h))
        };
        // Whole clusters are written, so nothing of the old view (backing file, zeros) is
        // needed: unallocated and plain zero clusters just get new ones.
        let base = entries[0].host_offset().0;
        let k = if owned(entries[0]) {
            entries
                .iter()
                .enumerate()
                .take_while(|&(j, &e)| owned(e) && e.host_offset().0 == base + j as u64 * cs)
                .count()
        } else if entries[0].has_no_data() {
            entries.iter().take_while(|e| e.has_no_data()).count()
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
        let run = self.allocate_run(w, k as u64)?.0;
        let storage = self.storage.clone();
        self.guarded_write(w, WriteKind::GuestData, storage.as_ref(), run, bytes)?;
        for j in 0..k {
            let new = l2::Slot::plain(L2Entry::owned(HostOffset(run + j as u64 * cs)));
            // The old entries hold no data: nothing is released.
            self.l2_replace(w, l2, first + j, new)?.release(w);
        }
        Ok(bytes.len())
    }

    /// Calls `f` for every cluster-sized piece of `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Image, &mut Writer, u64, usize, usize) -> Result<(), ImageError>,
        w: &mut Writer,
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        let mut done = 0u64;
        while done < len {
            let g = offset + done;
            let at = self.geometry.in_cluster_offset(g);
            let n = (cs - at).min(len - done);
            f(self, w, g - at, at as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Keeps memory bounded: too many tables waiting for write-back start a flush.
    pub(in crate::image) fn bound_pending_writes(&self, w: &mut Writer) -> Result<(), ImageError> {
        if self.l2_cache.dirty_len() > self.l2_cache.capacity().max(16) {
            self.flush_locked(w)?;
        }
        w.refcounts.trim(4096);
        Ok(())
    }
}
