//! A split device ring in hostile guest memory ([`crate::ring`] has the ops and the
//! invariants). Byte 0: size 2^(b % 8) (1 to 128); byte 1: bit 0 EVENT_IDX, bit 1
//! INDIRECT_DESC. Op 6 makes a head available (avail ring entry, then avail.idx + 1);
//! op 7 writes a descriptor.

use vhost_core::vring::RingLayout;

use crate::input::Input;
use crate::ring::Harness;

/// A split descriptor as the driver lays it out.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let size = 1u32 << (input.u8() % 8);
    let features = input.u8();
    let layout = RingLayout::split_at(size, 0).expect("layout");
    let mut h = Harness::new(layout, features & 1 != 0, features & 2 != 0);
    let avail = layout.avail_or_driver();
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        if h.common_op(op, &mut input) {
            continue;
        }
        if op % 8 == 6 {
            let raw = input.u16();
            let head = if raw & 0x8000 != 0 {
                raw
            } else {
                raw % size as u16
            };
            let idx = h.mem.read_u16(avail + 2).unwrap_or(0);
            let _ = h
                .mem
                .write_u16(avail + 4 + 2 * u64::from(idx % size as u16), head);
            let _ = h.mem.write_u16(avail + 2, idx.wrapping_add(1));
        } else {
            let i = u64::from(input.u8()) % u64::from(size);
            let (addr, len) = (crate::ring::addr(input.u16()), u32::from(input.u16()));
            let (flags, next) = (u16::from(input.u8()), u16::from(input.u8()));
            let _ = h
                .mem
                .write(layout.desc() + 16 * i, &desc(addr, len, flags, next));
        }
    }
}
