//! `mirror`: N-way RAID1 (SPDK's `raid1`, created with `bdev_raid_create`) with leg failure
//! handling, a superblock and write-intent bitmap on every leg, incremental rebuild, and split
//! preserve (DESIGN §1, method 2).
//!
//! How the pieces fit:
//! - [`layout`]: what each leg holds ahead of the data (superblocks, write-intent bitmap, one
//!   stale map per slot).
//! - [`regions`]: one atomic word per region, so that a write to a region that is already
//!   marked dirty enters without a lock or a message (the common case).
//! - [`channel`]: the data path on every core: writes to every leg that takes writes, reads
//!   from the in-sync leg with the fewest outstanding reads, read retry and repair.
//! - [`control`]: the mirror's control task on its home core. It alone changes persistent
//!   state: it persists a region's write-intent bit before the first write to the region,
//!   drops failed legs (durably, before any write that skipped them completes), clears quiet
//!   regions' bits in batches, locks regions for rebuild windows and repairs, and sequences
//!   splits and leg changes. Other cores reach it by message only when a region is not ready.
//! - [`rebuild`]: the background process that copies stale regions to returning or new legs
//!   and resynchronises regions that were in flight at a crash, one locked window at a time,
//!   rate-limited.
//! - [`split`]: the split preserve and the sealed image bdev it leaves.
//! - [`assemble`]: building a mirror from its legs (new, or reassembled from superblocks).

mod assemble;
mod channel;
mod control;
pub mod fence;
pub mod layout;
pub mod metrics;
mod preserve;
mod rebuild;
mod regions;
pub mod rpc;
pub mod split;
#[cfg(test)]
mod tests;
pub mod waits;

use crate::bdev::{Bdev, BdevEntry, BdevError, BdevProps, HoldGuard, IoChannel, IoType};
use crate::reactor;
use control::Request;
use crossbeam_utils::CachePadded;
use futures::channel::{mpsc, oneshot};
use layout::{Geometry, SlotState, MAX_SLOTS};
use regions::RegionStates;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

pub use split::SplitImageBdev;

/// Why a mirror operation was refused, mapped to JSON-RPC codes at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("{0}")]
    NotFound(String),
    /// In use, in progress, or shutting down: try later or release it first.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    /// Metadata could not be read or written.
    #[error("{0}")]
    Io(String),
}

impl From<String> for MirrorError {
    fn from(s: String) -> Self {
        MirrorError::Invalid(s)
    }
}

impl From<MirrorError> for crate::rpc::RpcError {
    fn from(e: MirrorError) -> Self {
        use crate::rpc::{RpcError, EBUSY, EINVAL, EIO, ENODEV};
        match e {
            MirrorError::NotFound(m) => RpcError::new(ENODEV, m),
            MirrorError::Busy(m) => RpcError::new(EBUSY, m),
            MirrorError::Invalid(m) => RpcError::new(EINVAL, m),
            MirrorError::Io(m) => RpcError::new(EIO, m),
        }
    }
}

fn shut_down_error(name: &str) -> MirrorError {
    MirrorError::Busy(format!("mirror {name} is shut down"))
}

/// Region size of a new mirror unless `region_size_kb` says otherwise.
pub const DEFAULT_REGION_BYTES: u64 = 1 << 20;

/// Options of one mirror, fixed at creation.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Region size of a new mirror (a reassembled one keeps the size on its legs).
    pub region_bytes: u64,
    /// How often the cleaner looks for quiet regions; a region's write-intent bit is cleared
    /// after one to two intervals without writes.
    pub clean_interval_ns: u64,
    /// Options of this mirror's background processes; `None`: the module's
    /// ([`PROCESS_OPTIONS`], set by `bdev_raid_set_options`).
    pub process: Option<Arc<ProcessOptions>>,
    /// How often the control task looks for failed legs that may have come back (when
    /// `auto_rejoin` is on); a leg whose attempt failed is tried again after up to
    /// [`REJOIN_BACKOFF_MAX`] times this. 250 ms: an attempt on a leg still down costs one
    /// superblock read that fails at once, and a returning leg's re-join should not wait
    /// longer than its controller's own reconnect (a 1 s default made the wait dominate a
    /// small re-join: bench/remote_bench.sh row 3).
    pub rejoin_interval_ns: u64,
    /// Hold an NVMe reservation on every remote leg, so that a new head can fence this one
    /// (`reservation_key`, `preempt_key`; see [`fence`]). `None`: no fencing.
    pub fencing: Option<fence::Fencing>,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions { region_bytes: DEFAULT_REGION_BYTES, clean_interval_ns: 1_000_000_000, process: None, rejoin_interval_ns: 250_000_000, fencing: None }
    }
}

/// Options of background processes (`bdev_raid_set_options`).
#[derive(Debug)]
pub struct ProcessOptions {
    /// Bytes copied per step of a rebuild window (SPDK's `process_window_size_kb`).
    pub window_bytes: AtomicU64,
    /// Rebuild bandwidth limit in MiB/s; 0 = unlimited.
    pub max_bandwidth_mb_sec: AtomicU64,
    /// A leg dropped after I/O errors re-joins by itself (incrementally) once its bdev answers
    /// again, e.g. once a remote leg's NVMe/TCP controller reconnected (tidemark's
    /// `auto_rejoin`; SPDK has no such option).
    pub auto_rejoin: AtomicBool,
}

/// A failed leg whose re-join attempt failed is tried again after a delay that doubles up to
/// this many times the mirror's `rejoin_interval_ns`.
pub const REJOIN_BACKOFF_MAX: u64 = 8;

impl ProcessOptions {
    pub const fn new() -> ProcessOptions {
        ProcessOptions { window_bytes: AtomicU64::new(1 << 20), max_bandwidth_mb_sec: AtomicU64::new(0), auto_rejoin: AtomicBool::new(true) }
    }
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions::new()
    }
}

pub static PROCESS_OPTIONS: ProcessOptions = ProcessOptions::new();

/// The `bdev_raid_set_options` call that restores the module's options, when they differ from
/// the defaults (for `save_config`).
pub fn options_call() -> Option<(&'static str, serde_json::Value)> {
    let (window, bw) = (PROCESS_OPTIONS.window_bytes.load(Relaxed), PROCESS_OPTIONS.max_bandwidth_mb_sec.load(Relaxed));
    let auto = PROCESS_OPTIONS.auto_rejoin.load(Relaxed);
    let d = ProcessOptions::new();
    (window != d.window_bytes.load(Relaxed) || bw != d.max_bandwidth_mb_sec.load(Relaxed) || auto != d.auto_rejoin.load(Relaxed)).then(|| {
        let mut p = serde_json::json!({"process_window_size_kb": window / 1024, "process_max_bandwidth_mb_sec": bw});
        // Only when off: SPDK does not know the option, and its default needs no line.
        if !auto {
            p["auto_rejoin"] = serde_json::json!(false);
        }
        ("bdev_raid_set_options", p)
    })
}

/// What the data path may do with a slot's leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum LegMode {
    /// No I/O.
    Off = 0,
    /// In sync: reads and writes.
    Active = 1,
    /// Writes only: a leg being rebuilt, or one being dropped whose departure is not durable yet.
    WriteOnly = 2,
    /// Being split off: writes stamped before the split's epoch only.
    OldEpoch = 3,
}

impl LegMode {
    fn from_u8(v: u8) -> LegMode {
        match v {
            1 => LegMode::Active,
            2 => LegMode::WriteOnly,
            3 => LegMode::OldEpoch,
            _ => LegMode::Off,
        }
    }
}

pub(crate) struct SlotShared {
    mode: AtomicU8,
    /// Bumped whenever a different leg takes the slot, so that a failure reported for the
    /// slot's previous leg is not held against the new one.
    pub incarnation: AtomicU64,
    /// For `OldEpoch`: writes stamped with an epoch below this go to the leg.
    split_epoch: AtomicU64,
    /// The leg's bdev (control plane; read by a core when the layout generation changes).
    entry: Mutex<Option<Arc<BdevEntry>>>,
}

impl SlotShared {
    pub(crate) fn mode(&self) -> LegMode {
        LegMode::from_u8(self.mode.load(SeqCst))
    }

    pub(crate) fn set_mode(&self, m: LegMode) {
        self.mode.store(m as u8, SeqCst);
    }

    pub(crate) fn entry(&self) -> Option<Arc<BdevEntry>> {
        self.entry.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_entry(&self, e: Option<Arc<BdevEntry>>) {
        *self.entry.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Whether a write stamped with `epoch` goes to this leg.
    pub(crate) fn takes_write(&self, epoch: u64) -> bool {
        match self.mode() {
            LegMode::Active | LegMode::WriteOnly => true,
            LegMode::OldEpoch => epoch < self.split_epoch.load(SeqCst),
            LegMode::Off => false,
        }
    }
}

/// Per-core, per-leg counters (metrics).
#[derive(Default)]
pub(crate) struct LegCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub in_flight: AtomicU64,
}

/// The control plane's view of the mirror, published by the control task after each change.
#[derive(Debug, Clone, Default)]
pub struct MirrorStatus {
    pub generation: u64,
    pub slots: Vec<SlotStatus>,
    pub dirty_regions: u64,
    pub unsynced_regions: u64,
    pub process: Option<ProcessStatus>,
    pub split_in_progress: Option<String>,
    pub shut_down: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SlotStatus {
    pub slot: usize,
    /// Name of the leg's bdev; a leg missing since assembly has the name the configuration gave
    /// it ("" when unknown: the configuration named fewer legs than the superblock misses).
    pub name: String,
    pub leg_uuid: Uuid,
    /// "active", "rebuilding", "failed", "failing", "removed", "splitting", "split".
    pub state: &'static str,
    /// Regions the leg misses (departed) or still has to receive (rebuilding).
    pub stale_regions: u64,
    /// For a split leg: its image's name.
    pub image: String,
    /// Times the leg came back to its slot incrementally: by itself, and by RPC.
    pub rejoins_auto: u64,
    pub rejoins_rpc: u64,
    /// The last return to this slot: how ("auto" or "rpc") and the regions it had to receive.
    pub last_rejoin: Option<(&'static str, u64)>,
}

#[derive(Debug, Clone, Default)]
pub struct ProcessStatus {
    /// "rebuild" or "resync".
    pub kind: &'static str,
    pub targets: Vec<String>,
    pub total_regions: u64,
    pub done_regions: u64,
    pub bytes: u64,
    pub started_ns: u64,
    pub rate_bytes_per_sec: f64,
}

impl MirrorStatus {
    pub fn active_legs(&self) -> usize {
        self.slots.iter().filter(|s| s.state == "active").count()
    }

    /// Legs that are configured (active or coming back), i.e. SPDK's "discovered" base bdevs.
    pub fn attached_legs(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s.state, "active" | "rebuilding")).count()
    }

    /// Running with fewer in-sync legs than it should have: a leg failed, is missing, or is
    /// being rebuilt, or only one leg is left.
    pub fn degraded(&self) -> bool {
        self.active_legs() < 2 || self.slots.iter().any(|s| matches!(s.state, "failed" | "failing" | "rebuilding"))
    }
}

/// Counters of the mirror as a whole.
#[derive(Default)]
pub(crate) struct MirrorCounters {
    pub read_repairs: AtomicU64,
    pub write_intent_persists: AtomicU64,
    pub regions_cleared: AtomicU64,
    pub rebuild_bytes: AtomicU64,
    pub rebuilt_regions: AtomicU64,
    pub leg_failures: AtomicU64,
    pub splits: AtomicU64,
}

/// State shared by every core's channel and the control task.
pub(crate) struct Shared {
    /// The mirror bdev's props (its size is `geometry.data_blocks`).
    pub props: BdevProps,
    pub geometry: Geometry,
    pub home: usize,
    pub regions: RegionStates,
    /// Epochs of the mirror's writes (every write is stamped at submission); a split closes
    /// the current one and seals when it drained.
    pub gate: Arc<crate::preserve::EpochTracker>,
    /// Orders overlapping writes: each write holds its block range while it is written to the
    /// legs, so that every leg applies overlapping writes in the same order (legs complete
    /// writes in any order; without this, two overlapping writes in flight could leave the legs
    /// different, and reads from different legs unstable).
    pub locks: Arc<crate::extent_lock::LockSpace>,
    pub slots: [SlotShared; MAX_SLOTS],
    /// Bumped whenever a slot's leg or mode changes; channels refresh their legs on a change.
    pub layout_gen: AtomicU64,
    /// The in-sync leg that reads of unsynced regions use.
    pub source_slot: AtomicUsize,
    /// Shut down: every I/O fails.
    pub offline: AtomicBool,
    pub ctl_tx: mpsc::UnboundedSender<Request>,
    pub leg_stats: Box<[CachePadded<[LegCounters; MAX_SLOTS]>]>,
    pub counters: MirrorCounters,
    pub status: Mutex<MirrorStatus>,
    pub options: MirrorOptions,
    pub images: preserve::Images,
    /// Why host writes waited (the simulation asserts that none waited on a preserve).
    pub waits: waits::HostWaits,
    /// Odd while the control task itself awaits I/O for a preserve (a split's metadata or leg
    /// flush); bumped at the start and at the end of each such wait. A write that asked the
    /// control task and saw it move was held up by that I/O.
    pub ctl_preserve_io: AtomicU64,
    /// A leg answered a write with Reservation Conflict: another head took the mirror over.
    /// From then on no host write is acknowledged (a fenced head that carried on with its
    /// other legs would be a second writer: split brain). Never cleared: the mirror is deleted
    /// and, if this node is to serve it again, assembled anew.
    pub fenced: AtomicBool,
    /// The leg that fenced it (for the RPC view and the log).
    pub fenced_by: Mutex<String>,
    /// The bdev registry, once the mirror is registered: a failed leg whose bdev is gone, or
    /// was missing at assembly, is looked for under its name there to re-join by itself.
    pub registry: std::sync::OnceLock<std::sync::Weak<crate::bdev::BdevRegistry>>,
}

impl Shared {
    /// Marks the mirror fenced by `leg` (logged once).
    pub(crate) fn set_fenced(&self, leg: &str) {
        if !self.fenced.swap(true, SeqCst) {
            *self.fenced_by.lock().unwrap_or_else(|e| e.into_inner()) = leg.to_string();
            log::error!(
                "mirror {} fenced by leg {leg}: another head holds its reservation; host writes fail from now on (delete the mirror here)",
                self.props.name()
            );
        }
    }

    /// The error a fenced mirror gives a host write: the legs' own Reservation Conflict
    /// status, which reaches an NVMe host as such and a SCSI host as RESERVATION CONFLICT.
    pub(crate) fn fenced_error() -> BdevError {
        BdevError::Nvme { sct: 0, sc: crate::nvmf::reservation::SC_RESERVATION_CONFLICT }
    }

    pub(crate) fn leg_stats(&self, core: usize, slot: usize) -> &LegCounters {
        &self.leg_stats[core.min(self.leg_stats.len() - 1)][slot]
    }

    /// I/Os in flight to a slot's leg on every core.
    pub(crate) fn leg_in_flight(&self, slot: usize) -> u64 {
        self.leg_stats.iter().map(|c| c[slot].in_flight.load(SeqCst)).sum()
    }

    pub(crate) fn send(&self, r: Request) -> bool {
        self.ctl_tx.unbounded_send(r).is_ok()
    }

    /// Sends a request made around a reply channel and waits for the answer; `None` when the
    /// control task is gone (the mirror is shut down).
    pub(crate) async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.send(make(tx)) {
            return None;
        }
        rx.await.ok()
    }

    pub(crate) fn process_options(&self) -> &ProcessOptions {
        self.options.process.as_deref().unwrap_or(&PROCESS_OPTIONS)
    }

    pub(crate) fn status(&self) -> MutexGuard<'_, MirrorStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A mirror bdev.
pub struct MirrorBdev {
    shared: Arc<Shared>,
}

/// A split whose epoch started: new writes skip the leg from now on.
pub struct SplitStarted {
    pub leg: Arc<BdevEntry>,
    /// The closed epoch: the image holds every write stamped with it or an older one.
    pub epoch: u64,
    /// Answered once the closed epoch drained and the leg is sealed.
    pub sealed: oneshot::Receiver<Result<SplitSealed, MirrorError>>,
}

/// The result of a split: the leg, sealed, and what the image bdev needs.
pub struct SplitSealed {
    pub leg: HoldGuard,
    pub geometry: Geometry,
    pub mirror_name: String,
    pub generation: u64,
}

impl MirrorBdev {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A snapshot of the mirror's state for RPCs and metrics.
    pub fn status(&self) -> MirrorStatus {
        self.shared.status().clone()
    }

    pub fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    /// Lets the mirror find a failed leg's bdev by name when it appears again (see
    /// `Shared::registry`); the RPC that registers the mirror sets it.
    pub fn set_registry(&self, r: &Arc<crate::bdev::BdevRegistry>) {
        let _ = self.shared.registry.set(Arc::downgrade(r));
    }

    pub fn home_core(&self) -> usize {
        self.shared.home
    }

    /// Creates a new mirror on `legs`, or reassembles the mirror named `name` (or with `uuid`)
    /// from the superblocks on them. Runs on the core that becomes the mirror's home.
    /// `missing` names listed legs that do not exist: allowed only when reassembling.
    pub async fn assemble(
        name: &str,
        legs: Vec<HoldGuard>,
        missing: Vec<String>,
        uuid: Option<Uuid>,
        options: MirrorOptions,
    ) -> Result<Arc<MirrorBdev>, MirrorError> {
        // Reserve the remote legs before reading their superblocks: once preempted, the old
        // head's later writes are refused, so what the assembly reads stays current.
        if let Some(f) = options.fencing {
            for l in &legs {
                if fence::reserve_leg(l.entry().bdev().as_ref(), f).await? {
                    log::info!("mirror {name}: leg {} reserved (Write Exclusive, key {:#x})", l.entry().name(), f.key);
                }
            }
        }
        assemble::assemble(name, legs, missing, uuid, options).await
    }

    /// Adds `leg`: a leg that left this mirror (failed, removed or split off) gets only the
    /// regions written since it left; any other leg is copied in full. Returns when the leg
    /// takes writes; the copy runs in the background.
    pub async fn add_leg(&self, leg: HoldGuard) -> Result<AddedLeg, MirrorError> {
        let r = self.shared.ask(|reply| Request::AddLeg { guard: leg, reply }).await;
        r.unwrap_or_else(|| Err(shut_down_error(self.shared.props.name())))
    }

    /// Removes the leg whose bdev is `leg_name` (not the last in-sync leg).
    pub async fn remove_leg(&self, leg_name: &str) -> Result<(), MirrorError> {
        let name = leg_name.to_string();
        let r = self.shared.ask(|reply| Request::RemoveLeg { name, reply }).await;
        r.unwrap_or_else(|| Err(shut_down_error(self.shared.props.name())))
    }

    /// Splits the leg whose bdev is `leg_name` off as a point-in-time image named `image`:
    /// returns once the split's epoch started (after the split is recorded on the legs): from
    /// then on new writes skip the leg, while writes submitted before still reach it; once they
    /// completed, the leg is sealed and handed over through [`SplitStarted::sealed`].
    pub async fn split_start(&self, leg_name: &str, image: &str) -> Result<SplitStarted, MirrorError> {
        let (leg, image) = (leg_name.to_string(), image.to_string());
        let r = self.shared.ask(|reply| Request::Split { leg, image, reply }).await;
        r.unwrap_or_else(|| Err(shut_down_error(self.shared.props.name())))
    }

    /// [`Self::split_start`], then waits for the seal.
    pub async fn split(&self, leg_name: &str, image: &str) -> Result<SplitSealed, MirrorError> {
        let started = self.split_start(leg_name, image).await?;
        started.sealed.await.unwrap_or_else(|_| Err(shut_down_error(self.shared.props.name())))
    }

    /// Forgets the name of a deleted image (its leg can still re-join incrementally).
    pub async fn forget_image(&self, image: &str) {
        let image = image.to_string();
        let _ = self.shared.ask(|reply| Request::ForgetImage { image, reply }).await;
    }

    /// Why host writes waited, for the simulation's assertion that none waited on a preserve.
    pub fn host_waits(&self) -> &waits::HostWaits {
        &self.shared.waits
    }

    /// The mirror's current epoch (writes are stamped with it).
    pub fn epoch(&self) -> u64 {
        self.shared.gate.current()
    }

    /// Stops the mirror cleanly: background work ends, quiet regions' write-intent bits are
    /// cleared, metadata is written, legs are flushed and released. I/O fails afterwards.
    pub async fn shutdown(&self) {
        self.shared.offline.store(true, SeqCst);
        let _ = self.shared.ask(|reply| Request::Shutdown { reply }).await;
    }

    /// Names of the legs that take part in the mirror now (active or rebuilding).
    pub fn attached_leg_names(&self) -> Vec<String> {
        self.status().slots.iter().filter(|s| matches!(s.state, "active" | "rebuilding")).map(|s| s.name.clone()).collect()
    }

    /// Names of every leg the configuration must keep, in slot order: those attached, and
    /// those failed or missing (a node down), so that a restart from the saved configuration
    /// looks for them again (see `assemble::name_missing_legs`). Not removed legs, nor split
    /// ones (an image is configured by its own `bdev_raid_open_split_image`), nor a failed leg
    /// whose name is unknown. SPDK's raid writes every slot too (a slot without a name as
    /// `removed_base_bdev_<slot>`); tidemark leaves those out: such a name would make a
    /// restart create nothing under it and only fail to find it.
    pub fn configured_leg_names(&self) -> Vec<String> {
        self.status()
            .slots
            .iter()
            .filter(|s| matches!(s.state, "active" | "rebuilding" | "failing" | "failed") && !s.name.is_empty())
            .map(|s| s.name.clone())
            .collect()
    }

    /// The slot of the leg named `leg`, if it is attached.
    pub fn has_leg(&self, leg: &str) -> bool {
        self.status().slots.iter().any(|s| s.name == leg && matches!(s.state, "active" | "rebuilding" | "failing" | "splitting"))
    }
}

/// What `add_leg` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AddedLeg {
    pub slot: usize,
    /// The leg came back to its slot: only the regions written since it left are copied.
    pub returning: bool,
    pub regions_to_copy: u64,
}

impl Bdev for MirrorBdev {
    fn props(&self) -> &BdevProps {
        &self.shared.props
    }
    fn supports(&self, _io: IoType) -> bool {
        // Unmap is done as write-zeroes on the legs so that they stay identical; legs without
        // write-zeroes get zero buffers.
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(channel::MirrorChannel::new(self.shared.clone())))
    }
    fn driver_specific(&self) -> Value {
        json!({ "raid": describe(self) })
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        let mut p = json!({
            "name": self.shared.props.name(),
            "raid_level": "raid1",
            "base_bdevs": self.configured_leg_names(),
            "uuid": self.shared.props.uuid().to_string(),
            "strip_size_kb": 0,
            "superblock": true,
            "region_size_kb": self.shared.geometry.region_bytes() / 1024,
        });
        // The key, not `preempt_key`: a preempt is a decision of one failover, and replayed
        // at a later restart it would take the legs from whichever head holds that key then.
        // This head restarting finds its own key registered and holding.
        if let Some(f) = self.shared.options.fencing {
            p["reservation_key"] = json!(f.key);
        }
        Some(("bdev_raid_create", p))
    }
    fn destroy(&self) {
        self.shared.offline.store(true, SeqCst);
        let (tx, rx) = oneshot::channel();
        if !self.shared.send(Request::Shutdown { reply: tx }) {
            return;
        }
        // Off the reactors (the RPC thread, daemon shutdown) wait for the clean shutdown so
        // that the legs are released and their metadata written when this returns. On a core
        // (tests stepping cores by hand) waiting would deadlock: the shutdown completes when
        // the core runs it.
        if reactor::try_current().is_none() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut rx = rx;
            while std::time::Instant::now() < deadline {
                match rx.try_recv() {
                    Ok(Some(())) | Err(_) => return,
                    Ok(None) => std::thread::sleep(std::time::Duration::from_micros(200)),
                }
            }
            log::error!("mirror {}: clean shutdown did not finish in 30 s", self.shared.props.name());
        }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_preservable(&self) -> Option<&dyn crate::preserve::Preservable> {
        Some(self)
    }
}

/// The mirror as `bdev_raid_get_bdevs` shows it (SPDK's fields plus tidemark's).
pub fn describe(m: &MirrorBdev) -> Value {
    let s = m.status();
    let g = m.geometry();
    let state = if s.shut_down { "offline" } else { "online" };
    let base: Vec<Value> = s
        .slots
        .iter()
        .filter(|x| x.state != "empty")
        .map(|x| {
            json!({
                "name": if x.name.is_empty() { Value::Null } else { json!(x.name) },
                "uuid": x.leg_uuid.to_string(),
                "slot": x.slot,
                "is_configured": matches!(x.state, "active" | "rebuilding"),
                "state": x.state,
                "data_offset": g.data_offset,
                "data_size": g.data_blocks,
                "stale_regions": x.stale_regions,
                "image": if x.image.is_empty() { Value::Null } else { json!(x.image) },
                "rejoins": { "auto": x.rejoins_auto, "rpc": x.rejoins_rpc },
                "last_rejoin": x.last_rejoin.map_or(Value::Null, |(how, n)| json!({ "how": how, "regions_to_copy": n })),
            })
        })
        .collect();
    let mut v = json!({
        "name": m.shared.props.name(),
        "uuid": m.shared.props.uuid().to_string(),
        "strip_size_kb": 0,
        "state": state,
        "raid_level": "raid1",
        "superblock": true,
        "num_base_bdevs": s.slots.iter().filter(|x| !matches!(x.state, "empty" | "split" | "removed")).count(),
        "num_base_bdevs_discovered": s.attached_legs(),
        "num_base_bdevs_operational": s.active_legs(),
        "degraded": s.degraded(),
        "generation": s.generation,
        "region_size_kb": g.region_bytes() / 1024,
        "num_regions": g.num_regions,
        "dirty_regions": s.dirty_regions,
        "unsynced_regions": s.unsynced_regions,
        "base_bdevs_list": base,
    });
    // tidemark's fencing (issue #15): the key this head holds on its remote legs, and whether
    // another head took them over.
    if let Some(f) = m.shared.options.fencing {
        v["reservation_key"] = json!(f.key);
        v["fenced"] = json!(m.shared.fenced.load(SeqCst));
        if m.shared.fenced.load(SeqCst) {
            v["fenced_by"] = json!(m.shared.fenced_by.lock().unwrap_or_else(|e| e.into_inner()).clone());
        }
    }
    if let Some(p) = &s.process {
        let blocks = p.done_regions.saturating_mul(g.region_blocks).min(g.data_blocks);
        let percent = if p.total_regions == 0 { 100.0 } else { p.done_regions as f64 * 100.0 / p.total_regions as f64 };
        v["process"] = json!({
            "type": p.kind,
            "target": p.targets.first(),
            "targets": p.targets,
            "progress": { "blocks": blocks, "percent": percent.floor() as u64, "regions_done": p.done_regions, "regions_total": p.total_regions },
            "bytes_copied": p.bytes,
            "rate_bytes_per_sec": p.rate_bytes_per_sec,
        });
    }
    if let Some(sp) = &s.split_in_progress {
        v["split_in_progress"] = json!(sp);
    }
    v
}

/// Counts of the slots in each persistent state (tests, metrics).
pub fn slot_state_name(s: SlotState, failing: bool) -> &'static str {
    if failing {
        "failing"
    } else {
        s.name()
    }
}
