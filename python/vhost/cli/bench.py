"""``bench blk``: a virtio-blk load generator for any vhost-user-blk back-end.

``python -m vhost bench blk --socket S [--rw read|write|randread|randwrite] [--bs BYTES]
[--iodepth N] [--seconds S] [--json] [--verify]`` connects as the front-end, plays the
guest's virtio-blk driver on queue 0 and keeps ``--iodepth`` requests of ``--bs`` bytes in
flight for ``--seconds`` (or ``--ios`` requests), then reports IOPS, bandwidth and latency
percentiles. The loop is native (:class:`vhost._core.BlkLoad`, no GIL), so a fast
back-end, not the load generator, is what is measured; ``--engine python`` runs the same
load through :class:`~vhost.devices.blk.BlkDriver`'s Python API instead, for comparison.

``--verify`` checks data, not only speed. Every 8-byte word written carries
``splitmix64(offset ^ (generation << 40))``: a hash of its absolute byte offset on the
disk and of a generation number. The run has three phases: the region is first written
with generation ``G`` (``--generation``, default 1; ``--no-fill`` skips this when an
earlier run left it there), then the timed job runs, its reads checked against ``G`` and
its writes carrying ``G + 1``; finally the whole region is read back and each sector must
hold ``G + 1`` if the job wrote it and ``G`` otherwise. A mismatch exits with status 3,
a request the device failed (or a write to a read-only device) with status 2, bad
arguments or an unreachable back-end with 1, Ctrl-C (checked every 100 ms by the native
loop) with 130. The fill writes, so ``--verify`` on a read-only device needs
``--no-fill`` (status 2 otherwise, before anything is sent). A back-end that exits or
closes the connection ends the run at once (status 2), not after ``--timeout``.

The ring is fitted to the back-end: without ``--queue-size`` the smallest power of two
that holds ``--iodepth`` requests is asked for, and when the back-end refuses it
(``SET_VRING_NUM``) ever smaller rings are tried; the report says which sizes were
refused (``queue_size_refused``), and a default ``--iodepth`` is lowered to what the
ring holds (``iodepth_requested`` keeps the one asked for). A ``--queue-size`` the
back-end refuses is an error naming it. A ``--bs`` so large that no ring the back-end
takes holds one request is an error saying which ``--bs`` fits.

``--iommu`` runs the load behind an IOMMU that ``bench blk`` plays itself, against a
back-end serving with ``VIRTIO_F_ACCESS_PLATFORM`` (``python -m vhost serve blk
--iommu``); one that does not offer it is an error naming the feature (status 2). The
driver then uses I/O virtual addresses: what the flat layout puts at guest address ``x``
is at ``2**40 + x``, and behind those addresses the memory is remapped in pages of
``--iommu-page`` bytes: of ``n`` pages, I/O virtual page ``j`` is guest page ``((j ^ 1) +
n // 2) % n`` (neighbours swapped in pairs, the halves of the memory exchanged), so a
back-end that mistranslates reads or writes another page and ``--verify`` says so.
The back-end's IOTLB misses are answered by a thread of the native loop with an update of
the whole page (read-write); the report counts them (``iotlb_misses``: during the timed
run; ``iommu``: the totals). ``--iommu-prefill`` says what is mapped before the run,
``--iommu-strict`` unmaps each request's data pages when it completes (as a guest in
strict IOMMU mode: every request misses). Compare with the same run without ``--iommu``
on ``serve blk`` for the cost of translation (``benches/bench_iommu.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..dirty_log import DirtyLog
from .blk import RingRefusedError, open_driver, size_arg
from .common import (
    EXIT_BAD_DATA,
    EXIT_FAILED,
    CliError,
    int_range,
    non_negative_float,
    plain,
    positive_int,
    seconds_arg,
    socket_args,
    step,
)

if TYPE_CHECKING:
    from ..devices.blk import BlkDriver


SECTOR_SIZE = 512
RW_MODES = ("read", "write", "randread", "randwrite")
MAX_QUEUE_SIZE = 32768
"""Largest ring of virtio (and of ``--queue-size``); a back-end that takes fewer entries
refuses ``SET_VRING_NUM`` and a smaller ring is tried."""
MIN_QUEUE_SIZE = 128
DEFAULT_IODEPTH = 32
DEFAULT_SEGMENT = 32 * 1024
VERIFY_WINDOW = 128 * 1024
"""With ``--verify``, slots get windows of at least this much so that the fill and
read-back passes use large requests."""


_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The splitmix64 mixer (as the native loop computes it)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def pattern(offset: int, length: int, generation: int) -> bytes:
    """The bytes ``--verify`` writes at disk ``offset`` (a multiple of 8) for
    ``generation``: little-endian words ``splitmix64(word_offset ^ (generation << 40))``."""
    g = generation << 40
    return b"".join(splitmix64((offset + i) ^ g).to_bytes(8, "little") for i in range(0, length, 8))


def add_parser(sub: Any) -> None:
    """Adds ``bench`` (``bench blk``: a load generator against any vhost-user-blk back-end) and
    its options to the CLI."""
    p = sub.add_parser(
        "bench",
        help="load generators (bench blk)",
        description="Load generators for vhost-user back-ends.",
    )
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    blk = bench.add_parser(
        "blk",
        help="IOPS, bandwidth and latency of a vhost-user-blk back-end (--verify checks data)",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    socket_args(blk)
    blk.add_argument(
        "--rw", choices=RW_MODES, default="randread", help="access pattern (default randread)"
    )
    blk.add_argument("--bs", type=size_arg, default=4096, help="request size (default 4k)")
    blk.add_argument(
        "--iodepth",
        type=int_range(1, 0xFFFF),
        help=f"requests in flight (default {DEFAULT_IODEPTH}, lowered to what the ring holds)",
    )
    blk.add_argument("--seconds", type=seconds_arg, default=5.0, help="run time (default 5)")
    blk.add_argument("--ios", type=positive_int, help="stop after this many requests instead")
    blk.add_argument("--offset", type=size_arg, default=0, help="start of the region")
    blk.add_argument("--size", type=size_arg, help="region size (default: to the disk's end)")
    blk.add_argument("--json", action="store_true", help="print one JSON object")
    blk.add_argument("--verify", action="store_true", help="check the data (see above)")
    blk.add_argument(
        "--generation",
        type=int_range(0, 0xFFFFFFFE),
        default=1,
        help="pattern generation (--verify)",
    )
    blk.add_argument(
        "--no-fill", action="store_true", help="--verify: the region already holds --generation"
    )
    blk.add_argument(
        "--seed", type=int_range(0, (1 << 64) - 1), default=1, help="seed of the random offsets"
    )
    blk.add_argument(
        "--busy-poll",
        type=busy_poll_arg,
        default=0.0,
        metavar="USEC",
        help="spin on the used ring this long (0..1000000 us) before sleeping on the call eventfd",
    )
    blk.add_argument(
        "--engine",
        choices=("native", "python"),
        default="native",
        help="native: the Rust loop (default); python: the BlkDriver API, for comparison",
    )
    blk.add_argument(
        "--queue-size",
        type=int_range(2, MAX_QUEUE_SIZE),
        help="ring size (default: fits --iodepth and the back-end)",
    )
    blk.add_argument("--packed", action="store_true", help="use a packed virtqueue")
    blk.add_argument("--no-event-idx", action="store_true", help="do not ack EVENT_IDX")
    blk.add_argument(
        "--timeout", type=seconds_arg, default=10.0, help="seconds without progress (default 10)"
    )
    blk.add_argument(
        "--dirty-log",
        action="store_true",
        help="run with dirty page logging on (as during a live migration): the back-end "
        f"marks every page it writes, and the log is read and cleared every "
        f"{DIRTY_LOG_SYNC_S * 1000:.0f} ms",
    )
    blk.add_argument(
        "--iommu",
        action="store_true",
        help="run behind an IOMMU played by this side (the back-end must offer "
        "VIRTIO_F_ACCESS_PLATFORM: serve blk --iommu); see above",
    )
    blk.add_argument(
        "--iommu-page",
        type=iommu_page_arg,
        metavar="BYTES",
        help="--iommu: the IOMMU page, unit of the remapping and of each IOTLB update "
        "(4K..2M, a power of two; default 4K): the smaller, the more misses",
    )
    blk.add_argument(
        "--iommu-prefill",
        choices=("none", "all"),
        help="--iommu: what is mapped before the run. none (default): nothing, every page "
        "the back-end touches first misses and is answered, as with a vIOMMU and a device "
        "IOTLB; the misses are counted, and after each page's first touch the figure is "
        "translation itself, so it measures both paths. all: every page up front, no miss",
    )
    blk.add_argument(
        "--iommu-strict",
        action="store_true",
        help="--iommu: unmap each request's data pages when it completes (a guest in strict "
        "IOMMU mode): every request misses, the cold-IOTLB figure",
    )
    blk.set_defaults(run=run_blk)


MAX_IOMMU_PAGE = 2 << 20
"""Largest ``--iommu-page``: the driver's memory is a whole number of 2 MiB."""


def iommu_page_arg(text: str) -> int:
    """``--iommu-page``: a power of two from 4K to 2M (``4k``, ``64K``, ``2M``)."""
    value = size_arg(text)
    if value & (value - 1) or not 4096 <= value <= MAX_IOMMU_PAGE:
        raise argparse.ArgumentTypeError(f"must be a power of two from 4K to 2M: {text!r}")
    return value


# How often --dirty-log reads and clears the log, as a migrating VMM syncs it between
# precopy passes.
DIRTY_LOG_SYNC_S = 0.1


class _LogSync:
    """``--dirty-log``: logging on for the run, and a thread that reads and clears the log
    the way a migrating VMM does, so the back-end keeps setting fresh bits."""

    def __init__(self, disk: BlkDriver, socket: str) -> None:
        self.log = DirtyLog.allocate(disk.memory)
        self._fe = disk.frontend
        self._socket = socket
        self._stop = threading.Event()
        self.syncs = self.pages = 0
        self._thread = threading.Thread(target=self._run, name="dirty-log-sync", daemon=True)

    def __enter__(self) -> _LogSync:
        with step("start dirty logging on", self._socket):
            self._fe.start_dirty_log(self.log)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(DIRTY_LOG_SYNC_S):
            self._sync()

    def _sync(self) -> None:
        self.pages += sum(r.end - r.start for r in self.log.take()) // 4096
        self.syncs += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            if not exc[0]:
                self._fe.stop_dirty_log()
                self._sync()
        finally:
            self.log.close()

    def summary(self) -> dict[str, int]:
        """The log's totals for the JSON report: syncs done and dirty pages seen."""
        return {"syncs": self.syncs, "dirty_pages": self.pages}


def busy_poll_arg(text: str) -> float:
    """``--busy-poll``: microseconds, 0..1000000."""
    value = non_negative_float(text)
    if value > 1e6:
        raise argparse.ArgumentTypeError(f"must be 0..1000000 us: {text!r}")
    return value


def _check_args(args: argparse.Namespace) -> None:
    """Refuses what cannot run, before connecting (single values are checked by argparse)."""
    if args.bs <= 0 or args.bs % SECTOR_SIZE:
        raise CliError(f"--bs must be a positive multiple of {SECTOR_SIZE}: {args.bs}")
    if args.offset % SECTOR_SIZE:
        raise CliError(f"--offset must be a multiple of {SECTOR_SIZE}: {args.offset}")
    if args.size is not None and (args.size <= 0 or args.size % args.bs):
        raise CliError(f"--size must be a positive multiple of --bs: {args.size}")
    if args.engine == "python" and (args.verify or args.busy_poll or args.iommu):
        raise CliError("--verify, --busy-poll and --iommu need the native engine")
    if not args.iommu:
        given = [
            name
            for name, value in (
                ("--iommu-page", args.iommu_page),
                ("--iommu-prefill", args.iommu_prefill),
                ("--iommu-strict", args.iommu_strict or None),
            )
            if value is not None
        ]
        if given:
            raise CliError(f"{', '.join(given)} need(s) --iommu")
    elif args.dirty_log:
        raise CliError("--dirty-log cannot run with --iommu (the ring is set up by the loop)")


def _per_request(bs: int, segment: int = DEFAULT_SEGMENT) -> int:
    """Descriptors one request of ``bs`` bytes takes: header, data segments, status."""
    return 2 + -(-bs // segment)


def ring_sizes(args: argparse.Namespace) -> list[int]:
    """The ring sizes to try, largest first: ``--queue-size`` alone, or the smallest
    power of two holding ``--iodepth`` requests and then, for a back-end that refuses it,
    ever smaller ones down to a ring that holds one request."""
    if args.queue_size is not None:
        return [int(args.queue_size)]
    per_request = _per_request(args.bs)
    iodepth = args.iodepth if args.iodepth is not None else DEFAULT_IODEPTH
    need = iodepth * per_request
    if need > MAX_QUEUE_SIZE:
        if args.iodepth is None:
            need = MAX_QUEUE_SIZE
        else:
            raise CliError(
                f"--iodepth {iodepth} of {args.bs}-byte requests needs {need} descriptors "
                f"({per_request} each), more than the largest ring ({MAX_QUEUE_SIZE}); "
                "lower --iodepth"
            )
    size = MIN_QUEUE_SIZE
    while size < need:
        size *= 2
    sizes = [size]
    while sizes[-1] // 2 >= max(per_request, 2):
        sizes.append(sizes[-1] // 2)
    return sizes


def _connect(args: argparse.Namespace) -> tuple[BlkDriver, list[int]]:
    """The driver on a ring the back-end accepted, and the sizes it refused first."""
    window = max(args.bs, VERIFY_WINDOW) if args.verify else args.bs
    slots = args.iodepth if args.iodepth is not None else DEFAULT_IODEPTH
    try:
        return open_driver(
            args.socket,
            args.timeout,
            ring_sizes(args),
            packed=args.packed,
            event_idx=not args.no_event_idx,
            slots=slots,
            max_request=window,
            segment_size=DEFAULT_SEGMENT,
            iommu=args.iommu,
        )
    except RingRefusedError as exc:
        if args.queue_size is not None:
            exc.hint = "try a smaller --queue-size"
            raise
        raise _ring_too_small(args, exc) from None
    except CliError as exc:
        from ..errors import NotSupportedError  # noqa: PLC0415

        if args.iommu and isinstance(exc.__cause__, NotSupportedError):
            exc.hint = "python -m vhost serve blk --iommu offers it"
        raise


def _ring_too_small(args: argparse.Namespace, exc: RingRefusedError) -> CliError:
    """Why no ring fitted: a --bs or region larger than the disk (exit status 1), or
    requests of --bs needing more descriptors than the largest ring the back-end takes
    (found by trying ever smaller rings, each holding one request of fewer bytes)."""
    refused = exc.refused
    smaller = []
    size = min(refused) // 2
    while size >= 4:  # a request takes 3 descriptors at least
        smaller.append(size)
        size //= 2
    per_request = _per_request(args.bs)
    needs = (
        f"one request of --bs {args.bs} needs {per_request} descriptors (a header, "
        f"{per_request - 2} data segments of up to {DEFAULT_SEGMENT} bytes, a status)"
    )
    try:
        disk, _ = open_driver(
            args.socket, args.timeout, smaller, slots=1, max_request=args.bs,
            segment_size=DEFAULT_SEGMENT,
        )  # fmt: skip
    except RingRefusedError:
        return CliError(
            f"{exc.message}: {needs}, and it took no ring down to 4 entries", EXIT_FAILED
        )
    with disk:
        _region(args, disk.size)
        fits = disk.max_request // SECTOR_SIZE * SECTOR_SIZE
        return CliError(
            f"{exc.message}: {needs}; the largest ring it took, {disk.queue_size} entries, "
            f"holds requests of up to {fits} bytes",
            EXIT_FAILED,
            f"use --bs {fits} or less",
        )


def _fit_iodepth(args: argparse.Namespace, disk: BlkDriver, refused: list[int]) -> int:
    """The iodepth to run: ``--iodepth``, or the default lowered to what the ring holds."""
    per_request = _per_request(args.bs, disk.segment_size)
    fits = min(disk.queue_size // per_request, disk.slots)
    if args.iodepth is not None:
        if args.iodepth > fits and refused:
            raise CliError(
                f"--iodepth {args.iodepth} of {args.bs}-byte requests does not fit: they take "
                f"{per_request} descriptors each, and the back-end refused rings of "
                f"{', '.join(map(str, refused))} entries and took {disk.queue_size}",
                EXIT_FAILED,
                f"use --iodepth {fits} or less",
            )
        return int(args.iodepth)
    iodepth = min(DEFAULT_IODEPTH, fits)
    if iodepth < DEFAULT_IODEPTH or refused:
        why = f"the back-end refused {', '.join(map(str, refused))} entries; " if refused else ""
        print(
            f"note: ring of {disk.queue_size} entries ({why}{per_request} per request): "
            f"iodepth {iodepth}",
            file=sys.stderr,
        )
    return iodepth


def _region(args: argparse.Namespace, disk_size: int) -> tuple[int, int]:
    """The region to load (``--offset``, ``--size``), checked against the disk's size:
    what does not fit is a bad argument (exit status 1)."""
    disk = f"the disk of {args.socket} ({disk_size} bytes)"
    if args.bs > disk_size:
        raise CliError(f"--bs {args.bs} is larger than {disk}")
    if args.offset >= disk_size:
        raise CliError(f"--offset {args.offset} is beyond the end of {disk}")
    if args.size is None:
        size = (disk_size - args.offset) // args.bs * args.bs
        if size == 0:
            raise CliError(f"--offset {args.offset} leaves no whole --bs {args.bs} block on {disk}")
    else:
        size = args.size
        if args.offset + size > disk_size:
            raise CliError(f"--offset {args.offset} --size {size} runs past the end of {disk}")
    return args.offset, size


def run_native(args: argparse.Namespace, disk: BlkDriver, offset: int, size: int) -> dict[str, Any]:
    """Runs the load with the native loop (:class:`vhost._core.BlkLoad`) on ``[offset, offset +
    size)`` of ``disk``; returns the counts and latencies. ``--bs`` above the device's largest
    request is a :class:`CliError`."""
    if args.bs > disk.max_request:
        raise CliError(
            f"--bs {args.bs} exceeds the largest request the device takes ({disk.max_request})"
        )
    if args.iommu:
        load = disk.native_load(
            iommu_page=args.iommu_page or 4096,
            iommu_prefill=args.iommu_prefill or "none",
            iommu_strict=args.iommu_strict,
        )
    else:
        load = disk.native_load()
    result = load.run(
        args.rw,
        args.bs,
        args.iodepth,
        offset,
        size,
        seconds=args.seconds,
        ios=args.ios,
        seed=args.seed,
        busy_poll=args.busy_poll / 1e6,
        timeout=args.timeout,
        verify=args.verify,
        generation=args.generation,
        fill=not args.no_fill,
    )
    result["iommu"] = load.iommu
    return result


def run_python(args: argparse.Namespace, disk: BlkDriver, offset: int, size: int) -> dict[str, Any]:
    """The same load through the Python driver API (submit/wait), for comparison."""
    import random  # noqa: PLC0415

    from ..devices.blk import BlkRequest  # noqa: PLC0415

    rng = random.Random(args.seed)
    blocks = size // args.bs
    write = args.rw in ("write", "randwrite")
    rand = args.rw.startswith("rand")
    payload = bytes(args.bs)
    cursor = 0
    kicks0, wakeups0 = disk.kicks, disk.wakeups

    def request() -> BlkRequest:
        nonlocal cursor
        if rand:
            block = rng.randrange(blocks)
        else:
            block, cursor = cursor % blocks, cursor + 1
        at = offset + block * args.bs
        return BlkRequest.write(at, payload) if write else BlkRequest.read(at, args.bs)

    limit = args.ios if args.ios is not None else 1 << 62
    done = issued = errors = 0
    first_error: dict[str, Any] | None = None
    gc.disable()
    cpu0 = time.thread_time()
    try:
        start = time.perf_counter()
        end = start + args.seconds
        n = min(args.iodepth, limit)
        disk.submit([request() for _ in range(n)])
        issued = n
        last = start
        while disk.in_flight:
            completions = disk.wait()
            last = time.perf_counter()
            for c in completions:
                if c.status:
                    errors += 1
                    if first_error is None:
                        first_error = {"rw": c.type.name, "offset": None, "status": c.status}
            done += len(completions)
            more = min(len(completions), limit - issued) if last < end else 0
            if more > 0:
                disk.submit([request() for _ in range(more)])
                issued += more
    finally:
        gc.enable()
    cpu = time.thread_time() - cpu0
    elapsed = last - start
    return {
        "rw": args.rw,
        "bs": args.bs,
        "iodepth": args.iodepth,
        "ios": done,
        "bytes": (done - errors) * args.bs,
        "seconds": elapsed,
        "iops": done / elapsed if elapsed > 0 else 0.0,
        "bandwidth_bytes_per_s": (done - errors) * args.bs / elapsed if elapsed > 0 else 0.0,
        "driver_cpu_seconds": cpu,
        "kicks": disk.kicks - kicks0,
        "wakeups": disk.wakeups - wakeups0,
        "io_errors": errors,
        "first_io_error": first_error,
        "latency_ns": None,
        "verify": None,
        "iotlb_misses": None,
        "iommu": None,
    }


def run_blk(args: argparse.Namespace) -> int:
    """``bench blk``: connects, runs the load and prints (or writes) the report; returns the exit
    status."""
    _check_args(args)
    # Ctrl-C: the native loop checks for signals every 100 ms and stops (requests in
    # flight are abandoned with the connection); main() reports it (status 130).
    disk, refused = _connect(args)
    from ..devices.blk import READ_ONLY_REASON as READ_ONLY  # noqa: PLC0415

    with disk:
        offset, size = _region(args, disk.size)
        iodepth = _fit_iodepth(args, disk, refused)
        if disk.read_only and args.rw in ("write", "randwrite"):
            raise CliError(f"write to {args.socket}: {READ_ONLY}", EXIT_FAILED)
        if disk.read_only and args.verify and not args.no_fill:
            raise CliError(
                f"write to {args.socket}: --verify first fills the region, and {READ_ONLY}",
                EXIT_FAILED,
                f"add --no-fill if the region already holds generation {args.generation}",
            )
        requested = args.iodepth
        args.iodepth = iodepth
        runner = run_native if args.engine == "native" else run_python
        with contextlib.ExitStack() as stack:
            sync = stack.enter_context(_LogSync(disk, args.socket)) if args.dirty_log else None
            with step("run the load on", args.socket):
                result = runner(args, disk, offset, size)
        result["dirty_log"] = sync.summary() if sync is not None else None
        result.update(
            engine=args.engine,
            offset=offset,
            size=size,
            disk_size=disk.size,
            queue_size=disk.queue_size,
            queue_size_refused=refused,
            iodepth_requested=DEFAULT_IODEPTH if requested is None else requested,
            packed=disk.packed,
            event_idx=disk.event_idx,
            busy_poll_us=args.busy_poll,
            pid=os.getpid(),
            cpus=sorted(os.sched_getaffinity(0)),
        )
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(_human(result))
    return _exit_status(result)


def _exit_status(result: dict[str, Any]) -> int:
    verify = result.get("verify")
    if verify is not None and verify["bad_sectors"]:
        print(
            f"error: data verification failed: {verify['bad_sectors']} sector read(s) wrong, "
            f"the first at byte offset {verify['first_bad_offset']}",
            file=sys.stderr,
        )
        return EXIT_BAD_DATA
    errors = result["io_errors"] + (verify["io_errors"] if verify is not None else 0)
    if errors:
        print(
            f"error: the device failed {errors} request(s); first: {result['first_io_error']}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _human(r: dict[str, Any]) -> str:
    ios = max(int(r["ios"]), 1)
    refused = (
        f" (refused: {', '.join(map(str, r['queue_size_refused']))})"
        if r.get("queue_size_refused")
        else ""
    )
    lines = [
        f"{r['rw']} bs={r['bs']} iodepth={r['iodepth']} engine={r['engine']}: "
        f"{r['iops']:.0f} IOPS, {r['bandwidth_bytes_per_s'] / (1 << 20):.1f} MiB/s "
        f"({r['ios']} I/Os in {r['seconds']:.2f} s)",
        f"driver CPU {r['driver_cpu_seconds'] * 1e6 / ios:.2f} us/IO, "
        f"kicks/IO {r['kicks'] / ios:.3f}, call wake-ups/IO {r['wakeups'] / ios:.3f}; "
        f"queue size {r['queue_size']}{refused}, {'packed' if r['packed'] else 'split'}, "
        f"event_idx={r['event_idx']}, CPUs {','.join(map(str, r['cpus']))}",
    ]
    mmu = r.get("iommu")
    if mmu is not None:
        lines.append(
            f"iommu: {mmu['page']}-byte pages, prefill {mmu['prefill']}, strict "
            f"{'on' if mmu['strict'] else 'off'}: {r['iotlb_misses']} IOTLB misses in the run "
            f"({mmu['misses']} in all, {mmu['unmapped_misses']} outside the memory), "
            f"{mmu['updates']} updates, {mmu['invalidations']} invalidations"
        )
    log = r.get("dirty_log")
    if log is not None:
        lines.append(f"dirty log: on, {log['dirty_pages']} dirty pages in {log['syncs']} syncs")
    lat = r["latency_ns"]
    if lat is not None:
        us = {k: v / 1000 for k, v in lat.items()}
        lines.append(
            f"latency us: min {us['min']:.1f}  mean {us['mean']:.1f}  p50 {us['p50']:.1f}  "
            f"p90 {us['p90']:.1f}  p99 {us['p99']:.1f}  p99.9 {us['p99.9']:.1f}  "
            f"max {us['max']:.1f}"
        )
    v = r["verify"]
    if v is not None:
        state = "ok" if v["ok"] else "FAILED"
        lines.append(
            f"verify: {state} (generation {v['generation']}: filled {v['filled_bytes']} B, "
            f"reads checked {v['read_checked_bytes']} B, wrote {v['written_bytes']} B of "
            f"generation {v['generation'] + 1}, read back {v['final_checked_bytes']} B, "
            f"{v['bad_sectors']} bad sector(s))"
        )
    return "\n".join(lines)
