#!/usr/bin/env bash
# Installs what tests/service.rs needs on Debian 12: debootstrap (the Debian 12 root file system
# the package is installed into, tests/service/build-rootfs.sh) and systemd-container
# (systemd-nspawn, which boots that root with systemd as its init). Idempotent: no apt-get call
# when both are there.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"
missing=()
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
apt_install tidemark-service-deps "${missing[@]}"
