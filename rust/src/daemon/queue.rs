//! Per-queue state shared between the session thread (control plane) and the queue's
//! worker thread (data plane), and the worker loop itself.
//!
//! Lock order: a worker holds its queue's `state` lock for one whole processing pass
//! (pop, device, complete, notify); the session takes the same lock to change the queue
//! (memory table, GET_VRING_BASE, kick/call fds, enable), so a control request waits for
//! the batch in progress and never sees a half-processed ring (ADVERSARIAL J5). No thread
//! holds two queue locks. A Python device takes the GIL inside the lock; the session
//! thread takes the GIL too (a Python device's config, features and state hooks), but
//! never while it holds a queue lock, so the two cannot deadlock.

use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{VringAddrs, VRING_ADDR_F_LOG};
use crate::memory::dirty_log::{DirtyLog, DirtyLogError};
use crate::memory::{Access, GuestMemory};
use crate::sys::{poll_many, EventFd};
use crate::user::payload::{iotlb, IotlbPayload};
use crate::user::BackendChannel;
use crate::vduse::VduseDevice;
use crate::vring::{DescriptorChain, DeviceQueue, RingLayout, RingLog, Segment, VringError};

use super::device::{DeviceError, VirtioDevice};
use super::events::{DaemonEvent, QueueReporter};
use super::inflight::{InflightError, InflightQueue};
use super::postcopy::BatchWatch;

/// A lock that survives a panic in the thread that held it: the state is plain data that
/// every user re-validates, so poisoning would only turn one failure into many (J7).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a queue tells the driver that the used ring moved: vhost-user's call eventfd, or,
/// for VDUSE (which has no call eventfd), the `VDUSE_VQ_INJECT_IRQ` ioctl.
#[derive(Debug)]
pub(crate) enum Notifier {
    /// Write 1 to the front-end's call eventfd.
    Event(EventFd),
    /// Inject the queue's interrupt into the VDUSE device's driver.
    Vduse(Arc<VduseDevice>),
}

impl Notifier {
    /// Notifies the driver of queue `index`. A failure is not the batch's: the driver
    /// will look at the ring at its next kick or interrupt anyway.
    fn notify(&self, index: u16) {
        match self {
            Notifier::Event(e) => {
                let _ = e.write(1);
            }
            Notifier::Vduse(dev) => {
                let _ = dev.inject_irq(u32::from(index));
            }
        }
    }
}

/// What the control plane has said about one queue.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    pub(crate) size: u32,
    pub(crate) addrs: Option<VringAddrs>,
    pub(crate) base: u32,
    pub(crate) kick: Option<Arc<EventFd>>,
    pub(crate) call: Option<Notifier>,
    pub(crate) err: Option<EventFd>,
    pub(crate) enabled: bool,
    /// The live ring, from SET_VRING_KICK until GET_VRING_BASE or a reset.
    pub(crate) ring: Option<DeviceQueue>,
    pub(crate) mem: GuestMemory,
    pub(crate) event_idx: bool,
    pub(crate) indirect: bool,
    pub(crate) packed: bool,
    pub(crate) last_error: Option<String>,
    /// Inflight tracking of this queue, when the front-end negotiated it.
    pub(crate) inflight: Option<InflightQueue>,
    /// Chains an earlier back-end left in flight, processed before new ones.
    pub(crate) resubmit: Vec<DescriptorChain>,
    /// The inflight area stopped adding up while the ring ran: the queue stops until it
    /// is started again, rather than run untracked.
    pub(crate) inflight_broken: bool,
    /// Where a failure of this queue is reported, if anywhere.
    pub(crate) reporter: Option<QueueReporter>,
    /// The migration dirty log while the front-end has `VHOST_F_LOG_ALL` acked: every
    /// write into guest memory is marked in it. `None` (logging off) costs the data path
    /// one check per batch.
    pub(crate) log: Option<Arc<DirtyLog>>,
    /// The back-end channel, when INBAND_NOTIFICATIONS is acked: a ring without a call
    /// (or err) fd is signalled with VRING_CALL (VRING_ERR) on it instead.
    pub(crate) inband: Option<Arc<BackendChannel>>,
    /// With `VIRTIO_F_ACCESS_PLATFORM` acked: ring addresses are I/O virtual, `mem` is the
    /// session's IOTLB view, and misses are asked for as this says.
    pub(crate) iommu: Option<QueueIommu>,
    /// The ring's layout, kept to check its areas against each new IOTLB view.
    layout: Option<RingLayout>,
    /// SET_VRING_BASE not applied yet: behind an IOMMU, the ring it reads (a split used
    /// index) may not be mapped when the ring starts.
    restore_pending: bool,
    /// A ring area stayed unmapped past the miss bound: the queue failed and waits for
    /// the front-end to start it again (its next SET_VRING_KICK), rather than asking and
    /// failing anew at every IOTLB message or kick.
    ring_unreachable: bool,
}

/// How a queue behind an IOMMU gets the translations it misses.
#[derive(Debug, Clone)]
pub(crate) struct QueueIommu {
    /// Where `BACKEND_IOTLB_MSG` misses go (`None` until SET_BACKEND_REQ_FD).
    pub(crate) channel: Option<Arc<BackendChannel>>,
    /// How long one miss may stay unanswered before the request that needs it fails (or
    /// the queue, for a miss on the ring areas themselves).
    pub(crate) miss_timeout: Duration,
}

/// A ring's logging target: the log, the used ring's log address when the front-end set
/// `VHOST_VRING_F_LOG` in SET_VRING_ADDR, and behind an IOMMU the IOTLB view `mem` whose
/// I/O virtual addresses (buffers, ring, log address alike) are translated to the
/// guest-physical pages the log is indexed by.
fn ring_log<'a>(
    log: Option<&'a DirtyLog>,
    addrs: Option<VringAddrs>,
    mem: &'a GuestMemory,
    iommu: bool,
) -> Option<RingLog<'a>> {
    Some(RingLog {
        log: log?,
        used_log_addr: addrs
            .filter(|a| a.flags & VRING_ADDR_F_LOG != 0)
            .map(|a| a.log),
        iova_view: iommu.then_some(mem),
    })
}

fn inflight_error(e: InflightError) -> DeviceError {
    match e {
        InflightError::Ring(e) => DeviceError::Queue(e),
        other => DeviceError::Invalid(other.to_string()),
    }
}

impl QueueState {
    /// Builds the ring from what SET_VRING_NUM/ADDR/BASE said (SET_VRING_KICK).
    pub(crate) fn start(&mut self) -> Result<(), DeviceError> {
        let addrs = self
            .addrs
            .ok_or_else(|| DeviceError::Invalid("ring started before SET_VRING_ADDR".into()))?;
        let layout = if self.iommu.is_some() {
            // I/O virtual addresses, checked against the IOTLB by the worker before each
            // pass (they may not be mapped yet: the worker asks for them).
            RingLayout::new(self.packed, self.size, addrs.desc, addrs.avail, addrs.used)?
        } else {
            RingLayout::from_user(
                &self.mem,
                self.packed,
                self.size,
                addrs.desc,
                addrs.avail,
                addrs.used,
            )?
        };
        let mut ring = DeviceQueue::new(layout, self.event_idx, self.indirect)?;
        self.restore_pending = false;
        match ring.restore(&self.mem, self.base) {
            Err(e) if e.is_iotlb_miss() => self.restore_pending = true,
            other => other?,
        }
        self.layout = Some(layout);
        self.resubmit.clear();
        if let Some(q) = self.inflight.as_mut() {
            self.resubmit = q.start(&mut ring, &self.mem).map_err(inflight_error)?;
        }
        self.ring = Some(ring);
        self.inflight_broken = false;
        self.ring_unreachable = false;
        self.last_error = None;
        Ok(())
    }

    /// Stops the ring and returns its base (GET_VRING_BASE); the kick fd goes with it.
    pub(crate) fn stop(&mut self) -> u32 {
        if let Some(ring) = self.ring.take() {
            self.base = ring.base();
        }
        self.kick = None;
        self.resubmit.clear();
        self.inflight = None;
        self.base
    }

    /// Where this ring's writes are logged, while logging is on.
    fn ring_log(&self) -> Option<RingLog<'_>> {
        ring_log(
            self.log.as_deref(),
            self.addrs,
            &self.mem,
            self.iommu.is_some(),
        )
    }

    /// Marks the ring's suppression fields after the worker wrote them (logging on only).
    fn log_ring_fields(&self) -> Result<(), DirtyLogError> {
        match (self.ring_log(), &self.ring) {
            (Some(log), Some(ring)) => ring.log_ring(&log, ring.used_position()),
            _ => Ok(()),
        }
    }

    /// Behind an IOMMU: the ring's areas must be mapped (with the access the device needs)
    /// in the current view before a pass, and a base left pending applied. A miss is
    /// returned for the worker to ask for; anything else fails the queue.
    fn iommu_ready(&mut self) -> Result<(), VringError> {
        if self.iommu.is_none() {
            return Ok(());
        }
        if let Some(layout) = &self.layout {
            layout.check_memory(&self.mem)?;
        }
        if self.restore_pending {
            if let Some(ring) = self.ring.as_mut() {
                ring.restore(&self.mem, self.base)?;
            }
            self.restore_pending = false;
        }
        Ok(())
    }

    fn runnable(&self) -> bool {
        self.enabled
            && self.ring.as_ref().is_some_and(|r| !r.is_broken())
            && !self.inflight_broken
            && !self.ring_unreachable
    }

    fn fail(&mut self, queue: u16, why: String) {
        if let Some(err) = &self.err {
            let _ = err.write(1);
        } else if let Some(channel) = &self.inband {
            let _ = channel.signal_error(u32::from(queue));
        }
        if let Some(r) = &self.reporter {
            (r.sink)(DaemonEvent::QueueFailed {
                session: r.session,
                queue,
                reason: why.clone(),
            });
        }
        self.last_error = Some(why);
    }
}

/// One queue: its state, and the eventfd that wakes its worker.
#[derive(Debug)]
pub(crate) struct QueueSlot {
    pub(crate) index: u16,
    pub(crate) state: Mutex<QueueState>,
    wake: EventFd,
    stop: AtomicBool,
    /// Chains completed; shared with [`DaemonStats`](super::DaemonStats).
    pub(crate) completed: Arc<AtomicU64>,
    /// When the batch in progress started, for postcopy's fault bound.
    pub(crate) watch: Arc<BatchWatch>,
    /// IOTLB misses asked for; shared with [`DaemonStats`](super::DaemonStats).
    pub(crate) iotlb_misses: Arc<AtomicU64>,
}

impl QueueSlot {
    pub(crate) fn new(index: u16, reporter: Option<QueueReporter>) -> std::io::Result<Self> {
        Ok(QueueSlot {
            index,
            state: Mutex::new(QueueState {
                reporter,
                ..QueueState::default()
            }),
            wake: EventFd::new(true)?,
            stop: AtomicBool::new(false),
            completed: Arc::new(AtomicU64::new(0)),
            watch: Arc::new(BatchWatch::default()),
            iotlb_misses: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Makes the worker look at the ring (a new kick fd, enable, in-band kick).
    pub(crate) fn wake(&self) {
        let _ = self.wake.write(1);
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// Starts the worker thread of `slot`.
pub(crate) fn spawn_worker(
    slot: Arc<QueueSlot>,
    device: Arc<dyn VirtioDevice>,
    poll: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vhost-q{}", slot.index))
        .spawn(move || {
            slot.watch.enter();
            worker(&slot, &*device, poll)
        })
}

fn worker(slot: &QueueSlot, device: &dyn VirtioDevice, poll: Duration) {
    loop {
        let kick = lock(&slot.state).kick.clone();
        let ready = match &kick {
            Some(k) => poll_many(&[slot.wake.as_fd(), k.as_fd()], -1),
            None => poll_many(&[slot.wake.as_fd()], -1),
        };
        // The wake-up is consumed before the stop flag is read: read after it, it could
        // swallow the wake-up of a stop requested in between, and the worker would sleep
        // in the next poll for ever (found by fuzz/daemon_session).
        if ready.as_ref().is_ok_and(|r| r[0]) {
            let _ = slot.wake.read();
        }
        if slot.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(ready) = ready else {
            // poll itself failed (ENOMEM): nothing sensible to do but try again.
            continue;
        };
        if let (Some(k), Some(true)) = (&kick, ready.get(1)) {
            if let Err(e) = k.read() {
                // Not an eventfd, or hung up: stop listening to it instead of spinning.
                let mut st = lock(&slot.state);
                if st.kick.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, k)) {
                    st.kick = None;
                }
                st.fail(slot.index, format!("kick fd of queue {}: {e}", slot.index));
                continue;
            }
        }
        process(slot, device, poll);
    }
}

/// Drains the ring: batch after batch, with the driver's kicks off while we are looking
/// anyway; then, with `poll` set, keeps looking for that long after the last work (the
/// driver does not kick while we poll, and we do not sleep: both save a cross-CPU wake-up);
/// finally re-enables kicks, and drains again if buffers slipped in meanwhile.
fn process(slot: &QueueSlot, device: &dyn VirtioDevice, poll: Duration) {
    let mut done = Vec::new();
    let mut idle_since: Option<Instant> = None;
    let mut kicks_on = true;
    let mut waiting: Option<MissWait> = None;
    // A pop's miss went unanswered past its bound: why, for the request the next pass fails.
    let mut expired: Option<String> = None;
    loop {
        let mut guard = lock(&slot.state);
        let st = &mut *guard;
        // A failed postcopy stops the queue: its memory may read as zeros now.
        if !st.runnable() || slot.watch.failed() || slot.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = st.iommu_ready() {
            let Some(miss) = e.iotlb_miss() else {
                return st.fail(slot.index, format!("queue {}: {e}", slot.index));
            };
            let iommu = st.iommu.clone();
            drop(guard);
            // A ring area itself unmapped: there is no request to fail, only the queue.
            match ask_translation(slot, iommu, miss, &mut waiting) {
                Ok(Asked::Waited) => continue,
                Ok(Asked::Expired(why)) | Err(why) => {
                    let mut st = lock(&slot.state);
                    st.ring_unreachable = true;
                    return st.fail(slot.index, format!("{why} (ring area)"));
                }
            }
        }
        if kicks_on {
            if let Some(Err(e)) = st.ring.as_mut().map(|r| r.set_notification(&st.mem, false)) {
                return st.fail(slot.index, format!("queue {}: {e}", slot.index));
            }
            if let Err(e) = st.log_ring_fields() {
                return st.fail(slot.index, format!("queue {}: {e}", slot.index));
            }
            kicks_on = false;
        }
        slot.watch.begin();
        let batch = match expired.take() {
            None => one_batch(slot, device, st, &mut done, Pop::Mapped),
            Some(why) => fail_missed_request(slot, device, st, &mut done, why),
        };
        slot.watch.end();
        match batch {
            // A pop missed: nothing was consumed; ask, wait for the update, pop again. Past
            // the bound, the next pass fails that one request and the queue goes on.
            Err(DeviceError::Queue(e)) if e.is_iotlb_miss() => {
                let iommu = st.iommu.clone();
                drop(guard);
                let miss = e.iotlb_miss().unwrap_or((0, Access::Read));
                match ask_translation(slot, iommu, miss, &mut waiting) {
                    Ok(Asked::Waited) => {}
                    Ok(Asked::Expired(why)) => {
                        waiting = None;
                        expired = Some(why);
                    }
                    Err(why) => return lock(&slot.state).fail(slot.index, why),
                }
                continue;
            }
            Err(e) => return st.fail(slot.index, format!("queue {}: {e}", slot.index)),
            Ok(work) => {
                // The miss waited on (if any) was answered: a later miss of the same page
                // (unmapped again meanwhile, as a strict guest IOMMU does after each
                // request) is a new one, sent at once and bounded from now; kept, it
                // would wait out MISS_REPEAT unsent and expire early.
                waiting = None;
                if work {
                    idle_since = None;
                    continue;
                }
            }
        }
        let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
        if idle < poll && !slot.stop.load(Ordering::Relaxed) {
            drop(guard);
            std::hint::spin_loop();
            continue;
        }
        let Some(ring) = st.ring.as_mut() else {
            return;
        };
        let enabled = ring.set_notification(&st.mem, true);
        if let Err(e) = st.log_ring_fields() {
            return st.fail(slot.index, format!("queue {}: {e}", slot.index));
        }
        match enabled {
            Ok(true) => {
                // Buffers arrived between the last pop and re-enabling: go round again.
                kicks_on = true;
                idle_since = None;
            }
            Ok(false) => return,
            Err(e) => return st.fail(slot.index, format!("queue {}: {e}", slot.index)),
        }
    }
}

/// The miss a worker is waiting on, since when, and when it was last sent.
struct MissWait {
    iova: u64,
    access: Access,
    since: Instant,
    sent: Instant,
}

/// What came of asking for a translation.
enum Asked {
    /// The miss was sent and the worker waited (for an update, a stop, or the time left
    /// of the bound): look again.
    Waited,
    /// The same miss has gone unanswered past `miss_timeout`: why, naming the queue,
    /// address and access. Nothing was sent.
    Expired(String),
}

/// How long a miss sent stays unrepeated: a worker waiting on it is woken by every IOTLB
/// update and invalidation, for any page, and sending it again at each wake-up made
/// QEMU's late answers to those repeats wake the worker on its next miss, which it
/// repeated in turn (the guest test saw 40,000 misses for 1,200 pages of I/O).
const MISS_REPEAT: Duration = Duration::from_millis(100);

/// Sends `BACKEND_IOTLB_MSG` (type MISS) for `miss` on the back-end channel (not again
/// for [`MISS_REPEAT`] while it is unanswered), without
/// waiting for an ack (the front-end answers with an IOTLB update on the session's socket,
/// which the session thread applies and which wakes this worker), then waits for a wake-up,
/// bounded by the time left of the miss's bound. The same miss unanswered past
/// `miss_timeout` is [`Asked::Expired`]; what cannot be asked at all (no IOMMU, no
/// back-end channel, the channel failing) is an error for the queue.
fn ask_translation(
    slot: &QueueSlot,
    iommu: Option<QueueIommu>,
    (iova, access): (u64, Access),
    waiting: &mut Option<MissWait>,
) -> Result<Asked, String> {
    let Some(iommu) = iommu else {
        return Err(format!(
            "queue {}: I/O virtual address {iova:#x} missed without an IOMMU",
            slot.index
        ));
    };
    let (since, sent) = match waiting {
        Some(w) if w.iova == iova && w.access == access => (w.since, Some(w.sent)),
        _ => (Instant::now(), None),
    };
    let repeat = sent.map_or(true, |t| t.elapsed() >= MISS_REPEAT);
    let left = iommu.miss_timeout.saturating_sub(since.elapsed());
    if left.is_zero() {
        return Ok(Asked::Expired(format!(
            "queue {}: IOTLB miss for a device {access} at I/O virtual address {iova:#x} not \
             answered within {:?}",
            slot.index, iommu.miss_timeout
        )));
    }
    let Some(channel) = iommu.channel else {
        return Err(format!(
            "queue {}: IOTLB miss at I/O virtual address {iova:#x} and no back-end channel \
             to ask for it (SET_BACKEND_REQ_FD)",
            slot.index
        ));
    };
    let perm = match access {
        Access::Read => iotlb::PERM_RO,
        Access::Write => iotlb::PERM_WO,
    };
    let msg = IotlbPayload {
        iova,
        size: 0,
        uaddr: 0,
        perm,
        kind: iotlb::MISS,
    };
    if repeat {
        channel.post_iotlb_msg(&msg).map_err(|e| {
            format!(
                "queue {}: BACKEND_IOTLB_MSG miss at {iova:#x}: {e}",
                slot.index
            )
        })?;
        slot.iotlb_misses.fetch_add(1, Ordering::Relaxed);
    }
    *waiting = Some(MissWait {
        iova,
        access,
        since,
        sent: match sent {
            Some(t) if !repeat => t,
            _ => Instant::now(),
        },
    });
    // Woken by the session thread once it applied an IOTLB update (or by a stop); the
    // miss is sent again after MISS_REPEAT without an answer.
    let left = left.min(MISS_REPEAT);
    let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
    if let Ok(ready) = poll_many(&[slot.wake.as_fd()], ms) {
        if ready[0] {
            let _ = slot.wake.read();
            if slot.stop.load(Ordering::SeqCst) {
                // That was (also) the stop's wake-up: leave it for the worker's own poll,
                // which reads the stop flag after it.
                slot.wake();
            }
        }
    }
    Ok(Asked::Waited)
}

/// How a pass pops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pop {
    /// A batch of chains whose buffers are all mapped (every pass but the two below).
    Mapped,
    /// One chain whose buffers may lie in IOTLB holes, for the device to fail.
    Holes,
    /// One head consumed unread, returned with length 0 without the device.
    Discard,
}

/// Fails the one request at the head of the ring whose pop missed and whose miss went
/// unanswered past the bound (`why` says which), so that the queue goes on (ADVERSARIAL
/// L2):
/// - when only its buffers miss (the descriptors were readable), the chain is popped with
///   its holes and goes to the device like any request: the device meets the hole when it
///   touches the buffer and fails the request its own way, as for a write through a
///   read-only mapping (blk: `VIRTIO_BLK_S_IOERR` in the status byte, when the status
///   byte's buffer is mapped; when it is the hole, the request can only be returned with
///   length 0, which the driver sees as a request the device never answered properly);
/// - when its descriptor table or indirect table misses, its buffers cannot even be found:
///   the head is consumed unread and returned with length 0, the device never sees it,
///   and nothing is written anywhere (a blk driver finds no status: the request failed).
///
/// If the translation arrived after all, an ordinary pass serves the request and nothing
/// fails. The failure is kept as the queue's last error and reported (a `RequestFailed`
/// event).
/// A miss on the ring areas themselves has no request to fail; that fails the queue (see
/// [`process`]).
fn fail_missed_request(
    slot: &QueueSlot,
    device: &dyn VirtioDevice,
    st: &mut QueueState,
    done: &mut Vec<(u16, u32)>,
    why: String,
) -> Result<bool, DeviceError> {
    let missed = |r: &Result<bool, DeviceError>| matches!(r, Err(DeviceError::Queue(e)) if e.is_iotlb_miss());
    // The update may have come in the meantime: then nothing fails.
    let r = one_batch(slot, device, st, done, Pop::Mapped);
    if !missed(&r) {
        return r;
    }
    let mut r = one_batch(slot, device, st, done, Pop::Holes);
    if missed(&r) {
        r = one_batch(slot, device, st, done, Pop::Discard);
    }
    if let (Ok(true), Some(&(head, len))) = (&r, done.first()) {
        let why = format!("{why}: request at head {head} failed (used length {len})");
        if let Some(rep) = &st.reporter {
            (rep.sink)(DaemonEvent::RequestFailed {
                session: rep.session,
                queue: slot.index,
                reason: why.clone(),
            });
        }
        st.last_error = Some(why);
    }
    r
}

/// One batch: the chains an earlier back-end left in flight, or a fresh pop; the device
/// handles them; they are completed and the driver notified if it asked. Returns whether
/// there was anything to do.
fn one_batch(
    slot: &QueueSlot,
    device: &dyn VirtioDevice,
    st: &mut QueueState,
    done: &mut Vec<(u16, u32)>,
    how: Pop,
) -> Result<bool, DeviceError> {
    let Some(ring) = st.ring.as_mut() else {
        return Ok(false);
    };
    let mem = &st.mem;
    let chains = if st.resubmit.is_empty() {
        let max = usize::from(ring.size());
        let pop = |ring: &mut DeviceQueue, descs: Option<&mut Vec<_>>| match (how, descs) {
            (Pop::Mapped, Some(descs)) => ring.pop_batch_recording(mem, max, descs),
            (Pop::Mapped, None) => ring.pop_batch(mem, max),
            (Pop::Holes, descs) => Ok(ring.pop_with_holes(mem, descs)?.into_iter().collect()),
            (Pop::Discard, descs) => Ok(ring.discard_head(mem, descs)?.into_iter().collect()),
        };
        match st.inflight.as_mut() {
            Some(q) => {
                let mut descs = Vec::new();
                let c = pop(ring, Some(&mut descs))?;
                if let Err(e) = q.popped(&c, &descs) {
                    // The area cannot record what was popped: the queue stops rather than run
                    // with a record that no longer matches the ring.
                    st.inflight_broken = true;
                    return Err(inflight_error(e));
                }
                c
            }
            None => pop(ring, None)?,
        }
    } else {
        std::mem::take(&mut st.resubmit)
    };
    if chains.is_empty() {
        return Ok(false);
    }
    let heads: Vec<u16> = chains.iter().map(|c| c.head).collect();
    // With logging on, what each chain may have had written into it, kept past the device
    // (which consumes the chains) until its completion is marked.
    let writes: Vec<Vec<Segment>> = if st.log.is_some() {
        chains
            .iter()
            .map(|c| c.writable().copied().collect())
            .collect()
    } else {
        Vec::new()
    };
    done.clear();
    let outcome = if how == Pop::Discard {
        // Unread: given back below with length 0, the device never sees it.
        Ok(())
    } else {
        catch_unwind(AssertUnwindSafe(|| {
            device.process(slot.index, mem, chains, done)
        }))
        .unwrap_or_else(|_| Err(DeviceError::Failed("device panicked".into())))
    };
    // Whatever the device left out is returned empty, so the driver is not left waiting.
    if done.len() < heads.len() {
        let seen: std::collections::HashSet<u16> = done.iter().map(|&(h, _)| h).collect();
        done.extend(
            heads
                .into_iter()
                .filter(|h| !seen.contains(h))
                .map(|h| (h, 0)),
        );
    }
    let finished: Vec<u16> = done.iter().map(|&(h, _)| h).collect();
    let ring_log = ring_log(st.log.as_deref(), st.addrs, mem, st.iommu.is_some());
    // Buffers are marked before the used ring says they are complete; a marking failure
    // still completes the batch (the driver is not left waiting) and then stops the queue.
    let mut log_result = Ok(());
    if let Some(log) = &ring_log {
        // Every popped chain is in `done` by now (left-outs were added above).
        log_result = writes.iter().try_for_each(|segs| log.mark_buffers(segs));
    }
    if let Some(q) = st.inflight.as_mut() {
        q.completing(&finished);
    }
    let from = ring.used_position();
    if let Err(e) = ring.add_used_batch(mem, done) {
        if let Some(q) = st.inflight.as_mut() {
            q.abandon();
        }
        return Err(e.into());
    }
    if let Some(log) = &ring_log {
        log_result = log_result.and_then(|()| ring.log_ring(log, from));
    }
    if let Some(q) = st.inflight.as_mut() {
        q.completed(&finished, ring);
    }
    slot.completed
        .fetch_add(done.len() as u64, Ordering::Relaxed);
    if ring.needs_notification(mem)? {
        if let Some(call) = &st.call {
            call.notify(slot.index);
        } else if let Some(channel) = &st.inband {
            let _ = channel.signal_used(u32::from(slot.index));
        }
    }
    if let Err(e) = outcome {
        st.last_error = Some(e.to_string());
    }
    log_result?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vring::DescriptorChain;

    struct Idle;

    impl VirtioDevice for Idle {
        fn device_type(&self) -> u32 {
            4
        }
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            0
        }
        fn config(&self) -> Vec<u8> {
            Vec::new()
        }
        fn process(
            &self,
            _queue: u16,
            _mem: &GuestMemory,
            _chains: Vec<DescriptorChain>,
            _done: &mut Vec<(u16, u32)>,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    /// A stop requested while the worker is between waking up and reading its wake-up
    /// eventfd is not lost: the worker used to check the flag first and then consume the
    /// stop's wake-up with the earlier one, and sleep for ever in the next poll, so the
    /// session's end (which joins it) hung. Found by fuzz/daemon_session. The stop lands
    /// at a different delay after a wake-up in each round, sweeping the worker's wake-up
    /// latency; each join is bounded.
    #[test]
    fn a_stop_right_after_a_wake_up_is_not_lost() {
        let device: Arc<dyn VirtioDevice> = Arc::new(Idle);
        for round in 0..1500u32 {
            let slot = Arc::new(QueueSlot::new(0, None).unwrap());
            let worker = spawn_worker(slot.clone(), device.clone(), Duration::ZERO).unwrap();
            // Asleep in its poll, as between two requests.
            std::thread::sleep(Duration::from_micros(200));
            slot.wake();
            let delay = Duration::from_nanos(u64::from(round % 300) * 300);
            let spin = Instant::now();
            while spin.elapsed() < delay {
                std::hint::spin_loop();
            }
            slot.request_stop();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !worker.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the worker missed its stop"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
            worker.join().unwrap();
        }
    }
}
