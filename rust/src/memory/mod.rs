//! Guest RAM as both sides of vhost-user see it: regions backed by fds (memfds) shared
//! between front-end and back-end, and an immutable map from guest-physical and
//! front-end-virtual addresses to local pointers.
//!
//! Every region description comes from a peer we do not trust, so everything that could
//! overflow, overlap or point past the file is rejected up front (ADVERSARIAL C2-C8).

pub mod dirty_log;
pub mod guest;
pub mod iotlb;
pub mod region;

pub use guest::GuestMemory;
pub use iotlb::{Iotlb, IotlbError, Translation};
pub use region::{GuestRegion, RegionInfo};

use std::io;

/// Which address space a region field or an overlap refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Guest-physical addresses (`guest_phys_addr`).
    GuestPhysical,
    /// The front-end's virtual addresses (`userspace_addr`).
    FrontendVirtual,
    /// Offsets in the backing file (`mmap_offset`).
    FileOffset,
    /// I/O virtual addresses: what a device behind an IOMMU uses (`VIRTIO_F_ACCESS_PLATFORM`),
    /// translated through an [`Iotlb`].
    IoVirtual,
}

impl std::fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddressSpace::GuestPhysical => "guest physical address",
            AddressSpace::FrontendVirtual => "front-end user address",
            AddressSpace::FileOffset => "mmap offset",
            AddressSpace::IoVirtual => "I/O virtual address",
        })
    }
}

/// What a device does with guest memory: checked against a translation's [`Perm`], and
/// named in an IOTLB miss so the IOMMU side can grant the right permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads (ring indexes and descriptors, device-readable buffers).
    Read,
    /// The device writes (the used ring, device-writable buffers).
    Write,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// What a device may do through a mapping: the `VHOST_ACCESS_*` values of an IOTLB entry
/// (`RO` 1, `WO` 2, `RW` 3). A memory table region is always [`ReadWrite`](Perm::ReadWrite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// `VHOST_ACCESS_RO`: the device may only read (a buffer the driver sends out).
    ReadOnly = 1,
    /// `VHOST_ACCESS_WO`: the device may only write.
    WriteOnly = 2,
    /// `VHOST_ACCESS_RW`.
    ReadWrite = 3,
}

impl Perm {
    /// The permission of a `VHOST_ACCESS_*` value; 0 (no access, which would map nothing)
    /// and unknown bits are refused.
    pub fn from_bits(bits: u8) -> Result<Self, IotlbError> {
        match bits {
            1 => Ok(Perm::ReadOnly),
            2 => Ok(Perm::WriteOnly),
            3 => Ok(Perm::ReadWrite),
            other => Err(IotlbError::BadPerm(other)),
        }
    }

    /// The `VHOST_ACCESS_*` value.
    pub fn bits(self) -> u8 {
        self as u8
    }

    /// True if `access` is allowed.
    #[inline]
    pub fn allows(self, access: Access) -> bool {
        let need = match access {
            Access::Read => 1,
            Access::Write => 2,
        };
        (self as u8) & need != 0
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Perm::ReadOnly => "read-only",
            Perm::WriteOnly => "write-only",
            Perm::ReadWrite => "read-write",
        })
    }
}

/// Everything the memory layer refuses. Each error comes from a region table, an fd or an
/// address the peer sent, so the variants name the address space and values it got wrong.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region of size 0 (it would alias its neighbour's start address).
    #[error("memory region has size 0")]
    ZeroSize,
    /// start + size does not fit in u64 (CVE-2020-10722 class).
    #[error("{space} {start:#x} + size {size:#x} overflows")]
    Overflow {
        /// Which address space overflowed.
        space: AddressSpace,
        /// The region's start in that space.
        start: u64,
        /// The region's size.
        size: u64,
    },
    /// Two regions share addresses, which would make translation ambiguous.
    #[error("regions overlap in {space}: {first:#x} and {second:#x}")]
    Overlap {
        /// Which address space the overlap is in.
        space: AddressSpace,
        /// Start of one of the two regions.
        first: u64,
        /// Start of the other.
        second: u64,
    },
    /// [addr, addr+len) is not inside one region (or, for copies, not fully backed).
    #[error("address range {addr:#x}+{len:#x} is not backed by guest memory")]
    OutOfRange {
        /// The first address of the access.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// No region maps this address (a translation between address spaces).
    #[error("{space} {addr:#x} is in no memory region")]
    Unmapped {
        /// The address space `addr` is in.
        space: AddressSpace,
        /// The address.
        addr: u64,
    },
    /// An I/O virtual address with no IOTLB translation (a view of an [`Iotlb`]): not a
    /// fault of the peer yet, the caller asks the IOMMU side (`BACKEND_IOTLB_MSG` miss) and
    /// retries once the update arrives.
    #[error("no IOTLB translation for a device {access} at I/O virtual address {iova:#x}")]
    IotlbMiss {
        /// The first address of the access that has no translation.
        iova: u64,
        /// What the device was doing there.
        access: Access,
    },
    /// The translation exists but does not allow the access (a device write through a
    /// read-only mapping): the request fails, no byte is written.
    #[error("device {access} at {space} {addr:#x}+{len:#x} denied: the mapping is {perm}")]
    AccessDenied {
        /// The address space of `addr`.
        space: AddressSpace,
        /// The first address of the access.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// What the device tried.
        access: Access,
        /// What the mapping allows.
        perm: Perm,
    },
    /// The backing file is smaller than the region claims: touching the tail would SIGBUS.
    #[error("file of {file_size:#x} bytes is too small for offset {offset:#x} + size {size:#x}")]
    FileTooSmall {
        /// The region's offset in the fd.
        offset: u64,
        /// The region's size.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The fd of a region is not sealed against shrinking, and sealed memory is required:
    /// the front-end could truncate it later and turn our next access into a SIGBUS (J8).
    #[error(
        "memory fd is not sealed against shrinking (F_SEAL_SHRINK) and sealed memory is required"
    )]
    Unsealed,
    /// More regions than the table can hold (the protocol's slot count or the caller's cap).
    #[error("too many memory regions (maximum {max})")]
    TooManyRegions {
        /// The most regions the protocol or the caller allows.
        max: usize,
    },
    /// A removal named a region that is not there exactly (absent or only partly matching).
    #[error("no region at {guest_phys_addr:#x} with size {memory_size:#x}")]
    NoSuchRegion {
        /// The start the removal named.
        guest_phys_addr: u64,
        /// The size the removal named.
        memory_size: u64,
    },
    /// mmap refused the fd: e.g. ENODEV for an eventfd or socket, EACCES for a read-only fd.
    #[error("cannot map region: {0}")]
    Map(io::Error),
    /// A system call on a region's fd failed (fstat, seals).
    #[error(transparent)]
    Io(#[from] io::Error),
}
