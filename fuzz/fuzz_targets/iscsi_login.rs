//! The iSCSI login state machine over arbitrary PDUs: a sequence of 48-byte headers, each
//! followed by the data segment its length field announces (cut short at the end of the
//! input). Every step must answer (continue, complete or fail) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use tidemark::iscsi::config::{AuthGroup, ChapSecret, InitiatorGroup, Netmask, Registry, TargetNode};
use tidemark::iscsi::login::{Login, LoginContext, Step};
use tidemark::iscsi::pdu::{Bhs, BHS_LEN};

fn registry() -> Registry {
    let mut r = Registry::default();
    r.initiator_groups.insert(
        1,
        InitiatorGroup { tag: 1, initiators: vec!["ANY".into(), "!iqn.deny".into()], netmasks: vec!["ANY".into()], parsed_netmasks: vec![Netmask::Any] },
    );
    r.auth_groups.insert(1, AuthGroup { tag: 1, secrets: vec![ChapSecret { user: "u".into(), secret: "secret".into(), muser: Some("m".into()), msecret: Some("msecret".into()) }] });
    r.nodes.insert("iqn.t:open".into(), Arc::new(TargetNode::new("iqn.t:open".into(), None, 32, (false, false, false, 0), (false, false), vec![(1, 1)], vec![])));
    r.nodes.insert("iqn.t:chap".into(), Arc::new(TargetNode::new("iqn.t:chap".into(), Some("a".into()), 8, (false, true, true, 1), (true, true), vec![(1, 1)], vec![])));
    r
}

fuzz_target!(|data: &[u8]| {
    let reg = registry();
    let ctx = LoginContext { pg_tag: 1, peer: "127.0.0.1:1".parse().unwrap(), local: "127.0.0.1:3260".parse().unwrap() };
    let mut login = Login::new(ctx, 7);
    let mut rest = data;
    while rest.len() >= BHS_LEN {
        let bhs = Bhs::from_slice(rest).expect("48 bytes");
        rest = &rest[BHS_LEN..];
        let n = (bhs.data_len() as usize).min(rest.len()).min(64 * 1024);
        let seg = &rest[..n];
        rest = &rest[n..];
        match login.step(&reg, &bhs, seg) {
            Step::Continue(r) => assert!(r.len() >= BHS_LEN),
            Step::Complete(r, _) => {
                assert!(r.len() >= BHS_LEN);
                return;
            }
            Step::Fail(r) => {
                assert!(r.len() >= BHS_LEN);
                return;
            }
        }
    }
});
