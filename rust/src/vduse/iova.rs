//! The device's view of memory: IOVA ranges fetched with `VDUSE_IOTLB_GET_FD` and mapped,
//! as a [`GuestMemory`] keyed by IOVA (each range's "guest-physical" and "user" address
//! are its IOVA), so rings and devices read it exactly as they read a vhost-user table.
//!
//! With `virtio_vdpa` the kernel bounces every buffer through one IOVA domain: a few large
//! ranges (the bounce area from 0, and one per coherent allocation such as a ring) cover
//! everything. With `vhost_vdpa` the ranges are the driver's `dma_map`s. Either way an
//! `UPDATE_IOTLB` request invalidates a span, which is dropped and fetched again at once;
//! a queue keeps the snapshot it holds until it takes the new one, so a chain being
//! processed keeps its mapping until it completes.
//!
//! Each range keeps the permission the kernel reports for it. Under `virtio_vdpa` every
//! range is read-write (the bounce copies enforce the DMA direction); under `vhost_vdpa` it
//! is the permission of the driver's `dma_map` (a VMM maps ROM read-only). The kernel's fd
//! is the driver's own file, still writable: a read-only range is mapped without
//! `PROT_WRITE` and its region refuses device writes, so such a write fails its request.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::abi::IotlbEntry;
use super::{Result, VduseDevice, VduseError};
use crate::memory::{GuestMemory, GuestRegion, MemoryError, Perm, RegionInfo};

/// The IOVA ranges mapped so far.
#[derive(Debug, Default)]
pub struct IovaSpace {
    regions: Vec<(IotlbEntry, Arc<GuestRegion>)>,
}

/// Maps one entry: `start..=last` of the IOVA space at `offset` of `fd`, with the
/// entry's permission (the `VDUSE_ACCESS_*` values are vhost's, which [`Perm`] parses):
/// mapped without `PROT_WRITE` when the device may only read, and kept in the region, so
/// that a device write there is refused by the memory map (the request fails) instead of
/// reaching memory its driver lent read-only.
fn map_entry(dev: &str, entry: &IotlbEntry, fd: OwnedFd) -> Result<Arc<GuestRegion>> {
    let err = |source| VduseError::Memory {
        device: dev.into(),
        start: entry.start,
        last: entry.last,
        source,
    };
    let perm = Perm::from_bits(entry.perm).map_err(|e| VduseError::Malformed {
        device: dev.into(),
        why: format!(
            "VDUSE_IOTLB_GET_FD: IOVA {:#x}..={:#x}: {e}",
            entry.start, entry.last
        ),
    })?;
    let size = (entry.last - entry.start).checked_add(1).ok_or_else(|| {
        err(MemoryError::Overflow {
            space: crate::memory::AddressSpace::GuestPhysical,
            start: entry.start,
            size: u64::MAX,
        })
    })?;
    let info = RegionInfo {
        guest_phys_addr: entry.start,
        memory_size: size,
        userspace_addr: entry.start,
        mmap_offset: entry.offset,
    };
    GuestRegion::map_with_perm(info, fd, perm)
        .map(Arc::new)
        .map_err(err)
}

impl IovaSpace {
    /// Nothing mapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many ranges are mapped.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The mapped ranges as `(start, last, perm)`, in IOVA order.
    pub fn ranges(&self) -> Vec<(u64, u64, u8)> {
        let mut r: Vec<_> = self
            .regions
            .iter()
            .map(|(e, _)| (e.start, e.last, e.perm))
            .collect();
        r.sort_unstable();
        r
    }

    /// Drops every mapping overlapping `start..=last` and fetches that span again (widened
    /// to cover the dropped ranges whole) from the kernel. Returns how many ranges are
    /// mapped afterwards.
    pub fn refresh(&mut self, dev: &VduseDevice, start: u64, last: u64) -> Result<usize> {
        let (mut lo, mut hi) = (start, last.max(start));
        self.regions.retain(|(e, _)| {
            let overlaps = e.start <= hi && e.last >= lo;
            if overlaps {
                lo = lo.min(e.start);
                hi = hi.max(e.last);
            }
            !overlaps
        });
        let mut at = lo;
        while let Some((entry, fd)) = dev.iotlb_get_fd(at, hi)? {
            if entry.last < entry.start || entry.last < at {
                return Err(VduseError::Malformed {
                    device: dev.name().into(),
                    why: format!(
                        "VDUSE_IOTLB_GET_FD for {at:#x}..={hi:#x} answered {:#x}..={:#x}",
                        entry.start, entry.last
                    ),
                });
            }
            // A range already mapped (it started below the span) is not mapped twice.
            if !self.regions.iter().any(|(e, _)| e.start == entry.start) {
                let region = map_entry(dev.name(), &entry, fd)?;
                self.regions.push((entry, region));
            }
            match entry.last.checked_add(1) {
                Some(next) if entry.last < hi => at = next,
                _ => break,
            }
        }
        Ok(self.regions.len())
    }

    /// Drops everything (a reset: the driver's mappings are gone).
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    /// The mapped ranges as the memory map rings and devices read.
    pub fn memory(&self, dev: &str) -> Result<GuestMemory> {
        GuestMemory::new(self.regions.iter().map(|(_, r)| r.clone()).collect()).map_err(|source| {
            VduseError::Memory {
                device: dev.into(),
                start: 0,
                last: u64::MAX,
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Access, Perm};
    use crate::sys::memfd_create;
    use crate::vduse::abi::{VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO};
    use std::os::fd::{AsFd, AsRawFd};

    const START: u64 = 0x10_0000;
    const SIZE: u64 = 0x4000;

    /// A memfd holding 0x5a, as the kernel hands out a driver's file: still read-write.
    fn driver_file() -> OwnedFd {
        let fd = memfd_create("vduse-iova-test", SIZE).unwrap();
        let n = rustix::io::pwrite(&fd, &[0x5a; SIZE as usize], 0).unwrap();
        assert_eq!(n as u64, SIZE);
        fd
    }

    fn entry(perm: u8) -> IotlbEntry {
        IotlbEntry {
            offset: 0,
            start: START,
            last: START + SIZE - 1,
            perm,
        }
    }

    /// The protection of the mapping that holds `addr`, from /proc/self/maps ("r--s").
    fn prot_of(addr: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find_map(|l| {
                let (range, rest) = l.split_once(' ')?;
                let (lo, hi) = range.split_once('-')?;
                let (lo, hi) = (
                    usize::from_str_radix(lo, 16).ok()?,
                    usize::from_str_radix(hi, 16).ok()?,
                );
                (lo <= addr && addr < hi).then(|| rest[..4].to_owned())
            })
            .expect("the mapping is in /proc/self/maps")
    }

    #[test]
    fn a_read_only_range_is_mapped_read_only_and_a_device_write_there_is_refused() {
        let fd = driver_file();
        let region = map_entry("t0", &entry(VDUSE_ACCESS_RO), fd).unwrap();
        assert_eq!(region.perm(), Perm::ReadOnly);
        // No PROT_WRITE: even a path that skipped the checks could not write the file.
        assert_eq!(prot_of(region.as_ptr() as usize), "r--s");
        let mem = GuestMemory::new(vec![region.clone()]).unwrap();
        let mut back = [0u8; 16];
        mem.read(START + 8, &mut back).unwrap();
        assert_eq!(back, [0x5a; 16]);
        // What a device's reply does (blk's preadv target, the used ring): refused.
        for err in [
            mem.write(START, &[1; 4]).unwrap_err(),
            mem.write_u16(START + 2, 7).unwrap_err(),
            mem.for_each_chunk(START, 512, Access::Write, |_, _, _| {
                panic!("no pointer for a write into a read-only range")
            })
            .unwrap_err(),
            mem.check_access(START, SIZE, Access::Write).unwrap_err(),
        ] {
            assert!(
                matches!(
                    err,
                    MemoryError::AccessDenied {
                        access: Access::Write,
                        perm: Perm::ReadOnly,
                        ..
                    }
                ),
                "{err}"
            );
        }
        mem.read(START, &mut back).unwrap();
        assert_eq!(back, [0x5a; 16], "nothing was written");
    }

    #[test]
    fn a_read_only_fd_maps_for_a_read_only_range_and_is_named_for_a_writable_one() {
        let fd = driver_file();
        let ro: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .into();
        let ro2 = crate::sys::dup_cloexec(ro.as_fd()).unwrap();
        assert!(map_entry("t0", &entry(VDUSE_ACCESS_RO), ro).is_ok());
        let err = map_entry("t0", &entry(VDUSE_ACCESS_RW), ro2).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "VDUSE device \"t0\": IOVA {START:#x}..={:#x}: ",
                START + SIZE - 1
            )),
            "{err}"
        );
    }

    #[test]
    fn read_write_and_write_only_ranges_keep_their_permission() {
        let rw = map_entry("t0", &entry(VDUSE_ACCESS_RW), driver_file()).unwrap();
        assert_eq!(prot_of(rw.as_ptr() as usize), "rw-s");
        let mem = GuestMemory::new(vec![rw]).unwrap();
        mem.write(START, &[3; 4]).unwrap();
        let wo = map_entry("t0", &entry(VDUSE_ACCESS_WO), driver_file()).unwrap();
        assert_eq!(wo.perm(), Perm::WriteOnly);
        let mem = GuestMemory::new(vec![wo]).unwrap();
        mem.write(START, &[3; 4]).unwrap();
        let err = mem.read_u16(START).unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::AccessDenied {
                    access: Access::Read,
                    ..
                }
            ),
            "{err}"
        );
        let err = map_entry("t0", &entry(0), driver_file()).unwrap_err();
        assert!(err.to_string().contains("IOTLB permission 0x0"), "{err}");
    }
}
