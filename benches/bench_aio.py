"""GET_FEATURES round trip through ``vhost.aio.Frontend`` beside the blocking one.

One connection to our native back-end (``rust/examples/null_backend.rs``, the core's
session with no Python) is driven both ways in the same run: ``await fe.get_features()``
on an asyncio loop (the socket registered with ``add_reader``, the answer fed to the core
as it arrives) and ``fe.sync.get_features()`` (the blocking facade on the same native
connection). Batches of the two take turns, so outside load falls on both alike; each
figure is the median over ``--batches`` batches of the mean over ``--n`` round trips,
after a warm-up. Run once with both processes pinned to one CPU and once unpinned, since
a cross-CPU wake-up dominates on a small VM (see ``benches/README.md``).

    python benches/bench_aio.py [--n N] [--batches B] [--cpu C] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_roundtrip as rt  # noqa: E402 - a sibling script, found through sys.path
from vhost import aio  # noqa: E402


async def measure(path: str, n: int, batches: int) -> tuple[float, float]:
    """(async ns, sync ns): medians of batch means on one connection."""
    fe = await aio.Frontend.connect(path)
    try:
        await fe.negotiate()
        sync = fe.sync

        async def async_batch() -> float:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                await fe.get_features()
            return (time.perf_counter_ns() - t0) / n

        await async_batch()  # warm-up
        rt.time_batch(sync.get_features, n)
        a, s = [], []
        for _ in range(batches):
            a.append(await async_batch())
            s.append(rt.time_batch(sync.get_features, n))
        return statistics.median(a), statistics.median(s)
    finally:
        fe.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="round trips per batch")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU of the pinned runs")
    parser.add_argument("--uvloop", action="store_true", help="run the loop on uvloop")
    args = parser.parse_args(argv)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional

        factory = uvloop.new_event_loop
    all_cpus = frozenset(os.sched_getaffinity(0))
    placements = [
        rt.Placement(f"pinned (CPU {args.cpu})", frozenset({args.cpu})),
        rt.Placement(f"free (CPUs {rt.cpus_of()})", all_cpus),
    ]
    print(f"# GET_FEATURES round trip, our native back-end; loop: "
          f"{'uvloop' if args.uvloop else 'asyncio'}; n={args.n}, batches={args.batches}; "
          "median of batch means; ratio = async / sync")  # fmt: skip
    print(f"{'placement':<24} {'async us':>9} {'sync us':>9} {'ratio':>6}")
    gc.disable()
    try:
        with tempfile.TemporaryDirectory(prefix="pv-aio-") as tmp:
            for place in placements:
                place.apply()
                with (
                    rt.spawn_peer(rt.PEER_NATIVE, place, tmp, "aio") as (path, _pid),
                    asyncio.Runner(loop_factory=factory) as runner,
                ):
                    a, s = runner.run(measure(path, args.n, args.batches))
                print(f"{place.name:<24} {a / 1000:>9.2f} {s / 1000:>9.2f} {a / s:>6.2f}")
    finally:
        gc.enable()
        os.sched_setaffinity(0, all_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
