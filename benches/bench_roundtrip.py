"""Round-trip latency of one vhost-user request: ours, qemu-storage-daemon, pure Python, floor.

Measures, in one run, the mean round-trip time of

* GET_FEATURES (a 12-byte request with a 20-byte reply), and
* SET_VRING_NUM with NEED_REPLY under REPLY_ACK (20 bytes each way),

for each of these pairs, every one a real two-process round trip over a Unix socket:

* ours: ``vhost.user.Frontend`` (the public facade over the Rust core) against our native
  back-end (``rust/examples/null_backend.rs``), against our back-end served from Python
  (``BackendSession.serve`` with a minimal ``BackendHandler``, in a child process), and
  against qemu-storage-daemon (vhost-user-blk export); ours-core: ``vhost._core.Frontend``
  called directly, against the native back-end (the facade's cost is the difference);
* the pure-Python client ``benches/pyclient.py`` against qemu-storage-daemon;
* the pure-Python client against our back-end;
* the raw floor ``benches/floor.c`` (fork + socketpair ping-pong, same message sizes),

once with both processes pinned to one CPU and once unpinned (the scheduler's choice).
Each figure is the median over ``--batches`` batches of the mean over ``--n`` round
trips, after a warm-up. All pairs of a placement are connected at once and their batches
(and the floor's runs) take turns, so that outside load falls on every case alike. Every
Python-side loop is timed the same way (one clock reading at each end of a batch, the
garbage collector off), so the cases differ only in what a round trip costs.

    python benches/bench_roundtrip.py [--n N] [--batches B] [--cpu C]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import pyclient  # noqa: E402 - a sibling script, found through sys.path

VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_REPLY_ACK = 1 << 3
VRING_INDEX, VRING_NUM = 0, 256
START_TIMEOUT = 30.0

GET_FEATURES = "GET_FEATURES 12/20"
SET_VRING_NUM_ACK = "SET_VRING_NUM+ack 20/20"
OPS = (GET_FEATURES, SET_VRING_NUM_ACK)
FLOOR_SIZES = {GET_FEATURES: (12, 20), SET_VRING_NUM_ACK: (20, 20)}

FLOOR = "floor.c (socketpair, fork)"
FLOOR_SETSID = "floor.c, child in own session"
PEER_OURS = "our back-end"
PEER_NATIVE = "our native back-end"
PEER_QSD = "qemu-storage-daemon"
CASES = (
    ("ours", PEER_NATIVE),
    ("ours-core", PEER_NATIVE),
    ("ours", PEER_OURS),
    ("ours", PEER_QSD),
    ("pyclient", PEER_QSD),
    ("pyclient", PEER_OURS),
    ("pyclient", PEER_NATIVE),
)


# --- the back-end under test (child process) -------------------------------------------


def serve_backend(path: str) -> int:
    """Child mode: listen on ``path``, serve one front-end with a minimal handler."""
    from vhost._core import Listener  # noqa: PLC0415 - only the child needs the module
    from vhost.user import BackendHandler  # noqa: PLC0415

    class BenchDevice(BackendHandler):
        max_queues = 1

        def get_features(self) -> int:
            return VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES

        def get_protocol_features(self) -> int:
            return PROTOCOL_F_REPLY_ACK

        def get_vring_base(self, index: int) -> int:
            return 0  # the bench never starts a ring

    with Listener(path) as listener:
        print("ready", flush=True)
        with listener.accept_backend(timeout=START_TIMEOUT) as session:
            session.serve(BenchDevice())
    return 0


# --- placement ---------------------------------------------------------------------------


def cpus_of(pid: int = 0) -> str:
    """The CPUs a process may run on, as ``0,1``."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))


@dataclass(frozen=True)
class Placement:
    """Where both processes of a case run: one CPU, or all of them."""

    name: str
    cpus: frozenset[int]

    @property
    def pinned(self) -> bool:
        return len(self.cpus) == 1

    def apply(self) -> None:
        """Sets this process's affinity; children started afterwards inherit it."""
        os.sched_setaffinity(0, self.cpus)

    def prefix(self) -> list[str]:
        """``taskset -c C`` for a pinned child (explicit, on top of the inheritance)."""
        taskset = shutil.which("taskset")
        if not self.pinned or taskset is None:
            return []
        return [taskset, "-c", ",".join(str(c) for c in sorted(self.cpus))]


# --- peers -------------------------------------------------------------------------------


def _listening(path: str) -> bool:
    """Whether a socket is listening on ``path``: the file exists from ``bind``, but a
    connect before ``listen`` is refused (qemu-storage-daemon has such a window). Read from
    /proc/net/unix (flag __SO_ACCEPTCON), so no probe connection uses up a one-shot peer."""
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def _wait_for_socket(proc: subprocess.Popen[bytes], path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(path):
        if proc.poll() is not None:
            raise SystemExit(f"peer {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"peer {proc.args!r}: no socket {path} after {timeout}s")
        time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def spawn_peer(peer: str, place: Placement, tmp: str, tag: str) -> Iterator[tuple[str, int]]:
    """Starts ``peer`` under ``place``; yields (socket path, pid)."""
    sock_path = os.path.join(tmp, f"{tag}.sock")
    if peer == PEER_OURS:
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-backend", sock_path]
    elif peer == PEER_NATIVE:
        argv = [str(build_native()), sock_path, "--once"]
    else:
        binary = shutil.which("qemu-storage-daemon")
        if binary is None:
            raise SystemExit("qemu-storage-daemon not found: run `make setup`")
        image = os.path.join(tmp, f"{tag}.img")  # one each: qsd write-locks its image
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        argv = [
            binary,
            "--blockdev",
            f"driver=file,node-name=f0,filename={image}",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
            f"addr.path={sock_path},writable=on",
        ]
    # The peer stays in this session, as floor.c's forked child does: with autogroup
    # scheduling a session is a scheduling group, and a peer in another one pays
    # cross-group wake-ups (~1.5 us a round trip here) that the floor would not.
    proc = subprocess.Popen(
        place.prefix() + argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for_socket(proc, sock_path, START_TIMEOUT)
        yield sock_path, proc.pid
    finally:
        _stop(proc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)


# --- clients -------------------------------------------------------------------------------


Op = Callable[[], object]


@contextlib.contextmanager
def ours(path: str) -> Iterator[dict[str, Op]]:
    """``vhost.user.Frontend`` (the public facade over the native core), negotiated like
    QEMU: owner, features, REPLY_ACK."""
    from vhost.user import Frontend  # noqa: PLC0415 - the floor runs without the module

    fe = Frontend.connect(path)
    try:
        fe.set_owner()
        features = fe.get_features()
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            fe.set_protocol_features(fe.get_protocol_features() & PROTOCOL_F_REPLY_ACK)
        fe.set_features(features)
        if not fe.acked_protocol_features & PROTOCOL_F_REPLY_ACK:
            raise SystemExit(f"{path}: back-end does not offer REPLY_ACK")
        yield {
            GET_FEATURES: fe.get_features,
            SET_VRING_NUM_ACK: functools.partial(fe.set_vring_num, VRING_INDEX, VRING_NUM),
        }
    finally:
        fe.close()  # shuts the socket down: the peer sees the disconnect at once


@contextlib.contextmanager
def ours_core(path: str) -> Iterator[dict[str, Op]]:
    """``vhost._core.Frontend`` called directly: the facade's cost is the difference."""
    from vhost._core import Frontend  # noqa: PLC0415 - the floor runs without the module

    fe = Frontend.connect(path)
    try:
        fe.set_owner()
        features = fe.get_features()
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            fe.set_protocol_features(fe.get_protocol_features() & PROTOCOL_F_REPLY_ACK)
        fe.set_features(features)
        if not fe.acked_protocol_features & PROTOCOL_F_REPLY_ACK:
            raise SystemExit(f"{path}: back-end does not offer REPLY_ACK")
        yield {
            GET_FEATURES: fe.get_features,
            SET_VRING_NUM_ACK: functools.partial(fe.set_vring_num, VRING_INDEX, VRING_NUM),
        }
    finally:
        # The native Frontend closes its socket when collected; hang up now so the peer
        # sees the disconnect (our back-end's serve() then returns).
        with socket.socket(fileno=os.dup(fe.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def pure_python(path: str) -> Iterator[dict[str, Op]]:
    """``benches/pyclient.py``: socket + struct only."""
    with pyclient.connect(path, timeout=10.0) as sock:
        neg = pyclient.negotiate(sock)
        if not neg.protocol_features & PROTOCOL_F_REPLY_ACK:
            raise SystemExit(f"{path}: back-end does not offer REPLY_ACK")
        yield {
            GET_FEATURES: functools.partial(pyclient.get_features, sock),
            SET_VRING_NUM_ACK: functools.partial(
                pyclient.set_vring_num_ack, sock, VRING_INDEX, VRING_NUM
            ),
        }


CLIENTS = {"ours": ours, "ours-core": ours_core, "pyclient": pure_python}


def time_batch(op: Op, n: int) -> float:
    """The mean ns per call over ``n`` calls (one clock reading each end)."""
    loop = range(n)
    t0 = time.perf_counter_ns()
    for _ in loop:
        op()
    return (time.perf_counter_ns() - t0) / n


# --- the floor -------------------------------------------------------------------------------


def build_floor() -> Path:
    out = ROOT / "target" / "bench" / "floor"
    src = HERE / "floor.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = shutil.which("cc") or "cc"
        subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], check=True)
    return out


def build_native() -> Path:
    """The core's own back-end session with a Rust device (rust/examples/null_backend.rs):
    the protocol stack with no Python on the back-end side."""
    subprocess.run(
        ["cargo", "build", "-q", "-p", "pyvhost-core", "--release", "--example", "null_backend"],
        cwd=ROOT,
        check=True,
    )
    return ROOT / "target" / "release" / "examples" / "null_backend"


_MEAN = re.compile(r"mean_ns=(\d+(?:\.\d+)?)")


def time_floor(floor: Path, op: str, place: Placement, n: int, own_session: bool = False) -> float:
    """One floor.c run's mean ns (it warms up by itself); ``own_session`` puts its child
    in a session of its own (another autogroup), the layout of a separately started peer."""
    req, rep = FLOOR_SIZES[op]
    out = subprocess.run(
        [*place.prefix(), str(floor), str(n), str(req), str(rep)]
        + (["setsid"] if own_session else []),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    m = _MEAN.search(out)
    if m is None:
        raise SystemExit(f"unexpected floor output: {out!r}")
    return float(m.group(1))


# --- driver ----------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    op: str
    batches: dict[str, list[float]]

    def ns(self, place: str) -> float:
        """The figure: median of the batch means."""
        return statistics.median(self.batches[place])

    def best(self, place: str) -> float:
        """The least disturbed batch: its mean."""
        return min(self.batches[place])

    def spread(self, place: str) -> str:
        b = self.batches[place]
        return f"{min(b) / 1000:.1f}-{max(b) / 1000:.1f}"


def run(args: argparse.Namespace) -> list[Row]:
    all_cpus = frozenset(os.sched_getaffinity(0))
    if args.cpu not in all_cpus:
        raise SystemExit(f"--cpu {args.cpu} is not one of this process's CPUs {cpus_of()}")
    placements = [
        Placement("pinned", frozenset({args.cpu})),
        Placement("unpinned", all_cpus),
    ]
    floor = build_floor()
    warmup = min(args.n, max(1000, args.n // 10))
    rows: dict[tuple[str, str], Row] = {}

    def record(case: str, op: str, place: Placement, ns: float) -> None:
        row = rows.setdefault((case, op), Row(case, op, {}))
        row.batches.setdefault(place.name, []).append(ns)

    gc_was_enabled = gc.isenabled()
    with tempfile.TemporaryDirectory(prefix="pvb-", dir="/tmp") as tmp:
        try:
            for place in placements:
                place.apply()
                print(f"# {place.name}: this process cpus={cpus_of()}", flush=True)
                with contextlib.ExitStack() as stack:
                    # Every pair is connected first; their batches then take turns, so
                    # that load from elsewhere falls on all cases alike.
                    sessions: list[tuple[str, dict[str, Op]]] = []
                    for i, (client, peer) in enumerate(CASES):
                        tag = f"{place.name}-{i}"
                        path, pid = stack.enter_context(spawn_peer(peer, place, tmp, tag))
                        print(
                            f"#   {client} vs {peer}: peer pid {pid} cpus={cpus_of(pid)}",
                            flush=True,
                        )
                        sessions.append(
                            (f"{client} vs {peer}", stack.enter_context(CLIENTS[client](path)))
                        )
                    for _, ops in sessions:
                        for op in OPS:
                            for _ in range(warmup):
                                ops[op]()
                    gc.disable()
                    for _ in range(args.batches):
                        for op in OPS:
                            ns = time_floor(floor, op, place, args.n)
                            record(FLOOR, op, place, ns)
                            ns = time_floor(floor, op, place, args.n, own_session=True)
                            record(FLOOR_SETSID, op, place, ns)
                        for case, ops in sessions:
                            for op in OPS:
                                record(case, op, place, time_batch(ops[op], args.n))
                    if gc_was_enabled:
                        gc.enable()
        finally:
            if gc_was_enabled:
                gc.enable()
            os.sched_setaffinity(0, all_cpus)
    return list(rows.values())


def render(rows: Sequence[Row], args: argparse.Namespace, load: tuple[str, str]) -> str:
    floors = {r.op: r for r in rows if r.case == FLOOR}
    lines = [
        f"# bench_roundtrip: python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"qemu-storage-daemon {_qsd_version()}",
        f"# pinned: both processes on CPU {args.cpu} (sched_setaffinity + taskset -c "
        f"{args.cpu}); unpinned: both free on CPUs {cpus_of()}; every peer in this session "
        "(as floor.c's child) unless the row says otherwise",
        f"# each figure: median of {args.batches} batches x mean of {args.n} round trips, "
        "after warm-up; ratio = case / floor.c in the same placement; "
        "best = lowest batch mean (us) and its ratio to the floor's best",
        f"# load average (1 min) before / after: {load[0]} / {load[1]} "
        "(other tenants' load inflates medians; best-of-batches is the least disturbed)",
        "",
    ]
    header = (
        "case",
        "request",
        "pinned us",
        "x floor",
        "pinned best",
        "x floor best",
        "unpinned us",
        "x floor",
        "unpinned range",
    )
    table: list[tuple[str, ...]] = [header]
    for r in rows:
        fl = floors[r.op]
        table.append(
            (
                r.case,
                r.op,
                f"{r.ns('pinned') / 1000:.2f}",
                f"{r.ns('pinned') / fl.ns('pinned'):.2f}x",
                f"{r.best('pinned') / 1000:.2f}",
                f"{r.best('pinned') / fl.best('pinned'):.2f}x",
                f"{r.ns('unpinned') / 1000:.2f}",
                f"{r.ns('unpinned') / fl.ns('unpinned'):.2f}x",
                r.spread("unpinned"),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = [
            c.ljust(w) if j < 2 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append(
                "|"
                + "|".join("-" * (w + 1) + (":" if j >= 2 else "-") for j, w in enumerate(widths))
                + "|"
            )
    return "\n".join(lines)


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _qsd_version() -> str:
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        return "(not found)"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "(unknown)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="round trips per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches per figure (median)")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU pinned runs use")
    parser.add_argument("--serve-backend", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend:
        return serve_backend(args.serve_backend)
    if args.n <= 0 or args.batches <= 0:
        parser.error("--n and --batches must be positive")
    before = _load()
    rows = run(args)
    print(render(rows, args, (before, _load())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
