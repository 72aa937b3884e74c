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

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::abi::IotlbEntry;
use super::{Result, VduseDevice, VduseError};
use crate::memory::{GuestMemory, GuestRegion, MemoryError, RegionInfo};

/// The IOVA ranges mapped so far.
#[derive(Debug, Default)]
pub struct IovaSpace {
    regions: Vec<(IotlbEntry, Arc<GuestRegion>)>,
}

/// Maps one entry: `start..=last` of the IOVA space at `offset` of `fd`.
fn map_entry(dev: &str, entry: &IotlbEntry, fd: OwnedFd) -> Result<Arc<GuestRegion>> {
    let err = |source| VduseError::Memory {
        device: dev.into(),
        start: entry.start,
        last: entry.last,
        source,
    };
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
    // The kernel's own files: not sealed memfds, but nobody else can shrink them.
    GuestRegion::map(info, fd, false).map(Arc::new).map_err(err)
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
