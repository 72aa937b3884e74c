"""Descriptor-chain throughput of the virtqueue API from Python, beside the Rust core's.

One process, one :class:`~vhost.GuestMemory`, a ring of 256 entries with a
:class:`~vhost.virtio.Virtqueue` (driver) and a :class:`~vhost.virtio.DeviceQueue`
(device) on it. Each round the driver ``add``s a batch of chains (a 1500-byte
device-readable payload split over 1, 2 or 3 segments), ``publish``es and asks
``kick_needed``; the device ``pop_batch``es them, ``add_used_batch``es them back and asks
``needs_notification``; the driver ``poll_used``s. Device time is the device's calls,
driver time the driver's (one clock reading at each change of side), "both" the whole
loop; "+read" is the whole loop again with the device also ``read_chain``-ing every
chain's payload. For split and packed, EVENT_IDX off and on, once **pinned** (this process
on CPU ``--cpu``) and once **free** (all CPUs).

Beside them, in the same run and placement: the Python memcpy floor (one
``GuestMemory.write`` per segment of the same sizes, per chain), and the Rust example
``vring_throughput`` (``rust/examples/vring_throughput.rs``, built with cargo and run as a
subprocess, which pins itself the same way): its ring loop and its memcpy floor
(``copy_nonoverlapping`` of the same segments).

    python benches/bench_vring.py [--chains N] [--runs R] [--batch B] [--cpu C]
        [--placement both|pinned|free] [--rust-chains N] [--no-rust]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vhost import GuestMemory
from vhost.virtio import DeviceQueue, Virtqueue, place_rings

ROOT = Path(__file__).resolve().parent.parent
QUEUE_SIZE = 256
PAYLOAD = 1500
MEM_SIZE = 4 << 20
RING = 0
BUF = 0x10_0000
SLOT = 2048
SEGMENTS = (1, 2, 3)


@dataclass
class Row:
    placement: str
    cpus: str
    fmt: str
    event_idx: bool
    segments: int
    device: float
    driver: float
    both: float
    both_read: float
    memcpy: float
    rust_both: float | None = None
    rust_memcpy: float | None = None


def segment_lens(n: int) -> list[int]:
    """The payload split over ``n`` pieces, the last taking the remainder."""
    each = PAYLOAD // n
    return [each] * (n - 1) + [PAYLOAD - each * (n - 1)]


def batch_segments(batch: int, lens: Sequence[int]) -> list[list[tuple[int, int]]]:
    out = []
    for slot in range(batch):
        addr = BUF + slot * SLOT
        segs = []
        for length in lens:
            segs.append((addr, length))
            addr += length
        out.append(segs)
    return out


def make_queues(mem: GuestMemory, packed: bool, event_idx: bool) -> tuple[Virtqueue, DeviceQueue]:
    desc, avail, used = place_rings(RING, QUEUE_SIZE, packed)
    drv = Virtqueue(mem, QUEUE_SIZE, desc, avail, used, packed=packed, event_idx=event_idx)
    dev = DeviceQueue(mem, QUEUE_SIZE, desc, avail, used, packed=packed, event_idx=event_idx)
    return drv, dev


def ring_run(
    drv: Virtqueue, dev: DeviceQueue, segs: list[list[tuple[int, int]]], chains: int
) -> tuple[float, float, float]:
    """Seconds on the device side, the driver side and in all, for ``chains`` chains."""
    batch = len(segs)
    t_dev = t_drv = 0.0
    clock = time.perf_counter
    none: list[tuple[int, int]] = []
    start = clock()
    done = 0
    while done < chains:
        t0 = clock()
        for s in segs:
            drv.add(s, none)
        drv.publish()
        drv.kick_needed()
        t1 = clock()
        popped = dev.pop_batch(batch)
        dev.add_used_batch([(c.head, 0) for c in popped])
        dev.needs_notification()
        t2 = clock()
        got = drv.poll_used()
        t3 = clock()
        if len(popped) != batch or len(got) != batch:
            raise RuntimeError(f"batch of {batch}: popped {len(popped)}, used {len(got)}")
        t_drv += (t1 - t0) + (t3 - t2)
        t_dev += t2 - t1
        done += batch
    return t_dev, t_drv, clock() - start


def ring_read_run(
    drv: Virtqueue, dev: DeviceQueue, segs: list[list[tuple[int, int]]], chains: int
) -> float:
    """Seconds for ``chains`` chains with the device reading every payload (``read_chain``)."""
    batch = len(segs)
    none: list[tuple[int, int]] = []
    start = time.perf_counter()
    done = 0
    while done < chains:
        for s in segs:
            drv.add(s, none)
        drv.publish()
        drv.kick_needed()
        popped = dev.pop_batch(batch)
        for c in popped:
            dev.read_chain(c)
        dev.add_used_batch([(c.head, 0) for c in popped])
        dev.needs_notification()
        if len(drv.poll_used()) != batch:
            raise RuntimeError("poll_used came back short")
        done += batch
    return time.perf_counter() - start


def memcpy_run(mem: GuestMemory, segs: list[list[tuple[int, int]]], chains: int) -> float:
    """Seconds for ``chains`` chains' worth of ``GuestMemory.write``, one per segment."""
    data = [(addr, bytes(length)) for s in segs for addr, length in s]
    write = mem.write
    start = time.perf_counter()
    done = 0
    while done < chains:
        for addr, b in data:
            write(addr, b)
        done += len(segs)
    return time.perf_counter() - start


def rounded(chains: int, batch: int) -> int:
    return -(-chains // batch) * batch


def measure(args: argparse.Namespace, placement: str, cpus: str) -> list[Row]:
    mem = GuestMemory.allocate([(0, MEM_SIZE)])
    rows = []
    n = rounded(args.chains, args.batch)
    warm = max(args.batch, n // 10)
    for packed in (False, True):
        for event_idx in (False, True):
            for nseg in SEGMENTS:
                segs = batch_segments(args.batch, segment_lens(nseg))
                drv, dev = make_queues(mem, packed, event_idx)
                ring_run(drv, dev, segs, warm)
                ring_read_run(drv, dev, segs, warm)
                memcpy_run(mem, segs, warm)
                devs, drvs, boths, reads, cpys = [], [], [], [], []
                # The cases take turns within a run so load from elsewhere falls on all.
                for _ in range(args.runs):
                    t_dev, t_drv, t_all = ring_run(drv, dev, segs, n)
                    devs.append(n / t_dev)
                    drvs.append(n / t_drv)
                    boths.append(n / t_all)
                    reads.append(n / ring_read_run(drv, dev, segs, n))
                    cpys.append(n / memcpy_run(mem, segs, n))
                rows.append(
                    Row(
                        placement,
                        cpus,
                        "packed" if packed else "split",
                        event_idx,
                        nseg,
                        statistics.median(devs),
                        statistics.median(drvs),
                        statistics.median(boths),
                        statistics.median(reads),
                        statistics.median(cpys),
                    )
                )
    return rows


def rust_example() -> Path:
    """Builds the Rust example (release) and returns its path."""
    subprocess.run(
        [
            "cargo",
            "build",
            "--quiet",
            "-p",
            "pyvhost-core",
            "--release",
            "--example",
            "vring_throughput",
        ],
        cwd=ROOT,
        check=True,
    )
    return ROOT / "target" / "release" / "examples" / "vring_throughput"


def rust_rows(
    exe: Path, args: argparse.Namespace, placement: str
) -> dict[tuple[str, bool, int], dict[str, float]]:
    cmd = [
        str(exe),
        "--json",
        "--placement",
        placement,
        "--cpu",
        str(args.cpu),
        "--chains",
        str(args.rust_chains),
        "--batch",
        str(args.batch),
        "--runs",
        str(args.runs),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        r = json.loads(line)
        result[(r["format"], r["event_idx"], r["segments"])] = r
    return result


def cpu_list() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def run(args: argparse.Namespace) -> list[Row]:
    all_cpus = frozenset(os.sched_getaffinity(0))
    exe = None if args.no_rust else rust_example()
    placements = ["pinned", "free"] if args.placement == "both" else [args.placement]
    rows: list[Row] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for placement in placements:
            os.sched_setaffinity(0, {args.cpu} if placement == "pinned" else all_cpus)
            cpus = cpu_list()
            print(f"# {placement}: this process (pid {os.getpid()}) on CPUs {cpus}", flush=True)
            got = measure(args, placement, cpus)
            if exe is not None:
                rust = rust_rows(exe, args, placement)
                for r in got:
                    rr = rust[(r.fmt, r.event_idx, r.segments)]
                    r.rust_both = rr["both"]
                    r.rust_memcpy = rr["memcpy"]
            rows.extend(got)
    finally:
        os.sched_setaffinity(0, all_cpus)
        if gc_was:
            gc.enable()
    return rows


def mops(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.3f}"


def render(rows: Sequence[Row], args: argparse.Namespace) -> str:
    head = (
        f"# bench_vring: queue {QUEUE_SIZE}, batch {args.batch}, {PAYLOAD}-byte device-readable"
        f" payload over 1-3 segments; Python {args.chains} chains, Rust {args.rust_chains}"
        f" chains, x {args.runs} runs (median); Mchains/s (memcpy: M chains' worth of copies/s)\n"
        f"# Python {platform.python_version()} on {platform.machine()}; pinned = CPU {args.cpu}"
        " (sched_setaffinity, the Rust subprocess pins itself alike), free = all CPUs\n"
        "# py memcpy = GuestMemory.write per segment; rs memcpy = copy_nonoverlapping per"
        " segment; py/floor = py both / py memcpy; rs/py = Rust both / Python both\n"
    )
    cols = (
        f"{'place':<7} {'cpus':<5} {'format':<7} {'evidx':<5} {'segs':>4} "
        f"{'py dev':>7} {'py drv':>7} {'py both':>7} {'+read':>7} {'py cpy':>7} "
        f"{'py/flr':>6} {'rs both':>7} {'rs cpy':>7} {'rs/py':>6}\n"
    )
    lines = []
    for r in rows:
        speedup = "-" if r.rust_both is None else f"{r.rust_both / r.both:.1f}"
        lines.append(
            f"{r.placement:<7} {r.cpus:<5} {r.fmt:<7} {'on' if r.event_idx else 'off':<5} "
            f"{r.segments:>4} {mops(r.device):>7} {mops(r.driver):>7} {mops(r.both):>7} "
            f"{mops(r.both_read):>7} {mops(r.memcpy):>7} {r.both / r.memcpy:>6.3f} "
            f"{mops(r.rust_both):>7} {mops(r.rust_memcpy):>7} {speedup:>6}\n"
        )
    return head + cols + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--chains", type=int, default=20000, help="chains per Python run")
    parser.add_argument("--rust-chains", type=int, default=200000, help="chains per Rust run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="chains per batch (1-85)")
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--placement", choices=("both", "pinned", "free"), default="both")
    parser.add_argument("--no-rust", action="store_true", help="skip the Rust example")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= QUEUE_SIZE // 3:
        parser.error(f"--batch must be in 1..{QUEUE_SIZE // 3}")
    args.runs = max(1, args.runs)
    sys.stdout.write(render(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
