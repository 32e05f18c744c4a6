//! The daemon's TOML configuration: settings sections, then per subsystem the list of RPC
//! calls that build the target (the same operations as the JSON-RPC API, as in SPDK's JSON
//! config). `save_config` writes the running target back in the same form.

pub mod check;
pub mod spdk;

use crate::reactor::PollMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub reactor: ReactorSection,
    #[serde(default)]
    pub rpc: RpcSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub backup: BackupSection,
    /// Keys (`keyring_file_add_key`): first, so that the calls after them find their keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyring: Vec<ConfigCall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bdev: Vec<ConfigCall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvmf: Vec<ConfigCall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iscsi: Vec<ConfigCall>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Where file-backed bdevs with relative paths live (created 0700 if missing).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// I/O buffer pool reserved per core, in MiB.
    #[serde(default = "default_pool_mb")]
    pub buffer_pool_mb: u64,
    /// Most verbose log level of tidemark's own messages: error, warn, info, debug or trace
    /// (RUST_LOG, when set, takes precedence). Re-read on SIGHUP (`systemctl reload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Most MiB of I/O buffers that hosts' commands may hold, all connections together (read
    /// data not yet sent, write data being collected or written); beyond it the front ends
    /// push back. Unset: 1 GiB, or a quarter of the machine's memory if that is less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_budget_mb: Option<u64>,
    /// Most MiB of I/O buffers one connection's commands may hold.
    #[serde(default = "default_connection_buffer_mb")]
    pub connection_buffer_mb: u64,
    /// File descriptors kept free of host connections (for the RPC socket, bdev files and
    /// the metrics endpoint): the front ends accept at most RLIMIT_NOFILE minus this.
    #[serde(default = "default_fd_reserve")]
    pub fd_reserve: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorSection {
    /// CPU ids of the reactors (`[1]`); alternatively `cpumask`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<Vec<usize>>,
    /// SPDK-style core mask (`"0x2"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpumask: Option<String>,
    #[serde(default)]
    pub poll_mode: PollMode,
    /// Idle time before an adaptive reactor sleeps, in microseconds.
    #[serde(default = "default_idle_us")]
    pub idle_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcSection {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Largest JSON-RPC request (or batch) in bytes; a larger one is refused and its
    /// connection closed, without buffering it.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    /// Clients served at once; more get `too many RPC clients` (-16).
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Further slots only a local administrator (peer uid 0 or the daemon's uid) may take.
    #[serde(default = "default_admin_clients")]
    pub admin_clients: usize,
    /// A client that sends no request for this long is disconnected.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Longest time to receive one request (from its first byte) or to send one reply.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus endpoint; an empty string disables it.
    #[serde(default = "default_metrics")]
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    /// Where backups are written (relative: under the data directory; created 0700). Backup
    /// paths resolve here, and none may lead out of it (`..`, symlinks).
    #[serde(default = "default_backup_root")]
    pub root: PathBuf,
    /// Absolute directories outside the root that `backup_restore` may also read backups from.
    #[serde(default)]
    pub restore_allowed_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigCall {
    pub method: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
}

impl ConfigCall {
    pub fn new(method: &str, params: Value) -> Self {
        ConfigCall { method: method.to_string(), params }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/tmp/tidemark")
}
fn default_pool_mb() -> u64 {
    32
}
fn default_connection_buffer_mb() -> u64 {
    16
}
fn default_fd_reserve() -> u64 {
    64
}
fn default_idle_us() -> u64 {
    1000
}
fn default_socket() -> PathBuf {
    PathBuf::from("/var/tmp/tidemark.sock")
}
fn default_max_request_bytes() -> u64 {
    4 << 20
}
fn default_max_clients() -> usize {
    64
}
fn default_admin_clients() -> usize {
    2
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_backup_root() -> PathBuf {
    PathBuf::from("backups")
}
fn default_metrics() -> String {
    "127.0.0.1:9464".to_string()
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            data_dir: default_data_dir(),
            buffer_pool_mb: default_pool_mb(),
            buffer_budget_mb: None,
            connection_buffer_mb: default_connection_buffer_mb(),
            fd_reserve: default_fd_reserve(),
            log_level: None,
        }
    }
}
impl Default for ReactorSection {
    fn default() -> Self {
        ReactorSection { cores: None, cpumask: None, poll_mode: PollMode::default(), idle_us: default_idle_us() }
    }
}
impl Default for RpcSection {
    fn default() -> Self {
        RpcSection {
            socket: default_socket(),
            max_request_bytes: default_max_request_bytes(),
            max_clients: default_max_clients(),
            admin_clients: default_admin_clients(),
            idle_timeout_ms: default_idle_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
        }
    }
}
impl Default for BackupSection {
    fn default() -> Self {
        BackupSection { root: default_backup_root(), restore_allowed_dirs: Vec::new() }
    }
}
impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { listen: default_metrics() }
    }
}

impl Config {
    /// Parses a configuration, naming the offending key on error.
    pub fn parse(text: &str) -> Result<Config, String> {
        let de = toml::Deserializer::parse(text).map_err(|e| format!("not valid TOML: {}", e.to_string().trim()))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            format!("key `{path}`: {}", inner.message())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text)
    }

    fn validate(&self) -> Result<(), String> {
        self.cpus()?;
        if self.daemon.buffer_pool_mb == 0 || self.daemon.buffer_pool_mb > 64 * 1024 {
            return Err("key `daemon.buffer_pool_mb`: must be between 1 and 65536".into());
        }
        self.log_level()?;
        if !(4096..=1 << 30).contains(&self.rpc.max_request_bytes) {
            return Err("key `rpc.max_request_bytes`: must be between 4096 and 1073741824".into());
        }
        if !(1..=4096).contains(&self.rpc.max_clients) {
            return Err("key `rpc.max_clients`: must be between 1 and 4096".into());
        }
        if !(1..=64).contains(&self.rpc.admin_clients) {
            return Err("key `rpc.admin_clients`: must be between 1 and 64".into());
        }
        for (key, ms) in [("idle_timeout_ms", self.rpc.idle_timeout_ms), ("request_timeout_ms", self.rpc.request_timeout_ms)] {
            if !(100..=86_400_000).contains(&ms) {
                return Err(format!("key `rpc.{key}`: must be between 100 and 86400000 (a day)"));
            }
        }
        // Each core's share must hold the largest single command (16 MiB).
        let cores = self.cpus()?.len() as u64;
        if let Some(b) = self.daemon.buffer_budget_mb {
            if b < 16 * cores || b > 1 << 30 {
                return Err(format!("key `daemon.buffer_budget_mb`: must be at least 16 per reactor core ({}) and at most 2^30", 16 * cores));
            }
        }
        if self.daemon.connection_buffer_mb == 0 || self.daemon.connection_buffer_mb > 1 << 20 {
            return Err("key `daemon.connection_buffer_mb`: must be between 1 and 1048576".into());
        }
        if self.daemon.fd_reserve < 16 {
            return Err("key `daemon.fd_reserve`: must be at least 16".into());
        }
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| format!("key `metrics.listen`: {:?} is not an address like 127.0.0.1:9464", self.metrics.listen))?;
        }
        if self.backup.root.as_os_str().is_empty() {
            return Err("key `backup.root`: must not be empty".into());
        }
        if let Some(d) = self.backup.restore_allowed_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(format!("key `backup.restore_allowed_dirs`: {} is not an absolute path", d.display()));
        }
        for (section, calls) in self.sections() {
            for (i, c) in calls.iter().enumerate() {
                if c.method.is_empty() {
                    return Err(format!("key `{section}[{i}].method`: must not be empty"));
                }
                if !matches!(c.params, Value::Null | Value::Object(_)) {
                    return Err(format!("key `{section}[{i}].params`: must be a table"));
                }
            }
        }
        Ok(())
    }

    /// `daemon.log_level` as a filter (info when absent).
    pub fn log_level(&self) -> Result<log::LevelFilter, String> {
        match self.daemon.log_level.as_deref() {
            None => Ok(log::LevelFilter::Info),
            Some(l) => match l.parse::<log::LevelFilter>() {
                Ok(f) if f != log::LevelFilter::Off => Ok(f),
                _ => Err(format!("key `daemon.log_level`: {l:?} is not one of error, warn, info, debug, trace")),
            },
        }
    }

    /// The reactor CPUs: `cores`, else `cpumask`, else CPU 0.
    pub fn cpus(&self) -> Result<Vec<usize>, String> {
        let cpus = match (&self.reactor.cores, &self.reactor.cpumask) {
            (Some(_), Some(_)) => return Err("key `reactor`: give either `cores` or `cpumask`, not both".into()),
            (Some(c), None) => c.clone(),
            (None, Some(m)) => crate::reactor::parse_cpumask(m).map_err(|e| format!("key `reactor.cpumask`: {e}"))?,
            (None, None) => vec![0],
        };
        if cpus.is_empty() {
            return Err("key `reactor.cores`: must list at least one CPU".into());
        }
        let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let max = core_affinity::get_core_ids().map(|ids| ids.iter().map(|c| c.id + 1).max().unwrap_or(online)).unwrap_or(online);
        let mut seen = std::collections::HashSet::new();
        for &c in &cpus {
            if c >= max {
                return Err(format!("key `reactor.cores`: CPU {c} does not exist or is not available (this machine has CPUs 0..{})", max - 1));
            }
            if !seen.insert(c) {
                return Err(format!("key `reactor.cores`: CPU {c} is listed twice"));
            }
        }
        Ok(cpus)
    }

    /// The subsystem sections in the order they are applied.
    pub fn sections(&self) -> [(&'static str, &Vec<ConfigCall>); 4] {
        [("keyring", &self.keyring), ("bdev", &self.bdev), ("nvmf", &self.nvmf), ("iscsi", &self.iscsi)]
    }

    pub fn section_mut(&mut self, name: &str) -> Option<&mut Vec<ConfigCall>> {
        match name {
            "keyring" => Some(&mut self.keyring),
            "bdev" => Some(&mut self.bdev),
            "nvmf" => Some(&mut self.nvmf),
            "iscsi" => Some(&mut self.iscsi),
            _ => None,
        }
    }

    /// Takes the calls from an SPDK JSON configuration (`tidemarkd --json`), keeping the
    /// settings. A configuration that has calls already is refused: the target is built from
    /// one file, not a merge of two.
    /// `is_method` tells the target's RPC methods from SPDK methods tidemark does without.
    pub fn set_calls_from_spdk_json(&mut self, text: &str, is_method: impl Fn(&str) -> bool) -> Result<(), String> {
        if self.sections().iter().any(|(_, c)| !c.is_empty()) {
            return Err("the TOML configuration has calls too; give the calls in one file (--config with settings only, or no --config)".into());
        }
        let [keyring, bdev, nvmf, iscsi] = spdk::calls_from_spdk(text, is_method)?;
        self.keyring = keyring;
        self.bdev = bdev;
        self.nvmf = nvmf;
        self.iscsi = iscsi;
        self.validate()
    }

    /// The calls as an SPDK JSON configuration (`save_config {format: "spdk"}`).
    pub fn to_spdk_json(&self) -> Value {
        spdk::to_spdk(&self.sections(), &self.daemon.data_dir)
    }

    /// The configuration as TOML text.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string_pretty(&strip_nulls(serde_json::to_value(self).map_err(|e| e.to_string())?)).map_err(|e| e.to_string())
    }
}

/// TOML has no null: drop null members (they mean "default").
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.metrics.listen, "127.0.0.1:9464");
        assert!(!c.bdev.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[reactor]\nbogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse("[reactor]\nidle_us = \"x\"\n").unwrap_err();
        assert!(e.contains("reactor.idle_us"), "{e}");
        let e = Config::parse("[reactor]\ncores = [999]\n").unwrap_err();
        assert!(e.contains("reactor.cores"), "{e}");
        let e = Config::parse("[[bdev]]\nparams = {}\n").unwrap_err();
        assert!(e.contains("method"), "{e}");
        let e = Config::parse("[metrics]\nlisten = \"nope\"\n").unwrap_err();
        assert!(e.contains("metrics.listen"), "{e}");
        let e = Config::parse("[rpc]\nmax_request_bytes = 10\n").unwrap_err();
        assert!(e.contains("rpc.max_request_bytes"), "{e}");
        let e = Config::parse("[daemon]\nbuffer_budget_mb = 1\n").unwrap_err();
        assert!(e.contains("daemon.buffer_budget_mb"), "{e}");
        let e = Config::parse("[daemon]\nconnection_buffer_mb = 0\n").unwrap_err();
        assert!(e.contains("daemon.connection_buffer_mb"), "{e}");
        let e = Config::parse("[reactor\n").unwrap_err();
        assert!(e.contains("TOML"), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        let t = c.to_toml().unwrap();
        let c2 = Config::parse(&t).unwrap();
        assert_eq!(c.bdev, c2.bdev);
        assert_eq!(c.nvmf, c2.nvmf);
    }
}
