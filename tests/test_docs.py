"""Every code block of the documentation site (``docs/*.md``) is run here (issue 13).

A page says how each of its blocks is run in a comment right before it, which the
rendered site does not show; a code block without one (or with a kind this file does not
know) fails :func:`test_every_code_block_is_run`. Blocks in ``text`` (or with no
language) are output, not code: one introduced by ``<!-- output of the block above -->``
must appear, line by line and in order, in what the block above printed.

The kinds (``<!-- run: KIND ARGS -->``):

``server SOCKET [rng|once]``
    A program that serves until it is stopped (``serve blk``, a daemon): run as a
    process (``sh`` blocks in ``bash``) until ``SOCKET`` exists; a front-end of ours
    then connects and negotiates (``rng``: reads random bytes through a ring), and
    SIGINT, the reader's Ctrl-C, must stop it with status 0 and no traceback
    (``once``: our disconnect must end it instead).
``sh blk``, ``python frontend``
    A client of the vhost-user-blk back-end at ``/tmp/vhost-user-blk.sock``: run (to
    status 0) against ``python -m vhost serve blk`` and, for ``python frontend``, also
    against qemu-storage-daemon. ``python frontend continued`` continues the session of
    the ``frontend`` block before it (the two run as one program).
``python``, ``sh``
    A self-contained program, run to status 0.
``qemu-blk``
    A QEMU command line: a Linux guest boots with exactly its vhost-user arguments on
    ``serve blk`` and must see the disk (``/sys/block/vda/size``).
``guest``
    A kernel vhost or vDPA example: run in the test guest (the host has no
    ``/dev/vhost-*``), with ``tap_fd`` given a real tap.

Every ``/tmp/NAME`` path becomes ``TMP/NAME`` in a fresh short directory, and
``python`` at the start of a shell command becomes this interpreter; nothing else of an
example is changed. Pages run by a test of their own are listed in ``RUN_ELSEWHERE``,
and the blocks of the tool pages written before this file (``check.md``,
``trace.md``) are recognised by their text in ``TOOL_BLOCKS``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

import guest
import peers
from doc_examples import (
    CHECKOUT,
    Block,
    blocks,
    example_process,
    python_argv,
    read_entropy,
    stopped,
)
from vhost import testing
from vhost.user import Frontend

DOCS = CHECKOUT / "docs"
RUN_TIMEOUT = 120
BLK_SOCK = "/tmp/vhost-user-blk.sock"
IMAGE_SIZE = 64 << 20
# Pages whose blocks another test file runs (and checks that it runs all of them).
RUN_ELSEWHERE = {"testing.md": "tests/test_testing_docs.py"}
OUTPUT_DIRECTIVE = "output of the block above"
KINDS = ("server", "sh", "python", "qemu-blk", "guest")


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def code_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language not in ("", "text")]


def kind_of(block: Block) -> list[str] | None:
    """The words of the block's ``run:`` directive, or None."""
    if block.directive is None or not block.directive.startswith("run:"):
        return None
    return block.directive.removeprefix("run:").split()


def directed_blocks() -> list[Block]:
    return [b for page in pages() for b in code_blocks(page) if kind_of(b) is not None]


def tmp_paths(text: str, tmp: Path) -> str:
    """Every ``/tmp/NAME`` of an example, moved into ``tmp``."""
    return re.sub(r"/tmp/([\w.-]+)", lambda m: f"{tmp}/{m.group(1)}", text)


def shell_code(code: str, tmp: Path) -> str:
    """A ``sh`` block as bash runs it here: this interpreter for ``python``, temporary
    paths, and every command checked (as a reader watching the terminal would)."""
    code = re.sub(r"(?<![\w/.-])python(?= -m )", shlex.quote(sys.executable), code)
    return "set -euo pipefail\n" + tmp_paths(code, tmp)


def program(block: Block, tmp: Path) -> list[str]:
    if block.language == "python":
        return python_argv(tmp_paths(block.code, tmp))
    assert block.language == "sh", f"{block.where}: cannot run a {block.language} block"
    return ["bash", "-c", shell_code(block.code, tmp)]


def expected_output(block: Block) -> list[str] | None:
    """The lines the page says ``block`` prints (the ``text`` block after it)."""
    page_blocks = blocks(DOCS / block.page)
    following = [b for b in page_blocks if b.index == block.index + 1]
    if following and following[0].directive == OUTPUT_DIRECTIVE:
        return [line.strip() for line in following[0].code.splitlines() if line.strip()]
    return None


def check_output(block: Block, out: str) -> None:
    lines = expected_output(block)
    if lines is not None:
        check_output_of(block, lines, out)


def check_output_of(block: Block, lines: list[str], out: str) -> None:
    got = iter(line.strip() for line in out.splitlines())
    for line in lines:
        assert any(g == line for g in got), (
            f"{block.where}: the page says the block prints {line!r} (after the lines "
            f"before it), but it printed:\n{out}"
        )


def run_to_end(argv: list[str], cwd: Path, block: Block) -> str:
    """Run an example to its end (status 0, no traceback, the output its page shows);
    it runs in a session of its own, killed whole at the end, so a server it started
    in the background cannot outlive the test."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{block.where}: did not finish within {RUN_TIMEOUT}s:\n{out}{err}")
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{block.where}: exit {proc.returncode}\n{out}{err}"
    assert "Traceback" not in err, err
    check_output(block, out)
    return out


@contextmanager
def blk_backend(name: str, tmp: Path, sock_path: str = BLK_SOCK) -> Iterator[Path]:
    """``serve blk`` or qemu-storage-daemon on ``sock_path`` (moved into ``tmp``) over a
    64 MiB ``TMP/disk.img``, the back-end the pages tell the reader to start."""
    sock = Path(tmp_paths(sock_path, tmp))
    image = peers.make_image(tmp / "disk.img", IMAGE_SIZE)
    if name == "serve-blk":
        argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock)]
        with peers.spawn_peer(name, [*argv, "--image", str(image)], sock) as peer:
            yield sock
            assert peer.alive(), peer.output()
    else:
        with peers.qemu_storage_daemon_blk(image, sock) as peer:
            yield sock
            assert peer.alive(), peer.output()


# -- the kinds ------------------------------------------------------------------------


def run_server(block: Block, args: list[str], tmp: Path) -> None:
    sock_name, *flags = args
    sock = Path(tmp_paths(sock_name, tmp))
    assert sock_name in block.code, f"{block.where}: the block never names {sock_name}"
    with example_process(program(block, tmp), sock, cwd=tmp, new_session=True) as proc:
        if "rng" in flags:
            data = read_entropy(sock, 64)
            assert len(data) == 64 and data != bytes(64)
        with Frontend.connect(sock, timeout=5.0) as fe:
            fe.negotiate()
        if "once" not in flags:
            os.killpg(proc.pid, signal.SIGINT)  # the reader's Ctrl-C, to the terminal
        status, out, err = stopped(proc)
    assert status == 0, f"{block.where}: exit {status}\n{out}{err}"
    assert "Traceback" not in err, err


def frontend_chain(block: Block) -> str:
    """The block's code, after the ``frontend`` blocks it continues."""
    page_blocks = code_blocks(DOCS / block.page)
    chain = [block]
    while "continued" in (kind_of(chain[0]) or []):
        before = [b for b in page_blocks if b.index < chain[0].index]
        assert before, f"{block.where}: continues nothing"
        chain.insert(0, before[-1])
    return "".join(b.code for b in chain)


def run_client(block: Block, args: list[str], tmp: Path) -> None:
    if block.language == "sh" and args:
        assert args == ["blk"], f"{block.where}: unknown sh arguments {args}"
        with blk_backend("serve-blk", tmp):
            run_to_end(program(block, tmp), tmp, block)
        return
    if not args:
        run_to_end(program(block, tmp), tmp, block)
        return
    assert args[0] == "frontend", f"{block.where}: unknown python arguments {args}"
    code = tmp_paths(frontend_chain(block), tmp)
    assert str(tmp) in code, f"{block.where}: no /tmp path to point at the back-end"
    for backend in ("serve-blk", "qemu-storage-daemon"):
        with blk_backend(backend, tmp):
            run_to_end(python_argv(code), tmp, block)


def run_qemu_blk(block: Block, args: list[str], tmp: Path) -> None:
    argv = shlex.split(tmp_paths(block.code.replace("\\\n", " "), tmp))
    assert argv[0] == "qemu-system-x86_64", argv
    memory = testing.shared_memory_args(512)
    # The memory part is what every guest of vhost.testing gets; the rest is passed as is.
    assert argv[1 : 1 + len(memory)] == memory, (argv, memory)
    with blk_backend("serve-blk", tmp), testing.boot(
        qemu_args=argv[1 + len(memory) :], memory_mb=512, runs_parent=tmp
    ) as vm:
        assert vm.run("cat /sys/block/vda/size").stdout.strip() == str(IMAGE_SIZE // 512)


def run_in_guest(block: Block, args: list[str], tmp: Path) -> None:
    prelude = ""
    if "tap_fd" in block.code:
        prelude = textwrap.dedent(
            f"""\
            import sys
            sys.path.insert(0, {os.fspath(CHECKOUT / "tests")!r})
            from guest_kern.net import open_tap
            tap_fd = open_tap("pvdocs0")
            """
        )
    epilogue = '\nprint("DOC-EXAMPLE-OK", flush=True)\n'
    result = guest.run_guest(
        f"{guest.VENV_PYTHON} example.py\n",
        mode="host",
        files={"example.py": prelude + block.code + epilogue},
        timeout=300,
    ).check()
    assert "DOC-EXAMPLE-OK" in result.script_output, result.tail(40)
    check_output(block, result.script_output)


RUNNERS: dict[str, Callable[[Block, list[str], Path], None]] = {
    "server": run_server,
    "sh": run_client,
    "python": run_client,
    "qemu-blk": run_qemu_blk,
    "guest": run_in_guest,
}


# -- the blocks of the tool pages -----------------------------------------------------


def check_cli(block: Block, tmp: Path) -> None:
    """check.md's commands, each against the back-end it names."""
    lines = [line for line in block.code.splitlines() if line.strip()]
    for line in lines:
        assert line.startswith("python -m vhost check "), line
    run_to_end(["bash", "-c", shell_code(lines[3], tmp)], tmp, block)
    with blk_backend("serve-blk", tmp, "/tmp/blk.sock"):
        run_to_end(["bash", "-c", shell_code(lines[0], tmp)], tmp, block)


TOOL_BLOCKS: dict[tuple[str, str], Callable[[Block, Path], None]] = {
    ("check.md", "python -m vhost check --list"): check_cli,
}


def tool_runner(block: Block) -> Callable[[Block, Path], None] | None:
    found = [
        run
        for (page, marker), run in TOOL_BLOCKS.items()
        if page == block.page and marker in block.code
    ]
    assert len(found) <= 1
    return found[0] if found else None


# -- the tests ------------------------------------------------------------------------


def test_every_code_block_is_run() -> None:
    unrun = []
    for page in pages():
        if page.name in RUN_ELSEWHERE:
            assert (CHECKOUT / RUN_ELSEWHERE[page.name]).is_file()
            continue
        for block in code_blocks(page):
            kind = kind_of(block)
            if kind is None and tool_runner(block) is None:
                unrun.append(f"{block.where} ({block.language}): no <!-- run: ... --> comment")
            elif kind is not None and (not kind or kind[0] not in KINDS):
                unrun.append(f"{block.where}: unknown kind {kind}")
    assert not unrun, "blocks that no test runs:\n" + "\n".join(unrun)


def test_output_blocks_follow_a_run_block() -> None:
    for page in pages():
        page_blocks = blocks(page)
        for block in page_blocks:
            if block.directive == OUTPUT_DIRECTIVE:
                before = [b for b in page_blocks if b.index == block.index - 1]
                assert before and kind_of(before[0]) is not None, block.where


@pytest.mark.parametrize(
    "block", directed_blocks(), ids=lambda b: f"{b.where}-{'-'.join(kind_of(b) or [])}"
)
def test_doc_block(block: Block, tmp_sock_dir: Path) -> None:
    kind, *args = kind_of(block) or [""]
    RUNNERS[kind](block, args, tmp_sock_dir)


@pytest.mark.parametrize(
    "block",
    [b for p in pages() for b in code_blocks(p) if kind_of(b) is None and tool_runner(b)],
    ids=lambda b: b.where,
)
def test_tool_page_block(block: Block, tmp_sock_dir: Path) -> None:
    runner = tool_runner(block)
    assert runner is not None
    runner(block, tmp_sock_dir)


def test_runner_would_fail_a_failing_block(tmp_sock_dir: Path) -> None:
    """The harness itself: a block that exits non-zero, or prints other than its page
    says, fails (so a passing run means the examples worked)."""
    bad = Block("x.md", 0, "python", "raise SystemExit(3)\n", "run: python", 1)
    with pytest.raises(AssertionError, match="exit 3"):
        run_client(bad, [], tmp_sock_dir)
    said = Block("x.md", 0, "python", "print('one')\n", "run: python", 1)
    with pytest.raises(AssertionError, match="the page says"):
        check_output_of(said, ["two"], "one\n")
