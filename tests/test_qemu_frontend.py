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
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import peers
from vhost import EventFd
from vhost.codes import ProtocolFeature
from vhost.user import BackendHandler, BackendListener, BackendSession, GuestMemory
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
        return PROTOCOL

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
    assert served.accepted.is_set()
    assert "get_queue_num" in device.names()
    # it gave up before reading the config space
    assert "get_config" not in device.names()
