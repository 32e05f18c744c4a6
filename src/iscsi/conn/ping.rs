//! NOP-Out and NOP-In: answering the initiator's pings and pinging a silent initiator.

use super::*;

impl Conn {
    pub(super) async fn pinger(self: Rc<Self>) {
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

    pub(super) fn nop_out(&self, bhs: &Bhs, mut data: Vec<u8>) {
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
}
