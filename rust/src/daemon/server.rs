//! The daemon: serves one front-end at a time on a listening socket (or as a client),
//! survives each front-end's departure, and stops cleanly on request.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sys::{interrupt, poll_many, EventFd};
use crate::user::codes::FrontendReq;
use crate::user::{BackendSession, Error, Listener, Result};

use super::device::VirtioDevice;
use super::events::{DaemonEvent, EventSink, QueueReporter, SessionEnd};
use super::handler::DaemonHandler;
use super::link::FrontendLink;
use super::postcopy::DEFAULT_POSTCOPY_FAULT_TIMEOUT;
use super::queue::lock;

/// How long one message may take from its first byte to its last (header, body and fds)
/// before its session is dropped as stalled (ADVERSARIAL J1): a front-end trickling a
/// message a byte at a time is bounded too. Between messages it may idle forever, and a
/// stop interrupts a message being read.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the stop latch has been set (it stays set: nobody reads it).
fn latched(stop: &EventFd) -> bool {
    poll_many(&[stop.as_fd()], 0).is_ok_and(|r| r[0])
}

/// Counters a supervisor (or a test) reads while the daemon runs.
#[derive(Debug, Default)]
pub struct DaemonStats {
    /// Front-ends accepted since the daemon started.
    pub sessions_started: AtomicU64,
    /// Sessions over, for whatever reason.
    pub sessions_ended: AtomicU64,
    /// True while a front-end is being served.
    pub active: AtomicBool,
    last_error: Mutex<Option<String>>,
    completed: Mutex<Vec<Arc<AtomicU64>>>,
    iotlb_misses: Mutex<Vec<Arc<AtomicU64>>>,
}

impl DaemonStats {
    /// The error that ended the most recent session badly, if any.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Descriptor chains completed per queue by the current (or last) session.
    pub fn completed(&self) -> Vec<u64> {
        lock(&self.completed)
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// IOTLB misses each queue asked the front-end for (`BACKEND_IOTLB_MSG`), by the
    /// current (or last) session; all 0 unless the device runs behind the front-end's
    /// vIOMMU ([`Daemon::with_iommu`]).
    pub fn iotlb_misses(&self) -> Vec<u64> {
        lock(&self.iotlb_misses)
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    fn record_error(&self, e: &Error) {
        *lock(&self.last_error) = Some(e.to_string());
    }
}

/// A vhost-user back-end daemon for one device. `serve` and `serve_stream` block; `stop`
/// (from any thread, or a signal handler's helper thread) makes them return.
pub struct Daemon {
    device: Arc<dyn VirtioDevice>,
    stop: Arc<EventFd>,
    stats: Arc<DaemonStats>,
    stall_timeout: Duration,
    postcopy_fault_timeout: Option<Duration>,
    poll: Duration,
    sealed_memory_only: bool,
    iommu: Option<Duration>,
    events: Option<EventSink>,
    /// The device's way to the front-end being served (see [`FrontendLink`]).
    link: FrontendLink,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("device_type", &self.device.device_type())
            .field("stats", &self.stats)
            .finish()
    }
}

/// A handle that stops a [`Daemon`] from another thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<EventFd>);

impl Stopper {
    /// Asks the daemon to stop; safe from any thread, and again after it stopped.
    pub fn stop(&self) {
        // The latch is never read: once written it stays readable for every poller.
        let _ = self.0.write(1);
    }
}

impl Daemon {
    /// A daemon for `device`; it serves nothing until [`serve`](Self::serve) is called.
    pub fn new(device: Arc<dyn VirtioDevice>) -> std::io::Result<Self> {
        let link = FrontendLink::new();
        device.attach_frontend(link.clone());
        Ok(Daemon {
            link,
            device,
            stop: Arc::new(EventFd::new(true)?),
            stats: Arc::new(DaemonStats::default()),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            postcopy_fault_timeout: Some(DEFAULT_POSTCOPY_FAULT_TIMEOUT),
            poll: Duration::ZERO,
            sealed_memory_only: false,
            iommu: None,
            events: None,
        })
    }

    /// Reports sessions, refusals and queue failures to `sink` as they happen.
    pub fn with_events(mut self, sink: EventSink) -> Self {
        self.events = Some(sink);
        self
    }

    fn emit(&self, event: DaemonEvent) {
        if let Some(sink) = &self.events {
            sink(event);
        }
    }

    /// Accept only guest memory sealed against shrinking (see
    /// [`BackendSession::require_sealed_memory`]).
    pub fn with_sealed_memory_only(mut self, on: bool) -> Self {
        self.sealed_memory_only = on;
        self
    }

    /// Offers `VIRTIO_F_ACCESS_PLATFORM`: a front-end with a vIOMMU may then give ring and
    /// buffer addresses as I/O virtual ones, which the daemon translates through the IOTLB
    /// its `IOTLB_MSG`s fill, asking for misses on the back-end channel; a miss unanswered
    /// for `miss_timeout` fails its queue. `None` (the default) offers nothing of the kind.
    pub fn with_iommu(mut self, miss_timeout: Option<Duration>) -> Self {
        self.iommu = miss_timeout;
        self
    }

    /// Queue workers keep polling their ring for `poll` after the last request before they
    /// sleep (0, the default, sleeps at once). Polling costs a CPU while it lasts and saves
    /// the wake-up latency, which is large when driver and device run on different CPUs.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Bounds each message, from its first byte to its last (default
    /// [`DEFAULT_STALL_TIMEOUT`]); the reply's send is bounded the same way.
    pub fn with_stall_timeout(mut self, t: Duration) -> Self {
        self.stall_timeout = t;
        self
    }

    /// Bounds how long a queue's batch may wait on a postcopy page fault (default
    /// [`DEFAULT_POSTCOPY_FAULT_TIMEOUT`]; `None`: as long as the front-end lives). A
    /// fault older than that is taken as never to be resolved: the session fails, naming
    /// the queue (ADVERSARIAL K6; see `daemon::postcopy` for what the device then sees).
    pub fn with_postcopy_fault_timeout(mut self, t: Option<Duration>) -> Self {
        self.postcopy_fault_timeout = t;
        self
    }

    /// Serves through `link` instead of the daemon's own, and hands it to the device: one
    /// link can outlive several daemons of the same device (a restarted one).
    pub fn with_frontend_link(mut self, link: FrontendLink) -> Self {
        self.device.attach_frontend(link.clone());
        self.link = link;
        self
    }

    /// The link to the front-end being served: for config-change notifications from
    /// outside the device (a resize), and everything else the device may send.
    pub fn frontend_link(&self) -> &FrontendLink {
        &self.link
    }

    /// A handle another thread keeps to stop the daemon.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// The counters, shared with the running daemon.
    pub fn stats(&self) -> Arc<DaemonStats> {
        self.stats.clone()
    }

    /// The device it serves, for the caller that built it through a trait object.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// True once a [`Stopper`] asked the daemon to stop.
    pub fn is_stopped(&self) -> bool {
        latched(&self.stop)
    }

    /// Serves front-ends one after another until stopped. A second front-end that connects
    /// while one is served waits in the listen backlog (ADVERSARIAL J4); a session that
    /// ends in error is recorded and the next one is accepted.
    pub fn serve(&self, listener: &Listener) -> Result<()> {
        loop {
            let ready = poll_many(&[listener.listener().as_fd(), self.stop.as_fd()], -1)?;
            if ready[1] {
                return Ok(());
            }
            if !ready[0] {
                continue;
            }
            let stream = match listener.accept(Some(Duration::ZERO)) {
                Ok(s) => s,
                // The peer may have given up between poll and accept.
                Err(_) => continue,
            };
            let _ = self.serve_stream(stream);
        }
    }

    /// Client mode: connects to a front-end listening at `path` (retrying every 100 ms
    /// until it appears or the daemon is stopped: a clean Ok, as a stop always is) and
    /// serves that one session.
    pub fn connect(&self, path: &Path) -> Result<()> {
        loop {
            // Bounded, so a front-end whose backlog is full cannot keep a stop waiting.
            match crate::sys::socket::connect_unix(path, Some(Duration::from_millis(100))) {
                Ok(stream) => return self.serve_stream(stream),
                Err(_) => {
                    if poll_many(&[self.stop.as_fd()], 100)?[0] {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Serves the device through the VDUSE device `transport` until stopped, as one
    /// session (see `daemon::vduse`): the driver's requests are answered, its rings served
    /// by the same workers as vhost-user's. A refused request is an event; the run ends in
    /// error only when the device fd itself fails.
    pub fn serve_vduse(&self, transport: &super::VduseTransport) -> Result<()> {
        let session = self.stats.sessions_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.active.store(true, Ordering::SeqCst);
        self.emit(DaemonEvent::SessionStarted { session });
        self.link
            .vduse_started(transport.device().clone(), self.device.clone());
        let served = super::vduse::serve(
            transport,
            self.device.clone(),
            &self.stop,
            self.poll,
            self.events.clone(),
            session,
            |c| *lock(&self.stats.completed) = c,
        );
        let end = match &served {
            Ok(()) => SessionEnd::Stopped,
            Err(e) => SessionEnd::Failed(e.to_string()),
        };
        self.link.session_ended();
        let result = served.map_err(|e| Error::Handler(e.to_string()));
        if let Err(e) = &result {
            self.stats.record_error(e);
        }
        self.stats.active.store(false, Ordering::SeqCst);
        self.stats.sessions_ended.fetch_add(1, Ordering::SeqCst);
        self.emit(DaemonEvent::SessionEnded {
            session,
            end,
            hint: None,
        });
        result
    }

    /// Serves one front-end until it disconnects (Ok), breaks the protocol (Err), or the
    /// daemon is stopped (Ok). Every fd and mapping of the session is released before this
    /// returns.
    pub fn serve_stream(&self, stream: UnixStream) -> Result<()> {
        stream.set_read_timeout(Some(self.stall_timeout))?;
        stream.set_write_timeout(Some(self.stall_timeout))?;
        let session = self.stats.sessions_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.active.store(true, Ordering::SeqCst);
        self.emit(DaemonEvent::SessionStarted { session });
        let (result, end, hint) = self.run_session(session, stream);
        if let Err(e) = &result {
            self.stats.record_error(e);
        }
        self.stats.active.store(false, Ordering::SeqCst);
        self.stats.sessions_ended.fetch_add(1, Ordering::SeqCst);
        self.emit(DaemonEvent::SessionEnded { session, end, hint });
        result
    }

    /// Runs one session; returns its outcome, how it ended and a hint for the user.
    fn run_session(
        &self,
        session: u64,
        stream: UnixStream,
    ) -> (Result<()>, SessionEnd, Option<&'static str>) {
        let reporter = self.events.as_ref().map(|sink| QueueReporter {
            session,
            sink: sink.clone(),
        });
        let mut handler =
            match DaemonHandler::with_reporter(self.device.clone(), self.poll, reporter) {
                Ok(h) => h.with_link(self.link.clone()),
                Err(e) => {
                    let end = SessionEnd::Failed(format!("cannot start the queue workers: {e}"));
                    return (Err(e.into()), end, None);
                }
            };
        handler.set_postcopy_fault_timeout(self.postcopy_fault_timeout);
        handler.set_iommu(self.iommu);
        *lock(&self.stats.completed) = handler.completion_counters();
        *lock(&self.stats.iotlb_misses) = handler.iotlb_miss_counters();
        let mut session_io = BackendSession::new(stream);
        session_io.require_sealed_memory(self.sealed_memory_only);
        if let Ok(sock) = session_io.socket().try_clone() {
            handler.watch_peer(sock.into(), self.stop.clone());
        }
        let mut outcome = loop {
            match poll_many(&[session_io.socket().as_fd(), self.stop.as_fd()], -1) {
                Ok(ready) if ready[1] => break (Ok(()), SessionEnd::Stopped, None),
                Ok(_) => {}
                Err(e) => {
                    let end = SessionEnd::Failed(format!("poll: {e}"));
                    break (Err(e.into()), end, None);
                }
            }
            let (request, result) = self.handle_one(&mut session_io, &mut handler);
            let hint = handler.take_hint();
            match result {
                Ok(()) => {}
                // A stop came while a message was being read or its reply sent.
                Err(Error::Io(e))
                    if e.kind() == std::io::ErrorKind::Interrupted && self.is_stopped() =>
                {
                    break (Ok(()), SessionEnd::Stopped, None)
                }
                Err(Error::Disconnected) => break (Ok(()), SessionEnd::Closed, None),
                Err(Error::Timeout) => break (Err(Error::Timeout), SessionEnd::Stalled, None),
                Err(e) if session_io.is_broken() => {
                    let why = match request {
                        Some(r) => format!("{}: {e}", r.name()),
                        None => e.to_string(),
                    };
                    break (Err(e), SessionEnd::Failed(why), hint);
                }
                // Refused with a NACK; the session goes on.
                Err(e) => {
                    self.stats.record_error(&e);
                    self.emit(DaemonEvent::Refused {
                        session,
                        request: request.map_or("a request", FrontendReq::name),
                        hint,
                        reason: e.to_string(),
                    });
                }
            }
        };
        // The guard ended the session (it shut the socket down): that is the failure.
        if let Some(why) = handler.postcopy_failure() {
            outcome = (
                Err(Error::Handler(why.clone())),
                SessionEnd::Failed(why),
                None,
            );
        }
        // Workers stop and the session's fds and mappings go here, before the next accept.
        drop(handler);
        drop(session_io);
        outcome
    }

    /// One request: received, handled, answered. Returns which request it was (when it
    /// could be decoded) with the outcome. A stop interrupts the receive and the reply
    /// (the connection's waits ask the interrupt check between slices), not the handling.
    fn handle_one(
        &self,
        session: &mut BackendSession,
        handler: &mut DaemonHandler,
    ) -> (Option<FrontendReq>, Result<()>) {
        let incoming = match self.unless_stopped(|| session.recv()) {
            Ok(i) => i,
            Err(e) => return (None, Err(e)),
        };
        let request = incoming.request.kind();
        let handled = session.handle(incoming, handler);
        // Recorded before the reply goes out: a front-end that has the refusal in hand
        // must find its reason in `last_error`, not race the daemon thread for it.
        if let Some(e) = &handled.error {
            self.stats.record_error(e);
        }
        let result = self
            .unless_stopped(|| session.send_reply(handled.reply))
            .and(handled.error.map_or(Ok(()), Err));
        (Some(request), result)
    }

    /// Runs `f` with the stop latch as this thread's interrupt check, so a front-end
    /// trickling a message cannot keep a stop waiting for it.
    fn unless_stopped<R>(&self, f: impl FnOnce() -> R) -> R {
        let stop = self.stop.clone();
        interrupt::with_check(Box::new(move || latched(&stop)), f)
    }
}
