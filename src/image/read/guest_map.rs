//! The guest disk as `qemu-img map --output=json` shows it: for every range, which layer of the
//! backing chain provides it (`depth`), whether that layer allocates it (`present`), whether it
//! reads as zeros, holds data, is compressed, and where the data lies in its file (`offset`).
//!
//! The rules are QEMU's block-status rules, applied layer by layer:
//! - a qcow2 layer reports data clusters as data with their host offset, zero clusters as zero
//!   (with the offset of a preallocated cluster), compressed clusters as data without an offset,
//!   and unallocated clusters as neither — which sends the query to the backing file, unless
//!   there is none or the range starts past its end: then it reads as zeros from this layer
//!   without being present in it;
//! - in an image that looks metadata-preallocated (QEMU's heuristic: far more clusters have a
//!   refcount than the file has allocated), data clusters that lie in holes of the file are
//!   reported as zero too;
//! - a raw layer is present everywhere, data where its file has data and zero in holes, at the
//!   same offset;
//! - adjacent ranges merge when every field agrees and offsets continue.
//!
//! Offsets are not reported for encrypted images (QEMU does not either).

use super::backing::{Backing, Chain};
use crate::format::refcount::{refcount_get, ReftableEntry};
use crate::format::{GuestOffset, L2Mapping};
use crate::image::{Image, ImageError};
use crate::storage::Storage;

/// Entries of the guest map computed at a time by [`Image::guest_map`].
const GUEST_MAP_CHUNK: usize = 1 << 16;

/// One range of the guest disk, with `qemu-img map --output=json`'s fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExtent {
    /// First guest byte.
    pub start: u64,
    /// Bytes in the range.
    pub length: u64,
    /// Which layer provides it: 0 is this image, 1 its backing file, ...
    pub depth: u32,
    /// Whether that layer allocates the range.
    pub present: bool,
    /// Whether it reads as zeros.
    pub zero: bool,
    /// Whether that layer holds data for it.
    pub data: bool,
    /// Whether the data is compressed.
    pub compressed: bool,
    /// Where the range starts in that layer's file (data file for external data), if known.
    pub offset: Option<u64>,
}

/// One layer's answer for a range, before the chain is consulted.
#[derive(Debug, Clone, Copy)]
struct Status {
    len: u64,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl GuestExtent {
    /// Whether `next` continues `self` in one entry, by `qemu-img map`'s merge rule.
    fn merges_with(&self, next: &GuestExtent) -> bool {
        self.length != 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.offset.is_some() == next.offset.is_some()
            && self
                .offset
                .map_or(true, |o| o.checked_add(self.length) == next.offset)
    }
}

/// What a file holds at `offset`: `(is data, bytes until that changes)`, from its data ranges.
/// Past the end of the file, or in a hole reaching it, the length is `None`.
fn file_status(storage: &dyn Storage, offset: u64) -> Result<(bool, Option<u64>), ImageError> {
    match storage.next_data(offset)? {
        Some((start, end)) if start <= offset => Ok((true, Some(end - offset))),
        Some((start, _)) => Ok((false, Some(start - offset))),
        None => Ok((false, None)),
    }
}

impl Image {
    /// The guest disk's ranges, merged as `qemu-img map --output=json` merges them.
    ///
    /// The list is as long as the disk is fragmented, which an image's bytes choose (one L2
    /// table named by every L1 entry maps every cluster apart): it grows fallibly, and a disk
    /// too fragmented for memory is [`ImageError::OutOfMemory`], never an abort.
    /// [`Image::guest_map_chunk`] walks the same map in bounded pieces.
    pub fn guest_map(&self) -> Result<Vec<GuestExtent>, ImageError> {
        let size = self.virtual_size();
        let mut out: Vec<GuestExtent> = Vec::new();
        let mut offset = 0;
        while offset < size {
            let (chunk, next) = self.guest_map_chunk(offset, GUEST_MAP_CHUNK)?;
            out.try_reserve(chunk.len())
                .map_err(|_| ImageError::OutOfMemory(out.len().saturating_add(chunk.len())))?;
            out.extend(chunk);
            offset = next;
        }
        Ok(out)
    }

    /// At most `max` (at least 1) merged entries of the guest map from guest offset `start` (the
    /// start of an entry: 0, or what the previous chunk returned), and where the next chunk
    /// starts (the virtual size when the map is done). The last entry of a chunk is whole: the
    /// one after it does not merge with it, so chunks joined are [`Image::guest_map`].
    pub fn guest_map_chunk(
        &self,
        start: u64,
        max: usize,
    ) -> Result<(Vec<GuestExtent>, u64), ImageError> {
        let size = self.virtual_size();
        let mut out: Vec<GuestExtent> = Vec::new();
        let mut offset = start;
        while offset < size {
            let e = self.map_entry(offset, size - offset)?;
            let full = out.len() >= max.max(1);
            match out.last_mut() {
                Some(last) if last.merges_with(&e) => last.length += e.length,
                _ if full => return Ok((out, offset)),
                _ => out.push(e),
            }
            offset += e.length;
        }
        Ok((out, size))
    }

    /// One entry of the map at `offset`: this layer's answer, or the backing chain's where this
    /// layer neither allocates the range nor knows it reads as zeros.
    fn map_entry(&self, offset: u64, len: u64) -> Result<GuestExtent, ImageError> {
        self.map_entry_at_depth(offset, len, 0)
    }

    fn map_entry_at_depth(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
    ) -> Result<GuestExtent, ImageError> {
        let chain = self.chain()?;
        let st = self.layer_status(&chain, offset, len)?;
        if !st.data && !st.zero {
            match &chain.backing {
                Some(Backing::Qcow2(img)) => {
                    return img.map_entry_at_depth(offset, st.len, depth + 1)
                }
                Some(Backing::Raw { storage, size }) => {
                    let raw = raw_status(storage.as_ref(), *size, offset, st.len)?;
                    return Ok(raw.entry(offset, depth + 1));
                }
                None => {}
            }
        }
        Ok(st.entry(offset, depth))
    }

    /// This qcow2 layer's status at `offset` for at most `len` bytes.
    fn layer_status(&self, chain: &Chain, offset: u64, len: u64) -> Result<Status, ImageError> {
        let size = self.virtual_size();
        let len = len.min(size.saturating_sub(offset));
        let ext = self.mapping(GuestOffset(offset), len)?;
        let encrypted = self.scanned.header.crypt_method != 0;
        let shown = |h: Option<crate::format::HostOffset>| h.filter(|_| !encrypted).map(|h| h.0);
        let mut st = Status {
            len: ext.len,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        match ext.mapping {
            L2Mapping::Data { host } => {
                st.data = true;
                st.present = true;
                st.offset = shown(Some(host));
                if st.offset.is_some() && self.looks_preallocated()? {
                    // QEMU asks the file whether the cluster really holds data.
                    match file_status(chain.data.as_ref(), host.0)? {
                        (true, Some(n)) => st.len = st.len.min(n),
                        (false, Some(n)) => {
                            st.zero = true;
                            st.len = st.len.min(n);
                        }
                        (_, None) => st.zero = true,
                    }
                }
            }
            L2Mapping::Zero { host } => {
                st.zero = true;
                st.present = true;
                st.offset = shown(host);
            }
            L2Mapping::Unallocated { host } => {
                st.offset = shown(host);
                st.zero = match &chain.backing {
                    None => true,
                    Some(b) => offset >= b.size(),
                };
            }
            L2Mapping::Compressed(_) => {
                st.data = true;
                st.compressed = true;
                st.present = true;
            }
        }
        Ok(st)
    }

    /// QEMU's test for metadata preallocation: at least `max(allocated * 10 / 9, allocated + 2)`
    /// clusters have a non-zero refcount, where `allocated` counts the clusters the file really
    /// holds.
    fn looks_preallocated(&self) -> Result<bool, ImageError> {
        if let Some(&v) = self.preallocated.get() {
            return Ok(v);
        }
        let v = self.count_preallocated()?;
        Ok(*self.preallocated.get_or_init(|| v))
    }

    fn count_preallocated(&self) -> Result<bool, ImageError> {
        let cs = self.geometry.cluster_size();
        let real = self.storage.allocated_bytes()? / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let clusters = self.storage.len()?.div_ceil(cs);
        let order = self.scanned.header.refcount_order;
        let per_block = (cs * 8) >> order;
        let mut block = vec![0u8; cs as usize];
        let mut counted = 0u64;
        for (i, &e) in self.refcount_table().iter().enumerate() {
            let first = i as u64 * per_block;
            if first >= clusters {
                break;
            }
            let ofs = ReftableEntry(e).block_offset().0;
            if ofs == 0 {
                continue;
            }
            self.storage.read_padded(ofs, &mut block)?;
            let n = per_block.min(clusters - first) as usize;
            for k in 0..n {
                if refcount_get(&block, k, order).unwrap_or(0) > 0 {
                    counted += 1;
                    if counted >= threshold {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

/// A raw layer's status: present everywhere, data or zero as its file holds it, at the same
/// offset.
fn raw_status(
    storage: &dyn Storage,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<Status, ImageError> {
    let len = len.min(size.saturating_sub(offset));
    let (data, n) = file_status(storage, offset)?;
    Ok(Status {
        len: n.map_or(len, |n| n.min(len)),
        present: true,
        zero: !data,
        data,
        compressed: false,
        offset: Some(offset),
    })
}

impl Status {
    fn entry(&self, start: u64, depth: u32) -> GuestExtent {
        GuestExtent {
            start,
            length: self.len,
            depth,
            present: self.present,
            zero: self.zero,
            data: self.data,
            compressed: self.compressed,
            offset: self.offset,
        }
    }
}
