//! The JSON-RPC server: a listener thread and one thread per client connection (bounded).

use super::{RpcError, INVALID_REQUEST, PARSE_ERROR};
use crate::target::Target;
use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Most RPC clients served at once; more wait in the listen backlog.
pub const MAX_CLIENTS: usize = 64;

/// Binds the RPC socket with mode 0600 (owner only: the RPC can delete volumes). Refuses to
/// take over a socket another live daemon answers on; removes a stale one.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, format!("{} exists and is not a socket", path.display())));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("another daemon is listening on {}", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    // Create the socket with no group/other permissions at all, so that there is no window in
    // which it is world-writable; the umask is process-wide, so restore it at once.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let r = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = r?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RpcServer {
    pub fn start(listener: UnixListener, path: PathBuf, target: Arc<Target>) -> std::io::Result<RpcServer> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new().name("rpc".into()).spawn(move || accept_loop(listener, target, st))?;
        Ok(RpcServer { path, stop, thread: Some(thread) })
    }

    /// Stops accepting, and removes the socket file.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, target: Arc<Target>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
                    let _ = reply(&stream, &[error_reply(Value::Null, &RpcError::new(-16, "too many RPC clients"))]);
                    continue;
                }
                let _ = stream.set_nonblocking(false);
                active.fetch_add(1, Ordering::SeqCst);
                let t = target.clone();
                let a = active.clone();
                let spawned = std::thread::Builder::new().name("rpc-client".into()).spawn(move || {
                    serve_client(stream, &t);
                    a.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                log::warn!("rpc: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn error_reply(id: Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() })
}

fn reply(mut stream: &UnixStream, values: &[Value]) -> std::io::Result<()> {
    let mut out = Vec::new();
    for v in values {
        serde_json::to_writer(&mut out, v).map_err(std::io::Error::other)?;
        out.push(b'\n');
    }
    stream.write_all(&out)
}

/// Serves one client: a stream of JSON values (requests or batches), answered in order.
fn serve_client(stream: UnixStream, target: &Target) {
    let reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        let v = match values.next() {
            None => return,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                if e.is_io() || e.is_eof() {
                    return;
                }
                // The stream cannot be resynchronised after a syntax error: answer and close.
                let _ = reply(&stream, &[error_reply(Value::Null, &RpcError::new(PARSE_ERROR, format!("Parse error: {e}")))]);
                return;
            }
        };
        let out: Vec<Value> = match v {
            Value::Array(reqs) if reqs.is_empty() => vec![error_reply(Value::Null, &RpcError::new(INVALID_REQUEST, "Invalid request: empty batch"))],
            Value::Array(reqs) => reqs.into_iter().filter_map(|r| handle(target, r)).collect(),
            other => handle(target, other).into_iter().collect(),
        };
        if !out.is_empty() && reply(&stream, &out).is_err() {
            return;
        }
    }
}

/// Handles one request; `None` for a notification (no id).
fn handle(target: &Target, req: Value) -> Option<Value> {
    let Value::Object(mut obj) = req else {
        return Some(error_reply(Value::Null, &RpcError::new(INVALID_REQUEST, "Invalid request: not a JSON object")));
    };
    let id = obj.remove("id");
    let id_val = id.clone().unwrap_or(Value::Null);
    if !matches!(id_val, Value::Null | Value::Number(_) | Value::String(_)) {
        return Some(error_reply(Value::Null, &RpcError::new(INVALID_REQUEST, "Invalid request: id must be a number or a string")));
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(error_reply(id_val, &RpcError::new(INVALID_REQUEST, "Invalid request: jsonrpc must be \"2.0\"")));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Some(error_reply(id_val, &RpcError::new(INVALID_REQUEST, "Invalid request: method must be a string"))),
    };
    let params = obj.remove("params");
    let t0 = std::time::Instant::now();
    let result = super::call(target, &method, params);
    log::debug!("rpc {method}: {:?} in {:?}", result.as_ref().map(|_| "ok").map_err(|e| e.code), t0.elapsed());
    id.as_ref()?;
    Some(match result {
        Ok(v) => json!({ "jsonrpc": "2.0", "id": id_val, "result": v }),
        Err(e) => error_reply(id_val, &e),
    })
}
