//! Extent locks: exclusive locks on block ranges of one bdev ("lock space"), held in memory in
//! one shard per reactor core (DESIGN §1, "Extent locks").
//!
//! * The shard of a range is chosen from the lock space and the range's *region* (an aligned
//!   power-of-two run of blocks): `shard = mix(space, region) % cores`. A range that spans
//!   several regions takes its pieces one region after the other, in ascending order, which
//!   keeps lockers deadlock-free (every locker acquires in the same global order).
//! * A request for the current core's shard is granted synchronously when the range is free.
//!   A request for another core's shard travels as a reactor message; the answer comes back
//!   through a oneshot channel. No mutex, no spinning, no thread ever blocks.
//! * A request for a range that overlaps a held range *or an earlier waiting request* waits in
//!   that shard's FIFO queue; it is resumed when the range frees (no starvation of large
//!   ranges by a stream of small ones).
//! * Locks exist only in memory: they are never written to media and never appear in any image.
//!
//! Usage (from a task on a reactor core):
//! ```ignore
//! let space = LockSpace::new(core_count, 1024);      // regions of 1024 blocks
//! let guard = space.lock(offset_blocks, num_blocks).await;
//! // ... the range is exclusively ours ...
//! drop(guard);                                        // released (by message if remote)
//! ```
//! Dropping a `lock()` future that has not finished is safe: a grant that arrives for it is
//! released at once.

use crate::reactor;
use crossbeam_utils::CachePadded;
use futures::channel::oneshot;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

static NEXT_SPACE: AtomicU64 = AtomicU64::new(1);

/// Wait statistics of one shard of one lock space (written only by the shard's core).
#[derive(Default)]
struct ShardStats {
    acquired: AtomicU64,
    waits: AtomicU64,
    wait_ns: AtomicU64,
}

/// Totals over all shards of a lock space.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LockStats {
    /// Lock pieces granted.
    pub acquired: u64,
    /// Of those, how many had to wait in a queue.
    pub waits: u64,
    /// Total time spent waiting, in nanoseconds.
    pub wait_ns: u64,
}

/// The locks of one bdev (or any other address space of blocks).
pub struct LockSpace {
    id: u64,
    /// Mixed with a region to pick its shard.
    shard_seed: u64,
    region_shift: u32,
    cores: usize,
    stats: Box<[CachePadded<ShardStats>]>,
}

impl LockSpace {
    /// A lock space whose shards live on `cores` cores, with regions of `region_blocks` blocks
    /// (rounded up to a power of two).
    pub fn new(cores: usize, region_blocks: u64) -> Arc<LockSpace> {
        let id = NEXT_SPACE.fetch_add(1, Relaxed);
        Self::build(cores, region_blocks, id, id)
    }

    /// Like [`Self::new`], with the regions' placement on shards chosen by `shard_seed` rather
    /// than by the process-wide space counter, so that it does not depend on how many lock
    /// spaces were made before (a simulation replays one seed among thousands run in one
    /// process).
    pub fn with_shard_seed(cores: usize, region_blocks: u64, shard_seed: u64) -> Arc<LockSpace> {
        Self::build(cores, region_blocks, NEXT_SPACE.fetch_add(1, Relaxed), shard_seed)
    }

    fn build(cores: usize, region_blocks: u64, id: u64, shard_seed: u64) -> Arc<LockSpace> {
        assert!(cores > 0, "a lock space needs at least one core");
        let region_shift = region_blocks.max(1).next_power_of_two().trailing_zeros();
        Arc::new(LockSpace { id, shard_seed, region_shift, cores, stats: (0..cores).map(|_| CachePadded::new(ShardStats::default())).collect() })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The core whose shard holds locks of region `region`.
    pub fn shard_of(&self, region: u64) -> usize {
        // splitmix64 finaliser: deterministic (the simulation replays it) and well spread.
        let mut z = self.shard_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ region;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % self.cores as u64) as usize
    }

    pub fn stats(&self) -> LockStats {
        let mut s = LockStats::default();
        for sh in self.stats.iter() {
            s.acquired += sh.acquired.load(Relaxed);
            s.waits += sh.waits.load(Relaxed);
            s.wait_ns += sh.wait_ns.load(Relaxed);
        }
        s
    }

    /// Locks blocks `start..start+count` exclusively; completes when every piece is granted.
    /// Must be called on a reactor core. `count` must be at least 1.
    pub async fn lock(self: &Arc<Self>, start: u64, count: u64) -> ExtentGuard {
        assert!(count > 0, "an extent lock covers at least one block");
        let end = start.checked_add(count).expect("extent lock range overflows u64");
        let mut guard = ExtentGuard { first: None, rest: Vec::new() };
        let mut piece_start = start;
        while piece_start < end {
            let region = piece_start >> self.region_shift;
            let region_end = (region + 1).checked_shl(self.region_shift).unwrap_or(u64::MAX);
            let piece_end = end.min(region_end);
            let shard = self.shard_of(region);
            let grant = self.acquire(shard, piece_start, piece_end).await;
            match guard.first {
                None => guard.first = Some(grant),
                Some(_) => guard.rest.push(grant),
            }
            piece_start = piece_end;
        }
        guard
    }

    /// Locks blocks `start..start+count` at once if that needs neither a wait nor a message:
    /// the range lies in one region, that region's shard is this core's, and nothing held or
    /// queued there overlaps it. None otherwise (nothing was taken or queued): call
    /// [`Self::lock`], which then queues in the same order this call would have found.
    pub fn try_lock(self: &Arc<Self>, start: u64, count: u64) -> Option<ExtentGuard> {
        let end = start.checked_add(count).filter(|_| count > 0)?;
        let region = start >> self.region_shift;
        if (end - 1) >> self.region_shift != region {
            return None;
        }
        let shard = self.shard_of(region);
        if shard != reactor::current_index() {
            return None;
        }
        let table = reactor::with_core(|c| c.local::<ShardTable>());
        let grant = table.try_grant(self, shard, start, end).ok()?;
        Some(ExtentGuard { first: Some(grant), rest: Vec::new() })
    }

    async fn acquire(self: &Arc<Self>, shard: usize, start: u64, end: u64) -> Grant {
        if shard == reactor::current_index() {
            let table = reactor::with_core(|c| c.local::<ShardTable>());
            let (tx, rx) = match table.try_grant(self, shard, start, end) {
                Ok(g) => return g,
                Err(()) => oneshot::channel(),
            };
            table.enqueue(self, start, end, tx);
            return rx.await.expect("lock shards answer every queued request");
        }
        let (tx, rx) = oneshot::channel();
        let space = self.clone();
        reactor::send_to(shard, move || {
            let table = reactor::with_core(|c| c.local::<ShardTable>());
            match table.try_grant(&space, shard, start, end) {
                // The requester may have gone away meanwhile: dropping the grant releases it.
                Ok(g) => drop(tx.send(g)),
                Err(()) => table.enqueue(&space, start, end, tx),
            }
        });
        rx.await.expect("lock shards answer every queued request")
    }
}

/// One granted piece: a range inside one region, held in one shard. Dropping it releases it.
struct Grant {
    space: Arc<LockSpace>,
    shard: usize,
    start: u64,
    /// False once released by hand (the shard itself releases a grant nobody can receive).
    armed: bool,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Off a core (a simulated crash tearing everything down) there is no shard left to
        // tell: the whole table is being dropped.
        let Some(core) = reactor::try_current() else { return };
        let (start, shard) = (self.start, self.shard);
        if core.index() == shard {
            core.local::<ShardTable>().release(&self.space, start);
        } else {
            let space = self.space.clone();
            reactor::send_to(shard, move || reactor::with_core(|c| c.local::<ShardTable>()).release(&space, start));
        }
    }
}

/// Locked block ranges; released when dropped.
pub struct ExtentGuard {
    /// Most locks fit one region: their one piece needs no vector (no allocation per lock).
    first: Option<Grant>,
    rest: Vec<Grant>,
}

impl std::fmt::Debug for ExtentGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtentGuard({} piece(s))", self.first.iter().count() + self.rest.len())
    }
}

struct Waiter {
    start: u64,
    end: u64,
    since_ns: u64,
    tx: oneshot::Sender<Grant>,
}

#[derive(Default)]
struct SpaceShard {
    /// Held ranges by start; disjoint, so ordered by end too.
    held: BTreeMap<u64, u64>,
    waiters: VecDeque<Waiter>,
}

impl SpaceShard {
    fn overlaps_held(&self, start: u64, end: u64) -> bool {
        self.held.range(..end).next_back().is_some_and(|(_, &e)| e > start)
    }
}

/// The shard table of one core: every lock space's held ranges and queues on this core.
///
/// A space's entry stays when it empties (making and dropping it per lock cost allocations
/// on every write); it is dropped once its space is gone and it is empty, checked whenever a
/// new space comes in (rare: a bdev is created).
#[derive(Default)]
struct ShardTable {
    spaces: RefCell<BTreeMap<u64, (Weak<LockSpace>, SpaceShard)>>,
}

impl ShardTable {
    fn shard_of<'t>(spaces: &'t mut BTreeMap<u64, (Weak<LockSpace>, SpaceShard)>, space: &Arc<LockSpace>) -> &'t mut SpaceShard {
        if !spaces.contains_key(&space.id) {
            spaces.retain(|_, (w, s)| w.strong_count() > 0 || !s.held.is_empty() || !s.waiters.is_empty());
            spaces.insert(space.id, (Arc::downgrade(space), SpaceShard::default()));
        }
        &mut spaces.get_mut(&space.id).expect("inserted above").1
    }

    fn try_grant(&self, space: &Arc<LockSpace>, shard: usize, start: u64, end: u64) -> Result<Grant, ()> {
        let mut spaces = self.spaces.borrow_mut();
        let s = Self::shard_of(&mut spaces, space);
        let queued_overlap = s.waiters.iter().any(|w| w.start < end && start < w.end);
        if queued_overlap || s.overlaps_held(start, end) {
            return Err(());
        }
        // Held ranges are disjoint (checked just above): two grants never share a start.
        let prev = s.held.insert(start, end);
        assert!(prev.is_none(), "extent lock {start}..{end} granted over a held range");
        // Only this shard's core writes its statistics: a load and a store, no locked add.
        let acquired = &space.stats[shard].acquired;
        acquired.store(acquired.load(Relaxed) + 1, Relaxed);
        Ok(Grant { space: space.clone(), shard, start, armed: true })
    }

    fn enqueue(&self, space: &Arc<LockSpace>, start: u64, end: u64, tx: oneshot::Sender<Grant>) {
        let mut spaces = self.spaces.borrow_mut();
        let s = Self::shard_of(&mut spaces, space);
        s.waiters.push_back(Waiter { start, end, since_ns: reactor::now_ns(), tx });
    }

    fn release(&self, space: &Arc<LockSpace>, start: u64) {
        let shard = reactor::current_index();
        let mut spaces = self.spaces.borrow_mut();
        let Some((_, s)) = spaces.get_mut(&space.id) else { return };
        let removed = s.held.remove(&start);
        // Only a grant's owner releases it, once (its Drop): a release of a range not held
        // would mean two owners of one range, i.e. writes no longer ordered.
        assert!(removed.is_some(), "released an extent lock that is not held");
        // Grant, in FIFO order, every waiter that overlaps neither a held range nor an earlier
        // waiter that stays queued. A grant nobody can receive any more is released on the
        // spot, which may free more waiters: repeat until nothing changes.
        if s.waiters.is_empty() {
            return;
        }
        let now = reactor::now_ns();
        loop {
            let mut changed = false;
            let mut i = 0;
            while i < s.waiters.len() {
                let (ws, we) = (s.waiters[i].start, s.waiters[i].end);
                let blocked = s.overlaps_held(ws, we) || s.waiters.iter().take(i).any(|w| w.start < we && ws < w.end);
                if blocked {
                    i += 1;
                    continue;
                }
                let w = s.waiters.remove(i).expect("index checked");
                // Not blocked: overlaps no held range, so no held range starts at `ws`.
                let prev = s.held.insert(ws, we);
                assert!(prev.is_none(), "extent lock {ws}..{we} granted over a held range");
                let st = &space.stats[shard];
                st.acquired.fetch_add(1, Relaxed);
                st.waits.fetch_add(1, Relaxed);
                st.wait_ns.fetch_add(now.saturating_sub(w.since_ns), Relaxed);
                let grant = Grant { space: space.clone(), shard, start: ws, armed: true };
                if let Err(mut g) = w.tx.send(grant) {
                    g.armed = false;
                    s.held.remove(&ws);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{spawn_detached, ManualCores};
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn overlapping_requests_wait_in_fifo_order_across_cores() {
        let cores = ManualCores::new(3);
        let space = LockSpace::new(3, 8);
        let log = Rc::new(RefCell::new(Vec::new()));
        // Three lockers of overlapping ranges, each holding its lock for a while.
        for (i, (start, count)) in [(0u64, 20u64), (5, 2), (15, 10)].into_iter().enumerate() {
            let (space, log) = (space.clone(), log.clone());
            cores.enter(i, || {
                spawn_detached(async move {
                    let g = space.lock(start, count).await;
                    log.borrow_mut().push(("got", i, crate::reactor::now_ns()));
                    crate::reactor::sleep(std::time::Duration::from_micros(10)).await;
                    log.borrow_mut().push(("free", i, crate::reactor::now_ns()));
                    drop(g);
                })
            });
            cores.run_until_idle();
        }
        while let Some(t) = cores.next_timer() {
            cores.advance_to(t);
            cores.run_until_idle();
        }
        let l = log.borrow();
        assert_eq!(l[0], ("got", 0, 0));
        // Lockers 1 and 2 both overlap locker 0 and not each other: both run after it frees.
        assert_eq!(l.iter().filter(|e| e.0 == "got").count(), 3);
        let got1 = l.iter().position(|e| *e == ("got", 1, 10_000)).expect("1 granted at 10us");
        let free0 = l.iter().position(|e| *e == ("free", 0, 10_000)).unwrap();
        assert!(got1 > free0);
        let s = space.stats();
        assert_eq!(s.waits, 2, "{s:?}");
        assert!(s.acquired >= 3);
        assert_eq!(s.wait_ns, 20_000);
    }

    #[test]
    fn a_dropped_waiter_does_not_keep_the_lock() {
        let cores = ManualCores::new(2);
        let space = LockSpace::new(2, 1 << 20);
        let held = Rc::new(RefCell::new(None));
        let (s2, h2) = (space.clone(), held.clone());
        cores.enter(0, || spawn_detached(async move { *h2.borrow_mut() = Some(s2.lock(0, 4).await) }));
        cores.run_until_idle();
        assert!(held.borrow().is_some());
        // A second locker waits, then its task is dropped (cancelled) before the grant.
        let s3 = space.clone();
        let task = cores.enter(1, || crate::reactor::spawn(async move { s3.lock(2, 1).await }));
        cores.run_until_idle();
        cores.enter(1, || drop(task));
        cores.enter(0, || drop(held.borrow_mut().take()));
        cores.run_until_idle();
        // The range is free again: a third locker gets it at once.
        let ok = Rc::new(RefCell::new(false));
        let (s4, ok2) = (space.clone(), ok.clone());
        cores.enter(1, || {
            spawn_detached(async move {
                let _g = s4.lock(0, 4).await;
                *ok2.borrow_mut() = true;
            })
        });
        cores.run_until_idle();
        assert!(*ok.borrow());
    }

    #[test]
    fn disjoint_ranges_never_wait_and_multi_region_ranges_lock_in_order() {
        let cores = ManualCores::new(2);
        let space = LockSpace::new(2, 4);
        let done = Rc::new(RefCell::new(0));
        for i in 0..2 {
            let (space, done) = (space.clone(), done.clone());
            cores.enter(i, || {
                spawn_detached(async move {
                    let a = space.lock(i as u64 * 100, 30).await;
                    let b = space.lock(1000 + i as u64 * 100, 3).await;
                    drop((a, b));
                    *done.borrow_mut() += 1;
                })
            });
        }
        cores.run_until_idle();
        assert_eq!(*done.borrow(), 2);
        assert_eq!(space.stats().waits, 0);
    }

    #[test]
    fn try_lock_grants_only_what_lock_would_grant_at_once() {
        let cores = ManualCores::new(2);
        let space = LockSpace::with_shard_seed(2, 8, 7);
        // A region whose shard is core 0, and one whose shard is core 1.
        let local = (0..64u64).find(|r| space.shard_of(*r) == 0).expect("a region of core 0") * 8;
        let remote = (0..64u64).find(|r| space.shard_of(*r) == 1).expect("a region of core 1") * 8;
        cores.enter(0, || {
            let g = space.try_lock(local, 4).expect("a free local range is granted in place");
            assert!(space.try_lock(local + 2, 4).is_none(), "overlaps a held range");
            assert!(space.try_lock(local + 4, 4).is_some(), "disjoint from it: granted (and freed)");
            assert!(space.try_lock(remote, 1).is_none(), "another core's shard needs a message");
            assert!(space.try_lock(local + 6, 4).is_none(), "spans two regions");
            assert!(space.try_lock(local, 0).is_none(), "empty range");
            drop(g);
        });
        // A request queued behind a held range keeps its turn: a later overlapping try_lock
        // does not pass it, even once the range is free.
        let held = Rc::new(RefCell::new(cores.enter(0, || space.try_lock(local, 4))));
        let got = Rc::new(RefCell::new(false));
        let (s2, got2) = (space.clone(), got.clone());
        cores.enter(0, || {
            spawn_detached(async move {
                let _g = s2.lock(local + 3, 2).await;
                *got2.borrow_mut() = true;
                crate::reactor::sleep(std::time::Duration::from_micros(5)).await;
            })
        });
        cores.run_until_idle();
        assert!(!*got.borrow());
        cores.enter(0, || assert!(space.try_lock(local + 4, 1).is_none(), "overlaps the queued request"));
        cores.enter(0, || drop(held.borrow_mut().take()));
        cores.run_until_idle();
        assert!(*got.borrow(), "the queued request got the range when it freed");
        cores.enter(0, || assert!(space.try_lock(local + 4, 1).is_none(), "now held by the queued request"));
        while let Some(t) = cores.next_timer() {
            cores.advance_to(t);
            cores.run_until_idle();
        }
        cores.enter(0, || assert!(space.try_lock(local + 4, 1).is_some()));
    }

    #[test]
    fn a_space_keeps_its_shard_entry_between_locks_and_loses_it_once_dropped() {
        let cores = ManualCores::new(1);
        let entries = || cores.enter(0, || reactor::with_core(|c| c.local::<ShardTable>()).spaces.borrow().len());
        let lock_and_free = |space: &Arc<LockSpace>| {
            let space = space.clone();
            cores.block_on(0, async move { drop(space.lock(0, 4).await) })
        };
        let a = LockSpace::new(1, 8);
        for _ in 0..3 {
            lock_and_free(&a);
        }
        assert_eq!(entries(), 1, "the entry is kept while the space lives");
        drop(a);
        let b = LockSpace::new(1, 8);
        lock_and_free(&b);
        assert_eq!(entries(), 1, "the dropped space's empty entry went when a new space came");
    }
}
