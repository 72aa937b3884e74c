//! The daemon's second transport: the same [`VirtioDevice`] served as a VDUSE device of
//! the kernel the daemon runs on ([`crate::vduse`]), instead of to a vhost-user front-end.
//!
//! ```text
//! VduseTransport::create ── VDUSE_CREATE_DEV (device type, features + ACCESS_PLATFORM,
//!                           config, queues), VQ_SETUP each queue  (a stale device of the
//!                           same name, left by a daemon that died, is destroyed first)
//! serve: poll(device fd, stop, first kicks)
//!   SET_STATUS DRIVER_OK -> acked features, IOTLB fetched, VQ_GET_INFO per ready queue,
//!                           rings started at the kernel's avail index, kick eventfds set
//!   first kick of a queue -> IOTLB fetched again (the bounce area exists only once the
//!                           driver mapped its first buffer), then the kernel kicks the
//!                           worker's eventfd directly
//!   SET_STATUS 0          -> rings stopped (their avail index kept), mappings dropped
//!   GET_VQ_STATE          -> the ring's avail index
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
    /// accepts except packed rings (VDUSE reports split ring state only), and
    /// `ACCESS_PLATFORM`.
    pub fn features_for(device: &dyn VirtioDevice) -> u64 {
        device.features()
            | (transport::DEFAULT & device.transport_features() & !RING_PACKED)
            | ACCESS_PLATFORM
    }

    /// Creates VDUSE device `name` for `device` and sets its queues up. When a device of
    /// that name exists already (a daemon serving it died), it is destroyed and created
    /// again. If the kernel refuses that (EBUSY) because a vDPA device still uses it, the
    /// dead daemon's device is taken over instead ([`reclaimed`](Self::reclaimed)); if
    /// another process has its node open, [`VduseError::InUse`].
    pub fn create(device: &dyn VirtioDevice, name: &str) -> Result<Self, VduseError> {
        let control = VduseControl::open()?;
        let spec = DeviceSpec {
            name: name.into(),
            device_id: device.device_type(),
            vendor_id: 0,
            features: Self::features_for(device),
            queues: u32::from(device.num_queues()),
            vq_align: VQ_ALIGN,
            config: device.config(),
        };
        let mut replaced_stale = false;
        match control.create(&spec) {
            Err(VduseError::Exists { .. }) => match control.destroy(name) {
                Ok(()) => {
                    control.create(&spec)?;
                    replaced_stale = true;
                }
                Err(VduseError::InUse { .. }) => return Self::reclaim(control, name, &spec),
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
        Ok(t)
    }

    /// The device exists and cannot be destroyed. If its node is open, another daemon
    /// serves it: [`VduseError::InUse`]. Otherwise a daemon that died left it while a vDPA
    /// device (and the kernel's driver) still uses it: this daemon takes it over, with the
    /// configuration it was created with, and resumes its rings where the driver is.
    fn reclaim(control: VduseControl, name: &str, spec: &DeviceSpec) -> Result<Self, VduseError> {
        let dev = VduseDevice::open(name, spec.queues).map_err(|e| match e.errno() {
            Some(libc::EBUSY) => VduseError::InUse { name: name.into() },
            _ => e,
        })?;
        // The device keeps the configuration it was created with; a queue count that
        // differs from this device's would leave queues unserved or unknown.
        let last = spec.queues.saturating_sub(1);
        if !dev.kernel_has_queue(last)? || dev.kernel_has_queue(spec.queues)? {
            return Err(VduseError::Invalid {
                device: name.into(),
                why: format!(
                    "left by a dead daemon with a queue count other than {}; \
                     vdpa dev del {name} first, or start with the same --queues",
                    spec.queues
                ),
            });
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
        self.control.destroy(&self.name)
    }

    pub(crate) fn device(&self) -> &Arc<VduseDevice> {
        self.dev
            .as_ref()
            .expect("the device is open until destroyed")
    }
}

impl Drop for VduseTransport {
    fn drop(&mut self) {
        let _ = self.destroy_now();
    }
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
                st.base = if resume {
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
                st.packed = false;
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
                    Response::vq_state(id, index, base as u16)
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
}
