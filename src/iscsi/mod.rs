//! The iSCSI target (RFC 7143) over the SCSI block command set of [`crate::scsi`].
//!
//! Layout: [`pdu`] (headers, digests), [`text`] (key=value data), [`params`] (operational
//! negotiation), [`chap`], [`login`] (the login state machine), [`config`] (portal,
//! initiator and auth groups, target nodes), [`portal`] (listeners on core 0), [`conn`] (a
//! connection, owned by one core), [`rpc`] (SPDK's `iscsi_*` methods) and the subsystem below
//! (sessions, save_config, shutdown, metrics).
//!
//! Limits: ErrorRecoveryLevel 0 and one connection per session (MaxConnections = 1).

pub mod chap;
pub mod config;
mod conn;
pub mod login;
pub mod params;
pub mod pdu;
mod portal;
pub mod rpc;
pub mod text;

use crate::bdev::IoType;
use crate::config::ConfigCall;
use crate::metrics::{labels, LatencySample, MetricsOut};
use crate::module::{Ctx, Module};
use config::{Registry, TargetNode};
use login::{status, LoggedIn, LoginContext, SessionType};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A logged-in session (one connection).
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub conn_id: u64,
    pub core: usize,
    pub tsih: u16,
    pub isid: [u8; 6],
    pub cid: u16,
    pub initiator: String,
    pub target: Option<String>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub pg_tag: u16,
}

#[derive(Default)]
pub struct Sessions {
    pub records: BTreeMap<u64, SessionRecord>,
    next_tsih: u16,
}

#[derive(Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub login_failures: AtomicU64,
    pub digest_errors: AtomicU64,
    pub nop_timeouts: AtomicU64,
}

/// State shared by the RPC thread and every core's connections.
pub struct IscsiShared {
    registry: Mutex<Registry>,
    sessions: Mutex<Sessions>,
    cores: usize,
    next_conn: AtomicU64,
    next_core: AtomicUsize,
    next_listener: AtomicU64,
    pub counters: Counters,
}

/// How long reinstatement and deletion wait for old connections to go away.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

impl IscsiShared {
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Relaxed)
    }

    fn next_core(&self) -> usize {
        self.next_core.fetch_add(1, Relaxed) % self.cores
    }

    fn initial_stat_sn(&self) -> u32 {
        // StatSN is a sequence number, not a secret (RFC 7143 lets it start anywhere): when
        // the OS random source fails it starts at 0; the CHAP challenge refuses the login.
        let mut b = [0u8; 4];
        if login::os_random(&mut b).is_err() {
            b = [0; 4];
        }
        u32::from_le_bytes(b)
    }

    /// Registers a new session: reinstates (closes) an older one with the same initiator, ISID
    /// and target, checks the limits and assigns the TSIH.
    async fn register_session(&self, li: &LoggedIn, conn_id: u64, ctx: &LoginContext) -> Result<u16, (u8, u8)> {
        let target = li.node.as_ref().map(|n| n.name.clone());
        if li.tsih != 0 {
            // Adding a connection to a session: sessions have exactly one.
            let exists = self.sessions().records.values().any(|r| r.tsih == li.tsih);
            return Err(if exists { status::TOO_MANY_CONNECTIONS } else { status::SESSION_DOES_NOT_EXIST });
        }
        if li.session_type == SessionType::Normal {
            let old: Vec<(u64, usize)> = self
                .sessions()
                .records
                .values()
                .filter(|r| r.isid == li.isid && r.target == target && r.initiator.eq_ignore_ascii_case(&li.initiator))
                .map(|r| (r.conn_id, r.core))
                .collect();
            if !old.is_empty() {
                log::info!("iscsi: {} reinstates its session to {}", li.initiator, target.as_deref().unwrap_or("?"));
                for &(id, core) in &old {
                    crate::reactor::send_to(core, move || conn::close_local(id));
                }
                let start = crate::reactor::now_ns();
                while old.iter().any(|(id, _)| self.sessions().records.contains_key(id)) {
                    if crate::reactor::now_ns().saturating_sub(start) > CLOSE_WAIT.as_nanos() as u64 {
                        return Err(status::TARGET_ERROR);
                    }
                    crate::reactor::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let max = self.registry().options.max_sessions as usize;
        let mut s = self.sessions();
        if s.records.len() >= max {
            return Err(status::OUT_OF_RESOURCES);
        }
        let mut tsih = s.next_tsih;
        loop {
            tsih = tsih.wrapping_add(1);
            if tsih != 0 && !s.records.values().any(|r| r.tsih == tsih) {
                break;
            }
        }
        s.next_tsih = tsih;
        s.records.insert(
            conn_id,
            SessionRecord {
                conn_id,
                core: crate::reactor::current_index(),
                tsih,
                isid: li.isid,
                cid: li.cid,
                initiator: li.initiator.clone(),
                target,
                peer: ctx.peer,
                local: ctx.local,
                pg_tag: ctx.pg_tag,
            },
        );
        Ok(tsih)
    }

    fn remove_session(&self, conn_id: u64) {
        self.sessions().records.remove(&conn_id);
    }
}

/// The iSCSI subsystem of a target.
pub struct IscsiSubsystem {
    pub shared: Arc<IscsiShared>,
}

impl IscsiSubsystem {
    pub fn new(cores: usize) -> Self {
        IscsiSubsystem {
            shared: Arc::new(IscsiShared {
                registry: Mutex::new(Registry::default()),
                sessions: Mutex::new(Sessions::default()),
                cores: cores.max(1),
                next_conn: AtomicU64::new(1),
                next_core: AtomicUsize::new(0),
                next_listener: AtomicU64::new(1),
                counters: Counters::default(),
            }),
        }
    }

    /// Closes the connections of sessions matching `which` and waits until they are gone.
    pub(crate) fn close_sessions(&self, t: &Ctx, which: impl Fn(&SessionRecord) -> bool) -> bool {
        let victims: Vec<(u64, usize)> = self.shared.sessions().records.values().filter(|r| which(r)).map(|r| (r.conn_id, r.core)).collect();
        for &(id, core) in &victims {
            t.reactors.send(core, move || conn::close_local(id));
        }
        let start = Instant::now();
        while victims.iter().any(|(id, _)| self.shared.sessions().records.contains_key(id)) {
            if start.elapsed() > CLOSE_WAIT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Module for IscsiSubsystem {
    fn name(&self) -> &'static str {
        "iscsi"
    }

    fn config(&self, _t: &Ctx) -> Vec<ConfigCall> {
        rpc::config_calls(&self.shared.registry())
    }

    fn shutdown(&self, t: &Ctx) {
        let _ = t.reactors.call(portal::LISTEN_CORE, portal::stop_all);
        let _ = t.reactors.call_all(conn::close_all_local);
        let start = Instant::now();
        while !self.shared.sessions().records.is_empty() && start.elapsed() < CLOSE_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Connections still in login hold no LUN; give them a moment to see their socket close.
        std::thread::sleep(Duration::from_millis(20));
        // Release the LUNs (and with them the bdevs) before the bdev layer closes.
        let nodes = std::mem::take(&mut self.shared.registry().nodes);
        drop(nodes);
    }

    fn metrics(&self, _t: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let nodes: Vec<Arc<TargetNode>> = self.shared.registry().nodes.values().cloned().collect();
        let mut sessions = Vec::new();
        let mut conns = Vec::new();
        let mut ops = Vec::new();
        let mut bytes = Vec::new();
        let mut errors = Vec::new();
        let mut snaps = Vec::new();
        for n in &nodes {
            sessions.push((labels(&[("target", &n.name)]), n.sessions.load(Relaxed) as f64));
            conns.push((labels(&[("target", &n.name)]), n.connections.load(Relaxed) as f64));
            for l in n.luns().iter() {
                let s = l.stats.snapshot();
                let lun = l.id.to_string();
                for t in IoType::ALL {
                    let lb = labels(&[("target", &n.name), ("lun", &lun), ("type", t.name())]);
                    ops.push((lb.clone(), s.ops[t.index()]));
                    bytes.push((lb.clone(), s.bytes[t.index()]));
                    errors.push((lb, s.errors[t.index()]));
                }
                snaps.push((labels(&[("target", &n.name), ("lun", &lun)]), s));
            }
        }
        out.gauge("tidemark_iscsi_sessions", "Logged-in iSCSI sessions per target node.", &sessions)?;
        out.gauge("tidemark_iscsi_connections", "iSCSI connections per target node.", &conns)?;
        out.counter("tidemark_iscsi_lun_ops", "SCSI commands completed per target node, LUN and type.", &ops)?;
        out.counter("tidemark_iscsi_lun_bytes", "Bytes transferred per target node, LUN and type.", &bytes)?;
        out.counter("tidemark_iscsi_lun_errors", "SCSI commands that failed per target node, LUN and type.", &errors)?;
        let reads: Vec<_> = snaps.iter().map(|(l, s)| (l.clone(), LatencySample { buckets: &s.read_buckets, sum_ns: s.read_sum_ns })).collect();
        out.latency("tidemark_iscsi_lun_read_latency_seconds", "READ latency per LUN, command received to data ready.", &reads)?;
        let writes: Vec<_> = snaps.iter().map(|(l, s)| (l.clone(), LatencySample { buckets: &s.write_buckets, sum_ns: s.write_sum_ns })).collect();
        out.latency("tidemark_iscsi_lun_write_latency_seconds", "WRITE latency per LUN, command received to data written.", &writes)?;
        let c = &self.shared.counters;
        let discovery = self.shared.sessions().records.values().filter(|r| r.target.is_none()).count();
        out.gauge("tidemark_iscsi_discovery_sessions", "Logged-in discovery sessions.", &[(vec![], discovery as f64)])?;
        out.counter("tidemark_iscsi_connections_accepted", "TCP connections accepted on iSCSI portals.", &[(vec![], c.connections_accepted.load(Relaxed))])?;
        out.counter(
            "tidemark_iscsi_login_failures",
            "Logins refused (authentication, authorization, unknown target, limits).",
            &[(vec![], c.login_failures.load(Relaxed))],
        )?;
        out.counter("tidemark_iscsi_digest_errors", "PDUs received with a wrong header or data digest.", &[(vec![], c.digest_errors.load(Relaxed))])?;
        out.counter(
            "tidemark_iscsi_nop_timeouts",
            "Connections dropped because the initiator stopped answering NOP-In.",
            &[(vec![], c.nop_timeouts.load(Relaxed))],
        )?;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
