//! The load loop itself.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::GuestMemory;
use crate::sys::{poll_readable, EventFd};
use crate::user::Frontend;
use crate::vring::{check_range, RingLayout};

use super::iommu::{Iommu, IommuConfig};
use super::ring::Ring;
use super::{pattern, Buffers, IoFailure, Job, LoadError, Report, SectorSet, SECTOR};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// Written into the status byte before submission: a device that "completes" a request
/// without writing its status is caught (0xff is no VIRTIO_BLK_S_* value).
const STATUS_UNSET: u8 = 0xff;
const NO_SLOT: u32 = u32::MAX;
/// How often a run asks its interrupt hook whether to stop (and the longest single sleep
/// on the call eventfd, so a silent device does not delay that question).
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Asked every 100 ms (`CHECK_EVERY`) during a run; true stops it with
/// [`LoadError::Interrupted`] (the Python glue checks for signals here: Ctrl-C).
pub type InterruptHook = Box<dyn FnMut() -> bool + Send>;

struct Hook(Option<InterruptHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(set)"
        } else {
            "Hook(none)"
        })
    }
}

fn invalid(msg: impl Into<String>) -> LoadError {
    LoadError::InvalidParam(msg.into())
}

/// The driver side of one virtio-blk queue, owned by the load loop.
#[derive(Debug)]
pub struct BlkLoad {
    mem: GuestMemory,
    ring: Ring,
    kick: EventFd,
    call: EventFd,
    buffers: Vec<Buffers>,
    window: u32,
    segment_size: u32,
    /// Ring head (split) or buffer id (packed) -> slot in flight.
    head_slot: Vec<u32>,
    notify_on: bool,
    interrupt: Hook,
    /// The vhost-user socket of the back-end: a hang-up there (the back-end exited or
    /// closed the connection) ends a wait at once instead of after the run's timeout.
    hangup: Option<OwnedFd>,
    /// Behind an IOMMU: the IOMMU side (answering misses), and every address above is an
    /// I/O virtual one.
    iommu: Option<Iommu>,
}

/// Per-slot state of the request in flight.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    offset: u64,
    write: bool,
    submitted: Instant,
}

/// xorshift64*: fast, seedable, good enough to spread offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(pattern::splitmix64(seed) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

impl BlkLoad {
    /// Takes over a fresh ring at `layout` (its areas are zeroed here; the device must have
    /// been given the same addresses with base 0) with `kick`/`call`, and one
    /// [`Buffers`] per request slot, each data window `window` bytes. Data is handed to
    /// the device in descriptors of at most `segment_size` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemory,
        layout: RingLayout,
        event_idx: bool,
        kick: EventFd,
        call: EventFd,
        buffers: Vec<Buffers>,
        window: u32,
        segment_size: u32,
    ) -> Result<Self, LoadError> {
        if buffers.is_empty() {
            return Err(invalid("at least one request slot is needed"));
        }
        for (what, v) in [("window", window), ("segment size", segment_size)] {
            if v == 0 || u64::from(v) % SECTOR != 0 {
                return Err(invalid(format!(
                    "{what} must be a positive multiple of {SECTOR}: {v}"
                )));
            }
        }
        for b in &buffers {
            check_range(&mem, b.meta, 17)?;
            check_range(&mem, b.data, u64::from(window))?;
        }
        let mut ring = Ring::new(&mem, layout, event_idx)?;
        // Start as a driver busy with completions: no notifications until it sleeps.
        ring.set_used_notification(&mem, false)?;
        Ok(Self {
            head_slot: vec![NO_SLOT; usize::from(layout.size())],
            mem,
            ring,
            kick,
            call,
            buffers,
            window,
            segment_size,
            notify_on: false,
            interrupt: Hook(None),
            hangup: None,
            iommu: None,
        })
    }

    /// [`new`](Self::new) behind an IOMMU played by this side (see [`super::iommu`]):
    /// `mem` (the memory table the back-end got through `frontend`, which must have acked
    /// `VIRTIO_F_ACCESS_PLATFORM` and `BACKEND_REQ`), `layout` and `buffers` are given in
    /// the flat layout; the driver then uses their I/O virtual addresses, answers the
    /// back-end's IOTLB misses on a thread of its own, and hands queue 0 to the back-end
    /// itself (SET_VRING_* at I/O virtual addresses, once that thread runs), so the
    /// caller must not have set that queue up.
    #[allow(clippy::too_many_arguments)]
    pub fn new_behind_iommu(
        frontend: Arc<Frontend>,
        config: IommuConfig,
        mem: GuestMemory,
        layout: RingLayout,
        event_idx: bool,
        kick: EventFd,
        call: EventFd,
        buffers: Vec<Buffers>,
        window: u32,
        segment_size: u32,
    ) -> Result<Self, LoadError> {
        let iommu = Iommu::start(frontend, mem.clone(), config)?;
        let remap = iommu.remap();
        let view = remap.driver_view(&mem)?;
        let layout = remap.ring_layout(layout)?;
        let buffers = buffers
            .iter()
            .map(|b| Buffers {
                meta: remap.iova(b.meta),
                data: remap.iova(b.data),
            })
            .collect();
        let mut load = Self::new(
            view,
            layout,
            event_idx,
            kick,
            call,
            buffers,
            window,
            segment_size,
        )?;
        iommu.set_up_queue(0, layout, &load.kick, &load.call)?;
        load.iommu = Some(iommu);
        Ok(load)
    }

    /// The IOMMU side, when the load runs behind one.
    pub fn iommu(&self) -> Option<&Iommu> {
        self.iommu.as_ref()
    }

    /// Installs the hook a run asks, every 100 ms, whether to stop.
    pub fn set_interrupt(&mut self, hook: Option<InterruptHook>) {
        self.interrupt = Hook(hook);
    }

    /// Watches `socket` (a duplicate of the front-end's vhost-user socket) while waiting
    /// for completions: when the back-end closes it, the run fails with
    /// [`LoadError::Disconnected`]. Only hang-ups are looked at, never data.
    pub fn watch_hangup(&mut self, socket: Option<OwnedFd>) {
        self.hangup = socket;
    }

    fn interrupted(&mut self) -> bool {
        self.interrupt.0.as_mut().is_some_and(|h| h())
    }

    /// Descriptors one request of `block_size` bytes takes: header, data segments, status.
    pub fn descriptors_per_request(&self, block_size: u32) -> u32 {
        2 + block_size.div_ceil(self.segment_size)
    }

    /// The deepest queue a run of `block_size` requests can keep: bounded by the slots and
    /// by the ring's descriptors.
    pub fn max_iodepth(&self, block_size: u32) -> u16 {
        let by_ring = u32::from(self.ring.size()) / self.descriptors_per_request(block_size);
        by_ring
            .min(self.buffers.len() as u32)
            .min(u32::from(u16::MAX)) as u16
    }

    /// Bytes of each slot's data window: the largest request `block_size` a run can use.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Request slots: the most requests a run can have in flight.
    pub fn slots(&self) -> usize {
        self.buffers.len()
    }

    /// The ring's size, the other bound on the queue depth.
    pub fn queue_size(&self) -> u16 {
        self.ring.size()
    }

    pub(super) fn check_job(&self, job: &Job) -> Result<(), LoadError> {
        let bs = u64::from(job.block_size);
        if bs == 0 || bs % SECTOR != 0 {
            return Err(invalid(format!(
                "block size must be a positive multiple of {SECTOR}: {bs}"
            )));
        }
        if job.block_size > self.window {
            return Err(invalid(format!(
                "block size {bs} exceeds the {}-byte data window of a slot",
                self.window
            )));
        }
        if job.offset % SECTOR != 0 || job.size % bs != 0 || job.size == 0 {
            return Err(invalid(format!(
                "the region (offset {}, size {}) must start on a sector and hold a whole, \
                 non-zero number of {bs}-byte blocks",
                job.offset, job.size
            )));
        }
        if job.iodepth == 0 {
            return Err(invalid("iodepth must be at least 1"));
        }
        let max = self.max_iodepth(job.block_size);
        if job.iodepth > max {
            return Err(invalid(format!(
                "iodepth {} does not fit: {}-byte requests take {} descriptors each, the \
                 ring has {} and there are {} request slots (at most {max} in flight)",
                job.iodepth,
                bs,
                self.descriptors_per_request(job.block_size),
                self.ring.size(),
                self.buffers.len()
            )));
        }
        if job.duration.is_none() && job.max_ios.is_none() {
            return Err(invalid("a run needs a duration or a number of I/Os"));
        }
        if self.ring.in_flight() != 0 {
            return Err(invalid(
                "requests of an earlier failed run are still in flight",
            ));
        }
        Ok(())
    }

    /// Runs `job` and reports what it did. A request the device fails is counted (see
    /// [`Report::io_errors`]) and the run goes on; a broken ring, a dead eventfd or a
    /// device that stops answering for [`Job::timeout`] ends it with an error.
    pub fn run(&mut self, job: &Job) -> Result<Report, LoadError> {
        self.check_job(job)?;
        let mut run = Run::new(job);
        let mut rng = Rng::new(job.seed);
        let blocks = job.size / u64::from(job.block_size);
        let mut cursor = 0u64;
        let mut next_offset = || {
            let b = if job.rw.is_random() {
                rng.below(blocks)
            } else {
                let b = cursor % blocks;
                cursor += 1;
                b
            };
            job.offset + b * u64::from(job.block_size)
        };
        let mut slots: Vec<Option<InFlight>> = vec![None; usize::from(job.iodepth)];
        let misses0 = self.iommu.as_ref().map(Iommu::misses);
        let cpu0 = thread_cpu_time();
        let start = Instant::now();
        let deadline = job.duration.map(|d| start + d);
        let mut issued = 0u64;
        let may_issue = |issued: u64, now: Instant| {
            job.max_ios.map_or(true, |m| issued < m) && deadline.map_or(true, |d| now < d)
        };
        for (i, slot) in slots.iter_mut().enumerate() {
            if !may_issue(issued, start) {
                break;
            }
            *slot = Some(self.submit(job, &mut run, i, next_offset(), start)?);
            issued += 1;
        }
        self.publish_and_kick(&mut run)?;
        let mut last = start;
        let mut next_check = start + CHECK_EVERY;
        while self.ring.in_flight() > 0 {
            let mut used = self.ring.poll_used(&self.mem)?;
            if used.is_empty() {
                used = self.wait(job, &mut run)?;
            }
            if self.notify_on {
                self.ring.set_used_notification(&self.mem, false)?;
                self.notify_on = false;
            }
            let now = Instant::now();
            last = now;
            if now >= next_check {
                next_check = now + CHECK_EVERY;
                if self.interrupted() {
                    return Err(LoadError::Interrupted);
                }
            }
            // Every completion first: the ring already reuses the heads of this batch, so
            // a new request could take a head that is still further down the list.
            run.done.clear();
            for &(head, _len) in &used {
                let i = std::mem::replace(&mut self.head_slot[usize::from(head)], NO_SLOT);
                let req = slots[i as usize]
                    .take()
                    .expect("a used head maps to a slot in flight");
                self.complete(job, &mut run, i as usize, req, now)?;
                run.done.push(i as usize);
            }
            for k in 0..run.done.len() {
                if !may_issue(issued, now) {
                    break;
                }
                let i = run.done[k];
                slots[i] = Some(self.submit(job, &mut run, i, next_offset(), now)?);
                issued += 1;
            }
            self.publish_and_kick(&mut run)?;
        }
        run.report.elapsed = last - start;
        run.report.cpu = thread_cpu_time().saturating_sub(cpu0);
        if let Some(iommu) = &self.iommu {
            run.report.iotlb_misses = misses0.map(|m| iommu.misses() - m);
            if let Some(failure) = iommu.failure() {
                return Err(LoadError::IommuSide(failure));
            }
        }
        Ok(run.report)
    }

    fn submit(
        &mut self,
        job: &Job,
        run: &mut Run,
        slot: usize,
        offset: u64,
        now: Instant,
    ) -> Result<InFlight, LoadError> {
        let b = self.buffers[slot];
        let write = job.rw.is_write();
        let mut hdr = [0u8; 17];
        hdr[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        hdr[8..16].copy_from_slice(&(offset / SECTOR).to_le_bytes());
        hdr[16] = STATUS_UNSET;
        self.mem.write(b.meta, &hdr)?;
        let bs = job.block_size as usize;
        if write {
            if let Some(g) = job.write_generation {
                pattern::fill(&mut run.scratch[..bs], offset, g);
                self.mem.write(b.data, &run.scratch[..bs])?;
            }
        }
        run.readable.clear();
        run.writable.clear();
        run.readable.push((b.meta, 16));
        let data = if write {
            &mut run.readable
        } else {
            &mut run.writable
        };
        let seg = self.segment_size;
        let mut at = 0u32;
        while at < job.block_size {
            let n = seg.min(job.block_size - at);
            data.push((b.data + u64::from(at), n));
            at += n;
        }
        run.writable.push((b.meta + 16, 1));
        let head = self.ring.add(&self.mem, &run.readable, &run.writable)?;
        self.head_slot[usize::from(head)] = slot as u32;
        Ok(InFlight {
            offset,
            write,
            submitted: now,
        })
    }

    fn complete(
        &mut self,
        job: &Job,
        run: &mut Run,
        slot: usize,
        req: InFlight,
        now: Instant,
    ) -> Result<(), LoadError> {
        let b = self.buffers[slot];
        if let Some(iommu) = self.iommu.as_ref().filter(|i| i.config().strict) {
            iommu.unmap(b.data, u64::from(job.block_size))?;
        }
        let r = &mut run.report;
        r.latency
            .record(u64::try_from((now - req.submitted).as_nanos()).unwrap_or(u64::MAX));
        r.ios += 1;
        let mut status = [0u8; 1];
        self.mem.read(b.meta + 16, &mut status)?;
        if status[0] != 0 {
            r.io_errors += 1;
            r.first_io_error.get_or_insert(IoFailure {
                write: req.write,
                offset: req.offset,
                status: status[0],
            });
            return Ok(());
        }
        r.bytes += u64::from(job.block_size);
        let first = req.offset / SECTOR;
        let sectors = u64::from(job.block_size) / SECTOR;
        if req.write {
            if let Some(set) = r.written.as_mut() {
                (first..first + sectors).for_each(|s| set.insert(s));
            }
        } else if let Some(expect) = &job.check {
            let bs = job.block_size as usize;
            self.mem.read(b.data, &mut run.scratch[..bs])?;
            for (k, chunk) in run.scratch[..bs].chunks_exact(SECTOR as usize).enumerate() {
                let s = first + k as u64;
                r.checked_sectors += 1;
                if !pattern::matches(chunk, s * SECTOR, expect.generation(s)) {
                    r.bad_sectors += 1;
                    r.first_bad_offset.get_or_insert(s * SECTOR);
                }
            }
        }
        Ok(())
    }

    fn publish_and_kick(&mut self, run: &mut Run) -> Result<(), LoadError> {
        self.ring.publish(&self.mem)?;
        if self.ring.kick_needed(&self.mem)? {
            self.kick.write(1)?;
            run.report.kicks += 1;
        }
        Ok(())
    }

    /// Waits for used buffers: spins on the ring for `busy_poll`, then re-arms
    /// notifications (looking once more, the device may have finished meanwhile) and
    /// sleeps on the call eventfd.
    fn wait(&mut self, job: &Job, run: &mut Run) -> Result<Vec<(u16, u32)>, LoadError> {
        if !job.busy_poll.is_zero() {
            let until = Instant::now() + job.busy_poll;
            loop {
                let used = self.ring.poll_used(&self.mem)?;
                if !used.is_empty() {
                    return Ok(used);
                }
                if Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let silent_since = Instant::now();
        loop {
            self.notify_on = true;
            if !self.ring.set_used_notification(&self.mem, true)? {
                let left = job.timeout.saturating_sub(silent_since.elapsed());
                let slice = left.min(CHECK_EVERY);
                let ms = i32::try_from(slice.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
                if !self.sleep_on_call(ms)? {
                    if self.interrupted() {
                        return Err(LoadError::Interrupted);
                    }
                    if silent_since.elapsed() >= job.timeout {
                        return Err(LoadError::Timeout {
                            in_flight: self.ring.in_flight(),
                            timeout: job.timeout,
                        });
                    }
                    continue;
                }
                self.call.read()?;
                run.report.wakeups += 1;
            }
            let used = self.ring.poll_used(&self.mem)?;
            if !used.is_empty() {
                return Ok(used);
            }
        }
    }
}

impl BlkLoad {
    /// Sleeps up to `ms` on the call eventfd; true when it became readable. With a
    /// watched socket ([`BlkLoad::watch_hangup`]) a hang-up of the back-end ends the
    /// sleep with [`LoadError::Disconnected`]; a signal ends it early (false), so the
    /// caller asks its interrupt hook at once.
    fn sleep_on_call(&self, ms: i32) -> Result<bool, LoadError> {
        let Some(socket) = &self.hangup else {
            return Ok(poll_readable(self.call.as_fd(), ms)?);
        };
        let mut fds = [
            libc::pollfd {
                fd: self.call.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs naming fds this load owns.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(err.into());
        }
        let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        if fds[1].revents & gone != 0 {
            return Err(LoadError::Disconnected {
                in_flight: self.ring.in_flight(),
            });
        }
        Ok(fds[0].revents != 0)
    }
}

/// CPU time this thread has used (user and system): what the loop itself costs, apart
/// from the device sharing the CPU.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Scratch state of one run.
struct Run {
    report: Report,
    scratch: Vec<u8>,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    done: Vec<usize>,
}

impl Run {
    fn new(job: &Job) -> Self {
        let written = (job.track_writes && job.rw.is_write())
            .then(|| SectorSet::new(job.offset / SECTOR, job.size / SECTOR));
        Self {
            report: Report {
                written,
                ..Report::default()
            },
            scratch: vec![0; job.block_size as usize],
            readable: Vec::new(),
            writable: Vec::new(),
            done: Vec::new(),
        }
    }
}
