//! Driving hand-stepped cores from a seed: which core runs next and when simulated time moves
//! are the seed's choices, so a run is replayed exactly by its seed.

use crate::reactor::{self, ManualCores};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

thread_local! {
    static TRACE: bool = {
        let on = std::env::var("SIM_TRACE").is_ok();
        if on {
            let _ = env_logger::builder().filter_level(log::LevelFilter::Trace).is_test(true).try_init();
        }
        on
    };
}

/// Prints one event of the run when `SIM_TRACE` is set (to follow a failing seed), with the
/// simulated time; the code's own trace log goes with it.
pub fn trace(what: impl FnOnce() -> String) {
    if TRACE.with(|t| *t) {
        eprintln!("[{:>10}] {}", reactor::try_current().map(|_| reactor::now_ns()).unwrap_or(0), what());
    }
}

/// No core has work and no timer is set: every task has finished (or waits for nothing).
pub fn idle(cores: &ManualCores) -> bool {
    (0..cores.count()).all(|c| !cores.has_work(c)) && cores.next_timer().is_none()
}

/// Steps the cores until `done`; Err on a deadlock (tasks wait, nothing can run) or after
/// `max_steps` steps in all (`steps` counts across calls: a livelock).
pub fn run_until(cores: &ManualCores, rng: &mut ChaCha8Rng, steps: &mut u64, max_steps: u64, mut done: impl FnMut() -> bool) -> Result<(), String> {
    while !done() {
        *steps += 1;
        if *steps > max_steps {
            return Err("step budget exhausted (livelock?)".into());
        }
        if !step(cores, rng) {
            return Err("deadlock: no core has work and no timer is set, but tasks wait".into());
        }
    }
    Ok(())
}

/// Steps a random core with work, else advances time to the next timer. False when there is
/// neither: every task waits for something that will never come (or all is done).
pub fn step(cores: &ManualCores, rng: &mut ChaCha8Rng) -> bool {
    let ready: Vec<usize> = (0..cores.count()).filter(|&i| cores.has_work(i)).collect();
    if !ready.is_empty() {
        cores.step(ready[rng.random_range(0..ready.len())]);
        return true;
    }
    if let Some(t) = cores.next_timer() {
        cores.advance_to(t.max(cores.now_ns()));
        return true;
    }
    false
}
