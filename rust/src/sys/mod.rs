//! Thin, owning wrappers over the Linux syscalls the rest of the crate needs: eventfds,
//! sealed memfds, shared mappings, poll and `SCM_RIGHTS` fd passing.
//!
//! Every fd handed out here is close-on-exec, so a Python `subprocess` started with
//! `close_fds=False` never inherits one (ADVERSARIAL B8). Every fd is an [`OwnedFd`] as soon
//! as it exists, so an error path can never leak one.
//!
//! [`OwnedFd`]: std::os::fd::OwnedFd

pub mod eventfd;
pub mod interrupt;
pub mod memfd;
pub mod mmap;
pub mod pipe;
pub mod poll;
pub mod scm;
pub mod socket;
pub mod userfaultfd;

pub use eventfd::EventFd;
pub use memfd::{dup_cloexec, file_size, memfd_create};
pub use mmap::Mapping;
pub use poll::poll_many;
pub use scm::{poll_readable, recv_with_fds, send_all, send_with_fds, Received, MAX_FDS};
pub use socket::{connect_unix, PathError};

use std::io;

/// Turns the C convention (-1 and `errno`) into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same as [`cvt`] for the `ssize_t`-returning calls (read, write, sendmsg, recvmsg).
fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // A non-negative ssize_t always fits a usize.
        Ok(ret as usize)
    }
}

/// Repeats a call interrupted by a signal: Python installs handlers (SIGINT), so EINTR
/// is routine, and surfacing it would make callers retry by hand everywhere. The installed
/// interrupt check is asked first, so a signal that must stop the wait (Ctrl-C) does.
fn retry_eintr<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => interrupt::check()?,
            other => return other,
        }
    }
}

/// An `InvalidInput` error for arguments rejected before any syscall is made.
fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    /// A memfd of `size` bytes without seals, as a careless or hostile front-end sends:
    /// anyone holding it can truncate it under a mapping.
    pub(crate) fn unsealed_memfd(size: i64) -> OwnedFd {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create failed");
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate takes no pointers.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }, 0);
        fd
    }

    /// Number of open fds in this process. Other tests run concurrently in the same
    /// process, so callers compare counts with a retry rather than once.
    pub(crate) fn open_fd_count() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("read /proc/self/fd")
            .count()
    }

    /// Whether `fd` has FD_CLOEXEC set.
    pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: F_GETFD takes no pointer and `fd` is open for the borrow's lifetime.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert!(flags >= 0, "F_GETFD failed");
        flags & libc::FD_CLOEXEC != 0
    }
}
