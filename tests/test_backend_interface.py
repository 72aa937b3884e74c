"""One ``VhostBackend`` interface across the three families (issue 11, items 1 and 4).

- The native classes (``_core.Frontend``, ``KernelDevice``, ``VdpaDevice``) expose the
  shared methods with one signature each, generated once in the glue.
- The facade's common optional methods have the same names, parameter names and return
  types in ``vhost.user``, ``vhost.kern`` and ``vhost.vdpa``.
- ``BackendHandler``'s required requests are abstract, as in the core's handler trait.
- A vhost-user front-end driven through ``VhostBackend`` against our own back-end session,
  and its arguments checked as the kernel family's are (``InvalidParamError``, not the
  glue's ``OverflowError``), before anything is sent.

The kernel and vDPA devices do not exist on a build host: ``test_kern_host.py`` and the
core's ``backend::tests`` cover them there, ``test_kern_guest.py`` and
``test_vdpa_guest.py`` in a guest.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhost import EventFd, GuestMemory, VhostBackend, _core
from vhost.errors import InvalidParamError
from vhost.kern import KernelBackend
from vhost.types import DirtyLogRegion, MemoryRegion, VringAddrs, VringConfig
from vhost.user import BackendHandler, BackendListener, Frontend, regions_of, serve_in_thread
from vhost.vdpa import VhostVdpa
from vhost.virtio import DeviceStatus

TIMEOUT = 5.0
VERSION_1 = 1 << 32

SHARED = sorted(
    name for name, f in vars(VhostBackend).items() if getattr(f, "__isabstractmethod__", False)
)
NATIVE = [_core.Frontend, _core.KernelDevice, _core.VdpaDevice]


def test_the_shared_set_is_the_fourteen_requests() -> None:
    assert (
        sorted(
            [
                "get_features",
                "set_features",
                "set_owner",
                "reset_owner",
                "set_mem_table",
                "set_log_base",
                "set_log_fd",
                "set_vring_num",
                "set_vring_addr",
                "set_vring_base",
                "get_vring_base",
                "set_vring_kick",
                "set_vring_call",
                "set_vring_err",
            ]
        )
        == SHARED
    )


@pytest.mark.parametrize("name", SHARED)
def test_native_classes_share_one_signature(name: str) -> None:
    signatures = {cls.__name__: getattr(cls, name).__text_signature__ for cls in NATIVE}
    assert len(set(signatures.values())) == 1, signatures


@pytest.mark.parametrize("name", SHARED)
def test_facades_keep_the_abc_signature(name: str) -> None:
    expected = list(inspect.signature(getattr(VhostBackend, name)).parameters)
    for cls in (Frontend, KernelBackend, VhostVdpa):
        assert list(inspect.signature(getattr(cls, name)).parameters) == expected, cls


def _params(cls: type, name: str) -> list[str]:
    return list(inspect.signature(getattr(cls, name)).parameters)


def test_common_optional_methods_have_one_name_and_shape() -> None:
    # The config space: (offset, size) on both; vhost-user adds its flags at the end.
    assert _params(Frontend, "get_config")[:3] == _params(VhostVdpa, "get_config")
    assert _params(VhostVdpa, "get_config") == ["self", "offset", "size"]
    assert _params(Frontend, "set_config")[:3] == _params(VhostVdpa, "set_config")
    # IOTLB messages: the kernel's name and argument.
    assert _params(Frontend, "send_iotlb_msg") == _params(KernelBackend, "send_iotlb_msg")
    assert not hasattr(Frontend, "iotlb_msg")
    # The status is the same IntFlag wherever it is read.
    for cls in (Frontend, VhostVdpa):
        assert typing.get_type_hints(cls.get_status)["return"] is DeviceStatus, cls
        assert _params(cls, "set_status") == ["self", "status"]
    for cls in (Frontend, VhostVdpa):
        assert _params(cls, "set_vring_enable") == ["self", "index", "enable"]
        assert _params(cls, "reset_device") == ["self"]
    for kind in (Frontend, KernelBackend):
        assert _params(kind, "set_vring_endian") == ["self", "index", "big_endian"]


def _native_params(method: object) -> list[str]:
    return list(inspect.signature(method).parameters)  # type: ignore[arg-type]


def test_the_link_and_the_channel_take_one_shape() -> None:
    """A daemon's device (``FrontendLink``) and a Python back-end (``BackendChannel``)
    send the same back-end requests: one name and one argument order for each."""
    link, channel = _core.FrontendLink, _core.BackendChannel
    for name in ("shmem_map", "shmem_unmap", "shared_object_add", "shared_object_remove"):
        assert _native_params(getattr(link, name)) == _native_params(getattr(channel, name)), name
    assert _native_params(channel.shmem_map) == [
        "self",
        "shmid",
        "fd_offset",
        "shm_offset",
        "length",
        "fd",
        "writable",
    ]
    writable = inspect.signature(channel.shmem_map).parameters["writable"]
    assert writable.kind is inspect.Parameter.KEYWORD_ONLY
    assert writable.default is False
    # CONFIG_CHANGE_MSG has one name on both sides of the back-end channel
    assert hasattr(link, "config_change")
    assert hasattr(channel, "config_change")
    assert not hasattr(link, "config_changed")
    # IOTLB messages: the name and argument of the front-end's and the kernel's
    assert _native_params(channel.send_iotlb_msg) == ["self", "msg"]
    assert not hasattr(channel, "iotlb_msg")


def test_handler_callbacks_take_named_types() -> None:
    """The requests that carry a structure hand the handler the type the rest of the
    API uses, not a tuple or a run of positional integers."""
    from vhost.types import IotlbMessage  # noqa: PLC0415
    from vhost.user import (  # noqa: PLC0415
        FrontendRequestHandler,
        InflightArea,
        InflightInfo,
        SharedObject,
    )

    hints = typing.get_type_hints
    assert hints(BackendHandler.add_mem_region)["region"] is MemoryRegion
    assert hints(BackendHandler.remove_mem_region)["region"] is MemoryRegion
    assert _params(BackendHandler, "set_vring_addr") == ["self", "index", "addrs"]
    assert hints(BackendHandler.set_vring_addr)["addrs"] is VringAddrs
    assert hints(BackendHandler.get_inflight_fd)["return"] is InflightArea
    assert hints(BackendHandler.set_inflight_fd)["info"] is InflightInfo
    assert hints(BackendHandler.iotlb_msg)["message"] is IotlbMessage
    assert hints(FrontendRequestHandler.iotlb_msg)["message"] is IotlbMessage
    lookup = hints(FrontendRequestHandler.shared_object_lookup)["return"]
    assert SharedObject in typing.get_args(lookup)
    assert not any(typing.get_origin(t) is tuple for t in typing.get_args(lookup))


def test_backend_handler_requires_features_and_vring_base() -> None:
    assert BackendHandler.__abstractmethods__ == {"get_features", "get_vring_base"}

    class NoBase(BackendHandler):
        def get_features(self) -> int:
            return VERSION_1

    with pytest.raises(TypeError, match="get_vring_base"):
        NoBase()  # type: ignore[abstract]


def test_serve_forever_needs_a_handler(tmp_sock_dir: Path) -> None:
    with (
        BackendListener(tmp_sock_dir / "b.sock") as listener,
        pytest.raises(InvalidParamError, match="handler"),
    ):
        listener.serve_forever()


class Device(BackendHandler):
    """Records the shared requests it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []
        self.memory: GuestMemory | None = None

    def get_features(self) -> int:
        return VERSION_1

    def set_features(self, features: int) -> None:
        self.seen.append(("features", features))

    def set_owner(self) -> None:
        self.seen.append(("owner",))

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.seen.append(("memory", len(memory.regions())))

    def set_vring_num(self, index: int, num: int) -> None:
        self.seen.append(("num", index, num))

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self.seen.append(("addr", index))

    def set_vring_base(self, index: int, base: int) -> None:
        self.seen.append(("base", index, base))

    def get_vring_base(self, index: int) -> int:
        return 5

    def set_vring_call(self, index: int, fd: EventFd | None) -> None:
        self.seen.append(("call", index, fd is not None))

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        self.seen.append(("kick", index, fd is not None))

    def set_vring_err(self, index: int, fd: EventFd | None) -> None:
        self.seen.append(("err", index, fd is not None))


@pytest.fixture
def linked(tmp_sock_dir: Path) -> Iterator[tuple[Frontend, Device]]:
    device = Device()
    with BackendListener(tmp_sock_dir / "be.sock") as listener:
        fe = Frontend.connect(listener.path, timeout=TIMEOUT)
        session = listener.accept(timeout=TIMEOUT)
    with fe, serve_in_thread(session, device):
        yield fe, device


def bring_up(backend: VhostBackend, memory: GuestMemory, ring: int, ev: EventFd) -> int:
    """What a VMM does with any family, through the ABC only."""
    backend.set_features(backend.get_features() & VERSION_1)
    backend.set_owner()
    backend.set_mem_table(regions_of(memory))
    backend.set_vring_num(0, 64)
    backend.set_vring_addr(
        0,
        VringConfig(
            queue_max_size=64,
            queue_size=64,
            flags=0,
            desc_table_addr=ring,
            avail_ring_addr=ring + 0x400,
            used_ring_addr=ring + 0x800,
        ),
    )
    backend.set_vring_base(0, 2)
    backend.set_vring_call(0, ev)
    backend.set_vring_kick(0, ev)
    backend.set_vring_err(0, None)
    return backend.get_vring_base(0)


def test_vhost_user_through_the_abc(linked: tuple[Frontend, Device]) -> None:
    fe, device = linked
    memory = GuestMemory.allocate([(0, 1 << 20)])
    ring = regions_of(memory)[0].userspace_addr + 0x1000
    with EventFd() as ev:
        assert bring_up(fe, memory, ring, ev) == 5
    assert device.seen == [
        ("features", VERSION_1),
        ("owner",),
        ("memory", 1),
        ("num", 0, 64),
        ("addr", 0),
        ("base", 0, 2),
        ("call", 0, True),
        ("kick", 0, True),
        ("err", 0, False),
    ]


def test_vhost_user_refuses_what_it_cannot_carry_before_sending(
    linked: tuple[Frontend, Device],
) -> None:
    fe, device = linked
    region = MemoryRegion(guest_phys_addr=0, memory_size=4096, userspace_addr=0x10000)
    with EventFd() as ev:
        calls: list[Callable[[], None]] = [
            lambda: fe.set_vring_num(-1, 8),  # the glue's OverflowError before
            lambda: fe.set_vring_base(0, 1 << 32),
            lambda: fe.set_vring_call(1 << 32, ev),
            lambda: fe.set_features(-1),
            lambda: fe.set_mem_table([region]),  # no fd
            lambda: fe.set_log_base(0),  # vhost-user needs a region
            lambda: fe.set_log_base(
                8, DirtyLogRegion(mmap_size=4096, mmap_offset=0, fd=ev.fileno())
            ),
            lambda: fe.set_log_fd(None),  # SET_LOG_FD always carries an fd
        ]
        for call in calls:
            with pytest.raises(InvalidParamError):
                call()
    # Nothing was sent: the connection answers the next request.
    assert fe.get_features() == VERSION_1
    assert device.seen == []
