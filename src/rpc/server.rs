//! The JSON-RPC server: a listener thread and one thread per client connection (bounded).
//!
//! A client cannot make the daemon buffer more than one request's worth of bytes
//! (`rpc.max_request_bytes`): requests are read through [`RequestReader`], which counts the
//! bytes and the JSON values of the request being parsed and stops the parse at the limit, so
//! an oversized request is refused after at most the limit was read, whatever its shape.
//!
//! Nor can clients hold the server: a client that sends no request for `rpc.idle_timeout_ms`
//! is disconnected, one that takes longer than `rpc.request_timeout_ms` to send a request (from
//! its first byte) or to take a reply gets an error and is disconnected, and at most
//! `rpc.max_clients` are served at once. Beyond that, `rpc.admin_clients` more slots are kept
//! for a local administrator: a peer whose credentials (SO_PEERCRED) say uid 0 or the daemon's
//! own uid. When those are taken too, an administrator's connection displaces the client that
//! has been quiet longest (never one whose call is running), so `tidemark` run by root or the
//! daemon's user always gets through, however many clients sit idle. As the socket is 0600,
//! every client is such a peer unless the operator opened the socket to others; the idle
//! timeout is what sheds the rest.

use super::{Dispatch, RpcError, INVALID_REQUEST, PARSE_ERROR};
use crate::config::RpcSection;
use serde_json::{json, Value};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    pub fn start(listener: UnixListener, path: PathBuf, settings: RpcSection, target: Arc<dyn Dispatch>) -> std::io::Result<RpcServer> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new().name("rpc".into()).spawn(move || accept_loop(listener, settings, target, st))?;
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

/// One connected client, as the admission and eviction logic sees it.
struct Client {
    id: u64,
    uid: Option<u32>,
    /// When the client last sent a byte or got a reply, in ms since the server started.
    last_active_ms: AtomicU64,
    /// A handler runs for it (set and read under the registry's lock): never evicted then, so
    /// an eviction cannot cut a call in the middle.
    in_call: AtomicBool,
    /// A second handle on the socket, to disconnect the client when it is evicted.
    stream: UnixStream,
}

/// What to do with a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Admit,
    /// Admit after evicting the client at this index.
    Evict(usize),
    Refuse,
}

/// The admission rule (see the module doc). `clients` gives, per connected client, when it
/// was last active and whether a call of its runs.
fn admission(clients: &[(u64, bool)], admin: bool, max_clients: usize, admin_clients: usize) -> Admission {
    let n = clients.len();
    if n < max_clients || (admin && n < max_clients + admin_clients) {
        return Admission::Admit;
    }
    if !admin {
        return Admission::Refuse;
    }
    clients.iter().enumerate().filter(|(_, (_, in_call))| !in_call).min_by_key(|(_, (last, _))| *last).map_or(Admission::Refuse, |(i, _)| Admission::Evict(i))
}

/// The connected clients.
struct Clients {
    list: Mutex<Vec<Arc<Client>>>,
    epoch: Instant,
    max_clients: usize,
    admin_clients: usize,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Client>>> {
        // A poisoned lock means a panic elsewhere; the list itself is always consistent.
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Admits `stream` (evicting an idle client if the rule says so), or None: refused.
    fn admit(&self, stream: &UnixStream, id: u64) -> Option<Arc<Client>> {
        let uid = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.uid());
        let admin = uid.is_some_and(|u| u == 0 || u == nix::unistd::geteuid().as_raw());
        let clone = stream.try_clone().ok()?;
        let mut list = self.lock();
        let views: Vec<(u64, bool)> = list.iter().map(|c| (c.last_active_ms.load(Ordering::Relaxed), c.in_call.load(Ordering::Relaxed))).collect();
        match admission(&views, admin, self.max_clients, self.admin_clients) {
            Admission::Admit => {}
            Admission::Evict(i) => {
                let victim = list.remove(i);
                log::info!("rpc: {} clients connected; disconnecting the longest idle one to admit an administrator", views.len());
                let _ = victim.stream.shutdown(std::net::Shutdown::Both);
            }
            Admission::Refuse => {
                log::warn!("rpc: {} clients connected; refusing one (uid {uid:?})", views.len());
                return None;
            }
        }
        let c = Arc::new(Client { id, uid, last_active_ms: AtomicU64::new(self.now_ms()), in_call: AtomicBool::new(false), stream: clone });
        list.push(c.clone());
        Some(c)
    }

    fn remove(&self, c: &Client) {
        self.lock().retain(|x| x.id != c.id);
    }

    fn touch(&self, c: &Client) {
        c.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Marks a call of `c` running; false if `c` was evicted already (it then stops).
    fn begin_call(&self, c: &Client) -> bool {
        let list = self.lock();
        let present = list.iter().any(|x| x.id == c.id);
        c.in_call.store(present, Ordering::Relaxed);
        present
    }

    fn end_call(&self, c: &Client) {
        let _list = self.lock();
        c.in_call.store(false, Ordering::Relaxed);
        self.touch(c);
    }
}

fn accept_loop(listener: UnixListener, settings: RpcSection, target: Arc<dyn Dispatch>, stop: Arc<AtomicBool>) {
    let cfg = &settings;
    let clients = Arc::new(Clients { list: Mutex::new(Vec::new()), epoch: Instant::now(), max_clients: cfg.max_clients, admin_clients: cfg.admin_clients });
    let mut next_id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                next_id += 1;
                let _ = stream.set_nonblocking(false);
                let Some(me) = clients.admit(&stream, next_id) else {
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = reply(&stream, &[error_reply(Value::Null, &RpcError::new(-16, "too many RPC clients"))]);
                    continue;
                };
                let t = target.clone();
                let cs = clients.clone();
                let settings = settings.clone();
                let spawned = std::thread::Builder::new().name("rpc-client".into()).spawn(move || {
                    serve_client(stream, &settings, &*t, &cs, &me);
                    cs.remove(&me);
                });
                if let Err(e) = spawned {
                    log::warn!("rpc: cannot start a client thread: {e}");
                    clients.lock().retain(|c| c.id != next_id);
                }
            }
            // Wait for the next client without delaying it (a sleep here added up to its length
            // to every call of a client that connects per call, as SPDK's rpc.py does), waking
            // every 100 ms to see whether the server stops.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
                if let Err(e) = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
                    if e != nix::errno::Errno::EINTR {
                        log::warn!("rpc: poll failed: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
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
    /// Not complete within `request_timeout` of its first byte.
    TooSlow,
    /// No request begun within `idle_timeout`.
    Idle,
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
    idle_timeout: Duration,
    request_timeout: Duration,
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
    /// When the reader began waiting for this request, and when its first byte came.
    waiting_since: Option<Instant>,
    started_at: Option<Instant>,
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
            self.started_at = Some(Instant::now());
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
    fn new(c: &crate::config::RpcSection) -> Self {
        Limits {
            max_bytes: c.max_request_bytes,
            max_values: (c.max_request_bytes / BYTES_PER_VALUE).max(1024),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            request_timeout: Duration::from_millis(c.request_timeout_ms),
        }
    }

    /// The error to answer a stopped request with (none for an idle client: there is no
    /// request to answer).
    fn error(&self, stop: Stop) -> Option<RpcError> {
        Some(match stop {
            Stop::TooLarge => RpcError::new(INVALID_REQUEST, format!("Invalid request: larger than {} bytes (rpc.max_request_bytes)", self.max_bytes)),
            Stop::TooManyValues => RpcError::new(
                INVALID_REQUEST,
                format!("Invalid request: more than {} JSON values (one per {BYTES_PER_VALUE} bytes of rpc.max_request_bytes)", self.max_values),
            ),
            Stop::TooSlow => {
                RpcError::new(INVALID_REQUEST, format!("Invalid request: not complete within {} ms (rpc.request_timeout_ms)", self.request_timeout.as_millis()))
            }
            Stop::Idle => return None,
        })
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
    clients: Arc<Clients>,
    me: Arc<Client>,
}

impl Read for RequestReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let mut c = self.count.get();
        if c.stop.is_some() {
            return Err(std::io::Error::other("request stopped"));
        }
        if self.pos == self.len {
            // Wait at most until the current deadline: the idle timeout until a request
            // begins (whitespace does not begin one), then the request's own.
            let now = Instant::now();
            let (deadline, why) = match c.started_at {
                None => (*c.waiting_since.get_or_insert(now) + self.limits.idle_timeout, Stop::Idle),
                Some(t0) => (t0 + self.limits.request_timeout, Stop::TooSlow),
            };
            let left = deadline.saturating_duration_since(now);
            let r = if left.is_zero() {
                Err(std::io::ErrorKind::TimedOut.into())
            } else {
                self.stream.set_read_timeout(Some(left)).and_then(|_| self.stream.read(&mut self.buf))
            };
            match r {
                Ok(n) => {
                    (self.pos, self.len) = (0, n);
                    if n == 0 {
                        self.count.set(c);
                        return Ok(0);
                    }
                    self.clients.touch(&self.me);
                }
                Err(e) => {
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                        c.stop = Some(why);
                    }
                    self.count.set(c);
                    return Err(e);
                }
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
fn serve_client(stream: UnixStream, settings: &RpcSection, target: &dyn Dispatch, clients: &Arc<Clients>, me: &Arc<Client>) {
    let limits = Limits::new(settings);
    // A client that does not take its replies is cut like one that sends too slowly.
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let count = Rc::new(Cell::new(Count::default()));
    let reader = match stream.try_clone() {
        Ok(s) => RequestReader {
            stream: s,
            buf: vec![0; 64 << 10].into_boxed_slice(),
            pos: 0,
            len: 0,
            limits,
            count: count.clone(),
            clients: clients.clone(),
            me: me.clone(),
        },
        Err(_) => return,
    };
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        let v = match values.next() {
            None => return,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                if let Some(stop) = count.get().stop {
                    // Refused mid-request: the rest of it is never read. Answer and close.
                    match limits.error(stop) {
                        Some(err) => {
                            log::warn!("rpc: client uid {:?}: {}", me.uid, err.message);
                            let _ = reply(&stream, &[error_reply(Value::Null, &err)]);
                        }
                        None => log::debug!("rpc: client uid {:?} idle for {:?}: disconnected", me.uid, limits.idle_timeout),
                    }
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
        if !clients.begin_call(me) {
            return;
        }
        let out: Vec<Value> = match v {
            Value::Array(reqs) if reqs.is_empty() => vec![error_reply(Value::Null, &RpcError::new(INVALID_REQUEST, "Invalid request: empty batch"))],
            Value::Array(reqs) => reqs.into_iter().filter_map(|r| handle(target, r)).collect(),
            other => handle(target, other).into_iter().collect(),
        };
        let sent = out.is_empty() || reply(&stream, &out).is_ok();
        clients.end_call(me);
        if !sent {
            return;
        }
    }
}

/// Handles one request; `None` for a notification (no id).
fn handle(target: &dyn Dispatch, req: Value) -> Option<Value> {
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
    let result = target.call(&method, params);
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
        let l = Limits::new(&crate::config::RpcSection { max_request_bytes: 4096, ..Default::default() });
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

    #[test]
    fn admission_keeps_slots_for_administrators_and_evicts_the_longest_idle() {
        use Admission::*;
        let idle = |n: usize| (0..n).map(|i| (100 + i as u64, false)).collect::<Vec<_>>();
        assert_eq!(admission(&idle(3), false, 4, 1), Admit);
        assert_eq!(admission(&idle(4), false, 4, 1), Refuse, "the last slot is the administrator's");
        assert_eq!(admission(&idle(4), true, 4, 1), Admit);
        let mut five = idle(5);
        five[3].0 = 1;
        assert_eq!(admission(&five, false, 4, 1), Refuse);
        assert_eq!(admission(&five, true, 4, 1), Evict(3), "the quietest client goes");
        five[3].1 = true;
        assert_eq!(admission(&five, true, 4, 1), Evict(0), "never one whose call runs");
        let busy: Vec<(u64, bool)> = (0..5).map(|i| (i, true)).collect();
        assert_eq!(admission(&busy, true, 4, 1), Refuse);
    }
}
