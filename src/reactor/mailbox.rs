//! The message ring of one core: the only way work reaches a core from outside it.
//!
//! Two lock-free queues: runnable tasks (woken futures; unbounded because the number of tasks is
//! bounded elsewhere by queue depths, and preallocated up to [`TASK_RING_CAPACITY`] so that a
//! wake-up allocates nothing in steady state) and closures sent by other cores or the RPC thread
//! (bounded, so a flood of control messages cannot grow memory without limit). A sleeping
//! reactor is woken through an eventfd only when it announced that it sleeps, so a busy reactor
//! never pays a syscall for a wake-up.

use async_task::Runnable;
use crossbeam_queue::{ArrayQueue, SegQueue};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// A closure to run on a core.
pub type Message = Box<dyn FnOnce() + Send>;

/// Capacity of the bounded message ring of each core.
pub const MESSAGE_RING_CAPACITY: usize = 16 * 1024;
/// Runnable tasks a core queues without allocating (more go to an overflow queue).
pub const TASK_RING_CAPACITY: usize = 4096;

/// The runnable tasks of a core, first in first out: a preallocated ring, and behind it an
/// unbounded queue for when the ring is full. A `SegQueue` alone allocates a block every 31
/// pushes, that is a fraction of an allocation per wake-up, per I/O.
///
/// Order: once the overflow holds tasks, every push goes there until the core has taken them
/// all; the core takes from the ring first. So a task pushed to the ring is younger than
/// everything in the overflow only if the overflow was empty when it was pushed, that is when
/// every older task had left it: one producer's tasks run in the order it pushed them (pushes
/// of different threads at the same time have no order to keep).
pub(crate) struct TaskQueue {
    ring: ArrayQueue<Runnable>,
    overflow: SegQueue<Runnable>,
}

impl TaskQueue {
    fn new() -> TaskQueue {
        TaskQueue { ring: ArrayQueue::new(TASK_RING_CAPACITY), overflow: SegQueue::new() }
    }

    fn push(&self, r: Runnable) {
        if self.overflow.is_empty() {
            match self.ring.push(r) {
                Ok(()) => return,
                Err(r) => return self.overflow.push(r),
            }
        }
        self.overflow.push(r);
    }

    pub(crate) fn pop(&self) -> Option<Runnable> {
        self.ring.pop().or_else(|| self.overflow.pop())
    }

    fn is_empty(&self) -> bool {
        self.ring.is_empty() && self.overflow.is_empty()
    }
}

#[derive(Default)]
pub struct ReactorCounters {
    /// Nanoseconds spent in loop iterations that did work.
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent in loop iterations that found nothing to do (polling or sleeping).
    pub idle_ns: AtomicU64,
    /// Of `idle_ns`, the part spent asleep in the kernel.
    pub sleep_ns: AtomicU64,
    pub loops: AtomicU64,
    pub wakeups: AtomicU64,
    pub tasks_run: AtomicU64,
    pub messages_run: AtomicU64,
}

pub struct Mailbox {
    pub(crate) core_index: usize,
    pub(crate) cpu: Option<usize>,
    pub(crate) tasks: TaskQueue,
    pub(crate) messages: ArrayQueue<Message>,
    sleeping: AtomicBool,
    notifier: OnceLock<mio::Waker>,
    pub counters: ReactorCounters,
}

impl Mailbox {
    pub fn new(core_index: usize, cpu: Option<usize>) -> Self {
        Mailbox {
            core_index,
            cpu,
            tasks: TaskQueue::new(),
            messages: ArrayQueue::new(MESSAGE_RING_CAPACITY),
            sleeping: AtomicBool::new(false),
            notifier: OnceLock::new(),
            counters: ReactorCounters::default(),
        }
    }

    pub fn core_index(&self) -> usize {
        self.core_index
    }

    /// The CPU this core's thread is pinned to, if it is a real reactor.
    pub fn cpu(&self) -> Option<usize> {
        self.cpu
    }

    pub(crate) fn set_notifier(&self, waker: mio::Waker) {
        // A core installs its notifier once, when its thread starts.
        let installed = self.notifier.set(waker).is_ok();
        debug_assert!(installed, "notifier installed twice");
    }

    pub(crate) fn schedule(&self, runnable: Runnable) {
        self.tasks.push(runnable);
        self.notify();
    }

    /// Queues a message; gives it back if the ring is full.
    pub fn try_send(&self, msg: Message) -> Result<(), Message> {
        self.messages.push(msg)?;
        self.notify();
        Ok(())
    }

    /// Whether anything waits to run on this core.
    pub(crate) fn has_work(&self) -> bool {
        !self.tasks.is_empty() || !self.messages.is_empty()
    }

    fn notify(&self) {
        // Pairs with the fence in `prepare_sleep`: either the reactor sees our push when it
        // re-checks its queues, or we see `sleeping` and wake it.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            if let Some(n) = self.notifier.get() {
                self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
                let _ = n.wake();
            }
        }
    }

    /// Announces that the reactor is about to sleep. Returns false (and does not sleep) if work
    /// arrived in the meantime.
    pub(crate) fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.has_work() {
            self.sleeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(crate) fn end_sleep(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }
}
