//! [`MemStorage`]: an in-memory storage (a growable byte vector behind a lock), writable or
//! read-only, for tests and in-memory images.

use std::io;
use std::sync::RwLock;

use super::{eof_error, read_only_error, Storage};

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

    /// Zeros over the part of the range inside the storage, as a punched hole reads.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let size = data.len() as u64;
        let (start, end) = (offset.min(size), offset.saturating_add(len).min(size));
        data[start as usize..end as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::exercise;

    #[test]
    fn mem_storage() {
        let s = MemStorage::new(vec![1, 2, 3]);
        exercise(&s);
        s.write_at(0, &[7]).unwrap();
        assert_eq!(s.snapshot()[0], 7);
        s.write_at(0, &[9; 10]).unwrap();
        s.discard(2, 3).unwrap();
        s.discard(8, u64::MAX).unwrap();
        assert_eq!(s.snapshot(), [9, 9, 0, 0, 0, 9, 9, 9, 0, 0]);
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
}
