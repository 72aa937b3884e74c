//! What the daemon reports as it happens: sessions starting and ending (and why), requests
//! it refused (and why), queues that stopped. A supervisor or a command line shows these;
//! without them a front-end's "vhost start failed" has no visible cause on the back-end.
//!
//! Events are rare control-plane moments: the data path reports nothing unless a queue
//! fails, so a sink costs nothing per request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Why a front-end session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The front-end closed the connection between two messages.
    Closed,
    /// The daemon was stopped.
    Stopped,
    /// The front-end stalled in the middle of a message for longer than the stall timeout.
    Stalled,
    /// The front-end broke the protocol, or a request that cannot be refused failed; the
    /// connection was closed. The text says what happened.
    Failed(String),
}

impl SessionEnd {
    /// A short name for the way it ended: `closed`, `stopped`, `stalled` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionEnd::Closed => "closed",
            SessionEnd::Stopped => "stopped",
            SessionEnd::Stalled => "stalled",
            SessionEnd::Failed(_) => "failed",
        }
    }

    /// Whether the session ended on an error (anything but a close or a stop).
    pub fn is_error(&self) -> bool {
        matches!(self, SessionEnd::Stalled | SessionEnd::Failed(_))
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Closed => f.write_str("the front-end closed the connection"),
            SessionEnd::Stopped => f.write_str("the daemon was stopped"),
            SessionEnd::Stalled => f.write_str("the front-end stalled inside a message"),
            SessionEnd::Failed(why) => f.write_str(why),
        }
    }
}

/// One thing that happened to the daemon. `session` numbers sessions from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonEvent {
    /// A front-end connected and is being served.
    SessionStarted {
        /// Which session, so events of one front-end can be told from the next one's.
        session: u64,
    },
    /// A request was refused (a NACK, or a failure status); the session goes on.
    Refused {
        /// Which session.
        session: u64,
        /// The request's name (`"SET_VRING_ADDR"`).
        request: &'static str,
        /// Why, in words.
        reason: String,
        /// What the front-end's user probably has to change, when the daemon can tell.
        hint: Option<&'static str>,
    },
    /// A queue stopped on a corrupt ring or a failing device; the session goes on.
    QueueFailed {
        /// Which session.
        session: u64,
        /// The queue's index.
        queue: u16,
        /// Why, in words.
        reason: String,
    },
    /// One request was failed and the queue went on: behind a vIOMMU, a translation it
    /// needed was not given within the miss bound (ADVERSARIAL L2).
    RequestFailed {
        /// Which session.
        session: u64,
        /// The queue's index.
        queue: u16,
        /// Why, in words: the queue, the I/O virtual address and access that missed, the
        /// head and the used length it was returned with.
        reason: String,
    },
    /// The session is over; its workers, fds and mappings are released.
    SessionEnded {
        /// Which session.
        session: u64,
        /// How it ended.
        end: SessionEnd,
        /// As for [`DaemonEvent::Refused`], when the request that ended it tells.
        hint: Option<&'static str>,
    },
}

/// Receives events on the thread where they happen (the daemon's, or a queue worker's
/// for [`DaemonEvent::QueueFailed`]): it must be quick and must not block.
pub type EventSink = Arc<dyn Fn(DaemonEvent) + Send + Sync>;

/// Events waiting for a collector on another thread (a binding's `next_events`), bounded:
/// beyond `capacity` the oldest are dropped and counted, so an unwatched daemon's memory
/// stays bounded. Pushing only takes a mutex, never anything of the collector's.
#[derive(Debug)]
pub struct EventQueue {
    pending: Mutex<VecDeque<DaemonEvent>>,
    arrived: Condvar,
    dropped: AtomicU64,
    capacity: usize,
}

impl EventQueue {
    /// An empty queue keeping at most `capacity` events.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(EventQueue {
            pending: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            dropped: AtomicU64::new(0),
            capacity,
        })
    }

    /// A sink for [`Daemon::with_events`](super::Daemon::with_events) that fills this queue.
    pub fn sink(self: &Arc<Self>) -> EventSink {
        let queue = self.clone();
        Arc::new(move |e| queue.push(e))
    }

    /// Adds `event`, dropping the oldest when full.
    pub fn push(&self, event: DaemonEvent) {
        let mut q = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.capacity {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(event);
        self.arrived.notify_all();
    }

    /// Everything pending, after waiting up to `timeout` for the first.
    pub fn take(&self, timeout: Duration) -> Vec<DaemonEvent> {
        let q = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (mut q, _) = self
            .arrived
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// Events dropped because nobody collected them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A queue worker's way to report its failures with the session they belong to.
#[derive(Clone)]
pub(crate) struct QueueReporter {
    pub(crate) session: u64,
    pub(crate) sink: EventSink,
}

impl std::fmt::Debug for QueueReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueReporter")
            .field("session", &self.session)
            .finish()
    }
}

/// Hint for a ring refused while the front-end has shared no guest memory at all: QEMU
/// does that when guest RAM is not a shared memory backend.
pub(crate) const UNSHARED_MEMORY_HINT: &str = "the front-end shared no guest memory; \
vhost-user needs guest RAM the back-end can map (QEMU: -object \
memory-backend-memfd,id=mem,size=RAM,share=on -machine memory-backend=mem)";
