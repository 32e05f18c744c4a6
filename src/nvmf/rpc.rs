//! The `nvmf_*` RPCs, with SPDK's method names, parameters and result shapes. SPDK
//! parameters that have no meaning here (shared buffer pools, RDMA knobs) are accepted and
//! ignored so that SPDK scripts run unchanged; unknown ones are refused, naming the field.

use super::ana::AnaState;
use super::auth::{DhGroup, Digest, Secret};
use super::subsystem::{parse_hex, HostKeys, ListenAddr, NsIds, SubsysKind, Subsystem, DEFAULT_MAX_NAMESPACES};
use super::tls::ConfiguredPsk;
use super::transport::TransportOpts;
use super::{describe_controller, Nvmf, NvmfTarget};
use crate::keyring::KeyRef;
use crate::module::{Ctx, ErrorDoc};
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams, INVALID_PARAMS};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

crate::register_module! {
    name: "nvmf",
    order: 40,
    construct: |reactors, _| std::sync::Arc::new(super::NvmfTarget::new(reactors.clone())),
    methods: [
        ("nvmf_set_config", set_config, SetConfigParams, "Sets NVMe-oF target options: the DH-HMAC-CHAP digests and DH groups offered.", []),
        ("nvmf_create_transport", create_transport, CreateTransport, "Creates the NVMe-oF TCP transport.", [&[(EEXIST, "the TCP transport exists")]]),
        ("nvmf_get_transports", get_transports, GetTransports, "Describes the NVMe-oF transports.", [&[(ENODEV, "no transport of that type")]]),
        ("nvmf_create_subsystem", create_subsystem, CreateSubsystem, "Creates an NVMe-oF subsystem.", [&[(EEXIST, "a subsystem of that NQN exists")]]),
        ("nvmf_delete_subsystem", delete_subsystem, ByNqn, "Deletes an NVMe-oF subsystem.", [NQN]),
        ("nvmf_subsystem_add_listener", add_listener, Listener, "Adds a TCP listener to a subsystem.", [NQN, &[(EEXIST, "the subsystem listens there already"), (EIO, "the address cannot be bound")]]),
        ("nvmf_subsystem_remove_listener", remove_listener, Listener, "Removes a listener from a subsystem.", [NQN, &[(INVALID_PARAMS, "the subsystem does not listen there")]]),
        ("nvmf_subsystem_get_listeners", get_listeners, ByNqn, "Lists a subsystem's listeners.", [NQN]),
        ("nvmf_subsystem_listener_set_ana_state", set_ana_state, SetAnaState, "Sets the ANA state of a listener's ANA groups (one, or all of them) of a subsystem created with ana_reporting; hosts connected through the listener get an ANA change event.", [NQN, &[(INVALID_PARAMS, "the subsystem has no ANA reporting or no such listener, the state is not optimized, non_optimized or inaccessible, or the group is not between 1 and max_namespaces")]]),
        ("nvmf_subsystem_add_ns", add_ns, AddNs, "Adds a bdev to a subsystem as a namespace.", [NQN, &[(INVALID_PARAMS, "no bdev has that name, something holds it, or the nsid is taken")]]),
        ("nvmf_subsystem_remove_ns", remove_ns, RemoveNs, "Removes a namespace from a subsystem.", [NQN, &[(INVALID_PARAMS, "the subsystem has no such namespace")]]),
        ("nvmf_subsystem_add_host", add_host, HostParams, "Allows a host NQN to connect to a subsystem.", [NQN, &[(INVALID_PARAMS, "a key is not in the keyring or not a DH-HMAC-CHAP secret, or the host is listed already")]]),
        ("nvmf_subsystem_remove_host", remove_host, HostParams, "Removes a host NQN from a subsystem.", [NQN, &[(INVALID_PARAMS, "the host is not listed")]]),
        ("nvmf_subsystem_allow_any_host", allow_any_host, AllowAny, "Allows or disallows any host on a subsystem.", [NQN]),
        ("nvmf_get_subsystems", get_subsystems, GetSubsystems, "Describes the NVMe-oF subsystems.", [NQN]),
        ("nvmf_subsystem_get_controllers", get_controllers, ByNqn, "Lists a subsystem's controllers.", [NQN]),
        ("nvmf_subsystem_get_qpairs", get_qpairs, ByNqn, "Lists a subsystem's queue pairs.", [NQN]),
    ],
}

/// Errors of a method on the subsystem named by `nqn`: SPDK answers -32602 for a missing one.
const NQN: &[ErrorDoc] = &[(INVALID_PARAMS, "no subsystem has that NQN, or it is the discovery subsystem where that is not allowed")];

fn nvmf(t: &Ctx) -> Result<&Arc<Nvmf>, RpcError> {
    t.module::<NvmfTarget>().map(|n| &n.nvmf).ok_or_else(|| RpcError::internal("the nvmf subsystem is not running"))
}

/// Only the default target exists (SPDK's `tgt_name`).
fn check_tgt(name: &Option<String>) -> Result<(), RpcError> {
    match name.as_deref() {
        None | Some("nvmf_tgt") => Ok(()),
        Some(other) => Err(RpcError::invalid_params(format!("field `tgt_name`: no target named {other:?}"))),
    }
}

fn find(n: &Nvmf, nqn: &str) -> Result<Arc<Subsystem>, RpcError> {
    n.subsystem(nqn).ok_or_else(|| RpcError::invalid_params(format!("field `nqn`: no subsystem {nqn}")))
}

fn find_nvme(n: &Nvmf, nqn: &str) -> Result<Arc<Subsystem>, RpcError> {
    let s = find(n, nqn)?;
    if s.is_discovery() {
        return Err(RpcError::invalid_params("field `nqn`: not allowed on the discovery subsystem"));
    }
    Ok(s)
}

/// SPDK's parameters (v25.09 and the `spdk` package). Those of other transports (RDMA,
/// vfio-user) and of SPDK's buffer pools and sockets are accepted and have no effect, as SPDK's
/// own TCP transport ignores the other transports' ones.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CreateTransport {
    trtype: String,
    #[serde(default)]
    tgt_name: Option<String>,
    #[serde(default)]
    max_queue_depth: Option<u16>,
    #[serde(default)]
    max_io_qpairs_per_ctrlr: Option<u16>,
    /// SPDK's deprecated form: queue pairs including the admin queue.
    #[serde(default)]
    max_qpairs_per_ctrlr: Option<u16>,
    #[serde(default)]
    in_capsule_data_size: Option<u32>,
    #[serde(default)]
    max_io_size: Option<u32>,
    #[serde(default)]
    io_unit_size: Option<u32>,
    #[serde(default)]
    max_aq_depth: Option<u16>,
    #[serde(default)]
    c2h_success: Option<bool>,
    // SPDK's buffer pools, sockets, aborts and keep-alive tuning: tidemark sizes its buffers
    // per queue and uses kernel sockets.
    #[serde(default)]
    num_shared_buffers: Option<u32>,
    #[serde(default)]
    buf_cache_size: Option<u32>,
    #[serde(default)]
    iobuf_small_cache_size: Option<u32>,
    #[serde(default)]
    iobuf_large_cache_size: Option<u32>,
    #[serde(default)]
    dif_insert_or_strip: bool,
    #[serde(default)]
    sock_priority: Option<u32>,
    #[serde(default)]
    abort_timeout_sec: Option<u32>,
    #[serde(default)]
    zcopy: bool,
    #[serde(default)]
    acceptor_poll_rate: Option<u32>,
    #[serde(default)]
    acceptor_backlog: Option<i32>,
    #[serde(default)]
    control_msg_num: Option<u32>,
    #[serde(default)]
    data_wr_pool_size: Option<u32>,
    #[serde(default)]
    ack_timeout: Option<u32>,
    #[serde(default)]
    kas: Option<u32>,
    #[serde(default)]
    min_kato: Option<u32>,
    // RDMA and vfio-user only.
    #[serde(default)]
    num_cqe: Option<u32>,
    #[serde(default)]
    max_srq_depth: Option<u32>,
    #[serde(default)]
    no_srq: bool,
    #[serde(default)]
    no_wr_batching: bool,
    #[serde(default)]
    disable_mappable_bar0: bool,
    #[serde(default)]
    disable_adaptive_irq: bool,
    #[serde(default)]
    disable_shadow_doorbells: bool,
    #[serde(default)]
    disable_command_passthru: bool,
    // Masks of the optional commands and fused operations advertised (`spdk` package).
    #[serde(default)]
    masked_oncs: Option<Value>,
    #[serde(default)]
    masked_fuses: Option<Value>,
}

impl SpdkParams for CreateTransport {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![("dif_insert_or_strip", !self.dif_insert_or_strip, "protection information is not supported")]
    }
}

fn create_transport(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreateTransport = parse_spdk(p)?;
    check_tgt(&p.tgt_name)?;
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(RpcError::invalid_params(format!("field `trtype`: only TCP is supported, not {:?}", p.trtype)));
    }
    let d = TransportOpts::default();
    let io_qpairs = match (p.max_io_qpairs_per_ctrlr, p.max_qpairs_per_ctrlr) {
        (Some(n), _) => n,
        (None, Some(n)) => n.saturating_sub(1),
        (None, None) => d.max_io_qpairs_per_ctrlr,
    };
    let opts = TransportOpts {
        max_queue_depth: p.max_queue_depth.unwrap_or(d.max_queue_depth),
        max_io_qpairs_per_ctrlr: io_qpairs,
        in_capsule_data_size: p.in_capsule_data_size.unwrap_or(d.in_capsule_data_size),
        max_io_size: p.max_io_size.unwrap_or(d.max_io_size),
        io_unit_size: p.io_unit_size.unwrap_or(d.io_unit_size),
        max_aq_depth: p.max_aq_depth.unwrap_or(d.max_aq_depth),
        c2h_success: p.c2h_success.unwrap_or(d.c2h_success),
    };
    opts.validate().map_err(RpcError::invalid_params)?;
    nvmf(t)?.set_transport(opts).map_err(RpcError::exists)?;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetTransports {
    #[serde(default)]
    trtype: Option<String>,
    #[serde(default)]
    tgt_name: Option<String>,
}

fn get_transports(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetTransports = parse(p)?;
    check_tgt(&p.tgt_name)?;
    if let Some(tt) = &p.trtype {
        if !tt.eq_ignore_ascii_case("tcp") {
            return Err(RpcError::no_device(format!("transport {tt} does not exist")));
        }
    }
    Ok(Value::Array(nvmf(t)?.transport().map(|o| o.to_json()).into_iter().collect()))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateSubsystem {
    nqn: String,
    #[serde(default)]
    serial_number: Option<String>,
    #[serde(default)]
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default)]
    max_namespaces: Option<u32>,
    #[serde(default)]
    tgt_name: Option<String>,
    /// Asymmetric Namespace Access reporting: hosts see ANA groups (a namespace's `anagrpid`)
    /// and each listener's states (`nvmf_subsystem_listener_set_ana_state`), for multipath.
    #[serde(default)]
    ana_reporting: bool,
    #[serde(default)]
    min_cntlid: Option<u16>,
    #[serde(default)]
    max_cntlid: Option<u16>,
    #[serde(default)]
    passthrough: bool,
    #[serde(default)]
    enable_nssr: bool,
    /// Limits tidemark would have to report in Identify (v25.09 and the `spdk` package name
    /// them differently); only "no limit" (0) is accepted.
    #[serde(default)]
    max_discard_size_kib: u64,
    #[serde(default)]
    max_write_zeroes_size_kib: u64,
    #[serde(default)]
    dmrsl: u64,
    #[serde(default)]
    wzsl: u64,
    #[serde(default)]
    admin_label: Option<String>,
}

impl SpdkParams for CreateSubsystem {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        const LIMIT: &str = "per-subsystem command size limits are not supported";
        vec![
            ("passthrough", !self.passthrough, "NVMe passthrough subsystems are not supported"),
            ("enable_nssr", !self.enable_nssr, "NVM subsystem reset is not supported"),
            ("max_discard_size_kib", self.max_discard_size_kib == 0, LIMIT),
            ("max_write_zeroes_size_kib", self.max_write_zeroes_size_kib == 0, LIMIT),
            ("dmrsl", self.dmrsl == 0, LIMIT),
            ("wzsl", self.wzsl == 0, LIMIT),
            ("admin_label", self.admin_label.is_none(), "admin command labels are not supported"),
        ]
    }
}

fn create_subsystem(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreateSubsystem = parse_spdk(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    if n.subsystem(&p.nqn).is_some() {
        return Err(RpcError::exists(format!("subsystem {} already exists", p.nqn)));
    }
    let s = Subsystem::new(
        &p.nqn,
        SubsysKind::Nvme,
        p.serial_number.as_deref().unwrap_or("00000000000000000000"),
        p.model_number.as_deref().unwrap_or("tidemark Controller"),
        p.max_namespaces.filter(|&m| m != 0).unwrap_or(DEFAULT_MAX_NAMESPACES),
        p.allow_any_host,
        (p.min_cntlid.unwrap_or(1), p.max_cntlid.unwrap_or(0xFFEF)),
        t.reactors.core_count(),
    )
    .map_err(RpcError::invalid_params)?
    .with_ana_reporting(p.ana_reporting);
    n.add_subsystem(s).map_err(RpcError::exists)?;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ByNqn {
    nqn: String,
    #[serde(default)]
    tgt_name: Option<String>,
}

/// Removes namespace `nsid` from `s`: hosts get the event, queues drop their channels, and
/// the bdev is released once the last I/O on it has completed (bounded wait).
fn detach_namespace(n: &Nvmf, s: &Subsystem, nsid: u32) -> bool {
    let Some(ns) = s.remove_namespace(nsid) else { return false };
    for c in s.controllers() {
        c.namespace_changed(n, nsid);
    }
    n.purge_namespace_caches(s.id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&ns) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if Arc::strong_count(&ns) > 1 {
        log::warn!("nvmf: namespace {nsid} of {}: I/O still in flight after 5 s; the bdev stays open until it ends", s.nqn);
    }
    true
}

fn delete_subsystem(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByNqn = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    find_nvme(n, &p.nqn)?;
    let s = n.take_subsystem(&p.nqn).ok_or_else(|| RpcError::invalid_params(format!("field `nqn`: no subsystem {}", p.nqn)))?;
    s.deleted.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in s.controllers() {
        n.destroy_controller(&c, "subsystem deleted");
    }
    for a in s.listeners() {
        s.remove_listener(&a);
        n.release_listener(&a);
    }
    for ns in s.namespaces() {
        detach_namespace(n, &s, ns.nsid);
    }
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListenAddress {
    trtype: String,
    #[serde(default)]
    adrfam: Option<String>,
    traddr: String,
    trsvcid: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Listener {
    nqn: String,
    listen_address: ListenAddress,
    #[serde(default)]
    tgt_name: Option<String>,
    #[serde(default)]
    secure_channel: bool,
    /// The ANA state of every group on the new listener (optimized when not given).
    #[serde(default)]
    ana_state: Option<String>,
    /// SPDK's socket implementation: tidemark's are the kernel's (SPDK's "posix").
    #[serde(default)]
    sock_impl: Option<String>,
    /// NUMA node of the listener's poll group: accepted, connections go to every core.
    #[serde(default)]
    #[allow(dead_code)]
    numa_id: Option<i32>,
}

impl SpdkParams for Listener {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![("sock_impl", self.sock_impl.as_deref().is_none_or(|s| s == "posix"), "only the kernel's sockets (\"posix\") are used")]
    }
}

fn listener_addr(p: &Listener) -> Result<ListenAddr, RpcError> {
    let a = &p.listen_address;
    ListenAddr::parse(&a.trtype, a.adrfam.as_deref(), &a.traddr, &a.trsvcid).map_err(RpcError::invalid_params)
}

fn add_listener(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Listener = parse_spdk(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let a = listener_addr(&p)?;
    let s = find(n, &p.nqn)?;
    if n.transport().is_none() {
        return Err(RpcError::invalid_params("field `listen_address.trtype`: transport TCP does not exist; call nvmf_create_transport first"));
    }
    let ana = p.ana_state.as_deref().map(parse_ana_state).transpose()?.filter(|st| *st != AnaState::Optimized);
    if ana.is_some() && !s.ana_reporting {
        return Err(RpcError::invalid_params(format!("field `ana_state`: subsystem {} was not created with ana_reporting", p.nqn)));
    }
    s.add_listener(&a, p.secure_channel).map_err(RpcError::exists)?;
    if let Some(st) = ana {
        // A new listener has no controllers yet: no event to raise.
        s.set_ana_state(&a, None, st).map_err(RpcError::invalid_params)?;
    }
    // --check-config: validated and recorded, never bound.
    if crate::config::check::active() {
        return Ok(json!(true));
    }
    if let Err(e) = n.acquire_listener(&a, p.secure_channel) {
        s.remove_listener(&a);
        return Err(RpcError::new(crate::rpc::EIO, e));
    }
    n.bump_genctr();
    Ok(json!(true))
}

fn remove_listener(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Listener = parse_spdk(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let a = listener_addr(&p)?;
    let s = find(n, &p.nqn)?;
    if !s.remove_listener(&a) {
        return Err(RpcError::invalid_params(format!("field `listen_address`: subsystem {} does not listen on {a}", p.nqn)));
    }
    // Hosts connected through the listener lose access, as in SPDK.
    for c in s.controllers() {
        if c.listener == a {
            n.destroy_controller(&c, "listener removed");
        }
    }
    n.release_listener(&a);
    n.bump_genctr();
    Ok(json!(true))
}

fn get_listeners(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByNqn = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let s = find(nvmf(t)?, &p.nqn)?;
    Ok(Value::Array(s.listeners_json()))
}

fn parse_ana_state(name: &str) -> Result<AnaState, RpcError> {
    AnaState::from_rpc_name(name)
        .ok_or_else(|| RpcError::invalid_params(format!("field `ana_state`: {name:?} is not optimized, non_optimized or inaccessible")))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetAnaState {
    nqn: String,
    listen_address: ListenAddress,
    /// optimized, non_optimized or inaccessible.
    ana_state: String,
    /// The ANA group (1 to max_namespaces); every group of the listener when not given.
    #[serde(default)]
    anagrpid: Option<u32>,
    #[serde(default)]
    tgt_name: Option<String>,
}

/// `nvmf_subsystem_listener_set_ana_state`: the controllers connected through the listener
/// see the new state at once (their next command) and get the ANA change event, upon which a
/// Linux host re-reads the ANA log page and moves its I/O to an optimized path.
fn set_ana_state(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: SetAnaState = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let s = find_nvme(n, &p.nqn)?;
    let la = &p.listen_address;
    let a = ListenAddr::parse(&la.trtype, la.adrfam.as_deref(), &la.traddr, &la.trsvcid).map_err(RpcError::invalid_params)?;
    let state = parse_ana_state(&p.ana_state)?;
    if !s.set_ana_state(&a, p.anagrpid, state).map_err(RpcError::invalid_params)? {
        return Ok(json!(true));
    }
    let group = p.anagrpid.map(|g| format!("group {g}")).unwrap_or_else(|| "every group".into());
    log::info!("nvmf: {}: listener {a}: ANA state of {group} is now {}", s.nqn, state.name());
    for c in s.controllers() {
        if c.listener == a {
            c.ana_changed(n);
        }
    }
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NamespaceParams {
    bdev_name: String,
    #[serde(default)]
    nsid: Option<u32>,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
    #[serde(default)]
    nguid: Option<String>,
    #[serde(default)]
    eui64: Option<String>,
    /// The namespace's ANA group (1 to max_namespaces); its nsid when not given.
    #[serde(default)]
    anagrpid: Option<u32>,
    /// File where the namespace's NVMe reservations persist through power loss (once a host
    /// turns PTPL on), read back when the namespace is added again.
    #[serde(default)]
    ptpl_file: Option<String>,
    #[serde(default)]
    no_auto_visible: bool,
    /// v25.09: hide the bdev's metadata from hosts; tidemark's bdevs have none to hide.
    #[serde(default)]
    #[allow(dead_code)]
    hide_metadata: bool,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddNs {
    nqn: String,
    namespace: NamespaceParams,
    #[serde(default)]
    tgt_name: Option<String>,
}

impl SpdkParams for AddNs {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![("namespace.no_auto_visible", !self.namespace.no_auto_visible, "per-host namespace visibility is not supported")]
    }
}

fn add_ns(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: AddNs = parse_spdk(p)?;
    check_tgt(&p.tgt_name)?;
    let ns = &p.namespace;
    let nguid = match &ns.nguid {
        Some(h) => Some(parse_hex::<16>(h).ok_or_else(|| RpcError::invalid_params("field `namespace.nguid`: not 16 bytes of hex"))?),
        None => None,
    };
    let eui64 = match &ns.eui64 {
        Some(h) => Some(parse_hex::<8>(h).ok_or_else(|| RpcError::invalid_params("field `namespace.eui64`: not 8 bytes of hex"))?),
        None => None,
    };
    let n = nvmf(t)?;
    let s = find_nvme(n, &p.nqn)?;
    let entry = t.bdevs.get(&ns.bdev_name).ok_or_else(|| RpcError::invalid_params(format!("field `namespace.bdev_name`: no bdev named {}", ns.bdev_name)))?;
    let added = s
        .add_namespace(
            &entry,
            ns.nsid.unwrap_or(0),
            NsIds { uuid: ns.uuid, nguid, eui64, ptpl_file: ns.ptpl_file.as_ref().map(std::path::PathBuf::from), anagrpid: ns.anagrpid },
        )
        .map_err(RpcError::invalid_params)?;
    let nsid = added.nsid;
    drop(added);
    for c in s.controllers() {
        c.namespace_changed(n, nsid);
    }
    Ok(json!(nsid))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    #[serde(default)]
    tgt_name: Option<String>,
}

fn remove_ns(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: RemoveNs = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let s = find_nvme(n, &p.nqn)?;
    if !detach_namespace(n, &s, p.nsid) {
        return Err(RpcError::invalid_params(format!("field `nsid`: subsystem {} has no namespace {}", p.nqn, p.nsid)));
    }
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct HostParams {
    nqn: String,
    host: String,
    #[serde(default)]
    tgt_name: Option<String>,
    /// Keyring key (an `NVMeTLSkey-1:` PSK) the host connects with over TLS; the host may
    /// then connect only through a secure_channel listener.
    #[serde(default)]
    psk: Option<String>,
    /// Keyring key (a `DHHC-1:` secret) the host must prove it holds (DH-HMAC-CHAP).
    #[serde(default)]
    dhchap_key: Option<String>,
    /// Keyring key the controller proves it holds to the host (bidirectional authentication).
    #[serde(default)]
    dhchap_ctrlr_key: Option<String>,
    /// `nvmf_subsystem_remove_host` (`spdk` package): how long to wait for the host's
    /// controllers to go; tidemark removes them before answering.
    #[serde(default)]
    #[allow(dead_code)]
    timeout_ms: Option<u64>,
}

impl SpdkParams for HostParams {}

fn add_host(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: HostParams = parse_spdk(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let s = find_nvme(n, &p.nqn)?;
    let keys = host_keys(t, &p)?;
    s.add_host(&p.host, keys).map_err(RpcError::invalid_params)?;
    n.bump_genctr();
    Ok(json!(true))
}

/// Takes holds on the host's keys, checking each is what its field needs (a TLS PSK in
/// `NVMeTLSkey-1:` form, DH-HMAC-CHAP secrets in `DHHC-1:` form); errors name the key, never
/// show its content.
fn host_keys(t: &Ctx, p: &HostParams) -> Result<Option<HostKeys>, RpcError> {
    if p.dhchap_key.is_none() && p.dhchap_ctrlr_key.is_some() {
        return Err(RpcError::invalid_params("field `dhchap_ctrlr_key`: needs `dhchap_key` (the controller authenticates only to a host that does)"));
    }
    if p.dhchap_key.is_none() && p.psk.is_none() {
        return Ok(None);
    }
    let kr = crate::keyring::keyring(t)?;
    let user = format!("host {} of subsystem {}", p.host, p.nqn);
    let take = |field: &str, name: &str, check: &dyn Fn(&[u8]) -> Result<(), String>| -> Result<KeyRef, RpcError> {
        let k = kr.get(name, &user).map_err(|e| RpcError::invalid_params(format!("field `{field}`: {e}")))?;
        check(k.secret()).map_err(|e| RpcError::invalid_params(format!("field `{field}`: key {name}: {e}")))?;
        Ok(k)
    };
    let dhchap = |b: &[u8]| Secret::parse(b).map(|_| ()).map_err(|e| e.to_string());
    let tls_psk = |b: &[u8]| ConfiguredPsk::parse(b).map(|_| ()).map_err(|e| e.to_string());
    let psk = p.psk.as_deref().map(|n| take("psk", n, &tls_psk)).transpose()?;
    let key = p.dhchap_key.as_deref().map(|n| take("dhchap_key", n, &dhchap)).transpose()?;
    let ctrlr_key = p.dhchap_ctrlr_key.as_deref().map(|c| take("dhchap_ctrlr_key", c, &dhchap)).transpose()?;
    Ok(Some(HostKeys { psk, key, ctrlr_key }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetConfigParams {
    /// DH-HMAC-CHAP hashes offered: sha256, sha384, sha512.
    #[serde(default)]
    dhchap_digests: Option<Vec<String>>,
    /// DH-HMAC-CHAP groups offered: null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192.
    #[serde(default)]
    dhchap_dhgroups: Option<Vec<String>>,
    /// SPDK's other target options: tidemark's are fixed (accepted so SPDK configs load).
    #[serde(default)]
    #[allow(dead_code)]
    discovery_filter: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    admin_cmd_passthru: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    poll_groups_mask: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    acceptor_poll_rate: Option<Value>,
}

/// `nvmf_set_config`: the DH-HMAC-CHAP hashes and groups the target offers (SPDK's names:
/// sha256/sha384/sha512, null/ffdhe2048/.../ffdhe8192). Applies to transactions started after.
fn set_config(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: SetConfigParams = parse(p)?;
    let n = nvmf(t)?;
    let mut policy = n.auth_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(d) = &p.dhchap_digests {
        policy.digests = d
            .iter()
            .map(|x| {
                Digest::from_name(x).ok_or_else(|| RpcError::invalid_params(format!("field `dhchap_digests`: unknown digest {x:?} (sha256, sha384, sha512)")))
            })
            .collect::<Result<_, _>>()?;
        if policy.digests.is_empty() {
            return Err(RpcError::invalid_params("field `dhchap_digests`: needs at least one digest"));
        }
    }
    if let Some(g) = &p.dhchap_dhgroups {
        policy.dhgroups = g
            .iter()
            .map(|x| {
                DhGroup::from_name(x)
                    .ok_or_else(|| RpcError::invalid_params(format!("field `dhchap_dhgroups`: unknown group {x:?} (null, ffdhe2048 ... ffdhe8192)")))
            })
            .collect::<Result<_, _>>()?;
        if policy.dhgroups.is_empty() {
            return Err(RpcError::invalid_params("field `dhchap_dhgroups`: needs at least one group"));
        }
    }
    *n.auth_policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    Ok(json!(true))
}

fn remove_host(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: HostParams = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let s = find_nvme(n, &p.nqn)?;
    let ctrls = s.remove_host(&p.host).map_err(RpcError::invalid_params)?;
    if !s.allow_any_host() {
        for c in ctrls {
            n.destroy_controller(&c, "host removed from the allow-list");
        }
    }
    n.bump_genctr();
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
    #[serde(default)]
    tgt_name: Option<String>,
}

fn allow_any_host(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: AllowAny = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let s = find_nvme(n, &p.nqn)?;
    s.set_allow_any_host(p.allow_any_host);
    n.bump_genctr();
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetSubsystems {
    #[serde(default)]
    nqn: Option<String>,
    #[serde(default)]
    tgt_name: Option<String>,
}

fn get_subsystems(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetSubsystems = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let n = nvmf(t)?;
    let list: Vec<Arc<Subsystem>> = match &p.nqn {
        Some(q) => vec![find(n, q)?],
        None => std::iter::once(n.discovery.clone()).chain(n.subsystems()).collect(),
    };
    Ok(Value::Array(list.iter().map(|s| s.describe()).collect()))
}

fn get_controllers(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByNqn = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let s = find(nvmf(t)?, &p.nqn)?;
    Ok(Value::Array(s.controllers().iter().map(|c| describe_controller(c)).collect()))
}

fn get_qpairs(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByNqn = parse(p)?;
    check_tgt(&p.tgt_name)?;
    let s = find(nvmf(t)?, &p.nqn)?;
    Ok(Value::Array(s.controllers().iter().flat_map(|c| c.qpairs_json()).collect()))
}
