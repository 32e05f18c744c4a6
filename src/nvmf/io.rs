//! The NVM I/O command set on bdevs: Read, Write, Flush, Write Zeroes, Dataset Management
//! (deallocate) and Compare. Commands are checked on the reader's path (namespace, range,
//! lengths) so that bad ones are answered without running anything; good ones run on the
//! queue's core, against the core's channel of the namespace's bdev, each in one of the
//! connection's [`Worker`]s: tasks kept from one command to the next, so that a command in
//! steady state allocates nothing (no task, no future frame; see `tests/alloc_free_io.rs`).

use super::connection::{Binding, Conn, SlotState, TxData};
use super::pdu::DataPlan;
use super::reservation::{Access, Command, Drain, HostId, InFlight, Ticket, SC_RESERVATION_CONFLICT};
use super::spec::{io_opc, msc, sc, sct, Sqe, Status};
use super::subsystem::{Namespace, Subsystem};
use crate::bdev::{BdevError, Channel, IoBuf, IoType, Lease};
use crate::reactor;
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// A namespace as one queue uses it: the namespace and this core's channel to its bdev.
pub struct NsChannel {
    pub ns: Arc<Namespace>,
    pub ch: Channel,
    block_size: u32,
    /// This queue's host's in-flight counters on the namespace (`Reservations::in_flight`).
    in_flight: Arc<InFlight>,
}

/// A command counted in its host's in-flight counters from before its reservation check until
/// its bdev I/O ended (or it was refused, or dropped unstarted): a preempt or a Clear waits
/// for it. Counted on the counter of core `core` (the queue's); the ticket names that counter,
/// so the decrement hits it wherever the guard is dropped.
pub(crate) struct Admitted {
    n: Rc<NsChannel>,
    ticket: Option<Ticket>,
}

impl Admitted {
    fn new(n: &Rc<NsChannel>, core: usize) -> Admitted {
        let ticket = n.ns.resv.admit(&n.in_flight, core);
        Admitted { n: n.clone(), ticket: Some(ticket) }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.n.in_flight.leave(t);
        }
    }
}

/// A queue's namespaces, refreshed when the subsystem's namespace generation changes (one
/// atomic load per command, no lock).
#[derive(Default)]
pub struct NsCache {
    generation: u64,
    subsys_id: u64,
    by_nsid: Vec<Option<Rc<NsChannel>>>,
}

impl NsCache {
    pub fn clear(&mut self) {
        self.generation = 0;
        self.by_nsid.clear();
    }

    fn get(&mut self, subsys: &Subsystem, nsid: u32, host: &HostId) -> Result<Rc<NsChannel>, Status> {
        let g = subsys.ns_generation();
        if g != self.generation || subsys.id != self.subsys_id {
            self.by_nsid.clear();
            self.generation = g;
            self.subsys_id = subsys.id;
        }
        if nsid == 0 || nsid > subsys.max_namespaces {
            return Err(Status::generic(sc::INVALID_NAMESPACE));
        }
        let i = (nsid - 1) as usize;
        if let Some(Some(c)) = self.by_nsid.get(i) {
            return Ok(c.clone());
        }
        let ns = subsys.namespace(nsid).ok_or(Status::generic(sc::INVALID_NAMESPACE))?;
        let ch = Channel::get(&ns.entry).map_err(|e| {
            log::warn!("nvmf: namespace {nsid} of {}: cannot open a channel: {e}", subsys.nqn);
            Status::retryable(sct::GENERIC, sc::NAMESPACE_NOT_READY)
        })?;
        let in_flight = ns.resv.in_flight(host);
        let c = Rc::new(NsChannel { block_size: ch.block_size(), ns, ch, in_flight });
        if self.by_nsid.len() <= i {
            self.by_nsid.resize(i + 1, None);
        }
        self.by_nsid[i] = Some(c.clone());
        Ok(c)
    }
}

/// The NVMe status of a bdev error (the one place where bdev errors meet NVMe).
pub fn status_of(e: &BdevError, reading: bool) -> Status {
    match e {
        BdevError::OutOfRange { .. } => Status::generic(sc::LBA_OUT_OF_RANGE),
        BdevError::ReadOnly => Status::generic(sc::NAMESPACE_WRITE_PROTECTED),
        BdevError::Media => Status::error(sct::MEDIA, if reading { msc::UNRECOVERED_READ_ERROR } else { msc::WRITE_FAULT }),
        BdevError::Os(_) => Status::generic(sc::INTERNAL),
        BdevError::BadLength { .. } => Status::generic(sc::DATA_SGL_LENGTH_INVALID),
        BdevError::Unsupported(_) => Status::generic(sc::INVALID_OPCODE),
        BdevError::NoResources | BdevError::Offline => Status::retryable(sct::GENERIC, sc::NAMESPACE_NOT_READY),
        BdevError::Aborted => Status::generic(sc::ABORT_REQUESTED),
        BdevError::NoSpace => Status::generic(sc::CAPACITY_EXCEEDED),
        BdevError::Nvme { sct, sc } => Status::error(*sct, *sc),
    }
}

/// A checked command.
enum Op {
    Read { slba: u64, len: usize },
    Write { slba: u64, offset: usize, len: usize },
    Compare { slba: u64, offset: usize, len: usize },
    Flush,
    WriteZeroes { slba: u64, nlb: u64 },
    Deallocate { ranges: Vec<(u64, u64)> },
    Nothing,
}

impl Op {
    fn io_type(&self) -> IoType {
        match self {
            Op::Read { .. } | Op::Compare { .. } => IoType::Read,
            Op::Write { .. } => IoType::Write,
            Op::Flush | Op::Nothing => IoType::Flush,
            Op::WriteZeroes { .. } => IoType::WriteZeroes,
            Op::Deallocate { .. } => IoType::Unmap,
        }
    }
}

fn check_range(n: &NsChannel, slba: u64, nlb: u64) -> Result<(), Status> {
    match slba.checked_add(nlb) {
        // The size now (a volume grown while exported takes I/O past its old end at once).
        Some(end) if end <= n.ch.num_blocks() => Ok(()),
        _ => Err(Status::generic(sc::LBA_OUT_OF_RANGE)),
    }
}

/// Checks `sqe` against the namespace and the data that came with it.
fn check(n: &NsChannel, sqe: &Sqe, plan: DataPlan, data: Option<&IoBuf>, max_io: u32) -> Result<Op, Status> {
    let bs = n.block_size as u64;
    let rw_len = |nlb: u64| -> Result<usize, Status> {
        let bytes = nlb * bs;
        if bytes > max_io as u64 {
            return Err(Status::generic(sc::INVALID_FIELD));
        }
        if bytes != plan.len() as u64 {
            return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
        }
        Ok(bytes as usize)
    };
    let host_data = |len: usize| -> Result<usize, Status> {
        match (plan, data) {
            (DataPlan::InCapsule { offset, .. }, Some(d)) if offset as usize + len <= d.len() => Ok(offset as usize),
            _ => Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID)),
        }
    };
    match sqe.opcode() {
        io_opc::READ => {
            let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
            let len = rw_len(nlb)?;
            check_range(n, slba, nlb)?;
            Ok(Op::Read { slba, len })
        }
        io_opc::WRITE | io_opc::COMPARE => {
            let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
            let len = rw_len(nlb)?;
            check_range(n, slba, nlb)?;
            let offset = host_data(len)?;
            if sqe.opcode() == io_opc::WRITE {
                Ok(Op::Write { slba, offset, len })
            } else {
                Ok(Op::Compare { slba, offset, len })
            }
        }
        io_opc::FLUSH => Ok(Op::Flush),
        io_opc::WRITE_ZEROES => {
            let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
            check_range(n, slba, nlb)?;
            Ok(Op::WriteZeroes { slba, nlb })
        }
        io_opc::DSM => {
            let nr = (sqe.cdw(10) & 0xFF) as usize + 1;
            let deallocate = sqe.cdw(11) & (1 << 2) != 0;
            let need = nr * 16;
            if (plan.len() as usize) < need {
                return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
            }
            let offset = host_data(need)?;
            let d = data.ok_or(Status::generic(sc::DATA_SGL_LENGTH_INVALID))?;
            let mut ranges = Vec::with_capacity(nr);
            for r in d[offset..offset + need].chunks_exact(16) {
                let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                check_range(n, slba, nlb)?;
                if nlb > 0 {
                    ranges.push((slba, nlb));
                }
            }
            // Without the deallocate attribute DSM is only a hint; deallocation itself is
            // advisory for a device that cannot unmap.
            if !deallocate || !n.ch.supports(IoType::Unmap) {
                return Ok(Op::Nothing);
            }
            Ok(Op::Deallocate { ranges })
        }
        _ => Err(Status::generic(sc::INVALID_OPCODE)),
    }
}

/// A checked command waiting for buffer budget for the data it reads.
pub(crate) struct HeldIo {
    sqe: Sqe,
    nsc: Rc<NsChannel>,
    op: Op,
    data: Option<(IoBuf, Lease)>,
    admitted: Admitted,
}

impl HeldIo {
    /// Bytes of buffer the command needs.
    pub(crate) fn need(&self) -> u64 {
        read_buffer_len(&self.op) as u64
    }
}

/// The buffer a command allocates to read into (its data from the host, if any, came charged).
fn read_buffer_len(op: &Op) -> usize {
    match op {
        Op::Read { len, .. } | Op::Compare { len, .. } => *len,
        _ => 0,
    }
}

/// Starts I/O command `sqe` on `conn` (the reader's path: checks, then one task).
pub(crate) fn start(conn: &Rc<Conn>, slot: Option<u16>, b: Rc<Binding>, sqe: Sqe, plan: DataPlan, data: Option<(IoBuf, Lease)>) {
    if !b.ctrl.is_ready() {
        // A controller torn down (its listener removed, its keep-alive expired, its subsystem
        // deleted) still reads the commands already on its socket: they get a path error with
        // DNR clear, so a multipath host retries them on another path instead of failing them.
        // Before enable it is the host's mistake: Command Sequence Error.
        let status = if b.ctrl.is_closed() {
            Status::retryable(sct::PATH, super::ana::SC_CONTROLLER_PATHING_ERROR)
        } else {
            Status::generic(sc::COMMAND_SEQUENCE_ERROR)
        };
        return conn.complete(slot, &sqe, status, 0, TxData::None);
    }
    if sqe.fuse() != 0 {
        return conn.complete(slot, &sqe, Status::generic(sc::INVALID_FIELD), 0, TxData::None);
    }
    let nsc = match conn.with_ns_cache(|c| c.get(&b.ctrl.subsys, sqe.nsid(), &b.ctrl.hostid)) {
        Ok(n) => n,
        Err(s) => return conn.complete(slot, &sqe, s, 0, TxData::None),
    };
    // ANA: a namespace whose group is inaccessible through this listener refuses I/O with a
    // path-related status, which a multipath host retries on another path. One relaxed load.
    if let Some(status) = b.ctrl.ana.as_ref().and_then(|a| a.state(nsc.ns.anagrpid).io_status()) {
        return conn.complete(slot, &sqe, status, 0, TxData::None);
    }
    if is_reservation(sqe.opcode()) {
        let (status, out, drain) = reservation(conn, &b, &nsc.ns, &sqe, plan, data.as_ref().map(|(b, _)| b));
        let Some(drain) = drain.filter(|d| !d.done()) else {
            return conn.complete(slot, &sqe, status, 0, out);
        };
        let Some(slot) = slot.or_else(|| conn.take_slot()) else {
            // The reader waits for a free slot before it takes a capsule (an Acquire carries
            // its keys in the capsule); should it happen, the preempt stands undrained.
            log::error!("nvmf: {}: no slot to wait for an unregistered host's commands", b.ctrl.subsys.nqn);
            return conn.complete(None, &sqe, status, 0, out);
        };
        // The connection's close waits for this like for an I/O command.
        conn.io_started();
        let (conn, nqn, nsid) = (conn.clone(), b.ctrl.subsys.nqn.clone(), nsc.ns.nsid);
        reactor::spawn_detached(async move {
            reservation_drain(&drain, &nqn, nsid).await;
            conn.complete(Some(slot), &sqe, status, 0, out);
            conn.io_finished();
        });
        return;
    }
    let op = match check(&nsc, &sqe, plan, data.as_ref().map(|(b, _)| b), conn.opts.max_io_size) {
        Ok(op) => op,
        Err(s) => return conn.complete(slot, &sqe, s, 0, TxData::None),
    };
    // One relaxed load while nobody registered with the namespace.
    let access = if matches!(op, Op::Read { .. } | Op::Compare { .. }) { Access::Read } else { Access::Write };
    // Counted before the check (a non-allocating atomic add on this core's counter of the
    // host), so that a preempt or a Clear racing with this check either refuses the command or
    // waits for it.
    let admitted = Admitted::new(&nsc, conn.core());
    if !nsc.ns.resv.allows(&b.ctrl.hostid, access) {
        return conn.complete(slot, &sqe, Status::generic(SC_RESERVATION_CONFLICT), 0, TxData::None);
    }
    let slot = match slot.or_else(|| conn.take_slot()) {
        Some(s) => s,
        // The reader waits for a free slot before it takes a capsule; this cannot happen.
        None => return conn.complete(None, &sqe, Status::retryable(sct::GENERIC, sc::NAMESPACE_NOT_READY), 0, TxData::None),
    };
    // The buffer it reads into is charged before it exists; short of budget the command waits
    // in its slot (the host sees a slower command, the target allocates nothing).
    let need = read_buffer_len(&op);
    let lease = if need > 0 {
        match conn.charge_in_order(need as u64) {
            Some(l) => Some(l),
            None => return conn.hold(slot, SlotState::AwaitingBuffer(Box::new(HeldIo { sqe, nsc, op, data, admitted }))),
        }
    } else {
        None
    };
    dispatch(conn, Job { slot, sqe, n: nsc, op, data, lease, admitted });
}

/// Starts a held command now that its buffer is charged.
pub(crate) fn resume(conn: &Rc<Conn>, slot: u16, h: HeldIo, lease: Lease) {
    dispatch(conn, Job { slot, sqe: h.sqe, n: h.nsc, op: h.op, data: h.data, lease: Some(lease), admitted: h.admitted });
}

/// A checked I/O command with what it runs with: its slot, its namespace channel, the host's
/// data and the charges of its buffers, its reservation admission.
pub(crate) struct Job {
    slot: u16,
    sqe: Sqe,
    n: Rc<NsChannel>,
    op: Op,
    data: Option<(IoBuf, Lease)>,
    lease: Option<Lease>,
    admitted: Admitted,
}

/// A task of a connection that runs its I/O commands, one at a time, and is kept between them
/// (idle in [`Workers`]): a task per command would allocate its frame per command. A
/// connection has at most as many as it has had commands running at once, so never more than
/// its slots. Its state: its memory ([`worker_bytes`]) charged to the core's buffer budget as
/// connection state (`ConnBudget::try_charge_state`, as iSCSI's kept workers: charged to the
/// connection's limit it would take its commands' room) for as long as it is kept; None when
/// the core had no room: it ends after its
/// command, holding that memory only while the command runs (what a task per command held,
/// uncharged), so what a connection keeps is always charged.
pub(crate) type Worker = reactor::Worker<Job, Option<Lease>>;

/// The workers of one connection.
pub(crate) type Workers = reactor::Workers<Job, Option<Lease>>;

/// Bytes one kept worker holds: its task's future (with the frame of the command it runs), the
/// executor's header of the task, and the `Worker` (1376 bytes when measured). Charged when a
/// worker is made (see [`Worker`]), not in the connection's fixed charge
/// (`connection::state_bytes`): a connection makes only as many as its host runs commands at
/// once, and charged per slot at the transport's largest queue depth (176 KiB per connection
/// at 128) it would about halve the connections a small budget admits.
pub fn worker_bytes() -> usize {
    reactor::task_bytes(&worker) + std::mem::size_of::<Worker>() + std::mem::size_of::<Rc<Worker>>()
}

/// Hands `job` to an idle worker of `conn`, or to a new one when every worker is busy (during
/// warm-up, or when the host goes deeper than before).
fn dispatch(conn: &Rc<Conn>, job: Job) {
    conn.io_started();
    let workers = conn.workers();
    let make = || {
        let kept = conn.budget().try_charge_state(worker_bytes() as u64);
        let is_kept = kept.is_some();
        (kept, is_kept)
    };
    workers.dispatch(job, make, |w| reactor::spawn_detached(worker(conn.clone(), w)));
    // One per running command, and a running command holds a slot.
    assert!(workers.count() <= conn.slot_count(), "more workers than slots");
}

/// A worker's life: a command, back to the idle list, the next command; woken without one, it
/// ends (see [`Workers::stop`]).
async fn worker(conn: Rc<Conn>, w: Rc<Worker>) {
    while let Some(job) = w.next().await {
        run(&conn, job).await;
        // After `run`'s `io_finished`, without a wait in between: when the connection sees
        // no command running, every worker is back on the list (or gone).
        if !conn.workers().finished(&w) {
            return;
        }
    }
}

async fn run(conn: &Rc<Conn>, job: Job) {
    let Job { slot, sqe, n, op, data, lease, admitted } = job;
    // Host data and its charge live until the command completes (dropped below).
    let (data, data_lease) = match data {
        Some((b, l)) => (Some(b), Some(l)),
        None => (None, None),
    };
    let mut lease = lease;
    let core = conn.core();
    let shard = n.ns.stats.shard(core);
    shard.io_started();
    let t0 = reactor::now_ns();
    let ty = op.io_type();
    let (result, out, bytes): (Result<(), Status>, TxData, u64) = match op {
        Op::Read { slba, len } => {
            let mut buf = IoBuf::alloc(len);
            match n.ch.read(slba, &mut [IoSliceMut::new(&mut buf[..len])]).await {
                Ok(()) => (Ok(()), TxData::Buf(buf, len, lease.take()), len as u64),
                Err(e) => (Err(status_of(&e, true)), TxData::None, 0),
            }
        }
        Op::Write { slba, offset, len } => {
            let r = match &data {
                Some(d) => n.ch.write(slba, &[IoSlice::new(&d[offset..offset + len])]).await.map_err(|e| status_of(&e, false)),
                None => Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID)),
            };
            (r, TxData::None, len as u64)
        }
        Op::Compare { slba, offset, len } => {
            let mut buf = IoBuf::alloc(len);
            let r = match n.ch.read(slba, &mut [IoSliceMut::new(&mut buf[..len])]).await {
                Ok(()) => match &data {
                    Some(d) if d[offset..offset + len] == buf[..len] => Ok(()),
                    _ => Err(Status::error(sct::MEDIA, msc::COMPARE_FAILURE)),
                },
                Err(e) => Err(status_of(&e, true)),
            };
            (r, TxData::None, len as u64)
        }
        Op::Flush => (n.ch.flush().await.map_err(|e| status_of(&e, false)), TxData::None, 0),
        Op::WriteZeroes { slba, nlb } => (write_zeroes(&n, slba, nlb, conn.opts.max_io_size).await, TxData::None, nlb * n.block_size as u64),
        Op::Deallocate { ranges } => {
            let mut r = Ok(());
            let mut bytes = 0;
            for (slba, nlb) in ranges {
                if let Err(e) = n.ch.unmap(slba, nlb).await {
                    r = Err(status_of(&e, false));
                    break;
                }
                bytes += nlb * n.block_size as u64;
            }
            (r, TxData::None, bytes)
        }
        Op::Nothing => (Ok(()), TxData::None, 0),
    };
    let dt = reactor::now_ns().saturating_sub(t0);
    shard.io_ended();
    n.ns.stats.record(core, ty, bytes, dt, result.is_ok());
    // The buffers go back (and their charges with them) before the host hears of it; the
    // bdev is done with the command, so a preempt waiting for it may complete.
    drop((data, data_lease, lease, admitted));
    match result {
        Ok(()) => conn.complete(Some(slot), &sqe, Status::SUCCESS, 0, out),
        Err(s) => conn.complete(Some(slot), &sqe, s, 0, TxData::None),
    }
    conn.io_finished();
}

fn is_reservation(opc: u8) -> bool {
    matches!(opc, io_opc::RESERVATION_REGISTER | io_opc::RESERVATION_REPORT | io_opc::RESERVATION_ACQUIRE | io_opc::RESERVATION_RELEASE)
}

/// A reservation command, run on the reader's path: it only touches the namespace's
/// reservation state (and, with PTPL, writes its small file before completing).
/// Besides the status: the drain that must end before the command completes (an Acquire, a
/// Clear).
fn reservation(conn: &Rc<Conn>, b: &Binding, ns: &Arc<Namespace>, sqe: &Sqe, plan: DataPlan, data: Option<&IoBuf>) -> (Status, TxData, Option<Drain>) {
    let opc = sqe.opcode();
    if opc == io_opc::RESERVATION_REPORT {
        let DataPlan::ToHost { len } = plan else { return (Status::generic(sc::INVALID_FIELD), TxData::None, None) };
        // NUMD (0's based dwords) may ask for less than the buffer.
        let want = ((sqe.cdw(10) as u64 + 1) * 4).min(len as u64) as usize;
        let eds = sqe.cdw(11) & 1 != 0;
        // Controllers first: the reservation lock is never held while taking another.
        let ctrls = b.ctrl.subsys.controllers();
        let report = ns.resv.lock().report(eds, |h| ctrls.iter().find(|c| &c.hostid == h && !c.is_closed()).map(|c| c.cntlid));
        return match report {
            Ok(mut d) => {
                d.resize(want, 0);
                d.resize(len as usize, 0);
                (Status::SUCCESS, TxData::Vec(d), None)
            }
            Err(e) => (e.status(), TxData::None, None),
        };
    }
    let need = Command::data_len(opc);
    let bytes = match (plan, data) {
        (DataPlan::InCapsule { offset, len }, Some(d)) if len as usize >= need => d.get(offset as usize..offset as usize + need),
        _ => None,
    };
    let Some(c) = bytes.and_then(|d| Command::parse(opc, sqe.cdw(10), d)) else {
        return (Status::generic(sc::DATA_SGL_LENGTH_INVALID), TxData::None, None);
    };
    match ns.resv.execute(&b.ctrl.hostid, c) {
        Ok(out) => {
            if !out.notices.is_empty() {
                for c in b.ctrl.subsys.controllers() {
                    for (_, n) in out.notices.iter().filter(|(h, _)| *h == c.hostid) {
                        if !c.is_closed() {
                            c.reservation_notice(&conn.nvmf, ns.nsid, *n);
                        }
                    }
                }
            }
            // Preempt and Preempt and Abort alike (see `reservation_drain`), and Clear; any
            // Acquire also waits for an earlier drain still under way (a retried Acquire).
            // Register (Replace, Unregister) and Release do not: see `reservation`'s module.
            let drain = (matches!(c, Command::Acquire { .. }) || !out.unregistered.is_empty()).then(|| ns.resv.drain(out.unregistered.iter().copied()));
            (Status::SUCCESS, TxData::None, drain)
        }
        Err(e) => {
            if let super::reservation::ResvError::Persist(why) = &e {
                log::error!("nvmf: namespace {} of {}: reservation change not persisted: {why}", ns.nsid, b.ctrl.subsys.nqn);
            }
            (e.status(), TxData::None, None)
        }
    }
}

/// Waits until drain `d` is over: every command its hosts (those a Preempt or a Clear
/// unregistered) had admitted before the change has left the bdev. Nothing is aborted: a command
/// handed to a bdev cannot be recalled, it can only be waited for (NVMe lets Preempt and Abort
/// complete the preempted commands instead of aborting them; plain Preempt gets the same wait
/// because the mirror falls back to it against targets that refuse Preempt and Abort, and the
/// wait costs the reservation command only, never an I/O). Commands admitted after the change
/// are counted under the next drain epoch and not waited for, so the wait ends even while an
/// unregistered host that may still read (Write Exclusive, or no reservation after a Clear)
/// keeps sending. No time limit: completing earlier is what lets a stale write overwrite the
/// new holder's.
pub async fn reservation_drain(d: &Drain, nqn: &str, nsid: u32) {
    let t0 = reactor::now_ns();
    let mut warned = false;
    while !d.done() {
        // A poll interval instead of a notification: the data path stays free of wake-ups,
        // and a drain is rare.
        reactor::sleep(Duration::from_micros(200)).await;
        if !warned && reactor::now_ns().saturating_sub(t0) > 10_000_000_000 {
            warned = true;
            log::warn!("nvmf: namespace {nsid} of {nqn}: a reservation change has waited 10 s for commands admitted before it to leave the bdev");
        }
    }
}

/// Write Zeroes through the bdev's own operation, or by writing zeroed buffers.
async fn write_zeroes(n: &NsChannel, slba: u64, nlb: u64, max_io: u32) -> Result<(), Status> {
    if n.ch.supports(IoType::WriteZeroes) {
        return n.ch.write_zeroes(slba, nlb).await.map_err(|e| status_of(&e, false));
    }
    let per = (max_io / n.block_size).max(1) as u64;
    let zero = IoBuf::zeroed((per * n.block_size as u64) as usize);
    let mut done = 0;
    while done < nlb {
        let k = per.min(nlb - done);
        let len = (k * n.block_size as u64) as usize;
        n.ch.write(slba + done, &[IoSlice::new(&zero[..len])]).await.map_err(|e| status_of(&e, false))?;
        done += k;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::reservation::{rtype, Reservations};
    use super::*;
    use crate::bdev::{BdevEntry, BdevRegistry};
    use crate::bdevs::delay::DelayBdev;
    use crate::bdevs::malloc::MallocBdev;
    use crate::reactor::ManualCores;
    use std::cell::Cell;

    /// What a test command did: 0 still running, 1 refused (Reservation Conflict), else the
    /// time it completed.
    type Done = Rc<Cell<u64>>;

    struct Rig {
        cores: ManualCores,
        d: Arc<BdevEntry>,
        resv: Arc<Reservations>,
        _reg: BdevRegistry,
    }

    /// Two hand-stepped cores, a 64-block malloc bdev under a delay bdev that holds every I/O
    /// 5 ms, and the namespace's reservations with hosts 0xA and 0xB registered, A holding
    /// Write Exclusive.
    fn rig() -> Rig {
        let cores = ManualCores::new(2);
        let reg = BdevRegistry::new(2);
        let m = reg.register(Arc::new(MallocBdev::new("m", 64, 512, None).unwrap())).unwrap();
        let d = reg.register(Arc::new(DelayBdev::new("d".into(), m.claim("d").unwrap(), [5000, 5000, 5000, 5000], None))).unwrap();
        let resv = Arc::new(Reservations::new(None, uuid::Uuid::from_u128(1)).unwrap());
        let reg_cmd = |k| Command::Register { action: 0, iekey: false, cptpl: 0, crkey: 0, nrkey: k };
        resv.execute(&A, reg_cmd(0xA)).unwrap();
        resv.execute(&B, reg_cmd(0xB)).unwrap();
        resv.execute(&A, Command::Acquire { action: 0, iekey: false, rtype: rtype::WRITE_EXCLUSIVE, crkey: 0xA, prkey: 0 }).unwrap();
        Rig { cores, d, resv, _reg: reg }
    }

    const A: HostId = [0xA; 16];
    const B: HostId = [0xB; 16];

    impl Rig {
        /// A command of host `h` on core `core`, counted and checked as `start` does, then at
        /// the delay bdev.
        fn io(&self, core: usize, h: HostId, access: Access) -> Done {
            let done: Done = Rc::new(Cell::new(0));
            let (d, resv, done2) = (self.d.clone(), self.resv.clone(), done.clone());
            self.cores.enter(core, || {
                // The host's counters are made on a core, as a queue's namespace cache makes them.
                let f = resv.in_flight(&h);
                reactor::spawn_detached(async move {
                    let t = resv.admit(&f, core);
                    if !resv.allows(&h, access) {
                        f.leave(t);
                        done2.set(1);
                        return;
                    }
                    let ch = Channel::get(&d).unwrap();
                    if access == Access::Write {
                        ch.write(0, &[IoSlice::new(&[h[0]; 512])]).await.unwrap();
                    } else {
                        ch.read(0, &mut [IoSliceMut::new(&mut [0u8; 512])]).await.unwrap();
                    }
                    f.leave(t);
                    done2.set(reactor::now_ns().max(2));
                })
            });
            done
        }

        /// Waits for drain `drain` on core 0; the returned cell gets the time it ended.
        fn wait(&self, drain: Drain) -> Done {
            let done: Done = Rc::new(Cell::new(0));
            let dd = done.clone();
            self.cores.enter(0, || {
                reactor::spawn_detached(async move {
                    reservation_drain(&drain, "nqn.test", 1).await;
                    dd.set(reactor::now_ns().max(2));
                })
            });
            done
        }

        /// Runs the cores to the next timer (time moves there).
        fn step(&self) {
            self.cores.run_until_idle();
            let t = self.cores.next_timer().expect("a timer pending");
            self.cores.advance_to(t);
            self.cores.run_until_idle();
        }
    }

    /// A preempted host's write held 5 ms by a delay bdev, counted as `start` counts it (on
    /// core 1's counter): the preempt's drain ends only when the write has completed, and a
    /// host nobody preempted (B, the issuer, with a read in flight on core 0) is not waited for.
    #[test]
    fn a_preempt_waits_for_the_preempted_hosts_write_at_the_bdev() {
        let r = rig();
        let write_done = r.io(1, A, Access::Write);
        // B is no holder, but Write Exclusive lets anybody read.
        let b_read_done = r.io(0, B, Access::Read);
        r.cores.run_until_idle();
        let fa = r.resv.in_flight(&A);
        assert_eq!(fa.total(), 1, "A's write is at the bdev");
        // B preempts and aborts A: A's later writes meet the conflict, the drain waits.
        let out = r.resv.execute(&B, Command::Acquire { action: 2, iekey: false, rtype: rtype::WRITE_EXCLUSIVE, crkey: 0xB, prkey: 0xA }).unwrap();
        assert_eq!(out.unregistered, vec![A]);
        let drain = r.resv.acquire_drain(out.unregistered.iter().copied());
        assert_eq!(drain.hosts(), 1, "only A, the preempted host, is waited for");
        // The same Acquire retried (the first timed out at the host): B already holds, nothing
        // is preempted, and still it waits for A's write (through the epoch).
        let out = r.resv.execute(&B, Command::Acquire { action: 0, iekey: false, rtype: rtype::WRITE_EXCLUSIVE, crkey: 0xB, prkey: 0 }).unwrap();
        assert!(out.unregistered.is_empty());
        let retried = r.resv.acquire_drain(std::iter::empty());
        assert!(!retried.done(), "a retried Acquire waits for the drain under way");
        assert!(!r.resv.allows(&A, Access::Write));
        let drain_done = r.wait(drain);
        let retried_done = r.wait(retried);
        r.cores.run_until_idle();
        assert_eq!(drain_done.get(), 0, "the Acquire waits while A's write is at the bdev");
        while write_done.get() == 0 || drain_done.get() == 0 || retried_done.get() == 0 {
            r.step();
            assert!(drain_done.get() == 0 || write_done.get() != 0, "the drain ended before A's write did");
            assert!(retried_done.get() == 0 || write_done.get() != 0, "the retried Acquire ended before A's write did");
        }
        assert!(drain_done.get() >= write_done.get() && retried_done.get() >= write_done.get());
        assert!(write_done.get() >= 5_000_000);
        assert!(b_read_done.get() > 1);
        assert_eq!(fa.total(), 0);
    }

    /// Release with Clear unregisters everybody and leaves no reservation: it completes only
    /// after the writes the old holder had at the bdev (so no write admitted under the old
    /// reservation lands after another host's first write), yet not after commands admitted
    /// after it: A, no longer fenced by anything, keeps writing on both cores and the Clear
    /// still ends.
    #[test]
    fn a_clear_waits_for_the_unregistered_hosts_writes_admitted_before_it() {
        let r = rig();
        let before = [r.io(0, A, Access::Write), r.io(1, A, Access::Write)];
        r.cores.run_until_idle();
        assert_eq!(r.resv.in_flight(&A).total(), 2);
        // Halfway through A's writes, B clears.
        r.cores.advance_to(2_500_000);
        r.cores.run_until_idle();
        let out = r.resv.execute(&B, Command::Release { action: 1, iekey: false, rtype: 0, crkey: 0xB }).unwrap();
        let mut gone = out.unregistered.clone();
        gone.sort();
        assert_eq!(gone, vec![A, B], "Clear unregisters every registrant, its issuer too");
        assert!(!r.resv.lock().active());
        let drain = r.resv.drain(out.unregistered.iter().copied());
        assert!(!drain.done());
        let cleared = r.wait(drain);
        // Commands after the Clear: nobody is registered, everything is admitted. A keeps a
        // write in flight on each core at every moment; none of them is waited for.
        let mut after = vec![r.io(0, A, Access::Write), r.io(1, A, Access::Write)];
        let b_write = r.io(0, B, Access::Write);
        while cleared.get() == 0 {
            r.step();
            assert!(cleared.get() == 0 || before.iter().all(|d| d.get() > 1), "the Clear ended before a write admitted under the reservation did");
            if after.iter().rev().take(2).all(|d| d.get() > 1) {
                after.push(r.io(0, A, Access::Write));
                after.push(r.io(1, A, Access::Write));
            }
            assert!(r.cores.enter(0, reactor::now_ns) < 20_000_000, "the Clear waits for commands admitted after it");
        }
        assert!(before.iter().all(|d| cleared.get() >= d.get()));
        assert!(after.iter().any(|d| d.get() == 0), "A still has a write in flight when the Clear ends");
        assert_eq!(b_write.get(), 0, "B's write, admitted after the Clear, was not waited for");
        while b_write.get() == 0 {
            r.step();
        }
        assert!(b_write.get() > cleared.get());
    }

    /// A worker is kept for the connection's life and charged to its buffer budget: it must
    /// stay small.
    #[test]
    fn a_worker_costs_less_than_a_page() {
        let n = worker_bytes();
        println!("a worker holds {n} bytes");
        assert!(n > 64 && n < 4096, "a worker holds {n} bytes");
    }

    /// A later Clear (or Acquire) cannot advance the epoch while commands of the epoch before
    /// the last advance are in flight: otherwise they would share a counter with new commands
    /// and the drain waiting for them might never end.
    #[test]
    fn a_drain_advances_the_epoch_only_once_the_previous_epoch_is_empty() {
        let r = rig();
        let w = r.io(1, A, Access::Write);
        r.cores.run_until_idle();
        // An Acquire preempting nobody: it advances at once (A's write is of the current epoch).
        let first = r.resv.drain(std::iter::empty());
        assert!(first.done());
        // A second drain must not advance back to the parity A's write is counted under.
        let second = r.resv.drain(std::iter::once(B));
        assert!(!second.done(), "A's write of the epoch before is still at the bdev");
        while w.get() == 0 {
            r.step();
        }
        assert!(second.done());
    }
}
