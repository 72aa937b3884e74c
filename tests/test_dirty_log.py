"""Dirty page logging from the front-end side (issue 10): :class:`vhost.DirtyLog` and
:meth:`vhost.user.Frontend.start_dirty_log`.

The main proof runs against the real qemu-storage-daemon (libvhost-user logs through
``LOG_SHMFD``): our front-end hands it a log, moves virtio-blk requests through a split
ring, and the log must hold exactly the pages the daemon wrote: the data buffer of a READ,
the status byte and the used ring; never the request header, which it only reads. The
adopt path (what a back-end does with ``SET_LOG_BASE``) is fed hostile sizes, offsets and
fds (ADVERSARIAL C9), each refused with a typed error and no fd or mapping left behind.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import peers
from vhost import (
    DirtyLog,
    DirtyRange,
    EventFd,
    FileDescriptor,
    GuestMemory,
    InactiveFeatureError,
    InvalidMemoryError,
    InvalidParamError,
    KernelError,
    NotSupportedError,
    ProtocolFeature,
)
from vhost.errors import ClosedError, InvalidQueueError
from vhost.types import VringAddrs, VringConfig, dirty_log_size
from vhost.user import BackendHandler, BackendListener, Frontend, regions_of, serve_in_thread
from vhost.virtio import VirtioFeature, Virtqueue, setup_queue, wait_used

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
LOG_ALL = int(VirtioFeature.LOG_ALL)
VERSION_1 = int(VirtioFeature.VERSION_1)
PROTOCOL_FEATURES = int(VirtioFeature.PROTOCOL_FEATURES)
LOG_SHMFD = int(ProtocolFeature.LOG_SHMFD)

# Guest layout of the virtio-blk tests: every part on its own page, so a dirty page names
# exactly one part.
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
HEADER, STATUS, DATA = 0x20000, 0x21000, 0x30000
DATA_LEN = 2 * PAGE
T_IN, T_OUT = 0, 1  # VIRTIO_BLK_T_IN (device writes the data), VIRTIO_BLK_T_OUT


def mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


# --- against qemu-storage-daemon ---------------------------------------------------------


def connect(sock: Path) -> Frontend:
    """Connects to qemu-storage-daemon. Its socket file appears at bind(), a moment before
    listen(), and the harness waits only for the file: retry a refused connection briefly."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return Frontend.connect(sock)
        except KernelError as exc:
            if exc.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class BlkRig:
    """Our front-end with one split ring on qemu-storage-daemon's vhost-user-blk export."""

    def __init__(self, sock: Path, *, protocol_features: int | None = None) -> None:
        self.fe = connect(sock)
        self.features, self.proto = self.fe.negotiate(protocol_features=protocol_features)
        self.ram = GuestMemory.allocate([(0, 1 << 20)])
        self.fe.set_mem_table(regions_of(self.ram))
        self.vq = Virtqueue(
            self.ram,
            256,
            DESC,
            AVAIL,
            USED,
            event_idx=bool(self.features & VirtioFeature.EVENT_IDX),
        )
        self.kick, self.call = EventFd(), EventFd()

    def start_ring(self) -> None:
        setup_queue(self.fe, 0, self.ram, self.vq, self.kick, self.call)

    def request(self, kind: int, sector: int, data: int = DATA, length: int = DATA_LEN) -> int:
        """One request: header at HEADER, ``length`` bytes at ``data``, status byte at
        STATUS."""
        self.ram.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
        self.ram.write(STATUS, b"\xff")
        if kind == T_OUT:
            head = self.vq.add([(HEADER, 16), (data, length)], [(STATUS, 1)])
        else:
            head = self.vq.add([(HEADER, 16)], [(data, length), (STATUS, 1)])
        self.vq.publish()
        if self.vq.kick_needed():
            self.kick.write(1)
        assert [h for h, _ in wait_used(self.vq, self.call, timeout=10.0)] == [head]
        return self.ram.read(STATUS, 1)[0]

    def close(self) -> None:
        self.fe.close()
        self.kick.close()
        self.call.close()


@pytest.fixture
def qsd(tmp_sock_dir: Path) -> Iterator[Path]:
    image = peers.make_image(tmp_sock_dir / "disk.img", 1 << 20, pattern=b"dirty-log")
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as peer:
        yield sock
        assert peer.alive(), peer.output()


@pytest.mark.parametrize("order", ["ring-then-log", "log-then-ring"])
def test_qsd_logs_exactly_the_pages_it_wrote(qsd: Path, order: str) -> None:
    """READ: the data pages, the status page and the used ring page are dirty, and nothing
    else (not the header page the daemon only read, not the descriptor table or the avail
    ring). WRITE: only the status page and the used ring page. After stop_dirty_log the
    daemon logs nothing. Both orders: logging started on a running ring (SET_VRING_ADDR
    re-sent with VHOST_VRING_F_LOG) and a ring set up while logging is on."""
    rig = BlkRig(qsd)
    try:
        assert rig.proto & ProtocolFeature.LOG_SHMFD
        log = DirtyLog.allocate(rig.ram)
        if order == "ring-then-log":
            rig.start_ring()
            rig.fe.start_dirty_log(log)
        else:
            rig.fe.start_dirty_log(log)
            rig.start_ring()
        assert rig.fe.acked_features & LOG_ALL
        assert rig.fe.dirty_log is log
        log.take()  # whatever set-up wrote

        assert rig.request(T_IN, 8) == 0
        assert rig.ram.read(DATA, 9) == b"dirty-log"
        assert log.take() == [
            DirtyRange(USED, USED + PAGE),
            DirtyRange(STATUS, STATUS + PAGE),
            DirtyRange(DATA, DATA + DATA_LEN),
        ]
        assert log.dirty_pages() == 0

        assert rig.request(T_OUT, 16) == 0
        assert log.take() == [DirtyRange(USED, USED + PAGE), DirtyRange(STATUS, STATUS + PAGE)]

        rig.fe.stop_dirty_log()
        assert not rig.fe.acked_features & LOG_ALL
        assert rig.request(T_IN, 8) == 0
        assert log.take() == []
        log.close()
    finally:
        rig.close()


def test_start_dirty_log_needs_log_shmfd(qsd: Path) -> None:
    """Without LOG_SHMFD the back-end has no way to map a log: refused before anything is
    sent, and the connection goes on."""
    rig = BlkRig(qsd, protocol_features=int(Frontend.DEFAULT_PROTOCOL_FEATURES) & ~LOG_SHMFD)
    try:
        with DirtyLog.allocate(rig.ram) as log:
            with pytest.raises(InactiveFeatureError, match="LOG_SHMFD") as exc:
                rig.fe.start_dirty_log(log)
            assert exc.value.request == "SET_LOG_BASE"
            assert rig.fe.dirty_log is None
            assert not rig.fe.acked_features & LOG_ALL
        rig.start_ring()
        assert rig.request(T_IN, 0) == 0
    finally:
        rig.close()


def test_negotiate_acks_log_all_only_when_asked(qsd: Path) -> None:
    with connect(qsd) as fe:
        features, _ = fe.negotiate()
        assert fe.get_features() & LOG_ALL
        assert not features & LOG_ALL
    with connect(qsd) as fe:
        features, _ = fe.negotiate(log_all=True)
        assert features & LOG_ALL
        assert fe.acked_features & LOG_ALL
    with connect(qsd) as fe:
        features, _ = fe.negotiate(features=VERSION_1, log_all=True)
        assert features & (LOG_ALL | VERSION_1) == LOG_ALL | VERSION_1


# --- against a back-end of ours (Python handler) ------------------------------------------


class LoggingDevice(BackendHandler):
    """A back-end that adopts the log it is sent (what a Python VMM test rig or device
    does with SET_LOG_BASE) and records the control plane it sees."""

    def __init__(self, *, offer_log_all: bool) -> None:
        self.offer_log_all = offer_log_all
        self.memory: GuestMemory | None = None
        self.log: DirtyLog | None = None
        self.log_bases: list[tuple[int, int]] = []
        self.features: list[int] = []
        self.addrs: list[tuple[int, int, int]] = []

    def get_features(self) -> int:
        return VERSION_1 | PROTOCOL_FEATURES | (LOG_ALL if self.offer_log_all else 0)

    def get_protocol_features(self) -> int:
        return LOG_SHMFD | int(ProtocolFeature.REPLY_ACK)

    def set_features(self, features: int) -> None:
        self.features.append(features)

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: FileDescriptor) -> None:
        assert self.memory is not None
        self.log_bases.append((mmap_size, mmap_offset))
        with fd:
            self.log = DirtyLog.adopt(fd, mmap_size, mmap_offset, self.memory)

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self.addrs.append((index, int(addrs.flags), addrs.log_addr))

    def get_vring_base(self, index: int) -> int:
        return 0


@pytest.fixture
def own_backend(
    tmp_sock_dir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Frontend, LoggingDevice, GuestMemory]]:
    device = LoggingDevice(offer_log_all=request.param)
    with BackendListener(tmp_sock_dir / "dev.sock") as listener:
        fe = Frontend.connect(tmp_sock_dir / "dev.sock")
        session = listener.accept(timeout=5)
        with serve_in_thread(session, device), fe:
            fe.negotiate()
            ram = GuestMemory.allocate([(0, 1 << 20), (1 << 30, 1 << 20)])
            fe.set_mem_table(regions_of(ram))
            yield fe, device, ram
    if device.log is not None:
        device.log.close()


@pytest.mark.parametrize("own_backend", [True], indirect=True)
def test_our_backend_adopts_the_log_and_its_marks_reach_the_frontend(
    own_backend: tuple[Frontend, LoggingDevice, GuestMemory],
) -> None:
    """SET_LOG_BASE carries the fd and size (the reply is awaited), SET_FEATURES gains
    LOG_ALL, the running queue's SET_VRING_ADDR comes again with the LOG flag and the used
    ring's guest address; what the back-end marks in its mapping is what the front-end
    takes. Stopping re-sends the address without the flag."""
    fe, device, ram = own_backend
    kick, call = EventFd(), EventFd()
    vq = Virtqueue(
        ram, 64, DESC, AVAIL, USED, event_idx=bool(fe.acked_features & VirtioFeature.EVENT_IDX)
    )
    setup_queue(fe, 0, ram, vq, kick, call)
    assert device.addrs == [(0, 0, USED)]
    with DirtyLog.allocate(ram) as log:
        assert log.covers >= (1 << 30) + (1 << 20)
        fe.start_dirty_log(log)
        assert device.log_bases == [(log.size, 0)]
        assert device.features[-1] == fe.acked_features
        assert device.features[-1] & LOG_ALL
        assert device.addrs[-1] == (0, 1, USED)
        assert device.log is not None
        device.log.mark(0x5123, 1)
        device.log.mark((1 << 30) + 0xFFF, 2)
        assert log.take() == [
            DirtyRange(0x5000, 0x6000),
            DirtyRange((1 << 30), (1 << 30) + 2 * PAGE),
        ]
        fe.stop_dirty_log()
        assert not device.features[-1] & LOG_ALL
        assert device.addrs[-1] == (0, 0, USED)
        # A queue stopped with GET_VRING_BASE is not touched when logging starts again.
        fe.get_vring_base(0)
        sent = len(device.addrs)
        fe.start_dirty_log(log)
        assert len(device.addrs) == sent
        # A new log while logging: only SET_LOG_BASE (QEMU's resize).
        with DirtyLog.allocate(ram) as bigger:
            fe.start_dirty_log(bigger)
            assert fe.dirty_log is bigger
            assert len(device.log_bases) == 3
    kick.close()
    call.close()


@pytest.mark.parametrize("own_backend", [True], indirect=True)
def test_frontend_refuses_memory_its_log_does_not_cover(
    own_backend: tuple[Frontend, LoggingDevice, GuestMemory],
) -> None:
    """A page past the end of the log could not be logged, so it would silently miss the
    migration: a log smaller than the memory table, or memory growing past the log while
    logging, is refused before anything is sent."""
    fe, device, ram = own_backend
    small_ram = GuestMemory.allocate([(0, 1 << 20)])
    with DirtyLog.allocate(small_ram) as small, DirtyLog.allocate(ram) as log:
        with pytest.raises(InvalidMemoryError, match=r"SET_LOG_BASE.*end at 0x40100000"):
            fe.start_dirty_log(small)
        assert device.log_bases == []
        fe.start_dirty_log(log)
        bigger = GuestMemory.allocate([(0, 1 << 20), (2 << 30, 1 << 20)])
        with pytest.raises(InvalidMemoryError, match="SET_MEM_TABLE") as exc:
            fe.set_mem_table(regions_of(bigger))
        assert exc.value.address == (2 << 30) + (1 << 20)
        assert device.memory is not None  # the back-end still has the old table
        assert device.memory.contains(1 << 30, 1) and not device.memory.contains(2 << 30, 1)
        # Shrinking is fine; then a log for the small memory is enough.
        fe.set_mem_table(regions_of(small_ram))
        fe.start_dirty_log(small)
        assert fe.dirty_log is small


@pytest.mark.parametrize("own_backend", [False], indirect=True)
def test_start_dirty_log_needs_log_all_offered(
    own_backend: tuple[Frontend, LoggingDevice, GuestMemory],
) -> None:
    fe, device, ram = own_backend
    with DirtyLog.allocate(ram) as log:
        with pytest.raises(NotSupportedError, match="VHOST_F_LOG_ALL"):
            fe.start_dirty_log(log)
        with pytest.raises(NotSupportedError, match="VHOST_F_LOG_ALL"):
            fe.negotiate(log_all=True)
    assert device.log_bases == []
    assert fe.dirty_log is None


@pytest.mark.parametrize("own_backend", [True], indirect=True)
def test_start_dirty_log_refuses_a_queue_without_log_addr(
    own_backend: tuple[Frontend, LoggingDevice, GuestMemory],
) -> None:
    """A ring set up by hand without a log_addr cannot be logged: the front-end says which
    queue before sending anything."""
    fe, device, ram = own_backend
    fe.set_vring_num(0, 64)
    fe.set_vring_addr(
        0,
        VringConfig(
            queue_max_size=64,
            queue_size=64,
            flags=0,
            desc_table_addr=ram.regions()[0].userspace_addr + DESC,
            used_ring_addr=ram.regions()[0].userspace_addr + USED,
            avail_ring_addr=ram.regions()[0].userspace_addr + AVAIL,
        ),
    )
    with DirtyLog.allocate(ram) as log, pytest.raises(InvalidQueueError, match="queue 0"):
        fe.start_dirty_log(log)
    assert device.log_bases == []


# --- the DirtyLog object -----------------------------------------------------------------


def test_dirty_log_object() -> None:
    ram = GuestMemory.allocate([(0, 1 << 20), (0x4000_0000, 1 << 20)])
    end = 0x4000_0000 + (1 << 20)
    log = DirtyLog.allocate(ram)
    # One bit per page, rounded up to whole 64-bit words (QEMU's sizing); the spec's byte
    # minimum (dirty_log_size) fits in it.
    assert log.size == -(-dirty_log_size(end) // 8) * 8
    assert log.covers >= end
    region = log.region
    assert (region.mmap_size, region.mmap_offset) == (log.size, 0)
    assert os.fstat(region.fd).st_size == log.size
    assert log.address != 0

    log.mark(0x1FFF, 2)  # straddles pages 1 and 2
    log.mark(0x4000_0000, 0)  # nothing
    log.mark(end - 1, 1)
    assert log.dirty_pages() == 3
    assert log.peek() == [DirtyRange(0x1000, 0x3000), DirtyRange(end - PAGE, end)]
    assert log.peek()[0].pages == 2
    with pytest.raises(InvalidMemoryError, match="past the end of the dirty log") as exc:
        log.mark(log.covers, 1)
    assert exc.value.address == log.covers
    assert log.take() == [DirtyRange(0x1000, 0x3000), DirtyRange(end - PAGE, end)]
    assert log.take() == []

    # The back-end's view of the same memfd: what it marks, the front-end takes.
    with DirtyLog.adopt(region.fd, region.mmap_size, 0, ram, require_sealed=True) as back:
        with pytest.raises(InvalidParamError, match="adopted"):
            _ = back.region
        back.mark(0x8000, 1)
        assert log.take() == [DirtyRange(0x8000, 0x9000)]
    log.close()
    assert log.closed
    with pytest.raises(ClosedError):
        log.take()
    with pytest.raises(InvalidMemoryError, match="guest memory that ends at 0"):
        DirtyLog.allocate(GuestMemory.empty())


# --- ADVERSARIAL C9: the adopt path --------------------------------------------------------

GIB = 1 << 30


def _memfd(size: int, *, seal: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0)
    fd = os.memfd_create("c9", flags)
    os.ftruncate(fd, size)
    if seal:
        import fcntl  # noqa: PLC0415

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def _socket() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _read_only_file() -> int:
    return os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)


# (id, make the fd, mmap_size, mmap_offset, guest memory end, require_sealed, error, match)
C9_ROWS: list[tuple[str, Callable[[], int], int, int, int, bool, type[Exception], str]] = [
    (
        "offset+size overflows",
        lambda: _memfd(PAGE),
        16,
        (1 << 64) - 8,
        GIB,
        False,
        InvalidMemoryError,
        "overflows",
    ),
    (
        "size u64 max",
        lambda: _memfd(PAGE),
        (1 << 64) - 1,
        1,
        GIB,
        False,
        InvalidMemoryError,
        "overflows",
    ),
    (
        "log too small for the memory",
        lambda: _memfd(PAGE),
        PAGE,
        0,
        GIB,
        False,
        InvalidMemoryError,
        r"covers guest addresses below 0x8000000.*0x8000 bytes needed",
    ),
    (
        "one byte short",
        lambda: _memfd(PAGE),
        1,
        0,
        9 * PAGE,
        False,
        InvalidMemoryError,
        "bytes needed",
    ),
    ("size 0", lambda: _memfd(PAGE), 0, 0, PAGE, False, InvalidMemoryError, "0 bytes"),
    (
        "file smaller than offset+size",
        lambda: _memfd(PAGE),
        PAGE,
        PAGE,
        PAGE,
        False,
        InvalidMemoryError,
        "too small for mmap_offset",
    ),
    ("eventfd", _eventfd, PAGE, 0, PAGE, False, InvalidMemoryError, "cannot map"),
    ("socket", _socket, PAGE, 0, PAGE, False, InvalidMemoryError, "cannot map"),
    ("read-only file", _read_only_file, 1, 0, PAGE, False, InvalidMemoryError, "cannot map"),
    (
        "unsealed when sealing is required",
        lambda: _memfd(PAGE, seal=False),
        PAGE,
        0,
        PAGE,
        True,
        InvalidMemoryError,
        "F_SEAL_SHRINK",
    ),
    ("size not a u64", lambda: _memfd(PAGE), 1 << 64, 0, PAGE, False, InvalidParamError, "u64"),
    ("negative offset", lambda: _memfd(PAGE), PAGE, -1, PAGE, False, InvalidParamError, "u64"),
]


@pytest.mark.parametrize(
    ("make_fd", "size", "offset", "guest_end", "sealed", "error", "match"),
    [row[1:] for row in C9_ROWS],
    ids=[row[0] for row in C9_ROWS],
)
def test_adopt_refuses_hostile_logs_without_leaks_c9(  # noqa: PLR0917 - one per column
    make_fd: Callable[[], int],
    size: int,
    offset: int,
    guest_end: int,
    sealed: bool,
    error: type[Exception],
    match: str,
    fd_count: Callable[[], int],
) -> None:
    memory = GuestMemory.allocate([(guest_end - PAGE, PAGE)])
    fd = make_fd()
    try:
        gc.collect()  # objects of earlier tests closing their fds would blur the count
        fds, maps = fd_count(), mapping_count()
        for _ in range(20):  # a leak per refusal would show as growth
            with pytest.raises(error, match=match):
                DirtyLog.adopt(fd, size, offset, memory, require_sealed=sealed)
        assert fd_count() <= fds
        assert mapping_count() <= maps
        os.fstat(fd)  # the caller's fd is still open: adopt maps a duplicate
    finally:
        os.close(fd)


def test_adopt_accepts_the_spec_minimum_and_checks_it_against_the_memory_end() -> None:
    """The byte-exact minimum (one bit per page, rounded up to a byte) is enough; the
    highest region decides, not the total size."""
    memory = GuestMemory.allocate([(0, PAGE), (64 * PAGE, 9 * PAGE)])
    need = dirty_log_size(73 * PAGE)
    assert need == 10
    fd = _memfd(PAGE)
    try:
        with DirtyLog.adopt(fd, need, 0, memory) as log:
            log.mark(72 * PAGE, PAGE)
            assert log.take() == [DirtyRange(72 * PAGE, 73 * PAGE)]
        with pytest.raises(InvalidMemoryError, match="bytes needed") as exc:
            DirtyLog.adopt(fd, need - 1, 0, memory)
        assert exc.value.address == 73 * PAGE
        # An unaligned offset works (bytes before the first aligned word are bytes).
        with DirtyLog.adopt(fd, need, 3, memory) as log:
            log.mark(0, 73 * PAGE)
            assert log.dirty_pages() == 73
    finally:
        os.close(fd)


def test_concurrent_marks_and_takes_lose_nothing() -> None:
    """A back-end thread marks every page once while the front-end takes in a loop: the
    union of what was taken is every page, exactly once."""
    ram = GuestMemory.allocate([(0, 4 << 20)])
    pages = (4 << 20) // PAGE
    with DirtyLog.allocate(ram) as front:
        region = front.region
        with DirtyLog.adopt(region.fd, region.mmap_size, 0, ram) as back:
            done = threading.Event()

            def writer() -> None:
                for i in range(pages):
                    back.mark(((i * 769) % pages) * PAGE, 1)
                done.set()

            t = threading.Thread(target=writer)
            t.start()
            seen: list[int] = []
            while True:
                finished = done.is_set()
                for r in front.take():
                    seen.extend(range(r.start // PAGE, r.end // PAGE))
                if finished:
                    break
            t.join(10)
            assert sorted(seen) == list(range(pages))
