//! One atomic word per region: how writes on any core enter a region without a lock and without
//! a message, as long as nothing about the region has to change.
//!
//! The word holds the count of writes inside the region and flags. `FAST` means "a write may
//! enter here without asking the mirror's control task": the region's write-intent bit is on
//! the legs, and every departed leg's stale map already lists the region. Only the control task
//! sets `FAST`, and it clears it whenever that stops being true (a write-intent bit about to be
//! cleared, a region locked for a rebuild window or a repair). A write that finds
//! `FAST` clear asks the control task, which admits it (incrementing the count itself) once the
//! region is ready.

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

const COUNT_MASK: u32 = (1 << 24) - 1;
/// Writes may enter without asking.
pub const FAST: u32 = 1 << 24;
/// A write entered since the cleaner last looked (the region is not quiet).
pub const TOUCHED: u32 = 1 << 25;
/// The control task waits for the count to reach zero; the last write out tells it.
pub const WAIT_DRAIN: u32 = 1 << 26;
/// The legs may differ here (writes were in flight at a crash): reads go to one source leg
/// until the region is resynchronised.
pub const UNSYNCED: u32 = 1 << 27;

pub fn count(word: u32) -> u32 {
    word & COUNT_MASK
}

pub struct RegionStates {
    words: Box<[AtomicU32]>,
}

impl RegionStates {
    pub fn new(n: u64) -> RegionStates {
        RegionStates { words: (0..n).map(|_| AtomicU32::new(0)).collect() }
    }

    fn word(&self, r: u64) -> &AtomicU32 {
        &self.words[r as usize]
    }

    pub fn load(&self, r: u64) -> u32 {
        self.word(r).load(SeqCst)
    }

    /// Enters region `r` if it is `FAST`; false means: ask the control task.
    pub fn try_enter(&self, r: u64) -> bool {
        let w = self.word(r);
        let mut cur = w.load(SeqCst);
        loop {
            if cur & FAST == 0 || count(cur) == COUNT_MASK {
                return false;
            }
            match w.compare_exchange_weak(cur, (cur + 1) | TOUCHED, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Admits a write on the control task's behalf (the region is ready) and lets the next ones
    /// in directly when `fast`.
    pub fn admit(&self, r: u64, fast: bool) {
        let w = self.word(r);
        let prev = w.fetch_add(1, SeqCst);
        assert!(count(prev) < COUNT_MASK, "region {r}: write count overflow");
        w.fetch_or(TOUCHED | if fast { FAST } else { 0 }, SeqCst);
    }

    /// Leaves region `r`. Returns true if the control task waits for the region to drain and
    /// this was the last write out: the caller must tell it.
    #[must_use]
    pub fn leave(&self, r: u64) -> bool {
        let prev = self.word(r).fetch_sub(1, SeqCst);
        // The count is the word's low bits: an underflow would borrow into the flags (FAST,
        // UNSYNCED, ...) and let writes skip the control task's ordering.
        assert!(count(prev) > 0, "region {r}: leave without enter");
        count(prev) == 1 && prev & WAIT_DRAIN != 0
    }

    pub fn set(&self, r: u64, flags: u32) -> u32 {
        self.word(r).fetch_or(flags, SeqCst)
    }

    pub fn clear(&self, r: u64, flags: u32) -> u32 {
        self.word(r).fetch_and(!flags, SeqCst)
    }

    /// Clears `FAST` if the region is quiet (no write inside, none since `TOUCHED` was last
    /// cleared); clears `TOUCHED` otherwise. True if the region was quiet and is now closed to
    /// fast entry: the cleaner may clear its write-intent bit.
    pub fn close_if_quiet(&self, r: u64) -> bool {
        let w = self.word(r);
        let mut cur = w.load(SeqCst);
        loop {
            if count(cur) != 0 {
                return false;
            }
            if cur & TOUCHED != 0 {
                w.fetch_and(!TOUCHED, SeqCst);
                return false;
            }
            match w.compare_exchange_weak(cur, cur & !FAST, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Starts waiting for region `r` to drain: true if it already is empty (no wait needed).
    /// The region must be closed to fast entry first.
    pub fn begin_drain(&self, r: u64) -> bool {
        let prev = self.word(r).fetch_or(WAIT_DRAIN, SeqCst);
        // With FAST set, writes keep entering and the drain this waits for may never come.
        assert!(prev & FAST == 0, "draining an open region");
        if count(prev) == 0 {
            self.word(r).fetch_and(!WAIT_DRAIN, SeqCst);
            return true;
        }
        false
    }

    /// Whether any region of [first, last] is unsynced.
    pub fn any_unsynced(&self, first: u64, last: u64) -> bool {
        (first..=last).any(|r| self.load(r) & UNSYNCED != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_entry_needs_the_flag_and_the_last_leaver_reports_a_drain() {
        let s = RegionStates::new(4);
        assert!(!s.try_enter(0), "regions start closed");
        s.admit(0, true);
        assert!(s.try_enter(0));
        assert_eq!(count(s.load(0)), 2);
        s.clear(0, FAST);
        assert!(!s.try_enter(0));
        assert!(!s.begin_drain(0));
        assert!(!s.leave(0));
        assert!(s.leave(0), "the last write out reports the drain");
        s.admit(1, false);
        assert!(!s.try_enter(1), "admitted without FAST: others still ask");
        assert!(!s.leave(1));
        assert!(s.begin_drain(1));
    }

    #[test]
    fn the_cleaner_closes_only_quiet_regions() {
        let s = RegionStates::new(1);
        s.admit(0, true);
        assert!(!s.close_if_quiet(0), "a write is inside");
        assert!(!s.leave(0));
        assert!(!s.close_if_quiet(0), "touched since the last look");
        assert!(s.try_enter(0), "still open after the first look");
        assert!(!s.leave(0));
        assert!(!s.close_if_quiet(0));
        assert!(s.close_if_quiet(0));
        assert!(!s.try_enter(0));
    }
}
