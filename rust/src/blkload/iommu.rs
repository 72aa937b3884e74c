//! The load loop behind a virtual IOMMU (`bench blk --iommu`): the driver's addresses are
//! I/O virtual addresses (IOVAs), and this side plays the IOMMU too, answering the
//! back-end's misses with IOTLB updates, so that the cost of translation in a back-end
//! (`serve blk --iommu`) can be measured against its flat memory table.
//!
//! # The remapping
//!
//! The front-end's memory is one table (guest-physical addresses from 0, as the Python
//! set-up allocates it). The driver works in IOVA space: what sits at guest offset `x` in
//! the flat layout (rings, request headers, data windows) sits at IOVA [`IOVA_BASE`]` + x`.
//! Behind those IOVAs, the memory is remapped page by page, in pages of the IOMMU's page
//! size (`--iommu-page`): of `n` pages, I/O virtual page `j` is backed by guest page
//! `((j ^ 1) + n / 2) % n` (`j ^ 1` is `j` itself for an odd last page). Neighbouring pages
//! are swapped in pairs and the two halves of the memory exchanged, so
//! - a back-end that took an IOVA for a guest address would find nothing there (the memory
//!   table ends far below [`IOVA_BASE`]): its requests fail;
//! - one that stretched a translation past the entry it came from (assuming the next page
//!   follows in memory) would reach the memory of another I/O virtual page;
//! - one that left the pages in order would read and write the other half of the memory:
//!   data of other slots, not its request's, so even a consistent mistranslation (the same
//!   wrong page for the write and the read-back) leaves the driver's buffers stale.
//!
//! Either of the last two makes `--verify` find the data wrong.
//!
//! The driver itself reads and writes through [`Remap::driver_view`], a memory map in IOVA
//! space built from the same rule, so the data it checks is the data the back-end had to
//! find through the IOTLB.
//!
//! # Answering misses
//!
//! [`Iommu`] owns the front-end's end of the back-end request channel and, on a thread
//! of its own, answers every `IOTLB_MSG` miss with an `IOTLB_MSG` update of the whole page
//! the address falls in (read-write), sent on the front-end's socket before the miss is
//! acknowledged, as QEMU's vIOMMU does. The page size decides how many misses a run takes
//! and so what they cost. Misses are counted; a miss outside the memory is counted apart
//! and never answered (the back-end fails that request after its bound).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::VringAddrs;
use crate::memory::{GuestMemory, GuestRegion, Perm};
use crate::sys::EventFd;
use crate::user::codes::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::user::payload::{iotlb, IotlbPayload};
use crate::user::{Frontend, FrontendReqHandler};
use crate::vring::features::ACCESS_PLATFORM;
use crate::vring::RingLayout;

use super::LoadError;

/// Where the driver's I/O virtual address space starts: the flat layout's guest offset 0.
/// Far above any memory table the set-up makes, so an IOVA taken as a guest address
/// misses.
pub const IOVA_BASE: u64 = 1 << 40;

/// The smallest IOMMU page (and the alignment of every page size).
pub const MIN_PAGE: u64 = 4096;

/// What the IOMMU side maps before the run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefill {
    /// Nothing: every page the back-end touches first misses (what a vIOMMU with a device
    /// IOTLB does, and what makes misses part of the figure).
    None,
    /// Every page of the memory, one update per page: no miss unless an invalidation
    /// dropped a page.
    All,
}

impl Prefill {
    /// `none` or `all`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Prefill::None),
            "all" => Some(Prefill::All),
            _ => None,
        }
    }

    /// The option's value (`"none"`), for reports.
    pub fn name(self) -> &'static str {
        match self {
            Prefill::None => "none",
            Prefill::All => "all",
        }
    }
}

/// How the load runs behind the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// The IOMMU's page: the unit of the remapping and of every IOTLB update.
    pub page: u64,
    /// What is mapped before the run.
    pub prefill: Prefill,
    /// Unmap (invalidate) each request's data pages when it completes, as a guest in
    /// strict IOMMU mode does: the next request on that slot misses again (a cold IOTLB).
    pub strict: bool,
}

/// The fixed remapping of the module documentation over a memory of `pages` pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remap {
    page: u64,
    pages: u64,
}

impl Remap {
    /// The remapping of `size` bytes of memory in pages of `page` bytes (a power of two,
    /// at least [`MIN_PAGE`], dividing `size`).
    pub fn new(page: u64, size: u64) -> Result<Self, LoadError> {
        if !page.is_power_of_two() || page < MIN_PAGE {
            return Err(LoadError::InvalidParam(format!(
                "the IOMMU page must be a power of two of at least {MIN_PAGE} bytes: {page}"
            )));
        }
        if size == 0 || size % page != 0 {
            return Err(LoadError::InvalidParam(format!(
                "the memory ({size} bytes) is not a whole number of {page}-byte IOMMU pages"
            )));
        }
        Ok(Self {
            page,
            pages: size / page,
        })
    }

    /// The IOMMU page size.
    pub fn page(&self) -> u64 {
        self.page
    }

    /// Pages of memory (and of I/O virtual space) remapped.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The I/O virtual address of flat-layout offset `offset` (what the driver puts in
    /// rings and descriptors).
    pub fn iova(&self, offset: u64) -> u64 {
        IOVA_BASE + offset
    }

    /// The guest page backing I/O virtual page `j` (below `pages`): `((j ^ 1) + n / 2) %
    /// n`, with `j ^ 1` taken as `j` for an odd last page. A bijection of the pages.
    fn backing_page(&self, j: u64) -> u64 {
        let n = self.pages;
        let k = if j ^ 1 < n { j ^ 1 } else { j };
        (k + n / 2) % n
    }

    /// The guest-physical address behind `iova`; None outside the remapped space.
    pub fn backing(&self, iova: u64) -> Option<u64> {
        let rel = iova.checked_sub(IOVA_BASE)?;
        let j = rel / self.page;
        (j < self.pages).then(|| self.backing_page(j) * self.page + rel % self.page)
    }

    /// The update that maps the page holding `iova` to the front-end memory of `mem` (the
    /// memory table the back-end has) behind it; None when `iova` is outside the
    /// remapped space or its memory is not in `mem`.
    pub fn update_for(&self, mem: &GuestMemory, iova: u64) -> Option<IotlbPayload> {
        let start = iova & !(self.page - 1);
        let gpa = self.backing(start)?;
        let uaddr = mem.gpa_to_user(gpa).ok()?;
        mem.translate(gpa, self.page).ok()?;
        Some(IotlbPayload {
            iova: start,
            size: self.page,
            uaddr,
            perm: iotlb::PERM_RW,
            kind: iotlb::UPDATE,
        })
    }

    /// The driver's own map of its memory in I/O virtual space: one read-write window per
    /// page, each showing the guest page the remapping puts behind it. `mem` must hold
    /// every page of the remapped size.
    pub fn driver_view(&self, mem: &GuestMemory) -> Result<GuestMemory, LoadError> {
        let mut windows = Vec::with_capacity(usize::try_from(self.pages).unwrap_or(0));
        for j in 0..self.pages {
            let gpa = self.backing_page(j) * self.page;
            let region = mem
                .regions()
                .iter()
                .find(|r| {
                    let i = r.info();
                    i.guest_phys_addr <= gpa && gpa < i.gpa_end()
                })
                .ok_or(crate::memory::MemoryError::OutOfRange {
                    addr: gpa,
                    len: self.page,
                })?;
            let offset = gpa - region.info().guest_phys_addr;
            windows.push(Arc::new(GuestRegion::window(
                region,
                self.iova(j * self.page),
                offset,
                self.page,
                Perm::ReadWrite,
            )?));
        }
        Ok(GuestMemory::io_virtual(windows))
    }

    /// The ring's layout in I/O virtual space (the flat `layout` moved by [`IOVA_BASE`]).
    pub fn ring_layout(&self, layout: RingLayout) -> Result<RingLayout, LoadError> {
        let [(desc, _), (avail, _), (used, _)] = layout.areas();
        let size = u32::from(layout.size());
        let (d, a, u) = (self.iova(desc), self.iova(avail), self.iova(used));
        Ok(if layout.is_packed() {
            RingLayout::packed(size, d, a, u)?
        } else {
            RingLayout::split(size, d, a, u)?
        })
    }
}

/// Counts of the IOMMU side.
#[derive(Debug, Default)]
pub struct IommuCounters {
    /// Misses the back-end sent.
    pub misses: AtomicU64,
    /// Of those, misses outside the remapped memory (never answered).
    pub unmapped: AtomicU64,
    /// Updates sent (answers and prefill).
    pub updates: AtomicU64,
    /// Invalidations sent (strict mode).
    pub invalidations: AtomicU64,
}

/// The IOMMU side of one front-end: the remapping, the connection it sends updates and
/// invalidations on, and the thread answering misses.
#[derive(Debug)]
pub struct Iommu {
    config: IommuConfig,
    remap: Remap,
    /// The memory table the back-end has (guest-physical), to name front-end addresses.
    table: GuestMemory,
    frontend: Arc<Frontend>,
    counters: Arc<IommuCounters>,
    /// The first error of the answering thread (an update the back-end refused, a broken
    /// channel), for the run to report.
    failure: Arc<Mutex<Option<String>>>,
    /// A handle on the channel's socket, to shut it down (which ends the thread).
    channel: UnixStream,
    thread: Option<JoinHandle<()>>,
}

struct Answer {
    remap: Remap,
    table: GuestMemory,
    frontend: Arc<Frontend>,
    counters: Arc<IommuCounters>,
}

impl FrontendReqHandler for Answer {
    fn iotlb_msg(&mut self, msg: &IotlbPayload) -> crate::user::Result<u64> {
        if msg.kind != iotlb::MISS {
            return Err(crate::user::Error::NotSupported(
                "IOTLB_MSG other than a miss (this IOMMU side answers misses only)",
            ));
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let Some(update) = self.remap.update_for(&self.table, msg.iova) else {
            self.counters.unmapped.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        };
        self.frontend.iotlb_msg(&update)?;
        self.counters.updates.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }
}

impl Iommu {
    /// Plays the IOMMU for `frontend`, whose back-end was given `table` and must have
    /// acked `VIRTIO_F_ACCESS_PLATFORM` and `BACKEND_REQ`: opens the back-end request
    /// channel, starts the thread answering misses, and maps everything up front if the
    /// configuration says so.
    pub fn start(
        frontend: Arc<Frontend>,
        table: GuestMemory,
        config: IommuConfig,
    ) -> Result<Self, LoadError> {
        if frontend.acked_features() & ACCESS_PLATFORM == 0 {
            return Err(LoadError::InvalidParam(
                "the back-end did not ack VIRTIO_F_ACCESS_PLATFORM: it does not work behind \
                 an IOMMU"
                    .into(),
            ));
        }
        let size = table.regions().iter().map(|r| r.info().gpa_end()).max();
        let remap = Remap::new(config.page, size.unwrap_or(0))?;
        let mut channel = frontend
            .set_backend_req_fd()
            .map_err(|e| LoadError::Vhost("SET_BACKEND_REQ_FD", e))?;
        let handle = channel.socket().try_clone()?;
        let counters = Arc::new(IommuCounters::default());
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let mut answer = Answer {
            remap,
            table: table.clone(),
            frontend: Arc::clone(&frontend),
            counters: Arc::clone(&counters),
        };
        let failed = Arc::clone(&failure);
        let thread = std::thread::Builder::new()
            .name("iommu-misses".into())
            .spawn(move || loop {
                match channel.handle_one(&mut answer) {
                    Ok(()) => {}
                    Err(e) => {
                        let gone = channel.is_broken()
                            || matches!(
                                e,
                                crate::user::Error::Disconnected | crate::user::Error::Closed
                            );
                        if !gone {
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert_with(|| format!("answering an IOTLB miss: {e}"));
                            continue;
                        }
                        return;
                    }
                }
            })?;
        let iommu = Self {
            config,
            remap,
            table,
            frontend,
            counters,
            failure,
            channel: handle,
            thread: Some(thread),
        };
        if config.prefill == Prefill::All {
            for j in 0..remap.pages() {
                iommu.update(remap.iova(j * remap.page()))?;
            }
        }
        Ok(iommu)
    }

    fn update(&self, iova: u64) -> Result<(), LoadError> {
        let msg = self.remap.update_for(&self.table, iova).ok_or_else(|| {
            LoadError::InvalidParam(format!("I/O virtual address {iova:#x} is not remapped"))
        })?;
        self.frontend
            .iotlb_msg(&msg)
            .map_err(|e| LoadError::Vhost("IOTLB_MSG", e))?;
        self.counters.updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Strict mode: drops the translations of the pages of `[iova, iova + len)`.
    pub(super) fn unmap(&self, iova: u64, len: u64) -> Result<(), LoadError> {
        let page = self.remap.page();
        let start = iova & !(page - 1);
        let end = (iova + len).div_ceil(page) * page;
        let msg = IotlbPayload {
            iova: start,
            size: end - start,
            uaddr: 0,
            perm: iotlb::PERM_RW,
            kind: iotlb::INVALIDATE,
        };
        self.frontend
            .iotlb_msg(&msg)
            .map_err(|e| LoadError::Vhost("IOTLB_MSG", e))?;
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Hands queue `index` to the back-end at its I/O virtual addresses (`layout`, already
    /// in IOVA space): SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE (a fresh ring),
    /// SET_VRING_CALL, SET_VRING_KICK and SET_VRING_ENABLE. Done here, after the thread
    /// answering misses is running, since the back-end may miss on the ring at once.
    pub(super) fn set_up_queue(
        &self,
        index: u32,
        layout: RingLayout,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), LoadError> {
        let fe = &self.frontend;
        let vhost = |what| move |e| LoadError::Vhost(what, e);
        let [(desc, _), (avail, _), (used, _)] = layout.areas();
        fe.set_vring_num(index, u32::from(layout.size()))
            .map_err(vhost("SET_VRING_NUM"))?;
        fe.set_vring_addr(&VringAddrs {
            index,
            flags: 0,
            desc,
            used,
            avail,
            log: 0,
        })
        .map_err(vhost("SET_VRING_ADDR"))?;
        let base = if layout.is_packed() { 1 << 15 } else { 0 };
        fe.set_vring_base(index, base)
            .map_err(vhost("SET_VRING_BASE"))?;
        fe.set_vring_call(index, Some(call.as_fd()))
            .map_err(vhost("SET_VRING_CALL"))?;
        fe.set_vring_kick(index, Some(kick.as_fd()))
            .map_err(vhost("SET_VRING_KICK"))?;
        if fe.acked_features() & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            fe.set_vring_enable(index, true)
                .map_err(vhost("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// The configuration it runs with.
    pub fn config(&self) -> IommuConfig {
        self.config
    }

    /// The remapping.
    pub fn remap(&self) -> Remap {
        self.remap
    }

    /// The counts so far.
    pub fn counters(&self) -> &IommuCounters {
        &self.counters
    }

    /// Misses answered or not so far.
    pub fn misses(&self) -> u64 {
        self.counters.misses.load(Ordering::Relaxed)
    }

    /// The first error of the thread answering misses, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Iommu {
    fn drop(&mut self) {
        // The thread waits for the next request: a shut-down socket ends that wait.
        let _ = self.channel.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
