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
