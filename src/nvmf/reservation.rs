//! NVMe reservations (NVMe Base 2.0 §8.19) of one namespace: the registrants (keyed by the
//! 128-bit Host Identifier of Connect: controllers of one host share its registration), the
//! reservation and its type, the generation counter, the I/O commands Reservation Register,
//! Acquire, Release and Report, the access rules every I/O command is checked against, the
//! notifications they raise for other hosts, and persistence through power loss (PTPL).
//!
//! It is the NVMe analogue of `scsi::pr` and follows its ideas: the state sits behind a mutex
//! that I/O takes only while a registration exists (an atomic flag says so, so a namespace
//! nobody reserves pays one relaxed load per command), and a persisted state is written
//! atomically (temporary file, fsync, rename, fsync of the directory) before the command
//! completes. The rules differ enough (type codes, keys per host instead of per I_T nexus,
//! no REGISTER AND MOVE, notification log entries instead of unit attentions) that the two
//! share no code.
//!
//! Preempt (and Preempt and Abort) and Release with Clear drain: a command already handed to
//! the bdev cannot be recalled, so the command that takes a host's registration away completes
//! only after every command of that host admitted to the namespace before it has completed
//! ([`InFlight`] counts them per host, per core and per drain epoch; `io::reservation_drain`
//! waits). Without the wait, a write of a fenced head stalled in a slow device could land after
//! the new head's first write to the same blocks and overwrite it.
//!
//! What a drain waits for is "admitted before the change", not "the host has nothing in flight":
//! after a Clear (no reservation left) or a Preempt under Write Exclusive (anybody may read) the
//! unregistered host's new commands are still admitted, and a counter that only had to reach
//! zero would never do so under steady I/O. So every command is counted under the namespace's
//! drain epoch (one of two counters, by the epoch's parity); a drain advances the epoch after
//! the state change and waits for the counters of the epoch it closed.
//!
//! Which changes drain: Preempt and Clear take registrations from hosts that did not ask, so
//! those hosts' admitted commands are waited for (Clear: every registrant it unregisters, the
//! issuer included). A Register with Replace changes a key and no access right; an Unregister
//! or a Release (even by the holder, even where it lets other hosts write) is the host's own
//! act on its own commands: NVMe leaves the order of a host's outstanding commands to the
//! controller (a command sent later may complete first), so a host that wants its writes done
//! before other hosts may write waits for their completions before it unregisters or releases,
//! as SCSI initiators do before RELEASE; and the host is still there to do so, unlike a fenced
//! one. Those complete at once. Any Acquire also waits for a drain still under way (a retried
//! Acquire, see [`Reservations::drain`]).

use super::spec::{sc, Status};
use crossbeam_utils::CachePadded;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

/// A host as reservations know it: the Host Identifier of its Connect.
pub type HostId = [u8; 16];

/// Reservation types (NVMe Base 2.0 Figure 484).
pub mod rtype {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 2;
    pub const WRITE_EXCLUSIVE_RO: u8 = 3;
    pub const EXCLUSIVE_ACCESS_RO: u8 = 4;
    pub const WRITE_EXCLUSIVE_AR: u8 = 5;
    pub const EXCLUSIVE_ACCESS_AR: u8 = 6;
}

fn valid_type(t: u8) -> bool {
    (1..=6).contains(&t)
}
/// Every registrant holds the reservation.
fn all_registrants(t: u8) -> bool {
    matches!(t, rtype::WRITE_EXCLUSIVE_AR | rtype::EXCLUSIVE_ACCESS_AR)
}
/// Registrants that do not hold it still have access (registrants-only, all-registrants).
fn registrants_have_access(t: u8) -> bool {
    t >= rtype::WRITE_EXCLUSIVE_RO
}
/// Anybody may read.
fn write_exclusive(t: u8) -> bool {
    matches!(t, rtype::WRITE_EXCLUSIVE | rtype::WRITE_EXCLUSIVE_RO | rtype::WRITE_EXCLUSIVE_AR)
}

/// Reservation capabilities (Identify Namespace RESCAP): every type, Ignore Existing Key,
/// and bit 0 (persistence through power loss) when the namespace has a `ptpl_file`.
pub fn rescap(ptpl: bool) -> u8 {
    0xFE | ptpl as u8
}

/// How an I/O command is checked against a reservation (NVMe Base 2.0 Figure 485).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read, Compare, Verify.
    Read,
    /// Write, Write Zeroes, Dataset Management, Flush, ...
    Write,
}

/// Notification log entry types (log page 80h, Figure 283).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Notice {
    RegistrationPreempted = 1,
    ReservationReleased = 2,
    ReservationPreempted = 3,
}

impl Notice {
    /// Its bit in the Reservation Notification Mask feature (82h).
    pub fn mask_bit(self) -> u32 {
        1 << (self as u8)
    }
}

/// Why a reservation command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResvError {
    /// Reservation Conflict (wrong key, not registered, held by another host).
    Conflict,
    /// Invalid Field in Command (bad action or type, zero key where one is needed).
    InvalidField,
    /// Report without EDS while host identifiers do not fit 64 bits.
    HostIdFormat,
    /// The state could not be persisted (PTPL); the change is kept in memory.
    Persist(String),
}

/// Generic status: Host Identifier Inconsistent Format.
pub const SC_HOSTID_INCONSISTENT_FORMAT: u8 = 0x18;
/// Generic status (NVM command set): Reservation Conflict.
pub const SC_RESERVATION_CONFLICT: u8 = 0x83;

impl ResvError {
    pub fn status(&self) -> Status {
        match self {
            ResvError::Conflict => Status::generic(SC_RESERVATION_CONFLICT),
            ResvError::InvalidField => Status::generic(sc::INVALID_FIELD),
            ResvError::HostIdFormat => Status::generic(SC_HOSTID_INCONSISTENT_FORMAT),
            ResvError::Persist(_) => Status::generic(sc::INTERNAL),
        }
    }
}

/// The host-given fields of a reservation command (CDW10 and the data), parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Reservation Register: RREGA, IEKEY, CPTPL, CRKEY, NRKEY.
    Register { action: u8, iekey: bool, cptpl: u8, crkey: u64, nrkey: u64 },
    /// Reservation Acquire: RACQA, IEKEY, RTYPE, CRKEY, PRKEY.
    Acquire { action: u8, iekey: bool, rtype: u8, crkey: u64, prkey: u64 },
    /// Reservation Release: RRELA, IEKEY, RTYPE, CRKEY.
    Release { action: u8, iekey: bool, rtype: u8, crkey: u64 },
}

fn le64(d: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = d.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

impl Command {
    /// The command of opcode `opc` with CDW10 `cdw10` and host data `data` (16 bytes for
    /// Register and Acquire, 8 for Release); None when the data is short.
    pub fn parse(opc: u8, cdw10: u32, data: &[u8]) -> Option<Command> {
        let action = (cdw10 & 0x7) as u8;
        let iekey = cdw10 & (1 << 3) != 0;
        let rtype = (cdw10 >> 8) as u8;
        match opc {
            super::spec::io_opc::RESERVATION_REGISTER => {
                Some(Command::Register { action, iekey, cptpl: (cdw10 >> 30) as u8, crkey: le64(data, 0)?, nrkey: le64(data, 8)? })
            }
            super::spec::io_opc::RESERVATION_ACQUIRE => Some(Command::Acquire { action, iekey, rtype, crkey: le64(data, 0)?, prkey: le64(data, 8)? }),
            super::spec::io_opc::RESERVATION_RELEASE => Some(Command::Release { action, iekey, rtype, crkey: le64(data, 0)? }),
            _ => None,
        }
    }

    /// Bytes of host data the command carries.
    pub fn data_len(opc: u8) -> usize {
        if opc == super::spec::io_opc::RESERVATION_RELEASE {
            8
        } else {
            16
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registrant {
    host: HostId,
    key: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    /// The host that acquired it (for the all-registrants types every registrant holds it).
    holder: HostId,
    rtype: u8,
}

/// The reservation state of a namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResvState {
    generation: u32,
    regs: Vec<Registrant>,
    res: Option<Reservation>,
    /// Persist Through Power Loss State (PTPLS), set by the host.
    ptpl: bool,
}

/// Most registrants of one namespace (hosts of a cluster; keeps the state and Report small).
pub const MAX_REGISTRANTS: usize = 64;

/// What a successful command did: whether the state changed (and must be persisted), and
/// the notifications for other hosts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub changed: bool,
    pub notices: Vec<(HostId, Notice)>,
    /// The hosts whose registration this command took away without their asking (Preempt,
    /// Preempt and Abort, Clear): their commands admitted before it must complete before it
    /// does (see the module's comment on which changes drain).
    pub unregistered: Vec<HostId>,
}

impl Outcome {
    /// The hosts whose registration a Preempt (or Preempt and Abort) removed: their commands
    /// admitted before it must drain before the Acquire completes.
    pub fn preempted(&self) -> impl Iterator<Item = HostId> + '_ {
        self.notices.iter().filter(|(_, n)| *n == Notice::RegistrationPreempted).map(|(h, _)| *h)
    }
}

impl ResvState {
    fn key_of(&self, h: &HostId) -> Option<u64> {
        self.regs.iter().find(|r| &r.host == h).map(|r| r.key)
    }

    fn is_holder(&self, h: &HostId) -> bool {
        match &self.res {
            None => false,
            Some(r) if all_registrants(r.rtype) => self.key_of(h).is_some(),
            Some(r) => &r.holder == h,
        }
    }

    /// Whether a command of kind `access` from host `h` meets a reservation conflict.
    pub fn conflicts(&self, h: &HostId, access: Access) -> bool {
        let Some(r) = &self.res else { return false };
        if self.is_holder(h) || (registrants_have_access(r.rtype) && self.key_of(h).is_some()) {
            return false;
        }
        match access {
            Access::Read => !write_exclusive(r.rtype),
            Access::Write => true,
        }
    }

    /// Whether anything is registered (I/O then checks access).
    pub fn active(&self) -> bool {
        !self.regs.is_empty() || self.res.is_some()
    }

    pub fn ptpl(&self) -> bool {
        self.ptpl
    }

    /// The registrants other than `h`.
    fn others(&self, h: &HostId) -> impl Iterator<Item = HostId> + '_ {
        let h = *h;
        self.regs.iter().map(|r| r.host).filter(move |x| *x != h)
    }

    /// Host `h` checks its key `crkey` (unless IEKEY): its current key, or a conflict.
    fn check_key(&self, h: &HostId, iekey: bool, crkey: u64) -> Result<u64, ResvError> {
        match self.key_of(h) {
            Some(k) if iekey || k == crkey => Ok(k),
            _ => Err(ResvError::Conflict),
        }
    }

    /// Drops the reservation; the other registrants hear of it for the types whose release
    /// changes what they may do (not plain Write Exclusive / Exclusive Access).
    fn release_reservation(&mut self, by: &HostId, out: &mut Outcome) {
        if let Some(r) = self.res.take() {
            if !matches!(r.rtype, rtype::WRITE_EXCLUSIVE | rtype::EXCLUSIVE_ACCESS) {
                out.notices.extend(self.others(by).map(|x| (x, Notice::ReservationReleased)));
            }
        }
    }

    /// Removes the registration of `h` (and the reservation if it goes with it).
    fn unregister(&mut self, h: &HostId, out: &mut Outcome) {
        self.regs.retain(|r| &r.host != h);
        match self.res {
            // An all-registrants reservation lives while anybody is registered.
            Some(r) if all_registrants(r.rtype) && self.regs.is_empty() => self.res = None,
            Some(r) if all_registrants(r.rtype) => {}
            Some(r) if &r.holder == h => self.release_reservation(h, out),
            _ => {}
        }
    }

    /// Runs a Register, Acquire or Release of host `h`. `ptpl_capable`: the namespace can
    /// persist (has a `ptpl_file`).
    pub fn execute(&mut self, h: &HostId, c: Command, ptpl_capable: bool) -> Result<Outcome, ResvError> {
        let mut out = Outcome::default();
        match c {
            Command::Register { action, iekey, cptpl, crkey, nrkey } => {
                // Validate everything before changing anything.
                let new_ptpl = match cptpl {
                    0 => None,
                    2 => Some(false),
                    3 if ptpl_capable => Some(true),
                    _ => return Err(ResvError::InvalidField),
                };
                match (action, self.key_of(h)) {
                    // Register: a new registrant, or a repeat with the same key.
                    (0, None) => {
                        if nrkey == 0 {
                            return Err(ResvError::InvalidField);
                        }
                        if self.regs.len() >= MAX_REGISTRANTS {
                            return Err(ResvError::Conflict);
                        }
                        self.regs.push(Registrant { host: *h, key: nrkey });
                        out.changed = true;
                    }
                    (0, Some(k)) if k == nrkey => {}
                    (0, Some(_)) => return Err(ResvError::Conflict),
                    // Unregister.
                    (1, _) => {
                        self.check_key(h, iekey, crkey)?;
                        self.unregister(h, &mut out);
                        out.changed = true;
                    }
                    // Replace; with IEKEY it registers a host that is not registered yet.
                    (2, k) => {
                        if nrkey == 0 {
                            return Err(ResvError::InvalidField);
                        }
                        match k {
                            Some(_) => {
                                self.check_key(h, iekey, crkey)?;
                                if let Some(r) = self.regs.iter_mut().find(|r| &r.host == h) {
                                    r.key = nrkey;
                                }
                            }
                            None if iekey && self.regs.len() < MAX_REGISTRANTS => self.regs.push(Registrant { host: *h, key: nrkey }),
                            None => return Err(ResvError::Conflict),
                        }
                        out.changed = true;
                    }
                    _ => return Err(ResvError::InvalidField),
                }
                if out.changed {
                    self.generation = self.generation.wrapping_add(1);
                }
                if let Some(p) = new_ptpl {
                    out.changed |= p != self.ptpl;
                    self.ptpl = p;
                }
            }
            Command::Acquire { action, iekey, rtype, crkey, prkey } => {
                if !valid_type(rtype) || action > 2 {
                    return Err(ResvError::InvalidField);
                }
                self.check_key(h, iekey, crkey)?;
                if action == 0 {
                    match self.res {
                        None => {
                            self.res = Some(Reservation { holder: *h, rtype });
                            out.changed = true;
                        }
                        Some(r) if self.is_holder(h) && r.rtype == rtype => {}
                        Some(_) => return Err(ResvError::Conflict),
                    }
                    return Ok(out);
                }
                self.preempt(h, rtype, prkey, &mut out)?;
                self.generation = self.generation.wrapping_add(1);
                out.changed = true;
            }
            Command::Release { action, iekey, rtype, crkey } => {
                self.check_key(h, iekey, crkey)?;
                match action {
                    0 => match self.res {
                        // Releasing what one does not hold succeeds and changes nothing.
                        Some(r) if self.is_holder(h) => {
                            if r.rtype != rtype {
                                return Err(ResvError::InvalidField);
                            }
                            self.release_reservation(h, &mut out);
                            out.changed = true;
                        }
                        _ => {}
                    },
                    1 => {
                        out.notices.extend(self.others(h).map(|x| (x, Notice::ReservationPreempted)));
                        // Every registrant, the issuer too: the issuer's own commands in flight
                        // are waited for as well (it costs nothing more and needs no exception).
                        out.unregistered.extend(self.regs.iter().map(|r| r.host));
                        self.regs.clear();
                        self.res = None;
                        self.generation = self.generation.wrapping_add(1);
                        out.changed = true;
                    }
                    _ => return Err(ResvError::InvalidField),
                }
            }
        }
        Ok(out)
    }

    /// Preempt (and Preempt and Abort) by registrant `h` of the registrants with key `prkey`
    /// (NVMe Base 2.0 §8.19.7): the issuing host itself is never unregistered.
    fn preempt(&mut self, h: &HostId, rtype: u8, prkey: u64, out: &mut Outcome) -> Result<(), ResvError> {
        let remove_key = |st: &mut ResvState, key: Option<u64>, out: &mut Outcome| -> bool {
            let gone: Vec<HostId> = st.regs.iter().filter(|r| &r.host != h && key.is_none_or(|k| r.key == k)).map(|r| r.host).collect();
            st.regs.retain(|r| !gone.contains(&r.host));
            out.notices.extend(gone.iter().map(|x| (*x, Notice::RegistrationPreempted)));
            out.unregistered.extend(gone.iter().copied());
            !gone.is_empty()
        };
        match self.res {
            None => {
                if prkey == 0 {
                    return Err(ResvError::InvalidField);
                }
                if !remove_key(self, Some(prkey), out) {
                    return Err(ResvError::Conflict);
                }
            }
            Some(r) if all_registrants(r.rtype) => {
                if prkey == 0 {
                    // Everybody else goes; the issuer holds a new reservation of RTYPE.
                    remove_key(self, None, out);
                    self.res = Some(Reservation { holder: *h, rtype });
                } else if !remove_key(self, Some(prkey), out) {
                    return Err(ResvError::Conflict);
                }
            }
            Some(r) => {
                let holder_key = self.key_of(&r.holder);
                if holder_key == Some(prkey) {
                    // The holder is preempted: its registration goes (it hears of that) and
                    // the issuer takes the reservation; a holder preempting itself keeps its
                    // registration and changes the type.
                    remove_key(self, Some(prkey), out);
                    self.res = Some(Reservation { holder: *h, rtype });
                } else {
                    if prkey == 0 {
                        return Err(ResvError::InvalidField);
                    }
                    if !remove_key(self, Some(prkey), out) {
                        return Err(ResvError::Conflict);
                    }
                }
            }
        }
        Ok(())
    }

    /// The Reservation Status data structure (Figure 494/495) for a controller whose host
    /// is `_h`, extended (128-bit host identifiers) with `eds`. `cntlid_of` names the
    /// controller of a registrant's host (FFFFh: none connected, as "dynamic").
    pub fn report(&self, eds: bool, cntlid_of: impl Fn(&HostId) -> Option<u16>) -> Result<Vec<u8>, ResvError> {
        if !eds && self.regs.iter().any(|r| r.host[8..] != [0u8; 8]) {
            // 128-bit identifiers do not fit the regular structure's 64-bit field.
            return Err(ResvError::HostIdFormat);
        }
        let (head, each) = if eds { (64, 64) } else { (24, 24) };
        let mut d = vec![0u8; head + each * self.regs.len()];
        d[0..4].copy_from_slice(&self.generation.to_le_bytes());
        d[4] = self.res.map_or(0, |r| r.rtype);
        d[5..7].copy_from_slice(&(self.regs.len() as u16).to_le_bytes());
        d[9] = self.ptpl as u8;
        for (i, r) in self.regs.iter().enumerate() {
            let e = &mut d[head + i * each..head + (i + 1) * each];
            e[0..2].copy_from_slice(&cntlid_of(&r.host).unwrap_or(0xFFFF).to_le_bytes());
            e[2] = self.is_holder(&r.host) as u8;
            if eds {
                e[8..16].copy_from_slice(&r.key.to_le_bytes());
                e[16..32].copy_from_slice(&r.host);
            } else {
                e[8..16].copy_from_slice(&r.host[..8]);
                e[16..24].copy_from_slice(&r.key.to_le_bytes());
            }
        }
        Ok(d)
    }

    fn saved(&self, bdev_uuid: Uuid) -> Saved {
        Saved {
            ptpl: self.ptpl,
            generation: self.generation,
            rtype: self.res.map_or(0, |r| r.rtype),
            crkey: self.res.and_then(|r| self.key_of(&r.holder)).unwrap_or(0),
            bdev_uuid: bdev_uuid.to_string(),
            holder_uuid: self.res.map(|r| Uuid::from_bytes(r.holder).to_string()),
            registrants: self.regs.iter().map(|r| SavedRegistrant { rkey: r.key, host_uuid: Uuid::from_bytes(r.host).to_string() }).collect(),
        }
    }

    fn from_saved(s: Saved) -> Result<ResvState, String> {
        let mut regs = Vec::new();
        for r in s.registrants.iter().take(MAX_REGISTRANTS) {
            let host = Uuid::parse_str(&r.host_uuid).map_err(|e| format!("host_uuid {:?}: {e}", r.host_uuid))?;
            regs.push(Registrant { host: *host.as_bytes(), key: r.rkey });
        }
        let res = match (&s.holder_uuid, s.rtype) {
            (Some(h), t) if valid_type(t) => {
                let holder = *Uuid::parse_str(h).map_err(|e| format!("holder_uuid {h:?}: {e}"))?.as_bytes();
                Some(Reservation { holder, rtype: t })
            }
            _ => None,
        };
        Ok(ResvState { generation: s.generation, regs, res, ptpl: s.ptpl })
    }
}

/// The persisted state: SPDK's `ptpl_file` fields (so a file moves between the two as far as
/// the fields go), with the generation added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    ptpl: bool,
    #[serde(default)]
    generation: u32,
    #[serde(default)]
    rtype: u8,
    #[serde(default)]
    crkey: u64,
    #[serde(default)]
    bdev_uuid: String,
    #[serde(default)]
    holder_uuid: Option<String>,
    #[serde(default)]
    registrants: Vec<SavedRegistrant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedRegistrant {
    rkey: u64,
    host_uuid: String,
}

/// One host's commands admitted to a namespace and not yet completed, counted on the core
/// each runs on (a host's queues live on several cores; one shared counter would move its cache
/// line between them on every command) and under the parity of the namespace's drain epoch
/// (see the module's comment). A drain sums over the cores.
pub struct InFlight {
    /// Indexed by core (cores past the end share the last); in each, the commands admitted
    /// under an even and under an odd epoch.
    cores: Box<[CachePadded<[AtomicU32; 2]>]>,
    /// One counter for callers that count outside the per-core path
    /// ([`Reservations::in_flight_counter`], the simulation's legs): a drain waits for it to
    /// read zero, without epochs.
    shared: Arc<AtomicU32>,
}

impl InFlight {
    fn new(cores: usize) -> InFlight {
        InFlight { cores: (0..cores.max(1)).map(|_| CachePadded::new([AtomicU32::new(0), AtomicU32::new(0)])).collect(), shared: Arc::new(AtomicU32::new(0)) }
    }

    /// Commands counted under epoch parity `p`, over every core.
    fn count(&self, p: usize) -> u64 {
        self.cores.iter().map(|c| c[p].load(SeqCst) as u64).sum()
    }

    /// Every command counted, both parities and the shared counter (tests, diagnostics).
    pub fn total(&self) -> u64 {
        self.count(0) + self.count(1) + self.shared.load(SeqCst) as u64
    }

    /// Ends command `t`: the counter it was counted in goes down, whichever core this runs on.
    pub fn leave(&self, t: Ticket) {
        let prev = self.cores[t.core][t.parity].fetch_sub(1, SeqCst);
        debug_assert!(prev > 0, "an in-flight counter went below zero: a ticket left twice or on another host's counter");
    }
}

/// Where one admitted command is counted: given by [`Reservations::admit`], given back once
/// to [`InFlight::leave`] of the same host (so the decrement hits the counter of the
/// increment, even if the command ends on another core).
#[derive(Debug)]
pub struct Ticket {
    core: usize,
    parity: usize,
}

/// The drain epoch and every host's counters of one namespace; shared with the drains, which
/// outlive the command that started them.
struct FlightTable {
    /// Advanced by each drain after its state change; its parity picks the counter a new
    /// command is counted in.
    epoch: AtomicU64,
    /// Kept while a queue, a drain or a shared-counter user holds the host's counters, or
    /// while they count anything. Taken when a queue first uses the namespace and by drains,
    /// never per I/O.
    hosts: Mutex<Vec<(HostId, Arc<InFlight>)>>,
}

impl FlightTable {
    fn hosts(&self) -> MutexGuard<'_, Vec<(HostId, Arc<InFlight>)>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advances the epoch from e to e+1 if nothing of epoch e-1 is in flight on any host (its
    /// parity becomes current again; were commands of e-1 still counted there, a drain waiting
    /// for them would see new commands join them and might never end). Returns the parity of
    /// e, whose counters the caller's drain waits for.
    fn try_advance(&self) -> Option<usize> {
        // Under the lock: advances are serialised, and no host is added unseen.
        let hosts = self.hosts();
        let e = self.epoch.load(SeqCst);
        let next = ((e + 1) & 1) as usize;
        if hosts.iter().any(|(_, f)| f.count(next) > 0) {
            return None;
        }
        self.epoch.store(e + 1, SeqCst);
        Some((e & 1) as usize)
    }
}

/// A drain under way: done when the epoch was advanced after the state change and the
/// commands the hosts it waits for had admitted before have all completed.
pub struct Drain {
    table: Arc<FlightTable>,
    hosts: Vec<Arc<InFlight>>,
    /// The parity of the epoch this drain closed; [`Drain::NOT_ADVANCED`] until then.
    parity: AtomicU8,
}

impl Drain {
    const NOT_ADVANCED: u8 = u8::MAX;

    /// Whether the drain is over (advances the epoch first when it can). Polled: a drain is
    /// rare and the data path stays free of wake-ups.
    pub fn done(&self) -> bool {
        let mut p = self.parity.load(Relaxed);
        if p == Self::NOT_ADVANCED {
            match self.table.try_advance() {
                Some(x) => {
                    p = x as u8;
                    self.parity.store(p, Relaxed);
                }
                None => return false,
            }
        }
        // A command counted under the closed epoch's parity was either admitted before the
        // advance (and so possibly before the state change) or read the epoch before it and
        // was checked against the new state: both only go down now, as new commands count
        // under the other parity.
        self.hosts.iter().all(|f| f.count(p as usize) == 0 && f.shared.load(SeqCst) == 0)
    }

    /// How many hosts' commands it waits for (besides the advance).
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }
}

/// The reservation state of a namespace, shared by every controller that reaches it.
pub struct Reservations {
    state: Mutex<ResvState>,
    /// Mirrors `state.active()`, read without the lock by every I/O command.
    active: AtomicBool,
    /// Commands refused with Reservation Conflict.
    pub conflicts: AtomicU64,
    /// Where the state persists (`ptpl_file`); None: the namespace cannot persist.
    file: Option<PathBuf>,
    bdev_uuid: Uuid,
    /// Commands admitted and not yet completed, per host (each queue holds its host's from its
    /// namespace cache, a running command through its queue's, so a host's counters outlive a
    /// closed controller whose commands are still at the bdev), and the drain epoch.
    flight: Arc<FlightTable>,
}

impl Reservations {
    /// The state of a namespace on bdev `bdev_uuid`, read from `file` when it exists.
    pub fn new(file: Option<PathBuf>, bdev_uuid: Uuid) -> Result<Reservations, String> {
        let st = match &file {
            Some(f) => match load(f)? {
                Some(s) => ResvState::from_saved(s).map_err(|e| format!("{}: {e}", f.display()))?,
                None => ResvState::default(),
            },
            None => ResvState::default(),
        };
        Ok(Reservations {
            active: AtomicBool::new(st.active()),
            state: Mutex::new(st),
            conflicts: AtomicU64::new(0),
            file,
            bdev_uuid,
            flight: Arc::new(FlightTable { epoch: AtomicU64::new(0), hosts: Mutex::new(Vec::new()) }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, ResvState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ptpl_file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The in-flight counters of host `h` on this namespace (created on first use, with one
    /// counter per core of the reactor set this runs on).
    pub fn in_flight(&self, h: &HostId) -> Arc<InFlight> {
        let mut v = self.flight.hosts();
        if let Some((_, f)) = v.iter().find(|(x, _)| x == h) {
            return f.clone();
        }
        // Counters nobody uses any more go (hosts that came and went): held by the table
        // alone, counting nothing. Clones are made under this lock or from another holder, so
        // a count of one cannot grow behind this check.
        v.retain(|(_, f)| Arc::strong_count(f) > 1 || Arc::strong_count(&f.shared) > 1 || f.total() > 0);
        let f = Arc::new(InFlight::new(crate::reactor::try_current().map_or(1, |c| c.core_count())));
        v.push((*h, f.clone()));
        f
    }

    /// Host `h`'s single shared counter, for callers that count outside the per-core path (the
    /// simulation's legs): increment before [`Self::allows`], decrement when the command ended.
    pub fn in_flight_counter(&self, h: &HostId) -> Arc<AtomicU32> {
        self.in_flight(h).shared.clone()
    }

    /// Counts a command of the host of `f` on core `core` (the core it is checked on), before
    /// its reservation check: see [`Self::allows`]. The ticket goes back to `f.leave`.
    pub fn admit(&self, f: &InFlight, core: usize) -> Ticket {
        let core = core.min(f.cores.len() - 1);
        let parity = (self.flight.epoch.load(SeqCst) & 1) as usize;
        // SeqCst, before the check: see `allows`.
        f.cores[core][parity].fetch_add(1, SeqCst);
        Ticket { core, parity }
    }

    /// The drain a command that changed the state must wait for before it completes: the
    /// commands `hosts` admitted before the change. Called after the change. Every Acquire
    /// drains, with no hosts when it preempted nobody: its drain still waits for the epoch to
    /// advance, which waits for any earlier drain's commands, so that a retried Acquire (the
    /// first timed out at the host while a device held a preempted write; the retry finds its
    /// issuer already the holder, nothing to preempt) does not complete before the preempted
    /// writes left the bdev.
    pub fn drain(&self, hosts: impl Iterator<Item = HostId>) -> Drain {
        let hosts: Vec<HostId> = hosts.collect();
        let v = self.flight.hosts();
        // A host without counters has nothing in flight.
        let hosts = v.iter().filter(|(x, _)| hosts.contains(x)).map(|(_, f)| f.clone()).collect();
        drop(v);
        let d = Drain { table: self.flight.clone(), hosts, parity: AtomicU8::new(Drain::NOT_ADVANCED) };
        // Advance now if possible: the sooner, the fewer commands the drain waits for.
        d.done();
        d
    }

    /// The drain of the commands `host` has admitted so far, None when it has none in flight
    /// (then nothing is waited for, not even other hosts' commands of the current epoch): a new
    /// association of the host waits for it (`Conn::earlier_commands`).
    pub fn host_drain(&self, host: HostId) -> Option<Drain> {
        let busy = self.flight.hosts().iter().any(|(x, f)| *x == host && f.total() > 0);
        busy.then(|| self.drain(std::iter::once(host)))
    }

    /// [`Self::drain`] for an Acquire that preempted `hosts`.
    pub fn acquire_drain(&self, hosts: impl Iterator<Item = HostId>) -> Drain {
        self.drain(hosts)
    }

    /// Whether a command of kind `access` from host `h` may run. Costs one load while nothing
    /// is registered. The caller has already counted the command ([`Self::admit`], SeqCst):
    /// either this check sees a preempt's (or a Clear's) new state, or the drain (which
    /// advances the epoch and loads the counters after changing the state) sees the command
    /// counted under the epoch it closed.
    /// The flag is loaded SeqCst for the same reason: a check that reads it stale (false)
    /// is ordered before the preempted host's registration, hence before the drain's load.
    pub fn allows(&self, h: &HostId, access: Access) -> bool {
        if !self.active.load(SeqCst) {
            return true;
        }
        let ok = !self.lock().conflicts(h, access);
        if !ok {
            self.conflicts.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Runs a Register, Acquire or Release; a changed state is persisted (when PTPL is or
    /// was on) before this returns.
    pub fn execute(&self, h: &HostId, c: Command) -> Result<Outcome, ResvError> {
        let mut st = self.lock();
        let was_ptpl = st.ptpl;
        let r = st.execute(h, c, self.file.is_some());
        self.active.store(st.active(), SeqCst);
        if matches!(r, Err(ResvError::Conflict)) {
            self.conflicts.fetch_add(1, Relaxed);
        }
        let out = r?;
        if out.changed && (st.ptpl || was_ptpl) {
            // Under the lock: the file always holds the latest state.
            self.persist(&st)?;
        }
        Ok(out)
    }

    /// Set Features Reservation Persistence (83h).
    pub fn set_ptpl(&self, on: bool) -> Result<(), ResvError> {
        if on && self.file.is_none() {
            return Err(ResvError::InvalidField);
        }
        let mut st = self.lock();
        if st.ptpl != on {
            st.ptpl = on;
            self.persist(&st)?;
        }
        Ok(())
    }

    fn persist(&self, st: &ResvState) -> Result<(), ResvError> {
        let Some(f) = &self.file else { return Ok(()) };
        // PTPL off: nothing may survive a power loss, so the file goes.
        let saved = st.ptpl.then(|| st.saved(self.bdev_uuid));
        store(f, saved.as_ref()).map_err(|e| {
            log::error!("nvmf: cannot persist reservations to {}: {e}", f.display());
            ResvError::Persist(e.to_string())
        })
    }
}

fn load(f: &Path) -> Result<Option<Saved>, String> {
    crate::state_file::load(f)
}

/// Writes (or, for None, removes) the state file atomically and durably.
fn store(f: &Path, s: Option<&Saved>) -> std::io::Result<()> {
    crate::state_file::store(f, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: u8) -> HostId {
        let mut h = [0u8; 16];
        h[0] = n;
        h[15] = 0xEE;
        h
    }

    fn reg(st: &mut ResvState, n: u8, action: u8, crkey: u64, nrkey: u64) -> Result<Outcome, ResvError> {
        st.execute(&host(n), Command::Register { action, iekey: false, cptpl: 0, crkey, nrkey }, false)
    }
    fn acq(st: &mut ResvState, n: u8, action: u8, rtype: u8, crkey: u64, prkey: u64) -> Result<Outcome, ResvError> {
        st.execute(&host(n), Command::Acquire { action, iekey: false, rtype, crkey, prkey }, false)
    }
    fn rel(st: &mut ResvState, n: u8, action: u8, rtype: u8, crkey: u64) -> Result<Outcome, ResvError> {
        st.execute(&host(n), Command::Release { action, iekey: false, rtype, crkey }, false)
    }

    #[test]
    fn register_replace_unregister_and_their_keys() {
        let mut st = ResvState::default();
        assert_eq!(reg(&mut st, 1, 0, 0, 0), Err(ResvError::InvalidField), "a zero key is no key");
        assert!(reg(&mut st, 1, 0, 0, 0xA).unwrap().changed);
        assert_eq!(st.generation, 1);
        assert!(!reg(&mut st, 1, 0, 0, 0xA).unwrap().changed, "the same key again changes nothing");
        assert_eq!(reg(&mut st, 1, 0, 0, 0xB), Err(ResvError::Conflict));
        assert_eq!(reg(&mut st, 1, 2, 0xB, 0xC), Err(ResvError::Conflict), "replace needs the current key");
        assert!(reg(&mut st, 1, 2, 0xA, 0xC).is_ok());
        assert_eq!(st.key_of(&host(1)), Some(0xC));
        assert_eq!(reg(&mut st, 2, 2, 0, 0xD), Err(ResvError::Conflict), "replace of nobody");
        let ie = Command::Register { action: 2, iekey: true, cptpl: 0, crkey: 0, nrkey: 0xD };
        assert!(st.execute(&host(2), ie, false).is_ok(), "IEKEY registers");
        assert_eq!(reg(&mut st, 2, 1, 0x1, 0), Err(ResvError::Conflict));
        assert!(reg(&mut st, 2, 1, 0xD, 0).unwrap().unregistered.is_empty(), "a host's own Unregister does not drain");
        assert_eq!(st.key_of(&host(2)), None);
        assert_eq!(st.generation, 4);
        assert_eq!(reg(&mut st, 1, 5, 0xC, 0), Err(ResvError::InvalidField));
        let ptpl = Command::Register { action: 0, iekey: false, cptpl: 3, crkey: 0, nrkey: 0xC };
        assert_eq!(st.execute(&host(1), ptpl, false), Err(ResvError::InvalidField), "no ptpl_file, no PTPL");
        assert!(st.execute(&host(1), ptpl, true).unwrap().changed);
        assert!(st.ptpl);
    }

    #[test]
    fn access_per_type_for_holder_registrant_and_stranger() {
        use Access::{Read, Write};
        // (type, registrant read/write, stranger read/write) allowed; the holder may do all.
        let table = [
            (rtype::WRITE_EXCLUSIVE, (true, false), (true, false)),
            (rtype::EXCLUSIVE_ACCESS, (false, false), (false, false)),
            (rtype::WRITE_EXCLUSIVE_RO, (true, true), (true, false)),
            (rtype::EXCLUSIVE_ACCESS_RO, (true, true), (false, false)),
            (rtype::WRITE_EXCLUSIVE_AR, (true, true), (true, false)),
            (rtype::EXCLUSIVE_ACCESS_AR, (true, true), (false, false)),
        ];
        for (t, registrant, stranger) in table {
            let mut st = ResvState::default();
            reg(&mut st, 1, 0, 0, 1).unwrap();
            reg(&mut st, 2, 0, 0, 2).unwrap();
            assert!(!st.conflicts(&host(3), Write), "no reservation, no conflict");
            acq(&mut st, 1, 0, t, 1, 0).unwrap();
            assert!(!st.conflicts(&host(1), Read) && !st.conflicts(&host(1), Write), "type {t}: holder");
            assert_eq!((!st.conflicts(&host(2), Read), !st.conflicts(&host(2), Write)), registrant, "type {t}: registrant");
            assert_eq!((!st.conflicts(&host(3), Read), !st.conflicts(&host(3), Write)), stranger, "type {t}: stranger");
        }
    }

    #[test]
    fn acquire_and_release_rules() {
        let mut st = ResvState::default();
        assert_eq!(acq(&mut st, 1, 0, 1, 0xA, 0), Err(ResvError::Conflict), "not registered");
        reg(&mut st, 1, 0, 0, 0xA).unwrap();
        reg(&mut st, 2, 0, 0, 0xB).unwrap();
        assert_eq!(acq(&mut st, 1, 0, 7, 0xA, 0), Err(ResvError::InvalidField));
        assert_eq!(acq(&mut st, 1, 0, 1, 0xB, 0), Err(ResvError::Conflict), "wrong key");
        let g = st.generation;
        acq(&mut st, 1, 0, rtype::WRITE_EXCLUSIVE_RO, 0xA, 0).unwrap();
        assert_eq!(st.generation, g, "acquire leaves the generation");
        assert!(acq(&mut st, 1, 0, rtype::WRITE_EXCLUSIVE_RO, 0xA, 0).is_ok(), "again: no change");
        assert_eq!(acq(&mut st, 1, 0, rtype::EXCLUSIVE_ACCESS, 0xA, 0), Err(ResvError::Conflict), "another type");
        assert_eq!(acq(&mut st, 2, 0, rtype::WRITE_EXCLUSIVE_RO, 0xB, 0), Err(ResvError::Conflict), "held by 1");
        assert!(!rel(&mut st, 2, 0, rtype::WRITE_EXCLUSIVE_RO, 0xB).unwrap().changed, "not the holder: nothing");
        assert_eq!(rel(&mut st, 1, 0, rtype::WRITE_EXCLUSIVE, 0xA), Err(ResvError::InvalidField), "type mismatch");
        let out = rel(&mut st, 1, 0, rtype::WRITE_EXCLUSIVE_RO, 0xA).unwrap();
        assert_eq!(out.notices, vec![(host(2), Notice::ReservationReleased)]);
        assert!(st.res.is_none());
        // Clear: everything goes, the others hear of it as preempted.
        acq(&mut st, 2, 0, rtype::WRITE_EXCLUSIVE, 0xB, 0).unwrap();
        let out = rel(&mut st, 1, 1, 0, 0xA).unwrap();
        assert_eq!(out.notices, vec![(host(2), Notice::ReservationPreempted)]);
        assert_eq!(out.unregistered, vec![host(1), host(2)], "Clear drains every registrant, its issuer too");
        assert!(!st.active());
    }

    #[test]
    fn preempt_fences_the_holder_and_all_registrants_outlive_their_creator() {
        let mut st = ResvState::default();
        reg(&mut st, 1, 0, 0, 0xA).unwrap();
        reg(&mut st, 2, 0, 0, 0xB).unwrap();
        reg(&mut st, 3, 0, 0, 0xC).unwrap();
        acq(&mut st, 1, 0, rtype::WRITE_EXCLUSIVE, 0xA, 0).unwrap();
        assert_eq!(acq(&mut st, 2, 1, rtype::EXCLUSIVE_ACCESS, 0xB, 0x99), Err(ResvError::Conflict), "nobody has PRKEY");
        assert_eq!(acq(&mut st, 2, 1, rtype::EXCLUSIVE_ACCESS, 0xB, 0), Err(ResvError::InvalidField));
        let g = st.generation;
        let out = acq(&mut st, 2, 2, rtype::EXCLUSIVE_ACCESS, 0xB, 0xA).unwrap();
        assert_eq!(out.notices, vec![(host(1), Notice::RegistrationPreempted)]);
        assert_eq!(out.unregistered, vec![host(1)]);
        assert_eq!(st.generation, g + 1);
        assert_eq!(st.key_of(&host(1)), None);
        assert!(st.conflicts(&host(1), Access::Write) && st.conflicts(&host(1), Access::Read));
        assert_eq!(st.res, Some(Reservation { holder: host(2), rtype: rtype::EXCLUSIVE_ACCESS }));
        // Preempting a non-holder's key leaves the reservation alone.
        let out = acq(&mut st, 2, 1, rtype::EXCLUSIVE_ACCESS, 0xB, 0xC).unwrap();
        assert_eq!(out.notices, vec![(host(3), Notice::RegistrationPreempted)]);
        assert!(st.is_holder(&host(2)));
        // The holder preempting itself changes the type.
        acq(&mut st, 2, 1, rtype::WRITE_EXCLUSIVE_AR, 0xB, 0xB).unwrap();
        assert_eq!(st.res.map(|r| r.rtype), Some(rtype::WRITE_EXCLUSIVE_AR));
        assert_eq!(st.key_of(&host(2)), Some(0xB));
        // All registrants: another registrant holds it too; it outlives 2's unregistration.
        reg(&mut st, 1, 0, 0, 0xA).unwrap();
        assert!(st.is_holder(&host(1)));
        reg(&mut st, 2, 1, 0xB, 0).unwrap();
        assert!(st.res.is_some() && st.is_holder(&host(1)));
        // PRKEY 0 against all-registrants: the others go, the issuer holds RTYPE.
        reg(&mut st, 3, 0, 0, 0xC).unwrap();
        let out = acq(&mut st, 3, 1, rtype::EXCLUSIVE_ACCESS, 0xC, 0).unwrap();
        assert_eq!(out.notices, vec![(host(1), Notice::RegistrationPreempted)]);
        assert_eq!(st.res, Some(Reservation { holder: host(3), rtype: rtype::EXCLUSIVE_ACCESS }));
        // The last registrant unregistering takes the reservation with it.
        reg(&mut st, 3, 1, 0xC, 0).unwrap();
        assert!(!st.active());
    }

    #[test]
    fn report_regular_and_extended() {
        let mut st = ResvState::default();
        let mut short = [0u8; 16];
        short[0] = 7;
        st.execute(&short, Command::Register { action: 0, iekey: false, cptpl: 0, crkey: 0, nrkey: 0x1234 }, false).unwrap();
        st.execute(&short, Command::Acquire { action: 0, iekey: false, rtype: 1, crkey: 0x1234, prkey: 0 }, false).unwrap();
        let d = st.report(false, |_| Some(5)).unwrap();
        assert_eq!(d.len(), 48);
        assert_eq!((d[0], d[4], d[5]), (1, 1, 1));
        assert_eq!((d[24], d[26], d[32]), (5, 1, 7));
        assert_eq!(le64(&d, 40), Some(0x1234));
        reg(&mut st, 2, 0, 0, 0x55).unwrap();
        assert_eq!(st.report(false, |_| None), Err(ResvError::HostIdFormat));
        let d = st.report(true, |_| None).unwrap();
        assert_eq!(d.len(), 64 * 3);
        assert_eq!(d[5], 2);
        assert_eq!(&d[128..130], &[0xFF, 0xFF], "no controller connected");
        assert_eq!(d[130], 0, "not the holder");
        assert_eq!(le64(&d, 136), Some(0x55));
        assert_eq!(&d[144..160], &host(2));
    }

    #[test]
    fn ptpl_state_is_written_loaded_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub").join("ns1.json");
        let u = Uuid::from_u128(42);
        let r = Reservations::new(Some(f.clone()), u).unwrap();
        assert!(r.allows(&host(1), Access::Write));
        r.execute(&host(1), Command::Register { action: 0, iekey: false, cptpl: 0, crkey: 0, nrkey: 0xA }).unwrap();
        assert!(!f.exists(), "PTPL off: nothing written");
        r.execute(&host(2), Command::Register { action: 0, iekey: false, cptpl: 3, crkey: 0, nrkey: 0xB }).unwrap();
        r.execute(&host(2), Command::Acquire { action: 0, iekey: false, rtype: 2, crkey: 0xB, prkey: 0 }).unwrap();
        assert!(f.exists());
        assert!(!r.allows(&host(1), Access::Read));
        assert_eq!(r.conflicts.load(Relaxed), 1);
        let again = Reservations::new(Some(f.clone()), u).unwrap();
        assert_eq!(*again.lock(), *r.lock());
        assert!(!again.allows(&host(1), Access::Read), "the reservation survives");
        again.set_ptpl(false).unwrap();
        assert!(!f.exists(), "PTPL cleared: the file goes");
        std::fs::write(&f, b"{not json").unwrap();
        assert!(Reservations::new(Some(f), u).is_err());
        assert_eq!(Reservations::new(None, u).unwrap().set_ptpl(true), Err(ResvError::InvalidField));
    }
}
