"""Queue polling (``poll_us``): after a request, a worker keeps watching its ring with the
driver's kicks switched off, so the next request needs no kick and no wake-up."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from vhost import EventFd, GuestMemory
from vhost.daemon import BlkDevice, Daemon
from vhost.user import Frontend, regions_of
from vhost.virtio import Virtqueue, place_rings, setup_queue

QUEUE = 64
RING_PACKED = 1 << 34
VIRTIO_BLK_T_IN = 0


def read_request(vq: Virtqueue, mem: GuestMemory, slot: int) -> int:
    base = 0x20000 + slot * 0x2000
    mem.write(base, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, slot))
    return vq.add([(base, 16)], [(base + 0x100, 512), (base + 0x1000, 1)])


@pytest.mark.parametrize("poll_us", [0, 2_000_000])
def test_a_polling_worker_needs_no_kick(poll_us: int, tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "poll.sock"
    mem = GuestMemory.allocate([(0, 1 << 20)])
    desc, avail, used = place_rings(0x1000, QUEUE)
    vq = Virtqueue(mem, QUEUE, desc, avail, used, event_idx=True)
    kick, call = EventFd(), EventFd()
    with (
        Daemon(BlkDevice.ram(1 << 20), sock, poll_us=poll_us) as daemon,
        Frontend.connect(sock) as fe,
    ):
        fe.negotiate(features=~RING_PACKED)
        fe.set_mem_table(regions_of(mem))
        setup_queue(fe, 0, mem, vq, kick, call)
        vq.set_used_notification(True)
        read_request(vq, mem, 0)
        vq.publish()
        assert vq.kick_needed()
        kick.write(1)
        assert call.wait(5.0)
        call.read()
        assert len(vq.poll_used()) == 1
        if not poll_us:
            # A worker that does not poll turns kicks back on (avail_event = the next
            # avail index) after signalling its batch; under load the next request could
            # otherwise race that, and be picked up by the worker's re-check unkicked.
            avail_event = used + 4 + 8 * QUEUE
            deadline = time.monotonic() + 5
            while struct.unpack("<H", mem.read(avail_event, 2))[0] != 1:
                assert time.monotonic() < deadline, "the worker never turned kicks back on"
                time.sleep(0.001)
        # The next request: a polling worker has kicks off and picks it up by itself.
        read_request(vq, mem, 1)
        vq.publish()
        needed = vq.kick_needed()
        if poll_us:
            assert not needed
            assert call.wait(5.0), "the polling worker did not see the request"
        else:
            assert needed
            assert not call.wait(0.2), "completed without a kick"
            kick.write(1)
            assert call.wait(5.0)
        assert len(vq.poll_used()) == 1
        assert mem.read(0x20000 + 0x2000 + 0x1000, 1) == b"\x00"
        # The worker counts a batch just after publishing it: allow it that moment.
        deadline = time.monotonic() + 5
        while daemon.completed != [2] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert daemon.completed == [2]
