//! The iSCSI configuration model: options, portal groups, initiator groups, CHAP auth groups
//! and target nodes with their LUNs, and the access rules between them. Control-plane state
//! behind one mutex; connections copy what they need at login and watch the few things that
//! change under them (a node's LUN list) through generation counters.

use super::params::TargetLimits;
use crate::bdev::{BdevStats, HoldGuard};
use crate::scsi::LogicalUnit;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Longest iSCSI name (RFC 7143 §4.2.7.1).
pub const MAX_NAME_LEN: usize = 223;
pub const MAX_PORTALS_PER_GROUP: usize = 64;
pub const MAX_GROUP_ENTRIES: usize = 256;
pub const MAX_LUNS_PER_NODE: usize = 256;
pub const MAX_TARGET_NODES: usize = 4096;
pub const MAX_QUEUE_DEPTH: u32 = 1024;

/// `iscsi_set_options` (SPDK's names).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Prefix of target names given without one (`vol0` becomes `{node_base}:vol0`).
    pub node_base: String,
    /// Seconds without an answer to a NOP-In ping before the connection is dropped.
    pub nop_timeout: u32,
    /// Seconds of silence from the initiator before the target pings it.
    pub nop_in_interval: u32,
    pub max_sessions: u32,
    /// Only 1 is supported: each session has exactly one connection.
    pub max_connections_per_session: u32,
    pub max_queue_depth: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_recv_data_segment_length: u32,
    pub max_r2t_per_connection: u32,
    pub immediate_data: bool,
    /// Only 0 is supported.
    pub error_recovery_level: u32,
    /// CHAP policy of discovery sessions.
    pub disable_chap: bool,
    pub require_chap: bool,
    pub mutual_chap: bool,
    pub chap_group: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_base: "iqn.2016-06.io.tidemark".into(),
            nop_timeout: 60,
            nop_in_interval: 30,
            max_sessions: 128,
            max_connections_per_session: 1,
            max_queue_depth: 128,
            default_time2wait: 2,
            default_time2retain: 20,
            first_burst_length: 65536,
            max_burst_length: 1 << 20,
            max_recv_data_segment_length: 1 << 18,
            max_r2t_per_connection: 16,
            immediate_data: true,
            error_recovery_level: 0,
            disable_chap: false,
            require_chap: false,
            mutual_chap: false,
            chap_group: 0,
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        if self.node_base.is_empty() || self.node_base.len() > MAX_NAME_LEN - 2 {
            return Err("field `node_base` must be 1 to 221 bytes".into());
        }
        if !(1..=3600).contains(&self.nop_timeout) {
            return Err("field `nop_timeout` must be between 1 and 3600 seconds".into());
        }
        if !(1..=3600).contains(&self.nop_in_interval) {
            return Err("field `nop_in_interval` must be between 1 and 3600 seconds".into());
        }
        if !(1..=65535).contains(&self.max_sessions) {
            return Err("field `max_sessions` must be between 1 and 65535".into());
        }
        if self.max_connections_per_session != 1 {
            return Err("field `max_connections_per_session`: only 1 is supported".into());
        }
        if !(1..=MAX_QUEUE_DEPTH).contains(&self.max_queue_depth) {
            return Err(format!("field `max_queue_depth` must be between 1 and {MAX_QUEUE_DEPTH}"));
        }
        if self.default_time2wait > 3600 || self.default_time2retain > 3600 {
            return Err("fields `default_time2wait` and `default_time2retain` must be at most 3600".into());
        }
        let dsl = 512..=(1u32 << 24) - 1;
        if !dsl.contains(&self.first_burst_length) || !dsl.contains(&self.max_burst_length) || self.first_burst_length > self.max_burst_length {
            return Err("fields `first_burst_length` <= `max_burst_length`, both between 512 and 16777215".into());
        }
        if !(512..=(1 << 24)).contains(&self.max_recv_data_segment_length) {
            return Err("field `max_recv_data_segment_length` must be between 512 and 16777216".into());
        }
        if !(1..=256).contains(&self.max_r2t_per_connection) {
            return Err("field `max_r2t_per_connection` must be between 1 and 256".into());
        }
        if self.error_recovery_level != 0 {
            return Err("field `error_recovery_level`: only 0 is supported".into());
        }
        check_chap_policy(self.disable_chap, self.require_chap, self.mutual_chap)
    }

    pub fn limits(&self, node: Option<&TargetNode>) -> TargetLimits {
        TargetLimits {
            max_recv_dsl: self.max_recv_data_segment_length.min((1 << 24) - 1),
            first_burst: self.first_burst_length,
            max_burst: self.max_burst_length,
            immediate_data: self.immediate_data,
            max_outstanding_r2t: self.max_r2t_per_connection,
            time2wait: self.default_time2wait,
            time2retain: self.default_time2retain,
            require_header_digest: node.is_some_and(|n| n.header_digest),
            require_data_digest: node.is_some_and(|n| n.data_digest),
        }
    }
}

/// SPDK's rule: CHAP cannot be both disabled and required, and mutual CHAP needs CHAP.
pub fn check_chap_policy(disable: bool, require: bool, mutual: bool) -> Result<(), String> {
    if disable && require {
        return Err("`disable_chap` and `require_chap` cannot both be true".into());
    }
    if mutual && !require {
        return Err("`mutual_chap` needs `require_chap`".into());
    }
    Ok(())
}

/// One listening address of a portal group.
#[derive(Debug, Clone)]
pub struct Portal {
    pub host: String,
    pub port: String,
    pub addr: SocketAddr,
}

#[derive(Debug)]
pub struct PortalGroup {
    pub tag: u16,
    pub portals: Vec<Portal>,
    pub private: bool,
    /// Listener ids on core 0 (see `portal`), one per portal.
    pub listeners: Vec<u64>,
}

/// An initiator's address rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netmask {
    Any,
    Net { addr: IpAddr, prefix: u8 },
}

impl Netmask {
    pub fn parse(s: &str) -> Result<Netmask, String> {
        if s == "ANY" {
            return Ok(Netmask::Any);
        }
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let a = a.trim_start_matches('[').trim_end_matches(']');
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not ANY or an address/prefix like 127.0.0.1/32"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&n| n <= max).ok_or_else(|| format!("bad prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Netmask::Net { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self, ip) {
            (Netmask::Any, _) => true,
            (Netmask::Net { addr: IpAddr::V4(n), prefix }, IpAddr::V4(a)) => {
                let m = if *prefix == 0 { 0 } else { u32::MAX << (32 - *prefix as u32) };
                u32::from(*n) & m == u32::from(a) & m
            }
            (Netmask::Net { addr: IpAddr::V6(n), prefix }, IpAddr::V6(a)) => {
                let m = if *prefix == 0 { 0 } else { u128::MAX << (128 - *prefix as u32) };
                u128::from(*n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InitiatorGroup {
    pub tag: u16,
    /// Initiator names, `ANY`, or `!name` / `!ANY` to deny.
    pub initiators: Vec<String>,
    pub netmasks: Vec<String>,
    pub parsed_netmasks: Vec<Netmask>,
}

impl InitiatorGroup {
    /// Whether `name` connecting from `ip` belongs to the group.
    pub fn allows(&self, name: &str, ip: IpAddr) -> bool {
        let denied = self.initiators.iter().filter_map(|i| i.strip_prefix('!')).any(|d| d == "ANY" || d.eq_ignore_ascii_case(name));
        if denied {
            return false;
        }
        let named = self.initiators.iter().filter(|i| !i.starts_with('!')).any(|i| i == "ANY" || i.eq_ignore_ascii_case(name));
        named && self.parsed_netmasks.iter().any(|m| m.contains(ip))
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChapSecret {
    pub user: String,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muser: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msecret: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AuthGroup {
    pub tag: u32,
    pub secrets: Vec<ChapSecret>,
}

/// Per-LUN statistics (the bdev layer's sharded counters, kept per export).
pub struct Lun {
    pub id: u64,
    pub unit: Arc<LogicalUnit>,
    pub stats: BdevStats,
    /// Keeps the bdev open (it cannot be deleted while exported).
    _hold: HoldGuard,
}

impl Lun {
    pub fn new(id: u64, unit: Arc<LogicalUnit>, hold: HoldGuard, cores: usize) -> Lun {
        Lun { id, unit, stats: BdevStats::new(cores), _hold: hold }
    }
}

pub struct TargetNode {
    pub name: String,
    pub alias: Option<String>,
    pub queue_depth: u32,
    pub disable_chap: bool,
    pub require_chap: bool,
    pub mutual_chap: bool,
    pub chap_group: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub pg_ig_maps: Mutex<Vec<(u16, u16)>>,
    luns: Mutex<Arc<Vec<Arc<Lun>>>>,
    /// Bumped whenever the LUN list changes; connections compare it on each command.
    pub luns_generation: AtomicU64,
    /// Set when the node is being deleted: no new logins.
    pub deleted: AtomicBool,
    pub sessions: AtomicU64,
    pub connections: AtomicU64,
}

impl TargetNode {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        alias: Option<String>,
        queue_depth: u32,
        chap: (bool, bool, bool, u32),
        digests: (bool, bool),
        maps: Vec<(u16, u16)>,
        luns: Vec<Arc<Lun>>,
    ) -> TargetNode {
        TargetNode {
            name,
            alias,
            queue_depth,
            disable_chap: chap.0,
            require_chap: chap.1,
            mutual_chap: chap.2,
            chap_group: chap.3,
            header_digest: digests.0,
            data_digest: digests.1,
            pg_ig_maps: Mutex::new(maps),
            luns: Mutex::new(Arc::new(luns)),
            luns_generation: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }

    pub fn luns(&self) -> Arc<Vec<Arc<Lun>>> {
        self.luns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the LUN list (sorted by id) and tells the connections.
    pub fn set_luns(&self, mut luns: Vec<Arc<Lun>>) {
        luns.sort_by_key(|l| l.id);
        *self.luns.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(luns);
        self.luns_generation.fetch_add(1, Relaxed);
    }

    pub fn maps(&self) -> Vec<(u16, u16)> {
        self.pg_ig_maps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Everything configured, behind the subsystem's mutex.
#[derive(Default)]
pub struct Registry {
    pub options: Options,
    pub portal_groups: BTreeMap<u16, PortalGroup>,
    pub initiator_groups: BTreeMap<u16, InitiatorGroup>,
    pub auth_groups: BTreeMap<u32, AuthGroup>,
    pub nodes: BTreeMap<String, Arc<TargetNode>>,
}

impl Registry {
    /// Whether initiator `name` at `ip`, connected to portal group `pg`, may use `node`.
    pub fn allowed(&self, node: &TargetNode, pg: u16, name: &str, ip: IpAddr) -> bool {
        node.maps().iter().any(|&(p, i)| p == pg && self.initiator_groups.get(&i).is_some_and(|g| g.allows(name, ip)))
    }

    /// The full name of a target given as in an RPC (`vol0` or `iqn....:vol0`).
    pub fn full_name(&self, name: &str) -> String {
        if name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa.") {
            name.to_string()
        } else {
            format!("{}:{}", self.options.node_base, name)
        }
    }

    /// The SendTargets answer for an initiator on portal group `pg` (`local` is the
    /// address it connected to, reported for wildcard portals). `only`: one target's name.
    pub fn send_targets(&self, pg: u16, name: &str, ip: IpAddr, local: SocketAddr, only: Option<&str>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for node in self.nodes.values() {
            if node.deleted.load(Relaxed) || only.is_some_and(|o| o != node.name) || !self.allowed(node, pg, name, ip) {
                continue;
            }
            out.push(("TargetName".to_string(), node.name.clone()));
            let mut tags: Vec<u16> =
                node.maps().iter().filter(|(_, i)| self.initiator_groups.get(i).is_some_and(|g| g.allows(name, ip))).map(|(p, _)| *p).collect();
            tags.sort_unstable();
            tags.dedup();
            for tag in tags {
                let Some(group) = self.portal_groups.get(&tag) else { continue };
                if group.private && tag != pg {
                    continue;
                }
                for p in &group.portals {
                    let host = if p.addr.ip().is_unspecified() { local.ip() } else { p.addr.ip() };
                    let port = if p.addr.ip().is_unspecified() { local.port() } else { p.addr.port() };
                    let h = match host {
                        IpAddr::V6(v6) => format!("[{v6}]"),
                        v4 => v4.to_string(),
                    };
                    out.push(("TargetAddress".to_string(), format!("{h}:{port},{tag}")));
                }
            }
        }
        out
    }
}

/// Checks an iSCSI name (iqn./eui./naa. forms, RFC 7143 §4.2.7).
pub fn check_iscsi_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > MAX_NAME_LEN {
        return Err(format!("name must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if !(n.starts_with("iqn.") || n.starts_with("eui.") || n.starts_with("naa.")) {
        return Err(format!("{n:?} does not start with iqn., eui. or naa."));
    }
    if !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':')) {
        return Err(format!("{n:?} has characters outside a-z, 0-9, '.', '-' and ':'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_match_addresses() {
        let m = Netmask::parse("127.0.0.0/8").unwrap();
        assert!(m.contains("127.0.0.5".parse().unwrap()));
        assert!(!m.contains("10.0.0.1".parse().unwrap()));
        assert!(m.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(Netmask::parse("[::1]/128").unwrap().contains("::1".parse().unwrap()));
        assert!(Netmask::parse("ANY").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(Netmask::parse("1.2.3.4/33").is_err());
        assert!(Netmask::parse("nope").is_err());
        assert_eq!(Netmask::parse("10.1.2.3").unwrap(), Netmask::Net { addr: "10.1.2.3".parse().unwrap(), prefix: 32 });
    }

    #[test]
    fn initiator_groups_allow_and_deny() {
        let g = InitiatorGroup {
            tag: 1,
            initiators: vec!["ANY".into(), "!iqn.bad".into()],
            netmasks: vec!["127.0.0.1/32".into()],
            parsed_netmasks: vec![Netmask::parse("127.0.0.1/32").unwrap()],
        };
        let lo = "127.0.0.1".parse().unwrap();
        assert!(g.allows("iqn.good", lo));
        assert!(!g.allows("iqn.bad", lo));
        assert!(!g.allows("iqn.good", "127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn names_and_options_are_checked() {
        assert!(check_iscsi_name("iqn.2016-06.io.tidemark:vol0").is_ok());
        assert!(check_iscsi_name("IQN.x").is_err());
        assert!(check_iscsi_name("iqn.a b").is_err());
        assert!(Options::default().validate().is_ok());
        assert!(Options { max_connections_per_session: 2, ..Options::default() }.validate().is_err());
        assert!(check_chap_policy(true, true, false).is_err());
        assert!(check_chap_policy(false, false, true).is_err());
    }
}
