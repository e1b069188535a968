//! `qcow2ovl serve`: an NBD server over one open image, every write through its guarded
//! engine. The protocol itself is [`crate::nbd`] (pure state machines); this module owns the
//! sockets and threads around it.
//!
//! One thread accepts connections (at most [`ServeOptions::shared`] at a time: past that it
//! stops accepting, as qemu-nbd does, and the kernel's backlog holds the rest); each connection
//! gets a thread that negotiates (within [`ServeOptions::handshake_timeout`]) and then reads
//! requests, which a few worker threads of that connection carry out against the one shared
//! [`Image`], replying as each finishes (out of order). Every connection shares the one engine,
//! so `CAN_MULTI_CONN` is honest: a FLUSH on any connection flushes every write that any of
//! them had replied to.
//!
//! The socket is bound here ([`Listen::Unix`], [`Listen::Tcp`]) or handed over
//! ([`Listen::Inherited`]: socket activation); `--fork`, the pid file and reading the
//! activation variables are the command line's (`python/qcow2ovl/_cli_serve.py`), before any
//! thread exists. [`WriteModes`] are qemu-nbd's `--discard` and `--detect-zeroes`.
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | options, the listening socket, the accept loop, shutdown |
//! | `connection.rs` | one connection: the handshake with its deadline, the request loop, its workers and memory budget |
//! | `commands.rs` | one request carried out on the image, and its reply |

mod commands;
mod connection;

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::image::Image;
use crate::nbd::wire::TransmissionFlags;
use crate::nbd::{BlockSizes, ConfigError, ExportConfig, ServerConfig};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (created; removed again when the server stops).
    Unix(PathBuf),
    /// TCP on this address and port.
    Tcp(String, u16),
    /// A listening socket the server was handed (systemd's socket activation: descriptor 3),
    /// Unix or TCP as it is. The server owns it from then on, and leaves a Unix socket's file
    /// where it is at exit (it did not make it).
    Inherited(RawFd),
}

/// What a client's `TRIM` does (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// Answered, and nothing is done (qemu-nbd's default); zero writes keep their clusters
    /// allocated.
    #[default]
    Ignore,
    /// Discarded as the engine's `discard` does; zero writes may free their clusters.
    Unmap,
}

/// What happens to a `WRITE` whose payload is all zeros (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as data (the default).
    #[default]
    Off,
    /// Made an engine zero write that keeps the clusters allocated.
    On,
    /// Made an engine zero write that may free them (only with [`Discard::Unmap`]).
    Unmap,
}

/// How writes are carried out: the export's discard and zero-detection modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteModes {
    /// `--discard`.
    pub discard: Discard,
    /// `--detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen.
    pub listen: Listen,
    /// The export's name (`-x`; default empty).
    pub export_name: String,
    /// Its description (`-D`).
    pub description: Option<String>,
    /// Connections served at once (`-e`; qemu-nbd's default is 1).
    pub shared: usize,
    /// Keep serving after the last client leaves (`-t`); otherwise the server stops then.
    pub persistent: bool,
    /// How long a client may take to negotiate (qemu-nbd: 10 s).
    pub handshake_timeout: Duration,
    /// Offer the `qemu:allocation-depth` context (`-A`); `base:allocation` is always offered.
    pub allocation_depth: bool,
    /// Offer the persistent bitmap of this name as `qemu:dirty-bitmap:NAME` (`-B`).
    pub bitmap: Option<String>,
    /// `--discard` and `--detect-zeroes`.
    pub writes: WriteModes,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: Listen::Tcp("127.0.0.1".into(), 10809),
            export_name: String::new(),
            description: None,
            shared: 1,
            persistent: false,
            handshake_timeout: Duration::from_secs(10),
            allocation_depth: false,
            bitmap: None,
            writes: WriteModes::default(),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The socket could not be made.
    #[error("Failed to bind socket to {what}: {}", strerror(source))]
    Bind {
        /// The address, as given.
        what: String,
        /// The system's error.
        source: io::Error,
    },
    /// An option out of range.
    #[error("{0}")]
    Invalid(String),
    /// The export could not be described to clients.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Accepting connections failed.
    #[error("accept: {0}")]
    Accept(io::Error),
    /// The inherited socket is not one the server can listen on (qemu-nbd's words).
    #[error("Failed to use socket activation: {0}")]
    Activation(String),
}

/// The system's words for `e`, without Rust's ` (os error N)`.
fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// A bound listening socket; a Unix one with the path to remove at exit (none when inherited).
enum Listener {
    Unix(UnixListener, Option<PathBuf>),
    Tcp(TcpListener),
}

/// One accepted connection's socket.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An NBD server over one image.
pub struct Server {
    image: Arc<Image>,
    config: Arc<ServerConfig>,
    listener: Listener,
    options: ServeOptions,
    stop: Arc<AtomicBool>,
}

/// How often the accept loop and idle connections look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The largest request payload (as qemu-nbd's).
const MAX_PAYLOAD: u32 = 32 << 20;

impl Server {
    /// Binds the socket for serving `image` (writable unless it was opened read-only).
    pub fn bind(image: Arc<Image>, options: ServeOptions) -> Result<Server, ServeError> {
        if options.shared == 0 {
            return Err(ServeError::Invalid(
                "Invalid shared device number '0'".into(),
            ));
        }
        if options.writes.detect_zeroes == DetectZeroes::Unmap
            && options.writes.discard != Discard::Unmap
        {
            return Err(ServeError::Invalid(
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap"
                    .into(),
            ));
        }
        let config = Arc::new(export_config(&image, &options)?);
        let listener = match &options.listen {
            Listen::Unix(path) => {
                let what = path.display().to_string();
                // A socket left by an earlier server is replaced, as QEMU replaces it; any
                // other file there is an error from bind.
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(|source| ServeError::Bind {
                    what: what.clone(),
                    source,
                })?;
                Listener::Unix(l, Some(path.clone()))
            }
            Listen::Tcp(addr, port) => {
                let what = format!("{addr}:{port}");
                let l = TcpListener::bind((addr.as_str(), *port))
                    .map_err(|source| ServeError::Bind { what, source })?;
                Listener::Tcp(l)
            }
            Listen::Inherited(fd) => inherited(*fd)?,
        };
        let nonblocking = match &listener {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(ServeError::Accept)?;
        Ok(Server {
            image,
            config,
            listener,
            options,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The TCP port listened on (the one the system chose for port 0), if TCP.
    pub fn port(&self) -> Option<u16> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    /// A flag that stops [`Server::serve`] when set (from any thread).
    pub fn stopper(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Serves until stopped: by the stop flag, by `poll` returning `false` (called every
    /// 100 ms, for signals), or, unless persistent, when the last client has gone. Stopping
    /// lets every connection finish the requests it has read, then flushes the image.
    pub fn serve(&self, poll: &mut dyn FnMut() -> bool) -> Result<(), ServeError> {
        let active = Arc::new(AtomicUsize::new(0));
        // A client reached the transmission phase (clients that only listed exports or gave
        // up negotiating do not count, as with qemu-nbd).
        let served = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let result = loop {
                if self.stop.load(Ordering::Acquire) || !poll() {
                    break Ok(());
                }
                let now = active.load(Ordering::Acquire);
                if !self.options.persistent && served.load(Ordering::Acquire) && now == 0 {
                    break Ok(());
                }
                if now >= self.options.shared {
                    std::thread::sleep(POLL / 4);
                    continue;
                }
                match self.accept() {
                    Ok(Some(stream)) => {
                        active.fetch_add(1, Ordering::AcqRel);
                        let active = Arc::clone(&active);
                        let (image, config, served) = (&self.image, &self.config, &served);
                        let (stop, timeout) = (&self.stop, self.options.handshake_timeout);
                        let writes = self.options.writes;
                        scope.spawn(move || {
                            let conn = connection::Shared {
                                image,
                                config,
                                stop,
                                served,
                                writes,
                            };
                            connection::run(stream, &conn, timeout);
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                    }
                    Ok(None) => std::thread::sleep(POLL / 4),
                    Err(e) => break Err(ServeError::Accept(e)),
                }
            };
            // Connections see the flag at their next read and finish what they have.
            self.stop.store(true, Ordering::Release);
            result
        });
        if let Listener::Unix(_, Some(path)) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
        if let Err(e) = self.image.flush() {
            eprintln!("qcow2ovl: serve: flush at exit: {e}");
        }
        result
    }

    fn accept(&self) -> io::Result<Option<Stream>> {
        let accepted = match &self.listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        match accepted {
            Ok(stream) => {
                match &stream {
                    Stream::Unix(s) => s.set_nonblocking(false)?,
                    Stream::Tcp(s) => s.set_nonblocking(false)?,
                }
                Ok(Some(stream))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            // A client that went away between connect and accept.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The listening socket at `fd`, checked as qemu-nbd checks an activated one (its peer, then
/// its own address), Unix or TCP by its family. It is taken over: closed with the server.
fn inherited(fd: RawFd) -> Result<Listener, ServeError> {
    // SAFETY: both calls write at most `len` bytes into the zeroed `sockaddr_storage` and
    // update `len`; an invalid descriptor only makes them fail.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    let mut len = size;
    if unsafe { libc::getpeername(fd, ptr, &mut len) } < 0 {
        let e = io::Error::last_os_error();
        // A listening socket has no peer.
        if e.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(ServeError::Activation(format!(
                "Unable to query remote socket address: {}",
                strerror(&e)
            )));
        }
    }
    len = size;
    if unsafe { libc::getsockname(fd, ptr, &mut len) } < 0 {
        let e = io::Error::last_os_error();
        return Err(ServeError::Activation(format!(
            "Unable to query local socket address: {}",
            strerror(&e)
        )));
    }
    // SAFETY: `fd` is an open socket (both queries succeeded), handed to the server to own.
    match i32::from(addr.ss_family) {
        libc::AF_UNIX => Ok(Listener::Unix(
            unsafe { UnixListener::from_raw_fd(fd) },
            None,
        )),
        libc::AF_INET | libc::AF_INET6 => {
            Ok(Listener::Tcp(unsafe { TcpListener::from_raw_fd(fd) }))
        }
        family => Err(ServeError::Activation(format!(
            "socket family {family} is neither Unix nor TCP"
        ))),
    }
}

/// What clients are told about the export.
fn export_config(image: &Image, options: &ServeOptions) -> Result<ServerConfig, ServeError> {
    let mut export = ExportConfig::new(options.export_name.clone(), image.virtual_size());
    export.description = options.description.clone();
    let mut flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_DF
        | TransmissionFlags::SEND_CACHE;
    // Honest with any number of connections (they share one engine); offered, as qemu-nbd
    // offers it, when more than one may connect.
    if options.shared > 1 {
        flags |= TransmissionFlags::CAN_MULTI_CONN;
    }
    if image.writable() {
        flags |= TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO;
    } else {
        flags |= TransmissionFlags::READ_ONLY;
    }
    export.flags = flags;
    // qemu-nbd's constraints for an image on a file without O_DIRECT.
    export.block_sizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: MAX_PAYLOAD,
    };
    export.meta_contexts = vec!["base:allocation".into()];
    if options.allocation_depth {
        export.meta_contexts.push("qemu:allocation-depth".into());
    }
    if let Some(name) = &options.bitmap {
        if !image.bitmap_list().iter().any(|(b, _)| &b.name == name) {
            return Err(ServeError::Invalid(format!("Bitmap '{name}' is not found")));
        }
        export
            .meta_contexts
            .push(format!("qemu:dirty-bitmap:{name}"));
    }
    // No default export: a client asking for "" gets an export named "-x" only if it is
    // that one (qemu-nbd's rule).
    Ok(ServerConfig::new(vec![export], None)?)
}
