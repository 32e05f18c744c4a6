//! A host-side DH-HMAC-CHAP written from the specification's definitions, run against the
//! controller's state machine.

use super::*;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100";
const SUBSYS: &str = "nqn.2016-06.io.tidemark:cnode1";

fn key(t: Option<Digest>, fill: u8) -> Secret {
    Secret::parse(Secret::encode(t, &[fill; 32]).as_bytes()).unwrap()
}

/// The host: its keys and what it offers.
struct Host<'a> {
    key: &'a Secret,
    ctrl_key: Option<&'a Secret>,
    hashes: Vec<u8>,
    groups: Vec<u8>,
}

/// What the host saw: the negotiated hash and group, and whether it accepted the controller.
#[derive(Debug, PartialEq, Eq)]
enum HostResult {
    Ok(Digest, DhGroup),
    /// The controller sent Failure1 with this explanation.
    Refused(u8),
    /// The controller's response (bidirectional) did not verify.
    BadController,
}

impl Host<'_> {
    fn run(&self, c: &mut QueueAuth, tid: u16) -> HostResult {
        c.send(&Message::Negotiate { tid, sc_c: 0, hashes: self.hashes.clone(), dhgroups: self.groups.clone() }.encode());
        let (m, _) = c.receive().unwrap();
        let (hash, dhgroup, s1, c1, peer) = match Message::decode(&m).unwrap() {
            Message::Challenge { hash, dhgroup, seqnum, challenge, dh, .. } => (hash, dhgroup, seqnum, challenge, dh),
            Message::Failure1 { explanation, .. } => return HostResult::Refused(explanation),
            m => panic!("unexpected {m:?}"),
        };
        let (d, g) = (Digest::from_id(hash).unwrap(), DhGroup::from_id(dhgroup).unwrap());
        assert_eq!(c1.len(), d.len());
        let (mine, shared) = match g {
            DhGroup::Null => (None, None),
            g => {
                let k = dh::KeyPair::generate(g).unwrap();
                let z = k.shared(&peer).unwrap();
                (Some(k), Some(z))
            }
        };
        let kh = self.key.transform(HOST);
        let r1 = host_response(d, &kh, &augment(d, &c1, shared.as_deref().map(|v| &v[..])), s1, tid, HOST, SUBSYS);
        let c2 = self.ctrl_key.map(|_| vec![0x5a; d.len()]);
        let s2 = if c2.is_some() { 77 } else { 0 };
        let reply = Message::Reply { tid, response: r1.to_vec(), challenge: c2.clone(), seqnum: s2, dh: mine.map(|k| k.public.clone()).unwrap_or_default() };
        c.send(&reply.encode());
        let (m, outcome) = c.receive().unwrap();
        match Message::decode(&m).unwrap() {
            Message::Success1 { response, .. } => {
                let Some(kc) = self.ctrl_key else {
                    assert_eq!(outcome, Outcome::Authenticated);
                    assert!(response.is_none());
                    return HostResult::Ok(d, g);
                };
                let want = ctrl_response(d, &kc.transform(SUBSYS), &augment(d, &c2.unwrap(), shared.as_deref().map(|v| &v[..])), s2, tid, HOST, SUBSYS);
                if response.as_deref() != Some(&want[..]) {
                    c.send(&Message::Failure2 { tid, reason: REASON_FAILED, explanation: explain::FAILED }.encode());
                    return HostResult::BadController;
                }
                assert!(!c.authenticated(), "bidirectional: not before Success2");
                assert_eq!(c.send(&Message::Success2 { tid }.encode()), Outcome::Authenticated);
                HostResult::Ok(d, g)
            }
            Message::Failure1 { explanation, .. } => HostResult::Refused(explanation),
            m => panic!("unexpected {m:?}"),
        }
    }
}

fn offer(d: Digest, g: DhGroup) -> (Vec<u8>, Vec<u8>) {
    (vec![d.id()], vec![g.id()])
}

#[test]
fn every_digest_and_group_authenticates_both_ways() {
    let (hk, ck) = (key(Some(Digest::Sha256), 1), key(Some(Digest::Sha512), 2));
    for d in Digest::ALL {
        for g in DhGroup::ALL {
            for bidi in [false, true] {
                let (hashes, groups) = offer(d, g);
                let ctrl_key = bidi.then_some(&ck);
                let mut c = QueueAuth::new(HOST, SUBSYS, &hk, Some(&ck), Policy::default());
                assert!(!c.authenticated());
                let host = Host { key: &hk, ctrl_key, hashes, groups };
                assert_eq!(host.run(&mut c, 3), HostResult::Ok(d, g), "{d:?} {g:?} bidirectional {bidi}");
                assert!(c.authenticated());
            }
        }
    }
}

#[test]
fn the_strongest_common_choice_wins_and_policy_limits_it() {
    let hk = key(None, 1);
    let all = Host { key: &hk, ctrl_key: None, hashes: vec![1, 2, 3], groups: vec![0, 1, 2, 3, 4, 5] };
    let policy = Policy { digests: vec![Digest::Sha256, Digest::Sha384], dhgroups: vec![DhGroup::Null, DhGroup::Ffdhe2048] };
    let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, policy);
    assert_eq!(all.run(&mut c, 1), HostResult::Ok(Digest::Sha384, DhGroup::Ffdhe2048));
    // Nothing in common: refused with the reason.
    let policy = Policy { digests: vec![Digest::Sha512], dhgroups: vec![DhGroup::Null] };
    let only256 = Host { key: &hk, ctrl_key: None, hashes: vec![1], groups: vec![0] };
    let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, policy.clone());
    assert_eq!(only256.run(&mut c, 1), HostResult::Refused(explain::HASH_UNUSABLE));
    let ffdhe = Host { key: &hk, ctrl_key: None, hashes: vec![3], groups: vec![1] };
    let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, policy);
    assert_eq!(ffdhe.run(&mut c, 1), HostResult::Refused(explain::DHGROUP_UNUSABLE));
    assert!(!c.authenticated());
}

#[test]
fn wrong_keys_are_refused() {
    let (hk, wrong, ck) = (key(Some(Digest::Sha256), 1), key(Some(Digest::Sha256), 9), key(None, 2));
    for g in [DhGroup::Null, DhGroup::Ffdhe2048] {
        let (hashes, groups) = offer(Digest::Sha256, g);
        let mut c = QueueAuth::new(HOST, SUBSYS, &hk, Some(&ck), Policy::default());
        let host = Host { key: &wrong, ctrl_key: None, hashes: hashes.clone(), groups: groups.clone() };
        assert_eq!(host.run(&mut c, 1), HostResult::Refused(explain::FAILED));
        assert!(!c.authenticated());
        // The host holds the wrong controller key: it refuses the controller, which stays
        // unauthenticated.
        let mut c = QueueAuth::new(HOST, SUBSYS, &hk, Some(&ck), Policy::default());
        let host = Host { key: &hk, ctrl_key: Some(&wrong), hashes: hashes.clone(), groups: groups.clone() };
        assert_eq!(host.run(&mut c, 1), HostResult::BadController);
        assert!(!c.authenticated());
        // Bidirectional asked of a controller without a key.
        let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, Policy::default());
        let host = Host { key: &hk, ctrl_key: Some(&ck), hashes, groups };
        assert_eq!(host.run(&mut c, 1), HostResult::Refused(explain::FAILED));
    }
    // The same key bytes transformed for another host NQN do not verify.
    let mut c = QueueAuth::new("nqn.2014-08.org.nvmexpress:uuid:other", SUBSYS, &hk, None, Policy::default());
    let host = Host { key: &hk, ctrl_key: None, hashes: vec![1], groups: vec![0] };
    assert_eq!(host.run(&mut c, 1), HostResult::Refused(explain::FAILED));
}

#[test]
fn a_replayed_reply_is_refused() {
    let hk = key(None, 1);
    let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, Policy::default());
    let negotiate = Message::Negotiate { tid: 1, sc_c: 0, hashes: vec![1], dhgroups: vec![0] }.encode();
    c.send(&negotiate);
    let Message::Challenge { seqnum, challenge, .. } = Message::decode(&c.receive().unwrap().0).unwrap() else { panic!() };
    let r1 = host_response(Digest::Sha256, &hk.transform(HOST), &challenge, seqnum, 1, HOST, SUBSYS);
    let reply = Message::Reply { tid: 1, response: r1.to_vec(), challenge: None, seqnum: 0, dh: vec![] }.encode();
    assert_eq!(c.send(&reply), Outcome::Pending);
    assert_eq!(c.receive().unwrap().1, Outcome::Authenticated);
    // Replayed in the same transaction: out of sequence.
    assert!(matches!(c.send(&reply), Outcome::Failed(_)));
    assert!(!c.authenticated());
    // Replayed in a new transaction (a fresh challenge): the response no longer verifies.
    c.send(&negotiate);
    c.receive().unwrap();
    assert_eq!(c.send(&reply), Outcome::Failed("wrong response (wrong key)"));
    let Message::Failure1 { explanation, .. } = Message::decode(&c.receive().unwrap().0).unwrap() else { panic!() };
    assert_eq!(explanation, explain::FAILED);
    assert!(!c.authenticated());
}

#[test]
fn reauthentication_keeps_the_queue_and_a_failed_one_revokes_it() {
    let hk = key(Some(Digest::Sha384), 1);
    let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, Policy::default());
    let host = Host { key: &hk, ctrl_key: None, hashes: vec![2], groups: vec![1] };
    assert!(matches!(host.run(&mut c, 1), HostResult::Ok(..)));
    assert!(matches!(host.run(&mut c, 2), HostResult::Ok(..)));
    assert!(c.authenticated());
    let wrong = key(Some(Digest::Sha384), 3);
    let bad = Host { key: &wrong, ctrl_key: None, hashes: vec![2], groups: vec![1] };
    assert_eq!(bad.run(&mut c, 3), HostResult::Refused(explain::FAILED));
    assert!(!c.authenticated());
}

#[test]
fn malformed_and_out_of_order_input_is_refused_without_panic() {
    let hk = key(None, 1);
    let mut c = QueueAuth::new(HOST, SUBSYS, &hk, None, Policy::default());
    // Nothing to receive before a Negotiate.
    assert_eq!(c.receive().err(), Some(OutOfSequence));
    for junk in [&[][..], &[0u8][..], &[1, 2, 0, 0, 1, 0, 32][..], &[0xff; 300][..]] {
        assert!(matches!(c.send(junk), Outcome::Failed(_)));
        let Message::Failure1 { .. } = Message::decode(&c.receive().unwrap().0).unwrap() else { panic!() };
    }
    // A Reply before any challenge, a Success2 out of the blue, secure channel concatenation.
    let reply = Message::Reply { tid: 0, response: vec![0; 32], challenge: None, seqnum: 0, dh: vec![] };
    assert!(matches!(c.send(&reply.encode()), Outcome::Failed(_)));
    assert!(matches!(c.send(&Message::Success2 { tid: 0 }.encode()), Outcome::Failed(_)));
    assert!(matches!(c.send(&Message::Negotiate { tid: 0, sc_c: 1, hashes: vec![1], dhgroups: vec![0] }.encode()), Outcome::Failed(_)));
    // A truncated Reply after a real challenge, and one with the wrong DH length.
    c.send(&Message::Negotiate { tid: 4, sc_c: 0, hashes: vec![1], dhgroups: vec![1] }.encode());
    c.receive().unwrap();
    let reply = Message::Reply { tid: 4, response: vec![0; 32], challenge: None, seqnum: 0, dh: vec![2; 256] }.encode();
    assert!(matches!(c.send(&reply[..100]), Outcome::Failed(_)));
    c.send(&Message::Negotiate { tid: 5, sc_c: 0, hashes: vec![1], dhgroups: vec![1] }.encode());
    c.receive().unwrap();
    let reply = Message::Reply { tid: 5, response: vec![0; 32], challenge: None, seqnum: 0, dh: vec![0; 256] }.encode();
    assert_eq!(c.send(&reply), Outcome::Failed("bad DH public value"));
    assert!(!c.authenticated());
}
