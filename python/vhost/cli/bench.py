"""``bench blk``: a virtio-blk load generator for any vhost-user-blk back-end.

``python -m vhost bench blk --socket S [--rw read|write|randread|randwrite] [--bs BYTES]
[--iodepth N] [--seconds S] [--json] [--verify]`` connects as the front-end, plays the
guest's virtio-blk driver on queue 0 and keeps ``--iodepth`` requests of ``--bs`` bytes in
flight for ``--seconds`` (or ``--ios`` requests), then reports IOPS, bandwidth and latency
percentiles. The loop is native (:class:`vhost._core.BlkLoad`, no GIL), so a fast
back-end, not the load generator, is what is measured; ``--engine python`` runs the same
load through :class:`~vhost.devices.blk.BlkDriver`'s Python API instead, for comparison.

``--verify`` checks data, not only speed. Every 8-byte word written carries
``splitmix64(offset ^ (generation << 40))`` (its absolute byte offset on the disk and a
generation number; :func:`pattern`). The run has three phases: the region is first written
with generation ``G`` (``--generation``, default 1; ``--no-fill`` skips this when an
earlier run left it there), then the timed job runs, its reads checked against ``G`` and
its writes carrying ``G + 1``; finally the whole region is read back and each sector must
hold ``G + 1`` if the job wrote it and ``G`` otherwise. A mismatch exits with status 3,
a request the device failed with status 2, bad arguments or an unreachable back-end with 1,
Ctrl-C (checked every 100 ms by the native loop) with 130.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParamError
from .blk import size_arg

if TYPE_CHECKING:
    from ..devices.blk import BlkDriver

SECTOR_SIZE = 512
RW_MODES = ("read", "write", "randread", "randwrite")
MAX_QUEUE_SIZE = 1024
"""Largest ring chosen automatically (libvhost-user, hence qemu-storage-daemon, accepts
at most 1024 entries); ``--queue-size`` may ask for more."""
DEFAULT_SEGMENT = 32 * 1024
VERIFY_WINDOW = 128 * 1024
"""With ``--verify``, slots get windows of at least this much so that the fill and
read-back passes use large requests."""

EXIT_IO_ERROR = 2
EXIT_BAD_DATA = 3
EXIT_INTERRUPTED = 130

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
    p = sub.add_parser("bench", help="load generators (bench blk)")
    bench = p.add_subparsers(dest="bench_command", required=True)
    blk = bench.add_parser(
        "blk",
        help="IOPS, bandwidth and latency of a vhost-user-blk back-end (--verify checks data)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    blk.add_argument("--socket", required=True, help="the back-end's vhost-user socket")
    blk.add_argument("--rw", choices=RW_MODES, default="randread")
    blk.add_argument("--bs", type=size_arg, default=4096, help="request size (default 4k)")
    blk.add_argument("--iodepth", type=int, default=32, help="requests in flight")
    blk.add_argument("--seconds", type=float, default=5.0, help="run time (default 5)")
    blk.add_argument("--ios", type=int, help="stop after this many requests instead")
    blk.add_argument("--offset", type=size_arg, default=0, help="start of the region")
    blk.add_argument("--size", type=size_arg, help="region size (default: to the disk's end)")
    blk.add_argument("--json", action="store_true", help="print one JSON object")
    blk.add_argument("--verify", action="store_true", help="check the data (see above)")
    blk.add_argument("--generation", type=int, default=1, help="pattern generation (--verify)")
    blk.add_argument(
        "--no-fill", action="store_true", help="--verify: the region already holds --generation"
    )
    blk.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    blk.add_argument(
        "--busy-poll",
        type=float,
        default=0.0,
        metavar="USEC",
        help="spin on the used ring this long before sleeping on the call eventfd",
    )
    blk.add_argument("--engine", choices=("native", "python"), default="native")
    blk.add_argument("--queue-size", type=int, help="ring size (default: fits --iodepth)")
    blk.add_argument("--packed", action="store_true", help="use a packed virtqueue")
    blk.add_argument("--no-event-idx", action="store_true", help="do not ack EVENT_IDX")
    blk.add_argument("--timeout", type=float, default=10.0, help="seconds without progress")
    blk.set_defaults(run=run_blk)


def _check_args(args: argparse.Namespace) -> None:
    """Refuses what cannot run, before connecting."""
    if args.bs <= 0 or args.bs % SECTOR_SIZE:
        raise InvalidParamError(f"--bs must be a positive multiple of {SECTOR_SIZE}: {args.bs}")
    if args.offset % SECTOR_SIZE:
        raise InvalidParamError(f"--offset must be a multiple of {SECTOR_SIZE}: {args.offset}")
    if args.size is not None and (args.size <= 0 or args.size % args.bs):
        raise InvalidParamError(f"--size must be a positive multiple of --bs: {args.size}")
    if not 1 <= args.iodepth <= 0xFFFF:
        raise InvalidParamError(f"--iodepth must be in 1..65535: {args.iodepth}")
    if not args.seconds > 0:
        raise InvalidParamError(f"--seconds must be positive: {args.seconds}")
    if args.ios is not None and args.ios <= 0:
        raise InvalidParamError(f"--ios must be positive: {args.ios}")
    if not 0 <= args.generation < 0xFFFFFFFF:
        raise InvalidParamError(f"--generation must be in 0..4294967294: {args.generation}")
    if not 0 <= args.busy_poll <= 1e6:
        raise InvalidParamError(f"--busy-poll must be 0..1000000 us: {args.busy_poll}")
    if not args.timeout > 0:
        raise InvalidParamError(f"--timeout must be positive: {args.timeout}")
    if args.engine == "python" and (args.verify or args.busy_poll):
        raise InvalidParamError("--verify and --busy-poll need the native engine")
    if not Path(args.socket).is_socket():
        raise InvalidParamError(f"no vhost-user socket at {args.socket}")


def _queue_size(args: argparse.Namespace) -> int:
    if args.queue_size is not None:
        return int(args.queue_size)
    per_request = 2 + -(-args.bs // DEFAULT_SEGMENT)
    need = args.iodepth * per_request
    if need > MAX_QUEUE_SIZE:
        raise InvalidParamError(
            f"--iodepth {args.iodepth} of {args.bs}-byte requests needs {need} descriptors "
            f"({per_request} each), more than the largest ring chosen automatically "
            f"({MAX_QUEUE_SIZE}); lower --iodepth or give --queue-size"
        )
    size = 128
    while size < need:
        size *= 2
    return size


def _connect(args: argparse.Namespace) -> BlkDriver:
    # Imported here: `probe` and `demo` do not need the driver.
    from ..devices.blk import BlkDriver  # noqa: PLC0415

    window = max(args.bs, VERIFY_WINDOW) if args.verify else args.bs
    return BlkDriver.connect(
        args.socket,
        queue_size=_queue_size(args),
        packed=args.packed,
        event_idx=not args.no_event_idx,
        timeout=args.timeout,
        slots=args.iodepth,
        max_request=window,
        segment_size=DEFAULT_SEGMENT,
    )


def _region(args: argparse.Namespace, disk_size: int) -> tuple[int, int]:
    if args.offset >= disk_size:
        raise InvalidParamError(f"--offset {args.offset} is beyond the disk ({disk_size} bytes)")
    if args.size is None:
        size = (disk_size - args.offset) // args.bs * args.bs
        if size == 0:
            raise InvalidParamError(f"no whole {args.bs}-byte block after --offset {args.offset}")
    else:
        size = args.size
        if args.offset + size > disk_size:
            raise InvalidParamError(
                f"region {args.offset}+{size} runs past the disk's end ({disk_size} bytes)"
            )
    return args.offset, size


def run_native(args: argparse.Namespace, disk: BlkDriver, offset: int, size: int) -> dict[str, Any]:
    if args.bs > disk.max_request:
        raise InvalidParamError(
            f"--bs {args.bs} exceeds the largest request the device takes ({disk.max_request})"
        )
    load = disk.native_load()
    return load.run(
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
    }


def run_blk(args: argparse.Namespace) -> int:
    _check_args(args)
    try:
        return _run_blk(args)
    except KeyboardInterrupt:
        # The native loop checks for signals every 100 ms and stops (requests in flight
        # are abandoned with the connection).
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_blk(args: argparse.Namespace) -> int:
    with _connect(args) as disk:
        offset, size = _region(args, disk.size)
        if args.rw in ("write", "randwrite") and disk.read_only:
            raise InvalidParamError("the device is read-only (VIRTIO_BLK_F_RO): no writes")
        runner = run_native if args.engine == "native" else run_python
        result = runner(args, disk, offset, size)
        result.update(
            engine=args.engine,
            offset=offset,
            size=size,
            disk_size=disk.size,
            queue_size=disk.queue_size,
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
        return EXIT_IO_ERROR
    return 0


def _human(r: dict[str, Any]) -> str:
    ios = max(int(r["ios"]), 1)
    lines = [
        f"{r['rw']} bs={r['bs']} iodepth={r['iodepth']} engine={r['engine']}: "
        f"{r['iops']:.0f} IOPS, {r['bandwidth_bytes_per_s'] / (1 << 20):.1f} MiB/s "
        f"({r['ios']} I/Os in {r['seconds']:.2f} s)",
        f"driver CPU {r['driver_cpu_seconds'] * 1e6 / ios:.2f} us/IO, "
        f"kicks/IO {r['kicks'] / ios:.3f}, call wake-ups/IO {r['wakeups'] / ios:.3f}; "
        f"queue size {r['queue_size']}, {'packed' if r['packed'] else 'split'}, "
        f"event_idx={r['event_idx']}, CPUs {','.join(map(str, r['cpus']))}",
    ]
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
