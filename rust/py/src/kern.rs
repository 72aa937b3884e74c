//! `KernelDevice` for Python: the generic vhost ioctls plus vhost-net and vhost-vsock,
//! over `vhost_core::kern`. Each method copies its inputs, releases the GIL for the
//! syscall, and converts a `kern::Error` with [`crate::errors::kern_error`]; the shared
//! `VhostBackend` methods come from [`crate::backend_methods`].

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use vhost_core::backend::VhostBackend;
use vhost_core::kern::{net, vsock, Error as KernError, IotlbMessage, VhostDevice};

use crate::backend_methods::{call_shared, vhost_backend_pymethods, PyVhostBackend};
use crate::convert::uint_args;
use crate::errors::IntoPyResult;
use crate::fd::{borrow, dup_of, opt_fd, Closable};

/// A decoded IOTLB message for Python: (iova, size, uaddr, perm, type, asid).
pub type IotlbTuple = (u64, u64, u64, u8, u8, u32);

/// Seconds (None: forever) as poll(2) milliseconds.
pub fn timeout_ms(timeout: Option<f64>) -> PyResult<i32> {
    Ok(match crate::convert::timeout("timeout", timeout)? {
        None => -1,
        Some(d) => i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
    })
}

impl PyVhostBackend for PyKernelDevice {
    fn with_backend<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&dyn VhostBackend) -> vhost_core::Result<T> + Send,
    ) -> PyResult<T> {
        call_shared(py, self.get(), f)
    }
}

/// A kernel vhost device (`/dev/vhost-net`, `/dev/vhost-vsock`...), driven by ioctls;
/// `vhost.kern.KernelBackend` wraps it.
#[pyclass(module = "vhost._core", name = "KernelDevice", frozen)]
pub struct PyKernelDevice {
    inner: Closable<VhostDevice>,
}

impl PyKernelDevice {
    pub fn from_arc(dev: Arc<VhostDevice>) -> Self {
        PyKernelDevice {
            inner: Closable::from_arc("vhost device", dev),
        }
    }

    /// The device for one call; the Arc keeps the fd open even if another thread closes
    /// this object meanwhile, so a call never reaches a recycled fd number.
    fn get(&self) -> PyResult<Arc<VhostDevice>> {
        self.inner.get()
    }

    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&VhostDevice) -> Result<T, KernError> + Send,
    ) -> PyResult<T> {
        let dev = self.get()?;
        crate::wait::call(py, || f(&dev))
    }
}

vhost_backend_pymethods!(PyKernelDevice {
    /// Opens a vhost character device and checks that it is one (ENOTTY otherwise).
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let dev = py.detach(|| VhostDevice::open(&path)).py_err()?;
        Ok(Self::from_arc(Arc::new(dev)))
    }

    /// Adopts a duplicate of an open fd (the caller keeps its own).
    #[staticmethod]
    fn from_fd(fd: &Bound<'_, PyAny>) -> PyResult<Self> {
        let owned = dup_of(fd)?;
        let dev = VhostDevice::from_fd(owned).py_err()?;
        Ok(Self::from_arc(Arc::new(dev)))
    }

    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.get()?.as_raw_fd())
    }

    fn close(&self) {
        self.inner.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) {
        self.close();
    }

    fn get_backend_features(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, |d| d.get_backend_features())
    }

    fn set_backend_features(&self, py: Python<'_>, features: &Bound<'_, PyAny>) -> PyResult<()> {
        uint_args!("set_backend_features"; features: U64);
        self.call(py, |d| d.set_backend_features(features))
    }

    fn set_vring_endian(
        &self,
        py: Python<'_>,
        index: &Bound<'_, PyAny>,
        big_endian: bool,
    ) -> PyResult<()> {
        uint_args!("set_vring_endian"; index: U32);
        self.call(py, |d| d.set_vring_endian(index, big_endian))
    }

    fn get_vring_endian(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<bool> {
        uint_args!("get_vring_endian"; index: U32);
        self.call(py, |d| d.get_vring_endian(index))
    }

    fn set_vring_busyloop_timeout(
        &self,
        py: Python<'_>,
        index: &Bound<'_, PyAny>,
        usecs: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        uint_args!("set_vring_busyloop_timeout"; index: U32, usecs: U32);
        self.call(py, |d| d.set_vring_busyloop_timeout(index, usecs))
    }

    fn get_vring_busyloop_timeout(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<u32> {
        uint_args!("get_vring_busyloop_timeout"; index: U32);
        self.call(py, |d| d.get_vring_busyloop_timeout(index))
    }

    #[pyo3(signature = (index, fd))]
    fn net_set_backend(
        &self,
        py: Python<'_>,
        index: &Bound<'_, PyAny>,
        fd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        uint_args!("net_set_backend"; index: U32);
        let fd = opt_fd(fd)?;
        self.call(py, move |d| net::set_backend(d, index, fd.map(borrow)))
    }

    fn vsock_set_guest_cid(&self, py: Python<'_>, cid: &Bound<'_, PyAny>) -> PyResult<()> {
        uint_args!("vsock_set_guest_cid"; cid: U64);
        self.call(py, |d| vsock::set_guest_cid(d, cid))
    }

    fn vsock_set_running(&self, py: Python<'_>, running: bool) -> PyResult<()> {
        self.call(py, |d| vsock::set_running(d, running))
    }

    #[pyo3(signature = (iova, size, uaddr, perm, kind, asid = 0))]
    #[allow(clippy::too_many_arguments)] // one argument per message field
    fn send_iotlb(
        &self,
        py: Python<'_>,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
        kind: u8,
        asid: u32,
    ) -> PyResult<()> {
        let msg = IotlbMessage {
            iova,
            size,
            uaddr,
            perm,
            kind,
            asid,
        };
        self.call(py, move |d| d.send_iotlb(&msg))
    }

    /// Waits for a message from the kernel; None on timeout.
    #[pyo3(signature = (timeout = None))]
    fn recv_iotlb(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<IotlbTuple>> {
        let ms = timeout_ms(timeout)?;
        let msg = self.call(py, move |d| d.recv_iotlb(ms))?;
        Ok(msg.map(|m| (m.iova, m.size, m.uaddr, m.perm, m.kind, m.asid)))
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(d) => format!("<KernelDevice fd={}>", d.as_raw_fd()),
            Err(_) => "<KernelDevice closed>".into(),
        }
    }
});
