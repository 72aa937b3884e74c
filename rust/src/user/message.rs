//! Decoded requests of both channels, with the fds they carry.
//!
//! `decode` gets the body (already bounded by [`Header::check_request`]) and every fd that
//! arrived with the header. It checks the body layout and the fd count of that request;
//! any error drops the `Vec<OwnedFd>`, which closes every fd (ADVERSARIAL B1, B3, B4).
//! `encode_body` is the inverse for the body; fds travel beside it (see `fds`).
//!
//! [`Header::check_request`]: super::header::Header::check_request

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::codes::{BackendReq, FrontendReq};
use super::payload::{
    iotlb, ConfigPayload, CryptoSessionPayload, DeviceStateTransfer, InflightDesc, IotlbPayload,
    LogDesc, MemRegion, MemTable, RarpPayload, SharedObjectUuid, ShmemMapPayload, SingleMemRegion,
    U64Payload, VringAddrPayload, VringArea, VringFdPayload, VringState,
};
use super::{Error, Result};
use crate::backend::VringAddrs;

/// A request from the front-end, decoded and validated.
#[derive(Debug)]
pub enum FrontendRequest {
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
        fds: Vec<OwnedFd>,
    },
    /// See [`FrontendReq::SetLogBase`].
    SetLogBase {
        /// Size and offset of the log in `fd`.
        log: LogDesc,
        /// The log's memfd.
        fd: OwnedFd,
    },
    /// The log's eventfd.
    SetLogFd(OwnedFd),
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
        fd: Option<OwnedFd>,
    },
    /// See [`FrontendReq::SetVringCall`]; `fd` is `None` exactly when NOFD was set.
    SetVringCall {
        /// The queue index.
        index: u8,
        /// The eventfd.
        fd: Option<OwnedFd>,
    },
    /// See [`FrontendReq::SetVringErr`]; `fd` is `None` exactly when NOFD was set.
    SetVringErr {
        /// The queue index.
        index: u8,
        /// The eventfd.
        fd: Option<OwnedFd>,
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
    SetBackendReqFd(OwnedFd),
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
        fd: OwnedFd,
    },
    /// The GPU protocol socket.
    GpuSetSocket(OwnedFd),
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
        fd: OwnedFd,
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
        fd: OwnedFd,
    },
    /// See [`FrontendReq::CheckDeviceState`].
    CheckDeviceState,
    /// See [`FrontendReq::GetShmemConfig`].
    GetShmemConfig,
}

/// A request from the back-end on the back-end channel, decoded and validated.
#[derive(Debug)]
pub enum BackendRequest {
    /// Type `MISS` or `ACCESS_FAIL`.
    IotlbMsg(IotlbPayload),
    /// See [`BackendReq::ConfigChangeMsg`].
    ConfigChange,
    /// `fd` is `None` exactly when `area.nofd` is set (deregister the notifier).
    VringHostNotifier {
        /// Queue index, offset and size of the doorbell page.
        area: VringArea,
        /// The page's fd.
        fd: Option<OwnedFd>,
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
        fd: OwnedFd,
    },
    /// The range to unmap.
    ShmemUnmap(ShmemMapPayload),
}

/// Puts the request name on size and parameter errors raised by payload parsers.
fn named(e: Error, name: &'static str) -> Error {
    match e {
        Error::InvalidSize { expected, got, .. } => Error::InvalidSize {
            request: name,
            expected,
            got,
        },
        Error::InvalidParam(msg) => Error::InvalidParam(format!("{name}: {msg}")),
        other => other,
    }
}

fn fd_count(name: &'static str, expected: &'static str, fds: &[OwnedFd]) -> Error {
    Error::FdCount {
        request: name,
        expected,
        got: fds.len(),
    }
}

fn no_fds(name: &'static str, fds: Vec<OwnedFd>) -> Result<()> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(fd_count(name, "0", &fds))
    }
}

fn one_fd(name: &'static str, mut fds: Vec<OwnedFd>) -> Result<OwnedFd> {
    match fds.len() {
        1 => fds.pop().ok_or_else(|| fd_count(name, "1", &[])),
        _ => Err(fd_count(name, "1", &fds)),
    }
}

/// An fd exactly when the NOFD flag is clear (B4).
fn fd_unless_nofd(name: &'static str, nofd: bool, fds: Vec<OwnedFd>) -> Result<Option<OwnedFd>> {
    if nofd {
        if fds.is_empty() {
            Ok(None)
        } else {
            Err(fd_count(name, "0 (NOFD flag set)", &fds))
        }
    } else if fds.len() == 1 {
        Ok(fds.into_iter().next())
    } else {
        Err(fd_count(name, "1 (NOFD flag clear)", &fds))
    }
}

fn empty(name: &'static str, body: &[u8]) -> Result<()> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidSize {
            request: name,
            expected: "0".into(),
            got: body.len(),
        })
    }
}

/// A header-only request with no fds.
fn bare(name: &'static str, body: &[u8], fds: Vec<OwnedFd>) -> Result<()> {
    empty(name, body)?;
    no_fds(name, fds)
}

fn u64_body(name: &'static str, body: &[u8], fds: Vec<OwnedFd>) -> Result<u64> {
    no_fds(name, fds)?;
    Ok(U64Payload::from_bytes(body)?.0)
}

fn state_body(name: &'static str, body: &[u8], fds: Vec<OwnedFd>) -> Result<VringState> {
    no_fds(name, fds)?;
    VringState::from_bytes(body)
}

fn check_num(state: VringState, allowed: &[u32], what: &str) -> Result<VringState> {
    if allowed.contains(&state.num) {
        Ok(state)
    } else {
        Err(Error::InvalidParam(format!(
            "{what} {} for ring {}, expected one of {allowed:?}",
            state.num, state.index
        )))
    }
}

fn vring_fd_body(
    name: &'static str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<(u8, Option<OwnedFd>)> {
    let p = VringFdPayload::from_bytes(body)?;
    let fd = fd_unless_nofd(name, p.nofd, fds)?;
    if let Some(fd) = &fd {
        check_pollable(name, fd)?;
    }
    Ok((p.index, fd))
}

/// Kick, call and err fds are waited on (epoll, poll): a regular file, directory or block
/// device would be refused by epoll (EPERM) or read as always-ready, so it is rejected
/// here, before a handler or worker sees it (ADVERSARIAL B6).
fn check_pollable(name: &'static str, fd: &OwnedFd) -> Result<()> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer for a valid fd that we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let kind = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
    if matches!(kind, libc::S_IFREG | libc::S_IFDIR | libc::S_IFBLK) {
        return Err(Error::InvalidParam(format!(
            "{name}: the fd is a regular file, directory or block device, not an event fd"
        )));
    }
    Ok(())
}

fn vring_fd_bytes(index: u8, fd: &Option<OwnedFd>) -> Vec<u8> {
    VringFdPayload {
        index,
        nofd: fd.is_none(),
    }
    .to_bytes()
}

impl FrontendRequest {
    /// The request's code, to name it in errors and check its feature gate.
    pub fn kind(&self) -> FrontendReq {
        use FrontendReq as K;
        use FrontendRequest as R;
        match self {
            R::GetFeatures => K::GetFeatures,
            R::SetFeatures(_) => K::SetFeatures,
            R::SetOwner => K::SetOwner,
            R::ResetOwner => K::ResetOwner,
            R::SetMemTable { .. } => K::SetMemTable,
            R::SetLogBase { .. } => K::SetLogBase,
            R::SetLogFd(_) => K::SetLogFd,
            R::SetVringNum(_) => K::SetVringNum,
            R::SetVringAddr(_) => K::SetVringAddr,
            R::SetVringBase(_) => K::SetVringBase,
            R::GetVringBase(_) => K::GetVringBase,
            R::SetVringKick { .. } => K::SetVringKick,
            R::SetVringCall { .. } => K::SetVringCall,
            R::SetVringErr { .. } => K::SetVringErr,
            R::GetProtocolFeatures => K::GetProtocolFeatures,
            R::SetProtocolFeatures(_) => K::SetProtocolFeatures,
            R::GetQueueNum => K::GetQueueNum,
            R::SetVringEnable(_) => K::SetVringEnable,
            R::SendRarp(_) => K::SendRarp,
            R::NetSetMtu(_) => K::NetSetMtu,
            R::SetBackendReqFd(_) => K::SetBackendReqFd,
            R::IotlbMsg(_) => K::IotlbMsg,
            R::SetVringEndian(_) => K::SetVringEndian,
            R::GetConfig(_) => K::GetConfig,
            R::SetConfig(_) => K::SetConfig,
            R::CreateCryptoSession(_) => K::CreateCryptoSession,
            R::CloseCryptoSession(_) => K::CloseCryptoSession,
            R::PostcopyAdvise => K::PostcopyAdvise,
            R::PostcopyListen => K::PostcopyListen,
            R::PostcopyEnd => K::PostcopyEnd,
            R::GetInflightFd(_) => K::GetInflightFd,
            R::SetInflightFd { .. } => K::SetInflightFd,
            R::GpuSetSocket(_) => K::GpuSetSocket,
            R::ResetDevice => K::ResetDevice,
            R::VringKick(_) => K::VringKick,
            R::GetMaxMemSlots => K::GetMaxMemSlots,
            R::AddMemReg { .. } => K::AddMemReg,
            R::RemMemReg(_) => K::RemMemReg,
            R::SetStatus(_) => K::SetStatus,
            R::GetStatus => K::GetStatus,
            R::GetSharedObject(_) => K::GetSharedObject,
            R::SetDeviceStateFd { .. } => K::SetDeviceStateFd,
            R::CheckDeviceState => K::CheckDeviceState,
            R::GetShmemConfig => K::GetShmemConfig,
        }
    }

    /// Decodes a request whose header passed `check_request` (`body.len()` is the
    /// header's size). Validates the body layout, its field rules and the number of fds;
    /// on error every fd in `fds` is closed.
    pub fn decode(code: FrontendReq, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self> {
        Self::decode_inner(code, body, fds).map_err(|e| named(e, code.name()))
    }

    fn decode_inner(code: FrontendReq, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self> {
        use FrontendReq as K;
        use FrontendRequest as R;
        let name = code.name();
        Ok(match code {
            K::GetFeatures => bare(name, body, fds).map(|_| R::GetFeatures)?,
            K::SetOwner => bare(name, body, fds).map(|_| R::SetOwner)?,
            K::ResetOwner => bare(name, body, fds).map(|_| R::ResetOwner)?,
            K::GetProtocolFeatures => bare(name, body, fds).map(|_| R::GetProtocolFeatures)?,
            K::GetQueueNum => bare(name, body, fds).map(|_| R::GetQueueNum)?,
            K::PostcopyAdvise => bare(name, body, fds).map(|_| R::PostcopyAdvise)?,
            K::PostcopyListen => bare(name, body, fds).map(|_| R::PostcopyListen)?,
            K::PostcopyEnd => bare(name, body, fds).map(|_| R::PostcopyEnd)?,
            K::ResetDevice => bare(name, body, fds).map(|_| R::ResetDevice)?,
            K::GetMaxMemSlots => bare(name, body, fds).map(|_| R::GetMaxMemSlots)?,
            K::GetStatus => bare(name, body, fds).map(|_| R::GetStatus)?,
            K::CheckDeviceState => bare(name, body, fds).map(|_| R::CheckDeviceState)?,
            K::GetShmemConfig => bare(name, body, fds).map(|_| R::GetShmemConfig)?,

            K::SetFeatures => R::SetFeatures(u64_body(name, body, fds)?),
            K::SetProtocolFeatures => R::SetProtocolFeatures(u64_body(name, body, fds)?),
            K::NetSetMtu => R::NetSetMtu(u64_body(name, body, fds)?),
            K::CloseCryptoSession => R::CloseCryptoSession(u64_body(name, body, fds)?),
            K::SetStatus => R::SetStatus(u64_body(name, body, fds)?),

            K::SetMemTable => {
                let table = MemTable::from_bytes(body)?;
                if fds.len() != table.regions.len() {
                    return Err(fd_count(name, "one per region", &fds));
                }
                R::SetMemTable { table, fds }
            }
            K::SetLogBase => {
                let log = LogDesc::from_bytes(body)?;
                R::SetLogBase {
                    log,
                    fd: one_fd(name, fds)?,
                }
            }
            K::SetLogFd => {
                empty(name, body)?;
                R::SetLogFd(one_fd(name, fds)?)
            }
            K::SetBackendReqFd => {
                empty(name, body)?;
                R::SetBackendReqFd(one_fd(name, fds)?)
            }
            K::GpuSetSocket => {
                empty(name, body)?;
                R::GpuSetSocket(one_fd(name, fds)?)
            }

            // Queue sizes, bases and indices depend on the device: the back-end checks them.
            K::SetVringNum => R::SetVringNum(state_body(name, body, fds)?),
            K::SetVringBase => R::SetVringBase(state_body(name, body, fds)?),
            // The spec reserves `num` here (must be 0), but a pending change lets it
            // carry flags with GET_VRING_BASE_INFLIGHT, so it is passed through.
            K::GetVringBase => R::GetVringBase(state_body(name, body, fds)?),
            K::SetVringEnable => {
                R::SetVringEnable(check_num(state_body(name, body, fds)?, &[0, 1], "enable")?)
            }
            K::SetVringEndian => R::SetVringEndian(check_num(
                state_body(name, body, fds)?,
                &[0, 1],
                "endianness",
            )?),
            K::VringKick => R::VringKick(check_num(
                state_body(name, body, fds)?,
                &[0],
                "reserved num",
            )?),
            K::SetVringAddr => {
                no_fds(name, fds)?;
                R::SetVringAddr(VringAddrPayload::from_bytes(body)?.0)
            }

            K::SetVringKick => {
                let (index, fd) = vring_fd_body(name, body, fds)?;
                R::SetVringKick { index, fd }
            }
            K::SetVringCall => {
                let (index, fd) = vring_fd_body(name, body, fds)?;
                R::SetVringCall { index, fd }
            }
            K::SetVringErr => {
                let (index, fd) = vring_fd_body(name, body, fds)?;
                R::SetVringErr { index, fd }
            }

            K::SendRarp => {
                no_fds(name, fds)?;
                R::SendRarp(RarpPayload::from_bytes(body)?.0)
            }
            K::IotlbMsg => {
                no_fds(name, fds)?;
                let m = IotlbPayload::from_bytes(body)?;
                if m.kind != iotlb::UPDATE && m.kind != iotlb::INVALIDATE {
                    return Err(Error::InvalidParam(format!(
                        "IOTLB message type {} is not sent by a front-end",
                        m.kind
                    )));
                }
                R::IotlbMsg(m)
            }
            K::GetConfig => {
                no_fds(name, fds)?;
                R::GetConfig(ConfigPayload::from_bytes(body)?)
            }
            K::SetConfig => {
                no_fds(name, fds)?;
                R::SetConfig(ConfigPayload::from_bytes(body)?)
            }
            K::CreateCryptoSession => {
                no_fds(name, fds)?;
                R::CreateCryptoSession(CryptoSessionPayload::from_bytes(body)?.0)
            }
            K::GetInflightFd => {
                no_fds(name, fds)?;
                let desc = InflightDesc::from_bytes(body)?;
                desc.check_queues()?;
                R::GetInflightFd(desc)
            }
            K::SetInflightFd => {
                let desc = InflightDesc::from_bytes(body)?;
                desc.check_queues()?;
                desc.check_mapping()?;
                R::SetInflightFd {
                    desc,
                    fd: one_fd(name, fds)?,
                }
            }
            K::AddMemReg => {
                let region = SingleMemRegion::from_bytes(body)?.region;
                R::AddMemReg {
                    region,
                    fd: one_fd(name, fds)?,
                }
            }
            K::RemMemReg => {
                if fds.len() > 1 {
                    return Err(fd_count(name, "0 or 1", &fds));
                }
                // A stray fd is closed right here, unused.
                drop(fds);
                R::RemMemReg(SingleMemRegion::from_bytes(body)?.region)
            }
            K::GetSharedObject => {
                no_fds(name, fds)?;
                R::GetSharedObject(SharedObjectUuid::from_bytes(body)?)
            }
            K::SetDeviceStateFd => {
                let transfer = DeviceStateTransfer::from_bytes(body)?;
                R::SetDeviceStateFd {
                    transfer,
                    fd: one_fd(name, fds)?,
                }
            }
        })
    }

    /// The body bytes; `decode(self.kind(), &self.encode_body(), fds)` gives the request
    /// back when the fds match.
    pub fn encode_body(&self) -> Vec<u8> {
        use FrontendRequest as R;
        match self {
            R::GetFeatures
            | R::SetOwner
            | R::ResetOwner
            | R::SetLogFd(_)
            | R::GetProtocolFeatures
            | R::GetQueueNum
            | R::SetBackendReqFd(_)
            | R::PostcopyAdvise
            | R::PostcopyListen
            | R::PostcopyEnd
            | R::GpuSetSocket(_)
            | R::ResetDevice
            | R::GetMaxMemSlots
            | R::GetStatus
            | R::CheckDeviceState
            | R::GetShmemConfig => Vec::new(),
            R::SetFeatures(v)
            | R::SetProtocolFeatures(v)
            | R::NetSetMtu(v)
            | R::CloseCryptoSession(v)
            | R::SetStatus(v) => U64Payload(*v).to_bytes(),
            R::SetMemTable { table, .. } => table.to_bytes(),
            R::SetLogBase { log, .. } => log.to_bytes(),
            R::SetVringNum(s)
            | R::SetVringBase(s)
            | R::GetVringBase(s)
            | R::SetVringEnable(s)
            | R::SetVringEndian(s)
            | R::VringKick(s) => s.to_bytes(),
            R::SetVringAddr(a) => VringAddrPayload(*a).to_bytes(),
            R::SetVringKick { index, fd }
            | R::SetVringCall { index, fd }
            | R::SetVringErr { index, fd } => vring_fd_bytes(*index, fd),
            R::SendRarp(mac) => RarpPayload(*mac).to_bytes(),
            R::IotlbMsg(m) => m.to_bytes(),
            R::GetConfig(c) | R::SetConfig(c) => c.to_bytes(),
            R::CreateCryptoSession(b) => b.clone(),
            R::GetInflightFd(d) | R::SetInflightFd { desc: d, .. } => d.to_bytes(),
            R::AddMemReg { region, .. } | R::RemMemReg(region) => {
                SingleMemRegion { region: *region }.to_bytes()
            }
            R::GetSharedObject(u) => u.to_bytes(),
            R::SetDeviceStateFd { transfer, .. } => transfer.to_bytes(),
        }
    }

    /// The fds this request carries, in wire order.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        use FrontendRequest as R;
        match self {
            R::SetMemTable { fds, .. } => fds.iter().map(|f| f.as_fd()).collect(),
            R::SetLogBase { fd, .. }
            | R::SetInflightFd { fd, .. }
            | R::AddMemReg { fd, .. }
            | R::SetDeviceStateFd { fd, .. }
            | R::SetLogFd(fd)
            | R::SetBackendReqFd(fd)
            | R::GpuSetSocket(fd) => vec![fd.as_fd()],
            R::SetVringKick { fd, .. } | R::SetVringCall { fd, .. } | R::SetVringErr { fd, .. } => {
                fd.iter().map(|f| f.as_fd()).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl BackendRequest {
    /// The request's code, to name it in errors and check its feature gate.
    pub fn kind(&self) -> BackendReq {
        use BackendReq as K;
        use BackendRequest as R;
        match self {
            R::IotlbMsg(_) => K::IotlbMsg,
            R::ConfigChange => K::ConfigChangeMsg,
            R::VringHostNotifier { .. } => K::VringHostNotifierMsg,
            R::VringCall(_) => K::VringCall,
            R::VringErr(_) => K::VringErr,
            R::SharedObjectAdd(_) => K::SharedObjectAdd,
            R::SharedObjectRemove(_) => K::SharedObjectRemove,
            R::SharedObjectLookup(_) => K::SharedObjectLookup,
            R::ShmemMap { .. } => K::ShmemMap,
            R::ShmemUnmap(_) => K::ShmemUnmap,
        }
    }

    /// As [`FrontendRequest::decode`], for the back-end channel.
    pub fn decode(code: BackendReq, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self> {
        Self::decode_inner(code, body, fds).map_err(|e| named(e, code.name()))
    }

    fn decode_inner(code: BackendReq, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self> {
        use BackendReq as K;
        use BackendRequest as R;
        let name = code.name();
        Ok(match code {
            K::IotlbMsg => {
                no_fds(name, fds)?;
                let m = IotlbPayload::from_bytes(body)?;
                if m.kind != iotlb::MISS && m.kind != iotlb::ACCESS_FAIL {
                    return Err(Error::InvalidParam(format!(
                        "IOTLB message type {} is not sent by a back-end",
                        m.kind
                    )));
                }
                R::IotlbMsg(m)
            }
            K::ConfigChangeMsg => bare(name, body, fds).map(|_| R::ConfigChange)?,
            K::VringHostNotifierMsg => {
                let area = VringArea::from_bytes(body)?;
                let fd = fd_unless_nofd(name, area.nofd, fds)?;
                R::VringHostNotifier { area, fd }
            }
            K::VringCall => R::VringCall(check_num(
                state_body(name, body, fds)?,
                &[0],
                "reserved num",
            )?),
            K::VringErr => R::VringErr(check_num(
                state_body(name, body, fds)?,
                &[0],
                "reserved num",
            )?),
            K::SharedObjectAdd => {
                no_fds(name, fds)?;
                R::SharedObjectAdd(SharedObjectUuid::from_bytes(body)?)
            }
            K::SharedObjectRemove => {
                no_fds(name, fds)?;
                R::SharedObjectRemove(SharedObjectUuid::from_bytes(body)?)
            }
            K::SharedObjectLookup => {
                no_fds(name, fds)?;
                R::SharedObjectLookup(SharedObjectUuid::from_bytes(body)?)
            }
            K::ShmemMap => {
                let map = ShmemMapPayload::from_bytes(body)?;
                R::ShmemMap {
                    map,
                    fd: one_fd(name, fds)?,
                }
            }
            K::ShmemUnmap => {
                no_fds(name, fds)?;
                R::ShmemUnmap(ShmemMapPayload::from_bytes(body)?)
            }
        })
    }

    /// The body bytes; `decode(self.kind(), &self.encode_body(), fds)` round-trips.
    pub fn encode_body(&self) -> Vec<u8> {
        use BackendRequest as R;
        match self {
            R::IotlbMsg(m) => m.to_bytes(),
            R::ConfigChange => Vec::new(),
            R::VringHostNotifier { area, .. } => area.to_bytes(),
            R::VringCall(s) | R::VringErr(s) => s.to_bytes(),
            R::SharedObjectAdd(u) | R::SharedObjectRemove(u) | R::SharedObjectLookup(u) => {
                u.to_bytes()
            }
            R::ShmemMap { map, .. } | R::ShmemUnmap(map) => map.to_bytes(),
        }
    }

    /// The fds this request carries.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            BackendRequest::VringHostNotifier { fd: Some(fd), .. }
            | BackendRequest::ShmemMap { fd, .. } => vec![fd.as_fd()],
            _ => Vec::new(),
        }
    }
}

/// Whether the back-end answers this request with a reply of its own, whatever
/// REPLY_ACK says. Everything else gets a reply only as a REPLY_ACK ack (`NEED_REPLY`
/// set and REPLY_ACK negotiated).
///
/// From the spec's per-request "reply payload" entries:
/// - every `GET_*` request, `GET_VRING_BASE`, `GET_INFLIGHT_FD` and `GET_SHARED_OBJECT`;
/// - `SET_LOG_BASE` (the spec: "if LOG_SHMFD", which [`FrontendReq::SetLogBase`]
///   requires anyway);
/// - `IOTLB_MSG` ("the back-end has to acknowledge"; QEMU also sets `NEED_REPLY`,
///   and a front-end should too, since some back-ends answer only then);
/// - `CREATE_CRYPTO_SESSION`, `POSTCOPY_ADVISE` (the userfaultfd), `POSTCOPY_END`;
/// - `SET_DEVICE_STATE_FD` and `CHECK_DEVICE_STATE`.
///
/// Not included: `POSTCOPY_LISTEN` (spec: no reply; QEMU sets `NEED_REPLY` on it even
/// without REPLY_ACK and waits, so a back-end serving QEMU should answer any request
/// with `NEED_REPLY`), and `SET_MEM_TABLE` / `ADD_MEM_REG`, which reply only in
/// postcopy mode, a state the session tracks.
///
/// Reply bodies QEMU checks: a u64 for the `GET_*` scalars, `SET_LOG_BASE`, `IOTLB_MSG`,
/// `POSTCOPY_END`, `SET_DEVICE_STATE_FD` (see `DeviceStateReply`) and
/// `CHECK_DEVICE_STATE`; a `VringState` for `GET_VRING_BASE`; an `InflightDesc` for
/// `GET_INFLIGHT_FD`; a `ConfigPayload` of the requested range for `GET_CONFIG`; and an
/// *empty* body (QEMU rejects any other size) plus the userfaultfd for
/// `POSTCOPY_ADVISE`.
pub fn has_reply(code: FrontendReq) -> bool {
    use FrontendReq as K;
    matches!(
        code,
        K::GetFeatures
            | K::GetProtocolFeatures
            | K::GetQueueNum
            | K::GetVringBase
            | K::GetConfig
            | K::GetInflightFd
            | K::GetMaxMemSlots
            | K::GetStatus
            | K::GetSharedObject
            | K::GetShmemConfig
            | K::SetLogBase
            | K::IotlbMsg
            | K::CreateCryptoSession
            | K::PostcopyAdvise
            | K::PostcopyEnd
            | K::SetDeviceStateFd
            | K::CheckDeviceState
    )
}

/// Whether a reply to this request may carry an fd: the inflight area
/// (`GET_INFLIGHT_FD`), the userfaultfd (`POSTCOPY_ADVISE`), a dma-buf
/// (`GET_SHARED_OBJECT`), the back-end's end of the state channel
/// (`SET_DEVICE_STATE_FD`). An fd on any other reply is a protocol error (H2).
pub fn reply_allows_fd(code: FrontendReq) -> bool {
    use FrontendReq as K;
    matches!(
        code,
        K::GetInflightFd | K::PostcopyAdvise | K::GetSharedObject | K::SetDeviceStateFd
    )
}

/// Whether the front-end always answers this back-end request: only
/// `SHARED_OBJECT_LOOKUP` (a u64 status and, on success, the dma-buf fd). The others
/// are answered only as REPLY_ACK acks.
pub fn backend_has_reply(code: BackendReq) -> bool {
    code == BackendReq::SharedObjectLookup
}

/// Whether a front-end reply to this back-end request may carry an fd
/// (`SHARED_OBJECT_LOOKUP` only).
pub fn backend_reply_allows_fd(code: BackendReq) -> bool {
    code == BackendReq::SharedObjectLookup
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::payload::{ShmemConfig, SHMEM_MAP_FLAG_RW};
    use std::fs::File;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn fd() -> OwnedFd {
        OwnedFd::from(File::open("/dev/null").unwrap())
    }

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n).map(|_| fd()).collect()
    }

    fn region(gpa: u64, user: u64) -> MemRegion {
        MemRegion {
            guest_phys_addr: gpa,
            memory_size: 0x10_0000,
            userspace_addr: user,
            mmap_offset: 0x1000,
        }
    }

    /// One request of every kind, valid, with its fds.
    fn every_frontend_request() -> Vec<FrontendRequest> {
        use FrontendRequest as R;
        let state = VringState { index: 1, num: 0 };
        let desc = InflightDesc {
            mmap_size: 0x4000,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        };
        let config = ConfigPayload {
            offset: 0,
            size: 8,
            flags: 0,
            data: (1..=8).collect(),
        };
        vec![
            R::GetFeatures,
            R::SetFeatures(0x1_4000_0000),
            R::SetOwner,
            R::ResetOwner,
            R::SetMemTable {
                table: MemTable {
                    regions: vec![
                        region(0, 0x7f00_0000_0000),
                        region(0x1_0000_0000, 0x7e00_0000_0000),
                    ],
                },
                fds: fds(2),
            },
            R::SetLogBase {
                log: LogDesc {
                    mmap_size: 0x1000,
                    mmap_offset: 0,
                },
                fd: fd(),
            },
            R::SetLogFd(fd()),
            R::SetVringNum(VringState { index: 0, num: 256 }),
            R::SetVringAddr(VringAddrs {
                index: 1,
                flags: 0,
                desc: 0x1000,
                used: 0x3000,
                avail: 0x2000,
                log: 0,
            }),
            R::SetVringBase(VringState { index: 0, num: 7 }),
            R::GetVringBase(state),
            R::SetVringKick {
                index: 0,
                fd: Some(fd()),
            },
            R::SetVringCall { index: 1, fd: None },
            R::SetVringErr {
                index: 255,
                fd: Some(fd()),
            },
            R::GetProtocolFeatures,
            R::SetProtocolFeatures(0x8),
            R::GetQueueNum,
            R::SetVringEnable(VringState { index: 1, num: 1 }),
            R::SendRarp([0x52, 0x54, 0, 1, 2, 3]),
            R::NetSetMtu(1500),
            R::SetBackendReqFd(fd()),
            R::IotlbMsg(IotlbPayload {
                iova: 0x1000,
                size: 0x1000,
                uaddr: 0x7f00_0000_0000,
                perm: iotlb::PERM_RW,
                kind: iotlb::UPDATE,
            }),
            R::SetVringEndian(VringState { index: 0, num: 1 }),
            R::GetConfig(config.clone()),
            R::SetConfig(ConfigPayload { flags: 1, ..config }),
            R::CreateCryptoSession(vec![9; 100]),
            R::CloseCryptoSession(42),
            R::PostcopyAdvise,
            R::PostcopyListen,
            R::PostcopyEnd,
            R::GetInflightFd(InflightDesc {
                mmap_size: 0,
                ..desc
            }),
            R::SetInflightFd { desc, fd: fd() },
            R::GpuSetSocket(fd()),
            R::ResetDevice,
            R::VringKick(state),
            R::GetMaxMemSlots,
            R::AddMemReg {
                region: region(0x2_0000_0000, 0x7d00_0000_0000),
                fd: fd(),
            },
            R::RemMemReg(region(0x2_0000_0000, 0x7d00_0000_0000)),
            R::SetStatus(0xF),
            R::GetStatus,
            R::GetSharedObject(SharedObjectUuid([7; 16])),
            R::SetDeviceStateFd {
                transfer: DeviceStateTransfer {
                    direction: DeviceStateTransfer::DIRECTION_LOAD,
                    phase: DeviceStateTransfer::PHASE_STOPPED,
                },
                fd: fd(),
            },
            R::CheckDeviceState,
            R::GetShmemConfig,
        ]
    }

    fn every_backend_request() -> Vec<BackendRequest> {
        use BackendRequest as R;
        let map = ShmemMapPayload {
            shmid: 0,
            fd_offset: 0,
            shm_offset: 0x10_0000,
            len: 0x1000,
            flags: SHMEM_MAP_FLAG_RW,
        };
        vec![
            R::IotlbMsg(IotlbPayload {
                iova: 0x5000,
                size: 0,
                uaddr: 0,
                perm: iotlb::PERM_RO,
                kind: iotlb::MISS,
            }),
            R::ConfigChange,
            R::VringHostNotifier {
                area: VringArea {
                    index: 3,
                    nofd: false,
                    size: 0x1000,
                    offset: 0x3000,
                },
                fd: Some(fd()),
            },
            R::VringCall(VringState { index: 2, num: 0 }),
            R::VringErr(VringState { index: 0, num: 0 }),
            R::SharedObjectAdd(SharedObjectUuid([1; 16])),
            R::SharedObjectRemove(SharedObjectUuid([2; 16])),
            R::SharedObjectLookup(SharedObjectUuid([3; 16])),
            R::ShmemMap { map, fd: fd() },
            R::ShmemUnmap(ShmemMapPayload { flags: 0, ..map }),
        ]
    }

    /// Duplicates the fds of a request so it can be decoded again.
    fn dup_fds(fds: &[BorrowedFd<'_>]) -> Vec<OwnedFd> {
        fds.iter()
            .map(|f| f.try_clone_to_owned().unwrap())
            .collect()
    }

    #[test]
    fn frontend_round_trip_every_variant() {
        let all = every_frontend_request();
        let kinds: Vec<_> = all.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, FrontendReq::ALL, "one request per kind, in order");
        for req in &all {
            let body = req.encode_body();
            let fds = dup_fds(&req.fds());
            let n = fds.len();
            let back = FrontendRequest::decode(req.kind(), &body, fds)
                .unwrap_or_else(|e| panic!("{:?}: {e}", req.kind()));
            assert_eq!(back.kind(), req.kind());
            assert_eq!(back.encode_body(), body, "{:?}", req.kind());
            assert_eq!(back.fds().len(), n, "{:?}", req.kind());
        }
    }

    #[test]
    fn backend_round_trip_every_variant() {
        let all = every_backend_request();
        let kinds: Vec<_> = all.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, BackendReq::ALL);
        for req in &all {
            let body = req.encode_body();
            let fds = dup_fds(&req.fds());
            let n = fds.len();
            let back = BackendRequest::decode(req.kind(), &body, fds)
                .unwrap_or_else(|e| panic!("{:?}: {e}", req.kind()));
            assert_eq!(back.kind(), req.kind());
            assert_eq!(back.encode_body(), body);
            assert_eq!(back.fds().len(), n);
        }
    }

    #[test]
    fn frontend_exact_size_every_variant() {
        // A5: one byte more and one byte less than a valid body fail with InvalidSize
        // (or, for variable layouts, a size or parameter error), never a panic.
        for req in every_frontend_request() {
            let body = req.encode_body();
            let mut long = body.clone();
            long.push(0);
            let r = FrontendRequest::decode(req.kind(), &long, dup_fds(&req.fds()));
            if req.kind() == FrontendReq::CreateCryptoSession {
                assert!(r.is_ok(), "opaque body");
                continue;
            }
            assert!(
                matches!(r, Err(Error::InvalidSize { .. } | Error::InvalidParam(_))),
                "{:?} long: {r:?}",
                req.kind()
            );
            if !body.is_empty() {
                let short = &body[..body.len() - 1];
                let r = FrontendRequest::decode(req.kind(), short, dup_fds(&req.fds()));
                assert!(
                    matches!(r, Err(Error::InvalidSize { .. } | Error::InvalidParam(_))),
                    "{:?} short: {r:?}",
                    req.kind()
                );
            }
        }
    }

    #[test]
    fn backend_exact_size_every_variant() {
        for req in every_backend_request() {
            let mut long = req.encode_body();
            long.extend_from_slice(&[0; 8]);
            let r = BackendRequest::decode(req.kind(), &long, dup_fds(&req.fds()));
            assert!(
                matches!(r, Err(Error::InvalidSize { .. })),
                "{:?}",
                req.kind()
            );
        }
    }

    #[test]
    fn size_error_names_the_request() {
        let r = FrontendRequest::decode(FrontendReq::SetVringNum, &[0; 4], vec![]);
        match r {
            Err(Error::InvalidSize {
                request,
                expected,
                got,
            }) => {
                assert_eq!(request, "SET_VRING_NUM");
                assert_eq!(expected, "8");
                assert_eq!(got, 4);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn b1_fds_on_get_features() {
        let r = FrontendRequest::decode(FrontendReq::GetFeatures, &[], fds(3));
        assert!(matches!(
            r,
            Err(Error::FdCount {
                request: "GET_FEATURES",
                got: 3,
                ..
            })
        ));
        // Every fd-less request refuses a stray fd.
        for req in every_frontend_request() {
            if !req.fds().is_empty() || matches!(req, FrontendRequest::RemMemReg(_)) {
                continue;
            }
            let r = FrontendRequest::decode(req.kind(), &req.encode_body(), fds(1));
            assert!(matches!(r, Err(Error::FdCount { .. })), "{:?}", req.kind());
        }
        for req in every_backend_request() {
            if !req.fds().is_empty() {
                continue;
            }
            let r = BackendRequest::decode(req.kind(), &req.encode_body(), fds(1));
            assert!(matches!(r, Err(Error::FdCount { .. })), "{:?}", req.kind());
        }
    }

    /// fds whose closing can be observed: the far ends of socket pairs read EOF once
    /// every near end is closed (fd numbers may be reused meanwhile, EOF cannot lie).
    fn probes(n: usize) -> (Vec<OwnedFd>, Vec<UnixStream>) {
        (0..n)
            .map(|_| {
                let (near, far) = UnixStream::pair().unwrap();
                far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                (OwnedFd::from(near), far)
            })
            .unzip()
    }

    fn assert_all_closed(peers: &[UnixStream]) {
        for mut p in peers {
            let mut buf = [0u8; 1];
            assert_eq!(
                p.read(&mut buf).unwrap(),
                0,
                "an fd of a rejected message is open"
            );
        }
    }

    #[test]
    fn fds_are_closed_on_error() {
        let (fds, peers) = probes(3);
        assert!(FrontendRequest::decode(FrontendReq::GetFeatures, &[], fds).is_err());
        assert_all_closed(&peers);
        // B3: a mem table with the wrong fd count closes all of them.
        let body = MemTable {
            regions: vec![
                region(0, 0x7f00_0000_0000),
                region(0x1_0000_0000, 0x7e00_0000_0000),
            ],
        }
        .to_bytes();
        let (fds, peers) = probes(3);
        assert!(FrontendRequest::decode(FrontendReq::SetMemTable, &body, fds).is_err());
        assert_all_closed(&peers);
        // A bad body with the right fd count closes them too.
        let (fds, peers) = probes(2);
        assert!(FrontendRequest::decode(FrontendReq::SetMemTable, &body[..40], fds).is_err());
        assert_all_closed(&peers);
        let (fds, peers) = probes(1);
        let area = VringArea {
            index: 0,
            nofd: true,
            size: 0,
            offset: 0,
        }
        .to_bytes();
        assert!(BackendRequest::decode(BackendReq::VringHostNotifierMsg, &area, fds).is_err());
        assert_all_closed(&peers);
    }

    #[test]
    fn b3_mem_table_fd_count() {
        let table = MemTable {
            regions: vec![
                region(0, 0x7f00_0000_0000),
                region(0x1_0000_0000, 0x7e00_0000_0000),
            ],
        };
        let body = table.to_bytes();
        for n in [0, 1, 3] {
            let r = FrontendRequest::decode(FrontendReq::SetMemTable, &body, fds(n));
            assert!(
                matches!(r, Err(Error::FdCount { got, .. }) if got == n),
                "{n} fds"
            );
        }
        FrontendRequest::decode(FrontendReq::SetMemTable, &body, fds(2)).unwrap();
    }

    #[test]
    fn c1_mem_table_region_count() {
        let zero = MemTable { regions: vec![] }.to_bytes();
        assert!(matches!(
            FrontendRequest::decode(FrontendReq::SetMemTable, &zero, vec![]),
            Err(Error::InvalidParam(_))
        ));
        let table = |n: u64| {
            MemTable {
                regions: (0..n)
                    .map(|i| region(i << 32, 0x7000_0000_0000 + (i << 32)))
                    .collect(),
            }
            .to_bytes()
        };
        // Past QEMU's 8 and up to rust-vmm's 32, with one fd each.
        for n in [9, 16, 32] {
            let r = FrontendRequest::decode(FrontendReq::SetMemTable, &table(n), fds(n as usize));
            assert!(
                matches!(r, Ok(FrontendRequest::SetMemTable { ref fds, .. }) if fds.len() == n as usize),
                "{n} regions: {r:?}"
            );
        }
        assert!(matches!(
            FrontendRequest::decode(FrontendReq::SetMemTable, &table(33), fds(32)),
            Err(Error::InvalidParam(_))
        ));
    }

    #[test]
    fn c2_c4_through_decode() {
        let overflow = MemTable {
            regions: vec![MemRegion {
                guest_phys_addr: u64::MAX - 0xFFF,
                memory_size: 0x2000,
                userspace_addr: 0,
                mmap_offset: 0,
            }],
        }
        .to_bytes();
        assert!(matches!(
            FrontendRequest::decode(FrontendReq::SetMemTable, &overflow, fds(1)),
            Err(Error::InvalidParam(_))
        ));
        let overlap = MemTable {
            regions: vec![
                region(0, 0x7f00_0000_0000),
                region(0x8_0000, 0x7e00_0000_0000),
            ],
        }
        .to_bytes();
        assert!(matches!(
            FrontendRequest::decode(FrontendReq::SetMemTable, &overlap, fds(2)),
            Err(Error::InvalidParam(_))
        ));
        let zero = SingleMemRegion {
            region: MemRegion {
                memory_size: 0,
                ..region(0, 0)
            },
        }
        .to_bytes();
        assert!(FrontendRequest::decode(FrontendReq::AddMemReg, &zero, fds(1)).is_err());
    }

    #[test]
    fn b4_nofd_rules() {
        for code in [
            FrontendReq::SetVringKick,
            FrontendReq::SetVringCall,
            FrontendReq::SetVringErr,
        ] {
            let with_nofd = 0x100u64.to_ne_bytes();
            let without = 0u64.to_ne_bytes();
            // NOFD and an fd.
            assert!(matches!(
                FrontendRequest::decode(code, &with_nofd, fds(1)),
                Err(Error::FdCount { .. })
            ));
            // No NOFD and no fd.
            assert!(matches!(
                FrontendRequest::decode(code, &without, vec![]),
                Err(Error::FdCount { .. })
            ));
            // Two fds.
            assert!(matches!(
                FrontendRequest::decode(code, &without, fds(2)),
                Err(Error::FdCount { .. })
            ));
            FrontendRequest::decode(code, &with_nofd, vec![]).unwrap();
            FrontendRequest::decode(code, &without, fds(1)).unwrap();
        }
        // Host notifier: same rule on the back-end channel.
        let area = VringArea {
            index: 0,
            nofd: true,
            size: 0,
            offset: 0,
        }
        .to_bytes();
        assert!(BackendRequest::decode(BackendReq::VringHostNotifierMsg, &area, fds(1)).is_err());
        BackendRequest::decode(BackendReq::VringHostNotifierMsg, &area, vec![]).unwrap();
        let area = VringArea {
            index: 0,
            nofd: false,
            size: 0x1000,
            offset: 0,
        }
        .to_bytes();
        assert!(BackendRequest::decode(BackendReq::VringHostNotifierMsg, &area, vec![]).is_err());
    }

    #[test]
    fn b5_reserved_bits() {
        let v = 0x1_0000_0001u64.to_ne_bytes();
        let r = FrontendRequest::decode(FrontendReq::SetVringKick, &v, fds(1));
        assert!(matches!(r, Err(Error::InvalidParam(_))));
        let v = 0x201u64.to_ne_bytes();
        let r = FrontendRequest::decode(FrontendReq::SetVringCall, &v, fds(1));
        assert!(matches!(r, Err(Error::InvalidParam(_))));
    }

    #[test]
    fn state_value_rules() {
        let enable2 = VringState { index: 0, num: 2 }.to_bytes();
        assert!(FrontendRequest::decode(FrontendReq::SetVringEnable, &enable2, vec![]).is_err());
        assert!(FrontendRequest::decode(FrontendReq::SetVringEndian, &enable2, vec![]).is_err());
        let kick1 = VringState { index: 0, num: 1 }.to_bytes();
        assert!(FrontendRequest::decode(FrontendReq::VringKick, &kick1, vec![]).is_err());
        assert!(BackendRequest::decode(BackendReq::VringCall, &kick1, vec![]).is_err());
        assert!(BackendRequest::decode(BackendReq::VringErr, &kick1, vec![]).is_err());
    }

    #[test]
    fn rem_mem_reg_tolerates_one_stray_fd() {
        let body = SingleMemRegion {
            region: region(0, 0x7f00_0000_0000),
        }
        .to_bytes();
        let r = FrontendRequest::decode(FrontendReq::RemMemReg, &body, fds(1)).unwrap();
        assert!(r.fds().is_empty());
        assert!(matches!(
            FrontendRequest::decode(FrontendReq::RemMemReg, &body, fds(2)),
            Err(Error::FdCount { .. })
        ));
    }

    #[test]
    fn fd_requests_need_their_fd() {
        for req in every_frontend_request() {
            let n = req.fds().len();
            if n == 0 {
                continue;
            }
            let body = req.encode_body();
            let r = FrontendRequest::decode(req.kind(), &body, vec![]);
            assert!(
                matches!(r, Err(Error::FdCount { got: 0, .. })),
                "{:?}",
                req.kind()
            );
            let r = FrontendRequest::decode(req.kind(), &body, fds(n + 1));
            assert!(matches!(r, Err(Error::FdCount { .. })), "{:?}", req.kind());
        }
        let req = &every_backend_request()[8];
        assert_eq!(req.kind(), BackendReq::ShmemMap);
        assert!(BackendRequest::decode(BackendReq::ShmemMap, &req.encode_body(), vec![]).is_err());
    }

    #[test]
    fn iotlb_direction() {
        let mut m = IotlbPayload {
            iova: 0x1000,
            size: 0x1000,
            uaddr: 0x2000,
            perm: iotlb::PERM_RW,
            kind: iotlb::MISS,
        };
        assert!(FrontendRequest::decode(FrontendReq::IotlbMsg, &m.to_bytes(), vec![]).is_err());
        m.kind = iotlb::UPDATE;
        assert!(BackendRequest::decode(BackendReq::IotlbMsg, &m.to_bytes(), vec![]).is_err());
        m.size = 0;
        assert!(FrontendRequest::decode(FrontendReq::IotlbMsg, &m.to_bytes(), vec![]).is_err());
    }

    #[test]
    fn g1_config_through_decode() {
        for (offset, size) in [(0u32, 0u32), (0, 257), (256, 1), (u32::MAX, 2), (200, 100)] {
            let body = ConfigPayload {
                offset,
                size,
                flags: 0,
                data: vec![0; size as usize],
            }
            .to_bytes();
            for code in [FrontendReq::GetConfig, FrontendReq::SetConfig] {
                assert!(
                    matches!(
                        FrontendRequest::decode(code, &body, vec![]),
                        Err(Error::InvalidParam(_))
                    ),
                    "{code:?} {offset} {size}"
                );
            }
        }
    }

    #[test]
    fn inflight_rules_through_decode() {
        let zero_q = InflightDesc {
            mmap_size: 0x1000,
            mmap_offset: 0,
            num_queues: 0,
            queue_size: 128,
        }
        .to_bytes();
        assert!(FrontendRequest::decode(FrontendReq::GetInflightFd, &zero_q, vec![]).is_err());
        let overflow = InflightDesc {
            mmap_size: 0x1000,
            mmap_offset: u64::MAX,
            num_queues: 1,
            queue_size: 128,
        }
        .to_bytes();
        assert!(FrontendRequest::decode(FrontendReq::SetInflightFd, &overflow, fds(1)).is_err());
    }

    #[test]
    fn shmem_map_rules_through_decode() {
        let bad = ShmemMapPayload {
            shmid: 0,
            fd_offset: u64::MAX,
            shm_offset: 0,
            len: 0x1000,
            flags: 0,
        }
        .to_bytes();
        assert!(BackendRequest::decode(BackendReq::ShmemMap, &bad, fds(1)).is_err());
        assert!(BackendRequest::decode(BackendReq::ShmemUnmap, &bad, vec![]).is_err());
        // The GET_SHMEM_CONFIG reply layout is in payload.rs; the request is header-only.
        assert_eq!(ShmemConfig::SIZE, 2056);
        assert!(FrontendRequest::decode(FrontendReq::GetShmemConfig, &[0; 8], vec![]).is_err());
    }

    #[test]
    fn reply_tables() {
        use FrontendReq as K;
        for k in [
            K::GetFeatures,
            K::GetProtocolFeatures,
            K::GetVringBase,
            K::GetQueueNum,
            K::GetConfig,
            K::GetInflightFd,
            K::GetMaxMemSlots,
            K::GetStatus,
            K::GetSharedObject,
            K::GetShmemConfig,
            K::SetLogBase,
            K::PostcopyAdvise,
            K::PostcopyEnd,
            K::SetDeviceStateFd,
            K::CheckDeviceState,
        ] {
            assert!(has_reply(k), "{k:?}");
        }
        for k in [
            K::SetFeatures,
            K::SetOwner,
            K::SetMemTable,
            K::SetVringNum,
            K::SetVringKick,
            K::SetConfig,
            K::AddMemReg,
            K::PostcopyListen,
            K::SetBackendReqFd,
        ] {
            assert!(!has_reply(k), "{k:?}");
        }
        // Every name starting with GET_ has a reply.
        for &k in K::ALL {
            if k.name().starts_with("GET_") {
                assert!(has_reply(k), "{k:?}");
            }
            if reply_allows_fd(k) {
                assert!(
                    has_reply(k),
                    "{k:?} carries an fd in a reply it never sends"
                );
            }
        }
        let with_fd: Vec<_> = K::ALL.iter().filter(|&&k| reply_allows_fd(k)).collect();
        assert_eq!(with_fd.len(), 4);
        assert!(backend_has_reply(BackendReq::SharedObjectLookup));
        assert!(backend_reply_allows_fd(BackendReq::SharedObjectLookup));
        for &k in BackendReq::ALL {
            if k != BackendReq::SharedObjectLookup {
                assert!(!backend_has_reply(k) && !backend_reply_allows_fd(k));
            }
        }
    }

    #[test]
    fn body_bytes_are_host_order() {
        let r = FrontendRequest::SetVringKick { index: 5, fd: None };
        assert_eq!(r.encode_body(), 0x105u64.to_ne_bytes());
        let r = FrontendRequest::SendRarp([1, 2, 3, 4, 5, 6]);
        assert_eq!(r.encode_body(), [1, 2, 3, 4, 5, 6, 0, 0]);
    }
}
