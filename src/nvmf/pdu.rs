//! The NVMe/TCP transport binding (NVMe/TCP Transport Specification 1.0): PDU types, header
//! validation, digests and the builders of every PDU either side sends.
//!
//! Parsing is sans-I/O: [`check_header`] looks at a common header (and, once available, the
//! rest of the PDU header) and says how long the PDU is and where its data lies, or which
//! fatal error (FES) the receiver must report in a TermReq. The target's connections, our
//! initiator and the fuzz targets all go through these functions.

use super::spec::{sc, Cqe};
use super::spec::{sgl, Sqe, Status, Transfer};

pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

pub mod flags {
    pub const HDGST: u8 = 0x01;
    pub const DDGST: u8 = 0x02;
    /// H2CData/C2HData: last PDU of the transfer.
    pub const DATA_LAST: u8 = 0x04;
    /// C2HData: the command succeeded; no CapsuleResp follows.
    pub const DATA_SUCCESS: u8 = 0x08;
}

/// ICReq/ICResp DGST field bits.
pub const DGST_HEADER: u8 = 0x01;
pub const DGST_DATA: u8 = 0x02;

/// Length of the common header.
pub const CH_LEN: usize = 8;
pub const IC_LEN: usize = 128;
pub const CAPSULE_CMD_HLEN: usize = 72;
/// CapsuleResp, H2CData, C2HData, R2T and TermReq headers are all 24 bytes.
pub const SHORT_HLEN: usize = 24;
pub const DIGEST_LEN: usize = 4;
/// A TermReq carries at most this much of the offending PDU header.
pub const TERM_REQ_MAX_DATA: usize = 128;
/// Longest PDU header any builder here produces (a TermReq, or a padded C2HData header).
pub const MAX_TX_HEADER: usize = 160;
/// The smallest MAXH2CDATA a controller may announce.
pub const MIN_MAXH2CDATA: u32 = 4096;

/// Fatal Error Status of a TermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Fes {
    InvalidHeaderField = 1,
    PduSequenceError = 2,
    HeaderDigestError = 3,
    DataOutOfRange = 4,
    DataLimitExceeded = 5,
    UnsupportedParameter = 6,
}

impl Fes {
    pub fn from_u16(v: u16) -> Option<Fes> {
        Some(match v {
            1 => Fes::InvalidHeaderField,
            2 => Fes::PduSequenceError,
            3 => Fes::HeaderDigestError,
            4 => Fes::DataOutOfRange,
            5 => Fes::DataLimitExceeded,
            6 => Fes::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// A protocol violation that ends the connection with a TermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fatal {
    pub fes: Fes,
    /// Fatal Error Information: the byte offset of the bad field in the PDU header (or, for
    /// UnsupportedParameter, as the spec says, the offset of the parameter).
    pub fei: u32,
    pub why: &'static str,
}

impl Fatal {
    pub const fn new(fes: Fes, fei: u32, why: &'static str) -> Fatal {
        Fatal { fes, fei, why }
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?}, field offset {})", self.why, self.fes, self.fei)
    }
}

/// The common header of every PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub ty: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    pub fn parse(b: &[u8]) -> Option<CommonHeader> {
        let b = b.get(..CH_LEN)?;
        Some(CommonHeader { ty: b[0], flags: b[1], hlen: b[2], pdo: b[3], plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]) })
    }
}

/// Which side of the connection is receiving (decides which PDU types are legal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The controller, receiving host PDUs.
    Target,
    /// The host, receiving controller PDUs.
    Host,
}

/// What the receiver accepts: negotiated digests and size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxLimits {
    pub role: Role,
    /// Whether the ICReq/ICResp exchange is done (before: only IC PDUs; after: none).
    pub ic_done: bool,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Largest in-capsule data (target) accepted in one CapsuleCmd.
    pub max_capsule_data: u32,
    /// Largest data in one H2CData PDU (target: MAXH2CDATA) or C2HData PDU (host).
    pub max_data_pdu: u32,
}

/// Where the parts of a validated PDU lie, as offsets from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ch: CommonHeader,
    /// Header bytes including the header digest.
    pub header_len: usize,
    /// Offset of the data (after any padding); equal to `plen` when there is none.
    pub data_offset: usize,
    pub data_len: usize,
    /// Whether a data digest follows the data.
    pub ddgst: bool,
}

impl Layout {
    pub fn plen(&self) -> usize {
        self.ch.plen as usize
    }
}

fn expected_hlen(ty: u8) -> Option<usize> {
    Some(match ty {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_LEN,
        pdu_type::CAPSULE_CMD => CAPSULE_CMD_HLEN,
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ | pdu_type::CAPSULE_RESP | pdu_type::H2C_DATA | pdu_type::C2H_DATA | pdu_type::R2T => SHORT_HLEN,
        _ => return None,
    })
}

/// Validates a common header against the receiver's state and limits. On success the layout
/// says how many bytes the whole PDU takes and where its data is. Offsets in errors refer to
/// the common header fields: type 0, flags 1, hlen 2, pdo 3, plen 4.
pub fn check_header(ch: CommonHeader, lim: &RxLimits) -> Result<Layout, Fatal> {
    use pdu_type::*;
    let Some(hlen) = expected_hlen(ch.ty) else {
        return Err(Fatal::new(Fes::InvalidHeaderField, 0, "unknown PDU type"));
    };
    let legal = match lim.role {
        Role::Target => matches!(ch.ty, IC_REQ | H2C_TERM_REQ | CAPSULE_CMD | H2C_DATA),
        Role::Host => matches!(ch.ty, IC_RESP | C2H_TERM_REQ | CAPSULE_RESP | C2H_DATA | R2T),
    };
    if !legal {
        return Err(Fatal::new(Fes::InvalidHeaderField, 0, "PDU type not valid in this direction"));
    }
    if ch.hlen as usize != hlen {
        return Err(Fatal::new(Fes::InvalidHeaderField, 2, "wrong header length for the PDU type"));
    }
    let is_ic = matches!(ch.ty, IC_REQ | IC_RESP);
    let is_term = matches!(ch.ty, H2C_TERM_REQ | C2H_TERM_REQ);
    if is_ic != !lim.ic_done && !is_term {
        return Err(Fatal::new(Fes::PduSequenceError, 0, if is_ic { "repeated connection initialization" } else { "PDU before connection initialization" }));
    }
    let plen = ch.plen as usize;
    if is_ic {
        if plen != IC_LEN {
            return Err(Fatal::new(Fes::InvalidHeaderField, 4, "ICReq/ICResp length must be 128"));
        }
        return Ok(Layout { ch, header_len: IC_LEN, data_offset: IC_LEN, data_len: 0, ddgst: false });
    }
    if is_term {
        // TermReqs never carry digests; their data is a copy of the offending header.
        if !(SHORT_HLEN..=SHORT_HLEN + TERM_REQ_MAX_DATA).contains(&plen) {
            return Err(Fatal::new(Fes::InvalidHeaderField, 4, "TermReq length out of range"));
        }
        return Ok(Layout { ch, header_len: SHORT_HLEN, data_offset: SHORT_HLEN, data_len: plen - SHORT_HLEN, ddgst: false });
    }
    let has_hdgst = ch.flags & flags::HDGST != 0;
    if has_hdgst != lim.hdgst {
        return Err(Fatal::new(Fes::InvalidHeaderField, 1, "header digest flag does not match the negotiated digests"));
    }
    let header_len = hlen + if lim.hdgst { DIGEST_LEN } else { 0 };
    if plen < header_len {
        return Err(Fatal::new(Fes::InvalidHeaderField, 4, "PDU length shorter than its header"));
    }
    let carries_data = matches!(ch.ty, CAPSULE_CMD | H2C_DATA | C2H_DATA);
    if plen == header_len || !carries_data {
        if plen != header_len {
            return Err(Fatal::new(Fes::InvalidHeaderField, 4, "PDU length does not match a PDU without data"));
        }
        if matches!(ch.ty, H2C_DATA | C2H_DATA) {
            return Err(Fatal::new(Fes::InvalidHeaderField, 4, "data PDU without data"));
        }
        return Ok(Layout { ch, header_len, data_offset: plen, data_len: 0, ddgst: false });
    }
    let has_ddgst = ch.flags & flags::DDGST != 0;
    if has_ddgst != lim.ddgst {
        return Err(Fatal::new(Fes::InvalidHeaderField, 1, "data digest flag does not match the negotiated digests"));
    }
    let pdo = ch.pdo as usize;
    // CPDA is 0: data starts right after the header (and digest) or on any later 4-byte
    // boundary the sender chose.
    if pdo < header_len || pdo % 4 != 0 {
        return Err(Fatal::new(Fes::InvalidHeaderField, 3, "PDU data offset overlaps the header or is misaligned"));
    }
    let ddgst_len = if lim.ddgst { DIGEST_LEN } else { 0 };
    if plen < pdo + ddgst_len + 1 {
        return Err(Fatal::new(Fes::InvalidHeaderField, 4, "PDU length leaves no room for its data"));
    }
    let data_len = plen - pdo - ddgst_len;
    let limit = if ch.ty == CAPSULE_CMD { lim.max_capsule_data } else { lim.max_data_pdu };
    if data_len > limit as usize {
        return Err(Fatal::new(Fes::DataLimitExceeded, 4, "PDU data longer than the negotiated limit"));
    }
    Ok(Layout { ch, header_len, data_offset: pdo, data_len, ddgst: lim.ddgst })
}

/// CRC32C as NVMe/TCP digests use it.
pub fn digest(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Checks the header digest that follows the `hlen` header bytes in `hdr`.
pub fn header_digest_ok(hdr: &[u8], hlen: usize) -> bool {
    match hdr.get(hlen..hlen + DIGEST_LEN) {
        Some(d) => u32::from_le_bytes([d[0], d[1], d[2], d[3]]) == digest(&hdr[..hlen]),
        None => false,
    }
}

/// ICReq fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    pub hpda: u8,
    pub dgst: u8,
    pub maxr2t: u32,
}

impl IcReq {
    pub fn parse(b: &[u8]) -> Option<IcReq> {
        let b = b.get(..IC_LEN)?;
        Some(IcReq { pfv: u16::from_le_bytes([b[8], b[9]]), hpda: b[10], dgst: b[11], maxr2t: u32::from_le_bytes([b[12], b[13], b[14], b[15]]) })
    }

    pub fn to_bytes(&self) -> [u8; IC_LEN] {
        let mut b = [0u8; IC_LEN];
        b[0] = pdu_type::IC_REQ;
        b[2] = IC_LEN as u8;
        b[4..8].copy_from_slice(&(IC_LEN as u32).to_le_bytes());
        b[8..10].copy_from_slice(&self.pfv.to_le_bytes());
        b[10] = self.hpda;
        b[11] = self.dgst;
        b[12..16].copy_from_slice(&self.maxr2t.to_le_bytes());
        b
    }
}

/// ICResp fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    pub cpda: u8,
    pub dgst: u8,
    pub maxh2cdata: u32,
}

impl IcResp {
    pub fn parse(b: &[u8]) -> Option<IcResp> {
        let b = b.get(..IC_LEN)?;
        Some(IcResp { pfv: u16::from_le_bytes([b[8], b[9]]), cpda: b[10], dgst: b[11], maxh2cdata: u32::from_le_bytes([b[12], b[13], b[14], b[15]]) })
    }

    pub fn to_bytes(&self) -> [u8; IC_LEN] {
        let mut b = [0u8; IC_LEN];
        b[0] = pdu_type::IC_RESP;
        b[2] = IC_LEN as u8;
        b[4..8].copy_from_slice(&(IC_LEN as u32).to_le_bytes());
        b[8..10].copy_from_slice(&self.pfv.to_le_bytes());
        b[10] = self.cpda;
        b[11] = self.dgst;
        b[12..16].copy_from_slice(&self.maxh2cdata.to_le_bytes());
        b
    }
}

/// The specific header of H2CData/C2HData (after the common header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub cccid: u16,
    /// Transfer tag (H2CData only).
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
}

impl DataHeader {
    pub fn parse(b: &[u8]) -> Option<DataHeader> {
        let b = b.get(..SHORT_HLEN)?;
        Some(DataHeader {
            cccid: u16::from_le_bytes([b[8], b[9]]),
            ttag: u16::from_le_bytes([b[10], b[11]]),
            datao: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            datal: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        })
    }
}

/// R2T fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

impl R2t {
    pub fn parse(b: &[u8]) -> Option<R2t> {
        let d = DataHeader::parse(b)?;
        Some(R2t { cccid: d.cccid, ttag: d.ttag, r2to: d.datao, r2tl: d.datal })
    }
}

/// Bytes of one outgoing PDU header (with digest and padding), kept inline so queuing a PDU
/// allocates nothing.
#[derive(Clone)]
pub struct HeaderBytes {
    buf: [u8; MAX_TX_HEADER],
    len: usize,
}

impl HeaderBytes {
    fn new(len: usize) -> HeaderBytes {
        assert!(len <= MAX_TX_HEADER, "PDU header of {len} bytes");
        HeaderBytes { buf: [0; MAX_TX_HEADER], len }
    }

    pub fn from_slice(b: &[u8]) -> HeaderBytes {
        let mut h = HeaderBytes::new(b.len());
        h.buf[..b.len()].copy_from_slice(b);
        h
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn common(b: &mut [u8], ty: u8, flags: u8, hlen: usize, pdo: usize, plen: usize) {
    b[0] = ty;
    b[1] = flags;
    b[2] = hlen as u8;
    b[3] = pdo as u8;
    b[4..8].copy_from_slice(&(plen as u32).to_le_bytes());
}

fn seal_header_digest(b: &mut [u8], hlen: usize) {
    let d = digest(&b[..hlen]);
    b[hlen..hlen + DIGEST_LEN].copy_from_slice(&d.to_le_bytes());
}

/// CapsuleResp carrying `cqe`.
pub fn capsule_resp(cqe: &Cqe, hdgst: bool) -> HeaderBytes {
    let len = SHORT_HLEN + if hdgst { DIGEST_LEN } else { 0 };
    let mut h = HeaderBytes::new(len);
    common(&mut h.buf, pdu_type::CAPSULE_RESP, if hdgst { flags::HDGST } else { 0 }, SHORT_HLEN, 0, len);
    h.buf[8..24].copy_from_slice(&cqe.to_bytes());
    if hdgst {
        seal_header_digest(&mut h.buf, SHORT_HLEN);
    }
    h
}

/// Header of a C2HData PDU whose `datal` bytes follow (then the data digest, if enabled).
/// `data_align` is the host's requested alignment ((HPDA+1)*4).
#[allow(clippy::too_many_arguments)]
pub fn c2h_data(cccid: u16, datao: u32, datal: u32, last: bool, success: bool, hdgst: bool, ddgst: bool, data_align: usize) -> HeaderBytes {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let pdo = (SHORT_HLEN + hd).div_ceil(data_align.max(4)) * data_align.max(4);
    let plen = pdo + datal as usize + if ddgst { DIGEST_LEN } else { 0 };
    let mut fl = 0;
    if hdgst {
        fl |= flags::HDGST;
    }
    if ddgst {
        fl |= flags::DDGST;
    }
    if last {
        fl |= flags::DATA_LAST;
    }
    if success {
        fl |= flags::DATA_SUCCESS;
    }
    let mut h = HeaderBytes::new(pdo);
    common(&mut h.buf, pdu_type::C2H_DATA, fl, SHORT_HLEN, pdo, plen);
    h.buf[8..10].copy_from_slice(&cccid.to_le_bytes());
    h.buf[12..16].copy_from_slice(&datao.to_le_bytes());
    h.buf[16..20].copy_from_slice(&datal.to_le_bytes());
    if hdgst {
        seal_header_digest(&mut h.buf, SHORT_HLEN);
    }
    h
}

/// H2CData header (initiator side).
pub fn h2c_data(cccid: u16, ttag: u16, datao: u32, datal: u32, last: bool, hdgst: bool, ddgst: bool) -> HeaderBytes {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let pdo = SHORT_HLEN + hd;
    let plen = pdo + datal as usize + if ddgst { DIGEST_LEN } else { 0 };
    let mut fl = 0;
    if hdgst {
        fl |= flags::HDGST;
    }
    if ddgst {
        fl |= flags::DDGST;
    }
    if last {
        fl |= flags::DATA_LAST;
    }
    let mut h = HeaderBytes::new(pdo);
    common(&mut h.buf, pdu_type::H2C_DATA, fl, SHORT_HLEN, pdo, plen);
    h.buf[8..10].copy_from_slice(&cccid.to_le_bytes());
    h.buf[10..12].copy_from_slice(&ttag.to_le_bytes());
    h.buf[12..16].copy_from_slice(&datao.to_le_bytes());
    h.buf[16..20].copy_from_slice(&datal.to_le_bytes());
    if hdgst {
        seal_header_digest(&mut h.buf, SHORT_HLEN);
    }
    h
}

/// R2T asking for `r2tl` bytes at `r2to` of command `cccid`.
pub fn r2t(cccid: u16, ttag: u16, r2to: u32, r2tl: u32, hdgst: bool) -> HeaderBytes {
    let len = SHORT_HLEN + if hdgst { DIGEST_LEN } else { 0 };
    let mut h = HeaderBytes::new(len);
    common(&mut h.buf, pdu_type::R2T, if hdgst { flags::HDGST } else { 0 }, SHORT_HLEN, 0, len);
    h.buf[8..10].copy_from_slice(&cccid.to_le_bytes());
    h.buf[10..12].copy_from_slice(&ttag.to_le_bytes());
    h.buf[12..16].copy_from_slice(&r2to.to_le_bytes());
    h.buf[16..20].copy_from_slice(&r2tl.to_le_bytes());
    if hdgst {
        seal_header_digest(&mut h.buf, SHORT_HLEN);
    }
    h
}

/// CapsuleCmd header for `sqe` followed by `data_len` bytes of in-capsule data (initiator).
pub fn capsule_cmd(sqe: &Sqe, data_len: usize, hdgst: bool, ddgst: bool) -> HeaderBytes {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let header_len = CAPSULE_CMD_HLEN + hd;
    let (pdo, plen) = if data_len > 0 { (header_len, header_len + data_len + if ddgst { DIGEST_LEN } else { 0 }) } else { (0, header_len) };
    let mut fl = 0;
    if hdgst {
        fl |= flags::HDGST;
    }
    if ddgst && data_len > 0 {
        fl |= flags::DDGST;
    }
    let mut h = HeaderBytes::new(header_len);
    common(&mut h.buf, pdu_type::CAPSULE_CMD, fl, CAPSULE_CMD_HLEN, pdo, plen);
    h.buf[8..72].copy_from_slice(&sqe.0);
    if hdgst {
        seal_header_digest(&mut h.buf, CAPSULE_CMD_HLEN);
    }
    h
}

/// A TermReq (`ty` = H2C or C2H) reporting `fes` about the PDU whose header starts with
/// `offending` (at most 128 bytes of it are echoed).
pub fn term_req(ty: u8, fes: Fes, fei: u32, offending: &[u8]) -> HeaderBytes {
    let echo = &offending[..offending.len().min(TERM_REQ_MAX_DATA)];
    let len = SHORT_HLEN + echo.len();
    let mut h = HeaderBytes::new(len);
    common(&mut h.buf, ty, 0, SHORT_HLEN, 0, len);
    h.buf[8..10].copy_from_slice(&(fes as u16).to_le_bytes());
    h.buf[10..14].copy_from_slice(&fei.to_le_bytes());
    h.buf[SHORT_HLEN..len].copy_from_slice(echo);
    h
}

/// (FES, FEI) of a received TermReq.
pub fn parse_term_req(b: &[u8]) -> Option<(u16, u32)> {
    let b = b.get(..SHORT_HLEN)?;
    Some((u16::from_le_bytes([b[8], b[9]]), u32::from_le_bytes([b[10], b[11], b[12], b[13]])))
}

/// How a command's data moves, decided from its SGL and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlan {
    None,
    /// In the capsule, `len` bytes at `offset` of the in-capsule data.
    InCapsule {
        offset: u32,
        len: u32,
    },
    /// From the host through R2T/H2CData.
    FromHost {
        len: u32,
    },
    /// To the host in C2HData PDUs.
    ToHost {
        len: u32,
    },
}

impl DataPlan {
    pub fn len(&self) -> u32 {
        match *self {
            DataPlan::None => 0,
            DataPlan::InCapsule { len, .. } | DataPlan::FromHost { len } | DataPlan::ToHost { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decides how the data of `sqe` moves, given `icd_len` bytes of in-capsule data arrived with
/// it and transfers are limited to `max_transfer` bytes (MDTS). Errors are the NVMe status to
/// complete the command with.
pub fn plan_data(sqe: &Sqe, icd_len: usize, max_transfer: u32) -> Result<DataPlan, Status> {
    let dir = sqe.transfer();
    if dir == Transfer::None {
        return Ok(DataPlan::None);
    }
    if dir == Transfer::Bidirectional {
        return Err(Status::generic(sc::INVALID_FIELD));
    }
    // PSDT 01b or 10b: SGLs. Fabrics have no PRPs.
    if !matches!(sqe.psdt(), 1 | 2) {
        return Err(Status::generic(sc::INVALID_FIELD));
    }
    let (addr, len, ty) = sqe.sgl();
    if len == 0 {
        return Ok(DataPlan::None);
    }
    if len > max_transfer {
        // MDTS: "a command that exceeds this transfer size is aborted with Invalid Field".
        return Err(Status::generic(sc::INVALID_FIELD));
    }
    match (ty, dir) {
        (sgl::IN_CAPSULE, Transfer::HostToController) => {
            if addr > icd_len as u64 {
                return Err(Status::generic(sc::SGL_OFFSET_INVALID));
            }
            if addr + len as u64 > icd_len as u64 {
                return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
            }
            Ok(DataPlan::InCapsule { offset: addr as u32, len })
        }
        (sgl::TRANSPORT_DATA_BLOCK, Transfer::HostToController) => {
            if icd_len > 0 {
                // Data came in the capsule but the SGL says it will come later.
                return Err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID));
            }
            Ok(DataPlan::FromHost { len })
        }
        (sgl::TRANSPORT_DATA_BLOCK, Transfer::ControllerToHost) => Ok(DataPlan::ToHost { len }),
        _ => Err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)),
    }
}

/// Entry point of the capsule fuzz target: the first 64 bytes are an SQE, the rest its
/// in-capsule data. Runs the checks a capsule meets before its command executes: the PDU
/// header for every digest setting, the data plan from the SGL, and Connect parsing.
pub fn fuzz_capsule(data: &[u8]) {
    let mut sqe_bytes = [0u8; 64];
    let n = data.len().min(64);
    sqe_bytes[..n].copy_from_slice(&data[..n]);
    let sqe = Sqe(sqe_bytes);
    let icd = &data[n..];
    for dg in 0..4u8 {
        let (hdgst, ddgst) = (dg & 1 != 0, dg & 2 != 0);
        let h = capsule_cmd(&sqe, icd.len(), hdgst, ddgst);
        let lim = RxLimits { role: Role::Target, ic_done: true, hdgst, ddgst, max_capsule_data: 8192, max_data_pdu: 131072 };
        if let Some(ch) = CommonHeader::parse(h.as_slice()) {
            let _ = check_header(ch, &lim);
        }
    }
    for max in [4096, 131072] {
        if let Ok(DataPlan::InCapsule { offset, len }) = plan_data(&sqe, icd.len(), max) {
            assert!(offset as usize + len as usize <= icd.len(), "an in-capsule plan stays inside the capsule");
            if sqe.opcode() == super::spec::FABRICS_OPC {
                let _ = super::spec::ConnectRequest::parse(&sqe, &icd[offset as usize..(offset + len) as usize]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::spec::io_opc;
    use proptest::prelude::*;

    fn target_lim() -> RxLimits {
        RxLimits { role: Role::Target, ic_done: true, hdgst: false, ddgst: false, max_capsule_data: 8192, max_data_pdu: 131072 }
    }

    #[test]
    fn capsule_with_data_layout() {
        let mut sqe = Sqe::new(io_opc::WRITE, 7, 1);
        sqe.set_sgl(0, 4096, sgl::IN_CAPSULE);
        let h = capsule_cmd(&sqe, 4096, false, false);
        let ch = CommonHeader::parse(h.as_slice()).unwrap();
        let l = check_header(ch, &target_lim()).unwrap();
        assert_eq!((l.header_len, l.data_offset, l.data_len, l.plen()), (72, 72, 4096, 72 + 4096));
        assert_eq!(plan_data(&sqe, 4096, 131072), Ok(DataPlan::InCapsule { offset: 0, len: 4096 }));
    }

    #[test]
    fn digests_are_checked_and_flags_must_match() {
        let mut lim = target_lim();
        lim.hdgst = true;
        lim.ddgst = true;
        let sqe = Sqe::new(io_opc::READ, 1, 1);
        let h = capsule_cmd(&sqe, 0, true, true);
        let ch = CommonHeader::parse(h.as_slice()).unwrap();
        let l = check_header(ch, &lim).unwrap();
        assert_eq!(l.header_len, 76);
        assert!(header_digest_ok(h.as_slice(), 72));
        let mut bad = h.as_slice().to_vec();
        bad[20] ^= 1;
        assert!(!header_digest_ok(&bad, 72));
        // Without the negotiated digest flag: invalid header field at the flags byte.
        let h2 = capsule_cmd(&sqe, 0, false, false);
        let e = check_header(CommonHeader::parse(h2.as_slice()).unwrap(), &lim).unwrap_err();
        assert_eq!((e.fes, e.fei), (Fes::InvalidHeaderField, 1));
    }

    #[test]
    fn header_errors() {
        let lim = target_lim();
        let ch = |ty, hlen, pdo, plen| CommonHeader { ty, flags: 0, hlen, pdo, plen };
        assert_eq!(check_header(ch(0x42, 24, 0, 24), &lim).unwrap_err().fes, Fes::InvalidHeaderField);
        assert_eq!(check_header(ch(pdu_type::C2H_DATA, 24, 24, 100), &lim).unwrap_err().fei, 0);
        assert_eq!(check_header(ch(pdu_type::CAPSULE_CMD, 70, 0, 72), &lim).unwrap_err().fei, 2);
        assert_eq!(check_header(ch(pdu_type::CAPSULE_CMD, 72, 0, 60), &lim).unwrap_err().fei, 4);
        assert_eq!(check_header(ch(pdu_type::CAPSULE_CMD, 72, 40, 200), &lim).unwrap_err().fei, 3);
        assert_eq!(check_header(ch(pdu_type::CAPSULE_CMD, 72, 72, 72 + 9000), &lim).unwrap_err().fes, Fes::DataLimitExceeded);
        assert_eq!(check_header(ch(pdu_type::IC_REQ, 128, 0, 128), &lim).unwrap_err().fes, Fes::PduSequenceError);
        assert_eq!(check_header(ch(pdu_type::H2C_DATA, 24, 24, 24), &lim).unwrap_err().fei, 4);
        let mut pre = lim;
        pre.ic_done = false;
        assert_eq!(check_header(ch(pdu_type::CAPSULE_CMD, 72, 0, 72), &pre).unwrap_err().fes, Fes::PduSequenceError);
        assert!(check_header(ch(pdu_type::IC_REQ, 128, 0, 128), &pre).is_ok());
        assert_eq!(check_header(ch(pdu_type::IC_REQ, 128, 0, 129), &pre).unwrap_err().fei, 4);
    }

    #[test]
    fn data_plans() {
        let mut w = Sqe::new(io_opc::WRITE, 1, 1);
        w.set_sgl(0, 8192, sgl::TRANSPORT_DATA_BLOCK);
        assert_eq!(plan_data(&w, 0, 131072), Ok(DataPlan::FromHost { len: 8192 }));
        assert_eq!(plan_data(&w, 0, 4096), Err(Status::generic(sc::INVALID_FIELD)));
        assert_eq!(plan_data(&w, 512, 131072), Err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)));
        w.set_sgl(0, 8192, sgl::IN_CAPSULE);
        assert_eq!(plan_data(&w, 4096, 131072), Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID)));
        w.set_sgl(5000, 10, sgl::IN_CAPSULE);
        assert_eq!(plan_data(&w, 4096, 131072), Err(Status::generic(sc::SGL_OFFSET_INVALID)));
        let mut r = Sqe::new(io_opc::READ, 1, 1);
        r.set_sgl(0, 4096, sgl::TRANSPORT_DATA_BLOCK);
        assert_eq!(plan_data(&r, 0, 131072), Ok(DataPlan::ToHost { len: 4096 }));
        r.set_sgl(0, 4096, sgl::IN_CAPSULE);
        assert_eq!(plan_data(&r, 0, 131072), Err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)));
        r.set_sgl(0, 4096, 0x00);
        r.0[1] = 0; // PRPs
        assert_eq!(plan_data(&r, 0, 131072), Err(Status::generic(sc::INVALID_FIELD)));
    }

    #[test]
    fn builders_parse_back() {
        let h = c2h_data(9, 0, 4096, true, true, true, false, 4);
        let ch = CommonHeader::parse(h.as_slice()).unwrap();
        let lim = RxLimits { role: Role::Host, ic_done: true, hdgst: true, ddgst: false, max_capsule_data: 0, max_data_pdu: 1 << 20 };
        let l = check_header(ch, &lim).unwrap();
        assert_eq!((l.data_offset, l.data_len), (28, 4096));
        assert_eq!(DataHeader::parse(h.as_slice()).unwrap().cccid, 9);
        let t = term_req(pdu_type::C2H_TERM_REQ, Fes::HeaderDigestError, 0, &[0xAA; 200]);
        assert_eq!(t.len(), 24 + 128);
        assert_eq!(parse_term_req(t.as_slice()), Some((3, 0)));
        let ic = IcReq { pfv: 0, hpda: 0, dgst: 3, maxr2t: 0 };
        assert_eq!(IcReq::parse(&ic.to_bytes()), Some(ic));
        let r = r2t(3, 4, 0, 8192, false);
        assert_eq!(R2t::parse(r.as_slice()), Some(R2t { cccid: 3, ttag: 4, r2to: 0, r2tl: 8192 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
        /// The capsule fuzz target's body.
        #[test]
        fn arbitrary_capsules_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1200)) {
            crate::fuzz::nvmf_capsule(&data);
        }
    }

    proptest! {
        // Each case is a TCP connection to the in-process target: fewer cases.
        #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]
        /// The stream fuzz target's body (the real connection), run under `cargo test`:
        /// arbitrary bytes never panic or hang the target.
        #[test]
        fn arbitrary_streams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            crate::fuzz::nvmf_pdu(&data);
        }

        /// Streams that start with a valid ICReq get an ICResp and reach the capsule parser.
        #[test]
        fn streams_after_a_valid_icreq_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..400), cfg in 0u8..4) {
            let dg = (if cfg & 1 != 0 { DGST_HEADER } else { 0 }) | (if cfg & 2 != 0 { DGST_DATA } else { 0 });
            let mut data = IcReq { pfv: 0, hpda: 0, dgst: dg, maxr2t: 0 }.to_bytes().to_vec();
            data.extend_from_slice(&tail);
            let answer = crate::fuzz::nvmf_pdu(&data);
            prop_assert_eq!(answer.first().copied(), Some(pdu_type::IC_RESP));
        }
    }
}
