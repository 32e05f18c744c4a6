//! Receiving: the reader, which parses PDUs from the receive buffer and dispatches them.

use super::*;

/// Largest AHS accepted (an extended CDB of up to 260 bytes).
pub(super) const MAX_AHS: usize = 264;

/// iSCSI's reading of data segments, on the reactor's receive buffer.
pub(super) trait SegmentRead {
    /// Reads a data segment of `len` bytes with its padding and (if `digest`) its CRC32C:
    /// the first `dest.len()` bytes into `dest`, the rest discarded. Returns whether the
    /// digest matched (always true without digests).
    async fn read_segment(&mut self, s: &TcpStream, len: usize, dest: &mut [u8], digest: bool) -> io::Result<bool>;
}

impl SegmentRead for RecvBuf {
    async fn read_segment(&mut self, s: &TcpStream, len: usize, dest: &mut [u8], digest: bool) -> io::Result<bool> {
        debug_assert!(dest.len() <= len);
        if len == 0 {
            // No data segment, so no padding and no data digest either.
            return Ok(true);
        }
        self.read_into(s, dest).await?;
        let mut crc = if digest { crc32c::crc32c(dest) } else { 0 };
        self.discard(s, len - dest.len() + pdu::pad(len), |b| crc = crc32c::crc32c_append(crc, b)).await?;
        if !digest {
            return Ok(true);
        }
        Ok(self.read_u32_le(s).await? == crc)
    }
}

impl Conn {
    pub(super) async fn reader(self: &Rc<Self>, mut rb: RecvBuf) -> Result<(), Stop> {
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
}
