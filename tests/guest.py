"""A real Linux guest under QEMU (TCG) for tests that need a kernel or a front-end driver.

``scripts/build_guest.sh`` (run by ``make setup``) builds the image in
``~/.cache/pyvhost/guest/``: Debian's bookworm-backports 6.12 kernel and a busybox
initramfs whose ``/init`` loads the virtio, 9p, tun, vhost, vsock and vDPA modules and
then runs a shell script given by the test:

* ``mode="busybox"``: the script runs in the initramfs (busybox only; the host's root
  is mounted read-only at ``/host``);
* ``mode="host"``: the script runs chrooted into the host's root, mounted read-only
  over 9p, so the host's own Python, ``.venv`` and built extension work at the same
  paths (``VENV_PYTHON``). ``/tmp``, ``/run`` and ``/dev/shm`` are the guest's own
  tmpfs; everything else is the host's, read-only and cached by the guest
  (``cache=loose``, which makes Python start 3x faster): a host file changed while the
  guest runs may look stale there, so exchange data through the run dir. Tools that
  write caches need telling (``pytest -p no:cacheprovider``; bytecode is off).

In both modes the script's directory (the *run dir*, a fresh folder under
``target/guest-runs/`` by default) is mounted read-write at its host path and is the
script's working directory: put the files the guest needs there (``files=``) and let
the guest write results there. ``$PYVHOST_RUN_DIR`` and ``$PYVHOST_GUEST`` (the mode)
are set for the script. Its stdout/stderr go to the serial console, which the harness
captures; ``/init`` brackets them with markers and prints the exit status.

QEMU always gets its RAM from a shared memfd (``memory-backend-memfd,share=on``), so
callers can add vhost-user devices with ``qemu_args``, for example::

    shared_memory_args(512) + vhost_user_blk_args(SOCK)  # README.md shows the same line

:func:`run_guest` boots, waits and returns a :class:`GuestResult`;
:func:`start_guest` returns a running :class:`Guest` (wait for console text, talk QMP,
kill QEMU mid-run). A missing image fails the test, never skips it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

import peers

Mode = Literal["busybox", "host"]

GUEST_DIR = Path(os.environ.get("PYVHOST_GUEST_DIR", Path.home() / ".cache/pyvhost/guest"))
CHECKOUT = Path(__file__).resolve().parent.parent
VENV_PYTHON = CHECKOUT / ".venv" / "bin" / "python"
RUNS_DIR = CHECKOUT / "target" / "guest-runs"

START_MARK = "PYVHOST-GUEST-START"
SETUP_FAILED_MARK = "PYVHOST-GUEST-SETUP-FAILED"
_END_RE = re.compile(r"PYVHOST-GUEST-END status=(\d+)")
_START_RE = re.compile(r"PYVHOST-GUEST-START mode=\w+\n")

DEFAULT_TIMEOUT = 300.0
STOP_TIMEOUT = 10.0
TAIL_LINES = 60


# --- the image ---------------------------------------------------------------------


@dataclass(frozen=True)
class GuestImage:
    """The kernel and initramfs built by ``scripts/build_guest.sh``."""

    vmlinuz: Path
    initrd: Path
    kver: str


def guest_image() -> GuestImage:
    """The guest image; fails the test (never skips) when it has not been built."""
    vmlinuz, initrd, kver = GUEST_DIR / "vmlinuz", GUEST_DIR / "initrd.gz", GUEST_DIR / "KVER"
    missing = [p for p in (vmlinuz, initrd, kver) if not p.is_file()]
    if missing:
        pytest.fail(
            f"guest image missing ({', '.join(map(str, missing))}); run `make setup` "
            "(scripts/setup.sh calls scripts/build_guest.sh)",
            pytrace=False,
        )
    return GuestImage(vmlinuz, initrd, kver.read_text().strip())


def qemu_binary() -> Path:
    """``qemu-system-x86_64``; fails the test when it is missing."""
    return peers.find_binary("qemu-system-x86_64")


@functools.cache
def qemu_version() -> str:
    """First line of ``qemu-system-x86_64 --version`` (for reports)."""
    path = peers.locate_binary("qemu-system-x86_64")
    return peers.binary_version(path) if path else "qemu-system-x86_64: NOT FOUND"


# --- results -----------------------------------------------------------------------


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) or "(no console output)"


@dataclass(frozen=True)
class GuestResult:
    """What a finished (or killed) guest left behind."""

    output: str
    """The whole serial console, ``\\r\\n`` turned into ``\\n``."""
    status: int | None
    """The script's exit status from the end marker; None when the marker is missing."""
    returncode: int | None
    """QEMU's exit status (0 after the guest's ``poweroff``; negative when killed)."""
    timed_out: bool
    elapsed: float
    argv: tuple[str, ...]

    @property
    def started(self) -> bool:
        """True when ``/init`` reached the point of running the script."""
        return START_MARK in self.output

    @property
    def script_output(self) -> str:
        """What the script printed (console between the start and end markers)."""
        start = _START_RE.search(self.output)
        body = self.output[start.end() :] if start else ""
        end = _END_RE.search(body)
        if end:
            body = body[: end.start()]
            body = body.removesuffix("\n")
        return body

    def tail(self, lines: int = TAIL_LINES) -> str:
        return _tail(self.output, lines)

    def _why_unfinished(self) -> str:
        if self.timed_out:
            return f"timed out after {self.elapsed:.0f}s and was killed"
        if SETUP_FAILED_MARK in self.output:
            return "its /init could not set up (see the console)"
        if not self.started:
            return f"did not come up (QEMU exit status {self.returncode})"
        return f"stopped before the script finished (QEMU exit status {self.returncode})"

    def check(self, status: int | None = 0) -> GuestResult:
        """Assert the script ran to its end marker (and exited with ``status``, unless None).

        Raises AssertionError with the console tail and QEMU's command line otherwise.
        Returns self, so ``run_guest(...).check()`` reads naturally.
        """
        if self.status is None:
            raise AssertionError(
                f"guest {self._why_unfinished()}; no end marker on the console\n"
                f"  qemu: {shlex.join(self.argv)}\n"
                f"  console tail:\n{self.tail()}"
            )
        if status is not None and self.status != status:
            raise AssertionError(
                f"guest script exited with status {self.status}, expected {status}\n"
                f"  script output tail:\n{_tail(self.script_output)}"
            )
        return self


# --- a running guest ---------------------------------------------------------------


class Guest:
    """A QEMU guest running in the background (from :func:`start_guest`).

    Use it as a context manager: leaving kills QEMU if it is still running and removes
    the run dir the harness made (a run dir the caller gave is left alone).
    """

    def __init__(
        self,
        argv: Sequence[str],
        run_dir: Path,
        console_path: Path,
        qmp_path: Path,
        cleanup: Sequence[Path],
    ) -> None:
        self.argv = tuple(argv)
        self.run_dir = run_dir
        self.console_path = console_path
        self.qmp_path = qmp_path
        self._cleanup = tuple(cleanup)
        self._started_at = time.monotonic()
        self._result: GuestResult | None = None
        self._timed_out = False
        with open(console_path, "wb") as console:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                self._remove_files()
                pytest.fail(f"cannot start QEMU: {exc}\n  argv: {shlex.join(argv)}", pytrace=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        """The serial console so far."""
        if self._result is not None:
            return self._result.output
        try:
            raw = self.console_path.read_bytes()
        except OSError:
            return ""
        return raw.decode(errors="replace").replace("\r\n", "\n")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 120.0, *, count: int = 1
    ) -> re.Match[str]:
        """Wait until the console shows ``pattern`` (plain text or a regex) ``count`` times;
        return the last of those matches.

        Raises AssertionError with the console tail if QEMU exits first or time runs out.
        """
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        shown = f"{regex.pattern!r}" + (f" {count} times" if count != 1 else "")
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive()  # read the console after: QEMU's last words count
            found = list(itertools.islice(regex.finditer(self.output), count))
            if len(found) == count:
                return found[-1]
            if exited:
                raise AssertionError(
                    f"QEMU exited (status {self.proc.returncode}) before the console showed "
                    f"{shown}\n  console tail:\n{_tail(self.output)}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"console did not show {shown} within {timeout:.0f}s\n"
                    f"  console tail:\n{_tail(self.output)}"
                )
            time.sleep(0.05)

    def qmp(self, timeout: float = 30.0) -> peers.Qmp:
        """A new QMP connection to this QEMU (use it as a context manager)."""
        return peers.Qmp(self.qmp_path, timeout)

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off after its script); kill it on timeout."""
        if self._result is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._timed_out = True
                self._signal(signal.SIGKILL)
        return self._finish()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> GuestResult:
        """Stop QEMU now (SIGKILL by default: a front-end that dies mid-run)."""
        if self._result is None:
            self._signal(sig)
        return self._finish()

    def _signal(self, sig: signal.Signals) -> None:
        for s in (sig, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, s)
            try:
                self.proc.wait(STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()

    def _finish(self) -> GuestResult:
        if self._result is None:
            output = self.output
            end = _END_RE.search(output)
            self._result = GuestResult(
                output=output,
                status=int(end.group(1)) if end else None,
                returncode=self.proc.returncode,
                timed_out=self._timed_out,
                elapsed=time.monotonic() - self._started_at,
                argv=self.argv,
            )
        return self._result

    def _remove_files(self) -> None:
        for path in self._cleanup:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def close(self) -> GuestResult:
        """Kill QEMU if it still runs, then remove the harness's own files."""
        result = self.kill()
        self._remove_files()
        return result

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_path(path: Path, what: str) -> None:
    text = os.fspath(path)
    if not path.is_absolute() or re.search(r'[\s"]', text):
        raise ValueError(f"{what} must be an absolute path without spaces or quotes: {text!r}")


def _qemu_escape(value: str | os.PathLike[str]) -> str:
    return os.fspath(value).replace(",", ",,")


def shared_memory_args(memory_mb: int) -> list[str]:
    """QEMU's RAM from a shared memfd, as vhost-user needs it (README.md shows these)."""
    return [
        "-M",
        "q35,memory-backend=mem",
        "-m",
        f"{memory_mb}M",
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
    ]


def vhost_user_blk_args(
    socket: str | os.PathLike[str], *, queues: int = 1, reconnect: bool = False
) -> list[str]:
    """A vhost-user-blk device on the back-end at ``socket`` (README.md shows these)."""
    chardev = f"socket,id=c0,path={_qemu_escape(socket)}"
    if reconnect:
        chardev += ",reconnect-ms=200"
    return ["-chardev", chardev, "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={queues}"]


def boot_args(
    *, initrd: Path, append: Sequence[str], memory_mb: int, smp: int, qmp_path: Path
) -> list[str]:
    """QEMU's command line for the guest kernel with ``initrd``, without any device: TCG,
    RAM from a shared memfd, the serial console on stdout (:class:`Guest` sends it to a
    file), QMP on ``qmp_path``. :func:`start_guest` adds its 9p shares; a migrating guest
    (``tests/migration.py``) cannot have them and brings its own initramfs segment."""
    return [
        str(qemu_binary()),
        "-accel",
        "tcg",
        *shared_memory_args(memory_mb),
        "-smp",
        str(smp),
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(guest_image().vmlinuz),
        "-initrd",
        str(initrd),
        "-append",
        " ".join(append),
        "-qmp",
        f"unix:{_qemu_escape(qmp_path)},server=on,wait=off",
    ]


def start_guest(
    script: str,
    *,
    mode: Mode = "host",
    qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    smp: int = 2,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    kernel_args: Sequence[str] = (),
) -> Guest:
    """Boot the guest in the background; it runs ``script`` (``/bin/sh``) and powers off.

    ``files`` are written into the run dir beside ``script.sh`` before boot. With
    ``run_dir`` the caller chooses (and keeps) the run dir, for instance to read what
    the guest wrote there; otherwise a fresh one under ``target/guest-runs/`` is
    removed when the :class:`Guest` closes.
    """
    image = guest_image()
    cleanup: list[Path] = []
    if run_dir is None:
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS_DIR))
        cleanup.append(run_dir)
    else:
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    _check_path(run_dir, "run_dir")
    (run_dir / "script.sh").write_text(script)
    for name, content in (files or {}).items():
        dest = run_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            dest.write_text(content)
    console_path = run_dir / "console.log"
    qmp_path = run_dir / "qmp.sock"
    if len(os.fsencode(qmp_path)) >= 100:  # sun_path holds 108 bytes
        qmp_dir = Path(tempfile.mkdtemp(prefix="pvq-", dir="/tmp"))
        cleanup.append(qmp_dir)
        qmp_path = qmp_dir / "qmp.sock"
    append = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        f"pyvhost.mode={mode}",
        f"pyvhost.run={run_dir}",
        # The checkout stays visible in host mode even under /tmp (a CI clone may be).
        f"pyvhost.keep={CHECKOUT}",
        *kernel_args,
    ]
    argv = [
        *boot_args(
            initrd=image.initrd, append=append, memory_mb=memory_mb, smp=smp, qmp_path=qmp_path
        ),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={_qemu_escape(run_dir)},mount_tag=pvrun,security_model=none,multidevs=remap",
        *qemu_args,
    ]
    return Guest(argv, run_dir, console_path, qmp_path, cleanup)


def run_guest(
    script: str,
    *,
    mode: Mode = "host",
    qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    smp: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    kernel_args: Sequence[str] = (),
) -> GuestResult:
    """Boot the guest, run ``script`` in it, wait for power-off (at most ``timeout`` s).

    Does not raise on failure: call :meth:`GuestResult.check` (or look at ``status``).
    """
    with start_guest(
        script,
        mode=mode,
        qemu_args=qemu_args,
        memory_mb=memory_mb,
        smp=smp,
        files=files,
        run_dir=run_dir,
        kernel_args=kernel_args,
    ) as guest:
        return guest.wait(timeout)
