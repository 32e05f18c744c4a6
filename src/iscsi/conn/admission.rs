//! Admission of a SCSI command: CmdSN window, task tags, immediate-command limit, LUN lookup
//! and the charge of its buffers to the budget (TASK SET FULL when they do not fit).

use super::*;

/// Immediate (I bit) commands in flight at once, beyond the CmdSN window.
pub(super) const MAX_IMMEDIATE: u32 = 8;

/// Largest Data-In buffer of commands that are not reads (their data is small).
pub(super) const MAX_CONTROL_DATA_IN: u64 = 64 * 1024;

/// A LUN as one connection uses it: the target's `Lun` and this connection's nexus on it.
/// Kept per connection (`State::units`) and shared with its commands by `Rc`: a command
/// cloning the `Arc<Lun>` would write the LUN's count, one cache line for every core with a
/// session on that LUN, twice per command (audit item C, docs/scaling.md). A command's `Rc`
/// still keeps the `Lun` (and its bdev hold) alive if the LUN is removed while it runs.
pub(super) struct Bound {
    pub(super) lun: Arc<Lun>,
    pub(super) nexus: Rc<Nexus>,
}

impl Conn {
    /// CmdSN check of a non-immediate request: Some(true) accepted (ExpCmdSN advanced), false
    /// outside the window (silently ignored, RFC 7143 §4.2.2.1).
    pub(super) fn accept_cmd_sn(&self, bhs: &Bhs) -> bool {
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

    pub(super) fn refresh_luns(&self, st: &mut State) {
        let Some(node) = &self.node else { return };
        let g = node.luns_generation.load(Relaxed);
        if g == st.lun_generation {
            return;
        }
        st.lun_generation = g;
        st.luns = node.luns();
        st.lun_ids = st.luns.iter().map(|l| l.id).collect();
        // A LUN id still listed keeps its nexus (and so its pending unit attentions) even when
        // the id now names another `Lun`, as the nexus table keyed by id always did; the `Lun`
        // follows the new list.
        let State { luns, units, .. } = &mut *st;
        units.retain(|id, b| match luns.iter().find(|l| l.id == *id) {
            None => false,
            Some(l) => {
                if !Arc::ptr_eq(l, &b.lun) {
                    *b = Rc::new(Bound { lun: l.clone(), nexus: b.nexus.clone() });
                }
                true
            }
        });
        for b in st.units.values() {
            b.nexus.add_unit_attention(scsi::sense::asc::REPORTED_LUNS_DATA_HAS_CHANGED);
        }
    }

    /// The LUN and this connection's nexus on it. After a LUN's first command on this
    /// connection, an `Rc` clone: no count shared with other cores is written.
    pub(super) fn lookup(&self, lun: u64) -> Option<Rc<Bound>> {
        let mut st = self.st.borrow_mut();
        self.refresh_luns(&mut st);
        if let Some(b) = st.units.get(&lun) {
            return Some(b.clone());
        }
        let l = st.luns.iter().find(|l| l.id == lun)?.clone();
        match l.unit.nexus(self.it.clone()) {
            Ok(nx) => {
                let b = Rc::new(Bound { lun: l, nexus: Rc::new(nx) });
                st.units.insert(lun, b.clone());
                Some(b)
            }
            Err(e) => {
                log::warn!("iscsi: cannot open LUN {lun} of {}: {e}", self.port.target_name);
                None
            }
        }
    }

    pub(super) async fn scsi_command(self: &Rc<Self>, bhs: &Bhs, ahs: &[u8], rb: &mut RecvBuf) -> Result<(), Stop> {
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
                Some(b) => cdb::parse(cdb_bytes, &b.lun.unit.geometry()),
                None => match cdb::parse(cdb_bytes, &cdb::Geometry { block_size: 512, num_blocks: 1 }) {
                    Ok(c @ (Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. })) => Ok(c),
                    _ => Err(Sense::lun_not_supported()),
                },
            }
        };
        let write_flag = flags & pdu::FLAG_WRITE != 0;
        let need = match (&parsed, &unit) {
            (Ok(c), Some(b)) => c.data_out_len(&b.lun.unit.geometry()).min(u32::MAX as u64) as u32,
            _ => 0,
        };
        let collect = if write_flag { need.min(edtl) } else { 0 };
        // The buffers this command will hold: its Data-Out and its Data-In.
        let din = match (&parsed, &unit) {
            (Ok(c @ Command::Read { .. }), Some(b)) => c.data_in_len(&b.lun.unit.geometry()),
            (Ok(c), Some(b)) => c.data_in_len(&b.lun.unit.geometry()).min(MAX_CONTROL_DATA_IN),
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
        let (Ok(cmd), Some(bound), true) = (parsed, unit.clone(), collect > 0) else {
            // No Data-Out to collect: absorb any immediate data and run the command now.
            let ok = rb.read_segment(s, dsl, &mut [], self.p.data_digest).await?;
            if !ok {
                self.shared.counters.digest_errors.fetch_add(1, Relaxed);
                self.reject(reject::DATA_DIGEST_ERROR, bhs);
                self.release_slot(immediate);
                return Ok(());
            }
            let job = Job { itt, immediate, lun_field, flags, edtl, need, unit, cmd: parsed, data: None, t0, failed: None, mem };
            self.start_command(job);
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
        let mut x = self.boxed_xfer(WriteXfer {
            itt,
            immediate,
            unit: Some(bound),
            lun_field,
            cmd,
            buf: Some(IoBuf::alloc(need as usize)),
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
            kept: None,
        });
        let take = dsl.min(collect as usize);
        let buf = x.buf.as_mut().expect("a new transfer has its buffer");
        let ok = rb.read_segment(s, dsl, &mut buf[..take], p.data_digest).await?;
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

    pub(super) fn release_slot(&self, immediate: bool) {
        let mut st = self.st.borrow_mut();
        if immediate {
            st.immediate = st.immediate.saturating_sub(1);
        } else {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}
