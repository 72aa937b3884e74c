//! Dirty logging of the device side's writes into guest memory (live migration): the one
//! place that knows which guest-physical bytes a completion wrote, so a back-end marks them
//! in the front-end's [`DirtyLog`] and the guest pages travel again.
//!
//! What a completion writes: the buffers' writable descriptors (every writable byte of each
//! completed chain is marked, not only the first `len`: a device may report fewer bytes
//! than it wrote, as virtio-blk does for a failed read whose status byte sits after the
//! data, and a page marked needlessly is only sent twice, while a page missed is a
//! corrupt guest), and the ring's own fields. Split rings: the used elements, `used.flags`
//! and `used.idx`, and `avail_event` with EVENT_IDX, all at the used ring's log address the
//! front-end gave (`SET_VRING_ADDR`'s `log_addr` with `VHOST_VRING_F_LOG`, a guest-physical
//! address). Packed rings: the device writes used descriptors into the descriptor ring and
//! its suppression flags into the device event area; QEMU's `log_addr` for a packed ring
//! names only the device area, so both are marked at their guest-physical addresses from
//! the ring layout.
//!
//! Behind a vIOMMU (`VIRTIO_F_ACCESS_PLATFORM`) every one of those addresses is I/O
//! virtual: the buffers', the ring layout's, and the used ring's log address too. QEMU's
//! `vhost_virtqueue_set_addr` sends `log_guest_addr = used_phys`, the used ring's address
//! as the driver programmed it, which with an IOMMU is the I/O virtual address the ring
//! addresses themselves are (`vhost_memory_map` hands I/O virtual addresses through
//! unchanged when the device has an IOMMU), and DPDK's vhost library translates it
//! (`translate_log_addr`: I/O virtual -> its own virtual address through the IOTLB ->
//! guest-physical through the memory table) before logging, as it does for buffers
//! (`vhost_log_write_iova`). The log itself stays indexed by guest-physical page. So a
//! [`RingLog`] behind an IOMMU carries the IOTLB view the addresses are in, and every
//! range is marked through it ([`DirtyLog::mark_in`]), piece by piece where it lands in
//! guest-physical memory; without one, addresses are marked as they are (the flat path).

use crate::memory::dirty_log::{DirtyLog, DirtyLogError};
use crate::memory::GuestMemory;

use super::{DeviceQueue, Segment, DESC_SIZE};

/// Where one ring's device-side writes are logged.
#[derive(Clone, Copy, Debug)]
pub struct RingLog<'a> {
    /// The bitmap the front-end shared with SET_LOG_BASE.
    pub log: &'a DirtyLog,
    /// The used ring's log address when the front-end asked for the ring to be logged
    /// (`VHOST_VRING_F_LOG`): guest-physical, or I/O virtual behind an IOMMU; `None` logs
    /// buffers only, as the kernel does.
    pub used_log_addr: Option<u64>,
    /// Behind an IOMMU: the IOTLB view the ring's and buffers' addresses are in (the one
    /// the chains were popped from), through which each range is translated to the
    /// guest-physical pages it wrote. `None`: addresses are guest-physical already.
    pub iova_view: Option<&'a GuestMemory>,
}

/// Position of the next used element, taken before a completion so that
/// [`DeviceQueue::log_ring`] knows which elements it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedPosition {
    slot: u16,
    wrap: bool,
}

impl RingLog<'_> {
    /// Marks every writable segment of a completed chain.
    pub fn mark_buffers<'s>(
        &self,
        segments: impl IntoIterator<Item = &'s Segment>,
    ) -> Result<(), DirtyLogError> {
        for s in segments.into_iter().filter(|s| s.writable) {
            self.mark(s.addr, u64::from(s.len))?;
        }
        Ok(())
    }

    /// Marks `len` bytes at the ring's address `addr` (translated behind an IOMMU).
    fn mark(&self, addr: u64, len: u64) -> Result<(), DirtyLogError> {
        match self.iova_view {
            None => self.log.mark(addr, len),
            Some(view) => self.log.mark_in(view, addr, len),
        }
    }

    /// Marks `count` consecutive `elem`-byte elements of a ring of `size` starting at slot
    /// `first` (wrapping once at most), the array beginning at guest address `array`.
    fn mark_elements(
        &self,
        array: u64,
        elem: u64,
        size: u16,
        first: u16,
        count: u32,
    ) -> Result<(), DirtyLogError> {
        let count = count.min(u32::from(size));
        if count == 0 {
            return Ok(());
        }
        let first = u32::from(first % size);
        let run = count.min(u32::from(size) - first);
        self.mark(
            array.wrapping_add(elem * u64::from(first)),
            elem * u64::from(run),
        )?;
        if count > run {
            self.mark(array, elem * u64::from(count - run))?;
        }
        Ok(())
    }
}

impl DeviceQueue {
    /// Where the next used element goes (see [`log_ring`](Self::log_ring)).
    pub fn used_position(&self) -> UsedPosition {
        match self {
            DeviceQueue::Split(q) => UsedPosition {
                slot: q.next_used(),
                wrap: false,
            },
            DeviceQueue::Packed(q) => {
                let (slot, wrap) = q.next_used();
                UsedPosition { slot, wrap }
            }
        }
    }

    /// Marks the ring fields the device wrote since `from` (the used elements) and the
    /// fields it writes on every pass (used index and flags, the event suppression field),
    /// if the front-end asked for the ring to be logged.
    pub fn log_ring(&self, log: &RingLog<'_>, from: UsedPosition) -> Result<(), DirtyLogError> {
        let Some(used_log) = log.used_log_addr else {
            return Ok(());
        };
        match self {
            DeviceQueue::Split(q) => {
                let size = q.size();
                let moved = q.next_used().wrapping_sub(from.slot);
                log.mark_elements(used_log.wrapping_add(4), 8, size, from.slot, moved.into())?;
                // used.flags and used.idx.
                log.mark(used_log, 4)?;
                if q.event_idx() {
                    log.mark(used_log.wrapping_add(4 + 8 * u64::from(size)), 2)?;
                }
                Ok(())
            }
            DeviceQueue::Packed(q) => {
                let size = u32::from(q.size());
                let (desc, device_event) = q.written_areas();
                let (to, to_wrap) = q.next_used();
                let (from_abs, to_abs) = (u32::from(from.slot), u32::from(to));
                let moved = if (to_wrap == from.wrap && to_abs >= from_abs) || to_abs > from_abs {
                    to_abs - from_abs
                } else {
                    to_abs + size - from_abs
                };
                log.mark_elements(desc, DESC_SIZE, q.size(), from.slot, moved)?;
                log.mark(device_event, 4)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::dirty_log::LOG_PAGE_SIZE as PAGE;
    use crate::memory::GuestMemory;
    use crate::vring::{PackedDriver, RingLayout, SplitDriver};

    const RING: u64 = 0x10_0000;
    const BUF: u64 = 0x30_0000;
    /// Where the front-end says the used ring is logged: not the ring's own address, so
    /// the test tells the two apart.
    const LOG_ADDR: u64 = 0x20_0000;

    /// The driver side of either format: offers one writable buffer.
    trait Offer {
        fn offer(&mut self, m: &GuestMemory, addr: u64);
    }

    impl Offer for SplitDriver {
        fn offer(&mut self, m: &GuestMemory, addr: u64) {
            self.add(m, &[], &[(addr, PAGE as u32)]).unwrap();
            self.publish(m).unwrap();
            self.poll_used(m).unwrap();
        }
    }

    impl Offer for PackedDriver {
        fn offer(&mut self, m: &GuestMemory, addr: u64) {
            self.add(m, &[], &[(addr, PAGE as u32)]).unwrap();
            self.publish(m).unwrap();
            self.poll_used(m).unwrap();
        }
    }

    struct Rig<D> {
        m: GuestMemory,
        drv: D,
        dev: DeviceQueue,
        log: DirtyLog,
    }

    impl<D: Offer> Rig<D> {
        fn new(layout: RingLayout, drv: impl FnOnce(RingLayout) -> D) -> Self {
            Self {
                m: GuestMemory::allocate(&[(0, 0x40_0000)]).unwrap(),
                drv: drv(layout),
                dev: DeviceQueue::new(layout, false, false).unwrap(),
                log: DirtyLog::allocate(0x40_0000).unwrap(),
            }
        }

        /// Pops and completes `n` one-page buffers, logging as the daemon does; returns
        /// the dirty pages (and clears the log).
        fn round(&mut self, n: u64, used_log_addr: Option<u64>) -> Vec<u64> {
            for i in 0..n {
                self.drv.offer(&self.m, BUF + i * PAGE);
            }
            let chains = self.dev.pop_batch(&self.m, usize::MAX).unwrap();
            assert_eq!(chains.len() as u64, n);
            let log = RingLog {
                log: &self.log,
                used_log_addr,
                iova_view: None,
            };
            let from = self.dev.used_position();
            let used: Vec<(u16, u32)> = chains.iter().map(|c| (c.head, 1)).collect();
            for c in &chains {
                log.mark_buffers(&c.segments).unwrap();
            }
            self.dev.add_used_batch(&self.m, &used).unwrap();
            self.dev.log_ring(&log, from).unwrap();
            self.log
                .take()
                .flat_map(|r| (r.start..r.end).step_by(PAGE as usize))
                .collect()
        }
    }

    fn with(mut pages: Vec<u64>, extra: &[u64]) -> Vec<u64> {
        pages.extend(extra);
        pages.sort_unstable();
        pages
    }

    #[test]
    fn split_marks_used_elements_across_the_wrap_at_the_log_address() {
        // 1024 entries: the used ring spans three pages (4 + 8 * 1024 + 2 bytes).
        // Fresh guest memory is zeroed: the rings need no init.
        let mut rig = Rig::new(RingLayout::split_at(1024, RING).unwrap(), |l| {
            SplitDriver::new(l, false).unwrap()
        });
        for _ in 0..102 {
            rig.round(10, Some(LOG_ADDR)); // 1020 elements
        }
        // Slots 1020..1023 (bytes 8164..8196) straddle the second and third page; slots
        // 0..3 and used.flags/idx are on the first.
        let buffers: Vec<u64> = (0..8).map(|i| BUF + i * PAGE).collect();
        assert_eq!(
            rig.round(8, Some(LOG_ADDR)),
            with(buffers, &[LOG_ADDR, LOG_ADDR + PAGE, LOG_ADDR + 2 * PAGE])
        );
    }

    #[test]
    fn packed_marks_used_descriptors_across_the_wrap_and_the_device_area() {
        // 512 descriptors: two pages of ring, then the two event areas on a third page.
        let mut rig = Rig::new(RingLayout::packed_at(512, RING).unwrap(), |l| {
            PackedDriver::new(l, false).unwrap()
        });
        for _ in 0..51 {
            rig.round(10, Some(LOG_ADDR)); // 510 descriptors
        }
        // Slots 510, 511 (second page), 0, 1 (first page), and the device event area.
        let buffers: Vec<u64> = (0..4).map(|i| BUF + i * PAGE).collect();
        assert_eq!(
            rig.round(4, Some(LOG_ADDR)),
            with(buffers, &[RING, RING + PAGE, RING + 2 * PAGE])
        );
        // Without VHOST_VRING_F_LOG only the buffers are logged.
        assert_eq!(rig.round(2, None), vec![BUF, BUF + PAGE]);
    }
}
