#!/usr/bin/env bash
# tidemark against SPDK's nvmf_tgt, side by side: both targets on the same core with the same
# 1 GiB RAM bdev (4 KiB blocks), driven in turn (A B A B ..., PAIRS pairs) by SPDK's
# spdk_nvme_perf and by tidemark's nvme_perf on another core, over loopback NVMe/TCP.
# Rows: 4 KiB randread and randwrite at QD 1, 32 and 128, and 128 KiB sequential read and
# write at QD 32. Prints, per client and row, the medians of IOPS, latency p50/p99/p99.9 and
# target CPU per I/O (utime+stime of the target process from /proc/PID/stat over the I/O
# phase, divided by the I/Os), the ratio tidemark / SPDK of every median and of every pair.
#
#   SPDK_DIR=../shared/peers/spdk-v25.09 bench/vs_spdk.sh [seconds per run] [pairs]
#
# Defaults: 3 s per run, 5 pairs (about 15 minutes). BENCH_TARGET_CPU=0 BENCH_INITIATOR_CPU=1.
# Only one target runs at a time: the other is stopped (SIGSTOP) so that it does not poll the
# shared core. BENCH_NICE=1 runs targets and clients at nice -20 for a machine busy with other
# work (not SCHED_FIFO as bench/nvmf_bench.sh does: a spinning SPDK thread at FIFO priority
# starves SPDK's own helper threads pinned beside it, and spdk_nvme_perf never connects). BENCH_ROWS="randread:1 ..."
# picks rows (workload:qd[:size]); BENCH_CLIENTS="spdk_nvme_perf nvme_perf" picks clients.
# Without SPDK (SPDK_DIR unset or without bin/nvmf_tgt and bin/spdk_nvme_perf) it says that
# it skipped and exits 0.
#
# BENCH_TLS=1: NVMe/TCP over TLS 1.3 (TLS_AES_128_GCM_SHA256, one PSK for the host) on both
# targets' secure_channel listeners, driven by spdk_nvme_perf (-S ssl --psk-path); a third
# column runs the same tidemark process through a plain listener, so that the row also gives
# what TLS costs tidemark on one core (tidemark TLS / tidemark plain). Default rows then:
# 4 KiB randread QD32 and 128 KiB sequential read QD32.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
secs=${1:-3}
pairs=${2:-5}
tcpu=${BENCH_TARGET_CPU:-0}
icpu=${BENCH_INITIATOR_CPU:-1}
spdk=${SPDK_DIR:-}
if [[ -z $spdk ]]; then
  echo "vs_spdk: SKIPPED: SPDK_DIR is not set (point it at an SPDK build, e.g. ../shared/peers/spdk-v25.09)"
  exit 0
fi
for f in bin/nvmf_tgt bin/spdk_nvme_perf scripts/rpc.py; do
  if [[ ! -e $spdk/$f ]]; then
    echo "vs_spdk: SKIPPED: SPDK_DIR=$spdk has no $f"
    exit 0
  fi
done
spdk=$(cd "$spdk" && pwd)
tests/spdk/deps.sh
# BENCH_SKIP_BUILD=1 reuses target/release binaries built just before.
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin nvme_perf

work=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-vs-spdk.XXXXXX")
tm_pid=""
sp_pid=""
cleanup() {
  stop_pids "$tm_pid" "$sp_pid"
  rm -rf "$work"
}
trap cleanup EXIT
tm_port=$(free_port)
sp_port=$(free_port)
plain_port=$(free_port)
nqn=nqn.2016-06.io.spdk:cnode1
tls=${BENCH_TLS:-0}
host=nqn.2014-08.org.nvmexpress:uuid:0b0e0c0d-0000-4000-8000-000000000001
plain_host=nqn.2014-08.org.nvmexpress:uuid:0b0e0c0d-0000-4000-8000-000000000002
tmask=$(printf '0x%x' $((1 << tcpu)))
imask=$(printf '0x%x' $((1 << icpu)))
rt=()
[[ ${BENCH_NICE:-0} == 1 ]] && rt=(nice -n -20)

# The host's PSK (interchange form, hash 01: SHA-256 suite), readable by its owner only.
python3 -c 'import base64,zlib,sys; k=bytes(range(32)); sys.stdout.write("NVMeTLSkey-1:01:"+base64.b64encode(k+zlib.crc32(k).to_bytes(4,"little")).decode()+":")' > "$work/psk"
chmod 600 "$work/psk"
if [[ $tls == 1 ]]; then
  tm_listeners=$(cat <<TOML
[[keyring]]
method = "keyring_file_add_key"
params = { name = "psk0", path = "$work/psk" }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", secure_channel = true, listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$tm_port" } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$plain_port" } }
[[nvmf]]
method = "nvmf_subsystem_add_host"
params = { nqn = "$nqn", host = "$host", psk = "psk0" }
[[nvmf]]
method = "nvmf_subsystem_add_host"
params = { nqn = "$nqn", host = "$plain_host" }
TOML
)
  any_host=false
else
  tm_listeners=$(cat <<TOML
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$tm_port" } }
TOML
)
  any_host=true
fi

cat > "$work/tidemark.toml" <<TOML
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
params = { nqn = "$nqn", allow_any_host = $any_host, serial_number = "SPDK0001" }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$nqn", namespace = { bdev_name = "Malloc0", nsid = 1 } }
$tm_listeners
TOML
"${rt[@]}" target/release/tidemarkd -c "$work/tidemark.toml" --cpumask "$tmask" --poll-mode busy --rpc-socket "$work/tidemark.sock" \
  --metrics "" --data-dir "$work" > "$work/tidemarkd.log" 2>&1 &
tm_pid=$!
for _ in $(seq 200); do [[ -S $work/tidemark.sock ]] && break; sleep 0.05; done
[[ -S $work/tidemark.sock ]] || { echo "tidemarkd did not start"; cat "$work/tidemarkd.log"; exit 1; }
kill -STOP "$tm_pid"

# SPDK's target as its README starts it: one core, no hugepages, its default TCP transport.
"${rt[@]}" "$spdk/bin/nvmf_tgt" -m "$tmask" --no-huge -s 2048 --no-pci -r "$work/spdk.sock" > "$work/nvmf_tgt.log" 2>&1 &
sp_pid=$!
for _ in $(seq 200); do [[ -S $work/spdk.sock ]] && break; sleep 0.05; done
[[ -S $work/spdk.sock ]] || { echo "nvmf_tgt did not start"; cat "$work/nvmf_tgt.log"; exit 1; }
rpc() { PYTHONPATH="$spdk/python" python3 "$spdk/scripts/rpc.py" -s "$work/spdk.sock" "$@" > /dev/null; }
rpc framework_wait_init
rpc nvmf_create_transport -t TCP
rpc bdev_malloc_create -b Malloc0 1024 4096
if [[ $tls == 1 ]]; then
  rpc nvmf_create_subsystem "$nqn" -s SPDK0001
  rpc nvmf_subsystem_add_ns "$nqn" Malloc0
  rpc keyring_file_add_key psk0 "$work/psk"
  rpc nvmf_subsystem_add_listener "$nqn" -t tcp -a 127.0.0.1 -s "$sp_port" --secure-channel
  rpc nvmf_subsystem_add_host "$nqn" "$host" --psk psk0
else
  rpc nvmf_create_subsystem "$nqn" -a -s SPDK0001
  rpc nvmf_subsystem_add_ns "$nqn" Malloc0
  rpc nvmf_subsystem_add_listener "$nqn" -t tcp -a 127.0.0.1 -s "$sp_port"
fi
kill -STOP "$sp_pid"

[[ $tls == 1 ]] && echo "TLS 1.3 (TLS_AES_128_GCM_SHA256, PSK) on both targets; tidemark-plain: the same tidemarkd through a plain listener"
echo "tidemark (pid $tm_pid, port $tm_port) vs SPDK nvmf_tgt (pid $sp_pid, port $sp_port): both on CPU $tcpu, one at a time;"
echo "clients on CPU $icpu; 1 GiB RAM bdev, 4 KiB blocks; ${secs}s per run, $pairs pairs per row and client"
[[ ${BENCH_NICE:-0} == 1 ]] && echo "targets and clients at nice -20 (BENCH_NICE=1)"
echo "both targets busy-poll their core, so their CPU per I/O is close to (1 core) / IOPS"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"

export VS_SECS=$secs VS_PAIRS=$pairs VS_IMASK=$imask VS_SPDK=$spdk VS_NQN=$nqn VS_WORK=$work
export VS_TM_PID=$tm_pid VS_SP_PID=$sp_pid VS_TM_PORT=$tm_port VS_SP_PORT=$sp_port
export VS_RT="${rt[*]}" VS_ROWS=${BENCH_ROWS:-} VS_CLIENTS=${BENCH_CLIENTS:-}
export VS_TLS=$tls VS_PLAIN_PORT=$plain_port VS_HOST=$host VS_PLAIN_HOST=$plain_host
python3 - <<'PY'
import os, re, signal, statistics, subprocess, sys, time, json

E = os.environ
secs, pairs, imask, spdk, nqn = int(E["VS_SECS"]), int(E["VS_PAIRS"]), E["VS_IMASK"], E["VS_SPDK"], E["VS_NQN"]
rt = E["VS_RT"].split()
tls = E["VS_TLS"] == "1"
# Each target: its process, port, host NQN and whether the connection is TLS.
targets = {"tidemark": (int(E["VS_TM_PID"]), E["VS_TM_PORT"], E["VS_HOST"], tls), "spdk": (int(E["VS_SP_PID"]), E["VS_SP_PORT"], E["VS_HOST"], tls)}
if tls:
    targets["tidemark-plain"] = (int(E["VS_TM_PID"]), E["VS_PLAIN_PORT"], E["VS_PLAIN_HOST"], False)
rows = [r.split(":") for r in E["VS_ROWS"].split()] or ([["randread", "32"], ["read", "32", "131072"]] if tls else [
    ["randread", "1"], ["randread", "32"], ["randread", "128"],
    ["randwrite", "1"], ["randwrite", "32"], ["randwrite", "128"],
    ["read", "32", "131072"], ["write", "32", "131072"],
])
rows = [(r[0], int(r[1]), int(r[2]) if len(r) > 2 else 4096) for r in rows]
# tidemark's nvme_perf has no TLS: over TLS, SPDK's host only.
clients = E["VS_CLIENTS"].split() or (["spdk_nvme_perf"] if tls else ["spdk_nvme_perf", "nvme_perf"])
TCK = os.sysconf("SC_CLK_TCK")

def cpu_ticks(pid):
    # Fields after the command name: utime and stime are the 12th and 13th (stat fields 14, 15).
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])

def command(client, port, host, secure, w, qd, size):
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn} hostnqn:{host}"
    common = ["-q", str(qd), "-o", str(size), "-w", w, "-t", str(secs), "-r", trid]
    if client == "spdk_nvme_perf":
        # -L: latency percentiles; started I/O is announced by "Launching workers" (stdbuf:
        # line by line, so that the CPU samples are taken when the lines are printed).
        ssl = ["-S", "ssl", "--psk-path", f"{E['VS_WORK']}/psk"] if secure else []
        return rt + ["stdbuf", "-oL", f"{spdk}/bin/spdk_nvme_perf", "-c", imask, "--no-huge", "-s", "1024", "-L"] + ssl + common, "Launching workers"
    return rt + ["target/release/nvme_perf", "-c", imask, "--json"] + common, None

def run(target, client, w, qd, size):
    pid, port, host, secure = targets[target]
    for other in {t[0] for t in targets.values()} - {pid}:
        os.kill(other, signal.SIGSTOP)
    os.kill(pid, signal.SIGCONT)
    time.sleep(0.2)
    cmd, marker = command(client, port, host, secure, w, qd, size)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = (time.monotonic(), cpu_ticks(pid)) if marker is None else None
    end = None
    out = []
    for line in p.stdout:
        out.append(line)
        if marker and marker in line and start is None:
            start = (time.monotonic(), cpu_ticks(pid))
        # The results are printed when the workers are done, before the host disconnects.
        if end is None and (line.startswith("Total") or line.startswith("{")):
            end = (time.monotonic(), cpu_ticks(pid))
    rc = p.wait()
    os.kill(pid, signal.SIGSTOP)
    text = "".join(out)
    if rc != 0 or start is None or end is None:
        sys.exit(f"{client} against {target} ({w} QD{qd} {size} B) failed (exit {rc}):\n{text}")
    if client == "spdk_nvme_perf":
        tot = [float(x) for x in re.search(r"^Total\s*:\s*(.*)$", text, re.M).group(1).split()]
        iops = tot[0]
        pct = dict((float(a), float(b)) for a, b in re.findall(r"^\s*([\d.]+)%\s*:\s*([\d.]+)us", text, re.M))
        lat = (pct.get(50.0), pct.get(99.0), pct.get(99.9))
    else:
        j = json.loads([l for l in out if l.startswith("{")][-1])
        iops, lat = j["iops"], (j["p50_us"], j["p99_us"], j["p999_us"])
    ios = iops * secs
    cpu_us = (end[1] - start[1]) * 1e6 / TCK / ios if ios else float("nan")
    return {"iops": iops, "lat": lat, "cpu": cpu_us}

med = statistics.median
def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"
def f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"

def prefill():
    """Every block of tidemark's RAM bdev written once before the rows: its memory is mapped
    lazily (untouched blocks cost nothing), SPDK's is zeroed when the bdev is made, so without
    this the write rows would charge tidemark a page fault per first write, no steady state.
    Through the plain listener (tidemark's nvme_perf has no TLS), 128 KiB sequential writes."""
    pid, port, host, _ = targets["tidemark-plain" if tls else "tidemark"]
    for other in {t[0] for t in targets.values()} - {pid}:
        os.kill(other, signal.SIGSTOP)
    os.kill(pid, signal.SIGCONT)
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn} hostnqn:{host}"
    p = subprocess.run(rt + ["target/release/nvme_perf", "-c", imask, "-q", "32", "-o", "131072", "-w", "write", "-t", "120", "--once", "-r", trid],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"prefill of tidemark's namespace failed (exit {p.returncode}):\n{p.stdout[-3000:]}")
    print("tidemark's RAM bdev prefilled (every block written once; SPDK's is zeroed at creation)", flush=True)

prefill()
for client in clients:
    print(f"\n== client: {client} (tidemark / SPDK nvmf_tgt; ratios > 1 mean tidemark is ahead on IOPS, behind on latency and CPU)")
    print(f"{'row':<18} {'tm IOPS':>9} {'spdk IOPS':>9} {'ratio':>6}  {'per-pair IOPS ratios':<36} {'tm lat p50/p99/p99.9 us':>24} {'spdk lat p50/p99/p99.9 us':>26} {'lat ratios':>17} {'tm CPU us/IO':>12} {'spdk CPU us/IO':>14} {'ratio':>6}")
    for (w, qd, size) in rows:
        res = {t: [] for t in targets}
        for _ in range(pairs):
            for t in targets:
                res[t].append(run(t, client, w, qd, size))
        m = {}
        for t, rs in res.items():
            lats = [r["lat"] for r in rs if None not in r["lat"]]
            m[t] = {
                "iops": med(r["iops"] for r in rs),
                "lat": tuple(med(l[i] for l in lats) for i in range(3)) if lats else (None, None, None),
                "cpu": med(r["cpu"] for r in rs),
            }
        per_pair = [ratio(a["iops"], b["iops"]) for a, b in zip(res["tidemark"], res["spdk"])]
        tm, sp = m["tidemark"], m["spdk"]
        lat_r = "/".join(ratio(a, b) for a, b in zip(tm["lat"], sp["lat"]))
        label = f"{w} QD{qd}" + ("" if size == 4096 else f" {size // 1024}K")
        print(f"{label:<18} {tm['iops']:>9.0f} {sp['iops']:>9.0f} {ratio(tm['iops'], sp['iops']):>6}  {' '.join(per_pair):<36} "
              f"{'/'.join(f(x) for x in tm['lat']):>24} {'/'.join(f(x) for x in sp['lat']):>26} {lat_r:>17} "
              f"{tm['cpu']:>12.2f} {sp['cpu']:>14.2f} {ratio(tm['cpu'], sp['cpu']):>6}", flush=True)
        if "tidemark-plain" in m:
            pl = m["tidemark-plain"]
            print(f"{'':<18} tidemark plain {pl['iops']:.0f} IOPS, {pl['cpu']:.2f} CPU us/IO: TLS / plain IOPS {ratio(tm['iops'], pl['iops'])}, "
                  f"CPU per I/O {ratio(tm['cpu'], pl['cpu'])}; per pair {' '.join(ratio(a['iops'], b['iops']) for a, b in zip(res['tidemark'], res['tidemark-plain']))}", flush=True)
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
# The RAM bdevs' page size weighs on random I/O (a TLB miss per 4 KiB page touched): tidemark's
# asks for transparent huge pages, SPDK's --no-huge memory takes what the kernel's THP mode gives.
thp() { awk '/AnonHugePages/ {print $2 / 1024 " MiB"}' "/proc/$1/smaps_rollup" 2>/dev/null || echo "?"; }
echo "transparent huge pages in use (THP mode: $(grep -o '\[[a-z]*\]' /sys/kernel/mm/transparent_hugepage/enabled)): tidemark $(thp "$tm_pid"), SPDK $(thp "$sp_pid")"
