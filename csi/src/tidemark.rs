//! A JSON-RPC client for one tidemarkd (SPDK's method names and error codes), over its Unix
//! socket or TCP. The connection is kept between calls: tidemarkd's RPC listener polls for new
//! connections every 20 ms, which made a connection per call cost ~20 ms each (a CreateVolume
//! of six calls took 140 ms against 20 ms for bdev_lvol_create alone).

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Long enough for a metadata commit behind a slow disk (tidemarkd waits 60 s itself).
const CALL_TIMEOUT: Duration = Duration::from_secs(90);
/// A reply larger than this is refused (a ListVolumes over thousands of volumes fits).
const MAX_REPLY: usize = 64 << 20;

// SPDK's JSON-RPC error codes (negated errno values, and JSON-RPC's own).
pub const EBUSY: i64 = -16;
pub const EEXIST: i64 = -17;
pub const ENODEV: i64 = -19;
pub const ENOENT: i64 = -2;
pub const ENOSPC: i64 = -28;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;

#[derive(Debug, Clone)]
pub enum RpcError {
    /// The node did not answer (not running, unreachable, timed out, garbled reply).
    Unreachable(String),
    /// The node answered with a JSON-RPC error.
    Failed { code: i64, message: String },
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Unreachable(m) => write!(f, "unreachable: {m}"),
            RpcError::Failed { code, message } => write!(f, "{message} (code {code})"),
        }
    }
}

impl RpcError {
    pub fn code(&self) -> Option<i64> {
        match self {
            RpcError::Failed { code, .. } => Some(*code),
            RpcError::Unreachable(_) => None,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Client {
    endpoint: String,
    /// The open connection; calls take turns on it (tidemarkd answers one request at a time
    /// per connection anyway).
    conn: tokio::sync::Mutex<Option<Box<dyn Stream>>>,
}

impl Client {
    /// `endpoint`: a Unix socket path (contains a `/`), or `host:port`.
    pub fn new(endpoint: &str) -> Client {
        Client { endpoint: endpoint.to_string(), conn: tokio::sync::Mutex::new(None) }
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, RpcError> {
        let unreachable = |e: std::io::Error| RpcError::Unreachable(format!("{}: {e}", self.endpoint));
        Ok(if self.endpoint.contains('/') {
            Box::new(tokio::net::UnixStream::connect(&self.endpoint).await.map_err(unreachable)?)
        } else {
            Box::new(tokio::net::TcpStream::connect(&self.endpoint).await.map_err(unreachable)?)
        })
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        let fut = async {
            let mut conn = self.conn.lock().await;
            // A kept connection the daemon closed (idle timeout, restart) answers nothing and
            // has processed nothing: the call goes again on a new one.
            if let Some(s) = conn.as_mut() {
                match exchange(s, &req).await {
                    Ok(v) => return Ok(v),
                    Err(Exchange::Closed) => {}
                    Err(Exchange::Failed(e)) => {
                        *conn = None;
                        return Err(e);
                    }
                }
            }
            *conn = None;
            let mut s = self.connect().await?;
            match exchange(&mut s, &req).await {
                Ok(v) => {
                    *conn = Some(s);
                    Ok(v)
                }
                Err(Exchange::Closed) => Err(RpcError::Unreachable("connection closed before a reply".into())),
                Err(Exchange::Failed(e)) => Err(e),
            }
        };
        let resp = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r?,
            Err(_) => {
                // The connection may still get the late reply: not reused.
                *self.conn.lock().await = None;
                return Err(RpcError::Unreachable(format!("{method}: no answer in {CALL_TIMEOUT:?}")));
            }
        };
        if let Some(e) = resp.get("error") {
            return Err(RpcError::Failed { code: e["code"].as_i64().unwrap_or(0), message: e["message"].as_str().unwrap_or("").to_string() });
        }
        Ok(resp.get("result").cloned().unwrap_or(Value::Null))
    }
}

enum Exchange {
    /// Closed (or reset) before any byte of a reply came.
    Closed,
    Failed(RpcError),
}

/// Sends `req` and reads until one whole JSON value has arrived.
async fn exchange(s: &mut Box<dyn Stream>, req: &Value) -> Result<Value, Exchange> {
    if s.write_all(req.to_string().as_bytes()).await.is_err() {
        return Err(Exchange::Closed);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(Exchange::Closed),
            Ok(0) => return Err(Exchange::Failed(RpcError::Unreachable("connection closed in the middle of a reply".into()))),
            Ok(n) => n,
            Err(e) => return Err(Exchange::Failed(RpcError::Unreachable(e.to_string()))),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => return Ok(v),
            Some(Err(e)) if e.is_eof() => {}
            Some(Err(e)) => return Err(Exchange::Failed(RpcError::Unreachable(format!("bad reply: {e}")))),
            None => {}
        }
        if buf.len() > MAX_REPLY {
            return Err(Exchange::Failed(RpcError::Unreachable(format!("reply larger than {MAX_REPLY} bytes"))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A daemon that answers `replies` requests per connection, then closes it; `torn` sends half
    /// of a reply before closing instead.
    async fn serve(listener: UnixListener, replies: usize, torn: bool) {
        while let Ok((mut s, _)) = listener.accept().await {
            for i in 0..replies {
                let mut buf = [0u8; 4096];
                if matches!(s.read(&mut buf).await, Ok(0) | Err(_)) {
                    break;
                }
                let reply = json!({"jsonrpc": "2.0", "id": 1, "result": i}).to_string();
                let out = if torn { &reply.as_bytes()[..reply.len() / 2] } else { reply.as_bytes() };
                let _ = s.write_all(out).await;
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_daemon_closed_is_replaced_and_a_torn_reply_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.sock");
        tokio::spawn(serve(UnixListener::bind(&path).unwrap(), 1, false));
        let c = Client::new(path.to_str().unwrap());
        // Every call after the first finds its kept connection closed and goes again on a new
        // one; none is lost or answered twice.
        for _ in 0..3 {
            assert_eq!(c.call("rpc_get_methods", Value::Null).await.unwrap(), json!(0));
        }

        let torn = dir.path().join("torn.sock");
        tokio::spawn(serve(UnixListener::bind(&torn).unwrap(), 1, true));
        let c = Client::new(torn.to_str().unwrap());
        // Half a reply means the daemon may have acted: never sent again, reported.
        match c.call("bdev_lvol_create", json!({})).await {
            Err(RpcError::Unreachable(m)) => assert!(m.contains("middle of a reply"), "{m}"),
            other => panic!("{other:?}"),
        }

        let gone = Client::new(dir.path().join("none.sock").to_str().unwrap());
        assert!(matches!(gone.call("rpc_get_methods", Value::Null).await, Err(RpcError::Unreachable(_))));
    }
}
