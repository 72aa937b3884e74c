"""Host side of the VDUSE checks: the test guest's initramfs leaves ``virtio_vdpa`` out (a
vDPA device must bind to ``vhost_vdpa`` for the vDPA checks), so the module is taken from
the cached kernel package here, once, into a folder of the checkout the guest reads
(``/tmp`` is the guest's own). The guest loads it with ``insmod`` when its VDUSE checks
need a ``/dev/vdX``."""

from __future__ import annotations

import glob
import lzma
import os
import subprocess
from pathlib import Path

from guest import RUNS_DIR


def module_path(kver: str) -> Path:
    """Where the decompressed ``virtio_vdpa.ko`` of kernel ``kver`` is kept."""
    return RUNS_DIR / f"virtio_vdpa-{kver}.ko"


def extract_virtio_vdpa() -> Path | None:
    """Extracts ``virtio_vdpa.ko`` from the guest kernel's cached ``.deb`` (a few seconds,
    once); None when no package is cached (the guest check then fails, saying so)."""
    cache = Path(os.environ.get("PYVHOST_GUEST_DIR", Path.home() / ".cache/pyvhost/guest"))
    debs = sorted(glob.glob(str(cache / "deb" / "linux-image-*.deb")))
    kver_file = cache / "KVER"
    if not debs or not kver_file.exists():
        return None
    kver = kver_file.read_text().strip()
    out = module_path(kver)
    if out.exists():
        return out
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    member = f"./lib/modules/{kver}/kernel/drivers/virtio/virtio_vdpa.ko.xz"
    tar = subprocess.run(
        f"dpkg-deb --fsys-tarfile {debs[-1]} | tar -xO {member}",
        shell=True,
        capture_output=True,
        timeout=120,
        check=True,
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(lzma.decompress(tar.stdout))
    tmp.replace(out)
    return out
