//! The front-end: the side that owns the guest memory and the virtqueues and shares them
//! with a back-end (the seed's `Master`).
//!
//! Every call is one request; the negotiated state it needs (virtio features, protocol
//! features) is tracked here so that a request gated on a feature that was not negotiated
//! fails locally with `InactiveFeature` instead of confusing the peer. With REPLY_ACK
//! negotiated, every request without a reply of its own asks for an ack and waits for it.
//!
//! Each request is a [`Call`] (built by the functions of [`calls`]): the request to
//! encode, and how its answer is decoded, checked and recorded. [`Frontend::run`] drives
//! a call blocking (what every method does); [`Frontend::start`] and
//! [`Frontend::advance`] drive the same call for an event loop that waits for the socket
//! itself (Python's `vhost.aio`), taking the answer from what has arrived
//! ([`Connection::try_recv`]). One encoder, one decoder, one set of header rules, either way.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::channel::FrontendChannel;
use super::codes::{protocol_features as pf, FrontendReq, VHOST_USER_F_PROTOCOL_FEATURES};
use super::connection::{Connection, Message, PartialMessage};
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
    /// A request started without waiting ([`Frontend::start`]) awaits its answer: no other
    /// may be sent until it is over.
    in_flight: bool,
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
                in_flight: false,
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

    // ---- the exchange: one request and its answer, blocking or not -----------------

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

    /// Checks `request` against the rules its receiver applies and the negotiated
    /// features, then encodes it: what every request goes through before it is sent.
    fn prepare(neg: &Negotiated, request: &Outgoing<'_>) -> Result<Vec<u8>> {
        // The request's own rules first (a bad argument is the caller's), then the gate.
        request.check()?;
        Self::check_gate(neg, request.kind())?;
        Ok(request.encode_body())
    }

    /// Encodes and sends the call's message, and says what answer to wait for: the one
    /// place that applies the header rules (NEED_REPLY exactly when REPLY_ACK is acked and
    /// the request has no reply of its own; the postcopy forms while listening).
    fn send_call<T>(st: &mut State, call: &mut Call<'_, T>) -> Result<Awaiting> {
        if st.in_flight {
            return Err(Error::InvalidParam(
                "another request on this connection is still waiting for its reply".into(),
            ));
        }
        if let Some(before) = call.before.take() {
            before(st)?;
        }
        let request = match &call.message {
            Outbound::PostcopyAck(req) => {
                let ack = U64Payload(0).to_bytes();
                st.conn.send(
                    &Header::request(req.code(), ack.len() as u32, false),
                    &ack,
                    &[],
                )?;
                return Ok(Awaiting {
                    req: *req,
                    kind: Awaited::Nothing,
                    request_has_body: true,
                });
            }
            Outbound::Request(request) => request,
        };
        let req = request.kind();
        let body = Self::prepare(&st.neg, request)?;
        let fds = request.fds();
        let postcopy = call.postcopy_aware && st.neg.postcopy_listening;
        let inherent = req.has_reply();
        let want_ack = !postcopy && !inherent && st.neg.acked_protocol & pf::REPLY_ACK != 0;
        let header = Header::request(req.code(), body.len() as u32, want_ack);
        st.conn.send(&header, &body, &fds)?;
        let kind = if postcopy {
            Awaited::Postcopy
        } else if want_ack {
            Awaited::Ack
        } else if inherent {
            Awaited::Reply(req.spec().reply.expected_size(body.len()))
        } else {
            Awaited::Nothing
        };
        Ok(Awaiting {
            req,
            kind,
            request_has_body: !body.is_empty(),
        })
    }

    /// Waits for the answer `aw` describes (blocking, bounded by the timeout).
    fn recv_blocking(st: &mut State, aw: Awaiting) -> Result<Message> {
        let code = aw.req.code();
        let got = match aw.kind {
            Awaited::Nothing => unreachable!("nothing to receive"),
            Awaited::Postcopy => st.conn.recv(|h| h.check_reply_to(code)),
            Awaited::Ack => {
                st.conn
                    .recv_reply(aw.req.name(), U64Payload::SIZE, aw.request_has_body, |h| {
                        h.check_reply_to(code)
                    })
            }
            Awaited::Reply(expected) => {
                st.conn
                    .recv_reply(aw.req.name(), expected, aw.request_has_body, |h| {
                        h.check_reply_to(code)
                    })
            }
        };
        got.map_err(|e| peer_fault(aw.req, e))
    }

    /// The checks every answer goes through, whichever way it was received: its fds, and
    /// an ack's status. Returns the reply for the call to decode (None for an ack).
    fn settle(st: &mut State, aw: Awaiting, msg: Message) -> Result<Option<Reply>> {
        let req = aw.req;
        let Message { body, mut fds, .. } = msg;
        let allowed = usize::from(matches!(aw.kind, Awaited::Reply(_)) && req.reply_allows_fd());
        if fds.len() > allowed {
            st.conn.poison();
            return Err(Error::FdCount {
                request: req.name(),
                expected: if aw.kind == Awaited::Postcopy {
                    "0 in the postcopy answer"
                } else {
                    "at most the reply's own fd"
                },
                got: fds.len(),
            });
        }
        if aw.kind == Awaited::Ack {
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

    /// Runs `call` to its end, waiting for each answer: what every blocking method does.
    pub fn run<T>(&self, call: Call<'_, T>) -> Result<T> {
        let mut st = self.lock();
        let st = &mut *st;
        let mut call = call;
        loop {
            let aw = Self::send_call(st, &mut call)?;
            let reply = match aw.kind {
                Awaited::Nothing => None,
                _ => {
                    let msg = Self::recv_blocking(st, aw)?;
                    Self::settle(st, aw, msg)?
                }
            };
            match (call.finish)(st, reply)? {
                Next::Done(value) => return Ok(value),
                Next::Then(next) => call = next,
            }
        }
    }

    /// Sends `call`'s request without waiting for its answer: the first half of a request
    /// for a caller whose event loop waits for the socket ([`socket_fd`](Self::socket_fd))
    /// to become readable, then calls [`advance`](Self::advance). A call that expects no
    /// answer (no REPLY_ACK) is over at once. The send itself goes out at once: a socket's
    /// buffer holds many requests, and only a back-end that stopped reading could make it
    /// wait (bounded by the timeout). Until the call is over, no other request may start.
    pub fn start<T>(&self, call: Call<'_, T>) -> Result<Started<T>> {
        let mut st = self.lock();
        Self::start_locked(&mut st, call)
    }

    fn start_locked<T>(st: &mut State, call: Call<'_, T>) -> Result<Started<T>> {
        let mut call = call;
        loop {
            let aw = Self::send_call(st, &mut call)?;
            if aw.kind != Awaited::Nothing {
                st.in_flight = true;
                return Ok(Started::Waiting(Pending {
                    awaiting: aw,
                    partial: PartialMessage::default(),
                    finish: Some(call.finish),
                }));
            }
            match (call.finish)(st, None)? {
                Next::Done(value) => return Ok(Started::Done(value)),
                Next::Then(next) => call = next,
            }
        }
    }

    /// Takes what has arrived of `pending`'s answer without waiting; `Some` once the call
    /// is over (its next request, if it has one, is sent here), `None` to wait for the
    /// socket again. The answer goes through the same checks and decoding as a blocking
    /// call's. An error ends the call (and, if the stream is out of step, the connection).
    pub fn advance<T>(&self, pending: &mut Pending<T>) -> Result<Option<T>> {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(finish) = pending.finish.take() else {
            return Err(Error::Closed);
        };
        let aw = pending.awaiting;
        let code = aw.req.code();
        let msg = match st
            .conn
            .try_recv(&mut pending.partial, |h| h.check_reply_to(code))
        {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                pending.finish = Some(finish);
                return Ok(None);
            }
            Err(e) => {
                st.in_flight = false;
                return Err(peer_fault(aw.req, e));
            }
        };
        st.in_flight = false;
        let reply = Self::settle(st, aw, msg)?;
        match finish(st, reply)? {
            Next::Done(value) => Ok(Some(value)),
            Next::Then(next) => match Self::start_locked(st, next)? {
                Started::Done(value) => Ok(Some(value)),
                Started::Waiting(more) => {
                    *pending = more;
                    Ok(None)
                }
            },
        }
    }

    /// Gives up on `pending` (the caller was cancelled). A request sent but not answered
    /// leaves the stream out of step (its answer would be read as the next one's), so the
    /// connection is closed; a call already over changes nothing.
    pub fn abandon<T>(&self, pending: &mut Pending<T>) {
        if pending.finish.take().is_some() {
            let mut st = self.lock();
            st.in_flight = false;
            st.conn.poison();
        }
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

    // ---- the requests: each is the blocking run of its call (see `calls`) ----------

    /// GET_FEATURES: the virtio and vhost-user features the back-end offers.
    pub fn get_features(&self) -> Result<u64> {
        self.run(calls::get_features())
    }

    /// SET_FEATURES: the subset acked; remembered so later requests are gated on it.
    pub fn set_features(&self, features: u64) -> Result<()> {
        self.run(calls::set_features(features))
    }

    /// SET_OWNER: the first request of a session.
    pub fn set_owner(&self) -> Result<()> {
        self.run(calls::set_owner())
    }

    /// RESET_OWNER: deprecated by the spec; sent as is for back-ends that still take it.
    pub fn reset_owner(&self) -> Result<()> {
        self.run(calls::reset_owner())
    }

    /// `regions` pairs each region with the fd that backs it. While postcopy listens, the
    /// postcopy form (see [`calls::set_mem_table`]).
    pub fn set_mem_table(&self, regions: &[(RegionInfo, BorrowedFd<'_>)]) -> Result<()> {
        self.run(calls::set_mem_table(regions))
    }

    /// Where the back-end mapped each region, from its postcopy replies to SET_MEM_TABLE
    /// and ADD_MEM_REG since POSTCOPY_LISTEN (empty outside postcopy): what a
    /// [`FaultResolver`](super::postcopy::FaultResolver) needs to place faults.
    pub fn postcopy_regions(&self) -> Vec<PostcopyRegion> {
        self.lock().postcopy_regions.clone()
    }

    /// SET_LOG_BASE with the shared-memory log (LOG_SHMFD); the reply is an ack.
    pub fn set_log_base(&self, mmap_size: u64, mmap_offset: u64, fd: BorrowedFd<'_>) -> Result<()> {
        self.run(calls::set_log_base(mmap_size, mmap_offset, fd))
    }

    /// SET_LOG_FD: the eventfd of the dirty log (LOG_SHMFD protocol feature).
    pub fn set_log_fd(&self, fd: BorrowedFd<'_>) -> Result<()> {
        self.run(calls::set_log_fd(fd))
    }

    /// SET_VRING_NUM: queue `index`'s size.
    pub fn set_vring_num(&self, index: u32, num: u32) -> Result<()> {
        self.run(calls::set_vring_num(index, num))
    }

    /// SET_VRING_ADDR, after the spec's alignment rules are checked here (a back-end may
    /// answer a misaligned ring with nothing but a closed socket).
    pub fn set_vring_addr(&self, addrs: &VringAddrs) -> Result<()> {
        self.run(calls::set_vring_addr(addrs)?)
    }

    /// SET_VRING_BASE: where queue `index` resumes.
    pub fn set_vring_base(&self, index: u32, base: u32) -> Result<()> {
        self.run(calls::set_vring_base(index, base))
    }

    /// Stops the ring and returns its next available index.
    pub fn get_vring_base(&self, index: u32) -> Result<u32> {
        self.run(calls::get_vring_base(index))
    }

    /// SET_VRING_KICK: the eventfd the driver signals; `None` for polling mode (NOFD).
    pub fn set_vring_kick(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.run(calls::set_vring_kick(index, fd)?)
    }

    /// SET_VRING_CALL: the eventfd the back-end signals on used buffers; `None` sends NOFD
    /// (in-band calls, or no calls).
    pub fn set_vring_call(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.run(calls::set_vring_call(index, fd)?)
    }

    /// SET_VRING_ERR: the eventfd the back-end signals on a broken ring; `None` detaches it.
    pub fn set_vring_err(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.run(calls::set_vring_err(index, fd)?)
    }

    // ---- beyond the base interface ------------------------------------------------------

    /// GET_PROTOCOL_FEATURES (needs the PROTOCOL_FEATURES feature bit offered).
    pub fn get_protocol_features(&self) -> Result<u64> {
        self.run(calls::get_protocol_features())
    }

    /// Acks protocol features; bits the back-end never offered are refused locally.
    pub fn set_protocol_features(&self, features: u64) -> Result<()> {
        self.run(calls::set_protocol_features(features))
    }

    /// GET_QUEUE_NUM: how many queues the back-end has (needs the MQ protocol feature).
    pub fn get_queue_num(&self) -> Result<u64> {
        self.run(calls::get_queue_num())
    }

    /// SET_VRING_ENABLE: starts or stops queue `index` without tearing it down.
    pub fn set_vring_enable(&self, index: u32, enable: bool) -> Result<()> {
        self.run(calls::set_vring_enable(index, enable))
    }

    /// SET_VRING_ENDIAN: the byte order of a legacy ring (CROSS_ENDIAN protocol feature).
    pub fn set_vring_endian(&self, index: u32, big_endian: bool) -> Result<()> {
        self.run(calls::set_vring_endian(index, big_endian))
    }

    /// In-band kick (VRING_KICK), for back-ends without kick fds.
    pub fn vring_kick(&self, index: u32) -> Result<()> {
        self.run(calls::vring_kick(index))
    }

    /// Reads `size` bytes of the device config space at `offset`.
    pub fn get_config(&self, offset: u32, size: u32, flags: u32) -> Result<Vec<u8>> {
        self.run(calls::get_config(offset, size, flags))
    }

    /// SET_CONFIG: writes `data` at `offset` of the device config space (CONFIG protocol
    /// feature); `flags` is the spec's (1 = migration).
    pub fn set_config(&self, offset: u32, data: &[u8], flags: u32) -> Result<()> {
        self.run(calls::set_config(offset, data, flags)?)
    }

    /// Creates the back-end request channel: a socketpair whose far end goes to the
    /// back-end; the near end is returned for the caller to serve.
    pub fn set_backend_req_fd(&self) -> Result<FrontendChannel> {
        let (near, far) = UnixStream::pair()?;
        self.run(calls::set_backend_req_fd(near, far.as_fd()))
    }

    /// Asks for the inflight area of `num_queues` rings of `queue_size` entries, checked
    /// as [`calls::get_inflight_fd`] says.
    pub fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightDesc, OwnedFd)> {
        self.run(calls::get_inflight_fd(num_queues, queue_size))
    }

    /// SET_INFLIGHT_FD: hands the inflight area back after a reconnect so the back-end can
    /// resubmit what it had in flight.
    pub fn set_inflight_fd(&self, desc: &InflightDesc, fd: BorrowedFd<'_>) -> Result<()> {
        self.run(calls::set_inflight_fd(desc, fd))
    }

    /// GET_MAX_MEM_SLOTS: how many regions ADD_MEM_REG may hold (CONFIGURE_MEM_SLOTS).
    pub fn get_max_mem_slots(&self) -> Result<u64> {
        self.run(calls::get_max_mem_slots())
    }

    /// ADD_MEM_REG: one region more, mapped from `fd` (the postcopy form while listening).
    pub fn add_mem_region(&self, info: &RegionInfo, fd: BorrowedFd<'_>) -> Result<()> {
        self.run(calls::add_mem_region(info, fd))
    }

    /// REM_MEM_REG: removes the region exactly as it was added.
    pub fn remove_mem_region(&self, info: &RegionInfo) -> Result<()> {
        self.run(calls::remove_mem_region(info))
    }

    /// RESET_DEVICE: resets the device but keeps the session (RESET_DEVICE protocol feature).
    pub fn reset_device(&self) -> Result<()> {
        self.run(calls::reset_device())
    }

    /// SET_STATUS: the virtio device status byte (STATUS protocol feature).
    pub fn set_status(&self, status: u8) -> Result<()> {
        self.run(calls::set_status(status))
    }

    /// GET_STATUS: the back-end's device status byte; a value above 8 bits closes the connection.
    pub fn get_status(&self) -> Result<u8> {
        self.run(calls::get_status())
    }

    /// NET_SET_MTU: the MTU the guest driver set (NET_MTU protocol feature).
    pub fn net_set_mtu(&self, mtu: u64) -> Result<()> {
        self.run(calls::net_set_mtu(mtu))
    }

    /// SEND_RARP: asks a net back-end to announce `mac` after a migration (RARP protocol
    /// feature).
    pub fn send_rarp(&self, mac: [u8; 6]) -> Result<()> {
        self.run(calls::send_rarp(mac))
    }

    /// GPU_SET_SOCKET: the socket of the GPU protocol, for a vhost-user-gpu back-end.
    pub fn gpu_set_socket(&self, fd: BorrowedFd<'_>) -> Result<()> {
        self.run(calls::gpu_set_socket(fd))
    }

    /// IOTLB_MSG: a translation update or invalidation (IOMMU platform feature); waits for
    /// the back-end's status.
    pub fn iotlb_msg(&self, msg: &IotlbPayload) -> Result<()> {
        self.run(calls::iotlb_msg(msg))
    }

    /// Asks the back-end for the dma-buf fd of a shared object.
    pub fn get_shared_object(&self, uuid: [u8; 16]) -> Result<OwnedFd> {
        self.run(calls::get_shared_object(uuid))
    }

    /// Starts a device-state transfer; returns the back-end's own pipe end if it chose
    /// to provide one instead of using ours.
    pub fn set_device_state_fd(
        &self,
        direction: u32,
        phase: u32,
        fd: BorrowedFd<'_>,
    ) -> Result<Option<OwnedFd>> {
        self.run(calls::set_device_state_fd(direction, phase, fd))
    }

    /// The sizes of the back-end's VIRTIO Shared Memory Regions (`GET_SHMEM_CONFIG`, needs
    /// `SHMEM`). A reply of the wrong size, or whose count is not the number of non-zero
    /// sizes, is the back-end's fault ([`Error::InvalidReply`]) and closes the connection.
    pub fn get_shmem_config(&self) -> Result<ShmemConfig> {
        self.run(calls::get_shmem_config())
    }

    /// CHECK_DEVICE_STATE: whether the back-end's state transfer succeeded (refused otherwise).
    pub fn check_device_state(&self) -> Result<()> {
        self.run(calls::check_device_state())
    }

    /// Returns the userfaultfd the back-end opened for postcopy.
    pub fn postcopy_advise(&self) -> Result<OwnedFd> {
        self.run(calls::postcopy_advise())
    }

    /// POSTCOPY_LISTEN: from here on SET_MEM_TABLE takes the postcopy form.
    pub fn postcopy_listen(&self) -> Result<()> {
        self.run(calls::postcopy_listen())
    }

    /// POSTCOPY_END: postcopy is over; the back-end's status is returned as a refusal if not 0.
    pub fn postcopy_end(&self) -> Result<()> {
        self.run(calls::postcopy_end())
    }

    /// Opaque session parameters in, opaque session description out.
    pub fn create_crypto_session(&self, params: &[u8]) -> Result<Vec<u8>> {
        self.run(calls::create_crypto_session(params))
    }

    /// CLOSE_CRYPTO_SESSION: ends a session of a vhost-user crypto back-end.
    pub fn close_crypto_session(&self, session_id: u64) -> Result<()> {
        self.run(calls::close_crypto_session(session_id))
    }

    /// The usual opening, as [`calls::negotiate`] describes it. Returns what was acked:
    /// `(features, protocol features)`.
    pub fn negotiate(&self, opts: &NegotiateOptions) -> Result<(u64, u64)> {
        self.run(calls::negotiate(opts)?)
    }
}

// ---- calls --------------------------------------------------------------------------

/// What a call does with its request's answer (`None`: no answer, or an ack): the result,
/// or another request first (negotiation's next step, postcopy's ack).
#[derive(Debug)]
pub enum Next<T> {
    /// The call is over with this result.
    Done(T),
    /// This request follows before the call is over.
    Then(Call<'static, T>),
}

type Finish<T> = Box<dyn FnOnce(&mut State, Option<Reply>) -> Result<Next<T>> + Send>;
type Before<'a> = Box<dyn FnOnce(&mut State) -> Result<()> + Send + 'a>;

/// The message a call sends.
enum Outbound<'a> {
    /// A request, encoded by the table's encoder (the one `decode` inverts).
    Request(Outgoing<'a>),
    /// The front-end's ack of a postcopy region answer: the request's code, a u64 0.
    PostcopyAck(FrontendReq),
}

/// One front-end request and what its answer means: the request to encode, the decoding
/// and checks of its reply, and the bookkeeping it does (negotiated features, postcopy
/// regions). Built by the functions of [`calls`]; run to its end by [`Frontend::run`]
/// (blocking) or by [`Frontend::start`] and [`Frontend::advance`] (an event loop waiting
/// for the socket), so both ways share one encoder and one decoder.
pub struct Call<'a, T> {
    message: Outbound<'a>,
    /// SET_MEM_TABLE and ADD_MEM_REG take their postcopy form while postcopy listens.
    postcopy_aware: bool,
    /// A check or bookkeeping step under the connection's lock, before the request goes.
    before: Option<Before<'a>>,
    finish: Finish<T>,
}

impl<T> std::fmt::Debug for Call<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &self.message {
            Outbound::Request(r) => r.kind().name(),
            Outbound::PostcopyAck(req) => req.name(),
        };
        f.debug_struct("Call").field("request", &name).finish()
    }
}

impl<'a, T: 'static> Call<'a, T> {
    fn chain(
        request: Outgoing<'a>,
        finish: impl FnOnce(&mut State, Option<Reply>) -> Result<Next<T>> + Send + 'static,
    ) -> Self {
        Call {
            message: Outbound::Request(request),
            postcopy_aware: false,
            before: None,
            finish: Box::new(finish),
        }
    }

    fn new(
        request: Outgoing<'a>,
        finish: impl FnOnce(&mut State, Option<Reply>) -> Result<T> + Send + 'static,
    ) -> Self {
        Self::chain(request, move |st, r| finish(st, r).map(Next::Done))
    }

    fn before(mut self, f: impl FnOnce(&mut State) -> Result<()> + Send + 'a) -> Self {
        self.before = Some(Box::new(f));
        self
    }

    /// The same call with its result checked by `f` (an error fails the call).
    fn chain_result<U: 'static>(
        self,
        f: impl FnOnce(T) -> Result<U> + Send + 'static,
    ) -> Call<'a, U> {
        let finish = self.finish;
        Call {
            message: self.message,
            postcopy_aware: self.postcopy_aware,
            before: self.before,
            finish: Box::new(move |st, r| {
                Ok(match finish(st, r)? {
                    Next::Done(t) => Next::Done(f(t)?),
                    Next::Then(next) => Next::Then(next.chain_result(f)),
                })
            }),
        }
    }

    /// The same call with its result passed through `f`.
    pub fn map<U: 'static>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Call<'a, U> {
        self.chain_result(move |t| Ok(f(t)))
    }
}

/// What [`Frontend::start`] returns.
#[derive(Debug)]
pub enum Started<T> {
    /// The call is over (it expected no answer).
    Done(T),
    /// Its request is sent; [`Frontend::advance`] takes the answer when the socket is readable.
    Waiting(Pending<T>),
}

/// A call whose request was sent and whose answer is awaited ([`Frontend::advance`]).
/// Dropping it unfinished does not close the connection: [`Frontend::abandon`] does.
pub struct Pending<T> {
    awaiting: Awaiting,
    partial: PartialMessage,
    finish: Option<Finish<T>>,
}

impl<T> Pending<T> {
    /// Whether the call is over (its result taken, or failed or abandoned).
    pub fn is_over(&self) -> bool {
        self.finish.is_none()
    }

    /// The name of the request whose answer is awaited.
    pub fn request(&self) -> &'static str {
        self.awaiting.req.name()
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("request", &self.awaiting.req.name())
            .field("over", &self.is_over())
            .finish()
    }
}

/// The answer a sent request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaited {
    Nothing,
    /// A REPLY_ACK ack (a u64 status).
    Ack,
    /// The request's own reply, of about this many body bytes (the read-ahead).
    Reply(usize),
    /// A postcopy region answer (no NEED_REPLY; carries no fds).
    Postcopy,
}

#[derive(Debug, Clone, Copy)]
struct Awaiting {
    req: FrontendReq,
    kind: Awaited,
    request_has_body: bool,
}

/// Decodes a reply body with `parse`; a malformed reply poisons the connection and is the
/// peer's fault ([`Error::InvalidReply`], never `InvalidParam`).
fn parsed<T>(
    st: &mut State,
    req: FrontendReq,
    body: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T>,
) -> Result<T> {
    parse(body).map_err(|e| {
        st.conn.poison();
        peer_fault(req, e)
    })
}

/// Poisons the connection and returns an [`Error::InvalidReply`] for `req`.
fn bad_reply(st: &mut State, req: FrontendReq, reason: String) -> Error {
    st.conn.poison();
    Error::InvalidReply {
        request: req.name(),
        reason,
    }
}

/// The reply of a request that has one (an ack where a reply was due is the peer's
/// mistake, caught by the size check before this).
fn need_reply(req: FrontendReq, reply: Option<Reply>) -> Result<Reply> {
    reply.ok_or_else(|| Error::ReplyMismatch(format!("{} expects a reply", req.name())))
}

/// A refusal when a status reply is not 0.
fn status_ok(req: FrontendReq, status: u64) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(Error::Refused {
            request: req.name(),
            status,
        })
    }
}

/// The calls of the front-end, one per request: each builds the request from the
/// arguments and says how to decode and check its answer. [`Frontend`]'s methods of the
/// same names run them blocking; an event loop starts and advances them.
pub mod calls {
    use super::*;

    fn vring_index(index: u32) -> Result<u8> {
        u8::try_from(index)
            .map_err(|_| Error::InvalidParam(format!("vring index {index} exceeds 255")))
    }

    /// A request whose only answer is an ack (or nothing without REPLY_ACK).
    fn unit(request: Outgoing<'_>) -> Call<'_, ()> {
        Call::new(request, |_, _| Ok(()))
    }

    /// A request answered by a u64, decoded; `note` records it under the same lock (one
    /// lock per call on the hot path, and no window between reply and bookkeeping).
    fn u64_then(
        request: Outgoing<'static>,
        note: impl FnOnce(&mut Negotiated, u64) + Send + 'static,
    ) -> Call<'static, u64> {
        let req = request.kind();
        Call::new(request, move |st, r| {
            let r = need_reply(req, r)?;
            let value = U64Payload::from_bytes(&r.body)
                .inspect_err(|_| st.conn.poison())?
                .0;
            note(&mut st.neg, value);
            Ok(value)
        })
    }

    /// A request answered by a u64 status, a refusal when not 0.
    fn status(request: Outgoing<'static>) -> Call<'static, ()> {
        let req = request.kind();
        u64_then(request, |_, _| {}).chain_result(move |status| status_ok(req, status))
    }

    /// GET_FEATURES: the virtio and vhost-user features the back-end offers (kept as
    /// the offer, for a caller that reports it).
    pub fn get_features() -> Call<'static, u64> {
        u64_then(R::GetFeatures, |neg, f| neg.offered_features = Some(f))
    }

    /// SET_FEATURES: remembered as acked, so later requests are gated on it.
    pub fn set_features(features: u64) -> Call<'static, ()> {
        Call::new(R::SetFeatures(features), move |st, _| {
            st.neg.acked_features = features;
            Ok(())
        })
    }

    /// SET_OWNER.
    pub fn set_owner() -> Call<'static, ()> {
        unit(R::SetOwner)
    }

    /// RESET_OWNER.
    pub fn reset_owner() -> Call<'static, ()> {
        unit(R::ResetOwner)
    }

    /// SET_MEM_TABLE. While postcopy listens it takes QEMU's postcopy form: the request
    /// goes without NEED_REPLY; the back-end answers with the same table carrying the
    /// addresses at which it mapped each region (for the front-end's fault handling); the
    /// front-end then acks with a SET_MEM_TABLE message holding a u64 0, after which the
    /// back-end may start faulting. The back-end's addresses are kept for
    /// [`Frontend::postcopy_regions`].
    pub fn set_mem_table<'a>(regions: &[(RegionInfo, BorrowedFd<'a>)]) -> Call<'a, ()> {
        let request = R::SetMemTable {
            table: MemTable {
                regions: regions.iter().map(|(info, _)| mem_region(info)).collect(),
            },
            fds: regions.iter().map(|(_, fd)| *fd).collect(),
        };
        let gpas: Vec<u64> = regions.iter().map(|(i, _)| i.guest_phys_addr).collect();
        let mut call = Call::chain(request, move |st, r| {
            let Some(r) = r.filter(|_| st.neg.postcopy_listening) else {
                return Ok(Next::Done(()));
            };
            let reply = parsed(st, FrontendReq::SetMemTable, &r.body, MemTable::from_bytes)?;
            if !reply.regions.iter().map(|r| r.guest_phys_addr).eq(gpas) {
                st.conn.poison();
                return Err(Error::ReplyMismatch(
                    "postcopy SET_MEM_TABLE reply describes other regions".into(),
                ));
            }
            st.postcopy_regions = reply.regions.iter().map(postcopy_region).collect();
            Ok(Next::Then(postcopy_ack(FrontendReq::SetMemTable)))
        });
        call.postcopy_aware = true;
        call
    }

    /// The front-end's ack of a postcopy region answer.
    fn postcopy_ack(req: FrontendReq) -> Call<'static, ()> {
        Call {
            message: Outbound::PostcopyAck(req),
            postcopy_aware: false,
            before: None,
            finish: Box::new(|_, _| Ok(Next::Done(()))),
        }
    }

    /// SET_LOG_BASE with the shared-memory log (LOG_SHMFD). The reply only says "done":
    /// its u64 is not a status. libvhost-user (and so qemu-storage-daemon) echoes
    /// mmap_size in it, and QEMU ignores it.
    pub fn set_log_base(mmap_size: u64, mmap_offset: u64, fd: BorrowedFd<'_>) -> Call<'_, ()> {
        let log = LogDesc {
            mmap_size,
            mmap_offset,
        };
        Call::new(R::SetLogBase { log, fd }, |_, r| {
            need_reply(FrontendReq::SetLogBase, r).map(drop)
        })
    }

    /// SET_LOG_FD.
    pub fn set_log_fd(fd: BorrowedFd<'_>) -> Call<'_, ()> {
        unit(R::SetLogFd(fd))
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(index: u32, num: u32) -> Call<'static, ()> {
        unit(R::SetVringNum(VringState { index, num }))
    }

    /// SET_VRING_ADDR, after the spec's alignment rules are checked.
    pub fn set_vring_addr(addrs: &VringAddrs) -> Result<Call<'static, ()>> {
        addrs.check().map_err(|e| Error::InvalidParam(e.into()))?;
        Ok(unit(R::SetVringAddr(*addrs)))
    }

    /// SET_VRING_BASE.
    pub fn set_vring_base(index: u32, base: u32) -> Call<'static, ()> {
        unit(R::SetVringBase(VringState { index, num: base }))
    }

    /// GET_VRING_BASE: an answer for another ring closes the connection.
    pub fn get_vring_base(index: u32) -> Call<'static, u32> {
        const REQ: FrontendReq = FrontendReq::GetVringBase;
        Call::new(
            R::GetVringBase(VringState { index, num: 0 }),
            move |st, r| {
                let r = need_reply(REQ, r)?;
                let state = parsed(st, REQ, &r.body, VringState::from_bytes)?;
                if state.index != index {
                    st.conn.poison();
                    return Err(Error::ReplyMismatch(format!(
                        "GET_VRING_BASE for ring {index} answered for ring {}",
                        state.index
                    )));
                }
                Ok(state.num)
            },
        )
    }

    /// SET_VRING_KICK (`None`: NOFD).
    pub fn set_vring_kick(index: u32, fd: Option<BorrowedFd<'_>>) -> Result<Call<'_, ()>> {
        let index = vring_index(index)?;
        Ok(unit(R::SetVringKick { index, fd }))
    }

    /// SET_VRING_CALL (`None`: NOFD).
    pub fn set_vring_call(index: u32, fd: Option<BorrowedFd<'_>>) -> Result<Call<'_, ()>> {
        let index = vring_index(index)?;
        Ok(unit(R::SetVringCall { index, fd }))
    }

    /// SET_VRING_ERR (`None` detaches it).
    pub fn set_vring_err(index: u32, fd: Option<BorrowedFd<'_>>) -> Result<Call<'_, ()>> {
        let index = vring_index(index)?;
        Ok(unit(R::SetVringErr { index, fd }))
    }

    /// GET_PROTOCOL_FEATURES (kept as the offer).
    pub fn get_protocol_features() -> Call<'static, u64> {
        u64_then(R::GetProtocolFeatures, |neg, f| {
            neg.offered_protocol = Some(f)
        })
    }

    /// SET_PROTOCOL_FEATURES: bits the back-end never offered are refused before
    /// anything is sent; remembered as acked.
    pub fn set_protocol_features(features: u64) -> Call<'static, ()> {
        Call::new(R::SetProtocolFeatures(features), move |st, _| {
            st.neg.acked_protocol = features;
            Ok(())
        })
        .before(move |st| match st.neg.offered_protocol {
            Some(offered) if features & !offered != 0 => Err(Error::InvalidParam(format!(
                "protocol features {:#x} were not offered by the back-end",
                features & !offered
            ))),
            _ => Ok(()),
        })
    }

    /// GET_QUEUE_NUM.
    pub fn get_queue_num() -> Call<'static, u64> {
        u64_then(R::GetQueueNum, |_, _| {})
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(index: u32, enable: bool) -> Call<'static, ()> {
        unit(R::SetVringEnable(VringState {
            index,
            num: u32::from(enable),
        }))
    }

    /// SET_VRING_ENDIAN.
    pub fn set_vring_endian(index: u32, big_endian: bool) -> Call<'static, ()> {
        unit(R::SetVringEndian(VringState {
            index,
            num: u32::from(big_endian),
        }))
    }

    /// VRING_KICK (in-band).
    pub fn vring_kick(index: u32) -> Call<'static, ()> {
        unit(R::VringKick(VringState { index, num: 0 }))
    }

    /// GET_CONFIG: the reply must answer exactly what was asked.
    pub fn get_config(offset: u32, size: u32, flags: u32) -> Call<'static, Vec<u8>> {
        const REQ: FrontendReq = FrontendReq::GetConfig;
        let request = ConfigPayload {
            offset,
            size,
            flags,
            data: vec![0; size as usize],
        };
        Call::new(R::GetConfig(request.clone()), move |st, r| {
            let r = need_reply(REQ, r)?;
            let reply = parsed(st, REQ, &r.body, ConfigPayload::from_bytes)?;
            reply
                .check_reply_for(&request)
                .inspect_err(|_| st.conn.poison())?;
            Ok(reply.data)
        })
    }

    /// SET_CONFIG.
    pub fn set_config(offset: u32, data: &[u8], flags: u32) -> Result<Call<'static, ()>> {
        let size = u32::try_from(data.len())
            .map_err(|_| Error::InvalidParam("config data too large".into()))?;
        Ok(unit(R::SetConfig(ConfigPayload {
            offset,
            size,
            flags,
            data: data.to_vec(),
        })))
    }

    /// SET_BACKEND_REQ_FD with `far`, the back-end's end of a socketpair; the call's
    /// result is the channel on `near`.
    pub fn set_backend_req_fd(near: UnixStream, far: BorrowedFd<'_>) -> Call<'_, FrontendChannel> {
        Call::new(R::SetBackendReqFd(far), move |st, _| {
            Ok(FrontendChannel::new(near, st.neg.acked_protocol))
        })
    }

    /// GET_INFLIGHT_FD. The reply is checked before it is returned, since the caller maps
    /// it: the geometry asked for, a size that is neither 0 nor more than such an area can
    /// take ([`InflightDesc::max_mmap_size`]), and an fd that is a regular file (a memfd)
    /// holding `mmap_offset + mmap_size` bytes. Anything else is [`Error::InvalidReply`].
    pub fn get_inflight_fd(
        num_queues: u16,
        queue_size: u16,
    ) -> Call<'static, (InflightDesc, OwnedFd)> {
        const REQ: FrontendReq = FrontendReq::GetInflightFd;
        let asked = InflightDesc {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        Call::new(R::GetInflightFd(asked), move |st, r| {
            let r = need_reply(REQ, r)?;
            let desc = parsed(st, REQ, &r.body, InflightDesc::from_bytes)?;
            let Some(fd) = r.fd else {
                st.conn.poison();
                return Err(Error::FdCount {
                    request: "GET_INFLIGHT_FD",
                    expected: "1 in the reply",
                    got: 0,
                });
            };
            if (desc.num_queues, desc.queue_size) != (num_queues, queue_size) {
                return Err(bad_reply(
                    st,
                    REQ,
                    format!(
                        "asked for {num_queues} queues of {queue_size}, got {} of {}",
                        desc.num_queues, desc.queue_size
                    ),
                ));
            }
            let max = InflightDesc::max_mmap_size(num_queues, queue_size);
            if desc.mmap_size == 0 || desc.mmap_size > max {
                return Err(bad_reply(
                    st,
                    REQ,
                    format!(
                        "mmap size {:#x}, expected 1 to {max:#x} for {num_queues} queues of {queue_size}",
                        desc.mmap_size
                    ),
                ));
            }
            let file = std::fs::File::from(fd);
            let meta = match file.metadata() {
                Ok(meta) => meta,
                Err(e) => return Err(bad_reply(st, REQ, format!("fstat of its fd failed: {e}"))),
            };
            if !meta.file_type().is_file() {
                return Err(bad_reply(
                    st,
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
                    return Err(bad_reply(
                        st,
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
        })
    }

    /// SET_INFLIGHT_FD.
    pub fn set_inflight_fd<'a>(desc: &InflightDesc, fd: BorrowedFd<'a>) -> Call<'a, ()> {
        unit(R::SetInflightFd { desc: *desc, fd })
    }

    /// GET_MAX_MEM_SLOTS.
    pub fn get_max_mem_slots() -> Call<'static, u64> {
        u64_then(R::GetMaxMemSlots, |_, _| {})
    }

    /// ADD_MEM_REG. While postcopy listens, QEMU's postcopy form: no NEED_REPLY; the
    /// back-end answers with the region carrying its own address for it; then the ack
    /// (the same code, a u64 0).
    pub fn add_mem_region<'a>(info: &RegionInfo, fd: BorrowedFd<'a>) -> Call<'a, ()> {
        const REQ: FrontendReq = FrontendReq::AddMemReg;
        let gpa = info.guest_phys_addr;
        let request = R::AddMemReg {
            region: mem_region(info),
            fd,
        };
        let mut call = Call::chain(request, move |st, r| {
            let Some(r) = r.filter(|_| st.neg.postcopy_listening) else {
                return Ok(Next::Done(()));
            };
            let reply = parsed(st, REQ, &r.body, SingleMemRegion::from_bytes)?;
            if reply.region.guest_phys_addr != gpa {
                st.conn.poison();
                return Err(Error::ReplyMismatch(format!(
                    "postcopy ADD_MEM_REG reply for guest {gpa:#x} answers guest {:#x}",
                    reply.region.guest_phys_addr
                )));
            }
            st.postcopy_regions.push(postcopy_region(&reply.region));
            Ok(Next::Then(postcopy_ack(REQ)))
        });
        call.postcopy_aware = true;
        call
    }

    /// REM_MEM_REG (forgets the back-end's postcopy address of the region).
    pub fn remove_mem_region(info: &RegionInfo) -> Call<'static, ()> {
        let gpa = info.guest_phys_addr;
        Call::new(R::RemMemReg(mem_region(info)), move |st, _| {
            if st.neg.postcopy_listening {
                st.postcopy_regions.retain(|r| r.guest_phys_addr != gpa);
            }
            Ok(())
        })
    }

    /// RESET_DEVICE.
    pub fn reset_device() -> Call<'static, ()> {
        unit(R::ResetDevice)
    }

    /// SET_STATUS.
    pub fn set_status(status: u8) -> Call<'static, ()> {
        unit(R::SetStatus(u64::from(status)))
    }

    /// GET_STATUS: a value above 8 bits closes the connection.
    pub fn get_status() -> Call<'static, u8> {
        const REQ: FrontendReq = FrontendReq::GetStatus;
        Call::new(R::GetStatus, |st, r| {
            let r = need_reply(REQ, r)?;
            let v = U64Payload::from_bytes(&r.body)
                .inspect_err(|_| st.conn.poison())?
                .0;
            u8::try_from(v).map_err(|_| {
                st.conn.poison();
                Error::ReplyMismatch(format!("GET_STATUS returned {v:#x}, wider than a byte"))
            })
        })
    }

    /// NET_SET_MTU.
    pub fn net_set_mtu(mtu: u64) -> Call<'static, ()> {
        unit(R::NetSetMtu(mtu))
    }

    /// SEND_RARP.
    pub fn send_rarp(mac: [u8; 6]) -> Call<'static, ()> {
        unit(R::SendRarp(mac))
    }

    /// GPU_SET_SOCKET.
    pub fn gpu_set_socket(fd: BorrowedFd<'_>) -> Call<'_, ()> {
        unit(R::GpuSetSocket(fd))
    }

    /// IOTLB_MSG: the back-end's status, a refusal when not 0.
    pub fn iotlb_msg(msg: &IotlbPayload) -> Call<'static, ()> {
        const REQ: FrontendReq = FrontendReq::IotlbMsg;
        Call::new(R::IotlbMsg(*msg), |st, r| {
            let r = need_reply(REQ, r)?;
            let status = parsed(st, REQ, &r.body, |b| U64Payload::from_bytes(b).map(|p| p.0))?;
            status_ok(REQ, status)
        })
    }

    /// GET_SHARED_OBJECT: the dma-buf fd of a shared object.
    pub fn get_shared_object(uuid: [u8; 16]) -> Call<'static, OwnedFd> {
        const REQ: FrontendReq = FrontendReq::GetSharedObject;
        Call::new(R::GetSharedObject(SharedObjectUuid(uuid)), |st, r| {
            let r = need_reply(REQ, r)?;
            let status = parsed(st, REQ, &r.body, |b| U64Payload::from_bytes(b).map(|p| p.0))?;
            status_ok(REQ, status)?;
            r.fd.ok_or(Error::FdCount {
                request: "GET_SHARED_OBJECT",
                expected: "1 in the reply",
                got: 0,
            })
        })
    }

    /// SET_DEVICE_STATE_FD: the back-end's own pipe end if it provides one (no NOFD).
    pub fn set_device_state_fd(
        direction: u32,
        phase: u32,
        fd: BorrowedFd<'_>,
    ) -> Call<'_, Option<OwnedFd>> {
        const REQ: FrontendReq = FrontendReq::SetDeviceStateFd;
        let transfer = DeviceStateTransfer { direction, phase };
        Call::new(R::SetDeviceStateFd { transfer, fd }, |st, r| {
            let r = need_reply(REQ, r)?;
            let v = parsed(st, REQ, &r.body, |b| U64Payload::from_bytes(b).map(|p| p.0))?;
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
                    st.conn.poison();
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
        })
    }

    /// GET_SHMEM_CONFIG.
    pub fn get_shmem_config() -> Call<'static, ShmemConfig> {
        const REQ: FrontendReq = FrontendReq::GetShmemConfig;
        Call::new(R::GetShmemConfig, |st, r| {
            let r = need_reply(REQ, r)?;
            parsed(st, REQ, &r.body, ShmemConfig::from_bytes)
        })
    }

    /// CHECK_DEVICE_STATE: a refusal when the transfer failed.
    pub fn check_device_state() -> Call<'static, ()> {
        status(R::CheckDeviceState)
    }

    /// POSTCOPY_ADVISE: the back-end's userfaultfd.
    pub fn postcopy_advise() -> Call<'static, OwnedFd> {
        Call::new(R::PostcopyAdvise, |_, r| {
            need_reply(FrontendReq::PostcopyAdvise, r)?
                .fd
                .ok_or(Error::FdCount {
                    request: "POSTCOPY_ADVISE",
                    expected: "1 in the reply",
                    got: 0,
                })
        })
    }

    /// POSTCOPY_LISTEN: from its answer on, SET_MEM_TABLE and ADD_MEM_REG take the
    /// postcopy form.
    pub fn postcopy_listen() -> Call<'static, ()> {
        Call::new(R::PostcopyListen, |st, _| {
            st.neg.postcopy_listening = true;
            Ok(())
        })
    }

    /// POSTCOPY_END: the back-end leaves postcopy whatever its status says, so the
    /// front-end does too, before sending it.
    pub fn postcopy_end() -> Call<'static, ()> {
        status(R::PostcopyEnd).before(|st| {
            st.neg.postcopy_listening = false;
            st.postcopy_regions.clear();
            Ok(())
        })
    }

    /// CREATE_CRYPTO_SESSION: opaque parameters in, opaque description out.
    pub fn create_crypto_session(params: &[u8]) -> Call<'static, Vec<u8>> {
        Call::new(R::CreateCryptoSession(params.to_vec()), |_, r| {
            Ok(need_reply(FrontendReq::CreateCryptoSession, r)?.body)
        })
    }

    /// CLOSE_CRYPTO_SESSION.
    pub fn close_crypto_session(session_id: u64) -> Call<'static, ()> {
        unit(R::CloseCryptoSession(session_id))
    }

    /// The usual opening: GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES (when the
    /// back-end offers `VHOST_USER_F_PROTOCOL_FEATURES`), SET_FEATURES, as one call whose
    /// result is what was acked: `(features, protocol features)`.
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
    pub fn negotiate(opts: &NegotiateOptions) -> Result<Call<'static, (u64, u64)>> {
        use super::super::codes::VHOST_F_LOG_ALL;
        use crate::vring::features as ring;

        let opts = *opts;
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
        Ok(Call::chain(R::GetFeatures, move |st, r| {
            let r = need_reply(FrontendReq::GetFeatures, r)?;
            let offered = U64Payload::from_bytes(&r.body)
                .inspect_err(|_| st.conn.poison())?
                .0;
            st.neg.offered_features = Some(offered);
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
            let finish =
                move |acked_proto: u64| set_features(acked).map(move |()| (acked, acked_proto));
            let after_owner = if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                get_protocol_features().then(move |proto| {
                    let acked_proto = proto & proto_mask;
                    set_protocol_features(acked_proto).then(move |()| finish(acked_proto))
                })
            } else {
                finish(0)
            };
            Ok(Next::Then(set_owner().then(move |()| after_owner)))
        }))
    }

    /// SET_MEM_TABLE from the `VhostBackend` interface's regions: each must have its fd
    /// (vhost-user shares memory by fd).
    pub fn set_mem_table_of<'a>(regions: &[MemoryRegion<'a>]) -> Result<Call<'a, ()>> {
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
        Ok(set_mem_table(&table))
    }

    /// SET_LOG_BASE from the `VhostBackend` interface's arguments: vhost-user logs through
    /// a shared-memory region (LOG_SHMFD) at base 0.
    pub fn set_log_base_of(base: u64, region: Option<LogRegion<'_>>) -> Result<Call<'_, ()>> {
        let Some(log) = region else {
            return Err(Error::InvalidParam(
                "vhost-user logs through shared memory (LOG_SHMFD): pass a log region".into(),
            ));
        };
        if base != 0 {
            return Err(Error::InvalidParam(
                "vhost-user log base must be 0; the region's mmap_offset says where".into(),
            ));
        }
        Ok(set_log_base(log.mmap_size, log.mmap_offset, log.fd))
    }

    /// SET_LOG_FD from the `VhostBackend` interface's argument (an fd is required).
    pub fn set_log_fd_of(fd: Option<BorrowedFd<'_>>) -> Result<Call<'_, ()>> {
        let fd = fd.ok_or_else(|| Error::InvalidParam("SET_LOG_FD needs an fd".into()))?;
        Ok(set_log_fd(fd))
    }

    impl<T: Send + 'static> Call<'static, T> {
        /// This call, then the call `next` makes of its result.
        fn then<U: 'static>(
            self,
            next: impl FnOnce(T) -> Call<'static, U> + Send + 'static,
        ) -> Call<'static, U> {
            let finish = self.finish;
            Call {
                message: self.message,
                postcopy_aware: self.postcopy_aware,
                before: self.before,
                finish: Box::new(move |st, r| {
                    Ok(match finish(st, r)? {
                        Next::Done(t) => Next::Then(next(t)),
                        Next::Then(more) => Next::Then(more.then(next)),
                    })
                }),
            }
        }
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
        Ok(self.run(calls::set_mem_table_of(regions)?)?)
    }
    fn set_log_base(&self, base: u64, region: Option<LogRegion<'_>>) -> crate::Result<()> {
        Ok(self.run(calls::set_log_base_of(base, region)?)?)
    }
    fn set_log_fd(&self, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        Ok(self.run(calls::set_log_fd_of(fd)?)?)
    }
});
