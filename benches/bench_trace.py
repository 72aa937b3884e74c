"""The cost of ``python -m vhost trace`` on a round trip, as a ratio.

Measures, in one run, the mean round-trip time of GET_FEATURES (12-byte request, 20-byte
reply) from ``vhost.user.Frontend`` to ``python -m vhost serve blk``:

* direct: the front-end connected to the back-end's socket;
* traced: the same, through a ``python -m vhost trace`` proxy (text output to
  /dev/null), which reads, decodes, records and forwards each message and its reply.

Each case has its own ``serve blk`` process (one session each), both connected at once,
and their batches take turns so outside load falls on both alike. Each figure is the
median over ``--batches`` batches of the mean over ``--n`` round trips, after a warm-up.
The ratio traced/direct is what the proxy adds; the absolute times depend on the machine.
Placement: unpinned (the scheduler's choice over the CPUs printed), or every process
pinned to ``--cpu C``.

    python benches/bench_trace.py [--n N] [--batches B] [--cpu C]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench_trace: {proc.args!r} did not create {path}")
        time.sleep(0.01)


@contextmanager
def process(argv: Sequence[str], wait_path: Path, cpu: int | None) -> Iterator[int]:
    """Runs ``argv`` (pinned to ``cpu`` if given) until it creates ``wait_path``."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    proc = subprocess.Popen(
        [*pin, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    try:
        _wait_for(wait_path, proc)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def batch(fe: object, n: int) -> float:
    """Mean seconds per GET_FEATURES round trip over ``n``."""
    get = fe.get_features  # type: ignore[attr-defined]
    start = time.perf_counter()
    for _ in range(n):
        get()
    return (time.perf_counter() - start) / n


def main(argv: Sequence[str] | None = None) -> int:
    from vhost.user import Frontend  # noqa: PLC0415 - after argument parsing

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips per batch")
    ap.add_argument("--batches", type=int, default=15, help="batches per case")
    ap.add_argument("--cpu", type=int, default=None, help="pin every process to this CPU")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="pv-bt-", dir="/tmp") as tmp, ExitStack() as stack:
        d = Path(tmp)
        sockets = {}
        for case in ("direct", "traced"):
            image = d / f"{case}.img"
            with open(image, "wb") as f:
                f.truncate(1 << 20)
            sock = d / f"{case}.sock"
            serve = [py, "-m", "vhost", "serve", "blk", "--image", str(image), "--socket",
                     str(sock)]
            stack.enter_context(process(serve, sock, args.cpu))
            sockets[case] = sock
        front = d / "trace.sock"
        proxy = [py, "-m", "vhost", "trace", "--listen", str(front), "--connect",
                 str(sockets["traced"])]
        stack.enter_context(process(proxy, front, args.cpu))
        fes = {
            "direct": stack.enter_context(Frontend.connect(sockets["direct"])),
            "traced": stack.enter_context(Frontend.connect(front)),
        }
        times: dict[str, list[float]] = {case: [] for case in fes}
        for fe in fes.values():
            batch(fe, max(args.n // 10, 10))  # warm-up
        gc.disable()
        for _ in range(args.batches):
            for case, fe in fes.items():
                times[case].append(batch(fe, args.n))
        gc.enable()
    direct = statistics.median(times["direct"])
    traced = statistics.median(times["traced"])
    placement = (
        f"every process pinned to CPU {args.cpu}"
        if args.cpu is not None
        else "unpinned over CPUs " + ",".join(map(str, sorted(os.sched_getaffinity(0))))
    )
    print(f"# bench_trace: GET_FEATURES round trips to serve blk, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {placement}; median of {args.batches} batches of {args.n}")
    print(f"direct   {direct * 1e6:9.2f} us")
    print(f"traced   {traced * 1e6:9.2f} us")
    print(f"ratio    {traced / direct:9.2f}x (traced / direct)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
