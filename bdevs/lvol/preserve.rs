//! The generic preserve interface ([`Preservable`]) of a pool volume: `bdev_snapshot_create`,
//! `bdev_snapshot_get`, `bdev_snapshot_delete` and backups (full and incremental) work on pool
//! volumes as on CoW volumes and mirrors (DESIGN §7).
//!
//! * **Names.** A pool snapshot is a pool volume: its bdev is named by its UUID with the alias
//!   `lvs/name`, and the alias is its name in the preserve layer. `bdev_snapshot_create` takes
//!   `snapshot_name` as `name` or `lvs/name` (the volume's own store) and answers `lvs/name`.
//! * **Preserve** is [`Store::snapshot`] (`bdev_lvol_snapshot`): no copy, no pause, the epoch
//!   rule of DESIGN §1; it returns once the image is sealed and its record durable, so the
//!   signal is `sealed` when the call answers (`freeze` is refused: nothing ever stops).
//! * **A volume's snapshots** are those of its parent chain (after a snapshot the volume's
//!   parent is its newest snapshot, each snapshot's parent the one before) that the volume
//!   owns. A snapshot is in several chains when a clone was made of it (SPDK counts the
//!   original volume as a clone too): it belongs to the volume it was taken of if this run
//!   took it and that volume still has it in its chain, else to the writable volume with the
//!   smallest UUID whose chain has it, so that it is listed once. A snapshot in no writable
//!   volume's chain (its volume deleted or reverted past it) is listed by none; the lvol RPCs
//!   still see it.
//! * **`epoch`** of a pool snapshot is its place in its chain (1 = the oldest), which orders
//!   the snapshots of one volume across restarts (the pool's epoch counter is not on the
//!   media). **Creation time** and time to seal are known for snapshots this run took; the
//!   record has no field for them (0 / null after a restart).
//! * **What changed** between two snapshots of one chain is read from their cluster maps: a
//!   cluster mapped to different physical clusters, or mapped in one only, changed (snapshots
//!   are immutable, so a physical cluster both map holds the same data).

use super::{clusters_for, rpc, LvolBdev, LvolError, State, Store};
use crate::bdev::{BdevCtx, Channel};
use crate::preserve::{Preservable, PreserveError, PreserveRequest, PreserveStats, SealSignal, SnapshotInfo, SnapshotState};
use crate::rpc::RpcError;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use uuid::Uuid;

/// One snapshot of a volume as the store describes it.
pub(crate) struct PoolSnapshot {
    pub uuid: Uuid,
    pub name: String,
    /// Its place in the chain: 1 = the oldest.
    pub depth: u64,
    pub state: SnapshotState,
    pub created_ms: u64,
    pub time_to_seal_ns: Option<u64>,
    /// Clusters no other volume maps (what deleting it frees).
    pub own_clusters: u64,
}

impl From<LvolError> for PreserveError {
    fn from(e: LvolError) -> Self {
        match e {
            LvolError::Invalid(m) => PreserveError::Invalid(m),
            LvolError::NotFound(m) => PreserveError::NotFound(m),
            LvolError::Exists(m) => PreserveError::Exists(m),
            LvolError::NoSpace(m) => PreserveError::NoSpace(m),
            LvolError::Busy(m) => PreserveError::Busy(m),
            e @ LvolError::Io(_) => PreserveError::Io(e.to_string()),
        }
    }
}

fn from_rpc(e: RpcError) -> PreserveError {
    match e.code {
        crate::rpc::EEXIST => PreserveError::Exists(e.message),
        crate::rpc::ENODEV => PreserveError::NotFound(e.message),
        crate::rpc::EBUSY => PreserveError::Busy(e.message),
        _ => PreserveError::Io(e.message),
    }
}

/// The snapshots in volume `uuid`'s parent chain, newest first (guarded against a cycle).
fn chain(st: &State, uuid: Uuid) -> Vec<Uuid> {
    let mut out = Vec::new();
    let mut at = st.vols.get(&uuid).and_then(|v| v.rec.parent);
    while let Some(p) = at {
        if out.contains(&p) {
            break;
        }
        let Some(v) = st.vols.get(&p) else { break };
        out.push(p);
        at = v.rec.parent;
    }
    out
}

/// The writable volume that lists snapshot `snap` (see the module comment).
fn owner(st: &State, snap: Uuid) -> Option<Uuid> {
    if let Some(m) = st.snap_meta.get(&snap) {
        if st.vols.get(&m.origin).is_some_and(|v| !v.rec.snapshot) && chain(st, m.origin).contains(&snap) {
            return Some(m.origin);
        }
    }
    st.vols.values().filter(|v| !v.rec.snapshot && chain(st, v.rec.uuid).contains(&snap)).map(|v| v.rec.uuid).min()
}

impl Store {
    /// The lvol named `name` (its name in the store, without `lvs/`).
    pub(crate) fn lvol_by_name(&self, name: &str) -> Option<Uuid> {
        self.st().vols.values().find(|v| v.rec.name == name).map(|v| v.rec.uuid)
    }

    /// The snapshots volume `uuid` owns, newest first.
    pub(crate) fn pool_snapshots(&self, uuid: Uuid) -> Vec<PoolSnapshot> {
        let st = self.st();
        if st.vols.get(&uuid).is_none_or(|v| v.rec.snapshot) {
            return Vec::new();
        }
        chain(&st, uuid)
            .into_iter()
            .filter(|s| owner(&st, *s) == Some(uuid))
            .filter_map(|s| {
                let v = st.vols.get(&s)?;
                let m = st.snap_meta.get(&s);
                Some(PoolSnapshot {
                    uuid: s,
                    name: v.rec.name.clone(),
                    depth: chain(&st, s).len() as u64 + 1,
                    state: m.map_or(SnapshotState::Sealed, |m| m.signal.get()),
                    created_ms: m.map_or(0, |m| m.created_ms),
                    time_to_seal_ns: m.and_then(|m| m.time_to_seal_ns),
                    own_clusters: v.map.values().filter(|p| st.refs[**p as usize] == 1).count() as u64,
                })
            })
            .collect()
    }

    /// The seal signal of snapshot `snap`: this run's, or a sealed one for a snapshot loaded
    /// from the media (committed, so sealed).
    pub(crate) fn seal_signal(&self, snap: Uuid) -> Option<Arc<SealSignal>> {
        let st = self.st();
        if !st.vols.get(&snap)?.rec.snapshot {
            return None;
        }
        Some(st.snap_meta.get(&snap).map(|m| m.signal.clone()).unwrap_or_else(|| {
            let s = SealSignal::new();
            s.set(SnapshotState::Sealed);
            s
        }))
    }

    /// Byte ranges (offset, length), sorted and disjoint, where snapshot `newer` may differ
    /// from snapshot `older`, an older snapshot of its chain: the clusters the two map to
    /// different physical clusters or one maps and the other does not, and, if `newer` is
    /// larger (a volume grown in between), everything past `older`'s end. Within `newer`'s size.
    pub fn changed_ranges(&self, older: Uuid, newer: Uuid) -> Result<Vec<(u64, u64)>, LvolError> {
        let st = self.st();
        let get = |u: Uuid| st.vols.get(&u).ok_or_else(|| LvolError::NotFound(format!("no lvol {u} in lvol store {}", st.name)));
        let (a, b) = (get(older)?, get(newer)?);
        for v in [a, b] {
            if !v.rec.snapshot {
                return Err(LvolError::Invalid(format!("lvol {} is not a snapshot", v.rec.name)));
            }
            if st.snap_meta.get(&v.rec.uuid).is_some_and(|m| m.signal.get() != SnapshotState::Sealed) {
                return Err(LvolError::Busy(format!("snapshot {} is not sealed", v.rec.name)));
            }
        }
        if !chain(&st, newer).contains(&older) {
            return Err(LvolError::Invalid(format!("snapshot {} is not an older snapshot in the chain of {}", a.rec.name, b.rec.name)));
        }
        let cs = self.cluster_size;
        let end = b.rec.size_bytes;
        let mut changed: BTreeSet<u32> = BTreeSet::new();
        changed.extend(b.map.iter().filter(|(l, p)| a.map.get(l) != Some(p)).map(|(l, _)| *l));
        changed.extend(a.map.iter().filter(|(l, p)| b.map.get(l) != Some(p)).map(|(l, _)| *l));
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |off: u64, len: u64| {
            let len = len.min(end.saturating_sub(off));
            if len == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        };
        let a_end = clusters_for(a.rec.size_bytes, cs) * cs;
        for l in changed {
            let off = l as u64 * cs;
            if off < a_end {
                push(off, cs);
            }
        }
        if end > a_end {
            push(a_end, end - a_end);
        }
        Ok(out)
    }
}

impl LvolBdev {
    /// `lvs/name` of this volume.
    fn alias(&self) -> String {
        let name = self.store.st().vols.get(&self.lvol_uuid()).map(|v| v.rec.name.clone()).unwrap_or_default();
        format!("{}/{name}", self.store.name())
    }

    /// The lvol of snapshot name `name` (`lvs/name` or `name`) in this volume's store.
    fn snapshot_uuid(&self, name: &str) -> Result<Uuid, PreserveError> {
        let lvs = self.store.name();
        let lvol = match name.split_once('/') {
            Some((s, n)) if s == lvs => n,
            Some(_) => return Err(PreserveError::NotFound(format!("{name} is not in lvol store {lvs}"))),
            None => name,
        };
        self.store.lvol_by_name(lvol).ok_or_else(|| PreserveError::NotFound(format!("lvol store {lvs} has no snapshot {lvol}")))
    }

    /// Runs `f` on the store's core (as the lvol RPCs do) and waits for it.
    fn on_store<T: Send + 'static, Fut>(&self, t: &BdevCtx, f: impl FnOnce(Arc<Store>, Channel) -> Fut + Send + 'static) -> Result<T, PreserveError>
    where
        Fut: std::future::Future<Output = Result<T, LvolError>> + 'static,
    {
        rpc::on_store(t, &self.store, f).map_err(from_rpc_or_lvol)
    }
}

fn from_rpc_or_lvol(e: RpcError) -> PreserveError {
    match e.code {
        crate::rpc::INVALID_PARAMS => PreserveError::Invalid(e.message),
        crate::rpc::ENOSPC => PreserveError::NoSpace(e.message),
        crate::rpc::EIO => PreserveError::Io(e.message),
        _ => from_rpc(e),
    }
}

impl Preservable for LvolBdev {
    fn method(&self) -> &'static str {
        // A write to a cluster a snapshot shares copies it first.
        "cow"
    }

    fn image_name(&self, t: &BdevCtx, requested: &str) -> Result<String, RpcError> {
        let lvs = self.store.name();
        let lvol = match requested.split_once('/') {
            Some((s, n)) if s == lvs => n,
            Some(_) => {
                return Err(RpcError::invalid_params(format!(
                    "field `snapshot_name`: {requested:?} names another lvol store; a snapshot of {} is `name` or `{lvs}/name`",
                    self.alias()
                )))
            }
            None => requested,
        };
        rpc::check_name("snapshot_name", lvol)?;
        let alias = format!("{lvs}/{lvol}");
        if t.bdevs.get(&alias).is_some() || self.store.lvol_by_name(lvol).is_some() {
            return Err(RpcError::exists(format!("field `snapshot_name`: lvol {alias} already exists")));
        }
        Ok(alias)
    }

    fn preserve(&self, t: &BdevCtx, req: &PreserveRequest) -> Result<Arc<SealSignal>, PreserveError> {
        if req.freeze {
            return Err(PreserveError::Invalid("a pool snapshot never stops I/O; `freeze` is for CoW volumes".into()));
        }
        let name = req.snapshot_name.rsplit_once('/').map_or(req.snapshot_name.as_str(), |(_, n)| n).to_string();
        let uuid = self.lvol_uuid();
        let snap = self.on_store(t, move |s, ch| async move { Ok(s.snapshot(&ch, uuid, &name).await?.0) })?;
        rpc::register_volume(t, &self.store, snap).map_err(from_rpc)?;
        self.store.seal_signal(snap).ok_or_else(|| PreserveError::NotFound(format!("snapshot {} vanished", req.snapshot_name)))
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        let (lvs, origin, cs) = (self.store.name(), self.alias(), self.store.cluster_size);
        self.store
            .pool_snapshots(self.lvol_uuid())
            .into_iter()
            .map(|s| SnapshotInfo {
                name: format!("{lvs}/{}", s.name),
                origin: origin.clone(),
                method: "cow",
                epoch: s.depth,
                state: s.state,
                old_epoch_in_flight: 0,
                grains_copied: 0,
                bytes_used: s.own_clusters * cs,
                creation_time_ms: s.created_ms,
                time_to_seal_ns: s.time_to_seal_ns,
            })
            .collect()
    }

    fn seal_signal(&self, name: &str) -> Option<Arc<SealSignal>> {
        self.store.seal_signal(self.snapshot_uuid(name).ok()?)
    }

    fn check_delete(&self, name: &str) -> Result<(), PreserveError> {
        let snap = self.snapshot_uuid(name)?;
        Ok(self.store.check_delete(snap, "name")?)
    }

    fn delete_snapshot(&self, t: &BdevCtx, name: &str) -> Result<(), PreserveError> {
        let snap = self.snapshot_uuid(name)?;
        self.store.check_delete(snap, "name")?;
        // The bdev is unregistered already (by the caller); what is left is the pool's delete.
        if let Some(e) = t.bdevs.get(&snap.to_string()) {
            drop(e);
            t.delete_bdev(&snap.to_string()).map_err(from_rpc)?;
        }
        self.on_store(t, move |s, ch| async move { s.delete_volume(&ch, snap).await })?;
        if self.store.anchor() == Some(snap) {
            self.store.set_anchor(self.store.volumes().first().map(|(r, _)| r.uuid))?;
        }
        Ok(())
    }

    fn stats(&self) -> PreserveStats {
        let live = &self.live;
        let copies = live.copies.load(Relaxed);
        let mut s = PreserveStats {
            grains_copied: copies,
            copied_bytes: copies * self.store.cluster_size,
            table_bytes: live.capacity() * 4,
            snapshots_failed: live.snaps_failed.load(Relaxed),
            ..Default::default()
        };
        live.seal_latency.accumulate(&mut s.seal_latency.0, &mut s.seal_latency.1);
        s.count_states(self.snapshots());
        s
    }

    fn changed_ranges(&self, older: &str, newer: &str) -> Result<Vec<(u64, u64)>, PreserveError> {
        let (a, b) = (self.snapshot_uuid(older)?, self.snapshot_uuid(newer)?);
        let owned = self.store.pool_snapshots(self.lvol_uuid());
        for (n, u) in [(older, a), (newer, b)] {
            if !owned.iter().any(|s| s.uuid == u) {
                return Err(PreserveError::NotFound(format!("{n} is not a snapshot of {}", self.alias())));
            }
        }
        Ok(self.store.changed_ranges(a, b)?)
    }
}
