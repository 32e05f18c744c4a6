//! NVMe in-band authentication, DH-HMAC-CHAP (NVMe base specification 2.0, TP 8006), on the
//! controller side. A host whose allow-list entry names a DH-HMAC-CHAP key learns from its
//! Connect response that it must authenticate (AUTHREQ.ATR); then each queue runs one
//! transaction through AUTH_Send / AUTH_Receive:
//!
//! ```text
//!   host                                   controller
//!   AUTH_Send    Negotiate (hashes, groups) ->
//!   AUTH_Receive                          <- Challenge (C1, S1, T_ID, g^y)
//!   AUTH_Send    Reply (R1, [C2, S2], g^x) ->
//!   AUTH_Receive                          <- Success1 ([R2]) or Failure1
//!   AUTH_Send    Success2 or Failure2      ->   (bidirectional only)
//! ```
//!
//! Until the transaction succeeds the queue takes no other command than fabrics ones (see
//! [`QueueAuth::authenticated`]); a host may start a new transaction at any time
//! (re-authentication). `msg` encodes the messages, `secret` holds the key representation and
//! hashes, `dh` the FFDHE groups.

pub mod dh;
pub mod msg;
pub mod secret;

pub use dh::DhGroup;
pub use secret::{Digest, Secret};

use msg::{explain, Message, REASON_FAILED};
use zeroize::Zeroizing;

/// The Connect response's AUTHREQ field, bit ATR: an authentication transaction is required.
pub const CONNECT_AUTHREQ_ATR: u32 = 1 << 17;
/// AUTH_Send / AUTH_Receive: the security protocol and protocol-specific fields that name
/// NVMe in-band authentication (SQE bytes 43, 41 and 42).
pub const SECP_NVME: u8 = 0xE9;
pub const SPSP_NVME: u8 = 0x01;
/// Largest AUTH_Send payload: a Reply with two SHA-512 values and an ffdhe8192 public value.
pub const MAX_MESSAGE: usize = 16 + 2 * 64 + 1024;

/// The hashes and groups the target offers (`nvmf_set_config`'s dhchap_digests/dhgroups),
/// in no particular order: the strongest both sides allow is chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub digests: Vec<Digest>,
    pub dhgroups: Vec<DhGroup>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { digests: Digest::ALL.to_vec(), dhgroups: DhGroup::ALL.to_vec() }
    }
}

/// What a transaction step produced, for the caller to count and log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Authenticated,
    /// The host failed to authenticate (or refused the controller): why, for the log.
    Failed(&'static str),
}

/// AUTH_Receive arrived when the controller has nothing to say (a command sequence error).
#[derive(Debug, PartialEq, Eq)]
pub struct OutOfSequence;

struct Txn {
    tid: u16,
    digest: Digest,
    group: DhGroup,
    c1: Zeroizing<Vec<u8>>,
    s1: u32,
    dh: Option<dh::KeyPair>,
}

enum Step {
    /// Waiting for a Negotiate (a new queue, or an authenticated one between transactions).
    Negotiate,
    SendChallenge(Box<Txn>),
    Reply(Box<Txn>),
    SendSuccess1 {
        tid: u16,
        hl: u8,
        r2: Option<Zeroizing<Vec<u8>>>,
    },
    Success2 {
        tid: u16,
    },
    SendFailure1 {
        tid: u16,
        explanation: u8,
    },
}

/// One queue's authentication state.
pub struct QueueAuth {
    hostnqn: String,
    subnqn: String,
    /// The transformed host key (responses from the host are checked with it).
    kh: Zeroizing<Vec<u8>>,
    /// The transformed controller key, when the host may ask the controller to authenticate.
    kc: Option<Zeroizing<Vec<u8>>>,
    policy: Policy,
    authenticated: bool,
    step: Step,
}

fn random(n: usize) -> Option<Zeroizing<Vec<u8>>> {
    let mut v = Zeroizing::new(vec![0u8; n]);
    getrandom::fill(&mut v[..]).ok()?;
    Some(v)
}

/// Constant-time comparison of two responses.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The challenge a response is computed over: as is with the null group, else augmented
/// with the DH shared secret: HMAC(H(Z), C).
fn augment(d: Digest, challenge: &[u8], shared: Option<&[u8]>) -> Zeroizing<Vec<u8>> {
    match shared {
        None => Zeroizing::new(challenge.to_vec()),
        Some(z) => d.hmac(&d.hash(z), &[challenge]),
    }
}

/// The host's response R1 = HMAC(Kh, C1' || S1 || T_ID || SC_C || "HostHost" || NQNh || 0 || NQNc).
pub fn host_response(d: Digest, kh: &[u8], c1: &[u8], s1: u32, tid: u16, hostnqn: &str, subnqn: &str) -> Zeroizing<Vec<u8>> {
    d.hmac(kh, &[c1, &s1.to_le_bytes(), &tid.to_le_bytes(), &[0], b"HostHost", hostnqn.as_bytes(), &[0], subnqn.as_bytes()])
}

/// The controller's response R2 = HMAC(Kc, C2' || S2 || T_ID || SC_C || "Controller" || NQNc || 0 || NQNh).
pub fn ctrl_response(d: Digest, kc: &[u8], c2: &[u8], s2: u32, tid: u16, hostnqn: &str, subnqn: &str) -> Zeroizing<Vec<u8>> {
    d.hmac(kc, &[c2, &s2.to_le_bytes(), &tid.to_le_bytes(), &[0], b"Controller", subnqn.as_bytes(), &[0], hostnqn.as_bytes()])
}

impl QueueAuth {
    pub fn new(hostnqn: &str, subnqn: &str, host_key: &Secret, ctrl_key: Option<&Secret>, policy: Policy) -> QueueAuth {
        QueueAuth {
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            kh: host_key.transform(hostnqn),
            kc: ctrl_key.map(|k| k.transform(subnqn)),
            policy,
            authenticated: false,
            step: Step::Negotiate,
        }
    }

    /// Whether the queue may run commands other than fabrics ones.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    fn fail(&mut self, tid: u16, explanation: u8, why: &'static str) -> Outcome {
        self.authenticated = false;
        self.step = Step::SendFailure1 { tid, explanation };
        Outcome::Failed(why)
    }

    /// An AUTH_Send payload. Protocol errors are not command errors: the controller answers
    /// the next AUTH_Receive with a Failure1.
    pub fn send(&mut self, data: &[u8]) -> Outcome {
        let m = match Message::decode(data) {
            Ok(m) => m,
            Err(_) => {
                let tid = match &self.step {
                    Step::Reply(t) | Step::SendChallenge(t) => t.tid,
                    Step::SendSuccess1 { tid, .. } | Step::Success2 { tid } | Step::SendFailure1 { tid, .. } => *tid,
                    Step::Negotiate => 0,
                };
                return self.fail(tid, explain::INCORRECT_PAYLOAD, "malformed message");
            }
        };
        let step = std::mem::replace(&mut self.step, Step::Negotiate);
        match (m, step) {
            (Message::Negotiate { tid, sc_c, hashes, dhgroups }, _) => self.negotiate(tid, sc_c, &hashes, &dhgroups),
            (Message::Reply { tid, response, challenge, seqnum, dh }, Step::Reply(t)) => self.reply(*t, tid, &response, challenge, seqnum, &dh),
            (Message::Success2 { tid: got }, Step::Success2 { tid }) if got == tid => {
                self.authenticated = true;
                Outcome::Authenticated
            }
            (Message::Failure2 { .. }, _) => {
                // The host refused the controller's response; nothing to answer.
                self.authenticated = false;
                Outcome::Failed("the host refused the controller (Failure2)")
            }
            (m, _) => self.fail(m.tid(), explain::INCORRECT_PROTOCOL, "message out of sequence"),
        }
    }

    fn negotiate(&mut self, tid: u16, sc_c: u8, hashes: &[u8], groups: &[u8]) -> Outcome {
        if sc_c != 0 {
            // Secure channel concatenation needs TLS, which this queue does not have.
            return self.fail(tid, explain::CONCAT_MISMATCH, "secure channel concatenation requested");
        }
        // The strongest hash and group both sides allow (the enums order by strength).
        let digest = hashes.iter().filter_map(|&h| Digest::from_id(h)).filter(|d| self.policy.digests.contains(d)).max();
        let Some(digest) = digest else { return self.fail(tid, explain::HASH_UNUSABLE, "no common hash function") };
        let group = groups.iter().filter_map(|&g| DhGroup::from_id(g)).filter(|g| self.policy.dhgroups.contains(g)).max();
        let Some(group) = group else { return self.fail(tid, explain::DHGROUP_UNUSABLE, "no common DH group") };
        let dh = match group {
            DhGroup::Null => None,
            g => match dh::KeyPair::generate(g) {
                Ok(k) => Some(k),
                Err(_) => return self.fail(tid, explain::FAILED, "the OS random source failed"),
            },
        };
        let (Some(c1), Some(s1)) = (random(digest.len()), random(4)) else {
            return self.fail(tid, explain::FAILED, "the OS random source failed");
        };
        // A zero sequence number means "none" in a Reply; never send one.
        let s1 = u32::from_le_bytes([s1[0], s1[1], s1[2], s1[3]]).max(1);
        self.step = Step::SendChallenge(Box::new(Txn { tid, digest, group, c1, s1, dh }));
        Outcome::Pending
    }

    fn reply(&mut self, t: Txn, tid: u16, response: &[u8], c2: Option<Vec<u8>>, s2: u32, peer_dh: &[u8]) -> Outcome {
        let d = t.digest;
        if tid != t.tid || response.len() != d.len() || peer_dh.len() != t.group.len() {
            return self.fail(t.tid, explain::INCORRECT_PAYLOAD, "reply does not match the challenge");
        }
        let shared = match &t.dh {
            None => None,
            Some(k) => match k.shared(peer_dh) {
                Ok(z) => Some(z),
                Err(_) => return self.fail(tid, explain::INCORRECT_PAYLOAD, "bad DH public value"),
            },
        };
        let ca1 = augment(d, &t.c1, shared.as_deref().map(|v| &v[..]));
        let want = host_response(d, &self.kh, &ca1, t.s1, tid, &self.hostnqn, &self.subnqn);
        if !same(&want, response) {
            return self.fail(tid, explain::FAILED, "wrong response (wrong key)");
        }
        let r2 = match (c2, &self.kc) {
            (None, _) => None,
            (Some(_), None) => return self.fail(tid, explain::FAILED, "host asked for bidirectional authentication; no controller key"),
            (Some(_), Some(_)) if s2 == 0 => return self.fail(tid, explain::INCORRECT_PAYLOAD, "bidirectional reply without a sequence number"),
            (Some(c2), Some(kc)) => {
                let ca2 = augment(d, &c2, shared.as_deref().map(|v| &v[..]));
                Some(ctrl_response(d, kc, &ca2, s2, tid, &self.hostnqn, &self.subnqn))
            }
        };
        self.step = Step::SendSuccess1 { tid, hl: d.len() as u8, r2 };
        Outcome::Pending
    }

    /// An AUTH_Receive: the message the controller has for the host.
    pub fn receive(&mut self) -> Result<(Vec<u8>, Outcome), OutOfSequence> {
        match std::mem::replace(&mut self.step, Step::Negotiate) {
            Step::SendChallenge(t) => {
                let m = Message::Challenge {
                    tid: t.tid,
                    hash: t.digest.id(),
                    dhgroup: t.group.id(),
                    seqnum: t.s1,
                    challenge: t.c1.to_vec(),
                    dh: t.dh.as_ref().map(|k| k.public.clone()).unwrap_or_default(),
                };
                self.step = Step::Reply(t);
                Ok((m.encode(), Outcome::Pending))
            }
            Step::SendSuccess1 { tid, hl, r2 } => {
                let bidirectional = r2.is_some();
                let m = Message::Success1 { tid, hl, response: r2.map(|r| r.to_vec()) };
                if bidirectional {
                    self.step = Step::Success2 { tid };
                    return Ok((m.encode(), Outcome::Pending));
                }
                self.authenticated = true;
                Ok((m.encode(), Outcome::Authenticated))
            }
            Step::SendFailure1 { tid, explanation } => Ok((Message::Failure1 { tid, reason: REASON_FAILED, explanation }.encode(), Outcome::Pending)),
            other => {
                self.step = other;
                Err(OutOfSequence)
            }
        }
    }
}

#[cfg(test)]
mod tests;
