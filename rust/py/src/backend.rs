//! The back-end session for Python: the core validates and dispatches; a Python handler
//! object answers. recv and send run without the GIL; the handler runs with it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use vhost_core::backend::VringAddrs;
use vhost_core::memory::{GuestMemory, RegionInfo};
use vhost_core::user::backend::{BackendHandler, BackendSession};
use vhost_core::user::channel::BackendChannel;
use vhost_core::user::payload::{
    DeviceStateTransfer, InflightDesc, IotlbPayload, LogDesc, ShmemConfig,
};
use vhost_core::user::{Error, Listener};

use crate::channel::PyBackendChannel;
use crate::convert::{U32, U64};
use crate::errors::{closed, invalid_param, path_error, IntoPyResult};
use crate::eventfd::PyEventFd;
use crate::fd::{closing_pymethods, dup_of, FileDescriptor};
use crate::frontend::PyFrontend;
use crate::handler::{shmem_pairs, unit, FacadeType, PyCallState};
use crate::memory::PyGuestMemory;
use crate::wait;
use vhost_core::sys::socket::accept_within;
use vhost_core::sys::{connect_unix, PathError, Waker};

struct PyBackendHandler {
    obj: Py<PyAny>,
    memory: Py<PyGuestMemory>,
    max_queues: u32,
    max_queue_size: u32,
    state: PyCallState,
}

type R<T> = Result<T, Error>;

fn t<'py>(
    py: Python<'py>,
    items: impl IntoPyObject<'py, Target = PyTuple, Output = Bound<'py, PyTuple>>,
) -> PyResult<Bound<'py, PyTuple>> {
    items.into_pyobject(py).map_err(Into::into)
}

fn extract<T: for<'a, 'py> FromPyObject<'a, 'py>>(v: &Bound<'_, PyAny>) -> PyResult<T> {
    v.extract::<T>().map_err(Into::into)
}

fn opt_eventfd(fd: Option<OwnedFd>) -> Option<PyEventFd> {
    fd.map(PyEventFd::adopt)
}

static MEMORY_REGION: FacadeType = FacadeType::new("vhost.types", "MemoryRegion");
static VRING_ADDRS: FacadeType = FacadeType::new("vhost.types", "VringAddrs");
static IOTLB_MESSAGE: FacadeType = FacadeType::new("vhost.types", "IotlbMessage");
static INFLIGHT_INFO: FacadeType = FacadeType::new("vhost.user", "InflightInfo");

/// A `vhost.types.MemoryRegion` for `r`, with the fd `memory` maps it from (-1 when
/// `memory` does not hold it: a removed region).
fn memory_region<'py>(
    py: Python<'py>,
    memory: &GuestMemory,
    r: &RegionInfo,
) -> PyResult<Bound<'py, PyAny>> {
    let fd = memory
        .regions()
        .iter()
        .find(|m| m.info() == *r)
        .map_or(-1, |m| m.fd().as_raw_fd());
    MEMORY_REGION.build(
        py,
        (
            r.guest_phys_addr,
            r.memory_size,
            r.userspace_addr,
            r.mmap_offset,
            fd,
        ),
    )
}

impl PyBackendHandler {
    fn set_memory(&self, mem: &GuestMemory) {
        Python::attach(|py| self.memory.bind(py).get().replace(mem.clone()));
    }

    fn mem_obj(&self) -> Py<PyGuestMemory> {
        Python::attach(|py| self.memory.clone_ref(py))
    }

    fn simple(
        &mut self,
        name: &'static str,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>>,
    ) -> R<()> {
        self.state.call(&self.obj, name, args, unit)
    }
}

/// A `vhost.types.IotlbMessage` for a payload the core decoded (and checked).
pub fn iotlb_message<'py>(py: Python<'py>, m: &IotlbPayload) -> PyResult<Bound<'py, PyAny>> {
    IOTLB_MESSAGE.build(py, (m.iova, m.size, m.uaddr, m.perm, m.kind))
}

/// The payload of a `vhost.types.IotlbMessage` (or any object with its fields), which
/// checked itself; `asid` has no place in the vhost-user layout and must be 0.
pub fn iotlb_payload_of(msg: &Bound<'_, PyAny>) -> PyResult<IotlbPayload> {
    let field = |name: &str| msg.getattr(name);
    if field("asid").map_or(Ok(0), |a| a.extract::<u32>())? != 0 {
        return Err(invalid_param(
            "vhost-user IOTLB messages have no address space id (asid must be 0)",
        ));
    }
    Ok(IotlbPayload {
        iova: field("iova")?.extract::<U64>()?.0,
        size: field("size")?.extract::<U64>()?.0,
        uaddr: field("uaddr")?.extract::<U64>()?.0,
        perm: field("perm")?.extract()?,
        kind: field("type")?.extract()?,
    })
}

fn owned_fd(v: &Bound<'_, PyAny>) -> PyResult<OwnedFd> {
    dup_of(v)
}

impl BackendHandler for PyBackendHandler {
    fn max_queues(&self) -> u32 {
        self.max_queues
    }
    fn max_queue_size(&self) -> u32 {
        self.max_queue_size
    }
    fn get_features(&mut self) -> R<u64> {
        self.state
            .call(&self.obj, "get_features", |py| t(py, ()), extract)
    }
    fn set_features(&mut self, f: u64) -> R<()> {
        self.simple("set_features", move |py| t(py, (f,)))
    }
    fn get_protocol_features(&mut self) -> R<u64> {
        self.state
            .call(&self.obj, "get_protocol_features", |py| t(py, ()), extract)
    }
    fn set_protocol_features(&mut self, f: u64) -> R<()> {
        self.simple("set_protocol_features", move |py| t(py, (f,)))
    }
    fn set_owner(&mut self) -> R<()> {
        self.simple("set_owner", |py| t(py, ()))
    }
    fn reset_owner(&mut self) -> R<()> {
        self.simple("reset_owner", |py| t(py, ()))
    }
    fn set_mem_table(&mut self, mem: &GuestMemory) -> R<()> {
        self.set_memory(mem);
        let m = self.mem_obj();
        self.simple("set_mem_table", move |py| t(py, (m,)))
    }
    fn add_mem_region(&mut self, mem: &GuestMemory, region: &RegionInfo) -> R<()> {
        self.set_memory(mem);
        let m = self.mem_obj();
        self.simple("add_mem_region", move |py| {
            t(py, (m, memory_region(py, mem, region)?))
        })
    }
    fn remove_mem_region(&mut self, mem: &GuestMemory, region: &RegionInfo) -> R<()> {
        self.set_memory(mem);
        let m = self.mem_obj();
        self.simple("remove_mem_region", move |py| {
            t(py, (m, memory_region(py, mem, region)?))
        })
    }
    fn get_max_mem_slots(&mut self) -> R<u64> {
        self.state
            .call(&self.obj, "get_max_mem_slots", |py| t(py, ()), extract)
    }
    fn set_log_base(&mut self, log: &LogDesc, fd: OwnedFd) -> R<()> {
        let (s, o) = (log.mmap_size, log.mmap_offset);
        self.simple("set_log_base", move |py| {
            t(py, (s, o, FileDescriptor::new(fd)))
        })
    }
    fn set_log_fd(&mut self, fd: OwnedFd) -> R<()> {
        self.simple("set_log_fd", move |py| t(py, (FileDescriptor::new(fd),)))
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> R<()> {
        self.simple("set_vring_num", move |py| t(py, (index, num)))
    }
    fn set_vring_addr(&mut self, a: &VringAddrs) -> R<()> {
        let a = *a;
        self.simple("set_vring_addr", move |py| {
            let addrs = VRING_ADDRS.build(py, (a.desc, a.used, a.avail, a.flags, a.log))?;
            t(py, (a.index, addrs))
        })
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> R<()> {
        self.simple("set_vring_base", move |py| t(py, (index, base)))
    }
    fn get_vring_base(&mut self, index: u32) -> R<u32> {
        self.state.call(
            &self.obj,
            "get_vring_base",
            move |py| t(py, (index,)),
            extract,
        )
    }
    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> R<()> {
        self.simple("set_vring_kick", move |py| t(py, (index, opt_eventfd(fd))))
    }
    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> R<()> {
        self.simple("set_vring_call", move |py| t(py, (index, opt_eventfd(fd))))
    }
    fn set_vring_err(&mut self, index: u32, fd: Option<OwnedFd>) -> R<()> {
        self.simple("set_vring_err", move |py| t(py, (index, opt_eventfd(fd))))
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> R<()> {
        self.simple("set_vring_enable", move |py| t(py, (index, enable)))
    }
    fn set_vring_endian(&mut self, index: u32, big: bool) -> R<()> {
        self.simple("set_vring_endian", move |py| t(py, (index, big)))
    }
    fn vring_kick(&mut self, index: u32) -> R<()> {
        self.simple("vring_kick", move |py| t(py, (index,)))
    }
    fn get_queue_num(&mut self) -> R<u64> {
        self.state
            .call(&self.obj, "get_queue_num", |py| t(py, ()), extract)
    }
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> R<Vec<u8>> {
        self.state.call(
            &self.obj,
            "get_config",
            move |py| t(py, (offset, size, flags)),
            |v| pyo3::buffer::PyBuffer::<u8>::get(v)?.to_vec(v.py()),
        )
    }
    fn set_config(&mut self, offset: u32, data: &[u8], flags: u32) -> R<()> {
        let data = data.to_vec();
        self.simple("set_config", move |py| {
            t(py, (offset, PyBytes::new(py, &data), flags))
        })
    }
    fn set_backend_channel(&mut self, channel: Arc<BackendChannel>) -> R<()> {
        self.simple("set_backend_channel", move |py| {
            t(py, (PyBackendChannel::new(channel),))
        })
    }
    fn get_inflight_fd(&mut self, d: &InflightDesc) -> R<(InflightDesc, OwnedFd)> {
        let (nq, qs) = (d.num_queues, d.queue_size);
        self.state.call(
            &self.obj,
            "get_inflight_fd",
            move |py| t(py, (nq, qs)),
            move |v| {
                let desc = InflightDesc {
                    mmap_size: v.getattr("mmap_size")?.extract()?,
                    mmap_offset: v.getattr("mmap_offset")?.extract()?,
                    num_queues: nq,
                    queue_size: qs,
                };
                Ok((desc, owned_fd(&v.getattr("fd")?)?))
            },
        )
    }
    fn set_inflight_fd(&mut self, d: &InflightDesc, fd: OwnedFd) -> R<()> {
        let d = *d;
        self.simple("set_inflight_fd", move |py| {
            let fd = FileDescriptor::new(fd);
            let info = INFLIGHT_INFO.build(
                py,
                (d.mmap_size, d.mmap_offset, d.num_queues, d.queue_size, fd),
            )?;
            t(py, (info,))
        })
    }
    fn send_rarp(&mut self, mac: [u8; 6]) -> R<()> {
        self.simple("send_rarp", move |py| t(py, (PyBytes::new(py, &mac),)))
    }
    fn net_set_mtu(&mut self, mtu: u64) -> R<()> {
        self.simple("net_set_mtu", move |py| t(py, (mtu,)))
    }
    fn iotlb_msg(&mut self, m: &IotlbPayload) -> R<()> {
        let m = *m;
        self.simple("iotlb_msg", move |py| t(py, (iotlb_message(py, &m)?,)))
    }
    fn reset_device(&mut self) -> R<()> {
        self.simple("reset_device", |py| t(py, ()))
    }
    fn set_status(&mut self, status: u8) -> R<()> {
        self.simple("set_status", move |py| t(py, (status,)))
    }
    fn get_status(&mut self) -> R<u8> {
        self.state
            .call(&self.obj, "get_status", |py| t(py, ()), extract)
    }
    fn gpu_set_socket(&mut self, fd: OwnedFd) -> R<()> {
        self.simple("gpu_set_socket", move |py| {
            t(py, (FileDescriptor::new(fd),))
        })
    }
    fn get_shared_object(&mut self, uuid: [u8; 16]) -> R<OwnedFd> {
        self.state.call(
            &self.obj,
            "get_shared_object",
            move |py| t(py, (PyBytes::new(py, &uuid),)),
            owned_fd,
        )
    }
    fn get_shmem_config(&mut self) -> R<ShmemConfig> {
        let pairs = self
            .state
            .call(&self.obj, "get_shmem_config", |py| t(py, ()), shmem_pairs)?;
        ShmemConfig::from_regions(&pairs)
            .map_err(|e| Error::Handler(format!("get_shmem_config: {e}")))
    }
    fn set_device_state_fd(&mut self, tr: &DeviceStateTransfer, fd: OwnedFd) -> R<Option<OwnedFd>> {
        let (dir, phase) = (tr.direction, tr.phase);
        self.state.call(
            &self.obj,
            "set_device_state_fd",
            move |py| t(py, (dir, phase, FileDescriptor::new(fd))),
            |v| {
                if v.is_none() {
                    Ok(None)
                } else {
                    owned_fd(v).map(Some)
                }
            },
        )
    }
    fn check_device_state(&mut self) -> R<()> {
        self.simple("check_device_state", |py| t(py, ()))
    }
    fn postcopy_advise(&mut self) -> R<OwnedFd> {
        self.state
            .call(&self.obj, "postcopy_advise", |py| t(py, ()), owned_fd)
    }
    fn postcopy_listen(&mut self) -> R<()> {
        self.simple("postcopy_listen", |py| t(py, ()))
    }
    fn postcopy_end(&mut self) -> R<()> {
        self.simple("postcopy_end", |py| t(py, ()))
    }
    fn create_crypto_session(&mut self, params: &[u8]) -> R<Vec<u8>> {
        let p = params.to_vec();
        self.state.call(
            &self.obj,
            "create_crypto_session",
            move |py| t(py, (PyBytes::new(py, &p),)),
            extract,
        )
    }
    fn close_crypto_session(&mut self, id: u64) -> R<()> {
        self.simple("close_crypto_session", move |py| t(py, (id,)))
    }
}

/// One back-end connection driven by a Python handler.
#[pyclass(module = "vhost._core", name = "BackendSession", frozen)]
pub struct PyBackendSession {
    inner: Mutex<Option<BackendSession>>,
    fd: RawFd,
    /// Wakes a thread blocked in `serve` (which holds `inner`) when another closes.
    waker: Waker,
    memory: Py<PyGuestMemory>,
}

impl PyBackendSession {
    pub fn new(py: Python<'_>, session: BackendSession) -> PyResult<Self> {
        let fd = session.socket().as_raw_fd();
        // SAFETY: the socket is the session's, which `inner` keeps open until it is
        // taken, and every take retires the waker first.
        let waker = unsafe { Waker::new(session.socket().as_fd()) };
        Ok(PyBackendSession {
            inner: Mutex::new(Some(session)),
            fd,
            waker,
            memory: Py::new(py, PyGuestMemory::from_core(GuestMemory::default()))?,
        })
    }

    fn adapter(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<PyBackendHandler> {
        let max_queues = U32::attr(handler, "max_queues")?;
        let max_queue_size = if handler.hasattr("max_queue_size")? {
            U32::attr(handler, "max_queue_size")?
        } else {
            vhost_core::user::backend::MAX_QUEUE_SIZE
        };
        if max_queues == 0 {
            return Err(invalid_param("handler.max_queues must be at least 1"));
        }
        Ok(PyBackendHandler {
            obj: handler.clone().unbind(),
            memory: self.memory.clone_ref(py),
            max_queues,
            max_queue_size,
            state: PyCallState::default(),
        })
    }

    /// One request: recv (no GIL), dispatch (GIL), reply (no GIL). Returns False when the
    /// front-end disconnected cleanly.
    fn step(
        &self,
        py: Python<'_>,
        session: &mut BackendSession,
        h: &mut PyBackendHandler,
    ) -> PyResult<bool> {
        let incoming = match wait::blocking(py, || session.recv())? {
            Ok(i) => i,
            Err(Error::Disconnected) => return Ok(false),
            Err(e) => return Err(e).py_err(),
        };
        let handled = session.handle(incoming, h);
        wait::call(py, || session.send_reply(handled.reply))?;
        let py_error = h.state.error.take();
        // KeyboardInterrupt or SystemExit in a handler ends serving (after the NACK went
        // out); only an Exception is a refusal to report and serve on.
        if let Some(pe) = py_error.as_ref() {
            if !pe.is_instance_of::<pyo3::exceptions::PyException>(py) {
                return Err(pe.clone_ref(py));
            }
        }
        match handled.error {
            None => Ok(true),
            // NACKed: the connection is fine; tell the handler and go on.
            Some(e) if !session.is_broken() => {
                let report = match py_error {
                    Some(pe) => pe.into_value(py).into_any(),
                    None => crate::errors::user_error(e).into_value(py).into_any(),
                };
                let obj = h.obj.bind(py);
                if obj.hasattr("on_request_error")? {
                    obj.call_method1("on_request_error", (report,))?;
                }
                Ok(true)
            }
            Some(e) => Err(py_error.unwrap_or_else(|| crate::errors::user_error(e))),
        }
    }
}

closing_pymethods!(PyBackendSession, close() {
    /// Client mode: connects to a front-end listening at `path` (Ctrl-C interrupts a
    /// connect that waits for a full backlog).
    #[staticmethod]
    fn connect(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let s = wait::call(py, || connect_unix(&path, None))?;
        Self::new(py, BackendSession::new(s))
    }

    /// Adopts a connected socket (its fd is duplicated).
    #[staticmethod]
    fn from_socket(py: Python<'_>, sock: &Bound<'_, PyAny>) -> PyResult<Self> {
        let fd = dup_of(sock)?;
        Self::new(py, BackendSession::new(UnixStream::from(fd)))
    }

    fn fileno(&self) -> RawFd {
        self.fd
    }

    /// The session's guest memory (updated in place on every memory-table change).
    #[getter]
    fn memory(&self, py: Python<'_>) -> Py<PyGuestMemory> {
        self.memory.clone_ref(py)
    }

    #[getter]
    fn acked_features(&self) -> PyResult<u64> {
        let g = self
            .inner
            .try_lock()
            .map_err(|_| invalid_param("session is busy serving"))?;
        Ok(g.as_ref().map_or(0, |s| s.acked_features()))
    }

    #[getter]
    fn acked_protocol_features(&self) -> PyResult<u64> {
        let g = self
            .inner
            .try_lock()
            .map_err(|_| invalid_param("session is busy serving"))?;
        Ok(g.as_ref().map_or(0, |s| s.acked_protocol_features()))
    }

    /// Handles one request; False when the front-end disconnected.
    fn handle_one(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<bool> {
        let mut h = self.adapter(py, handler)?;
        let mut guard = crate::handler::lock_detached(py, &self.inner);
        let session = guard.as_mut().ok_or_else(|| closed("BackendSession"))?;
        self.step(py, session, &mut h)
    }

    /// Serves until the front-end disconnects (returns) or breaks the protocol (raises).
    /// The connection is closed either way, also when Ctrl-C interrupts the wait for the
    /// next request.
    fn serve(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut h = self.adapter(py, handler)?;
        let mut guard = crate::handler::lock_detached(py, &self.inner);
        let result = match guard.as_mut() {
            None => Err(closed("BackendSession")),
            Some(session) => loop {
                match self.step(py, session, &mut h) {
                    Ok(true) => {
                        py.check_signals()?;
                    }
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            },
        };
        self.waker.retire();
        guard.take();
        result
    }

    /// Closes the connection; a thread blocked in `serve` wakes up, returns and drops it.
    fn close(&self) {
        self.waker.wake();
        if let Ok(mut g) = self.inner.try_lock() {
            self.waker.retire();
            g.take();
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.try_lock().map(|g| g.is_none()).unwrap_or(false)
    }
});

/// A listening socket path for whichever side is the server; unlinked on close.
#[pyclass(module = "vhost._core", name = "Listener", frozen)]
pub struct PyListener {
    inner: Mutex<Option<Listener>>,
    path: PathBuf,
    /// The listening fd, for `fileno()` while another thread waits in accept.
    fd: RawFd,
    /// Wakes a thread blocked in accept (which holds `inner`) when another closes.
    waker: Waker,
    closing: std::sync::atomic::AtomicBool,
}

impl PyListener {
    /// Waits for a peer, interruptible by Ctrl-C (the listener stays open and accepts
    /// again afterwards).
    fn accept_stream(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<UnixStream> {
        let t = crate::convert::timeout("timeout", timeout)?;
        let guard = crate::handler::lock_detached(py, &self.inner);
        let l = guard.as_ref().ok_or_else(|| closed("Listener"))?;
        let accepted = wait::blocking(py, || accept_within(l.listener(), t))?;
        accepted.map_err(|e| {
            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                closed("Listener")
            } else if e.kind() == std::io::ErrorKind::TimedOut {
                path_error(PathError::new("accept on", &self.path, &e))
            } else {
                crate::errors::io_error(e)
            }
        })
    }
}

closing_pymethods!(PyListener, close(py) {
    #[new]
    #[pyo3(signature = (path, replace_stale = true))]
    fn new(py: Python<'_>, path: PathBuf, replace_stale: bool) -> PyResult<Self> {
        let l = py
            .detach(|| Listener::bind(&path, replace_stale))
            .map_err(|e| path_error(PathError::new("bind", &path, &e)))?;
        let fd = l.listener().as_raw_fd();
        // SAFETY: the socket is the listener's, which `inner` keeps open until it is
        // taken, and every take retires the waker first.
        let waker = unsafe { Waker::new(l.listener().as_fd()) };
        Ok(PyListener {
            inner: Mutex::new(Some(l)),
            path,
            fd,
            waker,
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn fileno(&self) -> PyResult<RawFd> {
        match self.inner.try_lock() {
            Ok(g) if g.is_none() => Err(closed("Listener")),
            Err(std::sync::TryLockError::Poisoned(p)) if p.get_ref().is_none() => {
                Err(closed("Listener"))
            }
            // Open (possibly with another thread waiting in accept, GIL released).
            _ => Ok(self.fd),
        }
    }

    /// Waits for a front-end to connect and returns its back-end session.
    #[pyo3(signature = (timeout = None))]
    fn accept_backend(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyBackendSession> {
        let s = self.accept_stream(py, timeout)?;
        PyBackendSession::new(py, BackendSession::new(s))
    }

    /// Server-mode front-end: waits for a back-end to connect.
    #[pyo3(
        signature = (timeout = None, reply_timeout = Some(10.0)),
        text_signature = "($self, timeout=None, reply_timeout=10.0)"
    )]
    fn accept_frontend(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        reply_timeout: Option<f64>,
    ) -> PyResult<PyFrontend> {
        let reply_timeout = crate::convert::timeout("reply_timeout", reply_timeout)?;
        let s = self.accept_stream(py, timeout)?;
        let fe = vhost_core::user::Frontend::new(s).py_err()?;
        fe.set_timeout(reply_timeout).py_err()?;
        Ok(PyFrontend::from_core(fe))
    }

    /// Closes the listener; a thread blocked in accept wakes up with ClosedError.
    fn close(&self, py: Python<'_>) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Shut down first: a thread in accept wakes, and no connection queues on a
        // listener being closed.
        self.waker.wake();
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread is in accept with the GIL released, woken above: take the
            // listener once it lets go, without holding the GIL meanwhile.
            Err(std::sync::TryLockError::WouldBlock) => {
                crate::handler::lock_detached(py, &self.inner)
            }
        };
        self.waker.retire();
        g.take();
    }
});
