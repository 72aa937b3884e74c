//! Descriptor chains as the device sees them, and the walker rules shared by both formats.

use crate::memory::{Access, GuestMemory, MemoryError};

use super::{check_range, Result, VringError, DESC_SIZE};

/// One buffer piece of a chain. `addr..addr+len` is checked to be backed by guest memory
/// (possibly across GPA-contiguous regions) when the chain is popped; `len` is never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address; the whole piece is checked to be backed when popped.
    pub addr: u64,
    /// In bytes; never 0.
    pub len: u32,
    /// True for a buffer the device writes (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A popped buffer: its head (split: descriptor index; packed: buffer id) and its segments,
/// readable ones first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    /// What `add_used` must name to hand the buffer back.
    pub head: u16,
    /// Readable segments first: the walker rejects a readable one after a writable one (E10).
    pub segments: Vec<Segment>,
    /// Ring descriptors the chain occupied (1 for an indirect buffer); packed rings advance
    /// by this much.
    pub(crate) ring_descriptors: u16,
}

impl DescriptorChain {
    /// The segments the device reads from (the request), in chain order.
    pub fn readable(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| !s.writable)
    }

    /// The segments the device writes into (the reply), in chain order.
    pub fn writable(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| s.writable)
    }

    /// Total readable bytes (fits u32: longer chains are rejected).
    pub fn readable_len(&self) -> u32 {
        self.readable().map(|s| s.len).sum()
    }

    /// Total writable bytes (fits u32: longer chains are rejected).
    pub fn writable_len(&self) -> u32 {
        self.writable().map(|s| s.len).sum()
    }

    /// Copies the first `max` readable bytes (or all, if fewer) out of guest memory. The
    /// bound keeps a hostile chain of up to 4 GiB from becoming a 4 GiB allocation (E10).
    pub fn read_all(&self, mem: &GuestMemory, max: usize) -> Result<Vec<u8>> {
        let want = (self.readable_len() as usize).min(max);
        let mut out = vec![0u8; want];
        let mut at = 0usize;
        for s in self.readable() {
            if at == want {
                break;
            }
            let n = (s.len as usize).min(want - at);
            mem.read(s.addr, &mut out[at..at + n])?;
            at += n;
        }
        Ok(out)
    }

    /// Writes `data` into the writable segments in order; returns the bytes written (at most
    /// `writable_len()`; the rest of `data` is dropped).
    pub fn write_all(&self, mem: &GuestMemory, data: &[u8]) -> Result<u32> {
        let mut at = 0usize;
        for s in self.writable() {
            if at == data.len() {
                break;
            }
            let n = (s.len as usize).min(data.len() - at);
            mem.write(s.addr, &data[at..at + n])?;
            at += n;
        }
        Ok(at as u32) // at <= writable_len() <= u32::MAX
    }
}

/// A descriptor as read (once) from memory. For split rings `extra` is `next`; for packed
/// rings it is the buffer id.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub extra: u16,
    pub flags: u16,
}

/// Split layout: addr, len, flags, next.
pub(crate) fn read_split_desc(mem: &GuestMemory, gpa: u64) -> Result<RawDesc> {
    let mut b = [0u8; DESC_SIZE as usize];
    mem.read(gpa, &mut b)?;
    Ok(RawDesc {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: u16::from_le_bytes([b[12], b[13]]),
        extra: u16::from_le_bytes([b[14], b[15]]),
    })
}

pub(crate) fn encode_split_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

/// Packed layout: addr, len, id, flags.
pub(crate) fn read_packed_desc(mem: &GuestMemory, gpa: u64) -> Result<RawDesc> {
    let d = read_split_desc(mem, gpa)?;
    // Same bytes; only the last two fields swap meaning.
    Ok(RawDesc {
        addr: d.addr,
        len: d.len,
        extra: d.flags,
        flags: d.extra,
    })
}

pub(crate) fn encode_packed_desc(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    encode_split_desc(addr, len, id, flags)
}

/// How a pop treats a chain's buffers, as the const parameter of [`ChainBuilder`] (so
/// that the ordinary pop compiles to what it was, with no test of the mode): the ordinary
/// pop requires them mapped; the two others exist for a device behind an IOMMU whose
/// IOMMU side never answered a miss, so that the one request fails and the queue goes on
/// (the daemon's worker picks them after its bound).
pub(crate) mod walk {
    /// Every buffer must be mapped (a hole is an IOTLB miss: nothing is consumed).
    pub(crate) const MAPPED: u8 = 0;
    /// Buffers may lie in IOTLB holes: the device meets the hole when it touches the
    /// buffer and fails that request (other memory errors still refuse the chain).
    pub(crate) const HOLES: u8 = 1;
    /// The buffers and indirect tables are not looked at, only counted through the ring
    /// itself: the chain is consumed with no segments.
    pub(crate) const SKIP: u8 = 2;
}

/// Accumulates segments while enforcing the rules every chain obeys: at most `max`
/// descriptors, readable before writable, total length within u32, buffers inside memory.
#[derive(Debug)]
/// `W` is the pop's [`walk`] mode.
pub(crate) struct ChainBuilder<const W: u8 = { walk::MAPPED }> {
    head: u16,
    max: u16,
    count: u32,
    total: u64,
    seen_writable: bool,
    segments: Vec<Segment>,
}

impl<const W: u8> ChainBuilder<W> {
    pub fn new(head: u16, max: u16) -> Self {
        Self {
            head,
            max,
            count: 0,
            total: 0,
            seen_writable: false,
            segments: Vec::new(),
        }
    }

    pub fn push(&mut self, mem: &GuestMemory, addr: u64, len: u32, writable: bool) -> Result<()> {
        self.count += 1;
        if self.count > u32::from(self.max) {
            return Err(VringError::ChainTooLong {
                head: self.head,
                max: self.max,
            });
        }
        if W == walk::SKIP {
            return Ok(());
        }
        if writable {
            self.seen_writable = true;
        } else if self.seen_writable {
            return Err(VringError::ReadableAfterWritable { head: self.head });
        }
        self.total += u64::from(len);
        if self.total > u64::from(u32::MAX) {
            return Err(VringError::LengthOverflow { head: self.head });
        }
        if len > 0 {
            // Mapped now (in an IOTLB view, a hole is a miss to retry the pop after); the
            // direction's permission is the device's to meet when it touches the buffer,
            // so that a buffer the IOMMU maps read-only fails its request, not the queue.
            let access = if writable {
                Access::Write
            } else {
                Access::Read
            };
            if W == walk::HOLES {
                // Only after the bound on an unanswered miss (never on the flat path).
                match mem.check_mapped(addr, u64::from(len), access) {
                    Ok(()) | Err(MemoryError::IotlbMiss { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            } else {
                mem.check_mapped(addr, u64::from(len), access)?;
            }
            self.segments.push(Segment {
                addr,
                len,
                writable,
            });
        }
        Ok(())
    }

    pub fn finish(self, ring_descriptors: u16) -> DescriptorChain {
        DescriptorChain {
            head: self.head,
            segments: self.segments,
            ring_descriptors,
        }
    }
}

/// Largest indirect table accepted, in entries (ADVERSARIAL E5).
pub(crate) const MAX_INDIRECT_ENTRIES: u32 = 65535;

/// Validates an indirect descriptor's table (len nonzero, a multiple of 16, at most 65535
/// entries, inside memory) and returns its entry count.
pub(crate) fn indirect_entries(mem: &GuestMemory, desc: &RawDesc) -> Result<u32> {
    if desc.len == 0 || u64::from(desc.len) % DESC_SIZE != 0 {
        return Err(VringError::IndirectInvalid { len: desc.len });
    }
    let entries = desc.len / DESC_SIZE as u32;
    if entries > MAX_INDIRECT_ENTRIES {
        return Err(VringError::IndirectInvalid { len: desc.len });
    }
    mem.check_access(desc.addr, u64::from(desc.len), Access::Read)?;
    Ok(entries)
}

/// Checks driver-supplied segments (driver side): nonempty, total within u32, in memory.
pub(crate) fn check_driver_segments(
    mem: &GuestMemory,
    readable: &[(u64, u32)],
    writable: &[(u64, u32)],
) -> Result<u32> {
    if readable.is_empty() && writable.is_empty() {
        return Err(VringError::EmptyChain);
    }
    let mut total = 0u64;
    let mut writable_total = 0u64;
    for (i, &(addr, len)) in readable.iter().chain(writable).enumerate() {
        check_range(mem, addr, u64::from(len))?;
        total += u64::from(len);
        if i >= readable.len() {
            writable_total += u64::from(len);
        }
    }
    if total > u64::from(u32::MAX) {
        return Err(VringError::LengthOverflow { head: 0 });
    }
    Ok(writable_total as u32)
}

/// Pops with `pop` until `max` chains or an empty ring; the batch loop shared by both
/// ring formats. An error stops the batch (the queue is broken by then), except an IOTLB
/// miss after some chains were popped: those are returned (they were consumed), and the
/// next pop misses again, with nothing popped, for the caller to see.
pub(crate) fn pop_up_to(
    max: usize,
    mut pop: impl FnMut() -> Result<Option<DescriptorChain>>,
) -> Result<Vec<DescriptorChain>> {
    let mut out = Vec::new();
    while out.len() < max {
        match pop() {
            Ok(Some(c)) => out.push(c),
            Ok(None) => break,
            Err(e) if e.is_iotlb_miss() && !out.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
