//! What the split and packed ring targets share: guest memory with a hole, the device
//! queue under test, and the model the invariants are checked against.
//!
//! Ops (one byte each, then their arguments): poke guest memory (the driver rewriting
//! anything at any time, TOCTOU included), pop a batch, complete one buffer or a batch
//! (with valid, zero or arbitrary lengths, heads in flight or not), ask whether to
//! notify, switch notifications, and two ring-specific ops that make buffers available.
//!
//! Invariants after every op:
//! - a popped head (split) or buffer id (packed) is never handed out again while it is in
//!   flight, not even within one batch;
//! - every segment is non-empty and lies inside one memory region (the hole between them
//!   is never covered), readable segments come before writable ones, a chain has at most
//!   queue-size segments and its lengths fit a u32;
//! - completing a head that is not in flight, twice in one batch, or with more bytes than
//!   it can take, is refused and changes nothing;
//! - the device writes guest memory only inside the ring areas it owns;
//! - a broken queue stays broken: every later pop and completion fails.

use std::collections::HashMap;

use vhost_core::memory::GuestMemory;
use vhost_core::vring::{DeviceQueue, RingLayout};

use crate::input::Input;

/// Two regions with a hole between them (0x2000..0x3000); addresses the ops make fall in
/// 0..0x4000, so that they hit memory, the hole and the end alike.
pub const REGIONS: [(u64, u64); 2] = [(0, 0x2000), (0x3000, 0x1000)];

/// A buffer address from 16 fuzz bits: mostly in 0..0x4000, with the top bit far away.
pub fn addr(raw: u16) -> u64 {
    if raw & 0x8000 != 0 {
        u64::from(raw) << 33
    } else {
        u64::from(raw & 0x3fff)
    }
}

pub fn memory() -> GuestMemory {
    GuestMemory::allocate(&REGIONS).expect("guest memory")
}

fn inside(addr: u64, len: u64) -> bool {
    REGIONS.iter().any(|&(start, size)| {
        addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
    })
}

/// The device queue under test and what the harness knows about it.
pub struct Harness {
    pub mem: GuestMemory,
    pub q: DeviceQueue,
    pub layout: RingLayout,
    /// Heads (buffer ids) in flight, with the writable bytes of each.
    pub in_flight: HashMap<u16, u32>,
    /// Guest-physical ranges the device may write.
    device_writes: Vec<(u64, u64)>,
}

fn snapshot(mem: &GuestMemory) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, size)| {
            let mut b = vec![0u8; size as usize];
            mem.read(start, &mut b).expect("read back guest memory");
            b
        })
        .collect()
}

impl Harness {
    pub fn new(layout: RingLayout, event_idx: bool, indirect: bool) -> Self {
        let mem = memory();
        let q = DeviceQueue::new(layout, event_idx, indirect).expect("ring");
        let n = u64::from(layout.size());
        let device_writes = if layout.is_packed() {
            vec![(layout.desc(), 16 * n), (layout.used_or_device(), 4)]
        } else {
            vec![(layout.used_or_device(), 6 + 8 * n)]
        };
        Harness {
            mem,
            q,
            layout,
            in_flight: HashMap::new(),
            device_writes,
        }
    }

    /// Runs a device op and checks it wrote nothing outside the ring areas it owns.
    fn device<R>(&mut self, op: impl FnOnce(&mut DeviceQueue, &GuestMemory) -> R) -> R {
        let before = snapshot(&self.mem);
        let r = op(&mut self.q, &self.mem);
        let after = snapshot(&self.mem);
        for (k, &(start, _)) in REGIONS.iter().enumerate() {
            if before[k] == after[k] {
                continue;
            }
            for (i, (a, b)) in before[k].iter().zip(&after[k]).enumerate() {
                let gpa = start + i as u64;
                assert!(
                    a == b
                        || self
                            .device_writes
                            .iter()
                            .any(|&(s, l)| gpa >= s && gpa < s + l),
                    "the device wrote {gpa:#x}, outside its ring areas {:?}",
                    self.device_writes
                );
            }
        }
        r
    }

    pub fn pop(&mut self, max: usize) {
        let was_broken = self.q.is_broken();
        match self.device(|q, mem| q.pop_batch(mem, max)) {
            Ok(chains) => {
                assert!(!was_broken, "a broken queue popped");
                assert!(chains.len() <= max);
                for c in chains {
                    let size = self.layout.size();
                    assert!(c.head < size, "head {} of a ring of {size}", c.head);
                    assert!(
                        !self.in_flight.contains_key(&c.head),
                        "head {} handed out twice while in flight",
                        c.head
                    );
                    assert!(
                        c.segments.len() <= usize::from(size),
                        "chain longer than the ring"
                    );
                    let mut total = 0u64;
                    let mut seen_writable = false;
                    for s in &c.segments {
                        assert_ne!(s.len, 0, "empty segment");
                        assert!(
                            inside(s.addr, u64::from(s.len)),
                            "segment {:#x}+{:#x} outside guest memory",
                            s.addr,
                            s.len
                        );
                        assert!(!seen_writable || s.writable, "readable after writable");
                        seen_writable |= s.writable;
                        total += u64::from(s.len);
                    }
                    assert!(total <= u64::from(u32::MAX), "chain longer than 4 GiB");
                    self.in_flight.insert(c.head, c.writable_len());
                }
            }
            Err(_) => assert!(self.q.is_broken(), "a failed pop left the queue running"),
        }
    }

    pub fn complete(&mut self, used: &[(u16, u32)]) {
        let was_broken = self.q.is_broken();
        let mut valid = true;
        let mut seen = Vec::new();
        for &(head, len) in used {
            valid &= !seen.contains(&head) && self.in_flight.get(&head).is_some_and(|&m| len <= m);
            seen.push(head);
        }
        let r = self.device(|q, mem| q.add_used_batch(mem, used));
        if was_broken || !valid {
            assert!(
                r.is_err(),
                "completion {used:?} accepted (broken: {was_broken})"
            );
        }
        if r.is_ok() {
            for (head, _) in used {
                self.in_flight.remove(head);
            }
        }
    }

    /// Applies one common op; returns false for the ring-specific op codes (6, 7).
    pub fn common_op(&mut self, op: u8, input: &mut Input<'_>) -> bool {
        match op % 8 {
            0 => {
                let (start, size) = REGIONS[usize::from(input.u8() & 1)];
                let at = start + u64::from(input.u16()) % size;
                let n = usize::from(input.u8() % 32);
                let bytes = input.bytes(n);
                let _ = self.mem.write(at, bytes);
            }
            1 => self.pop(usize::from(input.u8() % 8) + 1),
            2 => {
                let sel = input.u8();
                let mode = input.u8() % 4;
                let heads: Vec<(u16, u32)> = self.in_flight.iter().map(|(&h, &w)| (h, w)).collect();
                let (head, max) = match heads.get(usize::from(sel) % heads.len().max(1)) {
                    Some(&hw) if mode != 3 => hw,
                    _ => (u16::from(sel), 0),
                };
                let len = match mode {
                    0 => max,
                    1 => 0,
                    _ => input.u32(),
                };
                self.complete(&[(head, len)]);
            }
            3 => {
                let k = usize::from(input.u8() % 8);
                let mut heads: Vec<(u16, u32)> =
                    self.in_flight.iter().map(|(&h, &w)| (h, w)).collect();
                heads.sort_unstable();
                let used: Vec<(u16, u32)> = (0..k)
                    .filter_map(|_| {
                        let i = usize::from(input.u8());
                        heads.get(i % heads.len().max(1)).copied()
                    })
                    .collect();
                self.complete(&used);
            }
            4 => {
                let was_broken = self.q.is_broken();
                let r = self.device(|q, mem| q.needs_notification(mem));
                if was_broken {
                    assert!(r.is_err());
                }
            }
            5 => {
                let on = input.bool();
                let was_broken = self.q.is_broken();
                let r = self.device(|q, mem| q.set_notification(mem, on));
                if was_broken {
                    assert!(r.is_err());
                }
            }
            _ => return false,
        }
        true
    }
}
