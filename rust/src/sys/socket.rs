//! Connecting to a Unix socket path with a bound on the connect itself, and the error
//! that says which path failed and how.
//!
//! `UnixStream::connect` blocks for ever when the listener's backlog is full (a back-end
//! that stopped accepting): the kernel puts the caller to sleep until a slot frees. Here
//! the sleep is bounded by SO_SNDTIMEO, which is what the kernel's unix connect uses for
//! it, one slice at a time, so the deadline and the interrupt check both hold.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, Shutdown, SocketAddrUnix, SocketFlags, SocketType};

use super::interrupt;

/// An operation on a socket path that failed: what was tried (`"connect to"`, `"bind"`),
/// on which path, the errno (`ETIMEDOUT` for a bound that passed, `ENAMETOOLONG` for a
/// path longer than a socket address holds) and the reason in words.
#[derive(Debug)]
pub struct PathError {
    /// What was tried, in words (`"connect to"`, `"bind"`).
    pub op: &'static str,
    /// The socket path.
    pub path: PathBuf,
    /// The errno, so callers can tell a missing peer from a timeout.
    pub errno: i32,
    /// The reason in words (strerror or our own).
    pub reason: String,
}

impl PathError {
    /// Wraps a failed system call's error: its errno (EIO when it has none) and its text
    /// without std's "(os error N)" suffix, which the errno already says.
    pub fn new(op: &'static str, path: &Path, err: &io::Error) -> Self {
        PathError {
            op,
            path: path.to_path_buf(),
            errno: errno_of(err),
            reason: reason_of(err),
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path.display(), self.reason)
    }
}

impl std::error::Error for PathError {}

/// The errno of an I/O error; for an error built from a kind (std's and ours), the errno
/// that kind stands for, EIO when none does.
pub fn errno_of(err: &io::Error) -> i32 {
    use io::ErrorKind as K;
    err.raw_os_error().unwrap_or(match err.kind() {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::ConnectionRefused => libc::ECONNREFUSED,
        K::ConnectionReset => libc::ECONNRESET,
        K::AddrInUse => libc::EADDRINUSE,
        K::AlreadyExists => libc::EEXIST,
        K::TimedOut => libc::ETIMEDOUT,
        K::WouldBlock => libc::EAGAIN,
        K::InvalidInput => libc::EINVAL,
        K::Interrupted => libc::EINTR,
        K::NotADirectory => libc::ENOTDIR,
        K::IsADirectory => libc::EISDIR,
        _ => libc::EIO,
    })
}

/// The text of an I/O error without std's " (os error N)" suffix.
pub fn reason_of(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The largest path a Unix socket address holds (sun_path less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The address of `path`, or `ENAMETOOLONG` naming the limit.
fn sockaddr_of(path: &Path, op: &'static str) -> Result<SocketAddrUnix, PathError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > MAX_SOCKET_PATH || bytes.is_empty() || bytes.contains(&0) {
        let reason = if bytes.len() > MAX_SOCKET_PATH {
            format!(
                "the path is {} bytes long, and a Unix socket path holds at most \
                 {MAX_SOCKET_PATH} (use a shorter path or a symlink to its directory)",
                bytes.len()
            )
        } else {
            "a socket path must be non-empty and contain no NUL byte".to_string()
        };
        return Err(PathError {
            op,
            path: path.to_path_buf(),
            errno: if bytes.len() > MAX_SOCKET_PATH {
                libc::ENAMETOOLONG
            } else {
                libc::EINVAL
            },
            reason,
        });
    }
    // Checked above: short enough and NUL-free, so this cannot fail.
    SocketAddrUnix::new(path).map_err(|e| PathError::new(op, path, &e.into()))
}

/// Sets one socket timeout option; `None` is no bound, and a zero bound (which the
/// kernel would read as "forever") is rounded up to a microsecond.
fn set_timeout_opt(fd: BorrowedFd<'_>, opt: Timeout, t: Option<Duration>) -> io::Result<()> {
    let t = t.map(|d| d.max(Duration::from_micros(1)));
    Ok(sockopt::set_socket_timeout(fd, opt, t)?)
}

/// Shuts `sock` down both ways: a thread blocked reading, writing or accepting on it wakes
/// up (end of file, `EPIPE`, `EINVAL`), and the peer sees the connection close now, whoever
/// still holds an fd of it. Errors (the socket already shut down, not connected) are
/// ignored: the only aim is that nobody waits on this socket any longer.
pub fn shut_down(sock: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(sock, Shutdown::Both);
}

/// Wakes whatever thread is blocked on a socket whose owner sits behind a lock that thread
/// holds (a `serve`, an `accept`, a wait for a reply), by shutting the socket down
/// ([`shut_down`]) from another thread. It keeps the socket's fd number, not a duplicate
/// (a duplicate would keep the connection, or a listening path, alive after its owner
/// closed it); the owner calls [`Waker::retire`] before it closes the socket, and a wake
/// racing with that either shuts the still-open socket down or does nothing.
#[derive(Debug)]
pub struct Waker {
    sock: std::sync::Mutex<Option<std::os::fd::RawFd>>,
}

impl Waker {
    /// A waker for the socket `sock`.
    ///
    /// # Safety
    ///
    /// `sock` must stay open until [`Waker::retire`] is called or the waker is dropped.
    pub unsafe fn new(sock: BorrowedFd<'_>) -> Self {
        Waker {
            sock: std::sync::Mutex::new(Some(sock.as_raw_fd())),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<std::os::fd::RawFd>> {
        // Held only to shut down or retire, which cannot panic: never poisoned.
        self.sock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shuts the socket down ([`shut_down`]); does nothing once retired.
    pub fn wake(&self) {
        let slot = self.slot();
        if let Some(fd) = *slot {
            // SAFETY: the fd is open until `retire`, which waits for this lock (the
            // contract of `new`).
            shut_down(unsafe { BorrowedFd::borrow_raw(fd) });
        }
    }

    /// Forgets the socket: its owner is about to close it. Later wakes do nothing.
    pub fn retire(&self) {
        self.slot().take();
    }
}

/// Sets SO_RCVTIMEO and SO_SNDTIMEO to `t` (zero is a microsecond, unlike std's setters,
/// which refuse it).
pub fn set_timeouts(fd: BorrowedFd<'_>, t: Duration) -> io::Result<()> {
    set_timeout_opt(fd, Timeout::Recv, Some(t))?;
    set_timeout_opt(fd, Timeout::Send, Some(t))
}

/// Connects a close-on-exec stream socket to `path`, waiting at most `timeout` (`None`:
/// no bound) for the listener to take it, in slices when an interrupt check is installed.
/// A bound that passes is `ETIMEDOUT`; the stream comes back with no send timeout set.
pub fn connect_unix(path: &Path, timeout: Option<Duration>) -> Result<UnixStream, PathError> {
    const OP: &str = "connect to";
    let fail = |e: io::Error| PathError::new(OP, path, &e);
    let addr = sockaddr_of(path, OP)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| fail(e.into()))?;
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        set_timeout_opt(fd.as_fd(), Timeout::Send, interrupt::slice(left)).map_err(fail)?;
        match rustix::net::connect(&fd, &addr).map_err(io::Error::from) {
            Ok(_) => break,
            Err(e) => match e.raw_os_error() {
                // A full backlog: the slice (or the whole bound) passed without a free slot.
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        let t = timeout.unwrap_or_default();
                        return Err(PathError {
                            op: OP,
                            path: path.to_path_buf(),
                            errno: libc::ETIMEDOUT,
                            reason: format!(
                                "the listener did not take the connection within {}: its \
                                 backlog is full (is the back-end stuck, not accepting?)",
                                seconds(t)
                            ),
                        });
                    }
                    interrupt::check().map_err(fail)?;
                }
                _ => return Err(fail(e)),
            },
        }
    }
    set_timeout_opt(fd.as_fd(), Timeout::Send, None).map_err(fail)?;
    Ok(UnixStream::from(fd))
}

/// Binds and listens on a Unix socket at `path` so that the path only ever names a
/// socket that is already listening: a peer that sees the path can connect at once,
/// where a plain bind-then-listen leaves a moment in which connects get ECONNREFUSED.
/// The socket is bound under a temporary sibling name and renamed into place without
/// replacing anything (`RENAME_NOREPLACE`), so a file that appeared at `path` meanwhile
/// is `AlreadyExists` rather than silently replaced. When the sibling name would not fit
/// `sun_path`, it falls back to binding `path` directly.
pub fn listen_unix_at(path: &Path) -> io::Result<UnixListener> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = path.with_file_name(format!(".pv{:x}.{n:x}", std::process::id()));
    if temp.as_os_str().len() >= 108 {
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp)?;
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(cwd, &temp, cwd, path, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => Ok(listener),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e.into())
        }
    }
}

/// Waits for a peer on `listener` at most `timeout` (`None`: no bound), in slices when an
/// interrupt check is installed, then accepts it; the listener is untouched by a timeout or
/// an interruption and accepts again afterwards. A bound that passes is
/// `ErrorKind::TimedOut`, with the bound in the message.
pub fn accept_within(listener: &UnixListener, timeout: Option<Duration>) -> io::Result<UnixStream> {
    if !super::poll::wait_fd(listener.as_fd(), libc::POLLIN, timeout)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no peer connected within {}",
                seconds(timeout.unwrap_or_default())
            ),
        ));
    }
    listener.accept().map(|(stream, _)| stream)
}

/// A duration in seconds for a message: "2 s", "0.25 s".
pub fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pv-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn errors_name_the_path_and_the_errno() {
        let dir = temp_dir("kinds");
        let missing = dir.join("missing.sock");
        let e = connect_unix(&missing, None).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        assert_eq!(
            e.to_string(),
            format!(
                "connect to {}: No such file or directory",
                missing.display()
            )
        );
        let e = connect_unix(&dir, None).unwrap_err();
        assert_eq!(e.errno, libc::ECONNREFUSED);
        let long = dir.join("x".repeat(120));
        let e = connect_unix(&long, None).unwrap_err();
        assert_eq!(e.errno, libc::ENAMETOOLONG);
        assert!(e.reason.contains("at most 107"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_backlog_times_out() {
        let dir = temp_dir("backlog");
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Fill the backlog (never accepted) until a connect would block.
        let mut held = Vec::new();
        let err = loop {
            match connect_unix(&path, Some(Duration::from_millis(100))) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 5000, "the backlog never filled");
        };
        assert_eq!(err.errno, libc::ETIMEDOUT, "{err}");
        assert!(err.to_string().contains("backlog is full"), "{err}");
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn accept_waits_within_its_bound_and_stays_usable() {
        let dir = temp_dir("accept");
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let e = accept_within(&listener, Some(Duration::from_millis(20))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("0.02 s"), "{e}");
        let _client = connect_unix(&path, None).unwrap();
        accept_within(&listener, None).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_live_listener_connects() {
        let dir = temp_dir("ok");
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let s = connect_unix(&path, Some(Duration::from_secs(1))).unwrap();
        let (peer, _) = listener.accept().unwrap();
        assert!(s.write_timeout().unwrap().is_none());
        drop(peer);
        let _ = std::fs::remove_dir_all(dir);
    }
}
