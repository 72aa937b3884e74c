"""4 KiB random-read and random-write IOPS of our virtio-blk driver against qemu-storage-daemon.

The driver (:class:`vhost.devices.blk.BlkDriver`, this process) plays the guest; the real
qemu-storage-daemon serves a raw image on tmpfs (``/dev/shm``), so the disk costs almost
nothing and the figures measure the data path: ring handling, notifications (kick and
call eventfds, EVENT_IDX suppression) and the daemon's request handling. Each case runs
for ``--seconds`` at queue depth 1 and 32, once **pinned** (this process
``sched_setaffinity``'d to CPU ``--cpu``, the daemon started under ``taskset -c`` on the
same CPU) and once **unpinned** (all CPUs, the scheduler's choice). Every figure is the
median of ``--runs`` runs. Beside them, the memcpy floor of the same bytes: a 4 KiB
``bytes`` copy, and a 4 KiB ``GuestMemory.write`` + ``read`` (what the driver does per
I/O at the least), in the same placement.

    python benches/bench_blk.py [--seconds S] [--runs R] [--cpu C] [--image-mb M]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vhost import GuestMemory
from vhost.devices.blk import BlkDriver, BlkRequest

BLOCK = 4096
START_TIMEOUT = 30.0


def cpus_of(pid: int) -> str:
    """The CPUs a process may run on, as the kernel lists them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def qsd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "?"


@contextlib.contextmanager
def qemu_storage_daemon(
    binary: str, image: Path, sock: Path, cpu: int | None
) -> Iterator[subprocess.Popen[bytes]]:
    argv = [
        binary,
        "--blockdev",
        f"driver=file,node-name=f0,filename={image},cache.direct=off",
        "--export",
        f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on",
    ]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.is_socket():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"qemu-storage-daemon exited: {err}")
            if time.monotonic() > deadline:
                raise SystemExit("qemu-storage-daemon did not create its socket")
            time.sleep(0.01)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Result:
    iops: float
    kicks_per_io: float
    calls_per_io: float


def run_io(disk: BlkDriver, write: bool, depth: int, seconds: float, blocks: int) -> Result:
    """Keeps ``depth`` 4 KiB requests at random block offsets in flight for ``seconds``."""
    rng = random.Random(42)
    payload = os.urandom(BLOCK)

    def request() -> BlkRequest:
        offset = rng.randrange(blocks) * BLOCK
        return BlkRequest.write(offset, payload) if write else BlkRequest.read(offset, BLOCK)

    # warm-up
    disk.submit([request() for _ in range(depth)])
    while disk.in_flight:
        disk.wait()
    kicks0, calls0 = disk.kicks, disk.wakeups
    done = 0
    gc.disable()
    try:
        start = time.perf_counter()
        end = start + seconds
        disk.submit([request() for _ in range(depth)])
        while True:
            completions = disk.wait()
            for c in completions:
                if c.status:
                    c.check()
            done += len(completions)
            now = time.perf_counter()
            if now >= end:
                break
            disk.submit([request() for _ in completions])
        elapsed = now - start
        while disk.in_flight:
            disk.wait()
    finally:
        gc.enable()
    return Result(
        done / elapsed,
        (disk.kicks - kicks0) / max(done, 1),
        (disk.wakeups - calls0) / max(done, 1),
    )


def floor_copy(seconds: float) -> float:
    """4 KiB ``bytes`` copies per second."""
    src = bytearray(os.urandom(BLOCK))
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            bytes(src)
        n += 1000
    return n / seconds


def floor_guest_memory(seconds: float) -> float:
    """4 KiB ``GuestMemory.write`` + ``read`` pairs per second."""
    mem = GuestMemory.allocate([(0, 1 << 21)])
    buf = os.urandom(BLOCK)
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for i in range(1000):
            gpa = (i & 255) * BLOCK
            mem.write(gpa, buf)
            mem.read(gpa, BLOCK)
        n += 1000
    return n / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=3.0, help="per case and run")
    ap.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--cpu", type=int, default=0, help="the CPU of the pinned placement")
    ap.add_argument("--image-mb", type=int, default=256, help="image size on /dev/shm")
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon") or "qemu-storage-daemon")
    ap.add_argument("--depths", default="1,32")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    all_cpus = os.sched_getaffinity(0)

    print(f"machine: {os.cpu_count()} cpus, kernel {platform.release()}, "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"peer: {qsd_version(args.qsd)}")
    tmp = Path(tempfile.mkdtemp(prefix="pv-bench-blk-", dir="/dev/shm"))
    rows: list[tuple[str, str, str, str]] = []
    try:
        image = tmp / "disk.img"
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.image_mb):
                f.write(chunk)
        blocks = args.image_mb * (1 << 20) // BLOCK
        sock = tmp / "blk.sock"
        for placement, cpu in (("pinned", args.cpu), ("unpinned", None)):
            os.sched_setaffinity(0, {cpu} if cpu is not None else all_cpus)
            with (
                qemu_storage_daemon(args.qsd, image, sock, cpu) as qsd,
                BlkDriver.connect(sock, queue_size=128) as disk,
            ):
                where = (f"us pid {os.getpid()} on CPUs {cpus_of(os.getpid())}, "
                         f"qsd pid {qsd.pid} on CPUs {cpus_of(qsd.pid)}")  # fmt: skip
                print(f"{placement}: {where}; event_idx={disk.event_idx}, "
                      f"queue size {disk.queue_size}")  # fmt: skip
                for depth in depths:
                    for name, write in (("randread", False), ("randwrite", True)):
                        res = [
                            run_io(disk, write, depth, args.seconds, blocks)
                            for _ in range(args.runs)
                        ]
                        iops = statistics.median(r.iops for r in res)
                        lo, hi = min(r.iops for r in res), max(r.iops for r in res)
                        kicks = statistics.median(r.kicks_per_io for r in res)
                        calls = statistics.median(r.calls_per_io for r in res)
                        rows.append(
                            (
                                placement,
                                f"4k {name} QD{depth}",
                                f"{iops:10.0f}  ({lo:.0f}-{hi:.0f})",
                                f"{1e6 / iops:7.1f} us/IO  kicks/IO {kicks:.2f}  "
                                f"calls/IO {calls:.2f}",
                            )
                        )
                        print("  " + "  ".join(rows[-1][1:]), flush=True)
                copy = statistics.median(floor_copy(1.0) for _ in range(args.runs))
                gm = statistics.median(floor_guest_memory(1.0) for _ in range(args.runs))
                rows.append((placement, "floor: 4k bytes copy", f"{copy:10.0f}",
                             f"{1e6 / copy:7.3f} us/op"))  # fmt: skip
                rows.append((placement, "floor: 4k GuestMemory write+read", f"{gm:10.0f}",
                             f"{1e6 / gm:7.3f} us/op"))  # fmt: skip
    finally:
        os.sched_setaffinity(0, all_cpus)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"| placement | case | ops/s (median of {args.runs}; range) | per op |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2].strip()} | {r[3].strip()} |")
    print()
    print(f"pinned: this process and qemu-storage-daemon both on CPU {args.cpu} "
          "(sched_setaffinity / taskset -c); unpinned: all CPUs, the scheduler's choice. "
          "Image on tmpfs (/dev/shm).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
