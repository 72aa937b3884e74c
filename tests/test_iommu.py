"""``python -m vhost serve blk --iommu`` behind our own front-end acting as the vIOMMU.

The guest's virtio-blk requests and rings live at I/O virtual addresses (the driver's
addresses), while the memory table the back-end gets places the same memory at other
guest-physical addresses: the daemon can only reach anything through the IOTLB. Our
front-end answers the daemon's ``BACKEND_IOTLB_MSG`` misses on the back-end channel with
``IOTLB_MSG`` updates, page by page, from its own page table, and counts them. Data is
checked byte-exact in the image; a reply into a page the IOMMU maps read-only fails that
request (IOERR or an empty completion) and leaves the page unchanged; the session and the
queue go on. A miss the IOMMU side never answers fails that one request after the bound
(IOERR when only a data buffer is missing, an empty completion when its descriptors are)
and the queue goes on. Bad IOTLB updates are refused with the session intact.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon_util import (
    DATA_PER_QUEUE,
    S_IOERR,
    S_OK,
    T_IN,
    BlkGuest,
    MiB,
    ServeProc,
    make_image,
)
from vhost import DirtyLog, GuestMemory
from vhost.codes import ProtocolFeature as PF
from vhost.errors import VhostError
from vhost.types import IotlbAccess, IotlbMessage, IotlbType, VringConfig
from vhost.user import Frontend, FrontendRequestHandler, regions_of
from vhost.virtio import VirtioFeature

pytestmark = pytest.mark.timeout(120)

PAGE = 0x1000
IMAGE_SIZE = 4 * MiB
#: Where the back-end's memory table says the guest's memory is: not where the driver's
#: (I/O virtual) addresses point.
GPA_SHIFT = 0x40_0000_0000


class Iommu(FrontendRequestHandler):
    """The IOMMU side: answers each miss with an update of the page it falls in, from
    ``perms`` (I/O virtual page -> permission; absent: readable and writable), counting."""

    def __init__(self, fe: Frontend, uaddr0: int, limit: int) -> None:
        self.fe = fe
        self.uaddr0 = uaddr0
        self.limit = limit
        self.perms: dict[int, IotlbAccess] = {}
        self.refused: set[int] = set()
        #: I/O virtual page -> the guest memory offset it maps to (absent: the same).
        self.remap: dict[int, int] = {}
        self.misses = 0

    def iotlb_msg(self, message: IotlbMessage) -> int | None:
        assert message.type == IotlbType.MISS
        self.misses += 1
        page = message.iova & ~(PAGE - 1)
        if page >= self.limit or page in self.refused:
            return 0  # outside the guest's mappings: never answered
        perm = self.perms.get(page, IotlbAccess.RW)
        self.fe.send_iotlb_msg(
            IotlbMessage(
                iova=page, size=PAGE, uaddr=self.uaddr0 + self.remap.get(page, page), perm=perm,
                type=IotlbType.UPDATE,
            )
        )
        return 0


@contextmanager
def iommu_guest(
    tmp: Path, *extra: str
) -> Iterator[tuple[BlkGuest, Frontend, Iommu, Path, ServeProc]]:
    image = tmp / "disk.img"
    make_image(image, IMAGE_SIZE, 7)
    sock = tmp / "blk.sock"
    proc = ServeProc(["blk", "--image", str(image), "--iommu", *extra], sock, tmp / "serve.log")
    guest = BlkGuest(1)
    fe = Frontend.connect(sock)
    try:
        offered = fe.get_features()
        assert offered & VirtioFeature.ACCESS_PLATFORM
        # By hand: negotiate() acks only the transport bits our own rings implement.
        fe.set_owner()
        wanted = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.BACKEND_REQ | PF.LOG_SHMFD
        fe.set_protocol_features(fe.get_protocol_features() & wanted)
        fe.set_features(guest.features(offered) & ~VirtioFeature.LOG_ALL)
        assert fe.acked_features & VirtioFeature.ACCESS_PLATFORM
        channel = fe.set_backend_req_fd()
        table = regions_of(guest.memory)
        iommu = Iommu(fe, table[0].userspace_addr, table[0].memory_size)
        stop = threading.Event()

        def answer() -> None:
            while not stop.is_set():
                try:
                    channel.process_one(iommu)
                except VhostError:
                    return

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        fe.set_mem_table(
            [dataclasses.replace(r, guest_phys_addr=r.guest_phys_addr + GPA_SHIFT) for r in table]
        )
        vq = guest.vqs[0]
        fe.set_vring_num(0, vq.size)
        # I/O virtual addresses: what the driver wrote into its ring.
        fe.set_vring_addr(
            0,
            VringConfig(
                queue_max_size=vq.size,
                queue_size=vq.size,
                flags=0,
                desc_table_addr=vq.desc,
                used_ring_addr=vq.used,
                avail_ring_addr=vq.avail,
                # As QEMU behind a vIOMMU: the used ring's address as the driver gave it.
                log_addr=vq.used,
                packed=False,
            ),
        )
        fe.set_vring_base(0, 0)
        fe.set_vring_call(0, guest.calls[0])
        fe.set_vring_kick(0, guest.kicks[0])
        fe.set_vring_enable(0, True)
        guest.fe = fe
        yield guest, fe, iommu, image, proc
        assert proc.alive(), proc.stderr()
        stop.set()
    finally:
        fe.close()
        guest.close()
        proc.close()


def test_blk_io_through_iotlb_misses_answered_on_demand(tmp_sock_dir: Path) -> None:
    with iommu_guest(tmp_sock_dir) as (guest, _fe, iommu, image, _):
        data = bytes(range(256)) * 32  # 8 KiB
        assert guest.write(0, 3 * PAGE, data) == S_OK
        status, back = guest.read(0, 3 * PAGE, len(data))
        assert status == S_OK
        assert back == data
        with image.open("rb") as f:
            f.seek(3 * PAGE)
            assert f.read(len(data)) == data
        # The ring and every buffer page were asked for: the daemon had no other way in.
        assert iommu.misses >= 4


def test_a_reply_into_a_read_only_page_fails_the_request_only(tmp_sock_dir: Path) -> None:
    with iommu_guest(tmp_sock_dir) as (guest, _fe, iommu, image, _):
        # The queue's data area (where a read's data lands) is mapped read-only.
        area = guest.data_area(0)
        for page in range(area, area + DATA_PER_QUEUE, PAGE):
            iommu.perms[page] = IotlbAccess.RO
        marker = b"\x5a" * DATA_PER_QUEUE
        guest.memory.write(area, marker)
        status, _ = guest.read(0, 0, 512)
        assert status == S_IOERR
        assert guest.memory.read(area, DATA_PER_QUEUE) == marker, "a read-only page was written"
        # The queue goes on: a write (the device only reads the data area) passes.
        assert guest.write(0, PAGE, b"\x11" * 512) == S_OK
        with image.open("rb") as f:
            f.seek(PAGE)
            assert f.read(512) == b"\x11" * 512


#: Bytes of the data area each request slot of :class:`BlkGuest` owns.
SLOT_DATA = DATA_PER_QUEUE // 32


def next_slot_data(guest: BlkGuest) -> int:
    """Where the data of the next request on queue 0 goes (its slot is the last free one)."""
    return guest.data_area(0) + guest.free[0][-1] * SLOT_DATA


def test_a_miss_never_answered_fails_the_request_and_the_queue_goes_on(
    tmp_sock_dir: Path,
) -> None:
    args = ("--iommu-miss-timeout", "0.5", "--verbose")
    with iommu_guest(tmp_sock_dir, *args) as (guest, fe, iommu, image, proc):
        data = next_slot_data(guest)
        iommu.refused.update(range(data, data + SLOT_DATA, PAGE))
        t0 = time.monotonic()
        status, _ = guest.read(0, 0, 512)
        # Only its data buffer was missing: the device failed it, and said so.
        assert status == S_IOERR
        assert time.monotonic() - t0 >= 0.5, "failed before the bound"
        assert iommu.misses >= 1
        # The queue goes on, through the very pages that missed once they are mapped.
        iommu.refused.clear()
        assert next_slot_data(guest) == data
        payload = random.Random(5).randbytes(2 * PAGE)
        assert guest.write(0, 5 * PAGE, payload) == S_OK
        assert guest.read(0, 5 * PAGE, len(payload)) == (S_OK, payload)
        with image.open("rb") as f:
            f.seek(5 * PAGE)
            assert f.read(len(payload)) == payload
        assert fe.get_queue_num() == 1
        log = proc.stderr()
        assert "IOTLB miss for a device write at I/O virtual address" in log, log
        assert "request at head" in log and "stopped" not in log, log


def test_a_request_whose_descriptors_never_map_is_returned_empty(tmp_sock_dir: Path) -> None:
    with iommu_guest(tmp_sock_dir, "--iommu-miss-timeout", "0.5") as (guest, fe, iommu, image, _):
        assert fe.acked_features & VirtioFeature.INDIRECT_DESC
        # The head descriptor becomes an indirect one whose table is in pages the IOMMU
        # side never maps: the daemon cannot even find the request's buffers.
        table = guest.data_area(0)  # slot 0: the last one requests use
        iommu.refused.update(range(table, table + SLOT_DATA, PAGE))
        vq = guest.vqs[0]
        head = guest.add(0, T_IN, 0, in_len=512)
        guest.memory.write(vq.desc + 16 * head, struct.pack("<QIHH", table, 3 * 16, 4, 0))
        guest.kick(0, force=True)
        ((r, _),) = guest.reap(0, 1)
        assert (r.head, r.used_len) == (head, 0)
        assert r.status == 0xFF, "nothing of the request was touched"
        # The queue goes on.
        payload = random.Random(6).randbytes(PAGE)
        assert guest.write(0, 0, payload) == S_OK
        assert guest.read(0, 0, len(payload)) == (S_OK, payload)
        with image.open("rb") as f:
            assert f.read(len(payload)) == payload


def test_dirty_log_behind_the_iommu_marks_the_guest_physical_pages(tmp_sock_dir: Path) -> None:
    """With LOG_ALL and ACCESS_PLATFORM both acked (a migration of a guest with a vIOMMU),
    the daemon logs what it writes at guest-physical pages: the I/O virtual pages of a
    read's data are mapped by the IOMMU to other pages of guest memory, and those pages
    (at the memory table's guest-physical addresses) are dirty, not the I/O virtual ones
    nor the pages an identity mapping would give."""
    with iommu_guest(tmp_sock_dir) as (guest, fe, iommu, _image, _):
        data = next_slot_data(guest)
        elsewhere = guest.data_area(0) + 16 * SLOT_DATA  # slot 16's area: no request uses it
        shifted = GuestMemory.allocate([(GPA_SHIFT, guest.memory.total_size)])
        log = DirtyLog.allocate(shifted)
        fe.start_dirty_log(log)
        assert fe.acked_features & VirtioFeature.LOG_ALL
        payload = random.Random(7).randbytes(2 * PAGE)
        assert guest.write(0, 9 * PAGE, payload) == S_OK
        log.take()  # the write dirtied the status byte and the used ring only
        # The IOMMU now maps the next request's data pages (the same slot) elsewhere.
        for off in range(0, SLOT_DATA, PAGE):
            iommu.remap[data + off] = elsewhere + off
        fe.send_iotlb_msg(IotlbMessage(iova=data, size=SLOT_DATA, uaddr=0,
                                       perm=IotlbAccess(0), type=IotlbType.INVALIDATE))
        assert next_slot_data(guest) == data
        status, _ = guest.read(0, 9 * PAGE, len(payload))
        assert status == S_OK
        assert guest.memory.read(elsewhere, len(payload)) == payload, "not where the IOMMU said"
        dirty = {p for r in log.take() for p in range(r.start, r.end, PAGE)}
        assert {GPA_SHIFT + elsewhere, GPA_SHIFT + elsewhere + PAGE} <= dirty
        assert GPA_SHIFT + data not in dirty, "the page an identity mapping would give"
        assert all(p >= GPA_SHIFT for p in dirty), "an I/O virtual page was marked"
        ring_pages = {GPA_SHIFT + (guest.vqs[0].used & ~(PAGE - 1))}
        assert ring_pages <= dirty, "the used ring, logged at its guest-physical page"
        fe.stop_dirty_log()


def test_bad_iotlb_updates_are_refused_and_the_session_goes_on(tmp_sock_dir: Path) -> None:
    with iommu_guest(tmp_sock_dir) as (guest, fe, iommu, _image, _):
        outside = iommu.uaddr0 + iommu.limit
        for perm, uaddr in ((IotlbAccess(0), iommu.uaddr0), (IotlbAccess.RW, outside)):
            with pytest.raises(VhostError, match="IOTLB_MSG"):
                fe.send_iotlb_msg(
                    IotlbMessage(iova=0, size=PAGE, uaddr=uaddr, perm=perm, type=IotlbType.UPDATE)
                )
        assert fe.get_queue_num() == 1
        assert guest.write(0, 0, b"\x22" * 512) == S_OK


def test_serve_blk_refuses_a_zero_miss_bound(tmp_sock_dir: Path) -> None:
    make_image(tmp_sock_dir / "disk.img", MiB)
    out = subprocess.run(
        [sys.executable, "-m", "vhost", "serve", "blk", "--socket", "blk.sock", "--image",
         "disk.img", "--iommu", "--iommu-miss-timeout", "0"],
        cwd=tmp_sock_dir, capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode != 0
    assert "--iommu-miss-timeout must be more than 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_without_iommu_access_platform_is_not_offered(tmp_sock_dir: Path) -> None:
    make_image(tmp_sock_dir / "disk.img", MiB)
    sock = tmp_sock_dir / "blk.sock"
    proc = ServeProc(["blk", "--image", str(tmp_sock_dir / "disk.img")], sock,
                     tmp_sock_dir / "serve.log")
    try:
        with Frontend.connect(sock) as fe:
            assert not fe.get_features() & VirtioFeature.ACCESS_PLATFORM
    finally:
        proc.close()
