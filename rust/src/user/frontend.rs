//! The front-end: the side that owns the guest memory and the virtqueues and shares them
//! with a back-end (the seed's `Master`).
//!
//! Every call is one request; the negotiated state it needs (virtio features, protocol
//! features) is tracked here so that a request gated on a feature that was not negotiated
//! fails locally with `InactiveFeature` instead of confusing the peer. With REPLY_ACK
//! negotiated, every request without a reply of its own asks for an ack and waits for it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::channel::FrontendChannel;
use super::codes::{protocol_features as pf, FrontendReq, VHOST_USER_F_PROTOCOL_FEATURES};
use super::connection::{Connection, Message};
use super::header::Header;
use super::message::FrontendRequest as R;
use super::payload::{
    ConfigPayload, DeviceStateTransfer, InflightDesc, IotlbPayload, LogDesc, MemRegion, MemTable,
    SharedObjectUuid, ShmemConfig, SingleMemRegion, U64Payload, VringState,
};
use super::postcopy::PostcopyRegion;
use super::{Error, Result};
use crate::backend::{vhost_backend_by_inherent, LogRegion, MemoryRegion, VringAddrs};
use crate::memory::RegionInfo;
use crate::sys::socket::Waker;

/// A raw reply as [`Frontend::send_raw`] returns it: header, body and the fds it carried.
pub type RawReply = (Header, Vec<u8>, Vec<OwnedFd>);

/// A request to send, with borrowed fds: what every method builds and [`Frontend::exchange`]
/// encodes with the table's encoder (the one `decode` inverts).
type Outgoing<'a> = R<BorrowedFd<'a>>;

/// How long a front-end waits for a reply unless told otherwise (J3).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone, Copy)]
struct Negotiated {
    /// What the back-end offered in GET_FEATURES (None until asked).
    offered_features: Option<u64>,
    acked_features: u64,
    /// What the back-end offered in GET_PROTOCOL_FEATURES.
    offered_protocol: Option<u64>,
    acked_protocol: u64,
    /// Between POSTCOPY_LISTEN and POSTCOPY_END, SET_MEM_TABLE takes QEMU's postcopy
    /// form (the back-end answers with its own mapping addresses, we ack them).
    postcopy_listening: bool,
}

#[derive(Debug)]
struct State {
    conn: Connection,
    neg: Negotiated,
    /// The back-end's mapping bases from its postcopy SET_MEM_TABLE / ADD_MEM_REG replies.
    postcopy_regions: Vec<PostcopyRegion>,
}

/// A reply with its fds (most replies carry none).
#[derive(Debug)]
pub struct Reply {
    /// The reply's body, checked for size by the caller's request.
    pub body: Vec<u8>,
    /// The fd that came with it (GET_INFLIGHT_FD, SHARED_OBJECT_LOOKUP).
    pub fd: Option<OwnedFd>,
}

/// The vhost-user front-end (what QEMU is to a back-end): one method per request, each
/// checked against the negotiated features before it is sent, every wait bounded, and
/// the connection closed for good after a protocol error. One lock serialises requests, so
/// threads may share it.
#[derive(Debug)]
pub struct Frontend {
    state: Mutex<State>,
    /// Shuts the socket down without the lock a thread waiting for a reply holds.
    waker: Waker,
}

impl Frontend {
    /// Server mode: `sock` is a connection the back-end made to our listener. Waits are
    /// bounded by `DEFAULT_TIMEOUT` until [`set_timeout`](Self::set_timeout).
    pub fn new(sock: UnixStream) -> Result<Self> {
        // SAFETY: the socket moves into `conn`, which keeps it open as long as `self`,
        // and so as long as the waker.
        let waker = unsafe { Waker::new(sock.as_fd()) };
        let conn = Connection::new(sock);
        conn.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Frontend {
            waker,
            state: Mutex::new(State {
                conn,
                neg: Negotiated::default(),
                postcopy_regions: Vec::new(),
            }),
        })
    }

    /// Client mode: the back-end listens at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        Self::new(UnixStream::connect(path)?)
    }

    /// Bounds every wait for the back-end; `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.lock().conn.set_timeout(timeout)
    }

    /// The bound on every wait for the back-end (`set_timeout`).
    pub fn timeout(&self) -> Option<Duration> {
        self.lock().conn.timeout()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the stream in an unknown state; poison it
        // rather than propagating a panic to every later caller (J7).
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                g.conn.poison();
                g
            }
        }
    }

    /// The socket's fd, for polling it beside other fds (readable: the back-end went away).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.lock().conn.socket().as_raw_fd()
    }

    /// Shuts the connection's socket down from any thread, without waiting for the lock:
    /// a thread waiting for a reply wakes up with an error, the back-end sees the
    /// disconnect now, and later requests fail.
    pub fn shutdown(&self) {
        self.waker.wake();
    }

    /// True after a protocol error: every later request fails with `Closed`.
    pub fn is_broken(&self) -> bool {
        self.lock().conn.is_broken()
    }

    /// The features acked with SET_FEATURES, which decide which requests may be sent.
    pub fn acked_features(&self) -> u64 {
        self.lock().neg.acked_features
    }

    /// The protocol features acked with SET_PROTOCOL_FEATURES.
    pub fn acked_protocol_features(&self) -> u64 {
        self.lock().neg.acked_protocol
    }

    /// What the back-end offered in its last GET_FEATURES reply (None until asked), kept
    /// so that a caller reporting the offer (`probe`) need not ask twice.
    pub fn offered_features(&self) -> Option<u64> {
        self.lock().neg.offered_features
    }

    /// What the back-end offered in its last GET_PROTOCOL_FEATURES reply (None until asked).
    pub fn offered_protocol_features(&self) -> Option<u64> {
        self.lock().neg.offered_protocol
    }

    // ---- the generic exchange -------------------------------------------------------

    fn check_gate(neg: &Negotiated, req: FrontendReq) -> Result<()> {
        if req == FrontendReq::GetProtocolFeatures || req == FrontendReq::SetProtocolFeatures {
            let offered = neg.offered_features.unwrap_or(0);
            if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
                return Err(Error::InactiveFeature {
                    request: req.name(),
                    feature: "VHOST_USER_F_PROTOCOL_FEATURES",
                });
            }
        }
        if let Some(bit) = req.required_protocol_feature() {
            if neg.acked_protocol & bit == 0 {
                return Err(Error::InactiveFeature {
                    request: req.name(),
                    feature: pf::name(bit).unwrap_or("a protocol feature"),
                });
            }
        }
        Ok(())
    }

    /// Sends `request` and returns its reply if it has one; acks are consumed here.
    fn exchange(&self, request: &Outgoing<'_>) -> Result<Option<Reply>> {
        Self::exchange_locked(&mut self.lock(), request)
    }

    /// Checks `request` against the rules its receiver applies and the negotiated
    /// features, then encodes it: what every request goes through before it is sent.
    fn prepare(neg: &Negotiated, request: &Outgoing<'_>) -> Result<Vec<u8>> {
        // The request's own rules first (a bad argument is the caller's), then the gate.
        request.check()?;
        Self::check_gate(neg, request.kind())?;
        Ok(request.encode_body())
    }

    /// `exchange` for a caller that already holds the lock.
    fn exchange_locked(st: &mut State, request: &Outgoing<'_>) -> Result<Option<Reply>> {
        let req = request.kind();
        let body = Self::prepare(&st.neg, request)?;
        let body = body.as_slice();
        let fds = request.fds();
        let fds = fds.as_slice();
        let inherent = req.has_reply();
        let want_ack = !inherent && st.neg.acked_protocol & pf::REPLY_ACK != 0;
        let header = Header::request(req.code(), body.len() as u32, want_ack);
        st.conn.send(&header, body, fds)?;
        if !inherent && !want_ack {
            return Ok(None);
        }
        let expected = if want_ack {
            U64Payload::SIZE
        } else {
            req.spec().reply.expected_size(body.len())
        };
        let msg = st
            .conn
            .recv_reply(req.name(), expected, !body.is_empty(), |h| {
                h.check_reply_to(req.code())
            })
            .map_err(|e| peer_fault(req, e))?;
        let Message { body, mut fds, .. } = msg;
        if fds.len() > usize::from(inherent && req.reply_allows_fd()) {
            st.conn.poison();
            return Err(Error::FdCount {
                request: req.name(),
                expected: "at most the reply's own fd",
                got: fds.len(),
            });
        }
        if want_ack {
            let status = U64Payload::from_bytes(&body)
                .inspect_err(|_| st.conn.poison())?
                .0;
            return if status == 0 {
                Ok(None)
            } else {
                Err(Error::Refused {
                    request: req.name(),
                    status,
                })
            };
        }
        Ok(Some(Reply {
            body,
            fd: fds.pop(),
        }))
    }

    fn send_only(&self, request: &Outgoing<'_>) -> Result<()> {
        self.exchange(request).map(|_| ())
    }

    fn reply(&self, request: &Outgoing<'_>) -> Result<Reply> {
        self.exchange(request)?.ok_or(Error::ReplyMismatch(format!(
            "{} expects a reply",
            request.kind().name()
        )))
    }

    /// Parses the reply to `req` with `parse`; a malformed reply poisons the connection
    /// and is the peer's fault ([`Error::InvalidReply`], never `InvalidParam`).
    fn parsed<T>(
        &self,
        req: FrontendReq,
        body: &[u8],
        parse: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        parse(body).map_err(|e| {
            self.lock().conn.poison();
            peer_fault(req, e)
        })
    }

    /// Poisons the connection and returns an [`Error::InvalidReply`] for `req`.
    fn bad_reply(&self, req: FrontendReq, reason: String) -> Error {
        self.lock().conn.poison();
        Error::InvalidReply {
            request: req.name(),
            reason,
        }
    }

    fn get_u64(&self, request: Outgoing<'_>) -> Result<u64> {
        self.get_u64_then(request, |_, _| {})
    }

    /// A u64 query whose answer updates the negotiated state under the same lock (one
    /// lock per call on the hot path, and no window between reply and bookkeeping).
    fn get_u64_then(
        &self,
        request: Outgoing<'_>,
        note: impl FnOnce(&mut Negotiated, u64),
    ) -> Result<u64> {
        let mut st = self.lock();
        let r = Self::exchange_locked(&mut st, &request)?.ok_or_else(|| {
            Error::ReplyMismatch(format!("{} expects a reply", request.kind().name()))
        })?;
        let value = U64Payload::from_bytes(&r.body)
            .inspect_err(|_| st.conn.poison())?
            .0;
        note(&mut st.neg, value);
        Ok(value)
    }

    /// Sends a request without NEED_REPLY and reads the back-end's answer whatever
    /// REPLY_ACK says: the postcopy forms of SET_MEM_TABLE and ADD_MEM_REG.
    fn postcopy_exchange(
        st: &mut State,
        request: &Outgoing<'_>,
    ) -> Result<super::connection::Message> {
        let req = request.kind();
        let body = Self::prepare(&st.neg, request)?;
        st.conn.send(
            &Header::request(req.code(), body.len() as u32, false),
            &body,
            &request.fds(),
        )?;
        st.conn
            .recv(|h| h.check_reply_to(req.code()))
            .map_err(|e| peer_fault(req, e))
    }

    /// The front-end's ack of a postcopy region answer: the request's code, a u64 0.
    fn postcopy_ack(st: &mut State, req: FrontendReq) -> Result<()> {
        let ack = U64Payload(0).to_bytes();
        st.conn.send(
            &Header::request(req.code(), ack.len() as u32, false),
            &ack,
            &[],
        )
    }

    fn vring_index(index: u32) -> Result<u8> {
        u8::try_from(index)
            .map_err(|_| Error::InvalidParam(format!("vring index {index} exceeds 255")))
    }

    // ---- the VhostBackend interface ---------------------------------------------------

    /// GET_FEATURES: the virtio and vhost-user features the back-end offers.
    pub fn get_features(&self) -> Result<u64> {
        self.get_u64_then(R::GetFeatures, |neg, f| {
            neg.offered_features = Some(f);
        })
    }

    /// SET_FEATURES: the subset acked; remembered so later requests are gated on it.
    pub fn set_features(&self, features: u64) -> Result<()> {
        self.send_only(&R::SetFeatures(features))?;
        self.lock().neg.acked_features = features;
        Ok(())
    }

    /// SET_OWNER: the first request of a session.
    pub fn set_owner(&self) -> Result<()> {
        self.send_only(&R::SetOwner)
    }

    /// RESET_OWNER: deprecated by the spec; sent as is for back-ends that still take it.
    pub fn reset_owner(&self) -> Result<()> {
        self.send_only(&R::ResetOwner)
    }

    /// `regions` pairs each region with the fd that backs it.
    pub fn set_mem_table(&self, regions: &[(RegionInfo, BorrowedFd<'_>)]) -> Result<()> {
        let request = R::SetMemTable {
            table: MemTable {
                regions: regions.iter().map(|(info, _)| mem_region(info)).collect(),
            },
            fds: regions.iter().map(|(_, fd)| *fd).collect(),
        };
        let mut st = self.lock();
        if !st.neg.postcopy_listening {
            return Self::exchange_locked(&mut st, &request).map(|_| ());
        }
        // Postcopy, as QEMU does it: the request goes without NEED_REPLY; the back-end
        // answers with the same table carrying the addresses at which it mapped each
        // region (for the front-end's fault handling); the front-end then acks with a
        // SET_MEM_TABLE message holding a u64 0, after which the back-end may start
        // faulting. The back-end's addresses are kept for
        // [`postcopy_regions`](Self::postcopy_regions).
        let msg = Self::postcopy_exchange(&mut st, &request)?;
        if !msg.fds.is_empty() {
            st.conn.poison();
            return Err(Error::FdCount {
                request: "SET_MEM_TABLE",
                expected: "0 in the postcopy reply",
                got: msg.fds.len(),
            });
        }
        let reply = MemTable::from_bytes(&msg.body).map_err(|e| {
            st.conn.poison();
            peer_fault(FrontendReq::SetMemTable, e)
        })?;
        let same_layout = reply
            .regions
            .iter()
            .map(|r| r.guest_phys_addr)
            .eq(regions.iter().map(|(info, _)| info.guest_phys_addr));
        if !same_layout {
            st.conn.poison();
            return Err(Error::ReplyMismatch(
                "postcopy SET_MEM_TABLE reply describes other regions".into(),
            ));
        }
        Self::postcopy_ack(&mut st, FrontendReq::SetMemTable)?;
        st.postcopy_regions = reply.regions.iter().map(postcopy_region).collect();
        Ok(())
    }

    /// Where the back-end mapped each region, from its postcopy replies to SET_MEM_TABLE
    /// and ADD_MEM_REG since POSTCOPY_LISTEN (empty outside postcopy): what a
    /// [`FaultResolver`](super::postcopy::FaultResolver) needs to place faults.
    pub fn postcopy_regions(&self) -> Vec<PostcopyRegion> {
        self.lock().postcopy_regions.clone()
    }

    /// SET_LOG_BASE with the shared-memory log (LOG_SHMFD); the reply is an ack.
    pub fn set_log_base(&self, mmap_size: u64, mmap_offset: u64, fd: BorrowedFd<'_>) -> Result<()> {
        let log = LogDesc {
            mmap_size,
            mmap_offset,
        };
        // The reply only says "done": its u64 is not a status. libvhost-user (and so
        // qemu-storage-daemon) echoes mmap_size in it, and QEMU ignores it.
        self.reply(&R::SetLogBase { log, fd }).map(|_| ())
    }

    /// SET_LOG_FD: the eventfd of the dirty log (LOG_SHMFD protocol feature).
    pub fn set_log_fd(&self, fd: BorrowedFd<'_>) -> Result<()> {
        self.send_only(&R::SetLogFd(fd))
    }

    /// SET_VRING_NUM: queue `index`'s size.
    pub fn set_vring_num(&self, index: u32, num: u32) -> Result<()> {
        self.send_only(&R::SetVringNum(VringState { index, num }))
    }

    /// SET_VRING_ADDR, after the spec's alignment rules are checked here (a back-end may
    /// answer a misaligned ring with nothing but a closed socket).
    pub fn set_vring_addr(&self, addrs: &VringAddrs) -> Result<()> {
        addrs.check().map_err(|e| Error::InvalidParam(e.into()))?;
        self.send_only(&R::SetVringAddr(*addrs))
    }

    /// SET_VRING_BASE: where queue `index` resumes.
    pub fn set_vring_base(&self, index: u32, base: u32) -> Result<()> {
        self.send_only(&R::SetVringBase(VringState { index, num: base }))
    }

    /// Stops the ring and returns its next available index.
    pub fn get_vring_base(&self, index: u32) -> Result<u32> {
        let r = self.reply(&R::GetVringBase(VringState { index, num: 0 }))?;
        let state = self.parsed(FrontendReq::GetVringBase, &r.body, VringState::from_bytes)?;
        if state.index != index {
            self.lock().conn.poison();
            return Err(Error::ReplyMismatch(format!(
                "GET_VRING_BASE for ring {index} answered for ring {}",
                state.index
            )));
        }
        Ok(state.num)
    }

    /// SET_VRING_KICK: the eventfd the driver signals; `None` for polling mode (NOFD).
    pub fn set_vring_kick(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let index = Self::vring_index(index)?;
        self.send_only(&R::SetVringKick { index, fd })
    }

    /// SET_VRING_CALL: the eventfd the back-end signals on used buffers; `None` sends NOFD
    /// (in-band calls, or no calls).
    pub fn set_vring_call(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let index = Self::vring_index(index)?;
        self.send_only(&R::SetVringCall { index, fd })
    }

    /// SET_VRING_ERR: the eventfd the back-end signals on a broken ring; `None` detaches it.
    pub fn set_vring_err(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let index = Self::vring_index(index)?;
        self.send_only(&R::SetVringErr { index, fd })
    }

    // ---- beyond the base interface ------------------------------------------------------

    /// GET_PROTOCOL_FEATURES (needs the PROTOCOL_FEATURES feature bit offered).
    pub fn get_protocol_features(&self) -> Result<u64> {
        self.get_u64_then(R::GetProtocolFeatures, |neg, f| {
            neg.offered_protocol = Some(f);
        })
    }

    /// Acks protocol features; bits the back-end never offered are refused locally.
    pub fn set_protocol_features(&self, features: u64) -> Result<()> {
        if let Some(offered) = self.lock().neg.offered_protocol {
            if features & !offered != 0 {
                return Err(Error::InvalidParam(format!(
                    "protocol features {:#x} were not offered by the back-end",
                    features & !offered
                )));
            }
        }
        self.send_only(&R::SetProtocolFeatures(features))?;
        self.lock().neg.acked_protocol = features;
        Ok(())
    }

    /// GET_QUEUE_NUM: how many queues the back-end has (needs the MQ protocol feature).
    pub fn get_queue_num(&self) -> Result<u64> {
        self.get_u64(R::GetQueueNum)
    }

    /// SET_VRING_ENABLE: starts or stops queue `index` without tearing it down.
    pub fn set_vring_enable(&self, index: u32, enable: bool) -> Result<()> {
        self.send_only(&R::SetVringEnable(VringState {
            index,
            num: u32::from(enable),
        }))
    }

    /// SET_VRING_ENDIAN: the byte order of a legacy ring (CROSS_ENDIAN protocol feature).
    pub fn set_vring_endian(&self, index: u32, big_endian: bool) -> Result<()> {
        self.send_only(&R::SetVringEndian(VringState {
            index,
            num: u32::from(big_endian),
        }))
    }

    /// In-band kick (VRING_KICK), for back-ends without kick fds.
    pub fn vring_kick(&self, index: u32) -> Result<()> {
        self.send_only(&R::VringKick(VringState { index, num: 0 }))
    }

    /// Reads `size` bytes of the device config space at `offset`.
    pub fn get_config(&self, offset: u32, size: u32, flags: u32) -> Result<Vec<u8>> {
        let request = ConfigPayload {
            offset,
            size,
            flags,
            data: vec![0; size as usize],
        };
        let r = self.reply(&R::GetConfig(request.clone()))?;
        let reply = self.parsed(FrontendReq::GetConfig, &r.body, ConfigPayload::from_bytes)?;
        reply.check_reply_for(&request).inspect_err(|_| {
            self.lock().conn.poison();
        })?;
        Ok(reply.data)
    }

    /// SET_CONFIG: writes `data` at `offset` of the device config space (CONFIG protocol
    /// feature); `flags` is the spec's (1 = migration).
    pub fn set_config(&self, offset: u32, data: &[u8], flags: u32) -> Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| Error::InvalidParam("config data too large".into()))?;
        self.send_only(&R::SetConfig(ConfigPayload {
            offset,
            size,
            flags,
            data: data.to_vec(),
        }))
    }

    /// Creates the back-end request channel: a socketpair whose far end goes to the
    /// back-end; the near end is returned for the caller to serve.
    pub fn set_backend_req_fd(&self) -> Result<FrontendChannel> {
        let (near, far) = UnixStream::pair()?;
        self.send_only(&R::SetBackendReqFd(far.as_fd()))?;
        let acked = self.acked_protocol_features();
        Ok(FrontendChannel::new(near, acked))
    }

    /// Asks for the inflight area of `num_queues` rings of `queue_size` entries. The reply
    /// is checked before it is returned, since the caller maps it: the geometry asked for,
    /// a size that is neither 0 nor more than such an area can take
    /// ([`InflightDesc::max_mmap_size`]), and an fd that is a regular file (a memfd)
    /// holding `mmap_offset + mmap_size` bytes. Anything else is [`Error::InvalidReply`].
    pub fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightDesc, OwnedFd)> {
        const REQ: FrontendReq = FrontendReq::GetInflightFd;
        let asked = InflightDesc {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let r = self.reply(&R::GetInflightFd(asked))?;
        let desc = self.parsed(REQ, &r.body, InflightDesc::from_bytes)?;
        let fd = r.fd.ok_or_else(|| {
            self.lock().conn.poison();
            Error::FdCount {
                request: "GET_INFLIGHT_FD",
                expected: "1 in the reply",
                got: 0,
            }
        })?;
        if (desc.num_queues, desc.queue_size) != (num_queues, queue_size) {
            return Err(self.bad_reply(
                REQ,
                format!(
                    "asked for {num_queues} queues of {queue_size}, got {} of {}",
                    desc.num_queues, desc.queue_size
                ),
            ));
        }
        let max = InflightDesc::max_mmap_size(num_queues, queue_size);
        if desc.mmap_size == 0 || desc.mmap_size > max {
            return Err(self.bad_reply(
                REQ,
                format!(
                    "mmap size {:#x}, expected 1 to {max:#x} for {num_queues} queues of {queue_size}",
                    desc.mmap_size
                ),
            ));
        }
        let file = std::fs::File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| self.bad_reply(REQ, format!("fstat of its fd failed: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(self.bad_reply(
                REQ,
                format!(
                    "its fd is {}, not a regular file or memfd",
                    describe_file_type(meta.file_type())
                ),
            ));
        }
        match desc.mmap_offset.checked_add(desc.mmap_size) {
            Some(end) if end <= meta.len() => {}
            _ => {
                return Err(self.bad_reply(
                    REQ,
                    format!(
                        "offset {:#x} + size {:#x} is beyond the end of its {:#x}-byte file",
                        desc.mmap_offset,
                        desc.mmap_size,
                        meta.len()
                    ),
                ))
            }
        }
        Ok((desc, OwnedFd::from(file)))
    }

    /// SET_INFLIGHT_FD: hands the inflight area back after a reconnect so the back-end can
    /// resubmit what it had in flight.
    pub fn set_inflight_fd(&self, desc: &InflightDesc, fd: BorrowedFd<'_>) -> Result<()> {
        self.send_only(&R::SetInflightFd { desc: *desc, fd })
    }

    /// GET_MAX_MEM_SLOTS: how many regions ADD_MEM_REG may hold (CONFIGURE_MEM_SLOTS).
    pub fn get_max_mem_slots(&self) -> Result<u64> {
        self.get_u64(R::GetMaxMemSlots)
    }

    /// ADD_MEM_REG: one region more, mapped from `fd`.
    pub fn add_mem_region(&self, info: &RegionInfo, fd: BorrowedFd<'_>) -> Result<()> {
        let request = R::AddMemReg {
            region: mem_region(info),
            fd,
        };
        let mut st = self.lock();
        if !st.neg.postcopy_listening {
            return Self::exchange_locked(&mut st, &request).map(|_| ());
        }
        // Postcopy, as QEMU does it: no NEED_REPLY; the back-end answers with the region
        // carrying its own address for it; then the ack (the same code, a u64 0).
        let req = FrontendReq::AddMemReg;
        let msg = Self::postcopy_exchange(&mut st, &request)?;
        let reply = SingleMemRegion::from_bytes(&msg.body).map_err(|e| {
            st.conn.poison();
            peer_fault(req, e)
        })?;
        if !msg.fds.is_empty() || reply.region.guest_phys_addr != info.guest_phys_addr {
            st.conn.poison();
            return Err(Error::ReplyMismatch(format!(
                "postcopy ADD_MEM_REG reply for guest {:#x} ({} fds) answers guest {:#x}",
                info.guest_phys_addr,
                msg.fds.len(),
                reply.region.guest_phys_addr
            )));
        }
        Self::postcopy_ack(&mut st, req)?;
        st.postcopy_regions.push(postcopy_region(&reply.region));
        Ok(())
    }

    /// REM_MEM_REG: removes the region exactly as it was added.
    pub fn remove_mem_region(&self, info: &RegionInfo) -> Result<()> {
        self.send_only(&R::RemMemReg(mem_region(info)))?;
        let mut st = self.lock();
        if st.neg.postcopy_listening {
            st.postcopy_regions
                .retain(|r| r.guest_phys_addr != info.guest_phys_addr);
        }
        Ok(())
    }

    /// RESET_DEVICE: resets the device but keeps the session (RESET_DEVICE protocol feature).
    pub fn reset_device(&self) -> Result<()> {
        self.send_only(&R::ResetDevice)
    }

    /// SET_STATUS: the virtio device status byte (STATUS protocol feature).
    pub fn set_status(&self, status: u8) -> Result<()> {
        self.send_only(&R::SetStatus(u64::from(status)))
    }

    /// GET_STATUS: the back-end's device status byte; a value above 8 bits closes the connection.
    pub fn get_status(&self) -> Result<u8> {
        let v = self.get_u64(R::GetStatus)?;
        u8::try_from(v).map_err(|_| {
            self.lock().conn.poison();
            Error::ReplyMismatch(format!("GET_STATUS returned {v:#x}, wider than a byte"))
        })
    }

    /// NET_SET_MTU: the MTU the guest driver set (NET_MTU protocol feature).
    pub fn net_set_mtu(&self, mtu: u64) -> Result<()> {
        self.send_only(&R::NetSetMtu(mtu))
    }

    /// SEND_RARP: asks a net back-end to announce `mac` after a migration (RARP protocol
    /// feature).
    pub fn send_rarp(&self, mac: [u8; 6]) -> Result<()> {
        self.send_only(&R::SendRarp(mac))
    }

    /// GPU_SET_SOCKET: the socket of the GPU protocol, for a vhost-user-gpu back-end.
    pub fn gpu_set_socket(&self, fd: BorrowedFd<'_>) -> Result<()> {
        self.send_only(&R::GpuSetSocket(fd))
    }

    /// IOTLB_MSG: a translation update or invalidation (IOMMU platform feature); waits for
    /// the back-end's status.
    pub fn iotlb_msg(&self, msg: &IotlbPayload) -> Result<()> {
        let r = self.reply(&R::IotlbMsg(*msg))?;
        let status = self.parsed(FrontendReq::IotlbMsg, &r.body, |b| {
            U64Payload::from_bytes(b).map(|p| p.0)
        })?;
        if status != 0 {
            return Err(Error::Refused {
                request: "IOTLB_MSG",
                status,
            });
        }
        Ok(())
    }

    /// Asks the back-end for the dma-buf fd of a shared object.
    pub fn get_shared_object(&self, uuid: [u8; 16]) -> Result<OwnedFd> {
        let r = self.reply(&R::GetSharedObject(SharedObjectUuid(uuid)))?;
        let status = self.parsed(FrontendReq::GetSharedObject, &r.body, |b| {
            U64Payload::from_bytes(b).map(|p| p.0)
        })?;
        if status != 0 {
            return Err(Error::Refused {
                request: "GET_SHARED_OBJECT",
                status,
            });
        }
        r.fd.ok_or(Error::FdCount {
            request: "GET_SHARED_OBJECT",
            expected: "1 in the reply",
            got: 0,
        })
    }

    /// Starts a device-state transfer; returns the back-end's own pipe end if it chose
    /// to provide one instead of using ours.
    pub fn set_device_state_fd(
        &self,
        direction: u32,
        phase: u32,
        fd: BorrowedFd<'_>,
    ) -> Result<Option<OwnedFd>> {
        let transfer = DeviceStateTransfer { direction, phase };
        let r = self.reply(&R::SetDeviceStateFd { transfer, fd })?;
        let v = self.parsed(FrontendReq::SetDeviceStateFd, &r.body, |b| {
            U64Payload::from_bytes(b).map(|p| p.0)
        })?;
        const NOFD: u64 = 1 << 8;
        if v & 0xff != 0 {
            return Err(Error::Refused {
                request: "SET_DEVICE_STATE_FD",
                status: v & 0xff,
            });
        }
        match (v & NOFD != 0, r.fd) {
            (true, None) => Ok(None),
            (false, Some(fd)) => Ok(Some(fd)),
            (nofd, fd) => {
                self.lock().conn.poison();
                Err(Error::FdCount {
                    request: "SET_DEVICE_STATE_FD",
                    expected: if nofd {
                        "0 with NOFD"
                    } else {
                        "1 without NOFD"
                    },
                    got: usize::from(fd.is_some()),
                })
            }
        }
    }

    /// The sizes of the back-end's VIRTIO Shared Memory Regions (`GET_SHMEM_CONFIG`, needs
    /// `SHMEM`). A reply of the wrong size, or whose count is not the number of non-zero
    /// sizes, is the back-end's fault ([`Error::InvalidReply`]) and closes the connection.
    pub fn get_shmem_config(&self) -> Result<ShmemConfig> {
        let r = self.reply(&R::GetShmemConfig)?;
        self.parsed(
            FrontendReq::GetShmemConfig,
            &r.body,
            ShmemConfig::from_bytes,
        )
    }

    /// CHECK_DEVICE_STATE: whether the back-end's state transfer succeeded (refused otherwise).
    pub fn check_device_state(&self) -> Result<()> {
        let status = self.get_u64(R::CheckDeviceState)?;
        if status != 0 {
            return Err(Error::Refused {
                request: "CHECK_DEVICE_STATE",
                status,
            });
        }
        Ok(())
    }

    /// Returns the userfaultfd the back-end opened for postcopy.
    pub fn postcopy_advise(&self) -> Result<OwnedFd> {
        let r = self.reply(&R::PostcopyAdvise)?;
        r.fd.ok_or(Error::FdCount {
            request: "POSTCOPY_ADVISE",
            expected: "1 in the reply",
            got: 0,
        })
    }

    /// POSTCOPY_LISTEN: from here on SET_MEM_TABLE takes the postcopy form.
    pub fn postcopy_listen(&self) -> Result<()> {
        self.send_only(&R::PostcopyListen)?;
        self.lock().neg.postcopy_listening = true;
        Ok(())
    }

    /// POSTCOPY_END: postcopy is over; the back-end's status is returned as a refusal if not 0.
    pub fn postcopy_end(&self) -> Result<()> {
        // The back-end leaves postcopy whatever its status says.
        {
            let mut st = self.lock();
            st.neg.postcopy_listening = false;
            st.postcopy_regions.clear();
        }
        self.status_reply(R::PostcopyEnd)
    }

    fn status_reply(&self, request: Outgoing<'_>) -> Result<()> {
        let req = request.kind();
        let status = self.get_u64(request)?;
        if status != 0 {
            return Err(Error::Refused {
                request: req.name(),
                status,
            });
        }
        Ok(())
    }

    /// Opaque session parameters in, opaque session description out.
    pub fn create_crypto_session(&self, params: &[u8]) -> Result<Vec<u8>> {
        Ok(self.reply(&R::CreateCryptoSession(params.to_vec()))?.body)
    }

    /// CLOSE_CRYPTO_SESSION: ends a session of a vhost-user crypto back-end.
    pub fn close_crypto_session(&self, session_id: u64) -> Result<()> {
        self.send_only(&R::CloseCryptoSession(session_id))
    }

    /// Sends a raw, possibly malformed request: for test rigs probing a back-end's
    /// robustness. Returns the raw reply if one arrives before the timeout.
    pub fn send_raw(
        &self,
        header: Header,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        expect_reply: bool,
    ) -> Result<Option<RawReply>> {
        let mut st = self.lock();
        st.conn.send(&header, body, fds)?;
        if !expect_reply {
            return Ok(None);
        }
        let msg = st.conn.recv(|_| Ok(()))?;
        Ok(Some((msg.header, msg.body, msg.fds)))
    }
}

// ---- negotiation --------------------------------------------------------------------

/// Protocol features this front-end implements: a method or the back-end request channel
/// speaks each one. Not here: `XEN_MMAP` (another memory-region layout), `GPA_ADDRESSES`
/// (rings and the memory table are given as front-end virtual addresses),
/// `GET_VRING_BASE_INFLIGHT` and every later bit this crate does not implement (they
/// change what requests mean).
pub const IMPLEMENTED_PROTOCOL_FEATURES: u64 =
    pf::ALL & !(pf::XEN_MMAP | pf::GPA_ADDRESSES | pf::GET_VRING_BASE_INFLIGHT);

/// What [`Frontend::negotiate`] acks unless told otherwise: the implemented protocol
/// features that ask nothing more of the caller. `INFLIGHT_SHMFD` is left out: once it is
/// acked, a back-end expects an inflight area (GET_INFLIGHT_FD / SET_INFLIGHT_FD) before
/// its rings start, so only a caller that sets one up should ask for it.
pub const DEFAULT_PROTOCOL_FEATURES: u64 = IMPLEMENTED_PROTOCOL_FEATURES & !pf::INFLIGHT_SHMFD;

/// What the caller of [`Frontend::negotiate`] allows and needs: the rings it will hand
/// over decide the transport bits, the masks narrow the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiateOptions {
    /// Masks the device-specific bits (0-23, 50-63); `None` allows every one offered.
    pub features: Option<u64>,
    /// Masks the protocol features; `None` means [`DEFAULT_PROTOCOL_FEATURES`]. A bit
    /// outside [`IMPLEMENTED_PROTOCOL_FEATURES`] is refused.
    pub protocol_features: Option<u64>,
    /// The rings are packed: `VIRTIO_F_RING_PACKED` is acked exactly when this is set.
    pub packed: bool,
    /// Ack `VIRTIO_RING_F_EVENT_IDX` when offered (and `features` allows it).
    pub event_idx: bool,
    /// Also ack `VHOST_F_LOG_ALL`, for a front-end taking over in mid-migration.
    pub log_all: bool,
}

impl Default for NegotiateOptions {
    /// Split rings with EVENT_IDX, every offered device bit, the default protocol features.
    fn default() -> Self {
        NegotiateOptions {
            features: None,
            protocol_features: None,
            packed: false,
            event_idx: true,
            log_all: false,
        }
    }
}

impl Frontend {
    /// The usual opening: GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES (when the
    /// back-end offers `VHOST_USER_F_PROTOCOL_FEATURES`), SET_FEATURES. Returns what was
    /// acked: `(features, protocol features)`.
    ///
    /// Acks only what this crate implements and what the caller's rings allow, so the
    /// back-end never runs a ring format or a protocol extension the caller cannot: of the
    /// transport bits (24-49) only `VERSION_1`, `INDIRECT_DESC`, `EVENT_IDX` (with
    /// `event_idx`), `RING_PACKED` (exactly with `packed`) and `LOG_ALL` (with `log_all`)
    /// are acked, plus `VHOST_USER_F_PROTOCOL_FEATURES` whenever offered, as QEMU does.
    /// What `packed` and `log_all` ask for is acked whatever `features` says.
    ///
    /// Refused before anything is sent ([`Error::InvalidParam`]): protocol features this
    /// front-end does not implement, `packed` with a `features` mask that excludes it.
    /// Refused after GET_FEATURES only ([`Error::NotOffered`]): `packed` or `log_all` when
    /// the back-end does not offer the bit.
    pub fn negotiate(&self, opts: &NegotiateOptions) -> Result<(u64, u64)> {
        use super::codes::VHOST_F_LOG_ALL;
        use crate::vring::features as ring;

        let proto_mask = opts.protocol_features.unwrap_or(DEFAULT_PROTOCOL_FEATURES);
        let unknown = proto_mask & !IMPLEMENTED_PROTOCOL_FEATURES;
        if unknown != 0 {
            return Err(Error::InvalidParam(format!(
                "negotiate: protocol features {} are not implemented by this front-end \
                 (set_protocol_features acks them anyway)",
                protocol_feature_names(unknown)
            )));
        }
        if opts.packed && opts.features.is_some_and(|f| f & ring::RING_PACKED == 0) {
            return Err(Error::InvalidParam(
                "negotiate: packed rings were asked for but the features mask excludes \
                 VIRTIO_F_RING_PACKED"
                    .into(),
            ));
        }
        let offered = self.get_features()?;
        let not_offered = |feature, hint| Error::NotOffered {
            request: FrontendReq::SetFeatures.name(),
            feature,
            offered,
            hint,
        };
        if opts.log_all && offered & VHOST_F_LOG_ALL == 0 {
            return Err(not_offered("VHOST_F_LOG_ALL", ""));
        }
        if opts.packed && offered & ring::RING_PACKED == 0 {
            return Err(not_offered("VIRTIO_F_RING_PACKED", "; use a split ring"));
        }
        self.set_owner()?;
        let mut acked_proto = 0;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            acked_proto = self.get_protocol_features()? & proto_mask;
            self.set_protocol_features(acked_proto)?;
        }
        let mut ring_bits = ring::VERSION_1 | ring::INDIRECT_DESC;
        if opts.event_idx {
            ring_bits |= ring::EVENT_IDX;
        }
        let asked = (if opts.packed { ring::RING_PACKED } else { 0 })
            | (if opts.log_all { VHOST_F_LOG_ALL } else { 0 });
        let mut allowed = ring_bits | asked | ring::DEVICE_BITS;
        if let Some(mask) = opts.features {
            allowed &= mask | asked;
        }
        let acked = offered & (allowed | VHOST_USER_F_PROTOCOL_FEATURES);
        self.set_features(acked)?;
        Ok((acked, acked_proto))
    }
}

/// `"GPA_ADDRESSES|bit 40"`: the names of the protocol feature bits in `bits`.
fn protocol_feature_names(bits: u64) -> String {
    (0..64)
        .map(|i| 1u64 << i)
        .filter(|bit| bits & bit != 0)
        .map(|bit| match pf::name(bit) {
            Some(name) => name.to_string(),
            None => format!("bit {}", bit.trailing_zeros()),
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// An error met while receiving or decoding the reply to `req`: what would be a bad
/// argument coming from our caller is a broken protocol coming from the peer.
fn peer_fault(req: FrontendReq, e: Error) -> Error {
    match e {
        Error::InvalidParam(reason) => Error::InvalidReply {
            request: req.name(),
            reason,
        },
        other => other,
    }
}

/// What kind of file an fd is, for an error message.
fn describe_file_type(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a pipe"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "an anonymous inode (an eventfd, say)"
    }
}

fn postcopy_region(r: &MemRegion) -> PostcopyRegion {
    PostcopyRegion {
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        backend_addr: r.userspace_addr,
    }
}

fn mem_region(info: &RegionInfo) -> MemRegion {
    MemRegion {
        guest_phys_addr: info.guest_phys_addr,
        memory_size: info.memory_size,
        userspace_addr: info.userspace_addr,
        mmap_offset: info.mmap_offset,
    }
}

vhost_backend_by_inherent!(
    /// The vhost-user `VhostBackend`: each method is the request of the same name. Memory
    /// regions and the dirty log travel as fds, so a region without one, a log without a
    /// shared-memory region (or with a base other than 0) and `set_log_fd(None)` are refused
    /// before anything is sent.
    Frontend {
    fn set_mem_table(&self, regions: &[MemoryRegion<'_>]) -> crate::Result<()> {
        let table = regions
            .iter()
            .map(|r| match r.fd {
                Some(fd) => Ok((r.info, fd)),
                None => Err(Error::InvalidParam(format!(
                    "SET_MEM_TABLE: the region at guest address {:#x} has no fd",
                    r.info.guest_phys_addr
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Frontend::set_mem_table(self, &table)?)
    }
    fn set_log_base(&self, base: u64, region: Option<LogRegion<'_>>) -> crate::Result<()> {
        let Some(log) = region else {
            return Err(Error::InvalidParam(
                "vhost-user logs through shared memory (LOG_SHMFD): pass a log region".into(),
            )
            .into());
        };
        if base != 0 {
            return Err(Error::InvalidParam(
                "vhost-user log base must be 0; the region's mmap_offset says where".into(),
            )
            .into());
        }
        Ok(Frontend::set_log_base(
            self,
            log.mmap_size,
            log.mmap_offset,
            log.fd,
        )?)
    }
    fn set_log_fd(&self, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        let fd = fd.ok_or_else(|| Error::InvalidParam("SET_LOG_FD needs an fd".into()))?;
        Ok(Frontend::set_log_fd(self, fd)?)
    }
});
