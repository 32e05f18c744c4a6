//! Workers: tasks a connection keeps from one command to the next (NVMe/TCP's I/O commands,
//! iSCSI's SCSI commands). A task spawned per command would allocate its future and header per
//! command; a kept one allocates them once, when a connection first runs that many commands
//! at once.
//!
//! The front end owns the loop of each worker's task:
//!
//! ```ignore
//! async fn worker(conn: Rc<Conn>, w: Rc<Worker<Job, State>>) {
//!     while let Some(job) = w.next().await {
//!         run(&conn, job).await;
//!         if !conn.workers.finished(&w) {
//!             return;
//!         }
//!     }
//! }
//! ```
//!
//! and hands commands out with [`Workers::dispatch`]. Single-core (`Rc`, `Cell`): a
//! connection's workers live on its core.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// A kept task: the command it is handed (`J`) and what the front end keeps with it (`S`: its
/// budget charge, a running command's bookkeeping).
pub struct Worker<J, S> {
    job: RefCell<Option<J>>,
    /// Set when the pool stops: the worker returns instead of waiting for a command.
    stop: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    /// Kept between commands; false when made without room in the budget for it: it ends after
    /// its command (holding its memory only while the command runs, as a task per command
    /// did), so what a connection keeps is always charged.
    kept: bool,
    pub state: S,
}

impl<J, S> Worker<J, S> {
    /// The next command; None once the pool stopped.
    pub async fn next(&self) -> Option<J> {
        std::future::poll_fn(|cx| {
            if let Some(job) = self.job.borrow_mut().take() {
                return Poll::Ready(Some(job));
            }
            if self.stop.get() {
                return Poll::Ready(None);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn wake(&self) {
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// The workers of one connection.
pub struct Workers<J, S> {
    /// Workers without a command; a command takes the last one (the warmest in the cache).
    idle: RefCell<Vec<Rc<Worker<J, S>>>>,
    /// Workers alive (idle or running a command).
    count: Cell<usize>,
    /// The connection ended: a worker returns once its command is done.
    stopping: Cell<bool>,
}

impl<J, S> Default for Workers<J, S> {
    fn default() -> Self {
        Workers { idle: RefCell::new(Vec::new()), count: Cell::new(0), stopping: Cell::new(false) }
    }
}

impl<J, S> Workers<J, S> {
    /// Workers alive (idle or running a command).
    pub fn count(&self) -> usize {
        self.count.get()
    }

    /// Hands `job` to an idle worker, or to a new one when all are busy (during warm-up, or
    /// when the peer goes deeper than before): `make` gives the new one's state and whether it
    /// is kept, `spawn` starts its task (the front end's loop). The worker runs `job` once the
    /// caller's task yields, so the caller may still set up `state` for it.
    pub fn dispatch(&self, job: J, make: impl FnOnce() -> (S, bool), spawn: impl FnOnce(Rc<Worker<J, S>>)) -> Rc<Worker<J, S>> {
        let idle = self.idle.borrow_mut().pop();
        let w = match idle {
            Some(w) => w,
            None => {
                let (state, kept) = make();
                let w = Rc::new(Worker { job: RefCell::new(None), stop: Cell::new(false), waker: RefCell::new(None), kept, state });
                self.count.set(self.count.get() + 1);
                spawn(w.clone());
                w
            }
        };
        let previous = w.job.borrow_mut().replace(job);
        assert!(previous.is_none(), "an idle worker had a command");
        w.wake();
        w
    }

    /// Called by worker `w` after its command: true when it is back on the idle list, false
    /// when it ends now (not kept, or the pool stopped).
    pub fn finished(&self, w: &Rc<Worker<J, S>>) -> bool {
        if self.stopping.get() || !w.kept {
            self.count.set(self.count.get() - 1);
            return false;
        }
        self.idle.borrow_mut().push(w.clone());
        true
    }

    /// Ends the workers (at the connection's end): the idle ones now (woken without a
    /// command, they return and drop what they hold, the connection included), the busy ones
    /// when their command is done. Returns how many are busy.
    pub fn stop(&self) -> usize {
        self.stopping.set(true);
        let idle = std::mem::take(&mut *self.idle.borrow_mut());
        self.count.set(self.count.get() - idle.len());
        for w in idle {
            w.stop.set(true);
            w.wake();
        }
        self.count.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::ManualCores;

    async fn worker(pool: Rc<Workers<u32, ()>>, w: Rc<Worker<u32, ()>>, ran: Rc<RefCell<Vec<u32>>>) {
        while let Some(job) = w.next().await {
            ran.borrow_mut().push(job);
            crate::reactor::yield_now().await;
            if !pool.finished(&w) {
                return;
            }
        }
    }

    #[test]
    fn workers_are_reused_made_only_when_all_are_busy_and_end_at_stop() {
        let cores = ManualCores::new(1);
        let pool: Rc<Workers<u32, ()>> = Rc::default();
        let ran = Rc::new(RefCell::new(Vec::new()));
        let give = |job: u32, kept: bool| {
            let (p, r) = (pool.clone(), ran.clone());
            cores.enter(0, || {
                pool.dispatch(job, || ((), kept), |w| crate::reactor::spawn_detached(worker(p, w, r)));
            });
        };
        // Two at once: two workers.
        give(1, true);
        give(2, true);
        while cores.step(0) {}
        assert_eq!(pool.count(), 2);
        // One at a time afterwards: no new worker.
        for j in 3..10 {
            give(j, true);
            while cores.step(0) {}
        }
        assert_eq!(pool.count(), 2);
        // A worker made without room is not kept.
        give(10, true);
        give(11, true);
        give(12, false);
        while cores.step(0) {}
        assert_eq!(pool.count(), 2, "the unkept worker ended after its command");
        assert_eq!(*ran.borrow(), (1..=12).collect::<Vec<_>>());
        // A busy worker at stop ends after its command.
        give(13, true);
        assert_eq!(cores.enter(0, || pool.stop()), 1);
        while cores.step(0) {}
        assert_eq!(pool.count(), 0);
        assert_eq!(ran.borrow().last(), Some(&13));
    }
}
