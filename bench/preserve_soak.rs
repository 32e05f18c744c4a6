//! preserve_soak: the deterministic simulation of preserve (src/sim) for longer than the test
//! suite runs it: consecutive seeds for `--seconds`, optionally with larger workloads.
//!
//!     preserve_soak [--seconds 600] [--start 1000000] [--scale 4] [--threads 2]
//!
//! Prints every failing seed with the command that replays it; exits 1 if any failed.

use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "preserve_soak", about = "long run of the deterministic preserve simulation")]
struct Args {
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    #[arg(long, default_value_t = 1_000_000)]
    start: u64,
    /// Multiplies each seed's clients' operations and the volume's grains.
    #[arg(long, default_value_t = 1)]
    scale: u64,
    #[arg(long, default_value_t = 2)]
    threads: u64,
}

fn main() {
    let a = Args::parse();
    let next = Arc::new(AtomicU64::new(a.start));
    let failed = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + Duration::from_secs(a.seconds);
    let handles: Vec<_> = (0..a.threads.max(1))
        .map(|_| {
            let (next, failed, scale) = (next.clone(), failed.clone(), a.scale.max(1));
            std::thread::spawn(move || {
                let mut done = 0u64;
                while Instant::now() < end {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    let mut cfg = tidemark::sim::SimConfig::from_seed(seed);
                    cfg.ops_per_client *= scale as usize;
                    cfg.grains *= scale;
                    if let Err(e) = tidemark::sim::run(seed, &cfg) {
                        failed.store(true, Ordering::Relaxed);
                        println!("FAILED seed {seed} (scale {scale}): {e}\n  replay: preserve_soak --start {seed} --seconds 1 --threads 1 --scale {scale}");
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    println!(
        "{total} seeds from {} (scale {}) in {} s: {}",
        a.start,
        a.scale,
        a.seconds,
        if failed.load(Ordering::Relaxed) { "FAILURES" } else { "all passed" }
    );
    if failed.load(Ordering::Relaxed) {
        std::process::exit(1);
    }
}
