//! `FrontendLink`: a device's (or its daemon's) way to the front-end being served, and the
//! conversion of its errors and of a block device's resize errors.

use std::os::fd::AsFd;

use pyo3::prelude::*;
use vhost_core::daemon::{FrontendLink, LinkError};
use vhost_core::devices::blk::ResizeError;

use crate::convert::U64;
use crate::errors::{raise, user_error};
use crate::fd::{borrow, raw_fd_of, FileDescriptor};
use crate::wait;

/// No front-end: `DisconnectedError`; no channel: `InactiveFeatureError` for
/// `BACKEND_REQ`; a lookup answered without its fd: `ProtocolError`; a failure on the
/// channel as the channel's own error.
pub fn link_error(err: LinkError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        match err {
            LinkError::NoFrontend { .. } => raise(py, "DisconnectedError", (msg,)),
            LinkError::NoChannel { request } => {
                raise(py, "InactiveFeatureError", (request, "BACKEND_REQ", msg))
            }
            LinkError::NoFd { .. } => raise(py, "ProtocolError", (msg,)),
            LinkError::Channel(e) => user_error(e),
            LinkError::Vduse(e) => crate::errors::vduse_error(e),
        }
    })
}

/// A size the disk cannot take: `InvalidParamError`; the file could not be sized or grown:
/// `KernelError` with its errno; the front-end could not be told: the link's error (the
/// capacity has changed by then).
pub fn resize_error(err: ResizeError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        match err {
            ResizeError::Shrink { .. } | ResizeError::Unaligned(_) | ResizeError::ReadOnly(_) => {
                raise(py, "InvalidParamError", (msg,))
            }
            ResizeError::Grow { source, .. } | ResizeError::Size(source) => {
                let errno = source.raw_os_error().unwrap_or(libc::EIO);
                raise(py, "KernelError", (errno, msg))
            }
            ResizeError::Notify { source, .. } => link_error(source),
        }
    })
}

/// The front-end being served, as a device sees it: requests on the back-end channel.
#[pyclass(module = "vhost._core", name = "FrontendLink", frozen)]
pub struct PyFrontendLink {
    inner: FrontendLink,
}

impl PyFrontendLink {
    pub fn new(inner: FrontendLink) -> Self {
        PyFrontendLink { inner }
    }

    /// Runs a request without the GIL (the front-end may take its time to answer).
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&FrontendLink) -> Result<T, LinkError> + Send,
    ) -> PyResult<T> {
        let inner = &self.inner;
        wait::blocking(py, || f(inner))?.map_err(link_error)
    }
}

#[pymethods]
impl PyFrontendLink {
    /// Whether a front-end is being served.
    #[getter]
    fn connected(&self) -> bool {
        self.inner.connected()
    }

    /// Whether the front-end being served set up the back-end channel.
    #[getter]
    fn has_channel(&self) -> bool {
        self.inner.has_channel()
    }

    /// CONFIG_CHANGE_MSG: the front-end re-reads the config space and tells the driver.
    fn config_change(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |l| l.config_changed())
    }

    /// SHARED_OBJECT_ADD: registers an object (16-byte UUID) this device exports.
    fn shared_object_add(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<()> {
        self.call(py, |l| l.shared_object_add(uuid))
    }

    /// SHARED_OBJECT_REMOVE: withdraws an object registered with `shared_object_add`.
    fn shared_object_remove(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<()> {
        self.call(py, |l| l.shared_object_remove(uuid))
    }

    /// SHARED_OBJECT_LOOKUP: another device's object, as a `FileDescriptor` the caller
    /// owns (its dma-buf), or None when the front-end does not know it.
    fn shared_object_lookup(
        &self,
        py: Python<'_>,
        uuid: [u8; 16],
    ) -> PyResult<Option<FileDescriptor>> {
        let fd = self.call(py, |l| l.shared_object_lookup(uuid))?;
        Ok(fd.map(FileDescriptor::new))
    }

    /// SHMEM_MAP: maps `length` bytes of `fd` (kept by the caller) from `fd_offset` into
    /// shared memory region `shmid` at `shm_offset`.
    #[pyo3(signature = (shmid, fd_offset, shm_offset, length, fd, *, writable = false))]
    #[allow(clippy::too_many_arguments)]
    fn shmem_map(
        &self,
        py: Python<'_>,
        shmid: u8,
        fd_offset: U64,
        shm_offset: U64,
        length: U64,
        fd: &Bound<'_, PyAny>,
        writable: bool,
    ) -> PyResult<()> {
        let (fd_offset, shm_offset, length) = (fd_offset.0, shm_offset.0, length.0);
        let fd = raw_fd_of(fd)?;
        self.call(py, move |l| {
            l.shmem_map(
                shmid,
                fd_offset,
                shm_offset,
                length,
                writable,
                borrow(fd).as_fd(),
            )
        })
    }

    /// SHMEM_UNMAP: unmaps a range `shmem_map` mapped.
    fn shmem_unmap(&self, py: Python<'_>, shmid: u8, shm_offset: U64, length: U64) -> PyResult<()> {
        let (shm_offset, length) = (shm_offset.0, length.0);
        self.call(py, move |l| l.shmem_unmap(shmid, shm_offset, length))
    }

    fn __repr__(&self) -> String {
        let state = match (self.inner.connected(), self.inner.has_channel()) {
            (false, _) => "no front-end",
            (true, false) => "connected, no channel",
            (true, true) => "connected",
        };
        format!("<FrontendLink {state}>")
    }
}
