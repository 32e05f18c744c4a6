//! Per-core completion slots: the allocation-free way for a poller (io_uring, the simulated
//! device) to complete an I/O future.

use super::IoResult;
use crate::reactor;
use slab::Slab;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Slot {
    result: Option<IoResult>,
    waker: Option<Waker>,
    /// The future was dropped before completion; the completer must not touch its buffers.
    orphaned: bool,
}

#[derive(Default)]
pub(crate) struct Slots(RefCell<Slab<Slot>>);

/// The current core's completion slots. A device channel keeps one (it is per core, as the
/// channel is) and passes a slot's id through the device (io_uring user_data), calling
/// [`Completions::complete`] when the device answers.
#[derive(Clone)]
pub struct Completions(Rc<Slots>);

impl Completions {
    /// The slots of the current core.
    pub fn current() -> Completions {
        Completions(reactor::with_core(|c| c.local::<Slots>()))
    }

    /// Allocates a slot; returns its id and the future that waits on it.
    pub fn alloc(&self) -> (usize, CompletionFuture) {
        let id = self.0 .0.borrow_mut().insert(Slot::default());
        (id, CompletionFuture { slots: self.0.clone(), id, done: false })
    }

    /// Completes slot `id`. Returns false if its future is gone (orphaned), in which case the
    /// caller must not write into the I/O's buffers.
    pub fn complete(&self, id: usize, result: IoResult) -> bool {
        let mut s = self.0 .0.borrow_mut();
        let Some(slot) = s.get_mut(id) else { return false };
        if slot.orphaned {
            s.remove(id);
            return false;
        }
        slot.result = Some(result);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
        true
    }
}

pub struct CompletionFuture {
    slots: Rc<Slots>,
    id: usize,
    done: bool,
}

impl Future for CompletionFuture {
    type Output = IoResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult> {
        let id = self.id;
        let mut s = self.slots.0.borrow_mut();
        let slot = s.get_mut(id).expect("completion slot vanished");
        if let Some(r) = slot.result.take() {
            s.remove(id);
            drop(s);
            self.done = true;
            return Poll::Ready(r);
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// How long a dropped in-flight I/O is waited for before its slot is abandoned.
const ORPHAN_WAIT: Duration = Duration::from_secs(10);

impl Drop for CompletionFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // An in-flight I/O owns the caller's buffers until the device answers: poll the core's
        // devices until it does. This is a safety net, not a path the target takes.
        let start = Instant::now();
        loop {
            if self.slots.0.borrow().get(self.id).is_none_or(|s| s.result.is_some()) {
                break;
            }
            if start.elapsed() > ORPHAN_WAIT || reactor::try_current().is_none() {
                break;
            }
            reactor::with_core(|c| c.run_pollers());
        }
        let mut s = self.slots.0.borrow_mut();
        match s.get_mut(self.id) {
            Some(slot) if slot.result.is_some() => {
                s.remove(self.id);
            }
            Some(slot) => {
                log::error!("an in-flight I/O was abandoned; its device may still write into freed memory");
                slot.orphaned = true;
            }
            None => {}
        }
    }
}
