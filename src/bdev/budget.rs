//! The buffer budget of the front ends: how many bytes of I/O buffers hosts can make the
//! target hold, per connection and in total.
//!
//! A host decides how much buffer memory its commands pin: queue depth × transfer size of
//! reads whose data waits to be sent, of writes whose data is being collected or written.
//! Without a bound, a thousand connections at queue depth 128 with 128 KiB reads ask for
//! 16 GiB. So every buffer a front end allocates for a host's command is first charged to the
//! command's connection ([`ConnBudget`]) and to its core's share of the total
//! ([`CoreBudget`]); the charge ([`Lease`]) goes back when the buffer is dropped. When a charge
//! does not fit, the front end applies back-pressure instead of allocating (NVMe/TCP holds
//! the command, or its R2T, until budget frees; iSCSI answers TASK SET FULL and narrows the
//! CmdSN window).
//!
//! The total is split evenly among the cores: a connection lives on one core, and its
//! buffers are allocated and freed there, so charging is a few `Cell` updates on the core
//! (no atomic, no lock, no message). The price is that one core cannot borrow another's
//! share; connections are spread round-robin, so the shares are used evenly.
//!
//! A connection also holds memory whatever its host asks for: its receive buffer, its command
//! slots and tables, its tasks. That is charged to the core when the connection opens
//! ([`ConnBudget::open`]) and given back when it closes, so that a thousand idle connections
//! count too; a connection whose state does not fit is refused at once ([`refuse_connection`]:
//! a log line at most once a second and a counter), never served past the budget.
//!
//! Invariants (checked by the property test below):
//! - a core's charges never exceed its share;
//! - a connection's charges never exceed its limit, except one command larger than the limit
//!   alone on an otherwise idle connection (so that such a command can run at all);
//! - every charge is returned exactly once (when its lease drops), so both go back to zero.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};

/// The default total budget: 1 GiB, or a quarter of the machine's memory if that is less.
pub const DEFAULT_TOTAL_BYTES: u64 = 1 << 30;
/// The default limit of one connection.
pub const DEFAULT_CONNECTION_BYTES: u64 = 16 << 20;
/// The largest single charge: a front end never asks for more at once (an iSCSI command
/// moves at most 8 MiB each way). Each core's share must hold one.
pub const MAX_CHARGE: u64 = 16 << 20;

static TOTAL_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_TOTAL_BYTES);
static CONNECTION_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_CONNECTION_BYTES);

/// Sets the total budget and the per-connection limit; call before the reactors start (each
/// core reads them when it first charges).
pub fn set_buffer_budget(total: u64, per_connection: u64) {
    TOTAL_BYTES.store(total, Ordering::Relaxed);
    CONNECTION_BYTES.store(per_connection, Ordering::Relaxed);
}

/// (total, per connection) as configured.
pub fn buffer_budget() -> (u64, u64) {
    (TOTAL_BYTES.load(Ordering::Relaxed), CONNECTION_BYTES.load(Ordering::Relaxed))
}

/// The default total for a machine with `mem_total` bytes of memory (0 = unknown).
pub fn default_total(mem_total: u64) -> u64 {
    if mem_total == 0 {
        DEFAULT_TOTAL_BYTES
    } else {
        DEFAULT_TOTAL_BYTES.min(mem_total / 4).max(MAX_CHARGE)
    }
}

/// MemTotal of /proc/meminfo in bytes (0 when unreadable).
pub fn mem_total() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
}

/// Per-core figures readable from other threads (metrics). Aligned to a cache-line pair (as
/// `CachePadded`): a core stores `used` twice per command, and unaligned 40-byte entries put
/// neighbouring cores' figures on one line, bounced between them on every command.
#[repr(align(128))]
struct CoreStats {
    used: AtomicU64,
    peak: AtomicU64,
    deferrals: AtomicU64,
    limit: AtomicU64,
    /// Connections refused because their state did not fit.
    conns_refused: AtomicU64,
}

const MAX_CORES: usize = 256;
static STATS: [CoreStats; MAX_CORES] = [const {
    CoreStats { used: AtomicU64::new(0), peak: AtomicU64::new(0), deferrals: AtomicU64::new(0), limit: AtomicU64::new(0), conns_refused: AtomicU64::new(0) }
}; MAX_CORES];
static LAST_REFUSAL_LOG_NS: AtomicU64 = AtomicU64::new(0);

/// Connections refused at accept since start because their state did not fit the budget.
pub fn connections_refused() -> u64 {
    STATS.iter().map(|s| s.conns_refused.load(Ordering::Relaxed)).sum()
}

/// Counts a connection refused because [`ConnBudget::open`] failed, and says so in the log
/// (at most once a second: a flood of connections must not become a flood of log lines).
pub fn refuse_connection(front: &str, peer: impl std::fmt::Display, fixed: u64) {
    let core = crate::reactor::try_current().map(|c| c.index()).filter(|&i| i < MAX_CORES).unwrap_or(0);
    let n = STATS[core].conns_refused.fetch_add(1, Ordering::Relaxed) + 1;
    let now = crate::reactor::monotonic_ns();
    let last = LAST_REFUSAL_LOG_NS.load(Ordering::Relaxed);
    if now.saturating_sub(last) > 1_000_000_000 && LAST_REFUSAL_LOG_NS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        log::warn!("{front}: refused a connection from {peer}: its {fixed} bytes of state do not fit the buffer budget ({n} refused on core {core} so far)");
    }
}

/// (bytes charged, peak bytes charged, refused charges, limit) summed over the cores.
pub fn budget_stats() -> (u64, u64, u64, u64) {
    STATS.iter().fold((0, 0, 0, 0), |a, s| {
        (
            a.0 + s.used.load(Ordering::Relaxed),
            a.1 + s.peak.load(Ordering::Relaxed),
            a.2 + s.deferrals.load(Ordering::Relaxed),
            a.3 + s.limit.load(Ordering::Relaxed),
        )
    })
}

/// Why a charge did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// The connection is at its limit: its own commands must finish first.
    Connection,
    /// The core's share of the total is spent: any connection of the core must give back.
    Core,
}

/// One core's share of the total budget, and the connections waiting for it.
pub struct CoreBudget {
    limit: u64,
    used: Cell<u64>,
    /// Index into STATS (None off the reactors: unit tests of the accounting).
    stats: Option<usize>,
    /// Tasks waiting for bytes to come back, in the order they started waiting: (id, bytes
    /// wanted, waker).
    waiters: RefCell<VecDeque<(u64, u64, Waker)>>,
    next_waiter: Cell<u64>,
}

impl Default for CoreBudget {
    /// The current core's share (a reactor core's per-core state).
    fn default() -> Self {
        let cores = crate::reactor::try_current().map_or(1, |c| c.core_count()).max(1) as u64;
        let index = crate::reactor::try_current().map(|c| c.index()).filter(|&i| i < MAX_CORES);
        let mut b = CoreBudget::with_limit((TOTAL_BYTES.load(Ordering::Relaxed) / cores).max(MAX_CHARGE));
        b.stats = index;
        if let Some(i) = index {
            STATS[i].limit.store(b.limit, Ordering::Relaxed);
        }
        b
    }
}

impl CoreBudget {
    /// A budget of `limit` bytes (tests; the reactors use the configured share).
    pub fn with_limit(limit: u64) -> CoreBudget {
        CoreBudget { limit, used: Cell::new(0), stats: None, waiters: RefCell::new(VecDeque::new()), next_waiter: Cell::new(0) }
    }

    /// The current core's budget.
    pub fn current() -> Rc<CoreBudget> {
        crate::reactor::with_core(|c| c.local::<CoreBudget>())
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn available(&self) -> u64 {
        self.limit - self.used.get()
    }

    fn publish(&self) {
        if let Some(i) = self.stats {
            let s = &STATS[i];
            s.used.store(self.used.get(), Ordering::Relaxed);
            if self.used.get() > s.peak.load(Ordering::Relaxed) {
                s.peak.store(self.used.get(), Ordering::Relaxed);
            }
        }
    }

    fn refused(&self) {
        if let Some(i) = self.stats {
            STATS[i].deferrals.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn give_back(&self, n: u64) {
        // Only leases and connections give back, what they were charged; more would wrap
        // `used` and lift the core's limit for good.
        assert!(n <= self.used.get(), "returning {n} bytes of {} charged", self.used.get());
        self.used.set(self.used.get() - n);
        self.publish();
        // Wake the waiters, in the order they waited, that the free bytes can serve (not
        // every waiter on every return: with hundreds of connections waiting, that would
        // spend the core on charges bound to fail). One whose charge still fails (it took
        // too long and another got there first, or its connection is at its limit) waits
        // again; bytes held elsewhere come back later and wake the next ones.
        let mut avail = self.available();
        let mut w = self.waiters.borrow_mut();
        while let Some(&(_, want, _)) = w.front() {
            if want > avail {
                break;
            }
            avail -= want;
            if let Some((_, _, waker)) = w.pop_front() {
                waker.wake();
            }
        }
    }

    /// Resolves when bytes come back to this core and `want` of them may fit. Call right
    /// after a charge of `want` failed: on one core nothing can return in between.
    pub fn freed(&self, want: u64) -> Freed<'_> {
        Freed { core: self, want, id: None }
    }
}

/// The future of [`CoreBudget::freed`]; dropped unresolved, it leaves the queue.
pub struct Freed<'a> {
    core: &'a CoreBudget,
    want: u64,
    id: Option<u64>,
}

impl Future for Freed<'_> {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let core = self.core;
        match self.id {
            Some(id) => {
                let mut w = core.waiters.borrow_mut();
                match w.iter_mut().find(|e| e.0 == id) {
                    // Polled before its turn: keep waiting with the newest waker.
                    Some(e) => {
                        e.2 = cx.waker().clone();
                        Poll::Pending
                    }
                    None => {
                        drop(w);
                        self.id = None;
                        Poll::Ready(())
                    }
                }
            }
            None => {
                let id = core.next_waiter.get();
                core.next_waiter.set(id + 1);
                core.waiters.borrow_mut().push_back((id, self.want, cx.waker().clone()));
                self.id = Some(id);
                Poll::Pending
            }
        }
    }
}

impl Drop for Freed<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.core.waiters.borrow_mut().retain(|e| e.0 != id);
        }
    }
}

/// One connection's account: its limit, what it holds, and the core budget behind it.
pub struct ConnBudget {
    core: Rc<CoreBudget>,
    limit: u64,
    used: Cell<u64>,
    /// The connection's own state, charged to the core (not to `used`: the connection's
    /// limit is for its commands' buffers) from open to drop.
    fixed: u64,
}

impl ConnBudget {
    /// Opens the account of a new connection on the current core with the configured
    /// per-connection limit, charging the core `fixed` bytes for the connection's own state;
    /// `Err` when they do not fit (the caller refuses the connection).
    pub fn open(fixed: u64) -> Result<Rc<ConnBudget>, Short> {
        ConnBudget::open_with(CoreBudget::current(), CONNECTION_BYTES.load(Ordering::Relaxed), fixed)
    }

    /// [`ConnBudget::open`] on a given core budget.
    pub fn open_with(core: Rc<CoreBudget>, limit: u64, fixed: u64) -> Result<Rc<ConnBudget>, Short> {
        if fixed > core.available() {
            core.refused();
            return Err(Short::Core);
        }
        core.used.set(core.used.get() + fixed);
        core.publish();
        Ok(Rc::new(ConnBudget { core, limit, used: Cell::new(0), fixed }))
    }

    /// An account with no fixed charge (tests of the accounting).
    pub fn with(core: Rc<CoreBudget>, limit: u64) -> Rc<ConnBudget> {
        Rc::new(ConnBudget { core, limit, used: Cell::new(0), fixed: 0 })
    }

    /// Bytes of the connection's own state charged to the core.
    pub fn fixed(&self) -> u64 {
        self.fixed
    }

    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn core(&self) -> &Rc<CoreBudget> {
        &self.core
    }

    /// Whether a charge of `n` bytes would fit now.
    pub fn fits(&self, n: u64) -> Result<(), Short> {
        let used = self.used.get();
        if used > 0 && used + n > self.limit {
            return Err(Short::Connection);
        }
        if n > self.core.available() {
            return Err(Short::Core);
        }
        Ok(())
    }

    /// Charges `n` bytes to the connection and its core, or says why they do not fit.
    pub fn try_charge(self: &Rc<Self>, n: u64) -> Result<Lease, Short> {
        debug_assert!(n <= MAX_CHARGE.max(self.core.limit), "a charge of {n} bytes can never fit");
        if let Err(s) = self.fits(n) {
            self.core.refused();
            return Err(s);
        }
        self.used.set(self.used.get() + n);
        self.core.used.set(self.core.used.get() + n);
        self.core.publish();
        // `fits` checked the core's room just above, on this core (no other charge between).
        assert!(self.core.used.get() <= self.core.limit, "core budget over its share");
        Ok(Lease { conn: self.clone(), n, on_connection: true })
    }

    /// Charges `n` bytes of state the connection keeps between its commands (kept workers,
    /// reused allocations) to its core only, as its fixed state: the connection's limit is for
    /// its commands' buffers, and state charged there would take their room (two writes that
    /// fill the limit would no longer both fit). None when the core has no room (the caller
    /// then does not keep it); not counted as a refusal: no host asked for it.
    pub fn try_charge_state(self: &Rc<Self>, n: u64) -> Option<Lease> {
        if n > self.core.available() {
            return None;
        }
        self.core.used.set(self.core.used.get() + n);
        self.core.publish();
        Some(Lease { conn: self.clone(), n, on_connection: false })
    }

    /// Whether the connection or its core is short of room for another `n` bytes: front ends
    /// that grant credits grant fewer.
    pub fn under_pressure(&self, n: u64) -> bool {
        self.fits(n).is_err()
    }
}

impl Drop for ConnBudget {
    fn drop(&mut self) {
        // Every lease holds the account: nothing of the connection's commands is left.
        debug_assert_eq!(self.used.get(), 0);
        if self.fixed > 0 {
            self.core.give_back(self.fixed);
        }
    }
}

/// Bytes charged to a connection and its core; they go back when the lease drops.
pub struct Lease {
    conn: Rc<ConnBudget>,
    n: u64,
    /// Counted in the connection's `used` too (a command's buffer), or in its core's only
    /// (`try_charge_state`).
    on_connection: bool,
}

impl Lease {
    pub fn bytes(&self) -> u64 {
        self.n
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let c = &self.conn;
        // The lease's bytes were added to `used` when it was made and leave once, here.
        if self.on_connection {
            assert!(self.n <= c.used.get(), "a lease of {} bytes on a connection holding {}", self.n, c.used.get());
            c.used.set(c.used.get() - self.n);
        }
        c.core.give_back(self.n);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({} bytes)", self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_connection_stops_at_its_limit_and_the_core_at_its_share() {
        let core = Rc::new(CoreBudget::with_limit(100));
        let a = ConnBudget::with(core.clone(), 60);
        let b = ConnBudget::with(core.clone(), 60);
        let a1 = a.try_charge(40).unwrap();
        assert_eq!(a.try_charge(30).unwrap_err(), Short::Connection);
        let b1 = b.try_charge(50).unwrap();
        assert_eq!(a.try_charge(20).unwrap_err(), Short::Core, "the core has 10 left");
        assert_eq!((core.used(), a.used(), b.used()), (90, 40, 50));
        drop(a1);
        assert_eq!((core.used(), a.used()), (50, 0));
        // Alone on its connection, a command larger than the connection's limit still runs.
        let big = a.try_charge(50).unwrap();
        drop((big, b1));
        assert_eq!(core.used(), 0);
    }

    #[test]
    fn a_connection_state_is_charged_while_it_is_open_and_refused_beyond_the_share() {
        let core = Rc::new(CoreBudget::with_limit(100));
        let a = ConnBudget::open_with(core.clone(), 60, 30).unwrap();
        let b = ConnBudget::open_with(core.clone(), 60, 30).unwrap();
        assert_eq!(core.used(), 60, "open connections count before any command");
        assert_eq!(a.used(), 0, "a connection's state is not part of its command limit");
        assert!(ConnBudget::open_with(core.clone(), 60, 50).is_err(), "a connection whose state does not fit is refused");
        // Commands get what the connections' state leaves.
        let l = a.try_charge(40).unwrap();
        assert_eq!(b.try_charge(1).unwrap_err(), Short::Core);
        drop(l);
        drop(a);
        assert_eq!(core.used(), 30, "a closed connection gives its state back");
        let c = ConnBudget::open_with(core.clone(), 60, 50).unwrap();
        drop((b, c));
        assert_eq!(core.used(), 0);
    }

    #[test]
    fn kept_state_is_charged_to_the_core_and_leaves_the_connection_its_limit() {
        let core = Rc::new(CoreBudget::with_limit(100));
        let a = ConnBudget::with(core.clone(), 60);
        let kept = a.try_charge_state(10).expect("the core has room");
        assert_eq!((core.used(), a.used()), (10, 0), "kept state counts in the core only");
        // The connection's commands still get its whole limit.
        let l = a.try_charge(60).unwrap();
        assert_eq!(core.used(), 70);
        assert!(a.try_charge_state(31).is_none(), "beyond the core's room nothing is kept");
        drop(l);
        drop(kept);
        assert_eq!((core.used(), a.used()), (0, 0), "both given back");
    }

    #[test]
    fn a_waiter_wakes_when_bytes_come_back() {
        let cores = crate::reactor::ManualCores::new(1);
        let core = Rc::new(CoreBudget::with_limit(10));
        let conn = ConnBudget::with(core.clone(), 10);
        let held = cores.enter(0, || conn.try_charge(10).unwrap());
        let got = Rc::new(Cell::new(false));
        let (c2, g2) = (conn.clone(), got.clone());
        cores.enter(0, || {
            crate::reactor::spawn_detached(async move {
                loop {
                    match c2.try_charge(5) {
                        Ok(_l) => break,
                        Err(_) => c2.core().freed(5).await,
                    }
                }
                g2.set(true);
            })
        });
        cores.run_until_idle();
        assert!(!got.get(), "nothing came back yet");
        cores.enter(0, || drop(held));
        cores.run_until_idle();
        assert!(got.get(), "the waiter must run once bytes come back");
        assert_eq!(core.used(), 0);
    }

    proptest! {
        /// Random charges and returns by several connections: the core never goes over its
        /// share, a connection never over its limit (save one oversized charge alone), every
        /// refusal is justified, and everything comes back.
        #[test]
        fn never_exceeds_and_always_releases(
            limit in 64u64..4096,
            conn_limit in 16u64..2048,
            ops in proptest::collection::vec((0usize..4, 1u64..512, any::<bool>()), 1..300),
        ) {
            let core = Rc::new(CoreBudget::with_limit(limit.max(512)));
            let conns: Vec<_> = (0..4).map(|_| ConnBudget::with(core.clone(), conn_limit)).collect();
            let mut held: Vec<Vec<Lease>> = (0..4).map(|_| Vec::new()).collect();
            for (c, n, release) in ops {
                if release && !held[c].is_empty() {
                    let k = n as usize % held[c].len();
                    let l = held[c].remove(k);
                    drop(l);
                } else {
                    let before = (conns[c].used(), core.used());
                    match conns[c].try_charge(n) {
                        Ok(l) => {
                            prop_assert_eq!(l.bytes(), n);
                            held[c].push(l);
                        }
                        Err(Short::Connection) => prop_assert!(before.0 > 0 && before.0 + n > conn_limit),
                        Err(Short::Core) => prop_assert!(before.1 + n > core.limit()),
                    }
                }
                prop_assert!(core.used() <= core.limit());
                let sum: u64 = conns.iter().map(|c| c.used()).sum();
                prop_assert_eq!(sum, core.used());
                for (i, c) in conns.iter().enumerate() {
                    prop_assert_eq!(c.used(), held[i].iter().map(|l| l.bytes()).sum::<u64>());
                    prop_assert!(c.used() <= c.limit() || held[i].len() == 1);
                }
            }
            drop(held);
            prop_assert_eq!(core.used(), 0);
            prop_assert!(conns.iter().all(|c| c.used() == 0));
        }
    }
}
