"""Kernel vhost against a real Linux kernel: the test guest (tests/guest.py) runs
``tests/guest_kern`` with this checkout's package, on the guest's ``/dev/vhost-net``,
``/dev/vhost-vsock`` and tap devices; these tests assert on what it found."""

from __future__ import annotations

import re

from guest_kern.boot import kern_guest


def test_vhost_net_tx_frames_from_our_ring_come_out_of_the_tap() -> None:
    info = kern_guest().check("net_tx")
    # Eight frames of different sizes, byte-exact at the tap, and all TX buffers used.
    assert info["frames"] == 8
    assert info["tx_used"] == 8


def test_vhost_net_frames_sent_out_of_the_tap_arrive_in_our_rx_ring() -> None:
    info = kern_guest().check("net_rx")
    assert info["frames"] == 5


def test_not_a_vhost_node_and_closed_device_give_typed_errors() -> None:
    run = kern_guest()
    info = run.check("adv_not_vhost")
    assert info["/dev/null"] == "ENOTTY"
    closed = run.check("adv_closed")
    assert closed["closed"] == "ClosedError"  # I1: even with its fd number reused
    assert closed["number_reused"] is True
    assert int(closed["from_fd_features"], 16) & (1 << 32)


def test_kernel_errors_carry_the_kernel_errno() -> None:
    info = kern_guest().check("adv_errno")
    assert info["set_owner_twice"] == "EBUSY"  # I2
    assert info["vring_num_index_2"] == info["vring_base_index_9"] == "ENOBUFS"  # I4
    assert info["vring_num_0"] == info["vring_num_3"] == "EINVAL"  # I5
    assert info["ring_change_running"] == "EBUSY"  # I6
    assert info["backend_pipe"] == "ENOTSOCK"  # I9
    assert info["backend_index_2"] == "ENOBUFS"  # I10
    assert info["not_owner"] == "EPERM"


def test_bad_integers_are_invalid_params_naming_method_and_argument() -> None:
    """-1 and 2**bits on every integer argument of vhost-net (vhost-vsock's cid: below) raise
    InvalidParamError("method: argument: value is out of range ...") from the native
    call (the facade's own checks are gone; the kernel is never asked)."""
    info = kern_guest().check("adv_int_args")
    refusals = {k: v for k, v in info.items() if ":" in k}
    assert len(refusals) == 11
    assert set(refusals.values()) == {"ok"}, refusals
    assert int(info["features_after"], 16)


def test_no_fd_leaks_in_the_guest() -> None:
    info = kern_guest().check("adv_no_fd_leak")
    assert info["before"] == info["after"]
    assert info["maps_before"] == info["maps_after"]


def test_vhost_vsock_kernel_socket_connects_to_our_driver_and_data_flows_both_ways() -> None:
    info = kern_guest().check("vsock_stream")
    assert re.fullmatch(r"2:\d+", info["peer"])
    assert info["to_us"] == 3072
    assert info["to_kernel"] == 5120


def test_vhost_vsock_reserved_and_duplicate_cids_are_refused() -> None:
    info = kern_guest().check("vsock_cid_errors")
    for cid in ("0x0", "0x1", "0x2", "0x100000000", "0xffffffffffffffff"):
        assert info[f"cid_{cid}"] == "EINVAL"  # I7
    assert info["duplicate"] == "EADDRINUSE"  # I8
    assert info["int_args"] == {"vsock_set_guest_cid:cid": "ok"}


def test_every_guest_check_passed() -> None:
    run = kern_guest()
    assert run.result.status == 0, run.result.tail(80)
    failed = [name for name, c in run.checks.items() if not c["ok"]]
    assert not failed, failed
    assert len(run.checks) >= 16, sorted(run.checks)


def test_iotlb_misses_are_read_from_the_device_and_answered_with_updates() -> None:
    info = kern_guest().check("net_iotlb")
    # The frame's buffer missed (read access: TX reads it); after our update it went
    # out; a second frame used the cached translation; an invalidate made it miss again.
    assert info["misses_first"] >= 1
    assert info["first_miss"] == "iova=0x200000 perm=RO"
    assert info["misses_cached"] == 0
    assert info["misses_after_invalidate"] >= 1


def test_reset_owner_busyloop_endian_and_memory_table_limits() -> None:
    info = kern_guest().check("net_control")
    assert info["owner_after_reset"] == "ok"
    assert info["busyloop"] == 50
    assert info["endian"] in (0, "ENOTTY")
    assert info["mem_table_empty"] == "InvalidParamError"  # I3, refused before the kernel
    assert info["mem_table_over_limit"] == "E2BIG"  # I3, the kernel's limit


def test_dirty_log_marks_pages_the_kernel_wrote_and_signals_the_log_fd() -> None:
    info = kern_guest().check("net_dirty_log")
    assert info["dirty_pages"] >= 1
    assert info["log_signalled"] is True
