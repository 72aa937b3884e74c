"""``check SOCKET``: a conformance and robustness check of any vhost-user back-end
(:mod:`vhost.check`), printed as a table or JSON; exit status 0 only when every case
passed (or did not apply)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..check import DEVICES, CaseResult, CheckError, Report, all_cases, run_checks
from .common import EXIT_FAILED, EXIT_USAGE, CliError, connect_hint, seconds_arg

DESCRIPTION = """\
Check a vhost-user back-end as a front-end that breaks the rules on purpose: the
specification's negotiation rules (protocol features only after bit 30, REPLY_ACK,
exact reply sizes, config-space bounds, queue count, memory-slot limit, ring set-up,
GET_VRING_BASE after traffic) and the hostile messages of ADVERSARIAL.md (malformed
headers, sizes, fd counts, memory tables, ring indexes, mid-message disconnects).

After each case a fresh connection must still get a correct GET_FEATURES reply: a case
ends pass, fail, died (nobody accepts any more, or the process was killed by a signal),
hung (no answer within --timeout) or skip (the back-end lacks what the case needs).

Back-ends that serve one front-end and exit (virtiofsd, rust-vmm's vhost-device-*)
need --restart: the command is run to start the back-end again after each case (and
first, when nothing listens yet); a process it starts is stopped at the end."""

EPILOG = """\
examples:
  %(prog)s /tmp/blk.sock --device blk
  %(prog)s /tmp/blk.sock --pid $(pidof qemu-storage-daemon) --json > report.json
  %(prog)s /tmp/fs.sock --restart 'virtiofsd --socket-path=/tmp/fs.sock --shared-dir=/srv'
  %(prog)s /tmp/rng.sock0 --device rng --restart 'vhost-device-rng -s /tmp/rng.sock'
  %(prog)s /tmp/blk.sock --only reply-ack --only 253-fds
  %(prog)s --list

exit status: 0 every case passed or was skipped; 1 bad arguments, no back-end on
SOCKET, or a restart command that does not start one; 2 a case failed, died or hung,
or the back-end did not answer GET_FEATURES at the start."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``check`` on the top-level parser."""
    p = sub.add_parser(
        "check",
        help="conformance and robustness check of any vhost-user back-end",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", nargs="?", metavar="SOCKET", help="the back-end's vhost-user socket")
    p.add_argument("--device", choices=DEVICES,
                   help="the device type (enables the traffic cases for blk and rng)")
    p.add_argument("--only", action="append", metavar="CASE",
                   help="run only this case (repeatable; see --list)")
    p.add_argument("--skip", action="append", metavar="CASE",
                   help="do not run this case (repeatable)")
    p.add_argument("--pid", type=int, help="the back-end's process: count its fds after each case")
    p.add_argument("--restart", metavar="CMD",
                   help="command that starts the back-end again when it is gone")
    p.add_argument("--timeout", type=seconds_arg, default=2.0,
                   help="seconds to wait for a reply before a case is hung (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.set_defaults(run=run)


def _progress(result: CaseResult) -> None:
    print(f"{result.outcome.value:<5} {result.name}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Runs the checks (or lists them); the exit status is 0 only when all passed."""
    if args.list:
        for case in all_cases():
            print(f"{case.name:<28} {case.ref:<30} {case.what}")
        return 0
    if args.socket is None:
        raise CliError("check: SOCKET is required (or --list)")
    try:
        report: Report = run_checks(
            args.socket, device=args.device, only=args.only, skip=args.skip, pid=args.pid,
            restart=args.restart, timeout=args.timeout,
            progress=None if args.json else _progress,
        )
    except CheckError as exc:
        hint = connect_hint(args.socket, exc.errno) if exc.errno is not None else None
        status = EXIT_FAILED if exc.unanswered else EXIT_USAGE
        raise CliError(str(exc), status, hint) from exc
    out: Any = report.to_json() if args.json else report.table()
    print(json.dumps(out, indent=2) if args.json else out)
    return 0 if report.ok else EXIT_FAILED
