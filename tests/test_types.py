"""Validation, byte layouts and reprs of ``vhost.types``; the ``VhostBackend`` base class.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost.backend import EventFdLike, VhostBackend, as_fd
from vhost.errors import ClosedError, InvalidMemoryError, InvalidParamError
from vhost.types import (
    MAX_QUEUE_SIZE,
    U64_MAX,
    DirtyLogRegion,
    IotlbAccess,
    IotlbMessage,
    IotlbType,
    MemoryRegion,
    VringAddrFlag,
    VringAddrs,
    VringConfig,
    check_memory_table,
    dirty_log_size,
)

u64s = st.integers(min_value=0, max_value=U64_MAX)


# ---------------------------------------------------------------------------------------
# VringConfig
# ---------------------------------------------------------------------------------------


def _vring(**overrides: object) -> VringConfig:
    fields: dict[str, object] = {
        "queue_max_size": 256,
        "queue_size": 256,
        "flags": 0,
        "desc_table_addr": 0x10000,
        "used_ring_addr": 0x12000,
        "avail_ring_addr": 0x11000,
        "log_addr": None,
    }
    fields.update(overrides)
    return VringConfig(**fields)  # type: ignore[arg-type]


def test_vring_config_valid() -> None:
    config = _vring()
    assert config.desc_table_size == 16 * 256
    assert config.avail_ring_size == 6 + 2 * 256
    assert config.used_ring_size == 6 + 8 * 256
    assert not config.packed


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"queue_size": 0}, "queue_size"),
        ({"queue_size": 512}, "queue_max_size"),
        ({"queue_max_size": 0}, "queue_max_size"),
        ({"queue_max_size": 65536, "queue_size": 256}, "u16"),
        ({"queue_max_size": 40000, "queue_size": 256}, "32768"),
        ({"queue_size": 3}, "power of two"),
        ({"queue_size": 96}, "power of two"),
        ({"desc_table_addr": 0x10008}, "16 bytes"),
        ({"avail_ring_addr": 0x11001}, "2 bytes"),
        ({"used_ring_addr": 0x12002}, "4 bytes"),
        ({"flags": 0x2}, "unknown bits"),
        ({"flags": 1 << 32}, "u32"),
        ({"flags": VringAddrFlag.LOG, "log_addr": None}, "log_addr"),
        ({"log_addr": 1 << 64}, "u64"),
        ({"desc_table_addr": 1 << 64}, "u64"),
        ({"desc_table_addr": U64_MAX - 15}, "overflows"),
        ({"used_ring_addr": (U64_MAX - 100) & ~3}, "overflows"),
        ({"avail_ring_addr": (U64_MAX - 100) & ~1}, "overflows"),
    ],
)
def test_vring_config_rejects(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidParamError, match=fragment):
        _vring(**overrides)


def test_vring_config_packed_rules() -> None:
    # Packed rings allow any size up to 32768; the event areas need 4-byte alignment.
    config = _vring(queue_max_size=MAX_QUEUE_SIZE, queue_size=1000, packed=True)
    assert config.avail_ring_size == 4
    assert config.used_ring_size == 4
    _vring(queue_max_size=MAX_QUEUE_SIZE, queue_size=MAX_QUEUE_SIZE, packed=True)
    with pytest.raises(InvalidParamError, match="4 bytes"):
        _vring(avail_ring_addr=0x11002, packed=True)
    with pytest.raises(InvalidParamError, match="power of two"):
        _vring(queue_max_size=MAX_QUEUE_SIZE, queue_size=1000)


def test_vring_config_type_errors() -> None:
    with pytest.raises(TypeError):
        _vring(queue_size="256")
    with pytest.raises(TypeError):
        _vring(queue_size=True)
    with pytest.raises(TypeError):
        _vring(packed=1)


def test_vring_config_repr_is_hex() -> None:
    text = repr(_vring(log_addr=0xABC0))
    assert "desc_table_addr=0x10000" in text
    assert "used_ring_addr=0x12000" in text
    assert "log_addr=0xabc0" in text
    assert "queue_size=256" in text


def test_vring_addrs_checks_its_fields_and_keeps_flags_typed() -> None:
    """What a back-end handler receives for SET_VRING_ADDR: u64 addresses, u32 flags kept
    as VringAddrFlag (unknown bits kept, not dropped), hex in its repr."""
    addrs = VringAddrs(0x10000, 0x12000, 0x11000, flags=1, log_addr=0x5000)
    assert addrs.flags is VringAddrFlag.LOG
    assert "desc_table_addr=0x10000" in repr(addrs)
    assert "log_addr=0x5000" in repr(addrs)
    assert int(VringAddrs(0, 0, 0, flags=0x3).flags) == 0x3
    with pytest.raises(InvalidParamError, match=r"VringAddrs\.used_ring_addr"):
        VringAddrs(0, -1, 0)
    with pytest.raises(InvalidParamError, match=r"VringAddrs\.flags"):
        VringAddrs(0, 0, 0, flags=1 << 32)
    with pytest.raises(InvalidParamError, match=r"VringAddrs\.log_addr"):
        VringAddrs(0, 0, 0, log_addr=1 << 64)


def test_values_are_frozen_and_slotted() -> None:
    config = _vring()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.queue_size = 128  # type: ignore[misc]
    assert not hasattr(config, "__dict__")


# ---------------------------------------------------------------------------------------
# VringState, VringAddr
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# MemoryRegion and the memory table
# ---------------------------------------------------------------------------------------


def test_memory_region_valid_and_helpers() -> None:
    region = MemoryRegion(0x1000_0000, 0x4000_0000, 0x7F00_0000_0000, 0x1000, 3)
    assert region.guest_end == 0x5000_0000
    assert region.userspace_end == 0x7F00_4000_0000
    assert region.contains_guest(0x1000_0000)
    assert region.contains_guest(0x4FFF_FFF0, 16)
    assert not region.contains_guest(0x4FFF_FFF0, 17)
    assert not region.contains_guest(0x0FFF_FFFF)
    assert MemoryRegion(0, 0x1000, 0x1000).fd == -1


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ((0, 0, 0x1000, 0, 3), "memory_size is 0"),
        ((U64_MAX - 0xFFF, 0x1000, 0, 0, 3), "guest_phys_addr"),
        ((0, 0x1000, U64_MAX - 0xFFF, 0, 3), "userspace_addr"),
        ((0, 0x1000, 0, U64_MAX - 0xFFF, 3), "mmap_offset"),
        ((1 << 64, 0x1000, 0, 0, 3), "u64"),
        ((0, 1 << 64, 0, 0, 3), "u64"),
        ((0, 0x1000, -1, 0, 3), "u64"),
        ((0, 0x1000, 0, 0, -2), "file descriptor"),
        ((0, 0x1000, 0, 0, 1 << 31), "file descriptor"),
    ],
)
def test_memory_region_rejects(fields: tuple[int, int, int, int, int], fragment: str) -> None:
    with pytest.raises(InvalidParamError, match=fragment):
        MemoryRegion(*fields)


def test_memory_region_largest_valid_range() -> None:
    # The exclusive end must still fit in a u64 (checked_add in the core).
    MemoryRegion(U64_MAX - 0x1000, 0x1000, 0, 0, 3)
    with pytest.raises(InvalidParamError):
        MemoryRegion(U64_MAX - 0xFFF, 0x1000, 0, 0, 3)


def test_memory_region_repr_is_hex() -> None:
    text = repr(MemoryRegion(0x100000, 0x200000, 0x7F0000000000, 0, 7))
    assert text == (
        "MemoryRegion(guest_phys_addr=0x100000, memory_size=0x200000, "
        "userspace_addr=0x7f0000000000, mmap_offset=0x0, fd=7)"
    )


@given(gpa=st.integers(0, 1 << 65), size=st.integers(0, 1 << 65), uaddr=u64s, offset=u64s)
def test_memory_region_validation_property(gpa: int, size: int, uaddr: int, offset: int) -> None:
    valid = (
        gpa <= U64_MAX
        and 0 < size <= U64_MAX
        and gpa + size <= U64_MAX
        and uaddr + size <= U64_MAX
        and offset + size <= U64_MAX
    )
    if valid:
        region = MemoryRegion(gpa, size, uaddr, offset, 5)
        assert region.guest_end <= U64_MAX
        assert region.userspace_end <= U64_MAX
    else:
        with pytest.raises(InvalidParamError):
            MemoryRegion(gpa, size, uaddr, offset, 5)


def test_check_memory_table() -> None:
    low = MemoryRegion(0, 0x8000_0000, 0x7F00_0000_0000, 0, 3)
    high = MemoryRegion(0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0, 4)
    check_memory_table([low, high])
    check_memory_table([low, high], max_regions=2)
    with pytest.raises(InvalidParamError, match="empty"):
        check_memory_table([])
    with pytest.raises(InvalidParamError, match="more than 1"):
        check_memory_table([low, high], max_regions=1)
    gpa_overlap = MemoryRegion(0x7FFF_F000, 0x2000, 0x7E00_0000_0000, 0, 5)
    with pytest.raises(InvalidMemoryError, match="overlap") as caught:
        check_memory_table([low, high, gpa_overlap])
    assert caught.value.address == 0x7FFF_F000
    user_overlap = MemoryRegion(0x2_0000_0000, 0x1000, 0x7F00_0000_0000 + 0x1000, 0, 6)
    with pytest.raises(InvalidMemoryError):
        check_memory_table([low, user_overlap])
    # Touching ranges do not overlap.
    check_memory_table([low, MemoryRegion(0x8000_0000, 0x1000, 0x7F00_8000_0000, 0, 7)])


def test_dirty_log_size() -> None:
    assert dirty_log_size(0) == 0
    assert dirty_log_size(1) == 1
    assert dirty_log_size(8 * 4096) == 1
    assert dirty_log_size(8 * 4096 + 1) == 2
    assert dirty_log_size(1 << 30) == (1 << 30) // 4096 // 8
    with pytest.raises(InvalidParamError):
        dirty_log_size(1 << 64)


def test_dirty_log_region() -> None:
    region = DirtyLogRegion(0x8000, 0x1000, 9)
    assert repr(region) == "DirtyLogRegion(mmap_size=0x8000, mmap_offset=0x1000, fd=9)"
    with pytest.raises(InvalidParamError, match="mmap_size is 0"):
        DirtyLogRegion(0, 0, 9)
    with pytest.raises(InvalidParamError, match="overflows"):
        DirtyLogRegion(0x1000, U64_MAX - 0x10, 9)
    with pytest.raises(InvalidParamError, match="file descriptor"):
        DirtyLogRegion(0x1000, 0, -1)


# ---------------------------------------------------------------------------------------
# IotlbMessage
# ---------------------------------------------------------------------------------------


def test_iotlb_sizes_match_the_kernel_structs() -> None:
    # sizeof(struct vhost_msg_v2) and sizeof(struct vhost_iotlb_msg) on Linux.
    assert IotlbMessage.KERNEL_V2_SIZE == 72
    assert IotlbMessage.USER_SIZE == 32
    message = IotlbMessage(0x1000, 0x2000, 0x7F00_0000_0000, IotlbAccess.RW, IotlbType.UPDATE)
    assert len(message.pack()) == 72
    assert len(message.pack_user()) == 32


def test_iotlb_kernel_v2_layout_byte_by_byte() -> None:
    message = IotlbMessage(
        0x1122_3344_5566_7788, 0x1000, 0x7F00_0000_0000, IotlbAccess.WO, IotlbType.UPDATE, asid=5
    )
    raw = message.pack()
    assert struct.unpack_from("=I", raw, 0) == (2,)  # VHOST_IOTLB_MSG_V2
    assert struct.unpack_from("=I", raw, 4) == (5,)  # asid
    assert struct.unpack_from("=QQQ", raw, 8) == (0x1122_3344_5566_7788, 0x1000, 0x7F00_0000_0000)
    assert raw[32] == 2  # perm
    assert raw[33] == 2  # type
    assert raw[34:] == bytes(38)  # padding of the 64-byte union is zero
    assert IotlbMessage.unpack(raw) == message


def test_iotlb_user_layout_byte_by_byte() -> None:
    message = IotlbMessage(0xA000, 0x1000, 0xB000, IotlbAccess.RO, IotlbType.INVALIDATE)
    raw = message.pack_user()
    assert struct.unpack_from("=QQQBB", raw, 0) == (0xA000, 0x1000, 0xB000, 1, 3)
    assert raw[26:] == bytes(6)
    assert IotlbMessage.unpack_user(raw) == message


def test_iotlb_unpack_rejects_bad_input() -> None:
    good = IotlbMessage(0, 0x1000, 0, IotlbAccess.RW, IotlbType.UPDATE).pack()
    with pytest.raises(InvalidParamError, match="72 bytes"):
        IotlbMessage.unpack(good[:71])
    with pytest.raises(InvalidParamError, match="72 bytes"):
        IotlbMessage.unpack(good + b"\0")
    with pytest.raises(InvalidParamError, match="VHOST_IOTLB_MSG_V2"):
        IotlbMessage.unpack(struct.pack("=I", 1) + good[4:])
    bad_type = bytearray(good)
    bad_type[33] = 7
    with pytest.raises(InvalidParamError, match="IotlbType"):
        IotlbMessage.unpack(bytes(bad_type))
    bad_perm = bytearray(good)
    bad_perm[32] = 4
    with pytest.raises(InvalidParamError, match="IotlbAccess"):
        IotlbMessage.unpack(bytes(bad_perm))
    with pytest.raises(InvalidParamError, match="32 bytes"):
        IotlbMessage.unpack_user(bytes(26))
    with pytest.raises(InvalidParamError, match="IotlbType"):
        IotlbMessage.unpack_user(bytes(32))  # type 0 is not a message
    # Buffers of any bytes-like type are accepted.
    assert IotlbMessage.unpack(memoryview(bytearray(good))).size == 0x1000


def test_iotlb_validation() -> None:
    # A range may end exactly at 2**64 (the kernel describes it by its last byte).
    top = IotlbMessage(U64_MAX - 0xFFF, 0x1000, 0, IotlbAccess.RO, IotlbType.UPDATE)
    assert top.last == U64_MAX
    with pytest.raises(InvalidParamError, match="wraps"):
        IotlbMessage(U64_MAX - 0xFFF, 0x1001, 0, IotlbAccess.RO, IotlbType.UPDATE)
    with pytest.raises(InvalidParamError, match="wraps"):
        IotlbMessage(0, 0x1001, U64_MAX - 0xFFF, IotlbAccess.RO, IotlbType.UPDATE)
    with pytest.raises(InvalidParamError, match="size 0"):
        IotlbMessage(0x1000, 0, 0, IotlbAccess.RW, IotlbType.UPDATE)
    with pytest.raises(InvalidParamError, match="size 0"):
        IotlbMessage(0x1000, 0, 0, IotlbAccess.RW, IotlbType.INVALIDATE)
    with pytest.raises(InvalidParamError, match="wraps"):
        IotlbMessage(U64_MAX, 2, 0, IotlbAccess.RW, IotlbType.INVALIDATE)
    # A miss carries only an address and the access that failed.
    miss = IotlbMessage(0x5000, 0, 0, IotlbAccess.WO, IotlbType.MISS)
    assert miss.last == 0x5000
    IotlbMessage(0, 0, 0, IotlbAccess(0), IotlbType.BATCH_BEGIN)
    with pytest.raises(InvalidParamError, match="IotlbAccess"):
        IotlbMessage(0, 0x1000, 0, 4, IotlbType.UPDATE)  # type: ignore[arg-type]
    with pytest.raises(InvalidParamError, match="IotlbType"):
        IotlbMessage(0, 0x1000, 0, IotlbAccess.RW, 9)  # type: ignore[arg-type]
    with pytest.raises(InvalidParamError, match="u32"):
        IotlbMessage(0, 0x1000, 0, IotlbAccess.RW, IotlbType.UPDATE, asid=1 << 32)
    with pytest.raises(InvalidParamError, match="address space"):
        IotlbMessage(0, 0x1000, 0, IotlbAccess.RW, IotlbType.UPDATE, asid=1).pack_user()


def test_iotlb_plain_ints_become_enums() -> None:
    message = IotlbMessage(0, 0x1000, 0, 3, 2)  # type: ignore[arg-type]
    assert message.perm is IotlbAccess.RW
    assert message.type is IotlbType.UPDATE
    assert repr(message) == (
        "IotlbMessage(iova=0x0, size=0x1000, uaddr=0x0, perm=IotlbAccess.RW, "
        "type=IotlbType.UPDATE, asid=0)"
    )
    assert "perm=0" in repr(IotlbMessage(0, 0, 0, IotlbAccess(0), IotlbType.MISS))


@st.composite
def iotlb_messages(draw: st.DrawFn) -> IotlbMessage:
    kind = draw(st.sampled_from(list(IotlbType)))
    perm = IotlbAccess(draw(st.integers(0, 3)))
    asid = draw(st.integers(0, (1 << 32) - 1))
    if kind in (IotlbType.UPDATE, IotlbType.INVALIDATE):
        size = draw(st.integers(1, U64_MAX))
        iova = draw(st.integers(0, U64_MAX - size + 1))
        uaddr = draw(st.integers(0, U64_MAX - size + 1)) if kind is IotlbType.UPDATE else draw(u64s)
    else:
        size, iova, uaddr = draw(u64s), draw(u64s), draw(u64s)
    return IotlbMessage(iova, size, uaddr, perm, kind, asid)


@given(iotlb_messages())
def test_iotlb_round_trips(message: IotlbMessage) -> None:
    raw = message.pack()
    assert len(raw) == IotlbMessage.KERNEL_V2_SIZE
    assert IotlbMessage.unpack(raw) == message
    user = dataclasses.replace(message, asid=0)
    raw_user = user.pack_user()
    assert len(raw_user) == IotlbMessage.USER_SIZE
    assert IotlbMessage.unpack_user(raw_user) == user


@given(st.binary(min_size=72, max_size=72))
def test_iotlb_unpack_of_random_bytes_never_crashes(raw: bytes) -> None:
    try:
        message = IotlbMessage.unpack(raw)
    except InvalidParamError:
        return
    assert message.pack()[:34] == raw[:34]


# ---------------------------------------------------------------------------------------
# Device state, shared objects, config space
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# VhostBackend, EventFdLike, as_fd
# ---------------------------------------------------------------------------------------


class _RecordingBackend(VhostBackend):
    """The smallest complete back-end: records calls, owns one pipe."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.read_fd, self.write_fd = os.pipe()
        self.released = 0

    def get_features(self) -> int:
        self._check_open()
        return 1 << 32

    def set_features(self, features: int) -> None:
        self.calls.append(("set_features", features))

    def set_owner(self) -> None:
        self.calls.append(("set_owner",))

    def reset_owner(self) -> None:
        self.calls.append(("reset_owner",))

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        check_memory_table(regions)
        self.calls.append(("set_mem_table", tuple(regions)))

    def set_log_base(self, base: int, region: DirtyLogRegion | None = None) -> None:
        self.calls.append(("set_log_base", base, region))

    def set_log_fd(self, fd: int | EventFdLike) -> None:
        self.calls.append(("set_log_fd", as_fd(fd)))

    def set_vring_num(self, index: int, num: int) -> None:
        self.calls.append(("set_vring_num", index, num))

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        self.calls.append(("set_vring_addr", index, config))

    def set_vring_base(self, index: int, base: int) -> None:
        self.calls.append(("set_vring_base", index, base))

    def get_vring_base(self, index: int) -> int:
        return 0

    def set_vring_call(self, index: int, fd: int | EventFdLike | None) -> None:
        self.calls.append(("set_vring_call", index, None if fd is None else as_fd(fd)))

    def set_vring_kick(self, index: int, fd: int | EventFdLike | None) -> None:
        self.calls.append(("set_vring_kick", index, None if fd is None else as_fd(fd)))

    def set_vring_err(self, index: int, fd: int | EventFdLike | None) -> None:
        self.calls.append(("set_vring_err", index, None if fd is None else as_fd(fd)))

    def _release(self) -> None:
        self.released += 1
        os.close(self.read_fd)
        os.close(self.write_fd)


def test_backend_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        VhostBackend()  # type: ignore[abstract]
    abstract = VhostBackend.__abstractmethods__
    assert abstract == {
        "get_features",
        "set_features",
        "set_owner",
        "reset_owner",
        "set_mem_table",
        "set_log_base",
        "set_log_fd",
        "set_vring_num",
        "set_vring_addr",
        "set_vring_base",
        "get_vring_base",
        "set_vring_call",
        "set_vring_kick",
        "set_vring_err",
    }


def test_backend_context_manager_and_idempotent_close() -> None:
    with _RecordingBackend() as backend:
        assert not backend.closed
        assert backend.get_features() == 1 << 32
        with open(os.devnull, "rb") as devnull:
            backend.set_vring_call(0, devnull)
            backend.set_vring_kick(1, devnull.fileno())
            fd = devnull.fileno()
        backend.set_vring_err(2, None)
    assert backend.calls == [
        ("set_vring_call", 0, fd),
        ("set_vring_kick", 1, fd),
        ("set_vring_err", 2, None),
    ]
    assert backend.closed
    assert backend.released == 1
    backend.close()
    assert backend.released == 1
    with pytest.raises(ClosedError):
        backend.get_features()
    with pytest.raises(ClosedError), backend:
        pass


def test_backend_closes_on_error_too() -> None:
    backend = _RecordingBackend()
    with pytest.raises(RuntimeError), backend:
        raise RuntimeError("boom")
    assert backend.closed
    assert backend.released == 1


def test_as_fd() -> None:
    assert as_fd(7) == 7
    with open(os.devnull, "rb") as devnull:
        assert isinstance(devnull, EventFdLike)
        assert as_fd(devnull) == devnull.fileno()
    with pytest.raises(InvalidParamError):
        as_fd(-1)
    with pytest.raises(TypeError):
        as_fd(True)
    with pytest.raises(TypeError):
        as_fd("3")  # type: ignore[arg-type]

    class BadFileno:
        def fileno(self) -> int:
            return "3"  # type: ignore[return-value]

    with pytest.raises(TypeError):
        as_fd(BadFileno())
