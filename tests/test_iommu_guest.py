"""Issue 14 with a real guest behind a real vIOMMU: QEMU's emulated Intel IOMMU (TCG)
in front of ``python -m vhost serve blk --iommu``.

The guest kernel runs its Intel IOMMU driver (``intel_iommu=on``, strict invalidation)
and its own ``virtio_blk``, which maps every ring and buffer through the IOMMU: the
daemon sees I/O virtual addresses only, asks QEMU for each translation it misses
(``BACKEND_IOTLB_MSG``) and drops what QEMU invalidates (``IOTLB_MSG``) when the guest
unmaps. The project's own recording proxy (:class:`vhost.trace.Tracer`) sits between
QEMU and the daemon, so the tests check the conversation as well as the guest's data:

* guest I/O with ``O_DIRECT`` read-back checks passes, and the image holds the data;
* the daemon's reported miss count (printed by ``serve blk --iommu`` on stop) is the
  number of misses QEMU was asked, and more than 0; QEMU sent invalidations, and the
  daemon asked again for pages that were invalidated (it did drop them);
* the same machine without ``iommu_platform``: no miss, no ``IOTLB_MSG``;
* a ring whose descriptor table and available ring the guest places where the vIOMMU
  gives no memory (``tests/guest_rogue_virtio.py``, run in the guest): QEMU answers that
  miss with nothing, the daemon reports the unanswered miss after
  ``--iommu-miss-timeout`` and fails that queue's work, not itself: it keeps the
  session, and the guest's own driver, bound again, does I/O through it;
* two daemon bugs QEMU exposed, each with a host-side regression test: a miss re-sent at
  every unrelated IOTLB message (a storm of repeats), and the err fd forgotten at
  RESET_DEVICE (QEMU then rejected the in-band VRING_ERR).
"""

from __future__ import annotations

import itertools
import queue
import re
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import guest
from daemon_util import S_OK, BlkGuest
from peers import make_image
from test_daemon_channel import CHANNEL
from test_daemon_channel import session as channel_session
from test_guest_daemon import image_at, serve
from test_iommu import PAGE, iommu_guest
from vhost import EventFd
from vhost.codes import ProtocolFeature as PF
from vhost.daemon import BlkDevice, Daemon
from vhost.trace import Message, Record, Tracer
from vhost.types import IotlbAccess, IotlbMessage, IotlbType
from vhost.virtio import setup_queue

pytestmark = pytest.mark.timeout(180)

CHECKOUT = Path(__file__).resolve().parent.parent
IMAGE_BYTES = 32 << 20
BLOCK = 64 << 10
#: 64 KiB blocks of the image the guest writes (block numbers), each a different pattern.
BLOCKS = (16, 40, 100, 300)
#: What QEMU's guest may take at most, boot included (TCG boots in about 5 s here).
GUEST_TIMEOUT = 90.0
#: Seconds the daemon waits for an unanswered miss in the fault test.
MISS_TIMEOUT = 2.0

# IOTLB message types (the vhost_iotlb_msg type field).
MISS, UPDATE, INVALIDATE = 1, 2, 3


def patterns() -> bytes:
    """One distinct 64 KiB pattern per written block, not all one byte."""
    return b"".join(
        bytes((i * 7 + j * 13 + (j >> 8)) & 0xFF for j in range(BLOCK)) for i in range(len(BLOCKS))
    )


def io_script() -> str:
    """Guest shell: write each block with O_DIRECT, drop caches, read each back with
    O_DIRECT and compare; then a 4 MiB read in 1 MiB requests (buffers over many pages)."""
    lines = ["dmesg | grep -E 'DMAR: IOMMU enabled|TLB invalidation policy'"]
    for i, block in enumerate(BLOCKS):
        lines.append(
            f"dd if=pattern.bin of=/dev/vda bs={BLOCK} skip={i} seek={block} count=1 "
            f"oflag=direct conv=fsync 2>/dev/null && echo WROTE-{block}"
        )
    lines.append("sync; echo 3 > /proc/sys/vm/drop_caches")
    for i, block in enumerate(BLOCKS):
        lines += [
            f"dd if=pattern.bin of=/tmp/want bs={BLOCK} skip={i} count=1 2>/dev/null",
            f"dd if=/dev/vda of=/tmp/got bs={BLOCK} skip={block} count=1 iflag=direct 2>/dev/null",
            f"cmp /tmp/want /tmp/got && echo SAME-{block}",
        ]
    lines.append(
        "dd if=/dev/vda of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null && echo BIGREAD-OK"
    )
    return "\n".join(lines) + "\n"


@dataclass
class Iotlb:
    """The IOTLB conversation in a trace, as counts."""

    updates: int
    invalidations: int
    #: BACKEND_IOTLB_MSG misses the daemon sent.
    misses: int
    #: Misses for a page QEMU had invalidated before (the daemon dropped it, then needed it).
    misses_after_invalidation: int
    #: Misses for a page already asked for and not answered yet.
    repeated_misses: int
    #: IOTLB_MSG from QEMU that asked for a REPLY_ACK (all of them, with QEMU).
    need_reply: int


def iotlb_msgs(records: Sequence[Record], channel: str) -> list[tuple[int, int, int]]:
    """``(type, iova, size)`` of each IOTLB_MSG request on ``channel`` (``main``: from
    QEMU; ``backend-channel``: the daemon's misses)."""
    found = []
    for r in records:
        if not isinstance(r, Message) or r.name != "IOTLB_MSG" or r.reply:
            continue
        if r.channel == channel:
            kind, iova, size = r.field("type"), r.field("iova"), r.field("size")
            assert isinstance(kind, int) and isinstance(iova, int), r.format()
            assert isinstance(size, int), r.format()
            found.append((kind, iova, size))
    return found


def iotlb_traffic(records: Sequence[Record]) -> Iotlb:
    counts = Iotlb(0, 0, 0, 0, 0, 0)
    invalidated: set[int] = set()
    asked: set[int] = set()
    for r in records:
        if not isinstance(r, Message) or r.name != "IOTLB_MSG" or r.reply:
            continue
        ((kind, iova, size),) = iotlb_msgs([r], r.channel)
        if r.channel == "backend-channel":
            assert r.sender == "backend" and kind == MISS, r.format()
            counts.misses += 1
            counts.misses_after_invalidation += iova // PAGE in invalidated
            counts.repeated_misses += iova // PAGE in asked
            asked.add(iova // PAGE)
            continue
        counts.need_reply += r.need_reply
        pages = range(iova // PAGE, (iova + size + PAGE - 1) // PAGE)
        if kind == UPDATE:
            counts.updates += 1
            invalidated.difference_update(pages)
            asked.difference_update(pages)
        else:
            assert kind == INVALIDATE, r.format()
            counts.invalidations += 1
            invalidated.update(pages)
    return counts


def reported_misses(stderr: str) -> int:
    """The miss count ``serve blk --iommu`` printed on stop."""
    found = re.search(r"IOTLB misses in the last session: (\d+) \(queue 0: (\d+)\)", stderr)
    assert found, stderr
    assert found[1] == found[2], stderr
    return int(found[1])


@dataclass
class Run:
    """One guest run through the proxy: the guest's output, the daemon's exit status and
    stderr, and every vhost-user message."""

    output: str
    #: The whole console: the kernel's and QEMU's messages too.
    console: str
    code: int
    stderr: str
    records: list[Record]


@dataclass
class Traced:
    """``serve blk --iommu`` behind the recording proxy: QEMU connects to ``socket``;
    the daemon's exit status and stderr are filled in when it has stopped."""

    socket: Path
    tracer: Tracer
    code: int = -1
    stderr: str = ""


@contextmanager
def traced_daemon(sock_dir: Path, image: Path, extra: Sequence[str] = ()) -> Iterator[Traced]:
    back = sock_dir / "blk.sock"
    with serve(["blk", "--image", str(image), "--iommu", "--verbose", *extra], back) as served:
        with Tracer(sock_dir / "front.sock", back, device="blk") as tracer:
            traced = Traced(sock_dir / "front.sock", tracer)
            yield traced
        traced.code, traced.stderr = served.stop()


def run_io(
    sock_dir: Path,
    image: Path,
    *,
    iommu_platform: bool = True,
    before: str = "",
    mode: guest.Mode = "busybox",
    serve_args: Sequence[str] = (),
) -> Run:
    """Boots the guest on a traced ``serve blk --iommu``; it runs ``before``, then
    :func:`io_script`."""
    with traced_daemon(sock_dir, image, serve_args) as traced:
        result = guest.run_guest(
            before + io_script(),
            mode=mode,
            qemu_args=guest.viommu_blk_args(traced.socket, iommu_platform=iommu_platform),
            kernel_args=guest.VIOMMU_KERNEL_ARGS,
            memory_mb=512,
            smp=1,
            files={"pattern.bin": patterns()},
            timeout=GUEST_TIMEOUT,
        ).check()
    records = list(traced.tracer.records(timeout=5))
    return Run(result.script_output, result.output, traced.code, traced.stderr, records)


def check_io(run: Run, image: Path) -> None:
    out = run.output
    assert "DMAR: IOMMU enabled" in out, out
    assert "TLB invalidation policy: strict mode" in out, out
    for block in BLOCKS:
        assert f"WROTE-{block}" in out, out
        assert f"SAME-{block}" in out, out
    assert "BIGREAD-OK" in out, out
    data = patterns()
    for i, block in enumerate(BLOCKS):
        assert image_at(image, block * BLOCK // 512, BLOCK) == data[i * BLOCK : (i + 1) * BLOCK]
    assert run.code == 0, run.stderr
    assert "stopped after 1 session(s)" in run.stderr, run.stderr
    assert "session 1 ended: the front-end closed the connection" in run.stderr, run.stderr


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", IMAGE_BYTES)


def test_guest_io_behind_the_viommu(image: Path, tmp_sock_dir: Path) -> None:
    run = run_io(tmp_sock_dir, image, iommu_platform=True)
    check_io(run, image)
    acked = [
        r
        for r in run.records
        if isinstance(r, Message) and r.name == "SET_FEATURES" and not r.reply
    ]
    assert acked and all("ACCESS_PLATFORM" in r.format() for r in acked), acked
    traffic = iotlb_traffic(run.records)
    misses = reported_misses(run.stderr)
    # The daemon counts exactly the misses it sent QEMU, and QEMU answered them.
    assert misses > 0, run.stderr
    assert traffic.misses == misses, (traffic, run.stderr)
    assert traffic.updates >= misses // 2 > 0, traffic
    # Every IOTLB_MSG from QEMU wants a REPLY_ACK (the daemon gave it, or QEMU had stopped).
    assert traffic.need_reply == traffic.updates + traffic.invalidations, traffic
    # Strict mode: the guest invalidated as it unmapped (ATS device-IOTLB invalidations,
    # which QEMU passes on), and the daemon, having dropped those pages, asked again.
    assert traffic.invalidations > 0, traffic
    assert traffic.misses_after_invalidation > 0, traffic
    # A miss is not sent again while QEMU has not answered it (unless it takes QEMU
    # 100 ms): the repeats once fed on their own late answers, tens of thousands of them.
    assert traffic.repeated_misses * 20 <= traffic.misses, traffic


def test_guest_io_without_iommu_platform_asks_nothing(image: Path, tmp_sock_dir: Path) -> None:
    # The control: the same daemon (it offers ACCESS_PLATFORM), the same IOMMU in the
    # guest, but the device outside it: QEMU does not ack the feature, and the daemon
    # reads guest-physical addresses without a single miss.
    run = run_io(tmp_sock_dir, image, iommu_platform=False)
    check_io(run, image)
    assert reported_misses(run.stderr) == 0, run.stderr
    traffic = iotlb_traffic(run.records)
    assert traffic == Iotlb(0, 0, 0, 0, 0, 0), traffic
    acked = [
        r
        for r in run.records
        if isinstance(r, Message) and r.name == "SET_FEATURES" and not r.reply
    ]
    assert acked and not any("ACCESS_PLATFORM" in r.format() for r in acked), acked


DOC = CHECKOUT / "docs" / "iommu.md"
DOC_SOCKET = "/tmp/vhost-user-blk.sock"


def doc_commands() -> list[list[str]]:
    """docs/iommu.md's ```sh blocks, each as one command's words."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [shlex.split(code.replace("\\\n", " ")) for lang, code in found if lang == "sh"]


def test_the_docs_show_what_these_tests_run() -> None:
    """docs/iommu.md's two commands are the ones the tests above run (this file is the
    page's runner: tests/test_docs.py's RUN_ELSEWHERE)."""
    serve_cmd, qemu = doc_commands()
    assert serve_cmd[:4] == ["python", "-m", "vhost", "serve"], serve_cmd
    # traced_daemon's arguments (serve() adds --socket), less --verbose.
    words = serve_cmd[4:]
    assert sorted(words) == sorted(
        ["blk", "--image", "/tmp/disk.img", "--iommu", "--socket", DOC_SOCKET]
    ), serve_cmd
    assert qemu[0] == "qemu-system-x86_64"
    device_args = guest.viommu_blk_args(DOC_SOCKET)
    at = qemu.index(device_args[0])
    assert qemu[at : at + len(device_args)] == device_args, qemu
    memory = guest.shared_memory_args(512)
    pairs = set(itertools.pairwise(qemu))
    wanted = list(zip(memory[::2], memory[1::2], strict=True))
    assert all(pair in pairs for pair in wanted), qemu
    append = qemu[qemu.index("-append") + 1].split()
    assert set(guest.VIOMMU_KERNEL_ARGS) <= set(append), append


def test_updates_while_a_miss_is_outstanding_do_not_repeat_it(tmp_sock_dir: Path) -> None:
    """What QEMU exposed (the guest test above saw up to 40,000 misses for 1,200 pages of
    I/O): a worker waiting on a miss is woken by every IOTLB update or invalidation, for
    any page. It used to send its miss again at each wake-up, and QEMU answers every miss
    it reads, in order: the late answers to the repeats woke the worker on its next miss,
    which it repeated in turn, and so on for good. Here our front-end, as the IOMMU,
    sends 20 other pages' updates before answering each miss: the daemon asks once."""
    with iommu_guest(tmp_sock_dir) as (blk, fe, iommu, image, _serve):
        asked: dict[int, int] = {}
        answer = iommu.iotlb_msg

        def busy_iommu(message: IotlbMessage) -> int | None:
            page = message.iova & ~(PAGE - 1)
            asked[page] = asked.get(page, 0) + 1
            if asked[page] == 1:
                for i in range(1, 21):
                    other = (2 << 20) + i * PAGE  # between the rings and the data: unused
                    fe.send_iotlb_msg(
                        IotlbMessage(
                            iova=other,
                            size=PAGE,
                            uaddr=iommu.uaddr0 + other,
                            perm=IotlbAccess.RW,
                            type=IotlbType.UPDATE,
                        )
                    )
            return answer(message)

        iommu.iotlb_msg = busy_iommu  # type: ignore[method-assign]
        data = bytes(range(256)) * 32  # 8 KiB: the two data pages
        assert blk.write(0, 5 * PAGE, data) == S_OK
        with image.open("rb") as f:
            f.seek(5 * PAGE)
            assert f.read(len(data)) == data
    # The ring's pages, the request's header and data pages, its status byte.
    assert len(asked) >= 3, asked
    assert max(asked.values()) <= 2, asked


ROGUE = CHECKOUT / "tests" / "guest_rogue_virtio.py"
ROGUE_IOVA = "0x7ff00000"


def test_a_ring_outside_the_guests_mappings_fails_that_work_not_the_daemon(
    image: Path, tmp_sock_dir: Path
) -> None:
    # In the guest, tests/guest_rogue_virtio.py takes the disk from its driver and puts
    # queue 0's descriptor table at an I/O virtual address the vIOMMU translates to no
    # memory (the used ring must be mapped: QEMU translates it itself before it starts
    # the back-end, and fails the start otherwise); then gives the disk back to
    # virtio_blk, which does I/O as in the first test, all in one vhost-user session.
    wait = MISS_TIMEOUT + 2.0
    before = (
        f"{guest.VENV_PYTHON} {ROGUE} --wait {wait} || exit 1\n"
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
    )
    serve_args = ["--iommu-miss-timeout", str(MISS_TIMEOUT)]
    run = run_io(tmp_sock_dir, image, before=before, mode="host", serve_args=serve_args)
    out, records = run.output, run.records
    assert f"ROGUE-RING-AT={ROGUE_IOVA}" in out and "ROGUE-DONE" in out, out
    # QEMU had no memory to give for it: no update for that page ever came.
    rogue = int(ROGUE_IOVA, 16)
    asked = [iova for _, iova, _ in iotlb_msgs(records, "backend-channel")]
    assert rogue in asked, "the daemon never asked for the ring's page"
    updated = {iova // PAGE for kind, iova, _ in iotlb_msgs(records, "main") if kind == UPDATE}
    assert rogue // PAGE not in updated
    # The daemon said which address was not answered, after the bound, and stayed up:
    # the same session then served the guest's own driver.
    unanswered = [
        line
        for line in run.stderr.splitlines()
        if "queue 0" in line and ROGUE_IOVA in line and "not answered" in line
    ]
    assert unanswered, run.stderr
    check_io(run, image)
    # The queue's failure was signalled on the err fd QEMU gave, not in band (which QEMU
    # rejects: test_the_err_fd_outlives_a_device_reset).
    assert "Received unexpected msg type" not in run.console, run.console


def test_the_err_fd_outlives_a_device_reset(tmp_sock_dir: Path) -> None:
    """What QEMU exposed (``Received unexpected msg type: 5`` in the fault test above):
    QEMU sends SET_VRING_ERR once per connection and acks INBAND_NOTIFICATIONS without
    handling VRING_ERR on the back-end channel. The daemon forgot the err fd at each
    RESET_DEVICE (the guest driver resets the device at every probe), so a queue that
    failed later was reported in band, to a front-end that rejects it. The err fd is the
    front-end's for the whole connection: a failure after a reset signals it."""
    err = EventFd()
    blk = BlkGuest(1)
    protocol = CHANNEL | PF.INBAND_NOTIFICATIONS | PF.RESET_DEVICE
    with Daemon(BlkDevice.ram(1 << 20), tmp_sock_dir / "ram.sock") as daemon:
        try:
            with channel_session(daemon, protocol, memory=blk) as s:
                s.fe.set_vring_err(0, err)
                s.fe.reset_device()
                s.fe.set_features(s.fe.acked_features)
                vq = blk.vqs[0]
                setup_queue(s.fe, 0, blk.memory, vq, blk.kicks[0], blk.calls[0])
                # An avail index more than a ring ahead of the used one breaks the ring.
                blk.memory.write(vq.avail + 2, (vq.size + 5).to_bytes(2, "little"))
                blk.kicks[0].write(1)
                assert err.wait(10.0), "the err fd given before the reset was not signalled"
                with pytest.raises(queue.Empty):
                    s.front.next(timeout=0.5)
        finally:
            blk.close()
            err.close()
