"""Real QEMU as the front-end of a vhost-user-blk device implemented in Python.

``qemu-system-x86_64 -S`` (TCG) realizes a ``vhost-user-blk-pci`` device: it connects to
our :class:`BackendListener`, and its handshake is answered by a :class:`BackendHandler`
subclass served by our Rust session. The guest never runs (``-S``), so the handshake is
the whole conversation: QEMU asks for features, protocol features, the queue count and
the config space, and sets up the call/err notifiers of each queue. If any answer did
not satisfy it, realize fails and QEMU exits; so a VM in ``prelaunch`` with the device on
its PCI bus proves the handshake worked.

Observed with QEMU 10.0 (and the same handshake in 7.2): GET_FEATURES,
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, GET_FEATURES,
SET_VRING_CALL and SET_VRING_ERR per queue, then GET_CONFIG of the config size QEMU's
own feature set needs (57 bytes up to write_zeroes_may_unmap, at most 60).

Then the guest runs (``cont``): SeaBIOS drives the device, QEMU starts it over vhost-user
(SET_FEATURES, SET_MEM_TABLE with its guest RAM, ring set-up, kick), a small Python data
plane answers the reads from QEMU's RAM, and SeaBIOS boots the sector it read from us.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import peers
from vhost import EventFd
from vhost.codes import ProtocolFeature
from vhost.errors import InactiveFeatureError
from vhost.types import MemoryRegion, VringAddrs
from vhost.user import (
    BackendChannel,
    BackendHandler,
    BackendListener,
    BackendSession,
    GuestMemory,
    InflightArea,
    InflightInfo,
)
from vhost.virtio import BlkFeature, VirtioFeature

pytestmark = pytest.mark.timeout(120)

CAPACITY = 4096  # sectors: a 2 MiB disk
SEG_MAX = 126
BLK_SIZE = 512
VIRTIO_VENDOR = 0x1AF4
VIRTIO_BLK_PCI_IDS = {0x1001, 0x1042}  # transitional, modern
PCI_CLASS_STORAGE_SCSI = 0x0100

FEATURES = int(
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | BlkFeature.SEG_MAX
    | BlkFeature.BLK_SIZE
    | BlkFeature.FLUSH
    | BlkFeature.MQ
)
PROTOCOL = int(ProtocolFeature.CONFIG | ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)


def blk_config(num_queues: int) -> bytes:
    """A virtio-blk config space (struct virtio_blk_config, 60 bytes)."""
    cfg = bytearray(60)
    struct.pack_into("<Q", cfg, 0, CAPACITY)  # capacity
    struct.pack_into("<I", cfg, 12, SEG_MAX)  # seg_max
    struct.pack_into("<I", cfg, 20, BLK_SIZE)  # blk_size
    struct.pack_into("<H", cfg, 34, num_queues)  # num_queues
    return bytes(cfg)


class BlkDevice(BackendHandler):
    """A plausible vhost-user-blk device (no I/O: QEMU never starts the guest here)."""

    def __init__(self, num_queues: int = 1) -> None:
        self.max_queues = num_queues
        self.protocol = PROTOCOL
        self.config = blk_config(num_queues)
        self.seen: list[tuple[str, tuple[Any, ...]]] = []
        self.eventfds: list[EventFd] = []
        self.memory: GuestMemory | None = None

    def _rec(self, name: str, *args: Any) -> None:
        self.seen.append((name, args))

    def names(self) -> list[str]:
        return [n for n, _ in self.seen]

    def args(self, name: str) -> list[tuple[Any, ...]]:
        return [a for n, a in self.seen if n == name]

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

    def get_queue_num(self) -> int:
        self._rec("get_queue_num")
        return self.max_queues

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        self._rec("get_config", offset, size, flags)
        return self.config[offset : offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        self._rec("set_config", offset, data, flags)

    def set_mem_table(self, memory: GuestMemory) -> None:
        self._rec("set_mem_table")
        self.memory = memory

    def set_vring_call(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_call", index, fd is not None)
        if fd is not None:
            self.eventfds.append(fd)

    def set_vring_err(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_err", index, fd is not None)
        if fd is not None:
            self.eventfds.append(fd)

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_kick", index, fd is not None)

    def get_vring_base(self, index: int) -> int:
        self._rec("get_vring_base", index)
        return 0


@dataclass
class Served:
    device: BlkDevice
    accepted: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None


@pytest.fixture
def served_factory(tmp_sock_dir: Path) -> Iterator[Any]:
    """Serves a BlkDevice on a listener; returns (socket path, Served)."""
    listeners: list[BackendListener] = []
    sessions: list[BackendSession] = []
    runs: list[Served] = []

    def make(device: BlkDevice) -> tuple[Path, Served]:
        path = tmp_sock_dir / f"blk{len(listeners)}.sock"
        listener = BackendListener(path)
        listeners.append(listener)
        served = Served(device)

        def run() -> None:
            try:
                session = listener.accept(timeout=60)
                sessions.append(session)
                served.accepted.set()
                session.serve(device)
            except BaseException as exc:  # reported by the test
                served.errors.append(exc)

        served.thread = threading.Thread(target=run, name="blk-backend", daemon=True)
        served.thread.start()
        runs.append(served)
        return path, served

    yield make
    for s in sessions:
        s.close()
    for served in runs:
        assert served.thread is not None
        served.thread.join(10)
    for listener in listeners:
        listener.close()


def pci_devices(qemu: peers.QemuPeer) -> list[dict[str, Any]]:
    with qemu.qmp() as qmp:
        buses = qmp.command("query-pci")
    return [dev for bus in buses for dev in bus["devices"]]


def qtree(qemu: peers.QemuPeer) -> str:
    with qemu.qmp() as qmp:
        text = qmp.command("human-monitor-command", **{"command-line": "info qtree"})
    assert isinstance(text, str)
    return text


def assert_handshake(device: BlkDevice, num_queues: int) -> None:
    names = device.names()
    assert names[0] == "get_features"
    for needed in (
        "get_protocol_features",
        "set_protocol_features",
        "get_queue_num",
        "set_owner",
        "get_config",
    ):
        assert needed in names, f"QEMU never sent {needed}: {names}"
    # QEMU acks the protocol features it knows of those we offered: all three
    assert device.args("set_protocol_features") == [(PROTOCOL,)]
    assert names.index("set_protocol_features") < names.index("get_queue_num")
    # it reads the config space from the start, at most the 60 bytes we describe
    ((offset, size, _flags),) = device.args("get_config")
    assert offset == 0
    assert 8 <= size <= 60
    # every queue got its call and err notifiers, as eventfds
    for q in range(num_queues):
        assert (q, True) in device.args("set_vring_call")
        assert (q, True) in device.args("set_vring_err")
    # the guest never ran: no memory table, no kick, no ring started
    for absent in ("set_mem_table", "set_vring_kick", "set_features"):
        assert absent not in names, f"unexpected {absent} before the guest started"


@pytest.mark.parametrize("num_queues", [1, 2])
def test_qemu_realizes_python_blk_device(served_factory: Any, num_queues: int) -> None:
    device = BlkDevice(num_queues)
    sock, served = served_factory(device)
    with peers.qemu_vhost_user_blk(sock, num_queues=num_queues) as qemu:
        assert served.accepted.wait(30), qemu.peer.output()
        # QMP answers only once realize (and so the handshake) is over
        assert qemu.query_status() == "prelaunch"
        assert qemu.peer.alive(), qemu.peer.output()
        assert_handshake(device, num_queues)

        blk = [d for d in pci_devices(qemu) if d["id"]["vendor"] == VIRTIO_VENDOR]
        assert len(blk) == 1, blk
        assert blk[0]["id"]["device"] in VIRTIO_BLK_PCI_IDS
        assert blk[0]["class_info"]["class"] == PCI_CLASS_STORAGE_SCSI

        tree = qtree(qemu)
        assert "dev: vhost-user-blk-pci" in tree
        assert "dev: vhost-user-blk," in tree
        assert f"num-queues = {num_queues}" in tree

        # the notifiers QEMU handed us are live eventfds: signalling them works
        for efd in device.eventfds:
            efd.write(1)
        assert qemu.peer.alive(), qemu.peer.output()
    # QEMU went away: the session ended cleanly
    assert served.thread is not None
    served.thread.join(10)
    assert not served.thread.is_alive()
    assert served.errors == []


def test_qemu_rejects_too_few_backend_queues(served_factory: Any) -> None:
    """QEMU asks GET_QUEUE_NUM and refuses a device that has fewer queues than its
    ``num-queues``: our answer is what it acts on. (QEMU 10 reports the error and keeps
    reconnecting rather than exiting, so the test reads its stderr for the verdict.)"""
    device = BlkDevice(1)
    sock, served = served_factory(device)
    binary = peers.find_binary("qemu-system-x86_64")
    argv = [
        str(binary),
        "-S",
        "-M",
        "q35",
        "-nodefaults",
        "-nographic",
        "-display",
        "none",
        "-m",
        "128M",
        "-object",
        "memory-backend-memfd,id=mem,size=128M,share=on",
        "-M",
        "memory-backend=mem",
        "-chardev",
        f"socket,id=c0,path={sock}",
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=4",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "queues supported by the backend is 1" in line:
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()  # else a ResourceWarning
    assert served.accepted.is_set()
    assert "get_queue_num" in device.names()
    # it gave up before reading the config space
    assert "get_config" not in device.names()


# ---- the guest runs: SeaBIOS boots from our disk ------------------------------------------

# x86 real-mode boot sector: print MESSAGE on the debug console (port 0x402), halt.
BOOT_MESSAGE = b"pyvhost boot ok"
_BOOT_CODE = bytes.fromhex(
    "fc"  # cld
    "31c0"  # xor ax, ax
    "8ed8"  # mov ds, ax
    "be177c"  # mov si, 0x7c17 (the message, right after the code)
    "ba0204"  # mov dx, 0x402
    "ac"  # lodsb
    "84c0"  # test al, al
    "7403"  # jz halt
    "ee"  # out dx, al
    "ebf8"  # jmp lodsb
    "fa"  # halt: cli
    "f4"  # hlt
    "ebfc"  # jmp halt
)
assert len(_BOOT_CODE) == 0x17


def boot_image(sectors: int) -> bytearray:
    image = bytearray(sectors * 512)
    image[: len(_BOOT_CODE)] = _BOOT_CODE
    image[len(_BOOT_CODE) : len(_BOOT_CODE) + len(BOOT_MESSAGE) + 1] = BOOT_MESSAGE + b"\0"
    image[510:512] = b"\x55\xaa"
    return image


VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2


class BootableBlk(BlkDevice):
    """BlkDevice with a data plane: a split virtqueue served from guest memory in Python.

    On each kick it walks the available ring, executes the virtio-blk requests against
    an in-memory image, fills the used ring and signals the call eventfd.
    """

    def __init__(self, image: bytearray) -> None:
        super().__init__(1)
        self.image = image
        cfg = bytearray(self.config)
        struct.pack_into("<Q", cfg, 0, len(image) // 512)
        self.config = bytes(cfg)
        self.num = 0
        self.rings: tuple[int, int, int] | None = None  # desc, avail, used (user addrs)
        self.last_avail = 0
        self.call: EventFd | None = None
        self.requests: list[tuple[int, int]] = []  # (type, sector)
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.worker: threading.Thread | None = None

    def set_vring_num(self, index: int, num: int) -> None:
        self._rec("set_vring_num", index, num)
        self.num = num

    def set_vring_base(self, index: int, base: int) -> None:
        self._rec("set_vring_base", index, base)
        self.last_avail = base

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self._rec("set_vring_addr", index)
        self.rings = (addrs.desc_table_addr, addrs.avail_ring_addr, addrs.used_ring_addr)

    def set_vring_call(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_call", index, fd is not None)
        self.call = fd

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        self._rec("set_vring_kick", index, fd is not None)
        if fd is not None and self.worker is None:
            self.worker = threading.Thread(target=self._serve, args=(fd,), daemon=True)
            self.worker.start()

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._rec("set_vring_enable", index, enable)

    def get_vring_base(self, index: int) -> int:
        self._rec("get_vring_base", index)
        return self.last_avail

    def _serve(self, kick: EventFd) -> None:
        try:
            while not self.stop.is_set():
                if kick.wait(0.1):
                    kick.read()
                    self._drain()
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _drain(self) -> None:
        mem, rings = self.memory, self.rings
        assert mem is not None and rings is not None and self.num
        desc, avail, used = (mem.user_to_gpa(a) for a in rings)
        (avail_idx,) = struct.unpack("<H", mem.read(avail + 2, 2))
        while self.last_avail != avail_idx:
            slot = self.last_avail % self.num
            (head,) = struct.unpack("<H", mem.read(avail + 4 + 2 * slot, 2))
            written = self._request(mem, desc, head)
            (used_idx,) = struct.unpack("<H", mem.read(used + 2, 2))
            mem.write(used + 4 + 8 * (used_idx % self.num), struct.pack("<II", head, written))
            mem.write(used + 2, struct.pack("<H", (used_idx + 1) & 0xFFFF))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            if self.call is not None:
                self.call.write(1)

    def _request(self, mem: GuestMemory, desc: int, head: int) -> int:
        chain: list[tuple[int, int, int]] = []
        i = head
        while True:
            addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(desc + 16 * i, 16))
            chain.append((addr, length, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            i = nxt
        header = b"".join(mem.read(a, n) for a, n, f in chain if not f & VIRTQ_DESC_F_WRITE)
        kind, _reserved, sector = struct.unpack_from("<IIQ", header)
        self.requests.append((kind, sector))
        data = [(a, n) for a, n, f in chain[:-1] if f & VIRTQ_DESC_F_WRITE]
        out = header[16:]
        status_addr = chain[-1][0]
        status, written = VIRTIO_BLK_S_OK, 1
        offset = sector * 512
        if kind == VIRTIO_BLK_T_IN:
            for a, n in data:
                if offset + n > len(self.image):
                    status = VIRTIO_BLK_S_IOERR
                    break
                mem.write(a, bytes(self.image[offset : offset + n]))
                offset += n
                written += n
        elif kind == VIRTIO_BLK_T_OUT:
            self.image[offset : offset + len(out)] = out
        elif kind != VIRTIO_BLK_T_FLUSH:
            status = VIRTIO_BLK_S_UNSUPP
        mem.write(status_addr, bytes([status]))
        return written


class RichBootableBlk(BootableBlk):
    """BootableBlk offering more protocol features, so that QEMU takes its other paths:
    memory slots (GET_MAX_MEM_SLOTS, ADD_MEM_REG instead of SET_MEM_TABLE), device
    status (GET/SET_STATUS), RESET_DEVICE, the inflight area (GET/SET_INFLIGHT_FD) and
    the back-end request channel."""

    def __init__(self, image: bytearray) -> None:
        super().__init__(image)
        self.protocol = PROTOCOL | int(
            ProtocolFeature.CONFIGURE_MEM_SLOTS
            | ProtocolFeature.STATUS
            | ProtocolFeature.RESET_DEVICE
            | ProtocolFeature.INFLIGHT_SHMFD
            | ProtocolFeature.BACKEND_REQ
        )
        self.status = 0
        self.channel: BackendChannel | None = None
        self.inflight: list[int] = []

    def get_max_mem_slots(self) -> int:
        self._rec("get_max_mem_slots")
        return 8

    def add_mem_region(self, memory: GuestMemory, region: MemoryRegion) -> None:
        self._rec("add_mem_region", region)
        self.memory = memory

    def remove_mem_region(self, memory: GuestMemory, region: MemoryRegion) -> None:
        self._rec("remove_mem_region", region)
        self.memory = memory

    def set_status(self, status: int) -> None:
        self._rec("set_status", status)
        self.status = status

    def get_status(self) -> int:
        self._rec("get_status")
        return self.status

    def reset_device(self) -> None:
        self._rec("reset_device")

    def set_backend_channel(self, channel: BackendChannel) -> None:
        self._rec("set_backend_channel")
        self.channel = channel  # keep it open: QEMU reports an EOF on it otherwise

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        self._rec("get_inflight_fd", num_queues, queue_size)
        # split-ring layout: per queue a 16-byte header and 16 bytes per descriptor
        size = -(-num_queues * (16 + 16 * queue_size) // 4096) * 4096
        fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.inflight.append(fd)
        return InflightArea(size, 0, fd)

    def set_inflight_fd(self, info: InflightInfo) -> None:
        self._rec(
            "set_inflight_fd", info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size
        )
        info.fd.close()

    def close(self) -> None:
        for fd in self.inflight:
            os.close(fd)


@pytest.mark.parametrize("rich", [False, True], ids=["basic", "rich"])
def test_seabios_boots_from_python_backend(
    served_factory: Any, tmp_sock_dir: Path, rich: bool
) -> None:
    """``cont``: SeaBIOS drives the virtio-blk device, QEMU starts the vhost-user device
    (features, memory table, ring set-up, kick/call), our Python data plane serves the
    reads out of QEMU's own guest RAM, and the guest runs the boot sector it read from
    us: it prints to the debug console."""
    device = RichBootableBlk(boot_image(2048)) if rich else BootableBlk(boot_image(2048))
    sock, served = served_factory(device)
    debug_log = tmp_sock_dir / "debugcon.log"
    extra = [
        "-chardev",
        f"file,id=dbg,path={debug_log}",
        "-device",
        "isa-debugcon,iobase=0x402,chardev=dbg",
    ]
    try:
        with peers.qemu_vhost_user_blk(sock, extra_args=extra) as qemu:
            assert served.accepted.wait(30), qemu.peer.output()
            with qemu.qmp() as qmp:
                assert qmp.query_status() == "prelaunch"
                qmp.command("cont")
                assert qmp.query_status() == "running"
            deadline = time.monotonic() + 60
            while BOOT_MESSAGE not in debug_log.read_bytes():
                assert time.monotonic() < deadline, debug_log.read_text(errors="replace")[-2000:]
                assert qemu.peer.alive(), qemu.peer.output()
                time.sleep(0.05)
            # QEMU complained about nothing on the vhost-user connections
            assert "vhost" not in qemu.peer.output().lower(), qemu.peer.output()
    finally:
        device.stop.set()
        if device.worker is not None:
            device.worker.join(5)
        if isinstance(device, RichBootableBlk):
            device.close()
    assert device.errors == []
    names = device.names()
    # QEMU started the device the way the spec orders it: features, memory, then each
    # ring (size, base, addresses, kick), then enabled it
    acked = device.args("set_features")[0][0]
    assert acked & int(VirtioFeature.VERSION_1)
    assert acked & ~FEATURES == 0  # only bits we offered
    memory_request = "add_mem_region" if rich else "set_mem_table"
    start = [
        "set_features",
        memory_request,
        "set_vring_num",
        "set_vring_base",
        "set_vring_addr",
        "set_vring_kick",
        "set_vring_enable",
    ]
    assert [names.index(n) for n in start] == sorted(names.index(n) for n in start), names
    assert device.args("set_vring_enable")[0] == (0, True)
    # our memory is QEMU's guest RAM (256M), mapped from the memfd it sent
    assert device.memory is not None
    assert device.memory.total_size == 256 << 20
    # SeaBIOS's first request was a read of the boot sector
    assert device.requests[0] == (VIRTIO_BLK_T_IN, 0)
    if rich:
        assert "set_mem_table" not in names
        assert "get_max_mem_slots" in names
        assert "set_backend_channel" in names
        # the inflight area: QEMU asks for one queue of the ring size, then hands the
        # area back before the rings start
        assert device.args("get_inflight_fd")[0] == (1, 128)
        assert device.args("set_inflight_fd")[0][2:] == (1, 128)
        assert names.index("set_inflight_fd") < names.index("set_vring_kick")
        # the driver's status went through FEATURES_OK to DRIVER_OK
        statuses = [a[0] for a in device.args("set_status")]
        assert any(st & 0x8 for st in statuses), statuses
        assert any(st & 0x4 for st in statuses), statuses


class ChannelBlk(BlkDevice):
    """BlkDevice that asks for the back-end request channel and keeps it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.protocol = PROTOCOL | int(
            ProtocolFeature.BACKEND_REQ
            | ProtocolFeature.BACKEND_SEND_FD
            | ProtocolFeature.SHARED_OBJECT
        )
        self.channel: BackendChannel | None = None
        self.channel_ready = threading.Event()

    def set_backend_channel(self, channel: BackendChannel) -> None:
        self._rec("set_backend_channel")
        self.channel = channel
        self.channel_ready.set()


def test_backend_channel_to_qemu(served_factory: Any) -> None:
    """Our BackendChannel talks to QEMU's back-end request handler: with REPLY_ACK every
    message is acked by QEMU; SHARED_OBJECT_LOOKUP is always answered (non-zero for an
    object nobody exported); requests QEMU was not offered fail locally."""
    device = ChannelBlk()
    sock, served = served_factory(device)
    with peers.qemu_vhost_user_blk(sock) as qemu:
        assert served.accepted.wait(30), qemu.peer.output()
        assert qemu.query_status() == "prelaunch"
        assert device.channel_ready.wait(10)
        acked = device.args("set_protocol_features")[0][0]
        assert acked & ProtocolFeature.BACKEND_REQ
        assert acked & ProtocolFeature.SHARED_OBJECT
        assert acked & ProtocolFeature.REPLY_ACK
        channel = device.channel
        assert channel is not None
        channel.set_timeout(10)
        # acked by QEMU (each call waits for the ack and raises on a NACK)
        channel.config_change()
        uuid_bytes = bytes(range(16))
        channel.shared_object_add(uuid_bytes)
        channel.shared_object_remove(uuid_bytes)
        # nobody exported this one: a non-zero answer, no fd, and the channel lives on.
        # (Looking up the object we added also fails with QEMU 10.0: its virtio-dmabuf
        # table keys on the handler's stack copy of the UUID, so that is not asserted.)
        assert channel.shared_object_lookup(bytes(16)) != 0
        channel.config_change()
        # HOST_NOTIFIER was not offered, so it was not negotiated: refused locally
        with pytest.raises(InactiveFeatureError):
            channel.vring_host_notifier(0, 0, 0)
        assert qemu.peer.alive(), qemu.peer.output()
        assert qemu.query_status() == "prelaunch"
        assert "vhost" not in qemu.peer.output().lower(), qemu.peer.output()
