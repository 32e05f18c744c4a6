//! SCSI status codes and sense data (SPC-4 §4.5): what a command that fails reports, in fixed
//! (0x70) or descriptor (0x72) format.

use crate::bdev::BdevError;

/// SAM status of a completed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    Miscompare = 0xE,
}

/// Additional sense code and qualifier pairs the target reports.
pub mod asc {
    pub const NO_ADDITIONAL: (u8, u8) = (0x00, 0x00);
    pub const WRITE_ERROR: (u8, u8) = (0x0C, 0x00);
    pub const UNRECOVERED_READ_ERROR: (u8, u8) = (0x11, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: (u8, u8) = (0x1D, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: (u8, u8) = (0x1A, 0x00);
    pub const INVALID_OPCODE: (u8, u8) = (0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: (u8, u8) = (0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: (u8, u8) = (0x26, 0x00);
    pub const WRITE_PROTECTED: (u8, u8) = (0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: (u8, u8) = (0x27, 0x07);
    pub const POWER_ON_RESET: (u8, u8) = (0x29, 0x00);
    pub const BUS_DEVICE_RESET: (u8, u8) = (0x29, 0x03);
    pub const MODE_PARAMETERS_CHANGED: (u8, u8) = (0x2A, 0x01);
    pub const CAPACITY_DATA_HAS_CHANGED: (u8, u8) = (0x2A, 0x09);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
    pub const REPORTED_LUNS_DATA_HAS_CHANGED: (u8, u8) = (0x3F, 0x0E);
    pub const INTERNAL_TARGET_FAILURE: (u8, u8) = (0x44, 0x00);
    pub const LOGICAL_UNIT_NOT_READY: (u8, u8) = (0x04, 0x00);
    pub const SANITIZE_IN_PROGRESS: (u8, u8) = (0x04, 0x1B);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: (u8, u8) = (0x2F, 0x00);
    pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: (u8, u8) = (0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: (u8, u8) = (0x55, 0x04);
}

/// Where in the CDB or parameter list the bad field is (the SKSV "field pointer").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// true: the field is in the CDB; false: in the parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// A CHECK CONDITION's sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (VALID bit set when present): the offset of a miscompare, say.
    pub info: Option<u64>,
    pub field: Option<FieldPointer>,
}

/// Length of fixed-format sense data.
pub const FIXED_SENSE_LEN: usize = 18;
/// Longest sense data this module produces (descriptor format with both descriptors).
pub const MAX_SENSE_LEN: usize = 8 + 12 + 8;

impl Sense {
    pub const fn new(key: SenseKey, code: (u8, u8)) -> Sense {
        Sense { key, asc: code.0, ascq: code.1, info: None, field: None }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            key: SenseKey::IllegalRequest,
            asc: asc::INVALID_FIELD_IN_CDB.0,
            ascq: asc::INVALID_FIELD_IN_CDB.1,
            info: None,
            field: Some(FieldPointer { in_cdb: true, byte, bit }),
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at `byte` of the data.
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            key: SenseKey::IllegalRequest,
            asc: asc::INVALID_FIELD_IN_PARAMETER_LIST.0,
            ascq: asc::INVALID_FIELD_IN_PARAMETER_LIST.1,
            info: None,
            field: Some(FieldPointer { in_cdb: false, byte, bit }),
        }
    }

    pub const fn invalid_opcode() -> Sense {
        Sense { field: Some(FieldPointer { in_cdb: true, byte: 0, bit: None }), ..Sense::new(SenseKey::IllegalRequest, asc::INVALID_OPCODE) }
    }

    pub const fn lba_out_of_range() -> Sense {
        Sense::new(SenseKey::IllegalRequest, asc::LBA_OUT_OF_RANGE)
    }

    pub const fn lun_not_supported() -> Sense {
        Sense::new(SenseKey::IllegalRequest, asc::LUN_NOT_SUPPORTED)
    }

    pub const fn unit_attention(code: (u8, u8)) -> Sense {
        Sense::new(SenseKey::UnitAttention, code)
    }

    pub const fn miscompare(offset: u64) -> Sense {
        Sense { info: Some(offset), ..Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY) }
    }

    /// The sense a bdev failure maps to; `write` tells reads from writes for media errors.
    pub fn from_bdev(e: &BdevError, write: bool) -> Sense {
        match e {
            BdevError::OutOfRange { .. } => Sense::lba_out_of_range(),
            BdevError::ReadOnly => Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED),
            // SBC-4 4.7.3.6: a thin LU out of space reports this, only for the writes that need space.
            BdevError::NoSpace => Sense::new(SenseKey::DataProtect, asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
            BdevError::Media | BdevError::Os(_) | BdevError::Nvme { .. } => {
                if write {
                    Sense::new(SenseKey::MediumError, asc::WRITE_ERROR)
                } else {
                    Sense::new(SenseKey::MediumError, asc::UNRECOVERED_READ_ERROR)
                }
            }
            BdevError::Unsupported(_) => Sense::invalid_opcode(),
            BdevError::BadLength { .. } => Sense::invalid_cdb(0, None),
            BdevError::Aborted => Sense::new(SenseKey::AbortedCommand, asc::NO_ADDITIONAL),
            BdevError::Offline => Sense::new(SenseKey::NotReady, asc::LOGICAL_UNIT_NOT_READY),
            // NoResources is reported as BUSY status by the caller, never as sense; this is the
            // fallback if someone asks anyway.
            BdevError::NoResources => Sense::new(SenseKey::AbortedCommand, asc::INTERNAL_TARGET_FAILURE),
        }
    }

    fn sksv(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        let mut b = [0u8; 3];
        b[0] = 0x80 | if f.in_cdb { 0x40 } else { 0 };
        if let Some(bit) = f.bit {
            b[0] |= 0x08 | (bit & 0x07);
        }
        b[1..3].copy_from_slice(&f.byte.to_be_bytes());
        Some(b)
    }

    /// Fixed-format sense data (response code 0x70, current error).
    pub fn fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key as u8;
        if let Some(info) = self.info {
            // The fixed format has room for 32 bits only; larger values leave VALID clear.
            if let Ok(v) = u32::try_from(info) {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(k) = self.sksv() {
            s[15..18].copy_from_slice(&k);
        }
        s
    }

    /// Descriptor-format sense data (response code 0x72) into `out`; returns its length.
    pub fn descriptor(&self, out: &mut [u8; MAX_SENSE_LEN]) -> usize {
        out.fill(0);
        out[0] = 0x72;
        out[1] = self.key as u8;
        out[2] = self.asc;
        out[3] = self.ascq;
        let mut n = 8;
        if let Some(info) = self.info {
            out[n] = 0x00; // information descriptor
            out[n + 1] = 0x0A;
            out[n + 2] = 0x80;
            out[n + 4..n + 12].copy_from_slice(&info.to_be_bytes());
            n += 12;
        }
        if let Some(k) = self.sksv() {
            out[n] = 0x02; // sense key specific descriptor
            out[n + 1] = 0x06;
            out[n + 4..n + 7].copy_from_slice(&k);
            n += 8;
        }
        out[7] = (n - 8) as u8;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_carries_key_asc_and_field_pointer() {
        let s = Sense::invalid_cdb(2, Some(5)).fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!((s[12], s[13]), (0x24, 0x00));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(u16::from_be_bytes([s[16], s[17]]), 2);
        let m = Sense::miscompare(513).fixed();
        assert_eq!(m[0], 0xF0);
        assert_eq!(u32::from_be_bytes([m[3], m[4], m[5], m[6]]), 513);
        assert_eq!(m[2], 0x0E);
    }

    #[test]
    fn descriptor_format_lists_descriptors() {
        let mut b = [0u8; MAX_SENSE_LEN];
        let n = Sense::miscompare(7).descriptor(&mut b);
        assert_eq!(n, 20);
        assert_eq!(b[0], 0x72);
        assert_eq!(b[7], 12);
        assert_eq!(b[8], 0);
        let n = Sense::new(SenseKey::UnitAttention, asc::POWER_ON_RESET).descriptor(&mut b);
        assert_eq!(n, 8);
    }

    #[test]
    fn bdev_errors_map_per_the_brief() {
        let r = Sense::from_bdev(&BdevError::OutOfRange { offset: 1, count: 1, size: 1 }, false);
        assert_eq!((r.key, r.asc, r.ascq), (SenseKey::IllegalRequest, 0x21, 0));
        let r = Sense::from_bdev(&BdevError::ReadOnly, true);
        assert_eq!((r.key, r.asc), (SenseKey::DataProtect, 0x27));
        assert_eq!(Sense::from_bdev(&BdevError::Media, false).asc, 0x11);
        let s = Sense::from_bdev(&BdevError::NoSpace, true);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::DataProtect, 0x27, 0x07));
        assert_eq!(Sense::from_bdev(&BdevError::Media, true).asc, 0x0C);
        assert_eq!(Sense::from_bdev(&BdevError::Unsupported(crate::bdev::IoType::Unmap), true).asc, 0x20);
    }
}
