//! Operations on a backing chain as a whole: `qemu-img commit` ([`commit()`]) folds the layers
//! above a base into it, `qemu-img rebase` ([`rebase()`]) points an image at another backing
//! file, copying first what would read differently.
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | the chain below an image, walked from the headers ([`Layer`]) |
//! | `commit.rs` | commit: copy the layers above the base into it, then empty the top |
//! | `rebase.rs` | rebase: copy what differs, then switch the header (or only switch it, `-u`) |

mod commit;
mod rebase;

pub use commit::{commit, CommitOptions};
pub use rebase::{rebase, RebaseOptions};

use std::path::{Path, PathBuf};

use crate::image::{
    is_protocol, probe_backing_format, resolve_backing, Image, ImageError, OpenOptions,
};
use crate::lock::Locking;
use crate::overlap::MetadataType;
use crate::storage::FileStorage;

/// One backing file of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its name as the image above it stores it.
    pub name: String,
    /// That name resolved against the folder of the image above (as QEMU resolves it).
    pub path: PathBuf,
    /// Its format: `qcow2` or `raw` (the backing format extension, else probed).
    pub format: String,
}

/// The backing files below `top`, nearest first, read from the headers alone (each image is
/// opened for its metadata only, under QEMU's locks for that, and closed again). A loop, a
/// protocol name or a missing file is an error naming the file.
pub fn backing_layers(top: &Path, locking: Locking) -> Result<Vec<Layer>, ImageError> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut visited = vec![canonical(top)?];
    let mut current = top.to_path_buf();
    loop {
        let (name, format) = {
            let options = OpenOptions {
                metadata_only: true,
                enabled: MetadataType::empty(),
                locking,
                ..OpenOptions::default()
            };
            let image = Image::open(&current, options)?;
            let header = image.header();
            match &header.backing_file {
                None => return Ok(layers),
                Some(name) => (name.clone(), header.backing_format().map(str::to_owned)),
            }
        };
        if is_protocol(&name) {
            return Err(ImageError::Unsupported(format!(
                "Backing file '{name}' uses a protocol; only files are supported"
            )));
        }
        let path = resolve_backing(Some(&current), &name);
        let shown = path.display().to_string();
        let real = canonical(&path)?;
        if visited.contains(&real) {
            let mut names: Vec<String> = visited.iter().map(|p| p.display().to_string()).collect();
            names.push(real.display().to_string());
            return Err(ImageError::BackingLoop(names.join(" -> ")));
        }
        visited.push(real);
        let format = match format {
            Some(f) => f,
            None => {
                let file = FileStorage::open(&path, false)
                    .map_err(|e| ImageError::Io(e).in_file(&shown))?;
                probe_backing_format(&file).map_err(|e| e.in_file(&shown))?
            }
        };
        let last = format != "qcow2";
        layers.push(Layer {
            name,
            path: path.clone(),
            format,
        });
        if last {
            return Ok(layers);
        }
        current = path;
    }
}

/// `path` made absolute with every link resolved (an error naming it if it does not exist).
pub(crate) fn canonical(path: &Path) -> Result<PathBuf, ImageError> {
    std::fs::canonicalize(path).map_err(|e| ImageError::Io(e).in_file(&path.display().to_string()))
}
