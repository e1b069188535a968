//! Writing a planned image into storage, in an order where nothing points at a structure
//! before it is complete and the header goes last.

use crate::format::new_image::{
    l1_entry_for, refcount_block_with_ones, refcounts_per_block, reftable_entry_for,
};
use crate::format::{write_u64_table, ClusterIndex, HostOffset};
use crate::storage::Storage;

use super::options::*;
use super::plan::*;

/// Bytes written per call when zero-filling (`preallocation=full`) and batching tables.
const WRITE_CHUNK: usize = 4 << 20;

/// Coalesces writes at increasing contiguous offsets into large ones.
struct Batch<'a> {
    storage: &'a dyn Storage,
    path: &'a str,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> Batch<'a> {
    fn new(storage: &'a dyn Storage, path: &'a str) -> Self {
        Batch {
            storage,
            path,
            start: 0,
            buf: Vec::new(),
        }
    }

    fn write(&mut self, offset: HostOffset, bytes: &[u8]) -> Result<(), CreateError> {
        let contiguous = self.start + self.buf.len() as u64 == offset.0;
        if !contiguous || self.buf.len() + bytes.len() > WRITE_CHUNK {
            self.flush()?;
            self.start = offset.0;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CreateError> {
        if !self.buf.is_empty() {
            self.storage
                .write_at(self.start, &self.buf)
                .map_err(CreateError::io("could not write", self.path))?;
            self.start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Writes zeros over `[start, start + len)`.
fn write_zeros(storage: &dyn Storage, start: u64, len: u64, path: &str) -> Result<(), CreateError> {
    let zeros = vec![0u8; WRITE_CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(WRITE_CHUNK as u64) as usize;
        storage
            .write_at(start + done, &zeros[..n])
            .map_err(CreateError::io("could not write", path))?;
        done += n as u64;
    }
    Ok(())
}

/// Writes the planned image into `image` and sizes `data` (the external data file, when the
/// plan has one); both are expected to be new or truncated. `falloc` space reservation is left to the caller, which owns
/// the files ([`create_file`] does it); everything else, including `full`'s zeros, is here.
pub fn write_image(
    plan: &Plan,
    image: &dyn Storage,
    data: Option<&dyn Storage>,
) -> Result<(), CreateError> {
    let path = "the image";
    let cs = plan.geometry.cluster_size();
    image
        .set_len(plan.file_len)
        .map_err(CreateError::io("could not resize", path))?;
    let mut batch = Batch::new(image, path);

    // Refcount blocks: every used cluster has refcount 1.
    let per_block = refcounts_per_block(cs, plan.refcount_order).ok_or(CreateError::TooLarge)?;
    let full_block = refcount_block_with_ones(cs, plan.refcount_order, per_block)?;
    let mut reftable = Vec::with_capacity(usize::try_from(plan.refblock_count.0).unwrap_or(0));
    for k in 0..plan.refblock_count.0 {
        let at = plan.offset(ClusterIndex(plan.refblocks.0 + k))?;
        let covered_from = k * per_block;
        let ones = plan.used_clusters.0.saturating_sub(covered_from);
        if ones >= per_block {
            batch.write(at, &full_block)?;
        } else {
            batch.write(
                at,
                &refcount_block_with_ones(cs, plan.refcount_order, ones)?,
            )?;
        }
        reftable.push(reftable_entry_for(at));
    }
    let reftable_at = plan.offset(plan.reftable)?;
    batch.write(reftable_at, &write_u64_table(&reftable))?;
    batch.flush()?;

    // L2 tables before the L1 entries that point at them.
    let mut l1 = Vec::with_capacity(usize::try_from(plan.l1_entries).unwrap_or(0));
    for i in 0..plan.l2_tables.0 {
        let at = plan.offset(plan.l2_table_cluster(i))?;
        batch.write(at, &plan.l2_table(i)?)?;
        l1.push(l1_entry_for(at));
    }
    batch.flush()?;
    if plan.l1_entries > 0 {
        l1.resize(
            usize::try_from(plan.l1_entries).map_err(|_| CreateError::TooLarge)?,
            0,
        );
        batch.write(plan.offset(plan.l1)?, &write_u64_table(&l1))?;
        batch.flush()?;
    }

    if plan.preallocation == Preallocation::Full {
        if let Some((start, len)) = plan.contiguous_data_range() {
            write_zeros(image, start.0, len, path)?;
        }
    }
    if let (Some(data), Some(len)) = (data, plan.data_file_len) {
        let dpath = "the data file";
        // Only grown (the caller hands over a new or truncated file): space the caller
        // reserved with `falloc` must stay reserved.
        data.set_len(len)
            .map_err(CreateError::io("could not resize", dpath))?;
        if plan.preallocation == Preallocation::Full {
            write_zeros(data, 0, len, dpath)?;
        }
        data.flush()
            .map_err(CreateError::io("could not flush", dpath))?;
    }

    // The LUKS header area before the header that points at it.
    if let Some((first, area)) = &plan.crypto_area {
        image
            .write_at(plan.offset(*first)?.0, &area.0)
            .map_err(CreateError::io("could not write", path))?;
    }

    // The header last: until it is written the file is not a qcow2 image at all.
    image
        .write_at(0, &plan.header.serialize()?)
        .map_err(CreateError::io("could not write", path))?;
    image
        .flush()
        .map_err(CreateError::io("could not flush", path))
}
