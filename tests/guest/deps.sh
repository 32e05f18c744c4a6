#!/usr/bin/env bash
# Install the host-side tools that tests/guest/build.sh and run.sh need, on Debian 12.
# Idempotent and quick when everything is already present (no apt-get call at all then).
set -euo pipefail

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
for p in "${pkgs_always[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

# de-duplicate
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "tidemark-guest deps: installing ${missing[*]}" >&2
if [[ $(id -u) -ne 0 ]]; then
  echo "tidemark-guest deps: need root to apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck source=../lib/qemu-release.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/qemu-release.sh"
apt-get update -qq
apt-get install -y -q --no-install-recommends --no-remove "${QEMU_APT_RELEASE[@]}" "${missing[@]}"
