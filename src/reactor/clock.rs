//! Time source of a core. Real cores read the monotonic clock; simulated cores read a counter
//! that the deterministic scheduler advances, so that timers and latencies are reproducible
//! from a seed.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

#[derive(Clone)]
pub enum Clock {
    /// Nanoseconds since `base` on the monotonic clock.
    Real(Instant),
    /// Nanoseconds of simulated time, shared by every core of one simulation.
    Sim(Rc<Cell<u64>>),
}

impl Clock {
    pub fn real() -> Self {
        Clock::Real(Instant::now())
    }

    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(base) => base.elapsed().as_nanos() as u64,
            Clock::Sim(t) => t.get(),
        }
    }
}
