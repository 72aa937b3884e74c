//! A packed device ring in hostile guest memory ([`crate::ring`] has the ops and the
//! invariants). Byte 0: size b + 1 (1 to 256, any size: packed rings need no power of
//! two); byte 1: bit 0 EVENT_IDX, bit 1 INDIRECT_DESC. Op 6 makes a descriptor available
//! the way a driver does (next slot, AVAIL/USED bits from the driver's wrap counter); op 7
//! writes any descriptor, flags included, at any slot.

use vhost_core::vring::{RingLayout, DESC_F_AVAIL, DESC_F_USED};

use crate::input::Input;
use crate::ring::Harness;

/// A packed descriptor as the driver lays it out.
pub fn desc(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&id.to_le_bytes());
    d[14..].copy_from_slice(&flags.to_le_bytes());
    d
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let size = u16::from(input.u8()) + 1;
    let features = input.u8();
    let layout = RingLayout::packed_at(u32::from(size), 0).expect("layout");
    let mut h = Harness::new(layout, features & 1 != 0, features & 2 != 0);
    // The driver's next slot and wrap counter, for op 6.
    let (mut slot, mut wrap) = (0u16, true);
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        if h.common_op(op, &mut input) {
            continue;
        }
        let (addr, len) = (crate::ring::addr(input.u16()), u32::from(input.u16()));
        let raw_id = input.u16();
        let id = if raw_id & 0x8000 != 0 {
            raw_id
        } else {
            raw_id % size
        };
        let bits = u16::from(input.u8()) & 0x7; // NEXT, WRITE, INDIRECT
        if op % 8 == 6 {
            let flags = bits | if wrap { DESC_F_AVAIL } else { DESC_F_USED };
            let _ = h.mem.write(
                layout.desc() + 16 * u64::from(slot),
                &desc(addr, len, id, flags),
            );
            slot += 1;
            if slot == size {
                slot = 0;
                wrap = !wrap;
            }
        } else {
            let at = u64::from(input.u8()) % u64::from(size);
            let flags = bits | (input.u16() & (DESC_F_AVAIL | DESC_F_USED));
            let _ = h
                .mem
                .write(layout.desc() + 16 * at, &desc(addr, len, id, flags));
        }
    }
}
