#!/usr/bin/env bash
# Installs what the SPDK interop tests need, each part idempotent (nothing happens when it is
# there already):
# 1. the Debian runtime libraries of the prebuilt SPDK v25.09 peer (spdk_nvme_perf, bdevperf,
#    nvmf_tgt, iscsi_tgt; see ../shared/peers/README.md) that tests/spdk_host.rs, tests/spdk.rs
#    and bench/vs_spdk.sh run when SPDK_DIR points at it;
# 2. SPDK's own JSON-RPC clients for tests/spdk.rs: `spdk-rpc` (SPDK's rpc.py) and `spdk-cli`
#    (spdkcli) from the PyPI package `spdk` with the `cli` extra, in a venv at
#    /opt/tidemark-spdk (which tests/spdk.rs also looks in) unless they are on PATH.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"

libs=(libbsd0 libnuma1 libuuid1 libssl3 libkeyutils1 libaio1 libiscsi7)
mapfile -t missing < <(apt_missing "${libs[@]}")
apt_install tidemark-spdk-deps "${missing[@]}"

PKG="spdk[cli]==26.9"
VENV=/opt/tidemark-spdk
if command -v spdk-rpc >/dev/null 2>&1 && command -v spdk-cli >/dev/null 2>&1; then
  exit 0
fi
if [[ -x $VENV/bin/spdk-rpc && -x $VENV/bin/spdk-cli ]]; then
  exit 0
fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
  apt_install tidemark-spdk-deps python3 python3-venv python3-pip
fi
echo "tidemark-spdk deps: installing $PKG (pip) into $VENV" >&2
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$PKG"
