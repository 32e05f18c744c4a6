//! CHAP with MD5 (RFC 1994, as used by iSCSI in RFC 7143 §12.1.3): the target challenges the
//! initiator, and in mutual CHAP answers the initiator's challenge in turn.

use md5::{Digest, Md5};

/// CHAP_A value of MD5, the only algorithm offered.
pub const ALGORITHM_MD5: &str = "5";
/// Length of the challenges the target sends.
pub const CHALLENGE_LEN: usize = 32;
/// Longest challenge or response accepted from an initiator.
pub const MAX_BINARY_LEN: usize = 1024;

/// The expected response: MD5(identifier || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1.4).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let out = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        decode_hex(h)?
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b)?
    } else {
        return None;
    };
    (!out.is_empty() && out.len() <= MAX_BINARY_LEN).then_some(out)
}

fn decode_hex(h: &str) -> Option<Vec<u8>> {
    if h.len() > 2 * MAX_BINARY_LEN + 1 {
        return None;
    }
    // An odd number of digits has an implied leading zero.
    let digits: Vec<u8> = if h.len() % 2 == 1 { std::iter::once(b'0').chain(h.bytes()).collect() } else { h.bytes().collect() };
    digits
        .chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

fn decode_base64(b: &str) -> Option<Vec<u8>> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
    use base64::Engine;
    // RFC 7143 does not require the padding; initiators send it either way.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent).with_decode_allow_trailing_bits(true),
    );
    if b.len() > 2 * MAX_BINARY_LEN {
        return None;
    }
    LENIENT.decode(b).ok()
}

/// Encodes binary as `0x` hex.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Compares two byte strings in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1321_vectors() {
        // MD5("abc") = 900150983cd24fb0d6963f7d28e17f72, with id 'a', secret 'b', challenge 'c'.
        let r = response(b'a', b"b", b"c");
        assert_eq!(encode_hex(&r), "0x900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn binary_values_decode_in_both_encodings() {
        assert_eq!(decode_binary("0x0102ff").unwrap(), vec![1, 2, 255]);
        assert_eq!(decode_binary("0xabc").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("0bAQL/").unwrap(), vec![1, 2, 255]);
        // Padding is optional.
        assert_eq!(decode_binary("0bAQI=").unwrap(), vec![1, 2]);
        assert_eq!(decode_binary("0bAQI").unwrap(), vec![1, 2]);
        assert!(decode_binary("0bAQ=I").is_none());
        assert!(decode_binary("0xzz").is_none());
        assert!(decode_binary("plain").is_none());
        assert!(decode_binary("0x").is_none());
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
    }
}
