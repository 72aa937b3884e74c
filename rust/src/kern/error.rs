//! Errors of the kernel vhost and vDPA layers: a failed syscall keeps the kernel's errno
//! and names the request that failed; arguments refused before any syscall say why.

use std::io;

/// Everything the kernel and vDPA families refuse: each names the ioctl (`op`) that failed, so
/// the kernel's errno is never reported without it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ioctl, read or write on the device failed; `source` carries the kernel's errno.
    #[error("{op}: {source}")]
    Kernel {
        /// The ioctl or syscall's name (`"VHOST_SET_VRING_ADDR"`).
        op: &'static str,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// An argument the kernel ABI cannot carry, refused before any syscall.
    #[error("{0}")]
    InvalidParam(String),
    /// `dma_unmap` of a range where nothing was mapped through `dma_map`.
    #[error("IOVA range {iova:#x}+{size:#x} (address space {asid}) is not mapped")]
    NotMapped {
        /// Start of the range.
        iova: u64,
        /// Its length in bytes.
        size: u64,
        /// The address space it was asked of.
        asid: u32,
    },
    /// The kernel moved fewer bytes of an IOTLB message than the message has.
    #[error("{op}: the kernel transferred {got} of {want} bytes")]
    ShortTransfer {
        /// The transfer's name.
        op: &'static str,
        /// Bytes the kernel moved.
        got: usize,
        /// Bytes the message has.
        want: usize,
    },
    /// A message read from the device that is not an IOTLB message of a known layout.
    #[error("malformed message from the device: {0}")]
    Malformed(String),
}

impl Error {
    /// The errno of the failed syscall, if this error is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn last_os(op: &'static str) -> Self {
        Error::Kernel {
            op,
            source: io::Error::last_os_error(),
        }
    }

    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Error::Kernel { op, source }
    }
}

/// Shorthand for the family's results.
pub type Result<T> = std::result::Result<T, Error>;
