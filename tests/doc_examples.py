"""Running the code blocks of Markdown documentation as a reader would (README.md through
``tests/test_readme.py``, ``docs/*.md`` through ``tests/test_docs.py``).

What the two share: finding the fenced blocks of a page with what the page says about
each (the ``<!-- run: ... -->`` comment before it), replacing the paths a reader would
use by temporary ones in a way that fails when a page stops mentioning them, running an
example as a process until it listens, stopping it and reading its status, and being
the front-end a device example serves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost import EventFd, GuestMemory
from vhost.user import Frontend, regions_of
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue, wait_used

CHECKOUT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

# A fence, its info string, its body; and the comment a page may put before a fence.
_FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*(.*?)\s*-->\s*\Z", flags=re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its position among the page's blocks, its language
    (the info string's first word), its text, the directive comment right before it
    (``"run: server /tmp/rng.sock"``, without the comment markers; None if there is
    none) and the line it starts on."""

    page: str
    index: int
    language: str
    code: str
    directive: str | None
    line: int

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path, language: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` (only those in ``language``, if given)."""
    text = path.read_text()
    found = []
    previous_end = 0
    for index, match in enumerate(_FENCE.finditer(text)):
        lang, _info, code = match.groups()
        between = text[previous_end : match.start()]
        directive = _DIRECTIVE.search(between)
        line = text.count("\n", 0, match.start()) + 1
        found.append(
            Block(
                path.name,
                index,
                lang,
                code,
                directive.group(1) if directive else None,
                line,
            )
        )
        previous_end = match.end()
    return [b for b in found if language is None or b.language == language]


def substitute(code: str, replacements: Mapping[str, str]) -> str:
    """``code`` with each key replaced by its value; every key must occur (a page edit
    that renames a path fails here instead of running against the real /tmp path)."""
    for old, new in replacements.items():
        assert old in code, f"example no longer mentions {old!r}:\n{code}"
        code = code.replace(old, new)
    return code


@contextmanager
def example_process(
    argv: Sequence[str],
    sock: Path,
    *,
    cwd: Path = CHECKOUT,
    new_session: bool = False,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` (an example: ``python -c CODE``, ``bash -c CODE``) until ``sock``
    exists; killed (its whole session with ``new_session``) if it is still running at
    the end, when the caller's assertions have failed the test."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=new_session,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.is_socket():
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill(proc, new_session)
                out, err = proc.communicate(timeout=STOP_TIMEOUT)
                pytest.fail(
                    f"example did not listen on {sock} (exit {proc.returncode}):\n{out}{err}"
                )
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None or new_session:
            _kill(proc, new_session)
        proc.communicate(timeout=STOP_TIMEOUT)


def _kill(proc: subprocess.Popen[str], group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, 9)
        elif proc.poll() is None:
            proc.kill()
    except ProcessLookupError:
        pass


def stopped(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr, waiting at most STOP_TIMEOUT; fails if it does
    not stop."""
    try:
        out, err = proc.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the example did not stop within {STOP_TIMEOUT}s:\n{out}{err}")
    return proc.returncode, out, err


def connect(sock: Path, timeout: float = 5.0) -> Frontend:
    """Our front-end on an example's socket. No retry: our servers make the path appear
    only once they listen, so a refused connect here is a bug."""
    return Frontend.connect(sock, timeout=timeout)


def read_entropy(sock: Path, length: int) -> bytes:
    """``length`` bytes from a virtio-rng device at ``sock``, through a split ring."""
    with connect(sock) as fe:
        features, _ = fe.negotiate()
        ram = GuestMemory.allocate([(0, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        vq = Virtqueue(
            ram,
            16,
            *place_rings(0x1000, 16),
            event_idx=bool(features & VirtioFeature.EVENT_IDX),
        )
        with EventFd() as kick, EventFd() as call:
            setup_queue(fe, 0, ram, vq, kick, call)
            head = vq.add([], [(0x10000, length)])
            vq.publish()
            kick.write(1)
            done = wait_used(vq, call, timeout=10.0)
        assert done == [(head, length)], done
        return ram.read(0x10000, length)


def python_argv(code: str) -> list[str]:
    """``python -c CODE`` with this interpreter."""
    return [sys.executable, "-c", code]
