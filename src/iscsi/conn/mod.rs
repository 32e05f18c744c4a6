//! One iSCSI connection, owned by one core: login, then the full feature phase.
//!
//! Each session has exactly one connection (MaxConnections is negotiated to 1), so session
//! state (CmdSN window, StatSN, tasks) lives in the connection and needs no sharing.
//!
//! Three tasks per connection: the reader parses PDUs from a per-connection receive buffer
//! (data segments of writes go straight into the command's `IoBuf`), hands each SCSI command
//! to one of the connection's workers (tasks kept between commands: `command::Worker`), and
//! answers everything else in place; command tasks queue their responses; the
//! writer sends everything queued with one `writev` per loop iteration. A fourth, idle most of
//! the time, pings a silent initiator with NOP-In and drops the connection if it does not
//! answer.
//!
//! One file per concern: `login_phase` (until the session is logged in), `receive` (the
//! reader), `transmit` (the writer and what it sends), `admission` (what a new SCSI command
//! must pass before it runs), `data_out` (R2Ts and the write data they solicit), `command`
//! (running a command, Data-In and status), `task_mgmt` (TMFs, logout), `ping` (NOP-Out and
//! NOP-In) and `text_req` (SendTargets). This file holds the connection's state and its life.

mod admission;
mod command;
mod data_out;
mod login_phase;
mod ping;
mod receive;
mod task_mgmt;
mod text_req;
mod transmit;

use self::admission::{Bound, MAX_CONTROL_DATA_IN};
use self::command::{DataIn, Job, Running, Worker, Workers};
use self::data_out::WriteXfer;
use self::login_phase::{login_phase, LOGIN_TIMEOUT};
use self::receive::{SegmentRead, MAX_AHS};
use self::transmit::{OutData, OutPdu};
use super::config::{Lun, TargetNode};
use super::login::{self, LoggedIn, Login, LoginContext, SessionType, Step};
use super::params::SessionParams;
use super::pdu::{self, opcode, reject, Bhs, BHS_LEN, RESERVED_TAG};
use super::text;
use super::IscsiShared;
use crate::bdev::{ConnBudget, IoBuf, IoType, Lease};
use crate::reactor::{self, RecvBuf, TcpStream, RECV_BUF_DEFAULT};
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
    // The connection's own memory counts in the budget before any of it is allocated.
    let fixed = state_bytes(shared.registry().options.max_queue_depth);
    let Ok(budget) = ConnBudget::open(fixed) else {
        crate::bdev::budget::refuse_connection("iscsi", peer, fixed);
        stream.shutdown();
        return;
    };
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
            let conn = Rc::new(Conn::new(id, stream.clone(), shared.clone(), control.clone(), &li, pg_tag, peer, local, budget.clone()));
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

/// A command of the connection by its tag: receiving its Data-Out, or running in a worker.
enum TaskSlot {
    Receiving(Box<WriteXfer>),
    Running(Rc<Worker>),
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
    /// The LUNs this connection has used, with its nexus on each (`Bound`).
    units: HashMap<u64, Rc<Bound>, TagHash>,
    /// Outstanding target ping: (TTT, deadline).
    ping: Option<(u32, u64)>,
    last_rx_ns: u64,
    /// Rest of a SendTargets answer too long for one PDU: (TTT, bytes).
    text_rest: Option<(u32, Vec<u8>)>,
    /// Write transfers' boxes (with their R2T vectors) kept for the next writes: a box per
    /// write would be an allocation per write. Each is charged while kept
    /// (`WriteXfer::kept`); at most as many as writes ever received data at once. Boxes, not
    /// values: the box itself moves into `TaskSlot::Receiving` and back, never reallocated.
    #[allow(clippy::vec_box)]
    spare_xfers: Vec<Box<WriteXfer>>,
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
    /// Tasks that will queue an answer (task management, logout) and have not yet.
    replies: Cell<u32>,
    /// The tasks that run this session's SCSI commands, kept between commands.
    workers: Workers,
    /// Data-In allocations whose PDUs are sent, kept for the next reads (`recycle_data_in`).
    spare_data_in: RefCell<Vec<Rc<DataIn>>>,
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
        budget: Rc<ConnBudget>,
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
                units: HashMap::default(),
                ping: None,
                last_rx_ns: reactor::now_ns(),
                text_rest: None,
                spare_xfers: Vec::new(),
            }),
            out: RefCell::new(VecDeque::new()),
            writer_waker: RefCell::new(None),
            close_after_flush: Cell::new(false),
            budget,
            replies: Cell::new(0),
            workers: Workers::default(),
            spare_data_in: RefCell::new(Vec::new()),
        }
    }

    async fn run(self: &Rc<Self>, rb: RecvBuf) {
        let writer = reactor::spawn(self.clone().writer());
        let pinger = reactor::spawn(self.clone().pinger());
        let r = self.reader(rb).await;
        match &r {
            Err(Stop::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => log::debug!("iscsi: connection {} from {}: {e}", self.id, self.peer),
            Err(Stop::Protocol(why)) => log::warn!("iscsi: dropping connection {} from {}: {why}", self.id, self.peer),
            _ => {}
        }
        if matches!(&r, Err(Stop::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof) {
            // The initiator half-closed: it sends nothing more but still reads. The answers
            // of what it sent go out before the connection closes (bounded by the drain).
            let start = reactor::now_ns();
            while !self.control.closing.get() && (self.replies.get() > 0 || self.any_running()) {
                if reactor::now_ns().saturating_sub(start) > DRAIN_TIMEOUT.as_nanos() as u64 {
                    break;
                }
                reactor::sleep(Duration::from_micros(200)).await;
            }
        }
        self.control.closing.set(true);
        self.wake_writer();
        // Commands in flight own buffers the bdevs write into: wait for them before leaving.
        let start = reactor::now_ns();
        loop {
            if !self.any_running() || reactor::now_ns().saturating_sub(start) > DRAIN_TIMEOUT.as_nanos() as u64 {
                break;
            }
            reactor::sleep(Duration::from_micros(200)).await;
        }
        {
            let mut st = self.st.borrow_mut();
            st.tasks.clear();
            // Their charges go back with the connection's (and not later, when the last
            // `Rc<Conn>` goes).
            st.spare_xfers.clear();
        }
        // The workers hold the connection: they end now (a command still running past the
        // drain timeout ends its worker when it is done).
        self.workers.stop();
        drop(pinger);
        // Let the writer send what is queued (a Reject, a logout answer), but not forever.
        let _ = reactor::timeout(Duration::from_secs(5), writer).await;
        self.spare_data_in.borrow_mut().clear();
        self.stream.shutdown();
    }

    /// Some command runs (its buffers are in a bdev's hands, its answer still to come).
    fn any_running(&self) -> bool {
        self.st.borrow().tasks.values().any(|t| matches!(t, TaskSlot::Running(w) if !w.state.run.done.get()))
    }
}

/// Bytes one connection holds whatever its initiator does, counted in the buffer budget from
/// accept to close: the receive buffer, the connection with its tables and queues for
/// `max_queue_depth` commands, and what the computation misses (futures, the login phase's
/// state, allocator slack; measured as for NVMe/TCP).
fn state_bytes(max_queue_depth: u32) -> u64 {
    use std::mem::size_of;
    const SLACK: usize = 16 * 1024;
    let depth = max_queue_depth as usize;
    // A task entry (tag, slot, hash metadata), and a response and a Data-In PDU queued.
    let per_command = size_of::<(u32, TaskSlot)>() + 8 + 2 * size_of::<OutPdu>();
    (RECV_BUF_DEFAULT + size_of::<Conn>() + depth * per_command + transmit::WRITE_BATCH * size_of::<OutPdu>() + SLACK) as u64
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
