//! The message ring of one core: the only way work reaches a core from outside it.
//!
//! Two lock-free queues: runnable tasks (woken futures; unbounded because the number of tasks is
//! bounded elsewhere by queue depths) and closures sent by other cores or the RPC thread
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
    pub(crate) tasks: SegQueue<Runnable>,
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
            tasks: SegQueue::new(),
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
