//! Daemon startup and shutdown, shared by `tidemarkd` and the benchmarks.

pub mod check;
mod cli;

pub use cli::main;

use crate::config::{Config, DEFAULT_CONFIG};
use crate::metrics::MetricsServer;
use crate::module::Ctx;
use crate::reactor::{ReactorOptions, Reactors};
use crate::rpc::RpcServer;
use crate::target::Target;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// The panic policy of `tidemarkd`: **a panic aborts the process.** The hook logs the panic
/// (message, location, thread, backtrace) at ERROR and aborts, so the supervisor (systemd
/// `Restart=on-failure`) starts a fresh daemon. Why not unwind: a panic ends only the thread it
/// happens on, and a reactor thread that ends takes its connections, its extent-lock shard and
/// its message ring with it while the rest of the process answers as if all were well; a
/// panicking RPC handler leaks its client slot. Tearing down just the failed task would need
/// every lock and slot it held released on unwind. A restart costs nothing acknowledged: host
/// writes are on the devices when acknowledged and sealed snapshots are on media, exactly as
/// after `kill -9` (tests/panic_policy.rs checks both).
pub fn install_panic_policy() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let msg = info.payload_as_str().unwrap_or("<non-string payload>");
        let at = info.location().map_or_else(|| "<unknown location>".to_string(), |l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        let bt = std::backtrace::Backtrace::force_capture();
        log::error!("panic in thread '{name}' at {at}: {msg}; aborting so that the supervisor restarts the daemon\n{bt}");
        log::logger().flush();
        std::process::abort();
    }));
}

/// The environment variable that adds the test-only RPC methods (`TIDEMARK_TEST_HOOKS=1`).
pub const TEST_HOOKS_ENV: &str = "TIDEMARK_TEST_HOOKS";

/// Whether the test-only methods exist: only when the daemon runs with `TIDEMARK_TEST_HOOKS=1`;
/// without it they do not (and `rpc_get_methods` does not list them).
fn test_hooks_enabled() -> bool {
    let on = std::env::var_os(TEST_HOOKS_ENV).is_some_and(|v| v == "1");
    if on {
        log::warn!("{TEST_HOOKS_ENV}=1: test-only RPC methods are enabled");
    }
    on
}

crate::register_module! {
    name: "test_hooks",
    order: 1000,
    enabled: test_hooks_enabled,
    methods: [
        (
            "test_inject_panic",
            test_inject_panic, InjectPanic,
            "Test only: {where: \"reactor\" | \"rpc\", core?} panics in a task on reactor core (default 0) or in the RPC handler.",
            []
        ),
    ],
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct InjectPanic {
    #[serde(rename = "where")]
    place: String,
    #[serde(default)]
    core: usize,
}

fn test_inject_panic(t: &Ctx, p: Option<serde_json::Value>) -> Result<serde_json::Value, crate::rpc::RpcError> {
    let p: InjectPanic = crate::rpc::parse(p)?;
    match p.place.as_str() {
        "rpc" => panic!("injected panic in an RPC handler (test hook)"),
        "reactor" if p.core < t.reactors.core_count() => {
            t.reactors.send(p.core, || crate::reactor::spawn_detached(async { panic!("injected panic in a reactor task (test hook)") }));
            Ok(serde_json::json!(true))
        }
        _ => Err(crate::rpc::RpcError::invalid_params(format!("where must be \"rpc\" or \"reactor\" with core below {}", t.reactors.core_count()))),
    }
}

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
            target.call_from_config(&call.method, params).map_err(|e| format!("{section}[{i}] ({}): {}", call.method, e.message))?;
        }
    }
    Ok(())
}

/// Where the running configuration came from, so that SIGHUP can read it again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Tells the service manager (systemd's `Type=notify`) how the daemon is doing; a no-op when
/// it was not started by one (no NOTIFY_SOCKET).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify the service manager: {e}");
    }
}

/// SIGHUP (`systemctl reload`): reads the configuration again and applies what can change
/// while running (today `daemon.log_level`); other changes are named and wait for a restart,
/// and an invalid file changes nothing.
fn reload(source: &ConfigSource, running: &Config) {
    notify(&[sd_notify::NotifyState::Reloading, sd_notify::NotifyState::monotonic_usec_now().unwrap_or(sd_notify::NotifyState::Status("reloading"))]);
    match load_config(source.path.as_deref(), &source.overrides) {
        Err(e) => log::error!("reload: configuration not applied: {e}"),
        Ok(new) => {
            let level = new.log_level().unwrap_or(log::LevelFilter::Info);
            if std::env::var_os("RUST_LOG").is_none() {
                log::set_max_level(level);
            }
            log::info!("reload: log level {level}");
            let mut same = new.clone();
            same.daemon.log_level = running.daemon.log_level.clone();
            if same.to_toml().ok() != running.to_toml().ok() {
                log::warn!("reload: the configuration has other changes; they take effect at the next restart");
            }
        }
    }
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Runs the daemon until SIGINT/SIGTERM or `spdk_kill_instance`; returns the exit code.
pub fn run(config: Config) -> i32 {
    run_from(config, ConfigSource::default())
}

/// [`run`], with SIGHUP re-reading `source`.
pub fn run_from(config: Config, source: ConfigSource) -> i32 {
    let socket = config.rpc.socket.clone();
    // Bind first: a second daemon on the same socket must fail before touching anything.
    let listener = match crate::rpc::bind_socket(&socket) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot listen on RPC socket {}: {e}", socket.display());
            return 1;
        }
    };
    let signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP]) {
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
    // Sparse files fill their file system only later, under load: say so now.
    crate::bdevs::uring::space::warn_if_sparse_files_can_outgrow(&target);
    let metrics = if metrics_addr.is_empty() {
        None
    } else {
        let addr = metrics_addr.parse().expect("validated by Config::parse");
        let t = target.clone();
        match MetricsServer::start(addr, std::sync::Arc::new(move |out: &mut crate::metrics::MetricsOut<'_>| crate::module::metrics::encode(&t, out))) {
            Ok(m) => Some(m),
            Err(e) => return fail(e, reactors, &target),
        }
    };
    let rpc = match RpcServer::start(listener, socket.clone(), target.config.rpc.clone(), target.clone()) {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start RPC server: {e}"), reactors, &target),
    };
    log::info!("tidemarkd ready: RPC on {}", socket.display());
    // Every listener (RPC, metrics, the configuration's NVMe/TCP and iSCSI portals) is bound
    // by now: a supervisor may start what depends on the target.
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);
    // Signals and spdk_kill_instance both end in request_shutdown.
    let handle = signals.handle();
    let t = target.clone();
    let running = target.config.clone();
    let sig_thread = std::thread::spawn(move || {
        let mut signals = signals;
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                reload(&source, &running);
                continue;
            }
            log::info!("signal {sig}: shutting down");
            t.request_shutdown();
            break;
        }
    });
    target.wait_shutdown();
    notify(&[sd_notify::NotifyState::Stopping]);
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
