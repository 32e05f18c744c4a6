//! The process's allocator (mimalloc), with a way for tests to count the allocations that
//! chosen threads make: the proof that the data paths allocate nothing per I/O in steady state
//! (`tests/alloc_free_io.rs` counts on the reactor threads only, not on the test's own host).
//!
//! A test binary cannot install a counting allocator of its own: the library already installs
//! this one, and a program has one global allocator. The cost outside tests is one relaxed load
//! of a flag that is false per allocation.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

/// mimalloc, counting allocations made on threads that asked for it.
pub struct CountingMiMalloc;

/// Some thread counts: only then is the thread-local flag read.
static ARMED: AtomicBool = AtomicBool::new(false);
/// Allocations (alloc, alloc_zeroed, realloc) made on counting threads, since the start.
static COUNTED: AtomicU64 = AtomicU64::new(0);
/// How many of the next counted allocations print their backtrace (a debugging aid for
/// finding what allocates; see [`trace_next`]).
static TRACE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialized and without a destructor: reading it never allocates, so the
    // allocator itself may read it (also while the thread is being torn down).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// Counts (or stops counting) the allocations of the calling thread.
pub fn count_this_thread(on: bool) {
    if on {
        ARMED.store(true, Relaxed);
    }
    COUNTING.with(|c| c.set(on));
}

/// Allocations made on counting threads so far.
pub fn counted() -> u64 {
    COUNTED.load(Relaxed)
}

/// Prints the backtrace of the next `n` counted allocations to stderr.
pub fn trace_next(n: usize) {
    TRACE.store(n, Relaxed);
}

#[inline]
fn note() {
    if !ARMED.load(Relaxed) {
        return;
    }
    // `try_with`: no panic while the thread's locals are being destroyed.
    if COUNTING.try_with(|c| c.get()) != Ok(true) {
        return;
    }
    COUNTED.fetch_add(1, Relaxed);
    if TRACE.load(Relaxed) > 0 && TRACE.fetch_sub(1, Relaxed) > 0 {
        // The backtrace allocates: uncounted (the flag is off meanwhile), so no recursion.
        COUNTING.with(|c| c.set(false));
        eprintln!("counted allocation:\n{}", std::backtrace::Backtrace::force_capture());
        COUNTING.with(|c| c.set(true));
    }
}

// SAFETY: every call is passed on unchanged to mimalloc; `note` neither allocates (outside the
// guarded trace) nor touches the memory.
unsafe impl GlobalAlloc for CountingMiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        mimalloc::MiMalloc.alloc(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}
