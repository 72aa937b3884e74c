//! The device side of either ring format behind one type, with the vhost-user encoding of
//! ring bases: what a back-end keeps per queue.

use crate::memory::GuestMemory;

use super::{DescriptorChain, PackedDevice, Result, RingLayout, SplitDevice, VringError};

/// A device-side virtqueue, split or packed.
#[derive(Debug)]
pub enum DeviceQueue {
    /// A split ring (the default format).
    Split(SplitDevice),
    /// A packed ring (VIRTIO_F_RING_PACKED).
    Packed(PackedDevice),
}

impl DeviceQueue {
    /// `event_idx` and `indirect` are the negotiated VIRTIO_RING_F_EVENT_IDX and
    /// VIRTIO_F_INDIRECT_DESC; the format comes from the layout.
    pub fn new(layout: RingLayout, event_idx: bool, indirect: bool) -> Result<Self> {
        Ok(if layout.is_packed() {
            DeviceQueue::Packed(PackedDevice::new(layout, event_idx, indirect)?)
        } else {
            DeviceQueue::Split(SplitDevice::new(layout, event_idx, indirect)?)
        })
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        match self {
            DeviceQueue::Split(q) => q.size(),
            DeviceQueue::Packed(q) => q.size(),
        }
    }

    /// Which format the queue was built for, so callers can pick the matching base encoding.
    pub fn is_packed(&self) -> bool {
        matches!(self, DeviceQueue::Packed(_))
    }

    /// True once an error from shared memory has stopped the queue (see [`VringError::Broken`]).
    pub fn is_broken(&self) -> bool {
        match self {
            DeviceQueue::Split(q) => q.is_broken(),
            DeviceQueue::Packed(q) => q.is_broken(),
        }
    }

    /// Pops up to `max` chains the driver has made available, each walked and checked.
    pub fn pop_batch(&mut self, mem: &GuestMemory, max: usize) -> Result<Vec<DescriptorChain>> {
        match self {
            DeviceQueue::Split(q) => q.pop_batch(mem, max),
            DeviceQueue::Packed(q) => q.pop_batch(mem, max),
        }
    }

    /// [`pop_batch`](Self::pop_batch) that also appends each packed buffer's ring
    /// descriptors to `ring` (see [`PackedDevice::pop_batch_recording`]); split buffers
    /// stay in the descriptor table, so a split ring records nothing.
    pub fn pop_batch_recording(
        &mut self,
        mem: &GuestMemory,
        max: usize,
        ring: &mut Vec<(u64, u32, u16, u16)>,
    ) -> Result<Vec<DescriptorChain>> {
        match self {
            DeviceQueue::Split(q) => q.pop_batch(mem, max),
            DeviceQueue::Packed(q) => q.pop_batch_recording(mem, max, ring),
        }
    }

    /// Pops the next chain allowing its buffers to lie in IOTLB holes (behind an IOMMU
    /// whose IOMMU side left a miss on a buffer unanswered): the device meets the hole when
    /// it touches the buffer and fails that one request. A miss on a descriptor or an
    /// indirect table still consumes nothing; [`discard_head`](Self::discard_head) then.
    /// `ring` records a packed buffer's ring descriptors as
    /// [`pop_batch_recording`](Self::pop_batch_recording) does.
    pub fn pop_with_holes(
        &mut self,
        mem: &GuestMemory,
        ring: Option<&mut Vec<(u64, u32, u16, u16)>>,
    ) -> Result<Option<DescriptorChain>> {
        match self {
            DeviceQueue::Split(q) => q.pop_with_holes(mem),
            DeviceQueue::Packed(q) => q.pop_with_holes(mem, ring),
        }
    }

    /// Consumes the next available head without walking its descriptor table (split) or
    /// any indirect table, and without touching its buffers: a chain with no segments and
    /// no writable bytes, in flight until the caller returns it as used (length 0). What a
    /// device behind an IOMMU does with a request whose descriptors the IOMMU side never
    /// mapped: it can only be given back, unread. None if nothing is available.
    pub fn discard_head(
        &mut self,
        mem: &GuestMemory,
        ring: Option<&mut Vec<(u64, u32, u16, u16)>>,
    ) -> Result<Option<DescriptorChain>> {
        match self {
            DeviceQueue::Split(q) => q.discard(mem),
            DeviceQueue::Packed(q) => q.discard(mem, ring),
        }
    }

    /// Hands buffers back as (head, bytes written) pairs, in one used-index update.
    pub fn add_used_batch(&mut self, mem: &GuestMemory, used: &[(u16, u32)]) -> Result<()> {
        match self {
            DeviceQueue::Split(q) => q.add_used_batch(mem, used),
            DeviceQueue::Packed(q) => q.add_used_batch(mem, used),
        }
    }

    /// Whether the driver asked to be notified of the buffers used since the last decision
    /// (EVENT_IDX or the flags); call it once per batch, after `add_used_batch`.
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> Result<bool> {
        match self {
            DeviceQueue::Split(q) => q.needs_notification(mem),
            DeviceQueue::Packed(q) => q.needs_notification(mem),
        }
    }

    /// See [`SplitDevice::set_notification`]: after enabling, whether buffers are pending.
    pub fn set_notification(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        match self {
            DeviceQueue::Split(q) => q.set_notification(mem, enable),
            DeviceQueue::Packed(q) => q.set_notification(mem, enable),
        }
    }

    /// Split rings: the next used index (inflight tracking records it).
    pub fn split_used_index(&self) -> Option<u16> {
        match self {
            DeviceQueue::Split(q) => Some(q.next_used()),
            DeviceQueue::Packed(_) => None,
        }
    }

    /// Packed rings: the next used slot and its wrap counter.
    pub fn packed_used_position(&self) -> Option<(u16, bool)> {
        match self {
            DeviceQueue::Split(_) => None,
            DeviceQueue::Packed(q) => Some(q.next_used()),
        }
    }

    /// Where the next used element goes, in the encoding of one half of a ring base
    /// (split: the used index; packed: the slot in bits 0-14, its wrap counter in bit 15).
    pub fn next_used_position(&self) -> u32 {
        match self {
            DeviceQueue::Split(q) => u32::from(q.next_used()),
            DeviceQueue::Packed(q) => {
                let (used, wrap) = q.next_used();
                packed_half(used, wrap)
            }
        }
    }

    /// See [`SplitDevice::resubmit`]; a packed ring is given its buffers' ring descriptors
    /// instead ([`PackedDevice::resubmit`]), so here it has nothing to take back.
    pub fn resubmit(&mut self, mem: &GuestMemory, heads: &[u16]) -> Result<Vec<DescriptorChain>> {
        match self {
            DeviceQueue::Split(q) => q.resubmit(mem, heads),
            DeviceQueue::Packed(_) => Ok(Vec::new()),
        }
    }

    /// The ring base in vhost-user's encoding (GET_VRING_BASE). Split: the next avail
    /// index. Packed: bits 0-14 the next avail slot, bit 15 its wrap counter, bits 16-30
    /// the next used slot and bit 31 its wrap counter (the layout QEMU and Linux use).
    pub fn base(&self) -> u32 {
        match self {
            DeviceQueue::Split(q) => u32::from(q.next_avail()),
            DeviceQueue::Packed(q) => {
                let (avail, aw) = q.next_avail();
                let (used, uw) = q.next_used();
                packed_half(avail, aw) | (packed_half(used, uw) << 16)
            }
        }
    }

    /// Restores a base from SET_VRING_BASE (same encoding as [`base`](Self::base)). For a
    /// split ring the used index is re-read from the ring, so that a back-end that
    /// reconnects continues where the driver saw the last completion (ADVERSARIAL J2).
    pub fn restore(&mut self, mem: &GuestMemory, base: u32) -> Result<()> {
        match self {
            DeviceQueue::Split(q) => {
                let avail = u16::try_from(base).map_err(|_| VringError::InvalidBase(base))?;
                q.set_next_avail(avail);
                q.sync_used_from_ring(mem)
            }
            DeviceQueue::Packed(q) => {
                let (avail, aw) = unpack_half(base);
                q.set_next_avail(avail, aw)?;
                // A front-end that sends only the avail half (used half 0 with wrap 0)
                // means "used where avail is": nothing was in flight.
                let (used, uw) = if base >> 16 == 0 {
                    (avail, aw)
                } else {
                    unpack_half(base >> 16)
                };
                q.set_next_used(used, uw)
            }
        }
    }
}

fn packed_half(idx: u16, wrap: bool) -> u32 {
    u32::from(idx & 0x7fff) | (u32::from(wrap) << 15)
}

fn unpack_half(v: u32) -> (u16, bool) {
    ((v & 0x7fff) as u16, v & 0x8000 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::allocate(&[(0, 0x10000)]).unwrap()
    }

    #[test]
    fn split_base_round_trips_and_rereads_used() {
        let mem = mem();
        let layout = RingLayout::split_at(8, 0x1000).unwrap();
        // The driver had seen 5 completions before the back-end went away.
        mem.write_u16(layout.used_or_device() + 2, 5).unwrap();
        let mut q = DeviceQueue::new(layout, true, true).unwrap();
        q.restore(&mem, 7).unwrap();
        assert_eq!(q.base(), 7);
        match &q {
            DeviceQueue::Split(s) => assert_eq!(s.next_used(), 5),
            DeviceQueue::Packed(_) => panic!("split expected"),
        }
        assert!(matches!(
            q.restore(&mem, 0x1_0000),
            Err(VringError::InvalidBase(0x1_0000))
        ));
    }

    #[test]
    fn packed_base_encodes_both_halves() {
        let mem = mem();
        let layout = RingLayout::packed_at(6, 0x1000).unwrap();
        let mut q = DeviceQueue::new(layout, false, false).unwrap();
        assert!(q.is_packed());
        // Fresh ring: both wrap counters start at 1.
        assert_eq!(q.base(), 0x8000_8000);
        q.restore(&mem, 3 | (1 << 16) | (1 << 31)).unwrap();
        assert_eq!(q.base(), 3 | (1 << 16) | (1 << 31));
        // Avail half only: used follows avail.
        q.restore(&mem, 2 | 0x8000).unwrap();
        assert_eq!(q.base(), 0x8002_8002);
        assert!(q.restore(&mem, 9).is_err(), "slot beyond the ring size");
    }
}
