"""One timeout conversion for every native call (issue 11): ``None`` and ``math.inf`` wait
for ever, a number from 0 waits that long, and a negative number or NaN is the caller's
``InvalidParamError`` naming the argument (``Daemon.wait(math.inf)`` once panicked, and a
negative timeout meant "now" to some calls and an error to others)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

from vhost.daemon import BlkDevice, Daemon
from vhost.errors import InvalidParamError
from vhost.user import Frontend

pytestmark = pytest.mark.timeout(60)


def test_daemon_wait_for_ever_returns_when_stopped(tmp_sock_dir: Path) -> None:
    daemon = Daemon(BlkDevice.ram(1 << 20), tmp_sock_dir / "d.sock").start()
    threading.Timer(0.3, daemon.stop).start()
    start = time.monotonic()
    assert daemon.wait(math.inf) is True
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("bad", [-1.0, -0.001, math.nan, -math.inf])
def test_negative_and_nan_timeouts_are_refused_by_name(tmp_sock_dir: Path, bad: float) -> None:
    with Daemon(BlkDevice.ram(1 << 20), tmp_sock_dir / "d.sock") as daemon:
        with pytest.raises(InvalidParamError, match="timeout must be a number of seconds"):
            daemon.wait(bad)
        with pytest.raises(InvalidParamError, match="timeout must be a number of seconds"):
            daemon.next_events(bad)
        assert daemon.running
        with pytest.raises(InvalidParamError, match="timeout"):
            Frontend.connect(daemon.path, timeout=bad)


def test_zero_and_inf_event_waits(tmp_sock_dir: Path) -> None:
    with Daemon(BlkDevice.ram(1 << 20), tmp_sock_dir / "d.sock") as daemon:
        assert daemon.next_events(0) == []
        # A front-end connecting makes an event, which an unbounded wait returns.
        with Frontend.connect(daemon.path, timeout=math.inf) as fe:
            events = daemon.next_events(math.inf)
            fe.set_timeout(None)
            assert fe.get_features() != 0
        assert events and events[0].session == 1
