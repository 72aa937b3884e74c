//! The guest memory map: an immutable, cheaply cloned set of regions with address
//! translation and bounds-checked copies.

use std::mem::{align_of, size_of};
use std::ptr;
use std::sync::Arc;

use super::{Access, AddressSpace, GuestRegion, MemoryError};

/// Immutable snapshot; changes produce a new GuestMemory so that a mapping is unmapped only
/// when the last snapshot (or queue) holding its Arc drops it (ADVERSARIAL C8). Regions
/// sorted by gpa.
///
/// The same type serves a device behind an IOMMU: an [`Iotlb`](super::Iotlb)'s
/// [`view`](super::Iotlb::view) is a GuestMemory whose "guest-physical" addresses are I/O
/// virtual addresses and whose regions are windows with the IOTLB entries' permissions. The
/// rings and devices take it unchanged, so the flat table pays nothing for the IOMMU; only
/// the error path differs (a hole in a view is an [`IotlbMiss`](MemoryError::IotlbMiss)).
#[derive(Clone, Default, Debug)]
pub struct GuestMemory {
    regions: Vec<Arc<GuestRegion>>,
    /// True for an IOTLB view: addresses are I/O virtual ones, holes are misses.
    io_virtual: bool,
}

impl GuestMemory {
    /// The slot count a back-end advertises with GET_MAX_MEM_SLOTS (C6).
    pub const MAX_REGIONS: usize = 512;

    /// Rejects more than MAX_REGIONS regions and any overlap in guest-physical or front-end
    /// virtual space (C4): either would make a translation ambiguous.
    pub fn new(mut regions: Vec<Arc<GuestRegion>>) -> Result<Self, MemoryError> {
        if regions.len() > Self::MAX_REGIONS {
            return Err(MemoryError::TooManyRegions {
                max: Self::MAX_REGIONS,
            });
        }
        regions.sort_by_key(|r| r.info().guest_phys_addr);
        for pair in regions.windows(2) {
            let (a, b) = (pair[0].info(), pair[1].info());
            if a.gpa_end() > b.guest_phys_addr {
                return Err(MemoryError::Overlap {
                    space: AddressSpace::GuestPhysical,
                    first: a.guest_phys_addr,
                    second: b.guest_phys_addr,
                });
            }
        }
        let mut by_user: Vec<_> = regions.iter().map(|r| r.info()).collect();
        by_user.sort_by_key(|i| i.userspace_addr);
        for pair in by_user.windows(2) {
            if pair[0].user_end() > pair[1].userspace_addr {
                return Err(MemoryError::Overlap {
                    space: AddressSpace::FrontendVirtual,
                    first: pair[0].userspace_addr,
                    second: pair[1].userspace_addr,
                });
            }
        }
        Ok(Self {
            regions,
            io_virtual: false,
        })
    }

    /// An IOTLB view: `windows` (sorted by I/O virtual address, disjoint, built by
    /// [`Iotlb::view`](super::Iotlb::view)) as a memory map in I/O virtual address space.
    /// Several windows may show the same front-end memory (an IOMMU may map a page at two
    /// addresses), so only the I/O virtual ranges are checked for overlap.
    pub(crate) fn io_virtual(windows: Vec<Arc<GuestRegion>>) -> Self {
        debug_assert!(windows
            .windows(2)
            .all(|p| p[0].info().gpa_end() <= p[1].info().guest_phys_addr));
        Self {
            regions: windows,
            io_virtual: true,
        }
    }

    /// The address space this map's addresses are in: guest-physical for a memory table,
    /// I/O virtual for an IOTLB view.
    pub fn address_space(&self) -> AddressSpace {
        if self.io_virtual {
            AddressSpace::IoVirtual
        } else {
            AddressSpace::GuestPhysical
        }
    }

    /// Front-end side: one sealed memfd per (gpa, size) pair.
    pub fn allocate(layout: &[(u64, u64)]) -> Result<Self, MemoryError> {
        if layout.len() > Self::MAX_REGIONS {
            return Err(MemoryError::TooManyRegions {
                max: Self::MAX_REGIONS,
            });
        }
        let regions = layout
            .iter()
            .map(|&(gpa, size)| GuestRegion::allocate(gpa, size).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(regions)
    }

    /// A new table with `region` added, checked like a fresh one (no overlap, slot limit):
    /// VHOST_USER_ADD_MEM_REG builds the next table from the current one.
    pub fn with_region(&self, region: Arc<GuestRegion>) -> Result<Self, MemoryError> {
        let mut regions = self.regions.clone();
        regions.push(region);
        Self::new(regions)
    }

    /// Removes the region whose gpa AND size match exactly (a partial match is an error).
    pub fn without_region(
        &self,
        guest_phys_addr: u64,
        memory_size: u64,
    ) -> Result<(Self, Arc<GuestRegion>), MemoryError> {
        let idx = self
            .regions
            .iter()
            .position(|r| {
                let i = r.info();
                i.guest_phys_addr == guest_phys_addr && i.memory_size == memory_size
            })
            .ok_or(MemoryError::NoSuchRegion {
                guest_phys_addr,
                memory_size,
            })?;
        let mut regions = self.regions.clone();
        let removed = regions.remove(idx);
        // Removing keeps the order and cannot create an overlap: no need to revalidate.
        Ok((
            Self {
                regions,
                io_virtual: self.io_virtual,
            },
            removed,
        ))
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[Arc<GuestRegion>] {
        &self.regions
    }

    /// True before the front-end has sent any memory table.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Sum of region sizes (cannot overflow: regions are disjoint inside u64 space).
    pub fn total_size(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.len()))
    }

    /// Host pointer for [gpa, gpa+len); the whole range must lie inside ONE region (len 0
    /// allowed if gpa is inside). No permission is checked: callers that hand the pointer
    /// to a device path use [`check_access`](Self::check_access) first.
    pub fn translate(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let out = || MemoryError::OutOfRange { addr: gpa, len };
        let region = self.find_gpa(gpa).ok_or_else(out)?;
        let offset = gpa - region.info().guest_phys_addr;
        Self::pointer_into(region, offset, len).ok_or_else(out)
    }

    /// [`translate`](Self::translate) for a device `access`: the region must allow it, and
    /// in an IOTLB view a hole is a miss.
    #[inline]
    fn translate_for(&self, gpa: u64, len: u64, access: Access) -> Result<*mut u8, MemoryError> {
        let Some(region) = self.find_gpa(gpa) else {
            return Err(self.missing(gpa, len, access));
        };
        let offset = gpa - region.info().guest_phys_addr;
        let Some(p) = Self::pointer_into(region, offset, len) else {
            return Err(self.missing(gpa, len, access));
        };
        if !region.perm().allows(access) {
            return Err(self.denied(gpa, len, access, region));
        }
        Ok(p)
    }

    /// Checks that the device may do `access` on every byte of [addr, addr+len), which may
    /// span regions contiguous in this map's address space: what a popped descriptor's
    /// buffer must satisfy before a device touches it through
    /// [`for_each_chunk`](Self::for_each_chunk). `len` 0 always passes.
    pub fn check_access(&self, addr: u64, len: u64, access: Access) -> Result<(), MemoryError> {
        self.check(addr, len, access, true)
    }

    /// Checks that every byte of [addr, addr+len) is mapped, whatever the permission: what
    /// a ring checks when it pops a chain, so that a hole is found (in a view, a miss for
    /// `access`, retried once the IOMMU side answers) before the request runs, while a
    /// permission the buffer lacks fails that one request when the device touches it
    /// ([`for_each_chunk`](Self::for_each_chunk)), not the queue. `len` 0 always passes.
    pub fn check_mapped(&self, addr: u64, len: u64, access: Access) -> Result<(), MemoryError> {
        self.check(addr, len, access, false)
    }

    fn check(&self, addr: u64, len: u64, access: Access, perm: bool) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let Some(end) = addr.checked_add(len) else {
            return Err(self.missing(addr, len, access));
        };
        let mut cur = addr;
        while cur < end {
            let Some(region) = self.find_gpa(cur) else {
                return Err(self.missing(addr, len, access));
            };
            if perm && !region.perm().allows(access) {
                return Err(self.denied(addr, len, access, region));
            }
            cur = region.info().gpa_end();
        }
        Ok(())
    }

    /// The error for [addr, addr+len) not being fully mapped: out of range in a memory
    /// table; in an IOTLB view, a miss at the first address without a translation (what
    /// the IOMMU side must map next). Only on the error path.
    #[cold]
    fn missing(&self, addr: u64, len: u64, access: Access) -> MemoryError {
        if self.io_virtual {
            if let Some(iova) = self.first_hole(addr, len) {
                return MemoryError::IotlbMiss { iova, access };
            }
        }
        MemoryError::OutOfRange { addr, len }
    }

    /// The first address of [addr, addr+len) in no region (`addr` itself for len 0 outside
    /// every region); None if all of it is mapped (the failure was something else: a
    /// straddle or an overflowing length).
    fn first_hole(&self, addr: u64, len: u64) -> Option<u64> {
        let last = addr.saturating_add(len.max(1) - 1);
        let mut cur = addr;
        loop {
            let region = match self.find_gpa(cur) {
                Some(r) => r,
                None => return Some(cur),
            };
            let end = region.info().gpa_end();
            if end > last {
                return None;
            }
            cur = end;
        }
    }

    #[cold]
    fn denied(&self, addr: u64, len: u64, access: Access, region: &GuestRegion) -> MemoryError {
        MemoryError::AccessDenied {
            space: self.address_space(),
            addr,
            len,
            access,
            perm: region.perm(),
        }
    }

    /// Same for a front-end virtual address (what SET_VRING_ADDR carries).
    pub fn translate_user(&self, uaddr: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let out = || MemoryError::OutOfRange { addr: uaddr, len };
        let region = self.find_user(uaddr).ok_or_else(out)?;
        let offset = uaddr - region.info().userspace_addr;
        Self::pointer_into(region, offset, len).ok_or_else(out)
    }

    /// Translates a front-end user address (how vhost-user names ring addresses) to a
    /// guest-physical one.
    pub fn user_to_gpa(&self, uaddr: u64) -> Result<u64, MemoryError> {
        let region = self.find_user(uaddr).ok_or(MemoryError::OutOfRange {
            addr: uaddr,
            len: 0,
        })?;
        let info = region.info();
        // Inside the region, so the sum is below gpa_end and cannot overflow.
        Ok(info.guest_phys_addr + (uaddr - info.userspace_addr))
    }

    /// Translates a guest-physical address to the front-end user address that maps it (what
    /// a front-end sends in SET_VRING_ADDR for a ring it placed in guest memory): the
    /// inverse of [`user_to_gpa`](Self::user_to_gpa).
    pub fn gpa_to_user(&self, gpa: u64) -> Result<u64, MemoryError> {
        let region = self.find_gpa(gpa).ok_or(MemoryError::Unmapped {
            space: AddressSpace::GuestPhysical,
            addr: gpa,
        })?;
        let info = region.info();
        // Inside the region, so the sum is below user_end, which was checked not to overflow.
        Ok(info.userspace_addr + (gpa - info.guest_phys_addr))
    }

    /// Copies, allowing a range that spans regions that are contiguous in GPA; any hole is
    /// OutOfRange and nothing is copied partially-silently (check the whole range first).
    ///
    /// An empty `buf` touches no memory and always succeeds. `buf` may itself point into
    /// guest memory (the copy is a memmove).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let dst = buf.as_mut_ptr();
        self.chunks(gpa, buf.len(), Access::Read, |host, done, n| {
            // SAFETY: `host..host+n` lies inside a live mapping (for_each_chunk checked it and
            // `self` keeps the region alive) and `done + n <= buf.len()`. ptr::copy tolerates
            // overlap; the peer may write concurrently, which can only change the bytes read.
            unsafe { ptr::copy(host, dst.add(done), n) }
        })
    }

    /// See [`read`](Self::read): the whole range is checked before any byte is written.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let src = data.as_ptr();
        self.chunks(gpa, data.len(), Access::Write, |host, done, n| {
            // SAFETY: as in `read`, with source and destination swapped; regions are mapped
            // read-write.
            unsafe { ptr::copy(src.add(done), host, n) }
        })
    }

    /// Little-endian (virtio byte order) 16-bit load.
    pub fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        self.load::<u16>(gpa).map(u16::from_le)
    }

    /// Little-endian (virtio byte order) 32-bit load.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        self.load::<u32>(gpa).map(u32::from_le)
    }

    /// Little-endian (virtio byte order) 64-bit load.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.load::<u64>(gpa).map(u64::from_le)
    }

    /// Little-endian (virtio byte order) 16-bit store.
    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.store(gpa, v.to_le())
    }

    /// Little-endian (virtio byte order) 32-bit store.
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.store(gpa, v.to_le())
    }

    /// Little-endian (virtio byte order) 64-bit store.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.store(gpa, v.to_le())
    }

    /// An aligned scalar is read with one volatile access, so a value the peer is updating
    /// (a ring index) is never torn or cached; an unaligned one (only a broken or hostile
    /// guest produces those) falls back to an unaligned read.
    fn load<T: Copy>(&self, gpa: u64) -> Result<T, MemoryError> {
        let p = self
            .translate_for(gpa, size_of::<T>() as u64, Access::Read)?
            .cast::<T>();
        // SAFETY: translate guaranteed size_of::<T>() bytes inside one live mapping; the
        // callers only use integer types, valid for any bit pattern.
        Ok(unsafe {
            if (p as usize) % align_of::<T>() == 0 {
                ptr::read_volatile(p)
            } else {
                ptr::read_unaligned(p)
            }
        })
    }

    fn store<T: Copy>(&self, gpa: u64, v: T) -> Result<(), MemoryError> {
        let p = self
            .translate_for(gpa, size_of::<T>() as u64, Access::Write)?
            .cast::<T>();
        // SAFETY: translate guaranteed size_of::<T>() writable bytes inside one live mapping.
        unsafe {
            if (p as usize) % align_of::<T>() == 0 {
                ptr::write_volatile(p, v)
            } else {
                ptr::write_unaligned(p, v)
            }
        }
        Ok(())
    }

    /// The region containing `gpa`, by binary search on the sorted starts.
    fn find_gpa(&self, gpa: u64) -> Option<&Arc<GuestRegion>> {
        let idx = self
            .regions
            .partition_point(|r| r.info().guest_phys_addr <= gpa);
        let region = self.regions.get(idx.checked_sub(1)?)?;
        (gpa < region.info().gpa_end()).then_some(region)
    }

    /// The region containing front-end address `uaddr`. A linear scan: it serves
    /// SET_VRING_ADDR and similar control-path calls, not the data path.
    fn find_user(&self, uaddr: u64) -> Option<&Arc<GuestRegion>> {
        self.regions.iter().find(|r| {
            let i = r.info();
            i.userspace_addr <= uaddr && uaddr < i.user_end()
        })
    }

    /// Pointer to `offset` in `region` if [offset, offset+len) fits in it; `offset` must be
    /// inside the region even when `len` is 0.
    fn pointer_into(region: &GuestRegion, offset: u64, len: u64) -> Option<*mut u8> {
        let size = region.len();
        if offset >= size || len > size - offset {
            return None;
        }
        // Fits: offset < size, and the region's size was mapped, so it fits a usize.
        Some(region.as_ptr().wrapping_add(offset as usize))
    }

    /// Validates that [gpa, gpa+len) is fully backed, then calls `f(host, done, n)` for each
    /// piece, where `done` is the number of bytes already handled. Nothing is called unless
    /// the whole range is valid. Native devices use it to hand guest buffers straight to
    /// `preadv`/`pwritev`; the pointers stay valid while `self` (a snapshot) lives.
    ///
    ///
    /// `access` is what the caller will do through the pointers (a device reading a
    /// request, or writing a reply with `preadv`): every region must allow it, so a reply
    /// into a read-only IOTLB mapping fails here ([`MemoryError::AccessDenied`]) and
    /// nothing is written.
    pub fn for_each_chunk(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemoryError> {
        self.chunks(gpa, len, access, f)
    }

    /// [`for_each_chunk`](Self::for_each_chunk), checking `access` on every region when
    /// given (the copies of `read` and `write` check their own direction).
    fn chunks(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        // The common case (a descriptor, a request header, a status byte, a buffer in one
        // region): one lookup, one call.
        if let Some(region) = self.find_gpa(gpa) {
            let offset = gpa - region.info().guest_phys_addr;
            if let Some(host) = Self::pointer_into(region, offset, len as u64) {
                if !region.perm().allows(access) {
                    return Err(self.denied(gpa, len as u64, access, region));
                }
                f(host, 0, len);
                return Ok(());
            }
        }
        self.walk(gpa, len, Some(access), |_, _, _| {})?;
        self.walk(gpa, len, None, &mut f)
    }

    fn walk(
        &self,
        gpa: u64,
        len: usize,
        access: Option<Access>,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemoryError> {
        let out = || self.missing(gpa, len as u64, access.unwrap_or(Access::Read));
        // With the end representable, every `gpa + done` below is too.
        if gpa.checked_add(len as u64).is_none() {
            return Err(out());
        }
        let mut done = 0usize;
        while done < len {
            let cur = gpa + done as u64;
            let region = self.find_gpa(cur).ok_or_else(out)?;
            if let Some(access) = access {
                if !region.perm().allows(access) {
                    return Err(self.denied(gpa, len as u64, access, region));
                }
            }
            let info = region.info();
            let offset = cur - info.guest_phys_addr;
            // Bounded by `len - done`, so the result fits a usize.
            let n = ((len - done) as u64).min(info.memory_size - offset) as usize;
            // `offset < memory_size`, which was mapped, so it fits a usize.
            f(region.as_ptr().wrapping_add(offset as usize), done, n);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionInfo;
    use crate::sys::dup_cloexec;

    const PAGE: u64 = 0x1000;

    #[test]
    fn read_write_across_contiguous_regions() {
        let mem = GuestMemory::allocate(&[(0x1_0000, 0x1_0000), (0, 0x1_0000)]).unwrap();
        assert_eq!(mem.regions().len(), 2);
        assert_eq!(mem.regions()[0].info().guest_phys_addr, 0, "sorted by gpa");
        assert_eq!(mem.total_size(), 0x2_0000);
        assert!(!mem.is_empty());

        let data: Vec<u8> = (0..64).collect();
        mem.write(0xfff0, &data).unwrap();
        let mut back = [0u8; 64];
        mem.read(0xfff0, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
        // The bytes really landed in both regions.
        // SAFETY: both pointers are inside their regions (16 bytes before the end of the
        // first, offset 0 of the second).
        unsafe {
            assert_eq!(mem.translate(0xfff0, 16).unwrap().read(), 0);
            assert_eq!(mem.translate(0x1_0000, 48).unwrap().read(), 16);
        }
        // Exactly up to the end of memory is fine.
        mem.write(0x2_0000 - 4, &[1, 2, 3, 4]).unwrap();
    }

    #[test]
    fn translate_requires_one_region() {
        let mem = GuestMemory::allocate(&[(0, 0x1_0000), (0x1_0000, 0x1_0000)]).unwrap();
        let base = mem.regions()[1].as_ptr();
        assert_eq!(mem.translate(0x1_0000, 0x1_0000).unwrap(), base);
        assert_eq!(mem.translate(0x1_0010, 0).unwrap(), base.wrapping_add(0x10));
        // Straddling two regions, even contiguous ones.
        assert!(matches!(
            mem.translate(0xfff0, 32),
            Err(MemoryError::OutOfRange {
                addr: 0xfff0,
                len: 32
            })
        ));
        // Past the end, and len 0 at the end.
        assert!(mem.translate(0x2_0000, 1).is_err());
        assert!(mem.translate(0x2_0000, 0).is_err());
        assert!(mem.translate(0x1_ffff, 2).is_err());
        assert!(mem.translate(u64::MAX, 1).is_err());
        assert!(mem.translate(0, u64::MAX).is_err());
        assert!(GuestMemory::default().translate(0, 0).is_err());
    }

    #[test]
    fn holes_fail_without_partial_copies() {
        let mem = GuestMemory::allocate(&[(0, PAGE), (2 * PAGE, PAGE)]).unwrap();
        mem.write(0xf00, &[7u8; 0x100]).unwrap();

        let mut buf = [0xeeu8; 0x200];
        assert!(matches!(
            mem.read(0xf00, &mut buf),
            Err(MemoryError::OutOfRange {
                addr: 0xf00,
                len: 0x200
            })
        ));
        assert!(buf.iter().all(|&b| b == 0xee), "buffer touched");

        assert!(mem.write(0xf00, &[1u8; 0x200]).is_err());
        let mut first = [0u8; 0x100];
        mem.read(0xf00, &mut first).unwrap();
        assert!(first.iter().all(|&b| b == 7), "guest memory touched");

        // Starting in the hole, and running off the end.
        assert!(mem.read(PAGE, &mut [0u8; 1]).is_err());
        assert!(mem.write(3 * PAGE - 1, &[0u8; 2]).is_err());
        assert!(mem.read(u64::MAX, &mut [0u8; 2]).is_err());
        // Empty copies touch nothing.
        mem.read(PAGE, &mut []).unwrap();
    }

    #[test]
    fn scalar_access_is_little_endian_and_bounds_checked() {
        let mem = GuestMemory::allocate(&[(0, PAGE)]).unwrap();
        mem.write_u16(0x10, 0x1234).unwrap();
        mem.write_u32(0x21, 0xdead_beef).unwrap(); // unaligned
        mem.write_u64(0x40, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(mem.read_u16(0x10).unwrap(), 0x1234);
        assert_eq!(mem.read_u32(0x21).unwrap(), 0xdead_beef);
        assert_eq!(mem.read_u64(0x40).unwrap(), 0x0102_0304_0506_0708);
        let mut raw = [0u8; 2];
        mem.read(0x10, &mut raw).unwrap();
        assert_eq!(raw, [0x34, 0x12]);
        assert!(mem.read_u64(PAGE - 4).is_err());
        assert!(mem.write_u16(PAGE - 1, 0).is_err());
        assert!(mem.read_u32(PAGE).is_err());
    }

    #[test]
    fn user_addresses_translate_to_the_same_memory() {
        let mem = GuestMemory::allocate(&[(0x10_0000, 2 * PAGE)]).unwrap();
        let r = mem.regions()[0].info();
        assert_eq!(mem.user_to_gpa(r.userspace_addr + 5).unwrap(), 0x10_0005);
        assert_eq!(
            mem.translate_user(r.userspace_addr + 5, 8).unwrap(),
            mem.translate(0x10_0005, 8).unwrap()
        );
        assert!(mem
            .translate_user(r.userspace_addr + 2 * PAGE - 4, 8)
            .is_err());
        assert!(mem.user_to_gpa(r.userspace_addr + 2 * PAGE).is_err());
        assert!(mem.user_to_gpa(r.userspace_addr.wrapping_sub(1)).is_err());
    }

    #[test]
    fn guest_addresses_translate_back_to_user_addresses() {
        let mem = GuestMemory::allocate(&[(0x10_0000, 2 * PAGE), (0, PAGE)]).unwrap();
        for gpa in [0, PAGE - 1, 0x10_0000, 0x10_0000 + 2 * PAGE - 1] {
            let uaddr = mem.gpa_to_user(gpa).unwrap();
            assert_eq!(mem.user_to_gpa(uaddr).unwrap(), gpa);
            assert_eq!(
                mem.translate_user(uaddr, 1).unwrap(),
                mem.translate(gpa, 1).unwrap()
            );
        }
        for gpa in [PAGE, 0x10_0000 - 1, 0x10_0000 + 2 * PAGE, u64::MAX] {
            let err = mem.gpa_to_user(gpa).unwrap_err();
            assert!(
                matches!(err, MemoryError::Unmapped { addr, space: AddressSpace::GuestPhysical } if addr == gpa),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("guest physical address {gpa:#x} is in no memory region")
            );
        }
    }

    #[test]
    fn overlaps_are_rejected() {
        let a = Arc::new(GuestRegion::allocate(0, 2 * PAGE).unwrap());
        let b = Arc::new(GuestRegion::allocate(PAGE, 2 * PAGE).unwrap());
        assert!(matches!(
            GuestMemory::new(vec![a.clone(), b]),
            Err(MemoryError::Overlap {
                space: AddressSpace::GuestPhysical,
                ..
            })
        ));
        // Same Arc twice.
        assert!(GuestMemory::new(vec![a.clone(), a.clone()]).is_err());

        // Disjoint in GPA but claiming a's front-end addresses.
        let ai = a.info();
        let fd = dup_cloexec(a.fd()).unwrap();
        let alias = RegionInfo {
            guest_phys_addr: 0x100_0000,
            memory_size: PAGE,
            userspace_addr: ai.userspace_addr + PAGE,
            mmap_offset: 0,
        };
        let c = Arc::new(GuestRegion::map(alias, fd, false).unwrap());
        let mem = GuestMemory::new(vec![a.clone()]).unwrap();
        assert!(matches!(
            mem.with_region(c),
            Err(MemoryError::Overlap {
                space: AddressSpace::FrontendVirtual,
                ..
            })
        ));
        // Adjacent is not overlapping.
        let d = Arc::new(GuestRegion::allocate(2 * PAGE, PAGE).unwrap());
        assert_eq!(mem.with_region(d).unwrap().regions().len(), 2);
    }

    #[test]
    fn too_many_regions() {
        let a = Arc::new(GuestRegion::allocate(0, PAGE).unwrap());
        let many = vec![a; GuestMemory::MAX_REGIONS + 1];
        assert!(matches!(
            GuestMemory::new(many),
            Err(MemoryError::TooManyRegions { max: 512 })
        ));
        let layout = vec![(0, PAGE); GuestMemory::MAX_REGIONS + 1];
        assert!(matches!(
            GuestMemory::allocate(&layout),
            Err(MemoryError::TooManyRegions { .. })
        ));
    }

    #[test]
    fn allocate_rejects_bad_layouts() {
        assert!(matches!(
            GuestMemory::allocate(&[(0, 0)]),
            Err(MemoryError::ZeroSize)
        ));
        assert!(matches!(
            GuestMemory::allocate(&[(u64::MAX - PAGE + 1, 2 * PAGE)]),
            Err(MemoryError::Overflow { .. })
        ));
        assert!(matches!(
            GuestMemory::allocate(&[(0, 2 * PAGE), (PAGE, PAGE)]),
            Err(MemoryError::Overlap { .. })
        ));
    }

    #[test]
    fn without_region_needs_an_exact_match() {
        let mem = GuestMemory::allocate(&[(0, PAGE), (PAGE, 2 * PAGE)]).unwrap();
        for (gpa, size) in [
            (PAGE, PAGE),
            (0, 2 * PAGE),
            (2 * PAGE, PAGE),
            (5 * PAGE, PAGE),
        ] {
            assert!(matches!(
                mem.without_region(gpa, size),
                Err(MemoryError::NoSuchRegion { .. })
            ));
        }
        let (smaller, removed) = mem.without_region(PAGE, 2 * PAGE).unwrap();
        assert_eq!(removed.info().guest_phys_addr, PAGE);
        assert_eq!(smaller.regions().len(), 1);
        assert!(smaller.translate(PAGE, 1).is_err());
        assert_eq!(mem.regions().len(), 2, "the original snapshot is unchanged");
    }

    #[test]
    fn old_snapshot_keeps_its_mapping_alive() {
        let mem = GuestMemory::allocate(&[(0, PAGE), (PAGE, PAGE)]).unwrap();
        mem.write_u64(PAGE + 8, 0x1122_3344_5566_7788).unwrap();
        let weak = Arc::downgrade(&mem.regions()[1]);

        let (newer, removed) = mem.without_region(PAGE, PAGE).unwrap();
        drop(removed);
        drop(newer);
        // A worker still holding `mem` mid-chain can keep reading (C8).
        assert_eq!(mem.read_u64(PAGE + 8).unwrap(), 0x1122_3344_5566_7788);
        assert!(weak.upgrade().is_some());

        drop(mem);
        assert!(
            weak.upgrade().is_none(),
            "mapping freed with the last holder"
        );
    }
}
