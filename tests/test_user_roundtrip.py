"""Our vhost-user front-end against our back-end session, request by request.

A recording :class:`BackendHandler` is served by a :class:`BackendSession` in a thread;
the test drives a :class:`Frontend` and checks, for every front-end request type, that
the handler saw the right arguments and that its answer (or the file it handed out)
came back. Back-end requests travel the other way over the channel that
``SET_BACKEND_REQ_FD`` opens, answered by a recording :class:`FrontendRequestHandler`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhost import EventFd, GuestMemory
from vhost.codes import MigrationPhase, ProtocolFeature, TransferDirection
from vhost.errors import (
    ClosedError,
    InactiveFeatureError,
    InvalidParamError,
    NotSupportedError,
    RequestRefusedError,
    VhostError,
)
from vhost.types import (
    DirtyLogRegion,
    IotlbAccess,
    IotlbMessage,
    IotlbType,
    MemoryRegion,
    VringAddrs,
    VringConfig,
)
from vhost.user import (
    BackendChannel,
    BackendHandler,
    BackendListener,
    FileDescriptor,
    Frontend,
    FrontendChannel,
    FrontendRequestHandler,
    InflightArea,
    InflightInfo,
    regions_of,
    serve_in_thread,
)
from vhost.virtio import DeviceStatus

VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30
DEVICE_BIT = 1 << 0
FEATURES = VERSION_1 | PROTOCOL_FEATURES | DEVICE_BIT

PF = ProtocolFeature
ALL_PROTOCOL = (
    PF.MQ
    | PF.LOG_SHMFD
    | PF.RARP
    | PF.REPLY_ACK
    | PF.MTU
    | PF.BACKEND_REQ
    | PF.CROSS_ENDIAN
    | PF.CRYPTO_SESSION
    | PF.PAGEFAULT
    | PF.CONFIG
    | PF.BACKEND_SEND_FD
    | PF.HOST_NOTIFIER
    | PF.INFLIGHT_SHMFD
    | PF.RESET_DEVICE
    | PF.INBAND_NOTIFICATIONS
    | PF.CONFIGURE_MEM_SLOTS
    | PF.STATUS
    | PF.SHARED_OBJECT
    | PF.DEVICE_STATE
)

RAM_LAYOUT = [(0, 0x10000), (0x100000, 0x10000)]
TIMEOUT = 5.0


def memfd_with(data: bytes, size: int = 4096) -> int:
    fd = os.memfd_create("pv-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    return fd


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class Recorder(BackendHandler):
    """Records every call (name, args) and answers with recognisable values."""

    max_queues = 2

    def __init__(self, protocol: int = int(ALL_PROTOCOL)) -> None:
        self.protocol = protocol
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.refuse: set[str] = set()
        self.errors: list[BaseException] = []
        self.memory: GuestMemory | None = None
        self.config = bytearray(range(64))
        self.status = 0
        self.channel: BackendChannel | None = None
        self.eventfds: dict[tuple[str, int], EventFd | None] = {}
        self.own_fds: list[int] = []
        self.state_fd: int | None = None

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.refuse:
            raise RuntimeError(f"{name} refused by the test")

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def last(self, name: str) -> tuple[Any, ...]:
        for n, args in reversed(self.calls):
            if n == name:
                found: tuple[Any, ...] = args
                return found
        raise AssertionError(f"the handler never saw {name}; saw {self.names()}")

    def close_own(self) -> None:
        for fd in self.own_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.own_fds.clear()

    def _own(self, fd: int) -> int:
        self.own_fds.append(fd)
        return fd

    # negotiation
    def get_features(self) -> int:
        self._rec("get_features")
        return FEATURES

    def set_features(self, features: int) -> None:
        self._rec("set_features", features)

    def get_protocol_features(self) -> int:
        self._rec("get_protocol_features")
        return self.protocol

    def set_protocol_features(self, features: int) -> None:
        self._rec("set_protocol_features", features)

    def set_owner(self) -> None:
        self._rec("set_owner")

    def reset_owner(self) -> None:
        self._rec("reset_owner")

    def get_queue_num(self) -> int:
        self._rec("get_queue_num")
        return self.max_queues

    # memory
    def set_mem_table(self, memory: GuestMemory) -> None:
        self._rec("set_mem_table", memory.regions())
        self.memory = memory

    def add_mem_region(self, memory: GuestMemory, region: MemoryRegion) -> None:
        self._rec("add_mem_region", region)
        self.memory = memory

    def remove_mem_region(self, memory: GuestMemory, region: MemoryRegion) -> None:
        self._rec("remove_mem_region", region)
        self.memory = memory

    def get_max_mem_slots(self) -> int:
        self._rec("get_max_mem_slots")
        return 8

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: FileDescriptor) -> None:
        self._rec("set_log_base", mmap_size, mmap_offset, fd)

    def set_log_fd(self, fd: FileDescriptor) -> None:
        self._rec("set_log_fd", fd)

    # rings
    def set_vring_num(self, index: int, num: int) -> None:
        self._rec("set_vring_num", index, num)

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self._rec("set_vring_addr", index, addrs)

    def set_vring_base(self, index: int, base: int) -> None:
        self._rec("set_vring_base", index, base)

    def get_vring_base(self, index: int) -> int:
        self._rec("get_vring_base", index)
        return 0x40 + index

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_kick", index, fd)
        self.eventfds[("kick", index)] = fd

    def set_vring_call(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_call", index, fd)
        self.eventfds[("call", index)] = fd

    def set_vring_err(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_err", index, fd)
        self.eventfds[("err", index)] = fd

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._rec("set_vring_enable", index, enable)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        self._rec("set_vring_endian", index, big_endian)

    def vring_kick(self, index: int) -> None:
        self._rec("vring_kick", index)

    # device
    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        self._rec("get_config", offset, size, flags)
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        self._rec("set_config", offset, data, flags)
        self.config[offset : offset + len(data)] = data

    def set_backend_channel(self, channel: BackendChannel) -> None:
        self._rec("set_backend_channel", channel)
        self.channel = channel

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        self._rec("get_inflight_fd", num_queues, queue_size)
        return InflightArea(8192, 0, self._own(memfd_with(b"inflight area", 8192)))

    def set_inflight_fd(self, info: InflightInfo) -> None:
        self._rec("set_inflight_fd", info)

    def send_rarp(self, mac: bytes) -> None:
        self._rec("send_rarp", mac)

    def net_set_mtu(self, mtu: int) -> None:
        self._rec("net_set_mtu", mtu)

    def iotlb_msg(self, message: IotlbMessage) -> None:
        self._rec("iotlb_msg", message)

    def reset_device(self) -> None:
        self._rec("reset_device")

    def set_status(self, status: int) -> None:
        self._rec("set_status", status)
        self.status = status

    def get_status(self) -> int:
        self._rec("get_status")
        return self.status

    def gpu_set_socket(self, fd: FileDescriptor) -> None:
        self._rec("gpu_set_socket", fd)

    def get_shared_object(self, uuid: bytes) -> int:
        self._rec("get_shared_object", uuid)
        return self._own(memfd_with(b"dma-buf " + uuid))

    def set_device_state_fd(self, direction: int, phase: int, fd: FileDescriptor) -> int | None:
        self._rec("set_device_state_fd", direction, phase, fd)
        return self.state_fd

    def check_device_state(self) -> None:
        self._rec("check_device_state")

    def postcopy_advise(self) -> int:
        self._rec("postcopy_advise")
        return self._own(memfd_with(b"userfaultfd stand-in"))

    def postcopy_listen(self) -> None:
        self._rec("postcopy_listen")

    def postcopy_end(self) -> None:
        self._rec("postcopy_end")

    def create_crypto_session(self, params: bytes) -> bytes:
        self._rec("create_crypto_session", params)
        return b"session:" + params

    def close_crypto_session(self, session_id: int) -> None:
        self._rec("close_crypto_session", session_id)

    def on_request_error(self, error: BaseException) -> None:
        # without its traceback: frames -> self -> errors -> error would be a cycle that
        # keeps the request's fds open until the garbage collector runs
        self.errors.append(error.with_traceback(None))


@dataclass
class Link:
    fe: Frontend
    be: Recorder


@contextlib.contextmanager
def linked(sock_dir: Path, handler: Recorder) -> Iterator[Link]:
    with BackendListener(sock_dir / "be.sock") as listener:
        fe = Frontend.connect(listener.path, timeout=TIMEOUT)
        session = listener.accept(timeout=TIMEOUT)
    try:
        with fe, serve_in_thread(session, handler):
            yield Link(fe, handler)
    finally:
        handler.close_own()


def negotiate(fe: Frontend, protocol: int) -> None:
    assert fe.get_features() == FEATURES
    fe.set_owner()
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & protocol)
    fe.set_features(FEATURES)


def sync(fe: Frontend) -> None:
    """A request with a reply: everything sent before it has been handled."""
    fe.get_features()


@pytest.fixture(params=["reply_ack", "no_ack"])
def link(request: pytest.FixtureRequest, tmp_sock_dir: Path) -> Iterator[Link]:
    protocol = int(ALL_PROTOCOL)
    if request.param == "no_ack":
        protocol &= ~int(PF.REPLY_ACK)
    with linked(tmp_sock_dir, Recorder()) as lk:
        negotiate(lk.fe, protocol)
        yield lk


@pytest.fixture
def acked(tmp_sock_dir: Path) -> Iterator[Link]:
    with linked(tmp_sock_dir, Recorder()) as lk:
        negotiate(lk.fe, int(ALL_PROTOCOL))
        yield lk


# ---- negotiation ----------------------------------------------------------------------


def test_negotiation_reaches_handler(tmp_sock_dir: Path) -> None:
    with linked(tmp_sock_dir, Recorder()) as lk:
        fe, be = lk.fe, lk.be
        assert fe.get_features() == FEATURES
        fe.set_owner()
        assert fe.get_protocol_features() == ALL_PROTOCOL
        wanted = int(PF.REPLY_ACK | PF.MQ | PF.CONFIG)
        fe.set_protocol_features(wanted)
        fe.set_features(VERSION_1 | PROTOCOL_FEATURES)
        assert fe.acked_features == VERSION_1 | PROTOCOL_FEATURES
        assert fe.acked_protocol_features == wanted
        # With REPLY_ACK acked, SET_FEATURES was acked: the handler has run.
        assert be.last("set_features") == (VERSION_1 | PROTOCOL_FEATURES,)
        assert be.last("set_protocol_features") == (wanted,)
        assert "set_owner" in be.names()
        assert be.names()[0] == "get_features"
        assert fe.get_queue_num() == 2
        assert be.last("get_queue_num") == ()
        fe.reset_owner()
        assert "reset_owner" in be.names()
        # RESET_OWNER cleared ownership: a second SET_OWNER is accepted again.
        fe.set_owner()
        assert be.names().count("set_owner") == 2


def test_negotiate_helper(tmp_sock_dir: Path) -> None:
    with linked(tmp_sock_dir, Recorder()) as lk:
        features, proto = lk.fe.negotiate(protocol_features=int(PF.REPLY_ACK | PF.CONFIG))
        assert features == FEATURES
        assert proto == PF.REPLY_ACK | PF.CONFIG
        assert lk.be.last("set_protocol_features") == (int(PF.REPLY_ACK | PF.CONFIG),)
        assert lk.be.last("set_features") == (FEATURES,)


# ---- memory ---------------------------------------------------------------------------


def test_set_mem_table_shares_memory_both_ways(link: Link) -> None:
    fe, be = link.fe, link.be
    ram = GuestMemory.allocate(RAM_LAYOUT)
    ram.write(0x1000, b"written by the front-end")
    ram.write(0x100020, b"second region")
    fe.set_mem_table(regions_of(ram))
    sync(fe)
    (seen,) = be.last("set_mem_table")
    assert [(r.guest_phys_addr, r.memory_size) for r in seen] == RAM_LAYOUT
    assert be.memory is not None
    assert be.memory.read(0x1000, 24) == b"written by the front-end"
    assert be.memory.read(0x100020, 13) == b"second region"
    be.memory.write(0x2000, b"written by the back-end")
    be.memory.write(0x10FFF0, b"end of region 2")
    assert ram.read(0x2000, 23) == b"written by the back-end"
    assert ram.read(0x10FFF0, 15) == b"end of region 2"


def test_add_and_remove_mem_region(link: Link) -> None:
    fe, be = link.fe, link.be
    assert fe.get_max_mem_slots() == 8
    assert be.last("get_max_mem_slots") == ()
    ram = GuestMemory.allocate(RAM_LAYOUT[:1])
    fe.set_mem_table(regions_of(ram))
    extra = GuestMemory.allocate([(0x200000, 0x8000)])
    extra.write(0x200100, b"hot-plugged")
    (region,) = regions_of(extra)
    fe.add_mem_region(region)
    sync(fe)
    (added,) = be.last("add_mem_region")
    assert isinstance(added, MemoryRegion)
    assert (added.guest_phys_addr, added.memory_size, added.userspace_addr) == (
        region.guest_phys_addr,
        region.memory_size,
        region.userspace_addr,
    )
    # its fd is the back-end's mapping of the front-end's file (borrowed from memory)
    assert inode(added.fd) == inode(region.fd)
    assert be.memory is not None
    assert be.memory.read(0x200100, 11) == b"hot-plugged"
    be.memory.write(0x200200, b"seen")
    assert extra.read(0x200200, 4) == b"seen"
    fe.remove_mem_region(region)
    sync(fe)
    (removed,) = be.last("remove_mem_region")
    assert isinstance(removed, MemoryRegion)
    assert (removed.guest_phys_addr, removed.memory_size, removed.fd) == (0x200000, 0x8000, -1)
    assert not be.memory.contains(0x200000, 1)
    assert be.memory.contains(0, 0x10000)


def test_dirty_log_requests(link: Link) -> None:
    fe, be = link.fe, link.be
    log_fd = memfd_with(b"", 0x2000)
    efd = EventFd()
    try:
        fe.set_log_base(0, DirtyLogRegion(mmap_size=0x2000, mmap_offset=0x1000, fd=log_fd))
        size, offset, fd = be.last("set_log_base")
        assert (size, offset) == (0x2000, 0x1000)
        assert inode(fd.fileno()) == inode(log_fd)
        fe.set_log_fd(efd)
        sync(fe)
        (got,) = be.last("set_log_fd")
        assert inode(got.fileno()) == inode(efd.fileno())
        os.write(got.fileno(), (5).to_bytes(8, "little"))
        assert efd.read() == 5
    finally:
        os.close(log_fd)
        efd.close()


# ---- rings ----------------------------------------------------------------------------


def test_vring_setup_and_base(link: Link) -> None:
    fe, be = link.fe, link.be
    ram = GuestMemory.allocate(RAM_LAYOUT)
    fe.set_mem_table(regions_of(ram))
    uaddr = regions_of(ram)[1].userspace_addr
    fe.set_vring_num(1, 256)
    config = VringConfig(
        queue_max_size=256,
        queue_size=256,
        flags=0,
        desc_table_addr=uaddr,
        used_ring_addr=uaddr + 0x2000,
        avail_ring_addr=uaddr + 0x1000,
    )
    fe.set_vring_addr(1, config)
    fe.set_vring_base(1, 7)
    assert fe.get_vring_base(1) == 0x41
    assert be.last("set_vring_num") == (1, 256)
    assert be.last("set_vring_addr") == (
        1,
        VringAddrs(
            desc_table_addr=uaddr, used_ring_addr=uaddr + 0x2000, avail_ring_addr=uaddr + 0x1000
        ),
    )
    assert be.last("set_vring_base") == (1, 7)
    assert be.last("get_vring_base") == (1,)
    fe.set_vring_enable(1, True)
    fe.set_vring_enable(0, False)
    fe.set_vring_endian(0, True)
    fe.vring_kick(1)
    sync(fe)
    assert [a for n, a in be.calls if n == "set_vring_enable"] == [(1, True), (0, False)]
    assert be.last("set_vring_endian") == (0, True)
    assert be.last("vring_kick") == (1,)


def test_vring_kick_call_err_eventfds(link: Link) -> None:
    fe, be = link.fe, link.be
    kick, call, err = EventFd(), EventFd(), EventFd()
    try:
        fe.set_vring_kick(0, kick)
        fe.set_vring_call(1, call)
        fe.set_vring_err(0, err)
        sync(fe)
        be_kick = be.eventfds[("kick", 0)]
        be_call = be.eventfds[("call", 1)]
        be_err = be.eventfds[("err", 0)]
        assert be_kick is not None and be_call is not None and be_err is not None
        # front-end kicks, the back-end's eventfd wakes
        assert not be_kick.wait(0.05)
        kick.write(3)
        assert be_kick.wait(TIMEOUT)
        assert be_kick.read() == 3
        # back-end calls and signals errors, the front-end's eventfds wake
        be_call.write(1)
        assert call.wait(TIMEOUT)
        assert call.read() == 1
        be_err.write(2)
        assert err.wait(TIMEOUT)
        assert err.read() == 2
        # "no fd": the handler gets None
        fe.set_vring_kick(1, None)
        fe.set_vring_call(0, None)
        fe.set_vring_err(1, None)
        sync(fe)
        assert be.last("set_vring_kick") == (1, None)
        assert be.last("set_vring_call") == (0, None)
        assert be.last("set_vring_err") == (1, None)
    finally:
        for e in (kick, call, err):
            e.close()


# ---- device-specific ------------------------------------------------------------------


def test_net_requests(link: Link) -> None:
    fe, be = link.fe, link.be
    fe.send_rarp(b"\x52\x54\x00\x12\x34\x56")
    fe.net_set_mtu(9000)
    sync(fe)
    assert be.last("send_rarp") == (b"\x52\x54\x00\x12\x34\x56",)
    assert be.last("net_set_mtu") == (9000,)


def test_config_space(link: Link) -> None:
    fe, be = link.fe, link.be
    assert fe.get_config(4, 8) == bytes(range(4, 12))
    assert be.last("get_config") == (4, 8, 0)
    fe.set_config(4, b"abcd", 0)
    assert fe.get_config(0, 12) == bytes(range(4)) + b"abcd" + bytes(range(8, 12))
    assert be.last("set_config") == (4, b"abcd", 0)
    assert fe.get_config(0, 4, flags=1) == bytes(range(4))
    assert be.last("get_config") == (0, 4, 1)


def test_iotlb_msg(link: Link) -> None:
    fe, be = link.fe, link.be
    msg = IotlbMessage(
        iova=0x1000, size=0x2000, uaddr=0x7F0000, perm=IotlbAccess.RW, type=IotlbType.UPDATE
    )
    fe.send_iotlb_msg(msg)  # IOTLB_MSG always has a reply: the handler has run
    assert be.last("iotlb_msg") == (msg,)


def test_crypto_sessions(link: Link) -> None:
    fe, be = link.fe, link.be
    assert fe.create_crypto_session(b"\x01\x02params") == b"session:\x01\x02params"
    assert be.last("create_crypto_session") == (b"\x01\x02params",)
    fe.close_crypto_session(77)
    sync(fe)
    assert be.last("close_crypto_session") == (77,)


def test_postcopy(link: Link) -> None:
    fe, be = link.fe, link.be
    ufd = fe.postcopy_advise()
    assert be.last("postcopy_advise") == ()
    try:
        assert os.pread(ufd.fileno(), 20, 0) == b"userfaultfd stand-in"
    finally:
        ufd.close()
    fe.postcopy_listen()
    sync(fe)
    assert be.last("postcopy_listen") == ()
    # While listening, SET_MEM_TABLE takes its postcopy form: the back-end answers with
    # its own mapping addresses and the front-end acks them (as QEMU does).
    ram = GuestMemory.allocate(RAM_LAYOUT)
    ram.write(0x100, b"postcopy table")
    fe.set_mem_table(regions_of(ram))
    assert be.memory is not None
    assert be.memory.read(0x100, 14) == b"postcopy table"
    assert fe.get_features() == FEATURES  # the ack was consumed, the stream is in step
    fe.postcopy_end()
    assert be.last("postcopy_end") == ()
    # after POSTCOPY_END, SET_MEM_TABLE is the ordinary request again
    ram2 = GuestMemory.allocate(RAM_LAYOUT[:1])
    ram2.write(0x200, b"after postcopy")
    fe.set_mem_table(regions_of(ram2))
    sync(fe)
    assert be.memory.read(0x200, 14) == b"after postcopy"
    assert not be.memory.contains(0x100000, 1)


def test_inflight_fd(link: Link) -> None:
    fe, be = link.fe, link.be
    info = fe.get_inflight_fd(2, 256)
    assert be.last("get_inflight_fd") == (2, 256)
    assert (info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size) == (
        8192,
        0,
        2,
        256,
    )
    assert os.pread(info.fd.fileno(), 13, 0) == b"inflight area"
    fe.set_inflight_fd(info)
    sync(fe)
    (back,) = be.last("set_inflight_fd")
    assert isinstance(back, InflightInfo)
    assert (back.mmap_size, back.mmap_offset, back.num_queues, back.queue_size) == (
        8192,
        0,
        2,
        256,
    )
    assert inode(back.fd.fileno()) == inode(info.fd.fileno())
    info.fd.close()


def test_gpu_set_socket(link: Link) -> None:
    fe, be = link.fe, link.be
    a, b = socket.socketpair()
    with a, b:
        fe.gpu_set_socket(a.fileno())
        sync(fe)
        (fd,) = be.last("gpu_set_socket")
        os.write(fd.fileno(), b"gpu hello")
        b.settimeout(TIMEOUT)
        assert b.recv(16) == b"gpu hello"


def test_reset_device_and_status(link: Link) -> None:
    fe, be = link.fe, link.be
    fe.set_status(0x0F)
    status = fe.get_status()
    # The same IntFlag as vhost.vdpa.VhostVdpa.get_status.
    assert isinstance(status, DeviceStatus) and status == 0x0F
    assert be.last("set_status") == (0x0F,)
    assert be.last("get_status") == ()
    fe.reset_device()
    sync(fe)
    assert "reset_device" in be.names()


def test_shared_object(link: Link) -> None:
    fe, be = link.fe, link.be
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    fd = fe.get_shared_object(u)
    try:
        assert be.last("get_shared_object") == (u.bytes,)
        assert os.pread(fd.fileno(), 24, 0) == b"dma-buf " + u.bytes
    finally:
        fd.close()


def test_device_state_fd(link: Link) -> None:
    fe, be = link.fe, link.be
    r, w = os.pipe()
    try:
        assert fe.set_device_state_fd(TransferDirection.SAVE, MigrationPhase.STOPPED, w) is None
        direction, phase, fd = be.last("set_device_state_fd")
        assert (direction, phase) == (0, 0)
        os.write(fd.fileno(), b"device state")
        fd.close()
        assert os.read(r, 64) == b"device state"
        # the back-end may answer with a pipe end of its own
        r2, w2 = os.pipe()
        be.state_fd = r2
        got = fe.set_device_state_fd(TransferDirection.LOAD, MigrationPhase.STOPPED, w)
        assert got is not None
        assert be.last("set_device_state_fd")[:2] == (1, 0)
        os.write(w2, b"theirs")
        assert os.read(got.fileno(), 16) == b"theirs"
        got.close()
        os.close(r2)
        os.close(w2)
        fe.check_device_state()
        assert be.last("check_device_state") == ()
    finally:
        os.close(r)
        os.close(w)


def test_set_backend_req_fd_hands_handler_a_channel(link: Link) -> None:
    fe, be = link.fe, link.be
    with fe.set_backend_req_fd():
        sync(fe)
        (ch,) = be.last("set_backend_channel")
        assert isinstance(ch, BackendChannel)


# ---- REPLY_ACK and refusals -----------------------------------------------------------

REFUSABLE: list[tuple[str, Callable[[Frontend], object]]] = [
    ("set_vring_num", lambda fe: fe.set_vring_num(0, 64)),
    ("set_vring_enable", lambda fe: fe.set_vring_enable(0, True)),
    ("set_config", lambda fe: fe.set_config(0, b"x")),
    ("net_set_mtu", lambda fe: fe.net_set_mtu(1500)),
    ("set_status", lambda fe: fe.set_status(1)),
    ("reset_device", lambda fe: fe.reset_device()),
    ("set_features", lambda fe: fe.set_features(FEATURES)),
]


@pytest.mark.parametrize(("name", "call"), REFUSABLE, ids=[n for n, _ in REFUSABLE])
def test_reply_ack_refusal_keeps_connection(
    acked: Link, name: str, call: Callable[[Frontend], object]
) -> None:
    fe, be = acked.fe, acked.be
    be.refuse.add(name)
    with pytest.raises(RequestRefusedError):
        call(fe)
    assert be.last(name) is not None
    # the connection goes on
    assert not fe.broken
    assert fe.get_queue_num() == 2
    # the handler heard of its failure (after the NACK went out, before the next request)
    assert len(be.errors) == 1
    assert "refused by the test" in str(be.errors[0])
    be.refuse.clear()
    call(fe)
    assert len(be.errors) == 1


def test_reply_ack_not_supported_default_is_nacked(tmp_sock_dir: Path) -> None:
    """A handler that does not implement a request (the base class refuses) is NACKed."""

    class Minimal(BackendHandler):
        def get_features(self) -> int:
            return FEATURES

        def get_vring_base(self, index: int) -> int:
            return 0

        def get_protocol_features(self) -> int:
            return int(PF.REPLY_ACK | PF.MTU | PF.RARP)

    with BackendListener(tmp_sock_dir / "m.sock") as listener:
        fe = Frontend.connect(listener.path, timeout=TIMEOUT)
        session = listener.accept(timeout=TIMEOUT)
    with fe, serve_in_thread(session, Minimal()):
        fe.negotiate()
        with pytest.raises(RequestRefusedError):
            fe.net_set_mtu(1500)
        with pytest.raises(RequestRefusedError):
            fe.send_rarp(b"\x00" * 6)
        assert fe.get_features() == FEATURES


STATUS_REFUSABLE: list[tuple[str, Callable[[Frontend], object]]] = [
    ("check_device_state", lambda fe: fe.check_device_state()),
    ("postcopy_end", lambda fe: fe.postcopy_end()),
    (
        "iotlb_msg",
        lambda fe: fe.send_iotlb_msg(
            IotlbMessage(iova=0, size=4096, uaddr=0, perm=IotlbAccess.RO, type=IotlbType.UPDATE)
        ),
    ),
]


@pytest.mark.parametrize(("name", "call"), STATUS_REFUSABLE, ids=[n for n, _ in STATUS_REFUSABLE])
def test_status_reply_refusal_keeps_connection(
    link: Link, name: str, call: Callable[[Frontend], object]
) -> None:
    """Requests whose reply is a status report a handler failure as a non-zero status
    (the spec's "non-zero on failure"), with or without REPLY_ACK; the connection lives."""
    fe, be = link.fe, link.be
    be.refuse.add(name)
    with pytest.raises(RequestRefusedError):
        call(fe)
    assert be.last(name) is not None
    assert not fe.broken
    assert fe.get_features() == FEATURES


def test_device_state_fd_refusal(link: Link) -> None:
    fe, be = link.fe, link.be
    be.refuse.add("set_device_state_fd")
    r, w = os.pipe()
    try:
        with pytest.raises(RequestRefusedError):
            fe.set_device_state_fd(TransferDirection.SAVE, MigrationPhase.STOPPED, w)
        assert fe.get_features() == FEATURES
    finally:
        os.close(r)
        os.close(w)


# ---- feature gating -------------------------------------------------------------------

GATED: list[tuple[str, Callable[[Frontend], object]]] = [
    ("get_queue_num", lambda fe: fe.get_queue_num()),
    ("get_config", lambda fe: fe.get_config(0, 4)),
    ("set_config", lambda fe: fe.set_config(0, b"x")),
    ("send_rarp", lambda fe: fe.send_rarp(b"\x00" * 6)),
    ("net_set_mtu", lambda fe: fe.net_set_mtu(1500)),
    ("set_backend_req_fd", lambda fe: fe.set_backend_req_fd()),
    ("set_vring_endian", lambda fe: fe.set_vring_endian(0, True)),
    ("create_crypto_session", lambda fe: fe.create_crypto_session(b"p")),
    ("close_crypto_session", lambda fe: fe.close_crypto_session(1)),
    ("postcopy_advise", lambda fe: fe.postcopy_advise()),
    ("postcopy_listen", lambda fe: fe.postcopy_listen()),
    ("postcopy_end", lambda fe: fe.postcopy_end()),
    ("get_inflight_fd", lambda fe: fe.get_inflight_fd(1, 64)),
    ("reset_device", lambda fe: fe.reset_device()),
    ("vring_kick", lambda fe: fe.vring_kick(0)),
    ("get_max_mem_slots", lambda fe: fe.get_max_mem_slots()),
    ("set_status", lambda fe: fe.set_status(1)),
    ("get_status", lambda fe: fe.get_status()),
    ("get_shared_object", lambda fe: fe.get_shared_object(uuid.UUID(int=1))),
    ("check_device_state", lambda fe: fe.check_device_state()),
    ("set_log_base", lambda fe: fe.set_log_base(0, DirtyLogRegion(4096, 0, fe.fileno()))),
]


def test_gated_requests_fail_locally(tmp_sock_dir: Path) -> None:
    with linked(tmp_sock_dir, Recorder()) as lk:
        fe, be = lk.fe, lk.be
        # before GET_FEATURES said PROTOCOL_FEATURES, protocol features are off limits
        with pytest.raises(InactiveFeatureError):
            fe.get_protocol_features()
        negotiate(fe, int(PF.REPLY_ACK))
        assert fe.acked_protocol_features == PF.REPLY_ACK
        before = list(be.names())
        for name, call in GATED:
            with pytest.raises(InactiveFeatureError):
                call(fe)
            assert name not in be.names(), name
        # nothing reached the back-end, and the connection is fine
        assert be.names() == before
        assert not fe.broken
        assert fe.get_features() == FEATURES


def test_protocol_features_need_the_feature_bit(tmp_sock_dir: Path) -> None:
    class NoProto(Recorder):
        def get_features(self) -> int:
            self._rec("get_features")
            return VERSION_1

    with linked(tmp_sock_dir, NoProto()) as lk:
        assert lk.fe.get_features() == VERSION_1
        with pytest.raises(InactiveFeatureError):
            lk.fe.get_protocol_features()
        with pytest.raises(InactiveFeatureError):
            lk.fe.set_protocol_features(int(PF.REPLY_ACK))
        assert "get_protocol_features" not in lk.be.names()
        features, proto = lk.fe.negotiate()
        assert (features, proto) == (VERSION_1, PF(0))


# ---- the back-end request channel -----------------------------------------------------


class FrontRecorder(FrontendRequestHandler):
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self.refuse: set[str] = set()
        self.lookup_answer = 0

    def _rec(self, name: str, *args: Any) -> None:
        self.events.put((name, args))
        if name in self.refuse:
            raise RuntimeError(f"{name} refused by the test")

    def next(self) -> tuple[str, tuple[Any, ...]]:
        return self.events.get(timeout=TIMEOUT)

    def config_change(self) -> int | None:
        self._rec("config_change")
        return None

    def vring_host_notifier(
        self, index: int, size: int, offset: int, fd: FileDescriptor | None
    ) -> int | None:
        self._rec("vring_host_notifier", index, size, offset, fd)
        return 0

    def vring_call(self, index: int) -> int | None:
        self._rec("vring_call", index)
        return None

    def vring_err(self, index: int) -> int | None:
        self._rec("vring_err", index)
        return None

    def iotlb_msg(self, message: IotlbMessage) -> int | None:
        self._rec("iotlb_msg", message)
        return None

    def shared_object_add(self, uuid: bytes) -> int | None:
        self._rec("shared_object_add", uuid)
        return None

    def shared_object_remove(self, uuid: bytes) -> int | None:
        self._rec("shared_object_remove", uuid)
        return None

    def shared_object_lookup(self, uuid: bytes) -> int | None:
        self._rec("shared_object_lookup", uuid)
        return self.lookup_answer


@dataclass
class ChannelLink:
    fe: Frontend
    be: Recorder
    channel: BackendChannel
    front: FrontRecorder
    front_errors: list[BaseException]
    reply_ack: bool


def _serve_channel(
    ch: FrontendChannel, handler: FrontRecorder, errors: list[BaseException]
) -> None:
    while True:
        try:
            ch.process_one(handler)
        except VhostError as exc:
            if ch.broken or isinstance(exc, ClosedError | ConnectionError):
                return
            errors.append(exc.with_traceback(None))  # no frame cycle holding fds
        except RuntimeError as exc:  # the handler's own refusal, re-raised after the NACK
            errors.append(exc.with_traceback(None))
        except OSError:
            return


CHANNEL_PROTOCOL = int(
    PF.BACKEND_REQ
    | PF.BACKEND_SEND_FD
    | PF.CONFIG
    | PF.HOST_NOTIFIER
    | PF.INBAND_NOTIFICATIONS
    | PF.SHARED_OBJECT
    | PF.REPLY_ACK
)


@pytest.fixture(params=["reply_ack", "no_ack"])
def channel_link(request: pytest.FixtureRequest, tmp_sock_dir: Path) -> Iterator[ChannelLink]:
    reply_ack = request.param == "reply_ack"
    protocol = CHANNEL_PROTOCOL if reply_ack else CHANNEL_PROTOCOL & ~int(PF.REPLY_ACK)
    with linked(tmp_sock_dir, Recorder()) as lk:
        negotiate(lk.fe, protocol)
        front = FrontRecorder()
        errors: list[BaseException] = []
        ch = lk.fe.set_backend_req_fd()
        t = threading.Thread(target=_serve_channel, args=(ch, front, errors), daemon=True)
        t.start()
        try:
            sync(lk.fe)
            assert lk.be.channel is not None
            yield ChannelLink(lk.fe, lk.be, lk.be.channel, front, errors, reply_ack)
        finally:
            ch.close()
            t.join(TIMEOUT)
            assert not t.is_alive()


def test_channel_every_backend_request(channel_link: ChannelLink) -> None:
    c, front = channel_link.channel, channel_link.front
    u = uuid.UUID(int=0xABCDEF).bytes

    c.config_change()
    assert front.next() == ("config_change", ())
    c.vring_call(1)
    assert front.next() == ("vring_call", (1,))
    c.vring_err(0)
    assert front.next() == ("vring_err", (0,))
    c.shared_object_add(u)
    assert front.next() == ("shared_object_add", (u,))
    c.shared_object_remove(u)
    assert front.next() == ("shared_object_remove", (u,))
    front.lookup_answer = 0
    assert c.shared_object_lookup(u) == 0
    assert front.next() == ("shared_object_lookup", (u,))
    front.lookup_answer = 5  # not found: the answer comes back as it is
    assert c.shared_object_lookup(u) == 5
    front.next()
    c.send_iotlb_msg(IotlbMessage(0x1000, 0x2000, 0x3000, IotlbAccess.RO, IotlbType.MISS))
    assert front.next() == (
        "iotlb_msg",
        (IotlbMessage(0x1000, 0x2000, 0x3000, IotlbAccess.RO, IotlbType.MISS),),
    )
    # vhost-user's layout has no address space: refused before sending, not dropped
    with pytest.raises(InvalidParamError, match="address space"):
        c.send_iotlb_msg(
            IotlbMessage(0x1000, 0x2000, 0x3000, IotlbAccess.RO, IotlbType.MISS, asid=1)
        )

    mfd = memfd_with(b"notifier page")
    try:
        c.vring_host_notifier(1, 4096, 0, mfd)
        name, (index, size, offset, fd) = front.next()
        assert (name, index, size, offset) == ("vring_host_notifier", 1, 4096, 0)
        assert fd is not None
        assert inode(fd.fileno()) == inode(mfd)
        assert os.pread(fd.fileno(), 13, 0) == b"notifier page"
        fd.close()
    finally:
        os.close(mfd)
    c.vring_host_notifier(0, 0, 0)
    assert front.next() == ("vring_host_notifier", (0, 0, 0, None))
    assert channel_link.front_errors == []


def test_channel_refusal_is_nacked(channel_link: ChannelLink) -> None:
    c, front = channel_link.channel, channel_link.front
    front.refuse.add("config_change")
    front.refuse.add("vring_call")
    if channel_link.reply_ack:
        with pytest.raises(RequestRefusedError):
            c.config_change()
        with pytest.raises(RequestRefusedError):
            c.vring_call(0)
    else:
        # without REPLY_ACK nobody waits: the refusal is only seen on the front-end side
        c.config_change()
        c.vring_call(0)
    assert front.next() == ("config_change", ())
    assert front.next() == ("vring_call", (0,))
    front.refuse.clear()
    # the channel still works after the refusals
    c.vring_err(1)
    assert front.next() == ("vring_err", (1,))
    assert [str(e) for e in channel_link.front_errors] == [
        "config_change refused by the test",
        "vring_call refused by the test",
    ]
    # the main connection is untouched
    assert channel_link.fe.get_features() == FEATURES


def test_channel_not_supported_default(tmp_sock_dir: Path) -> None:
    """The base FrontendRequestHandler refuses everything: NACK, and the error surfaces
    from process_one as NotSupportedError."""
    with linked(tmp_sock_dir, Recorder()) as lk:
        negotiate(lk.fe, CHANNEL_PROTOCOL)
        with lk.fe.set_backend_req_fd() as ch:
            sync(lk.fe)
            assert lk.be.channel is not None
            errors: list[BaseException] = []

            def serve() -> None:
                try:
                    ch.process_one(FrontendRequestHandler())
                except BaseException as exc:  # inspected below
                    errors.append(exc)

            t = threading.Thread(target=serve, daemon=True)
            t.start()
            with pytest.raises(RequestRefusedError):
                lk.be.channel.config_change()
            t.join(TIMEOUT)
            assert len(errors) == 1 and isinstance(errors[0], NotSupportedError)


def test_channel_gating(tmp_sock_dir: Path) -> None:
    with linked(tmp_sock_dir, Recorder()) as lk:
        negotiate(lk.fe, int(PF.BACKEND_REQ | PF.REPLY_ACK))
        with lk.fe.set_backend_req_fd():
            sync(lk.fe)
            c = lk.be.channel
            assert c is not None
            u = bytes(16)
            for call in (
                c.config_change,
                lambda: c.vring_call(0),
                lambda: c.vring_err(0),
                lambda: c.shared_object_add(u),
                lambda: c.shared_object_remove(u),
                lambda: c.shared_object_lookup(u),
                lambda: c.vring_host_notifier(0, 0, 0),
            ):
                with pytest.raises(InactiveFeatureError):
                    call()


def test_shared_object_lookup_reply_with_dma_buf_fd(tmp_sock_dir: Path) -> None:
    """The spec (and QEMU) answer a successful SHARED_OBJECT_LOOKUP with the dma-buf fd
    and a u64 0. The back-end channel accepts that fd instead of calling it a protocol
    error, and stays usable; a failed lookup comes back as its status."""
    header = struct.Struct("<III")
    with linked(tmp_sock_dir, Recorder()) as lk:
        negotiate(lk.fe, CHANNEL_PROTOCOL)
        near, far = socket.socketpair()
        with near, far:
            # SET_BACKEND_REQ_FD with our own socket end, so this test plays QEMU's part
            reply = lk.fe.native.send_raw(21, 0x1 | 0x8, b"", [far.fileno()], expect_reply=True)
            assert reply is not None and reply[2] == bytes(8)  # acked with 0
            assert lk.be.channel is not None
            channel = lk.be.channel
            near.settimeout(TIMEOUT)
            u = uuid.UUID(int=42).bytes
            answers: list[int | BaseException] = []

            def lookup() -> None:
                try:
                    answers.append(channel.shared_object_lookup(u))
                except BaseException as exc:  # checked below
                    answers.append(exc)

            dmabuf = memfd_with(b"dma-buf contents")
            try:
                for status in (0, 9):
                    t = threading.Thread(target=lookup)
                    t.start()
                    request = near.recv(header.size + 16)
                    code, flags, size = header.unpack_from(request)
                    assert (code, size) == (8, 16)  # SHARED_OBJECT_LOOKUP, a uuid
                    assert flags & 0x8  # it always wants the answer
                    assert request[header.size :] == u
                    body = header.pack(8, 0x1 | 0x4, 8) + struct.pack("<Q", status)
                    if status == 0:
                        socket.send_fds(near, [body], [dmabuf])
                    else:
                        near.sendall(body)
                    t.join(TIMEOUT)
                assert answers == [0, 9]
            finally:
                os.close(dmabuf)
            # and the channel still carries the next request
            t = threading.Thread(target=channel.config_change)
            t.start()
            request = near.recv(header.size)
            assert header.unpack_from(request)[0] == 2  # CONFIG_CHANGE_MSG
            near.sendall(header.pack(2, 0x1 | 0x4, 8) + bytes(8))
            t.join(TIMEOUT)
            assert not t.is_alive()


def test_negotiate_keeps_protocol_features_bit(tmp_sock_dir: Path) -> None:
    """A feature mask without bit 30 still acks VHOST_USER_F_PROTOCOL_FEATURES when it
    was offered: protocol features were negotiated, so the bit must be acked too."""
    with linked(tmp_sock_dir, Recorder()) as lk:
        features, proto = lk.fe.negotiate(features=VERSION_1, protocol_features=int(PF.MQ))
        assert features == VERSION_1 | PROTOCOL_FEATURES
        assert proto == PF.MQ
        assert lk.fe.get_queue_num() == 2
        assert lk.be.last("set_features") == (VERSION_1 | PROTOCOL_FEATURES,)
