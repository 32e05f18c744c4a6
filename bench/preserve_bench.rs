//! preserve_bench: what a preserve costs the host, against the classic freeze, in one run.
//!
//!     preserve_bench [--dir DIR] [--size-mb 256] [--grain-kb 64] [-q 32] [-t 40] [--interval 5]
//!                    [--window-ms 1000] [-m 0x1] [--layer-cost-only]
//!
//! A CoW volume over two files through `uring` (base pre-filled, store pre-written so that the
//! file system does not allocate during the run) takes 4 KiB random writes at depth 32 from an
//! in-process job while the main thread preserves through the real RPC handler every
//! `--interval` seconds, alternately the tidemark way and with `freeze: true` (stop new I/O,
//! drain, switch, resume). The previous snapshot is deleted half an interval later, so the
//! store never fills. Every I/O's completion time and latency is kept; the run prints max and
//! p99.9 of the host-visible write latency in the windows that follow each kind of preserve
//! (`--window-ms`), in the windows after each delete, and in the rest ("normal"), with ratios.
//! A first phase measures what the CoW layer costs a volume with no snapshot against its base
//! written directly (on RAM bdevs and on the files, pairs of runs A B A B).
//! A last phase measures first writes after a preserve (each to a grain not yet copied)
//! against plain writes to the same grains, and the lookup tables' RAM per copied grain.

mod prefill;

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark::bdev::{Channel, IoBuf};
use tidemark::bdevs::snapshot::CowVolume;
use tidemark::config::Config;
use tidemark::reactor;

#[derive(Parser)]
#[command(name = "preserve_bench", about = "host-visible cost of preserve vs freeze, in one run")]
struct Args {
    /// Directory for the base and store files (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 256)]
    size_mb: u64,
    #[arg(long, default_value_t = 64)]
    grain_kb: u32,
    #[arg(short = 'q', long, default_value_t = 32)]
    queue_depth: usize,
    #[arg(short = 'o', long, default_value_t = 4096)]
    io_size: usize,
    /// Seconds of the mixed phase.
    #[arg(short = 't', long, default_value_t = 40)]
    time: u64,
    /// Seconds between preserves.
    #[arg(long, default_value_t = 5)]
    interval: u64,
    /// Length of the window after each preserve or delete, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    #[arg(short = 'm', long, default_value = "0x1")]
    cpumask: String,
    /// Stop after the first phase (the CoW layer's cost with no snapshot).
    #[arg(long)]
    layer_cost_only: bool,
}

fn fail(msg: &str) -> ! {
    eprintln!("preserve_bench: {msg}");
    std::process::exit(1)
}

/// Writes `mb` MiB of a byte to `path` (real blocks, not a sparse file).
fn prefill_file(path: &std::path::Path, mb: u64, byte: u8) {
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    let chunk = vec![byte; 1 << 20];
    for _ in 0..mb {
        f.write_all(&chunk).unwrap_or_else(|e| fail(&e.to_string()));
    }
    f.sync_all().unwrap_or_else(|e| fail(&e.to_string()));
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Cow,
    Freeze,
    Delete,
}

struct Stats {
    hist: Histogram<u64>,
    ops: u64,
    span_ns: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats { hist: Histogram::new(3).expect("histogram"), ops: 0, span_ns: 0 }
    }
    fn p999_us(&self) -> f64 {
        self.hist.value_at_quantile(0.999) as f64 / 1e3
    }
    fn max_us(&self) -> f64 {
        self.hist.max() as f64 / 1e3
    }
    fn iops(&self) -> f64 {
        if self.span_ns == 0 {
            0.0
        } else {
            self.ops as f64 / (self.span_ns as f64 / 1e9)
        }
    }
}

/// Samples kept in chunks of fixed size: growing one vector of millions of samples would copy
/// it on the reactor's thread, and that copy (tens of ms) showed up as host latency.
#[derive(Default)]
struct Samples(Vec<Vec<(u64, u64)>>);

impl Samples {
    const CHUNK: usize = 1 << 16;

    fn push(&mut self, s: (u64, u64)) {
        match self.0.last_mut() {
            Some(c) if c.len() < Self::CHUNK => c.push(s),
            _ => {
                let mut c = Vec::with_capacity(Self::CHUNK);
                c.push(s);
                self.0.push(c);
            }
        }
    }
}

/// Random writes at depth `qd` for `secs` (or over `grains` once each when given); returns
/// (completion time since `t0` in ns, latency in ns) of every write.
async fn write_job(
    ch: Channel,
    qd: usize,
    io_blocks: u64,
    slots: u64,
    t0: Instant,
    stop: Arc<AtomicBool>,
    grains: Option<(Rc<Vec<u64>>, u64)>,
) -> Vec<(u64, u64)> {
    let out = Rc::new(RefCell::new(Samples::default()));
    let next = Rc::new(std::cell::Cell::new(0usize));
    let mut tasks = Vec::new();
    for i in 0..qd {
        let (ch, out, stop, next, grains) = (ch.clone(), out.clone(), stop.clone(), next.clone(), grains.clone());
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        tasks.push(reactor::spawn(async move {
            let mut buf = IoBuf::alloc((io_blocks * 512) as usize);
            buf.fill(0xC3);
            loop {
                let off = match &grains {
                    Some((list, grain_blocks)) => {
                        let k = next.get();
                        if k >= list.len() {
                            break;
                        }
                        next.set(k + 1);
                        list[k] * grain_blocks
                    }
                    None => {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        (rng % slots) * io_blocks
                    }
                };
                let s = Instant::now();
                if let Err(e) = ch.write_buf(off, &buf).await {
                    fail(&format!("write failed: {e}"));
                }
                let e = Instant::now();
                out.borrow_mut().push(((e - t0).as_nanos() as u64, (e - s).as_nanos() as u64));
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    let chunks = Rc::try_unwrap(out).map(|r| r.into_inner()).unwrap_or_else(|_| fail("a task outlived the job"));
    chunks.0.concat()
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let a = Args::parse();
    if a.io_size % 512 != 0 || a.io_size == 0 || a.queue_depth == 0 || a.interval == 0 {
        fail("bad arguments");
    }
    let tmp = tempfile_dir(&a);
    let dir = tmp.as_path();
    // Two snapshots live at once (the previous one is deleted half an interval later).
    let store_mb = 2 * a.size_mb + a.size_mb / 8 + 16;
    eprintln!("preparing {} MiB base and {store_mb} MiB store in {}", a.size_mb, dir.display());
    prefill_file(&dir.join("base.img"), a.size_mb, 0x5A);
    prefill_file(&dir.join("store.img"), store_mb, 0);
    let text = format!(
        "[daemon]\ndata_dir = {:?}\nbuffer_pool_mb = 64\n[reactor]\ncpumask = {:?}\npoll_mode = \"busy\"\n[metrics]\nlisten = \"\"\n\
         [[bdev]]\nmethod = \"bdev_uring_create\"\nparams = {{ name = \"base\", filename = \"base.img\", block_size = 512 }}\n\
         [[bdev]]\nmethod = \"bdev_uring_create\"\nparams = {{ name = \"store\", filename = \"store.img\", block_size = 512 }}\n\
         [[bdev]]\nmethod = \"bdev_cow_create\"\nparams = {{ name = \"vol\", base_bdev = \"base\", store_bdev = \"store\", grain_kb = {} }}\n\
         [[bdev]]\nmethod = \"bdev_malloc_create\"\nparams = {{ name = \"rbase\", num_blocks = {}, block_size = 512 }}\n\
         [[bdev]]\nmethod = \"bdev_malloc_create\"\nparams = {{ name = \"rstore\", num_blocks = {}, block_size = 512 }}\n\
         [[bdev]]\nmethod = \"bdev_cow_create\"\nparams = {{ name = \"rvol\", base_bdev = \"rbase\", store_bdev = \"rstore\", grain_kb = {} }}\n",
        dir.display().to_string(),
        a.cpumask,
        a.grain_kb,
        a.size_mb * 2048,
        RAM_STORE_MB * 2048,
        a.grain_kb
    );
    let cfg = Config::parse(&text).unwrap_or_else(|e| fail(&e));
    let (reactors, target) = tidemark::daemon::start_target(cfg).unwrap_or_else(|e| fail(&e));
    tidemark::daemon::apply_config(&target).unwrap_or_else(|e| fail(&e));
    let entry = target.bdevs.get("vol").unwrap_or_else(|| fail("no volume"));
    let io_blocks = (a.io_size / 512) as u64;
    let slots = entry.bdev().num_blocks() / io_blocks;
    let grain_blocks = a.grain_kb as u64 * 2;
    let num_grains = entry.bdev().num_blocks() / grain_blocks;
    // Phase 0: what the CoW layer costs a volume nobody preserves (no snapshot), against its
    // base bdev written directly, in pairs A B A B: on RAM (the layer's CPU cost shows) and
    // on the files.
    prefill::prefill(&target, "rbase").unwrap_or_else(|e| fail(&e));
    for (vol, base, what) in [("rvol", "rbase", "RAM"), ("vol", "base", "files")] {
        let (mut v, mut b) = (Vec::new(), Vec::new());
        // One pair not counted: the first runs pay for the cores' buffer pools and caches
        // (the first counted pair read 0.74-0.79 in every run on a quiet machine, the others
        // 0.9-1.05).
        timed_writes(&target, vol, a.queue_depth, io_blocks);
        timed_writes(&target, base, a.queue_depth, io_blocks);
        for _ in 0..PAIRS {
            v.push(timed_writes(&target, vol, a.queue_depth, io_blocks));
            b.push(timed_writes(&target, base, a.queue_depth, io_blocks));
        }
        let pairs: Vec<String> = v.iter().zip(&b).map(|(x, y)| format!("{:.3}", x / y)).collect();
        println!(
            "CoW volume with no snapshot / its base ({what}, {} B random writes QD {}, {PAIRS} pairs of {PAIR_SECS} s): {:.0} / {:.0} IOPS (medians), ratio {:.3} (goal >= 0.97); pairs {}",
            a.io_size,
            a.queue_depth,
            median(&mut v),
            median(&mut b),
            median(&mut v.clone()) / median(&mut b.clone()),
            pairs.join(" ")
        );
    }
    let rvol = target.bdevs.get("rvol").unwrap_or_else(|| fail("no rvol"));
    let locks = rvol.bdev().as_any().downcast_ref::<CowVolume>().unwrap_or_else(|| fail("rvol is not a CoW volume")).lock_stats();
    println!("extent locks taken by those writes on the RAM volume: {} (none while nothing is preserved)", locks.acquired);
    if a.layer_cost_only {
        target.shutdown();
        reactors.stop();
        if a.dir.is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
        return;
    }

    let h = target.reactors.clone();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    // Phase 1: random writes, preserves alternately tidemark's way and frozen, deletes.
    let job = {
        let (entry, h, stop, qd) = (entry.clone(), h.clone(), stop.clone(), a.queue_depth);
        std::thread::spawn(move || {
            h.call_async(0, Duration::from_secs(3600), move || async move {
                let ch = Channel::get(&entry).unwrap_or_else(|e| fail(&e.to_string()));
                write_job(ch, qd, io_blocks, slots, t0, stop, None).await
            })
        })
    };
    let mut events: Vec<(Kind, u64, u64)> = Vec::new(); // kind, start ns, rpc duration ns
    let mut n = 0;
    let mut prev: Option<String> = None;
    let deadline = t0 + Duration::from_secs(a.time);
    std::thread::sleep(Duration::from_secs(a.interval));
    while Instant::now() + Duration::from_secs(a.interval) <= deadline {
        n += 1;
        let freeze = n % 2 == 0;
        let name = format!("bench{n}");
        let s = Instant::now();
        let r = target.call("bdev_snapshot_create", Some(json!({"bdev_name": "vol", "snapshot_name": name, "freeze": freeze})));
        let d = s.elapsed();
        if let Err(e) = r {
            fail(&format!("preserve: {e}"));
        }
        events.push((if freeze { Kind::Freeze } else { Kind::Cow }, (s - t0).as_nanos() as u64, d.as_nanos() as u64));
        std::thread::sleep(Duration::from_millis(a.interval * 500));
        if let Some(p) = prev.take() {
            let s = Instant::now();
            // Wait for the seal (a draining snapshot cannot be deleted).
            while target.call("bdev_snapshot_get", Some(json!({"name": p}))).map(|v| v[0]["state"] == "sealed").unwrap_or(false) == false {
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Err(e) = target.call("bdev_snapshot_delete", Some(json!({"name": p}))) {
                fail(&format!("delete: {e}"));
            }
            events.push((Kind::Delete, (s - t0).as_nanos() as u64, s.elapsed().as_nanos() as u64));
        }
        prev = Some(name);
        std::thread::sleep(Duration::from_millis(a.interval * 500));
    }
    stop.store(true, Ordering::Relaxed);
    let samples = job.join().expect("job thread").unwrap_or_else(|e| fail(&e.to_string()));
    let end_ns = samples.iter().map(|s| s.0).max().unwrap_or(0);

    // Classify every write by the window its completion falls in.
    let win = a.window_ms * 1_000_000;
    let mut by = [Stats::new(), Stats::new(), Stats::new(), Stats::new()]; // cow, freeze, delete, normal
    let class = |t: u64| events.iter().find(|(_, s, _)| t >= *s && t < s + win).map(|(k, _, _)| *k);
    for &(t, lat) in &samples {
        let i = match class(t) {
            Some(Kind::Cow) => 0,
            Some(Kind::Freeze) => 1,
            Some(Kind::Delete) => 2,
            None => 3,
        };
        by[i].ops += 1;
        let _ = by[i].hist.record(lat.max(1));
    }
    for (i, k) in [Kind::Cow, Kind::Freeze, Kind::Delete].iter().enumerate() {
        by[i].span_ns = events.iter().filter(|e| e.0 == *k).count() as u64 * win;
    }
    let start_ns = a.interval * 1_000_000_000 / 2;
    by[3].span_ns = end_ns.saturating_sub(start_ns).saturating_sub(by[0].span_ns + by[1].span_ns + by[2].span_ns);
    let rpc_ms = |k: Kind| {
        let v: Vec<f64> = events.iter().filter(|e| e.0 == k).map(|e| e.2 as f64 / 1e6).collect();
        v.iter().cloned().fold(0.0, f64::max)
    };
    println!(
        "== {} MiB CoW volume, {} KiB grains, {} B random writes at QD {}, {} s, preserve every {} s, windows of {} ms",
        a.size_mb, a.grain_kb, a.io_size, a.queue_depth, a.time, a.interval, a.window_ms
    );
    println!("{:<22} {:>9} {:>10} {:>12} {:>12}", "window", "writes", "IOPS", "p99.9 us", "max us");
    for (i, name) in ["after tidemark preserve", "after freeze preserve", "after delete", "normal"].iter().enumerate() {
        println!("{:<22} {:>9} {:>10.0} {:>12.1} {:>12.1}", name, by[i].ops, by[i].iops(), by[i].p999_us(), by[i].max_us());
    }
    let (c, f, nrm) = (&by[0], &by[1], &by[3]);
    println!("preserve RPC return time (max): tidemark {:.3} ms, freeze {:.3} ms", rpc_ms(Kind::Cow), rpc_ms(Kind::Freeze));
    println!("ratio p99.9 tidemark-preserve windows / normal windows: {:.2} (goal <= 1.5)", c.p999_us() / nrm.p999_us());
    println!("ratio max   tidemark-preserve windows / normal windows: {:.2}", c.max_us() / nrm.max_us());
    println!("ratio max   freeze windows / tidemark-preserve windows: {:.2} (goal: several times)", f.max_us() / c.max_us());
    println!("ratio p99.9 freeze windows / tidemark-preserve windows: {:.2}", f.p999_us() / c.p999_us());
    // The pause itself, without the rest of the window's noise: writes submitted while the
    // preserve call ran (a freeze holds them until it thaws; ours lets them through).
    let during = |k: Kind| {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        for &(t, lat) in &samples {
            let submitted = t.saturating_sub(lat);
            if events.iter().any(|(ek, s, d)| *ek == k && submitted >= *s && submitted <= s + d) {
                let _ = h.record(lat.max(1));
            }
        }
        h
    };
    let (dc, df) = (during(Kind::Cow), during(Kind::Freeze));
    println!(
        "writes submitted while the preserve call ran: tidemark {} writes, max {:.1} us; freeze {} writes, max {:.1} us; ratio max freeze / tidemark {:.2}",
        dc.len(),
        dc.max() as f64 / 1e3,
        df.len(),
        df.max() as f64 / 1e3,
        df.max() as f64 / dc.max().max(1) as f64
    );

    // Phase 2: first writes after a preserve, each to a grain not yet copied, against plain
    // writes to the same grains once copied.
    if let Some(p) = prev.take() {
        while target.call("bdev_snapshot_get", Some(json!({"name": p}))).map(|v| v[0]["state"] == "sealed").unwrap_or(false) == false {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = target.call("bdev_snapshot_delete", Some(json!({"name": p})));
    }
    // Reopen the volume (the restart path) so that its tables hold nothing from phase 1: the
    // RAM figure below then counts exactly the one snapshot whose grains phase 2 copies.
    drop(entry);
    for (m, p) in [
        ("bdev_cow_delete", json!({"name": "vol"})),
        ("bdev_cow_create", json!({"name": "vol", "base_bdev": "base", "store_bdev": "store", "grain_kb": a.grain_kb})),
    ] {
        target.call(m, Some(p)).unwrap_or_else(|e| fail(&format!("{m}: {e}")));
    }
    let entry = target.bdevs.get("vol").unwrap_or_else(|| fail("no volume after reopening"));
    let mut order: Vec<u64> = (0..num_grains).collect();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let order = Rc::new(order);
    let run_grains = |order: Vec<u64>| {
        let (entry, h, qd, stop) = (entry.clone(), h.clone(), a.queue_depth, stop.clone());
        let s = Instant::now();
        let v = h
            .call_async(0, Duration::from_secs(3600), move || async move {
                let ch = Channel::get(&entry).unwrap_or_else(|e| fail(&e.to_string()));
                write_job(ch, qd, io_blocks, slots, t0, stop, Some((Rc::new(order), grain_blocks))).await
            })
            .unwrap_or_else(|e| fail(&e.to_string()));
        (v.len() as f64 / s.elapsed().as_secs_f64(), v)
    };
    let list: Vec<u64> = order.iter().copied().collect();
    target
        .call("bdev_snapshot_create", Some(json!({"bdev_name": "vol", "snapshot_name": "first", "wait_sealed": true})))
        .unwrap_or_else(|e| fail(&e.to_string()));
    // Store flushes during the first writes: what each round of copies waits for.
    let store_flushes = || target.bdevs.get("store").map(|e| e.stats().snapshot().ops[tidemark::bdev::IoType::Flush.index()]).unwrap_or(0);
    let flushes0 = store_flushes();
    let (first_iops, first) = run_grains(list.clone());
    let first_flushes = store_flushes() - flushes0;
    let (plain_iops, plain) = run_grains(list);
    let p = |v: &[(u64, u64)], q: f64| {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        for s in v {
            let _ = h.record(s.1.max(1));
        }
        h.value_at_quantile(q) as f64 / 1e3
    };
    println!(
        "first writes after a preserve ({} grains, each copied once): {:.0} IOPS, p50 {:.0} us, p99.9 {:.0} us",
        first.len(),
        first_iops,
        p(&first, 0.5),
        p(&first, 0.999)
    );
    println!("plain writes to the same grains:                     {:.0} IOPS, p50 {:.0} us, p99.9 {:.0} us", plain_iops, p(&plain, 0.5), p(&plain, 0.999));
    println!("ratio first-write IOPS / plain-write IOPS: {:.3}", first_iops / plain_iops);
    println!("store flushes during the first writes: {first_flushes}, {:.1} per 100 first writes", first_flushes as f64 * 100.0 / first.len().max(1) as f64);
    let vol = entry.bdev().as_any().downcast_ref::<CowVolume>().unwrap_or_else(|| fail("not a CoW volume"));
    let info = target.call("bdev_snapshot_get", Some(json!({"name": "first"}))).unwrap_or_else(|e| fail(&e.to_string()));
    let copied = info[0]["grains_copied"].as_u64().unwrap_or(0).max(1);
    let table = vol.table_bytes();
    println!(
        "lookup tables: {} bytes of RAM for {} copied grains = {:.1} bytes per copied grain (goal <= 16); a 1 TiB volume at 64 KiB grains, every grain copied: {:.0} MiB",
        table,
        copied,
        table as f64 / copied as f64,
        (table as f64 / copied as f64) * (1u64 << 24) as f64 / (1u64 << 20) as f64
    );
    let locks = vol.lock_stats();
    println!("extent locks: {} acquired, {} waited ({:.1} us total)", locks.acquired, locks.waits, locks.wait_ns as f64 / 1e3);
    drop(entry);
    target.shutdown();
    reactors.stop();
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Pairs of runs in phase 0, and the seconds of each run.
const PAIRS: usize = 5;
const PAIR_SECS: u64 = 2;
/// The RAM volume's store: it only needs its header and tables (nothing is copied to it).
const RAM_STORE_MB: u64 = 64;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// IOPS of `PAIR_SECS` seconds of random writes at depth `qd` to `bdev`.
fn timed_writes(target: &tidemark::target::Target, bdev: &str, qd: usize, io_blocks: u64) -> f64 {
    let entry = target.bdevs.get(bdev).unwrap_or_else(|| fail(&format!("no {bdev}")));
    let slots = entry.bdev().num_blocks() / io_blocks;
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(PAIR_SECS));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let s = Instant::now();
    let n = target
        .reactors
        .call_async(0, Duration::from_secs(PAIR_SECS + 60), move || async move {
            let ch = Channel::get(&entry).unwrap_or_else(|e| fail(&e.to_string()));
            write_job(ch, qd, io_blocks, slots, Instant::now(), stop, None).await.len()
        })
        .unwrap_or_else(|e| fail(&e.to_string()));
    let _ = timer.join();
    n as f64 / s.elapsed().as_secs_f64()
}

/// The bench's directory: `--dir`, or a fresh one under the temp dir, removed at the end.
fn tempfile_dir(a: &Args) -> std::path::PathBuf {
    let d = a.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("tidemark-preserve-bench-{}", std::process::id())));
    std::fs::create_dir_all(&d).unwrap_or_else(|e| fail(&format!("{}: {e}", d.display())));
    d
}
