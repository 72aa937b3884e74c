//! Message bodies: every fixed layout of the vhost-user spec, in host byte order.
//!
//! Each type has `SIZE` (or a documented variable layout), `to_bytes` and `from_bytes`.
//! `from_bytes` enforces the exact size (a short body and a body with trailing bytes are
//! both rejected, ADVERSARIAL A5) and the field rules that hold whatever the session
//! state is: zero sizes, `checked_add` on every range (C2, C9, H3, H4), reserved bits
//! (B5), overlapping regions (C4), config bounds (G1). Rules that need session state
//! (queue count, negotiated features, page size) belong to the caller.
//!
//! Padding is written as zeros and ignored on input: the spec never says it must be
//! zero, and QEMU zero-fills it anyway.
//!
//! Layout notes (checked against QEMU's `hw/virtio/vhost-user.c` and the spec):
//! - `InflightDesc` is 24 bytes: QEMU sends `sizeof(VhostUserInflight)`, a plain C struct
//!   of two u64 and two u16, so 20 bytes of fields plus 4 of tail padding.
//! - `IotlbPayload` is 32 bytes: `struct vhost_iotlb_msg` is three u64 and two u8, padded
//!   to 32 by its alignment, and QEMU sends `sizeof` of it.
//! - `ShmemMapPayload` is 40 bytes (`VhostUserMMap`: u8 shmid, 7 padding, four u64).
//! - `ShmemConfig` is 2056 bytes (`VhostUserShMemConfig`: u32 count, u32 padding, 256 u64).

use super::codes::{MAX_CONFIG_SIZE, MAX_MEM_TABLE_REGIONS};
use super::header::MAX_BODY_SIZE;
use super::layout::{exact, size_error, wire_struct, Field, Reader, Writer};
use super::{Error, Result};
use crate::backend::VringAddrs;

fn invalid(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::InvalidParam(format!("{what}: {msg}"))
}

/// `start + len` as an exclusive end, or `None` if it does not fit in a u64.
fn end_of(start: u64, len: u64) -> Option<u64> {
    start.checked_add(len)
}

wire_struct! {
    /// A single u64 (features, status, MTU, acks).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct U64Payload: "u64" (u64);
}

wire_struct! {
    /// `struct vhost_vring_state`: a ring index and a number (size, base, enable, endian).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct VringState: "vring state" {
        /// The queue index.
        index: u32,
        /// Size, base, enable flag or endianness, by request.
        num: u32,
    }
}

/// `struct vhost_vring_addr`: index, flags, then the descriptor, used, available and log
/// addresses (that order on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddrPayload(pub VringAddrs);

impl VringAddrPayload {
    /// The body's exact size on the wire.
    pub const SIZE: usize = 40;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let a = &self.0;
        Writer::with_capacity(Self::SIZE)
            .u32(a.index)
            .u32(a.flags)
            .u64(a.desc)
            .u64(a.used)
            .u64(a.avail)
            .u64(a.log)
            .done()
    }

    /// Also runs [`VringAddrs::check`] (unknown flags, alignment; ADVERSARIAL D3).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = exact("vring address", b, Self::SIZE)?;
        let a = VringAddrs {
            index: r.u32(),
            flags: r.u32(),
            desc: r.u64(),
            used: r.u64(),
            avail: r.u64(),
            log: r.u64(),
        };
        a.check().map_err(|e| invalid("vring address", e))?;
        Ok(VringAddrPayload(a))
    }
}

wire_struct! {
    /// One memory region: guest-physical base, size, front-end virtual base, and the offset
    /// of the region in its fd.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MemRegion: "memory region" {
        /// Where the region starts for the guest.
        guest_phys_addr: u64,
        /// Its size in bytes.
        memory_size: u64,
        /// Where the front-end mapped it (ring addresses are given in this space).
        userspace_addr: u64,
        /// Where it starts in its fd.
        mmap_offset: u64,
    }
    /// Then [`MemRegion::check`].
    check: MemRegion::check
}

impl MemRegion {
    /// Size not 0; guest, user and file ranges all end inside the u64 space (C2).
    pub fn check(&self) -> Result<()> {
        if self.memory_size == 0 {
            return Err(invalid("memory region", "size 0"));
        }
        for (name, start) in [
            ("guest_phys_addr", self.guest_phys_addr),
            ("userspace_addr", self.userspace_addr),
            ("mmap_offset", self.mmap_offset),
        ] {
            if end_of(start, self.memory_size).is_none() {
                return Err(invalid(
                    "memory region",
                    format_args!("{name} {start:#x} + size {:#x} overflows", self.memory_size),
                ));
            }
        }
        Ok(())
    }

    /// Exclusive end of the guest-physical range (saturating; exact after `check`).
    pub fn gpa_end(&self) -> u64 {
        self.guest_phys_addr.saturating_add(self.memory_size)
    }

    /// Exclusive end of the front-end virtual range (saturating; exact after `check`).
    pub fn user_end(&self) -> u64 {
        self.userspace_addr.saturating_add(self.memory_size)
    }

    /// Whether the two regions share a guest-physical or a front-end virtual byte.
    pub fn overlaps(&self, other: &MemRegion) -> bool {
        let gpa = self.guest_phys_addr < other.gpa_end() && other.guest_phys_addr < self.gpa_end();
        let user = self.userspace_addr < other.user_end() && other.userspace_addr < self.user_end();
        gpa || user
    }
}

/// The `SET_MEM_TABLE` body: u32 count, u32 padding, then `count` regions. Variable
/// length: exactly `HEADER_SIZE + count * MemRegion::SIZE` bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemTable {
    /// The regions, in the order their fds came.
    pub regions: Vec<MemRegion>,
}

impl MemTable {
    /// Count and padding.
    pub const HEADER_SIZE: usize = 8;
    /// With [`MAX_MEM_TABLE_REGIONS`] regions (1032 bytes, within `MAX_BODY_SIZE`).
    pub const MAX_SIZE: usize = Self::HEADER_SIZE + MAX_MEM_TABLE_REGIONS * MemRegion::SIZE;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.regions.len();
        let mut w = Writer::with_capacity(Self::HEADER_SIZE + n * MemRegion::SIZE)
            .u32(u32::try_from(n).unwrap_or(u32::MAX))
            .u32(0);
        for r in &self.regions {
            w = w.field(r);
        }
        w.done()
    }

    /// Count 1..=[`MAX_MEM_TABLE_REGIONS`] (C1), exact size, every region valid (C2), no
    /// two regions overlapping in guest-physical or in front-end virtual space (C4).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        const WHAT: &str = "memory table";
        if b.len() < Self::HEADER_SIZE {
            return Err(size_error(WHAT, "8 + 32 * regions", b.len()));
        }
        let mut r = Reader { rest: b };
        let n = r.u32() as usize;
        r.skip(4);
        if n == 0 || n > MAX_MEM_TABLE_REGIONS {
            return Err(invalid(
                WHAT,
                format_args!("{n} regions, expected 1..={MAX_MEM_TABLE_REGIONS}"),
            ));
        }
        let want = Self::HEADER_SIZE + n * MemRegion::SIZE;
        if b.len() != want {
            return Err(size_error(WHAT, want, b.len()));
        }
        let table = MemTable {
            regions: (0..n).map(|_| r.field()).collect(),
        };
        table.check()?;
        Ok(table)
    }

    /// The rules of `from_bytes` applied to a table built locally.
    pub fn check(&self) -> Result<()> {
        let n = self.regions.len();
        if n == 0 || n > MAX_MEM_TABLE_REGIONS {
            return Err(invalid(
                "memory table",
                format_args!("{n} regions, expected 1..={MAX_MEM_TABLE_REGIONS}"),
            ));
        }
        for region in &self.regions {
            region.check()?;
        }
        for (i, a) in self.regions.iter().enumerate() {
            for (j, b) in self.regions.iter().enumerate().skip(i + 1) {
                if a.overlaps(b) {
                    return Err(invalid(
                        "memory table",
                        format_args!("regions {i} and {j} overlap"),
                    ));
                }
            }
        }
        Ok(())
    }
}

const _: () = assert!(MemTable::MAX_SIZE <= MAX_BODY_SIZE);

/// The `ADD_MEM_REG` / `REM_MEM_REG` body: u64 padding, then one region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SingleMemRegion {
    /// The region added or removed.
    pub region: MemRegion,
}

impl SingleMemRegion {
    /// The body's exact size on the wire.
    pub const SIZE: usize = 8 + MemRegion::SIZE;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u64(0)
            .field(&self.region)
            .done()
    }

    /// Decodes a received body; any other size is refused, naming the payload.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = exact("single memory region", b, Self::SIZE)?;
        r.skip(8);
        let region: MemRegion = r.field();
        region.check()?;
        Ok(SingleMemRegion { region })
    }
}

wire_struct! {
    /// The `SET_LOG_BASE` body: size and offset of the dirty log in the attached fd.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LogDesc: "log description" {
        /// The log's size in bytes.
        mmap_size: u64,
        /// Where the log starts in the fd.
        mmap_offset: u64,
    }
    /// Then the size must not be 0 and offset + size must not overflow (C9).
    check: LogDesc::rules
}

impl LogDesc {
    /// The rules of `from_bytes`: size not 0; offset + size does not overflow (C9).
    fn rules(&self) -> Result<()> {
        if self.mmap_size == 0 {
            return Err(invalid("log description", "size 0"));
        }
        if end_of(self.mmap_offset, self.mmap_size).is_none() {
            return Err(invalid("log description", "offset + size overflows"));
        }
        Ok(())
    }
}

wire_struct! {
    /// The `GET_INFLIGHT_FD` / `SET_INFLIGHT_FD` body (`VhostUserInflight`).
    ///
    /// 24 bytes on the wire: the fields take 20 and QEMU sends `sizeof` of the C struct,
    /// whose alignment adds 4 bytes of tail padding; rust-vmm and DPDK agree. A 20-byte body
    /// is rejected.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct InflightDesc: "inflight description" {
        /// The area's size in bytes (unused in a GET_INFLIGHT_FD request).
        mmap_size: u64,
        /// Where the area starts in the fd.
        mmap_offset: u64,
        /// Queues the area covers.
        num_queues: u16,
        /// The size of each queue.
        queue_size: u16 => pad(4),
    }
    /// Exact size only: in a `GET_INFLIGHT_FD` request the mmap fields are unused (0).
    /// See [`InflightDesc::check_queues`] and [`InflightDesc::check_mapping`].
}

impl InflightDesc {
    /// At least one queue of at least one entry.
    pub fn check_queues(&self) -> Result<()> {
        if self.num_queues == 0 || self.queue_size == 0 {
            return Err(invalid(
                "inflight description",
                format_args!(
                    "{} queues of size {}: both must be non-zero",
                    self.num_queues, self.queue_size
                ),
            ));
        }
        Ok(())
    }

    /// The largest area a back-end may hand out for `num_queues` rings of `queue_size`
    /// entries: one page of header plus 64 bytes per entry for each queue, page-aligned.
    /// The layouts in use (libvhost-user's and DPDK's split and packed areas, our
    /// daemon's) take at most 32 bytes per entry and well under a page of header, each
    /// queue page-aligned at most. A front-end refuses a larger reply instead of mapping it.
    pub fn max_mmap_size(num_queues: u16, queue_size: u16) -> u64 {
        const PAGE: u64 = 4096;
        let per_queue = (PAGE + 64 * u64::from(queue_size)).div_ceil(PAGE) * PAGE;
        per_queue * u64::from(num_queues)
    }

    /// Size not 0 and offset + size does not overflow (the area is mapped).
    pub fn check_mapping(&self) -> Result<()> {
        if self.mmap_size == 0 {
            return Err(invalid("inflight description", "mmap size 0"));
        }
        if end_of(self.mmap_offset, self.mmap_size).is_none() {
            return Err(invalid("inflight description", "offset + size overflows"));
        }
        Ok(())
    }
}

/// Values of [`ConfigPayload::flags`].
///
/// The spec lists 0 (writable fields) and 1 (live migration) as values, and QEMU sends
/// them that way; rust-vmm treats the field as bits (`WRITABLE` = 1, `LIVE_MIGRATION` = 2).
/// Both readings are accepted: any value up to [`config_flags::MAX`].
pub mod config_flags {
    /// QEMU: a write from the driver, to writable fields.
    pub const FRONTEND: u32 = 0;
    /// QEMU: a write for live migration (may touch read-only fields).
    pub const MIGRATION: u32 = 1;
    /// rust-vmm's `LIVE_MIGRATION` bit.
    pub const LIVE_MIGRATION_BIT: u32 = 2;
    /// Largest accepted value.
    pub const MAX: u32 = 3;
}

/// The `GET_CONFIG` / `SET_CONFIG` body: offset, size, flags, then `size` bytes.
///
/// Bounds (ADVERSARIAL G1): `size` is 1..=[`MAX_CONFIG_SIZE`] (256), and
/// `offset + size` must not overflow and must be at most 256, so the whole access lies
/// inside the 256 bytes QEMU's `VhostUserConfig` can carry (QEMU asserts its config
/// length is at most 256, and every vhost-user device's config space fits). rust-vmm
/// allows up to 4096; a front-end asking beyond 256 is refused here. A zero-size body,
/// which a back-end uses as an error reply to `GET_CONFIG`, is not a `ConfigPayload`
/// and is left to the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigPayload {
    /// Where in config space the access starts.
    pub offset: u32,
    /// Bytes accessed.
    pub size: u32,
    /// `VHOST_SET_CONFIG_TYPE_*` (0 = front-end, 1 = migration).
    pub flags: u32,
    /// The bytes written, or read in a reply (`size` bytes).
    pub data: Vec<u8>,
}

impl ConfigPayload {
    /// Offset, size and flags.
    pub const HEADER_SIZE: usize = 12;
    /// The largest body: the header and a full config space.
    pub const MAX_SIZE: usize = Self::HEADER_SIZE + MAX_CONFIG_SIZE as usize;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::HEADER_SIZE + self.data.len())
            .u32(self.offset)
            .u32(self.size)
            .u32(self.flags)
            .bytes(&self.data)
            .done()
    }

    /// Decodes a received body: a 12-byte header then exactly `size` bytes, at most
    /// `MAX_CONFIG_SIZE`.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        const WHAT: &str = "config space";
        if b.len() < Self::HEADER_SIZE {
            return Err(size_error(WHAT, "12 + size", b.len()));
        }
        let mut r = Reader { rest: b };
        let (offset, size, flags) = (r.u32(), r.u32(), r.u32());
        Self::check_bounds(offset, size, flags)?;
        let want = Self::HEADER_SIZE + size as usize;
        if b.len() != want {
            return Err(size_error(WHAT, want, b.len()));
        }
        Ok(ConfigPayload {
            offset,
            size,
            flags,
            data: r.rest.to_vec(),
        })
    }

    /// The rules of `from_bytes` applied to a payload built locally: the range and
    /// flags, and `size` bytes of data.
    pub fn check(&self) -> Result<()> {
        Self::check_bounds(self.offset, self.size, self.flags)?;
        if self.data.len() != self.size as usize {
            return Err(invalid(
                "config space",
                format_args!("{} bytes of data for size {}", self.data.len(), self.size),
            ));
        }
        Ok(())
    }

    fn check_bounds(offset: u32, size: u32, flags: u32) -> Result<()> {
        const WHAT: &str = "config space";
        if size == 0 || size > MAX_CONFIG_SIZE {
            return Err(invalid(
                WHAT,
                format_args!("size {size}, expected 1..={MAX_CONFIG_SIZE}"),
            ));
        }
        match offset.checked_add(size) {
            Some(end) if end <= MAX_CONFIG_SIZE => {}
            _ => {
                return Err(invalid(
                    WHAT,
                    format_args!("offset {offset} + size {size} beyond {MAX_CONFIG_SIZE}"),
                ))
            }
        }
        if flags > config_flags::MAX {
            return Err(invalid(WHAT, format_args!("unknown flags {flags:#x}")));
        }
        Ok(())
    }

    /// A `GET_CONFIG` reply must cover exactly the requested range (H2: a back-end
    /// returning more, or other bytes, than asked for is a protocol error).
    pub fn check_reply_for(&self, request: &ConfigPayload) -> Result<()> {
        if self.offset != request.offset || self.size != request.size {
            return Err(Error::ReplyMismatch(format!(
                "GET_CONFIG asked for {} bytes at {}, reply has {} at {}",
                request.size, request.offset, self.size, self.offset
            )));
        }
        Ok(())
    }
}

/// IOTLB message types and permissions (`struct vhost_iotlb_msg`).
pub mod iotlb {
    /// Back-end to front-end: translation missing.
    pub const MISS: u8 = 1;
    /// Front-end to back-end: add a translation.
    pub const UPDATE: u8 = 2;
    /// Front-end to back-end: drop translations in a range.
    pub const INVALIDATE: u8 = 3;
    /// Back-end to front-end: access denied.
    pub const ACCESS_FAIL: u8 = 4;

    /// No access.
    pub const PERM_NONE: u8 = 0;
    /// Read-only access.
    pub const PERM_RO: u8 = 1;
    /// Write-only access.
    pub const PERM_WO: u8 = 2;
    /// Read and write access.
    pub const PERM_RW: u8 = 3;
}

wire_struct! {
    /// `struct vhost_iotlb_msg`: iova, size, user address, permission, type; 32 bytes with
    /// the C struct's 6 bytes of tail padding, as QEMU sends it.
    ///
    /// Rules: permission 0..=3, type 1..=4. The ranges are not judged here: an update or
    /// invalidation of size 0 or whose range wraps is a well-formed message with values
    /// the IOTLB refuses ([`Iotlb`](crate::memory::Iotlb), typed errors, H4), so that a
    /// back-end answers it with a failure status and the session goes on.
    /// Which types may travel in which direction is checked by the message decoders.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IotlbPayload: "IOTLB message" {
        /// I/O virtual address, what the device uses.
        iova: u64,
        /// Length of the range in bytes.
        size: u64,
        /// Front-end address the range maps to (updates only).
        uaddr: u64,
        /// `PERM_*`: what the device may do there.
        perm: u8,
        /// `UPDATE`, `INVALIDATE`, `MISS` or `ACCESS_FAIL`.
        kind: u8 => pad(6),
    }
    /// Then the rules above.
    check: IotlbPayload::rules
}

impl IotlbPayload {
    /// The rules of `from_bytes` (see the type): permission and type.
    fn rules(&self) -> Result<()> {
        const WHAT: &str = "IOTLB message";
        let m = self;
        if m.perm > iotlb::PERM_RW {
            return Err(invalid(WHAT, format_args!("permission {}", m.perm)));
        }
        if !(iotlb::MISS..=iotlb::ACCESS_FAIL).contains(&m.kind) {
            return Err(invalid(WHAT, format_args!("type {}", m.kind)));
        }
        Ok(())
    }
}

/// Bit 8 of the u64 of `SET_VRING_KICK/CALL/ERR` and of a vring area: no fd attached.
pub const VRING_NOFD_FLAG: u64 = 1 << 8;
/// Bits 0-7: the vring index.
pub const VRING_INDEX_MASK: u64 = 0xFF;

fn split_vring_u64(what: &'static str, v: u64) -> Result<(u8, bool)> {
    let reserved = v & !(VRING_INDEX_MASK | VRING_NOFD_FLAG);
    if reserved != 0 {
        return Err(invalid(
            what,
            format_args!("reserved bits {reserved:#x} set"),
        ));
    }
    Ok(((v & VRING_INDEX_MASK) as u8, v & VRING_NOFD_FLAG != 0))
}

fn join_vring_u64(index: u8, nofd: bool) -> u64 {
    u64::from(index) | if nofd { VRING_NOFD_FLAG } else { 0 }
}

/// The u64 of `SET_VRING_KICK`, `SET_VRING_CALL`, `SET_VRING_ERR`: bits 0-7 the index,
/// bit 8 "no fd". Any other bit is rejected (ADVERSARIAL B5; rust-vmm truncates to u8
/// instead, which would act on ring 1 for `0x1_0000_0001`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringFdPayload {
    /// The queue index (bits 0-7).
    pub index: u8,
    /// Bit 8: no fd comes with the message (polling, in-band notifications or detach).
    pub nofd: bool,
}

impl VringFdPayload {
    /// The body's exact size on the wire.
    pub const SIZE: usize = 8;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        U64Payload(join_vring_u64(self.index, self.nofd)).to_bytes()
    }

    /// Decodes a received body; any other size is refused, naming the payload.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = exact("vring fd", b, Self::SIZE)?;
        let (index, nofd) = split_vring_u64("vring fd", r.u64())?;
        Ok(VringFdPayload { index, nofd })
    }
}

/// The `VRING_HOST_NOTIFIER_MSG` body (`VhostUserVringArea`): u64 index and NOFD flag as
/// for [`VringFdPayload`], then size and offset of the area in the attached fd.
///
/// Rules: reserved bits rejected; with an fd (`nofd` clear) the size must not be 0 and
/// offset + size must not overflow (H3). The spec's "size should be the host page size"
/// is left to the front-end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringArea {
    /// The queue index (bits 0-7).
    pub index: u8,
    /// Bit 8: no fd comes with the message (the notifier is withdrawn).
    pub nofd: bool,
    /// Size of the doorbell area in the fd.
    pub size: u64,
    /// Where it starts in the fd.
    pub offset: u64,
}

impl VringArea {
    /// The body's exact size on the wire.
    pub const SIZE: usize = 24;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        Writer::with_capacity(Self::SIZE)
            .u64(join_vring_u64(self.index, self.nofd))
            .u64(self.size)
            .u64(self.offset)
            .done()
    }

    /// Decodes a received body; any other size is refused, naming the payload.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        const WHAT: &str = "vring area";
        let mut r = exact(WHAT, b, Self::SIZE)?;
        let (index, nofd) = split_vring_u64(WHAT, r.u64())?;
        let area = VringArea {
            index,
            nofd,
            size: r.u64(),
            offset: r.u64(),
        };
        if !nofd {
            if area.size == 0 {
                return Err(invalid(WHAT, "size 0"));
            }
            if end_of(area.offset, area.size).is_none() {
                return Err(invalid(WHAT, "offset + size overflows"));
            }
        }
        Ok(area)
    }
}

wire_struct! {
    /// `VhostUserShared`: a 16-byte UUID whose first three fields are big-endian (copied
    /// as-is; any value is accepted).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SharedObjectUuid: "shared object" ([u8; 16]);
}

wire_struct! {
    /// Device state transfer parameters (`SET_DEVICE_STATE_FD`): direction and phase.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DeviceStateTransfer: "device state transfer" {
        /// `DIRECTION_SAVE` or `DIRECTION_LOAD`.
        direction: u32,
        /// `PHASE_STOPPED`, the only phase defined.
        phase: u32,
    }
    /// Any direction and phase decode: the spec foresees more phases, and a back-end
    /// answers one it does not support with a failure status (as virtiofsd does) rather
    /// than a closed connection, so the values are the handler's to refuse.
}

impl DeviceStateTransfer {
    /// Back-end to front-end (migration source).
    pub const DIRECTION_SAVE: u32 = 0;
    /// Front-end to back-end (migration destination).
    pub const DIRECTION_LOAD: u32 = 1;
    /// The VM and the device are stopped; the only phase defined.
    pub const PHASE_STOPPED: u32 = 0;
}

/// The u64 reply to `SET_DEVICE_STATE_FD`: bits 0-7 a status (0 = success), bit 8 "no fd
/// returned". Other bits are rejected, and so is an error status that comes with an fd
/// (the spec forbids it); pass whether the reply carried an fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStateReply {
    /// 0 on success.
    pub status: u8,
    /// The back-end sent no fd (the front-end's pipe is used).
    pub nofd: bool,
}

impl DeviceStateReply {
    /// The body's exact size on the wire.
    pub const SIZE: usize = 8;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        U64Payload(join_vring_u64(self.status, self.nofd)).to_bytes()
    }

    /// Decodes a received reply; `has_fd` says whether an fd came with it.
    pub fn from_bytes(b: &[u8], has_fd: bool) -> Result<Self> {
        const WHAT: &str = "device state reply";
        let mut r = exact(WHAT, b, Self::SIZE)?;
        let (status, nofd) = split_vring_u64(WHAT, r.u64())?;
        if nofd == has_fd {
            return Err(invalid(
                WHAT,
                if has_fd {
                    "fd attached but the no-fd flag is set"
                } else {
                    "no fd attached and the no-fd flag is clear"
                },
            ));
        }
        if status != 0 && has_fd {
            return Err(invalid(WHAT, "an error status must not come with an fd"));
        }
        Ok(DeviceStateReply { status, nofd })
    }
}

/// Bit 0 of [`ShmemMapPayload::flags`]: map read-write (clear: read-only).
pub const SHMEM_MAP_FLAG_RW: u64 = 1;

wire_struct! {
    /// `VhostUserMMap`, the body of `SHMEM_MAP` and `SHMEM_UNMAP`: shared memory region id,
    /// 7 bytes of padding, offset in the fd, offset in the region, length, flags.
    ///
    /// Rules (H4): length not 0, `fd_offset + len` and `shm_offset + len` do not overflow,
    /// no flag other than [`SHMEM_MAP_FLAG_RW`]. Whether `shmid` exists, whether the range
    /// fits the region, page alignment and overlap with earlier mappings need the device's
    /// shared memory configuration and are the front-end's to check.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ShmemMapPayload: "shared memory mapping" {
        /// Which shared memory region.
        shmid: u8 => pad(7),
        /// Where the mapping starts in the fd.
        fd_offset: u64,
        /// Where it goes in the region.
        shm_offset: u64,
        /// Length of the mapping in bytes.
        len: u64,
        /// `SHMEM_MAP_FLAG_RW` or 0 (read-only).
        flags: u64,
    }
    /// Then [`ShmemMapPayload::check`].
    check: ShmemMapPayload::check
}

impl ShmemMapPayload {
    /// The rules of `from_bytes` applied to a mapping built locally (H4): a length, no
    /// overflowing range, no unknown flag.
    pub fn check(&self) -> Result<()> {
        const WHAT: &str = "shared memory mapping";
        let m = self;
        if m.len == 0 {
            return Err(invalid(WHAT, "length 0"));
        }
        if end_of(m.fd_offset, m.len).is_none() {
            return Err(invalid(WHAT, "fd_offset + len overflows"));
        }
        if end_of(m.shm_offset, m.len).is_none() {
            return Err(invalid(WHAT, "shm_offset + len overflows"));
        }
        if m.flags & !SHMEM_MAP_FLAG_RW != 0 {
            return Err(invalid(WHAT, format_args!("unknown flags {:#x}", m.flags)));
        }
        Ok(())
    }

    /// Whether the mapping may be written (`SHMEM_MAP_FLAG_RW`).
    pub fn writable(&self) -> bool {
        self.flags & SHMEM_MAP_FLAG_RW != 0
    }
}

/// Most VIRTIO Shared Memory Regions a device can have (shmid is a u8).
pub const MAX_SHMEM_REGIONS: usize = 256;

/// The `GET_SHMEM_CONFIG` reply (`VhostUserShMemConfig`): u32 count, u32 padding, and 256
/// u64 sizes indexed by shmid, 0 for an unused id. The count is the number of non-zero
/// sizes (not a prefix length), and `from_bytes` insists on it. "Sizes are multiples of
/// the page size" needs the page size and is the caller's check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShmemConfig {
    /// Size of each region by shmid; 0 means no region.
    pub sizes: [u64; MAX_SHMEM_REGIONS],
}

impl Default for ShmemConfig {
    fn default() -> Self {
        ShmemConfig {
            sizes: [0; MAX_SHMEM_REGIONS],
        }
    }
}

impl ShmemConfig {
    /// The body's exact size on the wire.
    pub const SIZE: usize = 8 + 8 * MAX_SHMEM_REGIONS;

    /// The config of a device with these `(shmid, size)` regions: each id at most once
    /// and no size 0 (the wire format's "no region"), else `InvalidParam`.
    pub fn from_regions(regions: &[(u8, u64)]) -> Result<Self> {
        let mut cfg = ShmemConfig::default();
        for &(shmid, size) in regions {
            let slot = &mut cfg.sizes[usize::from(shmid)];
            if size == 0 || *slot != 0 {
                return Err(invalid(
                    "shared memory config",
                    format_args!(
                        "region {shmid} {}",
                        if size == 0 {
                            "has size 0"
                        } else {
                            "is declared twice"
                        }
                    ),
                ));
            }
            *slot = size;
        }
        Ok(cfg)
    }

    /// The regions in use as `(shmid, size)`, by shmid.
    pub fn regions(&self) -> Vec<(u8, u64)> {
        (0..=u8::MAX)
            .zip(self.sizes)
            .filter(|&(_, size)| size != 0)
            .collect()
    }

    /// Number of regions in use (non-zero size).
    pub fn nregions(&self) -> u32 {
        self.sizes.iter().filter(|&&s| s != 0).count() as u32
    }

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE)
            .u32(self.nregions())
            .u32(0);
        for &s in &self.sizes {
            w = w.u64(s);
        }
        w.done()
    }

    /// Decodes a received body; any other size is refused, naming the payload.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        const WHAT: &str = "shared memory config";
        let mut r = exact(WHAT, b, Self::SIZE)?;
        let count = r.u32();
        r.skip(4);
        let mut cfg = ShmemConfig::default();
        for s in cfg.sizes.iter_mut() {
            *s = r.u64();
        }
        if count != cfg.nregions() {
            return Err(invalid(
                WHAT,
                format_args!("count {count} but {} non-zero sizes", cfg.nregions()),
            ));
        }
        Ok(cfg)
    }
}

wire_struct! {
    /// The `SEND_RARP` body: a u64 whose first 6 bytes in memory are the guest's MAC.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RarpPayload: "RARP" ([u8; 6] => pad(2));
    /// The two bytes after the MAC are ignored.
}

/// The `CREATE_CRYPTO_SESSION` body and reply: a crypto session description whose
/// layout depends on the QEMU version (symmetric or asymmetric session, key sizes), so it
/// is carried opaque. Non-empty and at most [`MAX_BODY_SIZE`] bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CryptoSessionPayload(pub Vec<u8>);

impl CryptoSessionPayload {
    /// The largest body the protocol carries.
    pub const MAX_SIZE: usize = MAX_BODY_SIZE;

    /// The body as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.clone()
    }

    /// Decodes a received body: 1 to 4096 opaque bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.is_empty() || b.len() > Self::MAX_SIZE {
            return Err(size_error("crypto session", "1..=4096", b.len()));
        }
        Ok(CryptoSessionPayload(b.to_vec()))
    }
}

// ---- the layouts as request bodies ------------------------------------------------

/// A body layout: how a request's value is read from and written to the wire.
pub trait Body: Sized {
    /// Reads a received body, with every rule its layout states (sizes, counts,
    /// reserved bits, overflows).
    fn parse(b: &[u8]) -> Result<Self>;
    /// The bytes, as sent.
    fn bytes(&self) -> Vec<u8>;
    /// The rules of `parse`, applied to a value built locally before it is sent.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// `parse`, and the body's NOFD flag for layouts that have one (else false).
    fn parse_nofd(b: &[u8]) -> Result<(Self, bool)> {
        Ok((Self::parse(b)?, false))
    }
    /// `bytes` for a request that carries no fd where its rule allows one (`nofd`).
    fn bytes_nofd(&self, _nofd: bool) -> Vec<u8> {
        self.bytes()
    }
    /// The NOFD flag when the value holds it itself (a vring area), to check against
    /// the fd actually sent.
    fn own_nofd(&self) -> Option<bool> {
        None
    }
}

/// Header-only requests.
impl Body for () {
    fn parse(b: &[u8]) -> Result<()> {
        if b.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidSize {
                request: "",
                expected: "0".into(),
                got: b.len(),
            })
        }
    }
    fn bytes(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// The vring index of `SET_VRING_KICK` / `CALL` / `ERR`: its u64 also holds the NOFD
/// flag, which the request's fd stands for.
impl Body for u8 {
    fn parse(b: &[u8]) -> Result<u8> {
        Ok(Self::parse_nofd(b)?.0)
    }
    fn bytes(&self) -> Vec<u8> {
        self.bytes_nofd(false)
    }
    fn parse_nofd(b: &[u8]) -> Result<(u8, bool)> {
        let p = VringFdPayload::from_bytes(b)?;
        Ok((p.index, p.nofd))
    }
    fn bytes_nofd(&self, nofd: bool) -> Vec<u8> {
        VringFdPayload { index: *self, nofd }.to_bytes()
    }
}

/// The opaque parameters of `CREATE_CRYPTO_SESSION`.
impl Body for Vec<u8> {
    fn parse(b: &[u8]) -> Result<Self> {
        Ok(CryptoSessionPayload::from_bytes(b)?.0)
    }
    fn bytes(&self) -> Vec<u8> {
        self.clone()
    }
}

/// `ADD_MEM_REG` / `REM_MEM_REG` (with the layout's padding).
impl Body for MemRegion {
    fn parse(b: &[u8]) -> Result<Self> {
        Ok(SingleMemRegion::from_bytes(b)?.region)
    }
    fn bytes(&self) -> Vec<u8> {
        SingleMemRegion { region: *self }.to_bytes()
    }
    fn check(&self) -> Result<()> {
        MemRegion::check(self)
    }
}

/// The doorbell area of `VRING_HOST_NOTIFIER_MSG`, which holds its NOFD flag itself.
impl Body for VringArea {
    fn parse(b: &[u8]) -> Result<Self> {
        VringArea::from_bytes(b)
    }
    fn bytes(&self) -> Vec<u8> {
        self.to_bytes()
    }
    fn parse_nofd(b: &[u8]) -> Result<(Self, bool)> {
        let area = VringArea::from_bytes(b)?;
        Ok((area, area.nofd))
    }
    fn own_nofd(&self) -> Option<bool> {
        Some(self.nofd)
    }
}

/// Values sent as the one field of a payload tuple struct, which holds the layout.
macro_rules! wrapped_body {
    ($($(#[doc = $doc:literal])* $t:ty => $wrapper:ident),+ $(,)?) => {$(
        $(#[doc = $doc])*
        impl Body for $t {
            fn parse(b: &[u8]) -> Result<Self> {
                Ok($wrapper::from_bytes(b)?.0)
            }
            fn bytes(&self) -> Vec<u8> {
                $wrapper(*self).to_bytes()
            }
        }
    )+};
}

wrapped_body!(
    /// One u64: features, MTU, status, session id.
    u64 => U64Payload,
    /// The guest MAC of `SEND_RARP`.
    [u8; 6] => RarpPayload,
    /// `SET_VRING_ADDR`.
    VringAddrs => VringAddrPayload,
);

/// Payload types whose `from_bytes` / `to_bytes` are the layout, with an optional `check`.
macro_rules! plain_body {
    ($($t:ty $(=> $check:path)?),+ $(,)?) => {$(
        #[doc = concat!("`", stringify!($t), "`, as laid out in `payload`.")]
        impl Body for $t {
            fn parse(b: &[u8]) -> Result<Self> {
                <$t>::from_bytes(b)
            }
            fn bytes(&self) -> Vec<u8> {
                self.to_bytes()
            }
            $(fn check(&self) -> Result<()> {
                $check(self)
            })?
        }
    )+};
}

plain_body!(
    MemTable => MemTable::check,
    LogDesc,
    VringState,
    IotlbPayload,
    ConfigPayload => ConfigPayload::check,
    InflightDesc,
    SharedObjectUuid,
    DeviceStateTransfer,
    ShmemMapPayload => ShmemMapPayload::check,
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every fixed-size payload rejects one byte less, one byte more, empty and a big body.
    fn sizes_rejected(size: usize, parse: impl Fn(&[u8]) -> Result<()>) {
        for len in [0, size - 1, size + 1, size + 8, MAX_BODY_SIZE] {
            let body = vec![0u8; len];
            match parse(&body) {
                Err(Error::InvalidSize { got, .. }) => assert_eq!(got, len),
                other => panic!("length {len} (size {size}): {other:?}"),
            }
        }
    }

    fn region(gpa: u64, size: u64, user: u64) -> MemRegion {
        MemRegion {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: user,
            mmap_offset: 0,
        }
    }

    #[test]
    fn u64_payload() {
        let p = U64Payload(0x0123_4567_89AB_CDEF);
        let b = p.to_bytes();
        assert_eq!(b, 0x0123_4567_89AB_CDEFu64.to_ne_bytes());
        assert_eq!(U64Payload::from_bytes(&b).unwrap(), p);
        sizes_rejected(U64Payload::SIZE, |b| U64Payload::from_bytes(b).map(|_| ()));
    }

    #[test]
    fn vring_state() {
        let s = VringState { index: 3, num: 256 };
        let b = s.to_bytes();
        assert_eq!(b.len(), VringState::SIZE);
        assert_eq!(&b[..4], &3u32.to_ne_bytes());
        assert_eq!(VringState::from_bytes(&b).unwrap(), s);
        // SET_VRING_NUM with a 4-byte body (A5).
        assert!(matches!(
            VringState::from_bytes(&b[..4]),
            Err(Error::InvalidSize { got: 4, .. })
        ));
        sizes_rejected(VringState::SIZE, |b| VringState::from_bytes(b).map(|_| ()));
    }

    #[test]
    fn vring_addr() {
        let a = VringAddrs {
            index: 1,
            flags: 1,
            desc: 0x1000,
            used: 0x2000,
            avail: 0x3002,
            log: 0x4000,
        };
        let b = VringAddrPayload(a).to_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[8..16], &0x1000u64.to_ne_bytes());
        assert_eq!(&b[16..24], &0x2000u64.to_ne_bytes());
        assert_eq!(&b[24..32], &0x3002u64.to_ne_bytes());
        assert_eq!(VringAddrPayload::from_bytes(&b).unwrap().0, a);
        sizes_rejected(VringAddrPayload::SIZE, |b| {
            VringAddrPayload::from_bytes(b).map(|_| ())
        });
        for bad in [
            VringAddrs { desc: 0x1008, ..a },
            VringAddrs { avail: 0x3001, ..a },
            VringAddrs { used: 0x2002, ..a },
            VringAddrs { flags: 2, ..a },
        ] {
            let b = VringAddrPayload(bad).to_bytes();
            assert!(matches!(
                VringAddrPayload::from_bytes(&b),
                Err(Error::InvalidParam(_))
            ));
        }
    }

    #[test]
    fn mem_region_rules() {
        let r = MemRegion {
            guest_phys_addr: 0x1000,
            memory_size: 0x10_0000,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0x2000,
        };
        let b = r.to_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!(MemRegion::from_bytes(&b).unwrap(), r);
        sizes_rejected(MemRegion::SIZE, |b| MemRegion::from_bytes(b).map(|_| ()));
        // C2: size 0 and each overflow.
        for bad in [
            MemRegion {
                memory_size: 0,
                ..r
            },
            MemRegion {
                guest_phys_addr: u64::MAX - 0xFFF,
                ..r
            },
            MemRegion {
                userspace_addr: u64::MAX,
                ..r
            },
            MemRegion {
                mmap_offset: u64::MAX - 1,
                ..r
            },
            MemRegion {
                memory_size: u64::MAX,
                ..r
            },
        ] {
            assert!(
                matches!(
                    MemRegion::from_bytes(&bad.to_bytes()),
                    Err(Error::InvalidParam(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mem_table_round_trip() {
        let t = MemTable {
            regions: vec![
                region(0, 0x8000_0000, 0x7f00_0000_0000),
                region(0x1_0000_0000, 0x4000_0000, 0x7e00_0000_0000),
            ],
        };
        let b = t.to_bytes();
        assert_eq!(b.len(), 8 + 2 * 32);
        assert_eq!(&b[..4], &2u32.to_ne_bytes());
        assert_eq!(MemTable::from_bytes(&b).unwrap(), t);
        t.check().unwrap();
    }

    #[test]
    fn mem_table_count_c1() {
        // 0 regions.
        let b = MemTable { regions: vec![] }.to_bytes();
        assert!(matches!(
            MemTable::from_bytes(&b),
            Err(Error::InvalidParam(_))
        ));
        // 33 regions, well-formed otherwise: one past rust-vmm's limit.
        let regions: Vec<_> = (0..33)
            .map(|i| region(i << 32, 0x1000, 0x7f00_0000_0000 + (i << 32)))
            .collect();
        let b = MemTable {
            regions: regions.clone(),
        }
        .to_bytes();
        match MemTable::from_bytes(&b) {
            Err(Error::InvalidParam(msg)) => assert!(msg.contains("33 regions"), "{msg}"),
            other => panic!("33 regions accepted: {other:?}"),
        }
        // Everything from 1 to 32 is accepted, past QEMU's 8; 32 is the largest body.
        for n in 1..=32 {
            let b = MemTable {
                regions: regions[..n].to_vec(),
            }
            .to_bytes();
            assert_eq!(MemTable::from_bytes(&b).unwrap().regions.len(), n);
        }
        let b = MemTable {
            regions: regions[..32].to_vec(),
        }
        .to_bytes();
        assert_eq!(b.len(), MemTable::MAX_SIZE);
        assert_eq!(MemTable::MAX_SIZE, 8 + 32 * 32);
        // Count 0xFFFF_FFFF in an 8-byte body.
        let mut b = vec![0xFF; 4];
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(
            MemTable::from_bytes(&b),
            Err(Error::InvalidParam(_))
        ));
    }

    #[test]
    fn mem_table_exact_size() {
        let t = MemTable {
            regions: vec![region(0, 0x1000, 0x1000), region(0x1000, 0x1000, 0x2000)],
        };
        let b = t.to_bytes();
        for len in [0, 4, 7, b.len() - 1, b.len() - 32] {
            assert!(
                matches!(
                    MemTable::from_bytes(&b[..len]),
                    Err(Error::InvalidSize { .. })
                ),
                "{len}"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            MemTable::from_bytes(&long),
            Err(Error::InvalidSize { .. })
        ));
        long.extend_from_slice(&[0; 31]);
        assert!(matches!(
            MemTable::from_bytes(&long),
            Err(Error::InvalidSize { .. })
        ));
    }

    #[test]
    fn mem_table_overlap_c4() {
        // Same GPA range, different user addresses.
        let t = MemTable {
            regions: vec![
                region(0, 0x2000, 0x10_0000),
                region(0x1000, 0x2000, 0x20_0000),
            ],
        };
        assert!(matches!(
            MemTable::from_bytes(&t.to_bytes()),
            Err(Error::InvalidParam(_))
        ));
        // Disjoint GPA, overlapping user addresses.
        let t = MemTable {
            regions: vec![
                region(0, 0x2000, 0x10_0000),
                region(0x10_0000, 0x2000, 0x10_1000),
            ],
        };
        assert!(matches!(
            MemTable::from_bytes(&t.to_bytes()),
            Err(Error::InvalidParam(_))
        ));
        // Adjacent is fine.
        let t = MemTable {
            regions: vec![
                region(0, 0x2000, 0x10_0000),
                region(0x2000, 0x2000, 0x10_2000),
            ],
        };
        MemTable::from_bytes(&t.to_bytes()).unwrap();
        // A region with an overflowing end inside a table (C2).
        let t = MemTable {
            regions: vec![region(u64::MAX - 0x10, 0x1000, 0)],
        };
        assert!(matches!(
            MemTable::from_bytes(&t.to_bytes()),
            Err(Error::InvalidParam(_))
        ));
    }

    #[test]
    fn single_mem_region() {
        let s = SingleMemRegion {
            region: region(0x4000_0000, 0x1000, 0x7f00_0000_0000),
        };
        let b = s.to_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[..8], &[0; 8]);
        assert_eq!(SingleMemRegion::from_bytes(&b).unwrap(), s);
        sizes_rejected(SingleMemRegion::SIZE, |b| {
            SingleMemRegion::from_bytes(b).map(|_| ())
        });
        let bad = SingleMemRegion {
            region: region(0, 0, 0),
        };
        assert!(matches!(
            SingleMemRegion::from_bytes(&bad.to_bytes()),
            Err(Error::InvalidParam(_))
        ));
    }

    #[test]
    fn log_desc_c9() {
        let l = LogDesc {
            mmap_size: 0x1000,
            mmap_offset: 0x2000,
        };
        assert_eq!(LogDesc::from_bytes(&l.to_bytes()).unwrap(), l);
        sizes_rejected(LogDesc::SIZE, |b| LogDesc::from_bytes(b).map(|_| ()));
        for bad in [
            LogDesc {
                mmap_size: 0,
                mmap_offset: 0,
            },
            LogDesc {
                mmap_size: 0x1000,
                mmap_offset: u64::MAX - 0xFFE,
            },
        ] {
            assert!(matches!(
                LogDesc::from_bytes(&bad.to_bytes()),
                Err(Error::InvalidParam(_))
            ));
        }
    }

    #[test]
    fn inflight_size_bound_admits_the_layouts_in_use() {
        const PAGE: u64 = 4096;
        for queue_size in [1u16, 2, 64, 128, 256, 1024, 32768] {
            for num_queues in [1u16, 2, 16] {
                let max = InflightDesc::max_mmap_size(num_queues, queue_size);
                let (q, n) = (u64::from(queue_size), u64::from(num_queues));
                // libvhost-user split: 16-byte header and entries, 64-aligned per queue.
                assert!((16 + 16 * q).div_ceil(64) * 64 * n <= max);
                // DPDK packed: 32-byte header and entries, each queue page-aligned.
                assert!((32 + 32 * q).div_ceil(PAGE) * PAGE * n <= max);
            }
        }
        assert_eq!(InflightDesc::max_mmap_size(1, 256), 0x5000);
        assert_eq!(InflightDesc::max_mmap_size(0, 256), 0);
        // The largest geometry does not overflow.
        assert!(InflightDesc::max_mmap_size(u16::MAX, u16::MAX) < u64::MAX / 2);
    }

    #[test]
    fn inflight_is_24_bytes() {
        let d = InflightDesc {
            mmap_size: 0x3000,
            mmap_offset: 0,
            num_queues: 4,
            queue_size: 256,
        };
        let b = d.to_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(&b[16..18], &4u16.to_ne_bytes());
        assert_eq!(&b[18..20], &256u16.to_ne_bytes());
        assert_eq!(&b[20..], &[0; 4]);
        assert_eq!(InflightDesc::from_bytes(&b).unwrap(), d);
        // The 20 bytes of fields alone are not accepted.
        assert!(matches!(
            InflightDesc::from_bytes(&b[..20]),
            Err(Error::InvalidSize { got: 20, .. })
        ));
        sizes_rejected(InflightDesc::SIZE, |b| {
            InflightDesc::from_bytes(b).map(|_| ())
        });
        d.check_queues().unwrap();
        d.check_mapping().unwrap();
        assert!(InflightDesc { num_queues: 0, ..d }.check_queues().is_err());
        assert!(InflightDesc { queue_size: 0, ..d }.check_queues().is_err());
        assert!(InflightDesc { mmap_size: 0, ..d }.check_mapping().is_err());
        assert!(InflightDesc {
            mmap_offset: u64::MAX,
            ..d
        }
        .check_mapping()
        .is_err());
    }

    #[test]
    fn config_payload_g1() {
        let c = ConfigPayload {
            offset: 16,
            size: 4,
            flags: 0,
            data: vec![1, 2, 3, 4],
        };
        let b = c.to_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(ConfigPayload::from_bytes(&b).unwrap(), c);
        // Body shorter / longer than 12 + size.
        assert!(matches!(
            ConfigPayload::from_bytes(&b[..15]),
            Err(Error::InvalidSize { .. })
        ));
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            ConfigPayload::from_bytes(&long),
            Err(Error::InvalidSize { .. })
        ));
        for len in [0, 4, 11] {
            assert!(matches!(
                ConfigPayload::from_bytes(&b[..len]),
                Err(Error::InvalidSize { .. })
            ));
        }
        // The whole 256 bytes is fine.
        let full = ConfigPayload {
            offset: 0,
            size: 256,
            flags: config_flags::MIGRATION,
            data: vec![0xAA; 256],
        };
        ConfigPayload::from_bytes(&full.to_bytes()).unwrap();
        let last = ConfigPayload {
            offset: 255,
            size: 1,
            flags: 3,
            data: vec![7],
        };
        ConfigPayload::from_bytes(&last.to_bytes()).unwrap();
        // G1: size 0, size > 256, offset at the end, offset + size overflow, flags.
        let bad = [
            (0, 0, 0),
            (0, 257, 0),
            (0, 4096, 0),
            (256, 1, 0),
            (250, 8, 0),
            (u32::MAX, 1, 0),
            (u32::MAX - 3, 8, 0),
            (0, 4, 4),
        ];
        for (offset, size, flags) in bad {
            let p = ConfigPayload {
                offset,
                size,
                flags,
                data: vec![0; size as usize],
            };
            assert!(
                matches!(
                    ConfigPayload::from_bytes(&p.to_bytes()),
                    Err(Error::InvalidParam(_))
                ),
                "{offset} {size} {flags}"
            );
        }
        // A size field of 0xFFFF_FFFF in a short body never allocates or indexes.
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&u32::MAX.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        assert!(ConfigPayload::from_bytes(&b).is_err());
    }

    #[test]
    fn config_reply_must_match() {
        let req = ConfigPayload {
            offset: 0,
            size: 8,
            flags: 0,
            data: vec![0; 8],
        };
        req.check_reply_for(&req).unwrap();
        let bigger = ConfigPayload {
            size: 16,
            data: vec![0; 16],
            ..req.clone()
        };
        assert!(matches!(
            bigger.check_reply_for(&req),
            Err(Error::ReplyMismatch(_))
        ));
        let moved = ConfigPayload {
            offset: 8,
            ..req.clone()
        };
        assert!(moved.check_reply_for(&req).is_err());
    }

    #[test]
    fn iotlb_is_32_bytes() {
        let m = IotlbPayload {
            iova: 0x1000,
            size: 0x2000,
            uaddr: 0x7f00_0000_0000,
            perm: iotlb::PERM_RW,
            kind: iotlb::UPDATE,
        };
        let b = m.to_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!(b[24], 3);
        assert_eq!(b[25], 2);
        assert_eq!(&b[26..], &[0; 6]);
        assert_eq!(IotlbPayload::from_bytes(&b).unwrap(), m);
        // 26 bytes (no padding) is refused.
        assert!(matches!(
            IotlbPayload::from_bytes(&b[..26]),
            Err(Error::InvalidSize { got: 26, .. })
        ));
        sizes_rejected(IotlbPayload::SIZE, |b| {
            IotlbPayload::from_bytes(b).map(|_| ())
        });
    }

    #[test]
    fn iotlb_rules_h4() {
        let m = IotlbPayload {
            iova: 0x1000,
            size: 0x1000,
            uaddr: 0x2000,
            perm: iotlb::PERM_RO,
            kind: iotlb::UPDATE,
        };
        for b in [
            IotlbPayload { perm: 4, ..m },
            IotlbPayload { kind: 0, ..m },
            IotlbPayload { kind: 5, ..m },
        ] {
            assert!(
                matches!(
                    IotlbPayload::from_bytes(&b.to_bytes()),
                    Err(Error::InvalidParam(_))
                ),
                "{b:?}"
            );
        }
        // Ranges of size 0 or that wrap are well-formed messages: the IOTLB refuses their
        // values (memory::iotlb), and the session answers with a failure status.
        for b in [
            IotlbPayload { size: 0, ..m },
            IotlbPayload {
                iova: u64::MAX,
                size: 2,
                ..m
            },
            IotlbPayload {
                kind: iotlb::INVALIDATE,
                size: 0,
                ..m
            },
            IotlbPayload {
                iova: u64::MAX - 0xFFF,
                size: 0x1000,
                uaddr: 0,
                ..m
            },
        ] {
            assert_eq!(IotlbPayload::from_bytes(&b.to_bytes()).unwrap(), b);
        }
        // Miss / access fail carry no range.
        for kind in [iotlb::MISS, iotlb::ACCESS_FAIL] {
            let miss = IotlbPayload {
                iova: u64::MAX,
                size: 0,
                uaddr: 0,
                perm: iotlb::PERM_WO,
                kind,
            };
            IotlbPayload::from_bytes(&miss.to_bytes()).unwrap();
        }
    }

    #[test]
    fn vring_fd_b5() {
        for (index, nofd) in [(0, false), (255, false), (7, true)] {
            let p = VringFdPayload { index, nofd };
            let b = p.to_bytes();
            assert_eq!(VringFdPayload::from_bytes(&b).unwrap(), p);
        }
        assert_eq!(
            VringFdPayload {
                index: 1,
                nofd: true
            }
            .to_bytes(),
            0x101u64.to_ne_bytes()
        );
        sizes_rejected(VringFdPayload::SIZE, |b| {
            VringFdPayload::from_bytes(b).map(|_| ())
        });
        for v in [0x1_0000_0001u64, 0x200, 1 << 63, u64::MAX] {
            assert!(
                matches!(
                    VringFdPayload::from_bytes(&v.to_ne_bytes()),
                    Err(Error::InvalidParam(_))
                ),
                "{v:#x}"
            );
        }
    }

    #[test]
    fn vring_area_h3() {
        let a = VringArea {
            index: 2,
            nofd: false,
            size: 0x1000,
            offset: 0x3000,
        };
        let b = a.to_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(VringArea::from_bytes(&b).unwrap(), a);
        sizes_rejected(VringArea::SIZE, |b| VringArea::from_bytes(b).map(|_| ()));
        let nofd = VringArea {
            nofd: true,
            size: 0,
            offset: u64::MAX,
            ..a
        };
        VringArea::from_bytes(&nofd.to_bytes()).unwrap();
        for bad in [
            VringArea { size: 0, ..a },
            VringArea {
                offset: u64::MAX - 0xFFE,
                ..a
            },
        ] {
            assert!(matches!(
                VringArea::from_bytes(&bad.to_bytes()),
                Err(Error::InvalidParam(_))
            ));
        }
        let mut b = a.to_bytes();
        b[..8].copy_from_slice(&0x1_0000_0002u64.to_ne_bytes());
        assert!(matches!(
            VringArea::from_bytes(&b),
            Err(Error::InvalidParam(_))
        ));
    }

    #[test]
    fn shared_object_uuid() {
        let u = SharedObjectUuid(*b"0123456789abcdef");
        assert_eq!(SharedObjectUuid::from_bytes(&u.to_bytes()).unwrap(), u);
        sizes_rejected(SharedObjectUuid::SIZE, |b| {
            SharedObjectUuid::from_bytes(b).map(|_| ())
        });
    }

    #[test]
    fn device_state_transfer() {
        for direction in [0, 1] {
            let t = DeviceStateTransfer {
                direction,
                phase: 0,
            };
            assert_eq!(DeviceStateTransfer::from_bytes(&t.to_bytes()).unwrap(), t);
        }
        sizes_rejected(DeviceStateTransfer::SIZE, |b| {
            DeviceStateTransfer::from_bytes(b).map(|_| ())
        });
        // Unknown values are the handler's to refuse with a status.
        for (direction, phase) in [(2, 0), (0, 1), (u32::MAX, u32::MAX)] {
            let t = DeviceStateTransfer { direction, phase };
            assert_eq!(DeviceStateTransfer::from_bytes(&t.to_bytes()).unwrap(), t);
        }
    }

    #[test]
    fn device_state_reply() {
        let ok_fd = DeviceStateReply {
            status: 0,
            nofd: false,
        };
        assert_eq!(
            DeviceStateReply::from_bytes(&ok_fd.to_bytes(), true).unwrap(),
            ok_fd
        );
        let ok_nofd = DeviceStateReply {
            status: 0,
            nofd: true,
        };
        DeviceStateReply::from_bytes(&ok_nofd.to_bytes(), false).unwrap();
        let err_nofd = DeviceStateReply {
            status: 5,
            nofd: true,
        };
        DeviceStateReply::from_bytes(&err_nofd.to_bytes(), false).unwrap();
        // Flag and fd disagree; error with an fd; reserved bits.
        assert!(DeviceStateReply::from_bytes(&ok_fd.to_bytes(), false).is_err());
        assert!(DeviceStateReply::from_bytes(&ok_nofd.to_bytes(), true).is_err());
        let err_fd = DeviceStateReply {
            status: 1,
            nofd: false,
        };
        assert!(DeviceStateReply::from_bytes(&err_fd.to_bytes(), true).is_err());
        assert!(DeviceStateReply::from_bytes(&0x200u64.to_ne_bytes(), false).is_err());
        assert!(DeviceStateReply::from_bytes(&[0; 4], false).is_err());
    }

    #[test]
    fn shmem_map_h4() {
        let m = ShmemMapPayload {
            shmid: 1,
            fd_offset: 0x1000,
            shm_offset: 0x20_0000,
            len: 0x1000,
            flags: SHMEM_MAP_FLAG_RW,
        };
        let b = m.to_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..8], &[0; 7]);
        assert_eq!(&b[8..16], &0x1000u64.to_ne_bytes());
        assert_eq!(ShmemMapPayload::from_bytes(&b).unwrap(), m);
        assert!(m.writable());
        sizes_rejected(ShmemMapPayload::SIZE, |b| {
            ShmemMapPayload::from_bytes(b).map(|_| ())
        });
        for bad in [
            ShmemMapPayload { len: 0, ..m },
            ShmemMapPayload {
                fd_offset: u64::MAX - 0xFFE,
                ..m
            },
            ShmemMapPayload {
                shm_offset: u64::MAX,
                ..m
            },
            ShmemMapPayload { flags: 2, ..m },
        ] {
            assert!(
                matches!(
                    ShmemMapPayload::from_bytes(&bad.to_bytes()),
                    Err(Error::InvalidParam(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn shmem_config() {
        let mut cfg = ShmemConfig::default();
        cfg.sizes[1] = 0x20_0000;
        cfg.sizes[5] = 0x1000;
        assert_eq!(cfg.nregions(), 2);
        let b = cfg.to_bytes();
        assert_eq!(b.len(), 2056);
        assert_eq!(&b[..4], &2u32.to_ne_bytes());
        assert_eq!(ShmemConfig::from_bytes(&b).unwrap(), cfg);
        sizes_rejected(ShmemConfig::SIZE, |b| {
            ShmemConfig::from_bytes(b).map(|_| ())
        });
        // A count that is a prefix length (6) rather than a count (2).
        let mut bad = b.clone();
        bad[..4].copy_from_slice(&6u32.to_ne_bytes());
        assert!(matches!(
            ShmemConfig::from_bytes(&bad),
            Err(Error::InvalidParam(_))
        ));
        bad[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(ShmemConfig::from_bytes(&bad).is_err());
        // Built from a device's (shmid, size) list, and back.
        let built = ShmemConfig::from_regions(&[(5, 0x1000), (1, 0x20_0000)]).unwrap();
        assert_eq!(built, cfg);
        assert_eq!(built.regions(), vec![(1, 0x20_0000), (5, 0x1000)]);
        let full: Vec<_> = (0..=u8::MAX).map(|i| (i, 0x1000)).collect();
        assert_eq!(ShmemConfig::from_regions(&full).unwrap().nregions(), 256);
        assert!(ShmemConfig::from_regions(&[(3, 0)]).is_err());
        assert!(ShmemConfig::from_regions(&[(3, 0x1000), (3, 0x2000)]).is_err());
    }

    #[test]
    fn rarp() {
        let r = RarpPayload([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let b = r.to_bytes();
        assert_eq!(&b[..6], &r.0);
        assert_eq!(RarpPayload::from_bytes(&b).unwrap(), r);
        sizes_rejected(RarpPayload::SIZE, |b| {
            RarpPayload::from_bytes(b).map(|_| ())
        });
    }

    #[test]
    fn crypto_session_bounds() {
        let c = CryptoSessionPayload(vec![1; 600]);
        assert_eq!(CryptoSessionPayload::from_bytes(&c.to_bytes()).unwrap(), c);
        CryptoSessionPayload::from_bytes(&[0; MAX_BODY_SIZE]).unwrap();
        assert!(CryptoSessionPayload::from_bytes(&[]).is_err());
        assert!(CryptoSessionPayload::from_bytes(&[0; MAX_BODY_SIZE + 1]).is_err());
    }
}
