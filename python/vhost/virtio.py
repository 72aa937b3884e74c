"""Virtio constants: feature bits, device IDs and device status bits.

Values come from the VIRTIO specification (OASIS, 1.3 and the current draft) and, for the
two vhost-specific bits, from ``linux/vhost_types.h`` and the vhost-user specification.
Feature members are masks (``1 << bit``), ready to combine with the u64 feature words that
``VhostBackend.get_features`` returns. Only bits below 64 are listed: vhost negotiates a
single 64-bit word.

Virtqueues (split and packed, both sides; native, in the Rust core):

- :class:`DeviceQueue` is the device side, what a back-end uses on a ring the front-end
  set up: :meth:`~DeviceQueue.pop_batch` returns :class:`DescriptorChain` objects (guest
  addresses of the buffer segments; move the bytes with :class:`~vhost.GuestMemory`),
  :meth:`~DeviceQueue.add_used` returns them; :meth:`~DeviceQueue.read_chain` and
  :meth:`~DeviceQueue.write_chain` copy a chain's bytes in one call.
- :class:`Virtqueue` is the driver side, what a front-end or test rig uses to offer
  buffers: :meth:`~Virtqueue.add`, :meth:`~Virtqueue.publish`, then collect them with
  :meth:`~Virtqueue.poll_used`.
- :func:`ring_sizes`, :func:`place_rings`, :func:`gpa_to_user` and :func:`setup_queue`
  are the arithmetic and the few control-plane calls around them; :func:`wait_used` waits
  for the device to return buffers.

Everything the peer writes into a ring is checked; a corrupt ring raises
:class:`~vhost.errors.QueueError` and leaves the queue broken.
"""

from __future__ import annotations

import enum
import time

from . import _core
from .backend import EventFdLike, VhostBackend
from .errors import InvalidQueueError, VhostTimeoutError
from .types import VringAddrFlag, VringConfig

__all__ = [
    "DEVICE_FEATURES",
    "DEVICE_NAMES",
    "BlkFeature",
    "DescriptorChain",
    "DeviceId",
    "DeviceQueue",
    "DeviceStatus",
    "FsFeature",
    "NetFeature",
    "VirtioFeature",
    "Virtqueue",
    "VsockFeature",
    "gpa_to_user",
    "place_rings",
    "ring_sizes",
    "setup_queue",
    "wait_used",
]


# --------------------------------------------------------------------------------------
# Feature bits shared by every device type
# --------------------------------------------------------------------------------------


class VirtioFeature(enum.IntFlag):
    """Device-independent feature bits (bits 24 to 43), plus the two that vhost reuses."""

    NOTIFY_ON_EMPTY = 1 << 24
    """Legacy: notify the driver when the available ring runs empty."""
    LOG_ALL = 1 << 26
    """vhost ``VHOST_F_LOG_ALL``: the back-end logs every write to guest memory (migration).
    Not a virtio bit: only a vhost front-end and back-end negotiate it."""
    ANY_LAYOUT = 1 << 27
    """Legacy: the device accepts any descriptor layout."""
    RING_INDIRECT_DESC = 1 << 28
    """``VIRTIO_F_INDIRECT_DESC`` in the spec, ``VIRTIO_RING_F_INDIRECT_DESC`` in Linux."""
    RING_EVENT_IDX = 1 << 29
    """``VIRTIO_F_EVENT_IDX`` in the spec, ``VIRTIO_RING_F_EVENT_IDX`` in Linux."""
    PROTOCOL_FEATURES = 1 << 30
    """vhost-user ``VHOST_USER_F_PROTOCOL_FEATURES``: the back-end supports protocol feature
    negotiation. Bit 30 is an unused legacy virtio bit that no virtio device offers."""
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40
    ADMIN_VQ = 1 << 41
    SUSPEND = 1 << 43

    INDIRECT_DESC = RING_INDIRECT_DESC
    """The spec's name for :attr:`RING_INDIRECT_DESC`."""
    EVENT_IDX = RING_EVENT_IDX
    """The spec's name for :attr:`RING_EVENT_IDX`."""
    IOMMU_PLATFORM = ACCESS_PLATFORM
    """The old name of :attr:`ACCESS_PLATFORM`, still used by the vhost-user spec."""


# --------------------------------------------------------------------------------------
# Device identification and status
# --------------------------------------------------------------------------------------


class DeviceId(enum.IntEnum):
    """Virtio device IDs (names as in Linux ``virtio_ids.h`` where it has them)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    IOMEM = 6
    RPMSG = 7
    SCSI = 8
    NINEP = 9
    """9P transport."""
    MAC80211_WLAN = 10
    RPROC_SERIAL = 11
    CAIF = 12
    MEMORY_BALLOON = 13
    GPU = 16
    CLOCK = 17
    """Real time clock device."""
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    SIGNAL_DIST = 21
    PSTORE = 22
    IOMMU = 23
    MEM = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    RPMB = 28
    MAC80211_HWSIM = 29
    VIDEO_ENCODER = 30
    VIDEO_DECODER = 31
    SCMI = 32
    NITRO_SEC_MOD = 33
    I2C_ADAPTER = 34
    WATCHDOG = 35
    CAN = 36
    PARAM_SERV = 38
    AUDIO_POLICY = 39
    BT = 40
    GPIO = 41
    RDMA = 42
    CAMERA = 43
    ISM = 44
    SPI = 45
    TEE = 46
    CPU_BALLOON = 47


class DeviceStatus(enum.IntFlag):
    """Bits of the device status field (``SET_STATUS`` / ``GET_STATUS``, vDPA status)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16
    """Only with ``VirtioFeature.SUSPEND``."""
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


# --------------------------------------------------------------------------------------
# Device-specific feature bits (bits 0 to 23, and 50 to 63 for net)
# --------------------------------------------------------------------------------------


class BlkFeature(enum.IntFlag):
    """virtio-blk feature bits."""

    BARRIER = 1 << 0
    """Legacy interface only."""
    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    SCSI = 1 << 7
    """Legacy interface only."""
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14
    LIFETIME = 1 << 15
    SECURE_ERASE = 1 << 16
    ZONED = 1 << 17


class NetFeature(enum.IntFlag):
    """virtio-net feature bits below 64 (the spec defines more, from 64 up)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    DEVICE_STATS = 1 << 50
    HASH_TUNNEL = 1 << 51
    VQ_NOTF_COAL = 1 << 52
    NOTF_COAL = 1 << 53
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63


class FsFeature(enum.IntFlag):
    """virtio-fs feature bits."""

    NOTIFICATION = 1 << 0


class VsockFeature(enum.IntFlag):
    """virtio-vsock feature bits."""

    STREAM = 1 << 0
    SEQPACKET = 1 << 1
    NO_IMPLIED_STREAM = 1 << 2


DEVICE_NAMES: dict[str, DeviceId] = {
    "blk": DeviceId.BLOCK,
    "net": DeviceId.NET,
    "fs": DeviceId.FS,
    "vsock": DeviceId.VSOCK,
}
"""Short names of the device types whose feature bits the package knows (the CLI's
``--device``): vhost-user never states the device type, so a tool must be told."""

DEVICE_FEATURES: dict[DeviceId, type[enum.IntFlag]] = {
    DeviceId.BLOCK: BlkFeature,
    DeviceId.NET: NetFeature,
    DeviceId.FS: FsFeature,
    DeviceId.VSOCK: VsockFeature,
}
"""The device-specific feature bits (0-23, and 50-63 for net) of each known device type,
whose meaning depends on the type (bit 9 is blk's FLUSH and net's GUEST_ECN)."""


# --------------------------------------------------------------------------------------
# Virtqueues
# --------------------------------------------------------------------------------------

DescriptorChain = _core.DescriptorChain
DeviceQueue = _core.DeviceQueue
Virtqueue = _core.Virtqueue


def ring_sizes(size: int, packed: bool = False) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the avail ring (packed: driver event area) and the used
    ring (packed: device event area) of a queue of ``size`` entries, event index words
    included. A size the format does not allow (0, above 32768, not a power of two for a
    split ring) raises :class:`~vhost.errors.InvalidParamError`."""
    return _core.ring_sizes(size, packed)


def place_rings(base_gpa: int, size: int, packed: bool = False) -> tuple[int, int, int]:
    """Guest addresses ``(desc, avail, used)`` of a ring laid out contiguously from
    ``base_gpa`` (rounded up to 16), each area aligned as the format requires. The ring
    takes ``used + ring_sizes(size, packed)[2] - desc`` bytes. A bad size or a negative
    base raises :class:`~vhost.errors.InvalidParamError`; a ring that would run past the
    end of the 64-bit address space :class:`~vhost.errors.InvalidMemoryError`."""
    return _core.place_rings(base_gpa, size, packed)


def gpa_to_user(memory: _core.GuestMemory, gpa: int) -> int:
    """The front-end virtual address of guest address ``gpa`` in ``memory`` (the address to
    send in ``SET_VRING_ADDR``): :meth:`GuestMemory.gpa_to_user`. An address outside every
    region raises :class:`~vhost.errors.InvalidMemoryError` with ``address`` set."""
    return memory.gpa_to_user(gpa)


def _check_ring_features(index: int, acked: int, packed: bool, event_idx: bool | None) -> None:
    """A ring whose format or event suppression differs from the acked features would be
    read by the back-end as something else (a split ring parsed as packed, used events
    never looked at): refuse it before anything is sent."""
    problems = []
    if packed != bool(acked & VirtioFeature.RING_PACKED):
        problems.append(
            "the ring is packed but VIRTIO_F_RING_PACKED was not acked"
            if packed
            else "the ring is split but VIRTIO_F_RING_PACKED was acked"
            " (negotiate(packed=True) acks it only for packed rings)"
        )
    if event_idx is not None and event_idx != bool(acked & VirtioFeature.RING_EVENT_IDX):
        problems.append(
            "the ring uses EVENT_IDX but VIRTIO_F_EVENT_IDX was not acked"
            if event_idx
            else "the ring has no EVENT_IDX but VIRTIO_F_EVENT_IDX was acked"
            " (build it with event_idx=bool(acked & VirtioFeature.EVENT_IDX))"
        )
    if problems:
        raise InvalidQueueError(
            f"setup_queue: queue {index}: {'; '.join(problems)} (acked features {acked:#x})",
            index,
        )


def setup_queue(  # noqa: PLR0917 - the public signature: six positional arguments
    backend: VhostBackend,
    index: int,
    memory: _core.GuestMemory,
    queue: _core.Virtqueue | tuple[int, int, int, int],
    kick: int | EventFdLike,
    call: int | EventFdLike,
    *,
    base: int | None = None,
    enable: bool = True,
    packed: bool = False,
    log: bool = False,
) -> None:
    """Hands a ring to a back-end: ``SET_VRING_NUM``, ``SET_VRING_ADDR`` (front-end virtual
    addresses, from :func:`gpa_to_user`), ``SET_VRING_BASE``, ``SET_VRING_CALL``,
    ``SET_VRING_KICK`` and, when ``enable`` and the back-end has it (for vhost-user: when
    protocol features were negotiated), ``SET_VRING_ENABLE``.

    ``queue`` is a :class:`Virtqueue` or ``(size, desc, avail, used)`` guest addresses
    (then ``packed`` tells the format). ``memory`` must be the memory the back-end got in
    its memory table. ``base`` is the ``SET_VRING_BASE`` value; by default that of a fresh
    ring: 0 for a split ring, slot 0 with wrap counter 1 (``0x8000``) for a packed one.

    Dirty logging: ``SET_VRING_ADDR`` always carries the used ring's guest address as its
    ``log_addr`` (QEMU sends it too; it means nothing until ``VHOST_VRING_F_LOG`` is set).
    A :class:`vhost.user.Frontend` whose dirty log is on sets that flag itself, and sets it
    again on its running queues when :meth:`~vhost.user.Frontend.start_dirty_log` is
    called, so nothing is needed here; ``log=True`` sets the flag explicitly, for a
    back-end that does not track it (kernel vhost after its ``set_log_base``).
    """
    event_idx: bool | None = None
    if isinstance(queue, _core.Virtqueue):
        size, desc, avail, used = queue.size, queue.desc, queue.avail, queue.used
        packed = queue.packed
        event_idx = queue.event_idx
    else:
        size, desc, avail, used = queue
    acked = getattr(backend, "acked_features", None)
    if isinstance(acked, int):
        _check_ring_features(index, acked, packed, event_idx)
    config = VringConfig(
        queue_max_size=size,
        queue_size=size,
        flags=int(VringAddrFlag.LOG) if log else 0,
        desc_table_addr=gpa_to_user(memory, desc),
        used_ring_addr=gpa_to_user(memory, used),
        avail_ring_addr=gpa_to_user(memory, avail),
        log_addr=used,
        packed=packed,
    )
    backend.set_vring_num(index, size)
    backend.set_vring_addr(index, config)
    if base is None:
        base = 1 << 15 if packed else 0
    backend.set_vring_base(index, base)
    backend.set_vring_call(index, call)
    backend.set_vring_kick(index, kick)
    if enable:
        set_enable = getattr(backend, "set_vring_enable", None)
        if callable(set_enable) and (
            not isinstance(acked, int) or acked & VirtioFeature.PROTOCOL_FEATURES
        ):
            set_enable(index, True)


def wait_used(
    queue: _core.Virtqueue, call: _core.EventFd, timeout: float | None = 10.0
) -> list[tuple[int, int]]:
    """Waits until the device has returned buffers on ``queue`` and returns them
    (``(head, bytes written)``, as :meth:`Virtqueue.poll_used`).

    A signal on the ``call`` eventfd only says "look at the used ring": back-ends also
    signal at set-up, or once for several buffers, so one ``call.wait()`` followed by one
    ``poll_used()`` can return ``[]``. This looks at the ring first, then waits for a call
    and looks again, until something came back or ``timeout`` seconds passed
    (:class:`~vhost.errors.VhostTimeoutError`; ``None`` waits for ever).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done = queue.poll_used()
        if done:
            return done
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise VhostTimeoutError(
                f"wait_used: the device returned none of the {queue.in_flight} buffers in "
                f"flight within {timeout} s"
            )
        if call.wait(left):
            call.read()
