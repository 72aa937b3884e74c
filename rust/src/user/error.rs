//! The one error type of the vhost-user layer. Each variant says whose fault it was:
//! the peer's (a protocol violation), ours (a bad argument), or the system's.

use std::io;

use crate::memory::MemoryError;

/// Everything the vhost-user layer refuses, on either side: each names the request (and
/// queue, where one is involved) so a failure can be traced to the message that caused it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed the connection cleanly, on a message boundary.
    #[error("peer disconnected")]
    Disconnected,
    /// The peer closed or stalled in the middle of a message.
    #[error("partial message: {0}")]
    PartialMessage(&'static str),
    /// Header version is not 1, reserved flag bits are set, or the reply bit is wrong.
    #[error("invalid message header: {0}")]
    InvalidHeader(String),
    /// A request code that this side does not know (checked before any enum conversion).
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    /// The header announces a body larger than the protocol allows.
    #[error("message body of {0} bytes exceeds the maximum")]
    OversizedMessage(u32),
    /// The body size does not match what the request's layout requires.
    #[error("{request}: body is {got} bytes, expected {expected}")]
    InvalidSize {
        /// The request's name.
        request: &'static str,
        /// The size or sizes its layout allows.
        expected: String,
        /// The size received.
        got: usize,
    },
    /// The number of fds attached to a message is wrong for its request.
    #[error("{request}: {got} file descriptors attached, expected {expected}")]
    FdCount {
        /// The request's name.
        request: &'static str,
        /// The count its fd rule allows.
        expected: &'static str,
        /// The count received.
        got: usize,
    },
    /// More fds arrived than the receive buffer holds (MSG_CTRUNC): all were closed.
    #[error("too many file descriptors in one message")]
    TooManyFds,
    /// A field of a well-framed message has a value the protocol forbids.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// The request needs a (protocol) feature that was not negotiated.
    #[error("{request} needs {feature}, which was not negotiated")]
    InactiveFeature {
        /// The request's name.
        request: &'static str,
        /// The feature it needs.
        feature: &'static str,
    },
    /// The receiving side does not implement this request.
    #[error("request {0} is not supported")]
    NotSupported(&'static str),
    /// [`Frontend::negotiate`](super::Frontend::negotiate) was asked to ack a feature the
    /// back-end does not offer: `request` (SET_FEATURES) cannot carry it. Checked before
    /// anything but GET_FEATURES is sent, so the connection stays usable.
    #[error("negotiate: the back-end does not offer {feature} (offered {offered:#x}){hint}")]
    NotOffered {
        /// The request that would have acked it.
        request: &'static str,
        /// The missing feature's spec name (`VIRTIO_F_RING_PACKED`, `VHOST_F_LOG_ALL`).
        feature: &'static str,
        /// Every bit the back-end offered.
        offered: u64,
        /// What the caller can do instead ("" when there is nothing to suggest).
        hint: &'static str,
    },
    /// The peer answered a REPLY_ACK with a non-zero status.
    #[error("{request} was refused by the peer (status {status})")]
    Refused {
        /// The request's name.
        request: &'static str,
        /// The status the peer sent.
        status: u64,
    },
    /// A reply that does not answer the request it follows.
    #[error("reply mismatch: {0}")]
    ReplyMismatch(String),
    /// A well-framed reply with a field the protocol forbids (the peer's fault, where
    /// `InvalidParam` is the caller's): a config reply beyond 256 bytes, an inflight area
    /// that is not a mappable file of the size it claims, fds riding on a reply's body.
    #[error("invalid {request} reply: {reason}")]
    InvalidReply {
        /// The request's name.
        request: &'static str,
        /// What is wrong with it, in words.
        reason: String,
    },
    /// A request handler failed; its message is sent back as a NACK where possible.
    #[error("{0}")]
    Handler(String),
    /// The peer did not answer in time.
    #[error("timed out waiting for the peer")]
    Timeout,
    /// The peer did not reply to `request` within `after`; `first` when nothing at all has
    /// arrived on the connection yet (the peer may be busy with someone else).
    #[error(
        "no reply to {request} within {}{}",
        crate::sys::socket::seconds(*after),
        if *first { FIRST_REPLY_HINT } else { "" }
    )]
    ReplyTimeout {
        /// The request's name.
        request: &'static str,
        /// The bound that passed.
        after: std::time::Duration,
        /// Nothing at all had arrived on the connection yet.
        first: bool,
    },
    /// The connection had a protocol error earlier and is closed for good.
    #[error("connection is closed after an earlier error")]
    Closed,
    /// A region or address the message named is not usable guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why a first request may go unanswered: the other side accepted the connection (or the
/// kernel queued it) but serves someone else.
const FIRST_REPLY_HINT: &str =
    "; nothing has arrived on this connection yet: a back-end that serves one \
     front-end at a time (like `python -m vhost serve blk`) answers the next front-end only \
     when the current one disconnects";

/// Shorthand for the layer's results.
pub type Result<T> = std::result::Result<T, Error>;
