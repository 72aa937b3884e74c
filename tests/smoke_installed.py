"""Smoke tests of the installed wheel, as a pip user gets it (issue 13).

scripts/smoke.sh (``make smoke``, part of ``make test``) installs the manylinux2014 wheel
into a fresh virtual environment outside the checkout, copies this file out beside it and
runs it there with that environment's pytest: no source tree on ``sys.path``. The first
test proves it (and fails when this file is run any other way); the others run what a pip
user runs first: ``python -m vhost demo``, a round trip through ``python -m vhost serve
blk``, mypy on a user's file against the wheel's stubs, and the examples of the package's
PyPI page, read from the installed METADATA.

The name is not ``test_*.py`` on purpose: the checkout's own suite does not collect it.
tests/test_dist.py imports its helpers for the checks it makes on the checkout's build.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vhost
import vhost._core
from vhost.devices.blk import BlkDriver

VENV_VAR = "PYVHOST_SMOKE_VENV"
CHECKOUT_VAR = "PYVHOST_CHECKOUT"
WHEEL_TAG = "cp311-abi3-manylinux_2_17_x86_64"
FIRST_COMMANDS = ["pip install pyvhost", "python -m vhost demo"]
TIMEOUT = 60.0
MiB = 1 << 20


# -- helpers (tests/test_dist.py uses them too) ---------------------------------------


def description_of(metadata: str) -> str:
    """The long description in a METADATA or PKG-INFO file: its body, after the headers
    (with one final newline: the writer may add one)."""
    _headers, sep, body = metadata.partition("\n\n")
    assert sep, "no description after the headers"
    return body.rstrip("\n") + "\n"


def fenced_blocks(markdown: str, lang: str) -> list[str]:
    """The contents of every fenced ``lang`` block of ``markdown``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", markdown, flags=re.M | re.S)


def commands_of(block: str) -> list[str]:
    """The commands of a ``sh`` block, without their comments."""
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def expected_prints(block: str) -> list[str]:
    """What a Python block says it prints: the ``# ...`` comment of each ``print(`` line."""
    return [
        line.split("#", 1)[1].strip()
        for line in block.splitlines()
        if line.lstrip().startswith("print(") and "#" in line
    ]


def clean_env() -> dict[str, str]:
    """This environment less what would put another copy of ``vhost`` in reach."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MYPYPATH"}}


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` in ``cwd`` to its end, bounded by ``timeout``, its output captured as
    text (``env``: :func:`clean_env` unless given)."""
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_python_block(block: str, cwd: Path) -> None:
    """Runs one Python example in a fresh interpreter (this one's) in ``cwd``; it must exit
    0 and print, line by line, what its ``print(...)  # ...`` comments say."""
    out = run([sys.executable, "-c", block], cwd)
    assert out.returncode == 0, f"example failed:\n{block}\n{out.stderr}"
    assert out.stdout.splitlines() == expected_prints(block), out.stdout


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: this file tests an installed wheel; run scripts/smoke.sh")
    return Path(value).resolve()


def _installed_metadata() -> str:
    text = importlib.metadata.distribution("pyvhost").read_text("METADATA")
    assert text is not None, "the installed pyvhost has no METADATA"
    return text


# -- the tests ----------------------------------------------------------------------------


def test_vhost_is_the_installed_wheel() -> None:
    venv, checkout = _env_path(VENV_VAR), _env_path(CHECKOUT_VAR)
    assert Path(sys.prefix).resolve() == venv, f"running in {sys.prefix}, not in {venv}"
    for module in (vhost, vhost._core):
        assert module.__file__ is not None
        where = Path(module.__file__).resolve()
        assert where.is_relative_to(venv), f"{module.__name__} comes from {where}, not {venv}"
        assert not where.is_relative_to(checkout), f"{module.__name__} comes from the checkout"
    in_checkout = [p for p in sys.path if p and Path(p).resolve().is_relative_to(checkout)]
    assert not in_checkout, f"sys.path reaches into the checkout: {in_checkout}"
    # A wheel install, not an editable one (which would point back into the checkout).
    dist = importlib.metadata.distribution("pyvhost")
    assert f"Tag: {WHEEL_TAG}" in (dist.read_text("WHEEL") or ""), dist.read_text("WHEEL")
    assert "editable" not in (dist.read_text("direct_url.json") or "")
    site = Path(vhost.__file__ or "").resolve().parent.parent
    for pth in site.glob("*.pth"):
        assert str(checkout) not in pth.read_text(), f"{pth} points into the checkout"


def test_demo_runs_from_the_wheel(tmp_path: Path) -> None:
    """``python -m vhost demo`` needs no other program: PATH holds only the environment's
    bin/ (no QEMU, no peer, no shell tool could start)."""
    only_venv = {**clean_env(), "PATH": str(Path(sys.executable).parent)}
    out = run([sys.executable, "-m", "vhost", "demo"], tmp_path, only_venv)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'HELLO'" in out.stdout and "'THROUGH A VIRTQUEUE'" in out.stdout, out.stdout
    assert out.stdout.count(": match") == 3 and "MISMATCH" not in out.stdout, out.stdout
    # The console script the wheel declares runs the same CLI.
    script = Path(sys.executable).parent / "pyvhost"
    out = run([str(script), "demo", "--message", "smoke"], tmp_path, only_venv)
    assert out.returncode == 0 and "'SMOKE'" in out.stdout, out.stdout + out.stderr


def test_round_trip_through_serve_blk(tmp_path: Path) -> None:
    """``python -m vhost serve blk`` of the wheel serves an image file; our driver writes
    through a virtqueue, reads back, flushes, and the bytes are in the file after SIGTERM."""
    image, sock, log = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "serve.log"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    block = os.urandom(64 * 1024)
    serve_cmd = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock)]
    serve_cmd += ["--image", str(image)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            serve_cmd,
            cwd=tmp_path,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        banner = proc.stdout.readline() if ready else b""
        assert banner.startswith(b"serving blk"), (banner, log.read_text())
        with BlkDriver.connect(sock, timeout=10.0) as disk:
            assert disk.capacity == 8 * MiB // 512
            disk.write(MiB, block)
            assert disk.read(MiB, len(block)) == block
            disk.flush()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(len(block)) == block


GOOD_USER_FILE = """\
from vhost import GuestMemory, VhostError
from vhost.devices.blk import BlkDriver


def first_sector(path: str) -> bytes:
    try:
        with BlkDriver.connect(path, timeout=5.0) as disk:
            return disk.read(0, 512)
    except VhostError as exc:
        raise SystemExit(f"{path}: {exc}") from None


ram = GuestMemory.allocate([(0, 1 << 20)])
size: int = ram.total_size
"""

BAD_USER_FILE = """\
import vhost
from vhost import GuestMemory

name: str = GuestMemory.allocate([(0, 4096)]).total_size
vhost.no_such_name
"""


def test_stubs_type_check_a_user_file(tmp_path: Path) -> None:
    """mypy --strict, run as a user runs it, finds the wheel's stubs (py.typed) in the
    fresh environment, passes a correct file and names the errors of a wrong one."""
    venv = _env_path(VENV_VAR)
    package = Path(vhost.__file__ or "").parent
    for name in ("py.typed", "__init__.pyi", "_core.pyi"):
        assert (package / name).is_file(), f"the wheel has no vhost/{name}"
    (tmp_path / "user_ok.py").write_text(GOOD_USER_FILE)
    (tmp_path / "user_bad.py").write_text(BAD_USER_FILE)

    def mypy(name: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mypy", "--strict", "-v", "--cache-dir", "cache", name]
        return run(cmd, tmp_path, timeout=300)

    ok = mypy("user_ok.py")
    assert ok.returncode == 0, ok.stdout
    parsed = re.findall(r"Parsing (\S+) \(vhost\)$", ok.stderr, flags=re.M)
    assert parsed, "mypy did not parse vhost"
    assert Path(parsed[0]).resolve() == (package / "__init__.pyi").resolve()
    assert Path(parsed[0]).resolve().is_relative_to(venv)
    bad = mypy("user_bad.py")
    assert bad.returncode == 1, bad.stdout
    assert (
        'user_bad.py:4: error: Incompatible types in assignment (expression has type "int", '
        'variable has type "str")'
    ) in bad.stdout, bad.stdout
    assert 'user_bad.py:5: error: Module has no attribute "no_such_name"' in bad.stdout, bad.stdout


def test_pypi_page_starts_with_pip_and_its_examples_run(tmp_path: Path) -> None:
    """The installed METADATA's description is the PyPI page: its first commands are
    ``pip install`` and the demo (a pip user has no Makefile), and its Python examples
    run against the wheel and print what they say."""
    page = description_of(_installed_metadata())
    first = fenced_blocks(page, "sh")[0]
    assert commands_of(first) == FIRST_COMMANDS, first
    blocks = fenced_blocks(page, "python")
    assert blocks, "the PyPI page has no Python example"
    for block in blocks:
        run_python_block(block, tmp_path)
