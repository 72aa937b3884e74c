//! The back-end request channel (SET_BACKEND_REQ_FD): a second socket on which the
//! back-end sends requests to the front-end (the seed's `Slave`/`SlaveFsCacheReq` on the
//! sending side, `MasterReqHandler` on the receiving side).
//!
//! A protocol error on this channel closes only the channel; the main connection is a
//! different socket and is untouched (H5).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use super::codes::{protocol_features as pf, BackendReq};
use super::connection::{map_io, Connection};
use super::header::Header;
use super::message::BackendRequest;
use super::payload::{
    IotlbPayload, SharedObjectUuid, ShmemMapPayload, U64Payload, VringArea, VringState,
    SHMEM_MAP_FLAG_RW,
};
use super::{Error, Result};
use crate::sys::scm;

/// A back-end request to send, with borrowed fds.
type Outgoing<'a> = BackendRequest<BorrowedFd<'a>>;

/// Which protocol feature a back-end request needs before a front-end accepts it (H1),
/// with its name: the table's gate.
fn required_feature(code: BackendReq) -> Option<(u64, &'static str)> {
    code.required_protocol_feature()
        .map(|bit| (bit, pf::name(bit).unwrap_or("a protocol feature")))
}

/// The back-end's sending end.
#[derive(Debug)]
pub struct BackendChannel {
    conn: Mutex<Connection>,
    acked_protocol: u64,
}

impl BackendChannel {
    /// The back-end's end of the channel the front-end gave with SET_BACKEND_REQ_FD; each request
    /// is checked against `acked_protocol` before it is sent. Sends are bounded by
    /// `DEFAULT_TIMEOUT` until [`set_timeout`](Self::set_timeout).
    pub fn new(sock: UnixStream, acked_protocol: u64) -> Self {
        let conn = Connection::new(sock);
        // A front-end that never answers must not wedge a device thread forever.
        let _ = conn.set_timeout(Some(super::frontend::DEFAULT_TIMEOUT));
        BackendChannel {
            conn: Mutex::new(conn),
            acked_protocol,
        }
    }

    /// Bounds each send and each ack wait; `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.lock().set_timeout(timeout)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        match self.conn.lock() {
            Ok(g) => g,
            Err(p) => {
                let mut g = p.into_inner();
                g.poison();
                g
            }
        }
    }

    /// Refuses, before anything is sent, a request the front-end did not ack the
    /// protocol feature of.
    fn check_feature(&self, code: BackendReq) -> Result<()> {
        match required_feature(code) {
            Some((bit, name)) if self.acked_protocol & bit == 0 => Err(Error::InactiveFeature {
                request: code.name(),
                feature: name,
            }),
            _ => Ok(()),
        }
    }

    /// Sends `request` (checked first with the rules its receiver applies); with
    /// REPLY_ACK negotiated (or when the request has a reply of its own) waits for the
    /// front-end's u64 answer and returns it.
    pub fn send<F: AsFd>(&self, request: &BackendRequest<F>) -> Result<u64> {
        self.send_for_fd(request).map(|(status, _)| status)
    }

    /// Like [`send`](Self::send), and also returns the fd a reply may carry: only the
    /// dma-buf of a successful SHARED_OBJECT_LOOKUP (the spec's "fd and u64").
    pub fn send_for_fd<F: AsFd>(
        &self,
        request: &BackendRequest<F>,
    ) -> Result<(u64, Option<OwnedFd>)> {
        // The request's own rules first (a bad argument is the caller's), then the gate.
        request.check()?;
        let code = request.kind();
        self.check_feature(code)?;
        let inherent = code.has_reply();
        let want_reply = inherent || self.acked_protocol & pf::REPLY_ACK != 0;
        let body = request.encode_body();
        let header = Header::request(code.code(), body.len() as u32, want_reply);
        let mut conn = self.lock();
        conn.send(&header, &body, &request.fds())?;
        if !want_reply {
            return Ok((0, None));
        }
        let expected = code.spec().reply.expected_size(body.len());
        let mut msg = conn.recv_reply(code.name(), expected, !body.is_empty(), |h| {
            h.check_reply_to(code.code())
        })?;
        let status = U64Payload::from_bytes(&msg.body)
            .inspect_err(|_| conn.poison())?
            .0;
        // A successful lookup carries the dma-buf; no other reply carries an fd, and a
        // failed lookup sends none.
        let allowed = usize::from(code.reply_allows_fd() && status == 0);
        if msg.fds.len() > allowed {
            conn.poison();
            return Err(Error::FdCount {
                request: code.name(),
                expected: if allowed == 1 {
                    "at most 1 in the reply"
                } else {
                    "0 in the reply"
                },
                got: msg.fds.len(),
            });
        }
        if status != 0 && !inherent {
            return Err(Error::Refused {
                request: code.name(),
                status,
            });
        }
        Ok((status, msg.fds.pop()))
    }

    fn send_ok(&self, request: &Outgoing<'_>) -> Result<()> {
        self.send(request).map(|_| ())
    }

    /// CONFIG_CHANGE_MSG: the config space changed (a resize); the driver re-reads it.
    pub fn config_change(&self) -> Result<()> {
        self.send_ok(&BackendRequest::ConfigChangeMsg)
    }

    /// VRING_CALL: the in-band call of queue `index`, acked when REPLY_ACK is on.
    pub fn vring_call(&self, index: u32) -> Result<()> {
        self.send_ok(&BackendRequest::VringCall(VringState { index, num: 0 }))
    }

    /// VRING_ERR: queue `index` hit an error, acked when REPLY_ACK is on.
    pub fn vring_err(&self, index: u32) -> Result<()> {
        self.send_ok(&BackendRequest::VringErr(VringState { index, num: 0 }))
    }

    /// VRING_CALL without asking for an ack, whatever REPLY_ACK says: the in-band form of
    /// a call eventfd write, for a queue worker that must not wait on the front-end while
    /// it holds its ring (the spec lets the sender set NEED_REPLY per message).
    pub fn signal_used(&self, index: u32) -> Result<()> {
        self.post(&BackendRequest::VringCall(VringState { index, num: 0 }))
    }

    /// VRING_ERR without asking for an ack (see [`signal_used`](Self::signal_used)).
    pub fn signal_error(&self, index: u32) -> Result<()> {
        self.post(&BackendRequest::VringErr(VringState { index, num: 0 }))
    }

    /// Sends a request that wants no answer (the same encoder as `send`).
    fn post(&self, request: &Outgoing<'_>) -> Result<()> {
        let code = request.kind();
        self.check_feature(code)?;
        let body = request.encode_body();
        let header = Header::request(code.code(), body.len() as u32, false);
        self.lock().send(&header, &body, &request.fds())
    }

    /// SHARED_OBJECT_ADD: announces an object the back-end exports under `uuid`.
    pub fn shared_object_add(&self, uuid: [u8; 16]) -> Result<()> {
        self.send_ok(&BackendRequest::SharedObjectAdd(SharedObjectUuid(uuid)))
    }

    /// SHARED_OBJECT_REMOVE: withdraws it.
    pub fn shared_object_remove(&self, uuid: [u8; 16]) -> Result<()> {
        self.send_ok(&BackendRequest::SharedObjectRemove(SharedObjectUuid(uuid)))
    }

    /// Returns the front-end's answer: 0 when it found the object (its dma-buf fd, if
    /// the front-end sent one, is closed: see [`shared_object_lookup_fd`](Self::shared_object_lookup_fd)).
    pub fn shared_object_lookup(&self, uuid: [u8; 16]) -> Result<u64> {
        self.shared_object_lookup_fd(uuid).map(|(status, _)| status)
    }

    /// The front-end's answer and, when it found the object, the dma-buf fd it sent.
    pub fn shared_object_lookup_fd(&self, uuid: [u8; 16]) -> Result<(u64, Option<OwnedFd>)> {
        let request: Outgoing<'_> = BackendRequest::SharedObjectLookup(SharedObjectUuid(uuid));
        self.send_for_fd(&request)
    }

    /// IOTLB_MSG: a translation miss (or access failure) the front-end must answer with an update.
    pub fn iotlb_msg(&self, msg: &IotlbPayload) -> Result<()> {
        self.send_ok(&BackendRequest::IotlbMsg(*msg))
    }

    /// IOTLB_MSG without asking for an ack, whatever REPLY_ACK says: how a queue worker
    /// reports a miss. The answer that matters is the front-end's IOTLB update on the
    /// session's socket, which the worker waits for (bounded) without holding the channel.
    pub fn post_iotlb_msg(&self, msg: &IotlbPayload) -> Result<()> {
        self.post(&BackendRequest::IotlbMsg(*msg))
    }

    /// Maps `len` bytes of `fd` at `fd_offset` into the device's shared memory region
    /// `shmid` at `shm_offset` (SHMEM_MAP). This is the spec's successor of the seed's
    /// virtio-fs `FS_MAP`: the DAX cache window is shared memory region 0.
    pub fn shmem_map(
        &self,
        shmid: u8,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
        writable: bool,
        fd: BorrowedFd<'_>,
    ) -> Result<()> {
        let map = ShmemMapPayload {
            shmid,
            fd_offset,
            shm_offset,
            len,
            flags: if writable { SHMEM_MAP_FLAG_RW } else { 0 },
        };
        self.send_ok(&BackendRequest::ShmemMap { map, fd })
    }

    /// Unmaps [shm_offset, shm_offset+len) of region `shmid` (SHMEM_UNMAP; the seed's
    /// `FS_UNMAP`).
    pub fn shmem_unmap(&self, shmid: u8, shm_offset: u64, len: u64) -> Result<()> {
        let map = ShmemMapPayload {
            shmid,
            fd_offset: 0,
            shm_offset,
            len,
            flags: 0,
        };
        self.send_ok(&BackendRequest::ShmemUnmap(map))
    }

    /// VRING_HOST_NOTIFIER_MSG: `size` bytes at `offset` of `fd` are queue `index`'s doorbell
    /// page; `None` withdraws it.
    pub fn vring_host_notifier(
        &self,
        index: u8,
        size: u64,
        offset: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let area = VringArea {
            index,
            nofd: fd.is_none(),
            size,
            offset,
        };
        self.send_ok(&BackendRequest::VringHostNotifierMsg { area, fd })
    }
}

/// One method per back-end request; defaults refuse (the front-end answers a NACK).
#[allow(unused_variables)]
pub trait FrontendReqHandler {
    /// CONFIG_CHANGE_MSG; the result is the REPLY_ACK status (0 = success).
    fn config_change(&mut self) -> Result<u64> {
        Err(Error::NotSupported("CONFIG_CHANGE_MSG"))
    }
    /// VRING_HOST_NOTIFIER_MSG, with the doorbell page's fd unless `area` says none.
    fn vring_host_notifier(&mut self, area: &VringArea, fd: Option<OwnedFd>) -> Result<u64> {
        Err(Error::NotSupported("VRING_HOST_NOTIFIER_MSG"))
    }
    /// VRING_CALL: the in-band call of queue `index`.
    fn vring_call(&mut self, index: u32) -> Result<u64> {
        Err(Error::NotSupported("VRING_CALL"))
    }
    /// VRING_ERR: queue `index` hit an error.
    fn vring_err(&mut self, index: u32) -> Result<u64> {
        Err(Error::NotSupported("VRING_ERR"))
    }
    /// IOTLB_MSG: a miss or access failure to answer.
    fn iotlb_msg(&mut self, msg: &IotlbPayload) -> Result<u64> {
        Err(Error::NotSupported("IOTLB_MSG"))
    }
    /// SHARED_OBJECT_ADD: the back-end exports an object under `uuid`.
    fn shared_object_add(&mut self, uuid: [u8; 16]) -> Result<u64> {
        Err(Error::NotSupported("SHARED_OBJECT_ADD"))
    }
    /// SHARED_OBJECT_REMOVE: the back-end withdraws the object `uuid`.
    fn shared_object_remove(&mut self, uuid: [u8; 16]) -> Result<u64> {
        Err(Error::NotSupported("SHARED_OBJECT_REMOVE"))
    }
    /// SHMEM_MAP: map `fd` into a shared memory region as `map` says.
    fn shmem_map(&mut self, map: &ShmemMapPayload, fd: OwnedFd) -> Result<u64> {
        Err(Error::NotSupported("SHMEM_MAP"))
    }
    /// SHMEM_UNMAP: undo a SHMEM_MAP of the same range.
    fn shmem_unmap(&mut self, map: &ShmemMapPayload) -> Result<u64> {
        Err(Error::NotSupported("SHMEM_UNMAP"))
    }
    /// SHARED_OBJECT_LOOKUP of `uuid`: the status only (the next method also sends the fd).
    fn shared_object_lookup(&mut self, uuid: [u8; 16]) -> Result<u64> {
        Err(Error::NotSupported("SHARED_OBJECT_LOOKUP"))
    }
    /// The lookup with the dma-buf to send back on success (0); the default answers
    /// [`shared_object_lookup`](Self::shared_object_lookup) without an fd.
    fn shared_object_lookup_fd(&mut self, uuid: [u8; 16]) -> Result<(u64, Option<OwnedFd>)> {
        self.shared_object_lookup(uuid).map(|status| (status, None))
    }
    /// Any request the enum grows later (e.g. SHMEM_MAP/UNMAP): refused by default.
    fn other(&mut self, request: BackendRequest) -> Result<u64> {
        Err(Error::NotSupported(request.kind().name()))
    }
}

/// The front-end's receiving end of the channel.
#[derive(Debug)]
pub struct FrontendChannel {
    conn: Connection,
    acked_protocol: u64,
}

/// A received back-end request, validated, with the header needed to answer it.
#[derive(Debug)]
pub struct ChannelIncoming {
    /// The header, to answer REPLY_ACK.
    pub header: Header,
    /// The decoded request.
    pub request: BackendRequest,
}

/// An answer [`FrontendChannel::dispatch`] decided on, for [`FrontendChannel::send_ack`]
/// to send (with no handler running, so a caller can release whatever the handler needed).
#[derive(Debug)]
pub struct PendingAck {
    header: Header,
    status: u64,
    fd: Option<OwnedFd>,
}

impl FrontendChannel {
    /// The channel waits for the back-end's next request without a bound, but a request
    /// that has started to arrive, and every ack sent, must complete within
    /// `DEFAULT_TIMEOUT` (`set_timeout` changes it): a back-end that floods requests and
    /// never reads the acks gets a timeout, not a front-end stuck in `send`.
    pub fn new(sock: UnixStream, acked_protocol: u64) -> Self {
        let conn = Connection::new(sock);
        let _ = conn.set_timeout(Some(super::frontend::DEFAULT_TIMEOUT));
        FrontendChannel {
            conn,
            acked_protocol,
        }
    }

    /// Bounds an ack's send and a request's arrival once it has started; `None` waits
    /// forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.conn.set_timeout(timeout)
    }

    /// The socket, for polling it beside other fds.
    pub fn socket(&self) -> &UnixStream {
        self.conn.socket()
    }

    /// True after an error that left the stream out of step.
    pub fn is_broken(&self) -> bool {
        self.conn.is_broken()
    }

    /// Blocks for the next back-end request (without a bound, in slices when an interrupt
    /// check is installed) and validates it (H1, H2).
    pub fn recv(&mut self) -> Result<ChannelIncoming> {
        if !self.conn.is_broken() {
            scm::wait_readable(self.conn.socket().as_fd(), None).map_err(map_io)?;
        }
        let msg = self.conn.recv(Header::check_request)?;
        let code = BackendReq::from_code(msg.header.code).ok_or_else(|| {
            self.conn.poison();
            Error::UnknownRequest(msg.header.code)
        })?;
        if let Some((bit, name)) = required_feature(code) {
            if self.acked_protocol & bit == 0 {
                self.conn.poison();
                return Err(Error::InactiveFeature {
                    request: code.name(),
                    feature: name,
                });
            }
        }
        let request =
            BackendRequest::decode(code, &msg.body, msg.fds).inspect_err(|_| self.conn.poison())?;
        Ok(ChannelIncoming {
            header: msg.header,
            request,
        })
    }

    /// Runs the handler and answers when the back-end asked for an answer. A refused
    /// request is NACKed (status 1) and reported; the channel stays usable.
    pub fn handle(
        &mut self,
        incoming: ChannelIncoming,
        handler: &mut dyn FrontendReqHandler,
    ) -> Result<()> {
        let (ack, result) = Self::dispatch(incoming, handler);
        self.send_ack(ack)?;
        result
    }

    /// Runs the handler on a request and decides the answer without sending it: the ack
    /// (status 1 for a refusal) when the back-end asked for one.
    pub fn dispatch(
        incoming: ChannelIncoming,
        handler: &mut dyn FrontendReqHandler,
    ) -> (Option<PendingAck>, Result<()>) {
        use BackendRequest as R;
        let ChannelIncoming { header, request } = incoming;
        let mut reply_fd: Option<OwnedFd> = None;
        let result = match request {
            R::ConfigChangeMsg => handler.config_change(),
            R::VringHostNotifierMsg { area, fd } => handler.vring_host_notifier(&area, fd),
            R::VringCall(s) => handler.vring_call(s.index),
            R::VringErr(s) => handler.vring_err(s.index),
            R::IotlbMsg(m) => handler.iotlb_msg(&m),
            R::SharedObjectAdd(u) => handler.shared_object_add(u.0),
            R::SharedObjectRemove(u) => handler.shared_object_remove(u.0),
            R::SharedObjectLookup(u) => {
                handler.shared_object_lookup_fd(u.0).map(|(status, fd)| {
                    // the spec: no fd when the lookup failed
                    reply_fd = if status == 0 { fd } else { None };
                    status
                })
            }
            R::ShmemMap { map, fd } => handler.shmem_map(&map, fd),
            R::ShmemUnmap(map) => handler.shmem_unmap(&map),
            #[allow(unreachable_patterns)]
            other => handler.other(other),
        };
        let ack = header.needs_reply().then(|| PendingAck {
            header,
            status: *result.as_ref().unwrap_or(&1),
            fd: reply_fd,
        });
        (ack, result.map(|_| ()))
    }

    /// Sends the answer `dispatch` decided on, if any.
    pub fn send_ack(&mut self, ack: Option<PendingAck>) -> Result<()> {
        let Some(PendingAck { header, status, fd }) = ack else {
            return Ok(());
        };
        let body = U64Payload(status).to_bytes();
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|fd| fd.as_fd()).collect();
        self.conn
            .send(&header.reply_to(body.len() as u32), &body, &fds)
    }

    /// recv + handle.
    pub fn handle_one(&mut self, handler: &mut dyn FrontendReqHandler) -> Result<()> {
        let incoming = self.recv()?;
        self.handle(incoming, handler)
    }
}

impl AsFd for FrontendChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.socket().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A front-end whose shared-object table holds one dma-buf (here: a socket end).
    struct Table {
        uuid: [u8; 16],
        object: UnixStream,
    }

    impl FrontendReqHandler for Table {
        fn shared_object_lookup_fd(&mut self, uuid: [u8; 16]) -> Result<(u64, Option<OwnedFd>)> {
            if uuid == self.uuid {
                Ok((0, Some(OwnedFd::from(self.object.try_clone()?))))
            } else {
                Ok((7, None))
            }
        }
    }

    #[test]
    fn shared_object_lookup_carries_the_dma_buf_fd() {
        for acked in [
            pf::BACKEND_REQ | pf::SHARED_OBJECT,
            pf::BACKEND_REQ | pf::SHARED_OBJECT | pf::REPLY_ACK,
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let (object, mut far) = UnixStream::pair().unwrap();
            let backend = BackendChannel::new(a, acked);
            let mut front = FrontendChannel::new(b, acked);
            let uuid = [0x5a; 16];
            let server = std::thread::spawn(move || {
                let mut table = Table { uuid, object };
                for _ in 0..3 {
                    front.handle_one(&mut table).unwrap();
                }
                front
            });
            // found: status 0 and the fd, which is the very object the front-end holds
            let (status, fd) = backend.shared_object_lookup_fd(uuid).unwrap();
            assert_eq!(status, 0);
            let mut got = UnixStream::from(fd.expect("the dma-buf fd"));
            got.write_all(b"via the looked-up fd").unwrap();
            let mut buf = [0u8; 20];
            far.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"via the looked-up fd");
            // not found: the status comes back as it is (not a refusal), and no fd
            let (status, fd) = backend.shared_object_lookup_fd([0; 16]).unwrap();
            assert_eq!((status, fd.is_none()), (7, true));
            // the fd-less form still works, and the channel is intact
            assert_eq!(backend.shared_object_lookup(uuid).unwrap(), 0);
            let front = server.join().unwrap();
            assert!(!front.is_broken());
        }
    }
}
