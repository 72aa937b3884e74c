//! The daemon's vhost-user request handler: the whole control plane of one front-end
//! session, on top of the validated requests a [`BackendSession`] hands over.
//!
//! [`BackendSession`]: crate::user::BackendSession

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::VringAddrs;
use crate::memory::dirty_log::{memory_end, DirtyLog};
use crate::memory::{GuestMemory, Iotlb, RegionInfo};
use crate::sys::EventFd;
use crate::user::codes::{
    protocol_features as pf, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES,
};
use crate::user::payload::{
    iotlb, DeviceStateTransfer, InflightDesc, IotlbPayload, LogDesc, ShmemConfig,
};
use crate::user::{BackendChannel, BackendHandler, Error, Result};

use super::device::{transport, DeviceError, VirtioDevice};
use super::events::{QueueReporter, UNSHARED_MEMORY_HINT};
use super::inflight::InflightArea;
use super::link::FrontendLink;
use super::postcopy::{FaultBound, Postcopy, DEFAULT_POSTCOPY_FAULT_TIMEOUT};
use super::queue::{lock, spawn_worker, Notifier, QueueIommu, QueueSlot};
use super::state::{Limits, StateTransfer};

/// Protocol features every daemon offers.
pub const DAEMON_PROTOCOL_FEATURES: u64 = pf::MQ
    | pf::REPLY_ACK
    | pf::CONFIG
    | pf::RESET_DEVICE
    | pf::STATUS
    | pf::CONFIGURE_MEM_SLOTS
    | pf::INFLIGHT_SHMFD
    | pf::LOG_SHMFD
    | pf::DEVICE_STATE
    // The back-end channel, for devices (FrontendLink) and in-band notifications.
    | pf::BACKEND_REQ
    | pf::BACKEND_SEND_FD
    | pf::SHARED_OBJECT
    | pf::INBAND_NOTIFICATIONS
    // Postcopy: guest memory registered with a userfaultfd (daemon::postcopy).
    | pf::PAGEFAULT;

/// Memory slots offered with CONFIGURE_MEM_SLOTS: rust-vmm's vhost-user-backend offers
/// 509 (KVM's 512 user memory slots less the ones a VMM keeps for itself), so a front-end
/// sized for it is served; ADD_MEM_REG beyond it is refused (ADVERSARIAL C6).
pub const MAX_MEM_SLOTS: u64 = 509;

/// How long a queue waits for the answer to one IOTLB miss before it fails, by default.
pub const DEFAULT_IOTLB_MISS_TIMEOUT: Duration = Duration::from_secs(5);

/// Status bit of a driver that has given up on the device; the virtio status byte is
/// otherwise the front-end's business.
const STATUS_RESET: u8 = 0;

/// The per-session control plane. Dropping it stops the queue workers and releases every
/// fd and mapping the session handed over (ADVERSARIAL J1).
pub struct DaemonHandler {
    device: Arc<dyn VirtioDevice>,
    slots: Vec<Arc<QueueSlot>>,
    workers: Vec<JoinHandle<()>>,
    mem: GuestMemory,
    acked_features: u64,
    acked_protocol: u64,
    status: u8,
    inflight: Option<Arc<InflightArea>>,
    /// The dirty log the front-end handed over (SET_LOG_BASE); the queues write to it only
    /// while `VHOST_F_LOG_ALL` is acked.
    log: Option<Arc<DirtyLog>>,
    /// The userfaultfd and its registrations, from POSTCOPY_ADVISE to POSTCOPY_END.
    postcopy: Option<Postcopy>,
    /// The session's socket and the daemon's stop latch, watched during postcopy.
    peer: Option<(OwnedFd, Arc<EventFd>)>,
    /// How long a batch may wait on a postcopy fault (`None`: as long as the front-end lives).
    postcopy_fault_timeout: Option<Duration>,
    hint: Option<&'static str>,
    /// The device-state transfer SET_DEVICE_STATE_FD started, until CHECK_DEVICE_STATE.
    state_transfer: Option<StateTransfer>,
    /// Where the device reaches this session's front-end: the back-end channel is attached
    /// to it when it arrives and detached when the session ends.
    link: FrontendLink,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM` (a device behind the front-end's vIOMMU), and how
    /// long a miss may go unanswered.
    iommu: Option<Duration>,
    /// The device's IOTLB while `VIRTIO_F_ACCESS_PLATFORM` is acked: the queues run on its
    /// view instead of the memory table.
    iotlb: Option<Iotlb>,
    /// The session's back-end channel, where queues ask for their misses.
    channel: Option<Arc<BackendChannel>>,
}

impl std::fmt::Debug for DaemonHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonHandler")
            .field("queues", &self.slots.len())
            .field("acked_features", &self.acked_features)
            .field("status", &self.status)
            .finish()
    }
}

fn device_error(e: DeviceError) -> Error {
    match e {
        DeviceError::Unsupported(what) => Error::NotSupported(what),
        DeviceError::Invalid(s) => Error::InvalidParam(s),
        DeviceError::Io(e) => Error::Handler(e.to_string()),
        other => Error::InvalidParam(other.to_string()),
    }
}

impl DaemonHandler {
    /// Starts one worker thread per queue of `device`; `poll` is how long a worker keeps
    /// polling its ring after the last request before it sleeps on the kick eventfd.
    pub fn new(device: Arc<dyn VirtioDevice>, poll: Duration) -> std::io::Result<Self> {
        Self::with_reporter(device, poll, None)
    }

    /// [`new`](Self::new), with queue failures reported as events of a session.
    pub(crate) fn with_reporter(
        device: Arc<dyn VirtioDevice>,
        poll: Duration,
        reporter: Option<QueueReporter>,
    ) -> std::io::Result<Self> {
        let mut handler = DaemonHandler {
            slots: Vec::new(),
            workers: Vec::new(),
            mem: GuestMemory::default(),
            acked_features: 0,
            acked_protocol: 0,
            status: 0,
            inflight: None,
            log: None,
            postcopy: None,
            peer: None,
            postcopy_fault_timeout: Some(DEFAULT_POSTCOPY_FAULT_TIMEOUT),
            hint: None,
            state_transfer: None,
            link: FrontendLink::new(),
            iommu: None,
            iotlb: None,
            channel: None,
            device,
        };
        for i in 0..handler.device.num_queues() {
            let slot = Arc::new(QueueSlot::new(i, reporter.clone())?);
            handler
                .workers
                .push(spawn_worker(slot.clone(), handler.device.clone(), poll)?);
            handler.slots.push(slot);
        }
        Ok(handler)
    }

    /// Gives the handler a handle on its session's socket and the daemon's stop latch,
    /// so that postcopy can wake workers asleep on a fault as soon as the front-end hangs
    /// up or the daemon is stopped (see `daemon::postcopy`), even while the session thread
    /// waits for such a worker.
    pub fn watch_peer(&mut self, sock: OwnedFd, stop: Arc<EventFd>) {
        self.peer = Some((sock, stop));
    }

    /// Bounds how long a queue's batch may wait on a postcopy fault before the session
    /// fails (see `daemon::postcopy`); `None` waits as long as the front-end lives.
    pub fn set_postcopy_fault_timeout(&mut self, timeout: Option<Duration>) {
        self.postcopy_fault_timeout = timeout;
    }

    /// Offers `VIRTIO_F_ACCESS_PLATFORM`: when the front-end acks it, ring and buffer
    /// addresses are I/O virtual ones translated through the IOTLB its `IOTLB_MSG`s fill,
    /// and a queue that misses asks on the back-end channel and waits up to `miss_timeout`
    /// for the update. `None` (the default) offers nothing of the kind.
    pub fn set_iommu(&mut self, miss_timeout: Option<Duration>) {
        self.iommu = miss_timeout;
    }

    /// Live counters of the IOTLB misses each queue asked the front-end for.
    pub fn iotlb_miss_counters(&self) -> Vec<Arc<AtomicU64>> {
        self.slots.iter().map(|s| s.iotlb_misses.clone()).collect()
    }

    /// Why postcopy failed the session, if it did (a fault not resolved within the bound).
    pub fn postcopy_failure(&self) -> Option<String> {
        self.postcopy.as_ref().and_then(Postcopy::failure)
    }

    /// Makes `link` this session's: the device's requests to the front-end go to the
    /// channel this session receives, until it ends.
    pub(crate) fn with_link(mut self, link: FrontendLink) -> Self {
        link.session_started();
        self.link = link;
        self
    }

    /// Live counters of the descriptor chains completed, per queue.
    pub fn completion_counters(&self) -> Vec<Arc<AtomicU64>> {
        self.slots.iter().map(|s| s.completed.clone()).collect()
    }

    /// The last data-path error of each queue (a corrupt ring, a failing device).
    pub fn queue_errors(&self) -> Vec<Option<String>> {
        self.slots
            .iter()
            .map(|s| lock(&s.state).last_error.clone())
            .collect()
    }

    /// What the front-end's user should change, if the last failed request tells
    /// (cleared by the call).
    pub fn take_hint(&mut self) -> Option<&'static str> {
        self.hint.take()
    }

    fn slot(&self, index: u32) -> Result<&Arc<QueueSlot>> {
        self.slots
            .get(index as usize)
            .ok_or_else(|| Error::InvalidParam(format!("queue {index} does not exist")))
    }

    fn offered_features(&self) -> u64 {
        let iommu = match self.iommu {
            Some(_) => transport::ACCESS_PLATFORM,
            None => 0,
        };
        self.device.features()
            | (transport::DEFAULT & self.device.transport_features())
            | iommu
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VHOST_F_LOG_ALL
    }

    /// Hands every queue what it reads guest memory through: the IOTLB's current view
    /// behind an IOMMU, the memory table otherwise. Each queue's lock waits for its batch
    /// in progress, which keeps the view it popped from to the end.
    fn publish_memory(&self) {
        let view = match &self.iotlb {
            Some(t) => t.view(),
            None => self.mem.clone(),
        };
        for s in &self.slots {
            lock(&s.state).mem = view.clone();
            if self.iotlb.is_some() {
                // A worker waiting on a miss looks again.
                s.wake();
            }
        }
    }

    /// Tells every queue whether it runs behind the IOMMU, and where to ask.
    fn publish_iommu(&self) {
        let iommu = match (self.iommu, &self.iotlb) {
            (Some(miss_timeout), Some(_)) => Some(QueueIommu {
                channel: self.channel.clone(),
                miss_timeout,
            }),
            _ => None,
        };
        for s in &self.slots {
            lock(&s.state).iommu = iommu.clone();
        }
    }

    /// Hands each queue the log it must write to: the adopted one while LOG_ALL is acked,
    /// none otherwise. Each queue's lock waits for its batch in progress, so once this
    /// returns no worker marks the previous log any more (the front-end may then read it
    /// for the last time and unmap it).
    fn publish_log(&self) {
        let active = match self.acked_features & VHOST_F_LOG_ALL {
            0 => None,
            _ => self.log.clone(),
        };
        for s in &self.slots {
            lock(&s.state).log = active.clone();
        }
    }

    fn set_memory(&mut self, mem: &GuestMemory) {
        self.mem = mem.clone();
        if let Some(t) = self.iotlb.as_mut() {
            // Translations into memory the table no longer holds are gone.
            t.rebind(mem);
        }
        self.publish_memory();
    }

    /// Stops every ring and forgets the negotiated state (RESET_DEVICE, status 0).
    fn reset_rings(&mut self) {
        for s in &self.slots {
            let mut st = lock(&s.state);
            st.stop();
            st.call = None;
            // The err fd stays: QEMU sends SET_VRING_ERR once per connection, not after
            // each reset (and rejects VRING_ERR in band, though it acks the feature).
            st.enabled = false;
            st.base = 0;
            st.addrs = None;
        }
        self.device.reset();
    }

    fn stop_workers(&mut self) {
        for s in &self.slots {
            s.request_stop();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for DaemonHandler {
    fn drop(&mut self) {
        // First wake any worker asleep on a page fault the front-end will now never
        // resolve, or joining it would wait forever.
        self.postcopy = None;
        // A transfer still running is cancelled before the device is reset.
        self.state_transfer = None;
        self.link.session_ended();
        self.stop_workers();
        for s in &self.slots {
            let mut st = lock(&s.state);
            st.stop();
            st.call = None;
            st.err = None;
            st.inband = None;
            st.mem = GuestMemory::default();
        }
        self.device.reset();
    }
}

impl BackendHandler for DaemonHandler {
    fn max_queues(&self) -> u32 {
        u32::from(self.device.num_queues())
    }

    fn max_queue_size(&self) -> u32 {
        u32::from(self.device.max_queue_size())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.offered_features();
        if extra != 0 {
            return Err(Error::InvalidParam(format!(
                "features {extra:#x} were never offered"
            )));
        }
        // With both VHOST_F_LOG_ALL and ACCESS_PLATFORM, the queues mark the guest-physical
        // pages behind the I/O virtual addresses they write (vring::log).
        let behind_iommu = features & transport::ACCESS_PLATFORM != 0;
        self.acked_features = features;
        self.publish_log();
        if behind_iommu != self.iotlb.is_some() {
            self.iotlb = behind_iommu.then(Iotlb::new);
            self.publish_iommu();
            self.publish_memory();
        }
        for s in &self.slots {
            let mut st = lock(&s.state);
            st.event_idx = features & transport::EVENT_IDX != 0;
            st.indirect = features & transport::INDIRECT_DESC != 0;
            st.packed = features & transport::RING_PACKED != 0;
        }
        self.device.set_acked_features(features);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<u64> {
        let mut offered = DAEMON_PROTOCOL_FEATURES | self.device.protocol_features();
        // A device without a config space does not offer CONFIG (QEMU warns otherwise).
        if self.device.config().is_empty() {
            offered &= !pf::CONFIG;
        }
        // SHMEM (GET_SHMEM_CONFIG) only for a device that has shared memory regions.
        if !self.device.shmem_regions().is_empty() {
            offered |= pf::SHMEM;
        }
        Ok(offered)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        self.device.set_acked_protocol_features(features);
        Ok(())
    }

    fn get_shmem_config(&mut self) -> Result<ShmemConfig> {
        ShmemConfig::from_regions(&self.device.shmem_regions())
            .map_err(|e| Error::Handler(format!("GET_SHMEM_CONFIG: {e}")))
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_rings();
        Ok(())
    }

    fn set_mem_table(&mut self, mem: &GuestMemory) -> Result<()> {
        // Registered before any worker can reach the new mappings.
        if let Some(p) = self.postcopy.as_mut() {
            p.track(mem, "SET_MEM_TABLE")?;
        }
        self.set_memory(mem);
        Ok(())
    }

    fn add_mem_region(&mut self, mem: &GuestMemory, _region: &RegionInfo) -> Result<()> {
        if let Some(p) = self.postcopy.as_mut() {
            p.track(mem, "ADD_MEM_REG")?;
        }
        self.set_memory(mem);
        Ok(())
    }

    fn remove_mem_region(&mut self, mem: &GuestMemory, _region: &RegionInfo) -> Result<()> {
        self.set_memory(mem);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn set_log_base(&mut self, log: &LogDesc, fd: OwnedFd) -> Result<()> {
        // The session applied the sealed-memory policy before handing the fd over.
        let adopted = DirtyLog::adopt(
            fd,
            log.mmap_size,
            log.mmap_offset,
            memory_end(&self.mem),
            false,
        )
        .map_err(|e| Error::InvalidParam(format!("SET_LOG_BASE: {e}")))?;
        self.log = Some(Arc::new(adopted));
        self.publish_log();
        Ok(())
    }

    fn set_log_fd(&mut self, fd: OwnedFd) -> Result<()> {
        // The eventfd to signal after writing the log without LOG_SHMFD: this daemon only
        // logs into the shared log, which needs no signal, so the fd is closed.
        drop(fd);
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        lock(&self.slot(index)?.state).size = num;
        Ok(())
    }

    fn set_vring_addr(&mut self, addrs: &VringAddrs) -> Result<()> {
        lock(&self.slot(addrs.index)?.state).addrs = Some(*addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        lock(&self.slot(index)?.state).base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        let slot = self.slot(index)?;
        Ok(lock(&slot.state).stop())
    }

    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> Result<()> {
        let slot = self.slot(index)?.clone();
        {
            let mut st = lock(&slot.state);
            st.kick = fd.map(|fd| Arc::new(EventFd::from_fd(fd)));
            st.inflight = match &self.inflight {
                Some(area) => Some(area.queue(index as u16, st.size as u16)?),
                None => None,
            };
            if let Err(e) = st.start() {
                // Addresses that translate nowhere because no memory was shared at all.
                if st.addrs.is_some() && self.mem.regions().is_empty() {
                    self.hint = Some(UNSHARED_MEMORY_HINT);
                }
                return Err(device_error(e));
            }
            // Without PROTOCOL_FEATURES a ring is enabled as soon as it starts.
            if self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
                st.enabled = true;
            }
        }
        // Buffers made available before the kick fd arrived are processed now.
        slot.wake();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> Result<()> {
        let slot = self.slot(index)?;
        lock(&slot.state).call = fd.map(EventFd::from_fd).map(Notifier::Event);
        // Completions made while no call fd was set are signalled on the new one.
        slot.wake();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u32, fd: Option<OwnedFd>) -> Result<()> {
        lock(&self.slot(index)?.state).err = fd.map(EventFd::from_fd);
        Ok(())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let slot = self.slot(index)?;
        lock(&slot.state).enabled = enable;
        if enable {
            slot.wake();
        }
        Ok(())
    }

    fn vring_kick(&mut self, index: u32) -> Result<()> {
        self.slot(index)?.wake();
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: u32) -> Result<Vec<u8>> {
        let config = self.device.config();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(config.len());
        let end = (offset as usize + size as usize).min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        Ok(out)
    }

    fn set_config(&mut self, offset: u32, data: &[u8], _flags: u32) -> Result<()> {
        self.device.set_config(offset, data).map_err(device_error)
    }

    fn set_backend_channel(&mut self, channel: Arc<BackendChannel>) -> Result<()> {
        // With INBAND_NOTIFICATIONS, a ring without a call fd is signalled on the channel.
        let inband = (self.acked_protocol & pf::INBAND_NOTIFICATIONS != 0).then(|| channel.clone());
        for s in &self.slots {
            lock(&s.state).inband = inband.clone();
        }
        self.channel = Some(channel.clone());
        self.publish_iommu();
        self.link.attach(channel);
        Ok(())
    }

    fn iotlb_msg(&mut self, msg: &IotlbPayload) -> Result<()> {
        let Some(tlb) = self.iotlb.as_mut() else {
            return Err(Error::InvalidParam(
                "IOTLB_MSG: VIRTIO_F_ACCESS_PLATFORM was not negotiated".into(),
            ));
        };
        let result = match msg.kind {
            iotlb::UPDATE => tlb
                .update(&self.mem, msg.iova, msg.size, msg.uaddr, msg.perm)
                .map(|()| "update"),
            iotlb::INVALIDATE => tlb.invalidate(msg.iova, msg.size).map(|_| "invalidate"),
            other => {
                // The message layer lets only these two through from a front-end.
                return Err(Error::InvalidParam(format!(
                    "IOTLB_MSG: type {other} is not an update or an invalidation"
                )));
            }
        };
        result.map_err(|e| Error::InvalidParam(format!("IOTLB_MSG: {e}")))?;
        self.publish_memory();
        Ok(())
    }

    fn get_inflight_fd(&mut self, desc: &InflightDesc) -> Result<(InflightDesc, OwnedFd)> {
        let (area, reply, fd) = InflightArea::create(desc)?;
        self.inflight = Some(Arc::new(area));
        Ok((reply, fd))
    }

    fn set_inflight_fd(&mut self, desc: &InflightDesc, fd: OwnedFd) -> Result<()> {
        // The session applied the sealed-memory policy before handing the fd over.
        self.inflight = Some(Arc::new(InflightArea::adopt(desc, fd, false)?));
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset_rings();
        self.status = 0;
        if let Some(t) = self.iotlb.as_mut() {
            t.clear();
            self.publish_memory();
        }
        Ok(())
    }

    fn set_status(&mut self, status: u8) -> Result<()> {
        if status == STATUS_RESET && self.status != STATUS_RESET {
            self.reset_rings();
        }
        self.status = status;
        Ok(())
    }

    fn get_status(&mut self) -> Result<u8> {
        Ok(self.status)
    }

    fn postcopy_advise(&mut self) -> Result<OwnedFd> {
        if self.postcopy.is_some() {
            return Err(Error::InvalidParam(
                "POSTCOPY_ADVISE: postcopy was already advised (no POSTCOPY_END since)".into(),
            ));
        }
        let peer = match &self.peer {
            Some((sock, stop)) => Some((
                sock.try_clone().map_err(|e| {
                    Error::Handler(format!("POSTCOPY_ADVISE: dup the session socket: {e}"))
                })?,
                stop.clone(),
            )),
            None => None,
        };
        let bound = FaultBound {
            watches: self.slots.iter().map(|s| s.watch.clone()).collect(),
            timeout: self.postcopy_fault_timeout,
        };
        let (state, theirs) = Postcopy::advise(peer, bound)?;
        self.postcopy = Some(state);
        Ok(theirs)
    }

    fn postcopy_listen(&mut self) -> Result<()> {
        let mem = self.mem.clone();
        self.postcopy
            .as_mut()
            .ok_or_else(|| Error::InvalidParam("POSTCOPY_LISTEN before POSTCOPY_ADVISE".into()))?
            .listen(&mem)
    }

    fn postcopy_end(&mut self) -> Result<()> {
        let state = self
            .postcopy
            .take()
            .ok_or_else(|| Error::InvalidParam("POSTCOPY_END without POSTCOPY_ADVISE".into()))?;
        state
            .end()
            .map_err(|e| Error::Handler(format!("POSTCOPY_END: unregister guest memory: {e}")))
    }

    fn set_device_state_fd(
        &mut self,
        transfer: &DeviceStateTransfer,
        fd: OwnedFd,
    ) -> Result<Option<OwnedFd>> {
        // The only phase is "stopped": a running ring could change the state mid-save.
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| lock(&s.state).ring.is_some())
        {
            return Err(Error::InvalidParam(format!(
                "SET_DEVICE_STATE_FD: ring {i} is running; stop every ring (GET_VRING_BASE) first"
            )));
        }
        // A transfer never checked is cancelled by the new one.
        self.state_transfer = None;
        let t = StateTransfer::start(self.device.clone(), transfer, fd, Limits::default())?;
        self.state_transfer = Some(t);
        Ok(None)
    }

    fn check_device_state(&mut self) -> Result<()> {
        self.state_transfer
            .take()
            .ok_or_else(|| {
                Error::InvalidParam(
                    "CHECK_DEVICE_STATE: no device state transfer to check \
                     (SET_DEVICE_STATE_FD starts one)"
                        .into(),
                )
            })?
            .finish()
    }
}
