"""4 KiB random-read and random-write IOPS of vhost-user-blk back-ends, measured with
``python -m vhost bench blk``: qemu-storage-daemon (the reference: its default
``aio=threads`` file driver, and ``aio=io_uring``), our native
``serve blk`` and our Python device path (``serve blk --python``), and the load generator's
native loop beside the old Python-loop driver.

All back-ends serve the same raw image on tmpfs (``/dev/shm``, filled with random bytes),
so the disk costs almost nothing and the figures measure the data path. Each case (4 KiB
randread and randwrite at queue depth 1 and 32) runs for ``--seconds``, once **pinned**
(``bench blk`` and the back-end both under ``taskset -c CPU``) and once **unpinned** (all
CPUs, the scheduler's choice). Every figure is the median of ``--runs`` rounds; in each
round every back-end is started, warmed up, measured on every case and stopped in turn, so
load from elsewhere falls on all of them alike. Ratios are against qemu-storage-daemon
with the same load engine in the same placement; "driver CPU" is the CPU time the load
loop itself used per I/O (the rest of a pinned CPU went to the back-end and the kernel).

    python benches/bench_blk.py [--seconds S] [--runs R] [--cpu C] [--image-mb M]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
REFERENCE = "qsd (aio=threads)"
REFERENCE_URING = "qsd (aio=io_uring)"
NATIVE = "serve blk (native)"
PYDEV = "serve blk --python"
CASES = [(rw, qd) for qd in (1, 32) for rw in ("randread", "randwrite")]


@dataclass(frozen=True)
class Backend:
    name: str
    argv: list[str]  # {image} and {sock} are substituted
    engines: tuple[str, ...]


def qsd_argv(qsd: str, aio: str) -> list[str]:
    return [
        qsd,
        "--blockdev",
        f"driver=file,node-name=f0,filename={{image}},cache.direct=off,aio={aio}",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on",
    ]


def backends(qsd: str) -> list[Backend]:
    """The reference first (its default ``aio=threads``), then its io_uring mode (faster
    here), then ours."""
    py = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", "{sock}", "--image", "{image}"]
    return [
        Backend(REFERENCE, qsd_argv(qsd, "threads"), ("native", "python")),
        Backend(REFERENCE_URING, qsd_argv(qsd, "io_uring"), ("native",)),
        Backend(NATIVE, py, ("native", "python")),
        Backend(PYDEV, [*py, "--python"], ("native",)),
    ]


def cpus_of(pid: int) -> str:
    """The CPUs a process may run on, as the kernel lists them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "?"


@contextlib.contextmanager
def running(backend: Backend, image: Path, sock: Path, cpu: int | None) -> Iterator[int]:
    argv = [a.replace("{image}", str(image)).replace("{sock}", str(sock)) for a in backend.argv]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.is_socket():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"{backend.name} exited: {err}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{backend.name} did not create its socket")
            time.sleep(0.01)
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_blk(sock: Path, cpu: int | None, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "vhost", "bench", "blk", "--socket", str(sock), "--json", *args]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench blk failed ({' '.join(argv)}): {out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@dataclass
class Samples:
    iops: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)

    def add(self, r: dict[str, Any]) -> None:
        self.iops.append(r["iops"])
        self.cpu_us.append(r["driver_cpu_seconds"] * 1e6 / max(r["ios"], 1))
        if r["latency_ns"] is not None:
            self.p50_us.append(r["latency_ns"]["p50"] / 1000)
            self.p99_us.append(r["latency_ns"]["p99"] / 1000)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_args(doc: str | None) -> argparse.Namespace:
    """The options every blk benchmark takes (this one and ``bench_dirty_log.py``); prints
    the machine and the reference's version."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--seconds", type=float, default=2.0, help="per case and run")
    ap.add_argument("--runs", type=int, default=3, help="rounds (median reported)")
    ap.add_argument("--cpu", type=int, default=0, help="the CPU of the pinned placement")
    ap.add_argument("--image-mb", type=int, default=256, help="image size on /dev/shm")
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon") or "qemu-storage-daemon")
    ap.add_argument("--placements", default="pinned,unpinned")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cpus, kernel {platform.release()}, "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"reference: {version(args.qsd)}")
    return args


def random_image(directory: Path, mib: int) -> Path:
    """A raw image of ``mib`` MiB of random bytes in ``directory``."""
    image = directory / "disk.img"
    with open(image, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(chunk)
    return image


def rounds(
    args: argparse.Namespace, backs: list[Backend], image: Path, sock: Path
) -> Iterator[tuple[str, int | None, int, Backend]]:
    """Every placement, ``--runs`` rounds, every back-end in turn: started, warmed up and
    yielded (placement, pinned CPU or None, round, back-end) while it serves ``sock``."""
    for placement in args.placements.split(","):
        cpu = args.cpu if placement == "pinned" else None
        for run in range(args.runs):
            for be in backs:
                with running(be, image, sock, cpu) as pid:
                    bench_blk(sock, cpu, "--seconds", "0.3")  # warm-up
                    if run == 0:
                        print(f"{placement}: {be.name} pid {pid} on CPUs {cpus_of(pid)}; "
                              f"bench blk on CPUs {cpu if cpu is not None else 'all'}",
                              flush=True)  # fmt: skip
                    yield placement, cpu, run, be


def main() -> int:
    args = parse_args(__doc__)
    tmp = Path(tempfile.mkdtemp(prefix="pv-bench-blk-", dir="/dev/shm"))
    table: dict[tuple[str, str, str, str], Samples] = {}
    try:
        image = random_image(tmp, args.image_mb)
        sock = tmp / "blk.sock"
        for placement, cpu, run, be in rounds(args, backends(args.qsd), image, sock):
            for engine in be.engines:
                for rw, qd in CASES:
                    r = bench_blk(sock, cpu, "--rw", rw, "--iodepth", str(qd), "--bs", "4k",
                                  "--seconds", str(args.seconds), "--engine", engine)  # fmt: skip
                    key = (placement, be.name, engine, f"4k {rw} QD{qd}")
                    table.setdefault(key, Samples()).add(r)
                    line = f"{be.name:20} {engine:6} {rw:9} QD{qd:<2}"
                    print(f"  run {run + 1}: {line} {r['iops']:9.0f} IOPS", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"| placement | back-end | load engine | case | IOPS (median of {args.runs}; range) "
          "| vs qsd | driver CPU us/IO | p50 / p99 us |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (placement, be_name, engine, case), s in table.items():
        ref = table.get((placement, REFERENCE, engine, case))
        ratio = median(s.iops) / median(ref.iops) if ref else float("nan")
        lat = f"{median(s.p50_us):.0f} / {median(s.p99_us):.0f}" if s.p50_us else "-"
        print(f"| {placement} | {be_name} | {engine} | {case} | {median(s.iops):.0f} "
              f"({min(s.iops):.0f}-{max(s.iops):.0f}) | {ratio:.2f}x | "
              f"{median(s.cpu_us):.2f} | {lat} |")  # fmt: skip
    print()
    for placement in args.placements.split(","):
        for case in ("4k randread QD32", "4k randwrite QD32"):
            q, u, n, p, old = (
                table.get((placement, be, engine, case))
                for be, engine in (
                    (REFERENCE, "native"),
                    (REFERENCE_URING, "native"),
                    (NATIVE, "native"),
                    (PYDEV, "native"),
                    (REFERENCE, "python"),
                )
            )
            if q and u and n and p and old:
                best = max(median(q.iops), median(u.iops))
                print(f"{placement} {case}: native/qsd {median(n.iops) / best:.2f}x against "
                      "the faster qsd mode (goal >= 1.5x); python device/native "
                      f"{median(p.iops) / median(n.iops):.2f}x (goal >= 0.3x); on qsd the "
                      f"native loop drives {median(q.iops) / median(old.iops):.2f}x the "
                      "Python-loop driver's IOPS")  # fmt: skip
    print()
    print(f"pinned: bench blk and the back-end both under taskset -c {args.cpu}; unpinned: "
          "all CPUs, the scheduler's choice. Image on tmpfs (/dev/shm), "
          f"{args.image_mb} MiB of random bytes.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
