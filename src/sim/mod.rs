//! The deterministic simulator: the real preserve (CoW), mirror and pool code,
//! unchanged, on hand-stepped cores ([`crate::reactor::ManualCores`]: several cores, messages
//! between them, timers on simulated time) over simulated devices ([`device::SimDevice`]:
//! seeded latencies and completion order, a volatile write cache, crash images torn at a chosen
//! unit), with every choice (which core runs next, each I/O's latency, the workload, when to
//! preserve, fail a leg or crash, what a crash leaves on media) drawn from one seed, and the
//! outcome checked against one reference register model ([`model::Model`]).
//!
//! One simulator, several systems under it:
//! * [`cow`]: a CoW volume with preserves, deletes and crashes (and crashes placed at CoW
//!   rule 1's two commits);
//! * [`mirror`]: a mirror with leg failures, splits, re-joins, removals and crashes (legs
//!   local or remote: a remote leg has its own, slower and more varying, latency);
//! * [`stale_head`]: a second head fencing the first over remote legs that answer NVMe
//!   reservations with the target's code ([`resv_leg`]) while the first still writes;
//! * [`lvol`]: the volume pool with snapshots, clones, reverts, resizes, deletes, a full pool
//!   and crashes.
//!
//! Apart from those, [`scaling`] is docs/scaling.md's scaling model as a discrete-event
//! simulation (n cores, per-I/O CPU measured on one, cross-core messages and line transfers):
//! it runs no I/O code, only the code's placement rules (round-robin connections, the extent
//! lock's `shard_of`), so it shares nothing else here.
//!
//! They share the scheduler ([`schedule`]: the seed picks the next core, `SIM_TRACE` prints
//! events), the block tagging and checks ([`blocks`]), the devices, the model, the crash points
//! ([`crash_point`]) and the one seed runner ([`seeds`]): `SEED=n` replays seed n exactly,
//! whichever system it drives (`tests/sim.rs`, docs/simulation.md).

pub mod blocks;
pub mod cow;
pub mod crash_point;
pub mod device;
pub mod lvol;
pub mod mirror;
pub mod model;
pub mod remote_leg;
pub mod resv_leg;
pub mod scaling;
pub mod schedule;
pub mod seeds;
pub mod stale_head;
pub mod tasks;

pub use cow::{run, run_seed, run_seed_at_cow_split, SimConfig, SimOutcome, HEADER_STALL_NS};
