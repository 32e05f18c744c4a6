//! NVMe/TCP over TLS 1.3 with pre-shared keys (NVMe TCP transport specification, TP 8011).
//!
//! A listener added with `secure_channel` speaks TLS only: the host offers a PSK identity
//! ("NVMe0R01 <hostnqn> <subnqn>"), the target finds that host's PSK on that subsystem
//! (`nvmf_subsystem_add_host --psk <keyring key>`), derives the TLS key from it and the two
//! sides prove they hold it; a host without a matching key, a plain NVMe/TCP connection and a
//! handshake cut short are refused before a single NVMe PDU is read. The Connect that follows
//! must name the host and subsystem of the identity the handshake proved.
//!
//! OpenSSL (Debian's libssl) does the TLS. Its Rust binding has no call for TLS 1.3 external
//! PSKs, so the session callback below is declared here from OpenSSL's C API (SSL_CTX_set_
//! psk_find_session_callback, OpenSSL 1.1.1 and later): it builds the resumption-style session
//! OpenSSL expects from the derived key and the suite the identity names.

pub mod psk;

pub use psk::{ConfiguredPsk, PskError, PskIdentity, Suite};

use foreign_types::ForeignTypeRef;
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslRef, SslVerifyMode, SslVersion};
use openssl_sys as ffi;
use std::os::raw::{c_int, c_uchar};
use std::sync::OnceLock;
use zeroize::Zeroizing;

/// Finds the TLS key for a host's identity (None: the host is refused).
pub type PskLookup = dyn Fn(&PskIdentity) -> Option<Zeroizing<Vec<u8>>> + Send + Sync;

struct Lookup(Box<PskLookup>);

type FindSessionCb = unsafe extern "C" fn(*mut ffi::SSL, *const c_uchar, usize, *mut *mut ffi::SSL_SESSION) -> c_int;
type UseSessionCb = unsafe extern "C" fn(*mut ffi::SSL, *const ffi::EVP_MD, *mut *const c_uchar, *mut usize, *mut *mut ffi::SSL_SESSION) -> c_int;

extern "C" {
    fn SSL_CTX_set_psk_find_session_callback(ctx: *mut ffi::SSL_CTX, cb: Option<FindSessionCb>);
    fn SSL_CTX_set_psk_use_session_callback(ctx: *mut ffi::SSL_CTX, cb: Option<UseSessionCb>);
    fn SSL_SESSION_new() -> *mut ffi::SSL_SESSION;
    fn SSL_SESSION_set1_master_key(s: *mut ffi::SSL_SESSION, key: *const c_uchar, len: usize) -> c_int;
    fn SSL_SESSION_set_cipher(s: *mut ffi::SSL_SESSION, cipher: *const ffi::SSL_CIPHER) -> c_int;
    fn SSL_SESSION_set_protocol_version(s: *mut ffi::SSL_SESSION, version: c_int) -> c_int;
    fn SSL_CIPHER_find(ssl: *mut ffi::SSL, code: *const c_uchar) -> *const ffi::SSL_CIPHER;
}

const TLS1_3_VERSION: c_int = 0x0304;

fn lookup_index() -> Result<Index<SslContext, Lookup>, ErrorStack> {
    static I: OnceLock<Index<SslContext, Lookup>> = OnceLock::new();
    if let Some(i) = I.get() {
        return Ok(*i);
    }
    let i = SslContext::new_ex_index()?;
    Ok(*I.get_or_init(|| i))
}

fn identity_index() -> Result<Index<Ssl, PskIdentity>, ErrorStack> {
    static I: OnceLock<Index<Ssl, PskIdentity>> = OnceLock::new();
    if let Some(i) = I.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index()?;
    Ok(*I.get_or_init(|| i))
}

/// The TLS settings of every secure listener: TLS 1.3 only, the two NVMe/TCP suites, PSK
/// authentication only (no certificate: a host without a key cannot complete a handshake),
/// no session tickets (NVMe/TCP does not resume sessions).
pub fn server_context(lookup: Box<PskLookup>) -> Result<SslContext, ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites("TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")?;
    // A peer that closes without close_notify ends the stream like a TCP FIN; whether that
    // cut a PDU is the NVMe/TCP layer's to judge.
    b.set_options(SslOptions::NO_TICKET | SslOptions::IGNORE_UNEXPECTED_EOF);
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    b.set_num_tickets(0)?;
    // Read what the socket has into OpenSSL's buffer in one system call, not a record header
    // and a body in two each: a host's small command records arrive many at a time.
    b.set_read_ahead(true);
    b.set_ex_data(lookup_index()?, Lookup(lookup));
    // SAFETY: `b` is a live SSL_CTX and the callback matches OpenSSL's prototype.
    unsafe { SSL_CTX_set_psk_find_session_callback(b.as_ptr(), Some(find_session)) };
    Ok(b.build())
}

/// What a host offers: its identity and the TLS key derived for it.
struct ClientPsk {
    identity: Vec<u8>,
    suite: Suite,
    key: Zeroizing<Vec<u8>>,
}

fn client_index() -> Result<Index<SslContext, ClientPsk>, ErrorStack> {
    static I: OnceLock<Index<SslContext, ClientPsk>> = OnceLock::new();
    if let Some(i) = I.get() {
        return Ok(*i);
    }
    let i = SslContext::new_ex_index()?;
    Ok(*I.get_or_init(|| i))
}

/// The host side (tidemark's NVMe/TCP initiator): TLS 1.3 with `psk` for `hostnqn` on
/// `subnqn`, offering the identity "NVMe0R0<suite> <hostnqn> <subnqn>" and only the suite the
/// key is for. The target is authenticated by the key alone (no certificate).
pub fn client_context(psk: &ConfiguredPsk, hostnqn: &str, subnqn: &str) -> Result<SslContext, String> {
    let id = PskIdentity { suite: psk.suite, hostnqn: hostnqn.to_string(), subnqn: subnqn.to_string() };
    let identity = id.text();
    let key = psk.tls_psk(hostnqn, &identity).ok_or("the PSK identity is longer than 255 bytes")?;
    let build = || -> Result<SslContext, ErrorStack> {
        let mut b = SslContextBuilder::new(SslMethod::tls_client())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_ciphersuites(psk.suite.name())?;
        b.set_options(SslOptions::NO_TICKET | SslOptions::IGNORE_UNEXPECTED_EOF);
        b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
        b.set_verify(SslVerifyMode::NONE);
        b.set_ex_data(client_index()?, ClientPsk { identity: identity.into_bytes(), suite: psk.suite, key });
        // SAFETY: `b` is a live SSL_CTX and the callback matches OpenSSL's prototype.
        unsafe { SSL_CTX_set_psk_use_session_callback(b.as_ptr(), Some(use_session)) };
        Ok(b.build())
    };
    build().map_err(|e| format!("cannot set up TLS: {e}"))
}

/// A PSK session for `cipher` holding `key` (None when OpenSSL cannot make one).
unsafe fn psk_session(ssl: *mut ffi::SSL, suite: Suite, key: &[u8]) -> Option<*mut ffi::SSL_SESSION> {
    let cipher = SSL_CIPHER_find(ssl, suite.iana().as_ptr());
    if cipher.is_null() {
        return None;
    }
    let sess = SSL_SESSION_new();
    if sess.is_null() {
        return None;
    }
    if SSL_SESSION_set1_master_key(sess, key.as_ptr(), key.len()) != 1
        || SSL_SESSION_set_cipher(sess, cipher) != 1
        || SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION) != 1
    {
        ffi::SSL_SESSION_free(sess);
        return None;
    }
    Some(sess)
}

/// OpenSSL asks the host which PSK to offer: the identity and session its context holds.
unsafe extern "C" fn use_session(ssl: *mut ffi::SSL, _md: *const ffi::EVP_MD, id: *mut *const c_uchar, idlen: *mut usize, out: *mut *mut ffi::SSL_SESSION) -> c_int {
    *out = std::ptr::null_mut();
    // SAFETY: OpenSSL passes the live SSL of this handshake.
    let r = SslRef::from_ptr(ssl);
    let Ok(ci) = client_index() else { return 0 };
    let Some(c) = r.ssl_context().ex_data(ci) else { return 0 };
    let Some(sess) = psk_session(ssl, c.suite, &c.key) else { return 0 };
    // The identity lives in the context, which outlives the handshake.
    *id = c.identity.as_ptr();
    *idlen = c.identity.len();
    *out = sess;
    1
}

/// The identity the handshake of `ssl` proved (None before a handshake, or on a plain one).
pub fn proven_identity(ssl: &SslRef) -> Option<PskIdentity> {
    ssl.ex_data(identity_index().ok()?).cloned()
}

/// OpenSSL asks for the PSK session of the identity a client offers. Returning 1 with no
/// session means "no key for it": the handshake then fails for want of a certificate, which
/// is the refusal. 0 aborts the handshake (an internal failure).
unsafe extern "C" fn find_session(ssl: *mut ffi::SSL, id: *const c_uchar, len: usize, out: *mut *mut ffi::SSL_SESSION) -> c_int {
    *out = std::ptr::null_mut();
    if id.is_null() {
        return 1;
    }
    // SAFETY: OpenSSL passes the live SSL of this handshake and the identity's bytes.
    let ssl = SslRef::from_ptr_mut(ssl);
    let offered = std::slice::from_raw_parts(id, len);
    let Some(identity) = PskIdentity::parse(offered) else {
        log::warn!("nvmf: TLS: a host offered a PSK identity that is not NVMe's ({} bytes); refused", offered.len());
        return 1;
    };
    let (Ok(li), Ok(ii)) = (lookup_index(), identity_index()) else { return 0 };
    let Some(lookup) = ssl.ssl_context().ex_data(li) else { return 0 };
    let Some(key) = (lookup.0)(&identity) else { return 1 };
    let Some(sess) = psk_session(ssl.as_ptr(), identity.suite, &key) else { return 0 };
    ssl.set_ex_data(ii, identity);
    *out = sess;
    1
}

#[cfg(test)]
mod tests;
