//! Device state for live migration (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`): the
//! device's opaque state ([`VirtioDevice::save_state`] / [`VirtioDevice::load_state`]) goes
//! through the pipe the front-end hands over, on a thread of its own so that the control
//! plane keeps answering; `CHECK_DEVICE_STATE` collects the outcome.
//!
//! A transfer is bounded in size ([`MAX_DEVICE_STATE`]), in time without progress and in
//! total time, and it is cancelled when the session ends or a new transfer replaces it: a
//! front-end that never reads, never writes or never closes its end holds neither the
//! daemon nor a thread or an fd past its session (ADVERSARIAL K5).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::sys::pipe::{check_stream_end, read_to_end, write_all, Bounds, Way};
use crate::sys::EventFd;
use crate::user::payload::DeviceStateTransfer;
use crate::user::{Error, Result, MAX_DEVICE_STATE};

use super::device::VirtioDevice;

/// Longest a transfer waits with no byte moved before it fails.
pub const STATE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the bytes of one transfer may take in all (a front-end trickling them).
pub const STATE_TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a transfer may take: [`STATE_STALL_TIMEOUT`] and [`STATE_TRANSFER_TIMEOUT`]
/// unless a test says otherwise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) stall: Duration,
    pub(crate) total: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stall: STATE_STALL_TIMEOUT,
            total: STATE_TRANSFER_TIMEOUT,
        }
    }
}

/// One transfer in progress (or finished and not yet checked).
pub(crate) struct StateTransfer {
    cancel: Arc<EventFd>,
    thread: Option<JoinHandle<std::result::Result<(), String>>>,
}

impl std::fmt::Debug for StateTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTransfer")
            .field(
                "finished",
                &self.thread.as_ref().map_or(true, |t| t.is_finished()),
            )
            .finish()
    }
}

/// Which way the state goes for `transfer`, or why it is refused (a failure status, not a
/// closed connection: the spec foresees more phases).
fn way_of(transfer: &DeviceStateTransfer) -> Result<Way> {
    if transfer.phase != DeviceStateTransfer::PHASE_STOPPED {
        return Err(Error::InvalidParam(format!(
            "SET_DEVICE_STATE_FD: phase {} is not supported (only {}, the device stopped)",
            transfer.phase,
            DeviceStateTransfer::PHASE_STOPPED
        )));
    }
    match transfer.direction {
        DeviceStateTransfer::DIRECTION_SAVE => Ok(Way::Write),
        DeviceStateTransfer::DIRECTION_LOAD => Ok(Way::Read),
        d => Err(Error::InvalidParam(format!(
            "SET_DEVICE_STATE_FD: direction {d} is neither save ({}) nor load ({})",
            DeviceStateTransfer::DIRECTION_SAVE,
            DeviceStateTransfer::DIRECTION_LOAD
        ))),
    }
}

/// The transfer itself, on its thread: save and write, or read and load.
fn run(
    device: &dyn VirtioDevice,
    way: Way,
    fd: OwnedFd,
    bounds: Bounds<'_>,
) -> std::result::Result<(), String> {
    match way {
        Way::Write => {
            // On any failure `fd` closes here: the front-end sees an end of file and
            // learns the outcome from CHECK_DEVICE_STATE.
            let state = device
                .save_state()
                .map_err(|e| format!("saving the device state: {e}"))?;
            if state.len() > MAX_DEVICE_STATE {
                return Err(format!(
                    "the device saved {} bytes of state, more than the {MAX_DEVICE_STATE} allowed",
                    state.len()
                ));
            }
            write_all(fd.as_fd(), &state, bounds)
                .map_err(|e| format!("writing {} bytes of device state: {e}", state.len()))
        }
        Way::Read => {
            let state = read_to_end(fd.as_fd(), bounds)
                .map_err(|e| format!("reading the device state: {e}"))?;
            drop(fd);
            device
                .load_state(&state)
                .map_err(|e| format!("loading {} bytes of device state: {e}", state.len()))
        }
    }
}

impl StateTransfer {
    /// Checks the request and `fd` (a pipe or socket end open the right way), then starts
    /// the transfer on its own thread.
    pub(crate) fn start(
        device: Arc<dyn VirtioDevice>,
        transfer: &DeviceStateTransfer,
        fd: OwnedFd,
        limits: Limits,
    ) -> Result<Self> {
        let way = way_of(transfer)?;
        check_stream_end(fd.as_fd(), way)
            .map_err(|e| Error::InvalidParam(format!("SET_DEVICE_STATE_FD: {e}")))?;
        let cancel = Arc::new(
            EventFd::new(true)
                .map_err(|e| Error::Handler(format!("SET_DEVICE_STATE_FD: eventfd: {e}")))?,
        );
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("device-state".into())
            .spawn(move || {
                let bounds = Bounds {
                    max_len: MAX_DEVICE_STATE,
                    stall: Some(limits.stall),
                    total: Some(limits.total),
                    cancel: Some(stop.as_fd()),
                };
                run(&*device, way, fd, bounds)
            })
            .map_err(|e| {
                Error::Handler(format!("SET_DEVICE_STATE_FD: cannot start a thread: {e}"))
            })?;
        Ok(StateTransfer {
            cancel,
            thread: Some(thread),
        })
    }

    /// `CHECK_DEVICE_STATE`: waits for the transfer (bounded by its limits) and says
    /// whether the device saved or loaded its state.
    pub(crate) fn finish(mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        match thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(Error::Handler(format!(
                "device state transfer failed: {why}"
            ))),
            Err(_) => Err(Error::Handler(
                "device state transfer failed: the device panicked".into(),
            )),
        }
    }
}

impl Drop for StateTransfer {
    /// Cancels a transfer still waiting on the front-end and waits for its thread, which
    /// closes the fd.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.cancel.write(1);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::daemon::DeviceError;
    use crate::memory::GuestMemory;
    use crate::sys::pipe::{patient, pipe};
    use crate::vring::DescriptorChain;

    /// A device whose state is a byte string; a state starting with `!` does not load.
    struct Stateful(Mutex<Vec<u8>>);

    impl VirtioDevice for Stateful {
        fn device_type(&self) -> u32 {
            4
        }
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            0
        }
        fn config(&self) -> Vec<u8> {
            Vec::new()
        }
        fn process(
            &self,
            _: u16,
            _: &GuestMemory,
            _: Vec<DescriptorChain>,
            _: &mut Vec<(u16, u32)>,
        ) -> std::result::Result<(), DeviceError> {
            Ok(())
        }
        fn save_state(&self) -> std::result::Result<Vec<u8>, DeviceError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn load_state(&self, state: &[u8]) -> std::result::Result<(), DeviceError> {
            if state.first() == Some(&b'!') {
                return Err(DeviceError::Invalid("garbage".into()));
            }
            *self.0.lock().unwrap() = state.to_vec();
            Ok(())
        }
    }

    fn transfer(direction: u32) -> DeviceStateTransfer {
        DeviceStateTransfer {
            direction,
            phase: DeviceStateTransfer::PHASE_STOPPED,
        }
    }

    fn short() -> Limits {
        Limits {
            stall: Duration::from_millis(100),
            total: Duration::from_millis(300),
        }
    }

    #[test]
    fn saves_and_loads_through_a_pipe() {
        let dev = Arc::new(Stateful(Mutex::new(b"counter=7".to_vec())));
        let (r, w) = pipe().unwrap();
        let t = StateTransfer::start(dev.clone(), &transfer(0), w, Limits::default()).unwrap();
        let got = read_to_end(r.as_fd(), patient(100)).unwrap();
        assert_eq!(got, b"counter=7");
        t.finish().unwrap();

        let (r, w) = pipe().unwrap();
        let t = StateTransfer::start(dev.clone(), &transfer(1), r, Limits::default()).unwrap();
        write_all(w.as_fd(), b"counter=9", patient(0)).unwrap();
        drop(w);
        t.finish().unwrap();
        assert_eq!(*dev.0.lock().unwrap(), b"counter=9");
    }

    #[test]
    fn a_refused_load_keeps_the_previous_state() {
        let dev = Arc::new(Stateful(Mutex::new(b"old".to_vec())));
        let (r, w) = pipe().unwrap();
        let t = StateTransfer::start(dev.clone(), &transfer(1), r, Limits::default()).unwrap();
        write_all(w.as_fd(), b"!garbage", patient(0)).unwrap();
        drop(w);
        let err = t.finish().unwrap_err().to_string();
        assert!(
            err.contains("loading 8 bytes of device state: invalid request: garbage"),
            "{err}"
        );
        assert_eq!(*dev.0.lock().unwrap(), b"old");
    }

    #[test]
    fn unknown_phases_directions_and_wrong_fds_are_refused() {
        let dev: Arc<dyn VirtioDevice> = Arc::new(Stateful(Mutex::new(Vec::new())));
        let (r, w) = pipe().unwrap();
        let bad_phase = DeviceStateTransfer {
            direction: 0,
            phase: 1,
        };
        let e = StateTransfer::start(dev.clone(), &bad_phase, w, short()).unwrap_err();
        assert!(e.to_string().contains("phase 1 is not supported"), "{e}");
        let e = StateTransfer::start(dev.clone(), &transfer(2), r, short()).unwrap_err();
        assert!(e.to_string().contains("direction 2 is neither"), "{e}");
        let (r, _w) = pipe().unwrap();
        let e = StateTransfer::start(dev.clone(), &transfer(0), r, short()).unwrap_err();
        assert!(e.to_string().contains("not open for writing"), "{e}");
        let ev = EventFd::new(false).unwrap();
        let fd = crate::sys::dup_cloexec(ev.as_fd()).unwrap();
        let e = StateTransfer::start(dev, &transfer(1), fd, short()).unwrap_err();
        assert!(e.to_string().contains("not a pipe or a socket"), "{e}");
    }

    #[test]
    fn a_front_end_that_never_reads_or_writes_is_bounded() {
        let dev = Arc::new(Stateful(Mutex::new(vec![1; 1 << 20])));
        let (_r, w) = pipe().unwrap();
        let t = StateTransfer::start(dev.clone(), &transfer(0), w, short()).unwrap();
        let e = t.finish().unwrap_err().to_string();
        assert!(e.contains("made no progress"), "{e}");
        // A writer that keeps the pipe open without writing: the same bound.
        let (r, _w) = pipe().unwrap();
        let t = StateTransfer::start(dev, &transfer(1), r, short()).unwrap();
        let e = t.finish().unwrap_err().to_string();
        assert!(e.contains("reading the device state"), "{e}");
    }

    #[test]
    fn dropping_a_transfer_cancels_it_and_closes_its_fd() {
        let dev = Arc::new(Stateful(Mutex::new(vec![1; 1 << 20])));
        let (r, w) = pipe().unwrap();
        let t = StateTransfer::start(dev, &transfer(0), w, Limits::default()).unwrap();
        let started = Instant::now();
        drop(t);
        // Cancelled at once, not after the 10 s stall bound, and its pipe end is closed:
        // the reader sees the end of file after what fitted in the pipe.
        assert!(started.elapsed() < Duration::from_secs(5));
        let got = read_to_end(r.as_fd(), patient(2 << 20)).unwrap();
        assert!(got.len() < 1 << 20);
    }

    /// Our front-end and a daemon over a socketpair, negotiated with DEVICE_STATE.
    fn session(dev: Arc<Stateful>) -> (crate::user::Frontend, JoinHandle<Result<()>>) {
        use crate::daemon::{transport, Daemon};
        use crate::user::codes::{protocol_features as pf, VHOST_USER_F_PROTOCOL_FEATURES};
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let daemon = Daemon::new(dev).unwrap();
        let server = std::thread::spawn(move || daemon.serve_stream(b));
        let fe = crate::user::Frontend::new(a).unwrap();
        fe.get_features().unwrap();
        fe.set_owner().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert_ne!(proto & pf::DEVICE_STATE, 0);
        fe.set_protocol_features(pf::REPLY_ACK | pf::DEVICE_STATE)
            .unwrap();
        fe.set_features(transport::VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
            .unwrap();
        (fe, server)
    }

    #[test]
    fn a_front_end_moves_state_between_two_daemons() {
        let src = Arc::new(Stateful(Mutex::new(b"counter=3".to_vec())));
        let dst = Arc::new(Stateful(Mutex::new(Vec::new())));
        let (fe, server) = session(src);
        let state = fe.save_device_state().unwrap();
        assert_eq!(state, b"counter=3");
        // CHECK_DEVICE_STATE with no transfer: a failure status, the session goes on.
        assert!(matches!(
            fe.check_device_state(),
            Err(Error::Refused {
                request: "CHECK_DEVICE_STATE",
                ..
            })
        ));
        drop(fe);
        server.join().unwrap().unwrap();

        let (fe, server) = session(dst.clone());
        fe.load_device_state(&state).unwrap();
        assert_eq!(*dst.0.lock().unwrap(), b"counter=3");
        assert!(matches!(
            fe.load_device_state(b"!garbage"),
            Err(Error::Refused {
                request: "CHECK_DEVICE_STATE",
                ..
            })
        ));
        assert_eq!(*dst.0.lock().unwrap(), b"counter=3");
        drop(fe);
        server.join().unwrap().unwrap();
    }
}
