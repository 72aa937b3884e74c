//! The kernel's vhost ABI: ioctl request numbers and the `repr(C)` structs they carry, as
//! `linux/vhost.h` and `linux/vhost_types.h` (Linux 6.12) define them. Layout tests below
//! pin every struct's size, alignment and field offsets, so a mistake here fails
//! `cargo test` instead of corrupting an ioctl.

/// `VHOST_VIRTIO`: the ioctl "type" byte of every vhost request.
pub const VHOST_VIRTIO: u32 = 0xAF;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// The `_IOC` encoding of the generic ioctl ABI (x86, arm64, riscv: 2 direction bits,
/// 14 size bits, 8 type bits, 8 number bits).
const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (VHOST_VIRTIO << 8) | nr) as u64
}
/// The argument size encoded in a request number.
pub const fn ioc_size(req: u64) -> usize {
    ((req >> 16) & 0x3fff) as usize
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

/// `struct vhost_vring_state`: a queue index and a number (size, base, enable, group).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringState {
    /// The queue.
    pub index: u32,
    /// Size, base, enable flag, group or address space, by request.
    pub num: u32,
}

/// `struct vhost_vring_file`: a queue index and an fd (-1 unbinds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringFile {
    /// The queue.
    pub index: u32,
    /// The eventfd, or -1 to unbind.
    pub fd: i32,
}

/// `struct vhost_vring_addr`: ring addresses in the owner's address space (or IOVAs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddr {
    /// The queue.
    pub index: u32,
    /// `VHOST_VRING_F_LOG` to log used-ring writes.
    pub flags: u32,
    /// Descriptor table (split) or ring (packed).
    pub desc_user_addr: u64,
    /// Used ring (split) or device event area (packed).
    pub used_user_addr: u64,
    /// Avail ring (split) or driver event area (packed).
    pub avail_user_addr: u64,
    /// Guest-physical address of the used ring in the dirty log.
    pub log_guest_addr: u64,
}

/// `struct vhost_memory_region`: one guest range and where the owner has it mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Where the range starts for the guest.
    pub guest_phys_addr: u64,
    /// Its size in bytes.
    pub memory_size: u64,
    /// Where this process has it mapped.
    pub userspace_addr: u64,
    /// Unused; 0.
    pub flags_padding: u64,
}

/// The fixed head of `struct vhost_memory`; `nregions` regions follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryHeader {
    /// Regions that follow.
    pub nregions: u32,
    /// Unused; 0.
    pub padding: u32,
}

/// `struct vhost_iotlb_msg` (with its 6 bytes of tail padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// Address in this process (updates).
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub kind: u8,
}

/// `struct vhost_msg_v2`: what is written to and read from a vhost fd for the IOTLB.
/// The kernel's union is `iotlb` or 64 bytes of padding; `pad` keeps the full size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgV2 {
    /// `VHOST_IOTLB_MSG_V2`.
    pub kind: u32,
    /// Address space id (`VHOST_BACKEND_F_IOTLB_ASID`; 0 otherwise).
    pub asid: u32,
    /// The message.
    pub iotlb: IotlbMsg,
    /// The rest of the kernel's 64-byte union.
    pub pad: [u8; 64 - std::mem::size_of::<IotlbMsg>()],
}

/// The fixed head of `struct vhost_vdpa_config`; `len` bytes of `buf` follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VdpaConfigHeader {
    /// Where in config space.
    pub off: u32,
    /// Bytes that follow.
    pub len: u32,
}

/// `struct vhost_vdpa_iova_range`: the first and last IOVA the device can map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IovaRange {
    /// First IOVA the device can map.
    pub first: u64,
    /// Last IOVA it can map (inclusive).
    pub last: u64,
}

/// `VHOST_IOTLB_MSG_V2`, the `type` word of [`MsgV2`].
pub const VHOST_IOTLB_MSG_V2: u32 = 0x2;

/// Values of `IotlbMsg::kind`.
pub const VHOST_IOTLB_MISS: u8 = 1;
/// Map a range (front-end to kernel).
pub const VHOST_IOTLB_UPDATE: u8 = 2;
/// Unmap a range.
pub const VHOST_IOTLB_INVALIDATE: u8 = 3;
/// The device was refused access to a mapped range (kernel to front-end).
pub const VHOST_IOTLB_ACCESS_FAIL: u8 = 4;
/// Starts a batch of updates applied together (`VHOST_BACKEND_F_IOTLB_BATCH`).
pub const VHOST_IOTLB_BATCH_BEGIN: u8 = 5;
/// Ends the batch.
pub const VHOST_IOTLB_BATCH_END: u8 = 6;

/// Values of `IotlbMsg::perm`.
pub const VHOST_ACCESS_RO: u8 = 0x1;
/// The device may write.
pub const VHOST_ACCESS_WO: u8 = 0x2;
/// The device may read and write.
pub const VHOST_ACCESS_RW: u8 = 0x3;

/// Backend feature bits (`VHOST_SET_BACKEND_FEATURES`), as bit numbers.
pub const VHOST_BACKEND_F_IOTLB_MSG_V2: u32 = 0x1;
/// IOTLB updates may be batched (`VHOST_IOTLB_BATCH_BEGIN`/`END`).
pub const VHOST_BACKEND_F_IOTLB_BATCH: u32 = 0x2;
/// IOTLB messages carry an address space id.
pub const VHOST_BACKEND_F_IOTLB_ASID: u32 = 0x3;
/// `VHOST_VDPA_SUSPEND` is supported.
pub const VHOST_BACKEND_F_SUSPEND: u32 = 0x4;
/// `VHOST_VDPA_RESUME` is supported.
pub const VHOST_BACKEND_F_RESUME: u32 = 0x5;
/// Rings may be enabled after DRIVER_OK.
pub const VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK: u32 = 0x6;
/// Descriptor tables may live in their own address space.
pub const VHOST_BACKEND_F_DESC_ASID: u32 = 0x7;
/// IOTLB mappings survive a device reset.
pub const VHOST_BACKEND_F_IOTLB_PERSIST: u32 = 0x8;

/// Feature bits with a vhost meaning (`VHOST_F_LOG_ALL`, `VHOST_NET_F_VIRTIO_NET_HDR`).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// The device takes the virtio-net header itself (vhost-net).
pub const VHOST_NET_F_VIRTIO_NET_HDR: u32 = 27;

// ---- generic requests (every vhost device) ----------------------------------------------
/// The virtio features the device offers.
pub const VHOST_GET_FEATURES: u64 = ior::<u64>(0x00);
/// The features acked.
pub const VHOST_SET_FEATURES: u64 = iow::<u64>(0x00);
/// Binds the device to this process.
pub const VHOST_SET_OWNER: u64 = io(0x01);
/// Releases the device.
pub const VHOST_RESET_OWNER: u64 = io(0x02);
/// The memory table (`MemoryHeader` then the regions).
pub const VHOST_SET_MEM_TABLE: u64 = iow::<MemoryHeader>(0x03);
/// Where the dirty log bitmap is, in this process.
pub const VHOST_SET_LOG_BASE: u64 = iow::<u64>(0x04);
/// The eventfd the kernel signals after logging.
pub const VHOST_SET_LOG_FD: u64 = iow::<i32>(0x07);
/// A queue's size.
pub const VHOST_SET_VRING_NUM: u64 = iow::<VringState>(0x10);
/// A queue's ring addresses.
pub const VHOST_SET_VRING_ADDR: u64 = iow::<VringAddr>(0x11);
/// Where a queue resumes.
pub const VHOST_SET_VRING_BASE: u64 = iow::<VringState>(0x12);
/// A queue's next avail index.
pub const VHOST_GET_VRING_BASE: u64 = iowr::<VringState>(0x12);
/// A legacy queue's byte order.
pub const VHOST_SET_VRING_ENDIAN: u64 = iow::<VringState>(0x13);
/// A legacy queue's byte order, read back.
pub const VHOST_GET_VRING_ENDIAN: u64 = iow::<VringState>(0x14);
/// The eventfd the driver kicks a queue with.
pub const VHOST_SET_VRING_KICK: u64 = iow::<VringFile>(0x20);
/// The eventfd the kernel signals used buffers on.
pub const VHOST_SET_VRING_CALL: u64 = iow::<VringFile>(0x21);
/// The eventfd the kernel signals a broken ring on.
pub const VHOST_SET_VRING_ERR: u64 = iow::<VringFile>(0x22);
/// How long the worker polls a queue before sleeping, in microseconds.
pub const VHOST_SET_VRING_BUSYLOOP_TIMEOUT: u64 = iow::<VringState>(0x23);
/// The busy-poll bound, read back.
pub const VHOST_GET_VRING_BUSYLOOP_TIMEOUT: u64 = iow::<VringState>(0x24);
/// The vhost backend features acked.
pub const VHOST_SET_BACKEND_FEATURES: u64 = iow::<u64>(0x25);
/// The vhost backend features offered.
pub const VHOST_GET_BACKEND_FEATURES: u64 = ior::<u64>(0x26);

// ---- vhost-net and vhost-vsock -----------------------------------------------------------
/// The tap or packet socket behind a queue of vhost-net (-1 detaches).
pub const VHOST_NET_SET_BACKEND: u64 = iow::<VringFile>(0x30);
/// The guest's context id (vhost-vsock).
pub const VHOST_VSOCK_SET_GUEST_CID: u64 = iow::<u64>(0x60);
/// Starts or stops vhost-vsock.
pub const VHOST_VSOCK_SET_RUNNING: u64 = iow::<i32>(0x61);

// ---- vhost-vdpa --------------------------------------------------------------------------
/// The virtio device type.
pub const VHOST_VDPA_GET_DEVICE_ID: u64 = ior::<u32>(0x70);
/// The virtio device status byte.
pub const VHOST_VDPA_GET_STATUS: u64 = ior::<u8>(0x71);
/// Sets the status byte (0 resets).
pub const VHOST_VDPA_SET_STATUS: u64 = iow::<u8>(0x72);
/// Reads config space (`VdpaConfigHeader` then the bytes).
pub const VHOST_VDPA_GET_CONFIG: u64 = ior::<VdpaConfigHeader>(0x73);
/// Writes config space.
pub const VHOST_VDPA_SET_CONFIG: u64 = iow::<VdpaConfigHeader>(0x74);
/// Enables or disables a queue.
pub const VHOST_VDPA_SET_VRING_ENABLE: u64 = iow::<VringState>(0x75);
/// The largest queue size the device takes.
pub const VHOST_VDPA_GET_VRING_NUM: u64 = ior::<u16>(0x76);
/// The eventfd signalled on config changes.
pub const VHOST_VDPA_SET_CONFIG_CALL: u64 = iow::<i32>(0x77);
/// The IOVA range the device can map.
pub const VHOST_VDPA_GET_IOVA_RANGE: u64 = ior::<IovaRange>(0x78);
/// Config space size.
pub const VHOST_VDPA_GET_CONFIG_SIZE: u64 = ior::<u32>(0x79);
/// Address spaces the device supports.
pub const VHOST_VDPA_GET_AS_NUM: u64 = ior::<u32>(0x7A);
/// The virtqueue group a queue belongs to.
pub const VHOST_VDPA_GET_VRING_GROUP: u64 = iowr::<VringState>(0x7B);
/// Assigns an address space to a group.
pub const VHOST_VDPA_SET_GROUP_ASID: u64 = iow::<VringState>(0x7C);
/// Suspends the device (`VHOST_BACKEND_F_SUSPEND`).
pub const VHOST_VDPA_SUSPEND: u64 = io(0x7D);
/// Resumes it (`VHOST_BACKEND_F_RESUME`).
pub const VHOST_VDPA_RESUME: u64 = io(0x7E);
/// The group of a queue's descriptor table (`VHOST_BACKEND_F_DESC_ASID`).
pub const VHOST_VDPA_GET_VRING_DESC_GROUP: u64 = iowr::<VringState>(0x7F);
/// Queues the device has.
pub const VHOST_VDPA_GET_VQS_COUNT: u64 = ior::<u32>(0x80);
/// Virtqueue groups the device has.
pub const VHOST_VDPA_GET_GROUP_NUM: u64 = ior::<u32>(0x81);
/// A queue's maximum size.
pub const VHOST_VDPA_GET_VRING_SIZE: u64 = iowr::<VringState>(0x82);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!((size_of::<VringState>(), align_of::<VringState>()), (8, 4));
        assert_eq!((size_of::<VringFile>(), align_of::<VringFile>()), (8, 4));
        assert_eq!(offset_of!(VringFile, fd), 4);
        assert_eq!((size_of::<VringAddr>(), align_of::<VringAddr>()), (40, 8));
        assert_eq!(offset_of!(VringAddr, desc_user_addr), 8);
        assert_eq!(offset_of!(VringAddr, used_user_addr), 16);
        assert_eq!(offset_of!(VringAddr, avail_user_addr), 24);
        assert_eq!(offset_of!(VringAddr, log_guest_addr), 32);
        assert_eq!(
            (size_of::<MemoryRegion>(), align_of::<MemoryRegion>()),
            (32, 8)
        );
        assert_eq!(offset_of!(MemoryRegion, userspace_addr), 16);
        assert_eq!(
            (size_of::<MemoryHeader>(), align_of::<MemoryHeader>()),
            (8, 4)
        );
        assert_eq!((size_of::<IotlbMsg>(), align_of::<IotlbMsg>()), (32, 8));
        assert_eq!(offset_of!(IotlbMsg, perm), 24);
        assert_eq!(offset_of!(IotlbMsg, kind), 25);
        assert_eq!((size_of::<MsgV2>(), align_of::<MsgV2>()), (72, 8));
        assert_eq!(offset_of!(MsgV2, asid), 4);
        assert_eq!(offset_of!(MsgV2, iotlb), 8);
        assert_eq!(
            (
                size_of::<VdpaConfigHeader>(),
                align_of::<VdpaConfigHeader>()
            ),
            (8, 4)
        );
        assert_eq!((size_of::<IovaRange>(), align_of::<IovaRange>()), (16, 8));
    }

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values computed by the C preprocessor from linux/vhost.h on x86_64.
        assert_eq!(VHOST_GET_FEATURES, 0x8008_af00);
        assert_eq!(VHOST_SET_FEATURES, 0x4008_af00);
        assert_eq!(VHOST_SET_OWNER, 0xaf01);
        assert_eq!(VHOST_RESET_OWNER, 0xaf02);
        assert_eq!(VHOST_SET_MEM_TABLE, 0x4008_af03);
        assert_eq!(VHOST_SET_LOG_BASE, 0x4008_af04);
        assert_eq!(VHOST_SET_LOG_FD, 0x4004_af07);
        assert_eq!(VHOST_SET_VRING_NUM, 0x4008_af10);
        assert_eq!(VHOST_SET_VRING_ADDR, 0x4028_af11);
        assert_eq!(VHOST_SET_VRING_BASE, 0x4008_af12);
        assert_eq!(VHOST_GET_VRING_BASE, 0xc008_af12);
        assert_eq!(VHOST_SET_VRING_KICK, 0x4008_af20);
        assert_eq!(VHOST_SET_VRING_CALL, 0x4008_af21);
        assert_eq!(VHOST_SET_VRING_ERR, 0x4008_af22);
        assert_eq!(VHOST_SET_BACKEND_FEATURES, 0x4008_af25);
        assert_eq!(VHOST_GET_BACKEND_FEATURES, 0x8008_af26);
        assert_eq!(VHOST_NET_SET_BACKEND, 0x4008_af30);
        assert_eq!(VHOST_VSOCK_SET_GUEST_CID, 0x4008_af60);
        assert_eq!(VHOST_VSOCK_SET_RUNNING, 0x4004_af61);
        assert_eq!(VHOST_VDPA_GET_DEVICE_ID, 0x8004_af70);
        assert_eq!(VHOST_VDPA_GET_STATUS, 0x8001_af71);
        assert_eq!(VHOST_VDPA_SET_STATUS, 0x4001_af72);
        assert_eq!(VHOST_VDPA_GET_CONFIG, 0x8008_af73);
        assert_eq!(VHOST_VDPA_SET_CONFIG, 0x4008_af74);
        assert_eq!(VHOST_VDPA_SET_VRING_ENABLE, 0x4008_af75);
        assert_eq!(VHOST_VDPA_GET_VRING_NUM, 0x8002_af76);
        assert_eq!(VHOST_VDPA_SET_CONFIG_CALL, 0x4004_af77);
        assert_eq!(VHOST_VDPA_GET_IOVA_RANGE, 0x8010_af78);
        assert_eq!(VHOST_VDPA_GET_CONFIG_SIZE, 0x8004_af79);
        assert_eq!(VHOST_VDPA_GET_AS_NUM, 0x8004_af7a);
        assert_eq!(VHOST_VDPA_GET_VRING_GROUP, 0xc008_af7b);
        assert_eq!(VHOST_VDPA_SET_GROUP_ASID, 0x4008_af7c);
        assert_eq!(VHOST_VDPA_SUSPEND, 0xaf7d);
        assert_eq!(VHOST_VDPA_RESUME, 0xaf7e);
        assert_eq!(VHOST_VDPA_GET_VRING_DESC_GROUP, 0xc008_af7f);
        assert_eq!(VHOST_VDPA_GET_VQS_COUNT, 0x8004_af80);
        assert_eq!(VHOST_VDPA_GET_GROUP_NUM, 0x8004_af81);
        assert_eq!(VHOST_VDPA_GET_VRING_SIZE, 0xc008_af82);
    }
}
