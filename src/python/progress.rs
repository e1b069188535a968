//! Progress callbacks from code running without the GIL.

use pyo3::prelude::*;

/// Calls a Python `progress(done, total)` callback from code that runs with the GIL released,
/// looking at signals (Ctrl-C) each time: the first exception, the callback's or a signal's,
/// is kept for [`Reporter::finish`] and the work is told to stop (the call returns `false`).
pub(crate) struct Reporter {
    callback: Option<Py<PyAny>>,
    failed: Option<PyErr>,
}

impl Reporter {
    /// A reporter calling `callback` (signals only when `None`).
    pub(crate) fn new(callback: Option<Py<PyAny>>) -> Self {
        Reporter {
            callback,
            failed: None,
        }
    }

    /// Reports `done` of `total`; `false` when the work must stop.
    pub(crate) fn report(&mut self, done: u64, total: u64) -> bool {
        let outcome = Python::attach(|py| {
            py.check_signals()?;
            match &self.callback {
                Some(cb) => cb.call1(py, (done, total)).map(drop),
                None => Ok(()),
            }
        });
        match outcome {
            Ok(()) => true,
            Err(e) => {
                self.failed = Some(e);
                false
            }
        }
    }

    /// The exception that stopped the work, if one did: it is what the caller raises.
    pub(crate) fn finish(self) -> Option<PyErr> {
        self.failed
    }
}
