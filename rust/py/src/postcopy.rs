//! `FaultResolver` for Python: the front-end's side of postcopy
//! (`vhost_core::user::postcopy`). Converts arguments and errors and releases the GIL
//! while waiting for a fault; translation and the ioctls live in the core.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use vhost_core::user::postcopy::{FaultResolver, PageFault, PostcopyRegion};

use crate::errors::{invalid_param, IntoPyResult};
use crate::fd::{dup_of, Closable};
use crate::wait;

/// `(guest_phys_addr, memory_size, backend_addr)` of one region.
pub(crate) type RegionTuple = (u64, u64, u64);
/// `(guest_phys_addr, backend_addr, write)` of one fault.
type FaultTuple = (u64, u64, bool);

pub(crate) fn region_tuple(r: &PostcopyRegion) -> RegionTuple {
    (r.guest_phys_addr, r.memory_size, r.backend_addr)
}

fn region_of(t: RegionTuple) -> PostcopyRegion {
    PostcopyRegion {
        guest_phys_addr: t.0,
        memory_size: t.1,
        backend_addr: t.2,
    }
}

fn fault_tuple(f: PageFault) -> FaultTuple {
    (f.guest_phys_addr, f.backend_addr, f.write)
}

/// A back-end's userfaultfd, front-end side (`vhost.postcopy.FaultResolver` wraps it).
#[pyclass(module = "vhost._core", name = "FaultResolver", frozen)]
pub struct PyFaultResolver {
    inner: Closable<FaultResolver>,
}

impl PyFaultResolver {
    /// The resolver, or `ClosedError`; the Arc keeps the fd open through a call that
    /// races a close.
    fn get(&self) -> PyResult<Arc<FaultResolver>> {
        self.inner.get()
    }
}

#[pymethods]
impl PyFaultResolver {
    /// `uffd` (an fd or an object with `fileno()`) stays the caller's: a duplicate is kept.
    #[new]
    #[pyo3(signature = (uffd, regions = Vec::new()))]
    fn new(uffd: &Bound<'_, PyAny>, regions: Vec<RegionTuple>) -> PyResult<Self> {
        let fd = dup_of(uffd)?;
        let resolver = FaultResolver::new(fd, regions.into_iter().map(region_of).collect());
        Ok(Self {
            inner: Closable::new("fault resolver", resolver),
        })
    }

    fn set_regions(&self, regions: Vec<RegionTuple>) -> PyResult<()> {
        self.get()?
            .set_regions(regions.into_iter().map(region_of).collect());
        Ok(())
    }

    fn regions(&self) -> PyResult<Vec<RegionTuple>> {
        Ok(self.get()?.regions().iter().map(region_tuple).collect())
    }

    #[pyo3(signature = (timeout = None))]
    fn next_fault(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<FaultTuple>> {
        let t = crate::convert::timeout("timeout", timeout)?;
        let r = self.get()?;
        let fault = wait::call(py, || r.next_fault(t))?;
        Ok(fault.map(fault_tuple))
    }

    fn copy(&self, py: Python<'_>, gpa: u64, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(invalid_param("copy needs a contiguous buffer"));
        }
        let bytes = buf.to_vec(py)?;
        let r = self.get()?;
        py.detach(|| r.copy(gpa, &bytes)).py_err()
    }

    fn zero(&self, py: Python<'_>, gpa: u64, length: u64) -> PyResult<bool> {
        let r = self.get()?;
        py.detach(|| r.zero(gpa, length)).py_err()
    }

    fn wake(&self, py: Python<'_>, gpa: u64, length: u64) -> PyResult<()> {
        let r = self.get()?;
        py.detach(|| r.wake(gpa, length)).py_err()
    }

    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.get()?.as_fd().as_raw_fd())
    }

    /// Closes this handle on the userfaultfd (once no call is still using it).
    fn close(&self) {
        self.inner.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed()
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(r) => format!(
                "<FaultResolver fd {}, {} regions>",
                r.as_fd().as_raw_fd(),
                r.regions().len()
            ),
            Err(_) => "<FaultResolver closed>".into(),
        }
    }
}
