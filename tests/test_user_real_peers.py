"""Our :class:`Frontend` against real back-ends: qemu-storage-daemon (libvhost-user)
for real block I/O, postcopy and memory slots; virtiofsd (rust-vmm) for device state;
vhost-user-gpu for GPU_SET_SOCKET.

The test plays the guest driver: it shares memfd guest RAM (``SET_MEM_TABLE``), lays a
split virtqueue out in it, hands qemu-storage-daemon the ring addresses and the kick
and call eventfds, then places virtio-blk requests on the ring and kicks. The daemon
reads and writes the image file through our shared memory; the test checks the data,
the status bytes, the used ring, and the image file on disk.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import peers
from vhost import EventFd, GuestMemory
from vhost.codes import MigrationPhase, ProtocolFeature, TransferDirection
from vhost.types import DirtyLogRegion, VringConfig
from vhost.user import Frontend, regions_of
from vhost.virtio import VirtioFeature

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 1 << 20
PATTERN = b"pyvhost!"
QUEUE_SIZE = 8
DESC, AVAIL, USED = 0x0000, 0x1000, 0x2000
HEADER, DATA, STATUS = 0x3000, 0x4000, 0x8000
F_NEXT, F_WRITE = 1, 2
T_IN, T_OUT, T_FLUSH = 0, 1, 4
TIMEOUT = 10.0


class Driver:
    """A minimal virtio-blk driver on one split ring, one request at a time."""

    def __init__(self, fe: Frontend, ram: GuestMemory) -> None:
        self.fe, self.ram = fe, ram
        self.kick, self.call = EventFd(), EventFd()
        self.avail_idx = 0
        uaddr = regions_of(ram)[0].userspace_addr
        fe.set_vring_num(0, QUEUE_SIZE)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(
            0,
            VringConfig(
                queue_max_size=QUEUE_SIZE,
                queue_size=QUEUE_SIZE,
                flags=0,
                desc_table_addr=uaddr + DESC,
                avail_ring_addr=uaddr + AVAIL,
                used_ring_addr=uaddr + USED,
            ),
        )
        fe.set_vring_call(0, self.call)
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_enable(0, True)

    def close(self) -> None:
        self.kick.close()
        self.call.close()

    def used_idx(self) -> int:
        idx: int = struct.unpack("<H", self.ram.read(USED + 2, 2))[0]
        return idx

    def request(self, kind: int, sector: int, data: bytes | int = 0) -> tuple[int, bytes]:
        """One request; ``data`` is what to write (OUT) or how many bytes to read (IN)."""
        self.ram.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
        self.ram.write(STATUS, b"\xff")
        descs = [(HEADER, 16, 0)]
        if isinstance(data, bytes):
            self.ram.write(DATA, data)
            descs.append((DATA, len(data), 0))
        elif data:
            self.ram.write(DATA, bytes(data))
            descs.append((DATA, data, F_WRITE))
        descs.append((STATUS, 1, F_WRITE))
        table = b"".join(
            struct.pack("<QIHH", addr, n, flags | (F_NEXT if i < len(descs) - 1 else 0), i + 1)
            for i, (addr, n, flags) in enumerate(descs)
        )
        self.ram.write(DESC, table)
        before = self.used_idx()
        slot = self.avail_idx % QUEUE_SIZE
        self.ram.write(AVAIL + 4 + 2 * slot, struct.pack("<H", 0))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        self.kick.write(1)
        deadline = time.monotonic() + TIMEOUT
        while self.used_idx() == before:
            assert time.monotonic() < deadline, "the back-end never used the request"
            self.call.wait(0.05)
        # the used element names our chain and counts the bytes written into it
        head, written = struct.unpack("<II", self.ram.read(USED + 4 + 8 * (before % QUEUE_SIZE), 8))
        assert head == 0
        status = self.ram.read(STATUS, 1)[0]
        n = data if isinstance(data, int) else 0
        if status == 0:
            assert written == n + 1
        return status, self.ram.read(DATA, n)


@pytest.fixture
def driver(tmp_sock_dir: Path) -> Iterator[tuple[Driver, Path]]:
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE, pattern=PATTERN)
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as qsd, Frontend.connect(sock) as fe:
        features, proto = fe.negotiate(
            features=int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES),
            protocol_features=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG),
        )
        assert features & VirtioFeature.VERSION_1
        assert proto & ProtocolFeature.REPLY_ACK  # every set-up step below is acked
        ram = GuestMemory.allocate([(0, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        drv = Driver(fe, ram)
        try:
            yield drv, image
        finally:
            drv.close()
        assert qsd.alive(), qsd.output()


def test_read_through_shared_memory(driver: tuple[Driver, Path]) -> None:
    drv, _image = driver
    for block in (0, 1, 37):
        status, data = drv.request(T_IN, block * 8, 512)
        assert status == 0
        assert data[:16] == PATTERN + struct.pack("<Q", block)
    assert drv.call.wait(0)  # the daemon signalled completion on our call eventfd


def test_write_reaches_the_image_file(driver: tuple[Driver, Path]) -> None:
    drv, image = driver
    payload = bytes(range(256)) * 4
    status, _ = drv.request(T_OUT, 16, payload)
    assert status == 0
    status, _ = drv.request(T_FLUSH, 0)
    assert status == 0
    status, data = drv.request(T_IN, 16, 1024)
    assert (status, data) == (0, payload)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.pread(fd, 1024, 16 * 512) == payload
    finally:
        os.close(fd)


def test_read_past_the_end_fails(driver: tuple[Driver, Path]) -> None:
    drv, _image = driver
    status, _ = drv.request(T_IN, IMAGE_SIZE // 512, 512)
    assert status != 0
    # the ring goes on after an error
    status, data = drv.request(T_IN, 0, 512)
    assert status == 0 and data.startswith(PATTERN)


def test_get_vring_base_reports_progress(driver: tuple[Driver, Path]) -> None:
    drv, _image = driver
    for _ in range(3):
        assert drv.request(T_IN, 0, 512)[0] == 0
    # GET_VRING_BASE stops the ring and returns the next available index it will read
    assert drv.fe.get_vring_base(0) == 3


def test_set_log_base_accepts_libvhost_user_reply(tmp_sock_dir: Path) -> None:
    """SET_LOG_BASE's reply is a bare "done": libvhost-user (qemu-storage-daemon) echoes
    mmap_size in its u64 and QEMU ignores the value, so the front-end must not read it
    as a status."""
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as qsd, Frontend.connect(sock) as fe:
        _, proto = fe.negotiate(
            protocol_features=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.LOG_SHMFD)
        )
        assert proto & ProtocolFeature.LOG_SHMFD
        log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(log_fd, 8192)
            fe.set_log_base(0, DirtyLogRegion(mmap_size=8192, mmap_offset=0, fd=log_fd))
        finally:
            os.close(log_fd)
        assert not fe.broken
        assert fe.get_features() & VirtioFeature.VERSION_1
        assert qsd.alive(), qsd.output()


def test_postcopy_set_mem_table(tmp_sock_dir: Path) -> None:
    """Postcopy with libvhost-user (qemu-storage-daemon): POSTCOPY_ADVISE hands us its
    userfaultfd; after POSTCOPY_LISTEN, SET_MEM_TABLE takes QEMU's postcopy form (the
    daemon answers with its mapping addresses and waits for our ack); POSTCOPY_END."""
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as qsd, Frontend.connect(sock) as fe:
        _, proto = fe.negotiate(
            protocol_features=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.PAGEFAULT)
        )
        assert proto & ProtocolFeature.PAGEFAULT
        ufd = fe.postcopy_advise()
        try:
            assert os.readlink(f"/proc/self/fd/{ufd.fileno()}") == "anon_inode:[userfaultfd]"
        finally:
            ufd.close()
        fe.postcopy_listen()
        ram = GuestMemory.allocate([(0, 1 << 20), (1 << 20, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        assert not fe.broken
        fe.postcopy_end()
        # after postcopy, the connection carries ordinary requests again (and
        # SET_MEM_TABLE is back to its acked form)
        fe.set_mem_table(regions_of(ram))
        assert fe.get_features() & VirtioFeature.VERSION_1
        assert qsd.alive(), qsd.output()


def test_io_through_hot_added_region(tmp_sock_dir: Path) -> None:
    """CONFIGURE_MEM_SLOTS: guest RAM shared with ADD_MEM_REG instead of SET_MEM_TABLE
    carries I/O just the same; REM_MEM_REG and a re-add are accepted."""
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE, pattern=PATTERN)
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as qsd, Frontend.connect(sock) as fe:
        _, proto = fe.negotiate(
            features=int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES),
            protocol_features=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS),
        )
        assert proto & ProtocolFeature.CONFIGURE_MEM_SLOTS
        assert fe.get_max_mem_slots() >= 8
        spare = GuestMemory.allocate([(1 << 24, 1 << 20)])
        fe.add_mem_region(regions_of(spare)[0])
        fe.remove_mem_region(regions_of(spare)[0])
        ram = GuestMemory.allocate([(0, 1 << 20)])
        (region,) = regions_of(ram)
        fe.add_mem_region(region)
        drv = Driver(fe, ram)
        try:
            status, data = drv.request(T_IN, 8 * 5, 512)
            assert status == 0
            assert data[:16] == PATTERN + struct.pack("<Q", 5)
        finally:
            drv.close()
        assert qsd.alive(), qsd.output()


def test_device_state_transfer_with_virtiofsd(tmp_sock_dir: Path) -> None:
    """DEVICE_STATE with virtiofsd: SET_DEVICE_STATE_FD hands it our pipe (it answers
    NOFD: it writes into ours), the state arrives on the pipe, CHECK_DEVICE_STATE says 0."""
    shared = tmp_sock_dir / "share"
    shared.mkdir()
    sock = tmp_sock_dir / "fs.sock"
    with peers.virtiofsd(shared, sock), Frontend.connect(sock) as fe:
        _, proto = fe.negotiate(
            protocol_features=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.DEVICE_STATE)
        )
        assert proto & ProtocolFeature.DEVICE_STATE
        r, w = os.pipe()
        try:
            theirs = fe.set_device_state_fd(TransferDirection.SAVE, MigrationPhase.STOPPED, w)
            assert theirs is None  # it uses our pipe end
            os.close(w)
            w = -1
            state = b""
            while chunk := os.read(r, 65536):
                state += chunk
            assert state  # virtiofsd serialises something, then closes its end
            fe.check_device_state()
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert fe.get_features() & VirtioFeature.VERSION_1


def test_gpu_set_socket_with_vhost_user_gpu(tmp_sock_dir: Path) -> None:
    """GPU_SET_SOCKET with QEMU's vhost-user-gpu: the socket we pass arrives, and the
    daemon starts its own protocol on it (VHOST_USER_GPU_GET_PROTOCOL_FEATURES, code 1)."""
    binary = peers.find_binary("vhost-user-gpu", [Path("/usr/lib/qemu/vhost-user-gpu")])
    sock = tmp_sock_dir / "gpu.sock"
    argv = [str(binary), f"--socket-path={sock}"]
    with peers.spawn_peer("vhost-user-gpu", argv, sock) as gpu, Frontend.connect(sock) as fe:
        features, _ = fe.negotiate()
        assert features & VirtioFeature.VERSION_1
        ours, theirs = socket.socketpair()
        with ours:
            fe.gpu_set_socket(theirs.fileno())
            theirs.close()  # the daemon holds its own copy now
            ours.settimeout(TIMEOUT)
            request, flags, size = struct.unpack("<III", ours.recv(12))
            assert (request, flags, size) == (1, 0, 0)
        assert gpu.alive(), gpu.output()
