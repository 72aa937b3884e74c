//! The dirty log of live migration: a bitmap in shared memory with one bit per 4 KiB page
//! of guest-physical memory, written by whoever writes guest memory behind the guest's back
//! (a vhost back-end) and read and cleared by the front-end that migrates the guest.
//!
//! Layout (vhost-user spec, "Migration"; `linux/vhost.h`, `VHOST_LOG_PAGE`): the page at
//! guest-physical address `a` is page `n = a / 4096`, and its bit is bit `n % 8` of byte
//! `n / 8`. QEMU reads the log as native 64-bit words (`vhost_log_chunk_t`, swapped to 0
//! with an atomic exchange) and sizes it in whole words, `(last_gpa / (4096 * 64) + 1) * 8`
//! bytes; on a little-endian host word `w`'s bit `b` is the same bit as byte `8w + b / 8`'s
//! bit `b % 8`, which is what libvhost-user and the kernel set one byte at a time.
//!
//! Both ends are served here: the back-end adopts the log a front-end sent
//! (`SET_LOG_BASE`, [`DirtyLog::adopt`]) and [`mark`](DirtyLog::mark)s what it writes;
//! a front-end [`allocate`](DirtyLog::allocate)s one, hands its fd over and
//! [`take`](DirtyLog::take)s the dirty pages. Every access is atomic (the other process
//! clears or sets bits concurrently): aligned 64-bit words where the mapping allows, single
//! bytes for an unaligned head or tail (an `mmap_offset` that is not a multiple of 8, or a
//! size that is not). A given byte is always accessed with the same width in this process.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::{AddressSpace, GuestMemory};
use crate::sys::memfd::regular_file_size;
use crate::sys::mmap::FrontEndMapError;
use crate::sys::{memfd_create, Mapping};

#[cfg(not(target_endian = "little"))]
compile_error!("the dirty log's word access assumes a little-endian host (as QEMU's does)");

/// Bytes of guest memory one bit of the log covers (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = LOG_PAGE_SIZE.trailing_zeros();

/// What can go wrong creating, adopting or marking a dirty log. Every message names the
/// dirty log and the numbers involved, so a refused `SET_LOG_BASE` says why.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// A log of 0 bytes, or one asked to cover no guest memory at all.
    #[error("dirty log of 0 bytes (mmap_size 0, or guest memory that ends at 0)")]
    ZeroSize,
    /// `mmap_offset + mmap_size` does not fit in u64 (ADVERSARIAL C9, CVE-2020-10722 class).
    #[error("dirty log mmap_offset {offset:#x} + mmap_size {size:#x} overflows")]
    Overflow {
        /// The log's offset in its fd.
        offset: u64,
        /// The log's size in bytes.
        size: u64,
    },
    /// The log has fewer bits than guest memory has pages (ADVERSARIAL C9, K2).
    #[error(
        "dirty log of {size:#x} bytes covers guest addresses below {covers:#x}, but guest \
         memory ends at {guest_end:#x} ({needed:#x} bytes needed)"
    )]
    TooSmall {
        /// The log's size in bytes.
        size: u64,
        /// Bytes the log needs to cover all of guest memory.
        needed: u64,
        /// The end of what the log covers (one bit per 4 KiB page).
        covers: u64,
        /// The end of guest memory.
        guest_end: u64,
    },
    /// The backing file is smaller than the log it should hold: touching the tail would
    /// SIGBUS.
    #[error(
        "dirty log file of {file_size:#x} bytes is too small for mmap_offset {offset:#x} + \
         mmap_size {size:#x}"
    )]
    FileTooSmall {
        /// The log's offset in its fd.
        offset: u64,
        /// The log's size in bytes.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Sealed memory is required and the log's fd lacks `F_SEAL_SHRINK` (ADVERSARIAL J8).
    #[error(
        "dirty log fd is not sealed against shrinking (F_SEAL_SHRINK) and sealed memory is \
         required"
    )]
    Unsealed,
    /// mmap refused the fd (ENODEV for an eventfd, socket or pipe; EACCES read-only).
    #[error("cannot map the dirty log: {0}")]
    Map(io::Error),
    /// Creating the memfd of a new log failed.
    #[error("cannot create the dirty log: {0}")]
    Create(io::Error),
    /// A write reaches past the last page the log covers: nothing was marked.
    #[error(
        "write of {len:#x} bytes at guest address {gpa:#x} is past the end of the dirty log \
         (it covers guest addresses below {covers:#x})"
    )]
    OutOfRange {
        /// The first guest address written.
        gpa: u64,
        /// Bytes written.
        len: u64,
        /// The end of what the log covers.
        covers: u64,
    },
}

/// A run of dirty pages, `[start, end)` in guest-physical addresses (page aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyRange {
    /// First dirty byte's page (inclusive).
    pub start: u64,
    /// End of the last dirty page (exclusive).
    pub end: u64,
}

impl DirtyRange {
    /// Number of 4 KiB pages in the run.
    pub fn pages(&self) -> u64 {
        (self.end - self.start) >> PAGE_SHIFT
    }
}

/// The smallest log, in bytes, that covers guest-physical addresses `[0, guest_end)`: one
/// bit per page, rounded up to a byte (what the spec asks of a back-end's bound check).
pub fn min_log_size(guest_end: u64) -> u64 {
    guest_end.div_ceil(LOG_PAGE_SIZE).div_ceil(8)
}

/// The size a front-end allocates for `[0, guest_end)`: [`min_log_size`] rounded up to
/// whole 64-bit words, as QEMU does (`vhost_get_log_size`), so a word-wise reader never
/// reads past the end.
pub fn alloc_log_size(guest_end: u64) -> u64 {
    min_log_size(guest_end).div_ceil(8) * 8
}

/// The end of the highest region of `memory` (0 when it has none): the guest-physical
/// address a log must cover up to, on either end.
pub fn memory_end(memory: &GuestMemory) -> u64 {
    memory
        .regions()
        .iter()
        .map(|r| r.info().gpa_end())
        .max()
        .unwrap_or(0)
}

/// One atomic access unit of the log: a byte or an aligned 64-bit word.
#[derive(Clone, Copy)]
struct Unit {
    /// Byte offset of the unit in the log.
    start: usize,
    /// 1 or 8.
    width: usize,
}

/// A mapped dirty log. `Send + Sync`: every access is atomic, so any number of writer
/// threads may [`mark`](Self::mark) while another [`take`](Self::take)s.
#[derive(Debug)]
pub struct DirtyLog {
    mapping: Mapping,
    /// Kept for logs we allocated, to hand to a back-end; an adopted log drops its fd once
    /// mapped (the mapping keeps the memory alive).
    fd: Option<OwnedFd>,
    mmap_offset: u64,
    /// Bytes before the first 8-aligned byte of the mapping (accessed as bytes).
    head: usize,
    /// Number of aligned 64-bit words after the head; the rest is the byte-wise tail.
    words: usize,
}

impl DirtyLog {
    /// Front-end side: a fresh, zeroed log covering `[0, guest_end)`, in a close-on-exec
    /// memfd sealed against resizing (a back-end cannot shrink it under our mapping), of
    /// [`alloc_log_size`] bytes.
    pub fn allocate(guest_end: u64) -> Result<Self, DirtyLogError> {
        if guest_end == 0 {
            return Err(DirtyLogError::ZeroSize);
        }
        let size = alloc_log_size(guest_end);
        let fd = memfd_create("pyvhost-dirty-log", size).map_err(DirtyLogError::Create)?;
        let mapping = Mapping::map_shared(fd.as_fd(), 0, size, true).map_err(DirtyLogError::Map)?;
        Ok(Self::new(mapping, Some(fd), 0))
    }

    /// Back-end side (`SET_LOG_BASE` with `LOG_SHMFD`): maps `mmap_size` bytes of `fd` from
    /// `mmap_offset`, after checking, before any mmap, that the range does not overflow,
    /// that it covers every page below `guest_end` (the end of the highest guest memory
    /// region), that the file holds it (fstat, so a short memfd is an error rather than a
    /// SIGBUS) and, with `require_sealed`, that the file cannot shrink later (ADVERSARIAL
    /// C9, K2, J8). On error `fd` is closed and nothing stays mapped.
    pub fn adopt(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        guest_end: u64,
        require_sealed: bool,
    ) -> Result<Self, DirtyLogError> {
        if mmap_size == 0 {
            return Err(DirtyLogError::ZeroSize);
        }
        let end = mmap_offset
            .checked_add(mmap_size)
            .ok_or(DirtyLogError::Overflow {
                offset: mmap_offset,
                size: mmap_size,
            })?;
        let needed = min_log_size(guest_end);
        if mmap_size < needed {
            return Err(DirtyLogError::TooSmall {
                size: mmap_size,
                needed,
                covers: covered_end(mmap_size),
                guest_end,
            });
        }
        if let Some(file_size) = regular_file_size(fd.as_fd()).map_err(DirtyLogError::Map)? {
            if end > file_size {
                return Err(DirtyLogError::FileTooSmall {
                    offset: mmap_offset,
                    size: mmap_size,
                    file_size,
                });
            }
        }
        let mapping = Mapping::map_front_end(fd.as_fd(), mmap_offset, mmap_size, require_sealed)
            .map_err(|e| match e {
                FrontEndMapError::Unsealed => DirtyLogError::Unsealed,
                FrontEndMapError::Map(e) => DirtyLogError::Map(e),
            })?;
        Ok(Self::new(mapping, None, mmap_offset))
    }

    fn new(mapping: Mapping, fd: Option<OwnedFd>, mmap_offset: u64) -> Self {
        let len = mapping.len();
        let misalign = mapping.as_ptr() as usize % 8;
        let head = ((8 - misalign) % 8).min(len);
        let words = (len - head) / 8;
        Self {
            mapping,
            fd,
            mmap_offset,
            head,
            words,
        }
    }

    /// Size of the log in bytes (`mmap_size`).
    pub fn size(&self) -> u64 {
        self.mapping.len() as u64
    }

    /// `mmap_offset` of the log in its fd (0 for an allocated log).
    pub fn mmap_offset(&self) -> u64 {
        self.mmap_offset
    }

    /// The fd to send with `SET_LOG_BASE`; `None` for an adopted log.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The log's address in this process (kernel vhost's `VHOST_SET_LOG_BASE` takes it).
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// Guest-physical addresses below this are covered by the log.
    pub fn covers(&self) -> u64 {
        covered_end(self.size())
    }

    /// Sets the bit of every page that a write of `len` bytes at guest-physical `gpa`
    /// touches (partial pages included), atomically and with release ordering, so a reader
    /// that sees the bit also sees the data written before this call. `len` 0 marks
    /// nothing (ADVERSARIAL E4). A range that reaches past [`covers`](Self::covers), or
    /// wraps the address space, marks nothing and is an error.
    pub fn mark(&self, gpa: u64, len: u64) -> Result<(), DirtyLogError> {
        if len == 0 {
            return Ok(());
        }
        let covers = self.covers();
        let out = || DirtyLogError::OutOfRange { gpa, len, covers };
        let last = gpa.checked_add(len - 1).ok_or_else(out)?;
        if last >= covers {
            return Err(out());
        }
        let (first_page, end_page) = (gpa >> PAGE_SHIFT, (last >> PAGE_SHIFT) + 1);
        let mut page = first_page;
        while page < end_page {
            // page < covers / 4096 = size * 8, so the byte index fits the mapping.
            let unit = self.unit_at((page / 8) as usize);
            let base = unit.start as u64 * 8;
            let hi = end_page.min(base + unit.width as u64 * 8);
            self.or(unit, bit_mask(page - base, hi - base));
            page = hi;
        }
        Ok(())
    }

    /// [`mark`](Self::mark) for a write of `len` bytes at `addr` in `mem`'s address space.
    /// A memory table's addresses are guest-physical and are marked as they are. An IOTLB
    /// view's are I/O virtual (a device behind the front-end's vIOMMU), while the log is
    /// indexed by guest-physical page: each piece of the range is taken through the
    /// window that maps it (I/O virtual address -> front-end address of the IOTLB entry ->
    /// the memory table region holding it) to its guest-physical address, so a range that
    /// crosses entries or regions marks each piece where it lands. Parts of the range that
    /// no window maps were not written through this view (a request failed on an IOTLB
    /// hole) and mark nothing.
    pub fn mark_in(&self, mem: &GuestMemory, addr: u64, len: u64) -> Result<(), DirtyLogError> {
        if mem.address_space() == AddressSpace::GuestPhysical {
            return self.mark(addr, len);
        }
        if len == 0 {
            return Ok(());
        }
        // The end, saturating: a range running off the address space has no window there.
        let end = addr.saturating_add(len);
        // Windows are sorted by I/O virtual address and disjoint: from the first that ends
        // past `addr`, while they start before `end`.
        let windows = mem.regions();
        let first = windows.partition_point(|w| w.info().gpa_end() <= addr);
        for w in windows[first..]
            .iter()
            .take_while(|w| w.info().guest_phys_addr < end)
        {
            let info = w.info();
            let (start, stop) = (info.guest_phys_addr.max(addr), info.gpa_end().min(end));
            self.mark(w.gpa_at(start - info.guest_phys_addr), stop - start)?;
        }
        Ok(())
    }

    /// Atomically clears the log and yields the pages that were dirty, coalesced into
    /// runs, lowest first. The clearing happens as the iterator advances, one access unit
    /// at a time: a page marked again behind the iterator stays dirty for the next take,
    /// and dropping the iterator early leaves the rest of the log untouched.
    pub fn take(&self) -> Pages<'_> {
        Pages::new(self, true)
    }

    /// The dirty runs, without clearing anything.
    pub fn peek(&self) -> Pages<'_> {
        Pages::new(self, false)
    }

    /// How many pages are dirty now (a snapshot; nothing is cleared).
    pub fn dirty_pages(&self) -> u64 {
        let mut count = 0u64;
        let mut byte = 0;
        while byte < self.mapping.len() {
            let unit = self.unit_at(byte);
            count += u64::from(self.load(unit).count_ones());
            byte = unit.start + unit.width;
        }
        count
    }

    fn unit_at(&self, byte: usize) -> Unit {
        let body = self.head + 8 * self.words;
        if byte < self.head || byte >= body {
            Unit {
                start: byte,
                width: 1,
            }
        } else {
            Unit {
                start: self.head + (byte - self.head) / 8 * 8,
                width: 8,
            }
        }
    }

    fn byte(&self, start: usize) -> &AtomicU8 {
        debug_assert!(start < self.mapping.len());
        // SAFETY: `start` is inside the mapping (callers pass unit starts below its
        // length), which lives as long as `&self`; AtomicU8 has alignment 1, and every
        // access to shared memory here is atomic.
        unsafe { AtomicU8::from_ptr(self.mapping.as_ptr().add(start)) }
    }

    fn word(&self, start: usize) -> &AtomicU64 {
        debug_assert!(start + 8 <= self.mapping.len());
        // SAFETY: word units start at `head`, which makes the address 8-aligned, and end
        // inside the mapping (`head + 8 * words <= len`); the mapping lives as long as
        // `&self`, and every access to it here is atomic.
        unsafe { AtomicU64::from_ptr(self.mapping.as_ptr().add(start).cast::<u64>()) }
    }

    fn or(&self, unit: Unit, mask: u64) {
        if unit.width == 8 {
            self.word(unit.start).fetch_or(mask, Ordering::Release);
        } else {
            // A byte unit's mask has only its low 8 bits set.
            self.byte(unit.start)
                .fetch_or(mask as u8, Ordering::Release);
        }
    }

    fn swap_zero(&self, unit: Unit) -> u64 {
        if unit.width == 8 {
            self.word(unit.start).swap(0, Ordering::AcqRel)
        } else {
            u64::from(self.byte(unit.start).swap(0, Ordering::AcqRel))
        }
    }

    fn load(&self, unit: Unit) -> u64 {
        if unit.width == 8 {
            self.word(unit.start).load(Ordering::Acquire)
        } else {
            u64::from(self.byte(unit.start).load(Ordering::Acquire))
        }
    }
}

/// Guest-physical addresses below this are covered by a log of `size` bytes.
fn covered_end(size: u64) -> u64 {
    size.saturating_mul(8 * LOG_PAGE_SIZE)
}

/// Bits `[lo, hi)` of a word (`hi - lo` at most 64).
fn bit_mask(lo: u64, hi: u64) -> u64 {
    let n = hi - lo;
    let ones = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones << lo
}

/// Iterator over dirty runs; see [`DirtyLog::take`] and [`DirtyLog::peek`].
#[derive(Debug)]
pub struct Pages<'a> {
    log: &'a DirtyLog,
    clear: bool,
    /// Next byte of the log to read.
    next: usize,
    /// Bits of the current unit not yet yielded, and the page number of its bit 0.
    bits: u64,
    base: u64,
    /// Pages `[start, end)` of the run being built.
    run: Option<(u64, u64)>,
}

impl<'a> Pages<'a> {
    fn new(log: &'a DirtyLog, clear: bool) -> Self {
        Self {
            log,
            clear,
            next: 0,
            bits: 0,
            base: 0,
            run: None,
        }
    }
}

impl Iterator for Pages<'_> {
    type Item = DirtyRange;

    fn next(&mut self) -> Option<DirtyRange> {
        let to_range = |(s, e): (u64, u64)| DirtyRange {
            start: s << PAGE_SHIFT,
            end: e << PAGE_SHIFT,
        };
        loop {
            if self.bits == 0 {
                if self.next >= self.log.mapping.len() {
                    return self.run.take().map(to_range);
                }
                let unit = self.log.unit_at(self.next);
                self.bits = if self.clear {
                    self.log.swap_zero(unit)
                } else {
                    self.log.load(unit)
                };
                self.base = unit.start as u64 * 8;
                self.next = unit.start + unit.width;
                continue;
            }
            let low = u64::from(self.bits.trailing_zeros());
            let ones = u64::from((!(self.bits >> low)).trailing_zeros());
            self.bits &= !bit_mask(low, low + ones);
            let (start, end) = (self.base + low, self.base + low + ones);
            match self.run {
                Some((s, e)) if e == start => self.run = Some((s, end)),
                Some(done) => {
                    self.run = Some((start, end));
                    return Some(to_range(done));
                }
                None => self.run = Some((start, end)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::open_fd_count;
    use crate::sys::{dup_cloexec, EventFd};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    const PAGE: u64 = LOG_PAGE_SIZE;

    fn ranges(it: Pages<'_>) -> Vec<(u64, u64)> {
        it.map(|r| (r.start, r.end)).collect()
    }

    /// A log adopted at `offset` into a fresh memfd, plus the fd's other end for raw reads.
    fn adopted(size: u64, offset: u64, guest_end: u64) -> (DirtyLog, Mapping) {
        let fd = memfd_create("t", offset + size).unwrap();
        let raw = Mapping::map_shared(fd.as_fd(), 0, offset + size, false).unwrap();
        let log = DirtyLog::adopt(fd, size, offset, guest_end, true).unwrap();
        (log, raw)
    }

    fn raw_bytes(raw: &Mapping) -> Vec<u8> {
        // SAFETY: the mapping is `len` readable bytes; racing writers are not running.
        unsafe { std::slice::from_raw_parts(raw.as_ptr(), raw.len()) }.to_vec()
    }

    #[test]
    fn memory_end_is_the_end_of_the_highest_region() {
        assert_eq!(memory_end(&GuestMemory::default()), 0);
        let mem = GuestMemory::allocate(&[(1 << 30, 0x2000), (0, 0x1000)]).unwrap();
        assert_eq!(memory_end(&mem), (1 << 30) + 0x2000);
    }

    #[test]
    fn sizes_match_the_spec_and_qemu() {
        assert_eq!(min_log_size(0), 0);
        assert_eq!(min_log_size(1), 1);
        assert_eq!(min_log_size(8 * PAGE), 1);
        assert_eq!(min_log_size(8 * PAGE + 1), 2);
        assert_eq!(min_log_size(1 << 30), (1 << 30) / PAGE / 8);
        // QEMU: (last / (4096 * 64) + 1) * 8 bytes.
        for end in [1u64, 4096, 64 * PAGE, 64 * PAGE + 1, 1 << 30, (1 << 30) + 5] {
            assert_eq!(
                alloc_log_size(end),
                ((end - 1) / (PAGE * 64) + 1) * 8,
                "{end:#x}"
            );
        }
        assert_eq!(min_log_size(u64::MAX), 1 << 49);
        assert_eq!(alloc_log_size(u64::MAX), 1 << 49);
    }

    #[test]
    fn mark_sets_the_bits_of_every_touched_page_in_spec_layout() {
        let (log, raw) = adopted(16, 0, 128 * PAGE);
        log.mark(0, 1).unwrap(); // page 0
        log.mark(9 * PAGE + 4095, 2).unwrap(); // pages 9 and 10 (straddles)
        log.mark(63 * PAGE, PAGE + 1).unwrap(); // pages 63, 64 (crosses a word)
        log.mark(100 * PAGE + 7, 0).unwrap(); // nothing
        let b = raw_bytes(&raw);
        assert_eq!(b[0], 0b0000_0001);
        assert_eq!(b[1], 0b0000_0110);
        assert_eq!(b[7], 0b1000_0000);
        assert_eq!(b[8], 0b0000_0001);
        assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 5);
        assert_eq!(log.dirty_pages(), 5);
        assert_eq!(
            ranges(log.peek()),
            [(0, PAGE), (9 * PAGE, 11 * PAGE), (63 * PAGE, 65 * PAGE)]
        );
        assert_eq!(log.dirty_pages(), 5, "peek clears nothing");
    }

    #[test]
    fn take_coalesces_runs_and_clears() {
        let log = DirtyLog::allocate(1 << 24).unwrap();
        assert_eq!(log.size(), alloc_log_size(1 << 24));
        log.mark(5 * PAGE, 200 * PAGE).unwrap(); // pages 5..205, across several words
        log.mark(205 * PAGE, 1).unwrap(); // adjacent: joins the run
        log.mark(4095 * PAGE, PAGE).unwrap(); // last page
        assert_eq!(
            ranges(log.take()),
            [(5 * PAGE, 206 * PAGE), (4095 * PAGE, 4096 * PAGE)]
        );
        assert_eq!(log.dirty_pages(), 0);
        assert_eq!(ranges(log.take()), []);
        // A full word of ones, then the next word's first bit: one run.
        log.mark(64 * PAGE, 65 * PAGE).unwrap();
        let r: Vec<_> = log.take().collect();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].pages(), 65);
    }

    #[test]
    fn unaligned_offset_and_size_use_byte_units_at_the_ends() {
        // An mmap_offset of 3 leaves 5 head bytes before the first word; odd sizes a tail.
        for (offset, size) in [(3u64, 21u64), (3, 24), (0, 13), (7, 1), (1, 7)] {
            let covers = size * 8 * PAGE;
            let (log, raw) = adopted(size, offset, covers);
            let every: Vec<u64> = (0..size * 8).collect();
            for &p in &every {
                log.mark(p * PAGE, 1).unwrap();
            }
            let b = raw_bytes(&raw);
            assert!(
                b[..offset as usize].iter().all(|&x| x == 0),
                "before the log"
            );
            assert!(
                b[offset as usize..].iter().all(|&x| x == 0xff),
                "{offset} {size}"
            );
            assert_eq!(ranges(log.take()), [(0, covers)]);
            assert!(raw_bytes(&raw).iter().all(|&x| x == 0));
            assert!(log.mark(covers, 1).is_err());
            assert!(log.mark(covers - 1, 2).is_err());
            log.mark(covers - 1, 1).unwrap();
            assert_eq!(ranges(log.take()), [(covers - PAGE, covers)]);
        }
    }

    #[test]
    fn mark_past_the_end_or_wrapping_is_an_error_and_marks_nothing() {
        let log = DirtyLog::allocate(64 * PAGE).unwrap();
        assert_eq!(log.covers(), 64 * PAGE);
        for (gpa, len) in [
            (64 * PAGE, 1),
            (63 * PAGE, PAGE + 1),
            (u64::MAX, 1),
            (u64::MAX - 10, 20),
            (0, u64::MAX),
        ] {
            match log.mark(gpa, len) {
                Err(DirtyLogError::OutOfRange { covers, .. }) => assert_eq!(covers, 64 * PAGE),
                other => panic!("{gpa:#x}+{len:#x}: {other:?}"),
            }
        }
        assert_eq!(log.dirty_pages(), 0);
        let msg = log.mark(64 * PAGE, 1).unwrap_err().to_string();
        assert!(
            msg.contains("0x40000") && msg.contains("dirty log"),
            "{msg}"
        );
    }

    #[test]
    fn adopt_checks_size_offset_and_fd_before_mapping_c9() {
        let fd = || memfd_create("t", 4096).unwrap();
        let before = open_fd_count();
        assert!(matches!(
            DirtyLog::adopt(fd(), 0, 0, PAGE, false),
            Err(DirtyLogError::ZeroSize)
        ));
        assert!(matches!(
            DirtyLog::adopt(fd(), 16, u64::MAX - 8, PAGE, false),
            Err(DirtyLogError::Overflow { .. })
        ));
        assert!(matches!(
            DirtyLog::adopt(fd(), u64::MAX, 1, PAGE, false),
            Err(DirtyLogError::Overflow { .. })
        ));
        // 1 GiB of guest memory needs 32 KiB of log.
        match DirtyLog::adopt(fd(), 4096, 0, 1 << 30, false) {
            Err(DirtyLogError::TooSmall { needed, covers, .. }) => {
                assert_eq!(needed, 32768);
                assert_eq!(covers, 4096 * 8 * PAGE);
            }
            other => panic!("{other:?}"),
        }
        // The minimum (byte-exact) size is accepted: 9 pages need 2 bytes.
        DirtyLog::adopt(fd(), 2, 0, 9 * PAGE, false).unwrap();
        assert!(matches!(
            DirtyLog::adopt(fd(), 1, 0, 9 * PAGE, false),
            Err(DirtyLogError::TooSmall { .. })
        ));
        // A file too small for offset + size: refused before mmap, not a SIGBUS later.
        assert!(matches!(
            DirtyLog::adopt(fd(), 4096, 1, PAGE, false),
            Err(DirtyLogError::FileTooSmall {
                file_size: 4096,
                ..
            })
        ));
        // Fds that cannot be mapped.
        let e = EventFd::new(true).unwrap();
        match DirtyLog::adopt(e.into(), 4096, 0, PAGE, false) {
            Err(DirtyLogError::Map(err)) => assert_eq!(err.raw_os_error(), Some(libc::ENODEV)),
            other => panic!("{other:?}"),
        }
        let ro = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(matches!(
            DirtyLog::adopt(ro.into(), 1, 0, PAGE, false),
            Err(DirtyLogError::Map(_))
        ));
        // The sealing policy.
        let unsealed = std::fs::File::from(crate::sys::test_util::unsealed_memfd(4096));
        assert!(matches!(
            DirtyLog::adopt(unsealed.into(), 4096, 0, PAGE, true),
            Err(DirtyLogError::Unsealed)
        ));
        // Every refused fd was closed.
        let mut after = open_fd_count();
        for _ in 0..50 {
            if after <= before {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            after = open_fd_count();
        }
        assert!(after <= before, "fds leaked: {before} -> {after}");
    }

    #[test]
    fn allocated_log_is_sealed_shared_and_adoptable_by_the_other_side() {
        let front = DirtyLog::allocate(1 << 20).unwrap();
        let fd = dup_cloexec(front.fd().unwrap()).unwrap();
        let back = DirtyLog::adopt(fd, front.size(), 0, 1 << 20, true).unwrap();
        assert!(back.fd().is_none());
        back.mark(0x12345, 0x3000).unwrap();
        assert_eq!(ranges(front.take()), [(0x12000, 0x16000)]);
        assert_eq!(
            back.dirty_pages(),
            0,
            "the front-end's take cleared the shared bits"
        );
        assert!(matches!(
            DirtyLog::allocate(0),
            Err(DirtyLogError::ZeroSize)
        ));
    }

    /// One thread marks every page of the log once, in a scattered order, while another
    /// takes concurrently: the union of everything taken is exactly what was marked, each
    /// page exactly once (no bit lost, none invented).
    #[test]
    fn concurrent_mark_and_take_lose_no_bit() {
        for offset in [0u64, 5] {
            let pages = 8 * 1024u64;
            let size = pages / 8;
            let fd = memfd_create("t", offset + size).unwrap();
            let log = Arc::new(DirtyLog::adopt(fd, size, offset, pages * PAGE, true).unwrap());
            let done = Arc::new(AtomicBool::new(false));
            let writer = {
                let (log, done) = (Arc::clone(&log), Arc::clone(&done));
                std::thread::spawn(move || {
                    // A permutation of 0..pages (odd stride, power-of-two modulus).
                    for i in 0..pages {
                        let p = (i * 2654435761) % pages;
                        log.mark(p * PAGE + (i % 4096), 1).unwrap();
                    }
                    done.store(true, Ordering::Release);
                })
            };
            let mut seen = Vec::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                for r in log.take() {
                    seen.extend((r.start / PAGE)..(r.end / PAGE));
                }
                if finished {
                    break;
                }
            }
            writer.join().unwrap();
            for r in log.take() {
                seen.extend((r.start / PAGE)..(r.end / PAGE));
            }
            seen.sort_unstable();
            let want: Vec<u64> = (0..pages).collect();
            assert_eq!(seen, want, "offset {offset}");
        }
    }
}
