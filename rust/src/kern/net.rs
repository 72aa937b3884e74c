//! vhost-net (`/dev/vhost-net`): the kernel's virtio-net data path, attached per queue to
//! a tap (or raw packet) socket with `VHOST_NET_SET_BACKEND`. Queue 0 is RX, 1 is TX.

use std::os::fd::BorrowedFd;
use std::path::Path;

use super::abi;
use super::device::VhostDevice;
use super::error::Result;

/// The node the vhost_net module creates.
pub const DEFAULT_PATH: &str = "/dev/vhost-net";

/// `VHOST_NET_SET_BACKEND`: attach queue `index` to `fd` (a tap or packet socket), or
/// detach it with `None`, which stops the queue.
pub fn set_backend(dev: &VhostDevice, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
    dev.file(
        "VHOST_NET_SET_BACKEND",
        abi::VHOST_NET_SET_BACKEND,
        index,
        fd,
    )
}

/// Opens `/dev/vhost-net` (or `path`).
pub fn open(path: Option<&Path>) -> Result<VhostDevice> {
    VhostDevice::open(path.unwrap_or(Path::new(DEFAULT_PATH)))
}
