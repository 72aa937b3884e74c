//! One region of guest RAM: its description (as carried by SET_MEM_TABLE / ADD_MEM_REG),
//! the fd backing it and our mapping of that fd.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use std::sync::Arc;

use super::{AddressSpace, MemoryError, Perm};
use crate::sys::mmap::FrontEndMapError;
use crate::sys::{memfd_create, Mapping};

/// A region as the vhost-user protocol describes it (`VhostUserMemoryRegion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// Where the region starts for the guest: what ring and buffer addresses use.
    pub guest_phys_addr: u64,
    /// Its size in bytes.
    pub memory_size: u64,
    /// Where the front-end mapped it: what vhost-user ring addresses use
    /// (VHOST_USER_SET_VRING_ADDR).
    pub userspace_addr: u64,
    /// Where the region starts in its fd.
    pub mmap_offset: u64,
}

impl RegionInfo {
    /// Rejects size 0 and any start + size that overflows u64 (C2), so that every later
    /// `end()` computation is plain arithmetic.
    pub fn check(&self) -> Result<(), MemoryError> {
        if self.memory_size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        for (space, start) in [
            (AddressSpace::GuestPhysical, self.guest_phys_addr),
            (AddressSpace::FrontendVirtual, self.userspace_addr),
            (AddressSpace::FileOffset, self.mmap_offset),
        ] {
            if start.checked_add(self.memory_size).is_none() {
                return Err(MemoryError::Overflow {
                    space,
                    start,
                    size: self.memory_size,
                });
            }
        }
        Ok(())
    }

    /// Exclusive end in guest-physical space (no overflow once `check` passed).
    pub(crate) fn gpa_end(&self) -> u64 {
        self.guest_phys_addr + self.memory_size
    }

    /// Exclusive end in front-end virtual space (no overflow once `check` passed).
    pub(crate) fn user_end(&self) -> u64 {
        self.userspace_addr + self.memory_size
    }
}

/// A mapped region. The fd is kept so a front-end can pass it on (SET_MEM_TABLE) and a
/// back-end can hand it to Python; the mapping lives exactly as long as this object.
///
/// A region is either a mapping of its own (the front-end's memory table) or a window into
/// another region (an IOTLB translation: [`GuestRegion::window`]), which keeps that region
/// and so its mapping alive. Both are read through the same cached base pointer, so the
/// flat table's data path does not look at which kind it has.
#[derive(Debug)]
pub struct GuestRegion {
    info: RegionInfo,
    /// Host address of the region's first byte (of `backing`'s mapping), cached so that
    /// [`as_ptr`](Self::as_ptr) is one load for both kinds.
    base: usize,
    /// What the device may do here: read-write for a memory table region, the IOTLB
    /// entry's permission for a window.
    perm: Perm,
    backing: Backing,
}

/// Where a region's bytes come from.
#[derive(Debug)]
enum Backing {
    /// Our own mapping of the fd; `_mapping` is held for its Drop (the munmap), the data
    /// path reads through the cached base pointer.
    Mapped { fd: OwnedFd, _mapping: Mapping },
    /// A window into a mapped region: kept alive by this Arc.
    Window { parent: Arc<GuestRegion> },
}

#[allow(clippy::len_without_is_empty)] // a region is never empty: size 0 is rejected
impl GuestRegion {
    /// Maps `fd` at info.mmap_offset for info.memory_size, read-write, through the one path
    /// for front-end fds ([`Mapping::map_front_end`]: the sealed-memory policy when
    /// `require_sealed`, then the range checks); validates info and the file size first.
    ///
    /// The file-size check (C5) turns a short memfd into an error now instead of a SIGBUS
    /// on first touch. Front-ends that use our `allocate` also seal the size, so it cannot
    /// shrink later either; an unsealed file from another front-end could still be
    /// truncated after this check, which is the documented SIGBUS risk (J8).
    pub fn map(info: RegionInfo, fd: OwnedFd, require_sealed: bool) -> Result<Self, MemoryError> {
        info.check()?;
        if let Some(file_size) = crate::sys::memfd::regular_file_size(fd.as_fd())? {
            // check() guarantees mmap_offset + memory_size does not overflow.
            if info.mmap_offset + info.memory_size > file_size {
                return Err(MemoryError::FileTooSmall {
                    offset: info.mmap_offset,
                    size: info.memory_size,
                    file_size,
                });
            }
        }
        let mapping = Mapping::map_front_end(
            fd.as_fd(),
            info.mmap_offset,
            info.memory_size,
            require_sealed,
        )
        .map_err(|e| match e {
            FrontEndMapError::Unsealed => MemoryError::Unsealed,
            FrontEndMapError::Map(e) => MemoryError::Map(e),
        })?;
        Ok(Self::mapped(info, fd, mapping))
    }

    /// Maps `fd`, a file a kernel hands out for one translated range (VDUSE's
    /// `VDUSE_IOTLB_GET_FD`), for what `perm` lets the device do: without `PROT_WRITE`
    /// unless it may write, so a read-only range is read-only in this process too (and an
    /// fd opened read-only maps at all), and the region carries `perm`, which every device
    /// access checks ([`GuestMemory::check_access`](super::GuestMemory::check_access)):
    /// a write there is [`MemoryError::AccessDenied`], never a fault. (mmap needs read
    /// access, so a write-only range is mapped readable and only `perm` refuses reads.)
    pub fn map_with_perm(info: RegionInfo, fd: OwnedFd, perm: Perm) -> Result<Self, MemoryError> {
        info.check()?;
        let writable = perm.allows(super::Access::Write);
        let mapping = Mapping::map_shared(fd.as_fd(), info.mmap_offset, info.memory_size, writable)
            .map_err(MemoryError::Map)?;
        Ok(Self {
            perm,
            ..Self::mapped(info, fd, mapping)
        })
    }

    fn mapped(info: RegionInfo, fd: OwnedFd, mapping: Mapping) -> Self {
        Self {
            info,
            base: mapping.as_ptr() as usize,
            perm: Perm::ReadWrite,
            backing: Backing::Mapped {
                fd,
                _mapping: mapping,
            },
        }
    }

    /// A window of `size` bytes at `offset` into `parent`, seen at address `start` with
    /// permission `perm`: how an IOTLB entry (I/O virtual address `start`) becomes a region
    /// of a [`GuestMemory`](super::GuestMemory) in I/O virtual address space. The window
    /// keeps `parent` (and its mapping) alive. `info.userspace_addr` is the front-end address
    /// the window starts at, so the window still names what the front-end mapped.
    ///
    /// `offset + size` must fit in `parent`, and `start + size` in u64.
    pub fn window(
        parent: &Arc<GuestRegion>,
        start: u64,
        offset: u64,
        size: u64,
        perm: Perm,
    ) -> Result<Self, MemoryError> {
        let p = parent.info();
        if offset >= p.memory_size || size > p.memory_size - offset {
            return Err(MemoryError::OutOfRange {
                addr: p.userspace_addr.wrapping_add(offset),
                len: size,
            });
        }
        // offset + size <= parent size, so neither sum below overflows (parent was checked).
        let info = RegionInfo {
            guest_phys_addr: start,
            memory_size: size,
            userspace_addr: p.userspace_addr + offset,
            mmap_offset: p.mmap_offset + offset,
        };
        info.check()?;
        Ok(Self {
            info,
            // offset < parent size, which is mapped: the sum stays inside the mapping.
            base: parent.base + offset as usize,
            perm,
            backing: Backing::Window {
                parent: Arc::clone(parent),
            },
        })
    }

    /// The policy that closes the SIGBUS risk of [`map`](Self::map) (ADVERSARIAL J8): the fd
    /// must carry F_SEAL_SHRINK, so nobody can truncate it under our mapping. QEMU seals its
    /// `memory-backend-memfd` this way by default; files that cannot be sealed are refused.
    pub fn check_shrink_sealed(fd: BorrowedFd<'_>) -> Result<(), MemoryError> {
        crate::sys::mmap::check_shrink_sealed(fd).map_err(|_| MemoryError::Unsealed)
    }

    /// Front-end side: new sealed memfd of `size`, mapped; userspace_addr = the local
    /// mapping's address; mmap_offset 0.
    pub fn allocate(guest_phys_addr: u64, size: u64) -> Result<Self, MemoryError> {
        // Validate before creating anything; userspace_addr is checked again once known.
        RegionInfo {
            guest_phys_addr,
            memory_size: size,
            ..RegionInfo::default()
        }
        .check()?;
        let fd = memfd_create("pyvhost-guest-ram", size)?;
        let mapping = Mapping::map_shared(fd.as_fd(), 0, size, true).map_err(MemoryError::Map)?;
        let info = RegionInfo {
            guest_phys_addr,
            memory_size: size,
            userspace_addr: mapping.as_ptr() as u64,
            mmap_offset: 0,
        };
        info.check()?;
        Ok(Self::mapped(info, fd, mapping))
    }

    /// The guest-physical address of byte `offset` of the region (`offset` below its
    /// size): for a memory table region, its own `guest_phys_addr` plus `offset`; for a
    /// window (an IOTLB translation, whose `guest_phys_addr` is an I/O virtual address),
    /// the guest-physical address of the byte it shows in the memory table region it looks
    /// into. What the dirty log of a device behind an IOMMU marks
    /// ([`DirtyLog::mark_in`](super::dirty_log::DirtyLog::mark_in)).
    pub fn gpa_at(&self, offset: u64) -> u64 {
        match &self.backing {
            Backing::Mapped { .. } => self.info.guest_phys_addr.wrapping_add(offset),
            // The window lies inside its parent (checked by `window`), at this offset.
            Backing::Window { parent } => {
                parent.gpa_at(self.info.userspace_addr - parent.info.userspace_addr + offset)
            }
        }
    }

    /// The region as the front-end described it.
    pub fn info(&self) -> RegionInfo {
        self.info
    }

    /// The fd the region is mapped from, to pass on (a kernel or vDPA device, SCM_RIGHTS).
    /// For a window, the fd of the region it looks into.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.backing {
            Backing::Mapped { fd, .. } => fd.as_fd(),
            Backing::Window { parent } => parent.fd(),
        }
    }

    /// Host pointer of `guest_phys_addr`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// What the device may do in this region: always read-write for a memory table region.
    pub fn perm(&self) -> Perm {
        self.perm
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.info.memory_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{dup_cloexec, EventFd};
    use std::os::fd::AsRawFd;

    fn info(gpa: u64, size: u64, uaddr: u64, off: u64) -> RegionInfo {
        RegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: uaddr,
            mmap_offset: off,
        }
    }

    #[test]
    fn check_rejects_zero_size_and_overflow() {
        assert!(matches!(
            info(0, 0, 0, 0).check(),
            Err(MemoryError::ZeroSize)
        ));
        let cases = [
            (info(u64::MAX - 10, 100, 0, 0), AddressSpace::GuestPhysical),
            (
                info(0, 100, u64::MAX - 10, 0),
                AddressSpace::FrontendVirtual,
            ),
            (info(0, 100, 0, u64::MAX - 10), AddressSpace::FileOffset),
            (info(1, u64::MAX, 0, 0), AddressSpace::GuestPhysical),
        ];
        for (i, want) in cases {
            match i.check() {
                Err(MemoryError::Overflow { space, .. }) => assert_eq!(space, want),
                other => panic!("{i:?}: {other:?}"),
            }
        }
        info(u64::MAX - 100, 100, 0x1000, 0).check().unwrap();
    }

    #[test]
    fn allocate_maps_a_sealed_memfd() {
        let r = GuestRegion::allocate(0x1_0000, 0x4000).unwrap();
        let i = r.info();
        assert_eq!(i.guest_phys_addr, 0x1_0000);
        assert_eq!(i.memory_size, 0x4000);
        assert_eq!(i.userspace_addr, r.as_ptr() as u64);
        assert_eq!(i.mmap_offset, 0);
        assert_eq!(r.len(), 0x4000);
        assert_eq!(crate::sys::file_size(r.fd()).unwrap(), 0x4000);
        // SAFETY: F_GET_SEALS takes no argument; the fd is open.
        let seals = unsafe { libc::fcntl(r.fd().as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert!(GuestRegion::allocate(0, 0).is_err());
        assert!(matches!(
            GuestRegion::allocate(u64::MAX - 0xfff, 0x2000),
            Err(MemoryError::Overflow { .. })
        ));
    }

    #[test]
    fn map_shares_memory_with_the_allocating_side() {
        let front = GuestRegion::allocate(0, 0x3000).unwrap();
        let fd = dup_cloexec(front.fd()).unwrap();
        // The back-end maps the second and third pages only.
        let back = GuestRegion::map(info(0x1000, 0x2000, 0xdead_0000, 0x1000), fd, false).unwrap();
        // SAFETY: offset 0x1000 is inside the 0x3000-byte front mapping.
        unsafe { front.as_ptr().add(0x1000).write(0x5a) };
        // SAFETY: offset 0 is inside the back mapping.
        assert_eq!(unsafe { back.as_ptr().read() }, 0x5a);
        assert_eq!(back.info().userspace_addr, 0xdead_0000);
    }

    #[test]
    fn map_rejects_a_file_too_small() {
        let fd = memfd_create("t", 0x1000).unwrap();
        let dup = dup_cloexec(fd.as_fd()).unwrap();
        assert!(matches!(
            GuestRegion::map(info(0, 0x4000_0000, 0, 0), fd, false),
            Err(MemoryError::FileTooSmall {
                file_size: 0x1000,
                ..
            })
        ));
        assert!(matches!(
            GuestRegion::map(info(0, 0x1000, 0, 0x1000), dup, false),
            Err(MemoryError::FileTooSmall { .. })
        ));
    }

    #[test]
    fn map_rejects_unmappable_fds() {
        let e = EventFd::new(true).unwrap();
        match GuestRegion::map(info(0, 0x1000, 0, 0), e.into(), false) {
            Err(MemoryError::Map(err)) => assert_eq!(err.raw_os_error(), Some(libc::ENODEV)),
            other => panic!("{other:?}"),
        }
    }
}
