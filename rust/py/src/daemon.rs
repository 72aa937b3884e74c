//! The daemon framework for Python: `Daemon` (runs `vhost_core::daemon::Daemon` on its own
//! thread), the native `BlkDevice`, and the adapter that lets a Python object be a device
//! (`Batch` is what its `process` method receives).

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::convert::{U16, U32, U64};
use pyo3::types::PyBytes;
use vhost_core::daemon::{
    Daemon, DaemonEvent, DaemonRunner, DaemonSettings, DaemonStats, DeviceError, EventQueue,
    FrontendLink, Mode, StartError, VirtioDevice, DEFAULT_POSTCOPY_FAULT_TIMEOUT,
};
use vhost_core::devices::{BlkConfig, BlkDevice, Image, ImageError, Locking};
use vhost_core::memory::GuestMemory as CoreMemory;
use vhost_core::sys::PathError;
use vhost_core::vring::DescriptorChain as CoreChain;

use crate::convert::{self, uint_args};
use crate::errors::{closed, invalid_param, io_error, path_error, raise, user_error, vduse_error};
use crate::handler::shmem_pairs;
use crate::link::{resize_error, PyFrontendLink};
use crate::vring::{read_from_chain, write_into_chain, PyDescriptorChain};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------------------------------
// Native block device
// ------------------------------------------------------------------------------------------

/// A virtio-blk device in Rust over an image file or a RAM disk.
#[pyclass(module = "vhost._core", name = "BlkDevice", frozen)]
pub struct PyBlkDevice {
    inner: Arc<BlkDevice>,
}

#[pymethods]
impl PyBlkDevice {
    /// Serves the raw image file at `path` (opened read-only when `readonly`), checked and
    /// locked as `vhost_core::devices::Image` does.
    #[new]
    #[pyo3(
        signature = (path, *, num_queues = U16(1), queue_size = U16(256), readonly = false, serial = None, lock = true, force_share = false),
        text_signature = "(path, *, num_queues=1, queue_size=256, readonly=False, serial=None, lock=True, force_share=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        num_queues: U16,
        queue_size: U16,
        readonly: bool,
        serial: Option<String>,
        lock: bool,
        force_share: bool,
    ) -> PyResult<Self> {
        let (num_queues, queue_size) = (num_queues.0, queue_size.0);
        let cfg = config(num_queues, queue_size, readonly, serial)?;
        let locking = locking(lock, force_share);
        let inner = py
            .detach(|| BlkDevice::open(&path, cfg, locking))
            .map_err(image_error)?;
        Ok(PyBlkDevice {
            inner: Arc::new(inner),
        })
    }

    /// A zero-filled RAM disk of `size` bytes.
    #[staticmethod]
    #[pyo3(
        signature = (size, *, num_queues = U16(1), queue_size = U16(256), readonly = false, serial = None),
        text_signature = "(size, *, num_queues=1, queue_size=256, readonly=False, serial=None)"
    )]
    fn ram(
        size: U64,
        num_queues: U16,
        queue_size: U16,
        readonly: bool,
        serial: Option<String>,
    ) -> PyResult<Self> {
        let (size, num_queues, queue_size) = (size.0, num_queues.0, queue_size.0);
        let cfg = config(num_queues, queue_size, readonly, serial)?;
        let inner = BlkDevice::ram(size, cfg).map_err(io_error)?;
        Ok(PyBlkDevice {
            inner: Arc::new(inner),
        })
    }

    /// Capacity in 512-byte sectors.
    #[getter]
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    /// Grows the disk to the image's size now (`size` None) or to `size` bytes (growing
    /// the file), and tells the front-end; returns `(old, new, notified)` in sectors.
    #[pyo3(signature = (size = None))]
    fn resize(&self, py: Python<'_>, size: Option<u64>) -> PyResult<(u64, u64, bool)> {
        let inner = self.inner.clone();
        let r = crate::wait::blocking(py, move || inner.resize(size))?.map_err(resize_error)?;
        Ok((r.old, r.new, r.notified))
    }

    #[getter]
    fn num_queues(&self) -> u16 {
        self.inner.num_queues()
    }

    #[getter]
    fn features(&self) -> u64 {
        self.inner.features()
    }

    /// The virtio-blk configuration space.
    fn config<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.config())
    }

    fn __repr__(&self) -> String {
        format!(
            "<BlkDevice sectors={} queues={}>",
            self.inner.capacity(),
            self.inner.num_queues()
        )
    }
}

/// QEMU's two options as one mode: `force_share` wins over `lock` as in QEMU, where
/// force-share is about what is shared and locking=off about whether anything is locked.
fn locking(lock: bool, force_share: bool) -> Locking {
    match (lock, force_share) {
        (false, _) => Locking::Off,
        (true, true) => Locking::ForceShare,
        (true, false) => Locking::On,
    }
}

/// An image that cannot be served: a failed open or a lock held elsewhere is a
/// `VhostOSError` (an OSError of the errno's kind) with the path as `filename`; a file that is not a usable raw disk is
/// `InvalidParamError`.
fn image_error(err: ImageError) -> PyErr {
    let err_path = &err.path().to_path_buf();
    Python::attach(|py| match err {
        ImageError::Open { source, .. } => {
            path_error(PathError::new("open image", err_path, &source))
        }
        ImageError::Locked { holder, what, .. } => path_error(PathError {
            op: "lock image",
            path: err_path.clone(),
            errno: libc::EBUSY,
            reason: format!("in use by {holder}, which {what}"),
        }),
        other => raise(py, "InvalidParamError", (other.to_string(),)),
    })
}

/// An open, checked and locked raw image for a block device written in Python; its locks
/// last until `close()`.
#[pyclass(module = "vhost._core", name = "ImageFile", frozen)]
pub struct PyImageFile {
    image: Mutex<Option<Image>>,
    path: PathBuf,
    size: u64,
    readonly: bool,
}

#[pymethods]
impl PyImageFile {
    #[new]
    #[pyo3(signature = (path, *, readonly = false, lock = true, force_share = false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        readonly: bool,
        lock: bool,
        force_share: bool,
    ) -> PyResult<Self> {
        let image = py
            .detach(|| Image::open(&path, readonly, locking(lock, force_share)))
            .map_err(image_error)?;
        Ok(PyImageFile {
            size: image.size(),
            image: Mutex::new(Some(image)),
            path,
            readonly,
        })
    }

    /// The file descriptor, for `os.pread`/`os.pwrite`; valid until `close()`.
    fn fileno(&self) -> PyResult<RawFd> {
        lock(&self.image)
            .as_ref()
            .map(|i| i.file().as_raw_fd())
            .ok_or_else(|| closed("the image"))
    }

    /// Size in bytes (a multiple of 512).
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    #[getter]
    fn path(&self) -> std::ffi::OsString {
        self.path.clone().into_os_string()
    }

    #[getter]
    fn readonly(&self) -> bool {
        self.readonly
    }

    #[getter]
    fn closed(&self) -> bool {
        lock(&self.image).is_none()
    }

    /// Closes the file, which releases its locks.
    fn close(&self) {
        lock(&self.image).take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.close();
    }

    fn __repr__(&self) -> String {
        format!(
            "<ImageFile {} size={}{}{}>",
            self.path.display(),
            self.size,
            if self.readonly { " readonly" } else { "" },
            if self.closed() { " closed" } else { "" }
        )
    }
}

fn config(
    num_queues: u16,
    queue_size: u16,
    readonly: bool,
    serial: Option<String>,
) -> PyResult<BlkConfig> {
    let cfg = BlkConfig {
        num_queues,
        queue_size,
        readonly,
        serial: serial.unwrap_or_else(|| BlkConfig::default().serial),
    };
    cfg.check().map_err(invalid_param)?;
    Ok(cfg)
}

// ------------------------------------------------------------------------------------------
// Devices written in Python
// ------------------------------------------------------------------------------------------

/// One batch of descriptor chains handed to a Python device's `process(queue, batch)`.
/// Completions count only while `process` runs; afterwards the batch is closed.
#[pyclass(module = "vhost._core", name = "Batch", frozen)]
pub struct PyBatch {
    mem: CoreMemory,
    chains: Vec<Py<PyDescriptorChain>>,
    done: Mutex<Vec<(u16, u32)>>,
    open: AtomicBool,
}

#[pymethods]
impl PyBatch {
    fn __len__(&self) -> usize {
        self.chains.len()
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let py = slf.py();
        let list = pyo3::types::PyList::new(py, slf.chains.iter().map(|c| c.clone_ref(py)))?;
        list.into_any().try_iter().map(Bound::into_any)
    }

    /// The chains of this batch, in ring order.
    #[getter]
    fn chains(&self, py: Python<'_>) -> Vec<Py<PyDescriptorChain>> {
        self.chains.iter().map(|c| c.clone_ref(py)).collect()
    }

    /// Copies the chain's readable bytes (from `offset`, at most `length`).
    #[pyo3(signature = (chain, offset = 0, length = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        chain: PyRef<'_, PyDescriptorChain>,
        offset: usize,
        length: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = read_from_chain(py, &self.mem, &chain, offset, length)?;
        vhost_core::daemon::check_read_settled().map_err(|why| raise(py, "QueueError", (why,)))?;
        Ok(data)
    }

    /// Writes `data` into the chain's writable bytes from `offset`; returns what fit.
    #[pyo3(signature = (chain, data, offset = 0))]
    fn write(
        &self,
        py: Python<'_>,
        chain: PyRef<'_, PyDescriptorChain>,
        data: &Bound<'_, PyAny>,
        offset: usize,
    ) -> PyResult<usize> {
        // Once returned, the buffers are the driver's again: a late write would corrupt them.
        self.check_chain(&chain)?;
        write_into_chain(py, &self.mem, &chain, data, offset)
    }

    /// Returns `chain` to the driver with `written` bytes written into it.
    fn complete(&self, chain: PyRef<'_, PyDescriptorChain>, written: U32) -> PyResult<()> {
        let written = written.0;
        self.check_chain(&chain)?;
        if written > chain.writable_len {
            return Err(invalid_param(format!(
                "written {written} exceeds the chain's {} writable bytes",
                chain.writable_len
            )));
        }
        let mut done = lock(&self.done);
        if done.iter().any(|&(h, _)| h == chain.head) {
            return Err(invalid_param(format!(
                "chain {} is already completed",
                chain.head
            )));
        }
        done.push((chain.head, written));
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("<Batch chains={}>", self.chains.len())
    }
}

impl PyBatch {
    /// The batch is still open and `chain` is one of its own: a chain kept from an earlier
    /// batch is not in flight any more (or its head now names another buffer).
    fn check_chain(&self, chain: &PyRef<'_, PyDescriptorChain>) -> PyResult<()> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(closed("this batch was already returned to the ring"));
        }
        if !self.chains.iter().any(|c| c.as_ptr() == chain.as_ptr()) {
            return Err(invalid_param(format!(
                "chain {} is not part of this batch",
                chain.head
            )));
        }
        Ok(())
    }
}

/// A Python object with the `vhost.daemon.Device` shape, as a core device. The static
/// description is read once, so only `config`, `set_config`, `reset`, `process` and the
/// migration pair `save_state`/`load_state` call into Python.
struct PythonDevice {
    obj: Py<PyAny>,
    device_type: u32,
    num_queues: u16,
    max_queue_size: u16,
    features: u64,
    protocol_features: u64,
    shmem_regions: Vec<(u8, u64)>,
}

impl PythonDevice {
    fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PythonDevice {
            device_type: U32::attr(obj, "device_type")?,
            num_queues: U16::attr(obj, "num_queues")?,
            max_queue_size: U16::attr(obj, "max_queue_size")?,
            features: U64::attr(obj, "features")?,
            protocol_features: U64::attr(obj, "protocol_features")?,
            shmem_regions: shmem_pairs(&obj.getattr("shmem_regions")?)?,
            obj: obj.clone().unbind(),
        })
    }

    /// Calls a hook that only tells the device something; an exception is reported.
    fn notify(&self, hook: &str, value: u64) {
        Python::attach(|py| {
            if let Err(e) = self.obj.call_method1(py, hook, (value,)) {
                Self::failed(py, &self.obj, e);
            }
        });
    }

    /// Reports a Python exception the way an unhandled one in a thread would be.
    fn failed(py: Python<'_>, obj: &Py<PyAny>, e: PyErr) -> DeviceError {
        let msg = e.to_string();
        e.write_unraisable(py, Some(obj.bind(py)));
        DeviceError::Failed(msg)
    }
}

impl VirtioDevice for PythonDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    fn shmem_regions(&self) -> Vec<(u8, u64)> {
        self.shmem_regions.clone()
    }

    fn set_acked_features(&self, features: u64) {
        self.notify("set_acked_features", features);
    }

    fn set_acked_protocol_features(&self, features: u64) {
        self.notify("set_acked_protocol_features", features);
    }

    fn config(&self) -> Vec<u8> {
        Python::attach(|py| {
            self.obj
                .call_method0(py, "config")
                .and_then(|c| c.extract::<Vec<u8>>(py))
                .unwrap_or_else(|e| {
                    Self::failed(py, &self.obj, e);
                    Vec::new()
                })
        })
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Python::attach(|py| {
            self.obj
                .call_method1(py, "set_config", (offset, PyBytes::new(py, data)))
                .map(drop)
                .map_err(|e| DeviceError::Failed(e.to_string()))
        })
    }

    fn reset(&self) {
        Python::attach(|py| {
            if let Err(e) = self.obj.call_method0(py, "reset") {
                Self::failed(py, &self.obj, e);
            }
        });
    }

    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        Python::attach(|py| {
            let state = self
                .obj
                .call_method0(py, "save_state")
                .map_err(|e| DeviceError::Failed(e.to_string()))?;
            let state = state.bind(py);
            // bytes, as typed, in one copy; any other bytes-like item by item.
            match state.cast::<PyBytes>() {
                Ok(b) => Ok(b.as_bytes().to_vec()),
                Err(_) => state
                    .extract::<Vec<u8>>()
                    .map_err(|e| DeviceError::Failed(format!("save_state() returned: {e}"))),
            }
        })
    }

    fn load_state(&self, state: &[u8]) -> Result<(), DeviceError> {
        Python::attach(|py| {
            self.obj
                .call_method1(py, "load_state", (PyBytes::new(py, state),))
                .map(drop)
                .map_err(|e| DeviceError::Failed(e.to_string()))
        })
    }

    fn process(
        &self,
        queue: u16,
        mem: &CoreMemory,
        chains: Vec<CoreChain>,
        done: &mut Vec<(u16, u32)>,
    ) -> Result<(), DeviceError> {
        Python::attach(|py| {
            let run = || -> PyResult<()> {
                let chains = chains
                    .into_iter()
                    .map(|c| Py::new(py, PyDescriptorChain::from_core(c)))
                    .collect::<PyResult<Vec<_>>>()?;
                let batch = Py::new(
                    py,
                    PyBatch {
                        mem: mem.clone(),
                        chains,
                        done: Mutex::new(Vec::new()),
                        open: AtomicBool::new(true),
                    },
                )?;
                let r = self
                    .obj
                    .call_method1(py, "process", (queue, batch.clone_ref(py)));
                let b = batch.get();
                b.open.store(false, Ordering::SeqCst);
                done.append(&mut lock(&b.done));
                r.map(drop)
            };
            run().map_err(|e| Self::failed(py, &self.obj, e))
        })
    }
}

// ------------------------------------------------------------------------------------------
// The daemon
// ------------------------------------------------------------------------------------------

/// How long `Daemon.wait` sleeps between looks at pending Python signals.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Most events kept for `next_events` when nobody collects them; older ones are dropped
/// (and counted), so an unwatched daemon's memory stays bounded.
const MAX_PENDING_EVENTS: usize = 1024;

/// `(kind, session, request, queue, end, reason, hint, error)`, the tuple `vhost.daemon`
/// turns into a `DaemonEvent`.
type EventTuple = (
    &'static str,
    u64,
    Option<&'static str>,
    Option<u16>,
    Option<&'static str>,
    Option<String>,
    Option<&'static str>,
    bool,
);

/// A failure of one queue or of one request on it: both name the queue and why.
fn queue_event(kind: &'static str, session: u64, queue: u16, reason: String) -> EventTuple {
    (
        kind,
        session,
        None,
        Some(queue),
        None,
        Some(reason),
        None,
        true,
    )
}

fn event_tuple(e: DaemonEvent) -> EventTuple {
    match e {
        DaemonEvent::SessionStarted { session } => (
            "session-started",
            session,
            None,
            None,
            None,
            None,
            None,
            false,
        ),
        DaemonEvent::Refused {
            session,
            request,
            reason,
            hint,
        } => {
            let r = Some(reason);
            ("refused", session, Some(request), None, None, r, hint, true)
        }
        DaemonEvent::QueueFailed {
            session,
            queue,
            reason,
        } => queue_event("queue-failed", session, queue, reason),
        DaemonEvent::RequestFailed {
            session,
            queue,
            reason,
        } => queue_event("request-failed", session, queue, reason),
        DaemonEvent::SessionEnded { session, end, hint } => {
            let (error, r) = (end.is_error(), Some(end.to_string()));
            (
                "session-ended",
                session,
                None,
                None,
                Some(end.kind()),
                r,
                hint,
                error,
            )
        }
    }
}

/// Serves one device to vhost-user front-ends on a background thread (the core's
/// `DaemonRunner`); this class converts its arguments and errors, and waits in slices so
/// Ctrl-C is handled.
#[pyclass(module = "vhost._core", name = "Daemon", frozen)]
pub struct PyDaemon {
    device: Arc<dyn VirtioDevice>,
    runner: DaemonRunner,
    events: Arc<EventQueue>,
    /// The device's way to the front-end, kept across restarts.
    link: FrontendLink,
}

#[pymethods]
impl PyDaemon {
    /// `device` is a `BlkDevice` or a Python object shaped like `vhost.daemon.Device`.
    #[new]
    #[pyo3(
        signature = (
            device,
            *,
            stall_timeout = 5.0,
            poll_us = None,
            require_sealed_memory = false,
            postcopy_fault_timeout = Some(DEFAULT_POSTCOPY_FAULT_TIMEOUT.as_secs_f64()),
            iommu_miss_timeout = None,
        ),
        text_signature = "(device, *, stall_timeout=5.0, poll_us=0, require_sealed_memory=False, postcopy_fault_timeout=..., iommu_miss_timeout=None)"
    )]
    fn new(
        device: &Bound<'_, PyAny>,
        stall_timeout: f64,
        poll_us: Option<&Bound<'_, PyAny>>,
        require_sealed_memory: bool,
        postcopy_fault_timeout: Option<f64>,
        iommu_miss_timeout: Option<f64>,
    ) -> PyResult<Self> {
        let device: Arc<dyn VirtioDevice> = match device.cast::<PyBlkDevice>() {
            Ok(blk) => blk.get().inner.clone(),
            Err(_) => Arc::new(PythonDevice::new(device)?),
        };
        uint_args!("Daemon"; poll_us: U64 = 0);
        let settings = DaemonSettings {
            stall_timeout: convert::seconds("stall_timeout", stall_timeout)?,
            poll: Duration::from_micros(poll_us),
            postcopy_fault_timeout: convert::timeout(
                "postcopy_fault_timeout",
                postcopy_fault_timeout,
            )?,
            sealed_memory_only: require_sealed_memory,
            iommu_miss_timeout: iommu_miss_timeout
                .map(|t| convert::seconds("iommu_miss_timeout", t))
                .transpose()?,
        };
        settings.check().map_err(user_error)?;
        let link = FrontendLink::new();
        device.attach_frontend(link.clone());
        let events = EventQueue::new(MAX_PENDING_EVENTS);
        let recipe = {
            let (device, link, sink) = (device.clone(), link.clone(), events.sink());
            Box::new(move || {
                Ok(Daemon::new(device.clone())?
                    .with_settings(&settings)
                    .with_frontend_link(link.clone())
                    .with_events(sink.clone()))
            })
        };
        Ok(PyDaemon {
            runner: DaemonRunner::new(recipe),
            device,
            events,
            link,
        })
    }

    /// Starts serving: listens on `path` (server mode, unlinking a stale socket) or, with
    /// `client`, connects to a front-end listening there (one session); with `vduse`,
    /// `path` is the name of a VDUSE device to create and serve, offering packed rings
    /// when `packed`.
    #[pyo3(signature = (path, *, client = false, vduse = false, packed = false))]
    fn start(
        &self,
        py: Python<'_>,
        path: PathBuf,
        client: bool,
        vduse: bool,
        packed: bool,
    ) -> PyResult<()> {
        let mode = match (client, vduse) {
            (true, true) => {
                return Err(invalid_param(
                    "Daemon.start: client and vduse exclude each other",
                ))
            }
            (_, true) => Mode::Vduse { packed },
            _ if packed => {
                return Err(invalid_param(
                    "Daemon.start: packed is for vduse (vhost-user always offers packed rings)",
                ))
            }
            (true, _) => Mode::Client,
            _ => Mode::Server,
        };
        let runner = &self.runner;
        py.detach(|| runner.start(&path, mode))
            .map_err(|e| match e {
                StartError::AlreadyRunning => invalid_param(e.to_string()),
                StartError::Listen(e) => path_error(e),
                StartError::Io(e) => io_error(e),
                StartError::Vduse(e) => vduse_error(e),
            })
    }

    /// Asks the daemon to stop; `wait` then returns once it has.
    fn stop(&self) {
        self.runner.stop();
    }

    /// Waits up to `timeout` seconds (None: forever) for the daemon to finish; returns
    /// whether it has. A daemon that ended in error raises that error here, once.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = convert::deadline("timeout", timeout)?;
        loop {
            // Wait in slices, so that Ctrl-C (a Python signal handler) can run (J7).
            let slice = deadline.map_or(WAIT_SLICE, |d| {
                d.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
            });
            let runner = &self.runner;
            if py.detach(|| runner.wait(Some(slice))).map_err(user_error)? {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    /// The events that happened since the last call, as tuples `(kind, session, request,
    /// queue, end, reason, hint, error)`; waits up to `timeout` seconds (None: forever) for
    /// the first, returning to Python between slices so Ctrl-C works.
    #[pyo3(signature = (timeout = 0.0))]
    fn next_events(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<EventTuple>> {
        let deadline = convert::deadline("timeout", timeout)?;
        loop {
            let slice = deadline.map_or(WAIT_SLICE, |d| {
                d.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
            });
            let events = self.events.clone();
            let got = py.detach(move || events.take(slice));
            if !got.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(got.into_iter().map(event_tuple).collect());
            }
            py.check_signals()?;
        }
    }

    /// The link to the front-end being served (config changes, shared objects, shared
    /// memory), valid across sessions and restarts.
    #[getter]
    fn frontend(&self) -> PyFrontendLink {
        PyFrontendLink::new(self.link.clone())
    }

    /// Events dropped because nobody collected them (the queue keeps the latest 1024).
    #[getter]
    fn events_dropped(&self) -> u64 {
        self.events.dropped()
    }

    /// Whether the daemon is serving (or starting to: its socket may already exist).
    #[getter]
    fn running(&self) -> bool {
        self.runner.is_running()
    }

    /// Front-end sessions accepted so far.
    #[getter]
    fn sessions_started(&self) -> u64 {
        self.with_stats(|s| s.sessions_started.load(Ordering::SeqCst))
    }

    /// Front-end sessions that have ended (cleanly or not).
    #[getter]
    fn sessions_ended(&self) -> u64 {
        self.with_stats(|s| s.sessions_ended.load(Ordering::SeqCst))
    }

    /// Whether a front-end is being served now.
    #[getter]
    fn active(&self) -> bool {
        self.with_stats(|s| s.active.load(Ordering::SeqCst))
    }

    /// The error that ended (or was refused in) the latest session, if any.
    #[getter]
    fn last_error(&self) -> Option<String> {
        self.runner.stats().and_then(|s| s.last_error())
    }

    /// Descriptor chains completed per queue in the current or last session.
    #[getter]
    fn completed(&self) -> Vec<u64> {
        self.with_stats(|s| s.completed())
    }

    /// IOTLB misses each queue asked the front-end for in the current or last session.
    #[getter]
    fn iotlb_misses(&self) -> Vec<u64> {
        self.with_stats(|s| s.iotlb_misses())
    }

    fn __repr__(&self) -> String {
        format!(
            "<Daemon device_type={} running={}>",
            self.device.device_type(),
            self.running()
        )
    }
}

impl PyDaemon {
    fn with_stats<T: Default>(&self, f: impl FnOnce(&DaemonStats) -> T) -> T {
        self.runner.stats().as_deref().map(f).unwrap_or_default()
    }
}

impl Drop for PyDaemon {
    fn drop(&mut self) {
        // The runner stops and joins its thread when dropped: do it without the GIL, as the
        // session's workers (a Python device's `process`, its `reset` at session end) need
        // it to finish.
        let runner = &self.runner;
        Python::attach(|py| py.detach(|| runner.shutdown()));
    }
}
