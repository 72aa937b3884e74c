"""``python -m vhost trace`` and :mod:`vhost.trace` (issue 12): a recording proxy between
real peers.

QEMU boots a guest through the proxy onto ``serve blk`` and onto qemu-storage-daemon;
the guest's I/O works, and the trace holds the whole handshake in order, decoded from the
core's request table, with every reply matched to its request, and QEMU's disconnect.
``serve blk``'s resize (SIGHUP) sends ``CONFIG_CHANGE_MSG`` on the back-end channel, which
the proxy interposes: the guest still sees the disk grow, and the request is in the
trace. A malformed message sent through the proxy is shown as hex and still forwarded
(``serve blk`` refuses it by name). The proxy holds no fd after a connection ends.
Without the proxy's relaying any of these fails: the guest never boots, the back-end
never sees the message, the resize never reaches the guest.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import guest
from daemon_util import wait_for
from peers import make_image, qemu_storage_daemon_blk
from test_guest_daemon import blk_args, image_at, read_back, serve, write_pattern
from vhost import _core
from vhost.codes import MessageFlag, ProtocolFeature
from vhost.trace import Event, Message, Tracer, feature_names, flag_names
from vhost.user import Frontend
from vhost.virtio import BlkFeature, NetFeature, VirtioFeature

pytestmark = pytest.mark.timeout(400)

CHECKOUT = Path(__file__).resolve().parent.parent
OLD_BYTES = 32 << 20
NEW_BYTES = 64 << 20
PATTERN = "PYVHOST-TRACED-0123456789"
SECTOR = 2048


class Proxy:
    """A ``python -m vhost trace`` subprocess writing its output to a file."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc = proc
        self.out = out
        self.err = err

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextmanager
def trace_proxy(listen: Path, connect: Path, tmp: Path, *args: str) -> Iterator[Proxy]:
    """Runs ``python -m vhost trace --listen LISTEN --connect CONNECT ARGS`` until it
    listens."""
    out, err = tmp / "trace.out", tmp / "trace.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhost", "trace", "--listen", str(listen), "--connect",
             str(connect), *args],
            stdout=o,
            stderr=e,
            cwd=CHECKOUT,
        )
    proxy = Proxy(proc, out, err)
    try:
        if not wait_for(lambda: listen.exists() or proc.poll() is not None, 15):
            pytest.fail("trace did not listen")
        assert proc.poll() is None, err.read_text()
        yield proxy
    finally:
        proxy.stop()


def stderr_until(served: Any, text: str, timeout: float = 15.0) -> str:
    """What ``served`` (a ``serve`` subprocess) wrote on stderr until ``text`` appeared
    (or ``timeout`` passed): it reports a refused session after closing it."""
    got = b""
    fd = served.proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    while text.encode() not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got.decode()


def messages(records: list[dict[str, Any]], channel: str = "main") -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == "message" and r["channel"] == channel]


def in_order(names: list[str], expected: list[str]) -> bool:
    """Whether ``expected`` occurs in ``names`` as a subsequence."""
    it = iter(names)
    return all(any(n == e for n in it) for e in expected)


def check_handshake(records: list[dict[str, Any]]) -> None:
    """The whole vhost-user-blk handshake QEMU makes, decoded, in order, with replies."""
    main = messages(records)
    requests = [m for m in main if not m["reply"]]
    names = [m["name"] for m in requests]
    assert all(m["sender"] == "frontend" and m["malformed"] is None for m in requests), main
    # The guest's memory: SET_MEM_TABLE, or ADD_MEM_REG per region when the back-end
    # offers CONFIGURE_MEM_SLOTS (serve blk does): "MEM" below.
    memory = [m for m in requests if m["name"] in ("SET_MEM_TABLE", "ADD_MEM_REG")]
    steps = ["MEM" if m in memory else m["name"] for m in requests]
    assert in_order(
        steps,
        ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_FEATURES",
         "MEM", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
         "SET_VRING_ENABLE", "GET_VRING_BASE"],
    ), names
    # Replies: matched to their request, from the back-end, with the time it took.
    replies = {m["name"]: m for m in main if m["reply"]}
    features = replies["GET_FEATURES"]
    assert features["sender"] == "backend" and features["elapsed"] >= 0, features
    assert "VERSION_1" in features["fields"]["features"]["names"], features
    assert "PROTOCOL_FEATURES" in features["fields"]["features"]["names"], features
    offered = replies["GET_PROTOCOL_FEATURES"]["fields"]["features"]
    assert "CONFIG" in offered["names"], offered
    # The memory regions decoded, one fd per region, forwarded.
    assert memory, names
    for m in memory:
        regions = m["fields"]["regions"]
        assert regions and m["fds"] == len(regions), m
        assert all(r["memory_size"] > 0 and r["userspace_addr"] for r in regions), regions
    # Every ring QEMU set up: its addresses, its kick and call eventfds, enabled.
    addrs = [m for m in requests if m["name"] == "SET_VRING_ADDR"]
    assert addrs, names
    for a in addrs:
        index = a["fields"]["index"]
        assert a["fields"]["desc"] and a["fields"]["avail"] and a["fields"]["used"], a
        kicks = [m for m in requests if m["name"] == "SET_VRING_KICK"
                 and m["fields"]["index"] == index]
        assert kicks and kicks[0]["fds"] == 1, kicks
        calls = [m for m in requests if m["name"] == "SET_VRING_CALL"
                 and m["fields"]["index"] == index]
        assert calls and calls[-1]["fds"] == 1, calls
        enables = [m for m in requests if m["name"] == "SET_VRING_ENABLE"
                   and m["fields"]["index"] == index]
        assert any(e["fields"]["enable"] == 1 for e in enables), enables
    # QEMU's disconnect is the last thing on the main socket.
    last = [r for r in records if r["channel"] == "main"][-1]
    assert last["type"] == "disconnect" and last["side"] == "frontend", last


RESIZE_SCRIPT = f"""\
{write_pattern(PATTERN, SECTOR)}{read_back(SECTOR, len(PATTERN))}\
old=$(cat /sys/block/vda/size)
echo SIZE-BEFORE=$old
echo WAITING-FOR-RESIZE
i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo SIZE-AFTER=$(cat /sys/block/vda/size)
"""


def test_guest_boots_through_trace_onto_serve_blk(tmp_path: Path, tmp_sock_dir: Path) -> None:
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    back, front = tmp_sock_dir / "blk.sock", tmp_sock_dir / "trace.sock"
    with (
        serve(["blk", "--image", str(image)], back) as served,
        trace_proxy(front, back, tmp_path, "--json") as proxy,
    ):
        idle_fds = proxy.fd_count()
        with guest.start_guest(
            RESIZE_SCRIPT, mode="busybox", qemu_args=blk_args(front), memory_mb=512
        ) as vm:
            vm.wait_for("WAITING-FOR-RESIZE", timeout=180)
            with open(image, "r+b") as f:
                f.truncate(NEW_BYTES)
            served.proc.send_signal(signal.SIGHUP)
            (vm.run_dir / "go").touch()
            result = vm.wait(180).check()
        # QEMU is gone: the proxy saw it leave and holds no fd of that connection.
        assert wait_for(
            lambda: any('"disconnect"' in line for line in proxy.lines()), 15
        ), proxy.lines()
        assert wait_for(lambda: proxy.fd_count() == idle_fds, 10), (
            proxy.fd_count(), idle_fds, os.listdir(f"/proc/{proxy.proc.pid}/fd"))
        assert proxy.stop() == 0, proxy.err.read_text()
    out = result.script_output
    assert f"READ-{SECTOR}={PATTERN}" in out, out
    assert image_at(image, SECTOR, len(PATTERN)) == PATTERN.encode()
    assert f"SIZE-AFTER={NEW_BYTES // 512}" in out, out
    records = proxy.records()
    check_handshake(records)
    # The back-end channel was interposed: SET_BACKEND_REQ_FD went through with an fd,
    # and serve blk's CONFIG_CHANGE_MSG came back on it, then QEMU's GET_CONFIG.
    names = [m["name"] for m in messages(records) if not m["reply"]]
    assert "SET_BACKEND_REQ_FD" in names, names
    channel = messages(records, "backend-channel")
    change = [m for m in channel if m["name"] == "CONFIG_CHANGE_MSG" and not m["reply"]]
    assert change and change[0]["sender"] == "backend", channel
    acks = [m for m in channel if m["name"] == "CONFIG_CHANGE_MSG" and m["reply"]]
    assert acks and acks[0]["sender"] == "frontend" and acks[0]["elapsed"] >= 0, channel
    after = names[names.index("SET_BACKEND_REQ_FD"):]
    assert after.count("GET_CONFIG") >= 2, after  # at boot, and after the change
    config = [m for m in messages(records) if m["name"] == "GET_CONFIG" and m["reply"]][-1]
    capacity = bytes.fromhex(config["fields"]["data"])[:8]
    assert int.from_bytes(capacity, "little") == NEW_BYTES // 512, config


def test_guest_boots_through_trace_onto_qemu_storage_daemon(
    tmp_path: Path, tmp_sock_dir: Path
) -> None:
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    back, front = tmp_sock_dir / "qsd.sock", tmp_sock_dir / "trace.sock"
    script = write_pattern(PATTERN, SECTOR) + read_back(SECTOR, len(PATTERN))
    with (
        qemu_storage_daemon_blk(image, back),
        trace_proxy(front, back, tmp_path, "--json", "--once") as proxy,
    ):
        result = guest.run_guest(
            script, mode="busybox", qemu_args=blk_args(front), memory_mb=512
        ).check()
        # --once: the proxy exits by itself when QEMU disconnects.
        assert proxy.proc.wait(timeout=30) == 0, proxy.err.read_text()
    out = result.script_output
    assert f"READ-{SECTOR}={PATTERN}" in out, out
    assert image_at(image, SECTOR, len(PATTERN)) == PATTERN.encode()
    check_handshake(proxy.records())


def test_text_output_names_requests_and_features(tmp_path: Path, tmp_sock_dir: Path) -> None:
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    back, front = tmp_sock_dir / "blk.sock", tmp_sock_dir / "trace.sock"
    with (
        serve(["blk", "--image", str(image)], back),
        trace_proxy(front, back, tmp_path) as proxy,
    ):
        with Frontend.connect(front, timeout=10) as fe:
            fe.negotiate()
        assert wait_for(lambda: any("disconnect" in line for line in proxy.lines()), 10)
    text = "\n".join(proxy.lines())
    assert "F->B GET_FEATURES" in text, text
    assert "B->F GET_FEATURES reply" in text and "VERSION_1" in text, text
    assert " ms)" in text, text
    assert "SET_PROTOCOL_FEATURES" in text and "REPLY_ACK" in text, text


def test_malformed_message_is_shown_as_hex_and_forwarded(
    tmp_path: Path, tmp_sock_dir: Path
) -> None:
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    back, front = tmp_sock_dir / "blk.sock", tmp_sock_dir / "trace.sock"
    with (
        serve(["blk", "--image", str(image), "--verbose"], back) as served,
        Tracer(front, back) as tracer,
    ):
        fds_before = len(os.listdir("/proc/self/fd"))
        with Frontend.connect(front, timeout=10) as fe:
            features = fe.get_features()
            # SET_FEATURES with a 3-byte body: the core refuses it, and so does serve blk.
            fe.native.send_raw(2, 1, b"\x01\x02\x03")
        records = []
        for record in tracer.records(timeout=15):
            records.append(record)
            if isinstance(record, Event) and record.kind == "disconnect":
                break
        assert wait_for(lambda: len(os.listdir("/proc/self/fd")) == fds_before, 10)
        err = stderr_until(served, "SET_FEATURES")
    msgs = [r for r in records if isinstance(r, Message)]
    reply = next(m for m in msgs if m.name == "GET_FEATURES" and m.reply)
    assert reply.field("features") == features and reply.elapsed is not None
    bad = next(m for m in msgs if m.code == 2)
    assert bad.malformed is not None and "SET_FEATURES" in bad.malformed, bad
    assert bad.hex is not None and bad.hex.endswith("010203"), bad
    assert bad.hex[:24] == (2).to_bytes(4, sys.byteorder).hex() + (1).to_bytes(
        4, sys.byteorder).hex() + (3).to_bytes(4, sys.byteorder).hex()
    assert "MALFORMED" in bad.format() and "010203" in bad.format()
    assert json.loads(json.dumps(bad.to_json()))["hex"] == bad.hex
    # Forwarded: serve blk received it and refused it by name, closing the session.
    assert "SET_FEATURES" in err, err


def test_fds_forwarded_unchanged(tmp_path: Path, tmp_sock_dir: Path) -> None:
    """The fds passed through the proxy (memory table, kick and call eventfds) reach the
    back-end as the same open files: ``blk read`` through the proxy gets the image's
    bytes, which serve blk wrote into the front-end's memory through the forwarded memfd
    and announced through the forwarded call eventfd."""
    image = make_image(tmp_path / "disk.img", OLD_BYTES, pattern=b"TRACE-FD-CHECK")
    back, front = tmp_sock_dir / "blk.sock", tmp_sock_dir / "trace.sock"
    with (
        serve(["blk", "--image", str(image)], back),
        Tracer(front, back) as tracer,
    ):
        out = subprocess.run(
            [sys.executable, "-m", "vhost", "blk", "read", "--socket", str(front),
             "--offset", "0", "--length", "512", "--output", "-"],
            capture_output=True, timeout=60, cwd=CHECKOUT, check=False,
        )
        tracer.close()
        records = list(tracer.records(timeout=5))
    assert out.returncode == 0, out.stderr
    assert b"TRACE-FD-CHECK" in out.stdout, out.stdout
    table = next(r for r in records if isinstance(r, Message) and r.name == "SET_MEM_TABLE")
    assert table.fds >= 1 and table.malformed is None, table


def test_cli_errors_are_one_line(tmp_sock_dir: Path) -> None:
    missing = tmp_sock_dir / "missing.sock"
    run = subprocess.run(
        [sys.executable, "-m", "vhost", "trace", "--listen", str(tmp_sock_dir / "t.sock"),
         "--connect", str(missing)],
        capture_output=True, text=True, timeout=30, cwd=CHECKOUT, check=False,
    )
    assert run.returncode == 1, run
    assert run.stderr.count("\n") == 1 and str(missing) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    # A stale socket: nothing listens; the refusal comes when a front-end connects.
    stale = tmp_sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    front = tmp_sock_dir / "front.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", "trace", "--listen", str(front), "--connect",
         str(stale)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT,
    )
    try:
        assert wait_for(front.exists, 15)
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(front))
        _, err = proc.communicate(timeout=15)
        c.close()
    finally:
        proc.kill()
        proc.wait()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(stale) in lines[0] and "refused" in lines[0], err
    assert "Traceback" not in err
    # Ctrl-C: one line naming the paths.
    back = tmp_sock_dir / "idle.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(back))
    listener.listen(1)
    front2 = tmp_sock_dir / "front2.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", "trace", "--listen", str(front2), "--connect",
         str(back)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT,
    )
    try:
        assert wait_for(front2.exists, 15)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
        listener.close()
    assert proc.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(front2) in errors[0], err
    assert "Traceback" not in err


def test_describe_comes_from_the_core_table() -> None:
    """The glue's describe: a GET_PROTOCOL_FEATURES reply names its features."""
    header = (15).to_bytes(4, sys.byteorder) + (5).to_bytes(4, sys.byteorder)
    header += (8).to_bytes(4, sys.byteorder)
    mask = int(ProtocolFeature.MQ | ProtocolFeature.CONFIG)
    d = _core.describe("frontend", header, mask.to_bytes(8, sys.byteorder), [])
    assert d[0] == "GET_PROTOCOL_FEATURES" and d[1] is True, d
    assert d[4] == [("features", "protocol_features", mask)], d
    assert d[5] is None


def test_mirror_layout_for_a_back_end_in_client_mode(tmp_path: Path, tmp_sock_dir: Path) -> None:
    """``--listen-backend``/``--connect-frontend``: the front-end listens (our Frontend in
    server mode, as QEMU's server=on), serve blk connects in client mode to the proxy."""
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    front, back = tmp_sock_dir / "front.sock", tmp_sock_dir / "back.sock"
    accepted: list[Frontend] = []
    acceptor = threading.Thread(
        target=lambda: accepted.append(Frontend.accept(front, timeout=30)), daemon=True
    )
    acceptor.start()
    assert wait_for(front.exists, 15)
    with Tracer(back, front, backend_connects=True) as tracer:
        client = subprocess.Popen(
            [sys.executable, "-m", "vhost", "serve", "blk", "--client", "--image", str(image),
             "--socket", str(back)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT,
        )
        try:
            acceptor.join(timeout=30)
            assert accepted, "the back-end never reached the front-end through the proxy"
            with accepted[0] as fe:
                features = fe.get_features()
            _, err = client.communicate(timeout=30)
        finally:
            client.kill()
            client.wait()
        records = []
        for record in tracer.records(timeout=15):
            records.append(record)
            if isinstance(record, Event) and record.kind == "disconnect":
                break
    msgs = [r for r in records if isinstance(r, Message)]
    request = next(m for m in msgs if m.name == "GET_FEATURES" and not m.reply)
    reply = next(m for m in msgs if m.name == "GET_FEATURES" and m.reply)
    assert request.sender == "frontend" and reply.sender == "backend", msgs
    assert reply.field("features") == features, (reply, err)


def test_oversized_body_is_recorded_and_copied_through(
    tmp_path: Path, tmp_sock_dir: Path
) -> None:
    """A size over the core's bound (4096) is recorded as malformed and the bytes still
    reach the back-end, which refuses them itself (serve blk names the size)."""
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    back, front = tmp_sock_dir / "blk.sock", tmp_sock_dir / "trace.sock"
    size = _core.MAX_BODY_SIZE + 904
    header = b"".join(v.to_bytes(4, sys.byteorder) for v in (1, 1, size))
    with (
        serve(["blk", "--image", str(image), "--verbose"], back) as served,
        Tracer(front, back) as tracer,
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(front))
            s.sendall(header)
            # serve blk refuses the header and closes: the proxy forwarded it.
            records = []
            for record in tracer.records(timeout=15):
                records.append(record)
                if isinstance(record, Event) and record.kind == "disconnect":
                    break
        err = stderr_until(served, str(size))
    end = records[-1]
    assert isinstance(end, Event) and end.side == "backend", records
    bad = next(r for r in records if isinstance(r, Message))
    assert isinstance(bad, Message) and bad.size == size, records
    assert bad.malformed is not None and str(_core.MAX_BODY_SIZE) in bad.malformed, bad
    assert bad.hex == header.hex(), bad
    assert str(size) in err, err


def _negotiated_through(
    tmp_path: Path, tmp_sock_dir: Path, *args: str
) -> tuple[list[str], list[dict[str, Any]]]:
    """Runs serve blk, ``trace --json ARGS`` in front of it and a Frontend's negotiation;
    returns the text lines and the JSON records (two proxies: text, then JSON)."""
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    back, front = tmp_sock_dir / "blk.sock", tmp_sock_dir / "trace.sock"
    outputs: list[list[str]] = []
    with serve(["blk", "--image", str(image)], back):
        for extra in ((), ("--json",)):
            run_dir = tmp_path / f"run{len(outputs)}"
            run_dir.mkdir()
            with trace_proxy(front, back, run_dir, *args, *extra) as proxy:
                with Frontend.connect(front, timeout=10) as fe:
                    fe.negotiate()
                    fe.get_config(0, 8)
                assert wait_for(lambda: any("disconnect" in x for x in proxy.lines()), 10)
                outputs.append(proxy.lines())
    return outputs[0], [json.loads(line) for line in outputs[1]]


def test_device_names_its_feature_bits_and_header_flags_are_named(
    tmp_path: Path, tmp_sock_dir: Path
) -> None:
    """``--device blk`` names serve blk's own feature bits (FLUSH is bit 9, which is
    GUEST_ECN for net); without it they stay ``bit N``. The header's flags are named
    either way: version, REPLY, NEED_REPLY."""
    text, records = _negotiated_through(tmp_path, tmp_sock_dir, "--device", "blk")
    offered = next(
        r for r in messages(records) if r["name"] == "GET_FEATURES" and r["reply"]
    )
    value, names = offered["fields"]["features"]["value"], offered["fields"]["features"]["names"]
    assert value & BlkFeature.FLUSH and "FLUSH" in names, offered
    assert "VERSION_1" in names and not any(n.startswith("bit ") for n in names), offered
    assert offered["flag_names"] == ["v1", "REPLY"], offered
    line = next(x for x in text if "GET_FEATURES reply" in x)
    assert "flags=0x5[v1,REPLY]" in line and "FLUSH" in line and "bit 9" not in line, line
    acked = [r for r in messages(records) if r["need_reply"]]
    assert acked and all("NEED_REPLY" in r["flag_names"] for r in acked), records
    assert any("[v1,NEED_REPLY]" in x for x in text), text
    # Without --device the same bits are numbers: the names came from the option.
    (tmp_path / "plain").mkdir()
    plain, _ = _negotiated_through(tmp_path / "plain", tmp_sock_dir)
    line = next(x for x in plain if "GET_FEATURES reply" in x)
    assert "bit 9" in line and "FLUSH" not in line, line


def test_device_names_on_the_python_api_and_unknown_devices_refused(
    tmp_sock_dir: Path,
) -> None:
    mask = int(BlkFeature.FLUSH | NetFeature.MQ | VirtioFeature.VERSION_1) | 1 << 23
    # Bit 9 is blk's FLUSH and net's GUEST_ECN; bits 22-23 are net's only.
    assert feature_names("virtio_features", mask, "blk") == [
        "FLUSH", "bit 22", "bit 23", "VERSION_1"
    ]
    assert feature_names("virtio_features", mask, "net") == [
        "GUEST_ECN", "MQ", "CTRL_MAC_ADDR", "VERSION_1"
    ]
    assert feature_names("virtio_features", mask) == ["bit 9", "bit 22", "bit 23", "VERSION_1"]
    assert flag_names(0x1 | MessageFlag.NEED_REPLY | 1 << 4) == ["v1", "NEED_REPLY", "bit 4"]
    with pytest.raises(ValueError, match=r"unknown device type 'gpu': one of blk, fs, net"):
        Tracer(tmp_sock_dir / "l.sock", tmp_sock_dir / "c.sock", device="gpu")
    run = subprocess.run(
        [sys.executable, "-m", "vhost", "trace", "--listen", str(tmp_sock_dir / "t.sock"),
         "--connect", str(tmp_sock_dir / "b.sock"), "--device", "gpu"],
        capture_output=True, text=True, timeout=30, cwd=CHECKOUT, check=False,
    )
    assert run.returncode == 1 and "invalid choice: 'gpu'" in run.stderr, run
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
