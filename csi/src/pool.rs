//! What the controller reads from and asks of the tidemark nodes: the lvol stores and lvols of
//! each node (the only state there is), and the mapping of the nodes' errors to gRPC statuses.

use crate::config::{Config, Node};
use crate::names::Id;
use crate::tidemark::{self, Client, RpcError};
use serde_json::{json, Value};
use std::collections::HashMap;
use tonic::Status;

pub const MIB: u64 = 1 << 20;

/// An lvol store of a node.
#[derive(Debug, Clone)]
pub struct Store {
    pub name: String,
    pub cluster_size: u64,
    pub free_clusters: u64,
}

/// An lvol of a node.
#[derive(Debug, Clone)]
pub struct Lvol {
    pub id: Id,
    pub uuid: String,
    pub size: u64,
}

pub struct Nodes {
    pub config: Config,
    clients: HashMap<String, Client>,
}

impl Nodes {
    pub fn new(config: Config) -> Nodes {
        let clients = config.nodes.iter().map(|n| (n.name.clone(), Client::new(&n.rpc))).collect();
        Nodes { config, clients }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.config.nodes
    }

    fn client(&self, node: &str) -> Result<&Client, Status> {
        self.clients.get(node).ok_or_else(|| Status::not_found(format!("no tidemark node named {node} in the driver's config")))
    }

    pub async fn call(&self, node: &str, method: &str, params: Value) -> Result<Value, RpcError> {
        match self.clients.get(node) {
            Some(c) => c.call(method, params).await,
            None => Err(RpcError::Unreachable(format!("no tidemark node named {node}"))),
        }
    }

    /// As [`Nodes::call`], with the error mapped to a status naming `what`.
    pub async fn ask(&self, node: &str, method: &str, params: Value, what: &str) -> Result<Value, Status> {
        self.client(node)?.call(method, params).await.map_err(|e| status(&e, &format!("{what} on {node}")))
    }

    /// Whether any node answers.
    pub async fn any_answers(&self) -> bool {
        for n in self.nodes() {
            if self.call(&n.name, "rpc_get_methods", Value::Null).await.is_ok() {
                return true;
            }
        }
        false
    }

    pub async fn stores(&self, node: &str) -> Result<Vec<Store>, RpcError> {
        let v = self.call(node, "bdev_lvol_get_lvstores", Value::Null).await?;
        Ok(v.as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                Some(Store {
                    name: s["name"].as_str()?.to_string(),
                    cluster_size: s["cluster_size"].as_u64().filter(|&c| c > 0)?,
                    free_clusters: s["free_clusters"].as_u64()?,
                })
            })
            .collect())
    }

    pub async fn store(&self, node: &str, pool: &str) -> Result<Option<Store>, RpcError> {
        Ok(self.stores(node).await?.into_iter().find(|s| s.name == pool))
    }

    /// The lvols of `node` whose name starts with `prefix`, in every store.
    pub async fn lvols(&self, node: &str, prefix: &str) -> Result<Vec<Lvol>, RpcError> {
        let stores = self.stores(node).await?;
        let v = self.call(node, "bdev_lvol_get_lvols", Value::Null).await?;
        let mut out = Vec::new();
        for l in v.as_array().map(|a| a.as_slice()).unwrap_or_default() {
            let (Some(name), Some(pool), Some(uuid)) = (l["name"].as_str(), l["lvs"]["name"].as_str(), l["uuid"].as_str()) else { continue };
            if !name.starts_with(prefix) {
                continue;
            }
            let Some(store) = stores.iter().find(|s| s.name == pool) else { continue };
            let size = l["num_clusters"].as_u64().unwrap_or(0) * store.cluster_size;
            out.push(Lvol { id: Id::new(node, pool, name), uuid: uuid.to_string(), size });
        }
        Ok(out)
    }

    /// The lvol `id` names; Ok(None) when the node answers that it has none. One lookup of
    /// the alias `pool/lvol` (not a listing of the node's lvols, which grows with the pool).
    pub async fn find(&self, id: &Id) -> Result<Option<Lvol>, Status> {
        let alias = id.alias();
        let v = match self.client(&id.node)?.call("bdev_get_bdevs", json!({"name": alias})).await {
            Ok(v) => v,
            Err(e) if matches!(e.code(), Some(tidemark::ENODEV | tidemark::ENOENT)) => return Ok(None),
            Err(e) => return Err(status(&e, &format!("looking up {id} on {}", id.node))),
        };
        let Some(b) = v.as_array().and_then(|a| a.first()) else { return Ok(None) };
        // The alias must be this lvol's own (a bdev named like it that is no lvol is not it).
        if !b["aliases"].as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some(alias.as_str()))) {
            return Ok(None);
        }
        let (Some(uuid), Some(blocks), Some(bs)) = (b["uuid"].as_str(), b["num_blocks"].as_u64(), b["block_size"].as_u64()) else {
            return Err(Status::internal(format!("{} described {alias} without uuid, num_blocks or block_size: {b}", id.node)));
        };
        Ok(Some(Lvol { id: id.clone(), uuid: uuid.to_string(), size: blocks * bs }))
    }

    pub async fn create_transport(&self, node: &str) -> Result<(), Status> {
        match self.call(node, "nvmf_create_transport", json!({"trtype": "TCP"})).await {
            Err(e) if e.code() != Some(tidemark::EEXIST) => Err(status(&e, &format!("creating the TCP transport on {node}"))),
            _ => Ok(()),
        }
    }
}

/// The gRPC status for a node's error.
pub fn status(e: &RpcError, what: &str) -> Status {
    let msg = format!("{what}: {e}");
    match e {
        RpcError::Unreachable(_) => Status::unavailable(msg),
        RpcError::Failed { code, .. } => match *code {
            tidemark::ENODEV | tidemark::ENOENT => Status::not_found(msg),
            tidemark::EEXIST => Status::already_exists(msg),
            tidemark::ENOSPC => Status::resource_exhausted(msg),
            tidemark::EBUSY => Status::failed_precondition(msg),
            tidemark::METHOD_NOT_FOUND => Status::unimplemented(msg),
            tidemark::INVALID_PARAMS => Status::invalid_argument(msg),
            _ => Status::internal(msg),
        },
    }
}
