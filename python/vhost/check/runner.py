"""Runs the cases against one back-end: a health check on a fresh connection after each,
fd counting through ``/proc/PID/fd``, and a restart command for back-ends that crash or
that serve one front-end and exit."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

from ..codes import FrontendRequest as Req
from . import wire
from .cases import (
    CONFORMANCE,
    PROTOCOL_FEATURES_BIT,
    Case,
    Context,
    Died,
    Failed,
    NotApplicable,
)
from .hostile import hostile_cases
from .report import CaseResult, Outcome, Report
from .rings import RING_CASES

DEVICES = ("blk", "rng", "fs", "net", "vsock")
"""Device types ``device=`` accepts (traffic cases know blk and rng)."""


class CheckError(Exception):
    """The run could not start: no back-end answers on the socket, a case name is unknown,
    or the restart command fails. The message names the path or the name; ``errno`` is
    the failed connect's, when that was the cause; ``unanswered`` says that the back-end
    was reached but did not answer (a failed request, not an unusable input)."""

    def __init__(self, message: str, errno: int | None = None, *,
                 unanswered: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.unanswered = unanswered


def all_cases() -> list[Case]:
    """Every case, in the order run: conformance first, then the hostile messages, then
    the ring contents and sequences."""
    return CONFORMANCE + hostile_cases() + RING_CASES


class _Unanswered(Exception):
    """A fresh connection was closed before the GET_FEATURES reply."""


def _unreachable(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EACCES)


class _Target:
    """The back-end under test: its socket, its process when known, and how to restart it."""

    def __init__(self, path: str, pid: int | None, restart: Sequence[str] | None,
                 timeout: float, log: Callable[[str], None]) -> None:
        self.path = path
        self.pid = pid
        self.restart = list(restart) if restart else None
        self.timeout = timeout
        self.child: subprocess.Popen[bytes] | None = None
        self.log = log

    def alive(self) -> bool:
        """Whether the back-end process still runs (unknown processes count as alive)."""
        if self.child is not None:
            return self.child.poll() is None
        return self.pid is None or os.path.exists(f"/proc/{self.pid}")

    def fds(self) -> int | None:
        """How many fds the back-end holds now (/proc), or None when its pid is unknown."""
        pid = self.child.pid if self.child is not None else self.pid
        if pid is None:
            return None
        try:
            return len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return None

    def ask_features(self, wait: float) -> int:
        """GET_FEATURES on a fresh connection, retrying for ``wait`` seconds a refused
        connect, a full listen queue, or a connection closed unanswered (a back-end
        serving one front-end at a time may still be closing the last session, or
        making a new listening socket, which drops what queued on the old one). Raises
        ``OSError`` (unreachable), ``TimeoutError`` or :class:`Failed`."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._ask_features_once()
            except OSError as exc:
                busy = exc.errno == errno.EAGAIN
                if (not (busy or _unreachable(exc)) or time.monotonic() > deadline
                        or not self.alive()):
                    raise
            except _Unanswered:
                if time.monotonic() > deadline or not self.alive():
                    raise Failed("closed fresh connections without answering "
                                 "GET_FEATURES") from None
            time.sleep(0.05)

    def _ask_features_once(self) -> int:
        with wire.connect(self.path, self.timeout) as sock:
            wire.send(sock, wire.message(Req.GET_FEATURES))
            try:
                r = wire.recv_message(sock)
            except (ConnectionResetError, BrokenPipeError):
                r = None
            if r is None:
                raise _Unanswered
            r.close_fds()
            if (r.code, r.flags, len(r.body)) != (Req.GET_FEATURES, wire.VERSION | wire.REPLY, 8):
                raise Failed("answered GET_FEATURES on a fresh connection wrongly")
            return r.u64

    def start(self) -> None:
        """(Re)starts the back-end with the --restart command, stopping any earlier one."""
        assert self.restart is not None
        self.stop()
        before = self._inode()
        try:
            self.child = subprocess.Popen(
                self.restart, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise CheckError(f"restart command {shlex.join(self.restart)}: "
                             f"{exc.strerror or exc}") from exc
        deadline = time.monotonic() + 10.0
        while not self._accepts(before):
            if self.child.poll() is not None:
                raise CheckError(f"restart command {shlex.join(self.restart)} exited with "
                                 f"status {self.child.returncode} before listening on "
                                 f"{self.path}")
            if time.monotonic() > deadline:
                raise CheckError(f"restart command {shlex.join(self.restart)} did not "
                                 f"listen on {self.path} within 10 s")
            time.sleep(0.05)

    def _inode(self) -> tuple[int, int] | None:
        # Inode numbers are reused at once on tmpfs: the change time tells files apart.
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def _accepts(self, before: tuple[int, int] | None) -> bool:
        # A bare connect would be taken as a (short) session by one-session back-ends:
        # wait for a socket file other than the stale one, made by a live child.
        now = self._inode()
        return (now is not None and now != before and self.child is not None
                and self.child.poll() is None)

    def exit_note(self) -> tuple[bool, str]:
        """(killed by a signal, what the child's exit was) once our child has gone."""
        if self.child is None:
            return False, "went away"
        try:
            rc = self.child.wait(self.timeout)
        except subprocess.TimeoutExpired:
            return False, "stopped accepting"
        if rc < 0:
            return True, f"killed by {signal.Signals(-rc).name}"
        return False, f"exited with status {rc}"

    def stop(self) -> None:
        """Stops a back-end this run started (SIGTERM to its process group)."""
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGTERM)
            try:
                self.child.wait(5.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()
        self.child = None


def _select(names: Iterable[str] | None, cases: list[Case], what: str) -> set[str]:
    known = {c.name for c in cases}
    chosen = set(names or ())
    unknown = sorted(chosen - known)
    if unknown:
        raise CheckError(f"{what}: no case named {', '.join(unknown)} (see --list)")
    return chosen


def run_checks(
    socket: str | os.PathLike[str],
    *,
    device: str | None = None,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    pid: int | None = None,
    restart: str | Sequence[str] | None = None,
    timeout: float = 2.0,
    progress: Callable[[CaseResult], None] | None = None,
) -> Report:
    """Checks the vhost-user back-end listening on ``socket`` and returns every case's
    result.

    ``device`` (blk, rng, ...) enables the traffic cases; ``only``/``skip`` pick cases by
    name; ``pid`` is the back-end's process, whose fds are counted after each case (a
    growing count fails the case); ``restart`` is a command (a string is split like a
    shell's words) that starts the back-end again when it is gone after a case, and that
    starts it first when nothing listens yet. With ``restart``, the process started is
    ours: its fds are counted, a death by signal is told from an exit, and it is stopped
    at the end. ``timeout`` bounds every wait for a reply that must come: past it a case
    is hung. Raises :class:`CheckError` when no back-end answers at the start.
    """
    path = os.fspath(socket)
    if device is not None and device not in DEVICES:
        raise CheckError(f"unknown device {device!r} (one of {', '.join(DEVICES)})")
    cases = all_cases()
    chosen = _select(only, cases, "--only")
    dropped = _select(skip, cases, "--skip")
    argv = shlex.split(restart) if isinstance(restart, str) else restart
    target = _Target(path, pid, argv, timeout, lambda s: None)
    try:
        return _run(target, cases, chosen, dropped, device=device, timeout=timeout,
                    progress=progress)
    finally:
        target.stop()


def _first_session(target: _Target) -> tuple[int, int | None]:
    """Features and protocol features, on one connection (a back-end that serves one
    front-end and exits must give both in its first session)."""
    with wire.connect(target.path, target.timeout) as sock:
        wire.send(sock, wire.message(Req.GET_FEATURES))
        r = wire.recv_message(sock)
        if r is None or len(r.body) != 8:
            raise Failed("did not answer GET_FEATURES with 8 bytes")
        r.close_fds()
        features = r.u64
        if not features & PROTOCOL_FEATURES_BIT:
            return features, None
        wire.send(sock, wire.message(Req.GET_PROTOCOL_FEATURES))
        r = wire.recv_message(sock)
        if r is None or len(r.body) != 8:
            raise Failed("did not answer GET_PROTOCOL_FEATURES with 8 bytes")
        r.close_fds()
        return features, r.u64


def _start(target: _Target) -> tuple[int, int | None]:
    """What the back-end offers, starting it with the restart command when it is not up."""
    if target.restart is not None and not os.path.exists(target.path):
        target.start()
    try:
        return _first_session(target)
    except OSError as exc:
        if target.restart is not None and _unreachable(exc):
            target.start()
            return _first_session(target)
        raise


def _run(target: _Target, cases: list[Case], chosen: set[str], dropped: set[str], *,
         device: str | None, timeout: float,
         progress: Callable[[CaseResult], None] | None) -> Report:
    path = target.path
    try:
        features, proto = _start(target)
    except TimeoutError as exc:
        raise CheckError(f"{path}: the back-end did not answer GET_FEATURES within "
                         f"{timeout:g} s", unanswered=True) from exc
    except OSError as exc:
        raise CheckError(f"connect to {path}: {exc.strerror or exc}", exc.errno) from exc
    except Failed as exc:
        raise CheckError(f"{path}: the back-end {exc}", unanswered=True) from exc
    # Does it serve a second front-end? (virtiofsd and vhost-device-rng exit after one.)
    one_session = False
    try:
        target.ask_features(timeout)
    except (OSError, Failed, TimeoutError):
        if target.restart is None:
            raise CheckError(f"{path}: the back-end stopped answering after one session "
                             "(it serves one front-end, then exits?): pass --restart CMD") from None
        one_session = True
        target.start()
    report = Report(path, features, proto, device)
    ctx = Context(path, features, proto, device, timeout=timeout)
    if one_session:
        ctx.next_session = lambda: _next_session(target)
    base_fds = _settled_fds(target, None)
    gone: str | None = None
    for case in cases:
        if (chosen and case.name not in chosen) or case.name in dropped:
            continue
        started = time.monotonic()
        if gone is not None:
            result = CaseResult(case.name, case.ref, Outcome.SKIP, f"not run: {gone}")
        else:
            result = _one(target, ctx, case, one_session)
            lost = result.outcome in (Outcome.DIED, Outcome.HUNG)
            if lost and target.restart is None:
                gone = f"the back-end {result.outcome.value} in {case.name} (see --restart)"
            if one_session or lost:
                if target.restart is not None:
                    target.start()
                base_fds = _settled_fds(target, None)
            elif base_fds is not None and result.outcome is not Outcome.SKIP:
                result.fds = _settled_fds(target, base_fds)
                if result.fds is not None and result.fds > base_fds and result.outcome.ok:
                    result.outcome = Outcome.FAIL
                    result.detail += (f"; holds {result.fds - base_fds} more fd(s) than "
                                      "before the case")
                base_fds = result.fds if result.fds is not None else base_fds
        result.seconds = round(time.monotonic() - started, 3)
        report.results.append(result)
        if progress is not None:
            progress(result)
    return report


def _settled_fds(target: _Target, expected: int | None) -> int | None:
    """The back-end's fd count once steady (the same for 0.2 s; a back-end tearing a
    session down, or listening again, is between counts), given up to a second (to
    fall back to ``expected``, when given)."""
    deadline = time.monotonic() + 1.0
    last, n = None, target.fds()
    while n is not None and time.monotonic() < deadline:
        if n == last and (expected is None or n <= expected):
            break
        time.sleep(0.2)
        last, n = n, target.fds()
    return n


def _one(target: _Target, ctx: Context, case: Case, one_session: bool) -> CaseResult:
    def result(outcome: Outcome, detail: str) -> CaseResult:
        return CaseResult(case.name, case.ref, outcome, detail)

    try:
        detail = case.run(ctx)
        verdict = result(Outcome.PASS, detail)
    except NotApplicable as exc:
        return result(Outcome.SKIP, str(exc))
    except Died as exc:
        return result(Outcome.DIED, str(exc))
    except Failed as exc:
        verdict = result(Outcome.FAIL, str(exc))
    except (struct.error, ValueError) as exc:
        # A reply the checker cannot parse (a short body where a number was due).
        verdict = result(Outcome.FAIL, f"malformed reply: {exc}")
    except TimeoutError as exc:
        verdict = result(Outcome.HUNG, f"no answer within {ctx.timeout:g} s"
                         + (f" ({exc})" if str(exc) and str(exc) != "timed out" else ""))
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            verdict = result(Outcome.HUNG, f"connect {ctx.path}: nobody accepts (the listen "
                             "queue is full)")
        elif not _unreachable(exc):
            verdict = result(Outcome.FAIL, f"the connection failed: {exc.strerror or exc}")
        else:
            verdict = result(Outcome.DIED, f"connect {ctx.path}: {exc.strerror or exc}")
    # Did it survive? A fresh connection must answer GET_FEATURES as before.
    if one_session:
        signalled, how = _wait_exit(target)
        if signalled:
            return result(Outcome.DIED, f"{how} ({verdict.detail})")
        verdict.detail += f"; then {how}, as after every session"
        return verdict
    try:
        value = target.ask_features(ctx.timeout)
    except TimeoutError:
        return result(Outcome.HUNG, f"a fresh connection got no answer to GET_FEATURES "
                      f"within {ctx.timeout:g} s ({verdict.detail})")
    except Failed as exc:
        if not target.alive():
            return result(Outcome.DIED, f"{target.exit_note()[1]} ({verdict.detail})")
        return result(Outcome.FAIL, f"afterwards it {exc} ({verdict.detail})")
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return result(Outcome.HUNG, "nobody accepts a fresh connection (the listen queue "
                          f"is full) ({verdict.detail})")
        how = target.exit_note()[1] if not target.alive() else f"connect: {exc.strerror}"
        return result(Outcome.DIED, f"{how} ({verdict.detail})")
    if value != ctx.features:
        return result(Outcome.FAIL, f"afterwards GET_FEATURES answered {value:#x}, not "
                      f"{ctx.features:#x} ({verdict.detail})")
    return verdict


def _wait_exit(target: _Target) -> tuple[bool, str]:
    """For a back-end that exits after each session: wait for the exit, and say how."""
    if target.child is None:
        return False, "ended"
    try:
        target.child.wait(target.timeout + 3.0)
    except subprocess.TimeoutExpired:
        return False, "still running"
    return target.exit_note()


def _next_session(target: _Target) -> None:
    """Between two connections of one case, for a back-end that serves one front-end:
    wait for its exit and start it again."""
    signalled, how = _wait_exit(target)
    if signalled:
        raise Died(how)
    target.start()
