"""A Linux guest under QEMU: boot it, run commands in it, read its console.

:func:`boot` starts a guest that waits for commands (:meth:`Guest.run`);
:func:`start_script` / :func:`run_script` start one that runs a shell script and powers
off. Both share the guest's *run dir*: a host directory mounted read-write at the same
path in the guest and used as the commands' working directory, so files placed there
by the host are visible to the guest and the other way round.

Two modes choose what the commands run on:

* ``busybox``: the initramfs (busybox only, fast to start; the host's root is mounted
  read-only at ``/host``);
* ``host``: the host's own root, mounted read-only over 9p and chrooted into, so the
  host's Python and virtualenv work at the same paths. ``/tmp``, ``/run`` and
  ``/dev/shm`` are the guest's own tmpfs (``keep`` names a host directory under them
  that must stay visible); exchange data through the run dir, which is always live.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from .errors import CommandFailed, GuestFailed, GuestSetupError
from .image import GuestImage, ensure_image
from .qemu import (
    Accel,
    Device,
    choose_accel,
    devices_args,
    find_qemu,
    qemu_escape,
    shared_memory_args,
)

__all__ = [
    "CommandResult",
    "Guest",
    "GuestResult",
    "Mode",
    "boot",
    "boot_args",
    "run_script",
    "start_script",
    "tail",
]

Mode = Literal["busybox", "host"]
"""What guest commands run on: the busybox initramfs, or the host's root (read-only)."""

START_MARK = "PYVHOST-GUEST-START"
"""Console marker: the guest's ``/init`` is about to run the script or take commands."""
SETUP_FAILED_MARK = "PYVHOST-GUEST-SETUP-FAILED"
"""Console marker: ``/init`` could not set up (the reason follows it)."""
_END_RE = re.compile(r"PYVHOST-GUEST-END status=(\d+)")
_START_RE = re.compile(r"PYVHOST-GUEST-START mode=\w+[^\n]*\n")

BOOT_TIMEOUT = 180.0
"""Seconds :func:`boot` waits for the guest to accept commands (TCG is slow)."""
SCRIPT_TIMEOUT = 300.0
"""Seconds :meth:`Guest.wait` waits for a script guest to power off."""
COMMAND_TIMEOUT = 120.0
"""Seconds :meth:`Guest.run` waits for one command."""
STOP_TIMEOUT = 10.0
"""Seconds a guest (or QEMU after a signal) gets to stop before SIGKILL."""
TAIL_LINES = 60
"""Console lines error messages show."""
_SUN_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text`` (what error messages show of a console)."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) or "(no console output)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@dataclass(frozen=True)
class CommandResult:
    """What one command run in the guest (:meth:`Guest.run`) left."""

    command: str
    """The command as given to :meth:`Guest.run`."""
    status: int
    """The command's exit status in the guest."""
    stdout_bytes: bytes
    """Standard output, byte for byte."""
    stderr_bytes: bytes
    """Standard error, byte for byte."""

    @property
    def stdout(self) -> str:
        """Standard output as text (invalid UTF-8 replaced)."""
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        """Standard error as text (invalid UTF-8 replaced)."""
        return self.stderr_bytes.decode(errors="replace")


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
    """True when :meth:`Guest.wait` ran out of time and killed QEMU."""
    elapsed: float
    """Seconds from QEMU's start to its end."""
    argv: tuple[str, ...]
    """QEMU's command line."""

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
        """The last ``lines`` lines of the console."""
        return tail(self.output, lines)

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

        Raises :class:`GuestFailed` with the console tail and QEMU's command line
        otherwise. Returns self, so ``run_script(...).check()`` reads naturally.
        """
        if self.status is None:
            raise GuestFailed(
                f"guest {self._why_unfinished()}; no end marker on the console\n"
                f"  qemu: {shlex.join(self.argv)}\n"
                f"  console tail:\n{self.tail()}"
            )
        if status is not None and self.status != status:
            raise GuestFailed(
                f"guest script exited with status {self.status}, expected {status}\n"
                f"  script output tail:\n{tail(self.script_output)}"
            )
        return self


class Guest:
    """A QEMU guest running in the background.

    Made by :func:`boot` (a guest that runs commands: :meth:`run`) or
    :func:`start_script` (one that runs a script and powers off: :meth:`wait`). Use it
    as a context manager: leaving stops QEMU (politely first when the guest takes
    commands) and removes the files the harness made (a run dir the caller gave is
    kept).
    """

    def __init__(
        self,
        argv: Sequence[str],
        run_dir: Path,
        console_path: Path,
        qmp_path: Path,
        cleanup: Sequence[Path],
        *,
        agent_path: Path | None = None,
    ) -> None:
        self.argv = tuple(argv)
        """QEMU's command line."""
        self.run_dir = run_dir
        """The directory shared read-write with the guest at the same path."""
        self.console_path = console_path
        """The file the serial console is written to."""
        self.qmp_path = qmp_path
        """QEMU's QMP socket (``-qmp unix:...``)."""
        self.agent_path = agent_path
        """The command channel's socket (None for a script guest)."""
        self.commands: list[CommandResult] = []
        """Every command run so far, in order (for reports)."""
        self._cleanup = tuple(cleanup)
        self._started_at = time.monotonic()
        self._result: GuestResult | None = None
        self._timed_out = False
        self._agent: socket.socket | None = None
        self._agent_buffer = b""
        self._broken: str | None = None
        self._sequence = itertools.count(1)
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
                raise GuestSetupError(
                    f"cannot start QEMU ({self.argv[0]}): {exc}\n  argv: {shlex.join(argv)}"
                ) from None

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.proc.pid

    @property
    def output(self) -> str:
        """The serial console so far (``\\r\\n`` turned into ``\\n``)."""
        if self._result is not None:
            return self._result.output
        try:
            raw = self.console_path.read_bytes()
        except OSError:
            return ""
        return raw.decode(errors="replace").replace("\r\n", "\n")

    def alive(self) -> bool:
        """True while QEMU runs."""
        return self.proc.poll() is None

    def report(self, lines: int = TAIL_LINES) -> str:
        """The commands run so far and the console's tail: what a failure should show."""
        parts = [f"qemu (pid {self.pid}): {shlex.join(self.argv)}"]
        for cmd in self.commands[-10:]:
            parts.append(f"$ {cmd.command.strip()}\n  -> exit status {cmd.status}")
        parts.append(f"console tail:\n{tail(self.output, lines)}")
        return "\n".join(parts)

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = 120.0,
        *,
        count: int = 1,
        description: str | None = None,
    ) -> re.Match[str]:
        """Wait until the console shows ``pattern`` (plain text or a regex) ``count`` times;
        return the last of those matches. ``description`` names what is awaited in errors
        (default: the pattern).

        Raises :class:`GuestFailed` with the console tail if QEMU exits first or time
        runs out.
        """
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        shown = description or f"{regex.pattern!r}" + (f" {count} times" if count != 1 else "")
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive()  # read the console after: QEMU's last words count
            found = list(itertools.islice(regex.finditer(self.output), count))
            if len(found) == count:
                return found[-1]
            if exited:
                raise GuestFailed(
                    f"QEMU exited (status {self.proc.returncode}) before the console showed "
                    f"{shown}\n  console tail:\n{tail(self.output)}"
                )
            if time.monotonic() >= deadline:
                raise GuestFailed(
                    f"console did not show {shown} within {timeout:.0f}s\n"
                    f"  console tail:\n{tail(self.output)}"
                )
            time.sleep(0.05)

    # --- commands (a guest from boot()) ----------------------------------------------

    def _connect_agent(self, timeout: float) -> None:
        if self.agent_path is None:
            raise GuestSetupError("this guest runs a script; boot() a guest to run commands")
        self.wait_for(_START_RE, timeout, description="the guest ready for commands")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(self.agent_path))
        except OSError as exc:
            sock.close()
            raise GuestFailed(
                f"cannot connect to the guest's command channel {self.agent_path}: {exc}\n"
                + self.report()
            ) from None
        self._agent = sock

    def _read_reply(self, deadline: float) -> bytes:
        assert self._agent is not None
        while b"\n" not in self._agent_buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._agent.settimeout(min(left, 0.5))
            try:
                chunk = self._agent.recv(4096)
            except TimeoutError:
                if not self.alive():
                    raise ConnectionError("QEMU exited") from None
                continue
            if not chunk:
                raise ConnectionError("the command channel closed")
            self._agent_buffer += chunk
        line, _, self._agent_buffer = self._agent_buffer.partition(b"\n")
        return line.strip(b"\r")

    def run(
        self, command: str, *, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> CommandResult:
        """Run ``command`` with ``/bin/sh`` in the guest (in the run dir, stdin empty)
        and return its exit status and output.

        With ``check`` (the default) a non-zero status raises :class:`CommandFailed`
        with the output, the commands so far and the console's tail. A command that
        outlives ``timeout`` or kills the guest raises :class:`GuestFailed`; the guest
        takes no further commands after that.
        """
        if self._broken is not None:
            raise GuestFailed(f"the guest takes no more commands: {self._broken}")
        if self._agent is None:
            raise GuestSetupError("this guest runs a script; boot() a guest to run commands")
        n = next(self._sequence)
        (self.run_dir / f"cmd-{n}.sh").write_text(command)
        deadline = time.monotonic() + timeout
        try:
            self._agent.sendall(f"{n}\n".encode())
            while (line := self._read_reply(deadline)) != f"done {n}".encode():
                if line:
                    raise ConnectionError(f"unexpected line on the command channel: {line!r}")
        except TimeoutError:
            self._broken = f"command {command!r} did not finish within {timeout:.0f}s"
            raise GuestFailed(f"{self._broken}\n{self.report()}") from None
        except OSError as exc:
            self._broken = f"the guest stopped while running {command!r} ({exc})"
            raise GuestFailed(f"{self._broken}\n{self.report()}") from None
        result = CommandResult(
            command=command,
            status=int((self.run_dir / f"status-{n}").read_text().strip()),
            stdout_bytes=(self.run_dir / f"out-{n}").read_bytes(),
            stderr_bytes=(self.run_dir / f"err-{n}").read_bytes(),
        )
        self.commands.append(result)
        for name in (f"cmd-{n}.sh", f"status-{n}", f"out-{n}", f"err-{n}"):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / name).unlink()
        if check and result.status != 0:
            raise CommandFailed(
                f"guest command exited with status {result.status}: {command.strip()}\n"
                f"  stdout:\n{_indent(tail(result.stdout, 20))}\n"
                f"  stderr:\n{_indent(tail(result.stderr, 20))}\n" + self.report(30)
            )
        return result

    # --- stopping --------------------------------------------------------------------

    def wait(self, timeout: float | None = SCRIPT_TIMEOUT) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off after its script); kill it on
        timeout."""
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

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> GuestResult:
        """Ask a command-taking guest to power off (its devices see a clean stop);
        kill QEMU if it does not within ``timeout``."""
        if self._agent is not None and self._result is None and self._broken is None:
            with contextlib.suppress(OSError):
                self._agent.sendall(b"exit\n")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return self.kill()

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
        if self._agent is not None:
            self._agent.close()
            self._agent = None
            self._broken = self._broken or "the guest was stopped"
        return self._result

    def _remove_files(self) -> None:
        for path in self._cleanup:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def close(self) -> GuestResult:
        """Stop QEMU if it still runs, then remove the harness's own files."""
        result = self.shutdown() if self.agent_path is not None else self.kill()
        self._remove_files()
        return result

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --- starting ------------------------------------------------------------------------


def _check_path(path: Path, what: str) -> None:
    text = os.fspath(path)
    if not path.is_absolute() or re.search(r'[\s"]', text):
        raise GuestSetupError(f"{what} must be an absolute path without spaces or quotes: {text!r}")


def _socket_path(directory: Path, name: str, cleanup: list[Path]) -> Path:
    path = directory / name
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        return path
    short = Path(tempfile.mkdtemp(prefix="pvq-", dir="/tmp"))
    cleanup.append(short)
    return short / name


def boot_args(
    *,
    initrd: Path,
    append: Sequence[str],
    memory_mb: int,
    smp: int,
    qmp_path: Path,
    image: GuestImage | None = None,
    qemu: str | os.PathLike[str] | None = None,
    accel: Accel | None = None,
) -> list[str]:
    """QEMU's command line for the guest kernel with ``initrd``, without any device:
    KVM or TCG (:func:`~vhost.testing.qemu.choose_accel`), RAM from a shared memfd, the
    serial console on stdout (:class:`Guest` sends it to a file), QMP on ``qmp_path``."""
    image = image or ensure_image()
    for path, what in ((image.vmlinuz, "kernel"), (initrd, "initramfs")):
        if not path.is_file():
            raise GuestSetupError(f"guest {what} {path} not found")
    chosen = choose_accel(accel, qemu=qemu, image=image)
    return [
        str(find_qemu(qemu)),
        "-accel",
        chosen,
        *shared_memory_args(memory_mb),
        "-smp",
        str(smp),
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(image.vmlinuz),
        "-initrd",
        str(initrd),
        "-append",
        " ".join(append),
        "-qmp",
        f"unix:{qemu_escape(qmp_path)},server=on,wait=off",
    ]


def _start(
    *,
    script: str | None,
    mode: Mode,
    devices: Sequence[Device],
    qemu_args: Sequence[str],
    memory_mb: int,
    smp: int,
    files: Mapping[str, str | bytes] | None,
    run_dir: Path | None,
    runs_parent: Path | None,
    kernel_args: Sequence[str],
    keep: Path | None,
    image: GuestImage | None,
    qemu: str | os.PathLike[str] | None,
    accel: Accel | None,
    guest_class: type[Guest],
) -> Guest:
    if mode not in ("busybox", "host"):
        raise GuestSetupError(f"mode must be 'busybox' or 'host', not {mode!r}")
    image = image or ensure_image()
    qemu_path = find_qemu(qemu)  # before making any file: a missing QEMU leaves nothing
    cleanup: list[Path] = []
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="pyvhost-guest-", dir=runs_parent))
        cleanup.append(run_dir)
    else:
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        _check_path(run_dir, "run_dir")
        keep = (keep or Path.cwd()).resolve()
        _check_path(keep, "keep")
        if script is not None:
            (run_dir / "script.sh").write_text(script)
        for name, content in (files or {}).items():
            dest = run_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                dest.write_text(content)
        console_path = run_dir / "console.log"
        qmp_path = _socket_path(run_dir, "qmp.sock", cleanup)
        agent_path = None if script is not None else _socket_path(run_dir, "agent.sock", cleanup)
        append = [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            f"pyvhost.mode={mode}",
            f"pyvhost.run={run_dir}",
            f"pyvhost.keep={keep}",
            *(["pyvhost.agent=1"] if agent_path is not None else []),
            *kernel_args,
        ]
        argv = [
            *boot_args(
                initrd=image.initrd,
                append=append,
                memory_mb=memory_mb,
                smp=smp,
                qmp_path=qmp_path,
                image=image,
                qemu=qemu_path,
                accel=accel,
            ),
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={qemu_escape(run_dir)},mount_tag=pvrun,security_model=none,"
            "multidevs=remap",
        ]
        if agent_path is not None:
            argv += [
                "-chardev",
                f"socket,id=pvagent,path={qemu_escape(agent_path)},server=on,wait=off",
                "-device",
                "isa-serial,chardev=pvagent",
            ]
        argv += [*devices_args(devices), *qemu_args]
    except BaseException:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return guest_class(argv, run_dir, console_path, qmp_path, cleanup, agent_path=agent_path)


def boot(
    *devices: Device,
    mode: Mode = "busybox",
    qemu_args: Sequence[str] = (),
    memory_mb: int = 512,
    smp: int = 1,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    runs_parent: Path | None = None,
    kernel_args: Sequence[str] = (),
    keep: Path | None = None,
    image: GuestImage | None = None,
    qemu: str | os.PathLike[str] | None = None,
    accel: Accel | None = None,
    timeout: float = BOOT_TIMEOUT,
    guest_class: type[Guest] = Guest,
) -> Guest:
    """Boot a guest with ``devices`` attached and return it once it takes commands.

    Use the result as a context manager (``with boot(Device("rng", sock)) as guest:``)
    and run commands with :meth:`Guest.run`. The image is built on first use
    (:func:`~vhost.testing.image.ensure_image`); QEMU is ``qemu``, ``$PYVHOST_QEMU`` or
    ``qemu-system-x86_64``; ``accel`` (default ``$PYVHOST_ACCEL`` or ``auto``) picks KVM
    when usable. ``files`` are written into the run dir before boot; ``qemu_args`` are
    appended to QEMU's command line. Without ``run_dir`` the run dir is a fresh
    directory in ``runs_parent`` (default: the system's temporary directory), removed
    when the guest closes. Raises :class:`GuestSetupError` when something
    needed is missing, :class:`GuestFailed` (with the console) when the guest does not
    come up within ``timeout`` seconds.
    """
    guest = _start(
        script=None,
        mode=mode,
        devices=devices,
        qemu_args=qemu_args,
        memory_mb=memory_mb,
        smp=smp,
        files=files,
        run_dir=run_dir,
        runs_parent=runs_parent,
        kernel_args=kernel_args,
        keep=keep,
        image=image,
        qemu=qemu,
        accel=accel,
        guest_class=guest_class,
    )
    try:
        guest._connect_agent(timeout)
    except BaseException:
        guest.close()
        raise
    return guest


def start_script(
    script: str,
    *,
    mode: Mode = "host",
    devices: Sequence[Device] = (),
    qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    smp: int = 2,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    runs_parent: Path | None = None,
    kernel_args: Sequence[str] = (),
    keep: Path | None = None,
    image: GuestImage | None = None,
    qemu: str | os.PathLike[str] | None = None,
    accel: Accel | None = None,
    guest_class: type[Guest] = Guest,
) -> Guest:
    """Boot a guest in the background that runs ``script`` (``/bin/sh``, in the run
    dir) and powers off; its output goes to the console (:attr:`GuestResult.script_output`).

    Arguments as for :func:`boot`. With ``run_dir`` the caller chooses (and keeps) the
    run dir; otherwise a fresh one is removed when the :class:`Guest` closes.
    """
    return _start(
        script=script,
        mode=mode,
        devices=devices,
        qemu_args=qemu_args,
        memory_mb=memory_mb,
        smp=smp,
        files=files,
        run_dir=run_dir,
        runs_parent=runs_parent,
        kernel_args=kernel_args,
        keep=keep,
        image=image,
        qemu=qemu,
        accel=accel,
        guest_class=guest_class,
    )


def run_script(
    script: str,
    *,
    timeout: float = SCRIPT_TIMEOUT,
    mode: Mode = "host",
    devices: Sequence[Device] = (),
    qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    smp: int = 2,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    runs_parent: Path | None = None,
    kernel_args: Sequence[str] = (),
    keep: Path | None = None,
    image: GuestImage | None = None,
    qemu: str | os.PathLike[str] | None = None,
    accel: Accel | None = None,
) -> GuestResult:
    """:func:`start_script`, then wait for power-off (at most ``timeout`` s).

    Does not raise on failure: call :meth:`GuestResult.check` (or look at ``status``).
    """
    with start_script(
        script,
        mode=mode,
        devices=devices,
        qemu_args=qemu_args,
        memory_mb=memory_mb,
        smp=smp,
        files=files,
        run_dir=run_dir,
        runs_parent=runs_parent,
        kernel_args=kernel_args,
        keep=keep,
        image=image,
        qemu=qemu,
        accel=accel,
    ) as guest:
        return guest.wait(timeout)
