//! Sending and receiving fds over AF_UNIX sockets (`SCM_RIGHTS`), hardened against the
//! ways a peer abuses it (ADVERSARIAL B2, B8, B9).

use std::io::{self, IoSlice};
use std::mem::{self, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::Duration;

use super::{cvt_size, invalid_input, retry_eintr};

/// Receive buffer size in fds; more arrive -> MSG_CTRUNC. vhost-user never attaches more
/// than one fd per region (at most 8, or 32 with rust-vmm's limit), so 32 is plenty.
pub const MAX_FDS: usize = 32;

/// The kernel's SCM_MAX_FD: no single message can carry more, so larger buffers are waste.
const SCM_MAX_FD: usize = 253;

/// Control-buffer words kept on the stack: CMSG_SPACE of MAX_FDS ints (16 + 128 bytes on
/// 64-bit Linux) with room to spare; larger requests fall back to the heap.
const STACK_CONTROL_WORDS: usize = 24;

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
    // SAFETY: msghdr is plain C data for which all-zeroes is a valid (empty) value; zeroing
    // also covers the padding fields some libcs have.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec; sendmsg only reads through it.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;

    // u64 elements give the control buffer the alignment of cmsghdr.
    let mut control: Vec<u64> = Vec::new();
    if !fds.is_empty() {
        let data_len = u32::try_from(fds.len() * size_of::<RawFd>())
            .map_err(|_| invalid_input("too many file descriptors"))?;
        // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        control = vec![0u64; space.div_ceil(size_of::<u64>())];
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed, aligned bytes, at least one cmsghdr
        // plus room for `fds.len()` ints (CMSG_SPACE), so the header and data writes below
        // stay inside `control`. CMSG_DATA may be unaligned for int, hence write_unaligned.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            debug_assert!(!cmsg.is_null());
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    let sent = retry_eintr(|| {
        // SAFETY: `msg` points at `bufs` and `control`, both alive and unchanged for the
        // call; sendmsg only reads them.
        cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })
    });
    drop(control);
    sent
}

/// Sends `data` without fds with `send` (MSG_NOSIGNAL, as above). Returns the bytes sent,
/// which may be short. One buffer and no msghdr make this the cheaper call for the small
/// messages that make up most of the protocol.
pub fn send_plain(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    retry_eintr(|| {
        // SAFETY: `data` is readable for its length for the duration of the call.
        cvt_size(unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        })
    })
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
/// `buf` should not be empty: a 0-byte read would be indistinguishable from EOF.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(SCM_MAX_FD);
    let space = if max_fds == 0 {
        0
    } else {
        // SAFETY: CMSG_SPACE is pure arithmetic; max_fds * 4 <= 1012 fits a u32.
        unsafe { libc::CMSG_SPACE((max_fds * size_of::<RawFd>()) as u32) as usize }
    };
    // The usual control buffer (MAX_FDS fds) lives on the stack: this runs once per
    // message, and a heap buffer per call was a measurable share of a round trip.
    let mut stack_control = [0u64; STACK_CONTROL_WORDS];
    let mut heap_control = Vec::new();
    let words = space.div_ceil(size_of::<u64>());
    let control: &mut [u64] = if words <= STACK_CONTROL_WORDS {
        &mut stack_control[..words]
    } else {
        heap_control.resize(words, 0u64);
        &mut heap_control
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };

    // SAFETY: all-zeroes is a valid msghdr (see send_with_fds).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    let len = retry_eintr(|| {
        // Reset each attempt: recvmsg updates these fields.
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = if space == 0 {
            ptr::null_mut()
        } else {
            control.as_mut_ptr().cast()
        };
        msg.msg_controllen = space as _;
        msg.msg_flags = 0;
        // SAFETY: `iov` describes `buf`, which is writable for its length, and msg_control
        // describes `space` writable bytes of `control`; both outlive the call.
        cvt_size(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })
    })?;

    let mut fds = Vec::new();
    let control_end = (control.as_ptr() as usize).saturating_add(msg.msg_controllen as usize);
    // SAFETY: `msg` is the header recvmsg just filled in; CMSG_FIRSTHDR/NXTHDR only return
    // headers that lie inside msg_control[..msg_controllen] (or null), which the kernel wrote.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and inside the control buffer (see above).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_DATA is pointer arithmetic on a valid header.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            // SAFETY: pure arithmetic.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let claimed = (hdr.cmsg_len as usize).saturating_sub(header_len);
            // Never trust cmsg_len beyond what the buffer holds.
            let available = control_end.saturating_sub(data as usize);
            let count = claimed.min(available) / size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count` keeps the read inside the control buffer; the kernel
                // installed each of these fds in our table for us alone, so owning it is
                // right (and makes sure it is closed on every path).
                let fd = unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) };
                fds.push(fd);
            }
        }
        // SAFETY: `msg` and `cmsg` are as above; NXTHDR bounds-checks against msg_controllen.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }

    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        // Closing them here is the point: a peer flooding us with fds must not exhaust
        // our table, and a partial set is useless to the protocol layer.
        drop(fds);
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    }
    Ok(Received { len, fds })
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

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut sv = [0; 2];
        // SAFETY: `sv` has room for the two fds socketpair writes.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: socketpair returned two fresh fds that nobody else owns.
        unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
    }

    /// (read end, write end), both close-on-exec and non-blocking.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: `p` has room for the two fds pipe2 writes.
        let r = unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0);
        // SAFETY: pipe2 returned two fresh fds that nobody else owns.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
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
        let (a, b) = socketpair();
        // Forty copies of a pipe's write end: once every copy is closed, the read end sees
        // EOF. That proves no copy leaked, whatever other tests do with the fd table.
        let (rd, wr) = pipe();
        let copies: Vec<BorrowedFd<'_>> = (0..40).map(|_| wr.as_fd()).collect();

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
        assert!(leak_free, "fd count grew after ENOBUFS");

        drop(copies);
        drop(wr);
        let mut byte = 0u8;
        // SAFETY: `byte` is a writable 1-byte buffer.
        let n = unsafe { libc::read(rd.as_raw_fd(), ptr::addr_of_mut!(byte).cast(), 1) };
        assert_eq!(n, 0, "a copy of the pipe's write end is still open");
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
