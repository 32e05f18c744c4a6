//! `lvol`: a pool of thin (or thick) volumes on one base bdev, driven by SPDK's lvol RPCs
//! (`bdev_lvol_create_lvstore`, `bdev_lvol_create`, ...). Each volume is a bdev named by its
//! UUID with the alias `lvs_name/lvol_name`, usable by nvmf and iscsi like any bdev.
//!
//! **Space.** The base is cut into clusters (default 1 MiB). A thin volume gets a cluster on
//! the first write to it; unmap or write-zeroes of a whole cluster gives it back. A thick
//! volume reserves its clusters at creation (the pool's free count drops at once) and takes
//! them from its reservation. When the pool is full only writes that need a new cluster fail,
//! with [`BdevError::NoSpace`] (NVMe Capacity Exceeded, SCSI SPACE ALLOCATION FAILED WRITE
//! PROTECT); reads and writes to allocated clusters go on, and freed space is usable at once.
//!
//! **Metadata, crash safety.** The whole store (superblock, volumes, cluster maps) is one
//! record written alternately to two slots at the front of the base ([`layout`]): a torn write
//! leaves the previous record valid. A first write to a cluster: the cluster is zeroed (so that
//! a crash never shows another volume's old data through a new map entry), the data is
//! written, the map entry goes into the in-memory record, and the write is acknowledged once a
//! commit that includes the entry is durable. Commits are grouped: one writer at a time leads a
//! commit (flush base, write slot, flush base) that covers every entry added before it began;
//! writers arriving meanwhile wait for the next one. Writes to allocated clusters touch no
//! metadata. Free clusters are not recorded: at open every cluster no map references is free,
//! so a cluster allocated but not committed before a crash (the only kind of orphan this
//! scheme can leave) is reclaimed by construction; the open logs the count it found.
//!
//! **Lookups without locks.** Each volume's map is an array of atomics (physical cluster + 1,
//! 0 = unallocated) read by every core. Every I/O holds a ticket of the store's
//! [`EpochTracker`] from its lookup to its completion; a cluster leaves a map (unmap, delete,
//! shrink) or a map is replaced (grow) first, and the cluster or the old map is reused only
//! after the epoch advanced and sealed, so no I/O can still be using it.
//!
//! **Snapshots and clones** (`bdev_lvol_snapshot`, `bdev_lvol_clone`, inflate, decouple,
//! revert; DESIGN §7). Clusters are shared by reference count: a snapshot's or a clone's map
//! names the same physical clusters as its origin's, and the count of each cluster is the
//! number of maps (and pending entries) naming it, rebuilt from the maps at open. The live map
//! marks a shared cluster ([`SHARED`]); a write to one takes the slow path and copies the
//! cluster (`copy_cluster`) into a new one, like a first write: the entry commits with the
//! group commit and the old reference goes when it is durable. A snapshot never pauses I/O:
//! see [`Store::snapshot`] for the epoch rule it follows.
//!
//! **Restart.** `save_config` writes `bdev_lvol_load_lvstore {bdev_name}` (a tidemark method)
//! as the configuration of one volume of each store, its *anchor*, whose name claims the base
//! bdev so that the call comes after the base's creation; the load finds the store on the
//! base and registers every volume. A store with no volume is not in `save_config` (load it
//! with that call). SPDK instead examines every new bdev; the registry has no such hook yet.
//! A hand-written configuration that creates a store and volumes (the embedded default does)
//! is replayed at every start: there `bdev_lvol_create_lvstore` opens the store of the same
//! name and cluster size it finds on the bdev, and `bdev_lvol_create` returns the volume of
//! the same name and kind it finds, each saying so in the log; anything else there is still
//! an error. RPC clients keep SPDK's errors for both (see [`crate::module::Ctx::from_config`]).

pub mod layout;
mod preserve;
pub mod rpc;
pub mod sim;
mod vols;

use crate::bdev::LatencyHistogram;
use crate::bdev::{Bdev, BdevEntry, BdevError, BdevProps, BlockCount, Channel, HoldGuard, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType};
use crate::preserve::{EpochTicket, EpochTracker, SealSignal, SnapshotState};
use futures::channel::oneshot;
use layout::{LogRecord, MapChange, StoreRecord, VolumeRecord};
use serde_json::{json, Value};
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap};
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use uuid::Uuid;
use vols::{Head, VolState, Vols};

pub const PRODUCT_NAME: &str = "Logical Volume";

/// Why a pool operation failed; mapped to JSON-RPC errors in `rpc`.
#[derive(Debug, thiserror::Error)]
pub enum LvolError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Busy(String),
    #[error("I/O error on the base bdev: {0}")]
    Io(#[from] BdevError),
}

/// A volume's cluster map, shared by every core: physical cluster + 1, or 0; with [`SHARED`]
/// set when another volume (a snapshot, a clone) maps the same cluster. Two levels: chunks of
/// [`CHUNK`] entries, allocated when a cluster of theirs is first mapped, so that creating,
/// snapshotting or cloning a 1 TiB thin volume costs what a 1 GiB one does (a flat map was
/// 4 MiB to allocate and zero per TiB), and an empty thin volume takes no map memory.
struct LiveMap {
    len: u64,
    chunks: Box<[AtomicPtr<[AtomicU32; CHUNK]>]>,
}

/// Entries per chunk of a live map (16 KiB: 4 GiB of volume with 1 MiB clusters).
const CHUNK: usize = 4096;

/// The live map's bit for a cluster that must be copied before it is written.
const SHARED: u32 = 1 << 31;

impl LiveMap {
    fn new(n: u64) -> Box<LiveMap> {
        let chunks = (0..(n as usize).div_ceil(CHUNK)).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect();
        Box::new(LiveMap { len: n, chunks })
    }

    /// The entry of `i`, if its chunk exists (an absent chunk reads as all unmapped).
    fn get(&self, i: u64) -> Option<&AtomicU32> {
        if i >= self.len {
            return None;
        }
        let c = self.chunks[i as usize / CHUNK].load(Acquire);
        // SAFETY: a chunk, once published, lives as long as the map (freed only in `drop`).
        (!c.is_null()).then(|| unsafe { &(*c)[i as usize % CHUNK] })
    }

    /// The entry of `i`, its chunk allocated if absent; `None` past the end. Called with the
    /// store's state lock held (one writer per map: no two threads race to allocate a chunk).
    fn get_or_alloc(&self, i: u64) -> Option<&AtomicU32> {
        if i >= self.len {
            return None;
        }
        let slot = &self.chunks[i as usize / CHUNK];
        let mut c = slot.load(Acquire);
        if c.is_null() {
            // Release: a reader that sees the pointer sees the zeroed entries behind it.
            c = Box::into_raw(Box::new([const { AtomicU32::new(0) }; CHUNK]));
            slot.store(c, Release);
        }
        // SAFETY: as in `get`.
        Some(unsafe { &(*c)[i as usize % CHUNK] })
    }

    /// The heap the map takes, in bytes: its header, its chunk pointers (one per 4 GiB of
    /// volume with 1 MiB clusters) and the chunks allocated (16 KiB each, whether one entry or
    /// all 4096 of theirs are mapped).
    fn heap_bytes(&self) -> u64 {
        let chunks = self.chunks.iter().filter(|c| !c.load(Acquire).is_null()).count() as u64;
        (std::mem::size_of::<LiveMap>() + std::mem::size_of_val(&*self.chunks)) as u64 + chunks * std::mem::size_of::<[AtomicU32; CHUNK]>() as u64
    }
}

impl Drop for LiveMap {
    fn drop(&mut self) {
        for c in self.chunks.iter() {
            let c = c.load(Acquire);
            if !c.is_null() {
                // SAFETY: allocated by `get_or_alloc` with Box::new; the map is going away, so
                // nothing can hold a reference into it (see VolLive's drop and `resize`).
                drop(unsafe { Box::from_raw(c) });
            }
        }
    }
}

/// What the data path of one volume reads without a lock.
pub struct VolLive {
    map: AtomicPtr<LiveMap>,
    /// The volume's size, shared with its bdev's props (`BdevProps::with_count`).
    num_blocks: BlockCount,
    read_only: AtomicBool,
    /// A delete of the volume is under way: no new pending entry (first write or copy) is made
    /// for it (see [`Store::delete_volume`]); set and read under the state lock.
    deleting: AtomicBool,
    /// Clusters the volume holds (committed), for metrics and `get_lvols`.
    allocated: AtomicU64,
    /// Copy-on-writes of shared clusters done for this volume (preserve metrics).
    copies: AtomicU64,
    /// Time from a snapshot of this volume to its seal, and snapshots that failed to seal.
    seal_latency: LatencyHistogram,
    snaps_failed: AtomicU64,
}

impl VolLive {
    fn new(clusters: u64, num_blocks: u64, read_only: bool) -> Arc<VolLive> {
        Arc::new(VolLive {
            map: AtomicPtr::new(Box::into_raw(LiveMap::new(clusters))),
            num_blocks: BlockCount::new(num_blocks),
            read_only: AtomicBool::new(read_only),
            deleting: AtomicBool::new(false),
            allocated: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            seal_latency: LatencyHistogram::default(),
            snaps_failed: AtomicU64::new(0),
        })
    }

    /// The physical cluster of `logical`, if allocated. The caller holds an epoch ticket.
    fn lookup(&self, logical: u64) -> Option<u32> {
        self.lookup_shared(logical).map(|(p, _)| p)
    }

    /// The physical cluster of `logical` and whether it is shared (a write copies it first).
    fn lookup_shared(&self, logical: u64) -> Option<(u32, bool)> {
        // SAFETY: the map is replaced only by `resize`, which frees the old one after the
        // store's epoch sealed, i.e. after every I/O (ticket holder) that could have loaded it.
        let m = unsafe { &*self.map.load(Acquire) };
        let v = m.get(logical)?.load(Acquire);
        Some(((v & !SHARED).checked_sub(1)?, v & SHARED != 0))
    }

    fn set(&self, logical: u32, phys: Option<u32>) {
        self.set_shared(logical, phys, false)
    }

    fn set_shared(&self, logical: u32, phys: Option<u32>, shared: bool) {
        // SAFETY: as in `lookup`; called with the store's state lock held, which `replace_map`
        // also holds, so the map cannot be swapped under us.
        let m = unsafe { &*self.map.load(Acquire) };
        // Unmapping in an absent chunk has nothing to clear.
        let a = if phys.is_some() { m.get_or_alloc(logical as u64) } else { m.get(logical as u64) };
        if let Some(a) = a {
            a.store(phys.map_or(0, |p| (p + 1) | if shared { SHARED } else { 0 }), Release);
        }
    }

    fn capacity(&self) -> u64 {
        // SAFETY: as in `set`.
        unsafe { &*self.map.load(Acquire) }.len
    }

    /// The heap the live map takes, in bytes.
    fn map_bytes(&self) -> u64 {
        // SAFETY: as in `set`: the caller holds the store's state lock.
        unsafe { &*self.map.load(Acquire) }.heap_bytes()
    }
}

impl Drop for VolLive {
    fn drop(&mut self) {
        // SAFETY: the last reference: no I/O can hold the pointer.
        drop(unsafe { Box::from_raw(self.map.load(Acquire)) });
    }
}

/// A cluster allocated for a first write and not yet durable in a map.
struct Pending {
    phys: u32,
    /// Zeroed: other writers to the cluster may write their data.
    ready: bool,
    ready_waiters: Vec<oneshot::Sender<()>>,
    /// The commit generation whose record includes the entry.
    gen: Option<u64>,
    /// A copy-on-write: the shared cluster the entry replaces (one reference is given back
    /// once the entry is durable).
    cow_from: Option<u32>,
    /// A snapshot taken while the entry was pending owns the cluster too: later writers wait
    /// for the entry to be published and then copy it.
    captured: bool,
    /// A copy-on-write's fill waits for the seal of this epoch (the snapshot that shared the
    /// source): a writer whose ticket is of this epoch or older must not wait for the fill
    /// while holding its ticket.
    seal_wait: Option<u64>,
}

/// What a write to one cluster does, settled by [`Store::plan_piece`] without waiting.
enum Role {
    /// Mapped to this volume alone: written in place.
    Mapped(u32),
    /// A first write or a copy-on-write: this writer made the pending entry and fills it.
    Fill { phys: u32, from: Option<u32>, cow_epoch: u64 },
    /// Another writer's pending entry, filled: written there.
    Ready(u32),
    /// Another writer's pending entry, being filled: written there once `rx` fires (or
    /// planned again if the fill fails and drops the sender).
    WaitFill { phys: u32, seal_wait: Option<u64>, rx: oneshot::Receiver<()> },
    /// Another writer's entry a snapshot captured: copied once it is published (committed,
    /// once its writer gave it a generation).
    WaitPublish(Option<u64>),
    /// A `Fill` done: this writer's new cluster, ready for its data.
    Filled(u32),
    /// A `Fill` given back (an earlier fill of the write failed).
    Abandoned,
}

/// The roles of a write's pieces, one per cluster it spans: inline for the two to four a write
/// usually spans (a 128 KiB write across the boundary of 64 KiB clusters spans three), so that
/// a write over a cluster boundary allocates nothing on the common path.
type Plan = SmallVec<[Role; 4]>;

/// A piece of a caller's buffers (see `sub`): inline for the few a host write brings.
type Slices<'x> = SmallVec<[IoSlice<'x>; 4]>;
type SlicesMut<'x> = SmallVec<[IoSliceMut<'x>; 4]>;

struct State {
    name: String,
    seq: u64,
    /// The slot holding the current record.
    cur_slot: usize,
    /// Map changes made since the last commit began, in order: what the next log record
    /// carries (layout: log records).
    journal: Vec<MapChange>,
    /// Byte offset in the current slot where the next log record goes.
    log_at: u64,
    /// The generation of the volume records ([`Vols::gen`]) and the store's name in the last
    /// durable whole record, if a log record can follow it: a commit whose name or records
    /// differ, or any commit after a failed one, after an open or after a revert, writes a
    /// whole record instead.
    last_heads: Option<(u64, String)>,
    /// The volume records that whole record holds, to check the generation against.
    #[cfg(debug_assertions)]
    durable_heads: Vec<VolumeRecord>,
    /// References to each physical cluster (volume maps + pending entries); 0 = free.
    refs: Vec<u32>,
    free_count: u64,
    /// Where the search for a free cluster starts (see `alloc_cluster`).
    next_free: usize,
    /// Clusters whose last reference went at a copy-on-write publish; they keep a reference
    /// of 1 until the next quiesce (a read may still be using them).
    limbo: Vec<u32>,
    /// The epoch closed by the latest snapshot: a copy-on-write reads its source only once
    /// this epoch sealed (writes submitted before the snapshot have landed).
    cow_epoch: u64,
    /// Clusters reserved by thick volumes and not yet allocated.
    reserved: u64,
    vols: Vols,
    /// Ordered, so that a seed of the simulation replays exactly (the order `publish` frees
    /// copied clusters in decides which cluster the next allocation takes).
    pending: BTreeMap<(Uuid, u32), Pending>,
    next_gen: u64,
    durable_gen: u64,
    committing: bool,
    waiters: Vec<(u64, oneshot::Sender<IoResult>)>,
    /// Tasks waiting in [`Store::until`] for a pending entry to get its generation or to end,
    /// for a snapshot to seal or go, or for the epoch to advance; woken (all, to check their
    /// condition again) by [`Store::notify`] where one of those happens. Only control
    /// operations and writes to a captured cluster wait here: the list is nearly always empty.
    watchers: Vec<Waker>,
    /// The claim on the base bdev, by the anchor volume's name (see the module comment).
    claim: Option<HoldGuard>,
    anchor: Option<Uuid>,
    /// What this run knows of the snapshots it took (the record keeps neither an origin nor
    /// a creation time; see `preserve`). A snapshot loaded from the media has no entry.
    snap_meta: HashMap<Uuid, SnapMeta>,
}

/// A snapshot taken in this run of the daemon: by `bdev_lvol_snapshot` or `bdev_snapshot_create`.
struct SnapMeta {
    /// The volume it was taken of.
    origin: Uuid,
    created_ms: u64,
    signal: Arc<SealSignal>,
    started: std::time::Instant,
    time_to_seal_ns: Option<u64>,
}

/// An lvol store on one base bdev.
pub struct Store {
    pub uuid: Uuid,
    base: Arc<BdevEntry>,
    cluster_size: u64,
    block_size: u32,
    data_start: u64,
    total_clusters: u64,
    slot_bytes: u64,
    tracker: Arc<EpochTracker>,
    state: Mutex<State>,
    /// Metadata records written (each covers every change made before it began).
    commits: AtomicU64,
}

/// What a store's metadata takes in memory, in bytes, by kind ([`Store::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataMemory {
    /// The volumes' committed maps: one B-tree entry per cluster a volume maps (a shared
    /// cluster counts once per volume mapping it).
    pub maps: u64,
    /// The volumes' live maps: chunks of 4096 entries (4 bytes each), allocated when one of
    /// their clusters is first mapped.
    pub live_maps: u64,
    /// The reference count of every cluster of the pool, allocated or not (4 bytes each).
    pub refs: u64,
    /// Each volume's record, name and live state, its map aside.
    pub volumes: u64,
    /// Work under way or kept between commits: pending first writes, the journal of the next
    /// log record, clusters in limbo, commit waiters, this run's snapshot metadata.
    pub work: u64,
}

impl MetadataMemory {
    pub fn total(&self) -> u64 {
        self.maps + self.live_maps + self.refs + self.volumes + self.work
    }
}

/// SPDK's `clear_method` names, by their on-media number.
pub const CLEAR_METHODS: [&str; 3] = ["none", "unmap", "write_zeroes"];

fn clusters_for(size_bytes: u64, cluster: u64) -> u64 {
    size_bytes.div_ceil(cluster)
}

impl Store {
    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits, with no timer, until `done` holds. `done` is checked under the state lock and
    /// the waker is registered under the same lock, so an event cannot slip in between: what
    /// makes `done` true must call [`Self::notify`] under the lock after it did (the list of
    /// such events is at `State::watchers`).
    async fn until(&self, mut done: impl FnMut(&State) -> bool) {
        std::future::poll_fn(|cx| {
            let mut st = self.st();
            if done(&st) {
                return Poll::Ready(());
            }
            // Polled again before an event (a `join!` polls every branch): one entry is enough.
            if !st.watchers.iter().any(|w| w.will_wake(cx.waker())) {
                st.watchers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Wakes every task waiting in [`Self::until`] (each checks its condition again); called
    /// under the state lock where an entry gets its generation or ends, a snapshot seals or
    /// goes, or the epoch advances. With nobody waiting, the common case, a length check.
    fn notify(st: &mut State) {
        // `drain` keeps the list's capacity: no allocation the next time someone waits.
        for w in st.watchers.drain(..) {
            w.wake();
        }
    }

    pub fn name(&self) -> String {
        self.st().name.clone()
    }

    pub fn base_name(&self) -> String {
        self.base.name().to_string()
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn total_clusters(&self) -> u64 {
        self.total_clusters
    }

    /// Clusters neither allocated nor reserved by a thick volume.
    pub fn free_clusters(&self) -> u64 {
        let st = self.st();
        st.free_count - st.reserved
    }

    /// Metadata commits since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Relaxed)
    }

    pub fn volume_count(&self) -> usize {
        self.st().vols.len()
    }

    /// What the store's metadata takes in memory now, counted from the sizes of its
    /// structures (what the allocator adds to each allocation included where it is the
    /// bulk of it, see [`vols::MAP_ENTRY_BYTES`]). Not counted: the buffers of a commit under
    /// way (a whole record's encoding is freed once written), and what the allocator keeps
    /// of freed memory; see `metadata_memory_per_allocated_mib_is_within_the_goal` in the tests.
    pub fn memory(&self) -> MetadataMemory {
        use std::mem::size_of;
        let st = self.st();
        let mut m = MetadataMemory { refs: (st.refs.capacity() * size_of::<u32>()) as u64, ..Default::default() };
        for v in st.vols.values() {
            // The tree of volumes is keyed by random UUIDs: its nodes are about 2/3 full.
            m.volumes += (size_of::<(Uuid, VolState)>() * 3 / 2 + v.rec.name.capacity() + 2 * size_of::<usize>() + size_of::<VolLive>()) as u64;
            m.live_maps += v.live.map_bytes();
            m.maps += v.map.len() as u64 * vols::MAP_ENTRY_BYTES;
        }
        // A tree's nodes are about 2/3 full; a hash map keeps a control byte beside each of
        // its buckets.
        m.work = (st.pending.len() * size_of::<((Uuid, u32), Pending)>() * 3 / 2
            + st.pending.values().map(|p| p.ready_waiters.capacity() * size_of::<oneshot::Sender<()>>()).sum::<usize>()
            + st.journal.capacity() * size_of::<MapChange>()
            + st.limbo.capacity() * size_of::<u32>()
            + st.waiters.capacity() * size_of::<(u64, oneshot::Sender<IoResult>)>()
            + st.watchers.capacity() * size_of::<Waker>()
            + st.snap_meta.capacity() * (size_of::<(Uuid, SnapMeta)>() + 1)
            + st.name.capacity()) as u64;
        #[cfg(debug_assertions)]
        {
            m.work += st.durable_heads.iter().map(|r| (size_of::<VolumeRecord>() + r.name.capacity()) as u64).sum::<u64>();
        }
        m
    }

    fn slot_offset(&self, slot: usize) -> u64 {
        slot as u64 * self.slot_bytes / self.block_size as u64
    }

    fn cluster_block(&self, phys: u32) -> u64 {
        (self.data_start + phys as u64 * self.cluster_size) / self.block_size as u64
    }

    fn blocks_per_cluster(&self) -> u64 {
        self.cluster_size / self.block_size as u64
    }

    /// The snapshots left out of the next record, with the parent their children's links go
    /// to instead. A snapshot maps the clusters it captured pending at once, before their data
    /// (zeroes or a copy) is written; its own commit waits for that, but another writer's
    /// commit could record it first, and a crash then left a snapshot reading some freed
    /// cluster's old data. Until then it is left out of records (its volume's parent link goes
    /// to its parent).
    fn left_out(&self, st: &State) -> HashMap<Uuid, Option<Uuid>> {
        // Only a captured entry's cluster can be in a snapshot's map before the entry has its
        // generation: a pending cluster was free when allocated, and joins a map either with
        // its entry (`add_entry`, which gives the generation) or by a snapshot's capture (a
        // clone or a revert copies a map that has it already). So the common commit, with no
        // snapshot under way, looks at the pending entries and at no map.
        let unready = Self::unready_captured(st);
        let left_out: HashMap<Uuid, Option<Uuid>> = if unready.is_empty() {
            HashMap::new()
        } else {
            st.vols.values().filter(|v| v.rec.snapshot && v.map.values().any(|p| unready.contains(p))).map(|v| (v.rec.uuid, v.rec.parent)).collect()
        };
        #[cfg(debug_assertions)]
        {
            let all: std::collections::HashSet<u32> = st.pending.values().filter(|p| p.gen.is_none()).map(|p| p.phys).collect();
            let n = st.vols.values().filter(|v| v.rec.snapshot && v.map.values().any(|p| all.contains(p))).count();
            assert_eq!(n, left_out.len(), "only captured pending clusters are mapped by a snapshot before they are ready");
        }
        left_out
    }

    /// The clusters of captured entries not yet ready (filled and written): a snapshot that
    /// maps one does not hold its image yet.
    fn unready_captured(st: &State) -> std::collections::HashSet<u32> {
        st.pending.values().filter(|p| p.gen.is_none() && p.captured).map(|p| p.phys).collect()
    }

    /// Whether snapshot `snap` maps a captured cluster not yet ready (it is not sealed yet).
    fn maps_unready(st: &State, snap: Uuid) -> bool {
        let unready = Self::unready_captured(st);
        !unready.is_empty() && st.vols.get(&snap).is_some_and(|v| v.map.values().any(|p| unready.contains(p)))
    }

    /// Waits until snapshot `snap` is sealed (or failed to), so that it maps no captured
    /// cluster that is not ready: its captured first writes have written their data (or
    /// failed, and `abandon` took their clusters out of its map), and the writes in flight at
    /// the snapshot have landed in the clusters it shares. A clone or a revert copies the
    /// snapshot's map; made before that, it would map a cluster that holds another volume's
    /// old data until the fill, and, unlike the snapshot, it is not left out of the records
    /// (`left_out`), so a crash could make that mapping durable; and a clone acknowledged
    /// before the seal would see its content change under it. The RPCs cannot get here before
    /// the seal (a snapshot's bdev is registered once `snapshot` returns), the store's own
    /// callers could. Once settled a snapshot stays so: it gains captured clusters only when
    /// it is taken. A snapshot loaded from the media has no `snap_meta`: it is sealed.
    ///
    /// Woken by the events that end the wait: a captured entry gets its generation or is given
    /// back (`add_entry`, `abandon`), the snapshot seals or fails (`sealed`), or is deleted.
    async fn wait_sealed(&self, snap: Uuid) {
        self.until(|st| !(Self::maps_unready(st, snap) || st.snap_meta.get(&snap).is_some_and(|m| m.signal.get() == SnapshotState::Draining))).await
    }

    /// The volume records of the current state without their maps (those of `left_out` left
    /// out, see [`Self::left_out`]).
    fn heads(&self, st: &State, left_out: &HashMap<Uuid, Option<Uuid>>) -> Vec<VolumeRecord> {
        st.vols
            .values()
            .filter(|v| !left_out.contains_key(&v.rec.uuid))
            .map(|v| {
                let mut r = VolumeRecord::clone(&v.rec);
                while let Some(up) = r.parent.and_then(|p| left_out.get(&p)) {
                    r.parent = *up;
                }
                r
            })
            .collect()
    }

    /// What the next commit writes, with the next sequence number: a log record after the
    /// current one when only maps changed since the last durable state (then `Some` offset in
    /// the current slot), else a whole record for the other slot (`None`). Takes the journal.
    ///
    /// Whether only maps changed is told by the generation of the records and the name, in
    /// O(1): this runs under the state lock for every group commit of first writes, and a
    /// comparison of the records themselves cost a copy of each (see `vols`).
    fn next_record(&self, st: &mut State) -> (Vec<u8>, Option<u64>) {
        st.seq += 1;
        let left_out = self.left_out(st);
        let changes = std::mem::take(&mut st.journal);
        if left_out.is_empty() && st.last_heads.as_ref().is_some_and(|(g, n)| *g == st.vols.gen() && *n == st.name) {
            // A change of a record that did not move the generation would be lost by this log
            // record (it carries map changes only), silently until the next open.
            #[cfg(debug_assertions)]
            assert!(self.heads(st, &left_out) == st.durable_heads, "lvol store {}: a volume record changed without moving the records' generation", st.name);
            let log = LogRecord { seq: st.seq, store: self.uuid, changes }.encode();
            let padded = (log.len() as u64).div_ceil(self.block_size as u64) * self.block_size as u64;
            if st.log_at + padded <= self.slot_bytes {
                return (log, Some(st.log_at));
            }
        }
        let mut heads = self.heads(st, &left_out);
        st.last_heads = left_out.is_empty().then(|| (st.vols.gen(), st.name.clone()));
        #[cfg(debug_assertions)]
        {
            st.durable_heads = heads.clone();
        }
        for r in &mut heads {
            if let Some(v) = st.vols.get(&r.uuid) {
                r.map = v.map.iter().map(|(l, p)| (*l, *p)).collect();
            }
        }
        let rec = StoreRecord {
            seq: st.seq,
            uuid: self.uuid,
            name: st.name.clone(),
            cluster_size: self.cluster_size,
            block_size: self.block_size,
            data_start: self.data_start,
            total_clusters: self.total_clusters,
            volumes: heads,
        };
        (rec.encode(), None)
    }

    /// Writes a record (or a log record) at byte `at` of `slot`: everything written before is
    /// made durable first (data and zeroed clusters the record points to), then the record,
    /// then it is flushed.
    async fn write_slot(&self, ch: &Channel, slot: usize, at: u64, rec: Vec<u8>) -> IoResult {
        let bs = self.block_size as usize;
        // Padded in place: a whole record is 8 bytes per mapped cluster, not worth a copy.
        let mut buf = rec;
        buf.resize(buf.len().div_ceil(bs) * bs, 0);
        ch.flush().await?;
        ch.write_buf(self.slot_offset(slot) + at / bs as u64, &buf).await?;
        ch.flush().await
    }

    /// Makes every change made to the state before this call durable (group commit: one
    /// writer leads, the others wait for the commit that covers them).
    async fn commit(&self, ch: &Channel) -> IoResult {
        let gen = self.st().next_gen;
        self.wait_durable(ch, gen).await
    }

    async fn wait_durable(&self, ch: &Channel, gen: u64) -> IoResult {
        let rx = {
            let mut st = self.st();
            if st.durable_gen >= gen {
                return Ok(());
            }
            if st.committing {
                let (tx, rx) = oneshot::channel();
                st.waiters.push((gen, tx));
                Some(rx)
            } else {
                st.committing = true;
                None
            }
        };
        if let Some(rx) = rx {
            return rx.await.unwrap_or(Err(BdevError::Aborted));
        }
        let mut mine: IoResult = Ok(());
        let mut mine_done = false;
        loop {
            let (g, bytes, slot, log_at) = {
                let mut st = self.st();
                let g = st.next_gen;
                st.next_gen += 1;
                let (bytes, log_at) = self.next_record(&mut st);
                let slot = if log_at.is_some() { st.cur_slot } else { 1 - st.cur_slot };
                (g, bytes, slot, log_at)
            };
            // `check_metadata_room` keeps every record within its slot; should one still not
            // fit, writing it would overwrite the other slot (the previous state) or data.
            let padded = (bytes.len() as u64).div_ceil(self.block_size as u64) * self.block_size as u64;
            let r = if bytes.len() as u64 > self.slot_bytes {
                log::error!(
                    "lvol store {}: metadata record of {} bytes does not fit its {}-byte slot; not written",
                    self.st().name,
                    bytes.len(),
                    self.slot_bytes
                );
                Err(BdevError::NoSpace)
            } else {
                self.write_slot(ch, slot, log_at.unwrap_or(0), bytes).await
            };
            self.commits.fetch_add(1, Relaxed);
            let mut st = self.st();
            if r.is_ok() {
                st.cur_slot = slot;
                // The next log record goes after this one (or after this whole record).
                st.log_at = log_at.unwrap_or(0) + padded;
                st.durable_gen = g;
                self.publish(&mut st, g);
            } else if let Err(e) = &r {
                log::error!("lvol store {}: metadata commit failed: {e}", st.name);
                // What the failed commit took from the journal is in no record: the next
                // commit writes the whole state.
                st.last_heads = None;
            }
            if !mine_done {
                mine = r.clone();
                mine_done = true;
            }
            let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.waiters).into_iter().partition(|(wg, _)| *wg <= g);
            st.waiters = keep;
            let more = !st.waiters.is_empty();
            if !more {
                st.committing = false;
            }
            drop(st);
            for (_, tx) in done {
                let _ = tx.send(r.clone());
            }
            if !more {
                return mine;
            }
        }
    }

    /// Entries committed in generation `g` or before become visible to the data path.
    fn publish(&self, st: &mut State, g: u64) {
        let keys: Vec<(Uuid, u32)> = st.pending.iter().filter(|(_, p)| p.gen.is_some_and(|pg| pg <= g)).map(|(k, _)| *k).collect();
        if !keys.is_empty() {
            // Entries end here: a delete waiting for its volume's may go on.
            Self::notify(st);
        }
        for k in keys {
            let p = st.pending.remove(&k).expect("key listed above");
            let shared = st.refs[p.phys as usize] > 1;
            if let Some(v) = st.vols.get(&k.0) {
                v.live.set_shared(k.1, Some(p.phys), shared);
                if p.cow_from.is_none() {
                    v.live.allocated.fetch_add(1, Relaxed);
                }
            }
            if let Some(old) = p.cow_from {
                // The last reference stays (so the cluster is not reallocated) until a
                // quiesce: a read may still be using it.
                let r = &mut st.refs[old as usize];
                debug_assert!(*r > 0, "the copied cluster is still referenced by the volume's old entry");
                if *r == 1 {
                    st.limbo.push(old);
                } else {
                    *r -= 1;
                }
            }
        }
    }

    fn alloc_cluster(&self, st: &mut State, vol: Uuid, cow: bool) -> Option<u32> {
        // A copy replaces a mapped cluster: it comes from the pool, not the reservation.
        let thick_reserve = !cow && st.vols.get(&vol).is_some_and(|v| v.reserved > 0);
        if !thick_reserve && st.free_count <= st.reserved {
            return None;
        }
        // A first write adds an entry to the record (a copy replaces one): with snapshots and
        // clones sharing many clusters the record can be full before the pool is, and then
        // first writes fail as on a full pool until a delete makes room.
        if !cow && !self.record_fits(st, 0, 1) {
            return None;
        }
        // Next fit: the search goes on after the cluster allocated last, so that filling a pool
        // costs O(1) per cluster rather than a scan over every allocated one (under the lock
        // that every first write takes).
        let start = st.next_free.min(st.refs.len());
        let p = (start..st.refs.len()).chain(0..start).find(|&i| st.refs[i] == 0)?;
        st.next_free = p + 1;
        st.refs[p] = 1;
        st.free_count -= 1;
        if thick_reserve {
            let v = st.vols.get_mut(&vol).expect("checked above");
            v.reserved -= 1;
            st.reserved -= 1;
        }
        Some(p as u32)
    }

    /// Drops one reference to each cluster; those with none left return to the pool (or to
    /// their thick volume's reservation).
    fn release(&self, st: &mut State, vol: Option<Uuid>, clusters: &[u32]) {
        let mut freed = 0;
        for &p in clusters {
            let r = &mut st.refs[p as usize];
            assert!(*r > 0, "a cluster loses only references it has");
            *r -= 1;
            if *r == 0 {
                st.free_count += 1;
                freed += 1;
            }
        }
        if let Some(v) = vol.and_then(|u| st.vols.get_mut(&u)) {
            if !v.rec.thin {
                v.reserved += freed;
                st.reserved += freed;
            }
        }
    }

    /// Frees the clusters left by copy-on-writes; the caller quiesced since they got there.
    fn drain_limbo(&self, st: &mut State, limbo: Vec<u32>) {
        self.release(st, None, &limbo);
    }

    /// Waits until no I/O that could have seen the maps before this call is in flight.
    async fn quiesce(&self) {
        let limbo = std::mem::take(&mut self.st().limbo);
        self.quiesce_only().await;
        let mut st = self.st();
        self.drain_limbo(&mut st, limbo);
    }

    async fn quiesce_only(&self) {
        loop {
            match self.tracker.advance() {
                Ok((_, sealing)) => {
                    // A copy-on-write for a snapshot whose own advance was refused (too many
                    // preserves draining) waits for an advance past its epoch (`copy_cluster`).
                    Self::notify(&mut self.st());
                    let _ = sealing.await;
                    return;
                }
                // Too many epochs still draining: the seal that makes room wakes us.
                Err(_) => self.tracker.advance_possible().await,
            }
        }
    }

    async fn zero(&self, ch: &Channel, block: u64, count: u64) -> IoResult {
        if ch.supports(IoType::WriteZeroes) {
            return ch.write_zeroes(block, count).await;
        }
        let buf = vec![0u8; (count * self.block_size as u64) as usize];
        ch.write_buf(block, &buf).await
    }

    /// Settles, without waiting, what a write to `logical` of volume `vol` does: write in place
    /// (mapped and not shared), fill a new cluster of its own (a first write, or a copy of a
    /// shared cluster: the pending entry is made here), or wait for another writer's fill.
    fn plan_piece(&self, st: &mut State, vol: &VolLive, uuid: Uuid, logical: u32) -> Result<Role, BdevError> {
        let cow_epoch = st.cow_epoch;
        Ok(match (vol.lookup_shared(logical as u64), st.pending.get_mut(&(uuid, logical))) {
            (Some((p, false)), _) => Role::Mapped(p),
            // Captured by a snapshot while pending: wait for the publish, then copy.
            (_, Some(p)) if p.captured => Role::WaitPublish(p.gen),
            (_, Some(p)) if p.ready => Role::Ready(p.phys),
            (_, Some(p)) => {
                let (tx, rx) = oneshot::channel();
                p.ready_waiters.push(tx);
                Role::WaitFill { phys: p.phys, seal_wait: p.seal_wait, rx }
            }
            // A volume being deleted takes no new cluster: its delete waits only for the
            // entries there are (an entry made after it dropped the volume's map would be
            // published into a volume that is gone, its cluster never freed).
            (_, None) if vol.deleting.load(Relaxed) => return Err(BdevError::Aborted),
            (shared, None) => {
                let from = shared.map(|(p, _)| p);
                let phys = self.alloc_cluster(st, uuid, from.is_some()).ok_or(BdevError::NoSpace)?;
                let seal_wait = from.map(|_| cow_epoch);
                st.pending
                    .insert((uuid, logical), Pending { phys, ready: false, ready_waiters: Vec::new(), gen: None, cow_from: None, captured: false, seal_wait });
                Role::Fill { phys, from, cow_epoch }
            }
        })
    }

    /// Zeroes or copies the cluster of a pending entry this writer made in [`Self::plan_piece`]
    /// and marks it ready (or, on failure, gives it back: its waiters plan again).
    async fn fill(&self, ch: &Channel, uuid: Uuid, logical: u32, phys: u32, from: Option<u32>, cow_epoch: u64, ticket: &mut Option<EpochTicket>) -> IoResult {
        let r = match from {
            None => self.zero(ch, self.cluster_block(phys), self.blocks_per_cluster()).await,
            Some(src) => self.copy_cluster(ch, src, phys, cow_epoch, ticket).await,
        };
        let mut st = self.st();
        match r {
            Ok(()) => {
                if from.is_some() {
                    if let Some(v) = st.vols.get(&uuid) {
                        v.live.copies.fetch_add(1, Relaxed);
                    }
                }
                let p = st.pending.get_mut(&(uuid, logical)).expect("only its filler removes a pending entry before it is ready");
                p.ready = true;
                for w in p.ready_waiters.drain(..) {
                    let _ = w.send(());
                }
                Ok(())
            }
            Err(e) => {
                self.abandon(&mut st, uuid, logical);
                Err(e)
            }
        }
    }

    /// Gives back the cluster of a pending entry its filler will not fill; waiters retry (and
    /// try to allocate again).
    ///
    /// A snapshot that captured the entry maps its cluster already, and the cluster was never
    /// zeroed or copied into: left there, the snapshot (and, once its record is durable, the
    /// store after a restart) would read whatever a freed cluster held before, another
    /// volume's old data. The write failed, so the snapshot's image at `logical` is what the
    /// volume held before it: the cluster the volume still maps there (a copy-on-write's
    /// source), or nothing (zeroes) for a first write. Each capturing snapshot is set back to
    /// that, and the cluster goes back to the pool with its last reference.
    fn abandon(&self, st: &mut State, uuid: Uuid, logical: u32) {
        let Some(p) = st.pending.remove(&(uuid, logical)) else { return };
        drop(p.ready_waiters);
        // The entry ends: a snapshot, a delete or a write waiting for it goes on.
        Self::notify(st);
        if p.captured {
            // The entry never had a generation (its data was never written, `add_entry` was
            // not called), so the volume's map still holds the image's entry at `logical`.
            assert!(p.gen.is_none(), "an abandoned entry was never added to a map");
            let prior = st.vols.get(&uuid).and_then(|v| v.map.get(&logical).copied());
            let holders: Vec<Uuid> = st.vols.values().filter(|v| v.rec.uuid != uuid && v.map.get(&logical) == Some(&p.phys)).map(|v| v.rec.uuid).collect();
            for h in &holders {
                // Only a snapshot maps a captured cluster before it is ready: a clone or a
                // revert of one waits for its seal (`wait_sealed`).
                debug_assert!(st.vols.get(h).is_some_and(|v| v.rec.snapshot), "only a snapshot maps an unready captured cluster");
                match prior {
                    Some(q) => {
                        st.vols.map_insert(h, logical, q);
                        st.refs[q as usize] += 1;
                    }
                    None => {
                        st.vols.map_remove(h, logical);
                    }
                }
                if let Some(v) = st.vols.get(h) {
                    v.live.set_shared(logical, prior, true);
                    if prior.is_none() {
                        v.live.allocated.fetch_sub(1, Relaxed);
                    }
                }
            }
            // Those snapshots were left out of every record while the entry was unready (see
            // `left_out`), so their maps changed here need no log record; the next commit
            // writes the whole state all the same, so that nothing depends on that reasoning.
            st.last_heads = None;
            let dropped = vec![p.phys; holders.len()];
            self.release(st, None, &dropped);
        }
        self.release(st, Some(uuid), &[p.phys]);
        debug_assert!(!p.captured || st.refs[p.phys as usize] == 0, "an abandoned captured cluster has no reference left");
    }

    /// The physical cluster for a write to `logical` of volume `vol`, and whether it is a new
    /// (pending) one: allocated and zeroed for a first write, or a copy of a shared cluster.
    /// The caller holds `ticket`; every wait here on another writer or on a seal gives it up
    /// and takes a new one (the write then belongs to the epoch after the wait).
    async fn cluster_for_write(
        &self,
        ch: &Channel,
        vol: &Arc<VolLive>,
        uuid: Uuid,
        logical: u32,
        ticket: &mut Option<EpochTicket>,
    ) -> Result<(u32, bool), BdevError> {
        loop {
            let role = self.plan_piece(&mut self.st(), vol, uuid, logical)?;
            match role {
                Role::Mapped(p) => return Ok((p, false)),
                Role::Ready(p) => return Ok((p, true)),
                Role::WaitFill { rx, .. } => {
                    // Not holding our ticket while we wait: the one we wait for may be waiting
                    // for the seal of our epoch.
                    log::debug!("lvol {uuid}: a write to cluster {logical} waits, without its ticket, for another writer's fill");
                    self.leave(ticket);
                    let _ = rx.await;
                    *ticket = Some(self.tracker.enter());
                }
                Role::WaitPublish(gen) => {
                    // The known exception to the strict snapshot rule (see `src/sim/lvol.rs`): a
                    // snapshot taken during this wait does not hold this piece of the write.
                    log::debug!("lvol {uuid}: a write to cluster {logical} waits, without its ticket, for a captured entry's publish");
                    self.leave(ticket);
                    match gen {
                        // Its writer may commit only once its whole write is done, which may
                        // wait for this one: commit it here.
                        Some(gen) => self.wait_durable(ch, gen).await?,
                        // Not written yet: planned again once its writer gives it a generation
                        // (`add_entry`) or gives it back (`abandon`).
                        None => self.until(|st| !st.pending.get(&(uuid, logical)).is_some_and(|p| p.captured && p.gen.is_none())).await,
                    }
                    *ticket = Some(self.tracker.enter());
                }
                // What a write's own plan turns a `Fill` into, never what a plan returns.
                Role::Filled(_) | Role::Abandoned => unreachable!("plan_piece returned a finished role"),
                Role::Fill { phys, from, cow_epoch } => {
                    self.fill(ch, uuid, logical, phys, from, cow_epoch, ticket).await?;
                    return Ok((phys, true));
                }
            }
        }
    }

    fn leave(&self, ticket: &mut Option<EpochTicket>) {
        if let Some(t) = ticket.take() {
            self.tracker.exit(t);
        }
    }

    /// Copies shared cluster `src` to `dst` for a copy-on-write, once the writes submitted
    /// before the snapshot that shared it have landed (the seal of `cow_epoch`).
    async fn copy_cluster(&self, ch: &Channel, src: u32, dst: u32, cow_epoch: u64, ticket: &mut Option<EpochTicket>) -> IoResult {
        if !self.tracker.is_sealed(cow_epoch) {
            // Our ticket may be of that very epoch: give it up while we wait.
            log::debug!("lvol: a copy of cluster {src} waits, without its ticket, for the seal of epoch {cow_epoch}");
            self.leave(ticket);
            // The snapshot closes `cow_epoch` in the poll that shares the cluster, unless too
            // many preserves are draining: then with its later advance, before which nothing
            // can seal it (`drained` may only wait for a closed epoch).
            self.until(|_| self.tracker.current() > cow_epoch).await;
            self.tracker.drained(cow_epoch).await;
            *ticket = Some(self.tracker.enter());
        }
        // A cluster is at most 1 MiB in the usual setups: from the core's buffer pool, as the
        // other copies are, rather than a zeroed heap allocation per copy (read over whole).
        let mut buf = IoBuf::alloc(self.cluster_size as usize);
        ch.read_buf(self.cluster_block(src), &mut buf).await?;
        ch.write_buf(self.cluster_block(dst), &buf).await
    }

    /// After a first write's data is written to `phys`: the entry joins the record; returns
    /// the generation to wait for. The entry must still be the one for `phys`: once another
    /// writer published it, a copy-on-write may have put a new entry under the same key, which
    /// is not ready yet and is its own filler's to add (None: ours is durable already).
    fn add_entry(&self, uuid: Uuid, logical: u32, phys: u32) -> Option<u64> {
        let mut st = self.st();
        let next = st.next_gen;
        let (phys, gen) = {
            let p = st.pending.get_mut(&(uuid, logical)).filter(|p| p.phys == phys)?;
            if p.gen.is_some() {
                return p.gen;
            }
            p.gen = Some(next);
            (p.phys, p.gen)
        };
        // Written: a snapshot waiting for its captured entries, a write waiting to copy this
        // one or a delete waiting for its volume's entries goes on (to wait for the commit).
        Self::notify(&mut st);
        // A copy-on-write displaces the shared cluster; its reference goes at the publish.
        let displaced = st.vols.map_insert(&uuid, logical, phys);
        st.journal.push(MapChange { vol: uuid, logical, phys: Some(phys) });
        if let Some(p) = st.pending.get_mut(&(uuid, logical)) {
            p.cow_from = displaced;
        }
        gen
    }

    /// Removes `logical` clusters from volume `uuid`'s map (unmap of whole clusters, shrink,
    /// delete), commits, waits for the I/O that may still use them, then frees them.
    /// With `keep_pending` (unmap), a cluster with a first write or a copy pending is not
    /// dropped but listed there (the caller zeroes it through the write path): dropping it
    /// would not stop the entry's publish, which maps the cluster again, and a copy brings the
    /// unmapped data back.
    async fn drop_clusters(&self, ch: &Channel, uuid: Uuid, logicals: impl Iterator<Item = u32>, keep_pending: Option<&mut Vec<u32>>) -> IoResult {
        let freed = self.unmap_now(uuid, logicals, keep_pending);
        self.release_dropped(ch, uuid, freed).await
    }

    /// The first half of [`Self::drop_clusters`], without waiting: the clusters leave the maps
    /// (read as zeros from here on); returns the physical clusters to release.
    fn unmap_now(&self, uuid: Uuid, logicals: impl Iterator<Item = u32>, mut keep_pending: Option<&mut Vec<u32>>) -> Vec<u32> {
        let mut guard = self.st();
        let st = &mut *guard;
        let Some(live) = st.vols.get(&uuid).map(|v| v.live.clone()) else { return Vec::new() };
        let mut freed = Vec::new();
        for l in logicals {
            if let Some(kept) = keep_pending.as_deref_mut() {
                if st.pending.contains_key(&(uuid, l)) {
                    kept.push(l);
                    continue;
                }
            }
            if let Some(p) = st.vols.map_remove(&uuid, l) {
                st.journal.push(MapChange { vol: uuid, logical: l, phys: None });
                if live.lookup(l as u64) == Some(p) {
                    live.set(l, None);
                    live.allocated.fetch_sub(1, Relaxed);
                }
                freed.push(p);
            }
        }
        freed
    }

    /// The second half of [`Self::drop_clusters`]: commits, waits for the I/O that may still
    /// use the clusters, then frees them.
    async fn release_dropped(&self, ch: &Channel, uuid: Uuid, freed: Vec<u32>) -> IoResult {
        if freed.is_empty() {
            return Ok(());
        }
        let r = self.commit(ch).await;
        // Even if the commit failed the clusters are out of the in-memory maps and the next
        // commit records that; they are reused only once no I/O can use them.
        self.quiesce().await;
        let mut st = self.st();
        self.release(&mut st, Some(uuid), &freed);
        r
    }

    /// Creates a volume; returns its live state (the caller registers the bdev).
    async fn create_volume(&self, ch: &Channel, name: &str, size_bytes: u64, thin: bool, clear_method: u8) -> Result<(Uuid, Arc<VolLive>), LvolError> {
        let clusters = clusters_for(size_bytes, self.cluster_size);
        let uuid = new_uuid();
        let live = {
            let mut st = self.st();
            self.check_new(&st, "lvol_name", name)?;
            self.check_metadata_room(&st, "lvol_name", 1, 0)?;
            if !thin && clusters > st.free_count - st.reserved {
                return Err(LvolError::NoSpace(format!(
                    "field `size_in_mib`: a thick volume of {clusters} clusters does not fit in the {} free clusters of lvol store {}",
                    st.free_count - st.reserved,
                    st.name
                )));
            }
            let live = VolLive::new(clusters, size_bytes / self.block_size as u64, false);
            let rec =
                VolumeRecord { uuid, name: name.to_string(), size_bytes, thin, read_only: false, clear_method, snapshot: false, parent: None, map: Vec::new() };
            let reserved = if thin { 0 } else { clusters };
            st.reserved += reserved;
            st.vols.insert(VolState { rec: Head::new(rec), map: BTreeMap::new(), live: live.clone(), reserved });
            live
        };
        if let Err(e) = self.commit(ch).await {
            let mut st = self.st();
            if let Some(v) = st.vols.remove(&uuid) {
                st.reserved -= v.reserved;
            }
            return Err(e.into());
        }
        Ok((uuid, live))
    }

    /// Whether volume `uuid` may be deleted: a snapshot with more than one clone may not (as
    /// SPDK; with one, the clone takes the snapshot's parent).
    pub fn check_delete(&self, uuid: Uuid, field: &str) -> Result<(), LvolError> {
        let st = self.st();
        let clones: Vec<&str> = st.vols.values().filter(|v| v.rec.parent == Some(uuid)).map(|v| v.rec.name.as_str()).collect();
        if clones.len() > 1 {
            return Err(LvolError::Busy(format!("field `{field}`: snapshot has clones {}; delete, inflate or decouple them first", clones.join(", "))));
        }
        Ok(())
    }

    /// Removes a volume (its bdev is already unregistered) and frees its clusters (those no
    /// other volume shares).
    ///
    /// A write still in flight (its bdev is gone, its channel is not) may have first writes or
    /// copies pending: the delete waits for them to end (published, or given back) before it
    /// touches the map, and no new one starts. Dropped first, the map would have no entry left
    /// where a copy-on-write's source was, so a failed fill (`abandon`) would set a snapshot
    /// that captured the entry to zeroes instead of that source (issue #14's leftover, test
    /// `a_volume_deleted_while_a_captured_write_is_pending_leaves_the_snapshot_its_image`); and
    /// one that succeeds would publish an entry of a volume that is gone (a cluster never freed,
    /// and a log record naming a volume the store no longer holds, which fails the next open).
    async fn delete_volume(&self, ch: &Channel, uuid: Uuid) -> Result<(), LvolError> {
        self.check_delete(uuid, "name")?;
        {
            let st = self.st();
            let v = st.vols.get(&uuid).ok_or_else(|| LvolError::NotFound(format!("no lvol {uuid}")))?;
            v.live.deleting.store(true, Relaxed);
        }
        loop {
            let gens: Option<Vec<Option<u64>>> = {
                let st = self.st();
                let g: Vec<Option<u64>> = st.pending.iter().filter(|((u, _), _)| *u == uuid).map(|(_, p)| p.gen).collect();
                (!g.is_empty()).then_some(g)
            };
            let Some(gens) = gens else { break };
            match gens.into_iter().flatten().max() {
                // Written and in a record not yet durable: its writer commits it, but should
                // that commit have failed, nothing else would publish it.
                Some(g) => self.wait_durable(ch, g).await?,
                // None written yet: until one is (`add_entry`) or all ended (`abandon`,
                // `publish`), as the loop would decide again.
                None => {
                    self.until(|st| {
                        let mut mine = st.pending.iter().filter(|((u, _), _)| *u == uuid).map(|(_, p)| p.gen);
                        mine.clone().next().is_none() || mine.any(|g| g.is_some())
                    })
                    .await
                }
            }
        }
        let logicals: Vec<u32> = {
            let st = self.st();
            let v = st.vols.get(&uuid).ok_or_else(|| LvolError::NotFound(format!("no lvol {uuid}")))?;
            v.map.keys().copied().collect()
        };
        self.drop_clusters(ch, uuid, logicals.into_iter(), None).await?;
        {
            let mut st = self.st();
            st.snap_meta.remove(&uuid);
            // A clone or revert waiting for this snapshot's seal finds it gone.
            Self::notify(&mut st);
            if let Some(v) = st.vols.remove(&uuid) {
                st.reserved -= v.reserved;
                let children: Vec<Uuid> = st.vols.values().filter(|c| c.rec.parent == Some(uuid)).map(|c| c.rec.uuid).collect();
                for c in children {
                    if let Some(r) = st.vols.rec_mut(&c) {
                        r.parent = v.rec.parent;
                    }
                }
            }
            self.unshare_single(&mut st);
        }
        self.commit(ch).await?;
        Ok(())
    }

    /// Clears the shared bit of clusters only one volume still maps (their writes go in place
    /// again). Not for a cluster with a copy pending: that copy goes on.
    fn unshare_single(&self, st: &mut State) {
        for v in st.vols.values() {
            for (&l, &p) in &v.map {
                if st.refs[p as usize] == 1 && v.live.lookup_shared(l as u64) == Some((p, true)) && !st.pending.contains_key(&(v.rec.uuid, l)) {
                    v.live.set_shared(l, Some(p), false);
                }
            }
        }
    }

    /// Whether the metadata record still fits its slot once `volumes` volumes and `entries`
    /// map entries are added. The slot holds one entry per cluster plus the volume records
    /// (layout::slot_bytes), so without sharing it always fits; snapshots and clones map shared
    /// clusters again and use what unused volume records leave.
    fn record_fits(&self, st: &State, volumes: usize, entries: u64) -> bool {
        // Pending entries (first writes and copies under way) are counted too: each may join
        // the record (a copy's replaces one, so this errs on the safe side).
        let mapped = st.vols.mapped() + st.pending.len() as u64;
        layout::record_bound(st.vols.len() + volumes, mapped + entries) <= self.slot_bytes
    }

    /// [`Store::record_fits`] for an RPC: refused with ENOSPC naming the metadata, before
    /// anything changes.
    fn check_metadata_room(&self, st: &State, field: &str, volumes: usize, entries: u64) -> Result<(), LvolError> {
        if self.record_fits(st, volumes, entries) {
            return Ok(());
        }
        let mapped = st.vols.mapped() + st.pending.len() as u64;
        Err(LvolError::NoSpace(format!(
            "field `{field}`: the metadata of lvol store {} has no room for {volumes} more volume(s) and {entries} more cluster references \
             ({} volumes and {mapped} references now: snapshots and clones count each shared cluster again); delete snapshots or clones first",
            st.name,
            st.vols.len()
        )))
    }

    /// Checks a new volume's name and the volume count (under the state lock).
    fn check_new(&self, st: &State, field: &str, name: &str) -> Result<(), LvolError> {
        if st.vols.len() >= layout::MAX_VOLUMES {
            return Err(LvolError::NoSpace(format!("lvol store {} holds {} volumes, the most it can", st.name, layout::MAX_VOLUMES)));
        }
        if st.vols.values().any(|v| v.rec.name == name) {
            return Err(LvolError::Exists(format!("field `{field}`: lvol {name} already exists in lvol store {}", st.name)));
        }
        Ok(())
    }

    /// Adds a volume sharing every cluster of `map` (a snapshot or a clone).
    fn add_sharing(&self, st: &mut State, rec: VolumeRecord, map: BTreeMap<u32, u32>) -> Arc<VolLive> {
        let live = VolLive::new(clusters_for(rec.size_bytes, self.cluster_size), rec.size_bytes / self.block_size as u64, rec.read_only);
        for (&l, &p) in &map {
            st.refs[p as usize] += 1;
            live.set_shared(l, Some(p), true);
        }
        live.allocated.store(map.len() as u64, Relaxed);
        st.vols.insert(VolState { rec: Head::new(rec), map, live: live.clone(), reserved: 0 });
        live
    }

    /// `bdev_lvol_snapshot`: a read-only volume `name` with the image of volume `uuid`, no
    /// data copied and no I/O paused (DESIGN §1's epoch rule, §7). The clusters become shared
    /// at once, so every write from here on copies its cluster first; the epoch then closes and
    /// the reply waits for its seal (every write submitted before has landed, including first
    /// writes whose clusters the snapshot captured while pending) and for the commit.
    async fn snapshot(&self, ch: &Channel, uuid: Uuid, name: &str) -> Result<(Uuid, Arc<VolLive>), LvolError> {
        let snap = new_uuid();
        let (live, captured) = {
            let mut st = self.st();
            self.check_new(&st, "snapshot_name", name)?;
            let v = st.vols.get(&uuid).ok_or_else(|| LvolError::NotFound(format!("field `lvol_name`: no lvol {uuid}")))?;
            if v.rec.snapshot {
                return Err(LvolError::Invalid(format!("field `lvol_name`: lvol {} is a snapshot already (clone it, then snapshot the clone)", v.rec.name)));
            }
            let captured = st.pending.keys().filter(|(u, _)| *u == uuid).count() as u64;
            self.check_metadata_room(&st, "snapshot_name", 1, v.map.len() as u64 + captured)?;
            let mut map = v.map.clone();
            let rec = VolumeRecord {
                uuid: snap,
                name: name.to_string(),
                size_bytes: v.rec.size_bytes,
                thin: true,
                read_only: true,
                clear_method: v.rec.clear_method,
                snapshot: true,
                parent: v.rec.parent,
                map: Vec::new(),
            };
            for (&l, &p) in &v.map {
                v.live.set_shared(l, Some(p), true);
            }
            let mut captured = Vec::new();
            for ((u, l), p) in st.pending.iter_mut() {
                if *u == uuid {
                    p.captured = true;
                    map.insert(*l, p.phys);
                    captured.push(*l);
                }
            }
            st.cow_epoch = self.tracker.current();
            log::trace!("lvol {uuid}: snapshot {name}: map {map:?}, captured {captured:?}, epoch {}", st.cow_epoch);
            if let Some(r) = st.vols.rec_mut(&uuid) {
                r.parent = Some(snap);
            }
            let meta = SnapMeta {
                origin: uuid,
                created_ms: crate::preserve::unix_ms(),
                signal: SealSignal::new(),
                started: std::time::Instant::now(),
                time_to_seal_ns: None,
            };
            st.snap_meta.insert(snap, meta);
            (self.add_sharing(&mut st, rec, map), captured)
        };
        self.quiesce_only().await;
        // A captured first write holds its ticket until its data is written, but one that
        // gave it up to wait (see cluster_for_write) may still be writing: wait for its entry.
        // Woken where such an entry gets its generation (`add_entry`) or is given back.
        self.until(|st| !captured.iter().any(|l| st.pending.get(&(uuid, *l)).is_some_and(|p| p.gen.is_none()))).await;
        let r = self.commit(ch).await;
        self.sealed(snap, r.is_ok());
        r?;
        Ok((snap, live))
    }

    /// Snapshot `snap` is sealed (its image whole and its record durable) or failed (its
    /// commit did not make it durable).
    fn sealed(&self, snap: Uuid, ok: bool) {
        let mut st = self.st();
        let Some(m) = st.snap_meta.get_mut(&snap) else { return };
        let origin = m.origin;
        let ns = m.started.elapsed().as_nanos() as u64;
        if ok {
            m.time_to_seal_ns = Some(ns);
        }
        let signal = m.signal.clone();
        if let Some(v) = st.vols.get(&origin) {
            if ok {
                v.live.seal_latency.record(ns);
            } else {
                v.live.snaps_failed.fetch_add(1, Relaxed);
            }
        }
        drop(st);
        signal.set(if ok { SnapshotState::Sealed } else { SnapshotState::Failed });
        // After the set: a clone or revert in `wait_sealed` reads the signal under the lock.
        Self::notify(&mut self.st());
    }

    /// `bdev_lvol_clone`: a thin writable volume `name` sharing every cluster of snapshot `snap`.
    async fn clone_volume(&self, ch: &Channel, snap: Uuid, snap_name: &str, name: &str) -> Result<(Uuid, Arc<VolLive>), LvolError> {
        let uuid = new_uuid();
        // A clone of a snapshot not yet sealed waits for its image (see `wait_sealed`).
        self.wait_sealed(snap).await;
        let live = {
            let mut st = self.st();
            self.check_new(&st, "clone_name", name)?;
            let s = st.vols.get(&snap).ok_or_else(|| LvolError::NotFound(format!("field `snapshot_name`: no lvol {snap_name}")))?;
            if !s.rec.snapshot {
                return Err(LvolError::Invalid(format!("field `snapshot_name`: lvol {snap_name} is not a snapshot (clone a snapshot of it)")));
            }
            assert!(!Self::maps_unready(&st, snap), "a snapshot, once its captured clusters are ready, gains no unready one");
            self.check_metadata_room(&st, "clone_name", 1, s.map.len() as u64)?;
            let rec = VolumeRecord {
                uuid,
                name: name.to_string(),
                size_bytes: s.rec.size_bytes,
                thin: true,
                read_only: false,
                clear_method: s.rec.clear_method,
                snapshot: false,
                parent: Some(snap),
                map: Vec::new(),
            };
            let map = s.map.clone();
            self.add_sharing(&mut st, rec, map)
        };
        if let Err(e) = self.commit(ch).await {
            let mut st = self.st();
            if let Some(v) = st.vols.remove(&uuid) {
                let cl: Vec<u32> = v.map.values().copied().collect();
                self.release(&mut st, None, &cl);
            }
            return Err(e.into());
        }
        Ok((uuid, live))
    }

    /// `bdev_lvol_decouple_parent`: the volume no longer reads through its snapshot but
    /// through the snapshot's parent. Shared clusters are reference-counted, so nothing is
    /// copied: the snapshot can then be deleted and the clusters stay while the volume maps them.
    async fn decouple(&self, ch: &Channel, uuid: Uuid, field: &str) -> Result<(), LvolError> {
        {
            let mut st = self.st();
            let parent = st.vols.get(&uuid).ok_or_else(|| LvolError::NotFound(format!("field `{field}`: no lvol {uuid}")))?.rec.parent;
            let Some(parent) = parent else {
                return Err(LvolError::Invalid(format!("field `{field}`: lvol has no parent snapshot")));
            };
            let grand = st.vols.get(&parent).and_then(|p| p.rec.parent);
            if let Some(r) = st.vols.rec_mut(&uuid) {
                r.parent = grand;
            }
        }
        self.commit(ch).await?;
        Ok(())
    }

    /// `bdev_lvol_inflate`: every cluster of the volume becomes its own (shared ones copied,
    /// unallocated ones allocated and zeroed), then the parent link goes.
    async fn inflate(&self, ch: &Channel, uuid: Uuid) -> Result<(), LvolError> {
        let live = self.live(uuid).ok_or_else(|| LvolError::NotFound(format!("field `name`: no lvol {uuid}")))?;
        // The volume's clusters, not the live map's: a shrink keeps the larger map, and a
        // cluster past the end in the record makes the store fail to open.
        let clusters = self.st().vols.get(&uuid).map_or(0, |v| clusters_for(v.rec.size_bytes, self.cluster_size));
        for l in 0..clusters.min(live.capacity()) as u32 {
            if live.lookup_shared(l as u64).is_some_and(|(_, shared)| !shared) {
                continue;
            }
            let mut ticket = Some(self.tracker.enter());
            let r = self.cluster_for_write(ch, &live, uuid, l, &mut ticket).await;
            if let Some(t) = ticket {
                self.tracker.exit(t);
            }
            if let (phys, true) = r? {
                if let Some(gen) = self.add_entry(uuid, l, phys) {
                    self.wait_durable(ch, gen).await?;
                }
            }
        }
        let mut st = self.st();
        if let Some(r) = st.vols.rec_mut(&uuid) {
            r.parent = None;
        }
        drop(st);
        self.commit(ch).await?;
        Ok(())
    }

    /// `bdev_lvol_revert`: volume `uuid` takes snapshot `snap`'s content in one commit, no
    /// data copied (its clusters become shared with the snapshot); its old clusters are freed
    /// once no I/O can use them.
    async fn revert(&self, ch: &Channel, uuid: Uuid, snap: Uuid) -> Result<(), LvolError> {
        // As a clone: the volume must not take clusters the snapshot's image is not in yet.
        self.wait_sealed(snap).await;
        let old: Vec<u32> = {
            let mut st = self.st();
            let s = st.vols.get(&snap).ok_or_else(|| LvolError::NotFound(format!("field `snapshot_name`: no lvol {snap}")))?;
            if !s.rec.snapshot {
                return Err(LvolError::Invalid("field `snapshot_name`: not a snapshot".into()));
            }
            assert!(!Self::maps_unready(&st, snap), "a snapshot, once its captured clusters are ready, gains no unready one");
            let (smap, ssize) = (s.map.clone(), s.rec.size_bytes);
            let v = st.vols.get(&uuid).ok_or_else(|| LvolError::NotFound(format!("field `name`: no lvol {uuid}")))?;
            if v.rec.snapshot {
                return Err(LvolError::Invalid("field `name`: a snapshot is read-only; revert a writable volume".into()));
            }
            if v.rec.size_bytes != ssize {
                return Err(LvolError::Invalid(format!(
                    "field `snapshot_name`: the snapshot is {ssize} bytes, the volume {}; resize it first",
                    v.rec.size_bytes
                )));
            }
            if st.pending.keys().any(|(u, _)| *u == uuid) {
                return Err(LvolError::Busy("field `name`: the volume has first writes in flight; retry".into()));
            }
            // Its own entries go once the commit is durable; the record holds the snapshot's.
            self.check_metadata_room(&st, "snapshot_name", 0, (smap.len() as u64).saturating_sub(v.map.len() as u64))?;
            for &p in smap.values() {
                st.refs[p as usize] += 1;
            }
            let v = st.vols.get(&uuid).expect("looked up above");
            let old: Vec<u32> = v.map.values().copied().collect();
            for &l in v.map.keys() {
                v.live.set(l, None);
            }
            for (&l, &p) in &smap {
                v.live.set_shared(l, Some(p), true);
            }
            v.live.allocated.store(smap.len() as u64, Relaxed);
            st.vols.set_map(&uuid, smap);
            if let Some(r) = st.vols.rec_mut(&uuid) {
                r.parent = Some(snap);
            }
            // The whole map changed: the commit writes a whole record, not a log of it.
            st.last_heads = None;
            old
        };
        let r = self.commit(ch).await;
        self.quiesce().await;
        let mut st = self.st();
        self.release(&mut st, Some(uuid), &old);
        self.unshare_single(&mut st);
        drop(st);
        Ok(r?)
    }

    /// Changes one volume's record (rename, read-only; its live state given beside) and commits.
    async fn update_volume(&self, ch: &Channel, uuid: Uuid, f: impl FnOnce(&mut VolumeRecord, &VolLive) -> Result<(), LvolError>) -> Result<(), LvolError> {
        {
            let mut st = self.st();
            let live = st.vols.get(&uuid).ok_or_else(|| LvolError::NotFound(format!("no lvol {uuid}")))?.live.clone();
            let rec = st.vols.rec_mut(&uuid).expect("looked up above, under the same lock");
            f(rec, &live)?;
        }
        self.commit(ch).await?;
        Ok(())
    }

    async fn rename(&self, ch: &Channel, new: &str) -> Result<(), LvolError> {
        self.st().name = new.to_string();
        self.commit(ch).await?;
        Ok(())
    }

    /// Resizes a volume: growing swaps in a larger map; shrinking below allocated clusters is
    /// refused unless `force`, which frees them.
    async fn resize(&self, ch: &Channel, uuid: Uuid, size_bytes: u64, force: bool) -> Result<(), LvolError> {
        let clusters = clusters_for(size_bytes, self.cluster_size);
        let (beyond, old_map) = {
            let mut st = self.st();
            let free = st.free_count - st.reserved;
            let v = st.vols.get_mut(&uuid).ok_or_else(|| LvolError::NotFound(format!("no lvol {uuid}")))?;
            let old_clusters = clusters_for(v.rec.size_bytes, self.cluster_size);
            let beyond: Vec<u32> = v.map.range(clusters.min(u32::MAX as u64) as u32..).map(|(l, _)| *l).collect();
            if !beyond.is_empty() && !force {
                return Err(LvolError::Invalid(format!(
                    "field `size_in_mib`: {} allocated clusters lie beyond the new size; give `force` to drop their data",
                    beyond.len()
                )));
            }
            let mut add_reserve = 0;
            if !v.rec.thin && clusters > old_clusters {
                add_reserve = clusters - old_clusters;
                if add_reserve > free {
                    return Err(LvolError::NoSpace(format!("field `size_in_mib`: growing needs {add_reserve} clusters, lvol store has {free} free")));
                }
            }
            v.reserved += add_reserve;
            let live = v.live.clone();
            // A larger map replaces the old one under the state lock (entries are set only under it).
            let old_map = if clusters > live.capacity() {
                let new = LiveMap::new(clusters);
                // Entries as they are live (shared bit included; entries not yet published stay
                // unpublished: their publish sets them in the new map).
                // SAFETY: as in `VolLive::set`: under the state lock.
                let old = unsafe { &*live.map.load(Acquire) };
                for i in 0..old.len.min(new.len) {
                    if let Some(v) = old.get(i).map(|o| o.load(Acquire)).filter(|v| *v != 0) {
                        if let Some(n) = new.get_or_alloc(i) {
                            n.store(v, Relaxed);
                        }
                    }
                }
                Some(live.map.swap(Box::into_raw(new), AcqRel))
            } else {
                None
            };
            // After the swap: an I/O that sees the new size sees the new map. A shrink refuses
            // I/O past the new end from here on, before its clusters are dropped.
            live.num_blocks.set(size_bytes / self.block_size as u64);
            if let Some(r) = st.vols.rec_mut(&uuid) {
                r.size_bytes = size_bytes;
            }
            st.reserved += add_reserve;
            (beyond, old_map)
        };
        if let Some(old) = old_map {
            self.quiesce().await;
            // SAFETY: swapped out above; the sealed epoch means no I/O holds it any more.
            drop(unsafe { Box::from_raw(old) });
        }
        if !beyond.is_empty() {
            self.drop_clusters(ch, uuid, beyond.into_iter(), None).await?;
        }
        {
            // A thick volume that shrank gives back the reservation of the clusters it lost.
            let mut st = self.st();
            let Some(v) = st.vols.get_mut(&uuid) else { return Ok(()) };
            if !v.rec.thin {
                let want = clusters.saturating_sub(v.map.len() as u64);
                if v.reserved > want {
                    let d = v.reserved - want;
                    v.reserved = want;
                    st.reserved -= d;
                }
            }
        }
        self.commit(ch).await?;
        Ok(())
    }

    /// Lists the volumes: (uuid, record with its allocated count in `map.len()`).
    pub fn volumes(&self) -> Vec<(VolumeRecord, u64)> {
        self.st().vols.values().map(|v| (v.rec.clone(), v.map.len() as u64)).collect()
    }

    fn live(&self, uuid: Uuid) -> Option<Arc<VolLive>> {
        self.st().vols.get(&uuid).map(|v| v.live.clone())
    }

    /// Sets the anchor (see the module comment): the claim on the base is by its name.
    fn set_anchor(&self, anchor: Option<Uuid>) -> Result<(), LvolError> {
        let mut st = self.st();
        if st.anchor == anchor && st.claim.is_some() {
            return Ok(());
        }
        st.claim = None;
        let by = anchor.map_or_else(|| format!("lvs:{}", st.name), |u| u.to_string());
        st.claim = Some(self.base.claim(&by).map_err(|e| LvolError::Busy(e.to_string()))?);
        st.anchor = anchor;
        Ok(())
    }

    pub fn anchor(&self) -> Option<Uuid> {
        self.st().anchor
    }

    /// Creates a store on `base` (claimed by the caller, guard given here).
    pub async fn create(base: HoldGuard, name: &str, cluster_size: u64, cores: usize) -> Result<Arc<Store>, LvolError> {
        Ok(Self::create_or_open(base, name, cluster_size, cores, false).await?.0)
    }

    /// Creates a store on `base`, or, with `open_same`, opens (as [`Store::load`]) the store
    /// named `name` with clusters of `cluster_size` that `base` holds already: the same
    /// creation replayed at a restart. True with the store when it was created. A store of
    /// another name or cluster size on `base` is refused either way.
    pub async fn create_or_open(base: HoldGuard, name: &str, cluster_size: u64, cores: usize, open_same: bool) -> Result<(Arc<Store>, bool), LvolError> {
        let entry = base.entry().clone();
        let b = entry.bdev().clone();
        let bs = b.block_size();
        if cluster_size == 0 || cluster_size % bs as u64 != 0 || cluster_size > u32::MAX as u64 {
            return Err(LvolError::Invalid(format!("field `cluster_sz`: {cluster_size} is not a multiple of the base's {bs}-byte blocks")));
        }
        let base_bytes = b.num_blocks() * bs as u64;
        let g = layout::geometry(base_bytes, bs, cluster_size).ok_or_else(|| {
            LvolError::Invalid(format!(
                "field `cluster_sz`: bdev {} ({base_bytes} bytes) holds no data cluster of {cluster_size} bytes after the metadata",
                entry.name()
            ))
        })?;
        let ch = Channel::get(&entry)?;
        match read_record(&ch, bs, g.slot_bytes).await {
            Ok((_, r, _)) if open_same && r.name == name && r.cluster_size == cluster_size => {
                drop(ch);
                return Ok((Self::load(base, cores).await?, false));
            }
            Ok((_, r, _)) if open_same && r.name == name => {
                return Err(LvolError::Exists(format!(
                    "field `cluster_sz`: bdev {} holds lvol store {} ({}) with clusters of {} bytes, not {cluster_size}",
                    entry.name(),
                    r.name,
                    r.uuid,
                    r.cluster_size
                )))
            }
            Ok((_, r, _)) => {
                return Err(LvolError::Exists(format!("field `bdev_name`: bdev {} holds lvol store {} ({}); delete it first", entry.name(), r.name, r.uuid)))
            }
            Err(layout::DecodeError::NoMagic) => {}
            Err(e) => return Err(LvolError::Invalid(format!("field `bdev_name`: bdev {} holds an unusable lvol store: {e}", entry.name()))),
        }
        let uuid = new_uuid();
        let store = Arc::new(Store::new(entry, uuid, name, cluster_size, bs, g, base, Vec::new(), 0, 1, cores));
        // Slot 1 is cleared first: a stale record there could otherwise win at the next open.
        let blank = vec![0u8; bs as usize];
        ch.write_buf(store.slot_offset(1), &blank).await?;
        store.commit(&ch).await?;
        Ok((store, true))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        base: Arc<BdevEntry>,
        uuid: Uuid,
        name: &str,
        cluster_size: u64,
        block_size: u32,
        g: layout::Geometry,
        claim: HoldGuard,
        vols: Vec<VolumeRecord>,
        seq: u64,
        cur_slot: usize,
        cores: usize,
    ) -> Store {
        let mut refs = vec![0u32; g.total_clusters as usize];
        for rec in &vols {
            for &(_, p) in &rec.map {
                refs[p as usize] += 1;
            }
        }
        let free_count = refs.iter().filter(|r| **r == 0).count() as u64;
        let mut reserved = 0;
        let mut map_vols = BTreeMap::new();
        for mut rec in vols {
            let clusters = clusters_for(rec.size_bytes, cluster_size);
            let live = VolLive::new(clusters, rec.size_bytes / block_size as u64, rec.read_only);
            let mut map = BTreeMap::new();
            for (l, p) in std::mem::take(&mut rec.map) {
                map.insert(l, p);
                live.set_shared(l, Some(p), refs[p as usize] > 1);
            }
            live.allocated.store(map.len() as u64, Relaxed);
            let r = if rec.thin { 0 } else { clusters.saturating_sub(map.len() as u64) };
            reserved += r;
            map_vols.insert(rec.uuid, VolState { rec: Head::new(rec), map, live, reserved: r });
        }
        // A thick volume reserves what its map lacks. A crash between a delete's two commits
        // leaves it with its map dropped while snapshots still hold the shared clusters, and
        // the reservation can exceed what is free (`free_clusters` would underflow): cut it to
        // the free count rather than overcommit the pool.
        let mut excess = reserved.saturating_sub(free_count);
        for v in map_vols.values_mut() {
            let cut = v.reserved.min(excess);
            v.reserved -= cut;
            reserved -= cut;
            excess -= cut;
        }
        Store {
            uuid,
            base,
            cluster_size,
            block_size,
            data_start: g.data_start,
            total_clusters: g.total_clusters,
            slot_bytes: g.slot_bytes,
            tracker: EpochTracker::new(cores, 1),
            commits: AtomicU64::new(0),
            state: Mutex::new(State {
                name: name.to_string(),
                seq,
                cur_slot,
                journal: Vec::new(),
                log_at: 0,
                last_heads: None,
                #[cfg(debug_assertions)]
                durable_heads: Vec::new(),
                refs,
                next_free: 0,
                limbo: Vec::new(),
                cow_epoch: 0,
                free_count,
                reserved,
                vols: Vols::new(map_vols),
                pending: BTreeMap::new(),
                next_gen: 1,
                durable_gen: 0,
                committing: false,
                waiters: Vec::new(),
                watchers: Vec::new(),
                claim: Some(claim),
                anchor: None,
                snap_meta: HashMap::new(),
            }),
        }
    }

    /// Finds the store on `base` and opens it; checks the maps (no cluster twice, none past
    /// the end) and logs what the leak check found.
    pub async fn load(base: HoldGuard, cores: usize) -> Result<Arc<Store>, LvolError> {
        let entry = base.entry().clone();
        let b = entry.bdev().clone();
        let bs = b.block_size();
        let ch = Channel::get(&entry)?;
        let head = read_head(&ch, bs, 0).await?;
        let cluster_guess = match StoreRecord::decode_prefix(&head) {
            Some(c) => c,
            None => {
                // Slot 0 may be torn: read slot 1 through the geometry of the record there.
                let (_, r) = read_record_any(&ch, bs, b.num_blocks() * bs as u64)
                    .await
                    .map_err(|e| LvolError::NotFound(format!("field `bdev_name`: bdev {}: {e}", entry.name())))?;
                r.cluster_size
            }
        };
        let g = layout::geometry(b.num_blocks() * bs as u64, bs, cluster_guess)
            .ok_or_else(|| LvolError::Invalid(format!("field `bdev_name`: bdev {} is too small for the lvol store it holds", entry.name())))?;
        let (slot, mut r, len) =
            read_record(&ch, bs, g.slot_bytes).await.map_err(|e| LvolError::NotFound(format!("field `bdev_name`: bdev {}: {e}", entry.name())))?;
        let replayed = replay_log(&ch, bs, slot, g.slot_bytes, len, &mut r)
            .await
            .map_err(|e| LvolError::Invalid(format!("lvol store {} on {}: {e}", r.name, entry.name())))?;
        if r.block_size != bs || r.data_start != g.data_start || r.total_clusters != g.total_clusters {
            return Err(LvolError::Invalid(format!(
                "field `bdev_name`: the lvol store on {} was made for another size or block size of the bdev",
                entry.name()
            )));
        }
        // A cluster may be shared by several volumes (snapshots, clones) but appears once in a
        // map; every parent names a snapshot of the store.
        let mut seen = vec![false; r.total_clusters as usize];
        let snapshots: std::collections::HashSet<Uuid> = r.volumes.iter().filter(|v| v.snapshot).map(|v| v.uuid).collect();
        for v in &r.volumes {
            let mut in_this = std::collections::HashSet::new();
            for &(l, p) in &v.map {
                if !in_this.insert(p) || l as u64 >= clusters_for(v.size_bytes, r.cluster_size) {
                    return Err(LvolError::Invalid(format!(
                        "lvol store {} on {}: cluster {p} is mapped twice by one volume or past its end",
                        r.name,
                        entry.name()
                    )));
                }
                seen[p as usize] = true;
            }
            if v.parent.is_some_and(|p| !snapshots.contains(&p)) {
                return Err(LvolError::Invalid(format!(
                    "lvol store {} on {}: lvol {} names a parent that is no snapshot of the store",
                    r.name,
                    entry.name(),
                    v.name
                )));
            }
        }
        let used = seen.iter().filter(|s| **s).count();
        // Before anything else is written: see `void_slot`.
        void_slot(&ch, bs, 1 - slot, g.slot_bytes)
            .await
            .map_err(|e| LvolError::Invalid(format!("lvol store {} on {}: clearing the other metadata slot: {e}", r.name, entry.name())))?;
        log::info!(
            "lvol store {} ({}) on {}: {} volumes, {used} of {} clusters in use; every other cluster is free (leak check: clusters no map references are reclaimed); {replayed} log record(s) replayed",
            r.name,
            r.uuid,
            entry.name(),
            r.volumes.len(),
            r.total_clusters
        );
        Ok(Arc::new(Store::new(entry, r.uuid, &r.name.clone(), r.cluster_size, bs, g, base, r.volumes, r.seq, slot, cores)))
    }

    /// Erases the store's records (both slots' first block).
    pub async fn destroy_on_media(&self) -> IoResult {
        let ch = Channel::get(&self.base)?;
        let blank = vec![0u8; self.block_size as usize];
        ch.write_buf(self.slot_offset(0), &blank).await?;
        ch.write_buf(self.slot_offset(1), &blank).await?;
        ch.flush().await
    }

    /// Drops the claim on the base (after the store is deleted or closed).
    pub fn release_base(&self) {
        self.st().claim = None;
    }
}

impl StoreRecord {
    /// The cluster size in a record's first block, if it is one of ours (the rest unchecked).
    fn decode_prefix(head: &[u8]) -> Option<u64> {
        StoreRecord::decode(head).ok().map(|r| r.cluster_size).or_else(|| {
            // A record longer than one block: parse the fixed fields far enough.
            StoreRecord::encoded_len(head).ok()?;
            let n = *head.get(48)? as usize;
            let at = 49 + n;
            Some(u64::from_le_bytes(head.get(at..at + 8)?.try_into().ok()?))
        })
    }
}

/// Makes the record in `slot` (the one not chosen at open) invalid for good by zeroing its
/// CRC, durably. Why: that slot may hold a record torn by the crash (the commit in flight),
/// with the sequence number the next commit will use again. The next whole record goes into
/// the same slot, and where it is torn in turn, the blocks it did write can be the very bytes
/// the old record missed (both list the same volumes up to where they differ): the old record
/// is then whole again, valid, newer than the other slot, and wins the next open with a state
/// that was never acknowledged. Seed 8592 of the pool simulation did this: a delete's record
/// torn by one crash, completed by the next commit's record torn by the next crash, and the
/// volume, written to in between, was gone. With its CRC zeroed the old record can only come
/// back whole through a write of its own CRC, which no later record carries. Zeroed, not
/// inverted, so that a second open does not restore what the first one cleared. Whatever the
/// slot held is not needed: the chosen slot holds the state. The CoW store's header copies are
/// cleared the same way when it is opened.
async fn void_slot(ch: &Channel, bs: u32, slot: usize, slot_bytes: u64) -> IoResult {
    ch.patch_block(slot as u64 * slot_bytes / bs as u64, |b| b[layout::CRC].fill(0)).await
}

async fn read_head(ch: &Channel, bs: u32, block: u64) -> Result<Vec<u8>, BdevError> {
    let mut b = vec![0u8; bs as usize];
    ch.read_buf(block, &mut b).await?;
    Ok(b)
}

/// The record a slot holds, and its length in bytes.
async fn read_slot(ch: &Channel, bs: u32, block: u64, slot_bytes: u64) -> Result<(StoreRecord, u64), layout::DecodeError> {
    let head = read_head(ch, bs, block).await.map_err(|_| layout::DecodeError::Corrupt)?;
    let len = StoreRecord::encoded_len(&head)?;
    if len > slot_bytes {
        return Err(layout::DecodeError::Corrupt);
    }
    let mut b = vec![0u8; len.div_ceil(bs as u64) as usize * bs as usize];
    ch.read_buf(block, &mut b).await.map_err(|_| layout::DecodeError::Corrupt)?;
    Ok((StoreRecord::decode(&b)?, len))
}

/// Applies the log records that follow the record `r` read from `slot` (layout: log records)
/// to its maps; returns how many. An error if a valid log record names a volume the state
/// does not hold (the store is then not opened: dropping the change would lose data).
async fn replay_log(ch: &Channel, bs: u32, slot: usize, slot_bytes: u64, rec_len: u64, r: &mut StoreRecord) -> Result<u64, String> {
    let mut at = rec_len.div_ceil(bs as u64) * bs as u64;
    let base = slot as u64 * slot_bytes / bs as u64;
    let mut maps: HashMap<Uuid, BTreeMap<u32, u32>> = HashMap::new();
    let mut n = 0;
    while at + bs as u64 <= slot_bytes {
        let Ok(head) = read_head(ch, bs, base + at / bs as u64).await else { break };
        let Ok(len) = LogRecord::encoded_len(&head) else { break };
        let padded = len.div_ceil(bs as u64) * bs as u64;
        if at + padded > slot_bytes {
            break;
        }
        let mut b = vec![0u8; padded as usize];
        if ch.read_buf(base + at / bs as u64, &mut b).await.is_err() {
            break;
        }
        let Ok(log) = LogRecord::decode(&b, r.total_clusters) else { break };
        if log.store != r.uuid || log.seq != r.seq + 1 {
            break;
        }
        for c in &log.changes {
            let vol = r
                .volumes
                .iter_mut()
                .find(|v| v.uuid == c.vol)
                .ok_or_else(|| format!("log record {} changes lvol {}, which the store does not hold", log.seq, c.vol))?;
            let m = maps.entry(c.vol).or_insert_with(|| std::mem::take(&mut vol.map).into_iter().collect());
            match c.phys {
                Some(p) => m.insert(c.logical, p),
                None => m.remove(&c.logical),
            };
        }
        r.seq = log.seq;
        at += padded;
        n += 1;
    }
    for v in &mut r.volumes {
        if let Some(m) = maps.remove(&v.uuid) {
            v.map = m.into_iter().collect();
        }
    }
    Ok(n)
}

/// Reads both slots and picks the current record.
async fn read_record(ch: &Channel, bs: u32, slot_bytes: u64) -> Result<(usize, StoreRecord, u64), layout::DecodeError> {
    let a = read_slot(ch, bs, 0, slot_bytes).await;
    let b = read_slot(ch, bs, slot_bytes / bs as u64, slot_bytes).await;
    let lens = [a.as_ref().map_or(0, |x| x.1), b.as_ref().map_or(0, |x| x.1)];
    let (slot, r) = layout::pick(a.map(|x| x.0), b.map(|x| x.0))?;
    Ok((slot, r, lens[slot]))
}

/// Slot 0 unreadable: slot 1's place depends on the cluster size, so try SPDK's usual ones.
async fn read_record_any(ch: &Channel, bs: u32, base_bytes: u64) -> Result<(usize, StoreRecord), layout::DecodeError> {
    let mut last = layout::DecodeError::NoMagic;
    for shift in 12..=30u32 {
        let cs = 1u64 << shift;
        if cs % bs as u64 != 0 {
            continue;
        }
        let Some(g) = layout::geometry(base_bytes, bs, cs) else { continue };
        match read_slot(ch, bs, g.slot_bytes / bs as u64, g.slot_bytes).await {
            Ok((r, _)) if r.cluster_size == cs => return Ok((1, r)),
            Ok(_) => {}
            Err(e) => {
                if e != layout::DecodeError::NoMagic {
                    last = e;
                }
            }
        }
    }
    Err(last)
}

thread_local! {
    /// Where the store's and its volumes' UUIDs come from in the simulation (`sim::seed_uuids`):
    /// records list volumes in UUID order, so random UUIDs would change what a seed replays.
    /// Empty elsewhere: random (version 4) UUIDs.
    static SEEDED_UUIDS: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> = const { std::cell::RefCell::new(None) };
}

fn new_uuid() -> Uuid {
    use rand::RngExt;
    SEEDED_UUIDS.with(|s| s.borrow_mut().as_mut().map(|r| uuid::Builder::from_random_bytes(r.random()).into_uuid())).unwrap_or_else(Uuid::new_v4)
}

/// A volume of a store: the bdev.
pub struct LvolBdev {
    props: BdevProps,
    store: Arc<Store>,
    live: Arc<VolLive>,
    thin: bool,
}

impl LvolBdev {
    /// The bdev of volume `uuid` (its `live` state, from the store), named `name`.
    pub fn new(name: String, uuid: Uuid, store: Arc<Store>, live: Arc<VolLive>, thin: bool) -> LvolBdev {
        let props = BdevProps::with_count(name, PRODUCT_NAME, store.block_size, live.num_blocks.clone(), uuid);
        LvolBdev { props, store, live, thin }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn lvol_uuid(&self) -> Uuid {
        self.props.uuid()
    }

    pub fn is_thin(&self) -> bool {
        self.thin
    }

    pub fn allocated_clusters(&self) -> u64 {
        self.live.allocated.load(Relaxed)
    }
}

struct LvolChannel {
    base: Channel,
    store: Arc<Store>,
    live: Arc<VolLive>,
    uuid: Uuid,
}

/// Byte range `skip..skip+len` of a vector of buffers.
fn sub<'x>(bufs: &'x [IoSlice<'_>], mut skip: usize, mut len: usize) -> Slices<'x> {
    let mut out = Slices::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(len);
        out.push(IoSlice::new(&b[skip..skip + n]));
        len -= n;
        skip = 0;
    }
    out
}

fn sub_mut<'x>(bufs: &'x mut [IoSliceMut<'_>], mut skip: usize, mut len: usize) -> SlicesMut<'x> {
    let mut out = SlicesMut::new();
    for b in bufs.iter_mut() {
        if len == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(len);
        out.push(IoSliceMut::new(&mut b[skip..skip + n]));
        len -= n;
        skip = 0;
    }
    out
}

impl LvolChannel {
    fn bpc(&self) -> u64 {
        self.store.blocks_per_cluster()
    }

    fn check(&self, write: bool, offset: u64, count: u64) -> IoResult {
        let size = self.live.num_blocks.get();
        if offset.checked_add(count).is_none_or(|e| e > size) {
            return Err(BdevError::OutOfRange { offset, count, size });
        }
        if write && self.live.read_only.load(Relaxed) {
            return Err(BdevError::ReadOnly);
        }
        Ok(())
    }

    /// Splits `offset..offset+count` at cluster boundaries: (logical cluster, block in it, blocks).
    fn pieces(&self, offset: u64, count: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let bpc = self.bpc();
        let end = offset + count;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let c = at / bpc;
            let within = at % bpc;
            let n = (bpc - within).min(end - at);
            at += n;
            Some((c, within, n))
        })
    }

    /// Where an I/O of `count` blocks at `offset` goes on the base when it lies within one
    /// cluster mapped to this volume (for a write, not shared: nothing to allocate or copy),
    /// with the epoch ticket taken before the lookup and held until the I/O completes (the
    /// cluster cannot be reused before: module doc, "Lookups without locks"). `None` for
    /// anything else, including a request [`Self::check`] refuses: the general path answers.
    fn mapped(&self, write: bool, offset: u64, count: u64) -> Option<(u64, EpochTicket)> {
        if count == 0 || self.check(write, offset, count).is_err() || offset / self.bpc() != (offset + count - 1) / self.bpc() {
            return None;
        }
        let t = self.store.tracker.enter();
        match self.live.lookup_shared(offset / self.bpc()) {
            Some((p, shared)) if !(write && shared) => Some((self.store.cluster_block(p) + offset % self.bpc(), t)),
            _ => {
                self.store.tracker.exit(t);
                None
            }
        }
    }

    async fn read(&self, offset: u64, count: u64, bufs: &mut [IoSliceMut<'_>]) -> IoResult {
        self.check(false, offset, count)?;
        let bs = self.store.block_size as usize;
        let mut done = 0usize;
        for (c, within, n) in self.pieces(offset, count) {
            let len = n as usize * bs;
            let t = self.store.tracker.enter();
            let r = match self.live.lookup(c) {
                Some(p) => {
                    let blk = self.store.cluster_block(p) + within;
                    if done == 0 && len == bufs.iter().map(|b| b.len()).sum::<usize>() {
                        self.base.read(blk, bufs).await
                    } else {
                        let mut part = sub_mut(bufs, done, len);
                        self.base.read(blk, &mut part).await
                    }
                }
                None => {
                    for b in sub_mut(bufs, done, len).iter_mut() {
                        b.fill(0);
                    }
                    Ok(())
                }
            };
            self.store.tracker.exit(t);
            r?;
            done += len;
        }
        Ok(())
    }

    /// A write holds one epoch ticket from its submission to its last block, and every piece
    /// of it is settled before its first wait: a snapshot taken while the write is under way
    /// then finds each of its clusters mapped (written in place: in the image, whose seal waits
    /// for this ticket), pending (captured, with the data this write puts there) or already
    /// shared (a copy, not in the image). So an image holds the whole of a write submitted
    /// before the command (DESIGN §1), not only the pieces that reached their cluster first.
    async fn write(&self, offset: u64, count: u64, bufs: &[IoSlice<'_>]) -> IoResult {
        self.check(true, offset, count)?;
        let mut ticket = Some(self.store.tracker.enter());
        // The common case, every cluster mapped to this volume alone, needs no plan (and no
        // allocation): a cluster is reused only after the epoch of our ticket sealed. One
        // cluster is looked up again at its turn, before any wait: the same answer. Several
        // are settled here, as the plan does: an unmap submitted later takes a cluster out of
        // the map at once, and the write's later piece, looked up at its turn, then went to a
        // new cluster, not the one a snapshot taken in between shares (strict-rule seed 6527).
        // Their roles are kept inline (`Plan`): no allocation for the few a write spans.
        let single = count == 0 || offset / self.bpc() == (offset + count - 1) / self.bpc();
        let mapped = if single {
            self.pieces(offset, count).all(|(c, _, _)| matches!(self.live.lookup_shared(c), Some((_, false)))).then(Plan::new)
        } else {
            self.pieces(offset, count)
                .map(|(c, _, _)| match self.live.lookup_shared(c) {
                    Some((p, false)) => Some(Role::Mapped(p)),
                    _ => None,
                })
                .collect::<Option<Plan>>()
        };
        let plan = if let Some(mapped) = mapped {
            (!single).then_some(mapped)
        } else {
            match self.plan(offset, count) {
                Ok(plan) => Some(plan),
                Err(e) => {
                    self.store.leave(&mut ticket);
                    return Err(e);
                }
            }
        };
        let (gen, r) = self.write_pieces(offset, count, bufs, plan, &mut ticket).await;
        // The data has landed: a snapshot's seal need not wait for the metadata commit too.
        self.store.leave(&mut ticket);
        // Committed even when a later piece failed: the entries of the pieces written are
        // pending until a commit publishes them (a revert, say, waits for none to be left).
        match gen {
            Some(gen) => self.store.wait_durable(&self.base, gen).await.and(r),
            None => r,
        }
    }

    /// Settles every piece of a write at once (see [`Self::write`]); on a refusal (a full pool)
    /// gives back what it took, so the write fails whole.
    fn plan(&self, offset: u64, count: u64) -> Result<Plan, BdevError> {
        let store = &self.store;
        let mut st = store.st();
        let mut plan = Plan::new();
        for (c, _, _) in self.pieces(offset, count) {
            let planned = u32::try_from(c)
                .map_err(|_| BdevError::OutOfRange { offset, count, size: self.live.num_blocks.get() })
                .and_then(|l| store.plan_piece(&mut st, &self.live, self.uuid, l));
            match planned {
                Ok(role) => plan.push(role),
                Err(e) => {
                    for (l, role) in plan.iter().enumerate() {
                        if let Role::Fill { .. } = role {
                            store.abandon(&mut st, self.uuid, (offset / self.bpc()) as u32 + l as u32);
                        }
                    }
                    return Err(e);
                }
            }
        }
        log::trace!(
            "lvol {}: write {offset}+{count} planned: {:?}",
            self.uuid,
            plan.iter()
                .map(|r| match r {
                    Role::Mapped(p) => format!("mapped {p}"),
                    Role::Fill { phys, from, .. } => format!("fill {phys} from {from:?}"),
                    Role::Ready(p) => format!("ready {p}"),
                    Role::WaitFill { phys, .. } => format!("wait fill {phys}"),
                    Role::WaitPublish(g) => format!("wait publish {g:?}"),
                    Role::Filled(_) | Role::Abandoned => "done".to_string(),
                })
                .collect::<Vec<_>>()
        );
        Ok(plan)
    }

    /// Writes the pieces as planned (`None`: all mapped, in place) while the ticket taken at
    /// submission is held. A wait that had to give the ticket up (a copy waiting for a seal
    /// this write's epoch is part of) ends the plan's cover: the rest is settled afresh, as a
    /// write of the later epoch. Returns the commit generation the new clusters' entries need
    /// (also when a piece failed) and the outcome.
    async fn write_pieces(
        &self,
        offset: u64,
        count: u64,
        bufs: &[IoSlice<'_>],
        plan: Option<Plan>,
        ticket: &mut Option<EpochTicket>,
    ) -> (Option<u64>, IoResult) {
        let store = &self.store;
        let bs = store.block_size as usize;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let epoch0 = ticket.as_ref().map(EpochTicket::epoch);
        let first_cluster = offset / self.bpc();
        let mut failed = None;
        let mut plan = plan;
        // Fills first: other writers may wait for these clusters with their tickets held, and
        // a fill waits for nothing of theirs; filling in piece order instead, behind this
        // write's own waits, lets two writes wait for each other.
        for (i, role) in plan.iter_mut().flatten().enumerate() {
            if let Role::Fill { phys, from, cow_epoch } = *role {
                let logical = (first_cluster + i as u64) as u32;
                if failed.is_some() {
                    // Unfilled, our entries would leave their waiters waiting forever.
                    store.abandon(&mut store.st(), self.uuid, logical);
                    *role = Role::Abandoned;
                    continue;
                }
                match store.fill(&self.base, self.uuid, logical, phys, from, cow_epoch, ticket).await {
                    Ok(()) => *role = Role::Filled(phys),
                    Err(e) => {
                        *role = Role::Abandoned;
                        failed = Some(e);
                    }
                }
            }
        }
        let mut roles = plan.map(Plan::into_iter);
        let mut done = 0usize;
        let mut gen = None;
        for (c, within, n) in self.pieces(offset, count) {
            let role = roles.as_mut().and_then(Iterator::next);
            let logical = c as u32; // checked by the plan, or mapped (so within the map's range)
            let len = n as usize * bs;
            let held = ticket.as_ref().map(EpochTicket::epoch) == epoch0;
            let target = match role {
                Some(Role::Abandoned) => continue,
                // A filled cluster (zeros or a copy) is published even if this write fails.
                Some(Role::Filled(p)) if failed.is_some() => {
                    gen = gen.max(store.add_entry(self.uuid, logical, p));
                    continue;
                }
                _ if failed.is_some() => continue,
                Some(Role::Filled(p)) => Ok((p, true)),
                Some(Role::Mapped(p)) if held => Ok((p, false)),
                Some(Role::Ready(p)) if held => Ok((p, true)),
                // Waiting with the ticket held is safe when the fill waits for no seal of this
                // write's epoch (a first write's zeroing, or a copy for an older snapshot).
                Some(Role::WaitFill { phys, seal_wait, rx }) if held && epoch0.is_some_and(|e| seal_wait.is_none_or(|s| s < e)) => match rx.await {
                    Ok(()) => Ok((phys, true)),
                    Err(_) => store.cluster_for_write(&self.base, &self.live, self.uuid, logical, ticket).await,
                },
                None if held => match self.live.lookup(c) {
                    Some(p) => Ok((p, false)),
                    None => store.cluster_for_write(&self.base, &self.live, self.uuid, logical, ticket).await,
                },
                // A captured cluster, or the plan's cover ended: settled now (waits give up
                // the ticket; see `cluster_for_write`).
                _ => store.cluster_for_write(&self.base, &self.live, self.uuid, logical, ticket).await,
            };
            let r = match target {
                Ok((phys, first)) => {
                    let blk = store.cluster_block(phys) + within;
                    let r = if done == 0 && len == total { self.base.write(blk, bufs).await } else { self.base.write(blk, &sub(bufs, done, len)).await };
                    if first {
                        gen = gen.max(store.add_entry(self.uuid, logical, phys));
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                failed = Some(e);
            }
            done += len;
        }
        (gen, failed.map_or(Ok(()), Err))
    }

    /// Unmap and write-zeroes: whole clusters of a thin volume are freed, the rest of the
    /// range is zeroed where allocated (unallocated blocks read as zeros already). Settled at
    /// submission as a write is (see [`Self::write`]): the whole clusters leave the map before
    /// the first wait, and the zero writes (the range's partial ends, and clusters with a first
    /// write pending, which a drop would not stop) take their tickets and plans in the same
    /// first poll, so a snapshot taken while the unmap is under way holds all of it.
    async fn zero_range(&self, offset: u64, count: u64) -> IoResult {
        self.check(true, offset, count)?;
        let bpc = self.bpc();
        let mut whole = Vec::new();
        let mut zero = Vec::new();
        for (c, within, n) in self.pieces(offset, count) {
            if n == bpc {
                whole.push(c as u32);
            } else if self.live.lookup(c).is_some() {
                zero.push((c * bpc + within, n));
            }
        }
        let mut kept = Vec::new();
        let freed = self.store.unmap_now(self.uuid, whole.into_iter(), Some(&mut kept));
        zero.extend(kept.into_iter().map(|c| (c as u64 * bpc, bpc)));
        // One buffer of zeros, as long as the longest piece, serves every piece.
        let bs = self.store.block_size as u64;
        let zeros = vec![0u8; (zero.iter().map(|&(_, n)| n).max().unwrap_or(0) * bs) as usize];
        let slices: Vec<[IoSlice<'_>; 1]> = zero.iter().map(|&(_, n)| [IoSlice::new(&zeros[..(n * bs) as usize])]).collect();
        let writes = futures::future::join_all(zero.iter().zip(&slices).map(|(&(at, n), s)| self.write(at, n, s)));
        let (written, released) = futures::join!(writes, self.store.release_dropped(&self.base, self.uuid, freed));
        written.into_iter().collect::<IoResult>().and(released)
    }
}

impl IoChannel for LvolChannel {
    /// The common case, a read or write within one cluster the volume maps (for a write: holds
    /// alone), is one request to the base under an epoch ticket, completed in place when the
    /// base completes in place: no future of this layer's own, so no allocation per I/O (as
    /// the CoW layer's `submit_modify`). Everything else takes the general path.
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        match io {
            Io::Read { offset_blocks, num_blocks, bufs } => match self.mapped(false, offset_blocks, num_blocks) {
                Some((blk, t)) => self.base.pass(Io::Read { offset_blocks: blk, num_blocks, bufs }, move || self.store.tracker.exit(t)),
                None => IoFuture::boxed(self.read(offset_blocks, num_blocks, bufs)),
            },
            Io::Write { offset_blocks, num_blocks, bufs } => match self.mapped(true, offset_blocks, num_blocks) {
                Some((blk, t)) => self.base.pass(Io::Write { offset_blocks: blk, num_blocks, bufs }, move || self.store.tracker.exit(t)),
                None => IoFuture::boxed(self.write(offset_blocks, num_blocks, bufs)),
            },
            Io::Flush => self.base.pass(Io::Flush, || ()),
            Io::Unmap { offset_blocks, num_blocks } | Io::WriteZeroes { offset_blocks, num_blocks } => {
                IoFuture::boxed(self.zero_range(offset_blocks, num_blocks))
            }
        }
    }
}

impl Bdev for LvolBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, io: IoType) -> bool {
        match io {
            IoType::Read | IoType::Write | IoType::Unmap | IoType::WriteZeroes => true,
            IoType::Flush => self.store.base.bdev().supports(IoType::Flush),
        }
    }
    fn read_only(&self) -> bool {
        self.live.read_only.load(Relaxed)
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(LvolChannel { base: Channel::get(&self.store.base)?, store: self.store.clone(), live: self.live.clone(), uuid: self.uuid() }))
    }
    fn driver_specific(&self) -> Value {
        let st = self.store.st();
        let rec = st.vols.get(&self.uuid()).map(|v| v.rec.clone());
        json!({ "lvol": {
            "lvol_store_uuid": self.store.uuid.to_string(),
            "base_bdev": self.store.base.name(),
            "thin_provision": self.thin,
            "num_allocated_clusters": self.allocated_clusters(),
            "snapshot": rec.as_ref().is_some_and(|r| r.snapshot),
            "clone": rec.as_ref().is_some_and(|r| r.parent.is_some()),
            "esnap_clone": false,
            "clear_method": rec.map_or("unmap", |r| CLEAR_METHODS.get(r.clear_method as usize).copied().unwrap_or("unmap")),
        }})
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        // One call per store, on its anchor volume (see the module comment).
        (self.store.anchor() == Some(self.uuid())).then(|| ("bdev_lvol_load_lvstore", json!({ "bdev_name": self.store.base.name() })))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_preservable(&self) -> Option<&dyn crate::preserve::Preservable> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
