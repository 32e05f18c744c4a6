//! Why host writes waited for something other than their own leg writes: the accounting that
//! the mirror simulation asserts on (DESIGN §1: no host I/O waits for a preserve; a write may
//! wait only behind an overlapping write's extent lock, or for what the mirror needs for every
//! write, such as a region's write-intent bit).
//!
//! Recorded only on the slow path (a write that had to ask the control task), so the common
//! write pays nothing for it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Why a host write was delayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// Asked the control task to enter a region (write-intent bit, region lock, reopening).
    Enter,
    /// While it waited for the control task, the control task itself waited for I/O that a
    /// preserve (split) needed: a leg flush, a bitmap or a superblock write.
    PreserveIo,
}

impl WaitReason {
    /// Waits that break the promise that no host write waits for a preserve.
    pub fn is_preserve(self) -> bool {
        matches!(self, WaitReason::PreserveIo)
    }
}

const REASONS: usize = 2;

#[derive(Default)]
pub struct HostWaits {
    counts: [AtomicU64; REASONS],
    /// The first wait on a preserve, described (for the failure message).
    first_preserve: Mutex<Option<String>>,
}

impl HostWaits {
    pub fn record(&self, r: WaitReason, what: impl FnOnce() -> String) {
        self.counts[r as usize].fetch_add(1, Relaxed);
        if r.is_preserve() {
            let mut f = self.first_preserve.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                *f = Some(format!("{r:?}: {}", what()));
            }
        }
    }

    pub fn count(&self, r: WaitReason) -> u64 {
        self.counts[r as usize].load(Relaxed)
    }

    /// Host writes that waited on a preserve.
    pub fn preserve_waits(&self) -> u64 {
        self.count(WaitReason::PreserveIo)
    }

    /// The first of them, described.
    pub fn first_preserve_wait(&self) -> Option<String> {
        self.first_preserve.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
