//! `bdev_nvme_attach_controller {trtype: "tcp", ...}` (reached from `nvme::rpc`, which
//! dispatches on `trtype`), `bdev_nvme_detach_controller` of a TCP controller,
//! `bdev_nvme_get_controllers` (SPDK's output shape), `bdev_nvme_reset_controller` and
//! `bdev_nvme_set_options` ([`super::options`]). The module keeps the attached controllers and
//! the options, and writes their metrics.

use super::options::Options;
use super::pending::Pending;
use super::queue::{IoQueue, MAX_TRANSFER};
use super::reconnect::{connect_queue, start_keep_alive, Policy, Target};
use super::{bdev_name, install_queue, remove_queue, NvmeTcpBdev, Shared, State, TcpController};
use crate::bdev::BdevCtx;
use crate::config::ConfigCall;
use crate::metrics::MetricsOut;
use crate::module::{Ctx, Module};
use crate::nvmf::initiator::{Controller, Error as HostError, QpairOptions, TransportId};
use crate::nvmf::spec::prop;
use crate::nvmf::tls::ConfiguredPsk;
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

crate::register_module! {
    name: "nvme_tcp",
    order: 16,
    construct: |_reactors, _config| Arc::new(TcpModule::default()),
    methods: [
        ("bdev_nvme_get_controllers", get_controllers, GetControllers, "Lists the attached NVMe/TCP controllers.", [&[(ENODEV, "no controller has that name")]]),
        ("bdev_nvme_reset_controller", reset_controller, Reset, "Drops an NVMe/TCP controller's connections and connects again (I/O in flight waits and is sent again).", [&[
                (ENODEV, "no controller has that name, or it is being deleted"),
                (EBUSY, "the controller is already reconnecting"),
                (EIO, "the reconnect failed (the controller then keeps reconnecting as after a connection loss)"),
            ]]),
        ("bdev_nvme_set_options", set_options, Options, "Sets the NVMe bdev module's options (startup only: before any controller is attached).", [&[
                (EPERM, "a controller is attached"),
            ]]),
    ],
}

#[derive(Default)]
pub struct TcpModule {
    ctrls: Arc<Controllers>,
    opts: Mutex<Options>,
}

/// The attached controllers, and those the configuration attaches whose node does not answer
/// yet ([`super::pending`]); shared with the threads that keep connecting those.
#[derive(Default)]
pub(super) struct Controllers {
    attached: Mutex<Vec<Arc<TcpController>>>,
    pub(super) pending: Mutex<Vec<Arc<Pending>>>,
    next_id: AtomicU64,
}

impl Controllers {
    pub(super) fn pending(&self) -> MutexGuard<'_, Vec<Arc<Pending>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attached(&self) -> MutexGuard<'_, Vec<Arc<TcpController>>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpModule {
    /// The attached controllers; forgets those deleted after `ctrlr_loss_timeout_sec`.
    fn list(&self) -> Vec<Arc<TcpController>> {
        let mut all = self.ctrls.attached();
        all.retain(|c| !c.shared.removed.load(Ordering::SeqCst));
        all.clone()
    }

    fn options(&self) -> Options {
        self.opts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn find(&self, name: &str) -> Option<Arc<TcpController>> {
        self.list().into_iter().find(|c| c.shared.name == name)
    }
}

impl Module for TcpModule {
    fn name(&self) -> &'static str {
        "nvme_tcp"
    }

    /// The controllers are recreated by their bdevs' `config_call` (bdev section).
    fn config(&self, _ctx: &Ctx) -> Vec<ConfigCall> {
        Vec::new()
    }

    /// Stops the keep-alives and recoveries, and ends the I/O that waits for a reconnect
    /// (`Offline`): the bdevs' flushes that follow, and the reactors' drain of busy pollers,
    /// must not wait for a node that is gone.
    fn shutdown(&self, ctx: &Ctx) {
        for p in self.ctrls.pending().drain(..) {
            p.cancel();
        }
        for c in self.list() {
            c.shared.stop.store(true, Ordering::Relaxed);
            let id = c.shared.id;
            if let Err(e) = ctx.reactors.call_all(move || super::remove_queue(id)) {
                log::warn!("shutdown: NVMe/TCP controller {}: {e}", c.shared.name);
            }
        }
    }

    fn metrics(&self, _ctx: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let all = self.list();
        let l = |c: &TcpController| vec![("controller", c.shared.name.clone())];
        let mut states: Vec<_> = all
            .iter()
            .flat_map(|c| {
                State::ALL.iter().map(move |s| {
                    (vec![("controller", c.shared.name.clone()), ("state", s.name().to_string())], if c.shared.state() == *s { 1.0 } else { 0.0 })
                })
            })
            .collect();
        // A controller of the configuration still waiting for its node (`super::pending`).
        states.extend(self.ctrls.pending().iter().map(|p| (vec![("controller", p.prep.name.clone()), ("state", "connecting".to_string())], 1.0)));
        out.gauge(
            "tidemark_nvme_tcp_controller_state",
            "State of each attached NVMe/TCP controller (1 for its current state; `connecting`: attached by the configuration, its node not answering yet).",
            &states,
        )?;
        // The path as labels of a constant gauge, so that a dashboard can join a controller
        // (and a mirror leg on one of its namespaces) to the node it reaches.
        let paths: Vec<_> = all
            .iter()
            .map(|c| {
                let l = vec![("controller", c.shared.name.clone()), ("traddr", c.traddr.clone()), ("trsvcid", c.trsvcid.clone()), ("subnqn", c.subnqn.clone())];
                (l, 1.0)
            })
            .collect();
        out.gauge("tidemark_nvme_tcp_controller_info", "Path of each attached NVMe/TCP controller (value 1; the path is in the labels).", &paths)?;
        let count = |f: &dyn Fn(&Shared) -> u64| all.iter().map(|c| (l(c), f(&c.shared))).collect::<Vec<_>>();
        out.counter(
            "tidemark_nvme_tcp_io_errors",
            "I/O commands of the controller that failed (error status or lost connection).",
            &count(&|s| s.io_errors.load(Ordering::Relaxed)),
        )?;
        out.counter(
            "tidemark_nvme_tcp_reconnects",
            "Reconnections of the controller after a connection loss.",
            &count(&|s| s.reconnects.load(Ordering::Relaxed)),
        )?;
        out.counter("tidemark_nvme_tcp_keep_alives", "Keep Alive commands the controller answered.", &count(&|s| s.keep_alives.load(Ordering::Relaxed)))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// SPDK's parameters of `bdev_nvme_attach_controller` for a TCP controller.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    #[serde(default)]
    adrfam: Option<String>,
    #[serde(default)]
    trsvcid: Option<String>,
    #[serde(default)]
    subnqn: Option<String>,
    #[serde(default)]
    hostnqn: Option<String>,
    #[serde(default)]
    hostaddr: Option<String>,
    #[serde(default)]
    hostsvcid: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    prchk_reftag: bool,
    #[serde(default)]
    prchk_guard: bool,
    #[serde(default)]
    hdgst: bool,
    #[serde(default)]
    ddgst: bool,
    #[serde(default)]
    allow_unrecognized_csi: bool,
    #[serde(default)]
    disable_sq_flow_control: bool,
    #[serde(default)]
    fabrics_connect_timeout_us: Option<u64>,
    #[serde(default)]
    multipath: Option<String>,
    #[serde(default)]
    multipath_opts: Option<Value>,
    #[serde(default)]
    num_io_queues: Option<u32>,
    #[serde(default)]
    ctrlr_loss_timeout_sec: Option<i64>,
    #[serde(default)]
    reconnect_delay_sec: Option<u32>,
    #[serde(default)]
    fast_io_fail_timeout_sec: Option<u32>,
    #[serde(default)]
    max_bdevs: Option<u32>,
    #[serde(default)]
    psk: Option<String>,
    #[serde(default)]
    dhchap_key: Option<String>,
    #[serde(default)]
    dhchap_ctrlr_key: Option<String>,
}

impl SpdkParams for Attach {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        const PI: &str = "protection information is not supported";
        const AUTH: &str = "DH-HMAC-CHAP authentication is not supported by the initiator";
        vec![
            ("prchk_reftag", !self.prchk_reftag, PI),
            ("prchk_guard", !self.prchk_guard, PI),
            ("dhchap_key", self.dhchap_key.is_none() && self.dhchap_ctrlr_key.is_none(), AUTH),
            ("multipath", self.multipath.as_deref().is_none_or(|m| m == "disable"), "multipath is not supported"),
            ("hostaddr", self.hostaddr.is_none() && self.hostsvcid.is_none(), "choosing the local address is not supported"),
        ]
    }
}

/// Whether an attach call is for a TCP controller (the caller dispatches on it).
pub fn is_tcp(p: &Option<Value>) -> bool {
    p.as_ref().and_then(|v| v.get("trtype")).and_then(|v| v.as_str()).is_some_and(|s| s.eq_ignore_ascii_case("tcp"))
}

fn module(t: &Ctx) -> Result<&TcpModule, RpcError> {
    t.module::<TcpModule>().ok_or_else(|| RpcError::internal("the nvme_tcp module is not running"))
}

/// The JSON-RPC error of a failed connect: SPDK answers -EIO ("Input/output error") when the
/// controller cannot be reached or refuses.
fn connect_error(what: &str, e: HostError) -> RpcError {
    RpcError::new(-5, format!("{what}: {e}"))
}

/// The module's calls of save_config (in the bdev section, before the bdevs): the
/// `bdev_nvme_set_options` call when the options are not the defaults (before the attach calls
/// it applies to), and the attach call of each controller still connecting (it has no bdev to
/// write it, and the next start must go on looking for it).
pub fn module_calls(t: &Ctx) -> Vec<(&'static str, Value)> {
    let Some(m) = t.module::<TcpModule>() else { return Vec::new() };
    let pending: Vec<_> = m.ctrls.pending().iter().map(|x| ("bdev_nvme_attach_controller", x.prep.given.clone())).collect();
    m.options().config_call().into_iter().chain(pending).collect()
}

fn set_options(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let o: Options = if p.is_none() { Options::default() } else { parse(p)? };
    let o = o.normalize();
    o.validate().map_err(RpcError::invalid_params)?;
    let m = module(t)?;
    if !m.list().is_empty() || !m.ctrls.pending().is_empty() {
        return Err(RpcError::new(crate::rpc::EPERM, "bdev_nvme_set_options is a startup call: a controller is attached"));
    }
    *m.opts.lock().unwrap_or_else(|e| e.into_inner()) = o;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Reset {
    name: String,
    /// A TCP controller has one path: when given, it must be the controller's.
    #[serde(default)]
    cntlid: Option<u16>,
}

fn reset_controller(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Reset = parse(p)?;
    let c = module(t)?.find(&p.name).ok_or_else(|| RpcError::no_device(format!("no NVMe controller named {}", p.name)))?;
    if p.cntlid.is_some_and(|id| id != c.cntlid) {
        return Err(RpcError::no_device(format!("controller {} has no path with cntlid {}", p.name, p.cntlid.unwrap_or_default())));
    }
    c.shared.reset()?;
    Ok(json!(true))
}

/// What an attach call resolved before connecting: enough to connect again later without the
/// RPC context (see [`super::pending`]).
pub(super) struct Prepared {
    pub(super) name: String,
    pub(super) given: Value,
    pub(super) traddr: String,
    pub(super) trsvcid: String,
    pub(super) adrfam: String,
    pub(super) subnqn: String,
    addr: std::net::SocketAddr,
    opts: QpairOptions,
    pub(super) policy: Policy,
    timeouts: super::options::Timeouts,
    psk: Option<crate::keyring::KeyRef>,
    generate_uuids: bool,
    pub(super) what: String,
}

pub fn attach(t: &Ctx, raw: Option<Value>) -> Result<Value, RpcError> {
    let given = raw.clone().unwrap_or(Value::Null);
    let p: Attach = parse_spdk(raw)?;
    let m = module(t)?;
    if m.find(&p.name).is_some() || m.ctrls.pending().iter().any(|x| x.prep.name == p.name) {
        return Err(RpcError::exists(format!("NVMe controller {} already exists", p.name)));
    }
    let subnqn = p.subnqn.clone().ok_or_else(|| RpcError::invalid_params("field `subnqn`: required for a TCP controller"))?;
    if let Some(a) = &p.adrfam {
        if !a.eq_ignore_ascii_case("ipv4") && !a.eq_ignore_ascii_case("ipv6") {
            return Err(RpcError::invalid_params(format!("field `adrfam`: {a:?} is not IPv4 or IPv6")));
        }
    }
    // The module's options (bdev_nvme_set_options) give what the call leaves out, as in SPDK.
    let defaults = m.options();
    let policy = Policy::from_params(
        p.ctrlr_loss_timeout_sec.unwrap_or(defaults.ctrlr_loss_timeout_sec),
        p.reconnect_delay_sec.unwrap_or(defaults.reconnect_delay_sec),
        p.fast_io_fail_timeout_sec.unwrap_or(defaults.fast_io_fail_timeout_sec),
    )
    .map_err(RpcError::invalid_params)?;
    let trsvcid = p.trsvcid.clone().unwrap_or_else(|| "4420".into());
    let trid = TransportId { traddr: p.traddr.clone(), trsvcid: trsvcid.clone(), subnqn: subnqn.clone(), hostnqn: p.hostnqn.clone() };
    let addr = trid.socket_addr().map_err(|e| RpcError::invalid_params(format!("field `traddr`: {e}")))?;
    let mut opts = QpairOptions {
        hdgst: p.hdgst,
        ddgst: p.ddgst,
        kato_ms: defaults.keep_alive_timeout_ms,
        timeout: defaults.connect_timeout(),
        ..QpairOptions::default()
    };
    if let Some(us) = p.fabrics_connect_timeout_us.filter(|&us| us > 0) {
        opts.timeout = Duration::from_micros(us);
    }
    if let Some(h) = &p.hostnqn {
        opts.hostnqn = h.clone();
    }
    // The Host Identifier goes with the NQN (see `host_id_for`): a node attaching with its
    // own hostnqn is its own registrant for reservations, which fencing a stale head needs.
    opts.hostid = crate::nvmf::initiator::host_id_for(&opts.hostnqn);
    // TLS 1.3 with the keyring's PSK (an `NVMeTLSkey-1:` key): every queue, and every
    // reconnect, starts with the handshake.
    let psk = match &p.psk {
        None => None,
        Some(name) => {
            let k = crate::keyring::keyring(t)?
                .get(name, &format!("NVMe controller {}", p.name))
                .map_err(|e| RpcError::invalid_params(format!("field `psk`: {e}")))?;
            let key = ConfiguredPsk::parse(k.secret()).map_err(|e| RpcError::invalid_params(format!("field `psk`: key {name}: {e}")))?;
            opts.tls = Some(crate::nvmf::tls::client_context(&key, &opts.hostnqn, &subnqn).map_err(RpcError::invalid_params)?);
            Some(k)
        }
    };
    let what = format!("cannot attach {} ({}:{} {})", p.name, p.traddr, trsvcid, subnqn);
    let prep = Prepared {
        name: p.name.clone(),
        given,
        traddr: p.traddr.clone(),
        trsvcid,
        adrfam: p.adrfam.clone().unwrap_or_else(|| "IPv4".into()),
        subnqn,
        addr,
        opts,
        policy,
        timeouts: defaults.timeouts(),
        psk,
        generate_uuids: defaults.generate_uuids,
        what,
    };
    let b = BdevCtx { reactors: t.reactors.clone(), bdevs: t.bdevs.clone() };
    match connect_and_register(&m.ctrls, &b, &prep) {
        // The configuration names a controller whose node does not answer (yet): a head
        // restarting while a leg's node is down must still start and serve its volumes. It is
        // kept connecting in the background by the attach's own reconnect policy; its bdevs
        // appear when it answers (a mirror takes back a leg it names then). A client's call
        // fails as in SPDK: the caller is there to see the error and retry. SPDK's default
        // policy (ctrlr_loss_timeout_sec 0: no reconnects) keeps the old behaviour too.
        Err(e) if t.from_config() && prep.policy.ctrlr_loss != Some(Duration::ZERO) && !crate::config::check::active() => {
            log::warn!("{}; the configuration keeps it and it goes on connecting every {:?}", e.message, prep.policy.reconnect_delay);
            super::pending::start(m.ctrls.clone(), b, prep, e.message);
            Ok(json!([]))
        }
        r => r,
    }
}

/// Connects `prep`'s controller, makes its namespaces' bdevs and registers it with the module.
pub(super) fn connect_and_register(m: &Arc<Controllers>, t: &BdevCtx, prep: &Prepared) -> Result<Value, RpcError> {
    let (what, subnqn, opts, policy, addr) = (&prep.what, prep.subnqn.clone(), &prep.opts, prep.policy, prep.addr);
    let psk = prep.psk.clone();
    let mut c = Controller::connect(addr, &subnqn, opts).map_err(|e| connect_error(what, e))?;
    // MDTS is in units of the minimum memory page size (CAP.MPSMIN).
    let cap = c.property_get(prop::CAP).map_err(|e| connect_error(what, e))?;
    let page = 4096usize << ((cap >> 48) & 0xF);
    let max_transfer = match c.id.mdts {
        0 => MAX_TRANSFER,
        m => page.checked_shl(m as u32).unwrap_or(usize::MAX).min(MAX_TRANSFER),
    };
    let mut namespaces = Vec::new();
    for nsid in c.active_namespaces().map_err(|e| connect_error(what, e))? {
        let ns = c.identify_namespace(nsid).map_err(|e| connect_error(what, e))?;
        if ns.nsze == 0 || ns.block_size == 0 {
            continue;
        }
        namespaces.push((nsid, ns));
    }
    if namespaces.is_empty() {
        return Err(RpcError::no_device(format!("{what}: the subsystem has no active namespace")));
    }
    let names: Vec<String> = namespaces.iter().map(|(nsid, _)| bdev_name(&prep.name, *nsid)).collect();
    for n in &names {
        t.bdevs.check_new_name(n)?;
    }
    if crate::config::check::active() {
        // `--check-config`: the controller answers and has these namespaces; null bdevs of
        // their geometry stand in for them, and the admin connection closes here.
        for ((_, ns), name) in namespaces.iter().zip(&names) {
            let b = crate::bdevs::null::NullBdev::new(name, ns.nsze, ns.block_size, None).map_err(RpcError::invalid_params)?;
            t.bdevs.register(Arc::new(b))?;
        }
        return Ok(json!(names));
    }
    let cores = t.reactors.core_count();
    let granted = c.set_queue_count(cores as u16).map_err(|e| connect_error(what, e))?;
    if (granted as usize) < cores {
        return Err(RpcError::new(-5, format!("{what}: the controller grants {granted} I/O queues, {cores} reactor cores need one each")));
    }
    let timeouts = prep.timeouts;
    let target = Target { reactors: t.reactors.clone(), addr, subnqn: subnqn.clone(), opts: opts.clone(), cores, policy, timeouts, psk };
    let shared = Arc::new_cyclic(|me| Shared {
        name: prep.name.clone(),
        id: m.next_id.fetch_add(1, Ordering::Relaxed),
        state: Default::default(),
        io_errors: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        keep_alives: AtomicU64::new(0),
        stop: Default::default(),
        recovering: Default::default(),
        generation: Default::default(),
        target,
        namespaces: Default::default(),
        bdev_changes: Default::default(),
        ctrl: Default::default(),
        registry: Arc::downgrade(&t.bdevs),
        removed: Default::default(),
        me: me.clone(),
    });
    let id = shared.id;
    let undo_queues = |t: &BdevCtx| {
        let _ = t.reactors.call_all(move || remove_queue(id));
    };
    for core in 0..cores {
        let installed = connect_queue(&mut c, core, timeouts).map_err(|e| connect_error(what, e)).and_then(|(stream, qp)| {
            let obs = shared.clone();
            t.reactors.call(core, move || install_queue(id, IoQueue::new(stream, qp, obs))).map_err(RpcError::from)
        });
        if let Err(e) = installed {
            undo_queues(t);
            return Err(e);
        }
    }
    let ctrl = Arc::new(TcpController {
        shared: shared.clone(),
        attach_params: prep.given.clone(),
        traddr: prep.traddr.clone(),
        trsvcid: prep.trsvcid.clone(),
        adrfam: prep.adrfam.clone(),
        subnqn,
        hostnqn: opts.hostnqn.clone(),
        cntlid: c.cntlid,
        ident: c.id.clone(),
        max_transfer,
        generate_uuids: prep.generate_uuids,
    });
    ctrl.link();
    let mut made: Vec<String> = Vec::new();
    for ((nsid, ns), name) in namespaces.into_iter().zip(&names) {
        let b = NvmeTcpBdev::new(name.clone(), ctrl.clone(), nsid, ns);
        if let Err(e) = t.bdevs.register(Arc::new(b)) {
            for n in &made {
                let _ = t.delete_bdev(n);
            }
            undo_queues(t);
            return Err(e.into());
        }
        made.push(name.clone());
    }
    m.attached().push(ctrl);
    start_keep_alive(c, shared);
    log::info!("NVMe/TCP controller {} attached: {} at {addr}, bdevs {names:?}", prep.name, prep.subnqn);
    Ok(json!(made))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Detach {
    name: String,
    #[serde(default)]
    trtype: Option<String>,
    #[serde(default)]
    traddr: Option<String>,
    #[serde(default)]
    adrfam: Option<String>,
    #[serde(default)]
    trsvcid: Option<String>,
    #[serde(default)]
    subnqn: Option<String>,
    #[serde(default)]
    hostaddr: Option<String>,
    #[serde(default)]
    hostsvcid: Option<String>,
}

/// Whether `name` names an attached TCP controller (the caller dispatches on it).
pub fn owns(t: &Ctx, p: &Option<Value>) -> bool {
    let name = p.as_ref().and_then(|v| v.get("name")).and_then(|v| v.as_str());
    name.is_some_and(|n| t.module::<TcpModule>().is_some_and(|m| m.find(n).is_some() || m.ctrls.pending().iter().any(|x| x.prep.name == n)))
}

pub fn detach(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Detach = parse(p)?;
    let m = module(t)?;
    if super::pending::cancel(&m.ctrls, &p.name) {
        return Ok(json!(true));
    }
    let c = m.find(&p.name).ok_or_else(|| RpcError::no_device(format!("no NVMe controller named {}", p.name)))?;
    // The path fields select a path of a multipath controller: a TCP controller has one.
    let mismatch = |given: &Option<String>, have: &str| given.as_ref().is_some_and(|g| !g.eq_ignore_ascii_case(have));
    if mismatch(&p.traddr, &c.traddr) || mismatch(&p.trsvcid, &c.trsvcid) || mismatch(&p.subnqn, &c.subnqn) || mismatch(&p.trtype, "tcp") {
        return Err(RpcError::no_device(format!("controller {} has no such path", p.name)));
    }
    c.shared.remove()?;
    m.ctrls.attached().retain(|x| !Arc::ptr_eq(x, &c));
    Ok(json!(true))
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetControllers {
    #[serde(default)]
    name: Option<String>,
}

/// SPDK's shape: `[{name, ctrlrs: [{state, trid, cntlid, host}]}]`.
fn controller_json(c: &TcpController) -> Value {
    json!({
        "name": c.shared.name,
        "ctrlrs": [{
            "state": c.shared.state().name(),
            "trid": { "trtype": "TCP", "adrfam": c.adrfam, "traddr": c.traddr, "trsvcid": c.trsvcid, "subnqn": c.subnqn },
            "cntlid": c.cntlid,
            "host": { "nqn": c.hostnqn, "addr": "", "svcid": "" },
            "bdevs": c.shared.bdev_names(),
            "io_errors": c.shared.io_errors.load(Ordering::Relaxed),
            "reconnects": c.shared.reconnects.load(Ordering::Relaxed),
        }],
    })
}

fn get_controllers(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetControllers = if p.is_none() { GetControllers::default() } else { parse(p)? };
    let m = module(t)?;
    let pending = m.ctrls.pending().clone();
    let mut all: Vec<Value> = m.list().iter().map(|c| controller_json(c)).chain(pending.iter().map(|x| x.json())).collect();
    if let Some(n) = p.name {
        all.retain(|c| c["name"] == n.as_str());
        if all.is_empty() {
            return Err(RpcError::no_device(format!("no NVMe controller named {n}")));
        }
    }
    Ok(Value::Array(all))
}
