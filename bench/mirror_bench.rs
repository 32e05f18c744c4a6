//! mirror_bench: the mirror's figures, each as a ratio against a peer measured in the same run.
//!
//!     mirror_bench [--legs malloc|uring] [--size-mb 1024] [-t 5] [-q 32]
//!
//! 1. Write IOPS of a 2-leg mirror against one leg alone (random 4 KiB writes, QD `-q`).
//! 2. Time to re-join a leg split off while 1% of the regions were written, against the time
//!    to rebuild a blank leg in full (goal: close to 1%).
//! 3. Host write latency in the windows around a split against the same windows without one
//!    (a split must not pause host I/O).

mod prefill;

use clap::Parser;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark::bdev::{Bdev, BdevEntry, Channel, IoBuf};
use tidemark::bdevs::mirror::MirrorBdev;
use tidemark::config::Config;
use tidemark::reactor::{self, PollMode};
use tidemark::target::Target;

#[derive(Parser)]
#[command(name = "mirror_bench", about = "tidemark mirror benchmark (ratios against peers measured in the same run)")]
struct Args {
    /// Leg type: RAM (malloc) or files through io_uring in a temporary directory.
    #[arg(long, default_value = "malloc")]
    legs: String,
    /// Size of each leg in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mb: u64,
    /// Seconds per IOPS measurement.
    #[arg(short = 't', long, default_value_t = 5)]
    time: u64,
    /// Queue depth.
    #[arg(short = 'q', long, default_value_t = 32)]
    queue_depth: usize,
}

fn fail(msg: &str) -> ! {
    eprintln!("mirror_bench: {msg}");
    std::process::exit(1)
}

fn rpc(t: &Target, m: &str, p: serde_json::Value) -> serde_json::Value {
    t.call(m, Some(p)).unwrap_or_else(|e| fail(&format!("{m}: {e}")))
}

fn make_leg(t: &Target, a: &Args, name: &str) {
    match a.legs.as_str() {
        "malloc" => rpc(t, "bdev_malloc_create", serde_json::json!({"name": name, "num_blocks": a.size_mb * 256, "block_size": 4096})),
        "uring" => rpc(t, "bdev_uring_create", serde_json::json!({"name": name, "filename": format!("{name}.img"), "size_mb": a.size_mb, "block_size": 4096})),
        other => fail(&format!("unknown leg type {other}")),
    };
}

/// Random 4 KiB writes at depth `qd` for `secs` (or until `stop`); per-I/O (completion time,
/// latency) samples when `samples` is given.
async fn write_load(e: Arc<BdevEntry>, qd: usize, secs_ns: u64, samples: Option<Rc<RefCell<Vec<(u64, u64)>>>>) -> (u64, Histogram<u64>) {
    let ch = Channel::get(&e).unwrap_or_else(|x| fail(&x.to_string()));
    let blocks = ch.num_blocks();
    let end = reactor::now_ns() + secs_ns;
    let ops = Rc::new(std::cell::Cell::new(0u64));
    let hist = Rc::new(RefCell::new(Histogram::<u64>::new(3).expect("histogram")));
    let mut tasks = Vec::new();
    for w in 0..qd {
        let (ch, ops, hist, samples) = (ch.clone(), ops.clone(), hist.clone(), samples.clone());
        tasks.push(reactor::spawn(async move {
            let mut buf = IoBuf::alloc(4096);
            buf.fill(w as u8);
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
            while reactor::now_ns() < end {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = x % blocks;
                let t0 = reactor::now_ns();
                if let Err(e) = ch.write_buf(off, &buf).await {
                    fail(&format!("write failed: {e}"));
                }
                let t1 = reactor::now_ns();
                let _ = hist.borrow_mut().record(t1 - t0);
                if let Some(s) = &samples {
                    s.borrow_mut().push((t1, t1 - t0));
                }
                ops.set(ops.get() + 1);
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    let h = hist.borrow().clone();
    (ops.get(), h)
}

/// IOPS and the p99 and p99.9 latency in µs. The load is closed-loop on one core: a task whose
/// writes complete in place yields once its budget is spent (`TASK_BUDGET` completions, one per
/// bdev layer), and the write that yields waits for every other task's turn; that wait is in
/// its latency. One layer spends the budget once per write, a mirror three times (its own and
/// each leg's), so the yields reach the mirror's p99 and only the single leg's p99.9.
fn iops(t: &Target, bdev: &str, a: &Args) -> (f64, f64, f64) {
    let e = t.bdevs.get(bdev).unwrap_or_else(|| fail(&format!("no {bdev}")));
    let (qd, ns) = (a.queue_depth, a.time * 1_000_000_000);
    let (ops, h) = t.reactors.call_async(0, Duration::from_secs(a.time + 60), move || write_load(e, qd, ns, None)).unwrap_or_else(|e| fail(&e.to_string()));
    (ops as f64 / a.time as f64, h.value_at_quantile(0.99) as f64 / 1000.0, h.value_at_quantile(0.999) as f64 / 1000.0)
}

fn mirror(t: &Target, name: &str) -> Arc<dyn Bdev> {
    let e = t.bdevs.get(name).unwrap_or_else(|| fail("no mirror"));
    e.bdev().clone()
}

fn as_mirror(b: &Arc<dyn Bdev>) -> &MirrorBdev {
    b.as_any().downcast_ref::<MirrorBdev>().expect("a mirror")
}

/// Waits until leg `leg` of mirror `m` is active; returns the time it took from `t0`.
fn wait_active(m: &Arc<dyn Bdev>, leg: &str, t0: Instant) -> Duration {
    loop {
        let st = as_mirror(m).status();
        if st.slots.iter().any(|s| s.name == leg && s.state == "active") {
            return t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            fail(&format!("{leg} did not come back: {st:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("tidemark-mirror-bench-{}", std::process::id()));
    let mut cfg = Config::parse("").unwrap_or_else(|e| fail(&e));
    cfg.reactor.cores = None;
    cfg.reactor.cpumask = Some("0x1".into());
    cfg.reactor.poll_mode = PollMode::Busy;
    cfg.metrics.listen.clear();
    cfg.daemon.data_dir = dir.clone();
    let (reactors, target) = tidemark::daemon::start_target(cfg).unwrap_or_else(|e| fail(&e));
    let t = &*target;
    println!("mirror_bench: legs {} of {} MiB, 4 KiB random writes, QD {}, {} s per run, 1 busy-polling core", a.legs, a.size_mb, a.queue_depth, a.time);

    // 1. Mirror write IOPS against a single leg.
    make_leg(t, &a, "single");
    make_leg(t, &a, "l0");
    make_leg(t, &a, "l1");
    rpc(t, "bdev_raid_create", serde_json::json!({"name": "m0", "raid_level": "raid1", "base_bdevs": ["l0", "l1"]}));
    // Warm both (every region's write-intent bit set once), then measure.
    let warm = Args { time: 1, ..Args::parse() };
    iops(t, "single", &warm);
    iops(t, "m0", &warm);
    // Every block written once first: RAM legs are backed lazily and files allocate on first
    // write, and neither cost belongs in a steady-state comparison.
    for b in ["single", "m0"] {
        prefill::prefill(t, b).unwrap_or_else(|e| fail(&e));
    }
    let (single, single_p99, single_p999) = iops(t, "single", &a);
    let (mirror_iops, mirror_p99, mirror_p999) = iops(t, "m0", &a);
    println!(
        "[1] write IOPS: single leg {single:.0} (p99 {single_p99:.1} us, p99.9 {single_p999:.1} us), 2-leg mirror {mirror_iops:.0} (p99 {mirror_p99:.1} us, p99.9 {mirror_p999:.1} us); ratio mirror/single = {:.3}",
        mirror_iops / single
    );

    // 2. Re-join after a split with 1% of the regions written, against a full rebuild.
    let m = mirror(t, "m0");
    let g = as_mirror(&m).geometry();
    rpc(t, "bdev_snapshot_create", serde_json::json!({"bdev_name": "m0", "snapshot_name": "img", "method": "split", "base_bdev": "l1", "wait_sealed": true}));
    let dirty = (g.num_regions / 100).max(1);
    let e = t.bdevs.get("m0").expect("m0");
    let rb = g.region_blocks;
    t.reactors
        .call_async(0, Duration::from_secs(60), move || async move {
            let ch = Channel::get(&e).expect("channel");
            let buf = IoBuf::zeroed(4096);
            for i in 0..dirty {
                let r = i * 100 % g.num_regions;
                ch.write_buf(r * rb, &buf).await.expect("write");
            }
        })
        .unwrap_or_else(|e| fail(&e.to_string()));
    rpc(t, "bdev_snapshot_delete", serde_json::json!({"name": "img"}));
    let t0 = Instant::now();
    let added = rpc(t, "bdev_raid_add_base_bdev", serde_json::json!({"raid_bdev": "m0", "base_bdev": "l1"}));
    let rejoin = wait_active(&m, "l1", t0);
    make_leg(t, &a, "l2");
    let t0 = Instant::now();
    let full = rpc(t, "bdev_raid_add_base_bdev", serde_json::json!({"raid_bdev": "m0", "base_bdev": "l2"}));
    let full_time = wait_active(&m, "l2", t0);
    println!(
        "[2] re-join after a split with {} of {} regions written: {} regions copied in {:.1} ms; full rebuild: {} regions in {:.1} ms; ratio = {:.4} (regions ratio {:.4})",
        dirty,
        g.num_regions,
        added["regions_to_copy"],
        rejoin.as_secs_f64() * 1e3,
        full["regions_to_copy"],
        full_time.as_secs_f64() * 1e3,
        rejoin.as_secs_f64() / full_time.as_secs_f64(),
        dirty as f64 / g.num_regions as f64
    );

    // 3. Host write latency around a split against windows without one.
    let e = t.bdevs.get("m0").expect("m0");
    let secs = a.time.max(3);
    let qd = a.queue_depth;
    let split_at = Arc::new(std::sync::Mutex::new(None::<u64>));
    let split_at2 = split_at.clone();
    let t_arc = target.clone();
    let splitter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(secs * 500));
        let before = t_arc.reactors.call(0, reactor::now_ns).unwrap_or(0);
        let r = t_arc.call(
            "bdev_snapshot_create",
            Some(serde_json::json!({"bdev_name": "m0", "snapshot_name": "img2", "method": "split", "base_bdev": "l2", "wait_sealed": true})),
        );
        let after = t_arc.reactors.call(0, reactor::now_ns).unwrap_or(0);
        *split_at2.lock().unwrap_or_else(|e| e.into_inner()) = Some(before);
        (r.is_ok(), after.saturating_sub(before))
    });
    let collected: Vec<(u64, u64)> = t
        .reactors
        .call_async(0, Duration::from_secs(secs + 60), move || async move {
            let s2 = Rc::new(RefCell::new(Vec::new()));
            write_load(e, qd, secs * 1_000_000_000, Some(s2.clone())).await;
            let v = s2.borrow().clone();
            v
        })
        .unwrap_or_else(|e| fail(&e.to_string()));
    let (ok, split_ns) = splitter.join().expect("splitter");
    if !ok {
        fail("the split failed");
    }
    let at = split_at.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or(0);
    // The window: from the split's request to 50 ms after its seal; compared with windows of
    // the same length elsewhere in the run.
    let win = split_ns + 50_000_000;
    let stats = |from: u64| {
        let v: Vec<u64> = collected.iter().filter(|(t, _)| *t >= from && *t < from + win).map(|(_, l)| *l).collect();
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        for l in &v {
            let _ = h.record(*l);
        }
        (h.value_at_quantile(0.99) as f64 / 1000.0, h.max() as f64 / 1000.0, v.len())
    };
    let (sp99, smax, sn) = stats(at);
    let first = collected.first().map(|x| x.0).unwrap_or(0);
    let mut others = Vec::new();
    let mut from = first + 100_000_000;
    while from + win < at {
        others.push(stats(from));
        from += win;
    }
    let from_after = at + win + 100_000_000;
    let mut f = from_after;
    while f + win < collected.last().map(|x| x.0).unwrap_or(0) {
        others.push(stats(f));
        f += win;
    }
    let n = others.len().max(1) as f64;
    let op99 = others.iter().map(|x| x.0).sum::<f64>() / n;
    let omax = others.iter().map(|x| x.1).sum::<f64>() / n;
    println!(
        "[3] host write latency: window around the split ({:.1} ms from request to seal, {} I/Os): p99 {sp99:.1} us, max {smax:.1} us; {} other windows: mean p99 {op99:.1} us, mean max {omax:.1} us; ratios p99 {:.2}, max {:.2}",
        split_ns as f64 / 1e6,
        sn,
        others.len(),
        sp99 / op99.max(0.001),
        smax / omax.max(0.001)
    );
    drop(m);
    target.shutdown();
    reactors.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
