//! The deterministic simulation of preserve (issue 5): thousands of seeded runs of the real CoW
//! volume on simulated cores and devices, checked against the reference model.
//!
//! `SEED=n cargo test --test sim_preserve -- --nocapture` replays seed n exactly;
//! `SIM_SEEDS=k` (default 10000) and `SIM_SEED_START=s` choose the range.

use tidemark::sim::run_seed;

#[test]
fn preserve_simulation_seeds() {
    if let Ok(s) = std::env::var("SEED") {
        let seed: u64 = s.parse().expect("SEED must be a number");
        match run_seed(seed) {
            Ok(out) => println!("seed {seed}: ok {out:?}"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let count: u64 = std::env::var("SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let start: u64 = std::env::var("SIM_SEED_START").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4) as u64;
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut totals = tidemark::sim::SimOutcome::default();
                let mut seed = start + t;
                while seed < start + count {
                    match run_seed(seed) {
                        Ok(o) => {
                            totals.preserves += o.preserves;
                            totals.crashes += o.crashes;
                            totals.deletes += o.deletes;
                            totals.writes += o.writes;
                            totals.reads += o.reads;
                            totals.sealed_checked += o.sealed_checked;
                            totals.freezes += o.freezes;
                        }
                        Err(e) => failures.push(e),
                    }
                    seed += threads;
                }
                (failures, totals)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut totals = tidemark::sim::SimOutcome::default();
    for h in handles {
        let (f, t) = h.join().expect("simulation thread panicked");
        failures.extend(f);
        totals.preserves += t.preserves;
        totals.crashes += t.crashes;
        totals.deletes += t.deletes;
        totals.writes += t.writes;
        totals.reads += t.reads;
        totals.sealed_checked += t.sealed_checked;
        totals.freezes += t.freezes;
    }
    println!("{count} seeds in {:?}: {totals:?}", t0.elapsed());
    // The run must actually exercise what it claims to check.
    if failures.is_empty() && count >= 100 {
        assert!(totals.preserves > count / 2 && totals.crashes > count / 10 && totals.deletes > count / 20 && totals.sealed_checked > count / 2, "{totals:?}");
    }
    if !failures.is_empty() {
        failures.sort();
        panic!("{} of {count} seeds failed; first ones:\n{}", failures.len(), failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n"));
    }
}
