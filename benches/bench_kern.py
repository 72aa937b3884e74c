"""Kernel vhost and vDPA throughput through our driver, in the test guest (QEMU TCG).

Run on the host: ``python benches/bench_kern.py [--seconds S]``. It boots the test guest
(tests/guest.py; build it with ``make setup``), runs this file inside with ``--in-guest``,
and prints, for each CPU placement in the guest (**pinned**: this process, and so the
vhost worker threads it creates, plus qemu-storage-daemon on guest CPU 0; **unpinned**:
both guest CPUs free):

- **vhost-net TX**: 1500-byte frames our split-ring driver puts on the TX ring of
  ``/dev/vhost-net``, attached to a tap, 64 per kick, against the reference of the same
  frames written to the tap fd with ``write()`` (the path of a VMM without vhost);
- **vDPA blk read**: 4 KiB random reads at queue depth 1 and 32 through ``VhostVdpa`` on a
  VDUSE device exported by qemu-storage-daemon, against the same reads over vhost-user
  (``vhost.devices.blk.BlkDriver``) from a qemu-storage-daemon ``vhost-user-blk`` export
  of the same image.

Under TCG absolute numbers mean little; the ratios, measured in the same guest in the same
run, are the result. Each figure is the median of ``--runs`` runs of ``--seconds``, the
cases of a comparison taking turns within each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))

BLOCK = 4096
IMAGE_MB = 64
FRAME = 1500
BATCH = 64
MARK = "BENCH-KERN-RESULT "


# --- in the guest ----------------------------------------------------------------------


def _timed(seconds: float, step: Callable[[], int]) -> float:
    """Runs ``step`` (returns units done) until ``seconds`` pass; units per second."""
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += step()
    return done / elapsed


def net_tx(seconds: float, event_idx: bool) -> float:
    from guest_kern.net import HDR_LEN, TX_BUFS, NetRig, frame  # noqa: PLC0415

    rig = NetRig.create("pvbench0", sniff_frames=False, event_idx=event_idx)
    try:
        f = frame(7, FRAME)
        for i in range(BATCH):
            rig.memory.write(TX_BUFS + i * 2048, bytes(HDR_LEN) + f)
        chain = [[(TX_BUFS + i * 2048, HDR_LEN + len(f))] for i in range(BATCH)]

        def step() -> int:
            for segs in chain:
                rig.tx.add(segs, [])
            rig.tx.publish()
            if rig.tx.kick_needed():
                rig.kicks[1].write(1)
            rig.reap(rig.tx, rig.calls[1], BATCH)
            return BATCH

        return _timed(seconds, step)
    finally:
        rig.close()


def tap_write(seconds: float) -> float:
    from guest_kern.net import frame, open_tap  # noqa: PLC0415

    tap = open_tap("pvbench1")
    try:
        f = frame(7, FRAME)

        def step() -> int:
            for _ in range(BATCH):
                os.write(tap, f)
            return BATCH

        return _timed(seconds, step)
    finally:
        os.close(tap)


def vdpa_read(node: str, seconds: float, depth: int, sectors: int) -> float:
    from guest_kern.vdpa_blk import T_IN, VdpaBlk  # noqa: PLC0415

    blk = VdpaBlk(node)
    rng = random.Random(1)
    try:

        def step() -> int:
            blk.submit([(T_IN, rng.randrange(sectors // 8) * 8, BLOCK) for _ in range(depth)])
            return depth

        return _timed(seconds, step)
    finally:
        blk.close()


def vhost_user_read(sock: str, seconds: float, depth: int, size: int) -> float:
    from vhost.devices.blk import BlkDriver, BlkRequest  # noqa: PLC0415

    rng = random.Random(1)
    with BlkDriver.connect(sock, slots=64) as disk:

        def step() -> int:
            reqs = [
                BlkRequest.read(rng.randrange(size // BLOCK) * BLOCK, BLOCK) for _ in range(depth)
            ]
            disk.submit(reqs)
            got = 0
            while got < depth:
                got += len(disk.wait())
            return depth

        return _timed(seconds, step)


def _interleaved(runs: int, cases: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Median of ``runs`` runs of each case, the cases taking turns within each run, so
    that a slow patch of the (shared, emulated) machine hits ours and the reference alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, measure in cases.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def _blk_cases(
    node: str, sock: str, seconds: float, sectors: int
) -> dict[str, Callable[[], float]]:
    """vDPA and vhost-user reads of the same image, at depth 1 and 32."""
    size = sectors * 512
    return {
        "vdpa_read_qd1": lambda: vdpa_read(node, seconds, 1, sectors),
        "vhost_user_read_qd1": lambda: vhost_user_read(sock, seconds, 1, size),
        "vdpa_read_qd32": lambda: vdpa_read(node, seconds, 32, sectors),
        "vhost_user_read_qd32": lambda: vhost_user_read(sock, seconds, 32, size),
    }


def in_guest(seconds: float, runs: int) -> dict[str, dict[str, float]]:
    from guest_kern.vdpa_blk import VdusePeer, make_image  # noqa: PLC0415

    image = Path("/tmp/bench-kern.img")
    make_image(image, IMAGE_MB << 20)
    sectors = (IMAGE_MB << 20) // 512
    results: dict[str, dict[str, float]] = {}
    all_cpus = os.sched_getaffinity(0)
    for placement, cpu in (("pinned", 0), ("unpinned", None)):
        os.sched_setaffinity(0, {0} if cpu is not None else all_cpus)
        r: dict[str, float] = {}
        r.update(
            _interleaved(
                runs,
                {
                    "net_tx_vhost": lambda: net_tx(seconds, False),
                    "net_tx_vhost_event_idx": lambda: net_tx(seconds, True),
                    "net_tx_tap_write": lambda: tap_write(seconds),
                },
            )
        )
        peer = VdusePeer(image, f"vbench{placement}", writable=False, cpu=cpu)
        sock = f"/tmp/bench-{placement}.sock"
        pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        qsd = subprocess.Popen(
            [
                *pin, "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f0,filename={image},read-only=on",
                "--export",
                f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
                "writable=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if time.monotonic() > deadline or qsd.poll() is not None:
                    raise RuntimeError("qemu-storage-daemon (vhost-user-blk) did not start")
                time.sleep(0.05)
            node = peer.node
            r.update(_interleaved(runs, _blk_cases(node, sock, seconds, sectors)))
        finally:
            qsd.terminate()
            qsd.wait(20)
            peer.close()
        results[placement] = r
    os.sched_setaffinity(0, all_cpus)
    return results


# --- on the host -------------------------------------------------------------------------


def on_host(seconds: float, runs: int) -> int:
    from guest import CHECKOUT, VENV_PYTHON, qemu_version, run_guest  # noqa: PLC0415

    script = (
        f"{VENV_PYTHON} {CHECKOUT / 'benches' / 'bench_kern.py'} --in-guest "
        f"--seconds {seconds} --runs {runs}\n"
    )
    started = time.monotonic()
    result = run_guest(script, mode="host", timeout=1800, memory_mb=2048)
    line = next((ln for ln in result.output.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        print(result.tail(80))
        print("the guest printed no result", file=sys.stderr)
        return 1
    data = json.loads(line[len(MARK) :])
    print(f"# bench_kern: {qemu_version()}, guest kernel {data['kernel']}, TCG, 2 vCPUs")
    print(f"# {seconds} s per case, median of {runs}; wall {time.monotonic() - started:.0f} s")
    print()
    print("| placement | case | ours | reference | ours / reference |")
    print("|---|---|--:|--:|--:|")
    for placement, r in data["results"].items():
        rows = [
            ("vhost-net TX, 1500 B frames/s (ref: write() to the tap)",
             r["net_tx_vhost"], r["net_tx_tap_write"]),
            ("vhost-net TX with EVENT_IDX, 1500 B frames/s (ref: write() to the tap)",
             r["net_tx_vhost_event_idx"], r["net_tx_tap_write"]),
            ("vDPA blk 4 KiB randread IOPS QD1 (ref: vhost-user, qemu-storage-daemon)",
             r["vdpa_read_qd1"], r["vhost_user_read_qd1"]),
            ("vDPA blk 4 KiB randread IOPS QD32 (ref: vhost-user, qemu-storage-daemon)",
             r["vdpa_read_qd32"], r["vhost_user_read_qd32"]),
        ]  # fmt: skip
        for name, ours, ref in rows:
            print(f"| {placement} | {name} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_guest:
        results = in_guest(args.seconds, args.runs)
        print(MARK + json.dumps({"kernel": os.uname().release, "results": results}), flush=True)
        return 0
    return on_host(args.seconds, args.runs)


if __name__ == "__main__":
    sys.exit(main())
