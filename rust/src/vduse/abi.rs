//! The kernel's VDUSE ABI: ioctl request numbers and the `repr(C)` structs they carry, as
//! `linux/vduse.h` defines them (API version 0, Linux 5.15 to 6.12). Layout tests below pin
//! every struct's size, alignment and field offsets and every request number, so a mistake
//! here fails `cargo test` instead of corrupting an ioctl.

/// `VDUSE_BASE`: the ioctl "type" byte of every VDUSE request.
pub const VDUSE_BASE: u32 = 0x81;

/// The API version this crate speaks (`VDUSE_API_VERSION`).
pub const VDUSE_API_VERSION: u64 = 0;

/// Longest device name, NUL included (`VDUSE_NAME_MAX`).
pub const VDUSE_NAME_MAX: usize = 256;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// The `_IOC` encoding of the generic ioctl ABI (2 direction bits, 14 size bits, 8 type
/// bits, 8 number bits).
const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (VDUSE_BASE << 8) | nr) as u64
}
const fn io(nr: u32) -> u64 {
    ioc(IOC_NONE, nr, 0)
}
const fn ior<T>(nr: u32) -> u64 {
    ioc(IOC_READ, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> u64 {
    ioc(IOC_WRITE, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u32) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>())
}

/// The fixed part of `struct vduse_dev_config` (VDUSE_CREATE_DEV); `config_size` bytes of
/// configuration space follow it in the same buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevConfig {
    /// The device name, NUL terminated: `/dev/vduse/NAME` and the name `vdpa dev add` takes.
    pub name: [u8; VDUSE_NAME_MAX],
    /// virtio vendor id.
    pub vendor_id: u32,
    /// virtio device id (2 = block).
    pub device_id: u32,
    /// The virtio features offered (device and transport bits).
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of the rings' metadata.
    pub vq_align: u32,
    /// Zero.
    pub reserved: [u32; 13],
    /// Bytes of configuration space that follow.
    pub config_size: u32,
}

/// `struct vduse_iotlb_entry` (VDUSE_IOTLB_GET_FD): one IOVA range `[start, last]` and
/// where it lies in the returned fd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbEntry {
    /// Offset of `start` in the fd (what mmap takes).
    pub offset: u64,
    /// First IOVA of the range.
    pub start: u64,
    /// Last IOVA of the range (inclusive).
    pub last: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
}

/// The device may read the range.
pub const VDUSE_ACCESS_RO: u8 = 0x1;
/// The device may write the range.
pub const VDUSE_ACCESS_WO: u8 = 0x2;
/// The device may read and write the range.
pub const VDUSE_ACCESS_RW: u8 = 0x3;

/// The fixed head of `struct vduse_config_data` (VDUSE_DEV_SET_CONFIG); `length` bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigData {
    /// Where in configuration space.
    pub offset: u32,
    /// Bytes that follow.
    pub length: u32,
}

/// `struct vduse_vq_config` (VDUSE_VQ_SETUP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqConfig {
    /// The queue.
    pub index: u32,
    /// The largest size the driver may give it.
    pub max_size: u16,
    /// Zero.
    pub reserved: [u16; 13],
}

/// The queue-state union of `vduse_vq_info` and `vduse_vq_state`: split state is the first
/// `u16`; packed state uses all four. Kept as words because the kernel's union is 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqStateWords {
    /// Split: the avail index. Packed: `last_avail_counter`.
    pub w0: u16,
    /// Packed: `last_avail_idx`.
    pub w1: u16,
    /// Packed: `last_used_counter`.
    pub w2: u16,
    /// Packed: `last_used_idx`.
    pub w3: u16,
}

/// `struct vduse_vq_info` (VDUSE_VQ_GET_INFO): ring addresses (IOVAs) and state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqInfo {
    /// The queue (set by the caller).
    pub index: u32,
    /// The ring size the driver chose.
    pub num: u32,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the driver area (avail ring).
    pub driver_addr: u64,
    /// IOVA of the device area (used ring).
    pub device_addr: u64,
    /// Queue state (split: the avail index to start from).
    pub state: VqStateWords,
    /// Whether the driver made the queue ready.
    pub ready: u8,
}

/// `struct vduse_vq_eventfd` (VDUSE_VQ_SETUP_KICKFD).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqEventfd {
    /// The queue.
    pub index: u32,
    /// The eventfd, or [`VDUSE_EVENTFD_DEASSIGN`].
    pub fd: i32,
}

/// `fd` value that unbinds a queue's kick eventfd.
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

/// Request types read from the device fd (`enum vduse_req_type`).
pub const VDUSE_GET_VQ_STATE: u32 = 0;
/// The driver wrote the status byte.
pub const VDUSE_SET_STATUS: u32 = 1;
/// An IOVA range changed: mappings of it must be fetched again.
pub const VDUSE_UPDATE_IOTLB: u32 = 2;

/// `result` of a response: handled.
pub const VDUSE_REQ_RESULT_OK: u32 = 0x00;
/// `result` of a response: refused.
pub const VDUSE_REQ_RESULT_FAILED: u32 = 0x01;

/// Size of `struct vduse_dev_request` and of `struct vduse_dev_response`: 6 words of
/// header and a 128-byte union.
pub const MSG_SIZE: usize = 24 + 128;

// ---- control device (/dev/vduse/control) ------------------------------------------------
/// The API version the kernel speaks.
pub const VDUSE_GET_API_VERSION: u64 = ior::<u64>(0x00);
/// The API version this process speaks.
pub const VDUSE_SET_API_VERSION: u64 = iow::<u64>(0x01);
/// Creates `/dev/vduse/NAME` from a [`DevConfig`] and its configuration space.
pub const VDUSE_CREATE_DEV: u64 = iow::<DevConfig>(0x02);
/// Destroys a device by name (EBUSY while its fd is open or a vDPA device uses it).
pub const VDUSE_DESTROY_DEV: u64 = iow::<[u8; VDUSE_NAME_MAX]>(0x03);

// ---- device (/dev/vduse/NAME) -----------------------------------------------------------
/// The first mapping overlapping `[start, last]` and an fd to mmap it from.
pub const VDUSE_IOTLB_GET_FD: u64 = iowr::<IotlbEntry>(0x10);
/// The features the driver acked (valid once FEATURES_OK is set).
pub const VDUSE_DEV_GET_FEATURES: u64 = ior::<u64>(0x11);
/// Changes configuration space.
pub const VDUSE_DEV_SET_CONFIG: u64 = iow::<ConfigData>(0x12);
/// Tells the driver that configuration space changed.
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: u64 = io(0x13);
/// Sets a queue's largest size (every queue, before `vdpa dev add`).
pub const VDUSE_VQ_SETUP: u64 = iow::<VqConfig>(0x14);
/// A queue's addresses, size, state and readiness.
pub const VDUSE_VQ_GET_INFO: u64 = iowr::<VqInfo>(0x15);
/// Binds the eventfd the kernel signals when the driver kicks a queue.
pub const VDUSE_VQ_SETUP_KICKFD: u64 = iow::<VqEventfd>(0x16);
/// Interrupts the driver for a queue (the used ring moved).
pub const VDUSE_VQ_INJECT_IRQ: u64 = iow::<u32>(0x17);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!((size_of::<DevConfig>(), align_of::<DevConfig>()), (336, 8));
        assert_eq!(offset_of!(DevConfig, vendor_id), 256);
        assert_eq!(offset_of!(DevConfig, device_id), 260);
        assert_eq!(offset_of!(DevConfig, features), 264);
        assert_eq!(offset_of!(DevConfig, vq_num), 272);
        assert_eq!(offset_of!(DevConfig, vq_align), 276);
        assert_eq!(offset_of!(DevConfig, reserved), 280);
        assert_eq!(offset_of!(DevConfig, config_size), 332);
        assert_eq!((size_of::<IotlbEntry>(), align_of::<IotlbEntry>()), (32, 8));
        assert_eq!(offset_of!(IotlbEntry, start), 8);
        assert_eq!(offset_of!(IotlbEntry, last), 16);
        assert_eq!(offset_of!(IotlbEntry, perm), 24);
        assert_eq!(size_of::<ConfigData>(), 8);
        assert_eq!((size_of::<VqConfig>(), align_of::<VqConfig>()), (32, 4));
        assert_eq!(offset_of!(VqConfig, max_size), 4);
        assert_eq!((size_of::<VqInfo>(), align_of::<VqInfo>()), (48, 8));
        assert_eq!(offset_of!(VqInfo, num), 4);
        assert_eq!(offset_of!(VqInfo, desc_addr), 8);
        assert_eq!(offset_of!(VqInfo, driver_addr), 16);
        assert_eq!(offset_of!(VqInfo, device_addr), 24);
        assert_eq!(offset_of!(VqInfo, state), 32);
        assert_eq!(offset_of!(VqInfo, ready), 40);
        assert_eq!(size_of::<VqEventfd>(), 8);
        assert_eq!(MSG_SIZE, 152);
    }

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values computed by a C program from linux/vduse.h (6.1 headers, API version 0).
        assert_eq!(VDUSE_GET_API_VERSION, 0x8008_8100);
        assert_eq!(VDUSE_SET_API_VERSION, 0x4008_8101);
        assert_eq!(VDUSE_CREATE_DEV, 0x4150_8102);
        assert_eq!(VDUSE_DESTROY_DEV, 0x4100_8103);
        assert_eq!(VDUSE_IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(VDUSE_DEV_GET_FEATURES, 0x8008_8111);
        assert_eq!(VDUSE_DEV_SET_CONFIG, 0x4008_8112);
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ, 0x8113);
        assert_eq!(VDUSE_VQ_SETUP, 0x4020_8114);
        assert_eq!(VDUSE_VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VDUSE_VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, 0x4004_8117);
    }
}
