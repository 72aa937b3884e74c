"""``demo``: a back-end and a front-end of ours in one process, over a real socket.

The front-end allocates guest RAM from a memfd and shares it; the back-end maps it. They
negotiate, set a ring up, and exchange a message through the shared memory with a kick
(front-end to back-end) and a call (back-end to front-end). Each step is printed.
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
from ..types import VringConfig
from ..user import BackendHandler, BackendListener, Frontend, GuestMemory, regions_of
from ..virtio import VirtioFeature

RAM_SIZE = 1 << 20
MESSAGE_GPA = 0x1000
REPLY_GPA = 0x2000


class EchoBackend(BackendHandler):
    """Reads what the front-end left in guest memory on each kick and answers it."""

    max_queues = 1

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self.call: _core.EventFd | None = None
        self.worker: threading.Thread | None = None
        self.log: list[str] = []

    def get_features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)

    def get_protocol_features(self) -> int:
        return int(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.CONFIG)

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        return bytes(range(offset, offset + size))

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.log.append(f"back-end mapped {len(memory)} region(s), {memory.total_size} bytes")

    def set_vring_call(self, index: int, fd: _core.EventFd | None) -> None:
        self.call = fd

    def set_vring_kick(self, index: int, fd: _core.EventFd | None) -> None:
        if fd is None:
            return
        self.worker = threading.Thread(target=self._serve_kicks, args=(fd,), daemon=True)
        self.worker.start()

    def get_vring_base(self, index: int) -> int:
        return 0

    def _serve_kicks(self, kick: _core.EventFd) -> None:
        if not kick.wait(10.0):
            return
        kick.read()
        assert self.memory is not None and self.call is not None
        raw = self.memory.read(MESSAGE_GPA, 64).rstrip(b"\0")
        self.log.append(f"back-end woke on kick, read {raw!r} from guest memory")
        self.memory.write(REPLY_GPA, raw.upper())
        self.call.write(1)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--message", default="hello from the front-end", help="text to send")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vhost-demo-") as tmp:
        path = Path(tmp) / "demo.sock"
        backend = EchoBackend()
        listener = BackendListener(path)
        session_box: list[Any] = []

        def serve() -> None:
            session = listener.accept(timeout=10)
            session_box.append(session)
            session.serve(backend)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        t0 = time.perf_counter()
        with Frontend.connect(path) as fe:
            features, proto = fe.negotiate()
            print(f"negotiated features {features:#x}, protocol features {proto!r}")
            print(f"back-end has {fe.get_queue_num()} queue(s); config[0:8] = "
                  f"{fe.get_config(0, 8).hex()}")
            ram = GuestMemory.allocate([(0, RAM_SIZE)])
            fe.set_mem_table(regions_of(ram))
            region = regions_of(ram)[0]
            print(f"shared {RAM_SIZE} bytes of memfd-backed guest RAM "
                  f"(front-end address {region.userspace_addr:#x})")
            base = region.userspace_addr
            fe.set_vring_num(0, 256)
            fe.set_vring_addr(0, VringConfig(
                queue_max_size=256, queue_size=256, flags=0,
                desc_table_addr=base + 0x10000, used_ring_addr=base + 0x12000,
                avail_ring_addr=base + 0x11000, log_addr=None))
            fe.set_vring_base(0, 0)
            kick, call = _core.EventFd(), _core.EventFd()
            fe.set_vring_call(0, call)
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)
            ram.write(MESSAGE_GPA, args.message.encode())
            print(f"front-end wrote {args.message!r} at guest address {MESSAGE_GPA:#x}; kick")
            kick.write(1)
            if not call.wait(10.0):
                print("error: the back-end never signalled the call eventfd")
                return 1
            call.read()
            reply = ram.read(REPLY_GPA, len(args.message))
            print(f"front-end woke on call, read {reply.decode()!r} at {REPLY_GPA:#x}")
            print(f"ring 0 stopped at index {fe.get_vring_base(0)}")
        server.join(5)
        listener.close()
        for line in backend.log:
            print(line)
        print(f"done in {1000 * (time.perf_counter() - t0):.1f} ms")
        return 0 if reply == args.message.upper().encode() else 1
