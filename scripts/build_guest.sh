#!/usr/bin/env bash
# Build (or check) the Linux guest image that vhost.testing and the guest tests boot.
# The builder is part of the package (python/vhost/testing/build_image.sh, documented in
# docs/testing.md); this wrapper lets scripts/setup.sh run it before .venv exists.
#
#   bash scripts/build_guest.sh [--force]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../python/vhost/testing/build_image.sh" "$@"
