//! An NVMe/TCP initiator (host): queue pairs over plain non-blocking sockets, the Fabrics
//! connect sequence, admin helpers (Identify, Get Log Page, features, discovery) and a
//! pipelined I/O interface for benchmarks. It is independent of the reactors, so benchmarks
//! and tests drive it from ordinary threads; it shares the PDU code with the target.
//!
//! Two ways to use a [`Qpair`]: [`Qpair::execute`] runs one command to completion (tests,
//! admin), [`Qpair::submit`] + [`Qpair::poll`] keep many commands in flight (the perf tool).
//! Raw access ([`Qpair::send_raw`], [`Qpair::recv_pdu`]) lets tests send malformed PDUs.

use super::pdu::{self, CommonHeader, DataHeader, IcReq, IcResp, R2t, RxLimits};
use super::spec::{self, admin_opc, connect, fctype, prop, sgl, Cqe, Sqe, Status, FABRICS_OPC};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the controller terminated the connection (FES {fes}, FEI {fei})")]
    TermReq { fes: u16, fei: u32 },
    #[error("timed out")]
    Timeout,
    #[error("command failed: {0}")]
    Status(Status),
    #[error("no free command slot")]
    QueueFull,
    #[error("connection closed by the controller")]
    Closed,
}

pub type Result<T> = std::result::Result<T, Error>;

/// A transport ID in SPDK's form: `trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420
/// subnqn:nqn...` (keys case-insensitive, separated by spaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportId {
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
    pub hostnqn: Option<String>,
}

impl TransportId {
    pub fn parse(s: &str) -> std::result::Result<TransportId, String> {
        let mut t = TransportId { traddr: String::new(), trsvcid: "4420".into(), subnqn: spec::DISCOVERY_NQN.into(), hostnqn: None };
        for part in s.split_whitespace() {
            let (k, v) = part.split_once(':').ok_or_else(|| format!("{part:?} is not key:value"))?;
            match k.to_ascii_lowercase().as_str() {
                "trtype" if v.eq_ignore_ascii_case("tcp") => {}
                "trtype" => return Err(format!("trtype {v} is not supported (only TCP)")),
                "adrfam" if v.eq_ignore_ascii_case("ipv4") || v.eq_ignore_ascii_case("ipv6") => {}
                "adrfam" => return Err(format!("adrfam {v} is not IPv4 or IPv6")),
                "traddr" => t.traddr = v.to_string(),
                "trsvcid" => t.trsvcid = v.to_string(),
                "subnqn" => t.subnqn = v.to_string(),
                "hostnqn" => t.hostnqn = Some(v.to_string()),
                "ns" | "nsid" => {}
                other => return Err(format!("unknown transport ID key {other:?}")),
            }
        }
        if t.traddr.is_empty() {
            return Err("the transport ID has no traddr".into());
        }
        Ok(t)
    }

    pub fn socket_addr(&self) -> std::result::Result<SocketAddr, String> {
        let host = if self.traddr.contains(':') { format!("[{}]", self.traddr) } else { self.traddr.clone() };
        format!("{host}:{}", self.trsvcid)
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.traddr))?
            .next()
            .ok_or_else(|| format!("{} resolves to nothing", self.traddr))
    }
}

/// The Host Identifier a host sends in Connect for `hostnqn`. NVMe reservations know a host
/// by this identifier, not by its NQN, so two nodes that sent the same one would be one
/// registrant and could not fence each other. It is derived from the NQN rather than drawn at
/// random or kept in the data directory: a node that restarts (or reconnects) must come back
/// as the same registrant, and the NQN is the identity the operator already gives each node.
/// A UUID NQN (`nqn.2014-08.org.nvmexpress:uuid:<uuid>`, what nvme-cli and SPDK generate)
/// carries its identifier, as the Linux host uses it; any other NQN maps to a name-based
/// UUID (v5) of the NQN, stable across restarts and distinct per NQN.
pub fn host_id_for(hostnqn: &str) -> [u8; 16] {
    const UUID_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:";
    /// The namespace of the name-based identifiers (fixed: changing it would change every
    /// node's identity, and with it the registrations it holds).
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x7469_6465_6d61_4b00_8000_686f_7374_6964);
    if let Some(u) = hostnqn.strip_prefix(UUID_NQN).and_then(|s| uuid::Uuid::parse_str(s).ok()) {
        return *u.as_bytes();
    }
    *uuid::Uuid::new_v5(&NAMESPACE, hostnqn.as_bytes()).as_bytes()
}

/// Reservation commands as a host sends them (NVMe Base 2.0 §7.5-7.8): CDW10 and the data.
pub mod resv {
    /// Reservation Register actions (RREGA).
    pub const REGISTER: u8 = 0;
    pub const UNREGISTER: u8 = 1;
    pub const REPLACE: u8 = 2;
    /// Reservation Acquire actions (RACQA).
    pub const ACQUIRE: u8 = 0;
    pub const PREEMPT: u8 = 1;
    pub const PREEMPT_AND_ABORT: u8 = 2;
    /// Reservation Release actions (RRELA).
    pub const RELEASE: u8 = 0;

    /// CDW10 of a Register (`cptpl` 0: leave PTPL as is), Acquire or Release.
    pub fn cdw10(action: u8, iekey: bool, rtype: u8, cptpl: u8) -> u32 {
        (action as u32 & 7) | (iekey as u32) << 3 | (rtype as u32) << 8 | (cptpl as u32 & 3) << 30
    }

    /// The 16 bytes of a Register (CRKEY, NRKEY) or an Acquire (CRKEY, PRKEY).
    pub fn keys(a: u64, b: u64) -> Vec<u8> {
        let mut d = a.to_le_bytes().to_vec();
        d.extend_from_slice(&b.to_le_bytes());
        d
    }

    /// One registrant of an extended Reservation Report.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Registrant {
        pub cntlid: u16,
        pub holds: bool,
        pub key: u64,
        pub host_id: [u8; 16],
    }

    /// An extended Reservation Report (EDS = 1): the reservation type (0: none) and the
    /// registrants. None when the data is short.
    pub fn parse_report(d: &[u8]) -> Option<(u8, Vec<Registrant>)> {
        let head = d.get(..64)?;
        let n = u16::from_le_bytes([head[5], head[6]]) as usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let Some(e) = d.get(64 + i * 64..128 + i * 64) else { break };
            let mut key = [0u8; 8];
            key.copy_from_slice(&e[8..16]);
            let mut host_id = [0u8; 16];
            host_id.copy_from_slice(&e[16..32]);
            out.push(Registrant { cntlid: u16::from_le_bytes([e[0], e[1]]), holds: e[2] & 1 != 0, key: u64::from_le_bytes(key), host_id });
        }
        Some((head[4], out))
    }
}

/// How to connect a queue pair.
#[derive(Debug, Clone)]
pub struct QpairOptions {
    pub hdgst: bool,
    pub ddgst: bool,
    /// Queue entries (SQSIZE + 1).
    pub queue_size: u16,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Keep-alive timeout sent in the admin Connect (ms; 0 = none).
    pub kato_ms: u32,
    /// Ask the controller to disable SQ flow control (lets it skip CapsuleResps for reads).
    pub disable_sqflow: bool,
    /// Wait limit of synchronous operations.
    pub timeout: Duration,
    /// TLS 1.3 with a pre-shared key (`super::tls::client_context`): every connection of the
    /// controller starts with the handshake.
    pub tls: Option<openssl::ssl::SslContext>,
}

impl Default for QpairOptions {
    fn default() -> Self {
        QpairOptions {
            hdgst: false,
            ddgst: false,
            queue_size: 128,
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-746964656d61".into(),
            hostid: *uuid::Uuid::from_u128(0x0000_0000_0000_4000_8000_7469_6465_6d61).as_bytes(),
            kato_ms: 0,
            disable_sqflow: true,
            timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// A host connection: plain TCP, or TLS over it. Non-blocking once connected; a TLS read or
/// write that would block says `WouldBlock` as the socket does.
pub enum HostStream {
    Plain(TcpStream),
    Tls(Box<openssl::ssl::SslStream<TcpStream>>),
}

impl HostStream {
    /// Connects to `addr` (within `timeout`), runs the TLS handshake when `tls` is given, and
    /// leaves the socket non-blocking.
    fn connect(addr: SocketAddr, timeout: Duration, tls: Option<&openssl::ssl::SslContext>) -> Result<HostStream> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_nodelay(true)?;
        let s = match tls {
            None => HostStream::Plain(tcp),
            Some(ctx) => {
                tcp.set_read_timeout(Some(timeout))?;
                tcp.set_write_timeout(Some(timeout))?;
                let ssl = openssl::ssl::Ssl::new(ctx).map_err(|e| Error::Protocol(format!("TLS: {e}")))?;
                let t = ssl.connect(tcp).map_err(|e| Error::Protocol(format!("TLS handshake with {addr}: {e}")))?;
                t.get_ref().set_read_timeout(None)?;
                t.get_ref().set_write_timeout(None)?;
                HostStream::Tls(Box::new(t))
            }
        };
        s.tcp().set_nonblocking(true)?;
        Ok(s)
    }

    /// The TCP connection underneath (for shutdown and readiness).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            HostStream::Plain(s) => s,
            HostStream::Tls(t) => t.get_ref(),
        }
    }

    /// Bytes decrypted and not read yet: readable although the socket may not be.
    pub fn pending(&self) -> usize {
        match self {
            HostStream::Plain(_) => 0,
            HostStream::Tls(t) => t.ssl().pending(),
        }
    }
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Plain(s) => s.read(buf),
            HostStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Plain(s) => s.write(buf),
            HostStream::Tls(t) => t.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            HostStream::Plain(s) => s.write_vectored(bufs),
            HostStream::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Data of a submitted command.
pub enum Payload<'a> {
    None,
    /// Host-to-controller data.
    Out(&'a [u8]),
    /// Host-to-controller data of this length, from the command's buffer as it is (benchmarks
    /// that do not care about content avoid a copy).
    OutScratch(usize),
    /// Controller-to-host data of this length.
    In(usize),
    /// Controller-to-host data of this length, received and dropped (many queues at full
    /// depth without a buffer per command: benchmarks and tests of the target's memory).
    InDiscard(usize),
}

/// A completed command.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub cid: u16,
    pub cqe: Cqe,
    /// When it was submitted (for latency).
    pub submitted: Instant,
}

struct Req {
    busy: bool,
    buf: Vec<u8>,
    /// Bytes of `buf` the controller asks for with R2Ts.
    out_len: usize,
    /// Bytes expected from the controller.
    in_len: usize,
    in_got: usize,
    submitted: Instant,
    /// A C2HData with SUCCESS completed it before any CapsuleResp.
    done: bool,
}

/// One NVMe/TCP queue pair.
pub struct Qpair {
    stream: HostStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    tx_off: usize,
    pub hdgst: bool,
    pub ddgst: bool,
    pub maxh2cdata: u32,
    /// Largest in-capsule data this queue sends (admin: 8 KiB; I/O: from IOCCSZ).
    pub max_inline: usize,
    reqs: Vec<Req>,
    free: Vec<u16>,
    pub qid: u16,
    pub cntlid: u16,
    timeout: Duration,
    closed: bool,
    /// Completions of other commands that arrived while `execute` waited for its own.
    stash: Vec<Completion>,
}

const RX_CAP: usize = (1 << 20) + 4096;

impl Qpair {
    /// Opens the TCP connection and exchanges ICReq/ICResp.
    pub fn connect(addr: SocketAddr, o: &QpairOptions) -> Result<Qpair> {
        let stream = HostStream::connect(addr, o.timeout, o.tls.as_ref())?;
        let n = o.queue_size.max(2) as usize;
        let mut q = Qpair {
            stream,
            rx: vec![0u8; RX_CAP],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(64 * 1024),
            tx_off: 0,
            hdgst: false,
            ddgst: false,
            maxh2cdata: 0,
            max_inline: super::transport::ADMIN_ICD as usize,
            reqs: (0..n).map(|_| Req { busy: false, buf: Vec::new(), out_len: 0, in_len: 0, in_got: 0, submitted: Instant::now(), done: false }).collect(),
            free: (0..n as u16).rev().collect(),
            qid: 0,
            cntlid: 0,
            timeout: o.timeout,
            closed: false,
            stash: Vec::new(),
        };
        let dg = (if o.hdgst { pdu::DGST_HEADER } else { 0 }) | (if o.ddgst { pdu::DGST_DATA } else { 0 });
        q.send_raw(&IcReq { pfv: 0, hpda: 0, dgst: dg, maxr2t: 0 }.to_bytes())?;
        let raw = q.recv_pdu_with(RxLimits { role: pdu::Role::Host, ic_done: false, hdgst: false, ddgst: false, max_capsule_data: 0, max_data_pdu: 0 })?;
        let resp = IcResp::parse(&raw).ok_or_else(|| Error::Protocol("short ICResp".into()))?;
        if resp.pfv != 0 || resp.cpda != 0 {
            return Err(Error::Protocol(format!("unsupported ICResp: pfv {} cpda {}", resp.pfv, resp.cpda)));
        }
        if resp.dgst != dg {
            return Err(Error::Protocol(format!("digest mismatch: asked {dg:#x}, controller answered {:#x}", resp.dgst)));
        }
        if resp.maxh2cdata < pdu::MIN_MAXH2CDATA || resp.maxh2cdata % 4 != 0 {
            return Err(Error::Protocol(format!("invalid MAXH2CDATA {}", resp.maxh2cdata)));
        }
        q.hdgst = o.hdgst;
        q.ddgst = o.ddgst;
        q.maxh2cdata = resp.maxh2cdata;
        Ok(q)
    }

    /// The TCP connection underneath.
    pub fn stream(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// The connection, for a queue that goes on elsewhere (the bdev's I/O queues).
    pub fn into_stream(self) -> HostStream {
        self.stream
    }

    fn limits(&self) -> RxLimits {
        RxLimits { role: pdu::Role::Host, ic_done: true, hdgst: self.hdgst, ddgst: self.ddgst, max_capsule_data: 0, max_data_pdu: 1 << 20 }
    }

    /// Commands in flight.
    pub fn outstanding(&self) -> usize {
        self.reqs.len() - self.free.len()
    }

    pub fn capacity(&self) -> usize {
        self.reqs.len()
    }

    /// Sends the Fabrics Connect for queue `qid` of controller `cntlid` (0xFFFF: a new one).
    #[allow(clippy::too_many_arguments)]
    pub fn fabric_connect(&mut self, qid: u16, cntlid: u16, subnqn: &str, o: &QpairOptions) -> Result<u16> {
        let mut sqe = Sqe::new(FABRICS_OPC, 0, 0);
        sqe.0[4] = fctype::CONNECT;
        sqe.0[connect::QID..connect::QID + 2].copy_from_slice(&qid.to_le_bytes());
        sqe.0[connect::SQSIZE..connect::SQSIZE + 2].copy_from_slice(&(o.queue_size - 1).to_le_bytes());
        if o.disable_sqflow {
            sqe.0[connect::CATTR] = connect::CATTR_DISABLE_SQ_FLOW;
        }
        if qid == 0 {
            sqe.0[connect::KATO..connect::KATO + 4].copy_from_slice(&o.kato_ms.to_le_bytes());
        }
        let mut data = vec![0u8; spec::CONNECT_DATA_LEN];
        data[0..16].copy_from_slice(&o.hostid);
        data[16..18].copy_from_slice(&cntlid.to_le_bytes());
        spec::put_padded(&mut data[256..512], subnqn, 0);
        spec::put_padded(&mut data[512..768], &o.hostnqn, 0);
        let (cqe, _) = self.execute(sqe, Payload::Out(&data))?;
        let st = cqe.status();
        if !st.is_success() {
            return Err(Error::Status(st));
        }
        self.qid = qid;
        self.cntlid = cqe.dw0 as u16;
        Ok(self.cntlid)
    }

    /// Queues command `sqe` (its CID is assigned here and returned).
    pub fn submit(&mut self, mut sqe: Sqe, payload: Payload<'_>) -> Result<u16> {
        if self.closed {
            return Err(Error::Closed);
        }
        let cid = self.free.pop().ok_or(Error::QueueFull)?;
        sqe.set_cid(cid);
        let hdgst = self.hdgst;
        let ddgst = self.ddgst;
        let r = &mut self.reqs[cid as usize];
        r.busy = true;
        r.done = false;
        r.submitted = Instant::now();
        r.out_len = 0;
        r.in_len = 0;
        r.in_got = 0;
        let (inline, out_len) = match payload {
            Payload::None => (None, 0),
            Payload::In(n) => {
                if r.buf.len() < n {
                    r.buf.resize(n, 0);
                }
                r.in_len = n;
                sqe.set_sgl(0, n as u32, sgl::TRANSPORT_DATA_BLOCK);
                (None, 0)
            }
            Payload::InDiscard(n) => {
                r.in_len = n;
                r.buf.clear();
                sqe.set_sgl(0, n as u32, sgl::TRANSPORT_DATA_BLOCK);
                (None, 0)
            }
            Payload::Out(d) => {
                if r.buf.len() < d.len() {
                    r.buf.resize(d.len(), 0);
                }
                r.buf[..d.len()].copy_from_slice(d);
                (Some(d.len()), d.len())
            }
            Payload::OutScratch(n) => {
                if r.buf.len() < n {
                    r.buf.resize(n, 0);
                }
                (Some(n), n)
            }
        };
        match inline {
            Some(n) if n <= self.max_inline => {
                sqe.set_sgl(0, n as u32, sgl::IN_CAPSULE);
                let h = pdu::capsule_cmd(&sqe, n, hdgst, ddgst);
                self.tx.extend_from_slice(h.as_slice());
                let r = &self.reqs[cid as usize];
                self.tx.extend_from_slice(&r.buf[..n]);
                if ddgst {
                    let d = pdu::digest(&r.buf[..n]);
                    self.tx.extend_from_slice(&d.to_le_bytes());
                }
            }
            Some(n) => {
                self.reqs[cid as usize].out_len = out_len;
                sqe.set_sgl(0, n as u32, sgl::TRANSPORT_DATA_BLOCK);
                self.tx.extend_from_slice(pdu::capsule_cmd(&sqe, 0, hdgst, ddgst).as_slice());
            }
            None => {
                // No data: a null Transport SGL, unless the caller built its own SGL.
                if sqe.sgl().1 == 0 {
                    sqe.set_sgl(0, 0, sgl::TRANSPORT_DATA_BLOCK);
                }
                self.tx.extend_from_slice(pdu::capsule_cmd(&sqe, 0, hdgst, ddgst).as_slice());
            }
        }
        Ok(cid)
    }

    /// Writes what is queued without waiting; true when everything left.
    pub fn flush(&mut self) -> Result<bool> {
        while self.tx_off < self.tx.len() {
            match self.stream.write(&self.tx[self.tx_off..]) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => self.tx_off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.tx.clear();
        self.tx_off = 0;
        Ok(true)
    }

    /// Sends, reads what arrived and handles it; completions go to `out`. Never waits.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let before = out.len();
        out.append(&mut self.stash);
        if !self.closed {
            self.flush()?;
        }
        loop {
            // Handle every complete PDU in the buffer.
            while let Some(len) = self.complete_pdu_len()? {
                self.handle_pdu(len, out)?;
            }
            if self.rx_start > 0 && (self.rx.len() - self.rx_end) < 65536 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.closed {
                break;
            }
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                // Completions that came before the close are still delivered; the close is
                // reported by the next poll.
                Ok(0) => self.closed = true,
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let n = out.len() - before;
        if self.closed {
            return if n > 0 { Ok(n) } else { Err(Error::Closed) };
        }
        self.flush()?;
        Ok(n)
    }

    /// The length of the PDU at the front of the receive buffer, once it is all there.
    fn complete_pdu_len(&self) -> Result<Option<usize>> {
        let avail = &self.rx[self.rx_start..self.rx_end];
        let Some(ch) = CommonHeader::parse(avail) else { return Ok(None) };
        let layout = pdu::check_header(ch, &self.limits()).map_err(|f| Error::Protocol(format!("bad PDU from the controller: {f}")))?;
        Ok((avail.len() >= layout.plen()).then_some(layout.plen()))
    }

    fn handle_pdu(&mut self, len: usize, out: &mut Vec<Completion>) -> Result<()> {
        let start = self.rx_start;
        self.rx_start += len;
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        let p = start..start + len;
        let ch = CommonHeader::parse(&self.rx[p.clone()]).ok_or_else(|| Error::Protocol("short PDU".into()))?;
        let layout = pdu::check_header(ch, &self.limits()).map_err(|f| Error::Protocol(f.to_string()))?;
        let hlen = ch.hlen as usize;
        if self.hdgst && ch.ty != pdu::pdu_type::C2H_TERM_REQ && !pdu::header_digest_ok(&self.rx[p.clone()], hlen) {
            return Err(Error::Protocol("header digest mismatch from the controller".into()));
        }
        match ch.ty {
            pdu::pdu_type::C2H_TERM_REQ => {
                let (fes, fei) = pdu::parse_term_req(&self.rx[p]).unwrap_or((0, 0));
                self.closed = true;
                Err(Error::TermReq { fes, fei })
            }
            pdu::pdu_type::CAPSULE_RESP => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&self.rx[start + 8..start + 24]);
                let cqe = Cqe::from_bytes(&b);
                self.finish(cqe, out)
            }
            pdu::pdu_type::C2H_DATA => {
                let dh = DataHeader::parse(&self.rx[p.clone()]).ok_or_else(|| Error::Protocol("short C2HData".into()))?;
                let cid = dh.cccid as usize;
                let data = start + layout.data_offset..start + layout.data_offset + layout.data_len;
                if layout.ddgst {
                    let d = &self.rx[data.end..data.end + 4];
                    if u32::from_le_bytes([d[0], d[1], d[2], d[3]]) != pdu::digest(&self.rx[data.clone()]) {
                        return Err(Error::Protocol("data digest mismatch from the controller".into()));
                    }
                }
                let r = self.reqs.get_mut(cid).filter(|r| r.busy).ok_or_else(|| Error::Protocol(format!("C2HData for unknown command {cid}")))?;
                let (a, b) = (dh.datao as usize, dh.datao as usize + dh.datal as usize);
                if b > r.in_len || dh.datal as usize != layout.data_len {
                    return Err(Error::Protocol(format!("C2HData beyond the transfer of command {cid}")));
                }
                if let Some(dst) = r.buf.get_mut(a..b) {
                    dst.copy_from_slice(&self.rx[data]);
                }
                r.in_got += dh.datal as usize;
                if ch.flags & pdu::flags::DATA_SUCCESS != 0 {
                    if ch.flags & pdu::flags::DATA_LAST == 0 {
                        return Err(Error::Protocol("C2HData SUCCESS without LAST".into()));
                    }
                    let cqe = Cqe { cid: dh.cccid, ..Default::default() };
                    return self.finish(cqe, out);
                }
                Ok(())
            }
            pdu::pdu_type::R2T => {
                let r2t = R2t::parse(&self.rx[p]).ok_or_else(|| Error::Protocol("short R2T".into()))?;
                let cid = r2t.cccid as usize;
                let (hdgst, ddgst, max) = (self.hdgst, self.ddgst, self.maxh2cdata as usize);
                let r = self.reqs.get(cid).filter(|r| r.busy).ok_or_else(|| Error::Protocol(format!("R2T for unknown command {cid}")))?;
                let (a, total) = (r2t.r2to as usize, r2t.r2tl as usize);
                if total == 0 || a + total > r.out_len {
                    return Err(Error::Protocol(format!("R2T beyond the data of command {cid}")));
                }
                let mut off = 0;
                while off < total {
                    let n = max.min(total - off);
                    let last = off + n == total;
                    let h = pdu::h2c_data(r2t.cccid, r2t.ttag, (a + off) as u32, n as u32, last, hdgst, ddgst);
                    let chunk = &self.reqs[cid].buf[a + off..a + off + n];
                    self.tx.extend_from_slice(h.as_slice());
                    self.tx.extend_from_slice(chunk);
                    if ddgst {
                        let d = pdu::digest(chunk);
                        self.tx.extend_from_slice(&d.to_le_bytes());
                    }
                    off += n;
                }
                Ok(())
            }
            other => Err(Error::Protocol(format!("unexpected PDU type {other:#x}"))),
        }
    }

    fn finish(&mut self, cqe: Cqe, out: &mut Vec<Completion>) -> Result<()> {
        let cid = cqe.cid as usize;
        let r = self.reqs.get_mut(cid).filter(|r| r.busy).ok_or_else(|| Error::Protocol(format!("completion for unknown command {cid}")))?;
        if r.done {
            // SUCCESS already completed it; a CapsuleResp after that is a protocol error.
            return Err(Error::Protocol(format!("second completion for command {cid}")));
        }
        r.busy = false;
        r.done = true;
        out.push(Completion { cid: cqe.cid, cqe, submitted: r.submitted });
        self.free.push(cqe.cid);
        Ok(())
    }

    /// Data received for command `cid` (valid until the id is reused).
    pub fn data(&self, cid: u16) -> &[u8] {
        let r = &self.reqs[cid as usize];
        &r.buf[..r.in_len.min(r.buf.len())]
    }

    /// Waits (at most `timeout`) until the socket is readable or, with `write`, writable.
    fn wait_io(&self, timeout: Duration, write: bool) {
        // Decrypted bytes waiting in the TLS session make no readiness on the socket.
        if self.stream.pending() > 0 {
            return;
        }
        let mut fds = libc::pollfd { fd: self.stream.tcp().as_raw_fd(), events: libc::POLLIN | if write { libc::POLLOUT } else { 0 }, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fds, 1, ms) };
    }

    /// Runs one command to completion; returns its completion and the data it read.
    pub fn execute(&mut self, sqe: Sqe, payload: Payload<'_>) -> Result<(Cqe, Vec<u8>)> {
        let cid = self.submit(sqe, payload)?;
        let deadline = Instant::now() + self.timeout;
        let mut done = Vec::new();
        loop {
            self.poll(&mut done)?;
            if let Some(i) = done.iter().position(|c| c.cid == cid) {
                let c = done.remove(i);
                self.stash.append(&mut done);
                let data = self.data(cid).to_vec();
                return Ok((c.cqe, data));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout);
            }
            self.wait_io((deadline - now).min(Duration::from_millis(100)), !self.tx.is_empty());
        }
    }

    /// Writes raw bytes (blocking up to the timeout).
    pub fn send_raw(&mut self, b: &[u8]) -> Result<()> {
        self.tx.extend_from_slice(b);
        let deadline = Instant::now() + self.timeout;
        while !self.flush()? {
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            self.wait_io(Duration::from_millis(50), true);
        }
        Ok(())
    }

    /// Receives the next whole PDU as raw bytes (header, data, digests).
    pub fn recv_pdu(&mut self) -> Result<Vec<u8>> {
        self.recv_pdu_with(self.limits())
    }

    fn recv_pdu_with(&mut self, lim: RxLimits) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let avail = &self.rx[self.rx_start..self.rx_end];
            if let Some(ch) = CommonHeader::parse(avail) {
                let l = pdu::check_header(ch, &lim).map_err(|f| Error::Protocol(f.to_string()))?;
                if avail.len() >= l.plen() {
                    let v = avail[..l.plen()].to_vec();
                    self.rx_start += l.plen();
                    return Ok(v);
                }
            }
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout);
                    }
                    self.wait_io(Duration::from_millis(50), false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the controller closes the connection (EOF), discarding what arrives.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut junk = [0u8; 4096];
        while Instant::now() < deadline {
            match self.stream.read(&mut junk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.wait_io(Duration::from_millis(50), false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Reads an I/O queue's command builder for NVM reads/writes.
    pub fn rw_sqe(opcode: u8, nsid: u32, slba: u64, nlb: u32) -> Sqe {
        let mut s = Sqe::new(opcode, 0, nsid);
        s.set_cdw(10, slba as u32);
        s.set_cdw(11, (slba >> 32) as u32);
        s.set_cdw(12, nlb.saturating_sub(1) & 0xFFFF);
        s
    }
}

/// Selected Identify Controller fields.
#[derive(Debug, Clone, Default)]
pub struct IdentifyController {
    pub vid: u16,
    pub ssvid: u16,
    pub sn: String,
    pub mn: String,
    pub fr: String,
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: u32,
    pub oaes: u32,
    pub cntrltype: u8,
    pub aerl: u8,
    pub kas: u16,
    pub maxcmd: u16,
    pub nn: u32,
    pub oncs: u16,
    pub vwc: u8,
    pub sgls: u32,
    pub subnqn: String,
    pub ioccsz: u32,
    pub iorcsz: u32,
    pub icdoff: u16,
    pub msdbd: u8,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string()
}
fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl IdentifyController {
    pub fn parse(b: &[u8]) -> Option<IdentifyController> {
        if b.len() < spec::IDENTIFY_LEN {
            return None;
        }
        Some(IdentifyController {
            vid: u16_at(b, 0),
            ssvid: u16_at(b, 2),
            sn: text(&b[4..24]),
            mn: text(&b[24..64]),
            fr: text(&b[64..72]),
            mdts: b[77],
            cntlid: u16_at(b, 78),
            ver: u32_at(b, 80),
            oaes: u32_at(b, 92),
            cntrltype: b[111],
            aerl: b[259],
            kas: u16_at(b, 320),
            maxcmd: u16_at(b, 514),
            nn: u32_at(b, 516),
            oncs: u16_at(b, 520),
            vwc: b[525],
            sgls: u32_at(b, 536),
            subnqn: text(&b[768..1024]),
            ioccsz: u32_at(b, 1792),
            iorcsz: u32_at(b, 1796),
            icdoff: u16_at(b, 1800),
            msdbd: b[1803],
        })
    }
}

/// Selected Identify Namespace fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentifyNamespace {
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nmic: u8,
    pub nsattr: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub block_size: u32,
}

impl IdentifyNamespace {
    pub fn parse(b: &[u8]) -> Option<IdentifyNamespace> {
        if b.len() < spec::IDENTIFY_LEN {
            return None;
        }
        let flbas = (b[26] & 0xF) as usize;
        let lbads = b[128 + flbas * 4 + 2];
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        Some(IdentifyNamespace {
            nsze: u64_at(b, 0),
            ncap: u64_at(b, 8),
            nuse: u64_at(b, 16),
            nmic: b[30],
            nsattr: b[99],
            nguid,
            eui64,
            block_size: if lbads >= 9 && lbads < 32 { 1u32 << lbads } else { 0 },
        })
    }
}

/// One discovery log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    pub asqsz: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
}

/// (generation counter, entries) of a discovery log page.
pub fn parse_discovery_log(b: &[u8]) -> Option<(u64, Vec<DiscoveryEntry>)> {
    if b.len() < 1024 {
        return None;
    }
    let genctr = u64_at(b, 0);
    let n = u64_at(b, 8) as usize;
    let mut out = Vec::new();
    for i in 0..n {
        let Some(r) = b.get(1024 * (i + 1)..1024 * (i + 2)) else { break };
        out.push(DiscoveryEntry {
            trtype: r[0],
            adrfam: r[1],
            subtype: r[2],
            treq: r[3],
            portid: u16_at(r, 4),
            cntlid: u16_at(r, 6),
            asqsz: u16_at(r, 8),
            trsvcid: text(&r[32..64]),
            subnqn: text(&r[256..512]),
            traddr: text(&r[512..768]),
        });
    }
    Some((genctr, out))
}

/// A host-side controller: the admin queue, connected and enabled.
pub struct Controller {
    pub admin: Qpair,
    pub cntlid: u16,
    pub subnqn: String,
    pub addr: SocketAddr,
    pub opts: QpairOptions,
    pub id: IdentifyController,
}

impl Controller {
    /// Connects the admin queue, enables the controller and reads Identify Controller.
    pub fn connect(addr: SocketAddr, subnqn: &str, opts: &QpairOptions) -> Result<Controller> {
        let mut aq_opts = opts.clone();
        aq_opts.queue_size = 32;
        let mut admin = Qpair::connect(addr, &aq_opts)?;
        let cntlid = admin.fabric_connect(0, spec::CNTLID_DYNAMIC, subnqn, &aq_opts)?;
        let mut c = Controller { admin, cntlid, subnqn: subnqn.to_string(), addr, opts: opts.clone(), id: IdentifyController::default() };
        // CC: EN, IOSQES 6, IOCQES 4.
        c.property_set(prop::CC, 1 | (6 << 16) | (4 << 20))?;
        let deadline = Instant::now() + opts.timeout;
        while c.property_get(prop::CSTS)? & 1 == 0 {
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let idb = c.identify(spec::cns::CONTROLLER, 0)?;
        c.id = IdentifyController::parse(&idb).ok_or_else(|| Error::Protocol("short Identify Controller".into()))?;
        Ok(c)
    }

    fn admin_cmd(&mut self, sqe: Sqe, payload: Payload<'_>) -> Result<(Cqe, Vec<u8>)> {
        let (cqe, data) = self.admin.execute(sqe, payload)?;
        let st = cqe.status();
        if !st.is_success() {
            return Err(Error::Status(st));
        }
        Ok((cqe, data))
    }

    pub fn property_get(&mut self, ofst: u32) -> Result<u64> {
        let mut sqe = Sqe::new(FABRICS_OPC, 0, 0);
        sqe.0[4] = fctype::PROPERTY_GET;
        sqe.0[spec::property::ATTRIB] = if ofst == prop::CAP { 1 } else { 0 };
        sqe.0[spec::property::OFFSET..spec::property::OFFSET + 4].copy_from_slice(&ofst.to_le_bytes());
        let (cqe, _) = self.admin_cmd(sqe, Payload::None)?;
        Ok(cqe.dw0 as u64 | (cqe.dw1 as u64) << 32)
    }

    pub fn property_set(&mut self, ofst: u32, value: u32) -> Result<()> {
        let mut sqe = Sqe::new(FABRICS_OPC, 0, 0);
        sqe.0[4] = fctype::PROPERTY_SET;
        sqe.0[spec::property::OFFSET..spec::property::OFFSET + 4].copy_from_slice(&ofst.to_le_bytes());
        sqe.0[spec::property::VALUE..spec::property::VALUE + 4].copy_from_slice(&value.to_le_bytes());
        self.admin_cmd(sqe, Payload::None)?;
        Ok(())
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Vec<u8>> {
        let mut sqe = Sqe::new(admin_opc::IDENTIFY, 0, nsid);
        sqe.set_cdw(10, cns as u32);
        Ok(self.admin_cmd(sqe, Payload::In(spec::IDENTIFY_LEN))?.1)
    }

    pub fn identify_namespace(&mut self, nsid: u32) -> Result<IdentifyNamespace> {
        let b = self.identify(spec::cns::NAMESPACE, nsid)?;
        IdentifyNamespace::parse(&b).ok_or_else(|| Error::Protocol("short Identify Namespace".into()))
    }

    /// Active namespace ids.
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>> {
        let b = self.identify(spec::cns::ACTIVE_NS_LIST, 0)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).take_while(|&n| n != 0).collect())
    }

    pub fn get_log_page(&mut self, lid: u8, nsid: u32, len: usize, offset: u64, rae: bool) -> Result<Vec<u8>> {
        let numd = (len / 4) as u32 - 1;
        let mut sqe = Sqe::new(admin_opc::GET_LOG_PAGE, 0, nsid);
        sqe.set_cdw(10, lid as u32 | if rae { 1 << 15 } else { 0 } | (numd & 0xFFFF) << 16);
        sqe.set_cdw(11, numd >> 16);
        sqe.set_cdw(12, offset as u32);
        sqe.set_cdw(13, (offset >> 32) as u32);
        Ok(self.admin_cmd(sqe, Payload::In(len))?.1)
    }

    /// The whole discovery log (header first, then all records, as nvme-cli reads it).
    pub fn discovery_log(&mut self) -> Result<(u64, Vec<DiscoveryEntry>)> {
        let head = self.get_log_page(spec::log::DISCOVERY, 0, 1024, 0, false)?;
        let n = u64_at(&head, 8) as usize;
        let full = self.get_log_page(spec::log::DISCOVERY, 0, 1024 * (n + 1), 0, false)?;
        parse_discovery_log(&full).ok_or_else(|| Error::Protocol("short discovery log".into()))
    }

    pub fn set_features(&mut self, fid: u8, cdw11: u32) -> Result<u32> {
        let mut sqe = Sqe::new(admin_opc::SET_FEATURES, 0, 0);
        sqe.set_cdw(10, fid as u32);
        sqe.set_cdw(11, cdw11);
        Ok(self.admin_cmd(sqe, Payload::None)?.0.dw0)
    }

    pub fn get_features(&mut self, fid: u8) -> Result<u32> {
        let mut sqe = Sqe::new(admin_opc::GET_FEATURES, 0, 0);
        sqe.set_cdw(10, fid as u32);
        Ok(self.admin_cmd(sqe, Payload::None)?.0.dw0)
    }

    pub fn keep_alive(&mut self) -> Result<()> {
        self.admin_cmd(Sqe::new(admin_opc::KEEP_ALIVE, 0, 0), Payload::None)?;
        Ok(())
    }

    /// Asks for `n` I/O queues; returns how many were granted.
    pub fn set_queue_count(&mut self, n: u16) -> Result<u16> {
        let v = (n - 1) as u32;
        let g = self.set_features(spec::feat::NUMBER_OF_QUEUES, v | v << 16)?;
        Ok(((g & 0xFFFF).min(g >> 16) + 1) as u16)
    }

    /// Connects I/O queue `qid` with `queue_size` entries.
    pub fn connect_io(&mut self, qid: u16, queue_size: u16) -> Result<Qpair> {
        let mut o = self.opts.clone();
        o.queue_size = queue_size;
        let mut q = Qpair::connect(self.addr, &o)?;
        q.fabric_connect(qid, self.cntlid, &self.subnqn, &o)?;
        if self.id.ioccsz >= 4 {
            q.max_inline = (self.id.ioccsz as usize * 16).saturating_sub(64);
        }
        Ok(q)
    }

    /// Normal shutdown (CC.SHN), waiting for CSTS.SHST = complete.
    pub fn shutdown(&mut self) -> Result<()> {
        let cc = self.property_get(prop::CC)? as u32;
        self.property_set(prop::CC, cc | (1 << 14))?;
        let deadline = Instant::now() + self.opts.timeout;
        while (self.property_get(prop::CSTS)? >> 2) & 3 != 2 {
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_ids_parse() {
        let t = TransportId::parse("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4421 subnqn:nqn.2016-06.io.t:a").unwrap();
        assert_eq!(t.socket_addr().unwrap().to_string(), "127.0.0.1:4421");
        assert_eq!(t.subnqn, "nqn.2016-06.io.t:a");
        assert!(TransportId::parse("trtype:RDMA traddr:1.2.3.4").is_err());
        assert!(TransportId::parse("traddr").is_err());
        assert!(TransportId::parse("trsvcid:1").is_err());
        assert_eq!(TransportId::parse("traddr:::1 trsvcid:4420").unwrap().socket_addr().unwrap().to_string(), "[::1]:4420");
    }

    #[test]
    fn host_ids_follow_the_nqn() {
        let u = "nqn.2014-08.org.nvmexpress:uuid:a0a0a0a0-0000-4000-8000-00000000000a";
        assert_eq!(uuid::Uuid::from_bytes(host_id_for(u)).to_string(), "a0a0a0a0-0000-4000-8000-00000000000a");
        // The default options' identifier is their NQN's.
        let d = QpairOptions::default();
        assert_eq!(host_id_for(&d.hostnqn), d.hostid);
        // Other NQNs: stable, and distinct per NQN.
        let a = host_id_for("nqn.2016-06.io.tidemark:node-a");
        assert_eq!(a, host_id_for("nqn.2016-06.io.tidemark:node-a"));
        assert_ne!(a, host_id_for("nqn.2016-06.io.tidemark:node-b"));
        assert_ne!(a, [0u8; 16]);
    }

    #[test]
    fn reservation_commands_match_the_target() {
        use crate::nvmf::reservation::{Command, ResvState};
        use crate::nvmf::spec::io_opc;
        let c = Command::parse(io_opc::RESERVATION_ACQUIRE, resv::cdw10(resv::PREEMPT_AND_ABORT, false, 1, 0), &resv::keys(5, 6));
        assert_eq!(c, Some(Command::Acquire { action: 2, iekey: false, rtype: 1, crkey: 5, prkey: 6 }));
        let c = Command::parse(io_opc::RESERVATION_REGISTER, resv::cdw10(resv::REPLACE, true, 0, 3), &resv::keys(0, 9));
        assert_eq!(c, Some(Command::Register { action: 2, iekey: true, cptpl: 3, crkey: 0, nrkey: 9 }));
        // A report of the target's state parses back.
        let mut st = ResvState::default();
        let (h1, h2) = ([1u8; 16], [2u8; 16]);
        st.execute(&h1, Command::Register { action: 0, iekey: false, cptpl: 0, crkey: 0, nrkey: 0x11 }, false).unwrap();
        st.execute(&h2, Command::Register { action: 0, iekey: false, cptpl: 0, crkey: 0, nrkey: 0x22 }, false).unwrap();
        st.execute(&h2, Command::Acquire { action: 0, iekey: false, rtype: 1, crkey: 0x22, prkey: 0 }, false).unwrap();
        let d = st.report(true, |_| Some(7)).unwrap();
        let (rtype, regs) = resv::parse_report(&d).unwrap();
        assert_eq!(rtype, 1);
        assert_eq!(regs.len(), 2);
        let holder = regs.iter().find(|r| r.holds).unwrap();
        assert_eq!((holder.key, holder.host_id, holder.cntlid), (0x22, h2, 7));
        assert!(resv::parse_report(&d[..10]).is_none());
    }
}
