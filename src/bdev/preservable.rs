//! The preserve interface of a bdev ([`Preservable`], found through
//! [`Bdev::as_preservable`](super::Bdev::as_preservable)) and the types it speaks: requests,
//! snapshot descriptions, seal signals, figures, errors. It sits in the generic layer so that a
//! bdev can name it; `crate::preserve` holds the epoch machinery, the RPCs and the metrics
//! that use it.

use super::{BdevCtx, LATENCY_BUCKETS_US};
use crate::rpc::RpcError;
use serde::Serialize;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    /// The epoch was bumped; I/O stamped before it is still in flight.
    Draining,
    /// Immutable: equals every write submitted before the preserve.
    Sealed,
    /// Lost its content (the CoW store ran out of space); reads fail; delete it.
    Failed,
}

impl SnapshotState {
    pub fn name(self) -> &'static str {
        match self {
            SnapshotState::Draining => "draining",
            SnapshotState::Sealed => "sealed",
            SnapshotState::Failed => "failed",
        }
    }
}

/// What `bdev_snapshot_get` reports about one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The preserved volume.
    pub origin: String,
    /// "cow" or "split".
    pub method: &'static str,
    /// The closed epoch: the image holds every I/O stamped with it or an older one.
    pub epoch: u64,
    pub state: SnapshotState,
    /// Old-epoch I/Os still in flight (0 once sealed).
    pub old_epoch_in_flight: u64,
    pub grains_copied: u64,
    pub bytes_used: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub creation_time_ms: u64,
    /// Nanoseconds from the preserve to the seal.
    pub time_to_seal_ns: Option<u64>,
}

/// The request of `bdev_snapshot_create`, as the preservable sees it.
#[derive(Debug, Clone)]
pub struct PreserveRequest {
    pub snapshot_name: String,
    /// Preserve the classic way: stop new I/O, drain, switch, resume (comparison only).
    pub freeze: bool,
    /// For `split`: the leg that becomes the image.
    pub base_bdev: Option<String>,
}

/// A module's reason for refusing a preserve operation, mapped to JSON-RPC at the edge.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PreserveError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Io(String),
}

impl From<PreserveError> for RpcError {
    fn from(e: PreserveError) -> Self {
        use crate::rpc::{EBUSY, EEXIST, EINVAL, EIO, ENODEV, ENOSPC};
        match e {
            PreserveError::NotFound(m) => RpcError::new(ENODEV, m),
            PreserveError::Exists(m) => RpcError::new(EEXIST, m),
            PreserveError::Busy(m) => RpcError::new(EBUSY, m),
            PreserveError::Invalid(m) => RpcError::new(EINVAL, m),
            PreserveError::NoSpace(m) => RpcError::new(ENOSPC, m),
            PreserveError::Io(m) => RpcError::new(EIO, m),
        }
    }
}

impl From<crate::bdev::CreateError> for PreserveError {
    fn from(e: crate::bdev::CreateError) -> Self {
        use crate::bdev::CreateError as C;
        match e {
            C::Exists(n) => PreserveError::Exists(format!("bdev {n} already exists")),
            C::NotFound(n) => PreserveError::NotFound(format!("bdev {n} does not exist")),
            e @ C::Busy { .. } => PreserveError::Busy(e.to_string()),
            C::Invalid(m) => PreserveError::Invalid(m),
            C::Io(m) => PreserveError::Io(m),
        }
    }
}

/// The state of one snapshot as control-plane threads wait for it (RPC `wait_sealed`).
/// Reactors set it; nothing on the data path touches it.
pub struct SealSignal {
    state: Mutex<SnapshotState>,
    changed: Condvar,
    started: Instant,
    sealed_after: Mutex<Option<Duration>>,
}

impl SealSignal {
    pub fn new() -> Arc<SealSignal> {
        Arc::new(SealSignal { state: Mutex::new(SnapshotState::Draining), changed: Condvar::new(), started: Instant::now(), sealed_after: Mutex::new(None) })
    }

    pub fn set(&self, s: SnapshotState) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s == SnapshotState::Sealed && *st == SnapshotState::Draining {
            *self.sealed_after.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.started.elapsed());
        }
        *st = s;
        self.changed.notify_all();
    }

    pub fn get(&self) -> SnapshotState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (this thread) until the snapshot leaves `draining` or `timeout` passes; returns
    /// the state then.
    pub fn wait_sealed(&self, timeout: Duration) -> SnapshotState {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (st, _) = self.changed.wait_timeout_while(st, timeout, |s| *s == SnapshotState::Draining).unwrap_or_else(|e| e.into_inner());
        *st
    }
}

/// What a bdev that can be preserved implements (the CoW volume, the mirror, a pool volume).
pub trait Preservable: Send + Sync {
    /// The preserve method of this bdev: "cow" or "split".
    fn method(&self) -> &'static str;
    /// Takes a preserve: registers the snapshot's read-only bdev under `req.snapshot_name`,
    /// bumps the epoch at once, and returns once the snapshot's record is durable (a crash
    /// right after the reply keeps it), without any host I/O waiting for that record or for
    /// old-epoch I/O (with `freeze`, after the classic stop/drain/switch/resume). Runs on an
    /// RPC thread.
    fn preserve(&self, t: &BdevCtx, req: &PreserveRequest) -> Result<Arc<SealSignal>, PreserveError>;
    /// The name a snapshot asked for as `requested` will have (its bdev's name, which
    /// [`Self::preserve`] then receives), checked to be free. By default the name as given; a
    /// pool volume's snapshot is a pool volume, `lvs/name`.
    fn image_name(&self, t: &BdevCtx, requested: &str) -> Result<String, RpcError> {
        t.bdevs.check_new_name(requested)?;
        Ok(requested.to_string())
    }
    /// Every snapshot of this bdev.
    fn snapshots(&self) -> Vec<SnapshotInfo>;
    /// The seal signal of snapshot `name` (for `wait_sealed`).
    fn seal_signal(&self, name: &str) -> Option<Arc<SealSignal>>;
    /// Deletes snapshot `name`, whose bdev the caller has already unregistered; durable when
    /// it returns. Runs on an RPC thread.
    fn delete_snapshot(&self, t: &BdevCtx, name: &str) -> Result<(), PreserveError>;
    /// Refuses the delete of snapshot `name` before anything changes (its bdev is still
    /// registered): a pool snapshot that clones depend on, say.
    fn check_delete(&self, name: &str) -> Result<(), PreserveError> {
        let _ = name;
        Ok(())
    }
    /// The bdev's preserve figures, for metrics.
    fn stats(&self) -> PreserveStats;
    /// Byte ranges (offset, length), sorted and disjoint, where sealed image `newer` may
    /// differ from sealed image `older` (both of this bdev), known from the tables without
    /// reading either image (incremental backups).
    fn changed_ranges(&self, older: &str, newer: &str) -> Result<Vec<(u64, u64)>, PreserveError> {
        let _ = (older, newer);
        Err(PreserveError::Invalid(format!("the {} method cannot tell what changed between two images", self.method())))
    }
}

/// Histogram buckets in the layout of [`crate::bdev::LATENCY_BUCKETS_US`] (plus +Inf) and a sum.
pub type Buckets = ([u64; LATENCY_BUCKETS_US.len() + 1], u64);

/// Preserve figures of one preservable bdev.
#[derive(Debug, Default, Clone)]
pub struct PreserveStats {
    /// Grains given their first copy (a slot) for the snapshots that needed one.
    pub grains_copied: u64,
    /// Bytes read from the live image (or a slot) and written to the store.
    pub copied_bytes: u64,
    /// Latency of one copy-on-write (read the old pieces, write the store, durable table entry).
    pub copy_latency: Buckets,
    pub store_bytes_used: u64,
    pub store_bytes_total: u64,
    /// Memory held by the lookup tables.
    pub table_bytes: u64,
    pub locks: crate::extent_lock::LockStats,
    /// Time from preserve to seal.
    pub seal_latency: Buckets,
    /// Snapshots by state: draining, sealed, failed.
    pub snapshots: [u64; 3],
    /// Snapshots that have failed since the daemon started (store or its file system full,
    /// metadata unwritable); each is also logged at ERROR.
    pub snapshots_failed: u64,
}

impl PreserveStats {
    /// Counts `snapshots` by state into [`PreserveStats::snapshots`].
    pub fn count_states(&mut self, snapshots: impl IntoIterator<Item = SnapshotInfo>) {
        for info in snapshots {
            let i = match info.state {
                SnapshotState::Draining => 0,
                SnapshotState::Sealed => 1,
                SnapshotState::Failed => 2,
            };
            self.snapshots[i] += 1;
        }
    }
}
