//! One NVMe/TCP I/O queue pair, owned by one reactor core and polled by it (SPDK's
//! `spdk_nvme_qpair` of the TCP transport). The socket is non-blocking; the core's poller sends
//! what commands queued, reads what arrived and completes commands through the core's
//! completion slots.
//!
//! Connection loss: the queue goes *down*: its commands stay in the table (their buffers in
//! their slots) and new ones wait, until the controller reconnects and [`IoQueue::reset`] gives
//! the queue a new socket (every waiting command is sent again), or the controller gives up
//! waiting and [`IoQueue::fail_pending`] ends them with `Offline`.
//!
//! Command timeouts (`bdev_nvme_set_options {timeout_us}`): the poller looks at the oldest
//! command a few times per timeout (not per I/O); one unanswered for longer means a hung
//! controller, whose socket stays open and whose keep-alive may take seconds to notice. With
//! `action_on_timeout` `reset` the queue goes down as if the connection were lost, telling the
//! controller how long that command waited so that `fast_io_fail_timeout_sec` counts from
//! then; with `none` it is logged once per stalled command.
//!
//! Data placement: a command's data lives in a pool buffer that its completion slot owns until
//! the command ends (the slot frees it if the caller's future is gone), the queue only keeps
//! the buffer's address. C2HData payloads are copied from the receive buffer into it (one read
//! brings many PDUs: cheaper than a read per payload for small transfers). Write data, in the
//! capsule or in H2CData PDUs answering R2Ts, goes to the socket straight from it: the send
//! queue holds headers and digests in its own buffer and the data by reference, written with
//! one `writev` (SPDK's host does the same). The caller's buffers are never named here.

use super::options::Timeouts;
use crate::bdev::{BdevError, CompletionFuture, Completions, IoBuf, IoResult};
use crate::nvmf::initiator::HostStream;
use crate::nvmf::pdu::{self, CommonHeader, DataHeader, R2t, RxLimits};
use crate::nvmf::spec::{sgl, Cqe, Sqe, Status};
use crate::reactor::{monotonic_ns, Poller};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::sync::Arc;

/// Largest transfer of one command this host issues (the controller's MDTS may lower it): the
/// receive buffer holds one whole C2HData PDU of this size.
pub const MAX_TRANSFER: usize = 1 << 20;
const RX_CAP: usize = MAX_TRANSFER + 16 * 1024;
/// Pieces of the send queue one `writev` takes at most (far below the kernel's IOV_MAX).
const MAX_IOV: usize = 64;

/// Why a queue stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("connection lost: {0}")]
    Io(String),
    #[error("connection closed by the controller")]
    Closed,
    #[error("protocol error from the controller: {0}")]
    Protocol(String),
    /// A command (the oldest) went unanswered for `waited`, past the command timeout: the
    /// controller hangs. The recovery's clock counts from when it was sent.
    #[error("a command went unanswered for {waited:?} (timeout_us): the controller hangs")]
    Timeout { waited: std::time::Duration },
}

impl QueueError {
    /// How long before it was noticed the controller stopped answering (zero for a connection
    /// that broke: that is noticed at once).
    pub fn unanswered_for(&self) -> std::time::Duration {
        match self {
            QueueError::Timeout { waited } => *waited,
            _ => std::time::Duration::ZERO,
        }
    }
}

/// What a connected queue negotiated (ICResp, Identify Controller).
#[derive(Debug, Clone, Copy)]
pub struct QueueParams {
    pub hdgst: bool,
    pub ddgst: bool,
    pub maxh2cdata: u32,
    /// Largest in-capsule data of a command (IOCCSZ).
    pub max_inline: usize,
    /// Queue entries (commands in flight at most).
    pub depth: u16,
    /// The host's command timeouts (not negotiated: the controller's attach options).
    pub timeouts: Timeouts,
}

/// Maps an NVMe completion status to the bdev layer's result.
pub fn status_result(st: Status) -> IoResult {
    if st.is_success() {
        Ok(())
    } else {
        Err(BdevError::Nvme { sct: st.sct, sc: st.sc })
    }
}

struct Req {
    busy: bool,
    /// The command as sent (without its CID): sent again after a reconnect.
    sqe: Sqe,
    slot: usize,
    /// The command's data buffer (owned by its completion slot) and its length.
    data: *mut u8,
    len: usize,
    /// Whether data flows controller to host.
    data_in: bool,
    /// When it was (last) sent, on the monotonic clock; read only with a command timeout.
    sent_ns: u64,
    /// Pieces of the send queue that point into `data` (see [`Piece::Data`]).
    unsent: u16,
}

/// A piece of the send queue.
#[derive(Clone, Copy)]
enum Piece {
    /// `len` bytes of the send buffer at `off`: PDU headers, digests, copied data.
    Tx { off: usize, len: usize },
    /// `len` bytes of command `cid`'s data buffer at `ptr`, written to the socket from there.
    /// Valid while the command is in the table: [`Inner::detach_data`] copies the bytes into
    /// the send buffer before a command leaves it with pieces still queued.
    Data { ptr: *const u8, len: usize, cid: u16 },
}

impl Piece {
    fn len(&self) -> usize {
        match *self {
            Piece::Tx { len, .. } | Piece::Data { len, .. } => len,
        }
    }
}

struct Inner {
    stream: HostStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// The send buffer: what the pieces of type `Tx` point into.
    tx: Vec<u8>,
    /// What is to be written, in order.
    pieces: VecDeque<Piece>,
    /// Bytes of the front piece already written.
    sent: usize,
    /// Plain TCP: data is queued by reference and written with `writev`, and a short read
    /// means the socket is drained. Over TLS data is copied into the send buffer (a vector
    /// would cut its records small) and reads go on until one would block (a read hands out
    /// one record at a time).
    plain_tcp: bool,
    reqs: Vec<Req>,
    free: Vec<u16>,
}

impl Inner {
    /// Queues a copy of `b`.
    fn put(&mut self, b: &[u8]) {
        let off = self.tx.len();
        self.tx.extend_from_slice(b);
        match self.pieces.back_mut() {
            Some(Piece::Tx { off: o, len }) if *o + *len == off => *len += b.len(),
            _ => self.pieces.push_back(Piece::Tx { off, len: b.len() }),
        }
    }

    /// Queues `len` bytes of command `cid`'s data at `ptr` (inside its buffer).
    fn put_data(&mut self, cid: u16, ptr: *const u8, len: usize) {
        if !self.plain_tcp {
            // SAFETY: the caller names bytes inside the buffer of a command in the table.
            let b = unsafe { std::slice::from_raw_parts(ptr, len) };
            return self.put(b);
        }
        self.pieces.push_back(Piece::Data { ptr, len, cid });
        self.reqs[cid as usize].unsent += 1;
    }

    /// Command `cid` leaves the table while some of its data is still queued (a controller that
    /// answers before it has all the data): those bytes are copied into the send buffer so
    /// that the command's buffer can go back to its owner.
    fn detach_data(&mut self, cid: u16) {
        if self.reqs[cid as usize].unsent == 0 {
            return;
        }
        for i in 0..self.pieces.len() {
            if let Piece::Data { ptr, len, cid: c } = self.pieces[i] {
                if c == cid {
                    let off = self.tx.len();
                    // SAFETY: the command is still in the table: its buffer is alive.
                    self.tx.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) });
                    // Same length: `sent` stays right if this is the front piece.
                    self.pieces[i] = Piece::Tx { off, len };
                }
            }
        }
        self.reqs[cid as usize].unsent = 0;
    }

    /// Forgets everything queued (the connection is gone).
    fn clear_tx(&mut self) {
        self.tx.clear();
        self.pieces.clear();
        self.sent = 0;
        for r in &mut self.reqs {
            r.unsent = 0;
        }
    }

    /// `n` more bytes were written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.pieces.front().expect("the socket took no more than was queued");
            let rest = front.len() - self.sent;
            if n < rest {
                self.sent += n;
                return;
            }
            n -= rest;
            self.sent = 0;
            if let Some(Piece::Data { cid, .. }) = self.pieces.pop_front() {
                self.reqs[cid as usize].unsent -= 1;
            }
        }
    }
}

/// Counters a queue updates for its controller (shared by all cores).
pub trait QueueObserver: Send + Sync {
    fn io_error(&self);
    fn queue_failed(&self, why: &QueueError);
}

pub struct IoQueue {
    inner: RefCell<Inner>,
    p: Cell<QueueParams>,
    completions: Completions,
    /// The connection is gone: commands wait for a reset.
    down: Cell<bool>,
    /// Commands fail at once (fast_io_fail_timeout_sec passed, or the controller is gone).
    failing: Cell<bool>,
    in_flight: Cell<usize>,
    /// When the poller next looks for a timed-out command.
    next_timeout_check_ns: Cell<u64>,
    /// The send time of the last command logged as timed out (`action_on_timeout: none`).
    logged_timeout: Cell<u64>,
    /// The completions one poll collects, kept between polls so that polling allocates
    /// nothing in steady state.
    done: Cell<Vec<(usize, IoResult)>>,
    pub(super) poller_id: Cell<Option<u64>>,
    observer: Arc<dyn QueueObserver>,
}

impl IoQueue {
    /// A queue over `stream` (connected: ICReq/ICResp and Fabrics Connect done). Call on the
    /// core that will own it.
    pub fn new(stream: HostStream, p: QueueParams, observer: Arc<dyn QueueObserver>) -> IoQueue {
        let n = p.depth.max(2) as usize;
        IoQueue {
            inner: RefCell::new(Inner {
                plain_tcp: matches!(stream, HostStream::Plain(_)),
                stream,
                rx: vec![0u8; RX_CAP],
                rx_start: 0,
                rx_end: 0,
                tx: Vec::with_capacity(64 * 1024),
                pieces: VecDeque::with_capacity(4 * n),
                sent: 0,
                reqs: (0..n)
                    .map(|_| Req { busy: false, sqe: Sqe::default(), slot: 0, data: std::ptr::null_mut(), len: 0, data_in: false, sent_ns: 0, unsent: 0 })
                    .collect(),
                free: (0..n as u16).rev().collect(),
            }),
            p: Cell::new(p),
            completions: Completions::current(),
            down: Cell::new(false),
            failing: Cell::new(false),
            in_flight: Cell::new(0),
            next_timeout_check_ns: Cell::new(0),
            logged_timeout: Cell::new(0),
            done: Cell::new(Vec::with_capacity(n)),
            poller_id: Cell::new(None),
            observer,
        }
    }

    /// Whether new commands wait for a reconnect.
    pub fn is_down(&self) -> bool {
        self.down.get()
    }

    /// Whether commands fail at once (see [`IoQueue::fail_pending`]).
    pub fn is_failing(&self) -> bool {
        self.failing.get()
    }

    fn limits(&self) -> RxLimits {
        let p = self.p.get();
        RxLimits { role: pdu::Role::Host, ic_done: true, hdgst: p.hdgst, ddgst: p.ddgst, max_capsule_data: 0, max_data_pdu: MAX_TRANSFER as u32 }
    }

    /// Queues `sqe` with its data buffer (`data_in`: the controller fills it). The buffer moves
    /// into the completion slot. None (and `buf` left in place) when every entry is in use or
    /// the connection is down (the caller waits).
    pub fn push(&self, sqe: Sqe, buf: &mut Option<IoBuf>, data_in: bool) -> Option<Result<CompletionFuture, BdevError>> {
        if self.failing.get() {
            self.observer.io_error();
            return Some(Err(BdevError::Offline));
        }
        if self.down.get() {
            return None;
        }
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let cid = inner.free.pop()?;
        let (ptr, len) = buf.as_mut().map_or((std::ptr::null_mut(), 0), |b| (b.as_mut_ptr(), b.len()));
        assert!(len <= MAX_TRANSFER, "a command's transfer is split at MAX_TRANSFER by the channel");
        let (slot, fut) = match buf.take() {
            Some(b) => self.completions.alloc_owning(b),
            None => self.completions.alloc(),
        };
        let sent_ns = if self.p.get().timeouts.io.is_some() { monotonic_ns() } else { 0 };
        inner.reqs[cid as usize] = Req { busy: true, sqe, slot, data: ptr, len, data_in, sent_ns, unsent: 0 };
        self.encode(inner, cid);
        self.in_flight.set(self.in_flight.get() + 1);
        Some(Ok(fut))
    }

    /// Queues command `cid`'s capsule (and in-capsule data).
    fn encode(&self, inner: &mut Inner, cid: u16) {
        let r = &inner.reqs[cid as usize];
        let (ptr, len, data_in) = (r.data, r.len, r.data_in);
        let mut sqe = r.sqe;
        sqe.set_cid(cid);
        let p = self.p.get();
        let (hd, dd) = (p.hdgst, p.ddgst);
        if len > 0 && !data_in && len <= p.max_inline {
            sqe.set_sgl(0, len as u32, sgl::IN_CAPSULE);
            inner.put(pdu::capsule_cmd(&sqe, len, hd, dd).as_slice());
            inner.put_data(cid, ptr, len);
            if dd {
                // SAFETY: the slot owns the buffer until this command completes; it is not
                // freed or written while the command is queued.
                let data = unsafe { std::slice::from_raw_parts(ptr, len) };
                inner.put(&pdu::digest(data).to_le_bytes());
            }
        } else {
            // Reads, large writes (the controller asks with R2Ts) and commands without data
            // (a zero-length transport SGL).
            sqe.set_sgl(0, len as u32, sgl::TRANSPORT_DATA_BLOCK);
            inner.put(pdu::capsule_cmd(&sqe, 0, hd, dd).as_slice());
        }
    }

    /// The connection is gone: commands wait (see the module documentation) and the
    /// controller is told, so that it reconnects.
    pub fn disconnect(&self, why: &QueueError) {
        if self.down.replace(true) {
            return;
        }
        let _ = self.inner.borrow().stream.tcp().shutdown(std::net::Shutdown::Both);
        self.observer.queue_failed(why);
    }

    /// A new connection (ICReq/ICResp and Fabrics Connect done): every command still in the
    /// table is sent again, and new ones go out.
    pub fn reset(&self, stream: HostStream, p: QueueParams) {
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let _ = inner.stream.tcp().shutdown(std::net::Shutdown::Both);
        inner.plain_tcp = matches!(stream, HostStream::Plain(_));
        inner.stream = stream;
        inner.rx_start = 0;
        inner.rx_end = 0;
        inner.clear_tx();
        self.p.set(p);
        let busy: Vec<u16> = (0..inner.reqs.len() as u16).filter(|&c| inner.reqs[c as usize].busy).collect();
        let now = monotonic_ns();
        for cid in busy {
            // The timeout counts from this sending: the old connection's wait was the
            // recovery's to bound.
            inner.reqs[cid as usize].sent_ns = now;
            self.encode(inner, cid);
        }
        self.down.set(false);
        self.failing.set(false);
    }

    /// Ends every command in the table with `Offline`, and new ones fail at once until the
    /// next reset.
    pub fn fail_pending(&self) {
        self.failing.set(true);
        // The connection (if it still works) is dropped too: a late answer must not reach a
        // command table whose entries are reused; the reset gives a new one.
        self.down.set(true);
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let _ = inner.stream.tcp().shutdown(std::net::Shutdown::Both);
        inner.clear_tx();
        let slots: Vec<usize> = inner
            .reqs
            .iter_mut()
            .filter(|r| r.busy)
            .map(|r| {
                r.busy = false;
                r.data = std::ptr::null_mut();
                r.slot
            })
            .collect();
        inner.free = (0..inner.reqs.len() as u16).rev().collect();
        drop(g);
        self.in_flight.set(0);
        for s in slots {
            self.observer.io_error();
            self.completions.complete(s, Err(BdevError::Offline));
        }
    }

    fn flush(inner: &mut Inner) -> Result<(), QueueError> {
        while !inner.pieces.is_empty() {
            let mut iov: [IoSlice<'_>; MAX_IOV] = std::array::from_fn(|_| IoSlice::new(&[]));
            let mut n = 0;
            for (i, p) in inner.pieces.iter().take(MAX_IOV).enumerate() {
                let skip = if i == 0 { inner.sent } else { 0 };
                iov[i] = IoSlice::new(match *p {
                    Piece::Tx { off, len } => &inner.tx[off + skip..off + len],
                    // SAFETY: see `Piece::Data`: the command is in the table.
                    Piece::Data { ptr, len, .. } => unsafe { std::slice::from_raw_parts(ptr.add(skip), len - skip) },
                });
                n = i + 1;
            }
            match inner.stream.write_vectored(&iov[..n]) {
                Ok(0) => return Err(QueueError::Closed),
                Ok(w) => inner.advance(w),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(QueueError::Io(e.to_string())),
            }
        }
        inner.tx.clear();
        inner.sent = 0;
        Ok(())
    }

    fn run(&self) -> Result<usize, QueueError> {
        let mut work = 0;
        let lim = self.limits();
        let mut done = self.done.take();
        let r = self.run_into(&mut done, lim, &mut work);
        // Completions run wakers only after the queue is released (a woken task may submit);
        // those collected before an error too (their commands left the table: a reconnect
        // would not send them again).
        for (slot, r) in done.drain(..) {
            if r.is_err() {
                self.observer.io_error();
            }
            self.completions.complete(slot, r);
        }
        self.done.set(done);
        r.map(|()| work)
    }

    /// Sends what is queued and handles what arrived, collecting completions in `done`.
    fn run_into(&self, done: &mut Vec<(usize, IoResult)>, lim: RxLimits, work: &mut usize) -> Result<(), QueueError> {
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            if !inner.pieces.is_empty() {
                *work += 1;
            }
            Self::flush(inner)?;
            let mut drained = false;
            loop {
                while let Some(len) = complete_pdu_len(&inner.rx[inner.rx_start..inner.rx_end], &lim)? {
                    let start = inner.rx_start;
                    inner.rx_start += len;
                    self.handle_pdu(inner, start, len, done)?;
                    *work += 1;
                }
                if inner.rx_start == inner.rx_end {
                    inner.rx_start = 0;
                    inner.rx_end = 0;
                } else if inner.rx_start > 0 && inner.rx.len() - inner.rx_end < 64 * 1024 {
                    inner.rx.copy_within(inner.rx_start..inner.rx_end, 0);
                    inner.rx_end -= inner.rx_start;
                    inner.rx_start = 0;
                }
                if drained {
                    break;
                }
                let end = inner.rx_end;
                let room = inner.rx.len() - end;
                match inner.stream.read(&mut inner.rx[end..]) {
                    Ok(0) => return Err(QueueError::Closed),
                    Ok(n) => {
                        inner.rx_end += n;
                        // Less than asked for: the socket had no more (see `plain_tcp`). What
                        // came is parsed and the next poll reads again: one read per poll
                        // that finds data, not a second one that finds none.
                        drained = n < room && inner.plain_tcp;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(QueueError::Io(e.to_string())),
                }
            }
            Self::flush(inner)?;
        }
        Ok(())
    }

    /// Ends command `cid` (its data buffer is no longer touched): (slot, result) to complete.
    fn finish(&self, inner: &mut Inner, cid: u16, r: IoResult, done: &mut Vec<(usize, IoResult)>) -> Result<(), QueueError> {
        if !inner.reqs.get(cid as usize).is_some_and(|r| r.busy) {
            return Err(QueueError::Protocol(format!("completion for unknown command {cid}")));
        }
        inner.detach_data(cid);
        let req = &mut inner.reqs[cid as usize];
        req.busy = false;
        req.data = std::ptr::null_mut();
        done.push((req.slot, r));
        inner.free.push(cid);
        self.in_flight.set(self.in_flight.get() - 1);
        Ok(())
    }

    fn handle_pdu(&self, inner: &mut Inner, start: usize, len: usize, done: &mut Vec<(usize, IoResult)>) -> Result<(), QueueError> {
        let p = start..start + len;
        let ch = CommonHeader::parse(&inner.rx[p.clone()]).ok_or_else(|| QueueError::Protocol("short PDU".into()))?;
        let layout = pdu::check_header(ch, &self.limits()).map_err(|f| QueueError::Protocol(f.to_string()))?;
        if self.p.get().hdgst && ch.ty != pdu::pdu_type::C2H_TERM_REQ && !pdu::header_digest_ok(&inner.rx[p.clone()], ch.hlen as usize) {
            return Err(QueueError::Protocol("header digest mismatch".into()));
        }
        match ch.ty {
            pdu::pdu_type::C2H_TERM_REQ => {
                let (fes, fei) = pdu::parse_term_req(&inner.rx[p]).unwrap_or((0, 0));
                Err(QueueError::Protocol(format!("the controller terminated the connection (FES {fes}, FEI {fei})")))
            }
            pdu::pdu_type::CAPSULE_RESP => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&inner.rx[start + 8..start + 24]);
                let cqe = Cqe::from_bytes(&b);
                self.finish(inner, cqe.cid, status_result(cqe.status()), done)
            }
            pdu::pdu_type::C2H_DATA => {
                let dh = DataHeader::parse(&inner.rx[p]).ok_or_else(|| QueueError::Protocol("short C2HData".into()))?;
                let data = start + layout.data_offset..start + layout.data_offset + layout.data_len;
                if layout.ddgst {
                    let d = &inner.rx[data.end..data.end + 4];
                    if u32::from_le_bytes([d[0], d[1], d[2], d[3]]) != pdu::digest(&inner.rx[data.clone()]) {
                        return Err(QueueError::Protocol("data digest mismatch".into()));
                    }
                }
                let cid = dh.cccid;
                let req = inner
                    .reqs
                    .get(cid as usize)
                    .filter(|r| r.busy && r.data_in)
                    .ok_or_else(|| QueueError::Protocol(format!("C2HData for unknown command {cid}")))?;
                let (a, b) = (dh.datao as usize, dh.datao as usize + dh.datal as usize);
                if b > req.len || dh.datal as usize != layout.data_len {
                    return Err(QueueError::Protocol(format!("C2HData beyond the transfer of command {cid}")));
                }
                // SAFETY: the command is in flight, so its slot owns the buffer of `req.len`
                // bytes at `req.data`, and a..b lies inside it (checked above).
                unsafe { std::ptr::copy_nonoverlapping(inner.rx[data].as_ptr(), req.data.add(a), b - a) };
                if ch.flags & pdu::flags::DATA_SUCCESS != 0 {
                    if ch.flags & pdu::flags::DATA_LAST == 0 {
                        return Err(QueueError::Protocol("C2HData SUCCESS without LAST".into()));
                    }
                    return self.finish(inner, cid, Ok(()), done);
                }
                Ok(())
            }
            pdu::pdu_type::R2T => {
                let r2t = R2t::parse(&inner.rx[p]).ok_or_else(|| QueueError::Protocol("short R2T".into()))?;
                let cid = r2t.cccid;
                let req = inner
                    .reqs
                    .get(cid as usize)
                    .filter(|r| r.busy && !r.data_in)
                    .ok_or_else(|| QueueError::Protocol(format!("R2T for unknown command {cid}")))?;
                let (a, total) = (r2t.r2to as usize, r2t.r2tl as usize);
                if total == 0 || a + total > req.len {
                    return Err(QueueError::Protocol(format!("R2T beyond the data of command {cid}")));
                }
                // SAFETY: as for C2HData: the slot owns `req.len` bytes at `req.data`.
                let data = unsafe { std::slice::from_raw_parts(req.data.add(a), total) };
                let p = self.p.get();
                let max = p.maxh2cdata as usize;
                let mut off = 0;
                while off < total {
                    let n = max.min(total - off);
                    let h = pdu::h2c_data(cid, r2t.ttag, (a + off) as u32, n as u32, off + n == total, p.hdgst, p.ddgst);
                    inner.put(h.as_slice());
                    inner.put_data(cid, data[off..].as_ptr(), n);
                    if p.ddgst {
                        inner.put(&pdu::digest(&data[off..off + n]).to_le_bytes());
                    }
                    off += n;
                }
                Ok(())
            }
            other => Err(QueueError::Protocol(format!("unexpected PDU type {other:#x}"))),
        }
    }
}

impl IoQueue {
    /// Looks for a command unanswered past the command timeout (see the module documentation);
    /// a timed-out one with `reset` takes the queue down. At most a few times per timeout and
    /// every 10 ms: the scan of the table is not paid per I/O.
    fn check_timeouts(&self) {
        let t = self.p.get().timeouts;
        let Some(limit) = t.io else { return };
        if self.in_flight.get() == 0 {
            return;
        }
        let now = monotonic_ns();
        if now < self.next_timeout_check_ns.get() {
            return;
        }
        let limit_ns = limit.as_nanos() as u64;
        self.next_timeout_check_ns.set(now + (limit_ns / 4).clamp(1_000_000, 10_000_000));
        let Some(oldest) = self.inner.borrow().reqs.iter().filter(|r| r.busy).map(|r| r.sent_ns).min() else { return };
        let waited = now.saturating_sub(oldest);
        if waited <= limit_ns {
            return;
        }
        let why = QueueError::Timeout { waited: std::time::Duration::from_nanos(waited) };
        if t.reset {
            log::error!("NVMe/TCP I/O queue: {why}; resetting");
            self.disconnect(&why);
        } else if self.logged_timeout.replace(oldest) != oldest {
            log::warn!("NVMe/TCP I/O queue: {why} (action_on_timeout is none: it goes on waiting)");
        }
    }
}

/// The length of the PDU at the front of `avail`, once it is all there.
fn complete_pdu_len(avail: &[u8], lim: &RxLimits) -> Result<Option<usize>, QueueError> {
    let Some(ch) = CommonHeader::parse(avail) else { return Ok(None) };
    let layout = pdu::check_header(ch, lim).map_err(|f| QueueError::Protocol(format!("bad PDU: {f}")))?;
    Ok((avail.len() >= layout.plen()).then_some(layout.plen()))
}

impl Poller for IoQueue {
    fn poll(&self) -> usize {
        if self.down.get() {
            return 0;
        }
        match self.run() {
            Ok(n) => {
                self.check_timeouts();
                n
            }
            Err(e) => {
                log::error!("NVMe/TCP I/O queue: {e}");
                self.disconnect(&e);
                1
            }
        }
    }

    fn busy(&self) -> bool {
        self.in_flight.get() > 0
    }

    /// The socket is not registered with the core's event loop: while commands are in flight
    /// only polling sees their answers.
    fn needs_polling(&self) -> bool {
        self.busy() && !self.down.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::spec::{io_opc, Status};
    use crate::reactor::ManualCores;
    use std::future::Future;
    use std::net::{TcpListener, TcpStream};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::task::{Context, Poll, Waker};

    #[derive(Default)]
    struct Seen {
        errors: AtomicU64,
        failures: AtomicU64,
        last: std::sync::Mutex<Option<QueueError>>,
    }

    impl QueueObserver for Seen {
        fn io_error(&self) {
            self.errors.fetch_add(1, Relaxed);
        }
        fn queue_failed(&self, why: &QueueError) {
            self.failures.fetch_add(1, Relaxed);
            *self.last.lock().unwrap() = Some(why.clone());
        }
    }

    /// A connected (host, target) pair of sockets; the host's is non-blocking.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (tgt, _) = l.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        tgt.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        (host, tgt)
    }

    /// Reads one whole PDU on the target side.
    fn read_pdu(t: &mut TcpStream) -> Vec<u8> {
        let mut ch = [0u8; 8];
        t.read_exact(&mut ch).unwrap();
        let plen = u32::from_le_bytes(ch[4..8].try_into().unwrap()) as usize;
        let mut v = ch.to_vec();
        v.resize(plen, 0);
        t.read_exact(&mut v[8..]).unwrap();
        v
    }

    /// Polls the queue and `f` until `f` is ready.
    fn wait<F: Future + Unpin>(q: &IoQueue, f: &mut F) -> F::Output {
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..10_000 {
            q.poll();
            if let Poll::Ready(v) = Pin::new(&mut *f).poll(&mut cx) {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        panic!("the command did not complete");
    }

    /// A Flush pushed on `q` (room and a connection expected).
    fn push_flush(q: &IoQueue) -> CompletionFuture {
        q.push(Sqe::new(io_opc::FLUSH, 0, 1), &mut None, false).unwrap().unwrap()
    }

    fn params(max_inline: usize) -> QueueParams {
        QueueParams { hdgst: true, ddgst: true, maxh2cdata: 4096, max_inline, depth: 4, timeouts: Timeouts::default() }
    }

    #[test]
    fn read_data_lands_in_the_command_buffer_with_digests_checked() {
        let cores = ManualCores::new(1);
        let (host, mut tgt) = pair();
        cores.enter(0, || {
            let q = IoQueue::new(HostStream::Plain(host), params(0), Arc::new(Seen::default()));
            let mut buf = Some(IoBuf::alloc(8192));
            let mut f = Box::pin(q.push(crate::bdevs::nvme::tcp::rw_sqe(io_opc::READ, 1, 0, 16), &mut buf, true).unwrap().unwrap().owned());
            q.poll();
            let cmd = read_pdu(&mut tgt);
            assert_eq!(cmd[0], pdu::pdu_type::CAPSULE_CMD);
            assert_eq!(cmd.len(), pdu::CAPSULE_CMD_HLEN + 4, "header digest, no data");
            assert!(pdu::header_digest_ok(&cmd, pdu::CAPSULE_CMD_HLEN));
            let sqe = Sqe::from_slice(&cmd[8..72]).unwrap();
            assert_eq!((sqe.opcode(), sqe.sgl().1), (io_opc::READ, 8192));
            // Two C2HData PDUs, the last with SUCCESS (no CapsuleResp).
            let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
            for (off, last) in [(0usize, false), (4096, true)] {
                let d = &data[off..off + 4096];
                let mut p = pdu::c2h_data(sqe.cid(), off as u32, 4096, last, last, true, true, 0).as_slice().to_vec();
                p.extend_from_slice(d);
                p.extend_from_slice(&pdu::digest(d).to_le_bytes());
                tgt.write_all(&p).unwrap();
            }
            let (r, b) = wait(&q, &mut f);
            assert_eq!(r, Ok(()));
            assert!(b.unwrap()[..] == data[..]);
            assert!(!q.busy());
        });
    }

    #[test]
    fn writes_answer_r2ts_in_maxh2cdata_pieces_and_statuses_map() {
        let cores = ManualCores::new(1);
        let (host, mut tgt) = pair();
        cores.enter(0, || {
            let q = IoQueue::new(HostStream::Plain(host), params(1024), Arc::new(Seen::default()));
            let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
            let mut b = IoBuf::alloc(data.len());
            b.copy_from_slice(&data);
            let mut f = q.push(crate::bdevs::nvme::tcp::rw_sqe(io_opc::WRITE, 1, 0, 20), &mut Some(b), false).unwrap().unwrap();
            q.poll();
            let cmd = read_pdu(&mut tgt);
            assert_eq!(cmd.len(), pdu::CAPSULE_CMD_HLEN + 4, "beyond max_inline: no in-capsule data");
            let cid = Sqe::from_slice(&cmd[8..72]).unwrap().cid();
            tgt.write_all(pdu::r2t(cid, 9, 0, 10000, true).as_slice()).unwrap();
            let mut got = Vec::new();
            while got.len() < 10000 {
                // Poll the host until its H2CData arrives.
                q.poll();
                let p = read_pdu(&mut tgt);
                assert_eq!(p[0], pdu::pdu_type::H2C_DATA);
                let dh = pdu::DataHeader::parse(&p).unwrap();
                assert_eq!((dh.cccid, dh.ttag, dh.datao as usize), (cid, 9, got.len()));
                assert!(dh.datal <= 4096, "MAXH2CDATA respected");
                let d = &p[28..28 + dh.datal as usize];
                assert_eq!(&p[28 + d.len()..], &pdu::digest(d).to_le_bytes());
                got.extend_from_slice(d);
            }
            assert!(got == data);
            let cqe = Cqe::new(cid, Status::generic(0x80));
            tgt.write_all(pdu::capsule_resp(&cqe, true).as_slice()).unwrap();
            assert_eq!(wait(&q, &mut f), Err(BdevError::Nvme { sct: 0, sc: 0x80 }));
            // A small write goes in the capsule.
            let mut small = Some(IoBuf::zeroed(512));
            let _f = q.push(crate::bdevs::nvme::tcp::rw_sqe(io_opc::WRITE, 1, 0, 1), &mut small, false).unwrap().unwrap();
            q.poll();
            assert_eq!(read_pdu(&mut tgt).len(), pdu::CAPSULE_CMD_HLEN + 4 + 512 + 4);
        });
    }

    /// Shrinks a socket's kernel buffer (`opt`: SO_SNDBUF or SO_RCVBUF).
    fn small_buffer(fd: std::os::fd::RawFd, opt: libc::c_int) {
        let v: libc::c_int = 4096;
        // SAFETY: a valid socket and an int option of the right size.
        let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, &v as *const _ as *const libc::c_void, std::mem::size_of_val(&v) as u32) };
        assert_eq!(r, 0);
    }

    #[test]
    fn write_data_goes_out_from_the_command_buffer_and_survives_an_early_answer() {
        use std::os::fd::AsRawFd;
        // Small kernel buffers on both sides, so that most of a 1 MiB write's H2CData stays
        // queued in the host (by reference to the command's buffer) when the answer comes.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        small_buffer(l.as_raw_fd(), libc::SO_RCVBUF);
        let host = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut tgt, _) = l.accept().unwrap();
        small_buffer(host.as_raw_fd(), libc::SO_SNDBUF);
        host.set_nonblocking(true).unwrap();
        tgt.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let cores = ManualCores::new(1);
        cores.enter(0, || {
            let q = IoQueue::new(HostStream::Plain(host), params(0), Arc::new(Seen::default()));
            let data: Vec<u8> = (0..MAX_TRANSFER as u32).map(|i| (i % 253) as u8).collect();
            let mut b = IoBuf::alloc(data.len());
            b.copy_from_slice(&data);
            let mut f = Box::pin(q.push(crate::bdevs::nvme::tcp::rw_sqe(io_opc::WRITE, 1, 0, 2048), &mut Some(b), false).unwrap().unwrap().owned());
            q.poll();
            let cmd = read_pdu(&mut tgt);
            let cid = Sqe::from_slice(&cmd[8..72]).unwrap().cid();
            tgt.write_all(pdu::r2t(cid, 3, 0, MAX_TRANSFER as u32, true).as_slice()).unwrap();
            for _ in 0..1000 {
                q.poll();
                if q.inner.borrow().pieces.iter().any(|p| matches!(p, Piece::Data { .. })) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(q.inner.borrow().pieces.iter().any(|p| matches!(p, Piece::Data { .. })), "data queued by reference");
            // The controller answers before it has the data (as on an error).
            tgt.write_all(pdu::capsule_resp(&Cqe::new(cid, Status::generic(0x80)), true).as_slice()).unwrap();
            let (r, buf) = wait(&q, &mut f);
            assert_eq!(r, Err(BdevError::Nvme { sct: 0, sc: 0x80 }));
            let queued = q.inner.borrow().pieces.iter().map(|p| p.len()).sum::<usize>();
            assert!(queued > 0, "the answer came while data was still queued");
            assert!(!q.inner.borrow().pieces.iter().any(|p| matches!(p, Piece::Data { .. })), "no piece names the ended command's buffer");
            // The buffer is back with its owner, who reuses it: what is still to go out must
            // not change.
            buf.unwrap().fill(0xFF);
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                while got.len() < MAX_TRANSFER {
                    let p = read_pdu(&mut tgt);
                    assert_eq!(p[0], pdu::pdu_type::H2C_DATA);
                    let dh = pdu::DataHeader::parse(&p).unwrap();
                    assert_eq!((dh.cccid, dh.datao as usize), (cid, got.len()));
                    let d = &p[28..28 + dh.datal as usize];
                    assert_eq!(&p[28 + d.len()..], &pdu::digest(d).to_le_bytes(), "digest of the bytes sent");
                    got.extend_from_slice(d);
                }
                got
            });
            while !reader.is_finished() {
                q.poll();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            assert!(reader.join().unwrap() == data, "the H2CData carried the command's own bytes");
        });
    }

    #[test]
    fn a_broken_connection_holds_commands_until_reset_or_failure() {
        let cores = ManualCores::new(1);
        let (host, mut tgt) = pair();
        let seen = Arc::new(Seen::default());
        cores.enter(0, || {
            let q = IoQueue::new(HostStream::Plain(host), params(4096), seen.clone());
            let mut f = push_flush(&q);
            q.poll();
            read_pdu(&mut tgt);
            // Garbage from the controller: the queue goes down, the command waits.
            tgt.write_all(&[0xEE; 64]).unwrap();
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..200 {
                q.poll();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(q.is_down());
            assert_eq!(seen.failures.load(Relaxed), 1);
            assert!(Pin::new(&mut f).poll(&mut cx).is_pending(), "held for the reconnect");
            assert!(q.push(Sqe::new(io_opc::FLUSH, 0, 1), &mut None, false).is_none(), "new commands wait");
            // A reconnect sends the held command again, on the new connection.
            let (host2, mut tgt2) = pair();
            q.reset(HostStream::Plain(host2), params(4096));
            q.poll();
            let again = read_pdu(&mut tgt2);
            let cid = Sqe::from_slice(&again[8..72]).unwrap().cid();
            tgt2.write_all(pdu::capsule_resp(&Cqe::new(cid, Status::SUCCESS), true).as_slice()).unwrap();
            assert_eq!(wait(&q, &mut f), Ok(()));
            // Fast fail: the held commands and new ones end with Offline.
            let mut g = push_flush(&q);
            q.fail_pending();
            assert_eq!(Pin::new(&mut g).poll(&mut cx), Poll::Ready(Err(BdevError::Offline)));
            assert!(matches!(q.push(Sqe::new(io_opc::FLUSH, 0, 1), &mut None, false), Some(Err(BdevError::Offline))));
            assert_eq!(seen.errors.load(Relaxed), 2);
        });
    }

    #[test]
    fn a_command_unanswered_past_the_timeout_takes_the_queue_down_or_is_only_logged() {
        use std::time::{Duration, Instant};
        let cores = ManualCores::new(1);
        for reset in [true, false] {
            let (host, mut tgt) = pair();
            let seen = Arc::new(Seen::default());
            cores.enter(0, || {
                let p = QueueParams { timeouts: Timeouts { io: Some(Duration::from_millis(30)), admin: None, reset }, ..params(4096) };
                let q = IoQueue::new(HostStream::Plain(host), p, seen.clone());
                // Answered commands are never timed out, however long the queue then idles.
                let mut f = push_flush(&q);
                q.poll();
                let cid = Sqe::from_slice(&read_pdu(&mut tgt)[8..72]).unwrap().cid();
                tgt.write_all(pdu::capsule_resp(&Cqe::new(cid, Status::SUCCESS), true).as_slice()).unwrap();
                assert_eq!(wait(&q, &mut f), Ok(()));
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_millis(80) {
                    q.poll();
                    std::thread::sleep(Duration::from_millis(1));
                }
                assert_eq!(seen.failures.load(Relaxed), 0, "nothing in flight, nothing timed out");
                // A command the controller never answers (a hung node keeps its socket open).
                let mut g = push_flush(&q);
                q.poll();
                read_pdu(&mut tgt);
                let sent = Instant::now();
                while sent.elapsed() < Duration::from_millis(300) && !q.is_down() {
                    q.poll();
                    std::thread::sleep(Duration::from_millis(1));
                }
                let mut cx = Context::from_waker(Waker::noop());
                assert!(Pin::new(&mut g).poll(&mut cx).is_pending(), "the command is neither failed nor lost: it waits for the reconnect");
                if reset {
                    assert!(q.is_down(), "reset: the queue drops the connection");
                    assert!(sent.elapsed() >= Duration::from_millis(30));
                    assert_eq!(seen.failures.load(Relaxed), 1);
                    let why = seen.last.lock().unwrap().clone().unwrap();
                    assert!(why.unanswered_for() >= Duration::from_millis(30), "the controller learns how long it waited: {why}");
                    assert!(why.unanswered_for() <= sent.elapsed() + Duration::from_millis(5), "{why}");
                } else {
                    assert!(!q.is_down(), "none: logged only");
                    assert_eq!(seen.failures.load(Relaxed), 0);
                }
            });
        }
    }

    #[test]
    fn an_answer_that_arrives_just_before_garbage_still_completes_its_command() {
        let cores = ManualCores::new(1);
        let (host, mut tgt) = pair();
        let seen = Arc::new(Seen::default());
        cores.enter(0, || {
            let q = IoQueue::new(HostStream::Plain(host), params(4096), seen.clone());
            let mut f = push_flush(&q);
            let mut g = push_flush(&q);
            q.poll();
            let first = Sqe::from_slice(&read_pdu(&mut tgt)[8..72]).unwrap().cid();
            read_pdu(&mut tgt);
            // One write: the first command's answer, then garbage; one poll reads both.
            let mut bytes = pdu::capsule_resp(&Cqe::new(first, Status::SUCCESS), true).as_slice().to_vec();
            bytes.extend_from_slice(&[0xEE; 64]);
            tgt.write_all(&bytes).unwrap();
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..200 {
                q.poll();
                if q.is_down() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(q.is_down());
            assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Ready(Ok(())), "answered before the garbage: completed, not lost");
            assert!(Pin::new(&mut g).poll(&mut cx).is_pending(), "the other waits for the reconnect");
        });
    }
}
