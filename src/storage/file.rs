//! [`FileStorage`]: positioned I/O over a file, opened by path (regular files and block devices
//! only, never blocking on a FIFO) or as a duplicate of a descriptor someone else owns.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{eof_error, read_only_error, CacheMode, Storage};

/// The error for a file that is neither a regular file nor a block device.
fn not_a_file_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file or block device ({what})"),
    )
}

/// A [`Storage`] over a file, using `pread`/`pwrite` (no shared cursor).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
    cache: CacheMode,
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
        Ok(FileStorage {
            file,
            writable,
            cache: CacheMode::default(),
        })
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
            cache: CacheMode::default(),
        })
    }

    /// Wraps an already open file; `writable` must match how it was opened.
    pub fn from_file(file: File, writable: bool) -> Self {
        FileStorage {
            file,
            writable,
            cache: CacheMode::default(),
        }
    }

    /// The same storage, with writes made durable as `cache` says.
    pub fn with_cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole punched where the file system
    /// can, zeros written where it cannot. The length of the file does not change.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.punch_hole(offset, len) {
            Ok(()) if self.cache == CacheMode::Writethrough => return self.file.sync_data(),
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(e),
            Err(_) => {}
        }
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = STEP.min(len - done) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Punches a hole over `[offset, offset + len)`, keeping the file's length; `EOPNOTSUPP`
    /// where the file system cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an open descriptor has no memory effects.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, at, n) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
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
        self.file.write_all_at(buf, offset)?;
        if self.cache == CacheMode::Writethrough {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable || self.cache == CacheMode::Unsafe {
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

    /// A hole punched where the file system can; no barrier (nothing depends on it).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
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
        Ok(FileStorage {
            file,
            writable,
            cache: CacheMode::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::exercise;
    use crate::storage::MemStorage;

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
        // A discarded range reads as zeros (a hole, or the old bytes where holes cannot be
        // punched: then the error says so); the length stays.
        f.write_at(1 << 20, &[3u8; 1 << 16]).unwrap();
        match f.discard(1 << 20, 1 << 16) {
            Ok(()) => {
                let mut back = vec![1u8; 1 << 16];
                f.read_at(1 << 20, &mut back).unwrap();
                assert!(back.iter().all(|&b| b == 0));
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP)),
        }
        assert_eq!(f.len().unwrap(), 8 << 20);
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
}
