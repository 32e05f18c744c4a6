//! Named points in the data path where the simulation can crash on purpose (instead of at a
//! random I/O count): code calls [`reached`] at the point; a simulation run installs a hook on
//! its thread with [`set_hook`] and, from the hook, picks the crash (e.g. a few store I/Os
//! later, to land inside the commits that follow). Without a hook, [`reached`] is one
//! thread-local lookup; it sits only on rare paths.

use std::cell::RefCell;

/// The points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// CoW rule 1 ("split", `bdevs/snapshot`): an old-epoch write on a shared slot is about
    /// to commit the new slot's record and then the old slot's.
    CowSplitCommits,
    /// CoW rule 2 ("update", `bdevs/snapshot`): an old-epoch write is about to patch a slot in
    /// place, whose record on media may still carry the check of the copy it patches.
    CowPatchInPlace,
}

type Hook = Box<dyn FnMut(Point)>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Called by the code at `p`.
pub fn reached(p: Point) {
    HOOK.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(p);
        }
    });
}

/// Installs (or with `None` removes) this thread's hook.
pub fn set_hook(f: Option<Hook>) {
    HOOK.with(|h| *h.borrow_mut() = f);
}
