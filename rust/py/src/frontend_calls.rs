//! The front-end's requests without waiting, for an event loop (`vhost.aio`): each method
//! of `FrontendCalls` builds the core's call (`vhost_core::user::frontend::calls`), sends
//! its request and returns a `PendingCall`; the loop waits for the socket to become
//! readable and calls `PendingCall.advance()`, which hands what arrived to the core. The
//! same encoder, decoder and checks as the blocking `Frontend`; here only conversions.

use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::IntoPyObjectExt;
use vhost_core::backend::{LogRegion, MemoryRegion, VringAddrs};
use vhost_core::memory::RegionInfo;
use vhost_core::user::frontend::{calls, Call, Pending, Started};
use vhost_core::user::payload::{InflightDesc, IotlbPayload};
use vhost_core::user::{Frontend, Result as UserResult};

use crate::backend_methods::{region_list, RegionArg};
use crate::channel::PyFrontendChannel;
use crate::convert::{U16, U32, U64};
use crate::errors::{invalid_param, IntoPyResult};
use crate::fd::{borrow, opt_fd, raw_fd_of, FileDescriptor};
use crate::frontend::PyFrontend;

/// Turns a call's result into its Python value (with the GIL).
type Convert<T> = fn(Python<'_>, T) -> PyResult<Py<PyAny>>;

/// A call of any result type, as `PendingCall` drives it.
trait Erased: Send {
    /// Takes what arrived; true once the call is over with its value kept.
    fn advance(&mut self, fe: &Frontend) -> UserResult<bool>;
    /// The value of a call that is over (once).
    fn take(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>>;
    /// Gives the call up (the core closes the connection if it was unanswered).
    fn abandon(&mut self, fe: &Frontend);
}

struct Typed<T> {
    pending: Option<Pending<T>>,
    value: Option<T>,
    convert: Convert<T>,
}

impl<T: Send> Erased for Typed<T> {
    fn advance(&mut self, fe: &Frontend) -> UserResult<bool> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(self.value.is_some());
        };
        let got = fe.advance(pending);
        match got {
            Ok(None) => Ok(false),
            Ok(Some(value)) => {
                self.pending = None;
                self.value = Some(value);
                Ok(true)
            }
            Err(e) => {
                self.pending = None;
                Err(e)
            }
        }
    }

    fn take(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.value.take() {
            Some(value) => (self.convert)(py, value),
            None => Err(PyRuntimeError::new_err(
                "PendingCall.result(): the call is not over, or its result was taken",
            )),
        }
    }

    fn abandon(&mut self, fe: &Frontend) {
        if let Some(mut pending) = self.pending.take() {
            fe.abandon(&mut pending);
        }
    }
}

/// One request in flight on a front-end connection, driven by an event loop: `advance()`
/// when the connection's socket is readable, `result()` once it says the call is over.
/// Dropped (or `abandon()`ed) before its answer came, it closes the connection: the
/// answer would otherwise be read as the next request's.
#[pyclass(module = "vhost._core", name = "PendingCall", frozen)]
pub struct PyPendingCall {
    fe: Arc<Frontend>,
    request: &'static str,
    call: Mutex<Box<dyn Erased>>,
}

impl PyPendingCall {
    fn lock(&self) -> MutexGuard<'_, Box<dyn Erased>> {
        self.call.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for PyPendingCall {
    fn drop(&mut self) {
        let fe = self.fe.clone();
        self.lock().abandon(&fe);
    }
}

#[pymethods]
impl PyPendingCall {
    /// Takes what has arrived of the answer without waiting: True once the call is over
    /// (`result()`), False to wait for the socket again. A failed call raises here.
    fn advance(&self, py: Python<'_>) -> PyResult<bool> {
        let fe = &*self.fe;
        let call = &self.call;
        py.detach(|| {
            let mut call = call.lock().unwrap_or_else(|p| p.into_inner());
            call.advance(fe)
        })
        .py_err()
    }

    /// The call's value, once `advance()` returned True.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.lock().take(py)
    }

    /// Gives the call up: unanswered, the connection is closed (its stream is out of step).
    fn abandon(&self, py: Python<'_>) {
        let fe = &*self.fe;
        let call = &self.call;
        py.detach(|| call.lock().unwrap_or_else(|p| p.into_inner()).abandon(fe));
    }

    /// The request whose answer is awaited (the call's first, for a chain).
    #[getter]
    fn request(&self) -> &'static str {
        self.request
    }

    fn __repr__(&self) -> String {
        format!("<PendingCall {}>", self.request)
    }
}

fn none(py: Python<'_>, (): ()) -> PyResult<Py<PyAny>> {
    Ok(py.None())
}

fn int<T: for<'py> IntoPyObject<'py>>(py: Python<'_>, v: T) -> PyResult<Py<PyAny>> {
    v.into_py_any(py)
}

fn bytes(py: Python<'_>, v: Vec<u8>) -> PyResult<Py<PyAny>> {
    Ok(PyBytes::new(py, &v).into_any().unbind())
}

fn file(py: Python<'_>, fd: std::os::fd::OwnedFd) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, FileDescriptor::new(fd))?.into_any())
}

/// The front-end's requests as non-blocking calls on a `Frontend`'s connection: the same
/// names and arguments as `Frontend`'s methods, each returning a `PendingCall`.
#[pyclass(module = "vhost._core", name = "FrontendCalls", frozen)]
pub struct PyFrontendCalls {
    fe: Arc<Frontend>,
}

impl PyFrontendCalls {
    /// Sends `call`'s request (GIL released, Ctrl-C honoured) and wraps what follows.
    fn start<T: Send + 'static>(
        &self,
        py: Python<'_>,
        call: UserResult<Call<'_, T>>,
        convert: Convert<T>,
    ) -> PyResult<PyPendingCall> {
        let call = call.py_err()?;
        let fe = &*self.fe;
        let started = crate::wait::call(py, move || fe.start(call))?;
        let (request, typed) = match started {
            Started::Done(value) => (
                "",
                Typed {
                    pending: None,
                    value: Some(value),
                    convert,
                },
            ),
            Started::Waiting(pending) => (
                pending.request(),
                Typed {
                    pending: Some(pending),
                    value: None,
                    convert,
                },
            ),
        };
        Ok(PyPendingCall {
            fe: self.fe.clone(),
            request,
            call: Mutex::new(Box::new(typed)),
        })
    }
}

impl PyFrontendCalls {
    /// SET_VRING_KICK, CALL or ERR (`make`): ring `index`'s eventfd, None for none.
    fn vring_fd(
        &self,
        py: Python<'_>,
        make: fn(u32, Option<BorrowedFd<'static>>) -> UserResult<Call<'static, ()>>,
        index: U32,
        fd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPendingCall> {
        let fd = opt_fd(fd)?;
        self.start(py, make(index.0, fd.map(borrow)), none)
    }
}

#[pymethods]
impl PyFrontendCalls {
    #[new]
    fn new(frontend: &PyFrontend) -> Self {
        PyFrontendCalls {
            fe: frontend.core(),
        }
    }

    /// The connection's socket, for the event loop to wait on.
    fn fileno(&self) -> RawFd {
        self.fe.socket_fd()
    }

    fn get_features(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_features()), int)
    }

    fn set_features(&self, py: Python<'_>, features: U64) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_features(features.0)), none)
    }

    fn set_owner(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_owner()), none)
    }

    fn reset_owner(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::reset_owner()), none)
    }

    fn set_mem_table(
        &self,
        py: Python<'_>,
        regions: Vec<RegionArg<'_>>,
    ) -> PyResult<PyPendingCall> {
        let table = region_list(&regions)?;
        let table: Vec<MemoryRegion<'static>> = crate::backend_methods::memory_table(&table);
        self.start(py, calls::set_mem_table_of(&table), none)
    }

    #[pyo3(signature = (base, region = None))]
    fn set_log_base(
        &self,
        py: Python<'_>,
        base: U64,
        region: Option<(u64, u64, Bound<'_, PyAny>)>,
    ) -> PyResult<PyPendingCall> {
        let region = crate::backend_methods::log_region(region)?;
        let log = region.map(|(mmap_size, mmap_offset, fd)| LogRegion {
            mmap_size,
            mmap_offset,
            fd: borrow(fd),
        });
        self.start(py, calls::set_log_base_of(base.0, log), none)
    }

    #[pyo3(signature = (fd))]
    fn set_log_fd(&self, py: Python<'_>, fd: Option<&Bound<'_, PyAny>>) -> PyResult<PyPendingCall> {
        let fd = opt_fd(fd)?;
        self.start(py, calls::set_log_fd_of(fd.map(borrow)), none)
    }

    fn set_vring_num(&self, py: Python<'_>, index: U32, num: U32) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_vring_num(index.0, num.0)), none)
    }

    #[pyo3(
        signature = (index, desc, used, avail, flags = U32(0), log = U64(0)),
        text_signature = "(self, index, desc, used, avail, flags=0, log=0)"
    )]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature
    fn set_vring_addr(
        &self,
        py: Python<'_>,
        index: U32,
        desc: U64,
        used: U64,
        avail: U64,
        flags: U32,
        log: U64,
    ) -> PyResult<PyPendingCall> {
        let addrs = VringAddrs {
            index: index.0,
            flags: flags.0,
            desc: desc.0,
            used: used.0,
            avail: avail.0,
            log: log.0,
        };
        self.start(py, calls::set_vring_addr(&addrs), none)
    }

    fn set_vring_base(&self, py: Python<'_>, index: U32, base: U32) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_vring_base(index.0, base.0)), none)
    }

    fn get_vring_base(&self, py: Python<'_>, index: U32) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_vring_base(index.0)), int)
    }

    #[pyo3(signature = (index, fd))]
    fn set_vring_kick(
        &self,
        py: Python<'_>,
        index: U32,
        fd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPendingCall> {
        self.vring_fd(py, calls::set_vring_kick, index, fd)
    }

    #[pyo3(signature = (index, fd))]
    fn set_vring_call(
        &self,
        py: Python<'_>,
        index: U32,
        fd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPendingCall> {
        self.vring_fd(py, calls::set_vring_call, index, fd)
    }

    #[pyo3(signature = (index, fd))]
    fn set_vring_err(
        &self,
        py: Python<'_>,
        index: U32,
        fd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPendingCall> {
        self.vring_fd(py, calls::set_vring_err, index, fd)
    }

    #[pyo3(signature = (features = None, protocol_features = None, packed = false, event_idx = true, log_all = false))]
    fn negotiate(
        &self,
        py: Python<'_>,
        features: Option<&Bound<'_, PyAny>>,
        protocol_features: Option<&Bound<'_, PyAny>>,
        packed: bool,
        event_idx: bool,
        log_all: bool,
    ) -> PyResult<PyPendingCall> {
        let opts = crate::frontend::negotiate_options(
            features,
            protocol_features,
            packed,
            event_idx,
            log_all,
        )?;
        self.start(py, calls::negotiate(&opts), int)
    }

    fn add_mem_region(&self, py: Python<'_>, region: RegionArg<'_>) -> PyResult<PyPendingCall> {
        let (info, fd) = region_list(std::slice::from_ref(&region))?.remove(0);
        let fd = fd.ok_or_else(|| invalid_param("ADD_MEM_REG: the region has no fd"))?;
        self.start(py, Ok(calls::add_mem_region(&info, borrow(fd))), none)
    }

    fn remove_mem_region(
        &self,
        py: Python<'_>,
        guest_phys_addr: U64,
        memory_size: U64,
        userspace_addr: U64,
        mmap_offset: U64,
    ) -> PyResult<PyPendingCall> {
        let info = RegionInfo {
            guest_phys_addr: guest_phys_addr.0,
            memory_size: memory_size.0,
            userspace_addr: userspace_addr.0,
            mmap_offset: mmap_offset.0,
        };
        self.start(py, Ok(calls::remove_mem_region(&info)), none)
    }

    fn get_protocol_features(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_protocol_features()), int)
    }

    fn set_protocol_features(&self, py: Python<'_>, features: U64) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_protocol_features(features.0)), none)
    }

    fn get_queue_num(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_queue_num()), int)
    }

    fn set_vring_enable(
        &self,
        py: Python<'_>,
        index: U32,
        enable: bool,
    ) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_vring_enable(index.0, enable)), none)
    }

    fn set_vring_endian(
        &self,
        py: Python<'_>,
        index: U32,
        big_endian: bool,
    ) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_vring_endian(index.0, big_endian)), none)
    }

    fn vring_kick(&self, py: Python<'_>, index: U32) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::vring_kick(index.0)), none)
    }

    #[pyo3(signature = (offset, size, flags = U32(0)), text_signature = "(self, offset, size, flags=0)")]
    fn get_config(
        &self,
        py: Python<'_>,
        offset: U32,
        size: U32,
        flags: U32,
    ) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_config(offset.0, size.0, flags.0)), bytes)
    }

    #[pyo3(signature = (offset, data, flags = U32(0)), text_signature = "(self, offset, data, flags=0)")]
    fn set_config(
        &self,
        py: Python<'_>,
        offset: U32,
        data: Vec<u8>,
        flags: U32,
    ) -> PyResult<PyPendingCall> {
        self.start(py, calls::set_config(offset.0, &data, flags.0), none)
    }

    fn set_backend_req_fd(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        let (near, far) = UnixStream::pair().map_err(PyErr::from)?;
        let far = std::os::fd::OwnedFd::from(far);
        let call = calls::set_backend_req_fd(near, std::os::fd::AsFd::as_fd(&far));
        // The far end is sent at once; our copy closes when `far` drops after the send.
        self.start(py, Ok(call), |py, ch| {
            Ok(Py::new(py, PyFrontendChannel::new(ch))?.into_any())
        })
    }

    fn get_inflight_fd(
        &self,
        py: Python<'_>,
        num_queues: U16,
        queue_size: U16,
    ) -> PyResult<PyPendingCall> {
        self.start(
            py,
            Ok(calls::get_inflight_fd(num_queues.0, queue_size.0)),
            |py, (d, fd)| {
                let tuple = (
                    d.mmap_size,
                    d.mmap_offset,
                    d.num_queues,
                    d.queue_size,
                    FileDescriptor::new(fd),
                );
                Ok(tuple.into_pyobject(py)?.into_any().unbind())
            },
        )
    }

    #[allow(clippy::too_many_arguments)] // mirrors the Python signature
    fn set_inflight_fd(
        &self,
        py: Python<'_>,
        mmap_size: U64,
        mmap_offset: U64,
        num_queues: U16,
        queue_size: U16,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<PyPendingCall> {
        let fd = raw_fd_of(fd)?;
        let desc = InflightDesc {
            mmap_size: mmap_size.0,
            mmap_offset: mmap_offset.0,
            num_queues: num_queues.0,
            queue_size: queue_size.0,
        };
        self.start(py, Ok(calls::set_inflight_fd(&desc, borrow(fd))), none)
    }

    fn get_max_mem_slots(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_max_mem_slots()), int)
    }

    fn reset_device(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::reset_device()), none)
    }

    fn set_status(&self, py: Python<'_>, status: u8) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::set_status(status)), none)
    }

    fn get_status(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_status()), int)
    }

    fn net_set_mtu(&self, py: Python<'_>, mtu: U64) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::net_set_mtu(mtu.0)), none)
    }

    fn send_rarp(&self, py: Python<'_>, mac: [u8; 6]) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::send_rarp(mac)), none)
    }

    fn gpu_set_socket(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<PyPendingCall> {
        let fd = raw_fd_of(fd)?;
        self.start(py, Ok(calls::gpu_set_socket(borrow(fd))), none)
    }

    fn iotlb_msg(
        &self,
        py: Python<'_>,
        iova: U64,
        size: U64,
        uaddr: U64,
        perm: u8,
        kind: u8,
    ) -> PyResult<PyPendingCall> {
        let msg = IotlbPayload {
            iova: iova.0,
            size: size.0,
            uaddr: uaddr.0,
            perm,
            kind,
        };
        self.start(py, Ok(calls::iotlb_msg(&msg)), none)
    }

    fn get_shared_object(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_shared_object(uuid)), file)
    }

    fn set_device_state_fd(
        &self,
        py: Python<'_>,
        direction: U32,
        phase: U32,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<PyPendingCall> {
        let fd = raw_fd_of(fd)?;
        self.start(
            py,
            Ok(calls::set_device_state_fd(direction.0, phase.0, borrow(fd))),
            |py, ours| match ours {
                Some(fd) => file(py, fd),
                None => Ok(py.None()),
            },
        )
    }

    fn get_shmem_config(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::get_shmem_config()), |py, c| {
            Ok(c.regions().into_pyobject(py)?.into_any().unbind())
        })
    }

    fn check_device_state(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::check_device_state()), none)
    }

    fn postcopy_advise(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::postcopy_advise()), file)
    }

    fn postcopy_listen(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::postcopy_listen()), none)
    }

    fn postcopy_end(&self, py: Python<'_>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::postcopy_end()), none)
    }

    fn create_crypto_session(&self, py: Python<'_>, params: Vec<u8>) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::create_crypto_session(&params)), bytes)
    }

    fn close_crypto_session(&self, py: Python<'_>, session_id: U64) -> PyResult<PyPendingCall> {
        self.start(py, Ok(calls::close_crypto_session(session_id.0)), none)
    }

    fn __repr__(&self) -> String {
        format!("<FrontendCalls fd={}>", self.fe.socket_fd())
    }
}
