#!/usr/bin/env bash
# Installs the Debian runtime libraries of the prebuilt SPDK v25.09 peer (spdk_nvme_perf,
# bdevperf, nvmf_tgt, iscsi_tgt; see ../shared/peers/README.md) that tests/spdk_host.rs and
# bench/vs_spdk.sh run when SPDK_DIR points at it. Idempotent: no apt-get call at all when
# everything is there.
set -euo pipefail
libs=(libbsd0 libnuma1 libuuid1 libssl3 libkeyutils1 libaio1 libiscsi7)
missing=()
for p in "${libs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "tidemark-spdk deps: installing ${missing[*]}" >&2
if [[ $(id -u) -ne 0 ]]; then
  echo "tidemark-spdk deps: need root to apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends --no-remove "${missing[@]}" >/dev/null
