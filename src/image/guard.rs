//! The one place where the engine writes to storage. Every host write names its kind; the kind
//! decides which metadata types the write may legitimately cover (an L2 table's write-back
//! covers its own L2 table, nothing else). The write is checked against the metadata map first
//! (constant time; QEMU's naive algorithm where the map's memory limit left the range
//! unchecked) and refused if it would land on any other metadata.
//!
//! On a refused write nothing of it reaches the disk; the image is marked corrupt on disk
//! (incompatible bit 1, in the header, which is the one write not checked), and the handle
//! refuses every later write. The header write is the only other `write_at` here.

use super::write::{WriteKind, Writer};
use super::{Image, ImageError};
use crate::format::header::{CompatibleFeatures, IncompatibleFeatures};
use crate::format::HostOffset;
use crate::overlap::MetadataType;
use crate::storage::Storage;

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
    /// Writes `bytes` at `offset` of `storage` after the overlap check for `kind`.
    pub(crate) fn guarded_write(
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
        storage.write_at(offset, bytes)?;
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
    pub(crate) fn refuse_overlap(
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
    pub(crate) fn poison_if_inconsistent(&self, w: &mut Writer, e: ImageError) -> ImageError {
        if e.kind() == super::ErrorKind::Corruption {
            self.mark_corrupt(w, &e.message());
        }
        e
    }

    /// The one rule for clusters about to be freed as guest data (an L2 entry's last reference
    /// gone): none may hold metadata. An L2 entry pointing into a table would otherwise free the
    /// table, and the next allocation would overwrite it. Refused as an overlap, before anything
    /// changes; `entry` is the L2 entry concerned when one is known.
    pub(crate) fn refuse_freeing_metadata(
        &self,
        w: &mut Writer,
        entry: Option<u64>,
        clusters: &[u64],
    ) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        for &c in clusters {
            let at = c * cs;
            let hit = self.check_overlap(HostOffset(at), cs, MetadataType::empty())?;
            if hit.is_empty() {
                continue;
            }
            let name = hit.message_name().unwrap_or("metadata");
            let which =
                entry.map_or_else(|| "an L2 entry".to_string(), |e| format!("L2 entry {e:#x}"));
            let message = format!(
                "Preventing invalid free of metadata: {which} points into the {name} at {at:#x} \
                 as if it were guest data (overlaps with {name})"
            );
            return Err(self.refuse_overlap(w, message, at, cs, hit));
        }
        Ok(())
    }

    /// Writes the header's fixed fields (not checked: cluster 0 is the header's own).
    pub(crate) fn write_header(&self, w: &Writer) -> Result<(), ImageError> {
        let bytes = w.header.serialize_unchecked();
        let n = fixed_header_len(w.header.version).min(bytes.len());
        self.storage.write_at(0, &bytes[..n])?;
        Ok(())
    }

    /// Whether writes must keep the dirty bit set while refcounts on disk are behind.
    pub(crate) fn lazy_refcounts(w: &Writer) -> bool {
        w.header.version >= 3
            && w.header
                .compatible_features
                .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    }
}
