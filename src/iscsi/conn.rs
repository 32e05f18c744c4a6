//! One iSCSI connection, owned by one core: login, then the full feature phase.
//!
//! Each session has exactly one connection (MaxConnections is negotiated to 1), so session
//! state (CmdSN window, StatSN, tasks) lives in the connection and needs no sharing.
//!
//! Three tasks per connection: the reader parses PDUs from a per-connection receive buffer
//! (data segments of writes go straight into the command's `IoBuf`), spawns one task per SCSI
//! command, and answers everything else in place; command tasks queue their responses; the
//! writer sends everything queued with one `writev` per loop iteration. A fourth, idle most of
//! the time, pings a silent initiator with NOP-In and drops the connection if it does not
//! answer.

use super::config::{Lun, TargetNode};
use super::login::{self, LoggedIn, Login, LoginContext, SessionType, Step};
use super::params::SessionParams;
use super::pdu::{self, opcode, reject, Bhs, BHS_LEN, RESERVED_TAG};
use super::text;
use super::IscsiShared;
use crate::bdev::{ConnBudget, IoBuf, IoType, Lease};
use crate::reactor::{self, TcpStream};
use crate::scsi::{self, cdb, inquiry, Command, Failure, Nexus, PortIdentity, Sense, Status};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// A login must finish within this time.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Initial size of the receive buffer (it grows up to one PDU of the negotiated size).
const RECV_BUF: usize = 64 * 1024;
/// Data segments at least this large are read straight into the command's buffer.
const DIRECT_READ_MIN: usize = 16 * 1024;
/// Most PDUs in one `writev`.
const WRITE_BATCH: usize = 64;
/// Immediate (I bit) commands in flight at once, beyond the CmdSN window.
const MAX_IMMEDIATE: u32 = 8;
/// Largest AHS accepted (an extended CDB of up to 260 bytes).
const MAX_AHS: usize = 264;
/// Largest Data-In buffer of commands that are not reads (their data is small).
const MAX_CONTROL_DATA_IN: u64 = 64 * 1024;
/// A connection whose budget (or its core's) has less room than this advertises one command
/// of CmdSN window at most: hosts slow down before their commands meet TASK SET FULL.
const BUDGET_PRESSURE_BYTES: u64 = 1 << 20;
/// How long a logout or a task management function waits for running commands.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What other cores and the RPC thread can do to a connection: close it.
pub(crate) struct ConnControl {
    stream: RefCell<Option<Rc<TcpStream>>>,
    closing: Cell<bool>,
}

impl ConnControl {
    pub(crate) fn close(&self) {
        self.closing.set(true);
        if let Some(s) = self.stream.borrow().as_ref() {
            s.shutdown();
        }
    }
}

/// The connections of one core, by id.
#[derive(Default)]
pub(crate) struct CoreConnections(pub(crate) RefCell<HashMap<u64, Rc<ConnControl>>>);

/// Closes connection `id` if this core owns it.
pub(crate) fn close_local(id: u64) {
    let conns = reactor::with_core(|c| c.local::<CoreConnections>());
    let c = conns.0.borrow().get(&id).cloned();
    if let Some(c) = c {
        c.close();
    }
}

/// Closes every connection of this core.
pub(crate) fn close_all_local() {
    let conns = reactor::with_core(|c| c.local::<CoreConnections>());
    let all: Vec<_> = conns.0.borrow().values().cloned().collect();
    for c in all {
        c.close();
    }
}

/// Serves one accepted connection to the end.
pub(crate) async fn serve(s: reactor::Accepted, shared: Arc<IscsiShared>, pg_tag: u16) {
    let stream = match TcpStream::from_accepted(s) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            log::warn!("iscsi: cannot take a connection: {e}");
            return;
        }
    };
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else { return };
    let id = shared.next_conn_id();
    let control = Rc::new(ConnControl { stream: RefCell::new(Some(stream.clone())), closing: Cell::new(false) });
    let conns = reactor::with_core(|c| c.local::<CoreConnections>());
    conns.0.borrow_mut().insert(id, control.clone());
    shared.counters.connections_accepted.fetch_add(1, Relaxed);
    let ctx = LoginContext { pg_tag, peer, local };
    let logged = reactor::timeout(LOGIN_TIMEOUT, login_phase(&stream, &shared, ctx, id)).await;
    match logged {
        Ok(Some((li, rb))) => {
            let node = li.node.clone();
            if let Some(n) = &node {
                n.connections.fetch_add(1, Relaxed);
                n.sessions.fetch_add(1, Relaxed);
            }
            let conn = Rc::new(Conn::new(id, stream.clone(), shared.clone(), control.clone(), &li, pg_tag, peer, local));
            conn.run(rb).await;
            if let Some(n) = &node {
                n.connections.fetch_sub(1, Relaxed);
                n.sessions.fetch_sub(1, Relaxed);
            }
            shared.remove_session(id);
        }
        Ok(None) => {}
        Err(_) => log::info!("iscsi: login from {peer} timed out"),
    }
    stream.shutdown();
    control.stream.borrow_mut().take();
    conns.0.borrow_mut().remove(&id);
}

/// Reads one whole PDU of the login phase: header and data (no digests during login).
async fn read_login_pdu(s: &TcpStream, rb: &mut RecvBuf) -> io::Result<(Bhs, Vec<u8>)> {
    rb.fill(s, BHS_LEN).await?;
    let bhs = Bhs::from_slice(rb.data()).ok_or(io::ErrorKind::InvalidData)?;
    let ahs = bhs.ahs_len();
    let dsl = bhs.data_len() as usize;
    if dsl > login::LOGIN_MAX_DSL as usize || ahs > MAX_AHS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "login PDU too large"));
    }
    rb.consume(BHS_LEN);
    rb.skip(s, ahs).await?;
    let mut data = vec![0u8; dsl];
    rb.read_segment(s, dsl, &mut data, false).await?;
    Ok((bhs, data))
}

async fn login_phase(s: &Rc<TcpStream>, shared: &Arc<IscsiShared>, ctx: LoginContext, id: u64) -> Option<(LoggedIn, RecvBuf)> {
    let mut rb = RecvBuf::new(RECV_BUF);
    let peer = ctx.peer;
    let mut login = Login::new(ctx.clone(), shared.initial_stat_sn());
    loop {
        let (bhs, data) = match read_login_pdu(s, &mut rb).await {
            Ok(x) => x,
            Err(e) => {
                log::debug!("iscsi: login from {peer} ended: {e}");
                return None;
            }
        };
        let step = {
            let reg = shared.registry();
            login.step(&reg, &bhs, &data)
        };
        match step {
            Step::Continue(resp) => {
                s.write_all(&resp).await.ok()?;
            }
            Step::Fail(resp) => {
                shared.counters.login_failures.fetch_add(1, Relaxed);
                log::info!("iscsi: login of {} from {peer} refused (status {:#04x}/{:#04x})", login.initiator().unwrap_or("?"), resp[36], resp[37]);
                let _ = s.write_all(&resp).await;
                return None;
            }
            Step::Complete(mut resp, li) => match shared.register_session(&li, id, &ctx).await {
                Ok(tsih) => {
                    resp[14..16].copy_from_slice(&tsih.to_be_bytes());
                    s.write_all(&resp).await.ok()?;
                    let name = li.node.as_ref().map(|n| n.name.as_str()).unwrap_or("discovery");
                    log::info!("iscsi: {} logged in to {name} from {peer} (tsih {tsih}, core {})", li.initiator, reactor::current_index());
                    return Some((*li, rb));
                }
                Err(st) => {
                    shared.counters.login_failures.fetch_add(1, Relaxed);
                    resp.truncate(BHS_LEN);
                    resp[1] &= !0x80;
                    resp[5..8].fill(0);
                    resp[36] = st.0;
                    resp[37] = st.1;
                    let _ = s.write_all(&resp).await;
                    return None;
                }
            },
        }
    }
}

/// The receive buffer: bytes read from the socket and not yet consumed.
pub(crate) struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new(cap: usize) -> Self {
        RecvBuf { buf: vec![0; cap], start: 0, end: 0 }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.available());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes at least `n` bytes available (the buffer grows to hold them).
    async fn fill(&mut self, s: &TcpStream, n: usize) -> io::Result<()> {
        if self.available() >= n {
            return Ok(());
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if n > self.buf.len() {
                self.buf.resize(n, 0);
            }
        }
        while self.available() < n {
            let r = s.read(&mut self.buf[self.end..]).await?;
            if r == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += r;
        }
        Ok(())
    }

    /// Fills `dest` from the buffer, then (for large remainders) straight from the socket.
    async fn read_into(&mut self, s: &TcpStream, dest: &mut [u8]) -> io::Result<()> {
        let mut done = self.available().min(dest.len());
        dest[..done].copy_from_slice(&self.data()[..done]);
        self.consume(done);
        while done < dest.len() {
            let rest = dest.len() - done;
            if rest < DIRECT_READ_MIN {
                self.fill(s, rest).await?;
                dest[done..].copy_from_slice(&self.data()[..rest]);
                self.consume(rest);
                return Ok(());
            }
            let r = s.read(&mut dest[done..]).await?;
            if r == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += r;
        }
        Ok(())
    }

    /// Discards `n` bytes; returns their CRC32C appended to `crc`.
    async fn skip_crc(&mut self, s: &TcpStream, mut n: usize, mut crc: u32) -> io::Result<u32> {
        while n > 0 {
            if self.available() == 0 {
                let want = n.min(self.buf.len());
                self.fill(s, want).await?;
            }
            let k = n.min(self.available());
            crc = crc32c::crc32c_append(crc, &self.data()[..k]);
            self.consume(k);
            n -= k;
        }
        Ok(crc)
    }

    async fn skip(&mut self, s: &TcpStream, n: usize) -> io::Result<()> {
        self.skip_crc(s, n, 0).await.map(|_| ())
    }

    /// Reads a data segment of `len` bytes with its padding and (if `digest`) its CRC32C: the
    /// first `dest.len()` bytes into `dest`, the rest discarded. Returns whether the digest
    /// matched (always true without digests).
    async fn read_segment(&mut self, s: &TcpStream, len: usize, dest: &mut [u8], digest: bool) -> io::Result<bool> {
        debug_assert!(dest.len() <= len);
        if len == 0 {
            // No data segment, so no padding and no data digest either.
            return Ok(true);
        }
        self.read_into(s, dest).await?;
        let crc = if digest { crc32c::crc32c(dest) } else { 0 };
        let crc = self.skip_crc(s, len - dest.len() + pdu::pad(len), crc).await?;
        if !digest {
            return Ok(true);
        }
        self.fill(s, 4).await?;
        let ok = self.data()[..4] == crc.to_le_bytes();
        self.consume(4);
        Ok(ok)
    }
}

/// Data of a queued PDU.
enum OutData {
    None,
    Owned(Vec<u8>),
    Shared(Rc<DataIn>, usize, usize),
}

struct OutPdu {
    /// BHS plus header digest.
    hdr: [u8; BHS_LEN + 4],
    hdr_len: u8,
    data: OutData,
    /// Padding plus data digest.
    tail: [u8; 8],
    tail_len: u8,
}

impl OutPdu {
    fn data(&self) -> &[u8] {
        match &self.data {
            OutData::None => &[],
            OutData::Owned(v) => v,
            OutData::Shared(b, off, len) => &b.buf[*off..*off + *len],
        }
    }
}

/// Data-In of a command, queued for the writer, with its share of the buffer budget.
struct DataIn {
    buf: IoBuf,
    _mem: Option<Lease>,
}

/// A command whose Data-Out is still arriving.
struct WriteXfer {
    itt: u32,
    immediate: bool,
    lun: Arc<Lun>,
    nexus: Rc<Nexus>,
    lun_field: [u8; 8],
    cmd: Command,
    buf: IoBuf,
    edtl: u32,
    /// Bytes the command takes: min(EDTL, what the CDB needs).
    collect: u32,
    /// The CDB's need (for the residual).
    need: u32,
    unsolicited_end: u32,
    unsolicited_pending: bool,
    unsolicited_data_sn: u32,
    next_r2t: u32,
    r2ts: Vec<R2tState>,
    r2t_sn: u32,
    /// Set when data arrived damaged (digest): the command ends with CHECK CONDITION.
    failed: Option<Sense>,
    t0: u64,
    mem: Option<Lease>,
}

struct R2tState {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    data_sn: u32,
}

/// Bookkeeping of a running command (for aborts).
struct Running {
    lun: u64,
    aborted: Cell<bool>,
    done: Cell<bool>,
}

enum TaskSlot {
    Receiving(Box<WriteXfer>),
    Running(Rc<Running>),
}

struct State {
    stat_sn: u32,
    exp_cmd_sn: u32,
    /// Non-immediate SCSI commands accepted and not yet answered.
    in_flight: u32,
    immediate: u32,
    tasks: HashMap<u32, TaskSlot, TagHash>,
    next_ttt: u32,
    lun_generation: u64,
    luns: Arc<Vec<Arc<Lun>>>,
    lun_ids: Rc<[u64]>,
    nexus: HashMap<u64, Rc<Nexus>, TagHash>,
    /// Outstanding target ping: (TTT, deadline).
    ping: Option<(u32, u64)>,
    last_rx_ns: u64,
    /// Rest of a SendTargets answer too long for one PDU: (TTT, bytes).
    text_rest: Option<(u32, Vec<u8>)>,
}

struct Conn {
    id: u64,
    stream: Rc<TcpStream>,
    shared: Arc<IscsiShared>,
    control: Rc<ConnControl>,
    p: SessionParams,
    kind: SessionType,
    node: Option<Arc<TargetNode>>,
    port: PortIdentity,
    /// The I_T nexus of this session (persistent reservations).
    it: scsi::ItNexus,
    pg_tag: u16,
    initiator: String,
    peer: SocketAddr,
    local: SocketAddr,
    queue_depth: u32,
    st: RefCell<State>,
    out: RefCell<VecDeque<OutPdu>>,
    writer_waker: RefCell<Option<Waker>>,
    /// Close the socket once the queue is written (after a logout response).
    close_after_flush: Cell<bool>,
    /// This connection's account in the buffer budget: every command's Data-Out and Data-In
    /// buffers are charged to it (a command that does not fit gets TASK SET FULL).
    budget: Rc<ConnBudget>,
}

/// Why the reader stops.
enum Stop {
    Io(io::Error),
    Protocol(&'static str),
    Closed,
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: u64,
        stream: Rc<TcpStream>,
        shared: Arc<IscsiShared>,
        control: Rc<ConnControl>,
        li: &LoggedIn,
        pg_tag: u16,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Conn {
        let (luns, generation) = match &li.node {
            Some(n) => {
                let g = n.luns_generation.load(Relaxed);
                (n.luns(), g)
            }
            None => (Arc::new(Vec::new()), 0),
        };
        let lun_ids: Rc<[u64]> = luns.iter().map(|l| l.id).collect();
        Conn {
            id,
            stream,
            shared,
            control,
            p: li.params.clone(),
            kind: li.session_type,
            port: PortIdentity { target_name: li.node.as_ref().map(|n| n.name.clone()).unwrap_or_default(), portal_group_tag: pg_tag },
            it: scsi::ItNexus::iscsi(&li.initiator, li.isid, li.node.as_ref().map(|n| n.name.as_str()).unwrap_or_default(), pg_tag),
            node: li.node.clone(),
            pg_tag,
            initiator: li.initiator.clone(),
            peer,
            local,
            queue_depth: li.queue_depth.max(1),
            st: RefCell::new(State {
                stat_sn: li.stat_sn,
                exp_cmd_sn: li.exp_cmd_sn,
                in_flight: 0,
                immediate: 0,
                tasks: HashMap::with_capacity_and_hasher(64, TagHash::default()),
                next_ttt: 1,
                lun_generation: generation,
                luns,
                lun_ids,
                nexus: HashMap::default(),
                ping: None,
                last_rx_ns: reactor::now_ns(),
                text_rest: None,
            }),
            out: RefCell::new(VecDeque::new()),
            writer_waker: RefCell::new(None),
            close_after_flush: Cell::new(false),
            budget: ConnBudget::new(),
        }
    }

    async fn run(self: &Rc<Self>, rb: RecvBuf) {
        let writer = reactor::spawn(self.clone().writer());
        let pinger = reactor::spawn(self.clone().pinger());
        let r = self.reader(rb).await;
        match r {
            Err(Stop::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => log::debug!("iscsi: connection {} from {}: {e}", self.id, self.peer),
            Err(Stop::Protocol(why)) => log::warn!("iscsi: dropping connection {} from {}: {why}", self.id, self.peer),
            _ => {}
        }
        self.control.closing.set(true);
        self.wake_writer();
        // Commands in flight own buffers the bdevs write into: wait for them before leaving.
        let start = reactor::now_ns();
        loop {
            let running = self.st.borrow().tasks.values().any(|t| matches!(t, TaskSlot::Running(r) if !r.done.get()));
            if !running || reactor::now_ns().saturating_sub(start) > DRAIN_TIMEOUT.as_nanos() as u64 {
                break;
            }
            reactor::sleep(Duration::from_micros(200)).await;
        }
        self.st.borrow_mut().tasks.clear();
        drop(pinger);
        // Let the writer send what is queued (a Reject, a logout answer), but not forever.
        let _ = reactor::timeout(Duration::from_secs(5), writer).await;
        self.stream.shutdown();
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Stamps StatSN (advancing it when `advance`), ExpCmdSN and MaxCmdSN at bytes 24-35.
    fn stamp(&self, h: &mut Bhs, advance: bool) {
        let mut st = self.st.borrow_mut();
        h.set_u32(24, st.stat_sn);
        if advance {
            st.stat_sn = st.stat_sn.wrapping_add(1);
        }
        h.set_u32(28, st.exp_cmd_sn);
        let mut free = self.queue_depth.saturating_sub(st.in_flight);
        if self.budget.under_pressure(BUDGET_PRESSURE_BYTES) {
            // Fewer credits while buffers are short (hosts ignore a MaxCmdSN that goes back,
            // so the window only stops growing).
            free = free.min(1);
        }
        h.set_u32(32, st.exp_cmd_sn.wrapping_add(free).wrapping_sub(1));
    }

    /// Queues a PDU for the writer, with digests and padding.
    fn queue(&self, mut h: Bhs, data: OutData) {
        let mut p = OutPdu { hdr: [0; BHS_LEN + 4], hdr_len: BHS_LEN as u8, data, tail: [0; 8], tail_len: 0 };
        let len = p.data().len();
        h.set_data_len(len as u32);
        p.hdr[..BHS_LEN].copy_from_slice(&h.0);
        if self.p.header_digest {
            let d = pdu::digest(&[&h.0]);
            p.hdr[BHS_LEN..].copy_from_slice(&d);
            p.hdr_len += 4;
        }
        let padn = pdu::pad(len);
        p.tail_len = padn as u8;
        if self.p.data_digest && len > 0 {
            let d = pdu::digest(&[p.data(), &[0u8; 3][..padn]]);
            p.tail[padn..padn + 4].copy_from_slice(&d);
            p.tail_len += 4;
        }
        self.out.borrow_mut().push_back(p);
        self.wake_writer();
    }

    async fn writer(self: Rc<Self>) {
        let mut batch: Vec<OutPdu> = Vec::with_capacity(WRITE_BATCH);
        loop {
            std::future::poll_fn(|cx| {
                if !self.out.borrow().is_empty() || self.control.closing.get() {
                    Poll::Ready(())
                } else {
                    *self.writer_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            {
                let mut q = self.out.borrow_mut();
                if q.is_empty() {
                    // Closing and nothing left to send.
                    return;
                }
                let n = q.len().min(WRITE_BATCH);
                batch.extend(q.drain(..n));
            }
            let mut iov = [IoSlice::new(&[]); WRITE_BATCH * 3];
            let mut k = 0;
            for p in &batch {
                iov[k] = IoSlice::new(&p.hdr[..p.hdr_len as usize]);
                k += 1;
                let d = p.data();
                if !d.is_empty() {
                    iov[k] = IoSlice::new(d);
                    k += 1;
                }
                if p.tail_len > 0 {
                    iov[k] = IoSlice::new(&p.tail[..p.tail_len as usize]);
                    k += 1;
                }
            }
            let r = self.stream.write_all_vectored(&mut iov[..k]).await;
            batch.clear();
            if r.is_err() {
                self.control.close();
                self.out.borrow_mut().clear();
                return;
            }
            if self.close_after_flush.get() && self.out.borrow().is_empty() {
                self.control.close();
                return;
            }
        }
    }

    /// Pings a silent initiator and drops it when it stops answering.
    async fn pinger(self: Rc<Self>) {
        let (interval, timeout) = {
            let o = &self.shared.registry().options;
            (o.nop_in_interval as u64 * 1_000_000_000, o.nop_timeout as u64 * 1_000_000_000)
        };
        let tick = Duration::from_nanos((interval / 4).clamp(100_000_000, 1_000_000_000));
        loop {
            reactor::sleep(tick).await;
            if self.control.closing.get() {
                return;
            }
            let now = reactor::now_ns();
            let send = {
                let mut st = self.st.borrow_mut();
                match st.ping {
                    Some((_, deadline)) if now > deadline => {
                        drop(st);
                        log::warn!(
                            "iscsi: {} at {} did not answer a NOP-In in {} s: dropping the connection",
                            self.initiator,
                            self.peer,
                            timeout / 1_000_000_000
                        );
                        self.shared.counters.nop_timeouts.fetch_add(1, Relaxed);
                        self.control.close();
                        return;
                    }
                    Some(_) => None,
                    None if now.saturating_sub(st.last_rx_ns) >= interval => {
                        let ttt = next_ttt(&mut st);
                        st.ping = Some((ttt, now + timeout));
                        Some(ttt)
                    }
                    None => None,
                }
            };
            if let Some(ttt) = send {
                let mut h = Bhs::new(opcode::NOP_IN);
                h.0[1] = 0x80;
                h.set_u32(16, RESERVED_TAG);
                h.set_u32(20, ttt);
                self.stamp(&mut h, false);
                self.queue(h, OutData::None);
            }
        }
    }

    fn reject(&self, reason: u8, rejected: &Bhs) {
        let mut h = Bhs::new(opcode::REJECT);
        h.0[1] = 0x80;
        h.0[2] = reason;
        h.set_u32(16, RESERVED_TAG);
        self.stamp(&mut h, true);
        self.queue(h, OutData::Owned(rejected.0.to_vec()));
    }

    async fn reader(self: &Rc<Self>, mut rb: RecvBuf) -> Result<(), Stop> {
        let s = &*self.stream;
        let hd = if self.p.header_digest { 4 } else { 0 };
        loop {
            if self.control.closing.get() {
                return Err(Stop::Closed);
            }
            rb.fill(s, BHS_LEN).await?;
            let bhs = Bhs::from_slice(rb.data()).ok_or(Stop::Protocol("short header"))?;
            let ahs = bhs.ahs_len();
            if ahs > MAX_AHS {
                return Err(Stop::Protocol("AHS too long"));
            }
            rb.fill(s, BHS_LEN + ahs + hd).await?;
            if hd > 0 {
                let d = pdu::digest(&[&rb.data()[..BHS_LEN + ahs]]);
                if rb.data()[BHS_LEN + ahs..BHS_LEN + ahs + 4] != d {
                    // The lengths in a damaged header cannot be trusted: nothing to resync on.
                    self.shared.counters.digest_errors.fetch_add(1, Relaxed);
                    return Err(Stop::Protocol("header digest error"));
                }
            }
            let ahs_bytes: Vec<u8> = if ahs > 0 { rb.data()[BHS_LEN..BHS_LEN + ahs].to_vec() } else { Vec::new() };
            rb.consume(BHS_LEN + ahs + hd);
            let dsl = bhs.data_len() as usize;
            if dsl > self.p.max_recv_dsl as usize {
                self.reject(reject::PROTOCOL_ERROR, &bhs);
                self.close_after_flush.set(true);
                return Err(Stop::Protocol("data segment longer than MaxRecvDataSegmentLength"));
            }
            self.st.borrow_mut().last_rx_ns = reactor::now_ns();
            log::trace!("iscsi: connection {} received {:?}", self.id, bhs);
            match bhs.opcode() {
                opcode::SCSI_CMD => self.scsi_command(&bhs, &ahs_bytes, &mut rb).await?,
                opcode::DATA_OUT => self.data_out(&bhs, &mut rb).await?,
                op => {
                    let mut data = vec![0u8; dsl];
                    let ok = rb.read_segment(s, dsl, &mut data, self.p.data_digest).await?;
                    if !ok {
                        self.shared.counters.digest_errors.fetch_add(1, Relaxed);
                        self.reject(reject::DATA_DIGEST_ERROR, &bhs);
                        continue;
                    }
                    match op {
                        opcode::NOP_OUT => self.nop_out(&bhs, data),
                        opcode::TEXT_REQ => self.text(&bhs, &data),
                        opcode::TMF_REQ => self.task_management(&bhs),
                        opcode::LOGOUT_REQ => self.logout(&bhs),
                        opcode::SNACK => self.reject(reject::SNACK_REJECT, &bhs),
                        _ => self.reject(reject::COMMAND_NOT_SUPPORTED, &bhs),
                    }
                }
            }
        }
    }

    /// CmdSN check of a non-immediate request: Some(true) accepted (ExpCmdSN advanced), false
    /// outside the window (silently ignored, RFC 7143 §4.2.2.1).
    fn accept_cmd_sn(&self, bhs: &Bhs) -> bool {
        if bhs.immediate() {
            return true;
        }
        let mut st = self.st.borrow_mut();
        if bhs.u32(24) != st.exp_cmd_sn {
            return false;
        }
        st.exp_cmd_sn = st.exp_cmd_sn.wrapping_add(1);
        true
    }

    fn refresh_luns(&self, st: &mut State) {
        let Some(node) = &self.node else { return };
        let g = node.luns_generation.load(Relaxed);
        if g == st.lun_generation {
            return;
        }
        st.lun_generation = g;
        st.luns = node.luns();
        st.lun_ids = st.luns.iter().map(|l| l.id).collect();
        let ids = st.lun_ids.clone();
        st.nexus.retain(|id, _| ids.contains(id));
        for nx in st.nexus.values() {
            nx.add_unit_attention(scsi::sense::asc::REPORTED_LUNS_DATA_HAS_CHANGED);
        }
    }

    /// The LUN and this connection's nexus on it.
    fn lookup(&self, lun: u64) -> Option<(Arc<Lun>, Rc<Nexus>)> {
        let mut st = self.st.borrow_mut();
        self.refresh_luns(&mut st);
        let l = st.luns.iter().find(|l| l.id == lun)?.clone();
        if let Some(nx) = st.nexus.get(&lun) {
            return Some((l, nx.clone()));
        }
        match l.unit.nexus(self.it.clone()) {
            Ok(nx) => {
                let nx = Rc::new(nx);
                st.nexus.insert(lun, nx.clone());
                Some((l, nx))
            }
            Err(e) => {
                log::warn!("iscsi: cannot open LUN {lun} of {}: {e}", self.port.target_name);
                None
            }
        }
    }

    async fn scsi_command(self: &Rc<Self>, bhs: &Bhs, ahs: &[u8], rb: &mut RecvBuf) -> Result<(), Stop> {
        let s = &*self.stream;
        let dsl = bhs.data_len() as usize;
        let itt = bhs.itt();
        if self.kind == SessionType::Discovery {
            rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return Ok(());
        }
        if !self.accept_cmd_sn(bhs) {
            rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
            return Ok(());
        }
        let immediate = bhs.immediate();
        {
            let mut st = self.st.borrow_mut();
            if st.tasks.contains_key(&itt) || itt == RESERVED_TAG {
                drop(st);
                rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
                self.reject(reject::PROTOCOL_ERROR, bhs);
                return Ok(());
            }
            if immediate {
                if st.immediate >= MAX_IMMEDIATE {
                    drop(st);
                    rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
                    self.reject(reject::IMMEDIATE_COMMAND_REJECT, bhs);
                    return Ok(());
                }
                st.immediate += 1;
            } else {
                st.in_flight += 1;
            }
        }
        let flags = bhs.flags();
        let edtl = bhs.u32(20);
        let lun_field = bhs.lun();
        // CDBs longer than 16 bytes (extended CDB AHS) are not used by any supported command.
        let long_cdb = ahs.len() >= 3 && ahs[2] == 0x01;
        let cdb_bytes = &bhs.0[32..48];
        let unit = scsi::decode_lun(&lun_field).and_then(|l| self.lookup(l));
        let t0 = reactor::now_ns();
        let parsed: Result<Command, Sense> = if long_cdb {
            Err(Sense::invalid_opcode())
        } else {
            match &unit {
                Some((l, _)) => cdb::parse(cdb_bytes, &l.unit.geometry()),
                None => match cdb::parse(cdb_bytes, &cdb::Geometry { block_size: 512, num_blocks: 1 }) {
                    Ok(c @ (Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. })) => Ok(c),
                    _ => Err(Sense::lun_not_supported()),
                },
            }
        };
        let write_flag = flags & pdu::FLAG_WRITE != 0;
        let need = match (&parsed, &unit) {
            (Ok(c), Some((l, _))) => c.data_out_len(&l.unit.geometry()).min(u32::MAX as u64) as u32,
            _ => 0,
        };
        let collect = if write_flag { need.min(edtl) } else { 0 };
        // The buffers this command will hold: its Data-Out and its Data-In.
        let din = match (&parsed, &unit) {
            (Ok(c @ Command::Read { .. }), Some((l, _))) => c.data_in_len(&l.unit.geometry()),
            (Ok(c), Some((l, _))) => c.data_in_len(&l.unit.geometry()).min(MAX_CONTROL_DATA_IN),
            _ => 0,
        };
        let bytes = din + if collect > 0 { need as u64 } else { 0 };
        let mem = if bytes > 0 {
            match self.budget.try_charge(bytes) {
                Ok(lease) => Some(lease),
                Err(_) => {
                    // Out of budget (the connection's or its core's): the host retries later.
                    rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
                    self.release_slot(immediate);
                    self.send_response(itt, Status::TaskSetFull as u8, None, 0, 0, 0);
                    return Ok(());
                }
            }
        } else {
            None
        };
        let (Ok(cmd), Some((lun, nexus)), true) = (parsed, unit.clone(), collect > 0) else {
            // No Data-Out to collect: absorb any immediate data and run the command now.
            let ok = rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
            if !ok {
                self.shared.counters.digest_errors.fetch_add(1, Relaxed);
                self.reject(reject::DATA_DIGEST_ERROR, bhs);
                self.release_slot(immediate);
                return Ok(());
            }
            let run = Rc::new(Running { lun: scsi::decode_lun(&lun_field).unwrap_or(u64::MAX), aborted: Cell::new(false), done: Cell::new(false) });
            self.st.borrow_mut().tasks.insert(itt, TaskSlot::Running(run.clone()));
            let job = Job { itt, immediate, lun_field, flags, edtl, need, unit, cmd: parsed, data: None, run, t0, failed: None, mem };
            reactor::spawn_detached(self.clone().execute(job));
            return Ok(());
        };
        // A write: set up the transfer, take the immediate data, solicit the rest.
        let p = &self.p;
        if dsl > 0 && (!p.immediate_data || dsl as u32 > p.first_burst.min(edtl.max(1))) {
            rb.read_segment(s, dsl, &mut [], p.data_digest).await?;
            self.release_slot(immediate);
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return Ok(());
        }
        let mut x = Box::new(WriteXfer {
            itt,
            immediate,
            lun,
            nexus,
            lun_field,
            cmd,
            buf: IoBuf::alloc(need as usize),
            edtl,
            collect,
            need,
            unsolicited_end: dsl as u32,
            unsolicited_pending: false,
            unsolicited_data_sn: 0,
            next_r2t: 0,
            r2ts: Vec::new(),
            r2t_sn: 0,
            failed: None,
            t0,
            mem,
        });
        let take = dsl.min(collect as usize);
        let ok = rb.read_segment(s, dsl, &mut x.buf[..take], p.data_digest).await?;
        if !ok {
            self.shared.counters.digest_errors.fetch_add(1, Relaxed);
            self.reject(reject::DATA_DIGEST_ERROR, bhs);
            x.failed = Some(Sense::new(scsi::SenseKey::AbortedCommand, (0x47, 0x01)));
        }
        if !p.initial_r2t && flags & pdu::FLAG_FINAL == 0 {
            x.unsolicited_end = p.first_burst.min(edtl).max(dsl as u32);
            x.unsolicited_pending = x.unsolicited_end > dsl as u32;
        }
        x.next_r2t = x.unsolicited_end;
        self.advance_write(x);
        Ok(())
    }

    fn release_slot(&self, immediate: bool) {
        let mut st = self.st.borrow_mut();
        if immediate {
            st.immediate = st.immediate.saturating_sub(1);
        } else {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }

    /// Sends the R2Ts a transfer may have outstanding, or runs the command once all its data
    /// is in.
    fn advance_write(self: &Rc<Self>, mut x: Box<WriteXfer>) {
        while x.r2ts.len() < self.p.max_outstanding_r2t as usize && x.next_r2t < x.collect {
            let len = (x.collect - x.next_r2t).min(self.p.max_burst);
            let ttt = next_ttt(&mut self.st.borrow_mut());
            let mut h = Bhs::new(opcode::R2T);
            h.0[1] = 0x80;
            h.set_lun(&x.lun_field);
            h.set_u32(16, x.itt);
            h.set_u32(20, ttt);
            self.stamp(&mut h, false);
            h.set_u32(36, x.r2t_sn);
            h.set_u32(40, x.next_r2t);
            h.set_u32(44, len);
            self.queue(h, OutData::None);
            x.r2ts.push(R2tState { ttt, offset: x.next_r2t, len, received: 0, data_sn: 0 });
            x.r2t_sn += 1;
            x.next_r2t += len;
        }
        if x.unsolicited_pending || !x.r2ts.is_empty() || x.next_r2t < x.collect {
            self.st.borrow_mut().tasks.insert(x.itt, TaskSlot::Receiving(x));
            return;
        }
        let x = *x;
        let run = Rc::new(Running { lun: scsi::decode_lun(&x.lun_field).unwrap_or(u64::MAX), aborted: Cell::new(false), done: Cell::new(false) });
        self.st.borrow_mut().tasks.insert(x.itt, TaskSlot::Running(run.clone()));
        let job = Job {
            itt: x.itt,
            immediate: x.immediate,
            lun_field: x.lun_field,
            flags: pdu::FLAG_WRITE,
            edtl: x.edtl,
            need: x.need,
            unit: Some((x.lun, x.nexus)),
            cmd: Ok(x.cmd),
            data: Some((x.buf, x.collect as usize)),
            run,
            t0: x.t0,
            failed: x.failed,
            mem: x.mem,
        };
        reactor::spawn_detached(self.clone().execute(job));
    }

    async fn data_out(self: &Rc<Self>, bhs: &Bhs, rb: &mut RecvBuf) -> Result<(), Stop> {
        let s = &*self.stream;
        let dsl = bhs.data_len() as usize;
        let itt = bhs.itt();
        let slot = self.st.borrow_mut().tasks.remove(&itt);
        let mut x = match slot {
            Some(TaskSlot::Receiving(x)) => x,
            other => {
                // Data for a command that is gone (aborted, failed early): discard it.
                if let Some(o) = other {
                    self.st.borrow_mut().tasks.insert(itt, o);
                }
                rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
                return Ok(());
            }
        };
        let ttt = bhs.u32(20);
        let data_sn = bhs.u32(36);
        let offset = bhs.u32(40);
        let end = offset as u64 + dsl as u64;
        let r2t = x.r2ts.iter().position(|r| r.ttt == ttt);
        let valid = if ttt == RESERVED_TAG {
            x.unsolicited_pending && end <= x.unsolicited_end as u64 && data_sn == x.unsolicited_data_sn
        } else {
            r2t.is_some_and(|i| {
                let r = &x.r2ts[i];
                offset >= r.offset && end <= (r.offset + r.len) as u64 && data_sn == r.data_sn
            })
        };
        if !valid || end > x.edtl as u64 {
            // ErrorRecoveryLevel 0 has no way to recover a broken sequence.
            self.reject(reject::PROTOCOL_ERROR, bhs);
            self.close_after_flush.set(true);
            return Err(Stop::Protocol("Data-Out outside what was solicited"));
        }
        let lo = (offset as usize).min(x.collect as usize);
        let hi = (end as usize).min(x.collect as usize);
        let ok = rb.read_segment(s, dsl, &mut x.buf[lo..hi], self.p.data_digest).await?;
        if !ok {
            self.shared.counters.digest_errors.fetch_add(1, Relaxed);
            self.reject(reject::DATA_DIGEST_ERROR, bhs);
            x.failed = Some(Sense::new(scsi::SenseKey::AbortedCommand, (0x47, 0x01)));
        }
        let fin = bhs.is_final();
        if ttt == RESERVED_TAG {
            x.unsolicited_data_sn += 1;
            if fin || end >= x.unsolicited_end as u64 {
                x.unsolicited_pending = false;
            }
        } else if let Some(i) = r2t {
            let r = &mut x.r2ts[i];
            r.received += dsl as u32;
            r.data_sn += 1;
            if fin || r.received >= r.len {
                x.r2ts.remove(i);
            }
        }
        self.advance_write(x);
        Ok(())
    }

    fn nop_out(&self, bhs: &Bhs, mut data: Vec<u8>) {
        if !bhs.immediate() && !self.accept_cmd_sn(bhs) {
            return;
        }
        let itt = bhs.itt();
        if itt == RESERVED_TAG {
            // An answer to our ping (or a bare CmdSN update).
            let mut st = self.st.borrow_mut();
            if st.ping.is_some_and(|(t, _)| t == bhs.u32(20)) {
                st.ping = None;
            }
            return;
        }
        data.truncate(self.p.max_send_dsl as usize);
        let mut h = Bhs::new(opcode::NOP_IN);
        h.0[1] = 0x80;
        h.set_lun(&bhs.lun());
        h.set_u32(16, itt);
        h.set_u32(20, RESERVED_TAG);
        self.stamp(&mut h, true);
        self.queue(h, if data.is_empty() { OutData::None } else { OutData::Owned(data) });
    }

    fn text(&self, bhs: &Bhs, data: &[u8]) {
        if !self.accept_cmd_sn(bhs) {
            return;
        }
        let ttt = bhs.u32(20);
        let body = if ttt != RESERVED_TAG {
            // The initiator asks for the rest of a long answer.
            match self.st.borrow_mut().text_rest.take() {
                Some((t, rest)) if t == ttt => rest,
                _ => {
                    self.reject(reject::INVALID_PDU_FIELD, bhs);
                    return;
                }
            }
        } else {
            self.st.borrow_mut().text_rest = None;
            let keys = match text::parse(data) {
                Ok(k) => k,
                Err(_) => {
                    self.reject(reject::PROTOCOL_ERROR, bhs);
                    return;
                }
            };
            let mut out = Vec::new();
            for (k, v) in &keys {
                if k == "SendTargets" {
                    let only = match (self.kind, v.as_str()) {
                        (SessionType::Discovery, "All") => None,
                        (SessionType::Discovery, name) => Some(name.to_string()),
                        // A normal session only learns about its own target.
                        (SessionType::Normal, _) => Some(self.port.target_name.clone()),
                    };
                    let pairs = self.shared.registry().send_targets(self.pg_tag, &self.initiator, self.peer.ip(), self.local, only.as_deref());
                    for (k, v) in pairs {
                        text::push(&mut out, &k, &v);
                    }
                } else {
                    text::push(&mut out, k, "NotUnderstood");
                }
            }
            out
        };
        let max = self.p.max_send_dsl as usize;
        let mut h = Bhs::new(opcode::TEXT_RESP);
        h.set_lun(&bhs.lun());
        h.set_u32(16, bhs.itt());
        let (now, rest) = if body.len() > max { (body[..max].to_vec(), Some(body[max..].to_vec())) } else { (body, None) };
        match rest {
            Some(rest) => {
                let t = next_ttt(&mut self.st.borrow_mut());
                h.0[1] = 0x40; // C: continued in the next response
                h.set_u32(20, t);
                self.st.borrow_mut().text_rest = Some((t, rest));
            }
            None => {
                h.0[1] = 0x80;
                h.set_u32(20, RESERVED_TAG);
            }
        }
        self.stamp(&mut h, true);
        self.queue(h, OutData::Owned(now));
    }

    fn logout(self: &Rc<Self>, bhs: &Bhs) {
        if !self.accept_cmd_sn(bhs) {
            return;
        }
        let reason = bhs.flags() & 0x7F;
        let itt = bhs.itt();
        let this = self.clone();
        reactor::spawn_detached(async move {
            // Outstanding commands complete before the logout answer (RFC 7143 §11.14).
            this.drain(|_| true).await;
            let mut h = Bhs::new(opcode::LOGOUT_RESP);
            h.0[1] = 0x80;
            // Removing a connection for recovery needs ErrorRecoveryLevel 2.
            h.0[2] = if reason == 2 { 2 } else { 0 };
            h.set_u32(16, itt);
            this.stamp(&mut h, true);
            h.set_u16(40, this.p.time2wait as u16);
            h.set_u16(42, this.p.time2retain as u16);
            this.close_after_flush.set(reason != 2);
            this.queue(h, OutData::None);
        });
    }

    /// Waits until no running command matches `which` (bounded).
    async fn drain(&self, which: impl Fn(&Running) -> bool) {
        let start = reactor::now_ns();
        loop {
            let busy = self.st.borrow().tasks.values().any(|t| matches!(t, TaskSlot::Running(r) if !r.done.get() && which(r)));
            if !busy || reactor::now_ns().saturating_sub(start) > DRAIN_TIMEOUT.as_nanos() as u64 {
                return;
            }
            reactor::sleep(Duration::from_micros(100)).await;
        }
    }

    /// Aborts the tasks of this connection that match: transfers still receiving data are
    /// dropped; running ones finish but send no response.
    fn abort_where(&self, which: impl Fn(u32, u64) -> bool) -> usize {
        let mut st = self.st.borrow_mut();
        let mut n = 0;
        let mut released = (0u32, 0u32);
        st.tasks.retain(|&itt, t| match t {
            TaskSlot::Receiving(x) => {
                let lun = scsi::decode_lun(&x.lun_field).unwrap_or(u64::MAX);
                if which(itt, lun) {
                    n += 1;
                    if x.immediate {
                        released.1 += 1;
                    } else {
                        released.0 += 1;
                    }
                    false
                } else {
                    true
                }
            }
            TaskSlot::Running(r) => {
                if which(itt, r.lun) && !r.done.get() {
                    r.aborted.set(true);
                    n += 1;
                }
                true
            }
        });
        st.in_flight = st.in_flight.saturating_sub(released.0);
        st.immediate = st.immediate.saturating_sub(released.1);
        n
    }

    fn task_management(self: &Rc<Self>, bhs: &Bhs) {
        if self.kind == SessionType::Discovery {
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return;
        }
        // The TMF's own CmdSN, before the window moves.
        let tmf_cmd_sn = bhs.u32(24);
        let (exp, max) = {
            let st = self.st.borrow();
            let free = self.queue_depth.saturating_sub(st.in_flight);
            (st.exp_cmd_sn, st.exp_cmd_sn.wrapping_add(free).wrapping_sub(1))
        };
        if !self.accept_cmd_sn(bhs) {
            return;
        }
        const COMPLETE: u8 = 0;
        const NO_TASK: u8 = 1;
        const NO_LUN: u8 = 2;
        const NOT_SUPPORTED: u8 = 5;
        const REASSIGN_NOT_SUPPORTED: u8 = 4;
        let function = bhs.flags() & 0x7F;
        let itt = bhs.itt();
        let lun_id = scsi::decode_lun(&bhs.lun());
        let lun_exists = lun_id.is_some_and(|l| self.lookup(l).is_some());
        let response: u8;
        let mut wait_lun: Option<Option<u64>> = None;
        match function {
            1 => {
                // ABORT TASK
                let rtt = bhs.u32(20);
                let ref_cmd_sn = bhs.u32(32);
                let exists = self.st.borrow().tasks.contains_key(&rtt);
                if exists {
                    self.abort_where(|t, _| t == rtt);
                    wait_lun = Some(lun_id);
                    response = COMPLETE;
                } else if pdu::sn_le(exp, ref_cmd_sn) && pdu::sn_le(ref_cmd_sn, max) && pdu::sn_lt(ref_cmd_sn, tmf_cmd_sn) {
                    // Never received but within the window: consider it received and done.
                    response = COMPLETE;
                } else {
                    response = NO_TASK;
                }
            }
            2 | 4 => {
                // ABORT TASK SET, CLEAR TASK SET: the tasks of this nexus on the LUN.
                if !lun_exists {
                    response = NO_LUN;
                } else {
                    self.abort_where(|_, l| Some(l) == lun_id);
                    wait_lun = Some(lun_id);
                    response = COMPLETE;
                }
            }
            5 => {
                // LOGICAL UNIT RESET
                match lun_id.and_then(|l| self.lookup(l)) {
                    None => response = NO_LUN,
                    Some((lun, nx)) => {
                        self.abort_where(|_, l| Some(l) == lun_id);
                        lun.unit.reset(&nx);
                        nx.clear_unit_attentions();
                        wait_lun = Some(lun_id);
                        response = COMPLETE;
                    }
                }
            }
            6 => {
                // TARGET WARM RESET: every LUN of the target.
                self.abort_where(|_, _| true);
                let luns = self.st.borrow().lun_ids.clone();
                for &l in luns.iter() {
                    if let Some((lun, nx)) = self.lookup(l) {
                        lun.unit.reset(&nx);
                        nx.clear_unit_attentions();
                    }
                }
                wait_lun = Some(None);
                response = COMPLETE;
            }
            3 | 7 => response = NOT_SUPPORTED, // CLEAR ACA, TARGET COLD RESET
            8 => response = REASSIGN_NOT_SUPPORTED,
            _ => response = NOT_SUPPORTED,
        }
        let this = self.clone();
        reactor::spawn_detached(async move {
            if let Some(l) = wait_lun {
                this.drain(|r| r.aborted.get() && (l.is_none() || Some(r.lun) == l)).await;
            }
            let mut h = Bhs::new(opcode::TMF_RESP);
            h.0[1] = 0x80;
            h.0[2] = response;
            h.set_u32(16, itt);
            this.stamp(&mut h, true);
            this.queue(h, OutData::None);
        });
    }

    /// Runs one SCSI command and sends its data and status.
    async fn execute(self: Rc<Self>, job: Job) {
        let Job { itt, immediate, lun_field, flags, edtl, need, unit, cmd, data, run, t0, failed, mem } = job;
        let read_flag = flags & pdu::FLAG_READ != 0;
        let edtl_in = if read_flag { edtl } else { 0 };
        let mut din: Option<IoBuf> = None;
        let result: Result<scsi::Done, Failure> = match (failed, cmd, &unit) {
            (Some(sense), _, _) => Err(Failure::Check(sense)),
            (None, Err(sense), _) => Err(Failure::Check(sense)),
            (None, Ok(cmd), None) => {
                // Commands a missing LUN still answers.
                let ids = self.st.borrow().lun_ids.clone();
                let d = match cmd {
                    Command::Inquiry { evpd: false, alloc, .. } => Ok(inquiry::standard_no_lun()[..(alloc as usize).min(96)].to_vec()),
                    Command::ReportLuns { select, alloc } => {
                        let mut v = scsi::lu::report_luns(select, &ids);
                        v.truncate(alloc as usize);
                        Ok(v)
                    }
                    Command::RequestSense { alloc, .. } => {
                        let mut v = Sense::lun_not_supported().fixed().to_vec();
                        v.truncate(alloc as usize);
                        Ok(v)
                    }
                    _ => Err(Failure::Check(Sense::lun_not_supported())),
                };
                d.map(|v| {
                    let mut b = IoBuf::alloc(v.len().max(1));
                    b[..v.len()].copy_from_slice(&v);
                    din = Some(b);
                    scsi::Done { status: Status::Good, data_len: v.len() }
                })
            }
            (None, Ok(cmd), Some((lun, nexus))) => {
                let g = lun.unit.geometry();
                let din_len = match cmd {
                    Command::Read { .. } => cmd.data_in_len(&g),
                    _ => cmd.data_in_len(&g).min(MAX_CONTROL_DATA_IN),
                } as usize;
                // Commands without Data-In take no buffer at all.
                let mut buf = (din_len > 0).then(|| IoBuf::alloc(din_len));
                let ids = self.st.borrow().lun_ids.clone();
                // The target's units, only built when a command names them (EXTENDED COPY).
                let peers = || self.st.borrow().luns.iter().map(|l| l.unit.clone()).collect::<Vec<_>>();
                let ctx = scsi::Context {
                    port: &self.port,
                    luns: &ids,
                    data_out_expected: if flags & pdu::FLAG_WRITE != 0 { edtl as u64 } else { 0 },
                    peers: Some(&peers),
                };
                let out: &[u8] = match &data {
                    Some((b, n)) => &b[..*n],
                    None => &[],
                };
                let din_slice: &mut [u8] = match &mut buf {
                    Some(b) => b,
                    None => &mut [],
                };
                let r = lun.unit.execute(nexus, &cmd, out, din_slice, &ctx).await;
                let bytes = match (&r, cmd) {
                    (Ok(d), Command::Read { .. }) => d.data_len as u64,
                    _ => out.len() as u64,
                };
                if let Some(t) = io_type(&cmd) {
                    lun.stats.record(reactor::current_index(), t, bytes, reactor::now_ns().saturating_sub(t0), r.is_ok());
                }
                din = buf;
                r
            }
        };
        drop(data);
        run.done.set(true);
        {
            let mut st = self.st.borrow_mut();
            st.tasks.remove(&itt);
            if immediate {
                st.immediate = st.immediate.saturating_sub(1);
            } else {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
        }
        if run.aborted.get() || self.control.closing.get() {
            return;
        }
        match result {
            Ok(done) => {
                let produced = done.data_len as u32;
                let sent = produced.min(edtl_in);
                // Residuals against the direction that carried data (RFC 7143 §11.4.5).
                let (flag, residual) = if need > 0 || flags & pdu::FLAG_WRITE != 0 { residual_of(need, edtl) } else { residual_of(produced, edtl) };
                if sent > 0 {
                    let buf = Rc::new(DataIn { buf: din.take().expect("data produced into a buffer"), _mem: mem });
                    self.send_data_in(itt, &lun_field, buf, sent, done.status, flag, residual);
                } else {
                    self.send_response(itt, done.status as u8, None, flag, residual, 0);
                }
            }
            Err(Failure::Check(sense)) => self.send_response(itt, Status::CheckCondition as u8, Some(sense), 0, 0, 0),
            Err(Failure::Busy) => self.send_response(itt, Status::Busy as u8, None, 0, 0, 0),
            Err(Failure::ReservationConflict) => self.send_response(itt, Status::ReservationConflict as u8, None, 0, 0, 0),
        }
    }

    /// Data-In PDUs for `len` bytes of `buf`, the status in the last one.
    #[allow(clippy::too_many_arguments)]
    fn send_data_in(&self, itt: u32, lun: &[u8; 8], buf: Rc<DataIn>, len: u32, status: Status, res_flag: u8, residual: u32) {
        let seg = self.p.max_send_dsl.max(512);
        let burst = self.p.max_burst.max(seg);
        let mut off = 0u32;
        let mut data_sn = 0u32;
        let mut in_burst = 0u32;
        while off < len {
            let n = (len - off).min(seg).min(burst - in_burst);
            let last = off + n == len;
            in_burst += n;
            let mut h = Bhs::new(opcode::DATA_IN);
            let mut f = 0u8;
            if last || in_burst == burst {
                f |= pdu::FLAG_FINAL;
                in_burst = 0;
            }
            if last {
                f |= pdu::FLAG_STATUS | res_flag;
                h.0[3] = status as u8;
                h.set_u32(44, residual);
            }
            h.0[1] = f;
            h.set_lun(lun);
            h.set_u32(16, itt);
            h.set_u32(20, RESERVED_TAG);
            self.stamp(&mut h, last);
            if !last {
                // StatSN is meaningful only with the S bit.
                h.set_u32(24, 0);
            }
            h.set_u32(36, data_sn);
            h.set_u32(40, off);
            self.queue(h, OutData::Shared(buf.clone(), off as usize, n as usize));
            data_sn += 1;
            off += n;
        }
    }

    fn send_response(&self, itt: u32, status: u8, sense: Option<Sense>, res_flag: u8, residual: u32, exp_data_sn: u32) {
        let mut h = Bhs::new(opcode::SCSI_RESP);
        h.0[1] = 0x80 | res_flag;
        h.0[3] = status;
        h.set_u32(16, itt);
        self.stamp(&mut h, true);
        h.set_u32(36, exp_data_sn);
        h.set_u32(44, residual);
        let data = match sense {
            Some(s) => {
                let f = s.fixed();
                let mut v = Vec::with_capacity(2 + f.len());
                v.extend_from_slice(&(f.len() as u16).to_be_bytes());
                v.extend_from_slice(&f);
                OutData::Owned(v)
            }
            None => OutData::None,
        };
        self.queue(h, data);
    }
}

/// A command ready to run.
struct Job {
    itt: u32,
    immediate: bool,
    lun_field: [u8; 8],
    flags: u8,
    edtl: u32,
    need: u32,
    unit: Option<(Arc<Lun>, Rc<Nexus>)>,
    cmd: Result<Command, Sense>,
    data: Option<(IoBuf, usize)>,
    run: Rc<Running>,
    t0: u64,
    failed: Option<Sense>,
    mem: Option<Lease>,
}

fn residual_of(actual: u32, edtl: u32) -> (u8, u32) {
    if actual > edtl {
        (pdu::FLAG_OVERFLOW, actual - edtl)
    } else if actual < edtl {
        (pdu::FLAG_UNDERFLOW, edtl - actual)
    } else {
        (0, 0)
    }
}

fn io_type(c: &Command) -> Option<IoType> {
    match c {
        Command::Read { .. } => Some(IoType::Read),
        Command::Write { .. } | Command::WriteVerify { .. } | Command::CompareAndWrite { .. } | Command::OrWrite { .. } => Some(IoType::Write),
        Command::WriteSame { unmap: true, .. } | Command::Unmap { .. } => Some(IoType::Unmap),
        Command::WriteSame { .. } => Some(IoType::WriteZeroes),
        Command::SyncCache { .. } => Some(IoType::Flush),
        _ => None,
    }
}

/// Hasher of task tags and LUNs: a multiplicative mix. The maps it serves are bounded by the
/// queue depth, so even tags chosen to collide cost at most a linear scan of a small table.
#[derive(Default, Clone, Copy)]
struct TagHasher(u64);

impl std::hash::Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type TagHash = std::hash::BuildHasherDefault<TagHasher>;

fn next_ttt(st: &mut State) -> u32 {
    let t = st.next_ttt;
    st.next_ttt = st.next_ttt.wrapping_add(1);
    if st.next_ttt == RESERVED_TAG || st.next_ttt == 0 {
        st.next_ttt = 1;
    }
    t
}
