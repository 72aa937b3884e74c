//! eventfd(2): the kick and call notifications of every virtqueue.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::event::EventfdFlags;
use rustix::fs::{fcntl_getfl, OFlags};

use super::{poll, retry_eintr};

/// An eventfd counter. Always close-on-exec; blocking or not as chosen at creation.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
    /// O_NONBLOCK, known at creation or read once on adoption: `read_wait` must not wait
    /// on a non-blocking eventfd, whose `read` reports an empty counter at once.
    nonblock: bool,
}

impl EventFd {
    /// A close-on-exec eventfd starting at 0; `nonblock` for one polled in an event loop.
    pub fn new(nonblock: bool) -> io::Result<Self> {
        let mut flags = EventfdFlags::CLOEXEC;
        if nonblock {
            flags |= EventfdFlags::NONBLOCK;
        }
        let fd = rustix::event::eventfd(0, flags)?;
        Ok(Self { fd, nonblock })
    }

    /// Adopts an fd received from a peer. It is not checked to be an eventfd: a wrong type
    /// shows up as an error from `read`/`write` or from epoll registration, never as UB.
    pub fn from_fd(fd: OwnedFd) -> Self {
        // A failure (which F_GETFL cannot have on an open fd) reads as blocking.
        let nonblock = fcntl_getfl(&fd).is_ok_and(|f| f.contains(OFlags::NONBLOCK));
        Self { fd, nonblock }
    }

    /// Waits until the counter is non-zero or `timeout` passes (`None`: no bound); true
    /// when signalled. Goes in slices under an interrupt check (see `sys::interrupt`).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        poll::wait_fd(self.fd.as_fd(), libc::POLLIN, timeout)
    }

    /// Reads and resets the counter if it is non-zero; `None` at once otherwise, blocking
    /// or not. (Another reader of the same blocking eventfd that empties it between the
    /// poll and the read makes this read wait for the next write.)
    pub fn try_read(&self) -> io::Result<Option<u64>> {
        if !self.wait(Some(Duration::ZERO))? {
            return Ok(None);
        }
        match self.read() {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `read` that can be interrupted: a blocking eventfd waits for a write in slices
    /// (see `sys::interrupt`) and then reads; a non-blocking one reads at once
    /// (`WouldBlock` when the counter is zero).
    pub fn read_wait(&self) -> io::Result<u64> {
        if self.nonblock {
            return self.read();
        }
        loop {
            self.wait(None)?;
            if let Some(v) = self.try_read()? {
                return Ok(v);
            }
        }
    }

    /// Adds `v` to the counter. `u64::MAX` is refused by the kernel (EINVAL).
    pub fn write(&self, v: u64) -> io::Result<()> {
        let bytes = v.to_ne_bytes();
        let n = retry_eintr(|| Ok(rustix::io::write(&self.fd, &bytes)?))?;
        check_whole(n)
    }

    /// Reads and resets the counter. With a non-blocking eventfd and a zero counter this is
    /// `ErrorKind::WouldBlock` (std maps EAGAIN to it).
    pub fn read(&self) -> io::Result<u64> {
        let mut bytes = [0u8; 8];
        let n = retry_eintr(|| Ok(rustix::io::read(&self.fd, &mut bytes)?))?;
        check_whole(n)?;
        Ok(u64::from_ne_bytes(bytes))
    }

    /// A second handle on the same counter (e.g. one for the worker, one for Python).
    pub fn try_clone(&self) -> io::Result<Self> {
        super::dup_cloexec(self.fd.as_fd()).map(Self::from_fd)
    }
}

/// An eventfd transfers exactly 8 bytes or fails; anything else means the fd is not an
/// eventfd (it was adopted with `from_fd`).
fn check_whole(n: usize) -> io::Result<()> {
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short eventfd transfer: the fd is not an eventfd",
        ))
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::is_cloexec;

    #[test]
    fn counter_accumulates_and_resets() {
        let e = EventFd::new(false).unwrap();
        e.write(1).unwrap();
        e.write(2).unwrap();
        assert_eq!(e.read().unwrap(), 3);
        e.write(5).unwrap();
        assert_eq!(e.read().unwrap(), 5);
    }

    #[test]
    fn nonblocking_empty_read_would_block() {
        let e = EventFd::new(true).unwrap();
        let err = e.read().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        e.write(7).unwrap();
        assert_eq!(e.read().unwrap(), 7);
        assert_eq!(e.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn try_read_never_blocks_and_read_wait_respects_the_mode() {
        for nonblock in [false, true] {
            let e = EventFd::new(nonblock).unwrap();
            assert_eq!(e.try_read().unwrap(), None);
            assert!(!e.wait(Some(Duration::from_millis(1))).unwrap());
            e.write(2).unwrap();
            assert!(e.wait(None).unwrap());
            assert_eq!(e.read_wait().unwrap(), 2);
            let adopted = EventFd::from_fd(e.try_clone().unwrap().into());
            assert_eq!(adopted.nonblock, nonblock);
        }
        let e = EventFd::new(true).unwrap();
        assert_eq!(e.read_wait().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn max_value_is_rejected() {
        let e = EventFd::new(true).unwrap();
        let err = e.write(u64::MAX).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn clone_shares_the_counter_and_is_cloexec() {
        let e = EventFd::new(true).unwrap();
        assert!(is_cloexec(e.as_fd()));
        let c = e.try_clone().unwrap();
        assert_ne!(c.as_raw_fd(), e.as_raw_fd());
        assert!(is_cloexec(c.as_fd()));
        c.write(4).unwrap();
        assert_eq!(e.read().unwrap(), 4);
    }

    #[test]
    fn round_trip_through_owned_fd() {
        let e = EventFd::new(true).unwrap();
        let raw = e.as_raw_fd();
        let owned: OwnedFd = e.into();
        assert_eq!(owned.as_raw_fd(), raw);
        let e = EventFd::from_fd(owned);
        e.write(9).unwrap();
        assert_eq!(e.read().unwrap(), 9);
    }

    #[test]
    fn adopted_non_eventfd_reports_an_error() {
        // /dev/null reads 0 bytes: that must be an error, not a counter value of 0.
        let f = std::fs::File::open("/dev/null").unwrap();
        let fake = EventFd::from_fd(OwnedFd::from(f));
        assert_eq!(fake.read().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
