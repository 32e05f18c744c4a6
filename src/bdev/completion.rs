//! Per-core completion slots: the allocation-free way for a poller (io_uring, the simulated
//! device) to complete an I/O future.
//!
//! Buffers are sound by construction: memory a device reads or writes is an [`IoBuf`] *owned by
//! the slot* (moved in at submission) and released only when the device's completion arrives,
//! never by the future. Dropping an in-flight future (a `timeout` or `select` around an I/O)
//! therefore returns at once and frees nothing the kernel may still use: the slot is marked
//! orphaned, and the completion, whenever it comes, frees the slot and returns its buffer to
//! the pool. Callers' borrowed buffers never reach a device; a read's data is copied into them
//! when the completion is polled, by a future that is alive (see [`CopyOut`]).

use super::{IoBuf, IoResult};
use crate::reactor;
use slab::Slab;
use std::cell::RefCell;
use std::future::Future;
use std::io::IoSliceMut;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Slot {
    result: Option<IoResult>,
    waker: Option<Waker>,
    /// The future was dropped before completion; the completion frees the slot.
    orphaned: bool,
    /// The memory the device uses for this operation, held until its completion arrives.
    buf: Option<IoBuf>,
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

    /// Allocates a slot for an operation without data (flush, discard); returns its id and the
    /// future that waits on it.
    pub fn alloc(&self) -> (usize, CompletionFuture) {
        self.insert(None)
    }

    /// Allocates a slot that owns `buf` until the device answers: give the device `buf`'s
    /// memory (it does not move: an `IoBuf` is a pointer to pool or heap memory) and no other.
    pub fn alloc_owning(&self, buf: IoBuf) -> (usize, CompletionFuture) {
        self.insert(Some(buf))
    }

    fn insert(&self, buf: Option<IoBuf>) -> (usize, CompletionFuture) {
        let id = self.0 .0.borrow_mut().insert(Slot { buf, ..Slot::default() });
        (id, CompletionFuture { slots: self.0.clone(), id, done: false })
    }

    /// Completes slot `id`. Returns false if its future is gone (orphaned): the slot is freed
    /// and its buffer goes back to the pool now that the device is done with it.
    pub fn complete(&self, id: usize, result: IoResult) -> bool {
        let mut s = self.0 .0.borrow_mut();
        let Some(slot) = s.get_mut(id) else { return false };
        if slot.orphaned {
            let slot = s.remove(id);
            drop(s);
            drop(slot);
            return false;
        }
        slot.result = Some(result);
        let w = slot.waker.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        true
    }

    /// Slots in use (in flight, or completed and not yet polled): a test hook for leaks.
    #[doc(hidden)]
    pub fn outstanding(&self) -> usize {
        self.0 .0.borrow().len()
    }
}

/// Waits for one slot's completion.
pub struct CompletionFuture {
    slots: Rc<Slots>,
    id: usize,
    done: bool,
}

impl CompletionFuture {
    /// Polls for the result and takes back the slot's buffer with it.
    pub fn poll_owned(&mut self, cx: &mut Context<'_>) -> Poll<(IoResult, Option<IoBuf>)> {
        assert!(!self.done, "CompletionFuture polled after completion");
        let mut s = self.slots.0.borrow_mut();
        let slot = s.get_mut(self.id).expect("a live future's completion slot is never freed by others");
        if slot.result.is_none() {
            slot.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let slot = s.remove(self.id);
        self.done = true;
        let r = slot.result.unwrap_or(Ok(()));
        Poll::Ready((r, slot.buf))
    }

    /// The result together with the slot's buffer.
    pub fn owned(mut self) -> impl Future<Output = (IoResult, Option<IoBuf>)> {
        std::future::poll_fn(move |cx| self.poll_owned(cx))
    }
}

impl Future for CompletionFuture {
    type Output = IoResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult> {
        // The buffer (if any) goes back to its pool here: the device is done with it.
        self.poll_owned(cx).map(|(r, _)| r)
    }
}

impl Drop for CompletionFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Never waits: if the device has not answered, the slot (and the buffer it owns) stays
        // until it does, and the completion frees it.
        let mut s = self.slots.0.borrow_mut();
        let freed = match s.get_mut(self.id) {
            Some(slot) if slot.result.is_some() => Some(s.remove(self.id)),
            Some(slot) => {
                slot.orphaned = true;
                slot.waker = None;
                None
            }
            None => None,
        };
        drop(s);
        drop(freed);
    }
}

/// Where a read's data goes when its completion is polled: the caller's buffers, from byte
/// `skip` of their concatenation on. It borrows them for `'a`, as the I/O future does, so the
/// copy can only happen while the caller still holds them; the device never sees them.
pub struct CopyOut<'a> {
    // `[IoSliceMut<'b>]` is invariant in 'b behind `&mut`, and an I/O future has one lifetime:
    // the pointer erases 'b, `PhantomData` keeps the borrow of 'a (and 'b: 'a outlives it).
    bufs: NonNull<IoSliceMut<'static>>,
    count: usize,
    skip: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> CopyOut<'a> {
    pub fn new<'b: 'a>(bufs: &'a mut [IoSliceMut<'b>], skip: usize) -> CopyOut<'a> {
        let count = bufs.len();
        let bufs = NonNull::from(bufs).cast::<IoSliceMut<'static>>();
        CopyOut { bufs, count, skip, _borrow: PhantomData }
    }

    /// Copies `src` into the buffers from `skip` on (as much as fits).
    pub fn copy_from(&mut self, src: &[u8]) {
        // SAFETY: the pointer and count come from a `&'a mut [IoSliceMut<'b>]` with 'b: 'a,
        // borrowed exclusively by `self` for 'a; `&mut self` makes this the only access.
        let bufs = unsafe { std::slice::from_raw_parts_mut(self.bufs.as_ptr(), self.count) };
        scatter(bufs, self.skip, src);
    }
}

/// Copies `src` into `bufs` (their concatenation) from byte `skip` on, as much as fits.
pub fn scatter(bufs: &mut [IoSliceMut<'_>], mut skip: usize, mut src: &[u8]) {
    for b in bufs.iter_mut() {
        if src.is_empty() {
            return;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(src.len());
        b[skip..skip + n].copy_from_slice(&src[..n]);
        src = &src[n..];
        skip = 0;
    }
}

/// Copies from `bufs` (their concatenation), from byte `skip` on, into all of `dst`.
pub fn gather(bufs: &[std::io::IoSlice<'_>], mut skip: usize, mut dst: &mut [u8]) {
    for b in bufs {
        if dst.is_empty() {
            return;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(dst.len());
        dst[..n].copy_from_slice(&b[skip..skip + n]);
        dst = &mut dst[n..];
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BdevError;
    use crate::reactor::ManualCores;
    use std::task::Waker;

    #[test]
    fn a_dropped_future_leaves_its_buffer_to_the_completion() {
        let cores = ManualCores::new(1);
        cores.enter(0, || {
            let c = Completions::current();
            let buf = IoBuf::alloc(8192);
            let (id, fut) = c.alloc_owning(buf);
            drop(fut);
            // The device has not answered: the slot keeps the buffer, nothing is freed.
            assert_eq!(c.outstanding(), 1);
            assert!(!c.complete(id, Ok(())), "an orphaned slot reports its future gone");
            assert_eq!(c.outstanding(), 0);
            // A completed, unpolled future frees its slot when dropped.
            let (id, fut) = c.alloc();
            assert!(c.complete(id, Err(BdevError::Media)));
            drop(fut);
            assert_eq!(c.outstanding(), 0);
            // A polled one returns its buffer with the result.
            let (id, mut fut) = c.alloc_owning(IoBuf::alloc(4096));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(fut.poll_owned(&mut cx).is_pending());
            c.complete(id, Ok(()));
            match fut.poll_owned(&mut cx) {
                Poll::Ready((Ok(()), Some(b))) => assert_eq!(b.len(), 4096),
                _ => panic!("the completion must return the buffer"),
            }
            drop(fut);
            assert_eq!(c.outstanding(), 0);
        });
    }

    #[test]
    fn scatter_and_gather_follow_the_vector() {
        let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        scatter(&mut bufs, 2, &[1, 2, 3, 4]);
        assert_eq!((a, b), ([0, 0, 1], [2, 3, 4, 0, 0]));
        let (x, y) = ([1u8, 2], [3u8, 4, 5]);
        let mut out = [0u8; 3];
        gather(&[std::io::IoSlice::new(&x), std::io::IoSlice::new(&y)], 1, &mut out);
        assert_eq!(out, [2, 3, 4]);
    }
}
