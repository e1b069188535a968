//! Positioned I/O over an image file or an in-memory buffer.
//!
//! Everything above this layer reads and writes through [`Storage`], which has no cursor:
//! every call names its offset, so one handle can be shared between threads (`&self` methods,
//! `Send + Sync`). Implementations: [`FileStorage`] for real images, [`MemStorage`] for
//! tests and in-memory images, and (in test builds only) `FaultyStorage`, which wraps another
//! storage and fails chosen operations so that tests can check what an I/O error in the
//! middle of an update leaves on disk.
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | the [`Storage`] trait, its default methods, the errors implementations share |
//! | `file.rs` | [`FileStorage`]: `pread`/`pwrite` over a file opened by path or a duplicated descriptor |
//! | `mem.rs` | [`MemStorage`]: a byte vector behind a lock |
//! | `cache_mode.rs` | [`CacheMode`]: QEMU's `cache=` modes, when writes are made durable |
//! | `table_chunks.rs` | [`table_data_chunks`]: the parts of a sparse table that hold data |
//! | `faulty.rs` | `FaultyStorage` (test builds only): planned I/O errors per operation |

use std::io;

mod cache_mode;
#[cfg(test)]
mod faulty;
mod file;
mod mem;
mod table_chunks;

pub use cache_mode::{CacheMode, InvalidCacheMode};
#[cfg(test)]
pub use faulty::{FaultyStorage, StorageOp};
pub use file::FileStorage;
pub use mem::MemStorage;
pub use table_chunks::{table_data_chunks, TableChunks};

/// Positioned, cursor-less byte storage.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`. Reading past the end is an error of kind
    /// [`io::ErrorKind::UnexpectedEof`]; a short read never succeeds.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if it ends past the current end
    /// (any gap reads as zeros).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes every completed write durable. Callers order their writes around this (e.g. a
    /// new table is flushed before the pointer to it is written).
    fn flush(&self) -> io::Result<()>;

    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or zero-extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Fills `buf` from `offset`, reading bytes past the end of the storage as zeros, as QEMU's
    /// block layer does: a table or cluster cut off by a truncated file reads as zeros.
    fn read_padded(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = self.len()?;
        let in_file = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[in_file..].fill(0);
        if in_file > 0 {
            self.read_at(offset, &mut buf[..in_file])?;
        }
        Ok(())
    }

    /// The first range `[start, end)` at or after `offset` that may hold data, or `None` when
    /// only zeros follow. Storage that cannot tell holes from data reports everything up to its
    /// end as data (the default).
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len()?;
        Ok((offset < len).then_some((offset, len)))
    }

    /// A hint that nothing reads `[offset, offset + len)` before it is written again: the
    /// storage may give that space back (a hole punched in a file). Afterwards the range reads
    /// as zeros or as its old bytes; the length does not change. Callers may ignore an error:
    /// nothing depends on the space coming back. The default keeps the bytes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Bytes the storage really holds (a sparse file's allocated blocks); the length by default.
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }
}

/// The error returned by writes to storage opened read-only.
fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "storage is read-only")
}

/// The error for a read that runs past the end of the storage.
fn eof_error(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at offset {offset} runs past the end ({size} bytes)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Checks the behaviour every implementation must share.
    pub(super) fn exercise(s: &dyn Storage) {
        s.set_len(0).unwrap();
        assert!(s.is_empty().unwrap());
        s.write_at(4, b"abcd").unwrap();
        assert_eq!(s.len().unwrap(), 8);
        let mut buf = [0xffu8; 8];
        s.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"\0\0\0\0abcd");
        let err = s.read_at(6, &mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = s.read_at(u64::MAX, &mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        s.read_at(8, &mut []).unwrap();
        s.set_len(6).unwrap();
        assert_eq!(s.len().unwrap(), 6);
        s.set_len(10).unwrap();
        let mut buf = [0xffu8; 4];
        s.read_at(6, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
        s.flush().unwrap();
    }

    #[test]
    fn storage_is_shareable_between_threads() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0; 64]));
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || s.write_at(u64::from(i) * 16, &[i + 1; 16]).unwrap())
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut b = [0u8; 64];
        s.read_at(0, &mut b).unwrap();
        for i in 0..4 {
            assert!(b[i * 16..(i + 1) * 16].iter().all(|&x| x == i as u8 + 1));
        }
    }
}
