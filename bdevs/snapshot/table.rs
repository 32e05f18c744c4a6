//! Lookup tables in RAM: arrays of atomics on lazily backed anonymous memory, so a table costs
//! only the pages its entries touch (4 bytes per grain entry, 8 per slot record, 2 per slot's
//! piece bitmap) and can be cleared at once by giving its pages back to the kernel.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};

/// An atomic type whose all-zero bit pattern is a valid zero value.
pub trait ZeroAtomic: Send + Sync {}
impl ZeroAtomic for AtomicU16 {}
impl ZeroAtomic for AtomicU32 {}
impl ZeroAtomic for AtomicU64 {}

pub struct ZeroMap<T: ZeroAtomic> {
    ptr: *mut T,
    len: usize,
    bytes: usize,
    _t: PhantomData<T>,
}

// SAFETY: the memory holds atomics only and lives as long as the map; every access is an
// atomic operation.
unsafe impl<T: ZeroAtomic> Send for ZeroMap<T> {}
unsafe impl<T: ZeroAtomic> Sync for ZeroMap<T> {}

impl<T: ZeroAtomic> ZeroMap<T> {
    pub fn new(len: usize) -> Result<ZeroMap<T>, String> {
        let bytes = (len.max(1) * std::mem::size_of::<T>()).div_ceil(4096) * 4096;
        // SAFETY: anonymous private mapping without an address hint; the result is checked.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(format!("cannot map a table of {bytes} bytes: {}", std::io::Error::last_os_error()));
        }
        Ok(ZeroMap { ptr: p as *mut T, len, bytes, _t: PhantomData })
    }

    /// Entry `i`. Indices come from ranges the bdev layer checked; one outside is a bug.
    pub fn at(&self, i: usize) -> &T {
        assert!(i < self.len, "table index {i} out of {}", self.len);
        // SAFETY: i < len, inside the mapping; zeroed memory is a valid atomic.
        unsafe { &*self.ptr.add(i) }
    }

    /// Sets every entry to zero (the kernel drops the pages). The caller guarantees nobody
    /// uses the entries meanwhile.
    pub fn clear(&self) {
        // SAFETY: the range is our own private anonymous mapping.
        unsafe { libc::madvise(self.ptr as *mut libc::c_void, self.bytes, libc::MADV_DONTNEED) };
    }

    /// Bytes of the table backed by RAM.
    pub fn resident_bytes(&self) -> u64 {
        let pages = self.bytes / 4096;
        let mut vec = vec![0u8; pages];
        // SAFETY: the vector has one byte per page of the mapping.
        let r = unsafe { libc::mincore(self.ptr as *mut libc::c_void, self.bytes, vec.as_mut_ptr()) };
        if r != 0 {
            return self.bytes as u64;
        }
        vec.iter().filter(|&&v| v & 1 != 0).count() as u64 * 4096
    }
}

impl<T: ZeroAtomic> Drop for ZeroMap<T> {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn lazily_backed_and_cleared() {
        let m: ZeroMap<AtomicU32> = ZeroMap::new(1 << 20).unwrap();
        assert_eq!(m.at(12345).load(Relaxed), 0);
        m.at(12345).store(7, Relaxed);
        m.at(0).store(1, Relaxed);
        assert!(m.resident_bytes() <= 3 * 4096, "{}", m.resident_bytes());
        m.clear();
        assert_eq!(m.at(12345).load(Relaxed), 0);
        assert_eq!(m.at(0).load(Relaxed), 0);
    }
}
