"""Memory limits like rust-vmm's (issue 10): ``SET_MEM_TABLE`` with up to 32 regions and
``GET_MAX_MEM_SLOTS`` 509, with hot add and remove up to that count, against our own
``python -m vhost serve blk`` in a subprocess (its fds and mappings counted through
/proc/PID) and our own :class:`vhost.user.Frontend`.

Each region is a small sealed memfd. A virtio-blk ring is placed in the last region added
(or region 31 of a full memory table) and carries a write whose bytes are checked in the
image file and read back through the ring: the daemon really translates through every one
of those regions, not only through the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon_util import SECTOR, T_IN, BlkGuest, ServeProc, make_image, wait_for
from vhost import EventFd, GuestMemory
from vhost.codes import MAX_MEM_TABLE_REGIONS
from vhost.codes import ProtocolFeature as PF
from vhost.errors import InvalidParamError, RequestRefusedError
from vhost.user import Frontend, regions_of
from vhost.virtio import Virtqueue, place_rings, setup_queue

MAX_SLOTS = 509
REGION = 64 * 1024  # rings, request headers and one 4 KiB data buffer per slot
STRIDE = 1 << 20  # guest-physical gap between regions, so none are adjacent
IMAGE_SIZE = 1 << 20
MEMFD = "memfd:pyvhost-guest-ram"
PROTO = int(PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.MQ | PF.CONFIG)


class RegionGuest(BlkGuest):
    """One virtio-blk queue whose rings, headers and buffers all lie in the region that
    starts at ``base`` of a many-region ``memory`` (the rest of :class:`BlkGuest` is
    reused: request layout, reaping, reads and writes)."""

    def __init__(self, memory: GuestMemory, base: int) -> None:
        self.size = 16
        self.packed = False
        self.event_idx = False
        self.memory = memory
        self.base = base
        desc, avail, used = place_rings(base, self.size)
        self.vqs = [Virtqueue(memory, self.size, desc, avail, used)]
        self.kicks = [EventFd()]
        self.calls = [EventFd()]
        self.pending = [{}]
        self.free = [list(range(4))]
        self.fe = None

    def _meta(self, q: int, slot: int) -> int:
        return self.base + 8192 + slot * 32

    def _data(self, q: int, slot: int) -> int:
        return self.base + 16384 + slot * 4096

    def start(self, fe: Frontend) -> None:
        setup_queue(fe, 0, self.memory, self.vqs[0], self.kicks[0], self.calls[0])
        self.fe = fe


def memfd_fds(proc: ServeProc) -> int:
    return sum(MEMFD in t for t in proc.fd_targets())


def memfd_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(MEMFD in line for line in f)


@contextmanager
def serve_blk(sock_dir: Path) -> Iterator[tuple[ServeProc, Path]]:
    image = sock_dir / "disk.img"
    make_image(image, IMAGE_SIZE)
    proc = ServeProc(["blk", "--image", str(image)], sock_dir / "blk.sock", sock_dir / "log")
    try:
        yield proc, image
        assert proc.alive(), proc.stderr()
    finally:
        proc.close()


def negotiated(proc: ServeProc) -> Frontend:
    fe = Frontend.connect(proc.socket_path)
    fe.negotiate(protocol_features=PROTO, event_idx=False)
    return fe


def write_and_read_back(guest: RegionGuest, image: Path, sector: int, fill: int) -> None:
    """One sector through the ring: it lands in the image file and reads back."""
    data = bytes([fill]) * SECTOR
    assert guest.write(0, sector * SECTOR, data) == 0
    assert wait_for(lambda: image.read_bytes()[sector * SECTOR : (sector + 1) * SECTOR] == data)
    r = guest.request(0, T_IN, sector, in_len=SECTOR)
    assert (r.status, r.data) == (0, data)


def test_509_slots_added_used_and_removed(tmp_sock_dir: Path) -> None:
    """GET_MAX_MEM_SLOTS says 509; 509 regions are added one by one (the daemon holds one
    fd and one mapping per region), a ring in the last one serves I/O, the 510th is refused
    with nothing kept, and removing them all returns the daemon to its baseline."""
    layout = [(i * STRIDE, REGION) for i in range(MAX_SLOTS + 1)]
    memory = GuestMemory.allocate(layout)
    with serve_blk(tmp_sock_dir) as (proc, image):
        idle0 = proc.idle_fds()
        with negotiated(proc) as fe:
            _add_use_remove(proc, fe, memory, layout, image)
        assert proc.idle_fds() == idle0


def _add_use_remove(
    proc: ServeProc, fe: Frontend, memory: GuestMemory, layout: list[tuple[int, int]], image: Path
) -> None:
    regions = regions_of(memory)
    assert fe.get_max_mem_slots() == MAX_SLOTS
    fds0, memfd_fds0, maps0 = proc.fd_count(), memfd_fds(proc), memfd_maps(proc.pid)
    assert (memfd_fds0, maps0) == (0, 0)

    t0 = time.perf_counter()
    for r in regions[:MAX_SLOTS]:
        fe.add_mem_region(r)
    elapsed = time.perf_counter() - t0
    print(f"\n{MAX_SLOTS} ADD_MEM_REG in {elapsed:.3f} s")
    assert memfd_fds(proc) == MAX_SLOTS
    assert memfd_maps(proc.pid) == MAX_SLOTS
    assert proc.settle_fds(fds0 + MAX_SLOTS) == fds0 + MAX_SLOTS, proc.fd_targets()

    # The 510th: refused (NACK, the session goes on), no fd or mapping kept.
    with pytest.raises(RequestRefusedError, match="ADD_MEM_REG"):
        fe.add_mem_region(regions[MAX_SLOTS])
    assert proc.settle_fds(fds0 + MAX_SLOTS) == fds0 + MAX_SLOTS, proc.fd_targets()
    assert memfd_maps(proc.pid) == MAX_SLOTS

    # A ring placed in the last region added.
    guest = RegionGuest(memory, layout[MAX_SLOTS - 1][0])
    try:
        guest.start(fe)
        write_and_read_back(guest, image, sector=7, fill=0xA5)
        fe.get_vring_base(0)  # stop the ring before its memory goes
    finally:
        guest.close()

    t0 = time.perf_counter()
    for r in reversed(regions[:MAX_SLOTS]):
        fe.remove_mem_region(r)
    elapsed = time.perf_counter() - t0
    print(f"{MAX_SLOTS} REM_MEM_REG in {elapsed:.3f} s")
    assert wait_for(lambda: memfd_maps(proc.pid) == 0), memfd_maps(proc.pid)
    assert memfd_fds(proc) == 0
    # Only the stopped ring's kick and call remain.
    assert proc.settle_fds(fds0 + 2) == fds0 + 2, proc.fd_targets()
    # Room again: one more region is accepted after the removals.
    fe.add_mem_region(regions[MAX_SLOTS])
    assert memfd_fds(proc) == 1


def test_mem_table_of_32_regions_serves_a_ring_in_region_31(tmp_sock_dir: Path) -> None:
    """SET_MEM_TABLE with 32 regions (rust-vmm's limit, past QEMU's 8): the daemon maps
    them all and a ring in the last one works."""
    n = MAX_MEM_TABLE_REGIONS
    assert n == 32
    layout = [(i * STRIDE, REGION) for i in range(n)]
    memory = GuestMemory.allocate(layout)
    with serve_blk(tmp_sock_dir) as (proc, image), negotiated(proc) as fe:
        fds0 = proc.fd_count()
        fe.set_mem_table(regions_of(memory))
        assert memfd_fds(proc) == n
        assert memfd_maps(proc.pid) == n
        guest = RegionGuest(memory, layout[n - 1][0])
        try:
            guest.start(fe)
            write_and_read_back(guest, image, sector=3, fill=0x3C)
            fe.get_vring_base(0)
        finally:
            guest.close()
        # Replaced by a one-region table: the 32 mappings go.
        small = GuestMemory.allocate([(0, REGION)])
        fe.set_mem_table(regions_of(small))
        assert wait_for(lambda: memfd_maps(proc.pid) == 1)
        assert proc.fd_count() == fds0 + 1 + 2  # the new region, the stopped ring's eventfds


@pytest.mark.parametrize("n", [9, 16, 31])
def test_mem_tables_past_the_baseline_are_accepted(tmp_sock_dir: Path, n: int) -> None:
    """Every count from QEMU's 8 to 32 is served (9 was refused before)."""
    memory = GuestMemory.allocate([(i * STRIDE, REGION) for i in range(n)])
    with serve_blk(tmp_sock_dir) as (proc, _image), negotiated(proc) as fe:
        fe.set_mem_table(regions_of(memory))
        assert memfd_maps(proc.pid) == n
        assert fe.get_max_mem_slots() == MAX_SLOTS  # the session is still answering


def test_33_regions_are_refused_before_sending(tmp_sock_dir: Path) -> None:
    """Our front-end refuses a 33-region table itself, naming the limit; the connection
    is untouched (the back-end's own refusal is ADVERSARIAL C1 in
    test_adversarial_backend.py)."""
    memory = GuestMemory.allocate([(i * STRIDE, REGION) for i in range(33)])
    with serve_blk(tmp_sock_dir) as (proc, _image), negotiated(proc) as fe:
        with pytest.raises(InvalidParamError, match=r"33 regions, expected 1..=32"):
            fe.set_mem_table(regions_of(memory))
        assert memfd_maps(proc.pid) == 0
        assert fe.get_max_mem_slots() == MAX_SLOTS

