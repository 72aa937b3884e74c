"""``python -m vhost`` and the ``pyvhost`` script: see :mod:`vhost.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
