//! The NVMe-oF TCP target: the transport (PDUs, digests, R2T flow), controllers (Fabrics and
//! admin commands, keep-alive, asynchronous events), the I/O command set on bdevs, the
//! discovery service, access control, the `nvmf_*` RPCs and per-subsystem metrics.
//!
//! Threading: a listener accepts on core 0 and hands each connection to a core chosen
//! round-robin; a connection is one queue pair and lives on that core for its whole life
//! (admin and I/O queues of one controller usually land on different cores). Controller-wide
//! state (registers, features, events) is shared through an `Arc` under a mutex: only admin
//! commands and the control plane touch it. The data path touches per-queue state only.

pub mod ana;
pub mod auth;
pub mod connection;
pub mod controller;
pub mod identify;
pub mod initiator;
pub mod io;
pub mod pdu;
pub mod reservation;
pub mod rpc;
pub mod spec;
pub mod subsystem;
pub mod tls;
pub mod transport;

use crate::config::ConfigCall;
use crate::metrics::{labels, LatencySample, MetricsOut};
use crate::module::{Ctx, Module};
use crate::reactor::{self, ReactorHandle};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use subsystem::{ListenAddr, SubsysKind, Subsystem};
use transport::TransportOpts;

/// The NVMe-oF target state shared by the RPC threads and every core.
pub struct Nvmf {
    pub reactors: ReactorHandle,
    /// The discovery subsystem (`nqn.2014-08.org.nvmexpress.discovery`), reachable on every
    /// listener.
    pub discovery: Arc<Subsystem>,
    inner: Mutex<Inner>,
    /// Discovery log generation counter: bumped on every change hosts can discover.
    genctr: AtomicU64,
    next_conn_id: AtomicU64,
    next_core: AtomicUsize,
    pub stopping: AtomicBool,
    pub started: Instant,
    /// Connections currently open (all cores), for metrics and shutdown.
    pub open_connections: AtomicUsize,
    /// The DH-HMAC-CHAP hashes and groups offered (`nvmf_set_config`).
    pub auth_policy: Mutex<auth::Policy>,
    /// Failed DH-HMAC-CHAP transactions (tidemark_nvmf_auth_failures_total).
    pub auth_failures: AtomicU64,
    /// The TLS settings of secure listeners, made with the first one.
    tls: std::sync::OnceLock<openssl::ssl::SslContext>,
    /// TLS handshakes refused (tidemark_nvmf_tls_refused_total).
    pub tls_refused: AtomicU64,
}

struct Inner {
    transport: Option<TransportOpts>,
    subsystems: BTreeMap<String, Arc<Subsystem>>,
    /// Listen addresses with a running listener: their discovery port id, how many
    /// subsystems use them, and whether they speak TLS only.
    listeners: BTreeMap<ListenAddr, (u16, usize, bool)>,
    next_portid: u16,
}

/// Most subsystems one target serves.
pub const MAX_SUBSYSTEMS: usize = 1024;

impl Nvmf {
    pub fn new(reactors: ReactorHandle) -> Nvmf {
        let cores = reactors.core_count();
        let discovery = Subsystem::new(spec::DISCOVERY_NQN, SubsysKind::Discovery, "", "", 0, true, (1, 0xFFEF), cores).expect("the discovery NQN is valid");
        Nvmf {
            reactors,
            discovery: Arc::new(discovery),
            inner: Mutex::new(Inner { transport: None, subsystems: BTreeMap::new(), listeners: BTreeMap::new(), next_portid: 1 }),
            genctr: AtomicU64::new(1),
            next_conn_id: AtomicU64::new(1),
            next_core: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            open_connections: AtomicUsize::new(0),
            auth_policy: Mutex::new(auth::Policy::default()),
            auth_failures: AtomicU64::new(0),
            tls: std::sync::OnceLock::new(),
            tls_refused: AtomicU64::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn transport(&self) -> Option<TransportOpts> {
        self.inner().transport
    }

    pub fn set_transport(&self, t: TransportOpts) -> Result<(), String> {
        let mut i = self.inner();
        if i.transport.is_some() {
            return Err("transport TCP already exists".into());
        }
        i.transport = Some(t);
        Ok(())
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == spec::DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.inner().subsystems.get(nqn).cloned()
    }

    /// Every NVM subsystem (not the discovery one), by NQN.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.inner().subsystems.values().cloned().collect()
    }

    pub fn add_subsystem(&self, s: Subsystem) -> Result<Arc<Subsystem>, String> {
        let mut i = self.inner();
        if s.nqn == spec::DISCOVERY_NQN || i.subsystems.contains_key(&s.nqn) {
            return Err(format!("subsystem {} already exists", s.nqn));
        }
        if i.subsystems.len() >= MAX_SUBSYSTEMS {
            return Err(format!("the target already has {MAX_SUBSYSTEMS} subsystems"));
        }
        let s = Arc::new(s);
        i.subsystems.insert(s.nqn.clone(), s.clone());
        drop(i);
        self.bump_genctr();
        Ok(s)
    }

    pub fn take_subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        let s = self.inner().subsystems.remove(nqn);
        if s.is_some() {
            self.bump_genctr();
        }
        s
    }

    pub fn bump_genctr(&self) {
        self.genctr.fetch_add(1, Ordering::AcqRel);
    }

    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Acquire)
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The core that gets the next accepted connection (round-robin).
    pub fn next_core(&self) -> usize {
        self.next_core.fetch_add(1, Ordering::Relaxed) % self.reactors.core_count()
    }

    /// Takes a reference on the listener of `a`, starting it if it is new.
    /// A listener is TLS-only (`secure`) or plain for every subsystem on it: whether a
    /// connection is TLS is settled before it names a subsystem.
    pub fn acquire_listener(self: &Arc<Self>, a: &ListenAddr, secure: bool) -> Result<(), String> {
        let mut i = self.inner();
        if let Some(e) = i.listeners.get_mut(a) {
            if e.2 != secure {
                let (is, asked) = if e.2 { ("TLS-only (secure_channel)", "a plain") } else { ("plain", "a secure_channel") };
                return Err(format!("the listener on {a} is {is} for other subsystems; {asked} one cannot share its address"));
            }
            e.1 += 1;
            return Ok(());
        }
        let tls = if secure { Some(self.tls_context()?) } else { None };
        // Bind while holding the lock: two RPCs adding the same address must not both bind.
        transport::start_listener(self, a, tls)?;
        let portid = i.next_portid;
        i.next_portid = i.next_portid.wrapping_add(1).max(1);
        i.listeners.insert(a.clone(), (portid, 1, secure));
        Ok(())
    }

    /// The TLS settings of secure listeners; the key of a host is looked up at each
    /// handshake, so keys added or removed later apply to the next connection.
    fn tls_context(self: &Arc<Self>) -> Result<openssl::ssl::SslContext, String> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        let weak = Arc::downgrade(self);
        let ctx = tls::server_context(Box::new(move |id: &tls::PskIdentity| weak.upgrade().and_then(|n| n.tls_psk(id))))
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        Ok(self.tls.get_or_init(|| ctx).clone())
    }

    /// The TLS key of the host and subsystem `id` names, if that host has a PSK there.
    fn tls_psk(&self, id: &tls::PskIdentity) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        // Logged here with the reason; counted once, as a failed handshake, by the connection.
        let refuse = |why: &str| {
            log::warn!("nvmf: TLS: host {} asked for {}: {why}; refused", id.hostnqn, id.subnqn);
            None
        };
        let Some(s) = self.subsystem(&id.subnqn) else { return refuse("no such subsystem") };
        let Some(psk) = s.host_keys(&id.hostnqn).and_then(|k| k.psk.as_ref().map(|p| p.secret().to_vec())) else {
            return refuse("the host has no PSK on it");
        };
        let psk = zeroize::Zeroizing::new(psk);
        // Checked when the host was added; the key's content cannot change since.
        let Ok(key) = tls::ConfiguredPsk::parse(&psk) else { return refuse("its PSK is not an NVMe TLS key") };
        if key.suite != id.suite {
            return refuse(&format!("it offered {} but its PSK is for {}", id.suite.name(), key.suite.name()));
        }
        key.tls_psk(&id.hostnqn, &id.text())
    }

    /// Drops a reference on the listener of `a`, stopping it when no subsystem uses it.
    pub fn release_listener(self: &Arc<Self>, a: &ListenAddr) {
        let mut i = self.inner();
        let stop = match i.listeners.get_mut(a) {
            Some(e) if e.1 > 1 => {
                e.1 -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if stop {
            i.listeners.remove(a);
            drop(i);
            transport::stop_listener(self, a);
        }
    }

    pub fn portid(&self, a: &ListenAddr) -> u16 {
        self.inner().listeners.get(a).map(|e| e.0).unwrap_or(0)
    }

    pub fn listeners(&self) -> Vec<ListenAddr> {
        self.inner().listeners.keys().cloned().collect()
    }

    /// Runs `f` on `core`, from a reactor core or from any other thread.
    pub fn post(&self, core: usize, f: impl FnOnce() + Send + 'static) {
        if reactor::try_current().is_some() {
            reactor::send_to(core, f);
        } else {
            self.reactors.send(core, f);
        }
    }

    /// Disconnects every queue pair of `ctrl` and forgets the controller.
    pub fn destroy_controller(&self, ctrl: &Arc<controller::Controller>, why: &str) {
        if ctrl.mark_closed() {
            log::info!("nvmf: controller {} of {} for {}: {why}", ctrl.cntlid, ctrl.subsys.nqn, ctrl.host_display());
            ctrl.subsys.remove_controller(ctrl.cntlid);
            for (core, conn) in ctrl.queue_connections() {
                self.post(core, move || connection::abort_connection(conn));
            }
        }
    }

    /// Tells every core to drop cached namespace channels of `subsys`, and waits for it.
    pub fn purge_namespace_caches(&self, subsys_id: u64) {
        let r = if reactor::try_current().is_some() { Ok(vec![]) } else { self.reactors.call_all(move || connection::purge_namespaces(subsys_id)) };
        if let Err(e) = r {
            log::warn!("nvmf: purging namespace caches: {e}");
        }
    }

    /// Stops listening and disconnects every host; waits (bounded) for the connections to end.
    pub fn shutdown(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::SeqCst);
        for a in self.listeners() {
            transport::stop_listener(self, &a);
        }
        self.inner().listeners.clear();
        let _ = self.reactors.call_all(connection::abort_all);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.open_connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.open_connections.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("nvmf: {left} connection(s) still open at shutdown");
        }
        let subs: Vec<_> = std::mem::take(&mut self.inner().subsystems).into_values().collect();
        for s in subs {
            s.deleted.store(true, Ordering::SeqCst);
            for ns in s.namespaces() {
                s.remove_namespace(ns.nsid);
            }
        }
        let _ = self.reactors.call_all(connection::purge_all_namespaces);
    }
}

/// The `nvmf` subsystem of the target (configuration, shutdown, metrics).
pub struct NvmfTarget {
    pub nvmf: Arc<Nvmf>,
}

impl NvmfTarget {
    pub fn new(reactors: ReactorHandle) -> NvmfTarget {
        NvmfTarget { nvmf: Arc::new(Nvmf::new(reactors)) }
    }
}

impl Module for NvmfTarget {
    fn name(&self) -> &'static str {
        "nvmf"
    }

    fn config(&self, _t: &Ctx) -> Vec<ConfigCall> {
        let mut out = Vec::new();
        // The default offers everything; a config without the call recreates it.
        let policy = self.nvmf.auth_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if policy != auth::Policy::default() {
            out.push(ConfigCall::new(
                "nvmf_set_config",
                serde_json::json!({
                    "dhchap_digests": policy.digests.iter().map(|d| d.name()).collect::<Vec<_>>(),
                    "dhchap_dhgroups": policy.dhgroups.iter().map(|g| g.name()).collect::<Vec<_>>(),
                }),
            ));
        }
        if let Some(tr) = self.nvmf.transport() {
            out.push(ConfigCall::new("nvmf_create_transport", tr.to_json()));
        }
        for s in self.nvmf.subsystems() {
            for (m, p) in s.config_calls() {
                out.push(ConfigCall::new(m, p));
            }
        }
        out
    }

    fn shutdown(&self, _t: &Ctx) {
        self.nvmf.shutdown();
    }

    /// A namespace's bdev changed size: every controller of its subsystem gets Namespace
    /// Attribute Changed and the namespace in its Changed Namespace List (NVMe Base §5.2.2);
    /// Identify Namespace already reads the size now.
    fn bdev_resized(&self, name: &str) {
        for s in self.nvmf.subsystems() {
            for ns in s.namespaces().iter().filter(|ns| ns.bdev_name() == name) {
                log::info!("nvmf: {}: namespace {} (bdev {name}) is now {} blocks", s.nqn, ns.nsid, ns.num_blocks());
                for c in s.controllers() {
                    c.namespace_changed(&self.nvmf, ns.nsid);
                }
            }
        }
    }

    fn metrics(&self, _t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let subs = self.nvmf.subsystems();
        let mut ctrls = Vec::new();
        let mut qpairs = Vec::new();
        let mut ns_count = Vec::new();
        let mut ops = Vec::new();
        let mut bytes = Vec::new();
        let mut errors = Vec::new();
        let mut qd = Vec::new();
        let mut conflicts = Vec::new();
        let mut snaps = Vec::new();
        let mut ana = Vec::new();
        for s in &subs {
            if s.ana_reporting {
                for (a, g, st) in s.ana_states() {
                    let l = labels(&[("nqn", &s.nqn), ("traddr", &a.traddr), ("trsvcid", &a.trsvcid), ("ana_group", &g.to_string())]);
                    ana.push((l, st as u8 as f64));
                }
            }
            let l = labels(&[("nqn", &s.nqn)]);
            let cs = s.controllers();
            ctrls.push((l.clone(), cs.len() as f64));
            qpairs.push((l.clone(), cs.iter().map(|c| c.queue_connections().len()).sum::<usize>() as f64));
            let nss = s.namespaces();
            ns_count.push((l, nss.len() as f64));
            for ns in nss {
                let snap = ns.stats.snapshot();
                let nsid = ns.nsid.to_string();
                for t in crate::bdev::IoType::ALL {
                    let l = labels(&[("nqn", &s.nqn), ("nsid", &nsid), ("bdev", ns.bdev_name()), ("type", t.name())]);
                    ops.push((l.clone(), snap.ops[t.index()]));
                    bytes.push((l.clone(), snap.bytes[t.index()]));
                    errors.push((l, snap.errors[t.index()]));
                }
                let l = labels(&[("nqn", &s.nqn), ("nsid", &nsid), ("bdev", ns.bdev_name())]);
                qd.push((l.clone(), snap.in_flight as f64));
                conflicts.push((l.clone(), ns.resv.conflicts.load(Ordering::Relaxed)));
                snaps.push((l, snap));
            }
        }
        out.gauge("tidemark_nvmf_controllers", "Controllers connected per NVMe subsystem.", &ctrls)?;
        out.gauge("tidemark_nvmf_qpairs", "Queue pairs (admin and I/O) connected per NVMe subsystem.", &qpairs)?;
        out.gauge("tidemark_nvmf_namespaces", "Namespaces per NVMe subsystem.", &ns_count)?;
        out.gauge(
            "tidemark_nvmf_connections",
            "Open NVMe/TCP connections, connected to a controller or not.",
            &[(vec![], self.nvmf.open_connections.load(Ordering::Relaxed) as f64)],
        )?;
        out.counter(
            "tidemark_nvmf_auth_failures",
            "NVMe in-band authentication (DH-HMAC-CHAP) transactions that failed.",
            &[(vec![], self.nvmf.auth_failures.load(Ordering::Relaxed))],
        )?;
        out.counter(
            "tidemark_nvmf_tls_refused",
            "Connections to a secure (TLS) listener refused: no key for the host, a wrong key, not TLS, or a handshake cut short.",
            &[(vec![], self.nvmf.tls_refused.load(Ordering::Relaxed))],
        )?;
        out.counter("tidemark_nvmf_namespace_ops", "Completed NVMe I/O commands per namespace and type.", &ops)?;
        out.counter("tidemark_nvmf_namespace_bytes", "Bytes transferred per namespace and type.", &bytes)?;
        out.counter("tidemark_nvmf_namespace_errors", "NVMe I/O commands completed with an error, per namespace and type.", &errors)?;
        out.gauge("tidemark_nvmf_namespace_queue_depth", "NVMe I/O commands executing per namespace.", &qd)?;
        out.counter(
            "tidemark_nvmf_namespace_reservation_conflicts",
            "NVMe commands refused with Reservation Conflict per namespace (a host fenced by another's reservation).",
            &conflicts,
        )?;
        out.gauge(
            "tidemark_nvmf_listener_ana_state",
            "ANA state per listener and ANA group (groups with a namespace, subsystems with ana_reporting): 1 optimized, 2 non-optimized, 3 inaccessible, 4 persistent loss, 15 change.",
            &ana,
        )?;
        let reads: Vec<_> = snaps.iter().map(|(l, s)| (l.clone(), LatencySample { buckets: &s.read_buckets, sum_ns: s.read_sum_ns })).collect();
        out.latency("tidemark_nvmf_namespace_read_latency_seconds", "NVMe read latency per namespace, command received to data sent.", &reads)?;
        let writes: Vec<_> = snaps.iter().map(|(l, s)| (l.clone(), LatencySample { buckets: &s.write_buckets, sum_ns: s.write_sum_ns })).collect();
        out.latency("tidemark_nvmf_namespace_write_latency_seconds", "NVMe write latency per namespace, command received to completion sent.", &writes)?;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A JSON description of a controller for `nvmf_subsystem_get_controllers`.
pub fn describe_controller(c: &controller::Controller) -> serde_json::Value {
    json!({
        "cntlid": c.cntlid,
        "hostnqn": c.hostnqn,
        "hostid": uuid::Uuid::from_bytes(c.hostid).to_string(),
        "num_io_qpairs": c.io_queue_count(),
    })
}
