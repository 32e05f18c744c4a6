//! I/O buffers from a per-core pool.
//!
//! Each core reserves one region (on 2 MiB hugepages when the host has them reserved, on
//! ordinary pages otherwise) and serves buffers from it in power-of-two size classes from 4 KiB
//! to 1 MiB, recycling freed buffers through per-class free lists: no lock, no syscall and no
//! allocator call per I/O once warm. io_uring rings register the region as a fixed buffer.
//! Larger requests, or requests when the region is exhausted, fall back to the heap.

use crate::reactor;
use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Alignment of every buffer (O_DIRECT needs the logical block size; a page covers all).
pub const BUF_ALIGN: usize = 4096;
const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 20; // 1 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
const HUGEPAGE: usize = 2 << 20;

/// Bytes each core reserves for its pool (virtual; pages are touched only when used).
static POOL_BYTES: AtomicU64 = AtomicU64::new(64 << 20);
static HUGEPAGES_USED: AtomicBool = AtomicBool::new(false);
static LOGGED: AtomicBool = AtomicBool::new(false);

/// Sets the size of each core's pool; call before the reactors start.
pub fn set_pool_bytes(bytes: u64) {
    POOL_BYTES.store(bytes.max(HUGEPAGE as u64), Ordering::Relaxed);
}

/// (hugepages in use, bytes per core) for status reports.
pub fn buffer_pool_info() -> (bool, u64) {
    (HUGEPAGES_USED.load(Ordering::Relaxed), POOL_BYTES.load(Ordering::Relaxed))
}

pub(crate) struct Pool {
    base: *mut u8,
    len: usize,
    bump: Cell<usize>,
    free: RefCell<[Vec<NonNull<u8>>; CLASSES]>,
}

impl Default for Pool {
    fn default() -> Self {
        let want = (POOL_BYTES.load(Ordering::Relaxed) as usize).div_ceil(HUGEPAGE) * HUGEPAGE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // Hugepages must be reserved up front (no MAP_NORESERVE): a lazily faulted hugepage
        // that the pool cannot supply kills the process with SIGBUS instead of failing here.
        // Some kernels map MAP_HUGETLB without free hugepages and fail later, so ask first.
        let mut base = libc::MAP_FAILED;
        if free_hugepage_bytes() >= want {
            // SAFETY: anonymous mapping with no address hint; the result is checked.
            base = unsafe { libc::mmap(std::ptr::null_mut(), want, prot, flags | libc::MAP_HUGETLB, -1, 0) };
        }
        let huge = base != libc::MAP_FAILED;
        if !huge {
            // SAFETY: as above.
            base = unsafe { libc::mmap(std::ptr::null_mut(), want, prot, flags | libc::MAP_NORESERVE, -1, 0) };
        }
        if base == libc::MAP_FAILED {
            log::error!("buffer pool: cannot map {want} bytes; buffers come from the heap");
            return Pool { base: std::ptr::null_mut(), len: 0, bump: Cell::new(0), free: RefCell::new(Default::default()) };
        }
        if huge {
            HUGEPAGES_USED.store(true, Ordering::Relaxed);
        }
        if !LOGGED.swap(true, Ordering::Relaxed) {
            if huge {
                log::info!("buffer pool: {} MiB per core on 2 MiB hugepages", want >> 20);
            } else {
                log::info!("buffer pool: {} MiB per core on ordinary pages (no hugepages reserved)", want >> 20);
            }
        }
        Pool { base: base as *mut u8, len: want, bump: Cell::new(0), free: RefCell::new(Default::default()) }
    }
}

/// Bytes of free 2 MiB hugepages (HugePages_Free in /proc/meminfo).
fn free_hugepage_bytes() -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse::<usize>().ok()).map_or(0, |n| n * HUGEPAGE)
}

impl Drop for Pool {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: the region was mapped by us with this length; every IoBuf holds an Rc on
            // the pool, so none points into it any more.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        }
    }
}

impl Pool {
    fn take(&self, class: usize) -> Option<NonNull<u8>> {
        if let Some(p) = self.free.borrow_mut()[class].pop() {
            return Some(p);
        }
        let size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
        let off = self.bump.get();
        if self.base.is_null() || off + size > self.len {
            return None;
        }
        self.bump.set(off + size);
        // SAFETY: off + size <= len, inside the mapping.
        NonNull::new(unsafe { self.base.add(off) })
    }

    /// The pool's region (address, length), for registration as an io_uring fixed buffer.
    pub(crate) fn region(&self) -> (*mut u8, usize) {
        (self.base, self.len)
    }
}

/// Free buffers in the current core's pool of the size class that serves `len` bytes: a test
/// hook to observe when a buffer returns.
#[doc(hidden)]
pub fn pool_free_buffers(len: usize) -> usize {
    let size = len.max(1).next_power_of_two().max(1 << MIN_CLASS_SHIFT);
    let class = (size.trailing_zeros() - MIN_CLASS_SHIFT) as usize;
    reactor::with_core(|c| c.local::<Pool>().free.borrow().get(class).map_or(0, Vec::len))
}

/// The current core's pool region, for io_uring fixed-buffer registration.
pub fn current_pool_region() -> (*mut u8, usize) {
    reactor::with_core(|c| c.local::<Pool>().region())
}

enum Origin {
    Pool { pool: Rc<Pool>, class: usize },
    Heap { layout: std::alloc::Layout },
}

/// An aligned I/O buffer of `len` bytes. Not `Send`: it returns to the pool of the core that
/// allocated it.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

impl IoBuf {
    /// A buffer of `len` bytes whose content is unspecified (old data of this core's I/O).
    pub fn alloc(len: usize) -> IoBuf {
        let size = len.max(1).next_power_of_two().max(1 << MIN_CLASS_SHIFT);
        let class = (size.trailing_zeros() - MIN_CLASS_SHIFT) as usize;
        if class < CLASSES {
            if let Some(pool) = reactor::try_current().map(|c| c.local::<Pool>()) {
                if let Some(ptr) = pool.take(class) {
                    return IoBuf { ptr, len, cap: size, origin: Origin::Pool { pool, class } };
                }
            }
        }
        let cap = len.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN;
        let layout = std::alloc::Layout::from_size_align(cap, BUF_ALIGN).expect("buffer size overflows a layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf { ptr, len, cap, origin: Origin::Heap { layout } }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut b = IoBuf::alloc(len);
        b.fill(0);
        b
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity (bytes past the old length are unspecified).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf length {len} over capacity {}", self.cap);
        self.len = len;
    }

    /// Whether the buffer lies in the core's registered pool region.
    pub fn is_pooled(&self) -> bool {
        matches!(self.origin, Origin::Pool { .. })
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Pool { pool, class } => pool.free.borrow_mut()[*class].push(self.ptr),
            // SAFETY: allocated with exactly this layout in `alloc`.
            Origin::Heap { layout } => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), *layout) },
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::ManualCores;

    #[test]
    fn pool_recycles_by_class_and_falls_back_to_heap() {
        let cores = ManualCores::new(1);
        cores.enter(0, || {
            let a = IoBuf::alloc(4096);
            assert!(a.is_pooled());
            assert_eq!(a.as_ptr() as usize % BUF_ALIGN, 0);
            let pa = a.as_ptr();
            drop(a);
            let b = IoBuf::alloc(3000);
            assert_eq!(b.as_ptr(), pa, "a freed buffer of the same class is reused");
            assert_eq!(b.len(), 3000);
            let big = IoBuf::alloc(4 << 20);
            assert!(!big.is_pooled());
            assert_eq!(big.as_ptr() as usize % BUF_ALIGN, 0);
            let z = IoBuf::zeroed(8192);
            assert!(z.iter().all(|&x| x == 0));
        });
    }

    #[test]
    fn off_core_buffers_come_from_the_heap() {
        let b = IoBuf::alloc(4096);
        assert!(!b.is_pooled());
    }
}
