//! `/dev/vduse/NAME`: queue set-up, the request loop's reads and writes, queue info, kick
//! eventfds, interrupts, configuration space and IOTLB fds.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::abi::{
    ConfigData, IotlbEntry, VqConfig, VqEventfd, VqInfo, MSG_SIZE, VDUSE_DEV_GET_FEATURES,
    VDUSE_DEV_INJECT_CONFIG_IRQ, VDUSE_DEV_SET_CONFIG, VDUSE_EVENTFD_DEASSIGN, VDUSE_IOTLB_GET_FD,
    VDUSE_VQ_GET_INFO, VDUSE_VQ_INJECT_IRQ, VDUSE_VQ_SETUP, VDUSE_VQ_SETUP_KICKFD,
};
use super::control::{check_name, ioctl};
use super::request::{Request, Response};
use super::{Result, VduseError};
use crate::sys::poll::wait_fd;

/// An open `/dev/vduse/NAME`. Closing it (drop) lets `VDUSE_DESTROY_DEV` succeed.
#[derive(Debug)]
pub struct VduseDevice {
    name: String,
    fd: OwnedFd,
    queues: u32,
}

impl VduseDevice {
    /// Opens the node of device `name` (made by [`super::VduseControl::create`]) with
    /// `queues` queues, which every queue index given or received is checked against.
    pub fn open(name: &str, queues: u32) -> Result<Self> {
        check_name(name)?;
        let path = format!("/dev/vduse/{name}");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| VduseError::Kernel {
                device: name.into(),
                op: "open",
                source,
            })?;
        Ok(VduseDevice {
            name: name.into(),
            fd: OwnedFd::from(file),
            queues,
        })
    }

    /// A device around any fd (one end of a socketpair), so tests reach the request loop
    /// without a kernel.
    #[cfg(test)]
    pub(crate) fn from_fd(name: &str, fd: OwnedFd, queues: u32) -> Self {
        VduseDevice {
            name: name.into(),
            fd,
            queues,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its queue count.
    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// `Err(BadQueue)` unless `index` is one of the device's queues.
    pub fn check_queue(&self, what: &'static str, index: u32) -> Result<()> {
        if index < self.queues {
            Ok(())
        } else {
            Err(VduseError::BadQueue {
                device: self.name.clone(),
                what,
                queue: index,
                count: self.queues,
            })
        }
    }

    fn ioctl<T>(&self, op: &'static str, req: u64, arg: *mut T) -> Result<libc::c_int> {
        ioctl(&self.fd, &self.name, op, req, arg)
    }

    /// `VDUSE_VQ_SETUP`: queue `index` may be given up to `max_size` entries. Every queue
    /// must be set up before `vdpa dev add`.
    pub fn vq_setup(&self, index: u32, max_size: u16) -> Result<()> {
        self.check_queue("VDUSE_VQ_SETUP", index)?;
        if max_size == 0 {
            return Err(VduseError::Invalid {
                device: self.name.clone(),
                why: format!("VDUSE_VQ_SETUP: queue {index}: max size 0"),
            });
        }
        let mut c = VqConfig {
            index,
            max_size,
            reserved: [0; 13],
        };
        self.ioctl("VDUSE_VQ_SETUP", VDUSE_VQ_SETUP, &mut c)
            .map(drop)
    }

    /// Waits up to `timeout` (None: for ever) for a request and reads it; `Ok(None)` when
    /// none came. A request this crate cannot parse is an error naming the device.
    pub fn read_request(&self, timeout: Option<Duration>) -> Result<Option<Request>> {
        let ready = wait_fd(self.fd.as_fd(), libc::POLLIN, timeout).map_err(|source| {
            VduseError::Kernel {
                device: self.name.clone(),
                op: "poll",
                source,
            }
        })?;
        if !ready {
            return Ok(None);
        }
        let mut buf = [0u8; MSG_SIZE];
        let n = rustix::io::read(&self.fd, &mut buf).map_err(|e| VduseError::Kernel {
            device: self.name.clone(),
            op: "read",
            source: e.into(),
        })?;
        Request::parse(&buf[..n])
            .map(Some)
            .map_err(|why| VduseError::Malformed {
                device: self.name.clone(),
                why,
            })
    }

    /// Writes the answer to a request.
    pub fn write_response(&self, resp: &Response) -> Result<()> {
        let bytes = resp.encode();
        let n = rustix::io::write(&self.fd, &bytes).map_err(|e| VduseError::Kernel {
            device: self.name.clone(),
            op: "write",
            source: e.into(),
        })?;
        if n != bytes.len() {
            return Err(VduseError::Kernel {
                device: self.name.clone(),
                op: "write",
                source: io::Error::new(io::ErrorKind::WriteZero, "short write of a response"),
            });
        }
        Ok(())
    }

    /// `VDUSE_VQ_GET_INFO`: the ring the driver set up for queue `index` (IOVAs), its size,
    /// the avail index to start from and whether it is ready.
    pub fn vq_info(&self, index: u32) -> Result<VqInfo> {
        self.check_queue("VDUSE_VQ_GET_INFO", index)?;
        let mut info = VqInfo {
            index,
            ..VqInfo::default()
        };
        self.ioctl("VDUSE_VQ_GET_INFO", VDUSE_VQ_GET_INFO, &mut info)?;
        Ok(info)
    }

    /// Whether the kernel's device has queue `index` (VDUSE_VQ_GET_INFO without the
    /// check against this handle's count): tells how many queues a device this process
    /// did not create has.
    pub fn kernel_has_queue(&self, index: u32) -> Result<bool> {
        let mut info = VqInfo {
            index,
            ..VqInfo::default()
        };
        match self.ioctl("VDUSE_VQ_GET_INFO", VDUSE_VQ_GET_INFO, &mut info) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `VDUSE_VQ_SETUP_KICKFD`: the kernel signals `fd` when the driver kicks queue
    /// `index`; `None` unbinds it.
    pub fn set_kickfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.check_queue("VDUSE_VQ_SETUP_KICKFD", index)?;
        let mut e = VqEventfd {
            index,
            fd: fd.map_or(VDUSE_EVENTFD_DEASSIGN, |f| f.as_raw_fd()),
        };
        self.ioctl("VDUSE_VQ_SETUP_KICKFD", VDUSE_VQ_SETUP_KICKFD, &mut e)
            .map(drop)
    }

    /// `VDUSE_VQ_INJECT_IRQ`: interrupts the driver for queue `index` (VDUSE has no call
    /// eventfd: this ioctl is the notification).
    pub fn inject_irq(&self, index: u32) -> Result<()> {
        self.check_queue("VDUSE_VQ_INJECT_IRQ", index)?;
        let mut i = index;
        self.ioctl("VDUSE_VQ_INJECT_IRQ", VDUSE_VQ_INJECT_IRQ, &mut i)
            .map(drop)
    }

    /// `VDUSE_DEV_INJECT_CONFIG_IRQ`: tells the driver its configuration space changed.
    pub fn inject_config_irq(&self) -> Result<()> {
        // SAFETY: an `_IO` request reads no argument; 0 fills the unused slot.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                VDUSE_DEV_INJECT_CONFIG_IRQ as _,
                0usize,
            )
        };
        if ret < 0 {
            return Err(VduseError::last_os(
                &self.name,
                "VDUSE_DEV_INJECT_CONFIG_IRQ",
            ));
        }
        Ok(())
    }

    /// `VDUSE_DEV_GET_FEATURES`: the features the driver acked (after FEATURES_OK).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        self.ioctl("VDUSE_DEV_GET_FEATURES", VDUSE_DEV_GET_FEATURES, &mut f)?;
        Ok(f)
    }

    /// `VDUSE_DEV_SET_CONFIG`: writes `data` at `offset` of configuration space (the
    /// kernel refuses a range past the space it was created with: EINVAL).
    pub fn set_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        let length = u32::try_from(data.len())
            .ok()
            .filter(|l| offset.checked_add(*l).is_some())
            .ok_or_else(|| VduseError::Invalid {
                device: self.name.clone(),
                why: format!(
                    "VDUSE_DEV_SET_CONFIG: offset {offset} + {} bytes overflows",
                    data.len()
                ),
            })?;
        let head = std::mem::size_of::<ConfigData>();
        let mut buf = vec![0u64; (head + data.len()).div_ceil(8)];
        let bytes = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` holds head + data.len() bytes, 8-aligned: the header fits at its
        // start and the data right after it; `data` does not overlap `buf`.
        unsafe {
            std::ptr::write(bytes.cast::<ConfigData>(), ConfigData { offset, length });
            std::ptr::copy_nonoverlapping(data.as_ptr(), bytes.add(head), data.len());
        }
        self.ioctl("VDUSE_DEV_SET_CONFIG", VDUSE_DEV_SET_CONFIG, bytes)
            .map(drop)
    }

    /// `VDUSE_IOTLB_GET_FD`: the first mapping that overlaps `start..=last`, with an fd to
    /// mmap it from (at `entry.offset`); `Ok(None)` when nothing is mapped there (the
    /// kernel's EINVAL).
    pub fn iotlb_get_fd(&self, start: u64, last: u64) -> Result<Option<(IotlbEntry, OwnedFd)>> {
        let mut entry = IotlbEntry {
            start,
            last,
            ..IotlbEntry::default()
        };
        match self.ioctl("VDUSE_IOTLB_GET_FD", VDUSE_IOTLB_GET_FD, &mut entry) {
            Ok(fd) => {
                // SAFETY: on success the kernel installed a new fd for this process and
                // returned its number; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // The kernel installs it without FD_CLOEXEC: set it, so a child started
                // later does not inherit a handle on the device's memory (B8).
                rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| {
                    VduseError::Kernel {
                        device: self.name.clone(),
                        op: "F_SETFD on an IOTLB fd",
                        source: e.into(),
                    }
                })?;
                Ok(Some((entry, fd)))
            }
            Err(e) if e.errno() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsFd for VduseDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bad_queues_and_overflowing_config_are_refused_before_the_kernel() {
        let (ours, _kernel) = UnixStream::pair().expect("socketpair");
        let dev = VduseDevice::from_fd("t0", ours.into(), 2);
        assert_eq!(
            dev.inject_irq(2).unwrap_err().to_string(),
            "VDUSE device \"t0\": VDUSE_VQ_INJECT_IRQ: queue 2 does not exist (the device has 2)"
        );
        for err in [
            dev.vq_setup(7, 256).unwrap_err(),
            dev.vq_info(u32::MAX).unwrap_err(),
            dev.set_kickfd(2, None).unwrap_err(),
        ] {
            assert!(matches!(err, VduseError::BadQueue { .. }), "{err}");
        }
        let err = dev.vq_setup(0, 0).unwrap_err().to_string();
        assert!(err.contains("queue 0: max size 0"), "{err}");
        let err = dev.set_config(u32::MAX, &[0; 2]).unwrap_err().to_string();
        assert!(
            err.contains("offset 4294967295 + 2 bytes overflows"),
            "{err}"
        );
        // A file that is not a VDUSE device: the kernel's errno, with the request named.
        let err = dev.features().unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOTTY));
        assert!(err.to_string().contains("VDUSE_DEV_GET_FEATURES"), "{err}");
        let err = dev.iotlb_get_fd(0, u64::MAX).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOTTY));
    }
}
