//! The deterministic simulation of preserve (issue 5): thousands of seeded runs of the real CoW
//! volume on simulated cores and devices, checked against the reference model.
//!
//! `SEED=n cargo test --test sim_preserve -- --nocapture` replays seed n exactly;
//! `SIM_SEEDS=k` (default 10000) and `SIM_SEED_START=s` choose the range.

use tidemark::sim::seeds::run_seeds;
use tidemark::sim::{run_seed, SimOutcome};

#[test]
fn preserve_simulation_seeds() {
    let r = run_seeds(10_000, run_seed, SimOutcome::add);
    r.assert_passed();
    // The run must actually exercise what it claims to check.
    let (t, count) = (&r.totals, r.count);
    if count >= 100 {
        assert!(t.preserves > count / 2 && t.crashes > count / 10 && t.deletes > count / 20 && t.sealed_checked > count / 2, "{t:?}");
    }
}
