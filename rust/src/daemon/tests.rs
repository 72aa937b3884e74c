//! The daemon end to end without Python: the core's `Frontend` and a `SplitDriver` on one
//! end of a socketpair, `Daemon::serve_stream` with a small Rust device on the other.
//! Covers real data through two queues, a panicking or failing device (chains returned
//! empty, the queue goes on: J7), stop, disconnects (J1) and a reconnect that resumes the
//! ring from GET_VRING_BASE (J2).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use super::{transport, Daemon, DaemonStats, DeviceError, Stopper, VirtioDevice};
use crate::backend::VringAddrs;
use crate::memory::GuestMemory;
use crate::sys::{poll_many, EventFd};
use crate::user::codes::{protocol_features as pf, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::user::{Error, Frontend, Result};
use crate::vring::{DescriptorChain, RingLayout, SplitDriver};

const QUEUE_SIZE: u32 = 16;
const RING_AREA: u64 = 0x1_0000;
const DATA: u64 = 0x10_0000;

/// Writes the readable bytes back reversed. A chain starting with `P` makes it panic,
/// one starting with `E` makes it fail without completing anything.
pub(super) struct Mirror;

impl VirtioDevice for Mirror {
    fn device_type(&self) -> u32 {
        4
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn features(&self) -> u64 {
        0
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn process(
        &self,
        _queue: u16,
        mem: &GuestMemory,
        chains: Vec<DescriptorChain>,
        done: &mut Vec<(u16, u32)>,
    ) -> std::result::Result<(), DeviceError> {
        for chain in &chains {
            let mut data = chain.read_all(mem, 4096)?;
            match data.first() {
                Some(b'P') => panic!("device bug"),
                Some(b'E') => return Err(DeviceError::Invalid("asked to fail".into())),
                _ => {}
            }
            data.reverse();
            let n = chain.write_all(mem, &data)?;
            done.push((chain.head, n));
        }
        Ok(())
    }
}

struct Guest {
    mem: GuestMemory,
    queues: Vec<(SplitDriver, EventFd, EventFd)>,
}

impl Guest {
    fn new() -> Self {
        let mem = GuestMemory::allocate(&[(0, 2 << 20)]).unwrap();
        let queues = (0..2u64)
            .map(|q| {
                let layout = RingLayout::split_at(QUEUE_SIZE, q * RING_AREA).unwrap();
                let mut drv = SplitDriver::new(layout, false).unwrap();
                drv.init(&mem).unwrap();
                (
                    drv,
                    EventFd::new(false).unwrap(),
                    EventFd::new(false).unwrap(),
                )
            })
            .collect();
        Guest { mem, queues }
    }

    fn user(&self, gpa: u64) -> u64 {
        let info = self.mem.regions()[0].info();
        info.userspace_addr + gpa - info.guest_phys_addr
    }

    /// Negotiates, shares the memory and hands both rings over from `bases`.
    fn attach(&self, fe: &Frontend, bases: [u32; 2]) {
        let offered = fe.get_features().unwrap();
        assert_ne!(offered & transport::VERSION_1, 0);
        fe.set_owner().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto & (pf::REPLY_ACK | pf::MQ))
            .unwrap();
        fe.set_features(transport::VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
            .unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), 2);
        let table: Vec<_> = self
            .mem
            .regions()
            .iter()
            .map(|r| (r.info(), r.fd()))
            .collect();
        fe.set_mem_table(&table).unwrap();
        for (q, (_, kick, call)) in self.queues.iter().enumerate() {
            let base = q as u64 * RING_AREA;
            let layout = RingLayout::split_at(QUEUE_SIZE, base).unwrap();
            let [(desc, _), (avail, _), (used, _)] = layout.areas();
            let index = q as u32;
            fe.set_vring_num(index, QUEUE_SIZE).unwrap();
            fe.set_vring_addr(&VringAddrs {
                index,
                flags: 0,
                desc: self.user(desc),
                used: self.user(used),
                avail: self.user(avail),
                log: 0,
            })
            .unwrap();
            fe.set_vring_base(index, bases[q]).unwrap();
            fe.set_vring_call(index, Some(call.as_fd())).unwrap();
            fe.set_vring_kick(index, Some(kick.as_fd())).unwrap();
            fe.set_vring_enable(index, true).unwrap();
        }
    }

    /// Offers `data` on queue `q` with as many writable bytes, kicks, and waits for the
    /// completion: (bytes the device wrote, what it wrote).
    fn roundtrip(&mut self, q: usize, data: &[u8]) -> (u32, Vec<u8>) {
        self.offer(q, data);
        self.wait(q, data.len())
    }

    fn offer(&mut self, q: usize, data: &[u8]) {
        let src = DATA + q as u64 * 0x4_0000;
        let dst = src + 0x2_0000;
        self.mem.write(src, data).unwrap();
        self.mem.write(dst, &vec![0u8; data.len()]).unwrap();
        let n = data.len() as u32;
        let (drv, kick, _) = &mut self.queues[q];
        drv.add(&self.mem, &[(src, n)], &[(dst, n)]).unwrap();
        drv.publish(&self.mem).unwrap();
        kick.write(1).unwrap();
    }

    fn wait(&mut self, q: usize, len: usize) -> (u32, Vec<u8>) {
        let dst = DATA + q as u64 * 0x4_0000 + 0x2_0000;
        let (drv, _, call) = &mut self.queues[q];
        for _ in 0..100 {
            let used = drv.poll_used(&self.mem).unwrap();
            if let Some(&(_, n)) = used.first() {
                assert_eq!(used.len(), 1);
                let mut out = vec![0u8; len];
                self.mem.read(dst, &mut out).unwrap();
                return (n, out);
            }
            if poll_many(&[call.as_fd()], 100).unwrap()[0] {
                call.read().unwrap();
            }
        }
        panic!("queue {q}: no completion in 10 s");
    }
}

struct Running {
    fe: Frontend,
    server: JoinHandle<Result<()>>,
}

fn serve(daemon: &Arc<Daemon>) -> Running {
    let (a, b) = UnixStream::pair().unwrap();
    let d = daemon.clone();
    let server = thread::spawn(move || d.serve_stream(b));
    Running {
        fe: Frontend::new(a).unwrap(),
        server,
    }
}

/// The completion counters, once they reach `want`: a worker counts a batch just after
/// publishing it, so the driver may see the used entries a moment before the count.
fn settle(stats: &DaemonStats, want: &[u64]) {
    for _ in 0..500 {
        if stats.completed() == want {
            return;
        }
        thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(stats.completed(), want);
}

fn daemon() -> (Arc<Daemon>, Arc<DaemonStats>, Stopper) {
    let d = Daemon::new(Arc::new(Mirror)).unwrap();
    let (stats, stop) = (d.stats(), d.stopper());
    (Arc::new(d), stats, stop)
}

/// A daemon whose events arrive on the returned channel.
fn daemon_with_events() -> (Daemon, std::sync::mpsc::Receiver<super::DaemonEvent>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let daemon = Daemon::new(Arc::new(Mirror))
        .unwrap()
        .with_events(Arc::new(move |e| {
            let _ = tx.send(e);
        }));
    (daemon, rx)
}

#[test]
fn data_moves_through_both_queues() {
    let (daemon, stats, _) = daemon();
    let mut guest = Guest::new();
    let run = serve(&daemon);
    guest.attach(&run.fe, [0, 0]);
    for round in 0..40u8 {
        for q in 0..2 {
            let data: Vec<u8> = (0..100).map(|i| i ^ round ^ q as u8).collect();
            let (n, out) = guest.roundtrip(q, &data);
            assert_eq!(n, 100);
            let mut rev = data.clone();
            rev.reverse();
            assert_eq!(out, rev);
        }
    }
    settle(&stats, &[40, 40]);
    assert!(stats.active.load(Ordering::SeqCst));
    drop(run.fe);
    run.server.join().unwrap().unwrap();
    assert!(!stats.active.load(Ordering::SeqCst));
    assert_eq!(stats.sessions_ended.load(Ordering::SeqCst), 1);
}

#[test]
fn panicking_or_failing_device_returns_chains_empty_and_goes_on() {
    let (daemon, stats, _) = daemon();
    let mut guest = Guest::new();
    let run = serve(&daemon);
    guest.attach(&run.fe, [0, 0]);
    assert_eq!(guest.roundtrip(0, b"Panic now"), (0, vec![0; 9]));
    assert_eq!(guest.roundtrip(1, b"Error now"), (0, vec![0; 9]));
    // The queue state lock was held by the panicking worker: it is not poisoned for good.
    assert_eq!(guest.roundtrip(0, b"abc"), (3, b"cba".to_vec()));
    assert_eq!(guest.roundtrip(1, b"xyz"), (3, b"zyx".to_vec()));
    settle(&stats, &[2, 2]);
    // The session itself never noticed.
    assert_eq!(run.fe.get_queue_num().unwrap(), 2);
    drop(run.fe);
    run.server.join().unwrap().unwrap();
    assert_eq!(stats.last_error(), None);
}

#[test]
fn stop_ends_a_live_session() {
    let (daemon, stats, stop) = daemon();
    let mut guest = Guest::new();
    let run = serve(&daemon);
    guest.attach(&run.fe, [0, 0]);
    assert_eq!(guest.roundtrip(1, b"ab"), (2, b"ba".to_vec()));
    stop.stop();
    run.server.join().unwrap().unwrap();
    assert!(daemon.is_stopped());
    assert!(!stats.active.load(Ordering::SeqCst));
    // The front-end sees the session gone.
    assert!(run.fe.get_features().is_err());
}

#[test]
fn stop_interrupts_a_message_being_read() {
    // Half a header under the default 5 s stall timeout: the stop does not wait for the
    // rest (nor for the stall), and the session ends stopped, not failed.
    let (daemon, rx) = daemon_with_events();
    let stop = daemon.stopper();
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || daemon.serve_stream(b));
    crate::sys::send_all(a.as_fd(), &[1, 0, 0, 0, 1], &[]).unwrap();
    thread::sleep(std::time::Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    stop.stop();
    server.join().unwrap().unwrap();
    assert!(t0.elapsed() < std::time::Duration::from_secs(2));
    let ended: Vec<_> = rx
        .try_iter()
        .filter_map(|e| match e {
            super::DaemonEvent::SessionEnded { end, .. } => Some(end),
            _ => None,
        })
        .collect();
    assert_eq!(ended, [super::SessionEnd::Stopped]);
}

#[test]
fn disconnect_mid_message_is_an_error_of_that_session_only() {
    let (daemon, stats, _) = daemon();
    let (a, b) = UnixStream::pair().unwrap();
    let d = daemon.clone();
    let server = thread::spawn(move || d.serve_stream(b));
    // Half a header, then gone.
    crate::sys::send_all(a.as_fd(), &[1, 0, 0, 0, 1], &[]).unwrap();
    drop(a);
    let r = server.join().unwrap();
    assert!(matches!(r, Err(Error::PartialMessage(_))), "{r:?}");
    assert!(stats.last_error().is_some());
    assert_eq!(stats.sessions_ended.load(Ordering::SeqCst), 1);
    // The next front-end is served.
    let mut guest = Guest::new();
    let run = serve(&daemon);
    guest.attach(&run.fe, [0, 0]);
    assert_eq!(guest.roundtrip(0, b"ok"), (2, b"ko".to_vec()));
    drop(run.fe);
    run.server.join().unwrap().unwrap();
    assert_eq!(stats.sessions_started.load(Ordering::SeqCst), 2);
}

#[test]
fn reconnect_resumes_the_rings_from_their_base() {
    let (daemon, _, _) = daemon();
    let mut guest = Guest::new();
    let run = serve(&daemon);
    guest.attach(&run.fe, [0, 0]);
    for i in 0..21u8 {
        assert_eq!(guest.roundtrip(0, &[i, 1]).0, 2);
    }
    assert_eq!(guest.roundtrip(1, b"q1").0, 2);
    let bases = [
        run.fe.get_vring_base(0).unwrap(),
        run.fe.get_vring_base(1).unwrap(),
    ];
    assert_eq!(bases, [21, 1]);
    drop(run.fe);
    run.server.join().unwrap().unwrap();
    // Offered while nobody serves the ring: the kick is lost, the buffer is not.
    guest.offer(0, b"pending");
    let run = serve(&daemon);
    guest.attach(&run.fe, bases);
    assert_eq!(guest.wait(0, 7), (7, b"gnidnep".to_vec()));
    for i in 0..20u8 {
        assert_eq!(guest.roundtrip(0, &[i, 2, 3]), (3, vec![3, 2, i]));
    }
    assert_eq!(guest.roundtrip(1, b"again"), (5, b"niaga".to_vec()));
    drop(run.fe);
    run.server.join().unwrap().unwrap();
}

#[test]
fn events_report_sessions_refusals_and_a_corrupt_ring() {
    let (daemon, rx) = daemon_with_events();
    let daemon = Arc::new(daemon);
    let mut guest = Guest::new();
    let run = serve(&daemon);
    // A ring started before its addresses: refused, the session goes on.
    run.fe.get_features().unwrap();
    run.fe.set_owner().unwrap();
    run.fe
        .set_protocol_features(pf::REPLY_ACK | pf::MQ)
        .unwrap();
    let kick = EventFd::new(false).unwrap();
    assert!(run.fe.set_vring_kick(0, Some(kick.as_fd())).is_err());
    run.fe.reset_owner().unwrap();
    guest.attach(&run.fe, [0, 0]);
    assert_eq!(guest.roundtrip(1, b"ok"), (2, b"ko".to_vec()));
    // The driver's avail index jumps by more than the ring holds (E6): queue 1 stops.
    let layout = RingLayout::split_at(QUEUE_SIZE, RING_AREA).unwrap();
    let [_, (avail, _), _] = layout.areas();
    guest.mem.write(avail + 2, &1000u16.to_le_bytes()).unwrap();
    guest.queues[1].1.write(1).unwrap();
    let wait = std::time::Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e| matches!(e, super::DaemonEvent::QueueFailed { .. }))
    {
        seen.push(rx.recv_timeout(wait).expect("no queue failure reported"));
    }
    drop(run.fe);
    run.server.join().unwrap().unwrap();
    seen.extend(rx.try_iter());
    use super::{DaemonEvent as Ev, SessionEnd};
    assert!(
        matches!(seen[0], Ev::SessionStarted { session: 1 }),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[1], Ev::Refused { session: 1, request: "SET_VRING_KICK", reason, hint: None }
            if reason.contains("before SET_VRING_ADDR")),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[2], Ev::QueueFailed { session: 1, queue: 1, reason } if reason.starts_with("queue 1:")),
        "{seen:?}"
    );
    assert_eq!(
        seen[3],
        Ev::SessionEnded {
            session: 1,
            end: SessionEnd::Closed,
            hint: None
        }
    );
    assert_eq!(seen.len(), 4, "{seen:?}");
}

/// The runner serves on its own thread: a front-end negotiates through it (with the core's
/// `negotiate`), a second start is refused, a bounded wait times out while it serves, a
/// stop ends it, the socket is gone when `wait` says so, and it starts again.
#[test]
fn runner_starts_stops_waits_and_restarts() {
    use super::{DaemonRunner, Mode, StartError};
    use crate::user::frontend::NegotiateOptions;
    use std::time::Duration;

    let dir = std::env::temp_dir().join(format!("vhost-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("mirror.sock");
    let runner = DaemonRunner::new(Box::new(|| Daemon::new(Arc::new(Mirror))));
    assert!(
        runner.wait(Some(Duration::ZERO)).unwrap(),
        "nothing started: nothing to wait for"
    );
    for round in 0..2 {
        runner.start(&sock, Mode::Server).unwrap();
        assert!(sock.exists(), "round {round}: listening when start returns");
        assert!(runner.is_running());
        assert!(matches!(
            runner.start(&sock, Mode::Server),
            Err(StartError::AlreadyRunning)
        ));
        let fe = Frontend::connect(&sock).unwrap();
        let (features, _) = fe.negotiate(&NegotiateOptions::default()).unwrap();
        assert_ne!(features & transport::VERSION_1, 0);
        assert!(!runner.wait(Some(Duration::from_millis(50))).unwrap());
        runner.stop();
        assert!(runner.wait(Some(Duration::from_secs(10))).unwrap());
        assert!(!runner.is_running());
        assert!(
            !sock.exists(),
            "round {round}: the socket is gone once finished"
        );
        assert_eq!(
            runner
                .stats()
                .unwrap()
                .sessions_started
                .load(Ordering::SeqCst),
            1
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client-mode session that ends in error is handed to one waiter; another waiter, on
/// another thread, sees the daemon finished.
#[test]
fn runner_hands_the_error_that_ended_it_to_one_waiter() {
    use super::{DaemonRunner, Mode};
    use crate::user::header::Header;
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    let dir = std::env::temp_dir().join(format!("vhost-runner-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("frontend.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let runner = Arc::new(DaemonRunner::new(Box::new(|| {
        Daemon::new(Arc::new(Mirror))
    })));
    runner.start(&sock, Mode::Client).unwrap();
    let other = {
        let runner = runner.clone();
        thread::spawn(move || runner.wait(Some(Duration::from_secs(10))))
    };
    let (stream, _) = listener.accept().unwrap();
    let fe = Frontend::new(stream).unwrap();
    // Request code 0 is no request: the daemon ends the session with a protocol error.
    fe.send_raw(Header::request(0, 0, false), &[], &[], false)
        .unwrap();
    let mine = runner.wait(Some(Duration::from_secs(10)));
    let theirs = other.join().unwrap();
    let errors = [&mine, &theirs].iter().filter(|r| r.is_err()).count();
    assert_eq!(errors, 1, "{mine:?} {theirs:?}");
    assert!([mine, theirs].into_iter().any(|r| matches!(r, Ok(true))));
    assert!(!runner.is_running());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The settings a binding takes from its user are checked in the core, each refusal
/// naming the setting.
#[test]
fn daemon_settings_refuse_zero_bounds() {
    use super::DaemonSettings;
    use std::time::Duration;

    let good = DaemonSettings {
        stall_timeout: Duration::from_secs(5),
        poll: Duration::ZERO,
        postcopy_fault_timeout: None,
        sealed_memory_only: false,
    };
    good.check().unwrap();
    let zero_stall = DaemonSettings {
        stall_timeout: Duration::ZERO,
        ..good
    };
    let zero_fault = DaemonSettings {
        postcopy_fault_timeout: Some(Duration::ZERO),
        ..good
    };
    for (settings, name) in [
        (zero_stall, "stall_timeout"),
        (zero_fault, "postcopy_fault_timeout"),
    ] {
        match settings.check() {
            Err(Error::InvalidParam(m)) => assert!(m.starts_with(name), "{m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}
