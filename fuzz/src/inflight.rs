//! Inflight tracking across back-end crashes: a driver (our `SplitDriver` or
//! `PackedDriver`) offers buffers; the device side pops, records in the inflight area,
//! completes any subset in any order, and "crashes" at fuzz-chosen points (after a pop it
//! had not recorded yet, after announcing a completion, after publishing it but before
//! clearing the record), then restarts from the shared area as a new back-end would
//! (a new ring, `InflightQueue::start`) and resubmits what it is handed back. The
//! front-end may also corrupt the area.
//!
//! Invariants (with an area nobody corrupted): after each restart exactly the buffers
//! that were popped and recorded and whose completion the driver cannot see come back,
//! oldest first; the driver never sees a buffer completed twice; and once everything is
//! drained every buffer the driver offered came back exactly once: nothing lost, nothing
//! duplicated. With a corrupted area: no panic, and no error but a typed one.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::Arc;

use vhost_core::daemon::{InflightArea, InflightQueue};
use vhost_core::memory::GuestMemory;
use vhost_core::sys::Mapping;
use vhost_core::user::payload::InflightDesc;
use vhost_core::vring::{DescriptorChain, DeviceQueue, PackedDriver, RingLayout, SplitDriver};

use crate::input::Input;

const DATA: u64 = 0x8000;

enum Driver {
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Driver {
    fn add(&mut self, mem: &GuestMemory, r: &[(u64, u32)], w: &[(u64, u32)]) -> Option<u16> {
        let head = match self {
            Driver::Split(d) => d.add(mem, r, w),
            Driver::Packed(d) => d.add(mem, r, w),
        }
        .ok()?;
        match self {
            Driver::Split(d) => d.publish(mem),
            Driver::Packed(d) => d.publish(mem),
        }
        .expect("publish");
        Some(head)
    }

    fn poll(&mut self, mem: &GuestMemory) -> vhost_core::vring::Result<Vec<(u16, u32)>> {
        match self {
            Driver::Split(d) => d.poll_used(mem),
            Driver::Packed(d) => d.poll_used(mem),
        }
    }

    fn in_flight(&self) -> u16 {
        match self {
            Driver::Split(d) => d.in_flight(),
            Driver::Packed(d) => d.in_flight(),
        }
    }
}

struct Device {
    ring: DeviceQueue,
    iq: InflightQueue,
    /// Chains handed back at the last start, processed before new pops.
    resubmit: Vec<DescriptorChain>,
}

struct World {
    mem: GuestMemory,
    layout: RingLayout,
    area: Arc<InflightArea>,
    /// The front-end's own mapping of the area (to corrupt it).
    front: Mapping,
    driver: Driver,
    dev: Option<Device>,
    /// Driver head -> token, for buffers offered and not yet seen used.
    tokens: HashMap<u16, u64>,
    next_token: u64,
    offered: HashSet<u64>,
    completed: HashSet<u64>,
    /// Heads the device popped and recorded, not yet completed, with their pop order.
    held: HashMap<u16, u64>,
    pops: u64,
    corrupted: bool,
}

impl World {
    fn start(&mut self) {
        let initial = if self.layout.is_packed() { 0x8000 } else { 0 };
        let mut ring = DeviceQueue::new(self.layout, false, false).expect("ring");
        ring.restore(&self.mem, initial).expect("restore");
        let size = self.layout.size();
        let mut iq = self.area.queue(0, size).expect("inflight queue");
        match iq.start(&mut ring, &self.mem) {
            Ok(chains) => {
                if !self.corrupted {
                    let mut expected: Vec<(u64, u16)> =
                        self.held.iter().map(|(&h, &order)| (order, h)).collect();
                    expected.sort_unstable();
                    let got: Vec<u16> = chains.iter().map(|c| c.head).collect();
                    let want: Vec<u16> = expected.iter().map(|&(_, h)| h).collect();
                    assert_eq!(
                        got, want,
                        "resubmitted after a crash (held {:?})",
                        self.held
                    );
                }
                self.dev = Some(Device {
                    ring,
                    iq,
                    resubmit: chains,
                });
            }
            Err(e) => {
                assert!(self.corrupted, "an intact area failed to start: {e}");
                self.dev = None;
            }
        }
    }

    /// A crash: the device goes, the area and the ring stay. `restart` starts a new one.
    fn crash(&mut self) {
        self.dev = None;
        self.start();
    }

    fn pop(&mut self, max: usize, record: bool) {
        let Some(dev) = self.dev.as_mut() else { return };
        let chains = if dev.resubmit.is_empty() {
            let mut descs = Vec::new();
            let Ok(chains) = dev.ring.pop_batch_recording(&self.mem, max, &mut descs) else {
                assert!(self.corrupted, "pop failed on an intact ring");
                self.dev = None;
                return;
            };
            if !record {
                // Crash before the pops were recorded: the ring still offers them.
                self.crash();
                return;
            }
            if let Err(e) = dev.iq.popped(&chains, &descs) {
                assert!(self.corrupted, "recording a pop failed: {e}");
                self.dev = None;
                return;
            }
            chains
        } else {
            std::mem::take(&mut dev.resubmit)
        };
        for c in chains {
            if !self.held.contains_key(&c.head) {
                self.held.insert(c.head, self.pops);
                self.pops += 1;
            }
        }
    }

    /// Completes `heads` (held ones); `crash` 1: after announcing them, 2: after
    /// publishing them, before clearing the record.
    fn complete(&mut self, heads: &[u16], crash: u8) {
        let Some(dev) = self.dev.as_mut() else { return };
        if !dev.resubmit.is_empty() || heads.is_empty() {
            return;
        }
        let used: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 0)).collect();
        dev.iq.completing(heads);
        if crash == 1 {
            return self.crash();
        }
        if let Err(e) = dev.ring.add_used_batch(&self.mem, &used) {
            assert!(self.corrupted, "completing held buffers failed: {e}");
            dev.iq.abandon();
            return;
        }
        for h in heads {
            self.held.remove(h);
        }
        if crash == 2 {
            return self.crash();
        }
        dev.iq.completed(heads, &dev.ring);
    }

    fn poll(&mut self) {
        let used = match self.driver.poll(&self.mem) {
            Ok(used) => used,
            // A device misled by an area its front-end corrupted may complete what the
            // driver does not have in flight: the driver refuses it, which is all we ask.
            Err(_) if self.corrupted => return,
            Err(e) => panic!("the driver saw a bad completion: {e}"),
        };
        for (head, _) in used {
            let token = self
                .tokens
                .remove(&head)
                .expect("a completion for a buffer offered");
            assert!(
                self.completed.insert(token),
                "buffer {token} completed twice"
            );
        }
    }

    fn offer(&mut self, segs: u8) {
        let n = 1 + usize::from(segs % 3);
        let t = self.next_token;
        let base = DATA + (t % 64) * 0x100;
        let r = [(base, 16)];
        let w: Vec<(u64, u32)> = (1..n as u64).map(|k| (base + 0x40 * k, 16)).collect();
        if let Some(head) = self.driver.add(&self.mem, &r, &w) {
            self.tokens.insert(head, t);
            self.offered.insert(t);
            self.next_token += 1;
        }
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let cfg = input.u8();
    let packed = cfg & 1 != 0;
    let size = if packed {
        u32::from(cfg >> 1) % 8 + 1
    } else {
        1 << ((cfg >> 1) % 4)
    };
    let mem = GuestMemory::allocate(&[(0, 0x10000)]).expect("guest memory");
    let layout = if packed {
        RingLayout::packed_at(size, 0)
    } else {
        RingLayout::split_at(size, 0)
    }
    .expect("layout");
    let driver = if packed {
        let mut d = PackedDriver::new(layout, false).expect("driver");
        d.init(&mem).expect("init");
        Driver::Packed(d)
    } else {
        let mut d = SplitDriver::new(layout, false).expect("driver");
        d.init(&mem).expect("init");
        Driver::Split(d)
    };
    let desc = InflightDesc {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 8,
    };
    let (area, reply, fd) = InflightArea::create(&desc).expect("inflight area");
    let front = Mapping::map_shared(fd.as_fd(), 0, reply.mmap_size, true).expect("map area");
    let mut w = World {
        mem,
        layout,
        area: Arc::new(area),
        front,
        driver,
        dev: None,
        tokens: HashMap::new(),
        next_token: 0,
        offered: HashSet::new(),
        completed: HashSet::new(),
        held: HashMap::new(),
        pops: 0,
        corrupted: false,
    };
    w.start();
    for _ in 0..128 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 7 {
            0 => w.offer(input.u8()),
            1 => w.pop(usize::from(input.u8() % 4) + 1, true),
            2 => {
                let mut held: Vec<u16> = w.held.keys().copied().collect();
                held.sort_unstable();
                let pick = input.u8();
                let heads: Vec<u16> = held
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| pick & (1 << (i % 8)) != 0)
                    .map(|(_, &h)| h)
                    .collect();
                w.complete(&heads, input.u8() % 3);
            }
            3 => w.poll(),
            4 => w.crash(),
            5 => w.pop(usize::from(input.u8() % 4) + 1, false),
            _ => {
                let at = usize::from(input.u16()) % w.front.len();
                let v = input.u8();
                // SAFETY: `at` is inside the mapping, which lives as long as `w`.
                unsafe { w.front.as_ptr().add(at).write_volatile(v) };
                w.corrupted = true;
            }
        }
    }
    if w.corrupted {
        return;
    }
    // Drain: no more crashes; everything offered must come back exactly once.
    for _ in 0..64 {
        w.pop(usize::from(w.layout.size()), true);
        let mut held: Vec<u16> = w.held.keys().copied().collect();
        held.sort_unstable();
        w.complete(&held, 0);
        w.poll();
        if w.held.is_empty() && w.driver.in_flight() == 0 {
            break;
        }
    }
    assert_eq!(
        w.driver.in_flight(),
        0,
        "buffers never completed (lost): held {:?}",
        w.held
    );
    assert_eq!(w.completed, w.offered, "offered and completed differ");
}
