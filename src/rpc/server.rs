//! The JSON-RPC server: a listener thread and one thread per client connection (bounded).
//!
//! A client cannot make the daemon buffer more than one request's worth of bytes
//! (`rpc.max_request_bytes`): requests are read through [`RequestReader`], which counts the
//! bytes and the JSON values of the request being parsed and stops the parse at the limit, so
//! an oversized request is refused after at most the limit was read, whatever its shape.

use super::{RpcError, INVALID_REQUEST, PARSE_ERROR};
use crate::target::Target;
use serde_json::{json, Value};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
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

/// Why a [`RequestReader`] stopped a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// More than `max_bytes` bytes.
    TooLarge,
    /// More JSON values than `max_values`.
    TooManyValues,
}

/// Bytes per JSON value a request may spend at least: a request of `max_bytes` holds at most
/// `max_bytes / BYTES_PER_VALUE` values. A parsed value costs 32 bytes and more (plus its
/// container's slack), so without this bound `[0,0,0,...]` (2 bytes a value) would parse
/// into 16 to 32 times its size; with it, a request's parsed form stays within a small
/// multiple of `max_bytes`. Real requests spend far more than 64 bytes per value.
const BYTES_PER_VALUE: u64 = 64;

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_bytes: u64,
    max_values: u64,
}

/// What the current request has used so far, shared between the reader (inside the JSON
/// stream parser, which owns it) and the client loop.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    /// Bytes and values (counted as `[`, `{`, `,` and `:` outside strings: an upper bound of
    /// the values a parse creates) of the current request.
    bytes: u64,
    values: u64,
    started: bool,
    in_string: bool,
    escaped: bool,
    stop: Option<Stop>,
}

impl Count {
    /// Counts one byte of the current request; Err once a limit is passed.
    fn account(&mut self, b: u8, l: &Limits) -> Result<(), Stop> {
        if !self.started {
            if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                // Whitespace between requests belongs to none of them.
                return Ok(());
            }
            self.started = true;
        }
        self.bytes += 1;
        if self.in_string {
            match b {
                _ if self.escaped => self.escaped = false,
                b'\\' => self.escaped = true,
                b'"' => self.in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' | b',' | b':' => self.values += 1,
                _ => {}
            }
        }
        if self.bytes > l.max_bytes {
            return Err(Stop::TooLarge);
        }
        if self.values > l.max_values {
            return Err(Stop::TooManyValues);
        }
        Ok(())
    }
}

impl Limits {
    fn new(max_bytes: u64) -> Self {
        Limits { max_bytes, max_values: (max_bytes / BYTES_PER_VALUE).max(1024) }
    }

    /// The error to answer a stopped request with.
    fn error(&self, stop: Stop) -> RpcError {
        match stop {
            Stop::TooLarge => RpcError::new(INVALID_REQUEST, format!("Invalid request: larger than {} bytes (rpc.max_request_bytes)", self.max_bytes)),
            Stop::TooManyValues => RpcError::new(
                INVALID_REQUEST,
                format!("Invalid request: more than {} JSON values (one per {BYTES_PER_VALUE} bytes of rpc.max_request_bytes)", self.max_values),
            ),
        }
    }
}

/// The client's byte stream as the JSON parser reads it, with the current request's size
/// and value count checked as its bytes go by. The parser pulls bytes one at a time, so the
/// count is exact to the byte: the parse stops at the limit, having buffered nothing beyond
/// the reader's own 64 KiB and what it parsed so far.
struct RequestReader {
    stream: UnixStream,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    limits: Limits,
    count: Rc<Cell<Count>>,
}

impl Read for RequestReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let mut c = self.count.get();
        if c.stop.is_some() {
            return Err(std::io::Error::other("request stopped"));
        }
        if self.pos == self.len {
            self.len = self.stream.read(&mut self.buf)?;
            self.pos = 0;
            if self.len == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.len - self.pos);
        for (o, &b) in out[..n].iter_mut().zip(&self.buf[self.pos..self.pos + n]) {
            if let Err(stop) = c.account(b, &self.limits) {
                c.stop = Some(stop);
                self.count.set(c);
                return Err(std::io::Error::other("request stopped"));
            }
            *o = b;
        }
        self.count.set(c);
        self.pos += n;
        Ok(n)
    }
}

/// Serves one client: a stream of JSON values (requests or batches), answered in order.
fn serve_client(stream: UnixStream, target: &Target) {
    let limits = Limits::new(target.config.rpc.max_request_bytes);
    let count = Rc::new(Cell::new(Count::default()));
    let reader = match stream.try_clone() {
        Ok(s) => RequestReader { stream: s, buf: vec![0; 64 << 10].into_boxed_slice(), pos: 0, len: 0, limits, count: count.clone() },
        Err(_) => return,
    };
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        let v = match values.next() {
            None => return,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                if let Some(stop) = count.get().stop {
                    let err = limits.error(stop);
                    // Refused mid-request: the rest of it is never read. Answer and close.
                    log::warn!("rpc: {}", err.message);
                    let _ = reply(&stream, &[error_reply(Value::Null, &err)]);
                    return;
                }
                if e.is_io() || e.is_eof() {
                    return;
                }
                // The stream cannot be resynchronised after a syntax error: answer and close.
                let _ = reply(&stream, &[error_reply(Value::Null, &RpcError::new(PARSE_ERROR, format!("Parse error: {e}")))]);
                return;
            }
        };
        // The parser stops at the value's last byte: the next byte begins a new request.
        count.set(Count::default());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(c: &mut Count, l: &Limits, bytes: &[u8]) -> Result<(), Stop> {
        bytes.iter().try_for_each(|&b| c.account(b, l))
    }

    #[test]
    fn requests_are_counted_in_bytes_and_values() {
        let l = Limits::new(4096);
        assert_eq!(l.max_values, 1024);
        let mut c = Count::default();
        // Whitespace before a request is not part of it; strings hide their brackets.
        feed(&mut c, &l, b"  \n{\"a\":\"[,{:\\\"\",\"b\":[1,2]}").unwrap();
        assert_eq!(c.bytes, 24);
        assert_eq!(c.values, 6, "{{ : , : [ ,");
        let mut c = Count::default();
        assert_eq!(feed(&mut c, &l, &[b'"'; 5000]), Err(Stop::TooLarge));
        assert_eq!(c.bytes, 4097, "stops at the first byte over the limit");
        // Dense arrays are refused by value count long before their size limit.
        let mut c = Count::default();
        assert_eq!(feed(&mut c, &l, &b"[0,".repeat(2000)), Err(Stop::TooManyValues));
        assert!(c.bytes < 4096);
    }
}
