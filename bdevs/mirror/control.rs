//! The mirror's control task: the one place where persistent state changes, on the mirror's
//! home core. It takes requests in batches (everything queued when it wakes), applies them to
//! its in-memory state, then commits: it writes what changed to every leg that holds metadata,
//! and only then answers the requests that depend on it.
//!
//! The rules it keeps:
//! - **Write intent before data.** A write may enter a region only when the region's bit is on
//!   the in-sync legs (written and flushed); a batch of first writes to clean regions costs one
//!   page write per leg.
//! - **Departure before acknowledgement.** A leg that failed a write keeps receiving writes until
//!   its departure is on the remaining legs; a write that it failed completes only after that.
//!   So after a crash no leg that missed an acknowledged write can look in sync.
//! - **Stale maps before clearing.** A departed leg's stale map lists every region written since
//!   it left (or may list more). It is written lazily, but always before a write-intent bit is
//!   cleared: at assembly, stale maps are merged with the write-intent bitmap, so nothing a
//!   departed leg missed is ever forgotten.
//! - **Clear lazily.** A region's write-intent bit is cleared after it saw no write for a whole
//!   cleaner interval, in batches.

use super::channel::join_slots;
use super::layout::{Bitmap, BitmapId, Geometry, SlotRecord, SlotState, Superblock, FLAG_SEALED_SPLIT, MAX_NAME, MAX_SLOTS, SUPERBLOCK_BYTES};
use super::regions::{FAST, UNSYNCED, WAIT_DRAIN};
use super::{rebuild, AddedLeg, LegMode, MirrorError, MirrorStatus, ProcessStatus, Shared, SlotStatus, SplitSealed, SplitStarted};
use crate::bdev::{BdevEntry, BdevError, Channel, HoldGuard, IoBuf, IoResult};
use crate::reactor;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Weak};
use std::time::Duration;
use uuid::Uuid;

/// Most requests handled before a commit.
const MAX_BATCH: usize = 4096;
/// How long a dropped leg's in-flight I/O is waited for before its claim is released.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

pub(crate) enum Request {
    /// A write wants to enter a region that is not open for fast entry.
    Enter {
        region: u64,
        reply: oneshot::Sender<IoResult>,
    },
    /// Exclusive use of a region (a rebuild window, a repair): answered once no write is inside.
    /// With `write_intent`, the region's bit is made durable first (the holder writes in-sync legs).
    Lock {
        region: u64,
        write_intent: bool,
        reply: oneshot::Sender<IoResult>,
    },
    Unlock {
        region: u64,
    },
    /// The last write left a region that a lock waits for.
    Drained {
        region: u64,
    },
    /// A leg (the slot's `incarnation`) failed an I/O; answered once its departure is durable.
    LegFailed {
        incarnation: u64,
        slot: usize,
        reply: oneshot::Sender<IoResult>,
    },
    CleanTick,
    /// Time to look for failed legs that may be back (`auto_rejoin`).
    RejoinTick,
    /// A failed leg's bdev was claimed again and its superblock read (off the control loop):
    /// `guard` is set when the superblock says the leg is this slot's and it answered.
    RejoinProbed {
        slot: usize,
        guard: Option<HoldGuard>,
    },
    AddLeg {
        guard: HoldGuard,
        reply: oneshot::Sender<Result<AddedLeg, MirrorError>>,
    },
    RemoveLeg {
        name: String,
        reply: oneshot::Sender<Result<(), MirrorError>>,
    },
    /// Answered once the split's epoch started; the seal is answered through `SplitStarted`.
    Split {
        leg: String,
        image: String,
        reply: oneshot::Sender<Result<SplitStarted, MirrorError>>,
    },
    /// An image was deleted: its slot forgets the name (the leg can still re-join).
    ForgetImage {
        image: String,
        reply: oneshot::Sender<()>,
    },
    /// Every write of the epoch before a split completed.
    SplitDrained {
        slot: usize,
    },
    /// A split's record (its start or its seal) was written off the control loop: the split
    /// leg's own superblock, then every metadata leg's (`states`: the slot states written).
    SplitRecorded {
        step: SplitStep,
        own: IoResult,
        results: [Option<IoResult>; MAX_SLOTS],
        states: [SlotState; MAX_SLOTS],
    },
    /// The split leg's flush after its epoch drained (run off the control loop).
    SplitFlushed {
        slot: usize,
        result: IoResult,
    },
    /// The background process asks for its next region at or after `cursor`.
    ProcessNext {
        cursor: u64,
        reply: oneshot::Sender<Option<Step>>,
    },
    ProcessDone {
        region: u64,
        copied: u8,
        resynced: bool,
        unreadable: bool,
        bytes: u64,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Which record of a split is being written.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SplitStep {
    /// `Splitting`: written before the split's instant (and so before the RPC's reply).
    Start(usize),
    /// `Split`: written once the old epoch drained into the leg and the leg was flushed.
    Seal(usize),
}

impl SplitStep {
    fn slot(self) -> usize {
        match self {
            SplitStep::Start(s) | SplitStep::Seal(s) => s,
        }
    }
}

/// One window of the background process.
pub(crate) struct Step {
    pub region: u64,
    /// In-sync legs to read from, preferred first.
    pub sources: Vec<usize>,
    /// Legs to copy the region to (a mask of slots).
    pub targets: u8,
    /// The region is resynchronised (copied to every in-sync leg but the first source).
    pub resync: bool,
}

pub(crate) struct CtlSlot {
    pub rec: SlotRecord,
    /// The leg's bdev name (kept after the leg left, for status).
    pub name: String,
    pub guard: Option<HoldGuard>,
    /// The home core's channel to the leg.
    pub ch: Option<Channel>,
    /// Departed in memory, departure not yet durable: still written.
    pub failing: bool,
    /// The superblock copy the next write goes to (not the one holding the newest).
    pub next_sb_copy: u64,
}

impl CtlSlot {
    pub fn empty() -> CtlSlot {
        CtlSlot { rec: SlotRecord::default(), name: String::new(), guard: None, ch: None, failing: false, next_sb_copy: 0 }
    }

    fn in_sync(&self) -> bool {
        self.rec.state == SlotState::Active && !self.failing
    }

    /// Holds metadata: written with every bitmap and superblock change.
    fn holds_metadata(&self) -> bool {
        matches!(self.rec.state, SlotState::Active | SlotState::Rebuilding) && !self.failing && self.ch.is_some()
    }
}

/// A slot's automatic re-join (`auto_rejoin`) and its history.
#[derive(Default)]
struct Rejoin {
    /// The bdev of a leg that failed, kept weakly once its claim is released: the leg may come
    /// back by itself when the bdev answers again (the same bdev, not one made later under the
    /// same name: that is the operator's to add).
    departed: Option<Weak<BdevEntry>>,
    /// No attempt before this time; the delay doubles after each failed attempt.
    at_ns: u64,
    delay_ns: u64,
    /// An attempt (claim, superblock read) is under way off the control loop.
    probing: bool,
    auto: u64,
    rpc: u64,
    last: Option<(&'static str, u64)>,
}

#[derive(Default)]
struct RegionLock {
    queue: VecDeque<(bool, oneshot::Sender<IoResult>)>,
    draining: Option<oneshot::Sender<IoResult>>,
}

struct PendingSplit {
    slot: usize,
    image: String,
    /// Answered when the epoch starts (or the split fails before).
    started: Option<oneshot::Sender<Result<SplitStarted, MirrorError>>>,
    /// Answered when the leg is sealed (or the split fails after it started).
    sealed: Option<oneshot::Sender<Result<SplitSealed, MirrorError>>>,
    sealed_rx: Option<oneshot::Receiver<Result<SplitSealed, MirrorError>>>,
}

impl PendingSplit {
    /// Tells whoever waits that the split failed.
    fn fail(mut self, e: MirrorError) {
        if let Some(r) = self.started.take() {
            let _ = r.send(Err(e));
        } else if let Some(r) = self.sealed.take() {
            let _ = r.send(Err(e));
        }
    }
}

/// Answers that wait for the next superblock to be durable.
enum AfterSb {
    Io(oneshot::Sender<IoResult>),
    Added(oneshot::Sender<Result<AddedLeg, MirrorError>>, AddedLeg),
    Removed(oneshot::Sender<Result<(), MirrorError>>),
    Forgot(oneshot::Sender<()>),
}

#[derive(Default)]
struct Batch {
    need_sb: bool,
    /// Write-intent bits are being cleared: stale maps go out first.
    clearing: bool,
    /// Bits set in this batch, not durable yet.
    pending_wi: HashSet<u64>,
    enters: Vec<(u64, oneshot::Sender<IoResult>)>,
    locks_after_wi: Vec<(u64, oneshot::Sender<IoResult>)>,
    after_sb: Vec<AfterSb>,
}

pub(crate) struct Ctl {
    pub sh: Arc<Shared>,
    pub g: Geometry,
    pub generation: u64,
    pub slots: Vec<CtlSlot>,
    pub wi: Bitmap,
    pub stale: Vec<Bitmap>,
    pub unsynced: Bitmap,
    pub wi_dirty: BTreeSet<u64>,
    pub stale_dirty: BTreeSet<(usize, u64)>,
    /// Per slot: regions whose stale bit a copy cleared since the leg's last flush. The copy
    /// may still sit in the leg's volatile cache; should the leg depart before a flush makes
    /// it durable, these bits are set again (a crash of the leg would lose the copy, and a
    /// re-join would otherwise not copy the region again: mirror simulation seed 1149).
    copied_unflushed: [BTreeSet<u64>; MAX_SLOTS],
    locks: HashMap<u64, RegionLock>,
    parked: HashMap<u64, Vec<oneshot::Sender<IoResult>>>,
    process_running: bool,
    process: Option<ProcessStatus>,
    split: Option<PendingSplit>,
    /// A split's superblocks are being written by a task of their own; superblock writes of
    /// commits wait for it (the copies alternate), everything else goes on.
    split_sb_busy: bool,
    /// Slot states in the last superblock written (instrumentation, see `records_split`).
    written_states: [SlotState; MAX_SLOTS],
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
    rejoin: [Rejoin; MAX_SLOTS],
    batch: Batch,
    /// When the remote legs' reservations are checked next (fencing only), and whether a
    /// check still runs (a leg waiting for a reconnect can hold one up; checks do not pile up).
    resv_check_at_ns: u64,
    resv_checking: std::rc::Rc<std::cell::Cell<bool>>,
}

/// How often a mirror with a `reservation_key` checks its reservation on every remote leg:
/// a leg whose target restarted without persistence lost it without any I/O error (it is
/// reserved again within this), and a head that was fenced while it had no writes learns it
/// (and shows it) within this.
const RESERVATION_CHECK_NS: u64 = 2_000_000_000;

impl Ctl {
    pub(crate) fn new(sh: Arc<Shared>, generation: u64, slots: Vec<CtlSlot>, wi: Bitmap, stale: Vec<Bitmap>, unsynced: Bitmap) -> Ctl {
        assert_eq!(slots.len(), MAX_SLOTS);
        assert_eq!(stale.len(), MAX_SLOTS);
        let g = sh.geometry;
        let mut c = Ctl {
            sh,
            g,
            generation,
            slots,
            wi,
            stale,
            unsynced,
            wi_dirty: BTreeSet::new(),
            stale_dirty: BTreeSet::new(),
            copied_unflushed: Default::default(),
            locks: HashMap::new(),
            parked: HashMap::new(),
            process_running: false,
            process: None,
            split: None,
            split_sb_busy: false,
            written_states: [SlotState::Empty; MAX_SLOTS],
            shutdown_waiters: Vec::new(),
            shutting_down: false,
            rejoin: Default::default(),
            batch: Batch::default(),
            resv_check_at_ns: 0,
            resv_checking: Default::default(),
        };
        c.written_states = std::array::from_fn(|i| c.slots[i].rec.state);
        for r in c.unsynced.iter_set().collect::<Vec<_>>() {
            c.sh.regions.set(r, UNSYNCED);
        }
        c.sync_modes();
        // The status is filled before the mirror is handed out: `assemble` returns (and the
        // RPC replies, and `save_config` may list the legs) before the control task first runs.
        c.publish();
        c
    }

    /// Starts the control task and the cleaner's clock on the current core (the home core).
    pub(crate) fn start(self, rx: mpsc::UnboundedReceiver<Request>) {
        let sh = self.sh.clone();
        reactor::spawn_detached(self.run(rx));
        let interval = Duration::from_nanos(sh.options.clean_interval_ns.max(1_000_000));
        let sh2 = sh.clone();
        reactor::spawn_detached(async move {
            loop {
                reactor::sleep(interval).await;
                if sh2.offline.load(SeqCst) || !sh2.send(Request::CleanTick) {
                    break;
                }
            }
        });
        let interval = Duration::from_nanos(sh.options.rejoin_interval_ns.max(1_000_000));
        reactor::spawn_detached(async move {
            loop {
                reactor::sleep(interval).await;
                if sh.offline.load(SeqCst) || !sh.send(Request::RejoinTick) {
                    break;
                }
            }
        });
    }

    /// Sets every slot's data-path mode and leg from the control state.
    fn sync_modes(&mut self) {
        for (i, s) in self.slots.iter().enumerate() {
            let mode = match s.rec.state {
                _ if s.failing => LegMode::WriteOnly,
                SlotState::Active => LegMode::Active,
                SlotState::Rebuilding => LegMode::WriteOnly,
                SlotState::Splitting => self.sh.slots[i].mode(),
                _ => LegMode::Off,
            };
            self.sh.slots[i].set_mode(mode);
            self.sh.slots[i].set_entry(if mode == LegMode::Off { None } else { s.guard.as_ref().map(|g| g.entry().clone()) });
        }
        self.update_source();
        self.sh.layout_gen.fetch_add(1, SeqCst);
    }

    fn active_count(&self) -> usize {
        self.slots.iter().filter(|s| s.in_sync()).count()
    }

    fn update_source(&mut self) {
        let src = self.slots.iter().position(|s| s.in_sync()).unwrap_or(0);
        self.sh.source_slot.store(src, SeqCst);
        if self.active_count() < 2 && !self.unsynced.is_empty() {
            // One copy left: nothing to resynchronise against.
            for r in self.unsynced.iter_set().collect::<Vec<_>>() {
                self.sh.regions.clear(r, UNSYNCED);
            }
            self.unsynced.clear_all();
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        self.publish();
        self.ensure_process();
        loop {
            let Some(first) = rx.next().await else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            for req in batch {
                self.handle(req).await;
            }
            self.commit_and_answer().await;
            if self.shutting_down && !self.process_running && !self.split_sb_busy {
                self.finish().await;
                break;
            }
        }
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Enter { region, reply } => self.enter(region, reply),
            Request::Lock { region, write_intent, reply } => {
                if self.shutting_down && write_intent {
                    let _ = reply.send(Err(BdevError::Offline));
                } else if region >= self.g.num_regions {
                    let _ = reply.send(Err(BdevError::OutOfRange { offset: region, count: 1, size: self.g.num_regions }));
                } else if let Some(l) = self.locks.get_mut(&region) {
                    l.queue.push_back((write_intent, reply));
                } else {
                    self.start_lock(region, write_intent, reply);
                }
            }
            Request::Unlock { region } => self.unlock(region),
            Request::Drained { region } => {
                if let Some(reply) = self.locks.get_mut(&region).and_then(|l| l.draining.take()) {
                    self.sh.regions.clear(region, WAIT_DRAIN);
                    let _ = reply.send(Ok(()));
                }
            }
            Request::LegFailed { slot, incarnation, reply } => {
                if self.sh.slots.get(slot).is_some_and(|s| s.incarnation.load(SeqCst) == incarnation) {
                    self.leg_failed(slot, reply);
                } else {
                    // The leg that failed already left the slot.
                    let _ = reply.send(Ok(()));
                }
            }
            Request::CleanTick => self.clean(),
            Request::RejoinTick => {
                self.rejoin_tick();
                self.reservation_tick();
            }
            Request::RejoinProbed { slot, guard } => self.rejoin_probed(slot, guard).await,
            Request::AddLeg { guard, reply } => match self.add_leg(guard, false).await {
                Ok(info) => {
                    if info.returning {
                        self.note_rejoin(info.slot, "rpc", info.regions_to_copy);
                    }
                    self.batch.need_sb = true;
                    self.batch.after_sb.push(AfterSb::Added(reply, info));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::RemoveLeg { name, reply } => match self.remove_leg(&name) {
                Ok(()) => self.batch.after_sb.push(AfterSb::Removed(reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Split { leg, image, reply } => self.split(&leg, image, reply),
            Request::SplitDrained { slot } => self.split_drained(slot),
            Request::SplitRecorded { step, own, results, states } => self.split_recorded(step, own, results, states),
            Request::SplitFlushed { slot, result } => self.split_flushed(slot, result),
            Request::ForgetImage { image, reply } => {
                for s in self.slots.iter_mut() {
                    if s.rec.state == SlotState::Split && s.rec.image == image {
                        s.rec.image.clear();
                        self.batch.need_sb = true;
                        self.batch.after_sb.push(AfterSb::Forgot(reply));
                        return;
                    }
                }
                let _ = reply.send(());
            }
            Request::ProcessNext { cursor, reply } => {
                let step = self.process_next(cursor);
                let _ = reply.send(step);
            }
            Request::ProcessDone { region, copied, resynced, unreadable, bytes } => self.process_done(region, copied, resynced, unreadable, bytes),
            Request::Shutdown { reply } => {
                self.shutdown_waiters.push(reply);
                if !self.shutting_down {
                    self.shutting_down = true;
                    self.sh.offline.store(true, SeqCst);
                    if let Some(sp) = self.split.take() {
                        let slot = sp.slot;
                        sp.fail(MirrorError::Busy(format!("mirror {} is shutting down", self.sh.props.name())));
                        // New writes skipped the leg: it is behind, like a failed one.
                        self.depart(slot, SlotState::Failed);
                    }
                    for (_, waiters) in self.parked.drain() {
                        for w in waiters {
                            let _ = w.send(Err(BdevError::Offline));
                        }
                    }
                }
            }
        }
    }

    // ---- regions ----------------------------------------------------------------------

    fn enter(&mut self, r: u64, reply: oneshot::Sender<IoResult>) {
        if self.shutting_down {
            let _ = reply.send(Err(BdevError::Offline));
            return;
        }
        if r >= self.g.num_regions {
            let _ = reply.send(Err(BdevError::OutOfRange { offset: r, count: 1, size: self.g.num_regions }));
            return;
        }
        if self.locks.contains_key(&r) {
            self.parked.entry(r).or_default().push(reply);
        } else if !self.wi.get(r) || self.batch.pending_wi.contains(&r) {
            self.set_write_intent(r);
            self.batch.enters.push((r, reply));
        } else {
            self.admit(r);
            let _ = reply.send(Ok(()));
        }
    }

    /// Whether the next superblock records a slot entering `Splitting` or `Split`.
    fn records_split(&self) -> bool {
        (0..MAX_SLOTS).any(|s| {
            let st = self.slots[s].rec.state;
            st != self.written_states[s] && matches!(st, SlotState::Splitting | SlotState::Split)
        })
    }

    /// Brackets the control task's own waits for a preserve's I/O (see `Shared::ctl_preserve_io`).
    fn preserve_io(&self) {
        self.sh.ctl_preserve_io.fetch_add(1, SeqCst);
    }

    fn set_write_intent(&mut self, r: u64) {
        if self.wi.set(r) {
            self.wi_dirty.insert(self.g.page_of(r));
            self.batch.pending_wi.insert(r);
        }
    }

    /// Lets one write into region `r` (its write-intent bit is durable) and opens the region
    /// for fast entry, after recording the coming write in every departed leg's stale map.
    fn admit(&mut self, r: u64) {
        self.mark_stale(r);
        self.sh.regions.admit(r, true);
    }

    fn mark_stale(&mut self, r: u64) {
        for s in 0..MAX_SLOTS {
            let slot = &self.slots[s];
            if (slot.rec.state.departed() || slot.failing) && self.stale[s].set(r) {
                self.stale_dirty.insert((s, self.g.page_of(r)));
            }
        }
    }

    fn start_lock(&mut self, r: u64, write_intent: bool, reply: oneshot::Sender<IoResult>) {
        self.locks.insert(r, RegionLock::default());
        self.sh.regions.clear(r, FAST);
        if write_intent && (!self.wi.get(r) || self.batch.pending_wi.contains(&r)) {
            self.set_write_intent(r);
            self.batch.locks_after_wi.push((r, reply));
        } else {
            self.begin_drain(r, reply);
        }
    }

    fn begin_drain(&mut self, r: u64, reply: oneshot::Sender<IoResult>) {
        if self.sh.regions.begin_drain(r) {
            let _ = reply.send(Ok(()));
        } else if let Some(l) = self.locks.get_mut(&r) {
            l.draining = Some(reply);
        }
    }

    fn unlock(&mut self, r: u64) {
        let Some(mut l) = self.locks.remove(&r) else { return };
        if let Some((wi, reply)) = l.queue.pop_front() {
            let rest = std::mem::take(&mut l.queue);
            self.start_lock(r, wi, reply);
            if let Some(l) = self.locks.get_mut(&r) {
                l.queue = rest;
            }
        } else if let Some(waiters) = self.parked.remove(&r) {
            for w in waiters {
                self.enter(r, w);
            }
        }
    }

    /// Clears the write-intent bits of regions without writes for a whole interval.
    fn clean(&mut self) {
        if self.shutting_down {
            return;
        }
        let candidates: Vec<u64> =
            self.wi.iter_set().filter(|r| !self.locks.contains_key(r) && !self.unsynced.get(*r) && !self.batch.pending_wi.contains(r)).collect();
        let mut n = 0;
        for r in candidates {
            if self.sh.regions.close_if_quiet(r) {
                self.wi.clear(r);
                self.wi_dirty.insert(self.g.page_of(r));
                n += 1;
            }
        }
        if n > 0 {
            self.batch.clearing = true;
            self.sh.counters.regions_cleared.fetch_add(n, Relaxed);
        }
    }

    // ---- legs -------------------------------------------------------------------------

    fn leg_failed(&mut self, slot: usize, reply: oneshot::Sender<IoResult>) {
        if slot >= MAX_SLOTS {
            let _ = reply.send(Ok(()));
            return;
        }
        let s = &self.slots[slot];
        if s.failing {
            self.batch.after_sb.push(AfterSb::Io(reply));
            return;
        }
        match s.rec.state {
            SlotState::Active if self.active_count() == 1 => {
                // The last in-sync copy stays: its errors go to the host instead.
                let _ = reply.send(Ok(()));
            }
            SlotState::Active | SlotState::Rebuilding | SlotState::Splitting => {
                log::error!("mirror {}: dropping leg {} (slot {slot}) after an I/O error", self.sh.props.name(), s.name);
                self.sh.counters.leg_failures.fetch_add(1, Relaxed);
                self.depart(slot, SlotState::Failed);
                self.batch.after_sb.push(AfterSb::Io(reply));
            }
            // Already gone, durably.
            _ => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Takes a leg out of the mirror (in memory; durable with the next superblock). It keeps
    /// receiving writes until then.
    fn depart(&mut self, slot: usize, state: SlotState) {
        let s = &mut self.slots[slot];
        if !matches!(s.rec.state, SlotState::Active | SlotState::Rebuilding | SlotState::Splitting) {
            return;
        }
        if s.rec.state == SlotState::Splitting && self.split.as_ref().is_some_and(|sp| sp.slot == slot) {
            if let Some(sp) = self.split.take() {
                sp.fail(MirrorError::Io(format!("leg {} failed while it was being split off", s.name)));
            }
        }
        s.rec.state = state;
        s.rec.image.clear();
        s.failing = true;
        self.sh.slots[slot].set_mode(LegMode::WriteOnly);
        // Every region that may have a write in flight is one the leg may miss, and so is every
        // region copied to it since its last flush.
        self.stale[slot].union_with(&self.wi);
        for r in std::mem::take(&mut self.copied_unflushed[slot]) {
            self.stale[slot].set(r);
        }
        for p in 0..self.g.bitmap_pages {
            self.stale_dirty.insert((slot, p));
        }
        self.batch.need_sb = true;
        self.update_source();
    }

    fn remove_leg(&mut self, name: &str) -> Result<(), MirrorError> {
        if self.shutting_down {
            return Err(MirrorError::Busy(format!("mirror {} is shutting down", self.sh.props.name())));
        }
        let slot = self
            .slots
            .iter()
            .position(|s| s.name == name && matches!(s.rec.state, SlotState::Active | SlotState::Rebuilding) && !s.failing)
            .ok_or_else(|| MirrorError::NotFound(format!("{name} is not a leg of mirror {}", self.sh.props.name())))?;
        if self.slots[slot].in_sync() && self.active_count() == 1 {
            return Err(MirrorError::Busy(format!("{name} is the last in-sync leg of mirror {}", self.sh.props.name())));
        }
        if self.slots[slot].in_sync() && !self.unsynced.is_empty() {
            // The legs may still differ where writes were in flight at a crash; reads there come
            // from one leg, and removing one could change what they return.
            return Err(MirrorError::Busy(format!(
                "mirror {} is resynchronising {} region(s) after a crash; remove {name} when it is done",
                self.sh.props.name(),
                self.unsynced.count()
            )));
        }
        log::info!("mirror {}: removing leg {name} (slot {slot})", self.sh.props.name());
        self.depart(slot, SlotState::Removed);
        Ok(())
    }

    fn superblock_for(&self, slot: usize, flags: u32) -> Superblock {
        Superblock {
            mirror_uuid: self.sh.props.uuid(),
            name: self.sh.props.name().to_string(),
            leg_uuid: self.slots[slot].rec.leg_uuid,
            slot,
            generation: self.generation,
            flags,
            geometry: self.g,
            slots: std::array::from_fn(|i| self.slots[i].rec.clone()),
        }
    }

    /// Adds a leg: in memory, with its metadata written; durable with the next superblock.
    /// `auto`: only a failed leg returning to its own slot (an automatic re-join).
    async fn add_leg(&mut self, guard: HoldGuard, auto: bool) -> Result<AddedLeg, MirrorError> {
        if self.shutting_down {
            return Err(MirrorError::Busy(format!("mirror {} is shutting down", self.sh.props.name())));
        }
        let entry = guard.entry().clone();
        let name = entry.name().to_string();
        let b = entry.bdev();
        if b.block_size() != self.g.block_size {
            return Err(MirrorError::Invalid(format!(
                "{name} has {}-byte blocks; the legs of mirror {} have {}-byte blocks",
                b.block_size(),
                self.sh.props.name(),
                self.g.block_size
            )));
        }
        if b.num_blocks() < self.g.leg_blocks_needed() {
            return Err(MirrorError::Invalid(format!(
                "{name} is too small: it has {} blocks, a leg of mirror {} needs {}",
                b.num_blocks(),
                self.sh.props.name(),
                self.g.leg_blocks_needed()
            )));
        }
        if b.read_only() {
            return Err(MirrorError::Invalid(format!("{name} is read-only")));
        }
        // A remote leg that comes (back) is reserved again before anything is written to it: a
        // target restarted without persistence lost the reservation. The only key preempted is
        // the stale head's that the assembly was told of (a leg that was away during the
        // failover still carries that head's reservation); a leg that any other head holds
        // means this head was fenced.
        if let Some(f) = self.sh.options.fencing {
            match super::fence::reserve_leg(b.as_ref(), f).await {
                Ok(_) => {}
                Err(
                    e @ (super::fence::FenceError::HeldByOther { .. }
                    | super::fence::FenceError::Conflict { .. }
                    | super::fence::FenceError::HeldBySameHost { .. }),
                ) => {
                    self.sh.set_fenced(&name);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let ch = Channel::get(&entry).map_err(|e| MirrorError::Io(format!("cannot open {name}: {e}")))?;
        let (sb, next_copy) = super::assemble::read_superblock_copies(&ch, self.g.block_size).await;
        // A leg that left this mirror comes back to its slot and gets only what it missed.
        let returning = sb.as_ref().and_then(|sb| {
            let s = self.slots.get(sb.slot)?;
            (sb.mirror_uuid == self.sh.props.uuid() && s.rec.leg_uuid == sb.leg_uuid && sb.geometry == self.g).then_some(sb.slot)
        });
        if auto && !returning.is_some_and(|slot| self.slots[slot].rec.state == SlotState::Failed) {
            return Err(MirrorError::Invalid(format!("{name} is no longer a failed leg of mirror {}", self.sh.props.name())));
        }
        let (slot, leg_uuid, returning) = match returning {
            Some(slot) => {
                let s = &self.slots[slot];
                match s.rec.state {
                    SlotState::Failed | SlotState::Removed | SlotState::Split if s.guard.is_none() && !s.failing => (slot, s.rec.leg_uuid, true),
                    SlotState::Splitting => return Err(MirrorError::Busy(format!("{name} is being split off mirror {}", self.sh.props.name()))),
                    SlotState::Active | SlotState::Rebuilding => {
                        return Err(MirrorError::Busy(format!("{name} is already a leg of mirror {}", self.sh.props.name())))
                    }
                    _ => return Err(MirrorError::Busy(format!("{name} is still being released by mirror {}; try again", self.sh.props.name()))),
                }
            }
            None => {
                // A free slot; else the slot of a leg that was removed or failed (it can no
                // longer come back incrementally). Split legs keep theirs: their images may.
                let free = |want: SlotState| self.slots.iter().position(|s| s.rec.state == want && s.guard.is_none() && !s.failing);
                let slot = free(SlotState::Empty)
                    .or_else(|| free(SlotState::Removed))
                    .or_else(|| free(SlotState::Failed))
                    .ok_or_else(|| MirrorError::Invalid(format!("mirror {} has no free slot (at most {MAX_SLOTS} legs)", self.sh.props.name())))?;
                (slot, Uuid::new_v4(), false)
            }
        };
        // A returning leg needs what it missed: its stale map lists every region written since
        // it left, including writes in flight now (they were admitted, or entered fast, after
        // the region was recorded in it).
        let stale = if returning { self.stale[slot].clone() } else { Bitmap::full(self.g.num_regions) };
        // The leg's own metadata: every bitmap, and (for a new leg) no old superblock that
        // could outrank ours.
        let g = self.g;
        let page = g.page_bytes as usize;
        let mut buf = IoBuf::zeroed(page);
        let written: IoResult = async {
            if !returning {
                for copy in 0..super::layout::SUPERBLOCK_COPIES {
                    ch.write_buf(g.superblock_block(copy), &buf).await?;
                }
            }
            for p in 0..g.bitmap_pages {
                self.wi.encode_page(p, &mut buf);
                ch.write_buf(g.bitmap_page_block(BitmapId::WriteIntent, p), &buf).await?;
            }
            for s in 0..MAX_SLOTS {
                let map = if s == slot { &stale } else { &self.stale[s] };
                for p in 0..g.bitmap_pages {
                    map.encode_page(p, &mut buf);
                    ch.write_buf(g.bitmap_page_block(BitmapId::Stale(s), p), &buf).await?;
                }
            }
            ch.flush().await
        }
        .await;
        written.map_err(|e| MirrorError::Io(format!("cannot write the mirror's metadata to {name}: {e}")))?;
        let to_copy = stale.count();
        self.stale[slot] = stale;
        self.slots[slot] = CtlSlot {
            rec: SlotRecord { leg_uuid, state: SlotState::Rebuilding, image: String::new() },
            name: name.clone(),
            guard: Some(guard),
            ch: Some(ch),
            failing: false,
            // A new leg's copies were both cleared above.
            next_sb_copy: if returning { next_copy } else { 0 },
        };
        self.sh.slots[slot].incarnation.fetch_add(1, SeqCst);
        self.sh.slots[slot].set_entry(Some(entry));
        self.sh.slots[slot].set_mode(LegMode::WriteOnly);
        self.sh.layout_gen.fetch_add(1, SeqCst);
        if let Some(p) = self.process.as_mut() {
            p.total_regions += to_copy;
            p.targets.push(name.clone());
            p.kind = "rebuild";
        }
        log::info!(
            "mirror {}: {} leg {name} in slot {slot}; {to_copy} of {} regions to copy",
            self.sh.props.name(),
            if returning { "re-adding" } else { "adding" },
            g.num_regions
        );
        Ok(AddedLeg { slot, returning, regions_to_copy: to_copy })
    }

    // ---- automatic re-join --------------------------------------------------------------

    /// Counts a leg's return to its slot and forgets the failed bdev it was.
    fn note_rejoin(&mut self, slot: usize, how: &'static str, regions: u64) {
        let r = &mut self.rejoin[slot];
        r.departed = None;
        r.probing = false;
        match how {
            "auto" => r.auto += 1,
            _ => r.rpc += 1,
        }
        r.last = Some((how, regions));
    }

    /// Whether slot `s` holds a failed leg that may come back by itself.
    fn rejoin_candidate(&self, s: usize) -> bool {
        let c = &self.slots[s];
        c.rec.state == SlotState::Failed && !c.failing && c.guard.is_none() && self.split.as_ref().is_none_or(|sp| sp.slot != s)
    }

    /// Starts an attempt for each failed leg that is due: its bdev is claimed again (which
    /// fails while anything else holds it: an operator who took it over keeps it) and its
    /// superblock read off the control loop, so that a node that hangs holds up nothing here.
    /// A leg the operator removed and a split-off leg are never candidates: only `Failed`
    /// slots. The bdev tried is the one this task released, or, when that is gone (deleted
    /// with a lost controller) or there never was one (the leg was missing at assembly: its
    /// node was down when this head started, its controller still connecting), the bdev under
    /// the leg's configured name once one exists: its superblock decides whether it is this
    /// slot's leg, as for any re-join.
    fn rejoin_tick(&mut self) {
        if self.shutting_down || !self.sh.process_options().auto_rejoin.load(Relaxed) {
            return;
        }
        let now = reactor::now_ns();
        for s in 0..MAX_SLOTS {
            if !self.rejoin_candidate(s) || self.rejoin[s].probing || now < self.rejoin[s].at_ns {
                continue;
            }
            let departed = self.rejoin[s].departed.as_ref().and_then(Weak::upgrade);
            let by_name = || {
                let name = &self.slots[s].name;
                (!name.is_empty()).then(|| self.sh.registry.get().and_then(Weak::upgrade)).flatten().and_then(|r| r.get(name))
            };
            let Some(entry) = departed.or_else(by_name) else {
                self.rejoin[s].departed = None;
                continue;
            };
            let Ok(guard) = entry.claim(self.sh.props.name()) else {
                // Still being released, or held by someone else: later.
                self.rejoin_backoff(s);
                continue;
            };
            self.rejoin[s].probing = true;
            let (sh, g, generation, leg_uuid) = (self.sh.clone(), self.g, self.generation, self.slots[s].rec.leg_uuid);
            reactor::spawn_detached(async move {
                let ok = match Channel::get(guard.entry()) {
                    Ok(ch) => match super::assemble::read_superblock_copies(&ch, g.block_size).await.0 {
                        Some(sb) => {
                            let ours = sb.mirror_uuid == sh.props.uuid() && sb.slot == s && sb.leg_uuid == leg_uuid && sb.geometry == g;
                            // A leg that was sealed as an image, or whose superblock is newer
                            // than the mirror's (written by another assembly of it), is not
                            // taken back without the operator.
                            let conflict = sb.flags & FLAG_SEALED_SPLIT != 0 || sb.generation > generation;
                            if ours && conflict {
                                log::warn!(
                                    "mirror {}: failed leg {} answers again but its superblock (generation {}, flags {:#x}) conflicts; not re-joining it by itself",
                                    sh.props.name(),
                                    guard.entry().name(),
                                    sb.generation,
                                    sb.flags
                                );
                            }
                            ours && !conflict
                        }
                        None => false,
                    },
                    Err(_) => false,
                };
                sh.send(Request::RejoinProbed { slot: s, guard: ok.then_some(guard) });
            });
        }
    }

    /// Checks (and renews) the reservation on every leg that takes writes, off the control
    /// task: Register and Acquire are no-ops for the holder, so this costs three small commands
    /// per remote leg every [`RESERVATION_CHECK_NS`].
    fn reservation_tick(&mut self) {
        let Some(f) = self.sh.options.fencing else { return };
        let now = reactor::now_ns();
        if self.shutting_down || self.sh.fenced.load(Relaxed) || self.resv_checking.get() || now < self.resv_check_at_ns {
            return;
        }
        self.resv_check_at_ns = now + RESERVATION_CHECK_NS;
        let legs: Vec<(String, Arc<dyn crate::bdev::Bdev>)> =
            self.slots.iter().filter(|s| s.holds_metadata()).filter_map(|s| s.guard.as_ref().map(|g| (s.name.clone(), g.entry().bdev().clone()))).collect();
        let (sh, busy) = (self.sh.clone(), self.resv_checking.clone());
        busy.set(true);
        reactor::spawn_detached(async move {
            for (name, b) in legs {
                match super::fence::reserve_leg(b.as_ref(), f).await {
                    Ok(_) => {}
                    Err(
                        super::fence::FenceError::HeldByOther { .. }
                        | super::fence::FenceError::Conflict { .. }
                        | super::fence::FenceError::HeldBySameHost { .. },
                    ) => {
                        sh.set_fenced(&name);
                        break;
                    }
                    // An unreachable leg is the data path's business (it fails and is dropped,
                    // and is reserved again when it re-joins).
                    Err(e) => log::debug!("mirror {}: reservation check: {e}", sh.props.name()),
                }
            }
            busy.set(false);
        });
    }

    fn rejoin_backoff(&mut self, s: usize) {
        let base = self.sh.options.rejoin_interval_ns.max(1);
        let r = &mut self.rejoin[s];
        r.probing = false;
        r.delay_ns = (r.delay_ns.max(base) * 2).min(base * super::REJOIN_BACKOFF_MAX);
        r.at_ns = reactor::now_ns() + r.delay_ns;
    }

    async fn rejoin_probed(&mut self, slot: usize, guard: Option<HoldGuard>) {
        let auto = self.sh.process_options().auto_rejoin.load(Relaxed);
        let Some(guard) = guard.filter(|_| auto && !self.shutting_down && slot < MAX_SLOTS && self.rejoin_candidate(slot)) else {
            if slot < MAX_SLOTS {
                self.rejoin_backoff(slot);
            }
            return;
        };
        let leg = guard.entry().name().to_string();
        match self.add_leg(guard, true).await {
            Ok(info) => {
                log::info!(
                    "mirror {}: failed leg {leg} answers again and re-joins by itself; {} region(s) to copy",
                    self.sh.props.name(),
                    info.regions_to_copy
                );
                self.note_rejoin(slot, "auto", info.regions_to_copy);
                self.rejoin[slot].delay_ns = 0;
                self.batch.need_sb = true;
            }
            Err(e) => {
                log::warn!("mirror {}: failed leg {leg} could not re-join by itself: {e}", self.sh.props.name());
                self.rejoin_backoff(slot);
            }
        }
    }

    // ---- split ------------------------------------------------------------------------

    fn split(&mut self, leg: &str, image: String, reply: oneshot::Sender<Result<SplitStarted, MirrorError>>) {
        let name = self.sh.props.name();
        let refuse = |reply: oneshot::Sender<Result<SplitStarted, MirrorError>>, e: MirrorError| {
            let _ = reply.send(Err(e));
        };
        if self.shutting_down {
            return refuse(reply, MirrorError::Busy(format!("mirror {name} is shutting down")));
        }
        if let Some(sp) = &self.split {
            return refuse(reply, MirrorError::Busy(format!("mirror {name} is already splitting off {} (image {})", self.slots[sp.slot].name, sp.image)));
        }
        if image.is_empty() || image.len() > MAX_NAME {
            return refuse(reply, MirrorError::Invalid(format!("image name must be 1 to {MAX_NAME} bytes")));
        }
        let Some(slot) = self.slots.iter().position(|s| s.name == leg && s.in_sync()) else {
            return refuse(reply, MirrorError::Invalid(format!("{leg} is not an in-sync leg of mirror {name}")));
        };
        if self.active_count() < 2 {
            return refuse(reply, MirrorError::Invalid(format!("{leg} is the last in-sync leg of mirror {name}; splitting it off would leave no copy")));
        }
        if !self.unsynced.is_empty() {
            // Regions written at a crash may still differ between legs; the image would not
            // hold what the mirror reads there.
            return refuse(
                reply,
                MirrorError::Busy(format!("mirror {name} is resynchronising {} region(s) after a crash; split when it is done", self.unsynced.count())),
            );
        }
        // The split is recorded before it starts: a crash in the middle must not let the leg
        // look in sync when new writes have skipped it.
        let s = &mut self.slots[slot];
        s.rec.state = SlotState::Splitting;
        s.rec.image = image.clone();
        let (tx, rx) = oneshot::channel();
        self.split = Some(PendingSplit { slot, image, started: Some(reply), sealed: Some(tx), sealed_rx: Some(rx) });
        self.write_split_record(SplitStep::Start(slot));
    }

    /// Writes a split's record without holding up the control loop (host writes that need the
    /// control task meanwhile are served; DESIGN §1: no host I/O waits for a preserve): first
    /// the split leg's own superblock, which marks it a sealed image of this mirror, then every
    /// metadata leg's superblock. The order makes an acknowledged split survive a crash: once
    /// the metadata legs say `Splitting`, the leg already says what it is, so reassembly keeps
    /// it as the image (a crash image of the split's instant). Answered by `SplitRecorded`.
    fn write_split_record(&mut self, step: SplitStep) {
        debug_assert!(!self.split_sb_busy, "one split record at a time");
        let slot = step.slot();
        self.split_sb_busy = true;
        self.generation += 1;
        let g = self.g;
        let own = self.slots[slot].ch.clone().map(|ch| (ch, self.superblock_for(slot, FLAG_SEALED_SPLIT), self.slots[slot].next_sb_copy));
        let legs: [Option<(Channel, Superblock, u64)>; MAX_SLOTS] = std::array::from_fn(|s| {
            let c = &self.slots[s];
            if !c.holds_metadata() {
                return None;
            }
            Some((c.ch.clone()?, self.superblock_for(s, 0), c.next_sb_copy))
        });
        let states: [SlotState; MAX_SLOTS] = std::array::from_fn(|i| self.slots[i].rec.state);
        let sh = self.sh.clone();
        reactor::spawn_detached(async move {
            let own = match &own {
                Some((ch, sb, copy)) => write_superblock(ch, &g, sb, *copy).await,
                None => Err(BdevError::Offline),
            };
            // Without the leg's mark the start is not recorded anywhere (the split fails); a
            // seal goes on without it (the mark from the start is still there).
            let results = if own.is_ok() || matches!(step, SplitStep::Seal(_)) {
                let futs: [Option<_>; MAX_SLOTS] = std::array::from_fn(|s| legs[s].as_ref().map(|(ch, sb, copy)| write_superblock(ch, &g, sb, *copy)));
                join_slots(futs).await
            } else {
                Default::default()
            };
            sh.send(Request::SplitRecorded { step, own, results, states });
        });
    }

    fn split_recorded(&mut self, step: SplitStep, own: IoResult, results: [Option<IoResult>; MAX_SLOTS], states: [SlotState; MAX_SLOTS]) {
        self.split_sb_busy = false;
        let slot = step.slot();
        for (s, r) in results.iter().enumerate() {
            if matches!(r, Some(Ok(()))) {
                self.slots[s].next_sb_copy = 1 - self.slots[s].next_sb_copy;
            }
        }
        if own.is_ok() {
            self.slots[slot].next_sb_copy = 1 - self.slots[slot].next_sb_copy;
        }
        if results.iter().any(|r| matches!(r, Some(Ok(())))) {
            self.written_states = states;
        }
        let durable = self.settle_metadata_results(&results, "superblock");
        let pending = self.split.as_ref().is_some_and(|sp| sp.slot == slot);
        let state = self.slots[slot].rec.state;
        let fail = |name: &str| MirrorError::Io(format!("mirror {name}: the split could not be recorded on its legs"));
        match step {
            SplitStep::Start(_) if durable && own.is_ok() && pending && state == SlotState::Splitting && !self.slots[slot].failing => self.split_start(slot),
            SplitStep::Start(_) => {
                if let Err(e) = &own {
                    log::error!("mirror {}: marking leg {} as a split image failed: {e}", self.sh.props.name(), self.slots[slot].name);
                }
                if pending {
                    if let Some(sp) = self.split.take() {
                        sp.fail(fail(self.sh.props.name()));
                    }
                }
                if state == SlotState::Splitting {
                    self.slots[slot].rec.state = SlotState::Active;
                    self.slots[slot].rec.image.clear();
                    self.batch.need_sb = true;
                }
            }
            SplitStep::Seal(_) => {
                if let Err(e) = &own {
                    log::warn!("mirror {}: updating split leg {}'s own superblock failed: {e}", self.sh.props.name(), self.slots[slot].name);
                }
                if durable && pending && state == SlotState::Split {
                    self.seal(slot);
                } else if pending {
                    if let Some(sp) = self.split.take() {
                        sp.fail(fail(self.sh.props.name()));
                    }
                    self.slots[slot].rec.state = SlotState::Splitting;
                    self.depart(slot, SlotState::Failed);
                }
            }
        }
    }

    /// The split's instant: from here on new writes skip the leg.
    fn split_start(&mut self, slot: usize) {
        // The leg's stale map must list every region written from the split's instant on (a
        // re-join copies only those). A write that enters without asking is in a region whose
        // write-intent bit is set (the control task sets a bit before it opens a region, and
        // closes a region before it clears its bit), so the write-intent bitmap as of now
        // covers every such write; a write that asks is recorded when it is admitted. So no
        // region is closed and no host write is sent through this task by the split.
        self.stale[slot].clear_all();
        self.stale[slot].union_with(&self.wi);
        for p in 0..self.g.bitmap_pages {
            self.stale_dirty.insert((slot, p));
        }
        let ss = &self.sh.slots[slot];
        // Only this task moves the mirror's epoch, so the next one is known.
        let split_epoch = self.sh.gate.current() + 1;
        ss.split_epoch.store(split_epoch, SeqCst);
        ss.set_mode(LegMode::OldEpoch);
        let (closed, sealing) = match self.sh.gate.advance() {
            Ok(x) => x,
            Err(e) => {
                // Cannot happen with one split at a time; undo and refuse.
                ss.set_mode(LegMode::Active);
                self.slots[slot].rec.state = SlotState::Active;
                self.slots[slot].rec.image.clear();
                self.batch.need_sb = true;
                if let Some(sp) = self.split.take() {
                    sp.fail(MirrorError::Busy(e.to_string()));
                }
                return;
            }
        };
        // Only this task advances the mirror's epoch: the legs were told `split_epoch` above.
        assert_eq!(closed + 1, split_epoch, "the mirror's epoch moved under its control task");
        self.update_source();
        self.sh.counters.splits.fetch_add(1, Relaxed);
        log::info!("mirror {}: splitting off leg {} after epoch {closed}", self.sh.props.name(), self.slots[slot].name);
        if let Some(sp) = self.split.as_mut() {
            let entry = self.slots[slot].guard.as_ref().map(|g| g.entry().clone());
            if let (Some(r), Some(sealed), Some(leg)) = (sp.started.take(), sp.sealed_rx.take(), entry) {
                let _ = r.send(Ok(SplitStarted { leg, epoch: closed, sealed }));
            }
        }
        let sh = self.sh.clone();
        reactor::spawn_detached(async move {
            // The tracker answers once every write stamped with the closed epoch completed.
            let _ = sealing.await;
            sh.send(Request::SplitDrained { slot });
        });
    }

    fn split_drained(&mut self, slot: usize) {
        if !self.split.as_ref().is_some_and(|sp| sp.slot == slot) || self.slots[slot].rec.state != SlotState::Splitting || self.slots[slot].failing {
            return;
        }
        // The image must be durable before it is handed out; the flush runs off the control
        // loop (host writes that need the control task go on meanwhile).
        let ch = self.slots[slot].ch.clone();
        let sh = self.sh.clone();
        reactor::spawn_detached(async move {
            let result = match ch {
                Some(ch) => ch.flush().await,
                None => Err(BdevError::Offline),
            };
            sh.send(Request::SplitFlushed { slot, result });
        });
    }

    fn split_flushed(&mut self, slot: usize, result: IoResult) {
        if !self.split.as_ref().is_some_and(|sp| sp.slot == slot) || self.slots[slot].rec.state != SlotState::Splitting || self.slots[slot].failing {
            return;
        }
        if let Err(e) = result {
            log::error!("mirror {}: flushing split leg {} failed: {e}", self.sh.props.name(), self.slots[slot].name);
            self.depart(slot, SlotState::Failed);
            return;
        }
        self.slots[slot].rec.state = SlotState::Split;
        self.write_split_record(SplitStep::Seal(slot));
    }

    /// The seal is recorded: the leg leaves the mirror and goes to its image.
    fn seal(&mut self, slot: usize) {
        let Some(mut sp) = self.split.take().filter(|sp| sp.slot == slot) else { return };
        self.sh.slots[slot].set_mode(LegMode::Off);
        self.sh.slots[slot].set_entry(None);
        self.sh.layout_gen.fetch_add(1, SeqCst);
        self.slots[slot].ch = None;
        let guard = self.slots[slot].guard.take();
        let reply = sp.sealed.take();
        log::info!("mirror {}: leg {} sealed as image {} (generation {})", self.sh.props.name(), self.slots[slot].name, sp.image, self.generation);
        match (guard, reply) {
            (Some(leg), Some(reply)) => {
                let sealed = SplitSealed { leg, geometry: self.g, mirror_name: self.sh.props.name().to_string(), generation: self.generation };
                // If the caller is gone, the returned value (and with it the claim) is dropped.
                let _ = reply.send(Ok(sealed));
            }
            (guard, _) => drop(guard),
        }
    }

    // ---- background process ------------------------------------------------------------

    fn ensure_process(&mut self) {
        if self.process_running || self.shutting_down {
            return;
        }
        let rebuilding: Vec<usize> = (0..MAX_SLOTS).filter(|&s| self.slots[s].rec.state == SlotState::Rebuilding && !self.slots[s].failing).collect();
        let resync = !self.unsynced.is_empty() && self.active_count() >= 2;
        if rebuilding.is_empty() && !resync {
            return;
        }
        let total = rebuilding.iter().map(|&s| self.stale[s].count()).sum::<u64>() + if resync { self.unsynced.count() } else { 0 };
        self.process = Some(ProcessStatus {
            kind: if rebuilding.is_empty() { "resync" } else { "rebuild" },
            targets: rebuilding.iter().map(|&s| self.slots[s].name.clone()).collect(),
            total_regions: total,
            done_regions: 0,
            bytes: 0,
            started_ns: reactor::now_ns(),
            rate_bytes_per_sec: 0.0,
        });
        self.process_running = true;
        reactor::spawn_detached(rebuild::run(self.sh.clone()));
    }

    fn next_work(&self, from: u64) -> Option<u64> {
        let mut best = if self.active_count() >= 2 { self.unsynced.next_set(from) } else { None };
        for s in 0..MAX_SLOTS {
            if self.slots[s].rec.state == SlotState::Rebuilding && !self.slots[s].failing {
                if let Some(r) = self.stale[s].next_set(from) {
                    best = Some(best.map_or(r, |b| b.min(r)));
                }
            }
        }
        best
    }

    fn process_next(&mut self, cursor: u64) -> Option<Step> {
        let sources: Vec<usize> = {
            let src = self.sh.source_slot.load(SeqCst);
            let mut v: Vec<usize> = (0..MAX_SLOTS).filter(|&s| self.slots[s].in_sync()).collect();
            v.sort_by_key(|&s| s != src);
            v
        };
        let work = if self.shutting_down || sources.is_empty() { None } else { self.next_work(cursor).or_else(|| self.next_work(0)) };
        let Some(region) = work else {
            self.process_running = false;
            self.process = None;
            if !self.shutting_down {
                self.finish_rebuilds();
            }
            return None;
        };
        let targets = (0..MAX_SLOTS)
            .filter(|&s| self.slots[s].rec.state == SlotState::Rebuilding && !self.slots[s].failing && self.stale[s].get(region))
            .fold(0u8, |m, s| m | (1 << s));
        let resync = self.unsynced.get(region) && sources.len() >= 2;
        Some(Step { region, sources, targets, resync })
    }

    /// Legs whose copy is complete become in sync.
    fn finish_rebuilds(&mut self) {
        for s in 0..MAX_SLOTS {
            if self.slots[s].rec.state == SlotState::Rebuilding && !self.slots[s].failing && self.stale[s].is_empty() {
                log::info!("mirror {}: leg {} is in sync", self.sh.props.name(), self.slots[s].name);
                self.slots[s].rec.state = SlotState::Active;
                self.sh.slots[s].set_mode(LegMode::Active);
                self.batch.need_sb = true;
            }
        }
        self.update_source();
        self.sh.layout_gen.fetch_add(1, SeqCst);
    }

    fn process_done(&mut self, region: u64, copied: u8, resynced: bool, unreadable: bool, bytes: u64) {
        for s in 0..MAX_SLOTS {
            if copied & (1 << s) != 0 && self.slots[s].rec.state == SlotState::Rebuilding && !self.slots[s].failing && self.stale[s].clear(region) {
                self.stale_dirty.insert((s, self.g.page_of(region)));
                self.copied_unflushed[s].insert(region);
            }
        }
        if resynced && self.unsynced.clear(region) {
            self.sh.regions.clear(region, UNSYNCED);
        }
        if unreadable {
            log::error!("mirror {}: region {region} could not be read from any in-sync leg; legs being rebuilt are dropped", self.sh.props.name());
            for s in 0..MAX_SLOTS {
                if self.slots[s].rec.state == SlotState::Rebuilding && self.stale[s].get(region) {
                    self.depart(s, SlotState::Failed);
                }
            }
            if self.unsynced.clear(region) {
                self.sh.regions.clear(region, UNSYNCED);
            }
        }
        self.sh.counters.rebuild_bytes.fetch_add(bytes, Relaxed);
        self.sh.counters.rebuilt_regions.fetch_add(1, Relaxed);
        if let Some(p) = self.process.as_mut() {
            p.done_regions += 1;
            p.bytes += bytes;
            let secs = reactor::now_ns().saturating_sub(p.started_ns) as f64 / 1e9;
            p.rate_bytes_per_sec = if secs > 0.0 { p.bytes as f64 / secs } else { 0.0 };
        }
    }

    // ---- commit -----------------------------------------------------------------------

    /// Writes pages of bitmaps to every leg that holds metadata; legs that fail are dropped.
    /// True if an in-sync leg has them.
    async fn write_pages(&mut self, pages: Vec<(BitmapId, u64)>) -> bool {
        if pages.is_empty() {
            return true;
        }
        let g = self.g;
        let page = g.page_bytes as usize;
        let mut data = IoBuf::alloc(page * pages.len());
        for (i, (map, p)) in pages.iter().enumerate() {
            let out = &mut data[i * page..(i + 1) * page];
            match map {
                BitmapId::WriteIntent => self.wi.encode_page(*p, out),
                BitmapId::Stale(s) => self.stale[*s].encode_page(*p, out),
            }
        }
        let data = &data;
        let pages = &pages;
        let futs: [Option<_>; MAX_SLOTS] = std::array::from_fn(|s| {
            let slot = &self.slots[s];
            if !slot.holds_metadata() {
                return None;
            }
            let ch = slot.ch.clone()?;
            Some(async move {
                for (i, (map, p)) in pages.iter().enumerate() {
                    ch.write_buf(g.bitmap_page_block(*map, *p), &data[i * page..(i + 1) * page]).await?;
                }
                ch.flush().await
            })
        });
        let results = join_slots(futs).await;
        self.settle_metadata_results(&results, "bitmap")
    }

    async fn flush_legs(&mut self) {
        let futs: [Option<_>; MAX_SLOTS] = std::array::from_fn(|s| {
            let slot = &self.slots[s];
            // A leg being split off holds no metadata but still takes the writes before the
            // split's instant: a write-intent bit cleared must mean they are durable there too,
            // or a crash before the seal leaves the image without a write that the mirror no
            // longer lists for it (a re-join of the image would not copy that region).
            let ch = slot.ch.clone().filter(|_| slot.holds_metadata() || (slot.rec.state == SlotState::Splitting && !slot.failing))?;
            Some(async move { ch.flush().await })
        });
        let results = join_slots(futs).await;
        for (s, r) in results.iter().enumerate() {
            if matches!(r, Some(Ok(()))) {
                self.copied_unflushed[s].clear();
            }
        }
        self.settle_metadata_results(&results, "flush");
    }

    async fn write_superblocks(&mut self) -> bool {
        let g = self.g;
        let sbs: Vec<Option<Superblock>> = (0..MAX_SLOTS).map(|s| self.slots[s].holds_metadata().then(|| self.superblock_for(s, 0))).collect();
        let sbs = &sbs;
        let futs: [Option<_>; MAX_SLOTS] = std::array::from_fn(|s| {
            let sb = sbs[s].as_ref()?;
            let ch = self.slots[s].ch.clone()?;
            let copy = self.slots[s].next_sb_copy;
            Some(async move { write_superblock(&ch, &g, sb, copy).await })
        });
        let results = join_slots(futs).await;
        for (s, r) in results.iter().enumerate() {
            if matches!(r, Some(Ok(()))) {
                self.slots[s].next_sb_copy = 1 - self.slots[s].next_sb_copy;
            }
        }
        self.written_states = std::array::from_fn(|i| sbs.iter().flatten().next().map_or(self.written_states[i], |sb| sb.slots[i].state));
        self.settle_metadata_results(&results, "superblock")
    }

    fn settle_metadata_results(&mut self, results: &[Option<IoResult>; MAX_SLOTS], what: &str) -> bool {
        let mut durable = false;
        for (s, r) in results.iter().enumerate() {
            match r {
                Some(Ok(())) => durable |= self.slots[s].in_sync(),
                // Another head holds the leg: this one is fenced. The leg is not dropped (that
                // would be recorded on the others, which are the new head's now).
                Some(Err(e)) if super::fence::is_conflict(e) => self.sh.set_fenced(&self.slots[s].name),
                Some(Err(e)) => {
                    let stats = self.sh.leg_stats(self.sh.home, s);
                    // Metadata writes and flushes count as the leg's write errors.
                    stats.write_errors.fetch_add(1, Relaxed);
                    if self.slots[s].in_sync() && self.active_count() == 1 {
                        log::error!("mirror {}: {what} write to its last in-sync leg {} failed: {e}", self.sh.props.name(), self.slots[s].name);
                    } else {
                        log::error!("mirror {}: {what} write to leg {} failed ({e}); dropping it", self.sh.props.name(), self.slots[s].name);
                        self.sh.counters.leg_failures.fetch_add(1, Relaxed);
                        self.depart(s, SlotState::Failed);
                    }
                }
                None => {}
            }
        }
        durable
    }

    /// Persists what the batch changed, then answers what waited for it.
    async fn commit_and_answer(&mut self) {
        // A commit whose superblock records a split (its start or its seal) is I/O for a
        // preserve: a host write waiting for this commit waits on the split.
        let for_split = self.batch.need_sb && !self.split_sb_busy && self.records_split();
        if for_split {
            self.preserve_io();
        }
        let mut wi_durable = true;
        let mut sb_durable = true;
        let clearing = self.batch.clearing || self.shutting_down;
        // Each round can only drop more legs, so this ends.
        for _ in 0..=MAX_SLOTS + 1 {
            if clearing || (self.batch.need_sb && !self.stale_dirty.is_empty()) {
                // Data that completed must be durable before the bits that cover it go: a stale
                // bit cleared after a copy, a write-intent bit cleared after the writes.
                self.flush_legs().await;
            }
            if (clearing || self.batch.need_sb) && !self.stale_dirty.is_empty() {
                let pages: Vec<(BitmapId, u64)> = std::mem::take(&mut self.stale_dirty).into_iter().map(|(s, p)| (BitmapId::Stale(s), p)).collect();
                let n = pages.len();
                if !self.write_pages(pages).await {
                    log::error!("mirror {}: {n} stale-map pages reached no in-sync leg", self.sh.props.name());
                }
            }
            if !self.wi_dirty.is_empty() {
                let pages: Vec<(BitmapId, u64)> = std::mem::take(&mut self.wi_dirty).into_iter().map(|p| (BitmapId::WriteIntent, p)).collect();
                self.sh.counters.write_intent_persists.fetch_add(1, Relaxed);
                wi_durable &= self.write_pages(pages).await;
            }
            if self.batch.need_sb && !self.split_sb_busy {
                self.batch.need_sb = false;
                self.generation += 1;
                sb_durable = self.write_superblocks().await;
                if self.batch.need_sb && !self.split_sb_busy {
                    continue;
                }
            }
            if self.stale_dirty.is_empty() || !(clearing || self.batch.need_sb) {
                break;
            }
        }
        if for_split {
            self.preserve_io();
        }
        let mut batch = std::mem::take(&mut self.batch);
        // Superblock changes deferred behind a split's record: they and what waits for them go
        // with the next commit (`SplitRecorded` starts one).
        let sb_deferred = batch.need_sb && self.split_sb_busy;
        if sb_deferred {
            self.batch.need_sb = true;
            self.batch.after_sb = std::mem::take(&mut batch.after_sb);
        }
        if !wi_durable {
            // The bits reached no in-sync leg: forget them, so no write enters on them.
            for &r in &batch.pending_wi {
                self.wi.clear(r);
            }
        }
        for (r, reply) in batch.enters {
            if wi_durable && self.locks.contains_key(&r) {
                // Locked (a rebuild window, a repair) while its bit was being written: the
                // lock was granted on an empty region, so the write waits for the unlock.
                self.parked.entry(r).or_default().push(reply);
            } else if wi_durable {
                self.admit(r);
                let _ = reply.send(Ok(()));
            } else {
                let _ = reply.send(Err(BdevError::Media));
            }
        }
        for (r, reply) in batch.locks_after_wi {
            if wi_durable {
                self.begin_drain(r, reply);
            } else {
                let _ = reply.send(Err(BdevError::Media));
                self.unlock(r);
            }
        }
        if sb_deferred {
            // Failing legs are released once the deferred superblock records their departure.
        } else if sb_durable {
            for s in 0..MAX_SLOTS {
                if self.slots[s].failing {
                    self.slots[s].failing = false;
                    self.release_leg(s);
                }
            }
        } else if self.slots.iter().any(|s| s.failing) {
            // Try again with the next batch.
            self.batch.need_sb = true;
        }
        for a in batch.after_sb {
            let fail = || MirrorError::Io(format!("mirror {}: its metadata could not be written to any in-sync leg", self.sh.props.name()));
            match a {
                AfterSb::Io(reply) => {
                    let _ = reply.send(if sb_durable { Ok(()) } else { Err(BdevError::Media) });
                }
                AfterSb::Added(reply, info) => {
                    let _ = reply.send(if sb_durable { Ok(info) } else { Err(fail()) });
                }
                AfterSb::Removed(reply) => {
                    let _ = reply.send(if sb_durable { Ok(()) } else { Err(fail()) });
                }
                AfterSb::Forgot(reply) => {
                    let _ = reply.send(());
                }
            }
        }
        self.ensure_process();
        self.publish();
    }

    /// A departed leg stops receiving I/O; its claim is released once its in-flight I/O ended
    /// (or after a while: a leg that never answers must not stay claimed forever).
    fn release_leg(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        self.sh.slots[slot].set_mode(LegMode::Off);
        self.sh.slots[slot].set_entry(None);
        self.sh.layout_gen.fetch_add(1, SeqCst);
        s.ch = None;
        let Some(guard) = s.guard.take() else { return };
        let r = &mut self.rejoin[slot];
        r.departed = (s.rec.state == SlotState::Failed).then(|| Arc::downgrade(guard.entry()));
        r.delay_ns = self.sh.options.rejoin_interval_ns;
        r.at_ns = reactor::now_ns() + r.delay_ns;
        let sh = self.sh.clone();
        reactor::spawn_detached(async move {
            let deadline = reactor::now_ns() + RELEASE_WAIT.as_nanos() as u64;
            while sh.leg_in_flight(slot) > 0 && reactor::now_ns() < deadline {
                reactor::sleep(Duration::from_micros(100)).await;
            }
            drop(guard);
        });
    }

    /// Clean shutdown: quiet regions' bits cleared, everything written, legs released.
    async fn finish(&mut self) {
        let quiet: Vec<u64> = self
            .wi
            .iter_set()
            .filter(|&r| !self.unsynced.get(r) && !self.locks.contains_key(&r) && super::regions::count(self.sh.regions.load(r)) == 0)
            .collect();
        for r in quiet {
            self.wi.clear(r);
            self.wi_dirty.insert(self.g.page_of(r));
        }
        self.batch.need_sb = true;
        self.commit_and_answer().await;
        for s in 0..MAX_SLOTS {
            self.sh.slots[s].set_mode(LegMode::Off);
            self.sh.slots[s].set_entry(None);
            self.slots[s].ch = None;
            drop(self.slots[s].guard.take());
        }
        self.sh.layout_gen.fetch_add(1, SeqCst);
        self.publish();
        self.sh.status().shut_down = true;
        log::info!("mirror {}: shut down cleanly at generation {}", self.sh.props.name(), self.generation);
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn publish(&self) {
        let slots = (0..MAX_SLOTS)
            .filter(|&s| self.slots[s].rec.state != SlotState::Empty)
            .map(|s| {
                let c = &self.slots[s];
                SlotStatus {
                    slot: s,
                    name: c.name.clone(),
                    leg_uuid: c.rec.leg_uuid,
                    state: super::slot_state_name(c.rec.state, c.failing),
                    stale_regions: if c.rec.state == SlotState::Active && !c.failing { 0 } else { self.stale[s].count() },
                    image: c.rec.image.clone(),
                    rejoins_auto: self.rejoin[s].auto,
                    rejoins_rpc: self.rejoin[s].rpc,
                    last_rejoin: self.rejoin[s].last,
                }
            })
            .collect();
        let status = MirrorStatus {
            generation: self.generation,
            slots,
            dirty_regions: self.wi.count(),
            unsynced_regions: self.unsynced.count(),
            process: self.process.clone(),
            split_in_progress: self.split.as_ref().map(|sp| self.slots[sp.slot].name.clone()),
            shut_down: false,
        };
        *self.sh.status() = status;
    }
}

/// Writes `sb` to superblock copy `copy` of a leg and flushes.
pub(crate) async fn write_superblock(ch: &Channel, g: &Geometry, sb: &Superblock, copy: u64) -> IoResult {
    let mut buf = IoBuf::zeroed(g.page_bytes as usize);
    sb.encode(&mut buf[..SUPERBLOCK_BYTES]);
    ch.write_buf(g.superblock_block(copy), &buf).await?;
    ch.flush().await
}
