"""Postcopy's fault bound (ADVERSARIAL K6): a page the front-end never copies in, while it
stays connected, fails the waiting request after ``--postcopy-fault-timeout`` instead of
blocking its queue for ever.

``serve blk`` runs with a 1 s bound; our front-end (test_daemon_postcopy's rig) advises,
listens and submits a WRITE whose data page is missing, reads the fault and never
resolves it. The device (native, and the Python one through Batch.read raising
QueueError) then completes the request with IOERR and writes nothing to the image; the
session ends failed with the queue and the bound named on stderr; the daemon holds no
userfaultfd and no fd more than before, and serves the next front-end. A fault resolved
within the bound is unaffected, and an idle queue is never taken for a stuck one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_util import ServeProc, make_image, wait_for
from test_daemon_postcopy import MISSING, SECTOR, PostcopyRig, uffd_fds
from vhost.devices.blk import BlkDriver
from vhost.errors import VhostError
from vhost.postcopy import PAGE_SIZE

pytestmark = pytest.mark.timeout(90)

BOUND = 1.0
IOERR = 1


@pytest.fixture(params=["native", "python"])
def serve(request: pytest.FixtureRequest, tmp_sock_dir: Path) -> Iterator[ServeProc]:
    """``serve blk`` on a 1 MiB image with a 1 s postcopy fault bound."""
    image = tmp_sock_dir / "disk.img"
    make_image(image, 1 << 20, seed=5)
    args = ["blk", "--image", str(image), "--postcopy-fault-timeout", str(BOUND)]
    if request.param == "python":
        args.append("--python")
    proc = ServeProc(args, tmp_sock_dir / "blk.sock", tmp_sock_dir / "serve.log")
    try:
        yield proc
        assert proc.alive(), proc.stderr()
    finally:
        proc.close()


def native(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs on the native device (the ``serve`` fixture's parameter)."""
    return bool(request.node.callspec.params["serve"] == "native")


def session_closed(rig: PostcopyRig) -> bool:
    """Whether the daemon has closed the rig's connection (a request fails)."""
    try:
        rig.fe.get_features()
    except VhostError:
        return True
    time.sleep(0.05)
    return False


def test_a_fault_never_resolved_fails_the_request_and_the_session(
    serve: ServeProc, request: pytest.FixtureRequest
) -> None:
    """The WRITE waits on its missing data page; the front-end never copies it in. Past
    the bound the session ends failed ("queue 0: postcopy fault not resolved within
    1 s"), and the request completes with IOERR and the image unchanged, on the native
    device and on the Python one. Nothing is left behind and the next front-end is
    served."""
    image = serve.socket_path.parent / "disk.img"
    before = image.read_bytes()
    baseline = serve.idle_fds()
    rig = PostcopyRig(serve.socket_path)
    try:
        head = rig.submit_write(8, MISSING, 2 * PAGE_SIZE)
        fault = rig.resolver.next_fault(timeout=10.0)
        assert fault is not None and fault.guest_phys_addr == MISSING
        # Within the bound the request still waits.
        assert not rig.call.wait(0.3)
        status = rig.complete(head)
        # Native: the page is touched in user mode before the kernel copies it. Python:
        # Batch.read raises QueueError once postcopy failed under it, and the device
        # answers IOERR. Either way the zeros never reach the image.
        assert status == IOERR
        assert image.read_bytes() == before, "nothing of the request reached the image"
        # The session is over: the daemon closes the connection. The completion is posted
        # before the failure reaches the session, so a request sent at once may still be
        # answered; the next ones are not.
        assert wait_for(lambda: session_closed(rig), timeout=10.0)
    finally:
        rig.close()
    why = f"queue 0: postcopy fault not resolved within {BOUND:g} s"
    assert wait_for(lambda: why in serve.stderr(), timeout=10.0), serve.stderr()
    assert wait_for(lambda: uffd_fds(serve.pid) == 0, timeout=10.0), serve.fd_targets()
    assert serve.settle_fds(baseline, timeout=10.0) == baseline, serve.fd_targets()
    with BlkDriver.connect(serve.socket_path) as driver:
        data = b"next-session".ljust(PAGE_SIZE, b".")
        driver.write(40 * SECTOR, data)
        assert driver.read(40 * SECTOR, PAGE_SIZE) == data
    assert serve.settle_fds(baseline, timeout=10.0) == baseline, serve.fd_targets()


def test_a_fault_resolved_within_the_bound_is_unaffected(serve: ServeProc) -> None:
    """The same run with the front-end copying the page in at once: the WRITE completes
    with the copied bytes. The session then idles past the bound while postcopy listens
    (an idle queue is not a stuck one) and a second faulting WRITE still works."""
    image = serve.socket_path.parent / "disk.img"
    rig = PostcopyRig(serve.socket_path)
    try:
        for n, sector in enumerate((8, 24)):
            gpa = MISSING + 16 * n * PAGE_SIZE
            head = rig.submit_write(sector, gpa, PAGE_SIZE)
            fault = rig.resolver.next_fault(timeout=10.0)
            assert fault is not None and fault.guest_phys_addr == gpa
            page = random.Random(n).randbytes(PAGE_SIZE)
            assert rig.resolver.copy(gpa, page)
            assert rig.complete(head) == 0
            assert image.read_bytes()[sector * SECTOR : sector * SECTOR + PAGE_SIZE] == page
            # Idle for longer than the bound, still listening.
            time.sleep(BOUND * 1.5)
            assert rig.fe.get_features()
        rig.fe.postcopy_end()
    finally:
        rig.close()
    assert "postcopy fault" not in serve.stderr(), serve.stderr()
