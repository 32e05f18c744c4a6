//! Text requests (SendTargets), with answers longer than one PDU continued on request.

use super::*;

impl Conn {
    pub(super) fn text(&self, bhs: &Bhs, data: &[u8]) {
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
}
