//! The conversion's threads: workers take jobs in guest order, read and judge them (and
//! compress clusters for a compressed target); the calling thread applies the results to the
//! target in guest order and reports progress.
//!
//! Memory is bounded by a pool of chunk buffers. A worker takes a buffer *before* it takes a
//! job, so the oldest job not yet applied always holds one, and the ordered write-back can
//! always go on (a worker that took a job first and then waited for a buffer could wait behind
//! later jobs parked in the reorder queue, which only the oldest job would free).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Condvar, Mutex};

use super::source::{Holds, Segment, Source};
use super::sparse::{self, Run};
use super::target::Target;
use super::{ConvertOptions, ConvertStats};
use crate::format::GuestOffset;
use crate::image::{Image, ImageError, Reservation};

/// Guest bytes read per job: chunks start at multiples of it, so they are whole clusters of
/// any qcow2 target (clusters are at most 2 MiB).
pub(super) const CHUNK: u64 = 2 << 20;

/// Zeros are judged in pieces of this size in raw targets (a file system block).
const RAW_ZERO_GRANULE: u64 = 4096;

/// One job: a range of the source and what to do with it.
#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    start: u64,
    len: u64,
    holds: Holds,
}

/// A job done by a worker, ready to be applied to the target.
struct Done {
    job: Job,
    /// The bytes read (for data jobs); its first `job.len` bytes are the range.
    buf: Option<Vec<u8>>,
    runs: Vec<Run>,
    /// For a compressed target: per cluster of each data run, in order, its compressed bytes
    /// (`None`: it did not shrink).
    packed: Vec<Option<Vec<u8>>>,
    /// Already written to the target by the worker (raw targets: positioned writes to
    /// distinct ranges need no order), with what that did.
    applied: Option<ConvertStats>,
}

/// Cuts the source into jobs, in guest order.
struct Planner<'a> {
    source: &'a Source<'a>,
    size: u64,
    /// Where the next job starts.
    pos: u64,
    seq: u64,
    segments: VecDeque<Segment>,
    /// Only the source's top layers are copied ([`ConvertOptions::source_layers`]).
    layers: Option<u32>,
    /// The source cannot read what its top layers leave below
    /// ([`ConvertOptions::below_unreadable`]): a data job never takes in backing bytes.
    below_unreadable: bool,
    /// Ranges of zeros are copied as data (`-S 0`).
    copy_zeros: bool,
    /// Data jobs cover whole granules of the target.
    granule: u64,
}

impl Planner<'_> {
    /// The segment holding `pos` (at or after the current job's start), cut to start at
    /// `pos`. Segments are dropped only as jobs are cut ([`Planner::next`]), so looking ahead
    /// never loses what the next job needs.
    fn segment_at(&mut self, pos: u64) -> Result<Segment, ImageError> {
        loop {
            if let Some(s) = self.segments.iter().find(|s| s.start + s.len > pos) {
                let mut s = *s;
                s.len -= pos - s.start;
                s.start = pos;
                if self.copy_zeros && s.holds == Holds::Zero {
                    s.holds = Holds::Data;
                }
                return Ok(s);
            }
            let from = self.segments.back().map_or(pos, |s| s.start + s.len);
            let more = self
                .source
                .segments(from, self.layers)
                .map_err(|e| e.in_file(&self.source.name()))?;
            if more.is_empty() || more[0].start != from || more.iter().any(|s| s.len == 0) {
                return Err(ImageError::Corruption(format!(
                    "the guest map of {} breaks off at {from}",
                    self.source.name()
                )));
            }
            self.segments.extend(more);
        }
    }

    /// Where the run of segments from `start` that hold what the segment at `start` holds
    /// ends, looking no further than `limit`.
    fn run_end(&mut self, start: u64, limit: u64) -> Result<u64, ImageError> {
        let holds = self.segment_at(start)?.holds;
        let mut end = start;
        while end < limit {
            let s = self.segment_at(end)?;
            if s.holds != holds {
                break;
            }
            end = (s.start + s.len).min(limit);
        }
        Ok(end)
    }

    /// The next job: a range of zeros or of backing data left out, whole granules of the
    /// target at a time (to the end of its run), or a range of data up to the end of its
    /// chunk, which takes in the bits of zeros and backing ranges too short to leave out.
    fn next(&mut self) -> Result<Option<Job>, ImageError> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let (pos, size, g) = (self.pos, self.size, self.granule);
        let align_down = |x: u64| if x == size { x } else { x / g * g };
        let first = self.segment_at(pos)?;
        let (end, holds) = match first.holds {
            Holds::Data => (self.data_end(pos)?, Holds::Data),
            Holds::Backing if self.below_unreadable => (self.run_end(pos, size)?, Holds::Backing),
            other => {
                let end = align_down(self.run_end(pos, size)?);
                if end > pos && pos % g == 0 {
                    (end, other)
                } else {
                    (self.data_end(pos)?, Holds::Data)
                }
            }
        };
        let job = Job {
            seq: self.seq,
            start: pos,
            len: end - pos,
            holds,
        };
        self.seq += 1;
        self.pos = end;
        while self
            .segments
            .front()
            .is_some_and(|s| s.start + s.len <= end)
        {
            self.segments.pop_front();
        }
        Ok(Some(job))
    }

    /// The end of a data job from `pos`: the end of its chunk, or the first granule boundary
    /// from which a run of zeros or backing data covers at least one whole granule.
    fn data_end(&mut self, pos: u64) -> Result<u64, ImageError> {
        let (size, g) = (self.size, self.granule);
        let chunk_end = ((pos / CHUNK + 1) * CHUNK).min(size);
        let mut end = pos;
        while end < chunk_end {
            let holds = self.segment_at(end)?.holds;
            if holds == Holds::Data {
                end = self.run_end(end, chunk_end)?;
                continue;
            }
            if holds == Holds::Backing && self.below_unreadable {
                return Ok(end);
            }
            let whole_from = end.div_ceil(g) * g;
            let limit = whole_from.saturating_add(g).min(size);
            let e = self.run_end(end, limit)?;
            let whole_to = if e == size { e } else { e / g * g };
            if whole_to > whole_from && whole_from > pos {
                return Ok(whole_from.min(chunk_end));
            }
            end = e.min(chunk_end);
        }
        Ok(end)
    }
}

/// A pool of chunk buffers, taken and given back.
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    ready: Condvar,
}

impl Pool {
    fn new(count: usize) -> Self {
        Pool {
            free: Mutex::new((0..count).map(|_| Vec::new()).collect()),
            ready: Condvar::new(),
        }
    }

    /// A buffer, waiting for one; `None` once `stop` is set.
    fn take(&self, stop: &AtomicBool) -> Option<Vec<u8>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            if let Some(b) = free.pop() {
                return Some(b);
            }
            free = self.ready.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give(&self, buf: Vec<u8>) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf);
        self.ready.notify_one();
    }

    fn wake_all(&self) {
        let _guard = self.free.lock().unwrap_or_else(|e| e.into_inner());
        self.ready.notify_all();
    }
}

/// What a worker does with one job.
fn work(
    source: &Source<'_>,
    target: &Target<'_>,
    options: &ConvertOptions,
    job: Job,
    mut buf: Vec<u8>,
) -> Result<(Done, Option<Vec<u8>>), ImageError> {
    if job.holds != Holds::Data {
        let done = Done {
            job,
            buf: None,
            runs: Vec::new(),
            packed: Vec::new(),
            applied: None,
        };
        return Ok((done, Some(buf)));
    }
    let len = job.len as usize;
    if buf.len() < len {
        buf.resize(CHUNK as usize, 0);
    }
    source
        .read(job.start, &mut buf[..len])
        .map_err(|e| e.in_file(&source.name()))?;
    let granule = match target {
        Target::Image(_) => target.granule(),
        Target::Raw(_) => RAW_ZERO_GRANULE,
    };
    let runs = sparse::runs(&buf[..len], job.start, granule, options.min_sparse);
    let mut packed = Vec::new();
    if let (true, Some(image)) = (options.compress, target.compressor()) {
        let cs = image.geometry().cluster_size() as usize;
        for run in runs.iter().filter(|r| !r.zero) {
            for cluster in buf[run.at..run.at + run.len].chunks(cs) {
                packed.push(image.compress_cluster(cluster));
            }
        }
    }
    let mut done = Done {
        job,
        buf: Some(buf),
        runs,
        packed,
        applied: None,
    };
    if matches!(target, Target::Raw(_)) || (options.out_of_order && !options.compress) {
        // Chunks cover distinct guest ranges and whole clusters of the target, so their order
        // does not matter to a raw file, nor with out-of-order writes (`-W`, which lets the
        // host clusters of a qcow2 target interleave as qemu-img's do): the worker writes its
        // own chunk, and the copies into the page cache run on every core.
        let mut stats = ConvertStats::default();
        apply(target, options, &done, &mut stats)?;
        done.applied = Some(stats);
    }
    Ok((done, None))
}

/// Writes one done job to the target.
fn apply(
    target: &Target<'_>,
    options: &ConvertOptions,
    done: &Done,
    stats: &mut ConvertStats,
) -> Result<(), ImageError> {
    let job = done.job;
    let unmap = !options.target_has_backing;
    let named = |e: ImageError| e.in_file(&target.name());
    match job.holds {
        Holds::Backing => {}
        Holds::Zero => {
            if !options.target_is_zero {
                target
                    .write_zeroes(job.start, job.len, unmap)
                    .map_err(named)?;
                stats.zeroed += job.len;
            }
        }
        Holds::Data => {
            let buf = done.buf.as_deref().unwrap_or_default();
            stats.read += job.len;
            let mut packed = done.packed.iter();
            for run in &done.runs {
                let at = job.start + run.at as u64;
                let bytes = &buf[run.at..run.at + run.len];
                if run.zero {
                    if !options.target_is_zero {
                        target
                            .write_zeroes(at, run.len as u64, unmap)
                            .map_err(named)?;
                        stats.zeroed += run.len as u64;
                    }
                } else if options.compress {
                    let cs = target.granule() as usize;
                    for (i, cluster) in bytes.chunks(cs).enumerate() {
                        let p = packed.next().and_then(Option::as_deref);
                        let stored = target
                            .write_compressed(at + (i * cs) as u64, cluster, p)
                            .map_err(named)?;
                        stats.compressed_clusters += u64::from(stored);
                    }
                    stats.written += run.len as u64;
                } else {
                    target.write(at, bytes).map_err(named)?;
                    stats.written += run.len as u64;
                }
            }
        }
    }
    Ok(())
}

/// One piece of a chunk's write-back, planned by the calling thread in guest order.
enum Piece {
    /// Whole new clusters reserved in guest order (so that they lie one after another in the
    /// file, as qemu-img's do), copied from `at` in the chunk's buffer.
    Reserved(Reservation, usize),
    /// Bytes written the ordinary way (in place, or a partial cluster).
    Plain { at: usize, len: usize },
    /// A range made to read as zeros.
    Zero { at: usize, len: usize },
}

/// A chunk whose clusters are reserved, for a copy thread to write and commit.
struct Copy {
    done: Done,
    pieces: Vec<Piece>,
}

/// The calling thread's part of a qcow2 chunk (not compressed, in guest order): the new
/// clusters its data needs, reserved; the copying is left to the copy threads.
fn plan_copy(image: &Image, options: &ConvertOptions, done: Done) -> Result<Copy, ImageError> {
    let cs = image.geometry().cluster_size();
    let start = done.job.start;
    let mut pieces = Vec::new();
    for run in &done.runs {
        if run.zero {
            if !options.target_is_zero {
                pieces.push(Piece::Zero {
                    at: run.at,
                    len: run.len,
                });
            }
            continue;
        }
        let mut at = run.at;
        let end = run.at + run.len;
        while at < end {
            let pos = start + at as u64;
            let rest = (end - at) as u64;
            let reserved = if pos % cs == 0 && rest >= cs {
                image.reserve_run(GuestOffset(pos), rest)?
            } else {
                None
            };
            match reserved {
                Some(r) => {
                    let n = r.len(cs) as usize;
                    pieces.push(Piece::Reserved(r, at));
                    at += n;
                }
                None => {
                    pieces.push(Piece::Plain { at, len: end - at });
                    at = end;
                }
            }
        }
    }
    Ok(Copy { done, pieces })
}

/// A copy thread's part: the data written and the reservations committed. After an error
/// the remaining reservations are released.
fn copy(
    image: &Image,
    options: &ConvertOptions,
    job: Job,
    pieces: Vec<Piece>,
    buf: &[u8],
    stats: &mut ConvertStats,
) -> Result<(), ImageError> {
    let cs = image.geometry().cluster_size();
    let unmap = !options.target_has_backing;
    stats.read += job.len;
    let mut result = Ok(());
    for piece in pieces {
        if result.is_err() {
            if let Piece::Reserved(r, _) = piece {
                let _ = image.release_reserved(r);
            }
            continue;
        }
        result = match piece {
            Piece::Reserved(r, at) => {
                let bytes = &buf[at..at + r.len(cs) as usize];
                stats.written += bytes.len() as u64;
                match image.write_reserved(&r, bytes) {
                    Ok(()) => image.commit_reserved(r, bytes),
                    Err(e) => {
                        let _ = image.release_reserved(r);
                        Err(e)
                    }
                }
            }
            Piece::Plain { at, len } => {
                stats.written += len as u64;
                image.write_at(GuestOffset(job.start + at as u64), &buf[at..at + len])
            }
            Piece::Zero { at, len } => {
                stats.zeroed += len as u64;
                image.write_zeroes(GuestOffset(job.start + at as u64), len as u64, unmap)
            }
        };
    }
    result
}

/// Runs the conversion (see [`super::convert`]).
pub(super) fn run(
    source: &Source<'_>,
    target: &Target<'_>,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ConvertStats, ImageError> {
    let size = source.size();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = options.parallel.clamp(1, 16).min(cores);
    let granule = target.granule();
    let planner = Mutex::new(Planner {
        source,
        size,
        pos: 0,
        seq: 0,
        segments: VecDeque::new(),
        layers: options.source_layers,
        below_unreadable: options.below_unreadable,
        copy_zeros: options.min_sparse == 0,
        granule,
    });
    let pool = Pool::new(2 * workers + 2);
    let stop = AtomicBool::new(false);
    let mut stats = ConvertStats {
        total: size,
        ..ConvertStats::default()
    };
    if !progress(0, size) {
        return Err(ImageError::Cancelled);
    }
    // Copy threads, for a qcow2 target written in order: the calling thread reserves clusters
    // in guest order, they copy and commit. The channel is unbounded: the buffer pool bounds
    // the tasks in it.
    let copy_to = match target {
        Target::Image(image) if !options.compress && !options.out_of_order => Some(*image),
        _ => None,
    };
    let (copy_tx, copy_rx) = std::sync::mpsc::channel::<Copy>();
    let copy_rx = Mutex::new(copy_rx);
    let copied = Mutex::new((ConvertStats::default(), None::<ImageError>));
    let result = std::thread::scope(|scope| -> Result<(), ImageError> {
        let (tx, rx) = sync_channel::<Result<Done, ImageError>>(workers);
        let mut copy_tx = copy_to.map(|image| {
            for _ in 0..workers {
                let (copy_rx, copied, pool, stop) = (&copy_rx, &copied, &pool, &stop);
                scope.spawn(move || loop {
                    let task = copy_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(task) = task else { break };
                    let mut s = ConvertStats::default();
                    let (mut done, pieces) = (task.done, task.pieces);
                    let buf = done.buf.take();
                    let bytes = buf.as_deref().unwrap_or_default();
                    let r = copy(image, options, done.job, pieces, bytes, &mut s);
                    let mut c = copied.lock().unwrap_or_else(|e| e.into_inner());
                    c.0.add(&s);
                    if let Err(e) = r {
                        c.1.get_or_insert(e);
                        stop.store(true, Ordering::Release);
                        pool.wake_all();
                    }
                    drop(c);
                    if let Some(b) = buf {
                        pool.give(b);
                    }
                });
            }
            copy_tx
        });
        for _ in 0..workers {
            let tx = tx.clone();
            let (planner, pool, stop) = (&planner, &pool, &stop);
            scope.spawn(move || {
                while let Some(buf) = pool.take(stop) {
                    let job = planner.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let job = match job {
                        Ok(Some(job)) => job,
                        Ok(None) => {
                            pool.give(buf);
                            break;
                        }
                        Err(e) => {
                            pool.give(buf);
                            let _ = tx.send(Err(e));
                            break;
                        }
                    };
                    let sent = match work(source, target, options, job, buf) {
                        Ok((done, spare)) => {
                            if let Some(b) = spare {
                                pool.give(b);
                            }
                            tx.send(Ok(done))
                        }
                        Err(e) => tx.send(Err(e)),
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        let mut done_bytes = 0u64;
        let mut outcome = Ok(());
        'receive: for msg in rx.iter() {
            let done = match msg {
                Ok(done) => done,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            waiting.insert(done.job.seq, done);
            loop {
                let ready = if options.out_of_order {
                    waiting.pop_first().map(|(_, d)| d)
                } else {
                    waiting.remove(&next)
                };
                let Some(mut d) = ready else { break };
                next += 1;
                if stop.load(Ordering::Acquire) {
                    break 'receive; // a copy thread failed: its error is the outcome
                }
                let len = d.job.len;
                let applied = match (&copy_tx, copy_to) {
                    (Some(tx), Some(image))
                        if d.applied.is_none() && d.job.holds == Holds::Data =>
                    {
                        // The buffer goes with the task; the copy thread gives it back.
                        plan_copy(image, options, d).map(|task| {
                            let _ = tx.send(task);
                            ConvertStats::default()
                        })
                    }
                    _ => {
                        let s = match d.applied {
                            Some(s) => Ok(s),
                            None => {
                                let mut s = ConvertStats::default();
                                apply(target, options, &d, &mut s).map(|()| s)
                            }
                        };
                        if let Some(b) = d.buf.take() {
                            pool.give(b);
                        }
                        s
                    }
                };
                match applied {
                    Ok(s) => stats.add(&s),
                    Err(e) => {
                        outcome = Err(e);
                        break 'receive;
                    }
                }
                done_bytes += len;
                if !progress(done_bytes, size) {
                    outcome = Err(ImageError::Cancelled);
                    break 'receive;
                }
            }
        }
        // The copy threads finish what they were given, then stop.
        drop(copy_tx.take());
        // On an error the workers stop at their next buffer or send.
        stop.store(true, Ordering::Release);
        pool.wake_all();
        drop(rx);
        outcome
    });
    let (copy_stats, copy_error) = copied.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = copy_error {
        return Err(e);
    }
    result?;
    stats.add(&copy_stats);
    Ok(stats)
}
