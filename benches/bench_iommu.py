"""The cost of translation: 4 KiB randread IOPS of ``serve blk`` with a flat memory table
against ``serve blk --iommu`` behind the IOMMU that ``python -m vhost bench blk --iommu``
plays (issue 14), in one run, as a ratio iommu/flat.

Cases, each at QD1 and QD32:
- **flat**: ``bench blk`` on ``serve blk`` (no ``VIRTIO_F_ACCESS_PLATFORM``);
- **iommu**: ``bench blk --iommu`` on ``serve blk --iommu``: 4 KiB IOMMU pages, nothing
  mapped up front (``--iommu-prefill none``, the default), so every page the back-end
  touches first is an IOTLB miss answered by the load generator's responder thread; after
  that, each access of the back-end goes through its IOTLB view: the steady-state cost of
  translation (the misses, a few dozen per run, are counted);
- **iommu 2M**: the same with 2 MiB IOMMU pages: a handful of IOTLB entries instead of one
  per 4 KiB page, so fewer misses and a smaller table to search;
- **cold**: the same with ``--iommu-strict``: each request's data page is unmapped
  (``IOTLB_MSG`` invalidate) when it completes, so the next request on that slot misses
  again: the cost of a miss (and of the unmap) on every request, as a guest in strict IOMMU
  mode pays it.

The two back-ends take turns in every round (each started, warmed up, measured on its
cases, stopped), on the same image of random bytes on tmpfs, pinned (``bench blk`` and the
back-end under ``taskset -c CPU``) and unpinned, as ``bench_blk.py`` does. Each ratio is
taken within a round (iommu and flat measured minutes apart at most), then the median and
range over ``--runs`` rounds are printed, and beside them the ratio of the best rounds
(other load on a shared machine only ever lowers IOPS, so the best round of each case is
its least disturbed estimate).

    python benches/bench_iommu.py [--seconds S] [--runs R] [--cpu C] [--image-mb M]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_blk import Backend, bench_blk, median, parse_args, random_image, rounds

FLAT = "serve blk"
IOMMU = "serve blk --iommu"
DEPTHS = (1, 32)
# Case name -> (back-end, extra bench blk arguments).
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "flat": (FLAT, ()),
    "iommu": (IOMMU, ("--iommu",)),
    "iommu 2M": (IOMMU, ("--iommu", "--iommu-page", "2M")),
    "cold": (IOMMU, ("--iommu", "--iommu-strict")),
}


def backends() -> list[Backend]:
    """Our daemon without and with ``--iommu``."""
    py = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", "{sock}", "--image", "{image}"]
    return [Backend(FLAT, py, ("native",)), Backend(IOMMU, [*py, "--iommu"], ("native",))]


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)``."""
    if not xs:
        return "-"
    lo, mid, hi = min(xs), statistics.median(xs), max(xs)
    return f"{fmt.format(mid)} ({fmt.format(lo)}-{fmt.format(hi)})"


def main() -> int:
    args = parse_args(__doc__)
    tmp = Path(tempfile.mkdtemp(prefix="pv-bench-iommu-", dir="/dev/shm"))
    # (placement, case, depth) -> per-round results
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    try:
        image = random_image(tmp, args.image_mb)
        sock = tmp / "blk.sock"
        for placement, cpu, run, be in rounds(args, backends(), image, sock):
            for case, (back_end, extra) in CASES.items():
                if back_end != be.name:
                    continue
                for qd in DEPTHS:
                    r = bench_blk(sock, cpu, "--rw", "randread", "--bs", "4k", "--iodepth",
                                  str(qd), "--seconds", str(args.seconds), *extra)  # fmt: skip
                    results.setdefault((placement, case, qd), []).append(r)
                    misses = r["iotlb_misses"]
                    tail = f", {misses} IOTLB misses" if misses is not None else ""
                    print(f"  run {run + 1}: {case:8} QD{qd:<2} {r['iops']:9.0f} IOPS{tail}",
                          flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    columns = ["placement", "case", "QD", f"IOPS median (range) of {args.runs}",
               "iommu/flat, per round", "best/best", "IOTLB misses per I/O", "driver CPU us/IO",
               "p50 / p99 us"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for placement in args.placements.split(","):
        for qd in DEPTHS:
            flat = results.get((placement, "flat", qd), [])
            for case in CASES:
                rs = results.get((placement, case, qd), [])
                if not rs:
                    continue
                iops = [r["iops"] for r in rs]
                ratios = [r["iops"] / f["iops"] for r, f in zip(rs, flat, strict=False)]
                best = max(iops) / max((f["iops"] for f in flat), default=float("nan"))
                per_io = [r["iotlb_misses"] / max(r["ios"], 1) for r in rs
                          if r["iotlb_misses"] is not None]  # fmt: skip
                driver_us = median([r["driver_cpu_seconds"] * 1e6 / max(r["ios"], 1) for r in rs])
                p50 = median([r["latency_ns"]["p50"] / 1e3 for r in rs])
                p99 = median([r["latency_ns"]["p99"] / 1e3 for r in rs])
                print(f"| {placement} | {case} | {qd} | {spread(iops, '{:.0f}')} | "
                      f"{spread(ratios) if case != 'flat' else '1'} | {best:.2f} | "
                      f"{spread(per_io, '{:.4f}')} | {driver_us:.2f} | "
                      f"{p50:.0f} / {p99:.0f} |")  # fmt: skip
    print()
    for placement in args.placements.split(","):
        flat1 = results.get((placement, "flat", 1), [])
        cold1 = results.get((placement, "cold", 1), [])
        if flat1 and cold1:
            extra_us = [
                (1e6 / c["iops"] - 1e6 / f["iops"]) for c, f in zip(cold1, flat1, strict=False)
            ]
            print(f"{placement}: a cold-IOTLB request at QD1 (unmap + miss + update) costs "
                  f"{spread(extra_us, '{:.1f}')} us more than a flat one")  # fmt: skip
    print()
    print(
        f"pinned: bench blk and the back-end both under taskset -c {args.cpu}; unpinned: "
        "all CPUs, the scheduler's choice. Image on tmpfs (/dev/shm), "
        f"{args.image_mb} MiB of random bytes; 4 KiB randread, {args.seconds} s a case."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
