#!/usr/bin/env bash
# The volume pool's first writes as it fills, tidemark against an earlier build of itself in the
# same run. Each daemon in turn (new, old, new, old, ... PAIRS pairs) gets a 64 GiB pool on a
# null bdev (1 MiB clusters: no data is kept, so the pool's own costs show) with two 32 GiB thin
# volumes exported over loopback NVMe/TCP; nvme_perf writes one 4 KiB write per cluster, QD32,
# one pass, to the first volume (the pool fills from empty to half) and then to the second (half
# to full). Prints first writes/s of each pass, new / old per pair and medians, and each
# build's half-to-full / empty-to-half ratio (~1 when a commit's cost does not grow with what
# the pool holds).
#
#   BASE_REV=HEAD~1 bench/lvol_fill_ab.sh      # builds that revision in a scratch worktree
#   BASE_BIN=/path/to/old/tidemarkd bench/lvol_fill_ab.sh
#   PAIRS=3 TARGET_CPU=0 CLIENT_CPU=1 BENCH_SKIP_BUILD=1
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PAIRS=${PAIRS:-3}
TARGET_CPU=${TARGET_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || (cd "$ROOT" && cargo build --release --quiet --bin tidemarkd --bin nvme_perf)
NEW=$ROOT/target/release/tidemarkd
PERF=$ROOT/target/release/nvme_perf
work=$(mktemp -d /tmp/tidemark-lvol-fill-ab.XXXXXX)
pid=""
cleanup() {
  stop_pids "$pid"
  remove_base_worktree "$ROOT" "$work"
  rm -rf "$work"
}
trap cleanup EXIT
. "$ROOT/bench/lib.sh"
OLD=$(base_tidemarkd "$ROOT" "$work")
nqn=nqn.2016-06.io.tidemark:fill

# One pass on NSID $1 of the daemon listening on $port: first writes/s.
pass() {
  # nvme_perf pins its own threads (-c; its default is CPU 0, the target's): not taskset.
  "$PERF" -c "$(printf '0x%x' $((1 << CLIENT_CPU)))" --json -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" \
    -n "$1" -q 32 -o 4096 -w write -t 600 --stride 1048576 --once | python3 -c 'import json, sys; print(round(json.load(sys.stdin)["iops"]))'
}

# Runs both passes on binary $1; sets ra (empty to half) and rb (half to full). Not in a
# subshell, so that the EXIT trap knows the daemon's PID.
run() {
  port=$(free_port)
  rm -rf "$work/data"
  mkdir -p "$work/data"
  cat > "$work/t.toml" <<TOML
[daemon]
data_dir = "$work/data"
buffer_pool_mb = 64
[reactor]
cores = [$TARGET_CPU]
poll_mode = "busy"
[rpc]
socket = "$work/rpc.sock"
[metrics]
listen = ""
[[bdev]]
method = "bdev_null_create"
params = { name = "Null0", num_blocks = $(((65536 + 1024) * 256)), block_size = 4096 }
[[bdev]]
method = "bdev_lvol_create_lvstore"
params = { bdev_name = "Null0", lvs_name = "np", cluster_sz = 1048576 }
[[bdev]]
method = "bdev_lvol_create"
params = { lvs_name = "np", lvol_name = "a", size_in_mib = 32768, thin_provision = true }
[[bdev]]
method = "bdev_lvol_create"
params = { lvs_name = "np", lvol_name = "b", size_in_mib = 32768, thin_provision = true }
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "$nqn", allow_any_host = true, serial_number = "TMFILL1", max_namespaces = 4 }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$nqn", namespace = { bdev_name = "np/a", nsid = 1 } }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$nqn", namespace = { bdev_name = "np/b", nsid = 2 } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$port" } }
TOML
  RUST_LOG=warn "$1" --config "$work/t.toml" > "$work/tidemark.log" 2>&1 &
  pid=$!
  wait_port "$port"
  ra=$(pass 1)
  rb=$(pass 2)
  stop_pids "$pid"
  pid=""
}

echo "new: $NEW"
echo "old: $OLD"
results=()
for i in $(seq "$PAIRS"); do
  run "$NEW"
  na=$ra nb=$rb
  run "$OLD"
  oa=$ra ob=$rb
  echo "pair $i: new empty->half $na/s, half->full $nb/s; old empty->half $oa/s, half->full $ob/s"
  results+=("$na $nb $oa $ob")
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda i: statistics.median(r[i] for r in rows)
per = lambda f: " ".join(f"{f(r):.2f}" for r in rows)
print(f"\n| first writes/s (medians of {len(rows)} pairs) | new | old | new / old (per pair) |")
print("| --- | --- | --- | --- |")
print(f"| pool empty to half | {med(0):.0f} | {med(2):.0f} | {med(0) / med(2):.2f} ({per(lambda r: r[0] / r[2])}) |")
print(f"| pool half to full | {med(1):.0f} | {med(3):.0f} | {med(1) / med(3):.2f} ({per(lambda r: r[1] / r[3])}) |")
print(f"| half to full / empty to half | {med(1) / med(0):.2f} | {med(3) / med(2):.2f} | |")
'
