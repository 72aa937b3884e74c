//! The front-end's end of the back-end channel fed hostile back-end requests: a
//! `FrontendChannel` with fuzz-chosen acked protocol features serves the fuzz input
//! ([`crate::stream`] chunks) with a handler that accepts some requests and refuses
//! others.
//!
//! Invariants: the loop ends (EOF, or a protocol error that breaks the channel); a
//! request the handler saw passed the feature gate the front-end acked; a broken channel
//! refuses every later request.

use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vhost_core::sys::memfd_create;
use vhost_core::user::channel::{FrontendChannel, FrontendReqHandler};
use vhost_core::user::codes::BackendReq;
use vhost_core::user::payload::{IotlbPayload, ShmemMapPayload, VringArea};
use vhost_core::user::{Error, Result};

use crate::input::Input;
use crate::stream;

/// Accepts what a front-end with nothing attached could accept, refuses the rest, and
/// remembers which requests reached it.
struct Handler {
    seen: Vec<BackendReq>,
}

impl FrontendReqHandler for Handler {
    fn config_change(&mut self) -> Result<u64> {
        self.seen.push(BackendReq::ConfigChangeMsg);
        Ok(0)
    }
    fn vring_host_notifier(&mut self, area: &VringArea, fd: Option<OwnedFd>) -> Result<u64> {
        self.seen.push(BackendReq::VringHostNotifierMsg);
        assert_eq!(
            area.nofd,
            fd.is_none(),
            "NOFD and the fd disagree: {area:?}"
        );
        Ok(0)
    }
    fn vring_call(&mut self, index: u32) -> Result<u64> {
        self.seen.push(BackendReq::VringCall);
        Ok(u64::from(index % 2))
    }
    fn iotlb_msg(&mut self, _msg: &IotlbPayload) -> Result<u64> {
        self.seen.push(BackendReq::IotlbMsg);
        Err(Error::NotSupported("IOTLB_MSG"))
    }
    fn shared_object_lookup_fd(&mut self, uuid: [u8; 16]) -> Result<(u64, Option<OwnedFd>)> {
        self.seen.push(BackendReq::SharedObjectLookup);
        if uuid[0].is_multiple_of(2) {
            let fd = memfd_create("fuzz-object", 4096).map_err(Error::Io)?;
            Ok((0, Some(fd)))
        } else {
            Ok((1, None))
        }
    }
    fn shmem_map(&mut self, _map: &ShmemMapPayload, _fd: OwnedFd) -> Result<u64> {
        self.seen.push(BackendReq::ShmemMap);
        Ok(0)
    }
}

pub fn run(data: &[u8]) {
    crate::ignore_sigpipe();
    let mut input = Input(data);
    let acked = input.u64();
    let memory = memfd_create("fuzz-channel", 1 << 16).expect("memfd");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut channel = FrontendChannel::new(ours, acked);
    let mut handler = Handler { seen: Vec::new() };
    std::thread::scope(|s| {
        let peer = s.spawn(|| {
            stream::send(&theirs, input.0, memory.as_fd());
            let _ = theirs.shutdown(Shutdown::Write);
            stream::drain(&theirs);
        });
        loop {
            let was_broken = channel.is_broken();
            let r = channel.handle_one(&mut handler);
            if was_broken {
                assert!(r.is_err(), "a broken channel handled a request");
            }
            match r {
                Err(Error::Disconnected) => break,
                Err(_) if channel.is_broken() => break,
                _ => {}
            }
        }
        drop(channel);
        // Joined explicitly (pthread_join): the scope alone only waits for the closure,
        // and a thread still exiting holds its thread-local destructor list, which the
        // leak checker reports.
        peer.join().expect("the peer thread");
    });
    for code in handler.seen {
        if let Some(bit) = code.required_protocol_feature() {
            assert_ne!(
                acked & bit,
                0,
                "{code:?} reached the handler without its feature"
            );
        }
    }
}
