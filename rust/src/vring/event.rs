//! Notification suppression helpers shared by both ring formats.

use crate::memory::GuestMemory;

use super::Result;

/// EVENT_IDX rule (`vring_need_event`): notify if index `event` is among the entries
/// [old, new) published since the last decision, in wrapping u16 arithmetic.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Packed event suppression flags (the low two bits of the flags word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventFlags {
    /// Notify on every buffer.
    Enable,
    /// Never notify.
    Disable,
    /// Notify when the descriptor at `off_wrap` is reached (needs EVENT_IDX).
    Desc,
    /// Value 3, reserved by the spec (ADVERSARIAL F6).
    Reserved,
}

impl EventFlags {
    /// The raw flags value of [`EventFlags::Enable`].
    pub const ENABLE: u16 = 0;
    /// The raw flags value of [`EventFlags::Disable`].
    pub const DISABLE: u16 = 1;
    /// The raw flags value of [`EventFlags::Desc`].
    pub const DESC: u16 = 2;

    /// Decodes the two flag bits; the reserved value is kept, not refused, so the caller decides.
    pub fn from_bits(flags: u16) -> Self {
        match flags & 3 {
            0 => EventFlags::Enable,
            1 => EventFlags::Disable,
            2 => EventFlags::Desc,
            _ => EventFlags::Reserved,
        }
    }

    /// The raw value to write back into the ring.
    pub fn bits(self) -> u16 {
        match self {
            EventFlags::Enable => 0,
            EventFlags::Disable => 1,
            EventFlags::Desc => 2,
            EventFlags::Reserved => 3,
        }
    }
}

/// A packed ring event suppression structure (`struct pvirtq_event_suppress`): a ring
/// offset (bits 0-14) with a wrap counter (bit 15), and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSuppress {
    /// Ring offset (bits 0-14) and wrap counter (bit 15) of the descriptor to notify at.
    pub off_wrap: u16,
    /// When to notify.
    pub flags: EventFlags,
}

impl EventSuppress {
    /// Reads the structure the peer wrote at `addr`, checking it is backed by guest memory.
    pub fn read(mem: &GuestMemory, addr: u64) -> Result<Self> {
        let off_wrap = mem.read_u16(addr)?;
        let flags = EventFlags::from_bits(mem.read_u16(addr.wrapping_add(2))?);
        Ok(Self { off_wrap, flags })
    }

    /// Writes off_wrap before flags so a reader that sees DESC sees its offset.
    pub fn write(&self, mem: &GuestMemory, addr: u64) -> Result<()> {
        mem.write_u16(addr, self.off_wrap)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_u16(addr.wrapping_add(2), self.flags.bits())?;
        Ok(())
    }

    /// The ring offset half of `off_wrap`.
    pub fn offset(&self) -> u16 {
        self.off_wrap & 0x7fff
    }

    /// The wrap counter half of `off_wrap`.
    pub fn wrap(&self) -> bool {
        self.off_wrap & 0x8000 != 0
    }
}

/// Packed EVENT_IDX decision: the peer asked to be notified when slot `event_off` with wrap
/// counter `event_wrap` is passed; since the last decision our position moved `moved`
/// descriptors forward, to `new_off` with wrap counter `new_wrap`, on a ring of `size`.
pub(crate) fn packed_need_event(
    event_off: u16,
    event_wrap: bool,
    new_off: u16,
    new_wrap: bool,
    moved: u32,
    size: u16,
) -> bool {
    if moved == 0 {
        return false;
    }
    if moved >= u32::from(size) {
        // The whole ring went by: the event slot was certainly passed.
        return true;
    }
    // Work in i32 positions where `new` is new_off and `event` is shifted back one ring if
    // its wrap counter differs (it belongs to the previous lap); then the split rule.
    let size = i32::from(size);
    let new = i32::from(new_off);
    let old = new - moved as i32;
    let mut event = i32::from(event_off);
    if event_wrap != new_wrap {
        event -= size;
    }
    // event in [old, new), as `need_event` decides for split rings.
    event >= old && event < new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_window() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(!need_event(2, 1, 0));
        assert!(need_event(0xffff, 0, 0xfffe));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 10));
        assert!(need_event(0xfff0, 0x10, 0xffe0));
    }

    #[test]
    fn packed_need_event_across_wraps() {
        // size 8: moved from 6 to 2 (wrapped; new wrap false), event at 7 of the old lap.
        assert!(packed_need_event(7, true, 2, false, 4, 8));
        assert!(packed_need_event(1, false, 2, false, 4, 8));
        assert!(!packed_need_event(2, false, 2, false, 4, 8));
        assert!(!packed_need_event(5, true, 2, false, 4, 8));
        assert!(packed_need_event(6, true, 2, false, 4, 8));
        assert!(!packed_need_event(3, true, 2, false, 0, 8));
        assert!(packed_need_event(3, true, 2, false, 8, 8));
    }
}
