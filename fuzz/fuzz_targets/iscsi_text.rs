//! Text keys and operational negotiation: arbitrary key=value data, then every parsed key
//! offered to a negotiation, plus CHAP binary decoding of every value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::iscsi::config::Options;
use tidemark::iscsi::params::Negotiation;
use tidemark::iscsi::{chap, text};

fuzz_target!(|data: &[u8]| {
    let Ok(keys) = text::parse(data) else { return };
    let limits = Options::default().limits(None);
    let mut n = Negotiation::new(data.first().is_some_and(|b| b & 1 == 1));
    let mut out = Vec::new();
    for (k, v) in &keys {
        let _ = chap::decode_binary(v);
        if Negotiation::handles(k) {
            let _ = n.offer(k, v, &limits, &mut out);
        }
    }
    n.declarations(&limits, &mut out);
    n.finish();
    let p = &n.params;
    assert!(p.first_burst <= p.max_burst);
    assert!(p.max_send_dsl >= 512 && p.max_connections == 1);
});
