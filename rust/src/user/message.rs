//! The request values of both channels, with the fds they carry, and what their codec
//! (generated from the table in [`codes`](super::codes)) is made of: the [`Body`] layouts,
//! the fd rules and the few value rules a layout alone does not state.
//!
//! `decode` gets the body (already bounded by [`Header::check_request`]) and every fd that
//! arrived with the header. It checks the body layout and the fd count of that request;
//! any error drops the `Vec<OwnedFd>`, which closes every fd (ADVERSARIAL B1, B3, B4).
//! `encode_body` and `fds` are the inverse, and what both senders ([`Frontend`],
//! [`BackendChannel`]) put on the wire.
//!
//! [`Header::check_request`]: super::header::Header::check_request
//! [`Frontend`]: super::frontend::Frontend
//! [`BackendChannel`]: super::channel::BackendChannel

pub use super::codes::{BackendRequest, FrontendRequest};
pub use super::payload::Body;
use super::payload::{iotlb, InflightDesc, IotlbPayload, VringState};
use super::{Error, Result};

/// Puts the request name on size and parameter errors raised by payload parsers.
pub(crate) fn named(e: Error, name: &'static str) -> Error {
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

/// The fd rules of [`FdRule`](super::codes::FdRule): received fds checked and shaped
/// as the request value holds them, and sent ones checked against the body.
pub(crate) mod fd_rules {
    use std::os::fd::OwnedFd;

    use super::super::{Error, Result};

    fn count(name: &'static str, expected: &'static str, got: usize) -> Error {
        Error::FdCount {
            request: name,
            expected,
            got,
        }
    }

    pub(crate) fn none(name: &'static str, fds: Vec<OwnedFd>) -> Result<()> {
        match fds.len() {
            0 => Ok(()),
            n => Err(count(name, "0", n)),
        }
    }

    pub(crate) fn one(name: &'static str, mut fds: Vec<OwnedFd>) -> Result<OwnedFd> {
        match (fds.len(), fds.pop()) {
            (1, Some(fd)) => Ok(fd),
            (n, _) => Err(count(name, "1", n)),
        }
    }

    pub(crate) fn per_region(
        name: &'static str,
        regions: usize,
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<OwnedFd>> {
        sent_per_region(name, regions, fds.len())?;
        Ok(fds)
    }

    pub(crate) fn sent_per_region(name: &'static str, regions: usize, fds: usize) -> Result<()> {
        if fds == regions {
            Ok(())
        } else {
            Err(count(name, "one per region", fds))
        }
    }

    /// An fd exactly when the NOFD flag is clear (B4).
    pub(crate) fn unless_nofd(
        name: &'static str,
        nofd: bool,
        fds: Vec<OwnedFd>,
    ) -> Result<Option<OwnedFd>> {
        match (nofd, fds.len()) {
            (true, 0) => Ok(None),
            (true, n) => Err(count(name, "0 (NOFD flag set)", n)),
            (false, 1) => Ok(fds.into_iter().next()),
            (false, n) => Err(count(name, "1 (NOFD flag clear)", n)),
        }
    }

    pub(crate) fn sent_unless_nofd(name: &'static str, nofd: Option<bool>, fd: bool) -> Result<()> {
        match nofd {
            Some(true) if fd => Err(count(name, "0 (NOFD flag set)", 1)),
            Some(false) if !fd => Err(count(name, "1 (NOFD flag clear)", 0)),
            _ => Ok(()),
        }
    }

    /// As `unless_nofd`, for fds that are waited on (epoll, poll): a regular file,
    /// directory or block device would be refused by epoll (EPERM) or read as
    /// always-ready, so it is rejected here, before a handler or worker sees it (B6).
    pub(crate) fn event_unless_nofd(
        name: &'static str,
        nofd: bool,
        fds: Vec<OwnedFd>,
    ) -> Result<Option<OwnedFd>> {
        let fd = unless_nofd(name, nofd, fds)?;
        if let Some(fd) = &fd {
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
        }
        Ok(fd)
    }

    /// The spec lets a back-end accept (and close) one stray fd here, for front-ends
    /// that used to send it: it is closed right here, unused.
    pub(crate) fn zero_or_one(name: &'static str, fds: Vec<OwnedFd>) -> Result<()> {
        match fds.len() {
            0 | 1 => Ok(()),
            n => Err(count(name, "0 or 1", n)),
        }
    }
}

fn check_num(state: &VringState, allowed: &[u32], what: &str) -> Result<()> {
    if allowed.contains(&state.num) {
        Ok(())
    } else {
        Err(Error::InvalidParam(format!(
            "{what} {} for ring {}, expected one of {allowed:?}",
            state.num, state.index
        )))
    }
}

/// `SET_VRING_ENABLE`: `num` is 0 or 1.
pub(crate) fn enable_flag(s: &VringState) -> Result<()> {
    check_num(s, &[0, 1], "enable")
}

/// `SET_VRING_ENDIAN`: `num` is 0 (little endian) or 1 (big endian).
pub(crate) fn endian_flag(s: &VringState) -> Result<()> {
    check_num(s, &[0, 1], "endianness")
}

/// In-band `VRING_KICK`, `VRING_CALL`, `VRING_ERR`: `num` is reserved (0).
pub(crate) fn reserved_num(s: &VringState) -> Result<()> {
    check_num(s, &[0], "reserved num")
}

fn iotlb_kinds(m: &IotlbPayload, kinds: [u8; 2], sender: &str) -> Result<()> {
    if kinds.contains(&m.kind) {
        Ok(())
    } else {
        Err(Error::InvalidParam(format!(
            "IOTLB message type {} is not sent by a {sender}",
            m.kind
        )))
    }
}

/// A front-end sends IOTLB updates and invalidations.
pub(crate) fn frontend_iotlb(m: &IotlbPayload) -> Result<()> {
    iotlb_kinds(m, [iotlb::UPDATE, iotlb::INVALIDATE], "front-end")
}

/// A back-end sends IOTLB misses and access failures.
pub(crate) fn backend_iotlb(m: &IotlbPayload) -> Result<()> {
    iotlb_kinds(m, [iotlb::MISS, iotlb::ACCESS_FAIL], "back-end")
}

/// `SET_INFLIGHT_FD`: a queue geometry and a mapping that fits.
pub(crate) fn inflight_area(d: &InflightDesc) -> Result<()> {
    d.check_queues()?;
    d.check_mapping()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::VringAddrs;
    use crate::user::codes::{BackendReq, FrontendReq};
    use crate::user::payload::{
        ConfigPayload, DeviceStateTransfer, LogDesc, MemRegion, MemTable, SharedObjectUuid,
        ShmemMapPayload, SingleMemRegion, VringArea,
    };
    use crate::user::payload::{ShmemConfig, SHMEM_MAP_FLAG_RW};
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::{BorrowedFd, OwnedFd};
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
            R::GetVringBaseSkipDrain(state),
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
            R::ConfigChangeMsg,
            R::VringHostNotifierMsg {
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
        // Size 0 decodes (a range the IOTLB refuses, answered with a failure status).
        m.size = 0;
        assert!(FrontendRequest::decode(FrontendReq::IotlbMsg, &m.to_bytes(), vec![]).is_ok());
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
            assert!(k.has_reply(), "{k:?}");
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
            assert!(!k.has_reply(), "{k:?}");
        }
        // Every name starting with GET_ has a reply.
        for &k in K::ALL {
            if k.name().starts_with("GET_") {
                assert!(k.has_reply(), "{k:?}");
            }
            if k.reply_allows_fd() {
                assert!(
                    k.has_reply(),
                    "{k:?} carries an fd in a reply it never sends"
                );
            }
        }
        let with_fd: Vec<_> = K::ALL.iter().filter(|&&k| k.reply_allows_fd()).collect();
        assert_eq!(with_fd.len(), 4);
        assert!(BackendReq::SharedObjectLookup.has_reply());
        assert!(BackendReq::SharedObjectLookup.reply_allows_fd());
        for &k in BackendReq::ALL {
            if k != BackendReq::SharedObjectLookup {
                assert!(!k.has_reply() && !k.reply_allows_fd());
            }
        }
    }

    #[test]
    fn body_bytes_are_host_order() {
        let r: FrontendRequest = FrontendRequest::SetVringKick { index: 5, fd: None };
        assert_eq!(r.encode_body(), 0x105u64.to_ne_bytes());
        let r: FrontendRequest = FrontendRequest::SendRarp([1, 2, 3, 4, 5, 6]);
        assert_eq!(r.encode_body(), [1, 2, 3, 4, 5, 6, 0, 0]);
    }
}
