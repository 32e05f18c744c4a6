//! tidemark-csi: the Kubernetes CSI driver of tidemark. `--mode controller` manages volumes and
//! snapshots on the tidemark nodes of its config over JSON-RPC; `--mode node` runs on each
//! Kubernetes node. Both serve CSI's gRPC on a Unix socket.

mod config;
mod controller;
mod identity;
mod names;
mod node;
mod pool;
mod tidemark;

use bpfman_csi::v1::controller_server::ControllerServer;
use bpfman_csi::v1::identity_server::IdentityServer;
use bpfman_csi::v1::node_server::NodeServer;
use clap::{Parser, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    Controller,
    Node,
}

#[derive(Parser, Debug)]
#[command(name = "tidemark-csi", version, about = "Kubernetes CSI driver for tidemark volumes (NVMe/TCP)")]
struct Args {
    /// The plugin to run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The gRPC endpoint: unix:///path/to/csi.sock.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// The driver's TOML config (the tidemark nodes); required in controller mode.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node mode: this host's NVMe host NQN, its node id (default: /etc/nvme/hostnqn).
    #[arg(long)]
    host_nqn: Option<String>,
    /// Node mode: a topology segment of this node, KEY=VALUE (repeatable).
    #[arg(long = "topology", value_parser = segment)]
    topology: Vec<(String, String)>,
    /// Node mode: the most volumes this node takes (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
}

fn segment(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).filter(|(k, _)| !k.is_empty()).ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

fn fail(msg: &str) -> ! {
    eprintln!("tidemark-csi: {msg}");
    std::process::exit(2)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let path = args.endpoint.strip_prefix("unix://").unwrap_or_else(|| fail(&format!("--endpoint {}: only unix:// endpoints are served", args.endpoint)));
    let path = PathBuf::from(path);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    let identity;
    let router;
    match args.mode {
        Mode::Controller => {
            let cfg = args.config.as_deref().unwrap_or_else(|| fail("--config is required in controller mode"));
            let cfg = config::Config::load(cfg).unwrap_or_else(|e| fail(&e));
            let nodes = Arc::new(pool::Nodes::new(cfg));
            identity = IdentityServer::new(identity::IdentityService { nodes: Some(nodes.clone()) });
            router = tonic::transport::Server::builder().add_service(identity).add_service(ControllerServer::new(controller::ControllerService::new(nodes)));
        }
        Mode::Node => {
            let host_nqn = match args.host_nqn {
                Some(n) => n,
                None => std::fs::read_to_string("/etc/nvme/hostnqn")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|e| fail(&format!("--host-nqn not given and /etc/nvme/hostnqn: {e}"))),
            };
            let node = node::NodeService { host_nqn, topology: args.topology.into_iter().collect::<BTreeMap<_, _>>(), max_volumes: args.max_volumes };
            identity = IdentityServer::new(identity::IdentityService { nodes: None });
            router = tonic::transport::Server::builder().add_service(identity).add_service(NodeServer::new(node));
        }
    }
    rt.block_on(async move {
        // A socket left by a previous run (kubelet restarts the plugin in place).
        if path.exists() {
            std::fs::remove_file(&path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
        }
        let listener = tokio::net::UnixListener::bind(&path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
        log::info!("tidemark-csi {:?} serving on {}", args.mode, path.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap_or_else(|e| fail(&format!("signal: {e}")));
        // On a signal the server stops at once, without waiting for the sidecars' connections
        // to close (they never do): a call cut short is retried, and every call is idempotent.
        let r = tokio::select! {
            r = router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)) => r,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        };
        let _ = std::fs::remove_file(&path);
        if let Err(e) = r {
            fail(&format!("serving: {e}"));
        }
    });
}
