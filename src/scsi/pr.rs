//! SCSI persistent reservations (SPC-4 §5.13): the registrations and the reservation of one
//! logical unit, PERSISTENT RESERVE IN and OUT, the access rules every command is checked
//! against, the unit attentions they raise for other I_T nexuses, and APTPL persistence.
//!
//! The state of a bdev is shared by every logical unit on it (like its write gate): an
//! initiator sees one set of keys whatever target node or LUN it reaches the bdev through. It
//! sits behind a mutex; commands only take it while a registration exists (an atomic flag says
//! so), and PR commands are rare control commands.
//!
//! An I_T nexus is the initiator port (iSCSI: `name,i,0xISID`) with the target port
//! (`name,t,0xTPGT`). With APTPL set, the state is written to one small JSON file per bdev in
//! the data directory (temporary file, fsync, rename, fsync of the directory) before the PR OUT
//! command completes, and read back when a logical unit on the bdev is created again.

use super::sense::{asc, Sense, SenseKey};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// One I_T nexus: initiator port and target port, as names (case-folded: iSCSI names are
/// case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ItNexus {
    pub initiator: String,
    pub target: String,
}

impl ItNexus {
    /// The nexus of an iSCSI session: initiator name and ISID, target name and portal group.
    pub fn iscsi(initiator_name: &str, isid: [u8; 6], target_name: &str, tpgt: u16) -> ItNexus {
        let isid: String = isid.iter().map(|b| format!("{b:02x}")).collect();
        ItNexus {
            initiator: format!("{},i,0x{isid}", initiator_name.to_ascii_lowercase()),
            target: format!("{},t,0x{tpgt:04x}", target_name.to_ascii_lowercase()),
        }
    }

    /// An iSCSI TransportID naming this initiator port (SPC-4 §7.6.4.6, format 01b), or, for
    /// a registration made for every port of an initiator name (format 00b), the name.
    fn transport_id(&self) -> Vec<u8> {
        let mut name = self.initiator.as_bytes().to_vec();
        name.push(0);
        while name.len() % 4 != 0 || name.len() < 20 {
            name.push(0);
        }
        let format = if self.initiator.contains(",i,0x") { 0x40 } else { 0x00 };
        let mut t = vec![format | PROTO_ISCSI, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend_from_slice(&name);
        t
    }
}

const PROTO_ISCSI: u8 = 0x05;

/// Reservation types (SPC-4 Table 216).
pub mod rtype {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_RO: u8 = 5;
    pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
    pub const WRITE_EXCLUSIVE_AR: u8 = 7;
    pub const EXCLUSIVE_ACCESS_AR: u8 = 8;
}

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}
fn all_registrants(t: u8) -> bool {
    matches!(t, rtype::WRITE_EXCLUSIVE_AR | rtype::EXCLUSIVE_ACCESS_AR)
}
/// Types where every registrant has access (registrants-only and all-registrants).
fn registrants_have_access(t: u8) -> bool {
    matches!(t, 5..=8)
}
/// Types that let anybody read.
fn write_exclusive(t: u8) -> bool {
    matches!(t, rtype::WRITE_EXCLUSIVE | rtype::WRITE_EXCLUSIVE_RO | rtype::WRITE_EXCLUSIVE_AR)
}

/// How a command is checked against a persistent reservation (SPC-4 Table 43, SBC-3 Table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, TEST UNIT READY, PR IN/OUT, ...).
    Always,
    /// Reads the medium or describes it: conflicts only with the exclusive-access types.
    Read,
    /// Changes the medium or the unit: conflicts with every type.
    Write,
}

/// Most registrations of one unit (hosts × paths of a cluster; the state stays small).
pub const MAX_REGISTRATIONS: usize = 128;
/// Most unit attentions waiting for I_T nexuses that have not come back.
const MAX_PENDING_UAS: usize = 256;
/// Largest PR OUT parameter list: 24 bytes, or REGISTER AND MOVE's header and TransportID.
pub const MAX_PARAM_BYTES: u32 = 24 + 4 + 264;

/// PR OUT service actions.
pub mod sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
}

/// Why a PR command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Check(Sense),
}

impl From<Sense> for PrError {
    fn from(s: Sense) -> Self {
        PrError::Check(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Registration {
    /// The I_T nexus registered. Its initiator is a port (`name,i,0xISID`), or just a name
    /// when a TransportID of format 00b named the initiator (SPEC_I_PT, REGISTER AND MOVE):
    /// then every port of that name is registered.
    it: ItNexus,
    key: u64,
    /// ALL_TG_PT: registered with every target port of the initiator port, not just
    /// `it.target` (one registration: a key change through any of them changes it).
    #[serde(default)]
    all_tg_pt: bool,
}

/// Whether the I_T nexus `it` is one of those `pattern` (a registration's nexus, with
/// `all_tg_pt`) stands for.
fn nexus_matches(pattern: &ItNexus, all_tg_pt: bool, it: &ItNexus) -> bool {
    let initiator = pattern.initiator == it.initiator || it.initiator.strip_prefix(pattern.initiator.as_str()).is_some_and(|rest| rest.starts_with(",i,0x"));
    initiator && (all_tg_pt || pattern.target == it.target)
}

impl Registration {
    fn matches(&self, it: &ItNexus) -> bool {
        nexus_matches(&self.it, self.all_tg_pt, it)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    /// The holder (for the all-registrants types, every registrant holds it; this is the one
    /// that reserved).
    holder: ItNexus,
    rtype: u8,
}

/// What survives a restart (APTPL).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<Reservation>,
}

#[derive(Debug, Default)]
pub struct PrState {
    generation: u32,
    regs: Vec<Registration>,
    res: Option<Reservation>,
    aptpl: bool,
    /// Unit attentions established for registrations' I_T nexuses (nexus, ALL_TG_PT),
    /// reported by the next command of a nexus they stand for.
    pending: Vec<(ItNexus, bool, (u8, u8))>,
    /// Unit attentions established so far (the nexuses look when it moves).
    ua_count: u64,
}

/// A PR OUT command's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutCmd {
    pub sa: u8,
    pub scope: u8,
    pub rtype: u8,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

impl PrState {
    fn reg_of(&self, it: &ItNexus) -> Option<&Registration> {
        self.regs.iter().find(|r| r.matches(it))
    }

    fn key_of(&self, it: &ItNexus) -> Option<u64> {
        self.reg_of(it).map(|r| r.key)
    }

    /// Whether `it` holds the reservation: for the all-registrants types any registrant;
    /// otherwise any nexus of the holder's registration (all its target ports with ALL_TG_PT).
    fn is_holder(&self, it: &ItNexus) -> bool {
        match &self.res {
            None => false,
            Some(r) if all_registrants(r.rtype) => self.key_of(it).is_some(),
            Some(r) => self.reg_of(it).is_some_and(|reg| reg.matches(&r.holder)),
        }
    }

    /// Whether a command of kind `access` from `it` meets a reservation conflict.
    pub fn conflicts(&self, it: &ItNexus, access: Access) -> bool {
        let Some(r) = &self.res else { return false };
        if access == Access::Always || self.is_holder(it) {
            return false;
        }
        if registrants_have_access(r.rtype) && self.key_of(it).is_some() {
            return false;
        }
        match access {
            Access::Read => !write_exclusive(r.rtype),
            _ => true,
        }
    }

    /// Whether any registration or reservation exists (RESERVE(6) then conflicts).
    pub fn active(&self) -> bool {
        !self.regs.is_empty() || self.res.is_some()
    }

    /// Establishes a unit attention for the I_T nexuses of registration `r`.
    fn unit_attention(&mut self, r: &Registration, code: (u8, u8)) {
        if self.pending.iter().any(|(i, a, c)| i == &r.it && *a == r.all_tg_pt && *c == code) {
            return;
        }
        if self.pending.len() >= MAX_PENDING_UAS {
            // The oldest condition goes: a nexus gone for good must not pin memory.
            self.pending.remove(0);
        }
        self.pending.push((r.it.clone(), r.all_tg_pt, code));
        self.ua_count += 1;
    }

    /// Takes the unit attentions waiting for `it`.
    pub fn take_unit_attentions(&mut self, it: &ItNexus) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        self.pending.retain(|(i, all, c)| {
            if nexus_matches(i, *all, it) {
                out.push(*c);
                false
            } else {
                true
            }
        });
        out
    }

    fn unregister(&mut self, it: &ItNexus) {
        let was_holder = self.is_holder(it);
        self.regs.retain(|r| !r.matches(it));
        let Some(r) = &self.res else { return };
        if all_registrants(r.rtype) {
            // The reservation stays while any registrant is left.
            if self.regs.is_empty() {
                self.res = None;
            }
        } else if was_holder {
            let t = r.rtype;
            self.res = None;
            if matches!(t, rtype::WRITE_EXCLUSIVE_RO | rtype::EXCLUSIVE_ACCESS_RO) {
                for o in self.regs.clone() {
                    self.unit_attention(&o, asc::RESERVATIONS_RELEASED);
                }
            }
        }
    }

    /// PERSISTENT RESERVE OUT from `it` with parameter list `p`. Returns whether the state
    /// to persist changed.
    pub fn out(&mut self, it: &ItNexus, c: OutCmd, p: &[u8]) -> Result<bool, PrError> {
        if c.sa == sa::REGISTER_AND_MOVE {
            return self.register_and_move(it, c, p);
        }
        let spec_i_pt = p.len() > 20 && p[20] & 0x08 != 0;
        if spec_i_pt {
            // SPEC_I_PT: the list goes on with the TransportIDs' length and the TransportIDs.
            let ok = p.len() >= 28 && 28 + u32::from_be_bytes([p[24], p[25], p[26], p[27]]) as usize == p.len();
            if !ok {
                return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
            }
        } else if p.len() != 24 {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let key = be64(p, 0);
        let sa_key = be64(p, 8);
        let flags = p[20];
        // SPEC_I_PT is for REGISTER only (SPC-4 §6.16.3); ALL_TG_PT only matters to the two
        // register actions and is ignored by the others.
        if spec_i_pt && c.sa != sa::REGISTER {
            return Err(Sense::invalid_param(20, Some(3)).into());
        }
        let all_tg_pt = flags & 0x04 != 0;
        let aptpl = flags & 0x01 != 0;
        let mine = self.key_of(it);
        match c.sa {
            sa::REGISTER | sa::REGISTER_AND_IGNORE => {
                if c.sa == sa::REGISTER {
                    match mine {
                        None if key != 0 => return Err(PrError::Conflict),
                        Some(k) if k != key => return Err(PrError::Conflict),
                        _ => {}
                    }
                }
                match (mine, sa_key) {
                    // A registered nexus cannot name others (SPC-4 Table 52).
                    (Some(_), _) if spec_i_pt => return Err(Sense::invalid_cdb(1, Some(4)).into()),
                    (None, 0) => return Ok(false),
                    (None, k) => {
                        let mut new = vec![Registration { it: it.clone(), key: k, all_tg_pt }];
                        if spec_i_pt {
                            for (at, initiator) in iscsi_transport_ids(&p[28..]).map_err(|at| Sense::invalid_param(28 + at as u16, None))? {
                                let dest = ItNexus { initiator, target: it.target.clone() };
                                // A nexus already registered may not be named again; the
                                // issuer itself and repeats in the list add nothing.
                                if self.reg_of(&dest).is_some() {
                                    return Err(Sense::invalid_param(28 + at as u16, None).into());
                                }
                                if !new.iter().any(|r| r.it == dest) {
                                    new.push(Registration { it: dest, key: k, all_tg_pt });
                                }
                            }
                        }
                        if self.regs.len() + new.len() > MAX_REGISTRATIONS {
                            return Err(Sense::new(SenseKey::IllegalRequest, asc::INSUFFICIENT_REGISTRATION_RESOURCES).into());
                        }
                        self.regs.extend(new);
                    }
                    (Some(_), 0) => self.unregister(it),
                    (Some(_), k) => {
                        if let Some(r) = self.regs.iter_mut().find(|r| r.matches(it)) {
                            r.key = k;
                        }
                    }
                }
                self.aptpl = aptpl;
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            _ => {
                if mine != Some(key) {
                    return Err(PrError::Conflict);
                }
                match c.sa {
                    sa::RESERVE => self.reserve(it, c),
                    sa::RELEASE => self.release(it, c),
                    sa::CLEAR => {
                        for o in self.regs.clone() {
                            if !o.matches(it) {
                                self.unit_attention(&o, asc::RESERVATIONS_PREEMPTED);
                            }
                        }
                        self.regs.clear();
                        self.res = None;
                        self.generation = self.generation.wrapping_add(1);
                        Ok(true)
                    }
                    sa::PREEMPT | sa::PREEMPT_AND_ABORT => self.preempt(it, c, sa_key),
                    _ => Err(Sense::invalid_cdb(1, Some(4)).into()),
                }
            }
        }
    }

    fn check_scope_type(c: OutCmd) -> Result<(), PrError> {
        if c.scope != 0 {
            return Err(Sense::invalid_cdb(2, Some(7)).into());
        }
        if !valid_type(c.rtype) {
            return Err(Sense::invalid_cdb(2, Some(3)).into());
        }
        Ok(())
    }

    fn reserve(&mut self, it: &ItNexus, c: OutCmd) -> Result<bool, PrError> {
        Self::check_scope_type(c)?;
        match &self.res {
            None => {
                self.res = Some(Reservation { holder: it.clone(), rtype: c.rtype });
                Ok(true)
            }
            Some(r) if self.is_holder(it) && r.rtype == c.rtype => Ok(false),
            Some(_) => Err(PrError::Conflict),
        }
    }

    fn release(&mut self, it: &ItNexus, c: OutCmd) -> Result<bool, PrError> {
        let Some(r) = self.res.clone() else { return Ok(false) };
        if !self.is_holder(it) {
            return Ok(false);
        }
        if c.scope != 0 || c.rtype != r.rtype {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION).into());
        }
        self.res = None;
        if !matches!(r.rtype, rtype::WRITE_EXCLUSIVE | rtype::EXCLUSIVE_ACCESS) {
            for o in self.regs.clone() {
                if !o.matches(it) {
                    self.unit_attention(&o, asc::RESERVATIONS_RELEASED);
                }
            }
        }
        Ok(true)
    }

    fn preempt(&mut self, it: &ItNexus, c: OutCmd, sa_key: u64) -> Result<bool, PrError> {
        let res = self.res.clone();
        let holder_key = res.as_ref().and_then(|r| if all_registrants(r.rtype) { Some(0) } else { self.key_of(&r.holder) });
        let takes_reservation = match &res {
            None => false,
            Some(r) if all_registrants(r.rtype) => sa_key == 0,
            Some(_) => holder_key == Some(sa_key),
        };
        if takes_reservation {
            Self::check_scope_type(c)?;
        } else if sa_key == 0 {
            return Err(Sense::invalid_param(8, None).into());
        }
        // The registrations that go: every other one for an all-registrants preemption,
        // otherwise the ones with the key.
        let all = takes_reservation && sa_key == 0;
        let gone: Vec<Registration> = self.regs.iter().filter(|r| !r.matches(it) && (all || r.key == sa_key)).cloned().collect();
        if !takes_reservation && gone.is_empty() && !self.regs.iter().any(|r| r.key == sa_key) {
            return Err(PrError::Conflict);
        }
        self.regs.retain(|r| !gone.contains(r));
        for g in &gone {
            self.unit_attention(g, asc::REGISTRATIONS_PREEMPTED);
        }
        if takes_reservation {
            let old = res.map(|r| r.rtype);
            self.res = Some(Reservation { holder: it.clone(), rtype: c.rtype });
            if old != Some(c.rtype) {
                for o in self.regs.clone() {
                    if !o.matches(it) {
                        self.unit_attention(&o, asc::RESERVATIONS_RELEASED);
                    }
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(true)
    }

    fn register_and_move(&mut self, it: &ItNexus, c: OutCmd, p: &[u8]) -> Result<bool, PrError> {
        if p.len() < 24 {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let key = be64(p, 0);
        let sa_key = be64(p, 8);
        let unreg = p[17] & 0x02 != 0;
        let aptpl = p[17] & 0x01 != 0;
        let tid_len = u32::from_be_bytes([p[20], p[21], p[22], p[23]]) as usize;
        if 24 + tid_len > p.len() {
            return Err(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        match self.key_of(it) {
            None => return Err(PrError::Conflict),
            Some(k) if k != key => return Err(PrError::Conflict),
            _ => {}
        }
        let Some(r) = self.res.clone() else { return Err(PrError::Conflict) };
        if all_registrants(r.rtype) || !self.is_holder(it) {
            return Err(PrError::Conflict);
        }
        Self::check_scope_type(OutCmd { rtype: c.rtype, ..c })?;
        if sa_key == 0 {
            return Err(Sense::invalid_param(8, None).into());
        }
        let dest_initiator = match iscsi_transport_ids(&p[24..24 + tid_len]).as_deref() {
            Ok([(_, name)]) => name.clone(),
            _ => return Err(Sense::invalid_param(24, None).into()),
        };
        // The destination reaches the unit through the same target port.
        let dest = ItNexus { initiator: dest_initiator, target: it.target.clone() };
        if dest == *it {
            return Err(Sense::invalid_param(24, None).into());
        }
        match self.regs.iter_mut().find(|x| x.matches(&dest)) {
            Some(x) => x.key = sa_key,
            None => {
                if self.regs.len() >= MAX_REGISTRATIONS {
                    return Err(Sense::new(SenseKey::IllegalRequest, asc::INSUFFICIENT_REGISTRATION_RESOURCES).into());
                }
                self.regs.push(Registration { it: dest.clone(), key: sa_key, all_tg_pt: false });
            }
        }
        self.res = Some(Reservation { holder: dest, rtype: r.rtype });
        if unreg {
            self.regs.retain(|x| !x.matches(it));
        }
        self.aptpl = aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(true)
    }

    /// PERSISTENT RESERVE IN of service action `sa`.
    pub fn read(&self, sa: u8) -> Result<Vec<u8>, Sense> {
        let mut d = Vec::with_capacity(8 + 8 * self.regs.len());
        match sa {
            0 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                d.extend_from_slice(&((8 * self.regs.len()) as u32).to_be_bytes());
                for r in &self.regs {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            1 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                match &self.res {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        let key = if all_registrants(r.rtype) { 0 } else { self.key_of(&r.holder).unwrap_or(0) };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0; 4]);
                        d.push(0);
                        d.push(r.rtype & 0x0F);
                        d.extend_from_slice(&[0; 2]);
                    }
                }
            }
            2 => {
                d.extend_from_slice(&8u16.to_be_bytes());
                // CRH (RESERVE/RELEASE(6) conflict with persistent reservations), SIP_C, ATP_C,
                // PTPL_C.
                d.push(0x10 | 0x08 | 0x04 | 0x01);
                // TMV (the type mask is valid), PTPL_A.
                d.push(0x80 | u8::from(self.aptpl));
                d.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
                d.push(0x01);
                d.extend_from_slice(&[0; 2]);
            }
            3 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                d.extend_from_slice(&[0; 4]);
                for r in &self.regs {
                    let tid = r.it.transport_id();
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    let holder = self.is_holder(&r.it);
                    d.push(if r.all_tg_pt { 0x02 } else { 0 } | u8::from(holder));
                    d.push(if holder { self.res.as_ref().map(|x| x.rtype & 0x0F).unwrap_or(0) } else { 0 });
                    d.extend_from_slice(&[0; 4]);
                    // Relative target port 1 (see the Device Identification page).
                    d.extend_from_slice(&1u16.to_be_bytes());
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                }
                let len = (d.len() - 8) as u32;
                d[4..8].copy_from_slice(&len.to_be_bytes());
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        }
        Ok(d)
    }

    fn saved(&self) -> Saved {
        Saved { generation: self.generation, registrations: self.regs.clone(), reservation: self.res.clone() }
    }
}

/// What an iSCSI TransportID names (SPC-4 §7.6.4.6): an initiator port `name,i,0xISID`
/// (format 01b), or an initiator name (format 00b: every port of that name). None for other
/// protocols and malformed ones.
fn parse_iscsi_transport_id(t: &[u8]) -> Option<String> {
    if t.len() < 4 || t[0] & 0x3F != PROTO_ISCSI {
        return None;
    }
    let n = u16::from_be_bytes([t[2], t[3]]) as usize;
    let body = t.get(4..4 + n)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let s = std::str::from_utf8(&body[..end]).ok()?;
    match t[0] >> 6 {
        0 if !s.is_empty() && !s.to_ascii_lowercase().contains(",i,0x") => Some(s.to_ascii_lowercase()),
        1 => {
            let (name, isid) = s.split_once(",i,0x").or_else(|| s.split_once(",I,0X"))?;
            if name.is_empty() || isid.len() != 12 || !isid.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            Some(format!("{},i,0x{}", name.to_ascii_lowercase(), isid.to_ascii_lowercase()))
        }
        _ => None,
    }
}

/// Splits a run of iSCSI TransportIDs (each 4 bytes and its ADDITIONAL LENGTH) into what
/// they name, each with its offset; Err(offset) of the first one that is not understood.
fn iscsi_transport_ids(mut t: &[u8]) -> Result<Vec<(usize, String)>, usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while !t.is_empty() {
        let len = match t.get(2..4) {
            Some(l) => 4 + u16::from_be_bytes([l[0], l[1]]) as usize,
            None => return Err(at),
        };
        let Some(one) = t.get(..len) else { return Err(at) };
        out.push((at, parse_iscsi_transport_id(one).ok_or(at)?));
        t = &t[len..];
        at += len;
    }
    Ok(out)
}

/// The persistent reservation state of one bdev, shared by its logical units.
pub struct Pr {
    state: Mutex<PrState>,
    /// Mirrors `state.active()`, read without the lock by every command.
    active: AtomicBool,
    /// Bumped whenever a unit attention is established for some nexus.
    ua_generation: AtomicU64,
    /// Bumped after every change of the registrations or the reservation: nexuses cache their
    /// access against it, so that commands take the lock only after a change.
    changes: AtomicU64,
    /// Where APTPL state lives (None: not persisted, e.g. in unit tests).
    file: Option<PathBuf>,
}

impl Pr {
    pub fn new(file: Option<PathBuf>) -> Pr {
        let mut st = PrState::default();
        if let Some(f) = &file {
            match load(f) {
                Ok(Some(s)) => {
                    st.generation = s.generation;
                    st.regs = s.registrations;
                    st.regs.truncate(MAX_REGISTRATIONS);
                    st.res = s.reservation.filter(|r| valid_type(r.rtype));
                    st.aptpl = true;
                }
                Ok(None) => {}
                Err(e) => log::warn!("scsi: ignoring persistent reservations in {}: {e}", f.display()),
            }
        }
        let active = AtomicBool::new(st.active());
        Pr { state: Mutex::new(st), active, ua_generation: AtomicU64::new(0), changes: AtomicU64::new(0), file }
    }

    pub fn lock(&self) -> MutexGuard<'_, PrState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any registration or reservation exists (no lock).
    pub fn active(&self) -> bool {
        self.active.load(Relaxed)
    }

    pub fn ua_generation(&self) -> u64 {
        self.ua_generation.load(Relaxed)
    }

    /// The count of state changes (see [`Pr::access`]).
    pub fn changes(&self) -> u64 {
        self.changes.load(Acquire)
    }

    /// What `it` may do now, computed under the lock: (reads allowed, writes allowed).
    pub fn access(&self, it: &ItNexus) -> (bool, bool) {
        let st = self.lock();
        (!st.conflicts(it, Access::Read), !st.conflicts(it, Access::Write))
    }

    /// Runs a PR OUT; persists the result (APTPL) before returning.
    pub fn out(&self, it: &ItNexus, c: OutCmd, p: &[u8]) -> Result<(), PrError> {
        let mut st = self.lock();
        let was_aptpl = st.aptpl;
        let uas = st.ua_count;
        let r = st.out(it, c, p);
        self.active.store(st.active(), Relaxed);
        if matches!(r, Ok(true)) {
            self.changes.fetch_add(1, Release);
        }
        if st.ua_count != uas {
            self.ua_generation.fetch_add(1, Relaxed);
        }
        if let (Ok(true), Some(f)) = (&r, &self.file) {
            if st.aptpl || was_aptpl {
                // Nothing registered (a CLEAR, the last key unregistered with APTPL set):
                // nothing to keep, so the file goes too.
                let saved = (st.aptpl && st.active()).then(|| st.saved());
                // Written under the lock: the file always holds the latest state.
                if let Err(e) = store(f, saved.as_ref()) {
                    log::error!("scsi: cannot persist reservations to {}: {e}", f.display());
                    return Err(Sense::new(SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE).into());
                }
            }
        }
        r.map(|_| ())
    }
}

fn load(f: &Path) -> Result<Option<Saved>, String> {
    crate::state_file::load(f)
}

/// Writes (or, for None, removes) the state file atomically and durably.
fn store(f: &Path, s: Option<&Saved>) -> std::io::Result<()> {
    crate::state_file::store(f, s)
}

/// The PR state of each bdev with a logical unit, by bdev entry id.
static STATES: Mutex<Option<HashMap<u64, Weak<Pr>>>> = Mutex::new(None);

/// The shared state of bdev `id` (named `name`), persisted under `dir` when given.
pub fn for_bdev(id: u64, name: &str, dir: Option<&Path>) -> Arc<Pr> {
    let mut g = STATES.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(p) = map.get(&id).and_then(Weak::upgrade) {
        return p;
    }
    // Bdev names are file-name safe in practice; anything else is escaped.
    let file_name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect();
    let p = Arc::new(Pr::new(dir.map(|d| d.join(format!("{file_name}.json")))));
    map.insert(id, Arc::downgrade(&p));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(n: u8) -> ItNexus {
        ItNexus::iscsi(&format!("iqn.2026-01.test:h{n}"), [0x40, 0, 0, 0, 0, n], "iqn.t:x", 1)
    }

    fn params(key: u64, sa_key: u64, aptpl: bool) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = u8::from(aptpl);
        p
    }

    fn out(st: &mut PrState, who: u8, sa: u8, rtype: u8, key: u64, sa_key: u64) -> Result<bool, PrError> {
        st.out(&it(who), OutCmd { sa, scope: 0, rtype }, &params(key, sa_key, false))
    }

    fn keys(st: &PrState) -> Vec<u64> {
        let d = st.read(0).unwrap();
        d[8..].chunks(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn register_needs_the_current_key_and_ignore_does_not() {
        let mut st = PrState::default();
        assert_eq!(out(&mut st, 1, sa::REGISTER, 0, 5, 0xA), Err(PrError::Conflict), "unregistered with a nonzero key");
        out(&mut st, 1, sa::REGISTER, 0, 0, 0xA).unwrap();
        assert_eq!(out(&mut st, 1, sa::REGISTER, 0, 0xB, 0xC), Err(PrError::Conflict));
        out(&mut st, 1, sa::REGISTER, 0, 0xA, 0xC).unwrap();
        out(&mut st, 1, sa::REGISTER_AND_IGNORE, 0, 0x999, 0xD).unwrap();
        out(&mut st, 2, sa::REGISTER_AND_IGNORE, 0, 0, 0xE).unwrap();
        assert_eq!(keys(&st), vec![0xD, 0xE]);
        assert_eq!(u32::from_be_bytes(st.read(0).unwrap()[..4].try_into().unwrap()), 4, "PRgeneration counts registrations");
        out(&mut st, 1, sa::REGISTER, 0, 0xD, 0).unwrap();
        assert_eq!(keys(&st), vec![0xE]);
        // A wrong parameter list length.
        let e = st.out(&it(1), OutCmd { sa: sa::REGISTER, scope: 0, rtype: 0 }, &[0; 20]).unwrap_err();
        assert_eq!(e, PrError::Check(Sense::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR)));
    }

    #[test]
    fn access_per_type_for_holder_registrant_and_stranger() {
        use rtype::*;
        // (type, registrant can read, registrant can write, stranger can read, stranger can write)
        let table = [
            (WRITE_EXCLUSIVE, true, false, true, false),
            (EXCLUSIVE_ACCESS, false, false, false, false),
            (WRITE_EXCLUSIVE_RO, true, true, true, false),
            (EXCLUSIVE_ACCESS_RO, true, true, false, false),
            (WRITE_EXCLUSIVE_AR, true, true, true, false),
            (EXCLUSIVE_ACCESS_AR, true, true, false, false),
        ];
        for (t, rr, rw, sr, sw) in table {
            let mut st = PrState::default();
            out(&mut st, 1, sa::REGISTER, 0, 0, 1).unwrap();
            out(&mut st, 2, sa::REGISTER, 0, 0, 2).unwrap();
            out(&mut st, 1, sa::RESERVE, t, 1, 0).unwrap();
            assert!(!st.conflicts(&it(1), Access::Write) && !st.conflicts(&it(1), Access::Read), "type {t}: holder");
            assert_eq!(!st.conflicts(&it(2), Access::Read), rr, "type {t}: registrant read");
            assert_eq!(!st.conflicts(&it(2), Access::Write), rw, "type {t}: registrant write");
            assert_eq!(!st.conflicts(&it(3), Access::Read), sr, "type {t}: stranger read");
            assert_eq!(!st.conflicts(&it(3), Access::Write), sw, "type {t}: stranger write");
            assert!(!st.conflicts(&it(3), Access::Always));
            // READ RESERVATION: the holder's key, 0 for all-registrants types.
            let r = st.read(1).unwrap();
            assert_eq!((r[7], r[21] & 0x0F), (16, t));
            assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), if all_registrants(t) { 0 } else { 1 });
        }
    }

    #[test]
    fn reserve_release_and_their_errors() {
        let mut st = PrState::default();
        assert_eq!(out(&mut st, 1, sa::RESERVE, 1, 0, 0), Err(PrError::Conflict), "unregistered");
        out(&mut st, 1, sa::REGISTER, 0, 0, 1).unwrap();
        out(&mut st, 2, sa::REGISTER, 0, 0, 2).unwrap();
        assert!(matches!(out(&mut st, 1, sa::RESERVE, 2, 1, 0), Err(PrError::Check(_))), "type 2 is invalid");
        out(&mut st, 1, sa::RESERVE, rtype::EXCLUSIVE_ACCESS_RO, 1, 0).unwrap();
        out(&mut st, 1, sa::RESERVE, rtype::EXCLUSIVE_ACCESS_RO, 1, 0).expect("the holder reserves again");
        assert_eq!(out(&mut st, 2, sa::RESERVE, rtype::EXCLUSIVE_ACCESS_RO, 2, 0), Err(PrError::Conflict));
        assert_eq!(out(&mut st, 1, sa::RESERVE, rtype::EXCLUSIVE_ACCESS, 1, 0), Err(PrError::Conflict), "another type");
        out(&mut st, 2, sa::RELEASE, rtype::EXCLUSIVE_ACCESS_RO, 2, 0).expect("a non-holder's release does nothing");
        assert!(st.res.is_some());
        let e = out(&mut st, 1, sa::RELEASE, rtype::EXCLUSIVE_ACCESS, 1, 0).unwrap_err();
        assert_eq!(e, PrError::Check(Sense::new(SenseKey::IllegalRequest, asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)));
        out(&mut st, 1, sa::RELEASE, rtype::EXCLUSIVE_ACCESS_RO, 1, 0).unwrap();
        assert!(st.res.is_none());
        assert_eq!(st.take_unit_attentions(&it(2)), vec![asc::RESERVATIONS_RELEASED], "registrants-only release tells the others");
        assert!(st.take_unit_attentions(&it(1)).is_empty());
        // Exclusive access: a release raises nothing.
        out(&mut st, 1, sa::RESERVE, rtype::EXCLUSIVE_ACCESS, 1, 0).unwrap();
        out(&mut st, 1, sa::RELEASE, rtype::EXCLUSIVE_ACCESS, 1, 0).unwrap();
        assert!(st.take_unit_attentions(&it(2)).is_empty());
        // The holder unregistering ends its reservation.
        out(&mut st, 1, sa::RESERVE, rtype::WRITE_EXCLUSIVE, 1, 0).unwrap();
        out(&mut st, 1, sa::REGISTER, 0, 1, 0).unwrap();
        assert!(st.res.is_none());
    }

    #[test]
    fn all_registrants_reservation_outlives_its_creator() {
        let mut st = PrState::default();
        out(&mut st, 1, sa::REGISTER, 0, 0, 1).unwrap();
        out(&mut st, 2, sa::REGISTER, 0, 0, 2).unwrap();
        out(&mut st, 1, sa::RESERVE, rtype::EXCLUSIVE_ACCESS_AR, 1, 0).unwrap();
        out(&mut st, 2, sa::RESERVE, rtype::EXCLUSIVE_ACCESS_AR, 2, 0).expect("every registrant holds it");
        out(&mut st, 1, sa::REGISTER, 0, 1, 0).unwrap();
        assert!(st.res.is_some() && st.is_holder(&it(2)));
        assert!(st.conflicts(&it(1), Access::Read));
        out(&mut st, 2, sa::REGISTER, 0, 2, 0).unwrap();
        assert!(st.res.is_none(), "gone with the last registrant");
    }

    #[test]
    fn clear_and_preempt_raise_unit_attentions() {
        let mut st = PrState::default();
        for n in 1..=3 {
            out(&mut st, n, sa::REGISTER, 0, 0, n as u64).unwrap();
        }
        out(&mut st, 2, sa::RESERVE, rtype::WRITE_EXCLUSIVE, 2, 0).unwrap();
        // Preempting the holder's key: its registration and reservation go to the preemptor.
        out(&mut st, 1, sa::PREEMPT, rtype::EXCLUSIVE_ACCESS, 1, 2).unwrap();
        assert_eq!(keys(&st), vec![1, 3]);
        assert!(st.is_holder(&it(1)));
        assert_eq!(st.res.as_ref().map(|r| r.rtype), Some(rtype::EXCLUSIVE_ACCESS));
        assert_eq!(st.take_unit_attentions(&it(2)), vec![asc::REGISTRATIONS_PREEMPTED]);
        assert_eq!(st.take_unit_attentions(&it(3)), vec![asc::RESERVATIONS_RELEASED], "the type changed");
        // Preempting a key nobody has, or key 0 without an all-registrants reservation.
        assert_eq!(out(&mut st, 1, sa::PREEMPT, rtype::EXCLUSIVE_ACCESS, 1, 77), Err(PrError::Conflict));
        assert!(matches!(out(&mut st, 1, sa::PREEMPT, rtype::EXCLUSIVE_ACCESS, 1, 0), Err(PrError::Check(_))));
        // Preempting a registrant that holds nothing removes just its registration.
        out(&mut st, 1, sa::PREEMPT_AND_ABORT, rtype::EXCLUSIVE_ACCESS, 1, 3).unwrap();
        assert_eq!(keys(&st), vec![1]);
        assert_eq!(st.take_unit_attentions(&it(3)), vec![asc::REGISTRATIONS_PREEMPTED]);
        out(&mut st, 4, sa::REGISTER, 0, 0, 4).unwrap();
        out(&mut st, 4, sa::CLEAR, 0, 4, 0).unwrap();
        assert!(!st.active());
        assert_eq!(st.take_unit_attentions(&it(1)), vec![asc::RESERVATIONS_PREEMPTED]);
        assert!(st.take_unit_attentions(&it(4)).is_empty());
    }

    #[test]
    fn register_and_move_hands_the_reservation_over() {
        let mut st = PrState::default();
        out(&mut st, 1, sa::REGISTER, 0, 0, 1).unwrap();
        out(&mut st, 1, sa::RESERVE, rtype::WRITE_EXCLUSIVE, 1, 0).unwrap();
        let tid = it(2).transport_id();
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&1u64.to_be_bytes());
        p[8..16].copy_from_slice(&9u64.to_be_bytes());
        p[17] = 0x02; // UNREG
        p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        p.extend_from_slice(&tid);
        st.out(&it(1), OutCmd { sa: sa::REGISTER_AND_MOVE, scope: 0, rtype: rtype::WRITE_EXCLUSIVE }, &p).unwrap();
        assert_eq!(keys(&st), vec![9]);
        assert!(st.is_holder(&it(2)));
        // Moving to oneself is refused.
        let mut p2 = p.clone();
        p2[..8].copy_from_slice(&9u64.to_be_bytes());
        assert!(matches!(st.out(&it(2), OutCmd { sa: sa::REGISTER_AND_MOVE, scope: 0, rtype: 1 }, &p2), Err(PrError::Check(_))));
    }

    /// A REGISTER parameter list with `flags` (byte 20) and, with SPEC_I_PT, `tids`.
    fn params_with(key: u64, sa_key: u64, flags: u8, tids: &[Vec<u8>]) -> Vec<u8> {
        let mut p = params(key, sa_key, false);
        p[20] = flags;
        if flags & 0x08 != 0 {
            let all: Vec<u8> = tids.concat();
            p.extend_from_slice(&(all.len() as u32).to_be_bytes());
            p.extend_from_slice(&all);
        }
        p
    }

    /// A format-00b TransportID: an initiator name, every port of it.
    fn name_tid(name: &str) -> Vec<u8> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        while body.len() % 4 != 0 {
            body.push(0);
        }
        let mut t = vec![PROTO_ISCSI, 0];
        t.extend_from_slice(&(body.len() as u16).to_be_bytes());
        t.extend_from_slice(&body);
        t
    }

    fn reg(st: &mut PrState, who: &ItNexus, sa: u8, p: &[u8]) -> Result<bool, PrError> {
        st.out(who, OutCmd { sa, scope: 0, rtype: 0 }, p)
    }

    #[test]
    fn all_tg_pt_registers_the_initiator_port_with_every_target_port() {
        // Host 1 through two portal groups of the target: two I_T nexuses, one initiator port.
        let a = it(1);
        let b = ItNexus::iscsi("iqn.2026-01.test:h1", [0x40, 0, 0, 0, 0, 1], "iqn.t:x", 2);
        let mut st = PrState::default();
        reg(&mut st, &a, sa::REGISTER, &params_with(0, 0x10, 0, &[])).unwrap();
        assert_eq!(st.key_of(&b), None, "without ALL_TG_PT only the nexus that registered");
        reg(&mut st, &a, sa::REGISTER, &params_with(0x10, 0, 0, &[])).unwrap();
        reg(&mut st, &a, sa::REGISTER, &params_with(0, 0x11, 0x04, &[])).unwrap();
        assert_eq!(keys(&st), vec![0x11], "one registration");
        assert_eq!(st.key_of(&b), Some(0x11), "the other target port is registered too");
        assert_eq!(st.key_of(&it(2)), None);
        // Reserved through one port, held through both.
        st.out(&b, OutCmd { sa: sa::RESERVE, scope: 0, rtype: rtype::EXCLUSIVE_ACCESS }, &params(0x11, 0, false)).unwrap();
        assert!(!st.conflicts(&a, Access::Write) && !st.conflicts(&b, Access::Write));
        assert!(st.conflicts(&it(2), Access::Read));
        let d = st.read(3).unwrap();
        assert_eq!(d[20], 0x02 | 0x01, "ALL_TG_PT and R_HOLDER in READ FULL STATUS");
        assert_eq!(st.read(2).unwrap()[2] & 0x0C, 0x0C, "SIP_C and ATP_C");
        // Unregistering through either port ends the registration and the reservation.
        reg(&mut st, &a, sa::REGISTER, &params_with(0x11, 0, 0, &[])).unwrap();
        assert!(!st.active());
    }

    #[test]
    fn spec_i_pt_registers_the_named_initiators_or_nothing() {
        let mut st = PrState::default();
        let tids = [it(2).transport_id(), name_tid("iqn.2026-01.test:h3")];
        reg(&mut st, &it(1), sa::REGISTER, &params_with(0, 0x21, 0x08, &tids)).unwrap();
        assert_eq!(keys(&st), vec![0x21, 0x21, 0x21]);
        assert_eq!(st.key_of(&it(2)), Some(0x21));
        // A name (format 00b) registers every port of it, whatever its ISID.
        let h3_other_port = ItNexus::iscsi("iqn.2026-01.test:h3", [0x80, 1, 2, 3, 4, 5], "iqn.t:x", 1);
        assert_eq!(st.key_of(&h3_other_port), Some(0x21));
        assert_eq!(st.key_of(&it(4)), None);
        // The named ones hold their registration: host 2 reserves, host 3 changes its key.
        st.out(&it(2), OutCmd { sa: sa::RESERVE, scope: 0, rtype: rtype::WRITE_EXCLUSIVE }, &params(0x21, 0, false)).unwrap();
        reg(&mut st, &h3_other_port, sa::REGISTER, &params_with(0x21, 0x23, 0, &[])).unwrap();
        assert_eq!(keys(&st), vec![0x21, 0x21, 0x23]);
        let d = st.read(3).unwrap();
        let tids_back: Vec<String> = {
            let mut v = Vec::new();
            let mut at = 8;
            while at < d.len() {
                let n = u32::from_be_bytes(d[at + 20..at + 24].try_into().unwrap()) as usize;
                v.push(parse_iscsi_transport_id(&d[at + 24..at + 24 + n]).unwrap());
                at += 24 + n;
            }
            v
        };
        assert_eq!(tids_back, vec![it(1).initiator, it(2).initiator, "iqn.2026-01.test:h3".to_string()]);

        let before = keys(&st);
        let check = |r: Result<bool, PrError>| match r {
            Err(PrError::Check(s)) => (s.key as u8, s.asc, s.ascq),
            other => panic!("{other:?}"),
        };
        // A registered nexus may not use SPEC_I_PT.
        assert_eq!(check(reg(&mut st, &it(1), sa::REGISTER, &params_with(0x21, 0x22, 0x08, &[it(4).transport_id()]))), (5, 0x24, 0));
        // Naming a registered nexus, an unknown protocol, a truncated TransportID.
        assert_eq!(check(reg(&mut st, &it(4), sa::REGISTER, &params_with(0, 0x44, 0x08, &[it(5).transport_id(), it(2).transport_id()]))), (5, 0x26, 0));
        assert_eq!(check(reg(&mut st, &it(4), sa::REGISTER, &params_with(0, 0x44, 0x08, &[vec![0x06, 0, 0, 4, 1, 2, 3, 4]]))), (5, 0x26, 0));
        assert_eq!(check(reg(&mut st, &it(4), sa::REGISTER, &params_with(0, 0x44, 0x08, &[vec![0x45, 0, 0, 40, 1]]))), (5, 0x26, 0));
        // A length that disagrees with the list; SPEC_I_PT with another action.
        let mut p = params_with(0, 0x44, 0x08, &[it(5).transport_id()]);
        p.push(0);
        assert_eq!(check(reg(&mut st, &it(4), sa::REGISTER, &p)), (5, 0x1A, 0));
        assert_eq!(check(reg(&mut st, &it(4), sa::REGISTER_AND_IGNORE, &params_with(0, 0x44, 0x08, &[it(5).transport_id()]))), (5, 0x26, 0));
        assert_eq!(keys(&st), before, "a refused SPEC_I_PT registers nobody");
        assert_eq!(st.key_of(&it(5)), None);
    }

    #[test]
    fn full_status_and_capabilities() {
        let mut st = PrState::default();
        out(&mut st, 1, sa::REGISTER, 0, 0, 0x11).unwrap();
        out(&mut st, 1, sa::RESERVE, rtype::WRITE_EXCLUSIVE, 0x11, 0).unwrap();
        let d = st.read(3).unwrap();
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize, d.len() - 8);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 0x11);
        assert_eq!((d[20], d[21]), (1, rtype::WRITE_EXCLUSIVE), "R_HOLDER and type");
        let tid_len = u32::from_be_bytes(d[28..32].try_into().unwrap()) as usize;
        assert_eq!(parse_iscsi_transport_id(&d[32..32 + tid_len]).as_deref(), Some(it(1).initiator.as_str()));
        let c = st.read(2).unwrap();
        assert_eq!((c[1], c[2] & 0x01, c[3] & 0x80, c[4], c[5]), (8, 1, 0x80, 0xEA, 0x01));
        assert!(st.read(4).is_err());
    }

    #[test]
    fn aptpl_state_survives_a_restart_and_goes_when_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pr").join("bdev0.json");
        let a = Pr::new(Some(f.clone()));
        let c = |sa| OutCmd { sa, scope: 0, rtype: rtype::EXCLUSIVE_ACCESS };
        a.out(&it(1), c(sa::REGISTER), &params(0, 0x77, true)).unwrap();
        a.out(&it(1), c(sa::RESERVE), &params(0x77, 0, false)).unwrap();
        assert!(f.exists() && !f.with_extension("json.tmp").exists());
        drop(a);
        let b = Pr::new(Some(f.clone()));
        assert!(b.active());
        assert_eq!(keys(&b.lock()), vec![0x77]);
        assert!(b.lock().conflicts(&it(2), Access::Read));
        assert_eq!(b.lock().read(2).unwrap()[3] & 0x01, 1, "PTPL_A");
        // Registering again without APTPL turns persistence off: the file goes.
        b.out(&it(1), c(sa::REGISTER), &params(0x77, 0x78, false)).unwrap();
        assert!(!f.exists());
        // With APTPL on, a CLEAR leaves nothing to keep: the file goes as well.
        b.out(&it(1), c(sa::REGISTER), &params(0x78, 0x79, true)).unwrap();
        b.out(&it(2), c(sa::REGISTER), &params(0, 0x80, true)).unwrap();
        assert!(f.exists());
        b.out(&it(2), c(sa::CLEAR), &params(0x80, 0, false)).unwrap();
        assert!(!f.exists(), "an empty state is not kept");
        // A damaged file is ignored, not fatal.
        std::fs::write(&f, b"{not json").unwrap();
        assert!(!Pr::new(Some(f)).active());
    }
}
