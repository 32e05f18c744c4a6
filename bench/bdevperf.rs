//! bdevperf: drives a bdev in-process from every reactor core, as SPDK's bdevperf does, and
//! prints IOPS, MiB/s and latency percentiles.
//!
//!     bdevperf [-c CONFIG.toml] -b BDEV -q 32 -o 4096 -w randread -t 10 -m 0x1
//!
//! The configuration's bdev calls build the bdevs (front-end sections are ignored); without
//! `-c`, `--malloc-mb N` makes a RAM bdev named `Malloc0`.

use clap::Parser;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use tidemark::bdev::{Channel, IoBuf};
use tidemark::config::Config;
use tidemark::reactor::{self, PollMode};

#[path = "workload.rs"]
mod workload;

#[derive(Parser)]
#[command(name = "bdevperf", about = "tidemark in-process bdev benchmark")]
struct Args {
    /// TOML configuration whose [[bdev]] calls create the bdevs.
    #[arg(short = 'c', long)]
    config: Option<std::path::PathBuf>,
    /// Make a RAM bdev `Malloc0` of this many MiB (when no config is given).
    #[arg(long, default_value_t = 1024)]
    malloc_mb: u64,
    /// Bdev to drive.
    #[arg(short = 'b', long, default_value = "Malloc0")]
    bdev: String,
    #[command(flatten)]
    w: workload::Workload,
    /// Reactor core mask; every core runs one job.
    #[arg(short = 'm', long, default_value = "0x1")]
    cpumask: String,
    /// Poll mode of the reactors.
    #[arg(long, default_value = "busy")]
    poll_mode: String,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Random,
    Sequential,
    /// Random slots; each I/O writes a pattern naming its slot and sequence number and reads it
    /// back; a difference is a miscompare (counted as an error).
    Verify,
}

struct JobResult {
    ops: u64,
    bytes: u64,
    errors: u64,
    hist: Histogram<u64>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let a = Args::parse();
    let (pattern, read_pct) = match a.w.mix() {
        Some((true, pct)) => (Pattern::Random, pct),
        Some((false, pct)) => (Pattern::Sequential, pct),
        None if a.w.workload == "verify" => (Pattern::Verify, 0),
        None => fail(&format!("unknown workload {}", a.w.workload)),
    };
    if a.w.queue_depth == 0 || a.w.queue_depth > 1024 {
        fail("queue depth must be 1..=1024");
    }
    let mut cfg = match &a.config {
        Some(p) => Config::load(p).unwrap_or_else(|e| fail(&e)),
        None => {
            let text = format!(
                "[[bdev]]\nmethod = \"bdev_malloc_create\"\nparams = {{ name = \"Malloc0\", num_blocks = {}, block_size = 512 }}\n",
                a.malloc_mb * 2048
            );
            Config::parse(&text).unwrap_or_else(|e| fail(&e))
        }
    };
    cfg.nvmf.clear();
    cfg.iscsi.clear();
    cfg.reactor.cores = None;
    cfg.reactor.cpumask = Some(a.cpumask.clone());
    cfg.reactor.poll_mode = if a.poll_mode == "adaptive" { PollMode::Adaptive } else { PollMode::Busy };
    cfg.metrics.listen.clear();
    if a.config.is_none() {
        cfg.daemon.data_dir = std::env::temp_dir().join("tidemark-bdevperf");
    }
    let (reactors, target) = tidemark::daemon::start_target(cfg).unwrap_or_else(|e| fail(&e));
    if let Err(e) = tidemark::daemon::apply_config(&target) {
        fail(&e);
    }
    let entry = target.bdevs.get(&a.bdev).unwrap_or_else(|| fail(&format!("no bdev named {}", a.bdev)));
    let bs = entry.bdev().block_size() as usize;
    if a.w.io_size == 0 || a.w.io_size % bs != 0 {
        fail(&format!("I/O size must be a multiple of the block size {bs}"));
    }
    let blocks_per_io = (a.w.io_size / bs) as u64;
    let slots = entry.bdev().num_blocks() / blocks_per_io;
    if slots == 0 {
        fail("the bdev is smaller than one I/O");
    }
    let cores = target.reactors.core_count();
    let h = target.reactors.clone();
    let (qd, io_size, secs) = (a.w.queue_depth, a.w.io_size, a.w.time);
    let handles: Vec<_> = (0..cores)
        .map(|core| {
            let entry = entry.clone();
            let h = h.clone();
            std::thread::spawn(move || {
                h.call_async(core, Duration::from_secs(secs + 60), move || async move {
                    run_job(entry, core, qd, io_size, blocks_per_io, slots, pattern, read_pct, secs).await
                })
            })
        })
        .collect();
    let mut total = JobResult { ops: 0, bytes: 0, errors: 0, hist: Histogram::new(3).expect("histogram") };
    for j in handles {
        let r = j.join().expect("job thread").unwrap_or_else(|e| fail(&e.to_string()));
        total.ops += r.ops;
        total.bytes += r.bytes;
        total.errors += r.errors;
        total.hist.add(&r.hist).expect("histograms of the same shape");
    }
    let iops = total.ops as f64 / secs as f64;
    let mibs = total.bytes as f64 / secs as f64 / (1 << 20) as f64;
    let q = |p: f64| total.hist.value_at_quantile(p) as f64 / 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bdev": a.bdev, "workload": a.w.workload, "queue_depth": qd, "io_size": io_size, "cores": cores, "iops": iops, "mib_s": mibs,
                "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": total.hist.max() as f64 / 1000.0, "errors": total.errors})
        );
    } else {
        println!("bdev {} workload {} qd {} io {} cores {} time {}s", a.bdev, a.w.workload, qd, io_size, cores, secs);
        println!(
            "IOPS {:.0}  MiB/s {:.1}  latency us: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  errors {}",
            iops,
            mibs,
            q(0.5),
            q(0.99),
            q(0.999),
            total.hist.max() as f64 / 1000.0,
            total.errors
        );
    }
    drop(entry);
    target.shutdown();
    reactors.stop();
    if total.errors > 0 {
        std::process::exit(2);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bdevperf: {msg}");
    std::process::exit(1)
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    entry: std::sync::Arc<tidemark::bdev::BdevEntry>,
    core: usize,
    qd: usize,
    io_size: usize,
    blocks_per_io: u64,
    slots: u64,
    pattern: Pattern,
    read_pct: u32,
    secs: u64,
) -> JobResult {
    let ch = match Channel::get(&entry) {
        Ok(c) => c,
        Err(e) => fail(&format!("cannot open a channel: {e}")),
    };
    let end = reactor::now_ns() + secs * 1_000_000_000;
    let result = Rc::new(RefCell::new(JobResult { ops: 0, bytes: 0, errors: 0, hist: Histogram::new(3).expect("histogram") }));
    let next_seq = Rc::new(std::cell::Cell::new(core as u64 * (slots / 4)));
    let mut tasks = Vec::new();
    for i in 0..qd {
        let ch = ch.clone();
        let result = result.clone();
        let next_seq = next_seq.clone();
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ ((core as u64) << 32 | i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        tasks.push(reactor::spawn(async move {
            let mut buf = IoBuf::alloc(io_size);
            buf.fill(0xA5);
            let mut check = IoBuf::alloc(if pattern == Pattern::Verify { io_size } else { 0 });
            let mut seq = 0u64;
            // One clock read per I/O: the end of one I/O is the start of the next (the
            // latency then also counts the few instructions of bookkeeping between them,
            // erring high, never low): the clock is a vDSO call, and the client core is what is
            // measured against SPDK's perf, which reads the TSC.
            let mut t0 = reactor::now_ns();
            while t0 < end {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let slot = match pattern {
                    // Verify tasks own disjoint slots (slot % qd == task) so no two tasks race
                    // on one block and every read must return the task's own last write.
                    Pattern::Verify => (rng % slots.div_ceil(qd as u64)) * qd as u64 + i as u64,
                    Pattern::Random => rng % slots,
                    Pattern::Sequential => {
                        let s = next_seq.get();
                        next_seq.set(s + 1);
                        s % slots
                    }
                };
                if pattern == Pattern::Verify && slot >= slots {
                    continue;
                }
                let is_read = (rng >> 40) % 100 < read_pct as u64;
                let r = if pattern == Pattern::Verify {
                    seq += 1;
                    for (k, w) in buf.chunks_mut(8).enumerate() {
                        let v = (slot << 24) ^ (seq << 8) ^ (k as u64) ^ ((core as u64) << 56);
                        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
                    }
                    match ch.write_buf(slot * blocks_per_io, &buf).await {
                        Ok(()) => match ch.read_buf(slot * blocks_per_io, &mut check).await {
                            Ok(()) if check[..] == buf[..] => Ok(()),
                            Ok(()) => {
                                eprintln!("bdevperf: miscompare at block {}", slot * blocks_per_io);
                                Err(tidemark::bdev::BdevError::Media)
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                } else if is_read {
                    ch.read_buf(slot * blocks_per_io, &mut buf).await
                } else {
                    ch.write_buf(slot * blocks_per_io, &buf).await
                };
                let t1 = reactor::now_ns();
                let dt = t1 - t0;
                t0 = t1;
                let mut res = result.borrow_mut();
                match r {
                    Ok(()) => {
                        res.ops += 1;
                        res.bytes += io_size as u64;
                        let _ = res.hist.record(dt.max(1));
                    }
                    Err(e) => {
                        if res.errors == 0 {
                            eprintln!("bdevperf: first error on core {core}: {e}");
                        }
                        res.errors += 1
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    Rc::try_unwrap(result).map(|r| r.into_inner()).unwrap_or_else(|_| fail("a job task outlived the job"))
}
