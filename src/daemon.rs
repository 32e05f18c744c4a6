//! Daemon startup and shutdown, shared by `tidemarkd` and the benchmarks.

use crate::config::{Config, DEFAULT_CONFIG};
use crate::metrics::MetricsServer;
use crate::reactor::{ReactorOptions, Reactors};
use crate::rpc::RpcServer;
use crate::target::Target;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Command-line overrides of the configuration.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub cpumask: Option<String>,
    pub rpc_socket: Option<PathBuf>,
    pub metrics: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub poll_mode: Option<crate::reactor::PollMode>,
}

/// Loads `path` (or the embedded default) and applies the overrides.
pub fn load_config(path: Option<&std::path::Path>, o: &Overrides) -> Result<Config, String> {
    let mut c = match path {
        Some(p) => Config::load(p)?,
        None => Config::parse(DEFAULT_CONFIG).map_err(|e| format!("embedded default config: {e}"))?,
    };
    if let Some(m) = &o.cpumask {
        c.reactor.cpumask = Some(m.clone());
        c.reactor.cores = None;
    }
    if let Some(s) = &o.rpc_socket {
        c.rpc.socket = s.clone();
    }
    if let Some(m) = &o.metrics {
        c.metrics.listen = m.clone();
    }
    if let Some(d) = &o.data_dir {
        c.daemon.data_dir = d.clone();
    }
    if let Some(p) = o.poll_mode {
        c.reactor.poll_mode = p;
    }
    // Re-validate: an override may be as wrong as a file.
    let text = c.to_toml()?;
    Config::parse(&text).map_err(|e| format!("command line: {e}"))
}

/// Starts the reactors and builds the target, without applying the configuration's calls.
pub fn start_target(config: Config) -> Result<(Reactors, Arc<Target>), String> {
    let cpus = config.cpus()?;
    let dir = &config.daemon.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    crate::bdev::set_pool_bytes(config.daemon.buffer_pool_mb << 20);
    let budget = match config.daemon.buffer_budget_mb {
        Some(mb) => mb << 20,
        None => crate::bdev::budget::default_total(crate::bdev::budget::mem_total()),
    };
    crate::bdev::budget::set_buffer_budget(budget, config.daemon.connection_buffer_mb << 20);
    log::info!("buffer budget: {} MiB in total, {} MiB per connection", budget >> 20, config.daemon.connection_buffer_mb);
    crate::reactor::set_fd_reserve(config.daemon.fd_reserve);
    let opts = ReactorOptions { cpus, poll_mode: config.reactor.poll_mode, idle_us: config.reactor.idle_us, pin: true };
    let reactors = Reactors::start(&opts).map_err(|e| format!("cannot start reactors: {e}"))?;
    let target = Arc::new(Target::new(reactors.handle(), config));
    Ok((reactors, target))
}

/// Applies every call of the configuration's subsystem sections, in order. The error names
/// the call (`bdev[2] (bdev_malloc_create)`) and the problem.
pub fn apply_config(target: &Target) -> Result<(), String> {
    for (section, calls) in target.config.sections() {
        for (i, call) in calls.iter().enumerate() {
            let params = if call.params.is_null() { None } else { Some(call.params.clone()) };
            crate::rpc::call(target, &call.method, params).map_err(|e| format!("{section}[{i}] ({}): {}", call.method, e.message))?;
        }
    }
    Ok(())
}

/// Runs the daemon until SIGINT/SIGTERM or `spdk_kill_instance`; returns the exit code.
pub fn run(config: Config) -> i32 {
    let socket = config.rpc.socket.clone();
    // Bind first: a second daemon on the same socket must fail before touching anything.
    let listener = match crate::rpc::bind_socket(&socket) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot listen on RPC socket {}: {e}", socket.display());
            return 1;
        }
    };
    let signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let metrics_addr = config.metrics.listen.clone();
    let (reactors, target) = match start_target(config) {
        Ok(x) => x,
        Err(e) => {
            log::error!("{e}");
            let _ = std::fs::remove_file(&socket);
            return 1;
        }
    };
    let fail = |msg: String, reactors: Reactors, target: &Arc<Target>| {
        log::error!("{msg}");
        target.shutdown();
        reactors.stop();
        let _ = std::fs::remove_file(&socket);
        1
    };
    if let Err(e) = apply_config(&target) {
        return fail(format!("config: {e}"), reactors, &target);
    }
    let metrics = if metrics_addr.is_empty() {
        None
    } else {
        let addr = metrics_addr.parse().expect("validated by Config::parse");
        match MetricsServer::start(addr, target.clone()) {
            Ok(m) => Some(m),
            Err(e) => return fail(e, reactors, &target),
        }
    };
    let rpc = match RpcServer::start(listener, socket.clone(), target.clone()) {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start RPC server: {e}"), reactors, &target),
    };
    log::info!("tidemarkd ready: RPC on {}", socket.display());
    // Signals and spdk_kill_instance both end in request_shutdown.
    let handle = signals.handle();
    let t = target.clone();
    let sig_thread = std::thread::spawn(move || {
        let mut signals = signals;
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: shutting down");
            t.request_shutdown();
        }
    });
    target.wait_shutdown();
    handle.close();
    let _ = sig_thread.join();
    rpc.stop();
    target.shutdown();
    if let Some(m) = metrics {
        m.stop();
    }
    reactors.stop();
    log::info!("tidemarkd stopped");
    0
}
