//! poll(2) over a handful of fds: a queue worker waits on its kick and its wake-up eventfd
//! at once, a session on its socket and the daemon's stop latch. poll has no fd-number
//! limit (unlike select, ADVERSARIAL J6) and needs no registration to keep in sync when
//! the front-end replaces a kick fd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::{cvt, retry_eintr};

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
    retry_eintr(|| {
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs, each naming an fd
        // that the borrows keep open for the duration of the call.
        cvt(unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) })
    })?;
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
