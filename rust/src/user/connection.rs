//! One end of a vhost-user socket: whole messages in and out, with their fds.
//!
//! Framing rules live here so that both sides share them: the header is read first and
//! checked before a single body byte is read; fds are only accepted together with the
//! header (fds that ride on the body are closed and the message is rejected); a failed
//! message closes every fd that came with it; any framing error makes the connection
//! unusable (a stream cannot be re-synchronised), which callers see as `Error::Closed`.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::header::{Header, HEADER_SIZE, MAX_BODY_SIZE};
use super::{Error, Result};
use crate::sys::scm;

/// A received message: a header already checked by the caller's rule, its body, its fds.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
    broken: bool,
    /// The bound set by `set_timeout`, also applied to a whole message: a peer that
    /// trickles a message a byte at a time cannot keep us waiting longer than this
    /// (SO_RCVTIMEO alone restarts with every byte).
    timeout: Cell<Option<Duration>>,
}

impl Connection {
    pub fn new(sock: UnixStream) -> Self {
        Connection {
            sock,
            broken: false,
            timeout: Cell::new(None),
        }
    }

    /// Bounds every wait for the peer (J3); `None` waits forever. Uses SO_RCVTIMEO, so it
    /// costs nothing per message.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.sock.set_read_timeout(timeout)?;
        self.sock.set_write_timeout(timeout)?;
        self.timeout.set(timeout);
        Ok(())
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the stream unusable; later calls fail with `Error::Closed`. The socket is
    /// shut down at once, so the peer sees the connection close now rather than whenever
    /// the owner drops it, and a late reply can never be read as the answer to a later
    /// request.
    pub fn poison(&mut self) {
        if !self.broken {
            self.broken = true;
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    fn ensure_usable(&self) -> Result<()> {
        if self.broken {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Sends one message. Header and body go out in one `sendmsg` when the kernel takes it.
    pub fn send(&mut self, header: &Header, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.ensure_usable()?;
        debug_assert_eq!(header.size as usize, body.len());
        let head = header.to_bytes();
        let result = self.send_parts(&head, body, fds);
        if result.is_err() {
            self.poison();
        }
        result
    }

    fn send_parts(&self, head: &[u8], body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let total = head.len() + body.len();
        let sent = scm::send_with_fds(
            self.sock.as_fd(),
            &[IoSlice::new(head), IoSlice::new(body)],
            fds,
        )
        .map_err(map_io)?;
        if sent < total {
            // The rest goes without fds: they travelled with the first byte.
            let mut rest = Vec::with_capacity(total - sent);
            rest.extend_from_slice(head);
            rest.extend_from_slice(body);
            scm::send_all(self.sock.as_fd(), &rest[sent..], &[]).map_err(map_io)?;
        }
        Ok(())
    }

    /// Receives one message. `check` validates the header before any body byte is read
    /// (request rules on a back-end, reply rules on a front-end).
    pub fn recv(&mut self, check: impl FnOnce(&Header) -> Result<()>) -> Result<Message> {
        self.ensure_usable()?;
        let result = self.recv_inner(check);
        if result.is_err() {
            self.poison();
        }
        result
    }

    fn recv_inner(&self, check: impl FnOnce(&Header) -> Result<()>) -> Result<Message> {
        let mut head = [0u8; HEADER_SIZE];
        let mut started = None;
        let fds = self.read_exact_with_fds(&mut head, true, &mut started)?;
        let header = Header::from_bytes(&head);
        if header.size as usize > MAX_BODY_SIZE {
            return Err(Error::OversizedMessage(header.size));
        }
        check(&header)?;
        let mut body = vec![0u8; header.size as usize];
        if !body.is_empty() {
            self.read_exact_with_fds(&mut body, false, &mut started)?;
        }
        Ok(Message { header, body, fds })
    }

    /// Fills `buf` completely. With `header`, EOF before the first byte is a clean
    /// disconnect and fds are taken from the first chunk; fds on any other chunk are a
    /// protocol error (ADVERSARIAL B7) and are closed by the drop.
    /// `started` is when the message's first bytes arrived; with a timeout set, the rest
    /// of the message must follow within it (J3: a slow trickle is a timeout too).
    fn read_exact_with_fds(
        &self,
        buf: &mut [u8],
        header: bool,
        started: &mut Option<Instant>,
    ) -> Result<Vec<OwnedFd>> {
        let mut filled = 0;
        let mut fds = Vec::new();
        while filled < buf.len() {
            if let (Some(t0), Some(limit)) = (*started, self.timeout.get()) {
                if t0.elapsed() > limit {
                    return Err(Error::Timeout);
                }
            }
            let got = scm::recv_with_fds(self.sock.as_fd(), &mut buf[filled..], scm::MAX_FDS)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOBUFS) => Error::TooManyFds,
                    _ => map_io(e),
                })?;
            if got.len == 0 {
                return Err(if header && filled == 0 {
                    Error::Disconnected
                } else if header {
                    Error::PartialMessage("connection closed inside a message header")
                } else {
                    Error::PartialMessage("connection closed inside a message body")
                });
            }
            if !got.fds.is_empty() {
                if !(header && filled == 0) {
                    return Err(Error::InvalidParam(
                        "file descriptors must travel with the message header".into(),
                    ));
                }
                fds = got.fds;
            }
            filled += got.len;
            if self.timeout.get().is_some() {
                started.get_or_insert_with(Instant::now);
            }
        }
        Ok(fds)
    }
}

/// Maps socket errors to the protocol's view of them.
pub(crate) fn map_io(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Error::Disconnected,
        _ => Error::Io(e),
    }
}
