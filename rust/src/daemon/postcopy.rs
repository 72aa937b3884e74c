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
//! (QEMU resolves faults on a thread of their own); there is no timeout, since any
//! resolution the daemon could make on its own (a zero page) would hand the device wrong
//! data.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::memory::{GuestMemory, GuestRegion};
use crate::sys::poll::poll_until;
use crate::sys::userfaultfd::{Userfaultfd, UFFD_FEATURE_MISSING_SHMEM};
use crate::sys::EventFd;
use crate::user::{Error, Result};

/// The userfaultfd and what is registered with it, shared with the guard thread.
#[derive(Debug)]
struct Registrations {
    uffd: Userfaultfd,
    /// Between POSTCOPY_LISTEN and POSTCOPY_END: new mappings are registered too.
    listening: bool,
    /// The front-end hung up: nothing is registered any more, ever.
    abandoned: bool,
    registered: Vec<Arc<GuestRegion>>,
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
            .spawn(move || {
                let mut pfds = [
                    libc::pollfd {
                        fd: peer.as_raw_fd(),
                        events: libc::POLLRDHUP,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: stop2.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: daemon_stop.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // An error (never expected: both fds live as long as this thread) is
                // treated as a hang-up: waking a worker is always safe here.
                let _ = poll_until(&mut pfds, None);
                if pfds[1].revents != 0 {
                    return;
                }
                let mut st = lock(&state);
                st.abandoned = true;
                let _ = st.unregister_all();
            })?;
        Ok(Guard {
            stop,
            thread: Some(thread),
        })
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
    pub(crate) fn advise(peer: Option<(OwnedFd, Arc<EventFd>)>) -> Result<(Self, OwnedFd)> {
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
        })
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
        let r = lock(&self.state).unregister_all();
        drop(self);
        r
    }
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        self.guard = None;
        let _ = lock(&self.state).unregister_all();
    }
}
