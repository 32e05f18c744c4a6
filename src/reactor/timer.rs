//! Timers of one core: a min-heap of deadlines on the core's clock.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

struct Entry {
    deadline: u64,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.seq) == (o.deadline, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(o.deadline, o.seq))
    }
}

#[derive(Default)]
pub struct Timers {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    seq: Cell<u64>,
}

impl Timers {
    pub fn add(&self, deadline: u64, waker: Waker) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        self.heap.borrow_mut().push(Reverse(Entry { deadline, seq, waker }));
    }

    /// Wakes every timer whose deadline has passed; returns how many.
    pub fn fire(&self, now: u64) -> usize {
        let mut n = 0;
        loop {
            let entry = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(Reverse(e)) if e.deadline <= now => heap.pop().map(|Reverse(e)| e),
                    _ => None,
                }
            };
            match entry {
                Some(e) => {
                    e.waker.wake();
                    n += 1;
                }
                None => return n,
            }
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.borrow().peek().map(|Reverse(e)| e.deadline)
    }
}

/// Completes when the current core's clock passes a deadline.
pub struct Sleep {
    deadline: u64,
    registered: bool,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        super::with_core(|core| {
            if core.now_ns() >= self.deadline {
                return Poll::Ready(());
            }
            if !self.registered {
                core.timers.add(self.deadline, cx.waker().clone());
                self.registered = true;
            }
            Poll::Pending
        })
    }
}

/// Sleeps for `d` on the current core's clock.
pub fn sleep(d: Duration) -> Sleep {
    let deadline = super::now_ns().saturating_add(d.as_nanos() as u64);
    Sleep { deadline, registered: false }
}

/// Sleeps until the core's clock reads `deadline_ns`.
pub fn sleep_until(deadline_ns: u64) -> Sleep {
    Sleep { deadline: deadline_ns, registered: false }
}

/// The error of [`timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` for at most `d`. Never use this around a bdev I/O: submitted I/O cannot be
/// cancelled, only waited for.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let fut = std::pin::pin!(fut);
    let sleeper = std::pin::pin!(sleep(d));
    match futures::future::select(fut, sleeper).await {
        futures::future::Either::Left((v, _)) => Ok(v),
        futures::future::Either::Right(_) => Err(Elapsed),
    }
}
