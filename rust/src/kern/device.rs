//! [`VhostDevice`]: an owned fd on a vhost character device and the ioctls every vhost
//! driver in the kernel shares (the seed's `VhostKernBackend` plus its `VhostBackend`
//! implementation). Each call is one ioctl; a failure keeps the kernel's errno.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::abi::{self, VringAddr, VringFile, VringState};
use super::error::{Error, Result};
use super::iotlb::{IotlbMessage, MSG_SIZE};
use crate::backend::{vhost_backend_by_inherent, LogRegion, MemoryRegion, VringAddrs};

/// The kernel's limit on `VHOST_SET_MEM_TABLE` is the `max_mem_regions` module parameter
/// (64 by default); this bound only keeps the buffer we build sane.
pub const MAX_MEM_REGIONS: usize = 4096;

/// An open vhost character device (`/dev/vhost-net`, `/dev/vhost-vsock`,
/// `/dev/vhost-vdpa-N`...). The fd is owned: it closes when the device is dropped, so no
/// call can reach a closed or recycled fd number (ADVERSARIAL I1).
#[derive(Debug)]
pub struct VhostDevice {
    fd: OwnedFd,
}

/// The fd number of an optional eventfd, -1 (`VHOST_FILE_UNBIND`) for none.
fn raw_or_unbind(fd: Option<BorrowedFd<'_>>) -> i32 {
    fd.map_or(-1, |f| f.as_raw_fd())
}

impl VhostDevice {
    /// Opens `path` read-write and close-on-exec, and checks that it answers
    /// `VHOST_GET_FEATURES`: a node that is not a vhost device fails here (ENOTTY), with
    /// its fd already closed.
    pub fn open(path: &Path) -> Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidParam("the device path contains a NUL byte".into()))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(Error::last_os("open"));
        }
        // SAFETY: `raw` was just returned by open, so it is open and owned by nobody else.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Adopts an open fd, probing it like [`open`](Self::open) does.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let dev = VhostDevice { fd };
        dev.get_features()?;
        Ok(dev)
    }

    /// A device around any fd, without the probe: lets tests reach the argument checks
    /// and the kernel's errno on a file that is not a vhost device.
    #[cfg(test)]
    pub(crate) fn unprobed(fd: OwnedFd) -> Self {
        VhostDevice { fd }
    }

    /// `ioctl(fd, req, arg)` with a pointer argument; `op` names the request in errors.
    fn ioctl<T>(&self, op: &'static str, req: u64, arg: *mut T) -> Result<libc::c_int> {
        // SAFETY: every caller passes a request number whose encoded size and direction
        // match `T`, and `arg` points at a live, properly aligned `T` (or a buffer that
        // starts with one and is as long as the request reads or writes) for the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg) };
        if ret < 0 {
            Err(Error::last_os(op))
        } else {
            Ok(ret)
        }
    }

    /// An ioctl with no argument (`_IO`).
    fn ioctl_none(&self, op: &'static str, req: u64) -> Result<()> {
        // SAFETY: `_IO` requests read no argument; 0 is passed for the unused slot.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, 0usize) };
        if ret < 0 {
            Err(Error::last_os(op))
        } else {
            Ok(())
        }
    }

    pub(crate) fn get_u64(&self, op: &'static str, req: u64) -> Result<u64> {
        let mut v = 0u64;
        self.ioctl(op, req, &mut v)?;
        Ok(v)
    }

    pub(crate) fn set_u64(&self, op: &'static str, req: u64, mut v: u64) -> Result<()> {
        self.ioctl(op, req, &mut v).map(drop)
    }

    pub(crate) fn get_u32(&self, op: &'static str, req: u64) -> Result<u32> {
        let mut v = 0u32;
        self.ioctl(op, req, &mut v)?;
        Ok(v)
    }

    pub(crate) fn set_i32(&self, op: &'static str, req: u64, mut v: i32) -> Result<()> {
        self.ioctl(op, req, &mut v).map(drop)
    }

    pub(crate) fn state(&self, op: &'static str, req: u64, index: u32, num: u32) -> Result<u32> {
        let mut s = VringState { index, num };
        self.ioctl(op, req, &mut s)?;
        Ok(s.num)
    }

    pub(crate) fn file(
        &self,
        op: &'static str,
        req: u64,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let mut f = VringFile {
            index,
            fd: raw_or_unbind(fd),
        };
        self.ioctl(op, req, &mut f).map(drop)
    }

    pub(crate) fn none(&self, op: &'static str, req: u64) -> Result<()> {
        self.ioctl_none(op, req)
    }

    /// An ioctl whose argument is one plain `T` the request reads or writes; the size
    /// encoded in `req` must be `T`'s.
    pub(crate) fn ioctl_ref<T: Copy>(&self, op: &'static str, req: u64, arg: &mut T) -> Result<()> {
        debug_assert_eq!(abi::ioc_size(req), std::mem::size_of::<T>(), "{op}");
        self.ioctl(op, req, arg).map(drop)
    }

    /// An ioctl on a variable-length buffer (a header followed by data). The kernel reads or
    /// writes as many bytes as the header announces, so callers write a header that fits
    /// `buf` (`vdpa::VhostVdpa::config_buffer` builds both together).
    pub(crate) fn ioctl_words(&self, op: &'static str, req: u64, buf: &mut [u64]) -> Result<()> {
        // The header is `{ u32 off; u32 len; }`: refuse a buffer too short for `len`.
        let Some(head) = buf.first().map(|w| w.to_ne_bytes()) else {
            return Err(Error::InvalidParam(format!("{op}: empty buffer")));
        };
        let len = u32::from_ne_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if 8 + len > buf.len() * 8 {
            return Err(Error::InvalidParam(format!("{op}: buffer too short")));
        }
        self.ioctl(op, req, buf.as_mut_ptr()).map(drop)
    }

    // ---- features and ownership ---------------------------------------------------------

    /// `VHOST_GET_FEATURES`: the virtio features the kernel device offers.
    pub fn get_features(&self) -> Result<u64> {
        self.get_u64("VHOST_GET_FEATURES", abi::VHOST_GET_FEATURES)
    }

    /// `VHOST_SET_FEATURES`: the subset acked, before the rings are set up.
    pub fn set_features(&self, features: u64) -> Result<()> {
        self.set_u64("VHOST_SET_FEATURES", abi::VHOST_SET_FEATURES, features)
    }

    /// `VHOST_SET_OWNER`: binds the device to this process (its memory and its worker thread);
    /// the memory and ring ioctls need it first.
    pub fn set_owner(&self) -> Result<()> {
        self.ioctl_none("VHOST_SET_OWNER", abi::VHOST_SET_OWNER)
    }

    /// `VHOST_RESET_OWNER`: releases the device so another owner (or this one, afresh) can take it.
    pub fn reset_owner(&self) -> Result<()> {
        self.ioctl_none("VHOST_RESET_OWNER", abi::VHOST_RESET_OWNER)
    }

    /// `VHOST_GET_BACKEND_FEATURES`: vhost's own features (IOTLB message v2, batching, ...).
    pub fn get_backend_features(&self) -> Result<u64> {
        self.get_u64(
            "VHOST_GET_BACKEND_FEATURES",
            abi::VHOST_GET_BACKEND_FEATURES,
        )
    }

    /// `VHOST_SET_BACKEND_FEATURES`: the subset of those to use.
    pub fn set_backend_features(&self, features: u64) -> Result<()> {
        self.set_u64(
            "VHOST_SET_BACKEND_FEATURES",
            abi::VHOST_SET_BACKEND_FEATURES,
            features,
        )
    }

    // ---- memory and logging --------------------------------------------------------------

    /// `VHOST_SET_MEM_TABLE`: each region's `userspace_addr` is an address in this
    /// process, where the kernel reads and writes guest memory on our behalf (the fd and
    /// `mmap_offset` are not used). An empty table is refused here (the kernel would
    /// accept it and then fault on every access).
    pub fn set_mem_table(&self, regions: &[MemoryRegion<'_>]) -> Result<()> {
        if regions.is_empty() {
            return Err(Error::InvalidParam("the memory table is empty".into()));
        }
        if regions.len() > MAX_MEM_REGIONS {
            return Err(Error::InvalidParam(format!(
                "{} memory regions is more than {MAX_MEM_REGIONS}",
                regions.len()
            )));
        }
        // u64 words give the buffer the 8-byte alignment of struct vhost_memory_region.
        let mut buf: Vec<u64> = Vec::with_capacity(1 + 4 * regions.len());
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(regions.len() as u32).to_ne_bytes());
        buf.push(u64::from_ne_bytes(head));
        for MemoryRegion { info: r, .. } in regions {
            buf.extend_from_slice(&[r.guest_phys_addr, r.memory_size, r.userspace_addr, 0]);
        }
        self.ioctl(
            "VHOST_SET_MEM_TABLE",
            abi::VHOST_SET_MEM_TABLE,
            buf.as_mut_ptr(),
        )
        .map(drop)
    }

    /// `VHOST_SET_LOG_BASE`: the address of the dirty log in this process.
    pub fn set_log_base(&self, base: u64) -> Result<()> {
        self.set_u64("VHOST_SET_LOG_BASE", abi::VHOST_SET_LOG_BASE, base)
    }

    /// `VHOST_SET_LOG_FD`: the eventfd signalled after log writes (`None` unbinds).
    pub fn set_log_fd(&self, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.set_i32("VHOST_SET_LOG_FD", abi::VHOST_SET_LOG_FD, raw_or_unbind(fd))
    }

    // ---- virtqueues ----------------------------------------------------------------------

    /// `VHOST_SET_VRING_NUM`: the queue's size.
    pub fn set_vring_num(&self, index: u32, num: u32) -> Result<()> {
        self.state("VHOST_SET_VRING_NUM", abi::VHOST_SET_VRING_NUM, index, num)
            .map(drop)
    }

    /// `VHOST_SET_VRING_ADDR`; the alignment rules are checked first (the kernel answers
    /// a misaligned ring with a bare EINVAL).
    pub fn set_vring_addr(&self, addrs: &VringAddrs) -> Result<()> {
        addrs
            .check()
            .map_err(|e| Error::InvalidParam(e.to_string()))?;
        let mut a = VringAddr {
            index: addrs.index,
            flags: addrs.flags,
            desc_user_addr: addrs.desc,
            used_user_addr: addrs.used,
            avail_user_addr: addrs.avail,
            log_guest_addr: addrs.log,
        };
        self.ioctl("VHOST_SET_VRING_ADDR", abi::VHOST_SET_VRING_ADDR, &mut a)
            .map(drop)
    }

    /// `VHOST_SET_VRING_BASE`: where the device resumes the ring (next avail index).
    pub fn set_vring_base(&self, index: u32, base: u32) -> Result<()> {
        self.state(
            "VHOST_SET_VRING_BASE",
            abi::VHOST_SET_VRING_BASE,
            index,
            base,
        )
        .map(drop)
    }

    /// `VHOST_GET_VRING_BASE`: the device's next avail index; stop the device first for a
    /// value that stays true (migration, reconnect).
    pub fn get_vring_base(&self, index: u32) -> Result<u32> {
        self.state("VHOST_GET_VRING_BASE", abi::VHOST_GET_VRING_BASE, index, 0)
    }

    /// `VHOST_SET_VRING_ENDIAN` (only kernels built with cross-endian support have it).
    pub fn set_vring_endian(&self, index: u32, big_endian: bool) -> Result<()> {
        let num = u32::from(big_endian);
        let op = "VHOST_SET_VRING_ENDIAN";
        self.state(op, abi::VHOST_SET_VRING_ENDIAN, index, num)
            .map(drop)
    }

    /// `VHOST_GET_VRING_ENDIAN`: whether a legacy ring is big-endian (kernels built with
    /// cross-endian support only).
    pub fn get_vring_endian(&self, index: u32) -> Result<bool> {
        let op = "VHOST_GET_VRING_ENDIAN";
        Ok(self.state(op, abi::VHOST_GET_VRING_ENDIAN, index, 0)? != 0)
    }

    /// `VHOST_SET_VRING_BUSYLOOP_TIMEOUT`: how long the worker polls before sleeping.
    pub fn set_vring_busyloop_timeout(&self, index: u32, usecs: u32) -> Result<()> {
        let op = "VHOST_SET_VRING_BUSYLOOP_TIMEOUT";
        self.state(op, abi::VHOST_SET_VRING_BUSYLOOP_TIMEOUT, index, usecs)
            .map(drop)
    }

    /// `VHOST_GET_VRING_BUSYLOOP_TIMEOUT`: the current busy-poll bound, in microseconds.
    pub fn get_vring_busyloop_timeout(&self, index: u32) -> Result<u32> {
        let op = "VHOST_GET_VRING_BUSYLOOP_TIMEOUT";
        self.state(op, abi::VHOST_GET_VRING_BUSYLOOP_TIMEOUT, index, 0)
    }

    /// `VHOST_SET_VRING_KICK`: the eventfd the driver signals; `None` detaches it.
    pub fn set_vring_kick(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.file("VHOST_SET_VRING_KICK", abi::VHOST_SET_VRING_KICK, index, fd)
    }

    /// `VHOST_SET_VRING_CALL`: the eventfd the device signals on used buffers; `None` detaches it.
    pub fn set_vring_call(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.file("VHOST_SET_VRING_CALL", abi::VHOST_SET_VRING_CALL, index, fd)
    }

    /// `VHOST_SET_VRING_ERR`: the eventfd the device signals when the ring is broken; `None`
    /// detaches it.
    pub fn set_vring_err(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.file("VHOST_SET_VRING_ERR", abi::VHOST_SET_VRING_ERR, index, fd)
    }

    // ---- IOTLB ---------------------------------------------------------------------------

    /// Writes one IOTLB message (`struct vhost_msg_v2`). The kernel reports any failure of
    /// the message itself as EFAULT.
    pub fn send_iotlb(&self, msg: &IotlbMessage) -> Result<()> {
        msg.check()?;
        let bytes = msg.encode();
        let op = "IOTLB message write";
        let n = loop {
            // SAFETY: `bytes` is a live buffer of MSG_SIZE bytes; write only reads it.
            let n = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast::<libc::c_void>(),
                    bytes.len(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(op, err));
            }
        };
        if n != MSG_SIZE {
            return Err(Error::ShortTransfer {
                op,
                got: n,
                want: MSG_SIZE,
            });
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) for a message from the kernel (an IOTLB
    /// miss or access failure) and decodes it; `None` on timeout.
    pub fn recv_iotlb(&self, timeout_ms: i32) -> Result<Option<IotlbMessage>> {
        let op = "IOTLB message read";
        if !crate::sys::poll_readable(self.fd.as_fd(), timeout_ms).map_err(|e| Error::io(op, e))? {
            return Ok(None);
        }
        let mut buf = [0u8; MSG_SIZE];
        // SAFETY: `buf` is a live, writable buffer of MSG_SIZE bytes.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(Error::last_os(op));
        }
        IotlbMessage::decode(&buf[..n as usize]).map(Some)
    }
}

vhost_backend_by_inherent!(
    /// The kernel's `VhostBackend`: each method is the inherent ioctl of the same name. The
    /// dirty log is an address in this process, so a shared-memory `region` is refused.
    VhostDevice {
    fn set_mem_table(&self, regions: &[MemoryRegion<'_>]) -> crate::Result<()> {
        Ok(VhostDevice::set_mem_table(self, regions)?)
    }
    fn set_log_base(&self, base: u64, region: Option<LogRegion<'_>>) -> crate::Result<()> {
        if region.is_some() {
            return Err(Error::InvalidParam(
                "kernel vhost logs to an address in this process: pass base, not a region".into(),
            )
            .into());
        }
        Ok(VhostDevice::set_log_base(self, base)?)
    }
    fn set_log_fd(&self, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        Ok(VhostDevice::set_log_fd(self, fd)?)
    }
});

impl AsFd for VhostDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for VhostDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::open_fd_count;

    fn errno_of<T: std::fmt::Debug>(r: Result<T>) -> i32 {
        r.unwrap_err().errno().expect("a kernel error")
    }

    #[test]
    fn a_node_that_is_not_vhost_is_refused_with_enotty_and_closed() {
        let before = open_fd_count();
        for _ in 0..50 {
            let e = VhostDevice::open(Path::new("/dev/null")).unwrap_err();
            assert_eq!(e.errno(), Some(libc::ENOTTY), "{e}");
            assert!(e.to_string().starts_with("VHOST_GET_FEATURES"), "{e}");
        }
        // Other tests open fds concurrently; a leak of 50 would still stand out.
        assert!(open_fd_count() < before + 10);
    }

    #[test]
    fn a_missing_node_is_enoent_and_a_pipe_is_enotty() {
        let e = VhostDevice::open(Path::new("/dev/vhost-does-not-exist")).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert_eq!(errno_of(VhostDevice::from_fd(r)), libc::ENOTTY);
    }

    #[test]
    fn arguments_the_abi_cannot_carry_are_refused_before_the_kernel() {
        // A device built around /dev/null skips the probe, to reach the pre-checks.
        let f = std::fs::File::open("/dev/null").unwrap();
        let dev = VhostDevice::unprobed(f.into());
        assert!(matches!(
            dev.set_mem_table(&[]),
            Err(Error::InvalidParam(_))
        ));
        let bad = VringAddrs {
            desc: 8,
            ..Default::default()
        };
        assert!(matches!(
            dev.set_vring_addr(&bad),
            Err(Error::InvalidParam(_))
        ));
        let mut m = IotlbMessage::update(0, 4096, 0, 0x7, 0);
        assert!(matches!(dev.send_iotlb(&m), Err(Error::InvalidParam(_))));
        m.perm = abi::VHOST_ACCESS_RW;
        m.kind = 0;
        assert!(matches!(dev.send_iotlb(&m), Err(Error::InvalidParam(_))));
        // And what does reach the kernel keeps its errno and names the request.
        let e = dev.set_vring_num(0, 256).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().starts_with("VHOST_SET_VRING_NUM: "), "{e}");
    }
}
