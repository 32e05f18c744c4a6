//! The Linux kernel NVMe/TCP initiator against tidemarkd: a QEMU guest (tests/guest/run.sh)
//! runs tests/nvmf/guest.sh — nvme discover/connect/id-ctrl/id-ns, fio random read and write
//! and a 30 s write+verify at QD32, a refused host, an async event when a namespace is removed,
//! nvme disconnect. The host side serves the namespace removal the guest asks for and checks
//! what the target saw.
//!
//! Needs qemu-system-x86_64 and the guest image (tests/guest/deps.sh, build.sh: tests/run
//! installs them). Without them the test fails, unless TIDEMARK_SKIP_NVMF_GUEST=1.

mod support;

use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const NQN: &str = "nqn.2016-06.io.tidemark:guest";
const NQN_RESTRICTED: &str = "nqn.2016-06.io.tidemark:restricted";
const HOST_GUEST: &str = "nqn.2014-08.org.nvmexpress:uuid:6a7b7e1e-0000-4000-8000-000000000001";
const HOST_ALLOWED: &str = "nqn.2014-08.org.nvmexpress:uuid:6a7b7e1e-0000-4000-8000-0000000000a1";

fn skip() -> bool {
    ["TIDEMARK_SKIP_NVMF_GUEST", "TIDEMARK_SKIP_NVMF"].iter().any(|v| std::env::var(v).as_deref() == Ok("1"))
}

#[test]
fn linux_initiator_in_a_guest() {
    if skip() {
        eprintln!("skipped: TIDEMARK_SKIP_NVMF_GUEST=1");
        return;
    }
    let run_sh = tests_dir().join("guest/run.sh");
    assert!(run_sh.exists(), "{} is missing", run_sh.display());
    assert!(have("qemu-system-x86_64"), "qemu-system-x86_64 is not installed: run tests/guest/deps.sh (or set TIDEMARK_SKIP_NVMF_GUEST=1 to skip this test)");

    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "g0", "num_blocks": 524288, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "g1", "num_blocks": 8192, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "r0", "num_blocks": 8192, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    let listen = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()});
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "serial_number": "TMGUEST0001", "model_number": "tidemark guest test", "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "g0", "nsid": 1}}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "g1", "nsid": 2}}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": listen}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN_RESTRICTED, "serial_number": "TMGUEST0002", "allow_any_host": false}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_RESTRICTED, "namespace": {"bdev_name": "r0"}}));
    d.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN_RESTRICTED, "host": HOST_ALLOWED}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN_RESTRICTED, "listen_address": listen}));

    // The guest asks (through the share) for namespace 2 to be removed while it is connected.
    let share = tempfile::Builder::new().prefix("tidemark-nvmf-guest").tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let socket = d.socket.clone();
    let share_path = share.path().to_path_buf();
    let st = stop.clone();
    let helper = std::thread::spawn(move || {
        let req = share_path.join("remove-ns.request");
        while !st.load(Ordering::SeqCst) {
            if req.exists() {
                let ok = rpc_on(&socket, "nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 2}));
                std::fs::write(share_path.join("remove-ns.done"), if ok { "ok" } else { "failed" }).unwrap();
                return ok;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });

    let script = tests_dir().join("nvmf/guest.sh");
    let t0 = Instant::now();
    let out = Command::new(&run_sh)
        .arg(&script)
        .env("TIDEMARK_GUEST_SHARE", share.path())
        .env("TIDEMARK_GUEST_VARS", "PORT NQN NQN_RESTRICTED HOST_GUEST HOST_ALLOWED FIO_SECS")
        .env("TIDEMARK_GUEST_TIMEOUT", std::env::var("TIDEMARK_GUEST_TIMEOUT").unwrap_or_else(|_| "600".into()))
        .env("PORT", port.to_string())
        .env("NQN", NQN)
        .env("NQN_RESTRICTED", NQN_RESTRICTED)
        .env("HOST_GUEST", HOST_GUEST)
        .env("HOST_ALLOWED", HOST_ALLOWED)
        .env("FIO_SECS", "10")
        .stdin(Stdio::null())
        .output()
        .expect("run tests/guest/run.sh");
    stop.store(true, Ordering::SeqCst);
    let removed = helper.join().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{console}\n{stderr}\n(guest run took {:?})", t0.elapsed());
    let failed: Vec<&str> = console.lines().filter(|l| l.contains("CHECK FAIL")).collect();
    assert!(failed.is_empty(), "guest checks failed: {failed:#?}\n{}", d.log_text());
    assert!(out.status.success(), "guest script failed ({}); daemon log:\n{}", out.status, d.log_text());
    assert!(console.contains("nvmf-guest: ") && console.contains(" passed, 0 failed"), "the guest script did not finish");
    assert!(removed, "the guest never asked for the namespace removal, or it failed");

    // What the target saw: the hosts are gone, their I/O was counted, the refused host was
    // logged, and the removed namespace's bdev is free again.
    for nqn in [NQN, NQN_RESTRICTED] {
        assert!(d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).as_array().unwrap().is_empty(), "{nqn} still has controllers");
    }
    let st = d.rpc("bdev_get_iostat", json!({"name": "g0"}));
    assert!(st["bdevs"][0]["num_write_ops"].as_u64().unwrap() > 1000, "{st}");
    assert!(st["bdevs"][0]["num_read_ops"].as_u64().unwrap() > 1000, "{st}");
    assert!(d.log_text().contains(&format!("host {HOST_GUEST}")), "the refused connect is logged");
    d.rpc("bdev_malloc_delete", json!({"name": "g1"}));
}

/// One RPC on `socket`; true on success.
fn rpc_on(socket: &Path, method: &str, params: serde_json::Value) -> bool {
    use std::io::{BufReader, Write};
    let Ok(s) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    if (&s).write_all(req.to_string().as_bytes()).is_err() {
        return false;
    }
    let resp = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<serde_json::Value>().next();
    matches!(resp, Some(Ok(v)) if v.get("result").is_some())
}
