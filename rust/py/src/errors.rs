//! The single conversion from core errors to Python exceptions. The exception classes
//! belong to Python (`vhost.errors`), so their docs and hierarchy live in one place.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use vhost_core::kern::Error as KernError;
use vhost_core::memory::dirty_log::DirtyLogError;
use vhost_core::memory::MemoryError;
use vhost_core::sys::socket::{errno_of, reason_of};
use vhost_core::sys::PathError;
use vhost_core::user::Error as UserError;
use vhost_core::vduse::VduseError;
use vhost_core::vring::VringError;

pub(crate) fn raise<'py>(
    py: Python<'py>,
    class: &str,
    args: impl IntoPyObject<'py, Target = PyTuple, Output = Bound<'py, PyTuple>>,
) -> PyErr {
    let made = py
        .import("vhost.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1(args.into_pyobject(py).map_err(Into::<PyErr>::into)?));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

pub fn user_error(err: UserError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        match err {
            UserError::Disconnected => raise(py, "DisconnectedError", (msg,)),
            UserError::PartialMessage(_) => raise(py, "PartialMessageError", (msg,)),
            UserError::InactiveFeature { request, feature } => {
                raise(py, "InactiveFeatureError", (request, feature, msg))
            }
            UserError::NotSupported(request) => raise(py, "NotSupportedError", (msg, request)),
            UserError::NotOffered { request, .. } => raise(py, "NotSupportedError", (msg, request)),
            UserError::Refused { request, status } => {
                raise(py, "RequestRefusedError", (request, status, msg))
            }
            UserError::Timeout | UserError::ReplyTimeout { .. } => {
                raise(py, "VhostTimeoutError", (msg,))
            }
            UserError::Closed => raise(py, "ClosedError", (msg,)),
            UserError::Handler(_) => raise(py, "VhostError", (msg,)),
            UserError::Memory(m) => memory_error(m),
            UserError::Io(e) => os_error(py, e),
            UserError::InvalidParam(_) => raise(py, "InvalidParamError", (msg,)),
            _ => raise(py, "ProtocolError", (msg,)),
        }
    })
}

/// A virtqueue error: a bad layout is `InvalidQueueError`, memory is `InvalidMemoryError`,
/// a full queue `QueueFullError`, an empty buffer `InvalidParamError`; everything else is
/// what the peer wrote into the ring (the queue is broken afterwards): `QueueError`.
pub fn vring_error(err: VringError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        match err {
            VringError::Memory(m) => memory_error(m),
            VringError::InvalidSize(_) | VringError::Misaligned { .. } => {
                raise(py, "InvalidQueueError", (msg,))
            }
            VringError::QueueFull { .. } => raise(py, "QueueFullError", (msg,)),
            VringError::EmptyChain => raise(py, "InvalidParamError", (msg,)),
            _ => raise(py, "QueueError", (msg,)),
        }
    })
}

/// A virtqueue error from a call whose arguments the queue checks without reading the ring
/// (`add_used`, `add`, setting the base): a refused head, id, length or position is the
/// caller's `InvalidParamError`, not a corrupt ring.
pub fn vring_caller_error(err: VringError) -> PyErr {
    match err {
        VringError::InvalidHead { .. }
        | VringError::InvalidBase(_)
        | VringError::InvalidUsed { .. }
        | VringError::LengthOverflow { .. } => invalid_param(err.to_string()),
        _ => vring_error(err),
    }
}

/// A guest-memory error is `InvalidMemoryError`, with the address when it names one.
pub fn memory_error(err: MemoryError) -> PyErr {
    let address = match err {
        MemoryError::OutOfRange { addr, .. } | MemoryError::Unmapped { addr, .. } => Some(addr),
        _ => None,
    };
    Python::attach(|py| raise(py, "InvalidMemoryError", (err.to_string(), address)))
}

/// An OS error becomes `KernelError` (a subclass of both `VhostError` and `OSError`).
pub fn os_error(py: Python<'_>, err: std::io::Error) -> PyErr {
    let errno = err.raw_os_error().unwrap_or(libc::EIO);
    raise(py, "KernelError", (errno, err.to_string()))
}

/// A failed operation on a socket path (connect, bind) becomes a `VhostOSError`, whose
/// constructor picks the subclass for the errno (`VhostFileNotFoundError` for ENOENT,
/// `VhostTimeoutError` for ETIMEDOUT...), with `filename` the path and `operation` what
/// was tried.
pub fn path_error(err: PathError) -> PyErr {
    Python::attach(|py| {
        let made = py
            .import("vhost.errors")
            .and_then(|m| m.getattr("VhostOSError"))
            .and_then(|cls| {
                let kwargs = PyDict::new(py);
                kwargs.set_item("operation", err.op)?;
                cls.call(
                    (err.errno, &err.reason, err.path.as_os_str()),
                    Some(&kwargs),
                )
            });
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        }
    })
}

/// A dirty-log error as a Python exception: creating the memfd is a `KernelError` with its
/// errno; everything about sizes, offsets, the fd and addresses is `InvalidMemoryError`
/// (the log is guest-memory metadata), with the guest address when there is one.
pub fn log_error(err: DirtyLogError) -> PyErr {
    let address = match &err {
        DirtyLogError::Create(_) => None,
        DirtyLogError::OutOfRange { gpa, .. } => Some(*gpa),
        DirtyLogError::TooSmall { guest_end, .. } => Some(*guest_end),
        _ => None,
    };
    if let DirtyLogError::Create(e) = err {
        return io_error(e);
    }
    let msg = err.to_string();
    Python::attach(|py| raise(py, "InvalidMemoryError", (msg, address)))
}

pub fn io_error(err: std::io::Error) -> PyErr {
    Python::attach(|py| os_error(py, err))
}

pub fn invalid_param(msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::attach(|py| raise(py, "InvalidParamError", (msg,)))
}

pub fn closed(what: &str) -> PyErr {
    let msg = format!("{what} is closed");
    Python::attach(|py| raise(py, "ClosedError", (msg,)))
}

/// The one conversion of the `VhostBackend` interface's error: each family's error keeps
/// its own conversion ([`user_error`], [`kern_error`]).
pub fn core_error(err: vhost_core::Error) -> PyErr {
    match err {
        vhost_core::Error::User(e) => user_error(e),
        vhost_core::Error::Kern(e) => kern_error(e),
    }
}

/// Extension so call sites read `core_call().py_err()?`.
pub trait IntoPyResult<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, UserError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(user_error)
    }
}

impl<T> IntoPyResult<T> for vhost_core::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(core_error)
    }
}

impl<T> IntoPyResult<T> for Result<T, KernError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(kern_error)
    }
}

impl<T> IntoPyResult<T> for Result<T, MemoryError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(memory_error)
    }
}

impl<T> IntoPyResult<T> for Result<T, VringError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(vring_error)
    }
}

impl<T> IntoPyResult<T> for Result<T, PathError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(path_error)
    }
}

impl<T> IntoPyResult<T> for std::io::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(io_error)
    }
}

/// The one conversion of kernel vhost and vDPA errors: a failed syscall is `KernelError`
/// with the kernel's errno; a refused argument `InvalidParamError`; an unmap of nothing
/// `InvalidMemoryError`.
pub fn kern_error(err: KernError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        match err {
            KernError::Kernel { op, source } => {
                let errno = errno_of(&source);
                // "VHOST_SET_OWNER: Device or resource busy", without std's "(os error N)":
                // OSError already shows the errno.
                let reason = reason_of(&source);
                raise(py, "KernelError", (errno, format!("{op}: {reason}")))
            }
            KernError::InvalidParam(_) => raise(py, "InvalidParamError", (msg,)),
            KernError::NotMapped { iova, .. } => raise(py, "InvalidMemoryError", (msg, iova)),
            KernError::ShortTransfer { .. } => raise(py, "KernelError", (libc::EIO, msg)),
            KernError::Malformed(_) => raise(py, "KernelError", (libc::EPROTO, msg)),
        }
    })
}

/// The one conversion of VDUSE errors: a failed syscall (and EEXIST/EBUSY, typed in the
/// core) is `KernelError` with the kernel's errno; VDUSE missing is `NotSupportedError`;
/// a refused name, queue or argument `InvalidParamError`; an IOVA range that cannot be
/// mapped `InvalidMemoryError`. Every message names the device.
pub fn vduse_error(err: VduseError) -> PyErr {
    Python::attach(|py| {
        let msg = err.to_string();
        match err {
            VduseError::Kernel { source, .. } | VduseError::TypeRefused { source, .. } => {
                raise(py, "KernelError", (errno_of(&source), msg))
            }
            VduseError::Exists { .. } => raise(py, "KernelError", (libc::EEXIST, msg)),
            VduseError::InUse { .. } => raise(py, "KernelError", (libc::EBUSY, msg)),
            VduseError::NotAvailable { .. } => raise(py, "NotSupportedError", (msg, "VDUSE")),
            VduseError::Malformed { .. } => raise(py, "KernelError", (libc::EPROTO, msg)),
            VduseError::Memory { start, .. } => raise(py, "InvalidMemoryError", (msg, start)),
            VduseError::BadName { .. }
            | VduseError::BadQueue { .. }
            | VduseError::Invalid { .. } => raise(py, "InvalidParamError", (msg,)),
        }
    })
}
