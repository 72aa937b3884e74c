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
use crate::convert::uint_args;
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

    fn set_status(&self, py: Python<'_>, status: &Bound<'_, PyAny>) -> PyResult<()> {
        uint_args!("set_status"; status: U8);
        self.call(py, |v| v.set_status(status))
    }

    fn get_config<'py>(
        &self,
        py: Python<'py>,
        offset: &Bound<'py, PyAny>,
        size: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        uint_args!("get_config"; offset: U32, size: U32);
        let data = self.call(py, |v| v.get_config(offset, size))?;
        Ok(PyBytes::new(py, &data))
    }

    fn set_config(&self, py: Python<'_>, offset: &Bound<'_, PyAny>, data: Vec<u8>) -> PyResult<()> {
        uint_args!("set_config"; offset: U32);
        self.call(py, move |v| v.set_config(offset, &data))
    }

    fn set_vring_enable(&self, py: Python<'_>, index: &Bound<'_, PyAny>, enable: bool) -> PyResult<()> {
        uint_args!("set_vring_enable"; index: U32);
        self.call(py, |v| v.set_vring_enable(index, enable))
    }

    fn get_vring_num(&self, py: Python<'_>) -> PyResult<u16> {
        self.call(py, |v| v.get_vring_num())
    }

    fn get_vring_size(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<u32> {
        uint_args!("get_vring_size"; index: U32);
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

    fn get_vring_group(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<u32> {
        uint_args!("get_vring_group"; index: U32);
        self.call(py, |v| v.get_vring_group(index))
    }

    fn get_vring_desc_group(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<u32> {
        uint_args!("get_vring_desc_group"; index: U32);
        self.call(py, |v| v.get_vring_desc_group(index))
    }

    fn set_group_asid(
        &self,
        py: Python<'_>,
        group: &Bound<'_, PyAny>,
        asid: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        uint_args!("set_group_asid"; group: U32, asid: U32);
        self.call(py, |v| v.set_group_asid(group, asid))
    }

    fn suspend(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |v| v.suspend())
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |v| v.resume())
    }

    #[pyo3(
        signature = (iova, size, vaddr, readonly = false, asid = None),
        text_signature = "(self, iova, size, vaddr, readonly=False, asid=0)"
    )]
    fn dma_map(
        &self,
        py: Python<'_>,
        iova: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        vaddr: &Bound<'_, PyAny>,
        readonly: bool,
        asid: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        uint_args!("dma_map"; iova: U64, size: U64, vaddr: U64, asid: U32 = 0);
        self.call(py, |v| v.dma_map(iova, size, vaddr, readonly, asid))
    }

    #[pyo3(
        signature = (iova, size, asid = None),
        text_signature = "(self, iova, size, asid=0)"
    )]
    fn dma_unmap(
        &self,
        py: Python<'_>,
        iova: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        asid: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        uint_args!("dma_unmap"; iova: U64, size: U64, asid: U32 = 0);
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
