//! The DH-HMAC-CHAP controller state machine over arbitrary AUTH_Send payloads (each a 2-byte
//! length then its bytes), each followed by an AUTH_Receive: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::nvmf_auth(data);
});
