"""README.md's examples, run as a new user would run them (issue 9).

Every ```python block of README.md is run here, and a block this file does not know how
to run fails :func:`test_every_python_block_is_run`. What each block needs comes from the
README itself:

* the front-end blocks (``Frontend.connect``, then the virtqueue one that continues its
  session) run in one namespace in this process, against each back-end the README tells
  the reader to start, started with the README's own ``sh`` commands: ``python -m vhost
  serve blk`` and ``qemu-storage-daemon``;
* the ``BackendListener`` block runs as a process; a front-end of ours connects and
  negotiates, then disconnects, which ends the session and so the process;
* the ``Daemon`` block runs as a process; a front-end of ours reads random bytes from it
  through a ring, then SIGINT or SIGTERM must stop it;
* the kernel vhost block runs in the test guest (the host has no ``/dev/vhost-net``).

The only edits are visible substitutions (:func:`substitute`): the README's ``/tmp/...``
socket and image paths become temporary ones, ``python`` in a command becomes this
interpreter, and the kernel block gets ``tap_fd``, the one name it leaves to the reader.
The QEMU command line the README shows must be the one the guest tests use
(:func:`test_readme_qemu_line_is_the_guest_tests_one`).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import guest
import peers
from doc_examples import (
    CHECKOUT,
    START_TIMEOUT,
    Block,
    connect,
    example_process,
    python_argv,
    read_entropy,
    stopped,
    substitute,
)
from doc_examples import blocks as doc_blocks
from vhost.codes import ProtocolFeature
from vhost.user import Frontend
from vhost.virtio import VirtioFeature

README = CHECKOUT / "README.md"
# The paths the README's examples use, replaced by temporary ones.
BLK_SOCK = "/tmp/vhost-user-blk.sock"
BLK_IMAGE = "/tmp/disk.img"
DEV_SOCK = "/tmp/dev.sock"
RNG_SOCK = "/tmp/rng.sock"


def blocks(language: str) -> list[Block]:
    return doc_blocks(README, language)


# Each Python block, in README order: how this file runs it, and a string that identifies
# it. A new block, or one that changed beyond recognition, has no entry: the test fails.
PYTHON_BLOCKS = (
    ("frontend", f'Frontend.connect("{BLK_SOCK}")'),
    ("frontend, continued", "setup_queue(fe, 0, ram, vq, kick, call)"),
    ("backend", f'BackendListener("{DEV_SOCK}")'),
    ("daemon", f'Daemon(Rng(), "{RNG_SOCK}")'),
    ("kernel", "with VhostNet() as net:"),
)


def python_block(kind: str) -> str:
    marker = dict(PYTHON_BLOCKS)[kind]
    (match,) = [b.code for b in blocks("python") if marker in b.code]
    return match


def test_every_python_block_is_run() -> None:
    found = blocks("python")
    assert found, "README.md has no python blocks"
    kinds = []
    for block in found:
        known = [kind for kind, marker in PYTHON_BLOCKS if marker in block.code]
        assert len(known) == 1, (
            f"README.md python block {block.index} is run by no test here (or by "
            f"several: {known}); add it to PYTHON_BLOCKS:\n{block.code}"
        )
        kinds.append(known[0])
    assert kinds == [kind for kind, _ in PYTHON_BLOCKS]


# -- the front-end examples against the back-ends the README names ---------------------


def readme_command(program: str, tmp: Path) -> list[str]:
    """The README's ``sh`` command that starts with ``program``, continuation lines
    joined, its paths replaced by ones under ``tmp``."""
    for block in blocks("sh"):
        text = block.code.replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith(program + " "):
                command = substitute_paths(line, tmp)
                return shlex.split(command.split("#", 1)[0])
    raise AssertionError(f"README.md has no sh command starting with {program!r}")


def substitute_paths(text: str, tmp: Path) -> str:
    for old, new in ((BLK_SOCK, tmp / "blk.sock"), (BLK_IMAGE, tmp / "disk.img")):
        text = text.replace(old, os.fspath(new))
    return text


@contextmanager
def readme_backend(name: str, tmp: Path) -> Iterator[Path]:
    """The back-end the README says to start, started with its commands; yields its socket."""
    truncate = readme_command("truncate", tmp)
    subprocess.run(truncate, check=True, timeout=10)
    assert (tmp / "disk.img").stat().st_size == 64 << 20
    sock = tmp / "blk.sock"
    if name == "serve-blk":
        argv = readme_command("python -m vhost serve blk", tmp)
        argv[0] = sys.executable
    else:
        argv = readme_command("qemu-storage-daemon", tmp)
        argv[0] = os.fspath(peers.find_binary("qemu-storage-daemon"))
    with peers.spawn_peer(name, argv, sock, timeout=START_TIMEOUT) as peer:
        yield sock
        assert peer.alive(), peer.output()


@pytest.mark.parametrize("backend", ["serve-blk", "qemu-storage-daemon"])
def test_readme_frontend_examples(backend: str, tmp_sock_dir: Path) -> None:
    with readme_backend(backend, tmp_sock_dir) as sock:
        namespace: dict[str, object] = {"__name__": "readme_example"}
        try:
            for kind, paths in (
                ("frontend", {BLK_SOCK: os.fspath(sock)}),
                ("frontend, continued", {}),
            ):
                code = substitute(python_block(kind), paths)
                exec(compile(code, f"README.md ({kind} example)", "exec"), namespace)
            fe = namespace["fe"]
            assert isinstance(fe, Frontend)
            assert fe.broken  # closed by the example
        finally:
            # The example's function and its globals form a cycle: free its fds now.
            namespace.clear()
    # What the examples did, checked from outside: the sector they wrote is on disk.
    with open(tmp_sock_dir / "disk.img", "rb") as image:
        image.seek(8 * 512)
        assert image.read(512) == b"hello, virtio-blk".ljust(512, b".")


# -- the back-end and daemon examples, as processes -------------------------------------


def test_readme_backend_example_serves_our_frontend(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "dev.sock"
    code = substitute(python_block("backend"), {DEV_SOCK: os.fspath(sock)})
    with example_process(python_argv(code), sock) as proc:
        with connect(sock) as fe:
            features, proto = fe.negotiate()
            # What the README says a front-end gets from it.
            assert features == int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
            assert proto == ProtocolFeature.REPLY_ACK
            assert fe.get_vring_base(0) == 0
        # Our disconnect ends the session; the example's `with` then removes the socket
        # and the process exits. (Ctrl-C in BackendSession.serve is not relied on here.)
        code_, _, err = stopped(proc)
    assert code_ == 0, err
    assert not sock.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_readme_daemon_example_serves_and_stops_on_signal(
    sig: signal.Signals, tmp_sock_dir: Path
) -> None:
    sock = tmp_sock_dir / "rng.sock"
    code = substitute(python_block("daemon"), {RNG_SOCK: os.fspath(sock)})
    with example_process(python_argv(code), sock) as proc:
        data = read_entropy(sock, 64)
        assert len(data) == 64 and data != bytes(64)
        # A second front-end after the first left: the daemon outlives its front-ends.
        assert read_entropy(sock, 32) != bytes(32)
        with connect(sock) as fe:
            fe.negotiate()
            proc.send_signal(sig)  # with a front-end connected
            code_, _, err = stopped(proc)
    assert code_ == 0, err
    assert "Traceback" not in err, err


# -- the kernel vhost example, in the test guest -----------------------------------------


def test_readme_kernel_example_runs_in_the_guest() -> None:
    block = python_block("kernel")
    # `tap_fd` is the one name the example leaves to the reader: give it a real tap.
    prelude = textwrap.dedent(
        f"""\
        import sys
        sys.path.insert(0, {os.fspath(CHECKOUT / "tests")!r})
        from guest_kern.net import open_tap
        tap_fd = open_tap("pvreadme0")
        """
    )
    epilogue = 'print("README-KERNEL-EXAMPLE-OK", tx.in_flight, flush=True)\n'
    script = f"{guest.VENV_PYTHON} example.py\n"
    result = guest.run_guest(
        script, mode="host", files={"example.py": prelude + block + epilogue}, timeout=300
    ).check()
    assert "README-KERNEL-EXAMPLE-OK 0" in result.script_output, result.tail(40)


# -- the QEMU command line ----------------------------------------------------------------


def test_readme_qemu_line_is_the_guest_tests_one() -> None:
    argv = readme_command("qemu-system-x86_64", Path("/unused"))
    # The README's socket path is kept as is here (substitute_paths maps it to /unused).
    expected = [
        "qemu-system-x86_64",
        *guest.shared_memory_args(512),
        *guest.vhost_user_blk_args(Path("/unused/blk.sock"), queues=1),
    ]
    assert argv == expected


def test_readme_names_the_backend_to_start() -> None:
    """The README says which back-end its front-end examples need, as commands."""
    text = README.read_text()
    before = text[: text.index(dict(PYTHON_BLOCKS)["frontend"])]
    assert f"python -m vhost serve blk --socket {BLK_SOCK} --image {BLK_IMAGE}" in before
    assert f"addr.path={BLK_SOCK}" in before
