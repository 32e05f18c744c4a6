//! The deterministic simulation of the mirror: thousands of seeded runs of the real mirror code
//! on hand-stepped cores over simulated devices (seeded latencies and completion order, a
//! volatile cache, crash images), with random leg failures, splits, re-joins, removals and
//! crashes (anywhere, including between a write-intent bitmap write and the data writes it
//! covers), checked against the reference register model (`crate::sim::model`):
//! * every read of the mirror returns a value a register would (no acknowledged write lost
//!   while one leg survives, no invented data);
//! * a sealed split image reads exactly the writes submitted before its split, and never
//!   changes (also across crashes);
//! * after a crash the mirror reassembles from its legs and holds only what may have survived;
//!   a split whose instant passed before the crash comes back as its image (a crash image of
//!   that instant);
//! * once every leg is back and rebuilt, all legs are identical;
//! * no host write waits on a split (`MirrorBdev::host_waits`): not for a flush, a bitmap or a
//!   superblock write the split needs, nor because the split closed its region;
//! * nothing deadlocks.
//!
//! In a share of the seeds the remote legs sit behind the initiator's connection model
//! ([`super::remote_leg`]: the node dies or hangs, commands are lost on the wire or applied
//! with their answer lost, held and sent again after a reconnect, failed with `Offline` after
//! fast_io_fail, connections reset by the command timeout), one leg at a time while another
//! stays healthy; besides the above, these check:
//! * no host write fails, and none waits longer than fast_io_fail (or the command timeout and
//!   its check, when longer; the clock backdated to the oldest held command) plus a slack for
//!   the healthy legs' own slowest I/Os;
//! * a leg whose connection came back within fast_io_fail (no error returned) is never dropped;
//! * after the outages the legs re-join and end identical (commands sent again, or applied
//!   before their answer was lost, included).
//!
//! [`run_seed`] replays one seed exactly (`tests/sim.rs`, `mirror_simulation_seeds`).

use super::blocks::{check_values, fill, read_tags, tag_of};
use super::device::{Latency, SimDevice, SIM_BLOCK};
use super::model::Model;
use super::remote_leg::{Conn, ConnCfg, ConnStats, Node, RemoteLeg};
use super::tasks::{alive, fail, HasRun, RunState};
use crate::bdev::{Bdev, BdevEntry, BdevRegistry, Channel, HoldGuard, IoBuf, IoType};
use crate::bdevs::error::{ErrorBdev, ErrorType, Injections};
use crate::bdevs::mirror::waits::WaitReason;
use crate::bdevs::mirror::{MirrorBdev, MirrorOptions, ProcessOptions, SplitImageBdev};
use crate::bdevs::nvme::tcp::reconnect::Policy;
use crate::reactor::{self, ManualCores};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// The metadata area of these small legs (the data starts at 1 MiB).
const DATA_OFFSET: u64 = 2048;
const MAX_STEPS: u64 = 2_000_000;
/// Simulated time after which a run counts as stuck.
const MAX_SIM_NS: u64 = 120_000_000_000;

#[derive(Debug, Clone)]
struct Cfg {
    cores: usize,
    legs: usize,
    data_blocks: u64,
    region_blocks: u64,
    clients: usize,
    ops: usize,
    crashes: usize,
    events: usize,
    clean_ns: u64,
    bandwidth_mb: u64,
    latency: Latency,
    /// Failed legs re-join by themselves once healed (`auto_rejoin`), probed this often.
    auto_rejoin: bool,
    rejoin_ns: u64,
    /// Per leg: its own latency when the leg is remote (slower than `latency`, the local
    /// device's, and varying more); None: local.
    leg_latency: Vec<Option<Latency>>,
    /// Connection events on the remote legs (drops, hangs, reconnects, command timeouts), or
    /// none.
    conn: Option<ConnSetup>,
}

/// The remote legs' initiator settings and what their connections go through, per life.
#[derive(Debug, Clone)]
struct ConnSetup {
    cfg: ConnCfg,
    seed: u64,
    /// Outages per life, started over its first `window_ns`.
    outages: usize,
    window_ns: u64,
}

/// One outage of a remote leg's node: when (from the start of the life), what, how long.
#[derive(Debug, Clone, Copy)]
struct Outage {
    leg: usize,
    at_ns: u64,
    kind: Node,
    down_ns: u64,
}

impl ConnSetup {
    /// `slowest_ns`: the slowest I/O of the slowest remote leg (a stalled one).
    fn draw(r: &mut ChaCha8Rng, slowest_ns: u64) -> ConnSetup {
        // Simulated time runs ~1000 times faster than the real settings (seconds there,
        // milliseconds here), as the legs' latencies are those of a fast network.
        let reconnect_delay = r.random_range(200_000..=1_000_000u64);
        let fast_io_fail = reconnect_delay * r.random_range(2..=8);
        let wire_ns = r.random_range(5_000..=40_000);
        // Longer than any answer of a node that works (as timeout_us should be): a timeout
        // means a hung node, never a slow one.
        let timeout_ns = slowest_ns + 2 * wire_ns + r.random_range(500_000..=5_000_000);
        ConnSetup {
            cfg: ConnCfg {
                policy: Policy {
                    ctrlr_loss: None,
                    reconnect_delay: Duration::from_nanos(reconnect_delay),
                    fast_io_fail: Some(Duration::from_nanos(fast_io_fail)),
                },
                timeout_ns,
                timeout_check_ns: timeout_ns / 4,
                wire_ns,
                // Off only by hand (`SIM_CONN_LATE=1`): a dead connection's commands landing
                // after their re-send make legs differ (`super::remote_leg`), a hazard below
                // the mirror that tidemark's target rules out (it answers a host's new
                // association once that host's earlier commands left the bdevs).
                quiesce: std::env::var("SIM_CONN_LATE").is_err(),
            },
            seed: r.random(),
            outages: r.random_range(1..=3),
            window_ns: r.random_range(500_000..=4_000_000),
        }
    }

    /// Life `life`'s outages on the remote legs `remote`.
    fn plan(&self, life: usize, remote: &[usize]) -> Vec<Outage> {
        let mut r = ChaCha8Rng::seed_from_u64(self.seed ^ (life as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let fio = self.cfg.policy.fast_io_fail.map_or(0, |d| d.as_nanos() as u64);
        let mut v: Vec<Outage> = (0..self.outages)
            .map(|_| {
                let kind = if r.random_bool(0.6) { Node::Down } else { Node::Hung };
                // Half short (the host reconnects, or for a hang never times out, before
                // fast_io_fail), half long (past fast_io_fail: the mirror drops the leg).
                let down_ns = if r.random_bool(0.5) {
                    let short = if kind == Node::Hung { self.cfg.timeout_ns } else { fio };
                    r.random_range(10_000..=short * 3 / 4)
                } else {
                    r.random_range(fio + self.cfg.timeout_ns..=4 * fio + 20_000_000)
                };
                Outage { leg: remote[r.random_range(0..remote.len())], at_ns: r.random_range(0..=self.window_ns), kind, down_ns }
            })
            .collect();
        v.sort_by_key(|o| o.at_ns);
        v
    }

    /// The longest a host write may wait with one leg down or hung and the others healthy:
    /// fast_io_fail counted from the oldest held command's sending (the clock is backdated on
    /// a timeout reset, as the real initiator's), or the timeout and its check when longer,
    /// plus `slack` for the healthy legs' own slowest I/Os.
    fn host_wait_bound(&self, slack: u64) -> u64 {
        let fio = self.cfg.policy.fast_io_fail.map_or(0, |d| d.as_nanos() as u64);
        fio.max(self.cfg.timeout_ns + self.cfg.timeout_check_ns) + slack
    }
}

impl Cfg {
    /// Legs with a connection model.
    fn remote(&self) -> Vec<usize> {
        if self.conn.is_none() {
            return Vec::new();
        }
        (0..self.legs).filter(|&i| self.leg_latency.get(i).copied().flatten().is_some()).collect()
    }

    /// Slack of the host-wait bound: two of the slowest legs' stalled I/Os in a row (a
    /// bitmap write then the data) and a millisecond for the mirror's own work.
    fn host_wait_slack(&self) -> u64 {
        let max = (0..self.legs).map(|i| self.leg_latency.get(i).copied().flatten().unwrap_or(self.latency).max_ns).max().unwrap_or(0);
        2 * 10 * max + 1_000_000
    }

    fn from_seed(seed: u64) -> Cfg {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x3141_5926);
        let mut cfg = Cfg {
            cores: r.random_range(1..=3),
            legs: r.random_range(2..=3),
            data_blocks: 32 * r.random_range(2..=6),
            region_blocks: if r.random_bool(0.5) { 8 } else { 16 },
            clients: r.random_range(2..=4),
            ops: r.random_range(10..=30),
            crashes: if r.random_bool(0.4) { r.random_range(1..=2) } else { 0 },
            events: r.random_range(1..=6),
            clean_ns: r.random_range(50_000..=2_000_000),
            bandwidth_mb: if r.random_bool(0.3) { r.random_range(50..=500) } else { 0 },
            latency: Latency { min_ns: 1_000, max_ns: r.random_range(5_000..=80_000) },
            // Drawn last: the fields above stay what they were for every seed.
            auto_rejoin: r.random_bool(0.5),
            rejoin_ns: r.random_range(100_000..=2_000_000),
            leg_latency: (0..4)
                .map(|_| {
                    r.random_bool(0.5).then(|| {
                        let min_ns = r.random_range(20_000..=100_000);
                        Latency { min_ns, max_ns: min_ns + r.random_range(10_000..=1_000_000) }
                    })
                })
                .collect(),
            conn: None,
        };
        // Drawn last, as above.
        if r.random_bool(0.4) && cfg.leg_latency[..cfg.legs].iter().any(Option::is_some) {
            let slowest = cfg.leg_latency.iter().flatten().map(|l| 10 * l.max_ns).max().unwrap_or(0);
            cfg.conn = Some(ConnSetup::draw(&mut r, slowest));
        }
        cfg
    }
}

/// What a leg is, across lives.
#[derive(Debug, Clone, PartialEq)]
enum Role {
    /// Part of the mirror's configuration (given to `bdev_raid_create` at a restart).
    Member,
    /// A sealed split image, with the tags it read when it sealed.
    Image { name: String, pinned: Vec<u64> },
    /// The image of a split whose instant passed before a crash (its RPC may have been
    /// answered): it must open after the restart and hold a crash image of that instant
    /// (writes submitted before `t`, durable as of the flushes up to `flushed`).
    Crashed { name: String, t: u64, flushed: u64 },
}

/// Counts of what a run did.
#[derive(Default, Debug, Clone)]
pub struct Outcome {
    pub writes: u64,
    pub reads: u64,
    pub failures: u64,
    pub splits: u64,
    pub sealed_checked: u64,
    pub rejoins: u64,
    /// Failed legs that, once healed, re-joined by themselves (`auto_rejoin`).
    pub auto_rejoins: u64,
    pub crashes: u64,
    pub rebuilds_checked: u64,
    /// Host writes that asked the control task to enter a region (waits the mirror needs for
    /// every write: write-intent bits, rebuild windows).
    pub enter_waits: u64,
    /// Images of splits under way at a crash, checked after the restart.
    pub images_after_crash: u64,
    /// Runs with connection events, and what the remote legs' connections went through.
    pub conn_runs: u64,
    pub outages_skipped: u64,
    pub conn: ConnStats,
    /// Host writes checked against the wait bound while a connection was disturbed, and the
    /// longest wait seen (ns).
    pub waits_checked: u64,
    pub max_host_wait_ns: u64,
}

impl Outcome {
    /// Adds another run's counts (for [`super::seeds::run_seeds`]).
    pub fn add(&mut self, o: &Outcome) {
        self.writes += o.writes;
        self.reads += o.reads;
        self.failures += o.failures;
        self.splits += o.splits;
        self.sealed_checked += o.sealed_checked;
        self.rejoins += o.rejoins;
        self.auto_rejoins += o.auto_rejoins;
        self.crashes += o.crashes;
        self.rebuilds_checked += o.rebuilds_checked;
        self.enter_waits += o.enter_waits;
        self.images_after_crash += o.images_after_crash;
        self.conn_runs += o.conn_runs;
        self.outages_skipped += o.outages_skipped;
        add_conn(&mut self.conn, &o.conn);
        self.waits_checked += o.waits_checked;
        self.max_host_wait_ns = self.max_host_wait_ns.max(o.max_host_wait_ns);
    }
}

fn add_conn(t: &mut ConnStats, o: &ConnStats) {
    t.drops += o.drops;
    t.hangs += o.hangs;
    t.timeouts += o.timeouts;
    t.reconnects += o.reconnects;
    t.fast_fails += o.fast_fails;
    t.quick_reconnects += o.quick_reconnects;
    t.resent += o.resent;
    t.lost_on_wire += o.lost_on_wire;
    t.late_executed += o.late_executed;
    t.errors += o.errors;
    t.max_held_ns = t.max_held_ns.max(o.max_held_ns);
}

struct Sim {
    model: Model,
    run: RunState,
    /// Model time of the split that started last (set by the scheduler when the epoch moves).
    split_t: Option<u64>,
    /// The split in progress: leg index and image name.
    splitting: Option<(usize, String)>,
    roles: Vec<Role>,
    /// Legs armed to fail every write.
    injected: Vec<bool>,
    /// Legs that may have been dropped by the mirror in this life for a reason the harness
    /// knows (armed to fail, not active when the life began); the others must not be, unless
    /// their connection returned an error.
    may_fail: Vec<bool>,
    /// The controller is removing or re-adding a leg (no outage starts meanwhile), and how many
    /// such operations and splits it started.
    busy: u32,
    leg_ops: u64,
    /// The end of the life heals every connection: no outage starts any more.
    healing: bool,
    out: Outcome,
}

type Sh = Rc<RefCell<Sim>>;

impl HasRun for Sim {
    fn run(&self) -> &RunState {
        &self.run
    }
    fn run_mut(&mut self) -> &mut RunState {
        &mut self.run
    }
}

struct World {
    cores: ManualCores,
    reg: Rc<BdevRegistry>,
    devs: Vec<Arc<SimDevice>>,
    inj: Vec<Arc<Injections>>,
    mirror: Arc<MirrorBdev>,
    entry: Arc<BdevEntry>,
    home: usize,
    /// Per leg: its connection, when it has the connection model.
    conns: Vec<Option<Arc<Conn>>>,
}

fn leg_name(i: usize) -> String {
    format!("EE_d{i}")
}

/// Steps the cores ([`super::schedule::step`]); Err when every task waits for nothing or for
/// a time past the run's budget.
fn step(cores: &ManualCores, rng: &mut ChaCha8Rng) -> Result<(), String> {
    let idle = (0..cores.count()).all(|i| !cores.has_work(i));
    if idle && cores.next_timer().is_some_and(|t| t >= MAX_SIM_NS) {
        return Err("stuck: simulated time ran past its budget with tasks still waiting".into());
    }
    if super::schedule::step(cores, rng) {
        Ok(())
    } else {
        Err("deadlock: nothing to run and no timer".into())
    }
}

impl World {
    /// Prints every leg's block tags and the mirror's state (replaying a failing seed).
    fn dump(&self, data_blocks: u64) {
        for (i, d) in self.devs.iter().enumerate() {
            let img = d.current_image();
            let tags: Vec<u64> = (0..data_blocks)
                .map(|b| {
                    let o = ((DATA_OFFSET + b) * SIM_BLOCK as u64) as usize;
                    u64::from_le_bytes(img[o..o + 8].try_into().expect("8-byte tag"))
                })
                .collect();
            eprintln!("leg {i}: {tags:?}");
        }
        eprintln!("{:?}", self.mirror.status());
    }

    fn start(cfg: &Cfg, rng: &mut ChaCha8Rng, images: &[Vec<u8>], sh: &Sh, steps: &mut u64) -> Result<World, String> {
        let cores = ManualCores::new(cfg.cores);
        let reg = Rc::new(BdevRegistry::new(cfg.cores));
        let mut devs = Vec::new();
        let mut inj = Vec::new();
        let mut conns = Vec::new();
        let remote = cfg.remote();
        for (i, img) in images.iter().enumerate() {
            let latency = cfg.leg_latency.get(i).copied().flatten().unwrap_or(cfg.latency);
            let d = Arc::new(SimDevice::new(&format!("d{i}"), img.clone(), rng.random(), latency));
            // A remote leg with the connection model: the device on its node behind an
            // initiator (its connection's seed from the configuration: the world's draws stay
            // what they are without it).
            let conn = cfg.conn.as_ref().filter(|_| remote.contains(&i)).map(|c| Conn::new(c.cfg, c.seed ^ (i as u64 + 1) ^ (*steps << 8)));
            let e = match &conn {
                Some(c) => reg.register(Arc::new(RemoteLeg::new(&format!("d{i}"), d.clone(), c.clone()))),
                None => reg.register(d.clone()),
            }
            .map_err(|e| e.to_string())?;
            conns.push(conn);
            let eb = ErrorBdev::new(leg_name(i), e.claim(&leg_name(i)).map_err(|e| e.to_string())?, None);
            inj.push(eb.injections().clone());
            reg.register(Arc::new(eb)).map_err(|e| e.to_string())?;
            devs.push(d);
        }
        let roles = sh.borrow().roles.clone();
        let members: Vec<HoldGuard> =
            (0..images.len()).filter(|&i| roles[i] == Role::Member).map(|i| reg.get(&leg_name(i)).expect("registered").claim("m").expect("free")).collect();
        let home = rng.random_range(0..cfg.cores);
        let options = MirrorOptions {
            region_bytes: cfg.region_blocks * SIM_BLOCK as u64,
            clean_interval_ns: cfg.clean_ns,
            process: Some(Arc::new(ProcessOptions::new())),
            rejoin_interval_ns: cfg.rejoin_ns,
            fencing: None,
        };
        if let Some(p) = &options.process {
            p.auto_rejoin.store(cfg.auto_rejoin, Relaxed);
            p.max_bandwidth_mb_sec.store(cfg.bandwidth_mb, Relaxed);
            p.window_bytes.store(SIM_BLOCK as u64 * rng.random_range(1..=16), Relaxed);
        }
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        cores.enter(home, || {
            reactor::spawn_detached(async move { *o.borrow_mut() = Some(MirrorBdev::assemble("m", members, Vec::new(), None, options).await) })
        });
        while out.borrow().is_none() {
            *steps += 1;
            step(&cores, rng)?;
        }
        let mirror = out.borrow_mut().take().expect("checked").map_err(|e| format!("assembly failed: {e}"))?;
        let entry = reg.register(mirror.clone() as Arc<dyn Bdev>).map_err(|e| e.to_string())?;
        // Sealed images open again from their legs.
        for (i, r) in roles.iter().enumerate() {
            if let Role::Image { name, .. } | Role::Crashed { name, .. } = r {
                let g = reg.get(&leg_name(i)).expect("registered").claim(name).map_err(|e| e.to_string())?;
                let (o, n) = (Rc::new(RefCell::new(None)), name.clone());
                let o2 = o.clone();
                cores.enter(home, || reactor::spawn_detached(async move { *o2.borrow_mut() = Some(SplitImageBdev::open(&n, g).await) }));
                while o.borrow().is_none() {
                    *steps += 1;
                    step(&cores, rng)?;
                }
                let img = o.borrow_mut().take().expect("checked").map_err(|e| format!("image {name} does not open after the restart: {e}"))?;
                reg.register(Arc::new(img)).map_err(|e| e.to_string())?;
            }
        }
        // The host's command timeouts, on the home core.
        for c in conns.iter().flatten() {
            let c = c.clone();
            cores.enter(home, || reactor::spawn_detached(c.watchdog()));
        }
        Ok(World { cores, reg, devs, inj, mirror, entry, home, conns })
    }

    /// Runs until `done`; checks the split instant after every step.
    fn run_until(&self, sh: &Sh, rng: &mut ChaCha8Rng, steps: &mut u64, mut done: impl FnMut() -> bool) -> Result<(), String> {
        let mut epoch = self.mirror.epoch();
        while !done() {
            *steps += 1;
            if *steps > MAX_STEPS {
                return Err("step budget exhausted (livelock?)".into());
            }
            step(&self.cores, rng)?;
            let e = self.mirror.epoch();
            if e != epoch {
                // The split's instant lies in the step just taken: every write submitted in an
                // earlier step is older, every later one newer.
                epoch = e;
                let mut s = sh.borrow_mut();
                let t = s.model.tick();
                s.split_t = Some(t);
                super::schedule::trace(|| format!("split instant (model time {t})"));
            }
        }
        Ok(())
    }

    /// No host write of this life waited on a split (DESIGN §1): it may wait behind an
    /// overlapping write's extent lock or for what every write needs, never for a split's
    /// flush, bitmap or superblock write, nor because a split closed its region.
    fn check_host_waits(&self, sh: &Sh) -> Result<(), String> {
        let w = self.mirror.host_waits();
        sh.borrow_mut().out.enter_waits += w.count(WaitReason::Enter);
        match w.preserve_waits() {
            0 => Ok(()),
            n => Err(format!("{n} host write(s) waited on a split; the first: {}", w.first_preserve_wait().unwrap_or_default())),
        }
    }

    fn add_conn_stats(&self, sh: &Sh) {
        let mut s = sh.borrow_mut();
        for c in self.conns.iter().flatten() {
            super::schedule::trace(|| format!("connection: {:?}", c.stats()));
            add_conn(&mut s.out.conn, &c.stats());
        }
    }

    fn io_count(&self) -> u64 {
        self.devs.iter().map(|d| d.submitted.load(Relaxed)).sum()
    }

    fn teardown(self, rng: &mut ChaCha8Rng) {
        let m = self.mirror.clone();
        self.cores.enter(self.home, || reactor::spawn_detached(async move { m.shutdown().await }));
        for _ in 0..100_000 {
            if step(&self.cores, rng).is_err() || ((0..self.cores.count()).all(|c| !self.cores.has_work(c)) && self.mirror.status().shut_down) {
                break;
            }
        }
        for n in self.reg.list().iter().map(|e| e.name().to_string()).collect::<Vec<_>>() {
            let _ = self.reg.unregister(&n);
        }
    }
}

async fn client(sh: Sh, m: Arc<BdevEntry>, cfg: Cfg, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ch = match Channel::get(&m) {
        Ok(c) => c,
        Err(e) => return fail(&sh, format!("channel: {e}")),
    };
    for _ in 0..cfg.ops {
        if !alive(&sh) {
            return;
        }
        let n = rng.random_range(1..=8u64.min(cfg.data_blocks));
        let off = rng.random_range(0..=cfg.data_blocks - n);
        match rng.random_range(0..10) {
            0..=5 => {
                let (tag, id) = {
                    let mut s = sh.borrow_mut();
                    let tag = s.model.next_tag_take();
                    (tag, s.model.begin_write(off, n, tag))
                };
                let mut buf = IoBuf::alloc((n * SIM_BLOCK as u64) as usize);
                fill(&mut buf, off, tag);
                let (t0, quiet0) = (reactor::now_ns(), quiet(&sh, &m));
                super::schedule::trace(|| format!("write {tag} at {off}+{n}"));
                let r = ch.write_buf(off, &buf).await;
                super::schedule::trace(|| format!("write {tag} at {off}+{n}: {r:?}"));
                if !alive(&sh) {
                    return;
                }
                if let Err(e) = r {
                    return fail(&sh, format!("write {tag} at {off}+{n} failed: {e}"));
                }
                // One leg down or hung, the others healthy: the write ends within fast_io_fail
                // (and the timeout), whatever the down leg does. (Not checked across a split,
                // a removal or a re-join, which may hold a write for reasons of their own.)
                if let Some(c) = cfg.conn.as_ref().filter(|_| quiet0.is_some() && quiet(&sh, &m) == quiet0) {
                    let (waited, bound) = (reactor::now_ns() - t0, c.host_wait_bound(cfg.host_wait_slack()));
                    let mut s = sh.borrow_mut();
                    s.out.waits_checked += 1;
                    s.out.max_host_wait_ns = s.out.max_host_wait_ns.max(waited);
                    if waited > bound {
                        drop(s);
                        return fail(&sh, format!("write {tag} at {off}+{n} waited {waited} ns, more than the bound {bound} ns"));
                    }
                }
                let mut s = sh.borrow_mut();
                s.model.end_write(id);
                s.out.writes += 1;
            }
            6..=8 => {
                let s_r = sh.borrow_mut().model.tick();
                let got = read_tags(&m, off, n).await;
                if !alive(&sh) {
                    return;
                }
                let mut s = sh.borrow_mut();
                let c_r = s.model.tick();
                match got.and_then(|g| check_values("live read", off, &g, |b| s.model.live_read(b, s_r, c_r))) {
                    Ok(()) => s.out.reads += 1,
                    Err(e) => {
                        drop(s);
                        return fail(&sh, e);
                    }
                }
            }
            _ => {
                let s_f = sh.borrow_mut().model.tick();
                super::schedule::trace(|| "flush".into());
                let r = ch.flush().await;
                super::schedule::trace(|| format!("flush: {r:?}"));
                if !alive(&sh) {
                    return;
                }
                if let Err(e) = r {
                    return fail(&sh, format!("flush failed: {e}"));
                }
                sh.borrow_mut().model.flush_done(s_f);
            }
        }
        reactor::sleep(Duration::from_nanos(rng.random_range(0..50_000))).await;
    }
    sh.borrow_mut().run.clients_left -= 1;
}

/// The controller's and the mirror's own leg operations so far, or None while one is under way.
fn quiet(sh: &Sh, m: &Arc<BdevEntry>) -> Option<(u64, u64)> {
    let s = sh.borrow();
    let mirror = m.bdev().as_any().downcast_ref::<MirrorBdev>()?;
    let st = mirror.status();
    if s.busy > 0 || s.splitting.is_some() || st.process.is_some() {
        return None;
    }
    Some((s.leg_ops, st.slots.iter().map(|x| x.rejoins_auto).sum()))
}

fn slot_states(m: &MirrorBdev) -> BTreeMap<String, &'static str> {
    m.status().slots.iter().map(|s| (s.name.clone(), s.state)).collect()
}

/// Reads a whole bdev's tags and checks them against `ok`.
async fn check_all(e: &Arc<BdevEntry>, blocks: u64, what: &str, ok: impl Fn(u64) -> Vec<u64>) -> Result<Vec<u64>, String> {
    let got = read_tags(e, 0, blocks).await?;
    check_values(what, 0, &got, ok)?;
    Ok(got)
}

async fn controller(sh: Sh, w: Rc<WorldRefs>, cfg: Cfg, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = &w.mirror;
    for _ in 0..cfg.events {
        reactor::sleep(Duration::from_nanos(rng.random_range(0..400_000))).await;
        if !alive(&sh) {
            return;
        }
        let states = slot_states(m);
        let active: Vec<String> = states.iter().filter(|(_, s)| **s == "active").map(|(n, _)| n.clone()).collect();
        let armed = sh.borrow().injected.clone();
        // A leg whose connection is down, hung or recovering counts as armed to fail: it may
        // fail any moment.
        let injected = |n: &str| armed[leg_index(n)] || w.disturbed(leg_index(n));
        match rng.random_range(0..5) {
            // A leg fails every write from now on (never the last one that could).
            // (Not while a resync after a crash runs: a failing source leg would change what
            // reads of unsynced regions return; a known limitation.)
            0 if m.status().unsynced_regions == 0 => {
                let healthy: Vec<&String> = active.iter().filter(|n| !injected(n)).collect();
                if healthy.len() >= 2 {
                    let n = healthy[rng.random_range(0..healthy.len())];
                    w.inj[leg_index(n)].set(IoType::Write, ErrorType::Failure, 0);
                    w.inj[leg_index(n)].set(IoType::Flush, ErrorType::Failure, 0);
                    let mut s = sh.borrow_mut();
                    s.injected[leg_index(n)] = true;
                    s.may_fail[leg_index(n)] = true;
                    s.out.failures += 1;
                }
            }
            // Split a leg off and check the sealed image.
            0 | 1 => {
                let healthy: Vec<&String> = active.iter().filter(|n| !injected(n)).collect();
                if healthy.len() >= 2 && active.len() >= 2 {
                    let leg = healthy[rng.random_range(0..healthy.len())].clone();
                    if let Err(e) = split(&sh, &w, &leg, cfg.data_blocks).await {
                        return fail(&sh, e);
                    }
                }
            }
            // Heal a failed leg and let it come back by itself (`auto_rejoin`).
            2 | 3 if cfg.auto_rejoin && rng.random_bool(0.5) => {
                let failed: Vec<String> = states.iter().filter(|(n, s)| **s == "failed" && !n.is_empty()).map(|(n, _)| n.clone()).collect();
                if !failed.is_empty() {
                    let i = leg_index(&failed[rng.random_range(0..failed.len())]);
                    w.inj[i].clear();
                    sh.borrow_mut().injected[i] = false;
                }
            }
            // Bring departed legs back (healed); images re-join after a last check.
            2 | 3 => {
                if let Err(e) = rejoin_one(&sh, &w, &mut rng, cfg.data_blocks).await {
                    return fail(&sh, e);
                }
            }
            // Remove a leg (keeping a healthy one in sync: two faults at once are not survivable).
            _ => {
                let healthy: Vec<&String> = active.iter().filter(|n| !injected(n)).collect();
                if healthy.len() >= 2 {
                    let n = healthy[rng.random_range(0..healthy.len())].clone();
                    sh.borrow_mut().busy += 1;
                    sh.borrow_mut().leg_ops += 1;
                    let r = m.remove_leg(&n).await;
                    sh.borrow_mut().busy -= 1;
                    match r {
                        Ok(()) => {}
                        Err(e) if !alive(&sh) => return drop(e),
                        // Refused when it just became the last in-sync leg: fine.
                        Err(_) => {}
                    }
                }
            }
        }
        if let Err(e) = check_not_dropped(&sh, &w) {
            return fail(&sh, e);
        }
    }
    sh.borrow_mut().run.controller_done = true;
}

/// A leg whose connection never returned an error was not dropped by the mirror (a reconnect
/// within fast_io_fail is invisible to it), unless the harness failed it otherwise.
fn check_not_dropped(sh: &Sh, w: &WorldRefs) -> Result<(), String> {
    let may_fail = sh.borrow().may_fail.clone();
    for s in w.mirror.status().slots {
        let Some(i) = s.name.strip_prefix("EE_d").and_then(|n| n.parse::<usize>().ok()) else { continue };
        let Some(c) = &w.conns[i] else { continue };
        let st = c.stats();
        if matches!(s.state, "failed" | "failing") && !may_fail[i] && st.errors == 0 {
            return Err(format!("{} was dropped ({}) though its connection returned no error: {st:?}", s.name, s.state));
        }
    }
    Ok(())
}

/// Whether leg `leg`'s node may go down or hang now without making a host write fail: another
/// in-sync leg stays healthy through it (nothing else disturbed or armed, no split, removal or
/// re-join under way that counted on this leg, no resync after a crash).
fn may_disturb(sh: &Sh, w: &WorldRefs, leg: usize) -> bool {
    let s = sh.borrow();
    if s.splitting.is_some() || s.busy > 0 || s.healing || s.roles[leg] != Role::Member {
        return false;
    }
    if (0..w.conns.len()).any(|i| w.disturbed(i)) {
        return false;
    }
    let st = w.mirror.status();
    // Not a leg the mirror does not know by name (an image's leg not yet claimed back).
    if st.unsynced_regions > 0 || !st.slots.iter().any(|x| x.name == leg_name(leg)) {
        return false;
    }
    st.slots.iter().any(|x| {
        x.state == "active" && x.name != leg_name(leg) && x.name.strip_prefix("EE_d").and_then(|n| n.parse::<usize>().ok()).is_some_and(|j| !s.injected[j])
    })
}

/// Starts the planned outages of this life at their times (skipping those that would leave
/// no healthy leg), each ended after its down time; stops when the life heals.
async fn outages(sh: Sh, w: Rc<WorldRefs>, plan: Vec<Outage>, settle_ns: u64) {
    let start = reactor::now_ns();
    let mut not_before = 0;
    for o in plan {
        // One outage at a time, as far as any host write can tell: the next starts once the
        // last one's connection is back and the writes it held have had their bound to end.
        reactor::sleep_until((start + o.at_ns).max(not_before)).await;
        while (0..w.conns.len()).any(|i| w.disturbed(i)) && alive(&sh) && !sh.borrow().healing {
            reactor::sleep(Duration::from_micros(100)).await;
        }
        if !alive(&sh) || sh.borrow().healing {
            return;
        }
        let Some(c) = w.conns[o.leg].clone() else { continue };
        if !may_disturb(&sh, &w, o.leg) {
            sh.borrow_mut().out.outages_skipped += 1;
            continue;
        }
        super::schedule::trace(|| format!("leg {}: node {:?} for {} ns", o.leg, o.kind, o.down_ns));
        c.start_outage(o.kind);
        reactor::sleep(Duration::from_nanos(o.down_ns)).await;
        super::schedule::trace(|| format!("leg {}: node up", o.leg));
        c.end_outage();
        not_before = reactor::now_ns() + settle_ns;
    }
}

/// What the controller needs of the world (shared with its tasks).
struct WorldRefs {
    mirror: Arc<MirrorBdev>,
    reg: Rc<BdevRegistry>,
    inj: Vec<Arc<Injections>>,
    conns: Vec<Option<Arc<Conn>>>,
}

impl WorldRefs {
    fn disturbed(&self, i: usize) -> bool {
        self.conns.get(i).and_then(|c| c.as_ref()).is_some_and(|c| c.disturbed())
    }
}

fn leg_index(name: &str) -> usize {
    name.trim_start_matches("EE_d").parse().expect("leg names are EE_dN")
}

async fn split(sh: &Sh, w: &WorldRefs, leg: &str, blocks: u64) -> Result<(), String> {
    let name = format!("img{}-{}", sh.borrow().out.splits, sh.borrow().out.crashes);
    {
        let mut s = sh.borrow_mut();
        s.split_t = None;
        s.splitting = Some((leg_index(leg), name.clone()));
        s.leg_ops += 1;
    }
    let r = split_inner(sh, w, leg, &name, blocks).await;
    if alive(sh) {
        sh.borrow_mut().splitting = None;
    }
    r
}

async fn split_inner(sh: &Sh, w: &WorldRefs, leg: &str, name: &str, blocks: u64) -> Result<(), String> {
    let name = name.to_string();
    super::schedule::trace(|| format!("split {leg} as {name}"));
    let started = match w.mirror.split_start(leg, &name).await {
        Ok(s) => s,
        // Refused (the leg failed or left meanwhile): fine.
        Err(_) => return Ok(()),
    };
    let sealed = match started.sealed.await {
        Ok(Ok(s)) => s,
        _ => return Ok(()),
    };
    super::schedule::trace(|| format!("split {leg} as {name}: sealed"));
    if !alive(sh) {
        return Ok(());
    }
    let t = sh.borrow().split_t.ok_or("the split sealed but its instant was never seen")?;
    let img = SplitImageBdev::from_sealed(&name, sealed, w.mirror.uuid()).map_err(|e| e.to_string())?;
    let e = w.reg.register(Arc::new(img)).map_err(|e| e.to_string())?;
    let s_r = sh.borrow_mut().model.tick();
    let got = read_tags(&e, 0, blocks).await?;
    if !alive(sh) {
        return Ok(());
    }
    let mut s = sh.borrow_mut();
    let c_r = s.model.tick();
    check_values(&format!("image {name}"), 0, &got, |b| s.model.snap_read(b, t, s_r, c_r))?;
    s.roles[leg_index(leg)] = Role::Image { name, pinned: got };
    s.out.splits += 1;
    s.out.sealed_checked += 1;
    Ok(())
}

/// After a restart: the images of splits that were under way at the crash read a crash image
/// of their instant; from then on they are ordinary sealed images.
async fn check_crashed_images(sh: &Sh, reg: &Rc<BdevRegistry>, blocks: u64) -> Result<(), String> {
    let roles = sh.borrow().roles.clone();
    for (i, r) in roles.into_iter().enumerate() {
        let Role::Crashed { name, t, flushed } = r else { continue };
        let e = reg.get(&name).ok_or_else(|| format!("image {name} is gone after the crash"))?;
        let got = check_all(&e, blocks, &format!("image {name} after the crash"), |b| sh.borrow().model.after_crash(b, t, flushed)).await?;
        let mut s = sh.borrow_mut();
        s.roles[i] = Role::Image { name, pinned: got };
        s.out.images_after_crash += 1;
    }
    Ok(())
}

/// Re-joins one departed leg: a failed or removed one after healing it, or an image after
/// checking it still reads what it sealed.
async fn rejoin_one(sh: &Sh, w: &WorldRefs, rng: &mut ChaCha8Rng, blocks: u64) -> Result<(), String> {
    let states = slot_states(&w.mirror);
    let out: Vec<(String, &'static str)> = states.into_iter().filter(|(_, s)| matches!(*s, "failed" | "removed" | "split")).collect();
    if out.is_empty() {
        return Ok(());
    }
    let (mut leg, state) = out[rng.random_range(0..out.len())].clone();
    if leg.is_empty() {
        // A split leg from before a restart: the mirror knows its image, the roles its leg.
        let image = w.mirror.status().slots.iter().find(|s| s.state == "split" && s.name.is_empty()).map(|s| s.image.clone()).unwrap_or_default();
        let roles = sh.borrow().roles.clone();
        // Or, sealed just before a crash that came before the image was opened: an unclaimed
        // member leg.
        let unclaimed = (0..roles.len()).find(|&i| roles[i] == Role::Member && w.reg.get(&leg_name(i)).is_some_and(|e| e.claimed_by().is_none()));
        match roles.iter().position(|r| matches!(r, Role::Image { name, .. } if *name == image)).or(unclaimed) {
            Some(i) => leg = leg_name(i),
            None => return Ok(()),
        }
    }
    let i = leg_index(&leg);
    if w.disturbed(i) {
        // Its node does not answer: later.
        return Ok(());
    }
    let role = sh.borrow().roles[i].clone();
    if let Role::Image { name, pinned } = role {
        let Some(e) = w.reg.get(&name) else { return Ok(()) };
        let got = read_tags(&e, 0, blocks).await?;
        if got != pinned {
            return Err(format!("image {name} changed after it sealed"));
        }
        drop(e);
        let img = w.reg.unregister(&name).map_err(|e| e.to_string())?;
        img.bdev().destroy();
        drop(img);
        sh.borrow_mut().roles[i] = Role::Member;
    }
    w.inj[i].clear();
    sh.borrow_mut().injected[i] = false;
    let Some(entry) = w.reg.get(&leg) else { return Ok(()) };
    let _ = state;
    let Ok(guard) = entry.claim("m") else {
        // Still being released after its failure: try another time.
        return Ok(());
    };
    sh.borrow_mut().busy += 1;
    sh.borrow_mut().leg_ops += 1;
    let r = w.mirror.add_leg(guard).await;
    sh.borrow_mut().busy -= 1;
    match r {
        Ok(added) if !added.returning => return Err(format!("{leg} came back as a new leg: {added:?}")),
        Ok(_) => sh.borrow_mut().out.rejoins += 1,
        Err(e) if alive(sh) => return Err(format!("re-adding {leg} failed: {e}")),
        Err(_) => {}
    }
    Ok(())
}

fn run(seed: u64, cfg: &Cfg) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let leg_bytes = ((DATA_OFFSET + cfg.data_blocks) * SIM_BLOCK as u64) as usize;
    let mut images: Vec<Vec<u8>> = (0..cfg.legs).map(|_| vec![0u8; leg_bytes]).collect();
    let sh: Sh = Rc::new(RefCell::new(Sim {
        model: Model::new(cfg.data_blocks),
        run: RunState::default(),
        split_t: None,
        splitting: None,
        roles: vec![Role::Member; cfg.legs],
        injected: vec![false; cfg.legs],
        may_fail: vec![false; cfg.legs],
        busy: 0,
        leg_ops: 0,
        healing: false,
        out: Outcome::default(),
    }));
    let remote = cfg.remote();
    let mut steps = 0u64;
    for life in 0..=cfg.crashes {
        let world = World::start(cfg, &mut rng, &images, &sh, &mut steps)?;
        {
            let mut s = sh.borrow_mut();
            s.run.new_life(cfg.clients);
            // New devices, new error bdevs: nothing is armed any more.
            s.injected.iter_mut().for_each(|x| *x = false);
            // A leg that is not in sync at the start of the life may be (or stay) out.
            let states = slot_states(&world.mirror);
            s.may_fail = (0..cfg.legs).map(|i| states.get(&leg_name(i)).is_none_or(|st| *st != "active")).collect();
            s.busy = 0;
            s.healing = false;
        }
        if life > 0 {
            // After a crash: every block holds something that may have survived.
            let (sh2, e, n, reg2) = (sh.clone(), world.entry.clone(), cfg.data_blocks, world.reg.clone());
            let done = Rc::new(RefCell::new(false));
            let d2 = done.clone();
            world.cores.enter(world.home, || {
                reactor::spawn_detached(async move {
                    if let Err(err) = check_crashed_images(&sh2, &reg2, n).await {
                        fail(&sh2, err);
                        *d2.borrow_mut() = true;
                        return;
                    }
                    let r = check_all(&e, n, "after the crash", |b| {
                        let s = sh2.borrow();
                        s.model.after_crash(b, u64::MAX, s.model.flushed_upto())
                    })
                    .await;
                    match r {
                        Ok(live) => sh2.borrow_mut().model.restart(live),
                        Err(err) => fail(&sh2, err),
                    }
                    *d2.borrow_mut() = true;
                })
            });
            world.run_until(&sh, &mut rng, &mut steps, || *done.borrow())?;
            if let Some(f) = sh.borrow().run.failure.clone() {
                return Err(f);
            }
        }
        let refs = Rc::new(WorldRefs { mirror: world.mirror.clone(), reg: world.reg.clone(), inj: world.inj.clone(), conns: world.conns.clone() });
        for _ in 0..cfg.clients {
            let (sh2, e, c2, s) = (sh.clone(), world.entry.clone(), cfg.clone(), rng.random());
            world.cores.enter(rng.random_range(0..cfg.cores), || reactor::spawn_detached(client(sh2, e, c2, s)));
        }
        let (sh2, r2, c2, s) = (sh.clone(), refs.clone(), cfg.clone(), rng.random());
        world.cores.enter(world.home, || reactor::spawn_detached(controller(sh2, r2, c2, s)));
        if let Some(c) = &cfg.conn {
            let (sh2, r2, plan, settle) = (sh.clone(), refs.clone(), c.plan(life, &remote), c.host_wait_bound(cfg.host_wait_slack()));
            world.cores.enter(world.home, || reactor::spawn_detached(outages(sh2, r2, plan, settle)));
        }
        let crash = life < cfg.crashes;
        let crash_at = world.io_count() + rng.random_range(5..(cfg.clients * cfg.ops * 4) as u64 + 20);
        let r = world.run_until(&sh, &mut rng, &mut steps, || {
            let s = sh.borrow();
            s.run.finished() || (crash && world.io_count() >= crash_at)
        });
        if let Some(f) = sh.borrow().run.failure.clone() {
            if std::env::var("SEED").is_ok() {
                world.dump(cfg.data_blocks);
            }
            return Err(f);
        }
        r?;
        world.check_host_waits(&sh)?;
        if crash && world.io_count() >= crash_at {
            {
                let mut s = sh.borrow_mut();
                s.run.dead = true;
                s.out.crashes += 1;
                // A split whose instant passed is recorded on the legs: its image must survive.
                if let (Some((leg, name)), Some(t)) = (s.splitting.take(), s.split_t) {
                    let flushed = s.model.flushed_upto();
                    s.roles[leg] = Role::Crashed { name, t, flushed };
                }
            }
            super::schedule::trace(|| "crash".into());
            images = world.devs.iter().map(|d| d.crash()).collect();
            world.add_conn_stats(&sh);
            drop(refs);
            world.teardown(&mut rng);
            continue;
        }
        // No crash: heal and re-join every leg, let the rebuilds finish, then check the legs.
        if let Err(e) = check_not_dropped(&sh, &refs) {
            return Err(e);
        }
        sh.borrow_mut().healing = true;
        for c in world.conns.iter().flatten() {
            c.end_outage();
        }
        let (sh2, r2, n) = (sh.clone(), refs.clone(), cfg.data_blocks);
        let done = Rc::new(RefCell::new(false));
        let d2 = done.clone();
        let seed2: u64 = rng.random();
        let auto_wait = cfg.auto_rejoin.then(|| Duration::from_nanos(cfg.rejoin_ns * 20));
        world.cores.enter(world.home, || {
            reactor::spawn_detached(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(seed2);
                if let Some(wait) = auto_wait {
                    // Healed, failed legs come back by themselves (the rest is re-joined below).
                    for (i, inj) in r2.inj.iter().enumerate() {
                        inj.clear();
                        sh2.borrow_mut().injected[i] = false;
                    }
                    reactor::sleep(wait).await;
                }
                for _ in 0..200 {
                    let states = slot_states(&r2.mirror);
                    if states.values().all(|s| *s == "active") && r2.mirror.status().process.is_none() {
                        break;
                    }
                    if let Err(e) = rejoin_one(&sh2, &r2, &mut rng, n).await {
                        return fail(&sh2, e);
                    }
                    reactor::sleep(Duration::from_micros(500)).await;
                }
                let s = r2.mirror.status();
                if !(s.slots.iter().all(|x| x.state == "active") && s.process.is_none()) {
                    return fail(&sh2, format!("legs did not all come back: {s:?}"));
                }
                *d2.borrow_mut() = true;
            })
        });
        world.run_until(&sh, &mut rng, &mut steps, || *done.borrow() || sh.borrow().run.failure.is_some())?;
        if let Some(f) = sh.borrow().run.failure.clone() {
            return Err(f);
        }
        world.add_conn_stats(&sh);
        // Every leg is in sync: their data areas are identical, and the mirror reads right.
        let (a, b) = ((DATA_OFFSET * SIM_BLOCK as u64) as usize, leg_bytes);
        let first = world.devs[0].current_image()[a..b].to_vec();
        for (i, d) in world.devs.iter().enumerate().skip(1) {
            let img = d.current_image();
            if img[a..b] != first[..] {
                let bs = SIM_BLOCK as usize;
                let blk = (0..cfg.data_blocks as usize).find(|&k| img[a + k * bs..a + (k + 1) * bs] != first[k * bs..(k + 1) * bs]).unwrap_or(0);
                let t0 = tag_of(&first[blk * bs..(blk + 1) * bs], blk as u64);
                let ti = tag_of(&img[a + blk * bs..a + (blk + 1) * bs], blk as u64);
                if std::env::var("SEED").is_ok() {
                    world.dump(cfg.data_blocks);
                }
                return Err(format!(
                    "after the rebuilds, leg {i} differs from leg 0 at block {blk} (region {}): {ti:?} vs {t0:?}; {:?}",
                    blk as u64 / cfg.region_blocks,
                    world.mirror.status()
                ));
            }
        }
        {
            let mut s = sh.borrow_mut();
            s.out.rebuilds_checked += 1;
            s.out.auto_rejoins += world.mirror.status().slots.iter().map(|x| x.rejoins_auto).sum::<u64>();
        }
        let (sh2, e, n) = (sh.clone(), world.entry.clone(), cfg.data_blocks);
        let done = Rc::new(RefCell::new(false));
        let d2 = done.clone();
        world.cores.enter(world.home, || {
            reactor::spawn_detached(async move {
                let s_r = sh2.borrow_mut().model.tick();
                if let Err(err) = check_all(&e, n, "final read", |b| sh2.borrow().model.live_read(b, s_r, s_r + 1)).await {
                    fail(&sh2, err);
                }
                *d2.borrow_mut() = true;
            })
        });
        world.run_until(&sh, &mut rng, &mut steps, || *done.borrow())?;
        if let Some(f) = sh.borrow().run.failure.clone() {
            if std::env::var("SEED").is_ok() {
                world.dump(cfg.data_blocks);
            }
            return Err(f);
        }
        world.check_host_waits(&sh)?;
        drop(refs);
        world.teardown(&mut rng);
        break;
    }
    let mut out = sh.borrow().out.clone();
    out.conn_runs = cfg.conn.is_some() as u64;
    Ok(out)
}

/// Runs one seed. `Err` carries the failure, the seed and its configuration.
pub fn run_seed(seed: u64) -> Result<Outcome, String> {
    let cfg = Cfg::from_seed(seed);
    run(seed, &cfg).map_err(|e| format!("seed {seed}: {e}\n  config: {cfg:?}"))
}
