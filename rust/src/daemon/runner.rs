//! A [`Daemon`] on a thread of its own, started, stopped and waited for from any thread:
//! what a program embedding the daemon (the Python binding, a VMM) needs around the
//! blocking [`Daemon::serve`] and [`Daemon::connect`].
//!
//! The runner is restartable: each [`start`](DaemonRunner::start) builds a fresh daemon
//! (a stopped daemon's stop latch stays set) with the caller's recipe. Its lock is never
//! held across a blocking call (binding the socket, joining the thread), so another thread
//! may always ask whether it is running, stop it or wait for it. Waits take a bound, so a
//! caller that must stay responsive (to signals) waits in slices.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys::PathError;
use crate::user::{Error, Listener, Result};

use super::{Daemon, DaemonStats, Stopper};

/// Why [`DaemonRunner::start`] did not start the daemon.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A start is under way, or the daemon of the last one has not been waited for.
    #[error("the daemon is already running")]
    AlreadyRunning,
    /// Server mode could not listen on the socket path.
    #[error(transparent)]
    Listen(PathError),
    /// Building the daemon or its thread failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// VDUSE mode could not create (or replace) its device.
    #[error(transparent)]
    Vduse(#[from] crate::vduse::VduseError),
}

/// How the daemon meets its front-ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Listen at the path (replacing a stale socket) and serve front-ends one after
    /// another until stopped.
    Server,
    /// Connect to a front-end listening at the path (retrying until it appears) and serve
    /// that one session.
    Client,
    /// Create the VDUSE device named by the path (`/dev/vduse/NAME`; a stale one of that
    /// name is replaced) and serve its driver until stopped, then destroy it.
    Vduse {
        /// Offer packed rings too (see [`VduseTransport::features_for`](super::VduseTransport::features_for)).
        packed: bool,
    },
}

/// The serving thread of one start.
struct Run {
    stopper: Stopper,
    stats: Arc<DaemonStats>,
    /// Taken by the waiter that joins it.
    thread: Option<JoinHandle<()>>,
    /// What the thread returned, set as its last act; `None` while it serves.
    result: Option<Result<()>>,
    /// A waiter saw it finish (and took its error, if any): the daemon is no longer
    /// running, and may start again.
    collected: bool,
}

#[derive(Default)]
struct State {
    /// A start is binding its socket (without the lock).
    starting: bool,
    run: Option<Run>,
}

/// What the user of a daemon (a binding, a command line) sets, checked in one place
/// before any daemon is built with it ([`Daemon::with_settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Bounds each message and reply ([`Daemon::with_stall_timeout`]); more than 0.
    pub stall_timeout: Duration,
    /// How long queue workers poll before sleeping ([`Daemon::with_poll`]).
    pub poll: Duration,
    /// Bounds a postcopy fault ([`Daemon::with_postcopy_fault_timeout`]); `None`: no
    /// bound, else more than 0.
    pub postcopy_fault_timeout: Option<Duration>,
    /// Accept only sealed guest memory ([`Daemon::with_sealed_memory_only`]).
    pub sealed_memory_only: bool,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM` and bound each IOTLB miss by this
    /// ([`Daemon::with_iommu`]); `None`: no IOMMU, else more than 0.
    pub iommu_miss_timeout: Option<Duration>,
}

impl DaemonSettings {
    /// Refuses the settings that cannot work ([`Error::InvalidParam`], naming the
    /// setting): a zero stall timeout (every message would time out before it began), a
    /// zero postcopy fault bound (every fault would end the session).
    pub fn check(&self) -> Result<()> {
        if self.stall_timeout.is_zero() {
            return Err(Error::InvalidParam(
                "stall_timeout must be a positive number of seconds".into(),
            ));
        }
        if self.postcopy_fault_timeout.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidParam(
                "postcopy_fault_timeout must be more than 0 seconds (None: no bound)".into(),
            ));
        }
        if self.iommu_miss_timeout.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidParam(
                "iommu_miss_timeout must be more than 0 seconds (None: no IOMMU)".into(),
            ));
        }
        Ok(())
    }
}

impl Daemon {
    /// Applies checked `settings` ([`DaemonSettings::check`]).
    pub fn with_settings(self, settings: &DaemonSettings) -> Self {
        self.with_stall_timeout(settings.stall_timeout)
            .with_poll(settings.poll)
            .with_postcopy_fault_timeout(settings.postcopy_fault_timeout)
            .with_sealed_memory_only(settings.sealed_memory_only)
            .with_iommu(settings.iommu_miss_timeout)
    }
}

/// Builds the daemon each start serves with (settings, device, event sink).
pub type DaemonRecipe = Box<dyn Fn() -> io::Result<Daemon> + Send + Sync>;

/// Runs a [`Daemon`] on a background thread (see the module documentation).
pub struct DaemonRunner {
    recipe: DaemonRecipe,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl std::fmt::Debug for DaemonRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonRunner")
            .field("running", &self.is_running())
            .finish()
    }
}

impl DaemonRunner {
    /// A runner whose every start serves a daemon `recipe` builds; nothing runs yet.
    pub fn new(recipe: DaemonRecipe) -> Self {
        DaemonRunner {
            recipe,
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds a daemon, binds its socket (server mode: the socket exists when this returns)
    /// and starts its thread. Refused while the last start is still running or has not
    /// been waited for.
    pub fn start(&self, path: &Path, mode: Mode) -> std::result::Result<(), StartError> {
        {
            let mut st = self.lock();
            if st.starting || st.run.as_ref().is_some_and(|r| !r.collected) {
                return Err(StartError::AlreadyRunning);
            }
            st.starting = true;
        }
        let started = self.launch(path, mode);
        self.lock().starting = false;
        started
    }

    fn launch(&self, path: &Path, mode: Mode) -> std::result::Result<(), StartError> {
        let daemon = (self.recipe)()?;
        let listener = match mode {
            Mode::Server => Some(
                Listener::bind(path, true)
                    .map_err(|e| StartError::Listen(PathError::new("listen on", path, &e)))?,
            ),
            Mode::Client | Mode::Vduse { .. } => None,
        };
        let vduse = match mode {
            Mode::Vduse { packed } => Some(super::VduseTransport::create(
                &**daemon.device(),
                &path.to_string_lossy(),
                packed,
            )?),
            _ => None,
        };
        let (stopper, stats) = (daemon.stopper(), daemon.stats());
        let path: PathBuf = path.to_path_buf();
        let state = self.state.clone();
        // The lock is held from before the spawn until the run is recorded, so the thread
        // cannot record its result before there is a run to record it in.
        let mut st = self.lock();
        let thread = std::thread::Builder::new()
            .name("vhost-daemon".into())
            .spawn(move || {
                // Declared first, so dropped last (after the socket), even in a panic.
                let mut finish = Finish {
                    state,
                    result: None,
                };
                let (listener, daemon, vduse) = (listener, daemon, vduse);
                finish.result = Some(match (&listener, vduse) {
                    (Some(l), _) => daemon.serve(l),
                    // Served, then destroyed: a device still in use is this run's error.
                    (None, Some(t)) => daemon
                        .serve_vduse(&t)
                        .and_then(|()| t.destroy().map_err(|e| Error::Handler(e.to_string()))),
                    (None, None) => daemon.connect(&path),
                });
                // The socket is gone before anyone is told the daemon finished.
                drop(listener);
                drop(daemon);
            })?;
        st.run = Some(Run {
            stopper,
            stats,
            thread: Some(thread),
            result: None,
            collected: false,
        });
        Ok(())
    }

    /// Asks the daemon to stop (the current session is dropped cleanly); [`wait`] then
    /// returns once it has. Safe from any thread, and when nothing runs.
    ///
    /// [`wait`]: Self::wait
    pub fn stop(&self) {
        if let Some(run) = &self.lock().run {
            run.stopper.stop();
        }
    }

    /// Waits up to `timeout` (`None`: for ever) for the daemon to finish: `Ok(false)` if it
    /// still runs, `Ok(true)` once it has finished (or when nothing was started), and the
    /// error that ended it instead, to one waiter only. Any number of threads may wait.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.lock();
        loop {
            let Some(run) = st.run.as_mut() else {
                return Ok(true);
            };
            if run.result.is_some() || run.collected {
                break;
            }
            let left = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(false),
                },
            };
            st = self
                .state
                .1
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let Some(run) = st.run.as_mut() else {
            return Ok(true);
        };
        run.collected = true;
        let thread = run.thread.take();
        let outcome = match run.result.take() {
            Some(Err(e)) => Err(e),
            _ => Ok(true),
        };
        drop(st);
        if let Some(thread) = thread {
            // It has recorded its result (a panic too): only its return is left.
            let _ = thread.join();
        }
        outcome
    }

    /// Whether the daemon is serving or starting to (its socket may exist already), or has
    /// finished without anyone waiting for it yet.
    pub fn is_running(&self) -> bool {
        let st = self.lock();
        st.starting || st.run.as_ref().is_some_and(|r| !r.collected)
    }

    /// Stops the daemon and joins its thread (what dropping the runner does; a caller whose
    /// daemon's workers need a lock it holds, such as an interpreter's, releases it and
    /// calls this first). Its outcome is dropped. Safe to call again.
    pub fn shutdown(&self) {
        self.stop();
        let thread = self.lock().run.as_mut().and_then(|r| r.thread.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// The counters of the latest start (`None` before the first).
    pub fn stats(&self) -> Option<Arc<DaemonStats>> {
        self.lock().run.as_ref().map(|r| r.stats.clone())
    }
}

/// Records the serving thread's result and wakes the waiters when the thread ends, in a
/// panic too (then as an error), so no waiter waits for a thread that is gone.
struct Finish {
    state: Arc<(Mutex<State>, Condvar)>,
    result: Option<Result<()>>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(Error::Handler(
                "the daemon's serving thread panicked".into(),
            ))
        });
        let (lock, finished) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = st.run.as_mut() {
            run.result = Some(result);
        }
        finished.notify_all();
    }
}

impl Drop for DaemonRunner {
    /// Stops the daemon and joins its thread: nothing outlives the runner.
    fn drop(&mut self) {
        self.shutdown();
    }
}
