//! The finite-field Diffie-Hellman groups of RFC 7919 that DH-HMAC-CHAP negotiates, and the
//! exchange itself (g = 2 for every group). The primes are the RFC's constants, checked in the
//! tests against their defining form p = 2^b - 2^(b-64) + (...) * 2^64 - 1 ends and safe-prime
//! size.

use num_bigint::BigUint;

/// A DH group identifier as the NVMe specification numbers them (DHGID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DhGroup {
    Null,
    Ffdhe2048,
    Ffdhe3072,
    Ffdhe4096,
    Ffdhe6144,
    Ffdhe8192,
}

impl DhGroup {
    pub const ALL: [DhGroup; 6] = [DhGroup::Null, DhGroup::Ffdhe2048, DhGroup::Ffdhe3072, DhGroup::Ffdhe4096, DhGroup::Ffdhe6144, DhGroup::Ffdhe8192];

    pub fn id(self) -> u8 {
        self as u8
    }

    pub fn from_id(id: u8) -> Option<DhGroup> {
        DhGroup::ALL.get(id as usize).copied()
    }

    /// SPDK's spelling in `nvmf_set_config`.
    pub fn name(self) -> &'static str {
        match self {
            DhGroup::Null => "null",
            DhGroup::Ffdhe2048 => "ffdhe2048",
            DhGroup::Ffdhe3072 => "ffdhe3072",
            DhGroup::Ffdhe4096 => "ffdhe4096",
            DhGroup::Ffdhe6144 => "ffdhe6144",
            DhGroup::Ffdhe8192 => "ffdhe8192",
        }
    }

    pub fn from_name(name: &str) -> Option<DhGroup> {
        DhGroup::ALL.into_iter().find(|g| g.name() == name)
    }

    /// Bytes of a public value and of the shared secret (the prime's size); 0 for the null group.
    pub fn len(self) -> usize {
        match self {
            DhGroup::Null => 0,
            DhGroup::Ffdhe2048 => 256,
            DhGroup::Ffdhe3072 => 384,
            DhGroup::Ffdhe4096 => 512,
            DhGroup::Ffdhe6144 => 768,
            DhGroup::Ffdhe8192 => 1024,
        }
    }

    fn prime(self) -> Option<BigUint> {
        let hex = match self {
            DhGroup::Null => return None,
            DhGroup::Ffdhe2048 => FFDHE2048,
            DhGroup::Ffdhe3072 => FFDHE3072,
            DhGroup::Ffdhe4096 => FFDHE4096,
            DhGroup::Ffdhe6144 => FFDHE6144,
            DhGroup::Ffdhe8192 => FFDHE8192,
        };
        BigUint::parse_bytes(hex.as_bytes(), 16)
    }
}

/// Bits of a private exponent. RFC 7919 §5.2 asks for at least twice the group's security
/// strength (ffdhe8192: ~192 bits); 512 bits covers every group and keeps the exponentiation
/// of the largest group cheap enough for a login.
const PRIVATE_BITS: usize = 512;

/// One side's ephemeral key pair.
pub struct KeyPair {
    group: DhGroup,
    p: BigUint,
    /// The private exponent. num-bigint has no zeroizing storage: it is wiped from the stack
    /// copy only; it lives for one transaction.
    x: BigUint,
    /// g^x mod p, big-endian, padded to the group's size.
    pub public: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DhError {
    #[error("the null group has no key exchange")]
    NullGroup,
    #[error("the OS random source failed")]
    Random,
    #[error("the peer's public value is out of range")]
    BadPublic,
}

impl KeyPair {
    /// A fresh key pair from the OS CSPRNG.
    pub fn generate(group: DhGroup) -> Result<KeyPair, DhError> {
        let p = group.prime().ok_or(DhError::NullGroup)?;
        let mut bytes = zeroize::Zeroizing::new([0u8; PRIVATE_BITS / 8]);
        getrandom::fill(&mut bytes[..]).map_err(|_| DhError::Random)?;
        // A private key of 0 or 1 would give a trivial public value.
        bytes[0] |= 0x80;
        let x = BigUint::from_bytes_be(&bytes[..]);
        Ok(KeyPair::from_private(group, p, x))
    }

    fn from_private(group: DhGroup, p: BigUint, x: BigUint) -> KeyPair {
        let public = pad(&BigUint::from(2u8).modpow(&x, &p), group.len());
        KeyPair { group, p, x, public }
    }

    /// The shared secret with the peer's public value (padded to the group's size); refuses
    /// values outside [2, p-2], which would force the secret to a known value.
    pub fn shared(&self, peer: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, DhError> {
        if peer.len() != self.group.len() {
            return Err(DhError::BadPublic);
        }
        let y = BigUint::from_bytes_be(peer);
        let two = BigUint::from(2u8);
        if y < two || y > &self.p - &two {
            return Err(DhError::BadPublic);
        }
        Ok(zeroize::Zeroizing::new(pad(&y.modpow(&self.x, &self.p), self.group.len())))
    }
}

/// `v` big-endian, left-padded with zeros to `len` bytes (v < p, so it fits).
fn pad(v: &BigUint, len: usize) -> Vec<u8> {
    let b = v.to_bytes_be();
    debug_assert!(b.len() <= len);
    let mut out = vec![0u8; len - b.len()];
    out.extend_from_slice(&b);
    out
}

const FFDHE2048: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9",
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB",
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA",
    "886B423861285C97FFFFFFFFFFFFFFFF",
);

const FFDHE3072: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9",
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB",
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA",
    "886B4238611FCFDCDE355B3B6519035BBC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF5CAE82AB9C9DF69EE86D2BC522363A0D",
    "ABC521979B0DEADA1DBF9A42D5C4484E0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B66C62E37FFFFFFFFFFFFFFFF",
);

const FFDHE4096: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9",
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB",
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA",
    "886B4238611FCFDCDE355B3B6519035BBC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF5CAE82AB9C9DF69EE86D2BC522363A0D",
    "ABC521979B0DEADA1DBF9A42D5C4484E0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A7135C886EFB4318AED6A1E012D9E6832",
    "A907600A918130C46DC778F971AD0038092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E655F6AFFFFFFFFFFFFFFFF",
);

const FFDHE6144: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9",
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB",
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA",
    "886B4238611FCFDCDE355B3B6519035BBC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF5CAE82AB9C9DF69EE86D2BC522363A0D",
    "ABC521979B0DEADA1DBF9A42D5C4484E0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A7135C886EFB4318AED6A1E012D9E6832",
    "A907600A918130C46DC778F971AD0038092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E0DD9020BFD64B645036C7A4E677D2C38532A3A23BA4442CAF53EA6",
    "3BB454329B7624C8917BDD64B1C0FD4CB38E8C334C701C3ACDAD0657FCCFEC719B1F5C3E4E46041F388147FB4CFDB477",
    "A52471F7A9A96910B855322EDB6340D8A00EF092350511E30ABEC1FFF9E3A26E7FB29F8C183023C3587E38DA0077D9B4",
    "763E4E4B94B2BBC194C6651E77CAF992EEAAC0232A281BF6B3A739C1226116820AE8DB5847A67CBEF9C9091B462D538C",
    "D72B03746AE77F5E62292C311562A846505DC82DB854338AE49F5235C95B91178CCF2DD5CACEF403EC9D1810C6272B04",
    "5B3B71F9DC6B80D63FDD4A8E9ADB1E6962A69526D43161C1A41D570D7938DAD4A40E329CD0E40E65FFFFFFFFFFFFFFFF",
);

const FFDHE8192: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9",
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB",
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA",
    "886B4238611FCFDCDE355B3B6519035BBC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF5CAE82AB9C9DF69EE86D2BC522363A0D",
    "ABC521979B0DEADA1DBF9A42D5C4484E0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A7135C886EFB4318AED6A1E012D9E6832",
    "A907600A918130C46DC778F971AD0038092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E0DD9020BFD64B645036C7A4E677D2C38532A3A23BA4442CAF53EA6",
    "3BB454329B7624C8917BDD64B1C0FD4CB38E8C334C701C3ACDAD0657FCCFEC719B1F5C3E4E46041F388147FB4CFDB477",
    "A52471F7A9A96910B855322EDB6340D8A00EF092350511E30ABEC1FFF9E3A26E7FB29F8C183023C3587E38DA0077D9B4",
    "763E4E4B94B2BBC194C6651E77CAF992EEAAC0232A281BF6B3A739C1226116820AE8DB5847A67CBEF9C9091B462D538C",
    "D72B03746AE77F5E62292C311562A846505DC82DB854338AE49F5235C95B91178CCF2DD5CACEF403EC9D1810C6272B04",
    "5B3B71F9DC6B80D63FDD4A8E9ADB1E6962A69526D43161C1A41D570D7938DAD4A40E329CCFF46AAA36AD004CF600C838",
    "1E425A31D951AE64FDB23FCEC9509D43687FEB69EDD1CC5E0B8CC3BDF64B10EF86B63142A3AB8829555B2F747C932665",
    "CB2C0F1CC01BD70229388839D2AF05E454504AC78B7582822846C0BA35C35F5C59160CC046FD8251541FC68C9C86B022",
    "BB7099876A460E7451A8A93109703FEE1C217E6C3826E52C51AA691E0E423CFC99E9E31650C1217B624816CDAD9A95F9",
    "D5B8019488D9C0A0A1FE3075A577E23183F81D4A3F2FA4571EFC8CE0BA8A4FE8B6855DFE72B0A66EDED2FBABFBE58A30",
    "FAFABE1C5D71A87E2F741EF8C1FE86FEA6BBFDE530677F0D97D11D49F7A8443D0822E506A9F4614E011E2A94838FF88C",
    "D68C8BB7C5C6424CFFFFFFFFFFFFFFFF",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_have_the_rfc_7919_shape() {
        for g in &DhGroup::ALL[1..] {
            let p = g.prime().unwrap();
            let bits = g.len() * 8;
            assert_eq!(p.bits() as usize, bits, "{g:?}");
            // The top and bottom 64 bits are all ones by construction.
            let ones = (BigUint::from(1u8) << 64u32) - 1u8;
            assert_eq!(&p & &ones, ones, "{g:?}");
            assert_eq!(&p >> (bits - 64), ones, "{g:?}");
            // The next 64 bits are those of e's fraction (2^(b-130) * e starts 0xADF85458A2BB4A9A).
            assert_eq!(((&p >> (bits - 128)) & &ones), BigUint::from(0xADF8_5458_A2BB_4A9Au64), "{g:?}");
            // A safe prime: q = (p-1)/2 passes a Fermat test base 2 as p does.
            let q = (&p - 1u8) >> 1u32;
            assert_eq!(BigUint::from(2u8).modpow(&(&p - 1u8), &p), BigUint::from(1u8));
            assert_eq!(BigUint::from(3u8).modpow(&(&q - 1u8), &q), BigUint::from(1u8));
        }
    }

    #[test]
    fn both_sides_derive_the_same_secret() {
        for g in [DhGroup::Ffdhe2048, DhGroup::Ffdhe4096] {
            let (a, b) = (KeyPair::generate(g).unwrap(), KeyPair::generate(g).unwrap());
            assert_eq!(a.public.len(), g.len());
            assert_eq!(*a.shared(&b.public).unwrap(), *b.shared(&a.public).unwrap());
            assert_ne!(a.public, b.public);
        }
    }

    #[test]
    fn degenerate_public_values_are_refused() {
        let g = DhGroup::Ffdhe2048;
        let k = KeyPair::generate(g).unwrap();
        let p = g.prime().unwrap();
        for bad in [BigUint::from(0u8), BigUint::from(1u8), &p - 1u8, p.clone()] {
            assert_eq!(k.shared(&pad(&bad, 256)), Err(DhError::BadPublic));
        }
        assert_eq!(k.shared(&[2u8; 255]), Err(DhError::BadPublic));
        assert_eq!(KeyPair::generate(DhGroup::Null).err(), Some(DhError::NullGroup));
    }

    #[test]
    fn small_known_answer() {
        // g^x with x = 1 is g itself.
        let g = DhGroup::Ffdhe2048;
        let k = KeyPair::from_private(g, g.prime().unwrap(), BigUint::from(1u8));
        assert_eq!(k.public[255], 2);
        assert!(k.public[..255].iter().all(|&b| b == 0));
    }
}
