//! `EventFd`: kick, call and error notifications between the two sides.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use pyo3::prelude::*;

use crate::convert::U64;
use vhost_core::sys::eventfd::EventFd as CoreEventFd;

use crate::errors::IntoPyResult;
use crate::fd::{closing_pymethods, Closable};
use crate::wait;

/// A Linux eventfd: the kick and call signals of a virtqueue, passed to peers by
/// SCM_RIGHTS.
#[pyclass(module = "vhost._core", name = "EventFd", frozen)]
pub struct PyEventFd {
    inner: Closable<CoreEventFd>,
}

impl PyEventFd {
    pub fn adopt(fd: OwnedFd) -> Self {
        PyEventFd {
            inner: Closable::new("EventFd", CoreEventFd::from_fd(fd)),
        }
    }

    fn get(&self) -> PyResult<Arc<CoreEventFd>> {
        self.inner.get()
    }
}

closing_pymethods!(PyEventFd, close() {
    #[new]
    #[pyo3(signature = (nonblock = false))]
    fn new(nonblock: bool) -> PyResult<Self> {
        Ok(PyEventFd {
            inner: Closable::new("EventFd", CoreEventFd::new(nonblock).py_err()?),
        })
    }

    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.get()?.as_raw_fd())
    }

    /// Adds `value` to the counter, waking a reader.
    #[pyo3(signature = (value = U64(1)), text_signature = "(self, value=1)")]
    fn write(&self, py: Python<'_>, value: U64) -> PyResult<()> {
        let value = value.0;
        let efd = self.get()?;
        py.detach(|| efd.write(value)).py_err()
    }

    /// Returns and clears the counter; blocks while it is zero unless non-blocking.
    /// Ctrl-C interrupts the wait and leaves the EventFd usable.
    fn read(&self, py: Python<'_>) -> PyResult<u64> {
        let efd = self.get()?;
        wait::call(py, || efd.read_wait())
    }

    /// Returns and clears the counter, or None at once when nothing was signalled; never
    /// blocks, whether the EventFd is blocking or not.
    fn try_read(&self) -> PyResult<Option<u64>> {
        self.get()?.try_read().py_err()
    }

    /// Waits until signalled or `timeout` seconds pass; True when signalled. Ctrl-C
    /// interrupts the wait.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let efd = self.get()?;
        let t = crate::convert::timeout("timeout", timeout)?;
        wait::call(py, || efd.wait(t))
    }

    fn close(&self) {
        self.inner.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed()
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(e) => format!("<EventFd {}>", e.as_raw_fd()),
            Err(_) => "<EventFd closed>".into(),
        }
    }
});
