//! The front-end fed hostile replies: our `Frontend` makes a fixed sequence of calls (the
//! set-up a VMM does, then queries with replies of every shape) while a fake back-end on
//! the other end of a socketpair has already written the fuzz input as its replies
//! ([`crate::stream`] chunks, so replies can carry fds).
//!
//! Invariants: no call panics or hangs (every wait ends at EOF or the timeout); a reply
//! the front-end accepts has the shape asked for (GET_CONFIG returns the bytes asked for,
//! GET_INFLIGHT_FD an fd holding the area it describes, GET_VRING_BASE answers the ring
//! asked about); once the connection is broken every later call fails.

use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost_core::backend::VringAddrs;
use vhost_core::memory::RegionInfo;
use vhost_core::sys::{file_size, memfd_create, EventFd};
use vhost_core::user::codes::{
    protocol_features as pf, FrontendReq, VHOST_USER_F_PROTOCOL_FEATURES,
};
use vhost_core::user::Frontend;

use crate::stream;

/// virtio VERSION_1.
pub const VERSION_1: u64 = 1 << 32;

/// The protocol features the sequence acks, of those offered.
pub const WANTED: u64 = pf::MQ
    | pf::REPLY_ACK
    | pf::CONFIG
    | pf::BACKEND_REQ
    | pf::INFLIGHT_SHMFD
    | pf::RESET_DEVICE
    | pf::CONFIGURE_MEM_SLOTS
    | pf::STATUS
    | pf::SHARED_OBJECT
    | pf::DEVICE_STATE
    | pf::SHMEM;

/// The calls, in order; the seed builder answers the same list.
pub const CALLS: &[FrontendReq] = &[
    FrontendReq::GetFeatures,
    FrontendReq::SetOwner,
    FrontendReq::GetProtocolFeatures,
    FrontendReq::SetProtocolFeatures,
    FrontendReq::SetFeatures,
    FrontendReq::GetQueueNum,
    FrontendReq::GetMaxMemSlots,
    FrontendReq::SetMemTable,
    FrontendReq::SetVringNum,
    FrontendReq::SetVringAddr,
    FrontendReq::SetVringBase,
    FrontendReq::SetVringKick,
    FrontendReq::GetVringBase,
    FrontendReq::GetConfig,
    FrontendReq::SetConfig,
    FrontendReq::GetInflightFd,
    FrontendReq::SetStatus,
    FrontendReq::GetStatus,
    FrontendReq::GetShmemConfig,
    FrontendReq::SetBackendReqFd,
    FrontendReq::GetSharedObject,
    FrontendReq::SetDeviceStateFd,
    FrontendReq::CheckDeviceState,
    FrontendReq::ResetDevice,
];

/// Where the sequence says guest memory is in the front-end's address space.
pub const USER_BASE: u64 = 0x7f00_0000_0000;
pub const CONFIG_SIZE: u32 = 16;
pub const INFLIGHT_QUEUE_SIZE: u16 = 8;

/// Runs the sequence; returns how many calls succeeded.
pub fn calls(fe: &Frontend) -> usize {
    let memory = memfd_create("fuzz-guest", 1 << 20).expect("memfd");
    let kick = EventFd::new(false).expect("eventfd");
    let mut ok = 0;
    let mut offered = 0;
    let mut broken_at = None;
    for (i, &call) in CALLS.iter().enumerate() {
        let result: Result<(), vhost_core::user::Error> = match call {
            FrontendReq::GetFeatures => fe.get_features().map(drop),
            FrontendReq::SetOwner => fe.set_owner(),
            FrontendReq::GetProtocolFeatures => fe.get_protocol_features().map(|f| offered = f),
            // What was offered (0 if nothing was), of what we want.
            FrontendReq::SetProtocolFeatures => fe.set_protocol_features(offered & WANTED),
            FrontendReq::SetFeatures => fe.set_features(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES),
            FrontendReq::GetQueueNum => fe.get_queue_num().map(drop),
            FrontendReq::GetMaxMemSlots => fe.get_max_mem_slots().map(drop),
            FrontendReq::SetMemTable => {
                let info = RegionInfo {
                    guest_phys_addr: 0,
                    memory_size: 1 << 20,
                    userspace_addr: USER_BASE,
                    mmap_offset: 0,
                };
                fe.set_mem_table(&[(info, memory.as_fd())])
            }
            FrontendReq::SetVringNum => fe.set_vring_num(0, 8),
            FrontendReq::SetVringAddr => fe.set_vring_addr(&VringAddrs {
                index: 0,
                flags: 0,
                desc: USER_BASE,
                avail: USER_BASE + 0x1000,
                used: USER_BASE + 0x2000,
                log: 0,
            }),
            FrontendReq::SetVringBase => fe.set_vring_base(0, 0),
            FrontendReq::SetVringKick => fe.set_vring_kick(0, Some(kick.as_fd())),
            FrontendReq::GetVringBase => fe.get_vring_base(0).map(drop),
            FrontendReq::GetConfig => fe.get_config(0, CONFIG_SIZE, 0).map(|v| {
                assert_eq!(
                    v.len(),
                    CONFIG_SIZE as usize,
                    "GET_CONFIG accepted a short reply"
                );
            }),
            FrontendReq::SetConfig => fe.set_config(0, &[1, 2, 3, 4], 0),
            FrontendReq::GetInflightFd => {
                fe.get_inflight_fd(1, INFLIGHT_QUEUE_SIZE)
                    .map(|(desc, fd)| {
                        let size = file_size(fd.as_fd()).expect("fstat of the inflight fd");
                        assert!(
                            desc.mmap_offset
                                .checked_add(desc.mmap_size)
                                .is_some_and(|e| e <= size),
                            "GET_INFLIGHT_FD accepted {desc:?} for a {size}-byte file"
                        );
                        assert_eq!((desc.num_queues, desc.queue_size), (1, INFLIGHT_QUEUE_SIZE));
                    })
            }
            FrontendReq::SetStatus => fe.set_status(0x0f),
            FrontendReq::GetStatus => fe.get_status().map(drop),
            FrontendReq::GetShmemConfig => fe.get_shmem_config().map(drop),
            FrontendReq::SetBackendReqFd => fe.set_backend_req_fd().map(drop),
            FrontendReq::GetSharedObject => fe.get_shared_object([7; 16]).map(drop),
            FrontendReq::SetDeviceStateFd => {
                let (a, _b) = UnixStream::pair().expect("socketpair");
                fe.set_device_state_fd(0, 0, a.as_fd()).map(drop)
            }
            FrontendReq::CheckDeviceState => fe.check_device_state(),
            FrontendReq::ResetDevice => fe.reset_device(),
            other => unreachable!("{other:?} is not in the sequence"),
        };
        if let Some(at) = broken_at {
            assert!(
                result.is_err(),
                "{call:?} succeeded on a connection broken at call {at}"
            );
        }
        if result.is_ok() {
            ok += 1;
        }
        if broken_at.is_none() && fe.is_broken() {
            broken_at = Some(i);
        }
    }
    ok
}

pub fn run(data: &[u8]) {
    run_counting(data);
}

/// [`run`], returning how many calls succeeded (the seed tests check the seeds get far).
pub fn run_counting(data: &[u8]) -> usize {
    crate::ignore_sigpipe();
    let memory = memfd_create("fuzz-replies", 1 << 20).expect("memfd");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let fe = Frontend::new(ours).expect("frontend");
    fe.set_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    std::thread::scope(|s| {
        let peer = s.spawn(|| {
            stream::send(&theirs, data, memory.as_fd());
            let _ = theirs.shutdown(Shutdown::Write);
            stream::drain(&theirs);
        });
        let n = calls(&fe);
        // Our end closes: the fake back-end's drain ends.
        drop(fe);
        // Joined explicitly (pthread_join): the scope alone only waits for the closure,
        // and a thread still exiting holds its thread-local destructor list, which the
        // leak checker reports.
        peer.join().expect("the peer thread");
        n
    })
}
