//! `FaultyStorage` (test builds only): a wrapper that fails chosen operations with an I/O error,
//! so that tests can check what an error in the middle of an update leaves on disk.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::Storage;

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

/// One planned failure: the `nth` call (1-based) of `op`, and every later one if `persistent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    op: StorageOp,
    nth: u64,
    persistent: bool,
}

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

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::exercise;
    use crate::storage::MemStorage;

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
}
