//! Request codes and feature bits of the vhost-user protocol.
//!
//! Values follow the vhost-user specification (QEMU `docs/interop/vhost-user.rst`) as of
//! QEMU master in 2026, which includes `GET_VRING_BASE_INFLIGHT` (protocol feature 20),
//! `GPA_ADDRESSES` (21), the VIRTIO Shared Memory Region messages (`SHMEM`, feature 22,
//! front-end request 44 and back-end requests 9 and 10).
//!
//! Every request is one line of a table (`request_table!` below): its code, name,
//! protocol-feature gate, reply, body type, fd rule and request value. The code enums,
//! their names and gates, the reply rules, [`RequestSpec`] (for tools), and the decoder,
//! encoder and local check of the request values ([`FrontendRequest`] /
//! [`BackendRequest`], defined beside their tables) all come from that line. Body
//! layouts are in [`payload`](super::payload), fd and value rules in
//! [`message`](super::message).
//!
//! A code that arrives from the peer is a plain `u32` until [`FrontendReq::from_code`] or
//! [`BackendReq::from_code`] accepts it: unknown values (0, gaps, `0xFFFF_FFFF`) never
//! become an enum (ADVERSARIAL A2).

/// virtio feature bit 30 (`VHOST_USER_F_PROTOCOL_FEATURES`): the back-end supports
/// `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES`, and rings start disabled.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// virtio feature bit 26 (`VHOST_F_LOG_ALL`): the front-end wants dirty-page logging.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Most regions a `SET_MEM_TABLE` carries in the baseline protocol
/// (`VHOST_MEMORY_BASELINE_NREGIONS` in QEMU, which never sends more). More regions need
/// `CONFIGURE_MEM_SLOTS` and `ADD_MEM_REG`.
pub const MAX_MEM_REGIONS_BASELINE: usize = 8;

/// Most regions one `SET_MEM_TABLE` may carry here, on both sides: rust-vmm's limit, so a
/// front-end built on it that sends more than QEMU's 8 is served. One fd per region
/// travels in one message, so it cannot exceed the fds a message may carry.
pub const MAX_MEM_TABLE_REGIONS: usize = 32;
const _: () = assert!(MAX_MEM_TABLE_REGIONS <= crate::sys::MAX_FDS);

/// Largest device config space a `GET_CONFIG` / `SET_CONFIG` can address: QEMU's
/// `VhostUserConfig` carries at most 256 bytes (`VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: u32 = 256;

/// Most fds one back-end request may carry (spec, "Back-end communication").
pub const MAX_BACKEND_REQ_FDS: usize = 8;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::message::{
    backend_iotlb, enable_flag, endian_flag, fd_rules, frontend_iotlb, inflight_area, named,
    reserved_num,
};
use super::payload::{
    Body, ConfigPayload, DeviceStateTransfer, InflightDesc, IotlbPayload, LogDesc, MemRegion,
    MemTable, SharedObjectUuid, ShmemConfig, ShmemMapPayload, VringArea, VringState,
};
use super::Result;
use crate::backend::VringAddrs;

// ---- the request table -------------------------------------------------------------

/// Which way a request travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Front-end to back-end, on the main socket.
    FrontendToBackend,
    /// Back-end to front-end, on the back-end channel (`SET_BACKEND_REQ_FD`).
    BackendToFrontend,
}

/// How many fds travel with a request, and what decides it (ADVERSARIAL B1, B3, B4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdRule {
    /// None: a stray fd is a protocol error.
    None,
    /// Exactly one.
    One,
    /// One per memory region of the body, in region order.
    PerRegion,
    /// One exactly when the body's NOFD flag is clear.
    OneUnlessNofd,
    /// As [`OneUnlessNofd`](Self::OneUnlessNofd), and the fd must be pollable (an
    /// eventfd, pipe or socket: not a regular file, directory or block device, B6).
    EventUnlessNofd,
    /// None, but one stray fd is accepted and closed (the spec's allowance for
    /// `REM_MEM_REG`, which front-ends used to send with the region's fd).
    ZeroOrOne,
}

/// What the receiver answers, whatever REPLY_ACK says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyRule {
    /// No reply of its own: only a REPLY_ACK status, when `NEED_REPLY` is set and
    /// REPLY_ACK negotiated.
    Ack,
    /// A u64 (a value or a status).
    U64,
    /// A body of this many bytes.
    Sized(usize),
    /// A body as large as the request's (the request's layout, filled in).
    SameAsRequest,
}

impl ReplyRule {
    /// The body size a well-behaved peer answers with (read with the header in one
    /// `recvmsg`; another size is still read, in two).
    pub fn expected_size(self, request_body: usize) -> usize {
        match self {
            ReplyRule::Ack | ReplyRule::U64 => 8,
            ReplyRule::Sized(n) => n,
            ReplyRule::SameAsRequest => request_body,
        }
    }
}

/// One request, as the table describes it: what tools (and the decoder, the encoder and
/// the session rules) know about it without a hand-written match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestSpec {
    /// Which way it travels.
    pub direction: Direction,
    /// The wire code.
    pub code: u32,
    /// The spec name without the `VHOST_USER_` (or `VHOST_USER_BACKEND_`) prefix.
    pub name: &'static str,
    /// Its documentation, one line per line.
    pub doc: &'static str,
    /// The protocol feature (a mask of [`protocol_features`]) it needs, if any. `None`
    /// is not always "ungated": `GET_/SET_PROTOCOL_FEATURES` and `SET_VRING_ENABLE` need
    /// the virtio bit [`VHOST_USER_F_PROTOCOL_FEATURES`] and `IOTLB_MSG` needs
    /// `VIRTIO_F_ACCESS_PLATFORM`; those are the session's to check. A back-end request
    /// also needs `BACKEND_REQ`, and `BACKEND_SEND_FD` when it carries an fd.
    pub gate: Option<u64>,
    /// The Rust type of the body (`()` for a header-only request).
    pub body: &'static str,
    /// The fds that travel with it.
    pub fds: FdRule,
    /// The reply it gets.
    pub reply: ReplyRule,
    /// Whether that reply may carry an fd (any other fd on a reply is H2).
    pub reply_fd: bool,
}

impl RequestSpec {
    /// Whether the receiver answers with a reply of its own (not only a REPLY_ACK ack).
    pub fn has_reply(&self) -> bool {
        self.reply != ReplyRule::Ack
    }
}

macro_rules! gate {
    (-) => {
        None
    };
    ($g:ident) => {
        Some(protocol_features::$g)
    };
}

macro_rules! reply_fd {
    () => {
        false
    };
    (fd) => {
        true
    };
}

/// The body bytes of a request whose body is bound to `$b` and fds to `$f`.
macro_rules! encode_body {
    (_, $rule:ident, $f:tt) => {
        Vec::new()
    };
    ($b:ident, OneUnlessNofd, $f:ident) => {
        Body::bytes_nofd($b, $f.is_none())
    };
    ($b:ident, EventUnlessNofd, $f:ident) => {
        Body::bytes_nofd($b, $f.is_none())
    };
    ($b:ident, $rule:ident, $f:tt) => {
        Body::bytes($b)
    };
}

macro_rules! encode_fds {
    (None, $f:tt) => {
        Vec::new()
    };
    (ZeroOrOne, $f:tt) => {
        Vec::new()
    };
    (One, $f:ident) => {
        vec![$f.as_fd()]
    };
    ($rule:ident, $f:ident) => {
        $f.iter().map(AsFd::as_fd).collect()
    };
}

/// The fds of a received request, checked against its rule, as the variant holds them.
macro_rules! decode_fds {
    (None, $name:ident, $p:ident, $nofd:ident, $fds:ident) => {
        fd_rules::none($name, $fds)?
    };
    (One, $name:ident, $p:ident, $nofd:ident, $fds:ident) => {
        fd_rules::one($name, $fds)?
    };
    (PerRegion, $name:ident, $p:ident, $nofd:ident, $fds:ident) => {
        fd_rules::per_region($name, $p.regions.len(), $fds)?
    };
    (OneUnlessNofd, $name:ident, $p:ident, $nofd:ident, $fds:ident) => {
        fd_rules::unless_nofd($name, $nofd, $fds)?
    };
    (EventUnlessNofd, $name:ident, $p:ident, $nofd:ident, $fds:ident) => {
        fd_rules::event_unless_nofd($name, $nofd, $fds)?
    };
    (ZeroOrOne, $name:ident, $p:ident, $nofd:ident, $fds:ident) => {
        fd_rules::zero_or_one($name, $fds)?
    };
}

/// A request built locally, checked with the rules its decoder applies.
macro_rules! check_request {
    ($name:ident, _, $rule:ident, $f:tt $(, $check:path)?) => {
        Ok(())
    };
    ($name:ident, $b:ident, PerRegion, $f:ident $(, $check:path)?) => {
        Body::check($b)
            $(.and_then(|()| $check($b)))?
            .and_then(|()| fd_rules::sent_per_region($name, $b.regions.len(), $f.len()))
    };
    ($name:ident, $b:ident, OneUnlessNofd, $f:ident $(, $check:path)?) => {
        Body::check($b)
            $(.and_then(|()| $check($b)))?
            .and_then(|()| fd_rules::sent_unless_nofd($name, Body::own_nofd($b), $f.is_some()))
    };
    ($name:ident, $b:ident, $rule:ident, $f:tt $(, $check:path)?) => {
        Body::check($b) $(.and_then(|()| $check($b)))?
    };
}

/// Generates, from one line per request: the code enum (`FrontendReq`), its `ALL`,
/// `from_code`, `code`, `name`, `required_protocol_feature`, reply rules and [`spec`]
/// (`FrontendReq::spec`), and the decoder, encoder, fds and local check of the request
/// value (`FrontendRequest`). A line reads:
///
/// `Variant = code, "NAME", gate FEATURE|-, reply RULE [+ fd], body Type [where check],
/// fds RULE, (body binding, fd binding) => [the request value built from them];`
///
/// The request value is written once and serves as the decoder's constructor and the
/// encoder's pattern, so the two cannot disagree.
macro_rules! request_table {
    (
        $(#[$meta:meta])*
        pub enum $Req:ident for $Request:ident, $dir:ident;
        $(
            $(#[doc = $doc:literal])*
            $v:ident = $code:literal, $name:literal, gate $gate:tt,
            reply $reply:ident $(($rsize:expr))? $(+ $rfd:ident)?,
            body $body:ty $(where $check:path)?, fds $rule:ident,
            ($b:tt, $f:tt) => [$($ctor:tt)+];
        )+
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $Req {
            $( $(#[doc = $doc])* $v = $code, )+
        }

        impl $Req {
            /// Every request, in code order.
            pub const ALL: &'static [$Req] = &[$($Req::$v),+];

            /// The request with this wire code, or `None` for 0, gaps and anything
            /// unassigned: an unknown value never becomes an enum (ADVERSARIAL A2).
            pub fn from_code(code: u32) -> Option<Self> {
                match code {
                    $($code => Some($Req::$v),)+
                    _ => None,
                }
            }

            /// The wire code.
            pub fn code(self) -> u32 {
                self as u32
            }

            /// The request's line of the table.
            pub fn spec(self) -> &'static RequestSpec {
                match self {
                    $($Req::$v => {
                        const SPEC: RequestSpec = RequestSpec {
                            direction: Direction::$dir,
                            code: $code,
                            name: $name,
                            doc: concat!($($doc, "\n",)*),
                            gate: gate!($gate),
                            body: stringify!($body),
                            fds: FdRule::$rule,
                            reply: ReplyRule::$reply $(($rsize))?,
                            reply_fd: reply_fd!($($rfd)?),
                        };
                        &SPEC
                    })+
                }
            }

            /// The spec name without its C prefix, e.g. `"GET_FEATURES"`.
            pub fn name(self) -> &'static str {
                self.spec().name
            }

            /// The protocol feature bit (a mask from [`protocol_features`]) this request
            /// needs, if any (see [`RequestSpec::gate`]).
            pub fn required_protocol_feature(self) -> Option<u64> {
                self.spec().gate
            }

            /// Whether the receiver answers with a reply of its own (not only an ack).
            pub fn has_reply(self) -> bool {
                self.spec().has_reply()
            }

            /// Whether that reply may carry an fd; an fd on any other reply is a protocol
            /// error (H2).
            pub fn reply_allows_fd(self) -> bool {
                self.spec().reply_fd
            }
        }

        impl<F: AsFd> $Request<F> {
            /// The request's code, to name it in errors and check its feature gate.
            pub fn kind(&self) -> $Req {
                match self {
                    $($Request::$v { .. } => $Req::$v,)+
                }
            }

            /// The body bytes, as sent; `decode(self.kind(), &self.encode_body(), fds)`
            /// gives the request back.
            #[allow(unused_variables)]
            pub fn encode_body(&self) -> Vec<u8> {
                match self {
                    $($Request::$($ctor)+ => encode_body!($b, $rule, $f),)+
                }
            }

            /// The fds this request carries, in wire order.
            #[allow(unused_variables)]
            pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
                match self {
                    $($Request::$($ctor)+ => encode_fds!($rule, $f),)+
                }
            }

            /// Applies to a request built locally the rules its decoder applies to one
            /// received (body rules and fd count), so a sender refuses what the receiver
            /// would: nothing is encoded and decoded again to find out.
            #[allow(unused_variables)]
            pub fn check(&self) -> Result<()> {
                let name = self.kind().name();
                let checked: Result<()> = match self {
                    $($Request::$($ctor)+ => check_request!(name, $b, $rule, $f $(, $check)?),)+
                };
                checked.map_err(|e| named(e, name))
            }
        }

        impl $Request {
            /// Decodes a request whose header passed `check_request` (`body.len()` is the
            /// header's size): the body's layout and rules, then its fds by the table's
            /// rule. On error every fd in `fds` is closed, and the error names the request.
            pub fn decode(code: $Req, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self> {
                // A header-only body and a request without fds bind `()`.
                #[allow(unused_variables, clippy::let_unit_value)]
                fn inner(code: $Req, body: &[u8], fds: Vec<OwnedFd>) -> Result<$Request> {
                    let name = code.name();
                    Ok(match code {
                        $($Req::$v => {
                            let (p, nofd) = <$body as Body>::parse_nofd(body)?;
                            $($check(&p)?;)?
                            let $f = decode_fds!($rule, name, p, nofd, fds);
                            let $b = p;
                            $Request::$($ctor)+
                        })+
                    })
                }
                inner(code, body, fds).map_err(|e| named(e, code.name()))
            }
        }
    };
}

request_table! {
    /// Requests the front-end sends to the back-end on the main socket.
    pub enum FrontendReq for FrontendRequest, FrontendToBackend;

    /// The virtio features the back-end offers.
    GetFeatures = 1, "GET_FEATURES", gate -, reply U64, body (), fds None, (_, _) => [GetFeatures];
    /// The features the front-end acks.
    SetFeatures = 2, "SET_FEATURES", gate -, reply Ack, body u64, fds None,
        (b, _) => [SetFeatures(b)];
    /// Starts a session: the sender owns the back-end.
    SetOwner = 3, "SET_OWNER", gate -, reply Ack, body (), fds None, (_, _) => [SetOwner];
    /// Deprecated by the spec; a back-end may ignore it.
    ResetOwner = 4, "RESET_OWNER", gate -, reply Ack, body (), fds None, (_, _) => [ResetOwner];
    /// The guest's memory table, one fd per region.
    SetMemTable = 5, "SET_MEM_TABLE", gate -, reply Ack, body MemTable, fds PerRegion,
        (b, f) => [SetMemTable { table: b, fds: f }];
    /// Where the dirty log is (LOG_SHMFD: without it the log has no fd to map).
    SetLogBase = 6, "SET_LOG_BASE", gate LOG_SHMFD, reply U64, body LogDesc, fds One,
        (b, f) => [SetLogBase { log: b, fd: f }];
    /// The eventfd of the dirty log (LOG_SHMFD).
    SetLogFd = 7, "SET_LOG_FD", gate -, reply Ack, body (), fds One, (_, f) => [SetLogFd(f)];
    /// A queue's size.
    SetVringNum = 8, "SET_VRING_NUM", gate -, reply Ack, body VringState, fds None,
        (b, _) => [SetVringNum(b)];
    /// A queue's ring addresses.
    SetVringAddr = 9, "SET_VRING_ADDR", gate -, reply Ack, body VringAddrs, fds None,
        (b, _) => [SetVringAddr(b)];
    /// Where a queue resumes.
    SetVringBase = 10, "SET_VRING_BASE", gate -, reply Ack, body VringState, fds None,
        (b, _) => [SetVringBase(b)];
    /// Stops a queue and asks where it stopped.
    GetVringBase = 11, "GET_VRING_BASE", gate -, reply Sized(VringState::SIZE), body VringState,
        fds None, (b, _) => [GetVringBase(b)];
    /// The eventfd the driver kicks a queue with.
    SetVringKick = 12, "SET_VRING_KICK", gate -, reply Ack, body u8, fds EventUnlessNofd,
        (b, f) => [SetVringKick { index: b, fd: f }];
    /// The eventfd the back-end signals a queue's used buffers on.
    SetVringCall = 13, "SET_VRING_CALL", gate -, reply Ack, body u8, fds EventUnlessNofd,
        (b, f) => [SetVringCall { index: b, fd: f }];
    /// The eventfd the back-end signals a broken queue on.
    SetVringErr = 14, "SET_VRING_ERR", gate -, reply Ack, body u8, fds EventUnlessNofd,
        (b, f) => [SetVringErr { index: b, fd: f }];
    /// The protocol features the back-end offers.
    GetProtocolFeatures = 15, "GET_PROTOCOL_FEATURES", gate -, reply U64, body (), fds None,
        (_, _) => [GetProtocolFeatures];
    /// The protocol features the front-end acks.
    SetProtocolFeatures = 16, "SET_PROTOCOL_FEATURES", gate -, reply Ack, body u64, fds None,
        (b, _) => [SetProtocolFeatures(b)];
    /// How many queues the back-end has (MQ).
    GetQueueNum = 17, "GET_QUEUE_NUM", gate MQ, reply U64, body (), fds None,
        (_, _) => [GetQueueNum];
    /// Starts or stops a queue (PROTOCOL_FEATURES rings start disabled).
    SetVringEnable = 18, "SET_VRING_ENABLE", gate -, reply Ack, body VringState where enable_flag,
        fds None, (b, _) => [SetVringEnable(b)];
    /// Announce the guest's MAC after a migration (RARP).
    SendRarp = 19, "SEND_RARP", gate RARP, reply Ack, body [u8; 6], fds None,
        (b, _) => [SendRarp(b)];
    /// The MTU the guest driver set (MTU).
    NetSetMtu = 20, "NET_SET_MTU", gate MTU, reply Ack, body u64, fds None,
        (b, _) => [NetSetMtu(b)];
    /// Formerly `SET_SLAVE_REQ_FD`.
    SetBackendReqFd = 21, "SET_BACKEND_REQ_FD", gate BACKEND_REQ, reply Ack, body (), fds One,
        (_, f) => [SetBackendReqFd(f)];
    /// A device IOTLB update or invalidation (IOMMU platform); the back-end acknowledges.
    IotlbMsg = 22, "IOTLB_MSG", gate -, reply U64, body IotlbPayload where frontend_iotlb,
        fds None, (b, _) => [IotlbMsg(b)];
    /// A legacy ring's byte order (CROSS_ENDIAN).
    SetVringEndian = 23, "SET_VRING_ENDIAN", gate CROSS_ENDIAN, reply Ack,
        body VringState where endian_flag, fds None, (b, _) => [SetVringEndian(b)];
    /// Reads device config space (CONFIG).
    GetConfig = 24, "GET_CONFIG", gate CONFIG, reply SameAsRequest, body ConfigPayload, fds None,
        (b, _) => [GetConfig(b)];
    /// Writes device config space (CONFIG).
    SetConfig = 25, "SET_CONFIG", gate CONFIG, reply Ack, body ConfigPayload, fds None,
        (b, _) => [SetConfig(b)];
    /// Opens a crypto session (CRYPTO_SESSION).
    CreateCryptoSession = 26, "CREATE_CRYPTO_SESSION", gate CRYPTO_SESSION, reply SameAsRequest,
        body Vec<u8>, fds None, (b, _) => [CreateCryptoSession(b)];
    /// Closes a crypto session (CRYPTO_SESSION).
    CloseCryptoSession = 27, "CLOSE_CRYPTO_SESSION", gate CRYPTO_SESSION, reply Ack, body u64,
        fds None, (b, _) => [CloseCryptoSession(b)];
    /// Asks for a userfaultfd over the back-end's mappings (PAGEFAULT).
    PostcopyAdvise = 28, "POSTCOPY_ADVISE", gate PAGEFAULT, reply Sized(0) + fd, body (),
        fds None, (_, _) => [PostcopyAdvise];
    /// Postcopy begins: memory may fault from now on (PAGEFAULT).
    PostcopyListen = 29, "POSTCOPY_LISTEN", gate PAGEFAULT, reply Ack, body (), fds None,
        (_, _) => [PostcopyListen];
    /// Postcopy is over (PAGEFAULT).
    PostcopyEnd = 30, "POSTCOPY_END", gate PAGEFAULT, reply U64, body (), fds None,
        (_, _) => [PostcopyEnd];
    /// Asks for a shared area that records in-flight requests (INFLIGHT_SHMFD).
    GetInflightFd = 31, "GET_INFLIGHT_FD", gate INFLIGHT_SHMFD,
        reply Sized(InflightDesc::SIZE) + fd,
        body InflightDesc where InflightDesc::check_queues, fds None, (b, _) => [GetInflightFd(b)];
    /// Hands the in-flight area back after a reconnect (INFLIGHT_SHMFD).
    SetInflightFd = 32, "SET_INFLIGHT_FD", gate INFLIGHT_SHMFD, reply Ack,
        body InflightDesc where inflight_area, fds One,
        (b, f) => [SetInflightFd { desc: b, fd: f }];
    /// The socket of the GPU protocol (vhost-user-gpu).
    GpuSetSocket = 33, "GPU_SET_SOCKET", gate -, reply Ack, body (), fds One,
        (_, f) => [GpuSetSocket(f)];
    /// Resets the device, keeping the session (RESET_DEVICE).
    ResetDevice = 34, "RESET_DEVICE", gate RESET_DEVICE, reply Ack, body (), fds None,
        (_, _) => [ResetDevice];
    /// The in-band kick of a queue (INBAND_NOTIFICATIONS).
    VringKick = 35, "VRING_KICK", gate INBAND_NOTIFICATIONS, reply Ack,
        body VringState where reserved_num, fds None, (b, _) => [VringKick(b)];
    /// How many regions the back-end can map (CONFIGURE_MEM_SLOTS).
    GetMaxMemSlots = 36, "GET_MAX_MEM_SLOTS", gate CONFIGURE_MEM_SLOTS, reply U64, body (),
        fds None, (_, _) => [GetMaxMemSlots];
    /// Adds one memory region (CONFIGURE_MEM_SLOTS).
    AddMemReg = 37, "ADD_MEM_REG", gate CONFIGURE_MEM_SLOTS, reply Ack, body MemRegion, fds One,
        (b, f) => [AddMemReg { region: b, fd: f }];
    /// Removes one memory region (CONFIGURE_MEM_SLOTS).
    RemMemReg = 38, "REM_MEM_REG", gate CONFIGURE_MEM_SLOTS, reply Ack, body MemRegion,
        fds ZeroOrOne, (b, _) => [RemMemReg(b)];
    /// The virtio device status byte (STATUS).
    SetStatus = 39, "SET_STATUS", gate STATUS, reply Ack, body u64, fds None,
        (b, _) => [SetStatus(b)];
    /// Asks for the virtio device status byte (STATUS).
    GetStatus = 40, "GET_STATUS", gate STATUS, reply U64, body (), fds None, (_, _) => [GetStatus];
    /// Asks for the dma-buf exported under a UUID (SHARED_OBJECT).
    GetSharedObject = 41, "GET_SHARED_OBJECT", gate SHARED_OBJECT, reply U64 + fd,
        body SharedObjectUuid, fds None, (b, _) => [GetSharedObject(b)];
    /// Starts a device state transfer over a pipe (DEVICE_STATE).
    SetDeviceStateFd = 42, "SET_DEVICE_STATE_FD", gate DEVICE_STATE, reply U64 + fd,
        body DeviceStateTransfer, fds One, (b, f) => [SetDeviceStateFd { transfer: b, fd: f }];
    /// Whether the last state transfer succeeded (DEVICE_STATE).
    CheckDeviceState = 43, "CHECK_DEVICE_STATE", gate DEVICE_STATE, reply U64, body (), fds None,
        (_, _) => [CheckDeviceState];
    /// The sizes of the device's VIRTIO Shared Memory Regions (SHMEM).
    GetShmemConfig = 44, "GET_SHMEM_CONFIG", gate SHMEM, reply Sized(ShmemConfig::SIZE), body (),
        fds None, (_, _) => [GetShmemConfig];
    /// Stops a queue without draining it, leaving in-flight requests recorded
    /// (GET_VRING_BASE_SKIP_DRAIN). Known by name and decoded; this crate never offers
    /// the feature, so a session refuses it.
    GetVringBaseSkipDrain = 45, "GET_VRING_BASE_SKIP_DRAIN", gate GET_VRING_BASE_SKIP_DRAIN,
        reply Sized(VringState::SIZE), body VringState, fds None,
        (b, _) => [GetVringBaseSkipDrain(b)];
}

/// A request from the front-end: decoded and validated (`F` = [`OwnedFd`]), or built to
/// be sent (`F` = `BorrowedFd`). Its codec comes from the request table in
/// [`codes`](super::codes).
#[derive(Debug)]
pub enum FrontendRequest<F = OwnedFd> {
    /// See [`FrontendReq::GetFeatures`].
    GetFeatures,
    /// The features acked.
    SetFeatures(u64),
    /// See [`FrontendReq::SetOwner`].
    SetOwner,
    /// See [`FrontendReq::ResetOwner`].
    ResetOwner,
    /// One fd per region, in region order.
    SetMemTable {
        /// The regions as sent.
        table: MemTable,
        /// Their fds, in region order.
        fds: Vec<F>,
    },
    /// See [`FrontendReq::SetLogBase`].
    SetLogBase {
        /// Size and offset of the log in `fd`.
        log: LogDesc,
        /// The log's memfd.
        fd: F,
    },
    /// The log's eventfd.
    SetLogFd(F),
    /// Queue index and size.
    SetVringNum(VringState),
    /// The ring's addresses.
    SetVringAddr(VringAddrs),
    /// Queue index and where it resumes.
    SetVringBase(VringState),
    /// The queue index (`num` is ignored).
    GetVringBase(VringState),
    /// `fd` is `None` exactly when the NOFD flag was set (poll instead).
    SetVringKick {
        /// The queue index.
        index: u8,
        /// The eventfd.
        fd: Option<F>,
    },
    /// See [`FrontendReq::SetVringCall`]; `fd` is `None` exactly when NOFD was set.
    SetVringCall {
        /// The queue index.
        index: u8,
        /// The eventfd.
        fd: Option<F>,
    },
    /// See [`FrontendReq::SetVringErr`]; `fd` is `None` exactly when NOFD was set.
    SetVringErr {
        /// The queue index.
        index: u8,
        /// The eventfd.
        fd: Option<F>,
    },
    /// See [`FrontendReq::GetProtocolFeatures`].
    GetProtocolFeatures,
    /// The protocol features acked.
    SetProtocolFeatures(u64),
    /// See [`FrontendReq::GetQueueNum`].
    GetQueueNum,
    /// `num` is 0 or 1.
    SetVringEnable(VringState),
    /// The guest's MAC address.
    SendRarp([u8; 6]),
    /// The MTU the guest driver set.
    NetSetMtu(u64),
    /// The back-end channel's socket.
    SetBackendReqFd(F),
    /// Type `UPDATE` or `INVALIDATE`.
    IotlbMsg(IotlbPayload),
    /// `num` is 0 (little endian) or 1 (big endian).
    SetVringEndian(VringState),
    /// Offset, size and flags of the read.
    GetConfig(ConfigPayload),
    /// Offset and the bytes to write.
    SetConfig(ConfigPayload),
    /// The opaque session parameters.
    CreateCryptoSession(Vec<u8>),
    /// The session to close.
    CloseCryptoSession(u64),
    /// See [`FrontendReq::PostcopyAdvise`].
    PostcopyAdvise,
    /// See [`FrontendReq::PostcopyListen`].
    PostcopyListen,
    /// See [`FrontendReq::PostcopyEnd`].
    PostcopyEnd,
    /// Non-zero queue count and size; the mmap fields are unused.
    GetInflightFd(InflightDesc),
    /// See [`FrontendReq::SetInflightFd`].
    SetInflightFd {
        /// The area's size and queue layout.
        desc: InflightDesc,
        /// The area's memfd.
        fd: F,
    },
    /// The GPU protocol socket.
    GpuSetSocket(F),
    /// See [`FrontendReq::ResetDevice`].
    ResetDevice,
    /// `num` is 0.
    VringKick(VringState),
    /// See [`FrontendReq::GetMaxMemSlots`].
    GetMaxMemSlots,
    /// See [`FrontendReq::AddMemReg`].
    AddMemReg {
        /// The region to add.
        region: MemRegion,
        /// Its fd.
        fd: F,
    },
    /// The spec lets a back-end accept (and must then close) one stray fd here, for
    /// front-ends that used to send it; `decode` does exactly that.
    RemMemReg(MemRegion),
    /// The virtio device status byte (a u64 on the wire).
    SetStatus(u64),
    /// See [`FrontendReq::GetStatus`].
    GetStatus,
    /// The UUID of the object.
    GetSharedObject(SharedObjectUuid),
    /// See [`FrontendReq::SetDeviceStateFd`].
    SetDeviceStateFd {
        /// Direction (save or load) and phase.
        transfer: DeviceStateTransfer,
        /// The pipe end to read or write the state through.
        fd: F,
    },
    /// See [`FrontendReq::CheckDeviceState`].
    CheckDeviceState,
    /// See [`FrontendReq::GetShmemConfig`].
    GetShmemConfig,
    /// The queue index (`num` is reserved); see [`FrontendReq::GetVringBaseSkipDrain`].
    GetVringBaseSkipDrain(VringState),
}

request_table! {
    /// Requests the back-end sends to the front-end on the back-end channel (the socket
    /// handed over with `SET_BACKEND_REQ_FD`; formerly the "slave" channel).
    ///
    /// # The virtio-fs "fs map/unmap" family
    ///
    /// Old rust-vmm `vhost` releases (`SlaveFsCacheReq`) carried four draft requests for the
    /// virtio-fs DAX window: `FS_MAP`, `FS_UNMAP`, `FS_SYNC` and `FS_IO`. They were never in
    /// the vhost-user specification, and their codes moved over time: first 4-6, later 6-9,
    /// which collide with `VRING_CALL`/`VRING_ERR` and with `SHARED_OBJECT_*` (6-8) and
    /// `SHMEM_MAP` (9) as the spec assigned them; rust-vmm then moved them to 1000-1003 and
    /// finally dropped them. This crate does not recognise any of those codes (they decode as
    /// unknown requests). The spec generalised the idea as [`BackendReq::ShmemMap`] /
    /// [`BackendReq::ShmemUnmap`] on a VIRTIO Shared Memory Region, and that is how the fs
    /// family is represented here: one `FS_MAP` entry (`fd_offset`, `cache_offset`, `len`,
    /// read/write flags) is one `SHMEM_MAP` with `shmid` = the virtio-fs DAX cache region
    /// (`VIRTIO_FS_SHMCAP_ID_CACHE`, 0), `shm_offset` = `cache_offset`; `FS_UNMAP` is
    /// `SHMEM_UNMAP` on the same range. `FS_SYNC` (msync of the window) and `FS_IO` (copy
    /// between an fd and guest memory) have no counterpart in the spec and are not supported.
    pub enum BackendReq for BackendRequest, BackendToFrontend;

    /// A translation miss or access failure (IOMMU platform).
    IotlbMsg = 1, "IOTLB_MSG", gate -, reply Ack, body IotlbPayload where backend_iotlb, fds None,
        (b, _) => [IotlbMsg(b)];
    /// The config space changed; the driver re-reads it (CONFIG).
    ConfigChangeMsg = 2, "CONFIG_CHANGE_MSG", gate CONFIG, reply Ack, body (), fds None,
        (_, _) => [ConfigChangeMsg];
    /// A queue's doorbell page to map into the guest (HOST_NOTIFIER).
    VringHostNotifierMsg = 3, "VRING_HOST_NOTIFIER_MSG", gate HOST_NOTIFIER, reply Ack,
        body VringArea, fds OneUnlessNofd, (b, f) => [VringHostNotifierMsg { area: b, fd: f }];
    /// The in-band call of a queue (INBAND_NOTIFICATIONS).
    VringCall = 4, "VRING_CALL", gate INBAND_NOTIFICATIONS, reply Ack,
        body VringState where reserved_num, fds None, (b, _) => [VringCall(b)];
    /// The in-band error of a queue (INBAND_NOTIFICATIONS).
    VringErr = 5, "VRING_ERR", gate INBAND_NOTIFICATIONS, reply Ack,
        body VringState where reserved_num, fds None, (b, _) => [VringErr(b)];
    /// Exports an object under a UUID (SHARED_OBJECT).
    SharedObjectAdd = 6, "SHARED_OBJECT_ADD", gate SHARED_OBJECT, reply Ack, body SharedObjectUuid,
        fds None, (b, _) => [SharedObjectAdd(b)];
    /// Withdraws an exported object (SHARED_OBJECT).
    SharedObjectRemove = 7, "SHARED_OBJECT_REMOVE", gate SHARED_OBJECT, reply Ack,
        body SharedObjectUuid, fds None, (b, _) => [SharedObjectRemove(b)];
    /// Asks the front-end for an object exported under a UUID (SHARED_OBJECT); the answer
    /// is a status and, on success, the dma-buf.
    SharedObjectLookup = 8, "SHARED_OBJECT_LOOKUP", gate SHARED_OBJECT, reply U64 + fd,
        body SharedObjectUuid, fds None, (b, _) => [SharedObjectLookup(b)];
    /// Map an fd into a VIRTIO Shared Memory Region (SHMEM).
    ShmemMap = 9, "SHMEM_MAP", gate SHMEM, reply Ack, body ShmemMapPayload, fds One,
        (b, f) => [ShmemMap { map: b, fd: f }];
    /// Unmap a range of a VIRTIO Shared Memory Region (SHMEM).
    ShmemUnmap = 10, "SHMEM_UNMAP", gate SHMEM, reply Ack, body ShmemMapPayload, fds None,
        (b, _) => [ShmemUnmap(b)];
}

/// A request from the back-end on the back-end channel, decoded or to be sent (as
/// [`FrontendRequest`]).
#[derive(Debug)]
pub enum BackendRequest<F = OwnedFd> {
    /// Type `MISS` or `ACCESS_FAIL`.
    IotlbMsg(IotlbPayload),
    /// See [`BackendReq::ConfigChangeMsg`].
    ConfigChangeMsg,
    /// `fd` is `None` exactly when `area.nofd` is set (deregister the notifier).
    VringHostNotifierMsg {
        /// Queue index, offset and size of the doorbell page.
        area: VringArea,
        /// The page's fd.
        fd: Option<F>,
    },
    /// `num` is 0.
    VringCall(VringState),
    /// `num` is 0.
    VringErr(VringState),
    /// The UUID of the object.
    SharedObjectAdd(SharedObjectUuid),
    /// The UUID of the object.
    SharedObjectRemove(SharedObjectUuid),
    /// The UUID of the object.
    SharedObjectLookup(SharedObjectUuid),
    /// See [`BackendReq::ShmemMap`].
    ShmemMap {
        /// Which region, where, how much, and with what access.
        map: ShmemMapPayload,
        /// The fd to map.
        fd: F,
    },
    /// The range to unmap.
    ShmemUnmap(ShmemMapPayload),
}

/// Protocol feature bits (`VHOST_USER_PROTOCOL_F_*`), as masks, from one table that also
/// gives their names ([`TABLE`](protocol_features::TABLE), [`name`](protocol_features::name)).
pub mod protocol_features {
    macro_rules! protocol_feature_table {
        ($( $(#[doc = $doc:literal])* $name:ident = $bit:literal; )+) => {
            $( $(#[doc = $doc])* pub const $name: u64 = 1 << $bit; )+

            /// Every feature this crate names, in bit order: name (without
            /// `VHOST_USER_PROTOCOL_F_`), mask and documentation.
            pub const TABLE: &[(&str, u64, &str)] =
                &[$((stringify!($name), 1 << $bit, concat!($($doc, "\n",)*)),)+];
        };
    }

    protocol_feature_table! {
        /// The back-end has more than one queue and answers GET_QUEUE_NUM.
        MQ = 0;
        /// Dirty logging into shared memory (SET_LOG_BASE, SET_LOG_FD).
        LOG_SHMFD = 1;
        /// SEND_RARP after a migration.
        RARP = 2;
        /// A request may ask for a status reply (NEED_REPLY), so failures are not silent.
        REPLY_ACK = 3;
        /// `VHOST_USER_PROTOCOL_F_MTU` (`NET_MTU` in QEMU's source).
        MTU = 4;
        /// Formerly `SLAVE_REQ`.
        BACKEND_REQ = 5;
        /// SET_VRING_ENDIAN for legacy rings.
        CROSS_ENDIAN = 6;
        /// CREATE_CRYPTO_SESSION and CLOSE_CRYPTO_SESSION.
        CRYPTO_SESSION = 7;
        /// Postcopy migration (POSTCOPY_ADVISE, LISTEN, END).
        PAGEFAULT = 8;
        /// GET_CONFIG and SET_CONFIG, and CONFIG_CHANGE_MSG on the back-end channel.
        CONFIG = 9;
        /// Formerly `SLAVE_SEND_FD`.
        BACKEND_SEND_FD = 10;
        /// VRING_HOST_NOTIFIER_MSG: the back-end hands doorbell pages to the front-end.
        HOST_NOTIFIER = 11;
        /// GET_INFLIGHT_FD and SET_INFLIGHT_FD, so a restarted back-end loses no request.
        INFLIGHT_SHMFD = 12;
        /// RESET_DEVICE.
        RESET_DEVICE = 13;
        /// VRING_KICK, VRING_CALL and VRING_ERR as messages instead of eventfds.
        INBAND_NOTIFICATIONS = 14;
        /// GET_MAX_MEM_SLOTS, ADD_MEM_REG and REM_MEM_REG.
        CONFIGURE_MEM_SLOTS = 15;
        /// SET_STATUS and GET_STATUS.
        STATUS = 16;
        /// Changes the memory region layout (two extra u32 per region). This crate's
        /// decoders only know the plain 32-byte region, so never offer this bit.
        XEN_MMAP = 17;
        /// GET_SHARED_OBJECT and the SHARED_OBJECT_* back-end requests.
        SHARED_OBJECT = 18;
        /// SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE: device state migrates through a pipe.
        DEVICE_STATE = 19;
        /// `GET_VRING_BASE` may leave in-flight requests recorded in the inflight area
        /// instead of completing them.
        GET_VRING_BASE_INFLIGHT = 20;
        /// Ring and region addresses are guest-physical rather than front-end virtual.
        GPA_ADDRESSES = 21;
        /// VIRTIO Shared Memory Regions: `GET_SHMEM_CONFIG`, `SHMEM_MAP`, `SHMEM_UNMAP`.
        /// Bit 22 in the spec; rust-vmm `vhost` up to 0.16 used 21 (now `GPA_ADDRESSES`)
        /// and an earlier draft used 20, so peers built on those do not negotiate it with us.
        SHMEM = 22;
        /// `GET_VRING_BASE_SKIP_DRAIN`: stop a queue without draining it. Named so a
        /// peer's offer prints, but not implemented: not in [`ALL`], so never accepted.
        GET_VRING_BASE_SKIP_DRAIN = 23;
    }

    /// Every bit this crate implements (and so may accept in SET_PROTOCOL_FEATURES):
    /// the table without `GET_VRING_BASE_SKIP_DRAIN`.
    pub const ALL: u64 = (1 << 23) - 1;

    /// The spec name (without `VHOST_USER_PROTOCOL_F_`) of a feature given as a mask
    /// with exactly one bit set, e.g. `name(MQ) == Some("MQ")`. `None` for unknown bits
    /// and for masks with zero or several bits.
    pub fn name(bit: u64) -> Option<&'static str> {
        TABLE.iter().find(|f| f.1 == bit).map(|f| f.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_codes_round_trip() {
        assert_eq!(FrontendReq::ALL.len(), 45);
        for (i, &r) in FrontendReq::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1, "{r:?} out of order");
            assert_eq!(FrontendReq::from_code(r.code()), Some(r));
            assert_eq!(r.spec().code, r.code());
            assert_eq!(r.spec().direction, Direction::FrontendToBackend);
            assert!(
                !r.name().is_empty() && !r.spec().doc.trim().is_empty(),
                "{r:?}"
            );
        }
        let mut names: Vec<_> = FrontendReq::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FrontendReq::ALL.len());
    }

    #[test]
    fn frontend_rejects_unknown_codes() {
        for code in [0, 46, 100, 1000, 0x7FFF_FFFF, 0xFFFF_FFFF] {
            assert_eq!(FrontendReq::from_code(code), None, "{code}");
        }
        for code in 0..=u32::from(u16::MAX) {
            let known = (1..=45).contains(&code);
            assert_eq!(FrontendReq::from_code(code).is_some(), known, "{code}");
        }
    }

    #[test]
    fn backend_codes_round_trip() {
        assert_eq!(BackendReq::ALL.len(), 10);
        for (i, &r) in BackendReq::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1);
            assert_eq!(BackendReq::from_code(r.code()), Some(r));
            assert_eq!(r.spec().direction, Direction::BackendToFrontend);
            assert!(!r.spec().doc.trim().is_empty(), "{r:?}");
        }
        let mut names: Vec<_> = BackendReq::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BackendReq::ALL.len());
    }

    #[test]
    fn backend_rejects_unknown_and_fs_codes() {
        for code in [0, 11, 12, 1000, 1001, 1002, 1003, 0xFFFF_FFFF] {
            assert_eq!(BackendReq::from_code(code), None, "{code}");
        }
    }

    #[test]
    fn spec_codes() {
        assert_eq!(FrontendReq::SetBackendReqFd.code(), 21);
        assert_eq!(FrontendReq::GetSharedObject.code(), 41);
        assert_eq!(FrontendReq::SetDeviceStateFd.code(), 42);
        assert_eq!(FrontendReq::CheckDeviceState.code(), 43);
        assert_eq!(FrontendReq::GetShmemConfig.code(), 44);
        assert_eq!(FrontendReq::GetVringBaseSkipDrain.code(), 45);
        assert_eq!(BackendReq::SharedObjectAdd.code(), 6);
        assert_eq!(BackendReq::SharedObjectLookup.code(), 8);
        assert_eq!(BackendReq::ShmemMap.code(), 9);
        assert_eq!(BackendReq::ShmemUnmap.code(), 10);
        assert_eq!(FrontendReq::GetFeatures.name(), "GET_FEATURES");
        assert_eq!(BackendReq::ShmemMap.name(), "SHMEM_MAP");
    }

    #[test]
    fn feature_gates() {
        use protocol_features as pf;
        assert_eq!(
            FrontendReq::GetConfig.required_protocol_feature(),
            Some(pf::CONFIG)
        );
        assert_eq!(
            FrontendReq::AddMemReg.required_protocol_feature(),
            Some(pf::CONFIGURE_MEM_SLOTS)
        );
        assert_eq!(
            FrontendReq::SetBackendReqFd.required_protocol_feature(),
            Some(pf::BACKEND_REQ)
        );
        assert_eq!(FrontendReq::GetFeatures.required_protocol_feature(), None);
        assert_eq!(
            BackendReq::ShmemMap.required_protocol_feature(),
            Some(pf::SHMEM)
        );
        let gates = FrontendReq::ALL
            .iter()
            .map(|r| r.spec())
            .chain(BackendReq::ALL.iter().map(|r| r.spec()));
        for spec in gates {
            if let Some(bit) = spec.gate {
                assert!(pf::name(bit).is_some(), "{}", spec.name);
            }
        }
        // The one gate outside ALL is the one request this crate only names.
        let unserved: Vec<_> = FrontendReq::ALL
            .iter()
            .filter(|r| {
                r.required_protocol_feature()
                    .is_some_and(|b| b & pf::ALL == 0)
            })
            .collect();
        assert_eq!(unserved, [&FrontendReq::GetVringBaseSkipDrain]);
    }

    /// The rules of each line agree with each other: an fd on a reply needs a reply; a
    /// body rule that counts fds needs a body that says how many; a `GET_` request has a
    /// reply; a request that carries fds over the back-end channel is the only fd kind
    /// there (BACKEND_SEND_FD).
    #[test]
    fn table_rules_are_consistent() {
        for &k in FrontendReq::ALL {
            let s = k.spec();
            assert!(!s.reply_fd || s.has_reply(), "{}", s.name);
            if s.name.starts_with("GET_") {
                assert!(s.has_reply(), "{}", s.name);
            }
            match s.fds {
                FdRule::PerRegion => assert_eq!(s.body, "MemTable"),
                FdRule::EventUnlessNofd => assert_eq!(s.body, "u8"),
                FdRule::OneUnlessNofd => panic!("{}: no front-end body holds NOFD", s.name),
                _ => {}
            }
            if s.reply == ReplyRule::SameAsRequest {
                assert_ne!(s.body, "()", "{}", s.name);
            }
        }
        assert_eq!(
            FrontendReq::GetInflightFd.spec().reply.expected_size(24),
            24
        );
        assert_eq!(FrontendReq::GetConfig.spec().reply.expected_size(20), 20);
        assert_eq!(FrontendReq::PostcopyAdvise.spec().reply.expected_size(0), 0);
        assert_eq!(FrontendReq::SetOwner.spec().reply.expected_size(0), 8);
        for &k in BackendReq::ALL {
            let s = k.spec();
            assert!(!s.reply_fd || s.has_reply(), "{}", s.name);
            assert!(
                matches!(s.reply, ReplyRule::Ack | ReplyRule::U64),
                "{}: back-end requests are answered with a u64",
                s.name
            );
        }
    }

    #[test]
    fn protocol_feature_names() {
        use protocol_features as pf;
        assert_eq!(pf::ALL, (1 << 23) - 1);
        assert_eq!(pf::TABLE.len(), 24);
        for (i, (name, mask, doc)) in pf::TABLE.iter().enumerate() {
            assert_eq!(*mask, 1 << i, "{name}");
            assert_eq!(pf::name(*mask), Some(*name));
            assert!(!doc.trim().is_empty(), "{name}");
        }
        assert_eq!(pf::name(pf::MQ), Some("MQ"));
        assert_eq!(pf::name(pf::BACKEND_REQ), Some("BACKEND_REQ"));
        assert_eq!(pf::name(pf::DEVICE_STATE), Some("DEVICE_STATE"));
        assert_eq!(pf::name(pf::GPA_ADDRESSES), Some("GPA_ADDRESSES"));
        assert_eq!(pf::name(pf::SHMEM), Some("SHMEM"));
        assert_eq!(pf::SHMEM, 1 << 22);
        assert_eq!(pf::GET_VRING_BASE_SKIP_DRAIN, 1 << 23);
        assert_eq!(pf::name(0), None);
        assert_eq!(pf::name(pf::MQ | pf::RARP), None);
        assert_eq!(pf::name(1 << 24), None);
        assert_eq!(pf::name(1 << 63), None);
        assert_eq!(VHOST_USER_F_PROTOCOL_FEATURES, 0x4000_0000);
    }
}
