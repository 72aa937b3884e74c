//! VDUSE, the kernel's userspace vDPA device (`/dev/vduse/control`, Linux 5.15+): a device
//! created here is a real virtio device of the kernel it runs on. Bound to `virtio_vdpa` it
//! becomes that kernel's own `/dev/vdX` (or network interface); bound to `vhost_vdpa` it is
//! a `/dev/vhost-vdpa-N` a VMM (or [`crate::vdpa::VhostVdpa`]) drives.
//!
//! ```text
//! VduseControl ── VDUSE_CREATE_DEV(name, features, config, queues) ──> /dev/vduse/NAME
//! VduseDevice (that node): VQ_SETUP per queue, then the request loop:
//!     read  vduse_dev_request  (SET_STATUS, GET_VQ_STATE, UPDATE_IOTLB)
//!     write vduse_dev_response
//!   data plane: VQ_GET_INFO (ring IOVAs), VQ_SETUP_KICKFD (our eventfd),
//!               VQ_INJECT_IRQ (no call eventfd in VDUSE), IOTLB_GET_FD + mmap (IovaSpace)
//! ```
//!
//! Same layer as [`crate::user`], [`crate::kern`] and [`crate::vdpa`]: it uses [`crate::sys`]
//! for fds and mappings and [`crate::memory`] for the IOVA-keyed memory map the rings read.

pub mod abi;
mod control;
mod device;
mod iova;
mod request;

pub use control::{DeviceSpec, VduseControl, CONTROL_PATH};
pub use device::VduseDevice;
pub use iova::IovaSpace;
pub use request::{Request, Response};

use std::io;

use crate::memory::MemoryError;

/// Everything VDUSE refuses. Each variant names the device (and the queue, the request or
/// the path) it is about, so an errno never reaches a user on its own.
#[derive(Debug, thiserror::Error)]
pub enum VduseError {
    /// `/dev/vduse/control` is missing: the module is not loaded (or the kernel lacks it).
    #[error("VDUSE not available: {path} is missing (modprobe vduse)")]
    NotAvailable {
        /// The path that was opened.
        path: String,
    },
    /// A device name the kernel cannot take: empty, too long, or with `/` or NUL in it.
    #[error("VDUSE device name {name:?}: {why}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// VDUSE_CREATE_DEV answered EEXIST.
    #[error("VDUSE device {name:?} already exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// VDUSE_DESTROY_DEV answered EBUSY: its node is open (a daemon serves it) or a vDPA
    /// device was made of it (`vdpa dev del NAME` first).
    #[error("VDUSE device {name:?} is in use (its /dev/vduse node is open, or a vDPA device still uses it: vdpa dev del {name})")]
    InUse {
        /// The name.
        name: String,
    },
    /// An ioctl, read or write failed; `source` is the kernel's errno.
    #[error("VDUSE device {device:?}: {op}: {source}")]
    Kernel {
        /// The device (or `control`).
        device: String,
        /// The ioctl or syscall (`"VDUSE_VQ_GET_INFO"`).
        op: &'static str,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// VDUSE_CREATE_DEV refused a device type the kernel does not let VDUSE create.
    #[error(
        "VDUSE device {device:?}: the kernel refused a virtio device of type {device_id} \
         (VDUSE_CREATE_DEV: {source}); VDUSE creates virtio-net (1) and virtio-blk (2) \
         devices only (Linux 6.12; later kernels add virtio-fs, 26)"
    )]
    TypeRefused {
        /// The device.
        device: String,
        /// The virtio device type asked for.
        device_id: u32,
        /// The kernel's errno (EINVAL).
        #[source]
        source: io::Error,
    },
    /// A queue index outside the device's queue count (from a caller or a kernel request).
    #[error(
        "VDUSE device {device:?}: {what}: queue {queue} does not exist (the device has {count})"
    )]
    BadQueue {
        /// The device.
        device: String,
        /// What named the queue (a request or a call).
        what: &'static str,
        /// The index given.
        queue: u32,
        /// How many queues the device has.
        count: u32,
    },
    /// A request read from the device that this crate cannot take (short, unknown type).
    #[error("VDUSE device {device:?}: malformed request: {why}")]
    Malformed {
        /// The device.
        device: String,
        /// What is wrong with it.
        why: String,
    },
    /// An argument refused before any syscall (configuration too large, queue size 0).
    #[error("VDUSE device {device:?}: {why}")]
    Invalid {
        /// The device.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// An IOVA range the kernel described could not be mapped.
    #[error("VDUSE device {device:?}: IOVA {start:#x}..={last:#x}: {source}")]
    Memory {
        /// The device.
        device: String,
        /// First IOVA of the range.
        start: u64,
        /// Last IOVA of the range.
        last: u64,
        /// Why the memory layer refused it.
        #[source]
        source: MemoryError,
    },
}

impl VduseError {
    /// The errno of the failed syscall, if this error is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VduseError::Kernel { source, .. } | VduseError::TypeRefused { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    pub(crate) fn last_os(device: &str, op: &'static str) -> Self {
        VduseError::Kernel {
            device: device.to_owned(),
            op,
            source: io::Error::last_os_error(),
        }
    }
}

/// The result of a VDUSE call.
pub type Result<T> = std::result::Result<T, VduseError>;
