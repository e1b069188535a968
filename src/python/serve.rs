//! `NbdServer`: `qcow2ovl serve`'s server for Python, serving an open `Image` without the GIL
//! (`qcow2ovl.serve` and the CLI give it its options and messages).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use super::image::PyImage;
use super::progress::Reporter;
use crate::serve::{DetectZeroes, Discard, Listen, ServeError, ServeOptions, Server, WriteModes};

/// An NBD server bound to its socket, serving one image.
#[pyclass(name = "NbdServer", module = "qcow2ovl._core")]
pub(crate) struct PyNbdServer {
    server: Server,
    stop: Arc<AtomicBool>,
}

#[pymethods]
impl PyNbdServer {
    /// Binds a Unix socket at `socket`, else TCP on `bind`:`port` (or takes over the listening
    /// socket `listen_fd`, as handed over by socket activation), for `image` (read-only unless
    /// the image was opened writable). `discard` is `"ignore"` or `"unmap"`, `detect_zeroes`
    /// `"off"`, `"on"` or `"unmap"` (qemu-nbd's modes).
    #[new]
    #[pyo3(signature = (
        image, *, socket = None, bind = "127.0.0.1", port = 10809, export_name = "",
        description = None, shared = 1, persistent = false, handshake_timeout = 10.0,
        allocation_depth = false, bitmap = None, discard = "ignore", detect_zeroes = "off",
        listen_fd = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        image: &PyImage,
        socket: Option<PathBuf>,
        bind: &str,
        port: u16,
        export_name: &str,
        description: Option<String>,
        shared: usize,
        persistent: bool,
        handshake_timeout: f64,
        allocation_depth: bool,
        bitmap: Option<String>,
        discard: &str,
        detect_zeroes: &str,
        listen_fd: Option<i32>,
    ) -> PyResult<Self> {
        let writes = WriteModes {
            discard: match discard {
                "ignore" => Discard::Ignore,
                "unmap" => Discard::Unmap,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "Invalid discard mode `{other}'"
                    )))
                }
            },
            detect_zeroes: match detect_zeroes {
                "off" => DetectZeroes::Off,
                "on" => DetectZeroes::On,
                "unmap" => DetectZeroes::Unmap,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "Failed to parse detect_zeroes mode: invalid parameter value: {other}"
                    )))
                }
            },
        };
        let options = ServeOptions {
            listen: match (listen_fd, socket) {
                (Some(fd), _) => Listen::Inherited(fd),
                (None, Some(path)) => Listen::Unix(path),
                (None, None) => Listen::Tcp(bind.to_owned(), port),
            },
            export_name: export_name.to_owned(),
            description,
            shared,
            persistent,
            handshake_timeout: Duration::try_from_secs_f64(handshake_timeout)
                .unwrap_or(Duration::from_secs(10)),
            allocation_depth,
            bitmap,
            writes,
        };
        let image = image.image()?;
        let server = py
            .detach(|| Server::bind(image, options))
            .map_err(|e| match e {
                // Options that do not fit together (or the image): the caller's mistake.
                ServeError::Invalid(_) | ServeError::Config(_) => {
                    PyValueError::new_err(e.to_string())
                }
                _ => PyOSError::new_err(e.to_string()),
            })?;
        let stop = server.stopper();
        Ok(Self { server, stop })
    }

    /// The TCP port listened on (`None` for a Unix socket).
    #[getter]
    fn port(&self) -> Option<u16> {
        self.server.port()
    }

    /// Serves until [`stop`](Self::stop), a signal's exception (raised here, after the
    /// connections finished what they had read and the image was flushed), or, unless
    /// persistent, the last client's departure.
    fn serve(&self, py: Python<'_>) -> PyResult<()> {
        let mut reporter = Reporter::new(None);
        let result = py.detach(|| self.server.serve(&mut || reporter.report(0, 0)));
        if let Some(e) = reporter.finish() {
            return Err(e);
        }
        result.map_err(|e| PyOSError::new_err(e.to_string()))
    }

    /// Asks a running [`serve`](Self::serve) to stop (from any thread).
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}
