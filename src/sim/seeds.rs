//! Running many seeds of a simulation from a test: the range comes from the environment, the
//! work is spread over a few threads, outcomes are summed and failures collected, and a single
//! seed can be replayed exactly.
//!
//! `SEED=n` runs seed n alone (and panics with its failure); otherwise `SIM_SEEDS=k` seeds
//! (default: the caller's count) from `SIM_SEED_START=s` (default 0).

use std::time::Instant;

/// What a range of seeds did.
pub struct SeedRun<O> {
    pub count: u64,
    pub totals: O,
    /// Each failing seed's message (which names the seed), sorted.
    pub failures: Vec<String>,
}

impl<O: std::fmt::Debug> SeedRun<O> {
    /// Panics naming the first failing seeds, if any.
    pub fn assert_passed(&self) {
        if !self.failures.is_empty() {
            let first: Vec<&str> = self.failures.iter().take(5).map(String::as_str).collect();
            panic!("{} of {} seeds failed; first ones:\n{}", self.failures.len(), self.count, first.join("\n"));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs the seeds the environment asks for (see the module doc) with `run`, summing outcomes
/// with `add`. With `SEED` set, runs that one seed and panics if it fails. `test` is the name of
/// the test in `tests/sim.rs` that calls this: every failure says how to replay its seed.
pub fn run_seeds<O>(test: &'static str, default_count: u64, run: fn(u64) -> Result<O, String>, add: fn(&mut O, &O)) -> SeedRun<O>
where
    O: Default + std::fmt::Debug + Send + 'static,
{
    let run = move |seed: u64| run(seed).map_err(|e| format!("{e}\n  replay: SEED={seed} cargo test --test sim {test} -- --nocapture"));
    if let Some(seed) = std::env::var("SEED").ok().map(|s| s.parse::<u64>().expect("SEED must be a number")) {
        // A replay shows the code's own log too (RUST_LOG; SIM_TRACE for every event).
        let _ = env_logger::builder().is_test(true).try_init();
        let out = run(seed).unwrap_or_else(|e| panic!("{e}"));
        println!("seed {seed}: ok {out:?}");
        return SeedRun { count: 1, totals: out, failures: Vec::new() };
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(default_count);
    let start = env_u64("SIM_SEED_START").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4) as u64;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut failures, mut totals) = (Vec::new(), O::default());
                for seed in (start + t..start + count).step_by(threads as usize) {
                    match run(seed) {
                        Ok(o) => add(&mut totals, &o),
                        Err(e) => failures.push(e),
                    }
                }
                (failures, totals)
            })
        })
        .collect();
    let (mut failures, mut totals) = (Vec::new(), O::default());
    for h in handles {
        let (f, t) = h.join().expect("simulation thread panicked");
        failures.extend(f);
        add(&mut totals, &t);
    }
    failures.sort();
    println!("{count} seeds from {start} in {:?}: {totals:?}", t0.elapsed());
    SeedRun { count, totals, failures }
}
