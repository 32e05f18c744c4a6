//! NVM subsystems: what a host connects to. A subsystem has an NQN, identity strings, an
//! allow-list of host NQNs, the listeners it is reachable on, its namespaces (each an opened
//! bdev) and the controllers hosts have created on it. All of this is control-plane state
//! under one mutex; the data path reads namespaces through per-queue caches validated by a
//! generation counter, never through the lock.

use super::ana::{AnaState, GroupDesc, ListenerAna};
use super::controller::Controller;
use super::reservation::Reservations;
use super::spec::validate_nqn;
use crate::bdev::{BdevEntry, BdevStats, HoldGuard};
use crate::keyring::KeyRef;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

/// Address family of a listener, as SPDK spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdrFam {
    IPv4,
    IPv6,
}

impl AdrFam {
    pub fn name(self) -> &'static str {
        match self {
            AdrFam::IPv4 => "IPv4",
            AdrFam::IPv6 => "IPv6",
        }
    }
    /// Discovery log ADRFAM code.
    pub fn code(self) -> u8 {
        match self {
            AdrFam::IPv4 => 1,
            AdrFam::IPv6 => 2,
        }
    }
}

/// A TCP listen address (SPDK's transport ID of a listener).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenAddr {
    pub adrfam: AdrFam,
    pub traddr: String,
    pub trsvcid: String,
}

impl ListenAddr {
    /// Validates SPDK-style fields into an address.
    pub fn parse(trtype: &str, adrfam: Option<&str>, traddr: &str, trsvcid: &str) -> Result<ListenAddr, String> {
        if !trtype.eq_ignore_ascii_case("tcp") {
            return Err(format!("field `listen_address.trtype`: only TCP is supported, not {trtype:?}"));
        }
        let ip: std::net::IpAddr = traddr.parse().map_err(|_| format!("field `listen_address.traddr`: {traddr:?} is not an IP address"))?;
        let fam = match adrfam.map(|s| s.to_ascii_lowercase()) {
            None => {
                if ip.is_ipv4() {
                    AdrFam::IPv4
                } else {
                    AdrFam::IPv6
                }
            }
            Some(f) if f == "ipv4" => AdrFam::IPv4,
            Some(f) if f == "ipv6" => AdrFam::IPv6,
            Some(f) => return Err(format!("field `listen_address.adrfam`: {f:?} is not IPv4 or IPv6")),
        };
        if (fam == AdrFam::IPv4) != ip.is_ipv4() {
            return Err(format!("field `listen_address.adrfam`: {traddr} is not an {} address", fam.name()));
        }
        let port: u16 = trsvcid.parse().map_err(|_| format!("field `listen_address.trsvcid`: {trsvcid:?} is not a TCP port"))?;
        if port == 0 {
            return Err("field `listen_address.trsvcid`: port 0 is not a listen port".into());
        }
        Ok(ListenAddr { adrfam: fam, traddr: ip.to_string(), trsvcid: port.to_string() })
    }

    pub fn socket_addr(&self) -> SocketAddr {
        let ip: std::net::IpAddr = self.traddr.parse().expect("validated at parse");
        let port: u16 = self.trsvcid.parse().expect("validated at parse");
        SocketAddr::new(ip, port)
    }

    pub fn to_json(&self) -> Value {
        json!({ "trtype": "TCP", "adrfam": self.adrfam.name(), "traddr": self.traddr, "trsvcid": self.trsvcid })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.socket_addr())
    }
}

/// A namespace: a bdev opened for export, with the identifiers hosts see.
pub struct Namespace {
    pub nsid: u32,
    pub entry: Arc<BdevEntry>,
    /// Keeps the bdev from being deleted while it is exported.
    _hold: HoldGuard,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// Per-core I/O statistics of the namespace (ops, bytes, latency).
    pub stats: BdevStats,
    /// NVMe reservations: one state for every controller that reaches the namespace.
    pub resv: Reservations,
    /// The ANA group of the namespace (1..=max_namespaces; the nsid unless given).
    pub anagrpid: u32,
    /// Identifiers given explicitly (saved in the configuration).
    explicit_uuid: bool,
    explicit_nguid: bool,
    explicit_eui64: bool,
    explicit_anagrpid: bool,
}

impl Namespace {
    pub fn block_size(&self) -> u32 {
        self.entry.bdev().block_size()
    }
    pub fn num_blocks(&self) -> u64 {
        self.entry.bdev().num_blocks()
    }
    pub fn bdev_name(&self) -> &str {
        self.entry.name()
    }
}

/// Optional identifiers and settings of `nvmf_subsystem_add_ns`.
#[derive(Debug, Default, Clone)]
pub struct NsIds {
    pub uuid: Option<Uuid>,
    pub nguid: Option<[u8; 16]>,
    pub eui64: Option<[u8; 8]>,
    /// Where reservations persist through power loss (SPDK's `ptpl_file`).
    pub ptpl_file: Option<PathBuf>,
    /// The ANA group (SPDK's `anagrpid`); the nsid when None.
    pub anagrpid: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubsysKind {
    Discovery,
    Nvme,
}

pub struct Subsystem {
    /// Unique for the life of the process (keys per-core caches).
    pub id: u64,
    pub nqn: String,
    pub kind: SubsysKind,
    pub serial: String,
    pub model: String,
    pub max_namespaces: u32,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    /// ANA reporting (`nvmf_create_subsystem {ana_reporting}`): hosts see ANA groups and
    /// per-listener states; fixed for the subsystem's life, as in SPDK.
    pub ana_reporting: bool,
    /// Bumped on every namespace change; queue caches compare it per command.
    ns_generation: AtomicU64,
    pub deleted: AtomicBool,
    state: Mutex<SubsysState>,
    cores: usize,
}

struct SubsysState {
    allow_any_host: bool,
    /// Allowed hosts, with the DH-HMAC-CHAP keys they must authenticate with.
    hosts: BTreeMap<String, Option<Arc<HostKeys>>>,
    /// Listen addresses, each with whether it is a secure (TLS) one.
    listeners: Vec<(ListenAddr, bool)>,
    /// The ANA states of each listener (all optimized without ANA reporting); controllers
    /// hold their listener's, so the data path reads them without this lock.
    ana: BTreeMap<ListenAddr, Arc<ListenerAna>>,
    namespaces: BTreeMap<u32, Arc<Namespace>>,
    controllers: BTreeMap<u16, Arc<Controller>>,
    next_cntlid: u16,
}

/// `v` with the host's key names (never the keys), as SPDK shows them.
fn host_json(mut v: Value, keys: &Option<Arc<HostKeys>>) -> Value {
    if let Some(k) = keys {
        if let Some(p) = &k.psk {
            v["psk"] = json!(p.name());
        }
        if let Some(d) = &k.key {
            v["dhchap_key"] = json!(d.name());
        }
        if let Some(c) = &k.ctrlr_key {
            v["dhchap_ctrlr_key"] = json!(c.name());
        }
    }
    v
}

/// A host's keys (holds on keyring keys: they cannot be removed meanwhile): its TLS PSK
/// and its DH-HMAC-CHAP keys, each optional.
#[derive(Debug)]
pub struct HostKeys {
    /// The TLS pre-shared key (an `NVMeTLSkey-1:` key): the host connects only over TLS.
    pub psk: Option<KeyRef>,
    /// The DH-HMAC-CHAP key the host proves it holds.
    pub key: Option<KeyRef>,
    /// The controller's key, for bidirectional authentication.
    pub ctrlr_key: Option<KeyRef>,
}

static NEXT_SUBSYS: AtomicU64 = AtomicU64::new(1);

/// Longest serial number and model number (Identify Controller SN/MN field widths).
pub const MAX_SERIAL: usize = 20;
pub const MAX_MODEL: usize = 40;
/// Most namespaces a subsystem may be created with.
pub const MAX_NAMESPACES_LIMIT: u32 = 1024;
pub const DEFAULT_MAX_NAMESPACES: u32 = 32;
/// Most hosts on an allow-list, and listeners per subsystem.
pub const MAX_HOSTS: usize = 1024;
pub const MAX_LISTENERS: usize = 64;

impl Subsystem {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        nqn: &str,
        kind: SubsysKind,
        serial: &str,
        model: &str,
        max_namespaces: u32,
        allow_any_host: bool,
        cntlid_range: (u16, u16),
        cores: usize,
    ) -> Result<Subsystem, String> {
        validate_nqn(nqn).map_err(|e| format!("field `nqn`: {e}"))?;
        if serial.len() > MAX_SERIAL || !serial.bytes().all(|b| (0x20..0x7F).contains(&b)) {
            return Err(format!("field `serial_number`: must be at most {MAX_SERIAL} printable ASCII characters"));
        }
        if model.len() > MAX_MODEL || !model.bytes().all(|b| (0x20..0x7F).contains(&b)) {
            return Err(format!("field `model_number`: must be at most {MAX_MODEL} printable ASCII characters"));
        }
        if kind == SubsysKind::Nvme && !(1..=MAX_NAMESPACES_LIMIT).contains(&max_namespaces) {
            return Err(format!("field `max_namespaces`: must be between 1 and {MAX_NAMESPACES_LIMIT}"));
        }
        let (min, max) = cntlid_range;
        if min == 0 || max > 0xFFEF || min > max {
            return Err("fields `min_cntlid`/`max_cntlid`: need 1 <= min_cntlid <= max_cntlid <= 65519".into());
        }
        Ok(Subsystem {
            id: NEXT_SUBSYS.fetch_add(1, Ordering::Relaxed),
            nqn: nqn.to_string(),
            kind,
            serial: serial.to_string(),
            model: model.to_string(),
            max_namespaces,
            min_cntlid: min,
            max_cntlid: max,
            ana_reporting: false,
            ns_generation: AtomicU64::new(1),
            deleted: AtomicBool::new(false),
            state: Mutex::new(SubsysState {
                allow_any_host,
                hosts: BTreeMap::new(),
                listeners: Vec::new(),
                ana: BTreeMap::new(),
                namespaces: BTreeMap::new(),
                controllers: BTreeMap::new(),
                next_cntlid: min,
            }),
            cores,
        })
    }

    /// The subsystem with ANA reporting on or off.
    pub fn with_ana_reporting(mut self, on: bool) -> Subsystem {
        self.ana_reporting = on && !self.is_discovery();
        self
    }

    fn st(&self) -> MutexGuard<'_, SubsysState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_discovery(&self) -> bool {
        self.kind == SubsysKind::Discovery
    }

    pub fn ns_generation(&self) -> u64 {
        self.ns_generation.load(Ordering::Acquire)
    }

    // --- hosts ---

    pub fn allow_any_host(&self) -> bool {
        self.st().allow_any_host
    }

    pub fn set_allow_any_host(&self, v: bool) {
        self.st().allow_any_host = v;
    }

    /// Whether `hostnqn` may connect (the discovery subsystem admits everyone).
    pub fn allows_host(&self, hostnqn: &str) -> bool {
        let st = self.st();
        self.is_discovery() || st.allow_any_host || st.hosts.contains_key(hostnqn)
    }

    /// The DH-HMAC-CHAP keys `hostnqn` must authenticate with, if it has any.
    pub fn host_keys(&self, hostnqn: &str) -> Option<Arc<HostKeys>> {
        self.st().hosts.get(hostnqn).cloned().flatten()
    }

    pub fn add_host(&self, host: &str, keys: Option<HostKeys>) -> Result<(), String> {
        validate_nqn(host).map_err(|e| format!("field `host`: {e}"))?;
        let mut st = self.st();
        if st.hosts.contains_key(host) {
            return Err(format!("host {host} is already allowed on {}", self.nqn));
        }
        if st.hosts.len() >= MAX_HOSTS {
            return Err(format!("subsystem {} already allows {MAX_HOSTS} hosts", self.nqn));
        }
        st.hosts.insert(host.to_string(), keys.map(Arc::new));
        Ok(())
    }

    /// Removes a host from the allow-list; its controllers are returned so the caller can
    /// disconnect them (as SPDK does).
    pub fn remove_host(&self, host: &str) -> Result<Vec<Arc<Controller>>, String> {
        let mut st = self.st();
        if st.hosts.remove(host).is_none() {
            return Err(format!("host {host} is not on the allow-list of {}", self.nqn));
        }
        Ok(st.controllers.values().filter(|c| c.hostnqn == host).cloned().collect())
    }

    pub fn hosts(&self) -> Vec<String> {
        self.st().hosts.keys().cloned().collect()
    }

    // --- listeners ---

    pub fn add_listener(&self, a: &ListenAddr, secure: bool) -> Result<(), String> {
        let mut st = self.st();
        if st.listeners.iter().any(|(l, _)| l == a) {
            return Err(format!("subsystem {} already listens on {a}", self.nqn));
        }
        if st.listeners.len() >= MAX_LISTENERS {
            return Err(format!("subsystem {} already has {MAX_LISTENERS} listeners", self.nqn));
        }
        st.listeners.push((a.clone(), secure));
        st.ana.insert(a.clone(), Arc::new(ListenerAna::new(self.ana_groups(), AnaState::Optimized)));
        Ok(())
    }

    pub fn remove_listener(&self, a: &ListenAddr) -> bool {
        let mut st = self.st();
        let before = st.listeners.len();
        st.listeners.retain(|(l, _)| l != a);
        st.ana.remove(a);
        st.listeners.len() != before
    }

    // --- ANA ---

    /// ANA group ids run 1..=this (Identify Controller ANAGRPMAX and NANAGRPID), as in SPDK.
    pub fn ana_groups(&self) -> u32 {
        if self.is_discovery() {
            0
        } else {
            self.max_namespaces
        }
    }

    /// The ANA states of listener `a`, shared with the controllers connected through it.
    pub fn listener_ana(&self, a: &ListenAddr) -> Option<Arc<ListenerAna>> {
        self.st().ana.get(a).cloned()
    }

    /// Sets the ANA state of group `grp` (every group when None) on listener `a`; Ok(true)
    /// if a state changed. Checked before anything changes.
    pub fn set_ana_state(&self, a: &ListenAddr, grp: Option<u32>, state: AnaState) -> Result<bool, String> {
        if !self.ana_reporting {
            return Err(format!("subsystem {} was not created with ana_reporting", self.nqn));
        }
        if let Some(g) = grp {
            if g == 0 || g > self.ana_groups() {
                return Err(format!("field `anagrpid`: {g} is not an ANA group of {} (1 to {})", self.nqn, self.ana_groups()));
            }
        }
        let st = self.st();
        let l = st.ana.get(a).ok_or_else(|| format!("field `listen_address`: subsystem {} does not listen on {a}", self.nqn))?;
        Ok(l.set(grp, state))
    }

    /// The ANA log page descriptors as listener `a` shows them: every group that has a
    /// namespace, ascending, with its namespaces (SPDK reports the same groups), and the
    /// page's change count.
    pub fn ana_descriptors(&self, a: &ListenAddr) -> (u64, Vec<GroupDesc>) {
        let st = self.st();
        let Some(l) = st.ana.get(a) else { return (0, Vec::new()) };
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for ns in st.namespaces.values() {
            groups.entry(ns.anagrpid).or_default().push(ns.nsid);
        }
        let descs = groups.into_iter().map(|(g, nsids)| GroupDesc { anagrpid: g, change_count: l.group_change_count(g), state: l.state(g), nsids }).collect();
        (l.change_count(), descs)
    }

    /// `nvmf_subsystem_get_listeners`' ANA part of listener `a`: SPDK's `ana_states` (every
    /// group) with ANA reporting, else the single state hosts see.
    fn ana_json(&self, st: &SubsysState, a: &ListenAddr) -> (&'static str, Value) {
        let l = st.ana.get(a);
        let state = |g: u32| l.map(|l| l.state(g)).unwrap_or(AnaState::Optimized).name();
        if self.ana_reporting {
            ("ana_states", Value::Array((1..=self.ana_groups()).map(|g| json!({ "ana_group": g, "ana_state": state(g) })).collect()))
        } else {
            ("ana_state", json!(state(1)))
        }
    }

    /// The `nvmf_subsystem_get_listeners` entries.
    pub fn listeners_json(&self) -> Vec<Value> {
        let st = self.st();
        st.listeners
            .iter()
            .map(|(a, secure)| {
                let mut v = json!({ "address": a.to_json(), "secure_channel": secure });
                let (k, ana) = self.ana_json(&st, a);
                v[k] = ana;
                v
            })
            .collect()
    }

    /// (listener, group, state) of every group that has a namespace, for metrics.
    pub fn ana_states(&self) -> Vec<(ListenAddr, u32, AnaState)> {
        let st = self.st();
        let groups: std::collections::BTreeSet<u32> = st.namespaces.values().map(|n| n.anagrpid).collect();
        st.ana.iter().flat_map(|(a, l)| groups.iter().map(move |&g| (a.clone(), g, l.state(g)))).collect()
    }

    pub fn listeners(&self) -> Vec<ListenAddr> {
        self.st().listeners.iter().map(|(l, _)| l.clone()).collect()
    }

    /// The listeners with whether each is secure (TLS).
    pub fn listeners_secure(&self) -> Vec<(ListenAddr, bool)> {
        self.st().listeners.clone()
    }

    pub fn has_listener(&self, a: &ListenAddr) -> bool {
        self.st().listeners.iter().any(|(l, _)| l == a)
    }

    // --- namespaces ---

    /// Adds a namespace on `entry` (opened for export); nsid 0 picks the lowest free id.
    pub fn add_namespace(&self, entry: &Arc<BdevEntry>, nsid: u32, ids: NsIds) -> Result<Arc<Namespace>, String> {
        if self.is_discovery() {
            return Err("the discovery subsystem has no namespaces".into());
        }
        let mut st = self.st();
        let nsid = if nsid == 0 {
            (1..=self.max_namespaces).find(|n| !st.namespaces.contains_key(n)).ok_or_else(|| format!("subsystem {} has no free namespace id", self.nqn))?
        } else {
            if nsid > self.max_namespaces {
                return Err(format!("field `namespace.nsid`: {nsid} is above max_namespaces {}", self.max_namespaces));
            }
            if st.namespaces.contains_key(&nsid) {
                return Err(format!("field `namespace.nsid`: namespace {nsid} already exists in {}", self.nqn));
            }
            nsid
        };
        let anagrpid = ids.anagrpid.unwrap_or(nsid);
        if anagrpid == 0 || anagrpid > self.ana_groups() {
            return Err(format!("field `namespace.anagrpid`: {anagrpid} is not between 1 and max_namespaces {}", self.max_namespaces));
        }
        let uuid = ids.uuid.unwrap_or_else(|| entry.bdev().uuid());
        // Identifiers must be unique within the subsystem (hosts key their block devices on them).
        for other in st.namespaces.values() {
            if other.uuid == uuid {
                return Err(format!("namespace {} of {} already has UUID {uuid}", other.nsid, self.nqn));
            }
        }
        // A state file that cannot be read refuses the namespace (as SPDK does): exporting it
        // without the reservations a host relies on for fencing would be worse.
        let resv = Reservations::new(ids.ptpl_file.clone(), entry.bdev().uuid()).map_err(|e| format!("field `namespace.ptpl_file`: {e}"))?;
        let hold = entry.open(&format!("nvmf {} nsid {nsid}", self.nqn)).map_err(|e| e.to_string())?;
        let nguid = ids.nguid.unwrap_or(*uuid.as_bytes());
        let eui64 = ids.eui64.unwrap_or_else(|| {
            let b = uuid.as_bytes();
            let mut e = [0u8; 8];
            for i in 0..8 {
                e[i] = b[i] ^ b[i + 8];
            }
            e
        });
        let ns = Arc::new(Namespace {
            nsid,
            entry: entry.clone(),
            _hold: hold,
            uuid,
            nguid,
            eui64,
            stats: BdevStats::new(self.cores),
            resv,
            anagrpid,
            explicit_uuid: ids.uuid.is_some(),
            explicit_nguid: ids.nguid.is_some(),
            explicit_eui64: ids.eui64.is_some(),
            explicit_anagrpid: ids.anagrpid.is_some(),
        });
        st.namespaces.insert(nsid, ns.clone());
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        Ok(ns)
    }

    /// Removes a namespace; returns it (its bdev stays open until the last I/O drops it).
    pub fn remove_namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        let ns = self.st().namespaces.remove(&nsid)?;
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        Some(ns)
    }

    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.st().namespaces.get(&nsid).cloned()
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.st().namespaces.values().cloned().collect()
    }

    /// (generation, namespaces) read together, for queue caches.
    pub fn namespace_snapshot(&self) -> (u64, Vec<Arc<Namespace>>) {
        let st = self.st();
        (self.ns_generation(), st.namespaces.values().cloned().collect())
    }

    // --- controllers ---

    /// Allocates a controller id and registers the controller made by `make`.
    pub fn add_controller(&self, make: impl FnOnce(u16) -> Arc<Controller>) -> Option<Arc<Controller>> {
        let mut st = self.st();
        let span = (self.max_cntlid - self.min_cntlid) as u32 + 1;
        for _ in 0..span {
            let id = st.next_cntlid;
            st.next_cntlid = if id >= self.max_cntlid { self.min_cntlid } else { id + 1 };
            if !st.controllers.contains_key(&id) {
                let c = make(id);
                st.controllers.insert(id, c.clone());
                return Some(c);
            }
        }
        None
    }

    pub fn remove_controller(&self, cntlid: u16) {
        self.st().controllers.remove(&cntlid);
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.st().controllers.get(&cntlid).cloned()
    }

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.st().controllers.values().cloned().collect()
    }

    /// The RPC calls that recreate the subsystem (without its controllers).
    pub fn config_calls(&self) -> Vec<(&'static str, Value)> {
        let st = self.st();
        let mut out = vec![(
            "nvmf_create_subsystem",
            json!({
                "nqn": self.nqn, "serial_number": self.serial, "model_number": self.model,
                "allow_any_host": st.allow_any_host, "max_namespaces": self.max_namespaces,
                "min_cntlid": self.min_cntlid, "max_cntlid": self.max_cntlid,
            }),
        )];
        if self.ana_reporting {
            out[0].1["ana_reporting"] = json!(true);
        }
        for (l, secure) in &st.listeners {
            let mut v = json!({ "nqn": self.nqn, "listen_address": l.to_json() });
            if *secure {
                v["secure_channel"] = json!(true);
            }
            out.push(("nvmf_subsystem_add_listener", v));
            // The listener's ANA states, so a restart keeps the paths hosts were steered to:
            // one call when every group has one state, else one per group not optimized.
            if let Some(a) = st.ana.get(l).filter(|_| self.ana_reporting) {
                let states: Vec<AnaState> = (1..=self.ana_groups()).map(|g| a.state(g)).collect();
                let set = |grp: Option<u32>, s: AnaState| {
                    let mut v = json!({ "nqn": self.nqn, "listen_address": l.to_json(), "ana_state": s.name() });
                    if let Some(g) = grp {
                        v["anagrpid"] = json!(g);
                    }
                    ("nvmf_subsystem_listener_set_ana_state", v)
                };
                if states.iter().all(|s| *s == states[0]) {
                    if states[0] != AnaState::Optimized {
                        out.push(set(None, states[0]));
                    }
                } else {
                    for (i, s) in states.iter().enumerate().filter(|(_, s)| **s != AnaState::Optimized) {
                        out.push(set(Some(i as u32 + 1), *s));
                    }
                }
            }
        }
        for (h, keys) in &st.hosts {
            out.push(("nvmf_subsystem_add_host", host_json(json!({ "nqn": self.nqn, "host": h }), keys)));
        }
        for ns in st.namespaces.values() {
            let mut n = json!({ "bdev_name": ns.bdev_name(), "nsid": ns.nsid });
            if ns.explicit_uuid {
                n["uuid"] = json!(ns.uuid.to_string());
            }
            if ns.explicit_nguid {
                n["nguid"] = json!(hex(&ns.nguid));
            }
            if ns.explicit_eui64 {
                n["eui64"] = json!(hex(&ns.eui64));
            }
            if ns.explicit_anagrpid {
                n["anagrpid"] = json!(ns.anagrpid);
            }
            if let Some(f) = ns.resv.ptpl_file() {
                n["ptpl_file"] = json!(f.display().to_string());
            }
            out.push(("nvmf_subsystem_add_ns", json!({ "nqn": self.nqn, "namespace": n })));
        }
        out
    }

    /// The `nvmf_get_subsystems` description.
    pub fn describe(&self) -> Value {
        let st = self.st();
        let mut v = json!({
            "nqn": self.nqn,
            "subtype": if self.is_discovery() { "Discovery" } else { "NVMe" },
            "listen_addresses": st.listeners.iter().map(|(l, _)| l.to_json()).collect::<Vec<_>>(),
            "allow_any_host": self.is_discovery() || st.allow_any_host,
            "hosts": st.hosts.iter().map(|(h, keys)| host_json(json!({ "nqn": h }), keys)).collect::<Vec<_>>(),
        });
        if !self.is_discovery() {
            v["serial_number"] = json!(self.serial);
            v["model_number"] = json!(self.model);
            v["max_namespaces"] = json!(self.max_namespaces);
            v["min_cntlid"] = json!(self.min_cntlid);
            v["max_cntlid"] = json!(self.max_cntlid);
            if self.ana_reporting {
                v["ana_reporting"] = json!(true);
            }
            v["namespaces"] = Value::Array(
                st.namespaces
                    .values()
                    .map(|ns| {
                        let mut n = json!({
                            "nsid": ns.nsid, "bdev_name": ns.bdev_name(), "name": ns.bdev_name(),
                            "uuid": ns.uuid.to_string(), "nguid": hex(&ns.nguid), "eui64": hex(&ns.eui64),
                        });
                        // As SPDK: the group is shown where hosts see groups.
                        if self.ana_reporting {
                            n["anagrpid"] = json!(ns.anagrpid);
                        }
                        n
                    })
                    .collect(),
            );
        }
        v
    }
}

/// Upper-case hex without separators (SPDK's NGUID/EUI64 spelling).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Parses hex with optional `-`/`:` separators into exactly `N` bytes.
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits: Vec<u8> = s.bytes().filter(|c| *c != b'-' && *c != b':').collect();
    if digits.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        let t = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(t, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_validate() {
        let a = ListenAddr::parse("TCP", Some("ipv4"), "127.0.0.1", "4420").unwrap();
        assert_eq!(a.socket_addr().to_string(), "127.0.0.1:4420");
        assert!(ListenAddr::parse("RDMA", None, "127.0.0.1", "4420").is_err());
        assert!(ListenAddr::parse("tcp", Some("IPv6"), "127.0.0.1", "4420").is_err());
        assert!(ListenAddr::parse("tcp", None, "localhost", "4420").is_err());
        assert!(ListenAddr::parse("tcp", None, "::1", "99999").is_err());
        assert_eq!(ListenAddr::parse("tcp", None, "::1", "4420").unwrap().adrfam, AdrFam::IPv6);
    }

    #[test]
    fn subsystem_fields_validate() {
        assert!(Subsystem::new("nqn.2016-06.io.t:a", SubsysKind::Nvme, "SN", "MN", 32, false, (1, 0xFFEF), 1).is_ok());
        assert!(Subsystem::new("bogus", SubsysKind::Nvme, "SN", "MN", 32, false, (1, 0xFFEF), 1).is_err());
        assert!(Subsystem::new("nqn.2016-06.io.t:a", SubsysKind::Nvme, &"S".repeat(21), "MN", 32, false, (1, 0xFFEF), 1).is_err());
        assert!(Subsystem::new("nqn.2016-06.io.t:a", SubsysKind::Nvme, "SN", "MN", 0, false, (1, 0xFFEF), 1).is_err());
        assert!(Subsystem::new("nqn.2016-06.io.t:a", SubsysKind::Nvme, "SN", "MN", 32, false, (5, 4), 1).is_err());
    }

    #[test]
    fn ana_states_per_listener_validate_show_and_save() {
        let plain = Subsystem::new("nqn.2016-06.io.t:p", SubsysKind::Nvme, "SN", "MN", 4, false, (1, 0xFFEF), 1).unwrap();
        let a = ListenAddr::parse("tcp", None, "127.0.0.1", "4420").unwrap();
        let b = ListenAddr::parse("tcp", None, "127.0.0.1", "4421").unwrap();
        plain.add_listener(&a, false).unwrap();
        assert!(plain.set_ana_state(&a, None, AnaState::Inaccessible).unwrap_err().contains("ana_reporting"));
        assert_eq!(plain.listeners_json()[0]["ana_state"], "optimized");

        let s = Subsystem::new("nqn.2016-06.io.t:a", SubsysKind::Nvme, "SN", "MN", 4, false, (1, 0xFFEF), 1).unwrap().with_ana_reporting(true);
        s.add_listener(&a, false).unwrap();
        s.add_listener(&b, false).unwrap();
        assert!(s.set_ana_state(&a, Some(0), AnaState::Inaccessible).unwrap_err().contains("anagrpid"));
        assert!(s.set_ana_state(&a, Some(5), AnaState::Inaccessible).unwrap_err().contains("anagrpid"));
        let c = ListenAddr::parse("tcp", None, "127.0.0.1", "4422").unwrap();
        assert!(s.set_ana_state(&c, None, AnaState::Inaccessible).unwrap_err().contains("does not listen"));
        assert_eq!(s.set_ana_state(&a, Some(2), AnaState::Inaccessible), Ok(true));
        assert_eq!(s.set_ana_state(&a, Some(2), AnaState::Inaccessible), Ok(false));
        assert_eq!(s.set_ana_state(&b, None, AnaState::NonOptimized), Ok(true));
        // A controller's view is the listener's, shared.
        assert_eq!(s.listener_ana(&a).unwrap().state(2), AnaState::Inaccessible);
        let l = s.listeners_json();
        assert_eq!(l[0]["ana_states"][1], json!({"ana_group": 2, "ana_state": "inaccessible"}));
        assert_eq!(l[0]["ana_states"].as_array().unwrap().len(), 4, "every group 1..=max_namespaces, as SPDK");
        // save_config: per group where they differ, one call where they are all the same.
        let calls = s.config_calls();
        assert_eq!(calls[0].1["ana_reporting"], true);
        let sets: Vec<&Value> = calls.iter().filter(|(m, _)| *m == "nvmf_subsystem_listener_set_ana_state").map(|(_, v)| v).collect();
        assert_eq!(sets.len(), 2, "{sets:?}");
        assert_eq!((sets[0]["anagrpid"].as_u64(), sets[0]["ana_state"].as_str()), (Some(2), Some("inaccessible")));
        assert_eq!((sets[1].get("anagrpid"), sets[1]["ana_state"].as_str()), (None, Some("non_optimized")));
        // A removed listener's states go with it; added again it starts optimized.
        assert!(s.remove_listener(&a));
        assert!(s.listener_ana(&a).is_none());
        s.add_listener(&a, false).unwrap();
        assert_eq!(s.listener_ana(&a).unwrap().state(2), AnaState::Optimized);
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(parse_hex::<4>("0a-0B:0c0d"), Some([10, 11, 12, 13]));
        assert_eq!(parse_hex::<4>("0a0b0c"), None);
        assert_eq!(hex(&[0xab, 1]), "AB01");
    }
}
