//! tidemark-csi: the Kubernetes CSI driver of tidemark. `--mode controller` manages volumes and
//! snapshots on the tidemark nodes of its config over JSON-RPC; `--mode node` runs on each
//! Kubernetes node. Both serve CSI's gRPC on a Unix socket (or, as a testing aid, on TCP).

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
    /// The gRPC endpoint: unix:///path/to/csi.sock, or tcp://ADDR:PORT (a testing aid: the
    /// CSI sidecars use the Unix socket, and TCP has no access control).
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
    let endpoint = Endpoint::parse(&args.endpoint).unwrap_or_else(|e| fail(&e));
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
            let node = node::NodeService::new(host_nqn, args.topology.into_iter().collect::<BTreeMap<_, _>>(), args.max_volumes);
            identity = IdentityServer::new(identity::IdentityService { nodes: None });
            router = tonic::transport::Server::builder().add_service(identity).add_service(NodeServer::new(node));
        }
    }
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap_or_else(|e| fail(&format!("signal: {e}")));
        // On a signal the server stops at once, without waiting for the sidecars' connections
        // to close (they never do): a call cut short is retried, and every call is idempotent.
        let r = match &endpoint {
            Endpoint::Unix(path) => {
                // A socket left by a previous run (kubelet restarts the plugin in place).
                if path.exists() {
                    std::fs::remove_file(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
                }
                let listener = tokio::net::UnixListener::bind(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
                log::info!("tidemark-csi {:?} serving on {}", args.mode, path.display());
                tokio::select! {
                    r = router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)) => r,
                    _ = term.recv() => Ok(()),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            }
            Endpoint::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| fail(&format!("{addr}: {e}")));
                log::info!("tidemark-csi {:?} serving on tcp://{addr}", args.mode);
                tokio::select! {
                    r = router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)) => r,
                    _ = term.recv() => Ok(()),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            }
        };
        if let Endpoint::Unix(path) = &endpoint {
            let _ = std::fs::remove_file(path);
        }
        if let Err(e) = r {
            fail(&format!("serving: {e}"));
        }
    });
}

/// Where the gRPC server listens.
#[derive(Debug, PartialEq)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(p) = s.strip_prefix("unix://").filter(|p| !p.is_empty()) {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://").filter(|a| a.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())) {
            return Ok(Endpoint::Tcp(a.to_string()));
        }
        Err(format!("--endpoint {s}: expected unix:///path or tcp://ADDR:PORT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::parse("unix:///csi/csi.sock"), Ok(Endpoint::Unix("/csi/csi.sock".into())));
        assert_eq!(Endpoint::parse("tcp://0.0.0.0:10000"), Ok(Endpoint::Tcp("0.0.0.0:10000".into())));
        assert_eq!(Endpoint::parse("tcp://[::1]:10000"), Ok(Endpoint::Tcp("[::1]:10000".into())));
        for bad in ["unix://", "tcp://host", "tcp://host:x", "/csi/csi.sock", "http://x:1"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
