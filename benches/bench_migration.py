"""How long QEMU takes to live-migrate a guest whose disk is on ``serve blk`` (native device
and ``--python``) against the same guest on qemu-storage-daemon, in one run.

Each run boots the self-contained workload guest of ``tests/migration.py`` on back-end A,
migrates it at QEMU's default speed (no bandwidth cap, unlike the test, which slows the
precopy so that it spans the workload) to a second QEMU on back-end B serving the same
image, and checks every workload iteration on the destination. Back-ends take turns, run
after run; each figure is the median over ``--runs`` of QEMU's ``query-migrate`` total time
and downtime. Guests run under TCG on this machine's CPUs, unpinned (QEMU's own threads).

    python benches/bench_migration.py [--runs R]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import migration
from daemon_util import ServeProc
from peers import make_image, qemu_storage_daemon_blk

BACKENDS = ("qemu-storage-daemon", "serve blk", "serve blk --python")


@contextlib.contextmanager
def _pair(kind: str, image: Path, work: Path) -> Iterator[tuple[Path, Path]]:
    """Back-ends A and B on one image (no image locks: both serve it at once)."""
    if kind == "qemu-storage-daemon":
        with (
            qemu_storage_daemon_blk(image, work / "a.sock", locking=False) as a,
            qemu_storage_daemon_blk(image, work / "b.sock", locking=False) as b,
        ):
            yield a.socket_path, b.socket_path
        return
    args = ["blk", "--image", str(image), "--no-lock"]
    if kind.endswith("--python"):
        args.append("--python")
    first = ServeProc(args, work / "a.sock", work / "a.log")
    try:
        second = ServeProc(args, work / "b.sock", work / "b.log")
        try:
            yield first.socket_path, second.socket_path
        finally:
            second.close()
    finally:
        first.close()


def one_run(kind: str) -> migration.MigrationReport:
    work = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))  # short: Unix socket paths
    try:
        image = make_image(work / "disk.img", migration.IMAGE_BYTES)
        with _pair(kind, image, work) as (a, b):
            return migration.migrate_mid_io(image, a, b, work, bandwidth=None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="migrations per back-end")
    args = parser.parse_args()
    totals: dict[str, list[int]] = {k: [] for k in BACKENDS}
    downtimes: dict[str, list[int]] = {k: [] for k in BACKENDS}
    for _ in range(args.runs):
        for kind in BACKENDS:
            report = one_run(kind)
            print(f"# {kind}: {report.summary()}", flush=True)
            totals[kind].append(report.total_time_ms)
            downtimes[kind].append(report.downtime_ms)
    print(f"# {os.cpu_count()} CPUs, QEMU TCG guests unpinned; medians of {args.runs} runs")
    print("| back-end | total ms | x qsd | downtime ms | total range |")
    print("|---|--:|--:|--:|--:|")
    reference = statistics.median(totals["qemu-storage-daemon"])
    for kind in BACKENDS:
        total = statistics.median(totals[kind])
        print(
            f"| {kind} | {total:.0f} | {total / reference:.2f} | "
            f"{statistics.median(downtimes[kind]):.0f} | "
            f"{min(totals[kind])}-{max(totals[kind])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
