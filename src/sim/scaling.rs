//! The scaling model of docs/scaling.md §2, executable: a deterministic discrete-event model
//! of n reactor cores serving 4 KiB random I/O from closed-loop clients, fed with the per-I/O
//! CPU measured on one core, plus a cost for each cross-core interaction that the audit
//! (docs/scaling.md §1) lists as still open on the path.
//!
//! Unlike the other systems under `src/sim/`, this one runs no tidemark I/O code: the machine
//! has two cores, so what it can check is arithmetic, not timing. What it takes from the code
//! is what decides which core does what: connections go round-robin over the cores as the
//! listeners place them (`Nvmf::next_core`, `IscsiShared::next_core`), and a mirror write's
//! extent lock lives on the shard that the real [`LockSpace::shard_of`] picks for its 1 MiB
//! region. Each core runs one job at a time from a FIFO (a reactor runs a task or a message to
//! its end), a job's CPU is its share of the measured cost, and a cross-core interaction
//! costs:
//!
//! * a message (lock request, grant wake, release): [`MESSAGE_NS`], half in the sender's job
//!   and half in a job queued on the receiving core, behind what that core already has;
//! * a write to a cache line another core wrote last: [`TRANSFER_NS`] of stall on the writing
//!   core. A line moves one core at a time (it is free again [`TRANSFER_NS`] after a transfer
//!   started), so a line every I/O writes caps the I/O rate at one transfer per
//!   [`TRANSFER_NS`], whatever the number of cores.
//!
//! Not modelled, as in the paper model: memory bandwidth, the NIC and the kernel, NUMA, and
//! the latency a client sees (clients are infinitely fast and the network has no delay; the
//! cores are the only resource).

use crate::extent_lock::LockSpace;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;

/// NVMe/TCP 4 KiB randread QD32, target CPU per I/O on one core, RAM namespace: README,
/// `vs_spdk.sh` table "Again on a quiet machine, 2026-12-07 06:14-06:17 UTC", client
/// `spdk_nvme_perf` (CPU µs/IO 1.70).
pub const NVMF_READ_NS: u64 = 1_700;
/// NVMe/TCP 4 KiB randwrite QD32, same table (2.90).
pub const NVMF_WRITE_NS: u64 = 2_900;
/// iSCSI 4 KiB randread QD32, RAM LUN, one busy-polling target core: tests/iscsi/README.md,
/// `BENCH_RT=1 TIME=10 SIZE_MB=1024 bench/iscsi_bench.sh`, `iscsi-load` 356,715 IOPS, so
/// 1 core / IOPS = 2.80 µs. The client saturated first (that README says so): an upper bound.
pub const ISCSI_READ_NS: u64 = 2_800;
/// iSCSI 4 KiB randwrite QD32, same run: 216,405 IOPS, 4.62 µs (also an upper bound).
pub const ISCSI_WRITE_NS: u64 = 4_620;
/// What a two-leg RAM mirror adds to a 4 KiB write on one core: README "mirror write IOPS /
/// one leg", `mirror_bench --legs malloc` (one core): 319K against 850K IOPS for one leg,
/// 3.13 - 1.18 µs.
pub const MIRROR_ADD_NS: u64 = 1_960;
/// One more bdev layer with an epoch enter and exit and a boxed future (a CoW volume with no
/// snapshot). **Assumed**, not measured (docs/scaling.md §2, "Caveats on the inputs").
pub const LAYER_NS: u64 = 200;
/// CPU for one cross-core message or wake, both cores together. **Assumed** (docs/scaling.md
/// §2, "Assumptions"): the box allocation and cross-thread free, the queue push and pop, the
/// fence, one more task poll.
pub const MESSAGE_NS: u64 = 300;
/// Stall for one transfer of a cache line another core wrote last. **Assumed**: the middle
/// of 100-200 ns for a contended line on one socket (docs/scaling.md §2).
pub const TRANSFER_NS: u64 = 150;

/// 4 KiB blocks of the 1 GiB namespace the offsets are drawn over.
pub const SPAN_BLOCKS: u64 = 1 << 18;
/// The mirror's region (`bdevs/mirror`: `DEFAULT_REGION_BYTES`, also its lock region), in
/// 4 KiB blocks.
const REGION_BLOCKS: u64 = 256;
/// Region words (`AtomicU32`) per 64-byte line: audit item D.
const REGIONS_PER_LINE: u64 = 16;

/// The paths the paper model covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    NvmfRead,
    NvmfWrite,
    IscsiRead,
    IscsiWrite,
    /// A CoW volume with no snapshot live, over a RAM namespace, by NVMe/TCP: no lock, no
    /// message (docs/scaling.md §1, CoW volume).
    CowWrite,
    /// A two-leg RAM mirror by NVMe/TCP: audit items D, E and F.
    MirrorWrite,
}

impl Path {
    pub const ALL: [Path; 6] = [Path::NvmfRead, Path::NvmfWrite, Path::IscsiRead, Path::IscsiWrite, Path::CowWrite, Path::MirrorWrite];

    /// CPU per I/O on one core, where every shard is local.
    pub fn cost_ns(self) -> u64 {
        match self {
            Path::NvmfRead => NVMF_READ_NS,
            Path::NvmfWrite => NVMF_WRITE_NS,
            Path::IscsiRead => ISCSI_READ_NS,
            Path::IscsiWrite => ISCSI_WRITE_NS,
            Path::CowWrite => NVMF_WRITE_NS + LAYER_NS,
            Path::MirrorWrite => NVMF_WRITE_NS + MIRROR_ADD_NS,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Path::NvmfRead => "NVMe/TCP, RAM, 4 KiB reads",
            Path::NvmfWrite => "NVMe/TCP, RAM, 4 KiB writes",
            Path::IscsiRead => "iSCSI, RAM, 4 KiB reads",
            Path::IscsiWrite => "iSCSI, RAM, 4 KiB writes",
            Path::CowWrite => "CoW volume, no snapshot, writes",
            Path::MirrorWrite => "Two-leg mirror on RAM, writes",
        }
    }

    /// An NVMe/TCP host's admin queue is a connection too, placed before its I/O queues.
    fn admin_connection(self) -> bool {
        !matches!(self, Path::IscsiRead | Path::IscsiWrite)
    }

    fn locks(self) -> bool {
        self == Path::MirrorWrite
    }
}

/// One run of the model.
#[derive(Debug, Clone)]
pub struct Config {
    pub cores: usize,
    pub path: Path,
    /// I/O connections (NVMe/TCP I/O queues of one host, or iSCSI sessions).
    pub connections: usize,
    /// I/Os each connection keeps in flight.
    pub queue_depth: usize,
    pub seed: u64,
    pub warmup_ns: u64,
    pub measure_ns: u64,
    pub message_ns: u64,
    pub transfer_ns: u64,
}

impl Config {
    /// The paper model's load: one connection per core, QD 32 each, the assumed costs.
    pub fn new(path: Path, cores: usize, seed: u64) -> Config {
        Config {
            cores,
            path,
            connections: cores,
            queue_depth: 32,
            seed,
            warmup_ns: 2_000_000,
            measure_ns: 10_000_000,
            message_ns: MESSAGE_NS,
            transfer_ns: TRANSFER_NS,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub iops: f64,
    /// I/Os completed per core in the window (placement and balance).
    pub per_core: Vec<u64>,
    /// Mirror writes whose lock shard was another core, over all mirror writes started.
    pub remote_locks: u64,
    pub locks: u64,
    /// Line transfers charged, over the whole run.
    pub transfers: u64,
}

/// The core each I/O connection lands on. The listeners hand each accepted connection to
/// `next_core()`, a counter modulo the cores, starting at 0; for NVMe/TCP the host's admin
/// queue is the first connection.
pub fn placement(connections: usize, cores: usize, admin_first: bool) -> Vec<usize> {
    let skip = usize::from(admin_first);
    (0..connections).map(|i| (i + skip) % cores).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The whole I/O on its connection's core (no lock, or a lock on this core's shard).
    Whole,
    /// Up to the lock request on another core's shard, then the request's send.
    Request,
    /// The request's receipt on the shard, the grant, the wake's send.
    Grant,
    /// Woken with the grant: the rest of the I/O, then the release's send (when the shard is
    /// another core).
    Resume { remote_wake: bool },
    /// The release's receipt on the shard.
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    io: usize,
    step: Step,
}

struct Io {
    core: usize,
    block: u64,
    shard: usize,
    /// Queued for its lock on its own core's shard: its `Resume` comes from the release.
    waiting: bool,
}

#[derive(Default)]
struct Core {
    queue: VecDeque<Job>,
    current: Option<Job>,
}

/// A cache line written by more than one core: who wrote it last and when it is free to move.
#[derive(Clone, Copy)]
struct Line {
    owner: usize,
    free_at: u64,
}

/// splitmix64: the offsets, drawn from the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The line of `Arc<LockSpace>`'s count (audit F): one for the mirror, every lock writes it.
const SPACE_COUNT_LINE: usize = 0;

struct Sim {
    cfg: Config,
    cost: u64,
    space: std::sync::Arc<LockSpace>,
    cores: Vec<Core>,
    ios: Vec<Io>,
    conn_core: Vec<usize>,
    lines: Vec<Line>,
    /// Held blocks (a 4 KiB write locks exactly its block) and who waits for each, FIFO.
    held: HashMap<u64, VecDeque<usize>>,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    seq: u64,
    rng: Rng,
    now: u64,
    out: Outcome,
}

impl Sim {
    fn new(cfg: Config) -> Sim {
        assert!(cfg.cores > 0 && cfg.connections > 0 && cfg.queue_depth > 0, "a run needs cores, connections and I/O");
        let regions = SPAN_BLOCKS / REGION_BLOCKS;
        let lines = 1 + (regions / REGIONS_PER_LINE) as usize;
        Sim {
            cost: cfg.path.cost_ns(),
            // The mirror's own lock space: `cores` shards, 1 MiB regions of 4 KiB blocks, its
            // regions placed by the seed (as `with_shard_seed` does for the other systems).
            space: LockSpace::with_shard_seed(cfg.cores, REGION_BLOCKS, cfg.seed),
            cores: (0..cfg.cores).map(|_| Core::default()).collect(),
            ios: Vec::new(),
            conn_core: placement(cfg.connections, cfg.cores, cfg.path.admin_connection()),
            lines: vec![Line { owner: usize::MAX, free_at: 0 }; lines],
            held: HashMap::new(),
            events: BinaryHeap::new(),
            seq: 0,
            rng: Rng(cfg.seed),
            now: 0,
            out: Outcome { iops: 0.0, per_core: vec![0; cfg.cores], remote_locks: 0, locks: 0, transfers: 0 },
            cfg,
        }
    }

    fn run(mut self) -> Outcome {
        for conn in 0..self.cfg.connections {
            for _ in 0..self.cfg.queue_depth {
                let io = self.ios.len();
                self.ios.push(Io { core: self.conn_core[conn], block: 0, shard: 0, waiting: false });
                self.submit(io);
            }
        }
        let end = self.cfg.warmup_ns + self.cfg.measure_ns;
        while let Some(Reverse((t, _, core))) = self.events.pop() {
            if t > end {
                break;
            }
            self.now = t;
            self.finish(core);
        }
        let done: u64 = self.out.per_core.iter().sum();
        self.out.iops = done as f64 * 1e9 / self.cfg.measure_ns as f64;
        self.out
    }

    /// A client sends I/O `io` again (closed loop: at once, to a new random block).
    fn submit(&mut self, io: usize) {
        let block = self.rng.next() % SPAN_BLOCKS;
        let core = self.ios[io].core;
        let shard = if self.cfg.path.locks() { self.space.shard_of(block / REGION_BLOCKS) } else { core };
        self.ios[io].block = block;
        self.ios[io].shard = shard;
        let step = if shard == core { Step::Whole } else { Step::Request };
        if self.cfg.path.locks() {
            self.out.locks += 1;
            self.out.remote_locks += u64::from(shard != core);
        }
        self.push(core, Job { io, step });
    }

    fn push(&mut self, core: usize, job: Job) {
        self.cores[core].queue.push_back(job);
        if self.cores[core].current.is_none() {
            self.start(core);
        }
    }

    /// Writes of lines other cores write: the stall until this core owns each.
    fn touch(&mut self, core: usize, lines: &[usize]) -> u64 {
        let mut t = self.now;
        for &l in lines {
            let line = &mut self.lines[l];
            if line.owner != core {
                let start = t.max(line.free_at);
                line.free_at = start + self.cfg.transfer_ns;
                line.owner = core;
                t = line.free_at;
                self.out.transfers += 1;
            }
        }
        t - self.now
    }

    fn region_line(&self, io: usize) -> usize {
        1 + (self.ios[io].block / REGION_BLOCKS / REGIONS_PER_LINE) as usize
    }

    /// Takes the block's lock for `io`, or queues it. True when granted.
    fn lock(&mut self, io: usize) -> bool {
        let block = self.ios[io].block;
        match self.held.get_mut(&block) {
            Some(waiters) => {
                waiters.push_back(io);
                false
            }
            None => {
                self.held.insert(block, VecDeque::new());
                true
            }
        }
    }

    /// Releases `io`'s block on its shard: the next waiter, if any, gets it and is woken.
    fn unlock(&mut self, io: usize) {
        let block = self.ios[io].block;
        let next = self.held.get_mut(&block).and_then(|w| w.pop_front());
        match next {
            Some(w) => {
                let shard = self.ios[w].shard;
                let core = self.ios[w].core;
                self.push(core, Job { io: w, step: Step::Resume { remote_wake: core != shard } });
            }
            None => {
                self.held.remove(&block);
            }
        }
    }

    /// Starts the next job of `core`: lock state changes now, its CPU (and stalls) decide
    /// when it ends.
    fn start(&mut self, core: usize) {
        let Some(job) = self.cores[core].queue.pop_front() else { return };
        let half = self.cfg.message_ns / 2;
        let pre = self.cost / 2;
        let io = job.io;
        let busy = match job.step {
            Step::Whole if !self.cfg.path.locks() => self.cost,
            // A local lock: `try_grant` clones the space's `Arc`, the write enters and leaves
            // its region word; on RAM legs the whole write runs in one poll, so each line is
            // written once here.
            Step::Whole => {
                self.ios[io].waiting = !self.lock(io);
                if !self.ios[io].waiting {
                    let d = self.region_line(io);
                    self.cost + self.touch(core, &[SPACE_COUNT_LINE, d])
                } else {
                    // Queued on its own shard: the part before the lock now, the rest when
                    // the holder releases.
                    pre + self.touch(core, &[SPACE_COUNT_LINE])
                }
            }
            // `acquire` clones the space's `Arc` into the message.
            Step::Request => pre + half + self.touch(core, &[SPACE_COUNT_LINE]),
            // The shard's `try_grant` clones the `Arc`; the closure drops its copy.
            Step::Grant => half + half + self.touch(core, &[SPACE_COUNT_LINE]),
            Step::Resume { remote_wake } => {
                let d = self.region_line(io);
                let wake = if remote_wake { half } else { 0 };
                let release = if self.ios[io].shard != core { half } else { 0 };
                // Entered and left the region word; `Grant::drop` clones the `Arc` for the
                // release message (or releases in place) and drops its own.
                wake + (self.cost - pre) + release + self.touch(core, &[d, SPACE_COUNT_LINE])
            }
            // The release closure drops its `Arc` copy.
            Step::Release => half + self.touch(core, &[SPACE_COUNT_LINE]),
        };
        self.cores[core].current = Some(job);
        self.seq += 1;
        self.events.push(Reverse((self.now + busy, self.seq, core)));
    }

    /// `core`'s current job ended: what it sends goes out, the I/O completes or moves on.
    fn finish(&mut self, core: usize) {
        let Some(job) = self.cores[core].current.take() else { return };
        let io = job.io;
        match job.step {
            Step::Whole if !self.cfg.path.locks() => self.complete(core, io),
            // Queued: its `Resume` comes from the holder's release.
            Step::Whole if self.ios[io].waiting => {}
            Step::Whole => {
                self.unlock(io);
                self.complete(core, io);
            }
            Step::Request => {
                let shard = self.ios[io].shard;
                self.push(shard, Job { io, step: Step::Grant });
            }
            Step::Grant => {
                if self.lock(io) {
                    self.push(self.ios[io].core, Job { io, step: Step::Resume { remote_wake: true } });
                }
            }
            Step::Resume { .. } => {
                let shard = self.ios[io].shard;
                if shard == core {
                    self.unlock(io);
                } else {
                    self.push(shard, Job { io, step: Step::Release });
                }
                self.complete(core, io);
            }
            Step::Release => self.unlock(io),
        }
        // What this job sent to its own core may have started already.
        if self.cores[core].current.is_none() {
            self.start(core);
        }
    }

    fn complete(&mut self, core: usize, io: usize) {
        if self.now >= self.cfg.warmup_ns {
            self.out.per_core[core] += 1;
        }
        self.submit(io);
    }
}

/// Runs the model once.
pub fn run(cfg: Config) -> Outcome {
    Sim::new(cfg).run()
}

/// IOPS(n) by the closed form of docs/scaling.md §2, with the audit items fixed since it was
/// written left out (A, B, C): only the mirror write keeps cross-core costs. With p = (n-1)/n
/// the chance that a lock's shard, or a line's last writer, is another core:
///
/// ```text
/// c(n) = c1 + p·3·m + p·tx + p·((1-p)·1 + p·4)·tx    E, D, F
/// IOPS(n) = min(n / c(n), 1 / (p·((1-p) + 4p)·tx))     F's one line moves 1/tx times a second
/// ```
///
/// D is one transfer per write, not two: on RAM legs a write enters and leaves its region
/// word in one poll. F is written in one poll by a local lock and in four (request, grant,
/// resume, release) by a remote one.
pub fn closed_form(path: Path, n: usize, message_ns: u64, transfer_ns: u64) -> f64 {
    let c1 = path.cost_ns() as f64;
    if !path.locks() || n == 1 {
        return n as f64 * 1e9 / c1;
    }
    let p = (n as f64 - 1.0) / n as f64;
    let (m, tx) = (message_ns as f64, transfer_ns as f64);
    let f = p * ((1.0 - p) + 4.0 * p);
    let c = c1 + p * 3.0 * m + p * tx + f * tx;
    let cpu = n as f64 * 1e9 / c;
    if tx == 0.0 {
        cpu
    } else {
        cpu.min(1e9 / (f * tx))
    }
}

/// The core counts of the table.
pub const CORES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// IOPS(n) and efficiency IOPS(n) / (n·IOPS(1)) for every path, simulated and by the closed
/// form, as a Markdown table (docs/scaling.md §2).
pub fn table(seed: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| Path (4 KiB random, QD 32 per connection, one connection per core) | c1 µs | {} |", CORES.map(|n| format!("n = {n}")).join(" | "));
    let _ = writeln!(s, "| --- | --- |{}", " --- |".repeat(CORES.len()));
    for path in Path::ALL {
        let one = run(Config::new(path, 1, seed)).iops;
        let cells: Vec<String> = CORES
            .iter()
            .map(|&n| {
                let got = if n == 1 { one } else { run(Config::new(path, n, seed)).iops };
                let paper = closed_form(path, n, MESSAGE_NS, TRANSFER_NS);
                format!("{} ({:.2}; form {})", thousands(got), got / (n as f64 * one), thousands(paper))
            })
            .collect();
        let _ = writeln!(s, "| {} | {:.2} | {} |", path.label(), path.cost_ns() as f64 / 1000.0, cells.join(" | "));
    }
    s
}

/// IOPS in thousands with a thousands separator: "1,234".
fn thousands(iops: f64) -> String {
    let k = (iops / 1000.0).round() as u64;
    if k >= 1000 {
        format!("{},{:03}", k / 1000, k % 1000)
    } else {
        k.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efficiency(path: Path, n: usize, seed: u64) -> f64 {
        let one = run(Config::new(path, 1, seed)).iops;
        run(Config::new(path, n, seed)).iops / (n as f64 * one)
    }

    #[test]
    fn one_connection_per_core_after_the_admin_queue() {
        assert_eq!(placement(4, 4, true), vec![1, 2, 3, 0]);
        assert_eq!(placement(4, 4, false), vec![0, 1, 2, 3]);
        let out = run(Config::new(Path::NvmfRead, 8, 1));
        let (lo, hi) = (out.per_core.iter().min().copied().unwrap_or(0), out.per_core.iter().max().copied().unwrap_or(0));
        assert!(lo > 0 && hi == lo, "every core serves the same load: {:?}", out.per_core);
    }

    /// With nothing written across cores, IOPS(n) = n·IOPS(1) within 1%: what fixes A, B and
    /// C bought, and what a user sizing a target on these paths relies on.
    #[test]
    fn paths_without_shared_writes_scale_linearly() {
        for path in [Path::NvmfRead, Path::NvmfWrite, Path::IscsiRead, Path::IscsiWrite, Path::CowWrite] {
            for n in CORES {
                let e = efficiency(path, n, 7);
                assert!((e - 1.0).abs() <= 0.01, "{path:?} at {n} cores: efficiency {e:.4}");
                let out = run(Config::new(path, n, 7));
                assert_eq!(out.transfers, 0, "{path:?} writes no shared line");
            }
        }
    }

    /// A connection count that doesn't divide over the cores loads them unevenly: the model
    /// follows placement, it doesn't assume balance.
    #[test]
    fn uneven_placement_limits_iops() {
        let mut cfg = Config::new(Path::NvmfRead, 4, 3);
        cfg.connections = 2;
        let two = run(cfg).iops;
        let one = run(Config::new(Path::NvmfRead, 1, 3)).iops;
        assert!((two / one - 2.0).abs() < 0.02, "2 connections on 4 cores use 2 cores: {two} vs {one}");
    }

    /// The mirror's lock shard comes from the real `shard_of`: another core's shard for about
    /// (n-1)/n of the writes.
    #[test]
    fn remote_lock_share_follows_shard_of() {
        for n in [2, 4, 16] {
            let out = run(Config::new(Path::MirrorWrite, n, 11));
            let share = out.remote_locks as f64 / out.locks as f64;
            let p = (n as f64 - 1.0) / n as f64;
            assert!((share - p).abs() < 0.05, "{n} cores: remote share {share:.3}, expected about {p:.3}");
        }
        assert_eq!(run(Config::new(Path::MirrorWrite, 1, 11)).remote_locks, 0);
    }

    /// Messages alone (E, no line transfers): the mirror's efficiency is c1 / (c1 + p·3·m)
    /// with p = (n-1)/n the share of writes whose lock shard is another core, within 1%, and
    /// it falls as cores are added.
    #[test]
    fn mirror_efficiency_falls_with_remote_shards_as_the_closed_form_says() {
        let cfg = |n| {
            let mut c = Config::new(Path::MirrorWrite, n, 5);
            c.transfer_ns = 0;
            c
        };
        let one = run(cfg(1)).iops;
        let mut last = f64::INFINITY;
        for n in CORES {
            let got = run(cfg(n)).iops;
            let form = closed_form(Path::MirrorWrite, n, MESSAGE_NS, 0);
            assert!((got / form - 1.0).abs() < 0.01, "{n} cores: simulated {got:.0}, closed form {form:.0}");
            let e = got / (n as f64 * one);
            if n > 1 {
                assert!(e < last, "efficiency must fall: {e:.4} at {n} cores after {last:.4}");
            }
            last = e;
        }
    }

    /// With the line transfers too (D, F): the simulation agrees with the closed form within
    /// 3% while F's line is less than 40% busy. Beyond, the closed form is an upper bound: it
    /// charges a transfer its 150 ns but not the wait for a line another core is moving (the
    /// line is a queue), so the simulation falls below it, and never above F's ceiling.
    #[test]
    fn mirror_matches_the_closed_form_until_the_shared_line_queues() {
        let one = run(Config::new(Path::MirrorWrite, 1, 5)).iops;
        let mut last = f64::INFINITY;
        for n in CORES {
            let got = run(Config::new(Path::MirrorWrite, n, 5)).iops;
            let form = closed_form(Path::MirrorWrite, n, MESSAGE_NS, TRANSFER_NS);
            let p = (n as f64 - 1.0) / n as f64;
            let per_write = p * ((1.0 - p) + 4.0 * p);
            let busy = form * per_write * TRANSFER_NS as f64 / 1e9;
            if busy < 0.4 {
                assert!((got / form - 1.0).abs() < 0.03, "{n} cores: simulated {got:.0}, closed form {form:.0}");
            } else {
                assert!(got < form, "{n} cores: simulated {got:.0} above the closed form {form:.0}");
                assert!(got * per_write * TRANSFER_NS as f64 <= 1.01e9, "{n} cores: {got:.0} above F's ceiling");
            }
            let e = got / (n as f64 * one);
            assert!(e < last, "efficiency must fall: {e:.3} at {n} cores after {last:.3}");
            last = e;
        }
    }

    /// Without message and transfer costs the mirror scales like the other paths: the loss
    /// is the cross-core costs, not the lock's queueing or the shards' balance.
    #[test]
    fn mirror_without_cross_core_costs_scales_linearly() {
        let base = |n| {
            let mut c = Config::new(Path::MirrorWrite, n, 9);
            c.message_ns = 0;
            c.transfer_ns = 0;
            run(c).iops
        };
        let one = base(1);
        for n in [2, 8, 32] {
            let e = base(n) / (n as f64 * one);
            assert!((e - 1.0).abs() <= 0.01, "{n} cores: efficiency {e:.4}");
        }
    }

    #[test]
    fn a_seed_replays_exactly() {
        let a = run(Config::new(Path::MirrorWrite, 8, 42));
        let b = run(Config::new(Path::MirrorWrite, 8, 42));
        assert_eq!(a, b);
        let c = run(Config::new(Path::MirrorWrite, 8, 43));
        assert_ne!(a.per_core, c.per_core, "another seed draws other offsets");
    }

    /// Prints the table of docs/scaling.md §2:
    /// `cargo test --lib sim::scaling::tests::prints_the_table -- --nocapture`, and checks
    /// that the document shows what the model computes now: a changed cost or path that
    /// nobody copied into the document fails here, not in a reader's hands.
    #[test]
    fn prints_the_table() {
        let t = table(1);
        println!("{t}");
        assert_eq!(t.lines().count(), 2 + Path::ALL.len());
        let doc = include_str!("../../docs/scaling.md");
        for line in t.lines() {
            assert!(doc.lines().any(|l| l == line), "docs/scaling.md §2 lacks this line of the model's table:\n{line}");
        }
    }
}
