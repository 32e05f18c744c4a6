//! The JSON-RPC server against hostile and unlucky clients, on the real daemon: oversized
//! requests are refused without being buffered, unbounded input is never echoed, idle and slow
//! clients are shed, and a local administrator always gets a slot.

mod support;

use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// `key` of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// Reads one JSON value from `s` (None: closed or timed out first).
fn read_reply(s: &UnixStream, timeout: Duration) -> Option<Value> {
    s.set_read_timeout(Some(timeout)).ok();
    serde_json::Deserializer::from_reader(BufReader::new(s)).into_iter::<Value>().next().and_then(Result::ok)
}

#[test]
fn four_concurrent_50_mb_requests_are_refused_without_growing_the_daemon() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let pid = d.pid();
    let before = status_kib(pid, "VmRSS");
    const LIMIT_KIB: u64 = 200 * 1024;
    // Stops the senders early if the daemon grows past the limit (the test then fails), so a
    // regression does not take gigabytes of a shared machine.
    let over = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watch = {
        let (over, done) = (over.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if status_kib(pid, "VmRSS") > LIMIT_KIB {
                    over.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let socket = d.socket.clone();
            let over = over.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&socket).expect("connect");
                let writer = s.try_clone().expect("clone");
                let over2 = over.clone();
                // 50 MB: a bdev name of 50 MB in a well-formed request, sent in 1 MiB pieces.
                let sender = std::thread::spawn(move || {
                    let mut w = writer;
                    if w.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_delete","params":{"name":""#).is_err() {
                        return;
                    }
                    let piece = vec![b'A'; 1 << 20];
                    for _ in 0..50 {
                        if over2.load(Ordering::SeqCst) || w.write_all(&piece).is_err() {
                            return;
                        }
                    }
                    let _ = w.write_all(br#""}}"#);
                });
                let reply = read_reply(&s, Duration::from_secs(120));
                let _ = s.shutdown(std::net::Shutdown::Both);
                let _ = sender.join();
                reply
            })
        })
        .collect();
    let replies: Vec<Option<Value>> = clients.into_iter().map(|c| c.join().expect("client thread")).collect();
    done.store(true, Ordering::SeqCst);
    let _ = watch.join();
    let peak = status_kib(pid, "VmHWM");
    println!("daemon RSS before {before} KiB, peak {peak} KiB");
    assert!(!over.load(Ordering::SeqCst) && peak < LIMIT_KIB, "the daemon grew to {peak} KiB (before: {before} KiB)");
    for r in &replies {
        let r = r.as_ref().expect("every client gets an answer before the connection closes");
        assert_eq!(r["error"]["code"], -32600, "{r}");
        let m = r["error"]["message"].as_str().unwrap_or("");
        assert!(m.contains("4194304") && m.len() < 1024, "{m}");
    }
    // The daemon still serves.
    assert!(d.try_rpc("bdev_get_bdevs", json!(null)).is_ok());
}

#[test]
fn a_huge_name_is_not_echoed_in_the_error() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let name = "N".repeat(3 << 20);
    let t0 = Instant::now();
    let e = d.try_rpc("bdev_malloc_delete", json!({ "name": name })).unwrap_err();
    assert_eq!(e.code, -19, "{}", &e.message[..e.message.len().min(200)]);
    assert!(e.message.len() <= 1024, "the error quotes {} bytes", e.message.len());
    assert!(e.message.contains("does not exist") && e.message.starts_with("bdev NNN"), "{}", &e.message[..e.message.len().min(200)]);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    // A huge method name, and a wrong type for a field (serde quotes the value), alike.
    let e = d.try_rpc(&"m".repeat(1 << 20), json!(null)).unwrap_err();
    assert!(e.code == -32601 && e.message.len() <= 1024, "{} bytes", e.message.len());
    let e = d.try_rpc("bdev_malloc_create", json!({"name": "x", "num_blocks": name, "block_size": 512})).unwrap_err();
    assert!(e.code == -32602 && e.message.len() <= 1024, "{} bytes", e.message.len());
}
