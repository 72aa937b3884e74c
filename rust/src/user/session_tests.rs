//! Front-end against back-end session over a real socketpair, without Python: the core's
//! own proof that both sides agree, that memory crosses by fd, and that the session
//! rules hold.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use super::backend::{BackendHandler, BackendSession};
use super::codes::{protocol_features as pf, VHOST_USER_F_PROTOCOL_FEATURES};
use super::frontend::Frontend;
use super::payload::ShmemConfig;
use super::{Error, Result};
use crate::backend::VringAddrs;
use crate::memory::GuestMemory;
use crate::sys::eventfd::EventFd;

const VERSION_1: u64 = 1 << 32;

#[derive(Default)]
struct Seen {
    calls: Vec<String>,
    memory: Option<GuestMemory>,
    kick: Option<OwnedFd>,
}

/// A device that records what it is told.
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    protocol: u64,
}

impl Recorder {
    fn log(&self, what: String) {
        self.seen.lock().unwrap().calls.push(what);
    }
}

impl BackendHandler for Recorder {
    fn max_queues(&self) -> u32 {
        2
    }
    fn max_queue_size(&self) -> u32 {
        1024
    }
    fn get_features(&mut self) -> Result<u64> {
        Ok(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
    }
    fn get_protocol_features(&mut self) -> Result<u64> {
        Ok(self.protocol)
    }
    fn set_features(&mut self, features: u64) -> Result<()> {
        self.log(format!("features {features:#x}"));
        Ok(())
    }
    fn set_mem_table(&mut self, mem: &GuestMemory) -> Result<()> {
        self.seen.lock().unwrap().memory = Some(mem.clone());
        Ok(())
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.log(format!("num {index} {num}"));
        Ok(())
    }
    fn set_vring_addr(&mut self, a: &VringAddrs) -> Result<()> {
        self.log(format!("addr {} {:#x}", a.index, a.desc));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        Ok(40 + index)
    }
    fn set_vring_kick(&mut self, _index: u32, fd: Option<OwnedFd>) -> Result<()> {
        self.seen.lock().unwrap().kick = fd;
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, _flags: u32) -> Result<Vec<u8>> {
        Ok((offset..offset + size).map(|b| b as u8).collect())
    }
    fn get_shmem_config(&mut self) -> Result<ShmemConfig> {
        self.log("shmem".into());
        ShmemConfig::from_regions(&[(0, 1 << 21), (7, 0x1000)])
    }
}

fn start(protocol: u64) -> (Frontend, Arc<Mutex<Seen>>, thread::JoinHandle<Result<()>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut handler = Recorder {
        seen: seen.clone(),
        protocol,
    };
    let server = thread::spawn(move || BackendSession::new(b).run(&mut handler));
    (Frontend::new(a).unwrap(), seen, server)
}

fn negotiate(fe: &Frontend, protocol: u64) {
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol).unwrap();
    fe.set_features(features).unwrap();
}

#[test]
fn memory_crosses_by_fd_and_kicks_arrive() {
    let proto = pf::REPLY_ACK | pf::CONFIG;
    let (fe, seen, server) = start(proto);
    negotiate(&fe, proto);
    let ram = GuestMemory::allocate(&[(0, 1 << 20), (1 << 20, 1 << 20)]).unwrap();
    ram.write(0x1000, b"front-end wrote this").unwrap();
    let table: Vec<_> = ram.regions().iter().map(|r| (r.info(), r.fd())).collect();
    fe.set_mem_table(&table).unwrap();

    let back = seen.lock().unwrap().memory.clone().unwrap();
    let mut buf = [0u8; 20];
    back.read(0x1000, &mut buf).unwrap();
    assert_eq!(&buf, b"front-end wrote this");
    back.write((1 << 20) + 8, b"and back").unwrap();
    let mut reply = [0u8; 8];
    ram.read((1 << 20) + 8, &mut reply).unwrap();
    assert_eq!(&reply, b"and back");

    let kick = EventFd::new(false).unwrap();
    fe.set_vring_kick(1, Some(kick.as_fd())).unwrap();
    kick.write(3).unwrap();
    let received = EventFd::from_fd(seen.lock().unwrap().kick.take().unwrap());
    assert_eq!(received.read().unwrap(), 3);

    assert_eq!(fe.get_config(4, 4, 0).unwrap(), vec![4, 5, 6, 7]);
    assert_eq!(fe.get_vring_base(1).unwrap(), 41);
    drop(fe);
    server.join().unwrap().unwrap();
}

#[test]
fn session_rules_nack_and_connection_survives() {
    let proto = pf::REPLY_ACK;
    let (fe, seen, server) = start(proto);
    negotiate(&fe, proto);
    // Index beyond max_queues, size not a power of two, size over the device maximum.
    for (index, num) in [(2, 256), (0, 3), (0, 2048), (0, 0)] {
        match fe.set_vring_num(index, num) {
            Err(Error::Refused { status, .. }) => assert_ne!(status, 0),
            other => panic!("set_vring_num({index}, {num}) gave {other:?}"),
        }
    }
    // Gated on CROSS_ENDIAN, which was not negotiated: refused before sending.
    assert!(matches!(
        fe.set_vring_endian(0, true),
        Err(Error::InactiveFeature { .. })
    ));
    // A second SET_OWNER is refused.
    assert!(matches!(fe.set_owner(), Err(Error::Refused { .. })));
    // The connection still works, and only valid calls reached the handler.
    fe.set_vring_num(1, 256).unwrap();
    let calls = seen.lock().unwrap().calls.clone();
    assert!(calls.contains(&"num 1 256".to_string()), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("num 2 ")), "{calls:?}");
    drop(fe);
    server.join().unwrap().unwrap();
}

#[test]
fn gated_requests_fail_locally_without_the_feature() {
    let (fe, _seen, server) = start(pf::REPLY_ACK);
    negotiate(&fe, 0);
    assert!(matches!(
        fe.get_config(0, 4, 0),
        Err(Error::InactiveFeature {
            feature: "CONFIG",
            ..
        })
    ));
    assert!(matches!(
        fe.get_max_mem_slots(),
        Err(Error::InactiveFeature { .. })
    ));
    // Bits the back-end never offered are refused before sending.
    assert!(matches!(
        fe.set_protocol_features(pf::CONFIG),
        Err(Error::InvalidParam(_))
    ));
    assert_eq!(fe.get_vring_base(0).unwrap(), 40);
    drop(fe);
    server.join().unwrap().unwrap();
}

#[test]
fn ring_outside_memory_is_rejected() {
    let proto = pf::REPLY_ACK;
    let (fe, seen, server) = start(proto);
    negotiate(&fe, proto);
    let ram = GuestMemory::allocate(&[(0, 1 << 16)]).unwrap();
    let table: Vec<_> = ram.regions().iter().map(|r| (r.info(), r.fd())).collect();
    fe.set_mem_table(&table).unwrap();
    fe.set_vring_num(0, 256).unwrap();
    let base = ram.regions()[0].info().userspace_addr;
    let inside = VringAddrs {
        index: 0,
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        ..VringAddrs::default()
    };
    fe.set_vring_addr(&inside).unwrap();
    // The used ring would run past the end of the only region (D4).
    let straddling = VringAddrs {
        used: base + (1 << 16) - 8,
        ..inside
    };
    assert!(matches!(
        fe.set_vring_addr(&straddling),
        Err(Error::Refused { .. })
    ));
    let calls = seen.lock().unwrap().calls.clone();
    assert_eq!(calls.iter().filter(|c| c.starts_with("addr")).count(), 1);
    drop(fe);
    server.join().unwrap().unwrap();
}

#[test]
fn shmem_config_crosses_and_is_gated() {
    // Not negotiated: refused by our front-end before sending, the session unaffected.
    let (fe, seen, server) = start(pf::REPLY_ACK | pf::SHMEM);
    negotiate(&fe, pf::REPLY_ACK);
    assert!(matches!(
        fe.get_shmem_config(),
        Err(Error::InactiveFeature {
            feature: "SHMEM",
            ..
        })
    ));
    assert!(!fe.is_broken());
    drop(fe);
    server.join().unwrap().unwrap();
    assert!(!seen.lock().unwrap().calls.contains(&"shmem".to_string()));

    // Negotiated: the handler's sizes arrive by shmid.
    let (fe, seen, server) = start(pf::REPLY_ACK | pf::SHMEM);
    negotiate(&fe, pf::REPLY_ACK | pf::SHMEM);
    let cfg = fe.get_shmem_config().unwrap();
    assert_eq!(cfg.regions(), vec![(0, 1 << 21), (7, 0x1000)]);
    assert_eq!(cfg.nregions(), 2);
    fe.get_features().unwrap();
    drop(fe);
    server.join().unwrap().unwrap();
    assert!(seen.lock().unwrap().calls.contains(&"shmem".to_string()));
}

/// Every request a `Frontend` method sends is, byte for byte and fd for fd, what the
/// table's encoder gives for the request value, and the decoder gives that value back:
/// the encoder the decode tests and fuzz targets round-trip is the one that sends.
#[test]
fn the_frontend_sends_what_the_table_encodes() {
    use super::codes::FrontendReq;
    use super::connection::Connection;
    use super::header::Header;
    use super::message::FrontendRequest as R;
    use super::payload::VringState;
    use std::os::fd::BorrowedFd;

    let (near, far) = UnixStream::pair().unwrap();
    let fe = Frontend::new(near).unwrap();
    let mut peer = Connection::new(far);
    let kick = EventFd::new(false).unwrap();
    let addrs = VringAddrs {
        index: 1,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
        ..VringAddrs::default()
    };
    type Sent<'a> = R<BorrowedFd<'a>>;
    let expected: Vec<Sent<'_>> = vec![
        R::SetOwner,
        R::SetFeatures(VERSION_1),
        R::SetVringNum(VringState { index: 1, num: 256 }),
        R::SetVringAddr(addrs),
        R::SetVringBase(VringState { index: 1, num: 7 }),
        R::SetVringKick {
            index: 1,
            fd: Some(kick.as_fd()),
        },
        R::SetVringCall { index: 0, fd: None },
        R::SetVringEnable(VringState { index: 1, num: 1 }),
    ];
    fe.set_owner().unwrap();
    fe.set_features(VERSION_1).unwrap();
    fe.set_vring_num(1, 256).unwrap();
    fe.set_vring_addr(&addrs).unwrap();
    fe.set_vring_base(1, 7).unwrap();
    fe.set_vring_kick(1, Some(kick.as_fd())).unwrap();
    fe.set_vring_call(0, None).unwrap();
    fe.set_vring_enable(1, true).unwrap();
    for want in &expected {
        let msg = peer.recv(Header::check_request).unwrap();
        let code = FrontendReq::from_code(msg.header.code).unwrap();
        assert_eq!(code, want.kind());
        assert_eq!(msg.body, want.encode_body(), "{code:?}");
        assert_eq!(msg.fds.len(), want.fds().len(), "{code:?}");
        let back = R::decode(code, &msg.body, msg.fds).unwrap();
        assert_eq!(back.encode_body(), want.encode_body(), "{code:?}");
    }
}

/// GET_VRING_BASE_SKIP_DRAIN is in the table (so its code, name and gate reach Python
/// and tools), but its feature is not one this crate serves: a back-end refuses to ack
/// it even when its handler offers it, and refuses the request itself.
#[test]
fn get_vring_base_skip_drain_is_named_but_refused() {
    use super::codes::FrontendReq;
    use super::header::Header;
    use super::payload::VringState;

    let offered = pf::REPLY_ACK | pf::GET_VRING_BASE_SKIP_DRAIN;
    let (fe, _seen, server) = start(offered);
    fe.get_features().unwrap();
    assert_eq!(fe.get_protocol_features().unwrap(), offered);
    fe.set_protocol_features(pf::REPLY_ACK).unwrap();
    assert!(matches!(
        fe.set_protocol_features(offered),
        Err(Error::Refused { .. })
    ));
    let code = FrontendReq::GetVringBaseSkipDrain.code();
    let body = VringState { index: 0, num: 0 }.to_bytes();
    fe.send_raw(Header::request(code, 8, false), &body, &[], false)
        .unwrap();
    assert!(matches!(
        server.join().unwrap(),
        Err(Error::InactiveFeature {
            request: "GET_VRING_BASE_SKIP_DRAIN",
            feature: "GET_VRING_BASE_SKIP_DRAIN",
        })
    ));
}

/// Drives `call` as an event loop would: start, then advance whenever the socket is
/// readable (poll), counting the waits.
fn drive<T>(fe: &Frontend, call: super::frontend::Call<'_, T>) -> (Result<T>, usize) {
    use super::frontend::Started;
    use std::os::fd::BorrowedFd;
    let mut pending = match fe.start(call) {
        Ok(Started::Done(value)) => return (Ok(value), 0),
        Ok(Started::Waiting(p)) => p,
        Err(e) => return (Err(e), 0),
    };
    let mut waits = 0;
    loop {
        match fe.advance(&mut pending) {
            Ok(Some(value)) => return (Ok(value), waits),
            Ok(None) => {}
            Err(e) => return (Err(e), waits),
        }
        waits += 1;
        // SAFETY: the socket fd stays open as long as `fe`.
        let sock = unsafe { BorrowedFd::borrow_raw(fe.socket_fd()) };
        assert!(
            crate::sys::scm::wait_readable(sock, Some(std::time::Duration::from_secs(5))).unwrap()
        );
    }
}

#[test]
fn calls_driven_without_waiting_give_what_blocking_calls_give() {
    use super::frontend::{calls, NegotiateOptions};
    let proto = pf::REPLY_ACK | pf::CONFIG;
    let (fe, seen, server) = start(proto);
    // Negotiation: five requests as one call, each answer fed in as it arrives.
    let opts = NegotiateOptions {
        protocol_features: Some(proto),
        ..NegotiateOptions::default()
    };
    let (acked, waits) = drive(&fe, calls::negotiate(&opts).unwrap());
    assert_eq!(
        acked.unwrap(),
        (VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES, proto)
    );
    assert!(waits >= 1, "an answer was there before any wait: {waits}");
    assert_eq!(fe.acked_protocol_features(), proto);
    // A decoded reply, an ack, a refusal (NACK), as the blocking calls give them.
    assert_eq!(
        drive(&fe, calls::get_config(4, 4, 0)).0.unwrap(),
        vec![4, 5, 6, 7]
    );
    drive(&fe, calls::set_vring_num(1, 256)).0.unwrap();
    assert!(matches!(
        drive(&fe, calls::set_vring_num(0, 3)).0,
        Err(Error::Refused {
            request: "SET_VRING_NUM",
            ..
        })
    ));
    assert_eq!(drive(&fe, calls::get_vring_base(1)).0.unwrap(), 41);
    // Gated locally, before anything is sent, as the blocking call.
    assert!(matches!(
        drive(&fe, calls::set_vring_endian(0, true)).0,
        Err(Error::InactiveFeature { .. })
    ));
    assert!(!fe.is_broken());
    assert!(seen
        .lock()
        .unwrap()
        .calls
        .contains(&"num 1 256".to_string()));
    // Blocking and non-blocking calls mix on one connection, one at a time.
    assert_eq!(fe.get_vring_base(0).unwrap(), 40);
    drop(fe);
    server.join().unwrap().unwrap();
}

#[test]
fn an_abandoned_call_closes_the_connection_and_blocks_nothing_before() {
    use super::frontend::{calls, Started};
    let proto = pf::REPLY_ACK;
    let (fe, _seen, server) = start(proto);
    negotiate(&fe, proto);
    let Started::Waiting(mut pending) = fe.start(calls::get_features()).unwrap() else {
        panic!("GET_FEATURES has an answer to wait for");
    };
    // While it waits, no other request may go (its answer would be taken for this one's).
    assert!(matches!(fe.get_queue_num(), Err(Error::InvalidParam(_))));
    assert!(matches!(
        fe.start(calls::get_features()),
        Err(Error::InvalidParam(_))
    ));
    fe.abandon(&mut pending);
    assert!(pending.is_over());
    assert!(fe.is_broken());
    assert!(matches!(fe.get_features(), Err(Error::Closed)));
    assert!(matches!(fe.advance(&mut pending), Err(Error::Closed)));
    drop(fe);
    let _ = server.join().unwrap();
}
