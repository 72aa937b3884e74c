"""``python -m vhost serve {blk,rng}``: run a vhost-user back-end daemon until SIGINT or
SIGTERM.

``serve blk --socket SOCK --image FILE [--queues N] [--readonly]`` serves a virtio-blk
disk (the native Rust device; ``--python`` serves the same image through the Python
device path instead). ``serve rng --socket SOCK`` serves the Python virtio-rng example
device. ``--client`` connects to a front-end listening on SOCK instead of listening.
"""

from __future__ import annotations

import argparse
import sys

from ..daemon import BlkDevice, Daemon, Device
from ..devices.blkdev import PythonBlkDevice
from ..devices.rng import RngDevice


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run a vhost-user back-end daemon", description=__doc__)
    kinds = p.add_subparsers(dest="device", required=True)

    blk = kinds.add_parser("blk", help="virtio-blk over an image file")
    _common(blk)
    blk.add_argument("--image", required=True, help="disk image file (raw)")
    blk.add_argument("--queues", type=int, default=1, help="number of request queues")
    blk.add_argument("--queue-size", type=int, default=256, help="largest ring size")
    blk.add_argument("--readonly", action="store_true", help="refuse guest writes")
    blk.add_argument("--serial", default="pyvhost", help="serial number (GET_ID)")
    blk.add_argument(
        "--python", action="store_true", help="use the Python device instead of the native one"
    )
    blk.set_defaults(run=run_blk)

    rng = kinds.add_parser("rng", help="virtio-rng written in Python (the example device)")
    _common(rng)
    rng.set_defaults(run=run_rng)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, help="vhost-user socket path")
    p.add_argument(
        "--client", action="store_true", help="connect to a listening front-end instead"
    )
    p.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="keep polling each ring this long after the last request before sleeping",
    )
    p.add_argument(
        "--require-sealed-memory",
        action="store_true",
        help="refuse guest memory not sealed against shrinking (no SIGBUS from truncation)",
    )


def run_blk(args: argparse.Namespace) -> int:
    device: Device | BlkDevice
    if args.python:
        device = PythonBlkDevice(
            args.image,
            num_queues=args.queues,
            queue_size=args.queue_size,
            readonly=args.readonly,
            serial=args.serial,
        )
        sectors = device.capacity
    else:
        device = BlkDevice(
            args.image,
            num_queues=args.queues,
            queue_size=args.queue_size,
            readonly=args.readonly,
            serial=args.serial,
        )
        sectors = device.capacity
    kind = "python" if args.python else "native"
    mode = " read-only" if args.readonly else ""
    return _serve(
        Daemon(
            device,
            args.socket,
            client=args.client,
            poll_us=args.poll_us,
            require_sealed_memory=args.require_sealed_memory,
        ),
        f"blk ({kind}, {sectors} sectors, {args.queues} queue(s){mode})",
    )


def run_rng(args: argparse.Namespace) -> int:
    daemon = Daemon(
        RngDevice(),
        args.socket,
        client=args.client,
        poll_us=args.poll_us,
        require_sealed_memory=args.require_sealed_memory,
    )
    return _serve(daemon, "rng (python)")


def _serve(daemon: Daemon, what: str) -> int:
    def ready() -> None:
        print(f"serving {what} on {daemon.path}", flush=True)

    daemon.serve_forever(ready)
    print(
        f"stopped after {daemon.sessions_started} session(s)",
        file=sys.stderr,
        flush=True,
    )
    return 0
