//! vhost-vsock (`/dev/vhost-vsock`): the host side of virtio-vsock. The guest's context id
//! is set first; `set_running(true)` starts moving packets on queues 0 (to the guest) and
//! 1 (from the guest).

use std::path::Path;

use super::abi;
use super::device::VhostDevice;
use super::error::Result;

/// The node the vhost_vsock module creates.
pub const DEFAULT_PATH: &str = "/dev/vhost-vsock";

/// `VHOST_VSOCK_SET_GUEST_CID`. The kernel refuses the reserved CIDs 0-2 and values above
/// `u32::MAX` (EINVAL), and a CID another device already has (EADDRINUSE).
pub fn set_guest_cid(dev: &VhostDevice, cid: u64) -> Result<()> {
    dev.set_u64(
        "VHOST_VSOCK_SET_GUEST_CID",
        abi::VHOST_VSOCK_SET_GUEST_CID,
        cid,
    )
}

/// `VHOST_VSOCK_SET_RUNNING` with 1 (start) or 0 (stop).
pub fn set_running(dev: &VhostDevice, running: bool) -> Result<()> {
    dev.set_i32(
        "VHOST_VSOCK_SET_RUNNING",
        abi::VHOST_VSOCK_SET_RUNNING,
        i32::from(running),
    )
}

/// Opens `/dev/vhost-vsock` (or `path`).
pub fn open(path: Option<&Path>) -> Result<VhostDevice> {
    VhostDevice::open(path.unwrap_or(Path::new(DEFAULT_PATH)))
}
