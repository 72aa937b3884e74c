"""What dirty page logging (live migration) costs the data path: 4 KiB randread and
randwrite at QD1 and QD32 through ``python -m vhost bench blk`` on ``serve blk`` (native
device and ``--python``) with logging off and on, and qemu-storage-daemon with logging on
as the reference, in one run.

"On" is what a migrating VMM does: ``bench blk --dirty-log`` hands the back-end a log
(``SET_LOG_BASE``, ``VHOST_F_LOG_ALL``, ``SET_VRING_ADDR`` with ``VHOST_VRING_F_LOG``) and
reads and clears it every 100 ms while the load runs, so the back-end keeps setting fresh
bits. Same image on tmpfs, same placement rules and rounds as ``bench_blk.py`` (each figure
is the median of ``--runs``; every back-end is started, warmed up, measured on every case
and stopped in turn). The cost of logging is the ratio on/off of each back-end's IOPS.

    python benches/bench_dirty_log.py [--seconds S] [--runs R] [--cpu C] [--image-mb M]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from bench_blk import (
    CASES,
    Backend,
    Samples,
    bench_blk,
    median,
    parse_args,
    qsd_argv,
    random_image,
    rounds,
)

QSD = "qsd (aio=threads)"
NATIVE = "serve blk (native)"
PYDEV = "serve blk --python"


def backends(qsd: str) -> list[tuple[Backend, tuple[bool, ...]]]:
    """Each back-end with the log settings it runs: ours off and on, the reference on."""
    py = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", "{sock}", "--image", "{image}"]
    return [
        (Backend(QSD, qsd_argv(qsd, "threads"), ("native",)), (True,)),
        (Backend(NATIVE, py, ("native",)), (False, True)),
        (Backend(PYDEV, [*py, "--python"], ("native",)), (False, True)),
    ]


def main() -> int:
    args = parse_args(__doc__)
    tmp = Path(tempfile.mkdtemp(prefix="pv-bench-dirty-", dir="/dev/shm"))
    table: dict[tuple[str, str, bool, str], Samples] = {}
    try:
        image = random_image(tmp, args.image_mb)
        sock = tmp / "blk.sock"
        logs = {be.name: on for be, on in backends(args.qsd)}
        for placement, cpu, run, be in rounds(
            args, [be for be, _ in backends(args.qsd)], image, sock
        ):
            for rw, qd in CASES:
                for log in logs[be.name]:
                    extra = ["--dirty-log"] if log else []
                    r = bench_blk(sock, cpu, "--rw", rw, "--iodepth", str(qd), "--bs", "4k",
                                  "--seconds", str(args.seconds), *extra)  # fmt: skip
                    if log and not (r["dirty_log"] or {}).get("dirty_pages"):
                        raise SystemExit(f"{be.name}: logging on but nothing logged")
                    case = f"4k {rw} QD{qd}"
                    table.setdefault((placement, be.name, log, case), Samples()).add(r)
                    state = "on " if log else "off"
                    print(f"  run {run + 1}: {be.name:20} log {state} {case:17} "
                          f"{r['iops']:9.0f} IOPS", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"| placement | case | back-end | IOPS log off | IOPS log on (median of {args.runs}) "
          "| on/off | on vs qsd on |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for placement in args.placements.split(","):
        for rw, qd in CASES:
            case = f"4k {rw} QD{qd}"
            ref = table.get((placement, QSD, True, case))
            for name in (NATIVE, PYDEV, QSD):
                off, on = (
                    table.get((placement, name, False, case)),
                    table.get((placement, name, True, case)),
                )
                if on is None:
                    continue
                off_iops = f"{median(off.iops):.0f}" if off else "-"
                ratio = f"{median(on.iops) / median(off.iops):.2f}x" if off else "-"
                vs = f"{median(on.iops) / median(ref.iops):.2f}x" if ref else "-"
                print(f"| {placement} | {case} | {name} | {off_iops} | {median(on.iops):.0f} "
                      f"({min(on.iops):.0f}-{max(on.iops):.0f}) | {ratio} | {vs} |")  # fmt: skip
    print()
    print(f"pinned: bench blk and the back-end both under taskset -c {args.cpu}; unpinned: "
          "all CPUs, the scheduler's choice. Image on tmpfs (/dev/shm), "
          f"{args.image_mb} MiB of random bytes. Logging on: the log is read and cleared "
          "every 100 ms by the bench, as a migrating VMM does.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
