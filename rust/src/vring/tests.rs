//! Tests of both ring formats: a driver and a device sharing one GuestMemory, suppression,
//! wrap-around, every corrupt input of ADVERSARIAL C-F, and a deterministic random walk.

use super::chain::encode_split_desc;
use super::*;
use crate::memory::{GuestMemory, MemoryError};

const RING: u64 = 0;
const BUF: u64 = 0x20_0000;
const MEM_END: u64 = 0x40_0000;
const HOLE_END: u64 = 0x100_0000;

/// 4 MiB at 0, a hole, then 1 MiB.
fn mem() -> GuestMemory {
    GuestMemory::allocate(&[(0, MEM_END), (HOLE_END, 0x10_0000)]).unwrap()
}

/// A deterministic xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize).wrapping_mul(31).wrapping_add(i * 7) as u8)
        .collect()
}

/// Asserts `r` is an error matching the pattern.
macro_rules! assert_err {
    ($r:expr, $p:pat) => {
        match $r {
            Err($p) => {}
            other => panic!("expected {}, got {:?}", stringify!($p), other),
        }
    };
}

#[test]
fn rings_are_placed_contiguously_from_a_rounded_up_base() {
    assert_eq!(
        RingLayout::area_sizes(256, false).unwrap(),
        [4096, 6 + 512, 6 + 2048]
    );
    assert_eq!(RingLayout::area_sizes(3, true).unwrap(), [48, 4, 4]);
    for (size, packed) in [(3, false), (0, true), (32769, true), (0, false)] {
        assert!(matches!(
            RingLayout::area_sizes(size, packed),
            Err(VringError::InvalidSize(s)) if s == size
        ));
        assert_err!(
            RingLayout::place(size, 0, packed),
            VringError::InvalidSize(_)
        );
    }
    // An aligned base gives the same ring as split_at/packed_at.
    for packed in [false, true] {
        for size in [1, 4, 256, 32768] {
            let at = if packed {
                RingLayout::packed_at(size, 0x4000)
            } else {
                RingLayout::split_at(size, 0x4000)
            };
            assert_eq!(
                RingLayout::place(size, 0x4000, packed).unwrap(),
                at.unwrap()
            );
        }
    }
    let l = RingLayout::place(4, 0x1001, false).unwrap();
    assert_eq!((l.desc(), l.avail_or_driver()), (0x1010, 0x1010 + 64));
    assert_eq!(l.used_or_device(), (0x1010 + 64 + 6 + 8 + 3) & !3);
    let l = RingLayout::place(3, 0x1001, true).unwrap();
    assert_eq!(
        (l.desc(), l.avail_or_driver(), l.used_or_device()),
        (0x1010, 0x1040, 0x1044)
    );
    // A ring past the end of the address space is refused, not wrapped around.
    for base in [u64::MAX, u64::MAX - 15, u64::MAX - 64 * 16] {
        assert!(matches!(
            RingLayout::place(64, base, false),
            Err(VringError::Memory(MemoryError::Overflow { start, .. })) if start == base
        ));
    }
    let last = u64::MAX - (16 * 64 + 4 + 4) + 1;
    assert_eq!(
        RingLayout::place(64, last & !15, true).unwrap().desc(),
        last & !15
    );
}

#[test]
fn layouts_are_validated() {
    for size in [0, 3, 6, 1000, 32769, 65536, u32::MAX] {
        assert_err!(RingLayout::split_at(size, 0), VringError::InvalidSize(_));
    }
    for size in [1, 2, 256, 32768] {
        let l = RingLayout::split_at(size, 0).unwrap();
        assert_eq!(u32::from(l.size()), size);
        assert!(!l.is_packed());
    }
    for size in [0, 32769, 65536] {
        assert_err!(RingLayout::packed_at(size, 0), VringError::InvalidSize(_));
    }
    for size in [1, 3, 1000, 32768] {
        assert!(RingLayout::packed_at(size, 0).unwrap().is_packed());
    }
    assert_err!(
        RingLayout::split(8, 8, 0x1000, 0x2000),
        VringError::Misaligned { align: 16, .. }
    );
    assert_err!(
        RingLayout::split(8, 0, 0x1001, 0x2000),
        VringError::Misaligned { align: 2, .. }
    );
    assert_err!(
        RingLayout::split(8, 0, 0x1000, 0x2002),
        VringError::Misaligned { align: 4, .. }
    );
    assert_err!(
        RingLayout::packed(3, 0, 0x1002, 0x2000),
        VringError::Misaligned { align: 4, .. }
    );
    assert_err!(
        RingLayout::packed(3, 0, 0x1000, 0x2001),
        VringError::Misaligned { align: 4, .. }
    );
    // A split layout cannot drive a packed queue and vice versa.
    assert!(SplitDevice::new(RingLayout::packed_at(4, 0).unwrap(), false, false).is_err());
    assert!(SplitDriver::new(RingLayout::packed_at(4, 0).unwrap(), false).is_err());
}

#[test]
fn ring_areas_must_be_in_memory() {
    let m = mem();
    RingLayout::split_at(256, 0)
        .unwrap()
        .check_memory(&m)
        .unwrap();
    // Used ring running off the end of the first region (into the hole).
    let l = RingLayout::split(256, 0, 0x1000, MEM_END - 16).unwrap();
    assert_err!(
        l.check_memory(&m),
        VringError::Memory(MemoryError::OutOfRange { .. })
    );
    // Areas near the end of the address space: the sum overflows, still an error.
    let l = RingLayout::split(256, u64::MAX - 15, 0x1000, 0x2000).unwrap();
    assert!(l.check_memory(&m).is_err());
    let l = RingLayout::packed(3, 0, 0x1000, HOLE_END - 4).unwrap();
    assert!(l.check_memory(&m).is_err());
    // Contiguous regions: a range across the boundary is fine.
    let two = GuestMemory::allocate(&[(0, 0x1000), (0x1000, 0x1000)]).unwrap();
    check_range(&two, 0xff0, 0x20).unwrap();
    assert!(check_range(&two, 0xff0, 0x1020).is_err());
}

#[test]
fn layouts_from_front_end_addresses() {
    let m = mem();
    let user = m.regions()[0].info().userspace_addr;
    let l = RingLayout::from_user(&m, false, 256, user, user + 0x1000, user + 0x2000).unwrap();
    assert_eq!(
        (l.desc(), l.avail_or_driver(), l.used_or_device()),
        (0, 0x1000, 0x2000)
    );
    let l = RingLayout::from_user(&m, true, 3, user + 0x40, user + 0x100, user + 0x104).unwrap();
    assert!(l.is_packed());
    // Unknown address, misaligned area, area running into the hole.
    assert_err!(
        RingLayout::from_user(&m, false, 8, 0x10, user + 0x1000, user + 0x2000),
        VringError::Memory(_)
    );
    assert_err!(
        RingLayout::from_user(&m, false, 8, user + 8, user + 0x1000, user + 0x2000),
        VringError::Misaligned { .. }
    );
    assert_err!(
        RingLayout::from_user(&m, false, 256, user + MEM_END - 16, user, user + 0x2000),
        VringError::Memory(_)
    );
}

// ----------------------------------------------------------------------------------------
// Split rings.

fn split_pair(size: u32, event_idx: bool) -> (GuestMemory, SplitDriver, SplitDevice) {
    let m = mem();
    let layout = RingLayout::split_at(size, RING).unwrap();
    layout.check_memory(&m).unwrap();
    let mut drv = SplitDriver::new(layout, event_idx).unwrap();
    drv.init(&m).unwrap();
    let dev = SplitDevice::new(layout, event_idx, true).unwrap();
    (m, drv, dev)
}

/// The device echoes the request reversed into the writable segments.
fn serve(m: &GuestMemory, chain: &DescriptorChain) -> u32 {
    let mut data = chain.read_all(m, 1 << 16).unwrap();
    data.reverse();
    chain.write_all(m, &data).unwrap()
}

#[test]
fn split_moves_data_both_ways() {
    let (m, mut drv, mut dev) = split_pair(16, false);
    // 1, 2 and 3 segment chains, then an indirect one.
    let req = pattern(1, 300);
    m.write(BUF, &req).unwrap();
    type Segs = Vec<(u64, u32)>;
    let shapes: Vec<(Segs, Segs)> = vec![
        (vec![(BUF, 300)], vec![]),
        (vec![(BUF, 100)], vec![(BUF + 0x1000, 100)]),
        (
            vec![(BUF, 150), (BUF + 150, 150)],
            vec![(BUF + 0x2000, 300)],
        ),
        (
            vec![],
            vec![(BUF + 0x3000, 10), (BUF + 0x3100, 20), (BUF + 0x3200, 30)],
        ),
    ];
    let mut heads = Vec::new();
    for (r, w) in &shapes {
        heads.push(drv.add(&m, r, w).unwrap());
    }
    let ind = drv
        .add_indirect(
            &m,
            BUF + 0x8000,
            &[(BUF, 200)],
            &[(BUF + 0x4000, 64), (BUF + 0x5000, 200)],
        )
        .unwrap();
    assert_eq!(drv.num_free(), 16 - 9 - 1);
    // Nothing is visible before publish.
    assert!(dev.pop(&m).unwrap().is_none());
    drv.publish(&m).unwrap();
    let chains = dev.pop_batch(&m, 10).unwrap();
    assert_eq!(chains.len(), 5);
    for (c, (r, w)) in chains.iter().zip(&shapes) {
        let rs: Vec<_> = c.readable().map(|s| (s.addr, s.len)).collect();
        let ws: Vec<_> = c.writable().map(|s| (s.addr, s.len)).collect();
        assert_eq!(&rs, r);
        assert_eq!(&ws, w);
    }
    assert_eq!(chains[4].head, ind);
    assert_eq!(chains[4].readable_len(), 200);
    assert_eq!(chains[4].writable_len(), 264);
    for c in &chains {
        let n = serve(&m, c);
        dev.add_used(&m, c.head, n).unwrap();
    }
    let used = drv.poll_used(&m).unwrap();
    let mut want: Vec<(u16, u32)> = heads.iter().copied().zip([0, 100, 300, 0]).collect();
    want.push((ind, 200));
    assert_eq!(used, want);
    // The data came back reversed.
    let mut out = vec![0u8; 300];
    m.read(BUF + 0x2000, &mut out).unwrap();
    let mut rev = req.clone();
    rev.reverse();
    assert_eq!(out, rev);
    let mut out = vec![0u8; 200];
    m.read(BUF + 0x4000, &mut out[..64]).unwrap();
    m.read(BUF + 0x5000, &mut out[64..]).unwrap();
    let mut rev = req[..200].to_vec();
    rev.reverse();
    assert_eq!(out, rev);
    assert_eq!(drv.num_free(), 16);
    assert_eq!(drv.in_flight(), 0);
}

/// Many round trips with batches of up to `batch` chains of 1-3 segments.
fn split_exchange(size: u32, rounds: usize, batch: usize, event_idx: bool) {
    let (m, mut drv, mut dev) = split_pair(size, event_idx);
    let mut rng = Rng(size as u64 + 7);
    let mut total = 0usize;
    for _ in 0..rounds {
        let mut expect = Vec::new();
        for _ in 0..batch {
            let segs = 1 + rng.below(u64::from(size.min(3))) as usize;
            if drv.num_free() < segs {
                break;
            }
            let len = 1 + rng.below(64) as u32;
            let readable = vec![(BUF, len); segs - 1];
            let writable = [(BUF + 0x1000, len)];
            let head = drv.add(&m, &readable, &writable).unwrap();
            expect.push((head, if segs == 1 { 0 } else { len }));
        }
        drv.publish(&m).unwrap();
        let mut popped = 0;
        while let Some(c) = dev.pop(&m).unwrap() {
            let n = c.readable_len().min(c.writable_len());
            dev.add_used(&m, c.head, n).unwrap();
            popped += 1;
        }
        assert_eq!(popped, expect.len());
        assert_eq!(drv.poll_used(&m).unwrap(), expect);
        total += popped;
    }
    assert!(total > 65536, "only {total} indexes");
    assert_eq!(dev.next_avail(), total as u16);
    assert_eq!(dev.next_used(), total as u16);
    assert_eq!(drv.num_free(), size as usize);
}

#[test]
fn split_wraps_indexes_size_1() {
    split_exchange(1, 70_000, 1, false);
}

#[test]
fn split_wraps_indexes_size_4_event_idx() {
    split_exchange(4, 40_000, 4, true);
}

#[test]
fn split_wraps_indexes_size_256() {
    split_exchange(256, 600, 150, false);
}

#[test]
fn split_wraps_indexes_size_32768() {
    split_exchange(32768, 6, 20_000, true);
}

#[test]
fn split_flag_suppression() {
    let (m, mut drv, mut dev) = split_pair(8, false);
    // Device does not want kicks.
    assert!(!dev.set_notification(&m, false).unwrap());
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(!drv.kick_needed(&m).unwrap());
    // Re-enabling reports the pending buffer so it is not missed.
    assert!(dev.set_notification(&m, true).unwrap());
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap());
    // Nothing new published: no kick.
    assert!(!drv.kick_needed(&m).unwrap());
    let c = dev.pop_batch(&m, 8).unwrap();
    assert_eq!(c.len(), 2);
    // Driver does not want interrupts.
    assert!(!drv.set_used_notification(&m, false).unwrap());
    dev.add_used(&m, c[0].head, 0).unwrap();
    assert!(!dev.needs_notification(&m).unwrap());
    assert!(drv.set_used_notification(&m, true).unwrap());
    dev.add_used(&m, c[1].head, 0).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    assert_eq!(drv.poll_used(&m).unwrap().len(), 2);
}

#[test]
fn split_event_idx_suppression() {
    let (m, mut drv, mut dev) = split_pair(8, true);
    assert!(!dev.set_notification(&m, true).unwrap()); // avail_event = 0
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap(), "entry 0 is the event");
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(!drv.kick_needed(&m).unwrap(), "device has not caught up");
    let c = dev.pop_batch(&m, 8).unwrap(); // avail_event follows: 2
    assert_eq!(c.len(), 2);
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap());
    // With notifications disabled the event does not move.
    dev.set_notification(&m, false).unwrap();
    let c3 = dev.pop(&m).unwrap().unwrap();
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(!drv.kick_needed(&m).unwrap());
    assert!(dev.set_notification(&m, true).unwrap());
    let c4 = dev.pop(&m).unwrap().unwrap();

    // Used side.
    assert!(!drv.set_used_notification(&m, true).unwrap()); // used_event = 0
    dev.add_used(&m, c[0].head, 0).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    dev.add_used(&m, c[1].head, 0).unwrap();
    assert!(
        !dev.needs_notification(&m).unwrap(),
        "driver has not caught up"
    );
    assert_eq!(drv.poll_used(&m).unwrap().len(), 2);
    assert!(!drv.set_used_notification(&m, true).unwrap()); // used_event = 2
    dev.add_used_batch(&m, &[(c3.head, 0), (c4.head, 0)])
        .unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    assert!(!dev.needs_notification(&m).unwrap(), "nothing new");
    assert_eq!(drv.poll_used(&m).unwrap().len(), 2);
}

/// A driver that only polls after its call eventfd fires must be notified for every
/// completion: reaping used buffers re-arms `used_event` while notifications are on.
#[test]
fn split_event_idx_poll_rearms_used_event() {
    let (m, mut drv, mut dev) = split_pair(8, true);
    for round in 0..20u32 {
        drv.add(&m, &[(BUF, 1)], &[]).unwrap();
        drv.publish(&m).unwrap();
        let c = dev.pop(&m).unwrap().unwrap();
        dev.add_used(&m, c.head, 0).unwrap();
        assert!(dev.needs_notification(&m).unwrap(), "round {round}");
        assert_eq!(drv.poll_used(&m).unwrap().len(), 1);
    }
    // Turned off, the event is parked out of reach: the device stays quiet.
    drv.set_used_notification(&m, false).unwrap();
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    let c = dev.pop(&m).unwrap().unwrap();
    dev.add_used(&m, c.head, 0).unwrap();
    assert!(!dev.needs_notification(&m).unwrap());
    assert_eq!(drv.poll_used(&m).unwrap().len(), 1);
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    let c = dev.pop(&m).unwrap().unwrap();
    dev.add_used(&m, c.head, 0).unwrap();
    assert!(!dev.needs_notification(&m).unwrap());
}

#[test]
fn split_driver_refuses_bad_buffers() {
    let (m, mut drv, _dev) = split_pair(4, false);
    assert_err!(drv.add(&m, &[], &[]), VringError::EmptyChain);
    assert_err!(drv.add(&m, &[(MEM_END - 4, 8)], &[]), VringError::Memory(_));
    assert_err!(
        drv.add(&m, &[(BUF, u32::MAX), (BUF, 1)], &[]),
        VringError::Memory(_) | VringError::LengthOverflow { .. }
    );
    assert_err!(
        drv.add(&m, &[(BUF, 1); 5], &[]),
        VringError::QueueFull { needed: 5, free: 4 }
    );
    drv.add(&m, &[(BUF, 1); 4], &[]).unwrap();
    assert_err!(drv.add(&m, &[(BUF, 1)], &[]), VringError::QueueFull { .. });
    assert_err!(
        drv.add_indirect(&m, BUF + 0x1000, &[(BUF, 1)], &[]),
        VringError::QueueFull { .. }
    );
    // None of these broke the queue.
    assert!(!drv.is_broken());
    drv.publish(&m).unwrap();
}

// Hand-made split rings for corrupt inputs.

struct RawSplit {
    m: GuestMemory,
    l: RingLayout,
    avail_idx: u16,
}

impl RawSplit {
    fn new(size: u32) -> Self {
        let m = mem();
        let l = RingLayout::split_at(size, RING).unwrap();
        let n = u64::from(size);
        m.write(
            RING,
            &vec![0u8; (16 * n + 6 + 2 * n + 6 + 8 * n + 8) as usize],
        )
        .unwrap();
        Self { m, l, avail_idx: 0 }
    }
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.m
            .write(
                self.l.desc() + 16 * u64::from(i),
                &encode_split_desc(addr, len, flags, next),
            )
            .unwrap();
    }
    fn offer(&mut self, head: u16) {
        let slot = self.avail_idx % self.l.size();
        self.m
            .write_u16(self.l.avail_or_driver() + 4 + 2 * u64::from(slot), head)
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.m
            .write_u16(self.l.avail_or_driver() + 2, self.avail_idx)
            .unwrap();
    }
    fn device(&self) -> SplitDevice {
        SplitDevice::new(self.l, false, true).unwrap()
    }
    /// Pops once expecting an error, then checks the queue stays broken.
    fn pop_err(&self, dev: &mut SplitDevice) -> VringError {
        let e = dev.pop(&self.m).expect_err("corrupt chain accepted");
        assert!(dev.is_broken());
        assert_err!(dev.pop(&self.m), VringError::Broken);
        e
    }
    /// One chain at head 0 built by `f`, popped by a fresh device.
    fn one(size: u32, f: impl FnOnce(&RawSplit)) -> VringError {
        let mut r = RawSplit::new(size);
        f(&r);
        r.offer(0);
        let mut dev = r.device();
        r.pop_err(&mut dev)
    }
}

const N: u16 = DESC_F_NEXT;
const W: u16 = DESC_F_WRITE;
const I: u16 = DESC_F_INDIRECT;

#[test]
fn e1_e4_loops_stop() {
    // 0 -> 1 -> 0.
    let e = RawSplit::one(8, |r| {
        r.desc(0, BUF, 8, N, 1);
        r.desc(1, BUF, 8, N, 0);
    });
    assert!(matches!(e, VringError::DescriptorLoop { head: 0 }), "{e:?}");
    // Self loop of zero-length descriptors (E4).
    let e = RawSplit::one(32768, |r| r.desc(0, 0, 0, N, 0));
    assert!(matches!(e, VringError::DescriptorLoop { .. }), "{e:?}");
    // A loop inside an indirect table.
    let e = RawSplit::one(8, |r| {
        r.desc(0, BUF + 0x1000, 32, I, 0);
        r.m.write(BUF + 0x1000, &encode_split_desc(BUF, 1, N, 1))
            .unwrap();
        r.m.write(BUF + 0x1010, &encode_split_desc(BUF, 1, N, 0))
            .unwrap();
    });
    assert!(matches!(e, VringError::DescriptorLoop { .. }), "{e:?}");
}

#[test]
fn e2_heads_and_next_out_of_range() {
    let e = RawSplit::one(8, |r| r.desc(0, BUF, 8, N, 8));
    assert!(
        matches!(e, VringError::InvalidHead { head: 8, size: 8 }),
        "{e:?}"
    );
    let mut r = RawSplit::new(8);
    r.offer(0xffff);
    let mut dev = r.device();
    assert!(matches!(
        r.pop_err(&mut dev),
        VringError::InvalidHead { head: 0xffff, .. }
    ));
    // Next beyond an indirect table.
    let e = RawSplit::one(8, |r| {
        r.desc(0, BUF + 0x1000, 16, I, 0);
        r.m.write(BUF + 0x1000, &encode_split_desc(BUF, 1, N, 1))
            .unwrap();
    });
    assert!(
        matches!(e, VringError::InvalidHead { head: 1, size: 1 }),
        "{e:?}"
    );
}

#[test]
fn e3_buffers_outside_memory() {
    for (addr, len) in [
        (u64::MAX - 10, 100),      // addr + len overflows
        (MEM_END, 1),              // in the hole
        (MEM_END - 8, 16),         // straddles the hole
        (HOLE_END + 0x10_0000, 1), // past the end
    ] {
        let e = RawSplit::one(8, |r| {
            r.desc(0, BUF, 8, N, 1);
            r.desc(1, addr, len, W, 0);
        });
        assert!(
            matches!(e, VringError::Memory(MemoryError::OutOfRange { .. })),
            "{e:?}"
        );
    }
    // The descriptor table itself outside memory.
    let mut r = RawSplit::new(8);
    r.offer(0);
    let l = RingLayout::split(8, MEM_END, r.l.avail_or_driver(), r.l.used_or_device()).unwrap();
    let mut dev = SplitDevice::new(l, false, false).unwrap();
    assert_err!(dev.pop(&r.m), VringError::Memory(_));
}

#[test]
fn e5_indirect_rules() {
    let table = BUF + 0x1000;
    let e = RawSplit::one(8, |r| r.desc(0, table, 0, I, 0));
    assert!(matches!(e, VringError::IndirectInvalid { len: 0 }), "{e:?}");
    let e = RawSplit::one(8, |r| r.desc(0, table, 17, I, 0));
    assert!(
        matches!(e, VringError::IndirectInvalid { len: 17 }),
        "{e:?}"
    );
    let e = RawSplit::one(8, |r| r.desc(0, table, 65536 * 16, I, 0));
    assert!(matches!(e, VringError::IndirectInvalid { .. }), "{e:?}");
    let e = RawSplit::one(8, |r| r.desc(0, table, 16, I | N, 1));
    assert!(matches!(e, VringError::IndirectWithNext), "{e:?}");
    let e = RawSplit::one(8, |r| r.desc(0, MEM_END - 16, 32, I, 0));
    assert!(matches!(e, VringError::Memory(_)), "{e:?}");
    let e = RawSplit::one(8, |r| {
        r.desc(0, table, 32, I, 0);
        r.m.write(table, &encode_split_desc(BUF, 1, N, 1)).unwrap();
        r.m.write(table + 16, &encode_split_desc(table, 16, I, 0))
            .unwrap();
    });
    assert!(matches!(e, VringError::NestedIndirect), "{e:?}");
    // An indirect table whose chain is longer than the queue.
    let e = RawSplit::one(4, |r| {
        r.desc(0, table, 5 * 16, I, 0);
        for k in 0..5u16 {
            let flags = if k < 4 { N } else { 0 };
            r.m.write(
                table + 16 * u64::from(k),
                &encode_split_desc(BUF, 1, flags, k + 1),
            )
            .unwrap();
        }
    });
    assert!(
        matches!(e, VringError::ChainTooLong { head: 0, max: 4 }),
        "{e:?}"
    );
    // Direct descriptors before the table count too.
    let e = RawSplit::one(4, |r| {
        r.desc(0, BUF, 1, N, 1);
        r.desc(1, BUF, 1, N, 2);
        r.desc(2, table, 48, I, 0);
        for k in 0..3u16 {
            let flags = if k < 2 { N } else { 0 };
            r.m.write(
                table + 16 * u64::from(k),
                &encode_split_desc(BUF, 1, flags, k + 1),
            )
            .unwrap();
        }
    });
    assert!(matches!(e, VringError::ChainTooLong { .. }), "{e:?}");
    // Without the feature.
    let mut r = RawSplit::new(8);
    r.desc(0, table, 16, I, 0);
    r.m.write(table, &encode_split_desc(BUF, 1, 0, 0)).unwrap();
    r.offer(0);
    let mut dev = SplitDevice::new(r.l, false, false).unwrap();
    assert_err!(dev.pop(&r.m), VringError::IndirectNotNegotiated);
}

#[test]
fn e6_avail_index_jumps() {
    for jump in [65535u16, 9, 0x8000] {
        let r = RawSplit::new(8);
        r.desc(0, BUF, 1, 0, 0);
        r.m.write_u16(r.l.avail_or_driver() + 2, jump).unwrap();
        let mut dev = r.device();
        let e = r.pop_err(&mut dev);
        assert!(matches!(e, VringError::InvalidAvailIndex { .. }), "{e:?}");
    }
    // Exactly size ahead is fine.
    let r = RawSplit::new(8);
    r.desc(0, BUF, 1, 0, 0);
    r.m.write_u16(r.l.avail_or_driver() + 2, 8).unwrap();
    let mut dev = r.device();
    assert!(dev.pop(&r.m).unwrap().is_some());
}

#[test]
fn e7_same_head_twice() {
    let mut r = RawSplit::new(8);
    r.desc(0, BUF, 1, W, 0);
    r.offer(0);
    r.offer(0);
    let mut dev = r.device();
    let c = dev.pop(&r.m).unwrap().unwrap();
    assert_err!(dev.pop(&r.m), VringError::HeadInFlight { head: 0 });
    // Completed once only: the queue is broken, nothing more is returned.
    assert_err!(dev.add_used(&r.m, c.head, 1), VringError::Broken);
}

#[test]
fn e8_total_length_overflow() {
    // A 4 GiB region (sparse memfd) so that the lengths themselves are in memory.
    let m = GuestMemory::allocate(&[(0, 0x10_0000), (1 << 32, 1 << 32)]).unwrap();
    let mut r = RawSplit::new(8);
    r.m = m;
    r.m.write(RING, &[0u8; 0x1000]).unwrap();
    r.desc(0, 1 << 32, u32::MAX, N, 1);
    r.desc(1, 1 << 32, 1, W, 0);
    r.offer(0);
    let mut dev = r.device();
    assert!(matches!(
        r.pop_err(&mut dev),
        VringError::LengthOverflow { head: 0 }
    ));
    // u32::MAX exactly is accepted.
    let mut r2 = RawSplit::new(8);
    r2.m = r.m.clone();
    r2.m.write(RING, &[0u8; 0x1000]).unwrap();
    r2.desc(0, 1 << 32, u32::MAX, 0, 0);
    r2.offer(0);
    let c = r2.device().pop(&r2.m).unwrap().unwrap();
    assert_eq!(c.readable_len(), u32::MAX);
}

#[test]
fn e10_readable_after_writable() {
    let e = RawSplit::one(8, |r| {
        r.desc(0, BUF, 8, W | N, 1);
        r.desc(1, BUF, 8, 0, 0);
    });
    assert!(
        matches!(e, VringError::ReadableAfterWritable { head: 0 }),
        "{e:?}"
    );
}

#[test]
fn e11_add_used_checks_are_not_sticky() {
    let mut r = RawSplit::new(8);
    r.desc(3, BUF, 8, N, 4);
    r.desc(4, BUF + 8, 16, W, 0);
    r.offer(3);
    let mut dev = r.device();
    let c = dev.pop(&r.m).unwrap().unwrap();
    assert_eq!((c.head, c.readable_len(), c.writable_len()), (3, 8, 16));
    assert_err!(
        dev.add_used(&r.m, 8, 0),
        VringError::InvalidHead { head: 8, .. }
    );
    assert_err!(
        dev.add_used(&r.m, 2, 0),
        VringError::InvalidUsed { id: 2, .. }
    );
    assert_err!(
        dev.add_used(&r.m, 3, 17),
        VringError::InvalidUsed { id: 3, len: 17, .. }
    );
    assert_err!(
        dev.add_used_batch(&r.m, &[(3, 1), (3, 1)]),
        VringError::InvalidUsed { .. }
    );
    assert!(!dev.is_broken());
    dev.add_used(&r.m, 3, 16).unwrap();
    assert_err!(dev.add_used(&r.m, 3, 16), VringError::InvalidUsed { .. });
    assert_eq!(r.m.read_u16(r.l.used_or_device() + 2).unwrap(), 1);
    assert_eq!(r.m.read_u32(r.l.used_or_device() + 4).unwrap(), 3);
    assert_eq!(r.m.read_u32(r.l.used_or_device() + 8).unwrap(), 16);
}

#[test]
fn e12_event_words_at_the_end_of_memory() {
    // Avail ring ending exactly at the end of region 0: used_event is outside.
    let m = mem();
    let size = 8u32;
    let avail = MEM_END - (4 + 2 * u64::from(size));
    let l = RingLayout::split(size, 0, avail, 0x1000).unwrap();
    assert!(l.check_memory(&m).is_err());
    let mut dev = SplitDevice::new(l, true, false).unwrap();
    assert_err!(dev.needs_notification(&m), VringError::Memory(_));
    assert_err!(dev.needs_notification(&m), VringError::Broken);
    let mut drv = SplitDriver::new(l, true).unwrap();
    assert_err!(drv.set_used_notification(&m, true), VringError::Memory(_));
    // Used ring ending at the end: avail_event outside.
    let used = MEM_END - (4 + 8 * u64::from(size));
    let l = RingLayout::split(size, 0, 0x1000, used).unwrap();
    let mut dev = SplitDevice::new(l, true, false).unwrap();
    assert_err!(dev.set_notification(&m, true), VringError::Memory(_));
    let mut drv = SplitDriver::new(l, true).unwrap();
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert_err!(drv.kick_needed(&m), VringError::Memory(_));
}

#[test]
fn split_driver_rejects_bad_used_elements() {
    fn setup() -> (GuestMemory, SplitDriver, RingLayout, u16) {
        let m = mem();
        let l = RingLayout::split_at(8, RING).unwrap();
        let mut drv = SplitDriver::new(l, false).unwrap();
        drv.init(&m).unwrap();
        let h = drv.add(&m, &[(BUF, 4)], &[(BUF + 0x100, 10)]).unwrap();
        drv.publish(&m).unwrap();
        (m, drv, l, h)
    }
    let used_elem = |m: &GuestMemory, l: &RingLayout, idx: u16, id: u32, len: u32| {
        let u = l.used_or_device();
        m.write_u32(u + 4, id).unwrap();
        m.write_u32(u + 8, len).unwrap();
        m.write_u16(u + 2, idx).unwrap();
    };
    let (m, mut drv, l, h) = setup();
    used_elem(&m, &l, 1, 8, 0);
    assert_err!(drv.poll_used(&m), VringError::InvalidUsed { id: 8, .. });
    assert_err!(drv.poll_used(&m), VringError::Broken);
    let (m, mut drv, l, h2) = setup();
    used_elem(&m, &l, 1, u32::from(h2) + 1, 0);
    assert_err!(
        drv.poll_used(&m),
        VringError::InvalidUsed {
            reason: "not in flight",
            ..
        }
    );
    let (m, mut drv, l, _) = setup();
    used_elem(&m, &l, 1, u32::from(h), 11);
    assert_err!(drv.poll_used(&m), VringError::InvalidUsed { len: 11, .. });
    let (m, mut drv, l, _) = setup();
    used_elem(&m, &l, 2, u32::from(h), 1);
    assert_err!(
        drv.poll_used(&m),
        VringError::InvalidUsedIndex { used: 2, .. }
    );
    let (m, mut drv, l, _) = setup();
    used_elem(&m, &l, 1, u32::from(h), 10);
    assert_eq!(drv.poll_used(&m).unwrap(), vec![(h, 10)]);
}

/// Random bytes in the descriptor table and avail ring: pops never panic and never return
/// a segment outside guest memory.
#[test]
fn split_random_rings_never_escape_memory() {
    let m = mem();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut outcomes = [0usize; 3];
    for iter in 0..3000 {
        let size = 1u32 << rng.below(6);
        let l = RingLayout::split_at(size, RING).unwrap();
        let n = u64::from(size);
        // Random table and avail ring; addresses biased towards interesting places.
        for i in 0..n {
            let addr = match rng.below(6) {
                0 => rng.next(),
                1 => MEM_END - rng.below(64),
                2 => HOLE_END + rng.below(0x10_0000 + 64),
                3 => 0x1000 + 16 * rng.below(64), // an indirect table in scratch space
                _ => BUF + rng.below(0x1000),
            };
            let len = match rng.below(4) {
                0 => rng.next() as u32,
                1 => 16 * rng.below(8) as u32,
                _ => rng.below(0x200) as u32,
            };
            let flags = rng.next() as u16 & if rng.below(2) == 0 { 7 } else { 0xffff };
            let next = if rng.below(4) == 0 {
                rng.next() as u16
            } else {
                rng.below(n) as u16
            };
            m.write(16 * i, &encode_split_desc(addr, len, flags, next))
                .unwrap();
        }
        let mut junk = vec![0u8; 0x400];
        for b in junk.iter_mut() {
            *b = rng.next() as u8;
        }
        m.write(0x1000, &junk).unwrap();
        let avail = l.avail_or_driver();
        for i in 0..n + 3 {
            let v = if rng.below(3) == 0 {
                rng.next() as u16
            } else {
                rng.below(n) as u16
            };
            m.write_u16(avail + 2 * i, v).unwrap();
        }
        if rng.below(2) == 0 {
            m.write_u16(avail + 2, rng.below(n + 1) as u16).unwrap();
        }
        let mut dev = SplitDevice::new(l, iter % 2 == 0, iter % 3 != 0).unwrap();
        for _ in 0..=n {
            match dev.pop(&m) {
                Ok(Some(c)) => {
                    outcomes[0] += 1;
                    assert!(c.segments.len() <= size as usize);
                    for s in &c.segments {
                        assert!(s.len > 0);
                        check_range(&m, s.addr, u64::from(s.len)).unwrap();
                    }
                    let _ = dev.add_used(&m, c.head, c.writable_len());
                }
                Ok(None) => {
                    outcomes[1] += 1;
                    break;
                }
                Err(_) => {
                    outcomes[2] += 1;
                    assert!(dev.is_broken());
                    break;
                }
            }
        }
    }
    // Both good and bad chains were exercised.
    assert!(outcomes.iter().all(|&c| c > 50), "{outcomes:?}");
}

// ----------------------------------------------------------------------------------------
// Packed rings.

use super::chain::encode_packed_desc;
use super::event::{EventFlags, EventSuppress};

fn packed_pair(size: u32, event_idx: bool) -> (GuestMemory, PackedDriver, PackedDevice) {
    let m = mem();
    let layout = RingLayout::packed_at(size, RING).unwrap();
    layout.check_memory(&m).unwrap();
    let mut drv = PackedDriver::new(layout, event_idx).unwrap();
    drv.init(&m).unwrap();
    let dev = PackedDevice::new(layout, event_idx, true).unwrap();
    (m, drv, dev)
}

#[test]
fn packed_moves_data_both_ways() {
    let (m, mut drv, mut dev) = packed_pair(16, false);
    let req = pattern(2, 300);
    m.write(BUF, &req).unwrap();
    let a = drv.add(&m, &[(BUF, 300)], &[]).unwrap();
    let b = drv.add(&m, &[(BUF, 100)], &[(BUF + 0x1000, 100)]).unwrap();
    let c = drv
        .add(&m, &[(BUF, 150), (BUF + 150, 150)], &[(BUF + 0x2000, 300)])
        .unwrap();
    let d = drv
        .add_indirect(
            &m,
            BUF + 0x8000,
            &[(BUF, 200)],
            &[(BUF + 0x4000, 64), (BUF + 0x5000, 200)],
        )
        .unwrap();
    assert_eq!(drv.num_free(), 16 - 7);
    assert!(dev.pop(&m).unwrap().is_none(), "nothing before publish");
    drv.publish(&m).unwrap();
    let chains = dev.pop_batch(&m, 10).unwrap();
    let heads: Vec<u16> = chains.iter().map(|c| c.head).collect();
    assert_eq!(heads, vec![a, b, c, d]);
    assert_eq!(chains[2].segments.len(), 3);
    assert_eq!(chains[3].writable_len(), 264);
    // Return them out of order, two in one batch.
    let n2 = serve(&m, &chains[2]);
    let n3 = serve(&m, &chains[3]);
    dev.add_used_batch(&m, &[(c, n2), (d, n3)]).unwrap();
    for ch in [&chains[0], &chains[1]] {
        let n = serve(&m, ch);
        dev.add_used(&m, ch.head, n).unwrap();
    }
    assert_eq!(
        drv.poll_used(&m).unwrap(),
        vec![(c, 300), (d, 200), (a, 0), (b, 100)]
    );
    let mut out = vec![0u8; 300];
    m.read(BUF + 0x2000, &mut out).unwrap();
    let mut rev = req.clone();
    rev.reverse();
    assert_eq!(out, rev);
    assert_eq!(drv.num_free(), 16);
    assert_eq!(drv.in_flight(), 0);
}

fn packed_exchange(size: u32, rounds: usize, batch: usize, event_idx: bool, min_wraps: u32) {
    let (m, mut drv, mut dev) = packed_pair(size, event_idx);
    let mut rng = Rng(size as u64 * 3 + 1);
    let mut wraps = 0u32;
    let mut last_wrap = true;
    for _ in 0..rounds {
        let mut expect = Vec::new();
        for _ in 0..batch {
            let segs = 1 + rng.below(u64::from(size.min(3))) as usize;
            if drv.num_free() < segs {
                break;
            }
            let len = 1 + rng.below(64) as u32;
            let readable = vec![(BUF, len); segs - 1];
            let id = drv.add(&m, &readable, &[(BUF + 0x1000, len)]).unwrap();
            expect.push((id, if segs == 1 { 0 } else { len }));
        }
        drv.publish(&m).unwrap();
        let mut popped = Vec::new();
        while let Some(c) = dev.pop(&m).unwrap() {
            popped.push((c.head, c.readable_len().min(c.writable_len())));
        }
        assert_eq!(popped, expect);
        // Return in reverse order in one batch when possible.
        popped.reverse();
        if rng.below(2) == 0 {
            dev.add_used_batch(&m, &popped).unwrap();
        } else {
            for &(id, len) in &popped {
                dev.add_used(&m, id, len).unwrap();
            }
        }
        assert_eq!(drv.poll_used(&m).unwrap(), popped);
        let w = dev.next_avail().1;
        if w != last_wrap {
            wraps += 1;
            last_wrap = w;
        }
    }
    assert!(wraps >= min_wraps, "only {wraps} wraps");
    assert_eq!(drv.num_free(), size as usize);
    assert_eq!(dev.next_avail(), dev.next_used());
}

#[test]
fn packed_wraps_size_1() {
    packed_exchange(1, 1000, 1, false, 500);
}

#[test]
fn packed_wraps_size_3_event_idx() {
    packed_exchange(3, 3000, 2, true, 500);
}

#[test]
fn packed_wraps_size_256() {
    packed_exchange(256, 3000, 20, false, 100);
}

#[test]
fn packed_wraps_size_1000_event_idx() {
    packed_exchange(1000, 1500, 40, true, 50);
}

#[test]
fn packed_wraps_size_32768() {
    packed_exchange(32768, 24, 8000, true, 10);
}

#[test]
fn packed_flag_suppression() {
    let (m, mut drv, mut dev) = packed_pair(8, false);
    assert!(!dev.set_notification(&m, false).unwrap());
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(!drv.kick_needed(&m).unwrap());
    assert!(
        dev.set_notification(&m, true).unwrap(),
        "pending buffer reported"
    );
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap());
    assert!(!drv.kick_needed(&m).unwrap(), "nothing new");
    let c = dev.pop_batch(&m, 8).unwrap();
    assert_eq!(c.len(), 2);
    assert!(!drv.set_used_notification(&m, false).unwrap());
    dev.add_used(&m, c[0].head, 0).unwrap();
    assert!(!dev.needs_notification(&m).unwrap());
    assert!(
        drv.set_used_notification(&m, true).unwrap(),
        "used buffer reported"
    );
    dev.add_used(&m, c[1].head, 0).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    assert_eq!(drv.poll_used(&m).unwrap().len(), 2);
    // Reserved flags value 3 (F6): treated as enabled, no error.
    m.write_u16(
        RingLayout::packed_at(8, RING).unwrap().used_or_device() + 2,
        3,
    )
    .unwrap();
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap());
    m.write_u16(
        RingLayout::packed_at(8, RING).unwrap().avail_or_driver() + 2,
        3,
    )
    .unwrap();
    let c = dev.pop(&m).unwrap().unwrap();
    dev.add_used(&m, c.head, 0).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
}

#[test]
fn packed_event_idx_suppression() {
    let (m, mut drv, mut dev) = packed_pair(4, true);
    let l = RingLayout::packed_at(4, RING).unwrap();
    assert!(!dev.set_notification(&m, true).unwrap());
    let ev = EventSuppress::read(&m, l.used_or_device()).unwrap();
    assert_eq!(
        (ev.flags, ev.offset(), ev.wrap()),
        (EventFlags::Desc, 0, true)
    );
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap(), "slot 0 is the event");
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(!drv.kick_needed(&m).unwrap(), "device has not caught up");
    let c = dev.pop_batch(&m, 4).unwrap(); // event follows: slot 2
    assert_eq!(c.len(), 2);
    // Three more descriptors cross the end of the ring: the event slot 2 is in them.
    drv.add(&m, &[(BUF, 1), (BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert!(drv.kick_needed(&m).unwrap());
    let c2 = dev.pop(&m).unwrap().unwrap();
    assert_eq!(dev.next_avail(), (0, false));
    let ev = EventSuppress::read(&m, l.used_or_device()).unwrap();
    assert_eq!((ev.offset(), ev.wrap()), (0, false));

    // Used side.
    assert!(!drv.set_used_notification(&m, true).unwrap()); // DESC at slot 0
    dev.add_used(&m, c[0].head, 0).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    dev.add_used(&m, c[1].head, 0).unwrap();
    assert!(
        !dev.needs_notification(&m).unwrap(),
        "driver has not caught up"
    );
    assert_eq!(drv.poll_used(&m).unwrap().len(), 2);
    assert!(!drv.set_used_notification(&m, true).unwrap()); // DESC at slot 2
    dev.add_used(&m, c2.head, 0).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    assert!(!dev.needs_notification(&m).unwrap(), "nothing new");
    assert_eq!(drv.poll_used(&m).unwrap(), vec![(c2.head, 0)]);
}

/// A hand-made packed ring with driver wrap counter 1 on the first lap.
struct RawPacked {
    m: GuestMemory,
    l: RingLayout,
}

const AV: u16 = DESC_F_AVAIL; // available on the first lap

impl RawPacked {
    fn new(size: u32) -> Self {
        let m = mem();
        let l = RingLayout::packed_at(size, RING).unwrap();
        m.write(RING, &vec![0u8; 16 * size as usize + 8]).unwrap();
        Self { m, l }
    }
    fn desc(&self, slot: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.m
            .write(
                self.l.desc() + 16 * u64::from(slot),
                &encode_packed_desc(addr, len, id, flags),
            )
            .unwrap();
    }
    fn device(&self) -> PackedDevice {
        PackedDevice::new(self.l, false, true).unwrap()
    }
    fn pop_err(&self, dev: &mut PackedDevice) -> VringError {
        let e = dev.pop(&self.m).expect_err("corrupt chain accepted");
        assert!(dev.is_broken());
        assert_err!(dev.pop(&self.m), VringError::Broken);
        e
    }
    fn one(size: u32, f: impl FnOnce(&RawPacked)) -> VringError {
        let r = RawPacked::new(size);
        f(&r);
        let mut dev = r.device();
        r.pop_err(&mut dev)
    }
}

#[test]
fn f1_buffer_ids() {
    let e = RawPacked::one(4, |r| r.desc(0, BUF, 1, 4, AV));
    assert!(
        matches!(e, VringError::InvalidHead { head: 4, size: 4 }),
        "{e:?}"
    );
    let r = RawPacked::new(4);
    r.desc(0, BUF, 1, 2, AV | W);
    r.desc(1, BUF, 1, 2, AV);
    let mut dev = r.device();
    let c = dev.pop(&r.m).unwrap().unwrap();
    assert_eq!(c.head, 2);
    assert!(matches!(
        r.pop_err(&mut dev),
        VringError::HeadInFlight { head: 2 }
    ));
    // No completion after the error.
    assert_err!(dev.add_used(&r.m, 2, 0), VringError::Broken);
    // add_used checks (not sticky).
    let r = RawPacked::new(4);
    r.desc(0, BUF, 8, 1, AV | W);
    let mut dev = r.device();
    dev.pop(&r.m).unwrap().unwrap();
    assert_err!(dev.add_used(&r.m, 4, 0), VringError::InvalidHead { .. });
    assert_err!(
        dev.add_used(&r.m, 0, 0),
        VringError::InvalidUsed { id: 0, .. }
    );
    assert_err!(
        dev.add_used(&r.m, 1, 9),
        VringError::InvalidUsed { len: 9, .. }
    );
    assert_err!(
        dev.add_used_batch(&r.m, &[(1, 1), (1, 1)]),
        VringError::InvalidUsed { .. }
    );
    dev.add_used(&r.m, 1, 8).unwrap();
    assert!(!dev.is_broken());
}

#[test]
fn f2_inconsistent_flags_are_not_available() {
    let r = RawPacked::new(4);
    let mut dev = r.device();
    for flags in [0, DESC_F_USED, AV | DESC_F_USED, W, DESC_F_NEXT] {
        r.desc(0, BUF, 1, 0, flags);
        assert!(dev.pop(&r.m).unwrap().is_none(), "{flags:#x}");
    }
    // A chain whose second descriptor is not available.
    let e = RawPacked::one(4, |r| {
        r.desc(0, BUF, 1, 0, AV | N);
        r.desc(1, BUF, 1, 0, 0);
    });
    assert!(
        matches!(e, VringError::IncompleteChain { slot: 0 }),
        "{e:?}"
    );
    // Second lap: the wrap counter flips, first-lap flags are stale.
    let r = RawPacked::new(2);
    r.desc(0, BUF, 1, 0, AV);
    r.desc(1, BUF, 1, 1, AV);
    let mut dev = r.device();
    assert_eq!(dev.pop_batch(&r.m, 5).unwrap().len(), 2);
    assert!(dev.pop(&r.m).unwrap().is_none());
    dev.add_used_batch(&r.m, &[(0, 0), (1, 0)]).unwrap();
    r.desc(0, BUF, 1, 1, DESC_F_USED); // AVAIL=0, USED=1: available on lap 2
    assert_eq!(dev.pop(&r.m).unwrap().unwrap().head, 1);
}

#[test]
fn f3_next_around_the_ring() {
    let e = RawPacked::one(3, |r| {
        for s in 0..3 {
            r.desc(s, BUF, 1, 0, AV | N);
        }
    });
    assert!(
        matches!(e, VringError::ChainTooLong { max: 3, .. }),
        "{e:?}"
    );
    // Size 1 with NEXT.
    let e = RawPacked::one(1, |r| r.desc(0, BUF, 1, 0, AV | N));
    assert!(
        matches!(e, VringError::ChainTooLong { max: 1, .. }),
        "{e:?}"
    );
}

#[test]
fn f4_packed_indirect_rules() {
    let table = BUF + 0x1000;
    let e = RawPacked::one(8, |r| r.desc(0, table, 0, 0, AV | I));
    assert!(matches!(e, VringError::IndirectInvalid { len: 0 }), "{e:?}");
    let e = RawPacked::one(8, |r| r.desc(0, table, 24, 0, AV | I));
    assert!(
        matches!(e, VringError::IndirectInvalid { len: 24 }),
        "{e:?}"
    );
    let e = RawPacked::one(8, |r| r.desc(0, table, 16, 0, AV | I | N));
    assert!(matches!(e, VringError::IndirectWithNext), "{e:?}");
    let e = RawPacked::one(8, |r| r.desc(0, MEM_END - 16, 32, 0, AV | I));
    assert!(matches!(e, VringError::Memory(_)), "{e:?}");
    let e = RawPacked::one(8, |r| {
        r.desc(0, table, 32, 0, AV | I);
        r.m.write(table, &encode_packed_desc(BUF, 1, 0, 0)).unwrap();
        r.m.write(table + 16, &encode_packed_desc(table, 16, 0, I))
            .unwrap();
    });
    assert!(matches!(e, VringError::NestedIndirect), "{e:?}");
    let e = RawPacked::one(4, |r| {
        r.desc(0, table, 5 * 16, 0, AV | I);
        for k in 0..5 {
            r.m.write(table + 16 * k, &encode_packed_desc(BUF, 1, 0, 0))
                .unwrap();
        }
    });
    assert!(
        matches!(e, VringError::ChainTooLong { max: 4, .. }),
        "{e:?}"
    );
    let e = RawPacked::one(4, |r| {
        r.desc(0, table, 32, 0, AV | I);
        r.m.write(table, &encode_packed_desc(BUF, 1, 0, W)).unwrap();
        r.m.write(table + 16, &encode_packed_desc(BUF, 1, 0, 0))
            .unwrap();
    });
    assert!(
        matches!(e, VringError::ReadableAfterWritable { .. }),
        "{e:?}"
    );
    // Without the feature.
    let r = RawPacked::new(8);
    r.desc(0, table, 16, 0, AV | I);
    let mut dev = PackedDevice::new(r.l, false, false).unwrap();
    assert_err!(dev.pop(&r.m), VringError::IndirectNotNegotiated);
}

#[test]
fn packed_buffers_outside_memory_and_overflow() {
    for (addr, len) in [(u64::MAX - 10, 100), (MEM_END, 1), (MEM_END - 8, 16)] {
        let e = RawPacked::one(4, |r| r.desc(0, addr, len, 0, AV));
        assert!(matches!(e, VringError::Memory(_)), "{e:?}");
    }
    let m = GuestMemory::allocate(&[(0, 0x10_0000), (1 << 32, 1 << 32)]).unwrap();
    let mut r = RawPacked::new(4);
    r.m = m;
    r.m.write(RING, &[0u8; 0x100]).unwrap();
    r.desc(0, 1 << 32, u32::MAX, 0, AV | N);
    r.desc(1, 1 << 32, 1, 0, AV);
    let mut dev = r.device();
    assert!(matches!(
        r.pop_err(&mut dev),
        VringError::LengthOverflow { .. }
    ));
}

#[test]
fn packed_overrun_is_caught() {
    // The driver re-offers slot 0 on the next lap while buffer 0 still holds it.
    let r = RawPacked::new(2);
    r.desc(0, BUF, 1, 0, AV);
    r.desc(1, BUF, 1, 1, AV);
    let mut dev = r.device();
    assert_eq!(dev.pop_batch(&r.m, 5).unwrap().len(), 2);
    r.desc(0, BUF, 1, 1, DESC_F_USED);
    assert!(matches!(
        r.pop_err(&mut dev),
        VringError::HeadInFlight { head: 1 }
    ));
    // One buffer of four descriptors fills the ring; a new id on the next lap overruns it.
    let r = RawPacked::new(4);
    for s in 0..4 {
        r.desc(s, BUF, 1, 0, AV | if s < 3 { N } else { 0 });
    }
    let mut dev = r.device();
    assert_eq!(dev.pop(&r.m).unwrap().unwrap().segments.len(), 4);
    assert_eq!(dev.next_avail(), (0, false));
    r.desc(0, BUF, 1, 1, DESC_F_USED);
    let e = r.pop_err(&mut dev);
    assert!(
        matches!(
            e,
            VringError::Overrun {
                in_flight: 5,
                size: 4
            }
        ),
        "{e:?}"
    );
}

#[test]
fn f6_event_areas_out_of_memory() {
    let m = mem();
    let l = RingLayout::packed(4, 0, MEM_END, MEM_END + 4).unwrap();
    assert!(l.check_memory(&m).is_err());
    let mut dev = PackedDevice::new(l, true, false).unwrap();
    assert_err!(dev.needs_notification(&m), VringError::Memory(_));
    let mut dev = PackedDevice::new(l, true, false).unwrap();
    assert_err!(dev.set_notification(&m, true), VringError::Memory(_));
    let mut drv = PackedDriver::new(l, true).unwrap();
    assert_err!(drv.set_used_notification(&m, true), VringError::Memory(_));
    let mut drv = PackedDriver::new(l, true).unwrap();
    drv.add(&m, &[(BUF, 1)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert_err!(drv.kick_needed(&m), VringError::Memory(_));
    assert!(drv.is_broken());
    // Set base checks the slot.
    let mut dev = PackedDevice::new(l, false, false).unwrap();
    assert_err!(dev.set_next_avail(4, true), VringError::InvalidHead { .. });
    dev.set_next_avail(3, false).unwrap();
    assert_eq!(dev.next_avail(), (3, false));
}

#[test]
fn packed_driver_rejects_bad_used_elements() {
    fn setup() -> (GuestMemory, PackedDriver, RingLayout, u16) {
        let m = mem();
        let l = RingLayout::packed_at(4, RING).unwrap();
        let mut drv = PackedDriver::new(l, false).unwrap();
        drv.init(&m).unwrap();
        let id = drv.add(&m, &[(BUF, 4)], &[(BUF + 0x100, 10)]).unwrap();
        drv.publish(&m).unwrap();
        (m, drv, l, id)
    }
    let used = |m: &GuestMemory, l: &RingLayout, id: u16, len: u32| {
        m.write(l.desc(), &encode_packed_desc(0, len, id, AV | DESC_F_USED))
            .unwrap();
    };
    let (m, mut drv, l, _) = setup();
    used(&m, &l, 4, 0);
    assert_err!(drv.poll_used(&m), VringError::InvalidUsed { id: 4, .. });
    assert_err!(drv.poll_used(&m), VringError::Broken);
    let (m, mut drv, l, id) = setup();
    used(&m, &l, id + 1, 0);
    assert_err!(
        drv.poll_used(&m),
        VringError::InvalidUsed {
            reason: "not in flight",
            ..
        }
    );
    let (m, mut drv, l, id) = setup();
    used(&m, &l, id, 11);
    assert_err!(drv.poll_used(&m), VringError::InvalidUsed { len: 11, .. });
    let (m, mut drv, l, id) = setup();
    used(&m, &l, id, 10);
    assert_eq!(drv.poll_used(&m).unwrap(), vec![(id, 10)]);
}

/// Random bytes in the packed ring: pops never panic nor escape memory.
#[test]
fn packed_random_rings_never_escape_memory() {
    let m = mem();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut outcomes = [0usize; 3];
    for iter in 0..3000 {
        let size = 1 + rng.below(40) as u32;
        let l = RingLayout::packed_at(size, RING).unwrap();
        for i in 0..u64::from(size) {
            let addr = match rng.below(6) {
                0 => rng.next(),
                1 => MEM_END - rng.below(64),
                2 => HOLE_END + rng.below(0x10_0000 + 64),
                3 => 0x1000 + 16 * rng.below(64),
                _ => BUF + rng.below(0x1000),
            };
            let len = match rng.below(4) {
                0 => rng.next() as u32,
                1 => 16 * rng.below(8) as u32,
                _ => rng.below(0x200) as u32,
            };
            let id = if rng.below(4) == 0 {
                rng.next() as u16
            } else {
                rng.below(u64::from(size)) as u16
            };
            let mut flags = rng.next() as u16;
            if rng.below(3) != 0 {
                flags = (flags & 7) | AV; // mostly available on lap 1
            }
            m.write(16 * i, &encode_packed_desc(addr, len, id, flags))
                .unwrap();
        }
        let mut junk = vec![0u8; 0x400];
        for b in junk.iter_mut() {
            *b = rng.next() as u8;
        }
        m.write(0x1000, &junk).unwrap();
        let mut dev = PackedDevice::new(l, iter % 2 == 0, iter % 3 != 0).unwrap();
        for _ in 0..=size {
            match dev.pop(&m) {
                Ok(Some(c)) => {
                    outcomes[0] += 1;
                    assert!(c.segments.len() <= size as usize);
                    for s in &c.segments {
                        check_range(&m, s.addr, u64::from(s.len)).unwrap();
                    }
                    if rng.below(2) == 0 {
                        let _ = dev.add_used(&m, c.head, c.writable_len());
                    }
                }
                Ok(None) => {
                    outcomes[1] += 1;
                    break;
                }
                Err(_) => {
                    outcomes[2] += 1;
                    assert!(dev.is_broken());
                    break;
                }
            }
        }
    }
    assert!(outcomes.iter().all(|&c| c > 50), "{outcomes:?}");
}

/// E9: another thread rewrites the descriptors while chains are popped. Each descriptor is
/// copied once and validated from the copy, so every returned segment is in memory even
/// when the copy is torn.
#[test]
fn e9_concurrent_rewrites_never_escape_memory() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let r = RawSplit::new(8);
    r.desc(0, BUF, 16, N, 1);
    r.desc(1, BUF, 16, W, 0);
    r.m.write_u16(r.l.avail_or_driver() + 4, 0).unwrap();
    r.m.write_u16(r.l.avail_or_driver() + 2, 1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let m = r.m.clone();
        let desc = r.l.desc();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(42);
            while !stop.load(Ordering::Relaxed) {
                let good = rng.below(2) == 0;
                let (addr, len) = if good {
                    (BUF, 16)
                } else {
                    (MEM_END - 8, u32::MAX)
                };
                let flags = [N, N | I, W, N | W][rng.below(4) as usize];
                let next = rng.below(10) as u16;
                let i = rng.below(2);
                m.write(desc + 16 * i, &encode_split_desc(addr, len, flags, next))
                    .unwrap();
            }
        })
    };
    let mut ok = 0;
    // On a loaded machine the writer may sit descheduled with the descriptors in a bad
    // state for a whole batch of pops: keep going (yielding to it) until some pop succeeded,
    // so the success path is exercised whatever the scheduling.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut round = 0u32;
    while round < 20_000 || (ok == 0 && std::time::Instant::now() < deadline) {
        round += 1;
        if round % 1000 == 0 {
            std::thread::yield_now();
        }
        let mut dev = r.device();
        if let Ok(Some(c)) = dev.pop(&r.m) {
            ok += 1;
            for s in &c.segments {
                check_range(&r.m, s.addr, u64::from(s.len)).unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(ok > 0);
}

// ----------------------------------------------------------------------------------------
// Packed rings: recording ring descriptors and taking buffers back after a restart.

#[test]
fn packed_recording_gives_each_buffers_ring_descriptors() {
    let (m, mut drv, mut dev) = packed_pair(8, false);
    let a = drv
        .add(&m, &[(BUF, 16), (BUF + 0x100, 32)], &[(BUF + 0x1000, 1)])
        .unwrap();
    let b = drv
        .add_indirect(&m, BUF + 0x8000, &[(BUF, 8)], &[(BUF + 0x2000, 4)])
        .unwrap();
    drv.publish(&m).unwrap();
    let mut ring = Vec::new();
    let chains = dev.pop_batch_recording(&m, 8, &mut ring).unwrap();
    assert_eq!(chains.iter().map(|c| c.head).collect::<Vec<_>>(), [a, b]);
    assert_eq!(ring.len(), 4);
    let avail = DESC_F_AVAIL;
    assert_eq!(ring[0], (BUF, 16, a, avail | DESC_F_NEXT));
    assert_eq!(ring[1], (BUF + 0x100, 32, a, avail | DESC_F_NEXT));
    assert_eq!(ring[2], (BUF + 0x1000, 1, a, avail | DESC_F_WRITE));
    assert_eq!(ring[3], (BUF + 0x8000, 32, b, avail | DESC_F_INDIRECT));
    assert_eq!(dev.ring_flags(&m, 3).unwrap(), avail | DESC_F_INDIRECT);
    assert!(dev.ring_flags(&m, 8).is_err());
}

#[test]
fn packed_resubmit_rebuilds_buffers_and_positions() {
    let (m, mut drv, mut dev) = packed_pair(8, false);
    let ids: Vec<u16> = (0..3)
        .map(|i| {
            drv.add(&m, &[(BUF + 0x100 * i, 16)], &[(BUF + 0x1000 + i, 1)])
                .unwrap()
        })
        .collect();
    let t = drv
        .add_indirect(&m, BUF + 0x8000, &[(BUF, 8)], &[(BUF + 0x2000, 4)])
        .unwrap();
    drv.publish(&m).unwrap();
    let mut ring = Vec::new();
    let chains = dev.pop_batch_recording(&m, 8, &mut ring).unwrap();
    dev.add_used(&m, ids[0], 1).unwrap();
    // The back-end dies; its successor restarts from the recorded descriptors of the
    // buffers still in flight (the first completed: 2 slots used).
    let layout = RingLayout::packed_at(8, RING).unwrap();
    let mut again = PackedDevice::new(layout, false, true).unwrap();
    let bufs = vec![
        ring[2..4].to_vec(),
        ring[6..7].to_vec(),
        ring[4..6].to_vec(),
    ];
    let back = again.resubmit(&m, &bufs, (2, true)).unwrap();
    assert_eq!(
        back,
        vec![chains[1].clone(), chains[3].clone(), chains[2].clone()]
    );
    // 2 used + 5 in flight: the next pop is at slot 7.
    assert_eq!(again.next_used(), (2, true));
    assert_eq!(again.next_avail(), (7, true));
    assert!(again.pop(&m).unwrap().is_none());
    again.add_used_batch(&m, &[(t, 4), (ids[2], 1)]).unwrap();
    again.add_used(&m, ids[1], 0).unwrap();
    assert_eq!(
        drv.poll_used(&m).unwrap(),
        vec![(ids[0], 1), (t, 4), (ids[2], 1), (ids[1], 0)]
    );
    // The ring goes on: a new buffer is popped where the driver put it.
    let n = drv.add(&m, &[(BUF, 4)], &[]).unwrap();
    drv.publish(&m).unwrap();
    assert_eq!(again.pop(&m).unwrap().unwrap().head, n);
}

#[test]
fn packed_resubmit_checks_what_it_is_given() {
    let layout = RingLayout::packed_at(4, RING).unwrap();
    let m = mem();
    let w = DESC_F_WRITE;
    let n = DESC_F_NEXT;
    let i = DESC_F_INDIRECT;
    type Buffers = Vec<Vec<(u64, u32, u16, u16)>>;
    let cases: Vec<(&str, Buffers)> = vec![
        ("empty", vec![vec![]]),
        ("id", vec![vec![(BUF, 4, 4, 0)]]),
        ("twice", vec![vec![(BUF, 4, 1, 0)], vec![(BUF, 4, 1, 0)]]),
        ("next on last", vec![vec![(BUF, 4, 1, n)]]),
        ("no next", vec![vec![(BUF, 4, 1, 0), (BUF, 4, 1, 0)]]),
        ("too long", vec![vec![(BUF, 4, 1, n); 5]]),
        (
            "overrun",
            vec![vec![(BUF, 4, 0, n), (BUF, 4, 0, 0)]; 1]
                .into_iter()
                .chain([vec![(BUF, 4, 1, n), (BUF, 4, 1, n), (BUF, 4, 1, 0)]])
                .collect(),
        ),
        ("outside memory", vec![vec![(MEM_END, 4, 1, 0)]]),
        (
            "readable after writable",
            vec![vec![(BUF, 4, 1, w | n), (BUF, 4, 1, 0)]],
        ),
        (
            "indirect with next",
            vec![vec![(BUF, 16, 1, i | n), (BUF, 4, 1, 0)]],
        ),
        ("indirect table", vec![vec![(BUF, 15, 1, i)]]),
        ("position", vec![]),
    ];
    for (what, bufs) in cases {
        let mut dev = PackedDevice::new(layout, false, true).unwrap();
        let used = if what == "position" {
            (4, true)
        } else {
            (0, true)
        };
        assert!(dev.resubmit(&m, &bufs, used).is_err(), "{what}");
        assert!(dev.is_broken(), "{what}");
    }
    // Indirect buffers need the feature, as when popping.
    let mut dev = PackedDevice::new(layout, false, false).unwrap();
    m.write(BUF, &encode_packed_desc(BUF + 0x100, 4, 0, 0))
        .unwrap();
    assert_err!(
        dev.resubmit(&m, &[vec![(BUF, 16, 1, i)]], (0, true)),
        VringError::IndirectNotNegotiated
    );
    let mut dev = PackedDevice::new(layout, false, true).unwrap();
    let back = dev
        .resubmit(&m, &[vec![(BUF, 16, 1, i)]], (3, false))
        .unwrap();
    assert_eq!(back[0].segments.len(), 1);
    assert_eq!(dev.next_avail(), (0, true));
}
