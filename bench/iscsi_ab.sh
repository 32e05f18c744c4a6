#!/usr/bin/env bash
# tidemark's iSCSI target against an earlier build of itself, in the same run: the two daemons
# serve the same kind of RAM LUN on the same CPU, driven in turn (A B A B ..., PAIRS pairs) by
# bench/iscsi_load.rs; prints per-pair ratios and the median ratio of each row. For changes
# whose effect is smaller than the noise between two separate runs on a shared machine.
#
#   BASE_REV=HEAD~1 bench/iscsi_ab.sh           # builds that revision in a scratch worktree
#   BASE_BIN=/path/to/tidemarkd bench/iscsi_ab.sh
#   PAIRS=5 TIME=5 SIZE_MB=256 TARGET_CPU=0 CLIENT_CPU=1
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PAIRS=${PAIRS:-5}
TIME=${TIME:-5}
SIZE_MB=${SIZE_MB:-256}
TARGET_CPU=${TARGET_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}

(cd "$ROOT" && cargo build --release --quiet --bin tidemarkd --bin iscsi-load)
NEW=$ROOT/target/release/tidemarkd
LOAD=$ROOT/target/release/iscsi-load
work=$(mktemp -d /tmp/tidemark-iscsi-ab.XXXXXX)
pid=""
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  remove_base_worktree "$ROOT" "$work"
  rm -rf "$work"
}
trap cleanup EXIT

. "$ROOT/bench/lib.sh"
OLD=$(base_tidemarkd "$ROOT" "$work")

start() { # binary -> sets pid, port
  port=$(free_port)
  rm -rf "$work/data"
  cat >"$work/tidemark.toml" <<EOF
[daemon]
data_dir = "$work/data"
buffer_pool_mb = 64
[reactor]
cores = [$TARGET_CPU]
[rpc]
socket = "$work/rpc.sock"
[metrics]
listen = ""
[[bdev]]
method = "bdev_malloc_create"
params = { name = "ram0", num_blocks = $((SIZE_MB * 2048)), block_size = 512 }
[[iscsi]]
method = "iscsi_create_portal_group"
params = { tag = 1, portals = [{ host = "127.0.0.1", port = "$port" }] }
[[iscsi]]
method = "iscsi_create_initiator_group"
params = { tag = 1, initiators = ["ANY"], netmasks = ["127.0.0.1/32"] }
[[iscsi]]
method = "iscsi_create_target_node"
params = { name = "bench", luns = [{ bdev_name = "ram0", lun_id = 0 }], pg_ig_maps = [{ pg_tag = 1, ig_tag = 1 }], queue_depth = 128 }
EOF
  RUST_LOG=warn "$1" --config "$work/tidemark.toml" >"$work/tidemark.log" 2>&1 &
  pid=$!
  wait_port "$port"
}
stop() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
}
iops() { # rw qd -> IOPS
  taskset -c "$CLIENT_CPU" timeout $((TIME + 30)) "$LOAD" --portal "127.0.0.1:$port" --target iqn.2016-06.io.tidemark:bench --lun 0 \
    --time "$TIME" --rw "$1" --qd "$2" | sed -n 's/.*iops=\([0-9]*\).*/\1/p'
}

ROWS=("randwrite 32" "randwrite 1" "randread 32")
declare -A A B
for ((i = 1; i <= PAIRS; i++)); do
  for side in new old; do
    if [[ $side == new ]]; then start "$NEW"; else start "$OLD"; fi
    # Every block written once first: the RAM bdev's pages are then resident for both.
    iops randwrite 32 >/dev/null
    for r in "${ROWS[@]}"; do
      v=$(iops $r)
      if [[ $side == new ]]; then A[$r,$i]=$v; else B[$r,$i]=$v; fi
    done
    stop
  done
  echo "pair $i done" >&2
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "iSCSI 4 KiB, iscsi-load, target on CPU $TARGET_CPU, client on CPU $CLIENT_CPU, RAM LUN $SIZE_MB MiB, $TIME s per run, $PAIRS pairs; new = $(git -C "$ROOT" rev-parse --short HEAD), old = ${BASE_BIN:-${BASE_REV:-HEAD~1}}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-16s %10s %10s %8s   %s\n" "row" "new (med)" "old (med)" "ratio" "per-pair ratios"
for r in "${ROWS[@]}"; do
  ratios=() nv=() ov=()
  for ((i = 1; i <= PAIRS; i++)); do
    nv+=("${A[$r,$i]}") ov+=("${B[$r,$i]}")
    ratios+=("$(awk -v a="${A[$r,$i]}" -v b="${B[$r,$i]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "0" }')")
  done
  printf "%-16s %10s %10s %8s   %s\n" "${r/ /  QD}" "$(printf '%s\n' "${nv[@]}" | median)" "$(printf '%s\n' "${ov[@]}" | median)" \
    "$(printf '%s\n' "${ratios[@]}" | median)" "${ratios[*]}"
done
