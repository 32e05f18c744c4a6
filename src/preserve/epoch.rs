//! Epochs: which point in time each I/O belongs to, and when a point in time is sealed
//! (DESIGN §1, "Epochs" and "Sealing").
//!
//! A preservable bdev owns one [`EpochTracker`]. Each modifying I/O calls [`EpochTracker::enter`]
//! when it is submitted (the ticket carries the epoch it was stamped with) and
//! [`EpochTracker::exit`] when it completes, on the same core. A preserve calls
//! [`EpochTracker::advance`]: the epoch is bumped at once (one atomic add, seen by every core's
//! next submission), and the returned [`Sealing`] future completes when every I/O stamped with
//! the closed epoch or an older one has exited, on every core.
//!
//! Data path cost: one atomic load of the epoch and one relaxed add/sub on a counter in this
//! core's own cache line. Nothing waits: `advance` only sends one message per core.
//!
//! How drain detection stays exact without locks: counts are per core and per epoch. After the
//! bump, a message to each core "closes" the old epoch there. A core runs messages and
//! submissions one at a time, so every submission it runs after the close message reads the new
//! epoch (the bump happened before the message was sent); the close handler therefore sees the
//! final count of old-epoch I/Os of its core, and the last `exit` that brings it to zero reports.

use crate::reactor;
use crossbeam_utils::CachePadded;
use futures::channel::oneshot;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// Epoch counters kept per core (a ring indexed by epoch).
const RING: u64 = 64;
/// Most epochs that may still have I/O in flight at once (preserves draining, plus the current).
pub const MAX_OPEN_EPOCHS: u64 = RING / 2;

/// What a core must tell when its old-epoch I/Os are gone.
struct SealWait {
    epoch: u64,
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

struct Shard {
    counts: [AtomicU32; RING as usize],
    /// Lowest epoch this core has a pending close for (u64::MAX: none), so `exit` looks at the
    /// pending list only when it may matter.
    watch: AtomicU64,
    /// Closes waiting for this core's old-epoch I/Os. Touched only by this core, and only while
    /// a preserve drains: never contended.
    pending: Mutex<Vec<Arc<SealWait>>>,
}

/// The epoch of a preservable bdev and its in-flight I/O per epoch and core.
pub struct EpochTracker {
    epoch: AtomicU64,
    /// Every epoch below this one is sealed (has no I/O in flight anywhere).
    oldest_open: AtomicU64,
    shards: Box<[CachePadded<Shard>]>,
    /// Tasks waiting in [`EpochTracker::drained`] for an epoch to seal. Touched only right
    /// after a preserve (by writers that must not overtake its old epoch) and when a seal
    /// completes: never on the common data path.
    drain_waiters: Mutex<Vec<(u64, Waker)>>,
}

/// Proof that an I/O entered an epoch; give it back to [`EpochTracker::exit`] on completion.
#[must_use = "an I/O that entered an epoch must exit it, or its preserve never seals"]
#[derive(Debug)]
pub struct EpochTicket {
    epoch: u64,
    core: usize,
}

impl EpochTicket {
    /// The epoch the I/O was stamped with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Completes when the closed epoch and every older one have no I/O left in flight.
pub type Sealing = oneshot::Receiver<()>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvanceError {
    #[error("{0} preserves are still draining; wait for one to seal")]
    TooManyOpen(u64),
}

impl EpochTracker {
    /// A tracker for I/O submitted on `cores` cores, starting at `epoch`.
    pub fn new(cores: usize, epoch: u64) -> Arc<EpochTracker> {
        assert!(cores > 0);
        let shards: Box<[CachePadded<Shard>]> = (0..cores)
            .map(|_| {
                CachePadded::new(Shard { counts: std::array::from_fn(|_| AtomicU32::new(0)), watch: AtomicU64::new(u64::MAX), pending: Mutex::new(Vec::new()) })
            })
            .collect();
        Arc::new(EpochTracker { epoch: AtomicU64::new(epoch), oldest_open: AtomicU64::new(epoch), shards, drain_waiters: Mutex::new(Vec::new()) })
    }

    /// The epoch new submissions are stamped with.
    pub fn current(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Stamps an I/O being submitted on the current core.
    pub fn enter(&self) -> EpochTicket {
        let core = reactor::current_index();
        let epoch = self.epoch.load(SeqCst);
        self.shards[core].counts[(epoch % RING) as usize].fetch_add(1, Relaxed);
        EpochTicket { epoch, core }
    }

    /// Ends an I/O (on the core that entered it); may complete a seal.
    pub fn exit(&self, t: EpochTicket) {
        // Counts are per core and a close reads its own core's only: an exit on another core
        // would let a seal complete while the I/O is still in flight (a torn image).
        assert_eq!(t.core, reactor::current_index(), "an I/O exits its epoch on the core that entered it");
        let shard = &self.shards[t.core];
        let prev = shard.counts[(t.epoch % RING) as usize].fetch_sub(1, Relaxed);
        // A ticket is consumed by its one exit; an underflow wraps to 4 billion I/Os and the
        // epoch never seals.
        assert!(prev > 0, "epoch counter underflow");
        if shard.watch.load(Relaxed) <= t.epoch {
            self.check_pending(t.core);
        }
    }

    /// I/Os of `core` stamped with `epoch` or older that are still in flight.
    fn count_upto(&self, core: usize, epoch: u64) -> u64 {
        let from = self.oldest_open.load(SeqCst).max((epoch + 1).saturating_sub(RING));
        let shard = &self.shards[core];
        (from..=epoch).map(|e| shard.counts[(e % RING) as usize].load(Relaxed) as u64).sum()
    }

    fn check_pending(&self, core: usize) {
        let shard = &self.shards[core];
        let done: Vec<Arc<SealWait>> = {
            let mut p = shard.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (done, keep): (Vec<_>, Vec<_>) = p.drain(..).partition(|w| self.count_upto(core, w.epoch) == 0);
            *p = keep;
            shard.watch.store(p.iter().map(|w| w.epoch).min().unwrap_or(u64::MAX), Relaxed);
            done
        };
        for w in done {
            self.core_drained(&w);
        }
    }

    fn core_drained(&self, w: &SealWait) {
        let prev = w.remaining.fetch_sub(1, AcqRel);
        // Each core reports a close once (its message, or the exit that drains it after).
        assert!(prev > 0, "epoch {}: more cores drained than there are", w.epoch);
        if prev == 1 {
            self.oldest_open.fetch_max(w.epoch + 1, SeqCst);
            if let Some(tx) = w.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(());
            }
            // After the bump above: a waiter that registers later finds the epoch sealed.
            let woken: Vec<Waker> = {
                let mut ws = self.drain_waiters.lock().unwrap_or_else(|e| e.into_inner());
                let (done, keep): (Vec<_>, Vec<_>) = ws.drain(..).partition(|(e, _)| self.is_sealed(*e));
                *ws = keep;
                done.into_iter().map(|(_, w)| w).collect()
            };
            woken.into_iter().for_each(Waker::wake);
        }
    }

    /// Bumps the epoch; returns the closed epoch (the preserved image holds the I/O stamped
    /// with it and every older one) and the future of its seal. Never waits. Must be called
    /// on a reactor core.
    pub fn advance(self: &Arc<Self>) -> Result<(u64, Sealing), AdvanceError> {
        let open = self.epoch.load(SeqCst) + 1 - self.oldest_open.load(SeqCst);
        if open > MAX_OPEN_EPOCHS {
            return Err(AdvanceError::TooManyOpen(open - 1));
        }
        let closed = self.epoch.fetch_add(1, SeqCst);
        let (tx, rx) = oneshot::channel();
        let wait = Arc::new(SealWait { epoch: closed, remaining: AtomicUsize::new(self.shards.len()), done: Mutex::new(Some(tx)) });
        for core in 0..self.shards.len() {
            let (me, wait) = (self.clone(), wait.clone());
            reactor::send_to(core, move || me.close_on_this_core(wait));
        }
        Ok((closed, rx))
    }

    fn close_on_this_core(&self, wait: Arc<SealWait>) {
        let core = reactor::current_index();
        if self.count_upto(core, wait.epoch) == 0 {
            self.core_drained(&wait);
            return;
        }
        let shard = &self.shards[core];
        let mut p = shard.pending.lock().unwrap_or_else(|e| e.into_inner());
        shard.watch.fetch_min(wait.epoch, Relaxed);
        p.push(wait);
    }

    /// I/Os stamped with `epoch` or older still in flight on all cores (a status figure: exact
    /// only when read on a quiet tracker).
    pub fn in_flight_upto(&self, epoch: u64) -> u64 {
        (0..self.shards.len()).map(|c| self.count_upto(c, epoch)).sum()
    }

    /// Whether every I/O stamped `epoch` or older has completed.
    pub fn is_sealed(&self, epoch: u64) -> bool {
        self.oldest_open.load(SeqCst) > epoch
    }

    /// Completes once every I/O stamped `epoch` or older has completed. `epoch` must have been
    /// closed by [`Self::advance`] (only a close completes a seal). A task waiting here must
    /// not hold anything an I/O of that epoch waits for.
    pub fn drained(&self, epoch: u64) -> impl std::future::Future<Output = ()> + '_ {
        assert!(epoch < self.current(), "epoch {epoch} is still open: nothing would ever seal it");
        std::future::poll_fn(move |cx| {
            if self.is_sealed(epoch) {
                return Poll::Ready(());
            }
            let mut ws = self.drain_waiters.lock().unwrap_or_else(|e| e.into_inner());
            // Checked again under the list's lock: a seal that completed since the check
            // above took the list before this waker went in, and would never wake it.
            if self.is_sealed(epoch) {
                return Poll::Ready(());
            }
            ws.push((epoch, cx.waker().clone()));
            Poll::Pending
        })
    }

    /// Completes once [`Self::advance`] would not refuse with [`AdvanceError::TooManyOpen`]:
    /// once the oldest of the open epochs that hold the limit sealed. A caller that got the
    /// refusal waits here instead of retrying by timer: the seal that makes room wakes it.
    /// Another caller may take the room first, so advance again and wait again on a refusal.
    pub async fn advance_possible(&self) {
        loop {
            // `advance` refuses while `current + 1 - oldest_open > MAX_OPEN_EPOCHS`, i.e. while
            // epoch `current - MAX_OPEN_EPOCHS` is not sealed (none such below the limit).
            let Some(limit) = self.current().checked_sub(MAX_OPEN_EPOCHS) else { return };
            if self.is_sealed(limit) {
                return;
            }
            // Below the current epoch, and not sealed, so closed by an `advance`: `drained`
            // may wait for it.
            self.drained(limit).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::ManualCores;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn seals_when_the_last_old_epoch_io_exits_on_any_core() {
        let cores = ManualCores::new(2);
        let t = EpochTracker::new(2, 0);
        let a = cores.enter(0, || t.enter());
        let b = cores.enter(1, || t.enter());
        assert_eq!((a.epoch(), b.epoch()), (0, 0));
        let sealed = Rc::new(RefCell::new(false));
        let (t2, s2) = (t.clone(), sealed.clone());
        cores.enter(0, || {
            crate::reactor::spawn_detached(async move {
                let (closed, seal) = t2.advance().unwrap();
                assert_eq!(closed, 0);
                seal.await.unwrap();
                *s2.borrow_mut() = true;
            })
        });
        cores.run_until_idle();
        // New submissions get the new epoch and do not hold the seal back.
        let c = cores.enter(1, || t.enter());
        assert_eq!(c.epoch(), 1);
        assert_eq!(t.in_flight_upto(0), 2);
        cores.enter(0, || t.exit(a));
        cores.run_until_idle();
        assert!(!*sealed.borrow());
        cores.enter(1, || t.exit(b));
        cores.run_until_idle();
        assert!(*sealed.borrow());
        assert!(t.is_sealed(0) && !t.is_sealed(1));
        cores.enter(1, || t.exit(c));
    }

    #[test]
    fn a_quiet_tracker_seals_at_once_and_limits_open_epochs() {
        let cores = ManualCores::new(1);
        let t = EpochTracker::new(1, 5);
        let held = cores.enter(0, || t.enter());
        let mut seals = Vec::new();
        for _ in 0..MAX_OPEN_EPOCHS {
            seals.push(cores.enter(0, || t.advance()).unwrap());
        }
        assert!(cores.enter(0, || t.advance()).is_err());
        cores.run_until_idle();
        cores.enter(0, || t.exit(held));
        cores.run_until_idle();
        assert!(t.is_sealed(5 + MAX_OPEN_EPOCHS - 1));
        for (_, mut s) in seals {
            assert_eq!(s.try_recv().unwrap(), Some(()));
        }
    }

    #[test]
    fn advance_possible_wakes_a_refused_caller_when_the_oldest_epoch_seals() {
        let cores = ManualCores::new(1);
        let t = EpochTracker::new(1, 1);
        // An I/O of the first epoch holds every later seal back (seals complete in order).
        let held = cores.enter(0, || t.enter());
        let seals: Vec<_> = (0..MAX_OPEN_EPOCHS).map(|_| cores.enter(0, || t.advance()).unwrap()).collect();
        assert!(cores.enter(0, || t.advance()).is_err());
        cores.run_until_idle();
        let advanced = Rc::new(RefCell::new(None));
        let (t2, a2) = (t.clone(), advanced.clone());
        cores.enter(0, || {
            crate::reactor::spawn_detached(async move {
                t2.advance_possible().await;
                *a2.borrow_mut() = Some(t2.advance().map(|(closed, _)| closed));
            })
        });
        cores.run_until_idle();
        assert!(advanced.borrow().is_none(), "no room yet: the oldest open epoch has an I/O in flight");
        cores.enter(0, || t.exit(held));
        // No simulated time passes: only the seal can have woken the waiter (no timer fired).
        cores.run_until_idle();
        assert_eq!(*advanced.borrow(), Some(Ok(1 + MAX_OPEN_EPOCHS)), "the waiter advanced once the seal made room");
        assert!(cores.next_timer().is_none(), "the wait set no timer");
        drop(seals);
    }

    #[test]
    fn drained_wakes_a_waiter_on_another_core_once_the_old_epoch_is_gone() {
        let cores = ManualCores::new(2);
        let t = EpochTracker::new(2, 0);
        let old = cores.enter(0, || t.enter());
        let (closed, _seal) = cores.enter(0, || t.advance()).unwrap();
        cores.run_until_idle();
        let woke = Rc::new(RefCell::new(false));
        let (t2, w2) = (t.clone(), woke.clone());
        cores.enter(1, || {
            crate::reactor::spawn_detached(async move {
                t2.drained(closed).await;
                *w2.borrow_mut() = true;
            })
        });
        cores.run_until_idle();
        // The old epoch's write is still in flight: the waiter must not run ahead of it.
        assert!(!*woke.borrow());
        cores.enter(0, || t.exit(old));
        cores.run_until_idle();
        assert!(*woke.borrow(), "the waiter was not woken when the epoch sealed");
        // Once sealed, a wait completes at once.
        let again = Rc::new(RefCell::new(false));
        let (t3, a3) = (t.clone(), again.clone());
        cores.enter(0, || {
            crate::reactor::spawn_detached(async move {
                t3.drained(closed).await;
                *a3.borrow_mut() = true;
            })
        });
        cores.run_until_idle();
        assert!(*again.borrow());
    }
}
