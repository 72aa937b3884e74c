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

use crate::memory::dirty_log::{DirtyLog, DirtyLogError};

use super::{DeviceQueue, Segment, DESC_SIZE};

/// Where one ring's device-side writes are logged.
#[derive(Clone, Copy, Debug)]
pub struct RingLog<'a> {
    pub log: &'a DirtyLog,
    /// The used ring's guest-physical log address when the front-end asked for the ring to
    /// be logged (`VHOST_VRING_F_LOG`); `None` logs buffers only, as the kernel does.
    pub used_log_addr: Option<u64>,
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
            self.log.mark(s.addr, u64::from(s.len))?;
        }
        Ok(())
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
        self.log.mark(
            array.wrapping_add(elem * u64::from(first)),
            elem * u64::from(run),
        )?;
        if count > run {
            self.log.mark(array, elem * u64::from(count - run))?;
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
                log.log.mark(used_log, 4)?;
                if q.event_idx() {
                    log.log
                        .mark(used_log.wrapping_add(4 + 8 * u64::from(size)), 2)?;
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
                log.log.mark(device_event, 4)
            }
        }
    }
}
