"""How a guest script reports: one ``KERN-CHECK <name> PASS|FAIL <detail>`` line per check
on the console (the host-side test asserts on them), and a JSON file of all results in
the run dir (the working directory)."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vhost import InvalidParamError, KernelError

RESULTS: dict[str, dict[str, object]] = {}


def record(name: str, ok: bool, detail: str = "", **data: object) -> None:
    """Record one check and print its line at once (the console is the log)."""
    RESULTS[name] = {"ok": ok, "detail": detail, **data}
    print(f"KERN-CHECK {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)


@contextmanager
def check(name: str) -> Iterator[dict[str, object]]:
    """Run a block as check ``name``: PASS unless it raises; ``info`` entries are saved."""
    info: dict[str, object] = {}
    start = time.monotonic()
    try:
        yield info
    except Exception as exc:
        traceback.print_exc(file=sys.stdout)
        record(name, False, f"{type(exc).__name__}: {exc}", **info)
    else:
        info.setdefault("seconds", round(time.monotonic() - start, 3))
        detail = " ".join(f"{k}={v}" for k, v in info.items())
        record(name, True, detail, **info)


def errno_of(call: Callable[[], object]) -> str:
    """Runs ``call``: the errno name of the KernelError it raises, or ``"no error"``."""
    try:
        call()
    except KernelError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "no error"


def bad_int_refusals(calls: dict[str, tuple[Callable[[int], object], int]]) -> dict[str, str]:
    """Each ``"method:argument": (call, bits)`` run with -1 and ``2**bits``: ``"ok"`` when
    both raised an InvalidParamError naming the method, the argument and the value (before
    anything reached the kernel), else what happened instead."""
    got = {}
    for name, (call, bits) in calls.items():
        method, arg = name.split(":")
        outcome = "ok"
        for value in (-1, 1 << bits):
            try:
                call(value)
            except InvalidParamError as e:
                if not str(e).startswith(f"{method}: {arg}: {value} is out of range"):
                    outcome = f"message {e}"
            except Exception as e:  # reported, not raised: the test names the call
                outcome = f"{type(e).__name__}: {e}"
            else:
                outcome = f"accepted {value}"
        got[name] = outcome
    return got


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_count() -> int:
    """Mappings of this process (guest memory is one per region)."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def run(checks: list[Callable[[], None]], out: str) -> int:
    """Run each check function, write the results to ``out``; exit 0 when all passed."""
    for fn in checks:
        fn()
    Path(out).write_text(json.dumps(RESULTS, indent=1, sort_keys=True))
    return 0 if all(r["ok"] for r in RESULTS.values()) else 1
