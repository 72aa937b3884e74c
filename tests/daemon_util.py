"""Shared helpers for the daemon tests (issue 4): run ``python -m vhost serve blk`` as a
subprocess and count its fds, and a small virtio-blk "guest" that owns its memory and
rings (so it can drive any queue, and reconnect with the same rings, which
:class:`~vhost.devices.blk.BlkDriver` cannot).
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vhost import EventFd, GuestMemory
from vhost.codes import ProtocolFeature as PF
from vhost.devices.blk import BlkDriver
from vhost.errors import VhostTimeoutError
from vhost.user import Frontend, regions_of
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue

SECTOR = 512
MiB = 1 << 20
OUTHDR = struct.Struct("<IIQ")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
START_TIMEOUT = 30.0


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> bool:
    """Polls ``pred`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return pred()
        time.sleep(step)
    return True


# -- serve blk as a subprocess ----------------------------------------------------------


class ServeProc:
    """``python -m vhost serve ...`` in a subprocess; ready once it printed its banner
    (``serving ...``; ``waiting for a front-end ...`` with ``--client``)."""

    def __init__(self, args: Sequence[str], socket_path: Path, log: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log
        self._log: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhost", "serve", *args, "--socket", str(socket_path)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith((b"serving", b"waiting")):
            self.close()
            raise AssertionError(f"serve did not start: {line!r} {self.stderr()}")
        self.banner = line.decode()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_targets(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            with suppress(OSError):
                out.append(f"{name}->{os.readlink(f'/proc/{self.pid}/fd/{name}')}")
        return sorted(out)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def settle_fds(self, expected: int, timeout: float = 5.0) -> int:
        """The fd count, once it fell back to ``expected`` (sessions end asynchronously)."""
        wait_for(lambda: self.fd_count() <= expected, timeout)
        return self.fd_count()

    def idle_fds(self, quiet: float = 0.3, timeout: float = 10.0) -> int:
        """The fd count once it has not changed for ``quiet`` seconds (a session that
        just ended is still being torn down): the baseline for leak checks."""
        deadline = time.monotonic() + timeout
        last, since = self.fd_count(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            n = self.fd_count()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def catches(self, sig: int) -> bool:
        """Whether the process has a handler installed for ``sig`` (SigCgt)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        return False

    def stderr(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Sends ``sig`` once the process handles SIGTERM (``serve`` prints its banner a
        moment before it installs the handler) and returns the exit status."""
        wait_for(lambda: self.catches(signal.SIGTERM))
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def make_image(path: Path, size: int, seed: int | None = None) -> bytes:
    """An image file of ``size`` bytes (random when ``seed`` is given); returns its bytes."""
    data = bytes(size) if seed is None else random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


# -- a virtio-blk guest with its own memory and rings -----------------------------------

RING_AREA = 64 * 1024  # per queue: rings, request headers and status bytes
DATA_BASE = 4 * MiB
DATA_PER_QUEUE = 1 * MiB


@dataclass
class Result:
    head: int
    used_len: int
    status: int
    data: bytes


@dataclass
class _Pending:
    slot: int
    in_len: int
    tag: object


class BlkGuest:
    """Guest memory with ``queues`` virtqueues of ``size`` entries, for a virtio-blk
    back-end; :meth:`attach` hands it all to a front-end connection (and may be called
    again on a new connection: same memory, same rings, the ring state kept here)."""

    def __init__(
        self, queues: int, *, size: int = 64, packed: bool = False, event_idx: bool = False
    ) -> None:
        self.size = size
        self.packed = packed
        self.event_idx = event_idx
        self.memory = GuestMemory.allocate([(0, DATA_BASE + queues * DATA_PER_QUEUE)])
        self.vqs: list[Virtqueue] = []
        for q in range(queues):
            desc, avail, used = place_rings(q * RING_AREA, size, packed=packed)
            self.vqs.append(
                Virtqueue(self.memory, size, desc, avail, used, packed=packed, event_idx=event_idx)
            )
        self.kicks = [EventFd() for _ in range(queues)]
        self.calls = [EventFd() for _ in range(queues)]
        self.pending: list[dict[int, _Pending]] = [{} for _ in range(queues)]
        self.free: list[list[int]] = [list(range(32)) for _ in range(queues)]
        self.fe: Frontend | None = None

    def features(self, offered: int) -> int:
        drop = 0
        if not self.event_idx:
            drop |= VirtioFeature.RING_EVENT_IDX
        if not self.packed:
            drop |= VirtioFeature.RING_PACKED
        return offered & ~int(drop)

    def attach(
        self,
        fe: Frontend,
        *,
        bases: Sequence[int] | None = None,
        queues: Sequence[int] | None = None,
    ) -> None:
        """Negotiates, shares the memory and sets the rings up (``bases``: SET_VRING_BASE
        values, by default those of fresh rings)."""
        offered = fe.get_features()
        fe.negotiate(
            features=self.features(offered),
            protocol_features=int(
                PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
                | PF.STATUS
            ),
            packed=self.packed,
            event_idx=self.event_idx,
        )
        fe.set_mem_table(regions_of(self.memory))
        for q in range(len(self.vqs)) if queues is None else queues:
            base = None if bases is None else bases[q]
            setup_queue(fe, q, self.memory, self.vqs[q], self.kicks[q], self.calls[q], base=base)
        self.fe = fe

    def close(self) -> None:
        for e in (*self.kicks, *self.calls):
            e.close()

    # requests ---------------------------------------------------------------------------

    def _meta(self, q: int, slot: int) -> int:
        return q * RING_AREA + 32 * 1024 + slot * 32

    def _data(self, q: int, slot: int) -> int:
        return DATA_BASE + q * DATA_PER_QUEUE + slot * (DATA_PER_QUEUE // 32)

    def add(
        self,
        q: int,
        kind: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        segment: int = 4096,
        tag: object = None,
    ) -> int:
        """Places one request on queue ``q`` (not published); returns its head."""
        slot = self.free[q].pop()
        meta, data = self._meta(q, slot), self._data(q, slot)
        self.memory.write(meta, OUTHDR.pack(kind, 0, sector) + b"\xff")
        readable = [(meta, 16)]
        writable: list[tuple[int, int]] = []
        if out:
            self.memory.write(data, out)
            pieces = range(0, len(out), segment)
            readable += [(data + o, min(segment, len(out) - o)) for o in pieces]
        if in_len:
            writable += [(data + o, min(segment, in_len - o)) for o in range(0, in_len, segment)]
        writable.append((meta + 16, 1))
        head = self.vqs[q].add(readable, writable)
        self.pending[q][head] = _Pending(slot, in_len, tag)
        return head

    def add_raw(
        self, q: int, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]
    ) -> int:
        """Places a chain of the caller's own segments (not a blk request)."""
        return self.vqs[q].add(list(readable), list(writable))

    def data_area(self, q: int) -> int:
        """Guest address of queue ``q``'s data area (``DATA_PER_QUEUE`` bytes), for
        :meth:`add_raw` chains; blk requests use it too, so do not mix them."""
        return DATA_BASE + q * DATA_PER_QUEUE

    def kick(self, q: int, *, force: bool = False) -> None:
        self.vqs[q].publish()
        if force or self.vqs[q].kick_needed():
            self.kicks[q].write(1)

    def reap(self, q: int, want: int, timeout: float = 10.0) -> list[tuple[Result, object]]:
        """Waits for ``want`` completions on queue ``q``."""
        vq = self.vqs[q]
        out: list[tuple[Result, object]] = []
        deadline = time.monotonic() + timeout
        while len(out) < want:
            used = vq.poll_used()
            for head, n in used:
                p = self.pending[q].pop(head, None)
                if p is None:  # an add_raw chain
                    out.append((Result(head, n, -1, b""), None))
                    continue
                meta, data = self._meta(q, p.slot), self._data(q, p.slot)
                status = self.memory.read(meta + 16, 1)[0]
                got = self.memory.read(data, p.in_len) if p.in_len else b""
                self.free[q].append(p.slot)
                out.append((Result(head, n, status, got), p.tag))
            if used:
                continue
            if vq.set_used_notification(True):
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VhostTimeoutError(f"queue {q}: {len(out)} of {want} completions")
            if self.calls[q].wait(min(remaining, 0.5)):
                self.calls[q].try_read()
        return out

    def request(self, q: int, kind: int, sector: int = 0, **kw: object) -> Result:
        self.add(q, kind, sector, **kw)  # type: ignore[arg-type]
        self.kick(q)
        ((r, _),) = self.reap(q, 1)
        return r

    def write(self, q: int, offset: int, data: bytes) -> int:
        return self.request(q, T_OUT, offset // SECTOR, out=data).status

    def read(self, q: int, offset: int, length: int) -> tuple[int, bytes]:
        r = self.request(q, T_IN, offset // SECTOR, in_len=length)
        return r.status, r.data


# -- shared data checks -------------------------------------------------------------------


def check_roundtrip(
    driver: BlkDriver, image: Path, seed: int, *, readback: Callable[[], bytes] | None = None
) -> None:
    """Random data at several offsets (first and last sector, unaligned to 4 KiB, a
    multi-segment request) lands byte-exact in the image file and reads back; the bytes
    around it are untouched."""
    size = driver.size
    rng = random.Random(seed)
    before = bytearray(image.read_bytes() if readback is None else readback())
    assert len(before) == size
    writes = {
        0: rng.randbytes(SECTOR),
        7 * 4096 + SECTOR: rng.randbytes(3 * SECTOR),
        MiB: rng.randbytes(200 * 1024),  # several 32 KiB segments, two requests
        size - SECTOR: rng.randbytes(SECTOR),
    }
    expected = bytearray(before)
    for off, data in writes.items():
        driver.write(off, data)
        expected[off : off + len(data)] = data
    driver.flush()
    after = image.read_bytes() if readback is None else readback()
    assert after == expected
    for off, data in writes.items():
        assert driver.read(off, len(data)) == data
    assert driver.read(4096, 4096) == expected[4096:8192]
