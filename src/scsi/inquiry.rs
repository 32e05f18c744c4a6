//! INQUIRY data (SPC-4 §6.6): the standard page and the vital product data pages that tell a
//! host what the logical unit is and what it can do.

use super::cdb::{max_compare_and_write_blocks, max_unmap_blocks, max_write_same_blocks, Geometry, MAX_TRANSFER_BYTES, MAX_UNMAP_DESCRIPTORS};
use super::sense::Sense;
use uuid::Uuid;

pub const VENDOR: &[u8; 8] = b"TIDEMARK";
pub const PRODUCT: &[u8; 16] = b"tidemark volume ";
pub const REVISION: &[u8; 4] = b"0001";

/// The SCSI target port a command arrived on (for the Device Identification page).
#[derive(Debug, Clone)]
pub struct PortIdentity {
    /// The target device's name (an iSCSI qualified name).
    pub target_name: String,
    /// iSCSI target portal group tag, which with the name identifies the target port.
    pub portal_group_tag: u16,
}

/// What a logical unit says about itself.
#[derive(Debug, Clone)]
pub struct UnitIdentity {
    pub uuid: Uuid,
    /// Supports UNMAP and WRITE SAME with UNMAP (thin provisioning); unmapped blocks read zero.
    pub thin: bool,
}

/// Peripheral device type of a direct-access block device.
const DISK: u8 = 0x00;

/// Standard INQUIRY data (96 bytes, SPC-4 format with version descriptors).
pub fn standard() -> [u8; 96] {
    let mut d = [0u8; 96];
    d[0] = DISK;
    d[2] = 0x06; // SPC-4
    d[3] = 0x10 | 0x02; // HISUP, response data format 2
    d[5] = 0x08; // 3PC: EXTENDED COPY between logical units of the target
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI (no version claimed), SPC-4, SBC-3.
    for (i, v) in [0x00A0u16, 0x0960, 0x0460, 0x04C0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data for a LUN that does not exist: peripheral qualifier 011b (no device
/// can be attached), type 1Fh (SPC-4 §6.6.2).
pub fn standard_no_lun() -> [u8; 96] {
    let mut d = standard();
    d[0] = 0x7F;
    d
}

/// Supported VPD pages, in ascending order.
pub const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

/// Serial number of a unit: its UUID in hex.
pub fn serial(u: &UnitIdentity) -> String {
    u.uuid.simple().to_string()
}

fn page(code: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(DISK);
    out.push(code);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}

fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, value: &[u8]) {
    out.push(proto_codeset);
    out.push(piv_assoc_type);
    out.push(0);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// A SCSI name string: UTF-8, NUL-terminated, padded with NULs to a multiple of 4 (SPC-4
/// §7.8.6.11), and at most 255 bytes.
fn name_string(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.as_bytes().iter().copied().take(251).collect();
    v.push(0);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

/// Protocol identifier of iSCSI, in the high nibble of a designator's first byte.
const PROTO_ISCSI: u8 = 0x50;
const PIV: u8 = 0x80;
const ASSOC_LU: u8 = 0x00;
const ASSOC_PORT: u8 = 0x10;
const ASSOC_DEVICE: u8 = 0x20;
const CODESET_BINARY: u8 = 1;
const CODESET_ASCII: u8 = 2;
const CODESET_UTF8: u8 = 3;

/// NAA locally assigned identifier (NAA 3): 60 bits of the unit's UUID.
pub fn naa(u: &UnitIdentity) -> [u8; 8] {
    let b = u.uuid.as_bytes();
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    v[0] = 0x30 | (v[0] & 0x0F);
    v
}

/// EUI-64 identifier: the other half of the UUID.
pub fn eui64(u: &UnitIdentity) -> [u8; 8] {
    let b = u.uuid.as_bytes();
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[8..16]);
    v
}

/// A VPD page, or the sense for an unsupported one.
pub fn vpd(code: u8, u: &UnitIdentity, g: &Geometry, port: &PortIdentity) -> Result<Vec<u8>, Sense> {
    let mut out = Vec::with_capacity(128);
    match code {
        0x00 => page(0x00, &VPD_PAGES, &mut out),
        0x80 => page(0x80, serial(u).as_bytes(), &mut out),
        0x83 => {
            let mut b = Vec::with_capacity(160);
            designator(&mut b, CODESET_BINARY, ASSOC_LU | 0x03, &naa(u));
            designator(&mut b, CODESET_BINARY, ASSOC_LU | 0x02, &eui64(u));
            let mut t10 = VENDOR.to_vec();
            t10.extend_from_slice(u.uuid.hyphenated().to_string().as_bytes());
            designator(&mut b, CODESET_ASCII, ASSOC_LU | 0x01, &t10);
            let port_name = format!("{},t,0x{:04x}", port.target_name, port.portal_group_tag);
            designator(&mut b, PROTO_ISCSI | CODESET_UTF8, PIV | ASSOC_PORT | 0x08, &name_string(&port_name));
            // Relative target port 1: each portal group is one port of its target.
            designator(&mut b, PROTO_ISCSI | CODESET_BINARY, PIV | ASSOC_PORT | 0x04, &[0, 0, 0, 1]);
            designator(&mut b, PROTO_ISCSI | CODESET_UTF8, PIV | ASSOC_DEVICE | 0x08, &name_string(&port.target_name));
            page(0x83, &b, &mut out);
        }
        0x8F => page(0x8F, &super::xcopy::vpd_body(), &mut out),
        0xB0 => {
            let bs = g.block_size as u64;
            let mut b = [0u8; 0x3C];
            // WSNZ clear: WRITE SAME of zero blocks writes to the end of the unit.
            b[1] = max_compare_and_write_blocks(g) as u8;
            let granularity = (4096 / bs).max(1) as u16;
            b[2..4].copy_from_slice(&granularity.to_be_bytes());
            b[4..8].copy_from_slice(&((MAX_TRANSFER_BYTES / bs) as u32).to_be_bytes());
            b[8..12].copy_from_slice(&(((128 << 10) / bs) as u32).to_be_bytes());
            b[12..16].copy_from_slice(&((MAX_TRANSFER_BYTES / bs) as u32).to_be_bytes());
            if u.thin {
                b[16..20].copy_from_slice(&max_unmap_blocks(g).to_be_bytes());
                b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                b[24..28].copy_from_slice(&(granularity as u32).to_be_bytes());
            }
            b[32..40].copy_from_slice(&max_write_same_blocks(g).to_be_bytes());
            page(0xB0, &b, &mut out);
        }
        0xB1 => {
            let mut b = [0u8; 0x3C];
            b[1] = 0x01; // non-rotating medium
            if u.thin {
                // WABEREQ 01b: after a SANITIZE BLOCK ERASE, reads succeed (and return zeros).
                b[3] = 0x40;
            }
            page(0xB1, &b, &mut out);
        }
        0xB2 => {
            let mut b = [0u8; 4];
            if u.thin {
                // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeros).
                b[1] = 0x80 | 0x40 | 0x20 | 0x04;
                b[2] = 0x02; // thin provisioned
            }
            page(0xB2, &b, &mut out);
        }
        _ => return Err(Sense::invalid_cdb(2, None)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (UnitIdentity, Geometry, PortIdentity) {
        (
            UnitIdentity { uuid: Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677), thin: true },
            Geometry { block_size: 512, num_blocks: 1 << 20 },
            PortIdentity { target_name: "iqn.2016-06.io.tidemark:vol0".into(), portal_group_tag: 1 },
        )
    }

    #[test]
    fn standard_inquiry_names_the_product() {
        let d = standard();
        assert_eq!(d[4] as usize + 5, d.len());
        assert_eq!(&d[8..16], b"TIDEMARK");
        assert_eq!(standard_no_lun()[0], 0x7F);
    }

    #[test]
    fn vpd_pages_have_consistent_lengths() {
        let (u, g, p) = ids();
        for code in VPD_PAGES {
            let v = vpd(code, &u, &g, &p).unwrap();
            assert_eq!(v[1], code);
            assert_eq!(u16::from_be_bytes([v[2], v[3]]) as usize + 4, v.len(), "page {code:#x}");
        }
        assert!(vpd(0x99, &u, &g, &p).is_err());
    }

    #[test]
    fn device_identification_lists_naa_eui64_and_port_names() {
        let (u, g, p) = ids();
        let v = vpd(0x83, &u, &g, &p).unwrap();
        let mut types = Vec::new();
        let mut i = 4;
        while i < v.len() {
            types.push((v[i + 1] & 0x30, v[i + 1] & 0x0F));
            let len = v[i + 3] as usize;
            if v[i + 1] & 0x0F == 0x08 {
                assert_eq!(len % 4, 0, "SCSI name strings are padded to 4 bytes");
            }
            i += 4 + len;
        }
        assert_eq!(i, v.len());
        assert!(types.contains(&(0x00, 0x03)));
        assert!(types.contains(&(0x00, 0x02)));
        assert!(types.contains(&(0x10, 0x08)));
        assert!(types.contains(&(0x20, 0x08)));
        assert_eq!(naa(&u)[0] >> 4, 3);
    }
}
