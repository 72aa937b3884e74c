"""``python -m vhost.testing``: build the guest image, or run one command in a guest.

Errors are one line on stderr and exit status 1 (2 for a usage error); no traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import get_args

from .errors import GuestError
from .image import build_image, ensure_image
from .machine import boot
from .qemu import Device, DeviceKind

EXAMPLES = """\
examples:
  python -m vhost.testing image              build the guest image (once) and show it
  python -m vhost.testing image --force      rebuild it
  python -m vhost.testing run --device rng:/tmp/rng.sock -- head -c 16 /dev/hwrng
  python -m vhost.testing run --device blk:/tmp/blk.sock -- cat /sys/block/vda/size
"""


def _device(text: str) -> Device:
    kind, sep, socket = text.partition(":")
    if not sep or not socket:
        raise argparse.ArgumentTypeError(f"expected KIND:SOCKET, got {text!r}")
    if kind not in get_args(DeviceKind):
        raise argparse.ArgumentTypeError(
            f"unknown device kind {kind!r} in {text!r}; one of {', '.join(get_args(DeviceKind))}"
        )
    return Device(kind, socket)  # type: ignore[arg-type]  # checked just above


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vhost.testing",
        description="A Linux guest under QEMU for testing vhost-user back-ends (docs/testing.md).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="build the guest image if needed and show where it is")
    image.add_argument("--force", action="store_true", help="rebuild even when up to date")
    run = sub.add_parser(
        "run",
        help="boot a guest with vhost-user devices, run one shell command in it, "
        "exit with its status",
    )
    run.add_argument(
        "--device",
        action="append",
        type=_device,
        default=[],
        metavar="KIND:SOCKET",
        help=f"attach a vhost-user device ({', '.join(get_args(DeviceKind))}); repeatable",
    )
    run.add_argument("--mode", choices=["busybox", "host"], default="busybox")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=None)
    run.add_argument("--qemu", default=None, help="QEMU binary (default $PYVHOST_QEMU or $PATH)")
    run.add_argument("--timeout", type=float, default=120.0, help="seconds for the command")
    run.add_argument("argv", nargs="+", metavar="COMMAND", help="the command (after --)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "image":
            log = build_image(force=args.force)
            sys.stdout.write(log)
            image = ensure_image()
            print(f"image: {image.vmlinuz.parent} (kernel {image.kver})")
            return 0
        command = args.argv[0] if len(args.argv) == 1 else shlex.join(args.argv)
        with boot(*args.device, mode=args.mode, accel=args.accel, qemu=args.qemu) as guest:
            result = guest.run(command, timeout=args.timeout, check=False)
        sys.stdout.buffer.write(result.stdout_bytes)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr_bytes)
        return result.status
    except GuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
