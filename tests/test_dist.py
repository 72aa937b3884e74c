"""What is published, and the README's first command (issue 13).

* scripts/wheel.sh (``make wheel``) builds a manylinux2014 abi3 wheel, which auditwheel
  finds consistent with ``manylinux_2_17`` (the old ``make wheel`` made ``manylinux_2_34``,
  which pip on Debian 11, Ubuntu 20.04 or RHEL 8 refuses), and an sdist that carries every
  source file and builds a wheel offline;
* the wheel's description (its PyPI page) is python/README.md, which starts with ``pip
  install`` and the demo, not with ``make``; its Python examples run;
* ``make demo`` runs no set-up of the test peers (no apt, QEMU, guest, virtiofsd):
  scripts/venv.sh, the build, the demo; scripts/venv.sh says in one line what is missing
  or too old.

The installed wheel itself is tested from a fresh environment by tests/smoke_installed.py
(scripts/smoke.sh, ``make smoke``), whose helpers this file shares.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from smoke_installed import (
    FIRST_COMMANDS,
    WHEEL_TAG,
    commands_of,
    description_of,
    fenced_blocks,
    run,
    run_python_block,
)

CHECKOUT = Path(__file__).resolve().parent.parent
VENV = CHECKOUT / ".venv"
PAGE = CHECKOUT / "python" / "README.md"
PIP = [str(VENV / "bin" / "python"), "-m", "pip"]
# The interpreter .venv was made from (a venv's own python is not one to make others with).
BASE_PYTHON = Path(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
BUILD_TIMEOUT = 1200.0  # a cold release build of the crate, on 2 loaded CPUs
# What `make demo` must not do: the test set-up (scripts/setup.sh) and its parts.
SETUP_WORDS = ("setup.sh", "apt", "qemu", "build_guest", "virtiofsd", "cargo install", "fuzz")


@dataclass(frozen=True)
class Dist:
    """What scripts/wheel.sh built, and what it printed."""

    wheel: Path
    sdist: Path
    log: str


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    cmd = ["bash", str(CHECKOUT / "scripts" / "wheel.sh"), "--out", str(out)]
    built = run(cmd, CHECKOUT, dict(os.environ), BUILD_TIMEOUT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = out.glob("pyvhost-*.whl")
    (sdist,) = out.glob("pyvhost-*.tar.gz")
    return Dist(wheel, sdist, built.stdout + built.stderr)


def _wheel_text(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (member,) = [m for m in z.namelist() if m.endswith(f".dist-info/{name}")]
        return z.read(member).decode()


def _sdist_members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as t:
        return {m.name.split("/", 1)[1]: m for m in t.getmembers() if "/" in m.name}


# -- the wheel ----------------------------------------------------------------------------


def test_wheel_is_manylinux2014_abi3(dist: Dist) -> None:
    assert dist.wheel.name.endswith(
        "-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    ), dist.wheel.name
    tags = re.findall(r"^Tag: (\S+)$", _wheel_text(dist.wheel, "WHEEL"), flags=re.M)
    assert WHEEL_TAG in tags, tags
    # auditwheel reads the extension's glibc symbol versions: the tag it really satisfies.
    show = run([str(VENV / "bin" / "auditwheel"), "show", str(dist.wheel)], CHECKOUT)
    assert show.returncode == 0, show.stderr
    said = " ".join(show.stdout.split())
    assert 'consistent with the following platform tag: "manylinux_2_17_x86_64"' in said, said
    with zipfile.ZipFile(dist.wheel) as z:
        names = set(z.namelist())
    for name in ("_core.abi3.so", "py.typed", "__init__.pyi", "_core.pyi"):
        assert f"vhost/{name}" in names, f"the wheel has no vhost/{name}"


def test_wheel_description_is_the_pypi_page(dist: Dist) -> None:
    metadata = _wheel_text(dist.wheel, "METADATA")
    assert "\nDescription-Content-Type: text/markdown" in metadata
    page = description_of(metadata)
    assert page == PAGE.read_text(), "the wheel's description is not python/README.md"
    first = commands_of(fenced_blocks(page, "sh")[0])
    assert first == FIRST_COMMANDS, first
    assert not first[0].startswith("make"), "a pip user has no Makefile"
    # README.md, the developer's page, keeps its two make commands first.
    readme = (CHECKOUT / "README.md").read_text()
    assert [c.split()[:2] for c in commands_of(fenced_blocks(readme, "sh")[0])] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def test_pypi_page_examples_run(tmp_path: Path) -> None:
    blocks = fenced_blocks(PAGE.read_text(), "python")
    assert blocks, "python/README.md has no Python example"
    for block in blocks:
        run_python_block(block, tmp_path)


# -- the sdist ----------------------------------------------------------------------------


def test_sdist_carries_every_source_and_the_page(dist: Dist) -> None:
    members = _sdist_members(dist.sdist)
    ls = run(["git", "ls-files", "rust", "python", "Cargo.*", "pyproject.toml"], CHECKOUT)
    assert ls.returncode == 0, ls.stderr
    tracked = ls.stdout.split()
    assert "rust/py/src/lib.rs" in tracked
    missing = sorted(set(tracked) - set(members))
    assert not missing, f"the sdist lacks tracked files: {missing}"
    assert "python/README.md" in members
    built = [n for n in members if n.endswith(".so") or n.startswith(("target/", ".venv/"))]
    assert not built, f"the sdist carries build output: {built}"
    with tarfile.open(dist.sdist) as t:
        (pkg_info,) = [m for m in t.getmembers() if m.name.endswith("/PKG-INFO")]
        f = t.extractfile(pkg_info)
        assert f is not None
        assert description_of(f.read().decode()) == PAGE.read_text()


def test_sdist_builds_a_wheel_offline(dist: Dist, tmp_path: Path) -> None:
    """pip builds a wheel from the sdist alone, with no index and cargo offline (the crates
    from the local registry). Cargo's target dir is the checkout's, where `make build` put
    the same crates: cargo fingerprints path crates relative to their workspace, so an
    unpacked sdist of unchanged sources costs no compile (a changed source is compiled)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env |= {
        "PATH": f"{VENV / 'bin'}:{env.get('PATH', '')}",
        "CARGO_NET_OFFLINE": "true",
        "CARGO_TARGET_DIR": str(CHECKOUT / "target"),
        "PYO3_PYTHON": str(VENV / "bin" / "python"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    out = tmp_path / "out"
    offline = ["--no-build-isolation", "--no-deps", "--no-index"]
    cmd = [*PIP, "wheel", *offline, "-w", str(out), str(dist.sdist)]
    built = run(cmd, tmp_path, env, BUILD_TIMEOUT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = out.glob("pyvhost-*-cp311-abi3-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"vhost/_core.abi3.so", "vhost/py.typed", "vhost/__init__.pyi"} <= names


# -- make demo ----------------------------------------------------------------------------


# Set by a make that runs this suite (`make test`, which CI runs): a child make would then
# print "make[1]: Entering directory" lines. A user's shell has none of them.
PARENT_MAKE = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")


def _shell_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: ours without a parent make's variables."""
    return {k: v for k, v in os.environ.items() if k not in PARENT_MAKE} | extra


def test_make_demo_runs_no_test_setup() -> None:
    dry = run(["make", "-n", "demo"], CHECKOUT, _shell_env())
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines == [
        f"VENV={VENV} bash scripts/venv.sh",
        f"VIRTUAL_ENV={VENV} {VENV}/bin/maturin develop --release",
        f"{VENV}/bin/python -m vhost demo",
    ], lines
    for word in SETUP_WORDS:
        assert word not in dry.stdout, f"make demo runs {word!r}"
    # Nor does scripts/venv.sh, its one script (its apt-get is a hint in a message).
    venv_sh = (CHECKOUT / "scripts" / "venv.sh").read_text()
    code = [line.split("#", 1)[0] for line in venv_sh.splitlines()]
    firsts = {line.split()[0] for line in code if line.strip()}
    assert not firsts & {"apt-get", "apt", "sudo"}, firsts
    for word in SETUP_WORDS:
        if word != "apt":
            assert word not in "\n".join(code).lower(), f"scripts/venv.sh runs {word!r}"


# What scripts/venv.sh runs besides Python and Rust.
SHELL_TOOLS = ("bash", "dirname", "sed", "head", "sort", "awk")


def _path_with(tmp_path: Path, *tools: str) -> str:
    """A PATH of one folder holding this machine's ``tools`` and python3, nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(BASE_PYTHON.resolve())
    for tool in (*SHELL_TOOLS, *tools):
        found = shutil.which(tool)
        assert found, f"{tool} is not on this machine's PATH"
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _one_error_line(failed: subprocess.CompletedProcess[str], words: str) -> None:
    """`make demo` failed with our one line (then make's own one line), no traceback."""
    assert failed.returncode != 0
    lines = failed.stderr.splitlines()
    assert lines and lines[0].startswith("error: " + words), failed.stderr
    assert all(line.startswith("make: ***") for line in lines[1:]), failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr


def test_make_demo_without_cargo_says_so_in_one_line(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    make = shutil.which("make")
    assert make
    env = _shell_env(PATH=_path_with(tmp_path))
    failed = run([make, "demo", f"VENV={venv}"], CHECKOUT, env)
    _one_error_line(failed, "cargo not found on PATH: install Rust 1.80 or newer")
    assert not venv.exists(), "the checks must come before anything is made"


def test_venv_sh_without_a_c_compiler_says_so_in_one_line(tmp_path: Path) -> None:
    """rustup installs no linker; without cc the build would fail deep in cargo's output."""
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": _path_with(tmp_path, "cargo", "rustc"), "VENV": str(venv)}
    failed = run(["/bin/bash", str(CHECKOUT / "scripts" / "venv.sh")], tmp_path, env)
    assert failed.returncode == 1 and failed.stderr == (
        "error: no C compiler (cc) on PATH: Rust links through it "
        "(Debian and Ubuntu: apt-get install gcc)\n"
    ), failed.stderr
    assert not venv.exists()


def _venv_sh_requiring(tmp_path: Path, python: str, rust: str) -> Path:
    """scripts/venv.sh in a copy of the checkout's top whose pyproject.toml and Cargo.toml
    ask for these versions (the ones it reads)."""
    root = tmp_path / "root"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(CHECKOUT / "scripts" / "venv.sh", root / "scripts")
    for name, key, version in (
        ("pyproject.toml", "requires-python", f">={python}"),
        ("Cargo.toml", "rust-version", rust),
    ):
        text = (CHECKOUT / name).read_text()
        text, n = re.subn(rf'^{key} = "[^"]*"', f'{key} = "{version}"', text, flags=re.M)
        assert n == 1, f"no {key} in {name}"
        (root / name).write_text(text)
    return root / "scripts" / "venv.sh"


def _venv_sh(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run(["bash", str(script)], script.parent, {**os.environ, **env}, 300)


def test_venv_sh_names_a_too_old_python_or_rust(tmp_path: Path) -> None:
    """This machine's Python and Rust against minimums they do not meet, read from where
    scripts/venv.sh reads them: one line each, naming the interpreter or rustc."""
    python = BASE_PYTHON.resolve()
    have = ".".join(map(str, sys.version_info[:3]))
    venv = tmp_path / "venv"
    script = _venv_sh_requiring(tmp_path, "3.99", "1.80")
    out = _venv_sh(script, PYTHON=str(python), VENV=str(venv))
    assert out.returncode == 1 and out.stderr == (
        f"error: {python} is Python {have}; pyvhost needs Python 3.99 or newer: "
        "name one with PYTHON=/path/to/python3.99\n"
    ), out.stderr
    assert not venv.exists()
    # An environment made earlier with a Python now too old.
    made = run([str(python), "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    out = _venv_sh(script, VENV=str(venv))
    assert out.returncode == 1 and out.stderr.startswith(
        f"error: {venv} was made with Python {have}, older than 3.99: remove it"
    ), out.stderr
    assert out.stderr.count("\n") == 1
    script = _venv_sh_requiring(tmp_path / "rust", "3.11", "99.0")
    out = _venv_sh(script, PYTHON=str(python), VENV=str(tmp_path / "venv2"))
    assert out.returncode == 1 and re.fullmatch(
        r"error: rustc is \S+; pyvhost needs Rust 99\.0 or newer \(rustup update\)\n", out.stderr
    ), out.stderr


def test_venv_sh_makes_an_environment_with_maturin(tmp_path: Path) -> None:
    """The first step of `make demo` on a machine with only Python and Rust: a new
    environment with the build backend pyproject.toml declares, and nothing else."""
    venv = tmp_path / "venv"
    out = _venv_sh(CHECKOUT / "scripts" / "venv.sh", VENV=str(venv))
    assert out.returncode == 0, out.stdout + out.stderr
    maturin = run([str(venv / "bin" / "maturin"), "--version"], tmp_path)
    assert maturin.stdout.startswith("maturin 1."), maturin.stdout + maturin.stderr
    freeze = run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"], tmp_path).stdout
    names = {line.split("==")[0].lower() for line in freeze.split()}
    assert names <= {"maturin", "pip", "setuptools", "wheel", "tomli"}, names
    # A second run changes nothing and says nothing.
    again = _venv_sh(CHECKOUT / "scripts" / "venv.sh", VENV=str(venv))
    assert again.returncode == 0 and again.stdout == again.stderr == ""
