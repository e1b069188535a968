//! Allocation at the image level: clusters handed out by [`Refcounts`](super::refcounts::Refcounts)
//! as host offsets, entered into the metadata map when they hold metadata, and the header
//! following a refcount table that moved. The invariant: a cluster that will hold metadata is in
//! the map before a byte of it is written, so no guest write can land on it in between.

use super::refcounts::NewTable;
use super::Writer;
use crate::format::HostOffset;
use crate::image::{Image, ImageError};
use crate::overlap::MetadataType;

/// The image-level side of allocation: clusters handed out by [`Refcounts`], entered into the
/// metadata map when they hold metadata, the header following a moved refcount table.
impl Image {
    /// Allocates a cluster for metadata of `types`, entering it (and any refcount structures
    /// created on the way) into the map.
    pub(in crate::image) fn allocate_metadata(
        &self,
        w: &mut Writer,
        types: MetadataType,
    ) -> Result<HostOffset, ImageError> {
        let offset = self.allocate_cluster(w)?;
        self.map_enter(w, offset.0, 1, types)?;
        Ok(offset)
    }

    /// Allocates one cluster (refcount 1), entering new refcount structures into the map.
    /// Returns its first byte.
    pub(in crate::image) fn allocate_cluster(
        &self,
        w: &mut Writer,
    ) -> Result<HostOffset, ImageError> {
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
        Ok(self.cluster_offset(cluster))
    }

    /// Enters refcount blocks and tables created by the allocator into the map.
    pub(in crate::image) fn enter_created(
        &self,
        w: &mut Writer,
        created: &[NewTable],
    ) -> Result<(), ImageError> {
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

    /// Allocates `n` contiguous clusters; returns the first byte of the first.
    pub(in crate::image) fn allocate_run(
        &self,
        w: &mut Writer,
        n: u64,
    ) -> Result<HostOffset, ImageError> {
        let (first, created) = w.refcounts.allocate_run(self.storage.as_ref(), n)?;
        self.enter_created(w, &created)?;
        Ok(self.cluster_offset(first))
    }

    /// The first byte of cluster number `cluster` as the allocator counts them. Cannot
    /// overflow: the allocator only hands out clusters that a refcount block describes, and the
    /// refcount table's size bounds those far below 2^64 bytes.
    fn cluster_offset(&self, cluster: u64) -> HostOffset {
        HostOffset(cluster << self.geometry.cluster_bits())
    }
}
