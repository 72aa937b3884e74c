"""Every integer argument of the native classes goes through one conversion: a negative
or too large value is the caller's ``InvalidParamError`` naming the value and the range it
must be in (PyO3 raised ``OverflowError`` before, issue 11), and nothing reaches the peer.
Peer: our own native virtio-blk daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhost import EventFd, GuestMemory, _core
from vhost.daemon import BlkDevice, Daemon, Device
from vhost.errors import InvalidParamError
from vhost.types import VringConfig
from vhost.user import Frontend

BAD = [-1, 1 << 32, 1 << 64]


@pytest.fixture
def fe(tmp_sock_dir: Path) -> Iterator[Frontend]:
    sock = tmp_sock_dir / "blk.sock"
    with Daemon(BlkDevice.ram(1 << 20), sock), Frontend.connect(sock, timeout=5.0) as fe:
        fe.negotiate()
        yield fe


def _refused(call: Callable[[int], object], value: int, bits: int) -> None:
    with pytest.raises(InvalidParamError) as info:
        call(value)
    message = str(info.value)
    assert str(value) in message
    assert f"0..={(1 << bits) - 1}" in message


@pytest.mark.parametrize("value", BAD)
def test_frontend_index_offset_and_size_arguments(fe: Frontend, value: int) -> None:
    calls: list[tuple[Callable[[int], object], int]] = [
        (lambda v: fe.set_vring_enable(v, True), 32),
        (lambda v: fe.get_config(v, 4), 32),
        (lambda v: fe.get_config(0, v), 32),
        (fe.vring_kick, 32),
        (fe.net_set_mtu, 64),
    ]
    for call, bits in calls:
        if not 0 <= value < 1 << bits:
            _refused(call, value, bits)
    # Nothing was sent: the connection still answers.
    assert fe.get_features()


@pytest.mark.parametrize("value", BAD)
def test_shared_vhost_methods_through_the_glue(fe: Frontend, value: int) -> None:
    native = fe._native  # the glue itself, below the facade's own checks
    _refused(lambda v: native.set_vring_num(v, 8), value, 32)
    _refused(native.get_vring_base, value, 32)
    if value < 0 or value >= 1 << 64:
        _refused(native.set_features, value, 64)
    assert fe.get_features()


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_guest_memory_and_eventfd(value: int) -> None:
    memory = GuestMemory.allocate([(0, 1 << 16)])
    _refused(lambda v: memory.read(v, 4), value, 64)
    _refused(lambda v: memory.write(v, b"x"), value, 64)
    _refused(lambda v: memory.contains(0, v), value, 64)
    with EventFd() as ev:
        _refused(ev.write, value, 64)
        with pytest.raises(TypeError):
            ev.write(True)  # a bool is not a count


@pytest.mark.parametrize("value", BAD)
def test_ring_constructors(value: int) -> None:
    memory = GuestMemory.allocate([(0, 1 << 16)])
    # The same arguments with a size that fits build a queue: only the bad value is refused.
    assert _core.DeviceQueue(memory, 8, 0, 0x1000, 0x2000).size == 8
    _refused(lambda v: _core.DeviceQueue(memory, v, 0, 0x1000, 0x2000), value, 32)
    _refused(lambda v: _core.Virtqueue(memory, v, 0, 0x1000, 0x2000), value, 32)
    if value < 0 or value >= 1 << 64:
        _refused(lambda v: _core.DeviceQueue(memory, 8, v, 0x1000, 0x2000), value, 64)
        _refused(lambda v: _core.Virtqueue(memory, 8, 0, v, 0x2000), value, 64)


@pytest.mark.parametrize("value", [-1, 1 << 16])
def test_daemon_devices(tmp_sock_dir: Path, value: int) -> None:
    _refused(lambda v: BlkDevice.ram(1 << 20, num_queues=v), value, 16)
    _refused(lambda v: BlkDevice.ram(1 << 20, queue_size=v), value, 16)

    class Odd(Device):
        """A Python device whose static description does not fit the protocol."""

        device_type = 4
        num_queues = value

        def process(self, queue: int, batch: _core.Batch) -> None:
            raise AssertionError("never started")

    with pytest.raises(InvalidParamError, match=rf"Odd\.num_queues: {value} is out of range"):
        Daemon(Odd(), tmp_sock_dir / "odd.sock")


@pytest.mark.parametrize("value", [-1, 1 << 32])
def test_the_facade_refusal_names_method_and_argument(fe: Frontend, value: int) -> None:
    """The facade checks no integer itself (issue 11): the native call's
    InvalidParamError names the method, the argument and the value."""
    config = VringConfig(
        queue_max_size=8,
        queue_size=8,
        flags=0,
        desc_table_addr=0,
        used_ring_addr=0x1000,
        avail_ring_addr=0x800,
    )
    calls: dict[str, Callable[[int], object]] = {
        "set_vring_num: index": lambda v: fe.set_vring_num(v, 8),
        "set_vring_num: num": lambda v: fe.set_vring_num(0, v),
        "set_vring_base: base": lambda v: fe.set_vring_base(0, v),
        "get_vring_base: index": fe.get_vring_base,
        "set_vring_addr: index": lambda v: fe.set_vring_addr(v, config),
        "set_vring_kick: index": lambda v: fe.set_vring_kick(v, None),
        "set_vring_call: index": lambda v: fe.set_vring_call(v, None),
        "set_vring_err: index": lambda v: fe.set_vring_err(v, None),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidParamError) as info:
            call(value)
        assert str(info.value).startswith(f"{what}: {value} is out of range 0..=4294967295")
    u64_calls: dict[str, Callable[[int], object]] = {
        "set_features: features": fe.set_features,
        "set_log_base: base": fe.set_log_base,
    }
    for what, u64_call in u64_calls.items():
        with pytest.raises(InvalidParamError, match=f"^{what}: -1 is out of range"):
            u64_call(-1)
    assert fe.get_features()  # nothing was sent


def test_device_queue_arguments_name_the_call() -> None:
    """The device queue's integers go through the same conversion (its own copy with other
    messages is gone), naming the call and the argument."""
    memory = GuestMemory.allocate([(0, 1 << 16)])
    dq = _core.DeviceQueue(memory, 8, 0, 0x1000, 0x2000)
    with pytest.raises(InvalidParamError, match=r"^add_used: head: 65536 is out of range"):
        dq.add_used(1 << 16, 0)
    with pytest.raises(InvalidParamError, match=r"^add_used_batch: length: -1 is out of range"):
        dq.add_used_batch([(0, 0), (1, -1)])
    with pytest.raises(InvalidParamError, match=r"^DeviceQueue.base: -1 is out of range"):
        dq.base = -1
    assert dq.base == 0  # nothing was changed
