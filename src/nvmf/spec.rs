//! NVMe and NVMe over Fabrics definitions used by both the target and our initiator: the
//! submission queue entry (64 bytes), the completion queue entry (16 bytes), opcodes, status
//! codes, and the numbers of the controller registers, features, log pages and identify data
//! structures we implement. Field offsets follow the NVMe Base 1.4 and NVMe-oF 1.1 layouts.

/// The well-known NQN of the discovery service.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Longest NQN (NVMe Base §7.9: 223 bytes of UTF-8).
pub const MAX_NQN_LEN: usize = 223;
/// Size of Identify, of the Connect data and of several log pages.
pub const IDENTIFY_LEN: usize = 4096;
pub const CONNECT_DATA_LEN: usize = 1024;
/// Broadcast namespace id.
pub const NSID_ALL: u32 = 0xFFFF_FFFF;
/// Dynamic controller model: the host asks for "any controller" with this id.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;

pub mod admin_opc {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
}

pub mod io_opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
    pub const RESERVATION_REGISTER: u8 = 0x0D;
    pub const RESERVATION_REPORT: u8 = 0x0E;
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    pub const RESERVATION_RELEASE: u8 = 0x15;
}

/// Opcode of every Fabrics command; the command type is byte 4 (`fctype`).
pub const FABRICS_OPC: u8 = 0x7F;
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    /// In-band authentication (DH-HMAC-CHAP) messages, host to controller and back.
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Controller properties (the fabrics view of the PCIe registers).
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
}

pub mod feat {
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    pub const HOST_IDENTIFIER: u8 = 0x81;
    pub const RESERVATION_NOTIFICATION_MASK: u8 = 0x82;
    pub const RESERVATION_PERSISTENCE: u8 = 0x83;
}

pub mod log {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FW_SLOT: u8 = 0x03;
    pub const CHANGED_NS: u8 = 0x04;
    pub const ANA: u8 = 0x0C;
    pub const RESERVATION_NOTIFICATION: u8 = 0x80;
    pub const DISCOVERY: u8 = 0x70;
}

pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
    pub const CS_NAMESPACE: u8 = 0x05;
    pub const CS_CONTROLLER: u8 = 0x06;
}

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    /// Path-related status (ANA states, path errors): hosts retry on another path.
    pub const PATH: u8 = 3;
}

/// Generic status codes (SCT 0).
pub mod sc {
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const CID_CONFLICT: u8 = 0x03;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const INTERNAL: u8 = 0x06;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE: u8 = 0x0B;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0C;
    pub const INVALID_SGL_DESCRIPTOR: u8 = 0x0D;
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0F;
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    pub const SGL_OFFSET_INVALID: u8 = 0x16;
    pub const NAMESPACE_WRITE_PROTECTED: u8 = 0x20;
    /// The controller could not process the command now (out of resources); the host retries.
    pub const COMMAND_INTERRUPTED: u8 = 0x21;
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// A thin namespace has no space for the write (NVM command set status 0x81).
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
}

/// Command-specific status codes (SCT 1).
pub mod csc {
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    pub const ABORT_LIMIT_EXCEEDED: u8 = 0x03;
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: u8 = 0x05;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0D;
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0E;
    // Fabrics Connect.
    pub const CONNECT_INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONNECT_CONTROLLER_BUSY: u8 = 0x81;
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    /// A command on a queue that must authenticate first.
    pub const AUTH_REQUIRED: u8 = 0x91;
}

/// Media and data integrity status codes (SCT 2).
pub mod msc {
    pub const WRITE_FAULT: u8 = 0x80;
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    pub const COMPARE_FAILURE: u8 = 0x85;
}

/// Completion status (without the phase bit): type, code, Do Not Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status { sct: 0, sc: 0, dnr: false };

    /// A status the host must not retry (the command itself is wrong).
    pub const fn error(sct: u8, sc: u8) -> Status {
        Status { sct, sc, dnr: true }
    }

    /// A generic status the host must not retry.
    pub const fn generic(sc: u8) -> Status {
        Status { sct: sct::GENERIC, sc, dnr: true }
    }

    /// A status the host may retry (a transient condition).
    pub const fn retryable(sct: u8, sc: u8) -> Status {
        Status { sct, sc, dnr: false }
    }

    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The 15 status bits of a CQE's upper half-word (bits 15:1 of DW3's upper 16 bits).
    pub fn to_field(self) -> u16 {
        ((self.sc as u16) << 1) | (((self.sct & 0x7) as u16) << 9) | ((self.dnr as u16) << 15)
    }

    pub fn from_field(f: u16) -> Status {
        Status { sc: ((f >> 1) & 0xFF) as u8, sct: ((f >> 9) & 0x7) as u8, dnr: f & 0x8000 != 0 }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sct {:#x} sc {:#04x}{}", self.sct, self.sc, if self.dnr { " dnr" } else { "" })
    }
}

/// SGL descriptor types (high nibble) and subtypes (low nibble) that NVMe/TCP uses.
pub mod sgl {
    /// Data Block descriptor with the Offset subtype: in-capsule data.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport SGL Data Block descriptor, transport-specific subtype 0xA: data moved by
    /// R2T/H2CData or C2HData PDUs.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5A;
}

/// A submission queue entry (command), stored as its 64 wire bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; 64]);

impl Default for Sqe {
    fn default() -> Self {
        Sqe([0; 64])
    }
}

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sqe(opc {:#04x} cid {} nsid {} cdw10 {:#x})", self.opcode(), self.cid(), self.nsid(), self.cdw(10))
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Sqe {
    pub fn from_slice(b: &[u8]) -> Option<Sqe> {
        let a: [u8; 64] = b.get(..64)?.try_into().ok()?;
        Some(Sqe(a))
    }

    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut s = Sqe::default();
        s.0[0] = opcode;
        // PSDT = 01b: SGLs for the data (fabrics commands always use SGLs).
        s.0[1] = 0x40;
        s.set_cid(cid);
        s.0[4..8].copy_from_slice(&nsid.to_le_bytes());
        s
    }

    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    /// FUSE (bits 1:0 of byte 1).
    pub fn fuse(&self) -> u8 {
        self.0[1] & 0x3
    }
    /// PSDT (bits 7:6 of byte 1).
    pub fn psdt(&self) -> u8 {
        self.0[1] >> 6
    }
    pub fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }
    pub fn set_cid(&mut self, cid: u16) {
        self.0[2..4].copy_from_slice(&cid.to_le_bytes());
    }
    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }
    /// Fabrics command type (byte 4; overlaps the NSID field of other commands).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    /// Command dword `n` (10..=15 are the command-specific ones).
    pub fn cdw(&self, n: usize) -> u32 {
        le32(&self.0, n * 4)
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        self.0[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// SGL1: (address, length, type byte).
    pub fn sgl(&self) -> (u64, u32, u8) {
        (le64(&self.0, 24), le32(&self.0, 32), self.0[39])
    }
    pub fn set_sgl(&mut self, addr: u64, len: u32, ty: u8) {
        self.0[24..32].copy_from_slice(&addr.to_le_bytes());
        self.0[32..36].copy_from_slice(&len.to_le_bytes());
        self.0[36..39].fill(0);
        self.0[39] = ty;
    }
    /// Starting LBA of a read/write-like command (CDW10-11).
    pub fn slba(&self) -> u64 {
        le64(&self.0, 40)
    }
    /// Number of logical blocks of a read/write-like command (CDW12 15:0, 0's based → count).
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xFFFF) + 1
    }
    /// Data direction of the opcode: bits 1:0 (01b host to controller, 10b controller to host).
    pub fn transfer(&self) -> Transfer {
        transfer_of(self.opcode(), self.fctype())
    }
    /// Bytes `[a, b)` of the entry, for Fabrics command fields.
    pub fn bytes(&self, a: usize, b: usize) -> &[u8] {
        &self.0[a..b]
    }
    pub fn u16_at(&self, o: usize) -> u16 {
        le16(&self.0, o)
    }
    pub fn u32_at(&self, o: usize) -> u32 {
        le32(&self.0, o)
    }
    pub fn u64_at(&self, o: usize) -> u64 {
        le64(&self.0, o)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    None,
    HostToController,
    ControllerToHost,
    Bidirectional,
}

/// The data direction of an opcode; for Fabrics commands it is encoded in the command type.
pub fn transfer_of(opcode: u8, fctype: u8) -> Transfer {
    let bits = if opcode == FABRICS_OPC { fctype & 0x3 } else { opcode & 0x3 };
    match bits {
        0 => Transfer::None,
        1 => Transfer::HostToController,
        2 => Transfer::ControllerToHost,
        _ => Transfer::Bidirectional,
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: u16,
}

impl Cqe {
    pub fn new(cid: u16, status: Status) -> Cqe {
        Cqe { cid, status: status.to_field(), ..Default::default() }
    }

    pub fn status(&self) -> Status {
        Status::from_field(self.status)
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> Cqe {
        Cqe { dw0: le32(b, 0), dw1: le32(b, 4), sqhd: le16(b, 8), sqid: le16(b, 10), cid: le16(b, 12), status: le16(b, 14) }
    }
}

/// Fields of the Fabrics Connect command (NVMe-oF 1.1 §3.3).
pub mod connect {
    pub const RECFMT: usize = 40;
    pub const QID: usize = 42;
    pub const SQSIZE: usize = 44;
    pub const CATTR: usize = 46;
    pub const KATO: usize = 48;
    /// CATTR bit 2: the host disables SQ flow control (no SQHD needed in completions).
    pub const CATTR_DISABLE_SQ_FLOW: u8 = 1 << 2;
    // Offsets in the 1024-byte Connect data.
    pub const DATA_HOSTID: usize = 0;
    pub const DATA_CNTLID: usize = 16;
    pub const DATA_SUBNQN: usize = 256;
    pub const DATA_HOSTNQN: usize = 512;
}

/// A parsed Fabrics Connect (its SQE fields and its 1024-byte data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub qid: u16,
    pub sqsize: u16,
    pub cattr: u8,
    pub kato_ms: u32,
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Why a Connect is refused: the status and, for Invalid Parameters, where (IATTR: 0 = SQE,
/// 1 = data; IPO: byte offset).
pub type ConnectError = (Status, u8, u16);

impl ConnectRequest {
    pub fn parse(sqe: &Sqe, data: &[u8]) -> Result<ConnectRequest, ConnectError> {
        let invalid = |iattr: u8, ipo: usize| (Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_PARAMETERS), iattr, ipo as u16);
        if data.len() != CONNECT_DATA_LEN {
            return Err((Status::generic(sc::DATA_SGL_LENGTH_INVALID), 0, 0));
        }
        if sqe.u16_at(connect::RECFMT) != 0 {
            return Err((Status::error(sct::COMMAND_SPECIFIC, csc::CONNECT_INCOMPATIBLE_FORMAT), 0, 0));
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&data[connect::DATA_HOSTID..connect::DATA_HOSTID + 16]);
        let subnqn = c_string(&data[connect::DATA_SUBNQN..connect::DATA_SUBNQN + 256]).map_err(|_| invalid(1, connect::DATA_SUBNQN))?;
        let hostnqn = c_string(&data[connect::DATA_HOSTNQN..connect::DATA_HOSTNQN + 256]).map_err(|_| invalid(1, connect::DATA_HOSTNQN))?;
        if validate_nqn(subnqn).is_err() {
            return Err(invalid(1, connect::DATA_SUBNQN));
        }
        // An empty HOSTNQN is a host that did not name itself: SPDK's `spdk_nvme_perf` and
        // `bdevperf` send none unless the user gives one, and SPDK's and Linux's targets let
        // such a host in where any host is allowed. It can never match an allowed-host entry
        // (those are validated NQNs), so access control still refuses it everywhere else.
        if !hostnqn.is_empty() && validate_nqn(hostnqn).is_err() {
            return Err(invalid(1, connect::DATA_HOSTNQN));
        }
        Ok(ConnectRequest {
            qid: sqe.u16_at(connect::QID),
            sqsize: sqe.u16_at(connect::SQSIZE),
            cattr: sqe.0[connect::CATTR],
            kato_ms: sqe.u32_at(connect::KATO),
            hostid,
            cntlid: u16::from_le_bytes([data[connect::DATA_CNTLID], data[connect::DATA_CNTLID + 1]]),
            subnqn: subnqn.to_string(),
            hostnqn: hostnqn.to_string(),
        })
    }
}

/// Fields of Property Get/Set.
pub mod property {
    pub const ATTRIB: usize = 40;
    pub const OFFSET: usize = 44;
    pub const VALUE: usize = 48;
}

/// Reads a NUL-terminated (or full-length) string field.
pub fn c_string(b: &[u8]) -> Result<&str, ()> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).map_err(|_| ())
}

/// Writes `s` into `dst`, padded with `pad` (spaces for SN/MN/FR, zeros for NQNs).
pub fn put_padded(dst: &mut [u8], s: &str, pad: u8) {
    dst.fill(pad);
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Validates an NQN (NVMe Base §7.9): at most 223 bytes, `nqn.yyyy-mm.` followed by a
/// reverse domain name (or the UUID form), no control characters.
pub fn validate_nqn(nqn: &str) -> Result<(), String> {
    if nqn.len() > MAX_NQN_LEN {
        return Err(format!("NQN is longer than {MAX_NQN_LEN} bytes"));
    }
    if nqn.chars().any(|c| c.is_control()) {
        return Err("NQN contains a control character".into());
    }
    if let Some(u) = nqn.strip_prefix("nqn.2014-08.org.nvmexpress:uuid:") {
        return uuid::Uuid::parse_str(u).map(|_| ()).map_err(|_| format!("NQN {nqn:?} has an invalid UUID"));
    }
    let rest = nqn.strip_prefix("nqn.").ok_or_else(|| format!("NQN {nqn:?} does not start with \"nqn.\""))?;
    let b = rest.as_bytes();
    let date_ok = b.len() > 8 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[5..7].iter().all(u8::is_ascii_digit) && b[7] == b'.';
    if !date_ok {
        return Err(format!("NQN {nqn:?} lacks the yyyy-mm. date after \"nqn.\""));
    }
    let domain = rest[8..].split(':').next().unwrap_or("");
    if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
        return Err(format!("NQN {nqn:?} lacks a reverse domain name after the date"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_round_trips() {
        for s in [Status::SUCCESS, Status::generic(sc::LBA_OUT_OF_RANGE), Status::retryable(1, 0x82), Status::error(2, 0x85)] {
            assert_eq!(Status::from_field(s.to_field()), s);
        }
        assert_eq!(Status::generic(sc::INVALID_OPCODE).to_field(), 0x8002);
    }

    #[test]
    fn cqe_round_trips() {
        let c = Cqe { dw0: 1, dw1: 2, sqhd: 3, sqid: 4, cid: 5, status: 6 };
        assert_eq!(Cqe::from_bytes(&c.to_bytes()), c);
    }

    #[test]
    fn nqn_validation() {
        assert!(validate_nqn("nqn.2016-06.io.tidemark:vol0").is_ok());
        assert!(validate_nqn("nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427").is_ok());
        assert!(validate_nqn(DISCOVERY_NQN).is_ok());
        assert!(validate_nqn("iqn.2016-06.io.x").is_err());
        assert!(validate_nqn("nqn.16-06.io.x").is_err());
        assert!(validate_nqn("nqn.2016-06.").is_err());
        assert!(validate_nqn(&format!("nqn.2016-06.io.x:{}", "a".repeat(300))).is_err());
        assert!(validate_nqn("nqn.2014-08.org.nvmexpress:uuid:zzz").is_err());
    }

    /// The Connect SPDK v25.09's `spdk_nvme_perf` sends for its admin queue: SQSIZE 31,
    /// KATO 10 s, dynamic controller, and no host NQN at all.
    fn spdk_perf_connect(hostnqn: &str) -> (Sqe, Vec<u8>) {
        let mut sqe = Sqe::new(FABRICS_OPC, 0, 0);
        sqe.0[4] = fctype::CONNECT;
        sqe.0[connect::SQSIZE..connect::SQSIZE + 2].copy_from_slice(&31u16.to_le_bytes());
        sqe.0[connect::KATO..connect::KATO + 4].copy_from_slice(&10_000u32.to_le_bytes());
        let mut data = vec![0u8; CONNECT_DATA_LEN];
        data[..16].copy_from_slice(&[0x49, 0x23, 0x8b, 0xad, 0x3d, 0x26, 0x43, 0xd1, 0x87, 0xaa, 0xbb, 0xf5, 0xfe, 0xec, 0x72, 0x97]);
        data[connect::DATA_CNTLID..connect::DATA_CNTLID + 2].copy_from_slice(&CNTLID_DYNAMIC.to_le_bytes());
        put_padded(&mut data[connect::DATA_SUBNQN..connect::DATA_SUBNQN + 256], "nqn.2016-06.io.spdk:cnode1", 0);
        put_padded(&mut data[connect::DATA_HOSTNQN..connect::DATA_HOSTNQN + 256], hostnqn, 0);
        (sqe, data)
    }

    #[test]
    fn connect_without_a_host_nqn_parses_and_a_malformed_one_does_not() {
        let (sqe, data) = spdk_perf_connect("");
        let r = ConnectRequest::parse(&sqe, &data).expect("SPDK's anonymous Connect is valid");
        assert_eq!((r.qid, r.sqsize, r.kato_ms, r.cntlid, r.hostnqn.as_str()), (0, 31, 10_000, CNTLID_DYNAMIC, ""));
        let (sqe, data) = spdk_perf_connect("host1");
        let (status, iattr, ipo) = ConnectRequest::parse(&sqe, &data).expect_err("not an NQN");
        assert_eq!((status.sct, status.sc, iattr, ipo), (sct::COMMAND_SPECIFIC, csc::CONNECT_INVALID_PARAMETERS, 1, connect::DATA_HOSTNQN as u16));
    }

    #[test]
    fn transfer_direction() {
        assert_eq!(transfer_of(io_opc::READ, 0), Transfer::ControllerToHost);
        assert_eq!(transfer_of(io_opc::WRITE, 0), Transfer::HostToController);
        assert_eq!(transfer_of(io_opc::FLUSH, 0), Transfer::None);
        assert_eq!(transfer_of(FABRICS_OPC, fctype::CONNECT), Transfer::HostToController);
        assert_eq!(transfer_of(FABRICS_OPC, fctype::PROPERTY_GET), Transfer::None);
    }
}
