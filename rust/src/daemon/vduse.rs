//! The daemon's second transport: the same [`VirtioDevice`] served as a VDUSE device of
//! the kernel the daemon runs on ([`crate::vduse`]), instead of to a vhost-user front-end.
//!
//! ```text
//! VduseTransport::create ── VDUSE_CREATE_DEV (device type, features + ACCESS_PLATFORM,
//!                           config, queues), VQ_SETUP each queue, its Record written
//!                           (a stale device of the same name, left by a daemon that died,
//!                           is destroyed first; one still bound to a vDPA device is taken
//!                           over if its Record matches and its rings are split)
//! serve: poll(device fd, stop, first kicks)
//!   SET_STATUS DRIVER_OK -> acked features, IOTLB fetched (each range with its
//!                           permission), VQ_GET_INFO per ready queue, rings (split or
//!                           packed) started at the kernel's state, kick eventfds set
//!   first kick of a queue -> IOTLB fetched again (the bounce area exists only once the
//!                           driver mapped its first buffer), then the kernel kicks the
//!                           worker's eventfd directly
//!   SET_STATUS 0          -> rings stopped (their avail index kept), mappings dropped
//!   GET_VQ_STATE          -> the ring's avail index (packed: avail and used slots and
//!                           wrap counters)
//!   UPDATE_IOTLB          -> that span dropped and fetched again, handed to every queue
//! workers: the vhost-user data path unchanged; used-ring interrupts go through
//!          VDUSE_VQ_INJECT_IRQ (the queue's Notifier)
//! ```

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::VringAddrs;
use crate::memory::GuestMemory;
use crate::sys::{poll_many, EventFd};
use crate::vduse::{
    DeviceSpec, IovaSpace, Request, Response, VduseControl, VduseDevice, VduseError,
};
use crate::vring::features::{EVENT_IDX, INDIRECT_DESC, RING_PACKED};

use super::device::{transport, VirtioDevice};
use super::events::{DaemonEvent, EventSink, QueueReporter};
use super::queue::{lock, spawn_worker, Notifier, QueueSlot};

/// `VIRTIO_F_ACCESS_PLATFORM`: VDUSE refuses a device that does not offer it (its driver
/// maps every buffer through the device's IOVA domain).
pub const ACCESS_PLATFORM: u64 = 1 << 33;

/// The status bit that starts the rings.
const STATUS_DRIVER_OK: u8 = 4;

/// virtio-blk's device type.
const BLK: u32 = 2;

/// Ring metadata alignment given to the kernel.
const VQ_ALIGN: u32 = 4096;

/// A VDUSE device made for one [`VirtioDevice`]: created (or a stale one replaced) when
/// made, destroyed when dropped or [`destroy`](Self::destroy)ed.
#[derive(Debug)]
pub struct VduseTransport {
    name: String,
    control: VduseControl,
    dev: Option<Arc<VduseDevice>>,
    replaced_stale: bool,
    reclaimed: bool,
    destroyed: bool,
}

impl VduseTransport {
    /// The features a VDUSE device of `device` offers: its own, the transport ones it
    /// accepts, and `ACCESS_PLATFORM`; packed rings only when `packed` (the kernel accepts
    /// them, but the position of a packed ring cannot be recovered from the ring when a
    /// daemon that died is taken over, while a split ring's used index can).
    pub fn features_for(device: &dyn VirtioDevice, packed: bool) -> u64 {
        let ring = if packed { 0 } else { RING_PACKED };
        device.features()
            | (transport::DEFAULT & device.transport_features() & !ring)
            | ACCESS_PLATFORM
    }

    /// What `VDUSE_CREATE_DEV` is given for `device` as device `name`.
    fn spec(device: &dyn VirtioDevice, name: &str, packed: bool) -> DeviceSpec {
        DeviceSpec {
            name: name.into(),
            device_id: device.device_type(),
            vendor_id: 0,
            features: Self::features_for(device, packed),
            queues: u32::from(device.num_queues()),
            vq_align: VQ_ALIGN,
            config: device.config(),
        }
    }

    /// Creates VDUSE device `name` for `device` and sets its queues up. When a device of
    /// that name exists already (a daemon serving it died), it is destroyed and created
    /// again. If the kernel refuses that (EBUSY) because a vDPA device still uses it, the
    /// dead daemon's device is taken over instead ([`reclaimed`](Self::reclaimed)); if
    /// another process has its node open, [`VduseError::InUse`].
    pub fn create(device: &dyn VirtioDevice, name: &str, packed: bool) -> Result<Self, VduseError> {
        let control = VduseControl::open()?;
        let spec = Self::spec(device, name, packed);
        let record = Record::of(&spec, device.max_queue_size());
        let mut replaced_stale = false;
        match control.create(&spec) {
            Err(VduseError::Exists { .. }) => match control.destroy(name) {
                Ok(()) => {
                    control.create(&spec)?;
                    replaced_stale = true;
                }
                Err(VduseError::InUse { .. }) => return Self::reclaim(control, name, &record),
                Err(e) => return Err(e),
            },
            other => other?,
        }
        // From here on, dropping `t` destroys the device again.
        let mut t = VduseTransport {
            name: name.into(),
            control,
            dev: None,
            replaced_stale,
            reclaimed: false,
            destroyed: false,
        };
        let dev = VduseDevice::open(name, spec.queues)?;
        for i in 0..spec.queues {
            dev.vq_setup(i, device.max_queue_size())?;
        }
        t.dev = Some(Arc::new(dev));
        record.save(name)?;
        Ok(t)
    }

    /// The device exists and cannot be destroyed. If its node is open, another daemon
    /// serves it: [`VduseError::InUse`]. Otherwise a daemon that died left it while a vDPA
    /// device (and the kernel's driver) still uses it: this daemon takes it over if it was
    /// created for the same device as this start's (type, features, queue count and size,
    /// configuration space: what the driver was given cannot change under it), and resumes
    /// its rings where the driver is. The kernel cannot tell what a device was created
    /// with, so the daemon that created it recorded that ([`Record`]).
    fn reclaim(control: VduseControl, name: &str, wanted: &Record) -> Result<Self, VduseError> {
        let dev = VduseDevice::open(name, wanted.queues).map_err(|e| match e.errno() {
            Some(libc::EBUSY) => VduseError::InUse { name: name.into() },
            _ => e,
        })?;
        let refuse = |why: String| VduseError::Invalid {
            device: name.into(),
            why: format!(
                "left in use by a daemon that died, and cannot be taken over: {why}; \
                 vdpa dev del {name} removes it"
            ),
        };
        let path = Record::path(name);
        let recorded = Record::load(name).map_err(|e| {
            refuse(format!(
                "no record of what it was created with ({}: {e}; not made by this package, \
                 or /run was cleared)",
                path.display()
            ))
        })?;
        if let Some(field) = recorded.mismatch(wanted) {
            return Err(refuse(field));
        }
        // The kernel's own count, in case the record lies.
        let last = wanted.queues.saturating_sub(1);
        if !dev.kernel_has_queue(last)? || dev.kernel_has_queue(wanted.queues)? {
            return Err(refuse(format!(
                "its queue count is not the recorded {}",
                wanted.queues
            )));
        }
        if dev.features()? & RING_PACKED != 0 {
            return Err(refuse(
                "its driver uses packed rings, whose position cannot be read back from the \
                 ring (a split ring's used index can)"
                    .into(),
            ));
        }
        Ok(VduseTransport {
            name: name.into(),
            control,
            dev: Some(Arc::new(dev)),
            replaced_stale: false,
            reclaimed: true,
            destroyed: false,
        })
    }

    /// Whether this start took over a device a dead daemon left in use by a driver.
    pub fn reclaimed(&self) -> bool {
        self.reclaimed
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a stale device of the same name was destroyed to make this one.
    pub fn replaced_stale(&self) -> bool {
        self.replaced_stale
    }

    /// Closes the device's node and destroys it: [`VduseError::InUse`] while a vDPA
    /// device still uses it (`vdpa dev del NAME` first); it then stays, and the next
    /// start with the same name replaces it.
    pub fn destroy(mut self) -> Result<(), VduseError> {
        self.destroy_now()
    }

    fn destroy_now(&mut self) -> Result<(), VduseError> {
        if self.destroyed {
            return Ok(());
        }
        self.destroyed = true;
        // The node must be closed first: the kernel refuses to destroy an open device.
        self.dev = None;
        self.control.destroy(&self.name)?;
        Record::remove(&self.name);
        Ok(())
    }

    pub(crate) fn device(&self) -> &Arc<VduseDevice> {
        self.dev
            .as_ref()
            .expect("the device is open until destroyed")
    }
}

/// What a VDUSE device was created with, kept in a file under [`RECORD_DIR`] by the
/// daemon that created it (the kernel keeps it but offers no way to read it back), so that
/// a later start taking the device over checks it is the same device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    device_id: u32,
    features: u64,
    queues: u32,
    queue_size: u16,
    config: Vec<u8>,
}

/// Where [`Record`]s are kept: a tmpfs, cleared at boot like the kernel's devices.
pub const RECORD_DIR: &str = "/run/pyvhost/vduse";

impl Record {
    fn of(spec: &DeviceSpec, queue_size: u16) -> Self {
        Record {
            device_id: spec.device_id,
            features: spec.features,
            queues: spec.queues,
            queue_size,
            config: spec.config.clone(),
        }
    }

    fn path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(RECORD_DIR).join(name)
    }

    fn encode(&self) -> String {
        let config: String = self.config.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "device_id {}\nfeatures {:#x}\nqueues {}\nqueue_size {}\nconfig {config}\n",
            self.device_id, self.features, self.queues, self.queue_size
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut fields = std::collections::HashMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once(' ')?;
            fields.insert(k, v);
        }
        let hex = |v: &str| u64::from_str_radix(v.strip_prefix("0x")?, 16).ok();
        let config = fields.get("config")?;
        if config.len() % 2 != 0 {
            return None;
        }
        Some(Record {
            device_id: fields.get("device_id")?.parse().ok()?,
            features: hex(fields.get("features")?)?,
            queues: fields.get("queues")?.parse().ok()?,
            queue_size: fields.get("queue_size")?.parse().ok()?,
            config: (0..config.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(config.get(i..i + 2)?, 16).ok())
                .collect::<Option<_>>()?,
        })
    }

    fn save(&self, name: &str) -> Result<(), VduseError> {
        let path = Self::path(name);
        std::fs::create_dir_all(RECORD_DIR)
            .and_then(|()| std::fs::write(&path, self.encode()))
            .map_err(|source| VduseError::Kernel {
                device: name.into(),
                op: "write its record under /run/pyvhost/vduse",
                source,
            })
    }

    fn load(name: &str) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(Self::path(name))?;
        Self::decode(&text).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a device record")
        })
    }

    fn remove(name: &str) {
        let _ = std::fs::remove_file(Self::path(name));
    }

    /// The first field in which the device recorded (`self`) differs from the one a start
    /// wants, worded for the user: `None` when it may be taken over.
    fn mismatch(&self, wanted: &Record) -> Option<String> {
        if self.device_id != wanted.device_id {
            return Some(format!(
                "its device type is {}, this start's {}",
                self.device_id, wanted.device_id
            ));
        }
        if self.features != wanted.features {
            return Some(format!(
                "its features are {:#x}, this start's {:#x} (bits {:#x} differ)",
                self.features,
                wanted.features,
                self.features ^ wanted.features
            ));
        }
        if self.queues != wanted.queues {
            return Some(format!(
                "its queue count is {}, this start's {}",
                self.queues, wanted.queues
            ));
        }
        if self.queue_size != wanted.queue_size {
            return Some(format!(
                "its queue size is {}, this start's {}",
                self.queue_size, wanted.queue_size
            ));
        }
        if self.config == wanted.config {
            return None;
        }
        let capacity = |c: &[u8]| Some(u64::from_le_bytes(c.get(..8)?.try_into().ok()?));
        let at = self
            .config
            .iter()
            .zip(&wanted.config)
            .position(|(a, b)| a != b)
            .unwrap_or(self.config.len().min(wanted.config.len()));
        match (capacity(&self.config), capacity(&wanted.config)) {
            // virtio-blk's first field: the size a driver was told, in 512-byte sectors.
            (Some(was), Some(now)) if self.device_id == BLK && at < 8 => Some(format!(
                "its capacity is {was} sectors, this start's {now} (another image size)"
            )),
            _ => Some(format!(
                "its configuration space ({} bytes) differs from this start's ({} bytes) \
                 from byte {at}",
                self.config.len(),
                wanted.config.len()
            )),
        }
    }
}

impl Drop for VduseTransport {
    fn drop(&mut self) {
        let _ = self.destroy_now();
    }
}

/// A ring base in the daemon's encoding (split: the avail index; packed: the avail half
/// in bits 0-15, the used half in bits 16-31, each a slot with its wrap counter in bit 15)
/// as VDUSE's queue-state words: split `[avail, 0, 0, 0]`, packed `[last_avail_counter,
/// last_avail_idx, last_used_counter, last_used_idx]`.
fn state_words(packed: bool, base: u32) -> [u16; 4] {
    if !packed {
        return [base as u16, 0, 0, 0];
    }
    let half = |h: u32| [((h >> 15) & 1) as u16, (h & 0x7fff) as u16];
    let [ac, ai] = half(base & 0xffff);
    let [uc, ui] = half(base >> 16);
    [ac, ai, uc, ui]
}

/// The inverse of [`state_words`] for a packed ring.
fn ring_base_of([ac, ai, uc, ui]: [u16; 4]) -> u32 {
    let half = |counter: u16, idx: u16| u32::from(idx & 0x7fff) | (u32::from(counter & 1) << 15);
    half(ac, ai) | (half(uc, ui) << 16)
}

/// One run of the transport: the queue workers and what the driver has set up.
struct Session {
    dev: Arc<VduseDevice>,
    device: Arc<dyn VirtioDevice>,
    slots: Vec<Arc<QueueSlot>>,
    workers: Vec<JoinHandle<()>>,
    iova: IovaSpace,
    status: u8,
    /// Per queue, until its first kick: the eventfd the kernel kicks meanwhile, and the
    /// worker's, which the kernel kicks afterwards.
    first_kick: Vec<Option<(EventFd, Arc<EventFd>)>>,
    session: u64,
    events: Option<EventSink>,
}

impl Session {
    fn refuse(&self, request: &'static str, reason: String) {
        if let Some(sink) = &self.events {
            sink(DaemonEvent::Refused {
                session: self.session,
                request,
                reason,
                hint: None,
            });
        }
    }

    /// Fetches `start..=last` of the IOTLB again and hands the result to every queue
    /// (each takes it between batches: a chain in progress keeps its mapping).
    fn refresh(&mut self, start: u64, last: u64) -> Result<(), VduseError> {
        self.iova.refresh(&self.dev, start, last)?;
        let mem = self.iova.memory(self.dev.name())?;
        for s in &self.slots {
            lock(&s.state).mem = mem.clone();
        }
        Ok(())
    }

    /// Starts every ready queue. `resume`: the driver has been running (a reclaimed
    /// device): each ring restarts at its used index, so the chains a dead daemon popped
    /// and never completed are processed again, and no first kick is awaited.
    fn start_rings(&mut self, resume: bool) -> Result<(), VduseError> {
        let features = self.dev.features()?;
        self.device.set_acked_features(features);
        self.refresh(0, u64::MAX)?;
        for (i, slot) in self.slots.iter().enumerate() {
            let index = i as u32;
            let info = self.dev.vq_info(index)?;
            if info.ready == 0 {
                continue;
            }
            let worker_kick =
                Arc::new(EventFd::new(true).map_err(|source| VduseError::Kernel {
                    device: self.dev.name().into(),
                    op: "eventfd",
                    source,
                })?);
            {
                let mut st = lock(&slot.state);
                st.size = info.num;
                st.addrs = Some(VringAddrs {
                    index,
                    flags: 0,
                    desc: info.desc_addr,
                    used: info.device_addr,
                    avail: info.driver_addr,
                    log: 0,
                });
                let packed = features & RING_PACKED != 0;
                st.base = if packed {
                    // Where the driver set the ring up (VDUSE keeps no other packed state).
                    let [ac, ai, uc, ui] =
                        [info.state.w0, info.state.w1, info.state.w2, info.state.w3];
                    ring_base_of([ac & 1, ai & 0x7fff, uc & 1, ui & 0x7fff])
                } else if resume {
                    let used_idx = info.device_addr.checked_add(2).map(|a| st.mem.read_u16(a));
                    match used_idx {
                        Some(Ok(idx)) => u32::from(idx),
                        _ => {
                            return Err(VduseError::Invalid {
                                device: self.dev.name().into(),
                                why: format!(
                                    "queue {index}: used ring at {:#x} is not mapped",
                                    info.device_addr
                                ),
                            })
                        }
                    }
                } else {
                    u32::from(info.state.w0)
                };
                st.event_idx = features & EVENT_IDX != 0;
                st.indirect = features & INDIRECT_DESC != 0;
                st.packed = packed;
                st.call = Some(Notifier::Vduse(self.dev.clone()));
                st.enabled = true;
                st.start().map_err(|e| VduseError::Invalid {
                    device: self.dev.name().into(),
                    why: format!("queue {index}: {e}"),
                })?;
                st.kick = Some(worker_kick.clone());
            }
            if resume {
                self.dev.set_kickfd(index, Some(worker_kick.as_fd()))?;
                slot.wake();
                continue;
            }
            let first = EventFd::new(true).map_err(|source| VduseError::Kernel {
                device: self.dev.name().into(),
                op: "eventfd",
                source,
            })?;
            self.dev.set_kickfd(index, Some(first.as_fd()))?;
            self.first_kick[i] = Some((first, worker_kick));
        }
        Ok(())
    }

    /// The driver kicked queue `i` for the first time: its buffers are mapped by now.
    fn first_kick(&mut self, i: usize) -> Result<(), VduseError> {
        let Some((first, worker_kick)) = self.first_kick[i].take() else {
            return Ok(());
        };
        let _ = first.try_read();
        self.refresh(0, u64::MAX)?;
        self.dev.set_kickfd(i as u32, Some(worker_kick.as_fd()))?;
        self.slots[i].wake();
        Ok(())
    }

    fn stop_rings(&mut self) {
        for (i, s) in self.slots.iter().enumerate() {
            {
                let mut st = lock(&s.state);
                st.stop();
                st.call = None;
                st.enabled = false;
                st.addrs = None;
                st.mem = GuestMemory::default();
            }
            let _ = self.dev.set_kickfd(i as u32, None);
            self.first_kick[i] = None;
        }
        self.iova.clear();
        self.device.reset();
    }

    /// Handles one request and answers it; an error is reported and answered with a
    /// failure, and serving goes on.
    fn handle(&mut self, req: Request) -> Result<(), VduseError> {
        let outcome = match req {
            Request::GetVqState { id, index } => {
                self.dev.check_queue("VDUSE_GET_VQ_STATE", index).map(|()| {
                    let st = lock(&self.slots[index as usize].state);
                    let base = st.ring.as_ref().map_or(st.base, |r| r.base());
                    Response::vq_state_words(id, index, state_words(st.packed, base))
                })
            }
            Request::SetStatus { id, status } => {
                let was = self.status;
                self.status = status;
                let started = if status & STATUS_DRIVER_OK != 0 && was & STATUS_DRIVER_OK == 0 {
                    self.start_rings(false)
                } else if status == 0 && was != 0 {
                    self.stop_rings();
                    Ok(())
                } else {
                    Ok(())
                };
                started.map(|()| Response::ok(id))
            }
            Request::UpdateIotlb { id, start, last } => {
                if last < start {
                    Err(VduseError::Malformed {
                        device: self.dev.name().into(),
                        why: format!("VDUSE_UPDATE_IOTLB of {start:#x}..={last:#x}"),
                    })
                } else {
                    self.refresh(start, last).map(|()| Response::ok(id))
                }
            }
            Request::Unknown { kind, .. } => Err(VduseError::Malformed {
                device: self.dev.name().into(),
                why: format!("unknown request type {kind}"),
            }),
        };
        let response = match outcome {
            Ok(r) => r,
            Err(e) => {
                self.refuse(req.name(), e.to_string());
                Response::failed(req.id())
            }
        };
        self.dev.write_response(&response)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for s in &self.slots {
            s.request_stop();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.stop_rings();
    }
}

/// Serves `device` through `transport` until `stop` is readable; `counters` receives the
/// per-queue completion counters once the workers exist. Every worker, mapping and fd of
/// the run is released before this returns (the device itself stays until the transport
/// is destroyed).
pub(crate) fn serve(
    transport: &VduseTransport,
    device: Arc<dyn VirtioDevice>,
    stop: &EventFd,
    poll: Duration,
    events: Option<EventSink>,
    session: u64,
    counters: impl FnOnce(Vec<Arc<AtomicU64>>),
) -> Result<(), VduseError> {
    let dev = transport.device().clone();
    let reporter = events.as_ref().map(|sink| QueueReporter {
        session,
        sink: sink.clone(),
    });
    let io = |source| VduseError::Kernel {
        device: dev.name().into(),
        op: "start a queue worker",
        source,
    };
    let mut s = Session {
        dev: dev.clone(),
        device: device.clone(),
        slots: Vec::new(),
        workers: Vec::new(),
        iova: IovaSpace::new(),
        status: 0,
        first_kick: Vec::new(),
        session,
        events,
    };
    for i in 0..device.num_queues() {
        let slot = Arc::new(QueueSlot::new(i, reporter.clone()).map_err(io)?);
        s.workers
            .push(spawn_worker(slot.clone(), device.clone(), poll).map_err(io)?);
        s.slots.push(slot);
        s.first_kick.push(None);
    }
    counters(s.slots.iter().map(|q| q.completed.clone()).collect());
    if transport.reclaimed() {
        // The driver is past DRIVER_OK already: no SET_STATUS will come to start the rings.
        s.status = STATUS_DRIVER_OK;
        s.start_rings(true)?;
    }
    loop {
        let waiting: Vec<usize> = (0..s.first_kick.len())
            .filter(|&i| s.first_kick[i].is_some())
            .collect();
        let ready = {
            let mut fds: Vec<BorrowedFd<'_>> = vec![dev.as_fd(), stop.as_fd()];
            fds.extend(
                waiting
                    .iter()
                    .filter_map(|&i| s.first_kick[i].as_ref().map(|(k, _)| k.as_fd())),
            );
            poll_many(&fds, -1).map_err(|source| VduseError::Kernel {
                device: dev.name().into(),
                op: "poll",
                source,
            })?
        };
        if ready[1] {
            return Ok(());
        }
        if ready[0] {
            match dev.read_request(Some(Duration::ZERO)) {
                Ok(Some(req)) => s.handle(req)?,
                Ok(None) => {}
                // A request we cannot parse has no id to answer: report it, go on.
                Err(e @ VduseError::Malformed { .. }) => s.refuse("VDUSE request", e.to_string()),
                Err(e) => return Err(e),
            }
        }
        for (j, &i) in waiting.iter().enumerate() {
            if ready[2 + j] {
                if let Err(e) = s.first_kick(i) {
                    s.refuse("VDUSE kick", format!("queue {i}: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vduse::abi::{MSG_SIZE, VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    /// A session on one end of a socketpair (the "kernel" holds the other), with its
    /// refusals collected.
    fn session() -> (Session, UnixStream, Arc<Mutex<Vec<DaemonEvent>>>) {
        let (ours, kernel) = UnixStream::pair().expect("socketpair");
        let dev = Arc::new(VduseDevice::from_fd("test0", ours.into(), 2));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let events: EventSink = Arc::new(move |e| sink.lock().unwrap().push(e));
        let mut s = Session {
            dev,
            // Two queues; never asked to process anything here.
            device: Arc::new(crate::daemon::tests::Mirror),
            slots: Vec::new(),
            workers: Vec::new(),
            iova: IovaSpace::new(),
            status: 0,
            first_kick: Vec::new(),
            session: 1,
            events: Some(events),
        };
        for i in 0..2 {
            s.slots
                .push(Arc::new(QueueSlot::new(i, None).expect("slot")));
            s.first_kick.push(None);
        }
        (s, kernel, seen)
    }

    fn response(kernel: &mut UnixStream) -> (u32, u32, u32, u16) {
        use std::io::Read;
        let mut b = [0u8; MSG_SIZE];
        kernel.read_exact(&mut b).expect("a response");
        let word = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        (
            word(0),
            word(4),
            word(24),
            u16::from_ne_bytes([b[28], b[29]]),
        )
    }

    #[test]
    fn bad_queue_indexes_and_unknown_requests_fail_and_serving_goes_on() {
        let (mut s, mut kernel, seen) = session();
        s.handle(Request::GetVqState { id: 1, index: 2 }).unwrap();
        assert_eq!(response(&mut kernel).1, VDUSE_REQ_RESULT_FAILED);
        s.handle(Request::GetVqState {
            id: 2,
            index: u32::MAX,
        })
        .unwrap();
        assert_eq!(response(&mut kernel).1, VDUSE_REQ_RESULT_FAILED);
        s.handle(Request::Unknown { id: 3, kind: 77 }).unwrap();
        assert_eq!(response(&mut kernel), (3, VDUSE_REQ_RESULT_FAILED, 0, 0));
        s.handle(Request::UpdateIotlb {
            id: 4,
            start: 9,
            last: 8,
        })
        .unwrap();
        assert_eq!(response(&mut kernel).1, VDUSE_REQ_RESULT_FAILED);
        // A good request after all that is answered.
        lock(&s.slots[1].state).base = 0x1234;
        s.handle(Request::GetVqState { id: 5, index: 1 }).unwrap();
        assert_eq!(response(&mut kernel), (5, VDUSE_REQ_RESULT_OK, 1, 0x1234));
        let reasons: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                DaemonEvent::Refused {
                    request, reason, ..
                } => format!("{request}: {reason}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert_eq!(
            reasons[0],
            "VDUSE_GET_VQ_STATE: VDUSE device \"test0\": VDUSE_GET_VQ_STATE: queue 2 does not \
             exist (the device has 2)"
        );
        assert!(
            reasons[2].contains("unknown request type 77"),
            "{}",
            reasons[2]
        );
        assert!(reasons[3].contains("0x9..=0x8"), "{}", reasons[3]);
    }

    #[test]
    fn a_reset_before_driver_ok_answers_and_keeps_nothing() {
        let (mut s, mut kernel, seen) = session();
        s.handle(Request::SetStatus { id: 1, status: 0x3 }).unwrap();
        s.handle(Request::SetStatus { id: 2, status: 0 }).unwrap();
        assert_eq!(response(&mut kernel).1, VDUSE_REQ_RESULT_OK);
        assert_eq!(response(&mut kernel).1, VDUSE_REQ_RESULT_OK);
        assert!(s.iova.is_empty());
        assert!(seen.lock().unwrap().is_empty());
    }

    fn record() -> Record {
        let mut config = vec![0u8; 60];
        config[..8].copy_from_slice(&16384u64.to_le_bytes());
        Record {
            device_id: BLK,
            features: ACCESS_PLATFORM | (1 << 32),
            queues: 1,
            queue_size: 256,
            config,
        }
    }

    #[test]
    fn a_takeover_names_the_first_field_that_differs() {
        let old = record();
        assert_eq!(Record::decode(&old.encode()), Some(old.clone()));
        assert_eq!(old.mismatch(&old), None);
        let mut bigger = old.clone();
        bigger.config[..8].copy_from_slice(&24576u64.to_le_bytes());
        assert_eq!(
            old.mismatch(&bigger).unwrap(),
            "its capacity is 16384 sectors, this start's 24576 (another image size)"
        );
        let mut other = old.clone();
        other.config[20] = 1;
        assert_eq!(
            old.mismatch(&other).unwrap(),
            "its configuration space (60 bytes) differs from this start's (60 bytes) from byte 20"
        );
        other.queue_size = 128;
        assert_eq!(
            old.mismatch(&other).unwrap(),
            "its queue size is 256, this start's 128"
        );
        other.queues = 2;
        assert_eq!(
            old.mismatch(&other).unwrap(),
            "its queue count is 1, this start's 2"
        );
        other.features |= RING_PACKED;
        assert!(old
            .mismatch(&other)
            .unwrap()
            .ends_with("(bits 0x400000000 differ)"));
        other.device_id = 1;
        assert_eq!(
            old.mismatch(&other).unwrap(),
            "its device type is 2, this start's 1"
        );
        for bad in [
            "",
            "device_id 2",
            "device_id x\nfeatures 0x1\nqueues 1\nqueue_size 1\nconfig ",
        ] {
            assert_eq!(Record::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn packed_rings_are_offered_only_when_asked_and_access_platform_always() {
        let d = crate::daemon::tests::Mirror;
        let split = VduseTransport::features_for(&d, false);
        let packed = VduseTransport::features_for(&d, true);
        assert_eq!(split & RING_PACKED, 0);
        assert_eq!(packed & RING_PACKED, RING_PACKED);
        assert_eq!(packed & !RING_PACKED, split);
        assert_ne!(split & ACCESS_PLATFORM, 0);
    }

    #[test]
    fn packed_queue_state_converts_both_ways() {
        // The driver's set-up: avail and used at slot 0 with wrap counters 1.
        let base = ring_base_of([1, 0, 1, 0]);
        assert_eq!(base, 0x8000_8000);
        assert_eq!(state_words(true, base), [1, 0, 1, 0]);
        let base = ring_base_of([0, 0x7fff, 1, 5]);
        assert_eq!(state_words(true, base), [0, 0x7fff, 1, 5]);
        assert_eq!(state_words(false, 0x1234), [0x1234, 0, 0, 0]);
    }
}
