//! iSCSI PDUs (RFC 7143 §11): the 48-byte basic header segment, its fields, and digests.

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;
/// The "reserved" tag value (no task, no target transfer).
pub const RESERVED_TAG: u32 = 0xFFFF_FFFF;
/// Largest data segment the 24-bit length field can describe.
pub const MAX_DSL_FIELD: u32 = (1 << 24) - 1;

pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MSG: u8 = 0x32;
    pub const REJECT: u8 = 0x3F;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0C;
}

/// Flag bits of byte 1.
pub const FLAG_FINAL: u8 = 0x80;
/// SCSI Command: read / write expected.
pub const FLAG_READ: u8 = 0x40;
pub const FLAG_WRITE: u8 = 0x20;
/// Data-In / SCSI Response residual bits.
pub const FLAG_OVERFLOW: u8 = 0x04;
pub const FLAG_UNDERFLOW: u8 = 0x02;
/// Data-In: status is in this PDU.
pub const FLAG_STATUS: u8 = 0x01;
/// Byte 0: immediate delivery.
pub const FLAG_IMMEDIATE: u8 = 0x40;

/// A basic header segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op {:#04x}, itt {:#x}, dsl {})", self.opcode(), self.itt(), self.data_len())
    }
}

impl Bhs {
    /// A header with `opcode` and every other field zero.
    pub fn new(opcode: u8) -> Bhs {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        Bhs(b)
    }

    pub fn from_slice(s: &[u8]) -> Option<Bhs> {
        let mut b = [0u8; BHS_LEN];
        b.copy_from_slice(s.get(..BHS_LEN)?);
        Some(Bhs(b))
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3F
    }

    pub fn immediate(&self) -> bool {
        self.0[0] & FLAG_IMMEDIATE != 0
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    pub fn is_final(&self) -> bool {
        self.0[1] & FLAG_FINAL != 0
    }

    /// Bytes of additional header segments.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }

    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    pub fn set_data_len(&mut self, n: u32) {
        debug_assert!(n <= MAX_DSL_FIELD);
        self.0[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
    }

    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }

    pub fn set_lun(&mut self, l: &[u8; 8]) {
        self.0[8..16].copy_from_slice(l);
    }

    pub fn itt(&self) -> u32 {
        self.u32(16)
    }

    pub fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }

    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    pub fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }

    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Bytes of padding after a data segment of `n` bytes.
pub fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// CRC32C digest as it travels (least significant byte first, RFC 7143 §13.1 / B.4).
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let mut c = 0u32;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c.to_le_bytes()
}

/// Serial number arithmetic (RFC 1982, 32 bits): a < b.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// a <= b in serial arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_rfc_examples() {
        // RFC 7143 B.4: 32 bytes of zeros -> aa 36 91 8a.
        assert_eq!(digest(&[&[0u8; 32]]), [0xaa, 0x36, 0x91, 0x8a]);
        // 32 bytes of 0xff -> 43 ab a8 62.
        assert_eq!(digest(&[&[0xffu8; 16], &[0xffu8; 16]]), [0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn header_fields_round_trip() {
        let mut b = Bhs::new(opcode::DATA_IN);
        b.set_data_len(0x123456);
        b.set_u32(16, 0xdeadbeef);
        assert_eq!(b.data_len(), 0x123456);
        assert_eq!(b.itt(), 0xdeadbeef);
        assert_eq!(b.opcode(), opcode::DATA_IN);
        assert_eq!(pad(5), 3);
        assert_eq!(pad(8), 0);
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(u32::MAX, 0));
        assert!(!sn_lt(0, u32::MAX));
        assert!(sn_le(5, 5));
    }
}
