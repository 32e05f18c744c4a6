#!/usr/bin/env bash
# Resident memory of tidemarkd on the default configuration: at idle, and per extra NVMe/TCP
# connection (N nvme_perf processes, each an admin and an I/O queue pair, held open with a
# light load). The volume is file-backed, so its data is not in the daemon's RSS.
#
#   bench/memory.sh [processes]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-8}
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin tidemark --bin nvme_perf
work=$(mktemp -d /var/tmp/tidemark-mem.XXXXXX)
pid=""
perfs=()
cleanup() {
  for p in "${perfs[@]}"; do kill "$p" 2>/dev/null || true; done
  if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nport=$(free); iport=$(free)
sed -e "s|\"/var/tmp/tidemark\"|\"$work/data\"|" -e "s|\"/var/tmp/tidemark.sock\"|\"$work/rpc.sock\"|" \
    -e 's|"127.0.0.1:9464"|""|' -e "s|\"4420\"|\"$nport\"|" -e "s|\"3260\"|\"$iport\"|" config/default.toml > "$work/default.toml"
target/release/tidemarkd -c "$work/default.toml" > "$work/log" 2>&1 &
pid=$!
rpc() { target/release/tidemark -s "$work/rpc.sock" "$@"; }
for _ in $(seq 600); do rpc framework_wait_init > /dev/null 2>&1 && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }
sleep 1
idle=$(rss)
trid="trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$nport subnqn:nqn.2016-06.io.tidemark:vol0"
for i in $(seq "$n"); do
  target/release/nvme_perf -r "$trid" -q 1 -o 4096 -w randread -t 30 -c 0x2 > /dev/null 2>&1 &
  perfs+=($!)
done
for _ in $(seq 100); do
  c=$(rpc nvmf_subsystem_get_qpairs --nqn nqn.2016-06.io.tidemark:vol0 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [[ $c -ge $((2 * n)) ]] && break
  sleep 0.1
done
sleep 2
busy=$(rss)
conns=$(rpc nvmf_subsystem_get_qpairs --nqn nqn.2016-06.io.tidemark:vol0 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "tidemarkd on config/default.toml (thin 1 GiB volume of a file-backed pool, NVMe/TCP + iSCSI exports)"
echo "idle RSS: $((idle / 1024)) MiB"
echo "with $conns NVMe/TCP queue pairs open ($n hosts at QD 1): $((busy / 1024)) MiB"
python3 -c "print(f'per connection: {($busy - $idle) / max($conns, 1):.0f} KiB')"
