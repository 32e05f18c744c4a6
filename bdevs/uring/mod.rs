//! `uring`: a file or block device through io_uring, one ring per reactor core (the core's
//! queue pair), O_DIRECT when the file system allows it, the file and the core's buffer pool
//! registered with each ring (fixed file, fixed buffers), submissions batched once per reactor
//! loop iteration and completions reaped by the core's poller.

pub mod rpc;
pub mod space;

use crate::bdev::{gather, Bdev, BdevError, BdevProps, CompletionFuture, Completions, CopyOut, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType, BUF_ALIGN};
use crate::reactor::{self, Poller};
use io_uring::{opcode, types, IoUring};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use uuid::Uuid;

/// Submission queue entries per ring; the completion queue is twice as deep.
const RING_ENTRIES: u32 = 512;
/// Most I/Os in flight on one ring; more wait in the channel (back-pressure, not overflow).
const MAX_IN_FLIGHT: usize = 2 * RING_ENTRIES as usize;

pub struct UringBdev {
    props: BdevProps,
    filename: String,
    path: PathBuf,
    file: Arc<File>,
    /// Opened with O_DIRECT (no page cache).
    direct: bool,
    block_device: bool,
    /// Size in MiB the file was created with, for `save_config`.
    size_mb: Option<u64>,
}

fn logical_block_size(f: &File) -> Option<u32> {
    let mut sz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    let r = unsafe {
        libc::ioctl(f.as_raw_fd(), 0x1268 /* BLKSSZGET */, &mut sz)
    };
    (r == 0 && sz > 0).then_some(sz as u32)
}

fn block_device_bytes(f: &File) -> Option<u64> {
    let mut sz: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    let r = unsafe {
        libc::ioctl(f.as_raw_fd(), 0x80081272 /* BLKGETSIZE64 */, &mut sz)
    };
    (r == 0).then_some(sz)
}

/// O_DIRECT alignment of a file (statx STATX_DIOALIGN), if the kernel and file system say.
fn dio_alignment(path: &Path) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statx fills the zeroed struct; the path is a valid C string.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_DIOALIGN, &mut sx) };
    if r != 0 || sx.stx_mask & libc::STATX_DIOALIGN == 0 || sx.stx_dio_mem_align == 0 {
        return None;
    }
    Some((sx.stx_dio_mem_align, sx.stx_dio_offset_align))
}

impl UringBdev {
    /// Opens (creating it if `size_mb` is given and the file is missing) `path`.
    pub fn open(name: &str, filename: &str, path: &Path, block_size: Option<u32>, size_mb: Option<u64>, uuid: Option<Uuid>) -> Result<UringBdev, String> {
        if let Some(mb) = size_mb {
            if mb == 0 {
                return Err("size_mb must be at least 1".into());
            }
            if !path.exists() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                f.set_len(mb << 20).map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            }
        }
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(format!("{} is neither a regular file nor a block device", path.display()));
        }
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!("{name}: {} does not support O_DIRECT; using the page cache", path.display());
                (open(false).map_err(|e| format!("cannot open {}: {e}", path.display()))?, false)
            }
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        let (mem_align, offset_align) = if !direct {
            (1, 1)
        } else if block_device {
            let l = logical_block_size(&file).unwrap_or(512);
            (l as usize, l)
        } else {
            dio_alignment(path).map(|(m, o)| (m as usize, o)).unwrap_or((4096, 512))
        };
        let bytes = if block_device { block_device_bytes(&file).ok_or("cannot read the block device's size")? } else { meta.len() };
        let default_bs = if block_device { logical_block_size(&file).unwrap_or(512) } else { 512 };
        let bs = block_size.unwrap_or(default_bs.max(offset_align));
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(format!("block_size {bs} must be a power of two from 512 to 65536"));
        }
        if mem_align > BUF_ALIGN {
            // Every buffer the ring sees is an IoBuf, aligned to BUF_ALIGN.
            return Err(format!("{} needs {mem_align}-byte aligned memory for direct I/O; buffers are aligned to {BUF_ALIGN}", path.display()));
        }
        if direct && bs < offset_align {
            return Err(format!("block_size {bs} is smaller than the device's direct I/O alignment {offset_align}"));
        }
        let num_blocks = bytes / bs as u64;
        if num_blocks == 0 {
            return Err(format!("{} is smaller than one {bs}-byte block", path.display()));
        }
        Ok(UringBdev {
            props: BdevProps::new(name, "URING bdev", bs, num_blocks, uuid.unwrap_or_else(Uuid::new_v4)),
            filename: filename.to_string(),
            path: path.to_path_buf(),
            file: Arc::new(file),
            direct,
            block_device,
            size_mb,
        })
    }
}

/// An SQE's user_data: the completion slot in the low half, the bytes the operation must
/// transfer (0: any) in the high half, so that a completion needs no lookup of its own.
/// Set in an SQE's expected length for writes: a short write means the file system ran out of
/// room (ENOSPC after part of the data), not the end of the file.
const WRITE: u32 = 1 << 31;

fn user_data(slot: usize, expected: u32) -> u64 {
    debug_assert!(slot <= u32::MAX as usize, "completion slot {slot} does not fit user_data");
    (expected as u64) << 32 | slot as u64
}

/// Registers the current core's buffer pool as fixed buffer 0 of a ring; returns the region
/// (address, length) when the kernel took it. Shared by every io_uring based module.
pub(crate) fn register_pool(submitter: &io_uring::Submitter<'_>, who: &str) -> Option<(usize, usize)> {
    let (base, len) = crate::bdev::current_pool_region();
    if base.is_null() || len == 0 {
        return None;
    }
    let iov = libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len };
    // SAFETY: the region is mapped for the life of the core's pool, which outlives the core's
    // channels (both are core-local; channels are dropped first).
    match unsafe { submitter.register_buffers(&[iov]) } {
        Ok(()) => Some((base as usize, len)),
        Err(e) => {
            // Once per process at WARN: every channel of every core would say the same, and a
            // service silently losing fixed buffers to a low LimitMEMLOCK costs throughput.
            static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            let hint = if e.raw_os_error() == Some(libc::ENOMEM) {
                let lim = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).map(|(soft, _)| soft).unwrap_or(0);
                format!(
                    " (RLIMIT_MEMLOCK is {}, the pool needs {len} bytes: raise it, e.g. LimitMEMLOCK=infinity in the systemd unit or `ulimit -l`)",
                    if lim == libc::RLIM_INFINITY { "unlimited".to_string() } else { format!("{lim} bytes") }
                )
            } else {
                String::new()
            };
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::warn!("{who}: fixed buffers unavailable ({e}){hint}; using plain buffers");
            } else {
                log::debug!("{who}: fixed buffers unavailable ({e}); using plain buffers");
            }
            None
        }
    }
}

/// An eventfd the ring signals on completions, registered with the current core so that a
/// sleeping reactor wakes for them. None if the kernel refuses (the core then polls).
pub(crate) fn completion_eventfd(submitter: &io_uring::Submitter<'_>) -> Option<OwnedFd> {
    // SAFETY: plain eventfd creation; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return None;
    }
    // SAFETY: efd is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(efd) };
    let ok = submitter.register_eventfd(efd).is_ok() && reactor::with_core(|c| c.io().is_some_and(|io| io.register_wake_only(efd).is_ok()));
    ok.then_some(owned)
}

/// One core's ring on one bdev.
struct UringChannel {
    ring: RefCell<IoUring>,
    fd: RawFd,
    block_size: u64,
    block_device: bool,
    /// The core's buffer pool, registered as fixed buffer 0 (if registration worked).
    fixed: Option<(usize, usize)>,
    /// Operations the kernel has not answered yet.
    in_flight: Cell<usize>,
    unsubmitted: Cell<u32>,
    eventfd: Option<OwnedFd>,
    poller_id: Cell<Option<u64>>,
    completions: Completions,
    _file: Arc<File>,
}

impl UringChannel {
    fn new(b: &UringBdev) -> Result<Rc<UringChannel>, BdevError> {
        let os = |e: std::io::Error| BdevError::Os(e.raw_os_error().unwrap_or(libc::EIO));
        let ring = IoUring::builder().setup_cqsize(RING_ENTRIES * 2).build(RING_ENTRIES).map_err(os)?;
        let fd = b.file.as_raw_fd();
        ring.submitter().register_files(&[fd]).map_err(os)?;
        let fixed = register_pool(&ring.submitter(), b.name());
        let eventfd = completion_eventfd(&ring.submitter());
        let ch = Rc::new(UringChannel {
            ring: RefCell::new(ring),
            fd,
            block_size: b.block_size() as u64,
            block_device: b.block_device,
            fixed,
            in_flight: Cell::new(0),
            unsubmitted: Cell::new(0),
            eventfd,
            poller_id: Cell::new(None),
            completions: Completions::current(),
            _file: b.file.clone(),
        });
        let id = reactor::with_core(|c| c.add_poller(ch.clone()));
        ch.poller_id.set(Some(id));
        Ok(ch)
    }

    fn fixed_index(&self, ptr: *const u8, len: usize) -> bool {
        self.fixed.is_some_and(|(base, rlen)| (ptr as usize) >= base && (ptr as usize) + len <= base + rlen)
    }

    /// The SQE of `op`; a read or write uses `buf`, the memory its slot owns.
    fn sqe(&self, op: Op, buf: Option<&IoBuf>) -> io_uring::squeue::Entry {
        let fd = types::Fixed(0);
        let (ptr, len) = buf.map_or((std::ptr::null_mut(), 0), |b| (b.as_ptr() as *mut u8, b.len()));
        let fixed = buf.is_some() && self.fixed_index(ptr, len);
        match op {
            Op::Read(offset) if fixed => opcode::ReadFixed::new(fd, ptr, len as u32, 0).offset(offset).build(),
            Op::Read(offset) => opcode::Read::new(fd, ptr, len as u32).offset(offset).build(),
            Op::Write(offset) if fixed => opcode::WriteFixed::new(fd, ptr, len as u32, 0).offset(offset).build(),
            Op::Write(offset) => opcode::Write::new(fd, ptr, len as u32).offset(offset).build(),
            Op::Fsync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Op::PunchHole { offset, len } => {
                // A punched hole reads as zeros: it is both an unmap and a write of zeroes.
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build()
            }
        }
    }

    /// Queues one SQE (the poller submits the batch); `buf` moves into the completion slot,
    /// which keeps it until the kernel answers. None (and `buf` left in place) when the ring
    /// is at its limit.
    fn push(&self, op: Op, buf: &mut Option<IoBuf>) -> Option<CompletionFuture> {
        if self.in_flight.get() >= MAX_IN_FLIGHT {
            return None;
        }
        let sqe = self.sqe(op, buf.as_ref());
        let expected = buf.as_ref().map_or(0, |b| b.len() as u32) | if matches!(op, Op::Write(_)) { WRITE } else { 0 };
        let (slot, fut) = match buf.take() {
            Some(b) => self.completions.alloc_owning(b),
            None => self.completions.alloc(),
        };
        let sqe = sqe.user_data(user_data(slot, expected));
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the only memory the SQE names is the buffer its completion slot owns; the
        // slot releases it when the kernel's completion arrives, not before, even if the
        // future is dropped.
        unsafe {
            if ring.submission().push(&sqe).is_err() {
                // The SQ is full: hand the batch to the kernel to make room.
                let _ = ring.submit();
                self.unsubmitted.set(0);
                if ring.submission().push(&sqe).is_err() {
                    drop(ring);
                    self.completions.complete(slot, Err(BdevError::NoResources));
                    return Some(fut);
                }
            }
        }
        self.in_flight.set(self.in_flight.get() + 1);
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        Some(fut)
    }

    /// Queues the operation, waiting for ring space if the ring is at its limit; a read's
    /// data goes to `out` when it completes.
    fn submit_op<'a>(&'a self, op: Op, buf: Option<IoBuf>, out: Option<CopyOut<'a>>) -> IoFuture<'a> {
        let mut buf = buf;
        if let Some(f) = self.push(op, &mut buf) {
            return match out {
                Some(out) => IoFuture::SlotInto(f, out),
                None => IoFuture::Slot(f),
            };
        }
        IoFuture::boxed(async move {
            loop {
                reactor::yield_now().await;
                if let Some(f) = self.push(op, &mut buf) {
                    let f = match out {
                        Some(out) => IoFuture::SlotInto(f, out),
                        None => IoFuture::Slot(f),
                    };
                    return f.await;
                }
            }
        })
    }
}

/// One ring operation, by what it does to the file (offsets in bytes).
#[derive(Clone, Copy)]
enum Op {
    Read(u64),
    Write(u64),
    Fsync,
    PunchHole { offset: u64, len: u64 },
}

impl Poller for UringChannel {
    fn poll(&self) -> usize {
        let mut ring = self.ring.borrow_mut();
        let mut work = 0;
        if self.unsubmitted.get() > 0 {
            match ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => log::error!("io_uring submit failed: {e}"),
            }
            self.unsubmitted.set(0);
            work += 1;
        }
        let mut done: [(u64, i32); 64] = [(0, 0); 64];
        loop {
            let mut n = 0;
            for cqe in ring.completion().take(done.len()) {
                done[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            if n == 0 {
                break;
            }
            work += n;
            for &(ud, res) in &done[..n] {
                self.in_flight.set(self.in_flight.get() - 1);
                let (slot, raw) = ((ud & 0xFFFF_FFFF) as usize, (ud >> 32) as u32);
                let (expected, write) = (raw & !WRITE, raw & WRITE != 0);
                let r: IoResult = if res < 0 {
                    Err(BdevError::Os(-res))
                } else if expected != 0 && (res as u32) < expected {
                    // A short write: the file system filled (the rest would get ENOSPC). A
                    // short read happens only at end of file: the file shrank under us.
                    Err(BdevError::Os(if write { libc::ENOSPC } else { libc::EIO }))
                } else {
                    Ok(())
                };
                self.completions.complete(slot, r);
            }
        }
        work
    }

    fn busy(&self) -> bool {
        self.in_flight.get() > 0
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        if let Some(efd) = &self.eventfd {
            reactor::try_current().map(|c| c.io().map(|io| io.deregister_wake_only(efd.as_raw_fd())));
        }
    }
}

/// Removes the channel's poller when the per-core cache drops the channel.
struct ChannelHandle(Rc<UringChannel>);

impl Drop for ChannelHandle {
    fn drop(&mut self) {
        if let Some(id) = self.0.poller_id.take() {
            // Wait for what is in flight: the kernel may still write into its buffers.
            while self.0.busy() {
                self.0.poll();
            }
            reactor::try_current().map(|c| c.remove_poller(id));
        }
    }
}

impl IoChannel for ChannelHandle {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let ch = &*self.0;
        match io {
            // The kernel gets a pool buffer that the completion slot owns, never the caller's
            // memory (see `crate::bdev::completion`): one copy per I/O buys cancellation that
            // cannot free memory under the kernel, and O_DIRECT alignment for any caller.
            Io::Read { offset_blocks, num_blocks, bufs } => {
                let buf = IoBuf::alloc((num_blocks * ch.block_size) as usize);
                ch.submit_op(Op::Read(offset_blocks * ch.block_size), Some(buf), Some(CopyOut::new(bufs, 0)))
            }
            Io::Write { offset_blocks, num_blocks, bufs } => {
                let mut buf = IoBuf::alloc((num_blocks * ch.block_size) as usize);
                gather(bufs, 0, &mut buf);
                ch.submit_op(Op::Write(offset_blocks * ch.block_size), Some(buf), None)
            }
            Io::Flush => ch.submit_op(Op::Fsync, None, None),
            Io::Unmap { offset_blocks, num_blocks } | Io::WriteZeroes { offset_blocks, num_blocks } => {
                let offset = offset_blocks * ch.block_size;
                let len = num_blocks * ch.block_size;
                if ch.block_device {
                    // Discard and zero-out of block devices are ioctls; they are rare (mkfs,
                    // trim) and worth one synchronous call rather than a thread pool.
                    let req = if matches!(io, Io::Unmap { .. }) {
                        0x1277 /* BLKDISCARD */
                    } else {
                        0x127f /* BLKZEROOUT */
                    };
                    let range = [offset, len];
                    // SAFETY: both ioctls read a [u64; 2] range.
                    let r = unsafe { libc::ioctl(ch.fd, req, range.as_ptr()) };
                    return IoFuture::ready(if r == 0 {
                        Ok(())
                    } else {
                        Err(BdevError::Os(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)))
                    });
                }
                ch.submit_op(Op::PunchHole { offset, len }, None, None)
            }
        }
    }
}

impl Bdev for UringBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, _io: IoType) -> bool {
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(ChannelHandle(UringChannel::new(self)?)))
    }
    fn driver_specific(&self) -> Value {
        json!({ "uring": { "filename": self.path.display().to_string(), "direct_io": self.direct, "block_device": self.block_device } })
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        let mut p = json!({ "name": self.name(), "filename": self.filename, "block_size": self.block_size(), "uuid": self.uuid().to_string() });
        if let Some(mb) = self.size_mb {
            p["size_mb"] = json!(mb);
        }
        Some(("bdev_uring_create", p))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::{BdevRegistry, Channel};
    use crate::reactor::{PollMode, ReactorOptions, Reactors};
    use std::future::Future;
    use std::io::IoSlice;
    use std::time::Duration;

    #[test]
    fn reads_writes_vectors_and_holes_through_a_real_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.img");
        let b = UringBdev::open("u0", "u.img", &path, None, Some(4), None).unwrap();
        assert_eq!(b.num_blocks(), 4 * 2048);
        let reg = BdevRegistry::new(1);
        let e = reg.register(Arc::new(b)).unwrap();
        let r = Reactors::start(&ReactorOptions { cpus: vec![0], poll_mode: PollMode::Adaptive, idle_us: 50, pin: false }).unwrap();
        let ok = r
            .handle()
            .call_async(0, Duration::from_secs(10), move || async move {
                let ch = Channel::get(&e).unwrap();
                let mut a = IoBuf::alloc(4096);
                a.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 253) as u8);
                ch.write_buf(8, &a).await.unwrap();
                // Unaligned heap memory goes through a bounce buffer.
                let v: Vec<u8> = vec![7u8; 512];
                let w: Vec<u8> = vec![9u8; 1024];
                ch.write(100, &[IoSlice::new(&v), IoSlice::new(&w)]).await.unwrap();
                let mut back = IoBuf::alloc(4096);
                ch.read_buf(8, &mut back).await.unwrap();
                assert_eq!(&back[..], &a[..]);
                let mut x = vec![0u8; 1536];
                ch.read_buf(100, &mut x).await.unwrap();
                assert!(x[..512].iter().all(|&b| b == 7) && x[512..].iter().all(|&b| b == 9));
                ch.write_zeroes(8, 4).await.unwrap();
                ch.read_buf(8, &mut back).await.unwrap();
                assert!(back[..2048].iter().all(|&b| b == 0));
                assert_eq!(&back[2048..], &a[2048..]);
                ch.flush().await.unwrap();
                true
            })
            .unwrap();
        assert!(ok);
        r.stop();
    }

    #[test]
    fn a_dropped_read_returns_at_once_and_its_buffer_only_after_the_completion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.img");
        std::fs::write(&path, vec![0xA5u8; 1 << 20]).unwrap();
        let b = UringBdev::open("u0", "u.img", &path, None, None, None).unwrap();
        let reg = BdevRegistry::new(1);
        let e = reg.register(Arc::new(b)).unwrap();
        let cores = crate::reactor::ManualCores::new(1);
        cores.enter(0, || {
            let ch = Channel::get(&e).unwrap();
            let slots = Completions::current();
            // 64 KiB: a size class nothing else on this core uses.
            const LEN: usize = 64 << 10;
            let free_before = crate::bdev::pool_free_buffers(LEN);
            let mut dst = vec![0u8; LEN];
            {
                let mut read = Box::pin(ch.read_buf(0, &mut dst));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                assert!(read.as_mut().poll(&mut cx).is_pending(), "the read is queued on the ring");
                assert_eq!(slots.outstanding(), 1);
                // The core's pollers are not run here: the drop must not wait for the kernel.
            }
            assert_eq!(slots.outstanding(), 1, "the drop returned before the completion arrived (it did not run the pollers)");
            assert_eq!(crate::bdev::pool_free_buffers(LEN), free_before, "the read's buffer stays with the kernel until its completion");
            // The caller's memory is its own again at once: the kernel never had it.
            dst.fill(1);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while slots.outstanding() > 0 {
                assert!(std::time::Instant::now() < deadline, "the orphaned read never completed");
                crate::reactor::with_core(|c| c.run_pollers());
            }
            assert_eq!(crate::bdev::pool_free_buffers(LEN), free_before + 1, "the completion returned the buffer to the pool");
            assert!(dst.iter().all(|&x| x == 1), "the completion wrote nothing into the caller's memory");
            // The channel still works, and nothing stayed behind.
            let mut back = vec![0u8; 4096];
            let mut read = Box::pin(ch.read_buf(8, &mut back));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let r = loop {
                if let std::task::Poll::Ready(r) = read.as_mut().poll(&mut cx) {
                    break r;
                }
                crate::reactor::with_core(|c| c.run_pollers());
            };
            drop(read);
            r.unwrap();
            assert!(back.iter().all(|&x| x == 0xA5));
            assert_eq!(slots.outstanding(), 0);
        });
    }
}
