"""The guest's kernel and initramfs: found in a cache, built on first use.

The image is Debian's bookworm-backports 6.12 kernel (``linux-image-amd64``, which has
the virtio, 9p, vhost, vsock and vDPA drivers as modules) and a busybox initramfs whose
``/init`` loads those modules and then runs the commands :class:`vhost.testing.Guest`
sends. ``build_image.sh`` (beside this file) builds it from the distribution's packages,
with no compiler and no network access beyond ``apt-get download`` of the kernel package;
:func:`ensure_image` runs it when the cache is missing or was built by another version of
the script, and raises :class:`GuestSetupError` saying what to install when it cannot.

The cache is ``$PYVHOST_GUEST_DIR``, by default ``~/.cache/pyvhost/guest``; each
version of the builder writes its image in its own ``image-HASH`` folder there (HASH
from the script's SHA-256), so installs of different versions do not rebuild over each
other, and the kernel package it downloads is kept in ``deb/`` for the next build.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestSetupError

__all__ = ["BUILD_SCRIPT", "GuestImage", "build_image", "ensure_image", "image_dir", "image_path"]

BUILD_SCRIPT = Path(__file__).resolve().parent / "build_image.sh"
"""The builder shipped in the package (``bash BUILD_SCRIPT [--force]``)."""

BUILD_TIMEOUT = 900.0
"""Seconds a build may take (downloading the kernel package is most of it)."""

_ERROR_LINES = 15


def image_dir() -> Path:
    """Where the image is cached: ``$PYVHOST_GUEST_DIR`` or ``~/.cache/pyvhost/guest``."""
    configured = os.environ.get("PYVHOST_GUEST_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "pyvhost" / "guest"


@dataclass(frozen=True)
class GuestImage:
    """A kernel and initramfs to boot, and the kernel's release (``uname -r``).

    Built by :func:`ensure_image`; construct one yourself only for an initramfs whose
    ``/init`` speaks the same protocol (see ``build_image.sh``).
    """

    vmlinuz: Path
    initrd: Path
    kver: str

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        """The image in ``directory``; :class:`GuestSetupError` naming what is missing."""
        vmlinuz, initrd, kver = directory / "vmlinuz", directory / "initrd.gz", directory / "KVER"
        missing = [str(p) for p in (vmlinuz, initrd, kver) if not p.is_file()]
        if missing:
            raise GuestSetupError(
                f"guest image incomplete in {directory}: missing {', '.join(missing)}; "
                f"build it with `python -m vhost.testing image` (or bash {BUILD_SCRIPT})"
            )
        return cls(vmlinuz, initrd, kver.read_text().strip())


def _script_hash() -> str:
    return hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()


def image_path(cache: Path | None = None) -> Path:
    """The folder of this version's image in ``cache`` (default :func:`image_dir`)."""
    return (cache or image_dir()) / f"image-{_script_hash()[:16]}"


def _up_to_date(directory: Path) -> bool:
    stamp = directory / "STAMP"
    try:
        first = stamp.read_text().splitlines()[0]
    except (OSError, IndexError):
        return False
    files = (directory / "vmlinuz", directory / "initrd.gz", directory / "KVER")
    return first == f"script {_script_hash()}" and all(
        p.is_file() and p.stat().st_size for p in files
    )


def build_image(directory: Path | None = None, *, force: bool = False) -> str:
    """Run the builder with the cache ``directory`` (default :func:`image_dir`); return
    its log.

    Quick when the cache is current (unless ``force``). Raises :class:`GuestSetupError`
    with the builder's own error lines (which name the missing tool or package and how
    to install it) when it fails.
    """
    directory = directory or image_dir()
    argv = ["bash", str(BUILD_SCRIPT), *(["--force"] if force else [])]
    env = {**os.environ, "PYVHOST_GUEST_DIR": str(directory)}
    try:
        proc = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise GuestSetupError(f"cannot run the guest image builder: {exc}") from None
    except subprocess.TimeoutExpired:
        raise GuestSetupError(
            f"building the guest image in {directory} took more than {BUILD_TIMEOUT:.0f} s "
            f"(bash {BUILD_SCRIPT}); stopped"
        ) from None
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-_ERROR_LINES:]
        raise GuestSetupError(
            f"building the guest image in {directory} failed (bash {BUILD_SCRIPT}, "
            f"exit status {proc.returncode}):\n" + "\n".join(f"  {line}" for line in lines)
        )
    return proc.stdout


def ensure_image(directory: Path | None = None) -> GuestImage:
    """The image in the cache ``directory`` (default :func:`image_dir`), built first
    when missing or stale (about 20 s, once)."""
    directory = directory or image_dir()
    if not _up_to_date(image_path(directory)):
        build_image(directory)
    return GuestImage.load(image_path(directory))
