//! The CSI node service, first slice: who the node is (its host NQN, the volume's subsystem
//! lets it in) and where it is. Staging (nvme connect, mkfs, mount) comes in a later slice, so
//! no node capability is advertised yet and those calls answer UNIMPLEMENTED.

use bpfman_csi::v1::node_server::Node;
use bpfman_csi::v1::*;
use std::collections::BTreeMap;
use tonic::{Request, Response, Status};

pub struct NodeService {
    pub host_nqn: String,
    pub topology: BTreeMap<String, String>,
    pub max_volumes: i64,
}

const LATER: &str = "node staging and publishing are not implemented yet (no STAGE_UNSTAGE_VOLUME capability)";

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(&self, _: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(LATER))
    }

    async fn node_unstage_volume(&self, _: Request<NodeUnstageVolumeRequest>) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(LATER))
    }

    async fn node_publish_volume(&self, _: Request<NodePublishVolumeRequest>) -> Result<Response<NodePublishVolumeResponse>, Status> {
        Err(Status::unimplemented(LATER))
    }

    async fn node_unpublish_volume(&self, _: Request<NodeUnpublishVolumeRequest>) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(LATER))
    }

    async fn node_get_volume_stats(&self, _: Request<NodeGetVolumeStatsRequest>) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented(LATER))
    }

    async fn node_expand_volume(&self, _: Request<NodeExpandVolumeRequest>) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(LATER))
    }

    async fn node_get_capabilities(&self, _: Request<NodeGetCapabilitiesRequest>) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: Vec::new() }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        let accessible_topology =
            (!self.topology.is_empty()).then(|| Topology { segments: self.topology.iter().map(|(k, v)| (k.clone(), v.clone())).collect() });
        Ok(Response::new(NodeGetInfoResponse { node_id: self.host_nqn.clone(), max_volumes_per_node: self.max_volumes, accessible_topology }))
    }
}
