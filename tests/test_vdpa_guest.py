"""vDPA against a real kernel: in the test guest, qemu-storage-daemon exports an image as
a VDUSE virtio-blk device, ``vdpa dev add`` binds it to vhost-vdpa, and
``vhost.vdpa.VhostVdpa`` with our split-ring driver reads and writes it
(tests/guest_kern/checks_vdpa.py)."""

from __future__ import annotations

from guest_kern.boot import kern_guest


def test_vdpa_identity_capacity_and_status_handshake() -> None:
    run = kern_guest()
    assert run.check("vdpa_setup")["node"].startswith("/dev/vhost-vdpa-")
    info = run.check("vdpa_identity")
    assert info["device_id"] == 2
    assert info["capacity"] == (4 << 20) // 512
    assert info["vqs"] == 1
    assert info["status"] == "0xf"  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert int(info["features"], 16) & (1 << 32)  # VERSION_1 negotiated
    assert info["mappings"] == 1  # our guest memory, mapped with dma_map
    assert info["batched_map"] is True  # inside IOTLB BATCH_BEGIN/END (VDUSE offers it)


def test_vdpa_blocks_written_and_read_through_our_rings_match_the_image() -> None:
    info = kern_guest().check("vdpa_blk_io")
    assert info["writes"] == 4
    assert info["qd32_reads"] == 32
    # VDUSE offers no suspend: the kernel's answer surfaces as an errno.
    assert info["suspend"] in ("ENOTSUP", "no error")


def test_vdpa_config_errors() -> None:
    info = kern_guest().check("vdpa_config")
    assert info["config_call"] == "set+cleared"
    assert info["config_len"] == 96  # virtio_blk_config as the 6.12 kernel reports it
    assert info["get_config_past_end"] == "EINVAL"
    assert info["set_config"] == "ok"
    assert info["set_config_past_end"] == "EINVAL"
    assert info["offset_overflow"] == "InvalidParamError"  # I11


def test_vdpa_unmap_and_reset() -> None:
    info = kern_guest().check("vdpa_teardown")
    assert info["mappings_after_unmap"] == 0
    assert info["status_after_reset"] == 0


def test_vdpa_bad_input_gives_typed_errors_without_leaks() -> None:
    info = kern_guest().check("vdpa_adversarial")
    assert info["second_open"] == "EBUSY"
    assert info["group_asid_bad_group"] == "ENOBUFS"
    assert info["group_asid_bad_asid"] == "EINVAL"
    assert info["vring_num_beyond_count"] == "ENOBUFS"
    # -1 and 2**bits: InvalidParamError naming method, argument and value (issue 11).
    assert len(info["int_args"]) == 11
    assert set(info["int_args"].values()) == {"ok"}, info["int_args"]
    assert info["vring_enable_beyond_count"] == "ENOBUFS"
    assert info["unmap_unmapped"] == "InvalidMemoryError@0x40000000"
    assert info["map_outside_range"] == "EFAULT"
    assert info["map_size_0"] == "EINVAL"  # I11
    assert info["map_overlap"] == "EFAULT"
    assert info["mem_table_mappings"] == "[(0, 3145728, 32768)]"
    assert info["after_close"] == "ClosedError"
    assert info["missing_node"] == "ENOENT"  # I11
    assert info["fds_before"] == info["fds_after"]


def test_vdpa_driver_lifetimes_leak_no_fd_or_mapping() -> None:
    info = kern_guest().check("vdpa_lifecycle")
    before, after = info["fds"].split("->")
    assert before == after
    before, after = info["maps"].split("->")
    assert before == after
