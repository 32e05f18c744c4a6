#!/usr/bin/env bash
# Backup while the live volume serves: host latency over NVMe/TCP with and without a backup
# of a sealed snapshot running at a bandwidth cap, in the same run on the same volume.
# Prints the host's p50/p99/p99.9 in both windows, the ratio of the p99.9s (goal: <= 1.5 at
# the cap), and the backup's achieved rate.
#
#   bench/backup_under_load.sh [seconds] [cap_mb_s]   (BENCH_TARGET_CPU=0 BENCH_INITIATOR_CPU=1)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cap=${2:-50}
tcpu=${BENCH_TARGET_CPU:-0}
icpu=${BENCH_INITIATOR_CPU:-1}
bench/deps.sh
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin tidemark --bin nvme_perf
work=$(mktemp -d /var/tmp/tidemark-backup-bench.XXXXXX)
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
size_mb=1024
cat > "$work/bench.toml" <<TOML
[daemon]
data_dir = "$work"
[[bdev]]
method = "bdev_uring_create"
params = { name = "base", filename = "base.img", size_mb = $size_mb }
[[bdev]]
method = "bdev_uring_create"
params = { name = "store", filename = "store.img", size_mb = $((size_mb + 64)) }
[[bdev]]
method = "bdev_cow_create"
params = { name = "vol0", base_bdev = "base", store_bdev = "store", grain_kb = 64 }
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "$nqn", allow_any_host = true }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$nqn", namespace = { bdev_name = "vol0", nsid = 1 } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$port" } }
TOML
tmask=$(printf '0x%x' $((1 << tcpu)))
imask=$(printf '0x%x' $((1 << icpu)))
target/release/tidemarkd -c "$work/bench.toml" --cpumask "$tmask" --rpc-socket "$work/rpc.sock" --metrics "" --data-dir "$work" > "$work/tidemarkd.log" 2>&1 &
pid=$!
rpc() { target/release/tidemark -s "$work/rpc.sock" "$@"; }
# The RPC server answers once the configuration is applied (listeners up).
for _ in $(seq 600); do rpc framework_wait_init > /dev/null 2>&1 && break; sleep 0.05; done
rpc framework_wait_init > /dev/null || { echo "tidemarkd did not start:"; cat "$work/tidemarkd.log"; exit 1; }
trid="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn"
perf() { target/release/nvme_perf -r "$trid" -q 8 -o 4096 -w randrw -M 70 -t "$1" -c "$imask" --json; }
json() { python3 -c "import json,sys; j=json.load(sys.stdin); print(' '.join(str(round(j[k], 1)) for k in sys.argv[1:]))" "$@"; }

# Fill the volume so the snapshot holds data, then preserve it.
target/release/nvme_perf -r "$trid" -q 32 -o 131072 -w write -t 8 -c "$imask" --json > /dev/null
rpc bdev_snapshot_create --bdev_name vol0 --snapshot_name s1 --wait_sealed true > /dev/null
# Warm up: random writes after the preserve copy grains on first touch; let that settle so
# both windows below see the same copy-on-write cost.
perf "$secs" > /dev/null
read -r a_iops a50 a99 a999 < <(perf "$secs" | json iops p50_us p99_us p999_us)
rpc backup_start --source s1 --path s1.img --max_bandwidth_mb_sec "$cap" > "$work/job.json"
id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$work/job.json")
read -r b_iops b50 b99 b999 < <(perf "$secs" | json iops p50_us p99_us p999_us)
job=$(rpc backup_get --id "$id")
done_b=$(echo "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["bytes_done"])')
state=$(echo "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["state"])')
rpc backup_cancel --id "$id" > /dev/null 2>&1 || true

echo "host: 4 KiB randrw 70% reads at QD 8 over NVMe/TCP (nvme_perf on CPU $icpu); target on CPU $tcpu; ${secs}s windows"
echo "volume: CoW over uring files in $work (${size_mb} MiB); backup of sealed snapshot s1 capped at $cap MB/s"
printf '%-16s %10s %28s\n' window IOPS "latency us p50/p99/p99.9"
printf '%-16s %10s %28s\n' "no backup" "$a_iops" "$a50/$a99/$a999"
printf '%-16s %10s %28s\n' "backup running" "$b_iops" "$b50/$b99/$b999"
python3 - "$a999" "$b999" "$done_b" "$secs" "$state" <<'PY'
import sys
a, b, done, secs, state = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
print(f"p99.9 with backup / without: {b/a:.2f} (goal <= 1.5)")
print(f"backup: {done/secs/1e6:.1f} MB/s achieved during the window (state {state})")
PY
