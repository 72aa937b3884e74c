//! `GuestMemory` for Python: a handle on an immutable snapshot of the core's guest memory,
//! with zero-copy views that keep their mapping alive.

use std::ffi::c_int;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use pyo3::buffer::PyBuffer;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::convert::U64;
use pyo3::types::{PyBytes, PyMemoryView};
use vhost_core::memory::{GuestMemory as CoreMemory, GuestRegion};

use crate::errors::{invalid_param, IntoPyResult};

/// (guest_phys_addr, memory_size, userspace_addr, mmap_offset, fd) of one region.
pub type RegionTuple = (u64, u64, u64, u64, i32);

/// Guest RAM as this process maps it (memfd-backed, shareable with a back-end), with
/// checked guest-address access.
#[pyclass(module = "vhost._core", name = "GuestMemory", frozen)]
pub struct PyGuestMemory {
    snapshot: RwLock<CoreMemory>,
}

impl PyGuestMemory {
    pub fn from_core(mem: CoreMemory) -> Self {
        PyGuestMemory {
            snapshot: RwLock::new(mem),
        }
    }

    pub fn snapshot(&self) -> CoreMemory {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, mem: CoreMemory) {
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = mem;
    }
}

#[pymethods]
impl PyGuestMemory {
    /// Guest RAM from sealed memfds: one region per (guest_phys_addr, size) pair.
    #[staticmethod]
    fn allocate(py: Python<'_>, layout: Vec<(u64, u64)>) -> PyResult<Self> {
        let mem = py.detach(|| CoreMemory::allocate(&layout)).py_err()?;
        Ok(Self::from_core(mem))
    }

    /// An empty memory, as a back-end has before SET_MEM_TABLE.
    #[staticmethod]
    fn empty() -> Self {
        Self::from_core(CoreMemory::default())
    }

    /// The regions, as `vhost.types.MemoryRegion` (fd borrowed from this memory).
    fn regions<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let class = MEMORY_REGION.import(py, "vhost.types", "MemoryRegion")?;
        self.snapshot()
            .regions()
            .iter()
            .map(|r| class.call1(region_tuple(r)))
            .collect()
    }

    #[getter]
    fn total_size(&self) -> u64 {
        self.snapshot().total_size()
    }

    fn __len__(&self) -> usize {
        self.snapshot().regions().len()
    }

    /// Copies `length` bytes at guest address `gpa` (may span contiguous regions).
    fn read<'py>(&self, py: Python<'py>, gpa: U64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let gpa = gpa.0;
        let mem = self.snapshot();
        // Bound the length by what is mapped before allocating: a huge length must be an
        // error, not an allocation failure that aborts the process.
        if length as u64 > mem.total_size() {
            return Err(vhost_core::memory::MemoryError::OutOfRange {
                addr: gpa,
                len: length as u64,
            })
            .py_err();
        }
        let mut out = vec![0u8; length];
        mem.read(gpa, &mut out).py_err()?;
        Ok(PyBytes::new(py, &out))
    }

    /// Copies into a writable buffer, without an intermediate bytes object.
    fn read_into(&self, py: Python<'_>, gpa: U64, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        let gpa = gpa.0;
        let buf = PyBuffer::<u8>::get(buffer)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(invalid_param(
                "read_into needs a writable, contiguous buffer",
            ));
        }
        let len = buf.len_bytes();
        let mem = self.snapshot();
        let ptr = buf.buf_ptr() as usize;
        py.detach(|| {
            // SAFETY: the buffer export (held by `buf`) pins a writable, contiguous area of
            // `len` bytes for as long as `buf` lives, which outlasts this call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            mem.read(gpa, dst)
        })
        .py_err()?;
        Ok(len)
    }

    /// Copies any bytes-like object to guest address `gpa`.
    fn write(&self, py: Python<'_>, gpa: U64, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let gpa = gpa.0;
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(invalid_param("write needs a contiguous buffer"));
        }
        let len = buf.len_bytes();
        let mem = self.snapshot();
        let ptr = buf.buf_ptr() as usize;
        py.detach(|| {
            // SAFETY: as in read_into; the source is only read.
            let src = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            mem.write(gpa, src)
        })
        .py_err()?;
        Ok(len)
    }

    /// A writable memoryview of [gpa, gpa+length), which must lie in one region. The view
    /// keeps the mapping alive even after the region is removed from this memory.
    fn view<'py>(
        &self,
        py: Python<'py>,
        gpa: U64,
        length: U64,
    ) -> PyResult<Bound<'py, PyMemoryView>> {
        let (gpa, length) = (gpa.0, length.0);
        let mem = self.snapshot();
        let ptr = mem.translate(gpa, length).py_err()?;
        let len = usize::try_from(length).map_err(|_| invalid_param("length too large"))?;
        let owner = Bound::new(
            py,
            GuestView {
                _mem: mem,
                ptr: ptr as usize,
                len,
            },
        )?;
        PyMemoryView::from(owner.as_any())
    }

    /// Guest physical address of a front-end virtual address.
    fn user_to_gpa(&self, uaddr: U64) -> PyResult<u64> {
        let uaddr = uaddr.0;
        self.snapshot().user_to_gpa(uaddr).py_err()
    }

    /// Front-end virtual address of a guest physical address (the inverse).
    fn gpa_to_user(&self, gpa: U64) -> PyResult<u64> {
        self.snapshot().gpa_to_user(gpa.0).py_err()
    }

    /// Checks that [gpa, gpa+length) lies inside one region.
    fn contains(&self, gpa: U64, length: U64) -> bool {
        let (gpa, length) = (gpa.0, length.0);
        self.snapshot().translate(gpa, length).is_ok()
    }

    fn __repr__(&self) -> String {
        let mem = self.snapshot();
        format!(
            "<GuestMemory {} regions, {} bytes>",
            mem.regions().len(),
            mem.total_size()
        )
    }
}

/// The facade's region type, which `regions()` returns (one type for a region everywhere).
static MEMORY_REGION: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> =
    pyo3::sync::PyOnceLock::new();

fn region_tuple(r: &Arc<GuestRegion>) -> RegionTuple {
    let info = r.info();
    (
        info.guest_phys_addr,
        info.memory_size,
        info.userspace_addr,
        info.mmap_offset,
        r.fd().as_raw_fd(),
    )
}

/// The exporter behind `GuestMemory.view`: owns a snapshot so the mapping outlives every
/// memoryview made from it.
#[pyclass(module = "vhost._core", frozen)]
pub struct GuestView {
    _mem: CoreMemory,
    ptr: usize,
    len: usize,
}

#[pymethods]
impl GuestView {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: `view` is the exporter slot Python gave us; ptr/len describe a live
        // writable mapping owned by `this._mem`, which lives as long as `slf`, which the
        // buffer holds a reference to (`obj`).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.ptr as *mut std::ffi::c_void,
                this.len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
}
