//! Mode pages (SPC-4 §7.5, SBC-3 §6.4): MODE SENSE data and MODE SELECT parameter lists. Two
//! pages: caching (WCE is changeable) and control (SWP, software write protect, is changeable).

use super::cdb::Geometry;
use super::sense::{asc, Sense, SenseKey};

pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0A;
pub const ALL_PAGES: u8 = 0x3F;

/// Page control field of MODE SENSE.
pub const PC_CURRENT: u8 = 0;
pub const PC_CHANGEABLE: u8 = 1;
pub const PC_DEFAULT: u8 = 2;
pub const PC_SAVED: u8 = 3;

/// State a MODE SELECT may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    pub write_cache: bool,
    /// Software write protect (control page): the unit refuses writes while it is set.
    pub swp: bool,
}

const CACHING_LEN: usize = 20;
const CONTROL_LEN: usize = 12;

fn caching(pc: u8, s: &ModeState, default_wce: bool) -> [u8; CACHING_LEN] {
    let mut p = [0u8; CACHING_LEN];
    p[0] = PAGE_CACHING;
    p[1] = (CACHING_LEN - 2) as u8;
    match pc {
        PC_CHANGEABLE => p[2] = 0x04,
        PC_DEFAULT => p[2] = if default_wce { 0x04 } else { 0 },
        _ => p[2] = if s.write_cache { 0x04 } else { 0 },
    }
    p
}

fn control(pc: u8, s: &ModeState) -> [u8; CONTROL_LEN] {
    let mut p = [0u8; CONTROL_LEN];
    p[0] = PAGE_CONTROL;
    p[1] = (CONTROL_LEN - 2) as u8;
    match pc {
        PC_CHANGEABLE => p[4] = 0x08,
        PC_CURRENT if s.swp => p[4] = 0x08,
        _ => {}
    }
    if pc != PC_CHANGEABLE {
        // TST 000b (one task set), D_SENSE 0 (fixed-format sense).
        p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
                     // BUSY TIMEOUT PERIOD: unlimited.
        p[8] = 0xFF;
        p[9] = 0xFF;
    }
    p
}

/// MODE SENSE data: header, block descriptor (unless DBD), and the requested pages.
#[allow(clippy::too_many_arguments)]
pub fn sense(
    ten: bool,
    dbd: bool,
    llbaa: bool,
    pc: u8,
    page: u8,
    subpage: u8,
    g: &Geometry,
    s: &ModeState,
    default_wce: bool,
    read_only: bool,
) -> Result<Vec<u8>, Sense> {
    if pc == PC_SAVED {
        return Err(Sense::new(SenseKey::IllegalRequest, asc::SAVING_PARAMETERS_NOT_SUPPORTED));
    }
    let mut pages = Vec::with_capacity(CACHING_LEN + CONTROL_LEN);
    match (page, subpage) {
        (PAGE_CACHING, 0) => pages.extend_from_slice(&caching(pc, s, default_wce)),
        (PAGE_CONTROL, 0) => pages.extend_from_slice(&control(pc, s)),
        (ALL_PAGES, 0x00) | (ALL_PAGES, 0xFF) => {
            pages.extend_from_slice(&caching(pc, s, default_wce));
            pages.extend_from_slice(&control(pc, s));
        }
        (_, 0) => return Err(Sense::invalid_cdb(2, Some(5))),
        _ => return Err(Sense::invalid_cdb(3, None)),
    }
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&g.num_blocks.to_be_bytes());
            bd.extend_from_slice(&[0; 4]);
            bd.extend_from_slice(&g.block_size.to_be_bytes());
        } else {
            let n = u32::try_from(g.num_blocks).unwrap_or(u32::MAX);
            bd.extend_from_slice(&n.to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&g.block_size.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP when read-only or software write-protected, DPOFUA (DPO
    // and FUA are honoured).
    let dsp = if read_only || s.swp { 0x80 } else { 0 } | 0x10;
    let mut out = Vec::with_capacity(8 + bd.len() + pages.len());
    if ten {
        let len = (6 + bd.len() + pages.len()) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.push(0);
        out.push(dsp);
        out.push(if llbaa && !dbd { 1 } else { 0 });
        out.push(0);
        out.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        out.push((3 + bd.len() + pages.len()) as u8);
        out.push(0);
        out.push(dsp);
        out.push(bd.len() as u8);
    }
    out.extend_from_slice(&bd);
    out.extend_from_slice(&pages);
    Ok(out)
}

/// Applies a MODE SELECT parameter list; returns the new state. Fields that are not
/// changeable must be sent back unchanged (SPC-4 §6.11), or the list is refused with the
/// offending byte in the field pointer.
pub fn select(ten: bool, data: &[u8], g: &Geometry, s: &ModeState) -> Result<ModeState, Sense> {
    let hdr = if ten { 8 } else { 4 };
    if data.is_empty() {
        return Ok(*s);
    }
    if data.len() < hdr {
        return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let bd_len = if ten { u16::from_be_bytes([data[6], data[7]]) as usize } else { data[3] as usize };
    let long = ten && data[4] & 1 != 0;
    let mut i = hdr;
    let bd_end = hdr + bd_len;
    if bd_end > data.len() {
        return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    // Block descriptors may only restate the block length.
    let desc = if long { 16 } else { 8 };
    while i + desc <= bd_end {
        let bl = if long {
            u32::from_be_bytes([data[i + 12], data[i + 13], data[i + 14], data[i + 15]])
        } else {
            u32::from_be_bytes([0, data[i + 5], data[i + 6], data[i + 7]])
        };
        if bl != g.block_size {
            return Err(Sense::invalid_param((i + if long { 12 } else { 5 }) as u16, None));
        }
        i += desc;
    }
    i = bd_end;
    let mut next = *s;
    while i < data.len() {
        let code = data[i] & 0x3F;
        if data[i] & 0x40 != 0 {
            // Subpage format: no subpages are supported.
            return Err(Sense::invalid_param(i as u16, Some(6)));
        }
        if i + 2 > data.len() {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let len = data[i + 1] as usize + 2;
        if i + len > data.len() {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let body = &data[i..i + len];
        let (current, mask): (Vec<u8>, Vec<u8>) = match code {
            PAGE_CACHING => (caching(PC_CURRENT, s, s.write_cache).to_vec(), caching(PC_CHANGEABLE, s, false).to_vec()),
            PAGE_CONTROL => (control(PC_CURRENT, s).to_vec(), control(PC_CHANGEABLE, s).to_vec()),
            _ => return Err(Sense::invalid_param(i as u16, Some(5))),
        };
        if len != current.len() {
            return Err(Sense::invalid_param(i as u16 + 1, None));
        }
        // Byte 0 carries PS (reserved in MODE SELECT) and the page code; compare from byte 2.
        for j in 2..len {
            if (body[j] ^ current[j]) & !mask[j] != 0 {
                return Err(Sense::invalid_param((i + j) as u16, None));
            }
        }
        match code {
            PAGE_CACHING => next.write_cache = body[2] & 0x04 != 0,
            _ => next.swp = body[4] & 0x08 != 0,
        }
        i += len;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry { block_size: 512, num_blocks: 2048 };
    const S: ModeState = ModeState { write_cache: true, swp: false };

    #[test]
    fn mode_sense_lengths_and_descriptors() {
        let d = sense(false, false, false, PC_CURRENT, ALL_PAGES, 0, &G, &S, true, false).unwrap();
        assert_eq!(d[0] as usize + 1, d.len());
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &2048u32.to_be_bytes());
        let d = sense(true, false, true, PC_CURRENT, PAGE_CACHING, 0, &G, &S, true, true).unwrap();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize + 2, d.len());
        assert_eq!(d[3] & 0x80, 0x80, "write protect is reported");
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
        assert_eq!(d[8 + 16], PAGE_CACHING);
        assert!(sense(false, true, false, PC_SAVED, ALL_PAGES, 0, &G, &S, true, false).is_err());
        assert!(sense(false, true, false, PC_CURRENT, 0x19, 0, &G, &S, true, false).is_err());
    }

    #[test]
    fn mode_select_changes_wce_only() {
        let cur = sense(false, true, false, PC_CURRENT, PAGE_CACHING, 0, &G, &S, true, false).unwrap();
        let mut list = cur.clone();
        list[0] = 0;
        list[2] = 0; // the device-specific parameter is reserved in MODE SELECT
        list[4 + 2] &= !0x04;
        assert_eq!(select(false, &list, &G, &S).unwrap(), ModeState { write_cache: false, swp: false });
        let mut bad = list.clone();
        bad[4 + 2] |= 0x01; // RCD is not changeable
        let e = select(false, &bad, &G, &S).unwrap_err();
        assert_eq!((e.asc, e.field.unwrap().byte), (0x26, 6));
        let ctl = sense(false, true, false, PC_CURRENT, PAGE_CONTROL, 0, &G, &S, true, false).unwrap();
        let mut c = ctl.clone();
        c[0] = 0;
        assert!(select(false, &c, &G, &S).is_ok());
        c[4 + 2] |= 0x04; // D_SENSE
        assert!(select(false, &c, &G, &S).is_err());
        c[4 + 2] &= !0x04;
        c[4 + 4] |= 0x08; // SWP
        let wp = select(false, &c, &G, &S).unwrap();
        assert_eq!(wp, ModeState { write_cache: true, swp: true });
        let d = sense(false, true, false, PC_CURRENT, PAGE_CONTROL, 0, &G, &wp, true, false).unwrap();
        assert_eq!((d[2] & 0x80, d[4 + 4] & 0x08), (0x80, 0x08), "WP and SWP are reported");
        let d = sense(false, true, false, PC_CHANGEABLE, PAGE_CONTROL, 0, &G, &S, true, false).unwrap();
        assert_eq!(d[4 + 4], 0x08, "SWP is changeable");
        assert!(select(false, &[0, 0], &G, &S).is_err());
    }

    proptest::proptest! {
        #[test]
        fn mode_select_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), ten in proptest::prelude::any::<bool>()) {
            let _ = select(ten, &data, &G, &S);
        }
    }
}
