"""The command line of pyvhost (``python -m vhost``, or the ``pyvhost`` script).

Every command reports a failure as one line, ``error: ACTION PATH: REASON`` with a hint
where one helps, and an exit status from the table in ``--help``
(:mod:`vhost.cli.common`); no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NoReturn

from ..errors import VhostError
from . import bench, blk, check, demo, probe, serve
from . import trace as trace_cmd
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    CliError,
    os_reason,
)

DESCRIPTION = """\
Drive and serve virtio devices over vhost-user: probe any back-end, check its
conformance and robustness (check), record a front-end's conversation with it (trace),
be the virtio-blk driver of one (blk, bench), serve one (serve), or watch data move
through a virtqueue (demo)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error, ``error:
    COMMAND: MESSAGE (see --help)``, and exits with status 1 (the documented status of
    bad arguments) instead of argparse's 2 (which means a failed request here)."""

    #: The program's name (``pyvhost``): what a command's ``prog`` starts with.
    root = ""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(self.root).strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"error: {where}{message} (see --help)\n")


def program_name(argv0: str | None = None) -> str:
    """``pyvhost`` for the installed script, ``python -m vhost`` for the module."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    if not name or name in ("__main__.py", "-c", "-m"):
        return "python -m vhost"
    return name


def version() -> str:
    """The installed distribution's version (``unknown`` when run from a source tree
    that was never installed)."""
    try:
        return metadata.version("pyvhost")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``python -m vhost`` argument parser with every subcommand, its program name ``prog``
    (default: how the CLI was started)."""
    ArgumentParser.root = prog = prog or program_name()
    parser = ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    # Any: the commands' add_parser functions take argparse's plain subparser action,
    # and subparsers made here are of our class (argparse passes it down).
    sub: Any = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe.add_parser(sub)
    demo.add_parser(sub)
    blk.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    check.add_parser(sub)
    trace_cmd.add_parser(sub)
    return parser


def _stdout_closed() -> NoReturn:
    """Our reader went away (``| head``): stop the way Unix tools do, killed by SIGPIPE,
    without a traceback (and without a second error when Python flushes stdout at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # not reached


def error(message: str) -> None:
    """Prints ``error: MESSAGE`` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Runs one command; returns its exit status (the table in ``--help``)."""
    try:
        args = build_parser(prog).parse_args(argv)
        code: int = args.run(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except CliError as exc:
        error(str(exc))
        return exc.status
    except BrokenPipeError as exc:
        if isinstance(exc, VhostError):
            error(f"the back-end closed the connection: {os_reason(exc)}")
            return EXIT_FAILED
        _stdout_closed()
    except OSError as exc:
        # A step that did not name itself: still the path and the reason, no traceback.
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        error(f"{where}{os_reason(exc)}")
        return EXIT_FAILED
    except VhostError as exc:
        error(str(exc))
        # A value the caller gave that cannot work (InvalidParamError and the other
        # ValueErrors) is an unusable input; anything else is a request that failed.
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
    return code
