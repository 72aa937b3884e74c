//! Postcopy on the back-end side: the userfaultfd of one session and the mappings
//! registered with it.
//!
//! POSTCOPY_ADVISE creates the userfaultfd and hands the front-end a second handle;
//! POSTCOPY_LISTEN registers every mapping of guest memory with it, and every mapping
//! that arrives later (SET_MEM_TABLE, ADD_MEM_REG) until POSTCOPY_END, which unregisters
//! and closes. Nothing changes in the data path: a worker that touches a page the
//! destination has not received yet sleeps in the kernel until the front-end copies the
//! page in.
//!
//! A registered region is kept mapped (an `Arc`) until it is unregistered, so a range is
//! never unregistered after its addresses were reused by another mapping.
//!
//! Teardown wakes every waiter: unregistering a range wakes the threads waiting on it
//! (they then see an ordinary page: zeros where the front-end never copied anything). The
//! front-end's own handle, gone with a dead front-end, is not what wakes them: ours keeps
//! the object alive. So:
//! - the daemon tears postcopy down before it stops its workers when a session ends;
//! - a guard thread watches the front-end's socket and the daemon's stop latch from
//!   POSTCOPY_ADVISE on, and tears postcopy down as soon as the front-end hangs up or
//!   the daemon is stopped. The session thread alone would not always see either: a
//!   control request that needs a queue (GET_VRING_BASE, a new memory table) waits for
//!   that queue's batch in progress, and a batch asleep on a fault only ends when the
//!   fault does.
//!
//! While the front-end lives, a fault waits as long as the front-end takes to resolve it
//! (QEMU resolves faults on a thread of their own), up to a bound: the session's
//! postcopy fault timeout ([`DEFAULT_POSTCOPY_FAULT_TIMEOUT`], or none). Each queue
//! worker publishes when its batch in progress started ([`BatchWatch`]); the guard looks
//! at them a few times per bound, and a batch older than the bound while postcopy
//! listens is taken for a fault the front-end will never resolve (ADVERSARIAL K6): the
//! session fails with a reason naming the queue, the guard marks every queue's postcopy
//! as failed, unregisters (which wakes the worker) and shuts the session's socket down.
//!
//! The daemon cannot fail the waiting access itself. It must not read the fault events
//! (they are the front-end's), and any resolution of its own (a zero page) would hand
//! the device wrong data. Nor can a signal: a thread asleep on a fault taken in kernel
//! mode (a `pwritev` reading guest memory) is only woken by a fatal one (measured on
//! Linux 6.18: the copy is retried, and spins while the signal is pending), and a fault
//! taken in user mode is retried after the handler returns. Unregistering wakes it with
//! the page allocated as zeros in the shared memory (the front-end's later copy of that
//! page then fails with EEXIST). So a device that must not act on such zeros asks first:
//! [`FaultPolicy::current`] tells a worker whether postcopy listens; if it does, the
//! device touches the pages it is about to hand to the kernel (a fault, if any, is taken
//! there), then asks again, and fails the request if postcopy failed meanwhile (the
//! native blk device completes it with `VIRTIO_BLK_S_IOERR` and writes nothing). A
//! device that does not ask (a Python device, the rings) sees the zeros.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory::{GuestMemory, GuestRegion};
use crate::sys::poll::poll_until;
use crate::sys::userfaultfd::{Userfaultfd, UFFD_FEATURE_MISSING_SHMEM};
use crate::sys::EventFd;
use crate::user::{Error, Result};

/// How long a queue's batch may wait on guest memory while postcopy listens before the
/// fault is taken as never to be resolved and the session fails. QEMU resolves a fault
/// within one round trip to the source; 30 s leaves room for a slow or congested link
/// and still ends a session whose front-end has stopped resolving faults while alive.
pub const DEFAULT_POSTCOPY_FAULT_TIMEOUT: Duration = Duration::from_secs(30);

const PHASE_OFF: u8 = 0;
const PHASE_LISTENING: u8 = 1;
const PHASE_FAILED: u8 = 2;

/// What postcopy means for guest-memory accesses of the queue worker that asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPolicy {
    /// No postcopy (or not on a queue worker): every page is there.
    Off,
    /// A page may be missing: an access waits until the front-end resolves it (or the
    /// session's bound fails it).
    Listening,
    /// Postcopy failed (a fault not resolved within the bound, or the front-end gone):
    /// memory has been unregistered, and a page that never came reads as zeros.
    Failed,
}

thread_local! {
    /// The watch of the queue worker running on this thread, if it is one.
    static CURRENT: RefCell<Option<Arc<BatchWatch>>> = const { RefCell::new(None) };
}

impl FaultPolicy {
    /// The policy for the calling thread: [`FaultPolicy::Off`] on any thread that is not
    /// a queue worker.
    pub fn current() -> Self {
        CURRENT.with(|c| {
            c.borrow()
                .as_ref()
                .map_or(FaultPolicy::Off, |w| match w.phase.load(Ordering::SeqCst) {
                    PHASE_LISTENING => FaultPolicy::Listening,
                    PHASE_FAILED => FaultPolicy::Failed,
                    _ => FaultPolicy::Off,
                })
        })
    }
}

/// Whether guest memory that the calling queue worker just read can be trusted: after
/// postcopy failed, a page that never came was unregistered and read as zeros, so a
/// device that cannot see the fault itself (one written in Python, whose copies fault in
/// user mode) must drop what it read rather than act on it.
pub fn check_read_settled() -> std::result::Result<(), String> {
    match FaultPolicy::current() {
        FaultPolicy::Failed => Err("postcopy failed on this queue (a page the device read \
                                    never arrived): the data read is not the guest's"
            .into()),
        _ => Ok(()),
    }
}

/// Nanoseconds since the first call in this process, plus one (0 means "idle").
fn now_stamp() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let ns = EPOCH.get_or_init(Instant::now).elapsed().as_nanos();
    u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1
}

/// What one queue worker publishes for the guard: when its batch in progress started,
/// and the session's postcopy phase as this queue sees it.
#[derive(Debug, Default)]
pub(crate) struct BatchWatch {
    /// [`now_stamp`] at the start of the batch in progress; 0 between batches.
    started: AtomicU64,
    phase: AtomicU8,
}

impl BatchWatch {
    /// Makes this the calling thread's watch (a queue worker, at its start).
    pub(crate) fn enter(self: &Arc<Self>) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// A batch starts: one relaxed store (the guard only needs to see it eventually; a
    /// batch is late by seconds, not nanoseconds).
    pub(crate) fn begin(&self) {
        self.started.store(now_stamp(), Ordering::Relaxed);
    }

    /// The batch ended.
    pub(crate) fn end(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    /// Postcopy failed for this session: the worker starts no more batches.
    pub(crate) fn failed(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == PHASE_FAILED
    }

    /// How long the batch in progress has run at `now` (a [`now_stamp`]), if one is.
    fn running_for(&self, now: u64) -> Option<Duration> {
        match self.started.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_nanos(now.saturating_sub(t))),
        }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }
}

/// What the guard needs to enforce the bound: every queue's watch, by queue index.
#[derive(Debug, Clone)]
pub(crate) struct FaultBound {
    pub(crate) watches: Vec<Arc<BatchWatch>>,
    /// `None`: a fault may wait as long as the front-end lives.
    pub(crate) timeout: Option<Duration>,
}

impl FaultBound {
    /// The first queue whose batch has run longer than the bound at `now`.
    fn overdue(&self, now: u64) -> Option<usize> {
        let timeout = self.timeout?;
        self.watches
            .iter()
            .position(|w| w.running_for(now).is_some_and(|d| d > timeout))
    }

    fn set_phase(&self, phase: u8) {
        for w in &self.watches {
            w.set_phase(phase);
        }
    }
}

/// How often the guard looks at the watches: a quarter of the bound, within 10 ms..1 s.
fn tick(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The userfaultfd and what is registered with it, shared with the guard thread.
#[derive(Debug)]
struct Registrations {
    uffd: Userfaultfd,
    /// Between POSTCOPY_LISTEN and POSTCOPY_END: new mappings are registered too.
    listening: bool,
    /// The front-end hung up: nothing is registered any more, ever.
    abandoned: bool,
    registered: Vec<Arc<GuestRegion>>,
    /// Why the guard failed the session (a fault not resolved within the bound).
    failure: Option<String>,
    bound: FaultBound,
}

impl Registrations {
    /// Unregisters everything (waking every waiter) and drops the mappings kept for it.
    /// Returns the first failure, after trying every region.
    fn unregister_all(&mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        for region in self.registered.drain(..) {
            let r = self.uffd.unregister(region.as_ptr() as u64, region.len());
            if first.is_ok() {
                first = r;
            }
        }
        self.listening = false;
        first
    }

    /// Gives postcopy up for good (the front-end is gone, the daemon stops, or a fault
    /// outlived the bound): every queue is told first, so a worker woken by the
    /// unregistering knows its page may be zeros, and starts no new batch.
    fn abandon(&mut self) {
        self.bound.set_phase(PHASE_FAILED);
        self.abandoned = true;
        let _ = self.unregister_all();
    }
}

fn lock(m: &Mutex<Registrations>) -> MutexGuard<'_, Registrations> {
    // Plain state: a panicking holder leaves nothing half-done that matters here.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tears postcopy down when the front-end's socket hangs up or the daemon's stop latch
/// is set (see the module docs).
#[derive(Debug)]
struct Guard {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Guard {
    fn spawn(
        peer: OwnedFd,
        daemon_stop: Arc<EventFd>,
        state: Arc<Mutex<Registrations>>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(EventFd::new(true)?);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-guard".into())
            .spawn(move || guard(&peer, &stop2, &daemon_stop, &state))?;
        Ok(Guard {
            stop,
            thread: Some(thread),
        })
    }
}

/// The guard thread: waits for the front-end's hang-up, the daemon's stop or its own
/// stop, looking at the queues' batches a few times per bound meanwhile.
fn guard(peer: &OwnedFd, own_stop: &EventFd, daemon_stop: &EventFd, state: &Mutex<Registrations>) {
    let timeout = lock(state).bound.timeout;
    loop {
        let mut pfds = [
            libc::pollfd {
                fd: peer.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: own_stop.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: daemon_stop.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // An error (never expected: the fds live as long as this thread) is treated as a
        // hang-up: waking a worker is always safe here.
        let ready = poll_until(&mut pfds, timeout.map(tick)).unwrap_or(true);
        if pfds[1].revents != 0 {
            return;
        }
        let mut st = lock(state);
        if ready {
            st.abandon();
            return;
        }
        if !st.listening {
            continue;
        }
        let Some(queue) = st.bound.overdue(now_stamp()) else {
            continue;
        };
        let secs = timeout.unwrap_or_default().as_secs_f64();
        st.failure = Some(format!(
            "queue {queue}: postcopy fault not resolved within {secs} s \
             (the front-end never copied the page in)"
        ));
        st.abandon();
        drop(st);
        // Ends the session: the session thread sees the connection close and reports the
        // failure; its teardown does the rest, as for a hang-up.
        crate::sys::shut_down(peer.as_fd());
        return;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One session's postcopy state, from POSTCOPY_ADVISE to POSTCOPY_END.
#[derive(Debug)]
pub(crate) struct Postcopy {
    state: Arc<Mutex<Registrations>>,
    /// Watches the front-end's socket (absent when the handler runs without one).
    guard: Option<Guard>,
}

impl Postcopy {
    /// POSTCOPY_ADVISE: a userfaultfd for shared memory, and the handle for the front-end.
    /// `peer` (a handle on the session's socket, and the daemon's stop latch) is watched
    /// for a hang-up or a stop, if given.
    /// `bound` is every queue's watch and how long a batch may wait on a fault.
    pub(crate) fn advise(
        peer: Option<(OwnedFd, Arc<EventFd>)>,
        bound: FaultBound,
    ) -> Result<(Self, OwnedFd)> {
        let uffd = Userfaultfd::new(UFFD_FEATURE_MISSING_SHMEM)
            .map_err(|e| Error::Handler(format!("POSTCOPY_ADVISE: {e}")))?;
        let theirs = uffd
            .try_clone_fd()
            .map_err(|e| Error::Handler(format!("POSTCOPY_ADVISE: dup the userfaultfd: {e}")))?;
        let state = Arc::new(Mutex::new(Registrations {
            uffd,
            listening: false,
            abandoned: false,
            registered: Vec::new(),
            failure: None,
            bound,
        }));
        let guard = peer
            .map(|(fd, stop)| Guard::spawn(fd, stop, state.clone()))
            .transpose()
            .map_err(|e| Error::Handler(format!("POSTCOPY_ADVISE: start the guard thread: {e}")))?;
        Ok((Postcopy { state, guard }, theirs))
    }

    /// POSTCOPY_LISTEN: registers every region of `mem`, and later ones from now on.
    pub(crate) fn listen(&mut self, mem: &GuestMemory) -> Result<()> {
        let mut st = lock(&self.state);
        if st.listening {
            return Err(Error::InvalidParam(
                "POSTCOPY_LISTEN: postcopy is already listening".into(),
            ));
        }
        st.listening = true;
        // All or nothing: a refused LISTEN leaves nothing registered and postcopy advised.
        Self::track_locked(&mut st, mem, "POSTCOPY_LISTEN").inspect_err(|_| {
            let _ = st.unregister_all();
        })?;
        if !st.abandoned {
            st.bound.set_phase(PHASE_LISTENING);
        }
        Ok(())
    }

    /// Why the guard failed the session, if it did (a fault not resolved in time).
    pub(crate) fn failure(&self) -> Option<String> {
        lock(&self.state).failure.clone()
    }

    /// Registers the regions of `mem` not registered yet (while listening); `request`
    /// names the request in errors. Regions that left the table stay registered (and
    /// mapped) until POSTCOPY_END: a worker may still be in a batch on them.
    pub(crate) fn track(&mut self, mem: &GuestMemory, request: &str) -> Result<()> {
        Self::track_locked(&mut lock(&self.state), mem, request)
    }

    fn track_locked(st: &mut Registrations, mem: &GuestMemory, request: &str) -> Result<()> {
        if !st.listening || st.abandoned {
            return Ok(());
        }
        for region in mem.regions() {
            if st.registered.iter().any(|r| Arc::ptr_eq(r, region)) {
                continue;
            }
            let info = region.info();
            st.uffd
                .register(region.as_ptr() as u64, region.len())
                .map_err(|e| {
                    Error::InvalidParam(format!(
                        "{request}: register guest memory {:#x}..{:#x} with the userfaultfd: {e} \
                         (postcopy needs shared memory: memfd, tmpfs)",
                        info.guest_phys_addr,
                        info.guest_phys_addr + info.memory_size
                    ))
                })?;
            st.registered.push(region.clone());
        }
        Ok(())
    }

    /// POSTCOPY_END: unregisters everything (waking every waiter).
    pub(crate) fn end(self) -> std::io::Result<()> {
        let r = {
            let mut st = lock(&self.state);
            let r = st.unregister_all();
            if !st.abandoned {
                st.bound.set_phase(PHASE_OFF);
            }
            r
        };
        drop(self);
        r
    }
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        self.guard = None;
        let mut st = lock(&self.state);
        if st.registered.is_empty() {
            // POSTCOPY_END, or never listening: nothing to wake, the queues go on.
            return;
        }
        st.abandon();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn watches(n: usize) -> Vec<Arc<BatchWatch>> {
        (0..n).map(|_| Arc::new(BatchWatch::default())).collect()
    }

    #[test]
    fn the_guard_looks_a_few_times_per_bound_within_limits() {
        assert_eq!(tick(Duration::from_secs(1)), Duration::from_millis(250));
        assert_eq!(tick(Duration::from_millis(1)), Duration::from_millis(10));
        assert_eq!(tick(Duration::from_secs(3600)), Duration::from_secs(1));
    }

    #[test]
    fn only_a_batch_older_than_the_bound_is_overdue() {
        let w = watches(3);
        let bound = FaultBound {
            watches: w.clone(),
            timeout: Some(Duration::from_secs(1)),
        };
        let now = now_stamp() + 10_000_000_000;
        assert_eq!(bound.overdue(now), None, "idle queues are never overdue");
        w[0].started.store(now - 500_000_000, Ordering::Relaxed);
        assert_eq!(bound.overdue(now), None, "half the bound");
        w[2].started.store(now - 2_000_000_000, Ordering::Relaxed);
        assert_eq!(bound.overdue(now), Some(2), "named by queue index");
        w[2].end();
        assert_eq!(bound.overdue(now), None);
        w[1].started.store(1, Ordering::Relaxed);
        let unbounded = FaultBound {
            watches: w,
            timeout: None,
        };
        assert_eq!(unbounded.overdue(now), None, "no bound: a fault may wait");
    }

    #[test]
    fn the_policy_is_per_worker_thread() {
        let w = Arc::new(BatchWatch::default());
        let w2 = w.clone();
        assert_eq!(FaultPolicy::current(), FaultPolicy::Off);
        let seen = std::thread::spawn(move || {
            w2.enter();
            let off = FaultPolicy::current();
            w2.set_phase(PHASE_LISTENING);
            let listening = FaultPolicy::current();
            w2.set_phase(PHASE_FAILED);
            (off, listening, FaultPolicy::current(), w2.failed())
        })
        .join()
        .unwrap();
        assert_eq!(
            seen,
            (
                FaultPolicy::Off,
                FaultPolicy::Listening,
                FaultPolicy::Failed,
                true
            )
        );
        assert_eq!(FaultPolicy::current(), FaultPolicy::Off, "not a worker");
    }

    #[test]
    fn a_batch_stuck_past_the_bound_fails_the_session_and_hangs_up() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let stop = Arc::new(EventFd::new(true).unwrap());
        let w = watches(2);
        let bound = FaultBound {
            watches: w.clone(),
            timeout: Some(Duration::from_millis(40)),
        };
        let (mut pc, _their_uffd) = Postcopy::advise(Some((ours.into(), stop)), bound).unwrap();
        pc.listen(&GuestMemory::default()).unwrap();
        assert!(w
            .iter()
            .all(|w| w.phase.load(Ordering::SeqCst) == PHASE_LISTENING));
        w[1].begin();
        // The guard shuts the session's socket down: the peer reads end-of-file.
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(theirs.read(&mut [0u8; 1]).unwrap(), 0);
        let why = pc.failure().expect("the guard says why");
        assert!(
            why.starts_with("queue 1: postcopy fault not resolved within 0.04 s"),
            "{why}"
        );
        assert!(w.iter().all(|w| w.failed()), "every queue stops");
        assert!(pc.end().is_ok());
    }

    #[test]
    fn an_idle_listening_session_is_left_alone() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let stop = Arc::new(EventFd::new(true).unwrap());
        let w = watches(1);
        let bound = FaultBound {
            watches: w.clone(),
            timeout: Some(Duration::from_millis(20)),
        };
        let (mut pc, _their_uffd) = Postcopy::advise(Some((ours.into(), stop)), bound).unwrap();
        pc.listen(&GuestMemory::default()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(pc.failure(), None);
        assert!(!w[0].failed());
        assert!(pc.end().is_ok());
        assert_eq!(w[0].phase.load(Ordering::SeqCst), PHASE_OFF);
        drop(theirs);
    }
}
