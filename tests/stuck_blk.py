"""A blk daemon whose device hangs on requests for one sector, so that a test can kill it
with requests popped and not completed (inflight tracking).

    python tests/stuck_blk.py SOCKET IMAGE
"""

from __future__ import annotations

import struct
import sys
import time

from vhost import _core
from vhost.daemon import Daemon
from vhost.devices.blkdev import PythonBlkDevice

STUCK_SECTOR = 4096


class StuckBlk(PythonBlkDevice):
    def process(self, queue: int, batch: _core.Batch) -> None:
        for chain in batch:
            _, _, sector = struct.unpack("<IIQ", batch.read(chain, 0, 16))
            if sector == STUCK_SECTOR:
                print("STUCK", flush=True)
                time.sleep(3600)
        super().process(queue, batch)


def main() -> None:
    sock, image = sys.argv[1], sys.argv[2]
    daemon = Daemon(StuckBlk(image, queue_size=64), sock).start()
    print("serving", flush=True)
    daemon.serve_forever()


if __name__ == "__main__":
    main()
