//! Sending and receiving fds over AF_UNIX sockets (`SCM_RIGHTS`), hardened against the
//! ways a peer abuses it (ADVERSARIAL B2, B8, B9).

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use rustix::cmsg_space;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

use super::{invalid_input, retry_eintr};

/// Receive buffer size in fds; more arrive -> MSG_CTRUNC. vhost-user never attaches more
/// than one fd per region (at most 8, or 32 with rust-vmm's limit), so 32 is plenty.
pub const MAX_FDS: usize = 32;

/// The kernel's SCM_MAX_FD: no single message can carry more, so larger buffers are waste.
const SCM_MAX_FD: usize = 253;

/// Control-buffer bytes kept on the stack: CMSG_SPACE of MAX_FDS ints (16 + 128 bytes on
/// 64-bit Linux), plus the slack that aligning the buffer for a cmsghdr may cost; larger
/// requests fall back to the heap.
const STACK_CONTROL: usize = cmsg_space!(ScmRights(MAX_FDS)) + CMSG_ALIGN;

/// Sends `bufs` with `fds` attached (if any). Returns the number of data bytes sent, which
/// may be short on a stream socket.
///
/// MSG_NOSIGNAL turns a closed peer into an EPIPE error instead of a process-killing
/// SIGPIPE. fds with no data byte to carry them are refused: on a stream socket the kernel
/// would silently drop them.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if !fds.is_empty() && bufs.iter().all(|b| b.is_empty()) {
        return Err(invalid_input(
            "file descriptors need at least one data byte",
        ));
    }
    // Only set-up messages carry fds, so the control buffer may live on the heap (and
    // a message without fds allocates none).
    let len = if fds.is_empty() {
        0
    } else {
        cmsg_space!(ScmRights(fds.len()))
    };
    let mut space = vec![MaybeUninit::uninit(); len];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(invalid_input("too many file descriptors"));
    }
    retry_eintr(|| {
        Ok(rustix::net::sendmsg(
            sock,
            bufs,
            &mut control,
            SendFlags::NOSIGNAL,
        )?)
    })
}

/// Sends `data` without fds with `send` (MSG_NOSIGNAL, as above). Returns the bytes sent,
/// which may be short. One buffer and no msghdr make this the cheaper call for the small
/// messages that make up most of the protocol.
pub fn send_plain(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    retry_eintr(|| Ok(rustix::net::send(sock, data, SendFlags::NOSIGNAL)?))
}

/// One received message: `len` data bytes and the fds that came with them.
#[derive(Debug)]
pub struct Received {
    /// Data bytes received into the caller's buffer; 0 means end of file.
    pub len: usize,
    /// The fds that came with them, already close-on-exec and owned.
    pub fds: Vec<OwnedFd>,
}

/// recvmsg with MSG_CMSG_CLOEXEC; len 0 = EOF; retries EINTR. If MSG_CTRUNC is set (more fds
/// than fit, or more than max_fds arrived), every fd that did arrive is closed and it returns
/// Err(ENOBUFS). Any SCM_RIGHTS cmsg anywhere is collected.
///
/// MSG_CMSG_CLOEXEC makes the fds close-on-exec atomically, with no window in which a
/// concurrent fork+exec could inherit them (B8). The fds are owned as soon as they are
/// parsed, so no error path can leak one (B2).
///
/// Hand-written over `libc` rather than rustix, because this runs once per message on
/// both sides of every round trip: rustix's `recvmsg` always asks for the sender's address
/// (a 128-byte buffer the kernel fills with the peer's socket path) and walks its control
/// buffer again on drop, about 130 instructions per call plus the kernel's address copy
/// that vhost-user never reads (measured in `sys/mod.rs`).
///
/// `buf` should not be empty: a 0-byte read would be indistinguishable from EOF.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(SCM_MAX_FD);
    let space = if max_fds == 0 {
        0
    } else {
        cmsg_space!(ScmRights(max_fds))
    };
    // The usual control buffer (MAX_FDS fds) lives on the stack: this runs once per
    // message, and a heap buffer per call was a measurable share of a round trip. The
    // slice starts at a cmsghdr boundary and is exactly `space` long, so the kernel is
    // offered the same room as CMSG_SPACE(max_fds) says.
    let mut stack_control = [0u8; STACK_CONTROL];
    let mut heap_control = Vec::new();
    let raw: &mut [u8] = if space + CMSG_ALIGN <= STACK_CONTROL {
        &mut stack_control
    } else {
        heap_control.resize(space + CMSG_ALIGN, 0);
        &mut heap_control
    };
    let start = raw.as_ptr().align_offset(CMSG_ALIGN);
    let control = &mut raw[start..start + space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zeroes is a valid msghdr: null pointers with zero lengths, no flags.
    // msg_name stays null, so the kernel does not copy out the peer's address.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let len = retry_eintr(|| {
        // Reset each attempt: recvmsg updates these fields.
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = if space == 0 {
            std::ptr::null_mut()
        } else {
            control.as_mut_ptr().cast()
        };
        msg.msg_controllen = space;
        msg.msg_flags = 0;
        // SAFETY: `iov` describes `buf`, writable for its length, and msg_control
        // describes `space` writable bytes of `control`; both outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })?;

    let written = msg.msg_controllen.min(space);
    let fds = take_fds(&control[..written]);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        // Closing them here is the point: a peer flooding us with fds must not exhaust
        // our table, and a partial set is useless to the protocol layer.
        drop(fds);
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    }
    Ok(Received { len, fds })
}

/// Alignment of a cmsghdr and of each control message after it (CMSG_ALIGN on 64-bit Linux).
const CMSG_ALIGN: usize = std::mem::size_of::<usize>();

/// Owns every fd of every SCM_RIGHTS message in `control`, the `msg_controllen` bytes the
/// kernel wrote. Parsed as bytes, so a header whose length points past the buffer ends the
/// walk instead of being trusted.
fn take_fds(control: &[u8]) -> Vec<OwnedFd> {
    const WORD: usize = std::mem::size_of::<usize>();
    const HEADER: usize = WORD + 2 * std::mem::size_of::<libc::c_int>();
    let int = |at: usize| libc::c_int::from_ne_bytes(control[at..at + 4].try_into().unwrap());
    let mut fds = Vec::new();
    let mut at = 0;
    while at + HEADER <= control.len() {
        let claimed = usize::from_ne_bytes(control[at..at + WORD].try_into().unwrap());
        if claimed < HEADER {
            break; // the kernel never writes this; stop rather than loop
        }
        if claimed > control.len() - at {
            // Not the kernel's layout. Owning what follows could close an fd that is not
            // ours (padding reads as fd 0), which is worse than leaving it open.
            break;
        }
        let end = at + claimed;
        if int(at + WORD) == libc::SOL_SOCKET && int(at + WORD + 4) == libc::SCM_RIGHTS {
            for fd_at in (at + HEADER..end).step_by(4).filter(|i| i + 4 <= end) {
                // SAFETY: the kernel installed this fd in our table for this message
                // alone (SCM_RIGHTS), so owning it is right and closes it on every path.
                fds.push(unsafe { OwnedFd::from_raw_fd(int(fd_at)) });
            }
        }
        at = end.next_multiple_of(CMSG_ALIGN);
    }
    fds
}

/// Sends all of `data`, looping on partial writes; `fds` travel with the first chunk only.
///
/// Meant for blocking sockets: an error after a partial write leaves the stream
/// desynchronised, so callers treat any error as fatal to the connection.
pub fn send_all(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = 0;
    let mut fds = fds;
    while sent < data.len() || !fds.is_empty() {
        let n = send_with_fds(sock, &[IoSlice::new(&data[sent..])], fds)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        fds = &[];
        sent += n;
    }
    Ok(())
}

/// Waits for readability, bounded by `timeout` (`None` waits forever), in slices when an
/// interrupt check is installed (`ErrorKind::Interrupted` when it stops the wait). Unlike
/// a reader blocked in `recvmsg`, a POLLIN waiter is not woken by the kernel's
/// write-space wake-up (see `Connection::recv_reply`).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    super::poll::wait_fd(fd, libc::POLLIN, timeout)
}

/// Waits until `fd` is readable (or at EOF / in error, where a read won't block either).
/// `timeout_ms < 0` waits forever; see [`wait_readable`].
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    wait_readable(fd, super::poll::ms_timeout(timeout_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::{is_cloexec, open_fd_count};
    use crate::sys::EventFd;
    use std::os::fd::AsFd;
    use std::{mem, ptr};

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (a.into(), b.into())
    }

    /// (read end, write end), both close-on-exec and non-blocking.
    fn pipe() -> (OwnedFd, OwnedFd) {
        use rustix::pipe::PipeFlags;
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).unwrap()
    }

    /// One control message as the kernel lays it out: header, `fds`, padding.
    fn cmsg(level: libc::c_int, kind: libc::c_int, len_delta: isize, fds: &[i32]) -> Vec<u8> {
        let header = mem::size_of::<usize>() + 8;
        let len = (header + 4 * fds.len()) as isize + len_delta;
        let mut out = (len as usize).to_ne_bytes().to_vec();
        out.extend(level.to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        fds.iter().for_each(|fd| out.extend(fd.to_ne_bytes()));
        out.resize(out.len().next_multiple_of(CMSG_ALIGN), 0);
        out
    }

    #[test]
    fn control_bytes_are_parsed_without_trusting_lengths() {
        use std::os::fd::IntoRawFd;
        let fresh = || socketpair().0.into_raw_fd();
        let (a, b) = (fresh(), fresh());
        let c = socketpair().0; // stays owned here: the lying headers below must not take it
                                // Two SCM_RIGHTS messages around one of another type: both sets are taken.
        let mut control = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, 0, &[a]);
        control.extend(cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, 0, &[0, 0, 0]));
        control.extend(cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, 0, &[b]));
        let raw = |fds: Vec<OwnedFd>| fds.iter().map(|fd| fd.as_raw_fd()).collect::<Vec<_>>();
        assert_eq!(raw(take_fds(&control)), [a, b]);
        // A header claiming more than the buffer holds ends the walk: its fds are not
        // trusted (the padding after them would read as fd 0).
        let mut lying = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, 4096, &[c.as_raw_fd()]);
        assert!(take_fds(&lying).is_empty());
        lying.truncate(lying.len() - 4);
        assert!(take_fds(&lying).is_empty());
        // A header shorter than a header ends the walk instead of looping on it.
        let bogus = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, -12, &[]);
        assert!(take_fds(&bogus).is_empty());
        assert!(take_fds(&bogus[..4]).is_empty());
    }

    #[test]
    fn round_trip_with_three_fds() {
        let (a, b) = socketpair();
        let events: Vec<EventFd> = (0..3).map(|_| EventFd::new(true).unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = events.iter().map(|e| e.as_fd()).collect();
        let n = send_with_fds(
            a.as_fd(),
            &[IoSlice::new(b"hel"), IoSlice::new(b"lo")],
            &borrowed,
        )
        .unwrap();
        assert_eq!(n, 5);

        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 3);
        for (i, fd) in r.fds.into_iter().enumerate() {
            assert!(is_cloexec(fd.as_fd()));
            // Same counters, same order.
            EventFd::from_fd(fd).write(10 + i as u64).unwrap();
            assert_eq!(events[i].read().unwrap(), 10 + i as u64);
        }
    }

    #[test]
    fn message_without_fds() {
        let (a, b) = socketpair();
        send_all(a.as_fd(), b"abc", &[]).unwrap();
        let mut buf = [0u8; 8];
        let r = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap();
        assert_eq!((r.len, r.fds.len()), (3, 0));
        assert_eq!(&buf[..3], b"abc");
    }

    #[test]
    fn too_many_fds_are_all_closed_with_enobufs() {
        // ADVERSARIAL B2: more than our buffer holds, up to the kernel's SCM_MAX_FD.
        for count in [40, SCM_MAX_FD] {
            let (a, b) = socketpair();
            // Copies of a pipe's write end: once every copy is closed, the read end sees
            // EOF. That proves no copy leaked, whatever other tests do with the fd table.
            let (rd, wr) = pipe();
            let copies: Vec<BorrowedFd<'_>> = (0..count).map(|_| wr.as_fd()).collect();

            let mut leak_free = false;
            for _ in 0..20 {
                let before = open_fd_count();
                send_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &copies).unwrap();
                let mut buf = [0u8; 4];
                let err = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));
                // Tests run concurrently and open fds too: one clean attempt is enough.
                if open_fd_count() == before {
                    leak_free = true;
                    break;
                }
            }
            assert!(leak_free, "fd count grew after ENOBUFS ({count} fds)");

            drop(copies);
            drop(wr);
            let mut byte = [0u8; 1];
            let n = rustix::io::read(&rd, &mut byte).unwrap();
            assert_eq!(
                n, 0,
                "a copy of the pipe's write end is still open ({count} fds)"
            );
        }
    }

    #[test]
    fn a_larger_fd_budget_takes_them_all_and_a_short_read_keeps_them() {
        // max_fds above MAX_FDS takes the heap control buffer: 40 fds fit it whole.
        let (a, b) = socketpair();
        let e = EventFd::new(true).unwrap();
        let copies: Vec<BorrowedFd<'_>> = (0..40).map(|_| e.as_fd()).collect();
        send_with_fds(a.as_fd(), &[IoSlice::new(b"0123456789")], &copies).unwrap();
        // A buffer shorter than the message: the fds come with the first read, whole, and
        // the rest of the data comes without any.
        let mut buf = [0u8; 4];
        let r = recv_with_fds(b.as_fd(), &mut buf, 64).unwrap();
        assert_eq!((r.len, r.fds.len()), (4, 40));
        assert!(r.fds.iter().all(|fd| is_cloexec(fd.as_fd())));
        let r = recv_with_fds(b.as_fd(), &mut buf, 64).unwrap();
        assert_eq!((r.len, r.fds.len()), (4, 0));
        let r = recv_with_fds(b.as_fd(), &mut buf, 64).unwrap();
        assert_eq!((r.len, r.fds.len(), &buf[..2]), (2, 0, &b"89"[..]));
    }

    #[test]
    fn more_than_max_fds_is_enobufs_even_when_padding_fits_them() {
        // CMSG_SPACE(4) has room for 2 ints on 64-bit, so the kernel does not truncate.
        let (a, b) = socketpair();
        let e = EventFd::new(true).unwrap();
        send_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &[e.as_fd(), e.as_fd()]).unwrap();
        let mut buf = [0u8; 1];
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));

        send_with_fds(a.as_fd(), &[IoSlice::new(b"y")], &[e.as_fd()]).unwrap();
        let r = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!((r.len, r.fds.len()), (1, 1));

        // max_fds = 0: any fd at all is an error.
        send_with_fds(a.as_fd(), &[IoSlice::new(b"z")], &[e.as_fd()]).unwrap();
        let err = recv_with_fds(b.as_fd(), &mut buf, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));
    }

    #[test]
    fn fds_without_data_are_refused() {
        let (a, _b) = socketpair();
        let e = EventFd::new(true).unwrap();
        let err = send_with_fds(a.as_fd(), &[], &[e.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = send_all(a.as_fd(), b"", &[e.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        send_all(a.as_fd(), b"", &[]).unwrap();
    }

    #[test]
    fn closed_peer_gives_epipe_not_sigpipe() {
        let (a, b) = socketpair();
        drop(b);
        // The test harness ignores SIGPIPE, so a signal would go unnoticed. Block it in this
        // thread instead: a blocked signal stays pending even when ignored, so we can see
        // whether one was raised.
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before any other use;
        // pthread_sigmask only changes this thread's mask, restored below.
        unsafe {
            let mut set: libc::sigset_t = mem::zeroed();
            let mut old: libc::sigset_t = mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGPIPE);
            assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old), 0);

            let err = send_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &[]).unwrap_err();
            let mut pending: libc::sigset_t = mem::zeroed();
            libc::sigpending(&mut pending);
            let raised = libc::sigismember(&pending, libc::SIGPIPE) == 1;
            if raised {
                // Consume it so it is never delivered once unblocked.
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::sigtimedwait(&set, ptr::null_mut(), &zero);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());

            assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
            assert!(!raised, "SIGPIPE was raised");
        }
    }

    #[test]
    fn eof_is_len_zero() {
        let (a, b) = socketpair();
        drop(a);
        let mut buf = [0u8; 8];
        let r = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap();
        assert_eq!((r.len, r.fds.len()), (0, 0));
    }

    #[test]
    fn send_all_moves_large_messages_and_attaches_fds_once() {
        let (a, b) = socketpair();
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
        let expected = data.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut fds = Vec::new();
            let mut first_had_fd = false;
            let mut buf = vec![0u8; 65536];
            loop {
                let r = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap();
                if r.len == 0 {
                    break;
                }
                if got.is_empty() {
                    first_had_fd = !r.fds.is_empty();
                }
                got.extend_from_slice(&buf[..r.len]);
                fds.extend(r.fds);
            }
            (got, fds.len(), first_had_fd)
        });
        let e = EventFd::new(true).unwrap();
        send_all(a.as_fd(), &data, &[e.as_fd()]).unwrap();
        drop(a);
        let (got, nfds, first_had_fd) = reader.join().unwrap();
        assert!(got == expected);
        assert_eq!(nfds, 1);
        assert!(first_had_fd);
    }

    #[test]
    fn poll_reports_readable_timeout_and_hangup() {
        let (a, b) = socketpair();
        assert!(!poll_readable(b.as_fd(), 0).unwrap());
        let t = std::time::Instant::now();
        assert!(!poll_readable(b.as_fd(), 30).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(30));
        send_all(a.as_fd(), b"x", &[]).unwrap();
        assert!(poll_readable(b.as_fd(), -1).unwrap());
        let mut buf = [0u8; 1];
        recv_with_fds(b.as_fd(), &mut buf, 0).unwrap();
        drop(a);
        assert!(poll_readable(b.as_fd(), 1000).unwrap());
    }
}
