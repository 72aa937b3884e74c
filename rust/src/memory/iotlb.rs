//! The translation layer of a device behind an IOMMU (`VIRTIO_F_ACCESS_PLATFORM`): I/O
//! virtual addresses (IOVAs) to the front-end's memory, with permissions.
//!
//! An [`Iotlb`] is filled and emptied by the IOMMU side's messages (vhost-user `IOTLB_MSG`,
//! the kernel's `struct vhost_iotlb_msg`: the callers decode those and pass the fields
//! here). Each entry maps an IOVA range to a range of the front-end's memory table, named
//! by front-end address (`uaddr`) like the ring addresses of `SET_VRING_ADDR`, and resolved
//! to the table's mapped region when the update arrives: an update for memory the table
//! does not hold is refused.
//!
//! The rings and devices never see the table itself: they take its [`view`](Iotlb::view),
//! an immutable [`GuestMemory`] in IOVA space whose regions are windows into the memory
//! table's regions with the entries' permissions. A worker keeps the view it popped a chain
//! from until the chain completes, so an invalidation never pulls memory from under an
//! in-flight request (the windows hold the mappings), while every view taken after the
//! invalidation misses at once. A hole in a view is a typed
//! [`IotlbMiss`](MemoryError::IotlbMiss) naming the IOVA and the access, for the caller to
//! ask the IOMMU side; a device write through a read-only entry is
//! [`AccessDenied`](MemoryError::AccessDenied), never a write.
//!
//! A view cannot hold the very last byte of the address space (a region's end must fit in
//! a u64, as in a memory table): an entry ending at `u64::MAX` shows one byte shorter in
//! views, while [`translate`](Iotlb::translate) still resolves it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Access, AddressSpace, GuestMemory, GuestRegion, MemoryError, Perm};

/// Everything an IOTLB update or invalidation can get wrong; each names the values sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IotlbError {
    /// An update or invalidation of 0 bytes (it would name no range at all).
    #[error("IOTLB range at I/O virtual address {iova:#x} has size 0")]
    ZeroSize {
        /// The range's start.
        iova: u64,
    },
    /// The range's last byte (`start + size - 1`) does not fit in a u64 (ADVERSARIAL H4).
    #[error("IOTLB range {space} {start:#x} + size {size:#x} overflows")]
    Overflow {
        /// Which address space wrapped: I/O virtual, or front-end virtual for `uaddr`.
        space: AddressSpace,
        /// The range's start in that space.
        start: u64,
        /// The range's size.
        size: u64,
    },
    /// A permission that is not `VHOST_ACCESS_RO`, `WO` or `RW` (0 would map nothing).
    #[error("IOTLB permission {0:#x} is not read-only (1), write-only (2) or read-write (3)")]
    BadPerm(u8),
    /// The update maps front-end memory that is not in the memory table.
    #[error(
        "IOTLB update maps front-end addresses {uaddr:#x}+{size:#x}, but {first:#x} is in no \
         region of the memory table"
    )]
    Unbacked {
        /// The update's front-end address.
        uaddr: u64,
        /// Its size.
        size: u64,
        /// The first front-end address of the range that no region holds.
        first: u64,
    },
    /// More entries than the table holds: a front-end mapping page by page without ever
    /// invalidating would otherwise grow it without bound.
    #[error("IOTLB is full ({max} entries)")]
    Full {
        /// The most entries the table holds.
        max: usize,
    },
}

/// One entry: `[iova, last]` (inclusive, so a range may end at `u64::MAX`) maps to
/// `region` from `offset` on.
#[derive(Clone, Debug)]
struct Entry {
    last: u64,
    region: Arc<GuestRegion>,
    offset: u64,
    perm: Perm,
}

impl Entry {
    /// The entry cut down to `[from, to]` (inside `[start, self.last]`), as seen at `from`.
    fn slice(&self, start: u64, from: u64, to: u64) -> Entry {
        Entry {
            last: to,
            region: Arc::clone(&self.region),
            offset: self.offset + (from - start),
            perm: self.perm,
        }
    }

    fn uaddr(&self) -> u64 {
        self.region.info().userspace_addr + self.offset
    }
}

/// Where an I/O virtual address leads: the memory table region, the offset in it, how many
/// bytes from there on the same entry maps, and what the device may do. Holding it keeps
/// the region mapped.
#[derive(Clone, Debug)]
pub struct Translation {
    /// The memory table region the address is in.
    pub region: Arc<GuestRegion>,
    /// Offset of the address in `region`.
    pub offset: u64,
    /// Bytes mapped contiguously from the address to the end of its entry, minus one (so
    /// that an entry ending at `u64::MAX` covering the whole space is representable).
    pub last_offset: u64,
    /// The entry's permission.
    pub perm: Perm,
}

impl Translation {
    /// The front-end address the I/O virtual address maps to.
    pub fn uaddr(&self) -> u64 {
        self.region.info().userspace_addr + self.offset
    }

    /// The guest-physical address it maps to.
    pub fn gpa(&self) -> u64 {
        self.region.info().guest_phys_addr + self.offset
    }

    /// Host pointer of the address (valid while `self.region` lives).
    pub fn host_ptr(&self) -> *mut u8 {
        // offset < region size, which is mapped, so it fits a usize and stays inside.
        self.region.as_ptr().wrapping_add(self.offset as usize)
    }
}

/// The IOTLB of one device: disjoint IOVA ranges, each mapped to memory table memory with
/// a permission, plus the [`GuestMemory`] view the rings read through, rebuilt on each
/// change. A later update over mapped addresses replaces those addresses' translation.
#[derive(Debug)]
pub struct Iotlb {
    /// By first IOVA; disjoint.
    entries: BTreeMap<u64, Entry>,
    view: GuestMemory,
    max_entries: usize,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// Most entries a table holds by default (splits count: invalidating the middle of an
    /// entry makes two).
    pub const MAX_ENTRIES: usize = 1 << 16;

    /// An empty table holding at most [`MAX_ENTRIES`](Self::MAX_ENTRIES): every access
    /// misses.
    pub fn new() -> Self {
        Self::with_max_entries(Self::MAX_ENTRIES)
    }

    /// An empty table holding at most `max_entries` entries.
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            view: GuestMemory::io_virtual(Vec::new()),
            max_entries,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as (iova, size - 1, uaddr, perm), by IOVA: what the IOMMU side has
    /// mapped, with the size less one so that a range ending at `u64::MAX` fits.
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64, u64, Perm)> + '_ {
        self.entries
            .iter()
            .map(|(&start, e)| (start, e.last - start, e.uaddr(), e.perm))
    }

    /// The last byte of `[start, start + size)`, refusing size 0 and wrapping ranges.
    fn last_of(space: AddressSpace, start: u64, size: u64) -> Result<u64, IotlbError> {
        if size == 0 {
            return Err(IotlbError::ZeroSize { iova: start });
        }
        start
            .checked_add(size - 1)
            .ok_or(IotlbError::Overflow { space, start, size })
    }

    /// `VHOST_IOTLB_UPDATE`: maps `size` bytes at `iova` to the front-end memory at `uaddr`
    /// (which must be in `mem`, the device's current memory table, possibly across regions
    /// contiguous in front-end address space) with `perm` (`VHOST_ACCESS_*`). Translations
    /// already there for those addresses are replaced. On an error nothing changes; the
    /// table is full when the entries after the update could exceed the cap.
    pub fn update(
        &mut self,
        mem: &GuestMemory,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
    ) -> Result<(), IotlbError> {
        let last = Self::last_of(AddressSpace::IoVirtual, iova, size)?;
        let ulast = Self::last_of(AddressSpace::FrontendVirtual, uaddr, size).map_err(|_| {
            IotlbError::Overflow {
                space: AddressSpace::FrontendVirtual,
                start: uaddr,
                size,
            }
        })?;
        let perm = Perm::from_bits(perm)?;
        let pieces = Self::resolve(mem, iova, last, uaddr, ulast, perm)?;
        let growth = pieces.len() + usize::from(self.splits(iova, last));
        if self.entries.len() + growth > self.max_entries {
            return Err(IotlbError::Full {
                max: self.max_entries,
            });
        }
        Self::remove_range(&mut self.entries, iova, last);
        self.entries.extend(pieces);
        self.rebuild();
        Ok(())
    }

    /// True if one entry covers both `iova - 1` and `last + 1`: removing `[iova, last]`
    /// cuts it in two.
    fn splits(&self, iova: u64, last: u64) -> bool {
        iova > 0
            && self
                .entries
                .range(..iova)
                .next_back()
                .is_some_and(|(_, e)| e.last > last)
    }

    /// The entries for `[iova, last]` mapped from `[uaddr, ulast]`: one per memory table
    /// region the front-end range crosses.
    fn resolve(
        mem: &GuestMemory,
        iova: u64,
        last: u64,
        uaddr: u64,
        ulast: u64,
        perm: Perm,
    ) -> Result<Vec<(u64, Entry)>, IotlbError> {
        let mut by_user: Vec<&Arc<GuestRegion>> = mem.regions().iter().collect();
        by_user.sort_by_key(|r| r.info().userspace_addr);
        let mut pieces = Vec::new();
        let mut cur = uaddr;
        loop {
            let region = by_user
                .iter()
                .find(|r| {
                    let i = r.info();
                    i.userspace_addr <= cur && cur - i.userspace_addr < i.memory_size
                })
                .ok_or(IotlbError::Unbacked {
                    uaddr,
                    size: ulast - uaddr + 1,
                    first: cur,
                })?;
            let info = region.info();
            let offset = cur - info.userspace_addr;
            // The region's last front-end byte; no overflow (the region was checked).
            let region_last = info.userspace_addr + (info.memory_size - 1);
            let piece_last = region_last.min(ulast);
            let start = iova + (cur - uaddr);
            pieces.push((
                start,
                Entry {
                    last: start + (piece_last - cur),
                    region: Arc::clone(region),
                    offset,
                    perm,
                },
            ));
            if piece_last == ulast {
                debug_assert_eq!(start + (piece_last - cur), last);
                return Ok(pieces);
            }
            cur = piece_last + 1;
        }
    }

    /// `VHOST_IOTLB_INVALIDATE`: drops every translation of `[iova, iova + size)`, cutting
    /// entries that straddle its ends. Views taken before keep their windows (a chain in
    /// flight completes); views taken after miss there. Returns the number of bytes that
    /// were mapped, saturating (a whole-space invalidation of a whole-space entry).
    pub fn invalidate(&mut self, iova: u64, size: u64) -> Result<u64, IotlbError> {
        let last = Self::last_of(AddressSpace::IoVirtual, iova, size)?;
        if self.splits(iova, last) && self.entries.len() >= self.max_entries {
            // Cutting a hole in the middle of an entry makes two: refuse at the cap.
            return Err(IotlbError::Full {
                max: self.max_entries,
            });
        }
        let removed = Self::remove_range(&mut self.entries, iova, last);
        self.rebuild();
        Ok(removed)
    }

    /// Drops everything (a reset, or `VHOST_USER_RESET_DEVICE`).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.rebuild();
    }

    /// Re-resolves every entry against a new memory table (after `SET_MEM_TABLE`,
    /// `ADD_MEM_REG`, `REM_MEM_REG`): entries whose front-end memory the table no longer
    /// holds are dropped (their IOVAs miss from now on). Returns how many were dropped.
    pub fn rebind(&mut self, mem: &GuestMemory) -> usize {
        let old = std::mem::take(&mut self.entries);
        let mut dropped = 0;
        for (start, e) in old {
            let uaddr = e.uaddr();
            let ulast = uaddr + (e.last - start);
            match Self::resolve(mem, start, e.last, uaddr, ulast, e.perm) {
                Ok(pieces) => self.entries.extend(pieces),
                Err(_) => dropped += 1,
            }
        }
        self.rebuild();
        dropped
    }

    /// Removes `[iova, last]` from `entries`, keeping the parts of straddling entries
    /// outside it; returns the bytes removed (saturating).
    fn remove_range(entries: &mut BTreeMap<u64, Entry>, iova: u64, last: u64) -> u64 {
        // Entries that may intersect: the one starting at or before `iova`, and those
        // starting inside the range.
        let first = entries
            .range(..=iova)
            .next_back()
            .filter(|(_, e)| e.last >= iova)
            .map(|(&s, _)| s);
        let starts: Vec<u64> = first
            .into_iter()
            .chain(entries.range(iova..=last).map(|(&s, _)| s))
            .collect();
        let mut removed = 0u64;
        for start in starts {
            let Some(e) = entries.remove(&start) else {
                continue; // `first` may equal `iova`, listed twice
            };
            let cut_from = start.max(iova);
            let cut_to = e.last.min(last);
            removed = removed.saturating_add((cut_to - cut_from).saturating_add(1));
            if start < iova {
                entries.insert(start, e.slice(start, start, iova - 1));
            }
            if e.last > last {
                entries.insert(last + 1, e.slice(start, last + 1, e.last));
            }
        }
        removed
    }

    /// The translation of `iova` for `access`: a miss if no entry holds it, denied if the
    /// entry's permission does not allow the access.
    pub fn translate(&self, iova: u64, access: Access) -> Result<Translation, MemoryError> {
        let (&start, e) = self
            .entries
            .range(..=iova)
            .next_back()
            .filter(|(_, e)| e.last >= iova)
            .ok_or(MemoryError::IotlbMiss { iova, access })?;
        if !e.perm.allows(access) {
            return Err(MemoryError::AccessDenied {
                space: AddressSpace::IoVirtual,
                addr: iova,
                len: 1,
                access,
                perm: e.perm,
            });
        }
        Ok(Translation {
            region: Arc::clone(&e.region),
            offset: e.offset + (iova - start),
            last_offset: e.offset + (e.last - start),
            perm: e.perm,
        })
    }

    /// The current view: the memory map in I/O virtual address space the rings and devices
    /// of an `ACCESS_PLATFORM` device read through. Cheap to clone; it does not change when
    /// the table does (take it again after each update).
    pub fn view(&self) -> GuestMemory {
        self.view.clone()
    }

    fn rebuild(&mut self) {
        let windows = self
            .entries
            .iter()
            .filter_map(|(&start, e)| {
                // A region's end must fit in a u64: an entry ending at u64::MAX loses its
                // last byte in the view (see the module documentation).
                let size = if e.last == u64::MAX {
                    e.last - start
                } else {
                    e.last - start + 1
                };
                (size > 0).then(|| {
                    GuestRegion::window(&e.region, start, e.offset, size, e.perm)
                        .map(Arc::new)
                        .expect("entries are resolved inside their region")
                })
            })
            .collect();
        self.view = GuestMemory::io_virtual(windows);
    }
}

#[cfg(test)]
mod tests;
