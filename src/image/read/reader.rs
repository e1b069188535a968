//! A second reader thread that lives as long as the process, for long runs of guest data.
//!
//! Reading from the page cache is a memory copy, and one core does not reach the memory
//! bandwidth two do, so a long run is split: this thread reads one half while the caller reads
//! the other. Spawning a thread per read costs tens of microseconds, a good part of the ~140 µs
//! a 1 MiB copy takes; waking a parked thread costs a few. So the helper is started once and
//! waits for work.
//!
//! It is used only when it is idle (otherwise the caller reads the whole run itself: a read
//! never waits behind another one), and never in a process forked after it started (the
//! thread does not exist there).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::storage::Storage;

/// Runs at least this long are split between the caller and the helper.
pub(crate) const SPLIT_AT: usize = 512 << 10;

/// One half-read handed to the helper.
struct Job {
    storage: Arc<dyn Storage>,
    host: u64,
    /// The caller's buffer half. Valid until `done` is signalled: the caller waits for that
    /// before the borrow it came from ends, also when unwinding (see [`Wait`]).
    out: *mut u8,
    len: usize,
    done: Arc<Done>,
}

// SAFETY: `out` is only written by the helper while the caller blocks in `Wait` on the same
// job; no one else touches that half of the buffer meanwhile.
unsafe impl Send for Job {}

/// A job's result, and the signal that the helper no longer touches the buffer.
#[derive(Default)]
struct Done {
    result: Mutex<Option<std::io::Result<()>>>,
    signal: Condvar,
}

/// The helper: its job queue, the process it was started in, and whether it is busy.
struct Helper {
    jobs: Mutex<Sender<Job>>,
    pid: u32,
    busy: AtomicBool,
}

static HELPER: OnceLock<Option<Helper>> = OnceLock::new();

fn helper() -> Option<&'static Helper> {
    HELPER
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("qcow2ovl-reader".into())
                .spawn(move || {
                    for job in rx {
                        // SAFETY: see `Job::out`.
                        let out = unsafe { std::slice::from_raw_parts_mut(job.out, job.len) };
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job.storage.read_padded(job.host, out)
                        }))
                        .unwrap_or_else(|_| Err(std::io::Error::other("reader thread panicked")));
                        if let Some(h) = HELPER.get().and_then(Option::as_ref) {
                            h.busy.store(false, Ordering::Release);
                        }
                        let mut slot = job.done.result.lock().unwrap_or_else(|e| e.into_inner());
                        *slot = Some(r);
                        job.done.signal.notify_one();
                    }
                });
            spawned.ok().map(|_| Helper {
                jobs: Mutex::new(tx),
                pid: std::process::id(),
                busy: AtomicBool::new(false),
            })
        })
        .as_ref()
        .filter(|h| h.pid == std::process::id())
}

/// Waits for a job handed to the helper, also while unwinding, so that the buffer outlives the
/// helper's use of it.
struct Wait(Arc<Done>);

impl Wait {
    fn result(&self) -> std::io::Result<()> {
        let mut slot = self.0.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = slot.take() {
                // Leave a marker so that `drop` does not wait again.
                *slot = Some(Ok(()));
                return r;
            }
            slot = self.0.signal.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let mut slot = self.0.result.lock().unwrap_or_else(|e| e.into_inner());
        while slot.is_none() {
            slot = self.0.signal.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Reads `out.len()` bytes at `host`: a long run split with the helper when it is idle, else
/// in one read.
pub(in crate::image) fn read_run(
    storage: &Arc<dyn Storage>,
    host: u64,
    out: &mut [u8],
) -> std::io::Result<()> {
    if out.len() < SPLIT_AT {
        return storage.read_padded(host, out);
    }
    let Some(h) = helper() else {
        return storage.read_padded(host, out);
    };
    if h.busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return storage.read_padded(host, out);
    }
    let half = out.len() / 2 / 4096 * 4096;
    let (first, second) = out.split_at_mut(half);
    let done = Arc::new(Done::default());
    let job = Job {
        storage: Arc::clone(storage),
        host: host + half as u64,
        out: second.as_mut_ptr(),
        len: second.len(),
        done: Arc::clone(&done),
    };
    let sent = h
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .is_ok();
    if !sent {
        h.busy.store(false, Ordering::Release);
        return storage.read_padded(host, out);
    }
    let wait = Wait(done);
    let mine = storage.read_padded(host, first);
    let theirs = wait.result();
    mine.and(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn long_runs_read_the_same_split_or_not() {
        let bytes: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.clone()));
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let st = Arc::clone(&st);
            let expect = bytes.clone();
            handles.push(std::thread::spawn(move || {
                for k in 0..20u64 {
                    let at = (t * 4099 + k * 65537) % (1 << 20);
                    let mut out = vec![0u8; (1 << 20) + 17];
                    read_run(&st, at, &mut out).unwrap();
                    assert_eq!(out[..], expect[at as usize..at as usize + out.len()]);
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    }
}
