//! One client connection: the negotiation (bounded by a deadline), then the transmission
//! phase. The connection's thread reads requests (and their payloads) in order and hands them
//! to a few worker threads, which carry them out on the shared image and write each reply as it
//! is ready, whole, under the socket's lock; replies may overtake one another, as NBD allows.
//!
//! Memory: the bytes of payloads and read buffers in flight are bounded per connection by a
//! budget ([`BUDGET`]); the reader waits for room before it reads a payload. A request never
//! needs more than the export's maximum payload (32 MiB), so one request always fits.
//!
//! When the client goes away without `NBD_CMD_DISC`, requests it sent that no worker has begun
//! are dropped: a dead connection's queued writes never land after a write another connection
//! made to the same bytes meanwhile. With `NBD_CMD_DISC`, or when the server stops, every
//! request already read is finished first.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::commands::{execute, Contexts};
use super::{Stream, WriteModes, POLL};
use crate::image::Image;
use crate::nbd::{
    parse_request, Command, Handshake, Negotiated, Parse, Request, ServerConfig, Session, Step,
};

/// Worker threads per connection.
const WORKERS: usize = 4;
/// Payload and read-buffer bytes in flight per connection.
const BUDGET: u64 = 64 << 20;
/// Bytes read from the socket at a time while parsing headers.
const READ_CHUNK: usize = 64 << 10;

/// What every connection of a server shares.
pub(super) struct Shared<'a> {
    pub(super) image: &'a Image,
    pub(super) config: &'a Arc<ServerConfig>,
    /// Set when the server stops.
    pub(super) stop: &'a AtomicBool,
    /// Set once a connection reaches the transmission phase.
    pub(super) served: &'a AtomicBool,
    pub(super) writes: WriteModes,
}

/// Serves one connection to its end.
pub(super) fn run(stream: Stream, shared: &Shared<'_>, handshake_timeout: Duration) {
    let Shared {
        image,
        config,
        stop,
        served,
        writes,
    } = *shared;
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut reader = stream;
    let mut writer = writer;
    if let Some(negotiated) = negotiate(&mut reader, &mut writer, config, handshake_timeout, stop) {
        served.store(true, Ordering::Release);
        let export = &config.exports()[negotiated.export];
        let session = Session::new(&negotiated, export);
        let contexts = Contexts::new(&negotiated, export);
        let conn = Connection {
            image,
            writes,
            session,
            contexts,
            writer: Mutex::new(writer),
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            budget: Mutex::new(0),
            room: Condvar::new(),
        };
        conn.transmission(&mut reader, negotiated.leftover, stop);
    }
    reader.shutdown();
}

/// The negotiation: the greeting, then every option answered, within `timeout` in all (and
/// given up when the server stops).
fn negotiate(
    reader: &mut Stream,
    writer: &mut Stream,
    config: &Arc<ServerConfig>,
    timeout: Duration,
    stop: &AtomicBool,
) -> Option<Negotiated> {
    let deadline = Instant::now() + timeout;
    let mut handshake = Handshake::new(Arc::clone(config));
    writer.write_all(&handshake.greeting()).ok()?;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        let wait = left.min(POLL).max(Duration::from_millis(1));
        reader.set_read_timeout(Some(wait)).ok()?;
        let step = match reader.read(&mut buf) {
            Ok(0) => handshake.eof(),
            Ok(n) => handshake.feed(&buf[..n]),
            // Look at the deadline and the stop flag again.
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        if !step.reply().is_empty() && writer.write_all(step.reply()).is_err() {
            return None;
        }
        match step {
            Step::Continue(_) => {}
            Step::Done { negotiated, .. } => return Some(negotiated),
            Step::Abort { .. } | Step::Close { .. } => return None,
        }
    }
}

/// Requests read and not yet begun, and how the reading ended.
#[derive(Default)]
struct Queue {
    work: VecDeque<Work>,
    /// No more requests will come.
    closed: bool,
    /// The client is gone without `NBD_CMD_DISC`: drop what was not begun.
    dead: bool,
}

/// One request to carry out, with its payload (writes) and its share of the budget.
struct Work {
    request: Request,
    payload: Vec<u8>,
    cost: u64,
}

/// The transmission phase of one connection.
struct Connection<'a> {
    image: &'a Image,
    writes: WriteModes,
    session: Session,
    contexts: Contexts,
    writer: Mutex<Stream>,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Bytes of the budget in use.
    budget: Mutex<u64>,
    room: Condvar,
}

/// How the request loop ended.
enum End {
    /// Disconnect requested, server stopping, or a protocol error: finish what was read.
    Finish,
    /// The client is gone: drop what was not begun.
    Dead,
}

impl Connection<'_> {
    fn transmission(&self, reader: &mut Stream, leftover: Vec<u8>, stop: &AtomicBool) {
        std::thread::scope(|scope| {
            for _ in 0..WORKERS {
                scope.spawn(|| self.worker());
            }
            let end = self.read_requests(reader, leftover, stop);
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.closed = true;
            if matches!(end, End::Dead) {
                q.dead = true;
                q.work.clear();
            }
            drop(q);
            self.ready.notify_all();
        });
    }

    /// Reads requests until the client disconnects or the server stops.
    fn read_requests(&self, reader: &mut Stream, leftover: Vec<u8>, stop: &AtomicBool) -> End {
        let mut input = leftover;
        if reader.set_read_timeout(Some(POLL)).is_err() {
            return End::Dead;
        }
        loop {
            if stop.load(Ordering::Acquire) {
                return End::Finish;
            }
            let parsed = match parse_request(&input, &self.session) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("qcow2ovl: serve: closing a connection: {e}");
                    return End::Finish;
                }
            };
            match parsed {
                Parse::Incomplete { needed } => {
                    let needed = needed.max(input.len() + 1);
                    match read_more(reader, &mut input, needed, stop) {
                        Ok(true) => {}
                        Ok(false) => return End::Dead,
                        Err(()) => return End::Finish,
                    }
                }
                Parse::Reject { reject, consumed } => {
                    input.drain(..consumed);
                    if !drain(reader, &mut input, reject.payload_to_drain, stop) {
                        return End::Dead;
                    }
                    let mut out = Vec::new();
                    let framing = self.session.framing();
                    framing.error_reply(&mut out, reject.reply_to(), reject.error, reject.message);
                    if !self.send(&out) {
                        return End::Dead;
                    }
                }
                Parse::Request { request, consumed } => {
                    input.drain(..consumed);
                    if matches!(request.command, Command::Disc) {
                        return End::Finish;
                    }
                    let (payload_len, cost) = match request.command {
                        Command::Write { length, .. } => (length as usize, u64::from(length)),
                        Command::Read { length, .. } => (0, u64::from(length)),
                        _ => (0, 0),
                    };
                    let cost = self.reserve(cost);
                    let mut payload = Vec::new();
                    if payload_len > 0 {
                        payload = vec![0u8; payload_len];
                        if !read_payload(reader, &mut input, &mut payload, stop) {
                            self.release(cost);
                            return End::Dead;
                        }
                    }
                    let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    q.work.push_back(Work {
                        request,
                        payload,
                        cost,
                    });
                    drop(q);
                    self.ready.notify_one();
                }
            }
        }
    }

    /// Carries out queued requests until the queue is closed and empty.
    fn worker(&self) {
        loop {
            let work = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(w) = q.work.pop_front() {
                        break Some(w);
                    }
                    if q.closed {
                        break None;
                    }
                    q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some(work) = work else {
                return;
            };
            let reply = execute(
                self.image,
                self.writes,
                &self.session,
                &self.contexts,
                &work.request,
                &work.payload,
            );
            drop(work.payload);
            self.release(work.cost);
            if !self.send(&reply) {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.dead = true;
                q.work.clear();
            }
        }
    }

    /// Writes one whole reply; `false` if the client is gone.
    fn send(&self, bytes: &[u8]) -> bool {
        if self.queue.lock().unwrap_or_else(|e| e.into_inner()).dead {
            return false;
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(bytes).is_ok()
    }

    /// Takes `want` bytes of the budget (all of it for a request larger than the budget),
    /// waiting for room; returns what was taken.
    fn reserve(&self, want: u64) -> u64 {
        let want = want.min(BUDGET);
        let mut used = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        while *used + want > BUDGET {
            used = self.room.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += want;
        want
    }

    fn release(&self, cost: u64) {
        let mut used = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(cost);
        drop(used);
        self.room.notify_all();
    }
}

/// Reads until `input` holds `needed` bytes. `Ok(false)`: the client is gone; `Err`: the
/// server is stopping.
fn read_more(
    reader: &mut Stream,
    input: &mut Vec<u8>,
    needed: usize,
    stop: &AtomicBool,
) -> Result<bool, ()> {
    let mut buf = [0u8; READ_CHUNK];
    while input.len() < needed {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => input.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {
                if stop.load(Ordering::Acquire) {
                    return Err(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

/// Fills `payload` from what was already read and then from the socket.
fn read_payload(
    reader: &mut Stream,
    input: &mut Vec<u8>,
    payload: &mut [u8],
    stop: &AtomicBool,
) -> bool {
    let have = input.len().min(payload.len());
    payload[..have].copy_from_slice(&input[..have]);
    input.drain(..have);
    let mut at = have;
    while at < payload.len() {
        match reader.read(&mut payload[at..]) {
            Ok(0) => return false,
            Ok(n) => at += n,
            // A client that stalls mid-payload is waited for, unless the server is stopping.
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                if stop.load(Ordering::Acquire) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Discards `len` payload bytes of a rejected request.
fn drain(reader: &mut Stream, input: &mut Vec<u8>, len: u64, stop: &AtomicBool) -> bool {
    let from_input = (input.len() as u64).min(len) as usize;
    input.drain(..from_input);
    let mut left = len - from_input as u64;
    let mut buf = [0u8; READ_CHUNK];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        match reader.read(&mut buf[..n]) {
            Ok(0) => return false,
            Ok(got) => left -= got as u64,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                if stop.load(Ordering::Acquire) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
