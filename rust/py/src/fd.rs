//! Fds crossing the boundary. Fds we hand to Python are owned objects that close on
//! `close()` or collection; fds Python hands to us are borrowed for the call and, when we
//! must keep one, duplicated, so Python keeps ownership of its own.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use pyo3::prelude::*;

use crate::errors::{closed, invalid_param, IntoPyResult};

/// An fd owned by Python code: received from the peer, closed when dropped.
#[pyclass(module = "vhost._core", frozen)]
pub struct FileDescriptor {
    fd: Mutex<Option<OwnedFd>>,
}

impl FileDescriptor {
    pub fn new(fd: OwnedFd) -> Self {
        FileDescriptor {
            fd: Mutex::new(Some(fd)),
        }
    }
}

closing_pymethods!(FileDescriptor, close() {
    fn fileno(&self) -> PyResult<RawFd> {
        match &*self.fd.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(fd) => Ok(fd.as_raw_fd()),
            None => Err(closed("file descriptor")),
        }
    }

    /// Gives up ownership: the caller must close the returned number.
    fn detach(&self) -> PyResult<RawFd> {
        use std::os::fd::IntoRawFd;
        match self.fd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(fd) => Ok(fd.into_raw_fd()),
            None => Err(closed("file descriptor")),
        }
    }

    fn close(&self) {
        self.fd.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.fd.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    fn __repr__(&self) -> String {
        match &*self.fd.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(fd) => format!("<FileDescriptor {}>", fd.as_raw_fd()),
            None => "<FileDescriptor closed>".into(),
        }
    }
});

/// The fd number of an int or of any object with `fileno()`.
pub fn raw_fd_of(obj: &Bound<'_, PyAny>) -> PyResult<RawFd> {
    let n: i64 = if let Ok(n) = obj.extract::<i64>() {
        n
    } else {
        obj.call_method0("fileno")
            .map_err(|_| invalid_param("expected an int fd or an object with fileno()"))?
            .extract()?
    };
    let fd = RawFd::try_from(n).map_err(|_| invalid_param(format!("{n} is not an fd")))?;
    if fd < 0 {
        return Err(invalid_param(format!("{fd} is not an fd")));
    }
    // Reject closed numbers here rather than letting sendmsg fail obscurely.
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error()).py_err();
    }
    Ok(fd)
}

/// An optional fd argument (None: no fd, as in a vring without kick/call).
pub fn opt_fd(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<RawFd>> {
    obj.map(raw_fd_of).transpose()
}

/// Borrows a raw fd for the duration of a call. The caller keeps it open by holding the
/// Python object that owns it, and we never keep the borrow.
pub fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: `raw_fd_of` checked the fd is open; every caller uses the borrow only within
    // the current call, while the Python object that owns the fd is still referenced.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// A private duplicate of a Python-owned fd, for fds we must keep.
pub fn dup_of(obj: &Bound<'_, PyAny>) -> PyResult<OwnedFd> {
    let fd = raw_fd_of(obj)?;
    // SAFETY: F_DUPFD_CLOEXEC on an fd checked to be open; the result is a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error()).py_err();
    }
    // SAFETY: `new` is a freshly duplicated fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A native resource (an fd, a mapping) that Python may close while another thread is
/// using it: `get` hands out an `Arc` that keeps it open through a call racing a
/// `close`, and after `close` every `get` is `ClosedError` naming `what`. One place for
/// what `EventFd`, `FaultResolver`, `DirtyLog`, `KernelDevice` and `VdpaDevice` share.
pub struct Closable<T> {
    inner: std::sync::RwLock<Option<std::sync::Arc<T>>>,
    what: &'static str,
}

impl<T> Closable<T> {
    pub fn new(what: &'static str, value: T) -> Self {
        Self::from_arc(what, std::sync::Arc::new(value))
    }

    pub fn from_arc(what: &'static str, value: std::sync::Arc<T>) -> Self {
        Closable {
            inner: std::sync::RwLock::new(Some(value)),
            what,
        }
    }

    /// The resource, or `ClosedError`.
    pub fn get(&self) -> PyResult<std::sync::Arc<T>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| closed(self.what))
    }

    /// Drops this handle's reference: the resource is released once no call uses it.
    pub fn close(&self) {
        self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn closed(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
}

/// `#[pymethods]` for a class whose objects are context managers: the methods given,
/// plus `__enter__` (the object itself) and `__exit__` (its `close`, which takes the GIL
/// token when written `close(py)`), so `with obj:` never leaks what the object holds and
/// the two methods are written once.
macro_rules! closing_pymethods {
    ($class:ty, close() { $($own:tt)* }) => {
        $crate::fd::closing_pymethods!(@impl $class, |this, _py| this.close(), { $($own)* });
    };
    ($class:ty, close(py) { $($own:tt)* }) => {
        $crate::fd::closing_pymethods!(@impl $class, |this, py| this.close(py), { $($own)* });
    };
    (@impl $class:ty, |$this:ident, $py:ident| $close:expr, { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            $($own)*

            fn __enter__(slf: Py<Self>) -> Py<Self> {
                slf
            }

            fn __exit__(
                &self,
                $py: Python<'_>,
                _t: Option<Bound<'_, PyAny>>,
                _v: Option<Bound<'_, PyAny>>,
                _tb: Option<Bound<'_, PyAny>>,
            ) {
                let $this = self;
                $close
            }
        }
    };
}
pub(crate) use closing_pymethods;
