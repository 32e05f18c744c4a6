//! Support for integration tests: start the real `tidemarkd` on a private socket, data
//! directory and free ports, talk JSON-RPC to it, and always stop it (by PID) when the test
//! ends, passing or failing.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TIDEMARKD: &str = env!("CARGO_BIN_EXE_tidemarkd");
pub const TIDEMARK: &str = env!("CARGO_BIN_EXE_tidemark");

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics_port: u16,
    pub log: PathBuf,
    /// Extra environment of every start of this daemon (restarts too).
    env: Vec<(String, String)>,
}

/// A JSON-RPC error as the daemon sent it.
#[derive(Debug, Clone)]
pub struct RpcFailure {
    pub code: i64,
    pub message: String,
}

impl Daemon {
    /// Starts tidemarkd with `config` (TOML text; `{data_dir}`, `{socket}` and `{metrics}` are
    /// replaced with this daemon's private values) and waits until its RPC socket answers.
    pub fn start(config: &str) -> Daemon {
        Self::start_with_args(config, &[])
    }

    pub fn start_with_args(config: &str, args: &[&str]) -> Daemon {
        Self::start_with(config, args, &[], |_| {})
    }

    /// Starts tidemarkd with extra environment variables (kept for restarts).
    pub fn start_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_with(config, args, env, |_| {})
    }

    /// As [`Daemon::start_with_env`], with `adjust` applied to the daemon's command first
    /// (resource limits, say).
    pub fn start_with(config: &str, args: &[&str], env: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Daemon {
        Self::start_program(Path::new(TIDEMARKD), config, args, env, adjust)
    }

    /// As [`Daemon::start_with`], running `program` (a build of the daemon with more modules
    /// linked in, tests/modules.rs) instead of `tidemarkd`.
    pub fn start_program(program: &Path, config: &str, args: &[&str], env: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Daemon {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let dir = tempfile::Builder::new().prefix("tidemark-test").tempdir().expect("tempdir");
        let socket = dir.path().join("rpc.sock");
        let metrics_port = free_port();
        let data = dir.path().join("data");
        let text = config
            .replace("{data_dir}", &data.display().to_string())
            .replace("{socket}", &socket.display().to_string())
            .replace("{metrics}", &format!("127.0.0.1:{metrics_port}"));
        let cfg = dir.path().join("tidemark.toml");
        std::fs::write(&cfg, text).expect("write config");
        let log = dir.path().join("tidemarkd.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(program);
        adjust(&mut cmd);
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .arg("--rpc-socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(logf.try_clone().expect("dup log")))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn tidemarkd");
        let mut d = Daemon { child: Some(child), dir, socket, metrics_port, log, env };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("tidemarkd exited during startup ({status}):\n{}", self.log_text());
                }
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tidemarkd did not open its RPC socket in 20 s:\n{}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("daemon already stopped")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Calls `method`; Ok(result) or Err(the JSON-RPC error).
    pub fn try_rpc(&self, method: &str, params: Value) -> Result<Value, RpcFailure> {
        let s = UnixStream::connect(&self.socket).expect("connect to the RPC socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        (&s).write_all(req.to_string().as_bytes()).expect("send");
        let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<Value>().next().expect("an answer").expect("JSON answer");
        if let Some(e) = resp.get("error") {
            return Err(RpcFailure { code: e["code"].as_i64().unwrap_or(0), message: e["message"].as_str().unwrap_or("").to_string() });
        }
        Ok(resp["result"].clone())
    }

    /// Calls `method` and panics (with the daemon's log) on error.
    pub fn rpc(&self, method: &str, params: Value) -> Value {
        match self.try_rpc(method, params.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{method} {params} failed: {e:?}\n{}", self.log_text()),
        }
    }

    /// Runs the `tidemark` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(TIDEMARK).arg("-s").arg(&self.socket).args(args).output().expect("run tidemark")
    }

    /// GETs the metrics page.
    /// The scrape as Prometheus gets it (OpenMetrics, asked for in the Accept header).
    pub fn metrics(&self) -> String {
        http_get_accept(&format!("127.0.0.1:{}", self.metrics_port), "/metrics", "application/openmetrics-text; version=1.0.0")
    }

    /// The scrape as curl or promtool gets it (the classic text format, no Accept header).
    pub fn metrics_text(&self) -> String {
        http_get(&format!("127.0.0.1:{}", self.metrics_port), "/metrics")
    }

    /// Sends SIGTERM and waits for the exit status (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill on the PID of a child we spawned and have not reaped. A frozen daemon
        // (`freeze`) is let go first, or it would not act on SIGTERM.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGCONT);
            libc::kill(c.id() as i32, libc::SIGTERM)
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (at most `timeout`) for the daemon to exit on its own and reaps it; None if it is
    /// still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.as_mut()?.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGSTOP: a hung node (its sockets stay open, nothing answers).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a frozen daemon go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: kill on the PID of a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Starts a new daemon process on the same directory, socket and config (after a stop or
    /// a crash).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon before restarting it");
        let cfg = self.dir.path().join("tidemark.toml");
        let logf = std::fs::OpenOptions::new().append(true).open(&self.log).expect("log");
        let child = Command::new(TIDEMARKD)
            .arg("--config")
            .arg(&cfg)
            .arg("--rpc-socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--metrics")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(logf.try_clone().expect("dup")))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn tidemarkd");
        self.child = Some(child);
        self.wait_ready();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() && self.terminate(Duration::from_secs(10)).is_none() {
            eprintln!("tidemarkd did not stop on SIGTERM within 10 s; killed");
        }
    }
}

/// A minimal HTTP/1.0 GET (the metrics endpoint is the only HTTP server we talk to).
/// Runs qemu-io (QEMU's raw driver, `opts` before the commands: `-r` for a read-only open)
/// with `cmds` on `url` (`iscsi://...`), bounded by 120 s: (exit status success, stdout and
/// stderr). qemu-io exits 0 when a command fails; callers look for "failed" in the text.
pub fn run_qemu_io(url: &str, opts: &[&str], cmds: &[String]) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["120", "qemu-io", "-f", "raw"]).args(opts);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = c.arg(url).output().expect("run qemu-io");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

pub fn http_get(addr: &str, path: &str) -> String {
    http_get_accept(addr, path, "*/*")
}

pub fn http_get_accept(addr: &str, path: &str, accept: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => out,
    }
}

/// The configuration most tests start from: one reactor, adaptive, no bdevs.
pub const MINIMAL_CONFIG: &str = r#"
[daemon]
data_dir = "{data_dir}"
buffer_pool_mb = 16
[reactor]
cores = [0]
poll_mode = "adaptive"
[rpc]
socket = "{socket}"
[metrics]
listen = "{metrics}"
"#;

/// Whether `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd} >/dev/null 2>&1")).status().map(|s| s.success()).unwrap_or(false)
}

/// Whether the clients a test drives are installed (by tests/iscsi/deps.sh). Missing ones fail
/// the test, naming the script, unless `skip_var=1` says to skip this area on purpose (false:
/// skip).
pub fn require_tools(cmds: &[&str], skip_var: &str) -> bool {
    let missing: Vec<&&str> = cmds.iter().filter(|c| !have(c)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var(skip_var).as_deref() == Ok("1") {
        eprintln!("skipping: {missing:?} missing and {skip_var}=1");
        return false;
    }
    panic!("{missing:?} not installed: run tests/iscsi/deps.sh (or set {skip_var}=1 to skip)");
}

/// Where tests/spdk/deps.sh installs SPDK's Python clients (PyPI `spdk`) when they are not
/// on PATH.
pub const SPDK_VENV_BIN: &str = "/opt/tidemark-spdk/bin";

/// A tool of SPDK's Python package (`spdk-rpc`, `spdk-cli`): on PATH or in [`SPDK_VENV_BIN`].
pub fn spdk_tool(name: &str) -> Option<PathBuf> {
    if have(name) {
        return Some(PathBuf::from(name));
    }
    let p = Path::new(SPDK_VENV_BIN).join(name);
    p.exists().then_some(p)
}

/// `spdk-rpc`; missing fails the test naming tests/spdk/deps.sh unless TIDEMARK_SKIP_SPDK=1
/// says to skip (None).
pub fn require_spdk_rpc() -> Option<PathBuf> {
    let rpc = spdk_tool("spdk-rpc");
    if rpc.is_none() {
        if std::env::var("TIDEMARK_SKIP_SPDK").as_deref() == Ok("1") {
            eprintln!("skipping: spdk-rpc missing and TIDEMARK_SKIP_SPDK=1");
            return None;
        }
        panic!("spdk-rpc not installed: run tests/spdk/deps.sh (or set TIDEMARK_SKIP_SPDK=1 to skip)");
    }
    rpc
}

/// Path of a file next to the test sources (`tests/...`).
pub fn tests_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests"))
}

/// What a valid scrape holds: the number of samples, and per family its type and the label
/// names its samples carry (`le` included).
pub struct Scrape {
    pub samples: usize,
    pub families: std::collections::HashMap<String, (String, std::collections::BTreeSet<String>)>,
}

/// Checks OpenMetrics text the way a scraper reads it: every family declared once, every
/// sample under its family's declaration with a known suffix, well-formed labels, a numeric
/// value, and `# EOF` last. Err names the first offending line.
pub fn check_openmetrics(text: &str) -> Result<Scrape, String> {
    let mut families = std::collections::HashMap::<String, (String, std::collections::BTreeSet<String>)>::new();
    let mut current: Option<(String, String)> = None;
    let mut samples = 0;
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        return Err("the text does not end with # EOF".into());
    }
    for (i, line) in lines[..lines.len() - 1].iter().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            match kw {
                "TYPE" => {
                    let ty = parts.next().unwrap_or("").to_string();
                    if !["counter", "gauge", "histogram", "info", "summary", "unknown", "stateset", "gaugehistogram"].contains(&ty.as_str()) {
                        return Err(at("unknown type"));
                    }
                    if families.insert(name.to_string(), (ty.clone(), Default::default())).is_some() {
                        return Err(at("family declared twice"));
                    }
                    current = Some((name.to_string(), ty));
                }
                "HELP" | "UNIT" => {}
                "EOF" => return Err(at("# EOF before the end")),
                _ => return Err(at("unknown comment")),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        value.parse::<f64>().map_err(|_| at("value is not a number"))?;
        let mut label_names = Vec::new();
        let name = match name_labels.split_once('{') {
            Some((n, labels)) => {
                let body = labels.strip_suffix('}').ok_or_else(|| at("labels not closed"))?;
                for pair in split_labels(body) {
                    let (k, v) = pair.split_once('=').ok_or_else(|| at("label without ="))?;
                    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || !(v.starts_with('"') && v.ends_with('"') && v.len() >= 2) {
                        return Err(at("bad label"));
                    }
                    label_names.push(k.to_string());
                }
                n
            }
            None => name_labels,
        };
        let (family, ty) = current.as_ref().ok_or_else(|| at("sample before any # TYPE"))?;
        let suffix = name.strip_prefix(family.as_str()).ok_or_else(|| at("sample outside its family"))?;
        let allowed: &[&str] = match ty.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        if !allowed.contains(&suffix) {
            return Err(at("suffix not allowed for the family's type"));
        }
        if let Some(f) = families.get_mut(family.as_str()) {
            f.1.extend(label_names);
        }
        samples += 1;
    }
    Ok(Scrape { samples, families })
}

/// Splits `k="v",k2="v,2"` at the commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        out.push(&body[start..]);
    }
    out
}

/// A daemon with something to report in every subsystem: bdevs, a CoW volume with a sealed
/// snapshot `s1`, a mirror, an NVMe/TCP and an iSCSI export, and a finished backup job.
pub fn start_with_every_subsystem() -> Daemon {
    // Every subsystem with something to report: bdevs, a CoW volume with a snapshot, a mirror,
    // an NVMe/TCP and an iSCSI export, the backup service.
    let d = Daemon::start(MINIMAL_CONFIG);
    for (name, blocks) in [("base", 16384), ("store", 20480), ("a", 8192), ("b", 8192)] {
        d.rpc("bdev_malloc_create", json!({"name": name, "num_blocks": blocks, "block_size": 512}));
    }
    d.rpc("bdev_cow_create", json!({"name": "vol", "base_bdev": "base", "store_bdev": "store", "grain_kb": 64}));
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "s1", "wait_sealed": true}));
    d.rpc("bdev_raid_create", json!({"name": "m", "raid_level": "raid1", "base_bdevs": ["a", "b"]}));
    let nqn = "nqn.2016-06.io.tidemark:metrics";
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": nqn, "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "vol"}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": free_port().to_string()}}),
    );
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": free_port().to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "metrics", "luns": [{"bdev_name": "m", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8}),
    );
    let job = d.rpc("backup_start", json!({"source": "s1", "path": "s1.img"}));
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.rpc("backup_get", json!({"id": id}))[0]["state"] == "in_progress" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

/// SPDK's folder (`SPDK_DIR`, relative to the repository as tests/run exports it) when it has
/// every one of `files` (e.g. "bin/bdevperf"); None, saying the test skipped and why, otherwise.
pub fn spdk_dir(files: &[&str]) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("SPDK_DIR") else {
        eprintln!("SKIPPED: SPDK_DIR is not set (point it at an SPDK build with {}, e.g. ../shared/peers/spdk-v25.09)", files.join(", "));
        return None;
    };
    let mut dir = PathBuf::from(dir);
    if dir.is_relative() {
        dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    }
    for f in files {
        if !dir.join(f).exists() {
            eprintln!("SKIPPED: SPDK_DIR={} has no {f}", dir.display());
            return None;
        }
    }
    Some(dir)
}

/// The core SPDK's processes poll on: the second one when there is one (tidemark has core 0).
pub fn client_mask() -> &'static str {
    if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) > 1 {
        "0x2"
    } else {
        "0x1"
    }
}

/// Writes `secret` to `dir/name` readable by its owner only (tidemark's and SPDK's keyrings
/// insist).
pub fn key_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).expect("write key file");
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key file");
    p
}

impl Daemon {
    /// The value of an unlabelled metric (`name` as scraped, e.g. `..._total`).
    pub fn metric(&self, name: &str) -> f64 {
        let m = self.metrics_text();
        m.lines()
            .find(|l| l.split(['{', ' ']).next() == Some(name))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics:\n{m}"))
    }
}

/// Polls `q` until the completion of command `cid` arrives (10 s at most).
pub fn wait_completion(q: &mut tidemark::nvmf::initiator::Qpair, cid: u16) -> tidemark::nvmf::initiator::Completion {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        q.poll(&mut out).expect("the queue pair answers");
        if let Some(c) = out.iter().find(|c| c.cid == cid) {
            return *c;
        }
        assert!(Instant::now() < deadline, "command {cid} did not complete");
        std::thread::sleep(Duration::from_millis(5));
    }
}
