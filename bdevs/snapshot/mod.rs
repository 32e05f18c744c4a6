//! `snapshot`: the copy-on-write volume (DESIGN §1, method 1) and its snapshots as read-only
//! bdevs.
//!
//! A CoW volume is a preservable bdev over a *base* bdev (the live image `L`) with a CoW
//! *store* on another bdev (copied grains, their lookup tables, the snapshot list; format in
//! `layout.rs`). It keeps up to 32 snapshots.
//!
//! # The exact rules
//!
//! Notation: the volume is cut in *grains* (`grain_kb`, power of two), each grain in up to 16
//! *pieces* (a sixteenth of a grain, at least a block and a store block: 4 KiB for 64 KiB
//! grains). Snapshot `s` has an epoch `s.e`: it holds every write stamped with an epoch
//! `<= s.e`. A write `w` is stamped `w.e` when it is submitted; `w` *belongs to* `s` iff
//! `w.e <= s.e`. `entry(s, g)` is the lookup-table entry of `s` for grain `g` (a store slot) or
//! none. A slot has room for a whole grain and holds some of its pieces, each at its own place,
//! named by the slot's *piece bitmap*; it may be shared by several snapshots' entries for the
//! same grain, which then all read the same pieces from it. Its record on media is
//! `(grain, mask of snapshots, piece bitmap)`.
//!
//! Invariant I(s, g), for every live snapshot `s` and grain `g`, at every moment outside the
//! grain's extent lock: for each piece `p` of `g`, if `entry(s, g)` exists and its slot holds
//! `p`, the slot's copy of `p` is `s`'s image of `p` restricted to the writes executed so far
//! (in the order the grain lock gave them); otherwise `L[p]` is that image. Reads of `s` follow
//! the same split: pieces the slot holds from the slot, the others from `L`.
//!
//! Every modifying I/O (write, unmap, write-zeroes) `w`, after its stamp, when some snapshot
//! is live (else see "Lockless writes" below), locks the grains it
//! touches (one extent lock, grain aligned; this orders old-epoch writes, copies and new-epoch
//! writes on the same grain) and then, for each grain `g`, with `P` the pieces of `g` it
//! touches, and for each slot `X` in use for `g` (`X` holds pieces `H`; `old(X)` are the live
//! snapshots it serves with `s.e < w.e`, `new(X)` those with `s.e >= w.e`):
//!
//! 1. **Split (old-epoch write on a shared slot)**. If both `old(X)` and `new(X)` are
//!    non-empty, the images are about to differ: a new slot `Y` gets `X`'s pieces `H` with
//!    `w`'s data applied, and the entries of `new(X)` move to `Y` (record of `Y` durable, then
//!    `X`'s record without them durable: while only the first is, both claim those snapshots
//!    and recovery keeps either, each a valid image of a snapshot that was draining).
//! 2. **Update (old-epoch write)**. Otherwise, if only `new(X)` is non-empty and `P ∩ H` is
//!    not empty, `w`'s part is written into `X` in place (a write still in flight from before
//!    a preserve, overtaken on this grain by a new-epoch write that copied; bytes of pieces
//!    outside `H` are read by nobody, so the whole part may go in).
//! 3. **Extend (new-epoch write, entry present)**. If `old(X)` is non-empty and `P \ H` is
//!    not empty: copy `L`'s pieces `P \ H` into `X` at their places, add them to `X`'s
//!    bitmap, make the record durable. Every snapshot `X` serves now needs them (after a
//!    split, `X` serves only `old(X)`), and its image of them is `L`.
//!
//! And for the snapshots without an entry:
//!
//! 4. **Copy (new-epoch write, no entry)**. `A = { s live : s.e < w.e and no entry(s, g) }`.
//!    If `A` is not empty: allocate one slot, copy `L`'s pieces `P` into it, make the record
//!    `(g, mask(A), P)` durable, and set `entry(s, g)` for every `s` in `A`. One copy serves
//!    every snapshot that needs it.
//! 5. Then `w` is applied to `L`, and the lock is released.
//!
//! Data is in a slot before its bitmap or an entry names it; a record is durable before `w`
//! reaches `L`. The slot's data and its record go to the store together and one flush makes
//! both durable (concurrent copies share it: group commit): the record carries a check of the
//! pieces it adds (`layout`), so a crash that kept the record but not all the data is found
//! when the store is opened, and those pieces are dropped, which is right because `w` had not
//! been submitted to `L`: `L` still holds their image. (Before, the data was flushed before
//! the record was written: two flushes per copy, and first writes after a preserve ran at a
//! quarter of the plain rate.) An old-epoch write that patches a slot in place (rule 2) first
//! waits until the slot's record on media carries no check: the bytes it covered change. The lock makes 1–5
//! atomic per grain, so I(s, g) holds for every `s` and piece: snapshots with `s.e < w.e` get
//! `L` as it was before `w` for every piece `w` touches, unless their slot already held it;
//! snapshots `w` belongs to get `w` in their slot for the pieces it holds, and read `L`, which
//! gets `w`, for the others; older snapshots' pieces already copied are untouched.
//!
//! Copying pieces, not grains, is what keeps a first write cheap: a 4 KiB host write after a
//! preserve copies 4 KiB, not 64 KiB (preserve_bench on ext4: p99.9 in the windows after a
//! preserve went from 2.2-4x the normal windows to 1.04-1.55x). The bitmap costs 2 bytes per
//! slot in RAM.
//!
//! Where this departs from DESIGN §1: DESIGN says an old-epoch write "removes the entry, so the
//! preserved image reads the new data from the live image". That is only right when the write
//! covers the *whole* grain (otherwise the image would read the rest of the grain from `L`,
//! which holds new-epoch data), only when no older snapshot shares the slot, and only if the
//! removal becomes durable *after* the live write is durable (else a crash in between lets the
//! image read the new-epoch data in `L`). Writing the old-epoch data into the copy (rules 1-2)
//! is correct in every case, costs one store write in a rare case, and keeps the entry, so a
//! later new-epoch write never needs to copy those pieces again. DESIGN also says a grain is
//! copied whole; we copy the pieces a write touches.
//!
//! # Lockless writes
//!
//! A write that finds no snapshot live (read after its stamp) goes straight to `L`: nothing
//! to preserve, no grain lock, no message (a volume nobody preserves costs its base one epoch
//! stamp per write). Such a write can still be in flight when a preserve makes a snapshot `s`
//! live; it belongs to `s` (it read `live` before `s`'s bit was set, so it was stamped at most
//! `s.e`), and rules 1-4 assume every write to a grain holds its lock. So the preserve that
//! makes the first index live records its epoch (`lockless_upto`), and a write stamped later
//! waits, before it takes a grain lock, until that epoch has drained: no copy it makes can
//! miss a lockless write of the image. Old-epoch writes with the lock go on as before (none
//! of them can find a copy of `s` while lockless writes of that epoch are in flight: copies
//! come only from the writes that wait). The wait is one in-flight I/O's latency, once per
//! first preserve; a preserve taken while another snapshot is live does not set it (no
//! lockless write has been possible since the last one drained).
//!
//! Consequences: a slot's pieces only grow while it is in use, and the pieces it held never
//! change once no snapshot it serves is draining (rules 1-2 apply only while `s` drains), so a
//! sealed snapshot never changes. Two snapshots, once their entries for a grain differ, never
//! share a slot for it again (entries move only into new slots), which is what
//! `changed_ranges` (incremental backups) relies on.
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
//! all if its creation had not reached the header yet. The preserve replies only once it has:
//! the header naming the new index goes to the header committer, and the reply waits for that
//! write. Records carrying the index may be durable earlier (they go through the record
//! committer, which never waits for a header); a crash before the header drops their bits,
//! since recovery keeps only the indices its header lists. So an acknowledged snapshot always
//! comes back, and host writes never wait for that header (they wait only for the records of
//! their own copies, as always). A deleted snapshot's index is first marked `deleting`
//! (durable; from then on its bits are ignored, and its slots can be reused at once), then its
//! bits are cleared from the records, and only then is the index marked free.
//!
//! # Out of space
//!
//! A copy that finds no free slot (the store is full) or whose store write fails with ENOSPC
//! or EDQUOT (the file system under a file-backed store is full) fails the snapshots that
//! needed it, never the host write: they are marked `failed` (logged at ERROR, counted in the
//! metrics), that state is made durable, and only then does the host write go on to `L`
//! without the copy. Durable first, because a crash in between would otherwise bring the
//! snapshots back as sealed images that read the new data. Other store errors fail the host
//! write, as before.
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

use crate::bdev::{Bdev, BdevEntry, BdevError, BdevProps, Channel, HoldGuard, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType, LatencyHistogram};
use crate::extent_lock::LockSpace;
use crate::preserve::{EpochTracker, FreezeGate, Preservable, PreserveError, PreserveRequest, PreserveStats, SealSignal, SnapshotInfo, SnapshotState};
use crate::reactor;
use layout::{Check, DiskState, Geometry, MAX_PIECES, MAX_SNAPSHOTS};
use serde_json::{json, Value};
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
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
/// `lockless_upto` before any preserve was taken with nothing live since the volume opened
/// (no write's stamp is above it, so no write waits).
const NO_LOCKLESS_EPOCH: u64 = u64::MAX;

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
    copied_bytes: AtomicU64,
    copy_latency: LatencyHistogram,
    seal_latency: LatencyHistogram,
    used_slots: AtomicU64,
    /// Snapshots that failed (store or its file system full, metadata unwritable).
    snapshots_failed: AtomicU64,
}

/// Everything a CoW volume's cores share.
pub(crate) struct VolumeShared {
    id: u64,
    /// The volume bdev's props (name, UUID; sizes as `block_size` and `num_blocks` below).
    props: BdevProps,
    base: Arc<BdevEntry>,
    store: Arc<BdevEntry>,
    claims: Mutex<Vec<HoldGuard>>,
    block_size: u32,
    num_blocks: u64,
    grain_shift: u32,
    /// log2 of the blocks per piece (the unit a grain is copied in).
    piece_shift: u32,
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
    /// The epoch of the last preserve taken while no snapshot was live, or
    /// [`NO_LOCKLESS_EPOCH`]: writes stamped later wait for it to drain before they take a
    /// grain lock (module doc, "Lockless writes").
    lockless_upto: AtomicU64,
    /// Slot records as the home core last set them (home core writes; stats read).
    records: ZeroMap<AtomicU64>,
    /// Per slot: the pieces of its grain it holds, the same for every snapshot it serves. Set
    /// by the writer holding the grain's lock once the pieces' data is in the slot (readers on
    /// any core look here), cleared by the home core when the slot is freed.
    pieces: ZeroMap<AtomicU16>,
    closed: AtomicBool,
    /// Wakes the record committer (home.rs).
    committer: futures::task::AtomicWaker,
    /// Wakes the header committer (home.rs).
    header_committer: futures::task::AtomicWaker,
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

    /// The pieces of grain `g` that blocks `off..off + n` touch (the range meets the grain).
    fn piece_mask(&self, g: u64, off: u64, n: u64) -> u16 {
        let (gs, glen) = self.grain_range(g);
        let (a, b) = (off.max(gs), (off + n).min(gs + glen));
        debug_assert!(a < b, "blocks {off}+{n} miss grain {g}");
        let p0 = (a - gs) >> self.piece_shift;
        let p1 = (b - gs - 1) >> self.piece_shift;
        ((1u32 << (p1 + 1)) - (1u32 << p0)) as u16
    }

    /// Blocks of pieces `p0..p1` of grain `g`: (first block, count), cut at the grain's end.
    fn piece_span(&self, g: u64, p0: u32, p1: u32) -> (u64, u64) {
        let (gs, glen) = self.grain_range(g);
        let a = (p0 as u64) << self.piece_shift;
        let b = ((p1 as u64) << self.piece_shift).min(glen);
        debug_assert!(a < b, "pieces {p0}..{p1} beyond grain {g}");
        (gs + a, b - a)
    }

    /// The bytes of the pieces of `pieces` in grain `g`, as (offset in the grain, length) per
    /// run, in ascending order: what a record's check covers (`layout::Check`).
    fn piece_bytes(&self, g: u64, pieces: u16) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (gs, glen) = self.grain_range(g);
        let bs = self.block_size as u64;
        runs(pieces & self.piece_mask(g, gs, glen)).map(move |(p0, p1)| {
            let (start, nb) = self.piece_span(g, p0, p1);
            (((start - gs) * bs) as usize, (nb * bs) as usize)
        })
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
            origin: self.props.name().to_string(),
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
        let (i, gen, signal) = home::preserve(&self.v, bdev.name(), bdev.uuid(), freeze).await?;
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

    /// Bytes of RAM the lookup tables hold (grain tables of every index, slot records and
    /// piece bitmaps).
    pub fn table_bytes(&self) -> u64 {
        self.v.snaps.iter().map(|s| s.grains.resident_bytes()).sum::<u64>() + self.v.records.resident_bytes() + self.v.pieces.resident_bytes()
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
        t: &crate::bdev::BdevCtx,
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

/// The runs of set bits of a piece bitmap, as `(first, end)` piece numbers.
fn runs(mut m: u16) -> impl Iterator<Item = (u32, u32)> {
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let p0 = m.trailing_zeros();
        let len = (m >> p0).trailing_ones();
        m &= !((((1u32 << len) - 1) << p0) as u16);
        Some((p0, p0 + len))
    })
}

/// Whether a store error means its file system (or the file's quota) has no room left.
fn is_no_space(e: &BdevError) -> bool {
    matches!(e, BdevError::Os(libc::ENOSPC) | BdevError::Os(libc::EDQUOT))
}

/// Copies `src` into the scattered buffers, in order (the counterpart of [`gather`]).
fn scatter(src: &[u8], bufs: &mut [IoSliceMut<'_>]) {
    let mut pos = 0;
    for b in bufs.iter_mut() {
        let l = b.len();
        b.copy_from_slice(&src[pos..pos + l]);
        pos += l;
    }
    debug_assert_eq!(pos, src.len(), "scatter of a source the buffers do not match");
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
        // Read after the stamp: a preserve makes its index live before it bumps the epoch, so
        // a write that finds nothing live belongs to every snapshot to come ("Lockless
        // writes"). The preserving path is boxed: its future is large (rules 1-4) and would
        // make every write's future as large, copied and allocated per I/O.
        let r = if v.live_mask() == 0 { self.apply(off, n, data).await } else { Box::pin(self.modify_in_epoch(ticket.epoch(), off, n, data)).await };
        v.tracker.exit(ticket);
        r
    }

    async fn modify_in_epoch(&self, epoch: u64, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        let upto = v.lockless_upto.load(SeqCst);
        if epoch > upto && !v.tracker.is_sealed(upto) {
            // Writes of `upto` or older may be in flight without the grain lock; a copy made
            // now could miss one that belongs to the image. Waited for before the lock: a
            // write of that epoch may be queued for the lock this write would hold.
            v.tracker.drained(upto).await;
        }
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
        self.apply(off, n, data).await
    }

    /// Rule 5: the write reaches the live image.
    async fn apply(&self, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        match data {
            Data::Buf(bufs) => self.base.write(off, bufs).await,
            Data::Unmap => self.base.unmap(off, n).await,
            Data::Zeroes => self.base.write_zeroes(off, n).await,
        }
    }

    /// Rules 1-4 for grain `g` (under its lock).
    async fn preserve_grain(&self, g: u64, epoch: u64, live: u32, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        let touched = v.piece_mask(g, off, n);
        // Snapshots the write is new for that have no entry yet, and per slot in use: the
        // snapshots it serves that the write is new for, and those it belongs to.
        let mut fresh = 0u32;
        let mut slots: [(u32, u32, u32); MAX_SNAPSHOTS] = [(0, 0, 0); MAX_SNAPSHOTS];
        let mut nslots = 0;
        for i in (0..MAX_SNAPSHOTS).filter(|i| live & (1 << i) != 0) {
            let s = &v.snaps[i];
            let se = s.epoch.load(SeqCst);
            let e = s.grains.at(g as usize).load(SeqCst);
            if e == 0 {
                if se < epoch {
                    fresh |= 1 << i;
                }
                continue;
            }
            let (older, newer) = if se < epoch { (1 << i, 0) } else { (0, 1 << i) };
            match slots[..nslots].iter_mut().find(|x| x.0 == e - 1) {
                Some(x) => {
                    x.1 |= older;
                    x.2 |= newer;
                }
                None => {
                    slots[nslots] = (e - 1, older, newer);
                    nslots += 1;
                }
            }
        }
        for &(slot, older, newer) in &slots[..nslots] {
            let held = v.pieces.at(slot as usize).load(SeqCst);
            if older != 0 && newer != 0 {
                // The slot's images are about to differ: one keeps the old live data of the
                // touched pieces, the other gets this write. Those it belongs to move out.
                self.move_out(g, slot, newer, off, n, data).await?;
            } else if newer != 0 && touched & held != 0 {
                self.patch_copy(g, slot, newer, off, n, data).await?;
            }
            let need = touched & !held;
            if older != 0 && need != 0 {
                self.extend_copy(g, slot, older, need).await?;
            }
        }
        if fresh != 0 {
            self.copy_grain(g, fresh, touched).await?;
        }
        Ok(())
    }

    /// A free slot for the snapshots of `mask`, or None once they are durably marked failed
    /// (the store is full: the snapshots fail, the host write goes on).
    async fn alloc_or_fail(&self, mask: u32) -> Result<Option<u32>, BdevError> {
        let slot = home::alloc(&self.v).await;
        if slot.is_none() {
            home::fail(&self.v, mask, format!("the CoW store {} is full (all {} slots in use)", self.v.store.name(), self.v.geo.slot_count)).await?;
        }
        Ok(slot)
    }

    /// What a failed write into the store means for the host write that needed it: out of
    /// space (the store's file system is full) fails the snapshots of `mask`, durably, and
    /// the host write goes on (Ok); any other error fails the host write.
    async fn store_failed(&self, mask: u32, e: BdevError) -> IoResult {
        if !is_no_space(&e) {
            return Err(e);
        }
        home::fail(&self.v, mask, format!("no space for a copy in the CoW store {}: its file system is full ({e})", self.v.store.name())).await
    }

    /// Copies pieces `pieces` of `L[g]` into slot `slot`, each at its place in the slot, and
    /// returns the check of what it wrote (for the record that names it).
    async fn copy_pieces(&self, g: u64, slot: u32, pieces: u16) -> Result<Check, BdevError> {
        let v = &self.v;
        let bs = v.block_size as u64;
        let gstart = g << v.grain_shift;
        let mut crc = 0u32;
        for (p0, p1) in runs(pieces) {
            let (start, nb) = v.piece_span(g, p0, p1);
            let bytes = (nb * bs) as usize;
            // The last grain may end inside a store block: the slot has room for the rest.
            let wlen = (bytes as u64).div_ceil(v.store_bs) * v.store_bs;
            let mut buf = IoBuf::alloc(wlen as usize);
            self.base.read_buf(start, &mut buf[..bytes]).await?;
            crc = crc32c::crc32c_append(crc, &buf[..bytes]);
            self.store.write_buf(v.store_offset_blocks(slot, (start - gstart) * bs), &buf[..wlen as usize]).await?;
            v.stats.copied_bytes.fetch_add(bytes as u64, Relaxed);
        }
        Ok(Check { added: pieces, crc })
    }

    /// Rule 4, no entry yet: copies the touched pieces of `L[g]` into a new slot for the
    /// snapshots of `mask`.
    async fn copy_grain(&self, g: u64, mask: u32, pieces: u16) -> IoResult {
        let v = &self.v;
        let t0 = reactor::now_ns();
        let Some(slot) = self.alloc_or_fail(mask).await? else {
            return Ok(());
        };
        let check = match self.copy_pieces(g, slot, pieces).await {
            Ok(c) => c,
            Err(e) => {
                home::unused(v, slot).await;
                return self.store_failed(mask, e).await;
            }
        };
        log::trace!("{}: grain {g} pieces {pieces:#x} copied to slot {slot} for snapshots {mask:#x}", v.props.name());
        v.pieces.at(slot as usize).store(pieces, SeqCst);
        for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
            v.snaps[i].grains.at(g as usize).store(slot + 1, SeqCst);
            v.snaps[i].entries.fetch_add(1, Relaxed);
        }
        if let Err(e) = home::commit(v, vec![home::Update::Set { slot, grain: g as u32, mask, check }]).await {
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

    /// Rule 3, entry present: the slot serves only snapshots the write is new for (all with
    /// the same image of the pieces it lacks, `L`'s): copies those pieces into it.
    async fn extend_copy(&self, g: u64, slot: u32, mask: u32, need: u16) -> IoResult {
        let v = &self.v;
        let t0 = reactor::now_ns();
        let check = match self.copy_pieces(g, slot, need).await {
            Ok(c) => c,
            // The pieces are not in the bitmap yet: the slot is as it was.
            Err(e) => return self.store_failed(mask, e).await,
        };
        let held = v.pieces.at(slot as usize).fetch_or(need, SeqCst);
        log::trace!("{}: grain {g} pieces {need:#x} added to slot {slot} (had {held:#x}) for snapshots {mask:#x}", v.props.name());
        if let Err(e) = home::commit(v, vec![home::Update::Pieces { slot, check }]).await {
            v.pieces.at(slot as usize).store(held, SeqCst);
            return Err(e);
        }
        v.stats.copy_latency.record(reactor::now_ns().saturating_sub(t0));
        Ok(())
    }

    /// The part of an old-epoch write that falls in grain `g`: (byte offset in the grain, data).
    fn part_of(&self, g: u64, off: u64, n: u64, data: Data<'_, '_>) -> (usize, IoBuf) {
        let v = &self.v;
        let bs = v.block_size as u64;
        let (gstart, glen) = v.grain_range(g);
        let (ps, pe) = (off.max(gstart), (off + n).min(gstart + glen));
        let within = ((ps - gstart) * bs) as usize;
        let part = match data {
            Data::Buf(bufs) => gather(bufs, ((ps - off) * bs) as usize, ((pe - ps) * bs) as usize),
            Data::Unmap | Data::Zeroes => IoBuf::zeroed(((pe - ps) * bs) as usize),
        };
        (within, part)
    }

    /// Rule 2, the slot serves only images the write belongs to: the write goes into it too.
    /// (Bytes outside the slot's pieces are read by nobody, so the whole part may go in.)
    /// The snapshots of `mask` are those the slot serves.
    async fn patch_copy(&self, g: u64, slot: u32, mask: u32, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let (within, part) = self.part_of(g, off, n, data);
        log::trace!("{}: old-epoch write on grain {g} patches slot {slot}", self.v.props.name());
        // The slot's record may still carry the check of its last copy, computed over the bytes
        // this write changes: after a crash it would fail and drop pieces the image needs.
        // Rare (an old-epoch write overtaken by a copy on its grain), so a batch is cheap here.
        crate::sim::crash_point::reached(crate::sim::crash_point::Point::CowPatchInPlace);
        home::unchecked(&self.v, slot).await?;
        match self.patch_slot(slot, within, &part).await {
            Ok(()) => Ok(()),
            Err(e) => self.store_failed(mask, e).await,
        }
    }

    /// Rule 1, the slot also serves older images: the snapshots of `mask` (those the write
    /// belongs to) move to a new slot holding the same pieces with the write applied.
    async fn move_out(&self, g: u64, slot: u32, mask: u32, off: u64, n: u64, data: Data<'_, '_>) -> IoResult {
        let v = &self.v;
        let Some(new) = self.alloc_or_fail(mask).await? else {
            return Ok(());
        };
        let (within, part) = self.part_of(g, off, n, data);
        let held = v.pieces.at(slot as usize).load(SeqCst);
        let mut buf = IoBuf::alloc(v.geo.grain_bytes as usize);
        let r = async {
            self.store.read_buf(v.store_offset_blocks(slot, 0), &mut buf[..]).await?;
            buf[within..within + part.len()].copy_from_slice(&part);
            self.store.write_buf(v.store_offset_blocks(new, 0), &buf[..]).await?;
            v.stats.copied_bytes.fetch_add(buf.len() as u64, Relaxed);
            Ok(v.piece_bytes(g, held).fold(0u32, |crc, (o, l)| crc32c::crc32c_append(crc, &buf[o..o + l])))
        }
        .await;
        let check = match r {
            Ok(crc) => Check { added: held, crc },
            Err(e) => {
                home::unused(v, new).await;
                return self.store_failed(mask, e).await;
            }
        };
        log::trace!("{}: old-epoch write on grain {g} moves snapshots {mask:#x} from slot {slot} to {new}", v.props.name());
        v.pieces.at(new as usize).store(held, SeqCst);
        for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
            v.snaps[i].grains.at(g as usize).store(new + 1, SeqCst);
        }
        // Two commits: while only the first is durable both slots claim the snapshots, and
        // recovery keeps either (each is a valid image of a snapshot that was draining). One
        // commit could tear between the two records and leave the snapshots with neither.
        crate::sim::crash_point::reached(crate::sim::crash_point::Point::CowSplitCommits);
        let r = async {
            home::commit(v, vec![home::Update::Set { slot: new, grain: g as u32, mask, check }]).await?;
            home::commit(v, vec![home::Update::Clear { slot, mask }]).await
        }
        .await;
        if let Err(e) = r {
            for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
                v.snaps[i].grains.at(g as usize).store(slot + 1, SeqCst);
            }
            return Err(e);
        }
        Ok(())
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

impl CowChannel {
    /// A modifying request. While nothing is live and the gate is open (the common case) it
    /// is [`Self::modify`] without its future: stamped, passed to the base, and left at once
    /// when the base completes in place, so the layer costs no allocation per write.
    fn submit_modify<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>, off: u64, n: u64, data: Data<'a, 'b>) -> IoFuture<'a> {
        let v = &*self.v;
        if !v.gate.is_open() {
            return IoFuture::boxed(self.modify(off, n, data));
        }
        let ticket = v.tracker.enter();
        // Read after the stamp, as in `modify` ("Lockless writes").
        if v.live_mask() != 0 {
            return IoFuture::boxed(async move {
                let r = self.modify_in_epoch(ticket.epoch(), off, n, data).await;
                v.tracker.exit(ticket);
                r
            });
        }
        self.base.pass(io, move || v.tracker.exit(ticket))
    }
}

impl IoChannel for CowChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        match io {
            Io::Read { .. } | Io::Flush => self.base.pass(io, || ()),
            Io::Write { offset_blocks, num_blocks, bufs } => self.submit_modify(io, offset_blocks, num_blocks, Data::Buf(bufs)),
            Io::Unmap { offset_blocks, num_blocks } => self.submit_modify(io, offset_blocks, num_blocks, Data::Unmap),
            Io::WriteZeroes { offset_blocks, num_blocks } => self.submit_modify(io, offset_blocks, num_blocks, Data::Zeroes),
        }
    }
}

impl Bdev for CowVolume {
    fn props(&self) -> &BdevProps {
        &self.v.props
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
            json!({ "name": v.props.name(), "base_bdev": v.base.name(), "store_bdev": v.store.name(), "grain_kb": v.geo.grain_bytes >> 10, "uuid": v.props.uuid().to_string() }),
        ))
    }
    fn destroy(&self) {
        self.v.closed.store(true, SeqCst);
        self.v.committer.wake();
        self.v.header_committer.wake();
        self.v.claims.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_preservable(&self) -> Option<&dyn crate::preserve::Preservable> {
        Some(self)
    }
}

impl Preservable for CowVolume {
    fn method(&self) -> &'static str {
        "cow"
    }

    fn preserve(&self, t: &crate::bdev::BdevCtx, req: &PreserveRequest) -> Result<Arc<SealSignal>, PreserveError> {
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
                    log::error!("{}: could not drop the bdev of failed snapshot {}: {de}", self.v.props.name(), req.snapshot_name);
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

    fn delete_snapshot(&self, t: &crate::bdev::BdevCtx, name: &str) -> Result<(), PreserveError> {
        let name = name.to_string();
        let vol = CowVolume { v: self.v.clone() };
        self.call_home(t, move |_| Box::pin(async move { vol.remove_snapshot(&name).await }))?
    }

    fn changed_ranges(&self, older: &str, newer: &str) -> Result<Vec<(u64, u64)>, PreserveError> {
        let v = &self.v;
        let sealed = |n: &str| {
            let i = v.find(n).ok_or_else(|| PreserveError::NotFound(format!("volume {} has no snapshot {n}", v.props.name())))?;
            if v.snaps[i].state.load(SeqCst) != ST_SEALED {
                return Err(PreserveError::Busy(format!("snapshot {n} is not sealed")));
            }
            Ok(i)
        };
        let (a, b) = (sealed(older)?, sealed(newer)?);
        if v.snaps[a].epoch.load(SeqCst) >= v.snaps[b].epoch.load(SeqCst) {
            return Err(PreserveError::Invalid(format!("snapshot {older} is not older than {newer}")));
        }
        // A piece changed between the two points in time only if a write stamped between
        // them executed on it. Such a write put the piece in the older snapshot's slot, one
        // the newer snapshot never shares (the older had its entry before the newer existed,
        // and entries only move apart); a slot both share holds only pieces copied after the
        // newer point, and pieces never written since the older point are in no slot of it.
        // So the older slot's pieces, where the two differ, cover every change (they may
        // also hold pieces first written after the newer point: a superset is correct).
        // One range per grain, from its first changed piece to its last: at most as many
        // ranges as grains (each costs the backup a read), never more bytes than the grain.
        let bs = v.block_size as u64;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in 0..v.num_grains {
            let ea = v.snaps[a].grains.at(g as usize).load(SeqCst);
            let eb = v.snaps[b].grains.at(g as usize).load(SeqCst);
            if ea == 0 || ea == eb {
                continue;
            }
            let pieces = v.pieces.at(ea as usize - 1).load(SeqCst);
            if pieces == 0 {
                continue;
            }
            let (start, nb) = v.piece_span(g, pieces.trailing_zeros(), u16::BITS - pieces.leading_zeros());
            let (off, len) = (start * bs, nb * bs);
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
            copied_bytes: v.stats.copied_bytes.load(Relaxed),
            store_bytes_used: v.stats.used_slots.load(Relaxed) * v.geo.grain_bytes,
            store_bytes_total: v.geo.slot_count as u64 * v.geo.grain_bytes,
            table_bytes: self.table_bytes(),
            locks: v.locks.stats(),
            snapshots_failed: v.stats.snapshots_failed.load(Relaxed),
            ..Default::default()
        };
        v.stats.copy_latency.accumulate(&mut s.copy_latency.0, &mut s.copy_latency.1);
        v.stats.seal_latency.accumulate(&mut s.seal_latency.0, &mut s.seal_latency.1);
        s.count_states(self.snapshot_infos());
        s
    }
}

/// A snapshot of a CoW volume as a read-only bdev. Its volume recreates it on restart, so it
/// has no `config_call`; deleting the bdev does not delete the snapshot (`bdev_snapshot_delete`
/// does).
pub struct SnapshotBdev {
    props: BdevProps,
    v: Arc<VolumeShared>,
    /// (index, generation) once the preserve happened; shared with the channels.
    attached: Arc<OnceLock<(usize, u64)>>,
}

impl SnapshotBdev {
    /// A snapshot bdev not yet attached to a preserve (reads fail until it is).
    pub fn new(vol: &CowVolume, name: &str) -> SnapshotBdev {
        SnapshotBdev::with(&vol.v, name, Uuid::new_v4())
    }

    fn with(v: &Arc<VolumeShared>, name: &str, uuid: Uuid) -> SnapshotBdev {
        let props = BdevProps::new(name, "CoW snapshot", v.block_size, v.num_blocks, uuid);
        SnapshotBdev { props, v: v.clone(), attached: Arc::new(OnceLock::new()) }
    }

    fn attached(v: &Arc<VolumeShared>, i: usize, gen: u64) -> SnapshotBdev {
        let m = v.snaps[i].meta();
        let b = SnapshotBdev::with(v, &m.name, m.uuid);
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
            scatter(&bounce, bufs);
        }
        // A snapshot deleted while we read returns no data from a reused slot.
        if v.snaps[i].generation.load(SeqCst) != gen {
            return Err(BdevError::Offline);
        }
        Ok(())
    }

    /// Reads blocks of grain `g` of snapshot `i` starting at `off`: the pieces its slot holds
    /// from the slot, the others from the live image.
    async fn read_piece(&self, i: usize, g: u64, off: u64, bufs: &mut [IoSliceMut<'_>]) -> IoResult {
        let v = &self.v;
        let bs = v.block_size as u64;
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let want = v.piece_mask(g, off, len / bs);
        let entry = v.snaps[i].grains.at(g as usize);
        let held_now = |e: u32| if e == 0 { 0 } else { v.pieces.at(e as usize - 1).load(SeqCst) & want };
        let mut e = entry.load(SeqCst);
        // Each retry follows a publication (an entry set or moved, pieces added), and a grain
        // sees at most a few of them while we read: the bound only catches a bug.
        for _ in 0..4 * MAX_PIECES {
            let held = held_now(e);
            if held == want {
                // Slot data never changes while the slot serves a sealed image.
                return self.read_slot(e - 1, g, off, bufs).await;
            }
            if held == 0 {
                self.base.read(off, bufs).await?;
            } else {
                let mut bounce = IoBuf::alloc(len as usize);
                self.base.read_buf(off, &mut bounce[..]).await?;
                for (p0, p1) in runs(held) {
                    let (ps, pn) = v.piece_span(g, p0, p1);
                    let (a, b) = (ps.max(off), (ps + pn).min(off + len / bs));
                    let part = &mut bounce[((a - off) * bs) as usize..((b - off) * bs) as usize];
                    self.read_slot(e - 1, g, a, &mut [IoSliceMut::new(part)]).await?;
                }
                scatter(&bounce, bufs);
            }
            // Pieces published meanwhile mean a new-epoch write may have changed the live
            // image under our read: read again (a copy is written before it is published,
            // and the live write waits for the publication).
            let e2 = entry.load(SeqCst);
            if e2 == e && held_now(e2) == held {
                return Ok(());
            }
            e = e2;
        }
        debug_assert!(false, "{}: grain {g} of snapshot index {i} kept changing under a read", v.props.name());
        Err(BdevError::NoResources)
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
        let from = (within - a) as usize;
        scatter(&buf[from..from + len as usize], bufs);
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
    fn props(&self) -> &BdevProps {
        &self.props
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
        json!({ "cow_snapshot": { "origin": self.v.props.name(), "state": st } })
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
        let p = params(&base, &store);
        let (vol, snaps) = cores.block_on(0, async move { CowVolume::open(p).await.unwrap() });
        assert!(snaps.is_empty());
        reg.register(Arc::new(vol)).unwrap()
    }

    /// Volume "v" over `base` and `store`, 4 KiB grains, one core.
    fn params(base: &Arc<BdevEntry>, store: &Arc<BdevEntry>) -> OpenParams {
        OpenParams {
            name: "v".into(),
            uuid: None,
            base: base.claim("v").unwrap(),
            store: store.claim("v").unwrap(),
            grain_kb: Some(4),
            cores: 1,
            lock_region_grains: None,
        }
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

    /// A header torn by a crash, in the copy the next header goes to, must not be made whole by
    /// the open's own header (same sequence number) torn by the next crash: the blocks that one
    /// wrote can be the very bytes the first one lacked. The store is a simulated device whose
    /// writes to that copy (past its first block) are slow, so the second crash finds the open's
    /// header in flight and keeps each of its blocks or not, by the device's seed. Without the
    /// open's `patch_block` of that copy, device seed 10 (the first of the 128 to) brings back
    /// a snapshot never acknowledged (see `lvol::void_slot`).
    #[test]
    fn a_torn_header_is_not_completed_by_the_next_torn_header() {
        use crate::sim::device::{Latency, SimDevice};
        use layout::{Header, SnapRecord, HEADER_BYTES};
        let lat = Latency { min_ns: 1_000, max_ns: 5_000 };
        let store_bytes = (layout::RECORDS_OFFSET + 8192 + 16 * 4096) as usize;
        // Registers the base and the store (a simulated device) and opens the volume: the number
        // of snapshots it found and the device's image after; with `crash_after_ns`, crashes the
        // device that long into the open instead: no count, the crash image.
        let run = |dev: SimDevice, crash_after_ns: Option<u64>| -> (Option<usize>, Vec<u8>) {
            let cores = ManualCores::new(1);
            let reg = BdevRegistry::new(1);
            let dev = Arc::new(dev);
            let base = reg.register(Arc::new(MallocBdev::new("b", 128, 512, None).unwrap())).unwrap();
            let store = reg.register(dev.clone()).unwrap();
            let p = params(&base, &store);
            match crash_after_ns {
                None => {
                    let n = cores.block_on(0, async move { CowVolume::open(p).await.map(|(_, snaps)| snaps.len()).unwrap() });
                    cores.block_on(0, async { reactor::sleep(std::time::Duration::from_millis(20)).await });
                    (Some(n), dev.current_image())
                }
                Some(ns) => {
                    cores.enter(0, || reactor::spawn_detached(async move { drop(CowVolume::open(p).await) }));
                    cores.run_until_idle();
                    while let Some(t) = cores.next_timer().filter(|&t| t <= ns) {
                        cores.advance_to(t.max(cores.now_ns()));
                        cores.run_until_idle();
                    }
                    (None, dev.crash())
                }
            }
        };
        // A fresh store, formatted by a first open; its current header.
        let (_, mut image) = run(SimDevice::new("s", vec![0u8; store_bytes], 1, lat), None);
        let h = [Header::decode(&image[..HEADER_BYTES]), Header::decode(&image[HEADER_BYTES..2 * HEADER_BYTES])]
            .into_iter()
            .flatten()
            .max_by_key(|h| h.seq)
            .unwrap();
        // Crash 1 left, in the copy the next header goes to, a header with the next sequence
        // number and a snapshot the reply never acknowledged, torn: block 5 holds older bytes.
        let mut torn = Header { seq: h.seq + 1, ..h.clone() };
        torn.snaps[30] = SnapRecord { state: DiskState::Sealed, epoch: 1, created_ms: 1, seal_ns: 1, uuid: Uuid::from_u128(7), name: "never".into() };
        let mut torn = torn.encode();
        torn[5 * 512..6 * 512].fill(0xFF);
        let copy = Header::copy_offset(h.seq + 1) as usize;
        image[copy..copy + HEADER_BYTES].copy_from_slice(&torn);
        assert_eq!(run(SimDevice::new("s", image.clone(), 2, lat), None).0, Some(0), "the torn header is not read");
        // Crash 2, during the open: its header to that copy is in flight.
        for seed in 0..128 {
            let slow = (copy + 512) as u64..(copy + HEADER_BYTES) as u64;
            let dev = SimDevice::new("s", image.clone(), seed, lat).with_slow_writes(slow, 1_000_000_000);
            let (_, after) = run(dev, Some(500_000_000));
            assert_eq!(run(SimDevice::new("s", after, seed, lat), None).0, Some(0), "device seed {seed}: a snapshot never acknowledged came back");
        }
    }

    /// A copy whose record reached the store but whose data a crash cut is found by the
    /// record's check when the store is opened and dropped (the image then reads the live
    /// volume, which the host write waiting for that copy had not touched); a check that holds
    /// keeps the copy; either way the check is cleared on media.
    #[test]
    fn a_copy_whose_data_a_crash_cut_is_dropped_by_its_check() {
        for data_kept in [true, false] {
            let cores = ManualCores::new(1);
            let reg = BdevRegistry::new(1);
            let base = reg.register(Arc::new(MallocBdev::new("b", 128, 512, None).unwrap())).unwrap();
            let store = reg.register(Arc::new(MallocBdev::new("s", (layout::RECORDS_OFFSET + 8192 + 16 * 4096) / 512, 512, None).unwrap())).unwrap();
            let open = |cores: &ManualCores| {
                let p = params(&base, &store);
                cores.block_on(0, async move { CowVolume::open(p).await.unwrap() })
            };
            let (vol, _) = open(&cores);
            let slot0 = vol.v.geo.slot_offset(0) / 512;
            let e = reg.register(Arc::new(vol)).unwrap();
            let e2 = e.clone();
            cores.block_on(0, async move {
                write(e2.clone(), 0, 0x11).await;
                snap(e2.clone(), "s1").await;
                // Copies block 0 (0x11) into slot 0, then writes 0x22 over it in the volume.
                write(e2.clone(), 0, 0x22).await;
            });
            e.bdev().destroy();
            drop(e);
            reg.unregister("v").unwrap();
            // Let the committers finish what they have (the batch that clears the check) and end.
            cores.block_on(0, async { reactor::sleep(std::time::Duration::from_millis(20)).await });
            // What a crash may leave: slot 0's record with the check of its copy, and the copy's
            // data on media (kept) or the slot as it was before (cut: zeros).
            let s2 = store.clone();
            cores.block_on(0, async move {
                let ch = Channel::get(&s2).unwrap();
                let rec_at = layout::RECORDS_OFFSET / 512;
                let mut b = vec![0u8; 512];
                ch.read_buf(rec_at, &mut b).await.unwrap();
                let (r, pieces, _) = layout::decode_record(&b[..layout::RECORD_BYTES]);
                assert_eq!((layout::record_grain(r), pieces), (0, 1), "slot 0 holds piece 0 of grain 0");
                let check = Check { added: 1, crc: crc32c::crc32c(&[0x11u8; 512]) };
                b[..layout::RECORD_BYTES].copy_from_slice(&layout::encode_record(r, pieces, check));
                ch.write_buf(rec_at, &b).await.unwrap();
                if !data_kept {
                    ch.write_buf(slot0, &[0u8; 512]).await.unwrap();
                }
            });
            let (vol, mut snaps) = open(&cores);
            assert_eq!(snaps.len(), 1, "the sealed snapshot comes back");
            assert_eq!(vol.used_slots(), data_kept as u64, "a copy whose check fails frees its slot");
            let _volume = reg.register(Arc::new(vol)).unwrap();
            let sb = reg.register(Arc::new(snaps.pop().unwrap())).unwrap();
            let s3 = store.clone();
            let (image, rec) = cores.block_on(0, async move {
                let mut image = vec![0u8; 512];
                Channel::get(&sb).unwrap().read_buf(0, &mut image).await.unwrap();
                let mut b = vec![0u8; 512];
                Channel::get(&s3).unwrap().read_buf(layout::RECORDS_OFFSET / 512, &mut b).await.unwrap();
                (image, layout::decode_record(&b[..layout::RECORD_BYTES]))
            });
            // Kept: the image reads the copy. Cut: the copy is dropped and the image reads the
            // live volume (here 0x22, since this test wrote it; after a real crash the host
            // write that needed the copy had not been submitted, so it holds the image).
            assert_eq!(image, vec![if data_kept { 0x11 } else { 0x22 }; 512], "data kept: {data_kept}");
            assert_eq!(rec.2, Check::default(), "the check is cleared on media when the store is opened");
            assert_eq!(rec.1, data_kept as u16, "the record keeps the piece only if its check held");
        }
    }

    /// Rule 2 after a crash. An old-epoch write `w` that waited for a lock is overtaken on a
    /// grain by a new-epoch write whose copy (with its check) is on media, and then patches
    /// that copy in place; a later write changes the live volume again. A crash before the
    /// copy's record page is written again must not find the check failing over the patched
    /// bytes and drop the piece: the snapshot `w` belongs to would then read the live volume's
    /// later data. (Fails with `patch_copy`'s wait for `home::unchecked` removed.)
    #[test]
    fn a_copy_patched_in_place_keeps_its_piece_after_a_crash() {
        use crate::bdevs::error::{ErrorBdev, ErrorType};
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let mem = reg.register(Arc::new(MallocBdev::new("m", 128, 512, None).unwrap())).unwrap();
        let eb = ErrorBdev::new("eb".into(), mem.claim("eb").unwrap(), None);
        let inject = eb.injections().clone();
        let base = reg.register(Arc::new(eb)).unwrap();
        let store_blocks = (layout::RECORDS_OFFSET + 8192 + 16 * 4096) / 512;
        let store = reg.register(Arc::new(MallocBdev::new("s", store_blocks, 512, None).unwrap())).unwrap();
        // One grain per lock region: a write over grains 0 and 1 locks 0, then 1.
        let p = OpenParams { lock_region_grains: Some(1), ..params(&base, &store) };
        let (vol, _) = cores.block_on(0, async move { CowVolume::open(p).await.unwrap() });
        let e = reg.register(Arc::new(vol)).unwrap();
        async fn put(e: Arc<BdevEntry>, block: u64, blocks: usize, byte: u8) -> IoResult {
            Channel::get(&e).unwrap().write_buf(block, &vec![byte; blocks * 512]).await
        }
        let (e2, mem2, store2) = (e.clone(), mem.clone(), store.clone());
        let (image, s1) = cores.block_on(0, async move {
            let ms = std::time::Duration::from_millis;
            put(e2.clone(), 0, 16, 0x01).await.unwrap();
            snap(e2.clone(), "s0").await;
            // Grain 1's block 8 gets its copy for s0 (slot X0).
            put(e2.clone(), 8, 1, 0x02).await.unwrap();
            // w0 (grain 0) hangs in the live volume holding grain 0's lock; w (blocks 7-8,
            // grains 0 and 1) is stamped and queues for grain 0's lock.
            inject.set(IoType::Write, ErrorType::Pending, 1);
            // All of grain 0: s0's copy of it then holds every piece w touches there (no
            // rule 3 extend, whose record batch would rewrite the page under test).
            let w0 = reactor::spawn(put(e2.clone(), 0, 8, 0x03));
            reactor::sleep(ms(5)).await;
            let w = reactor::spawn(put(e2.clone(), 7, 2, 0x04));
            reactor::sleep(ms(1)).await;
            let s1 = Arc::new(SnapshotBdev::new(cow(&e2), "s1"));
            let sig = cow(&e2).take_snapshot(&s1, false).await.unwrap();
            assert_eq!(sig.get(), SnapshotState::Draining, "w0 and w are still in flight");
            // w2, new epoch, takes grain 1's lock first: copies block 8 (0x02) for s1 (slot
            // X1, its record with a check, one flush), then writes 0x05 to the live volume.
            put(e2.clone(), 8, 1, 0x05).await.unwrap();
            // w0 fails, w gets both locks: rule 2 patches X1 with its 0x04.
            inject.clear();
            w.await.unwrap();
            // w reached the live volume after w2; a later write changes it again (s1's copy
            // holds the piece already: no copy, no record batch).
            put(e2.clone(), 8, 1, 0x06).await.unwrap();
            // The crash: what the devices hold now (RAM: every write landed).
            let mut image = (vec![0u8; 128 * 512], vec![0u8; store_blocks as usize * 512]);
            Channel::get(&mem2).unwrap().read_buf(0, &mut image.0).await.unwrap();
            Channel::get(&store2).unwrap().read_buf(0, &mut image.1).await.unwrap();
            assert!(w0.await.is_err(), "w0 was aborted");
            while sig.get() != SnapshotState::Sealed {
                reactor::sleep(std::time::Duration::from_micros(10)).await;
            }
            (image, s1)
        });
        let s1 = reg.register(s1).unwrap();
        let read8 = |cores: &ManualCores, s: Arc<BdevEntry>| {
            cores.block_on(0, async move {
                let mut b = vec![0u8; 512];
                Channel::get(&s).unwrap().read_buf(8, &mut b).await.unwrap();
                b
            })
        };
        assert_eq!(read8(&cores, s1), vec![0x04; 512], "s1 holds w (its patched copy), not w2's 0x05");
        reg.unregister("s1").unwrap();
        e.bdev().destroy();
        drop(e);
        reg.unregister("v").unwrap();
        cores.block_on(0, async { reactor::sleep(std::time::Duration::from_millis(20)).await });
        // Restart on what the crash left.
        let base2 = reg.register(Arc::new(MallocBdev::new("b2", 128, 512, None).unwrap())).unwrap();
        let store2 = reg.register(Arc::new(MallocBdev::new("s2", store_blocks, 512, None).unwrap())).unwrap();
        let (b2, s2) = (base2.clone(), store2.clone());
        cores.block_on(0, async move {
            Channel::get(&b2).unwrap().write_buf(0, &image.0).await.unwrap();
            Channel::get(&s2).unwrap().write_buf(0, &image.1).await.unwrap();
        });
        let p = OpenParams { lock_region_grains: Some(1), ..params(&base2, &store2) };
        let (vol, snaps) = cores.block_on(0, async move { CowVolume::open(p).await.unwrap() });
        let _volume = reg.register(Arc::new(vol)).unwrap();
        let s1 = snaps.into_iter().find(|s| s.props().name() == "s1").expect("s1 comes back");
        let s1 = reg.register(Arc::new(s1)).unwrap();
        assert_eq!(read8(&cores, s1), vec![0x04; 512], "after the crash s1 still reads w's 0x04 from its patched copy");
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
            let ch = Channel::get(&e2).unwrap();
            ch.write_buf(6 * 8 + 1, &[4u8; 512]).await.unwrap();
            ch.write_buf(6 * 8 + 5, &[4u8; 512]).await.unwrap();
            snap(e2.clone(), "s4").await;
        });
        // Each write is one 512-byte block, one piece of its 4 KiB grain: only that piece
        // counts as changed, not the grain (two pieces of a grain: the span between them).
        let (g, b) = (4096u64, 512u64);
        assert_eq!(cow(&e).changed_ranges("s1", "s2").unwrap(), vec![(2 * g, b), (3 * g, b)]);
        assert_eq!(cow(&e).changed_ranges("s2", "s3").unwrap(), vec![(2 * g, b), (5 * g, b)]);
        assert_eq!(cow(&e).changed_ranges("s1", "s3").unwrap(), vec![(2 * g, b), (3 * g, b), (5 * g, b)]);
        assert_eq!(cow(&e).changed_ranges("s3", "s4").unwrap(), vec![(6 * g + b, 5 * b)], "pieces 1 and 5: one range");
        assert!(cow(&e).changed_ranges("s3", "s1").is_err());
        assert!(cow(&e).changed_ranges("s1", "nope").is_err());
    }

    #[test]
    fn a_first_write_copies_only_the_pieces_it_touches() {
        // 4 KiB grains of 512-byte blocks: pieces of one block.
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let e = volume(&cores, &reg, 16);
        let e2 = e.clone();
        let (image, live) = cores.block_on(0, async move {
            let ch = Channel::get(&e2).unwrap();
            let before: Vec<u8> = (0..4096).map(|i| (i / 512) as u8 + 1).collect();
            ch.write_buf(0, &before).await.unwrap();
            let sb = snap(e2.clone(), "s1").await;
            let copied = || cow(&e2).v.stats.copied_bytes.load(Relaxed);
            ch.write_buf(0, &[0xA0; 512]).await.unwrap();
            assert_eq!(copied(), 512, "one block written, one block copied");
            ch.write_buf(3, &[0xA3; 1024]).await.unwrap();
            assert_eq!(copied(), 1536);
            ch.write_buf(0, &[0xB0; 512]).await.unwrap();
            assert_eq!(copied(), 1536, "a piece is copied once");
            assert_eq!(cow(&e2).used_slots(), 1, "one slot for the grain");
            // The rest of the grain at once: only the five pieces not yet copied.
            ch.write_buf(0, &[0xC0; 4096]).await.unwrap();
            assert_eq!(copied(), 4096);
            let sch = sb.open_channel().unwrap();
            let mut image = vec![0u8; 4096];
            sch.submit(Io::Read { offset_blocks: 0, num_blocks: 8, bufs: &mut [IoSliceMut::new(&mut image)] }).await.unwrap();
            let mut live = vec![0u8; 4096];
            ch.read_buf(0, &mut live).await.unwrap();
            assert_eq!(image, before, "the snapshot reads the grain as it was");
            (image, live)
        });
        assert_eq!(image[512 * 3], 4);
        assert!(live.iter().all(|&b| b == 0xC0));
    }

    #[test]
    fn a_store_of_an_older_format_is_refused_not_reformatted() {
        let cores = ManualCores::new(1);
        let reg = BdevRegistry::new(1);
        let base = reg.register(Arc::new(MallocBdev::new("b", 128, 512, None).unwrap())).unwrap();
        let store = reg.register(Arc::new(MallocBdev::new("s", 1024, 512, None).unwrap())).unwrap();
        let mut old = vec![0u8; 4096];
        old[0..8].copy_from_slice(&layout::MAGIC);
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        let s2 = store.clone();
        let old2 = old.clone();
        cores.block_on(0, async move { Channel::get(&s2).unwrap().write_buf(0, &old2).await.unwrap() });
        let p = OpenParams {
            name: "v".into(),
            uuid: None,
            base: base.claim("v").unwrap(),
            store: store.claim("v").unwrap(),
            grain_kb: None,
            cores: 1,
            lock_region_grains: None,
        };
        let r = cores.block_on(0, async move { CowVolume::open(p).await.map(|_| ()) });
        let err = r.unwrap_err();
        assert!(err.contains("format 1"), "{err}");
        let s3 = store.clone();
        let now = cores.block_on(0, async move {
            let mut b = vec![0u8; 4096];
            Channel::get(&s3).unwrap().read_buf(0, &mut b).await.unwrap();
            b
        });
        assert_eq!(now, old, "the store was left as it was");
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
