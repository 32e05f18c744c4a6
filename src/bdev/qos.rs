//! Quality of service: rate limits on one bdev (`bdev_set_qos_limit`), held across every core.
//!
//! Design (why it looks like this):
//! - Limits live in the [`BdevEntry`](super::BdevEntry) as atomics, so every core's channel
//!   sees a change at its next I/O; a bdev with no limit pays one relaxed load and a branch.
//! - Time is cut into 1 ms timeslices (SPDK's `SPDK_BDEV_QOS_TIMESLICE_IN_USEC`). Each limit
//!   has one shared bucket that gets `limit / 1000` tokens per timeslice. Cores do not take
//!   tokens from it per I/O: each core keeps a local stock and takes a *chunk* (a fraction of
//!   a timeslice's allotment) when the stock runs out, so the shared atomic is touched once per
//!   chunk and no lock or cross-core message is on the I/O path.
//! - A bucket may go into debt by less than one chunk or one I/O (an I/O larger than a
//!   timeslice's bytes must pass some day); the debt is paid from the next timeslices, so the
//!   long-run rate is the limit. Unused allotment is not carried over (no bursts after idling).
//! - An I/O that finds no tokens waits on its core in FIFO order (a ticket queue): the head
//!   sleeps until the next timeslice, the others are parked. Nothing fails for being over the
//!   limit, and the queue is bounded by the I/O the front ends admit (their queue depths).
//! - A limit change bumps a generation: cores drop their stocks, waiting I/O re-checks at the
//!   next timeslice at the latest (clearing every limit releases the whole queue in order).

use crossbeam_utils::CachePadded;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Length of one timeslice.
pub const TIMESLICE_NS: u64 = 1_000_000;
/// SPDK's `SPDK_BDEV_QOS_MIN_IOS_PER_SEC`: an I/O limit is a multiple of this.
pub const MIN_IOS_PER_SEC: u64 = 1000;
/// SPDK's MB in `*_mbytes_per_sec`.
pub const MIB: u64 = 1024 * 1024;
/// Most timeslices' allotment a bucket holds (the largest burst after an idle time: 4 ms).
const CARRY_SLICES: i64 = 4;
/// A core takes `allotment / CHUNK_DIVISOR` tokens at a time (at least one).
const CHUNK_DIVISOR: u64 = 8;

/// The four limits of SPDK's `assigned_rate_limits`; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == QosLimits::default()
    }

    /// Per-second rate of each bucket in its unit (I/Os or bytes), in [`Kind`] order.
    fn rates(&self) -> [u64; 4] {
        [self.rw_ios_per_sec, self.rw_mbytes_per_sec.saturating_mul(MIB), self.r_mbytes_per_sec.saturating_mul(MIB), self.w_mbytes_per_sec.saturating_mul(MIB)]
    }
}

/// Why a limit is refused (SPDK refuses the same values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    #[error("rw_ios_per_sec {0} is not a multiple of {MIN_IOS_PER_SEC}")]
    NotMultiple(u64),
    #[error("{0} {1} is too large")]
    TooLarge(&'static str, u64),
}

/// Checks limits as SPDK's `spdk_bdev_set_qos_rate_limits` does.
pub fn validate(l: &QosLimits) -> Result<(), QosError> {
    if l.rw_ios_per_sec % MIN_IOS_PER_SEC != 0 {
        return Err(QosError::NotMultiple(l.rw_ios_per_sec));
    }
    // Byte rates become bytes per second; keep them in i64 range for the buckets.
    for (name, v) in [("rw_mbytes_per_sec", l.rw_mbytes_per_sec), ("r_mbytes_per_sec", l.r_mbytes_per_sec), ("w_mbytes_per_sec", l.w_mbytes_per_sec)] {
        if v > (i64::MAX as u64) / MIB / 2 {
            return Err(QosError::TooLarge(name, v));
        }
    }
    if l.rw_ios_per_sec > i64::MAX as u64 / 2 {
        return Err(QosError::TooLarge("rw_ios_per_sec", l.rw_ios_per_sec));
    }
    Ok(())
}

/// Index of a bucket.
#[derive(Debug, Clone, Copy)]
enum Kind {
    RwIos = 0,
    RwBytes = 1,
    RBytes = 2,
    WBytes = 3,
}

/// The shared bucket of one limit.
#[derive(Default)]
struct Bucket {
    /// Timeslice whose allotment was last added.
    slice: AtomicU64,
    /// Tokens left in the current timeslice; negative = debt.
    avail: AtomicI64,
}

impl Bucket {
    /// Starts timeslice `slice` if no core did yet. Refills are lazy (made by the next
    /// admission), so every timeslice elapsed since the last refill is credited: a waiter
    /// woken late on a loaded core must not lose the allotments it slept through, and debt is
    /// paid by time, not by refills. The balance is capped at [`CARRY_SLICES`] timeslices'
    /// allotment: unused tokens do not pile up into a burst after an idle time, yet a waiter
    /// that wakes a few ms late (timers on a busy core) still gets what it slept through.
    fn refill(&self, slice: u64, per_slice: i64) {
        let seen = self.slice.load(Relaxed);
        if seen < slice && self.slice.compare_exchange(seen, slice, Relaxed, Relaxed).is_ok() {
            // `seen` 0: never refilled (or reset by a limit change): one timeslice's worth.
            let elapsed = if seen == 0 { 1 } else { (slice - seen).min(1 << 20) as i64 };
            let credit = per_slice.saturating_mul(elapsed);
            let _ = self.avail.fetch_update(Relaxed, Relaxed, |a| Some(a.saturating_add(credit).min(per_slice.saturating_mul(CARRY_SLICES))));
        }
    }

    /// Takes `want` tokens if the bucket is not empty (it may go into debt by less than `want`).
    fn take(&self, want: i64) -> bool {
        let prev = self.avail.fetch_sub(want, Relaxed);
        if prev > 0 {
            true
        } else {
            self.avail.fetch_add(want, Relaxed);
            false
        }
    }
}

/// What every core writes while a limit is set: the buckets and the throttling totals.
#[derive(Default)]
struct Written {
    buckets: [Bucket; 4],
    /// Total time I/Os spent waiting for tokens.
    throttled_ns: AtomicU64,
    /// I/O that had to wait at least once.
    throttled_ios: AtomicU64,
}

/// The QoS state of one bdev, shared by all cores.
///
/// The written part is `CachePadded` (which also aligns `Qos` to 128 bytes) so that `rates`,
/// `enabled` and `generation`, loaded by every I/O and changed only by the control plane,
/// sit on lines no core writes per I/O: a core's bucket take would otherwise invalidate the
/// line holding `enabled` in every other core's cache (audit item G, docs/scaling.md).
#[derive(Default)]
pub struct Qos {
    /// Limits per second in their unit (I/Os, bytes), [`Kind`] order.
    rates: [AtomicU64; 4],
    /// Any rate non-zero: the one load on the path of an unlimited bdev.
    enabled: std::sync::atomic::AtomicBool,
    /// Bumped on every change; cores drop their stock when it moves.
    generation: AtomicU64,
    written: CachePadded<Written>,
}

impl Qos {
    pub fn limits(&self) -> QosLimits {
        let r = |k: Kind| self.rates[k as usize].load(Relaxed);
        QosLimits {
            rw_ios_per_sec: r(Kind::RwIos),
            rw_mbytes_per_sec: r(Kind::RwBytes) / MIB,
            r_mbytes_per_sec: r(Kind::RBytes) / MIB,
            w_mbytes_per_sec: r(Kind::WBytes) / MIB,
        }
    }

    /// Sets every limit (0 = unlimited). Control plane only.
    pub fn set(&self, l: &QosLimits) -> Result<(), QosError> {
        validate(l)?;
        for (a, r) in self.rates.iter().zip(l.rates()) {
            a.store(r, Relaxed);
        }
        for b in &self.written.buckets {
            // A fresh start: debt under the old limit is forgiven, the next slice refills.
            b.avail.store(0, Relaxed);
            b.slice.store(0, Relaxed);
        }
        self.generation.fetch_add(1, Relaxed);
        self.enabled.store(!l.is_unlimited(), Relaxed);
        Ok(())
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    pub fn throttled_ns(&self) -> u64 {
        self.written.throttled_ns.load(Relaxed)
    }

    pub fn throttled_ios(&self) -> u64 {
        self.written.throttled_ios.load(Relaxed)
    }

    pub(crate) fn add_throttled(&self, ns: u64) {
        self.written.throttled_ns.fetch_add(ns, Relaxed);
        self.written.throttled_ios.fetch_add(1, Relaxed);
    }
}

/// Direction of an I/O for the byte limits; I/O other than reads counts as writes when it
/// carries bytes (unmap, write zeroes), as in SPDK; flush counts one I/O and no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

/// One core's stock of tokens for one bdev. Never shared between cores.
#[derive(Default)]
pub struct LocalQos {
    generation: Cell<u64>,
    stock: [Cell<i64>; 4],
    /// FIFO of waiting I/O: the ticket served next, the next ticket to give out, tickets
    /// given up (their future dropped) and wakers of parked tickets.
    serving: Cell<u64>,
    next_ticket: Cell<u64>,
    abandoned: RefCell<BTreeSet<u64>>,
    parked: RefCell<HashMap<u64, std::task::Waker>>,
}

impl LocalQos {
    /// Tries to admit an I/O of `bytes` in direction `dir` at time `now_ns`: takes its tokens
    /// from every limit that applies, or none at all.
    pub fn try_admit(&self, q: &Qos, dir: Dir, bytes: u64, now_ns: u64) -> bool {
        let generation = q.generation.load(Relaxed);
        if self.generation.get() != generation {
            // Tokens taken under the old limits are not spent under the new ones.
            self.generation.set(generation);
            for s in &self.stock {
                s.set(0);
            }
        }
        let slice = now_ns / TIMESLICE_NS + 1; // +1: slice 0 means "never refilled"
        let bytes = bytes.min(i64::MAX as u64 / 4) as i64;
        let dir_kind = match dir {
            Dir::Read => Kind::RBytes,
            Dir::Write => Kind::WBytes,
        };
        let need = [(Kind::RwIos, 1i64), (Kind::RwBytes, bytes), (dir_kind, bytes)];
        // First make sure every stock holds enough, then spend: a refusal by one limit must
        // not spend another's tokens.
        for (k, n) in need {
            let rate = q.rates[k as usize].load(Relaxed);
            if rate == 0 || n == 0 {
                continue;
            }
            let stock = &self.stock[k as usize];
            if stock.get() >= n {
                continue;
            }
            let per_slice = (rate / (1_000_000_000 / TIMESLICE_NS)).max(1) as i64;
            let bucket = &q.written.buckets[k as usize];
            bucket.refill(slice, per_slice);
            let chunk = (per_slice / CHUNK_DIVISOR as i64).max(1);
            let want = (n - stock.get()).max(chunk);
            if !bucket.take(want) {
                return false;
            }
            stock.set(stock.get() + want);
        }
        for (k, n) in need {
            if q.rates[k as usize].load(Relaxed) != 0 && n != 0 {
                let s = &self.stock[k as usize];
                // A limit set between the two loops may find a stock short: it goes negative
                // and is refilled at the next admission, never below one I/O's worth.
                s.set(s.get() - n);
            }
        }
        true
    }

    /// Number of I/O waiting on this core (bounded by the front ends' queue depths).
    pub fn queued(&self) -> u64 {
        self.next_ticket.get() - self.serving.get()
    }

    pub(crate) fn take_ticket(&self) -> u64 {
        let t = self.next_ticket.get();
        self.next_ticket.set(t + 1);
        t
    }

    pub(crate) fn is_head(&self, ticket: u64) -> bool {
        self.serving.get() == ticket
    }

    pub(crate) fn park(&self, ticket: u64, w: &std::task::Waker) {
        self.parked.borrow_mut().insert(ticket, w.clone());
    }

    /// The head is admitted or gave up: the next live ticket becomes head and is woken.
    pub(crate) fn release(&self, ticket: u64) {
        if self.serving.get() != ticket {
            // Not the head: skipped when its turn comes.
            self.abandoned.borrow_mut().insert(ticket);
            self.parked.borrow_mut().remove(&ticket);
            return;
        }
        let mut s = ticket + 1;
        {
            let mut ab = self.abandoned.borrow_mut();
            while ab.remove(&s) {
                s += 1;
            }
        }
        self.serving.set(s);
        debug_assert!(s <= self.next_ticket.get(), "QoS queue served past its tail");
        let w = self.parked.borrow_mut().remove(&s);
        if let Some(w) = w {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `cores` cores that each try to admit one I/O of `bytes` every `step_ns` of fake
    /// time for `secs` seconds; returns admitted (I/Os, bytes).
    fn run(q: &Qos, locals: &[LocalQos], dir: Dir, bytes: u64, step_ns: u64, start_ns: u64, secs: u64) -> (u64, u64) {
        let (mut ios, mut b) = (0, 0);
        let mut now = start_ns;
        while now < start_ns + secs * 1_000_000_000 {
            for l in locals {
                if l.try_admit(q, dir, bytes, now) {
                    ios += 1;
                    b += bytes;
                }
            }
            now += step_ns;
        }
        (ios, b)
    }

    fn within(got: u64, want: u64, pct: f64) -> bool {
        (got as f64 - want as f64).abs() <= want as f64 * pct / 100.0
    }

    /// The fields every I/O loads share no 128-byte block (a line and the one the adjacent-line
    /// prefetcher pairs it with) with the buckets the cores write, nor with whatever follows
    /// `Qos` in its owner.
    #[test]
    fn read_mostly_fields_are_off_the_written_lines() {
        use std::mem::{align_of, offset_of, size_of};
        let block = |off: usize| off / 128;
        let w = offset_of!(Qos, written);
        let written = block(w)..=block(w + size_of::<CachePadded<Written>>() - 1);
        for (name, off, len) in [
            ("rates", offset_of!(Qos, rates), size_of::<[AtomicU64; 4]>()),
            ("enabled", offset_of!(Qos, enabled), 1),
            ("generation", offset_of!(Qos, generation), 8),
        ] {
            assert!(!written.contains(&block(off)) && !written.contains(&block(off + len - 1)), "{name} shares a line with the buckets");
        }
        assert_eq!(align_of::<Qos>(), 128, "Qos must start a line so its read fields do not share one with its owner's");
        assert_eq!(size_of::<Qos>() % 128, 0);
    }

    #[test]
    fn unlimited_admits_everything() {
        let q = Qos::default();
        let l = [LocalQos::default()];
        assert!(!q.enabled());
        let (ios, _) = run(&q, &l, Dir::Read, 4096, 10_000, 0, 1);
        assert_eq!(ios, 100_000);
    }

    #[test]
    fn iops_held_within_5_percent() {
        let q = Qos::default();
        q.set(&QosLimits { rw_ios_per_sec: 10_000, ..Default::default() }).unwrap();
        let l = [LocalQos::default()];
        // Offered: 1 per µs = 1M IOPS.
        let (ios, _) = run(&q, &l, Dir::Write, 4096, 1_000, 5_000_000_000, 3);
        assert!(within(ios, 30_000, 5.0), "{ios}");
    }

    #[test]
    fn bytes_held_within_5_percent_with_large_io() {
        let q = Qos::default();
        q.set(&QosLimits { rw_mbytes_per_sec: 100, ..Default::default() }).unwrap();
        let l = [LocalQos::default(), LocalQos::default()];
        // 128 KiB I/Os: larger than one timeslice's 104857 bytes.
        let (_, b) = run(&q, &l, Dir::Read, 128 * 1024, 20_000, 0, 4);
        assert!(within(b, 400 * MIB, 5.0), "{b}");
    }

    #[test]
    fn direction_limits_apply_to_their_direction() {
        let q = Qos::default();
        q.set(&QosLimits { r_mbytes_per_sec: 10, ..Default::default() }).unwrap();
        let l = [LocalQos::default()];
        let (_, wb) = run(&q, &l, Dir::Write, 4096, 10_000, 0, 1);
        assert_eq!(wb, 100_000 * 4096, "writes are not limited by a read limit");
        let (_, rb) = run(&q, &l, Dir::Read, 4096, 10_000, 1_000_000_000, 2);
        assert!(within(rb, 20 * MIB, 5.0), "{rb}");
    }

    #[test]
    fn cores_share_one_limit() {
        let q = Qos::default();
        q.set(&QosLimits { rw_ios_per_sec: 8_000, ..Default::default() }).unwrap();
        let l: Vec<LocalQos> = (0..4).map(|_| LocalQos::default()).collect();
        let (ios, _) = run(&q, &l, Dir::Read, 512, 2_000, 0, 5);
        assert!(within(ios, 40_000, 5.0), "{ios}");
    }

    #[test]
    fn change_mid_run_takes_effect() {
        let q = Qos::default();
        let l = [LocalQos::default(), LocalQos::default()];
        q.set(&QosLimits { rw_ios_per_sec: 2_000, ..Default::default() }).unwrap();
        let (a, _) = run(&q, &l, Dir::Read, 512, 5_000, 0, 2);
        assert!(within(a, 4_000, 5.0), "{a}");
        q.set(&QosLimits { rw_ios_per_sec: 20_000, ..Default::default() }).unwrap();
        let (b, _) = run(&q, &l, Dir::Read, 512, 5_000, 2_000_000_000, 2);
        assert!(within(b, 40_000, 5.0), "{b}");
        q.set(&QosLimits::default()).unwrap();
        assert!(!q.enabled());
        let (c, _) = run(&q, &l, Dir::Read, 512, 5_000, 4_000_000_000, 1);
        assert_eq!(c, 400_000);
    }

    #[test]
    fn late_wakes_do_not_lose_allotments() {
        // One waiter that only retries every 2.5 ms (a loaded core's late timer), 64 KiB I/Os
        // against 10 MiB/s: each I/O is several timeslices' bytes.
        let q = Qos::default();
        q.set(&QosLimits { rw_mbytes_per_sec: 10, ..Default::default() }).unwrap();
        let l = [LocalQos::default()];
        let (_, b) = run(&q, &l, Dir::Read, 65536, 2_500_000, 0, 10);
        assert!(within(b, 100 * MIB, 5.0), "{b}");
    }

    #[test]
    fn validation_matches_spdk() {
        assert_eq!(validate(&QosLimits { rw_ios_per_sec: 1500, ..Default::default() }), Err(QosError::NotMultiple(1500)));
        assert!(validate(&QosLimits { rw_ios_per_sec: 3000, rw_mbytes_per_sec: 7, ..Default::default() }).is_ok());
        assert!(validate(&QosLimits { w_mbytes_per_sec: u64::MAX, ..Default::default() }).is_err());
        let q = Qos::default();
        assert!(q.set(&QosLimits { rw_ios_per_sec: 1, ..Default::default() }).is_err());
        assert!(q.limits().is_unlimited(), "a refused limit changes nothing");
    }

    #[test]
    fn ticket_queue_is_fifo_and_skips_abandoned() {
        let l = LocalQos::default();
        let t: Vec<u64> = (0..4).map(|_| l.take_ticket()).collect();
        assert_eq!(l.queued(), 4);
        assert!(l.is_head(t[0]));
        l.release(t[2]); // dropped while waiting
        l.release(t[0]);
        assert!(l.is_head(t[1]));
        l.release(t[1]);
        assert!(l.is_head(t[3]), "abandoned ticket skipped");
        l.release(t[3]);
        assert_eq!(l.queued(), 0);
    }

    proptest::proptest! {
        #[test]
        fn any_iops_limit_is_held(k in 1u64..=20, cores in 1usize..=3, step_us in 1u64..=50) {
            let q = Qos::default();
            q.set(&QosLimits { rw_ios_per_sec: k * 1000, ..Default::default() }).unwrap();
            let l: Vec<LocalQos> = (0..cores).map(|_| LocalQos::default()).collect();
            let offered = cores as u64 * 1_000_000 / step_us;
            let (ios, _) = run(&q, &l, Dir::Read, 4096, step_us * 1000, 0, 2);
            let want = (k * 1000).min(offered) * 2;
            proptest::prop_assert!(ios as f64 <= want as f64 * 1.05 + 1.0, "ios {} want {}", ios, want);
            if offered > k * 2000 {
                proptest::prop_assert!(ios as f64 >= want as f64 * 0.95, "ios {} want {}", ios, want);
            }
        }
    }
}
