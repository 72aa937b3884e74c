//! Virtqueues (virtio 1.x): split and packed rings, both the device side (pop descriptor
//! chains, add used elements) and the driver side (add buffers, publish, collect used
//! buffers), with notification suppression by flags and by EVENT_IDX.
//!
//! Rings live in guest memory and are addressed by guest-physical addresses (a back-end
//! converts the front-end addresses of SET_VRING_ADDR with
//! [`GuestMemory::user_to_gpa`](crate::memory::GuestMemory::user_to_gpa)). Every access goes
//! through [`GuestMemory`]'s bounds-checked accessors: this module has no `unsafe`.
//!
//! Everything the peer writes is untrusted (ADVERSARIAL C-F): each descriptor is read once
//! into a local copy, chains are bounded by the queue size (counting indirect entries),
//! nested indirect tables, INDIRECT|NEXT, out-of-range heads, index jumps, length overflow
//! and buffers outside guest memory are typed errors, and such an error leaves the queue
//! broken (every later data-path call returns [`VringError::Broken`]).
//!
//! Memory ordering: indexes and flags are read with single volatile loads, followed by an
//! Acquire fence before the data they guard is read; data is written before a Release fence
//! and the index or flags store that publishes it; notification decisions use a SeqCst
//! fence between publishing and reading the peer's suppression state.
//!
//! Policies chosen where the spec leaves room:
//! - a device-readable descriptor after a device-writable one is rejected (E10);
//! - zero-length descriptors count towards the chain bound but produce no segment;
//! - a segment may span guest-physical regions that are contiguous;
//! - an indirect table may hold at most 65535 entries and its chain, plus the direct
//!   descriptors before it, at most queue-size descriptors;
//! - the device refuses a head (split) or buffer id (packed) that is still in flight;
//! - packed event-suppression flags with the reserved value 3 are treated as "enabled"
//!   (a spurious notification is harmless, a lost one hangs the peer) (F6).

mod chain;
mod error;
pub mod event;
mod log;
mod packed;
mod queue;
mod split;

pub use chain::{DescriptorChain, Segment};
pub use error::{Result, VringError};
pub use log::{RingLog, UsedPosition};
pub use packed::{PackedDevice, PackedDriver};
pub use queue::DeviceQueue;
pub use split::{SplitDevice, SplitDriver};

use crate::memory::{Access, GuestMemory, MemoryError};

/// The virtio transport feature bits that change how a ring works: the rings of this
/// module implement each of them, on both sides, and a peer may use one only when it was
/// negotiated (a front-end's `negotiate` acks exactly these transport bits).
pub mod features {
    /// VIRTIO_F_INDIRECT_DESC (bit 28): indirect descriptor tables.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// VIRTIO_RING_F_EVENT_IDX (bit 29): notification suppression by index.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// VIRTIO_F_VERSION_1 (bit 32): a modern (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// VIRTIO_F_RING_PACKED (bit 34): the packed ring format.
    pub const RING_PACKED: u64 = 1 << 34;
    /// VIRTIO_F_ACCESS_PLATFORM (bit 33, once IOMMU_PLATFORM): the device reaches memory
    /// through the platform's IOMMU, so ring and buffer addresses are I/O virtual ones.
    /// The rings need nothing of their own for it: they run on an
    /// [`Iotlb`](crate::memory::Iotlb) view instead of the memory table, and a miss
    /// leaves a pop to retry ([`VringError::is_iotlb_miss`](super::VringError::is_iotlb_miss)).
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// Device-specific feature bits (virtio 1.3, 6 "Reserved Feature Bits": 0-23 and
    /// 50-63 of the low 64); bits 24-49 belong to the transport.
    pub const DEVICE_BITS: u64 = ((1 << 24) - 1) | !((1 << 50) - 1);
}

/// Largest queue size of either format (virtio 1.x).
pub const MAX_QUEUE_SIZE: u32 = 32768;

/// Descriptor flag: the buffer continues in the `next` descriptor (split) or slot (packed).
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Packed descriptor flag: available (compared with the driver's wrap counter).
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Packed descriptor flag: used (compared with the device's wrap counter).
pub const DESC_F_USED: u16 = 1 << 15;
/// Split avail.flags: the driver does not want interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Split used.flags: the device does not want kicks.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor, split or packed.
pub const DESC_SIZE: u64 = 16;

/// Where a ring lives, validated: size and alignment match its format.
///
/// Split: `desc` (16-aligned), avail ring (`avail_or_driver`, 2-aligned), used ring
/// (`used_or_device`, 4-aligned), size a power of two in 1..=32768. Packed: `desc`
/// (16-aligned), driver event area (4-aligned), device event area (4-aligned), size in
/// 1..=32768.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    size: u16,
    desc: u64,
    avail_or_driver: u64,
    used_or_device: u64,
    packed: bool,
}

impl RingLayout {
    /// `size` checked for the format: 1..=32768, a power of two for a split ring (D1).
    fn check_size(size: u32, packed: bool) -> Result<()> {
        if size == 0 || size > MAX_QUEUE_SIZE || !(packed || size.is_power_of_two()) {
            return Err(VringError::InvalidSize(size));
        }
        Ok(())
    }

    /// Bytes of the descriptor table (packed: ring), the avail ring (packed: driver event
    /// area) and the used ring (packed: device event area) of a ring of `size` entries,
    /// the split ring's event index words included.
    pub fn area_sizes(size: u32, packed: bool) -> Result<[u64; 3]> {
        Self::check_size(size, packed)?;
        Ok(Self::lengths(u64::from(size), packed))
    }

    fn lengths(n: u64, packed: bool) -> [u64; 3] {
        if packed {
            [DESC_SIZE * n, 4, 4]
        } else {
            [DESC_SIZE * n, 6 + 2 * n, 6 + 8 * n]
        }
    }

    /// A ring laid out contiguously from `base` rounded up to 16 (what a driver that
    /// places its own rings does): the descriptor table, then the avail ring (driver
    /// area), then the used ring (device area) at the next 4-byte boundary. A ring that
    /// would run past the end of the address space is refused.
    pub fn place(size: u32, base: u64, packed: bool) -> Result<Self> {
        let [desc_len, avail_len, used_len] = Self::area_sizes(size, packed)?;
        let overflow = || {
            VringError::Memory(MemoryError::Overflow {
                space: crate::memory::AddressSpace::GuestPhysical,
                start: base,
                size: desc_len + avail_len + used_len,
            })
        };
        let desc = base.checked_add(15).ok_or_else(overflow)? & !15;
        let avail = desc.checked_add(desc_len).ok_or_else(overflow)?;
        let used = avail.checked_add(avail_len + 3).ok_or_else(overflow)? & !3;
        used.checked_add(used_len).ok_or_else(overflow)?;
        Self::new(packed, size, desc, avail, used)
    }

    /// A split or a packed ring ([`split`](Self::split), [`packed`](Self::packed)).
    pub fn new(packed: bool, size: u32, desc: u64, avail: u64, used: u64) -> Result<Self> {
        if packed {
            Self::packed(size, desc, avail, used)
        } else {
            Self::split(size, desc, avail, used)
        }
    }

    /// A split ring (ADVERSARIAL D1, D3).
    pub fn split(size: u32, desc: u64, avail: u64, used: u64) -> Result<Self> {
        Self::check_size(size, false)?;
        Self::aligned(
            size,
            [
                ("descriptor table", desc, 16),
                ("avail ring", avail, 2),
                ("used ring", used, 4),
            ],
            false,
        )
    }

    /// A packed ring (any size in 1..=32768).
    pub fn packed(size: u32, desc: u64, driver_event: u64, device_event: u64) -> Result<Self> {
        Self::check_size(size, true)?;
        Self::aligned(
            size,
            [
                ("descriptor ring", desc, 16),
                ("driver event area", driver_event, 4),
                ("device event area", device_event, 4),
            ],
            true,
        )
    }

    /// A split ring laid out contiguously from `base` (desc, avail, then used 4-aligned).
    pub fn split_at(size: u32, base: u64) -> Result<Self> {
        let n = u64::from(size);
        let avail = base.wrapping_add(DESC_SIZE * n);
        let used = avail.wrapping_add(6 + 2 * n + 3) & !3;
        Self::split(size, base, avail, used)
    }

    /// A packed ring laid out contiguously from `base` (ring, driver area, device area).
    pub fn packed_at(size: u32, base: u64) -> Result<Self> {
        let driver = base.wrapping_add(DESC_SIZE * u64::from(size));
        Self::packed(size, base, driver, driver.wrapping_add(4))
    }

    /// Builds a layout from front-end virtual addresses (SET_VRING_ADDR), converting each
    /// with [`GuestMemory::user_to_gpa`] and checking every area is in memory (D3, D4).
    pub fn from_user(
        mem: &GuestMemory,
        packed: bool,
        size: u32,
        desc: u64,
        avail_or_driver: u64,
        used_or_device: u64,
    ) -> Result<Self> {
        let desc = mem.user_to_gpa(desc)?;
        let avail = mem.user_to_gpa(avail_or_driver)?;
        let used = mem.user_to_gpa(used_or_device)?;
        let layout = Self::new(packed, size, desc, avail, used)?;
        layout.check_memory(mem)?;
        Ok(layout)
    }

    fn aligned(size: u32, areas: [(&'static str, u64, u64); 3], packed: bool) -> Result<Self> {
        for (area, addr, align) in areas {
            if addr % align != 0 {
                return Err(VringError::Misaligned { area, addr, align });
            }
        }
        Ok(Self {
            size: size as u16, // checked <= 32768 by the callers
            desc: areas[0].1,
            avail_or_driver: areas[1].1,
            used_or_device: areas[2].1,
            packed,
        })
    }

    /// Descriptors in the ring (checked against the format's limit when the layout is made).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor table (split) or ring (packed).
    pub fn desc(&self) -> u64 {
        self.desc
    }

    /// Split: the avail ring; packed: the driver event suppression area.
    pub fn avail_or_driver(&self) -> u64 {
        self.avail_or_driver
    }

    /// Split: the used ring; packed: the device event suppression area.
    pub fn used_or_device(&self) -> u64 {
        self.used_or_device
    }

    /// Which format the three areas are laid out for.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// (address, length) of the three areas, including the event index words of a split
    /// ring.
    pub fn areas(&self) -> [(u64, u64); 3] {
        let [desc_len, avail_len, used_len] = Self::lengths(u64::from(self.size), self.packed);
        [
            (self.desc, desc_len),
            (self.avail_or_driver, avail_len),
            (self.used_or_device, used_len),
        ]
    }

    /// Checks that every area lies entirely in guest memory (ADVERSARIAL D4): the whole
    /// [start, end) range, not just its ends, and that the device may access it as it
    /// must (in an IOTLB view: the split used ring and the packed descriptor ring
    /// read-write, the rest readable; a hole is a miss to ask the IOMMU side for).
    pub fn check_memory(&self, mem: &GuestMemory) -> Result<()> {
        const R: &[Access] = &[Access::Read];
        const W: &[Access] = &[Access::Write];
        const RW: &[Access] = &[Access::Read, Access::Write];
        let needs = if self.packed { [RW, R, W] } else { [R, R, RW] };
        for ((addr, len), needs) in self.areas().into_iter().zip(needs) {
            for &access in needs {
                mem.check_access(addr, len, access)?;
            }
        }
        Ok(())
    }
}

/// Checks that [addr, addr+len) is backed by guest memory, possibly across regions that are
/// contiguous in guest-physical space. `len` 0 always passes.
pub(crate) fn check_range(
    mem: &GuestMemory,
    addr: u64,
    len: u64,
) -> std::result::Result<(), MemoryError> {
    mem.check_mapped(addr, len, Access::Read)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod iotlb_tests;
