//! What every harness's tasks share about the run itself, beside their own model: the first
//! failure, whether the world they belong to has crashed, and whether the clients and the
//! controller have finished. A harness keeps a [`RunState`] in its shared state and implements
//! [`HasRun`] to use [`fail`] and [`alive`].

use std::cell::RefCell;
use std::rc::Rc;

#[derive(Debug, Default)]
pub struct RunState {
    /// The first failure of the run; the run ends with it.
    pub failure: Option<String>,
    /// The world crashed: tasks of the old world must not touch the model any more.
    pub dead: bool,
    pub clients_left: usize,
    pub controller_done: bool,
}

impl RunState {
    /// A life starts (the first, or one after a restart) with `clients` client tasks and the
    /// controller.
    pub fn new_life(&mut self, clients: usize) {
        self.dead = false;
        self.clients_left = clients;
        self.controller_done = false;
    }

    /// The life is over: it failed, or every task finished.
    pub fn finished(&self) -> bool {
        self.failure.is_some() || (self.clients_left == 0 && self.controller_done)
    }
}

/// A harness's shared state holding a [`RunState`].
pub trait HasRun {
    fn run(&self) -> &RunState;
    fn run_mut(&mut self) -> &mut RunState;
}

/// Records `msg` as the run's failure unless one is already recorded or the world is dead (a
/// crashed world's tasks see errors that are the crash's, not the code's).
pub fn fail<T: HasRun>(sh: &Rc<RefCell<T>>, msg: String) {
    let mut s = sh.borrow_mut();
    let r = s.run_mut();
    if !r.dead && r.failure.is_none() {
        r.failure = Some(msg);
    }
}

/// Whether a task should go on: no failure and its world not crashed.
pub fn alive<T: HasRun>(sh: &Rc<RefCell<T>>) -> bool {
    let s = sh.borrow();
    !s.run().dead && s.run().failure.is_none()
}
