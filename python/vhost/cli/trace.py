"""``trace``: a transparent recording proxy between a vhost-user front-end and back-end
(:mod:`vhost.trace`), printing every message decoded as it passes."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from types import FrameType
from typing import Any, TextIO

from ..errors import VhostOSError
from ..trace import Event, Record, Tracer
from ..virtio import DEVICE_NAMES
from .common import EXIT_INTERRUPTED, EXIT_USAGE, SOCKET_PATH_MAX, CliError, connect_hint

DESCRIPTION = """\
Sit between a vhost-user front-end (QEMU) and a back-end, forward every byte and
every fd unchanged and in order, and print each message decoded: direction, request
name, flags (v1, REPLY, NEED_REPLY), body fields (memory regions, ring addresses,
features by name, config bytes), fds attached, and each reply with the time since its
request. vhost-user never says the device type, so the device's own feature bits (0-23)
show as "bit N" unless --device names the type. The back-end channel
(SET_BACKEND_REQ_FD) is relayed too, so the back-end's own requests show (marked
[backend channel]). A message the back-end or QEMU would refuse is printed as
MALFORMED with the reason and its bytes in hex, and still forwarded.

Two layouts:
  --listen FRONT.sock --connect BACK.sock
      the back-end listens on BACK.sock; point QEMU's chardev at FRONT.sock
  --listen-backend BACK.sock --connect-frontend FRONT.sock
      QEMU listens on FRONT.sock (server=on); point the back-end (client mode)
      at BACK.sock

examples:
  python -m vhost serve blk --socket /tmp/blk.sock --image disk.img &
  python -m vhost trace --listen /tmp/trace.sock --connect /tmp/blk.sock
  qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/trace.sock \\
      -device vhost-user-blk-pci,chardev=c0

  python -m vhost trace --listen /tmp/t.sock --connect /tmp/blk.sock --device blk
      # FLUSH, SEG_MAX... instead of bit 9, bit 2...

  python -m vhost trace --listen /tmp/t.sock --connect /tmp/blk.sock --json --once \\
      > trace.jsonl      # one JSON object per line; stop when QEMU disconnects

It runs until Ctrl-C or SIGTERM (with --once: until the first connection ends)."""

EPILOG = """\
exit status:
  0    stopped by SIGTERM, or --once and the connection ended
  1    bad arguments, a socket path that cannot be listened on or connected to
  130  interrupted (Ctrl-C)"""


class _Stop(Exception):
    """SIGTERM: a normal stop."""


def add_parser(sub: Any) -> None:
    """Registers ``trace`` with its options, help and examples."""
    p = sub.add_parser(
        "trace",
        help="record every vhost-user message between a front-end and a back-end",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_argument_group("sockets (one pair)")
    mode.add_argument("--listen", metavar="FRONT.sock", help="listen here for the front-end")
    mode.add_argument(
        "--connect", metavar="BACK.sock", help="connect here to the back-end (server mode)"
    )
    mode.add_argument(
        "--listen-backend",
        metavar="BACK.sock",
        help="listen here for a back-end in client mode",
    )
    mode.add_argument(
        "--connect-frontend",
        metavar="FRONT.sock",
        help="connect here to a front-end that listens (QEMU server=on)",
    )
    p.add_argument(
        "--device",
        choices=sorted(DEVICE_NAMES),
        help="the device type, to name its own feature bits (0-23; the protocol never says it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per message")
    p.add_argument("--once", action="store_true", help="exit when the first connection ends")
    p.set_defaults(run=run)


def _paths(args: argparse.Namespace) -> tuple[str, str, bool]:
    front = (args.listen, args.connect)
    back = (args.listen_backend, args.connect_frontend)
    if all(front) and not any(back):
        listen, connect, backend_connects = args.listen, args.connect, False
    elif all(back) and not any(front):
        listen, connect, backend_connects = args.listen_backend, args.connect_frontend, True
    else:
        raise CliError(
            "trace: give --listen and --connect, or --listen-backend and --connect-frontend "
            "(see --help)"
        )
    for path in (listen, connect):
        if len(path.encode()) > SOCKET_PATH_MAX:
            raise CliError(f"trace: {path}: a socket path holds at most {SOCKET_PATH_MAX} bytes")
    return listen, connect, backend_connects


def _emit(record: Record, as_json: bool, out: TextIO) -> None:
    line = json.dumps(record.to_json()) if as_json else record.format()
    out.write(line + "\n")
    out.flush()


def _on_term(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def run(args: argparse.Namespace) -> int:
    """Runs the proxy, printing every record, until SIGTERM, Ctrl-C or (``--once``) the
    end of the first connection; a socket that fails is one error line."""
    listen, connect, backend_connects = _paths(args)
    tracer = Tracer(listen, connect, backend_connects=backend_connects, device=args.device)
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        tracer.start()
        print(f"trace: listening on {listen}, relaying to {connect}", file=sys.stderr, flush=True)
        for record in tracer.records():
            _emit(record, args.json, sys.stdout)
            if (
                args.once
                and isinstance(record, Event)
                and record.kind == "disconnect"
                and record.channel == "main"
            ):
                break
    except VhostOSError as exc:
        path = str(exc.filename)
        raise CliError(str(exc), EXIT_USAGE, connect_hint(path, exc.errno)) from None
    except KeyboardInterrupt:
        raise CliError(f"trace {listen} -> {connect}: interrupted", EXIT_INTERRUPTED) from None
    except _Stop:
        pass
    finally:
        tracer.close()
        signal.signal(signal.SIGTERM, previous)
    return 0
