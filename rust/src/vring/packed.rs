//! Packed virtqueues (virtio 1.x, 2.8): one descriptor ring in which the driver marks
//! descriptors available and the device overwrites them as used, with wrap counters, and
//! two event suppression areas.
//!
//! Descriptor: addr u64, len u32, id u16, flags u16. A descriptor is available when its
//! AVAIL bit equals the driver's wrap counter and its USED bit differs; used when both
//! equal the device's wrap counter.

use std::sync::atomic::{fence, Ordering};

use crate::memory::GuestMemory;

use super::chain::{
    check_driver_segments, encode_packed_desc, indirect_entries, pop_up_to, read_packed_desc, walk,
    ChainBuilder, RawDesc,
};
use super::error::Health;
use super::event::{packed_need_event, EventFlags, EventSuppress};
use super::{
    DescriptorChain, Result, RingLayout, VringError, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT,
    DESC_F_USED, DESC_F_WRITE, DESC_SIZE,
};

/// A packed ring descriptor as the device read it: `(addr, len, id, flags)`.
pub type RingDesc = (u64, u32, u16, u16);

/// Ring geometry from a validated packed layout.
#[derive(Clone, Copy, Debug)]
struct Ring {
    size: u16,
    desc: u64,
    driver_event: u64,
    device_event: u64,
}

impl Ring {
    fn new(layout: &RingLayout) -> Result<Self> {
        if !layout.is_packed() {
            return Err(VringError::InvalidSize(u32::from(layout.size())));
        }
        Ok(Self {
            size: layout.size(),
            desc: layout.desc(),
            driver_event: layout.avail_or_driver(),
            device_event: layout.used_or_device(),
        })
    }

    // A wrapped sum only arises for areas at the top of the address space and is then
    // rejected by GuestMemory like any other bad address.
    fn slot(&self, i: u16) -> u64 {
        self.desc.wrapping_add(DESC_SIZE * u64::from(i))
    }

    fn flags_at(&self, i: u16) -> u64 {
        self.slot(i).wrapping_add(14)
    }

    /// Position `n` descriptors after (i, wrap); n <= size.
    fn advance(&self, i: u16, wrap: bool, n: u16) -> (u16, bool) {
        let next = u32::from(i) + u32::from(n);
        if next >= u32::from(self.size) {
            ((next - u32::from(self.size)) as u16, !wrap)
        } else {
            (next as u16, wrap)
        }
    }
}

fn off_wrap(idx: u16, wrap: bool) -> u16 {
    idx | if wrap { 0x8000 } else { 0 }
}

fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
}

fn is_used(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) == wrap
}

/// Decision shared by both sides from the peer's suppression structure. DESC without
/// EVENT_IDX and the reserved value 3 count as ENABLE (F6: a spare notification is safe).
fn wants_notification(
    ev: EventSuppress,
    event_idx: bool,
    pos: (u16, bool),
    moved: u32,
    size: u16,
) -> bool {
    match ev.flags {
        EventFlags::Disable => false,
        EventFlags::Desc if event_idx => {
            packed_need_event(ev.offset(), ev.wrap(), pos.0, pos.1, moved, size)
        }
        _ => moved > 0,
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// Ring descriptors the buffer occupies.
    descs: u16,
    writable: u32,
}

/// The device side of a packed ring.
#[derive(Debug)]
pub struct PackedDevice {
    r: Ring,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Ring descriptors returned since the last notification decision.
    used_since_signal: u32,
    notify_enabled: bool,
    in_flight: Vec<Option<InFlight>>,
    in_flight_descs: u32,
    health: Health,
}

impl PackedDevice {
    /// A device view of the ring at `layout`, starting where a fresh ring starts (slot 0, wrap
    /// counters set); `event_idx` and `indirect` are the negotiated features it enforces.
    pub fn new(layout: RingLayout, event_idx: bool, indirect: bool) -> Result<Self> {
        let r = Ring::new(&layout)?;
        Ok(Self {
            r,
            event_idx,
            indirect,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            used_since_signal: 0,
            notify_enabled: true,
            in_flight: vec![None; usize::from(r.size)],
            in_flight_descs: 0,
            health: Health::default(),
        })
    }

    /// The ring's size, the bound every slot and buffer id is checked against.
    pub fn size(&self) -> u16 {
        self.r.size
    }

    /// Guest-physical addresses of the descriptor ring and of the device event area: the
    /// two places the device writes (dirty logging marks them).
    pub(crate) fn written_areas(&self) -> (u64, u64) {
        (self.r.desc, self.r.device_event)
    }

    /// Next slot to pop and the driver wrap counter expected there (GET_VRING_BASE).
    pub fn next_avail(&self) -> (u16, bool) {
        (self.next_avail, self.avail_wrap)
    }

    /// SET_VRING_BASE: the slot must be below the queue size.
    pub fn set_next_avail(&mut self, idx: u16, wrap: bool) -> Result<()> {
        self.check_slot(idx)?;
        self.next_avail = idx;
        self.avail_wrap = wrap;
        Ok(())
    }

    /// Next slot to write a used descriptor to and the device wrap counter there (the used half of
    /// the packed base).
    pub fn next_used(&self) -> (u16, bool) {
        (self.next_used, self.used_wrap)
    }

    /// Restores the used half of the base; the slot must be below the queue size.
    pub fn set_next_used(&mut self, idx: u16, wrap: bool) -> Result<()> {
        self.check_slot(idx)?;
        self.next_used = idx;
        self.used_wrap = wrap;
        Ok(())
    }

    fn check_slot(&self, idx: u16) -> Result<()> {
        if idx >= self.r.size {
            return Err(VringError::InvalidHead {
                head: u32::from(idx),
                size: self.r.size,
            });
        }
        Ok(())
    }

    /// True once an error from shared memory has stopped the queue (see [`VringError::Broken`]).
    pub fn is_broken(&self) -> bool {
        self.health.is_broken()
    }

    /// Pops the next available buffer; its `head` is the buffer id.
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>> {
        self.health.check()?;
        let r = self.pop_inner::<{ walk::MAPPED }>(mem, None);
        self.health.sticky_pop(r)
    }

    /// [`pop`](Self::pop) whose buffers may lie in IOTLB holes (see
    /// [`SplitDevice::pop_with_holes`](super::SplitDevice::pop_with_holes)); `record` as for
    /// [`pop_batch_recording`](Self::pop_batch_recording).
    pub fn pop_with_holes(
        &mut self,
        mem: &GuestMemory,
        record: Option<&mut Vec<RingDesc>>,
    ) -> Result<Option<DescriptorChain>> {
        self.health.check()?;
        let r = self.pop_inner::<{ walk::HOLES }>(mem, record);
        self.health.sticky_pop(r)
    }

    /// Consumes the next available buffer reading only its ring descriptors (for its id
    /// and length in the ring), never an indirect table or a buffer: in flight with no
    /// writable bytes, a chain with no segments, for the caller to return as used with
    /// length 0 (see [`SplitDevice::discard`](super::SplitDevice::discard)). The ring
    /// itself is mapped before a queue runs, so this cannot miss.
    pub fn discard(
        &mut self,
        mem: &GuestMemory,
        record: Option<&mut Vec<RingDesc>>,
    ) -> Result<Option<DescriptorChain>> {
        self.health.check()?;
        let r = self.pop_inner::<{ walk::SKIP }>(mem, record);
        self.health.sticky(r)
    }

    /// Pops up to `max` buffers. An error stops the queue; buffers popped before it are
    /// dropped with it.
    pub fn pop_batch(&mut self, mem: &GuestMemory, max: usize) -> Result<Vec<DescriptorChain>> {
        pop_up_to(max, || self.pop(mem))
    }

    /// [`pop_batch`](Self::pop_batch) that also appends to `ring` the ring descriptors of
    /// each buffer, in order, as read (`(addr, len, id, flags)`; one for an indirect buffer,
    /// the one pointing at its table): what a back-end must keep to rebuild the buffers
    /// after a restart ([`resubmit`](Self::resubmit)). Chain `i` owns the next
    /// `ring_descriptors` entries.
    pub fn pop_batch_recording(
        &mut self,
        mem: &GuestMemory,
        max: usize,
        ring: &mut Vec<RingDesc>,
    ) -> Result<Vec<DescriptorChain>> {
        pop_up_to(max, || {
            self.health.check()?;
            let recorded = ring.len();
            let r = self.pop_inner::<{ walk::MAPPED }>(mem, Some(&mut *ring));
            if r.is_err() {
                // A miss is popped again from the start: drop its partial record.
                ring.truncate(recorded);
            }
            self.health.sticky_pop(r)
        })
    }

    /// The flags word of ring slot `slot` as it is in memory now (a restarted back-end
    /// looks there to tell whether a batch of used buffers was published).
    pub fn ring_flags(&self, mem: &GuestMemory, slot: u16) -> Result<u16> {
        self.check_slot(slot)?;
        Ok(mem.read_u16(self.r.flags_at(slot))?)
    }

    /// Takes back buffers an earlier back-end popped and did not complete, from the ring
    /// descriptors it recorded (as [`pop_batch_recording`](Self::pop_batch_recording)
    /// gives them), with the same checks as a pop (an indirect table is walked again from
    /// memory). The next used slot becomes `used`, and the next slot to pop is `used` plus
    /// the ring descriptors now in flight: every descriptor popped was either returned as
    /// used or belongs to a buffer in flight. For a ring with nothing in flight.
    pub fn resubmit(
        &mut self,
        mem: &GuestMemory,
        buffers: &[Vec<RingDesc>],
        used: (u16, bool),
    ) -> Result<Vec<DescriptorChain>> {
        self.health.check()?;
        let r = self.resubmit_inner(mem, buffers, used);
        self.health.sticky(r)
    }

    fn resubmit_inner(
        &mut self,
        mem: &GuestMemory,
        buffers: &[Vec<RingDesc>],
        used: (u16, bool),
    ) -> Result<Vec<DescriptorChain>> {
        let size = self.r.size;
        self.set_next_used(used.0, used.1)?;
        let mut chains = Vec::with_capacity(buffers.len());
        let mut slot = used;
        for descs in buffers {
            let Some(&(_, _, id, _)) = descs.last() else {
                return Err(VringError::EmptyChain);
            };
            if descs.len() > usize::from(size) {
                return Err(VringError::ChainTooLong {
                    head: slot.0,
                    max: size,
                });
            }
            let count = descs.len() as u16; // <= size
            let mut b = ChainBuilder::<{ walk::MAPPED }>::new(slot.0, size);
            for (k, &(addr, len, id, flags)) in descs.iter().enumerate() {
                let d = RawDesc {
                    addr,
                    len,
                    extra: id,
                    flags,
                };
                let last = self.push_desc(mem, &mut b, &d, flags)?;
                if last != (k + 1 == descs.len()) {
                    // NEXT must be set on every descriptor but the last.
                    return Err(VringError::IncompleteChain { slot: slot.0 });
                }
            }
            chains.push(self.take_in_flight(b, id, count)?);
            slot = self.r.advance(slot.0, slot.1, count);
        }
        // in_flight_descs <= size: take_in_flight refuses more.
        (self.next_avail, self.avail_wrap) =
            self.r.advance(used.0, used.1, self.in_flight_descs as u16);
        Ok(chains)
    }

    fn pop_inner<const W: u8>(
        &mut self,
        mem: &GuestMemory,
        mut record: Option<&mut Vec<RingDesc>>,
    ) -> Result<Option<DescriptorChain>> {
        let size = self.r.size;
        let start = self.next_avail;
        let mut flags = mem.read_u16(self.r.flags_at(start))?;
        if !is_avail(flags, self.avail_wrap) {
            return Ok(None); // F2: anything inconsistent is simply not available
        }
        // The rest of the descriptor is read after the flags that published it.
        fence(Ordering::Acquire);
        let mut b = ChainBuilder::<W>::new(start, size);
        let (mut slot, mut wrap) = (start, self.avail_wrap);
        let mut count: u16 = 0;
        let id = loop {
            count += 1;
            // Flags were read once, above or at the end of the previous step (E9).
            let d = read_packed_desc(mem, self.r.slot(slot))?;
            if let Some(r) = record.as_deref_mut() {
                r.push((d.addr, d.len, d.extra, flags));
            }
            if self.push_desc(mem, &mut b, &d, flags)? {
                break d.extra;
            }
            if count == size {
                // NEXT all around the ring (F3).
                return Err(VringError::ChainTooLong {
                    head: start,
                    max: size,
                });
            }
            (slot, wrap) = self.r.advance(slot, wrap, 1);
            flags = mem.read_u16(self.r.flags_at(slot))?;
            if !is_avail(flags, wrap) {
                return Err(VringError::IncompleteChain { slot: start });
            }
        };
        let chain = self.take_in_flight(b, id, count)?;
        (self.next_avail, self.avail_wrap) = self.r.advance(start, self.avail_wrap, count);
        if self.event_idx && self.notify_enabled {
            self.write_event(mem, true).map_err(VringError::consumed)?;
        }
        Ok(Some(chain))
    }

    /// Adds one ring descriptor (with its `flags`, read once) to a chain; an indirect one
    /// brings its whole table. Returns whether it ends the buffer.
    fn push_desc<const W: u8>(
        &self,
        mem: &GuestMemory,
        b: &mut ChainBuilder<W>,
        d: &RawDesc,
        flags: u16,
    ) -> Result<bool> {
        if flags & DESC_F_INDIRECT != 0 {
            if !self.indirect {
                return Err(VringError::IndirectNotNegotiated);
            }
            if flags & DESC_F_NEXT != 0 {
                return Err(VringError::IndirectWithNext);
            }
            if W == walk::SKIP {
                return Ok(true);
            }
            let entries = indirect_entries(mem, d)?;
            walk_indirect(mem, b, d.addr, entries)?;
            return Ok(true);
        }
        b.push(mem, d.addr, d.len, flags & DESC_F_WRITE != 0)?;
        Ok(flags & DESC_F_NEXT == 0)
    }

    /// Marks buffer `id`, `count` ring descriptors, in flight: it must be a valid id not
    /// already in flight, and the ring cannot hold more descriptors than its size.
    fn take_in_flight<const W: u8>(
        &mut self,
        b: ChainBuilder<W>,
        id: u16,
        count: u16,
    ) -> Result<DescriptorChain> {
        let size = self.r.size;
        if id >= size {
            return Err(VringError::InvalidHead {
                head: u32::from(id),
                size,
            });
        }
        if self.in_flight[usize::from(id)].is_some() {
            return Err(VringError::HeadInFlight { head: id });
        }
        let in_flight = self.in_flight_descs + u32::from(count);
        if in_flight > u32::from(size) {
            return Err(VringError::Overrun { in_flight, size });
        }
        let mut chain = b.finish(count);
        chain.head = id;
        self.in_flight[usize::from(id)] = Some(InFlight {
            descs: count,
            writable: chain.writable_len(),
        });
        self.in_flight_descs = in_flight;
        Ok(chain)
    }

    /// Returns a buffer as used with `len` bytes written. An id not in flight or a length
    /// beyond the buffer's writable bytes is refused without touching the ring.
    pub fn add_used(&mut self, mem: &GuestMemory, id: u16, len: u32) -> Result<()> {
        self.add_used_batch(mem, &[(id, len)])
    }

    /// Returns several buffers; the first one's flags are written last, so the driver sees
    /// the batch at once.
    pub fn add_used_batch(&mut self, mem: &GuestMemory, used: &[(u16, u32)]) -> Result<()> {
        self.health.check()?;
        let mut seen: Vec<u16> = Vec::with_capacity(used.len());
        for &(id, len) in used {
            let Some(entry) = self.in_flight.get(usize::from(id)) else {
                return Err(VringError::InvalidHead {
                    head: u32::from(id),
                    size: self.r.size,
                });
            };
            let bad = |reason| VringError::InvalidUsed {
                id: u32::from(id),
                len,
                reason,
            };
            match entry {
                Some(_) if seen.contains(&id) => return Err(bad("not in flight")),
                None => return Err(bad("not in flight")),
                Some(f) if len > f.writable => {
                    return Err(bad("longer than the buffer's writable bytes"))
                }
                Some(_) => seen.push(id),
            }
        }
        let r = self.write_used(mem, used);
        self.health.sticky(r)
    }

    fn write_used(&mut self, mem: &GuestMemory, used: &[(u16, u32)]) -> Result<()> {
        let (mut slot, mut wrap) = (self.next_used, self.used_wrap);
        let mut flag_writes = Vec::with_capacity(used.len());
        for &(id, len) in used {
            let f = self.in_flight[usize::from(id)].expect("validated");
            let at = self.r.slot(slot);
            mem.write_u32(at.wrapping_add(8), len)?;
            mem.write_u16(at.wrapping_add(12), id)?;
            let flags = if wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 };
            flag_writes.push((slot, flags));
            (slot, wrap) = self.r.advance(slot, wrap, f.descs);
        }
        fence(Ordering::Release);
        for &(s, flags) in flag_writes.iter().skip(1) {
            mem.write_u16(self.r.flags_at(s), flags)?;
        }
        if let Some(&(s, flags)) = flag_writes.first() {
            fence(Ordering::Release);
            mem.write_u16(self.r.flags_at(s), flags)?;
        }
        for &(id, _) in used {
            let f = self.in_flight[usize::from(id)].take().expect("validated");
            self.in_flight_descs -= u32::from(f.descs);
            self.used_since_signal = self.used_since_signal.saturating_add(u32::from(f.descs));
        }
        (self.next_used, self.used_wrap) = (slot, wrap);
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was returned since the last call,
    /// from the driver event suppression area.
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> Result<bool> {
        self.health.check()?;
        fence(Ordering::SeqCst);
        let r = EventSuppress::read(mem, self.r.driver_event);
        let ev = self.health.sticky(r)?;
        let moved = std::mem::take(&mut self.used_since_signal);
        Ok(wants_notification(
            ev,
            self.event_idx,
            (self.next_used, self.used_wrap),
            moved,
            self.r.size,
        ))
    }

    /// Enables or disables kicks through the device event suppression area (with
    /// EVENT_IDX: DESC at the next slot to pop). After enabling, returns whether a buffer is
    /// already available.
    pub fn set_notification(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        self.health.check()?;
        self.notify_enabled = enable;
        let r = self.write_event(mem, enable).and_then(|()| {
            if !enable {
                return Ok(false);
            }
            fence(Ordering::SeqCst);
            let flags = mem.read_u16(self.r.flags_at(self.next_avail))?;
            Ok(is_avail(flags, self.avail_wrap))
        });
        self.health.sticky(r)
    }

    fn write_event(&self, mem: &GuestMemory, enable: bool) -> Result<()> {
        let ev = match (enable, self.event_idx) {
            (false, _) => EventSuppress {
                off_wrap: 0,
                flags: EventFlags::Disable,
            },
            (true, true) => EventSuppress {
                off_wrap: off_wrap(self.next_avail, self.avail_wrap),
                flags: EventFlags::Desc,
            },
            (true, false) => EventSuppress {
                off_wrap: 0,
                flags: EventFlags::Enable,
            },
        };
        ev.write(mem, self.r.device_event)
    }
}

/// Walks a packed indirect table: `entries` consecutive descriptors (NEXT is ignored).
fn walk_indirect<const W: u8>(
    mem: &GuestMemory,
    b: &mut ChainBuilder<W>,
    table: u64,
    entries: u32,
) -> Result<()> {
    for i in 0..entries {
        // Inside the table (checked by indirect_entries), so no overflow.
        let d = read_packed_desc(mem, table + DESC_SIZE * u64::from(i))?;
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(VringError::NestedIndirect);
        }
        b.push(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0)?;
    }
    Ok(())
}

/// The driver side of a packed ring.
#[derive(Debug)]
pub struct PackedDriver {
    r: Ring,
    event_idx: bool,
    next_avail: u16,
    avail_wrap: bool,
    free_ids: Vec<u16>,
    free_descs: u16,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: u16,
    /// Heads written but not yet made available: (slot, flags, descriptors).
    pending: Vec<(u16, u16, u16)>,
    published: (u16, bool),
    published_since_kick: u32,
    next_used: u16,
    used_wrap: bool,
    health: Health,
}

impl PackedDriver {
    /// A driver view of the ring at `layout`, with every buffer id free; call `init` before the
    /// peer sees it.
    pub fn new(layout: RingLayout, event_idx: bool) -> Result<Self> {
        let r = Ring::new(&layout)?;
        Ok(Self {
            r,
            event_idx,
            next_avail: 0,
            avail_wrap: true,
            free_ids: (0..r.size).rev().collect(),
            free_descs: r.size,
            in_flight: vec![None; usize::from(r.size)],
            in_flight_count: 0,
            pending: Vec::new(),
            published: (0, true),
            published_since_kick: 0,
            next_used: 0,
            used_wrap: true,
            health: Health::default(),
        })
    }

    /// Zeroes the descriptor ring and both event areas.
    pub fn init(&mut self, mem: &GuestMemory) -> Result<()> {
        mem.write(
            self.r.desc,
            &vec![0u8; (DESC_SIZE * u64::from(self.r.size)) as usize],
        )?;
        mem.write_u32(self.r.driver_event, 0)?;
        mem.write_u32(self.r.device_event, 0)?;
        Ok(())
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.r.size
    }

    /// Descriptors free for new buffers: what `QueueFull` is measured against.
    pub fn num_free(&self) -> usize {
        usize::from(self.free_descs)
    }

    /// Buffers handed to the device and not yet used.
    pub fn in_flight(&self) -> u16 {
        self.in_flight_count
    }

    /// True once an error from shared memory has stopped the queue (see [`VringError::Broken`]).
    pub fn is_broken(&self) -> bool {
        self.health.is_broken()
    }

    fn avail_flags(wrap: bool) -> u16 {
        if wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }

    /// Adds a buffer (one ring descriptor per segment); returns its buffer id. Not visible
    /// to the device until [`publish`](Self::publish).
    pub fn add(
        &mut self,
        mem: &GuestMemory,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16> {
        self.health.check()?;
        let writable_len = check_driver_segments(mem, readable, writable)?;
        let n = readable.len() + writable.len();
        if n > usize::from(self.free_descs) {
            return Err(VringError::QueueFull {
                needed: n,
                free: usize::from(self.free_descs),
            });
        }
        let segs: Vec<(u64, u32, u16)> = readable
            .iter()
            .map(|&(a, l)| (a, l, 0))
            .chain(writable.iter().map(|&(a, l)| (a, l, DESC_F_WRITE)))
            .collect();
        self.offer(mem, &segs, writable_len)
    }

    /// Adds a buffer through an indirect table written at `table` (16 * segments bytes the
    /// caller owns until the buffer is used); uses one ring descriptor. Needs
    /// VIRTIO_F_INDIRECT_DESC.
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
        if n > usize::from(self.r.size) {
            return Err(VringError::ChainTooLong {
                head: 0,
                max: self.r.size,
            });
        }
        if self.free_descs == 0 {
            return Err(VringError::QueueFull { needed: 1, free: 0 });
        }
        let mut bytes = Vec::with_capacity(n * 16);
        for &(a, l) in readable {
            bytes.extend_from_slice(&encode_packed_desc(a, l, 0, 0));
        }
        for &(a, l) in writable {
            bytes.extend_from_slice(&encode_packed_desc(a, l, 0, DESC_F_WRITE));
        }
        mem.write(table, &bytes)?;
        self.offer(
            mem,
            &[(table, bytes.len() as u32, DESC_F_INDIRECT)],
            writable_len,
        )
    }

    fn offer(&mut self, mem: &GuestMemory, segs: &[(u64, u32, u16)], writable: u32) -> Result<u16> {
        // free_descs >= segs.len() >= 1 and every in-flight id holds a descriptor, so an id
        // is free; checked anyway rather than trusted.
        let Some(&id) = self.free_ids.last() else {
            return Err(VringError::QueueFull {
                needed: segs.len(),
                free: 0,
            });
        };
        let (start, start_wrap) = (self.next_avail, self.avail_wrap);
        let (mut slot, mut wrap) = (start, start_wrap);
        let mut head_flags = 0;
        for (k, &(addr, len, w)) in segs.iter().enumerate() {
            let next = if k + 1 < segs.len() { DESC_F_NEXT } else { 0 };
            let flags = w | next | Self::avail_flags(wrap);
            let bytes = encode_packed_desc(addr, len, id, flags);
            let r = if k == 0 {
                head_flags = flags;
                // The head's flags are written by publish.
                mem.write(self.r.slot(slot), &bytes[..14])
            } else {
                mem.write(self.r.slot(slot), &bytes)
            };
            r?;
            (slot, wrap) = self.r.advance(slot, wrap, 1);
        }
        let descs = segs.len() as u16; // <= free_descs <= size
        self.free_ids.pop();
        self.free_descs -= descs;
        self.in_flight[usize::from(id)] = Some(InFlight { descs, writable });
        self.in_flight_count += 1;
        self.pending.push((start, head_flags, descs));
        (self.next_avail, self.avail_wrap) = (slot, wrap);
        Ok(id)
    }

    /// Makes the added buffers available: each head's flags are stored after a Release
    /// fence, in ring order.
    pub fn publish(&mut self, mem: &GuestMemory) -> Result<()> {
        self.health.check()?;
        let pending = std::mem::take(&mut self.pending);
        for &(slot, flags, descs) in &pending {
            fence(Ordering::Release);
            let r = mem.write_u16(self.r.flags_at(slot), flags);
            self.health.sticky(r.map_err(VringError::from))?;
            self.published_since_kick += u32::from(descs);
        }
        self.published = (self.next_avail, self.avail_wrap);
        Ok(())
    }

    /// Whether the device wants a kick for what was published since the last call, from
    /// the device event suppression area. False when nothing new was published.
    pub fn kick_needed(&mut self, mem: &GuestMemory) -> Result<bool> {
        self.health.check()?;
        fence(Ordering::SeqCst);
        if self.published_since_kick == 0 {
            return Ok(false);
        }
        let r = EventSuppress::read(mem, self.r.device_event);
        let ev = self.health.sticky(r)?;
        let moved = std::mem::take(&mut self.published_since_kick);
        Ok(wants_notification(
            ev,
            self.event_idx,
            self.published,
            moved,
            self.r.size,
        ))
    }

    /// Collects used buffers with the bytes the device wrote. An id not in flight or a
    /// length beyond the buffer's writable bytes stops the queue.
    pub fn poll_used(&mut self, mem: &GuestMemory) -> Result<Vec<(u16, u32)>> {
        self.health.check()?;
        let r = self.poll_inner(mem);
        self.health.sticky(r)
    }

    fn poll_inner(&mut self, mem: &GuestMemory) -> Result<Vec<(u16, u32)>> {
        let mut out = Vec::new();
        while self.in_flight_count > 0 {
            let at = self.r.slot(self.next_used);
            let flags = mem.read_u16(self.r.flags_at(self.next_used))?;
            if !is_used(flags, self.used_wrap) {
                break;
            }
            fence(Ordering::Acquire);
            let len = mem.read_u32(at.wrapping_add(8))?;
            let id = mem.read_u16(at.wrapping_add(12))?;
            let bad = |reason| VringError::InvalidUsed {
                id: u32::from(id),
                len,
                reason,
            };
            let entry = self
                .in_flight
                .get_mut(usize::from(id))
                .ok_or_else(|| bad("id out of range"))?;
            let f = match *entry {
                None => return Err(bad("not in flight")),
                Some(f) if len > f.writable => {
                    return Err(bad("longer than the buffer's writable bytes"))
                }
                Some(f) => f,
            };
            *entry = None;
            self.free_ids.push(id);
            self.free_descs += f.descs;
            self.in_flight_count -= 1;
            (self.next_used, self.used_wrap) =
                self.r.advance(self.next_used, self.used_wrap, f.descs);
            out.push((id, len));
        }
        Ok(out)
    }

    /// Asks for interrupts or not through the driver event suppression area (with
    /// EVENT_IDX: DESC at the next used slot). After enabling, returns whether a used
    /// buffer is already waiting.
    pub fn set_used_notification(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        self.health.check()?;
        let ev = match (enable, self.event_idx) {
            (false, _) => EventSuppress {
                off_wrap: 0,
                flags: EventFlags::Disable,
            },
            (true, true) => EventSuppress {
                off_wrap: off_wrap(self.next_used, self.used_wrap),
                flags: EventFlags::Desc,
            },
            (true, false) => EventSuppress {
                off_wrap: 0,
                flags: EventFlags::Enable,
            },
        };
        let r = ev.write(mem, self.r.driver_event).and_then(|()| {
            if !enable || self.in_flight_count == 0 {
                return Ok(false);
            }
            fence(Ordering::SeqCst);
            let flags = mem.read_u16(self.r.flags_at(self.next_used))?;
            Ok(is_used(flags, self.used_wrap))
        });
        self.health.sticky(r)
    }
}
