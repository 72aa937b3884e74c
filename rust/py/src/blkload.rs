//! `BlkLoad`: the native virtio-blk load loop (`vhost_core::blkload`) for `bench blk`.
//! Python negotiates and sets the queue up; a whole run then happens here with the GIL
//! released, and comes back as one dict.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use vhost_core::blkload::{
    BlkLoad as CoreLoad, Buffers, InterruptHook, IommuConfig, Job, LoadError, Prefill, Report, Rw,
    VerifiedReport,
};
use vhost_core::sys::EventFd as CoreEventFd;
use vhost_core::vring::RingLayout;

use crate::convert;
use crate::errors::{invalid_param, io_error, memory_error, user_error, vring_error, IntoPyResult};
use crate::fd::dup_of;
use crate::frontend::PyFrontend;
use crate::memory::PyGuestMemory;

/// An exception of `vhost.errors` by class name (the classes belong to Python).
fn vhost_error(class: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("vhost.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.call1((msg,)))
        {
            Ok(exc) => PyErr::from_value(exc),
            Err(err) => err,
        }
    })
}

fn load_error(err: LoadError) -> PyErr {
    match err {
        LoadError::InvalidParam(m) => invalid_param(m),
        LoadError::Vring(e) => vring_error(e),
        LoadError::Memory(e) => memory_error(e),
        LoadError::Io(e) => io_error(e),
        LoadError::Interrupted => {
            pyo3::exceptions::PyKeyboardInterrupt::new_err("the load run was interrupted")
        }
        e @ LoadError::Timeout { .. } => vhost_error("VhostTimeoutError", e.to_string()),
        e @ LoadError::Disconnected { .. } => vhost_error("DisconnectedError", e.to_string()),
        LoadError::Vhost(_, e) => user_error(e),
        e @ LoadError::IommuSide(_) => vhost_error("VhostError", e.to_string()),
    }
}

/// Drives one virtio-blk queue at a fixed depth, natively. See `vhost.cli.bench`.
#[pyclass(module = "vhost._core", name = "BlkLoad", frozen)]
pub struct PyBlkLoad {
    inner: Mutex<CoreLoad>,
    queue_size: u16,
    slots: usize,
    window: u32,
}

#[pymethods]
impl PyBlkLoad {
    /// Takes over a fresh ring at guest addresses `desc`/`avail`/`used` (zeroed here; give
    /// the device the same addresses with base 0) with the `kick`/`call` eventfds (kept as
    /// duplicates), and one request slot per `(header gpa, data gpa)` pair of `buffers`,
    /// each data window `window` bytes. `socket` (kept as a duplicate) is the front-end's
    /// vhost-user socket: a run fails with `DisconnectedError` as soon as the back-end
    /// closes it, instead of waiting out its timeout.
    ///
    /// With `iommu_page` the load runs behind an IOMMU played by this side
    /// (`vhost_core::blkload::iommu`): `frontend` is the connection the back-end got
    /// `memory` on, with ACCESS_PLATFORM and BACKEND_REQ acked and queue 0 not set up;
    /// addresses are given in the flat layout as without it.
    #[new]
    #[pyo3(signature = (memory, size, desc, avail, used, kick, call, buffers, window, *, packed = false, event_idx = false, segment_size = 32768, socket = None, frontend = None, iommu_page = None, iommu_prefill = "none", iommu_strict = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        memory: PyRef<'_, PyGuestMemory>,
        size: u32,
        desc: u64,
        avail: u64,
        used: u64,
        kick: &Bound<'_, PyAny>,
        call: &Bound<'_, PyAny>,
        buffers: Vec<(u64, u64)>,
        window: u32,
        packed: bool,
        event_idx: bool,
        segment_size: u32,
        socket: Option<&Bound<'_, PyAny>>,
        frontend: Option<PyRef<'_, PyFrontend>>,
        iommu_page: Option<u64>,
        iommu_prefill: &str,
        iommu_strict: bool,
    ) -> PyResult<Self> {
        let layout = if packed {
            RingLayout::packed(size, desc, avail, used)
        } else {
            RingLayout::split(size, desc, avail, used)
        }
        .py_err()?;
        let kick = CoreEventFd::from_fd(dup_of(kick)?);
        let call = CoreEventFd::from_fd(dup_of(call)?);
        let buffers: Vec<Buffers> = buffers
            .into_iter()
            .map(|(meta, data)| Buffers { meta, data })
            .collect();
        let hangup = socket.map(dup_of).transpose()?;
        let mem = memory.snapshot();
        let mut load = match iommu_page {
            None => CoreLoad::new(
                mem,
                layout,
                event_idx,
                kick,
                call,
                buffers,
                window,
                segment_size,
            ),
            Some(page) => {
                let prefill = Prefill::parse(iommu_prefill).ok_or_else(|| {
                    invalid_param(format!(
                        "iommu_prefill must be none or all: {iommu_prefill:?}"
                    ))
                })?;
                let fe = frontend
                    .ok_or_else(|| invalid_param("iommu_page needs the frontend"))?
                    .core();
                let config = IommuConfig {
                    page,
                    prefill,
                    strict: iommu_strict,
                };
                let py = memory.py();
                py.detach(|| {
                    CoreLoad::new_behind_iommu(
                        fe,
                        config,
                        mem,
                        layout,
                        event_idx,
                        kick,
                        call,
                        buffers,
                        window,
                        segment_size,
                    )
                })
            }
        }
        .map_err(load_error)?;
        load.watch_hangup(hangup);
        Ok(PyBlkLoad {
            queue_size: load.queue_size(),
            slots: load.slots(),
            window: load.window(),
            inner: Mutex::new(load),
        })
    }

    /// Runs `rw` (`read`, `write`, `randread`, `randwrite`) requests of `block_size` bytes
    /// inside `[offset, offset+size)` of the disk, `iodepth` in flight, for `seconds` or
    /// `ios` requests (whichever first); returns a dict (see `_core.pyi`). With `verify`,
    /// the run is checked against generation `generation` (see `vhost.cli.bench`).
    #[pyo3(signature = (rw, block_size, iodepth, offset, size, *, seconds = None, ios = None, seed = 1, busy_poll = 0.0, timeout = 10.0, verify = false, generation = 1, fill = true))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        rw: &str,
        block_size: u32,
        iodepth: u16,
        offset: u64,
        size: u64,
        seconds: Option<f64>,
        ios: Option<u64>,
        seed: u64,
        busy_poll: f64,
        timeout: f64,
        verify: bool,
        generation: u32,
        fill: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mode = Rw::parse(rw).ok_or_else(|| {
            invalid_param(format!(
                "rw must be read, write, randread or randwrite: {rw:?}"
            ))
        })?;
        let job = Job {
            rw: mode,
            block_size,
            iodepth,
            offset,
            size,
            duration: seconds
                .map(|s| convert::seconds("seconds", s))
                .transpose()?,
            max_ios: ios,
            seed,
            busy_poll: convert::seconds("busy_poll", busy_poll)?,
            timeout: convert::seconds("timeout", timeout)?,
            write_generation: None,
            check: None,
            track_writes: false,
        };
        // Ctrl-C: the loop asks every 100 ms; a pending Python exception (KeyboardInterrupt
        // from the SIGINT handler) stops it and is raised here.
        let pending: Arc<Mutex<Option<PyErr>>> = Arc::default();
        let stash = pending.clone();
        let hook: InterruptHook = Box::new(move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    *stash.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    true
                }
            })
        });
        let outcome = py.detach(|| {
            let mut load = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            load.set_interrupt(Some(hook));
            let r = if verify {
                load.run_verified(&job, generation, fill)
                    .map(|v| (v.timed.clone(), Some(v)))
            } else {
                load.run(&job).map(|r| (r, None))
            };
            load.set_interrupt(None);
            r
        });
        if let Some(e) = pending.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        let (timed, verified) = outcome.map_err(load_error)?;
        let d = report_dict(py, &job, &timed)?;
        if let Some(v) = verified {
            d.set_item("verify", verify_dict(py, &v)?)?;
        } else {
            d.set_item("verify", py.None())?;
        }
        Ok(d)
    }

    /// The deepest queue `block_size` requests can keep (slots and ring descriptors).
    fn max_iodepth(&self, block_size: u32) -> u16 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max_iodepth(block_size)
    }

    /// Behind an IOMMU: its configuration and counts so far (see `_core.pyi`); None for
    /// a flat memory table.
    #[getter]
    fn iommu<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let load = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(iommu) = load.iommu() else {
            return Ok(None);
        };
        let (config, remap, c) = (iommu.config(), iommu.remap(), iommu.counters());
        let d = PyDict::new(py);
        d.set_item("page", config.page)?;
        d.set_item("prefill", config.prefill.name())?;
        d.set_item("strict", config.strict)?;
        d.set_item("pages", remap.pages())?;
        d.set_item("iova_base", vhost_core::blkload::iommu::IOVA_BASE)?;
        d.set_item("misses", c.misses.load(Relaxed))?;
        d.set_item("unmapped_misses", c.unmapped.load(Relaxed))?;
        d.set_item("updates", c.updates.load(Relaxed))?;
        d.set_item("invalidations", c.invalidations.load(Relaxed))?;
        Ok(Some(d))
    }

    #[getter]
    fn queue_size(&self) -> u16 {
        self.queue_size
    }

    #[getter]
    fn slots(&self) -> usize {
        self.slots
    }

    #[getter]
    fn window(&self) -> u32 {
        self.window
    }

    fn __repr__(&self) -> String {
        format!(
            "<BlkLoad queue_size={} slots={} window={}>",
            self.queue_size, self.slots, self.window
        )
    }
}

fn report_dict<'py>(py: Python<'py>, job: &Job, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rw", job.rw.name())?;
    d.set_item("bs", job.block_size)?;
    d.set_item("iodepth", job.iodepth)?;
    d.set_item("ios", r.ios)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("seconds", r.elapsed.as_secs_f64())?;
    d.set_item("iops", r.iops())?;
    d.set_item("bandwidth_bytes_per_s", r.bandwidth())?;
    d.set_item("driver_cpu_seconds", r.cpu.as_secs_f64())?;
    d.set_item("kicks", r.kicks)?;
    d.set_item("wakeups", r.wakeups)?;
    d.set_item("iotlb_misses", r.iotlb_misses)?;
    d.set_item("io_errors", r.io_errors)?;
    match r.first_io_error {
        Some(f) => {
            let e = PyDict::new(py);
            e.set_item("rw", if f.write { "write" } else { "read" })?;
            e.set_item("offset", f.offset)?;
            e.set_item("status", f.status)?;
            d.set_item("first_io_error", e)?;
        }
        None => d.set_item("first_io_error", py.None())?,
    }
    let lat = PyDict::new(py);
    let h = &r.latency;
    lat.set_item("min", h.min())?;
    lat.set_item("mean", h.mean())?;
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
        lat.set_item(name, h.percentile(q))?;
    }
    lat.set_item("max", h.max())?;
    d.set_item("latency_ns", lat)?;
    Ok(d)
}

fn verify_dict<'py>(py: Python<'py>, v: &VerifiedReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let sector = vhost_core::blkload::SECTOR;
    d.set_item("generation", v.generation)?;
    d.set_item("filled_bytes", v.fill.as_ref().map_or(0, |f| f.bytes))?;
    d.set_item("read_checked_bytes", v.timed.checked_sectors * sector)?;
    d.set_item("written_bytes", v.written_sectors * sector)?;
    d.set_item("final_checked_bytes", v.check.checked_sectors * sector)?;
    d.set_item("bad_sectors", v.bad_sectors())?;
    d.set_item("first_bad_offset", v.first_bad_offset())?;
    d.set_item("io_errors", v.io_errors())?;
    d.set_item("iotlb_misses", v.iotlb_misses())?;
    d.set_item("ok", v.bad_sectors() == 0 && v.io_errors() == 0)?;
    Ok(d)
}
