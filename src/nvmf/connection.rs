//! One NVMe/TCP connection: one queue pair, owned by one core for its whole life.
//!
//! Two futures serve it. The reader parses PDUs from a per-connection receive buffer (one
//! `read` usually brings many small PDUs; large payloads are read straight into the command's
//! `IoBuf`), executes admin commands inline and hands I/O commands to the connection's
//! workers (tasks kept from one command to the next: see [`io::Worker`]). The writer
//! sends everything queued since it last ran with one `writev`, so completions of one loop
//! iteration leave in one system call. Commands occupy slots bounded by the queue size the
//! host connected with; when all are busy the reader stops reading (TCP pushes back on the
//! host) instead of buffering.
//!
//! Every data buffer of a host's command (read data until it is sent, write data from its
//! R2T until the write completes, in-capsule data) is charged to the connection's buffer
//! budget ([`crate::bdev::budget`]). A read or an R2T that does not fit waits in its slot, in
//! arrival order, until the connection's own commands or other connections of the core give
//! bytes back; a third future of the connection starts them then.

use super::auth::{self, QueueAuth};
pub(crate) use super::controller::Binding;
use super::controller::{self, AdminOutcome, Connecting};
use super::io;
use super::pdu::{self, CommonHeader, DataHeader, DataPlan, Fatal, Fes, HeaderBytes, IcReq, IcResp, Layout, RxLimits};
use super::spec::{csc, fctype, sc, sct, Cqe, Sqe, Status, FABRICS_OPC};
use super::subsystem::ListenAddr;
use super::tls::{self, PskIdentity};
use super::transport::{TransportOpts, ADMIN_ICD};
use super::Nvmf;
use crate::bdev::{ConnBudget, IoBuf, Lease};
use crate::reactor::{self, Channel, RecvBuf, TcpStream, TlsStream, RECV_BUF_DEFAULT, TLS_CONNECTION_BYTES};
use openssl::ssl::{Ssl, SslContext};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io::{ErrorKind, IoSlice};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// A connection that has not connected to a controller this long after accept is closed.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a closing connection waits for its last PDUs (a TermReq) to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long a host that half-closed its connection waits at most for its commands' answers.
const HALF_CLOSE_ANSWERS: Duration = Duration::from_secs(30);
/// What a connection holds beyond what [`state_bytes`] computes: its futures, its socket
/// registration, map entries and the allocator's slack (measured with `memory_budget`: RSS
/// per idle connection less the computed part).
const STATE_SLACK: usize = 16 * 1024;
/// How long a queue whose host must authenticate (DH-HMAC-CHAP) may stay connected without
/// completing it: it takes no command but the transaction's meanwhile, and holds a connection.
const AUTH_DEADLINE: Duration = Duration::from_secs(30);
/// How long a host has to complete the TLS handshake on a secure listener.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection closed for a protocol error keeps reading (and discarding).
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// Slots of a queue before Connect (only a Connect is valid there).
const UNBOUND_SLOTS: usize = 2;
/// Most iovecs one writev takes (IOV_MAX).
const IOV_MAX: usize = 1024;
/// Most open connections (all cores); more are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// A wake-up for one waiting future; a notification before the wait is not lost.
#[derive(Default)]
pub(crate) struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.set.set(true);
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Data following a PDU header on the wire.
pub(crate) enum TxData {
    None,
    /// `len` bytes of an I/O buffer (read data: sent without copying), with its charge to the
    /// buffer budget (held for its drop: returned once the data is sent).
    Buf(IoBuf, usize, #[allow(dead_code)] Option<Lease>),
    Vec(Vec<u8>),
}

pub(crate) struct TxPdu {
    hdr: HeaderBytes,
    data: TxData,
    ddgst: Option<[u8; 4]>,
}

/// Why a connection's reader stopped.
#[derive(Debug)]
enum End {
    Eof,
    Io(std::io::Error),
    /// A protocol violation: a C2HTermReq goes out, echoing the offending header.
    Fatal(Fatal, Vec<u8>),
    /// The host sent an H2CTermReq.
    HostTerm(u16),
    /// Closed by us (keep-alive, RPC, shutdown, Disconnect).
    Closed,
}

impl From<std::io::Error> for End {
    /// The end of the host's stream is an orderly end; anything else an I/O error.
    fn from(e: std::io::Error) -> End {
        if e.kind() == ErrorKind::UnexpectedEof {
            End::Eof
        } else {
            End::Io(e)
        }
    }
}

/// A command waiting for its data from the host (R2T sent).
pub(crate) struct PendingData {
    sqe: Sqe,
    buf: IoBuf,
    received: u32,
    len: u32,
    _lease: Lease,
}

pub(crate) enum SlotState {
    Free,
    Busy,
    /// An R2T is out; the data is coming. Unboxed: every write larger than the in-capsule
    /// size passes here, and the slot's storage is already there.
    AwaitingData(PendingData),
    /// Waiting for buffer budget for its R2T (the R2T has not been sent).
    AwaitingR2t(Sqe, u32),
    /// A checked I/O command waiting for buffer budget for its data. Boxed: it happens only
    /// when the budget is short, and inline it would make every slot of every queue larger.
    AwaitingBuffer(Box<io::HeldIo>),
}

/// Command slots: their count is the queue size the host connected with.
struct Slots {
    v: Vec<SlotState>,
    free: Vec<u16>,
}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots { v: (0..n).map(|_| SlotState::Free).collect(), free: (0..n as u16).rev().collect() }
    }

    fn resize(&mut self, n: usize) {
        // Only called at Connect, when every slot is free.
        debug_assert!(self.v.iter().all(|s| matches!(s, SlotState::Free)), "resizing slots in use");
        *self = Slots::new(n);
    }

    fn alloc(&mut self) -> Option<u16> {
        let i = self.free.pop()?;
        // `release` pushes a slot once, when it leaves another state: the free list holds
        // free slots only, so a host's commands never share one.
        assert!(matches!(self.v[i as usize], SlotState::Free), "slot {i} on the free list is in use");
        self.v[i as usize] = SlotState::Busy;
        Some(i)
    }

    fn release(&mut self, i: u16) {
        if let Some(s) = self.v.get_mut(i as usize) {
            if !matches!(s, SlotState::Free) {
                *s = SlotState::Free;
                self.free.push(i);
            }
        }
    }

    /// Every slot is waiting for data the host has not sent: reading more is the only way on.
    fn all_awaiting_data(&self) -> bool {
        self.v.iter().all(|s| matches!(s, SlotState::AwaitingData(_) | SlotState::AwaitingR2t(..)))
    }

    /// Some command will be answered without more data from the host: running, or waiting
    /// for buffer budget to run.
    fn any_answer_pending(&self) -> bool {
        self.v.iter().any(|s| matches!(s, SlotState::Busy | SlotState::AwaitingBuffer(_)))
    }

    /// Some R2T is out: the host owes data that only the reader can receive.
    fn any_awaiting_data(&self) -> bool {
        self.v.iter().any(|s| matches!(s, SlotState::AwaitingData(_)))
    }
}

/// Command ids outstanding on the queue (a bit per possible id).
struct CidSet(Box<[u64; 1024]>);

impl CidSet {
    fn new() -> CidSet {
        CidSet(Box::new([0; 1024]))
    }
    fn insert(&mut self, cid: u16) -> bool {
        let (w, b) = ((cid >> 6) as usize, cid & 63);
        let had = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !had
    }
    fn remove(&mut self, cid: u16) {
        let (w, b) = ((cid >> 6) as usize, cid & 63);
        // Only a command that got its id (a duplicate is refused before, unrecorded) completes,
        // once: clearing an id not held would free the id of another command in flight.
        assert!(self.0[w] & (1 << b) != 0, "command id {cid} completed twice");
        self.0[w] &= !(1 << b);
    }
}

struct QState {
    hdgst: bool,
    ddgst: bool,
    data_align: usize,
    ic_done: bool,
    /// Shared by the connection's commands by `Rc`: a clone per command of the `Arc` inside
    /// would write the controller's count, one cache line for every core the host's queues use.
    binding: Option<Rc<Binding>>,
    /// The queue's DH-HMAC-CHAP state when its host must authenticate.
    auth: Option<Box<QueueAuth>>,
    sqhd: u16,
    cids: CidSet,
    slots: Slots,
    ns: io::NsCache,
    /// Slots waiting for buffer budget (R2Ts and I/O), in arrival order.
    deferred: std::collections::VecDeque<u16>,
}

pub(crate) struct Conn {
    pub id: u64,
    pub nvmf: Arc<Nvmf>,
    stream: Channel,
    /// The host and subsystem the TLS handshake proved (a secure listener's connections).
    tls: Option<PskIdentity>,
    listener: ListenAddr,
    peer: SocketAddr,
    pub opts: TransportOpts,
    core: usize,
    st: RefCell<QState>,
    tx: RefCell<Vec<TxPdu>>,
    tx_notify: Notify,
    slot_notify: Notify,
    drain_notify: Notify,
    writer_notify: Notify,
    writer_exited: Cell<bool>,
    closing: Cell<bool>,
    inflight: Cell<usize>,
    /// This connection's account in the buffer budget.
    budget: Rc<ConnBudget>,
    /// Set when a command starts waiting for budget.
    deferred_notify: Notify,
    /// The tasks that run this queue's I/O commands, kept between commands.
    workers: io::Workers,
}

/// The connections of this core.
#[derive(Default)]
struct Registry(RefCell<HashMap<u64, Rc<Conn>>>);

fn registry() -> Rc<Registry> {
    reactor::with_core(|c| c.local::<Registry>())
}

fn lookup(id: u64) -> Option<Rc<Conn>> {
    registry().0.borrow().get(&id).cloned()
}

/// Closes connection `id` of this core (keep-alive expiry, controller reset, RPC).
pub fn abort_connection(id: u64) {
    if let Some(c) = lookup(id) {
        c.abort();
    }
}

/// Closes every connection of this core (shutdown).
pub fn abort_all() {
    let all: Vec<Rc<Conn>> = registry().0.borrow().values().cloned().collect();
    for c in all {
        c.abort();
    }
}

/// Completes the Asynchronous Event Request `cid` on admin connection `id` of this core.
pub fn complete_aer(id: u64, cid: u16, status: Status, dw0: u32) {
    if let Some(c) = lookup(id) {
        c.st.borrow_mut().cids.remove(cid);
        c.respond(cid, status, dw0 as u64, None);
    }
}

/// Drops cached namespace channels of subsystem `subsys_id` on this core.
pub fn purge_namespaces(subsys_id: u64) {
    let all: Vec<Rc<Conn>> = registry().0.borrow().values().cloned().collect();
    for c in all {
        let mut st = c.st.borrow_mut();
        if st.binding.as_ref().is_some_and(|b| b.ctrl.subsys.id == subsys_id) {
            st.ns.clear();
        }
    }
}

/// Drops every cached namespace channel on this core.
pub fn purge_all_namespaces() {
    let all: Vec<Rc<Conn>> = registry().0.borrow().values().cloned().collect();
    for c in all {
        c.st.borrow_mut().ns.clear();
    }
}

/// Bytes one connection holds whatever its host does, counted in the buffer budget from
/// accept to close: the receive buffer, the table of command ids, the slots and the queued
/// PDUs of a queue of the largest size the transport allows, the connection itself, and
/// [`STATE_SLACK`].
fn state_bytes(opts: &TransportOpts, tls: bool) -> u64 {
    use std::mem::size_of;
    let depth = opts.max_queue_depth as usize;
    // A command's slot and free-list entry; up to two PDUs (data, response) per command in
    // the transmit queue and in the writer's batch, whose vectors keep their capacity.
    let per_command = size_of::<SlotState>() + size_of::<u16>() + 4 * size_of::<TxPdu>();
    let tls = if tls { TLS_CONNECTION_BYTES } else { 0 };
    (RECV_BUF_DEFAULT + size_of::<Conn>() + size_of::<CidSet>() + size_of::<[u64; 1024]>() + depth * per_command + STATE_SLACK + tls) as u64
}

/// Serves one accepted connection on the current core until it closes.
/// On a secure listener (`tls`), the TLS handshake comes first, bounded in time.
pub async fn serve(nvmf: Arc<Nvmf>, s: reactor::Accepted, listener: ListenAddr, peer: SocketAddr, tls: Option<SslContext>) {
    let stream = match TcpStream::from_accepted(s) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("nvmf: cannot take connection from {peer}: {e}");
            return;
        }
    };
    if nvmf.open_connections.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
        log::warn!("nvmf: {MAX_CONNECTIONS} connections are open; refusing {peer}");
        stream.shutdown();
        return;
    }
    let opts = nvmf.transport().unwrap_or_default();
    // The connection's own memory counts in the budget before any of it is allocated.
    let fixed = state_bytes(&opts, tls.is_some());
    let Ok(budget) = ConnBudget::open(fixed) else {
        crate::bdev::budget::refuse_connection("nvmf", peer, fixed);
        stream.shutdown();
        return;
    };
    let (stream, proven) = match tls {
        None => (Channel::Plain(stream), None),
        Some(ctx) => match handshake(&nvmf, stream, &ctx, peer, &listener).await {
            Some(t) => {
                let id = t.with_ssl(tls::proven_identity);
                (Channel::Tls(t), id)
            }
            None => return,
        },
    };
    let conn = Rc::new(Conn {
        id: nvmf.next_conn_id(),
        nvmf: nvmf.clone(),
        stream,
        tls: proven,
        listener,
        peer,
        opts,
        core: reactor::current_index(),
        st: RefCell::new(QState {
            hdgst: false,
            ddgst: false,
            data_align: 4,
            ic_done: false,
            binding: None,
            auth: None,
            sqhd: 0,
            cids: CidSet::new(),
            slots: Slots::new(UNBOUND_SLOTS),
            ns: io::NsCache::default(),
            deferred: std::collections::VecDeque::new(),
        }),
        tx: RefCell::new(Vec::new()),
        tx_notify: Notify::default(),
        slot_notify: Notify::default(),
        drain_notify: Notify::default(),
        writer_notify: Notify::default(),
        writer_exited: Cell::new(false),
        closing: Cell::new(false),
        inflight: Cell::new(0),
        budget,
        deferred_notify: Notify::default(),
        workers: io::Workers::default(),
    });
    registry().0.borrow_mut().insert(conn.id, conn.clone());
    nvmf.open_connections.fetch_add(1, Ordering::SeqCst);
    log::debug!("nvmf: connection {} from {peer} on core {}", conn.id, conn.core);

    let weak = Rc::downgrade(&conn);
    reactor::spawn_detached(async move {
        reactor::sleep(CONNECT_DEADLINE).await;
        if let Some(c) = weak.upgrade() {
            if c.st.borrow().binding.is_none() && !c.closing.get() {
                log::info!("nvmf: connection {} from {} did not connect in {CONNECT_DEADLINE:?}; closed", c.id, c.peer);
                c.abort();
            }
        }
    });

    let reader = async {
        let mut rx = RecvBuf::new(RECV_BUF_DEFAULT);
        let end = read_loop(&conn, &mut rx).await;
        drop(rx);
        if matches!(end, End::Eof) {
            // The host half-closed: it sends nothing more but still reads. The answers of
            // the commands it sent go out before the connection closes (bounded: a command
            // stuck in a bdev does not keep the connection forever).
            let _ = reactor::timeout(HALF_CLOSE_ANSWERS, conn.answers_out()).await;
        }
        let fatal = matches!(end, End::Fatal(..));
        conn.finish_reading(end);
        let _ = reactor::timeout(CLOSE_FLUSH, conn.wait_writer()).await;
        if fatal {
            // Let the host read the TermReq: FIN first, then discard what it still sends
            // until it closes (bounded), so that our close does not reset the connection.
            conn.stream.shutdown_write();
            let _ = reactor::timeout(CLOSE_DRAIN, drain(&conn.stream)).await;
        }
        conn.stream.shutdown();
    };
    futures::future::join3(reader, write_loop(&conn), budget_loop(&conn)).await;
    // Submitted bdev I/O cannot be cancelled: wait for it, its completions go nowhere.
    while conn.inflight.get() > 0 {
        conn.drain_notify.wait().await;
    }
    // The workers hold the connection: they end now that no command runs (every one idle).
    let busy = conn.workers.stop();
    assert_eq!(busy, 0, "a worker still runs a command at the connection's end");
    conn.detach();
    registry().0.borrow_mut().remove(&conn.id);
    nvmf.open_connections.fetch_sub(1, Ordering::SeqCst);
    log::debug!("nvmf: connection {} from {peer} closed", conn.id);
}

/// The TLS handshake of a connection to a secure listener; None (logged, counted, the
/// connection closed) when the host is refused or does not finish in time.
async fn handshake(nvmf: &Nvmf, tcp: TcpStream, ctx: &SslContext, peer: SocketAddr, listener: &ListenAddr) -> Option<TlsStream> {
    let refused = |why: &dyn std::fmt::Display| {
        nvmf.tls_refused.fetch_add(1, Ordering::Relaxed);
        log::warn!("nvmf: TLS connection from {peer} to secure listener {listener} refused: {why}");
    };
    let ssl = match Ssl::new(ctx) {
        Ok(s) => s,
        Err(e) => {
            log::error!("nvmf: cannot start TLS for {peer}: {e}");
            return None;
        }
    };
    match reactor::timeout(TLS_HANDSHAKE_DEADLINE, TlsStream::accept(tcp, ssl)).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            refused(&e);
            None
        }
        Err(_) => {
            refused(&format_args!("no TLS handshake within {TLS_HANDSHAKE_DEADLINE:?}"));
            None
        }
    }
}

/// Reads and discards until the peer closes (at most 64 MiB).
async fn drain(s: &Channel) {
    let mut junk = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < 64 << 20 {
        match s.read(&mut junk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

async fn read_loop(conn: &Rc<Conn>, rx: &mut RecvBuf) -> End {
    let s = &conn.stream;
    let mut hdr = [0u8; 256];
    loop {
        if conn.closing.get() {
            return End::Closed;
        }
        match rx.fill(s, pdu::CH_LEN).await {
            Ok(()) => {}
            Err(e) => return End::from(e),
        }
        let Some(ch) = CommonHeader::parse(rx.data()) else { return End::Eof };
        let layout = match pdu::check_header(ch, &conn.rx_limits()) {
            Ok(l) => l,
            Err(f) => {
                let echo = rx.data()[..rx.data().len().min(pdu::TERM_REQ_MAX_DATA)].to_vec();
                return End::Fatal(f, echo);
            }
        };
        // The header, its digest and any padding; the data is read separately.
        let head = if layout.data_len > 0 { layout.data_offset } else { layout.plen() };
        match rx.fill(s, head).await {
            Ok(()) => {}
            Err(e) => return End::from(e),
        }
        hdr[..head].copy_from_slice(&rx.data()[..head]);
        rx.consume(head);
        let hlen = ch.hlen as usize;
        if layout.header_len > hlen && !pdu::header_digest_ok(&hdr[..head], hlen) {
            return End::Fatal(Fatal::new(Fes::HeaderDigestError, 0, "header digest mismatch"), hdr[..hlen].to_vec());
        }
        let r = match ch.ty {
            pdu::pdu_type::IC_REQ => conn.on_icreq(&hdr[..head]),
            pdu::pdu_type::H2C_TERM_REQ => {
                let (fes, _) = pdu::parse_term_req(&hdr[..head]).unwrap_or((0, 0));
                return End::HostTerm(fes);
            }
            pdu::pdu_type::CAPSULE_CMD => on_capsule(conn, rx, &hdr[..head], &layout).await,
            pdu::pdu_type::H2C_DATA => on_h2c_data(conn, rx, &hdr[..head], &layout).await,
            _ => Err(End::Fatal(Fatal::new(Fes::InvalidHeaderField, 0, "unexpected PDU type"), hdr[..hlen].to_vec())),
        };
        if let Err(end) = r {
            return end;
        }
    }
}

async fn on_capsule(conn: &Rc<Conn>, rx: &mut RecvBuf, hdr: &[u8], layout: &Layout) -> Result<(), End> {
    let Some(sqe) = Sqe::from_slice(&hdr[pdu::CH_LEN..]) else {
        return Err(End::Fatal(Fatal::new(Fes::InvalidHeaderField, 2, "short capsule"), hdr.to_vec()));
    };
    // Back-pressure: no free slot means the host is at its queue depth (or beyond it); stop
    // reading until a command completes.
    loop {
        {
            let st = conn.st.borrow();
            if !st.slots.free.is_empty() {
                break;
            }
            if st.slots.all_awaiting_data() {
                return Err(End::Fatal(Fatal::new(Fes::PduSequenceError, 0, "more commands than the queue size while data is outstanding"), hdr.to_vec()));
            }
        }
        conn.slot_notify.wait().await;
        if conn.closing.get() {
            return Err(End::Closed);
        }
    }
    let mut icd = None;
    if layout.data_len > 0 {
        // In-capsule data is charged too. Short of budget, the reader waits (TCP pushes
        // back on the host) unless the connection waits for the host's data of R2Ts already
        // sent: only this reader can receive that data, so it must not stop; the command is
        // then refused with a status the host retries, its data read and discarded.
        let lease = loop {
            match conn.budget.try_charge(layout.data_len as u64) {
                Ok(l) => break Some(l),
                Err(_) if conn.st.borrow().slots.any_awaiting_data() => break None,
                Err(_) => conn.budget.core().freed(layout.data_len as u64).await,
            }
            if conn.closing.get() {
                return Err(End::Closed);
            }
        };
        let Some(lease) = lease else {
            match rx.discard(&conn.stream, layout.data_len + if layout.ddgst { 4 } else { 0 }, |_| {}).await {
                Ok(()) => {}
                Err(e) => return Err(End::from(e)),
            }
            conn.st.borrow_mut().advance_sqhd();
            conn.respond(sqe.cid(), Status::retryable(sct::GENERIC, sc::COMMAND_INTERRUPTED), 0, Some(&sqe));
            return Ok(());
        };
        let mut buf = IoBuf::alloc(layout.data_len);
        match rx.read_into(&conn.stream, &mut buf).await {
            Ok(()) => {}
            Err(e) => return Err(End::from(e)),
        }
        if layout.ddgst {
            match rx.read_u32_le(&conn.stream).await {
                Ok(d) if d == pdu::digest(&buf) => {}
                Ok(_) => {
                    // A data digest error is not fatal: the command fails, retryably.
                    conn.st.borrow_mut().advance_sqhd();
                    conn.respond(sqe.cid(), Status::retryable(sct::GENERIC, sc::TRANSIENT_TRANSPORT_ERROR), 0, Some(&sqe));
                    return Ok(());
                }
                Err(e) => return Err(End::from(e)),
            }
        }
        icd = Some((buf, lease));
    }
    conn.on_command(sqe, icd);
    Ok(())
}

async fn on_h2c_data(conn: &Rc<Conn>, rx: &mut RecvBuf, hdr: &[u8], layout: &Layout) -> Result<(), End> {
    let fatal = |fes, fei, why| Err(End::Fatal(Fatal::new(fes, fei, why), hdr[..pdu::SHORT_HLEN].to_vec()));
    let Some(dh) = DataHeader::parse(hdr) else { return fatal(Fes::InvalidHeaderField, 2, "short H2CData header") };
    if dh.datal as usize != layout.data_len {
        return fatal(Fes::InvalidHeaderField, 16, "H2CData DATAL does not match the PDU length");
    }
    let taken = {
        let mut st = conn.st.borrow_mut();
        match st.slots.v.get_mut(dh.ttag as usize) {
            Some(slot @ SlotState::AwaitingData(_)) => match std::mem::replace(slot, SlotState::Busy) {
                SlotState::AwaitingData(p) => Some(p),
                _ => None,
            },
            _ => None,
        }
    };
    let Some(mut p) = taken else { return fatal(Fes::InvalidHeaderField, 10, "H2CData for an unknown transfer tag") };
    let restore = |p: PendingData| {
        if let Some(s) = conn.st.borrow_mut().slots.v.get_mut(dh.ttag as usize) {
            *s = SlotState::AwaitingData(p);
        }
    };
    if p.sqe.cid() != dh.cccid {
        restore(p);
        return fatal(Fes::InvalidHeaderField, 8, "H2CData command id does not match the transfer tag");
    }
    if dh.datao != p.received {
        restore(p);
        return fatal(Fes::DataOutOfRange, 12, "H2CData offset is not where the transfer stands");
    }
    if dh.datao as u64 + dh.datal as u64 > p.len as u64 {
        restore(p);
        return fatal(Fes::DataOutOfRange, 16, "H2CData beyond the command's data");
    }
    let (a, b) = (dh.datao as usize, dh.datao as usize + dh.datal as usize);
    if let Err(e) = rx.read_into(&conn.stream, &mut p.buf[a..b]).await {
        return Err(End::from(e));
    }
    let ttag = dh.ttag;
    if layout.ddgst {
        match rx.read_u32_le(&conn.stream).await {
            Ok(d) if d == pdu::digest(&p.buf[a..b]) => {}
            Ok(_) => {
                conn.complete(Some(ttag), &p.sqe, Status::retryable(sct::GENERIC, sc::TRANSIENT_TRANSPORT_ERROR), 0, TxData::None);
                return Ok(());
            }
            Err(e) => return Err(End::from(e)),
        }
    }
    p.received += dh.datal;
    if p.received < p.len {
        restore(p);
        return Ok(());
    }
    let PendingData { sqe, buf, len, _lease: lease, .. } = p;
    conn.execute(conn.binding(), Some(ttag), sqe, DataPlan::InCapsule { offset: 0, len }, Some((buf, lease)));
    Ok(())
}

impl QState {
    fn advance_sqhd(&mut self) {
        let entries = self.binding.as_ref().map(|b| b.sqsize as u32 + 1).unwrap_or(1);
        self.sqhd = ((self.sqhd as u32 + 1) % entries) as u16;
    }
}

impl Conn {
    fn rx_limits(&self) -> RxLimits {
        let st = self.st.borrow();
        let io_queue = st.binding.as_ref().is_some_and(|b| b.qid > 0);
        RxLimits {
            role: pdu::Role::Target,
            ic_done: st.ic_done,
            hdgst: st.hdgst,
            ddgst: st.ddgst,
            max_capsule_data: if io_queue { self.opts.in_capsule_data_size } else { ADMIN_ICD },
            max_data_pdu: self.opts.max_io_size,
        }
    }

    pub fn binding(&self) -> Option<Rc<Binding>> {
        self.st.borrow().binding.clone()
    }

    pub fn core(&self) -> usize {
        self.core
    }

    fn abort(&self) {
        if !self.closing.replace(true) {
            self.stream.shutdown();
        }
        self.tx_notify.notify();
        self.slot_notify.notify();
        self.deferred_notify.notify();
    }

    fn finish_reading(&self, end: End) {
        match &end {
            End::Eof | End::Closed => {}
            End::Io(e) => log::debug!("nvmf: connection {} from {}: {e}", self.id, self.peer),
            End::HostTerm(fes) => log::warn!("nvmf: connection {} from {}: host terminated the connection (FES {fes})", self.id, self.peer),
            End::Fatal(f, echo) => {
                log::warn!("nvmf: connection {} from {}: {f}; sending C2HTermReq", self.id, self.peer);
                self.push(TxPdu { hdr: pdu::term_req(pdu::pdu_type::C2H_TERM_REQ, f.fes, f.fei, echo), data: TxData::None, ddgst: None });
            }
        }
        self.closing.set(true);
        self.tx_notify.notify();
        self.deferred_notify.notify();
    }

    /// Waits until no command that can still be answered is left (or the connection closes).
    async fn answers_out(&self) {
        while !self.closing.get() && self.st.borrow().slots.any_answer_pending() {
            self.slot_notify.wait().await;
        }
    }

    async fn wait_writer(&self) {
        while !self.writer_exited.get() {
            self.writer_notify.wait().await;
        }
    }

    fn push(&self, p: TxPdu) {
        self.tx.borrow_mut().push(p);
        self.tx_notify.notify();
    }

    /// Sends a CapsuleResp for `cid` (a failure goes to the Error Information log, with what
    /// `sqe` says of the command when the caller has it).
    pub(crate) fn respond(&self, cid: u16, status: Status, result: u64, sqe: Option<&Sqe>) {
        let (hdgst, cqe) = {
            let st = self.st.borrow();
            let (qid, sqhd) = match &st.binding {
                Some(b) => (b.qid, if b.sqflow_off { 0 } else { st.sqhd }),
                None => (0, st.sqhd),
            };
            (st.hdgst, Cqe { dw0: result as u32, dw1: (result >> 32) as u32, sqhd, sqid: qid, cid, status: status.to_field() })
        };
        if !status.is_success() {
            if let Some(b) = self.binding() {
                b.ctrl.record_error(cqe.sqid, cid, status, sqe);
            }
        }
        self.push(TxPdu { hdr: pdu::capsule_resp(&cqe, hdgst), data: TxData::None, ddgst: None });
    }

    /// Sends `data` for `cid` in a C2HData PDU, then the completion (folded into the PDU with
    /// the SUCCESS flag when the host disabled SQ flow control).
    fn respond_data(&self, cid: u16, data: TxData) {
        let len = match &data {
            TxData::None => 0,
            TxData::Buf(_, n, _) => *n,
            TxData::Vec(v) => v.len(),
        };
        if len == 0 {
            self.respond(cid, Status::SUCCESS, 0, None);
            return;
        }
        let (hdgst, ddgst, align, success) = {
            let st = self.st.borrow();
            let success = self.opts.c2h_success && st.binding.as_ref().is_some_and(|b| b.sqflow_off);
            (st.hdgst, st.ddgst, st.data_align, success)
        };
        let dg = if ddgst {
            let bytes: &[u8] = match &data {
                TxData::Buf(b, n, _) => &b[..*n],
                TxData::Vec(v) => v,
                TxData::None => &[],
            };
            Some(pdu::digest(bytes).to_le_bytes())
        } else {
            None
        };
        self.push(TxPdu { hdr: pdu::c2h_data(cid, 0, len as u32, true, success, hdgst, ddgst, align), data, ddgst: dg });
        if !success {
            self.respond(cid, Status::SUCCESS, 0, None);
        }
    }

    /// Finishes command `sqe`: frees its slot and id, sends data (on success) and status.
    pub(crate) fn complete(&self, slot: Option<u16>, sqe: &Sqe, status: Status, result: u64, data: TxData) {
        let cid = sqe.cid();
        {
            let mut st = self.st.borrow_mut();
            if let Some(s) = slot {
                st.slots.release(s);
            }
            st.cids.remove(cid);
        }
        if status.is_success() && !matches!(data, TxData::None) {
            self.respond_data(cid, data);
        } else {
            self.respond(cid, status, result, Some(sqe));
        }
        self.slot_notify.notify();
    }

    pub(crate) fn io_started(&self) {
        self.inflight.set(self.inflight.get() + 1);
    }

    pub(crate) fn io_finished(&self) {
        // Paired with `io_started` by `io::run`; close waits for this count to reach zero.
        assert!(self.inflight.get() > 0, "I/O finished that never started");
        self.inflight.set(self.inflight.get() - 1);
        self.drain_notify.notify();
    }

    pub(crate) fn workers(&self) -> &io::Workers {
        &self.workers
    }

    /// This connection's account in the buffer budget.
    pub(crate) fn budget(&self) -> &Rc<ConnBudget> {
        &self.budget
    }

    /// The queue's command slots (the queue size the host connected with).
    pub(crate) fn slot_count(&self) -> usize {
        self.st.borrow().slots.v.len()
    }

    pub(crate) fn with_ns_cache<R>(&self, f: impl FnOnce(&mut io::NsCache) -> R) -> R {
        f(&mut self.st.borrow_mut().ns)
    }

    fn on_icreq(&self, hdr: &[u8]) -> Result<(), End> {
        let fatal = |fes, fei, why| Err(End::Fatal(Fatal::new(fes, fei, why), hdr.to_vec()));
        let Some(ic) = IcReq::parse(hdr) else { return fatal(Fes::InvalidHeaderField, 2, "short ICReq") };
        if ic.pfv != 0 {
            return fatal(Fes::UnsupportedParameter, 8, "unsupported PDU format version");
        }
        if ic.hpda > 31 {
            return fatal(Fes::UnsupportedParameter, 10, "HPDA out of range");
        }
        let dgst = ic.dgst & (pdu::DGST_HEADER | pdu::DGST_DATA);
        {
            let mut st = self.st.borrow_mut();
            st.hdgst = dgst & pdu::DGST_HEADER != 0;
            st.ddgst = dgst & pdu::DGST_DATA != 0;
            st.data_align = (ic.hpda as usize + 1) * 4;
            st.ic_done = true;
        }
        let resp = IcResp { pfv: 0, cpda: 0, dgst, maxh2cdata: self.opts.max_io_size };
        self.push(TxPdu { hdr: HeaderBytes::from_slice(&resp.to_bytes()), data: TxData::None, ddgst: None });
        Ok(())
    }

    /// A complete command capsule arrived (with its in-capsule data, if any).
    fn on_command(self: &Rc<Self>, sqe: Sqe, icd: Option<(IoBuf, Lease)>) {
        let cid = sqe.cid();
        let binding = {
            let mut st = self.st.borrow_mut();
            st.advance_sqhd();
            // An admin command reusing an outstanding AER's id replaces the AER (see
            // `Controller::forget_aer`); any other reuse is a conflict.
            if !st.cids.insert(cid) && !st.binding.as_ref().is_some_and(|b| b.qid == 0 && b.ctrl.forget_aer(cid)) {
                drop(st);
                self.respond(cid, Status::generic(sc::CID_CONFLICT), 0, Some(&sqe));
                return;
            }
            st.binding.clone()
        };
        let icd_len = icd.as_ref().map(|(b, _)| b.len()).unwrap_or(0);
        let max = if binding.as_ref().is_some_and(|b| b.qid > 0) { self.opts.max_io_size } else { self.opts.max_io_size.max(ADMIN_ICD) };
        let plan = match pdu::plan_data(&sqe, icd_len, max) {
            Ok(p) => p,
            Err(status) => return self.complete(None, &sqe, status, 0, TxData::None),
        };
        if sqe.opcode() == FABRICS_OPC && sqe.fctype() == fctype::CONNECT {
            let r = self.on_connect(&sqe, plan, icd.as_ref().map(|(b, _)| &b[..]));
            let (status, result) = match r {
                Ok(result) => (Status::SUCCESS, result as u64),
                Err((status, iattr, ipo)) => (status, ipo as u64 | (iattr as u64) << 16),
            };
            if let Some((nqn, drains)) = status.is_success().then(|| self.earlier_commands()).flatten() {
                // Answered once the host's earlier commands left the bdevs (see
                // `earlier_commands`); the connection's close waits for it like for an I/O.
                self.io_started();
                let conn = self.clone();
                reactor::spawn_detached(async move {
                    for (nsid, d) in &drains {
                        io::reservation_drain(d, &nqn, *nsid).await;
                    }
                    conn.complete(None, &sqe, status, result, TxData::None);
                    conn.io_finished();
                });
                return;
            }
            return self.complete(None, &sqe, status, result, TxData::None);
        }
        if binding.is_none() {
            return self.complete(None, &sqe, Status::generic(sc::COMMAND_SEQUENCE_ERROR), 0, TxData::None);
        }
        if let DataPlan::FromHost { len } = plan {
            let slot = self.st.borrow_mut().slots.alloc();
            let Some(slot) = slot else {
                // Unreachable: the reader waited for a free slot before taking the capsule.
                return self.complete(None, &sqe, Status::retryable(sct::GENERIC, sc::NAMESPACE_NOT_READY), 0, TxData::None);
            };
            // The R2T's buffer is charged now; short of budget (or behind commands that are),
            // the R2T waits: a host that asks for R2Ts and never sends the data pins at most
            // the connection's limit.
            match self.charge_in_order(len as u64) {
                Some(lease) => self.send_r2t(slot, sqe, len, lease),
                None => self.hold(slot, SlotState::AwaitingR2t(sqe, len)),
            }
            return;
        }
        self.execute(binding, None, sqe, plan, icd);
    }

    /// Allocates the buffer of a host-to-controller transfer and asks for all of it with one
    /// R2T (one outstanding R2T per command satisfies any MAXR2T).
    fn send_r2t(&self, slot: u16, sqe: Sqe, len: u32, lease: Lease) {
        let buf = IoBuf::alloc(len as usize);
        let hdgst = {
            let mut st = self.st.borrow_mut();
            st.slots.v[slot as usize] = SlotState::AwaitingData(PendingData { sqe, buf, received: 0, len, _lease: lease });
            st.hdgst
        };
        self.push(TxPdu { hdr: pdu::r2t(sqe.cid(), slot, 0, len, hdgst), data: TxData::None, ddgst: None });
    }

    /// Charges `n` bytes of buffer to this connection, unless commands wait for budget
    /// already (they go first: a connection's commands get their buffers in arrival order).
    pub(crate) fn charge_in_order(&self, n: u64) -> Option<Lease> {
        if !self.st.borrow().deferred.is_empty() {
            return None;
        }
        self.budget.try_charge(n).ok()
    }

    /// Parks the command of `slot` until budget frees (see [`budget_loop`]).
    pub(crate) fn hold(&self, slot: u16, state: SlotState) {
        {
            let mut st = self.st.borrow_mut();
            st.slots.v[slot as usize] = state;
            st.deferred.push_back(slot);
        }
        self.deferred_notify.notify();
    }

    /// Starts the waiting commands that fit now, in arrival order; the bytes the first one
    /// still waiting needs, if one is.
    fn start_deferred(self: &Rc<Self>) -> Option<u64> {
        loop {
            let (slot, state) = {
                let mut st = self.st.borrow_mut();
                let Some(&slot) = st.deferred.front() else { return None };
                let need = match st.slots.v.get(slot as usize) {
                    Some(SlotState::AwaitingR2t(_, len)) => *len as u64,
                    Some(SlotState::AwaitingBuffer(h)) => h.need(),
                    _ => {
                        // The slot was freed meanwhile (the connection is closing).
                        st.deferred.pop_front();
                        continue;
                    }
                };
                let Ok(lease) = self.budget.try_charge(need) else { return Some(need) };
                st.deferred.pop_front();
                (slot, (std::mem::replace(&mut st.slots.v[slot as usize], SlotState::Busy), lease))
            };
            match state {
                (SlotState::AwaitingR2t(sqe, len), lease) => self.send_r2t(slot, sqe, len, lease),
                (SlotState::AwaitingBuffer(h), lease) => io::resume(self, slot, *h, lease),
                _ => unreachable!("only waiting slots are in the deferred queue"),
            }
        }
    }

    /// Runs a command whose data (if it sends any) is all here.
    fn execute(self: &Rc<Self>, binding: Option<Rc<Binding>>, slot: Option<u16>, sqe: Sqe, plan: DataPlan, data: Option<(IoBuf, Lease)>) {
        let Some(b) = binding else {
            return self.complete(slot, &sqe, Status::generic(sc::COMMAND_SEQUENCE_ERROR), 0, TxData::None);
        };
        let fabrics = sqe.opcode() == FABRICS_OPC;
        // Any command on the admin queue shows the host is alive, Fabrics ones too: during
        // authentication a host can send nothing else (not even Keep Alive), and a slow one
        // (a large Diffie-Hellman group on a small guest) must not be expired meanwhile.
        if b.qid == 0 && fabrics {
            b.ctrl.touch_keep_alive();
        }
        if fabrics && matches!(sqe.fctype(), fctype::AUTH_SEND | fctype::AUTH_RECEIVE) {
            let (status, out) = self.auth_command(&b, &sqe, &plan, data.as_ref().map(|(d, _)| d));
            return self.complete(slot, &sqe, status, 0, out);
        }
        // Until the host authenticates, the queue takes nothing else (but Disconnect).
        if self.st.borrow().auth.as_ref().is_some_and(|a| !a.authenticated()) && !(fabrics && sqe.fctype() == fctype::DISCONNECT) {
            return self.complete(slot, &sqe, Status::error(sct::COMMAND_SPECIFIC, csc::AUTH_REQUIRED), 0, TxData::None);
        }
        if fabrics {
            let (status, result) = match sqe.fctype() {
                fctype::PROPERTY_GET | fctype::PROPERTY_SET if b.qid == 0 => match b.ctrl.property(&self.nvmf, &sqe, sqe.fctype() == fctype::PROPERTY_SET) {
                    AdminOutcome::Done { status, result, .. } => (status, result),
                    AdminOutcome::Deferred => (Status::generic(sc::INTERNAL), 0),
                },
                fctype::DISCONNECT => {
                    self.complete(slot, &sqe, Status::SUCCESS, 0, TxData::None);
                    // The queue goes away once the completion is out.
                    self.closing.set(true);
                    self.tx_notify.notify();
                    return;
                }
                _ => (Status::generic(sc::INVALID_OPCODE), 0),
            };
            return self.complete(slot, &sqe, status, result, TxData::None);
        }
        if b.qid == 0 {
            let bytes: &[u8] = match (&plan, &data) {
                (DataPlan::InCapsule { offset, len }, Some((d, _))) => d.get(*offset as usize..(*offset + *len) as usize).unwrap_or(&[]),
                _ => &[],
            };
            match b.ctrl.admin(&self.nvmf, &sqe, bytes) {
                AdminOutcome::Deferred => {
                    // An AER: its id stays taken until the controller completes it.
                    if let Some(s) = slot {
                        self.st.borrow_mut().slots.release(s);
                    }
                }
                AdminOutcome::Done { status, result, mut data } => {
                    let to_host = match plan {
                        DataPlan::ToHost { len } => len as usize,
                        _ => 0,
                    };
                    data.truncate(to_host);
                    let out = if status.is_success() && !data.is_empty() { TxData::Vec(data) } else { TxData::None };
                    self.complete(slot, &sqe, status, result, out);
                }
            }
            return;
        }
        io::start(self, slot, b, sqe, plan, data);
    }

    /// Reserves a slot for an I/O command that carried its data in the capsule.
    pub(crate) fn take_slot(&self) -> Option<u16> {
        self.st.borrow_mut().slots.alloc()
    }

    /// AUTH_Send / AUTH_Receive: a step of the queue's DH-HMAC-CHAP transaction. A failed
    /// transaction is counted and logged (host NQN and address, never a key).
    fn auth_command(&self, b: &Binding, sqe: &Sqe, plan: &DataPlan, data: Option<&IoBuf>) -> (Status, TxData) {
        let s = &sqe.0;
        // TL (AUTH_Send) or AL (AUTH_Receive).
        let len = u32::from_le_bytes([s[44], s[45], s[46], s[47]]) as usize;
        if s[43] != auth::SECP_NVME || s[41] != auth::SPSP_NVME || s[42] != auth::SPSP_NVME || len == 0 {
            return (Status::generic(sc::INVALID_FIELD), TxData::None);
        }
        let mut st = self.st.borrow_mut();
        let Some(a) = st.auth.as_mut() else {
            // This host has no key here: there is nothing to authenticate.
            return (Status::generic(sc::COMMAND_SEQUENCE_ERROR), TxData::None);
        };
        let (outcome, out) = if sqe.fctype() == fctype::AUTH_SEND {
            let bytes = match (plan, data) {
                (DataPlan::InCapsule { offset, len: n }, Some(d)) if *n as usize == len => d.get(*offset as usize..(*offset + *n) as usize),
                _ => None,
            };
            let Some(bytes) = bytes.filter(|b| b.len() <= auth::MAX_MESSAGE) else {
                return (Status::generic(sc::INVALID_FIELD), TxData::None);
            };
            (a.send(bytes), TxData::None)
        } else {
            let room = match plan {
                DataPlan::ToHost { len: n } => (*n as usize).min(len),
                _ => 0,
            };
            match a.receive() {
                Ok((m, _)) if m.len() > room => return (Status::generic(sc::INVALID_FIELD), TxData::None),
                Ok((m, outcome)) => (outcome, TxData::Vec(m)),
                Err(auth::OutOfSequence) => return (Status::generic(sc::COMMAND_SEQUENCE_ERROR), TxData::None),
            }
        };
        drop(st);
        let (host, subnqn, qid) = (b.ctrl.host_display(), &b.ctrl.subsys.nqn, b.qid);
        match outcome {
            auth::Outcome::Pending => {}
            auth::Outcome::Authenticated => log::debug!("nvmf: host {host} ({}) authenticated on {subnqn} queue {qid}", self.peer),
            auth::Outcome::Failed(why) => {
                self.nvmf.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log::warn!("nvmf: host {host} ({}) failed DH-HMAC-CHAP authentication on {subnqn} queue {qid}: {why}", self.peer);
            }
        }
        (Status::SUCCESS, out)
    }

    /// Fabrics Connect: binds the queue to a controller (see [`controller::connect`]).
    /// Ok(Connect result: cntlid and AUTHREQ) or Err((status, IATTR, IPO)).
    fn on_connect(&self, sqe: &Sqe, plan: DataPlan, icd: Option<&[u8]>) -> Result<u32, (Status, u8, u16)> {
        if self.st.borrow().binding.is_some() {
            return Err((Status::generic(sc::COMMAND_SEQUENCE_ERROR), 0, 0));
        }
        let q = Connecting {
            nvmf: &self.nvmf,
            core: self.core,
            conn_id: self.id,
            peer: self.peer,
            listener: &self.listener,
            opts: &self.opts,
            tls: self.tls.as_ref(),
        };
        let (b, auth) = controller::connect(&q, sqe, plan, icd)?;
        let result = b.ctrl.cntlid as u32 | if auth.is_some() { auth::CONNECT_AUTHREQ_ATR } else { 0 };
        if auth.is_some() {
            let id = self.id;
            reactor::spawn_detached(async move {
                reactor::sleep(AUTH_DEADLINE).await;
                let Some(c) = lookup(id) else { return };
                if c.closing.get() || !c.st.borrow().auth.as_ref().is_some_and(|a| !a.authenticated()) {
                    return;
                }
                c.nvmf.auth_failures.fetch_add(1, Ordering::Relaxed);
                log::warn!("nvmf: connection {} from {} did not complete DH-HMAC-CHAP authentication in {AUTH_DEADLINE:?}; closed", c.id, c.peer);
                c.abort();
            });
        }
        let mut st = self.st.borrow_mut();
        st.slots.resize(b.sqsize as usize + 1);
        st.binding = Some(Rc::new(b));
        st.auth = auth;
        Ok(result)
    }

    /// After an admin queue's Connect (a new association): the drains of the commands the same
    /// host (Host Identifier) had admitted on the subsystem's namespaces before it, those not
    /// over yet. A host whose connection broke sends its unanswered commands again on the new
    /// association; if an earlier copy of a write were still running at the bdev, it could
    /// complete after the re-sent copy and after a newer write to the same blocks, and a mirror
    /// leg would silently hold the older data (found by the mirror simulation: seed 7843 with
    /// `SIM_CONN_LATE`). So the new association is answered only once every command of that
    /// host admitted before it has left the bdevs. Commands of the old connection still unread
    /// in its socket are read before its end, long before the new association's first I/O
    /// (a Connect, Property Sets and an I/O queue Connect come first). A live second path of
    /// the same host (multipath) only delays the answer by its commands already in flight; a
    /// host with nothing in flight waits for nothing.
    fn earlier_commands(&self) -> Option<(String, Vec<(u32, super::reservation::Drain)>)> {
        let b = self.st.borrow().binding.clone()?;
        if b.qid != 0 {
            return None;
        }
        let drains: Vec<_> =
            b.ctrl.subsys.namespaces().into_iter().filter_map(|ns| Some((ns.nsid, ns.resv.host_drain(b.ctrl.hostid)?))).filter(|(_, d)| !d.done()).collect();
        (!drains.is_empty()).then(|| (b.ctrl.subsys.nqn.clone(), drains))
    }

    /// Leaves the controller: an admin queue takes its controller down with it.
    fn detach(&self) {
        let b = self.st.borrow_mut().binding.take();
        self.st.borrow_mut().ns.clear();
        if let Some(b) = b {
            if b.qid == 0 {
                b.ctrl.take_aers();
                self.nvmf.destroy_controller(&b.ctrl, "admin queue disconnected");
            } else {
                b.ctrl.detach_io_queue(b.qid, self.id);
            }
        }
    }
}

/// Starts commands waiting for buffer budget when bytes come back to the core (from this
/// connection or another one of the core).
async fn budget_loop(conn: &Rc<Conn>) {
    // A closing connection starts nothing more: its held commands are dropped with it.
    while !conn.closing.get() {
        if let Some(want) = conn.start_deferred() {
            futures::future::select(std::pin::pin!(conn.budget.core().freed(want)), std::pin::pin!(conn.deferred_notify.wait())).await;
        } else {
            conn.deferred_notify.wait().await;
        }
    }
}

/// An empty vector of `IoSlice`s with the capacity of `v`, for slices of another lifetime:
/// the writer's iovec array keeps its allocation from one batch to the next.
fn recycle_iov<'a>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'a>> {
    v.clear();
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, cap) = (v.as_mut_ptr(), v.capacity());
    // SAFETY: the vector is empty, so no slice of the old lifetime survives; `IoSlice<'a>` and
    // `IoSlice<'b>` have the same layout (a lifetime is no part of it); the allocation is the
    // old vector's (not dropped, thanks to ManuallyDrop), with its capacity.
    unsafe { Vec::from_raw_parts(ptr.cast::<IoSlice<'a>>(), 0, cap) }
}

async fn write_loop(conn: &Conn) {
    let mut batch: Vec<TxPdu> = Vec::new();
    // Kept across batches (emptied): no allocation per batch once it reached its working size.
    let mut iov_store: Vec<IoSlice<'static>> = Vec::new();
    loop {
        std::mem::swap(&mut *conn.tx.borrow_mut(), &mut batch);
        if batch.is_empty() {
            if conn.closing.get() {
                break;
            }
            conn.tx_notify.wait().await;
            continue;
        }
        let mut iov: Vec<IoSlice<'_>> = recycle_iov(std::mem::take(&mut iov_store));
        iov.reserve(batch.len() * 3);
        for p in &batch {
            iov.push(IoSlice::new(p.hdr.as_slice()));
            match &p.data {
                TxData::None => {}
                TxData::Buf(b, n, _) => iov.push(IoSlice::new(&b[..*n])),
                TxData::Vec(v) => iov.push(IoSlice::new(v)),
            }
            if let Some(d) = &p.ddgst {
                iov.push(IoSlice::new(d));
            }
        }
        let mut failed = false;
        for chunk in iov.chunks_mut(IOV_MAX) {
            if let Err(e) = conn.stream.write_all_vectored(chunk).await {
                log::debug!("nvmf: connection {}: send failed: {e}", conn.id);
                failed = true;
                break;
            }
        }
        iov_store = recycle_iov(iov);
        batch.clear();
        if failed {
            conn.closing.set(true);
            conn.stream.shutdown();
            conn.slot_notify.notify();
            break;
        }
    }
    conn.tx.borrow_mut().clear();
    conn.writer_exited.set(true);
    conn.writer_notify.notify();
}
