//! tidemark: the JSON-RPC client of tidemarkd.
//!
//!     tidemark [-s SOCKET] [-t SECONDS] METHOD [--param value ...]
//!     tidemark [-s SOCKET] METHOD --json '{"name": "m0", ...}'
//!     tidemark METHOD --help          the method's parameters (no daemon needed)
//!     tidemark completions bash|zsh|fish
//!     tidemark rpc-reference          docs/rpc.md
//!
//! The methods, their summaries and parameters come from the method table linked into this
//! binary ([`tidemark::module::reference`]), the same one tidemarkd serves.
//!
//! Values are JSON when they parse as JSON (numbers, true/false, arrays, objects) and strings
//! otherwise; dotted names build nested objects (`--listen_address.traddr 127.0.0.1`).

#[path = "tidemark/completions.rs"]
mod completions;
#[path = "tidemark/top.rs"]
mod top;

use serde_json::{json, Map, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::exit;
use std::time::Duration;
use tidemark::module::reference;

const USAGE: &str = "usage: tidemark [-s SOCKET] [-t SECONDS] METHOD [--param value ...] [--json '{...}']
       tidemark [-s SOCKET] backup start --source SNAPSHOT --path FILE [--incremental_from SNAPSHOT] [--max_bandwidth_mb_sec N] [--detach]
       tidemark [-s SOCKET] top [--once] [--interval SECS]   live view: reactors, bdevs, exports, snapshots, jobs
       tidemark [-s SOCKET] backup status [ID] [--wait]
       tidemark backup verify MANIFEST_OR_IMAGE
       tidemark [-s SOCKET] backup restore MANIFEST_OR_IMAGE (--to-file FILE | --to-bdev BDEV)
       tidemark METHOD --help              the method's summary and parameters
       tidemark completions bash|zsh|fish  shell completions, method names and parameters included
       tidemark rpc-reference              every method in Markdown (docs/rpc.md)
  -s, --socket PATH   JSON-RPC socket (default /var/tmp/tidemark.sock, else the service's
                      /run/tidemark/tidemark.sock; or $TIDEMARK_RPC_SOCKET)
  -t, --timeout SECS  how long to wait for the answer (default 60)
  METHOD              e.g. rpc_get_methods, bdev_get_bdevs, bdev_malloc_create
  --name value        a parameter; value is JSON if it parses as JSON, else a string
  --a.b value         nested parameter {\"a\": {\"b\": value}}
  --json '{...}'      all parameters as one JSON object (merged with the others)";

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("tidemark: {msg}");
    exit(code)
}

/// The socket of `tidemarkd` run by hand (the embedded default), else the service's
/// (packaging/tidemark.toml) when only that one exists.
fn default_socket() -> &'static str {
    const BY_HAND: &str = "/var/tmp/tidemark.sock";
    const SERVICE: &str = "/run/tidemark/tidemark.sock";
    if !std::path::Path::new(BY_HAND).exists() && std::path::Path::new(SERVICE).exists() {
        SERVICE
    } else {
        BY_HAND
    }
}

fn parse_value(s: &str) -> Value {
    match serde_json::from_str::<Value>(s) {
        Ok(v) => v,
        Err(_) => Value::String(s.to_string()),
    }
}

fn insert(params: &mut Map<String, Value>, key: &str, v: Value) {
    let mut parts = key.split('.').peekable();
    let mut cur = params;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_string(), v);
            return;
        }
        let e = cur.entry(p.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if !e.is_object() {
            *e = Value::Object(Map::new());
        }
        cur = e.as_object_mut().expect("just made an object");
    }
}

fn main() {
    // A closed stdout (`tidemark bdev_get_iostat | head -1`) ends the process quietly, as it
    // does any Unix filter, instead of making println! panic on EPIPE. Rust sets SIGPIPE to
    // ignored before main; restoring the default is the one place that covers every print.
    // SAFETY: no other thread exists yet, and SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = std::env::var("TIDEMARK_RPC_SOCKET").unwrap_or_else(|_| default_socket().to_string());
    let mut timeout = 60u64;
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') {
        match args[i].as_str() {
            "-s" | "--socket" => {
                socket = args.get(i + 1).cloned().unwrap_or_else(|| fail(2, "-s needs a path"));
                i += 2;
            }
            "-t" | "--timeout" => {
                timeout = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or_else(|| fail(2, "-t needs a number of seconds"));
                i += 2;
            }
            "-h" | "--help" => {
                println!("{USAGE}\n\nmethods, by module (tidemark METHOD --help for one's parameters):\n{}", reference::method_list().trim_end());
                return;
            }
            "-V" | "--version" => {
                println!("tidemark {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            other => fail(2, &format!("unknown option {other}\n{USAGE}")),
        }
    }
    let Some(method) = args.get(i).cloned() else { fail(2, USAGE) };
    i += 1;
    if args[i..].iter().any(|a| a == "--help" || a == "-h") {
        help(&method);
        return;
    }
    match method.as_str() {
        "completions" => {
            completions::main(&args[i..]);
            return;
        }
        "rpc-reference" => {
            print!("{}", reference::markdown());
            return;
        }
        _ => {}
    }
    if method == "backup" {
        backup::main(&socket, timeout, &args[i..]);
        return;
    }
    if method == "top" {
        let rpc = |m: &str, p: Value| {
            let params = match p {
                Value::Object(o) => o,
                _ => Map::new(),
            };
            call(&socket, timeout, m, params).map_err(|(code, msg)| format!("{m} failed: {msg} (code {code})"))
        };
        top::main(&args[i..], &socket, &rpc);
        return;
    }
    let params = parse_params(&args[i..]);
    match call(&socket, timeout, &method, params) {
        Ok(result) => println!("{}", serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())),
        Err((code, msg)) => {
            eprintln!("tidemark: {method} failed: {msg} (code {code})");
            exit(1);
        }
    }
}

/// `tidemark COMMAND --help`: a method's summary and parameters from the linked method table.
fn help(command: &str) {
    let usage_of = |word: &str| USAGE.lines().filter(|l| l.contains(word)).for_each(|l| println!("{}", l.trim_start_matches("usage: ").trim_start()));
    match command {
        "top" => usage_of(" top "),
        "backup" => usage_of(" backup "),
        "completions" => usage_of(" completions "),
        "rpc-reference" => usage_of(" rpc-reference "),
        m => match reference::modules().iter().flat_map(|(_, ms)| ms.iter()).find(|d| d.name == m) {
            Some(d) => print!("{}", reference::method_help(d)),
            None => {
                let names = reference::modules().into_iter().flat_map(|(_, ms)| ms.into_iter().map(|d| d.name));
                let near = names.max_by(|a, b| strsim::jaro_winkler(a, m).total_cmp(&strsim::jaro_winkler(b, m)));
                let hint = near.filter(|n| strsim::jaro_winkler(n, m) > 0.8).map(|n| format!(" (did you mean {n}?)")).unwrap_or_default();
                fail(2, &format!("no method {m}{hint}; tidemark --help lists them"))
            }
        },
    }
}

/// `--key value` pairs into a params object.
fn parse_params(args: &[String]) -> Map<String, Value> {
    let mut i = 0;
    let mut params = Map::new();
    while i < args.len() {
        let a = &args[i];
        let Some(key) = a.strip_prefix("--") else { fail(2, &format!("expected --param, got {a:?}")) };
        let (key, inline) = match key.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (key.to_string(), None),
        };
        let value = match inline {
            Some(v) => {
                i += 1;
                v
            }
            None => match args.get(i + 1) {
                Some(v) if !v.starts_with("--") => {
                    i += 2;
                    v.clone()
                }
                _ => {
                    i += 1;
                    "true".to_string()
                }
            },
        };
        if key == "json" {
            match serde_json::from_str::<Value>(&value) {
                Ok(Value::Object(m)) => params.extend(m),
                _ => fail(2, "--json needs a JSON object"),
            }
        } else if key.is_empty() {
            fail(2, "empty parameter name");
        } else {
            insert(&mut params, &key, parse_value(&value));
        }
    }
    params
}

/// One JSON-RPC call; `Err((code, message))` for a JSON-RPC error. Connection problems end
/// the program with exit code 2.
fn call(socket: &str, timeout: u64, method: &str, params: Map<String, Value>) -> Result<Value, (i64, String)> {
    let mut req = json!({ "jsonrpc": "2.0", "id": 1, "method": method });
    if !params.is_empty() {
        req["params"] = Value::Object(params);
    }
    let stream = UnixStream::connect(socket).unwrap_or_else(|e| fail(2, &format!("cannot connect to {socket}: {e} (is tidemarkd running?)")));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(timeout)));
    let mut w = &stream;
    if let Err(e) = serde_json::to_writer(&mut w, &req).map_err(std::io::Error::other).and_then(|_| w.write_all(b"\n")) {
        fail(2, &format!("cannot send the request: {e}"));
    }
    let mut de = serde_json::Deserializer::from_reader(BufReader::new(&stream)).into_iter::<Value>();
    let resp = match de.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => fail(2, &format!("bad or missing answer from {socket}: {e}")),
        None => fail(2, &format!("{socket} closed the connection without answering")),
    };
    if let Some(err) = resp.get("error") {
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("unknown error");
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        return Err((code, msg.to_string()));
    }
    Ok(resp.get("result").cloned().unwrap_or(Value::Null))
}

/// `tidemark backup ...`: start and watch jobs with a progress bar on a terminal (plain lines
/// otherwise), verify and restore backup chains.
mod backup {
    use super::{call, fail, parse_params};
    use serde_json::{json, Map, Value};
    use std::io::IsTerminal;
    use std::path::{Path, PathBuf};
    use std::process::exit;
    use std::time::{Duration, Instant};
    use tidemark::backup::manifest;

    /// Progress on stderr: a bar on a terminal, a line every few seconds otherwise.
    struct Report {
        bar: Option<indicatif::ProgressBar>,
        label: String,
        last: Instant,
    }

    impl Report {
        fn new(label: &str, total: u64) -> Report {
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = indicatif::ProgressBar::new(total);
                if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}") {
                    b.set_style(style.progress_chars("=> "));
                }
                b.set_message(label.to_string());
                b
            });
            Report { bar, label: label.to_string(), last: Instant::now() - Duration::from_secs(10) }
        }

        fn update(&mut self, done: u64, total: u64) {
            match &self.bar {
                Some(b) => {
                    b.set_length(total);
                    b.set_position(done);
                }
                None if self.last.elapsed() >= Duration::from_secs(2) || done == total => {
                    let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 100.0 };
                    eprintln!("{}: {done}/{total} bytes ({pct:.1}%)", self.label);
                    self.last = Instant::now();
                }
                None => {}
            }
        }

        fn finish(&self) {
            if let Some(b) = &self.bar {
                b.finish();
            }
        }
    }

    fn manifest_of(arg: &str) -> PathBuf {
        let p = PathBuf::from(arg);
        if p.extension().is_some_and(|e| e == "json") {
            p
        } else {
            manifest::manifest_path(&p)
        }
    }

    /// Polls `backup_get` until job `id` ends; exits 1 unless it completed.
    fn watch(socket: &str, timeout: u64, id: &str) {
        let mut report = Report::new(id, 0);
        loop {
            let mut p = Map::new();
            p.insert("id".into(), json!(id));
            let job = match call(socket, timeout, "backup_get", p) {
                Ok(v) => v.get(0).cloned().unwrap_or(Value::Null),
                Err((code, msg)) => fail(1, &format!("backup_get failed: {msg} (code {code})")),
            };
            let done = job["bytes_done"].as_u64().unwrap_or(0);
            let total = job["bytes_total"].as_u64().unwrap_or(0);
            report.update(done, total);
            match job["state"].as_str() {
                Some("in_progress") => std::thread::sleep(Duration::from_millis(200)),
                Some("complete") => {
                    report.finish();
                    println!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
                    return;
                }
                other => {
                    report.finish();
                    eprintln!("tidemark: job {id} ended {}: {}", other.unwrap_or("?"), job["error"].as_str().unwrap_or(""));
                    exit(1);
                }
            }
        }
    }

    pub fn main(socket: &str, timeout: u64, args: &[String]) {
        let Some(sub) = args.first() else { fail(2, super::USAGE) };
        let rest = &args[1..];
        match sub.as_str() {
            "-h" | "--help" | "help" => {
                // The backup lines of the usage text: what `tidemark backup` takes.
                super::USAGE.lines().filter(|l| l.contains(" backup ")).for_each(|l| println!("{}", l.trim_start_matches("usage: ").trim_start()));
            }
            "start" => {
                let mut params = parse_params(rest);
                let detach = params.remove("detach").is_some();
                let r =
                    call(socket, timeout, "backup_start", params).unwrap_or_else(|(code, msg)| fail(1, &format!("backup_start failed: {msg} (code {code})")));
                let id = r["id"].as_str().unwrap_or_default().to_string();
                if detach {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    watch(socket, timeout, &id);
                }
            }
            "status" => {
                let (id, wait) = match rest.first().filter(|a| !a.starts_with("--")) {
                    Some(id) => (Some(id.clone()), rest.iter().any(|a| a == "--wait")),
                    None => (None, false),
                };
                if let (Some(id), true) = (&id, wait) {
                    return watch(socket, timeout, id);
                }
                let mut p = Map::new();
                if let Some(id) = id {
                    p.insert("id".into(), json!(id));
                }
                match call(socket, timeout, "backup_get", p) {
                    Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                    Err((code, msg)) => fail(1, &format!("backup_get failed: {msg} (code {code})")),
                }
            }
            "verify" => {
                let Some(arg) = rest.first() else { fail(2, "backup verify needs a manifest or image path") };
                let mp = manifest_of(arg);
                let mut report = Report::new("verify", 0);
                match manifest::verify_chain(&mp, |d, t| report.update(d, t)) {
                    Ok(bytes) => {
                        report.finish();
                        println!("{}: backup chain verified, {bytes} bytes checked", mp.display());
                    }
                    Err(e) => {
                        report.finish();
                        fail(1, &format!("verify failed: {e}"));
                    }
                }
            }
            "restore" => {
                let Some(arg) = rest.first() else { fail(2, "backup restore needs a manifest or image path") };
                let mp = manifest_of(arg);
                let opts = parse_params(&rest[1..]);
                match (opts.get("to-file").and_then(Value::as_str), opts.get("to-bdev").and_then(Value::as_str)) {
                    (Some(f), None) => {
                        let mut report = Report::new("restore", 0);
                        match manifest::restore_chain_to_file(&mp, Path::new(f), |d, t| report.update(d, t)) {
                            Ok(r) => {
                                report.finish();
                                // The image's size is what the user restored; the bytes read
                                // count every backup of the chain (an extent per backup).
                                println!(
                                    "restored a {}-byte image into {f} ({} bytes read from a chain of {} backups)",
                                    r.image_bytes, r.read_bytes, r.backups
                                );
                            }
                            Err(e) => fail(1, &format!("restore failed: {e}")),
                        }
                    }
                    (None, Some(b)) => {
                        let mut p = Map::new();
                        p.insert("path".into(), json!(mp.display().to_string()));
                        p.insert("bdev".into(), json!(b));
                        let r = call(socket, timeout, "backup_restore", p)
                            .unwrap_or_else(|(code, msg)| fail(1, &format!("backup_restore failed: {msg} (code {code})")));
                        watch(socket, timeout, r["id"].as_str().unwrap_or_default());
                    }
                    _ => fail(2, "backup restore needs exactly one of --to-file FILE or --to-bdev BDEV"),
                }
            }
            other => fail(2, &format!("unknown backup command {other:?}\n{}", super::USAGE)),
        }
    }
}
