//! The login phase (RFC 7143 §6.3, §11.12-11.13): security negotiation (CHAP or none),
//! operational negotiation, and the checks that decide who may log in to what. A pure state
//! machine over request PDUs, so it is unit-tested and fuzzed without sockets; the connection
//! code does the I/O and the session bookkeeping (TSIH, reinstatement).

use super::chap;
use super::config::{Registry, TargetNode};
use super::params::{Negotiation, SessionParams};
use super::pdu::{opcode, Bhs, BHS_LEN};
use super::text;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Login status class and detail (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTH_FAILURE: (u8, u8) = (2, 1);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const TARGET_REMOVED: (u8, u8) = (2, 4);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (2, 6);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (2, 9);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 10);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 11);
    pub const TARGET_ERROR: (u8, u8) = (3, 0);
    pub const OUT_OF_RESOURCES: (u8, u8) = (3, 2);
}

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;
const FLAG_TRANSIT: u8 = 0x80;
const FLAG_CONTINUE: u8 = 0x40;

/// Largest login text accumulated over continued PDUs.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;
/// Data segment limit during login (RFC 7143 §13.12: 8192 until negotiated).
pub const LOGIN_MAX_DSL: u32 = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Where the connection came in.
#[derive(Debug, Clone)]
pub struct LoginContext {
    pub pg_tag: u16,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// Nothing chosen yet.
    Start,
    /// CHAP chosen; waiting for CHAP_A.
    ChapWaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapWaitResponse { id: u8, challenge: Vec<u8> },
    /// Authenticated (or None chosen).
    Done,
}

/// The result of a successful login, handed to the full feature phase.
#[derive(Clone)]
pub struct LoggedIn {
    pub session_type: SessionType,
    pub node: Option<Arc<TargetNode>>,
    pub initiator: String,
    pub isid: [u8; 6],
    /// The TSIH the initiator sent (0 for a new session).
    pub tsih: u16,
    pub cid: u16,
    pub params: SessionParams,
    /// StatSN of the final login response; the full feature phase continues after it.
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub queue_depth: u32,
}

pub enum Step {
    /// Send the response and read the next request.
    Continue(Vec<u8>),
    /// Send the response (after filling in the TSIH) and enter the full feature phase.
    Complete(Vec<u8>, Box<LoggedIn>),
    /// Send the response and close the connection.
    Fail(Vec<u8>),
}

pub struct Login {
    ctx: LoginContext,
    first: bool,
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    initiator: Option<String>,
    session_type: SessionType,
    node: Option<Arc<TargetNode>>,
    auth: Auth,
    neg: Negotiation,
    stat_sn: u32,
    cmd_sn: u32,
    queue_depth: u32,
    continued: Vec<u8>,
    sent_tpgt: bool,
    /// Random bytes for CHAP identifiers and challenges (injectable for tests).
    random: RandomSource,
}

/// Where random bytes come from: [`os_random`] in service; tests inject fixed or failing ones.
pub type RandomSource = fn(&mut [u8]) -> Result<(), getrandom::Error>;

/// Fills `buf` from the operating system's CSPRNG (getrandom(2)). There is deliberately no
/// fallback: a CHAP challenge an attacker can predict (a clock-seeded one) lets them replay a
/// recorded response, so when the OS cannot give random bytes the login is refused instead.
pub fn os_random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    getrandom::fill(buf)
}

impl Login {
    pub fn new(ctx: LoginContext, initial_stat_sn: u32) -> Login {
        Login {
            ctx,
            first: true,
            isid: [0; 6],
            tsih: 0,
            cid: 0,
            initiator: None,
            session_type: SessionType::Normal,
            node: None,
            auth: Auth::Start,
            neg: Negotiation::new(false),
            stat_sn: initial_stat_sn,
            cmd_sn: 0,
            queue_depth: 1,
            continued: Vec::new(),
            sent_tpgt: false,
            random: os_random,
        }
    }

    #[cfg(test)]
    pub fn with_random(mut self, f: RandomSource) -> Self {
        self.random = f;
        self
    }

    pub fn initiator(&self) -> Option<&str> {
        self.initiator.as_deref()
    }

    fn response(&mut self, req: &Bhs, flags: u8, status: (u8, u8), data: &[u8]) -> Vec<u8> {
        let mut h = Bhs::new(opcode::LOGIN_RESP);
        h.0[1] = flags;
        h.0[2] = 0; // VersionMax
        h.0[3] = 0; // VersionActive
        h.set_data_len(data.len() as u32);
        h.0[8..14].copy_from_slice(&req.0[8..14]);
        h.set_u16(14, self.tsih);
        h.set_u32(16, req.itt());
        h.set_u32(24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        h.set_u32(28, self.cmd_sn);
        h.set_u32(32, self.cmd_sn.wrapping_add(self.queue_depth.max(1) - 1));
        h.0[36] = status.0;
        h.0[37] = status.1;
        let mut out = Vec::with_capacity(BHS_LEN + data.len() + 3);
        out.extend_from_slice(&h.0);
        out.extend_from_slice(data);
        out.resize(out.len() + super::pdu::pad(data.len()), 0);
        out
    }

    fn fail(&mut self, req: &Bhs, status: (u8, u8)) -> Step {
        let csg = (req.flags() >> 2) & 3;
        Step::Fail(self.response(req, csg << 2, status, &[]))
    }

    /// Handles one Login Request (header and data segment, without padding or digests).
    pub fn step(&mut self, reg: &Registry, req: &Bhs, data: &[u8]) -> Step {
        if req.opcode() != opcode::LOGIN_REQ {
            return self.fail(req, status::INVALID_DURING_LOGIN);
        }
        let flags = req.flags();
        let transit = flags & FLAG_TRANSIT != 0;
        let cont = flags & FLAG_CONTINUE != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if (transit && cont) || csg == 2 || csg == STAGE_FULL_FEATURE || (transit && (nsg == 2 || nsg <= csg)) {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if self.first {
            // VersionMin above 0: only version 0 exists.
            if req.0[3] > 0 {
                return self.fail(req, status::UNSUPPORTED_VERSION);
            }
            self.isid.copy_from_slice(&req.0[8..14]);
            self.tsih = req.u16(14);
            self.cid = req.u16(20);
            self.cmd_sn = req.u32(24);
        } else if req.0[8..14] != self.isid || req.u16(14) != self.tsih || req.u32(24) != self.cmd_sn {
            // ISID, TSIH and CmdSN stay the same for the whole login.
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if self.continued.len() + data.len() > MAX_LOGIN_TEXT {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        self.continued.extend_from_slice(data);
        if cont {
            // More text follows: acknowledge with an empty response (RFC 7143 §11.12.2).
            let r = self.response(req, csg << 2, status::SUCCESS, &[]);
            return Step::Continue(r);
        }
        let text_data = std::mem::take(&mut self.continued);
        let keys = match text::parse(&text_data) {
            Ok(k) => k,
            Err(_) => return self.fail(req, status::INITIATOR_ERROR),
        };
        let mut answers: Vec<(String, String)> = Vec::new();
        if self.first {
            self.first = false;
            if let Err(st) = self.first_request(reg, &keys) {
                return self.fail(req, st);
            }
            if self.session_type == SessionType::Normal && !self.sent_tpgt {
                self.sent_tpgt = true;
                answers.push(("TargetPortalGroupTag".into(), self.ctx.pg_tag.to_string()));
                if let Some(a) = self.node.as_ref().and_then(|n| n.alias.clone()) {
                    answers.push(("TargetAlias".into(), a));
                }
            }
        }
        let (disable, require, mutual, group) = self.chap_policy(reg);
        let limits = reg.options.limits(self.node.as_deref());
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias" => {
                    // Declarations of the first request; repeating them later is harmless.
                }
                "AuthMethod" => {
                    if csg != STAGE_SECURITY || self.auth != Auth::Start {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                    let offered: Vec<&str> = v.split(',').map(str::trim).collect();
                    let choice = offered.iter().find(|m| (**m == "CHAP" && !disable) || (**m == "None" && !require));
                    match choice {
                        Some(&"CHAP") => {
                            self.auth = Auth::ChapWaitAlgorithm;
                            answers.push(("AuthMethod".into(), "CHAP".into()));
                        }
                        Some(_) => {
                            self.auth = Auth::Done;
                            answers.push(("AuthMethod".into(), "None".into()));
                        }
                        None => return self.fail(req, status::AUTH_FAILURE),
                    }
                }
                "CHAP_A" => {
                    if self.auth != Auth::ChapWaitAlgorithm {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                    if !v.split(',').map(str::trim).any(|a| a == chap::ALGORITHM_MD5) {
                        return self.fail(req, status::AUTH_FAILURE);
                    }
                    let mut rnd = [0u8; 1 + chap::CHALLENGE_LEN];
                    if let Err(e) = (self.random)(&mut rnd) {
                        log::error!(
                            "iSCSI login of {} from {}: refused, no CHAP challenge can be made (the OS random source failed: {e})",
                            self.initiator.as_deref().unwrap_or("?"),
                            self.ctx.peer
                        );
                        return self.fail(req, status::TARGET_ERROR);
                    }
                    let id = rnd[0];
                    let challenge = rnd[1..].to_vec();
                    answers.push(("CHAP_A".into(), chap::ALGORITHM_MD5.into()));
                    answers.push(("CHAP_I".into(), id.to_string()));
                    answers.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
                    self.auth = Auth::ChapWaitResponse { id, challenge };
                }
                "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    // Handled together below.
                }
                _ if Negotiation::handles(k) => {
                    if self.neg.offer(k, v, &limits, &mut answers).is_err() {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                }
                _ => answers.push((k.clone(), "NotUnderstood".into())),
            }
        }
        let get = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        if let Auth::ChapWaitResponse { id, challenge } = self.auth.clone() {
            if let (Some(user), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) {
                let Some(resp) = chap::decode_binary(resp) else { return self.fail(req, status::AUTH_FAILURE) };
                let secrets = reg.auth_groups.get(&group).map(|g| g.secrets.clone()).unwrap_or_default();
                let Some(secret) = secrets.iter().find(|s| s.user == user) else {
                    log::info!("iscsi: CHAP login of {user:?} refused: no such user in auth group {group}");
                    return self.fail(req, status::AUTH_FAILURE);
                };
                let expect = chap::response(id, secret.secret.as_bytes(), &challenge);
                if !chap::constant_time_eq(&expect, &resp) {
                    log::info!("iscsi: CHAP login of {user:?} refused: wrong secret");
                    return self.fail(req, status::AUTH_FAILURE);
                }
                match (get("CHAP_I"), get("CHAP_C")) {
                    (Some(i), Some(c)) => {
                        let (Ok(mid), Some(mc)) = (i.parse::<u8>(), chap::decode_binary(c)) else { return self.fail(req, status::AUTH_FAILURE) };
                        // A reflected challenge would let an attacker get our answer to our
                        // own question (RFC 7143 §12.1.3).
                        if mc == challenge {
                            return self.fail(req, status::AUTH_FAILURE);
                        }
                        let (Some(mu), Some(ms)) = (secret.muser.as_ref(), secret.msecret.as_ref()) else {
                            return self.fail(req, status::AUTH_FAILURE);
                        };
                        answers.push(("CHAP_N".into(), mu.clone()));
                        answers.push(("CHAP_R".into(), chap::encode_hex(&chap::response(mid, ms.as_bytes(), &mc))));
                    }
                    (None, None) if mutual => return self.fail(req, status::AUTH_FAILURE),
                    (None, None) => {}
                    _ => return self.fail(req, status::AUTH_FAILURE),
                }
                self.auth = Auth::Done;
            } else if get("CHAP_N").is_some() || get("CHAP_R").is_some() {
                return self.fail(req, status::AUTH_FAILURE);
            }
        }
        // The operational stage (or a jump to full feature) needs authentication first.
        if csg == STAGE_OPERATIONAL && self.auth != Auth::Done {
            if require || self.auth != Auth::Start {
                return self.fail(req, status::AUTH_FAILURE);
            }
            // Security skipped while not required: no authentication.
            self.auth = Auth::Done;
        }
        let mut next_flags = csg << 2;
        let mut done = false;
        if transit {
            // A security stage without AuthMethod means no authentication, if none is required.
            if self.auth == Auth::Start && !require {
                self.auth = Auth::Done;
            }
            if self.auth == Auth::Done {
                next_flags |= FLAG_TRANSIT | nsg;
                done = nsg == STAGE_FULL_FEATURE;
            }
        }
        if csg == STAGE_OPERATIONAL || (done && csg == STAGE_SECURITY) {
            self.neg.declarations(&limits, &mut answers);
        }
        let mut out = Vec::new();
        for (k, v) in &answers {
            text::push(&mut out, k, v);
        }
        if out.len() > LOGIN_MAX_DSL as usize {
            return self.fail(req, status::TARGET_ERROR);
        }
        if done {
            self.neg.finish();
            let logged = LoggedIn {
                session_type: self.session_type,
                node: self.node.clone(),
                initiator: self.initiator.clone().unwrap_or_default(),
                isid: self.isid,
                tsih: self.tsih,
                cid: self.cid,
                params: self.neg.params.clone(),
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.cmd_sn,
                queue_depth: self.queue_depth,
            };
            let r = self.response(req, next_flags, status::SUCCESS, &out);
            return Step::Complete(r, Box::new(logged));
        }
        Step::Continue(self.response(req, next_flags, status::SUCCESS, &out))
    }

    /// Checks the declarations of the first request and finds the target.
    fn first_request(&mut self, reg: &Registry, keys: &[(String, String)]) -> Result<(), (u8, u8)> {
        let get = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let Some(initiator) = get("InitiatorName").filter(|n| !n.is_empty()) else { return Err(status::MISSING_PARAMETER) };
        self.initiator = Some(initiator.to_string());
        self.session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(status::SESSION_TYPE_NOT_SUPPORTED),
        };
        let ip = self.ctx.peer.ip();
        match self.session_type {
            SessionType::Discovery => {
                self.neg = Negotiation::new(true);
                self.queue_depth = 1;
            }
            SessionType::Normal => {
                let Some(name) = get("TargetName") else { return Err(status::MISSING_PARAMETER) };
                let Some(node) = reg.nodes.get(name).cloned() else {
                    log::info!("iscsi: {initiator} asked for unknown target {name:?}");
                    return Err(status::NOT_FOUND);
                };
                if node.deleted.load(Relaxed) {
                    return Err(status::TARGET_REMOVED);
                }
                if !reg.allowed(&node, self.ctx.pg_tag, initiator, ip) {
                    log::info!("iscsi: {initiator} from {ip} may not log in to {name} through portal group {}", self.ctx.pg_tag);
                    return Err(status::AUTHORIZATION_FAILURE);
                }
                self.queue_depth = node.queue_depth;
                self.node = Some(node);
            }
        }
        Ok(())
    }

    /// (disable, require, mutual, auth group) for this login.
    fn chap_policy(&self, reg: &Registry) -> (bool, bool, bool, u32) {
        match &self.node {
            Some(n) => (n.disable_chap, n.require_chap, n.mutual_chap, n.chap_group),
            None => {
                let o = &reg.options;
                (o.disable_chap, o.require_chap, o.mutual_chap, o.chap_group)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{AuthGroup, ChapSecret, InitiatorGroup, Netmask};
    use super::*;

    fn fixed_random(b: &mut [u8]) -> Result<(), getrandom::Error> {
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8 + 1;
        }
        Ok(())
    }

    fn failing_random(_: &mut [u8]) -> Result<(), getrandom::Error> {
        Err(getrandom::Error::UNSUPPORTED)
    }

    fn registry(require_chap: bool, mutual: bool) -> Registry {
        let mut r = Registry::default();
        r.initiator_groups.insert(
            1,
            InitiatorGroup {
                tag: 1,
                initiators: vec!["ANY".into()],
                netmasks: vec!["127.0.0.0/8".into()],
                parsed_netmasks: vec![Netmask::parse("127.0.0.0/8").unwrap()],
            },
        );
        r.auth_groups.insert(
            1,
            AuthGroup {
                tag: 1,
                secrets: vec![ChapSecret { user: "u".into(), secret: "s3cr3t".into(), muser: Some("tgt".into()), msecret: Some("m5ecret".into()) }],
            },
        );
        let node = TargetNode::new("iqn.t:vol0".into(), Some("alias".into()), 32, (false, require_chap, mutual, 1), (false, false), vec![(1, 1)], vec![]);
        r.nodes.insert("iqn.t:vol0".into(), Arc::new(node));
        r
    }

    fn ctx(peer: &str) -> LoginContext {
        LoginContext { pg_tag: 1, peer: peer.parse().unwrap(), local: "127.0.0.1:3260".parse().unwrap() }
    }

    fn req(flags: u8, keys: &[(&str, &str)]) -> (Bhs, Vec<u8>) {
        let mut d = Vec::new();
        for (k, v) in keys {
            text::push(&mut d, k, v);
        }
        let mut h = Bhs::new(opcode::LOGIN_REQ | 0x40);
        h.0[1] = flags;
        h.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        h.set_u32(24, 7);
        h.set_data_len(d.len() as u32);
        (h, d)
    }

    fn keys_of(resp: &[u8]) -> Vec<(String, String)> {
        let h = Bhs::from_slice(resp).unwrap();
        text::parse(&resp[BHS_LEN..BHS_LEN + h.data_len() as usize]).unwrap()
    }

    fn status_of(resp: &[u8]) -> (u8, u8) {
        (resp[36], resp[37])
    }

    #[test]
    fn login_without_auth_negotiates_and_completes() {
        let reg = registry(false, false);
        let mut l = Login::new(ctx("127.0.0.1:5000"), 100);
        let (h, d) =
            req(0x80 | (1 << 2) | 3, &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t:vol0"), ("MaxRecvDataSegmentLength", "65536"), ("InitialR2T", "No")]);
        match l.step(&reg, &h, &d) {
            Step::Complete(r, li) => {
                assert_eq!(status_of(&r), (0, 0));
                assert_eq!(r[1] & 0x83, 0x83, "transit to full feature");
                let k = keys_of(&r);
                assert!(k.contains(&("TargetPortalGroupTag".into(), "1".into())));
                assert!(k.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength"));
                assert_eq!(li.params.max_send_dsl, 65536);
                assert!(!li.params.initial_r2t);
                assert_eq!(li.exp_cmd_sn, 7);
                assert_eq!(u32::from_be_bytes([r[32], r[33], r[34], r[35]]), 7 + 31);
            }
            _ => panic!("login did not complete"),
        }
    }

    #[test]
    fn unknown_target_unauthorized_initiator_and_missing_name_fail() {
        let reg = registry(false, false);
        for (peer, keys, st) in [
            ("127.0.0.1:1", vec![("InitiatorName", "iqn.i"), ("TargetName", "iqn.t:nope")], status::NOT_FOUND),
            ("10.0.0.1:1", vec![("InitiatorName", "iqn.i"), ("TargetName", "iqn.t:vol0")], status::AUTHORIZATION_FAILURE),
            ("127.0.0.1:1", vec![("TargetName", "iqn.t:vol0")], status::MISSING_PARAMETER),
            ("127.0.0.1:1", vec![("InitiatorName", "iqn.i"), ("SessionType", "Weird")], status::SESSION_TYPE_NOT_SUPPORTED),
        ] {
            let mut l = Login::new(ctx(peer), 1);
            let (h, d) = req(0x80 | (1 << 2) | 3, &keys);
            match l.step(&reg, &h, &d) {
                Step::Fail(r) => assert_eq!(status_of(&r), st),
                _ => panic!("{keys:?} should fail"),
            }
        }
    }

    fn chap_login(reg: &Registry, secret: &str, mutual: bool) -> Result<Vec<(String, String)>, (u8, u8)> {
        let mut l = Login::new(ctx("127.0.0.1:5000"), 1).with_random(fixed_random);
        let (h, d) = req(0x80 | 1, &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t:vol0"), ("AuthMethod", "CHAP,None")]);
        let Step::Continue(r) = l.step(reg, &h, &d) else { return Err((9, 9)) };
        assert!(keys_of(&r).contains(&("AuthMethod".into(), "CHAP".into())));
        assert_eq!(r[1] & 0x80, 0, "no transit before authentication");
        let (h, d) = req(0, &[("CHAP_A", "5")]);
        let Step::Continue(r) = l.step(reg, &h, &d) else { return Err((9, 9)) };
        let k = keys_of(&r);
        let id: u8 = k.iter().find(|(k, _)| k == "CHAP_I").unwrap().1.parse().unwrap();
        let c = chap::decode_binary(&k.iter().find(|(k, _)| k == "CHAP_C").unwrap().1).unwrap();
        let resp = chap::encode_hex(&chap::response(id, secret.as_bytes(), &c));
        let mut keys = vec![("CHAP_N", "u".to_string()), ("CHAP_R", resp)];
        if mutual {
            keys.push(("CHAP_I", "9".into()));
            keys.push(("CHAP_C", "0x0badc0de0badc0de".into()));
        }
        let kref: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (h, d) = req(0x80 | 1, &kref);
        match l.step(reg, &h, &d) {
            Step::Continue(r) => {
                assert_eq!(r[1] & 0x81, 0x81, "transit to the operational stage");
                Ok(keys_of(&r))
            }
            Step::Fail(r) => Err(status_of(&r)),
            Step::Complete(..) => Err((9, 9)),
        }
    }

    #[test]
    fn chap_login_is_refused_when_the_os_random_source_fails() {
        let reg = registry(true, false);
        let mut l = Login::new(ctx("127.0.0.1:5000"), 1).with_random(failing_random);
        let (h, d) = req(0x80 | 1, &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t:vol0"), ("AuthMethod", "CHAP,None")]);
        let Step::Continue(_) = l.step(&reg, &h, &d) else { panic!("AuthMethod is answered before any challenge") };
        let (h, d) = req(0, &[("CHAP_A", "5")]);
        match l.step(&reg, &h, &d) {
            Step::Fail(r) => {
                assert_eq!(status_of(&r), status::TARGET_ERROR);
                assert!(!keys_of(&r).iter().any(|(k, _)| k == "CHAP_C"), "no challenge without random bytes");
            }
            _ => panic!("a CHAP login without random bytes must be refused"),
        }
        assert_ne!(l.auth, Auth::Done);
    }

    #[test]
    fn os_random_fills_from_the_os() {
        // 32 bytes twice: equal (or all zero) only if nothing random was written.
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        os_random(&mut a).unwrap();
        os_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn chap_accepts_the_right_secret_and_refuses_a_wrong_one() {
        let reg = registry(true, false);
        assert!(chap_login(&reg, "s3cr3t", false).is_ok());
        assert_eq!(chap_login(&reg, "wrong", false).unwrap_err(), status::AUTH_FAILURE);
    }

    #[test]
    fn mutual_chap_answers_the_initiators_challenge() {
        let reg = registry(true, true);
        let k = chap_login(&reg, "s3cr3t", true).unwrap();
        let r = chap::decode_binary(&k.iter().find(|(k, _)| k == "CHAP_R").unwrap().1).unwrap();
        assert_eq!(r, chap::response(9, b"m5ecret", &chap::decode_binary("0x0badc0de0badc0de").unwrap()));
        assert_eq!(chap_login(&reg, "s3cr3t", false).unwrap_err(), status::AUTH_FAILURE, "mutual CHAP is required");
    }

    #[test]
    fn skipping_security_when_chap_is_required_fails() {
        let reg = registry(true, false);
        let mut l = Login::new(ctx("127.0.0.1:5000"), 1);
        let (h, d) = req(0x80 | (1 << 2) | 3, &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t:vol0")]);
        match l.step(&reg, &h, &d) {
            Step::Fail(r) => assert_eq!(status_of(&r), status::AUTH_FAILURE),
            _ => panic!("must fail"),
        }
    }

    #[test]
    fn discovery_session_needs_no_target() {
        let reg = registry(true, false);
        let mut l = Login::new(ctx("127.0.0.1:5000"), 1);
        let (h, d) = req(0x80 | (1 << 2) | 3, &[("InitiatorName", "iqn.i"), ("SessionType", "Discovery"), ("MaxBurstLength", "4096")]);
        match l.step(&reg, &h, &d) {
            Step::Complete(r, li) => {
                assert_eq!(li.session_type, SessionType::Discovery);
                assert!(keys_of(&r).contains(&("MaxBurstLength".into(), "Irrelevant".into())));
            }
            _ => panic!("discovery login must complete"),
        }
    }

    use proptest::prelude::*;

    fn any_pdu() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let keys = prop::sample::select(vec![
            "InitiatorName",
            "TargetName",
            "SessionType",
            "AuthMethod",
            "CHAP_A",
            "CHAP_N",
            "CHAP_R",
            "CHAP_I",
            "CHAP_C",
            "MaxRecvDataSegmentLength",
            "HeaderDigest",
            "MaxBurstLength",
            "FirstBurstLength",
            "X-odd",
        ]);
        let values = prop::sample::select(vec![
            "iqn.t:vol0",
            "iqn.i",
            "Discovery",
            "Normal",
            "CHAP,None",
            "None",
            "5",
            "u",
            "0x00ff",
            "0b/w==",
            "0",
            "99999999999",
            "CRC32C",
            "",
        ]);
        (prop::collection::vec(any::<u8>(), 48), prop::collection::vec((keys, values), 0..8), prop::collection::vec(any::<u8>(), 0..64), any::<bool>())
            .prop_map(|(mut h, kv, junk, raw)| {
                let mut d = Vec::new();
                for (k, v) in kv {
                    text::push(&mut d, k, v);
                }
                if raw {
                    d.extend_from_slice(&junk);
                }
                // Mostly login requests, with arbitrary flags, stages and fields.
                if h[0] & 0x80 == 0 {
                    h[0] = 0x43;
                }
                (h, d)
            })
    }

    proptest! {
        #[test]
        fn login_answers_any_sequence_of_requests(pdus in prop::collection::vec(any_pdu(), 1..6), open in any::<bool>()) {
            let reg = registry(!open, false);
            let mut l = Login::new(ctx("127.0.0.1:5000"), 1).with_random(fixed_random);
            for (h, d) in pdus {
                let bhs = Bhs::from_slice(&h).unwrap();
                match l.step(&reg, &bhs, &d) {
                    Step::Continue(r) => prop_assert_eq!(r[0], opcode::LOGIN_RESP),
                    Step::Complete(r, li) => {
                        prop_assert_eq!(r[36], 0);
                        prop_assert!(li.params.first_burst <= li.params.max_burst);
                        // Only an authenticated or open login completes.
                        if li.node.as_ref().is_some_and(|n| n.require_chap) {
                            prop_assert!(l.auth == Auth::Done);
                        }
                        break;
                    }
                    Step::Fail(r) => {
                        prop_assert!(r[36] != 0);
                        break;
                    }
                }
            }
        }
    }
}
