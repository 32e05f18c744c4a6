//! Text keys (RFC 7143 §6.1): `key=value` pairs separated by NUL bytes, in login and text PDUs.

/// Longest key name (RFC 7143 §6.1: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value this target accepts (RFC 7143 §6.1 allows 255 for most keys, 8192 for a few).
pub const MAX_VALUE_LEN: usize = 8192;
/// Most keys in one negotiation.
pub const MAX_KEYS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text data is not UTF-8")]
    NotUtf8,
    #[error("a key-value pair has no '='")]
    NoEquals,
    #[error("key {0:?} is too long or empty")]
    BadKey(String),
    #[error("the value of {0} is too long")]
    ValueTooLong(String),
    #[error("key {0} is given twice")]
    Duplicate(String),
    #[error("too many keys")]
    TooMany,
}

/// Parses NUL-separated `key=value` pairs, in order. Trailing NULs (padding) are ignored.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::NoEquals)?;
        if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_')) {
            return Err(TextError::BadKey(k.chars().take(MAX_KEY_LEN).collect()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong(k.to_string()));
        }
        if out.iter().any(|(x, _)| x == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        if out.len() >= MAX_KEYS {
            return Err(TextError::TooMany);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_refuses_garbage() {
        let v = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(v, vec![("InitiatorName".into(), "iqn.x".into()), ("SessionType".into(), "Normal".into())]);
        assert_eq!(parse(b"a=1\0a=2\0"), Err(TextError::Duplicate("a".into())));
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals));
        assert!(parse(b"=x\0").is_err());
        assert!(parse(&[b'k', b'=', 0xff, 0]).is_err());
        let mut o = Vec::new();
        push(&mut o, "A", "b");
        assert_eq!(o, b"A=b\0");
    }
}
