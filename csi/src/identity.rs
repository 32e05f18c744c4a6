//! The CSI identity service: the plugin's name and what it offers; ready once a tidemark node
//! answers (controller) or at once (node: it needs no tidemark node to answer NodeGetInfo).

use crate::pool::Nodes;
use bpfman_csi::v1::identity_server::Identity;
use bpfman_csi::v1::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use bpfman_csi::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const DRIVER_NAME: &str = "csi.tidemark.io";

pub struct IdentityService {
    /// The controller's nodes; None in node mode.
    pub nodes: Option<Arc<Nodes>>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(&self, _: Request<GetPluginInfoRequest>) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse { name: DRIVER_NAME.into(), vendor_version: env!("CARGO_PKG_VERSION").into(), manifest: Default::default() }))
    }

    async fn get_plugin_capabilities(&self, _: Request<GetPluginCapabilitiesRequest>) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| PluginCapability { r#type: Some(Type::Service(Service { r#type: t as i32 })) };
        let capabilities = vec![
            svc(service::Type::ControllerService),
            svc(service::Type::VolumeAccessibilityConstraints),
            PluginCapability { r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })) },
        ];
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = match &self.nodes {
            Some(n) => n.any_answers().await,
            None => true,
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
