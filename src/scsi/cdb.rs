//! CDB parsing: bytes from a host become a typed [`Command`], or the sense data that says which
//! field is wrong. Pure functions of the CDB and the device geometry, so they are fuzzed and
//! unit-tested without a device.

use super::sense::{asc, Sense, SenseKey};

/// What the device looks like to a command (checked against LBAs and lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub num_blocks: u64,
}

/// Largest data transfer of one command (the Block Limits VPD page reports it in blocks).
pub const MAX_TRANSFER_BYTES: u64 = 8 << 20;
/// Largest COMPARE AND WRITE, in blocks (its NUMBER OF LOGICAL BLOCKS field is one byte).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u32 = 255;
/// Largest UNMAP parameter list and descriptor count.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub const MAX_UNMAP_PARAM_BYTES: u32 = 8 + 16 * MAX_UNMAP_DESCRIPTORS;
/// Largest MODE SELECT parameter list.
pub const MAX_MODE_SELECT_BYTES: u32 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        len: u32,
    },
    StartStopUnit,
    PreventAllow,
    /// RESERVE(6) / RELEASE(6): SPC-2 reservations of the whole unit by one I_T nexus.
    Reserve,
    Release,
    /// ORWRITE: the data-out ORed into the blocks, atomically.
    OrWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// WRITE AND VERIFY: the write, then (BYTCHK=1) a compare with the data-out, which the
    /// target has just written, so it always matches.
    WriteVerify {
        lba: u64,
        blocks: u32,
    },
    /// VERIFY: BYTCHK 0 checks the medium only; 1 compares each block with the data-out; 3
    /// compares every block with one block of data-out.
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Prefetch {
        lba: u64,
        blocks: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ReportOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    ReportTmfs {
        alloc: u32,
    },
    /// PERSISTENT RESERVE IN: READ KEYS (0), READ RESERVATION (1), REPORT CAPABILITIES (2),
    /// READ FULL STATUS (3).
    PersistentReserveIn {
        sa: u8,
        alloc: u32,
    },
    /// EXTENDED COPY (LID1) with its parameter list length.
    ExtendedCopy {
        len: u32,
    },
    /// RECEIVE COPY RESULTS: COPY STATUS (0) of a list identifier, OPERATING PARAMETERS (3).
    ReceiveCopyResults {
        sa: u8,
        list_id: u8,
        alloc: u32,
    },
    /// SANITIZE (SBC-4 §5.30) with a service action this target performs: BLOCK ERASE (02h)
    /// or EXIT FAILURE MODE (1Fh); both take no parameter list.
    Sanitize {
        immed: bool,
        sa: u8,
    },
    /// PERSISTENT RESERVE OUT with its parameter list length.
    PersistentReserveOut {
        sa: u8,
        scope: u8,
        rtype: u8,
        len: u32,
    },
}

/// Direction of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Target to initiator (Data-In).
    In,
    /// Initiator to target (Data-Out).
    Out,
}

pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ6: u8 = 0x08;
    pub const WRITE6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT6: u8 = 0x15;
    pub const MODE_SENSE6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY10: u8 = 0x25;
    pub const READ10: u8 = 0x28;
    pub const WRITE10: u8 = 0x2A;
    pub const WRITE_VERIFY10: u8 = 0x2E;
    pub const VERIFY10: u8 = 0x2F;
    pub const PREFETCH10: u8 = 0x34;
    pub const SYNC_CACHE10: u8 = 0x35;
    pub const WRITE_SAME10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT10: u8 = 0x55;
    pub const MODE_SENSE10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const ORWRITE16: u8 = 0x8B;
    pub const RESERVE6: u8 = 0x16;
    pub const RELEASE6: u8 = 0x17;
    pub const WRITE16: u8 = 0x8A;
    pub const WRITE_VERIFY16: u8 = 0x8E;
    pub const VERIFY16: u8 = 0x8F;
    pub const PREFETCH16: u8 = 0x90;
    pub const SYNC_CACHE16: u8 = 0x91;
    pub const WRITE_SAME16: u8 = 0x93;
    pub const SERVICE_ACTION_IN16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ12: u8 = 0xA8;
    pub const WRITE12: u8 = 0xAA;
    pub const WRITE_VERIFY12: u8 = 0xAE;
    pub const VERIFY12: u8 = 0xAF;
    /// Service actions.
    pub const SA_READ_CAPACITY16: u16 = 0x10;
    pub const SA_GET_LBA_STATUS: u16 = 0x12;
    pub const SA_REPORT_OPCODES: u16 = 0x0C;
    pub const SA_REPORT_TMFS: u16 = 0x0D;
    /// SANITIZE service actions (OVERWRITE 01h and CRYPTOGRAPHIC ERASE 03h are not offered:
    /// an overwrite is not what a block erase of a thin device already does better, and there
    /// is no key to destroy).
    pub const SA_SANITIZE_BLOCK_ERASE: u8 = 0x02;
    pub const SA_SANITIZE_EXIT_FAILURE_MODE: u8 = 0x1F;
}

/// One supported command: opcode, service action, and the CDB usage data of REPORT SUPPORTED
/// OPERATION CODES (byte 0 is the opcode; set bits are the bits the target examines).
pub struct OpcodeInfo {
    pub opcode: u8,
    pub sa: Option<u16>,
    pub usage: &'static [u8],
}

const fn info(opcode: u8, sa: Option<u16>, usage: &'static [u8]) -> OpcodeInfo {
    OpcodeInfo { opcode, sa, usage }
}

/// Every command this target implements, in opcode order.
pub static SUPPORTED: &[OpcodeInfo] = &[
    info(op::TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, 0x04]),
    info(op::REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, 0xFF, 0x04]),
    info(op::READ6, None, &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::WRITE6, None, &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::INQUIRY, None, &[0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::MODE_SELECT6, None, &[0x15, 0x11, 0, 0, 0xFF, 0x04]),
    info(op::MODE_SENSE6, None, &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::RESERVE6, None, &[0x16, 0, 0, 0, 0, 0x04]),
    info(op::RELEASE6, None, &[0x17, 0, 0, 0, 0, 0x04]),
    info(op::START_STOP_UNIT, None, &[0x1B, 0x01, 0, 0x0F, 0xF7, 0x04]),
    info(op::PREVENT_ALLOW, None, &[0x1E, 0, 0, 0, 0x03, 0x04]),
    info(op::READ_CAPACITY10, None, &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x04]),
    info(op::READ10, None, &[0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::WRITE10, None, &[0x2A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::WRITE_VERIFY10, None, &[0x2E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::VERIFY10, None, &[0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::PREFETCH10, None, &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::SYNC_CACHE10, None, &[0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::WRITE_SAME10, None, &[0x41, 0xE8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x04]),
    info(op::UNMAP, None, &[0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    // IMMED and AUSE are examined; the PARAMETER LIST LENGTH must be zero for both actions.
    info(op::SANITIZE, Some(op::SA_SANITIZE_BLOCK_ERASE as u16), &[0x48, 0xA0 | op::SA_SANITIZE_BLOCK_ERASE, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::SANITIZE, Some(op::SA_SANITIZE_EXIT_FAILURE_MODE as u16), &[0x48, 0xA0 | op::SA_SANITIZE_EXIT_FAILURE_MODE, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::MODE_SELECT10, None, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::MODE_SENSE10, None, &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(0), &[0x5E, 0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(1), &[0x5E, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(2), &[0x5E, 0x02, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(3), &[0x5E, 0x03, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0), &[0x5F, 0x00, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(1), &[0x5F, 0x01, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(2), &[0x5F, 0x02, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(3), &[0x5F, 0x03, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(4), &[0x5F, 0x04, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(5), &[0x5F, 0x05, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(6), &[0x5F, 0x06, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(7), &[0x5F, 0x07, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04]),
    info(op::EXTENDED_COPY, Some(0x00), &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::RECEIVE_COPY_RESULTS, Some(0x00), &[0x84, 0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::RECEIVE_COPY_RESULTS, Some(0x03), &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::READ16, None, &[0x88, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::COMPARE_AND_WRITE, None, &[0x89, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0, 0x04]),
    info(op::ORWRITE16, None, &[0x8B, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::WRITE16, None, &[0x8A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::WRITE_VERIFY16, None, &[0x8E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::VERIFY16, None, &[0x8F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::PREFETCH16, None, &[0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::SYNC_CACHE16, None, &[0x91, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::WRITE_SAME16, None, &[0x93, 0xE9, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::SERVICE_ACTION_IN16, Some(op::SA_READ_CAPACITY16), &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::SERVICE_ACTION_IN16, Some(op::SA_GET_LBA_STATUS), &[0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::REPORT_LUNS, None, &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::MAINTENANCE_IN, Some(op::SA_REPORT_OPCODES), &[0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::MAINTENANCE_IN, Some(op::SA_REPORT_TMFS), &[0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::READ12, None, &[0xA8, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::WRITE12, None, &[0xAA, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::WRITE_VERIFY12, None, &[0xAE, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
    info(op::VERIFY12, None, &[0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]),
];

/// The CDB length of an opcode by its group code (SPC-4 §4.2.5.1); None for vendor groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

fn be16(b: &[u8], at: usize) -> u32 {
    u16::from_be_bytes([b[at], b[at + 1]]) as u32
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Rejects a nonzero RDPROTECT/WRPROTECT/VRPROTECT field: the target has no protection
/// information (SBC-3 §4.22.2: such a field with PROTECT=0 is an invalid field).
fn no_protect(cdb: &[u8]) -> Result<(), Sense> {
    if cdb[1] & 0xE0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)));
    }
    Ok(())
}

/// Checks an LBA range against the device and the transfer limit.
fn check_range(g: &Geometry, lba: u64, blocks: u32, len_byte: u16) -> Result<(), Sense> {
    if lba > g.num_blocks || lba + blocks as u64 > g.num_blocks {
        return Err(Sense::lba_out_of_range());
    }
    if blocks as u64 * g.block_size as u64 > MAX_TRANSFER_BYTES {
        return Err(Sense::invalid_cdb(len_byte, None));
    }
    Ok(())
}

/// Parses a CDB. The CDB slice may be longer than the command (iSCSI always carries 16 bytes);
/// a CDB too short for its opcode is an invalid field.
pub fn parse(cdb: &[u8], g: &Geometry) -> Result<Command, Sense> {
    let Some(&opcode) = cdb.first() else { return Err(Sense::invalid_opcode()) };
    let Some(len) = cdb_len(opcode) else { return Err(Sense::invalid_opcode()) };
    if cdb.len() < len {
        return Err(Sense::invalid_cdb(0, None));
    }
    // NACA (normal ACA) is not supported: SAM-5 requires INVALID FIELD IN CDB.
    if cdb[len - 1] & 0x04 != 0 {
        return Err(Sense::invalid_cdb(len as u16 - 1, Some(2)));
    }
    let c = &cdb[..len];
    use op::*;
    let cmd = match opcode {
        TEST_UNIT_READY => Command::TestUnitReady,
        REQUEST_SENSE => Command::RequestSense { desc: c[1] & 1 != 0, alloc: c[4] as u32 },
        INQUIRY => {
            if c[1] & 0x02 != 0 {
                // CMDDT is obsolete.
                return Err(Sense::invalid_cdb(1, Some(1)));
            }
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::Inquiry { evpd, page: c[2], alloc: be16(c, 3) }
        }
        MODE_SENSE6 | MODE_SENSE10 => {
            let ten = opcode == MODE_SENSE10;
            let alloc = if ten { be16(c, 7) } else { c[4] as u32 };
            Command::ModeSense { ten, dbd: c[1] & 0x08 != 0, llbaa: ten && c[1] & 0x10 != 0, pc: c[2] >> 6, page: c[2] & 0x3F, subpage: c[3], alloc }
        }
        MODE_SELECT6 | MODE_SELECT10 => {
            let ten = opcode == MODE_SELECT10;
            if c[1] & 0x01 != 0 {
                // SP: saving pages is not supported.
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            let len = if ten { be16(c, 7) } else { c[4] as u32 };
            if len > MAX_MODE_SELECT_BYTES {
                return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            Command::ModeSelect { ten, pf: c[1] & 0x10 != 0, len }
        }
        START_STOP_UNIT => Command::StartStopUnit,
        PREVENT_ALLOW => Command::PreventAllow,
        RESERVE6 | RELEASE6 => {
            // Third-party and extent reservations are obsolete and not supported.
            if c[1] & 0x1F != 0 {
                return Err(Sense::invalid_cdb(1, None));
            }
            if opcode == RESERVE6 {
                Command::Reserve
            } else {
                Command::Release
            }
        }
        ORWRITE16 => {
            no_protect(c)?;
            let (lba, blocks) = (be64(c, 2), be32(c, 10));
            check_range(g, lba, blocks, 10)?;
            Command::OrWrite { lba, blocks, fua: c[1] & 0x08 != 0 }
        }
        READ_CAPACITY10 => {
            // With PMI clear the LBA field must be zero (SBC-3 §5.15).
            if c[8] & 1 == 0 && be32(c, 2) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::ReadCapacity10
        }
        READ6 | WRITE6 => {
            let lba = ((c[1] & 0x1F) as u64) << 16 | (c[2] as u64) << 8 | c[3] as u64;
            // A transfer length of 0 means 256 blocks for the 6-byte commands.
            let blocks = if c[4] == 0 { 256 } else { c[4] as u32 };
            check_range(g, lba, blocks, 4)?;
            if opcode == READ6 {
                Command::Read { lba, blocks, fua: false }
            } else {
                Command::Write { lba, blocks, fua: false }
            }
        }
        READ10 | READ12 | READ16 | WRITE10 | WRITE12 | WRITE16 => {
            no_protect(c)?;
            let (lba, blocks, len_byte) = match opcode {
                READ10 | WRITE10 => (be32(c, 2) as u64, be16(c, 7), 7),
                READ12 | WRITE12 => (be32(c, 2) as u64, be32(c, 6), 6),
                _ => (be64(c, 2), be32(c, 10), 10),
            };
            check_range(g, lba, blocks, len_byte)?;
            let fua = c[1] & 0x08 != 0;
            if matches!(opcode, READ10 | READ12 | READ16) {
                Command::Read { lba, blocks, fua }
            } else {
                Command::Write { lba, blocks, fua }
            }
        }
        WRITE_VERIFY10 | WRITE_VERIFY12 | WRITE_VERIFY16 => {
            no_protect(c)?;
            let (lba, blocks, len_byte) = match opcode {
                WRITE_VERIFY10 => (be32(c, 2) as u64, be16(c, 7), 7),
                WRITE_VERIFY12 => (be32(c, 2) as u64, be32(c, 6), 6),
                _ => (be64(c, 2), be32(c, 10), 10),
            };
            check_range(g, lba, blocks, len_byte)?;
            Command::WriteVerify { lba, blocks }
        }
        VERIFY10 | VERIFY12 | VERIFY16 => {
            no_protect(c)?;
            let bytchk = (c[1] >> 1) & 0x03;
            if bytchk == 2 {
                return Err(Sense::invalid_cdb(1, Some(2)));
            }
            let (lba, blocks, len_byte) = match opcode {
                VERIFY10 => (be32(c, 2) as u64, be16(c, 7), 7),
                VERIFY12 => (be32(c, 2) as u64, be32(c, 6), 6),
                _ => (be64(c, 2), be32(c, 10), 10),
            };
            check_range(g, lba, blocks, len_byte)?;
            Command::Verify { lba, blocks, bytchk }
        }
        PREFETCH10 | PREFETCH16 => {
            let (lba, blocks) = if opcode == PREFETCH10 { (be32(c, 2) as u64, be16(c, 7)) } else { (be64(c, 2), be32(c, 10)) };
            if lba > g.num_blocks || lba + blocks as u64 > g.num_blocks {
                return Err(Sense::lba_out_of_range());
            }
            Command::Prefetch { lba, blocks }
        }
        SYNC_CACHE10 | SYNC_CACHE16 => {
            let (lba, blocks) = if opcode == SYNC_CACHE10 { (be32(c, 2) as u64, be16(c, 7)) } else { (be64(c, 2), be32(c, 10)) };
            if lba > g.num_blocks || lba + blocks as u64 > g.num_blocks {
                return Err(Sense::lba_out_of_range());
            }
            Command::SyncCache { lba, blocks }
        }
        WRITE_SAME10 | WRITE_SAME16 => {
            no_protect(c)?;
            if c[1] & 0x10 != 0 {
                // ANCHOR: anchored LBAs are not supported (ANC_SUP = 0).
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            if c[1] & 0x06 != 0 {
                // PBDATA/LBDATA are obsolete; this target never fills in addresses.
                return Err(Sense::invalid_cdb(1, Some(if c[1] & 0x04 != 0 { 2 } else { 1 })));
            }
            let ndob = opcode == WRITE_SAME16 && c[1] & 0x01 != 0;
            let (lba, blocks, len_byte) = if opcode == WRITE_SAME10 { (be32(c, 2) as u64, be16(c, 7), 7) } else { (be64(c, 2), be32(c, 10), 10) };
            if lba > g.num_blocks || lba.saturating_add(blocks as u64) > g.num_blocks {
                return Err(Sense::lba_out_of_range());
            }
            // Zero blocks means "from the LBA to the last block" (SBC-3 §5.42, WSNZ clear);
            // like any other length it must fit the MAXIMUM WRITE SAME LENGTH.
            let blocks = if blocks == 0 { g.num_blocks - lba } else { blocks as u64 };
            if blocks > max_write_same_blocks(g) {
                return Err(Sense::invalid_cdb(len_byte, None));
            }
            Command::WriteSame { lba, blocks: blocks as u32, unmap: c[1] & 0x08 != 0, ndob }
        }
        UNMAP => {
            if c[1] & 0x01 != 0 {
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            let len = be16(c, 7);
            if len > MAX_UNMAP_PARAM_BYTES {
                return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            Command::Unmap { len }
        }
        COMPARE_AND_WRITE => {
            no_protect(c)?;
            let lba = be64(c, 2);
            let blocks = c[13] as u32;
            if blocks > max_compare_and_write_blocks(g) {
                return Err(Sense::invalid_cdb(13, None));
            }
            if lba > g.num_blocks || lba + blocks as u64 > g.num_blocks {
                return Err(Sense::lba_out_of_range());
            }
            Command::CompareAndWrite { lba, blocks, fua: c[1] & 0x08 != 0 }
        }
        SERVICE_ACTION_IN16 => match (c[1] & 0x1F) as u16 {
            SA_READ_CAPACITY16 => Command::ReadCapacity16 { alloc: be32(c, 10) },
            SA_GET_LBA_STATUS => {
                let lba = be64(c, 2);
                if lba >= g.num_blocks {
                    return Err(Sense::lba_out_of_range());
                }
                Command::GetLbaStatus { lba, alloc: be32(c, 10) }
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        },
        REPORT_LUNS => {
            let select = c[2];
            if !matches!(select, 0x00..=0x02 | 0x10..=0x12) {
                return Err(Sense::invalid_cdb(2, None));
            }
            let alloc = be32(c, 6);
            // SPC-4 §6.33: an allocation length under 16 may be refused; we refuse it so a
            // host never reads a truncated list as a short one.
            if alloc < 16 {
                return Err(Sense::invalid_cdb(6, None));
            }
            Command::ReportLuns { select, alloc }
        }
        EXTENDED_COPY => {
            // LID1 only (service action 00h); LID4 tokens are not supported.
            if c[1] & 0x1F != 0 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            let len = be32(c, 10);
            if len > super::xcopy::MAX_PARAM_BYTES {
                return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            Command::ExtendedCopy { len }
        }
        RECEIVE_COPY_RESULTS => {
            let sa = c[1] & 0x1F;
            if !matches!(sa, 0x00 | 0x03) {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Command::ReceiveCopyResults { sa, list_id: c[2], alloc: be32(c, 10) }
        }
        SANITIZE => {
            // Byte 1 bit 6 is ZNR, for zoned devices only: reserved here, like bytes 2 to 6.
            if c[1] & 0x40 != 0 {
                return Err(Sense::invalid_cdb(1, Some(6)));
            }
            if let Some(i) = (2..7).find(|&i| c[i] != 0) {
                return Err(Sense::invalid_cdb(i as u16, None));
            }
            let sa = c[1] & 0x1F;
            if !matches!(sa, SA_SANITIZE_BLOCK_ERASE | SA_SANITIZE_EXIT_FAILURE_MODE) {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            // Neither action has a parameter list (SBC-4 §5.30.1).
            if be16(c, 7) != 0 {
                return Err(Sense::invalid_cdb(7, None));
            }
            Command::Sanitize { immed: c[1] & 0x80 != 0, sa }
        }
        PERSISTENT_RESERVE_IN => {
            let sa = c[1] & 0x1F;
            if sa > 3 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Command::PersistentReserveIn { sa, alloc: be16(c, 7) }
        }
        PERSISTENT_RESERVE_OUT => {
            let sa = c[1] & 0x1F;
            if sa > 7 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            let len = be32(c, 5);
            if len > super::pr::MAX_PARAM_BYTES {
                return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            Command::PersistentReserveOut { sa, scope: c[2] >> 4, rtype: c[2] & 0x0F, len }
        }
        MAINTENANCE_IN => match (c[1] & 0x1F) as u16 {
            SA_REPORT_OPCODES => {
                let options = c[2] & 0x07;
                if options > 3 {
                    return Err(Sense::invalid_cdb(2, Some(2)));
                }
                Command::ReportOpcodes { rctd: c[2] & 0x80 != 0, options, opcode: c[3], sa: be16(c, 4) as u16, alloc: be32(c, 6) }
            }
            SA_REPORT_TMFS => Command::ReportTmfs { alloc: be32(c, 6) },
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        },
        _ => return Err(Sense::invalid_opcode()),
    };
    Ok(cmd)
}

/// COMPARE AND WRITE's limit in blocks: one byte, and both halves within the transfer limit.
pub fn max_compare_and_write_blocks(g: &Geometry) -> u32 {
    ((MAX_TRANSFER_BYTES / 2 / g.block_size as u64) as u32).min(MAX_COMPARE_AND_WRITE_BLOCKS)
}

/// WRITE SAME's limit in blocks: one transfer's worth, like a WRITE (hosts size their
/// WRITE SAME to match the writes they would otherwise send).
pub fn max_write_same_blocks(g: &Geometry) -> u64 {
    MAX_TRANSFER_BYTES / g.block_size as u64
}

/// Largest UNMAP range of one descriptor, in blocks (1 Mi blocks: SBC hosts expect a bound).
pub fn max_unmap_blocks(_g: &Geometry) -> u32 {
    1 << 20
}

impl Command {
    /// Bytes of Data-Out the command consumes.
    pub fn data_out_len(&self, g: &Geometry) -> u64 {
        let bs = g.block_size as u64;
        match *self {
            Command::Write { blocks, .. } | Command::WriteVerify { blocks, .. } => blocks as u64 * bs,
            Command::Verify { blocks, bytchk: 1, .. } => blocks as u64 * bs,
            Command::Verify { blocks, bytchk: 3, .. } if blocks > 0 => bs,
            Command::WriteSame { ndob: false, .. } => bs,
            Command::CompareAndWrite { blocks, .. } => 2 * blocks as u64 * bs,
            Command::OrWrite { blocks, .. } => blocks as u64 * bs,
            Command::Unmap { len } => len as u64,
            Command::ModeSelect { len, .. } => len as u64,
            Command::PersistentReserveOut { len, .. } | Command::ExtendedCopy { len } => len as u64,
            _ => 0,
        }
    }

    /// Most bytes of Data-In the command produces.
    pub fn data_in_len(&self, g: &Geometry) -> u64 {
        match *self {
            Command::Read { blocks, .. } => blocks as u64 * g.block_size as u64,
            Command::RequestSense { alloc, .. }
            | Command::Inquiry { alloc, .. }
            | Command::ModeSense { alloc, .. }
            | Command::ReadCapacity16 { alloc }
            | Command::GetLbaStatus { alloc, .. }
            | Command::ReportLuns { alloc, .. }
            | Command::ReportOpcodes { alloc, .. }
            | Command::ReportTmfs { alloc }
            | Command::PersistentReserveIn { alloc, .. }
            | Command::ReceiveCopyResults { alloc, .. } => alloc as u64,
            Command::ReadCapacity10 => 8,
            _ => 0,
        }
    }

    pub fn direction(&self, g: &Geometry) -> DataDir {
        if self.data_out_len(g) > 0 {
            DataDir::Out
        } else if self.data_in_len(g) > 0 {
            DataDir::In
        } else {
            DataDir::None
        }
    }

    /// Whether a pending unit attention is reported instead of running this command (SPC-4
    /// §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE run in spite of it).
    pub fn blocked_by_unit_attention(&self) -> bool {
        !matches!(self, Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. })
    }

    /// How the command is checked against a persistent reservation (SPC-4 Table 43, SBC-3
    /// Table 13): commands that only describe the unit run always, reads conflict with the
    /// exclusive-access types, anything that changes the medium or the unit with every type.
    pub fn pr_access(&self) -> super::pr::Access {
        use super::pr::Access;
        match self {
            Command::TestUnitReady
            | Command::RequestSense { .. }
            | Command::Inquiry { .. }
            | Command::ReadCapacity10
            | Command::ReadCapacity16 { .. }
            | Command::ReportLuns { .. }
            | Command::ReportOpcodes { .. }
            | Command::ReportTmfs { .. }
            | Command::PersistentReserveIn { .. }
            | Command::PersistentReserveOut { .. }
            | Command::StartStopUnit
            | Command::PreventAllow
            // RESERVE/RELEASE(6) have their own rule beside persistent reservations.
            | Command::Reserve
            | Command::Release => Access::Always,
            Command::Read { .. } | Command::Verify { .. } | Command::Prefetch { .. } | Command::GetLbaStatus { .. } | Command::ModeSense { .. } | Command::ReceiveCopyResults { .. } => Access::Read,
            _ => Access::Write,
        }
    }

    /// Whether the command changes the medium: refused with DATA PROTECT when the unit is
    /// write-protected (a read-only bdev, or the SWP bit of the control mode page).
    pub fn writes_medium(&self) -> bool {
        matches!(
            self,
            Command::Write { .. }
                | Command::WriteVerify { .. }
                | Command::WriteSame { .. }
                | Command::Unmap { .. }
                | Command::CompareAndWrite { .. }
                | Command::OrWrite { .. }
                | Command::Sanitize { sa: op::SA_SANITIZE_BLOCK_ERASE, .. }
        )
    }

    /// Whether the command runs while a SANITIZE is in progress (SBC-4 §4.11.2: only the
    /// commands that describe the unit; everything else gets NOT READY).
    pub fn allowed_during_sanitize(&self) -> bool {
        matches!(
            self,
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. } | Command::ReportOpcodes { .. } | Command::ReportTmfs { .. }
        )
    }

    /// Whether the command conflicts with another nexus's RESERVE(6) (SPC-2 §5.5.1): all do
    /// but the ones that only describe the unit and RELEASE (a no-op then).
    pub fn conflicts_with_reservation(&self) -> bool {
        !matches!(
            self,
            Command::Inquiry { .. }
                | Command::ReportLuns { .. }
                | Command::RequestSense { .. }
                | Command::Release
                | Command::ReportOpcodes { .. }
                | Command::ReportTmfs { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: Geometry = Geometry { block_size: 512, num_blocks: 1000 };

    fn key(r: Result<Command, Sense>) -> (u8, u8, u8) {
        let s = r.unwrap_err();
        (s.key as u8, s.asc, s.ascq)
    }

    #[test]
    fn reads_and_writes_decode_every_size() {
        assert_eq!(parse(&[0x08, 0, 0, 5, 0, 0], &G).unwrap(), Command::Read { lba: 5, blocks: 256, fua: false });
        assert_eq!(parse(&[0x28, 0x08, 0, 0, 0, 10, 0, 0, 4, 0], &G).unwrap(), Command::Read { lba: 10, blocks: 4, fua: true });
        let mut c16 = [0u8; 16];
        c16[0] = 0x8A;
        c16[9] = 7;
        c16[13] = 3;
        assert_eq!(parse(&c16, &G).unwrap(), Command::Write { lba: 7, blocks: 3, fua: false });
        assert_eq!(parse(&[0xAA, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0], &G).unwrap(), Command::Write { lba: 1, blocks: 2, fua: false });
        // Zero blocks is not an error for READ(10).
        assert_eq!(parse(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0], &G).unwrap(), Command::Read { lba: 0, blocks: 0, fua: false });
    }

    #[test]
    fn bad_fields_get_their_sense() {
        // LBA beyond the end.
        assert_eq!(key(parse(&[0x28, 0, 0, 0, 0x03, 0xE7, 0, 0, 2, 0], &G)), (5, 0x21, 0));
        // LBA + length wraps around.
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c[13] = 1;
        assert_eq!(key(parse(&c, &G)), (5, 0x21, 0));
        // RDPROTECT.
        let s = parse(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], &G).unwrap_err();
        assert_eq!((s.asc, s.field.unwrap().byte), (0x24, 1));
        // Unknown opcode.
        assert_eq!(key(parse(&[0xC0, 0, 0, 0, 0, 0], &G)), (5, 0x20, 0));
        assert_eq!(key(parse(&[0x4A, 0, 0, 0, 0, 0, 0, 0, 0, 0], &G)), (5, 0x20, 0));
        // Truncated CDB, empty CDB.
        assert_eq!(key(parse(&[0x28, 0, 0], &G)), (5, 0x24, 0));
        assert_eq!(key(parse(&[], &G)), (5, 0x20, 0));
        // NACA.
        assert_eq!(key(parse(&[0, 0, 0, 0, 0, 0x04], &G)), (5, 0x24, 0));
        // Page code without EVPD.
        assert_eq!(key(parse(&[0x12, 0, 0x80, 0, 36, 0], &G)), (5, 0x24, 0));
        // WRITE SAME of zero blocks: to the end of the unit, within MAXIMUM WRITE SAME LENGTH.
        assert_eq!(parse(&[0x41, 0, 0, 0, 0x03, 0x00, 0, 0, 0, 0], &G).unwrap(), Command::WriteSame { lba: 768, blocks: 232, unmap: false, ndob: false });
        assert_eq!(parse(&[0x41, 0, 0, 0, 0x03, 0xE8, 0, 0, 0, 0], &G).unwrap(), Command::WriteSame { lba: 1000, blocks: 0, unmap: false, ndob: false });
        assert_eq!(key(parse(&[0x41, 0, 0, 0, 0x03, 0xE9, 0, 0, 0, 0], &G)), (5, 0x21, 0));
        let huge = Geometry { block_size: 512, num_blocks: 1 << 30 };
        assert_eq!(key(parse(&[0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0], &huge)), (5, 0x24, 0));
        // A transfer over the limit.
        let big = Geometry { block_size: 512, num_blocks: 1 << 30 };
        assert_eq!(key(parse(&[0x28, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0], &big)), (5, 0x24, 0));
    }

    #[test]
    fn sanitize_takes_block_erase_and_exit_failure_mode_without_parameters() {
        let c = |b1: u8| [0x48, b1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse(&c(0x02), &G).unwrap(), Command::Sanitize { immed: false, sa: 0x02 });
        assert_eq!(parse(&c(0xBF), &G).unwrap(), Command::Sanitize { immed: true, sa: 0x1F });
        for sa in [0x00, 0x01, 0x03, 0x04, 0x1E] {
            assert_eq!(key(parse(&c(sa), &G)), (5, 0x24, 0), "service action {sa:#x}");
        }
        let s = parse(&c(0x42), &G).unwrap_err();
        assert_eq!(s.field.map(|f| (f.byte, f.bit)), Some((1, Some(6))), "reserved ZNR bit");
        for i in 2..7 {
            let mut r = c(0x02);
            r[i] = i as u8;
            assert_eq!(parse(&r, &G).unwrap_err().field.map(|f| f.byte), Some(i as u16), "reserved byte {i}");
        }
        let mut p = c(0x02);
        p[8] = 8;
        assert_eq!(parse(&p, &G).unwrap_err().field.map(|f| f.byte), Some(7), "a parameter list");
        assert!(parse(&c(0x02), &G).unwrap().writes_medium());
        assert!(!parse(&c(0x1F), &G).unwrap().writes_medium());
    }

    #[test]
    fn data_lengths_follow_the_command() {
        let w = parse(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0], &G).unwrap();
        assert_eq!((w.data_out_len(&G), w.direction(&G)), (1024, DataDir::Out));
        let caw = parse(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0], &G).unwrap();
        assert_eq!(caw.data_out_len(&G), 3072);
        let inq = parse(&[0x12, 1, 0x80, 0, 255, 0], &G).unwrap();
        assert_eq!((inq.data_in_len(&G), inq.direction(&G)), (255, DataDir::In));
        assert_eq!(parse(&[0, 0, 0, 0, 0, 0], &G).unwrap().direction(&G), DataDir::None);
    }

    #[test]
    fn usage_data_starts_with_the_opcode_and_has_the_cdb_length() {
        for i in SUPPORTED {
            assert_eq!(i.usage[0], i.opcode);
            assert_eq!(Some(i.usage.len()), cdb_len(i.opcode), "opcode {:#x}", i.opcode);
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepted_ranges_fit(cdb in proptest::collection::vec(any::<u8>(), 0..20), bs in prop_oneof![Just(512u32), Just(4096u32)], nb in 1u64..1_000_000) {
            let g = Geometry { block_size: bs, num_blocks: nb };
            if let Ok(cmd) = parse(&cdb, &g) {
                prop_assert!(cmd.data_out_len(&g) <= MAX_TRANSFER_BYTES.max(MAX_UNMAP_PARAM_BYTES as u64));
                match cmd {
                    Command::Read { lba, blocks, .. } | Command::Write { lba, blocks, .. } => prop_assert!(lba + blocks as u64 <= nb),
                    _ => {}
                }
            }
        }
    }
}
