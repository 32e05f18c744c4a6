//! Deterministic simulation of preserve (DESIGN §5): the real CoW volume code, unchanged, on
//! [`ManualCores`] (several cores, messages between them, timers on simulated time) over two
//! [`SimDevice`]s, with every choice — which core runs next, each I/O's latency, the workload,
//! when to preserve, delete or crash, what a crash leaves on media — drawn from one seed.
//! The outcome is checked against [`model::Model`]:
//! * a sealed image reads exactly the last data of every write submitted before its preserve,
//!   and never changes (also across crashes);
//! * the live volume returns only data a register would (no lost or invented write);
//! * after a crash, nothing durable is lost, and snapshots come back as the rules say;
//! * nothing deadlocks (the scheduler never runs dry while work is pending);
//! * no host write waits for a preserve's metadata (every CoW header write takes
//!   [`HEADER_STALL_NS`] longer than other I/O, and no host write may take that long, except
//!   around a `freeze` preserve, which stops writes on purpose).
//!
//! `run_seed(seed)` replays one seed exactly; a failure message names the seed.

use super::blocks::{check_values, fill, read_tags};
use super::schedule::{idle, step, trace};
use super::tasks::{alive, fail, HasRun, RunState};
use super::{crash_point, device, model};
use crate::bdev::{BdevEntry, BdevRegistry, Channel};
use crate::bdevs::snapshot::{CowVolume, OpenParams, SnapshotBdev};
use crate::preserve::SnapshotState;
use crate::reactor::{self, ManualCores};
use device::{Latency, SimDevice, SIM_BLOCK};
use model::Model;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// The shape of one simulated run, drawn from the seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub cores: usize,
    pub grains: u64,
    pub grain_blocks: u64,
    pub clients: usize,
    pub ops_per_client: usize,
    /// Crashes (each followed by a restart) in the run.
    pub crashes: usize,
    pub max_snapshots: usize,
    pub latency: Latency,
    pub lock_region_grains: u32,
    /// Block size of the store device: 4096 makes pieces larger than the volume's blocks
    /// (copies and old-epoch updates of part of a piece).
    pub store_block: u32,
    /// Crash on purpose `k` store I/Os after a write reached the point (CoW rule 1's two
    /// commits, or rule 2's patch in place), instead of at a random I/O count (see
    /// [`run_seed_at_cow_split`], [`run_seed_at_cow_patch`]).
    pub crash_at_point: Option<(crash_point::Point, u64)>,
}

impl SimConfig {
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_C0F1);
        SimConfig {
            cores: r.random_range(1..=3),
            grains: r.random_range(4..=12),
            grain_blocks: if r.random_bool(0.5) { 8 } else { 16 },
            clients: r.random_range(2..=5),
            ops_per_client: r.random_range(10..=30),
            crashes: if r.random_bool(0.4) { r.random_range(1..=2) } else { 0 },
            max_snapshots: r.random_range(1..=4),
            latency: Latency { min_ns: 1_000, max_ns: r.random_range(5_000..=100_000) },
            lock_region_grains: [1, 2, 64][r.random_range(0..3)],
            store_block: if r.random_ratio(1, 4) { 4096 } else { SIM_BLOCK },
            crash_at_point: None,
        }
    }

    fn blocks(&self) -> u64 {
        self.grains * self.grain_blocks
    }

    fn store_bytes(&self) -> u64 {
        let slots = self.grains * (self.max_snapshots as u64 + 3) + 4;
        use crate::bdevs::snapshot::layout::{RECORDS_OFFSET, RECORD_BYTES};
        let bytes = RECORDS_OFFSET + 4096 * (slots * RECORD_BYTES as u64).div_ceil(4096) + 4096 + slots * self.grain_blocks * SIM_BLOCK as u64;
        bytes.div_ceil(4096) * 4096
    }
}

/// Counts of what a run did.
#[derive(Debug, Default, Clone)]
pub struct SimOutcome {
    pub steps: u64,
    pub writes: u64,
    pub reads: u64,
    pub preserves: u64,
    pub freezes: u64,
    pub deletes: u64,
    pub crashes: u64,
    pub sealed_checked: u64,
    /// Crashes placed at a point (`crash_at_point`).
    pub placed_crashes: u64,
}

impl SimOutcome {
    /// Adds another run's counts (for [`seeds::run_seeds`]).
    pub fn add(&mut self, o: &SimOutcome) {
        self.steps += o.steps;
        self.writes += o.writes;
        self.reads += o.reads;
        self.preserves += o.preserves;
        self.freezes += o.freezes;
        self.deletes += o.deletes;
        self.crashes += o.crashes;
        self.sealed_checked += o.sealed_checked;
        self.placed_crashes += o.placed_crashes;
    }
}

/// State shared by the tasks of one run (one thread: `Rc<RefCell>` is enough).
struct Shared {
    model: Model,
    run: RunState,
    out: SimOutcome,
    snaps: BTreeMap<String, Arc<BdevEntry>>,
    /// Freeze preserves running now, and started so far: host writes may wait for a freeze
    /// (it exists to be the classic comparison), for nothing else a preserve does.
    freezing: u32,
    freezes_started: u64,
}

type Sh = Rc<RefCell<Shared>>;

impl HasRun for Shared {
    fn run(&self) -> &RunState {
        &self.run
    }
    fn run_mut(&mut self) -> &mut RunState {
        &mut self.run
    }
}

/// The simulated world of one life (between restarts).
struct World {
    cores: ManualCores,
    registry: Arc<BdevRegistry>,
    base: Arc<SimDevice>,
    store: Arc<SimDevice>,
    vol: Arc<BdevEntry>,
    home: usize,
}

fn cow(e: &BdevEntry) -> &CowVolume {
    e.bdev().as_any().downcast_ref::<CowVolume>().expect("the volume is a CoW volume")
}

const MAX_STEPS: u64 = 3_000_000;

/// Every write to the CoW store's header (what a preserve, a seal, a delete records) takes this
/// much longer than other I/O, far beyond what any host write needs for itself (its own copy,
/// record commit and live write, behind at most a few overlapping writes' extent locks): a host
/// write that takes this long waited for a preserve's metadata (DESIGN §1 forbids it). With
/// records and the header in one group commit (before the header got its own committer in
/// `bdevs/snapshot/home.rs`), 96 of the first 100 seeds failed this check.
pub const HEADER_STALL_NS: u64 = 50_000_000;

impl World {
    fn start(cfg: &SimConfig, rng: &mut ChaCha8Rng, base_img: Vec<u8>, store_img: Vec<u8>, steps: &mut u64) -> Result<World, String> {
        let cores = ManualCores::new(cfg.cores);
        let registry = Arc::new(BdevRegistry::new(cfg.cores));
        let base = Arc::new(SimDevice::new("base", base_img, rng.random(), cfg.latency));
        // The store's format relies only on each 16-byte slot record being written whole, so
        // a crash tears the store in 16-byte units (stricter than real sectors): a commit that
        // needs two records to land together fails here.
        let store = Arc::new(
            SimDevice::new("store", store_img, rng.random(), cfg.latency)
                .with_block_size(cfg.store_block)
                .with_tear_bytes(crate::bdevs::snapshot::layout::RECORD_BYTES)
                .with_slow_writes(0..crate::bdevs::snapshot::layout::RECORDS_OFFSET, HEADER_STALL_NS),
        );
        let be = registry.register(base.clone()).map_err(|e| e.to_string())?;
        let se = registry.register(store.clone()).map_err(|e| e.to_string())?;
        let home = rng.random_range(0..cfg.cores);
        let params = OpenParams {
            name: "vol".into(),
            uuid: None,
            base: be.claim("vol").map_err(|e| e.to_string())?,
            store: se.claim("vol").map_err(|e| e.to_string())?,
            grain_kb: Some((cfg.grain_blocks * SIM_BLOCK as u64 / 1024) as u32),
            cores: cfg.cores,
            lock_region_grains: Some(cfg.lock_region_grains),
        };
        let opened = Rc::new(RefCell::new(None));
        let o = opened.clone();
        cores.enter(home, || reactor::spawn_detached(async move { *o.borrow_mut() = Some(CowVolume::open(params).await) }));
        while opened.borrow().is_none() {
            *steps += 1;
            if !step(&cores, rng) {
                return Err("opening the volume never finished".into());
            }
        }
        let (vol, snaps) = opened.borrow_mut().take().expect("checked")?;
        let vol = registry.register(Arc::new(vol)).map_err(|e| e.to_string())?;
        for s in snaps {
            registry.register(Arc::new(s)).map_err(|e| e.to_string())?;
        }
        Ok(World { cores, registry, base, store, vol, home })
    }

    /// Runs until `done` or idle; Err on deadlock or a step budget overrun.
    fn run_until(&self, rng: &mut ChaCha8Rng, steps: &mut u64, done: impl FnMut() -> bool) -> Result<(), String> {
        super::schedule::run_until(&self.cores, rng, steps, MAX_STEPS, done)
    }

    /// Closes the volume and lets every task end; devices must already be dead or quiet.
    fn teardown(self, rng: &mut ChaCha8Rng) {
        self.vol.bdev().destroy();
        let mut n = 0;
        while n < 200_000 && step(&self.cores, rng) {
            n += 1;
        }
        for name in self.registry.list().iter().map(|e| e.name().to_string()).collect::<Vec<_>>() {
            let _ = self.registry.unregister(&name);
        }
        drop(self.vol);
        drop(self.cores);
    }
}

async fn client(sh: Sh, vol: Arc<BdevEntry>, cfg: SimConfig, seed: u64) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let blocks = cfg.blocks();
    let ch = match Channel::get(&vol) {
        Ok(c) => c,
        Err(e) => return fail(&sh, format!("client channel: {e}")),
    };
    for _ in 0..cfg.ops_per_client {
        reactor::sleep(Duration::from_nanos(r.random_range(0..40_000))).await;
        if !alive(&sh) {
            return;
        }
        let n = r.random_range(1..=(2 * cfg.grain_blocks).min(blocks));
        let off = r.random_range(0..=blocks - n);
        match r.random_range(0..100) {
            0..55 => {
                let zero = r.random_ratio(1, 12);
                let tag = if zero { 0 } else { sh.borrow_mut().model.next_tag_take() };
                let mut buf = crate::bdev::IoBuf::alloc((n * SIM_BLOCK as u64) as usize);
                fill(&mut buf, off, tag);
                let id = sh.borrow_mut().model.begin_write(off, n, tag);
                trace(|| format!("write {tag} {off}+{n} (core {})", reactor::current_index()));
                let t0 = reactor::now_ns();
                let freezes0 = {
                    let s = sh.borrow();
                    s.freezes_started + s.freezing as u64
                };
                let res = if zero {
                    if r.random_bool(0.5) {
                        ch.write_zeroes(off, n).await
                    } else {
                        ch.unmap(off, n).await
                    }
                } else {
                    ch.write_buf(off, &buf[..]).await
                };
                if !alive(&sh) {
                    return;
                }
                if let Err(e) = res {
                    return fail(&sh, format!("write {off}+{n} failed: {e}"));
                }
                trace(|| format!("write {tag} done"));
                let waited = reactor::now_ns() - t0;
                let froze = {
                    let s = sh.borrow();
                    s.freezes_started + s.freezing as u64 != freezes0 || s.freezing > 0
                };
                if waited >= HEADER_STALL_NS && !froze {
                    return fail(
                        &sh,
                        format!("write {tag} {off}+{n} took {waited} ns: it waited for a preserve's header write (each takes {HEADER_STALL_NS} ns here)"),
                    );
                }
                let mut s = sh.borrow_mut();
                s.model.end_write(id);
                s.out.writes += 1;
            }
            55..80 => {
                let s_r = sh.borrow_mut().model.tick();
                let got = read_tags(&vol, off, n).await;
                if !alive(&sh) {
                    return;
                }
                let c_r = sh.borrow_mut().model.tick();
                let got = match got {
                    Ok(g) => g,
                    Err(e) => return fail(&sh, format!("live read {off}+{n}: {e}")),
                };
                let s = sh.borrow();
                if let Err(e) = check_values("live read", off, &got, |b| s.model.live_read(b, s_r, c_r)) {
                    drop(s);
                    return fail(&sh, e);
                }
                drop(s);
                sh.borrow_mut().out.reads += 1;
            }
            80..87 => {
                let s_f = sh.borrow_mut().model.tick();
                trace(|| "flush".to_string());
                let res = ch.flush().await;
                if !alive(&sh) {
                    return;
                }
                if let Err(e) = res {
                    return fail(&sh, format!("flush failed: {e}"));
                }
                sh.borrow_mut().model.flush_done(s_f);
            }
            _ => {
                let pick = {
                    let s = sh.borrow();
                    let names: Vec<&String> = s.snaps.keys().collect();
                    if names.is_empty() {
                        None
                    } else {
                        let name = names[r.random_range(0..names.len())].clone();
                        Some((name.clone(), s.snaps[&name].clone()))
                    }
                };
                let Some((name, e)) = pick else { continue };
                let s_r = sh.borrow_mut().model.tick();
                let got = read_tags(&e, off, n).await;
                if !alive(&sh) {
                    return;
                }
                let c_r = sh.borrow_mut().model.tick();
                let s = sh.borrow();
                let Some(sm) = s.model.snaps.get(&name) else { continue };
                let detached = e.bdev().as_any().downcast_ref::<SnapshotBdev>().and_then(|b| b.state()).is_none();
                let got = match got {
                    Ok(g) => g,
                    Err(_) if sm.deleting || detached => continue,
                    Err(err) => {
                        let msg = format!("snapshot {name} read {off}+{n}: {err}");
                        drop(s);
                        return fail(&sh, msg);
                    }
                };
                let r = check_values(&format!("snapshot {name} read"), off, &got, |b| match sm.pinned[b as usize] {
                    Some(v) if sm.pinned_at < s_r => vec![v],
                    _ if sm.taken_before_crash => vec![got[(b - off) as usize]],
                    _ => s.model.snap_read(b, sm.t, s_r, c_r),
                });
                drop(s);
                if let Err(e) = r {
                    return fail(&sh, e);
                }
            }
        }
    }
    sh.borrow_mut().run.clients_left -= 1;
}

/// Reads the whole of snapshot `name` and checks it: sealed images are pinned and compared
/// with the model's sealed set.
async fn check_snapshot(sh: &Sh, name: &str, blocks: u64) -> Result<(), String> {
    let e = match sh.borrow().snaps.get(name) {
        Some(e) => e.clone(),
        None => return Ok(()),
    };
    let sealed = e.bdev().as_any().downcast_ref::<SnapshotBdev>().and_then(|b| b.state()) == Some(SnapshotState::Sealed);
    let s_r = sh.borrow_mut().model.tick();
    let got = read_tags(&e, 0, blocks).await;
    if !alive(sh) {
        return Ok(());
    }
    let c_r = sh.borrow_mut().model.tick();
    let mut s = sh.borrow_mut();
    let Some(sm) = s.model.snaps.get(name).cloned() else { return Ok(()) };
    let detached = e.bdev().as_any().downcast_ref::<SnapshotBdev>().and_then(|b| b.state()).is_none();
    let got = match got {
        Ok(g) => g,
        Err(_) if sm.deleting || detached => return Ok(()),
        Err(e) => return Err(format!("snapshot {name}: {e}")),
    };
    check_values(&format!("snapshot {name} (sealed {sealed})"), 0, &got, |b| match sm.pinned[b as usize] {
        Some(v) if sm.pinned_at < s_r => vec![v],
        _ if sm.taken_before_crash => vec![got[b as usize]],
        _ => s.model.snap_read(b, sm.t, s_r, c_r),
    })?;
    if sealed {
        let now = s.model.tick();
        let m = s.model.snaps.get_mut(name).expect("present");
        m.pinned_at = m.pinned_at.min(now);
        m.sealed_seen = true;
        for (b, &g) in got.iter().enumerate() {
            m.pinned[b] = Some(g);
        }
        s.out.sealed_checked += 1;
    }
    Ok(())
}

/// One preserve of the controller, to its reply. The model's instant of the preserve is taken
/// in the same poll as the volume's epoch bump (`take_snapshot` bumps before its first await,
/// on the home core, where the controller runs), whether the controller awaits this or not.
async fn preserve(sh: Sh, registry: Arc<BdevRegistry>, vol: Arc<BdevEntry>, name: String, freeze: bool, blocks: u64) {
    if !alive(&sh) {
        return;
    }
    let sb = Arc::new(SnapshotBdev::new(cow(&vol), &name));
    let e = match registry.register(sb.clone()) {
        Ok(e) => e,
        Err(err) => return fail(&sh, format!("register {name}: {err}")),
    };
    {
        let mut s = sh.borrow_mut();
        let t = s.model.tick();
        let flushed_at_t = s.model.flushed_upto();
        s.model.snaps.insert(
            name.clone(),
            model::SnapModel {
                t,
                pinned: vec![None; blocks as usize],
                pinned_at: u64::MAX,
                sealed_seen: false,
                acked: false,
                deleting: false,
                taken_before_crash: false,
                flushed_at_t,
            },
        );
        s.snaps.insert(name.clone(), e);
    }
    if freeze {
        let mut s = sh.borrow_mut();
        s.freezing += 1;
        s.freezes_started += 1;
    }
    let res = cow(&vol).take_snapshot(&sb, freeze).await;
    if freeze {
        sh.borrow_mut().freezing -= 1;
    }
    if !alive(&sh) {
        return;
    }
    match res {
        Ok(_) => {
            let mut s = sh.borrow_mut();
            if let Some(m) = s.model.snaps.get_mut(&name) {
                m.acked = true;
            }
            s.out.preserves += 1;
            s.out.freezes += freeze as u64;
        }
        Err(err) => {
            let mut s = sh.borrow_mut();
            s.model.snaps.remove(&name);
            s.snaps.remove(&name);
            let _ = registry.unregister(&name);
            drop(s);
            if !err.to_string().contains("draining") {
                fail(&sh, format!("preserve {name}: {err}"));
            }
        }
    }
}

async fn controller(sh: Sh, registry: Arc<BdevRegistry>, vol: Arc<BdevEntry>, cfg: SimConfig, seed: u64, cores: usize) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let blocks = cfg.blocks();
    let mut n = 0u64;
    loop {
        reactor::sleep(Duration::from_nanos(r.random_range(10_000..200_000))).await;
        if !alive(&sh) {
            return;
        }
        if sh.borrow().run.clients_left == 0 {
            break;
        }
        let count = sh.borrow().snaps.len();
        match r.random_range(0..100) {
            0..40 if count < cfg.max_snapshots => {
                n += 1;
                let name = format!("snap{seed:x}-{n}");
                let freeze = r.random_ratio(1, 8);
                trace(|| format!("preserve {name} freeze {freeze}"));
                let task = preserve(sh.clone(), registry.clone(), vol.clone(), name, freeze, blocks);
                if freeze {
                    task.await;
                } else {
                    // The controller goes on while the preserve waits for its header (slow here:
                    // HEADER_STALL_NS), as an orchestrator's other calls would: several
                    // snapshots drain at once, and old-epoch writes meet shared slots.
                    reactor::spawn_detached(task);
                }
            }
            40..60 => {
                let pick = {
                    let s = sh.borrow();
                    s.snaps
                        .iter()
                        .filter(|(_, e)| e.bdev().as_any().downcast_ref::<SnapshotBdev>().and_then(|b| b.state()) == Some(SnapshotState::Sealed))
                        .map(|(k, e)| (k.clone(), e.clone()))
                        .collect::<Vec<_>>()
                };
                if pick.is_empty() {
                    continue;
                }
                let (name, e) = pick[r.random_range(0..pick.len())].clone();
                if let Some(m) = sh.borrow_mut().model.snaps.get_mut(&name) {
                    m.deleting = true;
                }
                let _ = registry.unregister(&name);
                let id = e.id();
                for c in 0..cores {
                    reactor::call_on(c, move || Channel::evict(id)).await;
                }
                trace(|| format!("delete {name}"));
                let res = cow(&vol).remove_snapshot(&name).await;
                if !alive(&sh) {
                    return;
                }
                if let Err(err) = res {
                    return fail(&sh, format!("delete {name}: {err}"));
                }
                let mut s = sh.borrow_mut();
                s.model.snaps.remove(&name);
                s.snaps.remove(&name);
                s.out.deletes += 1;
            }
            _ => {
                let names: Vec<String> = sh.borrow().snaps.keys().cloned().collect();
                if names.is_empty() {
                    continue;
                }
                let name = names[r.random_range(0..names.len())].clone();
                if let Err(e) = check_snapshot(&sh, &name, blocks).await {
                    return fail(&sh, e);
                }
            }
        }
    }
    sh.borrow_mut().run.controller_done = true;
}

/// After a restart: every snapshot the model knows comes back as the rules say, the live
/// volume lost nothing durable; then the observed images become the model's baseline.
async fn check_recovery(sh: Sh, vol: Arc<BdevEntry>, registry: Arc<BdevRegistry>, blocks: u64) {
    let infos = cow(&vol).snapshot_infos();
    let names: Vec<String> = sh.borrow().model.snaps.keys().cloned().collect();
    for info in &infos {
        if !names.contains(&info.name) {
            return fail(&sh, format!("after restart: unknown snapshot {}", info.name));
        }
        if info.state != SnapshotState::Sealed {
            return fail(&sh, format!("after restart: snapshot {} is {:?}", info.name, info.state));
        }
    }
    for name in names {
        let present = infos.iter().any(|i| i.name == name);
        let sm = sh.borrow().model.snaps[&name].clone();
        if !present {
            if sm.sealed_seen && !sm.deleting {
                return fail(&sh, format!("after restart: sealed snapshot {name} is gone"));
            }
            if sm.acked && !sm.deleting {
                return fail(&sh, format!("after restart: snapshot {name} is gone, though its preserve returned success"));
            }
            let mut s = sh.borrow_mut();
            s.model.snaps.remove(&name);
            s.snaps.remove(&name);
            continue;
        }
        let Some(e) = registry.get(&name) else { return fail(&sh, format!("after restart: snapshot {name} has no bdev")) };
        let got = match read_tags(&e, 0, blocks).await {
            Ok(g) => g,
            Err(err) => return fail(&sh, format!("after restart: snapshot {name}: {err}")),
        };
        let s = sh.borrow();
        let r = check_values(&format!("after restart: snapshot {name}"), 0, &got, |b| match sm.pinned[b as usize] {
            Some(v) => vec![v],
            None if sm.taken_before_crash => vec![got[b as usize]],
            None if sm.sealed_seen => s.model.snap_read(b, sm.t, u64::MAX, u64::MAX),
            None => s.model.after_crash(b, sm.t, sm.flushed_at_t),
        });
        drop(s);
        if let Err(err) = r {
            return fail(&sh, err);
        }
        let mut s = sh.borrow_mut();
        let now = s.model.tick();
        let m = s.model.snaps.get_mut(&name).expect("present");
        m.pinned = got.into_iter().map(Some).collect();
        m.pinned_at = now;
        m.sealed_seen = true;
        m.deleting = false;
        s.snaps.insert(name.clone(), e);
    }
    let got = match read_tags(&vol, 0, blocks).await {
        Ok(g) => g,
        Err(err) => return fail(&sh, format!("after restart: live volume: {err}")),
    };
    let s = sh.borrow();
    let r = check_values("after restart: live volume", 0, &got, |b| s.model.after_crash(b, u64::MAX, s.model.flushed_upto()));
    drop(s);
    if let Err(err) = r {
        return fail(&sh, err);
    }
    sh.borrow_mut().model.restart(got);
}

/// Final check of a run without a pending crash: every snapshot sealed and exact, the live
/// volume holds the last writes.
async fn check_final(sh: Sh, vol: Arc<BdevEntry>, blocks: u64) {
    let names: Vec<String> = sh.borrow().snaps.keys().cloned().collect();
    for name in names {
        let e = sh.borrow().snaps[&name].clone();
        let st = e.bdev().as_any().downcast_ref::<SnapshotBdev>().and_then(|b| b.state());
        if st != Some(SnapshotState::Sealed) {
            return fail(&sh, format!("final: snapshot {name} is {st:?}, not sealed"));
        }
        if let Err(err) = check_snapshot(&sh, &name, blocks).await {
            return fail(&sh, format!("final: {err}"));
        }
    }
    let s_r = sh.borrow_mut().model.tick();
    let got = match read_tags(&vol, 0, blocks).await {
        Ok(g) => g,
        Err(err) => return fail(&sh, format!("final: live volume: {err}")),
    };
    let s = sh.borrow();
    let r = check_values("final: live volume", 0, &got, |b| s.model.live_read(b, s_r, s_r + 1));
    drop(s);
    if let Err(err) = r {
        fail(&sh, err);
    }
}

/// Runs one seed. `Err` carries the failure and the seed.
pub fn run_seed(seed: u64) -> Result<SimOutcome, String> {
    let cfg = SimConfig::from_seed(seed);
    run(seed, &cfg).map_err(|e| format!("seed {seed}: {e}\n  config: {cfg:?}"))
}

/// Runs one seed with its crash placed at CoW rule 1 (an old-epoch write on a slot shared
/// with an older snapshot: the new slot's record is committed, then the old slot's). The shape
/// favours that rule (several snapshots, busy clients, slow devices so that old-epoch writes
/// are overtaken), and the crash comes 0 to 7 store I/Os after the write reached the commits:
/// before them, inside either (torn in 16-byte records), or between them. Every snapshot's
/// image is checked after the restart, as in every run.
pub fn run_seed_at_cow_split(seed: u64) -> Result<SimOutcome, String> {
    run_seed_at(seed, crash_point::Point::CowSplitCommits, 7, 0xC0_5911, "CoW rule 1")
}

/// Runs one seed with its crash placed at CoW rule 2 (an old-epoch write patches a slot in
/// place, right after the copy it patches was committed with a check): the crash comes 0 to 5
/// store I/Os later, before, inside or after the rewrite of the slot's record without its
/// check and the patch itself. Same shape as [`run_seed_at_cow_split`].
pub fn run_seed_at_cow_patch(seed: u64) -> Result<SimOutcome, String> {
    run_seed_at(seed, crash_point::Point::CowPatchInPlace, 5, 0xC0_9A7C, "CoW rule 2")
}

/// One seed shaped for old-epoch writes to be overtaken (several snapshots, busy clients, few
/// grains), with its one crash `0..=k_max` store I/Os after a write reached `point`.
fn run_seed_at(seed: u64, point: crash_point::Point, k_max: u64, salt: u64, what: &str) -> Result<SimOutcome, String> {
    let mut cfg = SimConfig::from_seed(seed);
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ salt);
    cfg.crashes = 1;
    cfg.crash_at_point = Some((point, r.random_range(0..=k_max)));
    cfg.max_snapshots = r.random_range(2..=4);
    cfg.clients = r.random_range(3..=5);
    cfg.grains = r.random_range(2..=6);
    run(seed, &cfg).map_err(|e| format!("seed {seed} (crash at {what}): {e}\n  config: {cfg:?}"))
}

pub fn run(seed: u64, cfg: &SimConfig) -> Result<SimOutcome, String> {
    let r = run_inner(seed, cfg);
    crash_point::set_hook(None);
    r
}

fn run_inner(seed: u64, cfg: &SimConfig) -> Result<SimOutcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blocks = cfg.blocks();
    let mut base_img = vec![0u8; (blocks * SIM_BLOCK as u64) as usize];
    let mut store_img = vec![0u8; cfg.store_bytes() as usize];
    let sh: Sh = Rc::new(RefCell::new(Shared {
        model: Model::new(blocks),
        run: RunState::default(),
        out: SimOutcome::default(),
        snaps: BTreeMap::new(),
        freezing: 0,
        freezes_started: 0,
    }));
    let mut steps = 0u64;
    for life in 0..=cfg.crashes {
        let world = World::start(cfg, &mut rng, base_img, store_img, &mut steps)?;
        {
            let mut s = sh.borrow_mut();
            s.run.new_life(cfg.clients);
            s.freezing = 0;
            s.snaps.retain(|_, _| false);
        }
        if life > 0 {
            let (sh2, vol, reg) = (sh.clone(), world.vol.clone(), world.registry.clone());
            world.cores.enter(world.home, || reactor::spawn_detached(check_recovery(sh2, vol, reg, blocks)));
            world.run_until(&mut rng, &mut steps, || idle(&world.cores))?;
            if let Some(f) = sh.borrow().run.failure.clone() {
                return Err(f);
            }
        }
        for c in 0..cfg.clients {
            let (sh2, vol, cfg2, cs) = (sh.clone(), world.vol.clone(), cfg.clone(), rng.random());
            world.cores.enter(rng.random_range(0..cfg.cores), || reactor::spawn_detached(client(sh2, vol, cfg2, cs)));
            let _ = c;
        }
        let (sh2, reg, vol, cfg2, cs) = (sh.clone(), world.registry.clone(), world.vol.clone(), cfg.clone(), rng.random());
        world.cores.enter(world.home, || reactor::spawn_detached(controller(sh2, reg, vol, cfg2, cs, cfg.cores)));
        let crash = life < cfg.crashes;
        let total_io = || world.base.submitted.load(Relaxed) + world.store.submitted.load(Relaxed);
        let crash_at = total_io() + rng.random_range(5..(cfg.clients * cfg.ops_per_client * 3) as u64 + 10);
        // A crash placed by the hook: the store I/O count at which it comes.
        let placed: Rc<std::cell::Cell<Option<u64>>> = Rc::new(std::cell::Cell::new(None));
        if let (Some((at, k)), true) = (cfg.crash_at_point, crash) {
            let (p, store) = (placed.clone(), world.store.submitted.clone());
            crash_point::set_hook(Some(Box::new(move |point| {
                if point == at && p.get().is_none() {
                    p.set(Some(store.load(Relaxed) + k));
                }
            })));
        }
        let crash_due = || match cfg.crash_at_point {
            Some(_) => placed.get().is_some_and(|at| world.store.submitted.load(Relaxed) >= at),
            None => total_io() >= crash_at,
        };
        let done = || {
            let s = sh.borrow();
            s.run.finished() || (crash && crash_due())
        };
        let r = world.run_until(&mut rng, &mut steps, done);
        if let Some(f) = sh.borrow().run.failure.clone() {
            return Err(f);
        }
        r?;
        crash_point::set_hook(None);
        if crash && crash_due() {
            // Crash: capture media, note which snapshots the target had sealed, kill the world.
            {
                let mut s = sh.borrow_mut();
                s.run.dead = true;
                let sealed: Vec<String> = s
                    .snaps
                    .iter()
                    .filter(|(_, e)| e.bdev().as_any().downcast_ref::<SnapshotBdev>().and_then(|b| b.state()) == Some(SnapshotState::Sealed))
                    .map(|(k, _)| k.clone())
                    .collect();
                for n in sealed {
                    if let Some(m) = s.model.snaps.get_mut(&n) {
                        m.sealed_seen = true;
                    }
                }
                s.out.crashes += 1;
                s.out.placed_crashes += placed.get().is_some() as u64;
            }
            trace(|| "CRASH".to_string());
            base_img = world.base.crash();
            store_img = world.store.crash();
            world.teardown(&mut rng);
            continue;
        }
        // The run ended without a crash: let seals finish, then check everything.
        world.run_until(&mut rng, &mut steps, || idle(&world.cores))?;
        let (sh2, vol) = (sh.clone(), world.vol.clone());
        world.cores.enter(world.home, || reactor::spawn_detached(check_final(sh2, vol, blocks)));
        world.run_until(&mut rng, &mut steps, || idle(&world.cores))?;
        if let Some(f) = sh.borrow().run.failure.clone() {
            return Err(f);
        }
        sh.borrow_mut().run.dead = true;
        base_img = Vec::new();
        store_img = Vec::new();
        world.teardown(&mut rng);
        break;
    }
    let _ = (base_img, store_img);
    let mut out = sh.borrow().out.clone();
    out.steps = steps;
    Ok(out)
}
