#!/usr/bin/env bash
# NVMe/TCP protocol efficiency: 4 KiB random read and write IOPS of the target over loopback
# (tidemarkd on one core, nvme_perf on another) against bdevperf on the same RAM bdev on the
# same core, measured in the same run. Prints both and the ratio nvmf / bdevperf.
#
#   bench/nvmf_bench.sh [seconds]          (BENCH_TARGET_CPU=0 BENCH_INITIATOR_CPU=1)
#
# BENCH_RT=1 runs the target, nvme_perf and bdevperf under SCHED_FIFO (chrt -f 10) so that a
# busy machine (other builds) does not preempt them; the kernel's RT throttling still leaves
# 5% of each CPU to everything else. Use it only for short runs.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
tcpu=${BENCH_TARGET_CPU:-0}
icpu=${BENCH_INITIATOR_CPU:-1}
bench/deps.sh
# BENCH_SKIP_BUILD=1 reuses target/release binaries built just before.
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin nvme_perf --bin bdevperf
work=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-nvmf-bench.XXXXXX")
pid=""
cleanup() {
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nqn=nqn.2016-06.io.tidemark:bench
tmask=$(printf '0x%x' $((1 << tcpu)))
imask=$(printf '0x%x' $((1 << icpu)))
cat > "$work/bench.toml" <<TOML
[daemon]
data_dir = "$work"
buffer_pool_mb = 64
[[bdev]]
method = "bdev_malloc_create"
params = { name = "Malloc0", num_blocks = 262144, block_size = 4096 }
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "$nqn", allow_any_host = true }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$nqn", namespace = { bdev_name = "Malloc0", nsid = 1 } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$port" } }
TOML

rt=()
[[ ${BENCH_RT:-0} == 1 ]] && rt=(chrt -f 10)
"${rt[@]}" target/release/tidemarkd -c "$work/bench.toml" --cpumask "$tmask" --poll-mode busy --rpc-socket "$work/rpc.sock" \
  --metrics "" --data-dir "$work" > "$work/tidemarkd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  [[ -S $work/rpc.sock ]] && break
  sleep 0.05
done
[[ -S $work/rpc.sock ]] || { echo "tidemarkd did not start"; cat "$work/tidemarkd.log"; exit 1; }
trid="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn"
json() { python3 -c "import json,sys; j=json.load(sys.stdin); print(' '.join(str(round(j[k], 2)) for k in sys.argv[1:]))" "$@"; }

declare -A nv nvlat
for w in randread randwrite; do
  for qd in 1 32; do
    read -r iops p50 p99 p999 < <("${rt[@]}" target/release/nvme_perf -r "$trid" -q "$qd" -o 4096 -w "$w" -t "$secs" -c "$imask" --json | json iops p50_us p99_us p999_us)
    nv[$w.$qd]=$iops
    nvlat[$w.$qd]="$p50/$p99/$p999"
  done
done
kill -TERM "$pid"
wait "$pid" 2>/dev/null || true
pid=""

echo "4 KiB, ${secs}s per run; target: tidemarkd on CPU $tcpu (busy poll), nvme_perf on CPU $icpu, loopback"
echo "peer: bdevperf on the same Malloc0 bdev on CPU $tcpu, in-process (no network)"
[[ ${BENCH_RT:-0} == 1 ]] && echo "all under SCHED_FIFO (BENCH_RT=1)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %4s %12s %22s %12s %8s\n' workload qd nvmf_iops "lat_us p50/p99/p99.9" bdevperf ratio
for w in randread randwrite; do
  for qd in 1 32; do
    b=$("${rt[@]}" target/release/bdevperf -c "$work/bench.toml" -b Malloc0 -q "$qd" -o 4096 -w "$w" -t "$secs" -m "$tmask" --json | json iops)
    n=${nv[$w.$qd]}
    printf '%-10s %4s %12.0f %22s %12.0f %8s\n' "$w" "$qd" "$n" "${nvlat[$w.$qd]}" "$b" "$(python3 -c "print(f'{$n/$b:.3f}')")"
  done
done
