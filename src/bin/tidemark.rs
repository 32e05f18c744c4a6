//! tidemark: the JSON-RPC client of tidemarkd.
//!
//!     tidemark [-s SOCKET] [-t SECONDS] METHOD [--param value ...]
//!     tidemark [-s SOCKET] METHOD --json '{"name": "m0", ...}'
//!
//! Values are JSON when they parse as JSON (numbers, true/false, arrays, objects) and strings
//! otherwise; dotted names build nested objects (`--listen_address.traddr 127.0.0.1`).

use serde_json::{json, Map, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::exit;
use std::time::Duration;

const USAGE: &str = "usage: tidemark [-s SOCKET] [-t SECONDS] METHOD [--param value ...] [--json '{...}']
  -s, --socket PATH   JSON-RPC socket (default /var/tmp/tidemark.sock, or $TIDEMARK_RPC_SOCKET)
  -t, --timeout SECS  how long to wait for the answer (default 60)
  METHOD              e.g. rpc_get_methods, bdev_get_bdevs, bdev_malloc_create
  --name value        a parameter; value is JSON if it parses as JSON, else a string
  --a.b value         nested parameter {\"a\": {\"b\": value}}
  --json '{...}'      all parameters as one JSON object (merged with the others)";

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("tidemark: {msg}");
    exit(code)
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = std::env::var("TIDEMARK_RPC_SOCKET").unwrap_or_else(|_| "/var/tmp/tidemark.sock".to_string());
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
                println!("{USAGE}");
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
    let mut req = json!({ "jsonrpc": "2.0", "id": 1, "method": method });
    if !params.is_empty() {
        req["params"] = Value::Object(params);
    }
    let stream = UnixStream::connect(&socket).unwrap_or_else(|e| fail(2, &format!("cannot connect to {socket}: {e} (is tidemarkd running?)")));
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
        eprintln!("tidemark: {method} failed: {msg} (code {code})");
        exit(1);
    }
    let result = resp.get("result").cloned().unwrap_or(Value::Null);
    println!("{}", serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string()));
}
