//! What a device tells the daemon, and how it processes requests.

use std::io;

use crate::memory::dirty_log::DirtyLogError;
use crate::memory::GuestMemory;
use crate::vring::{DescriptorChain, VringError};

use super::link::FrontendLink;

/// virtio transport features every daemon device gets unless it masks them out
/// ([`VirtioDevice::transport_features`]).
pub mod transport {
    pub use crate::vring::features::{
        ACCESS_PLATFORM, EVENT_IDX, INDIRECT_DESC, RING_PACKED, VERSION_1,
    };
    /// What a device offers unless it masks some out: all four, the daemon's rings handle each.
    pub const DEFAULT: u64 = INDIRECT_DESC | EVENT_IDX | VERSION_1 | RING_PACKED;
}

/// Why a device could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device does not implement this request (named).
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// The request's arguments are wrong for this device (what and why, in words).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A queue refused the ring (corrupt, full or broken).
    #[error(transparent)]
    Queue(#[from] VringError),
    /// The device's backing I/O failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A write could not be marked in the migration dirty log (it does not cover the
    /// address): the migration would lose that page.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// A device written in Python raised; the text is the exception.
    #[error("device failed: {0}")]
    Failed(String),
}

/// A virtio device served by the daemon. The daemon owns the whole control plane; a device
/// only describes itself and turns descriptor chains into completions.
///
/// `process` runs on the queue's worker thread, so a device with several queues is called
/// from several threads at once (hence `Sync`).
pub trait VirtioDevice: Send + Sync {
    /// virtio device id (2 = block, 4 = entropy source, ...).
    fn device_type(&self) -> u32;
    /// How many queues the device has; the front-end may not use more.
    fn num_queues(&self) -> u16;
    /// The largest queue size the device takes (1024 unless the device says otherwise).
    fn max_queue_size(&self) -> u16 {
        1024
    }
    /// Device-specific feature bits (the daemon adds the transport ones).
    fn features(&self) -> u64;
    /// Transport features this device accepts (mask out e.g. RING_PACKED).
    fn transport_features(&self) -> u64 {
        transport::DEFAULT
    }
    /// Extra vhost-user protocol features (the daemon's own set is always offered).
    fn protocol_features(&self) -> u64 {
        0
    }
    /// The front-end acked these protocol features (`SET_PROTOCOL_FEATURES`): what the
    /// device may now use, e.g. the back-end channel only once `BACKEND_REQ` is acked.
    fn set_acked_protocol_features(&self, features: u64) {
        let _ = features;
    }
    /// The device's VIRTIO Shared Memory Regions as `(shmid, size in bytes)`, each id
    /// once. Declaring any makes the daemon offer `SHMEM` and answer `GET_SHMEM_CONFIG`
    /// (the front-end then sizes the regions it exposes to the guest); none by default.
    fn shmem_regions(&self) -> Vec<(u8, u64)> {
        Vec::new()
    }
    /// The whole device configuration space.
    fn config(&self) -> Vec<u8>;
    /// SET_CONFIG at `offset`: refused unless the device has writable config fields.
    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        let _ = (offset, data);
        Err(DeviceError::Unsupported("SET_CONFIG"))
    }
    /// The front-end acked these features (device and transport bits).
    fn set_acked_features(&self, features: u64) {
        let _ = features;
    }
    /// The front-end went away or reset the device.
    fn reset(&self) {}
    /// The device's internal state for live migration (`SET_DEVICE_STATE_FD`, save):
    /// whatever the destination's [`load_state`](Self::load_state) needs for the driver
    /// to go on as if nothing happened, beyond the rings and guest memory the front-end
    /// migrates itself. Called on a transfer thread with every ring stopped. The default
    /// is a stateless device: empty state.
    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        Ok(Vec::new())
    }
    /// Restores what [`save_state`](Self::save_state) produced on the source (`load`),
    /// before the rings start; on error the device should keep its previous state. The
    /// default (stateless) accepts only empty state: anything else was saved by a device
    /// with state this one would silently lose.
    fn load_state(&self, state: &[u8]) -> Result<(), DeviceError> {
        if state.is_empty() {
            return Ok(());
        }
        Err(DeviceError::Invalid(format!(
            "this device is stateless, but {} bytes of device state were sent",
            state.len()
        )))
    }
    /// The daemon's link to whichever front-end it serves, given once when the daemon is
    /// made: keep it to send config-change notifications, shared objects and shared
    /// memory mappings (see [`FrontendLink`]). Devices that never talk back ignore it.
    fn attach_frontend(&self, link: FrontendLink) {
        let _ = link;
    }
    /// Handles one batch popped from `queue`: pushes `(head, bytes written)` into `done`
    /// for each chain completed. Chains left out are completed by the daemon with 0 bytes,
    /// so a device error never strands the driver's buffers.
    fn process(
        &self,
        queue: u16,
        mem: &GuestMemory,
        chains: Vec<DescriptorChain>,
        done: &mut Vec<(u16, u32)>,
    ) -> Result<(), DeviceError>;
}
