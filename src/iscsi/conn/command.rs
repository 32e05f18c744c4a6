//! Running a SCSI command and sending its Data-In and status.

use super::*;

/// Data-In of a command, queued for the writer, with its share of the buffer budget. The
/// Data-In PDUs of one command share it (an `Rc`); once the writer has sent the last of them
/// the allocation is kept for a later command's Data-In ([`Conn::recycle_data_in`]): an `Rc`
/// per read would be an allocation per read.
pub(super) struct DataIn {
    /// None while kept between commands.
    pub(super) buf: Option<IoBuf>,
    pub(super) mem: Option<Lease>,
    /// Its own bytes ([`DATA_IN_BYTES`]) charged to the buffer budget while the connection
    /// keeps it (`Conn::charge_kept`); None when the budget had no room: it is freed after its command,
    /// so what a connection keeps is always charged (as for the workers).
    kept: Option<Lease>,
}

/// Bytes of one kept Data-In: the value and the `Rc`'s two counts.
const DATA_IN_BYTES: u64 = (std::mem::size_of::<DataIn>() + 2 * std::mem::size_of::<usize>()) as u64;

/// Bookkeeping of a running command, as task management sees it (for aborts). Held by the
/// worker that runs the command, which is in the connection's `tasks` under the command's tag
/// while it runs: no allocation per command.
pub(super) struct Running {
    pub(super) lun: Cell<u64>,
    pub(super) aborted: Cell<bool>,
    pub(super) done: Cell<bool>,
}

/// A task of the connection that runs its SCSI commands one after the other and is kept
/// between them (idle in [`Workers`]): a task per command would allocate its frame per command.
/// A connection has at most as many as it has had commands running at once.
pub(super) type Worker = reactor::Worker<Job, WorkerState>;

/// The workers of one connection.
pub(super) type Workers = reactor::Workers<Job, WorkerState>;

/// What a worker keeps with it.
pub(super) struct WorkerState {
    /// The command it runs (reset for each command; see [`Running`]).
    pub(super) run: Running,
    /// Its memory ([`worker_bytes`]) charged to the buffer budget for as long as it is kept
    /// (`Conn::charge_kept`); None when the budget had no room: it ends after its command
    /// (holding that memory only while the command runs, as a task per command did), so what
    /// a connection keeps is always charged.
    _kept: Option<Lease>,
}

/// Bytes one kept worker holds: its task's future (with the frame of the command it runs),
/// the executor's header of the task, and the `Worker`.
pub fn worker_bytes() -> usize {
    reactor::task_bytes(&worker) + std::mem::size_of::<Worker>() + std::mem::size_of::<Rc<Worker>>()
}

/// A worker's life: a command, back to the idle list, the next command; woken without one
/// (the connection ended: [`Workers::stop`]), it returns and drops its hold on the connection.
async fn worker(conn: Rc<Conn>, w: Rc<Worker>) {
    while let Some(job) = w.next().await {
        conn.clone().execute(job, &w.state.run).await;
        if !conn.workers.finished(&w) {
            return;
        }
    }
}

impl Conn {
    /// Runs `job` in an idle worker, or in a new one when all are busy (during warm-up, or
    /// when the initiator goes deeper than before). The worker enters `tasks` under the
    /// command's tag, where task management finds it.
    pub(super) fn start_command(self: &Rc<Self>, job: Job) {
        let (itt, lun) = (job.itt, scsi::decode_lun(&job.lun_field).unwrap_or(u64::MAX));
        let make = || {
            let kept = self.charge_kept(worker_bytes() as u64);
            let is_kept = kept.is_some();
            let run = Running { lun: Cell::new(u64::MAX), aborted: Cell::new(false), done: Cell::new(false) };
            (WorkerState { run, _kept: kept }, is_kept)
        };
        let w = self.workers.dispatch(job, make, |w| reactor::spawn_detached(worker(self.clone(), w)));
        // The worker runs the command once this task yields: its bookkeeping is set now.
        let run = &w.state.run;
        run.lun.set(lun);
        run.aborted.set(false);
        run.done.set(false);
        self.st.borrow_mut().tasks.insert(itt, TaskSlot::Running(w));
    }

    /// A charge of `n` bytes for something the connection keeps between commands, or None
    /// when the core's budget has no room for it (then it is not kept). Charged to the core
    /// only (`try_charge_state`), not to the connection's limit for its commands' buffers.
    pub(super) fn charge_kept(&self, n: u64) -> Option<Lease> {
        self.budget.try_charge_state(n)
    }

    /// A Data-In for `buf`, in a kept allocation when there is one.
    fn data_in(&self, buf: IoBuf, mem: Option<Lease>) -> Rc<DataIn> {
        let spare = self.spare_data_in.borrow_mut().pop();
        match spare {
            Some(mut d) => {
                let x = Rc::get_mut(&mut d).expect("a kept Data-In is not shared");
                x.buf = Some(buf);
                x.mem = mem;
                d
            }
            None => Rc::new(DataIn { buf: Some(buf), mem, kept: self.charge_kept(DATA_IN_BYTES) }),
        }
    }

    /// Called by the writer with each Data-In PDU it has sent: once the command's last one is
    /// sent, the buffer and its charge go back and the allocation is kept for the next
    /// command's Data-In (if it is charged and the connection is not closing).
    pub(super) fn recycle_data_in(&self, mut d: Rc<DataIn>) {
        // Shared: other PDUs of the command are still queued; dropping ours is the count.
        let Some(x) = Rc::get_mut(&mut d) else { return };
        x.buf = None;
        x.mem = None;
        if x.kept.is_some() && !self.control.closing.get() {
            self.spare_data_in.borrow_mut().push(d);
        }
    }

    /// Runs one SCSI command and sends its data and status.
    pub(super) async fn execute(self: Rc<Self>, job: Job, run: &Running) {
        let Job { itt, immediate, lun_field, flags, edtl, need, unit, cmd, data, t0, failed, mem } = job;
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
            (None, Ok(cmd), Some(bound)) => {
                let Bound { lun, nexus } = &**bound;
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
                    let buf = self.data_in(din.take().expect("data produced into a buffer"), mem);
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
    pub(super) fn send_data_in(&self, itt: u32, lun: &[u8; 8], buf: Rc<DataIn>, len: u32, status: Status, res_flag: u8, residual: u32) {
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

    pub(super) fn send_response(&self, itt: u32, status: u8, sense: Option<Sense>, res_flag: u8, residual: u32, exp_data_sn: u32) {
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
pub(super) struct Job {
    pub(super) itt: u32,
    pub(super) immediate: bool,
    pub(super) lun_field: [u8; 8],
    pub(super) flags: u8,
    pub(super) edtl: u32,
    pub(super) need: u32,
    pub(super) unit: Option<Rc<Bound>>,
    pub(super) cmd: Result<Command, Sense>,
    pub(super) data: Option<(IoBuf, usize)>,
    pub(super) t0: u64,
    pub(super) failed: Option<Sense>,
    pub(super) mem: Option<Lease>,
}

pub(super) fn residual_of(actual: u32, edtl: u32) -> (u8, u32) {
    if actual > edtl {
        (pdu::FLAG_OVERFLOW, actual - edtl)
    } else if actual < edtl {
        (pdu::FLAG_UNDERFLOW, edtl - actual)
    } else {
        (0, 0)
    }
}

pub(super) fn io_type(c: &Command) -> Option<IoType> {
    match c {
        Command::Read { .. } => Some(IoType::Read),
        Command::Write { .. } | Command::WriteVerify { .. } | Command::CompareAndWrite { .. } | Command::OrWrite { .. } => Some(IoType::Write),
        Command::WriteSame { unmap: true, .. } | Command::Unmap { .. } => Some(IoType::Unmap),
        Command::WriteSame { .. } => Some(IoType::WriteZeroes),
        Command::SyncCache { .. } => Some(IoType::Flush),
        _ => None,
    }
}
