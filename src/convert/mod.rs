//! Copying a guest disk from one image to another: `qemu-img convert`'s pipeline.
//!
//! The source says where its data is (the guest map of a qcow2 chain, `SEEK_DATA`/`SEEK_HOLE`
//! of a raw file), so holes cost nothing; ranges that hold data are read in chunks on worker
//! threads, searched for zeros and, for a compressed target, compressed there too; the calling
//! thread writes the results through the target's guarded engine, in guest order (or as they
//! come, with `out_of_order`), and reports progress.
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | [`ConvertOptions`], [`convert`], what a run did ([`ConvertStats`]) |
//! | `source.rs` | [`Source`]: the disk to copy, as segments of data, zeros and ranges left to a backing file |
//! | `target.rs` | [`Target`]: a qcow2 image or a raw file written through its own rules |
//! | `sparse.rs` | zero detection: the runs of a buffer that are all zeros, at a granule |
//! | `pipeline.rs` | the jobs, the workers, the ordered write-back |

mod pipeline;
mod source;
mod sparse;
pub(crate) use sparse::is_zero;
mod target;

pub use source::{RawFile, Source};
pub use target::Target;

use crate::image::ImageError;

/// How [`convert`] copies, in `qemu-img convert`'s terms.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Store every cluster that shrinks compressed (`-c`; qcow2 targets only).
    pub compress: bool,
    /// Zeros are left out of the target only in runs at least this long (`-S`, default
    /// 4 KiB); 0 copies every byte, holes included, so the target is fully allocated.
    pub min_sparse: u64,
    /// The target already reads as zeros everywhere (a new image without a backing file, or
    /// `--target-is-zero`): ranges of zeros are not written at all. Otherwise they are written
    /// as zeros.
    pub target_is_zero: bool,
    /// The target has a backing file (`-B`, or `qemu-img commit`'s base has one): zeros are
    /// written without unmapping the clusters they cover.
    pub target_has_backing: bool,
    /// Copy only the source's top this many layers (`None`: the whole chain); what they leave
    /// to the layers below is left to the target (`-B`: 1; `qemu-img commit`: the layers above
    /// its base).
    pub source_layers: Option<u32>,
    /// The source is opened without the layers below `source_layers` (as `qemu-img commit`
    /// opens its top, above the base it writes), so it cannot read what they hold: what the
    /// top layers leave to them is never copied, even where a granule of the target is then
    /// written in part (the target fills the rest from its own data).
    pub below_unreadable: bool,
    /// Parallel requests (`-m`, 1 to 16, default 8): at most this many worker threads, and no
    /// more than the machine has cores.
    pub parallel: usize,
    /// Write chunks as they are ready rather than in guest order (`-W`).
    pub out_of_order: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compress: false,
            min_sparse: 4096,
            target_is_zero: true,
            target_has_backing: false,
            source_layers: None,
            below_unreadable: false,
            parallel: 8,
            out_of_order: false,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Guest bytes of the source (the progress total).
    pub total: u64,
    /// Guest bytes read from the source.
    pub read: u64,
    /// Guest bytes written to the target as data (compressed or not).
    pub written: u64,
    /// Guest bytes written to the target as zeros.
    pub zeroed: u64,
    /// Clusters stored compressed.
    pub compressed_clusters: u64,
}

impl ConvertStats {
    /// Adds what another part of the run did (the total stays).
    fn add(&mut self, other: &ConvertStats) {
        self.read += other.read;
        self.written += other.written;
        self.zeroed += other.zeroed;
        self.compressed_clusters += other.compressed_clusters;
    }
}

/// Copies the guest disk of `source` to `target` (at least as large), calling
/// `progress(done, total)` with rising byte counts as ranges are written, last with
/// `done == total`; when it returns `false` the copy stops with [`ImageError::Cancelled`]. Errors name the file they come from. Nothing is flushed: the caller closes
/// the target (which writes its metadata back and, unless its cache mode is `unsafe`, syncs).
pub fn convert(
    source: &Source<'_>,
    target: &Target<'_>,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ConvertStats, ImageError> {
    let size = source.size();
    if target.size() < size {
        return Err(ImageError::InvalidArgument(format!(
            "the target ({} bytes) is smaller than the source ({size} bytes)",
            target.size()
        )));
    }
    if options.compress && !target.can_compress() {
        return Err(ImageError::Unsupported(
            "Compression not supported for this file format".into(),
        ));
    }
    pipeline::run(source, target, options, progress)
}

#[cfg(test)]
mod tests;
