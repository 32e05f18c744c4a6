//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.27): the copy manager of a
//! logical unit copies blocks between logical units of the same target without the data
//! crossing the network. This module parses and validates the parameter list (every
//! descriptor before any block moves) and builds the third-party copy VPD page and the
//! operating parameters; the logical unit runs the copy in bounded chunks.

use super::sense::{asc, Sense, SenseKey};

/// Most CSCD (copy source/destination) descriptors in one command.
pub const MAX_CSCD_DESCRIPTORS: u16 = 8;
/// Most segment descriptors in one command.
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 64;
/// Length of the parameter list header.
const HEADER_LEN: usize = 16;
/// Length of an identification CSCD descriptor.
const CSCD_LEN: usize = 32;
/// Length of a block-to-block segment descriptor.
const B2B_LEN: usize = 28;
/// Largest parameter list: the header and the most descriptors of the supported kinds.
pub const MAX_PARAM_BYTES: u32 = (HEADER_LEN + MAX_CSCD_DESCRIPTORS as usize * CSCD_LEN + MAX_SEGMENT_DESCRIPTORS as usize * B2B_LEN) as u32;
/// Largest segment, in bytes (its block count field is 16 bits; this bounds one command's
/// work together with the segment count).
pub const MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes copied per chunk (one buffer of this size per running copy).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Copy results kept per nexus (COPY STATUS of the most recent list identifiers).
pub const MAX_HELD_RESULTS: usize = 16;

/// Descriptor type codes.
const IDENT_CSCD: u8 = 0xE4;
const BLOCK_TO_BLOCK: u8 = 0x02;

/// ASC/ASCQ pairs of the copy manager.
const TOO_MANY_TARGET_DESCRIPTORS: (u8, u8) = (0x26, 0x06);
const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE: (u8, u8) = (0x26, 0x07);
const TOO_MANY_SEGMENT_DESCRIPTORS: (u8, u8) = (0x26, 0x08);
const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE: (u8, u8) = (0x26, 0x09);
const COPY_TARGET_DEVICE_NOT_REACHABLE: (u8, u8) = (0x0D, 0x02);

/// A copy that cannot go on: COPY ABORTED with `code`.
pub fn aborted(code: (u8, u8)) -> Sense {
    Sense::new(SenseKey::CopyAborted, code)
}

/// A copy target that names no logical unit of this target.
pub fn unreachable() -> Sense {
    aborted(COPY_TARGET_DEVICE_NOT_REACHABLE)
}

/// A logical unit named by an identification descriptor: its designator type (2 EUI-64, 3
/// NAA) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cscd {
    pub designator_type: u8,
    pub designator: Vec<u8>,
    /// NUL set: the descriptor names no device; a segment that uses it fails.
    pub null: bool,
    /// DISK BLOCK LENGTH the host expects.
    pub block_len: u32,
}

/// One block-to-block segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: u16,
    pub dst: u16,
    pub blocks: u16,
    pub src_lba: u64,
    pub dst_lba: u64,
}

/// A validated EXTENDED COPY parameter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub list_id: u8,
    /// LIST ID USAGE 11b: the host does not want the results kept.
    pub discard: bool,
    pub cscds: Vec<Cscd>,
    pub segments: Vec<Segment>,
}

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}
fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn list_length_error() -> Sense {
    Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR)
}

/// Parses an EXTENDED COPY (LID1) parameter list; None for an empty list (nothing to do).
pub fn parse(p: &[u8]) -> Result<Option<Plan>, Sense> {
    if p.is_empty() {
        return Ok(None);
    }
    if p.len() < HEADER_LEN {
        return Err(list_length_error());
    }
    let list_id = p[0];
    let usage = (p[1] >> 3) & 0x03;
    if usage == 0x01 {
        return Err(Sense::invalid_param(1, Some(3)));
    }
    let cscd_len = be16(p, 2);
    let seg_len = be32(p, 8);
    let inline_len = be32(p, 12);
    if inline_len != 0 {
        // No segment type this copy manager supports uses inline data.
        return Err(Sense::invalid_param(12, None));
    }
    if HEADER_LEN + cscd_len + seg_len != p.len() {
        return Err(list_length_error());
    }
    if cscd_len % CSCD_LEN != 0 {
        return Err(Sense::invalid_param(2, None));
    }
    if cscd_len / CSCD_LEN > MAX_CSCD_DESCRIPTORS as usize {
        return Err(Sense::new(SenseKey::IllegalRequest, TOO_MANY_TARGET_DESCRIPTORS));
    }
    let mut cscds = Vec::with_capacity(cscd_len / CSCD_LEN);
    for (i, d) in p[HEADER_LEN..HEADER_LEN + cscd_len].chunks(CSCD_LEN).enumerate() {
        let at = (HEADER_LEN + i * CSCD_LEN) as u16;
        if d[0] != IDENT_CSCD {
            return Err(Sense::new(SenseKey::IllegalRequest, UNSUPPORTED_TARGET_DESCRIPTOR_TYPE));
        }
        // Bits 7:6 of byte 1 (SPC-3's LU ID TYPE) are ignored, as SPC-4 has it (this unit
        // claims SPC-4): the designator always names the unit.
        // Peripheral device type 0: block devices only.
        if d[1] & 0x1F != 0 {
            return Err(Sense::invalid_param(at + 1, Some(4)));
        }
        let len = d[7] as usize;
        if len > 20 - 4 {
            return Err(Sense::invalid_param(at + 7, None));
        }
        cscds.push(Cscd {
            designator_type: d[5] & 0x0F,
            designator: d[8..8 + len].to_vec(),
            null: d[1] & 0x20 != 0,
            block_len: (d[29] as u32) << 16 | (d[30] as u32) << 8 | d[31] as u32,
        });
    }
    let segs = &p[HEADER_LEN + cscd_len..];
    let mut segments = Vec::new();
    let mut off = 0;
    while off < segs.len() {
        let at = (HEADER_LEN + cscd_len + off) as u16;
        if segs.len() - off < 4 {
            return Err(list_length_error());
        }
        let d = &segs[off..];
        if d[0] != BLOCK_TO_BLOCK {
            return Err(Sense::new(SenseKey::IllegalRequest, UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE));
        }
        if segments.len() == MAX_SEGMENT_DESCRIPTORS as usize {
            return Err(Sense::new(SenseKey::IllegalRequest, TOO_MANY_SEGMENT_DESCRIPTORS));
        }
        if be16(d, 2) != B2B_LEN - 4 {
            return Err(Sense::invalid_param(at + 2, None));
        }
        if d.len() < B2B_LEN {
            return Err(list_length_error());
        }
        segments.push(Segment { src: be16(d, 4) as u16, dst: be16(d, 6) as u16, blocks: be16(d, 10) as u16, src_lba: be64(d, 12), dst_lba: be64(d, 20) });
        off += B2B_LEN;
    }
    Ok(Some(Plan { list_id, discard: usage == 0x03, cscds, segments }))
}

/// The result of a copy, for RECEIVE COPY RESULTS (COPY STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResult {
    pub list_id: u8,
    pub ok: bool,
    pub segments_done: u16,
    pub bytes: u64,
}

/// COPY STATUS parameter data (SPC-4 §6.27.3).
pub fn copy_status(r: &CopyResult) -> Vec<u8> {
    let mut d = vec![0u8; 12];
    d[..4].copy_from_slice(&8u32.to_be_bytes());
    // Completed, without or with errors (HDD clear: no held data).
    d[4] = if r.ok { 0x01 } else { 0x02 };
    d[5..7].copy_from_slice(&r.segments_done.to_be_bytes());
    // TRANSFER COUNT UNITS: kibibytes (so that the 32-bit count never wraps).
    d[7] = 0xF1;
    d[8..12].copy_from_slice(&(r.bytes >> 10).min(u32::MAX as u64).to_be_bytes()[4..]);
    d
}

/// OPERATING PARAMETERS parameter data (SPC-4 §6.27.5).
pub fn operating_parameters() -> Vec<u8> {
    let mut d = vec![0u8; 44];
    d[4] = 0x01; // SNLID: list identifiers are not checked for uniqueness
    d[8..10].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    d[12..16].copy_from_slice(&MAX_PARAM_BYTES.to_be_bytes());
    d[16..20].copy_from_slice(&(MAX_SEGMENT_BYTES as u32).to_be_bytes());
    // Maximum inline data length, held data limit, stream transfer size: 0.
    d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
    d[36] = 1; // maximum concurrent copies
    d[37] = 9; // data segment granularity: 512 bytes (log2)
    let codes = [BLOCK_TO_BLOCK, IDENT_CSCD];
    d[43] = codes.len() as u8;
    d.extend_from_slice(&codes);
    let len = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&len.to_be_bytes());
    d
}

/// The body of the Third-party Copy VPD page (SPC-4 §7.8.17): supported commands, the
/// parameter data limits, the supported descriptors, and the general copy operations.
pub fn vpd_body() -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    let mut desc = |t: u16, body: &[u8]| {
        let mut body = body.to_vec();
        while body.len() % 4 != 0 {
            body.push(0);
        }
        b.extend_from_slice(&t.to_be_bytes());
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(&body);
    };
    // Supported Commands: EXTENDED COPY (LID1), RECEIVE COPY RESULTS (COPY STATUS, OPERATING
    // PARAMETERS).
    let cmds = [0x83, 1, 0x00, 0x84, 2, 0x00, 0x03];
    let mut sc = vec![cmds.len() as u8];
    sc.extend_from_slice(&cmds);
    desc(0x0001, &sc);
    // Parameter Data.
    let mut pd = vec![0u8; 28];
    pd[4..6].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    pd[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    pd[8..12].copy_from_slice(&MAX_PARAM_BYTES.to_be_bytes());
    desc(0x0008, &pd);
    // Supported Descriptors.
    desc(0x0004, &[2, BLOCK_TO_BLOCK, IDENT_CSCD]);
    // General Copy Operations: one copy at a time per command, segments up to the limit.
    let mut gc = vec![0u8; 32];
    gc[..4].copy_from_slice(&1u32.to_be_bytes());
    gc[4..8].copy_from_slice(&1u32.to_be_bytes());
    gc[8..12].copy_from_slice(&(MAX_SEGMENT_BYTES as u32).to_be_bytes());
    gc[12] = 9;
    desc(0x8001, &gc);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(list_id: u8, usage: u8, cscd: usize, seg: usize) -> Vec<u8> {
        let mut h = vec![0u8; 16];
        h[0] = list_id;
        h[1] = usage << 3;
        h[2..4].copy_from_slice(&(cscd as u16).to_be_bytes());
        h[8..12].copy_from_slice(&(seg as u32).to_be_bytes());
        h
    }

    fn cscd(naa: [u8; 8]) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[0] = 0xE4;
        d[4] = 1;
        d[5] = 3;
        d[7] = 8;
        d[8..16].copy_from_slice(&naa);
        d[30] = 2; // 512-byte blocks
        d
    }

    fn b2b(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
        let mut d = vec![0u8; 28];
        d[0] = 0x02;
        d[3] = 24;
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&blocks.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        d
    }

    fn code(r: Result<Option<Plan>, Sense>) -> (SenseKey, u8, u8) {
        let s = r.unwrap_err();
        (s.key, s.asc, s.ascq)
    }

    #[test]
    fn a_valid_list_parses_and_an_empty_one_is_nothing() {
        let mut p = header(7, 3, 32, 28);
        p.extend(cscd([0x30, 1, 2, 3, 4, 5, 6, 7]));
        p.extend(b2b(0, 0, 2048, 0, 9000));
        let plan = parse(&p).unwrap().unwrap();
        assert_eq!((plan.list_id, plan.discard), (7, true));
        assert_eq!(plan.cscds[0].designator, vec![0x30, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(plan.cscds[0].block_len, 512);
        assert_eq!(plan.segments, vec![Segment { src: 0, dst: 0, blocks: 2048, src_lba: 0, dst_lba: 9000 }]);
        assert_eq!(parse(&[]).unwrap(), None);
    }

    #[test]
    fn bad_lists_get_the_sense_hosts_expect() {
        let mut p = header(1, 0, 32, 28);
        p.extend(cscd([0x30; 8]));
        p.extend(b2b(0, 0, 1, 0, 0));
        // Truncated descriptors.
        assert_eq!(code(parse(&p[..16 + 31])), (SenseKey::IllegalRequest, 0x1A, 0));
        assert_eq!(code(parse(&p[..p.len() - 1])), (SenseKey::IllegalRequest, 0x1A, 0));
        // Unsupported descriptor types.
        let mut q = p.clone();
        q[16] = 0xE0;
        assert_eq!(code(parse(&q)), (SenseKey::IllegalRequest, 0x26, 0x07));
        let mut q = p.clone();
        q[48] = 0x03;
        assert_eq!(code(parse(&q)), (SenseKey::IllegalRequest, 0x26, 0x09));
        // SPC-3's LU ID TYPE is ignored (SPC-4); a peripheral type other than disk is not.
        let mut q = p.clone();
        q[17] = 0x80;
        assert!(parse(&q).is_ok());
        q[17] = 0x01;
        assert_eq!(code(parse(&q)), (SenseKey::IllegalRequest, 0x26, 0x00));
        // Too many descriptors of each kind.
        let mut q = header(1, 0, 32 * 9, 28);
        for _ in 0..9 {
            q.extend(cscd([0x30; 8]));
        }
        q.extend(b2b(0, 0, 1, 0, 0));
        assert_eq!(code(parse(&q)), (SenseKey::IllegalRequest, 0x26, 0x06));
        let mut q = header(1, 0, 32, 28 * 65);
        q.extend(cscd([0x30; 8]));
        for _ in 0..65 {
            q.extend(b2b(0, 0, 1, 0, 0));
        }
        assert_eq!(code(parse(&q)), (SenseKey::IllegalRequest, 0x26, 0x08));
    }

    #[test]
    fn operating_parameters_and_vpd_lengths_add_up() {
        let o = operating_parameters();
        assert_eq!(u32::from_be_bytes(o[..4].try_into().unwrap()) as usize, o.len() - 4);
        assert_eq!(o[43] as usize, o.len() - 44);
        let v = vpd_body();
        let mut at = 0;
        let mut types = Vec::new();
        while at < v.len() {
            let len = u16::from_be_bytes([v[at + 2], v[at + 3]]) as usize;
            types.push(u16::from_be_bytes([v[at], v[at + 1]]));
            assert_eq!(len % 4, 0);
            at += 4 + len;
        }
        assert_eq!(at, v.len());
        assert_eq!(types, vec![1, 8, 4, 0x8001]);
        let s = copy_status(&CopyResult { list_id: 1, ok: true, segments_done: 1, bytes: 1 << 20 });
        assert_eq!((s[4], &s[8..12]), (1, &1024u32.to_be_bytes()[..]));
    }
}
