//! SPDK's `iscsi_*` RPCs, with SPDK's method and parameter names.

use super::config::{self, AuthGroup, ChapSecret, InitiatorGroup, Lun, Netmask, Options, Portal, PortalGroup, Registry, TargetNode};
use super::{portal, IscsiSubsystem};
use crate::config::ConfigCall;
use crate::module::Ctx;
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams, EBUSY, EEXIST, ENODEV};
use crate::scsi::{LogicalUnit, MAX_LUN};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

crate::register_module! {
    name: "iscsi",
    order: 50,
    construct: |reactors, _| std::sync::Arc::new(super::IscsiSubsystem::new(reactors.core_count())),
    methods: [
        ("iscsi_set_options", set_options, SpdkOnlyOptions, "Sets the iSCSI target's options.", []),
        ("iscsi_get_options", get_options, serde_json::Map<String, Value>, "The iSCSI target's options.", []),
        ("iscsi_set_discovery_auth", set_discovery_auth, DiscoveryAuth, "Sets CHAP for discovery sessions.", [&[(ENODEV, "the auth group does not exist")]]),
        ("iscsi_create_portal_group", create_portal_group, CreatePortalGroup, "Creates a portal group (listen addresses).", [&[(EEXIST, "a portal group of that tag exists"), (EIO, "a portal cannot listen")]]),
        ("iscsi_delete_portal_group", delete_portal_group, ByTag, "Deletes a portal group.", [&[(ENODEV, "no portal group has that tag"), (EBUSY, "a target node maps the group")]]),
        ("iscsi_get_portal_groups", get_portal_groups, serde_json::Map<String, Value>, "Describes the portal groups.", []),
        ("iscsi_create_initiator_group", create_initiator_group, CreateInitiatorGroup, "Creates an initiator group (names and netmasks).", [&[(EEXIST, "an initiator group of that tag exists")]]),
        ("iscsi_delete_initiator_group", delete_initiator_group, ByTag, "Deletes an initiator group.", [&[(ENODEV, "no initiator group has that tag"), (EBUSY, "a target node maps the group")]]),
        ("iscsi_get_initiator_groups", get_initiator_groups, serde_json::Map<String, Value>, "Describes the initiator groups.", []),
        ("iscsi_create_auth_group", create_auth_group, CreateAuthGroup, "Creates a CHAP secret group.", [&[(EEXIST, "an auth group of that tag exists")]]),
        ("iscsi_delete_auth_group", delete_auth_group, ByTag, "Deletes a CHAP secret group.", [&[(ENODEV, "no auth group has that tag"), (EBUSY, "a target node or discovery sessions use the group")]]),
        ("iscsi_get_auth_groups", get_auth_groups, serde_json::Map<String, Value>, "Describes the CHAP secret groups.", []),
        ("iscsi_create_target_node", create_target_node, CreateTargetNode, "Creates an iSCSI target node with its LUNs.", [&[
                (EEXIST, "a target node of that name exists"),
                (ENOSPC, "the target has the most target nodes it may"),
                (ENODEV, "a portal, initiator or auth group, or a LUN's bdev does not exist"),
                (EBUSY, "a virtual bdev claims a LUN's bdev"),
            ]]),
        ("iscsi_delete_target_node", delete_target_node, ByName, "Deletes an iSCSI target node.", [&[(ENODEV, "no target node has that name"), (ETIMEDOUT, "its sessions did not close in time")]]),
        ("iscsi_target_node_add_lun", target_node_add_lun, AddLun, "Adds a LUN to a target node.", [&[
                (ENODEV, "the target node or the bdev does not exist"),
                (EEXIST, "the node has a LUN of that id"),
                (ENOSPC, "the node has the most LUNs, or no free LUN id"),
                (EBUSY, "a virtual bdev claims the bdev"),
            ]]),
        ("iscsi_get_target_nodes", get_target_nodes, serde_json::Map<String, Value>, "Describes the target nodes.", []),
        ("iscsi_get_connections", get_connections, serde_json::Map<String, Value>, "Lists the iSCSI connections.", []),
        ("scsi_get_devices", scsi_get_devices, serde_json::Map<String, Value>, "Lists the SCSI devices (target nodes and their LUNs).", []),
    ],
}

fn subsystem(t: &Ctx) -> Result<&IscsiSubsystem, RpcError> {
    t.module::<IscsiSubsystem>().ok_or_else(|| RpcError::internal("the iscsi subsystem is not running"))
}

fn invalid(msg: impl std::fmt::Display) -> RpcError {
    RpcError::invalid_params(msg)
}

/// `iscsi_set_options` parameters SPDK defines beyond tidemark's [`Options`]: SPDK's memory
/// pools (tidemark sizes its own, so any value is accepted) and two features it lacks.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SpdkOnlyOptions {
    #[serde(default)]
    pdu_pool_size: Option<u32>,
    #[serde(default)]
    immediate_data_pool_size: Option<u32>,
    #[serde(default)]
    data_out_pool_size: Option<u32>,
    #[serde(default)]
    max_large_datain_per_connection: Option<u32>,
    #[serde(default)]
    allow_duplicated_isid: bool,
    #[serde(default)]
    auth_file: Option<String>,
}

impl SpdkParams for SpdkOnlyOptions {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![
            (
                "allow_duplicated_isid",
                !self.allow_duplicated_isid,
                "a login with an ISID already in use reinstates that session (RFC 7143); duplicates are not allowed",
            ),
            ("auth_file", self.auth_file.is_none(), "CHAP secrets come from iscsi_create_auth_group, not a file"),
        ]
    }
}

const SPDK_ONLY_OPTIONS: [&str; 6] =
    ["pdu_pool_size", "immediate_data_pool_size", "data_out_pool_size", "max_large_datain_per_connection", "allow_duplicated_isid", "auth_file"];

fn set_options(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let s = subsystem(t)?;
    // Unnamed fields keep their current values (SPDK applies only what is given).
    let current = serde_json::to_value(&s.shared.registry().options).map_err(RpcError::internal)?;
    let mut merged = current;
    if let Some(Value::Object(mut given)) = p {
        let spdk_only: serde_json::Map<String, Value> = SPDK_ONLY_OPTIONS.iter().filter_map(|k| given.remove(*k).map(|v| (k.to_string(), v))).collect();
        let _: SpdkOnlyOptions = parse_spdk(Some(Value::Object(spdk_only)))?;
        for (k, v) in given {
            merged[k] = v;
        }
    } else if p.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(invalid("params must be a JSON object"));
    }
    let o: Options = parse(Some(merged))?;
    o.validate().map_err(invalid)?;
    s.shared.registry().options = o;
    Ok(json!(true))
}

fn get_options(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    serde_json::to_value(&subsystem(t)?.shared.registry().options).map_err(RpcError::internal)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DiscoveryAuth {
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
    #[serde(default)]
    chap_group: u32,
}

fn set_discovery_auth(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: DiscoveryAuth = parse(p)?;
    config::check_chap_policy(p.disable_chap, p.require_chap, p.mutual_chap).map_err(invalid)?;
    let s = subsystem(t)?;
    let mut reg = s.shared.registry();
    if p.chap_group != 0 && !reg.auth_groups.contains_key(&p.chap_group) {
        return Err(RpcError::new(ENODEV, format!("auth group {} does not exist", p.chap_group)));
    }
    let o = &mut reg.options;
    o.disable_chap = p.disable_chap;
    o.require_chap = p.require_chap;
    o.mutual_chap = p.mutual_chap;
    o.chap_group = p.chap_group;
    Ok(json!(true))
}

/// SPDK gives ports as strings; numbers are accepted too.
#[derive(Deserialize, Serialize, Clone, schemars::JsonSchema)]
#[serde(untagged)]
enum PortValue {
    Text(String),
    Number(u16),
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PortalParam {
    host: String,
    port: PortValue,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreatePortalGroup {
    tag: u16,
    portals: Vec<PortalParam>,
    #[serde(default)]
    private: bool,
    /// SPDK: listen only after `iscsi_start_portal_group`. Listening starts at once here.
    #[serde(default)]
    #[allow(dead_code)]
    wait: bool,
}

fn resolve(host: &str, port: &str) -> Result<SocketAddr, String> {
    let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| format!("host {host:?} is not an IP address"))?;
    let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok(SocketAddr::new(ip, port))
}

fn create_portal_group(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreatePortalGroup = parse(p)?;
    if p.tag == 0 {
        return Err(invalid("field `tag` must be at least 1"));
    }
    if p.portals.is_empty() || p.portals.len() > config::MAX_PORTALS_PER_GROUP {
        return Err(invalid(format!("field `portals` must list 1 to {} portals", config::MAX_PORTALS_PER_GROUP)));
    }
    let mut portals = Vec::new();
    for (i, pp) in p.portals.iter().enumerate() {
        let port = match &pp.port {
            PortValue::Text(s) => s.clone(),
            PortValue::Number(n) => n.to_string(),
        };
        let addr = resolve(&pp.host, &port).map_err(|e| invalid(format!("field `portals[{i}]`: {e}")))?;
        portals.push(Portal { host: pp.host.clone(), port, addr });
    }
    let s = subsystem(t)?;
    if s.shared.registry().portal_groups.contains_key(&p.tag) {
        return Err(RpcError::new(EEXIST, format!("portal group {} already exists", p.tag)));
    }
    let mut listeners = Vec::new();
    // --check-config: validated and recorded, never bound.
    for portal in portals.iter().filter(|_| !crate::config::check::active()) {
        let id = s.shared.next_listener.fetch_add(1, Relaxed);
        let sh = s.shared.clone();
        let addr = portal.addr;
        let tag = p.tag;
        let r = t.reactors.call(portal::LISTEN_CORE, move || portal::start(addr, sh, tag, id))?;
        match r {
            Ok(_) => listeners.push(id),
            Err(e) => {
                for id in listeners {
                    let _ = t.reactors.call(portal::LISTEN_CORE, move || portal::stop(id));
                }
                return Err(RpcError::new(crate::rpc::EIO, format!("cannot listen on {addr}: {e}")));
            }
        }
    }
    let mut reg = s.shared.registry();
    if reg.portal_groups.contains_key(&p.tag) {
        drop(reg);
        for id in listeners {
            let _ = t.reactors.call(portal::LISTEN_CORE, move || portal::stop(id));
        }
        return Err(RpcError::new(EEXIST, format!("portal group {} already exists", p.tag)));
    }
    reg.portal_groups.insert(p.tag, PortalGroup { tag: p.tag, portals, private: p.private, listeners });
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ByTag {
    tag: u32,
}

fn delete_portal_group(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByTag = parse(p)?;
    let s = subsystem(t)?;
    let tag = u16::try_from(p.tag).map_err(|_| invalid("field `tag` must be 1 to 65535"))?;
    let g = {
        let mut reg = s.shared.registry();
        if let Some(n) = reg.nodes.values().find(|n| n.maps().iter().any(|(pg, _)| *pg == tag)) {
            return Err(RpcError::new(EBUSY, format!("portal group {tag} is mapped by target node {}", n.name)));
        }
        reg.portal_groups.remove(&tag).ok_or_else(|| RpcError::new(ENODEV, format!("portal group {tag} does not exist")))?
    };
    for id in g.listeners {
        t.reactors.call(portal::LISTEN_CORE, move || portal::stop(id))?;
    }
    Ok(json!(true))
}

fn get_portal_groups(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let reg = subsystem(t)?.shared.registry();
    Ok(Value::Array(
        reg.portal_groups
            .values()
            .map(|g| json!({"tag": g.tag, "private": g.private, "portals": g.portals.iter().map(|p| json!({"host": p.host, "port": p.port})).collect::<Vec<_>>()}))
            .collect(),
    ))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateInitiatorGroup {
    tag: u16,
    initiators: Vec<String>,
    netmasks: Vec<String>,
}

fn create_initiator_group(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreateInitiatorGroup = parse(p)?;
    if p.tag == 0 {
        return Err(invalid("field `tag` must be at least 1"));
    }
    if p.initiators.is_empty() || p.initiators.len() > config::MAX_GROUP_ENTRIES {
        return Err(invalid(format!("field `initiators` must list 1 to {} names", config::MAX_GROUP_ENTRIES)));
    }
    if p.netmasks.is_empty() || p.netmasks.len() > config::MAX_GROUP_ENTRIES {
        return Err(invalid(format!("field `netmasks` must list 1 to {} netmasks", config::MAX_GROUP_ENTRIES)));
    }
    for (i, n) in p.initiators.iter().enumerate() {
        let name = n.strip_prefix('!').unwrap_or(n);
        if name != "ANY" && (name.is_empty() || name.len() > config::MAX_NAME_LEN || name.chars().any(|c| c.is_control() || c == ' ')) {
            return Err(invalid(format!("field `initiators[{i}]`: {n:?} is not ANY or an iSCSI name")));
        }
    }
    let mut parsed = Vec::new();
    for (i, m) in p.netmasks.iter().enumerate() {
        parsed.push(Netmask::parse(m).map_err(|e| invalid(format!("field `netmasks[{i}]`: {e}")))?);
    }
    let s = subsystem(t)?;
    let mut reg = s.shared.registry();
    if reg.initiator_groups.contains_key(&p.tag) {
        return Err(RpcError::new(EEXIST, format!("initiator group {} already exists", p.tag)));
    }
    reg.initiator_groups.insert(p.tag, InitiatorGroup { tag: p.tag, initiators: p.initiators, netmasks: p.netmasks, parsed_netmasks: parsed });
    Ok(json!(true))
}

fn delete_initiator_group(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByTag = parse(p)?;
    let s = subsystem(t)?;
    let tag = u16::try_from(p.tag).map_err(|_| invalid("field `tag` must be 1 to 65535"))?;
    let mut reg = s.shared.registry();
    if let Some(n) = reg.nodes.values().find(|n| n.maps().iter().any(|(_, ig)| *ig == tag)) {
        return Err(RpcError::new(EBUSY, format!("initiator group {tag} is mapped by target node {}", n.name)));
    }
    reg.initiator_groups.remove(&tag).ok_or_else(|| RpcError::new(ENODEV, format!("initiator group {tag} does not exist")))?;
    Ok(json!(true))
}

fn get_initiator_groups(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let reg = subsystem(t)?.shared.registry();
    Ok(Value::Array(reg.initiator_groups.values().map(|g| json!({"tag": g.tag, "initiators": g.initiators, "netmasks": g.netmasks})).collect()))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateAuthGroup {
    tag: u32,
    #[serde(default)]
    secrets: Vec<ChapSecret>,
}

/// Longest CHAP user name or secret.
const MAX_CHAP_LEN: usize = 255;

fn create_auth_group(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreateAuthGroup = parse(p)?;
    if p.tag == 0 {
        return Err(invalid("field `tag` must be at least 1"));
    }
    if p.secrets.len() > config::MAX_GROUP_ENTRIES {
        return Err(invalid(format!("field `secrets` lists more than {} secrets", config::MAX_GROUP_ENTRIES)));
    }
    for (i, s) in p.secrets.iter().enumerate() {
        let ok = |v: &str| !v.is_empty() && v.len() <= MAX_CHAP_LEN;
        if !ok(&s.user) || !ok(&s.secret) {
            return Err(invalid(format!("field `secrets[{i}]`: user and secret must be 1 to {MAX_CHAP_LEN} bytes")));
        }
        if s.muser.is_some() != s.msecret.is_some() || s.muser.as_deref().is_some_and(|v| !ok(v)) || s.msecret.as_deref().is_some_and(|v| !ok(v)) {
            return Err(invalid(format!("field `secrets[{i}]`: muser and msecret go together, 1 to {MAX_CHAP_LEN} bytes each")));
        }
        if p.secrets[..i].iter().any(|o| o.user == s.user) {
            return Err(invalid(format!("field `secrets[{i}]`: user {:?} is listed twice", s.user)));
        }
    }
    let s = subsystem(t)?;
    let mut reg = s.shared.registry();
    if reg.auth_groups.contains_key(&p.tag) {
        return Err(RpcError::new(EEXIST, format!("auth group {} already exists", p.tag)));
    }
    reg.auth_groups.insert(p.tag, AuthGroup { tag: p.tag, secrets: p.secrets });
    Ok(json!(true))
}

fn delete_auth_group(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByTag = parse(p)?;
    let s = subsystem(t)?;
    let mut reg = s.shared.registry();
    if let Some(n) = reg.nodes.values().find(|n| n.chap_group == p.tag) {
        return Err(RpcError::new(EBUSY, format!("auth group {} is used by target node {}", p.tag, n.name)));
    }
    if reg.options.chap_group == p.tag {
        return Err(RpcError::new(EBUSY, format!("auth group {} is used by discovery sessions", p.tag)));
    }
    reg.auth_groups.remove(&p.tag).ok_or_else(|| RpcError::new(ENODEV, format!("auth group {} does not exist", p.tag)))?;
    Ok(json!(true))
}

fn get_auth_groups(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let reg = subsystem(t)?.shared.registry();
    Ok(Value::Array(reg.auth_groups.values().map(|g| json!({"tag": g.tag, "secrets": g.secrets})).collect()))
}

#[derive(Deserialize, Serialize, Clone, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LunParam {
    bdev_name: String,
    lun_id: u64,
}

#[derive(Deserialize, Serialize, Clone, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct MapParam {
    pg_tag: u16,
    ig_tag: u16,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateTargetNode {
    name: String,
    #[serde(default)]
    alias_name: Option<String>,
    luns: Vec<LunParam>,
    pg_ig_maps: Vec<MapParam>,
    queue_depth: u32,
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
    #[serde(default)]
    chap_group: u32,
    #[serde(default)]
    header_digest: bool,
    #[serde(default)]
    data_digest: bool,
}

fn open_lun(t: &Ctx, node: &str, l: &LunParam, field: &str) -> Result<Arc<Lun>, RpcError> {
    if l.lun_id > MAX_LUN {
        return Err(invalid(format!("field `{field}.lun_id` must be at most {MAX_LUN}")));
    }
    let entry = t.bdev(&l.bdev_name)?;
    let hold = entry.open(&format!("iscsi:{node}"))?;
    let unit = Arc::new(LogicalUnit::with_pr_dir(entry, t.reactors.core_count(), &t.data_dir.join("scsi-pr")));
    Ok(Arc::new(Lun::new(l.lun_id, unit, hold, t.reactors.core_count())))
}

fn create_target_node(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: CreateTargetNode = parse(p)?;
    let s = subsystem(t)?;
    let (name, max_qd) = {
        let reg = s.shared.registry();
        (reg.full_name(&p.name), reg.options.max_queue_depth)
    };
    config::check_iscsi_name(&name).map_err(|e| invalid(format!("field `name`: {e}")))?;
    if p.alias_name.as_ref().is_some_and(|a| a.len() > 255 || a.chars().any(char::is_control)) {
        return Err(invalid("field `alias_name` must be at most 255 printable bytes"));
    }
    if !(1..=max_qd).contains(&p.queue_depth) {
        return Err(invalid(format!("field `queue_depth` must be between 1 and {max_qd} (iscsi_set_options max_queue_depth)")));
    }
    config::check_chap_policy(p.disable_chap, p.require_chap, p.mutual_chap).map_err(invalid)?;
    if p.luns.is_empty() || p.luns.len() > config::MAX_LUNS_PER_NODE {
        return Err(invalid(format!("field `luns` must list 1 to {} LUNs", config::MAX_LUNS_PER_NODE)));
    }
    for (i, l) in p.luns.iter().enumerate() {
        if p.luns[..i].iter().any(|o| o.lun_id == l.lun_id) {
            return Err(invalid(format!("field `luns[{i}].lun_id`: LUN {} is listed twice", l.lun_id)));
        }
    }
    {
        let reg = s.shared.registry();
        if reg.nodes.contains_key(&name) {
            return Err(RpcError::new(EEXIST, format!("target node {name} already exists")));
        }
        if reg.nodes.len() >= config::MAX_TARGET_NODES {
            return Err(RpcError::new(crate::rpc::ENOSPC, "too many target nodes"));
        }
        for (i, m) in p.pg_ig_maps.iter().enumerate() {
            if !reg.portal_groups.contains_key(&m.pg_tag) {
                return Err(RpcError::new(ENODEV, format!("field `pg_ig_maps[{i}].pg_tag`: portal group {} does not exist", m.pg_tag)));
            }
            if !reg.initiator_groups.contains_key(&m.ig_tag) {
                return Err(RpcError::new(ENODEV, format!("field `pg_ig_maps[{i}].ig_tag`: initiator group {} does not exist", m.ig_tag)));
            }
        }
        if p.chap_group != 0 && !reg.auth_groups.contains_key(&p.chap_group) {
            return Err(RpcError::new(ENODEV, format!("field `chap_group`: auth group {} does not exist", p.chap_group)));
        }
    }
    let mut luns = Vec::new();
    for (i, l) in p.luns.iter().enumerate() {
        luns.push(open_lun(t, &name, l, &format!("luns[{i}]"))?);
    }
    let mut maps: Vec<(u16, u16)> = p.pg_ig_maps.iter().map(|m| (m.pg_tag, m.ig_tag)).collect();
    maps.dedup();
    let node = TargetNode::new(
        name.clone(),
        p.alias_name,
        p.queue_depth,
        (p.disable_chap, p.require_chap, p.mutual_chap, p.chap_group),
        (p.header_digest, p.data_digest),
        maps,
        Vec::new(),
    );
    node.set_luns(luns);
    let mut reg = s.shared.registry();
    if reg.nodes.contains_key(&name) {
        return Err(RpcError::new(EEXIST, format!("target node {name} already exists")));
    }
    reg.nodes.insert(name, Arc::new(node));
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

fn delete_target_node(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByName = parse(p)?;
    let s = subsystem(t)?;
    let node = {
        let reg = s.shared.registry();
        let name = reg.full_name(&p.name);
        reg.nodes.get(&name).cloned().ok_or_else(|| RpcError::new(ENODEV, format!("target node {name} does not exist")))?
    };
    node.deleted.store(true, Relaxed);
    let name = node.name.clone();
    if !s.close_sessions(t, |r| r.target.as_deref() == Some(name.as_str())) {
        return Err(RpcError::new(crate::rpc::ETIMEDOUT, format!("sessions of {name} did not close in time")));
    }
    s.shared.registry().nodes.remove(&name);
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddLun {
    name: String,
    bdev_name: String,
    #[serde(default)]
    lun_id: Option<u64>,
}

fn target_node_add_lun(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: AddLun = parse(p)?;
    let s = subsystem(t)?;
    let node = {
        let reg = s.shared.registry();
        let name = reg.full_name(&p.name);
        reg.nodes.get(&name).cloned().ok_or_else(|| RpcError::new(ENODEV, format!("target node {name} does not exist")))?
    };
    let current = node.luns();
    if current.len() >= config::MAX_LUNS_PER_NODE {
        return Err(RpcError::new(crate::rpc::ENOSPC, format!("target node {} has {} LUNs already", node.name, current.len())));
    }
    let id = match p.lun_id {
        Some(id) => {
            if current.iter().any(|l| l.id == id) {
                return Err(RpcError::new(EEXIST, format!("LUN {id} of {} already exists", node.name)));
            }
            id
        }
        None => (0..=MAX_LUN).find(|i| !current.iter().any(|l| l.id == *i)).ok_or_else(|| RpcError::new(crate::rpc::ENOSPC, "no free LUN id"))?,
    };
    let lun = open_lun(t, &node.name, &LunParam { bdev_name: p.bdev_name, lun_id: id }, "lun")?;
    let mut next: Vec<Arc<Lun>> = current.iter().cloned().collect();
    next.push(lun);
    node.set_luns(next);
    Ok(json!(true))
}

fn node_json(n: &TargetNode) -> Value {
    let luns: Vec<Value> = n.luns().iter().map(|l| json!({"bdev_name": l.unit.entry().name(), "lun_id": l.id})).collect();
    let maps: Vec<Value> = n.maps().iter().map(|(p, i)| json!({"pg_tag": p, "ig_tag": i})).collect();
    let mut v = json!({
        "name": n.name,
        "pg_ig_maps": maps,
        "luns": luns,
        "queue_depth": n.queue_depth,
        "disable_chap": n.disable_chap,
        "require_chap": n.require_chap,
        "mutual_chap": n.mutual_chap,
        "chap_group": n.chap_group,
        "header_digest": n.header_digest,
        "data_digest": n.data_digest,
    });
    if let Some(a) = &n.alias {
        v["alias_name"] = json!(a);
    }
    v
}

fn get_target_nodes(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let reg = subsystem(t)?.shared.registry();
    Ok(Value::Array(reg.nodes.values().map(|n| node_json(n)).collect()))
}

/// SPDK's SCSI devices: one per target node, named after it (spdkcli lists target nodes
/// through this).
fn scsi_get_devices(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let reg = subsystem(t)?.shared.registry();
    Ok(Value::Array(reg.nodes.values().filter(|n| !n.deleted.load(Relaxed)).enumerate().map(|(i, n)| json!({"id": i, "device_name": n.name})).collect()))
}

fn get_connections(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let s = subsystem(t)?;
    let sessions = s.shared.sessions();
    Ok(Value::Array(
        sessions
            .records
            .values()
            .map(|r| {
                json!({
                    "id": r.conn_id,
                    "cid": r.cid,
                    "tsih": r.tsih,
                    "isid": r.isid.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    "lcore_id": t.reactors.mailbox(r.core).cpu(),
                    "core_index": r.core,
                    "initiator_name": r.initiator,
                    "initiator_addr": r.peer.ip().to_string(),
                    "target_addr": r.local.ip().to_string(),
                    "target_port": r.local.port(),
                    "portal_group_tag": r.pg_tag,
                    "target_node_name": r.target,
                    "session_type": if r.target.is_some() { "normal" } else { "discovery" },
                })
            })
            .collect(),
    ))
}

/// The calls that recreate the configuration (save_config).
pub fn config_calls(reg: &Registry) -> Vec<ConfigCall> {
    let mut out = Vec::new();
    let defaults = serde_json::to_value(Options::default()).unwrap_or(Value::Null);
    let current = serde_json::to_value(&reg.options).unwrap_or(Value::Null);
    if current != defaults {
        out.push(ConfigCall::new("iscsi_set_options", current));
    }
    for g in reg.auth_groups.values() {
        out.push(ConfigCall::new("iscsi_create_auth_group", json!({"tag": g.tag, "secrets": g.secrets})));
    }
    for g in reg.portal_groups.values() {
        let portals: Vec<Value> = g.portals.iter().map(|p| json!({"host": p.host, "port": p.port})).collect();
        out.push(ConfigCall::new("iscsi_create_portal_group", json!({"tag": g.tag, "portals": portals, "private": g.private})));
    }
    for g in reg.initiator_groups.values() {
        out.push(ConfigCall::new("iscsi_create_initiator_group", json!({"tag": g.tag, "initiators": g.initiators, "netmasks": g.netmasks})));
    }
    for n in reg.nodes.values() {
        if n.deleted.load(Relaxed) {
            continue;
        }
        out.push(ConfigCall::new("iscsi_create_target_node", node_json(n)));
    }
    out
}
