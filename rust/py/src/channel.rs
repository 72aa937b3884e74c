//! Both ends of the back-end request channel for Python.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use crate::convert::{U32, U64};
use pyo3::types::{PyBytes, PyTuple};
use vhost_core::user::channel::{BackendChannel, FrontendChannel, FrontendReqHandler};
use vhost_core::user::message::BackendRequest;
use vhost_core::user::payload::{IotlbPayload, ShmemMapPayload, VringArea};
use vhost_core::user::Error;

use crate::errors::{closed, IntoPyResult};
use crate::fd::{borrow, closing_pymethods, dup_of, raw_fd_of, FileDescriptor};
use crate::handler::{u64_or_zero, PyCallState};
use crate::wait;
use vhost_core::sys::Waker;

/// Front-end side: receives the back-end's requests and hands them to a Python
/// `FrontendRequestHandler`.
#[pyclass(module = "vhost._core", name = "FrontendChannel", frozen)]
pub struct PyFrontendChannel {
    inner: Mutex<Option<FrontendChannel>>,
    fd: RawFd,
    /// Wakes a thread blocked in `process_one` (which holds `inner`) when another closes.
    waker: Waker,
}

impl PyFrontendChannel {
    pub fn new(ch: FrontendChannel) -> Self {
        let fd = ch.socket().as_raw_fd();
        // SAFETY: the socket is the channel's, which `inner` keeps open until it is
        // taken, and every take retires the waker first.
        let waker = unsafe { Waker::new(ch.socket().as_fd()) };
        PyFrontendChannel {
            inner: Mutex::new(Some(ch)),
            fd,
            waker,
        }
    }
}

struct PyFrontendHandler {
    obj: Py<PyAny>,
    state: PyCallState,
}

fn tuple<'py>(
    py: Python<'py>,
    items: impl IntoPyObject<'py, Target = PyTuple, Output = Bound<'py, PyTuple>>,
) -> PyResult<Bound<'py, PyTuple>> {
    items.into_pyobject(py).map_err(Into::into)
}

impl FrontendReqHandler for PyFrontendHandler {
    fn config_change(&mut self) -> Result<u64, Error> {
        self.state
            .call(&self.obj, "config_change", |py| tuple(py, ()), u64_or_zero)
    }
    fn vring_host_notifier(&mut self, area: &VringArea, fd: Option<OwnedFd>) -> Result<u64, Error> {
        let (index, size, offset) = (area.index, area.size, area.offset);
        self.state.call(
            &self.obj,
            "vring_host_notifier",
            move |py| tuple(py, (index, size, offset, fd.map(FileDescriptor::new))),
            u64_or_zero,
        )
    }
    fn vring_call(&mut self, index: u32) -> Result<u64, Error> {
        self.state.call(
            &self.obj,
            "vring_call",
            |py| tuple(py, (index,)),
            u64_or_zero,
        )
    }
    fn vring_err(&mut self, index: u32) -> Result<u64, Error> {
        self.state.call(
            &self.obj,
            "vring_err",
            |py| tuple(py, (index,)),
            u64_or_zero,
        )
    }
    fn iotlb_msg(&mut self, m: &IotlbPayload) -> Result<u64, Error> {
        let m = *m;
        self.state.call(
            &self.obj,
            "iotlb_msg",
            move |py| tuple(py, (crate::backend::iotlb_message(py, &m)?,)),
            u64_or_zero,
        )
    }
    fn shared_object_add(&mut self, uuid: [u8; 16]) -> Result<u64, Error> {
        self.state.call(
            &self.obj,
            "shared_object_add",
            move |py| tuple(py, (PyBytes::new(py, &uuid),)),
            u64_or_zero,
        )
    }
    fn shared_object_remove(&mut self, uuid: [u8; 16]) -> Result<u64, Error> {
        self.state.call(
            &self.obj,
            "shared_object_remove",
            move |py| tuple(py, (PyBytes::new(py, &uuid),)),
            u64_or_zero,
        )
    }
    fn shared_object_lookup(&mut self, uuid: [u8; 16]) -> Result<u64, Error> {
        self.shared_object_lookup_fd(uuid).map(|(status, _)| status)
    }
    fn shared_object_lookup_fd(&mut self, uuid: [u8; 16]) -> Result<(u64, Option<OwnedFd>), Error> {
        self.state.call(
            &self.obj,
            "shared_object_lookup",
            move |py| tuple(py, (PyBytes::new(py, &uuid),)),
            status_and_fd,
        )
    }
    fn shmem_map(&mut self, m: &ShmemMapPayload, fd: OwnedFd) -> Result<u64, Error> {
        let m = *m;
        self.state.call(
            &self.obj,
            "shmem_map",
            move |py| {
                let args = (
                    m.shmid,
                    m.fd_offset,
                    m.shm_offset,
                    m.len,
                    FileDescriptor::new(fd),
                    m.flags,
                );
                tuple(py, args)
            },
            u64_or_zero,
        )
    }
    fn shmem_unmap(&mut self, m: &ShmemMapPayload) -> Result<u64, Error> {
        let m = *m;
        self.state.call(
            &self.obj,
            "shmem_unmap",
            move |py| tuple(py, (m.shmid, m.shm_offset, m.len)),
            u64_or_zero,
        )
    }
    fn other(&mut self, request: BackendRequest) -> Result<u64, Error> {
        let name = request.kind().name();
        self.state.call(
            &self.obj,
            "unknown_request",
            move |py| tuple(py, (name,)),
            u64_or_zero,
        )
    }
}

/// A lookup's answer: a status (None: 0), or a `vhost.user.SharedObject` (status 0) with
/// the dma-buf to send back; the fd is duplicated, so the handler keeps its own.
fn status_and_fd(v: &Bound<'_, PyAny>) -> PyResult<(u64, Option<OwnedFd>)> {
    if v.hasattr("fd")? {
        return Ok((0, Some(dup_of(&v.getattr("fd")?)?)));
    }
    Ok((u64_or_zero(v)?, None))
}

closing_pymethods!(PyFrontendChannel, close() {
    fn fileno(&self) -> RawFd {
        self.fd
    }

    /// Waits for one back-end request and runs `handler` on it (answering with an ack
    /// when asked). Re-raises the handler's exception after the NACK was sent. The waits
    /// (for the request, and to send the ack) run without the GIL and end on Ctrl-C; the
    /// ack's send is bounded by the channel's timeout.
    fn process_one(&self, py: Python<'_>, handler: Py<PyAny>) -> PyResult<()> {
        let mut guard = crate::handler::lock_detached(py, &self.inner);
        let ch = guard.as_mut().ok_or_else(|| closed("FrontendChannel"))?;
        let incoming = wait::call(py, || ch.recv())?;
        let mut h = PyFrontendHandler {
            obj: handler,
            state: PyCallState::default(),
        };
        let (ack, result) = FrontendChannel::dispatch(incoming, &mut h);
        wait::call(py, || ch.send_ack(ack))?;
        if let Some(e) = h.state.error.take() {
            return Err(e);
        }
        result.py_err()
    }

    /// Bounds an ack's send and the rest of a request once it has started to arrive;
    /// `None` waits forever. (The wait for the next request has no bound.)
    #[pyo3(signature = (timeout))]
    fn set_timeout(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = crate::convert::timeout("timeout", timeout)?;
        let guard = crate::handler::lock_detached(py, &self.inner);
        let ch = guard.as_ref().ok_or_else(|| closed("FrontendChannel"))?;
        ch.set_timeout(t).py_err()
    }

    #[getter]
    fn broken(&self) -> bool {
        match self.inner.try_lock() {
            Ok(g) => g.as_ref().map_or(true, |c| c.is_broken()),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                p.into_inner().as_ref().map_or(true, |c| c.is_broken())
            }
            // Another thread is waiting in process_one, which it would have left had the
            // channel broken; waiting for it here (GIL held) would deadlock.
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    /// Closes the channel; a thread blocked in `process_one` wakes up.
    fn close(&self) {
        self.waker.wake();
        if let Ok(mut g) = self.inner.try_lock() {
            self.waker.retire();
            g.take();
        }
    }
});

/// Back-end side: sends requests to the front-end.
#[pyclass(module = "vhost._core", name = "BackendChannel", frozen)]
pub struct PyBackendChannel {
    inner: Arc<BackendChannel>,
}

impl PyBackendChannel {
    pub fn new(inner: Arc<BackendChannel>) -> Self {
        PyBackendChannel { inner }
    }

    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&BackendChannel) -> vhost_core::user::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = &*self.inner;
        wait::call(py, || f(inner))
    }
}

#[pymethods]
impl PyBackendChannel {
    fn config_change(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |c| c.config_change())
    }
    fn vring_call(&self, py: Python<'_>, index: U32) -> PyResult<()> {
        let index = index.0;
        self.call(py, |c| c.vring_call(index))
    }
    fn vring_err(&self, py: Python<'_>, index: U32) -> PyResult<()> {
        let index = index.0;
        self.call(py, |c| c.vring_err(index))
    }
    fn shared_object_add(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<()> {
        self.call(py, |c| c.shared_object_add(uuid))
    }
    fn shared_object_remove(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<()> {
        self.call(py, |c| c.shared_object_remove(uuid))
    }
    fn shared_object_lookup(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<u64> {
        self.call(py, |c| c.shared_object_lookup(uuid))
    }
    /// The lookup's status and, when the front-end found the object, its dma-buf fd
    /// (owned by the caller).
    fn shared_object_lookup_fd(
        &self,
        py: Python<'_>,
        uuid: [u8; 16],
    ) -> PyResult<(u64, Option<FileDescriptor>)> {
        let (status, fd) = self.call(py, |c| c.shared_object_lookup_fd(uuid))?;
        Ok((status, fd.map(FileDescriptor::new)))
    }
    /// IOTLB_MSG to the front-end (a miss or an access failure), from a
    /// `vhost.types.IotlbMessage`: the name and argument `Frontend.send_iotlb_msg` and
    /// `KernelBackend.send_iotlb_msg` take.
    fn send_iotlb_msg(&self, py: Python<'_>, msg: &Bound<'_, PyAny>) -> PyResult<()> {
        let m = crate::backend::iotlb_payload_of(msg)?;
        self.call(py, move |c| c.iotlb_msg(&m))
    }
    #[pyo3(signature = (index, size, offset, fd = None))]
    fn vring_host_notifier(
        &self,
        py: Python<'_>,
        index: u8,
        size: U64,
        offset: U64,
        fd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (size, offset) = (size.0, offset.0);
        let fd = fd.map(raw_fd_of).transpose()?;
        self.call(py, move |c| {
            c.vring_host_notifier(index, size, offset, fd.map(borrow))
        })
    }
    /// SHMEM_MAP: maps `length` bytes of `fd` (kept by the caller) from `fd_offset` into
    /// shared memory region `shmid` at `shm_offset`; the order `FrontendLink.shmem_map`
    /// takes too.
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
        self.call(py, move |c| {
            c.shmem_map(shmid, fd_offset, shm_offset, length, writable, borrow(fd))
        })
    }
    fn shmem_unmap(&self, py: Python<'_>, shmid: u8, shm_offset: U64, length: U64) -> PyResult<()> {
        let (shm_offset, length) = (shm_offset.0, length.0);
        self.call(py, move |c| c.shmem_unmap(shmid, shm_offset, length))
    }
    #[pyo3(signature = (timeout))]
    fn set_timeout(&self, timeout: Option<f64>) -> PyResult<()> {
        let t = crate::convert::timeout("timeout", timeout)?;
        self.inner.set_timeout(t).py_err()
    }
}
