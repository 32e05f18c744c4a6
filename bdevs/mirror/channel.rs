//! The mirror's data path, one channel per core.
//!
//! A write is stamped with the mirror's epoch, enters its regions (without a message when the
//! regions are ready), goes to every leg that takes writes of its epoch, and completes when all
//! have answered. A leg that failed it is reported to the control task, which drops the leg
//! durably before the write may complete; the write succeeds if an in-sync leg has the data.
//! A read goes to the in-sync leg with the fewest reads outstanding on this core; on an error
//! it is retried on the other in-sync legs, and the good data is written back to the legs that
//! failed (under a region lock, so that no host write can slip in between).

use super::control::Request;
use super::layout::MAX_SLOTS;
use super::waits::WaitReason;
use super::{LegMode, Shared};
use crate::bdev::{BdevError, Channel, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType};
use crate::reactor;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// How often a leg's "no resources" answer is retried before the leg counts as failed.
const NO_RESOURCES_RETRIES: u32 = 1000;
const NO_RESOURCES_BACKOFF: Duration = Duration::from_micros(50);
/// Largest zero buffer used to emulate write-zeroes on a leg without it.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Clone)]
struct Legs {
    gen: u64,
    /// Each slot's leg and the slot's incarnation when it was opened.
    ch: [Option<(Channel, u64)>; MAX_SLOTS],
}

impl Legs {
    fn leg(&self, s: usize) -> Option<&Channel> {
        self.ch[s].as_ref().map(|(c, _)| c)
    }
}

pub(crate) struct MirrorChannel {
    sh: Arc<Shared>,
    core: usize,
    /// Replaced, never changed in place, when the layout moves: an I/O holds the set it
    /// started with (one `Rc` count) and borrows its legs' channels from it, instead of
    /// cloning each leg's channel (an atomic count on the leg's entry, shared by every core).
    legs: RefCell<Rc<Legs>>,
    reads_out: [Cell<u32>; MAX_SLOTS],
}

/// What a modifying I/O writes on every leg.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Data(&'a [IoSlice<'a>]),
    Zeroes,
}

/// A write's epoch, left when the write completes (whatever happens).
struct Stamp<'a> {
    gate: &'a crate::preserve::EpochTracker,
    ticket: Option<crate::preserve::EpochTicket>,
}

impl Stamp<'_> {
    fn epoch(&self) -> u64 {
        self.ticket.as_ref().map_or(0, |t| t.epoch())
    }
}

impl Drop for Stamp<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.gate.exit(t);
        }
    }
}

/// Regions a write entered, left when it completes (whatever happens).
struct Entered<'a> {
    sh: &'a Shared,
    first: u64,
    end: u64,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        for r in self.first..self.end {
            if self.sh.regions.leave(r) {
                self.sh.send(Request::Drained { region: r });
            }
        }
    }
}

/// Polls up to one future per slot to completion, without allocating.
pub(crate) async fn join_slots<F: Future<Output = IoResult>>(futs: [Option<F>; MAX_SLOTS]) -> [Option<IoResult>; MAX_SLOTS] {
    let mut futs = std::pin::pin!(futs);
    let mut out: [Option<IoResult>; MAX_SLOTS] = Default::default();
    std::future::poll_fn(|cx| {
        // SAFETY: the array stays pinned; its futures are polled in place and dropped in place
        // (assigning `None` runs the destructor where the future lives), never moved.
        let arr = unsafe { futs.as_mut().get_unchecked_mut() };
        let mut pending = false;
        for (slot, result) in arr.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot.as_mut() {
                // SAFETY: see above.
                match unsafe { Pin::new_unchecked(f) }.poll(cx) {
                    Poll::Ready(r) => {
                        *result = Some(r);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out
}

/// Adds `v` (wrapping: `u64::MAX` subtracts one) to a counter of this core's leg statistics:
/// only this core's thread writes its shard (the control task writes the home core's, on the
/// home core), so a load and a store do, not a locked add (three per leg per write). Readers
/// on other cores may see a value one I/O old.
fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

/// Whether a leg's error means the leg is bad (rather than "try again" or a caller mistake).
fn is_device_error(e: &BdevError) -> bool {
    !matches!(e, BdevError::NoResources | BdevError::OutOfRange { .. } | BdevError::BadLength { .. })
}

async fn write_leg(ch: &Channel, offset: u64, count: u64, payload: Payload<'_>) -> IoResult {
    // The rare paths (no resources, zeroes emulated by writes) are boxed: a write keeps one of
    // these futures per slot, and their state would make every write's future several KiB.
    let r = match payload {
        // `write` starts the leg's write in place (`Channel::start`): one that completes in
        // place (RAM) costs no future of its own.
        Payload::Data(bufs) => ch.write(offset, bufs).await,
        Payload::Zeroes if ch.supports(IoType::WriteZeroes) => ch.write_zeroes(offset, count).await,
        Payload::Zeroes => Box::pin(write_zero_buffers(ch, offset, count)).await,
    };
    match r {
        Err(BdevError::NoResources) => Box::pin(retry_leg(ch, offset, count, payload)).await,
        r => r,
    }
}

/// A leg write the leg had no resources for, tried again after a pause, a bounded number of
/// times.
async fn retry_leg(ch: &Channel, offset: u64, count: u64, payload: Payload<'_>) -> IoResult {
    let mut tries = 1;
    loop {
        reactor::sleep(NO_RESOURCES_BACKOFF).await;
        let r = match payload {
            Payload::Data(bufs) => ch.write(offset, bufs).await,
            Payload::Zeroes if ch.supports(IoType::WriteZeroes) => ch.write_zeroes(offset, count).await,
            Payload::Zeroes => write_zero_buffers(ch, offset, count).await,
        };
        match r {
            Err(BdevError::NoResources) if tries < NO_RESOURCES_RETRIES => tries += 1,
            r => return r,
        }
    }
}

async fn write_zero_buffers(ch: &Channel, offset: u64, count: u64) -> IoResult {
    let bs = ch.block_size() as u64;
    let chunk_blocks = (ZERO_CHUNK as u64 / bs).max(1);
    let zero = IoBuf::zeroed((chunk_blocks.min(count) * bs) as usize);
    let mut done = 0;
    while done < count {
        let n = chunk_blocks.min(count - done);
        ch.write_buf(offset + done, &zero[..(n * bs) as usize]).await?;
        done += n;
    }
    Ok(())
}

impl MirrorChannel {
    pub(crate) fn new(sh: Arc<Shared>) -> MirrorChannel {
        MirrorChannel {
            sh,
            core: reactor::current_index(),
            legs: RefCell::new(Rc::new(Legs { gen: u64::MAX, ch: Default::default() })),
            reads_out: Default::default(),
        }
    }

    /// Picks up leg changes (the layout generation moved since this core last looked).
    fn refresh(&self) {
        let gen = self.sh.layout_gen.load(SeqCst);
        if self.legs.borrow().gen == gen {
            return;
        }
        let mut legs = Legs::clone(&self.legs.borrow());
        for (s, slot) in self.sh.slots.iter().enumerate() {
            // The incarnation first: a failure must never be reported against a newer leg.
            let inc = slot.incarnation.load(SeqCst);
            let entry = slot.entry();
            let keep = match (&entry, &legs.ch[s]) {
                (Some(e), Some((c, i))) => Arc::ptr_eq(e, c.entry()) && *i == inc,
                _ => false,
            };
            if !keep {
                legs.ch[s] = entry.and_then(|e| match Channel::get(&e) {
                    Ok(c) => Some((c, inc)),
                    Err(err) => {
                        log::error!("mirror {}: cannot open a channel to leg {} on core {}: {err}", self.sh.props.name(), e.name(), self.core);
                        None
                    }
                });
            }
        }
        legs.gen = gen;
        *self.legs.borrow_mut() = Rc::new(legs);
    }

    /// The legs as this channel knows them now (call `refresh` first to pick up changes).
    fn legs(&self) -> Rc<Legs> {
        self.legs.borrow().clone()
    }

    fn leg(&self, s: usize) -> Option<Channel> {
        self.legs.borrow().ch[s].as_ref().map(|(c, _)| c.clone())
    }

    /// The incarnation of the slot's leg as this channel knows it (the leg it sends I/O to).
    fn incarnation(&self, s: usize) -> u64 {
        self.legs.borrow().ch[s].as_ref().map_or_else(|| self.sh.slots[s].incarnation.load(SeqCst), |(_, i)| *i)
    }

    /// Reports that the leg `incarnation` of `slot` failed an I/O; returns once the control
    /// task made its departure durable (Err if it could not).
    async fn report_failure(&self, slot: usize, incarnation: u64) -> IoResult {
        match self.sh.ask(|reply| Request::LegFailed { slot, incarnation, reply }).await {
            Some(r) => r,
            None => Err(BdevError::Offline),
        }
    }

    async fn write_op(&self, offset: u64, count: u64, payload: Payload<'_>) -> IoResult {
        let sh = &*self.sh;
        // Fenced first: a fenced mirror that also went offline still tells the host why.
        if sh.fenced.load(Relaxed) {
            return Err(Shared::fenced_error());
        }
        if sh.offline.load(Relaxed) {
            return Err(BdevError::Offline);
        }
        let g = &sh.geometry;
        let stamp = Stamp { gate: &sh.gate, ticket: Some(sh.gate.enter()) };
        // The extent lock before the regions: a write never holds a region while it waits for
        // a lock (a rebuild window waiting for the region to drain would wait forever).
        // Mostly granted in place (a free range whose shard is this core's); the wait or the
        // message is boxed, so that its state does not enlarge every write's future.
        let _order = match sh.locks.try_lock(offset, count) {
            Some(g) => g,
            None => Box::pin(sh.locks.lock(offset, count)).await,
        };
        let (r0, r1) = g.regions_of(offset, count);
        let mut entered = Entered { sh, first: r0, end: r0 };
        for r in r0..=r1 {
            if !sh.regions.try_enter(r) {
                let io_before = sh.ctl_preserve_io.load(SeqCst);
                let answer = sh.ask(|reply| Request::Enter { region: r, reply }).await;
                sh.waits.record(WaitReason::Enter, String::new);
                let io_after = sh.ctl_preserve_io.load(SeqCst);
                if io_before % 2 == 1 || io_after != io_before {
                    sh.waits.record(WaitReason::PreserveIo, || {
                        format!("mirror {}: a write to region {r} waited while the control task awaited a split's I/O", sh.props.name())
                    });
                }
                match answer {
                    Some(Ok(())) => {}
                    // The write-intent bit could not be persisted because a leg refused it:
                    // the host hears that this head was fenced, not of a device error.
                    Some(Err(_)) if sh.fenced.load(Relaxed) => return Err(Shared::fenced_error()),
                    Some(Err(e)) => return Err(e),
                    None => return Err(BdevError::Offline),
                }
            }
            entered.end = r + 1;
        }
        self.refresh();
        let legs = self.legs();
        let mut targets = 0u8;
        let mut missing = 0u8;
        let incarnations: [u64; MAX_SLOTS] = std::array::from_fn(|s| self.incarnation(s));
        let futs: [Option<_>; MAX_SLOTS] = std::array::from_fn(|s| {
            if !sh.slots[s].takes_write(stamp.epoch()) {
                return None;
            }
            targets |= 1 << s;
            let Some(ch) = legs.leg(s) else {
                missing |= 1 << s;
                return None;
            };
            bump(&sh.leg_stats(self.core, s).in_flight, 1);
            Some(write_leg(ch, g.data_offset + offset, count, payload))
        });
        let results = join_slots(futs).await;
        let mut succeeded = 0u8;
        let mut failed = missing;
        let mut first_err = None;
        for s in 0..MAX_SLOTS {
            let Some(r) = &results[s] else { continue };
            let st = sh.leg_stats(self.core, s);
            bump(&st.in_flight, u64::MAX);
            match r {
                Ok(()) => {
                    bump(&st.writes, 1);
                    succeeded |= 1 << s;
                }
                Err(e) => {
                    st.write_errors.fetch_add(1, Relaxed);
                    log::warn!("mirror {}: leg in slot {s} failed a write at block {offset}: {e}", sh.props.name());
                    first_err.get_or_insert(e.clone());
                    failed |= 1 << s;
                }
            }
        }
        // A leg refused the write for a reservation another head holds: this head is fenced.
        // The write fails and no leg is dropped: dropping would record on the other legs that
        // they alone are current, which is the new head's to decide, not this one's.
        if let Some(s) = (0..MAX_SLOTS).find(|&s| matches!(&results[s], Some(Err(e)) if super::fence::is_conflict(e))) {
            let leg = self.leg(s).map(|c| c.entry().name().to_string()).unwrap_or_else(|| format!("in slot {s}"));
            sh.set_fenced(&leg);
            return Err(Shared::fenced_error());
        }
        if sh.fenced.load(Relaxed) {
            return Err(Shared::fenced_error());
        }
        let mut durable = Ok(());
        for s in 0..MAX_SLOTS {
            if failed & (1 << s) != 0 {
                if let Err(e) = self.report_failure(s, incarnations[s]).await {
                    durable = Err(e);
                }
            }
        }
        drop(entered);
        durable?;
        // The data counts as written when an in-sync leg holds it.
        let in_sync = (0..MAX_SLOTS).any(|s| succeeded & (1 << s) != 0 && sh.slots[s].mode() == LegMode::Active);
        if in_sync {
            Ok(())
        } else {
            Err(first_err.unwrap_or(if targets == 0 { BdevError::Offline } else { BdevError::Media }))
        }
    }

    /// The in-sync leg to read next: the pinned source if it is usable, else the one with the
    /// fewest reads outstanding on this core among those not tried yet.
    fn pick_reader(&self, tried: u8, pinned: Option<usize>) -> Option<usize> {
        let usable = |s: usize| tried & (1 << s) == 0 && self.sh.slots[s].mode() == LegMode::Active && self.legs.borrow().ch[s].is_some();
        if let Some(p) = pinned.filter(|p| *p < MAX_SLOTS) {
            if usable(p) {
                return Some(p);
            }
        }
        (0..MAX_SLOTS).filter(|s| usable(*s)).min_by_key(|s| self.reads_out[*s].get())
    }

    async fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>], count: u64) -> IoResult {
        let sh = &*self.sh;
        if sh.offline.load(Relaxed) {
            return Err(BdevError::Offline);
        }
        self.refresh();
        let g = &sh.geometry;
        let (r0, r1) = g.regions_of(offset, count);
        // Legs may differ in a region that had writes in flight at a crash; until it is
        // resynchronised every read of it comes from the one leg the resync copies from.
        let pinned = sh.regions.any_unsynced(r0, r1).then(|| sh.source_slot.load(SeqCst));
        let mut tried = 0u8;
        let mut bad = 0u8;
        let mut last_err = None;
        let legs = self.legs();
        while let Some(s) = self.pick_reader(tried, pinned) {
            tried |= 1 << s;
            let Some(ch) = legs.leg(s) else { continue };
            let st = sh.leg_stats(self.core, s);
            self.reads_out[s].set(self.reads_out[s].get() + 1);
            bump(&st.in_flight, 1);
            let r = ch.read(g.data_offset + offset, bufs).await;
            bump(&st.in_flight, u64::MAX);
            self.reads_out[s].set(self.reads_out[s].get() - 1);
            match r {
                Ok(()) => {
                    bump(&st.reads, 1);
                    if bad != 0 {
                        self.repair(bad, s, offset, count).await;
                    }
                    return Ok(());
                }
                Err(e) => {
                    st.read_errors.fetch_add(1, Relaxed);
                    log::warn!("mirror {}: leg in slot {s} failed a read at block {offset}: {e}; trying another leg", sh.props.name());
                    if is_device_error(&e) {
                        bad |= 1 << s;
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(BdevError::Offline))
    }

    /// Writes the data of blocks [offset, offset+count) from leg `good` back to the `bad` legs
    /// that failed to read them. The regions are locked meanwhile, and the data is read again
    /// under the lock, so a host write cannot land between the read and the write-back.
    async fn repair(&self, bad: u8, good: usize, offset: u64, count: u64) {
        let sh = &*self.sh;
        let g = &sh.geometry;
        let (r0, r1) = g.regions_of(offset, count);
        let mut locked_end = r0;
        for r in r0..=r1 {
            match sh.ask(|reply| Request::Lock { region: r, write_intent: true, reply }).await {
                Some(Ok(())) => locked_end = r + 1,
                _ => break,
            }
        }
        if locked_end == r1 + 1 {
            let bytes = (count * g.block_size as u64) as usize;
            let mut buf = IoBuf::alloc(bytes);
            let good_ch = self.leg(good);
            let read_ok = match &good_ch {
                Some(ch) => ch.read_buf(g.data_offset + offset, &mut buf).await.is_ok(),
                None => false,
            };
            if read_ok {
                for s in 0..MAX_SLOTS {
                    if bad & (1 << s) == 0 || sh.slots[s].mode() == LegMode::Off {
                        continue;
                    }
                    let Some(ch) = self.leg(s) else { continue };
                    let inc = self.incarnation(s);
                    match ch.write_buf(g.data_offset + offset, &buf).await {
                        Ok(()) => {
                            sh.counters.read_repairs.fetch_add(1, Relaxed);
                            log::info!("mirror {}: repaired blocks {offset}+{count} on the leg in slot {s}", sh.props.name());
                        }
                        Err(e) => {
                            log::warn!("mirror {}: write-back to the leg in slot {s} failed ({e}); dropping it", sh.props.name());
                            let _ = self.report_failure(s, inc).await;
                        }
                    }
                }
            }
        }
        for r in r0..locked_end {
            sh.send(Request::Unlock { region: r });
        }
    }

    async fn flush(&self) -> IoResult {
        let sh = &*self.sh;
        if sh.offline.load(Relaxed) {
            return Err(BdevError::Offline);
        }
        self.refresh();
        let incarnations: [u64; MAX_SLOTS] = std::array::from_fn(|s| self.incarnation(s));
        let futs: [Option<_>; MAX_SLOTS] = std::array::from_fn(|s| {
            if sh.slots[s].mode() == LegMode::Off {
                return None;
            }
            let ch = self.leg(s)?;
            Some(async move { ch.flush().await })
        });
        let results = join_slots(futs).await;
        let mut ok = false;
        let mut first_err = None;
        for (s, r) in results.iter().enumerate() {
            match r {
                Some(Ok(())) => ok |= sh.slots[s].mode() == LegMode::Active,
                Some(Err(e)) => {
                    // A failed flush may have lost completed writes: the leg is not in sync.
                    log::warn!("mirror {}: leg in slot {s} failed a flush: {e}", sh.props.name());
                    first_err.get_or_insert(e.clone());
                    self.report_failure(s, incarnations[s]).await?;
                }
                None => {}
            }
        }
        if ok {
            Ok(())
        } else {
            Err(first_err.unwrap_or(BdevError::Offline))
        }
    }
}

impl IoChannel for MirrorChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        // One box per kind: a read's box is sized for a read, not for the largest of them.
        match io {
            Io::Read { offset_blocks, num_blocks, bufs } => IoFuture::boxed(self.read(offset_blocks, bufs, num_blocks)),
            Io::Write { offset_blocks, num_blocks, bufs } => IoFuture::boxed(self.write_op(offset_blocks, num_blocks, Payload::Data(bufs))),
            Io::WriteZeroes { offset_blocks, num_blocks } | Io::Unmap { offset_blocks, num_blocks } => {
                IoFuture::boxed(self.write_op(offset_blocks, num_blocks, Payload::Zeroes))
            }
            Io::Flush => IoFuture::boxed(self.flush()),
        }
    }
}
