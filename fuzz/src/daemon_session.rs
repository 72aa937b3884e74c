//! The real daemon fed a hostile stream: `Daemon::serve_stream` with the native block
//! device (a RAM disk) on one end of a socketpair, the fuzz input sent on the other as
//! vhost-user chunks with fds ([`crate::stream`]): guest-memory memfds, eventfds, files
//! and sockets where the stream cannot carry them.
//!
//! Invariants: the session ends (by EOF, a refusal or a stall bound), the daemon counts
//! it as ended, and every fd it received or made is closed when it returns (ADVERSARIAL
//! J1: no leak, whatever the stream).

use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vhost_core::daemon::Daemon;
use vhost_core::devices::blk::{BlkConfig, BlkDevice};
use vhost_core::sys::memfd_create;

use crate::stream;

/// Guest memory the stream's memfds share (1 MiB).
pub const GUEST_MEMORY: u64 = 1 << 20;

pub fn run(data: &[u8]) {
    run_session(data);
}

/// [`run`], returning the error that ended the session or was refused last, if any (the
/// seed tests check the seeds are served without one).
pub fn run_session(data: &[u8]) -> Option<String> {
    crate::ignore_sigpipe();
    let before = crate::open_fds();
    let error = {
        let device = BlkDevice::ram(64 << 10, BlkConfig::default()).expect("RAM disk");
        let daemon = Daemon::new(Arc::new(device))
            .expect("daemon")
            // A message cut short by the end of the input is an EOF, not a stall; a bound
            // keeps anything else from hanging the fuzzer.
            .with_stall_timeout(Duration::from_millis(500));
        let memory = memfd_create("fuzz-guest", GUEST_MEMORY).expect("memfd");
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        std::thread::scope(|s| {
            let peer = s.spawn(|| {
                stream::send(&theirs, data, memory.as_fd());
                let _ = theirs.shutdown(Shutdown::Write);
                stream::drain(&theirs);
            });
            let _ = daemon.serve_stream(ours);
            // Joined explicitly (pthread_join): the scope alone only waits for the closure,
            // and a thread still exiting holds its thread-local destructor list, which the
            // leak checker reports.
            peer.join().expect("the peer thread");
        });
        let stats = daemon.stats();
        assert_eq!(stats.sessions_ended.load(Ordering::SeqCst), 1);
        assert!(!stats.active.load(Ordering::SeqCst));
        stats.last_error()
    };
    assert_eq!(crate::open_fds(), before, "a daemon session leaked fds");
    error
}
