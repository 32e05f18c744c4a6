//! A connection to a secure (TLS) NVMe/TCP listener of an in-process target: raw bytes (a host
//! that is not TLS, a broken or cut handshake), or a real TLS session with a host's key whose
//! NVMe/TCP stream is cut into TLS records of fuzzed sizes. The target must refuse the first
//! without a word in the clear, serve the second as over plain TCP, and close both, never hang
//! or panic. Run: `cargo fuzz run nvmf_tls fuzz/corpus/nvmf_tls`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::nvmf_tls(data);
});
