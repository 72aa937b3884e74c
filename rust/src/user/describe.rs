//! What a vhost-user message says, as structured fields, for tools that watch a
//! connection (`vhost.trace`): request name, flags, body fields, fds, or why the
//! message is malformed.
//!
//! Nothing here is a second codec: a request is decoded by the request table's decoder
//! ([`FrontendRequest::decode`] / [`BackendRequest::decode`]) with the header checked
//! by [`Header::check_request`], a reply by [`Header::check_reply_to`] and the reply rule
//! of its request's table line, so a message described as well-formed is exactly one the
//! core's sessions would accept (fd rules included: the fds are duplicated and handed to
//! the decoder, which closes its copies).

use std::os::fd::{BorrowedFd, OwnedFd};

use super::codes::{
    BackendReq, BackendRequest, Direction, FrontendReq, FrontendRequest, ReplyRule,
};
use super::header::{Header, HEADER_SIZE};
use super::payload::{
    ConfigPayload, DeviceStateReply, InflightDesc, MemRegion, ShmemConfig, VringState,
};
use super::{Error, Result};

/// A field's value, typed so that a tool can show it (addresses in hex, features by
/// name) or write it as JSON (numbers stay numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A count, index, size or status.
    Int(u64),
    /// An address or offset (shown in hex).
    Addr(u64),
    /// Raw bytes (config data, a MAC, a UUID).
    Bytes(Vec<u8>),
    /// virtio feature bits (named by the device type, which the protocol never states).
    VirtioFeatures(u64),
    /// vhost-user protocol feature bits (named by [`protocol_features`](super::codes::protocol_features)).
    ProtocolFeatures(u64),
    /// Memory regions of a `SET_MEM_TABLE`, `ADD_MEM_REG` or `REM_MEM_REG`.
    Regions(Vec<MemRegion>),
    /// A flag.
    Bool(bool),
}

/// One field of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The spec's name for it.
    pub name: &'static str,
    /// Its value.
    pub value: Value,
}

/// What one message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    /// The channel's direction of requests (front-end to back-end on the main socket,
    /// back-end to front-end on the back-end channel); a reply travels the other way.
    pub channel: Direction,
    /// Whether the message is a reply (the REPLY flag).
    pub reply: bool,
    /// The request's name, `None` for a code the table does not know.
    pub name: Option<&'static str>,
    /// The header as received.
    pub header: Header,
    /// The fds that came with it.
    pub fds: usize,
    /// The body's fields, in wire order (empty when malformed).
    pub fields: Vec<Field>,
    /// Why the core would refuse the message, if it would.
    pub malformed: Option<String>,
}

fn field(name: &'static str, value: Value) -> Field {
    Field { name, value }
}

fn state(s: &VringState, num: &'static str) -> Vec<Field> {
    vec![
        field("index", Value::Int(s.index.into())),
        field(num, Value::Int(s.num.into())),
    ]
}

fn inflight(d: &InflightDesc) -> Vec<Field> {
    vec![
        field("mmap_size", Value::Int(d.mmap_size)),
        field("mmap_offset", Value::Addr(d.mmap_offset)),
        field("num_queues", Value::Int(d.num_queues.into())),
        field("queue_size", Value::Int(d.queue_size.into())),
    ]
}

fn config(c: &ConfigPayload) -> Vec<Field> {
    vec![
        field("offset", Value::Int(c.offset.into())),
        field("size", Value::Int(c.size.into())),
        field("flags", Value::Int(c.flags.into())),
        field("data", Value::Bytes(c.data.clone())),
    ]
}

fn fd_flag<F>(index: u8, fd: &Option<F>) -> Vec<Field> {
    vec![
        field("index", Value::Int(index.into())),
        field("nofd", Value::Bool(fd.is_none())),
    ]
}

fn frontend_fields(r: &FrontendRequest) -> Vec<Field> {
    use FrontendRequest as R;
    match r {
        R::SetFeatures(f) => vec![field("features", Value::VirtioFeatures(*f))],
        R::SetProtocolFeatures(f) => vec![field("features", Value::ProtocolFeatures(*f))],
        R::SetMemTable { table, .. } => vec![
            field("nregions", Value::Int(table.regions.len() as u64)),
            field("regions", Value::Regions(table.regions.clone())),
        ],
        R::AddMemReg { region, .. } | R::RemMemReg(region) => {
            vec![field("regions", Value::Regions(vec![*region]))]
        }
        R::SetLogBase { log, .. } => vec![
            field("mmap_size", Value::Int(log.mmap_size)),
            field("mmap_offset", Value::Addr(log.mmap_offset)),
        ],
        R::SetVringNum(s) => state(s, "num"),
        R::SetVringBase(s) | R::GetVringBase(s) | R::GetVringBaseSkipDrain(s) => state(s, "num"),
        R::SetVringEnable(s) => state(s, "enable"),
        R::SetVringEndian(s) => state(s, "big_endian"),
        R::VringKick(s) => state(s, "num"),
        R::SetVringAddr(a) => vec![
            field("index", Value::Int(a.index.into())),
            field("flags", Value::Int(a.flags.into())),
            field("desc", Value::Addr(a.desc)),
            field("used", Value::Addr(a.used)),
            field("avail", Value::Addr(a.avail)),
            field("log", Value::Addr(a.log)),
        ],
        R::SetVringKick { index, fd }
        | R::SetVringCall { index, fd }
        | R::SetVringErr { index, fd } => fd_flag(*index, fd),
        R::SendRarp(mac) => vec![field("mac", Value::Bytes(mac.to_vec()))],
        R::NetSetMtu(m) => vec![field("mtu", Value::Int(*m))],
        R::IotlbMsg(m) => vec![
            field("iova", Value::Addr(m.iova)),
            field("size", Value::Int(m.size)),
            field("uaddr", Value::Addr(m.uaddr)),
            field("perm", Value::Int(m.perm.into())),
            field("type", Value::Int(m.kind.into())),
        ],
        R::GetConfig(c) | R::SetConfig(c) => config(c),
        R::CreateCryptoSession(b) => vec![field("session", Value::Bytes(b.clone()))],
        R::CloseCryptoSession(id) => vec![field("session_id", Value::Int(*id))],
        R::GetInflightFd(d) | R::SetInflightFd { desc: d, .. } => inflight(d),
        R::SetStatus(s) => vec![field("status", Value::Int(*s))],
        R::GetSharedObject(u) => vec![field("uuid", Value::Bytes(u.0.to_vec()))],
        R::SetDeviceStateFd { transfer, .. } => vec![
            field("direction", Value::Int(transfer.direction.into())),
            field("phase", Value::Int(transfer.phase.into())),
        ],
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
    }
}

fn backend_fields(r: &BackendRequest) -> Vec<Field> {
    use BackendRequest as R;
    match r {
        R::IotlbMsg(m) => vec![
            field("iova", Value::Addr(m.iova)),
            field("size", Value::Int(m.size)),
            field("type", Value::Int(m.kind.into())),
        ],
        R::ConfigChangeMsg => Vec::new(),
        R::VringHostNotifierMsg { area, fd } => {
            let mut f = fd_flag(area.index, fd);
            f.push(field("size", Value::Int(area.size)));
            f.push(field("offset", Value::Addr(area.offset)));
            f
        }
        R::VringCall(s) | R::VringErr(s) => state(s, "num"),
        R::SharedObjectAdd(u) | R::SharedObjectRemove(u) | R::SharedObjectLookup(u) => {
            vec![field("uuid", Value::Bytes(u.0.to_vec()))]
        }
        R::ShmemMap { map, .. } | R::ShmemUnmap(map) => vec![
            field("shmid", Value::Int(map.shmid.into())),
            field("fd_offset", Value::Addr(map.fd_offset)),
            field("shm_offset", Value::Addr(map.shm_offset)),
            field("len", Value::Int(map.len)),
            field("flags", Value::Int(map.flags)),
        ],
    }
}

fn duplicate(fds: &[BorrowedFd<'_>]) -> Result<Vec<OwnedFd>> {
    fds.iter()
        .map(|fd| fd.try_clone_to_owned().map_err(Error::Io))
        .collect()
}

fn request_fields(
    channel: Direction,
    header: &Header,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<Vec<Field>> {
    header.check_request()?;
    let unknown = || Error::InvalidHeader(format!("unknown request code {}", header.code));
    match channel {
        Direction::FrontendToBackend => {
            let code = FrontendReq::from_code(header.code).ok_or_else(unknown)?;
            Ok(frontend_fields(&FrontendRequest::decode(
                code,
                body,
                duplicate(fds)?,
            )?))
        }
        Direction::BackendToFrontend => {
            let code = BackendReq::from_code(header.code).ok_or_else(unknown)?;
            Ok(backend_fields(&BackendRequest::decode(
                code,
                body,
                duplicate(fds)?,
            )?))
        }
    }
}

fn u64_of(body: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = body.try_into().map_err(|_| Error::InvalidSize {
        request: "reply",
        expected: "8".into(),
        got: body.len(),
    })?;
    Ok(u64::from_ne_bytes(bytes))
}

/// The fields of a reply, by the reply rule of its request's table line; `request_body`
/// is the request's (a `GET_CONFIG` reply has its request's size).
fn reply_fields(
    channel: Direction,
    header: &Header,
    body: &[u8],
    fds: usize,
    request_body: &[u8],
) -> Result<Vec<Field>> {
    header.check_reply_to(header.code)?;
    let spec = match channel {
        Direction::FrontendToBackend => FrontendReq::from_code(header.code).map(|r| r.spec()),
        Direction::BackendToFrontend => BackendReq::from_code(header.code).map(|r| r.spec()),
    }
    .ok_or_else(|| Error::InvalidHeader(format!("reply to unknown code {}", header.code)))?;
    let expected = spec.reply.expected_size(request_body.len());
    if body.len() != expected {
        return Err(Error::InvalidSize {
            request: spec.name,
            expected: expected.to_string(),
            got: body.len(),
        });
    }
    if fds > usize::from(spec.reply_fd) {
        return Err(Error::InvalidParam(format!(
            "{}: {fds} fds on a reply that carries {}",
            spec.name,
            if spec.reply_fd { "at most one" } else { "none" }
        )));
    }
    let code = (channel == Direction::FrontendToBackend)
        .then(|| FrontendReq::from_code(header.code))
        .flatten();
    Ok(match (spec.reply, code) {
        (ReplyRule::Ack, _) => vec![field("status", Value::Int(u64_of(body)?))],
        (ReplyRule::U64, Some(FrontendReq::GetFeatures)) => {
            vec![field("features", Value::VirtioFeatures(u64_of(body)?))]
        }
        (ReplyRule::U64, Some(FrontendReq::GetProtocolFeatures)) => {
            vec![field("features", Value::ProtocolFeatures(u64_of(body)?))]
        }
        (ReplyRule::U64, Some(FrontendReq::SetDeviceStateFd)) => {
            let r = DeviceStateReply::from_bytes(body, fds == 1)?;
            vec![
                field("status", Value::Int(r.status.into())),
                field("nofd", Value::Bool(r.nofd)),
            ]
        }
        (ReplyRule::U64, _) => vec![field("value", Value::Int(u64_of(body)?))],
        (_, Some(FrontendReq::GetVringBase | FrontendReq::GetVringBaseSkipDrain)) => {
            state(&VringState::from_bytes(body)?, "num")
        }
        (_, Some(FrontendReq::GetInflightFd)) => inflight(&InflightDesc::from_bytes(body)?),
        (_, Some(FrontendReq::GetConfig)) => {
            let reply = ConfigPayload::from_bytes(body)?;
            reply.check_reply_for(&ConfigPayload::from_bytes(request_body)?)?;
            config(&reply)
        }
        (_, Some(FrontendReq::GetShmemConfig)) => {
            let c = ShmemConfig::from_bytes(body)?;
            vec![
                field("nregions", Value::Int(c.nregions().into())),
                field(
                    "sizes",
                    Value::Bytes(c.regions().iter().flat_map(|r| r.1.to_ne_bytes()).collect()),
                ),
            ]
        }
        _ if body.is_empty() => Vec::new(),
        _ => vec![field("body", Value::Bytes(body.to_vec()))],
    })
}

/// Describes one message of a channel whose requests travel `channel`-wise: a request
/// (REPLY flag clear) by its table line's decoder, a reply by its request's reply rule.
/// `request_body` is the body of the request a reply answers (empty when unknown or for a
/// request); `fds` are the fds that came with the message (duplicated for the decoder,
/// never taken). A message the core would refuse is described by why, in `malformed`.
pub fn describe(
    channel: Direction,
    header: &Header,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    request_body: &[u8],
) -> Description {
    let reply = header.is_reply();
    let name = match channel {
        Direction::FrontendToBackend => FrontendReq::from_code(header.code).map(|r| r.name()),
        Direction::BackendToFrontend => BackendReq::from_code(header.code).map(|r| r.name()),
    };
    let fields = if reply {
        reply_fields(channel, header, body, fds.len(), request_body)
    } else {
        request_fields(channel, header, body, fds)
    };
    let (fields, malformed) = match fields {
        Ok(f) => (f, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    Description {
        channel,
        reply,
        name,
        header: *header,
        fds: fds.len(),
        fields,
        malformed,
    }
}

/// The header and body of a message as hex, for a malformed one.
pub fn hex(header: &Header, body: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(HEADER_SIZE + body.len());
    bytes.extend_from_slice(&header.to_bytes());
    bytes.extend_from_slice(body);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::codes::protocol_features as pf;
    use crate::user::payload::MemTable;
    use std::os::fd::AsFd;

    const FRONT: Direction = Direction::FrontendToBackend;

    fn request(code: FrontendReq, body: &[u8]) -> Header {
        Header::request(code.code(), body.len() as u32, false)
    }

    #[test]
    fn get_features_and_its_reply() {
        let h = request(FrontendReq::GetFeatures, &[]);
        let d = describe(FRONT, &h, &[], &[], &[]);
        assert_eq!(d.name, Some("GET_FEATURES"));
        assert!(!d.reply && d.malformed.is_none() && d.fields.is_empty());
        let features = (1u64 << 32) | (1 << 30);
        let body = features.to_ne_bytes();
        let d = describe(FRONT, &h.reply_to(8), &body, &[], &[]);
        assert!(d.reply, "{d:?}");
        assert_eq!(
            d.fields,
            [field("features", Value::VirtioFeatures(features))]
        );
    }

    #[test]
    fn protocol_features_by_name_rule() {
        let f = pf::MQ | pf::REPLY_ACK;
        let body = f.to_ne_bytes();
        let h = request(FrontendReq::SetProtocolFeatures, &body);
        let d = describe(FRONT, &h, &body, &[], &[]);
        assert_eq!(d.fields, [field("features", Value::ProtocolFeatures(f))]);
    }

    #[test]
    fn mem_table_with_its_fd() {
        let region = MemRegion {
            guest_phys_addr: 0,
            memory_size: 0x10_0000,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        let table = MemTable {
            regions: vec![region],
        };
        let body = table.to_bytes();
        let h = request(FrontendReq::SetMemTable, &body);
        let file = std::fs::File::open("/dev/null").unwrap();
        let d = describe(FRONT, &h, &body, &[file.as_fd()], &[]);
        assert_eq!(d.malformed, None);
        assert_eq!(d.fds, 1);
        assert_eq!(d.fields[1], field("regions", Value::Regions(vec![region])));
        // Without its fd the core refuses it, and so does the description.
        let d = describe(FRONT, &h, &body, &[], &[]);
        assert!(d.malformed.unwrap().contains("SET_MEM_TABLE"));
        assert!(d.fields.is_empty());
    }

    #[test]
    fn ring_addresses() {
        let body: Vec<u8> = [0u32.to_ne_bytes(), 0u32.to_ne_bytes()]
            .concat()
            .into_iter()
            .chain(
                [0x1000u64, 0x3000, 0x2000, 0]
                    .iter()
                    .flat_map(|a| a.to_ne_bytes()),
            )
            .collect();
        let h = request(FrontendReq::SetVringAddr, &body);
        let d = describe(FRONT, &h, &body, &[], &[]);
        assert_eq!(d.malformed, None, "{d:?}");
        assert!(d.fields.contains(&field("desc", Value::Addr(0x1000))));
        assert!(d.fields.contains(&field("used", Value::Addr(0x3000))));
        assert!(d.fields.contains(&field("avail", Value::Addr(0x2000))));
    }

    #[test]
    fn malformed_messages_say_why() {
        // Unknown code, reserved flag, short body, reply of the wrong size.
        let h = Header::request(999, 0, false);
        let d = describe(FRONT, &h, &[], &[], &[]);
        assert_eq!(d.name, None);
        assert!(d.malformed.unwrap().contains("999"));
        let mut h = request(FrontendReq::GetFeatures, &[]);
        h.flags |= 0x100;
        assert!(describe(FRONT, &h, &[], &[], &[])
            .malformed
            .unwrap()
            .contains("reserved"));
        let h = Header::request(FrontendReq::SetFeatures.code(), 3, false);
        let d = describe(FRONT, &h, &[1, 2, 3], &[], &[]);
        assert!(d.malformed.is_some());
        assert_eq!(hex(&h, &[1, 2, 3]).len(), 2 * (HEADER_SIZE + 3));
        let reply = request(FrontendReq::GetFeatures, &[]).reply_to(4);
        assert!(describe(FRONT, &reply, &[0; 4], &[], &[])
            .malformed
            .is_some());
    }

    #[test]
    fn back_end_channel() {
        let h = Header::request(BackendReq::ConfigChangeMsg.code(), 0, true);
        let d = describe(Direction::BackendToFrontend, &h, &[], &[], &[]);
        assert_eq!(d.name, Some("CONFIG_CHANGE_MSG"));
        assert_eq!(d.malformed, None);
        let ack = h.reply_to(8);
        let d = describe(
            Direction::BackendToFrontend,
            &ack,
            &0u64.to_ne_bytes(),
            &[],
            &[],
        );
        assert_eq!(d.fields, [field("status", Value::Int(0))]);
    }

    #[test]
    fn config_reply_matches_its_request() {
        let req = ConfigPayload {
            offset: 0,
            size: 8,
            flags: 0,
            data: vec![0; 8],
        };
        let body = req.to_bytes();
        let h = request(FrontendReq::GetConfig, &body);
        assert_eq!(describe(FRONT, &h, &body, &[], &[]).malformed, None);
        let reply = ConfigPayload {
            data: vec![1, 2, 3, 4, 5, 6, 7, 8],
            ..req.clone()
        };
        let rb = reply.to_bytes();
        let d = describe(FRONT, &h.reply_to(rb.len() as u32), &rb, &[], &body);
        assert_eq!(d.malformed, None);
        assert_eq!(d.fields[3], field("data", Value::Bytes(reply.data)));
    }
}
