"""``demo``: a back-end and a front-end of ours in one process, moving real data through a
virtqueue over a real vhost-user socket.

First the embedded default, a RAM disk: the daemon framework serves the native virtio-blk
device over a memfd RAM disk, and our virtio-blk driver writes blocks, reads them back and
checks them. Then a message round trip that shows every step:

The front-end allocates guest RAM from a memfd and shares it by fd; the back-end maps it.
They negotiate (with EVENT_IDX), the front-end hands over ring 0 and, for each message,
adds a chain (a readable buffer holding the text, a writable buffer for the answer),
publishes it and kicks. The back-end pops the chain from its device-side queue, reads the
text out of guest memory, writes it back upper-cased, marks the chain used and signals the
call eventfd. Each step is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .. import _core
from ..codes import ProtocolFeature
from ..daemon import BlkDevice, Daemon
from ..devices.blk import BlkDriver
from ..types import VringAddrs
from ..user import BackendHandler, BackendListener, Frontend, GuestMemory, regions_of
from ..virtio import DeviceQueue, VirtioFeature, Virtqueue, place_rings, setup_queue
from .common import plain

RAM_SIZE = 1 << 20
QUEUE_SIZE = 256
RING_GPA = 0x10000
DATA_GPA = 0x40000  # the readable buffer of each message
REPLY_GPA = 0x80000  # the writable buffer of each message
RAMDISK_SIZE = 16 << 20
FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.RING_EVENT_IDX


class UpperCaseDevice(BackendHandler):
    """Answers every chain with its readable bytes, upper-cased."""

    max_queues = 1

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self.ring: dict[str, int] = {}
        self.call: _core.EventFd | None = None
        self.features = 0
        self.stop = threading.Event()
        self.worker: threading.Thread | None = None
        self.queue: DeviceQueue | None = None
        self.log: list[str] = []

    def get_features(self) -> int:
        return int(FEATURES)

    def set_features(self, features: int) -> None:
        self.features = features

    def get_protocol_features(self) -> int:
        return int(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ)

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.log.append(f"back-end mapped {len(memory)} region(s), {memory.total_size} bytes")

    def set_vring_num(self, index: int, num: int) -> None:
        self.ring["num"] = num

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self.ring.update(
            desc=addrs.desc_table_addr, used=addrs.used_ring_addr, avail=addrs.avail_ring_addr
        )

    def set_vring_call(self, index: int, fd: _core.EventFd | None) -> None:
        self.call = fd

    def set_vring_kick(self, index: int, fd: _core.EventFd | None) -> None:
        if fd is None or self.memory is None:
            return
        self.queue = DeviceQueue.from_user(
            self.memory,
            self.ring["num"],
            self.ring["desc"],
            self.ring["avail"],
            self.ring["used"],
            event_idx=bool(self.features & VirtioFeature.RING_EVENT_IDX),
        )
        self.worker = threading.Thread(target=self._serve, args=(fd,), daemon=True)
        self.worker.start()

    def get_vring_base(self, index: int) -> int:
        self.stop.set()
        if self.worker is not None:
            self.worker.join(5)
        return self.queue.base if self.queue is not None else 0

    def _serve(self, kick: _core.EventFd) -> None:
        queue, call = self.queue, self.call
        assert queue is not None and call is not None
        while not self.stop.is_set():
            if not kick.wait(0.1):
                continue
            kick.read()
            used = []
            for chain in queue.pop_batch():
                text = queue.read_chain(chain)
                self.log.append(
                    f"back-end popped chain {chain.head} ({len(chain)} segments), read {text!r}"
                )
                used.append((chain.head, queue.write_chain(chain, text.upper())))
            queue.add_used_batch(used)
            if used and queue.needs_notification():
                call.write(1)


def add_parser(sub: Any) -> None:
    """Adds ``demo`` (data through a virtqueue between a back-end and a front-end of this
    package) to the CLI."""
    p = sub.add_parser(
        "demo",
        help="move real data through a virtqueue between a back-end and a front-end of ours",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--message",
        action="append",
        help="text to send (repeatable; default: three short messages)",
    )
    p.set_defaults(run=run)


def run_ramdisk(tmp: Path) -> bool:
    """The daemon framework with the native blk device on a RAM disk, driven by BlkDriver."""
    path = tmp / "blk.sock"
    disk = BlkDevice.ram(RAMDISK_SIZE, serial="pyvhost-demo")
    block = bytes(range(256)) * 256  # 64 KiB
    ok = True
    with Daemon(disk, path) as daemon, BlkDriver.connect(path) as drv:
        print(
            f"ram disk: daemon serves {RAMDISK_SIZE >> 20} MiB ({disk.capacity} sectors) "
            f"with the native virtio-blk device on {path.name}"
        )
        print(f"ram disk: driver negotiated features {drv.features:#x}")
        for offset in (0, RAMDISK_SIZE // 2, RAMDISK_SIZE - len(block)):
            drv.write(offset, block)
            same = drv.read(offset, len(block)) == block
            ok = ok and same
            print(
                f"ram disk: wrote and read back {len(block)} bytes at offset {offset:#x}: "
                f"{'match' if same else 'MISMATCH'}"
            )
        drv.flush()
        print(f"ram disk: daemon completed {sum(daemon.completed)} requests")
    return ok


def run(args: argparse.Namespace) -> int:
    """``demo``: runs both demonstrations and prints what moved; returns 0 when both round trips
    matched."""
    messages: list[str] = args.message or ["hello", "from the front-end", "through a virtqueue"]
    ok = True
    with tempfile.TemporaryDirectory(prefix="vhost-demo-") as tmp:
        ok = run_ramdisk(Path(tmp))
        path = Path(tmp) / "demo.sock"
        device = UpperCaseDevice()
        listener = BackendListener(path)

        def serve() -> None:
            listener.accept(timeout=10).serve(device)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        t0 = time.perf_counter()
        with Frontend.connect(path) as fe:
            features, proto = fe.negotiate()
            print(f"negotiated features {features:#x}, protocol features {proto!r}")
            ram = GuestMemory.allocate([(0, RAM_SIZE)])
            fe.set_mem_table(regions_of(ram))
            print(f"shared {RAM_SIZE} bytes of memfd-backed guest RAM by fd")
            desc, avail, used = place_rings(RING_GPA, QUEUE_SIZE)
            vq = Virtqueue(
                ram,
                QUEUE_SIZE,
                desc,
                avail,
                used,
                event_idx=bool(features & VirtioFeature.RING_EVENT_IDX),
            )
            kick, call = _core.EventFd(), _core.EventFd()
            setup_queue(fe, 0, ram, vq, kick, call)
            vq.set_used_notification(True)
            print(f"ring 0: {QUEUE_SIZE} entries at guest address {desc:#x}")
            for text in messages:
                data = text.encode()
                ram.write(DATA_GPA, data)
                head = vq.add([(DATA_GPA, len(data))], [(REPLY_GPA, 4096)])
                vq.publish()
                if vq.kick_needed():
                    kick.write(1)
                print(f"front-end added chain {head}: {text!r} -> kick")
                done: list[tuple[int, int]] = []
                deadline = time.monotonic() + 10
                while not done and time.monotonic() < deadline:
                    if call.wait(0.5):
                        call.read()
                    done = vq.poll_used()
                if not done:
                    print("error: the back-end never completed the chain")
                    return 1
                ((got_head, length),) = done
                reply = ram.read(REPLY_GPA, length)
                print(f"front-end got chain {got_head} back, {length} bytes: {reply.decode()!r}")
                ok = ok and got_head == head and reply == data.upper()
            print(f"ring 0 stopped at index {fe.get_vring_base(0)}")
        server.join(5)
        listener.close()
        for line in device.log:
            print(line)
        print(f"done in {1000 * (time.perf_counter() - t0):.1f} ms")
    return 0 if ok else 1
