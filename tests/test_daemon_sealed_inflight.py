"""The sealed-memory policy covers the inflight area (ADVERSARIAL J8, issue 10).

A front-end hands ``serve blk --require-sealed-memory`` an inflight area in an unsealed
memfd (SET_INFLIGHT_FD), truncates the memfd to 0 bytes and starts a ring
(SET_VRING_KICK): the ring's start reads the area, which before the fix killed the daemon
with SIGBUS, since the seal check ran only for SET_MEM_TABLE and ADD_MEM_REG. Now every fd
the back-end maps goes through one path that applies the policy, so SET_INFLIGHT_FD is
refused, the daemon survives, serves the next front-end and keeps no fd or mapping of the
refused area.

Without the policy the daemon maps whatever it is given (file-backed guest RAM cannot be
sealed, so the policy is opt-in): the size check at SET_INFLIGHT_FD passes, the truncation
afterwards is the documented SIGBUS risk, and the second test shows it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from daemon_util import ServeProc, make_image, wait_for
from vhost import EventFd, GuestMemory
from vhost.codes import ProtocolFeature
from vhost.devices.blk import BlkDriver
from vhost.errors import RequestRefusedError, VhostError
from vhost.user import Frontend, InflightInfo, regions_of
from vhost.virtio import Virtqueue, place_rings, setup_queue

if TYPE_CHECKING:
    from vhost._core import FileDescriptor

QUEUE = 64
RAM = 1 << 20
AREA = 64 << 10  # more than one queue of 64 needs in either ring layout


def memfd_maps(pid: int) -> int:
    """Mappings of memfds in ``pid`` (guest memory, inflight areas): the leak counter."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("/memfd:" in line for line in f)


def hostile_inflight_session(sock: Path, area_fd: int) -> str:
    """SET_INFLIGHT_FD with ``area_fd`` (unsealed), then truncates it to 0 bytes and
    starts queue 0 (memory table, ring, SET_VRING_KICK), the sequence that SIGBUSes a
    back-end that mapped the area without the policy. A refusal anywhere ends the session
    as the daemon chose (NACK or close). Returns the refusal of SET_INFLIGHT_FD, if any
    (the NACK carries only a status; the reason is in the daemon's log)."""
    mem = GuestMemory.allocate([(0, RAM)])
    desc, avail, used = place_rings(0x1000, QUEUE)
    vq = Virtqueue(mem, QUEUE, desc, avail, used)
    kick, call = EventFd(), EventFd()
    try:
        with Frontend.connect(sock, timeout=5.0) as fe:
            fe.negotiate(
                protocol_features=Frontend.DEFAULT_PROTOCOL_FEATURES
                | ProtocolFeature.INFLIGHT_SHMFD,
                packed=False,
                event_idx=False,
            )
            # InflightInfo types its fd as the FileDescriptor GET_INFLIGHT_FD returns; the
            # native call takes any fd, and a hostile front-end brings its own.
            theirs = os.dup(area_fd)
            info = InflightInfo(AREA, 0, 1, QUEUE, cast("FileDescriptor", theirs))
            try:
                fe.set_inflight_fd(info)
                refused = ""
            except RequestRefusedError as e:
                refused = str(e)
            finally:
                os.close(theirs)
            os.ftruncate(area_fd, 0)
            try:
                fe.set_mem_table(regions_of(mem))
                setup_queue(fe, 0, mem, vq, kick, call)
                # A round trip after the kick, so the ring has started when it returns.
                fe.get_features()
            except VhostError:
                pass  # the daemon closed the session (it may, instead of a NACK)
    finally:
        kick.close()
        call.close()
    return refused


@pytest.fixture
def unsealed_area() -> Iterator[int]:
    fd = os.memfd_create("unsealed-inflight", os.MFD_CLOEXEC)
    os.ftruncate(fd, AREA)
    yield fd
    os.close(fd)


def test_policy_refuses_an_unsealed_inflight_area_and_survives(
    unsealed_area: int, tmp_path: Path, tmp_sock_dir: Path
) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 1 << 20)
    sock = tmp_sock_dir / "sealed-inflight.sock"
    serve = ServeProc(
        ["blk", "--image", str(image), "--require-sealed-memory", "--verbose"],
        sock,
        tmp_path / "serve.log",
    )
    try:
        fds, maps = serve.idle_fds(), memfd_maps(serve.pid)
        refused = hostile_inflight_session(sock, unsealed_area)
        assert "SET_INFLIGHT_FD" in refused, refused
        assert serve.alive(), f"daemon died ({serve.proc.returncode}): {serve.stderr()}"
        # serve prints events as its loop polls for them: wait for the line.
        assert wait_for(lambda: "F_SEAL_SHRINK" in serve.stderr(), 10.0), serve.stderr()
        assert "SET_INFLIGHT_FD" in serve.stderr(), serve.stderr()
        # Nothing of the refused session stays: no fd, no mapping of the area.
        assert serve.settle_fds(fds) == fds, serve.fd_targets()
        assert wait_for(lambda: memfd_maps(serve.pid) == maps), memfd_maps(serve.pid)
        # The next front-end is served.
        with BlkDriver.connect(sock) as disk:
            disk.write(4096, b"\x5a" * 4096)
            assert disk.read(4096, 4096) == b"\x5a" * 4096
        assert serve.terminate() == 0
    finally:
        serve.close()


def test_without_the_policy_a_truncated_inflight_area_is_the_documented_sigbus(
    unsealed_area: int, tmp_path: Path, tmp_sock_dir: Path
) -> None:
    """The J8 risk the policy exists for: without it the area passes the size check at
    SET_INFLIGHT_FD, and its truncation afterwards kills the daemon with SIGBUS when the
    ring starts. If this starts failing, the daemon learnt to survive it: update the
    README's J8 paragraph."""
    image = tmp_path / "disk.img"
    make_image(image, 1 << 20)
    sock = tmp_sock_dir / "unsealed-inflight.sock"
    serve = ServeProc(["blk", "--image", str(image)], sock, tmp_path / "serve.log")
    try:
        assert hostile_inflight_session(sock, unsealed_area) == ""
        assert wait_for(lambda: not serve.alive(), 10.0)
        assert serve.proc.returncode == -signal.SIGBUS
    finally:
        serve.close()
