//! The CSI controller service: volumes, snapshots and clones in the tidemark nodes' lvol stores,
//! exported to hosts over NVMe/TCP (a subsystem per volume, the node's host NQN on its
//! allow-list). Every answer is derived from the nodes, so a restarted controller answers the same.

use crate::names::{self, Id, SNAPSHOT_PREFIX, VOLUME_PREFIX};
use crate::pool::{status, Lvol, Nodes, MIB};
use crate::tidemark;
use bpfman_csi::v1::controller_server::Controller;
use bpfman_csi::v1::controller_service_capability::rpc::Type as Cap;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::AccessType;
use bpfman_csi::v1::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
use bpfman_csi::v1::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

/// A volume created without a capacity range.
const DEFAULT_SIZE: u64 = 1 << 30;
/// StorageClass parameters the external-provisioner passes along and the driver ignores.
const SIDECAR_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

pub struct ControllerService {
    nodes: Arc<Nodes>,
    /// Names and ids with a call in progress: a second call for the same one is ABORTED, as
    /// the spec asks, instead of racing the first on the node.
    busy: Mutex<HashSet<String>>,
}

/// Releases a name of [`ControllerService::busy`] when the call ends.
struct Busy<'a>(&'a Mutex<HashSet<String>>, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

impl ControllerService {
    pub fn new(nodes: Arc<Nodes>) -> Self {
        ControllerService { nodes, busy: Mutex::new(HashSet::new()) }
    }

    fn claim(&self, key: &str) -> Result<Busy<'_>, Status> {
        if !self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string()) {
            return Err(Status::aborted(format!("an operation on {key} is already in progress")));
        }
        Ok(Busy(&self.busy, key.to_string()))
    }

    fn topology_of(&self, node: &str) -> Vec<Topology> {
        match self.nodes.config.node(node) {
            Some(n) if !n.topology.is_empty() => vec![Topology { segments: n.topology.iter().map(|(k, v)| (k.clone(), v.clone())).collect() }],
            _ => Vec::new(),
        }
    }

    fn volume(&self, l: &Lvol, source: Option<VolumeContentSource>) -> Volume {
        Volume {
            capacity_bytes: l.size as i64,
            volume_id: l.id.to_string(),
            volume_context: HashMap::from([("node".to_string(), l.id.node.clone()), ("pool".to_string(), l.id.pool.clone())]),
            content_source: source,
            accessible_topology: self.topology_of(&l.id.node),
        }
    }

    /// Finds the volume or snapshot lvol `lvol` (its exact name, or a name starting with it
    /// when `prefix`) on every node. A node that does not answer is an error: the name may
    /// live there, and creating it elsewhere would make two of it.
    async fn search(&self, lvol: &str, prefix: bool) -> Result<Vec<Lvol>, Status> {
        let mut out = Vec::new();
        for n in self.nodes.nodes() {
            let looking = |e: &tidemark::RpcError| status(e, &format!("looking for {lvol} on {}", n.name));
            if prefix {
                out.extend(self.nodes.lvols(&n.name, lvol).await.map_err(|e| looking(&e))?);
            } else {
                // An exact name: one lookup of its alias per store, not a listing of every
                // lvol of the node (which grows with the pool).
                for store in self.nodes.stores(&n.name).await.map_err(|e| looking(&e))? {
                    out.extend(self.nodes.find(&Id::new(&n.name, &store.name, lvol)).await?);
                }
            }
        }
        Ok(out)
    }

    /// Every lvol whose name starts with `prefix` on every node, sorted by id (the order
    /// the paging tokens count in).
    async fn all(&self, prefix: &str) -> Result<Vec<Lvol>, Status> {
        let mut out = self.search(prefix, true).await?;
        out.sort_by_key(|l| l.id.to_string());
        Ok(out)
    }

    /// The node a new volume lands on: the first preferred topology a node with the pool
    /// matches, then the requisite ones; without requirements the node with most free space.
    async fn place(&self, pool: &str, req: Option<&TopologyRequirement>) -> Result<String, Status> {
        let mut candidates = Vec::new();
        let mut reachable = false;
        for n in self.nodes.nodes() {
            match self.nodes.store(&n.name, pool).await {
                Ok(Some(s)) => candidates.push((n, s.free_clusters * s.cluster_size)),
                Ok(None) => reachable = true,
                Err(e) => log::warn!("placing a volume: {}: {e}", n.name),
            }
        }
        if candidates.is_empty() {
            return Err(if reachable {
                Status::invalid_argument(format!("no tidemark node has an lvol store named {pool}"))
            } else {
                Status::unavailable("no tidemark node answers")
            });
        }
        let Some(req) = req.filter(|r| !r.requisite.is_empty() || !r.preferred.is_empty()) else {
            candidates.sort_by_key(|(_, free)| std::cmp::Reverse(*free));
            return Ok(candidates[0].0.name.clone());
        };
        let fits = |t: &Topology, n: &crate::config::Node| t.segments.iter().all(|(k, v)| n.topology.get(k) == Some(v));
        for t in req.preferred.iter().chain(&req.requisite) {
            if let Some((n, _)) = candidates.iter().find(|(n, _)| fits(t, n)) {
                return Ok(n.name.clone());
            }
        }
        Err(Status::resource_exhausted(format!("no tidemark node with lvol store {pool} is in the requested topology")))
    }

    /// Clones snapshot lvol `snap` into volume lvol `name` on the same node and pool, grown
    /// to `size` when that is larger than the snapshot.
    async fn clone_to(&self, snap: &Id, name: &str, size: u64) -> Result<Lvol, Status> {
        let p = json!({"snapshot_name": snap.alias(), "clone_name": name});
        self.nodes.ask(&snap.node, "bdev_lvol_clone", p, &format!("cloning {snap}")).await?;
        let id = Id::new(&snap.node, &snap.pool, name);
        let l = self.nodes.find(&id).await?.ok_or_else(|| Status::internal(format!("clone {id} vanished")))?;
        if size > l.size {
            let p = json!({"name": id.alias(), "size_in_mib": size.div_ceil(MIB)});
            self.nodes.ask(&id.node, "bdev_lvol_resize", p, &format!("growing {id}")).await?;
            return self.nodes.find(&id).await?.ok_or_else(|| Status::internal(format!("clone {id} vanished")));
        }
        Ok(l)
    }
}

/// The size a volume gets for `range` on a store with `cluster` bytes clusters: bdev_lvol_create
/// takes MiB and rounds up to whole clusters.
fn rounded(bytes: u64, cluster: u64) -> u64 {
    (bytes.div_ceil(MIB) * MIB).div_ceil(cluster) * cluster
}

/// (required, limit) in bytes; 0 = not given.
fn range(r: Option<&CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = r else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument("capacity_range: negative bytes"));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if lim != 0 && req > lim {
        return Err(Status::out_of_range(format!("capacity_range: required_bytes {req} is past limit_bytes {lim}")));
    }
    Ok((req, lim))
}

fn fits(size: u64, (req, lim): (u64, u64)) -> bool {
    size >= req && (lim == 0 || size <= lim)
}

/// Checks the capabilities a volume is asked with; Err(message) for one the driver cannot
/// give. NVMe/TCP exports a block device to one host at a time for a file system; a raw block
/// volume may be shared (the application coordinates its writers).
fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities: none given".into());
    }
    for c in caps {
        let mode = c.access_mode.as_ref().map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown)).ok_or("volume_capabilities: an access_mode is missing")?;
        let block = match &c.access_type {
            Some(AccessType::Block(_)) => true,
            Some(AccessType::Mount(m)) => {
                if !["", "ext4", "xfs"].contains(&m.fs_type.as_str()) {
                    return Err(format!("file system {:?} is not supported (ext4, xfs)", m.fs_type));
                }
                false
            }
            None => return Err("volume_capabilities: an access_type is missing".into()),
        };
        let ok = match mode {
            Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => true,
            Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => block,
            Mode::Unknown => false,
        };
        if !ok {
            return Err(format!("access mode {} is not supported{}", mode.as_str_name(), if block { "" } else { " with a file system" }));
        }
    }
    Ok(())
}

fn single_node(c: &VolumeCapability) -> bool {
    let m = c.access_mode.as_ref().map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    !matches!(m, Some(Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter))
}

/// Parses a StorageClass parameter map: (pool, thin).
fn parameters(p: &HashMap<String, String>, default_pool: &str) -> Result<(String, bool), Status> {
    let mut pool = default_pool.to_string();
    let mut thin = false;
    for (k, v) in p {
        match k.as_str() {
            "pool" => pool = v.clone(),
            "thin" => thin = v.parse().map_err(|_| Status::invalid_argument(format!("parameter thin: {v:?} is not true or false")))?,
            k if k.starts_with(SIDECAR_PARAM_PREFIX) => {}
            k => return Err(Status::invalid_argument(format!("unknown parameter {k:?} (pool, thin)"))),
        }
    }
    Ok((pool, thin))
}

/// One page of `items` from `token` (an offset this driver handed out).
fn page<T>(items: Vec<T>, max: i32, token: &str) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries: negative"));
    }
    let start: usize =
        if token.is_empty() { 0 } else { token.parse().map_err(|_| Status::aborted(format!("starting_token {token:?} is not one this driver gave")))? };
    if start > items.len() {
        return Err(Status::aborted(format!("starting_token {token:?} is past the end of the list")));
    }
    let end = if max == 0 { items.len() } else { (start + max as usize).min(items.len()) };
    let next = if end < items.len() { end.to_string() } else { String::new() };
    Ok((items.into_iter().skip(start).take(end - start).collect(), next))
}

fn snapshot_of(l: &Lvol) -> Option<Snapshot> {
    let (src, secs) = names::parse_snapshot_lvol(&l.id.lvol)?;
    Some(Snapshot {
        size_bytes: l.size as i64,
        snapshot_id: l.id.to_string(),
        source_volume_id: Id::new(&l.id.node, &l.id.pool, &src).to_string(),
        creation_time: Some(prost_types::Timestamp { seconds: secs as i64, nanos: 0 }),
        // The snapshot RPC answers once the preserve point is sealed.
        ready_to_use: true,
        group_snapshot_id: String::new(),
    })
}

fn capability(t: Cap) -> ControllerServiceCapability {
    ControllerServiceCapability { r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, request: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name: missing"));
        }
        check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        let (pool, thin) = parameters(&r.parameters, &self.nodes.config.default_pool)?;
        let want = range(r.capacity_range.as_ref())?;
        let _busy = self.claim(&r.name)?;
        let lvol = names::volume_lvol(&r.name);
        let source = r.volume_content_source.clone().filter(|s| s.r#type.is_some());

        // Same name again: the same volume if it fits the request.
        if let Some(l) = self.search(&lvol, false).await?.into_iter().next() {
            if !fits(l.size, want) {
                return Err(Status::already_exists(format!("volume {} exists with {} bytes, outside the requested range", r.name, l.size)));
            }
            return Ok(Response::new(CreateVolumeResponse { volume: Some(self.volume(&l, source)) }));
        }

        let l = match source.as_ref().and_then(|s| s.r#type.as_ref()) {
            Some(Source::Snapshot(SnapshotSource { snapshot_id })) => {
                let sid = Id::parse(snapshot_id, SNAPSHOT_PREFIX).ok_or_else(|| Status::not_found(format!("snapshot {snapshot_id:?} does not exist")))?;
                let snap = self.nodes.find(&sid).await?.ok_or_else(|| Status::not_found(format!("snapshot {snapshot_id} does not exist")))?;
                let size = want.0.max(snap.size);
                if !fits(size, want) {
                    return Err(Status::out_of_range(format!("snapshot {snapshot_id} holds {} bytes, past limit_bytes {}", snap.size, want.1)));
                }
                self.clone_to(&sid, &lvol, size).await?
            }
            Some(Source::Volume(VolumeSource { volume_id })) => {
                let vid = Id::parse(volume_id, VOLUME_PREFIX).ok_or_else(|| Status::not_found(format!("volume {volume_id:?} does not exist")))?;
                let src = self.nodes.find(&vid).await?.ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))?;
                let size = want.0.max(src.size);
                if !fits(size, want) {
                    return Err(Status::out_of_range(format!("volume {volume_id} holds {} bytes, past limit_bytes {}", src.size, want.1)));
                }
                // A clone grows from a snapshot: a hidden one of the source, deleted with
                // the clone (a retry after a crash finds it and goes on).
                let base = Id::new(&vid.node, &vid.pool, &names::clone_base_lvol(&lvol));
                if self.nodes.find(&base).await?.is_none() {
                    let p = json!({"lvol_name": vid.alias(), "snapshot_name": base.lvol});
                    self.nodes.ask(&vid.node, "bdev_lvol_snapshot", p, &format!("snapshotting {vid}")).await?;
                }
                self.clone_to(&base, &lvol, size).await?
            }
            None => {
                let node = self.place(&pool, r.accessibility_requirements.as_ref()).await?;
                let store = self
                    .nodes
                    .store(&node, &pool)
                    .await
                    .map_err(|e| status(&e, &node))?
                    .ok_or_else(|| Status::unavailable(format!("lvol store {pool} of {node} vanished")))?;
                let size = rounded(
                    if want.0 == 0 {
                        if want.1 == 0 {
                            DEFAULT_SIZE
                        } else {
                            want.1.min(DEFAULT_SIZE)
                        }
                    } else {
                        want.0
                    },
                    store.cluster_size,
                );
                if !fits(size, want) {
                    return Err(Status::out_of_range(format!(
                        "the pool's {} byte clusters give {size} bytes, past limit_bytes {}",
                        store.cluster_size, want.1
                    )));
                }
                let p = json!({"lvol_name": lvol, "size_in_mib": size / MIB, "thin_provision": thin, "lvs_name": pool});
                self.nodes.ask(&node, "bdev_lvol_create", p, &format!("creating volume {}", r.name)).await?;
                let id = Id::new(&node, &pool, &lvol);
                self.nodes.find(&id).await?.ok_or_else(|| Status::internal(format!("volume {id} vanished")))?
            }
        };
        Ok(Response::new(CreateVolumeResponse { volume: Some(self.volume(&l, source)) }))
    }

    async fn delete_volume(&self, request: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        // An id this driver never gave names no volume: deleted already.
        let Some(id) = Id::parse(&r.volume_id, VOLUME_PREFIX).filter(|i| self.nodes.config.node(&i.node).is_some()) else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        let _busy = self.claim(&r.volume_id)?;
        match self.nodes.call(&id.node, "nvmf_delete_subsystem", json!({"nqn": id.nqn()})).await {
            Err(e @ tidemark::RpcError::Unreachable(_)) => return Err(status(&e, &id.node)),
            _ => {}
        }
        match self.nodes.call(&id.node, "bdev_lvol_delete", json!({"name": id.alias()})).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(tidemark::ENODEV) => {}
            Err(e) => return Err(status(&e, &format!("deleting {id}"))),
        }
        // The hidden snapshot a clone of a volume grew from, if this was one.
        let base = Id::new(&id.node, &id.pool, &names::clone_base_lvol(&id.lvol));
        if let Err(e) = self.nodes.call(&id.node, "bdev_lvol_delete", json!({"name": base.alias()})).await {
            if e.code() != Some(tidemark::ENODEV) {
                log::warn!("deleting the clone base {base}: {e}");
            }
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(&self, request: Request<ControllerPublishVolumeRequest>) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() || r.node_id.is_empty() {
            return Err(Status::invalid_argument("volume_id and node_id are required"));
        }
        let cap = r.volume_capability.ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?;
        check_capabilities(std::slice::from_ref(&cap)).map_err(Status::invalid_argument)?;
        if r.readonly {
            return Err(Status::invalid_argument("readonly: read-only publishing is not supported (no PUBLISH_READONLY capability)"));
        }
        let id = Id::parse(&r.volume_id, VOLUME_PREFIX).ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let l = self.nodes.find(&id).await?.ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.volume_id)))?;
        // The node id is the host's NQN (NodeGetInfo).
        if !r.node_id.starts_with("nqn.") || r.node_id.len() > 223 {
            return Err(Status::not_found(format!("node {:?} does not exist (node ids are host NQNs)", r.node_id)));
        }
        let _busy = self.claim(&r.volume_id)?;
        let node = self.nodes.config.node(&id.node).ok_or_else(|| Status::not_found(format!("no tidemark node {}", id.node)))?;
        let nqn = id.nqn();
        let listen = json!({"trtype": "TCP", "adrfam": if node.nvmf_address.contains(':') { "IPv6" } else { "IPv4" }, "traddr": node.nvmf_address, "trsvcid": node.nvmf_port.to_string()});
        let what = format!("exporting {id}");
        // Each step is checked first, so a publish interrupted half way completes on retry.
        let sub = match self.nodes.call(&id.node, "nvmf_get_subsystems", json!({"nqn": nqn})).await {
            Ok(v) => v[0].clone(),
            Err(e @ tidemark::RpcError::Unreachable(_)) => return Err(status(&e, &what)),
            Err(_) => {
                self.nodes.create_transport(&id.node).await?;
                let serial: String = l.uuid.chars().filter(|c| c.is_ascii_hexdigit()).take(20).collect();
                let p = json!({"nqn": nqn, "allow_any_host": false, "serial_number": serial, "model_number": "tidemark CSI volume"});
                self.nodes.ask(&id.node, "nvmf_create_subsystem", p, &what).await?;
                json!({})
            }
        };
        let has = |key: &str, f: &dyn Fn(&Value) -> bool| sub[key].as_array().is_some_and(|a| a.iter().any(f));
        if !has("namespaces", &|n| n["bdev_name"] == l.uuid.as_str()) {
            self.nodes.ask(&id.node, "nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": l.uuid}}), &what).await?;
        }
        if !has("listen_addresses", &|a| a["traddr"] == listen["traddr"] && a["trsvcid"] == listen["trsvcid"]) {
            self.nodes.create_transport(&id.node).await?;
            self.nodes.ask(&id.node, "nvmf_subsystem_add_listener", json!({"nqn": nqn, "listen_address": listen}), &what).await?;
        }
        let others: Vec<String> = sub["hosts"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|h| h["nqn"].as_str())
            .filter(|h| *h != r.node_id)
            .map(String::from)
            .collect();
        if single_node(&cap) && !others.is_empty() {
            return Err(Status::failed_precondition(format!("volume {} is published to {} already", r.volume_id, others.join(", "))));
        }
        if !has("hosts", &|h| h["nqn"] == r.node_id.as_str()) {
            self.nodes.ask(&id.node, "nvmf_subsystem_add_host", json!({"nqn": nqn, "host": r.node_id}), &what).await?;
        }
        // The address hosts reach the listener at (a NAT or port forward may stand between).
        let traddr = node.host_address();
        let publish_context = HashMap::from([
            ("trtype".to_string(), "tcp".to_string()),
            ("adrfam".to_string(), if traddr.contains(':') { "ipv6" } else { "ipv4" }.to_string()),
            ("traddr".to_string(), traddr.to_string()),
            ("trsvcid".to_string(), node.nvmf_port.to_string()),
            ("subnqn".to_string(), nqn),
        ]);
        Ok(Response::new(ControllerPublishVolumeResponse { publish_context }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        // A volume that is gone is unpublished from every node.
        let Some(id) = Id::parse(&r.volume_id, VOLUME_PREFIX).filter(|i| self.nodes.config.node(&i.node).is_some()) else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        let _busy = self.claim(&r.volume_id)?;
        let nqn = id.nqn();
        let what = format!("unexporting {id}");
        let sub = match self.nodes.call(&id.node, "nvmf_get_subsystems", json!({"nqn": nqn})).await {
            Ok(v) => v[0].clone(),
            Err(e @ tidemark::RpcError::Unreachable(_)) => return Err(status(&e, &what)),
            Err(_) => return Ok(Response::new(ControllerUnpublishVolumeResponse {})),
        };
        let hosts: Vec<&str> = sub["hosts"].as_array().map(|a| a.as_slice()).unwrap_or_default().iter().filter_map(|h| h["nqn"].as_str()).collect();
        // No node id: unpublished from every node.
        let leaving: Vec<&str> = hosts.iter().copied().filter(|h| r.node_id.is_empty() || *h == r.node_id).collect();
        for h in &leaving {
            self.nodes.ask(&id.node, "nvmf_subsystem_remove_host", json!({"nqn": nqn, "host": h}), &what).await?;
        }
        // The last host gone, the subsystem goes too: it holds the volume open.
        if hosts.len() == leaving.len() {
            match self.nodes.call(&id.node, "nvmf_delete_subsystem", json!({"nqn": nqn})).await {
                Err(e @ tidemark::RpcError::Unreachable(_)) => return Err(status(&e, &what)),
                _ => {}
            }
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities: none given"));
        }
        let id = Id::parse(&r.volume_id, VOLUME_PREFIX).ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        self.nodes.find(&id).await?.ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.volume_id)))?;
        let resp = match check_capabilities(&r.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(message) => ValidateVolumeCapabilitiesResponse { confirmed: None, message },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(&self, request: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let all = self.all(VOLUME_PREFIX).await?;
        let (items, next_token) = page(all, r.max_entries, &r.starting_token)?;
        let entries = items.iter().map(|l| list_volumes_response::Entry { volume: Some(self.volume(l, None)), status: None }).collect();
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(&self, request: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        let r = request.into_inner();
        if !r.volume_capabilities.is_empty() && check_capabilities(&r.volume_capabilities).is_err() {
            return Ok(Response::new(GetCapacityResponse { available_capacity: 0, maximum_volume_size: None, minimum_volume_size: None }));
        }
        let (pool, _) = parameters(&r.parameters, &self.nodes.config.default_pool)?;
        // A volume lands on one node: the capacity is the largest free space of a node in the
        // segment, which is also the largest volume that can be made there.
        let mut best = 0u64;
        let (mut answered, mut asked) = (false, false);
        for n in self.nodes.nodes() {
            if let Some(t) = &r.accessible_topology {
                if !t.segments.iter().all(|(k, v)| n.topology.get(k) == Some(v)) {
                    continue;
                }
            }
            asked = true;
            match self.nodes.store(&n.name, &pool).await {
                Ok(s) => {
                    answered = true;
                    best = best.max(s.map_or(0, |s| s.free_clusters * s.cluster_size));
                }
                Err(e) => log::warn!("capacity of {}: {e}", n.name),
            }
        }
        if asked && !answered {
            return Err(Status::unavailable("no tidemark node in the segment answers"));
        }
        let best = best.min(i64::MAX as u64) as i64;
        Ok(Response::new(GetCapacityResponse { available_capacity: best, maximum_volume_size: Some(best), minimum_volume_size: None }))
    }

    async fn controller_get_capabilities(&self, _: Request<ControllerGetCapabilitiesRequest>) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Cap::CreateDeleteVolume,
            Cap::PublishUnpublishVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::CreateDeleteSnapshot,
            Cap::ListSnapshots,
            Cap::CloneVolume,
            Cap::ExpandVolume,
            Cap::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(&self, request: Request<CreateSnapshotRequest>) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        if r.name.is_empty() || r.source_volume_id.is_empty() {
            return Err(Status::invalid_argument("name and source_volume_id are required"));
        }
        let _busy = self.claim(&r.name)?;
        let src = Id::parse(&r.source_volume_id, VOLUME_PREFIX);
        // Same name again: the same snapshot if it is of the same volume.
        if let Some(l) = self.search(&names::snapshot_prefix(&r.name), true).await?.into_iter().next() {
            let s = snapshot_of(&l).ok_or_else(|| Status::internal(format!("lvol {} is not a snapshot of this driver", l.id)))?;
            if Some(&s.source_volume_id) != src.as_ref().map(|i| i.to_string()).as_ref() {
                return Err(Status::already_exists(format!("snapshot {} exists, of volume {}", r.name, s.source_volume_id)));
            }
            return Ok(Response::new(CreateSnapshotResponse { snapshot: Some(s) }));
        }
        let src = src.ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.source_volume_id)))?;
        self.nodes.find(&src).await?.ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.source_volume_id)))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let lvol = names::snapshot_lvol(&r.name, &src.lvol, now);
        // bdev_lvol_snapshot is the no-pause preserve: it answers once the point is sealed.
        let p = json!({"lvol_name": src.alias(), "snapshot_name": lvol});
        self.nodes.ask(&src.node, "bdev_lvol_snapshot", p, &format!("snapshotting {src}")).await?;
        let id = Id::new(&src.node, &src.pool, &lvol);
        let l = self.nodes.find(&id).await?.ok_or_else(|| Status::internal(format!("snapshot {id} vanished")))?;
        let s = snapshot_of(&l).ok_or_else(|| Status::internal(format!("snapshot lvol {id} has a foreign name")))?;
        Ok(Response::new(CreateSnapshotResponse { snapshot: Some(s) }))
    }

    async fn delete_snapshot(&self, request: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id: missing"));
        }
        let Some(id) = Id::parse(&r.snapshot_id, SNAPSHOT_PREFIX).filter(|i| self.nodes.config.node(&i.node).is_some()) else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        let _busy = self.claim(&r.snapshot_id)?;
        match self.nodes.call(&id.node, "bdev_lvol_delete", json!({"name": id.alias()})).await {
            Ok(_) => Ok(Response::new(DeleteSnapshotResponse {})),
            Err(e) if e.code() == Some(tidemark::ENODEV) => Ok(Response::new(DeleteSnapshotResponse {})),
            Err(e) => Err(status(&e, &format!("deleting snapshot {id}"))),
        }
    }

    async fn list_snapshots(&self, request: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let mut all: Vec<Snapshot> = if !r.snapshot_id.is_empty() {
            // One snapshot: an id that names none gives an empty list, not an error.
            match Id::parse(&r.snapshot_id, SNAPSHOT_PREFIX).filter(|i| self.nodes.config.node(&i.node).is_some()) {
                Some(id) => self.nodes.find(&id).await?.as_ref().and_then(snapshot_of).into_iter().collect(),
                None => Vec::new(),
            }
        } else {
            self.all(SNAPSHOT_PREFIX).await?.iter().filter_map(snapshot_of).collect()
        };
        if !r.source_volume_id.is_empty() {
            all.retain(|s| s.source_volume_id == r.source_volume_id);
        }
        let (items, next_token) = page(all, r.max_entries, &r.starting_token)?;
        let entries = items.into_iter().map(|s| list_snapshots_response::Entry { snapshot: Some(s) }).collect();
        Ok(Response::new(ListSnapshotsResponse { entries, next_token }))
    }

    async fn controller_expand_volume(&self, request: Request<ControllerExpandVolumeRequest>) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        let want = range(Some(r.capacity_range.as_ref().ok_or_else(|| Status::invalid_argument("capacity_range: missing"))?))?;
        if want.0 == 0 && want.1 == 0 {
            return Err(Status::invalid_argument("capacity_range: neither required_bytes nor limit_bytes given"));
        }
        let id = Id::parse(&r.volume_id, VOLUME_PREFIX).ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let _busy = self.claim(&r.volume_id)?;
        let l = self.nodes.find(&id).await?.ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.volume_id)))?;
        // A file system grows on the node after the device did; a raw block volume does not.
        let node_expansion_required = !matches!(r.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()), Some(AccessType::Block(_)));
        let target = want.0.max(want.1.min(l.size));
        if target <= l.size {
            // Never shrunk: a volume at least as large as asked is expanded already.
            return Ok(Response::new(ControllerExpandVolumeResponse { capacity_bytes: l.size as i64, node_expansion_required }));
        }
        let store = self
            .nodes
            .store(&id.node, &id.pool)
            .await
            .map_err(|e| status(&e, &id.node))?
            .ok_or_else(|| Status::not_found(format!("lvol store {} vanished", id.pool)))?;
        let size = rounded(target, store.cluster_size);
        if !fits(size, want) {
            return Err(Status::out_of_range(format!("the pool's {} byte clusters give {size} bytes, past limit_bytes {}", store.cluster_size, want.1)));
        }
        self.nodes.ask(&id.node, "bdev_lvol_resize", json!({"name": id.alias(), "size_in_mib": size / MIB}), &format!("resizing {id}")).await?;
        let l = self.nodes.find(&id).await?.ok_or_else(|| Status::not_found(format!("volume {} vanished", r.volume_id)))?;
        Ok(Response::new(ControllerExpandVolumeResponse { capacity_bytes: l.size as i64, node_expansion_required }))
    }

    async fn controller_get_volume(&self, _: Request<ControllerGetVolumeRequest>) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerGetVolume (GET_VOLUME is not a capability of this driver)"))
    }

    async fn controller_modify_volume(&self, _: Request<ControllerModifyVolumeRequest>) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume (MODIFY_VOLUME is not a capability of this driver)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_the_list_once_and_bad_tokens_abort() {
        let (a, t) = page((0..5).collect(), 2, "").unwrap();
        assert_eq!((a, t.as_str()), (vec![0, 1], "2"));
        let (b, t) = page((0..5).collect(), 2, &t).unwrap();
        assert_eq!((b, t.as_str()), (vec![2, 3], "4"));
        let (c, t) = page((0..5).collect(), 2, &t).unwrap();
        assert_eq!((c, t.as_str()), (vec![4], ""));
        assert_eq!(page((0..5).collect::<Vec<_>>(), 0, "").unwrap().0.len(), 5);
        assert_eq!(page((0..5).collect::<Vec<_>>(), 2, "x").unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page((0..5).collect::<Vec<_>>(), 2, "6").unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page((0..5).collect::<Vec<_>>(), -1, "").unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn sizes_round_up_to_clusters_and_ranges_are_checked() {
        assert_eq!(rounded(1, MIB), MIB);
        assert_eq!(rounded(5 * MIB + 1, 4 * MIB), 8 * MIB);
        assert!(fits(8 * MIB, (5 * MIB, 0)) && !fits(8 * MIB, (5 * MIB, 6 * MIB)));
        let r = |req, lim| range(Some(&CapacityRange { required_bytes: req, limit_bytes: lim }));
        assert_eq!(r(-1, 0).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(r(10, 5).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(r(5, 10).unwrap(), (5, 10));
    }

    #[test]
    fn parameters_and_capabilities() {
        let p = HashMap::from([("thin".to_string(), "true".to_string()), ("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string())]);
        assert_eq!(parameters(&p, "pool").unwrap(), ("pool".to_string(), true));
        assert!(parameters(&HashMap::from([("replicas".to_string(), "3".to_string())]), "pool").is_err());
        let cap = |mode: Mode, block: bool| VolumeCapability {
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(if block { AccessType::Block(volume_capability::BlockVolume {}) } else { AccessType::Mount(Default::default()) }),
        };
        assert!(check_capabilities(&[cap(Mode::SingleNodeWriter, false)]).is_ok());
        assert!(check_capabilities(&[cap(Mode::MultiNodeMultiWriter, true)]).is_ok());
        assert!(check_capabilities(&[cap(Mode::MultiNodeMultiWriter, false)]).is_err());
        assert!(check_capabilities(&[]).is_err());
    }
}
