#!/usr/bin/env bash
# The CSI driver's latency over tidemark's own JSON-RPC, and its resident memory (issue #16):
# N CreateVolume, CreateSnapshot and clone CreateVolume calls through tidemark-csi's gRPC
# socket, then the same operations as the one JSON-RPC call that does each, to the same
# tidemarkd in the same run; prints p50/p99 and the ratios (csi/examples/csi_bench.rs).
#
#   bench/csi_bench.sh [N]     (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin tidemarkd -p tidemark
cargo build --release -q --bin tidemark-csi --example csi_bench -p tidemark-csi
exec target/release/examples/csi_bench "${1:-100}"
