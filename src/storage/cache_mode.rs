//! [`CacheMode`]: when writes to a file reach the disk, in QEMU's `cache=` vocabulary.
//!
//! QEMU's modes combine two switches: whether a flush reaches the disk (`unsafe` ignores
//! flushes) and whether every write is flushed at once (`writethrough`, `directsync`). Its
//! third switch, `O_DIRECT` (`none`, `directsync`), bypasses the page cache; storage here
//! always uses the page cache, so `none` behaves as `writeback` and `directsync` as
//! `writethrough`: the same durability, without the bypass.

use std::fmt;

/// When a file's writes are made durable (`fdatasync`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// A flush makes every earlier write durable (QEMU's `writeback` and `none`).
    #[default]
    Writeback,
    /// Every write is durable before it returns (QEMU's `writethrough` and `directsync`).
    Writethrough,
    /// Flushes are ignored: writes reach the disk when the kernel writes them back (QEMU's
    /// `unsafe`, the default of `qemu-img convert` for its output). A crash of the machine,
    /// not of the process, can lose them, in any order.
    Unsafe,
}

/// A `cache=` name QEMU does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid cache option: {0}")]
pub struct InvalidCacheMode(pub String);

impl CacheMode {
    /// The mode for one of QEMU's names: `none`, `writeback`, `writethrough`, `directsync`,
    /// `unsafe`; anything else is QEMU's error.
    pub fn parse(name: &str) -> Result<Self, InvalidCacheMode> {
        match name {
            "none" | "writeback" => Ok(CacheMode::Writeback),
            "writethrough" | "directsync" => Ok(CacheMode::Writethrough),
            "unsafe" => Ok(CacheMode::Unsafe),
            _ => Err(InvalidCacheMode(name.to_owned())),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Unsafe => "unsafe",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_names_map_to_their_durability() {
        for (name, mode) in [
            ("none", CacheMode::Writeback),
            ("writeback", CacheMode::Writeback),
            ("writethrough", CacheMode::Writethrough),
            ("directsync", CacheMode::Writethrough),
            ("unsafe", CacheMode::Unsafe),
        ] {
            assert_eq!(CacheMode::parse(name), Ok(mode));
        }
        assert_eq!(
            CacheMode::parse("fast").unwrap_err().to_string(),
            "Invalid cache option: fast"
        );
    }
}
