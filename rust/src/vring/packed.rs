//! Packed virtqueues (virtio 1.x, 2.8).

/// Device side of a packed ring (not yet implemented).
#[derive(Debug)]
pub struct PackedDevice {}

/// Driver side of a packed ring (not yet implemented).
#[derive(Debug)]
pub struct PackedDriver {}
