//! `VdpaDevice` for Python: the vDPA requests of `vhost_core::vdpa`, and the shared
//! `VhostBackend` methods (from [`crate::backend_methods`]; `set_mem_table` maps the regions
//! at IOVA = guest address). The other kernel vhost requests (backend features, IOTLB
//! reads) go through `device()`, a `KernelDevice` on the same fd.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vhost_core::backend::VhostBackend;
use vhost_core::vdpa::VhostVdpa;

use crate::backend_methods::{call_shared, vhost_backend_pymethods, PyVhostBackend};
use crate::errors::IntoPyResult;
use crate::fd::{borrow, opt_fd, Closable};
use crate::kern::PyKernelDevice;

impl PyVhostBackend for PyVdpaDevice {
    fn with_backend<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&dyn VhostBackend) -> vhost_core::Result<T> + Send,
    ) -> PyResult<T> {
        call_shared(py, self.get(), f)
    }
}

/// A vDPA device (`/dev/vhost-vdpa-N`): the vhost interface plus config space, status
/// and DMA mapping; `vhost.vdpa.VhostVdpa` wraps it.
#[pyclass(module = "vhost._core", name = "VdpaDevice", frozen)]
pub struct PyVdpaDevice {
    inner: Closable<VhostVdpa>,
}

impl PyVdpaDevice {
    fn get(&self) -> PyResult<Arc<VhostVdpa>> {
        self.inner.get()
    }

    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&VhostVdpa) -> vhost_core::kern::Result<T> + Send,
    ) -> PyResult<T> {
        let dev = self.get()?;
        crate::wait::call(py, || f(&dev))
    }
}

vhost_backend_pymethods!(PyVdpaDevice {
    /// Opens a vhost-vdpa character device; a missing path raises an error naming it.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let dev = py.detach(|| VhostVdpa::open(&path)).py_err()?;
        Ok(PyVdpaDevice {
            inner: Closable::new("vhost-vdpa device", dev),
        })
    }

    /// A `KernelDevice` sharing this fd, for the generic vhost requests.
    fn device(&self) -> PyResult<PyKernelDevice> {
        Ok(PyKernelDevice::from_arc(self.get()?.device().clone()))
    }

    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.get()?.device().as_raw_fd())
    }

    fn close(&self) {
        self.inner.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed()
    }

    fn get_device_id(&self, py: Python<'_>) -> PyResult<u32> {
        self.call(py, |v| v.get_device_id())
    }

    fn get_status(&self, py: Python<'_>) -> PyResult<u8> {
        self.call(py, |v| v.get_status())
    }

    fn set_status(&self, py: Python<'_>, status: u8) -> PyResult<()> {
        self.call(py, |v| v.set_status(status))
    }

    fn get_config<'py>(
        &self,
        py: Python<'py>,
        offset: u32,
        size: u32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.call(py, |v| v.get_config(offset, size))?;
        Ok(PyBytes::new(py, &data))
    }

    fn set_config(&self, py: Python<'_>, offset: u32, data: Vec<u8>) -> PyResult<()> {
        self.call(py, move |v| v.set_config(offset, &data))
    }

    fn set_vring_enable(&self, py: Python<'_>, index: u32, enable: bool) -> PyResult<()> {
        self.call(py, |v| v.set_vring_enable(index, enable))
    }

    fn get_vring_num(&self, py: Python<'_>) -> PyResult<u16> {
        self.call(py, |v| v.get_vring_num())
    }

    fn get_vring_size(&self, py: Python<'_>, index: u32) -> PyResult<u32> {
        self.call(py, |v| v.get_vring_size(index))
    }

    #[pyo3(signature = (fd))]
    fn set_config_call(&self, py: Python<'_>, fd: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let fd = opt_fd(fd)?;
        self.call(py, move |v| v.set_config_call(fd.map(borrow)))
    }

    fn get_iova_range(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        self.call(py, |v| v.get_iova_range())
    }

    fn get_config_size(&self, py: Python<'_>) -> PyResult<u32> {
        self.call(py, |v| v.get_config_size())
    }

    fn get_vqs_count(&self, py: Python<'_>) -> PyResult<u32> {
        self.call(py, |v| v.get_vqs_count())
    }

    fn get_group_num(&self, py: Python<'_>) -> PyResult<u32> {
        self.call(py, |v| v.get_group_num())
    }

    fn get_as_num(&self, py: Python<'_>) -> PyResult<u32> {
        self.call(py, |v| v.get_as_num())
    }

    fn get_vring_group(&self, py: Python<'_>, index: u32) -> PyResult<u32> {
        self.call(py, |v| v.get_vring_group(index))
    }

    fn get_vring_desc_group(&self, py: Python<'_>, index: u32) -> PyResult<u32> {
        self.call(py, |v| v.get_vring_desc_group(index))
    }

    fn set_group_asid(&self, py: Python<'_>, group: u32, asid: u32) -> PyResult<()> {
        self.call(py, |v| v.set_group_asid(group, asid))
    }

    fn suspend(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |v| v.suspend())
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |v| v.resume())
    }

    #[pyo3(signature = (iova, size, vaddr, readonly = false, asid = 0))]
    fn dma_map(
        &self,
        py: Python<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
        readonly: bool,
        asid: u32,
    ) -> PyResult<()> {
        self.call(py, |v| v.dma_map(iova, size, vaddr, readonly, asid))
    }

    #[pyo3(signature = (iova, size, asid = 0))]
    fn dma_unmap(&self, py: Python<'_>, iova: u64, size: u64, asid: u32) -> PyResult<()> {
        self.call(py, |v| v.dma_unmap(iova, size, asid))
    }

    #[pyo3(signature = (begin, asid = 0))]
    fn iotlb_batch(&self, py: Python<'_>, begin: bool, asid: u32) -> PyResult<()> {
        self.call(py, |v| v.batch(begin, asid))
    }

    fn mappings(&self) -> PyResult<Vec<(u32, u64, u64)>> {
        Ok(self.get()?.mappings())
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(d) => format!("<VdpaDevice fd={}>", d.device().as_raw_fd()),
            Err(_) => "<VdpaDevice closed>".into(),
        }
    }
});
