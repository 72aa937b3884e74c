//! Inflight tracking of packed rings, the vhost-user spec's `QueueRegionPacked`:
//!
//! header (32 bytes): `features: u64, version: u16, desc_num: u16, free_head: u16,
//! old_free_head: u16, used_idx: u16, old_used_idx: u16, used_wrap_counter: u8,
//! old_used_wrap_counter: u8, padding: [u8; 7]` (then padding to 32, the alignment of the
//! entries); then `desc_num` entries (32 bytes): `inflight: u8, padding: u8, next: u16,
//! last: u16, num: u16, counter: u64, id: u16, flags: u16, len: u32, addr: u64`.
//!
//! Entries are not indexed by buffer id: each popped ring descriptor takes the entry at
//! `free_head` (the free list runs through `next`), the first of a buffer's entries is its
//! head (`inflight`, `counter`, `num` descriptors, `last` entry). A completed batch goes
//! back on the free list and moves `used_idx` before the ring's flags show it; only then
//! are the `old_*` copies brought level. A restart compares: if the ring's slot at
//! `old_used_idx` no longer looks available, the batch reached the driver and is committed,
//! otherwise it is rolled back. Entries on the free list are not in flight; the heads left
//! are resubmitted in counter order.
//!
//! What is trusted after a restart: the area's used position (it is written before every
//! publication, and SET_VRING_BASE from a front-end that saw the back-end crash may be
//! stale); the next slot to pop follows from it and the descriptors still in flight. A
//! fresh area takes the position SET_VRING_BASE gave. An area keeps the format of the ring
//! that first started on it (nothing in the spec's layout tells the two apart); a front-end
//! that changes formats over a kept area only garbles its own requests, since every value
//! is checked again here and by the ring.

use std::collections::HashSet;

use crate::vring::{VringError, DESC_F_AVAIL, DESC_F_USED};

use super::{InflightError, InflightQueue, VERSION};

pub(super) const HEADER: usize = 32;
pub(super) const ENTRY: usize = 32;

const DESC_NUM: usize = 10;
const FREE_HEAD: usize = 12;
const OLD_FREE_HEAD: usize = 14;
const USED_IDX: usize = 16;
const OLD_USED_IDX: usize = 18;
const USED_WRAP: usize = 20;
const OLD_USED_WRAP: usize = 21;

const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

/// A ring descriptor as recorded: `(addr, len, id, flags)`.
type RingDesc = (u64, u32, u16, u16);

/// What a packed ring keeps in memory besides the area.
#[derive(Debug)]
pub(super) struct PackedTrack {
    /// Per buffer id: its head entry and ring descriptor count.
    by_id: Vec<Option<(u16, u16)>>,
    /// The batch announced by `completing`: (id, head entry, descriptors).
    batch: Vec<(u16, u16, u16)>,
}

/// The buffers an earlier back-end left in flight, oldest first, as ring descriptors,
/// and the used position to continue from.
#[derive(Debug, PartialEq, Eq)]
pub struct PackedResume {
    pub used: (u16, bool),
    pub buffers: Vec<Vec<RingDesc>>,
}

fn corrupt(why: String) -> InflightError {
    InflightError::Corrupt(why)
}

/// Position `n` slots after (idx, wrap) in a ring of `size`.
fn advance(idx: u16, wrap: bool, n: u32, size: u16) -> (u16, bool) {
    let size = u32::from(size);
    let mut next = u32::from(idx) + n % size;
    let mut wrap = wrap ^ ((n / size) % 2 == 1);
    if next >= size {
        next -= size;
        wrap = !wrap;
    }
    (next as u16, wrap)
}

impl InflightQueue {
    fn entry_p(e: u16) -> usize {
        HEADER + ENTRY * usize::from(e)
    }

    fn track(&mut self) -> &mut PackedTrack {
        self.packed.get_or_insert_with(|| PackedTrack {
            by_id: Vec::new(),
            batch: Vec::new(),
        })
    }

    /// Prepares the queue when a packed ring starts at used position `used` (from
    /// SET_VRING_BASE). A fresh area is initialised and `None` returned. An area from an
    /// earlier back-end is committed or rolled back (`ring_flags` reads a ring slot's flags)
    /// and the buffers still in flight are returned with the used position to resume at.
    pub fn start_packed(
        &mut self,
        used: (u16, bool),
        ring_flags: impl FnOnce(u16) -> Result<u16, VringError>,
    ) -> Result<Option<PackedResume>, InflightError> {
        let size = self.size;
        *self.track() = PackedTrack {
            by_id: vec![None; usize::from(size)],
            batch: Vec::new(),
        };
        if self.load::<u16>(8) != VERSION {
            for e in 0..size {
                let at = Self::entry_p(e);
                self.store::<u8>(at + E_INFLIGHT, 0);
                self.store::<u16>(at + E_NEXT, e + 1);
            }
            self.store::<u16>(DESC_NUM, size);
            self.store::<u16>(FREE_HEAD, 0);
            self.store::<u16>(OLD_FREE_HEAD, 0);
            self.set_used(used, true);
            self.store::<u16>(8, VERSION);
            self.counter = 0;
            return Ok(None);
        }
        let desc_num = self.load::<u16>(DESC_NUM);
        if desc_num != size {
            return Err(corrupt(format!(
                "it tracks {desc_num} descriptors, the ring has {size}"
            )));
        }
        let now = (self.load::<u16>(USED_IDX), self.load::<u8>(USED_WRAP) != 0);
        let old = (
            self.load::<u16>(OLD_USED_IDX),
            self.load::<u8>(OLD_USED_WRAP) != 0,
        );
        let free_head = self.load::<u16>(FREE_HEAD);
        let old_free_head = self.load::<u16>(OLD_FREE_HEAD);
        if now.0 >= size || old.0 >= size || free_head > size || old_free_head > size {
            return Err(corrupt(format!(
                "positions out of a ring of {size}: used {} / {}, free {free_head} / \
                 {old_free_head}",
                now.0, old.0
            )));
        }
        // A batch in progress: committed if the driver can already see it (the slot at the
        // old used position no longer looks available), rolled back otherwise.
        let mut resume = (old, old_free_head);
        if now != old {
            let avail = if old.1 { DESC_F_AVAIL } else { DESC_F_USED };
            if ring_flags(old.0)? & (DESC_F_AVAIL | DESC_F_USED) != avail {
                resume = (now, free_head);
            }
        }
        let (used, free_head) = resume;
        self.store::<u16>(FREE_HEAD, free_head);
        self.store::<u16>(OLD_FREE_HEAD, free_head);
        self.set_used(used, true);

        // Entries on the free list are not in flight (a buffer half recorded at a crash
        // is there again after the rollback above).
        let mut taken = vec![false; usize::from(size)];
        let mut e = free_head;
        while e < size {
            if std::mem::replace(&mut taken[usize::from(e)], true) {
                return Err(corrupt(format!("free list loops at entry {e}")));
            }
            self.store::<u8>(Self::entry_p(e) + E_INFLIGHT, 0);
            e = self.load::<u16>(Self::entry_p(e) + E_NEXT);
        }
        let heads: Vec<u16> = (0..size)
            .filter(|&e| !taken[usize::from(e)] && self.load::<u8>(Self::entry_p(e)) == 1)
            .collect();
        let mut pending = Vec::with_capacity(heads.len());
        for head in heads {
            let descs = self.read_buffer(head, &mut taken)?;
            pending.push((
                self.load::<u64>(Self::entry_p(head) + E_COUNTER),
                head,
                descs,
            ));
        }
        pending.sort_unstable_by_key(|&(counter, head, _)| (counter, head));
        self.counter = pending.last().map_or(0, |p| p.0.wrapping_add(1));
        let mut buffers = Vec::with_capacity(pending.len());
        let mut by_id = vec![None; usize::from(size)];
        for (_, head, descs) in pending {
            let id = descs.last().map_or(u16::MAX, |d| d.2);
            // A bad or repeated id is refused by the ring when it takes the buffers back.
            if let Some(slot) = by_id.get_mut(usize::from(id)) {
                *slot = Some((head, descs.len() as u16)); // len <= size
            }
            buffers.push(descs);
        }
        self.track().by_id = by_id;
        Ok(Some(PackedResume { used, buffers }))
    }

    /// The ring descriptors of the buffer whose head entry is `head`, following `next`
    /// `num - 1` times to `last`; each entry may belong to one buffer only.
    fn read_buffer(&self, head: u16, taken: &mut [bool]) -> Result<Vec<RingDesc>, InflightError> {
        let size = self.size;
        let at = Self::entry_p(head);
        let num = self.load::<u16>(at + E_NUM);
        let last = self.load::<u16>(at + E_LAST);
        if num == 0 || num > size {
            return Err(corrupt(format!("entry {head} has {num} descriptors")));
        }
        let mut descs = Vec::with_capacity(usize::from(num));
        let mut e = head;
        for k in 0..num {
            if k > 0 {
                e = self.load::<u16>(Self::entry_p(e) + E_NEXT);
            }
            let Some(t) = taken.get_mut(usize::from(e)) else {
                return Err(corrupt(format!(
                    "buffer at entry {head} links to entry {e}"
                )));
            };
            if std::mem::replace(t, true) {
                return Err(corrupt(format!("entry {e} belongs to two buffers")));
            }
            let d = Self::entry_p(e);
            descs.push((
                self.load::<u64>(d + E_ADDR),
                self.load::<u32>(d + E_LEN),
                self.load::<u16>(d + E_ID),
                self.load::<u16>(d + E_FLAGS),
            ));
        }
        if e != last {
            return Err(corrupt(format!(
                "buffer at entry {head} ends at {e}, not at its last entry {last}"
            )));
        }
        Ok(descs)
    }

    fn set_used(&mut self, (idx, wrap): (u16, bool), old_too: bool) {
        self.store::<u16>(USED_IDX, idx);
        self.store::<u8>(USED_WRAP, u8::from(wrap));
        if old_too {
            self.store::<u16>(OLD_USED_IDX, idx);
            self.store::<u8>(OLD_USED_WRAP, u8::from(wrap));
        }
    }

    /// Records each popped buffer's ring descriptors in entries taken from the free list.
    pub(super) fn popped_packed(
        &mut self,
        chains: &[crate::vring::DescriptorChain],
        ring: &[RingDesc],
    ) -> Result<(), InflightError> {
        let size = self.size;
        let mut at = 0usize;
        for chain in chains {
            let n = usize::from(chain.ring_descriptors);
            let Some(descs) = ring.get(at..at + n).filter(|d| !d.is_empty()) else {
                return Err(corrupt("popped buffer without its ring descriptors".into()));
            };
            at += n;
            let head = self.load::<u16>(FREE_HEAD);
            if head >= size {
                return Err(InflightError::Exhausted);
            }
            let h = Self::entry_p(head);
            self.store::<u16>(h + E_NUM, 0);
            self.store::<u64>(h + E_COUNTER, self.counter);
            self.counter = self.counter.wrapping_add(1);
            self.store::<u8>(h + E_INFLIGHT, 1);
            for (k, &(addr, len, id, flags)) in descs.iter().enumerate() {
                let free = self.load::<u16>(FREE_HEAD);
                if free >= size {
                    return Err(InflightError::Exhausted);
                }
                if k + 1 == descs.len() {
                    self.store::<u16>(h + E_LAST, free);
                }
                self.store::<u16>(h + E_NUM, (k + 1) as u16); // k < n <= size
                let d = Self::entry_p(free);
                self.store::<u64>(d + E_ADDR, addr);
                self.store::<u32>(d + E_LEN, len);
                self.store::<u16>(d + E_ID, id);
                self.store::<u16>(d + E_FLAGS, flags);
                let next = self.load::<u16>(d + E_NEXT);
                self.store::<u16>(FREE_HEAD, next);
            }
            let free = self.load::<u16>(FREE_HEAD);
            self.store::<u16>(OLD_FREE_HEAD, free);
            let track = self.track();
            if let Some(slot) = track.by_id.get_mut(usize::from(chain.head)) {
                *slot = Some((head, n as u16));
            }
        }
        Ok(())
    }

    /// Before the ring shows `ids` as used: their entries go back on the free list and
    /// `used_idx` moves past them.
    pub(super) fn completing_packed(&mut self, ids: &[u16]) {
        let size = self.size;
        let mut batch = std::mem::take(&mut self.track().batch);
        batch.clear();
        let mut seen = HashSet::new();
        let mut descs = 0u32;
        for &id in ids {
            if !seen.insert(id) {
                continue;
            }
            let Some((head, num)) = self
                .track()
                .by_id
                .get_mut(usize::from(id))
                .and_then(Option::take)
            else {
                continue;
            };
            let last = self.load::<u16>(Self::entry_p(head) + E_LAST);
            if last < size {
                let free = self.load::<u16>(FREE_HEAD);
                self.store::<u16>(Self::entry_p(last) + E_NEXT, free);
            }
            self.store::<u16>(FREE_HEAD, head);
            descs += u32::from(num);
            batch.push((id, head, num));
        }
        let now = (self.load::<u16>(USED_IDX), self.load::<u8>(USED_WRAP) != 0);
        self.set_used(advance(now.0.min(size - 1), now.1, descs, size), false);
        self.track().batch = batch;
    }

    /// After the ring shows the batch: its heads are no longer in flight, and the `old_*`
    /// copies catch up (`used` is the ring's own next used position).
    pub(super) fn completed_packed(&mut self, used: (u16, bool)) {
        let batch = std::mem::take(&mut self.track().batch);
        for &(_, head, _) in &batch {
            self.store::<u8>(Self::entry_p(head) + E_INFLIGHT, 0);
        }
        self.set_used(used, true);
        let free = self.load::<u16>(FREE_HEAD);
        self.store::<u16>(OLD_FREE_HEAD, free);
    }

    /// The ring refused the batch: back to the `old_*` copies, its buffers in flight again.
    pub(super) fn abandon_packed(&mut self) {
        let batch = std::mem::take(&mut self.track().batch);
        for (id, head, num) in batch {
            if let Some(slot) = self.track().by_id.get_mut(usize::from(id)) {
                *slot = Some((head, num));
            }
        }
        let old = (
            self.load::<u16>(OLD_USED_IDX),
            self.load::<u8>(OLD_USED_WRAP) != 0,
        );
        self.set_used(old, false);
        let old_free = self.load::<u16>(OLD_FREE_HEAD);
        self.store::<u16>(FREE_HEAD, old_free);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::daemon::inflight::InflightArea;
    use crate::user::payload::InflightDesc;
    use crate::vring::{DescriptorChain, DESC_F_NEXT};

    const AVAIL_1: u16 = DESC_F_AVAIL;
    const USED_1: u16 = DESC_F_AVAIL | DESC_F_USED;

    fn area(size: u16) -> Arc<InflightArea> {
        let desc = InflightDesc {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: size,
        };
        Arc::new(InflightArea::create(&desc).unwrap().0)
    }

    /// Buffer `id` of `n` ring descriptors, each with an address that names it.
    fn buffer(id: u16, n: u16) -> (DescriptorChain, Vec<RingDesc>) {
        let descs = (0..n)
            .map(|k| {
                let next = if k + 1 < n { DESC_F_NEXT } else { 0 };
                (u64::from(id) << 16 | u64::from(k), 16, id, AVAIL_1 | next)
            })
            .collect();
        let chain = DescriptorChain {
            head: id,
            segments: Vec::new(),
            ring_descriptors: n,
        };
        (chain, descs)
    }

    fn pop(q: &mut InflightQueue, bufs: &[(u16, u16)]) {
        let (chains, descs): (Vec<_>, Vec<_>) = bufs.iter().map(|&(i, n)| buffer(i, n)).unzip();
        let descs: Vec<RingDesc> = descs.into_iter().flatten().collect();
        q.popped_packed(&chains, &descs).unwrap();
    }

    fn fresh(a: &Arc<InflightArea>, size: u16) -> InflightQueue {
        let mut q = a.queue(0, size).unwrap();
        assert_eq!(
            q.start_packed((0, true), |_| panic!("not read")).unwrap(),
            None
        );
        q
    }

    fn restart(
        a: &Arc<InflightArea>,
        size: u16,
        flags: u16,
    ) -> Result<PackedResume, InflightError> {
        let mut q = a.queue(0, size).unwrap();
        // The stale base a front-end sends after a crash must not matter.
        q.start_packed((0, true), |_| Ok(flags)).map(Option::unwrap)
    }

    fn ids(r: &PackedResume) -> Vec<u16> {
        r.buffers.iter().map(|b| b.last().unwrap().2).collect()
    }

    #[test]
    fn a_fresh_area_gets_a_free_list_and_the_base_position() {
        let a = area(4);
        let mut q = a.queue(0, 4).unwrap();
        assert_eq!(q.start_packed((2, false), |_| panic!()).unwrap(), None);
        assert_eq!(q.load::<u16>(8), VERSION);
        assert_eq!(q.load::<u16>(DESC_NUM), 4);
        let nexts: Vec<u16> = (0..4)
            .map(|e| q.load(InflightQueue::entry_p(e) + E_NEXT))
            .collect();
        assert_eq!(nexts, [1, 2, 3, 4]);
        assert_eq!((q.load::<u16>(USED_IDX), q.load::<u8>(USED_WRAP)), (2, 0));
        assert_eq!(
            (q.load::<u16>(OLD_USED_IDX), q.load::<u8>(OLD_USED_WRAP)),
            (2, 0)
        );
    }

    #[test]
    fn buffers_in_flight_come_back_in_pop_order_with_their_descriptors() {
        let a = area(8);
        let mut q = fresh(&a, 8);
        pop(&mut q, &[(3, 2), (1, 1), (5, 3)]);
        q.completing_packed(&[1]);
        q.completed_packed((1, true));
        drop(q);
        let r = restart(&a, 8, USED_1).unwrap();
        assert_eq!(ids(&r), [3, 5]);
        assert_eq!(r.buffers[0], buffer(3, 2).1);
        assert_eq!(r.buffers[1], buffer(5, 3).1);
        assert_eq!(r.used, (1, true));
        // Pops after the restart come after the resubmitted ones, in entries freed by it.
        let mut q = a.queue(0, 8).unwrap();
        q.start_packed((0, true), |_| Ok(USED_1)).unwrap();
        pop(&mut q, &[(0, 2)]);
        drop(q);
        assert_eq!(ids(&restart(&a, 8, USED_1).unwrap()), [3, 5, 0]);
    }

    #[test]
    fn a_batch_the_driver_never_saw_is_rolled_back() {
        let a = area(8);
        let mut q = fresh(&a, 8);
        pop(&mut q, &[(3, 2), (1, 1)]);
        q.completing_packed(&[3]);
        drop(q); // crash before the ring's flags were written
        let r = restart(&a, 8, AVAIL_1 | DESC_F_NEXT).unwrap();
        assert_eq!(ids(&r), [3, 1]);
        assert_eq!(r.used, (0, true));
    }

    #[test]
    fn a_batch_the_driver_saw_is_committed() {
        let a = area(8);
        let mut q = fresh(&a, 8);
        pop(&mut q, &[(3, 2), (1, 1)]);
        q.completing_packed(&[3]);
        drop(q); // crash after the flags, before the inflight marks were cleared
        let r = restart(&a, 8, USED_1).unwrap();
        assert_eq!(ids(&r), [1]);
        assert_eq!(r.used, (2, true));
    }

    #[test]
    fn a_refused_batch_is_abandoned() {
        let a = area(8);
        let mut q = fresh(&a, 8);
        pop(&mut q, &[(3, 2), (1, 1)]);
        q.completing_packed(&[3, 3, 7]);
        q.abandon_packed();
        q.completing_packed(&[1]);
        q.completed_packed((1, true));
        drop(q);
        let r = restart(&a, 8, USED_1).unwrap();
        assert_eq!(ids(&r), [3]);
        assert_eq!(r.used, (1, true));
    }

    #[test]
    fn a_buffer_half_recorded_at_a_crash_is_dropped() {
        let a = area(8);
        let mut q = fresh(&a, 8);
        pop(&mut q, &[(2, 1)]);
        // Crash while recording the next buffer: its head is marked, free_head moved on,
        // old_free_head not yet.
        let head = q.load::<u16>(FREE_HEAD);
        q.store::<u8>(InflightQueue::entry_p(head) + E_INFLIGHT, 1);
        q.store::<u16>(FREE_HEAD, head + 1);
        drop(q);
        let r = restart(&a, 8, USED_1).unwrap();
        assert_eq!(ids(&r), [2]);
    }

    #[test]
    fn used_positions_wrap() {
        let a = area(3);
        let mut q = fresh(&a, 3);
        pop(&mut q, &[(0, 2), (1, 1)]);
        q.completing_packed(&[0, 1]);
        q.completed_packed((0, false));
        pop(&mut q, &[(2, 2)]);
        q.completing_packed(&[2]);
        // Crash with the batch published: the computed position (2, false) is committed.
        drop(q);
        let r = restart(&a, 3, 0).unwrap();
        assert!(r.buffers.is_empty());
        assert_eq!(r.used, (2, false));
    }

    #[test]
    fn a_full_ring_exhausts_nothing_but_a_corrupt_free_list_does() {
        let a = area(2);
        let mut q = fresh(&a, 2);
        pop(&mut q, &[(0, 1), (1, 1)]);
        assert_eq!(q.load::<u16>(FREE_HEAD), 2);
        q.completing_packed(&[0]);
        q.completed_packed((1, true));
        // A front-end points the free list at an entry in flight.
        q.store::<u16>(InflightQueue::entry_p(0) + E_NEXT, 2);
        q.store::<u16>(FREE_HEAD, 2);
        let (c, d) = buffer(0, 1);
        assert!(matches!(
            q.popped_packed(&[c], &d),
            Err(InflightError::Exhausted)
        ));
    }

    fn corrupted(edit: impl FnOnce(&InflightQueue)) -> InflightError {
        let a = area(8);
        let mut q = fresh(&a, 8);
        pop(&mut q, &[(3, 2), (1, 3)]);
        edit(&q);
        drop(q);
        restart(&a, 8, USED_1).unwrap_err()
    }

    #[test]
    fn hostile_areas_are_refused() {
        let e = |x: usize| InflightQueue::entry_p(x as u16);
        type Edit = Box<dyn FnOnce(&InflightQueue)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("size", Box::new(|q| q.store::<u16>(DESC_NUM, 16))),
            ("used", Box::new(|q| q.store::<u16>(USED_IDX, 8))),
            ("old used", Box::new(|q| q.store::<u16>(OLD_USED_IDX, 9))),
            ("free", Box::new(|q| q.store::<u16>(FREE_HEAD, 9))),
            ("loop", Box::new(move |q| q.store::<u16>(e(7) + E_NEXT, 5))),
            ("num 0", Box::new(move |q| q.store::<u16>(e(0) + E_NUM, 0))),
            (
                "num big",
                Box::new(move |q| q.store::<u16>(e(0) + E_NUM, 9)),
            ),
            (
                "link",
                Box::new(move |q| q.store::<u16>(e(0) + E_NEXT, 300)),
            ),
            ("last", Box::new(move |q| q.store::<u16>(e(0) + E_LAST, 0))),
            (
                "shared",
                Box::new(move |q| q.store::<u16>(e(2) + E_NEXT, 1)),
            ),
            (
                "free+inflight",
                Box::new(move |q| q.store::<u16>(e(5) + E_NEXT, 0)),
            ),
        ];
        for (what, edit) in cases {
            let err = corrupted(edit);
            assert!(matches!(err, InflightError::Corrupt(_)), "{what}: {err}");
        }
    }
}
