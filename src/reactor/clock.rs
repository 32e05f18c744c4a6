//! Time source of a core. Real cores read the monotonic clock; simulated cores read a counter
//! that the deterministic scheduler advances, so that timers and latencies are reproducible
//! from a seed.

use std::cell::Cell;
use std::rc::Rc;

#[derive(Clone)]
pub enum Clock {
    /// Nanoseconds on the monotonic clock since the core started (`base`).
    Real(u64),
    /// Nanoseconds of simulated time, shared by every core of one simulation.
    Sim(Rc<Cell<u64>>),
}

/// CLOCK_MONOTONIC in nanoseconds. Read a few times per I/O, so it is the raw vDSO call and
/// plain integer arithmetic, not `Instant` (whose checked subtraction cost more than the read).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Clock {
    pub fn real() -> Self {
        Clock::Real(monotonic_ns())
    }

    #[inline]
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(base) => monotonic_ns().saturating_sub(*base),
            Clock::Sim(t) => t.get(),
        }
    }
}
