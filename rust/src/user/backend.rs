//! The back-end: the side that consumes the virtqueues a front-end shares (the seed's
//! `SlaveReqHandler` with its `VhostUserSlaveReqHandler` trait).
//!
//! A [`BackendSession`] owns one connection. It validates every message before a handler
//! sees it: header, size and fds (in the message layer), then the session's own rules —
//! feature gating, ring indexes and sizes, ring addresses against the memory table — and
//! it maps the memory regions it is given, so a handler only ever receives a checked
//! request and a [`GuestMemory`]. It then sends the reply or the REPLY_ACK.
//!
//! The three steps (`recv`, `handle`, `send_reply`) are separate so that a binding can
//! release its interpreter lock around the two that block.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use super::channel::BackendChannel;
use super::codes::{protocol_features as pf, FrontendReq, VHOST_USER_F_PROTOCOL_FEATURES};
use super::connection::Connection;
use super::header::Header;
use super::message::FrontendRequest;
use super::payload::{
    ConfigPayload, DeviceStateTransfer, InflightDesc, IotlbPayload, LogDesc, MemRegion,
    ShmemConfig, SingleMemRegion, U64Payload, VringState,
};
use super::{Error, Result};
use crate::backend::VringAddrs;
use crate::memory::{GuestMemory, GuestRegion, RegionInfo};

/// Largest queue the protocol can describe (split rings need a power of two).
pub const MAX_QUEUE_SIZE: u32 = 32768;
/// virtio feature bit of packed rings, which allow sizes that are not powers of two.
const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
/// virtio feature bit of a device behind an IOMMU: ring addresses are I/O virtual ones.
const VIRTIO_F_ACCESS_PLATFORM: u64 = crate::vring::features::ACCESS_PLATFORM;

/// One method per front-end request. Every default refuses with `NotSupported`, which the
/// session turns into a NACK (REPLY_ACK) or, for requests that need a reply, a closed
/// connection. Requests arrive already validated.
#[allow(unused_variables)]
pub trait BackendHandler {
    /// Queues the device has; ring indexes at or above it are rejected before dispatch.
    fn max_queues(&self) -> u32;
    /// Largest ring size the device accepts.
    fn max_queue_size(&self) -> u32 {
        MAX_QUEUE_SIZE
    }

    /// GET_FEATURES: the virtio and vhost-user features offered (required: there is no default).
    fn get_features(&mut self) -> Result<u64>;
    /// SET_FEATURES: the subset the front-end acked (already checked to be offered).
    fn set_features(&mut self, features: u64) -> Result<()> {
        Ok(())
    }
    /// GET_PROTOCOL_FEATURES: the protocol features offered, if PROTOCOL_FEATURES is.
    fn get_protocol_features(&mut self) -> Result<u64> {
        Err(Error::NotSupported("GET_PROTOCOL_FEATURES"))
    }
    /// SET_PROTOCOL_FEATURES: the subset acked.
    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        Ok(())
    }
    /// SET_OWNER: a new session begins.
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }
    /// RESET_OWNER: deprecated; accepted and ignored by default.
    fn reset_owner(&mut self) -> Result<()> {
        Ok(())
    }
    /// The whole memory table was replaced; `mem` is the new mapped snapshot.
    fn set_mem_table(&mut self, mem: &GuestMemory) -> Result<()> {
        Ok(())
    }
    /// ADD_MEM_REG: `mem` is the new snapshot, `region` the one added.
    fn add_mem_region(&mut self, mem: &GuestMemory, region: &RegionInfo) -> Result<()> {
        Ok(())
    }
    /// REM_MEM_REG: `mem` is the new snapshot, `region` the one removed.
    fn remove_mem_region(&mut self, mem: &GuestMemory, region: &RegionInfo) -> Result<()> {
        Ok(())
    }
    /// GET_MAX_MEM_SLOTS: how many regions the device can map (CONFIGURE_MEM_SLOTS).
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(Error::NotSupported("GET_MAX_MEM_SLOTS"))
    }
    /// SET_LOG_BASE: the dirty log to mark from now on (`log` says where in `fd`).
    fn set_log_base(&mut self, log: &LogDesc, fd: OwnedFd) -> Result<()> {
        Err(Error::NotSupported("SET_LOG_BASE"))
    }
    /// SET_LOG_FD: the dirty log's eventfd.
    fn set_log_fd(&mut self, fd: OwnedFd) -> Result<()> {
        Err(Error::NotSupported("SET_LOG_FD"))
    }
    /// SET_VRING_NUM: queue `index`'s size (already checked against `max_queue_size`).
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        Ok(())
    }
    /// SET_VRING_ADDR: the ring's addresses, in the front-end's address space.
    fn set_vring_addr(&mut self, addrs: &VringAddrs) -> Result<()> {
        Ok(())
    }
    /// SET_VRING_BASE: where queue `index` resumes.
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        Ok(())
    }
    /// GET_VRING_BASE: stops queue `index` and returns where it stopped (required: a device
    /// must be able to say so for reconnect and migration).
    fn get_vring_base(&mut self, index: u32) -> Result<u32>;
    /// SET_VRING_KICK: the eventfd the driver signals; `None` for polling mode (NOFD).
    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> Result<()> {
        Ok(())
    }
    /// SET_VRING_CALL: the eventfd to signal on used buffers; `None` for in-band calls.
    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> Result<()> {
        Ok(())
    }
    /// SET_VRING_ERR: the eventfd to signal on a broken ring.
    fn set_vring_err(&mut self, index: u32, fd: Option<OwnedFd>) -> Result<()> {
        Ok(())
    }
    /// SET_VRING_ENABLE: start or stop processing queue `index`.
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        Ok(())
    }
    /// SET_VRING_ENDIAN: the byte order of a legacy ring.
    fn set_vring_endian(&mut self, index: u32, big_endian: bool) -> Result<()> {
        Err(Error::NotSupported("SET_VRING_ENDIAN"))
    }
    /// VRING_KICK: the in-band kick of queue `index` (INBAND_NOTIFICATIONS).
    fn vring_kick(&mut self, index: u32) -> Result<()> {
        Err(Error::NotSupported("VRING_KICK"))
    }
    /// GET_QUEUE_NUM: the queues the device has (`max_queues` by default).
    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.max_queues()))
    }
    /// GET_CONFIG: `size` bytes of config space at `offset` (CONFIG protocol feature).
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> Result<Vec<u8>> {
        Err(Error::NotSupported("GET_CONFIG"))
    }
    /// SET_CONFIG: writes `data` at `offset` of config space.
    fn set_config(&mut self, offset: u32, data: &[u8], flags: u32) -> Result<()> {
        Err(Error::NotSupported("SET_CONFIG"))
    }
    /// SET_BACKEND_REQ_FD: the channel for requests to the front-end (BACKEND_REQ).
    fn set_backend_channel(&mut self, channel: Arc<BackendChannel>) -> Result<()> {
        Ok(())
    }
    /// GET_INFLIGHT_FD: an inflight area of the size `desc` asks, and its fd.
    fn get_inflight_fd(&mut self, desc: &InflightDesc) -> Result<(InflightDesc, OwnedFd)> {
        Err(Error::NotSupported("GET_INFLIGHT_FD"))
    }
    /// SET_INFLIGHT_FD: the inflight area of the previous connection, to resubmit from.
    fn set_inflight_fd(&mut self, desc: &InflightDesc, fd: OwnedFd) -> Result<()> {
        Err(Error::NotSupported("SET_INFLIGHT_FD"))
    }
    /// SEND_RARP: announce `mac` after a migration (net devices).
    fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        Err(Error::NotSupported("SEND_RARP"))
    }
    /// NET_SET_MTU: the MTU the guest driver set (net devices).
    fn net_set_mtu(&mut self, mtu: u64) -> Result<()> {
        Err(Error::NotSupported("NET_SET_MTU"))
    }
    /// IOTLB_MSG: a translation update or invalidation (IOMMU platform feature).
    fn iotlb_msg(&mut self, msg: &IotlbPayload) -> Result<()> {
        Err(Error::NotSupported("IOTLB_MSG"))
    }
    /// RESET_DEVICE: reset the device, keeping the session.
    fn reset_device(&mut self) -> Result<()> {
        Ok(())
    }
    /// SET_STATUS: the virtio device status byte.
    fn set_status(&mut self, status: u8) -> Result<()> {
        Ok(())
    }
    /// GET_STATUS: the device status byte.
    fn get_status(&mut self) -> Result<u8> {
        Err(Error::NotSupported("GET_STATUS"))
    }
    /// GPU_SET_SOCKET: the socket of the GPU protocol (vhost-user-gpu).
    fn gpu_set_socket(&mut self, fd: OwnedFd) -> Result<()> {
        Err(Error::NotSupported("GPU_SET_SOCKET"))
    }
    /// GET_SHARED_OBJECT: the dma-buf exported under `uuid`.
    fn get_shared_object(&mut self, uuid: [u8; 16]) -> Result<OwnedFd> {
        Err(Error::NotSupported("GET_SHARED_OBJECT"))
    }
    /// The sizes of the device's VIRTIO Shared Memory Regions, indexed by shmid (0 for an
    /// id the device does not use); needs `SHMEM` negotiated.
    fn get_shmem_config(&mut self) -> Result<ShmemConfig> {
        Err(Error::NotSupported("GET_SHMEM_CONFIG"))
    }
    /// Returns our own pipe end when we prefer it to the one we were given.
    fn set_device_state_fd(
        &mut self,
        transfer: &DeviceStateTransfer,
        fd: OwnedFd,
    ) -> Result<Option<OwnedFd>> {
        Err(Error::NotSupported("SET_DEVICE_STATE_FD"))
    }
    /// CHECK_DEVICE_STATE: whether the last state transfer succeeded.
    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::NotSupported("CHECK_DEVICE_STATE"))
    }
    /// POSTCOPY_ADVISE: a userfaultfd over the device's mappings, for the front-end to resolve
    /// faults through.
    fn postcopy_advise(&mut self) -> Result<OwnedFd> {
        Err(Error::NotSupported("POSTCOPY_ADVISE"))
    }
    /// POSTCOPY_LISTEN: from here on memory may fault until POSTCOPY_END.
    fn postcopy_listen(&mut self) -> Result<()> {
        Err(Error::NotSupported("POSTCOPY_LISTEN"))
    }
    /// POSTCOPY_END: postcopy is over.
    fn postcopy_end(&mut self) -> Result<()> {
        Err(Error::NotSupported("POSTCOPY_END"))
    }
    /// CREATE_CRYPTO_SESSION: opaque parameters in, opaque session description out.
    fn create_crypto_session(&mut self, params: &[u8]) -> Result<Vec<u8>> {
        Err(Error::NotSupported("CREATE_CRYPTO_SESSION"))
    }
    /// CLOSE_CRYPTO_SESSION: ends a crypto session.
    fn close_crypto_session(&mut self, session_id: u64) -> Result<()> {
        Err(Error::NotSupported("CLOSE_CRYPTO_SESSION"))
    }
}

/// What the session sends back for one request.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// The reply header; `None` sends nothing.
    pub header: Option<Header>,
    /// The reply's body.
    pub body: Vec<u8>,
    /// The fd to send with it (GET_INFLIGHT_FD, POSTCOPY_ADVISE, ...).
    pub fd: Option<OwnedFd>,
}

/// The outcome of one request: the reply to send (possibly none) and the error, if the
/// handler or a session rule failed. `error` with a reply is a NACK already built.
#[derive(Debug, Default)]
pub struct Handled {
    /// What to send (possibly nothing).
    pub reply: Outgoing,
    /// Why the request failed, for the caller to log or end the session on.
    pub error: Option<Error>,
}

/// A request that passed every check, ready for a handler.
#[derive(Debug)]
pub struct Incoming {
    /// The header, to build the reply from.
    pub header: Header,
    /// The decoded request.
    pub request: FrontendRequest,
}

#[derive(Debug, Default)]
struct SessionState {
    owned: bool,
    offered_features: Option<u64>,
    acked_features: u64,
    acked_protocol: u64,
    queue_sizes: Vec<u32>,
    /// Between POSTCOPY_LISTEN and POSTCOPY_END: SET_MEM_TABLE is answered with our
    /// mapping addresses, and the front-end then acks that answer.
    postcopy_listening: bool,
    /// The front-end's ack of a postcopy SET_MEM_TABLE answer is due next.
    postcopy_ack_due: bool,
    /// A postcopy ADD_MEM_REG/REM_MEM_REG was answered: QEMU acks a whole batch of them
    /// once, after the last, with an 8-byte message of the same code, which may come next.
    postcopy_regions_ack_may_follow: bool,
    /// Refuse memory whose fd is not sealed against shrinking (J8 policy).
    sealed_memory_only: bool,
}

/// The back-end's side of one vhost-user connection: reads, validates and dispatches
/// requests to a [`BackendHandler`], keeping the session's state (features, memory table,
/// queue sizes) so each request is checked against what was negotiated before a handler
/// sees it.
#[derive(Debug)]
pub struct BackendSession {
    conn: Connection,
    state: SessionState,
    memory: GuestMemory,
}

impl BackendSession {
    /// A session over `sock`, already connected to the front-end.
    pub fn new(sock: UnixStream) -> Self {
        BackendSession {
            conn: Connection::new(sock),
            state: SessionState::default(),
            memory: GuestMemory::default(),
        }
    }

    /// Client mode: the front-end listens at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        Ok(Self::new(UnixStream::connect(path)?))
    }

    /// The mapped memory table, for the handler's rings.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Refuses (NACK or close) every fd the back-end maps (memory tables and regions, the
    /// dirty log, the inflight area) that is not sealed against shrinking: the policy that
    /// keeps a front-end from truncating shared memory under us (a SIGBUS, ADVERSARIAL J8).
    /// Off by default, since file-backed guest RAM cannot be sealed. Regions apply it in
    /// [`GuestRegion::map`]; the log and the inflight area, which reach the handler as fds,
    /// are checked here before the handler maps them.
    pub fn require_sealed_memory(&mut self, on: bool) {
        self.state.sealed_memory_only = on;
    }

    /// The features the front-end acked.
    pub fn acked_features(&self) -> u64 {
        self.state.acked_features
    }

    /// The protocol features the front-end acked.
    pub fn acked_protocol_features(&self) -> u64 {
        self.state.acked_protocol
    }

    /// The socket, for polling it beside other fds.
    pub fn socket(&self) -> &UnixStream {
        self.conn.socket()
    }

    /// True after an error that left the stream out of step.
    pub fn is_broken(&self) -> bool {
        self.conn.is_broken()
    }

    /// Blocks for the next request and decodes it. Framing, size and fd errors poison the
    /// connection; `Error::Disconnected` means the front-end went away cleanly.
    pub fn recv(&mut self) -> Result<Incoming> {
        if self.state.postcopy_ack_due {
            self.recv_postcopy_ack()?;
        }
        let mut msg = self.conn.recv(Header::check_request)?;
        if std::mem::take(&mut self.state.postcopy_regions_ack_may_follow)
            && self.is_postcopy_regions_ack(&msg)?
        {
            msg = self.conn.recv(Header::check_request)?;
        }
        let header = msg.header;
        let decoded = match FrontendReq::from_code(header.code) {
            None => Err(Error::UnknownRequest(header.code)),
            Some(code) => FrontendRequest::decode(code, &msg.body, msg.fds),
        };
        let request = decoded.inspect_err(|_| {
            // A well-framed request that asked for an ack gets its NACK before the close
            // (ADVERSARIAL default expectation); requests with replies of their own get none.
            let inherent = FrontendReq::from_code(header.code).is_some_and(FrontendReq::has_reply);
            if header.needs_reply() && !inherent && self.state.acked_protocol & pf::REPLY_ACK != 0 {
                let nack = ack_reply(&header, 1);
                let _ = self.send_reply(nack);
            }
            self.conn.poison();
        })?;
        Ok(Incoming {
            header: msg.header,
            request,
        })
    }

    /// The front-end's ack of our postcopy SET_MEM_TABLE answer: a SET_MEM_TABLE message
    /// holding a u64 0 (QEMU's `vhost_user_set_mem_table_postcopy`).
    fn recv_postcopy_ack(&mut self) -> Result<()> {
        let msg = self.conn.recv(Header::check_request)?;
        self.state.postcopy_ack_due = false;
        let ok = msg.header.code == FrontendReq::SetMemTable.code()
            && msg.fds.is_empty()
            && U64Payload::from_bytes(&msg.body).is_ok_and(|v| v.0 == 0);
        if !ok {
            self.conn.poison();
            return Err(Error::InvalidParam(format!(
                "expected the front-end's postcopy SET_MEM_TABLE ack, got request {} of {} bytes",
                msg.header.code,
                msg.body.len()
            )));
        }
        Ok(())
    }

    /// Whether `msg` is the front-end's ack of postcopy ADD_MEM_REG answers (QEMU's
    /// `vhost_user_add_remove_regions`): the region messages' code with a u64 body, which
    /// must be 0. A region message proper is 40 bytes, so the two cannot be confused.
    fn is_postcopy_regions_ack(&mut self, msg: &super::connection::Message) -> Result<bool> {
        let code = msg.header.code;
        let region_code =
            code == FrontendReq::AddMemReg.code() || code == FrontendReq::RemMemReg.code();
        if !region_code || msg.body.len() != U64Payload::SIZE || !msg.fds.is_empty() {
            return Ok(false);
        }
        match U64Payload::from_bytes(&msg.body) {
            Ok(U64Payload(0)) => Ok(true),
            _ => {
                self.conn.poison();
                Err(Error::InvalidParam(
                    "the front-end's postcopy memory-region ack is not 0".into(),
                ))
            }
        }
    }

    /// Checks the session rules, runs the handler, and builds the reply. A handler error
    /// on a request that asked for an ack becomes exactly one NACK and leaves the
    /// connection usable (A8); any other error poisons it, since a request that expects a
    /// reply of its own has no way to say "failed" and an unacked failure would go unseen.
    pub fn handle(&mut self, incoming: Incoming, handler: &mut dyn BackendHandler) -> Handled {
        let Incoming { header, request } = incoming;
        let code = request.kind();
        // In postcopy, SET_MEM_TABLE has a reply of its own (our mapping addresses).
        // So does ADD_MEM_REG (the region, with our address for it).
        let inherent = code.has_reply()
            || (matches!(code, FrontendReq::SetMemTable | FrontendReq::AddMemReg)
                && self.state.postcopy_listening);
        // QEMU asks for an ack on POSTCOPY_LISTEN even without REPLY_ACK, and waits.
        let ack = !inherent
            && header.needs_reply()
            && (self.state.acked_protocol & pf::REPLY_ACK != 0
                || code == FrontendReq::PostcopyListen);
        match self.dispatch(request, handler) {
            Ok(out) if inherent => Handled {
                reply: Outgoing {
                    header: Some(header.reply_to(out.body.len() as u32)),
                    ..out
                },
                error: None,
            },
            Ok(_) if ack => Handled {
                reply: ack_reply(&header, 0),
                error: None,
            },
            Ok(_) => Handled::default(),
            Err(e) if ack && !matches!(e, Error::Io(_) | Error::Closed) => Handled {
                reply: ack_reply(&header, 1),
                error: Some(e),
            },
            // Requests whose reply is a status can say "failed" themselves (the spec's
            // "non-zero on failure"): answer that instead of closing the connection.
            Err(e)
                if !matches!(e, Error::Io(_) | Error::Closed) && status_reply(code).is_some() =>
            {
                Handled {
                    reply: ack_reply(&header, status_reply(code).unwrap_or(1)),
                    error: Some(e),
                }
            }
            Err(e) => {
                self.conn.poison();
                Handled {
                    reply: Outgoing::default(),
                    error: Some(e),
                }
            }
        }
    }

    /// Sends what the handler answered (nothing when it has no header).
    pub fn send_reply(&mut self, out: Outgoing) -> Result<()> {
        let Some(header) = out.header else {
            return Ok(());
        };
        let fds: Vec<_> = out.fd.iter().map(|fd| fd.as_fd()).collect();
        self.conn.send(&header, &out.body, &fds)
    }

    /// recv + handle + send_reply, for native handlers. Handler errors that were NACKed
    /// are returned too; the connection is still usable unless `is_broken()`.
    pub fn handle_one(&mut self, handler: &mut dyn BackendHandler) -> Result<()> {
        let incoming = self.recv()?;
        let handled = self.handle(incoming, handler);
        self.send_reply(handled.reply)?;
        handled.error.map_or(Ok(()), Err)
    }

    /// Serves until the front-end disconnects (Ok) or breaks the protocol (Err).
    pub fn run(&mut self, handler: &mut dyn BackendHandler) -> Result<()> {
        loop {
            match self.handle_one(handler) {
                Ok(()) => {}
                Err(Error::Disconnected) => return Ok(()),
                Err(e) if self.conn.is_broken() => return Err(e),
                Err(_) => {}
            }
        }
    }

    // ---- rules and dispatch -----------------------------------------------------------

    fn require_protocol(&self, code: FrontendReq) -> Result<()> {
        if let Some(bit) = code.required_protocol_feature() {
            if self.state.acked_protocol & bit == 0 {
                return Err(Error::InactiveFeature {
                    request: code.name(),
                    feature: pf::name(bit).unwrap_or("a protocol feature"),
                });
            }
        }
        Ok(())
    }

    fn check_index(&self, index: u32, handler: &dyn BackendHandler) -> Result<()> {
        if index >= handler.max_queues() {
            return Err(Error::InvalidParam(format!(
                "vring index {index} out of range (device has {} queues)",
                handler.max_queues()
            )));
        }
        Ok(())
    }

    fn check_ring_size(&self, num: u32, handler: &dyn BackendHandler) -> Result<()> {
        let max = handler.max_queue_size().min(MAX_QUEUE_SIZE);
        let packed = self.state.acked_features & VIRTIO_F_RING_PACKED != 0;
        if num == 0 || num > max || (!packed && !num.is_power_of_two()) {
            return Err(Error::InvalidParam(format!(
                "vring size {num} invalid (1..={max}{})",
                if packed { "" } else { ", power of two" }
            )));
        }
        Ok(())
    }

    /// A ring's three areas must each lie inside one mapped region (D4), when the memory
    /// table and the ring size are already known. Behind an IOMMU
    /// (`VIRTIO_F_ACCESS_PLATFORM` acked) they are I/O virtual addresses, which only the
    /// handler's IOTLB can check, as they get mapped.
    fn check_ring_addrs(&self, addrs: &VringAddrs) -> Result<()> {
        if self.state.acked_features & VIRTIO_F_ACCESS_PLATFORM != 0 {
            return Ok(());
        }
        let num = self
            .state
            .queue_sizes
            .get(addrs.index as usize)
            .copied()
            .unwrap_or(0);
        if self.memory.is_empty() || num == 0 {
            return Ok(());
        }
        let n = u64::from(num);
        let packed = self.state.acked_features & VIRTIO_F_RING_PACKED != 0;
        let (avail_len, used_len) = if packed {
            (4, 4)
        } else {
            (6 + 2 * n, 6 + 8 * n)
        };
        for (what, addr, len) in [
            ("descriptor table", addrs.desc, 16 * n),
            ("available ring", addrs.avail, avail_len),
            ("used ring", addrs.used, used_len),
        ] {
            self.memory.translate_user(addr, len).map_err(|e| {
                Error::InvalidParam(format!("{what} of ring {} at {addr:#x}: {e}", addrs.index))
            })?;
        }
        Ok(())
    }

    fn map_table(
        regions: &[MemRegion],
        fds: Vec<OwnedFd>,
        require_sealed: bool,
    ) -> Result<GuestMemory> {
        let mapped = regions
            .iter()
            .zip(fds)
            .map(|(r, fd)| GuestRegion::map(region_info(r), fd, require_sealed).map(Arc::new))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(GuestMemory::new(mapped)?)
    }

    fn dispatch(
        &mut self,
        request: FrontendRequest,
        h: &mut dyn BackendHandler,
    ) -> Result<Outgoing> {
        use FrontendRequest as R;
        let code = request.kind();
        self.require_protocol(code)?;
        let none = Outgoing::default();
        let u64_reply = |v: u64| Outgoing {
            body: U64Payload(v).to_bytes(),
            ..Outgoing::default()
        };
        Ok(match request {
            R::GetFeatures => {
                let f = h.get_features()?;
                self.state.offered_features = Some(f);
                u64_reply(f)
            }
            R::SetFeatures(features) => {
                let offered = match self.state.offered_features {
                    Some(f) => f,
                    None => h.get_features()?,
                };
                if features & !offered != 0 {
                    return Err(Error::InvalidParam(format!(
                        "features {:#x} were never offered",
                        features & !offered
                    )));
                }
                h.set_features(features)?;
                self.state.acked_features = features;
                none
            }
            R::GetProtocolFeatures => {
                let offered = match self.state.offered_features {
                    Some(f) => f,
                    None => h.get_features()?,
                };
                if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
                    return Err(Error::InactiveFeature {
                        request: code.name(),
                        feature: "VHOST_USER_F_PROTOCOL_FEATURES",
                    });
                }
                u64_reply(h.get_protocol_features()?)
            }
            R::SetProtocolFeatures(features) => {
                let offered = h.get_protocol_features()?;
                if features & !offered != 0 || features & !pf::ALL != 0 {
                    return Err(Error::InvalidParam(format!(
                        "protocol features {:#x} were never offered",
                        features & !offered
                    )));
                }
                h.set_protocol_features(features)?;
                self.state.acked_protocol = features;
                none
            }
            R::SetOwner => {
                if self.state.owned {
                    return Err(Error::InvalidParam(
                        "SET_OWNER: session already has an owner".into(),
                    ));
                }
                h.set_owner()?;
                self.state.owned = true;
                none
            }
            R::ResetOwner => {
                h.reset_owner()?;
                self.state.owned = false;
                none
            }
            R::SetMemTable { table, fds } => {
                let mem = Self::map_table(&table.regions, fds, self.state.sealed_memory_only)?;
                h.set_mem_table(&mem)?;
                self.memory = mem;
                if !self.state.postcopy_listening {
                    return Ok(none);
                }
                // Postcopy: tell the front-end where each region is mapped here (same
                // order as its table), so it can resolve our faults; its ack follows.
                let mut reply = table;
                for r in &mut reply.regions {
                    r.userspace_addr = self
                        .memory
                        .regions()
                        .iter()
                        .find(|m| m.info().guest_phys_addr == r.guest_phys_addr)
                        .map_or(0, |m| m.as_ptr() as u64);
                }
                self.state.postcopy_ack_due = true;
                Outgoing {
                    body: reply.to_bytes(),
                    ..Outgoing::default()
                }
            }
            R::AddMemReg { region, fd } => {
                let max = h.get_max_mem_slots()?;
                if self.memory.regions().len() as u64 >= max {
                    return Err(Error::InvalidParam(format!(
                        "ADD_MEM_REG: all {max} memory slots are in use"
                    )));
                }
                let info = region_info(&region);
                let mapped = Arc::new(GuestRegion::map(info, fd, self.state.sealed_memory_only)?);
                let mem = self.memory.with_region(mapped.clone())?;
                h.add_mem_region(&mem, &info)?;
                self.memory = mem;
                if !self.state.postcopy_listening {
                    return Ok(none);
                }
                // Postcopy: the region back, with where we mapped it; an ack may follow.
                self.state.postcopy_regions_ack_may_follow = true;
                let mut reply = region;
                reply.userspace_addr = mapped.as_ptr() as u64;
                Outgoing {
                    body: SingleMemRegion { region: reply }.to_bytes(),
                    ..Outgoing::default()
                }
            }
            R::RemMemReg(region) => {
                let info = region_info(&region);
                let (mem, _old) = self
                    .memory
                    .without_region(info.guest_phys_addr, info.memory_size)?;
                h.remove_mem_region(&mem, &info)?;
                self.memory = mem;
                // QEMU acks a postcopy batch of region changes even when it only removed.
                self.state.postcopy_regions_ack_may_follow = self.state.postcopy_listening;
                none
            }
            R::GetMaxMemSlots => u64_reply(h.get_max_mem_slots()?),
            R::SetLogBase { log, fd } => {
                // The log is shared memory the back-end maps like guest memory: the same
                // sealing policy (a shrunk log would SIGBUS the marking thread).
                if self.state.sealed_memory_only {
                    GuestRegion::check_shrink_sealed(fd.as_fd())?;
                }
                h.set_log_base(&log, fd)?;
                u64_reply(0)
            }
            R::SetLogFd(fd) => {
                h.set_log_fd(fd)?;
                none
            }
            R::SetVringNum(VringState { index, num }) => {
                self.check_index(index, h)?;
                self.check_ring_size(num, h)?;
                h.set_vring_num(index, num)?;
                let slot = index as usize;
                if self.state.queue_sizes.len() <= slot {
                    self.state.queue_sizes.resize(slot + 1, 0);
                }
                self.state.queue_sizes[slot] = num;
                none
            }
            R::SetVringAddr(addrs) => {
                self.check_index(addrs.index, h)?;
                addrs.check().map_err(|e| Error::InvalidParam(e.into()))?;
                self.check_ring_addrs(&addrs)?;
                h.set_vring_addr(&addrs)?;
                none
            }
            R::SetVringBase(VringState { index, num }) => {
                self.check_index(index, h)?;
                // A packed ring's base also carries wrap counters and the used index in
                // the upper bits (the layout QEMU and Linux use); a split base is 16 bits.
                let packed = self.state.acked_features & VIRTIO_F_RING_PACKED != 0;
                if num > 0xffff && !packed {
                    return Err(Error::InvalidParam(format!(
                        "vring base {num:#x} does not fit 16 bits"
                    )));
                }
                h.set_vring_base(index, num)?;
                none
            }
            R::GetVringBase(VringState { index, .. }) => {
                self.check_index(index, h)?;
                let num = h.get_vring_base(index)?;
                Outgoing {
                    body: VringState { index, num }.to_bytes(),
                    ..Outgoing::default()
                }
            }
            // Gated on a feature pf::ALL leaves out, so require_protocol refused it above.
            R::GetVringBaseSkipDrain(_) => return Err(Error::NotSupported(code.name())),
            R::SetVringKick { index, fd } => {
                self.check_index(u32::from(index), h)?;
                h.set_vring_kick(u32::from(index), fd)?;
                none
            }
            R::SetVringCall { index, fd } => {
                self.check_index(u32::from(index), h)?;
                h.set_vring_call(u32::from(index), fd)?;
                none
            }
            R::SetVringErr { index, fd } => {
                self.check_index(u32::from(index), h)?;
                h.set_vring_err(u32::from(index), fd)?;
                none
            }
            R::GetQueueNum => u64_reply(h.get_queue_num()?),
            R::SetVringEnable(VringState { index, num }) => {
                self.check_index(index, h)?;
                if num > 1 {
                    return Err(Error::InvalidParam(format!(
                        "SET_VRING_ENABLE value {num} is neither 0 nor 1"
                    )));
                }
                h.set_vring_enable(index, num == 1)?;
                none
            }
            R::SetVringEndian(VringState { index, num }) => {
                self.check_index(index, h)?;
                h.set_vring_endian(index, num != 0)?;
                none
            }
            R::VringKick(VringState { index, .. }) => {
                self.check_index(index, h)?;
                h.vring_kick(index)?;
                none
            }
            R::SendRarp(mac) => {
                h.send_rarp(mac)?;
                none
            }
            R::NetSetMtu(mtu) => {
                h.net_set_mtu(mtu)?;
                none
            }
            R::SetBackendReqFd(fd) => {
                let sock = UnixStream::from(fd);
                // B6: refuse now what could never carry a request (an eventfd, a pipe, a
                // listening or non-Unix socket), rather than fail on first use.
                if sock.peer_addr().is_err() {
                    return Err(Error::InvalidParam(
                        "SET_BACKEND_REQ_FD: the fd is not a connected Unix socket".into(),
                    ));
                }
                let channel = BackendChannel::new(sock, self.state.acked_protocol);
                h.set_backend_channel(Arc::new(channel))?;
                none
            }
            R::IotlbMsg(msg) => {
                // The spec has the back-end always answer IOTLB messages with a status.
                h.iotlb_msg(&msg)?;
                u64_reply(0)
            }
            R::GetShmemConfig => Outgoing {
                body: h.get_shmem_config()?.to_bytes(),
                ..Outgoing::default()
            },
            R::GetConfig(ConfigPayload {
                offset,
                size,
                flags,
                ..
            }) => {
                let mut data = h.get_config(offset, size, flags)?;
                if data.len() != size as usize {
                    return Err(Error::Handler(format!(
                        "GET_CONFIG handler returned {} bytes for a request of {size}",
                        data.len()
                    )));
                }
                data.resize(size as usize, 0);
                Outgoing {
                    body: ConfigPayload {
                        offset,
                        size,
                        flags,
                        data,
                    }
                    .to_bytes(),
                    ..Outgoing::default()
                }
            }
            R::SetConfig(ConfigPayload {
                offset,
                flags,
                data,
                ..
            }) => {
                h.set_config(offset, &data, flags)?;
                none
            }
            R::GetInflightFd(desc) => {
                if u32::from(desc.num_queues) > h.max_queues() {
                    return Err(Error::InvalidParam(format!(
                        "GET_INFLIGHT_FD for {} queues, device has {}",
                        desc.num_queues,
                        h.max_queues()
                    )));
                }
                let (reply, fd) = h.get_inflight_fd(&desc)?;
                Outgoing {
                    body: reply.to_bytes(),
                    fd: Some(fd),
                    ..Outgoing::default()
                }
            }
            R::SetInflightFd { desc, fd } => {
                if u32::from(desc.num_queues) > h.max_queues() {
                    return Err(Error::InvalidParam(format!(
                        "SET_INFLIGHT_FD for {} queues, device has {}",
                        desc.num_queues,
                        h.max_queues()
                    )));
                }
                // The inflight area is shared memory the back-end maps like guest memory: the
                // same sealing policy (a truncated area would SIGBUS the ring's first access).
                if self.state.sealed_memory_only {
                    crate::sys::mmap::check_shrink_sealed(fd.as_fd()).map_err(|e| {
                        Error::InvalidParam(format!("SET_INFLIGHT_FD: inflight area: {e}"))
                    })?;
                }
                h.set_inflight_fd(&desc, fd)?;
                none
            }
            R::GpuSetSocket(fd) => {
                h.gpu_set_socket(fd)?;
                none
            }
            R::ResetDevice => {
                h.reset_device()?;
                self.state.acked_features = 0;
                self.state.queue_sizes.clear();
                none
            }
            R::SetStatus(status) => {
                let status = u8::try_from(status).map_err(|_| {
                    Error::InvalidParam(format!("device status {status:#x} wider than a byte"))
                })?;
                h.set_status(status)?;
                none
            }
            R::GetStatus => u64_reply(u64::from(h.get_status()?)),
            R::GetSharedObject(uuid) => {
                let fd = h.get_shared_object(uuid.0)?;
                Outgoing {
                    body: U64Payload(0).to_bytes(),
                    fd: Some(fd),
                    ..Outgoing::default()
                }
            }
            R::SetDeviceStateFd { transfer, fd } => {
                let ours = h.set_device_state_fd(&transfer, fd)?;
                const NOFD: u64 = 1 << 8;
                Outgoing {
                    body: U64Payload(if ours.is_some() { 0 } else { NOFD }).to_bytes(),
                    fd: ours,
                    ..Outgoing::default()
                }
            }
            R::CheckDeviceState => {
                h.check_device_state()?;
                u64_reply(0)
            }
            R::PostcopyAdvise => {
                // QEMU expects an empty body with the userfaultfd.
                let fd = h.postcopy_advise()?;
                Outgoing {
                    fd: Some(fd),
                    ..Outgoing::default()
                }
            }
            R::PostcopyListen => {
                h.postcopy_listen()?;
                self.state.postcopy_listening = true;
                none
            }
            R::PostcopyEnd => {
                self.state.postcopy_listening = false;
                h.postcopy_end()?;
                u64_reply(0)
            }
            R::CreateCryptoSession(params) => Outgoing {
                body: h.create_crypto_session(&params)?,
                ..Outgoing::default()
            },
            R::CloseCryptoSession(id) => {
                h.close_crypto_session(id)?;
                none
            }
        })
    }
}

/// The failure status of requests whose reply is a u64 status (no fd on failure):
/// SET_DEVICE_STATE_FD's reply also sets its NOFD bit (bit 8). Not SET_LOG_BASE: its
/// reply is only a "done" that front-ends do not read (QEMU ignores the value), so a
/// failure there still closes the connection rather than pass for success.
fn status_reply(code: FrontendReq) -> Option<u64> {
    match code {
        FrontendReq::IotlbMsg
        | FrontendReq::CheckDeviceState
        | FrontendReq::PostcopyEnd
        | FrontendReq::GetSharedObject => Some(1),
        FrontendReq::SetDeviceStateFd => Some(1 | 1 << 8),
        _ => None,
    }
}

fn ack_reply(header: &Header, status: u64) -> Outgoing {
    let body = U64Payload(status).to_bytes();
    Outgoing {
        header: Some(header.reply_to(body.len() as u32)),
        body,
        fd: None,
    }
}

fn region_info(r: &MemRegion) -> RegionInfo {
    RegionInfo {
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        userspace_addr: r.userspace_addr,
        mmap_offset: r.mmap_offset,
    }
}
