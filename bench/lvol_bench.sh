#!/usr/bin/env bash
# Volume pool (lvol, issue #14) benchmarks, every figure a ratio against a peer measured in the
# same run: tidemarkd on CPU 0 (busy polling) with a pool on a RAM bdev (4 KiB blocks, 1 MiB
# clusters), driven over loopback NVMe/TCP by tidemark's nvme_perf on CPU 1, A and B runs
# alternating (A B A B ..., PAIRS pairs); medians and per-pair ratios.
#
#   bench/lvol_bench.sh [seconds per run] [pairs]
#   SPDK_DIR=/work/shared/peers/spdk-v25.09 bench/lvol_bench.sh [seconds per run] [pairs]
#
# Defaults: 3 s per run, 3 pairs (about 3 minutes; about 5 with SPDK). BENCH_VOL_MIB=1024 sizes
# the volumes (the pool is 4x that, plus a raw RAM bdev of that size: about 5 GiB of RAM at
# most, twice that with SPDK). BENCH_TARGET_CPU=0 BENCH_INITIATOR_CPU=1. BENCH_SKIP_BUILD=1
# reuses target/release binaries.
#
# With SPDK_DIR (an SPDK build with bin/nvmf_tgt; see ../shared/peers/README.md) every row but
# 6 is also measured on SPDK's nvmf_tgt with SPDK's lvol store, set up the same way: one core
# (-m of BENCH_TARGET_CPU), a malloc bdev of the same size and block size,
# bdev_lvol_create_lvstore with the same cluster size, thin volumes, bdev_lvol_snapshot and
# bdev_lvol_clone, exported on the same NQN layout and driven by the same nvme_perf commands.
# Both targets live for the whole run and take turns on the shared core: the idle one is
# stopped (SIGSTOP), as in bench/vs_spdk.sh. Each pair is then tidemark A, tidemark B, SPDK A,
# SPDK B; every row prints each target's ratio and tidemark / SPDK of each absolute median.
# Rows 1 and 3b are also driven by SPDK's spdk_nvme_perf (on both targets) when SPDK_DIR has
# bin/spdk_nvme_perf. Without SPDK_DIR the script says that it skipped SPDK's rows.
#
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
#  2b. (tidemark only, timed in row 6's two passes) first writes/s while a 64 GiB pool on a null
#      bdev fills from half to full / while it fills from empty to half: ~1 when a commit's cost
#      does not grow with what the pool holds
#  3b. the run-level view: 4 KiB random writes QD32 for the whole run on a fresh clone / on the
#      allocated volume (the clone's first writes copy, the later ones do not)
#   4. p99.9 of 4 KiB random writes QD32 in the second after `bdev_lvol_snapshot` of the volume
#      being written / in the same second of a run without a snapshot (goal <= 1.5); the
#      snapshot is deleted after each run
#   5. bdev_lvol_snapshot and bdev_lvol_clone RPC times (client-side round trip on one socket)
#      on an idle 1 TiB thin volume / on an idle 1 GiB one (goal: under 5 ms, ratio ~1)
#   6. metadata RAM (tidemark only): daemon RSS growth per allocated MiB (a 32 GiB thin volume
#      of a second pool, on a null bdev so that no data is resident, gets one 4 KiB write per
#      cluster, after another one did, so that one-time costs are left out) and per empty 1 GiB
#      thin volume (200 created) (goal: <= 64 bytes per allocated MiB); beside it the same
#      growth counted from the store's structures (`metadata_memory_bytes`), which the RSS
#      delta scatters around (allocator arenas, freed record buffers, page granularity)
#   7. a full pool (not timed): a 64 MiB store with 1 MiB clusters; volume A (4 MiB) and C
#      (8 MiB) written whole, then a thin volume B as large as the store written whole with
#      128 KiB writes until the store is full; then, in the full store, 4 KiB random writes to
#      A's allocated clusters and reads of B for 1 s each (how many succeed, how many fail);
#      then C is deleted and a new 4 MiB volume D gets its 4 first writes.
# QoS (issue #14's other benchmark) is bench/qos_bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
pairs=${2:-3}
tcpu=${BENCH_TARGET_CPU:-0}
icpu=${BENCH_INITIATOR_CPU:-1}
vol_mib=${BENCH_VOL_MIB:-1024}
spdk=${SPDK_DIR:-}
spdk_skip=""
if [[ -z $spdk ]]; then
  spdk_skip="SPDK_DIR is not set (point it at an SPDK build, e.g. /work/shared/peers/spdk-v25.09)"
elif [[ ! -x $spdk/bin/nvmf_tgt ]]; then
  spdk_skip="SPDK_DIR=$spdk has no bin/nvmf_tgt"
fi
if [[ -n $spdk_skip ]]; then
  spdk=""
else
  spdk=$(cd "$spdk" && pwd)
  tests/spdk/deps.sh
fi
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin nvme_perf

work=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-lvol-bench.XXXXXX")
tm_pid=""
sp_pid=""
cleanup() {
  local rc=$?
  if [[ $rc != 0 ]]; then
    for f in "$work"/tidemarkd.log "$work"/nvmf_tgt.log; do
      [[ -s $f ]] && { echo "--- last lines of $f:"; tail -n 20 "$f"; }
    done
  fi
  # Only the two targets this script started, by PID.
  stop_pids "$tm_pid" "$sp_pid"
  rm -rf "$work"
}
trap cleanup EXIT
. bench/lib.sh
port=$(free_port)
sp_port=$(free_port)
while [[ $sp_port == "$port" ]]; do sp_port=$(free_port); done
nqn=nqn.2016-06.io.tidemark:lvolbench
pool_mib=$((4 * vol_mib + 64))
tmask=$(printf '0x%x' $((1 << tcpu)))

cat > "$work/tidemark.toml" <<TOML
[daemon]
data_dir = "$work"
buffer_pool_mb = 64
# The script keeps one RPC connection for the whole run, idle while SPDK's turns run (and the
# daemon is stopped): not dropped after the default 30 s.
[rpc]
idle_timeout_ms = 86400000
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
target/release/tidemarkd -c "$work/tidemark.toml" --cpumask "$tmask" --poll-mode busy \
  --rpc-socket "$work/tidemark.sock" --metrics "" --data-dir "$work" > "$work/tidemarkd.log" 2>&1 &
tm_pid=$!
for _ in $(seq 200); do [[ -S $work/tidemark.sock ]] && break; sleep 0.05; done
[[ -S $work/tidemark.sock ]] || { echo "tidemarkd did not start"; cat "$work/tidemarkd.log"; exit 1; }

if [[ -n $spdk ]]; then
  # SPDK's target as ../shared/peers/README.md starts it: one core, no hugepages, its own RPC
  # socket; its memory holds both malloc bdevs (the buffers of the RAM bdevs come from it).
  "$spdk/bin/nvmf_tgt" -m "$tmask" --no-huge -s $((pool_mib + vol_mib + 1024)) --no-pci -r "$work/spdk.sock" > "$work/nvmf_tgt.log" 2>&1 &
  sp_pid=$!
  for _ in $(seq 400); do [[ -S $work/spdk.sock ]] && break; sleep 0.05; done
  [[ -S $work/spdk.sock ]] || { echo "nvmf_tgt did not start"; cat "$work/nvmf_tgt.log"; exit 1; }
fi

echo "tidemarkd (pid $tm_pid) on CPU $tcpu, nvme_perf on CPU $icpu, loopback NVMe/TCP port $port"
echo "pool pool0 on a ${pool_mib} MiB RAM bdev (4 KiB blocks, 1 MiB clusters); volumes of ${vol_mib} MiB; ${secs}s per timed run, $pairs pairs"
if [[ -n $spdk ]]; then
  echo "SPDK lvol rows: SPDK nvmf_tgt (pid $sp_pid, $spdk) on CPU $tcpu, port $sp_port, the same pool and volumes; the idle target is stopped (SIGSTOP)"
else
  echo "SPDK lvol rows: SKIPPED: $spdk_skip"
fi
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"

export LB_SECS=$secs LB_PAIRS=$pairs LB_IMASK=$(printf '0x%x' $((1 << icpu))) LB_NQN=$nqn LB_PORT=$port
export LB_WORK=$work LB_PID=$tm_pid LB_VOL_MIB=$vol_mib LB_POOL_MIB=$pool_mib
export LB_SPDK=$spdk LB_SP_PID=$sp_pid LB_SP_PORT=$sp_port
python3 - <<'PY'
import json, os, re, signal, socket, statistics, subprocess, sys, time

E = os.environ
secs, pairs, imask, nqn = int(E["LB_SECS"]), int(E["LB_PAIRS"]), E["LB_IMASK"], E["LB_NQN"]
work, vol_mib, pool_mib = E["LB_WORK"], int(E["LB_VOL_MIB"]), int(E["LB_POOL_MIB"])
spdk = E["LB_SPDK"]
MIB = 1 << 20
med = statistics.median

class Rpc:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.id = 0
        self.dec = json.JSONDecoder()

    def call(self, method, params):
        self.id += 1
        msg = {"jsonrpc": "2.0", "id": self.id, "method": method}
        if params:
            msg["params"] = params
        self.s.sendall(json.dumps(msg).encode())
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
        return obj

    def __call__(self, method, **params):
        obj = self.call(method, params)
        if "error" in obj:
            sys.exit(f"rpc {method} {params}: {obj['error']}")
        return obj["result"]

    def timed(self, method, **params):
        t = time.perf_counter()
        r = self(method, **params)
        return r, (time.perf_counter() - t) * 1e3

class Target:
    def __init__(self, name, sock, port, pid):
        self.name, self.port, self.pid = name, port, pid
        self.rpc = Rpc(sock)

tm = Target("tidemark", f"{work}/tidemark.sock", E["LB_PORT"], int(E["LB_PID"]))
targets = [tm]
sp = None
if spdk:
    sp = Target("SPDK", f"{work}/spdk.sock", E["LB_SP_PORT"], int(E["LB_SP_PID"]))
    targets.append(sp)
clients = ["nvme_perf"] + (["spdk_nvme_perf"] if spdk and os.access(f"{spdk}/bin/spdk_nvme_perf", os.X_OK) else [])

# Both targets busy-poll the same core: only the one being measured (or set up) runs.
active = None
def use(t):
    global active
    if active is t:
        return
    for o in targets:
        if o is not t:
            os.kill(o.pid, signal.SIGSTOP)
    os.kill(t.pid, signal.SIGCONT)
    if len(targets) > 1:
        time.sleep(0.2)
    active = t

def rss_kib(t):
    with open(f"/proc/{t.pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

def perf(t, nsid, w, size=4096, qd=32, secs_=None, stride=None, once=False, lat_log=None, on_start=None, allow_errors=False, client="nvme_perf"):
    use(t)
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{t.port} subnqn:{nqn}"
    run_t = secs_ or secs
    if client == "spdk_nvme_perf":
        cmd = [f"{spdk}/bin/spdk_nvme_perf", "-c", imask, "--no-huge", "-s", "1024", "-q", str(qd), "-o", str(size),
               "-w", w, "-t", str(run_t), "-r", f"{trid} ns:{nsid}"]
    else:
        cmd = ["target/release/nvme_perf", "-c", imask, "--json", "-r", trid, "-n", str(nsid), "-q", str(qd),
               "-o", str(size), "-w", w, "-t", str(run_t)]
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
    text = "".join(out)
    if client == "spdk_nvme_perf":
        m = re.search(r"^Total\s*:\s*(\S+)", text, re.M)
        nsids = set(re.findall(r"NSID (\d+)", text))
        if rc != 0 or not m:
            sys.exit(f"spdk_nvme_perf against {t.name} ({' '.join(cmd[5:])}) failed (exit {rc}):\n{text}")
        if nsids and nsids != {str(nsid)}:
            sys.exit(f"spdk_nvme_perf against {t.name} drove namespaces {nsids}, not only {nsid}:\n{text}")
        return {"iops": float(m.group(1)), "extra": extra}
    js = [l for l in out if l.startswith("{")]
    if not js or (rc != 0 and not (allow_errors and rc == 2)):
        sys.exit(f"nvme_perf against {t.name} ({' '.join(cmd[3:])}) failed (exit {rc}):\n{text}")
    j = json.loads(js[-1])
    j["extra"] = extra
    return j

def add_ns(t, nsid, bdev):
    use(t)
    t.rpc("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": bdev, "nsid": nsid})
    time.sleep(0.1)

def remove_ns(t, nsid):
    use(t)
    t.rpc("nvmf_subsystem_remove_ns", nqn=nqn, nsid=nsid)
    time.sleep(0.1)

def lvols(t, lvs="pool0"):
    use(t)
    return t.rpc("bdev_lvol_get_lvols", lvs_name=lvs)

def lvol(t, name, lvs="pool0"):
    return next(v for v in lvols(t, lvs) if v["name"] == name)

def create(t, name, mib, lvs="pool0"):
    use(t)
    return t.rpc("bdev_lvol_create", lvs_name=lvs, lvol_name=name, size_in_mib=mib, thin_provision=True, clear_method="none")

def delete(t, name):
    use(t)
    t.rpc("bdev_lvol_delete", name=name)

def r(a, b):
    return a / b if a and b else float("nan")

rows = []
def row(label, goal, data, unit, fmt="{:.0f}", names=("A", "B")):
    """data: {target name: (A values, B values)}, one value per pair of each."""
    cells = {}
    for tn, (a, b) in data.items():
        ma, mb = med(a), med(b)
        per = " ".join(f"{r(x, y):.2f}" for x, y in zip(a, b))
        cells[tn] = (ma, mb)
        print(f"  {tn:>8}: {names[0]} {fmt.format(ma)} / {names[1]} {fmt.format(mb)} {unit} = {r(ma, mb):.2f}   per pair: {per}", flush=True)
    t_cell = lambda tn: f"{fmt.format(cells[tn][0])} / {fmt.format(cells[tn][1])} {unit} = **{r(*cells[tn]):.2f}**" if tn in cells else "-"
    if "SPDK" in cells:
        (ta, tb), (sa, sb) = cells["tidemark"], cells["SPDK"]
        vs = f"{r(ta, sa):.2f} / {r(tb, sb):.2f}"
        print(f"  tidemark/SPDK: {names[0]} {vs.split(' / ')[0]}, {names[1]} {vs.split(' / ')[1]}   {goal}", flush=True)
    else:
        vs = "-"
        print(f"  {goal}", flush=True)
    rows.append((label, t_cell("tidemark"), t_cell("SPDK") if sp else "not measured", vs, goal))

def each_pair(fn):
    """Runs fn(target, i) for each pair i and target in turn (tidemark, SPDK, tidemark, ...);
    fn returns (A, B) of that pair. Returns {target name: ([A...], [B...])}."""
    res = {t.name: ([], []) for t in targets}
    for i in range(pairs):
        for t in targets:
            a, b = fn(t, i)
            res[t.name][0].append(a)
            res[t.name][1].append(b)
    return res

# Setup of SPDK's side, the same as tidemark's configuration file: TCP, the raw bdev as NSID 1.
if sp:
    use(sp)
    sp.rpc("framework_wait_init")
    sp.rpc("nvmf_create_transport", trtype="TCP")
    sp.rpc("bdev_malloc_create", name="Malloc0", num_blocks=pool_mib * 256, block_size=4096)
    sp.rpc("bdev_malloc_create", name="Raw0", num_blocks=vol_mib * 256, block_size=4096)
    sp.rpc("nvmf_create_subsystem", nqn=nqn, allow_any_host=True, serial_number="SPDK0001", max_namespaces=32)
    sp.rpc("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": "Raw0", "nsid": 1})
    sp.rpc("nvmf_subsystem_add_listener", nqn=nqn, listen_address={"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": sp.port})
for t in targets:
    use(t)
    t.rpc("framework_wait_init")
    t.rpc("bdev_lvol_create_lvstore", bdev_name="Malloc0", lvs_name="pool0", cluster_sz=MIB)
use(tm)

# 6. Metadata RAM, first (tidemark only: SPDK's memory is its preallocated --no-huge region).
# A second pool on a null bdev (it keeps no data, so the RSS growth is the pool's own): two
# thin volumes given one 4 KiB write per cluster in turn; the first run pays for what any first
# connection and first writes cost once (queue pair, buffers), the RSS growth over the second
# is counted.
print("\n6. metadata RAM (tidemark only)", flush=True)
w_mib = 32 << 10
tm.rpc("bdev_null_create", name="Null0", num_blocks=(2 * w_mib + 1024) * 256, block_size=4096)
tm.rpc("bdev_lvol_create_lvstore", bdev_name="Null0", lvs_name="nullpool")
for n in ("metaA", "metaB"):
    create(tm, n, w_mib, "nullpool")
add_ns(tm, 3, "nullpool/metaA")
add_ns(tm, 4, "nullpool/metaB")
rss0 = rss_kib(tm)
ja = perf(tm, 3, "write", 4096, 32, secs_=600, stride=MIB, once=True)
time.sleep(0.5)
rss1 = rss_kib(tm)
# The structural figure beside the RSS one: what the store counts its metadata structures to
# take (bdev_lvol_get_lvstores' metadata_memory_bytes). The RSS delta also holds what the
# allocator keeps of freed buffers (whole records are encoded whenever the log area of a slot
# fills), page granularity and per-thread arenas, so it scatters around the structural figure.
def meta_bytes():
    return tm.rpc("bdev_lvol_get_lvstores", lvs_name="nullpool")[0].get("metadata_memory_bytes")
mem1 = meta_bytes()
j = perf(tm, 4, "write", 4096, 32, secs_=600, stride=MIB, once=True)
time.sleep(0.5)
rss2 = rss_kib(tm)
mem2 = meta_bytes()
alloc = lvol(tm, "metaB", "nullpool")["num_allocated_clusters"]
meta_per_mib = (rss2 - rss1) * 1024 / alloc
struct_cell = f"{(mem2 - mem1) / alloc:.1f} bytes per allocated MiB counted from the structures ({mem2} bytes in all)" if mem1 is not None and mem2 is not None else "structural figure not reported"
print(f"  RSS {rss0} KiB with two empty {w_mib} MiB thin volumes of a pool on a null bdev exported; {rss1} KiB after one 4 KiB write per cluster of the first; "
      f"{rss2} KiB after the same on the second ({alloc} clusters, {j['iops']:.0f} first writes/s): {meta_per_mib:.1f} bytes per allocated MiB by RSS, "
      f"{struct_cell} (goal <= 64)", flush=True)
# 2b. The same passes timed: first writes while the pool fills from half to full / while it
# fills from empty to half. Each first write commits a change of one map; if a commit cost
# grew with what the pool holds (a whole record rewritten), the second half would be slower.
fill_ratio = j["iops"] / ja["iops"]
print(f"  2b. first writes/s filling the {2 * w_mib} MiB pool from half to full: {j['iops']:.0f}; from empty to half: {ja['iops']:.0f}; ratio {fill_ratio:.2f}", flush=True)
remove_ns(tm, 3)
remove_ns(tm, 4)
tm.rpc("bdev_lvol_delete_lvstore", lvs_name="nullpool")
tm.rpc("bdev_null_delete", name="Null0")
nvol = 200
rss3 = rss_kib(tm)
for i in range(nvol):
    create(tm, f"m{i}", 1024)
time.sleep(0.5)
rss4 = rss_kib(tm)
per_vol = (rss4 - rss3) * 1024 / nvol
print(f"  {nvol} empty 1 GiB thin volumes: RSS {rss3} -> {rss4} KiB, {per_vol:.0f} bytes per volume", flush=True)
for i in range(nvol):
    delete(tm, f"pool0/m{i}")

# The volumes of rows 1-4: V (written by the A runs), G (the origin of the clones), both filled
# once with 128 KiB writes; the raw bdev gets the same fill so that its pages are resident too.
print("\nsetup: filling the volumes", flush=True)
for t in targets:
    # Every page of the pool's RAM bdev touched once first, through a volume as large as the
    # pool (written once with 128 KiB writes, then deleted): tidemark's malloc memory is mapped
    # on first touch, SPDK's comes preallocated, and without this the first clusters a fresh
    # volume or clone gets cost page faults on tidemark's side only (rows 2 and 3 of the first
    # pairs ran up to 10 times slower than the later ones).
    use(t)
    free = t.rpc("bdev_lvol_get_lvstores", lvs_name="pool0")[0]["free_clusters"]
    create(t, "Warm", free)
    add_ns(t, 3, "pool0/Warm")
    perf(t, 3, "write", 128 << 10, 32, secs_=600, once=True)
    remove_ns(t, 3)
    delete(t, "pool0/Warm")
    create(t, "V", vol_mib)
    create(t, "G", vol_mib)
    add_ns(t, 2, "pool0/V")
    add_ns(t, 3, "pool0/G")
    for ns in (1, 2, 3):
        perf(t, ns, "write", 128 << 10, 32, secs_=600, once=True)
    remove_ns(t, 3)
    got = (lvol(t, "V")["num_allocated_clusters"], lvol(t, "G")["num_allocated_clusters"])
    assert got == (vol_mib, vol_mib), f"{t.name}: allocated clusters of V and G {got}"
    use(t)
    t.rpc("bdev_lvol_snapshot", lvol_name="pool0/G", snapshot_name="Gsnap")

for client in clients:
    print(f"\n1. 4 KiB random writes QD32: fully allocated thin volume / raw RAM bdev ({client})", flush=True)
    res = each_pair(lambda t, i: (perf(t, 2, "randwrite", client=client)["iops"], perf(t, 1, "randwrite", client=client)["iops"]))
    row(f"1. randwrite 4K QD32, allocated thin volume / raw bdev ({client})", "goal >= 0.95", res, "IOPS", names=("volume", "raw"))

print(f"\n2. first writes ({vol_mib} clusters of a fresh thin volume, one 4 KiB write each, QD32, one pass) / the same pattern on allocated clusters", flush=True)
def one_pass_vs_plain(make, what):
    """Each pair: a fresh volume made by make(t, i), one pass of one 4 KiB write per cluster
    (timed), then the same pattern on the allocated volume V; per-run latencies printed."""
    lat_a = {t.name: [] for t in targets}
    def run(t, i):
        use(t)
        name = make(t, i)
        add_ns(t, 3, f"pool0/{name}")
        j = perf(t, 3, "write", stride=MIB, once=True, secs_=600)
        lat_a[t.name].append(f"{j['ops']} writes in {j['secs'] * 1e3:.0f} ms, p50 {j['p50_us']:.0f} us, p99 {j['p99_us']:.0f} us")
        remove_ns(t, 3)
        delete(t, f"pool0/{name}")
        return j["iops"], perf(t, 2, "write", stride=MIB)["iops"]
    res = each_pair(run)
    for tn, l in lat_a.items():
        print(f"  {tn} {what} runs: " + "; ".join(l))
    return res

def fresh_volume(t, i):
    create(t, f"F{i}", vol_mib)
    return f"F{i}"
res = one_pass_vs_plain(fresh_volume, "first-write")
row("2. first writes / writes to allocated clusters", "(no goal)", res, "IOPS", names=("first", "allocated"))

print(f"\n3. first writes to a fresh clone of a snapshot (each copies its 1 MiB cluster) / plain writes, same pattern", flush=True)
def fresh_clone(t, i):
    t.rpc("bdev_lvol_clone", snapshot_name="pool0/Gsnap", clone_name=f"C{i}")
    return f"C{i}"
res = one_pass_vs_plain(fresh_clone, "clone first-write")
row("3. first writes to a clone / plain writes", "goal >= 0.85", res, "IOPS", names=("clone", "plain"))

for client in clients:
    print(f"\n3b. 4 KiB random writes QD32 for a whole run on a fresh clone (its first writes copy, later ones do not) / on the allocated volume ({client})", flush=True)
    copied = {t.name: [] for t in targets}
    def clone_run(t, i):
        use(t)
        t.rpc("bdev_lvol_clone", snapshot_name="pool0/Gsnap", clone_name=f"R{i}")
        add_ns(t, 3, f"pool0/R{i}")
        j = perf(t, 3, "randwrite", client=client)
        copied[t.name].append(f"{lvol(t, f'R{i}')['num_allocated_clusters']} clusters copied")
        remove_ns(t, 3)
        delete(t, f"pool0/R{i}")
        return j["iops"], perf(t, 2, "randwrite", client=client)["iops"]
    res = each_pair(clone_run)
    for tn, l in copied.items():
        print(f"  {tn} clone runs: " + "; ".join(l))
    row(f"3b. randwrite 4K QD32 over a {secs} s run, fresh clone / allocated volume ({client})", "goal >= 0.85 (run-level)", res, "IOPS", names=("clone", "plain"))

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
    if not lats:
        return float("nan"), 0
    return lats[min(len(lats) - 1, int(len(lats) * 0.999))] / 1e3, len(lats)

rpc_ms = {t.name: [] for t in targets}
counts = {t.name: [] for t in targets}
def snap_run(t, i):
    log = f"{work}/lat-{t.name}-{i}.log"
    def snap():
        time.sleep(1.0)
        t0 = time.time_ns()
        _, ms = t.rpc.timed("bdev_lvol_snapshot", lvol_name="pool0/V", snapshot_name=f"S{i}")
        return t0, ms
    j = perf(t, 2, "randwrite", secs_=run_t, lat_log=log, on_start=snap)
    t0, ms = j["extra"]
    rpc_ms[t.name].append(ms)
    lo = t0 - j["start_unix_ns"]
    a, n = window_p999(log, lo, lo + 1_000_000_000)
    counts[t.name].append(n)
    delete(t, f"pool0/S{i}")
    perf(t, 2, "randwrite", secs_=run_t, lat_log=log)
    b, n = window_p999(log, lo, lo + 1_000_000_000)
    counts[t.name].append(n)
    return a, b
res = each_pair(snap_run)
for t in targets:
    print(f"  {t.name} snapshot RPC under this load: {' '.join(f'{x:.2f}' for x in rpc_ms[t.name])} ms; writes per window: {' '.join(map(str, counts[t.name]))}")
row("4. p99.9 in the second after a snapshot / same second without", "goal <= 1.5", res, "us", names=("after snapshot", "normal"))

print("\n5. snapshot and clone RPC times, idle thin volumes of 1 TiB and 1 GiB", flush=True)
times = {}
for t in targets:
    create(t, "big", 1 << 20)
    create(t, "small", 1024)
    times[t.name] = {("big", "snap"): [], ("big", "clone"): [], ("small", "snap"): [], ("small", "clone"): []}
for i in range(max(pairs, 5)):
    for t in targets:
        use(t)
        res = times[t.name]
        for v in ("big", "small"):
            _, ms = t.rpc.timed("bdev_lvol_snapshot", lvol_name=f"pool0/{v}", snapshot_name=f"{v}s{i}")
            res[(v, "snap")].append(ms)
            _, ms = t.rpc.timed("bdev_lvol_clone", snapshot_name=f"pool0/{v}s{i}", clone_name=f"{v}c{i}")
            res[(v, "clone")].append(ms)
            t.rpc("bdev_lvol_delete", name=f"pool0/{v}c{i}")
            t.rpc("bdev_lvol_delete", name=f"pool0/{v}s{i}")
for kind in ("snap", "clone"):
    name = "bdev_lvol_snapshot" if kind == "snap" else "bdev_lvol_clone"
    data = {tn: (res[("big", kind)], res[("small", kind)]) for tn, res in times.items()}
    mx = ", ".join(f"{tn} max {max(res[('big', kind)]):.2f} ms" for tn, res in times.items())
    row(f"5. {name} time, 1 TiB / 1 GiB volume", f"goal < 5 ms: {mx}", data, "ms", fmt="{:.2f}", names=("1 TiB", "1 GiB"))

# 7. A full store: which writes fail, and does freeing space bring them back.
print("\n7. a full store (64 MiB, 1 MiB clusters, overcommitted thin volumes): what fails", flush=True)
fill = {}
for t in targets:
    use(t)
    t.rpc("bdev_malloc_create", name="Fill0", num_blocks=64 * 256, block_size=4096)
    t.rpc("bdev_lvol_create_lvstore", bdev_name="Fill0", lvs_name="fillpool", cluster_sz=MIB)
    total = t.rpc("bdev_lvol_get_lvstores", lvs_name="fillpool")[0]["total_data_clusters"]
    create(t, "A", 4, "fillpool")
    create(t, "C", 8, "fillpool")
    create(t, "B", total, "fillpool")
    add_ns(t, 5, "fillpool/A")
    add_ns(t, 6, "fillpool/B")
    add_ns(t, 7, "fillpool/C")
    perf(t, 5, "write", 128 << 10, 32, secs_=60, once=True)
    perf(t, 7, "write", 128 << 10, 32, secs_=60, once=True)
    remove_ns(t, 7)
    jb = perf(t, 6, "write", 128 << 10, 32, secs_=60, once=True, allow_errors=True)
    use(t)
    free = t.rpc("bdev_lvol_get_lvstores", lvs_name="fillpool")[0]["free_clusters"]
    ja = perf(t, 5, "randwrite", 4096, 32, secs_=1, allow_errors=True)
    jr = perf(t, 6, "randread", 4096, 32, secs_=1, allow_errors=True)
    delete(t, "fillpool/C")
    use(t)
    freed = t.rpc("bdev_lvol_get_lvstores", lvs_name="fillpool")[0]["free_clusters"]
    create(t, "D", 4, "fillpool")
    add_ns(t, 7, "fillpool/D")
    jd = perf(t, 7, "write", 4096, 4, secs_=60, stride=MIB, once=True, allow_errors=True)
    ja2 = perf(t, 5, "randwrite", 4096, 32, secs_=1, allow_errors=True)
    for ns in (5, 6, 7):
        remove_ns(t, ns)
    use(t)
    t.rpc("bdev_lvol_delete_lvstore", lvs_name="fillpool")
    t.rpc("bdev_malloc_delete", name="Fill0")
    f = (f"{t.name}: store of {total} clusters; A (4) and C (8) written; B ({total} MiB) written whole: {jb['ops']} 128 KiB writes ok, "
         f"{jb['errors']} failed, free clusters then {free}. In the full store: 4 KiB random writes to A's allocated clusters "
         f"{ja['ops']} ok / {ja['errors']} failed; 4 KiB random reads of B {jr['ops']} ok / {jr['errors']} failed. "
         f"C deleted ({freed} clusters free): first writes to a new 4 MiB volume {jd['ops']} ok / {jd['errors']} failed; "
         f"writes to A {ja2['ops']} ok / {ja2['errors']} failed")
    fill[t.name] = (ja["errors"] == 0 and jr["errors"] == 0, jd["errors"] == 0 and ja2["errors"] == 0, jb["errors"] > 0)
    print("  " + f, flush=True)
def fill_cell(tn):
    if tn not in fill:
        return "not measured"
    other_ok, after_ok, filled = fill[tn]
    if not filled:
        return "the store did not fill"
    return ("other writes and reads go on" if other_ok else "writes to allocated clusters (or reads) fail too") + "; " + \
        ("after freeing, writes succeed" if after_ok else "after freeing, writes still fail")
rows.append(("7. full store: only new-space writes fail?", fill_cell("tidemark"), fill_cell("SPDK"), "", "only new-space writes fail; freeing space heals"))

print("\n| row | tidemark: A / B = ratio | SPDK: A / B = ratio | tidemark/SPDK (A / B) | goal |")
print("| --- | --- | --- | --- | --- |")
for x in rows:
    print("| " + " | ".join(x) + " |")
print(f"| 2b. first writes, pool half to full / empty to half (tidemark, one pass each) | {fill_ratio:.2f} | not measured | | (cost independent of what the pool holds: ~1) |")
print(f"| 6. metadata RAM (tidemark) | {meta_per_mib:.1f} bytes per allocated MiB, {per_vol:.0f} bytes per empty 1 GiB thin volume | not measured | | goal <= 64 B/MiB |")
if not sp:
    print("\nSPDK lvol rows: SKIPPED (set SPDK_DIR to an SPDK build with bin/nvmf_tgt to measure them)")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
