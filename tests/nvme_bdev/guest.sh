#!/bin/bash
# Runs inside the QEMU test guest (tests/guest/run.sh) with an emulated NVMe drive (ng0n1,
# 4 KiB blocks) and, for the refusal check, a second namespace with metadata. /share holds the
# release binaries. Prints one `RESULT key=value` line per figure for the host test to check.
set -euo pipefail
. /tidemark/lib.sh
BIN=/share
secs=${NVME_BENCH_SECS:-3}
ls -l /dev/ng* /dev/nvme*
pq=$(cat /sys/module/nvme/parameters/poll_queues)
echo "nvme poll_queues=$pq"

# The host attaches the data namespace first (nsid 1) and the metadata one second.
ng=/dev/ng0n1

mkdir -p /tmp/tm
cat > /tmp/nvme.toml <<TOML
[daemon]
data_dir = "/tmp/tm"
buffer_pool_mb = 8
[[bdev]]
method = "bdev_nvme_passthru_create"
params = { name = "nvme0n1", filename = "$ng" }
TOML

# 1. Data integrity through the passthrough path (write, read back, compare).
$BIN/bdevperf -c /tmp/nvme.toml -b nvme0n1 -q 16 -o 4096 -w verify -t "$secs" -m 0x1 --poll-mode adaptive
echo "RESULT verify=ok"
# Large transfers are split at the drive's MDTS.
$BIN/bdevperf -c /tmp/nvme.toml -b nvme0n1 -q 4 -o 1048576 -w verify -t 2 -m 0x1 --poll-mode adaptive
echo "RESULT verify_1m=ok"

# 2. Figures: the nvme bdev against fio's io_uring_cmd engine on the same device (TCG: only
#    the ratio means anything, and little).
for w in randread randwrite; do
  t=$($BIN/bdevperf -c /tmp/nvme.toml -b nvme0n1 -q 32 -o 4096 -w $w -t "$secs" -m 0x1 --json | sed -n 's/.*"iops":\([0-9.]*\).*/\1/p')
  f=$(fio --name=f --filename="$ng" --ioengine=io_uring_cmd --cmd_type=nvme --rw=$w --bs=4k --iodepth=32 \
        --runtime="$secs" --time_based --output-format=terse --terse-version=3 2>/dev/null \
      | awk -F';' -v w=$w '{ print (w == "randread") ? $8 : $49 }')
  echo "RESULT ${w}_tidemark=${t%.*} ${w}_fio=${f}"
done

# 3. The daemon: the bdev exported over NVMe/TCP on the guest's loopback, its Identify data,
#    refusals of bad devices, then the guest's kernel initiator + fio verify through it.
NQN=nqn.2016-06.io.tidemark:nvme0
cat /tmp/nvme.toml > /tmp/export.toml
cat >> /tmp/export.toml <<TOML
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "$NQN", allow_any_host = true, serial_number = "TMNVME0001" }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$NQN", namespace = { bdev_name = "nvme0n1", nsid = 1 } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$NQN", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "4420" } }
TOML
$BIN/tidemarkd --config /tmp/export.toml -r /tmp/tm.sock --metrics "" >/tmp/tm.log 2>&1 &
pid=$!
for i in $(seq 50); do [ -S /tmp/tm.sock ] && break; sleep 0.1; done
$BIN/tidemark -s /tmp/tm.sock bdev_get_bdevs --name nvme0n1 | tee /tmp/bdev.json
grep -q '"passthrough": true' /tmp/bdev.json
grep -q '"model_number": "QEMU NVMe Ctrl"' /tmp/bdev.json
# Polled completions only where the kernel polls passthrough commands safely (6.5 on).
case "$(uname -r)" in [0-5].*|6.[0-4].*) want=interrupt ;; *) want=polled ;; esac
grep -q "\"completions\": \"$want\"" /tmp/bdev.json
echo "RESULT identify=ok"
# A namespace with metadata is refused with a clear error, and nothing else changes.
meta=""
for d in /dev/ng*n*; do [ "$d" != "$ng" ] && meta=$d; done
if [ -n "$meta" ]; then
  if out=$($BIN/tidemark -s /tmp/tm.sock bdev_nvme_passthru_create --name bad --filename "$meta" 2>&1); then
    echo "FAIL: a namespace with metadata was accepted"; kill $pid; exit 1
  fi
  echo "$out"
  echo "$out" | grep -q metadata
  echo "RESULT refuse_metadata=ok"
fi
if $BIN/tidemark -s /tmp/tm.sock bdev_nvme_passthru_create --name bad2 --filename /dev/null 2>/tmp/err; then
  echo "FAIL: /dev/null was accepted"; kill $pid; exit 1
fi
grep -q "not an NVMe generic device" /tmp/err
echo "RESULT refuse_not_nvme=ok"
modprobe nvme-tcp
wait_tcp 127.0.0.1 4420 30
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN"
dev=$(nvme_ns_dev "$NQN" 20)
echo "kernel initiator: $NQN is $dev"
# Writes 64 MiB of checksummed blocks at depth 32, then reads every one back and checks it.
fio --name=verify --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
    --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
grep -E "IOPS|verify" /tmp/fio.out | head -5
echo "RESULT nvmf_fio_verify=ok"
nvme disconnect -n "$NQN"
kill -TERM $pid
wait $pid
echo "RESULT daemon_exit=ok"

# 4. The drive disappears under load (PCI hot-remove): I/O fails, the bdev goes offline,
#    nothing hangs.
pci=$(basename "$(readlink -f /sys/class/nvme/nvme0/device)")
set +e
timeout 90 $BIN/bdevperf -c /tmp/nvme.toml -b nvme0n1 -q 16 -o 4096 -w randwrite -t 15 -m 0x1 --poll-mode adaptive &
perf=$!
# Remove the drive once bdevperf has it open and I/O runs (startup is slow under TCG).
for i in $(seq 300); do ls -l /proc/$perf/fd 2>/dev/null | grep -q ng0n1 && break; sleep 0.1; done
sleep 1
echo "removing PCI device $pci under load"
echo 1 > /sys/bus/pci/devices/$pci/remove
wait $perf
rc=$?
set -e
echo "bdevperf after hot-remove: exit $rc"
[ "$rc" = 2 ] || { echo "FAIL: expected I/O errors (exit 2) after the drive vanished, got $rc"; exit 1; }
echo "RESULT hot_remove=ok"
