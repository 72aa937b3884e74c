"""Values the vhost back-end interfaces carry: rings, memory regions, logs, IOTLB entries.

Every class here is a frozen, slotted dataclass that checks itself when built: a value
that cannot be valid on the wire or for the kernel (a number wider than its field, an
address range that wraps around 2**64, a ring size the layout forbids) raises
:class:`~vhost.errors.InvalidParamError` (a ``ValueError``) from the constructor, so a bad
value is reported where it was made rather than deep inside a back-end. A field of the
wrong type (a ``str`` where an ``int`` belongs, or a ``bool``) raises ``TypeError``.

Conventions:

- Addresses and sizes are u64. A range ``[start, start + size)`` is accepted only when its
  exclusive end still fits in a u64, the rule of ``checked_add`` in the Rust core.
  :class:`IotlbMessage` is the one exception: the kernel IOTLB describes ranges by their
  last byte, so an IOTLB range may end exactly at 2**64.
- File descriptors are *borrowed*: a value holding an ``fd`` neither owns nor closes it.
  The caller keeps the file open until the call that uses the value returns; a back-end
  that needs the file for longer duplicates it.
- ``repr()`` shows addresses, sizes and offsets in hex.
- Byte layouts, where a class has them, use the machine's native byte order, as the
  kernel and the vhost-user protocol do.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .codes import VHOST_LOG_PAGE
from .errors import InvalidMemoryError, InvalidParamError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "MAX_QUEUE_SIZE",
    "U64_MAX",
    "DirtyLogRegion",
    "IotlbAccess",
    "IotlbMessage",
    "IotlbType",
    "MemoryRegion",
    "VringAddrFlag",
    "VringAddrs",
    "VringConfig",
    "check_memory_table",
    "dirty_log_size",
]

U64_MAX = (1 << 64) - 1
"""The largest u64: addresses and sizes end at or below it (a range may not wrap)."""
_I32_MAX = (1 << 31) - 1

MAX_QUEUE_SIZE = 32768
"""Largest virtqueue size allowed by the virtio specification (split and packed)."""

# Natural alignment the virtio specification requires of each ring part.
_DESC_ALIGN = 16
_SPLIT_AVAIL_ALIGN = 2
_SPLIT_USED_ALIGN = 4
_PACKED_EVENT_ALIGN = 4


# --------------------------------------------------------------------------------------
# Validation and repr helpers
# --------------------------------------------------------------------------------------


def _require_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, not {type(value).__name__}")
    return value


def _check_uint(owner: str, name: str, value: object, bits: int) -> int:
    number = _require_int(owner, name, value)
    if not 0 <= number < (1 << bits):
        raise InvalidParamError(f"{owner}.{name} = {number:#x} does not fit in a u{bits}")
    return number


def _check_fd(owner: str, value: object, *, optional: bool) -> int:
    number = _require_int(owner, "fd", value)
    lowest = -1 if optional else 0
    if not lowest <= number <= _I32_MAX:
        expected = "a file descriptor or -1" if optional else "a file descriptor"
        raise InvalidParamError(f"{owner}.fd = {number} is not {expected}")
    return number


def _check_range(owner: str, start_name: str, start: int, size: int) -> None:
    """Reject a range whose exclusive end does not fit in a u64."""
    if start + size > U64_MAX:
        raise InvalidParamError(
            f"{owner}: {start_name} {start:#x} + size {size:#x} overflows a u64"
        )


def _check_aligned(owner: str, name: str, value: int, alignment: int) -> None:
    if value % alignment:
        raise InvalidParamError(f"{owner}.{name} = {value:#x} is not aligned to {alignment} bytes")


def _check_enum(owner: str, name: str, value: object, enum_type: type[enum.IntEnum]) -> None:
    """Check that ``value`` is a member (or the value of one) of ``enum_type``."""
    number = _require_int(owner, name, value)
    try:
        enum_type(number)
    except ValueError:
        raise InvalidParamError(
            f"{owner}.{name} = {number} is not a valid {enum_type.__name__}"
        ) from None


def _repr(obj: DataclassInstance, hex_fields: Iterable[str]) -> str:
    shown_in_hex = frozenset(hex_fields)
    parts = []
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.name in shown_in_hex and isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:#x}"
        elif isinstance(value, enum.Enum):
            text = f"{type(value).__name__}.{value.name}" if value.name else repr(value.value)
        else:
            text = repr(value)
        parts.append(f"{field.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------------------------
# Virtqueues
# --------------------------------------------------------------------------------------


class VringAddrFlag(enum.IntFlag):
    """Bits of the ``flags`` of a vring address (``struct vhost_vring_addr``)."""

    LOG = 1 << 0
    """``VHOST_VRING_F_LOG``: log writes to the used ring at ``log_addr``."""


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class VringConfig:
    """The configuration of one virtqueue, as given to ``VhostBackend.set_vring_addr``.

    Addresses are in the front-end's address space: its virtual addresses for vhost-user
    and kernel vhost, I/O virtual addresses when an IOTLB is in use.

    Checked on construction:

    - ``queue_max_size`` is 1 to 32768 and ``queue_size`` is 1 to ``queue_max_size``;
    - ``queue_size`` is a power of two, unless ``packed`` (packed rings allow any size);
    - the descriptor table is 16-byte aligned; for a split ring the available ring is
      2-byte and the used ring 4-byte aligned; for a packed ring the driver and device
      event areas (``avail_ring_addr`` and ``used_ring_addr``) are 4-byte aligned;
    - no ring part wraps around the end of the 64-bit address space;
    - ``flags`` holds only :class:`VringAddrFlag` bits, and ``LOG`` comes with a
      ``log_addr``.
    """

    queue_max_size: int
    queue_size: int
    flags: int
    desc_table_addr: int
    used_ring_addr: int
    avail_ring_addr: int
    log_addr: int | None = None
    packed: bool = False

    def __post_init__(self) -> None:
        owner = "VringConfig"
        max_size = _check_uint(owner, "queue_max_size", self.queue_max_size, 16)
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise InvalidParamError(
                f"{owner}.queue_max_size = {max_size} is not between 1 and {MAX_QUEUE_SIZE}"
            )
        size = _check_uint(owner, "queue_size", self.queue_size, 16)
        if not 1 <= size <= max_size:
            raise InvalidParamError(
                f"{owner}.queue_size = {size} is not between 1 and queue_max_size {max_size}"
            )
        if not isinstance(self.packed, bool):
            raise TypeError(f"{owner}.packed must be a bool")
        if not self.packed and size & (size - 1):
            raise InvalidParamError(
                f"{owner}.queue_size = {size} is not a power of two (required for split rings)"
            )
        flags = _check_uint(owner, "flags", self.flags, 32)
        if flags & ~int(VringAddrFlag.LOG):
            raise InvalidParamError(f"{owner}.flags = {flags:#x} has unknown bits")
        if self.log_addr is not None:
            _check_uint(owner, "log_addr", self.log_addr, 64)
        elif flags & VringAddrFlag.LOG:
            raise InvalidParamError(f"{owner}.flags has LOG set but log_addr is None")

        desc = _check_uint(owner, "desc_table_addr", self.desc_table_addr, 64)
        avail = _check_uint(owner, "avail_ring_addr", self.avail_ring_addr, 64)
        used = _check_uint(owner, "used_ring_addr", self.used_ring_addr, 64)
        _check_aligned(owner, "desc_table_addr", desc, _DESC_ALIGN)
        if self.packed:
            _check_aligned(owner, "avail_ring_addr", avail, _PACKED_EVENT_ALIGN)
            _check_aligned(owner, "used_ring_addr", used, _PACKED_EVENT_ALIGN)
        else:
            _check_aligned(owner, "avail_ring_addr", avail, _SPLIT_AVAIL_ALIGN)
            _check_aligned(owner, "used_ring_addr", used, _SPLIT_USED_ALIGN)
        _check_range(owner, "desc_table_addr", desc, self.desc_table_size)
        _check_range(owner, "avail_ring_addr", avail, self.avail_ring_size)
        _check_range(owner, "used_ring_addr", used, self.used_ring_size)

    @property
    def desc_table_size(self) -> int:
        """Bytes of the descriptor table (or of the packed descriptor ring)."""
        return 16 * self.queue_size

    @property
    def avail_ring_size(self) -> int:
        """Bytes of the available ring (split, with ``used_event``) or driver event area."""
        return 4 if self.packed else 6 + 2 * self.queue_size

    @property
    def used_ring_size(self) -> int:
        """Bytes of the used ring (split, with ``avail_event``) or device event area."""
        return 4 if self.packed else 6 + 8 * self.queue_size

    def __repr__(self) -> str:
        return _repr(
            self, ("flags", "desc_table_addr", "used_ring_addr", "avail_ring_addr", "log_addr")
        )


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class VringAddrs:
    """The addresses of one ring as a front-end sent them (``SET_VRING_ADDR``), what
    :meth:`vhost.user.BackendHandler.set_vring_addr` receives.

    Unlike :class:`VringConfig` it carries no ring size (that came with
    ``SET_VRING_NUM``), so it cannot check the layout; a back-end translates the
    addresses with :meth:`vhost.user.GuestMemory.user_to_gpa` (they are front-end
    virtual addresses) or builds a ring on them with
    :meth:`vhost.virtio.DeviceQueue.from_user`. ``flags`` is kept as a
    :class:`VringAddrFlag`; ``log_addr`` (the used ring's guest physical address, where
    dirty logging marks used-ring writes) is what the front-end sent, which front-ends
    send also without ``LOG``. Checked: the addresses are u64 and ``flags`` a u32.
    """

    desc_table_addr: int
    used_ring_addr: int
    avail_ring_addr: int
    flags: int = 0
    log_addr: int = 0

    def __post_init__(self) -> None:
        owner = "VringAddrs"
        for name in ("desc_table_addr", "used_ring_addr", "avail_ring_addr", "log_addr"):
            _check_uint(owner, name, getattr(self, name), 64)
        object.__setattr__(
            self, "flags", VringAddrFlag(_check_uint(owner, "flags", self.flags, 32))
        )

    def __repr__(self) -> str:
        return _repr(self, ("desc_table_addr", "used_ring_addr", "avail_ring_addr", "log_addr"))


# --------------------------------------------------------------------------------------
# Guest memory and dirty logging
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class MemoryRegion:
    """One region of guest memory, as in ``SET_MEM_TABLE`` and ``ADD_MEM_REG``.

    ``guest_phys_addr`` is where the guest sees the region, ``userspace_addr`` where the
    front-end has it mapped, and ``mmap_offset`` where it starts in ``fd``.

    ``fd`` is borrowed: the region does not own or close it, and the caller keeps it open
    until the call that takes the region returns. It is -1 when there is no file: kernel
    vhost reads the front-end's own memory through ``userspace_addr``, and
    ``REM_MEM_REG`` identifies a region without one.

    Checked: ``memory_size`` is not 0, every field fits in a u64, and none of the three
    ranges (guest, user, file) wraps around the end of the 64-bit space.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int = 0
    fd: int = -1

    def __post_init__(self) -> None:
        owner = "MemoryRegion"
        gpa = _check_uint(owner, "guest_phys_addr", self.guest_phys_addr, 64)
        size = _check_uint(owner, "memory_size", self.memory_size, 64)
        uaddr = _check_uint(owner, "userspace_addr", self.userspace_addr, 64)
        offset = _check_uint(owner, "mmap_offset", self.mmap_offset, 64)
        _check_fd(owner, self.fd, optional=True)
        if size == 0:
            raise InvalidParamError(f"{owner}.memory_size is 0")
        _check_range(owner, "guest_phys_addr", gpa, size)
        _check_range(owner, "userspace_addr", uaddr, size)
        _check_range(owner, "mmap_offset", offset, size)

    @property
    def guest_end(self) -> int:
        """The first guest physical address after the region."""
        return self.guest_phys_addr + self.memory_size

    @property
    def userspace_end(self) -> int:
        """The first front-end virtual address after the region."""
        return self.userspace_addr + self.memory_size

    def contains_guest(self, addr: int, size: int = 1) -> bool:
        """Whether the whole range ``[addr, addr + size)`` lies in the region's guest range."""
        return self.guest_phys_addr <= addr and addr + size <= self.guest_end

    def overlaps(self, other: MemoryRegion) -> bool:
        """Whether the two regions share a guest physical or a front-end virtual address."""
        return (
            self.guest_phys_addr < other.guest_end and other.guest_phys_addr < self.guest_end
        ) or (
            self.userspace_addr < other.userspace_end and other.userspace_addr < self.userspace_end
        )

    def __repr__(self) -> str:
        return _repr(self, ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"))


def check_memory_table(regions: Sequence[MemoryRegion], max_regions: int | None = None) -> None:
    """Check a whole memory table before it is sent or installed.

    Raises :class:`~vhost.errors.InvalidParamError` when the table is empty or has more
    than ``max_regions`` entries, and :class:`~vhost.errors.InvalidMemoryError` when two
    regions overlap in guest physical or in front-end virtual addresses (a translation
    must have one answer).
    """
    if not regions:
        raise InvalidParamError("the memory table is empty")
    if max_regions is not None and len(regions) > max_regions:
        raise InvalidParamError(
            f"the memory table has {len(regions)} regions, more than {max_regions}"
        )
    for position, region in enumerate(regions):
        for other in regions[position + 1 :]:
            if region.overlaps(other):
                raise InvalidMemoryError(
                    f"memory regions overlap: {region!r} and {other!r}",
                    address=max(region.guest_phys_addr, other.guest_phys_addr),
                )


def dirty_log_size(guest_end: int) -> int:
    """Bytes of dirty log needed to cover guest physical addresses ``[0, guest_end)``.

    One bit per :data:`~vhost.codes.VHOST_LOG_PAGE` (4 KiB) page, rounded up to a byte.
    """
    end = _check_uint("dirty_log_size", "guest_end", guest_end, 64)
    pages = -(-end // VHOST_LOG_PAGE)
    return -(-pages // 8)


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class DirtyLogRegion:
    """The shared memory area of the dirty log (``SET_LOG_BASE`` with ``LOG_SHMFD``).

    The log starts ``mmap_offset`` bytes into ``fd`` and is ``mmap_size`` bytes long; see
    :func:`dirty_log_size` for the size a memory map needs. ``fd`` is borrowed (see
    :class:`MemoryRegion`). Checked: the size is not 0, both fields are u64 and the range
    does not wrap.
    """

    mmap_size: int
    mmap_offset: int
    fd: int

    def __post_init__(self) -> None:
        owner = "DirtyLogRegion"
        size = _check_uint(owner, "mmap_size", self.mmap_size, 64)
        offset = _check_uint(owner, "mmap_offset", self.mmap_offset, 64)
        _check_fd(owner, self.fd, optional=False)
        if size == 0:
            raise InvalidParamError(f"{owner}.mmap_size is 0")
        _check_range(owner, "mmap_offset", offset, size)

    def __repr__(self) -> str:
        return _repr(self, ("mmap_size", "mmap_offset"))


# --------------------------------------------------------------------------------------
# IOTLB
# --------------------------------------------------------------------------------------


class IotlbAccess(enum.IntFlag):
    """Access permission of an IOTLB entry (``perm`` of ``struct vhost_iotlb_msg``).

    ``IotlbAccess(0)`` is "no access", as used in some miss messages.
    """

    RO = 0x1
    WO = 0x2
    RW = 0x3


class IotlbType(enum.IntEnum):
    """Kind of an IOTLB message (``type`` of ``struct vhost_iotlb_msg``).

    The vhost-user specification lists 1 to 4; the kernel adds the batch markers, after
    which the other fields of the message are ignored.
    """

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


# struct vhost_msg_v2 { u32 type; u32 asid; union { struct vhost_iotlb_msg; u8 pad[64]; } }
# with struct vhost_iotlb_msg { u64 iova, size, uaddr; u8 perm, type; } (32 bytes with its
# tail padding): 4 + 4 + 8 * 3 + 1 + 1 + 38 bytes of padding = 72 bytes.
_KERNEL_V2 = struct.Struct("=IIQQQBB38x")
# The vhost-user payload is the bare struct vhost_iotlb_msg, tail padding included.
_USER_PAYLOAD = struct.Struct("=QQQBB6x")


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class IotlbMessage:
    """One IOTLB message: a mapping of I/O virtual addresses to front-end addresses.

    Travels as ``struct vhost_msg_v2`` on a kernel vhost or vDPA fd (:meth:`pack`,
    :meth:`unpack`) and as ``struct vhost_iotlb_msg`` in the vhost-user ``IOTLB_MSG``
    requests (:meth:`pack_user`, :meth:`unpack_user`). ``asid`` (the address space, vDPA)
    exists only in the kernel layout and is 0 otherwise.

    Checked: ``iova``, ``size``, ``uaddr`` are u64, ``asid`` is u32, ``perm`` and ``type``
    are known values; for ``UPDATE`` and ``INVALIDATE`` the size is not 0 and the range
    does not wrap around 2**64 (it may end exactly there); for ``UPDATE`` the ``uaddr``
    range does not wrap either.
    """

    iova: int
    size: int
    uaddr: int
    perm: IotlbAccess
    type: IotlbType
    asid: int = 0

    KERNEL_V2_SIZE = _KERNEL_V2.size
    """Bytes of ``struct vhost_msg_v2`` (72)."""
    USER_SIZE = _USER_PAYLOAD.size
    """Bytes of the vhost-user ``IOTLB_MSG`` payload (32)."""
    VHOST_IOTLB_MSG_V2 = 0x2
    """The ``type`` word of ``struct vhost_msg_v2`` for an IOTLB message."""

    def __post_init__(self) -> None:
        owner = "IotlbMessage"
        iova = _check_uint(owner, "iova", self.iova, 64)
        size = _check_uint(owner, "size", self.size, 64)
        uaddr = _check_uint(owner, "uaddr", self.uaddr, 64)
        _check_uint(owner, "asid", self.asid, 32)
        perm = _check_uint(owner, "perm", self.perm, 8)
        if perm & ~int(IotlbAccess.RW):
            raise InvalidParamError(f"{owner}.perm = {perm:#x} is not a valid IotlbAccess")
        _check_enum(owner, "type", self.type, IotlbType)
        object.__setattr__(self, "perm", IotlbAccess(perm))
        object.__setattr__(self, "type", IotlbType(self.type))
        if self.type in (IotlbType.UPDATE, IotlbType.INVALIDATE):
            if size == 0:
                raise InvalidParamError(f"{owner}: {self.type.name} with size 0")
            if iova + size - 1 > U64_MAX:
                raise InvalidParamError(
                    f"{owner}: iova {iova:#x} + size {size:#x} wraps around 2**64"
                )
            if self.type is IotlbType.UPDATE and uaddr + size - 1 > U64_MAX:
                raise InvalidParamError(
                    f"{owner}: uaddr {uaddr:#x} + size {size:#x} wraps around 2**64"
                )

    @property
    def last(self) -> int:
        """The last I/O virtual address covered (``iova + size - 1``); ``iova`` if size is 0."""
        return self.iova + max(self.size, 1) - 1

    def pack(self) -> bytes:
        """The 72-byte ``struct vhost_msg_v2`` to ``write()`` to a vhost or vDPA fd."""
        return _KERNEL_V2.pack(
            self.VHOST_IOTLB_MSG_V2,
            self.asid,
            self.iova,
            self.size,
            self.uaddr,
            int(self.perm),
            int(self.type),
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> IotlbMessage:
        """Decode a ``struct vhost_msg_v2`` as ``read()`` from a vhost or vDPA fd.

        Raises :class:`~vhost.errors.InvalidParamError` if ``data`` is not exactly 72 bytes,
        is not a ``VHOST_IOTLB_MSG_V2`` message, or holds invalid fields.
        """
        if len(data) != _KERNEL_V2.size:
            raise InvalidParamError(
                f"an IOTLB v2 message is {_KERNEL_V2.size} bytes, got {len(data)}"
            )
        kind, asid, iova, size, uaddr, perm, msg_type = _KERNEL_V2.unpack(data)
        if kind != cls.VHOST_IOTLB_MSG_V2:
            raise InvalidParamError(f"message type {kind:#x} is not VHOST_IOTLB_MSG_V2")
        return cls._from_fields(
            iova=iova, size=size, uaddr=uaddr, perm=perm, msg_type=msg_type, asid=asid
        )

    def pack_user(self) -> bytes:
        """The 32-byte payload of a vhost-user ``IOTLB_MSG`` request (front-end or back-end).

        ``asid`` has no place in this layout; a non-zero ``asid`` raises
        :class:`~vhost.errors.InvalidParamError` rather than being dropped.
        """
        if self.asid:
            raise InvalidParamError("vhost-user IOTLB messages have no address space id")
        return _USER_PAYLOAD.pack(self.iova, self.size, self.uaddr, int(self.perm), int(self.type))

    @classmethod
    def unpack_user(cls, data: bytes | bytearray | memoryview) -> IotlbMessage:
        """Decode the payload of a vhost-user ``IOTLB_MSG`` request (exactly 32 bytes)."""
        if len(data) != _USER_PAYLOAD.size:
            raise InvalidParamError(
                f"a vhost-user IOTLB payload is {_USER_PAYLOAD.size} bytes, got {len(data)}"
            )
        iova, size, uaddr, perm, msg_type = _USER_PAYLOAD.unpack(data)
        return cls._from_fields(
            iova=iova, size=size, uaddr=uaddr, perm=perm, msg_type=msg_type, asid=0
        )

    @classmethod
    def _from_fields(
        cls, *, iova: int, size: int, uaddr: int, perm: int, msg_type: int, asid: int
    ) -> IotlbMessage:
        if perm & ~int(IotlbAccess.RW):
            raise InvalidParamError(f"IotlbMessage.perm = {perm:#x} is not a valid IotlbAccess")
        try:
            kind = IotlbType(msg_type)
        except ValueError:
            raise InvalidParamError(
                f"IotlbMessage.type = {msg_type} is not a valid IotlbType"
            ) from None
        return cls(iova=iova, size=size, uaddr=uaddr, perm=IotlbAccess(perm), type=kind, asid=asid)

    def __repr__(self) -> str:
        return _repr(self, ("iova", "size", "uaddr"))
