//! `qemu-img commit`: the layers above a base folded into it.
//!
//! Write order, and what a crash at any point leaves: the base is opened for writing first
//! (its lock keeps other writers out), every range the layers above it allocate is copied into
//! it (the top still reads the same throughout: nothing above the base changes), the base is
//! flushed, and only then is the top emptied. A crash while copying leaves the base partly
//! updated and the top whole; a crash while emptying leaves some of the top's clusters
//! unallocated, reading from a base that already holds their data. Running the commit again
//! finishes it either way.

use std::path::{Path, PathBuf};

use super::{backing_layers, canonical, Layer};
use crate::convert::{convert, ConvertOptions, ConvertStats, RawFile, Source, Target};
use crate::image::{resolve_backing, BackingChain, Image, ImageError, OpenOptions};
use crate::lock::Locking;
use crate::storage::{CacheMode, Storage};

/// How to commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The image to commit into, named as `qemu-img commit -b` takes it (see
    /// [`find_base`]); `None` is the top's own backing file.
    pub base: Option<String>,
    /// Leave the top image as it is (`-d`); implied by `base`, as in qemu-img (the images
    /// between the base and the top no longer read as they did, but the top still does).
    pub keep_top: bool,
    /// Cache mode of the base and the top (`-t`; qemu-img's default for commit: writeback).
    pub cache: CacheMode,
    /// How to lock every file (QEMU's `locking`).
    pub locking: Locking,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStats {
    /// The image committed into.
    pub base: PathBuf,
    /// Whether the top was emptied.
    pub emptied: bool,
    /// The copy into the base.
    pub copied: ConvertStats,
}

/// The layer (an index into `layers`, the chain below `top`) that `name` names, as QEMU's
/// `bdrv_find_backing_image` finds it: the name, relative to the folder of each image in turn,
/// resolves to the same file as that image's backing file.
pub fn find_base(top: &Path, layers: &[Layer], name: &str) -> Result<usize, ImageError> {
    let mut above = top;
    for (i, layer) in layers.iter().enumerate() {
        let wanted = std::fs::canonicalize(resolve_backing(Some(above), name));
        let actual = std::fs::canonicalize(&layer.path);
        if matches!((wanted, actual), (Ok(w), Ok(a)) if w == a) {
            return Ok(i);
        }
        above = &layer.path;
    }
    Err(ImageError::InvalidArgument(format!(
        "Did not find '{name}' in the backing chain of '{}'",
        top.display()
    )))
}

/// The base, opened for writing.
enum Base {
    Image(Box<Image>),
    Raw(RawFile),
}

impl Base {
    fn open(layer: &Layer, options: &CommitOptions) -> Result<Base, ImageError> {
        match layer.format.as_str() {
            "qcow2" => {
                let open = OpenOptions {
                    writable: true,
                    cache: options.cache,
                    locking: options.locking,
                    ..OpenOptions::default()
                };
                Ok(Base::Image(Box::new(Image::open(&layer.path, open)?)))
            }
            _ => Ok(Base::Raw(RawFile::open(
                &layer.path,
                true,
                false,
                options.cache,
            )?)),
        }
    }

    /// Grows the base to `size` if it is smaller (QEMU's commit does, so that all of the top
    /// fits).
    fn grow_to(&mut self, size: u64) -> Result<(), ImageError> {
        match self {
            Base::Image(image) if image.virtual_size() < size => image.resize(size).map_err(|e| {
                e.in_file(
                    &image
                        .path()
                        .map_or_else(String::new, |p| p.display().to_string()),
                )
            }),
            Base::Raw(raw) if raw.size < size => {
                raw.storage
                    .set_len(size)
                    .map_err(|e| ImageError::Io(e).in_file(&raw.name))?;
                raw.size = size;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn has_backing(&self) -> bool {
        matches!(self, Base::Image(image) if image.header().backing_file.is_some())
    }

    fn target(&self) -> Target<'_> {
        match self {
            Base::Image(image) => Target::Image(image),
            Base::Raw(raw) => Target::Raw(raw),
        }
    }

    /// Makes everything written durable (as the cache mode says), the base's persistent
    /// bitmaps (which the copy dirtied) stored.
    fn close(&self) -> Result<(), ImageError> {
        match self {
            Base::Image(image) => image.close(),
            Base::Raw(raw) => raw
                .storage
                .flush()
                .map_err(|e| ImageError::Io(e).in_file(&raw.name)),
        }
    }
}

/// Commits `top` into its backing file, or into `options.base` further down its chain, as
/// `qemu-img commit` does: every range allocated above the base (data or zeros) is written into
/// the base, which grows to the top's size if it is smaller; then, unless `keep_top` or `base`,
/// the top is emptied (every cluster unallocated, so that it reads the base again).
/// `progress(done, total)` rises with the copy; returning `false` stops it with
/// [`ImageError::Cancelled`] (the top is then left whole). Errors name the file.
pub fn commit(
    top: &Path,
    options: &CommitOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<CommitStats, ImageError> {
    let layers = backing_layers(top, options.locking)?;
    if layers.is_empty() {
        return Err(ImageError::InvalidArgument(
            "Image does not have a backing file".into(),
        ));
    }
    let index = match &options.base {
        None => 0,
        Some(name) => find_base(top, &layers, name)?,
    };
    let layer = &layers[index];
    let keep_top = options.keep_top || options.base.is_some();
    let mut base = Base::open(layer, options)?;
    let top_image = Image::open(
        top,
        OpenOptions {
            writable: !keep_top,
            cache: options.cache,
            locking: options.locking,
            // The base is held writable above: the top must not open (and lock) it again, and
            // it never reads it (only what lies above it is copied).
            backing: BackingChain::Above(canonical(&layer.path)?),
            ..OpenOptions::default()
        },
    )?;
    base.grow_to(top_image.virtual_size())?;
    let copy = ConvertOptions {
        compress: false,
        // Data is copied as data, zero clusters as zeros: nothing of the base is sparsified.
        min_sparse: u64::MAX,
        target_is_zero: false,
        target_has_backing: base.has_backing(),
        source_layers: Some(index as u32 + 1),
        below_unreadable: true,
        parallel: 8,
        out_of_order: false,
    };
    let copied = convert(&Source::Image(&top_image), &base.target(), &copy, progress)?;
    base.close()?;
    if !keep_top {
        top_image
            .make_empty()
            .and_then(|()| top_image.close())
            .map_err(|e| e.in_file(&top.display().to_string()))?;
    }
    Ok(CommitStats {
        base: layer.path.clone(),
        emptied: !keep_top,
        copied,
    })
}
