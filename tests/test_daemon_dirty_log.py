"""Dirty page logging in our own daemon (issue 10): ``python -m vhost serve blk``, native
and ``--python``, logs every write it makes into guest memory once a front-end enables
logging, so QEMU can live-migrate a guest on it.

The same proof as ``test_dirty_log.py`` runs against qemu-storage-daemon: our front-end
hands ``serve blk`` a log (``Frontend.start_dirty_log``), moves virtio-blk requests through
a ring, and the log must hold exactly the pages the daemon wrote: the data buffer of a READ,
the status byte and the ring's used side (split: the used ring; packed: the descriptor ring
the used descriptors go to and the device event area); never the request header it only
read. Then a log replaced while I/O runs, hostile logs (ADVERSARIAL C9) refused without a
leak in the daemon, and GET_VRING_BASE with requests in flight.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon_util import ServeProc, make_image, wait_for
from test_dirty_log import AVAIL, DATA, DESC, HEADER, STATUS, T_IN, T_OUT, USED, BlkRig
from vhost import DirtyLog, DirtyRange, EventFd, GuestMemory, ProtocolFeature
from vhost.errors import VhostError
from vhost.user import Frontend, regions_of
from vhost.virtio import VirtioFeature, Virtqueue, wait_used

pytestmark = pytest.mark.timeout(90)

PAGE = 4096
LOG_ALL = int(VirtioFeature.LOG_ALL)
MEMORY = 1 << 20
IMAGE_SIZE = 1 << 20
MODES = pytest.mark.parametrize("mode", ["native", "python"])
RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


def pages(*starts: int, count: int = 1) -> set[int]:
    return {s + i * PAGE for s in starts for i in range(count)}


def dirty_pages(ranges: list[DirtyRange]) -> set[int]:
    return {p for r in ranges for p in range(r.start, r.end, PAGE)}


@pytest.fixture(params=["native", "python"])
def serve(request: pytest.FixtureRequest, tmp_sock_dir: Path) -> Iterator[ServeProc]:
    image = tmp_sock_dir / "disk.img"
    make_image(image, IMAGE_SIZE, seed=7)
    args = ["blk", "--image", str(image)]
    if request.param == "python":
        args.append("--python")
    proc = ServeProc(args, tmp_sock_dir / "blk.sock", tmp_sock_dir / "serve.log")
    try:
        yield proc
        assert proc.alive(), proc.stderr()
    finally:
        proc.close()


class Rig(BlkRig):
    """test_dirty_log's virtio-blk rig on ``serve blk``, with either ring format."""

    def __init__(self, sock: Path, *, packed: bool) -> None:
        self.fe = Frontend.connect(sock)
        self.features, self.proto = self.fe.negotiate(packed=packed)
        self.ram = GuestMemory.allocate([(0, MEMORY)])
        self.fe.set_mem_table(regions_of(self.ram))
        self.vq = Virtqueue(
            self.ram,
            256,
            DESC,
            AVAIL,
            USED,
            packed=packed,
            event_idx=bool(self.features & VirtioFeature.RING_EVENT_IDX),
        )
        self.kick, self.call = EventFd(), EventFd()
        self.packed = packed

    def used_side(self) -> set[int]:
        """Pages the device writes to complete a request: the used ring (split) or the
        descriptor ring and the device event area (packed)."""
        return pages(DESC, USED) if self.packed else pages(USED)


@RINGS
@pytest.mark.parametrize("order", ["ring-then-log", "log-then-ring"])
def test_serve_blk_logs_exactly_the_pages_it_wrote(
    serve: ServeProc, packed: bool, order: str
) -> None:
    """READ: the data pages, the status page and the used side are dirty, nothing else
    (not the header page, which the daemon only reads, nor the avail ring). WRITE: the
    status page and the used side only. After stop_dirty_log nothing is logged. Both
    orders: logging turned on for a running ring (SET_VRING_ADDR re-sent with
    VHOST_VRING_F_LOG) and a ring started while logging is on."""
    rig = Rig(serve.socket_path, packed=packed)
    try:
        assert rig.fe.get_features() & LOG_ALL, "serve blk offers VHOST_F_LOG_ALL"
        assert rig.proto & ProtocolFeature.LOG_SHMFD
        log = DirtyLog.allocate(rig.ram)
        steps: list[Callable[[], None]] = [rig.start_ring, lambda: rig.fe.start_dirty_log(log)]
        for step in steps if order == "ring-then-log" else steps[::-1]:
            step()
        assert rig.fe.acked_features & LOG_ALL
        log.take()  # whatever starting the ring wrote

        assert rig.request(T_IN, 8) == 0
        assert dirty_pages(log.take()) == rig.used_side() | pages(STATUS) | pages(DATA, count=2)
        assert log.dirty_pages() == 0

        assert rig.request(T_OUT, 16) == 0
        assert dirty_pages(log.take()) == rig.used_side() | pages(STATUS)

        rig.fe.stop_dirty_log()
        assert not rig.fe.acked_features & LOG_ALL
        # The worker re-enables notifications after a completion the driver has already
        # seen (a logged write to the used side): drain what came before the stop.
        assert dirty_pages(log.take()) <= rig.used_side()
        assert rig.request(T_IN, 8) == 0
        assert log.take() == []
        log.close()
    finally:
        rig.close()


def test_a_new_log_replaces_the_old_one_while_io_runs(serve: ServeProc) -> None:
    """A thread reads into 64 different data pages in turn while the main thread hands the
    daemon a new log again and again (what QEMU does when guest memory grows). Every page
    read lands in some log, and a log that was replaced receives nothing more once
    start_dirty_log returned (the daemon's reply comes after its workers let go of it)."""
    rig = Rig(serve.socket_path, packed=False)
    rig.start_ring()
    stop = threading.Event()
    read: set[int] = set()
    count = [0]
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            i = 0
            while not stop.is_set():
                page = DATA + (i % 64) * PAGE
                assert rig.request(T_IN, i % 64, page, PAGE) == 0
                read.add(page)
                i += 1
                count[0] = i
        except BaseException as exc:
            failure.append(exc)

    logs = [DirtyLog.allocate(rig.ram)]
    rig.fe.start_dirty_log(logs[0])
    seen: set[int] = set()
    retired: list[DirtyLog] = []
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(40):
            new = DirtyLog.allocate(rig.ram)
            rig.fe.start_dirty_log(new)
            old = logs.pop()
            seen |= dirty_pages(old.take())
            retired.append(old)
            logs.append(new)
            # Some I/O between two hand-overs.
            before = count[0]
            wait_for(lambda: count[0] > before + 3 or bool(failure), timeout=5.0)  # noqa: B023
    finally:
        stop.set()
        thread.join(30)
    assert not failure, failure
    rig.fe.stop_dirty_log()
    seen |= dirty_pages(logs[0].take())
    assert count[0] >= 40 and len(read) == 64
    assert read <= seen, sorted(read - seen)
    assert all(old.dirty_pages() == 0 for old in retired), "a replaced log was written"
    for log in retired + logs:
        log.close()
    rig.close()


def daemon_maps(proc: ServeProc) -> int:
    with open(f"/proc/{proc.pid}/maps") as f:
        return sum(1 for _ in f)


def hostile_fd(kind: str, size: int) -> int:
    if kind == "eventfd":
        return os.eventfd(0)
    fd = os.memfd_create("hostile-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    ("kind", "mmap_size", "mmap_offset", "file_size"),
    [
        pytest.param("memfd", 2 * PAGE, (1 << 64) - PAGE, PAGE, id="offset-plus-size-overflows"),
        pytest.param("memfd", 1, 0, PAGE, id="too-small-for-the-highest-guest-address"),
        pytest.param("memfd", PAGE, 0, 16, id="file-shorter-than-the-log"),
        pytest.param("eventfd", PAGE, 0, 0, id="fd-that-cannot-be-mapped"),
        pytest.param("memfd", PAGE, 1 << 63, PAGE, id="offset-beyond-the-file"),
    ],
)
def test_hostile_logs_are_refused_without_leaks_c9(
    serve: ServeProc, kind: str, mmap_size: int, mmap_offset: int, file_size: int
) -> None:
    """ADVERSARIAL C9: SET_LOG_BASE with a size/offset that overflows, a log too small for
    the guest memory (1 byte covers 32 KiB, the memory is 1 MiB), a file shorter than the
    log, an fd mmap refuses: each refused (the session closes, as for any request whose
    reply cannot be given), the daemon keeps serving, and it holds no more fds or mappings
    than before. Sent with the native front-end call, which checks nothing."""
    # A session that sets up memory and ends, so the baseline includes warmed-up state.
    rig = Rig(serve.socket_path, packed=False)
    rig.close()
    fds, maps = serve.idle_fds(), daemon_maps(serve)
    for _ in range(5):
        rig = Rig(serve.socket_path, packed=False)
        fd = hostile_fd(kind, file_size)
        try:
            with pytest.raises(VhostError):
                rig.fe._native.set_log_base(0, (mmap_size, mmap_offset, fd))
        finally:
            os.close(fd)
            rig.close()
    assert serve.settle_fds(fds) <= fds, serve.fd_targets()
    assert wait_for(lambda: daemon_maps(serve) <= maps), (daemon_maps(serve), maps)
    # Still serving, and a good log still works.
    rig = Rig(serve.socket_path, packed=False)
    try:
        rig.start_ring()
        log = DirtyLog.allocate(rig.ram)
        rig.fe.start_dirty_log(log)
        assert rig.request(T_IN, 0) == 0
        assert pages(DATA) <= dirty_pages(log.take())
        log.close()
    finally:
        rig.close()


def test_unsealed_log_refused_when_sealed_memory_is_required(tmp_sock_dir: Path) -> None:
    """With --require-sealed-memory the log, shared memory the daemon maps like guest
    memory, must be sealed against shrinking too: an unsealed memfd is refused."""
    image = tmp_sock_dir / "disk.img"
    make_image(image, IMAGE_SIZE)
    sock = tmp_sock_dir / "blk.sock"
    proc = ServeProc(
        ["blk", "--image", str(image), "--require-sealed-memory"], sock, tmp_sock_dir / "s.log"
    )
    try:
        rig = Rig(sock, packed=False)  # GuestMemory.allocate seals its memfds
        fd = hostile_fd("memfd", PAGE)
        try:
            with pytest.raises(VhostError):
                rig.fe._native.set_log_base(0, (PAGE, 0, fd))
        finally:
            os.close(fd)
            rig.close()
        rig = Rig(sock, packed=False)
        try:
            log = DirtyLog.allocate(rig.ram)  # sealed: accepted
            rig.fe.start_dirty_log(log)
            log.close()
        finally:
            rig.close()
        assert proc.alive(), proc.stderr()
    finally:
        proc.close()


@RINGS
def test_get_vring_base_returns_after_the_requests_in_flight_completed(
    serve: ServeProc, packed: bool
) -> None:
    """A migrating front-end stops the ring with GET_VRING_BASE: every request made
    available before it is in the used ring by the time the base comes back, and the base
    is where a destination resumes (split: the next avail index = requests submitted;
    packed: avail and used positions equal). The dirty log holds their data pages."""
    rig = Rig(serve.socket_path, packed=packed)
    try:
        rig.start_ring()
        log = DirtyLog.allocate(rig.ram)
        rig.fe.start_dirty_log(log)
        n = 32
        heads = []
        for i in range(n):
            rig.ram.write(HEADER + 16 * i, struct.pack("<IIQ", T_IN, 0, i))
            heads.append(
                rig.vq.add([(HEADER + 16 * i, 16)], [(DATA + i * PAGE, PAGE), (STATUS + i, 1)])
            )
        rig.vq.publish()
        rig.kick.write(1)
        # Stop the ring once the daemon is at work on the batch.
        done = list(wait_used(rig.vq, rig.call, timeout=10.0))
        base = rig.fe.get_vring_base(0)
        done += rig.vq.poll_used()
        assert len({h for h, _ in done}) == len(done)
        if packed:
            # Used where avail is: nothing left in flight for the destination to redo.
            assert base & 0xFFFF == base >> 16, hex(base)
        else:
            # The next avail index is what was completed: the destination resumes there.
            assert base == len(done), (base, len(done))
        assert rig.ram.read(USED + 2, 2) == struct.pack("<H", len(done)) or packed
        for h, _ in done:
            i = heads.index(h)
            assert rig.ram.read(STATUS + i, 1) == b"\x00"
        n = len(done)
        heads = heads[:n]
        assert pages(DATA, count=n) <= dirty_pages(log.take())
        log.close()
    finally:
        rig.close()


def test_bench_blk_dirty_log_runs_with_logging_on(serve: ServeProc) -> None:
    """``bench blk --dirty-log``: the run goes through with logging on (the daemon marks,
    the bench reads and clears the log as a migrating VMM does); a read load dirties
    pages, and the JSON result says so. Without the option there is no log."""
    base = [sys.executable, "-m", "vhost", "bench", "blk", "--socket", str(serve.socket_path)]
    base += ["--rw", "randread", "--iodepth", "8", "--ios", "2000", "--json"]
    for extra, logged in (([], False), (["--dirty-log"], True)):
        out = subprocess.run(
            [*base, *extra], capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["ios"] == 2000 and result["io_errors"] == 0
        if logged:
            assert result["dirty_log"]["syncs"] >= 1
            assert result["dirty_log"]["dirty_pages"] > 0
        else:
            assert result["dirty_log"] is None


def test_set_log_fd_is_accepted_and_closed(serve: ServeProc) -> None:
    """SET_LOG_FD (the eventfd a back-end without a shared log would signal) is accepted:
    the session goes on serving, and the daemon keeps none of the 20 fds sent."""
    rig = Rig(serve.socket_path, packed=False)
    try:
        rig.start_ring()
        assert rig.request(T_IN, 0) == 0
        before = serve.idle_fds()
        for _ in range(20):
            with EventFd() as efd:
                rig.fe.set_log_fd(efd)
        assert rig.request(T_IN, 0) == 0
        assert serve.idle_fds() == before, serve.fd_targets()
    finally:
        rig.close()
