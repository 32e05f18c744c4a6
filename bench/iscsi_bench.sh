#!/usr/bin/env bash
# iSCSI benchmark: tidemark against tgtd (Debian tgt, RAM-backed LUN), both started here on
# this machine in the same run, each target pinned to one CPU and the clients to another.
#
#   bench/iscsi_bench.sh            # TIME=10 seconds per run, 1 GiB LUNs
#   TIME=20 SIZE_MB=2048 bench/iscsi_bench.sh
#   BENCH_RT=1 bench/iscsi_bench.sh # targets and clients SCHED_FIFO (a machine shared with
#                                   # builds otherwise measures its scheduler more than iSCSI)
#
# Clients: libiscsi's iscsi-perf (reads only: QD32 and QD1, `-r -b 8` as in the issue, and
# fixed 4 KiB) and bench/iscsi_load.rs (4 KiB random reads and writes at QD32 and QD1, with
# latency percentiles; and two client processes at QD16 each, to show whether one client
# process is what saturates). Prints every figure and the tidemark/tgtd ratio.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TIME=${TIME:-10}
SIZE_MB=${SIZE_MB:-1024}
TARGET_CPU=${TARGET_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
RT=()
if [[ ${BENCH_RT:-0} == 1 ]]; then RT=(chrt -f 50); fi

bash "$ROOT/tests/iscsi/deps.sh"
(cd "$ROOT" && cargo build --release --quiet --bin tidemarkd --bin iscsi-load)
TIDEMARKD=$ROOT/target/release/tidemarkd
LOAD=$ROOT/target/release/iscsi-load

work=$(mktemp -d /tmp/tidemark-iscsi-bench.XXXXXX)
tm_pid=""
tgt_pid=""
tgt_ctl=""
cleanup() {
  if [[ -n $tm_pid ]]; then kill "$tm_pid" 2>/dev/null || true; wait "$tm_pid" 2>/dev/null || true; fi
  if [[ -n $tgt_pid ]]; then
    tgtadm -C "$tgt_ctl" --lld iscsi --op delete --force --mode target --tid 1 >/dev/null 2>&1 || true
    tgtadm -C "$tgt_ctl" --op delete --mode system >/dev/null 2>&1 || true
    for _ in $(seq 50); do kill -0 "$tgt_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$tgt_pid" 2>/dev/null || true
    rm -f "/var/run/tgtd/socket.$tgt_ctl" "/var/run/tgtd/socket.$tgt_ctl.lock"
  fi
  rm -f /dev/shm/tidemark-bench-tgt-$$.img
  rm -rf "$work"
}
trap cleanup EXIT

. "$ROOT/bench/lib.sh"

# --- tidemark: one reactor on TARGET_CPU, a RAM bdev ---
tm_port=$(free_port)
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
params = { tag = 1, portals = [{ host = "127.0.0.1", port = "$tm_port" }] }
[[iscsi]]
method = "iscsi_create_initiator_group"
params = { tag = 1, initiators = ["ANY"], netmasks = ["127.0.0.1/32"] }
[[iscsi]]
method = "iscsi_create_target_node"
params = { name = "bench", luns = [{ bdev_name = "ram0", lun_id = 0 }], pg_ig_maps = [{ pg_tag = 1, ig_tag = 1 }], queue_depth = 128 }
EOF
RUST_LOG=warn "${RT[@]}" "$TIDEMARKD" --config "$work/tidemark.toml" >"$work/tidemark.log" 2>&1 &
tm_pid=$!
wait_port "$tm_port"
TM_IQN=iqn.2016-06.io.tidemark:bench
TM_URL=iscsi://127.0.0.1:$tm_port/$TM_IQN/0

# --- tgtd: pinned to TARGET_CPU, a RAM-backed (tmpfs) LUN 1 ---
tgt_port=$(free_port)
tgt_ctl=$((1000 + $$ % 30000))
while [[ -e /var/run/tgtd/socket.$tgt_ctl ]]; do tgt_ctl=$((tgt_ctl + 1)); done
truncate -s "${SIZE_MB}M" /dev/shm/tidemark-bench-tgt-$$.img
"${RT[@]}" taskset -c "$TARGET_CPU" tgtd -f -C "$tgt_ctl" --iscsi "portal=127.0.0.1:$tgt_port" >"$work/tgtd.log" 2>&1 &
tgt_pid=$!
wait_port "$tgt_port"
TGT_IQN=iqn.2001-04.com.example:tidemark-bench
tgtadm -C "$tgt_ctl" --lld iscsi --op new --mode target --tid 1 -T "$TGT_IQN"
tgtadm -C "$tgt_ctl" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b /dev/shm/tidemark-bench-tgt-$$.img
tgtadm -C "$tgt_ctl" --lld iscsi --op bind --mode target --tid 1 -I ALL
TGT_URL=iscsi://127.0.0.1:$tgt_port/$TGT_IQN/1

perf() { # url args... -> IOPS
  local url=$1; shift
  "${RT[@]}" taskset -c "$CLIENT_CPU" timeout $((TIME + 30)) iscsi-perf "$@" -t "$TIME" "$url" 2>&1 | tr '\r' '\n' | sed -n 's/^iops average \([0-9]*\).*/\1/p' | tail -1
}
load() { # portal iqn lun args... -> "iops avg p50 p99"
  local portal=$1 iqn=$2 lun=$3; shift 3
  "${RT[@]}" taskset -c "$CLIENT_CPU" timeout $((TIME + 30)) "$LOAD" --portal "$portal" --target "$iqn" --lun "$lun" --time "$TIME" "$@" |
    sed -n 's/.*iops=\([0-9]*\).*lat_avg_us=\([0-9.]*\) lat_p50_us=\([0-9.]*\) lat_p99_us=\([0-9.]*\).*/\1 \2 \3 \4/p'
}
load2() { # two client processes at half the depth each -> summed IOPS
  local portal=$1 iqn=$2 lun=$3 rw=$4 qd=$5
  local a b
  a=$(mktemp -p "$work") b=$(mktemp -p "$work")
  load "$portal" "$iqn" "$lun" --rw "$rw" --qd "$qd" >"$a" &
  local p1=$!
  load "$portal" "$iqn" "$lun" --rw "$rw" --qd "$qd" >"$b" &
  local p2=$!
  wait $p1 $p2
  echo $(($(cut -d' ' -f1 <"$a") + $(cut -d' ' -f1 <"$b")))
}

declare -A R
run_all() { # name url portal iqn lun
  local n=$1 url=$2 portal=$3 iqn=$4 lun=$5
  echo "measuring $n ..." >&2
  R[$n,perf_r32]=$(perf "$url" -m 32 -r -b 8)
  R[$n,perf_r1]=$(perf "$url" -m 1 -r -b 8)
  R[$n,perf_f32]=$(perf "$url" -m 32 -b 8)
  read -r R[$n,rr32] R[$n,rr32_avg] R[$n,rr32_p50] R[$n,rr32_p99] < <(load "$portal" "$iqn" "$lun" --rw randread --qd 32)
  read -r R[$n,rw32] R[$n,rw32_avg] R[$n,rw32_p50] R[$n,rw32_p99] < <(load "$portal" "$iqn" "$lun" --rw randwrite --qd 32)
  read -r R[$n,rr1] R[$n,rr1_avg] R[$n,rr1_p50] R[$n,rr1_p99] < <(load "$portal" "$iqn" "$lun" --rw randread --qd 1)
  read -r R[$n,rw1] R[$n,rw1_avg] R[$n,rw1_p50] R[$n,rw1_p99] < <(load "$portal" "$iqn" "$lun" --rw randwrite --qd 1)
  R[$n,rr2x16]=$(load2 "$portal" "$iqn" "$lun" randread 16)
}

run_all tidemark "$TM_URL" "127.0.0.1:$tm_port" "$TM_IQN" 0
run_all tgtd "$TGT_URL" "127.0.0.1:$tgt_port" "$TGT_IQN" 1

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo
echo "iSCSI, one target CPU ($TARGET_CPU), clients on CPU $CLIENT_CPU, RAM LUNs of $SIZE_MB MiB, $TIME s per run, SCHED_FIFO ${BENCH_RT:-0}, load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-44s %12s %12s %8s\n" "IOPS" tidemark tgtd ratio
row() { printf "%-44s %12s %12s %8s\n" "$1" "${R[tidemark,$2]}" "${R[tgtd,$2]}" "$(ratio "${R[tidemark,$2]}" "${R[tgtd,$2]}")"; }
row "iscsi-perf read QD32 (-r -b 8)" perf_r32
row "iscsi-perf read QD1 (-r -b 8)" perf_r1
row "iscsi-perf read QD32 (4 KiB)" perf_f32
row "iscsi-load 4K randread QD32" rr32
row "iscsi-load 4K randwrite QD32" rw32
row "iscsi-load 4K randread QD1" rr1
row "iscsi-load 4K randwrite QD1" rw1
row "iscsi-load 4K randread 2 clients x QD16" rr2x16
printf "%-44s %12s %12s %8s\n" "latency, µs (avg / p50 / p99)" tidemark tgtd "tgtd/tm"
lrow() {
  printf "%-44s %12s %12s %8s\n" "$1" "${R[tidemark,${2}_avg]}/${R[tidemark,${2}_p50]}/${R[tidemark,${2}_p99]}" \
    "${R[tgtd,${2}_avg]}/${R[tgtd,${2}_p50]}/${R[tgtd,${2}_p99]}" "$(ratio "${R[tgtd,${2}_p50]}" "${R[tidemark,${2}_p50]}")"
}
lrow "4K randread QD1" rr1
lrow "4K randwrite QD1" rw1
lrow "4K randread QD32" rr32
lrow "4K randwrite QD32" rw32
