//! Kernel vhost: the control plane of the in-kernel virtio back-ends, as ioctls on a vhost
//! character device. [`VhostDevice`] carries the requests every driver shares; [`net`] and
//! [`vsock`] the device-specific ones; [`iotlb`] the IOTLB messages written to and read
//! from the fd. vDPA (`crate::vdpa`) builds on the same device.

pub mod abi;
pub mod device;
pub mod error;
pub mod iotlb;
pub mod net;
pub mod vsock;

pub use device::VhostDevice;
pub use error::{Error, Result};
pub use iotlb::IotlbMessage;
