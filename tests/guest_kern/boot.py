"""Host side: boot the test guest once per pytest process and run every kernel vhost and
vDPA check in it (``run_all net vsock vdpa``); the test modules assert on the results.

One boot serves ``test_kern_guest.py`` and ``test_vdpa_guest.py`` (each boot costs 10 to
30 s under TCG), so the results are cached here.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest import CHECKOUT, RUNS_DIR, VENV_PYTHON, GuestResult, run_guest
from guest_kern.vduse_host import extract_virtio_vdpa

AREAS = ("net", "vsock", "vdpa", "vduse")


@dataclass(frozen=True)
class KernRun:
    result: GuestResult
    checks: dict[str, dict[str, Any]]
    failure: str | None = None
    """Why the guest did not finish its script (then every check fails with it)."""

    def check(self, name: str) -> dict[str, Any]:
        """The info of check ``name``; AssertionError (with the console) unless it passed."""
        if self.failure is not None:
            raise AssertionError(f"guest check {name}: the guest run failed\n{self.failure}")
        got = self.checks.get(name)
        if got is None or not got["ok"]:
            raise AssertionError(
                f"guest check {name}: {got['detail'] if got else 'did not run'}\n"
                f"--- guest console (tail) ---\n{self.result.tail(80)}"
            )
        return got


@functools.cache
def kern_guest() -> KernRun:
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    extract_virtio_vdpa()  # the VDUSE checks' /dev/vdX needs it (see vduse_host.py)
    run_dir = tempfile.mkdtemp(prefix="kern-", dir=RUNS_DIR)
    script = (
        f"cd {CHECKOUT / 'tests'} && {VENV_PYTHON} -m guest_kern.run_all "
        f'{" ".join(AREAS)} --out "$PYVHOST_RUN_DIR/results.json"\n'
    )
    try:
        result = run_guest(script, mode="host", run_dir=Path(run_dir), timeout=600)
        try:
            result.check(status=None)
        except AssertionError as exc:
            # Cached like a success: one failed boot fails every test once, not one boot each.
            return KernRun(result, {}, str(exc))
        path = Path(run_dir) / "results.json"
        checks = json.loads(path.read_text()) if path.exists() else {}
        return KernRun(result, checks)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
