#!/usr/bin/env bash
# Prints the Debian 12 backports kernel package (linux-image-<version>-amd64-unsigned, 6.12 at
# this writing) for guests that need what bookworm's 6.1 kernel is built without: NVMe in-band
# authentication (CONFIG_NVME_AUTH is off in Debian's 6.1). Makes apt know bookworm-backports
# first (tests/lib/apt.sh, said when it does). Use: TIDEMARK_GUEST_KERNEL_PKG=$(this) run.sh ...
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"
if [[ $(id -u) -ne 0 ]] && ! apt-cache policy 2>/dev/null | grep -q bookworm-backports; then
  echo "kernel-backports.sh: need root to add bookworm-backports to apt's sources" >&2
  exit 1
fi
ensure_backports "the guest kernel with NVMe in-band authentication comes from bookworm-backports"
pkg=$(apt-cache -t bookworm-backports depends linux-image-amd64 2>/dev/null |
      awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9].*-amd64(-unsigned)?$/ {print $2; exit}')
[[ -n $pkg ]] || { echo "kernel-backports.sh: no kernel package behind bookworm-backports' linux-image-amd64" >&2; exit 1; }
echo "$pkg"
