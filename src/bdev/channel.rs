//! [`Channel`]: what callers of the bdev layer hold. It checks every request against the
//! device (range, length, read-only, supported types) before the module sees it, and records
//! the statistics, so modules do neither.

use super::qos::{Dir, LocalQos, Qos, TIMESLICE_NS};
use super::{BdevEntry, BdevError, Io, IoChannel, IoFuture, IoResult, IoType};
use crate::reactor;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;
use std::sync::Arc;

/// Per-core cache of opened channels, by bdev entry id.
#[derive(Default)]
struct ChannelCache(RefCell<HashMap<u64, Rc<dyn IoChannel>>>);

/// Per-core QoS state (token stock, wait queue) of each limited bdev, by bdev entry id. Kept
/// beside the channel cache rather than in [`Channel`] because `Channel` values are cheap
/// per-call handles, while the queue must be one per core and bdev.
#[derive(Default)]
struct QosCache(RefCell<HashMap<u64, Rc<LocalQos>>>);

/// Drops a waiting I/O's ticket when it is admitted or its future dropped (connection gone,
/// shutdown): the next waiter becomes head, so no queued I/O is left behind a dead one.
struct Ticket<'a> {
    local: &'a LocalQos,
    qos: &'a Qos,
    ticket: u64,
    t0: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.local.release(self.ticket);
        self.qos.add_throttled(reactor::monotonic_ns().saturating_sub(self.t0));
    }
}

/// Parks a waiting I/O that is not the head of its core's queue until `release` wakes it.
struct Park<'a> {
    local: &'a LocalQos,
    ticket: u64,
    parked: bool,
}

impl std::future::Future for Park<'_> {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.parked || self.local.is_head(self.ticket) {
            return std::task::Poll::Ready(());
        }
        self.local.park(self.ticket, cx.waker());
        self.parked = true;
        std::task::Poll::Pending
    }
}

/// Clock readings handed between nested channels within one synchronous submission, so that
/// a stack of layers completing in place (a CoW volume over RAM, say) reads the clock twice
/// in all rather than twice per layer (each read is a measurable part of such an I/O).
/// `start` is set only while a channel's `submit` call runs: the first channel submitted below
/// takes it as its own start. `end` is cleared before that call and set by a channel below
/// that completed in place; the caller takes it right after the call returns. Neither value
/// outlives the submission that set it, so no I/O ever takes another's time.
#[derive(Default)]
struct Handoff {
    start: Cell<Option<u64>>,
    end: Cell<Option<u64>>,
}

thread_local! {
    static CLOCK: Handoff = const { Handoff { start: Cell::new(None), end: Cell::new(None) } };
}

/// A request [`Channel::start`] began.
pub enum Started<'a, 'b> {
    /// Completed in place (or refused by the checks); statistics recorded.
    Done(IoResult),
    /// Still to complete: await [`Channel::finish`] with it.
    Running(Running<'a, 'b>),
}

/// A started request that did not complete in place.
pub struct Running<'a, 'b> {
    state: RunState<'a, 'b>,
    t: IoType,
    bytes: u64,
    t0: u64,
}

enum RunState<'a, 'b> {
    Submitted(IoFuture<'a>),
    /// QoS holds it: submitted once the limits admit it.
    Held(Io<'a, 'b>),
}

#[derive(Clone)]
pub struct Channel {
    entry: Arc<BdevEntry>,
    io: Rc<dyn IoChannel>,
    core: usize,
    block_size: u32,
    supported: u8,
}

impl Channel {
    /// The current core's channel to `entry`, opened on first use.
    pub fn get(entry: &Arc<BdevEntry>) -> Result<Channel, BdevError> {
        let cache = reactor::with_core(|c| c.local::<ChannelCache>());
        let existing = cache.0.borrow().get(&entry.id()).cloned();
        let io = match existing {
            Some(io) => io,
            None => {
                let io = entry.bdev().open_channel()?;
                cache.0.borrow_mut().insert(entry.id(), io.clone());
                io
            }
        };
        let b = entry.bdev();
        let supported = IoType::ALL.iter().filter(|t| b.supports(**t)).fold(0u8, |m, t| m | (1 << t.index()));
        Ok(Channel { entry: entry.clone(), io, core: reactor::current_index(), block_size: b.block_size(), supported })
    }

    /// Drops the current core's cached channel of bdev `id` (after the bdev is unregistered).
    pub fn evict(id: u64) {
        let cache = reactor::with_core(|c| c.local::<ChannelCache>());
        let ch = cache.0.borrow_mut().remove(&id);
        drop(ch);
        let q = reactor::with_core(|c| c.local::<QosCache>());
        let l = q.0.borrow_mut().remove(&id);
        drop(l);
    }

    /// This core's QoS state of the bdev and the direction of `t`.
    fn qos_local(&self, t: IoType) -> (Rc<LocalQos>, Dir) {
        let cache = reactor::with_core(|c| c.local::<QosCache>());
        let local = cache.0.borrow_mut().entry(self.entry.id()).or_default().clone();
        (local, if t == IoType::Read { Dir::Read } else { Dir::Write })
    }

    /// Whether the bdev's limits admit an I/O of `bytes` at once (nothing queued before it).
    fn admit_now(&self, t: IoType, bytes: u64) -> bool {
        let (local, dir) = self.qos_local(t);
        // Shared timeslices need one clock for all cores: the monotonic clock, not the core's
        // (whose origin is the core's start).
        local.queued() == 0 && local.try_admit(self.entry.qos(), dir, bytes, reactor::monotonic_ns())
    }

    /// Waits until the bdev's limits admit an I/O of `bytes` (QoS), after [`Self::admit_now`]
    /// said no. I/O over the limit waits on this core in arrival order; it is never failed
    /// for the limit.
    async fn admit_wait(&self, t: IoType, bytes: u64) {
        let q = self.entry.qos();
        let (local, dir) = self.qos_local(t);
        let ticket = Ticket { local: &local, qos: q, ticket: local.take_ticket(), t0: reactor::monotonic_ns() };
        loop {
            if local.is_head(ticket.ticket) {
                if !q.enabled() || local.try_admit(q, dir, bytes, reactor::monotonic_ns()) {
                    break;
                }
                let now = reactor::monotonic_ns();
                reactor::sleep(std::time::Duration::from_nanos(TIMESLICE_NS - now % TIMESLICE_NS)).await;
            } else {
                Park { local: &local, ticket: ticket.ticket, parked: false }.await;
            }
        }
        drop(ticket);
    }

    pub fn entry(&self) -> &Arc<BdevEntry> {
        &self.entry
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The bdev's size now: read from the bdev, not kept from when the channel was opened, so
    /// a volume grown (or made read-only) while exported is seen by connections already open.
    pub fn num_blocks(&self) -> u64 {
        self.entry.bdev().num_blocks()
    }

    pub fn supports(&self, t: IoType) -> bool {
        self.supported & (1 << t.index()) != 0
    }

    fn check(&self, t: IoType, offset: u64, count: u64) -> Result<(), BdevError> {
        if !self.supports(t) {
            return Err(BdevError::Unsupported(t));
        }
        // Size and read-only state are read live (two plain loads behind a virtual call): a
        // resize or bdev_lvol_set_read_only reaches the hosts' open connections.
        let b = self.entry.bdev();
        if t.modifies() && b.read_only() {
            return Err(BdevError::ReadOnly);
        }
        let size = b.num_blocks();
        if offset.checked_add(count).is_none_or(|end| end > size) {
            return Err(BdevError::OutOfRange { offset, count, size });
        }
        Ok(())
    }

    fn blocks_of(&self, len: usize) -> Result<u64, BdevError> {
        let bs = self.block_size as usize;
        if len == 0 || len % bs != 0 {
            return Err(BdevError::BadLength { len, block_size: self.block_size });
        }
        Ok((len / bs) as u64)
    }

    /// Awaits a request [`Self::start`] began: the one way every entry of this channel, and a
    /// layer above that started one, completes it.
    pub async fn complete(&self, started: Started<'_, '_>) -> IoResult {
        match started {
            Started::Done(r) => {
                // The device completed in place and so did this layer: give up the turn past
                // the task's budget, as a device's own `Ready` future would have (a task whose
                // I/O all completes in place would otherwise starve its core).
                if !reactor::consume_budget() {
                    reactor::yield_now().await;
                }
                r
            }
            Started::Running(run) => self.finish(run).await,
        }
    }

    /// Starts a checked request: submits it at once unless QoS holds it, and takes the result
    /// at once when the device completed it in place (the statistics recorded either way).
    fn submit_checked<'a, 'b: 'a>(&'a self, t: IoType, bytes: u64, io: Io<'a, 'b>) -> Started<'a, 'b> {
        // Wall-clock latency (also under simulation: statistics never steer behaviour). It
        // includes the wait for QoS tokens: that is what the host sees. A layer below that
        // this submission reaches synchronously starts at the same instant (see `CLOCK`).
        let t0 = CLOCK.with(|c| c.start.take()).unwrap_or_else(reactor::monotonic_ns);
        if self.entry.qos().enabled() && !self.admit_now(t, bytes) {
            return Started::Running(Running { state: RunState::Held(io), t, bytes, t0 });
        }
        self.entry.stats().shard(self.core).io_started();
        CLOCK.with(|c| {
            c.start.set(Some(t0));
            c.end.set(None);
        });
        let fut = self.io.submit(io);
        // Taken back whether or not a layer below used it: it is this submission's only.
        let below_end = CLOCK.with(|c| {
            c.start.set(None);
            c.end.take()
        });
        match fut.into_ready() {
            Ok(r) => {
                // Completed in place: a channel below that completed in place inside this
                // submission read the clock at its end an instant ago; that is this end too.
                let t1 = below_end.unwrap_or_else(reactor::monotonic_ns);
                CLOCK.with(|c| c.end.set(Some(t1)));
                self.ended(t, bytes, t1.saturating_sub(t0), &r);
                Started::Done(r)
            }
            Err(fut) => Started::Running(Running { state: RunState::Submitted(fut), t, bytes, t0 }),
        }
    }

    fn ended(&self, t: IoType, bytes: u64, dt: u64, r: &IoResult) {
        self.entry.stats().shard(self.core).io_ended();
        self.entry.stats().record(self.core, t, bytes, dt, r.is_ok());
    }

    /// Completes an I/O [`Self::start`] left running.
    pub async fn finish(&self, run: Running<'_, '_>) -> IoResult {
        let Running { state, t, bytes, t0 } = run;
        let fut = match state {
            RunState::Submitted(fut) => fut,
            RunState::Held(io) => {
                // Before counting the I/O in flight: a waiting I/O whose future is dropped (its
                // connection closed) has not reached the device and must not stay counted.
                // Boxed: the wait's state would otherwise make every I/O's future (and every
                // layer's above it) larger, while only I/O over a limit waits.
                Box::pin(self.admit_wait(t, bytes)).await;
                self.entry.stats().shard(self.core).io_started();
                self.io.submit(io)
            }
        };
        let r = fut.await;
        self.ended(t, bytes, reactor::monotonic_ns().saturating_sub(t0), &r);
        r
    }

    /// Starts a request (checked here, for every entry of this channel) without a future of
    /// its own: a device that completes in place gives its result at once ([`Started::Done`]),
    /// so a layer whose own work is synchronous completes in place too and needs no boxed
    /// future. Otherwise await [`Self::finish`] (or [`Self::complete`]). A read's or write's
    /// block count is taken from its buffers, whatever `num_blocks` says.
    pub fn start<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> Started<'a, 'b> {
        let bs = self.block_size as u64;
        let checked = match io {
            Io::Read { offset_blocks, bufs, .. } => {
                let len: usize = bufs.iter().map(|b| b.len()).sum();
                self.blocks_of(len)
                    .and_then(|n| self.check(IoType::Read, offset_blocks, n).map(|()| n))
                    .map(|num_blocks| (IoType::Read, len as u64, Io::Read { offset_blocks, num_blocks, bufs }))
            }
            Io::Write { offset_blocks, bufs, .. } => {
                let len: usize = bufs.iter().map(|b| b.len()).sum();
                self.blocks_of(len)
                    .and_then(|n| self.check(IoType::Write, offset_blocks, n).map(|()| n))
                    .map(|num_blocks| (IoType::Write, len as u64, Io::Write { offset_blocks, num_blocks, bufs }))
            }
            // A device without a volatile cache has nothing to flush.
            Io::Flush if !self.supports(IoType::Flush) => return Started::Done(Ok(())),
            Io::Flush => Ok((IoType::Flush, 0, Io::Flush)),
            Io::Unmap { offset_blocks, num_blocks } => {
                self.check(IoType::Unmap, offset_blocks, num_blocks).map(|()| (IoType::Unmap, num_blocks * bs, Io::Unmap { offset_blocks, num_blocks }))
            }
            Io::WriteZeroes { offset_blocks, num_blocks } => self
                .check(IoType::WriteZeroes, offset_blocks, num_blocks)
                .map(|()| (IoType::WriteZeroes, num_blocks * bs, Io::WriteZeroes { offset_blocks, num_blocks })),
        };
        match checked {
            Ok((t, bytes, io)) => self.submit_checked(t, bytes, io),
            Err(e) => Started::Done(Err(e)),
        }
    }

    /// Reads `offset_blocks..` into `bufs` (their total length: a whole number of blocks).
    pub async fn read(&self, offset_blocks: u64, bufs: &mut [IoSliceMut<'_>]) -> IoResult {
        // The count comes from the buffers (`start`).
        self.forward(Io::Read { offset_blocks, num_blocks: 0, bufs }).await
    }

    pub async fn read_buf(&self, offset_blocks: u64, buf: &mut [u8]) -> IoResult {
        self.read(offset_blocks, &mut [IoSliceMut::new(buf)]).await
    }

    /// Writes `bufs` at `offset_blocks`.
    pub async fn write(&self, offset_blocks: u64, bufs: &[IoSlice<'_>]) -> IoResult {
        self.forward(Io::Write { offset_blocks, num_blocks: 0, bufs }).await
    }

    pub async fn write_buf(&self, offset_blocks: u64, buf: &[u8]) -> IoResult {
        self.write(offset_blocks, &[IoSlice::new(buf)]).await
    }

    /// Rewrites block `block` in place, durably: reads it, lets `edit` change it, writes it back
    /// and flushes. For metadata a store changes once at open (the CRC of a superseded copy,
    /// see `lvol::void_slot`), not for the data path: it allocates the block.
    pub async fn patch_block(&self, block: u64, edit: impl FnOnce(&mut [u8])) -> IoResult {
        let mut b = vec![0u8; self.block_size() as usize];
        self.read_buf(block, &mut b).await?;
        edit(&mut b);
        self.write_buf(block, &b).await?;
        self.flush().await
    }

    /// Makes every completed write durable (nothing to do on a device without a volatile cache).
    pub async fn flush(&self) -> IoResult {
        self.forward(Io::Flush).await
    }

    pub async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> IoResult {
        self.forward(Io::Unmap { offset_blocks, num_blocks }).await
    }

    /// Passes a request a virtual bdev received on to this (base) channel, as that layer's own
    /// [`IoFuture`] (for its `submit`): ready at once when the device completed in place, so
    /// the layer costs no allocation, else the one boxed future that finishes it. `then` runs
    /// once the request completed, either way (a layer leaves its epoch there, say).
    pub fn pass<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>, then: impl FnOnce() + 'a) -> IoFuture<'a> {
        match self.start(io) {
            Started::Done(r) => {
                then();
                IoFuture::ready(r)
            }
            Started::Running(run) => IoFuture::boxed(async move {
                let r = self.finish(run).await;
                then();
                r
            }),
        }
    }

    /// Passes a request a virtual bdev received on to this (base) channel unchanged.
    pub async fn forward(&self, io: Io<'_, '_>) -> IoResult {
        self.complete(self.start(io)).await
    }

    pub async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> IoResult {
        self.forward(Io::WriteZeroes { offset_blocks, num_blocks }).await
    }
}
