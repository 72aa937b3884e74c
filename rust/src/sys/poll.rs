//! poll(2) over a handful of fds: a queue worker waits on its kick and its wake-up eventfd
//! at once, a session on its socket and the daemon's stop latch. poll has no fd-number
//! limit (unlike select, ADVERSARIAL J6) and needs no registration to keep in sync when
//! the front-end replaces a kick fd.
//!
//! Every wait here goes in slices when an interrupt check is installed (see
//! [`super::interrupt`]), so Ctrl-C is seen within one slice.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::{cvt, interrupt};

/// Polls `pfds` until one has an event, `timeout` passes (`None`: never) or the installed
/// interrupt check stops the wait (`ErrorKind::Interrupted`). Returns whether any fd is
/// ready; a closed fd (POLLNVAL) is `EBADF`.
pub fn poll_until(pfds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<bool> {
    // The clock is read only once a slice has passed (or a signal came) without an event:
    // a wait that an event ends in its first poll, the common case, never reads it.
    let mut started: Option<Instant> = None;
    loop {
        let left = match (timeout, started) {
            (Some(t), Some(t0)) => Some(t.saturating_sub(t0.elapsed())),
            (t, _) => t,
        };
        let slice = interrupt::slice(left);
        let ms = interrupt::poll_ms(slice);
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs, each naming an fd
        // that the caller keeps open for the duration of the call.
        match cvt(unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                started.get_or_insert_with(Instant::now);
                interrupt::check()?;
            }
            Err(e) => return Err(e),
            Ok(0) => {
                // A whole slice passed (poll never returns early on a timeout).
                let now = Instant::now();
                let t0 = *started.get_or_insert_with(|| {
                    now.checked_sub(slice.unwrap_or_default()).unwrap_or(now)
                });
                if timeout.is_some_and(|t| now.duration_since(t0) >= t) {
                    return Ok(false);
                }
                interrupt::check()?;
            }
            Ok(_) if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) => {
                return Err(io::Error::from_raw_os_error(libc::EBADF))
            }
            Ok(_) => return Ok(true),
        }
    }
}

/// Waits until `fd` has one of `events` (or is hung up / in error, which the next call on
/// it reports) or `timeout` passes; see [`poll_until`].
pub fn wait_fd(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let mut pfd = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }];
    poll_until(&mut pfd, timeout)
}

/// A poll timeout in milliseconds (-1: forever) as a duration (`None`: forever).
pub fn ms_timeout(timeout_ms: i32) -> Option<Duration> {
    u64::try_from(timeout_ms).ok().map(Duration::from_millis)
}

/// Waits until one of `fds` is readable (or hung up / in error, which a read then reports)
/// or `timeout_ms` passes (-1 waits forever). Returns one flag per fd.
pub fn poll_many(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    poll_until(&mut pfds, ms_timeout(timeout_ms))?;
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::sys::EventFd;

    #[test]
    fn reports_which_fd_is_ready() {
        let a = EventFd::new(true).unwrap();
        let b = EventFd::new(true).unwrap();
        assert_eq!(
            poll_many(&[a.as_fd(), b.as_fd()], 0).unwrap(),
            [false, false]
        );
        b.write(1).unwrap();
        assert_eq!(
            poll_many(&[a.as_fd(), b.as_fd()], -1).unwrap(),
            [false, true]
        );
        b.read().unwrap();
        a.write(3).unwrap();
        assert_eq!(
            poll_many(&[a.as_fd(), b.as_fd()], 10).unwrap(),
            [true, false]
        );
    }
}
