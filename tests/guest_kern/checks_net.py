"""The vhost-net checks (TX to the tap, RX from it) and rows I of ADVERSARIAL.md that a
vhost-net device reaches."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import socket

from vhost import ClosedError, KernelError
from vhost.kern import KernelBackend, VhostNet

from .net import ETH_TYPE, HDR_LEN, NetRig, frame
from .report import check, fd_count


def tx_frames_come_out_of_the_tap() -> None:
    with check("net_tx") as info:
        rig = NetRig.create()
        try:
            frames = [frame(i, 60 + 7 * i) for i in range(8)]
            rig.send(frames)
            seen: list[bytes] = []
            while len(seen) < len(frames):
                ready, _, _ = select.select([rig.sniff], [], [], 10)
                assert ready, f"only {len(seen)} of {len(frames)} frames reached the tap"
                seen.append(rig.sniff.recv(4096))
            assert seen == frames, "frames differ"
            used = rig.reap(rig.tx, rig.calls[VhostNet.TX], len(frames))
            info["frames"] = len(seen)
            info["tx_used"] = len(used)
        finally:
            rig.close()


def tap_frames_arrive_in_rx() -> None:
    with check("net_rx") as info:
        rig = NetRig.create()
        try:
            heads = rig.post_rx(16)
            frames = [frame(100 + i, 64 + 11 * i) for i in range(5)]
            for f in frames:
                rig.sniff.send(f)
            got = []
            for head, length in rig.reap(rig.rx, rig.calls[VhostNet.RX], len(frames)):
                data = rig.memory.read(heads[head], length)
                assert data[:HDR_LEN] == bytes(HDR_LEN) or len(data) > HDR_LEN
                got.append(data[HDR_LEN:])
            ours = [g for g in got if g[12:14] == ETH_TYPE.to_bytes(2, "big")]
            assert ours == frames, f"RX got {len(ours)} of our frames: {ours!r}"
            info["frames"] = len(ours)
        finally:
            rig.close()


def errors_are_typed_with_the_kernel_errno() -> None:
    """ADVERSARIAL I1, I2, I4, I5, I9, I10 on a real /dev/vhost-net."""
    with check("adv_not_vhost") as info:
        for path in ("/dev/null", "/dev/net/tun"):
            try:
                KernelBackend(path)
            except KernelError as e:
                assert e.errno == errno.ENOTTY or (
                    path == "/dev/net/tun" and e.errno == errno.EBADFD
                ), e
                info[path] = errno.errorcode[e.errno]
            else:
                raise AssertionError(f"{path} accepted as a vhost device")
    with check("adv_closed") as info:
        net = VhostNet()
        net.close()
        try:
            net.get_features()
        except ClosedError:
            info["closed"] = "ClosedError"
        else:
            raise AssertionError("a closed device answered")
    with check("adv_errno") as info:
        with VhostNet() as net:
            net.set_owner()
            info["set_owner_twice"] = _errno(net.set_owner)
            assert info["set_owner_twice"] == "EBUSY"
            info["vring_num_index_2"] = _errno(lambda: net.set_vring_num(2, 256))
            assert info["vring_num_index_2"] == "ENOBUFS"
            info["vring_base_index_9"] = _errno(lambda: net.get_vring_base(9))
            assert info["vring_base_index_9"] == "ENOBUFS"
            info["vring_num_0"] = _errno(lambda: net.set_vring_num(0, 0))
            info["vring_num_3"] = _errno(lambda: net.set_vring_num(0, 3))
            assert info["vring_num_0"] == info["vring_num_3"] == "EINVAL", info
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                info["backend_index_2"] = _errno(lambda: net.set_backend(2, s))
            assert info["backend_index_2"] == "ENOBUFS"
            # Before its rings are set up a queue refuses any backend.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                info["backend_no_rings"] = _errno(lambda: net.set_backend(0, s))
            assert info["backend_no_rings"] == "EFAULT"
        rig = NetRig.create("pvtap1")
        r, w = os.pipe()
        try:
            info["backend_pipe"] = _errno(lambda: rig.net.set_backend(0, r))
            assert info["backend_pipe"] == "ENOTSOCK", info
            info["ring_change_running"] = _errno(lambda: rig.net.set_vring_num(0, 128))
            assert info["ring_change_running"] == "EBUSY", info
        finally:
            os.close(r)
            os.close(w)
            rig.close()
        with VhostNet() as other:
            info["not_owner"] = _errno(lambda: other.set_vring_num(0, 256))
            assert info["not_owner"] == "EPERM"


def no_fd_leak() -> None:
    """Failed opens, refused ioctls and whole device lifetimes leave no fd behind."""
    with check("adv_no_fd_leak") as info:
        gc.collect()
        before = fd_count()
        for i in range(10):
            with contextlib.suppress(KernelError):
                KernelBackend("/dev/null")
            with VhostNet() as net:
                net.set_owner()
                _errno(lambda: net.set_vring_num(5, 256))
            rig = NetRig.create(f"pvleak{i}")
            rig.send([frame(i)])
            rig.close()
            del rig
        gc.collect()
        info["before"], info["after"] = before, fd_count()
        assert info["after"] == before, f"fds {before} -> {info['after']}"


def _errno(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except KernelError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "no error"
