//! DH-HMAC-CHAP secrets: the NVMe text representation `DHHC-1:<t>:<base64(key || crc32)>:`
//! (as nvme-cli's `gen-dhchap-key` writes them and the keyring's files hold them), the
//! transformed key, and the hash functions the protocol negotiates.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

/// A hash function identifier as the NVMe specification numbers them (HashID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Digest {
    Sha256 = 1,
    Sha384 = 2,
    Sha512 = 3,
}

impl Digest {
    pub const ALL: [Digest; 3] = [Digest::Sha256, Digest::Sha384, Digest::Sha512];

    pub fn id(self) -> u8 {
        self as u8
    }

    pub fn from_id(id: u8) -> Option<Digest> {
        Digest::ALL.into_iter().find(|d| d.id() == id)
    }

    /// SPDK's spelling in `nvmf_set_config`.
    pub fn name(self) -> &'static str {
        match self {
            Digest::Sha256 => "sha256",
            Digest::Sha384 => "sha384",
            Digest::Sha512 => "sha512",
        }
    }

    pub fn from_name(name: &str) -> Option<Digest> {
        Digest::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes of a hash (and so of a challenge and a response).
    pub fn len(self) -> usize {
        match self {
            Digest::Sha256 => 32,
            Digest::Sha384 => 48,
            Digest::Sha512 => 64,
        }
    }

    pub fn hash(self, data: &[u8]) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(match self {
            Digest::Sha256 => Sha256::digest(data).to_vec(),
            Digest::Sha384 => Sha384::digest(data).to_vec(),
            Digest::Sha512 => Sha512::digest(data).to_vec(),
        })
    }

    /// HMAC over the concatenation of `parts` (HMAC takes keys of any length).
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut m = <M as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        Zeroizing::new(match self {
            Digest::Sha256 => run::<Hmac<Sha256>>(key, parts),
            Digest::Sha384 => run::<Hmac<Sha384>>(key, parts),
            Digest::Sha512 => run::<Hmac<Sha512>>(key, parts),
        })
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("not a DH-HMAC-CHAP secret (expected DHHC-1:<00|01|02|03>:<base64>:)")]
    Format,
    #[error("the secret's key must be 32, 48 or 64 bytes")]
    Length,
    #[error("the secret's CRC-32 does not match its key")]
    Crc,
}

/// A DH-HMAC-CHAP secret: the key and how it is transformed before use.
pub struct Secret {
    /// None: used as is; Some(d): HMAC-d keyed with the key over the NQN (see [`Secret::transform`]).
    transform: Option<Digest>,
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.key.len())
    }
}

impl Secret {
    /// Parses the text representation (surrounding whitespace, e.g. a file's final newline,
    /// is ignored). No part of the input reaches an error message.
    pub fn parse(text: &[u8]) -> Result<Secret, SecretError> {
        use base64::Engine;
        let text = std::str::from_utf8(text).map_err(|_| SecretError::Format)?.trim();
        let rest = text.strip_prefix("DHHC-1:").ok_or(SecretError::Format)?;
        let (t, rest) = rest.split_once(':').ok_or(SecretError::Format)?;
        let b64 = rest.strip_suffix(':').ok_or(SecretError::Format)?;
        let transform = match t {
            "00" => None,
            "01" => Some(Digest::Sha256),
            "02" => Some(Digest::Sha384),
            "03" => Some(Digest::Sha512),
            _ => return Err(SecretError::Format),
        };
        let raw = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| SecretError::Format)?);
        let n = raw.len().checked_sub(4).ok_or(SecretError::Length)?;
        if ![32, 48, 64].contains(&n) {
            return Err(SecretError::Length);
        }
        let crc = u32::from_le_bytes([raw[n], raw[n + 1], raw[n + 2], raw[n + 3]]);
        if crc32fast::hash(&raw[..n]) != crc {
            return Err(SecretError::Crc);
        }
        Ok(Secret { transform, key: Zeroizing::new(raw[..n].to_vec()) })
    }

    /// The text representation of `key` (for tests and tools).
    pub fn encode(transform: Option<Digest>, key: &[u8]) -> String {
        use base64::Engine;
        let mut raw = key.to_vec();
        raw.extend_from_slice(&crc32fast::hash(key).to_le_bytes());
        format!("DHHC-1:{:02x}:{}:", transform.map_or(0, |d| d.id()), base64::engine::general_purpose::STANDARD.encode(raw))
    }

    /// The key the responses are computed with: the key itself, or HMAC(key, NQN ||
    /// "NVMe-over-Fabrics") with the secret's hash — the host NQN for a host secret, the
    /// subsystem NQN for a controller secret.
    pub fn transform(&self, nqn: &str) -> Zeroizing<Vec<u8>> {
        match self.transform {
            None => self.key.clone(),
            Some(d) => d.hmac(&self.key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn hmac_known_answers() {
        // RFC 4231 test case 2.
        let (key, data) = (b"Jefe".as_slice(), b"what do ya want for nothing?".as_slice());
        assert_eq!(*Digest::Sha256.hmac(key, &[&data[..4], &data[4..]]), hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"));
        assert_eq!(*Digest::Sha384.hmac(key, &[data]), hex("af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649"));
        assert_eq!(
            *Digest::Sha512.hmac(key, &[data]),
            hex("164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737")
        );
    }

    #[test]
    fn secret_round_trip_and_transform() {
        let key: Vec<u8> = (0u8..32).collect();
        let text = Secret::encode(Some(Digest::Sha256), &key);
        assert!(text.starts_with("DHHC-1:01:") && text.ends_with(':'));
        let s = Secret::parse(format!("{text}\n").as_bytes()).unwrap();
        let nqn = "nqn.2014-08.org.nvmexpress:uuid:h1";
        // The transform's definition: HMAC-SHA-256(key, NQN || "NVMe-over-Fabrics").
        let want = Digest::Sha256.hmac(&key, &[format!("{nqn}NVMe-over-Fabrics").as_bytes()]);
        assert_eq!(*s.transform(nqn), *want);
        assert_ne!(*s.transform("nqn.other"), *want);
        let plain = Secret::parse(Secret::encode(None, &key).as_bytes()).unwrap();
        assert_eq!(*plain.transform(nqn), key);
    }

    #[test]
    fn bad_secrets_are_refused() {
        let key = [7u8; 48];
        let good = Secret::encode(None, &key);
        assert!(Secret::parse(good.as_bytes()).is_ok());
        // A flipped base64 character breaks the CRC.
        let mut b = good.clone().into_bytes();
        b[12] = if b[12] == b'A' { b'B' } else { b'A' };
        assert_eq!(Secret::parse(&b).unwrap_err(), SecretError::Crc);
        assert_eq!(Secret::parse(Secret::encode(None, &[1u8; 20]).as_bytes()).unwrap_err(), SecretError::Length);
        for bad in ["", "DHHC-1:", "DHHC-1:04:AAAA:", "DHHC-2:00:AAAA:", &good[..good.len() - 1], "DHHC-1:00:!!!!:", "DHHC-1:00::"] {
            assert!(Secret::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        // The key never shows in Debug output.
        let s = Secret::parse(good.as_bytes()).unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<48 bytes>)");
    }
}
