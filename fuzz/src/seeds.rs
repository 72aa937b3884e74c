//! The seed corpora, built with the core's own encoders (never typed in as hex): a
//! handful of valid inputs per target, so that fuzzing starts from messages, streams and
//! rings that get deep instead of being rejected at the first byte. `fuzz/corpus/` holds
//! exactly these (the `corpus_is_generated` test checks it; `scripts/fuzz.sh seeds`
//! rewrites it).

use vhost_core::backend::VringAddrs;
use vhost_core::user::codes::{
    protocol_features as pf, BackendReq, FrontendReq, VHOST_USER_F_PROTOCOL_FEATURES,
};
use vhost_core::user::header::Header;

use vhost_core::user::payload::{
    ConfigPayload, DeviceStateTransfer, InflightDesc, IotlbPayload, MemRegion, MemTable,
    SharedObjectUuid, ShmemConfig, U64Payload, VringAddrPayload, VringFdPayload, VringState,
};
use vhost_core::vring::{DESC_F_AVAIL, DESC_F_NEXT, DESC_F_WRITE};

use crate::frontend_replies::{
    self, CALLS, CONFIG_SIZE, INFLIGHT_QUEUE_SIZE, USER_BASE, VERSION_1,
};
use crate::stream::{encode, Chunk, FdKind};

fn req(code: FrontendReq, body: Vec<u8>, ack: bool) -> Chunk {
    let want = ack && !code.has_reply();
    Chunk::message(Header::request(code.code(), body.len() as u32, want), body)
}

fn u64b(v: u64) -> Vec<u8> {
    U64Payload(v).to_bytes()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    VringState { index, num }.to_bytes()
}

fn addrs() -> VringAddrs {
    VringAddrs {
        index: 0,
        flags: 0,
        desc: USER_BASE,
        avail: USER_BASE + 0x1000,
        used: USER_BASE + 0x2000,
        log: 0,
    }
}

fn mem_table() -> Vec<u8> {
    MemTable {
        regions: vec![MemRegion {
            guest_phys_addr: 0,
            memory_size: crate::daemon_session::GUEST_MEMORY,
            userspace_addr: USER_BASE,
            mmap_offset: 0,
        }],
    }
    .to_bytes()
}

fn config(offset: u32, size: u32, data: Vec<u8>) -> Vec<u8> {
    ConfigPayload {
        offset,
        size,
        flags: 0,
        data,
    }
    .to_bytes()
}

fn fd_payload(index: u8) -> Vec<u8> {
    VringFdPayload { index, nofd: false }.to_bytes()
}

fn inflight_desc(mmap_size: u64) -> InflightDesc {
    InflightDesc {
        mmap_size,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: INFLIGHT_QUEUE_SIZE,
    }
}

/// A front-end's whole set-up of one ring, as QEMU does it, then queries.
fn daemon_stream(ack: bool) -> Vec<u8> {
    use FrontendReq as R;
    let proto = pf::MQ
        | pf::CONFIG
        | pf::INFLIGHT_SHMFD
        | pf::STATUS
        | pf::CONFIGURE_MEM_SLOTS
        | pf::RESET_DEVICE
        | if ack { pf::REPLY_ACK } else { 0 };
    let mut c = vec![
        req(R::GetFeatures, vec![], false),
        req(R::SetOwner, vec![], false),
        req(R::GetProtocolFeatures, vec![], false),
        req(R::SetProtocolFeatures, u64b(proto), false),
        req(
            R::SetFeatures,
            u64b(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES),
            ack,
        ),
        req(R::GetQueueNum, vec![], ack),
        req(R::GetMaxMemSlots, vec![], ack),
        req(R::SetMemTable, mem_table(), ack).with_fds(1, FdKind::Memory),
        req(R::GetInflightFd, inflight_desc(0).to_bytes(), ack),
        req(R::SetVringNum, state(0, 8), ack),
        req(R::SetVringAddr, VringAddrPayload(addrs()).to_bytes(), ack),
        req(R::SetVringBase, state(0, 0), ack),
        req(R::SetVringCall, fd_payload(0), ack).with_fds(1, FdKind::EventFd),
        req(R::SetVringKick, fd_payload(0), ack).with_fds(1, FdKind::EventFd),
        req(R::SetVringEnable, state(0, 1), ack),
        req(R::GetConfig, config(0, 16, vec![0; 16]), ack),
        req(R::SetStatus, u64b(0x0f), ack),
        req(R::GetStatus, vec![], ack),
        req(R::GetVringBase, state(0, 0), ack),
        req(R::ResetDevice, vec![], ack),
    ];
    // One message split across two reads.
    c[9].split = true;
    encode(&c)
}

/// The replies a well-behaved back-end gives to [`CALLS`], offering `proto`.
fn replies(proto: u64) -> Vec<u8> {
    use FrontendReq as R;
    let acked = proto & frontend_replies::WANTED;
    let mut out = Vec::new();
    let mut acking = false;
    for &call in CALLS {
        if let Some(bit) = call.required_protocol_feature() {
            if acked & bit == 0 {
                continue; // refused locally, nothing sent
            }
        }
        let reply = |body: Vec<u8>| {
            let h = Header::request(call.code(), 0, false).reply_to(body.len() as u32);
            Chunk::message(h, body)
        };
        let chunk = match call {
            R::GetFeatures => Some(reply(u64b(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))),
            R::GetProtocolFeatures => Some(reply(u64b(proto))),
            R::GetQueueNum => Some(reply(u64b(1))),
            R::GetMaxMemSlots => Some(reply(u64b(8))),
            R::GetVringBase => Some(reply(state(0, 0))),
            R::GetConfig => Some(reply(config(
                0,
                CONFIG_SIZE,
                vec![0x5a; CONFIG_SIZE as usize],
            ))),
            R::GetInflightFd => {
                let size = InflightDesc::max_mmap_size(1, INFLIGHT_QUEUE_SIZE);
                Some(reply(inflight_desc(size).to_bytes()).with_fds(1, FdKind::Memory))
            }
            R::GetStatus => Some(reply(u64b(0x0f))),
            R::GetShmemConfig => Some(reply(
                ShmemConfig::from_regions(&[(0, 0x1000)])
                    .expect("shmem config")
                    .to_bytes(),
            )),
            R::GetSharedObject => Some(reply(u64b(0)).with_fds(1, FdKind::Memory)),
            // Status 0, and no fd of the back-end's own (bit 8).
            R::SetDeviceStateFd => Some(reply(u64b(1 << 8))),
            R::CheckDeviceState => Some(reply(u64b(0))),
            _ if acking => Some(reply(u64b(0))),
            _ => None,
        };
        if let Some(c) = chunk {
            c.encode(&mut out);
        }
        if call == R::SetProtocolFeatures {
            acking = acked & pf::REPLY_ACK != 0;
        }
    }
    out
}

fn channel_stream(ack: bool) -> Vec<u8> {
    use BackendReq as B;
    let msg = |code: B, body: Vec<u8>| {
        Chunk::message(Header::request(code.code(), body.len() as u32, ack), body)
    };
    let acked = pf::BACKEND_REQ
        | pf::BACKEND_SEND_FD
        | pf::CONFIG
        | pf::SHARED_OBJECT
        | pf::INBAND_NOTIFICATIONS
        | pf::HOST_NOTIFIER
        | pf::SHMEM
        | if ack { pf::REPLY_ACK } else { 0 };
    let mut out = acked.to_le_bytes().to_vec();
    out.extend(encode(&[
        msg(B::ConfigChangeMsg, vec![]),
        msg(B::VringCall, state(0, 0)),
        msg(B::SharedObjectAdd, SharedObjectUuid([2; 16]).to_bytes()),
        msg(B::SharedObjectLookup, SharedObjectUuid([2; 16]).to_bytes()),
        msg(
            B::IotlbMsg,
            IotlbPayload {
                iova: 0x1000,
                size: 0x1000,
                uaddr: 0,
                perm: 3,
                kind: 1,
            }
            .to_bytes(),
        ),
    ]));
    out
}

fn decode_seeds() -> Vec<Vec<u8>> {
    use FrontendReq as R;
    let front = |code: FrontendReq, nfds: u8, body: Vec<u8>| {
        let i = FrontendReq::ALL
            .iter()
            .position(|&c| c == code)
            .expect("listed") as u8;
        [vec![0, i, nfds], body].concat()
    };
    let back = |code: BackendReq, nfds: u8, body: Vec<u8>| {
        let i = BackendReq::ALL
            .iter()
            .position(|&c| c == code)
            .expect("listed") as u8;
        [vec![1, i, nfds], body].concat()
    };
    vec![
        front(R::GetFeatures, 0, vec![]),
        front(R::SetFeatures, 0, u64b(VERSION_1)),
        front(R::SetMemTable, 1, mem_table()),
        front(R::SetVringAddr, 0, VringAddrPayload(addrs()).to_bytes()),
        front(R::SetVringKick, 1, fd_payload(1)),
        front(R::GetConfig, 0, config(4, 8, vec![0; 8])),
        front(R::GetInflightFd, 0, inflight_desc(0).to_bytes()),
        front(
            R::SetDeviceStateFd,
            1,
            DeviceStateTransfer {
                direction: 0,
                phase: 0,
            }
            .to_bytes(),
        ),
        back(BackendReq::VringCall, 0, state(1, 0)),
        back(
            BackendReq::SharedObjectLookup,
            0,
            SharedObjectUuid([9; 16]).to_bytes(),
        ),
    ]
}

/// Split ring ops: two chains (one of two descriptors), made available, popped, one
/// completed, notifications asked, the other completed.
fn split_seed(event_idx: bool) -> Vec<u8> {
    let mut s = vec![3, u8::from(event_idx) | 2]; // size 8
    let desc = |s: &mut Vec<u8>, i: u8, addr: u16, len: u16, flags: u8, next: u8| {
        s.push(7);
        s.push(i);
        s.extend(addr.to_le_bytes());
        s.extend(len.to_le_bytes());
        s.extend([flags, next]);
    };
    desc(&mut s, 0, 0x1000, 64, DESC_F_NEXT as u8, 1);
    desc(&mut s, 1, 0x1100, 64, DESC_F_WRITE as u8, 0);
    desc(&mut s, 2, 0x3000, 32, 0, 0);
    s.extend([6, 0, 0, 6, 2, 0]); // avail: heads 0 and 2
    s.extend([1, 7]); // pop up to 8
    s.extend([2, 0, 0]); // complete the first in flight with its writable length
    s.extend([4, 5, 1]); // notify? re-enable
    s.extend([3, 2, 0, 1, 1, 4]); // complete the rest as a batch
    s
}

fn packed_seed(event_idx: bool) -> Vec<u8> {
    let mut s = vec![7, u8::from(event_idx) | 2]; // size 8
    let avail = |s: &mut Vec<u8>, addr: u16, len: u16, id: u16, bits: u16| {
        s.push(6);
        s.extend(addr.to_le_bytes());
        s.extend(len.to_le_bytes());
        s.extend(id.to_le_bytes());
        s.push(bits as u8);
    };
    avail(&mut s, 0x1000, 64, 3, DESC_F_NEXT);
    avail(&mut s, 0x1100, 64, 3, DESC_F_WRITE);
    avail(&mut s, 0x3000, 16, 5, 0);
    s.extend([1, 7, 2, 0, 0, 4, 5, 1, 3, 2, 0, 1, 1, 4]);
    // One descriptor written raw, AVAIL set for the driver's first lap.
    s.extend([7, 0x00, 0x38, 8, 0, 6, 0, 0, 3]);
    s.extend((DESC_F_AVAIL).to_le_bytes());
    s.extend([1, 0]);
    s
}

/// Inflight ops: offers, pops, a completion announced then a crash, a completion
/// published then a crash, pops not recorded then a crash, and a poll between.
fn inflight_seed(packed: bool) -> Vec<u8> {
    let cfg = if packed { 1 | (7 << 1) } else { 3 << 1 }; // size 8 either way
    let mut s = vec![cfg];
    s.extend([0, 0, 0, 1, 0, 2, 0, 0, 3]); // offer 3 (1, 2, 3 segments)
    s.extend([1, 3]); // pop up to 4
    s.extend([2, 0b01, 1]); // complete the first held, crash after announcing it
    s.extend([1, 3]); // take the resubmitted ones
    s.extend([2, 0b10, 2, 3]); // complete the second, crash after publishing; poll
    s.extend([0, 1, 5, 0, 4]); // offer, pop without recording (crash), crash again
    s.extend([1, 3, 2, 0xff, 0, 3]); // pop all, complete all, poll
    s
}

/// Every target's seeds: (target, inputs).
pub fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let all = pf::MQ
        | pf::CONFIG
        | pf::INFLIGHT_SHMFD
        | pf::STATUS
        | pf::CONFIGURE_MEM_SLOTS
        | pf::RESET_DEVICE
        | pf::BACKEND_REQ
        | pf::SHARED_OBJECT
        | pf::DEVICE_STATE
        | pf::SHMEM;
    vec![
        ("decode_request", decode_seeds()),
        (
            "daemon_session",
            vec![daemon_stream(false), daemon_stream(true)],
        ),
        (
            "frontend_replies",
            vec![replies(all), replies(all | pf::REPLY_ACK)],
        ),
        (
            "frontend_channel",
            vec![channel_stream(false), channel_stream(true)],
        ),
        ("split_ring", vec![split_seed(false), split_seed(true)]),
        ("packed_ring", vec![packed_seed(false), packed_seed(true)]),
        ("inflight", vec![inflight_seed(false), inflight_seed(true)]),
    ]
}
