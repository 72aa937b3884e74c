//! The one error type of the vring layer.

use crate::memory::MemoryError;

/// Everything a virtqueue can refuse. Errors caused by what the peer wrote into shared
/// memory (a corrupt descriptor, index or used element) also mark the queue broken: every
/// later data-path call returns [`VringError::Broken`] until the queue is rebuilt, so a
/// hostile peer cannot make us re-process or half-process anything. Errors caused by the
/// local caller (a full queue, a bad `add_used` argument, a bad layout) leave the queue
/// usable.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// Split: not a power of two in 1..=32768; packed: not in 1..=32768 (ADVERSARIAL D1).
    #[error("invalid queue size {0}: a ring has 1 to 32768 entries, a power of two when split")]
    InvalidSize(u32),
    /// A SET_VRING_BASE value that does not fit the ring format (a split base above 16 bits).
    #[error("ring base {0:#x} does not fit the ring format")]
    InvalidBase(u32),
    /// A ring area is not aligned as the spec requires (D3).
    #[error("{area} address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which area ("descriptor table", "avail ring", ...), so the peer's bug is found.
        area: &'static str,
        /// The address the peer gave.
        addr: u64,
        /// The alignment the spec asks of that area.
        align: u64,
    },
    /// A ring area, descriptor buffer or indirect table is not backed by guest memory, or
    /// its address plus length overflows (D4, E3, E12, F6).
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A chain revisits a descriptor: more steps than there are descriptors (E1, E4).
    #[error("descriptor loop in chain starting at {head}")]
    DescriptorLoop {
        /// The chain's head, to name the offending buffer.
        head: u16,
    },
    /// An indirect table contains an INDIRECT descriptor (E5).
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// A descriptor has both INDIRECT and NEXT (E5).
    #[error("descriptor has both INDIRECT and NEXT")]
    IndirectWithNext,
    /// INDIRECT used without VIRTIO_F_INDIRECT_DESC.
    #[error("indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    /// Indirect table length 0 or not a multiple of 16 (E5, F4).
    #[error("indirect table length {len} is 0 or not a multiple of 16")]
    IndirectInvalid {
        /// The table length the driver wrote.
        len: u32,
    },
    /// A chain (counting indirect entries) has more descriptors than the queue size (E5, F3).
    #[error("chain starting at {head} is longer than the queue size {max}")]
    ChainTooLong {
        /// The chain's head.
        head: u16,
        /// The queue size, the most descriptors a chain may have.
        max: u16,
    },
    /// The chain's total length does not fit in u32 (E8).
    #[error("total length of chain starting at {head} exceeds u32::MAX")]
    LengthOverflow {
        /// The chain's head.
        head: u16,
    },
    /// A device-readable descriptor follows a device-writable one (E10: rejected).
    #[error("readable descriptor after a writable one in chain starting at {head}")]
    ReadableAfterWritable {
        /// The chain's head.
        head: u16,
    },
    /// A descriptor index or buffer id is not below the queue size (E2, F1, E11).
    #[error("head or buffer id {head} is out of range for queue size {size}")]
    InvalidHead {
        /// The index or id the peer wrote (u32: a used element's id is 32 bits wide).
        head: u32,
        /// The queue size it had to be below.
        size: u16,
    },
    /// The driver offered a head (split) or buffer id (packed) that is still in flight (E7, F1).
    #[error("head or buffer id {head} offered again while still in flight")]
    HeadInFlight {
        /// The head or buffer id offered twice.
        head: u16,
    },
    /// avail.idx moved by more than the queue size since we last looked (E6).
    #[error("avail index {avail} is more than queue size {size} ahead of {next}")]
    InvalidAvailIndex {
        /// The avail.idx the driver wrote.
        avail: u16,
        /// The next avail entry we would have read.
        next: u16,
        /// The queue size, the most it may move.
        size: u16,
    },
    /// used.idx moved by more than the number of buffers in flight (driver side).
    #[error("used index {used} is inconsistent with {last} and {in_flight} buffers in flight")]
    InvalidUsedIndex {
        /// The used.idx the device wrote.
        used: u16,
        /// The used index we had consumed up to.
        last: u16,
        /// Buffers we had handed to the device, the most used.idx may move.
        in_flight: u16,
    },
    /// A used element names a buffer not in flight or reports more bytes than the buffer
    /// could take (E11; on the device side this is a caller error and is not sticky).
    #[error("invalid used element id {id} len {len}: {reason}")]
    InvalidUsed {
        /// The element's id.
        id: u32,
        /// The element's length.
        len: u32,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// Packed: a descriptor in the middle of a chain is not available (F2) or the ring
    /// holds a chain the driver never finished.
    #[error("packed chain starting at slot {slot} is incomplete")]
    IncompleteChain {
        /// The ring slot the chain starts at.
        slot: u16,
    },
    /// Packed: the driver made more descriptors available than the ring has room for
    /// beside those already in flight.
    #[error("driver overran the ring: {in_flight} descriptors in flight, queue size {size}")]
    Overrun {
        /// Descriptors in flight counting the new ones.
        in_flight: u32,
        /// The queue size they had to fit in.
        size: u16,
    },
    /// Driver side: not enough free descriptors (or ids) for the buffer.
    #[error("queue full: {needed} descriptors needed, {free} free")]
    QueueFull {
        /// Descriptors (or ids) the buffer needs.
        needed: usize,
        /// Descriptors (or ids) free now.
        free: usize,
    },
    /// Driver side: a buffer with no segments.
    #[error("a buffer needs at least one segment")]
    EmptyChain,
    /// A previous error stopped the queue.
    #[error("queue is broken by an earlier error")]
    Broken,
    /// An IOTLB miss on a ring area after a pop had consumed its chain (its suppression
    /// field): the pop cannot be retried, so the queue breaks. The ring areas are checked
    /// against a view before a queue runs on it to rule this out
    /// ([`RingLayout::check_memory`](super::RingLayout::check_memory)).
    #[error("IOTLB miss at I/O virtual address {iova:#x} after the chain was popped")]
    MissAfterPop {
        /// The address that missed.
        iova: u64,
    },
}

impl VringError {
    /// A miss past the point where a pop consumed its chain becomes
    /// [`MissAfterPop`](Self::MissAfterPop), which breaks the queue like any other error.
    pub(crate) fn consumed(self) -> Self {
        match self.iotlb_miss() {
            Some((iova, _)) => VringError::MissAfterPop { iova },
            None => self,
        }
    }

    /// The I/O virtual address and access of an IOTLB miss, if this is one.
    pub fn iotlb_miss(&self) -> Option<(u64, crate::memory::Access)> {
        match self {
            VringError::Memory(MemoryError::IotlbMiss { iova, access }) => Some((*iova, *access)),
            _ => None,
        }
    }

    /// True for an IOTLB miss. A pop that misses (on a descriptor, an indirect table or a
    /// buffer) has consumed nothing and leaves the queue working: pop again once the IOMMU
    /// side has sent the translation. Any other operation that misses breaks the queue
    /// like any memory error, so the ring areas must be mapped before a queue runs in a
    /// view ([`RingLayout::check_memory`](super::RingLayout::check_memory)), and the pop's
    /// own index updates (split `avail_event`, packed event area) lie in them.
    pub fn is_iotlb_miss(&self) -> bool {
        self.iotlb_miss().is_some()
    }
}

/// Shorthand for the layer's results.
pub type Result<T> = std::result::Result<T, VringError>;

/// Whether a queue is broken. The first error that came from shared memory sets it for
/// good: every later data-path call returns [`VringError::Broken`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Health {
    broken: bool,
}

impl Health {
    pub(crate) fn is_broken(self) -> bool {
        self.broken
    }

    pub(crate) fn check(self) -> Result<()> {
        if self.broken {
            Err(VringError::Broken)
        } else {
            Ok(())
        }
    }

    /// Passes `r` through, marking the queue broken if it is an error.
    pub(crate) fn sticky<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// [`sticky`](Self::sticky) for a pop, which consumes nothing before its chain is
    /// complete: an IOTLB miss leaves the queue working, since nothing the peer wrote is
    /// wrong yet; the caller asks the IOMMU side and pops again (see
    /// [`VringError::is_iotlb_miss`]).
    pub(crate) fn sticky_pop<T>(&mut self, r: Result<T>) -> Result<T> {
        match &r {
            Err(e) if e.is_iotlb_miss() => r,
            _ => self.sticky(r),
        }
    }
}
