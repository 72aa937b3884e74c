"""Inflight I/O tracking (INFLIGHT_SHMFD) across a daemon crash.

A daemon is killed with two requests popped and not completed. The front-end keeps the
inflight area and reconnects to a new daemon with a base that claims both were consumed
(a front-end cannot know better after a crash). With the area, the new daemon resubmits
both; without it, it would start after them and the driver would wait forever — which the
control case shows. Both ring formats: a split ring's area marks heads in the descriptor
table, a packed ring's keeps a copy of the ring descriptors the driver has since lost.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peers import make_image
from vhost import EventFd, GuestMemory
from vhost.codes import ProtocolFeature
from vhost.user import Frontend, regions_of
from vhost.virtio import Virtqueue, place_rings, setup_queue

CHECKOUT = Path(__file__).resolve().parent.parent
STUCK_SECTOR = 4096
OTHER_SECTOR = 8
QUEUE = 64
RAM = 1 << 20
RING_AT = 0x1000
BUF_AT = 0x20000
VIRTIO_BLK_T_OUT = 1
RING_PACKED = 1 << 34
RING_EVENT_IDX = 1 << 29


@contextmanager
def daemon(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT
    )
    try:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def add_write(vq: Virtqueue, mem: GuestMemory, slot: int, sector: int, fill: bytes) -> int:
    base = BUF_AT + slot * 0x2000
    mem.write(base, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector))
    mem.write(base + 0x100, fill * 512)
    mem.write(base + 0x1000, b"\xff")
    return vq.add([(base, 16), (base + 0x100, 512)], [(base + 0x1000, 1)])


def connect(sock: Path, inflight: bool, packed: bool) -> Frontend:
    fe = Frontend.connect(sock, timeout=5.0)
    mask = Frontend.DEFAULT_PROTOCOL_FEATURES
    if inflight:
        mask |= ProtocolFeature.INFLIGHT_SHMFD
    # The driver here uses no EVENT_IDX, and the ring format under test.
    fe.negotiate(protocol_features=mask, packed=packed, event_idx=False)
    assert bool(fe.acked_features & RING_PACKED) == packed
    return fe


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("inflight", [True, False], ids=["area", "no-area"])
def test_requests_in_flight_at_a_crash_are_resubmitted(
    inflight: bool, packed: bool, tmp_path: Path, tmp_sock_dir: Path
) -> None:
    image = make_image(tmp_path / "disk.img", 8 << 20)
    sock = tmp_sock_dir / "inflight.sock"
    mem = GuestMemory.allocate([(0, RAM)])
    desc, avail, used = place_rings(RING_AT, QUEUE, packed=packed)
    vq = Virtqueue(mem, QUEUE, desc, avail, used, packed=packed)
    kick, call = EventFd(), EventFd()

    stuck = [sys.executable, "tests/stuck_blk.py", str(sock), str(image)]
    with daemon(stuck) as first:
        fe = connect(sock, inflight, packed)
        info = fe.get_inflight_fd(1, QUEUE) if inflight else None
        if info is not None:
            fe.set_inflight_fd(info)
        fe.set_mem_table(regions_of(mem))
        setup_queue(fe, 0, mem, vq, kick, call)
        heads = [
            add_write(vq, mem, 0, STUCK_SECTOR, b"S"),
            add_write(vq, mem, 1, OTHER_SECTOR, b"O"),
        ]
        vq.publish()
        kick.write(1)
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "STUCK"
        first.send_signal(signal.SIGKILL)
        first.wait()
        fe.close()

    assert vq.poll_used() == []
    serve = [sys.executable, "-m", "vhost", "serve", "blk", "--image", str(image)]
    with daemon([*serve, "--socket", str(sock)]):
        fe = connect(sock, inflight, packed)
        if info is not None:
            fe.set_inflight_fd(info)
        fe.set_mem_table(regions_of(mem))
        call2 = EventFd()
        # The stale base: both requests look consumed (packed: the avail half only, slot 6
        # with wrap counter 1, which says the used position is there too).
        base = (3 * len(heads)) | 1 << 15 if packed else len(heads)
        ring = (QUEUE, desc, avail, used)
        setup_queue(fe, 0, mem, ring, kick, call2, base=base, packed=packed)
        kick.write(1)
        completed = call2.wait(3.0 if inflight else 1.5)
        done = vq.poll_used()
        fe.close()

    data = image.read_bytes()
    if inflight:
        assert completed
        assert sorted(h for h, _ in done) == sorted(heads)
        assert mem.read(BUF_AT + 0x1000, 1) == b"\x00"
        assert mem.read(BUF_AT + 0x2000 + 0x1000, 1) == b"\x00"
        assert data[STUCK_SECTOR * 512 : STUCK_SECTOR * 512 + 512] == b"S" * 512
        assert data[OTHER_SECTOR * 512 : OTHER_SECTOR * 512 + 512] == b"O" * 512
    else:
        # Without the area the requests are lost: the point of the feature.
        assert not completed
        assert done == []
        assert data[STUCK_SECTOR * 512 : STUCK_SECTOR * 512 + 512] == bytes(512)
