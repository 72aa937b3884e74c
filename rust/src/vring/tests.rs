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
    let mut data = chain.read_all(m).unwrap();
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
