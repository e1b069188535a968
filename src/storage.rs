//! Positioned I/O over an image file or an in-memory buffer.
//!
//! Everything above this layer reads and writes through [`Storage`], which has no cursor:
//! every call names its offset, so one handle can be shared between threads (`&self` methods,
//! `Send + Sync`). Implementations: [`FileStorage`] for real images, [`MemStorage`] for
//! tests and in-memory images, and (in test builds only) `FaultyStorage`, which wraps another
//! storage and fails chosen operations so that tests can check what an I/O error in the
//! middle of an update leaves on disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(test)]
use std::sync::Mutex;
use std::sync::RwLock;

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

    /// Bytes the storage really holds (a sparse file's allocated blocks); the length by default.
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }
}

/// The error for a file that is neither a regular file nor a block device.
fn not_a_file_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file or block device ({what})"),
    )
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

/// A [`Storage`] over a file, using `pread`/`pwrite` (no shared cursor).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
}

impl FileStorage {
    /// Opens `path` read-only.
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open(path, false)
    }

    #[cfg(test)]
    /// Opens an existing `path` for reading and writing.
    pub fn open_read_write(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open(path, true)
    }

    /// Opens an existing `path`, writable or not. Only regular files and block devices are
    /// accepted: a directory is `EISDIR`, a FIFO, socket or character device (`/dev/zero`) is
    /// refused without blocking (the open itself is non-blocking, so a FIFO with no writer
    /// cannot hang it).
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let kind = file.metadata()?.file_type();
        if kind.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if !kind.is_file() && !kind.is_block_device() {
            let what = if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "a character device"
            };
            return Err(not_a_file_error(what));
        }
        Ok(FileStorage { file, writable })
    }

    /// Creates (or, with `overwrite`, truncates) `path` for reading and writing. Without
    /// `overwrite` an existing file is an error of kind `AlreadyExists`.
    pub fn create(path: impl AsRef<Path>, overwrite: bool) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if overwrite {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        Ok(FileStorage {
            file: options.open(path)?,
            writable: true,
        })
    }

    /// Wraps an already open file; `writable` must match how it was opened.
    pub fn from_file(file: File, writable: bool) -> Self {
        FileStorage { file, writable }
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The open file (for locks on its open file description).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // No file can extend past 2^63 - 1; the kernel would say EINVAL, but it is an EOF.
        let end = offset.checked_add(buf.len() as u64);
        if end.map_or(true, |end| end > i64::MAX as u64) {
            return Err(eof_error(offset, buf.len(), self.len()?));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                eof_error(offset, buf.len(), size)
            } else {
                e
            }
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // A block device reports length 0 in its metadata; its end is where a seek lands.
        // SAFETY: lseek on an open descriptor has no memory effects; reads use pread, so moving
        // the descriptor's cursor affects nothing.
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        u64::try_from(end).map_err(|_| io::Error::last_os_error())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        self.file.set_len(len)
    }

    fn read_padded(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // One pread in the common case; a short read means the end of the file, and the rest
        // reads as zeros.
        let mut done = 0;
        while done < buf.len() {
            let at = match offset.checked_add(done as u64) {
                Some(at) if at <= i64::MAX as u64 => at,
                _ => break,
            };
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let Ok(at) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek has no memory effects, and no reader depends on the cursor (pread).
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data at or after `offset`.
                Some(libc::ENXIO) => Ok(None),
                // The file system cannot tell: everything is data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    let len = self.len()?;
                    Ok((offset < len).then_some((offset, len)))
                }
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < start {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((start as u64, end as u64)))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        if !meta.file_type().is_file() {
            return self.len();
        }
        Ok(meta.blocks().saturating_mul(512))
    }
}

impl FileStorage {
    /// Storage over a close-on-exec duplicate of `fd` (a descriptor someone else owns, such as
    /// a Python file object's `fileno()`): it shares the descriptor's open file description
    /// (access mode, flags) but not its use of the cursor, since reads and writes are
    /// positioned. Only regular files and block devices are accepted; `writable` needs a
    /// descriptor open for writing and not in append mode (where every `pwrite` lands at the
    /// end of the file).
    pub fn duplicate_fd(fd: std::os::fd::BorrowedFd<'_>, writable: bool) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let file = File::from(fd.try_clone_to_owned()?);
        let kind = file.metadata()?.file_type();
        if kind.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if !kind.is_file() && !kind.is_block_device() {
            return Err(not_a_file_error("the descriptor"));
        }
        if writable {
            // SAFETY: F_GETFL on a descriptor we own has no memory effects.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "writing needs a descriptor open for writing (a file object in mode 'r+b')",
                ));
            }
            if flags & libc::O_APPEND != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "writing cannot use a descriptor in append mode: every write would land at \
                     the end",
                ));
            }
        }
        Ok(FileStorage { file, writable })
    }
}

/// An in-memory [`Storage`] for tests: a growable byte vector behind a lock.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    writable: bool,
}

impl MemStorage {
    /// A writable storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(bytes),
            writable: true,
        }
    }

    /// A read-only storage holding `bytes`; writes fail like on a read-only file.
    pub fn new_read_only(bytes: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(bytes),
            writable: false,
        }
    }

    /// The contents, consuming the storage.
    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Converts a `u64` position to `usize` for in-memory indexing.
fn mem_index(n: u64) -> io::Result<usize> {
    usize::try_from(n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large for memory"))
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let src = mem_index(offset)
            .ok()
            .and_then(|start| data.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| eof_error(offset, buf.len(), data.len() as u64))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        let start = mem_index(offset)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write end overflows"))?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if data.len() < end {
            data.resize(end, 0);
        }
        if let Some(dst) = data.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        let len = mem_index(len)?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
/// The kinds of [`Storage`] operation a [`FaultyStorage`] counts and can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageOp {
    /// [`Storage::read_at`].
    Read,
    /// [`Storage::write_at`].
    Write,
    /// [`Storage::flush`].
    Flush,
    /// [`Storage::set_len`].
    SetLen,
}

#[cfg(test)]
impl StorageOp {
    /// Index into the per-operation counters.
    fn index(self) -> usize {
        match self {
            StorageOp::Read => 0,
            StorageOp::Write => 1,
            StorageOp::Flush => 2,
            StorageOp::SetLen => 3,
        }
    }
}

#[cfg(test)]
/// One planned failure: the `nth` call (1-based) of `op`, and every later one if `persistent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    op: StorageOp,
    nth: u64,
    persistent: bool,
}

#[cfg(test)]
/// A [`Storage`] wrapper that fails chosen operations with an I/O error, for tests.
///
/// Calls are counted per [`StorageOp`] from 1. A failed call does nothing to the inner
/// storage (a failed write writes no byte), which models a request that never reached the
/// disk. `len` is never failed.
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    counts: [AtomicU64; 4],
    faults: Mutex<Vec<Fault>>,
}

#[cfg(test)]
impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner` with no faults planned.
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            counts: Default::default(),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Fails only the `nth` call (1-based, counting calls made so far) of `op`.
    pub fn fail_nth(&self, op: StorageOp, nth: u64) {
        self.plan(op, nth, false);
    }

    /// Fails the `nth` call of `op` and every call after it.
    pub fn fail_from(&self, op: StorageOp, nth: u64) {
        self.plan(op, nth, true);
    }

    /// Fails the next call of `op` (relative to calls made so far).
    pub fn fail_next(&self, op: StorageOp) {
        self.fail_nth(op, self.count(op) + 1);
    }

    /// Removes every planned fault.
    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Calls of `op` so far, failed ones included.
    pub fn count(&self, op: StorageOp) -> u64 {
        self.counts[op.index()].load(Ordering::SeqCst)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the storage.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Records a planned fault.
    fn plan(&self, op: StorageOp, nth: u64, persistent: bool) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Fault {
                op,
                nth,
                persistent,
            });
    }

    /// Counts a call of `op` and returns the injected error if it is planned to fail.
    fn tick(&self, op: StorageOp) -> io::Result<()> {
        let n = self.counts[op.index()].fetch_add(1, Ordering::SeqCst) + 1;
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let hit = faults
            .iter()
            .any(|f| f.op == op && (f.nth == n || (f.persistent && n >= f.nth)));
        if hit {
            Err(io::Error::other(format!(
                "injected I/O error on {op:?} #{n}"
            )))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.tick(StorageOp::Read)?;
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.tick(StorageOp::Write)?;
        self.inner.write_at(offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.tick(StorageOp::Flush)?;
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.tick(StorageOp::SetLen)?;
        self.inner.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Checks the behaviour every implementation must share.
    fn exercise(s: &dyn Storage) {
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
    fn mem_storage() {
        let s = MemStorage::new(vec![1, 2, 3]);
        exercise(&s);
        s.write_at(0, &[7]).unwrap();
        assert_eq!(s.snapshot()[0], 7);
        assert_eq!(s.into_inner().len(), 10);
    }

    #[test]
    fn mem_storage_read_only() {
        let s = MemStorage::new_read_only(vec![1, 2, 3]);
        assert_eq!(
            s.write_at(0, &[0]).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(s.set_len(0).is_err());
        let mut b = [0u8; 3];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }

    #[test]
    fn file_storage() {
        let path = std::env::temp_dir().join(format!("qcow2ovl-storage-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        {
            let ro = FileStorage::open_read_only(&path).unwrap();
            assert!(!ro.is_writable());
            let mut b = [0u8; 5];
            ro.read_at(0, &mut b).unwrap();
            assert_eq!(&b, b"hello");
            assert_eq!(
                ro.write_at(0, b"x").unwrap_err().kind(),
                io::ErrorKind::PermissionDenied
            );
            let err = ro.read_at(3, &mut [0u8; 3]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
        {
            let rw = FileStorage::open_read_write(&path).unwrap();
            exercise(&rw);
        }
        std::fs::remove_file(&path).unwrap();
        assert!(FileStorage::open_read_only(&path).is_err());
    }

    #[test]
    fn padded_reads_and_data_ranges() {
        let path = std::env::temp_dir().join(format!("qcow2ovl-sparse-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let f = FileStorage::create(&path, false).unwrap();
        assert_eq!(
            FileStorage::create(&path, false).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        f.set_len(8 << 20).unwrap();
        f.write_at(4 << 20, &[7u8; 4096]).unwrap();
        let mut buf = [1u8; 16];
        f.read_padded((8 << 20) - 8, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
        // The hole before the data is skipped (file systems without SEEK_DATA report it all).
        let (start, end) = f.next_data(0).unwrap().unwrap();
        assert!(start <= 4 << 20 && end >= (4 << 20) + 4096, "{start} {end}");
        assert_eq!(f.next_data(9 << 20).unwrap(), None);
        assert!(f.allocated_bytes().unwrap() <= 8 << 20);
        let m = MemStorage::new(vec![5; 10]);
        let mut buf = [1u8; 6];
        m.read_padded(7, &mut buf).unwrap();
        assert_eq!(buf, [5, 5, 5, 0, 0, 0]);
        assert_eq!(m.next_data(3).unwrap(), Some((3, 10)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn duplicated_descriptors_check_type_and_mode() {
        use std::os::fd::AsFd;
        let path = std::env::temp_dir().join(format!("qcow2ovl-dup-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let ro = File::open(&path).unwrap();
        let s = FileStorage::duplicate_fd(ro.as_fd(), false).unwrap();
        drop(ro);
        let mut b = [0u8; 5];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        let ro = File::open(&path).unwrap();
        let err = FileStorage::duplicate_fd(ro.as_fd(), true).unwrap_err();
        assert!(err.to_string().contains("open for writing"), "{err}");
        let append = OpenOptions::new().append(true).open(&path).unwrap();
        let err = FileStorage::duplicate_fd(append.as_fd(), true).unwrap_err();
        assert!(err.to_string().contains("append mode"), "{err}");
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let s = FileStorage::duplicate_fd(rw.as_fd(), true).unwrap();
        s.write_at(0, b"J").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"Jello");
        let dir = File::open(std::env::temp_dir()).unwrap();
        let err = FileStorage::duplicate_fd(dir.as_fd(), false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn only_files_and_block_devices_open() {
        let dir = std::env::temp_dir();
        let err = FileStorage::open(&dir, false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
        let err = FileStorage::open("/dev/zero", false).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
    }

    #[test]
    fn faulty_storage_fails_planned_calls_only() {
        let s = FaultyStorage::new(MemStorage::new(vec![0; 16]));
        s.fail_nth(StorageOp::Write, 2);
        s.write_at(0, &[1]).unwrap();
        let err = s.write_at(1, &[2]).unwrap_err();
        assert!(err.to_string().contains("Write #2"));
        s.write_at(2, &[3]).unwrap();
        // The failed write changed nothing.
        assert_eq!(&s.inner().snapshot()[..3], &[1, 0, 3]);
        assert_eq!(s.count(StorageOp::Write), 3);

        s.fail_from(StorageOp::Flush, 1);
        assert!(s.flush().is_err());
        assert!(s.flush().is_err());
        s.clear_faults();
        s.flush().unwrap();

        s.fail_next(StorageOp::Read);
        assert!(s.read_at(0, &mut [0u8; 1]).is_err());
        s.read_at(0, &mut [0u8; 1]).unwrap();

        s.fail_next(StorageOp::SetLen);
        assert!(s.set_len(1).is_err());
        assert_eq!(s.len().unwrap(), 16);
        exercise(&s);
        assert_eq!(s.into_inner().into_inner().len(), 10);
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
