//! `qemu-img rebase`: an image pointed at another backing file (or none), its guest disk
//! unchanged.
//!
//! Safe mode, and what a crash at any point leaves: the image is opened with its old chain and
//! the new backing file beside it; every cluster the image does not allocate itself is read
//! through both, and where they differ the old chain's bytes are written into the image. The
//! image reads the same throughout (what it now holds is what its old chain read). Everything
//! is flushed, and only then does one header write name the new backing file. A crash before it
//! leaves the old backing file named over data right for either; running the rebase again
//! finishes it.

use std::path::Path;

use crate::convert::RawFile;
use crate::format::GuestOffset;
use crate::image::{resolve_backing, BackingChain, Image, ImageError, OpenOptions};
use crate::lock::Locking;
use crate::storage::{CacheMode, Storage};

/// Bytes compared at a time.
const CHUNK: u64 = 2 << 20;
/// Entries of the guest map asked for at a time.
const MAP_BATCH: usize = 4096;

/// How to rebase.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// The new backing file's name as the header will store it (a relative name is relative
    /// to the image's folder); `None` for none (`-b ""`: the image then holds all its data).
    pub backing: Option<String>,
    /// The new backing file's format (`-F`), stored in the header: `qcow2` or `raw` for a safe
    /// rebase, which reads it.
    pub format: Option<String>,
    /// Only rewrite the header (`-u`): the new backing file is not opened, nothing is copied.
    pub header_only: bool,
    /// Store the copied clusters compressed (`-c`).
    pub compress: bool,
    /// Cache mode of the image (`-t`; qemu-img's default: writeback).
    pub cache: CacheMode,
    /// Cache mode of the new backing file (`-T`).
    pub backing_cache: CacheMode,
    /// Open the new backing file shared with writers (`-U`).
    pub force_share: bool,
    /// How to lock every file (QEMU's `locking`).
    pub locking: Locking,
}

/// What a rebase did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Guest bytes read through both chains and compared.
    pub compared: u64,
    /// Guest bytes copied into the image because the new backing file reads them differently.
    pub copied: u64,
}

/// `e`, said of the new backing file `name` as QEMU says it: a lock conflict gets
/// `Could not open new backing file 'NAME': ` (other errors already name the file).
fn said_of_new_backing(e: ImageError, name: &str) -> ImageError {
    match e {
        ImageError::Lock(lock) => ImageError::Lock(
            lock.in_context(format!("Could not open new backing file '{name}': ").into()),
        ),
        ImageError::File { path, source } => ImageError::File {
            path,
            source: Box::new(said_of_new_backing(*source, name)),
        },
        other => other,
    }
}

/// The new backing disk, read beside the old chain.
enum NewBacking {
    Image(Box<Image>),
    Raw(RawFile),
    /// `-b ""`: zeros.
    Nothing,
}

impl NewBacking {
    fn open(image: &Path, options: &RebaseOptions) -> Result<NewBacking, ImageError> {
        let Some(name) = &options.backing else {
            return Ok(NewBacking::Nothing);
        };
        let path = resolve_backing(Some(image), name);
        let said = |e| said_of_new_backing(e, name);
        match options.format.as_deref() {
            Some("raw") => Ok(NewBacking::Raw(
                RawFile::open(&path, false, options.force_share, options.backing_cache)
                    .map_err(said)?,
            )),
            Some("qcow2") => {
                let open = OpenOptions {
                    cache: options.backing_cache,
                    force_share: options.force_share,
                    locking: options.locking,
                    ..OpenOptions::default()
                };
                Ok(NewBacking::Image(Box::new(
                    Image::open(&path, open).map_err(said)?,
                )))
            }
            other => Err(ImageError::Unsupported(format!(
                "a safe rebase reads the new backing file: its format must be qcow2 or raw, \
                 not {}",
                other.unwrap_or("(none)")
            ))),
        }
    }

    /// Fills `buf` with the new backing disk's bytes at `offset` (zeros past its end).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        match self {
            NewBacking::Nothing => {
                buf.fill(0);
                Ok(())
            }
            NewBacking::Raw(raw) => raw
                .storage
                .read_padded(offset, buf)
                .map_err(|e| ImageError::Io(e).in_file(&raw.name)),
            NewBacking::Image(image) => {
                let inside = image.virtual_size().saturating_sub(offset);
                let (head, tail) = buf.split_at_mut(inside.min(buf.len() as u64) as usize);
                tail.fill(0);
                if head.is_empty() {
                    return Ok(());
                }
                image
                    .read_at(GuestOffset(offset), head)
                    .map_err(|e| match image.path() {
                        Some(p) => e.in_file(&p.display().to_string()),
                        None => e,
                    })
            }
        }
    }
}

/// Rebases `image` onto `options.backing` as `qemu-img rebase` does: unless `header_only`,
/// every cluster the image leaves to its backing chain and that the new backing file reads
/// differently is first copied into the image, so that its guest disk stays the same; then the
/// header names the new backing file. `progress(done, total)` rises with the comparison;
/// returning `false` stops it with [`ImageError::Cancelled`] before the header changes.
/// A backing file needs its format (`format`). Errors name the file.
pub fn rebase(
    image: &Path,
    options: &RebaseOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<RebaseStats, ImageError> {
    let shown = image.display().to_string();
    if options.backing.is_some() && options.format.is_none() {
        // QEMU 10 refuses to name a backing file without its format; refused before anything
        // is opened or copied.
        return Err(ImageError::InvalidArgument(
            "backing format must be specified".into(),
        ));
    }
    let open = OpenOptions {
        writable: true,
        cache: options.cache,
        locking: options.locking,
        backing: if options.header_only {
            BackingChain::None
        } else {
            BackingChain::Whole
        },
        ..OpenOptions::default()
    };
    let top = Image::open(image, open)?;
    let mut stats = RebaseStats::default();
    if !options.header_only {
        let new = NewBacking::open(image, options)?;
        stats = copy_differences(&top, &new, options.compress, progress)
            .map_err(|e| e.in_file(&shown))?;
    }
    top.change_backing_file(options.backing.as_deref(), options.format.as_deref())
        .and_then(|()| top.close())
        .map_err(|e| e.in_file(&shown))?;
    Ok(stats)
}

/// Writes into `top` the clusters it leaves to its (old) chain that `new` reads differently.
fn copy_differences(
    top: &Image,
    new: &NewBacking,
    compress: bool,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<RebaseStats, ImageError> {
    let size = top.virtual_size();
    let cs = top.geometry().cluster_size();
    let chunk = CHUNK.max(cs);
    let mut stats = RebaseStats::default();
    let mut old_buf = vec![0u8; chunk as usize];
    let mut new_buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    if !progress(0, size) {
        return Err(ImageError::Cancelled);
    }
    while pos < size {
        let (map, next) = top.guest_map_chunk(pos, MAP_BATCH)?;
        if next <= pos {
            return Err(ImageError::Corruption(format!(
                "the guest map breaks off at {pos}"
            )));
        }
        // Only what the image leaves to its chain is compared (the map's ranges: whole
        // clusters, or subclusters of an extended L2 image), a chunk at a time, in pieces
        // that end at cluster boundaries.
        for e in map.iter().filter(|e| e.depth > 0 || !e.present) {
            let end = (e.start + e.length).min(size);
            let mut at = e.start;
            while at < end {
                let n = chunk.min(end - at) as usize;
                let (old, new_bytes) = (&mut old_buf[..n], &mut new_buf[..n]);
                top.read_at(GuestOffset(at), old)?;
                new.read(at, new_bytes)?;
                stats.compared += n as u64;
                if old != new_bytes {
                    stats.copied += write_differing(top, at, old, new_bytes, cs, compress)?;
                }
                at += n as u64;
                if !progress(at, size) {
                    return Err(ImageError::Cancelled);
                }
            }
        }
        pos = next;
        if !progress(pos.min(size), size) {
            return Err(ImageError::Cancelled);
        }
    }
    Ok(stats)
}

/// Writes the clusters of `old` (guest bytes from `at`) that differ from `new`; the bytes
/// written.
fn write_differing(
    top: &Image,
    at: u64,
    old: &[u8],
    new: &[u8],
    cs: u64,
    compress: bool,
) -> Result<u64, ImageError> {
    let mut written = 0;
    let mut i = 0usize;
    while i < old.len() {
        // Pieces end at cluster boundaries of the guest disk.
        let guest_at = at + i as u64;
        let n = ((cs - guest_at % cs) as usize).min(old.len() - i);
        let (o, w) = (&old[i..i + n], &new[i..i + n]);
        if o != w {
            let guest = GuestOffset(guest_at);
            // Written as data even when the bytes are zeros, as qemu-img does.
            if !(compress && n as u64 == cs && top.write_compressed(guest, o)?) {
                top.write_at(guest, o)?;
            }
            written += n as u64;
        }
        i += n;
    }
    Ok(written)
}
