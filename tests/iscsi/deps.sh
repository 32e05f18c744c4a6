#!/usr/bin/env bash
# Installs what the iSCSI tests and benchmark need on Debian 12: libiscsi's tools
# (iscsi-test-cu, iscsi-perf, iscsi-ls, iscsi-inq), QEMU's image tools with the iSCSI block
# driver (qemu-img, qemu-io + qemu-block-extra) and tgt (tgtd, the peer of the conformance
# comparison and the benchmark). Idempotent: no apt-get call at all when everything is there.
set -euo pipefail

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
echo "tidemark-iscsi deps: installing ${missing[*]}" >&2
if [[ $(id -u) -ne 0 ]]; then
  echo "tidemark-iscsi deps: need root to apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck source=../lib/qemu-release.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/qemu-release.sh"
apt-get update -qq
# --no-install-recommends keeps tgt from pulling in services we never start; policy-rc.d
# stops the package scripts from starting a system tgtd on port 3260.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
apt-get install -y -q --no-install-recommends --no-remove "${QEMU_APT_RELEASE[@]}" "${missing[@]}"
if ((created_policy)); then rm -f "$policy"; fi
