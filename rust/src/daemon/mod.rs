//! The back-end daemon framework (the role of rust-vmm's `vhost-user-backend`): the daemon
//! owns the vhost-user control plane, and a device only says what it is and processes
//! descriptor chains.
//!
//! ```text
//! Daemon::serve ── accept ──> BackendSession (validation, memory mapping)
//!                                  └─> DaemonHandler (features, rings, config, status)
//!                                          └─> one worker thread per queue:
//!                                              kick eventfd -> pop batch -> device.process
//!                                              -> add used -> call eventfd (suppressed)
//!                                              (with VHOST_F_LOG_ALL acked, every write
//!                                              into guest memory is marked in the
//!                                              migration dirty log: vring::RingLog)
//! ```
//!
//! A device talks back to the front-end being served (config-change notifications, shared
//! objects, shared memory mappings) through the daemon's [`FrontendLink`], which each
//! session attaches its back-end channel to; with `INBAND_NOTIFICATIONS` a ring without a
//! call fd is signalled with `VRING_CALL` on that channel.
//!
//! Data-plane threads never touch the interpreter: a device written in Python is reached
//! through a [`VirtioDevice`] adapter in the binding, which takes the GIL per batch.

mod device;
mod events;
mod handler;
mod inflight;
#[cfg(test)]
mod iommu_tests;
mod link;
mod postcopy;
mod queue;
mod runner;
mod server;
mod state;
#[cfg(test)]
mod tests;
mod vduse;

pub use device::{transport, DeviceError, VirtioDevice};
pub use events::{DaemonEvent, EventQueue, EventSink, SessionEnd};
pub use handler::{
    DaemonHandler, DAEMON_PROTOCOL_FEATURES, DEFAULT_IOTLB_MISS_TIMEOUT, MAX_MEM_SLOTS,
};
pub use inflight::{InflightArea, InflightQueue};
pub use link::{FrontendLink, LinkError};
pub use postcopy::{check_read_settled, FaultPolicy, DEFAULT_POSTCOPY_FAULT_TIMEOUT};
pub use runner::{DaemonRecipe, DaemonRunner, DaemonSettings, Mode, StartError};
pub use server::{Daemon, DaemonStats, Stopper, DEFAULT_STALL_TIMEOUT};
pub use state::{STATE_STALL_TIMEOUT, STATE_TRANSFER_TIMEOUT};
pub use vduse::{VduseTransport, ACCESS_PLATFORM};
