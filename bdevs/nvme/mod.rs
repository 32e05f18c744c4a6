//! `nvme`: an NVMe namespace driven from userspace the way a kernel-bypass target drives it,
//! without unbinding the drive: NVMe commands go to the namespace's generic character device
//! (`/dev/ngXnY`) through io_uring passthrough (`IORING_OP_URING_CMD`, 128-byte SQEs, 32-byte
//! CQEs), one ring per reactor core (the core's queue pair), polled completions
//! (`IORING_SETUP_IOPOLL`) when the driver has poll queues, interrupt-driven completions reaped
//! by the poller otherwise, and the core's buffer pool registered as fixed buffers.
//!
//! On a regular block device or file (no `/dev/ng*`), the bdev falls back to the `uring`
//! module's path, so users without passthrough still get a working target.

pub mod identify;
pub mod rpc;
pub mod tcp;

use crate::bdev::{gather, scatter, Bdev, BdevError, BdevProps, CompletionFuture, Completions, CopyOut, Io, IoBuf, IoChannel, IoFuture, IoResult, IoType};
use crate::bdevs::uring::UringBdev;
use crate::reactor::{self, Poller};
use identify::Identity;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use uuid::Uuid;

/// _IOWR('N', 0x80, struct nvme_uring_cmd)
const NVME_URING_CMD_IO: u32 = 0xC048_4E80;
const RING_ENTRIES: u32 = 256;
const MAX_IN_FLIGHT: usize = 2 * RING_ENTRIES as usize;
/// Most blocks one Read/Write/Write Zeroes carries (NLB is a 16-bit field).
const MAX_NLB: u64 = 1 << 16;
/// Ranges of one Dataset Management command.
const MAX_DSM_RANGES: usize = 256;

const OP_FLUSH: u8 = 0x00;
const OP_WRITE: u8 = 0x01;
const OP_READ: u8 = 0x02;
const OP_WRITE_ZEROES: u8 = 0x08;
const OP_DSM: u8 = 0x09;

/// How completions are reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    Polled,
    Interrupt,
}

struct Passthru {
    file: Arc<File>,
    ident: Identity,
    /// The drive stopped answering (or vanished): fail I/O at once.
    offline: Arc<AtomicBool>,
    /// Whether the nvme driver has poll queues (then rings use IOPOLL).
    poll_queues: bool,
}

enum Backend {
    Passthru(Passthru),
    Uring(UringBdev),
}

pub struct NvmeBdev {
    props: BdevProps,
    filename: String,
    backend: Backend,
    /// (controller name, PCI address) when made by `bdev_nvme_attach_controller`.
    attached: Option<(String, String)>,
}

/// Whether `path` is an NVMe generic character device (`/dev/ngXnY`).
pub fn is_generic_char_device(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.file_type().is_char_device()).unwrap_or(false)
        && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ng") && n.contains('n'))
}

/// The block layer's limits for passthrough transfers on this namespace, in bytes: a user
/// buffer maps to at most `max_segments` pages (scattered pages do not merge), and to at most
/// `max_hw_sectors_kb`.
fn queue_transfer_limit(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?.strip_prefix("ng")?;
    let q = PathBuf::from(format!("/sys/block/nvme{name}/queue"));
    let read = |f: &str| std::fs::read_to_string(q.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let segs = read("max_segments").map(|n| n.saturating_sub(1).max(1) * 4096);
    let hw = read("max_hw_sectors_kb").map(|kb| kb * 1024);
    match (segs, hw) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn driver_has_poll_queues() -> bool {
    std::fs::read_to_string("/sys/module/nvme/parameters/poll_queues").ok().and_then(|s| s.trim().parse::<u32>().ok()).is_some_and(|n| n > 0)
}

/// `(major, minor)` of a kernel release string such as `6.1.0-56-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Why passthrough completions are interrupt-driven on this machine, or None if they can be
/// polled. Before 6.5 the kernel polled a passthrough command through its bio, which the
/// completion may already have freed: a Debian 6.1 guest crashed in bio_poll under our polled
/// ring (tests/nvme_bdev). 6.5 polls the request instead.
fn iopoll_refusal() -> Option<String> {
    if !driver_has_poll_queues() {
        return Some("the nvme driver has no poll queues: load it with poll_queues=N for IOPOLL".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= (6, 5) => None,
        _ => Some(format!("kernel {} is older than 6.5, whose passthrough polling can crash", release.trim())),
    }
}

const PRODUCT_NAME: &str = "NVMe disk";

impl NvmeBdev {
    /// Opens `path`: passthrough on a generic character device, the uring path on a block
    /// device or file.
    pub fn open(name: &str, filename: &str, path: &Path, attached: Option<(String, String)>) -> Result<NvmeBdev, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if meta.file_type().is_char_device() {
            if !is_generic_char_device(path) {
                return Err(format!("{} is a character device but not an NVMe generic device (/dev/ngXnY)", path.display()));
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let mut ident = identify::identify(&file).map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(limit) = queue_transfer_limit(path) {
                ident.max_transfer = Some(ident.max_transfer.map_or(limit, |m| m.min(limit)));
            }
            let uuid = if ident.nguid != [0; 16] { Uuid::from_bytes(ident.nguid) } else { Uuid::new_v4() };
            let refusal = iopoll_refusal();
            let poll_queues = refusal.is_none();
            log::info!(
                "{name}: {} {} fw {} nsid {} {} x {} B, completions {}",
                ident.model,
                ident.serial,
                ident.firmware,
                ident.nsid,
                ident.num_blocks,
                ident.block_size,
                match &refusal {
                    None => "polled (IOPOLL)".to_string(),
                    Some(why) => format!("interrupt-driven ({why})"),
                }
            );
            let props = BdevProps::new(name, PRODUCT_NAME, ident.block_size, ident.num_blocks, uuid);
            let backend = Backend::Passthru(Passthru { file: Arc::new(file), ident, offline: Arc::new(AtomicBool::new(false)), poll_queues });
            return Ok(NvmeBdev { props, filename: filename.to_string(), backend, attached });
        }
        let u = UringBdev::open(name, filename, path, None, None, None)?;
        log::info!("{name}: {} is not an NVMe generic device; using the uring path (no passthrough)", path.display());
        let props = BdevProps::over(u.props(), name, PRODUCT_NAME, u.uuid());
        Ok(NvmeBdev { props, filename: filename.to_string(), backend: Backend::Uring(u), attached })
    }
}

/// `struct nvme_uring_cmd` (72 bytes) in the 80-byte command area of a 128-byte SQE.
fn command(opcode: u8, nsid: u32, addr: u64, data_len: u32, cdw: [u32; 6]) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[0] = opcode;
    c[4..8].copy_from_slice(&nsid.to_le_bytes());
    c[24..32].copy_from_slice(&addr.to_le_bytes());
    c[36..40].copy_from_slice(&data_len.to_le_bytes());
    for (i, d) in cdw.iter().enumerate() {
        c[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
    }
    c
}

/// The probe's user_data: never a completion slot (a late answer is skipped by the poller).
const PROBE_USER_DATA: u64 = u64::MAX;

/// Reads block 0 once through a fixed buffer, synchronously, to learn whether the kernel
/// accepts fixed buffers for passthrough commands (Linux 6.2+). Runs once per core, at channel
/// creation.
fn probe_fixed(ring: &mut IoUring<squeue::Entry128, cqueue::Entry32>, p: &Passthru) -> bool {
    let mut buf = IoBuf::alloc(p.ident.block_size as usize);
    if !buf.is_pooled() {
        return false;
    }
    let cmd = command(OP_READ, p.ident.nsid, buf.as_mut_ptr() as u64, buf.len() as u32, [0, 0, 0, 0, 0, 0]);
    let sqe = opcode::UringCmd80::new(types::Fixed(0), NVME_URING_CMD_IO).cmd(cmd).buf_index(Some(0)).build().user_data(PROBE_USER_DATA);
    // SAFETY: `buf` lives until the synchronous wait below returns its completion.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return false;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if ring.submit_and_wait(1).is_err() {
            return false;
        }
        if let Some(c) = ring.completion().next() {
            return c.result() == 0;
        }
    }
    // The command is still in flight and owns `buf`: keep the buffer alive forever rather
    // than let the device write into freed memory (a drive that hangs at start is broken).
    std::mem::forget(buf);
    false
}

/// Maps a passthrough completion to a bdev result: negative = errno, positive = NVMe status
/// (SC in bits 0-7, SCT in bits 8-10), passed through unchanged to NVMe hosts.
fn completion_result(res: i32) -> IoResult {
    match res {
        0 => Ok(()),
        r if r > 0 => Err(BdevError::Nvme { sct: ((r >> 8) & 0x7) as u8, sc: (r & 0xff) as u8 }),
        r if -r == libc::ENODEV || -r == libc::ENXIO || -r == libc::ESHUTDOWN => Err(BdevError::Offline),
        r => Err(BdevError::Os(-r)),
    }
}

struct PassthruChannel {
    ring: RefCell<IoUring<squeue::Entry128, cqueue::Entry32>>,
    mode: Completion,
    nsid: u32,
    block_size: u64,
    /// Blocks per Read/Write command (MDTS and NLB limits).
    max_blocks: u64,
    fixed: Option<(usize, usize)>,
    /// Commands the kernel has not answered yet; each one's user_data is its completion slot.
    in_flight: Cell<usize>,
    unsubmitted: Cell<u32>,
    offline: Arc<AtomicBool>,
    eventfd: Option<OwnedFd>,
    poller_id: Cell<Option<u64>>,
    completions: Completions,
    _file: Arc<File>,
}

impl PassthruChannel {
    fn new(p: &Passthru) -> Result<Rc<PassthruChannel>, BdevError> {
        let os = |e: std::io::Error| BdevError::Os(e.raw_os_error().unwrap_or(libc::EIO));
        let build = |iopoll: bool| {
            let mut b = IoUring::<squeue::Entry128, cqueue::Entry32>::builder();
            if iopoll {
                b.setup_iopoll();
            }
            b.build(RING_ENTRIES)
        };
        let (ring, mode) = match p.poll_queues {
            true => match build(true) {
                Ok(r) => (r, Completion::Polled),
                Err(e) => {
                    log::warn!("IOPOLL ring refused ({e}); completions are interrupt-driven");
                    (build(false).map_err(os)?, Completion::Interrupt)
                }
            },
            false => (build(false).map_err(os)?, Completion::Interrupt),
        };
        let fd = p.file.as_raw_fd();
        ring.submitter().register_files(&[fd]).map_err(os)?;
        let mut fixed = crate::bdevs::uring::register_pool(&ring.submitter(), "nvme passthrough");
        let mut ring = ring;
        if fixed.is_some() && !probe_fixed(&mut ring, p) {
            log::info!(
                "nvme namespace {}: the kernel takes no fixed buffers for passthrough commands (IORING_URING_CMD_FIXED); using plain buffers",
                p.ident.nsid
            );
            fixed = None;
        }
        let eventfd = if mode == Completion::Interrupt { crate::bdevs::uring::completion_eventfd(&ring.submitter()) } else { None };
        let mdts_blocks = p.ident.max_transfer.map(|b| (b / p.ident.block_size as u64).max(1)).unwrap_or(MAX_NLB);
        let ch = Rc::new(PassthruChannel {
            ring: RefCell::new(ring),
            mode,
            nsid: p.ident.nsid,
            block_size: p.ident.block_size as u64,
            max_blocks: mdts_blocks.min(MAX_NLB),
            fixed,
            in_flight: Cell::new(0),
            unsubmitted: Cell::new(0),
            offline: p.offline.clone(),
            eventfd,
            poller_id: Cell::new(None),
            completions: Completions::current(),
            _file: p.file.clone(),
        });
        let id = reactor::with_core(|c| c.add_poller(ch.clone()));
        ch.poller_id.set(Some(id));
        Ok(ch)
    }

    fn in_fixed(&self, ptr: *const u8, len: usize) -> bool {
        self.fixed.is_some_and(|(b, l)| ptr as usize >= b && ptr as usize + len <= b + l)
    }

    /// Queues one NVMe command (the poller submits the batch). `buf`, the only memory the
    /// command may name, moves into the completion slot, which keeps it until the kernel
    /// answers. None (and `buf` left in place) when the ring is at its limit.
    fn push(&self, cmd_op: u32, cmd: [u8; 80], buf: &mut Option<IoBuf>) -> Option<Result<CompletionFuture, BdevError>> {
        if self.offline.load(Ordering::Relaxed) {
            return Some(Err(BdevError::Offline));
        }
        if self.in_flight.get() >= MAX_IN_FLIGHT {
            return None;
        }
        let fixed = buf.as_ref().is_some_and(|b| self.in_fixed(b.as_ptr(), b.len()));
        let (slot, fut) = match buf.take() {
            Some(b) => self.completions.alloc_owning(b),
            None => self.completions.alloc(),
        };
        let mut e = opcode::UringCmd80::new(types::Fixed(0), cmd_op).cmd(cmd);
        if fixed {
            e = e.buf_index(Some(0));
        }
        let sqe = e.build().user_data(slot as u64);
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the only data buffer the command names is the one its completion slot owns;
        // the slot releases it when the kernel's completion arrives, even if the future is
        // dropped before.
        let pushed = unsafe { ring.submission().push(&sqe).is_ok() || (ring.submit().is_ok() && ring.submission().push(&sqe).is_ok()) };
        if !pushed {
            drop(ring);
            self.completions.complete(slot, Err(BdevError::NoResources));
        } else {
            self.in_flight.set(self.in_flight.get() + 1);
            self.unsubmitted.set(self.unsubmitted.get() + 1);
        }
        Some(Ok(fut))
    }

    /// Runs one command, waiting for ring space if needed; returns its result and its buffer.
    async fn run_cmd(&self, cmd_op: u32, cmd: [u8; 80], buf: Option<IoBuf>) -> (IoResult, Option<IoBuf>) {
        let mut buf = buf;
        loop {
            match self.push(cmd_op, cmd, &mut buf) {
                Some(Ok(f)) => return f.owned().await,
                Some(Err(e)) => return (Err(e), buf),
                None => reactor::yield_now().await,
            }
        }
    }

    /// A Read or Write of `blocks` at `slba` through `buf` (blocks <= max_blocks).
    fn rw(&self, op: u8, slba: u64, blocks: u64, buf: &IoBuf) -> [u8; 80] {
        debug_assert!(blocks >= 1 && blocks <= self.max_blocks);
        command(op, self.nsid, buf.as_ptr() as u64, buf.len() as u32, [slba as u32, (slba >> 32) as u32, (blocks - 1) as u32, 0, 0, 0])
    }

    /// One command, boxed only when the ring is full; a read's data goes to `out` when it
    /// completes.
    fn start<'a>(&'a self, cmd: [u8; 80], buf: Option<IoBuf>, out: Option<CopyOut<'a>>) -> IoFuture<'a> {
        let mut buf = buf;
        match self.push(NVME_URING_CMD_IO, cmd, &mut buf) {
            Some(Ok(f)) => match out {
                Some(out) => IoFuture::SlotInto(f, out),
                None => IoFuture::Slot(f),
            },
            Some(Err(e)) => IoFuture::ready(Err(e)),
            None => IoFuture::boxed(async move {
                let (r, b) = self.run_cmd(NVME_URING_CMD_IO, cmd, buf).await;
                if let (Ok(()), Some(b), Some(mut out)) = (&r, b, out) {
                    out.copy_from(&b);
                }
                r
            }),
        }
    }

    /// Commands for a transfer of `blocks` at `slba`, split at the controller's transfer
    /// limit: (first block, count) of each.
    fn parts(&self, slba: u64, blocks: u64) -> impl Iterator<Item = (u64, u64)> {
        let max = self.max_blocks;
        (0..blocks.div_ceil(max)).map(move |i| (slba + i * max, (blocks - i * max).min(max)))
    }
}

impl Poller for PassthruChannel {
    fn poll(&self) -> usize {
        let mut ring = self.ring.borrow_mut();
        let mut work = 0;
        let inflight = self.in_flight.get() > 0;
        // An IOPOLL ring completes only when entered with GETEVENTS (submit() does that).
        if self.unsubmitted.get() > 0 || (self.mode == Completion::Polled && inflight) {
            if let Err(e) = ring.submit() {
                if !matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    log::error!("nvme passthrough submit failed: {e}");
                }
            }
            if self.unsubmitted.replace(0) > 0 {
                work += 1;
            }
        }
        let mut done = [(0u64, 0i32); 64];
        loop {
            let mut n = 0;
            for c in ring.completion().take(done.len()) {
                done[n] = (c.user_data(), c.result());
                n += 1;
            }
            if n == 0 {
                return work;
            }
            work += n;
            for &(ud, res) in &done[..n] {
                if ud == PROBE_USER_DATA {
                    continue;
                }
                self.in_flight.set(self.in_flight.get() - 1);
                let r = completion_result(res);
                if r == Err(BdevError::Offline) && !self.offline.swap(true, Ordering::SeqCst) {
                    log::error!("nvme namespace {} stopped answering: the bdev is offline", self.nsid);
                }
                self.completions.complete(ud as usize, r);
            }
        }
    }

    fn busy(&self) -> bool {
        self.in_flight.get() > 0
    }

    fn needs_polling(&self) -> bool {
        self.mode == Completion::Polled && self.busy()
    }
}

/// Unregisters the poller when the core's channel cache drops the channel.
struct PassthruHandle(Rc<PassthruChannel>);

impl Drop for PassthruHandle {
    fn drop(&mut self) {
        if let Some(id) = self.0.poller_id.take() {
            while self.0.busy() {
                self.0.poll();
            }
            if let Some(efd) = &self.0.eventfd {
                reactor::try_current().map(|c| c.io().map(|io| io.deregister_wake_only(efd.as_raw_fd())));
            }
            reactor::try_current().map(|c| c.remove_poller(id));
        }
    }
}

impl IoChannel for PassthruHandle {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let ch = &*self.0;
        let bs = ch.block_size;
        match io {
            // Commands name only pool buffers that their completion slots own, never the
            // caller's memory (see `crate::bdev::completion`).
            Io::Read { offset_blocks, num_blocks, bufs } => {
                if num_blocks <= ch.max_blocks {
                    let buf = IoBuf::alloc((num_blocks * bs) as usize);
                    let cmd = ch.rw(OP_READ, offset_blocks, num_blocks, &buf);
                    return ch.start(cmd, Some(buf), Some(CopyOut::new(bufs, 0)));
                }
                IoFuture::boxed(async move {
                    let parts = ch.parts(offset_blocks, num_blocks).map(|(slba, n)| {
                        let buf = IoBuf::alloc((n * bs) as usize);
                        let cmd = ch.rw(OP_READ, slba, n, &buf);
                        async move { (slba, ch.run_cmd(NVME_URING_CMD_IO, cmd, Some(buf)).await) }
                    });
                    for (slba, (r, buf)) in futures::future::join_all(parts).await {
                        r?;
                        if let Some(b) = buf {
                            scatter(bufs, ((slba - offset_blocks) * bs) as usize, &b);
                        }
                    }
                    Ok(())
                })
            }
            Io::Write { offset_blocks, num_blocks, bufs } => {
                if num_blocks <= ch.max_blocks {
                    let mut buf = IoBuf::alloc((num_blocks * bs) as usize);
                    gather(bufs, 0, &mut buf);
                    let cmd = ch.rw(OP_WRITE, offset_blocks, num_blocks, &buf);
                    return ch.start(cmd, Some(buf), None);
                }
                IoFuture::boxed(async move {
                    let parts = ch.parts(offset_blocks, num_blocks).map(|(slba, n)| {
                        let mut buf = IoBuf::alloc((n * bs) as usize);
                        gather(bufs, ((slba - offset_blocks) * bs) as usize, &mut buf);
                        let cmd = ch.rw(OP_WRITE, slba, n, &buf);
                        async move { ch.run_cmd(NVME_URING_CMD_IO, cmd, Some(buf)).await.0 }
                    });
                    futures::future::try_join_all(parts).await.map(|_| ())
                })
            }
            Io::Flush => ch.start(command(OP_FLUSH, ch.nsid, 0, 0, [0; 6]), None, None),
            Io::WriteZeroes { offset_blocks, num_blocks } => IoFuture::boxed(async move {
                let mut done = 0;
                while done < num_blocks {
                    let n = (num_blocks - done).min(MAX_NLB);
                    let slba = offset_blocks + done;
                    let cmd = command(OP_WRITE_ZEROES, ch.nsid, 0, 0, [slba as u32, (slba >> 32) as u32, (n - 1) as u32, 0, 0, 0]);
                    ch.run_cmd(NVME_URING_CMD_IO, cmd, None).await.0?;
                    done += n;
                }
                Ok(())
            }),
            Io::Unmap { offset_blocks, num_blocks } => IoFuture::boxed(async move {
                // Dataset Management, deallocate: up to 256 ranges of up to 2^32-1 blocks.
                let mut left = num_blocks;
                let mut slba = offset_blocks;
                while left > 0 {
                    let mut ranges = IoBuf::zeroed(MAX_DSM_RANGES * 16);
                    let mut nr = 0;
                    while left > 0 && nr < MAX_DSM_RANGES {
                        let n = left.min(u32::MAX as u64);
                        let r = &mut ranges[nr * 16..nr * 16 + 16];
                        r[4..8].copy_from_slice(&(n as u32).to_le_bytes());
                        r[8..16].copy_from_slice(&slba.to_le_bytes());
                        slba += n;
                        left -= n;
                        nr += 1;
                    }
                    ranges.set_len(nr * 16);
                    let cmd = command(OP_DSM, ch.nsid, ranges.as_ptr() as u64, ranges.len() as u32, [(nr - 1) as u32, 1 << 2, 0, 0, 0, 0]);
                    ch.run_cmd(NVME_URING_CMD_IO, cmd, Some(ranges)).await.0?;
                }
                Ok(())
            }),
        }
    }
}

impl Bdev for NvmeBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, io: IoType) -> bool {
        match &self.backend {
            Backend::Passthru(p) => match io {
                IoType::Read | IoType::Write | IoType::WriteZeroes => true,
                IoType::Flush => p.ident.volatile_write_cache,
                IoType::Unmap => p.ident.deallocate,
            },
            Backend::Uring(u) => u.supports(io),
        }
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        match &self.backend {
            Backend::Passthru(p) => {
                if p.offline.load(Ordering::Relaxed) {
                    return Err(BdevError::Offline);
                }
                Ok(Rc::new(PassthruHandle(PassthruChannel::new(p)?)))
            }
            Backend::Uring(u) => u.open_channel(),
        }
    }
    fn driver_specific(&self) -> Value {
        match &self.backend {
            Backend::Passthru(p) => json!({ "nvme": [{
                "filename": self.filename,
                "passthrough": true,
                "completions": if p.poll_queues { "polled" } else { "interrupt" },
                "offline": p.offline.load(Ordering::Relaxed),
                "ctrlr_data": { "model_number": p.ident.model, "serial_number": p.ident.serial, "firmware_revision": p.ident.firmware, "vendor_id": format!("{:#06x}", p.ident.vendor_id) },
                "ns_data": { "id": p.ident.nsid },
                "max_transfer_bytes": p.ident.max_transfer,
                "pci_address": self.attached.as_ref().map(|a| a.1.clone()),
            }]}),
            Backend::Uring(_) => json!({ "nvme": [{ "filename": self.filename, "passthrough": false, "fallback": "uring" }] }),
        }
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        match &self.attached {
            // One attach call recreates every namespace of the controller: emit it once, on ns 1.
            Some((ctrl, traddr)) => {
                self.name().ends_with("n1").then(|| ("bdev_nvme_attach_controller", json!({ "name": ctrl, "trtype": "pcie", "traddr": traddr })))
            }
            None => Some(("bdev_nvme_passthru_create", json!({ "name": self.name(), "filename": self.filename }))),
        }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Namespaces of the NVMe controller at PCI address `traddr`: (nsid, generic device path).
pub fn controller_namespaces(traddr: &str) -> Result<Vec<(u32, PathBuf)>, String> {
    let dir = Path::new("/sys/bus/pci/devices").join(traddr).join("nvme");
    let ctrls = std::fs::read_dir(&dir).map_err(|e| format!("no NVMe controller at PCI address {traddr} ({}: {e})", dir.display()))?;
    let mut out = Vec::new();
    for c in ctrls.flatten() {
        let cname = c.file_name().to_string_lossy().to_string();
        let Some(idx) = cname.strip_prefix("nvme") else { continue };
        for ns in std::fs::read_dir(c.path()).into_iter().flatten().flatten() {
            let n = ns.file_name().to_string_lossy().to_string();
            // Namespaces appear as nvme<C>n<N> (or nvme<S>c<C>n<N> with multipath).
            let Some(nsid) = n.rsplit_once('n').and_then(|(_, id)| id.parse::<u32>().ok()) else { continue };
            if !n.starts_with("nvme") || !n.contains('n') {
                continue;
            }
            let ng = PathBuf::from(format!("/dev/ng{idx}n{nsid}"));
            if ng.exists() {
                out.push((nsid, ng));
            }
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(format!("the NVMe controller at {traddr} has no namespace with a generic device (/dev/ng*)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(kernel_version("6.1.0-56-amd64\n"), Some((6, 1)));
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.10.0"), Some((5, 10)));
        assert_eq!(kernel_version(""), None);
        assert!(kernel_version("6.4.2").unwrap() < (6, 5) && kernel_version("6.10.1").unwrap() >= (6, 5));
    }

    #[test]
    fn command_layout_matches_nvme_uring_cmd() {
        let c = command(OP_READ, 1, 0x1122_3344_5566_7788, 4096, [10, 0, 7, 0, 0, 0]);
        assert_eq!(c[0], OP_READ);
        assert_eq!(u32::from_le_bytes(c[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(c[24..32].try_into().unwrap()), 0x1122_3344_5566_7788);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 4096);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 10);
        assert_eq!(u32::from_le_bytes(c[48..52].try_into().unwrap()), 7);
    }

    #[test]
    fn nvme_status_passes_through() {
        assert_eq!(completion_result(0), Ok(()));
        assert_eq!(completion_result(0x0280 | 0x81), Err(BdevError::Nvme { sct: 2, sc: 0x81 }));
        assert_eq!(completion_result(-libc::ENODEV), Err(BdevError::Offline));
        assert_eq!(completion_result(-libc::EIO), Err(BdevError::Os(libc::EIO)));
    }

    #[test]
    fn refuses_a_char_device_that_is_not_nvme() {
        let e = NvmeBdev::open("x", "/dev/null", Path::new("/dev/null"), None).err().unwrap();
        assert!(e.contains("not an NVMe generic device"), "{e}");
    }
}
