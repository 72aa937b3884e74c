"""What the commands of the CLI share: the exit statuses, :class:`CliError`, the one place
that turns an ``OSError`` or a :class:`~vhost.errors.VhostError` into a one-line message
naming what was done to which path (:func:`step`), and argument types that refuse bad
numbers while the command line is parsed (so they are usage errors, exit status 1, and
never reach the native code as an ``OverflowError``)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self

from ..errors import InvalidParamError, VhostError

EXIT_USAGE = 1
"""Bad arguments or an unusable input (a missing socket or file, a path that is not a
socket, an offset past the end of the disk)."""
EXIT_FAILED = 2
"""A request failed: a device status such as ``VIRTIO_BLK_S_IOERR``, a write to a
read-only device, a request the back-end refused or never answered, a back-end that went
away."""
EXIT_BAD_DATA = 3
"""Data did not verify (``bench blk --verify``)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, as a shell reports a process SIGINT killed)."""

EXIT_STATUS_HELP = """\
exit status:
  0    success
  1    bad arguments or unusable inputs (a missing socket or file, a path that
       is not a socket, an offset past the end of the disk)
  2    a request failed (a device status such as VIRTIO_BLK_S_IOERR, a write
       to a read-only device, a refused or unanswered request, a back-end that
       went away)
  3    data did not verify (bench blk --verify)
  130  interrupted (Ctrl-C)
A command whose output pipe closes early (| head) stops quietly, killed by
SIGPIPE like other Unix tools."""

SOCKET_PATH_MAX = 107
"""Longest path an AF_UNIX socket address holds (``sun_path`` is 108 bytes with the NUL)."""


class CliError(Exception):
    """An error the CLI reports as ``error: MESSAGE (HINT)`` and exits with ``status``."""

    def __init__(self, message: str, status: int = EXIT_USAGE, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def os_reason(exc: OSError) -> str:
    """``"No such file or directory"``: the exception's own reason (the library's
    explanation where it gave one, such as why a connect timed out), without the
    ``[Errno 2]`` and ``(os error 2)`` decorations; the errno's text if it has none."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return re.sub(r" \(os error \d+\)$", "", text)


def path_kind(path: str) -> str | None:
    """``"a regular file"``, ``"a directory"``, ``"a socket"``... or None if absent."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def connect_hint(path: str, err: int | None) -> str | None:
    """What to check when connecting to the vhost-user socket at ``path`` failed with
    ``err``."""
    if err == errno.ENOENT:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            return f"there is no directory {parent}"
        return "is the back-end running?"
    if err == errno.ECONNREFUSED:
        kind = path_kind(path)
        if kind == "a socket":
            return "a stale socket: nothing listens on it; is the back-end running?"
        if kind is not None:
            return f"it is {kind}, not a socket"
        return "is the back-end running?"
    if err in (errno.EACCES, errno.EPERM):
        return "check the permissions of the socket and of its directories"
    if err == errno.ENOTDIR:
        return "a component of the path is not a directory"
    if err in (errno.EPIPE, errno.ECONNRESET):
        return "the back-end closed the connection"
    return None


def file_hint(path: str, err: int | None) -> str | None:
    """What to check when opening the file at ``path`` failed with ``err``."""
    if err == errno.ENOENT:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            return f"there is no directory {parent}"
    return None


def _status_of(exc: BaseException, status: int) -> int:
    # A value the library refused before sending anything is the caller's input; a
    # timeout is a request (a connect too) that was not answered, whatever the step.
    if isinstance(exc, InvalidParamError):
        return EXIT_USAGE
    return EXIT_FAILED if isinstance(exc, TimeoutError) else status


@contextmanager
def step(
    action: str,
    path: str | os.PathLike[str],
    status: int = EXIT_FAILED,
    hint: Callable[[str, int | None], str | None] | None = None,
) -> Iterator[None]:
    """Runs one step of a command (``action`` on ``path``: ``"connect to"``,
    ``"read"``...) and turns what it raises into :class:`CliError`: ``ACTION PATH:
    REASON``, exit status ``status`` (1 when the library refused an argument,
    :class:`~vhost.errors.InvalidParamError`). ``hint(path, errno)`` suggests what to
    check after an ``OSError``. The path of an ``OSError`` that carries none (a connect
    failure of the native layer) is the one the step was acting on."""
    where = os.fspath(path)
    try:
        yield
    except (CliError, KeyboardInterrupt):
        raise
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and not isinstance(exc, VhostError):
            raise  # our own stdout (| head): main() stops quietly
        target = os.fsdecode(exc.filename) if exc.filename is not None else where
        tip = hint(target, exc.errno) if hint is not None else None
        if tip is None and exc.errno in (errno.EPIPE, errno.ECONNRESET):
            tip = "the back-end closed the connection"
        raise CliError(
            f"{action} {target}: {os_reason(exc)}", _status_of(exc, status), tip
        ) from exc
    except VhostError as exc:
        raise CliError(f"{action} {where}: {exc}", _status_of(exc, status)) from exc


@contextmanager
def connecting(path: str | os.PathLike[str]) -> Iterator[None]:
    """The step that connects to a back-end: exit status 1 when it fails (the socket is
    an unusable input), with a hint ("is the back-end running?"). A path too long for a
    socket address is refused first (the native layer reports it as EIO)."""
    size = len(os.fsencode(path))
    if size > SOCKET_PATH_MAX:
        raise CliError(
            f"connect to {os.fsdecode(path)}: File name too long ({size} bytes; a socket "
            f"path holds at most {SOCKET_PATH_MAX})"
        )
    with step("connect to", path, EXIT_USAGE, connect_hint):
        yield


# -- argument types: checked while parsing, so a bad value is a usage error ----------------


def _number(kind: Callable[[str], float | int], text: str) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return value  # NaN passes here and fails every range check


def _int(text: str) -> int:
    return int(text, 0)


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer (decimal or ``0x``) in ``low..high``."""

    def parse(text: str) -> int:
        value = int(_number(_int, text))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}: {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer above zero (up to 2**63 - 1)."""
    return int_range(1, (1 << 63) - 1)(text)


def seconds_arg(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (a timeout of 0 would fail
    every request at once)."""
    value = float(_number(float, text))
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number from zero."""
    value = float(_number(float, text))
    if not 0 <= value < 1e12:
        raise argparse.ArgumentTypeError(f"must be zero or more: {text!r}")
    return value


def plain(doc: str | None) -> str:
    """A docstring as help text: reStructuredText roles and literals become plain text
    (``x`` -> x, :class:`~a.b.C` -> C, :func:`a.b` -> a.b)."""
    if not doc:
        return ""
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], doc)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")


def socket_args(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--socket PATH`` (``probe`` also takes it as a positional argument)."""
    if positional:
        parser.add_argument(
            "socket_pos", nargs="?", metavar="SOCKET", help="the back-end's vhost-user socket"
        )
        parser.add_argument("--socket", help="the same, as an option (as other commands take it)")
    else:
        parser.add_argument("--socket", required=True, help="the back-end's vhost-user socket")


class OutputFile:
    """A file a command writes its result to, opened before the command does any I/O (a
    missing directory or a read-only file is reported before a read is sent, not after),
    and written whole at the end. ``-`` is standard output. A file this created is removed
    again when the command fails before writing it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._created = False
        if path == "-":
            return
        with step("open", path, EXIT_USAGE, file_hint):
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                self._created = True
            except FileExistsError:
                self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def write(self, data: bytes) -> None:
        """Replaces the file's contents with ``data`` (or writes it to stdout). Only a
        regular file is truncated (``/dev/null``, a FIFO or a terminal cannot be). Every
        byte is written or the write fails: a reader that goes away (``| head``) raises
        ``BrokenPipeError``, which ends the command by SIGPIPE like other Unix tools."""
        if self._fd is None:
            sys.stdout.flush()
            fd, where = sys.stdout.fileno(), "standard output"
        else:
            fd, where = self._fd, self.path
        with step("write", where):
            if self._fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        self._created = False

    def close(self) -> None:
        """Closes the file; removes it if this created it and nothing was written."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._created:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_input(path: str) -> bytes:
    """The bytes of an input file (``-``: standard input), as a usage error (exit status
    1) when it cannot be read."""
    if path == "-":
        return sys.stdin.buffer.read()
    with step("read", path, EXIT_USAGE), open(path, "rb") as f:
        return f.read()
