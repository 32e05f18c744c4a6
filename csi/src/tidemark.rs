//! A JSON-RPC client for one tidemarkd (SPDK's method names and error codes), over its Unix
//! socket or TCP. One connection per call: the controller's calls are few and short, and a
//! daemon that restarted is reached again without reconnect logic.

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

#[derive(Debug, Clone)]
pub struct Client {
    endpoint: String,
}

impl Client {
    /// `endpoint`: a Unix socket path (contains a `/`), or `host:port`.
    pub fn new(endpoint: &str) -> Client {
        Client { endpoint: endpoint.to_string() }
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        let fut = async {
            if self.endpoint.contains('/') {
                let s = tokio::net::UnixStream::connect(&self.endpoint).await.map_err(|e| RpcError::Unreachable(format!("{}: {e}", self.endpoint)))?;
                exchange(s, &req).await
            } else {
                let s = tokio::net::TcpStream::connect(&self.endpoint).await.map_err(|e| RpcError::Unreachable(format!("{}: {e}", self.endpoint)))?;
                exchange(s, &req).await
            }
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT, fut).await.map_err(|_| RpcError::Unreachable(format!("{method}: no answer in {CALL_TIMEOUT:?}")))??;
        if let Some(e) = resp.get("error") {
            return Err(RpcError::Failed { code: e["code"].as_i64().unwrap_or(0), message: e["message"].as_str().unwrap_or("").to_string() });
        }
        Ok(resp.get("result").cloned().unwrap_or(Value::Null))
    }
}

/// Sends `req` and reads until one whole JSON value has arrived.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &Value) -> Result<Value, RpcError> {
    let broken = |e: std::io::Error| RpcError::Unreachable(e.to_string());
    s.write_all(req.to_string().as_bytes()).await.map_err(broken)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = s.read(&mut chunk).await.map_err(broken)?;
        if n == 0 {
            return Err(RpcError::Unreachable("connection closed before a whole reply".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => return Ok(v),
            Some(Err(e)) if e.is_eof() => {}
            Some(Err(e)) => return Err(RpcError::Unreachable(format!("bad reply: {e}"))),
            None => {}
        }
        if buf.len() > MAX_REPLY {
            return Err(RpcError::Unreachable(format!("reply larger than {MAX_REPLY} bytes")));
        }
    }
}
