//! The classic way to preserve, kept only as the comparison for the benchmark (`freeze: true`):
//! a gate that stops new I/O of a volume while it is closed.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Default)]
pub struct FreezeGate {
    frozen: AtomicBool,
    /// Submissions held while frozen (control path: only used while a freeze is on).
    waiters: Mutex<Vec<Waker>>,
}

impl FreezeGate {
    /// Whether submissions may go ahead (one atomic load on the data path).
    pub fn is_open(&self) -> bool {
        !self.frozen.load(SeqCst)
    }

    /// Waits while the gate is closed.
    pub async fn pass(&self) {
        poll_fn(|cx| {
            if self.is_open() {
                return Poll::Ready(());
            }
            self.waiters.lock().unwrap_or_else(|e| e.into_inner()).push(cx.waker().clone());
            // Re-check after registering: a thaw in between has already taken the list.
            if self.is_open() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    pub fn freeze(&self) {
        self.frozen.store(true, SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, SeqCst);
        let w = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for w in w {
            w.wake();
        }
    }
}
