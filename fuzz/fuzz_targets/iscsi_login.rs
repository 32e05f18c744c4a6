//! The iSCSI login state machine over arbitrary PDUs: a sequence of 48-byte headers, each
//! followed by the data segment its length field announces (cut short at the end of the
//! input). Every step must answer (continue, complete or fail) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::iscsi_login(data);
});
