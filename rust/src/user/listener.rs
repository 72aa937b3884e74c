//! A listening vhost-user socket path, for whichever side plays server.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys::scm::poll_readable;

/// How long `bind` waits to learn whether a socket in its way is still served.
const STALE_PROBE: Duration = Duration::from_secs(1);

/// Size of `sockaddr_un.sun_path`, terminating NUL included.
const SUN_PATH_MAX: usize = 108;

/// Binds a Unix socket path and unlinks it again on drop, so a crashed or finished server
/// leaves nothing behind that would make the next `bind` fail.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created: drop unlinks the path only while it
    /// is still ours, never a newer server's socket.
    identity: Option<(u64, u64)>,
}

impl Listener {
    /// With `replace_stale`, an existing *socket* at `path` that nobody listens on any more
    /// (a leftover of a dead server) is removed first. A live socket is never replaced
    /// (`AddrInUse`), and any other kind of file is never touched (`AlreadyExists`). A path
    /// too long for `sun_path` is `InvalidInput`. The messages say what is at the path;
    /// the caller names the path.
    pub fn bind(path: &Path, replace_stale: bool) -> io::Result<Self> {
        let len = path.as_os_str().len();
        if len >= SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the path is {len} bytes; a Unix socket path must be shorter than \
                     {SUN_PATH_MAX} bytes"
                ),
            ));
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket exists there; it is not replaced",
                ));
            }
            if replace_stale {
                // Bounded: a live server whose backlog is full makes a plain connect
                // block; a connect that times out means someone is listening too.
                let probe = crate::sys::socket::connect_unix(path, Some(STALE_PROBE));
                if probe.is_ok() || probe.is_err_and(|e| e.errno == libc::ETIMEDOUT) {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening there",
                    ));
                }
                std::fs::remove_file(path)?;
            }
        }
        let inner = crate::sys::socket::listen_unix_at(path)?;
        let identity = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Listener {
            inner,
            path: path.to_path_buf(),
            identity,
        })
    }

    /// The socket path bound, to report and to remove when dropped.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket, for accept and for polling.
    pub fn listener(&self) -> &UnixListener {
        &self.inner
    }

    /// Waits for one peer; `None` waits forever. A timeout is `ErrorKind::TimedOut`.
    pub fn accept(&self, timeout: Option<Duration>) -> io::Result<UnixStream> {
        if let Some(t) = timeout {
            let ms = i32::try_from(t.as_millis()).unwrap_or(i32::MAX);
            if !poll_readable(self.inner.as_fd(), ms)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no peer connected before the timeout",
                ));
            }
        }
        let (stream, _) = self.inner.accept()?;
        Ok(stream)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pv-listener-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.sock")
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let path = temp_path("live");
        // A stale socket: bound, then its listener closed without unlinking.
        drop(UnixListener::bind(&path).unwrap());
        let first = Listener::bind(&path, true).unwrap();
        let err = Listener::bind(&path, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists(), "the live socket is still there");
        drop(first);
        assert!(
            !path.exists(),
            "dropping the listener unlinks its own socket"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn drop_leaves_a_newer_socket_alone() {
        let path = temp_path("newer");
        let old = Listener::bind(&path, true).unwrap();
        // Someone replaced our path (removed it and bound their own).
        std::fs::remove_file(&path).unwrap();
        let newer = UnixListener::bind(&path).unwrap();
        drop(old);
        assert!(path.exists(), "the newer server's socket survives our drop");
        assert!(UnixStream::connect(&path).is_ok());
        drop(newer);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn the_path_appears_only_once_the_socket_listens() {
        let path = temp_path("race");
        // A client polls for the path and connects the moment it exists: with bind then
        // listen it could see the path and get ECONNREFUSED.
        for _ in 0..200 {
            let client = {
                let path = path.clone();
                std::thread::spawn(move || loop {
                    if path.exists() {
                        return UnixStream::connect(&path).map(|_| ());
                    }
                    std::thread::yield_now();
                })
            };
            let listener = Listener::bind(&path, true).unwrap();
            client
                .join()
                .unwrap()
                .expect("a visible path is always listening");
            drop(listener);
        }
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "no temporary names left: {leftovers:?}"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn other_files_are_never_touched() {
        let path = temp_path("file");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = Listener::bind(&path, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        let long = path.with_file_name("x".repeat(120));
        let err = Listener::bind(&long, true).unwrap_err();
        assert!(err.to_string().contains("shorter than 108 bytes"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
