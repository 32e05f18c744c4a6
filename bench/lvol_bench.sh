#!/usr/bin/env bash
# Volume pool (lvol, issue #14) benchmarks, every figure a ratio against a peer measured in the
# same run: tidemarkd on CPU 0 (busy polling) with a pool on a RAM bdev (4 KiB blocks, 1 MiB
# clusters), driven over loopback NVMe/TCP by tidemark's nvme_perf on CPU 1, A and B runs
# alternating (A B A B ..., PAIRS pairs); medians and per-pair ratios.
#
#   bench/lvol_bench.sh [seconds per run] [pairs]
#
# Defaults: 3 s per run, 3 pairs (about 3 minutes). BENCH_VOL_MIB=1024 sizes the volumes (the
# pool is 4x that, plus a raw RAM bdev of that size: about 5 GiB of RAM at most).
# BENCH_TARGET_CPU=0 BENCH_INITIATOR_CPU=1. BENCH_SKIP_BUILD=1 reuses target/release binaries.
# Rows (goals from issue #14):
#   1. 4 KiB random writes QD32 on a fully allocated thin volume / on a raw RAM bdev of the
#      same size exported the same way (goal >= 0.95)
#   2. first writes / writes to allocated clusters: 4 KiB writes QD32, one per 1 MiB cluster
#      (`nvme_perf --stride 1048576 --once`: one pass, BENCH_VOL_MIB writes) on a fresh thin
#      volume / the same pattern for the whole timed run (passes over and over) on the
#      allocated volume
#   3. first writes to a clone / plain writes: the same pattern on a fresh clone of a snapshot
#      of a fully allocated volume (every write copies its cluster) / on the allocated volume
#      (goal >= 0.85)
#  3b. the run-level view: 4 KiB random writes QD32 for the whole run on a fresh clone / on the
#      allocated volume (the clone's first writes copy, the later ones do not)
#   4. p99.9 of 4 KiB random writes QD32 in the second after `bdev_lvol_snapshot` of the volume
#      being written / in the same second of a run without a snapshot (goal <= 1.5); the
#      snapshot is deleted after each run
#   5. bdev_lvol_snapshot and bdev_lvol_clone RPC times (client-side round trip on one socket)
#      on an idle 1 TiB thin volume / on an idle 1 GiB one (goal: under 5 ms, ratio ~1)
#   6. metadata RAM: daemon RSS growth per allocated MiB (a 32 GiB thin volume of a second
#      pool, on a null bdev so that no data is resident, gets one 4 KiB write per cluster,
#      after another one did, so that one-time costs are left out) and per empty 1 GiB thin
#      volume (200 created) (goal: <= 64 bytes per allocated MiB)
# QoS (issue #14's other benchmark) is bench/qos_bench.sh. SPDK's lvol rows are not measured
# here yet: with SPDK_DIR set the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
pairs=${2:-3}
tcpu=${BENCH_TARGET_CPU:-0}
icpu=${BENCH_INITIATOR_CPU:-1}
vol_mib=${BENCH_VOL_MIB:-1024}
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin nvme_perf

work=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-lvol-bench.XXXXXX")
tm_pid=""
cleanup() {
  if [[ -n $tm_pid ]] && kill -0 "$tm_pid" 2>/dev/null; then
    kill -TERM "$tm_pid" 2>/dev/null || true
    wait "$tm_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nqn=nqn.2016-06.io.tidemark:lvolbench
pool_mib=$((4 * vol_mib + 64))

cat > "$work/tidemark.toml" <<TOML
[daemon]
data_dir = "$work"
buffer_pool_mb = 64
[[bdev]]
method = "bdev_malloc_create"
params = { name = "Malloc0", num_blocks = $((pool_mib * 256)), block_size = 4096 }
[[bdev]]
method = "bdev_malloc_create"
params = { name = "Raw0", num_blocks = $((vol_mib * 256)), block_size = 4096 }
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "$nqn", allow_any_host = true, serial_number = "TM0001", max_namespaces = 32 }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "$nqn", namespace = { bdev_name = "Raw0", nsid = 1 } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "$nqn", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "$port" } }
TOML
target/release/tidemarkd -c "$work/tidemark.toml" --cpumask "$(printf '0x%x' $((1 << tcpu)))" --poll-mode busy \
  --rpc-socket "$work/tidemark.sock" --metrics "" --data-dir "$work" > "$work/tidemarkd.log" 2>&1 &
tm_pid=$!
for _ in $(seq 200); do [[ -S $work/tidemark.sock ]] && break; sleep 0.05; done
[[ -S $work/tidemark.sock ]] || { echo "tidemarkd did not start"; cat "$work/tidemarkd.log"; exit 1; }

echo "tidemarkd (pid $tm_pid) on CPU $tcpu, nvme_perf on CPU $icpu, loopback NVMe/TCP port $port"
echo "pool pool0 on a ${pool_mib} MiB RAM bdev (4 KiB blocks, 1 MiB clusters); volumes of ${vol_mib} MiB; ${secs}s per timed run, $pairs pairs"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
if [[ -n ${SPDK_DIR:-} ]]; then
  echo "SPDK lvol rows: SKIPPED (SPDK_DIR=$SPDK_DIR is set, but this script does not drive SPDK's lvol yet)"
else
  echo "SPDK lvol rows: SKIPPED (SPDK_DIR is not set)"
fi

export LB_SECS=$secs LB_PAIRS=$pairs LB_IMASK=$(printf '0x%x' $((1 << icpu))) LB_NQN=$nqn LB_PORT=$port
export LB_WORK=$work LB_PID=$tm_pid LB_VOL_MIB=$vol_mib
python3 - <<'PY'
import json, os, socket, statistics, subprocess, sys, time

E = os.environ
secs, pairs, imask, nqn, port = int(E["LB_SECS"]), int(E["LB_PAIRS"]), E["LB_IMASK"], E["LB_NQN"], E["LB_PORT"]
work, pid, vol_mib = E["LB_WORK"], int(E["LB_PID"]), int(E["LB_VOL_MIB"])
MIB = 1 << 20
med = statistics.median

class Rpc:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.id = 0
        self.dec = json.JSONDecoder()

    def __call__(self, method, **params):
        self.id += 1
        self.s.sendall(json.dumps({"jsonrpc": "2.0", "id": self.id, "method": method, "params": params}).encode())
        buf = ""
        while True:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                sys.exit(f"rpc {method}: connection closed")
            buf += chunk.decode()
            try:
                obj, _ = self.dec.raw_decode(buf.lstrip())
                break
            except ValueError:
                continue
        if "error" in obj:
            sys.exit(f"rpc {method} {params}: {obj['error']}")
        return obj["result"]

    def timed(self, method, **params):
        t = time.perf_counter()
        r = self(method, **params)
        return r, (time.perf_counter() - t) * 1e3

rpc = Rpc(f"{work}/tidemark.sock")

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

def perf(nsid, w, size=4096, qd=32, t=None, stride=None, once=False, lat_log=None, on_start=None):
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn}"
    cmd = ["target/release/nvme_perf", "-c", imask, "--json", "-r", trid, "-n", str(nsid), "-q", str(qd),
           "-o", str(size), "-w", w, "-t", str(t or secs)]
    if stride:
        cmd += ["--stride", str(stride)]
    if once:
        cmd += ["--once"]
    if lat_log:
        cmd += ["--lat-log", lat_log]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, extra = [], None
    for line in p.stdout:
        out.append(line)
        if line.strip() == "started" and on_start:
            extra = on_start()
    rc = p.wait()
    js = [l for l in out if l.startswith("{")]
    if rc != 0 or not js:
        sys.exit(f"nvme_perf {' '.join(cmd[3:])} failed (exit {rc}):\n{''.join(out)}")
    j = json.loads(js[-1])
    j["extra"] = extra
    return j

def add_ns(nsid, bdev):
    rpc("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": bdev, "nsid": nsid})
    time.sleep(0.1)

def remove_ns(nsid):
    rpc("nvmf_subsystem_remove_ns", nqn=nqn, nsid=nsid)
    time.sleep(0.1)

def lvol(name):
    return next(v for v in rpc("bdev_lvol_get_lvols", lvs_name="pool0") if v["name"] == name)

def create(name, mib):
    return rpc("bdev_lvol_create", lvs_name="pool0", lvol_name=name, size_in_mib=mib, thin_provision=True, clear_method="none")

def r(a, b):
    return a / b if a and b else float("nan")

rows = []
def row(label, a_name, b_name, a, b, unit, fmt="{:.0f}", goal=""):
    ma, mb = med(a), med(b)
    per = " ".join(f"{r(x, y):.2f}" for x, y in zip(a, b))
    rows.append((label, fmt.format(ma) + " " + unit, fmt.format(mb) + " " + unit, f"{r(ma, mb):.2f}", per, goal))
    print(f"  {label}: {a_name} {fmt.format(ma)} / {b_name} {fmt.format(mb)} {unit} = {r(ma, mb):.2f}   per pair: {per}   {goal}", flush=True)

rpc("framework_wait_init")
rpc("bdev_lvol_create_lvstore", bdev_name="Malloc0", lvs_name="pool0")

# 6. Metadata RAM, first. A second pool on a null bdev (it keeps no data, so the RSS growth is
# the pool's own): two thin volumes given one 4 KiB write per cluster in turn; the first run
# pays for what any first connection and first writes cost once (queue pair, buffers), the
# RSS growth over the second is counted.
print("\n6. metadata RAM", flush=True)
w_mib = 32 << 10
rpc("bdev_null_create", name="Null0", num_blocks=(2 * w_mib + 1024) * 256, block_size=4096)
rpc("bdev_lvol_create_lvstore", bdev_name="Null0", lvs_name="nullpool")
for n in ("metaA", "metaB"):
    rpc("bdev_lvol_create", lvs_name="nullpool", lvol_name=n, size_in_mib=w_mib, thin_provision=True, clear_method="none")
add_ns(3, "nullpool/metaA")
add_ns(4, "nullpool/metaB")
rss0 = rss_kib()
perf(3, "write", 4096, 32, t=600, stride=MIB, once=True)
time.sleep(0.5)
rss1 = rss_kib()
j = perf(4, "write", 4096, 32, t=600, stride=MIB, once=True)
time.sleep(0.5)
rss2 = rss_kib()
alloc = next(v for v in rpc("bdev_lvol_get_lvols", lvs_name="nullpool") if v["name"] == "metaB")["num_allocated_clusters"]
meta_per_mib = (rss2 - rss1) * 1024 / alloc
print(f"  RSS {rss0} KiB with two empty {w_mib} MiB thin volumes of a pool on a null bdev exported; {rss1} KiB after one 4 KiB write per cluster of the first; "
      f"{rss2} KiB after the same on the second ({alloc} clusters, {j['iops']:.0f} first writes/s): {meta_per_mib:.1f} bytes per allocated MiB "
      f"(goal <= 64)", flush=True)
remove_ns(3)
remove_ns(4)
rpc("bdev_lvol_delete_lvstore", lvs_name="nullpool")
rpc("bdev_null_delete", name="Null0")
nvol = 200
rss3 = rss_kib()
for i in range(nvol):
    create(f"m{i}", 1024)
time.sleep(0.5)
rss4 = rss_kib()
per_vol = (rss4 - rss3) * 1024 / nvol
print(f"  {nvol} empty 1 GiB thin volumes: RSS {rss3} -> {rss4} KiB, {per_vol:.0f} bytes per volume", flush=True)
for i in range(nvol):
    rpc("bdev_lvol_delete", name=f"pool0/m{i}")

# The volumes of rows 1-4: V (written by the A runs), G (the origin of the clones), both filled
# once with 128 KiB writes; the raw bdev gets the same fill so that its pages are resident too.
print("\nsetup: filling the volumes", flush=True)
create("V", vol_mib)
create("G", vol_mib)
add_ns(2, "pool0/V")
add_ns(3, "pool0/G")
for ns in (1, 2, 3):
    perf(ns, "write", 128 << 10, 32, t=600, once=True)
remove_ns(3)
assert lvol("V")["num_allocated_clusters"] == vol_mib and lvol("G")["num_allocated_clusters"] == vol_mib
rpc("bdev_lvol_snapshot", lvol_name="pool0/G", snapshot_name="Gsnap")

print("\n1. 4 KiB random writes QD32: fully allocated thin volume / raw RAM bdev", flush=True)
a, b = [], []
for _ in range(pairs):
    a.append(perf(2, "randwrite")["iops"])
    b.append(perf(1, "randwrite")["iops"])
row("1. randwrite 4K QD32, allocated thin volume / raw bdev", "volume", "raw", a, b, "IOPS", goal="goal >= 0.95")

print(f"\n2. first writes ({vol_mib} clusters of a fresh thin volume, one 4 KiB write each, QD32, one pass) / the same pattern on allocated clusters", flush=True)
a, b, lat_a = [], [], []
for i in range(pairs):
    create(f"F{i}", vol_mib)
    add_ns(3, f"pool0/F{i}")
    j = perf(3, "write", stride=MIB, once=True, t=600)
    a.append(j["iops"])
    lat_a.append(f"{j['ops']} writes in {j['secs'] * 1e3:.0f} ms, latency p50 {j['p50_us']:.0f} us, p99 {j['p99_us']:.0f} us")
    remove_ns(3)
    rpc("bdev_lvol_delete", name=f"pool0/F{i}")
    b.append(perf(2, "write", stride=MIB)["iops"])
print("  first-write runs: " + "; ".join(lat_a))
row("2. first writes / writes to allocated clusters", "first", "allocated", a, b, "IOPS", goal="(no goal)")

print(f"\n3. first writes to a fresh clone of a snapshot (each copies its 1 MiB cluster) / plain writes, same pattern", flush=True)
a, b, lat_a = [], [], []
for i in range(pairs):
    rpc("bdev_lvol_clone", snapshot_name="pool0/Gsnap", clone_name=f"C{i}")
    add_ns(3, f"pool0/C{i}")
    j = perf(3, "write", stride=MIB, once=True, t=600)
    a.append(j["iops"])
    lat_a.append(f"{j['ops']} writes in {j['secs'] * 1e3:.0f} ms, latency p50 {j['p50_us']:.0f} us, p99 {j['p99_us']:.0f} us")
    remove_ns(3)
    rpc("bdev_lvol_delete", name=f"pool0/C{i}")
    b.append(perf(2, "write", stride=MIB)["iops"])
print("  clone first-write runs: " + "; ".join(lat_a))
row("3. first writes to a clone / plain writes", "clone", "plain", a, b, "IOPS", goal="goal >= 0.85")

print(f"\n3b. 4 KiB random writes QD32 for a whole run on a fresh clone (its first writes copy, later ones do not) / on the allocated volume", flush=True)
a, b, copied = [], [], []
for i in range(pairs):
    rpc("bdev_lvol_clone", snapshot_name="pool0/Gsnap", clone_name=f"R{i}")
    add_ns(3, f"pool0/R{i}")
    j = perf(3, "randwrite")
    a.append(j["iops"])
    copied.append(f"{j['ops']} writes (at most {vol_mib} of them copies), p99 {j['p99_us']:.0f} us")
    remove_ns(3)
    rpc("bdev_lvol_delete", name=f"pool0/R{i}")
    b.append(perf(2, "randwrite")["iops"])
print("  clone runs: " + "; ".join(copied))
row("3b. randwrite 4K QD32 over a run, fresh clone / allocated volume", "clone", "plain", a, b, "IOPS", goal="goal >= 0.85 (run-level)")

print("\n4. p99.9 of 4 KiB random writes QD32 in the second after bdev_lvol_snapshot / the same second without", flush=True)
run_t = max(secs, 3)
def window_p999(path, lo_ns, hi_ns):
    lats = []
    with open(path) as f:
        for line in f:
            t, l = line.split()
            if lo_ns <= int(t) < hi_ns:
                lats.append(int(l))
    lats.sort()
    return lats[min(len(lats) - 1, int(len(lats) * 0.999))] / 1e3, len(lats)

a, b, rpc_ms, counts = [], [], [], []
for i in range(pairs):
    log = f"{work}/lat-{i}.log"
    def snap():
        time.sleep(1.0)
        t0 = time.time_ns()
        _, ms = rpc.timed("bdev_lvol_snapshot", lvol_name="pool0/V", snapshot_name=f"S{i}")
        return t0, ms
    j = perf(2, "randwrite", t=run_t, lat_log=log, on_start=snap)
    t0, ms = j["extra"]
    rpc_ms.append(ms)
    lo = t0 - j["start_unix_ns"]
    p, n = window_p999(log, lo, lo + 1_000_000_000)
    a.append(p)
    counts.append(n)
    rpc("bdev_lvol_delete", name=f"pool0/S{i}")
    j = perf(2, "randwrite", t=run_t, lat_log=log)
    p, n = window_p999(log, lo, lo + 1_000_000_000)
    b.append(p)
    counts.append(n)
print(f"  snapshot RPC under this load: {' '.join(f'{x:.2f}' for x in rpc_ms)} ms; writes per window: {' '.join(map(str, counts))}")
row("4. p99.9 in the second after a snapshot / same second without", "after snapshot", "normal", a, b, "us", fmt="{:.0f}", goal="goal <= 1.5")

print("\n5. snapshot and clone RPC times, idle thin volumes of 1 TiB and 1 GiB", flush=True)
create("big", 1 << 20)
create("small", 1024)
res = {("big", "snap"): [], ("big", "clone"): [], ("small", "snap"): [], ("small", "clone"): []}
for i in range(max(pairs, 5)):
    for v in ("big", "small"):
        _, ms = rpc.timed("bdev_lvol_snapshot", lvol_name=f"pool0/{v}", snapshot_name=f"{v}s{i}")
        res[(v, "snap")].append(ms)
        _, ms = rpc.timed("bdev_lvol_clone", snapshot_name=f"pool0/{v}s{i}", clone_name=f"{v}c{i}")
        res[(v, "clone")].append(ms)
        rpc("bdev_lvol_delete", name=f"pool0/{v}c{i}")
        rpc("bdev_lvol_delete", name=f"pool0/{v}s{i}")
for kind in ("snap", "clone"):
    name = "bdev_lvol_snapshot" if kind == "snap" else "bdev_lvol_clone"
    row(f"5. {name} time, 1 TiB / 1 GiB volume", "1 TiB", "1 GiB", res[("big", kind)], res[("small", kind)], "ms", fmt="{:.2f}",
        goal=f"goal < 5 ms: max {max(res[('big', kind)]):.2f} ms")

print("\n| row | A | B | A/B (medians) | per pair | goal |")
print("| --- | --- | --- | --- | --- | --- |")
for x in rows:
    print("| " + " | ".join(x) + " |")
print(f"| 6. metadata RAM | {meta_per_mib:.1f} bytes per allocated MiB | {per_vol:.0f} bytes per empty 1 GiB thin volume | | | goal <= 64 B/MiB |")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
