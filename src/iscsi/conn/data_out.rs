//! Data-Out and R2T: collecting a write's data, solicited or not, then running it.

use super::*;

/// A command whose Data-Out is still arriving. Boxed (a task entry stays small), and the box
/// is kept for the next write once the command runs (`State::spare_xfers`).
pub(super) struct WriteXfer {
    pub(super) itt: u32,
    pub(super) immediate: bool,
    /// The LUN and the nexus; None while the box is kept (it must not keep a LUN alive).
    pub(super) unit: Option<Rc<Bound>>,
    pub(super) lun_field: [u8; 8],
    pub(super) cmd: Command,
    /// The Data-Out buffer; None while the box is kept.
    pub(super) buf: Option<IoBuf>,
    pub(super) edtl: u32,
    /// Bytes the command takes: min(EDTL, what the CDB needs).
    pub(super) collect: u32,
    /// The CDB's need (for the residual).
    pub(super) need: u32,
    pub(super) unsolicited_end: u32,
    pub(super) unsolicited_pending: bool,
    pub(super) unsolicited_data_sn: u32,
    pub(super) next_r2t: u32,
    /// Outstanding R2Ts; its capacity is kept with the box.
    pub(super) r2ts: Vec<R2tState>,
    pub(super) r2t_sn: u32,
    /// Set when data arrived damaged (digest): the command ends with CHECK CONDITION.
    pub(super) failed: Option<Sense>,
    pub(super) t0: u64,
    pub(super) mem: Option<Lease>,
    /// The box's bytes ([`Conn::xfer_bytes`]) charged to the buffer budget while the
    /// connection keeps it (`Conn::charge_kept`); None when the budget had no room: it is freed after its command,
    /// so what a connection keeps is always charged (as for the workers).
    pub(super) kept: Option<Lease>,
}

pub(super) struct R2tState {
    pub(super) ttt: u32,
    pub(super) offset: u32,
    pub(super) len: u32,
    pub(super) received: u32,
    pub(super) data_sn: u32,
}

impl Conn {
    /// Bytes of one kept transfer: the box and its R2T vector at the most R2Ts it can hold.
    fn xfer_bytes(&self) -> u64 {
        (std::mem::size_of::<WriteXfer>() + self.p.max_outstanding_r2t as usize * std::mem::size_of::<R2tState>()) as u64
    }

    /// `x` in a box: a kept one when there is one (its R2T vector and charge stay with it),
    /// else a new one, charged if the budget has room.
    pub(super) fn boxed_xfer(&self, mut x: WriteXfer) -> Box<WriteXfer> {
        let spare = self.st.borrow_mut().spare_xfers.pop();
        match spare {
            Some(mut b) => {
                x.r2ts = std::mem::take(&mut b.r2ts);
                x.r2ts.clear();
                x.kept = b.kept.take();
                *b = x;
                b
            }
            None => {
                x.kept = self.charge_kept(self.xfer_bytes());
                Box::new(x)
            }
        }
    }

    /// Sends the R2Ts a transfer may have outstanding, or runs the command once all its data
    /// is in.
    pub(super) fn advance_write(self: &Rc<Self>, mut x: Box<WriteXfer>) {
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
        // All data in: what the command needs moves to its job; the box, emptied, is kept.
        let job = Job {
            itt: x.itt,
            immediate: x.immediate,
            lun_field: x.lun_field,
            flags: pdu::FLAG_WRITE,
            edtl: x.edtl,
            need: x.need,
            unit: x.unit.take(),
            cmd: Ok(x.cmd),
            data: x.buf.take().map(|b| (b, x.collect as usize)),
            t0: x.t0,
            failed: x.failed.take(),
            mem: x.mem.take(),
        };
        if x.kept.is_some() {
            self.st.borrow_mut().spare_xfers.push(x);
        }
        self.start_command(job);
    }

    pub(super) async fn data_out(self: &Rc<Self>, bhs: &Bhs, rb: &mut RecvBuf) -> Result<(), Stop> {
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
        let buf = x.buf.as_mut().expect("a receiving transfer has its buffer");
        let ok = rb.read_segment(s, dsl, &mut buf[lo..hi], self.p.data_digest).await?;
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
}
