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

import json
import os
import pkgutil
import re
import selectors
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

import guest
import peers
import vhost
from doc_examples import (
    CHECKOUT,
    Block,
    blocks,
    connect,
    example_process,
    python_argv,
    read_entropy,
    stopped,
)
from vhost import EventFd, GuestMemory, testing
from vhost.user import Frontend, regions_of
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue

DOCS = CHECKOUT / "docs"
RUN_TIMEOUT = 120
BLK_SOCK = "/tmp/vhost-user-blk.sock"
IMAGE_SIZE = 64 << 20
# Pages whose blocks another test file runs (and checks that it runs all of them).
RUN_ELSEWHERE = {
    "testing.md": "tests/test_testing_docs.py",
    "asyncio.md": "tests/test_aio_docs.py",
    "iommu.md": "tests/test_iommu_guest.py",
}
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
    # Paths first: the interpreter may itself live under /tmp (a checkout there, as CI's).
    code = tmp_paths(code, tmp)
    code = re.sub(r"(?<![\w/.-])python(?= -m )", shlex.quote(sys.executable), code)
    return "set -euo pipefail\n" + code


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
def blk_backend(name: str, tmp: Path, sock_path: str = BLK_SOCK) -> Iterator[peers.Peer]:
    """``serve blk`` or qemu-storage-daemon on ``sock_path`` (moved into ``tmp``) over a
    64 MiB ``TMP/disk.img``, the back-end the pages tell the reader to start."""
    sock = Path(tmp_paths(sock_path, tmp))
    image = peers.make_image(tmp / "disk.img", IMAGE_SIZE)
    if name == "serve-blk":
        argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock)]
        with peers.spawn_peer(name, [*argv, "--image", str(image)], sock) as peer:
            yield peer
            assert peer.alive(), peer.output()
    else:
        with peers.qemu_storage_daemon_blk(image, sock) as peer:
            yield peer
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
        with connect(sock) as fe:
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
    """check.md's commands, each against the back-end it names: ``serve blk``, then
    qemu-storage-daemon (``$(pidof qemu-storage-daemon)`` becomes its pid: other tests
    may run one at the same time), then ``--list``. The virtiofsd line (84 cases, each
    restarting virtiofsd, about 25 s) is not run here: it is the run
    ``tests/test_check.py::test_virtiofsd_known_result`` makes and pins."""
    lines = [line for line in block.code.splitlines() if line.strip()]
    assert len(lines) == 4 and all(ln.startswith("python -m vhost check ") for ln in lines)
    assert "virtiofsd" in lines[2] and lines[3].endswith("--list"), lines
    run_to_end(["bash", "-c", shell_code(lines[3], tmp)], tmp, block)
    with blk_backend("serve-blk", tmp, "/tmp/blk.sock"):
        run_to_end(["bash", "-c", shell_code(lines[0], tmp)], tmp, block)
    pidof = '"$(pidof qemu-storage-daemon)"'
    assert pidof in lines[1], lines[1]
    with blk_backend("qemu-storage-daemon", tmp, "/tmp/blk.sock") as peer:
        line = lines[1].replace(pidof, str(peer.pid))
        status = subprocess.run(
            ["bash", "-c", shell_code(line, tmp)], cwd=tmp, timeout=RUN_TIMEOUT, check=False
        ).returncode
    # qemu-storage-daemon fails cases (check.md's table says which): status 2, not 0.
    assert status == 2, status
    report = json.loads((tmp / "report.json").read_text())
    assert report, "check --json wrote nothing"


def check_python(block: Block, tmp: Path) -> None:
    """check.md's ``run_checks`` example, against ``serve blk`` at its socket path."""
    with blk_backend("serve-blk", tmp, "/tmp/blk.sock"):
        out = run_to_end(program(block, tmp), tmp, block)
    # serve blk passes every case: no line for a case that did not, then the summary.
    (line,) = out.splitlines()
    assert line.startswith("True {'pass': ") and "'fail': 0, 'died': 0, 'hung': 0" in line, out


def trace_proxy(block: Block, tmp: Path) -> None:
    """trace.md's first block: ``serve blk`` in the background, then the proxy in front
    of it; a front-end of ours goes through the proxy, which must print what it saw, then
    Ctrl-C stops it (status 130, its documented status for an interrupt). The two
    commands run as a reader types them, the second once the first listens (run as one
    script, the proxy could try the back-end before ``serve blk`` has bound its socket)."""
    serve_line, trace_line = [ln for ln in block.code.splitlines() if not ln.startswith("#")]
    assert serve_line.endswith(" &"), serve_line
    peers.make_image(tmp / "disk.img", IMAGE_SIZE)  # the block's relative disk.img
    back = Path(tmp_paths("/tmp/blk.sock", tmp))
    sock = Path(tmp_paths("/tmp/trace.sock", tmp))
    serve = ["bash", "-c", shell_code(serve_line.removesuffix(" &"), tmp)]
    with (
        example_process(serve, back, cwd=tmp, new_session=True),
        example_process(
            ["bash", "-c", shell_code(trace_line, tmp)], sock, cwd=tmp, new_session=True
        ) as proc,
    ):
        with connect(sock, timeout=10.0) as fe:
            fe.negotiate()
        os.killpg(proc.pid, signal.SIGINT)
        status, out, err = stopped(proc)
    assert status == 130, f"{block.where}: exit {status}\n{out}{err}"
    assert "Traceback" not in err, err
    assert re.search(r"#1 F->B GET_FEATURES flags=0x1\[v1\]", out), out
    assert re.search(r"#1 B->F GET_FEATURES reply flags=0x5\[v1,REPLY\] features=", out), out


def trace_mirror(block: Block, tmp: Path) -> None:
    """trace.md's mirror layout: our front-end listens at ``/tmp/qemu.sock`` as QEMU
    with ``server=on`` would, ``serve blk --client`` connects to the proxy."""
    front = Path(tmp_paths("/tmp/qemu.sock", tmp))
    back = Path(tmp_paths("/tmp/back.sock", tmp))
    accepted: list[Frontend] = []
    acceptor = threading.Thread(
        target=lambda: accepted.append(Frontend.accept(front, timeout=30)), daemon=True
    )
    acceptor.start()
    deadline = time.monotonic() + 15
    while not front.exists():
        assert time.monotonic() < deadline, "Frontend.accept never listened"
        time.sleep(0.02)
    image = peers.make_image(tmp / "disk.img", IMAGE_SIZE)
    with example_process(program(block, tmp), back, cwd=tmp, new_session=True) as proc:
        argv = [sys.executable, "-m", "vhost", "serve", "blk", "--client", "--image",
                str(image), "--socket", str(back)]  # fmt: skip
        client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            acceptor.join(timeout=30)
            assert accepted, "the back-end never reached the front-end through the proxy"
            with accepted[0] as fe:
                fe.get_features()
            client.wait(timeout=30)  # the front-end's session ended: so does --client
        finally:
            if client.poll() is None:
                client.kill()
            client.wait()
        os.killpg(proc.pid, signal.SIGINT)
        status, out, err = stopped(proc)
    assert status == 130, f"{block.where}: exit {status}\n{out}{err}"
    assert re.search(r"F->B GET_FEATURES flags=0x1", out), out
    assert re.search(r"B->F GET_FEATURES reply", out), out


def trace_python(block: Block, tmp: Path) -> None:
    """trace.md's ``Tracer`` script, in front of ``serve blk``: a front-end of ours sets
    a ring up through it, and the script must print that ring's descriptor table and used
    ring addresses (the ``SET_VRING_ADDR`` it saw); then Ctrl-C stops it."""
    sock = Path(tmp_paths("/tmp/trace.sock", tmp))
    with (
        blk_backend("serve-blk", tmp, "/tmp/blk.sock"),
        example_process(
            program(block, tmp), sock, cwd=tmp, new_session=True, env={"PYTHONUNBUFFERED": "1"}
        ) as proc,
    ):
        with connect(sock, timeout=10.0) as fe:
            features, _ = fe.negotiate()
            ram = GuestMemory.allocate([(0, 1 << 20)])
            fe.set_mem_table(regions_of(ram))
            desc, avail, used = place_rings(0x1000, 16)
            vq = Virtqueue(ram, 16, desc, avail, used,
                           event_idx=bool(features & VirtioFeature.EVENT_IDX))  # fmt: skip
            with EventFd() as kick, EventFd() as call:
                setup_queue(fe, 0, ram, vq, kick, call)
                user = ram.regions()[0].userspace_addr
                line = read_line(proc, timeout=15.0)
        os.killpg(proc.pid, signal.SIGINT)
        stopped(proc)  # a script interrupted by Ctrl-C: KeyboardInterrupt, as Python does
    assert line.split() == [str(user + desc), str(user + used)], line


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line ``proc`` prints, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"the example printed nothing within {timeout}s"
    return proc.stdout.readline()


TOOL_BLOCKS: dict[tuple[str, str], Callable[[Block, Path], None]] = {
    ("check.md", "python -m vhost check --list"): check_cli,
    ("check.md", "run_checks("): check_python,
    ("trace.md", "python -m vhost trace --listen /tmp/trace.sock"): trace_proxy,
    ("trace.md", "--listen-backend /tmp/back.sock --connect-frontend /tmp/qemu.sock"): trace_mirror,
    ("trace.md", "Tracer("): trace_python,
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


# Modules of the package the API reference leaves out, and why.
UNREFERENCED = {
    "vhost.cli": "the command line: its --help pages and the guides document it",
    "vhost.__main__": "`python -m vhost`, one call into vhost.cli",
    "vhost.testing.__main__": "`python -m vhost.testing`, documented in testing.md",
}


def test_every_public_module_has_a_reference_page() -> None:
    """A new public module fails this until docs/reference/ renders it (``::: name``)."""
    referenced = {
        name
        for page in (DOCS / "reference").glob("*.md")
        for name in re.findall(r"^::: ([\w.]+)$", page.read_text(), flags=re.M)
    }
    modules = ["vhost", *(i.name for i in pkgutil.walk_packages(vhost.__path__, "vhost."))]
    missing = []
    for name in modules:
        parts = name.split(".")
        private = any(p.startswith("_") and p not in ("_core", "__main__") for p in parts)
        skipped = any(".".join(parts[: n + 1]) in UNREFERENCED for n in range(len(parts)))
        if not private and not skipped and name not in referenced:
            missing.append(name)
    assert not missing, f"modules without a reference page in docs/reference/: {missing}"
    assert "vhost._core" in referenced


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
    """Each runner asserts the block's exit status and, where the page shows it, its
    output (test_runner_would_fail_a_failing_block checks that they do)."""
    kind, *args = kind_of(block) or [""]
    assert kind in RUNNERS, f"{block.where}: no runner for {kind!r}"
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
