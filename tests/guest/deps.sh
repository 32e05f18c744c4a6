#!/usr/bin/env bash
# Install the host-side tools that tests/guest/build.sh and run.sh need, on Debian 12.
# Idempotent and quick when everything is already present (no apt-get call at all then).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"

# command -> Debian package providing it
declare -A need=(
  [qemu-system-x86_64]=qemu-system-x86
  [cpio]=cpio
  [dpkg-deb]=dpkg
  [gzip]=gzip
  [xz]=xz-utils          # unpack the kernel image to a PVH vmlinux
  [readelf]=binutils      # inspect ELF NEEDED entries of extracted binaries
  [ldconfig]=libc-bin     # build ld.so.cache for the guest root
  [depmod]=kmod           # generate modules.dep for the guest kernel
  [sha256sum]=coreutils
  [timeout]=coreutils
  [python3]=python3        # smoke test only (host HTTP server)
)
# packages checked by dpkg status rather than by command
pkgs_always=(seabios)

missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
mapfile -t -O "${#missing[@]}" missing < <(apt_missing "${pkgs_always[@]}")

if ((${#missing[@]} == 0)); then
  exit 0
fi

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
apt_install tidemark-guest-deps "${missing[@]}"
