"""Postcopy in our own daemon (issue 10): ``python -m vhost serve blk`` (native and
``--python``) registers guest memory with a userfaultfd, so a device touching a page the
destination has not received yet waits until the front-end resolves the fault.

Our front-end plays the destination VMM: it advises postcopy (and gets the daemon's
userfaultfd), listens, sends the memory table (answered with the daemon's mapping bases),
and submits a virtio-blk WRITE whose data page it never touched, so the page is missing
in the shared memfd. The daemon faults on it; the request does not complete; the front-end
reads the fault (by guest-physical address), copies known bytes in with ``UFFDIO_COPY``,
and the image must then hold exactly those bytes. Then: POSTCOPY_END unregisters (a missing
page no longer blocks anything), out-of-order postcopy requests are refused (ADVERSARIAL
K6), ADD_MEM_REG's postcopy reply carries the daemon's base, and a front-end killed while
the daemon waits on a fault leaves no blocked worker, no userfaultfd and no fd behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import test_daemon_dirty_log
from daemon_util import ServeProc, wait_for
from vhost import EventFd, FrontendRequest, GuestMemory, MemoryRegion, ProtocolFeature
from vhost.devices.blk import BlkDriver
from vhost.errors import RequestRefusedError, VhostError
from vhost.postcopy import PAGE_SIZE, FaultResolver, PostcopyRegion
from vhost.user import Frontend, regions_of
from vhost.virtio import Virtqueue, setup_queue, wait_used

pytestmark = pytest.mark.timeout(90)

MEMORY = 1 << 20
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
HEADER, STATUS = 0x20000, 0x21000
#: Rings, header and status: written by the front-end up front, so present.
TOUCHED = (DESC, STATUS + PAGE_SIZE)
#: Pages nobody touches before the daemon does: missing in the memfd.
MISSING = 0x40000
T_OUT = 1
SECTOR = 512


#: The fixture of the dirty-log tests: ``serve blk`` on a 1 MiB image, native and ``--python``.
serve = test_daemon_dirty_log.serve


def image_of(serve: ServeProc) -> Path:
    return serve.socket_path.parent / "disk.img"


def uffd_fds(pid: int) -> int:
    """How many userfaultfds process ``pid`` holds."""
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]"
    return n


class PostcopyRig:
    """Our front-end as a postcopy destination: PAGEFAULT negotiated, advised, listening,
    the memory table sent in postcopy's form, one split ring running. ``hot`` is a
    ``(gpa, size)`` region allocated too but left out of the table, to add later."""

    def __init__(self, sock: Path, hot: tuple[int, int] | None = None) -> None:
        self.fe = Frontend.connect(sock)
        _, self.proto = self.fe.negotiate(event_idx=False)
        assert self.proto & ProtocolFeature.PAGEFAULT, "serve blk offers PAGEFAULT"
        self.ram = GuestMemory.allocate([(0, MEMORY), *([hot] if hot else [])])
        self.ram.write(TOUCHED[0], bytes(TOUCHED[1] - TOUCHED[0]))
        self.uffd = self.fe.postcopy_advise()
        self.fe.postcopy_listen()
        self.fe.set_mem_table(regions_of(self.ram)[:1])
        self.resolver = FaultResolver(self.uffd, self.fe.postcopy_regions())
        self.vq = Virtqueue(self.ram, 64, DESC, AVAIL, USED, event_idx=False)
        self.kick, self.call = EventFd(), EventFd()
        setup_queue(self.fe, 0, self.ram, self.vq, self.kick, self.call)

    def submit_write(self, sector: int, data_gpa: int, length: int) -> int:
        """A WRITE of ``length`` bytes at guest ``data_gpa`` to ``sector``, published and
        kicked; the front-end does not touch the data."""
        self.ram.write(HEADER, struct.pack("<IIQ", T_OUT, 0, sector))
        self.ram.write(STATUS, b"\xff")
        head = self.vq.add([(HEADER, 16), (data_gpa, length)], [(STATUS, 1)])
        self.vq.publish()
        self.kick.write(1)
        return head

    def complete(self, head: int) -> int:
        assert [h for h, _ in wait_used(self.vq, self.call, timeout=10.0)] == [head]
        return self.ram.read(STATUS, 1)[0]

    def close(self) -> None:
        self.resolver.close()
        self.uffd.close()
        self.fe.close()
        self.kick.close()
        self.call.close()


def test_a_device_waits_for_a_missing_page_until_the_front_end_copies_it(
    serve: ServeProc,
) -> None:
    """The daemon faults on the WRITE's missing data page and the request waits (no
    completion, the image unchanged) until our front-end copies known bytes in; the image
    then holds exactly those bytes, and the page is in the shared memory for the front-end
    too. A page resolved with zeros works the same way."""
    image = image_of(serve)
    before = image.read_bytes()
    rig = PostcopyRig(serve.socket_path)
    try:
        (region,) = rig.fe.postcopy_regions()
        assert region.guest_phys_addr == 0 and region.memory_size == MEMORY
        assert region.backend_addr % PAGE_SIZE == 0 and region.backend_addr != 0

        head = rig.submit_write(8, MISSING, 2 * PAGE_SIZE)
        fault = rig.resolver.next_fault(timeout=10.0)
        assert fault is not None, "the daemon faults on the missing page"
        assert fault.guest_phys_addr == MISSING
        assert fault.backend_addr == region.backend_addr + MISSING
        assert not fault.write, "a WRITE request only reads guest memory"
        # Still waiting: nothing completed, nothing reached the image.
        assert not rig.call.wait(0.3)
        assert rig.vq.poll_used() == []
        assert image.read_bytes() == before

        pages = random.Random(11).randbytes(2 * PAGE_SIZE)
        assert rig.resolver.copy(MISSING, pages[:PAGE_SIZE])
        # The second page of the buffer faults next.
        fault = rig.resolver.next_fault(timeout=10.0)
        assert fault is not None and fault.guest_phys_addr == MISSING + PAGE_SIZE
        assert rig.resolver.copy(MISSING + PAGE_SIZE, pages[PAGE_SIZE:])
        assert rig.complete(head) == 0
        after = image.read_bytes()
        assert after[8 * SECTOR : 8 * SECTOR + len(pages)] == pages
        assert after[: 8 * SECTOR] == before[: 8 * SECTOR]
        assert after[8 * SECTOR + len(pages) :] == before[8 * SECTOR + len(pages) :]
        assert rig.ram.read(MISSING, len(pages)) == pages, "shared with the front-end"
        assert not rig.resolver.copy(MISSING, bytes(PAGE_SIZE)), "already present"

        zero_page = MISSING + 16 * PAGE_SIZE
        head = rig.submit_write(64, zero_page, PAGE_SIZE)
        fault = rig.resolver.next_fault(timeout=10.0)
        assert fault is not None and fault.guest_phys_addr == zero_page
        assert rig.resolver.zero(zero_page, PAGE_SIZE)
        assert rig.complete(head) == 0
        assert image.read_bytes()[64 * SECTOR : 64 * SECTOR + PAGE_SIZE] == bytes(PAGE_SIZE)

        rig.fe.postcopy_end()
        assert rig.fe.postcopy_regions() == []
    finally:
        rig.close()


def test_postcopy_end_unregisters_and_out_of_order_requests_are_refused(
    serve: ServeProc,
) -> None:
    """After POSTCOPY_END a missing page no longer blocks the device (the WRITE completes
    at once, with the fresh page's zeros, and no fault is reported) and the daemon holds no
    userfaultfd. Out of order (ADVERSARIAL K6): LISTEN before ADVISE and END without ADVISE
    are refused and the session goes on; a second ADVISE, whose reply is the fd and so
    cannot say "failed", closes the connection, and the daemon's userfaultfd goes with
    it."""
    image = image_of(serve)
    fe = Frontend.connect(serve.socket_path)
    try:
        fe.negotiate()
        with pytest.raises(RequestRefusedError, match="POSTCOPY_LISTEN"):
            fe.postcopy_listen()
        with pytest.raises(RequestRefusedError, match="POSTCOPY_END"):
            fe.postcopy_end()
        assert fe.get_features()
    finally:
        fe.close()

    rig = PostcopyRig(serve.socket_path)
    try:
        assert uffd_fds(serve.pid) == 1
        rig.fe.postcopy_end()
        assert uffd_fds(serve.pid) == 0
        with pytest.raises(RequestRefusedError, match="POSTCOPY_END"):
            rig.fe.postcopy_end()
        head = rig.submit_write(16, MISSING, PAGE_SIZE)
        assert rig.complete(head) == 0
        assert image.read_bytes()[16 * SECTOR : 16 * SECTOR + PAGE_SIZE] == bytes(PAGE_SIZE)
        assert rig.resolver.next_fault(timeout=0) is None
    finally:
        rig.close()

    rig = PostcopyRig(serve.socket_path)
    try:
        with pytest.raises(VhostError):
            rig.fe.postcopy_advise()
    finally:
        rig.close()
    assert wait_for(lambda: uffd_fds(serve.pid) == 0, timeout=10.0), serve.fd_targets()
    assert wait_for(lambda: "POSTCOPY_ADVISE: postcopy was already advised" in serve.stderr())


def test_memory_that_cannot_be_registered_is_refused_by_name(serve: ServeProc) -> None:
    """Guest memory in a file on a disk filesystem (not shared memory) cannot be
    registered in missing mode: POSTCOPY_LISTEN is refused (a NACK, the session goes on)
    and the daemon says which memory and why; nothing stays registered, and END then
    closes the userfaultfd."""
    fe = Frontend.connect(serve.socket_path)
    # The checkout's filesystem, not tmpfs (files under /tmp may be shared memory).
    with tempfile.TemporaryFile(dir=Path(__file__).parent) as disk_file:
        disk_file.truncate(MEMORY)
        try:
            fe.negotiate(event_idx=False)
            fe.set_mem_table([MemoryRegion(0, MEMORY, 0x7F00_0000_0000, 0, disk_file.fileno())])
            uffd = fe.postcopy_advise()
            with pytest.raises(RequestRefusedError, match="POSTCOPY_LISTEN"):
                fe.postcopy_listen()
            fe.postcopy_end()
            assert uffd_fds(serve.pid) == 0
            uffd.close()
        finally:
            fe.close()
    # The session's end reports what it refused, with the reason.
    why = "register guest memory 0x0..0x100000 with the userfaultfd"
    assert wait_for(lambda: why in serve.stderr()), serve.stderr()
    assert "postcopy needs shared memory" in serve.stderr()


def test_add_mem_reg_in_postcopy_answers_with_the_daemon_base(serve: ServeProc) -> None:
    """With CONFIGURE_MEM_SLOTS, a region added while postcopy listens is answered with
    the daemon's address for it (QEMU's form: the region back, then our ack), the daemon
    registers it, and a device fault in it is resolved through that base."""
    rig = PostcopyRig(serve.socket_path, hot=(0x1000_0000, 16 * PAGE_SIZE))
    try:
        assert rig.proto & ProtocolFeature.CONFIGURE_MEM_SLOTS
        new = regions_of(rig.ram)[1]
        gpa, size = new.guest_phys_addr, new.memory_size
        rig.fe.add_mem_region(new)
        regions = rig.fe.postcopy_regions()
        assert [r.guest_phys_addr for r in regions] == [0, gpa]
        added = regions[1]
        assert isinstance(added, PostcopyRegion) and added.memory_size == size
        rig.resolver.set_regions(regions)
        head = rig.submit_write(24, gpa + PAGE_SIZE, PAGE_SIZE)
        fault = rig.resolver.next_fault(timeout=10.0)
        assert fault is not None
        assert (fault.guest_phys_addr, fault.backend_addr) == (
            gpa + PAGE_SIZE,
            added.backend_addr + PAGE_SIZE,
        )
        page = b"added-region".ljust(PAGE_SIZE, b"+")
        assert rig.resolver.copy(gpa + PAGE_SIZE, page)
        assert rig.complete(head) == 0
        assert image_of(serve).read_bytes()[24 * SECTOR : 24 * SECTOR + PAGE_SIZE] == page
        # Removing a region, QEMU acks the batch with an 8-byte REM_MEM_REG: consumed too
        # (a malformed REM_MEM_REG would close the connection).
        rig.fe.remove_mem_region(new)
        assert [r.guest_phys_addr for r in rig.fe.postcopy_regions()] == [0]
        rig.fe.native.send_raw(int(FrontendRequest.REM_MEM_REG), 1, struct.pack("<Q", 0))
        assert rig.fe.get_features()
        rig.fe.postcopy_end()
    finally:
        rig.close()


def test_a_non_zero_region_ack_closes_the_session(serve: ServeProc) -> None:
    """QEMU's ack of a postcopy ADD_MEM_REG batch is a u64 0; any other value is a broken
    peer: the session closes (the daemon names it) instead of taking it for a request."""
    rig = PostcopyRig(serve.socket_path, hot=(0x1000_0000, 16 * PAGE_SIZE))
    try:
        new = regions_of(rig.ram)[1]
        body = struct.pack("<QQQQQ", 0, new.guest_phys_addr, new.memory_size, new.userspace_addr, 0)
        add = int(FrontendRequest.ADD_MEM_REG)
        reply = rig.fe.native.send_raw(add, 1, body, [new.fd], expect_reply=True)
        assert reply is not None
        code, _flags, answer, fds = reply
        assert (code, len(answer), fds) == (add, 40, [])
        assert struct.unpack_from("<Q", answer, 8)[0] == new.guest_phys_addr
        daemon_base = struct.unpack_from("<Q", answer, 24)[0]
        assert daemon_base != 0 and daemon_base % PAGE_SIZE == 0
        rig.fe.native.send_raw(add, 1, struct.pack("<Q", 1))
        with pytest.raises(VhostError):
            rig.fe.get_features()
    finally:
        rig.close()
    why = "the front-end's postcopy memory-region ack is not 0"
    assert wait_for(lambda: why in serve.stderr()), serve.stderr()


KILLED_FRONTEND = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_daemon_postcopy import MISSING, PostcopyRig
    rig = PostcopyRig({sock!r})
    rig.submit_write(32, MISSING, 4096)
    fault = rig.resolver.next_fault(timeout=10.0)
    if {pending!r} and fault is not None:
        # GET_VRING_BASE (11): the daemon needs the queue, whose worker sleeps on the fault.
        rig.fe.native.send_raw(11, 1, bytes(8))
    print("faulted" if fault is not None else "no fault", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("pending", [False, True], ids=["idle", "get-vring-base-pending"])
def test_a_front_end_killed_mid_postcopy_leaves_nothing_blocked(
    serve: ServeProc, pending: bool
) -> None:
    """A front-end is SIGKILLed while the daemon's worker waits on a page it will never
    send: with the session idle, or with a GET_VRING_BASE the session thread cannot answer
    before the worker's batch ends. The daemon sees the hang-up and unregisters its memory,
    which wakes the worker (the page then reads as zeros: the native device fails the
    request rather than write them, a Python one writes what the memory holds). The
    session ends, the daemon holds no
    userfaultfd and no more fds than before, and the next front-end is served."""
    baseline = serve.idle_fds()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_FRONTEND.format(
                tests=str(Path(__file__).parent), sock=str(serve.socket_path), pending=pending
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"faulted\n", (line, child.stderr.read() if child.stderr else b"")
        assert uffd_fds(serve.pid) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for f in (child.stdin, child.stdout, child.stderr):
            if f is not None:
                f.close()
    assert wait_for(lambda: uffd_fds(serve.pid) == 0, timeout=10.0), serve.fd_targets()
    assert serve.settle_fds(baseline, timeout=10.0) == baseline, serve.fd_targets()
    assert serve.alive(), serve.stderr()
    image = image_of(serve)
    with BlkDriver.connect(serve.socket_path) as driver:
        data = b"after-the-crash".ljust(PAGE_SIZE, b"!")
        driver.write(40 * SECTOR, data)
        assert driver.read(40 * SECTOR, PAGE_SIZE) == data
    assert image.read_bytes()[40 * SECTOR : 40 * SECTOR + PAGE_SIZE] == data
    assert serve.settle_fds(baseline, timeout=10.0) == baseline, serve.fd_targets()


def test_sigterm_stops_serve_blk_while_a_worker_waits_on_a_fault(tmp_sock_dir: Path) -> None:
    """SIGTERM while the front-end is alive, a worker sleeps on a fault and the session
    thread waits for that worker (a GET_VRING_BASE pending): ``serve blk`` still stops
    promptly with status 0 (the stop tears postcopy down, which wakes the worker), and
    the front-end sees its connection close."""
    image = tmp_sock_dir / "disk.img"
    image.write_bytes(bytes(MEMORY))
    serve = ServeProc(
        ["blk", "--image", str(image)], tmp_sock_dir / "blk.sock", tmp_sock_dir / "s.log"
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_FRONTEND.format(
                tests=str(Path(__file__).parent), sock=str(serve.socket_path), pending=True
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"faulted\n", (line, child.stderr.read() if child.stderr else b"")
        assert serve.terminate(signal.SIGTERM, timeout=10.0) == 0, serve.stderr()
        assert uffd_fds(child.pid) > 0, "the front-end still holds its handles"
    finally:
        child.kill()
        child.wait(10)
        for f in (child.stdin, child.stdout, child.stderr):
            if f is not None:
                f.close()
        serve.close()
