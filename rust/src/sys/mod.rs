//! Thin, owning wrappers over the Linux syscalls the rest of the crate needs: eventfds,
//! sealed memfds, shared mappings, poll and `SCM_RIGHTS` fd passing.
//!
//! Every fd handed out here is close-on-exec, so a Python `subprocess` started with
//! `close_fds=False` never inherits one (ADVERSARIAL B8). Every fd is an [`OwnedFd`] as soon
//! as it exists, so an error path can never leak one.
//!
//! # rustix or hand-written `libc`
//!
//! The syscalls go through [`rustix`] (its raw-syscall Linux back-end) wherever it has a
//! safe call for them, and through `libc` where it does not. Errors are the same either
//! way: rustix's `Errno` converts to the same `io::Error` (errno and text) that
//! `last_os_error` gave, and the checks that name what failed (a NUL in a name, a size or
//! offset that does not fit `off_t`, a socket path too long) run before the call as before.
//!
//! Adopted (no `unsafe` left in the wrapper):
//! - [`eventfd`]: `eventfd`, `read`/`write` of the counter, `F_GETFL` on adoption.
//! - [`memfd`]: `memfd_create`, `ftruncate`, `F_ADD_SEALS`, `fstat`, `F_DUPFD_CLOEXEC`.
//! - [`scm`]: `sendmsg` with `SCM_RIGHTS`, and `send`.
//! - [`socket`]: `socket`, `connect`, `SO_SNDTIMEO`/`SO_RCVTIMEO`, `shutdown` (the one
//!   `unsafe` left is [`Waker::new`]'s contract on a raw fd number, not a syscall).
//! - [`pipe`]: `pipe2`, `F_GETFL`/`F_SETFL`, `fstat`, `read`, `write`, `send`.
//! - [`mmap`]: `F_GET_SEALS` and the page size (read from the auxiliary vector, no
//!   `sysconf`); `mmap`/`munmap` go through rustix too but stay `unsafe` (they can unmap or
//!   alias memory Rust owns), with the MAP_FAILED check gone.
//! - [`userfaultfd`]: the fault `read`; the `userfaultfd` syscall itself (rustix marks it
//!   `unsafe`: the fd changes how this process's memory faults).
//!
//! Kept hand-written, and why:
//! - [`poll`]: [`poll::poll_until`] takes `libc::pollfd` arrays that the daemon's postcopy
//!   loop builds and reads by index; rustix's `PollFd` borrows each fd for a lifetime,
//!   which those callers (other layers) would have to be rewritten around, to save one
//!   one-line `unsafe` block. poll costs the same either way (one syscall).
//! - [`userfaultfd`]'s ioctls (`UFFDIO_*`, `USERFAULTFD_IOC_NEW`): rustix's `ioctl` is
//!   `unsafe` as well and needs a trait impl per request, so it would add code and remove
//!   no `unsafe`.
//! - [`pipe`]'s `SIGPIPE` blocking (`pthread_sigmask`, `sigpending`, `sigtimedwait`):
//!   rustix has no public signal-mask API outside its experimental `runtime` module.
//! - [`interrupt`]: no syscalls.
//! - [`scm::recv_with_fds`] (`recvmsg`): it runs once per message on both sides of every
//!   round trip, and rustix's `recvmsg` always passes a 128-byte address buffer (the
//!   kernel copies the peer's socket path into it on every call) and scans its control
//!   buffer again on drop. Counted with callgrind on `GET_FEATURES` against
//!   `rust/examples/null_backend.rs`, it cost about 130 instructions per message on each
//!   side, and the round trip was 0.2-0.3 µs slower (best batches, old and new builds
//!   taking turns on one CPU); by hand it is back to the pre-rustix figure. The control
//!   messages are parsed as bytes, so the only `unsafe` left is the call itself, the
//!   zeroed `msghdr`, and owning each received fd.
//!
//! Measured cost (a shared 2-CPU machine, the old and new code taking turns): none. An
//! eventfd write + read costs less through rustix (best block 410-445 ns against 509-570
//! ns: no libc wrapper around the syscall); sends cost the same; blk IOPS stay within
//! their run-to-run spread. The receive path did cost a measurable share of the round
//! trip, so it stayed hand-written (above).
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
pub use socket::{connect_unix, shut_down, PathError, Waker};

use std::io;

/// Turns the C convention (-1 and `errno`) into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
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
    use std::os::fd::{BorrowedFd, OwnedFd};

    use rustix::fs::MemfdFlags;
    use rustix::io::FdFlags;

    /// A memfd of `size` bytes without seals, as a careless or hostile front-end sends:
    /// anyone holding it can truncate it under a mapping.
    pub(crate) fn unsealed_memfd(size: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create("unsealed", MemfdFlags::CLOEXEC).expect("memfd_create");
        rustix::fs::ftruncate(&fd, size).expect("ftruncate");
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
        rustix::io::fcntl_getfd(fd)
            .expect("F_GETFD")
            .contains(FdFlags::CLOEXEC)
    }
}
