//! Virtqueues for Python: `DeviceQueue` (the device side, over the core's `DeviceQueue`)
//! and `Virtqueue` (the driver side, over `SplitDriver` / `PackedDriver`).
//!
//! Each queue owns a snapshot of the guest memory it was built with (so the mappings stay
//! alive) and its ring state behind a mutex. The mutex is never held while the GIL is being
//! acquired: large batches lock it inside `py.detach`, everything else locks it with the GIL
//! held and releases it before building Python objects. The hot paths return plain lists
//! and tuples built here; Python never loops per descriptor.

use std::sync::{Mutex, MutexGuard};

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::convert::{uint_args, U32, U64};
use pyo3::types::PyBytes;
use vhost_core::memory::GuestMemory as CoreMemory;
use vhost_core::vring::{
    DescriptorChain as CoreChain, DeviceQueue as CoreDeviceQueue, PackedDriver, RingLayout,
    SplitDriver, VringError,
};

use crate::errors::{invalid_param, vring_caller_error, vring_error, IntoPyResult};
use crate::memory::PyGuestMemory;

/// Batches larger than this run with the GIL released.
const DETACH_BATCH: usize = 16;
/// Copies larger than this run with the GIL released.
const DETACH_BYTES: usize = 64 * 1024;

/// (gpa, len, writable) of one segment.
type SegmentTuple = (u64, u32, bool);

fn layout(packed: bool, size: u32, desc: u64, avail: u64, used: u64) -> PyResult<RingLayout> {
    RingLayout::new(packed, size, desc, avail, used).py_err()
}

/// A ring's size given as an argument: a size the format refuses is the caller's
/// `InvalidParamError`; anything else converts as usual.
fn size_arg<T>(r: vhost_core::vring::Result<T>) -> PyResult<T> {
    r.map_err(|e| match e {
        VringError::InvalidSize(_) => invalid_param(e.to_string()),
        e => vring_error(e),
    })
}

/// Bytes of the three areas of a ring of `size` entries (`RingLayout::area_sizes`).
#[pyfunction]
#[pyo3(signature = (size, packed = false))]
pub fn ring_sizes(size: U32, packed: bool) -> PyResult<(u64, u64, u64)> {
    let [desc, avail, used] = size_arg(RingLayout::area_sizes(size.0, packed))?;
    Ok((desc, avail, used))
}

/// Guest addresses `(desc, avail, used)` of a ring placed from `base_gpa` rounded up to
/// 16 (`RingLayout::place`).
#[pyfunction]
#[pyo3(signature = (base_gpa, size, packed = false))]
pub fn place_rings(base_gpa: U64, size: U32, packed: bool) -> PyResult<(u64, u64, u64)> {
    let l = size_arg(RingLayout::place(size.0, base_gpa.0, packed))?;
    Ok((l.desc(), l.avail_or_driver(), l.used_or_device()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A popped buffer: `head` (split: descriptor index; packed: buffer id), its segments
/// `(gpa, len, writable)` with the readable ones first, and the byte totals.
#[pyclass(module = "vhost._core", name = "DescriptorChain", frozen)]
pub struct PyDescriptorChain {
    #[pyo3(get)]
    pub(crate) head: u16,
    #[pyo3(get)]
    segments: Vec<SegmentTuple>,
    #[pyo3(get)]
    readable_len: u32,
    #[pyo3(get)]
    pub(crate) writable_len: u32,
}

impl PyDescriptorChain {
    pub(crate) fn from_core(c: CoreChain) -> Self {
        PyDescriptorChain {
            head: c.head,
            readable_len: c.readable_len(),
            writable_len: c.writable_len(),
            segments: c
                .segments
                .iter()
                .map(|s| (s.addr, s.len, s.writable))
                .collect(),
        }
    }
}

#[pymethods]
impl PyDescriptorChain {
    fn __len__(&self) -> usize {
        self.segments.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<DescriptorChain head={} segments={} readable={} writable={}>",
            self.head,
            self.segments.len(),
            self.readable_len,
            self.writable_len
        )
    }
}

// ------------------------------------------------------------------------------------------
// Device side
// ------------------------------------------------------------------------------------------

struct DeviceInner {
    mem: CoreMemory,
    ring: CoreDeviceQueue,
}

/// The device side of a virtqueue (a back-end consuming a ring).
#[pyclass(module = "vhost._core", name = "DeviceQueue", frozen)]
pub struct PyDeviceQueue {
    inner: Mutex<DeviceInner>,
    layout: RingLayout,
    packed: bool,
    size: u16,
}

impl PyDeviceQueue {
    fn build(
        mem: CoreMemory,
        layout: RingLayout,
        event_idx: bool,
        indirect: bool,
    ) -> PyResult<Self> {
        layout.check_memory(&mem).py_err()?;
        let ring = CoreDeviceQueue::new(layout, event_idx, indirect).py_err()?;
        Ok(PyDeviceQueue {
            inner: Mutex::new(DeviceInner { mem, ring }),
            layout,
            packed: layout.is_packed(),
            size: layout.size(),
        })
    }

    fn add_used_checked(&self, py: Python<'_>, used: Vec<(u16, u32)>) -> PyResult<()> {
        let r = if used.len() > DETACH_BATCH {
            py.detach(|| {
                let DeviceInner { mem, ring } = &mut *lock(&self.inner);
                ring.add_used_batch(mem, &used)
            })
        } else {
            let DeviceInner { mem, ring } = &mut *lock(&self.inner);
            ring.add_used_batch(mem, &used)
        };
        r.map_err(vring_caller_error)
    }
}

#[pymethods]
impl PyDeviceQueue {
    /// A queue whose ring areas are at guest-physical addresses `desc`, `avail` (packed:
    /// driver event area) and `used` (packed: device event area); validated (size,
    /// alignment, inside memory).
    #[new]
    #[pyo3(signature = (memory, size, desc, avail, used, *, packed = false, event_idx = false, indirect = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        memory: PyRef<'_, PyGuestMemory>,
        size: U32,
        desc: U64,
        avail: U64,
        used: U64,
        packed: bool,
        event_idx: bool,
        indirect: bool,
    ) -> PyResult<Self> {
        let (size, desc, avail, used) = (size.0, desc.0, avail.0, used.0);
        let l = layout(packed, size, desc, avail, used)?;
        Self::build(memory.snapshot(), l, event_idx, indirect)
    }

    /// The same from the front-end's virtual addresses (SET_VRING_ADDR), converted with
    /// `GuestMemory.user_to_gpa`.
    #[staticmethod]
    #[pyo3(signature = (memory, size, desc, avail, used, *, packed = false, event_idx = false, indirect = true))]
    #[allow(clippy::too_many_arguments)]
    fn from_user(
        memory: PyRef<'_, PyGuestMemory>,
        size: U32,
        desc: U64,
        avail: U64,
        used: U64,
        packed: bool,
        event_idx: bool,
        indirect: bool,
    ) -> PyResult<Self> {
        let (size, desc, avail, used) = (size.0, desc.0, avail.0, used.0);
        let mem = memory.snapshot();
        let l = RingLayout::from_user(&mem, packed, size, desc, avail, used).py_err()?;
        Self::build(mem, l, event_idx, indirect)
    }

    /// Rebinds the queue to a new memory table (after SET_MEM_TABLE); the ring areas must
    /// still be inside it.
    fn set_memory(&self, memory: PyRef<'_, PyGuestMemory>) -> PyResult<()> {
        let mem = memory.snapshot();
        self.layout.check_memory(&mem).py_err()?;
        lock(&self.inner).mem = mem;
        Ok(())
    }

    /// Pops up to `max` available chains.
    #[pyo3(signature = (max = 64))]
    fn pop_batch(&self, py: Python<'_>, max: usize) -> PyResult<Vec<PyDescriptorChain>> {
        let chains = if max > DETACH_BATCH {
            py.detach(|| {
                let DeviceInner { mem, ring } = &mut *lock(&self.inner);
                ring.pop_batch(mem, max)
            })
        } else {
            let DeviceInner { mem, ring } = &mut *lock(&self.inner);
            ring.pop_batch(mem, max)
        }
        .py_err()?;
        Ok(chains
            .into_iter()
            .map(PyDescriptorChain::from_core)
            .collect())
    }

    /// Copies up to `length` (default: all) of the chain's readable bytes from `offset` on,
    /// segment by segment, without a Python loop.
    #[pyo3(signature = (chain, offset = 0, length = None))]
    fn read_chain<'py>(
        &self,
        py: Python<'py>,
        chain: PyRef<'_, PyDescriptorChain>,
        offset: usize,
        length: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mem = lock(&self.inner).mem.clone();
        read_from_chain(py, &mem, &chain, offset, length)
    }

    /// Writes `data` into the chain's writable segments from `offset` on; returns the bytes
    /// written (what fits).
    #[pyo3(signature = (chain, data, offset = 0))]
    fn write_chain(
        &self,
        py: Python<'_>,
        chain: PyRef<'_, PyDescriptorChain>,
        data: &Bound<'_, PyAny>,
        offset: usize,
    ) -> PyResult<usize> {
        let mem = lock(&self.inner).mem.clone();
        write_into_chain(py, &mem, &chain, data, offset)
    }

    /// Returns chain `head` as used, with `length` bytes written into it.
    fn add_used(
        &self,
        py: Python<'_>,
        head: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        uint_args!("add_used"; head: U16, length: U32);
        self.add_used_checked(py, vec![(head, length)])
    }

    /// Returns several chains `(head, length)` at once (one index update).
    fn add_used_batch(
        &self,
        py: Python<'_>,
        used: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)>,
    ) -> PyResult<()> {
        let used = used
            .iter()
            .map(|(head, length)| {
                uint_args!("add_used_batch"; head: U16, length: U32);
                Ok((head, length))
            })
            .collect::<PyResult<Vec<_>>>()?;
        self.add_used_checked(py, used)
    }

    /// Whether the driver wants an interrupt for what was returned since the last call.
    fn needs_notification(&self) -> PyResult<bool> {
        let mut inner = lock(&self.inner);
        let DeviceInner { mem, ring } = &mut *inner;
        ring.needs_notification(mem).py_err()
    }

    /// Enables or disables kicks; after enabling, returns whether buffers are already
    /// available (process them before sleeping).
    fn set_notification(&self, enable: bool) -> PyResult<bool> {
        let mut inner = lock(&self.inner);
        let DeviceInner { mem, ring } = &mut *inner;
        ring.set_notification(mem, enable).py_err()
    }

    /// The ring base in vhost-user's encoding, what GET_VRING_BASE answers and
    /// SET_VRING_BASE restores: split, the next avail index; packed, the next avail slot in
    /// bits 0-14 with its wrap counter in bit 15 and the next used slot in bits 16-30 with
    /// its wrap counter in bit 31 (a value of 16 bits means used = avail). Restoring a
    /// split base re-reads the used index from the ring, as the native daemon does, so a
    /// Python back-end and the daemon resume a ring alike.
    #[getter]
    fn get_base(&self) -> u32 {
        lock(&self.inner).ring.base()
    }

    #[setter]
    fn set_base(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let base = U32::named(value, "DeviceQueue.base")?;
        let DeviceInner { mem, ring } = &mut *lock(&self.inner);
        ring.restore(mem, base).map_err(vring_caller_error)
    }

    /// The next avail position to process (packed: slot in bits 0-14, wrap counter in
    /// bit 15); the low half of :attr:`base`.
    #[getter]
    fn next_avail(&self) -> u32 {
        lock(&self.inner).ring.base() & 0xffff
    }

    /// Where the next used element goes (packed: slot in bits 0-14, wrap counter in bit 15).
    #[getter]
    fn next_used(&self) -> u32 {
        lock(&self.inner).ring.next_used_position()
    }

    /// True after the ring was found corrupt: every data-path call raises `QueueError`.
    #[getter]
    fn broken(&self) -> bool {
        lock(&self.inner).ring.is_broken()
    }

    #[getter]
    fn size(&self) -> u16 {
        self.size
    }

    #[getter]
    fn packed(&self) -> bool {
        self.packed
    }

    fn __repr__(&self) -> String {
        format!(
            "<DeviceQueue {} size={}>",
            if self.packed { "packed" } else { "split" },
            self.size
        )
    }
}

/// Copies up to `length` (default: all) of `chain`'s readable bytes from `offset` on.
pub(crate) fn read_from_chain<'py>(
    py: Python<'py>,
    mem: &CoreMemory,
    chain: &PyDescriptorChain,
    offset: usize,
    length: Option<usize>,
) -> PyResult<Bound<'py, PyBytes>> {
    let total = chain.readable_len as usize;
    let start = offset.min(total);
    let want = length.map_or(total - start, |n| n.min(total - start));
    // A hostile chain can repeat the same memory up to 4 GiB: bound the allocation by
    // what is mapped, as GuestMemory.read does, so it is an error and not an abort.
    if want as u64 > mem.total_size() {
        return Err(vhost_core::memory::MemoryError::OutOfRange {
            addr: chain.segments.first().map_or(0, |s| s.0),
            len: want as u64,
        })
        .py_err();
    }
    let mut out = vec![0u8; want];
    let segs = chain.segments.iter().filter(|s| !s.2).map(|s| (s.0, s.1));
    let copy = |mem: &CoreMemory| {
        walk_segments(segs, start, want, |gpa, at, n| {
            mem.read(gpa, &mut out[at..at + n])
        })
    };
    if want > DETACH_BYTES {
        py.detach(|| copy(mem))
    } else {
        copy(mem)
    }
    .py_err()?;
    Ok(PyBytes::new(py, &out))
}

/// Writes `data` into `chain`'s writable segments from `offset` on; returns the bytes
/// written (what fits).
pub(crate) fn write_into_chain(
    py: Python<'_>,
    mem: &CoreMemory,
    chain: &PyDescriptorChain,
    data: &Bound<'_, PyAny>,
    offset: usize,
) -> PyResult<usize> {
    let buf = PyBuffer::<u8>::get(data)?;
    if !buf.is_c_contiguous() {
        return Err(invalid_param("write_chain needs a contiguous buffer"));
    }
    let total = chain.writable_len as usize;
    let start = offset.min(total);
    let want = buf.len_bytes().min(total - start);
    let ptr = buf.buf_ptr() as usize;
    let segs = chain.segments.iter().filter(|s| s.2).map(|s| (s.0, s.1));
    let copy = |mem: &CoreMemory| {
        // SAFETY: the buffer export (held by `buf`) pins `len_bytes()` >= `want`
        // contiguous bytes for as long as `buf` lives, which outlasts this call; they
        // are only read.
        let src = unsafe { std::slice::from_raw_parts(ptr as *const u8, want) };
        walk_segments(segs, start, want, |gpa, at, n| {
            mem.write(gpa, &src[at..at + n])
        })
    };
    if want > DETACH_BYTES {
        py.detach(|| copy(mem))
    } else {
        copy(mem)
    }
    .py_err()?;
    Ok(want)
}

/// Calls `f(gpa, at, n)` for each piece of the byte range [start, start+want) of the
/// concatenated segments, `at` being the offset in that range.
fn walk_segments<E>(
    segs: impl Iterator<Item = (u64, u32)>,
    start: usize,
    want: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let mut skip = start;
    let mut at = 0usize;
    for (gpa, len) in segs {
        if at == want {
            break;
        }
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(want - at);
        f(gpa + skip as u64, at, n)?;
        at += n;
        skip = 0;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Driver side
// ------------------------------------------------------------------------------------------

enum DriverRing {
    Split(SplitDriver),
    Packed(PackedDriver),
}

struct DriverInner {
    mem: CoreMemory,
    ring: DriverRing,
}

macro_rules! driver_call {
    ($inner:expr, $q:ident, $mem:ident => $e:expr) => {{
        let DriverInner { mem: $mem, ring } = &mut *$inner;
        match ring {
            DriverRing::Split($q) => $e,
            DriverRing::Packed($q) => $e,
        }
    }};
}

/// The driver side of a virtqueue (a front-end or test rig filling a ring).
#[pyclass(module = "vhost._core", name = "Virtqueue", frozen)]
pub struct PyVirtqueue {
    inner: Mutex<DriverInner>,
    layout: RingLayout,
    event_idx: bool,
}

#[pymethods]
impl PyVirtqueue {
    /// A ring at guest-physical addresses `desc`, `avail` (packed: driver event area) and
    /// `used` (packed: device event area); the areas are zeroed here.
    #[new]
    #[pyo3(signature = (memory, size, desc, avail, used, *, packed = false, event_idx = false))]
    fn new(
        memory: PyRef<'_, PyGuestMemory>,
        size: U32,
        desc: U64,
        avail: U64,
        used: U64,
        packed: bool,
        event_idx: bool,
    ) -> PyResult<Self> {
        let (size, desc, avail, used) = (size.0, desc.0, avail.0, used.0);
        let mem = memory.snapshot();
        let l = layout(packed, size, desc, avail, used)?;
        l.check_memory(&mem).py_err()?;
        let mut ring = if packed {
            DriverRing::Packed(PackedDriver::new(l, event_idx).py_err()?)
        } else {
            DriverRing::Split(SplitDriver::new(l, event_idx).py_err()?)
        };
        match &mut ring {
            DriverRing::Split(q) => q.init(&mem),
            DriverRing::Packed(q) => q.init(&mem),
        }
        .py_err()?;
        Ok(PyVirtqueue {
            inner: Mutex::new(DriverInner { mem, ring }),
            layout: l,
            event_idx,
        })
    }

    /// Rebinds the queue to a new memory snapshot; the ring areas must still be inside it.
    fn set_memory(&self, memory: PyRef<'_, PyGuestMemory>) -> PyResult<()> {
        let mem = memory.snapshot();
        self.layout.check_memory(&mem).py_err()?;
        lock(&self.inner).mem = mem;
        Ok(())
    }

    /// Adds a buffer of device-readable then device-writable `(gpa, len)` segments; returns
    /// its head (split) or buffer id (packed). Visible to the device after `publish`.
    fn add(&self, readable: Vec<(u64, u32)>, writable: Vec<(u64, u32)>) -> PyResult<u16> {
        let mut inner = lock(&self.inner);
        driver_call!(inner, q, mem => q.add(mem, &readable, &writable)).map_err(vring_caller_error)
    }

    /// Makes the buffers added so far visible to the device.
    fn publish(&self) -> PyResult<()> {
        let mut inner = lock(&self.inner);
        driver_call!(inner, q, mem => q.publish(mem)).py_err()
    }

    /// Whether the device wants a kick for what was published since the last call.
    fn kick_needed(&self) -> PyResult<bool> {
        let mut inner = lock(&self.inner);
        driver_call!(inner, q, mem => q.kick_needed(mem)).py_err()
    }

    /// The buffers the device returned: `(head, bytes written)`.
    fn poll_used(&self, py: Python<'_>) -> PyResult<Vec<(u16, u32)>> {
        let in_flight = {
            let inner = lock(&self.inner);
            match &inner.ring {
                DriverRing::Split(q) => q.in_flight(),
                DriverRing::Packed(q) => q.in_flight(),
            }
        };
        let poll = || {
            let mut inner = lock(&self.inner);
            driver_call!(inner, q, mem => q.poll_used(mem))
        };
        if usize::from(in_flight) > DETACH_BATCH {
            py.detach(poll)
        } else {
            poll()
        }
        .py_err()
    }

    /// Asks the device for interrupts (enable) or not; after enabling, returns whether used
    /// buffers are already waiting.
    fn set_used_notification(&self, enable: bool) -> PyResult<bool> {
        let mut inner = lock(&self.inner);
        driver_call!(inner, q, mem => q.set_used_notification(mem, enable)).py_err()
    }

    #[getter]
    fn num_free(&self) -> usize {
        match &lock(&self.inner).ring {
            DriverRing::Split(q) => q.num_free(),
            DriverRing::Packed(q) => q.num_free(),
        }
    }

    /// Buffers added and not yet returned by `poll_used`.
    #[getter]
    fn in_flight(&self) -> u16 {
        match &lock(&self.inner).ring {
            DriverRing::Split(q) => q.in_flight(),
            DriverRing::Packed(q) => q.in_flight(),
        }
    }

    #[getter]
    fn broken(&self) -> bool {
        match &lock(&self.inner).ring {
            DriverRing::Split(q) => q.is_broken(),
            DriverRing::Packed(q) => q.is_broken(),
        }
    }

    #[getter]
    fn size(&self) -> u16 {
        self.layout.size()
    }

    #[getter]
    fn packed(&self) -> bool {
        self.layout.is_packed()
    }

    /// Whether the ring uses event suppression by index (VIRTIO_F_EVENT_IDX), as built.
    #[getter]
    fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Guest-physical address of the descriptor table / ring.
    #[getter]
    fn desc(&self) -> u64 {
        self.layout.desc()
    }

    /// Guest-physical address of the avail ring (packed: driver event area).
    #[getter]
    fn avail(&self) -> u64 {
        self.layout.avail_or_driver()
    }

    /// Guest-physical address of the used ring (packed: device event area).
    #[getter]
    fn used(&self) -> u64 {
        self.layout.used_or_device()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Virtqueue {} size={} desc={:#x}>",
            if self.layout.is_packed() {
                "packed"
            } else {
                "split"
            },
            self.layout.size(),
            self.layout.desc()
        )
    }
}
