//! Receiving: the receive buffer and the reader, which parses PDUs and dispatches them.

use super::*;

/// Initial size of the receive buffer (it grows up to one PDU of the negotiated size).
pub(super) const RECV_BUF: usize = 64 * 1024;
/// Data segments at least this large are read straight into the command's buffer.
pub(super) const DIRECT_READ_MIN: usize = 16 * 1024;

/// Largest AHS accepted (an extended CDB of up to 260 bytes).
pub(super) const MAX_AHS: usize = 264;

/// The receive buffer: bytes read from the socket and not yet consumed.
pub(crate) struct RecvBuf {
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl RecvBuf {
    pub(super) fn new(cap: usize) -> Self {
        RecvBuf { buf: vec![0; cap], start: 0, end: 0 }
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn available(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.available());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes at least `n` bytes available (the buffer grows to hold them).
    pub(super) async fn fill(&mut self, s: &TcpStream, n: usize) -> io::Result<()> {
        if self.available() >= n {
            return Ok(());
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if n > self.buf.len() {
                self.buf.resize(n, 0);
            }
        }
        while self.available() < n {
            let r = s.read(&mut self.buf[self.end..]).await?;
            if r == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += r;
        }
        Ok(())
    }

    /// Fills `dest` from the buffer, then (for large remainders) straight from the socket.
    pub(super) async fn read_into(&mut self, s: &TcpStream, dest: &mut [u8]) -> io::Result<()> {
        let mut done = self.available().min(dest.len());
        dest[..done].copy_from_slice(&self.data()[..done]);
        self.consume(done);
        while done < dest.len() {
            let rest = dest.len() - done;
            if rest < DIRECT_READ_MIN {
                self.fill(s, rest).await?;
                dest[done..].copy_from_slice(&self.data()[..rest]);
                self.consume(rest);
                return Ok(());
            }
            let r = s.read(&mut dest[done..]).await?;
            if r == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += r;
        }
        Ok(())
    }

    /// Discards `n` bytes; returns their CRC32C appended to `crc`.
    pub(super) async fn skip_crc(&mut self, s: &TcpStream, mut n: usize, mut crc: u32) -> io::Result<u32> {
        while n > 0 {
            if self.available() == 0 {
                let want = n.min(self.buf.len());
                self.fill(s, want).await?;
            }
            let k = n.min(self.available());
            crc = crc32c::crc32c_append(crc, &self.data()[..k]);
            self.consume(k);
            n -= k;
        }
        Ok(crc)
    }

    pub(super) async fn skip(&mut self, s: &TcpStream, n: usize) -> io::Result<()> {
        self.skip_crc(s, n, 0).await.map(|_| ())
    }

    /// Reads a data segment of `len` bytes with its padding and (if `digest`) its CRC32C: the
    /// first `dest.len()` bytes into `dest`, the rest discarded. Returns whether the digest
    /// matched (always true without digests).
    pub(super) async fn read_segment(&mut self, s: &TcpStream, len: usize, dest: &mut [u8], digest: bool) -> io::Result<bool> {
        debug_assert!(dest.len() <= len);
        if len == 0 {
            // No data segment, so no padding and no data digest either.
            return Ok(true);
        }
        self.read_into(s, dest).await?;
        let crc = if digest { crc32c::crc32c(dest) } else { 0 };
        let crc = self.skip_crc(s, len - dest.len() + pdu::pad(len), crc).await?;
        if !digest {
            return Ok(true);
        }
        self.fill(s, 4).await?;
        let ok = self.data()[..4] == crc.to_le_bytes();
        self.consume(4);
        Ok(ok)
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
