//! Task management functions and logout: aborting tasks and draining running commands.

use super::*;

impl Conn {
    pub(super) fn logout(self: &Rc<Self>, bhs: &Bhs) {
        if !self.accept_cmd_sn(bhs) {
            return;
        }
        let reason = bhs.flags() & 0x7F;
        let itt = bhs.itt();
        let this = self.clone();
        self.replies.set(self.replies.get() + 1);
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
            this.replies.set(this.replies.get() - 1);
        });
    }

    /// Waits until no running command matches `which` (bounded).
    pub(super) async fn drain(&self, which: impl Fn(&Running) -> bool) {
        let start = reactor::now_ns();
        loop {
            let busy = self.st.borrow().tasks.values().any(|t| matches!(t, TaskSlot::Running(w) if !w.state.run.done.get() && which(&w.state.run)));
            if !busy || reactor::now_ns().saturating_sub(start) > DRAIN_TIMEOUT.as_nanos() as u64 {
                return;
            }
            reactor::sleep(Duration::from_micros(100)).await;
        }
    }

    /// Aborts the tasks of this connection that match: transfers still receiving data are

    /// dropped; running ones finish but send no response.
    pub(super) fn abort_where(&self, which: impl Fn(u32, u64) -> bool) -> usize {
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
            TaskSlot::Running(w) => {
                let r = &w.state.run;
                if which(itt, r.lun.get()) && !r.done.get() {
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

    pub(super) fn task_management(self: &Rc<Self>, bhs: &Bhs) {
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
                    Some(b) => {
                        self.abort_where(|_, l| Some(l) == lun_id);
                        b.lun.unit.reset(&b.nexus);
                        b.nexus.clear_unit_attentions();
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
                    if let Some(b) = self.lookup(l) {
                        b.lun.unit.reset(&b.nexus);
                        b.nexus.clear_unit_attentions();
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
        self.replies.set(self.replies.get() + 1);
        reactor::spawn_detached(async move {
            if let Some(l) = wait_lun {
                this.drain(|r| r.aborted.get() && (l.is_none() || Some(r.lun.get()) == l)).await;
            }
            let mut h = Bhs::new(opcode::TMF_RESP);
            h.0[1] = 0x80;
            h.0[2] = response;
            h.set_u32(16, itt);
            this.stamp(&mut h, true);
            this.queue(h, OutData::None);
            this.replies.set(this.replies.get() - 1);
        });
    }
}
