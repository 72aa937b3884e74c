//! virtio-blk over a file or a RAM image (a memfd), served by the daemon.
//!
//! Data moves between the image and guest memory with one `preadv`/`pwritev` per request,
//! straight into the guest's buffers: no bounce copy. Every request is checked against the
//! capacity, the read-only flag and the segment limits before it touches the image, and a
//! bad request gets `VIRTIO_BLK_S_IOERR` or `UNSUPP` rather than an error that would stop
//! the queue.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::image::{Image, ImageError, Locking};
use crate::daemon::{DeviceError, FaultPolicy, FrontendLink, LinkError, VirtioDevice};
use crate::memory::{Access, GuestMemory};
use crate::sys::memfd_create;
use crate::vring::{DescriptorChain, Segment};

/// Bytes in a sector: the unit of request offsets and of the capacity field, whatever the
/// image's block size.
pub const SECTOR: u64 = 512;
/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;

/// Request types (virtio 1.2, 5.2.6).
mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Feature bits.
pub mod feature {
    /// VIRTIO_BLK_F_SEG_MAX: the config's `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// VIRTIO_BLK_F_RO: the disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// VIRTIO_BLK_F_BLK_SIZE: the config's `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// VIRTIO_BLK_F_FLUSH: the FLUSH request is honoured.
    pub const FLUSH: u64 = 1 << 9;
    /// VIRTIO_BLK_F_MQ: the config's `num_queues` is valid.
    pub const MQ: u64 = 1 << 12;
    /// VIRTIO_BLK_F_DISCARD: the DISCARD request is honoured.
    pub const DISCARD: u64 = 1 << 13;
    /// VIRTIO_BLK_F_WRITE_ZEROES: the WRITE_ZEROES request is honoured.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

const ID_BYTES: usize = 20;
const HEADER: usize = 16;
/// One discard/write-zeroes range: sector u64, num_sectors u32, flags u32.
const RANGE: usize = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Largest discard / write-zeroes request, in sectors and in ranges.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEGS: u32 = 16;

/// How the device presents itself.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Request queues offered (the config's `num_queues`).
    pub num_queues: u16,
    /// The largest queue size the front-end may set.
    pub queue_size: u16,
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// The serial number GET_ID returns (at most 20 bytes).
    pub serial: String,
}

impl BlkConfig {
    /// Why this configuration cannot be served, if it cannot: a caller (the CLI, the
    /// Python glue) checks it before opening the image, so a bad argument is reported as
    /// such and not as an I/O failure.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.num_queues == 0 || self.queue_size < 3 {
            return Err("a block device needs at least one queue of at least 3 entries");
        }
        if self.serial.len() > ID_BYTES {
            return Err("the serial is at most 20 bytes");
        }
        Ok(())
    }
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            readonly: false,
            serial: "pyvhost".into(),
        }
    }
}

/// The native virtio-blk device over a raw image: what `serve blk` runs, with no Python on the
/// request path.
#[derive(Debug)]
pub struct BlkDevice {
    image: File,
    /// In sectors. Read once per request and per GET_CONFIG, so each sees one whole value
    /// while a resize changes it; only [`resize`](BlkDevice::resize) stores it.
    capacity: AtomicU64,
    cfg: BlkConfig,
    /// A RAM image has nothing to flush.
    sync_on_flush: bool,
    /// One resize at a time (grow the file, then publish the capacity).
    resizing: Mutex<()>,
    /// The front-end a resize is announced to (set by the daemon).
    frontend: Mutex<Option<FrontendLink>>,
}

/// What [`BlkDevice::resize`] did, in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    /// Capacity before.
    pub old: u64,
    /// Capacity after.
    pub new: u64,
    /// Whether the front-end being served was told (CONFIG_CHANGE_MSG) and took it; when
    /// `old == new` nothing is sent and this is false.
    pub notified: bool,
}

/// Why a disk was not resized (the capacity is then unchanged).
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The new size is smaller than the disk: a running guest would lose the sectors past
    /// the new end from under its file systems, so a disk only grows.
    #[error(
        "the new size ({new} sectors) is smaller than the disk ({old} sectors); \
         a disk is only grown, never shrunk under a guest"
    )]
    Shrink {
        /// Capacity now.
        old: u64,
        /// The smaller capacity asked for.
        new: u64,
    },
    /// An explicit size that is not whole sectors.
    #[error("{0} bytes is not a multiple of 512")]
    Unaligned(u64),
    /// An explicit size larger than the image of a read-only disk, which is never written.
    #[error("cannot grow the image file to {0} bytes: the disk is served read-only")]
    ReadOnly(u64),
    /// Growing the file to an explicit size needs a writable regular file (or a RAM disk).
    #[error("cannot grow the image file to {bytes} bytes: {source}")]
    Grow {
        /// The size asked for.
        bytes: u64,
        /// Why the file could not grow.
        source: io::Error,
    },
    /// The image's size could not be read.
    #[error("cannot read the image's size: {0}")]
    Size(io::Error),
    /// The disk was resized but the front-end could not be told: it sees the new size
    /// only once it reads the config space again (a device reset, a new session).
    #[error("resized from {old} to {new} sectors, but the front-end was not told: {source}")]
    Notify {
        /// Capacity before.
        old: u64,
        /// Capacity after (in effect for requests already).
        new: u64,
        /// Why the front-end could not be told.
        source: LinkError,
    },
}

/// The size of an image file or block device, in bytes (`st_size` is 0 for a device).
fn image_size(image: &File) -> io::Result<u64> {
    let mut f = image;
    f.seek(SeekFrom::End(0))
}

impl BlkDevice {
    /// Serves `image`; its size is rounded down to whole sectors.
    pub fn new(image: File, cfg: BlkConfig) -> io::Result<Self> {
        cfg.check()
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        let capacity = image_size(&image)? / SECTOR;
        Ok(BlkDevice {
            image,
            capacity: AtomicU64::new(capacity),
            cfg,
            sync_on_flush: true,
            resizing: Mutex::new(()),
            frontend: Mutex::new(None),
        })
    }

    /// Serves the raw image at `path`, checked and locked by [`Image::open`].
    pub fn open(path: &Path, cfg: BlkConfig, locking: Locking) -> Result<Self, ImageError> {
        let image = Image::open(path, cfg.readonly, locking)?;
        Self::new(image.into_file(), cfg).map_err(|source| ImageError::Open {
            path: path.into(),
            source,
        })
    }

    /// A zero-filled RAM disk of `bytes` (a memfd, so it behaves like a file).
    pub fn ram(bytes: u64, cfg: BlkConfig) -> io::Result<Self> {
        let file = File::from(memfd_create("pyvhost-ramdisk", bytes)?);
        let mut dev = Self::new(file, cfg)?;
        dev.sync_on_flush = false;
        Ok(dev)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Grows the disk while it is served and tells the front-end (CONFIG_CHANGE_MSG), so a
    /// guest sees the new capacity without a reboot. `bytes` None takes the image's size
    /// now (after it was grown on the host: `truncate -s +1G`, `qemu-img resize`, a grown
    /// block device); `Some` grows the file (or RAM disk) to that size first. The size is
    /// rounded down to whole sectors. Shrinking is refused: the sectors past the new end
    /// would vanish under the guest's file systems. Requests see either the old capacity
    /// or the new one, never a mix; a resize with no front-end connected, or one that did
    /// not set up the back-end channel, is kept for the next GET_CONFIG and reported as
    /// [`ResizeError::Notify`] in the second case.
    pub fn resize(&self, bytes: Option<u64>) -> Result<Resized, ResizeError> {
        let _one = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.capacity();
        let new = match bytes {
            None => image_size(&self.image).map_err(ResizeError::Size)? / SECTOR,
            Some(b) if b % SECTOR != 0 => return Err(ResizeError::Unaligned(b)),
            Some(b) => b / SECTOR,
        };
        if new < old {
            return Err(ResizeError::Shrink { old, new });
        }
        if new == old {
            return Ok(Resized {
                old,
                new,
                notified: false,
            });
        }
        if let Some(b) = bytes {
            self.grow_file(b)?;
        }
        self.capacity.store(new, Ordering::Release);
        let link = self
            .frontend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let notified = match link {
            None => false,
            Some(link) => match link.config_changed() {
                Ok(()) => true,
                Err(LinkError::NoFrontend { .. }) => false,
                Err(source) => return Err(ResizeError::Notify { old, new, source }),
            },
        };
        Ok(Resized { old, new, notified })
    }

    /// Makes the image file `bytes` long (never shorter), for an explicit resize.
    fn grow_file(&self, bytes: u64) -> Result<(), ResizeError> {
        if image_size(&self.image).map_err(ResizeError::Size)? >= bytes {
            return Ok(());
        }
        if self.cfg.readonly {
            return Err(ResizeError::ReadOnly(bytes));
        }
        self.image
            .set_len(bytes)
            .map_err(|source| ResizeError::Grow { bytes, source })
    }

    /// The image file requests are served from.
    pub fn image(&self) -> &File {
        &self.image
    }

    fn handle(&self, mem: &GuestMemory, chain: &DescriptorChain) -> Result<u32, DeviceError> {
        // The status byte is the last writable byte; a chain without one cannot even be
        // told it failed, so it is completed with nothing written.
        let Some(status_at) = last_writable_byte(chain) else {
            return Ok(0);
        };
        let mut head = [0u8; HEADER];
        let readable = chain.readable_len() as usize;
        let (status, written) = if readable < HEADER {
            (status::IOERR, 0)
        } else if read_prefix(mem, chain, &mut head).is_err() {
            // The header cannot be read (behind a vIOMMU: a hole the IOMMU side never
            // filled within the miss bound): the request fails, and says so if it can.
            (status::IOERR, 0)
        } else {
            let kind = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let sector = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8]));
            self.execute(mem, chain, kind, sector)
        };
        mem.write(status_at, &[status])
            .map_err(|e| DeviceError::Queue(e.into()))?;
        Ok(written + 1)
    }

    /// Runs one request; returns the status and the data bytes written into the chain.
    fn execute(
        &self,
        mem: &GuestMemory,
        chain: &DescriptorChain,
        kind: u32,
        sector: u64,
    ) -> (u8, u32) {
        let data_in = chain.writable_len().saturating_sub(1);
        let data_out = chain.readable_len() - HEADER as u32;
        let r = match kind {
            req::IN => self
                .check_range(sector, u64::from(data_in))
                .and_then(|off| self.transfer_in(mem, chain, off, data_in))
                .map(|()| data_in),
            req::OUT if self.cfg.readonly => Err(status::IOERR),
            req::OUT => self
                .check_range(sector, u64::from(data_out))
                .and_then(|off| self.transfer_out(mem, chain, off, data_out))
                .map(|()| 0),
            req::FLUSH => self.flush().map(|()| 0),
            req::GET_ID => {
                let mut id = [0u8; ID_BYTES];
                id[..self.cfg.serial.len()].copy_from_slice(self.cfg.serial.as_bytes());
                let n = (data_in as usize).min(ID_BYTES);
                write_data(mem, chain, &id[..n])
                    .map(|()| n as u32)
                    .map_err(|_| status::IOERR)
            }
            req::DISCARD | req::WRITE_ZEROES if self.cfg.readonly => Err(status::IOERR),
            req::DISCARD | req::WRITE_ZEROES => self.ranges(mem, chain, kind).map(|()| 0),
            _ => Err(status::UNSUPP),
        };
        match r {
            Ok(n) => (status::OK, n),
            Err(s) => (s, 0),
        }
    }

    /// The byte offset of a request of `len` bytes at `sector`, if it fits the capacity.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, u8> {
        if len % SECTOR != 0 {
            return Err(status::IOERR);
        }
        let end = sector.checked_add(len / SECTOR).ok_or(status::IOERR)?;
        if end > self.capacity() {
            return Err(status::IOERR);
        }
        Ok(sector * SECTOR)
    }

    fn transfer_in(
        &self,
        mem: &GuestMemory,
        chain: &DescriptorChain,
        off: u64,
        len: u32,
    ) -> Result<(), u8> {
        let iov = data_iovecs(mem, chain.writable(), 0, len).map_err(|_| status::IOERR)?;
        settle_postcopy(&iov)?;
        io_vectored(&self.image, &iov, off, false)
    }

    fn transfer_out(
        &self,
        mem: &GuestMemory,
        chain: &DescriptorChain,
        off: u64,
        len: u32,
    ) -> Result<(), u8> {
        let iov =
            data_iovecs(mem, chain.readable(), HEADER as u32, len).map_err(|_| status::IOERR)?;
        settle_postcopy(&iov)?;
        io_vectored(&self.image, &iov, off, true)
    }

    fn flush(&self) -> Result<(), u8> {
        if self.sync_on_flush {
            self.image.sync_data().map_err(|_| status::IOERR)?;
        }
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: a list of ranges after the header.
    fn ranges(&self, mem: &GuestMemory, chain: &DescriptorChain, kind: u32) -> Result<(), u8> {
        let body = chain.readable_len() as usize - HEADER;
        if body == 0 || body % RANGE != 0 || body / RANGE > MAX_DISCARD_SEGS as usize {
            return Err(status::IOERR);
        }
        let mut all = vec![0u8; HEADER + body];
        read_prefix(mem, chain, &mut all).map_err(|_| status::IOERR)?;
        for r in all[HEADER..].chunks_exact(RANGE) {
            let sector = u64::from_le_bytes(r[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u32::from_le_bytes(r[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(r[12..16].try_into().unwrap_or([0; 4]));
            if sectors > MAX_DISCARD_SECTORS || flags & !WRITE_ZEROES_UNMAP != 0 {
                return Err(status::UNSUPP);
            }
            if kind == req::DISCARD && flags != 0 {
                return Err(status::UNSUPP);
            }
            let off = self.check_range(sector, u64::from(sectors) * SECTOR)?;
            let len = u64::from(sectors) * SECTOR;
            // Both leave the range reading as zeros; discard may as well free the space.
            punch_zeroes(&self.image, off, len).map_err(|_| status::IOERR)?;
        }
        Ok(())
    }
}

/// Copies the first `out.len()` readable bytes of `chain` into `out`.
fn read_prefix(
    mem: &GuestMemory,
    chain: &DescriptorChain,
    out: &mut [u8],
) -> Result<(), DeviceError> {
    let mut at = 0;
    for s in chain.readable() {
        if at == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - at);
        mem.read(s.addr, &mut out[at..at + n])
            .map_err(|e| DeviceError::Queue(e.into()))?;
        at += n;
    }
    Ok(())
}

/// Writes `data` into the writable bytes of `chain` (before the status byte).
fn write_data(mem: &GuestMemory, chain: &DescriptorChain, data: &[u8]) -> Result<(), DeviceError> {
    let mut at = 0;
    for s in chain.writable() {
        if at == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        mem.write(s.addr, &data[at..at + n])
            .map_err(|e| DeviceError::Queue(e.into()))?;
        at += n;
    }
    Ok(())
}

/// Guest address of the last writable byte: where the status goes.
fn last_writable_byte(chain: &DescriptorChain) -> Option<u64> {
    chain
        .writable()
        .last()
        .map(|s| s.addr + u64::from(s.len) - 1)
}

/// Host iovecs for `len` bytes of `segments`, skipping the first `skip` bytes; the pieces
/// point into guest memory, which `mem` keeps mapped while the caller holds it.
fn data_iovecs<'a>(
    mem: &GuestMemory,
    segments: impl Iterator<Item = &'a Segment>,
    mut skip: u32,
    len: u32,
) -> Result<Vec<libc::iovec>, DeviceError> {
    let mut iov = Vec::new();
    let mut left = len;
    for s in segments {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(left);
        // A reply goes into device-writable segments: an IOTLB mapping must allow it.
        let access = if s.writable {
            Access::Write
        } else {
            Access::Read
        };
        mem.for_each_chunk(
            s.addr + u64::from(skip),
            n as usize,
            access,
            |host, _, piece| {
                iov.push(libc::iovec {
                    iov_base: host.cast(),
                    iov_len: piece,
                });
            },
        )
        .map_err(|e| DeviceError::Queue(e.into()))?;
        left -= n;
        skip = 0;
    }
    Ok(iov)
}

/// Postcopy (`daemon::postcopy`): while it listens, a data page may not have arrived yet.
/// The pages are touched here, in user mode, before the kernel copies them (a fault is
/// taken here and waits for the front-end); then, if postcopy failed meanwhile (a fault
/// not resolved within the session's bound, or the front-end gone), the memory was
/// unregistered and a page that never came reads as zeros: the request fails with
/// `IOERR` instead, and nothing reaches the image or the buffers.
fn settle_postcopy(iov: &[libc::iovec]) -> Result<(), u8> {
    match FaultPolicy::current() {
        FaultPolicy::Off => return Ok(()),
        FaultPolicy::Failed => return Err(status::IOERR),
        FaultPolicy::Listening => {}
    }
    const PAGE: usize = 4096;
    for v in iov {
        let start = v.iov_base as usize;
        let end = start + v.iov_len;
        let mut at = start;
        while at < end {
            // SAFETY: `at` lies within an iovec that points into a live guest mapping
            // (data_iovecs built it from the chain, and the caller's GuestMemory keeps it
            // mapped); a volatile one-byte read of shared memory, whatever its value.
            unsafe { std::ptr::read_volatile(at as *const u8) };
            at = (at & !(PAGE - 1)) + PAGE;
        }
    }
    match FaultPolicy::current() {
        FaultPolicy::Failed => Err(status::IOERR),
        _ => Ok(()),
    }
}

/// preadv/pwritev of the whole vector at `off`, continuing after short transfers. A read
/// past the end of the file (which the capacity check excludes) fills nothing: an error.
fn io_vectored(file: &File, iov: &[libc::iovec], mut off: u64, write: bool) -> Result<(), u8> {
    let mut iov = iov.to_vec();
    let mut start = 0;
    while start < iov.len() {
        let count = (iov.len() - start).min(1024) as libc::c_int;
        let off_t = libc::off_t::try_from(off).map_err(|_| status::IOERR)?;
        // SAFETY: every iovec points into a live guest mapping held by the caller's
        // GuestMemory for `iov_len` bytes (for_each_chunk checked them); the kernel reads
        // or writes exactly those bytes.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iov[start..].as_ptr(), count, off_t)
            } else {
                libc::preadv(file.as_raw_fd(), iov[start..].as_ptr(), count, off_t)
            }
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(status::IOERR);
        }
        if n == 0 {
            return Err(status::IOERR);
        }
        let mut n = n as usize;
        off += n as u64;
        while n > 0 && start < iov.len() {
            let cur = &mut iov[start];
            if n >= cur.iov_len {
                n -= cur.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing within the same iovec, by less than its length.
                cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(n).cast() };
                cur.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Makes [off, off+len) read as zeros, freeing the space where the file system can.
fn punch_zeroes(file: &File, off: u64, len: u64) -> io::Result<()> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate takes no pointers; the fd is open for the borrow.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // No hole punching here (some file systems): write zeros instead.
    let zeros = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off + at)?;
        at += n as u64;
    }
    Ok(())
}

/// Ring size a front-end uses unless told otherwise: QEMU's vhost-user-blk `queue-size`.
pub const DEFAULT_FRONTEND_RING: u16 = 128;

/// `seg_max`: data segments per request, so that a request (header, segments, status) is
/// a chain no longer than the ring, indirect tables included (virtio; the rings refuse a
/// longer one). The guest reads it before any ring size is set, so it must fit the ring a
/// front-end uses by default as well as `queue_size`, the largest this device accepts: a
/// Linux guest sends requests of seg_max + 2 descriptors through indirect tables.
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(
        queue_size
            .min(DEFAULT_FRONTEND_RING)
            .saturating_sub(2)
            .max(1),
    )
}

/// struct virtio_blk_config, up to and including the write-zeroes fields.
fn config_space(capacity: u64, cfg: &BlkConfig) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[12..16].copy_from_slice(&seg_max(cfg.queue_size).to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    c[34..36].copy_from_slice(&cfg.num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEGS.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEGS.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for BlkDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn num_queues(&self) -> u16 {
        self.cfg.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH | feature::MQ;
        if self.cfg.readonly {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        config_space(self.capacity(), &self.cfg)
    }

    fn attach_frontend(&self, link: FrontendLink) {
        *self.frontend.lock().unwrap_or_else(|p| p.into_inner()) = Some(link);
    }

    fn process(
        &self,
        _queue: u16,
        mem: &GuestMemory,
        chains: Vec<DescriptorChain>,
        done: &mut Vec<(u16, u32)>,
    ) -> Result<(), DeviceError> {
        for chain in &chains {
            let written = self.handle(mem, chain)?;
            done.push((chain.head, written));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_cannot_be_served_says_why() {
        assert_eq!(BlkConfig::default().check(), Ok(()));
        let no_queue = BlkConfig {
            num_queues: 0,
            ..BlkConfig::default()
        };
        assert!(no_queue.check().unwrap_err().contains("at least one queue"));
        let tiny = BlkConfig {
            queue_size: 2,
            ..BlkConfig::default()
        };
        assert!(tiny.check().is_err());
        let long = BlkConfig {
            serial: "x".repeat(21),
            ..BlkConfig::default()
        };
        assert_eq!(long.check(), Err("the serial is at most 20 bytes"));
        let err = BlkDevice::ram(4096, long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn seg_max_fits_the_default_frontend_ring_and_ours() {
        // The default --queue-size 256 once advertised 254 segments: a Linux guest on
        // QEMU's 128-entry ring then sent 256-descriptor requests the ring refused.
        assert_eq!(seg_max(256), 126);
        assert_eq!(seg_max(1024), 126);
        assert_eq!(seg_max(128), 126);
        assert_eq!(seg_max(64), 62);
        assert_eq!(seg_max(3), 1);
        let cfg = BlkConfig::default();
        let space = config_space(8, &cfg);
        assert_eq!(u32::from_le_bytes(space[12..16].try_into().unwrap()), 126);
    }
}
