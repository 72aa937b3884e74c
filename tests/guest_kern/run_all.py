"""Entry point in the guest: ``python -m tests.guest_kern.run_all [AREA...] --out FILE``
runs the checks of each area (net, vsock, vdpa, vduse) and writes their results."""

from __future__ import annotations

import argparse
import sys

from . import checks_net, checks_vdpa, checks_vduse, checks_vsock
from .report import run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("areas", nargs="*", default=["net"])
    parser.add_argument("--out", default="kern-results.json")
    args = parser.parse_args()
    checks = []
    if "net" in args.areas:
        checks += [
            checks_net.tx_frames_come_out_of_the_tap,
            checks_net.tap_frames_arrive_in_rx,
            checks_net.errors_are_typed_with_the_kernel_errno,
            checks_net.iotlb_miss_update_invalidate,
            checks_net.control_plane_extras,
            checks_net.dirty_log,
            checks_net.no_fd_leak,
        ]
    if "vsock" in args.areas:
        checks += [checks_vsock.connect_and_exchange, checks_vsock.cid_errors]
    if "vdpa" in args.areas:
        checks.append(checks_vdpa.blk_through_vdpa)
    if "vduse" in args.areas:
        checks.append(checks_vduse.all_checks)
    return run(checks, args.out)


if __name__ == "__main__":
    sys.exit(main())
