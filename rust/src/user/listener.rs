//! A listening vhost-user socket path, for whichever side plays server.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys::scm::poll_readable;

/// Binds a Unix socket path and unlinks it again on drop, so a crashed or finished server
/// leaves nothing behind that would make the next `bind` fail.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// With `replace_stale`, an existing *socket* at `path` is removed first (a leftover of
    /// a dead server); any other kind of file is never touched.
    pub fn bind(path: &Path, replace_stale: bool) -> io::Result<Self> {
        if replace_stale {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.file_type().is_socket() {
                    std::fs::remove_file(path)?;
                }
            }
        }
        let inner = UnixListener::bind(path)?;
        Ok(Listener {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

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
        let _ = std::fs::remove_file(&self.path);
    }
}
