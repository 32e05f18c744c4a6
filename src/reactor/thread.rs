//! Reactor threads: one per core of the core mask, pinned, each running its core's loop.

use super::clock::Clock;
use super::core::Core;
use super::io::IoDriver;
use super::mailbox::{Mailbox, Message};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// What a reactor does when it finds nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Poll without ever sleeping (lowest latency, one core at 100%).
    Busy,
    /// Poll while there is work; after `idle_us` without any, sleep until woken.
    #[default]
    Adaptive,
}

#[derive(Debug, Clone)]
pub struct ReactorOptions {
    /// CPU ids, one reactor each; the first is core 0 (the "main" core).
    pub cpus: Vec<usize>,
    pub poll_mode: PollMode,
    /// Idle time before an adaptive reactor sleeps.
    pub idle_us: u64,
    /// Pin each reactor thread to its CPU.
    pub pin: bool,
}

/// Most messages or tasks one loop iteration runs before it polls devices and sockets again, so
/// a flood of messages cannot starve completions.
const RUN_BUDGET: usize = 256;
/// Longest sleep without a timer; only a safety net, wake-ups come through the notifier.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// After this long without work, a reactor that does not sleep (busy mode, or I/O in flight)
/// gives its CPU to whoever else is runnable there before it polls again.
const YIELD_AFTER_NS: u64 = 20_000;

/// The running reactors.
pub struct Reactors {
    handle: ReactorHandle,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// How non-reactor threads (RPC, metrics, main) reach the cores.
#[derive(Clone)]
pub struct ReactorHandle {
    mailboxes: Arc<[Arc<Mailbox>]>,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("reactor core {0} did not answer within {1:?}")]
    Timeout(usize, Duration),
    #[error("reactor core {0} is gone")]
    Gone(usize),
}

/// Default wait of a blocking caller for a core's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl ReactorHandle {
    pub fn core_count(&self) -> usize {
        self.mailboxes.len()
    }

    pub fn mailbox(&self, core: usize) -> &Arc<Mailbox> {
        &self.mailboxes[core]
    }

    /// Sends a closure to a core; waits (this thread only) while the ring is full.
    pub fn send(&self, core: usize, f: impl FnOnce() + Send + 'static) {
        let mut msg: Message = Box::new(f);
        let mb = &self.mailboxes[core];
        loop {
            match mb.try_send(msg) {
                Ok(()) => return,
                Err(m) => {
                    msg = m;
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    /// Runs `f` on `core` and waits for its result.
    pub fn call<T: Send + 'static>(&self, core: usize, f: impl FnOnce() -> T + Send + 'static) -> Result<T, CallError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(core, move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(CALL_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => CallError::Timeout(core, CALL_TIMEOUT),
            mpsc::RecvTimeoutError::Disconnected => CallError::Gone(core),
        })
    }

    /// Runs the future made by `f` on `core` and waits for its output (at most `timeout`).
    pub fn call_async<T, Fut, F>(&self, core: usize, timeout: Duration, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        Fut: Future<Output = T> + 'static,
        F: FnOnce() -> Fut + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(core, move || {
            super::spawn_detached(async move {
                let _ = tx.send(f().await);
            })
        });
        rx.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => CallError::Timeout(core, timeout),
            mpsc::RecvTimeoutError::Disconnected => CallError::Gone(core),
        })
    }

    /// Runs `f` on every core, in core order, and collects the results.
    pub fn call_all<T: Send + 'static>(&self, f: impl Fn() -> T + Send + Sync + Clone + 'static) -> Result<Vec<T>, CallError> {
        (0..self.core_count()).map(|c| self.call(c, f.clone())).collect()
    }
}

impl Reactors {
    /// Starts one pinned thread per CPU of `opts.cpus`; returns when every core is running.
    pub fn start(opts: &ReactorOptions) -> std::io::Result<Reactors> {
        Self::start_with_max_sleep(opts, MAX_SLEEP)
    }

    /// [`Reactors::start`] with another longest sleep without a timer. Tests of the wake-up
    /// path set it far beyond their own timeout, so that a lost wake-up fails them instead of
    /// being hidden by the safety net.
    #[doc(hidden)]
    pub fn start_with_max_sleep(opts: &ReactorOptions, max_sleep: Duration) -> std::io::Result<Reactors> {
        assert!(!opts.cpus.is_empty(), "a reactor set needs at least one core");
        let mailboxes: Arc<[Arc<Mailbox>]> = opts.cpus.iter().enumerate().map(|(i, &cpu)| Arc::new(Mailbox::new(i, Some(cpu)))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
        for (i, &cpu) in opts.cpus.iter().enumerate() {
            let mbs = mailboxes.clone();
            let stop = stop.clone();
            let ready = ready_tx.clone();
            let opts = opts.clone();
            let t = std::thread::Builder::new().name(format!("reactor_{cpu}")).spawn(move || {
                if opts.pin && !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    log::warn!("reactor {i}: could not pin to CPU {cpu}");
                }
                let io = match IoDriver::new() {
                    Ok(io) => io,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                match io.new_notifier() {
                    Ok(w) => mbs[i].set_notifier(w),
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                }
                let core = Core::new(i, mbs, Clock::real(), Some(io));
                let _ = ready.send(Ok(()));
                drop(ready);
                core.enter(|| run_loop(&core, &opts, &stop, max_sleep));
            })?;
            threads.push(t);
        }
        drop(ready_tx);
        for _ in 0..opts.cpus.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other("a reactor thread died while starting")),
            }
        }
        log::info!("{} reactor(s) on CPU(s) {:?}, poll mode {:?}", opts.cpus.len(), opts.cpus, opts.poll_mode);
        Ok(Reactors { handle: ReactorHandle { mailboxes }, threads, stop })
    }

    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// Stops every reactor after it has run what is queued, and joins the threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in 0..self.handle.core_count() {
            // An empty message wakes a sleeping reactor so it sees the flag.
            let _ = self.handle.mailboxes[c].try_send(Box::new(|| {}));
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run_loop(core: &Rc<Core>, opts: &ReactorOptions, stop: &AtomicBool, max_sleep: Duration) {
    let mb = core.mailbox().clone();
    let io = core.io.as_ref().expect("reactor cores have an I/O driver");
    let idle_ns = opts.idle_us.saturating_mul(1000);
    let mut last_work = core.now_ns();
    let mut t0 = last_work;
    loop {
        let mut work = 0usize;
        for _ in 0..RUN_BUDGET {
            if !core.run_one() {
                break;
            }
            work += 1;
        }
        work += core.flush_overflow();
        work += core.timers.fire(core.now_ns());
        work += core.run_pollers();
        if io.has_sources() {
            work += io.poll(Some(Duration::ZERO));
        }
        let t1 = core.now_ns();
        let spent = t1.saturating_sub(t0);
        t0 = t1;
        mb.counters.loops.fetch_add(1, Ordering::Relaxed);
        if work > 0 {
            mb.counters.busy_ns.fetch_add(spent, Ordering::Relaxed);
            last_work = t1;
            continue;
        }
        mb.counters.idle_ns.fetch_add(spent, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) && !mb.has_work() && !core.pollers_busy() {
            break;
        }
        if opts.poll_mode == PollMode::Adaptive && t1.saturating_sub(last_work) >= idle_ns && !core.pollers_need_polling() && mb.prepare_sleep() {
            let timeout = match core.timers.next_deadline() {
                Some(d) => Duration::from_nanos(d.saturating_sub(t1)).min(max_sleep),
                None => max_sleep,
            };
            io.poll(Some(timeout));
            mb.end_sleep();
            let t2 = core.now_ns();
            let slept = t2.saturating_sub(t0);
            mb.counters.idle_ns.fetch_add(slept, Ordering::Relaxed);
            mb.counters.sleep_ns.fetch_add(slept, Ordering::Relaxed);
            t0 = t2;
        } else if t1.saturating_sub(last_work) >= YIELD_AFTER_NS {
            // Nothing to do for a while, and no sleeping (busy mode, or work in flight). What
            // we wait for may need this very CPU: io_uring hands I/O on some files (tmpfs,
            // buffered) to kernel workers that inherit the reactor's affinity, and spinning
            // would starve them (measured: 255K against 440K IOPS on a tmpfs file). With
            // nothing else runnable here, the yield returns at once.
            std::thread::yield_now();
        }
    }
    core.clear_locals();
}

/// Cores without threads, stepped by hand: the deterministic simulation runs bdev modules and
/// preserve logic on these, one thread, with time and ordering chosen by a seed.
pub struct ManualCores {
    cores: Vec<Rc<Core>>,
    clock: Rc<std::cell::Cell<u64>>,
}

impl ManualCores {
    pub fn new(count: usize) -> Self {
        assert!(count > 0);
        let mailboxes: Arc<[Arc<Mailbox>]> = (0..count).map(|i| Arc::new(Mailbox::new(i, None))).collect();
        let clock = Rc::new(std::cell::Cell::new(0u64));
        let cores = (0..count).map(|i| Core::new(i, mailboxes.clone(), Clock::Sim(clock.clone()), None)).collect();
        ManualCores { cores, clock }
    }

    pub fn count(&self) -> usize {
        self.cores.len()
    }

    pub fn core(&self, i: usize) -> &Rc<Core> {
        &self.cores[i]
    }

    pub fn now_ns(&self) -> u64 {
        self.clock.get()
    }

    /// Moves simulated time forward (never backward) and fires due timers on every core.
    pub fn advance_to(&self, t: u64) {
        assert!(t >= self.clock.get(), "simulated time cannot go back");
        self.clock.set(t);
        for c in &self.cores {
            c.enter(|| c.timers.fire(t));
        }
    }

    /// Earliest timer deadline on any core.
    pub fn next_timer(&self) -> Option<u64> {
        self.cores.iter().filter_map(|c| c.timers.next_deadline()).min()
    }

    pub fn has_work(&self, i: usize) -> bool {
        self.cores[i].mailbox().has_work()
    }

    /// Runs one message or task on core `i`; false if it had none.
    pub fn step(&self, i: usize) -> bool {
        let c = &self.cores[i];
        c.enter(|| {
            c.flush_overflow();
            c.run_one()
        })
    }

    /// Runs `f` on core `i` as the current core (to spawn tasks there, say).
    pub fn enter<R>(&self, i: usize, f: impl FnOnce() -> R) -> R {
        self.cores[i].enter(f)
    }

    /// Runs `f` on core `core` to completion: steps every core, and whenever all are idle
    /// moves simulated time to the next timer. Panics if the future waits for nothing (a
    /// deadlock).
    pub fn block_on<T: 'static>(&self, core: usize, f: impl std::future::Future<Output = T> + 'static) -> T {
        let out = Rc::new(std::cell::RefCell::new(None));
        let o = out.clone();
        self.enter(core, || super::spawn_detached(async move { *o.borrow_mut() = Some(f.await) }));
        loop {
            self.run_until_idle();
            if let Some(v) = out.borrow_mut().take() {
                return v;
            }
            let next = self.next_timer().expect("the future waits for nothing: deadlock");
            self.advance_to(next.max(self.now_ns()));
        }
    }

    /// Runs every core round-robin until none has work; returns the steps taken.
    pub fn run_until_idle(&self) -> usize {
        let mut steps = 0;
        loop {
            let mut any = false;
            for i in 0..self.cores.len() {
                while self.step(i) {
                    any = true;
                    steps += 1;
                }
            }
            if !any {
                return steps;
            }
        }
    }
}

impl Drop for ManualCores {
    fn drop(&mut self) {
        for c in &self.cores {
            c.enter(|| c.clear_locals());
        }
    }
}
