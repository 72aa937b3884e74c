"""``serve blk --vduse`` against qemu-storage-daemon's ``vduse-blk``: 4 KiB random reads
through the guest kernel's own virtio-blk, in the test guest (QEMU TCG).

Run on the host: ``python benches/bench_vduse.py [--rounds R] [--seconds S]
[--placement one,split,free] [--clock icount|wall] [--strace]``. It builds
``benches/vduse_load.c`` (``gcc -O2 -static``), boots the test guest once (tests/guest.py,
2 vCPUs) and, inside it:

- writes three copies of a 64 MiB pattern image on the guest's tmpfs (every sector starts
  with its number, as tests/guest_kern/vdpa_blk.py ``make_image``);
- serves one with ``python -m vhost serve blk --vduse`` (native device, one queue,
  read-only), one with ``qemu-storage-daemon --export type=vduse-blk`` and its default
  ``aio=threads`` file driver (the reference of the ratios), one with ``aio=io_uring``
  (one queue, read-only both); ``vdpa dev add`` and ``virtio_vdpa`` make each a
  ``/dev/vdX``;
- runs ``vduse_load read /dev/vdX DEPTH SECONDS`` (Linux AIO, ``O_DIRECT``, 4 KiB at
  random offsets; every read's 8 sector headers and every 8th read's whole 4 KiB checked
  against the pattern: a back-end that returns wrong data fails the run) at depth 1 and
  32, the back-ends taking turns in ``--rounds`` short rounds whose order alternates
  (ours first in even rounds, last in odd ones; ours always next to ``aio=threads``),
  after one warm-up run of each;
- prints each round's IOPS and ratios; then, per reference, the median of the per-round
  ratios with their min-max and interquartile range and how many reads were checked, and,
  per case, the back-end's CPU time and context switches per read and each vCPU's busy
  share (from ``/proc``).

**Clock** (``--clock``): ``icount`` (default) runs QEMU with ``-icount shift=3,sleep=off``:
guest time is the guest's instruction count (8 ns each), so the load on the host (the
project's machines are shared, 2 CPUs) does not change what the guest measures; the
figures are then a cost in guest instructions, stable to a fraction of a percent.
``wall``: multi-threaded TCG, guest time is host time: what the last session measured,
noisy (benches/README.md, "bench_vduse.py").

**Placements** (guest CPUs of the load, the back-ends, and the VDUSE interrupt callback,
which ``/sys/class/vduse/NAME/vq0/irq_cb_affinity`` binds): ``one`` (default): everything
on vCPU 0, vCPU 1 left idle; ``split``: the load and the interrupt callbacks on vCPU 0,
the back-ends on vCPU 1; ``free``: nothing pinned.

``--strace`` adds, per back-end and depth, one run with ``strace -c -f`` attached to the
back-end: its system calls per read (``ioctl`` is VDUSE_VQ_INJECT_IRQ, the one ioctl of
the data path: an interrupt; ``read`` of an eventfd follows a kick).

Under TCG absolute numbers mean little; the ratios, measured in the same guest in the same
run, are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
sys.path.insert(0, str(CHECKOUT / "tests"))

LOAD_SOURCE = HERE / "vduse_load.c"
LOAD_BINARY = CHECKOUT / "target" / "bench" / "vduse_load"
IMAGE_MB = 64
DEPTHS = (1, 32)
BACKENDS = ("ours", "qsd", "qsd-uring")
"""Ours, then qemu-storage-daemon with its default ``aio=threads`` file driver (the
reference of the ratios) and with ``aio=io_uring``."""
CLOCKS = ("icount", "wall")
ICOUNT = ("-icount", "shift=3,sleep=off")
"""QEMU's instruction counting: guest time advances 8 ns per guest instruction (about
real time under TCG here) and skips idle time, so the host's other load does not change
what the guest measures (TCG then runs both vCPUs in one host thread)."""
PLACEMENTS = ("one", "split", "free")
MARK = "BENCH-VDUSE "
"""Prefix of the guest's result lines on the console (one JSON object each)."""


# --- in the guest ----------------------------------------------------------------------


def _emit(kind: str, **data: Any) -> None:
    print(MARK + json.dumps({"kind": kind, **data}), flush=True)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per vCPU: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            v = [int(x) for x in m.group(2).split()]
            idle = v[3] + v[4]
            out[int(m.group(1))] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def _proc_usage(pid: int) -> tuple[float, int]:
    """CPU seconds and context switches of process ``pid``, all its threads (the switches
    of threads that exited, such as qsd's retired pool threads, are not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        switches += sum(int(n) for n in re.findall(r"_ctxt_switches:\s+(\d+)", status))
    return cpu, switches


class Backend:
    """One back-end serving its own copy of the image as a ``/dev/vdX`` of this kernel."""

    def __init__(self, who: str, image: Path, cpu: int | None) -> None:
        from guest_kern.checks_vduse import Serve, _add, _bind, _vd_node  # noqa: PLC0415

        self.who = who
        self.name = f"pvbench-{who}"
        self.serve: Serve | None = None
        self.qsd: subprocess.Popen[bytes] | None = None
        self.added = False
        everywhere = os.sched_getaffinity(0)
        # Started on its CPU: every thread it makes later (our queue workers, qsd's pool
        # threads, io_uring workers) inherits the mask.
        os.sched_setaffinity(0, everywhere if cpu is None else {cpu})
        try:
            if who == "ours":
                self.serve = Serve(self.name, "--readonly", image=image)
                self.pid = self.serve.proc.pid
            else:
                self.qsd = _start_qsd(
                    self.name, image, "io_uring" if who == "qsd-uring" else "threads"
                )
                self.pid = self.qsd.pid
        finally:
            os.sched_setaffinity(0, everywhere)
        try:
            _add(self.name)
            self.added = True
            _bind(self.name, "virtio_vdpa")
            self.node = _vd_node(self.name)
        except BaseException:
            self.close()
            raise

    def bind_irq(self, cpu: int | None) -> str:
        """Binds the VDUSE interrupt callback of queue 0 to ``cpu`` (None: unbound, the
        kernel's default); what the kernel then says its affinity is."""
        path = Path(f"/sys/class/vduse/{self.name}/vq0/irq_cb_affinity")
        if not path.exists():
            return "no irq_cb_affinity in this kernel"
        mask = 1 << cpu if cpu is not None else (1 << (os.cpu_count() or 1)) - 1
        path.write_text(f"{mask:x}\n")
        return path.read_text().strip()

    def close(self) -> None:
        from guest_kern.checks_vduse import _del  # noqa: PLC0415

        if self.added:
            _del(self.name)
            self.added = False
        if self.serve is not None:
            self.serve.stop()
            self.serve.kill()
            self.serve = None
        if self.qsd is not None:
            self.qsd.terminate()
            try:
                self.qsd.wait(30)
            except subprocess.TimeoutExpired:
                self.qsd.kill()
                self.qsd.wait()
            self.qsd = None


def _start_qsd(name: str, image: Path, aio: str) -> subprocess.Popen[bytes]:
    from guest_kern.checks_vduse import _wait  # noqa: PLC0415

    log = Path(f"/tmp/qsd-{name}.log")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off,"
                       f"aio={aio},read-only=on",
         "--export", f"type=vduse-blk,id=v0,node-name=f0,name={name},writable=off,"
                     "num-queues=1"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited {proc.returncode}: {log.read_text()}")
        return Path(f"/dev/vduse/{name}").exists()

    _wait(f"/dev/vduse/{name} (qemu-storage-daemon)", up, 60)
    return proc


def _load(node: str, depth: int, seconds: float, cpu: int | None, seed: int) -> dict[str, float]:
    """One ``vduse_load read`` run: its figures (reads, seconds, iops, checked, ...)."""
    pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
    done = subprocess.run(
        [*pin, str(LOAD_BINARY), "read", node, str(depth), str(seconds), str(seed)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"vduse_load read {node} depth {depth}: exit {done.returncode}: {done.stderr.strip()}"
        )
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", done.stdout)}


def _case(
    backend: Backend, depth: int, seconds: float, cpu: int | None, seed: int
) -> dict[str, Any]:
    """One measured run on ``backend``, with its back-end's and the vCPUs' usage."""
    cpus0, (used0, sw0) = _cpu_times(), _proc_usage(backend.pid)
    got = _load(backend.node, depth, seconds, cpu, seed)
    cpus1, (used1, sw1) = _cpu_times(), _proc_usage(backend.pid)
    reads = got["reads"]
    busy = {
        c: round((cpus1[c][0] - cpus0[c][0]) / max(1, cpus1[c][1] - cpus0[c][1]), 3) for c in cpus0
    }
    return {
        "iops": round(got["iops"], 1),
        "reads": int(reads),
        "checked": int(got["checked"]),
        "fullchecked": int(got["fullchecked"]),
        "backend_us_per_read": round((used1 - used0) * 1e6 / reads, 1),
        "backend_switches_per_read": round((sw1 - sw0) / reads, 2),
        "vcpu_busy": busy,
    }


def _strace(backend: Backend, depth: int, seconds: float, cpu: int | None) -> dict[str, Any]:
    """System calls per read of ``backend`` during one run, from ``strace -c -f``."""
    out = Path(f"/tmp/strace-{backend.who}-{depth}.txt")
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(backend.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # strace attaches to every thread
        got = _load(backend.node, depth, seconds, cpu, 99)
    finally:
        tracer.terminate()
        tracer.wait(60)
    calls: dict[str, float] = {}
    # Columns: % time, seconds, usecs/call, calls, [errors,] syscall; then a total row.
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = round(int(fields[3]) / got["reads"], 2)
    return {"reads": int(got["reads"]), "per_read": calls}


def _placement(placement: str) -> tuple[int | None, int | None]:
    """(CPU of the load and the interrupt callbacks, CPU of the back-ends)."""
    return {"one": (0, 0), "split": (0, 1), "free": (None, None)}[placement]


@contextmanager
def _backends(images: dict[str, Path], cpu: int | None) -> Iterator[dict[str, Backend]]:
    with ExitStack() as stack:
        started = {}
        for who in BACKENDS:
            b = Backend(who, images[who], cpu)
            stack.callback(b.close)
            started[who] = b
        yield started


def in_guest(rounds: int, seconds: float, placements: Sequence[str], strace: bool) -> None:
    from guest_kern.checks_vduse import _virtio_vdpa_module  # noqa: PLC0415

    if not Path("/sys/bus/vdpa/drivers/virtio_vdpa").exists():
        subprocess.run(["insmod", str(_virtio_vdpa_module())], check=True, timeout=60)
    images = {who: Path(f"/tmp/bench-vduse-{who}.img") for who in BACKENDS}
    for image in images.values():
        subprocess.run([str(LOAD_BINARY), "mkimage", str(image), str(IMAGE_MB << 20)], check=True)
    clocksource = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    _emit(
        "guest",
        kernel=os.uname().release,
        cpus=sorted(os.sched_getaffinity(0)),
        clocksource=clocksource.read_text().strip(),
        qsd=subprocess.run(
            ["qemu-storage-daemon", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0],
    )
    for placement in placements:
        load_cpu, backend_cpu = _placement(placement)
        with _backends(images, backend_cpu) as backends:
            irq = {who: b.bind_irq(load_cpu) for who, b in backends.items()}
            _emit(
                "setup",
                placement=placement,
                load_cpu=load_cpu,
                backend_cpu=backend_cpu,
                irq_cb_affinity=irq,
                nodes={who: b.node for who, b in backends.items()},
                pids={who: b.pid for who, b in backends.items()},
            )
            for depth in DEPTHS:  # warm-up: page cache of the images, code paths
                for who in BACKENDS:
                    _load(backends[who].node, depth, min(1.0, seconds), load_cpu, 7)
            for r in range(rounds):
                order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]  # ours next to qsd
                for depth in DEPTHS:
                    for who in order:
                        got = _case(backends[who], depth, seconds, load_cpu, 1000 + r)
                        _emit("case", placement=placement, round=r, depth=depth, who=who, **got)
            if strace:
                for depth in DEPTHS:
                    for who in BACKENDS:
                        got = _strace(backends[who], depth, seconds, load_cpu)
                        _emit("strace", placement=placement, depth=depth, who=who, **got)


# --- on the host -------------------------------------------------------------------------


def build_load() -> Path:
    """Compiles benches/vduse_load.c (static: the guest runs it from the host's files)."""
    LOAD_BINARY.parent.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) to build benches/vduse_load.c")
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-static", "-o", str(LOAD_BINARY), str(LOAD_SOURCE)],
        check=True,
        timeout=120,
    )
    return LOAD_BINARY


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _ratio_line(
    placement: str, depth: int, ref: str, ratios: list[float], cases: list[dict[str, Any]]
) -> str:
    lo, hi = _quartiles(ratios)
    median = {
        who: statistics.median(c["iops"] for c in cases if c["who"] == who) for who in ("ours", ref)
    }
    verified = " ".join(
        f"{who}={sum(c['checked'] for c in cases if c['who'] == who)}"
        f"/{sum(c['fullchecked'] for c in cases if c['who'] == who)}"
        for who in ("ours", ref)
    )
    return (
        f"RATIO ours/{ref} placement={placement} depth={depth} rounds={len(ratios)} "
        f"median={statistics.median(ratios):.3f} min={min(ratios):.3f} max={max(ratios):.3f} "
        f"iqr={lo:.3f}-{hi:.3f} ours_iops={median['ours']:.0f} {ref}_iops={median[ref]:.0f} "
        f"verified(reads/whole-block)={verified}"
    )


def report(records: list[dict[str, Any]]) -> list[str]:
    """The table and the summary lines of one run's guest records."""
    lines: list[str] = []
    guest = next(r for r in records if r["kind"] == "guest")
    lines.append(
        f"# guest kernel {guest['kernel']}, vCPUs {guest['cpus']}, clocksource "
        f"{guest['clocksource']}, {guest['qsd']}"
    )
    cases = [r for r in records if r["kind"] == "case"]
    refs = BACKENDS[1:]
    for setup in (r for r in records if r["kind"] == "setup"):
        placement = setup["placement"]

        def cpu(c: int | None) -> str:
            return "any" if c is None else str(c)

        lines.append(
            f"# placement {placement}: load + VDUSE irq callback on vCPU "
            f"{cpu(setup['load_cpu'])}, back-ends on vCPU {cpu(setup['backend_cpu'])}; "
            f"irq_cb_affinity {setup['irq_cb_affinity']}; {setup['nodes']}"
        )
        lines.append(
            "| depth | round | first | "
            + " | ".join(f"{w} IOPS" for w in BACKENDS)
            + " | "
            + " | ".join(f"ours/{r}" for r in refs)
            + " |"
        )
        lines.append("|--:|--:|---|" + "--:|" * (len(BACKENDS) + len(refs)))
        mine = [c for c in cases if c["placement"] == placement]
        for depth in DEPTHS:
            ratios: dict[str, list[float]] = {r: [] for r in refs}
            at_depth = [c for c in mine if c["depth"] == depth]
            for rnd in sorted({c["round"] for c in at_depth}):
                got = {c["who"]: c for c in at_depth if c["round"] == rnd}
                if set(got) != set(BACKENDS):
                    continue
                for r in refs:
                    ratios[r].append(got["ours"]["iops"] / got[r]["iops"])
                lines.append(
                    f"| {depth} | {rnd} | {BACKENDS[0] if rnd % 2 == 0 else BACKENDS[-1]} | "
                    + " | ".join(f"{got[w]['iops']:,.0f}" for w in BACKENDS)
                    + " | "
                    + " | ".join(f"{ratios[r][-1]:.3f}" for r in refs)
                    + " |"
                )
            if not ratios[refs[0]]:
                continue
            for r in refs:
                lines.append(_ratio_line(placement, depth, r, ratios[r], at_depth))
            for who in BACKENDS:
                per = [c for c in at_depth if c["who"] == who]
                spread = [c["iops"] for c in per]
                busy = {
                    k: round(statistics.median(c["vcpu_busy"][k] for c in per), 2)
                    for k in per[0]["vcpu_busy"]
                }
                lines.append(
                    f"#   {who} depth {depth}: IOPS {min(spread):,.0f}-{max(spread):,.0f} "
                    f"(cv {statistics.pstdev(spread) / statistics.mean(spread):.1%}); back-end "
                    f"CPU {statistics.median(c['backend_us_per_read'] for c in per):.1f} us/read, "
                    f"{statistics.median(c['backend_switches_per_read'] for c in per):.2f} "
                    f"context switches/read; vCPU busy {busy}"
                )
        for st in (r for r in records if r["kind"] == "strace" and r["placement"] == placement):
            calls = ", ".join(f"{k} {v}" for k, v in sorted(st["per_read"].items()))
            lines.append(
                f"# strace -c -f {st['who']} depth {st['depth']} ({st['reads']} reads), "
                f"per read: {calls}"
            )
    return lines


def on_host(
    rounds: int, seconds: float, placements: Sequence[str], strace: bool, clock: str
) -> int:
    from guest import CHECKOUT as GUEST_CHECKOUT  # noqa: PLC0415
    from guest import VENV_PYTHON, qemu_version, run_guest  # noqa: PLC0415
    from guest_kern.vduse_host import extract_virtio_vdpa  # noqa: PLC0415

    build_load()
    if extract_virtio_vdpa() is None:
        print("bench_vduse: no cached guest kernel package (run scripts/setup.sh)", file=sys.stderr)
        return 1
    script = (
        f"cd {GUEST_CHECKOUT / 'tests'} && {VENV_PYTHON} {HERE / 'bench_vduse.py'} --in-guest "
        f"--rounds {rounds} --seconds {seconds} --placement {','.join(placements)}"
        f"{' --strace' if strace else ''}\n"
    )
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    result = run_guest(
        script,
        mode="host",
        qemu_args=ICOUNT if clock == "icount" else (),
        timeout=300 + rounds * len(BACKENDS) * len(DEPTHS) * len(placements) * (seconds + 5) * 3,
        memory_mb=1024,
    )
    records = [
        json.loads(ln[len(MARK) :]) for ln in result.output.splitlines() if ln.startswith(MARK)
    ]
    wanted = {(p, d) for p in placements for d in DEPTHS}
    got = {(r["placement"], r["depth"]) for r in records if r["kind"] == "case"}
    print(
        f"# bench_vduse: {qemu_version()}, TCG "
        f"({' '.join(ICOUNT) if clock == 'icount' else 'multi-threaded, wall clock'}), "
        f"2 vCPUs; host CPUs {os.cpu_count()}"
    )
    print(
        f"# {rounds} rounds x {seconds} s per case, order alternating; wall "
        f"{time.monotonic() - started:.0f} s; host load (1 min) before/after "
        f"{load_before:.2f}/{os.getloadavg()[0]:.2f}"
    )
    if not records or got != wanted:
        print(result.tail(80))
        print(f"bench_vduse: the guest did not finish (status {result.status})", file=sys.stderr)
        return 1
    for line in report(records):
        print(line)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--placement",
        default="one",
        help=f"comma-separated, of {', '.join(PLACEMENTS)} (default one)",
    )
    parser.add_argument("--strace", action="store_true", help="syscalls per read, per back-end")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="icount",
        help="icount (default): guest time counts guest instructions; wall: MTTCG, host time",
    )
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    placements = args.placement.split(",")
    if not set(placements) <= set(PLACEMENTS) or args.rounds < 1 or not args.seconds > 0:
        parser.error(f"--placement takes {', '.join(PLACEMENTS)}; --rounds and --seconds > 0")
    if args.in_guest:
        in_guest(args.rounds, args.seconds, placements, args.strace)
        return 0
    return on_host(args.rounds, args.seconds, placements, args.strace, args.clock)


if __name__ == "__main__":
    sys.exit(main())
