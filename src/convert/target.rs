//! Where a conversion writes: a qcow2 image, every write through its guarded engine, or a raw
//! file.

use super::source::RawFile;
use crate::format::GuestOffset;
use crate::image::{Image, ImageError};
use crate::storage::Storage;

/// Where a conversion writes.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A qcow2 image opened writable.
    Image(&'a Image),
    /// A raw file opened writable, as long as the disk.
    Raw(&'a RawFile),
}

impl Target<'_> {
    /// Guest bytes the target holds.
    pub fn size(&self) -> u64 {
        match self {
            Target::Image(image) => image.virtual_size(),
            Target::Raw(raw) => raw.size,
        }
    }

    /// The file errors name.
    pub(super) fn name(&self) -> String {
        match self {
            Target::Image(image) => image
                .path()
                .map_or_else(|| "<image>".to_owned(), |p| p.display().to_string()),
            Target::Raw(raw) => raw.name.clone(),
        }
    }

    /// Whether clusters can be stored compressed.
    pub(super) fn can_compress(&self) -> bool {
        matches!(self, Target::Image(_))
    }

    /// The granule writes are planned in: a qcow2 image's cluster (a cluster written in two
    /// pieces costs a copy-on-write, and a compressed one must be written whole), one byte for
    /// a raw file.
    pub(super) fn granule(&self) -> u64 {
        match self {
            Target::Image(image) => image.geometry().cluster_size(),
            Target::Raw(_) => 1,
        }
    }

    /// The image that compresses clusters for a compressed target.
    pub(super) fn compressor(&self) -> Option<&Image> {
        match self {
            Target::Image(image) => Some(image),
            Target::Raw(_) => None,
        }
    }

    /// Writes guest bytes. Into a qcow2 image, runs of whole clusters with no data yet are
    /// reserved, written and committed (see `Image::reserve_run`), so that the copy itself is
    /// made without the writer's lock, beside other workers'; the rest is written the
    /// ordinary way.
    pub(super) fn write(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let image = match self {
            Target::Image(image) => image,
            Target::Raw(raw) => return Ok(raw.storage.write_at(offset, data)?),
        };
        let cs = image.geometry().cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let rest = &data[done..];
            let reserved = if pos % cs == 0 && rest.len() as u64 >= 2 * cs {
                image.reserve_run(GuestOffset(pos), rest.len() as u64)?
            } else {
                None
            };
            let Some(r) = reserved else {
                return image.write_at(GuestOffset(pos), rest);
            };
            let n = r.len(cs) as usize;
            if let Err(e) = image.write_reserved(&r, &rest[..n]) {
                // Best effort: the error is what the caller needs to hear.
                let _ = image.release_reserved(r);
                return Err(e);
            }
            image.commit_reserved(r, &rest[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Makes a range read as zeros; `unmap` lets a qcow2 image free its clusters (only when
    /// it has no backing file for freed clusters to fall back to).
    pub(super) fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), ImageError> {
        match self {
            Target::Image(image) => image.write_zeroes(GuestOffset(offset), len, unmap),
            Target::Raw(raw) => Ok(raw.storage.zero_range(offset, len)?),
        }
    }

    /// Stores one cluster compressed (`packed`, from `Image::compress_cluster`) or, when it
    /// did not shrink, plain. Returns whether it was stored compressed.
    pub(super) fn write_compressed(
        &self,
        offset: u64,
        data: &[u8],
        packed: Option<&[u8]>,
    ) -> Result<bool, ImageError> {
        match self {
            Target::Image(image) => image.write_compressed_with(GuestOffset(offset), data, packed),
            Target::Raw(raw) => raw
                .storage
                .write_at(offset, data)
                .map(|()| false)
                .map_err(Into::into),
        }
    }
}
