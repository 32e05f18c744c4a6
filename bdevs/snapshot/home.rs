//! The home core of a CoW volume: store slot allocation, the slot records, the two committers,
//! and the control flows that change the snapshot list (open/recover, preserve, seal, delete).
//! Other cores reach it with `call_on`; nothing here is touched by another core.
//!
//! Records and the header have a committer each. The record committer (record pages + one
//! flush per batch; a record that names new data carries a check of it, see `layout`, so the
//! data needs no flush of its own first) is what a host write that copies waits for; the header
//! committer (header + flush) is what a preserve, a seal, a delete or a failure waits for. Host
//! writes never wait for a header write (DESIGN §1: no host I/O waits for a preserve): a record
//! carrying an index whose header is not durable yet is harmless, since recovery drops the bits
//! of every index its header does not list, and a preserve is acknowledged only once its
//! header is durable.

use super::layout::{
    self, Check, DiskState, Geometry, Header, SnapRecord, HEADER_BYTES, MAX_PIECES, MAX_SNAPSHOTS, PAGE_BYTES, RECORDS_OFFSET, RECORDS_PER_PAGE, RECORD_BYTES,
};
use super::table::ZeroMap;
use super::{CowStats, SnapMeta, SnapSlot, VolumeShared, DEFAULT_GRAIN_KB, NO_LOCKLESS_EPOCH, ST_DELETING, ST_DRAINING, ST_FAILED, ST_FREE, ST_SEALED};
use crate::bdev::{BdevError, BdevProps, Channel, HoldGuard, IoBuf, IoResult};
use crate::extent_lock::LockSpace;
use crate::preserve::{unix_ms, EpochTracker, FreezeGate, PreserveError, SealSignal, SnapshotState};
use crate::reactor;
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use uuid::Uuid;

/// What opening a CoW volume needs.
pub struct OpenParams {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub base: HoldGuard,
    pub store: HoldGuard,
    pub grain_kb: Option<u32>,
    /// Cores of the reactor set (lock shards, epoch counters).
    pub cores: usize,
    /// Grains per extent-lock region (a power of two; default 64). Small regions spread a
    /// volume's locks over more shards and make writes take several pieces.
    pub lock_region_grains: Option<u32>,
}

/// A change of one slot record. The slot's piece bitmap is set by the writer (under the
/// grain's lock, after the pieces' data is written) before it asks for the change. A change
/// that names data written since the last flush carries its check (`layout::Check`).
pub(crate) enum Update {
    /// Slot `slot` now holds grain `grain` for the snapshots of `mask`.
    Set { slot: u32, grain: u32, mask: u32, check: Check },
    /// The snapshots of `mask` no longer use slot `slot`.
    Clear { slot: u32, mask: u32 },
    /// Slot `slot` holds more pieces than its record on media says.
    Pieces { slot: u32, check: Check },
}

struct Home {
    v: Arc<VolumeShared>,
    free: RefCell<Vec<u32>>,
    hwm: Cell<u32>,
    /// Slots freed by record changes not yet durable: reusable once their batch is.
    freed_pending: RefCell<Vec<u32>>,
    dirty: RefCell<BTreeSet<u64>>,
    /// Checks the next write of their record's page carries (slots whose copy is not durable).
    checks: RefCell<BTreeMap<u32, Check>>,
    /// Slots whose record on media may still carry a check: their data is durable, but until
    /// the page is written again their bytes must not change in place (the check would fail
    /// after a crash and drop them). Cleared when their page is written again.
    checked_on_media: RefCell<BTreeSet<u32>>,
    /// Pages to write again without their checks: they ride along with the next batch, or get
    /// one of their own once the committer has been idle for [`CLEANUP_IDLE`]. Never a batch
    /// of their own while writers wait: that would put one more flush between each round of
    /// first writes and the next.
    cleanup: RefCell<BTreeSet<u64>>,
    /// Waiters for the next record batch.
    waiters: RefCell<Vec<oneshot::Sender<IoResult>>>,
    /// The in-memory snapshot list changed since the last header write was built.
    header_dirty: Cell<bool>,
    /// Waiters for the next header write.
    header_waiters: RefCell<Vec<oneshot::Sender<IoResult>>>,
    seq: Cell<u64>,
}

#[derive(Default)]
struct Homes(RefCell<BTreeMap<u64, Rc<Home>>>);

fn home_of(id: u64) -> Option<Rc<Home>> {
    reactor::with_core(|c| c.local::<Homes>()).0.borrow().get(&id).cloned()
}

impl Home {
    fn alloc(&self) -> Option<u32> {
        let s = match self.free.borrow_mut().pop() {
            Some(s) => s,
            None if self.hwm.get() < self.v.geo.slot_count => {
                self.hwm.set(self.hwm.get() + 1);
                self.hwm.get() - 1
            }
            None => return None,
        };
        self.v.stats.used_slots.fetch_add(1, Relaxed);
        Some(s)
    }

    fn unused(&self, slot: u32) {
        // A slot goes back to the free list once its record is cleared; one still recorded
        // would be handed out again while a snapshot reads it.
        assert_eq!(self.v.records.at(slot as usize).load(Relaxed), 0, "an unused slot has no record");
        self.v.pieces.at(slot as usize).store(0, SeqCst);
        self.free.borrow_mut().push(slot);
        self.v.stats.used_slots.fetch_sub(1, Relaxed);
    }

    /// Snapshot indices whose bits records may carry.
    fn valid_mask(&self) -> u32 {
        (0..MAX_SNAPSHOTS).filter(|&i| matches!(self.v.snaps[i].state.load(SeqCst), ST_DRAINING | ST_SEALED | ST_FAILED)).fold(0, |m, i| m | 1 << i)
    }

    fn set_record(&self, slot: u32, grain: u32, mask: u32) {
        let r = if mask == 0 { 0 } else { layout::record(grain, mask) };
        self.v.records.at(slot as usize).store(r, Relaxed);
        if mask == 0 {
            // A free slot holds no pieces: whoever takes it next sets its own.
            self.v.pieces.at(slot as usize).store(0, SeqCst);
        }
        self.dirty.borrow_mut().insert(slot as u64 / RECORDS_PER_PAGE);
    }

    fn commit(&self, updates: Vec<Update>) -> oneshot::Receiver<IoResult> {
        let valid = self.valid_mask();
        for u in updates {
            let (slot, grain, mask) = match u {
                Update::Set { slot, grain, mask, check } => {
                    self.set_check(slot, check);
                    (slot, grain, mask & valid)
                }
                Update::Clear { slot, mask } => {
                    let r = self.v.records.at(slot as usize).load(Relaxed);
                    (slot, layout::record_grain(r), layout::record_mask(r) & !mask)
                }
                Update::Pieces { slot, check } => {
                    self.set_check(slot, check);
                    self.dirty.borrow_mut().insert(slot as u64 / RECORDS_PER_PAGE);
                    continue;
                }
            };
            log::trace!(
                "{}: record slot {slot} := grain {grain} mask {mask:#x} pieces {:#x}",
                self.v.props.name(),
                self.v.pieces.at(slot as usize).load(SeqCst)
            );
            self.set_record(slot, grain, mask);
            if mask == 0 {
                self.freed_pending.borrow_mut().push(slot);
                self.v.stats.used_slots.fetch_sub(1, Relaxed);
            }
        }
        self.wait_batch()
    }

    fn set_check(&self, slot: u32, check: Check) {
        if check.added != 0 {
            self.checks.borrow_mut().insert(slot, check);
        }
    }

    /// Whether slot `slot`'s record on media may carry a check (or is about to): if so, its
    /// page is queued for a rewrite without it and the receiver says when that is durable.
    fn unchecked(&self, slot: u32) -> Option<oneshot::Receiver<IoResult>> {
        if !self.checks.borrow().contains_key(&slot) && !self.checked_on_media.borrow().contains(&slot) {
            return None;
        }
        self.dirty.borrow_mut().insert(slot as u64 / RECORDS_PER_PAGE);
        Some(self.wait_batch())
    }

    /// After a batch wrote `pages` (`ok`: durably), carrying the checks of `checked`: those
    /// slots' data is durable now, so their checks leave RAM and their pages are queued for a
    /// cleanup (written again without the checks, so the store is opened with few to verify);
    /// slots whose page was written without a check have none on media.
    fn batch_done(&self, pages: &[u64], checked: &[u32], ok: bool) {
        let mut checks = self.checks.borrow_mut();
        for s in checked {
            checks.remove(s);
        }
        if !ok {
            return;
        }
        let mut on_media = self.checked_on_media.borrow_mut();
        for &p in pages {
            let (a, b) = ((p * RECORDS_PER_PAGE) as u32, ((p + 1) * RECORDS_PER_PAGE).min(u32::MAX as u64) as u32);
            let gone: Vec<u32> = on_media.range(a..b).copied().collect();
            for s in gone {
                on_media.remove(&s);
            }
        }
        let mut cleanup = self.cleanup.borrow_mut();
        for &s in checked {
            on_media.insert(s);
            cleanup.insert(s as u64 / RECORDS_PER_PAGE);
        }
    }

    /// Waits for the next record batch (it writes every record page dirty now).
    fn wait_batch(&self) -> oneshot::Receiver<IoResult> {
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().push(tx);
        self.v.committer.wake();
        rx
    }

    /// Queues a header write (built from the snapshot list as it is when the write starts) and
    /// waits until it is durable. Never behind a record batch, and no record batch behind it.
    fn wait_header(&self) -> oneshot::Receiver<IoResult> {
        let (tx, rx) = oneshot::channel();
        self.header_dirty.set(true);
        self.header_waiters.borrow_mut().push(tx);
        self.v.header_committer.wake();
        rx
    }

    fn header(&self) -> Header {
        let v = &self.v;
        self.seq.set(self.seq.get() + 1);
        let snaps = v
            .snaps
            .iter()
            .map(|s| {
                let m = s.meta();
                if m.disk_state == DiskState::Free {
                    return SnapRecord::free();
                }
                SnapRecord {
                    state: m.disk_state,
                    epoch: s.epoch.load(SeqCst),
                    created_ms: m.created_ms,
                    seal_ns: m.seal_ns,
                    uuid: m.uuid,
                    name: m.name.clone(),
                }
            })
            .collect();
        Header {
            seq: self.seq.get(),
            uuid: v.props.uuid(),
            base_num_blocks: v.num_blocks,
            block_size: v.block_size,
            grain_blocks: v.grain_blocks() as u32,
            piece_blocks: 1 << v.piece_shift,
            slot_count: v.geo.slot_count,
            snaps,
        }
    }

    fn page(&self, p: u64) -> IoBuf {
        let mut b = IoBuf::zeroed(PAGE_BYTES);
        for k in 0..RECORDS_PER_PAGE {
            let slot = p * RECORDS_PER_PAGE + k;
            if slot < self.v.geo.slot_count as u64 {
                let r = self.v.records.at(slot as usize).load(Relaxed);
                if r != 0 {
                    let o = k as usize * RECORD_BYTES;
                    let check = self.checks.borrow().get(&(slot as u32)).copied().unwrap_or_default();
                    b[o..o + RECORD_BYTES].copy_from_slice(&layout::encode_record(r, self.v.pieces.at(slot as usize).load(SeqCst), check));
                }
            }
        }
        b
    }

    /// Marks the snapshots of `mask` failed (those still draining or sealed), logging `why`
    /// at ERROR, and queues the header that records it.
    fn mark_failed(&self, mask: u32, why: &str) {
        let v = &self.v;
        for i in (0..MAX_SNAPSHOTS).filter(|i| mask & (1 << i) != 0) {
            let s = &v.snaps[i];
            let st = s.state.load(SeqCst);
            if (st == ST_DRAINING || st == ST_SEALED) && s.state.compare_exchange(st, ST_FAILED, SeqCst, SeqCst).is_ok() {
                v.live.fetch_and(!(1 << i), SeqCst);
                v.stats.snapshots_failed.fetch_add(1, Relaxed);
                let mut m = s.meta();
                m.disk_state = DiskState::Failed;
                m.signal.set(SnapshotState::Failed);
                log::error!("volume {}: snapshot {} failed: {why}", v.props.name(), m.name);
            }
        }
        self.header_dirty.set(true);
        v.header_committer.wake();
    }
}

/// How long the record committer waits with nothing else to do before it writes the pages
/// whose checks only need clearing.
const CLEANUP_IDLE: std::time::Duration = std::time::Duration::from_millis(5);

/// Writes a record batch: record pages, flush. No flush before: the slot data the records
/// name is either durable already or covered by the records' checks.
async fn write_batch(v: &VolumeShared, pages: &[(u64, IoBuf)]) -> IoResult {
    let store = Channel::get(&v.store)?;
    let writes = pages.iter().map(|(p, b)| store.write_buf((RECORDS_OFFSET + p * PAGE_BYTES as u64) / v.store_bs, &b[..]));
    for r in futures::future::join_all(writes).await {
        r?;
    }
    store.flush().await
}

/// Writes header `h` into the copy its sequence number selects, then flushes. The flows that
/// need data durable before their header (seal, delete, format, recovery) flush or commit it
/// themselves first; one header write at a time (the header committer), so the two copies
/// alternate and a torn write always leaves the previous header readable.
async fn write_header(v: &VolumeShared, h: &Header) -> IoResult {
    let store = Channel::get(&v.store)?;
    let mut b = IoBuf::alloc(HEADER_BYTES);
    b.copy_from_slice(&h.encode());
    store.write_buf(Header::copy_offset(h.seq) / v.store_bs, &b[..]).await?;
    store.flush().await
}

/// The record committer of a volume: batches every record change made while the previous
/// batch was being written.
async fn committer(h: Rc<Home>) {
    loop {
        let mut idle: Option<reactor::Sleep> = None;
        let work = poll_fn(|cx| {
            h.v.committer.register(cx.waker());
            if !h.waiters.borrow().is_empty() || !h.dirty.borrow().is_empty() {
                Poll::Ready(true)
            } else if h.v.closed.load(SeqCst) {
                // Checks left on media are harmless (their data is durable): the next open
                // verifies and clears them.
                Poll::Ready(false)
            } else if !h.cleanup.borrow().is_empty() {
                let sleep = idle.get_or_insert_with(|| reactor::sleep(CLEANUP_IDLE));
                std::pin::Pin::new(sleep).poll(cx).map(|()| true)
            } else {
                Poll::Pending
            }
        })
        .await;
        if !work {
            break;
        }
        let mut numbers = std::mem::take(&mut *h.dirty.borrow_mut());
        numbers.append(&mut h.cleanup.borrow_mut());
        let pages: Vec<(u64, IoBuf)> = numbers.into_iter().map(|p| (p, h.page(p))).collect();
        let numbers: Vec<u64> = pages.iter().map(|p| p.0).collect();
        let checked: Vec<u32> = h.checks.borrow().keys().copied().filter(|&s| numbers.binary_search(&(s as u64 / RECORDS_PER_PAGE)).is_ok()).collect();
        let waiters = std::mem::take(&mut *h.waiters.borrow_mut());
        let freed = std::mem::take(&mut *h.freed_pending.borrow_mut());
        log::trace!("{}: commit pages {numbers:?}", h.v.props.name());
        let r = write_batch(&h.v, &pages).await;
        h.batch_done(&numbers, &checked, r.is_ok());
        if let Err(e) = &r {
            log::error!("{}: writing CoW metadata to {} failed: {e}", h.v.props.name(), h.v.store.name());
        } else {
            h.free.borrow_mut().extend(freed);
        }
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }
    reactor::with_core(|c| c.local::<Homes>()).0.borrow_mut().remove(&h.v.id);
}

/// The header committer of a volume: writes the header whenever the snapshot list changed,
/// one write at a time (each built when it starts, so it carries every change made before).
async fn header_committer(h: Rc<Home>) {
    loop {
        let work = poll_fn(|cx| {
            h.v.header_committer.register(cx.waker());
            if h.header_dirty.get() || !h.header_waiters.borrow().is_empty() {
                Poll::Ready(true)
            } else if h.v.closed.load(SeqCst) {
                Poll::Ready(false)
            } else {
                Poll::Pending
            }
        })
        .await;
        if !work {
            break;
        }
        h.header_dirty.set(false);
        let hd = h.header();
        let waiters = std::mem::take(&mut *h.header_waiters.borrow_mut());
        log::trace!("{}: commit header {}", h.v.props.name(), hd.seq);
        let r = write_header(&h.v, &hd).await;
        if let Err(e) = &r {
            log::error!("{}: writing the CoW header to {} failed: {e}", h.v.props.name(), h.v.store.name());
        }
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }
}

// ---- calls from any core ----

pub(crate) async fn alloc(v: &VolumeShared) -> Option<u32> {
    let id = v.id;
    reactor::call_on(v.home, move || home_of(id).and_then(|h| h.alloc())).await
}

pub(crate) async fn unused(v: &VolumeShared, slot: u32) {
    let id = v.id;
    reactor::call_on(v.home, move || home_of(id).map(|h| h.unused(slot))).await;
}

/// Marks the snapshots of `mask` failed because of `why`, and waits until that is durable:
/// the caller is about to write the live image without the copy those snapshots needed, and
/// after a crash they must not come back as sealed images that read the new data.
pub(crate) async fn fail(v: &VolumeShared, mask: u32, why: String) -> IoResult {
    let id = v.id;
    let rx = reactor::call_on(v.home, move || {
        home_of(id).map(|h| {
            h.mark_failed(mask, &why);
            h.wait_header()
        })
    })
    .await
    .ok_or(BdevError::Offline)?;
    rx.await.unwrap_or(Err(BdevError::Offline))
}

/// Applies record changes and waits until they are durable.
pub(crate) async fn commit(v: &VolumeShared, updates: Vec<Update>) -> IoResult {
    let id = v.id;
    let rx = reactor::call_on(v.home, move || home_of(id).map(|h| h.commit(updates))).await.ok_or(BdevError::Offline)?;
    rx.await.unwrap_or(Err(BdevError::Offline))
}

/// Waits until slot `slot`'s record on media carries no check, so that bytes of its pieces
/// may change in place (a check written for the old bytes would drop them after a crash).
pub(crate) async fn unchecked(v: &VolumeShared, slot: u32) -> IoResult {
    let id = v.id;
    loop {
        match reactor::call_on(v.home, move || home_of(id).map(|h| h.unchecked(slot))).await.ok_or(BdevError::Offline)? {
            None => return Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(BdevError::Offline))?,
        }
    }
}

/// Writes the header (with every change made to the snapshot list so far) and waits until it
/// is durable.
async fn header_durable(v: &VolumeShared) -> IoResult {
    let id = v.id;
    let rx = reactor::call_on(v.home, move || home_of(id).map(|h| h.wait_header())).await.ok_or(BdevError::Offline)?;
    rx.await.unwrap_or(Err(BdevError::Offline))
}

// ---- control flows, on the home core ----

fn invalid(name: &str, what: impl std::fmt::Display) -> String {
    format!("CoW volume {name}: {what}")
}

/// Opens a volume: formats a blank store or recovers an existing one (see the module doc of
/// `snapshot` for what a crash leaves and how it is repaired). Returns the live snapshots as
/// (index, generation).
pub(crate) async fn open(p: OpenParams) -> Result<(Arc<VolumeShared>, Vec<(usize, u64)>), String> {
    let name = p.name.clone();
    let base = p.base.entry().clone();
    let store = p.store.entry().clone();
    let (block_size, num_blocks) = (base.bdev().block_size(), base.bdev().num_blocks());
    let store_bs = store.bdev().block_size() as u64;
    if store_bs > 4096 || 4096 % store_bs != 0 {
        return Err(invalid(&name, format!("store bdev {} has {store_bs}-byte blocks; CoW stores need blocks of at most 4096 bytes", store.name())));
    }
    let store_bytes = store.bdev().num_blocks() * store_bs;
    let sch = Channel::get(&store).map_err(|e| invalid(&name, format!("cannot open store {}: {e}", store.name())))?;
    let mut hb = IoBuf::alloc(2 * HEADER_BYTES);
    if store_bytes < 2 * HEADER_BYTES as u64 {
        return Err(invalid(&name, format!("store bdev {} is too small ({store_bytes} bytes)", store.name())));
    }
    sch.read_buf(0, &mut hb[..]).await.map_err(|e| invalid(&name, format!("cannot read store {}: {e}", store.name())))?;
    let found = [Header::decode(&hb[..HEADER_BYTES]), Header::decode(&hb[HEADER_BYTES..])].into_iter().flatten().max_by_key(|h| h.seq);
    let (header, fresh) = match found {
        Some(h) => (h, false),
        None => {
            for copy in [&hb[..HEADER_BYTES], &hb[HEADER_BYTES..]] {
                let version = u32::from_le_bytes(copy[8..12].try_into().expect("4 bytes"));
                if copy[..8] == layout::MAGIC && !(layout::OLDEST_READABLE..=layout::VERSION).contains(&version) {
                    return Err(invalid(
                        &name,
                        format!(
                            "store {} is in CoW store format {version}; this tidemark reads formats {} to {}",
                            store.name(),
                            layout::OLDEST_READABLE,
                            layout::VERSION
                        ),
                    ));
                }
            }
            let ours = hb[..8] == layout::MAGIC || hb[HEADER_BYTES..HEADER_BYTES + 8] == layout::MAGIC || hb.iter().all(|&b| b == 0);
            if !ours {
                return Err(invalid(
                    &name,
                    format!("store bdev {} holds data that is not a tidemark CoW store; zero its first 32 KiB to reuse it", store.name()),
                ));
            }
            let grain_kb = p.grain_kb.unwrap_or(DEFAULT_GRAIN_KB);
            check_grain(&name, grain_kb, block_size, store_bs)?;
            let grain_bytes = grain_kb as u64 * 1024;
            let geo = Geometry::fit(store_bytes, grain_bytes)
                .ok_or_else(|| invalid(&name, format!("store bdev {} is too small for one {grain_kb} KiB grain", store.name())))?;
            let h = Header {
                seq: 0,
                uuid: p.uuid.unwrap_or_else(Uuid::new_v4),
                base_num_blocks: num_blocks,
                block_size,
                grain_blocks: (grain_bytes / block_size as u64) as u32,
                piece_blocks: layout::piece_blocks((grain_bytes / block_size as u64) as u32, block_size, store_bs as u32),
                slot_count: geo.slot_count,
                snaps: vec![SnapRecord::free(); MAX_SNAPSHOTS],
            };
            (h, true)
        }
    };
    if header.base_num_blocks != num_blocks || header.block_size != block_size {
        return Err(invalid(
            &name,
            format!(
                "store {} belongs to a base of {} blocks of {} bytes; base {} has {num_blocks} of {block_size}",
                store.name(),
                header.base_num_blocks,
                header.block_size,
                base.name()
            ),
        ));
    }
    if header.grain_blocks == 0 || !header.grain_blocks.is_power_of_two() {
        return Err(invalid(&name, format!("store {} has a damaged header (grain of {} blocks)", store.name(), header.grain_blocks)));
    }
    let grain_bytes = header.grain_blocks as u64 * block_size as u64;
    let pb = header.piece_blocks;
    if pb == 0 || !pb.is_power_of_two() || pb > header.grain_blocks || header.grain_blocks / pb > MAX_PIECES || (pb as u64 * block_size as u64) % store_bs != 0
    {
        return Err(invalid(&name, format!("store {} has a damaged header (pieces of {pb} blocks, store blocks of {store_bs} bytes)", store.name())));
    }
    if let Some(kb) = p.grain_kb {
        if kb as u64 * 1024 != grain_bytes {
            return Err(invalid(&name, format!("store {} was formatted with grain_kb {}, not {kb}", store.name(), grain_bytes >> 10)));
        }
    }
    if let Some(u) = p.uuid {
        if u != header.uuid {
            return Err(invalid(&name, format!("store {} belongs to volume uuid {}, not {u}", store.name(), header.uuid)));
        }
    }
    let geo = Geometry::with_slots(grain_bytes, header.slot_count);
    if geo.slot_offset(header.slot_count) > store_bytes || grain_bytes % store_bs != 0 {
        return Err(invalid(&name, format!("store {} is smaller than its header says", store.name())));
    }
    let grain_shift = header.grain_blocks.trailing_zeros();
    let num_grains = num_blocks.div_ceil(header.grain_blocks as u64);
    if num_grains > u32::MAX as u64 {
        return Err(invalid(&name, "more than 2^32 grains; use a larger grain_kb"));
    }
    let mut snaps = Vec::with_capacity(MAX_SNAPSHOTS);
    for r in &header.snaps {
        let state = match r.state {
            DiskState::Draining | DiskState::Sealed => ST_SEALED,
            DiskState::Failed => ST_FAILED,
            DiskState::Free | DiskState::Deleting => ST_FREE,
        };
        let disk_state = match state {
            ST_SEALED => DiskState::Sealed,
            ST_FAILED => DiskState::Failed,
            _ => DiskState::Free,
        };
        let signal = SealSignal::new();
        signal.set(if state == ST_FAILED { SnapshotState::Failed } else { SnapshotState::Sealed });
        snaps.push(SnapSlot {
            state: AtomicU8::new(state),
            epoch: AtomicU64::new(r.epoch),
            generation: AtomicU64::new(0),
            grains: ZeroMap::new(num_grains as usize).map_err(|e| invalid(&name, e))?,
            entries: AtomicU64::new(0),
            meta: Mutex::new(SnapMeta { name: r.name.clone(), uuid: r.uuid, created_ms: r.created_ms, seal_ns: r.seal_ns, disk_state, signal }),
        });
    }
    let live_mask = (0..MAX_SNAPSHOTS).filter(|&i| snaps[i].state.load(Relaxed) == ST_SEALED).fold(0u32, |m, i| m | 1 << i);
    let valid = (0..MAX_SNAPSHOTS).filter(|&i| snaps[i].state.load(Relaxed) != ST_FREE).fold(0u32, |m, i| m | 1 << i);
    let first_epoch =
        header.snaps.iter().filter(|r| matches!(r.state, DiskState::Draining | DiskState::Sealed | DiskState::Failed)).map(|r| r.epoch + 1).max().unwrap_or(1);
    let region_grains = p.lock_region_grains.unwrap_or(64).max(1) as u64;
    let locks = LockSpace::new(p.cores, header.grain_blocks as u64 * region_grains);
    let v = Arc::new(VolumeShared {
        // The lock space's id is unique in the process: it keys the home registry too.
        id: locks.id(),
        props: BdevProps::new(name.clone(), "CoW volume", block_size, num_blocks, header.uuid),
        base: base.clone(),
        store: store.clone(),
        claims: Mutex::new(vec![p.base, p.store]),
        block_size,
        num_blocks,
        grain_shift,
        piece_shift: pb.trailing_zeros(),
        num_grains,
        geo,
        store_bs,
        home: reactor::current_index(),
        tracker: EpochTracker::new(p.cores, first_epoch),
        locks,
        gate: FreezeGate::default(),
        snaps,
        live: AtomicU32::new(live_mask),
        lockless_upto: AtomicU64::new(NO_LOCKLESS_EPOCH),
        records: ZeroMap::new(header.slot_count as usize).map_err(|e| invalid(&name, e))?,
        pieces: ZeroMap::new(header.slot_count as usize).map_err(|e| invalid(&name, e))?,
        closed: AtomicBool::new(false),
        committer: futures::task::AtomicWaker::new(),
        header_committer: futures::task::AtomicWaker::new(),
        stats: CowStats::default(),
    });
    let home = Rc::new(Home {
        v: v.clone(),
        free: RefCell::new(Vec::new()),
        hwm: Cell::new(0),
        freed_pending: RefCell::new(Vec::new()),
        dirty: RefCell::new(BTreeSet::new()),
        checks: RefCell::new(BTreeMap::new()),
        checked_on_media: RefCell::new(BTreeSet::new()),
        cleanup: RefCell::new(BTreeSet::new()),
        waiters: RefCell::new(Vec::new()),
        header_dirty: Cell::new(false),
        header_waiters: RefCell::new(Vec::new()),
        seq: Cell::new(header.seq),
    });
    let io = |e: BdevError| invalid(&name, format!("store {}: {e}", store.name()));
    if fresh {
        // The record area must read as zeros.
        let pages = geo.record_pages();
        let zero = IoBuf::zeroed(64 * PAGE_BYTES);
        let mut p0 = 0;
        while p0 < pages {
            let n = (pages - p0).min(64);
            sch.write_buf((RECORDS_OFFSET + p0 * PAGE_BYTES as u64) / store_bs, &zero[..(n as usize * PAGE_BYTES)]).await.map_err(io)?;
            p0 += n;
        }
        // The zeroed record area durable before the header that says the store is ours.
        sch.flush().await.map_err(io)?;
        write_header(&v, &home.header()).await.map_err(io)?;
        log::info!("{name}: formatted CoW store {} ({} slots of {} KiB)", store.name(), geo.slot_count, grain_bytes >> 10);
    } else {
        // The copy the next header goes to may hold a header torn by the crash, with the
        // sequence number the next header takes again: its CRC is zeroed before anything is
        // written, or a later torn header could make it whole (see `lvol::void_slot`).
        sch.patch_block(Header::copy_offset(header.seq + 1) / store_bs, |b| b[Header::CRC].fill(0)).await.map_err(io)?;
        recover(&home, &sch, valid).await.map_err(io)?;
    }
    reactor::with_core(|c| c.local::<Homes>()).0.borrow_mut().insert(v.id, home.clone());
    reactor::spawn_detached(committer(home.clone()));
    reactor::spawn_detached(header_committer(home));
    let live = (0..MAX_SNAPSHOTS).filter(|&i| v.snaps[i].state.load(SeqCst) != ST_FREE).map(|i| (i, 0)).collect();
    Ok((v, live))
}

fn check_grain(name: &str, grain_kb: u32, block_size: u32, store_bs: u64) -> Result<(), String> {
    let gb = grain_kb as u64 * 1024;
    if !grain_kb.is_power_of_two() || !(4..=1024).contains(&grain_kb) {
        return Err(invalid(name, format!("grain_kb {grain_kb} must be a power of two from 4 to 1024")));
    }
    if gb < block_size as u64 || gb < store_bs {
        return Err(invalid(name, format!("grain_kb {grain_kb} is smaller than a block")));
    }
    Ok(())
}

/// Rebuilds the tables from the records and repairs what a crash left: bits of indices that
/// are not live, entries beyond the volume, pieces beyond the grain, a grain claimed twice by
/// one snapshot (a split cut between its two commits: either copy is a valid image of that
/// draining snapshot), snapshots that were draining (now sealed), deletions half done, copies
/// whose check fails (the crash kept their record but not all of their data).
async fn recover(h: &Home, sch: &Channel, valid: u32) -> IoResult {
    let v = &h.v;
    let pages = v.geo.record_pages();
    let chunk = 64u64;
    let mut buf = IoBuf::alloc(chunk as usize * PAGE_BYTES);
    let mut piece_buf = IoBuf::alloc(v.geo.grain_bytes as usize);
    let (mut hwm, mut used, mut dropped) = (0u32, 0u64, 0u64);
    let mut p0 = 0;
    while p0 < pages {
        let n = (pages - p0).min(chunk);
        let bytes = n as usize * PAGE_BYTES;
        sch.read_buf((RECORDS_OFFSET + p0 * PAGE_BYTES as u64) / v.store_bs, &mut buf[..bytes]).await?;
        for k in 0..(n * RECORDS_PER_PAGE) {
            let slot = p0 * RECORDS_PER_PAGE + k;
            if slot >= v.geo.slot_count as u64 {
                break;
            }
            let o = k as usize * RECORD_BYTES;
            let (r, mut pieces, check) = layout::decode_record(&buf[o..o + RECORD_BYTES]);
            if r == 0 {
                continue;
            }
            let g = layout::record_grain(r);
            let mut m = layout::record_mask(r) & valid;
            if g as u64 >= v.num_grains {
                m = 0;
            }
            if check.added != 0 {
                // Cleared on media by the batch below, whatever the outcome.
                h.dirty.borrow_mut().insert(slot / RECORDS_PER_PAGE);
                if m != 0 && !check_holds(v, sch, slot as u32, g as u64, check, &mut piece_buf).await? {
                    pieces &= !check.added;
                    dropped += 1;
                    if pieces == 0 {
                        m = 0;
                    }
                }
            }
            let claimed = m;
            for i in (0..MAX_SNAPSHOTS).filter(|i| claimed & (1 << i) != 0) {
                let e = v.snaps[i].grains.at(g as usize);
                if e.load(Relaxed) != 0 {
                    m &= !(1 << i);
                } else {
                    e.store(slot as u32 + 1, Relaxed);
                    v.snaps[i].entries.fetch_add(1, Relaxed);
                }
            }
            let new = if m == 0 { 0 } else { layout::record(g, m) };
            v.records.at(slot as usize).store(new, Relaxed);
            let kept = if new == 0 {
                0
            } else {
                let (gs, glen) = v.grain_range(g as u64);
                pieces & v.piece_mask(g as u64, gs, glen)
            };
            v.pieces.at(slot as usize).store(kept, Relaxed);
            if new != r || kept != pieces {
                h.dirty.borrow_mut().insert(slot / RECORDS_PER_PAGE);
            }
            if new != 0 {
                hwm = slot as u32 + 1;
                used += 1;
            }
        }
        p0 += n;
    }
    if dropped > 0 {
        log::warn!(
            "volume {}: {dropped} copies in the CoW store were cut by a crash before they were durable; dropped (their host writes had not reached the volume)",
            v.props.name()
        );
    }
    h.hwm.set(hwm);
    h.free.borrow_mut().extend((0..hwm).rev().filter(|&s| v.records.at(s as usize).load(Relaxed) == 0));
    v.stats.used_slots.store(used, Relaxed);
    // Repaired records first, durable, then the header that frees indices and seals the
    // snapshots a crash interrupted (their old-epoch I/O is gone with the crash).
    let pages: Vec<(u64, IoBuf)> = std::mem::take(&mut *h.dirty.borrow_mut()).into_iter().map(|p| (p, h.page(p))).collect();
    if !pages.is_empty() {
        write_batch(v, &pages).await?;
    }
    Channel::get(&v.base)?.flush().await?;
    Channel::get(&v.store)?.flush().await?;
    write_header(v, &h.header()).await
}

/// Whether the pieces `check.added` of slot `slot` (grain `g`) read as the check says.
async fn check_holds(v: &VolumeShared, sch: &Channel, slot: u32, g: u64, check: Check, buf: &mut IoBuf) -> Result<bool, BdevError> {
    let mut crc = 0u32;
    for (within, len) in v.piece_bytes(g, check.added) {
        let rlen = (len as u64).div_ceil(v.store_bs) * v.store_bs;
        sch.read_buf(v.store_offset_blocks(slot, within as u64), &mut buf[..rlen as usize]).await?;
        crc = crc32c::crc32c_append(crc, &buf[..len]);
    }
    Ok(crc == check.crc)
}

/// Takes a preserve (rules in the module doc of `snapshot`). Returns (index, generation,
/// signal) once the epoch is bumped; with `freeze`, once sealed.
pub(crate) async fn preserve(v: &Arc<VolumeShared>, name: &str, uuid: Uuid, freeze: bool) -> Result<(usize, u64, Arc<SealSignal>), PreserveError> {
    if v.find(name).is_some() {
        return Err(PreserveError::Exists(format!("volume {} already has a snapshot named {name}", v.props.name())));
    }
    let home = home_of(v.id).ok_or_else(|| PreserveError::NotFound(format!("volume {} is closing", v.props.name())))?;
    let i = (0..MAX_SNAPSHOTS)
        .find(|&i| v.snaps[i].state.load(SeqCst) == ST_FREE)
        .ok_or_else(|| PreserveError::Busy(format!("volume {} already has {MAX_SNAPSHOTS} snapshots; delete one first", v.props.name())))?;
    let s = &v.snaps[i];
    let signal = SealSignal::new();
    *s.meta() = SnapMeta { name: name.to_string(), uuid, created_ms: unix_ms(), seal_ns: 0, disk_state: DiskState::Draining, signal: signal.clone() };
    if freeze {
        v.gate.freeze();
    }
    // The index is live before the bump, so every write stamped after the bump sees it.
    let epoch = v.tracker.current();
    s.epoch.store(epoch, SeqCst);
    s.entries.store(0, Relaxed);
    s.state.store(ST_DRAINING, SeqCst);
    // No snapshot was live: writes in flight may have gone without the grain lock (they had
    // nothing to preserve). They all belong to this snapshot (they read `live` before this
    // bit, so their stamp is at most `epoch`); writes after the bump below must not copy a
    // grain before they have landed, so they wait for `epoch` to drain first (the module
    // doc, "Lockless writes"). Stored before the bump: a write stamped after it sees it.
    if v.live.fetch_or(1 << i, SeqCst) == 0 {
        v.lockless_upto.store(epoch, SeqCst);
    }
    let gen = s.generation.load(SeqCst);
    let (closed, sealing) = match v.tracker.advance() {
        Ok(x) => x,
        Err(e) => {
            v.live.fetch_and(!(1 << i), SeqCst);
            s.state.store(ST_FREE, SeqCst);
            s.meta().disk_state = DiskState::Free;
            if freeze {
                v.gate.thaw();
            }
            return Err(PreserveError::Busy(format!("volume {}: {e}", v.props.name())));
        }
    };
    // The snapshot's index was made live for `epoch` above; had another advance come in
    // between, writes of the closed epoch would miss the preserve (a torn image).
    assert_eq!(closed, epoch, "only the home core advances a volume's epoch");
    let t0 = reactor::now_ns();
    // The header naming the snapshot goes to the header committer. Records carrying the index
    // may become durable before it (host writes never wait for it): until it is, recovery
    // drops their bits (it keeps only indices its header lists), and the reply waits for it.
    let recorded = home.wait_header();
    if freeze {
        seal(v.clone(), i, gen, sealing, t0).await;
        v.gate.thaw();
    } else {
        reactor::spawn_detached(seal(v.clone(), i, gen, sealing, t0));
    }
    // The reply waits until the header is on media, so an acknowledged snapshot survives a
    // crash the instant after (DESIGN §1). Only this control flow waits: the epoch is already
    // bumped, and host writes wait only for record batches, when they copy, as they always do.
    if let Err(e) = recorded.await.unwrap_or(Err(BdevError::Offline)) {
        home.mark_failed(1 << i, &format!("its record could not be written to the store {}: {e}", v.store.name()));
        return Err(PreserveError::Io(format!(
            "volume {}: snapshot {name} could not be recorded in the store {}: {e}; it is marked failed, delete it",
            v.props.name(),
            v.store.name()
        )));
    }
    Ok((i, gen, signal))
}

/// Waits for the drain, makes the image durable, records it sealed.
async fn seal(v: Arc<VolumeShared>, i: usize, gen: u64, sealing: crate::preserve::Sealing, t0: u64) {
    let _ = sealing.await;
    let s = &v.snaps[i];
    let flushed = async { Channel::get(&v.base)?.flush().await.and(Channel::get(&v.store)?.flush().await) }.await;
    if s.generation.load(SeqCst) != gen || s.state.load(SeqCst) != ST_DRAINING {
        return;
    }
    let dt = reactor::now_ns().saturating_sub(t0).max(1);
    {
        let mut m = s.meta();
        m.seal_ns = dt;
        m.disk_state = if flushed.is_ok() { DiskState::Sealed } else { DiskState::Failed };
    }
    let durable = header_durable(&v).await;
    let ok = flushed.is_ok() && durable.is_ok();
    let to = if ok { ST_SEALED } else { ST_FAILED };
    if s.state.compare_exchange(ST_DRAINING, to, SeqCst, SeqCst).is_ok() {
        if !ok {
            v.live.fetch_and(!(1 << i), SeqCst);
            v.stats.snapshots_failed.fetch_add(1, Relaxed);
            log::error!("volume {}: snapshot {} failed to seal: {:?}", v.props.name(), s.meta().name, flushed.and(durable));
        }
        v.stats.seal_latency.record(dt);
        s.meta().signal.set(if ok { SnapshotState::Sealed } else { SnapshotState::Failed });
    }
}

/// Deletes snapshot index `i` (its bdev already unregistered); durable on return.
pub(crate) async fn delete(v: &Arc<VolumeShared>, i: usize) -> Result<(), PreserveError> {
    let s = &v.snaps[i];
    let name = s.meta().name.clone();
    match s.state.load(SeqCst) {
        ST_SEALED | ST_FAILED => {}
        ST_DRAINING => return Err(PreserveError::Busy(format!("snapshot {name} is still draining"))),
        _ => return Err(PreserveError::NotFound(format!("snapshot {name} does not exist"))),
    }
    let home = home_of(v.id).ok_or_else(|| PreserveError::NotFound(format!("volume {} is closing", v.props.name())))?;
    let io = |e: BdevError| PreserveError::Io(format!("deleting snapshot {name}: store {}: {e}", v.store.name()));
    // Writers keep preserving for the snapshot until "deleting" is durable: a crash before
    // that brings the snapshot back, and it must still be exact.
    s.meta().disk_state = DiskState::Deleting;
    if let Err(e) = header_durable(v).await {
        s.meta().disk_state = if s.state.load(SeqCst) == ST_FAILED { DiskState::Failed } else { DiskState::Sealed };
        return Err(io(e));
    }
    // From here on recovery ignores the index's bits, so its slots may be reused at once.
    v.live.fetch_and(!(1 << i), SeqCst);
    s.state.store(ST_DELETING, SeqCst);
    s.generation.fetch_add(1, SeqCst);
    // Grace period: every write that may have seen the index live has completed.
    let (_, sealing) = v.tracker.advance().map_err(|e| PreserveError::Busy(e.to_string()))?;
    let _ = sealing.await;
    let bit = 1u32 << i;
    for slot in 0..home.hwm.get() {
        let r = v.records.at(slot as usize).load(Relaxed);
        if layout::record_mask(r) & bit == 0 {
            continue;
        }
        let m = layout::record_mask(r) & !bit;
        log::trace!("{}: scrub slot {slot} (grain {}) mask {m:#x}", v.props.name(), layout::record_grain(r));
        home.set_record(slot, layout::record_grain(r), m);
        if m == 0 {
            home.free.borrow_mut().push(slot);
            v.stats.used_slots.fetch_sub(1, Relaxed);
        }
        if slot % 65536 == 65535 {
            reactor::yield_now().await;
        }
    }
    s.grains.clear();
    s.entries.store(0, Relaxed);
    // Cleared records durable before the index is free on media, so a later snapshot at this
    // index never inherits a stale bit.
    let rx = home.wait_batch();
    rx.await.unwrap_or(Err(BdevError::Offline)).map_err(io)?;
    {
        let mut m = s.meta();
        m.disk_state = DiskState::Free;
        m.name.clear();
    }
    header_durable(v).await.map_err(io)?;
    s.state.store(ST_FREE, SeqCst);
    Ok(())
}
