//! The panic policy (README, "Panics"): a panic anywhere aborts the daemon, logged at ERROR
//! with its message, location and thread, so that its supervisor restarts it; nothing
//! acknowledged is lost. The panic is injected through the test-only RPC method that exists
//! only with `TIDEMARK_TEST_HOOKS=1`, in a reactor task and in an RPC handler. Uses our own
//! NVMe/TCP initiator: no external tool.

mod support;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use support::*;
use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::io_opc;

const NQN: &str = "nqn.2016-06.io.tidemark:vol0";

fn config(port: u16) -> String {
    r#"
[daemon]
data_dir = "{data_dir}"
buffer_pool_mb = 16
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[rpc]
socket = "{socket}"
[metrics]
listen = "{metrics}"
[[bdev]]
method = "bdev_uring_create"
params = { name = "base", filename = "vol.img", size_mb = 16, block_size = 512 }
[[bdev]]
method = "bdev_uring_create"
params = { name = "store", filename = "vol.store", size_mb = 24, block_size = 512 }
[[bdev]]
method = "bdev_cow_create"
params = { name = "vol0", base_bdev = "base", store_bdev = "store", grain_kb = 64 }
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "nqn.2016-06.io.tidemark:vol0", allow_any_host = true }
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = { nqn = "nqn.2016-06.io.tidemark:vol0", namespace = { bdev_name = "vol0", nsid = 1 } }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "nqn.2016-06.io.tidemark:vol0", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "PORT" } }
"#
    .replace("PORT", &port.to_string())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn io_queue(port: u16) -> (Controller, Qpair) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = Controller::connect(addr, NQN, &QpairOptions::default()).expect("connect");
    let q = c.connect_io(1, 16).expect("I/O queue");
    (c, q)
}

fn write(q: &mut Qpair, nsid: u32, lba: u64, data: &[u8]) {
    let (cqe, _) = q.execute(Qpair::rw_sqe(io_opc::WRITE, nsid, lba, (data.len() / 512) as u32), Payload::Out(data)).expect("write");
    assert!(cqe.status().is_success(), "write acknowledged with an error: {:?}", cqe.status());
}

fn read(q: &mut Qpair, nsid: u32, lba: u64, len: usize) -> Vec<u8> {
    let (cqe, back) = q.execute(Qpair::rw_sqe(io_opc::READ, nsid, lba, (len / 512) as u32), Payload::In(len)).expect("read");
    assert!(cqe.status().is_success(), "read failed: {:?}", cqe.status());
    back
}

/// Sends one request and reads whatever comes back until the socket closes; the daemon may
/// die before it answers.
fn call_and_forget(d: &Daemon, method: &str, params: Value) {
    let Ok(mut s) = UnixStream::connect(&d.socket) else { return };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let _ = s.write_all(req.to_string().as_bytes());
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

/// Writes (acknowledged), seals a snapshot, overwrites, injects a panic at `place`, expects
/// the process to abort within a bounded time with the panic logged, restarts it on the same
/// data directory and checks the volume and the snapshot.
fn a_panic_aborts_and_a_restart_loses_nothing(params: Value, thread: &str, message: &str) {
    let port = free_port();
    let mut d = Daemon::start_with_env(&config(port), &[], &[("TIDEMARK_TEST_HOOKS", "1")]);
    d.rpc("framework_wait_init", json!(null));
    let (a, b, c) = (pattern(1, 8192), pattern(2, 8192), pattern(3, 4096));
    {
        let (_ctrl, mut q) = io_queue(port);
        write(&mut q, 1, 100, &a);
        write(&mut q, 1, 5000, &c);
        let s = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "snap1", "wait_sealed": true}));
        assert_eq!(s["state"], "sealed", "{s}");
        write(&mut q, 1, 100, &b);
        assert_eq!(read(&mut q, 1, 100, b.len()), b);
    }

    call_and_forget(&d, "test_inject_panic", params.clone());
    let status =
        d.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("the daemon did not die after a panic at {params}: it is half alive\n{}", d.log_text()));
    assert_eq!(status.signal(), Some(libc::SIGABRT), "the panic policy aborts: {status:?}\n{}", d.log_text());
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains("ERROR") && l.contains("panic in thread")).unwrap_or_else(|| panic!("no ERROR line for the panic:\n{log}"));
    assert!(
        line.contains(&format!("'{thread}")) && line.contains(message) && line.contains("src/daemon.rs:"),
        "the line names the thread, the message and the location: {line}"
    );

    // The supervisor's restart, on the same data directory.
    d.restart();
    d.rpc("framework_wait_init", json!(null));
    let s = d.rpc("bdev_snapshot_get", json!({"name": "snap1"}));
    assert_eq!(s[0]["state"], "sealed", "{s}");
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "snap1", "nsid": 2}}));
    let (_ctrl, mut q) = io_queue(port);
    assert_eq!(read(&mut q, 1, 100, b.len()), b, "the acknowledged overwrite survived");
    assert_eq!(read(&mut q, 1, 5000, c.len()), c, "the acknowledged write survived");
    assert_eq!(read(&mut q, 2, 100, a.len()), a, "the sealed snapshot holds the data of its time");
    assert_eq!(read(&mut q, 2, 5000, c.len()), c);
}

#[test]
fn a_panic_in_a_reactor_task_aborts_the_daemon_and_a_restart_loses_nothing() {
    a_panic_aborts_and_a_restart_loses_nothing(json!({"where": "reactor", "core": 1}), "reactor_", "injected panic in a reactor task");
}

#[test]
fn a_panic_in_an_rpc_handler_aborts_the_daemon_and_a_restart_loses_nothing() {
    a_panic_aborts_and_a_restart_loses_nothing(json!({"where": "rpc"}), "rpc", "injected panic in an RPC handler");
}

#[test]
fn the_test_hooks_do_not_exist_without_the_variable() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let methods = d.rpc("rpc_get_methods", json!(null));
    assert!(!methods.to_string().contains("test_"), "{methods}");
    let e = d.try_rpc("test_inject_panic", json!({"where": "rpc"})).expect_err("no such method");
    assert_eq!(e.code, -32601, "{e:?}");
}
