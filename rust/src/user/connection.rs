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
use crate::sys::{interrupt, scm, socket};

/// A received message: a header already checked by the caller's rule, its body, its fds.
#[derive(Debug)]
pub struct Message {
    /// The header, checked by the caller's rule for the side it came from.
    pub header: Header,
    /// The body: exactly `header.size` bytes.
    pub body: Vec<u8>,
    /// The fds that came with it, owned: dropped (closed) unless the handler keeps them.
    pub fds: Vec<OwnedFd>,
}

/// Bytes of a first read (header plus the read-ahead of a reply) that go on the stack.
const STACK_FIRST_READ: usize = 64;
/// Messages without fds up to this size are sent from one stack buffer with `send`.
const STACK_SEND: usize = 256;

/// One vhost-user socket, either side: framing, fds, bounded waits, and a broken flag so that
/// after a framing error nothing more is read from a stream we no longer understand.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
    broken: bool,
    /// The bound set by `set_timeout`, also applied to a whole message: a peer that
    /// trickles a message a byte at a time cannot keep us waiting longer than this
    /// (SO_RCVTIMEO alone restarts with every byte).
    timeout: Cell<Option<Duration>>,
    /// Set once a reply arrived in pieces (header first, body later, as qemu-storage-daemon
    /// writes them): from then on every reply wait polls first (see `recv_reply`).
    split_replies: Cell<bool>,
    /// Whether any message arrived on this connection yet (a reply timeout says so: a
    /// peer that never answered anything is likely serving someone else).
    received_any: Cell<bool>,
}

impl Connection {
    /// Takes over `sock`, keeping the receive timeout already set on it (as the daemon
    /// sets its stall timeout) as the connection's bound.
    pub fn new(sock: UnixStream) -> Self {
        let timeout = sock.read_timeout().ok().flatten();
        let conn = Connection {
            sock,
            broken: false,
            timeout: Cell::new(timeout),
            split_replies: Cell::new(false),
            received_any: Cell::new(false),
        };
        // Without it the socket never wakes a blocked call to ask the interrupt check; a
        // failure only costs that.
        let _ = conn.set_timeout(timeout);
        conn
    }

    /// Bounds every wait for the peer (J3); `None` waits forever, zero does not wait. The
    /// socket's SO_RCVTIMEO/SO_SNDTIMEO are set to the bound or to one interrupt slice if
    /// that is shorter, so a blocked call returns that often to check the interrupt check
    /// (`sys::interrupt`) and the bound; it costs nothing per message.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        socket::set_timeouts(self.sock.as_fd(), socket_slice(timeout))?;
        self.timeout.set(timeout);
        Ok(())
    }

    /// The bound set by `set_timeout`.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    /// A blocked send or receive returned after one socket-timeout slice without progress
    /// (`since`: when this operation first stalled, kept across calls). `Timeout` once the
    /// stall reaches the bound, `Interrupted` when the interrupt check says so.
    fn stalled(&self, since: &mut Option<Instant>) -> Result<()> {
        let now = Instant::now();
        let t0 = *since.get_or_insert_with(|| {
            now.checked_sub(socket_slice(self.timeout.get()))
                .unwrap_or(now)
        });
        if let Some(limit) = self.timeout.get() {
            if now.duration_since(t0) >= limit {
                return Err(Error::Timeout);
            }
        }
        interrupt::check().map_err(map_io)
    }

    /// Runs one send-like call, repeating it while the socket-timeout slices pass without
    /// progress (see `stalled`).
    fn retry_stalled(
        &self,
        since: &mut Option<Instant>,
        mut call: impl FnMut() -> io::Result<usize>,
    ) -> Result<usize> {
        loop {
            match call() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stalled(since)?,
                Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                other => return other.map_err(map_io),
            }
        }
    }

    /// The socket, for polling it beside other fds.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// True after an error that left the stream out of step: every later call fails (`Closed`).
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
        let fd = self.sock.as_fd();
        let mut since = None;
        if fds.is_empty() && total <= STACK_SEND {
            // Most messages: one contiguous copy on the stack and a plain send().
            let mut buf = [0u8; STACK_SEND];
            buf[..head.len()].copy_from_slice(head);
            buf[head.len()..total].copy_from_slice(body);
            let mut sent = 0;
            while sent < total {
                sent +=
                    self.retry_stalled(&mut since, || scm::send_plain(fd, &buf[sent..total]))?;
            }
            return Ok(());
        }
        let mut sent = self.retry_stalled(&mut since, || {
            scm::send_with_fds(fd, &[IoSlice::new(head), IoSlice::new(body)], fds)
        })?;
        if sent < total {
            // The rest goes without fds: they travelled with the first byte.
            let mut rest = Vec::with_capacity(total);
            rest.extend_from_slice(head);
            rest.extend_from_slice(body);
            while sent < total {
                sent += self.retry_stalled(&mut since, || scm::send_plain(fd, &rest[sent..]))?;
            }
        }
        Ok(())
    }

    /// Receives one message. `check` validates the header before any body byte is read
    /// (request rules on a back-end, reply rules on a front-end).
    pub fn recv(&mut self, check: impl FnOnce(&Header) -> Result<()>) -> Result<Message> {
        self.recv_expecting(0, None, check)
    }

    /// Receives a reply whose body is expected to be `expected_body` bytes, reading header
    /// and body with one `recvmsg` when it is. Only for replies: the peer must send
    /// nothing else until we ask again, so a byte beyond the reply is a protocol error.
    /// (Requests cannot be read ahead: the kernel glues plain bytes to a following
    /// segment that carries fds, so fds could not be told apart from the next message's.)
    ///
    /// A reader blocked in `recvmsg` is also woken whenever the peer frees a buffer we
    /// sent (the kernel's write-space wake-up shares the socket's wait queue), and when
    /// that happens while the peer is still working it costs a pair of context switches.
    /// A `poll` for POLLIN is not woken by it but is one more syscall (and a timed one), so
    /// a wait polls first only where the spurious wake-up is likely: after a request with
    /// a body (`request_has_body`: back-ends read its header and body with two reads, and
    /// the second frees our buffer just before they reply), for the rest of a reply that
    /// came in pieces, and for every reply of a peer that writes them in pieces.
    ///
    /// A timeout is `ReplyTimeout`, naming `request` and the bound.
    pub fn recv_reply(
        &mut self,
        request: &'static str,
        expected_body: usize,
        request_has_body: bool,
        check: impl FnOnce(&Header) -> Result<()>,
    ) -> Result<Message> {
        let poll_first = request_has_body || self.split_replies.get();
        let first = !self.received_any.get();
        self.recv_expecting(expected_body.min(MAX_BODY_SIZE), Some(poll_first), check)
            .map_err(|e| match e {
                Error::Timeout => Error::ReplyTimeout {
                    request,
                    after: self.timeout.get().unwrap_or_default(),
                    first,
                },
                other => other,
            })
    }

    fn recv_expecting(
        &mut self,
        read_ahead: usize,
        poll: Option<bool>,
        check: impl FnOnce(&Header) -> Result<()>,
    ) -> Result<Message> {
        self.ensure_usable()?;
        let result = self.recv_inner(read_ahead, poll, check);
        match result {
            Ok(_) => self.received_any.set(true),
            Err(_) => self.poison(),
        }
        result
    }

    fn recv_inner(
        &self,
        read_ahead: usize,
        poll: Option<bool>,
        check: impl FnOnce(&Header) -> Result<()>,
    ) -> Result<Message> {
        // The first read lands on the stack when it is small (every request, and every
        // reply but GET_CONFIG's and the like): no allocation for the header, and none at
        // all for a message without a body.
        let mut stack = [0u8; STACK_FIRST_READ];
        let mut heap = Vec::new();
        let first: &mut [u8] = if HEADER_SIZE + read_ahead <= STACK_FIRST_READ {
            &mut stack[..HEADER_SIZE + read_ahead]
        } else {
            heap.resize(HEADER_SIZE + read_ahead, 0u8);
            &mut heap
        };
        let mut started = None;
        let poll_first = poll == Some(true);
        let (filled, fds) =
            self.read_at_least(first, HEADER_SIZE, true, poll_first, &mut started)?;
        let header = Header::from_bytes(first[..HEADER_SIZE].try_into().expect("12 bytes"));
        if header.size as usize > MAX_BODY_SIZE {
            return Err(Error::OversizedMessage(header.size));
        }
        check(&header)?;
        let size = header.size as usize;
        let early = filled - HEADER_SIZE;
        if early > size {
            return Err(Error::ReplyMismatch(format!(
                "{} bytes arrived after a {size}-byte reply",
                early - size
            )));
        }
        let mut body = Vec::new();
        if size > 0 {
            body.reserve_exact(size);
            body.extend_from_slice(&first[HEADER_SIZE..filled]);
            body.resize(size, 0);
            if early < size {
                // A reply in pieces: wait for the rest with poll, now and from now on.
                let poll_rest = poll.is_some();
                if poll_rest {
                    self.split_replies.set(true);
                }
                if self.timeout.get().is_some() {
                    // The header is in; the rest of the message is due within the bound.
                    started.get_or_insert_with(Instant::now);
                }
                self.read_at_least(
                    &mut body[early..],
                    size - early,
                    false,
                    poll_rest,
                    &mut started,
                )?;
            }
        }
        Ok(Message { header, body, fds })
    }

    /// Reads into `buf` until at least `min` bytes arrived (never more than `buf` holds).
    /// With `header`, EOF before the first byte is a clean disconnect and fds are taken
    /// from the first chunk; fds on any other chunk are a protocol error (ADVERSARIAL B7)
    /// and are closed by the drop. `started` is when the message's first bytes arrived;
    /// with a timeout set, the rest must follow within it (J3: a slow trickle is a
    /// timeout too). With `poll`, each read waits in `poll` first (see `scm::wait_readable`).
    fn read_at_least(
        &self,
        buf: &mut [u8],
        min: usize,
        header: bool,
        poll: bool,
        started: &mut Option<Instant>,
    ) -> Result<(usize, Vec<OwnedFd>)> {
        let mut filled = 0;
        let mut fds = Vec::new();
        let mut since = None;
        while filled < min {
            if let (Some(t0), Some(limit)) = (*started, self.timeout.get()) {
                if t0.elapsed() > limit {
                    return Err(Error::Timeout);
                }
            }
            if poll && !scm::wait_readable(self.sock.as_fd(), self.timeout.get()).map_err(map_io)? {
                return Err(Error::Timeout);
            }
            let got = match scm::recv_with_fds(self.sock.as_fd(), &mut buf[filled..], scm::MAX_FDS)
            {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stalled(&mut since)?;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(Error::TooManyFds),
                Err(e) => return Err(map_io(e)),
            };
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
            // The clock is read only for a message that takes more than one read.
            if filled < min && self.timeout.get().is_some() {
                started.get_or_insert_with(Instant::now);
            }
        }
        Ok((filled, fds))
    }
}

/// A message being received without waiting ([`Connection::try_recv`]): what arrived so
/// far, kept between calls while the event loop waits for the rest.
#[derive(Debug, Default)]
pub struct PartialMessage {
    head: [u8; HEADER_SIZE],
    head_len: usize,
    header: Option<Header>,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Connection {
    /// Receives one message without ever waiting: takes whatever bytes have arrived into
    /// `partial` and returns the message once it is whole (`None`: wait for the socket to
    /// become readable, then call again with the same `partial`). The framing rules are
    /// those of [`recv`](Self::recv): `check` sees the header before any body byte is read,
    /// fds travel with the header only, a body is bounded by the header's size, and any
    /// error leaves the connection broken. No read-ahead: exactly one message is taken, so
    /// nothing of a later message is consumed. Bounded by the caller's own timeout, not by
    /// [`set_timeout`](Self::set_timeout).
    pub fn try_recv(
        &mut self,
        partial: &mut PartialMessage,
        check: impl Fn(&Header) -> Result<()>,
    ) -> Result<Option<Message>> {
        self.ensure_usable()?;
        let result = self.try_recv_inner(partial, check);
        match &result {
            Ok(Some(_)) => self.received_any.set(true),
            Ok(None) => {}
            Err(_) => self.poison(),
        }
        result
    }

    fn try_recv_inner(
        &self,
        p: &mut PartialMessage,
        check: impl Fn(&Header) -> Result<()>,
    ) -> Result<Option<Message>> {
        loop {
            let Some(header) = p.header else {
                let got = match scm::try_recv_with_fds(
                    self.sock.as_fd(),
                    &mut p.head[p.head_len..],
                    scm::MAX_FDS,
                ) {
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        return Err(Error::TooManyFds)
                    }
                    Err(e) => return Err(map_io(e)),
                };
                if got.len == 0 {
                    return Err(if p.head_len == 0 {
                        Error::Disconnected
                    } else {
                        Error::PartialMessage("connection closed inside a message header")
                    });
                }
                if !got.fds.is_empty() {
                    if p.head_len != 0 {
                        return Err(Error::InvalidParam(
                            "file descriptors must travel with the message header".into(),
                        ));
                    }
                    p.fds = got.fds;
                }
                p.head_len += got.len;
                if p.head_len == HEADER_SIZE {
                    let header = Header::from_bytes(&p.head);
                    if header.size as usize > MAX_BODY_SIZE {
                        return Err(Error::OversizedMessage(header.size));
                    }
                    check(&header)?;
                    p.body = Vec::with_capacity(header.size as usize);
                    p.header = Some(header);
                }
                continue;
            };
            let size = header.size as usize;
            let have = p.body.len();
            if have == size {
                let message = Message {
                    header,
                    body: std::mem::take(&mut p.body),
                    fds: std::mem::take(&mut p.fds),
                };
                *p = PartialMessage::default();
                return Ok(Some(message));
            }
            p.body.resize(size, 0);
            let got = scm::try_recv_with_fds(self.sock.as_fd(), &mut p.body[have..], scm::MAX_FDS);
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    p.body.truncate(have);
                    return match e {
                        e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                        e if e.raw_os_error() == Some(libc::ENOBUFS) => Err(Error::TooManyFds),
                        e => Err(map_io(e)),
                    };
                }
            };
            p.body.truncate(have + got.len);
            if got.len == 0 {
                return Err(Error::PartialMessage(
                    "connection closed inside a message body",
                ));
            }
            if !got.fds.is_empty() {
                return Err(Error::InvalidParam(
                    "file descriptors must travel with the message header".into(),
                ));
            }
        }
    }
}

/// How long one blocked socket call lasts before it returns to check the bound and the
/// interrupt check: the bound, or one interrupt slice if that is shorter.
fn socket_slice(timeout: Option<Duration>) -> Duration {
    timeout.map_or(interrupt::SLICE, |t| t.min(interrupt::SLICE))
}

/// Maps socket errors to the protocol's view of them.
pub(crate) fn map_io(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Error::Disconnected,
        _ => Error::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::EventFd;
    use std::os::fd::AsRawFd;

    const SET_VRING_KICK: u32 = 12;
    const GET_FEATURES: u32 = 1;
    const SET_VRING_NUM: u32 = 8;

    /// (read end, write end) of a pipe: once every copy of the write end is closed, the
    /// read end sees EOF, which proves a received copy was not leaked.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: `p` has room for the two fds pipe2 writes.
        let r = unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: pipe2 returned two fresh fds that nobody else owns.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    fn read_is_eof(fd: &OwnedFd) -> bool {
        let mut byte = 0u8;
        // SAFETY: `byte` is a writable 1-byte buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(byte).cast(), 1) };
        n == 0
    }

    #[test]
    fn fds_on_the_body_chunk_are_rejected_and_closed() {
        // B7, whether the body is already queued when the header is read or comes later.
        for late_body in [false, true] {
            let (a, b) = UnixStream::pair().unwrap();
            let (rd, wr) = pipe();
            let head = Header::request(SET_VRING_KICK, 8, false).to_bytes();
            scm::send_all(a.as_fd(), &head, &[]).unwrap();
            let sender = std::thread::spawn(move || {
                if late_body {
                    std::thread::sleep(Duration::from_millis(50));
                }
                scm::send_all(a.as_fd(), &0u64.to_le_bytes(), &[wr.as_fd()]).unwrap();
                a
            });
            if !late_body {
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut conn = Connection::new(b);
            let err = conn.recv(Header::check_request).unwrap_err();
            assert!(matches!(err, Error::InvalidParam(_)), "{err:?}");
            assert!(conn.is_broken());
            let _a = sender.join().unwrap();
            assert!(read_is_eof(&rd), "the fd that rode on the body leaked");
        }
    }

    #[test]
    fn fds_of_a_queued_message_stay_with_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let kick = EventFd::new(true).unwrap();
        let mut tx = Connection::new(a);
        tx.send(&Header::request(GET_FEATURES, 0, false), &[], &[])
            .unwrap();
        tx.send(
            &Header::request(SET_VRING_KICK, 8, false),
            &0u64.to_le_bytes(),
            &[kick.as_fd()],
        )
        .unwrap();
        let mut rx = Connection::new(b);
        let first = rx.recv(Header::check_request).unwrap();
        assert_eq!(
            (first.header.code, first.body.len(), first.fds.len()),
            (GET_FEATURES, 0, 0)
        );
        let second = rx.recv(Header::check_request).unwrap();
        assert_eq!(second.header.code, SET_VRING_KICK);
        assert_eq!((second.body.len(), second.fds.len()), (8, 1));
    }

    #[test]
    fn small_and_large_messages_cross_intact() {
        // Small ones go out with one send() from the stack, large ones with sendmsg.
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Connection::new(a);
        let mut rx = Connection::new(b);
        for size in [
            0usize,
            8,
            STACK_SEND - HEADER_SIZE,
            STACK_SEND - HEADER_SIZE + 1,
            4096,
        ] {
            let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            tx.send(
                &Header::request(SET_VRING_NUM, size as u32, true),
                &body,
                &[],
            )
            .unwrap();
            let msg = rx.recv(|_| Ok(())).unwrap();
            assert_eq!(msg.header.size as usize, size);
            assert!(msg.header.needs_reply());
            assert_eq!(msg.body, body);
            assert!(msg.fds.is_empty());
        }
    }

    #[test]
    fn a_reply_read_ahead_beyond_the_stack_buffer_works() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Connection::new(a);
        let mut rx = Connection::new(b);
        let body = vec![7u8; 300];
        let reply = Header::request(SET_VRING_NUM, 300, false).reply_to(300);
        tx.send(&reply, &body, &[]).unwrap();
        let msg = rx
            .recv_reply("SET_VRING_NUM", 300, false, |_| Ok(()))
            .unwrap();
        assert_eq!(msg.body, body);
    }
    #[test]
    fn a_reply_in_pieces_is_read_whole_and_later_waits_poll() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        rx.set_timeout(Some(Duration::from_secs(5))).unwrap();
        let reply = Header::request(GET_FEATURES, 0, false).reply_to(8);
        let head = reply.to_bytes();
        let writer = std::thread::spawn(move || {
            scm::send_all(a.as_fd(), &head, &[]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            scm::send_all(a.as_fd(), &7u64.to_le_bytes(), &[]).unwrap();
            a
        });
        assert!(!rx.split_replies.get());
        let msg = rx.recv_reply("GET_FEATURES", 8, false, |_| Ok(())).unwrap();
        assert_eq!(msg.body, 7u64.to_le_bytes());
        assert!(
            rx.split_replies.get(),
            "a reply in two writes was not noticed"
        );
        let a = writer.join().unwrap();
        // The next reply waits in poll first and still arrives intact.
        let mut tx = Connection::new(a);
        tx.send(&reply, &9u64.to_le_bytes(), &[]).unwrap();
        let msg = rx.recv_reply("GET_FEATURES", 8, false, |_| Ok(())).unwrap();
        assert_eq!(msg.body, 9u64.to_le_bytes());
    }

    #[test]
    fn an_interrupted_reply_wait_poisons_the_connection() {
        // Without a timeout the wait goes on for ever; the interrupt check ends it within
        // a slice, and the stream is closed (a late reply would be taken for the next).
        for request_has_body in [false, true] {
            let (_a, b) = UnixStream::pair().unwrap();
            let mut rx = Connection::new(b);
            rx.set_timeout(None).unwrap();
            let asked = std::rc::Rc::new(Cell::new(0));
            let seen = asked.clone();
            let err = interrupt::with_check(
                Box::new(move || {
                    seen.set(seen.get() + 1);
                    seen.get() == 3
                }),
                || rx.recv_reply("GET_FEATURES", 8, request_has_body, |_| Ok(())),
            )
            .unwrap_err();
            assert!(
                matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::Interrupted),
                "{err:?}"
            );
            assert_eq!(asked.get(), 3);
            assert!(rx.is_broken());
        }
    }

    /// A peer sending a request header one byte every `every`, until we hang up.
    fn trickle(a: UnixStream, every: Duration) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let head = Header::request(GET_FEATURES, 0, false).to_bytes();
            let mut sent = 0;
            for byte in head {
                if scm::send_plain(a.as_fd(), &[byte]).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(every);
            }
            sent
        })
    }

    #[test]
    fn a_trickled_request_is_bounded_as_a_whole() {
        // Each byte comes within the bound, the message does not (SO_RCVTIMEO alone
        // restarts with every byte): a timeout soon after the bound, not 1.65 s later.
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut rx = Connection::new(b);
        let sender = trickle(a, Duration::from_millis(150));
        let t0 = Instant::now();
        let err = rx.recv(Header::check_request).unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(err, Error::Timeout), "{err:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
        assert!(rx.is_broken());
        drop(rx);
        assert!(sender.join().unwrap() < HEADER_SIZE);
    }

    #[test]
    fn an_interrupted_request_receive_poisons_the_connection() {
        // No bound at all: only the interrupt check (a daemon's stop) ends the wait.
        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        rx.set_timeout(None).unwrap();
        let sender = trickle(a, Duration::from_millis(100));
        let t0 = Instant::now();
        let err = interrupt::with_check(
            Box::new(move || t0.elapsed() > Duration::from_millis(250)),
            || rx.recv(Header::check_request),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::Interrupted),
            "{err:?}"
        );
        assert!(t0.elapsed() < Duration::from_millis(1000));
        assert!(rx.is_broken());
        drop(rx);
        assert!(sender.join().unwrap() < HEADER_SIZE);
    }

    #[test]
    fn try_recv_takes_a_message_in_pieces_and_keeps_the_next_one() {
        // Header a byte at a time (the fd with its first byte), the body later, a second
        // message already queued: each call takes what is there, nothing more.
        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        let mut partial = PartialMessage::default();
        let kick = EventFd::new(true).unwrap();
        let head = Header::request(SET_VRING_KICK, 8, false).to_bytes();
        assert!(rx.try_recv(&mut partial, |_| Ok(())).unwrap().is_none());
        scm::send_all(a.as_fd(), &head[..1], &[kick.as_fd()]).unwrap();
        for byte in &head[1..] {
            assert!(rx.try_recv(&mut partial, |_| Ok(())).unwrap().is_none());
            scm::send_all(a.as_fd(), &[*byte], &[]).unwrap();
        }
        assert!(rx.try_recv(&mut partial, |_| Ok(())).unwrap().is_none());
        let next = Header::request(GET_FEATURES, 0, false).to_bytes();
        scm::send_all(a.as_fd(), &[&3u64.to_le_bytes()[..], &next].concat(), &[]).unwrap();
        let msg = rx.try_recv(&mut partial, |_| Ok(())).unwrap().unwrap();
        assert_eq!(
            (msg.header.code, msg.body, msg.fds.len()),
            (SET_VRING_KICK, 3u64.to_le_bytes().to_vec(), 1)
        );
        let msg = rx.try_recv(&mut partial, |_| Ok(())).unwrap().unwrap();
        assert_eq!((msg.header.code, msg.body.len()), (GET_FEATURES, 0));
    }

    #[test]
    fn try_recv_applies_the_framing_rules() {
        // The header check, fds riding on the body (B7), a close inside a message: each
        // an error that breaks the connection.
        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        scm::send_all(
            a.as_fd(),
            &Header::request(GET_FEATURES, 0, false).to_bytes(),
            &[],
        )
        .unwrap();
        let err = rx
            .try_recv(&mut PartialMessage::default(), |h| {
                h.check_reply_to(GET_FEATURES)
            })
            .unwrap_err();
        assert!(matches!(err, Error::InvalidHeader(_)), "{err:?}");
        assert!(rx.is_broken());

        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        let (rd, wr) = pipe();
        let mut partial = PartialMessage::default();
        scm::send_all(
            a.as_fd(),
            &Header::request(SET_VRING_KICK, 8, false).to_bytes(),
            &[],
        )
        .unwrap();
        assert!(rx.try_recv(&mut partial, |_| Ok(())).unwrap().is_none());
        scm::send_all(a.as_fd(), &0u64.to_le_bytes(), &[wr.as_fd()]).unwrap();
        drop(wr);
        let err = rx.try_recv(&mut partial, |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::InvalidParam(_)), "{err:?}");
        assert!(read_is_eof(&rd), "the fd that rode on the body leaked");

        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        let mut partial = PartialMessage::default();
        scm::send_all(
            a.as_fd(),
            &Header::request(SET_VRING_NUM, 8, false).to_bytes(),
            &[],
        )
        .unwrap();
        assert!(rx.try_recv(&mut partial, |_| Ok(())).unwrap().is_none());
        drop(a);
        let err = rx.try_recv(&mut partial, |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::PartialMessage(_)), "{err:?}");
    }

    #[test]
    fn a_zero_timeout_does_not_wait() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut rx = Connection::new(b);
        rx.set_timeout(Some(Duration::ZERO)).unwrap();
        let err = rx
            .recv_reply("GET_FEATURES", 8, false, |_| Ok(()))
            .unwrap_err();
        assert!(matches!(err, Error::ReplyTimeout { .. }), "{err:?}");
    }

    #[test]
    fn a_polled_reply_wait_is_bounded_by_the_timeout() {
        for request_has_body in [false, true] {
            let (_a, b) = UnixStream::pair().unwrap();
            let mut rx = Connection::new(b);
            rx.set_timeout(Some(Duration::from_millis(50))).unwrap();
            let t0 = Instant::now();
            let err = rx
                .recv_reply("GET_FEATURES", 8, request_has_body, |_| Ok(()))
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::ReplyTimeout {
                        request: "GET_FEATURES",
                        first: true,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(t0.elapsed() >= Duration::from_millis(50));
            assert!(rx.is_broken());
        }
    }
}
