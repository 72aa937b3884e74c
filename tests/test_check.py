"""``python -m vhost check`` and :func:`vhost.check.run_checks` against real back-ends:
our own ``serve blk`` and ``serve rng`` (which must pass every case), and
qemu-storage-daemon, virtiofsd and rust-vmm's vhost-device-rng (whose measured results
are pinned here, so that a change in the checker or in the peer shows)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import peers
from vhost.check import Outcome, Report, all_cases, run_checks, wire
from vhost.check.hostile import ACCESS_PLATFORM, IOTLB_CASES

pytestmark = pytest.mark.timeout(300)

CHECK = [sys.executable, "-m", "vhost", "check"]
RUN_TIMEOUT = 240


def cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHECK, *map(str, args)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False, stdin=subprocess.DEVNULL)


def outcomes(report: Report) -> dict[str, Outcome]:
    return {r.name: r.outcome for r in report.results}


def not_passed(report: Report) -> dict[str, str]:
    return {r.name: r.outcome.value for r in report.results if r.outcome is not Outcome.PASS}


def assert_complete(report: Report) -> None:
    """Every case ran (or was skipped for a stated reason) and is classified."""
    assert [r.name for r in report.results] == [c.name for c in all_cases()]
    for r in report.results:
        assert isinstance(r.outcome, Outcome) and r.detail, r


def serve_argv(kind: str, sock: Path, *extra: str | Path) -> list[str]:
    return [sys.executable, "-m", "vhost", "serve", kind, "--socket", str(sock),
            *map(str, extra)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return peers.make_image(tmp_path / "disk.img", 16 << 20)


def argv_of(cm: contextlib.AbstractContextManager[peers.Peer]) -> list[str]:
    """The command line tests/peers.py starts a peer with (started once, then stopped,
    so that the checker can start and restart it itself)."""
    with cm as peer:
        return list(peer.argv)


def qsd_argv(image: Path, sock: Path) -> list[str]:
    argv = argv_of(peers.qemu_storage_daemon_blk(image, sock))
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    return argv


# -- our own back-ends: every case passes --------------------------------------------


IOTLB_NAMES = [c.name for c in IOTLB_CASES]
"""The IOTLB_MSG cases (H4a, H4b): they skip on a back-end without ACCESS_PLATFORM."""


def test_serve_blk_passes_every_case(tmp_sock_dir: Path, image: Path) -> None:
    sock = tmp_sock_dir / "blk.sock"
    report = run_checks(sock, device="blk",
                        restart=serve_argv("blk", sock, "--image", image), timeout=5.0)
    assert_complete(report)
    # Without --iommu it offers no ACCESS_PLATFORM: the IOTLB cases do not apply.
    assert not_passed(report) == dict.fromkeys(IOTLB_NAMES, "skip"), report.table()
    skipped = {r.name: r.detail for r in report.results if r.name in IOTLB_NAMES}
    assert all("ACCESS_PLATFORM (bit 33) is not offered" in d for d in skipped.values())
    assert report.ok
    # The checker started the back-end itself, so it counted its fds after each case run.
    assert all(r.fds is not None for r in report.results if r.outcome is not Outcome.SKIP)


def test_serve_rng_passes_every_case(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "rng.sock"
    report = run_checks(sock, device="rng", restart=serve_argv("rng", sock), timeout=5.0)
    assert_complete(report)
    # virtio-rng has no config space: the CONFIG cases do not apply, all others pass.
    config_cases = {"config-bounds", "config-without-CONFIG", "config-offset-overflow",
                    "config-size-0", "config-size-4097", "config-size-field-lies"}
    skipped = dict.fromkeys(config_cases | set(IOTLB_NAMES), "skip")
    assert not_passed(report) == skipped, report.table()
    assert report.ok


def test_serve_blk_iommu_refuses_bad_iotlb_messages_and_goes_on(
    tmp_sock_dir: Path, image: Path
) -> None:
    sock = tmp_sock_dir / "blk.sock"
    report = run_checks(sock, device="blk", only=IOTLB_NAMES, timeout=5.0,
                        restart=serve_argv("blk", sock, "--image", image, "--iommu"))
    assert outcomes(report) == dict.fromkeys(IOTLB_NAMES, Outcome.PASS), report.table()
    details = " ".join(r.detail for r in report.results)
    for what in ("permission 0", "outside the memory table", "update of size 0", "wraps",
                 "invalidate of size 0"):
        assert what in details, details
    assert all(r.fds is not None for r in report.results)


@contextlib.contextmanager
def accept_everything(sock: Path) -> Iterator[None]:
    """A back-end that offers ACCESS_PLATFORM and REPLY_ACK and acks every request as a
    success, whatever it says: what the IOTLB cases must fail."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(8)
    listener.settimeout(0.2)
    features = (1 << 32) | (1 << 30) | ACCESS_PLATFORM
    stop = threading.Event()

    def reply(conn: socket.socket, code: int, value: int) -> None:
        wire.send(conn, wire.message(code, wire.U64.pack(value), flags=wire.VERSION | wire.REPLY))

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5.0)
                try:
                    while (m := wire.recv_message(conn)) is not None:
                        m.close_fds()
                        if m.code == 1:  # GET_FEATURES
                            reply(conn, m.code, features)
                        elif m.code == 15:  # GET_PROTOCOL_FEATURES
                            reply(conn, m.code, 1 << 3)  # REPLY_ACK
                        elif m.flags & wire.NEED_REPLY:
                            reply(conn, m.code, 0)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
        listener.close()


def test_iotlb_cases_fail_a_back_end_that_accepts_bad_updates(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "yes.sock"
    with accept_everything(sock):
        report = run_checks(sock, only=IOTLB_NAMES, timeout=2.0)
    assert outcomes(report) == dict.fromkeys(IOTLB_NAMES, Outcome.FAIL), report.table()
    details = {r.name: r.detail for r in report.results}
    assert "update with permission 0 was acked as a success" in details["iotlb-update-refused"]
    assert "update of size 0 was acked as a success" in details["iotlb-range-refused"]


# -- third-party back-ends: the run completes, with the measured result ---------------

PACKED_CASES = ["packed-bad-ids", "packed-wrap-mismatch", "packed-chain-around",
                "packed-bad-indirect", "packed-wraps", "packed-event-area"]
"""The packed-ring cases (F1-F6): they skip on a back-end without VIRTIO_F_RING_PACKED."""

#: qemu-storage-daemon 10.0 (libvhost-user): every case it does not pass, as measured.
#: libvhost-user acks every request with NEED_REPLY as a success, whatever happened, and
#: keeps fds it did not expect; ring indexes past its queues crash it.
QSD_KNOWN = {
    "mem-slot-limit": "fail", "config-bounds": "fail", "code-unassigned-acked": "fail",
    "vring-num-short-body": "fail", "features-trailing-bytes": "fail",
    "add-mem-reg-without-slots": "fail", "features-never-offered": "fail",
    "fds-on-get-features": "fail", "64-fds": "fail", "253-fds": "fail",
    "two-regions-one-fd": "fail", "two-regions-three-fds": "fail", "nofd-with-fd": "fail",
    "no-nofd-no-fd": "fail", "vring-word-reserved-bits": "fail",
    "region-fd-is-socket": "fail", "region-fd-is-eventfd": "fail", "513-regions": "hung",
    "count-says-two-one-sent": "hung", "gpa-overflow": "fail", "uaddr-overflow": "fail",
    "offset-overflow": "fail", "region-size-0": "fail", "size-aligns-to-0": "fail",
    "overlapping-gpa": "fail", "memfd-smaller-than-region": "fail", "vring-num-0": "fail",
    "vring-num-3": "fail", "vring-num-65536": "fail", "vring-num-index-256": "fail",
    "vring-addr-index-0x10001": "died", "get-vring-base-index-255": "died",
    "kick-index-255": "fail", "enable-index-0x10001": "fail", "inflight-too-small": "skip",
    # No slot limit enforced (as mem-slot-limit), no packed rings in libvhost-user.
    "mem-slot-exhaustion": "fail", **dict.fromkeys(PACKED_CASES + IOTLB_NAMES, "skip"),
}


def test_qemu_storage_daemon_known_result(tmp_sock_dir: Path, image: Path) -> None:
    sock = tmp_sock_dir / "qsd.sock"
    report = run_checks(sock, device="blk", restart=qsd_argv(image, sock), timeout=5.0)
    assert_complete(report)
    assert not_passed(report) == QSD_KNOWN, report.table()
    died = {r.name: r.detail for r in report.results if r.outcome is Outcome.DIED}
    assert "killed by SIGSEGV" in died["vring-addr-index-0x10001"]
    assert "killed by SIGABRT" in died["get-vring-base-index-255"]


#: virtiofsd 1.14 (rust-vmm vhost-user-backend): serves one front-end and exits, so it
#: is restarted after every case; what it does not pass, as measured.
VIRTIOFSD_KNOWN = {
    "mem-slot-limit": "fail", "config-bounds": "skip", "vring-base-after-traffic": "skip",
    "config-without-CONFIG": "skip", "vring-word-reserved-bits": "fail",
    "memfd-smaller-than-region": "fail", "vring-num-3": "fail", "inflight-too-small": "skip",
    "config-offset-overflow": "skip", "config-size-0": "skip", "config-size-4097": "skip",
    "config-size-field-lies": "skip",
    # The slot limit is not enforced (as mem-slot-limit). No --device for virtio-fs:
    # the cases that need a request skip, as do packed rings.
    "mem-slot-exhaustion": "fail",
    **dict.fromkeys(["same-head-twice", "header-layouts", "used-len-bounded",
                     "event-idx-at-end", "kick-before-ready", "mem-table-swap",
                     *PACKED_CASES, *IOTLB_NAMES], "skip"),
}


def test_virtiofsd_known_result(tmp_sock_dir: Path, tmp_path: Path) -> None:
    sock = tmp_sock_dir / "fs.sock"
    shared = tmp_path / "shared"
    shared.mkdir()
    argv = argv_of(peers.virtiofsd(shared, sock))
    report = run_checks(sock, restart=argv, timeout=5.0)
    assert_complete(report)
    assert not_passed(report) == VIRTIOFSD_KNOWN, report.table()
    # Each session ended with the process exiting, never by a signal.
    assert all("as after every session" in r.detail for r in report.results
               if r.outcome is not Outcome.SKIP)


#: rust-vmm's vhost-device-rng 0.1.0 (vhost-user-backend 0.10): offers only the MQ
#: protocol feature, so the cases that need REPLY_ACK with another feature, CONFIG,
#: LOG_SHMFD or packed rings do not apply (the hostile messages are sent without
#: NEED_REPLY); of the rest it fails only D6. It makes a new listening socket after each
#: session.
VHOST_DEVICE_RNG_KNOWN = dict.fromkeys(
    ["reply-ack", "mem-slot-limit", "config-bounds", "config-without-CONFIG",
     "add-mem-reg-without-slots", "backend-req-fd-is-pipe", "rem-absent-region",
     "inflight-too-small", "config-offset-overflow", "config-size-0", "config-size-4097",
     "config-size-field-lies", "mem-slot-exhaustion", "log-base-bad", *PACKED_CASES,
     *IOTLB_NAMES],
    "skip") | {
    # A kick that arrives while the ring is disabled is lost (rust-vmm vhost #343).
    "kick-before-ready": "fail"}
VHOST_DEVICE_RNG = Path.home() / ".cache/pyvhost/vhost-device-rng/bin/vhost-device-rng"


def test_vhost_device_rng_known_result(tmp_sock_dir: Path) -> None:
    binary = peers.find_binary("vhost-device-rng", [VHOST_DEVICE_RNG])
    # It listens on PATH0 for -s PATH (one socket per --socket-count).
    argv = [str(binary), "-s", str(tmp_sock_dir / "rng.sock")]
    report = run_checks(tmp_sock_dir / "rng.sock0", device="rng", restart=argv, timeout=5.0)
    assert_complete(report)
    assert not_passed(report) == VHOST_DEVICE_RNG_KNOWN, report.table()
    assert all(r.fds is not None for r in report.results if r.outcome is Outcome.PASS)


# -- the CLI -----------------------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_missing_socket_is_one_line(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "absent.sock"
    proc = cli(sock)
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert str(sock) in line and "No such file" in line, line


def test_cli_refused_connection_is_one_line(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))  # bound, never listening: connect is refused
    try:
        proc = cli(sock)
    finally:
        s.close()
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert str(sock) in line and "refused" in line, line


def test_cli_silent_listener_is_one_line_and_status_2(tmp_sock_dir: Path) -> None:
    """Something listens but never answers (not a vhost-user back-end, or a stuck one)."""
    sock = tmp_sock_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))
        s.listen(4)
        proc = cli(sock, "--timeout", "0.5")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert str(sock) in line and "did not answer GET_FEATURES within 0.5 s" in line, line


def test_cli_broken_restart_command_is_one_line(tmp_sock_dir: Path) -> None:
    missing = tmp_sock_dir / "no-such-back-end"
    proc = cli(tmp_sock_dir / "x.sock", "--restart", f"{missing} --socket x")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert f"restart command {missing} --socket x" in line and "No such file" in line, line


def test_cli_unknown_case_is_usage_error(tmp_sock_dir: Path) -> None:
    proc = cli(tmp_sock_dir / "x.sock", "--only", "no-such-case")
    assert proc.returncode == 1
    assert "no-such-case" in one_line_error(proc)


def test_cli_help_has_examples_and_list_names_every_case() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "--restart" in proc.stdout
    listed = cli("--list")
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == [c.name for c in all_cases()]


@contextlib.contextmanager
def qsd(image: Path, sock: Path) -> Iterator[peers.Peer]:
    with peers.qemu_storage_daemon_blk(image, sock) as peer:
        yield peer


def test_cli_json_only_skip_and_exit_status(tmp_sock_dir: Path, image: Path) -> None:
    sock = tmp_sock_dir / "qsd.sock"
    with qsd(image, sock):
        ok = cli(sock, "--json", "--only", "get-features", "--only", "vring-num-0",
                 "--skip", "vring-num-0")
        assert ok.returncode == 0, ok.stderr
        report = json.loads(ok.stdout)
        assert report["ok"] is True
        assert [(r["name"], r["outcome"]) for r in report["results"]] == [("get-features",
                                                                           "pass")]
        bad = cli(sock, "--json", "--only", "vring-num-0")
        assert bad.returncode == 2
        (result,) = json.loads(bad.stdout)["results"]
        assert result["outcome"] == "fail" and "acked as a success" in result["detail"]
        assert result["ref"] == "ADVERSARIAL D1"


def test_cli_pid_counts_the_back_ends_fds(tmp_sock_dir: Path, image: Path) -> None:
    """qemu-storage-daemon keeps the fds sent with GET_FEATURES: only --pid sees it."""
    sock = tmp_sock_dir / "qsd.sock"
    with qsd(image, sock) as peer:
        blind = cli(sock, "--only", "fds-on-get-features")
        assert blind.returncode == 0, blind.stdout
        counted = cli(sock, "--only", "fds-on-get-features", "--pid", str(peer.pid))
        assert counted.returncode == 2, counted.stdout
        assert "holds 3 more fd(s)" in counted.stdout


def test_restart_lets_the_run_go_on_after_a_crash(tmp_sock_dir: Path, image: Path) -> None:
    sock = tmp_sock_dir / "qsd.sock"
    cases = ["vring-addr-index-0x10001", "vring-base-over-16-bits"]
    with qsd(image, sock) as peer:
        alone = run_checks(sock, only=cases, pid=peer.pid)
        assert not peer.alive()
    assert outcomes(alone) == {"vring-addr-index-0x10001": Outcome.DIED,
                               "vring-base-over-16-bits": Outcome.SKIP}
    assert "not run" in alone.results[1].detail
    restarted = run_checks(sock, only=cases, restart=qsd_argv(image, sock))
    assert outcomes(restarted) == {"vring-addr-index-0x10001": Outcome.DIED,
                                   "vring-base-over-16-bits": Outcome.PASS}
