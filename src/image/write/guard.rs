//! The one owner of the overlap policy, and the only place where the engine writes to storage.
//!
//! - [`WriteKind`]: every host write names its kind, and the kind decides which metadata types
//!   the write may legitimately cover (an L2 table's write-back covers its own L2 table,
//!   nothing else).
//! - The check ([`Image::check_overlap`]): constant time from the metadata map; QEMU's naive
//!   algorithm where the map's memory limit left the range unchecked (that checker is rebuilt
//!   here whenever a table moves, so it never checks against stale tables).
//! - The map's upkeep: metadata is entered and removed only here, with one collision rule (a
//!   table entered where other metadata already is, which only a broken refcount can cause, is
//!   refused as an overlapping write).
//! - One rule for freeing: a cluster freed as guest data must not hold metadata.
//! - Corruption marking: a refused write writes nothing, sets the corrupt bit in the header (the
//!   one write not checked: cluster 0 is the header's own) and poisons the handle. An
//!   inconsistency met while writing (an unaligned offset, say) is marked the same way but is
//!   not an overlap: it keeps its own error, and `MetadataOverlapError` always names the types
//!   it would have hit.

use super::Writer;
use crate::format::entry::L2Entry;
use crate::format::header::{CompatibleFeatures, IncompatibleFeatures};
use crate::format::{ClusterCount, ClusterIndex, HostOffset};
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;
use crate::overlap::{NaiveChecker, NaiveLayout};
use crate::storage::Storage;

/// What a host write is, which decides the metadata it may cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Guest data, copy-on-write copies, zero fill: may cover no metadata.
    GuestData,
    /// Write-back of an active L2 table: its own cluster is ACTIVE_L2.
    L2Table,
    /// Write-back of a refcount block over itself.
    RefcountBlock,
    /// Entries of the active L1 table rewritten in place.
    L1Entries,
    /// Entries of the refcount table rewritten in place.
    RefcountTableEntries,
    /// A new table in fresh clusters (L1, refcount table, refcount block, L2, snapshot table,
    /// a snapshot's L1 copy): covers nothing.
    NewTable,
    /// Rewrite of an L2 table that a snapshot uses (COPIED flags, by snapshot operations): its
    /// own cluster is INACTIVE_L2, and ACTIVE_L2 too while the active L1 table shares it.
    SharedL2Table,
    /// The bitmap directory rewritten in place (its bitmaps marked in use before the first
    /// change): its own clusters are BITMAP_DIRECTORY.
    BitmapDirectory,
}

impl WriteKind {
    /// The types this kind of write may cover.
    pub fn ignore(self) -> MetadataType {
        match self {
            WriteKind::GuestData | WriteKind::NewTable => MetadataType::empty(),
            WriteKind::L2Table => MetadataType::ACTIVE_L2,
            WriteKind::SharedL2Table => MetadataType::ACTIVE_L2.union(MetadataType::INACTIVE_L2),
            WriteKind::RefcountBlock => MetadataType::REFCOUNT_BLOCK,
            WriteKind::L1Entries => MetadataType::ACTIVE_L1,
            WriteKind::RefcountTableEntries => MetadataType::REFCOUNT_TABLE,
            WriteKind::BitmapDirectory => MetadataType::BITMAP_DIRECTORY,
        }
    }
}

/// Byte length of the fixed header fields that writes update (size, L1 and refcount table
/// pointers, feature bits): 72 bytes for version 2, 96 for version 3.
fn fixed_header_len(version: u32) -> usize {
    if version >= 3 {
        96
    } else {
        72
    }
}

impl Image {
    /// The pre-write check: the metadata types a write of `size` bytes at `offset` would touch,
    /// minus `ignore`. Constant time from the map; where the map's memory limit left the range
    /// unchecked, QEMU's naive algorithm answers instead (exact, slower).
    pub fn check_overlap(
        &self,
        offset: HostOffset,
        size: u64,
        ignore: MetadataType,
    ) -> Result<MetadataType, ImageError> {
        let map = self.map();
        let found = map.check(offset, size, ignore)?;
        if map.is_exact(offset, size)? {
            return Ok(found);
        }
        drop(map);
        match &*self.fallback.read().unwrap_or_else(|e| e.into_inner()) {
            Some(naive) => Ok(naive.check(offset.0, size, ignore)?),
            None => Ok(found),
        }
    }

    /// Writes `bytes` at `offset` of `storage` after the overlap check for `kind`.
    pub(in crate::image) fn guarded_write(
        &self,
        w: &mut Writer,
        kind: WriteKind,
        storage: &dyn Storage,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        w.refuse_if_poisoned()?;
        if bytes.is_empty() {
            return Ok(());
        }
        // Guest data in an external data file cannot land on qcow2 metadata.
        if !(kind == WriteKind::GuestData && w.external_data) {
            let hit = self.check_overlap(HostOffset(offset), bytes.len() as u64, kind.ignore())?;
            if !hit.is_empty() {
                let name = hit.message_name().unwrap_or("metadata");
                let message =
                    format!("Preventing invalid write on metadata (overlaps with {name})");
                return Err(self.refuse_overlap(w, message, offset, bytes.len() as u64, hit));
            }
        }
        // An encrypted image's guest data leaves memory only enciphered.
        let ciphered = match kind {
            WriteKind::GuestData => self.cipher_for_disk(offset, bytes, true)?,
            _ => None,
        };
        storage.write_at(offset, ciphered.as_deref().unwrap_or(bytes))?;
        Ok(())
    }

    /// Marks the image corrupt on disk (once) and poisons the handle: every later write is
    /// refused with `message`.
    fn mark_corrupt(&self, w: &mut Writer, message: &str) {
        if w.poisoned.is_none() {
            w.poisoned = Some(message.to_string());
            if w.header.version >= 3 {
                w.header.incompatible_features |= IncompatibleFeatures::CORRUPT;
                // Best effort: the write was refused either way.
                let _ = self.write_header(w);
                let _ = self.storage.flush();
            }
        }
    }

    /// A write refused because it would have overwritten metadata of `types` (never empty):
    /// the image is marked corrupt, and the error carries what would have been hit.
    pub(in crate::image) fn refuse_overlap(
        &self,
        w: &mut Writer,
        message: String,
        offset: u64,
        size: u64,
        types: MetadataType,
    ) -> ImageError {
        debug_assert!(!types.is_empty(), "an overlap names what it would hit");
        self.mark_corrupt(w, &message);
        ImageError::MetadataOverlap {
            message,
            offset,
            size,
            types,
        }
    }

    /// Makes an inconsistency met while writing fatal for the handle: a
    /// [`Corruption`](ImageError::Corruption) (an unaligned table or cluster offset, a refcount
    /// of 0 on a cluster in use, a cluster no refcount block can describe) marks the image
    /// corrupt, as QEMU does, and is returned as it is; it is not an overlap, and no metadata
    /// type is claimed. Other errors pass through unchanged.
    pub(in crate::image) fn poison_if_inconsistent(
        &self,
        w: &mut Writer,
        e: ImageError,
    ) -> ImageError {
        if e.kind() == crate::image::ErrorKind::Corruption {
            self.mark_corrupt(w, &e.message());
        }
        e
    }

    /// The one rule for clusters about to be freed as guest data (an L2 entry's last reference
    /// gone): none may hold metadata. An L2 entry pointing into a table would otherwise free the
    /// table, and the next allocation would overwrite it. Refused as an overlap, before anything
    /// changes; `entry` is the L2 entry concerned when one is known.
    pub(in crate::image) fn refuse_freeing_metadata(
        &self,
        w: &mut Writer,
        entry: Option<L2Entry>,
        clusters: &[ClusterIndex],
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        for &c in clusters {
            let at = c.0 * cs;
            let hit = self.check_overlap(HostOffset(at), cs, MetadataType::empty())?;
            if hit.is_empty() {
                continue;
            }
            let name = hit.message_name().unwrap_or("metadata");
            let which = entry.map_or_else(
                || "an L2 entry".to_string(),
                |e| format!("L2 entry {:#x}", e.0),
            );
            let message = format!(
                "Preventing invalid free of metadata: {which} points into the {name} at {at:#x} \
                 as if it were guest data (overlaps with {name})"
            );
            return Err(self.refuse_overlap(w, message, at, cs, hit));
        }
        Ok(())
    }

    /// Writes the header's fixed fields (not checked: cluster 0 is the header's own).
    pub(in crate::image) fn write_header(&self, w: &Writer) -> Result<(), ImageError> {
        let bytes = w.header.serialize_unchecked();
        let n = fixed_header_len(w.header.version).min(bytes.len());
        self.storage.write_at(0, &bytes[..n])?;
        Ok(())
    }

    /// Writes the whole header, extensions and backing file name included (not checked:
    /// cluster 0 is the header's own), for a change of an extension's fields.
    pub(in crate::image) fn write_header_with_extensions(
        &self,
        w: &Writer,
    ) -> Result<(), ImageError> {
        let bytes = w.header.serialize()?;
        self.storage.write_at(0, &bytes)?;
        Ok(())
    }

    /// Whether writes must keep the dirty bit set while refcounts on disk are behind.
    pub(in crate::image) fn lazy_refcounts(w: &Writer) -> bool {
        w.header.version >= 3
            && w.header
                .compatible_features
                .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    }

    /// Records metadata of `types` in `clusters` clusters at `offset` (a table just allocated
    /// or moved there). The one collision rule: metadata already there that may not share a
    /// cluster with it (an allocation handed out a cluster that is in use, which only a broken
    /// refcount can do) refuses the table as an overlapping write, before it is written.
    pub(in crate::image) fn map_enter(
        &self,
        w: &mut Writer,
        offset: u64,
        clusters: u64,
        types: MetadataType,
    ) -> Result<(), ImageError> {
        let hit = self.map.write().unwrap_or_else(|e| e.into_inner()).enter(
            HostOffset(offset),
            ClusterCount(clusters),
            types,
        )?;
        if let Some((at, there)) = hit {
            let name = there.message_name().unwrap_or("metadata");
            let message = format!("Preventing invalid write on metadata (overlaps with {name})");
            return Err(self.refuse_overlap(w, message, at.0, self.geometry.cluster_size(), there));
        }
        Ok(())
    }

    /// Forgets that `clusters` clusters at `offset` hold metadata of `types` (freed, or no
    /// longer of that kind); other types in the same clusters stay.
    pub(in crate::image) fn map_remove(
        &self,
        offset: u64,
        clusters: u64,
        types: MetadataType,
    ) -> Result<(), ImageError> {
        self.map.write().unwrap_or_else(|e| e.into_inner()).remove(
            HostOffset(offset),
            ClusterCount(clusters),
            types,
        )?;
        Ok(())
    }

    /// Where the map's memory limit left ranges to QEMU's naive checker, that checker must see
    /// every table the moment it exists, not at the next flush.
    pub(in crate::image) fn refresh_fallback_now(&self, w: &Writer) -> Result<(), ImageError> {
        if self
            .fallback
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Ok(());
        }
        let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.refresh_fallback(w, &l1)
    }

    /// Rebuilds the naive checker (used only where the map's memory limit left ranges
    /// unchecked) from the live tables, so that it never checks against stale ones.
    pub(in crate::image) fn refresh_fallback(
        &self,
        w: &Writer,
        l1: &[u64],
    ) -> Result<(), ImageError> {
        let mut slot = self.fallback.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = slot.as_ref() else {
            return Ok(());
        };
        let prev = old.layout().clone();
        let snaps = self.snaps.read().unwrap_or_else(|e| e.into_inner());
        let layout = NaiveLayout {
            l1_table_offset: w.header.l1_table_offset,
            l1_table: l1.to_vec(),
            refcount_table_offset: w.refcounts.table_offset,
            refcount_table: w.refcounts.table.clone(),
            snapshots_offset: w.header.snapshots_offset,
            snapshots_size: snaps.table_bytes,
            snapshots: snaps
                .entries
                .iter()
                .map(|e| (e.l1_table_offset, e.l1_size))
                .collect(),
            ..prev
        };
        drop(snaps);
        *slot = Some(
            NaiveChecker::new(
                layout,
                self.options.enabled,
                std::sync::Arc::clone(&self.storage),
            )
            .map_err(|e| ImageError::Unsupported(e.to_string()))?,
        );
        Ok(())
    }
}
