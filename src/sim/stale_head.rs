//! The stale head: a mirror served by one head (A) over remote legs, each leg with its own
//! latency (a remote leg slower than a local one, varying per I/O), while A's clients keep
//! writing, a second head (B) assembles the same mirror over the same legs with fencing
//! (`bdevs/mirror/fence.rs`: Register, Report, Preempt and Abort of A's key), through legs that
//! answer NVMe reservation commands with the target's own reservation code
//! (`super::resv_leg::ResvLeg`: a write of a non-holder is refused, a preempt drains the
//! preempted host's writes at the device first). A keeps writing after the fence; B writes.
//! Checked, per block, once every write of A has ended, on what B reads:
//! * every write A submitted after B's assembly returned failed, and none of them appears;
//! * B's own writes stand (no write of A lands over them, however slow A's leg);
//! * otherwise the block holds a write of A that a register allows: an acknowledged one not
//!   superseded by a later acknowledged one, or one that failed but was submitted before the
//!   fence (unacknowledged, it may or may not have landed); zero only if A had no write to
//!   it acknowledged. So B sees every write A acknowledged (before the fence or in flight at
//!   it: acknowledged means landed on every leg).
//!
//! In half the seeds B's node dies a seeded time after sending one of its writes (its views of
//! the legs answer nothing more; what it sent still completes at the devices), and B restarts
//! on the same node (same host identifier and key) and assembles the mirror again, once the
//! targets are done with its old commands: B's writes acknowledged before the crash stand
//! unless a later write of B replaced them, the one in flight may or may not have landed, and
//! A's post-fence writes still never appear.
//!
//! [`run_seed`] replays one seed (`tests/sim.rs`, `stale_head_simulation_seeds`).

use super::blocks::{fill, read_tags};
use super::device::{Latency, SimDevice, SIM_BLOCK};
use super::resv_leg::ResvLeg;
use crate::bdev::{Bdev, BdevEntry, BdevRegistry, Channel, IoBuf};
use crate::bdevs::mirror::fence::Fencing;
use crate::bdevs::mirror::{MirrorBdev, MirrorOptions, ProcessOptions};
use crate::reactor::{self, ManualCores};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// The metadata area of these small legs (the data starts at 1 MiB), as in `super::mirror`.
const DATA_OFFSET: u64 = 2048;
const MAX_STEPS: u64 = 2_000_000;
const MAX_SIM_NS: u64 = 120_000_000_000;
const KEY_A: u64 = 0xA1;
const KEY_B: u64 = 0xB2;

#[derive(Debug, Clone)]
struct Cfg {
    cores: usize,
    legs: usize,
    data_blocks: u64,
    clients: usize,
    ops: usize,
    /// Per leg: local (fast) or remote (slower, and varying more).
    latency: Vec<Latency>,
    /// When B starts its assembly.
    fence_at_ns: u64,
    b_writes: usize,
    /// A leg whose writes stall now and then (one in `.1`, by `.2` ns), or none.
    stall: Option<(usize, u32, u64)>,
    /// B's node dies `.1` ns after sending its write number `.0`, and B restarts and
    /// reassembles the mirror (same host, same key), or none.
    b_crash: Option<(usize, u64)>,
}

impl Cfg {
    fn from_seed(seed: u64) -> Cfg {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x57A1_E5EA);
        let legs = r.random_range(2..=3);
        let latency = (0..legs)
            .map(|_| {
                if r.random_bool(0.3) {
                    Latency { min_ns: 1_000, max_ns: r.random_range(5_000..=20_000) }
                } else {
                    let min_ns = r.random_range(20_000..=100_000);
                    Latency { min_ns, max_ns: min_ns + r.random_range(10_000..=2_000_000) }
                }
            })
            .collect();
        let mut cfg = Cfg {
            cores: r.random_range(1..=2),
            legs,
            data_blocks: r.random_range(8..=48),
            clients: r.random_range(1..=3),
            ops: r.random_range(5..=25),
            latency,
            fence_at_ns: r.random_range(0..=10_000_000),
            b_writes: r.random_range(1..=10),
            stall: r.random_bool(0.6).then(|| (r.random_range(0..legs), r.random_range(2..=8), r.random_range(2_000_000..=30_000_000))),
            // Drawn last: the fields above stay what they were for every seed.
            b_crash: None,
        };
        if r.random_bool(0.5) {
            cfg.b_crash = Some((r.random_range(0..cfg.b_writes), r.random_range(0..=3_000_000)));
        }
        cfg
    }
}

/// Counts of what the seeds did.
#[derive(Default, Debug, Clone)]
pub struct Outcome {
    pub seeds: u64,
    /// A's writes acknowledged / failed.
    pub a_acked: u64,
    pub a_failed: u64,
    /// A's writes submitted after the fence (all refused).
    pub a_after_fence: u64,
    /// A's writes in flight when B's assembly started (the preempt lands among them).
    pub a_in_flight_at_fence: u64,
    /// Of those, acknowledged (landed on every leg before the preempt completed).
    pub a_acked_across_fence: u64,
    pub b_writes: u64,
    /// Crashes and restarts of B, and B's writes acknowledged before its crash (each must
    /// survive it).
    pub b_crashes: u64,
    pub b_acked_before_crash: u64,
}

impl Outcome {
    pub fn add(&mut self, o: &Outcome) {
        self.seeds += o.seeds;
        self.a_acked += o.a_acked;
        self.a_failed += o.a_failed;
        self.a_after_fence += o.a_after_fence;
        self.a_in_flight_at_fence += o.a_in_flight_at_fence;
        self.a_acked_across_fence += o.a_acked_across_fence;
        self.b_writes += o.b_writes;
        self.b_crashes += o.b_crashes;
        self.b_acked_before_crash += o.b_acked_before_crash;
    }
}

#[derive(Debug, Clone)]
struct Write {
    tag: u64,
    block: u64,
    by_b: bool,
    submit_ns: u64,
    /// Completion time and success; None while in flight.
    done: Option<(u64, bool)>,
}

#[derive(Default)]
struct State {
    writes: Vec<Write>,
    next_tag: u64,
    /// When B's assembly started and returned.
    fence_start_ns: Option<u64>,
    fence_ns: Option<u64>,
    clients_left: usize,
    b_done: bool,
    /// When B's node died.
    b_crash_ns: Option<u64>,
    error: Option<String>,
}

type Sh = Rc<RefCell<State>>;

fn options(fencing: Fencing) -> MirrorOptions {
    MirrorOptions {
        region_bytes: 8 * SIM_BLOCK as u64,
        clean_interval_ns: 200_000,
        process: Some(Arc::new(ProcessOptions::new())),
        rejoin_interval_ns: 1_000_000,
        fencing: Some(fencing),
    }
}

async fn write(sh: &Sh, ch: &Channel, rng: &mut ChaCha8Rng, blocks: u64, by_b: bool) -> bool {
    let block = rng.random_range(0..blocks);
    let i = {
        let mut s = sh.borrow_mut();
        s.next_tag += 1;
        let tag = s.next_tag;
        s.writes.push(Write { tag, block, by_b, submit_ns: reactor::now_ns(), done: None });
        s.writes.len() - 1
    };
    let tag = sh.borrow().writes[i].tag;
    let mut buf = IoBuf::alloc(SIM_BLOCK as usize);
    fill(&mut buf[..], block, tag);
    let ok = ch.write_buf(block, &buf[..]).await.is_ok();
    sh.borrow_mut().writes[i].done = Some((reactor::now_ns(), ok));
    ok
}

async fn client_a(sh: Sh, m: Arc<BdevEntry>, cfg: Cfg, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if let Ok(ch) = Channel::get(&m) {
        for _ in 0..cfg.ops {
            // A refused write fails at once; a fenced head's clients slow down instead of
            // spending their writes during B's assembly, so that some come after it.
            let pause = if write(&sh, &ch, &mut rng, cfg.data_blocks, false).await { 200_000 } else { 2_000_000 };
            reactor::sleep(Duration::from_nanos(rng.random_range(0..=pause))).await;
        }
    } else {
        sh.borrow_mut().error = Some("A: no channel".into());
    }
    sh.borrow_mut().clients_left -= 1;
}

/// What B's restart needs: per leg, the disk and its reservations (the node's new view of the
/// leg is made from them), and the switches that kill B's old views.
struct BRestart {
    disks: Vec<(Arc<dyn Bdev>, Arc<crate::nvmf::reservation::Reservations>)>,
    dead: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

async fn head_b(sh: Sh, reg: Rc<BdevRegistry>, legs: Vec<String>, uuid: uuid::Uuid, cfg: Cfg, seed: u64, restart: BRestart) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    reactor::sleep(Duration::from_nanos(cfg.fence_at_ns)).await;
    sh.borrow_mut().fence_start_ns = Some(reactor::now_ns());
    let guards: Result<Vec<_>, String> = legs.iter().map(|l| reg.get(l).ok_or(format!("{l} missing"))?.claim("mb").map_err(|e| e.to_string())).collect();
    let m = match guards {
        Ok(g) => MirrorBdev::assemble("mb", g, Vec::new(), Some(uuid), options(Fencing { key: KEY_B, preempt: Some(KEY_A) })).await,
        Err(e) => return sh.borrow_mut().error = Some(e),
    };
    let m = match m {
        Ok(m) => m,
        Err(e) => return sh.borrow_mut().error = Some(format!("B's assembly failed: {e}")),
    };
    sh.borrow_mut().fence_ns = Some(reactor::now_ns());
    let e = match reg.register(m.clone() as Arc<dyn Bdev>) {
        Ok(e) => e,
        Err(e) => return sh.borrow_mut().error = Some(e.to_string()),
    };
    let Ok(mut ch) = Channel::get(&e) else { return sh.borrow_mut().error = Some("B: no channel".into()) };
    let (mut m, mut e) = (m, e);
    for k in 0..cfg.b_writes {
        let Some(delay) = cfg.b_crash.filter(|c| c.0 == k).map(|c| c.1) else {
            if !write(&sh, &ch, &mut rng, cfg.data_blocks, true).await {
                return sh.borrow_mut().error = Some("a write of B failed".into());
            }
            continue;
        };
        // Write k goes out and B's node dies `delay` ns later, the write possibly still in
        // flight: what B sent is at the devices or not, its answers are lost.
        let (sh2, e2, s2, n) = (sh.clone(), e.clone(), rng.random::<u64>(), cfg.data_blocks);
        let w = reactor::spawn(async move {
            if let Ok(ch) = Channel::get(&e2) {
                write(&sh2, &ch, &mut ChaCha8Rng::seed_from_u64(s2), n, true).await;
            }
        });
        reactor::sleep(Duration::from_nanos(delay)).await;
        restart.dead.iter().for_each(|d| d.store(true, std::sync::atomic::Ordering::SeqCst));
        sh.borrow_mut().b_crash_ns = Some(reactor::now_ns());
        w.await;
        // The dead head's mirror stops (its metadata writes go nowhere any more).
        let zombie = m.clone();
        reactor::spawn_detached(async move { zombie.shutdown().await });
        // The node restarts once the targets are done with its old connections' commands
        // (a quiescing target, as in `super::remote_leg`; a write of the dead head landing
        // after the new one's would be the late-execution hazard of notes/simconn.md).
        while restart.disks.iter().any(|(_, st)| st.in_flight_counter(&[2u8; 16]).load(std::sync::atomic::Ordering::SeqCst) > 0) {
            reactor::sleep(Duration::from_micros(50)).await;
        }
        // B restarts on the same node: the same host identifier and key, new views of the
        // legs, and assembles the mirror again (its reservation is still there: no preempt).
        let mut names = Vec::new();
        for (i, (disk, st)) in restart.disks.iter().enumerate() {
            let name = format!("h2r_d{i}");
            if let Err(x) = reg.register(Arc::new(ResvLeg::new(&name, disk.clone(), st.clone(), [2u8; 16]))) {
                return sh.borrow_mut().error = Some(x.to_string());
            }
            names.push(name);
        }
        let guards: Result<Vec<_>, String> = names.iter().map(|l| reg.get(l).ok_or(format!("{l} missing"))?.claim("mb2").map_err(|e| e.to_string())).collect();
        let m2 = match guards {
            Ok(g) => MirrorBdev::assemble("mb2", g, Vec::new(), Some(uuid), options(Fencing { key: KEY_B, preempt: Some(KEY_A) })).await,
            Err(x) => return sh.borrow_mut().error = Some(x),
        };
        m = match m2 {
            Ok(m) => m,
            Err(x) => return sh.borrow_mut().error = Some(format!("B's reassembly after its crash failed: {x}")),
        };
        e = match reg.register(m.clone() as Arc<dyn Bdev>) {
            Ok(e) => e,
            Err(x) => return sh.borrow_mut().error = Some(x.to_string()),
        };
        let Ok(c) = Channel::get(&e) else { return sh.borrow_mut().error = Some("B: no channel after the restart".into()) };
        ch = c;
    }
    // Every write of A ends (refused or landed), then B reads.
    while sh.borrow().clients_left > 0 {
        reactor::sleep(Duration::from_micros(100)).await;
    }
    reactor::sleep(Duration::from_millis(5)).await;
    match read_tags(&e, 0, cfg.data_blocks).await {
        Ok(tags) => {
            let r = check(&sh.borrow(), &tags);
            if let Err(x) = r {
                sh.borrow_mut().error = Some(x);
            }
        }
        Err(x) => sh.borrow_mut().error = Some(format!("B's read: {x}")),
    }
    m.shutdown().await;
    sh.borrow_mut().b_done = true;
}

fn check(s: &State, tags: &[u64]) -> Result<(), String> {
    let fence = s.fence_ns.ok_or("no fence")?;
    for w in s.writes.iter().filter(|w| !w.by_b && w.submit_ns > fence) {
        if w.done.is_some_and(|(_, ok)| ok) {
            return Err(format!("A's write {} to block {} submitted after the fence was acknowledged", w.tag, w.block));
        }
    }
    for (b, &got) in tags.iter().enumerate() {
        let b = b as u64;
        let ws: Vec<&Write> = s.writes.iter().filter(|w| w.block == b).collect();
        // B writes one at a time: its last acknowledged write to the block stands, or one of
        // its later writes that failed (B crashed with it in flight: landed or not).
        let b_failed_after = |t: u64| ws.iter().filter(|w| w.by_b && w.tag > t && w.done.is_some_and(|(_, ok)| !ok)).map(|w| w.tag).collect::<Vec<u64>>();
        if let Some(last_b) = ws.iter().filter(|w| w.by_b && w.done.is_some_and(|(_, ok)| ok)).max_by_key(|w| w.tag) {
            let mut ok = b_failed_after(last_b.tag);
            ok.push(last_b.tag);
            if !ok.contains(&got) {
                return Err(format!("block {b}: B's last acknowledged write is {}, reads {got}, allowed {ok:?} (writes: {ws:?})", last_b.tag));
            }
            continue;
        }
        let b_failed = b_failed_after(0);
        if b_failed.contains(&got) {
            continue;
        }
        let acked: Vec<&&Write> = ws.iter().filter(|w| w.done.is_some_and(|(_, ok)| ok)).collect();
        // Superseded: an acknowledged write submitted after this one ended.
        let superseded = |w: &Write| {
            let end = w.done.map_or(u64::MAX, |(t, _)| t);
            acked.iter().any(|x| x.submit_ns > end)
        };
        let mut ok: Vec<u64> = ws.iter().filter(|w| (w.done.is_some_and(|(_, ok)| ok) || w.submit_ns <= fence) && !superseded(w)).map(|w| w.tag).collect();
        if acked.is_empty() {
            ok.push(0);
        }
        if !ok.contains(&got) {
            return Err(format!("block {b}: reads {got}, allowed {ok:?} (fence at {fence} ns; writes: {ws:?})"));
        }
    }
    Ok(())
}

pub fn run_seed(seed: u64) -> Result<Outcome, String> {
    let cfg = Cfg::from_seed(seed);
    run(seed, &cfg).map_err(|e| format!("seed {seed}: {e}\n  config: {cfg:?}"))
}

fn run(seed: u64, cfg: &Cfg) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cores = ManualCores::new(cfg.cores);
    let reg = Rc::new(BdevRegistry::new(cfg.cores));
    let leg_bytes = ((DATA_OFFSET + cfg.data_blocks) * SIM_BLOCK as u64) as usize;
    let (mut legs_a, mut legs_b, mut devs) = (Vec::new(), Vec::new(), Vec::new());
    let mut restart = BRestart { disks: Vec::new(), dead: Vec::new() };
    for i in 0..cfg.legs {
        let mut dev = SimDevice::new(&format!("d{i}"), vec![0u8; leg_bytes], rng.random(), cfg.latency[i]);
        if let Some((_, one_in, ns)) = cfg.stall.filter(|s| s.0 == i) {
            dev = dev.with_stalls(one_in, ns);
        }
        let dev = Arc::new(dev);
        devs.push(dev.clone());
        let d: Arc<dyn Bdev> = dev;
        let st = ResvLeg::new_state();
        for (head, legs) in [(1u8, &mut legs_a), (2u8, &mut legs_b)] {
            let name = format!("h{head}_d{i}");
            let leg = ResvLeg::new(&name, d.clone(), st.clone(), [head; 16]);
            if head == 2 {
                restart.dead.push(leg.dead_switch());
            }
            reg.register(Arc::new(leg)).map_err(|e| e.to_string())?;
            legs.push(name);
        }
        restart.disks.push((d.clone(), st.clone()));
    }
    let sh: Sh = Rc::new(RefCell::new(State { clients_left: cfg.clients, ..State::default() }));
    let mut steps = 0u64;
    let mut step = |cores: &ManualCores, rng: &mut ChaCha8Rng| -> Result<(), String> {
        steps += 1;
        if steps > MAX_STEPS {
            return Err("step budget exhausted (livelock?)".into());
        }
        let idle = (0..cores.count()).all(|i| !cores.has_work(i));
        if idle && cores.next_timer().is_some_and(|t| t >= MAX_SIM_NS) {
            return Err("stuck: simulated time ran past its budget".into());
        }
        if super::schedule::step(cores, rng) {
            Ok(())
        } else {
            Err("deadlock: nothing to run and no timer".into())
        }
    };
    // Head A assembles and reserves the legs.
    let guards: Vec<_> = legs_a.iter().map(|l| reg.get(l).ok_or("leg")?.claim("ma").map_err(|e| e.to_string())).collect::<Result<_, String>>()?;
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    cores.enter(0, || {
        reactor::spawn_detached(async move {
            *o.borrow_mut() = Some(MirrorBdev::assemble("ma", guards, Vec::new(), None, options(Fencing { key: KEY_A, preempt: None })).await)
        })
    });
    while out.borrow().is_none() {
        step(&cores, &mut rng)?;
    }
    let ma = out.borrow_mut().take().ok_or("assembled")?.map_err(|e| format!("A's assembly failed: {e}"))?;
    let ea = reg.register(ma.clone() as Arc<dyn Bdev>).map_err(|e| e.to_string())?;
    for c in 0..cfg.clients {
        let (sh, ea, cfg2, s) = (sh.clone(), ea.clone(), cfg.clone(), rng.random());
        cores.enter(c % cfg.cores, || reactor::spawn_detached(client_a(sh, ea, cfg2, s)));
    }
    let (sh2, reg2, cfg2, s, uuid) = (sh.clone(), reg.clone(), cfg.clone(), rng.random(), ma.uuid());
    let legs = legs_b.clone();
    cores.enter(cfg.cores - 1, || reactor::spawn_detached(head_b(sh2, reg2, legs, uuid, cfg2, s, restart)));
    loop {
        {
            let s = sh.borrow();
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if s.b_done {
                // Every leg, not only the one B's reads went to, holds what B may read.
                for (i, d) in devs.iter().enumerate() {
                    let img = d.current_image();
                    let tags: Vec<u64> = (0..cfg.data_blocks)
                        .map(|b| {
                            let o = ((DATA_OFFSET + b) * SIM_BLOCK as u64) as usize;
                            img.get(o..o + 8).and_then(|x| x.try_into().ok()).map_or(0, u64::from_le_bytes)
                        })
                        .collect();
                    check(&s, &tags).map_err(|e| format!("leg {i}: {e}"))?;
                }
                break;
            }
        }
        step(&cores, &mut rng)?;
    }
    // A stops too (its periodic check would run forever).
    let m = ma.clone();
    cores.enter(0, || reactor::spawn_detached(async move { m.shutdown().await }));
    for _ in 0..100_000 {
        if step(&cores, &mut rng).is_err() || ((0..cores.count()).all(|c| !cores.has_work(c)) && ma.status().shut_down) {
            break;
        }
    }
    let s = sh.borrow();
    let fence = s.fence_ns.unwrap_or(u64::MAX);
    let start = s.fence_start_ns.unwrap_or(u64::MAX);
    let a = || s.writes.iter().filter(|w| !w.by_b);
    let across = || a().filter(|w| w.submit_ns <= start && w.done.is_none_or(|(t, _)| t > start));
    let out = Outcome {
        seeds: 1,
        a_acked: a().filter(|w| w.done.is_some_and(|(_, ok)| ok)).count() as u64,
        a_failed: a().filter(|w| w.done.is_some_and(|(_, ok)| !ok)).count() as u64,
        a_after_fence: a().filter(|w| w.submit_ns > fence).count() as u64,
        a_in_flight_at_fence: across().count() as u64,
        a_acked_across_fence: across().filter(|w| w.done.is_some_and(|(_, ok)| ok)).count() as u64,
        b_writes: s.writes.iter().filter(|w| w.by_b).count() as u64,
        b_crashes: s.b_crash_ns.is_some() as u64,
        b_acked_before_crash: s.b_crash_ns.map_or(0, |t| s.writes.iter().filter(|w| w.by_b && w.done.is_some_and(|(d, ok)| ok && d <= t)).count() as u64),
    };
    drop(s);
    for n in reg.list().iter().map(|e| e.name().to_string()).collect::<Vec<_>>() {
        let _ = reg.unregister(&n);
    }
    Ok(out)
}
