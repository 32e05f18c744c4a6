//! What the CSI tests share: the daemons they start and stop by PID, and tidemarkd's JSON-RPC.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub const CSI: &str = env!("CARGO_BIN_EXE_tidemark-csi");

/// tidemarkd is a binary of the product crate, built beside this one by `cargo test` at the root.
pub fn tidemarkd() -> PathBuf {
    let p = Path::new(CSI).with_file_name("tidemarkd");
    assert!(p.exists(), "{} is missing: build it first (`cargo build -p tidemark --bin tidemarkd`; `cargo test` at the root does)", p.display());
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A child process stopped (SIGTERM, then SIGKILL) by PID when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill on the PID of a child we spawned and have not reaped.
            unsafe { libc_kill(c.id() as i32, 15) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `child` listens on the Unix socket `path`; panics with its log if it exits.
pub fn wait_for_socket(path: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{} exited ({s}):\n{}", path.display(), std::fs::read_to_string(log).unwrap_or_default());
        }
        if UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {} after 20 s:\n{}", path.display(), std::fs::read_to_string(log).unwrap_or_default());
}

/// One JSON-RPC call to tidemarkd: Ok(result) or Err(the error object as text).
pub fn try_call(sock: &Path, method: &str, params: Value) -> Result<Value, String> {
    let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    (&s).write_all(req.to_string().as_bytes()).map_err(|e| e.to_string())?;
    let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<Value>().next().ok_or("no answer")?.map_err(|e| e.to_string())?;
    match resp.get("error") {
        Some(e) => Err(e.to_string()),
        None => Ok(resp["result"].clone()),
    }
}

/// One JSON-RPC call that must succeed.
pub fn call(sock: &Path, method: &str, params: Value) -> Value {
    try_call(sock, method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
}
