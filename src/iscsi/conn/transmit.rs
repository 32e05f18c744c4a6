//! Transmitting: the queue of PDUs (with digests and padding) and the writer, which sends
//! them with one `writev` per batch; StatSN/ExpCmdSN/MaxCmdSN stamping and Reject.

use super::*;

/// Most PDUs in one `writev`.
pub(super) const WRITE_BATCH: usize = 64;

/// A connection whose budget (or its core's) has less room than this advertises one command
/// of CmdSN window at most: hosts slow down before their commands meet TASK SET FULL.
pub(super) const BUDGET_PRESSURE_BYTES: u64 = 1 << 20;

/// Data of a queued PDU.
pub(super) enum OutData {
    None,
    Owned(Vec<u8>),
    Shared(Rc<DataIn>, usize, usize),
}

pub(super) struct OutPdu {
    /// BHS plus header digest.
    pub(super) hdr: [u8; BHS_LEN + 4],
    pub(super) hdr_len: u8,
    pub(super) data: OutData,
    /// Padding plus data digest.
    pub(super) tail: [u8; 8],
    pub(super) tail_len: u8,
}

impl OutPdu {
    fn data(&self) -> &[u8] {
        match &self.data {
            OutData::None => &[],
            OutData::Owned(v) => v,
            OutData::Shared(b, off, len) => &b.buf.as_ref().expect("a queued Data-In has its buffer")[*off..*off + *len],
        }
    }
}

impl Conn {
    pub(super) fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Stamps StatSN (advancing it when `advance`), ExpCmdSN and MaxCmdSN at bytes 24-35.
    pub(super) fn stamp(&self, h: &mut Bhs, advance: bool) {
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
    pub(super) fn queue(&self, mut h: Bhs, data: OutData) {
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

    pub(super) async fn writer(self: Rc<Self>) {
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
            for p in batch.drain(..) {
                if let OutData::Shared(d, ..) = p.data {
                    self.recycle_data_in(d);
                }
            }
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

    pub(super) fn reject(&self, reason: u8, rejected: &Bhs) {
        let mut h = Bhs::new(opcode::REJECT);
        h.0[1] = 0x80;
        h.0[2] = reason;
        h.set_u32(16, RESERVED_TAG);
        self.stamp(&mut h, true);
        self.queue(h, OutData::Owned(rejected.0.to_vec()));
    }
}
