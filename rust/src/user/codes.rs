//! Request codes and feature bits of the vhost-user protocol.
//!
//! Values follow the vhost-user specification (QEMU `docs/interop/vhost-user.rst`) as of
//! QEMU master in 2026, which includes `GET_VRING_BASE_INFLIGHT` (protocol feature 20),
//! `GPA_ADDRESSES` (21), the VIRTIO Shared Memory Region messages (`SHMEM`, feature 22,
//! front-end request 44 and back-end requests 9 and 10).
//!
//! A code that arrives from the peer is a plain `u32` until [`FrontendReq::from_code`] or
//! [`BackendReq::from_code`] accepts it: unknown values (0, gaps, `0xFFFF_FFFF`) never
//! become an enum (ADVERSARIAL A2).

/// virtio feature bit 30 (`VHOST_USER_F_PROTOCOL_FEATURES`): the back-end supports
/// `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES`, and rings start disabled.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// virtio feature bit 26 (`VHOST_F_LOG_ALL`): the front-end wants dirty-page logging.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Most regions a `SET_MEM_TABLE` carries in the baseline protocol
/// (`VHOST_MEMORY_BASELINE_NREGIONS` in QEMU, which never sends more). More regions need
/// `CONFIGURE_MEM_SLOTS` and `ADD_MEM_REG`.
pub const MAX_MEM_REGIONS_BASELINE: usize = 8;

/// Most regions one `SET_MEM_TABLE` may carry here, on both sides: rust-vmm's limit, so a
/// front-end built on it that sends more than QEMU's 8 is served. One fd per region
/// travels in one message, so it cannot exceed the fds a message may carry.
pub const MAX_MEM_TABLE_REGIONS: usize = 32;
const _: () = assert!(MAX_MEM_TABLE_REGIONS <= crate::sys::MAX_FDS);

/// Largest device config space a `GET_CONFIG` / `SET_CONFIG` can address: QEMU's
/// `VhostUserConfig` carries at most 256 bytes (`VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: u32 = 256;

/// Most fds one back-end request may carry (spec, "Back-end communication").
pub const MAX_BACKEND_REQ_FDS: usize = 8;

/// Requests the front-end sends to the back-end on the main socket.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrontendReq {
    /// The virtio features the back-end offers.
    GetFeatures = 1,
    /// The features the front-end acks.
    SetFeatures = 2,
    /// Starts a session: the sender owns the back-end.
    SetOwner = 3,
    /// Deprecated by the spec; a back-end may ignore it.
    ResetOwner = 4,
    /// The guest's memory table, one fd per region.
    SetMemTable = 5,
    /// Where the dirty log is (LOG_SHMFD).
    SetLogBase = 6,
    /// The eventfd of the dirty log (LOG_SHMFD).
    SetLogFd = 7,
    /// A queue's size.
    SetVringNum = 8,
    /// A queue's ring addresses.
    SetVringAddr = 9,
    /// Where a queue resumes.
    SetVringBase = 10,
    /// Stops a queue and asks where it stopped.
    GetVringBase = 11,
    /// The eventfd the driver kicks a queue with.
    SetVringKick = 12,
    /// The eventfd the back-end signals a queue's used buffers on.
    SetVringCall = 13,
    /// The eventfd the back-end signals a broken queue on.
    SetVringErr = 14,
    /// The protocol features the back-end offers.
    GetProtocolFeatures = 15,
    /// The protocol features the front-end acks.
    SetProtocolFeatures = 16,
    /// How many queues the back-end has (MQ).
    GetQueueNum = 17,
    /// Starts or stops a queue (PROTOCOL_FEATURES rings start disabled).
    SetVringEnable = 18,
    /// Announce the guest's MAC after a migration (RARP).
    SendRarp = 19,
    /// The MTU the guest driver set (MTU).
    NetSetMtu = 20,
    /// Formerly `SET_SLAVE_REQ_FD`.
    SetBackendReqFd = 21,
    /// A device IOTLB update or invalidation (IOMMU platform).
    IotlbMsg = 22,
    /// A legacy ring's byte order (CROSS_ENDIAN).
    SetVringEndian = 23,
    /// Reads device config space (CONFIG).
    GetConfig = 24,
    /// Writes device config space (CONFIG).
    SetConfig = 25,
    /// Opens a crypto session (CRYPTO_SESSION).
    CreateCryptoSession = 26,
    /// Closes a crypto session (CRYPTO_SESSION).
    CloseCryptoSession = 27,
    /// Asks for a userfaultfd over the back-end's mappings (PAGEFAULT).
    PostcopyAdvise = 28,
    /// Postcopy begins: memory may fault from now on (PAGEFAULT).
    PostcopyListen = 29,
    /// Postcopy is over (PAGEFAULT).
    PostcopyEnd = 30,
    /// Asks for a shared area that records in-flight requests (INFLIGHT_SHMFD).
    GetInflightFd = 31,
    /// Hands the in-flight area back after a reconnect (INFLIGHT_SHMFD).
    SetInflightFd = 32,
    /// The socket of the GPU protocol (vhost-user-gpu).
    GpuSetSocket = 33,
    /// Resets the device, keeping the session (RESET_DEVICE).
    ResetDevice = 34,
    /// The in-band kick of a queue (INBAND_NOTIFICATIONS).
    VringKick = 35,
    /// How many regions the back-end can map (CONFIGURE_MEM_SLOTS).
    GetMaxMemSlots = 36,
    /// Adds one memory region (CONFIGURE_MEM_SLOTS).
    AddMemReg = 37,
    /// Removes one memory region (CONFIGURE_MEM_SLOTS).
    RemMemReg = 38,
    /// The virtio device status byte (STATUS).
    SetStatus = 39,
    /// Asks for the virtio device status byte (STATUS).
    GetStatus = 40,
    /// Asks for the dma-buf exported under a UUID (SHARED_OBJECT).
    GetSharedObject = 41,
    /// Starts a device state transfer over a pipe (DEVICE_STATE).
    SetDeviceStateFd = 42,
    /// Whether the last state transfer succeeded (DEVICE_STATE).
    CheckDeviceState = 43,
    /// Reply: the sizes of the device's VIRTIO Shared Memory Regions (`SHMEM`).
    GetShmemConfig = 44,
}

impl FrontendReq {
    /// Every request, in code order.
    pub const ALL: &'static [FrontendReq] = &[
        FrontendReq::GetFeatures,
        FrontendReq::SetFeatures,
        FrontendReq::SetOwner,
        FrontendReq::ResetOwner,
        FrontendReq::SetMemTable,
        FrontendReq::SetLogBase,
        FrontendReq::SetLogFd,
        FrontendReq::SetVringNum,
        FrontendReq::SetVringAddr,
        FrontendReq::SetVringBase,
        FrontendReq::GetVringBase,
        FrontendReq::SetVringKick,
        FrontendReq::SetVringCall,
        FrontendReq::SetVringErr,
        FrontendReq::GetProtocolFeatures,
        FrontendReq::SetProtocolFeatures,
        FrontendReq::GetQueueNum,
        FrontendReq::SetVringEnable,
        FrontendReq::SendRarp,
        FrontendReq::NetSetMtu,
        FrontendReq::SetBackendReqFd,
        FrontendReq::IotlbMsg,
        FrontendReq::SetVringEndian,
        FrontendReq::GetConfig,
        FrontendReq::SetConfig,
        FrontendReq::CreateCryptoSession,
        FrontendReq::CloseCryptoSession,
        FrontendReq::PostcopyAdvise,
        FrontendReq::PostcopyListen,
        FrontendReq::PostcopyEnd,
        FrontendReq::GetInflightFd,
        FrontendReq::SetInflightFd,
        FrontendReq::GpuSetSocket,
        FrontendReq::ResetDevice,
        FrontendReq::VringKick,
        FrontendReq::GetMaxMemSlots,
        FrontendReq::AddMemReg,
        FrontendReq::RemMemReg,
        FrontendReq::SetStatus,
        FrontendReq::GetStatus,
        FrontendReq::GetSharedObject,
        FrontendReq::SetDeviceStateFd,
        FrontendReq::CheckDeviceState,
        FrontendReq::GetShmemConfig,
    ];

    /// The request with this wire code, or `None` for 0, gaps and anything unassigned.
    pub fn from_code(code: u32) -> Option<Self> {
        use FrontendReq as R;
        Some(match code {
            1 => R::GetFeatures,
            2 => R::SetFeatures,
            3 => R::SetOwner,
            4 => R::ResetOwner,
            5 => R::SetMemTable,
            6 => R::SetLogBase,
            7 => R::SetLogFd,
            8 => R::SetVringNum,
            9 => R::SetVringAddr,
            10 => R::SetVringBase,
            11 => R::GetVringBase,
            12 => R::SetVringKick,
            13 => R::SetVringCall,
            14 => R::SetVringErr,
            15 => R::GetProtocolFeatures,
            16 => R::SetProtocolFeatures,
            17 => R::GetQueueNum,
            18 => R::SetVringEnable,
            19 => R::SendRarp,
            20 => R::NetSetMtu,
            21 => R::SetBackendReqFd,
            22 => R::IotlbMsg,
            23 => R::SetVringEndian,
            24 => R::GetConfig,
            25 => R::SetConfig,
            26 => R::CreateCryptoSession,
            27 => R::CloseCryptoSession,
            28 => R::PostcopyAdvise,
            29 => R::PostcopyListen,
            30 => R::PostcopyEnd,
            31 => R::GetInflightFd,
            32 => R::SetInflightFd,
            33 => R::GpuSetSocket,
            34 => R::ResetDevice,
            35 => R::VringKick,
            36 => R::GetMaxMemSlots,
            37 => R::AddMemReg,
            38 => R::RemMemReg,
            39 => R::SetStatus,
            40 => R::GetStatus,
            41 => R::GetSharedObject,
            42 => R::SetDeviceStateFd,
            43 => R::CheckDeviceState,
            44 => R::GetShmemConfig,
            _ => return None,
        })
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The spec name without the `VHOST_USER_` prefix, e.g. `"GET_FEATURES"`.
    pub fn name(self) -> &'static str {
        use FrontendReq as R;
        match self {
            R::GetFeatures => "GET_FEATURES",
            R::SetFeatures => "SET_FEATURES",
            R::SetOwner => "SET_OWNER",
            R::ResetOwner => "RESET_OWNER",
            R::SetMemTable => "SET_MEM_TABLE",
            R::SetLogBase => "SET_LOG_BASE",
            R::SetLogFd => "SET_LOG_FD",
            R::SetVringNum => "SET_VRING_NUM",
            R::SetVringAddr => "SET_VRING_ADDR",
            R::SetVringBase => "SET_VRING_BASE",
            R::GetVringBase => "GET_VRING_BASE",
            R::SetVringKick => "SET_VRING_KICK",
            R::SetVringCall => "SET_VRING_CALL",
            R::SetVringErr => "SET_VRING_ERR",
            R::GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
            R::SetProtocolFeatures => "SET_PROTOCOL_FEATURES",
            R::GetQueueNum => "GET_QUEUE_NUM",
            R::SetVringEnable => "SET_VRING_ENABLE",
            R::SendRarp => "SEND_RARP",
            R::NetSetMtu => "NET_SET_MTU",
            R::SetBackendReqFd => "SET_BACKEND_REQ_FD",
            R::IotlbMsg => "IOTLB_MSG",
            R::SetVringEndian => "SET_VRING_ENDIAN",
            R::GetConfig => "GET_CONFIG",
            R::SetConfig => "SET_CONFIG",
            R::CreateCryptoSession => "CREATE_CRYPTO_SESSION",
            R::CloseCryptoSession => "CLOSE_CRYPTO_SESSION",
            R::PostcopyAdvise => "POSTCOPY_ADVISE",
            R::PostcopyListen => "POSTCOPY_LISTEN",
            R::PostcopyEnd => "POSTCOPY_END",
            R::GetInflightFd => "GET_INFLIGHT_FD",
            R::SetInflightFd => "SET_INFLIGHT_FD",
            R::GpuSetSocket => "GPU_SET_SOCKET",
            R::ResetDevice => "RESET_DEVICE",
            R::VringKick => "VRING_KICK",
            R::GetMaxMemSlots => "GET_MAX_MEM_SLOTS",
            R::AddMemReg => "ADD_MEM_REG",
            R::RemMemReg => "REM_MEM_REG",
            R::SetStatus => "SET_STATUS",
            R::GetStatus => "GET_STATUS",
            R::GetSharedObject => "GET_SHARED_OBJECT",
            R::SetDeviceStateFd => "SET_DEVICE_STATE_FD",
            R::CheckDeviceState => "CHECK_DEVICE_STATE",
            R::GetShmemConfig => "GET_SHMEM_CONFIG",
        }
    }

    /// The protocol feature bit (a mask from [`protocol_features`]) this request needs,
    /// if any.
    ///
    /// `None` does not always mean "ungated": `GET_/SET_PROTOCOL_FEATURES` and
    /// `SET_VRING_ENABLE` need the virtio bit [`VHOST_USER_F_PROTOCOL_FEATURES`], and
    /// `IOTLB_MSG` needs `VIRTIO_F_ACCESS_PLATFORM`; those are virtio features, not
    /// protocol features, and are the session's to check. `SET_LOG_BASE` is gated on
    /// `LOG_SHMFD` because without it the log has no fd the back-end could map.
    pub fn required_protocol_feature(self) -> Option<u64> {
        use protocol_features as pf;
        use FrontendReq as R;
        match self {
            R::SetLogBase => Some(pf::LOG_SHMFD),
            R::GetQueueNum => Some(pf::MQ),
            R::SendRarp => Some(pf::RARP),
            R::NetSetMtu => Some(pf::MTU),
            R::SetBackendReqFd => Some(pf::BACKEND_REQ),
            R::SetVringEndian => Some(pf::CROSS_ENDIAN),
            R::GetConfig | R::SetConfig => Some(pf::CONFIG),
            R::CreateCryptoSession | R::CloseCryptoSession => Some(pf::CRYPTO_SESSION),
            R::PostcopyAdvise | R::PostcopyListen | R::PostcopyEnd => Some(pf::PAGEFAULT),
            R::GetInflightFd | R::SetInflightFd => Some(pf::INFLIGHT_SHMFD),
            R::ResetDevice => Some(pf::RESET_DEVICE),
            R::VringKick => Some(pf::INBAND_NOTIFICATIONS),
            R::GetMaxMemSlots | R::AddMemReg | R::RemMemReg => Some(pf::CONFIGURE_MEM_SLOTS),
            R::SetStatus | R::GetStatus => Some(pf::STATUS),
            R::GetSharedObject => Some(pf::SHARED_OBJECT),
            R::SetDeviceStateFd | R::CheckDeviceState => Some(pf::DEVICE_STATE),
            R::GetShmemConfig => Some(pf::SHMEM),
            R::GetFeatures
            | R::SetFeatures
            | R::SetOwner
            | R::ResetOwner
            | R::SetMemTable
            | R::SetLogFd
            | R::SetVringNum
            | R::SetVringAddr
            | R::SetVringBase
            | R::GetVringBase
            | R::SetVringKick
            | R::SetVringCall
            | R::SetVringErr
            | R::GetProtocolFeatures
            | R::SetProtocolFeatures
            | R::SetVringEnable
            | R::IotlbMsg
            | R::GpuSetSocket => None,
        }
    }
}

/// Requests the back-end sends to the front-end on the back-end channel (the socket
/// handed over with `SET_BACKEND_REQ_FD`; formerly the "slave" channel).
///
/// # The virtio-fs "fs map/unmap" family
///
/// Old rust-vmm `vhost` releases (`SlaveFsCacheReq`) carried four draft requests for the
/// virtio-fs DAX window: `FS_MAP`, `FS_UNMAP`, `FS_SYNC` and `FS_IO`. They were never in
/// the vhost-user specification, and their codes moved over time: first 4-6, later 6-9,
/// which collide with `VRING_CALL`/`VRING_ERR` and with `SHARED_OBJECT_*` (6-8) and
/// `SHMEM_MAP` (9) as the spec assigned them; rust-vmm then moved them to 1000-1003 and
/// finally dropped them. This crate does not recognise any of those codes (they decode as
/// unknown requests). The spec generalised the idea as [`BackendReq::ShmemMap`] /
/// [`BackendReq::ShmemUnmap`] on a VIRTIO Shared Memory Region, and that is how the fs
/// family is represented here: one `FS_MAP` entry (`fd_offset`, `cache_offset`, `len`,
/// read/write flags) is one `SHMEM_MAP` with `shmid` = the virtio-fs DAX cache region
/// (`VIRTIO_FS_SHMCAP_ID_CACHE`, 0), `shm_offset` = `cache_offset`; `FS_UNMAP` is
/// `SHMEM_UNMAP` on the same range. `FS_SYNC` (msync of the window) and `FS_IO` (copy
/// between an fd and guest memory) have no counterpart in the spec and are not supported.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendReq {
    /// A translation miss or access failure (IOMMU platform).
    IotlbMsg = 1,
    /// The config space changed; the driver re-reads it (CONFIG).
    ConfigChangeMsg = 2,
    /// A queue's doorbell page to map into the guest (HOST_NOTIFIER).
    VringHostNotifierMsg = 3,
    /// The in-band call of a queue (INBAND_NOTIFICATIONS).
    VringCall = 4,
    /// The in-band error of a queue (INBAND_NOTIFICATIONS).
    VringErr = 5,
    /// Exports an object under a UUID (SHARED_OBJECT).
    SharedObjectAdd = 6,
    /// Withdraws an exported object (SHARED_OBJECT).
    SharedObjectRemove = 7,
    /// Asks the front-end for an object exported under a UUID (SHARED_OBJECT).
    SharedObjectLookup = 8,
    /// Map an fd into a VIRTIO Shared Memory Region (`SHMEM`).
    ShmemMap = 9,
    /// Unmap a range of a VIRTIO Shared Memory Region (`SHMEM`).
    ShmemUnmap = 10,
}

impl BackendReq {
    /// Every request, in code order.
    pub const ALL: &'static [BackendReq] = &[
        BackendReq::IotlbMsg,
        BackendReq::ConfigChangeMsg,
        BackendReq::VringHostNotifierMsg,
        BackendReq::VringCall,
        BackendReq::VringErr,
        BackendReq::SharedObjectAdd,
        BackendReq::SharedObjectRemove,
        BackendReq::SharedObjectLookup,
        BackendReq::ShmemMap,
        BackendReq::ShmemUnmap,
    ];

    /// The request with this wire code, or `None` for 0 and anything unassigned
    /// (including the non-standard fs codes, see the type documentation).
    pub fn from_code(code: u32) -> Option<Self> {
        use BackendReq as R;
        Some(match code {
            1 => R::IotlbMsg,
            2 => R::ConfigChangeMsg,
            3 => R::VringHostNotifierMsg,
            4 => R::VringCall,
            5 => R::VringErr,
            6 => R::SharedObjectAdd,
            7 => R::SharedObjectRemove,
            8 => R::SharedObjectLookup,
            9 => R::ShmemMap,
            10 => R::ShmemUnmap,
            _ => return None,
        })
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The spec name without the `VHOST_USER_BACKEND_` prefix, e.g. `"IOTLB_MSG"`.
    pub fn name(self) -> &'static str {
        use BackendReq as R;
        match self {
            R::IotlbMsg => "IOTLB_MSG",
            R::ConfigChangeMsg => "CONFIG_CHANGE_MSG",
            R::VringHostNotifierMsg => "VRING_HOST_NOTIFIER_MSG",
            R::VringCall => "VRING_CALL",
            R::VringErr => "VRING_ERR",
            R::SharedObjectAdd => "SHARED_OBJECT_ADD",
            R::SharedObjectRemove => "SHARED_OBJECT_REMOVE",
            R::SharedObjectLookup => "SHARED_OBJECT_LOOKUP",
            R::ShmemMap => "SHMEM_MAP",
            R::ShmemUnmap => "SHMEM_UNMAP",
        }
    }

    /// The protocol feature bit this request needs besides `BACKEND_REQ` (which every
    /// request on this channel needs) and `BACKEND_SEND_FD` (which any request carrying
    /// an fd needs). `IOTLB_MSG` is gated on the virtio feature `VIRTIO_F_ACCESS_PLATFORM`
    /// instead, so it returns `None`.
    pub fn required_protocol_feature(self) -> Option<u64> {
        use protocol_features as pf;
        use BackendReq as R;
        match self {
            R::IotlbMsg => None,
            R::ConfigChangeMsg => Some(pf::CONFIG),
            R::VringHostNotifierMsg => Some(pf::HOST_NOTIFIER),
            R::VringCall | R::VringErr => Some(pf::INBAND_NOTIFICATIONS),
            R::SharedObjectAdd | R::SharedObjectRemove | R::SharedObjectLookup => {
                Some(pf::SHARED_OBJECT)
            }
            R::ShmemMap | R::ShmemUnmap => Some(pf::SHMEM),
        }
    }
}

/// Protocol feature bits (`VHOST_USER_PROTOCOL_F_*`), as masks.
pub mod protocol_features {
    /// The back-end has more than one queue and answers GET_QUEUE_NUM.
    pub const MQ: u64 = 1 << 0;
    /// Dirty logging into shared memory (SET_LOG_BASE, SET_LOG_FD).
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// SEND_RARP after a migration.
    pub const RARP: u64 = 1 << 2;
    /// A request may ask for a status reply (NEED_REPLY), so failures are not silent.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// `VHOST_USER_PROTOCOL_F_MTU` (`NET_MTU` in QEMU's source).
    pub const MTU: u64 = 1 << 4;
    /// Formerly `SLAVE_REQ`.
    pub const BACKEND_REQ: u64 = 1 << 5;
    /// SET_VRING_ENDIAN for legacy rings.
    pub const CROSS_ENDIAN: u64 = 1 << 6;
    /// CREATE_CRYPTO_SESSION and CLOSE_CRYPTO_SESSION.
    pub const CRYPTO_SESSION: u64 = 1 << 7;
    /// Postcopy migration (POSTCOPY_ADVISE, LISTEN, END).
    pub const PAGEFAULT: u64 = 1 << 8;
    /// GET_CONFIG and SET_CONFIG, and CONFIG_CHANGE_MSG on the back-end channel.
    pub const CONFIG: u64 = 1 << 9;
    /// Formerly `SLAVE_SEND_FD`.
    pub const BACKEND_SEND_FD: u64 = 1 << 10;
    /// VRING_HOST_NOTIFIER_MSG: the back-end hands doorbell pages to the front-end.
    pub const HOST_NOTIFIER: u64 = 1 << 11;
    /// GET_INFLIGHT_FD and SET_INFLIGHT_FD, so a restarted back-end loses no request.
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    /// RESET_DEVICE.
    pub const RESET_DEVICE: u64 = 1 << 13;
    /// VRING_KICK, VRING_CALL and VRING_ERR as messages instead of eventfds.
    pub const INBAND_NOTIFICATIONS: u64 = 1 << 14;
    /// GET_MAX_MEM_SLOTS, ADD_MEM_REG and REM_MEM_REG.
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    /// SET_STATUS and GET_STATUS.
    pub const STATUS: u64 = 1 << 16;
    /// Changes the memory region layout (two extra u32 per region). This crate's
    /// decoders only know the plain 32-byte region, so never offer this bit.
    pub const XEN_MMAP: u64 = 1 << 17;
    /// GET_SHARED_OBJECT and the SHARED_OBJECT_* back-end requests.
    pub const SHARED_OBJECT: u64 = 1 << 18;
    /// SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE: device state migrates through a pipe.
    pub const DEVICE_STATE: u64 = 1 << 19;
    /// `GET_VRING_BASE` may leave in-flight requests recorded in the inflight area
    /// instead of completing them.
    pub const GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;
    /// Ring and region addresses are guest-physical rather than front-end virtual.
    pub const GPA_ADDRESSES: u64 = 1 << 21;
    /// VIRTIO Shared Memory Regions: `GET_SHMEM_CONFIG`, `SHMEM_MAP`, `SHMEM_UNMAP`.
    /// Bit 22 in the spec; rust-vmm `vhost` up to 0.16 used 21 (now `GPA_ADDRESSES`)
    /// and an earlier draft used 20, so peers built on those do not negotiate it with us.
    pub const SHMEM: u64 = 1 << 22;

    /// Every bit this crate knows.
    pub const ALL: u64 = MQ
        | LOG_SHMFD
        | RARP
        | REPLY_ACK
        | MTU
        | BACKEND_REQ
        | CROSS_ENDIAN
        | CRYPTO_SESSION
        | PAGEFAULT
        | CONFIG
        | BACKEND_SEND_FD
        | HOST_NOTIFIER
        | INFLIGHT_SHMFD
        | RESET_DEVICE
        | INBAND_NOTIFICATIONS
        | CONFIGURE_MEM_SLOTS
        | STATUS
        | XEN_MMAP
        | SHARED_OBJECT
        | DEVICE_STATE
        | GET_VRING_BASE_INFLIGHT
        | GPA_ADDRESSES
        | SHMEM;

    const NAMES: [&str; 23] = [
        "MQ",
        "LOG_SHMFD",
        "RARP",
        "REPLY_ACK",
        "MTU",
        "BACKEND_REQ",
        "CROSS_ENDIAN",
        "CRYPTO_SESSION",
        "PAGEFAULT",
        "CONFIG",
        "BACKEND_SEND_FD",
        "HOST_NOTIFIER",
        "INFLIGHT_SHMFD",
        "RESET_DEVICE",
        "INBAND_NOTIFICATIONS",
        "CONFIGURE_MEM_SLOTS",
        "STATUS",
        "XEN_MMAP",
        "SHARED_OBJECT",
        "DEVICE_STATE",
        "GET_VRING_BASE_INFLIGHT",
        "GPA_ADDRESSES",
        "SHMEM",
    ];

    /// The spec name (without `VHOST_USER_PROTOCOL_F_`) of a feature given as a mask
    /// with exactly one bit set, e.g. `name(MQ) == Some("MQ")`. `None` for unknown bits
    /// and for masks with zero or several bits.
    pub fn name(bit: u64) -> Option<&'static str> {
        if !bit.is_power_of_two() {
            return None;
        }
        NAMES.get(bit.trailing_zeros() as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_codes_round_trip() {
        assert_eq!(FrontendReq::ALL.len(), 44);
        for (i, &r) in FrontendReq::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1, "{r:?} out of order");
            assert_eq!(FrontendReq::from_code(r.code()), Some(r));
            assert!(!r.name().is_empty());
        }
        let mut names: Vec<_> = FrontendReq::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FrontendReq::ALL.len());
    }

    #[test]
    fn frontend_rejects_unknown_codes() {
        for code in [0, 45, 46, 100, 1000, 0x7FFF_FFFF, 0xFFFF_FFFF] {
            assert_eq!(FrontendReq::from_code(code), None, "{code}");
        }
        for code in 0..=u32::from(u16::MAX) {
            let known = (1..=44).contains(&code);
            assert_eq!(FrontendReq::from_code(code).is_some(), known, "{code}");
        }
    }

    #[test]
    fn backend_codes_round_trip() {
        assert_eq!(BackendReq::ALL.len(), 10);
        for (i, &r) in BackendReq::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1);
            assert_eq!(BackendReq::from_code(r.code()), Some(r));
        }
    }

    #[test]
    fn backend_rejects_unknown_and_fs_codes() {
        for code in [0, 11, 12, 1000, 1001, 1002, 1003, 0xFFFF_FFFF] {
            assert_eq!(BackendReq::from_code(code), None, "{code}");
        }
    }

    #[test]
    fn spec_codes() {
        assert_eq!(FrontendReq::SetBackendReqFd.code(), 21);
        assert_eq!(FrontendReq::GetSharedObject.code(), 41);
        assert_eq!(FrontendReq::SetDeviceStateFd.code(), 42);
        assert_eq!(FrontendReq::CheckDeviceState.code(), 43);
        assert_eq!(FrontendReq::GetShmemConfig.code(), 44);
        assert_eq!(BackendReq::SharedObjectAdd.code(), 6);
        assert_eq!(BackendReq::SharedObjectLookup.code(), 8);
        assert_eq!(BackendReq::ShmemMap.code(), 9);
        assert_eq!(BackendReq::ShmemUnmap.code(), 10);
        assert_eq!(FrontendReq::GetFeatures.name(), "GET_FEATURES");
        assert_eq!(BackendReq::ShmemMap.name(), "SHMEM_MAP");
    }

    #[test]
    fn feature_gates() {
        use protocol_features as pf;
        assert_eq!(
            FrontendReq::GetConfig.required_protocol_feature(),
            Some(pf::CONFIG)
        );
        assert_eq!(
            FrontendReq::AddMemReg.required_protocol_feature(),
            Some(pf::CONFIGURE_MEM_SLOTS)
        );
        assert_eq!(
            FrontendReq::SetBackendReqFd.required_protocol_feature(),
            Some(pf::BACKEND_REQ)
        );
        assert_eq!(FrontendReq::GetFeatures.required_protocol_feature(), None);
        assert_eq!(
            BackendReq::ShmemMap.required_protocol_feature(),
            Some(pf::SHMEM)
        );
        for r in FrontendReq::ALL {
            if let Some(bit) = r.required_protocol_feature() {
                assert!(pf::name(bit).is_some(), "{r:?}");
            }
        }
        for r in BackendReq::ALL {
            if let Some(bit) = r.required_protocol_feature() {
                assert!(pf::name(bit).is_some(), "{r:?}");
            }
        }
    }

    #[test]
    fn protocol_feature_names() {
        use protocol_features as pf;
        assert_eq!(pf::ALL, (1 << 23) - 1);
        assert_eq!(pf::name(pf::MQ), Some("MQ"));
        assert_eq!(pf::name(pf::BACKEND_REQ), Some("BACKEND_REQ"));
        assert_eq!(pf::name(pf::DEVICE_STATE), Some("DEVICE_STATE"));
        assert_eq!(pf::name(pf::GPA_ADDRESSES), Some("GPA_ADDRESSES"));
        assert_eq!(pf::name(pf::SHMEM), Some("SHMEM"));
        assert_eq!(pf::name(0), None);
        assert_eq!(pf::name(pf::MQ | pf::RARP), None);
        assert_eq!(pf::name(1 << 23), None);
        assert_eq!(pf::name(1 << 63), None);
        for i in 0..23 {
            assert!(pf::name(1 << i).is_some(), "{i}");
        }
        assert_eq!(VHOST_USER_F_PROTOCOL_FEATURES, 0x4000_0000);
    }
}
