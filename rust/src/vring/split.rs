//! Split virtqueues (virtio 1.x, 2.7): descriptor table, avail ring, used ring.
//!
//! Avail ring: flags u16, idx u16, ring[size] u16, used_event u16.
//! Used ring: flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16.

use std::sync::atomic::{fence, Ordering};

use crate::memory::GuestMemory;

use super::chain::{
    check_driver_segments, encode_split_desc, indirect_entries, pop_up_to, read_split_desc, walk,
    ChainBuilder,
};
use super::error::Health;
use super::event::need_event;
use super::{
    DescriptorChain, Result, RingLayout, VringError, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT,
    DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, USED_F_NO_NOTIFY,
};

/// Addresses of the split ring fields, from a validated layout.
#[derive(Clone, Copy, Debug)]
struct Addrs {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Addrs {
    fn new(layout: &RingLayout) -> Result<Self> {
        if layout.is_packed() {
            return Err(VringError::InvalidSize(u32::from(layout.size())));
        }
        Ok(Self {
            size: layout.size(),
            desc: layout.desc(),
            avail: layout.avail_or_driver(),
            used: layout.used_or_device(),
        })
    }

    // The sums below can wrap only for a layout whose areas run off the end of the
    // address space; the wrapped address is then rejected by GuestMemory like any other.
    fn desc_at(&self, i: u16) -> u64 {
        self.desc.wrapping_add(DESC_SIZE * u64::from(i))
    }
    fn avail_flags(&self) -> u64 {
        self.avail
    }
    fn avail_idx(&self) -> u64 {
        self.avail.wrapping_add(2)
    }
    fn avail_slot(&self, idx: u16) -> u64 {
        self.avail.wrapping_add(4 + 2 * u64::from(idx % self.size))
    }
    fn used_event(&self) -> u64 {
        self.avail.wrapping_add(4 + 2 * u64::from(self.size))
    }
    fn used_flags(&self) -> u64 {
        self.used
    }
    fn used_idx(&self) -> u64 {
        self.used.wrapping_add(2)
    }
    fn used_slot(&self, idx: u16) -> u64 {
        self.used.wrapping_add(4 + 8 * u64::from(idx % self.size))
    }
    fn avail_event(&self) -> u64 {
        self.used.wrapping_add(4 + 8 * u64::from(self.size))
    }
}

/// The device side of a split ring: pops chains the driver made available and returns
/// them as used.
#[derive(Debug)]
pub struct SplitDevice {
    a: Addrs,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    next_used: u16,
    /// used idx at the last notification decision (EVENT_IDX), None before the first.
    signalled_used: Option<u16>,
    notify_enabled: bool,
    /// Per head: writable bytes of the chain while it is in flight.
    in_flight: Vec<Option<u32>>,
    health: Health,
}

impl SplitDevice {
    /// `event_idx`: VIRTIO_RING_F_EVENT_IDX negotiated; `indirect`: VIRTIO_F_INDIRECT_DESC.
    pub fn new(layout: RingLayout, event_idx: bool, indirect: bool) -> Result<Self> {
        let a = Addrs::new(&layout)?;
        Ok(Self {
            a,
            event_idx,
            indirect,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
            notify_enabled: true,
            in_flight: vec![None; usize::from(a.size)],
            health: Health::default(),
        })
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.a.size
    }

    pub(crate) fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The next avail index to process (GET_VRING_BASE).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// SET_VRING_BASE.
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = idx;
    }

    /// Where the next used element goes (the used half of the base after a reconnect).
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Where the next used element goes; after a reconnect, pass the guest's used.idx.
    pub fn set_next_used(&mut self, idx: u16) {
        self.next_used = idx;
        self.signalled_used = None;
    }

    /// Takes the next used index from the ring's own `used.idx`: after a reconnect the
    /// driver's view is the truth (ADVERSARIAL J2).
    pub fn sync_used_from_ring(&mut self, mem: &GuestMemory) -> Result<()> {
        let idx = mem.read_u16(self.a.used_idx())?;
        self.set_next_used(idx);
        Ok(())
    }

    /// True once an error from shared memory has stopped the queue (see [`VringError::Broken`]).
    pub fn is_broken(&self) -> bool {
        self.health.is_broken()
    }

    /// Chains the driver has made available and we have not popped (ADVERSARIAL E6).
    fn pending(&self, mem: &GuestMemory) -> Result<u16> {
        let avail = mem.read_u16(self.a.avail_idx())?;
        let n = avail.wrapping_sub(self.next_avail);
        if n > self.a.size {
            return Err(VringError::InvalidAvailIndex {
                avail,
                next: self.next_avail,
                size: self.a.size,
            });
        }
        // The ring entries and descriptors are read after the index that published them.
        fence(Ordering::Acquire);
        Ok(n)
    }

    /// Pops the next available chain, or None if the driver has offered nothing new.
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>> {
        self.health.check()?;
        let r = self.pop_inner::<{ walk::MAPPED }>(mem);
        self.health.sticky_pop(r)
    }

    /// [`pop`](Self::pop) for a ring behind an IOMMU whose IOMMU side did not answer a
    /// miss on a buffer: the chain's buffers may lie in IOTLB holes (the device meets the
    /// hole when it touches one and fails that request, writing its status if that is
    /// mapped). A miss on the descriptor table or an indirect table still consumes
    /// nothing: [`discard`](Self::discard) that head instead.
    pub fn pop_with_holes(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>> {
        self.health.check()?;
        let r = self.pop_inner::<{ walk::HOLES }>(mem);
        self.health.sticky_pop(r)
    }

    /// Consumes the next available head without reading its descriptors or touching its
    /// buffers (a chain whose descriptor table the IOMMU never mapped): it is in flight
    /// with no writable bytes, a chain with no segments, for the caller to return as used
    /// with length 0. None if the driver offered nothing new.
    pub fn discard(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>> {
        self.health.check()?;
        let r = self.pop_inner::<{ walk::SKIP }>(mem);
        self.health.sticky(r)
    }

    /// Pops up to `max` chains. An error stops the queue; chains popped before it are
    /// dropped with it.
    pub fn pop_batch(&mut self, mem: &GuestMemory, max: usize) -> Result<Vec<DescriptorChain>> {
        pop_up_to(max, || self.pop(mem))
    }

    fn pop_inner<const W: u8>(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        let head = mem.read_u16(self.a.avail_slot(self.next_avail))?;
        if head >= self.a.size {
            return Err(VringError::InvalidHead {
                head: u32::from(head),
                size: self.a.size,
            });
        }
        if self.in_flight[usize::from(head)].is_some() {
            return Err(VringError::HeadInFlight { head });
        }
        let chain = if W == walk::SKIP {
            ChainBuilder::<W>::new(head, self.a.size).finish(1)
        } else {
            self.walk::<W>(mem, head)?
        };
        self.in_flight[usize::from(head)] = Some(chain.writable_len());
        self.next_avail = self.next_avail.wrapping_add(1);
        if self.event_idx && self.notify_enabled {
            mem.write_u16(self.a.avail_event(), self.next_avail)
                .map_err(|e| VringError::from(e).consumed())?;
        }
        Ok(Some(chain))
    }

    /// Takes back chains an earlier back-end popped and never completed (inflight
    /// tracking): walks each head again, marks it in flight, and moves the next avail index
    /// to the used index plus their number, where the earlier back-end had got to.
    pub fn resubmit(&mut self, mem: &GuestMemory, heads: &[u16]) -> Result<Vec<DescriptorChain>> {
        self.health.check()?;
        let r = self.resubmit_inner(mem, heads);
        self.health.sticky(r)
    }

    fn resubmit_inner(&mut self, mem: &GuestMemory, heads: &[u16]) -> Result<Vec<DescriptorChain>> {
        let mut chains = Vec::with_capacity(heads.len());
        for &head in heads {
            if head >= self.a.size {
                return Err(VringError::InvalidHead {
                    head: u32::from(head),
                    size: self.a.size,
                });
            }
            if self.in_flight[usize::from(head)].is_some() {
                return Err(VringError::HeadInFlight { head });
            }
            let chain = self.walk::<{ walk::MAPPED }>(mem, head)?;
            self.in_flight[usize::from(head)] = Some(chain.writable_len());
            chains.push(chain);
        }
        self.next_avail = self.next_used.wrapping_add(heads.len() as u16);
        Ok(chains)
    }

    /// Walks the chain at `head`, reading each descriptor once (E9).
    fn walk<const W: u8>(&self, mem: &GuestMemory, head: u16) -> Result<DescriptorChain> {
        let size = self.a.size;
        let mut b = ChainBuilder::<W>::new(head, size);
        let mut idx = head;
        let mut steps = 0u32;
        loop {
            steps += 1;
            if steps > u32::from(size) {
                return Err(VringError::DescriptorLoop { head });
            }
            let d = read_split_desc(mem, self.a.desc_at(idx))?;
            if d.flags & DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(VringError::IndirectNotNegotiated);
                }
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(VringError::IndirectWithNext);
                }
                let entries = indirect_entries(mem, &d)?;
                walk_indirect(mem, &mut b, head, d.addr, entries)?;
                break;
            }
            b.push(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0)?;
            if d.flags & DESC_F_NEXT == 0 {
                break;
            }
            if d.extra >= size {
                return Err(VringError::InvalidHead {
                    head: u32::from(d.extra),
                    size,
                });
            }
            idx = d.extra;
        }
        Ok(b.finish(1))
    }

    /// Returns a chain as used with `len` bytes written. A head not in flight or a length
    /// beyond the chain's writable bytes is refused (E11) without touching the ring.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<()> {
        self.add_used_batch(mem, &[(head, len)])
    }

    /// Returns several chains, publishing the used index once.
    pub fn add_used_batch(&mut self, mem: &GuestMemory, used: &[(u16, u32)]) -> Result<()> {
        self.health.check()?;
        // Validate everything first (including duplicates within the batch).
        let mut seen = Vec::with_capacity(used.len());
        for &(head, len) in used {
            let max = match self.in_flight.get(usize::from(head)) {
                None => {
                    return Err(VringError::InvalidHead {
                        head: u32::from(head),
                        size: self.a.size,
                    })
                }
                Some(None) => None,
                Some(Some(_)) if seen.contains(&head) => None,
                Some(&Some(max)) => Some(max),
            };
            let Some(max) = max else {
                return Err(VringError::InvalidUsed {
                    id: u32::from(head),
                    len,
                    reason: "not in flight",
                });
            };
            if len > max {
                return Err(VringError::InvalidUsed {
                    id: u32::from(head),
                    len,
                    reason: "longer than the chain's writable bytes",
                });
            }
            seen.push(head);
        }
        let r = self.write_used(mem, used);
        self.health.sticky(r)
    }

    fn write_used(&mut self, mem: &GuestMemory, used: &[(u16, u32)]) -> Result<()> {
        let mut idx = self.next_used;
        for &(head, len) in used {
            let slot = self.a.used_slot(idx);
            mem.write_u32(slot, u32::from(head))?;
            mem.write_u32(slot.wrapping_add(4), len)?;
            idx = idx.wrapping_add(1);
        }
        fence(Ordering::Release);
        mem.write_u16(self.a.used_idx(), idx)?;
        for &(head, _) in used {
            self.in_flight[usize::from(head)] = None;
        }
        self.next_used = idx;
        Ok(())
    }

    /// Whether the driver wants an interrupt for the used elements added since the last
    /// call: EVENT_IDX `used_event` rule, else the avail ring's NO_INTERRUPT flag (and false
    /// when nothing was added since the last call).
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> Result<bool> {
        self.health.check()?;
        // Our used.idx store must be visible before we read the driver's suppression state.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let r = if self.event_idx {
            mem.read_u16(self.a.used_event()).map(|event| {
                match self.signalled_used.replace(new) {
                    // Nothing is known about what the driver saw before: notify.
                    None => true,
                    Some(old) => need_event(event, new, old),
                }
            })
        } else {
            mem.read_u16(self.a.avail_flags()).map(|f| {
                let added = self.signalled_used.replace(new) != Some(new);
                added && f & AVAIL_F_NO_INTERRUPT == 0
            })
        };
        self.health.sticky(r.map_err(VringError::from))
    }

    /// Asks the driver to kick (enable) or not (disable): EVENT_IDX `avail_event`, else the
    /// used ring's NO_NOTIFY flag. After enabling, returns whether buffers are already
    /// pending (they would otherwise be missed: process them before sleeping).
    pub fn set_notification(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        self.health.check()?;
        self.notify_enabled = enable;
        let r = self.set_notification_inner(mem, enable);
        self.health.sticky(r)
    }

    fn set_notification_inner(&self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        if self.event_idx {
            if enable {
                mem.write_u16(self.a.avail_event(), self.next_avail)?;
            }
        } else {
            mem.write_u16(
                self.a.used_flags(),
                if enable { 0 } else { USED_F_NO_NOTIFY },
            )?;
        }
        if !enable {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? > 0)
    }
}

/// Walks an indirect table of `entries` split descriptors, bounded by the entry count.
fn walk_indirect<const W: u8>(
    mem: &GuestMemory,
    b: &mut ChainBuilder<W>,
    head: u16,
    table: u64,
    entries: u32,
) -> Result<()> {
    let mut i = 0u16;
    let mut steps = 0u32;
    loop {
        steps += 1;
        if steps > entries {
            return Err(VringError::DescriptorLoop { head });
        }
        // Inside the table (checked by indirect_entries), so no overflow.
        let d = read_split_desc(mem, table + DESC_SIZE * u64::from(i))?;
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(VringError::NestedIndirect);
        }
        b.push(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        if u32::from(d.extra) >= entries {
            return Err(VringError::InvalidHead {
                head: u32::from(d.extra),
                size: entries as u16, // <= 65535
            });
        }
        i = d.extra;
    }
}

/// What the driver remembers about a buffer in flight (never re-read from shared memory).
#[derive(Clone, Debug)]
struct InFlight {
    descs: Vec<u16>,
    writable: u32,
}

/// The driver side of a split ring: offers buffers, kicks, collects used buffers.
#[derive(Debug)]
pub struct SplitDriver {
    a: Addrs,
    event_idx: bool,
    free: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: u16,
    avail_shadow: u16,
    avail_published: u16,
    kicked_at: u16,
    last_used: u16,
    /// Whether the driver wants used-buffer notifications; with EVENT_IDX, `used_event`
    /// then follows `last_used`, so each reaped batch re-arms the next notification.
    notify: bool,
    health: Health,
}

impl SplitDriver {
    /// A driver view of the ring at `layout`, every descriptor free; call `init` before the peer
    /// sees it.
    pub fn new(layout: RingLayout, event_idx: bool) -> Result<Self> {
        let a = Addrs::new(&layout)?;
        Ok(Self {
            a,
            event_idx,
            free: (0..a.size).rev().collect(),
            in_flight: vec![None; usize::from(a.size)],
            in_flight_count: 0,
            avail_shadow: 0,
            avail_published: 0,
            kicked_at: 0,
            last_used: 0,
            notify: true,
            health: Health::default(),
        })
    }

    /// Zeroes the three ring areas (before handing the ring to a device).
    pub fn init(&mut self, mem: &GuestMemory) -> Result<()> {
        let n = u64::from(self.a.size);
        for (addr, len) in [
            (self.a.desc, DESC_SIZE * n),
            (self.a.avail, 6 + 2 * n),
            (self.a.used, 6 + 8 * n),
        ] {
            mem.write(addr, &vec![0u8; len as usize])?;
        }
        Ok(())
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.a.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Buffers added and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.in_flight_count
    }

    /// True once an error from shared memory has stopped the queue (see [`VringError::Broken`]).
    pub fn is_broken(&self) -> bool {
        self.health.is_broken()
    }

    /// Adds a buffer of device-readable then device-writable segments, one descriptor per
    /// segment; returns its head. Not visible to the device until [`publish`](Self::publish).
    pub fn add(
        &mut self,
        mem: &GuestMemory,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16> {
        self.health.check()?;
        let writable_len = check_driver_segments(mem, readable, writable)?;
        let n = readable.len() + writable.len();
        if n > self.free.len() {
            return Err(VringError::QueueFull {
                needed: n,
                free: self.free.len(),
            });
        }
        let descs: Vec<u16> = self.free.split_off(self.free.len() - n);
        let segs = readable
            .iter()
            .map(|&(a, l)| (a, l, 0))
            .chain(writable.iter().map(|&(a, l)| (a, l, DESC_F_WRITE)));
        let mut r = Ok(());
        for (k, (addr, len, w)) in segs.enumerate() {
            let (flags, next) = match descs.get(k + 1) {
                Some(&next) => (w | DESC_F_NEXT, next),
                None => (w, 0),
            };
            r = mem
                .write(
                    self.a.desc_at(descs[k]),
                    &encode_split_desc(addr, len, flags, next),
                )
                .map_err(VringError::from);
            if r.is_err() {
                break;
            }
        }
        self.offer(mem, r, descs, writable_len)
    }

    /// Adds a buffer through an indirect table written at `table` (16 * segments bytes of
    /// guest memory owned by the caller until the buffer is used); uses one ring descriptor.
    /// The device must have negotiated VIRTIO_F_INDIRECT_DESC.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemory,
        table: u64,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16> {
        self.health.check()?;
        let writable_len = check_driver_segments(mem, readable, writable)?;
        let n = readable.len() + writable.len();
        if n > usize::from(self.a.size) {
            return Err(VringError::ChainTooLong {
                head: 0,
                max: self.a.size,
            });
        }
        let Some(&head) = self.free.last() else {
            return Err(VringError::QueueFull { needed: 1, free: 0 });
        };
        let mut bytes = Vec::with_capacity(n * 16);
        let segs = readable
            .iter()
            .map(|&(a, l)| (a, l, 0))
            .chain(writable.iter().map(|&(a, l)| (a, l, DESC_F_WRITE)));
        for (k, (addr, len, w)) in segs.enumerate() {
            let (flags, next) = if k + 1 < n {
                (w | DESC_F_NEXT, (k + 1) as u16)
            } else {
                (w, 0)
            };
            bytes.extend_from_slice(&encode_split_desc(addr, len, flags, next));
        }
        mem.write(table, &bytes)?;
        self.free.pop();
        let r = mem
            .write(
                self.a.desc_at(head),
                &encode_split_desc(table, bytes.len() as u32, DESC_F_INDIRECT, 0),
            )
            .map_err(VringError::from);
        self.offer(mem, r, vec![head], writable_len)
    }

    /// Puts the chain's head in the next avail slot, or gives the descriptors back.
    fn offer(
        &mut self,
        mem: &GuestMemory,
        written: Result<()>,
        descs: Vec<u16>,
        writable: u32,
    ) -> Result<u16> {
        let head = descs[0];
        let r = written.and_then(|()| {
            mem.write_u16(self.a.avail_slot(self.avail_shadow), head)
                .map_err(VringError::from)
        });
        if let Err(e) = r {
            self.free.extend(descs.iter().rev());
            return Err(e);
        }
        self.avail_shadow = self.avail_shadow.wrapping_add(1);
        self.in_flight[usize::from(head)] = Some(InFlight { descs, writable });
        self.in_flight_count += 1;
        Ok(head)
    }

    /// Makes every buffer added so far visible to the device (Release store of avail.idx).
    pub fn publish(&mut self, mem: &GuestMemory) -> Result<()> {
        self.health.check()?;
        fence(Ordering::Release);
        let r = mem.write_u16(self.a.avail_idx(), self.avail_shadow);
        self.health.sticky(r.map_err(VringError::from))?;
        self.avail_published = self.avail_shadow;
        Ok(())
    }

    /// Whether the device wants a kick for the buffers published since the last call:
    /// EVENT_IDX `avail_event` rule, else the used ring's NO_NOTIFY flag. False when
    /// nothing new was published.
    pub fn kick_needed(&mut self, mem: &GuestMemory) -> Result<bool> {
        self.health.check()?;
        fence(Ordering::SeqCst);
        let old = self.kicked_at;
        let new = self.avail_published;
        if old == new {
            return Ok(false);
        }
        let r = if self.event_idx {
            mem.read_u16(self.a.avail_event())
                .map(|event| need_event(event, new, old))
        } else {
            mem.read_u16(self.a.used_flags())
                .map(|f| f & USED_F_NO_NOTIFY == 0)
        };
        let r = self.health.sticky(r.map_err(VringError::from))?;
        self.kicked_at = new;
        Ok(r)
    }

    /// Collects the buffers the device returned, with the bytes it wrote. A used index that
    /// runs ahead of what is in flight, an id not in flight or a length beyond the buffer's
    /// writable bytes stops the queue.
    pub fn poll_used(&mut self, mem: &GuestMemory) -> Result<Vec<(u16, u32)>> {
        self.health.check()?;
        let r = self.poll_inner(mem);
        self.health.sticky(r)
    }

    fn poll_inner(&mut self, mem: &GuestMemory) -> Result<Vec<(u16, u32)>> {
        let used = mem.read_u16(self.a.used_idx())?;
        let n = used.wrapping_sub(self.last_used);
        if n > self.in_flight_count {
            return Err(VringError::InvalidUsedIndex {
                used,
                last: self.last_used,
                in_flight: self.in_flight_count,
            });
        }
        fence(Ordering::Acquire);
        let mut out = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let slot = self.a.used_slot(self.last_used);
            let id = mem.read_u32(slot)?;
            let len = mem.read_u32(slot.wrapping_add(4))?;
            let bad = |reason| VringError::InvalidUsed { id, len, reason };
            let entry = usize::try_from(id)
                .ok()
                .and_then(|i| self.in_flight.get_mut(i))
                .ok_or_else(|| bad("id out of range"))?;
            let Some(f) = entry.as_ref() else {
                return Err(bad("not in flight"));
            };
            if len > f.writable {
                return Err(bad("longer than the buffer's writable bytes"));
            }
            let f = entry.take().expect("checked above");
            self.free.extend(f.descs.iter().rev());
            self.in_flight_count -= 1;
            self.last_used = self.last_used.wrapping_add(1);
            out.push((id as u16, len));
        }
        if n > 0 && self.event_idx && self.notify {
            // Ask to be notified when the device uses the next buffer, as a driver
            // waiting on its call eventfd expects (the Linux driver does the same).
            mem.write_u16(self.a.used_event(), self.last_used)?;
        }
        Ok(out)
    }

    /// Asks the device for interrupts (enable) or not: EVENT_IDX `used_event`, else the
    /// avail ring's NO_INTERRUPT flag. After enabling, returns whether used buffers are
    /// already waiting.
    pub fn set_used_notification(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        self.health.check()?;
        let r = self.set_used_notification_inner(mem, enable);
        self.health.sticky(r)
    }

    fn set_used_notification_inner(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        self.notify = enable;
        if self.event_idx {
            // Off: move the event half the index space away, out of reach of a queue of
            // at most 32768 entries until it is re-armed (Linux parks it similarly).
            let event = if enable {
                self.last_used
            } else {
                self.last_used.wrapping_add(0x8000)
            };
            mem.write_u16(self.a.used_event(), event)?;
        } else {
            mem.write_u16(
                self.a.avail_flags(),
                if enable { 0 } else { AVAIL_F_NO_INTERRUPT },
            )?;
        }
        if !enable {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        Ok(mem.read_u16(self.a.used_idx())? != self.last_used)
    }
}
