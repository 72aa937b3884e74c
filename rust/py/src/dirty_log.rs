//! `DirtyLog` for Python: a handle on the core's mapped dirty-page bitmap
//! (`vhost_core::memory::dirty_log`). Converts arguments and errors, releases the GIL
//! around the scans; the layout, the checks and the atomics live in the core.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use pyo3::prelude::*;
use vhost_core::memory::dirty_log::{memory_end, DirtyLog, DirtyRange};

use crate::errors::log_error;
use crate::fd::{dup_of, Closable};
use crate::memory::PyGuestMemory;

/// `[start, end)` guest-physical addresses of one run of dirty pages.
type RangeTuple = (u64, u64);

/// The dirty-page bitmap of live migration (`vhost.dirty_log.DirtyLog` wraps it).
#[pyclass(module = "vhost._core", name = "DirtyLog", frozen)]
pub struct PyDirtyLog {
    log: Closable<DirtyLog>,
}

impl PyDirtyLog {
    fn new(log: DirtyLog) -> Self {
        Self {
            log: Closable::new("dirty log", log),
        }
    }

    /// The log, or `ClosedError`; the Arc keeps it mapped through a call that races a close.
    fn get(&self) -> PyResult<Arc<DirtyLog>> {
        self.log.get()
    }
}

fn tuples(it: impl Iterator<Item = DirtyRange>) -> Vec<RangeTuple> {
    it.map(|r| (r.start, r.end)).collect()
}

#[pymethods]
impl PyDirtyLog {
    /// A fresh log covering every address of `memory` (up to the end of its highest
    /// region), in a sealed memfd.
    #[staticmethod]
    fn allocate(py: Python<'_>, memory: &PyGuestMemory) -> PyResult<Self> {
        let guest_end = memory_end(&memory.snapshot());
        let log = py
            .detach(|| DirtyLog::allocate(guest_end))
            .map_err(log_error)?;
        Ok(Self::new(log))
    }

    /// Maps the log a front-end sent (`SET_LOG_BASE`), checked against `memory`; `fd`
    /// stays the caller's (a duplicate is mapped and closed again).
    #[staticmethod]
    #[pyo3(signature = (fd, mmap_size, mmap_offset, memory, require_sealed = false))]
    fn adopt(
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        mmap_size: u64,
        mmap_offset: u64,
        memory: &PyGuestMemory,
        require_sealed: bool,
    ) -> PyResult<Self> {
        let guest_end = memory_end(&memory.snapshot());
        let fd = dup_of(fd)?;
        let log = py
            .detach(|| DirtyLog::adopt(fd, mmap_size, mmap_offset, guest_end, require_sealed))
            .map_err(log_error)?;
        Ok(Self::new(log))
    }

    #[getter]
    fn size(&self) -> PyResult<u64> {
        Ok(self.get()?.size())
    }

    #[getter]
    fn mmap_offset(&self) -> PyResult<u64> {
        Ok(self.get()?.mmap_offset())
    }

    #[getter]
    fn covers(&self) -> PyResult<u64> {
        Ok(self.get()?.covers())
    }

    #[getter]
    fn address(&self) -> PyResult<u64> {
        Ok(self.get()?.as_ptr() as u64)
    }

    /// The memfd of an allocated log (`None` for an adopted one); owned by the log.
    fn fileno(&self) -> PyResult<Option<RawFd>> {
        Ok(self.get()?.fd().map(|f| f.as_raw_fd()))
    }

    fn mark(&self, gpa: u64, length: u64) -> PyResult<()> {
        self.get()?.mark(gpa, length).map_err(log_error)
    }

    fn take(&self, py: Python<'_>) -> PyResult<Vec<RangeTuple>> {
        let log = self.get()?;
        Ok(py.detach(|| tuples(log.take())))
    }

    fn peek(&self, py: Python<'_>) -> PyResult<Vec<RangeTuple>> {
        let log = self.get()?;
        Ok(py.detach(|| tuples(log.peek())))
    }

    fn dirty_pages(&self, py: Python<'_>) -> PyResult<u64> {
        let log = self.get()?;
        Ok(py.detach(|| log.dirty_pages()))
    }

    /// Unmaps the log and closes its fd (once no call is still using it).
    fn close(&self) {
        self.log.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.log.closed()
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(log) => format!(
                "<DirtyLog {} bytes, covers guest addresses below {:#x}>",
                log.size(),
                log.covers()
            ),
            Err(_) => "<DirtyLog closed>".into(),
        }
    }
}
