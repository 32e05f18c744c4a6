//! The AUTH_Send / AUTH_Receive payloads of DH-HMAC-CHAP (NVMe base specification, in-band
//! authentication): encode and decode. Decoding checks every length against the buffer and
//! never panics on any input.

/// AUTH-Type of the negotiate message, and of the DH-HMAC-CHAP messages.
const TYPE_COMMON: u8 = 0x00;
const TYPE_DHCHAP: u8 = 0x01;
/// AUTH-Id values.
pub mod id {
    pub const NEGOTIATE: u8 = 0x00;
    pub const CHALLENGE: u8 = 0x01;
    pub const REPLY: u8 = 0x02;
    pub const SUCCESS1: u8 = 0x03;
    pub const SUCCESS2: u8 = 0x04;
    pub const FAILURE2: u8 = 0xF0;
    pub const FAILURE1: u8 = 0xF1;
}
/// The authentication protocol identifier of DH-HMAC-CHAP in a negotiate descriptor.
const AUTHID_DHCHAP: u8 = 0x01;
/// Bytes of a protocol descriptor, and of its id list (hash ids then DH group ids, 30 each).
const DESC_LEN: usize = 64;
const ID_LIST_HALF: usize = 30;
/// Failure reason code "authentication failed", and its explanations.
pub const REASON_FAILED: u8 = 0x01;
pub mod explain {
    pub const FAILED: u8 = 0x01;
    pub const NOT_USABLE: u8 = 0x02;
    pub const CONCAT_MISMATCH: u8 = 0x03;
    pub const HASH_UNUSABLE: u8 = 0x04;
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    pub const INCORRECT_PROTOCOL: u8 = 0x07;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The host offers hash functions and DH groups (ids as the spec numbers them).
    Negotiate {
        tid: u16,
        sc_c: u8,
        hashes: Vec<u8>,
        dhgroups: Vec<u8>,
    },
    Challenge {
        tid: u16,
        hash: u8,
        dhgroup: u8,
        seqnum: u32,
        challenge: Vec<u8>,
        dh: Vec<u8>,
    },
    /// `challenge` is the host's challenge to the controller (bidirectional) or None.
    Reply {
        tid: u16,
        response: Vec<u8>,
        challenge: Option<Vec<u8>>,
        seqnum: u32,
        dh: Vec<u8>,
    },
    Success1 {
        tid: u16,
        hl: u8,
        response: Option<Vec<u8>>,
    },
    Success2 {
        tid: u16,
    },
    Failure1 {
        tid: u16,
        reason: u8,
        explanation: u8,
    },
    Failure2 {
        tid: u16,
        reason: u8,
        explanation: u8,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message too short")]
    Short,
    #[error("unknown message type {0:#x}/{1:#x}")]
    Unknown(u8, u8),
    #[error("malformed message")]
    Malformed,
}

fn le16(b: &[u8], at: usize) -> Result<u16, DecodeError> {
    Ok(u16::from_le_bytes(b.get(at..at + 2).ok_or(DecodeError::Short)?.try_into().map_err(|_| DecodeError::Short)?))
}

fn le32(b: &[u8], at: usize) -> Result<u32, DecodeError> {
    Ok(u32::from_le_bytes(b.get(at..at + 4).ok_or(DecodeError::Short)?.try_into().map_err(|_| DecodeError::Short)?))
}

fn byte(b: &[u8], at: usize) -> Result<u8, DecodeError> {
    b.get(at).copied().ok_or(DecodeError::Short)
}

fn bytes(b: &[u8], at: usize, n: usize) -> Result<Vec<u8>, DecodeError> {
    Ok(b.get(at..at.checked_add(n).ok_or(DecodeError::Short)?).ok_or(DecodeError::Short)?.to_vec())
}

fn header(out: &mut Vec<u8>, ty: u8, id: u8, tid: u16) {
    out.extend_from_slice(&[ty, id, 0, 0]);
    out.extend_from_slice(&tid.to_le_bytes());
}

impl Message {
    pub fn tid(&self) -> u16 {
        match self {
            Message::Negotiate { tid, .. }
            | Message::Challenge { tid, .. }
            | Message::Reply { tid, .. }
            | Message::Success1 { tid, .. }
            | Message::Success2 { tid }
            | Message::Failure1 { tid, .. }
            | Message::Failure2 { tid, .. } => *tid,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(64);
        match self {
            Message::Negotiate { tid, sc_c, hashes, dhgroups } => {
                header(&mut o, TYPE_COMMON, id::NEGOTIATE, *tid);
                o.extend_from_slice(&[*sc_c, 1]);
                let mut d = [0u8; DESC_LEN];
                d[0] = AUTHID_DHCHAP;
                d[2] = hashes.len().min(ID_LIST_HALF) as u8;
                d[3] = dhgroups.len().min(ID_LIST_HALF) as u8;
                for (i, h) in hashes.iter().take(ID_LIST_HALF).enumerate() {
                    d[4 + i] = *h;
                }
                for (i, g) in dhgroups.iter().take(ID_LIST_HALF).enumerate() {
                    d[4 + ID_LIST_HALF + i] = *g;
                }
                o.extend_from_slice(&d);
            }
            Message::Challenge { tid, hash, dhgroup, seqnum, challenge, dh } => {
                header(&mut o, TYPE_DHCHAP, id::CHALLENGE, *tid);
                o.extend_from_slice(&[challenge.len() as u8, 0, *hash, *dhgroup]);
                o.extend_from_slice(&(dh.len() as u16).to_le_bytes());
                o.extend_from_slice(&seqnum.to_le_bytes());
                o.extend_from_slice(challenge);
                o.extend_from_slice(dh);
            }
            Message::Reply { tid, response, challenge, seqnum, dh } => {
                header(&mut o, TYPE_DHCHAP, id::REPLY, *tid);
                o.extend_from_slice(&[response.len() as u8, 0, challenge.is_some() as u8, 0]);
                o.extend_from_slice(&(dh.len() as u16).to_le_bytes());
                o.extend_from_slice(&seqnum.to_le_bytes());
                o.extend_from_slice(response);
                // The challenge field is always there (zeros when unused).
                match challenge {
                    Some(c) => o.extend_from_slice(c),
                    None => o.resize(o.len() + response.len(), 0),
                }
                o.extend_from_slice(dh);
            }
            Message::Success1 { tid, hl, response } => {
                header(&mut o, TYPE_DHCHAP, id::SUCCESS1, *tid);
                o.extend_from_slice(&[*hl, 0, response.is_some() as u8]);
                o.resize(16, 0);
                if let Some(r) = response {
                    o.extend_from_slice(r);
                }
            }
            Message::Success2 { tid } => {
                header(&mut o, TYPE_DHCHAP, id::SUCCESS2, *tid);
                o.resize(16, 0);
            }
            Message::Failure1 { tid, reason, explanation } | Message::Failure2 { tid, reason, explanation } => {
                let id = if matches!(self, Message::Failure1 { .. }) { id::FAILURE1 } else { id::FAILURE2 };
                header(&mut o, TYPE_DHCHAP, id, *tid);
                o.extend_from_slice(&[*reason, *explanation]);
            }
        }
        o
    }

    pub fn decode(b: &[u8]) -> Result<Message, DecodeError> {
        let (ty, mid, tid) = (byte(b, 0)?, byte(b, 1)?, le16(b, 4)?);
        Ok(match (ty, mid) {
            (TYPE_COMMON, id::NEGOTIATE) => {
                let (sc_c, napd) = (byte(b, 6)?, byte(b, 7)?);
                if napd == 0 {
                    return Err(DecodeError::Malformed);
                }
                // Only the DH-HMAC-CHAP descriptor matters; others (none defined yet) are skipped.
                let mut found = None;
                for i in 0..napd as usize {
                    let d = b.get(8 + i * DESC_LEN..8 + (i + 1) * DESC_LEN).ok_or(DecodeError::Short)?;
                    if d[0] == AUTHID_DHCHAP && found.is_none() {
                        let (hl, dl) = (d[2] as usize, d[3] as usize);
                        if hl > ID_LIST_HALF || dl > ID_LIST_HALF {
                            return Err(DecodeError::Malformed);
                        }
                        found = Some((d[4..4 + hl].to_vec(), d[4 + ID_LIST_HALF..4 + ID_LIST_HALF + dl].to_vec()));
                    }
                }
                let (hashes, dhgroups) = found.ok_or(DecodeError::Malformed)?;
                Message::Negotiate { tid, sc_c, hashes, dhgroups }
            }
            (TYPE_DHCHAP, id::CHALLENGE) => {
                let (hl, dl) = (byte(b, 6)? as usize, le16(b, 10)? as usize);
                Message::Challenge {
                    tid,
                    hash: byte(b, 8)?,
                    dhgroup: byte(b, 9)?,
                    seqnum: le32(b, 12)?,
                    challenge: bytes(b, 16, hl)?,
                    dh: bytes(b, 16 + hl, dl)?,
                }
            }
            (TYPE_DHCHAP, id::REPLY) => {
                let (hl, cvalid, dl) = (byte(b, 6)? as usize, byte(b, 8)?, le16(b, 10)? as usize);
                let challenge = bytes(b, 16 + hl, hl)?;
                Message::Reply {
                    tid,
                    seqnum: le32(b, 12)?,
                    response: bytes(b, 16, hl)?,
                    challenge: (cvalid != 0).then_some(challenge),
                    dh: bytes(b, 16 + 2 * hl, dl)?,
                }
            }
            (TYPE_DHCHAP, id::SUCCESS1) => {
                let (hl, rvalid) = (byte(b, 6)?, byte(b, 8)?);
                let response = if rvalid != 0 { Some(bytes(b, 16, hl as usize)?) } else { None };
                Message::Success1 { tid, hl, response }
            }
            (TYPE_DHCHAP, id::SUCCESS2) => {
                bytes(b, 0, 16)?;
                Message::Success2 { tid }
            }
            (TYPE_DHCHAP, id::FAILURE1) => Message::Failure1 { tid, reason: byte(b, 6)?, explanation: byte(b, 7)? },
            (TYPE_DHCHAP, id::FAILURE2) => Message::Failure2 { tid, reason: byte(b, 6)?, explanation: byte(b, 7)? },
            _ => return Err(DecodeError::Unknown(ty, mid)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Negotiate { tid: 7, sc_c: 0, hashes: vec![1, 2, 3], dhgroups: vec![0, 1, 2, 3, 4, 5] },
            Message::Challenge { tid: 7, hash: 1, dhgroup: 1, seqnum: 99, challenge: vec![3; 32], dh: vec![9; 256] },
            Message::Challenge { tid: 7, hash: 3, dhgroup: 0, seqnum: 1, challenge: vec![3; 64], dh: vec![] },
            Message::Reply { tid: 7, response: vec![1; 48], challenge: Some(vec![2; 48]), seqnum: 5, dh: vec![4; 384] },
            Message::Reply { tid: 7, response: vec![1; 32], challenge: None, seqnum: 0, dh: vec![] },
            Message::Success1 { tid: 7, hl: 32, response: Some(vec![8; 32]) },
            Message::Success1 { tid: 7, hl: 32, response: None },
            Message::Success2 { tid: 7 },
            Message::Failure1 { tid: 7, reason: REASON_FAILED, explanation: explain::FAILED },
            Message::Failure2 { tid: 7, reason: REASON_FAILED, explanation: explain::HASH_UNUSABLE },
        ]
    }

    #[test]
    fn round_trip() {
        for m in samples() {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn layout_matches_the_specification() {
        // Negotiate: 8-byte header, then one 64-byte descriptor.
        let n = samples()[0].encode();
        assert_eq!(n.len(), 72);
        assert_eq!(&n[..8], &[0, 0, 0, 0, 7, 0, 0, 1]);
        assert_eq!(&n[8..12], &[AUTHID_DHCHAP, 0, 3, 6]);
        assert_eq!(&n[12..15], &[1, 2, 3]);
        assert_eq!(&n[42..48], &[0, 1, 2, 3, 4, 5]);
        // Challenge: HL at 6, HashID at 8, DHGID at 9, DHVLEN at 10, SEQNUM at 12, then C1, then DH.
        let c = samples()[1].encode();
        assert_eq!(c.len(), 16 + 32 + 256);
        assert_eq!(&c[..16], &[1, 1, 0, 0, 7, 0, 32, 0, 1, 1, 0, 1, 99, 0, 0, 0]);
        // Reply: the host challenge is always present; DH value after it.
        let r = samples()[4].encode();
        assert_eq!(r.len(), 16 + 64);
        assert_eq!(r[8], 0);
        // Failure: reason code and explanation at bytes 6 and 7.
        assert_eq!(samples()[8].encode(), vec![1, 0xF1, 0, 0, 7, 0, 1, 1]);
    }

    #[test]
    fn truncated_messages_are_refused() {
        for m in samples() {
            let b = m.encode();
            // Every prefix shorter than the fields the message needs is an error, never a panic.
            for n in 0..b.len() {
                if let Ok(d) = Message::decode(&b[..n]) {
                    assert!(matches!(d, Message::Success1 { response: None, .. }), "{m:?} cut at {n} decoded as {d:?}");
                }
            }
        }
        assert_eq!(Message::decode(&[9, 9, 0, 0, 0, 0]), Err(DecodeError::Unknown(9, 9)));
        // A negotiate without a DH-HMAC-CHAP descriptor, or with id lists longer than their room.
        let mut n = samples()[0].encode();
        n[8] = 2;
        assert_eq!(Message::decode(&n), Err(DecodeError::Malformed));
        let mut n = samples()[0].encode();
        n[10] = 31;
        assert_eq!(Message::decode(&n), Err(DecodeError::Malformed));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600), ty in 0u8..2, mid in prop::sample::select(vec![0u8, 1, 2, 3, 4, 0xF0, 0xF1])) {
            let _ = Message::decode(&b);
            let mut b = b;
            if b.len() >= 2 {
                b[0] = ty;
                b[1] = mid;
            }
            if let Ok(m) = Message::decode(&b) {
                // Whatever decodes re-encodes to something that decodes the same.
                prop_assert_eq!(Message::decode(&m.encode()).ok(), Some(m));
            }
        }
    }
}
