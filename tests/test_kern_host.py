"""Kernel vhost and vDPA on the host, where no /dev/vhost-* exists: opening anything else
fails with the kernel's errno as a typed error and leaves no fd; the facade's constants
match linux/vhost_types.h. (The real devices are exercised in the guest:
test_kern_guest.py, test_vdpa_guest.py.)"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vhost import InvalidParamError, KernelError, VhostBackend, VhostError
from vhost.kern import (
    VHOST_NET_F_VIRTIO_NET_HDR,
    BackendFeature,
    IotlbBackend,
    KernelBackend,
    VhostNet,
    VhostVsock,
)
from vhost.vdpa import VhostVdpa


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("cls", [KernelBackend, VhostNet, VhostVsock, VhostVdpa])
def test_a_node_that_is_not_vhost_is_enotty(cls: type[KernelBackend]) -> None:
    with pytest.raises(KernelError) as info:
        cls("/dev/null")
    exc = info.value
    assert isinstance(exc, OSError) and isinstance(exc, VhostError)
    assert exc.errno == errno.ENOTTY
    assert exc.strerror == "VHOST_GET_FEATURES: Inappropriate ioctl for device"


def test_a_missing_node_is_enoent(tmp_path: Path) -> None:
    for cls in (KernelBackend, VhostVdpa):
        with pytest.raises(KernelError) as info:
            cls(tmp_path / "vhost-vdpa-7")
        assert info.value.errno == errno.ENOENT


def test_a_pipe_and_a_directory_are_refused(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(KernelError) as info:
            KernelBackend.from_fd(r)
        assert info.value.errno == errno.ENOTTY
        os.fstat(r)  # the caller's fd is untouched
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(KernelError) as info:
        KernelBackend(tmp_path)
    assert info.value.errno == errno.EISDIR


def test_failed_opens_leak_no_fd() -> None:
    before = _fds()
    for _ in range(300):
        with pytest.raises(KernelError):
            VhostNet("/dev/null")
        with pytest.raises(KernelError):
            VhostVdpa("/dev/zero")
    assert _fds() == before


def test_a_generic_backend_needs_a_path_and_fds_must_be_valid() -> None:
    with pytest.raises(InvalidParamError):
        KernelBackend()
    with pytest.raises(InvalidParamError):
        KernelBackend.from_fd(-1)
    with pytest.raises(InvalidParamError):
        VhostVdpa.from_fd(0)


def test_the_classes_implement_the_shared_interfaces() -> None:
    for cls in (VhostNet, VhostVsock, VhostVdpa):
        assert issubclass(cls, VhostBackend)
        assert issubclass(cls, IotlbBackend)
        assert not getattr(cls, "__abstractmethods__", None)
    assert VhostNet.DEFAULT_PATH == "/dev/vhost-net"
    assert VhostVsock.DEFAULT_PATH == "/dev/vhost-vsock"
    assert (VhostNet.RX, VhostNet.TX) == (0, 1)


def test_constants_match_linux_vhost_types_h() -> None:
    assert VHOST_NET_F_VIRTIO_NET_HDR == 1 << 27
    assert [f.value.bit_length() - 1 for f in BackendFeature] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert int(BackendFeature.IOTLB_MSG_V2) == 0x2
    assert int(BackendFeature.IOTLB_PERSIST) == 0x100
