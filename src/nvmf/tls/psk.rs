//! NVMe/TCP TLS pre-shared keys (NVMe TCP transport specification, TP 8011): the PSK
//! interchange format `NVMeTLSkey-1:<hh>:<base64(key || crc32)>:` that `nvme gen-tls-key` and
//! SPDK write, the PSK identity a host offers, and the two derivations from the configured key
//! to the key TLS uses (retained PSK with the host's NQN, then TLS PSK with the identity).

use base64::Engine as _;
use hkdf::Hkdf;
use sha2::{Sha256, Sha384};
use zeroize::Zeroizing;

/// The two TLS 1.3 cipher suites NVMe/TCP uses; which one follows from the key's length
/// (32 bytes: SHA-256, 48: SHA-384), as SPDK and Linux decide it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128GcmSha256,
    Aes256GcmSha384,
}

impl Suite {
    fn for_key_len(n: usize) -> Option<Suite> {
        match n {
            32 => Some(Suite::Aes128GcmSha256),
            48 => Some(Suite::Aes256GcmSha384),
            _ => None,
        }
    }

    /// Bytes of the suite's hash (and of its PSK).
    pub fn hash_len(self) -> usize {
        match self {
            Suite::Aes128GcmSha256 => 32,
            Suite::Aes256GcmSha384 => 48,
        }
    }

    /// The suite's number in the PSK identity ("NVMe0R01 ...", "NVMe0R02 ...").
    fn id(self) -> u8 {
        match self {
            Suite::Aes128GcmSha256 => 1,
            Suite::Aes256GcmSha384 => 2,
        }
    }

    /// IANA's two-byte code of the suite (RFC 8446 appendix B.4).
    pub fn iana(self) -> [u8; 2] {
        match self {
            Suite::Aes128GcmSha256 => [0x13, 0x01],
            Suite::Aes256GcmSha384 => [0x13, 0x02],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128GcmSha256 => "TLS_AES_128_GCM_SHA256",
            Suite::Aes256GcmSha384 => "TLS_AES_256_GCM_SHA384",
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PskError {
    #[error("not an NVMe TLS PSK (expected NVMeTLSkey-1:<00|01|02>:<base64>:)")]
    Format,
    #[error("the PSK must be 32 or 48 bytes (the hash field 01 needs 32, 02 needs 48)")]
    Length,
    #[error("the PSK's CRC-32 does not match its key")]
    Crc,
}

/// A configured PSK, parsed from its interchange form.
pub struct ConfiguredPsk {
    key: Zeroizing<Vec<u8>>,
    /// The hash that turns it into the retained PSK (None: the key is the retained PSK).
    retain_with: Option<Suite>,
    pub suite: Suite,
}

impl std::fmt::Debug for ConfiguredPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfiguredPsk({}, {} bytes)", self.suite.name(), self.key.len())
    }
}

impl ConfiguredPsk {
    pub fn parse(text: &[u8]) -> Result<ConfiguredPsk, PskError> {
        let text = std::str::from_utf8(text).map_err(|_| PskError::Format)?;
        let rest = text.strip_prefix("NVMeTLSkey-1:").ok_or(PskError::Format)?;
        let (hash, rest) = rest.split_once(':').ok_or(PskError::Format)?;
        let b64 = rest.strip_suffix(':').ok_or(PskError::Format)?;
        let retain_with = match hash {
            "00" => None,
            "01" => Some(Suite::Aes128GcmSha256),
            "02" => Some(Suite::Aes256GcmSha384),
            _ => return Err(PskError::Format),
        };
        let raw = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| PskError::Format)?);
        let n = raw.len().checked_sub(4).ok_or(PskError::Length)?;
        let suite = Suite::for_key_len(n).ok_or(PskError::Length)?;
        if retain_with.is_some_and(|r| r != suite) {
            return Err(PskError::Length);
        }
        let crc = u32::from_le_bytes([raw[n], raw[n + 1], raw[n + 2], raw[n + 3]]);
        if crc32fast::hash(&raw[..n]) != crc {
            return Err(PskError::Crc);
        }
        Ok(ConfiguredPsk { key: Zeroizing::new(raw[..n].to_vec()), retain_with, suite })
    }

    /// The retained PSK of `hostnqn`: HKDF of the configured key with the label "HostNQN"
    /// and the host's NQN, or the configured key itself when its hash field is 00.
    /// None when the NQN is longer than the derivation can frame (255 bytes).
    pub fn retained(&self, hostnqn: &str) -> Option<Zeroizing<Vec<u8>>> {
        match self.retain_with {
            None => Some(self.key.clone()),
            Some(s) => expand(s, &self.key, "HostNQN", hostnqn),
        }
    }

    /// The key TLS uses for `identity` (None when the identity is longer than 255 bytes).
    pub fn tls_psk(&self, hostnqn: &str, identity: &str) -> Option<Zeroizing<Vec<u8>>> {
        expand(self.suite, &self.retained(hostnqn)?, "nvme-tls-psk", identity)
    }
}

/// HKDF (RFC 5869, empty salt) of `key` with the TLS 1.3 style info the NVMe/TCP
/// specification gives: the output length (u16, big endian), then "tls13 " + `label` and
/// `context`, each behind its length byte. The output is one hash long. None when `context`
/// does not fit its length byte.
fn expand(s: Suite, key: &[u8], label: &str, context: &str) -> Option<Zeroizing<Vec<u8>>> {
    let label = format!("tls13 {label}");
    let mut info = Vec::with_capacity(4 + label.len() + context.len());
    info.extend_from_slice(&(key.len() as u16).to_be_bytes());
    info.push(label.len() as u8);
    info.extend_from_slice(label.as_bytes());
    info.push(u8::try_from(context.len()).ok()?);
    info.extend_from_slice(context.as_bytes());
    let mut out = Zeroizing::new(vec![0u8; s.hash_len()]);
    let ok = match s {
        Suite::Aes128GcmSha256 => Hkdf::<Sha256>::new(Some(&[]), key).expand(&info, &mut out),
        Suite::Aes256GcmSha384 => Hkdf::<Sha384>::new(Some(&[]), key).expand(&info, &mut out),
    };
    // One hash of output is always within HKDF's limit (255 hashes).
    assert!(ok.is_ok(), "HKDF output of one hash length");
    Some(out)
}

/// What a host's PSK identity names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PskIdentity {
    pub suite: Suite,
    pub hostnqn: String,
    pub subnqn: String,
}

impl PskIdentity {
    /// "NVMe0R0<1|2> <hostnqn> <subnqn>" (identity version 0, a configured PSK): the form
    /// SPDK's host and Linux's `nvme connect --tls` send. Version 1 identities (with a PSK
    /// digest, TP 8018) are not accepted.
    pub fn parse(id: &[u8]) -> Option<PskIdentity> {
        let id = std::str::from_utf8(id).ok()?;
        let rest = id.strip_prefix("NVMe0R0")?;
        let mut parts = rest.split(' ');
        let suite = match parts.next()? {
            "1" => Suite::Aes128GcmSha256,
            "2" => Suite::Aes256GcmSha384,
            _ => return None,
        };
        let (hostnqn, subnqn) = (parts.next()?, parts.next()?);
        // The identity is framed behind a length byte in the key derivation.
        if parts.next().is_some() || hostnqn.is_empty() || subnqn.is_empty() || id.len() > 255 {
            return None;
        }
        Some(PskIdentity { suite, hostnqn: hostnqn.to_string(), subnqn: subnqn.to_string() })
    }

    pub fn text(&self) -> String {
        format!("NVMe0R0{} {} {}", self.suite.id(), self.hostnqn, self.subnqn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interchange(hash: &str, key: &[u8]) -> String {
        let mut raw = key.to_vec();
        raw.extend_from_slice(&crc32fast::hash(key).to_le_bytes());
        format!("NVMeTLSkey-1:{hash}:{}:", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    #[test]
    fn interchange_keys_parse_and_pick_their_suite() {
        let k32 = [7u8; 32];
        let k48 = [9u8; 48];
        assert_eq!(ConfiguredPsk::parse(interchange("01", &k32).as_bytes()).unwrap().suite, Suite::Aes128GcmSha256);
        assert_eq!(ConfiguredPsk::parse(interchange("02", &k48).as_bytes()).unwrap().suite, Suite::Aes256GcmSha384);
        assert_eq!(ConfiguredPsk::parse(interchange("00", &k48).as_bytes()).unwrap().suite, Suite::Aes256GcmSha384);
        // The hash field and the length must agree; the CRC must match; the frame must be whole.
        assert_eq!(ConfiguredPsk::parse(interchange("01", &k48).as_bytes()).unwrap_err(), PskError::Length);
        assert_eq!(ConfiguredPsk::parse(interchange("00", &[1u8; 40]).as_bytes()).unwrap_err(), PskError::Length);
        let mut bad = interchange("01", &k32);
        bad.replace_range(20..21, if &bad[20..21] == "A" { "B" } else { "A" });
        assert!(matches!(ConfiguredPsk::parse(bad.as_bytes()).unwrap_err(), PskError::Crc | PskError::Format));
        let good = interchange("01", &k32);
        assert_eq!(ConfiguredPsk::parse(good.trim_end_matches(':').as_bytes()).unwrap_err(), PskError::Format);
        assert_eq!(ConfiguredPsk::parse(good.replace(":01:", ":03:").as_bytes()).unwrap_err(), PskError::Format);
        assert_eq!(ConfiguredPsk::parse(b"DHHC-1:00:abc:").unwrap_err(), PskError::Format);
    }

    #[test]
    fn derivation_depends_on_host_identity_and_hash_field() {
        let k = [3u8; 32];
        let retained = ConfiguredPsk::parse(interchange("01", &k).as_bytes()).unwrap();
        let plain = ConfiguredPsk::parse(interchange("00", &k).as_bytes()).unwrap();
        // Hash field 00: the configured key is the retained key; 01: it is derived per host.
        assert_eq!(*plain.retained("nqn.h1").unwrap(), k.to_vec());
        assert_ne!(*retained.retained("nqn.h1").unwrap(), k.to_vec());
        assert_ne!(retained.retained("nqn.h1"), retained.retained("nqn.h2"));
        let id = PskIdentity { suite: Suite::Aes128GcmSha256, hostnqn: "nqn.h1".into(), subnqn: "nqn.s".into() };
        let a = retained.tls_psk("nqn.h1", &id.text()).unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(Some(a.clone()), retained.tls_psk("nqn.h1", &id.text()));
        assert_ne!(Some(a), retained.tls_psk("nqn.h1", "NVMe0R01 nqn.h1 nqn.t"));
        let k48 = ConfiguredPsk::parse(interchange("02", &[5u8; 48]).as_bytes()).unwrap();
        assert_eq!(k48.tls_psk("nqn.h1", "NVMe0R02 nqn.h1 nqn.s").unwrap().len(), 48);
        assert_eq!(k48.tls_psk("nqn.h1", &"x".repeat(256)), None);
    }

    #[test]
    fn hkdf_matches_rfc5869_with_the_nvme_info() {
        // RFC 5869 A.3 (SHA-256, empty salt and info) checks the HKDF underneath; the info
        // framing is checked by interoperating with SPDK's host (tests/nvmf_tls.rs).
        let ikm = [0x0bu8; 22];
        let mut okm = [0u8; 42];
        Hkdf::<Sha256>::new(Some(&[]), &ikm).expand(&[], &mut okm).unwrap();
        assert_eq!(okm[..8], [0x8d, 0xa4, 0xe7, 0x75, 0xa5, 0x63, 0xc1, 0x8f]);
    }

    #[test]
    fn identities_parse_and_print() {
        let id = PskIdentity::parse(b"NVMe0R01 nqn.2014-08.org.nvmexpress:uuid:1 nqn.2016-06.io.spdk:cnode1").unwrap();
        assert_eq!(id.suite, Suite::Aes128GcmSha256);
        assert_eq!(id.hostnqn, "nqn.2014-08.org.nvmexpress:uuid:1");
        assert_eq!(id.text(), "NVMe0R01 nqn.2014-08.org.nvmexpress:uuid:1 nqn.2016-06.io.spdk:cnode1");
        assert_eq!(PskIdentity::parse(b"NVMe0R02 a b").unwrap().suite, Suite::Aes256GcmSha384);
        for bad in [&b"NVMe1R01 a b c"[..], b"NVMe0R03 a b", b"NVMe0R01 a", b"NVMe0R01 a b c", b"NVMe0R01  b", b"psk.spdk.io", b"\xff"] {
            assert_eq!(PskIdentity::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
