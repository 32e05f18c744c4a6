#!/usr/bin/env bash
# Installs SPDK's own JSON-RPC clients for tests/spdk.rs: `spdk-rpc` (SPDK's rpc.py) and
# `spdk-cli` (spdkcli) from the PyPI package `spdk`, with the `cli` extra (configshell-fb).
# Idempotent: nothing happens when both are on PATH already. Where pip may not install into the
# system Python (Debian's externally managed one), they go into a venv at /opt/tidemark-spdk,
# which tests/spdk.rs also looks in.
set -euo pipefail

PKG="spdk[cli]==26.9"
VENV=/opt/tidemark-spdk

if command -v spdk-rpc >/dev/null 2>&1 && command -v spdk-cli >/dev/null 2>&1; then
  exit 0
fi
if [[ -x $VENV/bin/spdk-rpc && -x $VENV/bin/spdk-cli ]]; then
  exit 0
fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
  echo "tidemark-spdk deps: installing python3 python3-venv (apt)" >&2
  if [[ $(id -u) -ne 0 ]]; then
    echo "tidemark-spdk deps: need root to apt-get install python3 python3-venv" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends --no-remove python3 python3-venv python3-pip >/dev/null
fi
echo "tidemark-spdk deps: installing $PKG (pip) into $VENV" >&2
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$PKG"
