//! Preserve: point-in-time images of a live volume without pausing host I/O (DESIGN §1).
//!
//! The generic parts live here: [`EpochTracker`] (epochs, in-flight I/O per epoch, sealing),
//! [`FreezeGate`] (the classic freeze, kept as the benchmark's comparison), the [`Preservable`]
//! trait that each preservable bdev implements (the CoW volume in `bdevs/snapshot`, the mirror),
//! the snapshot state machine (draining → sealed) with [`SealSignal`], and the
//! `bdev_snapshot_*` RPCs, which find a bdev's [`Preservable`] through [`preservable`] and
//! dispatch to it.

pub mod epoch;
mod gate;
pub mod rpc;

pub use epoch::{AdvanceError, EpochTicket, EpochTracker, Sealing, MAX_OPEN_EPOCHS};
pub use gate::FreezeGate;
// The interface a preservable bdev implements lives in the bdev layer (a bdev names it in
// `Bdev::as_preservable`); this module is its user.
pub use crate::bdev::preservable::{Buckets, Preservable, PreserveError, PreserveRequest, PreserveStats, SealSignal, SnapshotInfo, SnapshotState};

use crate::bdev::Bdev;
use crate::metrics::{labels, LatencySample, MetricsOut};
use crate::module::{Ctx, Module};
use std::any::Any;

/// A preserved image as a backup sees it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub info: SnapshotInfo,
    pub origin_uuid: uuid::Uuid,
    pub snapshot_uuid: uuid::Uuid,
}

/// Describes snapshot `name` (None if no preservable bdev has a snapshot of that name).
pub fn describe_image(t: &Ctx, name: &str) -> Option<ImageInfo> {
    let (origin, info) = all_snapshots(t).into_iter().find(|(_, s)| s.name == name)?;
    let origin_uuid = t.bdevs.get(&origin)?.bdev().uuid();
    let snapshot_uuid = t.bdevs.get(name)?.bdev().uuid();
    Some(ImageInfo { info, origin_uuid, snapshot_uuid })
}

/// What changed between two sealed images of bdev `origin` (see
/// [`Preservable::changed_ranges`]).
pub fn changed_ranges(t: &Ctx, origin: &str, older: &str, newer: &str) -> Result<Vec<(u64, u64)>, PreserveError> {
    let e = t.bdevs.get(origin).ok_or_else(|| PreserveError::NotFound(format!("bdev {origin} does not exist")))?;
    let p = preservable(e.bdev().as_ref()).ok_or_else(|| PreserveError::Invalid(format!("bdev {origin} is not preservable")))?;
    p.changed_ranges(older, newer)
}

/// The preserve interface of `bdev`, if it has one ([`Bdev::as_preservable`]).
pub fn preservable(bdev: &dyn Bdev) -> Option<&dyn Preservable> {
    bdev.as_preservable()
}

/// Every snapshot of every preservable bdev, with the owner's name.
pub fn all_snapshots(t: &Ctx) -> Vec<(String, SnapshotInfo)> {
    let mut out = Vec::new();
    for e in t.bdevs.list() {
        if let Some(p) = preservable(e.bdev().as_ref()) {
            out.extend(p.snapshots().into_iter().map(|s| (e.name().to_string(), s)));
        }
    }
    out
}

/// The preserve subsystem: no configuration of its own (volumes recreate their snapshots),
/// only metrics.
pub struct PreserveSubsystem;

impl Module for PreserveSubsystem {
    fn name(&self) -> &'static str {
        "preserve"
    }

    fn config(&self, _t: &Ctx) -> Vec<crate::config::ConfigCall> {
        Vec::new()
    }

    fn metrics(&self, t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let mut all = Vec::new();
        for e in t.bdevs.list() {
            if let Some(p) = preservable(e.bdev().as_ref()) {
                all.push((e.name().to_string(), p.method(), p.stats()));
            }
        }
        if all.is_empty() {
            return Ok(());
        }
        let l = |n: &str| labels(&[("bdev", n)]);
        let counter = |f: &dyn Fn(&PreserveStats) -> u64| all.iter().map(|(n, _, s)| (l(n), f(s))).collect::<Vec<_>>();
        let gauge = |f: &dyn Fn(&PreserveStats) -> u64| all.iter().map(|(n, _, s)| (l(n), f(s) as f64)).collect::<Vec<_>>();
        out.counter(
            "tidemark_preserve_grains_copied",
            "Grains given a slot in the CoW store (one per grain, shared by every snapshot that needs it); the grain's pieces are copied as writes touch them.",
            &counter(&|s| s.grains_copied),
        )?;
        out.counter(
            "tidemark_preserve_copied_bytes",
            "Bytes copied into the CoW store (old pieces of grains before their first overwrite).",
            &counter(&|s| s.copied_bytes),
        )?;
        let copy: Vec<_> = all.iter().map(|(n, _, s)| (l(n), LatencySample { buckets: &s.copy_latency.0, sum_ns: s.copy_latency.1 })).collect();
        out.latency("tidemark_preserve_cow_copy_latency_seconds", "Latency of one copy-on-write: old pieces read, store write, durable table entry.", &copy)?;
        out.gauge("tidemark_preserve_store_bytes_used", "Bytes of the CoW store holding copied grains.", &gauge(&|s| s.store_bytes_used))?;
        out.gauge("tidemark_preserve_store_capacity_bytes", "Bytes of the CoW store available for copied grains.", &gauge(&|s| s.store_bytes_total))?;
        out.gauge("tidemark_preserve_table_bytes", "Memory held by the CoW lookup tables.", &gauge(&|s| s.table_bytes))?;
        out.counter("tidemark_extent_lock_acquired", "Extent lock pieces granted.", &counter(&|s| s.locks.acquired))?;
        out.counter("tidemark_extent_lock_waits", "Extent lock requests that waited for an overlapping lock.", &counter(&|s| s.locks.waits))?;
        let wait: Vec<_> = all.iter().map(|(n, _, s)| (l(n), s.locks.wait_ns as f64 / 1e9)).collect();
        out.counter("tidemark_extent_lock_wait_seconds", "Time extent lock requests spent waiting.", &wait)?;
        let seal: Vec<_> = all.iter().map(|(n, _, s)| (l(n), LatencySample { buckets: &s.seal_latency.0, sum_ns: s.seal_latency.1 })).collect();
        out.latency("tidemark_preserve_time_to_seal_seconds", "Time from a preserve to the seal of its image.", &seal)?;
        let mut by_state = Vec::new();
        for (n, m, s) in &all {
            for (i, st) in [SnapshotState::Draining, SnapshotState::Sealed, SnapshotState::Failed].iter().enumerate() {
                by_state.push((labels(&[("bdev", n), ("method", m), ("state", st.name())]), s.snapshots[i] as f64));
            }
        }
        out.gauge("tidemark_preserve_snapshots", "Snapshots by volume, method and state.", &by_state)?;
        out.counter(
            "tidemark_preserve_snapshot_failures",
            "Snapshots that failed since the daemon started (CoW store or its file system full, metadata unwritable); the host writes went on. The log names each at ERROR.",
            &counter(&|s| s.snapshots_failed),
        )?;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Milliseconds since the Unix epoch (creation times).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
