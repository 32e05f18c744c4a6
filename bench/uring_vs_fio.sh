#!/usr/bin/env bash
# The uring bdev against fio's io_uring engine on the same tmpfs file, same depth, same core,
# in the same run. Prints both and the ratio tidemark / fio.
#
#   bench/uring_vs_fio.sh [seconds] [queue_depth]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
qd=${2:-32}
cpu=${BENCH_CPU:-0}
bench/deps.sh
cargo build --release -q --bin bdevperf
work=$(mktemp -d /dev/shm/tidemark-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
size_mb=1024
file="$work/bench.img"
truncate -s ${size_mb}M "$file"
# Write the file once so both sides read allocated pages, not holes.
dd if=/dev/zero of="$file" bs=1M count=$size_mb conv=notrunc status=none
cat > "$work/bench.toml" <<TOML
[daemon]
data_dir = "$work"
[[bdev]]
method = "bdev_uring_create"
params = { name = "u0", filename = "$file", block_size = 4096 }
TOML
mask=$(printf '0x%x' $((1 << cpu)))
direct=$(python3 - "$file" <<'PY'
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT); os.close(fd); print(1)
except OSError:
    print(0)
PY
)
echo "tmpfs file $file, ${size_mb} MiB, 4 KiB I/O, depth $qd, ${secs}s, CPU $cpu, O_DIRECT=$direct"
printf '%-10s %12s %12s %8s\n' workload tidemark fio ratio
for w in randread randwrite; do
  t=$(target/release/bdevperf -c "$work/bench.toml" -b u0 -q "$qd" -o 4096 -w $w -t "$secs" -m "$mask" --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["iops"]))')
  f=$(taskset -c "$cpu" fio --name=b --filename="$file" --ioengine=io_uring --direct="$direct" --rw=$w --bs=4k --iodepth="$qd" \
      --runtime="$secs" --time_based --fixedbufs --registerfiles --hipri=0 --output-format=json 2>/dev/null \
      | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(int(j['read']['iops'] + j['write']['iops']))")
  printf '%-10s %12s %12s %8s\n' $w "$t" "$f" "$(python3 -c "print(f'{$t/$f:.2f}')")"
done
