"""The command line: ``python -m vhost {probe,demo,blk,serve,bench} ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import VhostError
from . import bench, blk, demo, probe, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vhost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    probe.add_parser(sub)
    demo.add_parser(sub)
    blk.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except VhostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code
