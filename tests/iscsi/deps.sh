#!/usr/bin/env bash
# Installs what the iSCSI tests and benchmark need on Debian 12: libiscsi's tools
# (iscsi-test-cu, iscsi-perf, iscsi-ls, iscsi-inq), QEMU's image tools with the iSCSI block
# driver (qemu-img, qemu-io + qemu-block-extra) and tgt (tgtd, the peer of the conformance
# comparison and the benchmark). Idempotent: no apt-get call at all when everything is there.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"

# command -> Debian package providing it
declare -A need=(
  [iscsi-test-cu]=libiscsi-bin
  [iscsi-perf]=libiscsi-bin
  [iscsi-ls]=libiscsi-bin
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [tgtd]=tgt
  [tgtadm]=tgt
  [timeout]=coreutils
  [taskset]=util-linux
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# qemu's iSCSI driver is a loadable module shipped by qemu-block-extra.
if ! ls /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so /usr/lib/*/qemu/block-iscsi.so >/dev/null 2>&1; then
  missing+=(qemu-block-extra)
fi
if ((${#missing[@]} == 0)); then
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
# --no-install-recommends keeps tgt from pulling in services we never start, and apt.sh's
# policy-rc.d stops the package scripts from starting a system tgtd on port 3260.
apt_install tidemark-iscsi-deps "${missing[@]}"
