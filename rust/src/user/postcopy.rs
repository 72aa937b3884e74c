//! Postcopy on the front-end side: resolving the back-end's page faults.
//!
//! In postcopy migration the destination runs before all of guest memory has arrived. The
//! back-end registers its mappings with a userfaultfd (POSTCOPY_ADVISE hands the front-end
//! a handle on it, POSTCOPY_LISTEN starts the registration), so a device that touches a
//! page not received yet waits in the kernel. The front-end reads that fault — an address
//! in the back-end's address space — turns it into a guest-physical address with the
//! back-end's mapping bases (the postcopy replies of SET_MEM_TABLE and ADD_MEM_REG), fetches
//! the page from the migration source, and copies it in (`UFFDIO_COPY`), which wakes the
//! device. [`FaultResolver`] is that loop's typed core; where the page comes from is the
//! caller's business.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{Error, Result};
use crate::sys::userfaultfd::Userfaultfd;

/// The unit of fault resolution: shared memory (memfd, tmpfs) faults in 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;

/// Where the back-end mapped one region of guest memory, as its postcopy reply to
/// SET_MEM_TABLE or ADD_MEM_REG says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostcopyRegion {
    /// Where the region starts for the guest.
    pub guest_phys_addr: u64,
    /// Its size in bytes.
    pub memory_size: u64,
    /// The back-end's address of `guest_phys_addr`.
    pub backend_addr: u64,
}

impl PostcopyRegion {
    /// The guest-physical address of back-end address `addr`, if this region holds it.
    fn gpa_of(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.backend_addr)?;
        (off < self.memory_size).then(|| self.guest_phys_addr + off)
    }

    /// The back-end address of `[gpa, gpa + len)`, if this region holds all of it.
    fn backend_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.guest_phys_addr)?;
        let end = off.checked_add(len)?;
        (end <= self.memory_size).then(|| self.backend_addr + off)
    }
}

/// A page the back-end is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// Guest-physical address of the page (aligned to [`PAGE_SIZE`]).
    pub guest_phys_addr: u64,
    /// The faulting page in the back-end's address space, as the kernel reported it (the
    /// page's start: the userfaultfd is not asked for exact addresses).
    pub backend_addr: u64,
    /// The back-end was writing (a device filling a buffer), not reading.
    pub write: bool,
}

/// Reads the back-end's page faults from the userfaultfd POSTCOPY_ADVISE returned and
/// resolves them by guest-physical address. Safe to share between a thread that waits for
/// faults and threads that resolve them.
#[derive(Debug)]
pub struct FaultResolver {
    uffd: Userfaultfd,
    regions: Mutex<Vec<PostcopyRegion>>,
}

impl FaultResolver {
    /// `uffd` is the back-end's userfaultfd; `regions` its mapping bases (none yet is fine:
    /// [`set_regions`](Self::set_regions) once the memory table is answered).
    pub fn new(uffd: OwnedFd, regions: Vec<PostcopyRegion>) -> Self {
        FaultResolver {
            uffd: Userfaultfd::from_fd(uffd),
            regions: Mutex::new(regions),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<PostcopyRegion>> {
        // Plain data, valid whatever a panicking holder was doing.
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the mapping bases (after a new postcopy SET_MEM_TABLE or ADD_MEM_REG).
    pub fn set_regions(&self, regions: Vec<PostcopyRegion>) {
        *self.lock() = regions;
    }

    /// The mapping bases now in use.
    pub fn regions(&self) -> Vec<PostcopyRegion> {
        self.lock().clone()
    }

    /// Waits up to `timeout` (`None`: no bound) for the back-end's next fault; `None` when
    /// none came. A fault outside every known region is an error naming the address (the
    /// bases are stale or the peer is confused); the faulting thread then stays asleep.
    pub fn next_fault(&self, timeout: Option<Duration>) -> Result<Option<PageFault>> {
        let Some(event) = self
            .uffd
            .read_fault(timeout)
            .map_err(|e| context(e, "read a fault from the userfaultfd".into()))?
        else {
            return Ok(None);
        };
        let page = event.address & !(PAGE_SIZE - 1);
        let gpa = self
            .lock()
            .iter()
            .find_map(|r| r.gpa_of(page))
            .ok_or_else(|| {
                Error::InvalidParam(format!(
                    "the back-end faulted at {:#x}, in no region of its postcopy memory table",
                    event.address
                ))
            })?;
        Ok(Some(PageFault {
            guest_phys_addr: gpa,
            backend_addr: event.address,
            write: event.write,
        }))
    }

    /// The back-end address of whole pages `[gpa, gpa + len)` inside one region.
    fn backend_range(&self, what: &str, gpa: u64, len: u64) -> Result<u64> {
        if len == 0 || gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::InvalidParam(format!(
                "{what} at guest {gpa:#x} for {len:#x} bytes: needs whole {PAGE_SIZE}-byte pages"
            )));
        }
        self.lock()
            .iter()
            .find_map(|r| r.backend_of(gpa, len))
            .ok_or_else(|| {
                Error::InvalidParam(format!(
                    "{what} at guest {gpa:#x} for {len:#x} bytes: not inside one region of the \
                     back-end's postcopy memory table"
                ))
            })
    }

    /// Copies `data` (whole pages) into the back-end's memory at guest-physical `gpa` and
    /// wakes whoever waits there. False when the pages were already present (resolved
    /// before): nothing is overwritten, and the waiters are woken all the same.
    pub fn copy(&self, gpa: u64, data: &[u8]) -> Result<bool> {
        let dst = self.backend_range("UFFDIO_COPY", gpa, data.len() as u64)?;
        self.uffd
            .copy(dst, data)
            .map_err(|e| context(e, format!("UFFDIO_COPY to guest {gpa:#x}")))
    }

    /// Resolves `[gpa, gpa + len)` (whole pages) with zeros; false if already present.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<bool> {
        let dst = self.backend_range("UFFDIO_ZEROPAGE", gpa, len)?;
        self.uffd
            .zeropage(dst, len)
            .map_err(|e| context(e, format!("UFFDIO_ZEROPAGE at guest {gpa:#x}")))
    }

    /// Wakes the back-end's threads waiting on `[gpa, gpa + len)` after the pages were
    /// placed another way (e.g. written through the front-end's own mapping of the same
    /// shared memory, as QEMU does).
    pub fn wake(&self, gpa: u64, len: u64) -> Result<()> {
        let dst = self.backend_range("UFFDIO_WAKE", gpa, len)?;
        self.uffd
            .wake(dst, len)
            .map_err(|e| context(e, format!("UFFDIO_WAKE at guest {gpa:#x}")))
    }
}

impl AsFd for FaultResolver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

fn context(e: io::Error, what: String) -> Error {
    // ESRCH: the back-end process is gone (its address space with it).
    let hint = match e.raw_os_error() {
        Some(libc::ESRCH) => " (the back-end process exited)",
        _ => "",
    };
    Error::Io(io::Error::new(e.kind(), format!("{what}: {e}{hint}")))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::Arc;

    use super::*;
    use crate::sys::userfaultfd::UFFD_FEATURE_MISSING_SHMEM;
    use crate::sys::{memfd_create, Mapping};

    #[test]
    fn translates_between_guest_and_backend_addresses() {
        let r = PostcopyRegion {
            guest_phys_addr: 0x10_0000,
            memory_size: 0x4000,
            backend_addr: 0x7f00_0000_0000,
        };
        assert_eq!(r.gpa_of(0x7f00_0000_3fff), Some(0x10_3fff));
        assert_eq!(r.gpa_of(0x7f00_0000_4000), None);
        assert_eq!(r.gpa_of(0x10), None);
        assert_eq!(r.backend_of(0x10_1000, 0x3000), Some(0x7f00_0000_1000));
        assert_eq!(r.backend_of(0x10_1000, 0x4000), None);
        assert_eq!(r.backend_of(0x10_1000, u64::MAX), None);
    }

    /// The resolver on this process's own userfaultfd (the ioctls act on the creator's
    /// address space, which here is ours): a fault is reported by guest address, and the
    /// reader sees the bytes copied in.
    #[test]
    fn resolves_a_fault_by_guest_address() {
        let uffd = Userfaultfd::new(UFFD_FEATURE_MISSING_SHMEM).unwrap();
        let fd = memfd_create("resolver-test", 4 * PAGE_SIZE).unwrap();
        let map = Arc::new(Mapping::map_shared(fd.as_fd(), 0, 4 * PAGE_SIZE, true).unwrap());
        let base = map.as_ptr() as u64;
        uffd.register(base, 4 * PAGE_SIZE).unwrap();
        let resolver = FaultResolver::new(uffd.try_clone_fd().unwrap(), Vec::new());
        let region = PostcopyRegion {
            guest_phys_addr: 0x8000,
            memory_size: 4 * PAGE_SIZE,
            backend_addr: base,
        };
        let m = map.clone();
        // SAFETY: the mapping is live (the Arc) and 4 pages long.
        let reader = std::thread::spawn(move || unsafe {
            std::ptr::read_volatile(m.as_ptr().add(PAGE_SIZE as usize + 5))
        });
        // Without the bases a fault cannot be placed: an error naming the address.
        let err = resolver
            .next_fault(Some(Duration::from_secs(10)))
            .unwrap_err();
        assert!(err.to_string().contains("in no region"), "{err}");
        // The same page faults again only if woken; wake it so it re-faults, with bases.
        resolver.set_regions(vec![region]);
        resolver.wake(0x8000 + PAGE_SIZE, PAGE_SIZE).unwrap();
        let fault = resolver
            .next_fault(Some(Duration::from_secs(10)))
            .unwrap()
            .expect("the reader faults again");
        assert_eq!(fault.guest_phys_addr, 0x8000 + PAGE_SIZE);
        assert_eq!(fault.backend_addr, base + PAGE_SIZE);
        let err = resolver.copy(0x8000 + PAGE_SIZE, &[1u8; 100]).unwrap_err();
        assert!(err.to_string().contains("whole 4096-byte pages"), "{err}");
        let err = resolver
            .copy(0x8000 + 4 * PAGE_SIZE, &[1u8; 4096])
            .unwrap_err();
        assert!(err.to_string().contains("not inside one region"), "{err}");
        assert!(resolver.copy(0x8000 + PAGE_SIZE, &[0x5a; 4096]).unwrap());
        assert_eq!(reader.join().unwrap(), 0x5a);
        assert!(!resolver.zero(0x8000 + PAGE_SIZE, PAGE_SIZE).unwrap());
        uffd.unregister(base, 4 * PAGE_SIZE).unwrap();
    }
}
