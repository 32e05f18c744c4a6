//! Asymmetric Namespace Access (NVMe Base 2.0 §8.1.3): per listener, every ANA group of a
//! subsystem has a state (optimized, non-optimized, inaccessible, ...). A host with native
//! multipath (Linux's nvme_core) reads the states from the ANA log page (0Ch) of each path's
//! controller, sends I/O down the optimized paths, and fails a command over to another path
//! when it completes with a path-related status. The target raises the ANA change async
//! event on the controllers of a listener whose states changed.
//!
//! A namespace belongs to one ANA group (its `anagrpid`, the nsid unless given); the group ids
//! run from 1 to the subsystem's max_namespaces, as in SPDK. The states live in atomics so
//! that the data path checks them with one relaxed load per command.

use super::spec::{sct, Status};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// ANA states, coded as in the ANA log page (NVMe Base 2.0 Figure 221).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    Change = 0x0F,
}

impl AnaState {
    /// SPDK's names (`nvmf_subsystem_get_listeners`).
    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non_optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent_loss",
            AnaState::Change => "change",
        }
    }

    /// The states an RPC may set: SPDK's `nvmf_subsystem_listener_set_ana_state` takes these
    /// three (persistent loss and change are states a target reaches by itself).
    pub fn from_rpc_name(s: &str) -> Option<AnaState> {
        match s.to_ascii_lowercase().as_str() {
            "optimized" => Some(AnaState::Optimized),
            "non_optimized" => Some(AnaState::NonOptimized),
            "inaccessible" => Some(AnaState::Inaccessible),
            _ => None,
        }
    }

    pub fn from_code(c: u8) -> AnaState {
        match c {
            0x02 => AnaState::NonOptimized,
            0x03 => AnaState::Inaccessible,
            0x04 => AnaState::PersistentLoss,
            0x0F => AnaState::Change,
            _ => AnaState::Optimized,
        }
    }

    /// The status of an I/O command on a namespace in this state, if it must not run: the
    /// path-related statuses (SCT 3h) with DNR clear, which Linux fails over to another path
    /// instead of returning an error (and which make it re-read the ANA log page).
    pub fn io_status(self) -> Option<Status> {
        let sc = match self {
            AnaState::Optimized | AnaState::NonOptimized => return None,
            AnaState::PersistentLoss => SC_ANA_PERSISTENT_LOSS,
            AnaState::Inaccessible => SC_ANA_INACCESSIBLE,
            AnaState::Change => SC_ANA_TRANSITION,
        };
        Some(Status::retryable(sct::PATH, sc))
    }
}

/// Path-related status codes (SCT 3h).
pub const SC_ANA_PERSISTENT_LOSS: u8 = 0x01;
pub const SC_ANA_INACCESSIBLE: u8 = 0x02;
pub const SC_ANA_TRANSITION: u8 = 0x03;
/// Controller Pathing Error: the path through this controller is failing (it is being torn
/// down), the command may succeed on another path.
pub const SC_CONTROLLER_PATHING_ERROR: u8 = 0x60;

/// ANA Transition Time (Identify Controller ANATT), seconds: changes here are instant, the
/// value bounds how long a host waits in the change state.
pub const ANATT_SECS: u8 = 10;
/// ANACAP: optimized, non-optimized, inaccessible, persistent loss and change states are
/// reported (bits 0-4); a namespace's ANAGRPID does not change while attached (bit 6).
pub const ANACAP: u8 = 0b0101_1111;

/// The ANA states of one listener of a subsystem, for every group (index = group id - 1),
/// with the change counts of the ANA log page.
pub struct ListenerAna {
    states: Box<[AtomicU8]>,
    /// Per group: the listener's change count when that group's state last changed.
    group_changes: Box<[AtomicU64]>,
    /// Changes of any group's state through this listener (the log page header's count).
    changes: AtomicU64,
}

impl ListenerAna {
    /// `groups` states, all `initial`.
    pub fn new(groups: u32, initial: AnaState) -> ListenerAna {
        ListenerAna {
            states: (0..groups).map(|_| AtomicU8::new(initial as u8)).collect(),
            group_changes: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            changes: AtomicU64::new(0),
        }
    }

    pub fn groups(&self) -> u32 {
        self.states.len() as u32
    }

    /// The state of group `grp` (1-based); out of range reads as optimized.
    #[inline]
    pub fn state(&self, grp: u32) -> AnaState {
        // Relaxed: a command racing a state change may see either state, as it would had it
        // arrived a moment earlier or later; the AEN and log page carry the ordering.
        match self.states.get((grp as usize).wrapping_sub(1)) {
            Some(s) => AnaState::from_code(s.load(Ordering::Relaxed)),
            None => AnaState::Optimized,
        }
    }

    /// Sets group `grp` (or every group when None); true if any state changed. Callers hold
    /// the subsystem's lock, so two RPCs never interleave their counts.
    pub fn set(&self, grp: Option<u32>, state: AnaState) -> bool {
        let range = match grp {
            Some(g) if g >= 1 && g <= self.groups() => (g - 1) as usize..g as usize,
            Some(_) => return false,
            None => 0..self.states.len(),
        };
        let mut changed = false;
        for i in range {
            if self.states[i].swap(state as u8, Ordering::Relaxed) != state as u8 {
                if !changed {
                    self.changes.fetch_add(1, Ordering::Relaxed);
                    changed = true;
                }
                self.group_changes[i].store(self.change_count(), Ordering::Relaxed);
            }
        }
        changed
    }

    pub fn change_count(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn group_change_count(&self, grp: u32) -> u64 {
        self.group_changes.get((grp as usize).wrapping_sub(1)).map(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// One ANA Group Descriptor of the log page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDesc {
    pub anagrpid: u32,
    pub change_count: u64,
    pub state: AnaState,
    pub nsids: Vec<u32>,
}

/// The ANA log page (0Ch, NVMe Base 2.0 Figures 219-221): a 16-byte header (change count,
/// number of descriptors) and one descriptor per group, each 32 bytes followed by its NSIDs
/// unless `rgo` (Return Groups Only, log specific field bit 0) asks for none.
pub fn log_page(change_count: u64, groups: &[GroupDesc], rgo: bool) -> Vec<u8> {
    let nsids: usize = if rgo { 0 } else { groups.iter().map(|g| g.nsids.len()).sum() };
    let mut b = Vec::with_capacity(16 + 32 * groups.len() + 4 * nsids);
    b.extend_from_slice(&change_count.to_le_bytes());
    b.extend_from_slice(&(groups.len() as u16).to_le_bytes());
    b.resize(16, 0);
    for g in groups {
        let start = b.len();
        b.extend_from_slice(&g.anagrpid.to_le_bytes());
        let n = if rgo { 0 } else { g.nsids.len() as u32 };
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&g.change_count.to_le_bytes());
        b.push(g.state as u8);
        b.resize(start + 32, 0);
        if !rgo {
            for id in &g.nsids {
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_and_codes() {
        for s in [AnaState::Optimized, AnaState::NonOptimized, AnaState::Inaccessible, AnaState::PersistentLoss, AnaState::Change] {
            assert_eq!(AnaState::from_code(s as u8), s);
        }
        assert_eq!(AnaState::from_rpc_name("Non_Optimized"), Some(AnaState::NonOptimized));
        assert_eq!(AnaState::from_rpc_name("persistent_loss"), None, "SPDK's RPC sets three states");
        assert_eq!(AnaState::from_rpc_name("bogus"), None);
        assert_eq!(AnaState::Inaccessible.name(), "inaccessible");
    }

    #[test]
    fn io_status_is_path_related_and_retryable() {
        assert_eq!(AnaState::Optimized.io_status(), None);
        assert_eq!(AnaState::NonOptimized.io_status(), None);
        let s = AnaState::Inaccessible.io_status().unwrap();
        assert_eq!((s.sct, s.sc, s.dnr), (3, 2, false));
        assert_eq!(AnaState::PersistentLoss.io_status().unwrap().sc, 1);
        assert_eq!(AnaState::Change.io_status().unwrap().sc, 3);
        // The CQE status field: SCT in bits 11:9, SC in 8:1, DNR (bit 15) clear.
        assert_eq!(s.to_field(), (3 << 9) | (2 << 1));
    }

    #[test]
    fn listener_states_count_changes() {
        let l = ListenerAna::new(4, AnaState::Optimized);
        assert_eq!(l.state(2), AnaState::Optimized);
        assert_eq!(l.state(0), AnaState::Optimized, "group 0 is no group");
        assert_eq!(l.state(99), AnaState::Optimized);
        assert!(l.set(Some(2), AnaState::Inaccessible));
        assert_eq!(l.state(2), AnaState::Inaccessible);
        assert_eq!(l.state(1), AnaState::Optimized);
        assert_eq!((l.change_count(), l.group_change_count(2), l.group_change_count(1)), (1, 1, 0));
        assert!(!l.set(Some(2), AnaState::Inaccessible), "the same state is no change");
        assert!(!l.set(Some(5), AnaState::Inaccessible), "out of range changes nothing");
        assert!(l.set(None, AnaState::NonOptimized));
        assert_eq!(l.change_count(), 2);
        assert!((1..=4).all(|g| l.state(g) == AnaState::NonOptimized && l.group_change_count(g) == 2));
    }

    #[test]
    fn log_page_layout_with_and_without_nsids() {
        let groups = vec![
            GroupDesc { anagrpid: 1, change_count: 3, state: AnaState::Optimized, nsids: vec![1, 4] },
            GroupDesc { anagrpid: 2, change_count: 5, state: AnaState::Inaccessible, nsids: vec![2] },
        ];
        let p = log_page(7, &groups, false);
        assert_eq!(p.len(), 16 + 32 + 8 + 32 + 4);
        assert_eq!(u64::from_le_bytes(p[0..8].try_into().unwrap()), 7);
        assert_eq!(u16::from_le_bytes(p[8..10].try_into().unwrap()), 2);
        let d1 = &p[16..];
        assert_eq!(u32::from_le_bytes(d1[0..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(d1[4..8].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(d1[8..16].try_into().unwrap()), 3);
        assert_eq!(d1[16], 1);
        assert_eq!(&d1[32..40], &[1, 0, 0, 0, 4, 0, 0, 0]);
        let d2 = &p[16 + 40..];
        assert_eq!(u32::from_le_bytes(d2[0..4].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(d2[4..8].try_into().unwrap()), 1);
        assert_eq!(d2[16], 3);
        assert_eq!(&d2[32..36], &[2, 0, 0, 0]);

        let p = log_page(7, &groups, true);
        assert_eq!(p.len(), 16 + 64, "RGO: descriptors without NSIDs");
        assert_eq!(u32::from_le_bytes(p[20..24].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(p[48..52].try_into().unwrap()), 2);
        assert_eq!(p[48 + 16], 3);

        assert_eq!(log_page(0, &[], false), vec![0u8; 16]);
    }
}
