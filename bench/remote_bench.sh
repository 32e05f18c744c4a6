#!/usr/bin/env bash
# Issue #15's benchmarks: tidemark beyond one machine. Several tidemarkd nodes on this machine,
# each on its own loopback address (A 127.0.0.1, B 127.0.0.2, C 127.0.0.3) with its own data
# directory and RPC socket in a temporary directory; every figure is a ratio against a peer
# measured in the same run, A/B alternated over PAIRS pairs, medians and per-pair ratios.
#
#   [SPDK_DIR=../shared/peers/spdk-v25.09] bench/remote_bench.sh [seconds per run] [pairs]
#
# Defaults: 3 s per run, 3 pairs (about 5 minutes at load 5 on 2 cores). Node processes on
# BENCH_TARGET_CPU (0), clients (bdevperf, nvme_perf, spdk_nvme_perf) on BENCH_INITIATOR_CPU (1).
# Nodes poll adaptively (several share one core; a busy-polling idle node would take it from
# the others).
#
# [1] initiator: 4 KiB randread/randwrite QD1 and QD32 against a RAM namespace exported by
#     node B, through tidemark's NVMe/TCP initiator bdev (bdevperf: an in-process bdev
#     benchmark whose configuration attaches B's namespace with bdev_nvme_attach_controller,
#     and drives bdev rbn1 directly: no re-export, no extra hop) against SPDK's host
#     (spdk_nvme_perf connected straight to the same namespace). Without SPDK_DIR: SKIPPED.
# [2] mirror write IOPS, 4 KiB randwrite QD32 by nvme_perf through A's NVMe/TCP export: a
#     mirror of two remote RAM legs (B and C) against a mirror of two local RAM legs and against
#     one local RAM bdev (no mirror).
# [3] re-join at ~1% dirty: mirror m0 on A = local RAM leg + a file leg on B (tmpfs, so that
#     it survives kill -9 of B); B is killed, ~1% of the regions are written through A, B comes
#     back; time from B's return (its listener up) to the leg in sync (auto re-join), against
#     a full rebuild of a blank leg of the same kind on B (bdev_raid_add_base_bdev).
# [4] host write latency (max, p99.9, errors; nvme_perf's JSON) over a run in which B is
#     killed -9 mid-run, against the same run without a kill; the issue's bound is
#     fast_io_fail_timeout_sec (BENCH_FAST_IO_FAIL, 2) + 1 s.
# [5] the same with B hung (SIGSTOP, SIGCONT after the run), the same bound: A's command timeout
#     (timeout_us 0.5 s, action_on_timeout reset; BENCH_TIMEOUT_US) notices the hang, and
#     fast_io_fail counts from the unanswered command. BENCH_TIMEOUT_US=0 measures the keep-alive
#     (2 s) alone.
#
# BENCH_ROWS="1 2 3 4 5" picks rows. BENCH_MIRROR_MB (512): legs of [2]; BENCH_REJOIN_MB (1024):
# legs of [3] and [4]. BENCH_SKIP_BUILD=1 reuses target/release binaries built just before.
set -euo pipefail
cd "$(dirname "$0")/.."
# Ports come from the Python part (bound on each node's own loopback address: bench/lib.sh's
# free_port and wait_port probe 127.0.0.1 only).
secs=${1:-3}
pairs=${2:-3}
tcpu=${BENCH_TARGET_CPU:-0}
icpu=${BENCH_INITIATOR_CPU:-1}
spdk=${SPDK_DIR:-}
if [[ -n $spdk ]]; then
  for f in bin/spdk_nvme_perf; do
    if [[ ! -e $spdk/$f ]]; then
      echo "remote_bench: SPDK_DIR=$spdk has no $f: row 1's SPDK side is SKIPPED"
      spdk=""
    fi
  done
fi
[[ -n $spdk ]] && spdk=$(cd "$spdk" && pwd) && [[ -x tests/spdk/deps.sh ]] && tests/spdk/deps.sh
[[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --release -q --bin tidemarkd --bin nvme_perf --bin bdevperf

# tmpfs: B's file legs of rows 3 and 4 survive kill -9 of B and cost no disk.
work=$(mktemp -d "/dev/shm/tidemark-remote-bench.XXXXXX")
# Every process this script starts writes its PID here; the trap stops those and nothing else.
pids="$work/pids"
: > "$pids"
cleanup() {
  local p
  while read -r p; do
    if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
      kill -CONT "$p" 2>/dev/null || true
      kill -TERM "$p" 2>/dev/null || true
    fi
  done < "$pids"
  sleep 0.5
  while read -r p; do
    [[ -n $p ]] && kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
  done < "$pids"
  rm -rf "$work"
}
trap cleanup EXIT

echo "remote_bench: nodes (tidemarkd, adaptive polling) on CPU $tcpu, clients on CPU $icpu; ${secs}s per run, $pairs pairs"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
export RB_SECS=$secs RB_PAIRS=$pairs RB_TCPU=$tcpu RB_ICPU=$icpu RB_SPDK=$spdk RB_WORK=$work RB_PIDS=$pids
export RB_ROWS=${BENCH_ROWS:-1 2 3 4 5} RB_MIRROR_MB=${BENCH_MIRROR_MB:-512} RB_REJOIN_MB=${BENCH_REJOIN_MB:-1024}
export RB_FAST_IO_FAIL=${BENCH_FAST_IO_FAIL:-2}
python3 - <<'PY'
import json, os, re, signal, socket, statistics, subprocess, sys, time

E = os.environ
secs, pairs = int(E["RB_SECS"]), int(E["RB_PAIRS"])
work, spdk = E["RB_WORK"], E["RB_SPDK"]
tmask, imask = f"0x{1 << int(E['RB_TCPU']):x}", f"0x{1 << int(E['RB_ICPU']):x}"
rows = E["RB_ROWS"].split()
mirror_mb, rejoin_mb, fast_fail = int(E["RB_MIRROR_MB"]), int(E["RB_REJOIN_MB"]), int(E["RB_FAST_IO_FAIL"])
BS = 4096
med = statistics.median

def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])

def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"

def started(p):
    with open(E["RB_PIDS"], "a") as f:
        f.write(f"{p.pid}\n")
    return p

def free_port(ip):
    s = socket.socket()
    s.bind((ip, 0))
    port = s.getsockname()[1]
    s.close()
    return port

class Node:
    """A tidemarkd on its own loopback address, data directory and RPC socket."""
    def __init__(self, name, ip):
        self.name, self.ip, self.port = name, ip, free_port(ip)
        self.dir = f"{work}/{name}"
        os.makedirs(f"{self.dir}/data", exist_ok=True)
        self.sock = f"{self.dir}/rpc.sock"
        with open(f"{self.dir}/tidemark.toml", "w") as f:
            f.write(f'[daemon]\ndata_dir = "{self.dir}/data"\nbuffer_pool_mb = 64\n')
        self.proc = None
        self.start()

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        log = open(f"{self.dir}/tidemarkd.log", "a")
        self.proc = started(subprocess.Popen(
            ["target/release/tidemarkd", "-c", f"{self.dir}/tidemark.toml", "--cpumask", tmask, "--poll-mode", "adaptive",
             "--rpc-socket", self.sock, "--metrics", "", "--data-dir", f"{self.dir}/data"], stdout=log, stderr=log))
        for _ in range(400):
            if self.proc.poll() is not None:
                sys.exit(f"node {self.name} exited: {open(self.dir + '/tidemarkd.log').read()[-3000:]}")
            try:
                c = socket.socket(socket.AF_UNIX)
                c.connect(self.sock)
                c.close()
                return
            except OSError:
                time.sleep(0.025)
        sys.exit(f"node {self.name} did not start")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def try_rpc(self, method, params=None):
        c = socket.socket(socket.AF_UNIX)
        c.connect(self.sock)
        req = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            req["params"] = params
        c.sendall(json.dumps(req).encode())
        buf, dec = b"", json.JSONDecoder()
        while True:
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            try:
                resp = json.loads(buf)
                break
            except ValueError:
                continue
        c.close()
        resp = json.loads(buf)
        if "error" in resp:
            raise RuntimeError(f"{self.name}: {method} {json.dumps(params)}: {resp['error']}")
        return resp["result"]

    def rpc(self, method, params=None):
        try:
            return self.try_rpc(method, params)
        except RuntimeError as e:
            sys.exit(f"{e}\nlog of {self.name}:\n{open(self.dir + '/tidemarkd.log').read()[-3000:]}")

    def export(self, nqn, bdev):
        try:
            self.try_rpc("nvmf_create_transport", {"trtype": "TCP"})
        except RuntimeError:
            pass  # already there
        self.rpc("nvmf_create_subsystem", {"nqn": nqn, "serial_number": "SN" + str(abs(hash(nqn)) % 10**12), "allow_any_host": True})
        self.rpc("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": bdev, "nsid": 1}})
        self.rpc("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": self.ip, "trsvcid": str(self.port)}})

    def attach(self, name, other, nqn):
        self.rpc("bdev_nvme_attach_controller", {"name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": other.ip, "trsvcid": str(other.port),
                 "subnqn": nqn, "ctrlr_loss_timeout_sec": 120, "reconnect_delay_sec": 1, "fast_io_fail_timeout_sec": fast_fail})

    def trid(self, nqn):
        return f"trtype:TCP adrfam:IPv4 traddr:{self.ip} trsvcid:{self.port} subnqn:{nqn}"

def nvme_perf(trid, w, qd, t, extra=(), size=BS):
    """tidemark's nvme_perf on the client CPU: its JSON result."""
    p = started(subprocess.Popen(["target/release/nvme_perf", "-c", imask, "--json", "-q", str(qd), "-o", str(size), "-w", w, "-t", str(t), "-r", trid, *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return p

def perf_result(p, what):
    out, _ = p.communicate()
    js = [l for l in out.splitlines() if l.startswith("{")]
    if not js:
        sys.exit(f"nvme_perf ({what}) failed (exit {p.returncode}):\n{out[-3000:]}")
    return json.loads(js[-1])

def run_perf(trid, w, qd, t, extra=(), size=BS):
    return perf_result(nvme_perf(trid, w, qd, t, extra, size), f"{w} QD{qd}")

def prefill(trid):
    # Every block written once: RAM bdevs are backed lazily, and that cost is no steady state.
    run_perf(trid, "write", 32, 120, ["--once"], 131072)

def stop_all(nodes):
    for n in nodes:
        n.stop()

# ---------------------------------------------------------------------------------------------
if "1" in rows:
    print(f"\n[1] initiator: 4 KiB random I/O against a {mirror_mb * 2} MiB RAM namespace of node B (127.0.0.2, CPU {E['RB_TCPU']})")
    print("    tidemark: bdevperf (in-process bdev benchmark) attaches B's namespace with bdev_nvme_attach_controller and drives bdev rbn1 directly")
    print("    SPDK:     spdk_nvme_perf connected straight to the same namespace; both clients one core (CPU %s), one at a time" % E["RB_ICPU"])
    print(f"    load average: {load()}", flush=True)
    b = Node("b1", "127.0.0.2")
    nqn = "nqn.2016-06.io.tidemark:bench-b"
    b.rpc("bdev_malloc_create", {"name": "Malloc0", "num_blocks": mirror_mb * 2 * 256, "block_size": BS})
    b.export(nqn, "Malloc0")
    prefill(b.trid(nqn))
    cfg = f"{work}/bdevperf.toml"
    os.makedirs(f"{work}/bdevperf", exist_ok=True)
    with open(cfg, "w") as f:
        f.write(f'[daemon]\ndata_dir = "{work}/bdevperf"\nbuffer_pool_mb = 64\n'
                f'[[bdev]]\nmethod = "bdev_nvme_attach_controller"\n'
                f'params = {{ name = "rb", trtype = "tcp", adrfam = "ipv4", traddr = "{b.ip}", trsvcid = "{b.port}", subnqn = "{nqn}" }}\n')

    def tm(w, qd):
        p = started(subprocess.Popen(["target/release/bdevperf", "-c", cfg, "-b", "rbn1", "-m", imask, "-q", str(qd), "-o", str(BS), "-w", w, "-t", str(secs), "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        out, _ = p.communicate()
        js = [l for l in out.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not js:
            sys.exit(f"bdevperf {w} QD{qd} failed (exit {p.returncode}):\n{out[-3000:]}")
        j = json.loads(js[-1])
        return {"iops": j["iops"], "lat": (j["p50_us"], j["p99_us"], j["p999_us"])}

    def sp(w, qd):
        cmd = [f"{spdk}/bin/spdk_nvme_perf", "-c", imask, "--no-huge", "-s", "1024", "-L", "-q", str(qd), "-o", str(BS), "-w", w, "-t", str(secs),
               "-r", b.trid(nqn) + " hostnqn:nqn.2014-08.org.nvmexpress:uuid:0b0e0c0d-0000-4000-8000-0000000000b1"]
        p = started(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        out, _ = p.communicate()
        m = re.search(r"^Total\s*:\s*(.*)$", out, re.M)
        if p.returncode != 0 or not m:
            sys.exit(f"spdk_nvme_perf {w} QD{qd} failed (exit {p.returncode}):\n{out[-3000:]}")
        pct = dict((float(a), float(c)) for a, c in re.findall(r"^\s*([\d.]+)%\s*:\s*([\d.]+)us", out, re.M))
        return {"iops": float(m.group(1).split()[0]), "lat": (pct.get(50.0), pct.get(99.0), pct.get(99.9))}

    fmt = lambda l: "/".join("-" if x is None else f"{x:.1f}" for x in l)
    print(f"    {'row':<14} {'tm IOPS':>9} {'spdk IOPS':>9} {'ratio':>6}  {'per-pair ratios':<20} {'tm p50/p99/p99.9 us':>22} {'spdk p50/p99/p99.9 us':>22}")
    for w, qd in [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]:
        rt, rs = [], []
        for i in range(pairs):
            # A B, then B A: neither side always runs first.
            if spdk and i % 2:
                rs.append(sp(w, qd)); rt.append(tm(w, qd))
            else:
                rt.append(tm(w, qd))
                if spdk:
                    rs.append(sp(w, qd))
        mt = {"iops": med(r["iops"] for r in rt), "lat": tuple(med(r["lat"][k] for r in rt) for k in range(3))}
        if spdk:
            ms = {"iops": med(r["iops"] for r in rs), "lat": tuple(med(r["lat"][k] for r in rs if r["lat"][k] is not None) for k in range(3))}
            pp = " ".join(ratio(a["iops"], c["iops"]) for a, c in zip(rt, rs))
            print(f"    {w + ' QD' + str(qd):<14} {mt['iops']:>9.0f} {ms['iops']:>9.0f} {ratio(mt['iops'], ms['iops']):>6}  {pp:<20} {fmt(mt['lat']):>22} {fmt(ms['lat']):>22}", flush=True)
        else:
            print(f"    {w + ' QD' + str(qd):<14} {mt['iops']:>9.0f} {'SKIPPED':>9} {'-':>6}  {'(SPDK_DIR unset)':<20} {fmt(mt['lat']):>22}", flush=True)
    stop_all([b])

# ---------------------------------------------------------------------------------------------
if "2" in rows:
    print(f"\n[2] mirror write IOPS, 4 KiB randwrite QD32 by nvme_perf (CPU {E['RB_ICPU']}) through A's NVMe/TCP export; RAM legs of {mirror_mb} MiB")
    print(f"    nodes A, B, C all on CPU {E['RB_TCPU']}: with remote legs that one core also runs B and C (on separate machines they would have their own)")
    print(f"    load average: {load()}", flush=True)
    a, b, c = Node("a2", "127.0.0.1"), Node("b2", "127.0.0.2"), Node("c2", "127.0.0.3")
    blocks = mirror_mb * 256
    for n, nqn in [(b, "nqn.2016-06.io.tidemark:leg-b"), (c, "nqn.2016-06.io.tidemark:leg-c")]:
        n.rpc("bdev_malloc_create", {"name": "leg", "num_blocks": blocks, "block_size": BS})
        n.export(nqn, "leg")
    a.attach("rb", b, "nqn.2016-06.io.tidemark:leg-b")
    a.attach("rc", c, "nqn.2016-06.io.tidemark:leg-c")
    for l in ["l0", "l1", "single"]:
        a.rpc("bdev_malloc_create", {"name": l, "num_blocks": blocks, "block_size": BS})
    a.rpc("bdev_raid_create", {"name": "mremote", "raid_level": "raid1", "base_bdevs": ["rbn1", "rcn1"]})
    a.rpc("bdev_raid_create", {"name": "mlocal", "raid_level": "raid1", "base_bdevs": ["l0", "l1"]})
    vols = {"remote mirror": "mremote", "local mirror": "mlocal", "single local": "single"}
    trids = {}
    for k, v in vols.items():
        nqn = f"nqn.2016-06.io.tidemark:vol-{v}"
        a.export(nqn, v)
        trids[k] = a.trid(nqn)
        prefill(trids[k])
    res = {k: [] for k in vols}
    for i in range(pairs):
        order = list(vols) if i % 2 == 0 else list(reversed(vols))
        for k in order:
            res[k].append(run_perf(trids[k], "randwrite", 32, secs))
    m = {k: med(r["iops"] for r in rs) for k, rs in res.items()}
    p99 = {k: med(r["p99_us"] for r in rs) for k, rs in res.items()}
    errs = sum(r["errors"] for rs in res.values() for r in rs)
    for k in vols:
        print(f"    {k:<14} {m[k]:>9.0f} IOPS (median; p99 {p99[k]:.0f} us)   runs: {' '.join('%.0f' % r['iops'] for r in res[k])}")
    print(f"    remote mirror / local mirror: {ratio(m['remote mirror'], m['local mirror'])}  per pair: {' '.join(ratio(x['iops'], y['iops']) for x, y in zip(res['remote mirror'], res['local mirror']))}")
    print(f"    remote mirror / single local: {ratio(m['remote mirror'], m['single local'])}  per pair: {' '.join(ratio(x['iops'], y['iops']) for x, y in zip(res['remote mirror'], res['single local']))}")
    print(f"    host errors: {errs}", flush=True)
    stop_all([a, b, c])

# ---------------------------------------------------------------------------------------------
def raid(a, name="m0"):
    return next(r for r in a.rpc("bdev_raid_get_bdevs", {"category": "all"}) if r["name"] == name)

def leg(r, name):
    return next((x for x in r["base_bdevs_list"] if x["name"] == name), None)

def wait(what, secs_max, cond, step=0.01):
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return time.monotonic() - t0, v
        if time.monotonic() - t0 > secs_max:
            sys.exit(f"timed out ({secs_max} s) waiting for {what}")
        time.sleep(step)

B_UUID = "5e1f0c2a-7d3b-4c1e-9a55-0123456789b0"
NQN_B = "nqn.2016-06.io.tidemark:rejoin-b"
NQN_A = "nqn.2016-06.io.tidemark:rejoin-a"

def b_up(b):
    # The file leg on B's tmpfs keeps its contents across kill -9; re-created with the same file and uuid.
    b.rpc("bdev_uring_create", {"name": "u0", "filename": f"{b.dir}/leg.img", "size_mb": rejoin_mb, "block_size": BS, "uuid": B_UUID})
    b.export(NQN_B, "u0")

def rejoined(a, n):
    def f():
        l = leg(raid(a), "rbn1")
        return l if l and l["state"] == "active" and l["rejoins"]["auto"] >= n else None
    return f

if "3" in rows or "4" in rows or "5" in rows:
    a, b = Node("a3", "127.0.0.1"), Node("b3", "127.0.0.2")
    timeout_us = int(os.environ.get("BENCH_TIMEOUT_US", "500000"))
    a.rpc("bdev_nvme_set_options", {"keep_alive_timeout_ms": 2000, "tcp_connect_timeout_ms": 1000,
                                    "timeout_us": timeout_us, "action_on_timeout": "reset" if timeout_us else "none"})
    b_up(b)
    a.attach("rb", b, NQN_B)
    a.rpc("bdev_malloc_create", {"name": "l0", "num_blocks": rejoin_mb * 256, "block_size": BS})
    a.rpc("bdev_raid_create", {"name": "m0", "raid_level": "raid1", "base_bdevs": ["l0", "rbn1"]})
    wait("m0's legs in sync", 120, lambda: raid(a)["num_base_bdevs_operational"] == 2, 0.05)
    a.export(NQN_A, "m0")
    a_trid = a.trid(NQN_A)
    r = raid(a)
    region = r["region_size_kb"] * 1024
    nregions = r["num_regions"]
    auto = [leg(r, "rbn1")["rejoins"]["auto"]]

    def kill_and_return(during=None):
        """Kills B (-9), lets `during` run, restarts B; returns when B's listener is up."""
        b.kill9()
        if during:
            during()
        wait("rbn1 to be dropped", 30, lambda: leg(raid(a), "rbn1")["state"] == "failed", 0.02)
        b.start()
        b_up(b)
        return time.monotonic()

    def back_in_sync(t_back):
        auto[0] += 1
        seen_copy = [None]
        def f():
            l = leg(raid(a), "rbn1")
            if seen_copy[0] is None and l and (l["state"] == "rebuilding" or l["rejoins"]["auto"] >= auto[0]):
                seen_copy[0] = time.monotonic()
            return l if l and l["state"] == "active" and l["rejoins"]["auto"] >= auto[0] else None
        _, l = wait("rbn1 to re-join by itself", 120, f, 0.005)
        now = time.monotonic()
        return now - t_back, now - seen_copy[0], l

if "3" in rows:
    print(f"\n[3] re-join at ~1% dirty: mirror m0 on A = RAM leg l0 + a {rejoin_mb} MiB file leg on B (tmpfs), {nregions} regions of {region // 1024} KiB")
    print(f"    B killed -9, one 4 KiB write into every 100th region through A's export, B restarted; time from B's listener up to the leg in sync")
    print(f"    (auto re-join: includes A's reconnect, reconnect_delay_sec 1) vs a full rebuild of a blank {rejoin_mb} MiB file leg on B (bdev_raid_add_base_bdev)")
    print(f"    load average: {load()}", flush=True)
    stride = str(region * 100)

    def write_1pct():
        j = run_perf(a_trid, "write", 1, 120, ["--once", "--stride", stride])
        if j["errors"]:
            sys.exit(f"the host saw {j['errors']} errors writing 1%")

    def rejoin_once():
        t_back = kill_and_return(write_1pct)
        dirty = leg(raid(a), "rbn1")["stale_regions"]
        total, copy, l = back_in_sync(t_back)
        return {"t": total, "copy": copy, "regions": l["last_rejoin"]["regions_to_copy"], "dirty": dirty}

    def full_once(i):
        name, nqn = f"f{i}", f"nqn.2016-06.io.tidemark:full-{i}"
        b.rpc("bdev_uring_create", {"name": name, "filename": f"{b.dir}/full{i}.img", "size_mb": rejoin_mb, "block_size": BS})
        b.export(nqn, name)
        a.attach(f"rf{i}", b, nqn)
        t0 = time.monotonic()
        added = a.rpc("bdev_raid_add_base_bdev", {"raid_bdev": "m0", "base_bdev": f"rf{i}n1"})
        def f():
            l = leg(raid(a), f"rf{i}n1")
            return l if l and l["state"] == "active" else None
        wait("the full rebuild", 600, f, 0.005)
        t = time.monotonic() - t0
        regions = added.get("regions_to_copy") if isinstance(added, dict) else None
        a.rpc("bdev_raid_remove_base_bdev", {"name": f"rf{i}n1"})
        a.rpc("bdev_nvme_detach_controller", {"name": f"rf{i}"})
        b.rpc("nvmf_delete_subsystem", {"nqn": nqn})
        b.rpc("bdev_uring_delete", {"name": name})
        os.unlink(f"{b.dir}/full{i}.img")
        return {"t": t, "regions": regions}

    rj, fu = [], []
    for i in range(pairs):
        if i % 2 == 0:
            rj.append(rejoin_once()); fu.append(full_once(i))
        else:
            fu.append(full_once(i)); rj.append(rejoin_once())
    mb = lambda n: "?" if n is None else f"{n * region / 2**20:.0f} MiB"
    for x in rj:
        print(f"    re-join: {x['t'] * 1e3:.0f} ms from B's return ({x['copy'] * 1e3:.0f} ms from the re-join's start), {x['regions']} regions copied ({mb(x['regions'])}; {x['dirty']} stale)")
    for x in fu:
        print(f"    full rebuild: {x['t'] * 1e3:.0f} ms, {x['regions']} regions ({mb(x['regions'])})")
    mr, mc, mf = med(x["t"] for x in rj), med(x["copy"] for x in rj), med(x["t"] for x in fu)
    print(f"    median re-join {mr * 1e3:.0f} ms (copy phase {mc * 1e3:.0f} ms) vs full rebuild {mf * 1e3:.0f} ms: ratio {mr / mf:.3f} (copy phase alone {mc / mf:.3f});"
          f" per pair {' '.join('%.3f' % (x['t'] / y['t']) for x, y in zip(rj, fu))}")
    rr = [x["regions"] for x in rj if x["regions"] is not None]
    fr = [x["regions"] for x in fu if x["regions"] is not None]
    if rr and fr:
        print(f"    bytes moved: re-join {mb(med(rr))} / full {mb(med(fr))} = {med(rr) / med(fr):.4f}", flush=True)

def fault_row(tag, mode):
    """Host write latency over runs with a fault of B mid-run against runs without one."""
    t4 = max(secs, fast_fail + 5)
    hung = mode == "stop"
    what = "B stopped (SIGSTOP: a hung node)" if hung else "B killed -9"
    # A killed node is noticed by its connections' reset, a hung one by the command timeout; in
    # both cases the host's I/O waits at most fast_io_fail_timeout_sec from the fault (+ 1 s).
    bound = fast_fail + 1
    print(f"\n[{tag}] host write latency across a node {'hang' if hung else 'loss'}: nvme_perf 4 KiB randwrite QD32 for {t4} s through A's export of m0 (l0 + B's leg)")
    print(f"    with {what} {t4 // 3} s into the run ({'SIGCONT' if hung else 'restarted'} after it, leg re-joined before the next run), against the same run without a fault")
    print(f"    fast_io_fail_timeout_sec = {fast_fail}, reconnect_delay_sec = 1, keep_alive_timeout_ms = 2000, timeout_us = {timeout_us}:"
          f" goal max <= {bound} s (fast_io_fail {fast_fail} s + 1 s) and no error")
    print(f"    load average: {load()}", flush=True)

    def lat_run(fault):
        p = nvme_perf(a_trid, "randwrite", 32, t4)
        if fault:
            time.sleep(t4 // 3)
            if hung:
                b.proc.send_signal(signal.SIGSTOP)
            else:
                b.kill9()
        j = perf_result(p, "randwrite QD32")
        if fault:
            wait("rbn1 to be dropped", 30, lambda: leg(raid(a), "rbn1")["state"] == "failed", 0.02)
            if hung:
                b.proc.send_signal(signal.SIGCONT)
            else:
                b.start()
                b_up(b)
            back_in_sync(time.monotonic())
        return j

    kr, nr = [], []
    for i in range(pairs):
        if i % 2 == 0:
            nr.append(lat_run(False)); kr.append(lat_run(True))
        else:
            kr.append(lat_run(True)); nr.append(lat_run(False))
    lbl_f = "SIGSTOP" if hung else "kill -9"
    for lbl, rs in [("no fault", nr), (lbl_f, kr)]:
        print(f"    {lbl:<8} max {' '.join('%.1f' % (r['max_us'] / 1e3) for r in rs)} ms; p99.9 {' '.join('%.0f' % r['p999_us'] for r in rs)} us; "
              f"IOPS {' '.join('%.0f' % r['iops'] for r in rs)}; errors {sum(r['errors'] for r in rs)}")
    mk, mn = med(r["max_us"] for r in kr), med(r["max_us"] for r in nr)
    pk, pn = med(r["p999_us"] for r in kr), med(r["p999_us"] for r in nr)
    worst = max(r["max_us"] for r in kr)
    print(f"    median max latency: {lbl_f} {mk / 1e3:.1f} ms vs no fault {mn / 1e3:.1f} ms (ratio {mk / mn:.1f}); worst with {lbl_f} {worst / 1e3:.1f} ms"
          f" (bound {bound} s: {'met' if worst <= bound * 1e6 else 'NOT met'})")
    print(f"    median p99.9: {lbl_f} {pk:.0f} us vs no fault {pn:.0f} us (ratio {pk / pn:.2f}); per pair max ratios {' '.join(ratio(x['max_us'], y['max_us']) for x, y in zip(kr, nr))}")
    print(f"    host errors: {sum(r['errors'] for r in kr + nr)}", flush=True)

if "4" in rows:
    fault_row("4", "kill")
if "5" in rows:
    fault_row("5", "stop")

if "3" in rows or "4" in rows or "5" in rows:
    stop_all([a, b])
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
