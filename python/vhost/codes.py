"""Request codes, feature bits and constants of the vhost-user protocol.

Member names are those of the vhost-user specification (QEMU ``docs/interop/vhost-user.rst``)
without their C prefixes: ``VHOST_USER_GET_FEATURES`` is :attr:`FrontendRequest.GET_FEATURES`,
``VHOST_USER_BACKEND_IOTLB_MSG`` is :attr:`BackendRequest.IOTLB_MSG` and
``VHOST_USER_PROTOCOL_F_REPLY_ACK`` is :attr:`ProtocolFeature.REPLY_ACK`. The specification's
modern names are used (front-end / back-end); ``SET_BACKEND_REQ_FD`` was once called
``SET_SLAVE_REQ_FD``, and ``ProtocolFeature.BACKEND_REQ`` was once ``SLAVE_REQ``.

Feature members are masks (``1 << bit``), so they combine with ``|`` and test with ``&``
against the u64 the peer sends. Values were checked against the specification and QEMU's
own definitions (``hw/virtio/vhost-user.c``, ``include/hw/virtio/vhost-user.h``).

Converting a code received from a peer into one of these enums raises ``ValueError`` for an
unassigned value; code that handles untrusted input checks the value first
(:func:`frontend_request_name` does this for log messages).
"""

from __future__ import annotations

import enum

__all__ = [
    "MAX_CONFIG_SIZE",
    "MAX_MEM_TABLE_REGIONS",
    "MAX_MSG_SIZE",
    "MAX_SHMEM_REGIONS",
    "MEMORY_BASELINE_NREGIONS",
    "VERSION",
    "VERSION_MASK",
    "VHOST_LOG_PAGE",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendRequest",
    "FrontendRequest",
    "MessageFlag",
    "MigrationPhase",
    "ProtocolFeature",
    "TransferDirection",
    "backend_request_name",
    "frontend_request_name",
]


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends to the back-end (the ``request`` field of the header)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    """Deprecated by the specification; back-ends ignore it or disable all rings."""
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    """In-band kick (``ProtocolFeature.INBAND_NOTIFICATIONS``)."""
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    """Needs ``ProtocolFeature.SHMEM``; added to QEMU in 2026."""
    GET_VRING_BASE_SKIP_DRAIN = 45
    """Needs ``ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN``; added to QEMU in 2026."""


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends to the front-end on the back-end channel.

    The channel is the socket passed with ``FrontendRequest.SET_BACKEND_REQ_FD``.
    """

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    """Needs ``ProtocolFeature.SHMEM``."""
    SHMEM_UNMAP = 10
    """Needs ``ProtocolFeature.SHMEM``."""


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (``GET_PROTOCOL_FEATURES`` / ``SET_PROTOCOL_FEATURES``)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << 22
    """Bit 22 in QEMU and the specification; the rust-vmm ``vhost`` crate up to 0.16 used 21."""
    GET_VRING_BASE_SKIP_DRAIN = 1 << 23

    NET_MTU = MTU
    """QEMU's name for :attr:`MTU` (``VHOST_USER_PROTOCOL_F_NET_MTU``)."""


class MessageFlag(enum.IntFlag):
    """Bits of the ``flags`` field of the message header, above the version bits."""

    REPLY = 1 << 2
    """Set on every reply."""
    NEED_REPLY = 1 << 3
    """The sender asks for a REPLY_ACK (needs ``ProtocolFeature.REPLY_ACK``)."""


class TransferDirection(enum.IntEnum):
    """Direction of a device state transfer (``SET_DEVICE_STATE_FD``)."""

    SAVE = 0
    """From the back-end to the front-end (source side of a migration)."""
    LOAD = 1
    """From the front-end to the back-end (destination side of a migration)."""


class MigrationPhase(enum.IntEnum):
    """Phase of the migration during a device state transfer (``SET_DEVICE_STATE_FD``)."""

    STOPPED = 0
    """The guest is stopped and the device is suspended (all rings stopped)."""


VHOST_USER_F_PROTOCOL_FEATURES: int = 1 << 30
"""Mask of the virtio feature bit 30 that a back-end sets in ``GET_FEATURES`` to announce
protocol features. The C macro of the same name is the bit number (30), not the mask."""

VERSION: int = 0x1
"""The protocol version, in the low bits of the header flags."""

VERSION_MASK: int = 0x3
"""The header flag bits that hold the version."""

VRING_IDX_MASK: int = 0xFF
"""Bits of the u64 payload of ``SET_VRING_KICK`` / ``CALL`` / ``ERR`` that hold the index."""

VRING_NOFD_MASK: int = 1 << 8
"""Bit of that payload saying that no file descriptor is attached (poll instead)."""

MAX_CONFIG_SIZE: int = 256
"""Largest device config space access QEMU makes (``VHOST_USER_MAX_CONFIG_SIZE``)."""

MAX_MSG_SIZE: int = 0x1000
"""Largest message body this package accepts, as in rust-vmm (the spec sets no limit)."""

MEMORY_BASELINE_NREGIONS: int = 8
"""Most regions in one ``SET_MEM_TABLE`` in the baseline protocol (QEMU never sends more)."""

MAX_MEM_TABLE_REGIONS: int = 32
"""Most regions in one ``SET_MEM_TABLE`` this package sends and accepts, as rust-vmm (one fd
each, and 32 is also the most fds one message may carry); more need ``ADD_MEM_REG``."""

MAX_SHMEM_REGIONS: int = 256
"""Most VIRTIO Shared Memory Regions a device can have (``shmid`` is one byte); the size of
the array in the ``GET_SHMEM_CONFIG`` reply."""

VHOST_LOG_PAGE: int = 0x1000
"""Bytes of guest memory covered by one bit of the dirty log."""


def frontend_request_name(code: int) -> str:
    """The spec name of a front-end request code, or ``"UNKNOWN(0x...)"``; never raises."""
    if code in _FRONTEND_VALUES:
        return FrontendRequest(code).name
    return f"UNKNOWN({code:#x})"


def backend_request_name(code: int) -> str:
    """The spec name of a back-end request code, or ``"UNKNOWN(0x...)"``; never raises."""
    if code in _BACKEND_VALUES:
        return BackendRequest(code).name
    return f"UNKNOWN({code:#x})"


_FRONTEND_VALUES: frozenset[int] = frozenset(int(member) for member in FrontendRequest)
_BACKEND_VALUES: frozenset[int] = frozenset(int(member) for member in BackendRequest)
