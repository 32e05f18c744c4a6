//! tidemarkd's command line: the `main` of the daemon, a library function so that a test build
//! of the daemon with extra modules linked in (examples/tidemarkd-test-modules) is this same
//! program.

use crate::daemon::{self, Overrides};
use crate::reactor::PollMode;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "tidemarkd", version, about = "tidemark block storage target (NVMe/TCP, iSCSI)")]
struct Args {
    /// TOML configuration; without it the embedded default (config/default.toml) is used.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// SPDK JSON configuration (what SPDK's save_config writes): its bdev, nvmf and iscsi
    /// calls build the target; settings come from --config (which then must have no calls),
    /// else the defaults. SPDK tuning methods tidemark does without are skipped with a log line.
    #[arg(long = "json")]
    json: Option<PathBuf>,
    /// Reactor core mask, e.g. 0x2 (overrides [reactor] in the config).
    #[arg(short = 'm', long = "cpumask")]
    cpumask: Option<String>,
    /// JSON-RPC socket path.
    #[arg(short = 'r', long = "rpc-socket")]
    rpc_socket: Option<PathBuf>,
    /// Prometheus endpoint address ("" disables it).
    #[arg(long = "metrics")]
    metrics: Option<String>,
    /// Data directory for file-backed volumes.
    #[arg(long = "data-dir")]
    data_dir: Option<PathBuf>,
    /// Reactor idle policy: busy or adaptive.
    #[arg(long = "poll-mode", value_parser = parse_mode)]
    poll_mode: Option<PollMode>,
    /// Check the configuration and exit: settings, then every call against a scratch target
    /// (temporary data directory, nothing bound, devices only checked to exist). Exit 1 with
    /// the key of each call rejected.
    #[arg(long = "check-config")]
    check_config: bool,
    /// Print the embedded default configuration and exit.
    #[arg(long = "print-default-config")]
    print_default_config: bool,
}

fn parse_mode(s: &str) -> Result<PollMode, String> {
    match s {
        "busy" => Ok(PollMode::Busy),
        "adaptive" => Ok(PollMode::Adaptive),
        _ => Err(format!("{s:?} is not busy or adaptive")),
    }
}

/// Runs `tidemarkd` with the process's arguments and exits.
pub fn main() {
    // RUST_LOG, when set, decides alone. Otherwise tidemark's own messages may be raised to
    // trace at run time (`daemon.log_level`, re-read on SIGHUP) through log's global level,
    // while other crates stay at info.
    let rust_log = std::env::var_os("RUST_LOG").is_some();
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if !rust_log {
        logger.filter_module("tidemark", log::LevelFilter::Trace);
    }
    logger.format_timestamp_micros().init();
    // Before anything else runs: a panic anywhere aborts the daemon (see the function's doc).
    daemon::install_panic_policy();
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", crate::config::DEFAULT_CONFIG);
        return;
    }
    let o = Overrides { cpumask: args.cpumask, rpc_socket: args.rpc_socket, metrics: args.metrics, data_dir: args.data_dir, poll_mode: args.poll_mode };
    let mut config = match daemon::load_config(args.config.as_deref(), &o) {
        Ok(c) => c,
        Err(e) => {
            let src = args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "default config".into());
            eprintln!("tidemarkd: invalid configuration ({src}): {e}");
            std::process::exit(1);
        }
    };
    if let Some(path) = &args.json {
        if args.config.is_none() {
            // The embedded default's settings, without its volume.
            config.bdev.clear();
            config.nvmf.clear();
            config.iscsi.clear();
        }
        let loaded = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| config.set_calls_from_spdk_json(&text, crate::module::is_method));
        if let Err(e) = loaded {
            eprintln!("tidemarkd: invalid SPDK JSON configuration ({}): {e}", path.display());
            std::process::exit(1);
        }
    }
    if args.check_config {
        // Quiet: the scratch target's own log lines are not what the user asked for.
        if !rust_log {
            log::set_max_level(log::LevelFilter::Warn);
        }
        match daemon::check::check(&config) {
            Ok(calls) => println!("configuration is valid ({calls} calls checked against a scratch target)"),
            Err(problems) => {
                for p in &problems {
                    eprintln!("tidemarkd: invalid configuration: {p}");
                }
                std::process::exit(1);
            }
        }
        return;
    }
    if !rust_log {
        log::set_max_level(config.log_level().unwrap_or(log::LevelFilter::Info));
    }
    std::process::exit(daemon::run_from(config, daemon::ConfigSource { path: args.config, overrides: o }));
}
