"""Shared pytest setup: report header with peer versions, fd and socket-dir fixtures."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The benchmark reference client (benches/pyclient.py) is importable as `pyclient`.
_BENCHES = Path(__file__).resolve().parent.parent / "benches"
if str(_BENCHES) not in sys.path:
    sys.path.insert(0, str(_BENCHES))

import peers  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest import)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Versions of every real peer, so each report says what it ran against."""
    lines = [f"machine: {os.cpu_count()} cpus, kernel {platform.release()}"]
    for label, path in (
        ("qemu-system-x86_64", peers.locate_binary("qemu-system-x86_64")),
        ("qemu-storage-daemon", peers.locate_binary("qemu-storage-daemon")),
        ("virtiofsd", peers.locate_binary("virtiofsd", peers.VIRTIOFSD_CANDIDATES)),
    ):
        version = peers.binary_version(path) if path else "NOT FOUND (run `make setup`)"
        lines.append(f"{label}: {version}" + (f" [{path}]" if path else ""))
    return lines


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fd_count() -> Callable[[], int]:
    """A function returning how many file descriptors this process has open (leak checks)."""
    return _fd_count


@pytest.fixture
def tmp_sock_dir() -> Iterator[Path]:
    """A fresh short directory under /tmp for Unix sockets (sun_path holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
