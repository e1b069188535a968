//! The layout of a new image: options validated in QEMU's order, every table placed.

use crate::format::limits::{MAX_BACKING_FILE_NAME, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
pub use crate::format::new_image::CompressionType;
use crate::format::new_image::{
    extended_l2_entry_for, l2_entry_for, new_header, refcounts_per_block, NewHeaderFields,
    L1_ENTRY_SIZE, REFTABLE_ENTRY_SIZE,
};
use crate::format::offsets::{MAX_CLUSTER_BITS, MAX_HOST_OFFSET, MIN_CLUSTER_BITS};
use crate::format::refcount::MAX_REFCOUNT_ORDER;
use crate::format::{
    write_extended_l2_table, write_u64_table, ClusterCount, ClusterIndex, FormatError, Geometry,
    GuestOffset, Header, HeaderExtension, HostOffset,
};

use super::options::*;

/// Where data clusters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlacement {
    /// Nothing is preallocated: no L2 tables, no data clusters.
    None,
    /// Each L2 table is followed by the data clusters it maps (QEMU's `metadata` layout).
    Interleaved,
    /// All L2 tables, then all data clusters contiguously (for `falloc` / `full`).
    Contiguous,
    /// L2 tables only; data lives in the external data file at its guest offset.
    External,
}

/// The complete layout of a new image: every table's place and the header pointing at them.
///
/// Only [`plan`] makes one, and it guarantees that the whole layout ends below 2^56 bytes, so
/// the cluster index arithmetic of the methods below cannot overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The header, with every table field filled in.
    pub header: Header,
    /// Cluster size and L2 geometry.
    pub geometry: Geometry,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// First cluster of the refcount table.
    pub reftable: ClusterIndex,
    /// Clusters of the refcount table.
    pub reftable_clusters: ClusterCount,
    /// First refcount block (they are contiguous).
    pub refblocks: ClusterIndex,
    /// Number of refcount blocks.
    pub refblock_count: ClusterCount,
    /// First cluster of the L1 table (meaningless when `l1_entries == 0`).
    pub l1: ClusterIndex,
    /// Entries of the L1 table.
    pub l1_entries: u64,
    /// Clusters of the L1 table.
    pub l1_clusters: ClusterCount,
    /// Number of preallocated L2 tables (0 without preallocation).
    pub l2_tables: ClusterCount,
    /// Guest clusters mapped by preallocation (0 without preallocation).
    pub data_clusters: ClusterCount,
    /// Where data clusters go.
    pub placement: DataPlacement,
    /// The preallocation mode (after QEMU's `data_file_raw` upgrade to `Metadata`).
    pub preallocation: Preallocation,
    /// Clusters in use from cluster 0: each has refcount 1, all others 0.
    pub used_clusters: ClusterCount,
    /// Length of the image file.
    pub file_len: u64,
    /// Length of the external data file, if there is one (the virtual size).
    pub data_file_len: Option<u64>,
    /// The LUKS header area of an encrypted image: its first cluster and its bytes.
    pub crypto_area: Option<(ClusterIndex, CryptoArea)>,
}

/// Number of `(refcount blocks, refcount table clusters)` needed so that `clusters` other
/// clusters plus the blocks and the table themselves all have a refcount entry: the fixed
/// point of growing both until nothing more is needed. `None` on overflow.
pub fn refcount_fixpoint(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
) -> Option<(u64, u64)> {
    let per_block = refcounts_per_block(cluster_size, refcount_order)?;
    let per_table_cluster = cluster_size / REFTABLE_ENTRY_SIZE;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = clusters.checked_add(blocks)?.checked_add(table)?;
        let new_blocks = total.div_ceil(per_block);
        let new_table = new_blocks.div_ceil(per_table_cluster).max(1);
        if (new_blocks, new_table) == (blocks, table) {
            return Some((blocks, table));
        }
        // Both only grow, and each step adds a small fraction of the total: this converges in a
        // handful of rounds.
        blocks = new_blocks.max(blocks);
        table = new_table.max(table);
    }
}

/// Validates `opts` in QEMU's order with QEMU's messages and lays the image out.
pub fn plan(opts: &CreateOptions) -> Result<Plan, CreateError> {
    if opts.size > MAX_SIZE_ARGUMENT {
        return Err(CreateError::SizeOutOfRange);
    }
    // Cannot overflow: size <= 2^63 - 1.
    let size = opts.size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let version = opts.version;
    if !(2..=3).contains(&version) {
        return Err(CreateError::InvalidVersion(version));
    }
    let v3 = version == 3;
    if opts.extended_l2 && !v3 {
        return Err(CreateError::ExtendedL2NeedsV3);
    }
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    if !cs.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(CreateError::ClusterSize);
    }
    if opts.extended_l2 && cs < MIN_EXTENDED_L2_CLUSTER_SIZE {
        return Err(CreateError::ExtendedL2ClusterSize);
    }
    let has_backing = opts.backing_file.is_some();
    let mut prealloc = opts.preallocation;
    if has_backing && prealloc != Preallocation::Off && !opts.extended_l2 {
        return Err(CreateError::BackingWithPreallocation);
    }
    if opts.backing_format.is_some() && !has_backing {
        return Err(CreateError::BackingFormatWithoutFile);
    }
    if opts.lazy_refcounts && !v3 {
        return Err(CreateError::LazyRefcountsNeedV3);
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(CreateError::RefcountWidth);
    }
    if !v3 && rb != 16 {
        return Err(CreateError::RefcountWidthNeedsV3);
    }
    let refcount_order = rb.trailing_zeros();
    debug_assert!(refcount_order <= MAX_REFCOUNT_ORDER);
    if opts.data_file_raw && opts.data_file.is_none() {
        return Err(CreateError::DataFileRawWithoutDataFile);
    }
    if opts.data_file_raw && has_backing {
        return Err(CreateError::BackingWithDataFileRaw);
    }
    if opts.data_file_raw && prealloc == Preallocation::Off {
        // A raw data file must read the same through the image: map every cluster 1:1.
        prealloc = Preallocation::Metadata;
    }
    if opts.data_file.is_some() && !v3 {
        return Err(CreateError::DataFileNeedsV3);
    }
    if opts.compression != CompressionType::Zlib && !v3 {
        return Err(CreateError::CompressionNeedsV3);
    }
    if size > MAX_IMAGE_LENGTH {
        return Err(CreateError::SizeExceedsMaximum {
            size,
            max: MAX_IMAGE_LENGTH,
        });
    }
    let geometry = Geometry::new(cluster_bits, opts.extended_l2).ok_or(CreateError::ClusterSize)?;
    let l1_entries = geometry.l1_entries_for(size);
    if l1_entries > MAX_L1_BYTES / L1_ENTRY_SIZE {
        return Err(CreateError::TooLarge);
    }

    let backing_error = |reason| CreateError::BackingFile {
        name: opts.backing_file.clone().unwrap_or_default(),
        format: opts
            .backing_format
            .clone()
            .unwrap_or_else(|| "(null)".into()),
        reason,
    };
    if opts
        .backing_file
        .as_ref()
        .is_some_and(|b| b.len() as u64 > MAX_BACKING_FILE_NAME)
    {
        return Err(backing_error("Invalid argument"));
    }
    let mut header = new_header(&NewHeaderFields {
        version,
        cluster_bits,
        size,
        refcount_order,
        extended_l2: opts.extended_l2,
        lazy_refcounts: opts.lazy_refcounts,
        compression: opts.compression,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        data_file_raw: opts.data_file_raw,
        crypto_area_len: opts.encryption.as_ref().map(|a| a.0.len() as u64),
    })?;
    // A header larger than the cluster is refused by the serializer; QEMU words that case
    // differently with and without a backing file, so it is told apart here.
    let header_len = match header.serialize() {
        Ok(bytes) => bytes.len() as u64,
        Err(FormatError::FieldTooLarge {
            field: "qcow2 header",
            ..
        }) => u64::MAX,
        Err(e) => return Err(e.into()),
    };
    if header_len > cs {
        return Err(if has_backing {
            backing_error("No space left on device")
        } else {
            CreateError::HeaderTooLarge
        });
    }

    let external = opts.data_file.is_some();
    let l1_clusters = geometry.bytes_to_clusters(l1_entries * L1_ENTRY_SIZE);
    let (placement, data_clusters) = match (prealloc, external) {
        (Preallocation::Off, _) => (DataPlacement::None, 0),
        (_, true) => (DataPlacement::External, size.div_ceil(cs)),
        (Preallocation::Metadata, false) => (DataPlacement::Interleaved, size.div_ceil(cs)),
        (Preallocation::Falloc | Preallocation::Full, false) => {
            (DataPlacement::Contiguous, size.div_ceil(cs))
        }
    };
    let l2_tables = if placement == DataPlacement::None {
        0
    } else {
        data_clusters.div_ceil(geometry.l2_entries())
    };
    let in_file_data = match placement {
        DataPlacement::Interleaved | DataPlacement::Contiguous => data_clusters,
        DataPlacement::None | DataPlacement::External => 0,
    };
    // As QEMU places it: the LUKS header area after everything else (it sets up encryption
    // once the disk is sized and preallocated).
    let crypto_len = opts.encryption.as_ref().map_or(0, |a| a.0.len() as u64);
    let crypto_clusters = crypto_len.div_ceil(cs);
    // Everything but the refcount structures: header, L1, L2 tables, data in the file, the
    // encryption header.
    let others = 1 + l1_clusters.0 + l2_tables + in_file_data + crypto_clusters;
    let (blocks, table) =
        refcount_fixpoint(others, cs, refcount_order).ok_or(CreateError::TooLarge)?;
    if table.saturating_mul(cs) > MAX_REFTABLE_BYTES {
        return Err(CreateError::TooLarge);
    }
    let used = others + blocks + table;
    let end = used.checked_mul(cs).ok_or(CreateError::TooLarge)?;
    if end > MAX_HOST_OFFSET {
        return Err(CreateError::TooLarge);
    }
    let reftable = ClusterIndex(1);
    let refblocks = ClusterIndex(1 + table);
    let l1 = ClusterIndex(1 + table + blocks);

    header.refcount_table_offset = reftable.0 * cs;
    header.refcount_table_clusters = u32::try_from(table).map_err(|_| CreateError::TooLarge)?;
    header.l1_size = u32::try_from(l1_entries).map_err(|_| CreateError::TooLarge)?;
    header.l1_table_offset = if l1_entries == 0 { 0 } else { l1.0 * cs };
    let crypto_area = opts.encryption.as_ref().map(|area| {
        let first = ClusterIndex(l1.0 + l1_clusters.0 + l2_tables + in_file_data);
        (first, area.clone())
    });
    if let Some((first, _)) = &crypto_area {
        for ext in &mut header.extensions {
            if let HeaderExtension::CryptoHeader { offset, .. } = ext {
                *offset = first.0 * cs;
            }
        }
    }

    let file_len = if placement == DataPlacement::None && l1_entries > 0 && crypto_area.is_none() {
        // Like QEMU: the file ends right after the L1 table's entries.
        l1.0 * cs + l1_entries * L1_ENTRY_SIZE
    } else {
        end
    };
    Ok(Plan {
        header,
        geometry,
        refcount_order,
        reftable,
        reftable_clusters: ClusterCount(table),
        refblocks,
        refblock_count: ClusterCount(blocks),
        l1,
        l1_entries,
        l1_clusters,
        l2_tables: ClusterCount(l2_tables),
        data_clusters: ClusterCount(data_clusters),
        placement,
        preallocation: prealloc,
        used_clusters: ClusterCount(used),
        file_len,
        data_file_len: external.then_some(size),
        crypto_area,
    })
}

impl Plan {
    fn first_l2(&self) -> u64 {
        self.l1.0 + self.l1_clusters.0
    }

    /// Host cluster of preallocated L2 table `index`.
    pub fn l2_table_cluster(&self, index: u64) -> ClusterIndex {
        let first = self.first_l2();
        match self.placement {
            DataPlacement::Interleaved => {
                ClusterIndex(first + index * (1 + self.geometry.l2_entries()))
            }
            _ => ClusterIndex(first + index),
        }
    }

    /// Where guest cluster `guest` lives: a cluster of the image file, or of the data file
    /// (identity), or nowhere without preallocation.
    pub fn data_cluster(&self, guest: u64) -> Option<ClusterIndex> {
        let per = self.geometry.l2_entries();
        match self.placement {
            DataPlacement::None => None,
            DataPlacement::External => Some(ClusterIndex(guest)),
            DataPlacement::Interleaved => Some(ClusterIndex(
                self.l2_table_cluster(guest / per).0 + 1 + guest % per,
            )),
            DataPlacement::Contiguous => {
                Some(ClusterIndex(self.first_l2() + self.l2_tables.0 + guest))
            }
        }
    }

    /// Host byte range `[start, end)` of the data clusters in the image file (`falloc`/`full`
    /// reserve or zero it); `None` when data does not live in the image file contiguously.
    pub fn contiguous_data_range(&self) -> Option<(HostOffset, u64)> {
        if self.placement != DataPlacement::Contiguous || self.data_clusters.0 == 0 {
            return None;
        }
        let start = self.data_cluster(0)?;
        let start = self.geometry.cluster_start(start)?;
        Some((start, self.data_clusters.0 * self.geometry.cluster_size()))
    }

    /// The host offset of cluster `c` (every cluster of a plan is below 2^56).
    pub(super) fn offset(&self, c: ClusterIndex) -> Result<HostOffset, CreateError> {
        self.geometry.cluster_start(c).ok_or(CreateError::TooLarge)
    }

    /// The bytes of L2 table `index`.
    pub(super) fn l2_table(&self, index: u64) -> Result<Vec<u8>, CreateError> {
        let per = self.geometry.l2_entries();
        let first = index * per;
        let last = (first + per).min(self.data_clusters.0);
        let mut hosts = Vec::with_capacity(usize::try_from(per).unwrap_or(0));
        for guest in first..last {
            let host = match self.placement {
                // The data file is the guest disk itself: host offset = guest offset.
                DataPlacement::External => {
                    HostOffset(GuestOffset(guest << self.geometry.cluster_bits()).0)
                }
                _ => self.offset(self.data_cluster(guest).ok_or(CreateError::TooLarge)?)?,
            };
            hosts.push(host);
        }
        let mut bytes = if self.geometry.is_extended_l2() {
            let entries: Vec<_> = hosts.into_iter().map(extended_l2_entry_for).collect();
            write_extended_l2_table(&entries)
        } else {
            let entries: Vec<_> = hosts.into_iter().map(l2_entry_for).collect();
            write_u64_table(&entries)
        };
        bytes.resize(self.geometry.cluster_size() as usize, 0);
        Ok(bytes)
    }
}
