//! Text keys and operational negotiation: arbitrary key=value data, then every parsed key
//! offered to a negotiation, plus CHAP binary decoding of every value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::fuzz::iscsi_text(data);
});
