//! Handshakes between the target's context and an OpenSSL client on a loopback socket.
//! Interoperability with other hosts' key derivation is tested against SPDK's host
//! (tests/nvmf_tls.rs); these check the refusals and what the handshake proves.

use super::*;
use openssl::ssl::SslConnector;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const SUB: &str = "nqn.2016-06.io.tidemark:tls";

fn server_key() -> ConfiguredPsk {
    let mut raw = vec![0x42u8; 32];
    raw.extend_from_slice(&crc32fast::hash(&[0x42u8; 32]).to_le_bytes());
    use base64::Engine as _;
    let text = format!("NVMeTLSkey-1:01:{}:", base64::engine::general_purpose::STANDARD.encode(raw));
    ConfiguredPsk::parse(text.as_bytes()).unwrap()
}

/// The target's lookup: one host on one subsystem.
fn context() -> SslContext {
    let key = server_key();
    server_context(Box::new(move |id: &PskIdentity| {
        if id.hostnqn == HOST && id.subnqn == SUB && id.suite == key.suite {
            key.tls_psk(&id.hostnqn, &id.text())
        } else {
            None
        }
    }))
    .unwrap()
}

/// Runs a handshake: the client offers `identity` with `key` (TLS 1.3, SHA-256 suite through
/// OpenSSL's client PSK callback) and sends "ping"; returns what the server proved and read.
fn handshake(identity: &'static str, key: Vec<u8>) -> Result<(Option<PskIdentity>, Vec<u8>), String> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_min_proto_version(Some(SslVersion::TLS1_3)).unwrap();
        b.set_ciphersuites("TLS_AES_128_GCM_SHA256").unwrap();
        b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
            id_out[..identity.len()].copy_from_slice(identity.as_bytes());
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let c = b.build();
        let s = TcpStream::connect(addr).unwrap();
        let mut conf = c.configure().unwrap();
        conf.set_verify_hostname(false);
        conf.set_verify(openssl::ssl::SslVerifyMode::NONE);
        if let Ok(mut t) = conf.connect("target", s) {
            let _ = t.write_all(b"ping");
            let _ = t.flush();
            let mut sink = [0u8; 1];
            let _ = t.read(&mut sink);
        }
    });
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let ctx = context();
    let r = match Ssl::new(&ctx).unwrap().accept(s) {
        Ok(mut t) => {
            let mut got = vec![0u8; 4];
            t.read_exact(&mut got).map_err(|e| e.to_string())?;
            let id = proven_identity(t.ssl());
            let _ = t.shutdown();
            Ok((id, got))
        }
        Err(e) => Err(e.to_string()),
    };
    client.join().unwrap();
    r
}

fn good_identity() -> &'static str {
    Box::leak(format!("NVMe0R01 {HOST} {SUB}").into_boxed_str())
}

#[test]
fn a_host_with_its_key_completes_the_handshake_and_is_proven() {
    let id = good_identity();
    let key = server_key().tls_psk(HOST, id).unwrap().to_vec();
    let (proven, got) = handshake(id, key).expect("handshake");
    assert_eq!(got, b"ping");
    assert_eq!(proven, Some(PskIdentity { suite: Suite::Aes128GcmSha256, hostnqn: HOST.into(), subnqn: SUB.into() }));
}

#[test]
fn wrong_key_unknown_host_and_foreign_identity_are_refused() {
    let id = good_identity();
    let mut wrong = server_key().tls_psk(HOST, id).unwrap().to_vec();
    wrong[0] ^= 1;
    assert!(handshake(id, wrong).is_err(), "a wrong key must not complete");
    let other: &'static str = Box::leak(format!("NVMe0R01 nqn.2014-08.org.nvmexpress:uuid:other {SUB}").into_boxed_str());
    assert!(handshake(other, vec![0x42; 32]).is_err(), "a host without a key must not complete");
    assert!(handshake("psk.spdk.io", vec![0x42; 32]).is_err(), "a non-NVMe identity must not complete");
}
