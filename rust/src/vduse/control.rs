//! `/dev/vduse/control`: the API version handshake, and creating and destroying devices.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::abi::{
    DevConfig, VDUSE_API_VERSION, VDUSE_CREATE_DEV, VDUSE_DESTROY_DEV, VDUSE_GET_API_VERSION,
    VDUSE_NAME_MAX, VDUSE_SET_API_VERSION,
};
use super::{Result, VduseError};

/// Where the control node lives.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// What `VDUSE_CREATE_DEV` is given: the device's identity, features, queues and config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The name: `/dev/vduse/NAME` and the name `vdpa dev add name X mgmtdev vduse` takes.
    pub name: String,
    /// virtio device id (2 = block).
    pub device_id: u32,
    /// virtio vendor id (0 is fine).
    pub vendor_id: u32,
    /// Every feature bit offered; VDUSE requires `VIRTIO_F_ACCESS_PLATFORM` (bit 33).
    pub features: u64,
    /// Number of virtqueues.
    pub queues: u32,
    /// Alignment of ring metadata (a page is the common choice).
    pub vq_align: u32,
    /// The whole configuration space.
    pub config: Vec<u8>,
}

/// Checks a device name the way the kernel will, but with an error that says why: not
/// empty, shorter than [`VDUSE_NAME_MAX`] (the NUL counts), no `/` and no NUL.
pub(crate) fn check_name(name: &str) -> Result<[u8; VDUSE_NAME_MAX]> {
    let bad = |why: String| VduseError::BadName {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty".into()));
    }
    if name.len() >= VDUSE_NAME_MAX {
        return Err(bad(format!(
            "{} bytes, the kernel takes at most {}",
            name.len(),
            VDUSE_NAME_MAX - 1
        )));
    }
    if name.contains('/') || name.contains('\0') || name == "control" || name == "." || name == ".."
    {
        return Err(bad(
            "names a path, not a device (no '/', NUL, '.', '..' or 'control')".into(),
        ));
    }
    let mut out = [0u8; VDUSE_NAME_MAX];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

/// `ioctl(fd, req, arg)`, naming `device` and `op` in the error.
pub(crate) fn ioctl<T>(
    fd: &OwnedFd,
    device: &str,
    op: &'static str,
    req: u64,
    arg: *mut T,
) -> Result<libc::c_int> {
    // SAFETY: every caller passes a request number whose encoded size and direction match
    // `T`, and `arg` points at a live, aligned `T` (or a buffer that starts with one and is
    // as long as the request reads or writes) for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if ret < 0 {
        Err(VduseError::last_os(device, op))
    } else {
        Ok(ret)
    }
}

/// An open `/dev/vduse/control` on which API version 0 was agreed.
#[derive(Debug)]
pub struct VduseControl {
    fd: OwnedFd,
    version: u64,
}

impl VduseControl {
    /// Opens [`CONTROL_PATH`] and agrees on API version 0 (what Linux 5.15 to 6.12 speak).
    pub fn open() -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => VduseError::NotAvailable {
                    path: CONTROL_PATH.into(),
                },
                _ => VduseError::Kernel {
                    device: "control".into(),
                    op: "open",
                    source: e,
                },
            })?;
        let fd = OwnedFd::from(file);
        let mut version = 0u64;
        ioctl(
            &fd,
            "control",
            "VDUSE_GET_API_VERSION",
            VDUSE_GET_API_VERSION,
            &mut version,
        )?;
        let mut ours = VDUSE_API_VERSION;
        ioctl(
            &fd,
            "control",
            "VDUSE_SET_API_VERSION",
            VDUSE_SET_API_VERSION,
            &mut ours,
        )?;
        Ok(VduseControl { fd, version })
    }

    /// The API version the kernel reported (it speaks 0 too once `open` returned).
    pub fn kernel_api_version(&self) -> u64 {
        self.version
    }

    /// `VDUSE_CREATE_DEV`: `/dev/vduse/NAME` appears. EEXIST becomes [`VduseError::Exists`],
    /// EINVAL for a type other than net, blk or fs [`VduseError::TypeRefused`]; otherwise
    /// EINVAL means the kernel refused the description (a device type it does not allow,
    /// features without `ACCESS_PLATFORM`, a config it cannot take).
    pub fn create(&self, spec: &DeviceSpec) -> Result<()> {
        let name = check_name(&spec.name)?;
        let config_size = u32::try_from(spec.config.len()).map_err(|_| VduseError::Invalid {
            device: spec.name.clone(),
            why: format!("configuration space of {} bytes", spec.config.len()),
        })?;
        let head = DevConfig {
            name,
            vendor_id: spec.vendor_id,
            device_id: spec.device_id,
            features: spec.features,
            vq_num: spec.queues,
            vq_align: spec.vq_align,
            reserved: [0; 13],
            config_size,
        };
        let head_len = std::mem::size_of::<DevConfig>();
        // u64 words: the kernel reads a DevConfig (8-aligned) then config_size bytes.
        let mut buf = vec![0u64; (head_len + spec.config.len()).div_ceil(8)];
        let bytes = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` holds at least head_len + config.len() bytes and is 8-aligned (u64
        // words), so a DevConfig fits at its start and the config right after it; the two
        // source values are live and do not overlap `buf`.
        unsafe {
            std::ptr::write(bytes.cast::<DevConfig>(), head);
            std::ptr::copy_nonoverlapping(
                spec.config.as_ptr(),
                bytes.add(head_len),
                spec.config.len(),
            );
        }
        ioctl(
            &self.fd,
            &spec.name,
            "VDUSE_CREATE_DEV",
            VDUSE_CREATE_DEV,
            bytes,
        )
        .map(drop)
        .map_err(|e| match e.errno() {
            Some(libc::EEXIST) => VduseError::Exists {
                name: spec.name.clone(),
            },
            // The kernel allows a few device types only; anything else is EINVAL.
            Some(libc::EINVAL) if !matches!(spec.device_id, 1 | 2 | 26) => {
                VduseError::TypeRefused {
                    device: spec.name.clone(),
                    device_id: spec.device_id,
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                }
            }
            _ => e,
        })
    }

    /// `VDUSE_DESTROY_DEV`. EBUSY (its node is open, or a vDPA device was made of it)
    /// becomes [`VduseError::InUse`]; ENOENT (no such device) an error naming it.
    pub fn destroy(&self, name: &str) -> Result<()> {
        let mut raw = check_name(name)?;
        ioctl(
            &self.fd,
            name,
            "VDUSE_DESTROY_DEV",
            VDUSE_DESTROY_DEV,
            raw.as_mut_ptr(),
        )
        .map(drop)
        .map_err(|e| match e.errno() {
            Some(libc::EBUSY) => VduseError::InUse { name: name.into() },
            _ => e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(check_name("vduse-blk0").is_ok());
        let max = "n".repeat(VDUSE_NAME_MAX - 1);
        assert_eq!(
            &check_name(&max).unwrap()[..VDUSE_NAME_MAX - 1],
            max.as_bytes()
        );
        let err = check_name(&"n".repeat(VDUSE_NAME_MAX))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("256 bytes, the kernel takes at most 255"),
            "{err}"
        );
        for bad in ["", "a/b", "a\0b", "control", ".."] {
            assert!(
                matches!(check_name(bad), Err(VduseError::BadName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_control_node_says_how_to_get_it() {
        if std::path::Path::new(CONTROL_PATH).exists() {
            return; // a host with VDUSE: the guest tests cover it
        }
        let err = VduseControl::open().unwrap_err();
        assert_eq!(
            err.to_string(),
            "VDUSE not available: /dev/vduse/control is missing (modprobe vduse)"
        );
    }
}
