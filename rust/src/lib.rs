//! Rust core of pyvhost: the vhost control plane (vhost-user, kernel vhost, vDPA) and the
//! virtio data plane, as a plain Rust library with no Python in it.
//!
//! Layers, each calling only the one below: [`sys`] (syscall wrappers owning fds and
//! mappings) -> [`memory`] (guest RAM) -> [`user`] (the vhost-user protocol, both sides),
//! [`kern`] (kernel vhost ioctls) and [`vdpa`] (vhost-vdpa).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]

pub mod backend;
pub mod blkload;
pub mod daemon;
pub mod devices;
pub mod kern;
pub mod memory;
pub mod sys;
pub mod user;
pub mod vdpa;
pub mod vduse;
pub mod vring;

/// The error of the [`backend::VhostBackend`] interface: the failing family's own error,
/// kept whole (each layer keeps its enum; this only joins them so one trait can return one
/// `Result`). vDPA fails with the kernel layer's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vhost-user request failed.
    #[error(transparent)]
    User(#[from] user::Error),
    /// A kernel vhost or vDPA request failed.
    #[error(transparent)]
    Kern(#[from] kern::Error),
}

/// The result of a [`backend::VhostBackend`] call.
pub type Result<T> = std::result::Result<T, Error>;
