//! The write gate of a bdev's logical units: ordinary writes (WRITE, WRITE SAME, UNMAP, a copy's
//! writes) pass without a lock; the rare commands that must be atomic against every other write
//! to their blocks (COMPARE AND WRITE, ORWRITE, SANITIZE) take the range exclusively.
//!
//! Ordinary writes need no order among themselves (SBC leaves overlapping writes in flight
//! unordered), so locking each of them only served the rare atomic commands, and cost an extent
//! lock on the range's shard, often another core's (a message there and back), on every write.
//! This is SPDK's range-lock idea in the shape of our epoch tracker:
//!
//! * An ordinary write stamps itself with the gate's epoch (a relaxed add on its core's own
//!   counter), then reads the count of exclusive holders. Zero: it writes without a lock and
//!   exits the epoch when done. Not zero: it gives the stamp back and takes the extent lock, as
//!   every write did before.
//! * An exclusive command raises the count, closes the current epoch and waits until every
//!   write stamped with it (or earlier) has finished, then takes the extent lock. A write that
//!   read zero loaded the epoch before the count was raised (both `SeqCst`), so it is stamped
//!   with the closed epoch or an older one: the wait covers it. Writes arriving later see the
//!   count and queue on the extent lock, where the exclusive command holds its range.
//!
//! The cost moves to the rare command (a message per core and a drain of the writes in flight)
//! and away from every write.

use crate::extent_lock::{ExtentGuard, LockSpace};
use crate::preserve::{AdvanceError, EpochTicket, EpochTracker};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};

/// Blocks per extent-lock region: writes of up to a few MiB take one piece.
const LOCK_REGION_BLOCKS: u64 = 1 << 14;

pub(crate) struct WriteGate {
    /// Exclusive commands past their first step (raising this) and not yet done.
    exclusive: AtomicU32,
    /// Epochs of the writes that passed without the lock.
    passes: Arc<EpochTracker>,
    locks: Arc<LockSpace>,
}

/// The gate of each bdev with a logical unit, by bdev entry id: every unit on a bdev (one per
/// target that exports it) shares it, so atomicity holds across targets.
static GATES: Mutex<Option<HashMap<u64, Weak<WriteGate>>>> = Mutex::new(None);

/// The gate of bdev `entry_id`, made on first use (not a data-path call: once per unit).
pub(crate) fn for_bdev(entry_id: u64, cores: usize) -> Arc<WriteGate> {
    let mut g = GATES.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(s) = map.get(&entry_id).and_then(Weak::upgrade) {
        return s;
    }
    let cores = cores.max(1);
    let s = Arc::new(WriteGate { exclusive: AtomicU32::new(0), passes: EpochTracker::new(cores, 0), locks: LockSpace::new(cores, LOCK_REGION_BLOCKS) });
    map.insert(entry_id, Arc::downgrade(&s));
    s
}

/// An ordinary write's hold on its blocks: a stamp (no exclusive command was running) or the
/// extent lock (one was). Dropped on the core that took it, when the write is done.
pub(crate) enum WriteHold<'a> {
    Passed { gate: &'a WriteGate, ticket: Option<EpochTicket> },
    Locked(#[allow(dead_code)] ExtentGuard),
}

impl Drop for WriteHold<'_> {
    fn drop(&mut self) {
        if let WriteHold::Passed { gate, ticket } = self {
            if let Some(t) = ticket.take() {
                gate.passes.exit(t);
            }
        }
    }
}

/// An exclusive command's hold: no other write of any unit on the bdev runs in its blocks.
pub(crate) struct Exclusive<'a> {
    gate: &'a WriteGate,
    guard: Option<ExtentGuard>,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        // The range first, so that writes queued on it run at once; then the count, after
        // which new writes pass without the lock again.
        drop(self.guard.take());
        let prev = self.gate.exclusive.fetch_sub(1, SeqCst);
        assert!(prev > 0, "write gate: more exclusive holds released than taken");
    }
}

impl WriteGate {
    /// Holds `lba..lba+blocks` for an ordinary write.
    pub(crate) async fn write(&self, lba: u64, blocks: u64) -> WriteHold<'_> {
        let ticket = self.passes.enter();
        if self.exclusive.load(SeqCst) == 0 {
            return WriteHold::Passed { gate: self, ticket: Some(ticket) };
        }
        self.passes.exit(ticket);
        WriteHold::Locked(self.locks.lock(lba, blocks).await)
    }

    /// Holds `lba..lba+blocks` against every other write to them, ordinary or exclusive.
    pub(crate) async fn exclusive(&self, lba: u64, blocks: u64) -> Exclusive<'_> {
        self.exclusive.fetch_add(1, SeqCst);
        // From here the hold exists: a future dropped while waiting lowers the count again.
        let mut hold = Exclusive { gate: self, guard: None };
        loop {
            match self.passes.advance() {
                Ok((_, sealing)) => {
                    // An error means the tracker went away, which cannot happen while we hold
                    // it; either way no passed write of the closed epochs is left to wait for.
                    let _ = sealing.await;
                    break;
                }
                // Too many epochs still draining: the seal that makes room wakes us.
                Err(AdvanceError::TooManyOpen(_)) => self.passes.advance_possible().await,
            }
        }
        hold.guard = Some(self.locks.lock(lba, blocks).await);
        hold
    }

    #[cfg(test)]
    fn exclusive_count(&self) -> u32 {
        self.exclusive.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{self, ManualCores};
    use std::cell::{Cell, RefCell};
    use std::future::Future;
    use std::rc::Rc;

    fn gate(cores: usize) -> Arc<WriteGate> {
        Arc::new(WriteGate { exclusive: AtomicU32::new(0), passes: EpochTracker::new(cores, 0), locks: LockSpace::new(cores, LOCK_REGION_BLOCKS) })
    }

    /// An ordinary write of block 0 passed on core 0 and still in flight (its hold, to drop).
    fn passed_write(cores: &ManualCores, gs: &'static Arc<WriteGate>) -> Rc<RefCell<Option<WriteHold<'static>>>> {
        let w = Rc::new(RefCell::new(None));
        let w1 = w.clone();
        cores.enter(0, || reactor::spawn_detached(async move { *w1.borrow_mut() = Some(gs.write(0, 1).await) }));
        cores.run_until_idle();
        w
    }

    #[test]
    fn writes_pass_without_the_lock_while_nothing_is_exclusive() {
        let cores = ManualCores::new(1);
        let g = gate(1);
        cores.block_on(0, async move {
            let a = g.write(0, 8).await;
            let b = g.write(0, 8).await;
            assert!(matches!(a, WriteHold::Passed { .. }) && matches!(b, WriteHold::Passed { .. }), "overlapping ordinary writes do not wait for each other");
            assert_eq!(g.locks.stats().acquired, 0, "no extent lock taken");
        });
    }

    /// An exclusive command waits for a passed write in flight on another core, and a write
    /// arriving while it holds its range waits for it; each sees the other whole.
    #[test]
    fn an_exclusive_hold_waits_for_passed_writes_and_holds_later_ones() {
        let cores = ManualCores::new(2);
        let g = gate(2);
        let passed = Rc::new(RefCell::new(None));
        let p1 = passed.clone();
        // Core 1: a write passed and is in flight. (Holds borrow the gate: a leaked clone
        // lets the tasks be 'static.)
        let gs: &'static Arc<WriteGate> = Box::leak(Box::new(Arc::clone(&g)));
        cores.enter(1, || reactor::spawn_detached(async move { *p1.borrow_mut() = Some(gs.write(0, 4).await) }));
        cores.run_until_idle();
        assert!(matches!(passed.borrow().as_ref(), Some(WriteHold::Passed { .. })));

        let held = Rc::new(Cell::new(false));
        let (release, released) = futures::channel::oneshot::channel::<()>();
        let h = held.clone();
        cores.enter(0, || {
            reactor::spawn_detached(async move {
                let x = gs.exclusive(2, 4).await;
                h.set(true);
                let _ = released.await;
                drop(x);
            })
        });
        cores.run_until_idle();
        assert!(!held.get(), "the exclusive hold waited for the write in flight");
        assert_eq!(g.exclusive_count(), 1);
        cores.enter(1, || drop(passed.borrow_mut().take()));
        cores.run_until_idle();
        assert!(held.get(), "granted once the passed write is done");

        // A write arriving now takes the lock and waits for the exclusive range.
        let wrote = Rc::new(Cell::new(false));
        let w = wrote.clone();
        cores.enter(1, || {
            reactor::spawn_detached(async move {
                let hold = gs.write(4, 1).await;
                assert!(matches!(hold, WriteHold::Locked(_)));
                w.set(true);
            })
        });
        cores.run_until_idle();
        assert!(!wrote.get(), "a write into an exclusive range waits");
        let _ = release.send(());
        cores.run_until_idle();
        assert!(wrote.get(), "and runs once it is released");
        assert_eq!(g.exclusive_count(), 0);
        // Nothing exclusive: writes pass again.
        cores.block_on(0, async move { assert!(matches!(gs.write(0, 1).await, WriteHold::Passed { .. })) });
    }

    /// A burst of exclusive commands larger than the epochs the tracker keeps open: those
    /// refused wait for the seal that makes room, not for a timer, and all are granted once
    /// the write holding the oldest epoch is done.
    #[test]
    fn a_burst_of_exclusive_commands_waits_for_room_without_a_timer() {
        let cores = ManualCores::new(1);
        let g = gate(1);
        let gs: &'static Arc<WriteGate> = Box::leak(Box::new(Arc::clone(&g)));
        let w = passed_write(&cores, gs);
        let burst = crate::preserve::MAX_OPEN_EPOCHS + 2;
        let granted = Rc::new(Cell::new(0u64));
        for i in 0..burst {
            let gr = granted.clone();
            cores.enter(0, || {
                reactor::spawn_detached(async move {
                    drop(gs.exclusive(8 + i, 1).await);
                    gr.set(gr.get() + 1);
                })
            });
        }
        cores.run_until_idle();
        assert_eq!(granted.get(), 0, "every exclusive command waits for the write in flight");
        assert!(g.passes.advance().is_err(), "the burst holds every open epoch the tracker allows");
        assert!(cores.next_timer().is_none(), "those refused wait for a seal, not a timer");
        cores.enter(0, || drop(w.borrow_mut().take()));
        cores.run_until_idle();
        assert_eq!(granted.get(), burst, "all granted once the write is done");
        assert!(cores.next_timer().is_none());
        assert_eq!(g.exclusive_count(), 0);
    }

    #[test]
    fn an_exclusive_future_dropped_while_waiting_lowers_the_count() {
        let cores = ManualCores::new(1);
        let g = gate(1);
        let gs: &'static Arc<WriteGate> = Box::leak(Box::new(Arc::clone(&g)));
        let w = passed_write(&cores, gs);
        let fut = Rc::new(RefCell::new(Some(Box::pin(gs.exclusive(0, 1)))));
        let f = fut.clone();
        cores.enter(0, || {
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut b = f.borrow_mut();
            assert!(b.as_mut().unwrap().as_mut().poll(&mut cx).is_pending());
        });
        assert_eq!(g.exclusive_count(), 1);
        cores.enter(0, || drop(fut.borrow_mut().take()));
        assert_eq!(g.exclusive_count(), 0, "a cancelled exclusive command does not leave writes locked");
        cores.enter(0, || drop(w.borrow_mut().take()));
        cores.run_until_idle();
    }
}
