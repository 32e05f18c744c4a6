//! `snapshot`: the copy-on-write volume (DESIGN §1, method 1) and its snapshots as read-only
//! bdevs.
//!
//! A CoW volume is a preservable bdev over a *base* bdev (the live image `L`) with a CoW
//! *store* on another bdev (copied grains, their lookup tables, the snapshot list; format in
//! `layout.rs`). It keeps up to 32 snapshots.
//!
//! # The exact rules
//!
//! Notation: the volume is cut in *grains* (`grain_kb`, power of two). Snapshot `s` has an
//! epoch `s.e`: it holds every write stamped with an epoch `<= s.e`. A write `w` is stamped
//! `w.e` when it is submitted; `w` *belongs to* `s` iff `w.e <= s.e`. `entry(s, g)` is the
//! lookup-table entry of `s` for grain `g` (a store slot) or none. A *slot* may be shared by
//! several snapshots' entries for the same grain; its record on media is
//! `(grain, mask of snapshots)`.
//!
//! Invariant I(s, g), for every live snapshot `s` and grain `g`, at every moment outside the
//! grain's extent lock: if `entry(s, g)` exists, the slot holds `s`'s image of `g` restricted
//! to the writes executed so far (in the order the grain lock gave them); otherwise `L[g]` is
//! that image. Reads of `s`: entry present → the slot, otherwise → `L`.
//!
//! Every modifying I/O (write, unmap, write-zeroes) `w`, after its stamp, locks the grains it
//! touches (one extent lock, grain aligned; this orders old-epoch writes, copies and new-epoch
//! writes on the same grain) and then, for each grain `g`:
//!
//! 1. **Copy (new-epoch write)**. `A = { s live : s.e < w.e and no entry(s, g) }`. If `A` is not
//!    empty: allocate one slot, copy the whole of `L[g]` into it, make the record
//!    `(g, mask(A))` durable (data flushed before the record is written, record flushed before
//!    we go on; concurrent copies share the two flushes: group commit), and set `entry(s, g)`
//!    for every `s` in `A`. One copy serves every snapshot that needs it.
//! 2. **Update (old-epoch write)**. `B = { s live : s.e >= w.e and entry(s, g) exists }` (a
//!    write still in flight from before a preserve, overtaken on this grain by a new-epoch
//!    write that copied it). `w` belongs to those images, so its data goes into their copy:
//!    per distinct slot `X` of `B`, if `X` serves only snapshots of `B`, `w`'s part is written
//!    into `X` in place; otherwise `X` also serves an older image that `w` does not belong to,
//!    so a new slot `Y = X + w` is written and the entries of `B` move to `Y` (records of `X`
//!    and `Y` in one durable commit).
//! 3. Then `w` is applied to `L`, and the lock is released.
//!
//! The lock makes 1–3 atomic per grain, so I(s, g) holds for every `s`: `A` gets a copy of `L`
//! as it was before `w` (all earlier writes, whose images are `L` for those snapshots); `B`'s
//! images get `w` in their copy; snapshots with `s.e >= w.e` and no entry read `L`, which gets
//! `w`; older snapshots with an entry are untouched.
//!
//! Where this departs from DESIGN §1: DESIGN says an old-epoch write "removes the entry, so the
//! preserved image reads the new data from the live image". That is only right when the write
//! covers the *whole* grain (otherwise the image would read the rest of the grain from `L`,
//! which holds new-epoch data), only when no older snapshot shares the slot, and only if the
//! removal becomes durable *after* the live write is durable (else a crash in between lets the
//! image read the new-epoch data in `L`). Writing the old-epoch data into the copy (rule 2) is
//! correct in every case, costs one store write in a rare case, and keeps the entry, so a later
//! new-epoch write never needs to copy that grain again.
//!
//! Consequences: for each grain, the live snapshots that have an entry are exactly those with
//! `s.e < ` the highest epoch of a write executed on it (a prefix); sealed images' slots are
//! never written again (rule 2 applies only while `s` drains); a sealed snapshot never changes.
//!
//! # Durability
//!
//! Devices may have a volatile write cache (a file through `uring`). A slot's data is durable
//! before its record; a record is durable before the live write that depends on it is
//! submitted. A preserve is *sealed* when its old-epoch I/Os are done, the base and the store
//! have been flushed and the header says `sealed` (durable); only then does the state read
//! `sealed`, so a sealed snapshot comes back after `kill -9` with exactly its content.
//! A snapshot still draining at a crash comes back sealed with a crash image *of the moment of
//! its preserve* (each block holds what was durable then, or the data of a write that was not
//! durable then, e.g. one still in flight at the preserve: a host flush after the preserve
//! makes a write durable in the live volume, not in a snapshot that has not sealed), or not at
//! all if its creation had not reached the header yet. A deleted snapshot's index is first marked `deleting`
//! (durable; from then on its bits are ignored, and its slots can be reused at once), then its
//! bits are cleared from the records, and only then is the index marked free.
//!
//! # Cores
//!
//! Data paths run on every core: an I/O's stamp, lock and plan need no message unless the lock
//! shard is remote. Slot allocation, records and the group committer belong to the volume's
//! *home* core (reached by `call_on`, only on the copy paths); the per-snapshot grain tables are
//! arrays of atomics read by any core (written under the grain lock).

mod home;
pub mod layout;
pub mod rpc;
mod table;

use crate::bdev::{Bdev, BdevEntry, BdevError, Channel, HoldGuard, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType, LatencyHistogram};
use crate::extent_lock::LockSpace;
use crate::preserve::{EpochTracker, FreezeGate, Preservable, PreserveError, PreserveRequest, PreserveStats, SealSignal, SnapshotInfo, SnapshotState};
use crate::reactor;
use crate::target::Target;
use layout::{DiskState, Geometry, MAX_SNAPSHOTS};
use serde_json::{json, Value};
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use table::ZeroMap;
use uuid::Uuid;

pub use home::OpenParams;

/// Snapshot index states in RAM (same values as [`DiskState`]).
const ST_FREE: u8 = DiskState::Free as u8;
const ST_DRAINING: u8 = DiskState::Draining as u8;
const ST_SEALED: u8 = DiskState::Sealed as u8;
const ST_DELETING: u8 = DiskState::Deleting as u8;
const ST_FAILED: u8 = DiskState::Failed as u8;

/// Default grain size.
pub const DEFAULT_GRAIN_KB: u32 = 64;

/// Control-plane facts of one snapshot (names, times, the seal signal).
struct SnapMeta {
    name: String,
    uuid: Uuid,
    created_ms: u64,
    seal_ns: u64,
    /// What the next header write records for this index.
    disk_state: DiskState,
    signal: Arc<SealSignal>,
}

/// One of the volume's 32 snapshot indices.
struct SnapSlot {
    state: AtomicU8,
    epoch: AtomicU64,
    /// Bumped when the index is deleted, so readers of the old snapshot notice.
    generation: AtomicU64,
    /// Per grain: slot + 1, or 0 for "read the live image".
    grains: ZeroMap<AtomicU32>,
    entries: AtomicU64,
    meta: Mutex<SnapMeta>,
}

impl SnapSlot {
    fn meta(&self) -> std::sync::MutexGuard<'_, SnapMeta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct CowStats {
    grains_copied: AtomicU64,
    copy_latency: LatencyHistogram,
    seal_latency: LatencyHistogram,
    used_slots: AtomicU64,
}

/// Everything a CoW volume's cores share.
pub(crate) struct VolumeShared {
    id: u64,
    name: String,
    uuid: Uuid,
    base: Arc<BdevEntry>,
    store: Arc<BdevEntry>,
    claims: Mutex<Vec<HoldGuard>>,
    block_size: u32,
    num_blocks: u64,
    grain_shift: u32,
    num_grains: u64,
    geo: Geometry,
    store_bs: u64,
    home: usize,
    tracker: Arc<EpochTracker>,
    locks: Arc<LockSpace>,
    gate: FreezeGate,
    snaps: Vec<SnapSlot>,
    /// Bit i set: index i is draining or sealed (writers preserve for it).
    live: AtomicU32,
    /// Slot records as the home core last set them (home core writes; stats read).
    records: ZeroMap<AtomicU64>,
    closed: AtomicBool,
    committer: futures::task::AtomicWaker,
    stats: CowStats,
}

impl VolumeShared {
    fn grain_blocks(&self) -> u64 {
        1 << self.grain_shift
    }

    /// Blocks of grain `g` (the last grain may be short).
    fn grain_range(&self, g: u64) -> (u64, u64) {
        let start = g << self.grain_shift;
        (start, self.grain_blocks().min(self.num_blocks - start))
    }

    fn store_offset_blocks(&self, slot: u32, within_bytes: u64) -> u64 {
        (self.geo.slot_offset(slot) + within_bytes) / self.store_bs
    }

    fn live_mask(&self) -> u32 {
        self.live.load(SeqCst)
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.snaps.iter().position(|s| s.state.load(SeqCst) != ST_FREE && s.meta().name == name)
    }

    fn info(&self, i: usize) -> SnapshotInfo {
        let s = &self.snaps[i];
        let st = s.state.load(SeqCst);
        let epoch = s.epoch.load(SeqCst);
        let m = s.meta();
        let state = match st {
            ST_SEALED => SnapshotState::Sealed,
            ST_FAILED => SnapshotState::Failed,
            _ => SnapshotState::Draining,
        };
        let entries = s.entries.load(Relaxed);
        SnapshotInfo {
            name: m.name.clone(),
            origin: self.name.clone(),
            method: "cow",
            epoch,
            state,
            old_epoch_in_flight: if state == SnapshotState::Draining { self.tracker.in_flight_upto(epoch) } else { 0 },
            grains_copied: entries,
            bytes_used: entries * self.geo.grain_bytes,
            creation_time_ms: m.created_ms,
            time_to_seal_ns: (m.seal_ns > 0).then_some(m.seal_ns),
        }
    }
}

/// The CoW volume bdev.
pub struct CowVolume {
    v: Arc<VolumeShared>,
}

impl CowVolume {
    /// Opens (formatting a blank store, or recovering an existing one) a CoW volume. Runs on
    /// the core that becomes its home; returns the volume and its snapshots' bdevs, for the
    /// caller to register.
    pub async fn open(p: OpenParams) -> Result<(CowVolume, Vec<SnapshotBdev>), String> {
        let (v, snaps) = home::open(p).await?;
        let bdevs = snaps.into_iter().map(|(i, gen)| SnapshotBdev::attached(&v, i, gen)).collect();
        Ok((CowVolume { v }, bdevs))
    }

    pub fn home_core(&self) -> usize {
        self.v.home
    }

    /// Takes a snapshot named `name` into `bdev` (a fresh [`SnapshotBdev::new`]). Runs on the
    /// home core. Returns once the epoch is bumped (with `freeze`: once sealed).
    pub async fn take_snapshot(&self, bdev: &SnapshotBdev, freeze: bool) -> Result<Arc<SealSignal>, PreserveError> {
        let (i, gen, signal) = home::preserve(&self.v, &bdev.name, bdev.uuid, freeze).await?;
        bdev.attach(i, gen);
        Ok(signal)
    }

    /// Deletes snapshot `name` (its bdev already unregistered); durable on return. Runs on
    /// the home core.
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), PreserveError> {
        let i = self.v.find(name).ok_or_else(|| PreserveError::NotFound(format!("snapshot {name} does not exist")))?;
        home::delete(&self.v, i).await
    }

    pub fn snapshot_infos(&self) -> Vec<SnapshotInfo> {
        (0..MAX_SNAPSHOTS).filter(|&i| matches!(self.v.snaps[i].state.load(SeqCst), ST_DRAINING | ST_SEALED | ST_FAILED)).map(|i| self.v.info(i)).collect()
    }

    /// Bytes of RAM the lookup tables hold (grain tables of every index, slot records).
    pub fn table_bytes(&self) -> u64 {
        self.v.snaps.iter().map(|s| s.grains.resident_bytes()).sum::<u64>() + self.v.records.resident_bytes()
    }

    /// Store slots in use.
    pub fn used_slots(&self) -> u64 {
        self.v.stats.used_slots.load(Relaxed)
    }

    pub fn grain_bytes(&self) -> u64 {
        self.v.geo.grain_bytes
    }

    pub fn lock_stats(&self) -> crate::extent_lock::LockStats {
        self.v.locks.stats()
    }

    fn call_home<T: Send + 'static>(
        &self,
        t: &Target,
        f: impl FnOnce(Arc<VolumeShared>) -> futures::future::LocalBoxFuture<'static, T> + Send + 'static,
    ) -> Result<T, PreserveError> {
        let v = self.v.clone();
        t.reactors.call_async(self.v.home, std::time::Duration::from_secs(60), move || f(v)).map_err(|e| PreserveError::Io(e.to_string()))
    }
}

/// What a modifying I/O writes.
#[derive(Clone, Copy)]
enum Data<'a, 'b> {
    Buf(&'a [IoSlice<'b>]),
    Unmap,
    Zeroes,
}

/// A core's channel to a CoW volume.
struct CowChannel {
    v: Arc<VolumeShared>,
    base: Channel,
    store: Channel,
}

/// Copies `len` bytes at byte `from` of the scattered buffers into one buffer.
fn gather(bufs: &[IoSlice<'_>], from: usize, len: usize) -> IoBuf {
    let mut out = IoBuf::alloc(len);
    let (mut pos, mut done) = (0usize, 0usize);
    for b in bufs {
        let (bs, be) = (pos, pos + b.len());
        pos = be;
        let want = from + done;
        if done == len {
            break;
        }
        if be <= want {
            continue;
        }
        let n = (be - want).min(len - done);
        out[done..done + n].copy_from_slice(&b[want - bs..want - bs + n]);
        done += n;
    }
    debug_assert_eq!(done, len, "gather beyond the buffers");
    out
}

impl CowChannel {
    async fn modify(&self, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        if !v.gate.is_open() {
            v.gate.pass().await;
        }
        let ticket = v.tracker.enter();
        let r = self.modify_in_epoch(ticket.epoch(), off, n, data).await;
        v.tracker.exit(ticket);
        r
    }

    async fn modify_in_epoch(&self, epoch: u64, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        let (g0, g1) = (off >> v.grain_shift, (off + n - 1) >> v.grain_shift);
        let lock_start = g0 << v.grain_shift;
        let lock_end = ((g1 + 1) << v.grain_shift).min(v.num_blocks);
        let _guard = v.locks.lock(lock_start, lock_end - lock_start).await;
        let live = v.live_mask();
        if live != 0 {
            for g in g0..=g1 {
                self.preserve_grain(g, epoch, live, off, n, data).await?;
            }
        }
        match data {
            Data::Buf(bufs) => self.base.write(off, bufs).await,
            Data::Unmap => self.base.unmap(off, n).await,
            Data::Zeroes => self.base.write_zeroes(off, n).await,
        }
    }

    /// Rules 1 and 2 for grain `g` (under its lock).
    async fn preserve_grain(&self, g: u64, epoch: u64, live: u32, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        let mut copy = 0u32;
        let mut updates: [(u32, u32); MAX_SNAPSHOTS] = [(0, 0); MAX_SNAPSHOTS];
        let mut nupd = 0;
        for i in (0..MAX_SNAPSHOTS).filter(|i| live & (1 << i) != 0) {
            let s = &v.snaps[i];
            let se = s.epoch.load(SeqCst);
            let e = s.grains.at(g as usize).load(SeqCst);
            if se < epoch && e == 0 {
                copy |= 1 << i;
            } else if se >= epoch && e != 0 {
                let slot = e - 1;
                match updates[..nupd].iter_mut().find(|(s, _)| *s == slot) {
                    Some(u) => u.1 |= 1 << i,
                    None => {
                        updates[nupd] = (slot, 1 << i);
                        nupd += 1;
                    }
                }
            }
        }
        if copy != 0 {
            self.copy_grain(g, copy).await?;
        }
        for &(slot, mask) in &updates[..nupd] {
            self.update_copy(g, slot, mask, off, n, data).await?;
        }
        Ok(())
    }

    /// Rule 1: copies `L[g]` into a new slot for the snapshots of `mask`.
    async fn copy_grain(&self, g: u64, mask: u32) -> IoResult {
        let v = &self.v;
        let t0 = reactor::now_ns();
        let Some(slot) = home::alloc(v).await else {
            home::fail(v, mask).await;
            return Ok(());
        };
        let (gstart, glen) = v.grain_range(g);
        let bytes = (glen * v.block_size as u64) as usize;
        let mut buf = IoBuf::alloc(v.geo.grain_bytes as usize);
        let wlen = (bytes as u64).div_ceil(v.store_bs) * v.store_bs;
        let r = async {
            self.base.read_buf(gstart, &mut buf[..bytes]).await?;
            self.store.write_buf(v.store_offset_blocks(slot, 0), &buf[..wlen as usize]).await
        }
        .await;
        if let Err(e) = r {
            home::unused(v, slot).await;
            return Err(e);
        }
        log::trace!("{}: grain {g} copied to slot {slot} for snapshots {mask:#x}", v.name);
        for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
            v.snaps[i].grains.at(g as usize).store(slot + 1, SeqCst);
            v.snaps[i].entries.fetch_add(1, Relaxed);
        }
        if let Err(e) = home::commit(v, vec![home::Update::Set { slot, grain: g as u32, mask }]).await {
            for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
                if v.snaps[i].grains.at(g as usize).compare_exchange(slot + 1, 0, SeqCst, SeqCst).is_ok() {
                    v.snaps[i].entries.fetch_sub(1, Relaxed);
                }
            }
            return Err(e);
        }
        v.stats.grains_copied.fetch_add(1, Relaxed);
        v.stats.copy_latency.record(reactor::now_ns().saturating_sub(t0));
        Ok(())
    }

    /// Rule 2: puts an old-epoch write's part of grain `g` into slot `slot`, the copy of the
    /// snapshots of `mask`.
    async fn update_copy(&self, g: u64, slot: u32, mask: u32, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        let bs = v.block_size as u64;
        let (gstart, glen) = v.grain_range(g);
        let (ps, pe) = (off.max(gstart), (off + n).min(gstart + glen));
        let within = ((ps - gstart) * bs) as usize;
        let part = match data {
            Data::Buf(bufs) => gather(bufs, ((ps - off) * bs) as usize, ((pe - ps) * bs) as usize),
            Data::Unmap | Data::Zeroes => IoBuf::zeroed(((pe - ps) * bs) as usize),
        };
        let place = home::place_update(v, slot, mask).await;
        log::trace!("{}: old-epoch write on grain {g} updates slot {slot} of snapshots {mask:#x}: {place:?}", v.name);
        match place {
            home::Placement::InPlace => self.patch_slot(slot, within, &part).await,
            home::Placement::NoSpace => {
                home::fail(v, mask).await;
                Ok(())
            }
            home::Placement::NewSlot(new) => {
                let gbytes = v.geo.grain_bytes as usize;
                let mut buf = IoBuf::alloc(gbytes);
                let r = async {
                    self.store.read_buf(v.store_offset_blocks(slot, 0), &mut buf[..]).await?;
                    buf[within..within + part.len()].copy_from_slice(&part);
                    self.store.write_buf(v.store_offset_blocks(new, 0), &buf[..]).await
                }
                .await;
                if let Err(e) = r {
                    home::unused(v, new).await;
                    return Err(e);
                }
                for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
                    v.snaps[i].grains.at(g as usize).store(new + 1, SeqCst);
                }
                let ups = vec![home::Update::Set { slot: new, grain: g as u32, mask }, home::Update::Clear { slot, mask }];
                if let Err(e) = home::commit(v, ups).await {
                    for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
                        v.snaps[i].grains.at(g as usize).store(slot + 1, SeqCst);
                    }
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    /// Writes `part` at byte `within` of slot `slot`, through a read-modify-write when it does
    /// not fall on store blocks.
    async fn patch_slot(&self, slot: u32, within: usize, part: &[u8]) -> IoResult {
        let v = &self.v;
        let sbs = v.store_bs as usize;
        if within % sbs == 0 && part.len() % sbs == 0 {
            return self.store.write_buf(v.store_offset_blocks(slot, within as u64), part).await;
        }
        let a = within / sbs * sbs;
        let b = (within + part.len()).div_ceil(sbs) * sbs;
        let mut buf = IoBuf::alloc(b - a);
        self.store.read_buf(v.store_offset_blocks(slot, a as u64), &mut buf[..]).await?;
        buf[within - a..within - a + part.len()].copy_from_slice(part);
        self.store.write_buf(v.store_offset_blocks(slot, a as u64), &buf[..]).await
    }
}

impl IoChannel for CowChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        match io {
            Io::Read { offset_blocks, bufs, .. } => IoFuture::boxed(self.base.read(offset_blocks, bufs)),
            Io::Flush => IoFuture::boxed(self.base.flush()),
            Io::Write { offset_blocks, num_blocks, bufs } => IoFuture::boxed(self.modify(offset_blocks, num_blocks, Data::Buf(bufs))),
            Io::Unmap { offset_blocks, num_blocks } => IoFuture::boxed(self.modify(offset_blocks, num_blocks, Data::Unmap)),
            Io::WriteZeroes { offset_blocks, num_blocks } => IoFuture::boxed(self.modify(offset_blocks, num_blocks, Data::Zeroes)),
        }
    }
}

impl Bdev for CowVolume {
    fn name(&self) -> &str {
        &self.v.name
    }
    fn product_name(&self) -> &str {
        "CoW volume"
    }
    fn block_size(&self) -> u32 {
        self.v.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.v.num_blocks
    }
    fn uuid(&self) -> Uuid {
        self.v.uuid
    }
    fn supports(&self, io: IoType) -> bool {
        match io {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap | IoType::WriteZeroes => self.v.base.bdev().supports(io),
        }
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(CowChannel { v: self.v.clone(), base: Channel::get(&self.v.base)?, store: Channel::get(&self.v.store)? }))
    }
    fn driver_specific(&self) -> Value {
        let v = &self.v;
        json!({ "cow": {
            "base_bdev": v.base.name(),
            "store_bdev": v.store.name(),
            "grain_kb": v.geo.grain_bytes >> 10,
            "epoch": v.tracker.current(),
            "store_slots": v.geo.slot_count,
            "store_slots_used": v.stats.used_slots.load(Relaxed),
            "snapshots": self.snapshot_infos().into_iter().map(|s| s.name).collect::<Vec<_>>(),
        }})
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        let v = &self.v;
        Some((
            "bdev_cow_create",
            json!({ "name": v.name, "base_bdev": v.base.name(), "store_bdev": v.store.name(), "grain_kb": v.geo.grain_bytes >> 10, "uuid": v.uuid.to_string() }),
        ))
    }
    fn destroy(&self) {
        self.v.closed.store(true, SeqCst);
        self.v.committer.wake();
        self.v.claims.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Preservable for CowVolume {
    fn method(&self) -> &'static str {
        "cow"
    }

    fn preserve(&self, t: &Target, req: &PreserveRequest) -> Result<Arc<SealSignal>, PreserveError> {
        if req.snapshot_name.len() > layout::MAX_NAME {
            return Err(PreserveError::Invalid(format!("snapshot name is longer than {} bytes", layout::MAX_NAME)));
        }
        // Registering first reserves the name; the bdev answers reads once attached.
        let sb = Arc::new(SnapshotBdev::new(self, &req.snapshot_name));
        t.bdevs.register(sb.clone())?;
        let freeze = req.freeze;
        let sb2 = sb.clone();
        let vol = CowVolume { v: self.v.clone() };
        let r = self.call_home(t, move |_| Box::pin(async move { vol.take_snapshot(&sb2, freeze).await }));
        match r {
            Ok(Ok(signal)) => Ok(signal),
            Ok(Err(e)) | Err(e) => {
                if let Err(de) = t.delete_bdev(&req.snapshot_name) {
                    log::error!("{}: could not drop the bdev of failed snapshot {}: {de}", self.v.name, req.snapshot_name);
                }
                Err(e)
            }
        }
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshot_infos()
    }

    fn seal_signal(&self, name: &str) -> Option<Arc<SealSignal>> {
        self.v.find(name).map(|i| self.v.snaps[i].meta().signal.clone())
    }

    fn delete_snapshot(&self, t: &Target, name: &str) -> Result<(), PreserveError> {
        let name = name.to_string();
        let vol = CowVolume { v: self.v.clone() };
        self.call_home(t, move |_| Box::pin(async move { vol.remove_snapshot(&name).await }))?
    }

    fn changed_ranges(&self, older: &str, newer: &str) -> Result<Vec<(u64, u64)>, PreserveError> {
        let v = &self.v;
        let sealed = |n: &str| {
            let i = v.find(n).ok_or_else(|| PreserveError::NotFound(format!("volume {} has no snapshot {n}", v.name)))?;
            if v.snaps[i].state.load(SeqCst) != ST_SEALED {
                return Err(PreserveError::Busy(format!("snapshot {n} is not sealed")));
            }
            Ok(i)
        };
        let (a, b) = (sealed(older)?, sealed(newer)?);
        if v.snaps[a].epoch.load(SeqCst) >= v.snaps[b].epoch.load(SeqCst) {
            return Err(PreserveError::Invalid(format!("snapshot {older} is not older than {newer}")));
        }
        // A grain changed between the two points in time iff a write stamped between them
        // executed on it. Such a write gave the older snapshot an entry, in a slot the newer
        // one does not share (it copied before the newer existed, or split the shared slot by
        // rule 2); writes after the newer point copy once for both (same slot), and grains
        // never written since the older point have no entry in it.
        let gbytes = v.grain_blocks() * v.block_size as u64;
        let size = v.num_blocks * v.block_size as u64;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in 0..v.num_grains {
            let ea = v.snaps[a].grains.at(g as usize).load(SeqCst);
            let eb = v.snaps[b].grains.at(g as usize).load(SeqCst);
            if ea == 0 || ea == eb {
                continue;
            }
            let off = g * gbytes;
            let len = gbytes.min(size - off);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
        Ok(out)
    }

    fn stats(&self) -> PreserveStats {
        let v = &self.v;
        let mut s = PreserveStats {
            grains_copied: v.stats.grains_copied.load(Relaxed),
            store_bytes_used: v.stats.used_slots.load(Relaxed) * v.geo.grain_bytes,
            store_bytes_total: v.geo.slot_count as u64 * v.geo.grain_bytes,
            table_bytes: self.table_bytes(),
            locks: v.locks.stats(),
            ..Default::default()
        };
        v.stats.copy_latency.accumulate(&mut s.copy_latency.0, &mut s.copy_latency.1);
        v.stats.seal_latency.accumulate(&mut s.seal_latency.0, &mut s.seal_latency.1);
        for info in self.snapshot_infos() {
            let i = match info.state {
                SnapshotState::Draining => 0,
                SnapshotState::Sealed => 1,
                SnapshotState::Failed => 2,
            };
            s.snapshots[i] += 1;
        }
        s
    }
}

/// A snapshot of a CoW volume as a read-only bdev. Its volume recreates it on restart, so it
/// has no `config_call`; deleting the bdev does not delete the snapshot (`bdev_snapshot_delete`
/// does).
pub struct SnapshotBdev {
    name: String,
    uuid: Uuid,
    v: Arc<VolumeShared>,
    /// (index, generation) once the preserve happened; shared with the channels.
    attached: Arc<OnceLock<(usize, u64)>>,
}

impl SnapshotBdev {
    /// A snapshot bdev not yet attached to a preserve (reads fail until it is).
    pub fn new(vol: &CowVolume, name: &str) -> SnapshotBdev {
        SnapshotBdev { name: name.to_string(), uuid: Uuid::new_v4(), v: vol.v.clone(), attached: Arc::new(OnceLock::new()) }
    }

    fn attached(v: &Arc<VolumeShared>, i: usize, gen: u64) -> SnapshotBdev {
        let m = v.snaps[i].meta();
        let b = SnapshotBdev { name: m.name.clone(), uuid: m.uuid, v: v.clone(), attached: Arc::new(OnceLock::new()) };
        let _ = b.attached.set((i, gen));
        b
    }

    fn attach(&self, i: usize, gen: u64) {
        let fresh = self.attached.set((i, gen)).is_ok();
        debug_assert!(fresh, "a snapshot bdev is attached once");
    }

    /// The state of the snapshot behind this bdev.
    pub fn state(&self) -> Option<SnapshotState> {
        let &(i, gen) = self.attached.get()?;
        let s = &self.v.snaps[i];
        if s.generation.load(SeqCst) != gen {
            return None;
        }
        Some(match s.state.load(SeqCst) {
            ST_SEALED => SnapshotState::Sealed,
            ST_FAILED => SnapshotState::Failed,
            _ => SnapshotState::Draining,
        })
    }
}

struct SnapChannel {
    v: Arc<VolumeShared>,
    bdev_attached: Arc<OnceLock<(usize, u64)>>,
    base: Channel,
    store: Channel,
}

impl SnapChannel {
    fn check(&self) -> Result<(usize, u64), BdevError> {
        let &(i, gen) = self.bdev_attached.get().ok_or(BdevError::Offline)?;
        let s = &self.v.snaps[i];
        if s.generation.load(SeqCst) != gen {
            return Err(BdevError::Offline);
        }
        match s.state.load(SeqCst) {
            ST_DRAINING | ST_SEALED => Ok((i, gen)),
            ST_FAILED => Err(BdevError::Media),
            _ => Err(BdevError::Offline),
        }
    }

    async fn read(&self, off: u64, n: u64, bufs: &mut [IoSliceMut<'_>]) -> IoResult {
        let (i, gen) = self.check()?;
        let v = &self.v;
        let (g0, g1) = (off >> v.grain_shift, (off + n - 1) >> v.grain_shift);
        if g0 == g1 {
            self.read_piece(i, g0, off, bufs).await?;
        } else {
            let bs = v.block_size as u64;
            let total = (n * bs) as usize;
            let mut bounce = IoBuf::alloc(total);
            for g in g0..=g1 {
                let (gs, glen) = v.grain_range(g);
                let (ps, pe) = (off.max(gs), (off + n).min(gs + glen));
                let a = ((ps - off) * bs) as usize;
                let b = ((pe - off) * bs) as usize;
                self.read_piece(i, g, ps, &mut [IoSliceMut::new(&mut bounce[a..b])]).await?;
            }
            let mut pos = 0;
            for b in bufs.iter_mut() {
                let l = b.len();
                b.copy_from_slice(&bounce[pos..pos + l]);
                pos += l;
            }
        }
        // A snapshot deleted while we read returns no data from a reused slot.
        if v.snaps[i].generation.load(SeqCst) != gen {
            return Err(BdevError::Offline);
        }
        Ok(())
    }

    /// Reads blocks of grain `g` of snapshot `i` starting at `off`.
    async fn read_piece(&self, i: usize, g: u64, off: u64, bufs: &mut [IoSliceMut<'_>]) -> IoResult {
        let v = &self.v;
        let entry = &v.snaps[i].grains.at(g as usize);
        let e = entry.load(SeqCst);
        if e == 0 {
            self.base.read(off, bufs).await?;
            // A copy published meanwhile means a new-epoch write may have changed the live
            // grain under our read: read the copy instead (it is written before it is
            // published, and the live write waits for the publication).
            let e2 = entry.load(SeqCst);
            if e2 == 0 {
                return Ok(());
            }
            return self.read_slot(e2 - 1, g, off, bufs).await;
        }
        self.read_slot(e - 1, g, off, bufs).await
    }

    async fn read_slot(&self, slot: u32, g: u64, off: u64, bufs: &mut [IoSliceMut<'_>]) -> IoResult {
        let v = &self.v;
        let within = (off - (g << v.grain_shift)) * v.block_size as u64;
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let sbs = v.store_bs;
        if within % sbs == 0 && len % sbs == 0 {
            return self.store.read(v.store_offset_blocks(slot, within), bufs).await;
        }
        let a = within / sbs * sbs;
        let b = (within + len).div_ceil(sbs) * sbs;
        let mut buf = IoBuf::alloc((b - a) as usize);
        self.store.read_buf(v.store_offset_blocks(slot, a), &mut buf[..]).await?;
        let mut pos = (within - a) as usize;
        for d in bufs.iter_mut() {
            let l = d.len();
            d.copy_from_slice(&buf[pos..pos + l]);
            pos += l;
        }
        Ok(())
    }
}

impl IoChannel for SnapChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        match io {
            Io::Read { offset_blocks, num_blocks, bufs } => IoFuture::boxed(self.read(offset_blocks, num_blocks, bufs)),
            Io::Flush => IoFuture::ready(Ok(())),
            _ => IoFuture::ready(Err(BdevError::ReadOnly)),
        }
    }
}

impl Bdev for SnapshotBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "CoW snapshot"
    }
    fn block_size(&self) -> u32 {
        self.v.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.v.num_blocks
    }
    fn uuid(&self) -> Uuid {
        self.uuid
    }
    fn supports(&self, _io: IoType) -> bool {
        // Every type is "supported" so that modifications fail as write-protected (the
        // channel refuses them with ReadOnly), not as unknown commands.
        true
    }
    fn read_only(&self) -> bool {
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(SnapChannel {
            v: self.v.clone(),
            bdev_attached: self.attached.clone(),
            base: Channel::get(&self.v.base)?,
            store: Channel::get(&self.v.store)?,
        }))
    }
    fn driver_specific(&self) -> Value {
        let st = self.state().map(|s| s.name()).unwrap_or("detached");
        json!({ "cow_snapshot": { "origin": self.v.name, "state": st } })
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        None
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BdevRegistry;
    use crate::bdevs::malloc::MallocBdev;
    use crate::reactor::ManualCores;

    /// A volume of 16 grains of 4 KiB over RAM, with a store of `slots` slots.
    fn volume(cores: &ManualCores, reg: &BdevRegistry, slots: u64) -> Arc<BdevEntry> {
        let base = reg.register(Arc::new(MallocBdev::new("b", 128, 512, None).unwrap())).unwrap();
        let store_blocks = (layout::RECORDS_OFFSET + 4096 + 4096 + slots * 4096) / 512;
        let store = reg.register(Arc::new(MallocBdev::new("s", store_blocks, 512, None).unwrap())).unwrap();
        let p = OpenParams {
            name: "v".into(),
            uuid: None,
            base: base.claim("v").unwrap(),
            store: store.claim("v").unwrap(),
            grain_kb: Some(4),
            cores: 1,
            lock_region_grains: None,
        };
        let (vol, snaps) = cores.block_on(0, async move { CowVolume::open(p).await.unwrap() });
        assert!(snaps.is_empty());
        reg.register(Arc::new(vol)).unwrap()
    }

    fn cow(e: &BdevEntry) -> &CowVolume {
        e.bdev().as_any().downcast_ref::<CowVolume>().unwrap()
    }

    async fn write(e: Arc<BdevEntry>, grain: u64, byte: u8) {
        let ch = Channel::get(&e).unwrap();
        ch.write_buf(grain * 8, &vec![byte; 512]).await.unwrap();
    }

    async fn snap(e: Arc<BdevEntry>, name: &'static str) -> Arc<SnapshotBdev> {
        let sb = Arc::new(SnapshotBdev::new(cow(&e), name));
        let sig = cow(&e).take_snapshot(&sb, false).await.unwrap();
        while sig.get() != SnapshotState::Sealed {
            reactor::sleep(std::time::Duration::from_micros(10)).await;
        }
        sb
    }

    #[test]
    fn changed_ranges_come_from_the_tables() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let e = volume(&cores, &reg, 64);
        let e2 = e.clone();
        cores.block_on(0, async move {
            write(e2.clone(), 0, 1).await;
            snap(e2.clone(), "s1").await;
            write(e2.clone(), 2, 2).await;
            write(e2.clone(), 3, 2).await;
            snap(e2.clone(), "s2").await;
            write(e2.clone(), 5, 3).await;
            write(e2.clone(), 2, 3).await;
            snap(e2.clone(), "s3").await;
        });
        let g = 4096u64;
        assert_eq!(cow(&e).changed_ranges("s1", "s2").unwrap(), vec![(2 * g, 2 * g)]);
        assert_eq!(cow(&e).changed_ranges("s2", "s3").unwrap(), vec![(2 * g, g), (5 * g, g)]);
        assert_eq!(cow(&e).changed_ranges("s1", "s3").unwrap(), vec![(2 * g, 2 * g), (5 * g, g)]);
        assert!(cow(&e).changed_ranges("s3", "s1").is_err());
        assert!(cow(&e).changed_ranges("s1", "nope").is_err());
    }

    #[test]
    fn a_full_store_fails_the_snapshot_not_the_host_write() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let e = volume(&cores, &reg, 3);
        let e2 = e.clone();
        let sb = cores.block_on(0, async move {
            let sb = snap(e2.clone(), "s1").await;
            for g in 0..6 {
                write(e2.clone(), g, 9).await;
            }
            sb
        });
        assert_eq!(sb.state(), Some(SnapshotState::Failed));
        assert_eq!(cow(&e).stats().snapshots, [0, 0, 1]);
        // The live volume took every write.
        let e3 = e.clone();
        let data = cores.block_on(0, async move {
            let ch = Channel::get(&e3).unwrap();
            let mut b = vec![0u8; 6 * 4096];
            ch.read_buf(0, &mut b).await.unwrap();
            b
        });
        for g in 0..6 {
            assert_eq!(data[g * 4096], 9);
        }
        // The failed snapshot reads as a media error and can be deleted, freeing its slots.
        let e4 = e.clone();
        cores.block_on(0, async move { cow(&e4).remove_snapshot("s1").await.unwrap() });
        assert_eq!(cow(&e).used_slots(), 0);
        assert!(cow(&e).snapshot_infos().is_empty());
    }
}
