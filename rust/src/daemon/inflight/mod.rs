//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a shared memory area,
//! kept by the front-end across back-end restarts, where the back-end notes which buffers
//! it has popped and not yet completed. A restarted back-end resubmits them, in pop order,
//! before taking new ones, so a crash loses no request. Both ring formats use the vhost-user
//! spec's layouts:
//!
//! - split rings (here): `features: u64, version: u16, desc_num: u16, last_batch_head: u16,
//!   used_idx: u16`, then `desc_num` entries of `inflight: u8, padding: [u8; 5], next: u16,
//!   counter: u64`. A completed batch is listed through `next` from `last_batch_head`
//!   (latest first), so that a crash between publishing the used index and clearing the
//!   flags is repaired on restart.
//! - packed rings ([`packed`]): a shadow of every popped ring descriptor, a free list of
//!   entries, and `old_*` copies of the positions that a restart commits or rolls back to.
//!
//! The area is made at GET_INFLIGHT_FD, which may come before SET_FEATURES says which
//! format the rings use, so each queue's part is sized for the larger (packed) layout and
//! rounded up to 64 bytes; the format is chosen when the ring starts.
//!
//! The area is shared with the front-end, so nothing read from it is trusted for memory
//! safety: every index is checked against the queue size we chose ourselves, and an area
//! that does not add up is an [`InflightError`] that stops only its queue.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr;
use std::sync::Arc;

use crate::memory::GuestMemory;
use crate::sys::{dup_cloexec, memfd_create, Mapping};
use crate::user::payload::InflightDesc;
use crate::user::{Error, Result};
use crate::vring::{DescriptorChain, DeviceQueue, VringError};

mod packed;

const HEADER: usize = 16;
const ENTRY: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

/// Bytes of one queue's part: the packed layout (32-byte header and entries) is the larger.
fn queue_region_size(queue_size: u16) -> usize {
    (packed::HEADER + packed::ENTRY * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Why an area from an earlier back-end (or a front-end) cannot be used for a queue.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight area is inconsistent: {0}")]
    Corrupt(String),
    #[error("inflight area has no free entry left for a popped buffer")]
    Exhausted,
    #[error(transparent)]
    Ring(#[from] VringError),
}

/// The whole shared area, mapped.
#[derive(Debug)]
pub struct InflightArea {
    map: Mapping,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// GET_INFLIGHT_FD: a fresh zeroed area for `desc.num_queues` queues of
    /// `desc.queue_size`; returns it, the reply and the fd for the front-end.
    pub fn create(desc: &InflightDesc) -> Result<(Self, InflightDesc, OwnedFd)> {
        if desc.num_queues == 0 || desc.queue_size == 0 {
            return Err(Error::InvalidParam(
                "GET_INFLIGHT_FD with no queues or queue size 0".into(),
            ));
        }
        let size = (queue_region_size(desc.queue_size) * usize::from(desc.num_queues)) as u64;
        let fd = memfd_create("pyvhost-inflight", size)?;
        let map = Mapping::map_shared(fd.as_fd(), 0, size, true)?;
        let reply = InflightDesc {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: desc.num_queues,
            queue_size: desc.queue_size,
        };
        let theirs = dup_cloexec(fd.as_fd())?;
        Ok((
            InflightArea {
                map,
                num_queues: desc.num_queues,
                queue_size: desc.queue_size,
            },
            reply,
            theirs,
        ))
    }

    /// SET_INFLIGHT_FD: the area a front-end kept from an earlier back-end, mapped through
    /// the one path for front-end fds ([`Mapping::map_front_end`]): the range must lie in
    /// the file (fstat) and, with `require_sealed`, the file must be sealed against
    /// shrinking, so a truncation cannot SIGBUS a later access (ADVERSARIAL C5/J8).
    pub fn adopt(desc: &InflightDesc, fd: OwnedFd, require_sealed: bool) -> Result<Self> {
        let need = (queue_region_size(desc.queue_size) * usize::from(desc.num_queues)) as u64;
        if desc.num_queues == 0 || desc.queue_size == 0 || desc.mmap_size < need {
            return Err(Error::InvalidParam(format!(
                "SET_INFLIGHT_FD: {} bytes cannot hold {} queues of {}",
                desc.mmap_size, desc.num_queues, desc.queue_size
            )));
        }
        let map = Mapping::map_front_end(fd.as_fd(), desc.mmap_offset, need, require_sealed)
            .map_err(|e| Error::InvalidParam(format!("SET_INFLIGHT_FD: inflight area: {e}")))?;
        Ok(InflightArea {
            map,
            num_queues: desc.num_queues,
            queue_size: desc.queue_size,
        })
    }

    /// The part of queue `index`, for a ring of `ring_size` entries (which must fit the
    /// size the area was made for).
    pub fn queue(self: &Arc<Self>, index: u16, ring_size: u16) -> Result<InflightQueue> {
        if index >= self.num_queues || ring_size > self.queue_size {
            return Err(Error::InvalidParam(format!(
                "inflight area has {} queues of {}, queue {index} has {ring_size} entries",
                self.num_queues, self.queue_size
            )));
        }
        let offset = queue_region_size(self.queue_size) * usize::from(index);
        Ok(InflightQueue {
            // In bounds: offset + region size <= mapped length (checked at creation).
            base: self.map.as_ptr().wrapping_add(offset),
            size: ring_size,
            counter: 0,
            packed: None,
            _area: self.clone(),
        })
    }
}

/// One queue's part of the area; owns a reference to the mapping.
#[derive(Debug)]
pub struct InflightQueue {
    base: *mut u8,
    size: u16,
    counter: u64,
    /// What a packed ring keeps besides the area; `None` for a split ring.
    packed: Option<packed::PackedTrack>,
    _area: Arc<InflightArea>,
}

// SAFETY: the pointer is into a mapping kept alive by `_area`; the queue is used by one
// thread at a time (under the queue lock).
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn field<T: Copy>(&self, offset: usize) -> *mut T {
        self.base.wrapping_add(offset).cast()
    }

    fn load<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: callers pass offsets inside this queue's region (header fields, or an
        // entry below `size`), which lies inside the live mapping; all fields are naturally
        // aligned (the region starts 64-aligned, entries are 16 or 32 bytes and their fields
        // sit at multiples of their own size).
        unsafe { ptr::read_volatile(self.field::<T>(offset)) }
    }

    fn store<T: Copy>(&self, offset: usize, v: T) {
        // SAFETY: as in `load`.
        unsafe { ptr::write_volatile(self.field::<T>(offset), v) }
    }

    fn entry(head: u16) -> usize {
        HEADER + ENTRY * usize::from(head)
    }

    /// Prepares the queue when its ring starts (split). A fresh area is initialised; an
    /// area from an earlier back-end is repaired (a batch completed in the ring whose flags
    /// were not cleared) and the heads still in flight are returned, oldest first, for
    /// resubmission.
    pub fn start_split(&mut self, ring_used_idx: u16) -> Vec<u16> {
        self.packed = None;
        if self.load::<u16>(8) != VERSION {
            for head in 0..self.size {
                self.store::<u8>(Self::entry(head), 0);
            }
            self.store::<u16>(10, self.size);
            self.store::<u16>(12, 0);
            self.store::<u16>(14, ring_used_idx);
            self.store::<u16>(8, VERSION);
            self.counter = 0;
            return Vec::new();
        }
        let recorded = self.load::<u16>(14);
        let mut missed = ring_used_idx.wrapping_sub(recorded);
        let mut head = self.load::<u16>(12);
        while missed > 0 && head < self.size {
            self.store::<u8>(Self::entry(head), 0);
            head = self.load::<u16>(Self::entry(head) + 6);
            missed -= 1;
        }
        self.store::<u16>(14, ring_used_idx);
        let mut pending: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.load::<u8>(Self::entry(h)) == 1)
            .map(|h| (self.load::<u64>(Self::entry(h) + 8), h))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        pending.into_iter().map(|(_, h)| h).collect()
    }

    /// Starts a ring of either format: [`start_split`](Self::start_split) or
    /// [`start_packed`](Self::start_packed), then hands the buffers still in flight back
    /// to the ring; returns them for resubmission, oldest first.
    pub fn start(
        &mut self,
        ring: &mut DeviceQueue,
        mem: &GuestMemory,
    ) -> std::result::Result<Vec<DescriptorChain>, InflightError> {
        match ring {
            DeviceQueue::Split(q) => {
                let heads = self.start_split(q.next_used());
                Ok(q.resubmit(mem, &heads)?)
            }
            DeviceQueue::Packed(q) => {
                let resume = self.start_packed(q.next_used(), |slot| q.ring_flags(mem, slot))?;
                match resume {
                    Some(r) => Ok(q.resubmit(mem, &r.buffers, r.used)?),
                    None => Ok(Vec::new()),
                }
            }
        }
    }

    /// Notes that `chains` were popped, before the device sees them; `ring` is what
    /// [`DeviceQueue::pop_batch_recording`] recorded (packed rings).
    pub fn popped(
        &mut self,
        chains: &[DescriptorChain],
        ring: &[(u64, u32, u16, u16)],
    ) -> std::result::Result<(), InflightError> {
        if self.packed.is_some() {
            self.popped_packed(chains, ring)
        } else {
            self.popped_split(chains.iter().map(|c| c.head));
            Ok(())
        }
    }

    /// Before the ring shows `heads` as used.
    pub fn completing(&mut self, heads: &[u16]) {
        if self.packed.is_some() {
            self.completing_packed(heads);
        } else {
            self.completing_split(heads);
        }
    }

    /// After the ring shows them as used (`ring` is past the batch).
    pub fn completed(&mut self, heads: &[u16], ring: &DeviceQueue) {
        match ring {
            DeviceQueue::Split(q) => self.completed_split(heads, q.next_used()),
            DeviceQueue::Packed(q) => self.completed_packed(q.next_used()),
        }
    }

    /// The ring refused the batch announced by [`completing`](Self::completing): the area
    /// goes back to before it (a split ring's record needs no undoing: its flags stay set).
    pub fn abandon(&mut self) {
        if self.packed.is_some() {
            self.abandon_packed();
        }
    }

    /// Notes that `heads` were popped (split; before the device sees them).
    pub fn popped_split(&mut self, heads: impl Iterator<Item = u16>) {
        for head in heads.filter(|&h| h < self.size) {
            let at = Self::entry(head);
            self.store::<u64>(at + 8, self.counter);
            self.counter = self.counter.wrapping_add(1);
            self.store::<u8>(at, 1);
        }
    }

    /// Before the used index is published: each head of the batch is pushed onto the
    /// `last_batch_head` list (its `next` is the previous head), as the spec lays it out.
    pub fn completing_split(&mut self, heads: &[u16]) {
        for &head in heads.iter().filter(|&&h| h < self.size) {
            let previous = self.load::<u16>(12);
            self.store::<u16>(Self::entry(head) + 6, previous);
            self.store::<u16>(12, head);
        }
    }

    /// After the used index is published: clears the flags and records the index.
    pub fn completed_split(&mut self, heads: &[u16], used_idx: u16) {
        for &head in heads.iter().filter(|&&h| h < self.size) {
            self.store::<u8>(Self::entry(head), 0);
        }
        self.store::<u16>(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> Arc<InflightArea> {
        let desc = InflightDesc {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        Arc::new(InflightArea::create(&desc).unwrap().0)
    }

    #[test]
    fn reply_describes_a_64_aligned_area() {
        let desc = InflightDesc {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 3,
        };
        let (_, reply, fd) = InflightArea::create(&desc).unwrap();
        // Sized for the packed layout: 32 + 3 * 32 bytes, rounded up to 128.
        assert_eq!(reply.mmap_size, 2 * 128);
        assert_eq!(crate::sys::file_size(fd.as_fd()).unwrap(), 256);
    }

    #[test]
    fn a_restarted_queue_resubmits_what_was_in_flight_oldest_first() {
        let a = area(1, 8);
        let mut q = a.queue(0, 8).unwrap();
        assert!(q.start_split(0).is_empty());
        q.popped_split([5, 2, 7].into_iter());
        q.completing_split(&[2]);
        q.completed_split(&[2], 1);
        drop(q);
        // The back-end dies; its successor maps the same area.
        let mut again = a.queue(0, 8).unwrap();
        assert_eq!(again.start_split(1), vec![5, 7]);
        // New pops continue the order after the resubmitted ones.
        again.popped_split([1].into_iter());
        drop(again);
        assert_eq!(a.queue(0, 8).unwrap().start_split(1), vec![5, 7, 1]);
    }

    #[test]
    fn a_batch_published_but_not_cleared_is_repaired() {
        let a = area(1, 8);
        let mut q = a.queue(0, 8).unwrap();
        q.start_split(0);
        q.popped_split([3, 4, 6].into_iter());
        q.completing_split(&[3, 4]);
        // Crash here: the ring's used index says 2, the flags were not cleared.
        drop(q);
        assert_eq!(a.queue(0, 8).unwrap().start_split(2), vec![6]);
    }

    #[test]
    fn only_the_half_recorded_batch_is_repaired() {
        let a = area(1, 8);
        let mut q = a.queue(0, 8).unwrap();
        q.start_split(0);
        q.popped_split([1, 2, 3, 4].into_iter());
        q.completing_split(&[1]);
        q.completed_split(&[1], 1);
        q.completing_split(&[2, 3]);
        drop(q);
        // The ring says 3 used: the batch [2, 3] was published, 4 is still in flight.
        assert_eq!(a.queue(0, 8).unwrap().start_split(3), vec![4]);
    }

    #[test]
    fn queues_beyond_the_area_are_refused() {
        let a = area(1, 8);
        assert!(a.queue(1, 8).is_err());
        assert!(a.queue(0, 16).is_err());
        let desc = InflightDesc {
            mmap_size: 320,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 8,
        };
        let fd = memfd_create("small", 320).unwrap();
        assert!(InflightArea::adopt(&desc, fd, false).is_err());
    }

    #[test]
    fn adopt_refuses_an_unsealed_area_under_the_policy_and_a_short_file_always() {
        use std::os::fd::AsRawFd;
        let desc = InflightDesc {
            mmap_size: 4096,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 8,
        };
        let unsealed = || crate::sys::test_util::unsealed_memfd(4096);
        // Policy on: an unsealed area (one a front-end could truncate into a SIGBUS later)
        // is refused before it is mapped.
        let e = InflightArea::adopt(&desc, unsealed(), true).unwrap_err();
        assert!(e.to_string().contains("SET_INFLIGHT_FD"), "{e}");
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
        // Policy off: the unsealed area is used (the documented J8 risk) ...
        let a = Arc::new(InflightArea::adopt(&desc, unsealed(), false).unwrap());
        a.queue(0, 8).unwrap().start_split(0);
        // ... but a file already shorter than the area is refused, sealed or not.
        let short = unsealed();
        // SAFETY: ftruncate takes no pointers.
        assert_eq!(unsafe { libc::ftruncate(short.as_raw_fd(), 64) }, 0);
        let e = InflightArea::adopt(&desc, short, false).unwrap_err();
        assert!(e.to_string().contains("past the end of the file"), "{e}");
        // A sealed area of ours passes the policy.
        let sealed = memfd_create("sealed", 4096).unwrap();
        InflightArea::adopt(&desc, sealed, true).unwrap();
    }
}
