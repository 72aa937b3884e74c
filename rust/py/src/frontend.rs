//! `Frontend` for Python: each method copies its inputs, releases the GIL, and calls the
//! core. No protocol logic here.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;

use crate::convert::{U16, U32, U64};
use pyo3::types::PyBytes;
use vhost_core::backend::VhostBackend;
use vhost_core::memory::RegionInfo;
use vhost_core::user::header::Header;
use vhost_core::user::payload::{InflightDesc, IotlbPayload};
use vhost_core::user::Frontend;

use crate::backend_methods::{region_list, vhost_backend_pymethods, PyVhostBackend};
use crate::channel::PyFrontendChannel;
use crate::errors::{invalid_param, IntoPyResult};
use crate::fd::{borrow, raw_fd_of, FileDescriptor};
use crate::wait;
use vhost_core::sys::connect_unix;

/// `send_raw`'s reply for Python: (code, flags, body, fds).
type RawReply = (u32, u32, Py<PyBytes>, Vec<FileDescriptor>);

/// `negotiate`'s arguments as the core takes them (the masks checked as u64s).
pub(crate) fn negotiate_options(
    features: Option<&Bound<'_, PyAny>>,
    protocol_features: Option<&Bound<'_, PyAny>>,
    packed: bool,
    event_idx: bool,
    log_all: bool,
) -> PyResult<vhost_core::user::frontend::NegotiateOptions> {
    let mask = |v: Option<&Bound<'_, PyAny>>, what| v.map(|v| U64::named(v, what)).transpose();
    Ok(vhost_core::user::frontend::NegotiateOptions {
        features: mask(features, "negotiate: features")?,
        protocol_features: mask(protocol_features, "negotiate: protocol_features")?,
        packed,
        event_idx,
        log_all,
    })
}

/// The native vhost-user front-end; `vhost.user.Frontend` adds types and context
/// management.
#[pyclass(module = "vhost._core", name = "Frontend", frozen)]
pub struct PyFrontend {
    inner: Arc<Frontend>,
    /// The socket fd, read without the connection's lock (a thread waiting for a reply
    /// holds that lock, GIL released): `fileno()` and the repr.
    fd: RawFd,
}

impl PyFrontend {
    pub fn from_core(inner: Frontend) -> Self {
        let fd = inner.socket_fd();
        PyFrontend {
            inner: Arc::new(inner),
            fd,
        }
    }

    /// The core front-end, shared with `FrontendCalls` (the same connection, driven by an
    /// event loop).
    pub fn core(&self) -> Arc<Frontend> {
        self.inner.clone()
    }

    /// One request, without the GIL and interruptible by Ctrl-C: an interrupted request
    /// leaves the connection closed (its reply could arrive later and be taken for the
    /// next one's), so later calls raise `ClosedError`.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Frontend) -> vhost_core::user::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = &*self.inner;
        wait::call(py, || f(inner))
    }
}

impl PyVhostBackend for PyFrontend {
    fn with_backend<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&dyn VhostBackend) -> vhost_core::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = &*self.inner;
        wait::call(py, || f(inner))
    }
}

vhost_backend_pymethods!(PyFrontend {
    /// Client mode: connects to a back-end listening at `path`. `timeout` bounds the
    /// connect itself (a back-end whose listen backlog is full) and then every reply.
    #[staticmethod]
    #[pyo3(signature = (path, timeout = Some(10.0)), text_signature = "(path, timeout=10.0)")]
    fn connect(py: Python<'_>, path: PathBuf, timeout: Option<f64>) -> PyResult<Self> {
        let t = crate::convert::timeout("timeout", timeout)?;
        let sock = wait::call(py, || connect_unix(&path, t))?;
        let fe = Frontend::new(sock).py_err()?;
        fe.set_timeout(t).py_err()?;
        Ok(Self::from_core(fe))
    }

    /// Adopts a connected socket (a duplicate of `sock`'s fd is taken).
    #[staticmethod]
    #[pyo3(signature = (sock, timeout = Some(10.0)), text_signature = "(sock, timeout=10.0)")]
    fn from_socket(sock: &Bound<'_, PyAny>, timeout: Option<f64>) -> PyResult<Self> {
        let fd = crate::fd::dup_of(sock)?;
        let fe = Frontend::new(std::os::unix::net::UnixStream::from(fd)).py_err()?;
        fe.set_timeout(crate::convert::timeout("timeout", timeout)?).py_err()?;
        Ok(Self::from_core(fe))
    }

    #[pyo3(signature = (timeout))]
    fn set_timeout(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = crate::convert::timeout("timeout", timeout)?;
        self.call(py, |f| f.set_timeout(t))
    }

    fn fileno(&self) -> RawFd {
        self.fd
    }

    /// The protocol features this front-end implements (`negotiate` acks no other).
    #[classattr]
    const IMPLEMENTED_PROTOCOL_FEATURES: u64 = vhost_core::user::frontend::IMPLEMENTED_PROTOCOL_FEATURES;

    /// The protocol features `negotiate` acks when not told which.
    #[classattr]
    const DEFAULT_PROTOCOL_FEATURES: u64 = vhost_core::user::frontend::DEFAULT_PROTOCOL_FEATURES;

    /// GET_FEATURES, SET_OWNER, the protocol features, SET_FEATURES, as the core's
    /// `Frontend::negotiate` decides; returns `(features, protocol features)` acked.
    #[pyo3(signature = (features = None, protocol_features = None, packed = false, event_idx = true, log_all = false))]
    fn negotiate(
        &self,
        py: Python<'_>,
        features: Option<&Bound<'_, PyAny>>,
        protocol_features: Option<&Bound<'_, PyAny>>,
        packed: bool,
        event_idx: bool,
        log_all: bool,
    ) -> PyResult<(u64, u64)> {
        let opts = negotiate_options(features, protocol_features, packed, event_idx, log_all)?;
        self.call(py, |f| f.negotiate(&opts))
    }

    /// Shuts the socket down from any thread, without the connection's lock: a thread
    /// waiting for a reply wakes up, the back-end sees the disconnect now.
    fn shutdown(&self) {
        self.inner.shutdown();
    }

    // The getters wait for the connection's lock with the GIL released: another thread
    // may hold it while it waits for a reply (ADVERSARIAL J7).
    #[getter]
    fn broken(&self, py: Python<'_>) -> bool {
        let inner = &*self.inner;
        py.detach(|| inner.is_broken())
    }

    #[getter]
    fn acked_features(&self, py: Python<'_>) -> u64 {
        let inner = &*self.inner;
        py.detach(|| inner.acked_features())
    }

    #[getter]
    fn acked_protocol_features(&self, py: Python<'_>) -> u64 {
        let inner = &*self.inner;
        py.detach(|| inner.acked_protocol_features())
    }

    #[getter]
    fn offered_features(&self, py: Python<'_>) -> Option<u64> {
        let inner = &*self.inner;
        py.detach(|| inner.offered_features())
    }

    #[getter]
    fn offered_protocol_features(&self, py: Python<'_>) -> Option<u64> {
        let inner = &*self.inner;
        py.detach(|| inner.offered_protocol_features())
    }

    fn add_mem_region(
        &self,
        py: Python<'_>,
        region: (u64, u64, u64, u64, Bound<'_, PyAny>),
    ) -> PyResult<()> {
        let (info, fd) = region_list(std::slice::from_ref(&region))?.remove(0);
        let fd = fd.ok_or_else(|| invalid_param("ADD_MEM_REG: the region has no fd"))?;
        self.call(py, move |f| f.add_mem_region(&info, borrow(fd)))
    }

    fn remove_mem_region(
        &self,
        py: Python<'_>,
        guest_phys_addr: U64,
        memory_size: U64,
        userspace_addr: U64,
        mmap_offset: U64,
    ) -> PyResult<()> {
        let (guest_phys_addr, memory_size, userspace_addr, mmap_offset) = (guest_phys_addr.0, memory_size.0, userspace_addr.0, mmap_offset.0);
        let info = RegionInfo {
            guest_phys_addr,
            memory_size,
            userspace_addr,
            mmap_offset,
        };
        self.call(py, move |f| f.remove_mem_region(&info))
    }

    fn get_protocol_features(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, |f| f.get_protocol_features())
    }

    fn set_protocol_features(&self, py: Python<'_>, features: U64) -> PyResult<()> {
        let features = features.0;
        self.call(py, |f| f.set_protocol_features(features))
    }

    fn get_queue_num(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, |f| f.get_queue_num())
    }

    fn set_vring_enable(&self, py: Python<'_>, index: U32, enable: bool) -> PyResult<()> {
        let index = index.0;
        self.call(py, |f| f.set_vring_enable(index, enable))
    }

    fn set_vring_endian(&self, py: Python<'_>, index: U32, big_endian: bool) -> PyResult<()> {
        let index = index.0;
        self.call(py, |f| f.set_vring_endian(index, big_endian))
    }

    fn vring_kick(&self, py: Python<'_>, index: U32) -> PyResult<()> {
        let index = index.0;
        self.call(py, |f| f.vring_kick(index))
    }

    #[pyo3(signature = (offset, size, flags = U32(0)), text_signature = "(self, offset, size, flags=0)")]
    fn get_config<'py>(
        &self,
        py: Python<'py>,
        offset: U32,
        size: U32,
        flags: U32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (offset, size, flags) = (offset.0, size.0, flags.0);
        let data = self.call(py, |f| f.get_config(offset, size, flags))?;
        Ok(PyBytes::new(py, &data))
    }

    #[pyo3(signature = (offset, data, flags = U32(0)), text_signature = "(self, offset, data, flags=0)")]
    fn set_config(&self, py: Python<'_>, offset: U32, data: Vec<u8>, flags: U32) -> PyResult<()> {
        let (offset, flags) = (offset.0, flags.0);
        self.call(py, move |f| f.set_config(offset, &data, flags))
    }

    /// Creates the back-end request channel and returns our end of it.
    fn set_backend_req_fd(&self, py: Python<'_>) -> PyResult<PyFrontendChannel> {
        let ch = self.call(py, |f| f.set_backend_req_fd())?;
        Ok(PyFrontendChannel::new(ch))
    }

    /// Returns (mmap_size, mmap_offset, num_queues, queue_size, fd).
    fn get_inflight_fd(
        &self,
        py: Python<'_>,
        num_queues: U16,
        queue_size: U16,
    ) -> PyResult<(u64, u64, u16, u16, FileDescriptor)> {
        let (num_queues, queue_size) = (num_queues.0, queue_size.0);
        let (d, fd) = self.call(py, |f| f.get_inflight_fd(num_queues, queue_size))?;
        Ok((
            d.mmap_size,
            d.mmap_offset,
            d.num_queues,
            d.queue_size,
            FileDescriptor::new(fd),
        ))
    }

    fn set_inflight_fd(
        &self,
        py: Python<'_>,
        mmap_size: U64,
        mmap_offset: U64,
        num_queues: U16,
        queue_size: U16,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (mmap_size, mmap_offset, num_queues, queue_size) = (mmap_size.0, mmap_offset.0, num_queues.0, queue_size.0);
        let fd = raw_fd_of(fd)?;
        let desc = InflightDesc {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        };
        self.call(py, move |f| f.set_inflight_fd(&desc, borrow(fd)))
    }

    fn get_max_mem_slots(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, |f| f.get_max_mem_slots())
    }

    fn reset_device(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |f| f.reset_device())
    }

    fn set_status(&self, py: Python<'_>, status: u8) -> PyResult<()> {
        self.call(py, |f| f.set_status(status))
    }

    fn get_status(&self, py: Python<'_>) -> PyResult<u8> {
        self.call(py, |f| f.get_status())
    }

    fn net_set_mtu(&self, py: Python<'_>, mtu: U64) -> PyResult<()> {
        let mtu = mtu.0;
        self.call(py, |f| f.net_set_mtu(mtu))
    }

    fn send_rarp(&self, py: Python<'_>, mac: [u8; 6]) -> PyResult<()> {
        self.call(py, |f| f.send_rarp(mac))
    }

    fn gpu_set_socket(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd = raw_fd_of(fd)?;
        self.call(py, move |f| f.gpu_set_socket(borrow(fd)))
    }

    fn iotlb_msg(
        &self,
        py: Python<'_>,
        iova: U64,
        size: U64,
        uaddr: U64,
        perm: u8,
        kind: u8,
    ) -> PyResult<()> {
        let (iova, size, uaddr) = (iova.0, size.0, uaddr.0);
        let msg = IotlbPayload {
            iova,
            size,
            uaddr,
            perm,
            kind,
        };
        self.call(py, move |f| f.iotlb_msg(&msg))
    }

    fn get_shared_object(&self, py: Python<'_>, uuid: [u8; 16]) -> PyResult<FileDescriptor> {
        Ok(FileDescriptor::new(
            self.call(py, |f| f.get_shared_object(uuid))?,
        ))
    }

    fn set_device_state_fd(
        &self,
        py: Python<'_>,
        direction: U32,
        phase: U32,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<Option<FileDescriptor>> {
        let (direction, phase) = (direction.0, phase.0);
        let fd = raw_fd_of(fd)?;
        let ours = self.call(py, move |f| {
            f.set_device_state_fd(direction, phase, borrow(fd))
        })?;
        Ok(ours.map(FileDescriptor::new))
    }

    /// `(shmid, size)` of each shared memory region, by shmid.
    fn get_shmem_config(&self, py: Python<'_>) -> PyResult<Vec<(u8, u64)>> {
        self.call(py, |f| f.get_shmem_config().map(|c| c.regions()))
    }

    fn check_device_state(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |f| f.check_device_state())
    }

    /// The back-end's whole device state (pipe, SET_DEVICE_STATE_FD, read, CHECK).
    fn save_device_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let state = self.call(py, |f| f.save_device_state())?;
        Ok(PyBytes::new(py, &state))
    }

    /// Loads `state` into the back-end (pipe, SET_DEVICE_STATE_FD, write, CHECK).
    fn load_device_state(&self, py: Python<'_>, state: &[u8]) -> PyResult<()> {
        let state = state.to_vec();
        self.call(py, move |f| f.load_device_state(&state))
    }

    fn postcopy_advise(&self, py: Python<'_>) -> PyResult<FileDescriptor> {
        Ok(FileDescriptor::new(self.call(py, |f| f.postcopy_advise())?))
    }

    fn postcopy_listen(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |f| f.postcopy_listen())
    }

    fn postcopy_end(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |f| f.postcopy_end())
    }

    fn postcopy_regions(&self, py: Python<'_>) -> Vec<crate::postcopy::RegionTuple> {
        let inner = &*self.inner;
        let regions = py.detach(|| inner.postcopy_regions());
        regions.iter().map(crate::postcopy::region_tuple).collect()
    }

    fn create_crypto_session<'py>(
        &self,
        py: Python<'py>,
        params: Vec<u8>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.call(py, move |f| f.create_crypto_session(&params))?;
        Ok(PyBytes::new(py, &out))
    }

    fn close_crypto_session(&self, py: Python<'_>, session_id: U64) -> PyResult<()> {
        let session_id = session_id.0;
        self.call(py, |f| f.close_crypto_session(session_id))
    }

    /// Sends a raw header and body (possibly malformed) with optional fds, for robustness
    /// testing; returns (code, flags, body, fds) of a reply when `expect_reply`.
    #[pyo3(signature = (code, flags, body, fds = Vec::new(), size = None, expect_reply = false))]
    #[allow(clippy::too_many_arguments)]
    fn send_raw(
        &self,
        py: Python<'_>,
        code: U32,
        flags: U32,
        body: Vec<u8>,
        fds: Vec<Bound<'_, PyAny>>,
        size: Option<u32>,
        expect_reply: bool,
    ) -> PyResult<Option<RawReply>> {
        let (code, flags) = (code.0, flags.0);
        let raw: Vec<RawFd> = fds.iter().map(raw_fd_of).collect::<PyResult<_>>()?;
        let header = Header {
            code,
            flags,
            size: size.unwrap_or(body.len() as u32),
        };
        let reply = self.call(py, move |f| {
            let borrowed: Vec<_> = raw.iter().map(|fd| borrow(*fd)).collect();
            f.send_raw(header, &body, &borrowed, expect_reply)
        })?;
        Ok(reply.map(|(h, b, fds)| {
            (
                h.code,
                h.flags,
                PyBytes::new(py, &b).unbind(),
                fds.into_iter().map(FileDescriptor::new).collect(),
            )
        }))
    }

    fn __repr__(&self) -> String {
        format!("<Frontend fd={}>", self.fd)
    }
});
