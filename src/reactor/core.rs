//! A core: the executor, timers, I/O readiness and per-core state of one reactor thread (or of
//! one simulated core). Everything on a core is single-threaded; other threads reach it only
//! through its [`Mailbox`].

use super::clock::Clock;
use super::io::IoDriver;
use super::mailbox::{Mailbox, Message};
use super::timer::Timers;
use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

/// Something a reactor polls on every loop iteration (an io_uring completion queue, say).
pub trait Poller {
    /// Does what is ready; returns how many units of work it did (0 = idle).
    fn poll(&self) -> usize;
    /// Whether the poller has work in flight (the reactor drains it before it stops).
    fn busy(&self) -> bool {
        false
    }
    /// Whether in-flight work completes only when polled (io_uring IOPOLL): then nothing
    /// would wake a sleeping reactor, so it keeps polling.
    fn needs_polling(&self) -> bool {
        false
    }
}

pub struct Core {
    pub(crate) index: usize,
    pub(crate) mailboxes: Arc<[Arc<Mailbox>]>,
    pub(crate) clock: Clock,
    pub(crate) timers: Timers,
    pub(crate) io: Option<IoDriver>,
    pollers: RefCell<Vec<(u64, Rc<dyn Poller>)>>,
    /// The pollers of the running iteration, kept (empty) between iterations so that a loop
    /// iteration allocates nothing.
    polling: RefCell<Vec<Rc<dyn Poller>>>,
    next_poller_id: std::cell::Cell<u64>,
    /// Per-core state by type; a handful of entries, so a vector beats hashing.
    locals: RefCell<Vec<(TypeId, Rc<dyn Any>)>>,
    /// Messages that found their target ring full, retried every loop iteration.
    overflow: RefCell<Vec<(usize, Message)>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
}

impl Core {
    pub(crate) fn new(index: usize, mailboxes: Arc<[Arc<Mailbox>]>, clock: Clock, io: Option<IoDriver>) -> Rc<Core> {
        assert!(index < mailboxes.len(), "core index out of range");
        Rc::new(Core {
            index,
            mailboxes,
            clock,
            timers: Timers::default(),
            io,
            pollers: RefCell::new(Vec::new()),
            polling: RefCell::new(Vec::new()),
            next_poller_id: std::cell::Cell::new(0),
            locals: RefCell::new(Vec::new()),
            overflow: RefCell::new(Vec::new()),
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn core_count(&self) -> usize {
        self.mailboxes.len()
    }

    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailboxes[self.index]
    }

    pub fn io(&self) -> Option<&IoDriver> {
        self.io.as_ref()
    }

    pub(crate) fn spawn<F>(&self, fut: F) -> async_task::Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let mb = self.mailboxes[self.index].clone();
        let (runnable, task) = async_task::spawn_local(fut, move |r| mb.schedule(r));
        runnable.schedule();
        task
    }

    /// Registers a poller; it is polled on every loop iteration until removed.
    pub fn add_poller(&self, p: Rc<dyn Poller>) -> u64 {
        let id = self.next_poller_id.get();
        self.next_poller_id.set(id + 1);
        self.pollers.borrow_mut().push((id, p));
        id
    }

    pub fn remove_poller(&self, id: u64) {
        self.pollers.borrow_mut().retain(|(i, _)| *i != id);
    }

    /// Polls every registered poller once; returns the work done.
    pub fn run_pollers(&self) -> usize {
        // Clone the list so a poller may add or remove pollers while it runs. Into a vector
        // taken out of `polling` (a poller that runs the loop again finds it empty).
        let mut pollers = std::mem::take(&mut *self.polling.borrow_mut());
        pollers.extend(self.pollers.borrow().iter().map(|(_, p)| p.clone()));
        let work = pollers.iter().map(|p| p.poll()).sum();
        pollers.clear();
        *self.polling.borrow_mut() = pollers;
        work
    }

    pub(crate) fn pollers_busy(&self) -> bool {
        self.pollers.borrow().iter().any(|(_, p)| p.busy())
    }

    pub(crate) fn pollers_need_polling(&self) -> bool {
        self.pollers.borrow().iter().any(|(_, p)| p.needs_polling())
    }

    /// Per-core state of type `T`, created on first use. This is how modules keep per-core
    /// structures (channel caches, lock shards, buffer pools) without globals.
    pub fn local<T: Any + Default>(&self) -> Rc<T> {
        let id = TypeId::of::<T>();
        if let Some((_, v)) = self.locals.borrow().iter().find(|(t, _)| *t == id) {
            return v.clone().downcast::<T>().unwrap_or_else(|_| unreachable!("TypeId maps to its own type"));
        }
        let v: Rc<T> = Rc::new(T::default());
        self.locals.borrow_mut().push((id, v.clone()));
        v
    }

    /// Drops all per-core state (at shutdown, before the core's thread ends).
    pub(crate) fn clear_locals(&self) {
        // Newest first: state created later may use state created earlier (a channel holds
        // buffers of the pool, say).
        let mut locals = std::mem::take(&mut *self.locals.borrow_mut());
        while let Some(l) = locals.pop() {
            drop(l);
        }
        self.pollers.borrow_mut().clear();
        self.polling.borrow_mut().clear();
    }

    /// Runs `f` with this core installed as the current one.
    pub fn enter<R>(self: &Rc<Self>, f: impl FnOnce() -> R) -> R {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        struct Restore(Option<Rc<Core>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = prev);
            }
        }
        let _restore = Restore(prev);
        f()
    }

    /// Runs one queued message or task; returns false if there was none.
    pub(crate) fn run_one(&self) -> bool {
        let mb = &self.mailboxes[self.index];
        if let Some(m) = mb.messages.pop() {
            m();
            mb.counters.messages_run.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return true;
        }
        if let Some(r) = mb.tasks.pop() {
            BUDGET.with(|b| b.set(TASK_BUDGET));
            r.run();
            mb.counters.tasks_run.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Runs `f` with the current core. Panics when called off a core: that is a programming error
/// (data-path code runs only on cores).
pub fn with_core<R>(f: impl FnOnce(&Rc<Core>) -> R) -> R {
    CURRENT.with(|c| {
        let c = c.borrow();
        let core = c.as_ref().expect("not on a reactor core");
        f(core)
    })
}

/// The current core, if this thread runs one.
pub fn try_current() -> Option<Rc<Core>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Index of the current core.
pub fn current_index() -> usize {
    with_core(|c| c.index)
}

/// Number of cores in this reactor set.
pub fn core_count() -> usize {
    with_core(|c| c.core_count())
}

/// Current time of the current core, in nanoseconds.
pub fn now_ns() -> u64 {
    with_core(|c| c.now_ns())
}

/// Spawns a task on the current core.
pub fn spawn<F>(fut: F) -> async_task::Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    with_core(|c| c.spawn(fut))
}

/// Spawns a task on the current core and lets it run to completion on its own.
pub fn spawn_detached<F>(fut: F)
where
    F: Future<Output = ()> + 'static,
{
    spawn(fut).detach()
}

/// Bytes a task made from the future `f(a, b)` returns holds while it lives: the future (its
/// frame, sized from the type without making one) and the executor's header (async-task's
/// state, awaiter and vtable, and the schedule closure: a few words). For front ends that keep
/// tasks between commands and charge what they keep to a memory budget.
pub fn task_bytes<A, B, Fut>(_f: &impl Fn(A, B) -> Fut) -> usize {
    const TASK_HEADER: usize = 64;
    std::mem::size_of::<Fut>() + TASK_HEADER
}

/// Sends a closure to core `core`. Messages between cores are never lost: if the target's ring
/// is full the message waits in the sender core's overflow list and is retried on its next
/// loop iteration.
pub fn send_to(core: usize, msg: impl FnOnce() + Send + 'static) {
    with_core(|c| {
        let mb = c.mailboxes[core].clone();
        let msg: Message = Box::new(msg);
        if let Err(msg) = mb.try_send(msg) {
            c.overflow.borrow_mut().push((core, msg));
        }
    })
}

/// Runs `f` on core `core` and returns its result to the caller's core.
pub async fn call_on<T, F>(core: usize, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if core == current_index() {
        return f();
    }
    let (tx, rx) = futures::channel::oneshot::channel();
    send_to(core, move || {
        let _ = tx.send(f());
    });
    // The target core runs every message it receives, so the sender half is never dropped
    // unsent while the reactors run.
    rx.await.expect("reactor dropped a message")
}

impl Core {
    /// Retries messages that found a full ring; returns how many went out.
    pub(crate) fn flush_overflow(&self) -> usize {
        if self.overflow.borrow().is_empty() {
            return 0;
        }
        let pending = std::mem::take(&mut *self.overflow.borrow_mut());
        let mut sent = 0;
        for (core, msg) in pending {
            match self.mailboxes[core].try_send(msg) {
                Ok(()) => sent += 1,
                Err(msg) => self.overflow.borrow_mut().push((core, msg)),
            }
        }
        sent
    }
}

/// I/Os a task may complete in place per turn before it must yield (tokio's cooperative
/// budget, for the same reason: fairness among the tasks, messages and pollers of a core).
pub(crate) const TASK_BUDGET: u32 = 128;

thread_local! {
    static BUDGET: std::cell::Cell<u32> = const { std::cell::Cell::new(TASK_BUDGET) };
}

/// Takes one unit of the running task's budget; false when it is spent (the caller yields).
pub fn consume_budget() -> bool {
    BUDGET.with(|b| {
        let left = b.get();
        b.set(left.saturating_sub(1));
        left > 0
    })
}

/// Yields once to let other tasks of the core run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}
