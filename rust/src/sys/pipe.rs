//! Pipes that carry one blob from a process to another (a back-end's device state during
//! migration): created close-on-exec, checked when a peer hands one over, and read to the
//! end or written whole under bounds, so a peer that stops reading or writing (or never
//! closes its end) can delay a transfer but never hang it.
//!
//! The fd is switched to non-blocking before it is used: a pipe end a peer handed over may
//! also be held by the peer, which could drain or fill the pipe between our poll and our
//! read or write. A write to a pipe whose reader is gone fails with `EPIPE` without
//! raising `SIGPIPE` (the signal is blocked around the write and a pending one discarded),
//! as sockets get with `MSG_NOSIGNAL`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{fcntl_getfl, fcntl_setfl, FileType, OFlags};
use rustix::net::SendFlags;
use rustix::pipe::PipeFlags;

use super::memfd::fstat;
use super::poll::poll_until;
use super::retry_eintr;
use super::socket::seconds;

/// Which way a stream end is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// The end is read until end of file.
    Read,
    /// The end is written until everything is out.
    Write,
}

/// Why a stream transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The fd is not a pipe or a socket (a regular file, an eventfd, a device...).
    #[error("the fd is {0}, not a pipe or a socket")]
    NotAStream(&'static str),
    /// The fd is not open for the way it is used (the read end of a pipe given to write).
    #[error("the fd is not open for {0}")]
    WrongWay(&'static str),
    /// The reader went on past `max_len` bytes without an end of file.
    #[error("more than {0} bytes")]
    TooLarge(usize),
    /// The peer neither read nor wrote anything for this long.
    #[error("the other end made no progress for {}", seconds(*.0))]
    Stalled(Duration),
    /// The whole transfer took longer than its bound.
    #[error("not finished within {}", seconds(*.0))]
    TimedOut(Duration),
    /// The cancel fd became readable (the session ended, a new transfer replaced this one).
    #[error("cancelled")]
    Cancelled,
    /// The reading end was closed before everything was written.
    #[error("the reading end was closed after {0} bytes")]
    ReaderGone(usize),
    /// A read, write, poll or fcntl on the stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Bounds of one transfer.
#[derive(Clone, Copy, Debug)]
pub struct Bounds<'a> {
    /// Most bytes a read accepts before its end of file.
    pub max_len: usize,
    /// Longest wait with no byte moved (`None`: no bound).
    pub stall: Option<Duration>,
    /// Longest time for the whole transfer (`None`: no bound).
    pub total: Option<Duration>,
    /// An fd that becomes readable when the transfer must stop (an eventfd).
    pub cancel: Option<BorrowedFd<'a>>,
}

/// A new pipe: `(read end, write end)`, both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?)
}

/// Checks that `fd`, handed over by a peer, is a pipe (FIFO) or a socket open for `way`.
pub fn check_stream_end(fd: BorrowedFd<'_>, way: Way) -> Result<(), StreamError> {
    let kind = match FileType::from_raw_mode(fstat(fd)?.st_mode) {
        FileType::Fifo | FileType::Socket => None,
        FileType::RegularFile => Some("a regular file"),
        FileType::Directory => Some("a directory"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        // eventfds, memfd-less anonymous inodes, epoll fds...
        _ => Some("an anonymous inode (an eventfd or the like)"),
    };
    if let Some(kind) = kind {
        return Err(StreamError::NotAStream(kind));
    }
    let mode = fcntl_getfl(fd).map_err(io::Error::from)? & OFlags::RWMODE;
    if way == Way::Read && mode == OFlags::WRONLY {
        Err(StreamError::WrongWay("reading"))
    } else if way == Way::Write && mode == OFlags::RDONLY {
        Err(StreamError::WrongWay("writing"))
    } else {
        Ok(())
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(fcntl_setfl(fd, fcntl_getfl(fd)? | OFlags::NONBLOCK)?)
}

fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(FileType::from_raw_mode(fstat(fd)?.st_mode) == FileType::Socket)
}

/// Waits until `fd` is ready for `way` within the bounds; what stopped the wait otherwise.
struct Waiter<'a> {
    fd: BorrowedFd<'a>,
    events: libc::c_short,
    bounds: Bounds<'a>,
    started: Instant,
}

impl<'a> Waiter<'a> {
    fn new(fd: BorrowedFd<'a>, way: Way, bounds: Bounds<'a>) -> Self {
        let events = match way {
            Way::Read => libc::POLLIN,
            Way::Write => libc::POLLOUT,
        };
        Waiter {
            fd,
            events,
            bounds,
            started: Instant::now(),
        }
    }

    fn wait(&self) -> Result<(), StreamError> {
        let left = self
            .bounds
            .total
            .map(|t| t.saturating_sub(self.started.elapsed()));
        let bound = match (left, self.bounds.stall) {
            (Some(l), Some(s)) => Some(l.min(s)),
            (l, s) => l.or(s),
        };
        let mut pfds = vec![libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: self.events,
            revents: 0,
        }];
        if let Some(c) = self.bounds.cancel {
            pfds.push(libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ready = poll_until(&mut pfds, bound)?;
        if pfds.get(1).is_some_and(|c| c.revents != 0) {
            return Err(StreamError::Cancelled);
        }
        if ready {
            return Ok(());
        }
        match (self.bounds.total, left) {
            (Some(total), Some(l)) if self.bounds.stall.map_or(true, |s| l <= s) => {
                Err(StreamError::TimedOut(total))
            }
            _ => Err(StreamError::Stalled(self.bounds.stall.unwrap_or_default())),
        }
    }
}

/// Reads `fd` to its end of file (the writer closed its end), at most `bounds.max_len`
/// bytes. The fd is made non-blocking.
pub fn read_to_end(fd: BorrowedFd<'_>, bounds: Bounds<'_>) -> Result<Vec<u8>, StreamError> {
    set_nonblocking(fd)?;
    let waiter = Waiter::new(fd, Way::Read, bounds);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = retry_eintr(|| Ok(rustix::io::read(fd, &mut chunk[..])?));
        match n {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() + n > bounds.max_len {
                    return Err(StreamError::TooLarge(bounds.max_len));
                }
                out.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => waiter.wait()?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes all of `data` into `fd` (the caller closes it afterwards, which is the reader's
/// end of file). The fd is made non-blocking.
pub fn write_all(fd: BorrowedFd<'_>, data: &[u8], bounds: Bounds<'_>) -> Result<(), StreamError> {
    set_nonblocking(fd)?;
    let socket = is_socket(fd)?;
    let waiter = Waiter::new(fd, Way::Write, bounds);
    let mut done = 0;
    while done < data.len() {
        match write_nosignal(fd, &data[done..], socket) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => waiter.wait()?,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                return Err(StreamError::ReaderGone(done))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One write that reports a missing reader as `EPIPE` and never raises `SIGPIPE`.
fn write_nosignal(fd: BorrowedFd<'_>, buf: &[u8], socket: bool) -> io::Result<usize> {
    if socket {
        return retry_eintr(|| Ok(rustix::net::send(fd, buf, SendFlags::NOSIGNAL)?));
    }
    let _blocked = SigpipeBlocked::new()?;
    retry_eintr(|| Ok(rustix::io::write(fd, buf)?))
}

/// SIGPIPE blocked on this thread while it lives; on drop a SIGPIPE that became pending
/// meanwhile (raised by our write) is discarded and the previous mask restored.
struct SigpipeBlocked {
    previous: libc::sigset_t,
    was_pending: bool,
}

fn sigpipe_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds a valid signal.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGPIPE);
        set.assume_init()
    }
}

fn sigpipe_pending() -> bool {
    let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given; sigismember only reads it.
    unsafe {
        libc::sigpending(pending.as_mut_ptr()) == 0
            && libc::sigismember(pending.as_ptr(), libc::SIGPIPE) == 1
    }
}

impl SigpipeBlocked {
    fn new() -> io::Result<Self> {
        let set = sigpipe_set();
        let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: both pointers are valid sigset_t storage; pthread_sigmask fills `previous`.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, previous.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SigpipeBlocked {
            // SAFETY: pthread_sigmask succeeded, so it wrote the previous mask.
            previous: unsafe { previous.assume_init() },
            was_pending: sigpipe_pending(),
        })
    }
}

impl Drop for SigpipeBlocked {
    fn drop(&mut self) {
        if !self.was_pending && sigpipe_pending() {
            let set = sigpipe_set();
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid set and timeout; the signal info is not wanted (null).
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
        }
        // SAFETY: restores the mask saved in `new`; the old-mask pointer may be null.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// Bounds for a test's own side of a pipe: patient, up to `max_len` bytes.
#[cfg(test)]
pub(crate) fn patient(max_len: usize) -> Bounds<'static> {
    Bounds {
        max_len,
        stall: Some(Duration::from_secs(5)),
        total: None,
        cancel: None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::sys::EventFd;

    fn bounds(max_len: usize) -> Bounds<'static> {
        patient(max_len)
    }

    /// Gives up after 50 ms without progress.
    fn hasty(max_len: usize) -> Bounds<'static> {
        Bounds {
            stall: Some(Duration::from_millis(50)),
            ..bounds(max_len)
        }
    }

    #[test]
    fn a_blob_larger_than_the_pipe_goes_through_whole() {
        let (r, w) = pipe().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            write_all(w.as_fd(), &sent, bounds(0)).unwrap();
            drop(w);
        });
        assert_eq!(read_to_end(r.as_fd(), bounds(1 << 20)).unwrap(), data);
        writer.join().unwrap();
    }

    #[test]
    fn reads_stop_at_the_size_bound() {
        let (r, w) = pipe().unwrap();
        write_all(w.as_fd(), &[7; 100], bounds(0)).unwrap();
        drop(w);
        assert!(matches!(
            read_to_end(r.as_fd(), bounds(99)),
            Err(StreamError::TooLarge(99))
        ));
    }

    #[test]
    fn a_silent_writer_stalls_and_a_cancel_ends_the_wait() {
        let (r, w) = pipe().unwrap();
        assert!(matches!(
            read_to_end(r.as_fd(), hasty(10)),
            Err(StreamError::Stalled(_))
        ));
        let total = Bounds {
            stall: None,
            total: Some(Duration::from_millis(50)),
            ..bounds(10)
        };
        assert!(matches!(
            read_to_end(r.as_fd(), total),
            Err(StreamError::TimedOut(_))
        ));
        let cancel = EventFd::new(true).unwrap();
        cancel.write(1).unwrap();
        let c = Bounds {
            stall: None,
            cancel: Some(cancel.as_fd()),
            ..bounds(10)
        };
        assert!(matches!(
            read_to_end(r.as_fd(), c),
            Err(StreamError::Cancelled)
        ));
        drop(w);
    }

    #[test]
    fn a_reader_that_never_reads_bounds_the_writer() {
        let (_r, w) = pipe().unwrap();
        assert!(matches!(
            write_all(w.as_fd(), &vec![0; 1 << 20], hasty(0)),
            Err(StreamError::Stalled(_))
        ));
    }

    #[test]
    fn a_gone_reader_is_an_error_not_a_signal() {
        // With SIGPIPE at its default action, an unguarded write would kill the test.
        // SAFETY: signal() with a valid signal and a standard disposition.
        let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        let (r, w) = pipe().unwrap();
        drop(r);
        let result = write_all(w.as_fd(), b"state", bounds(0));
        // SAFETY: restores the disposition saved above.
        unsafe { libc::signal(libc::SIGPIPE, old) };
        assert!(matches!(result, Err(StreamError::ReaderGone(0))));
        assert!(!sigpipe_pending());
    }

    #[test]
    fn only_pipes_and_sockets_open_the_right_way_pass() {
        let (r, w) = pipe().unwrap();
        check_stream_end(r.as_fd(), Way::Read).unwrap();
        check_stream_end(w.as_fd(), Way::Write).unwrap();
        assert!(matches!(
            check_stream_end(r.as_fd(), Way::Write),
            Err(StreamError::WrongWay("writing"))
        ));
        assert!(matches!(
            check_stream_end(w.as_fd(), Way::Read),
            Err(StreamError::WrongWay("reading"))
        ));
        let ev = EventFd::new(false).unwrap();
        assert!(matches!(
            check_stream_end(ev.as_fd(), Way::Read),
            Err(StreamError::NotAStream(_))
        ));
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            check_stream_end(file.as_fd(), Way::Read),
            Err(StreamError::NotAStream("a regular file"))
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        check_stream_end(a.as_fd(), Way::Write).unwrap();
    }
}
