//! The NVMe/TCP initiator bdev between two tidemarkd nodes on this machine: node B exports a
//! malloc namespace over NVMe/TCP, node A attaches it (`bdev_nvme_attach_controller
//! {trtype: "tcp"}`) and exports the remote bdev over NVMe/TCP again. Data written through A
//! is read back through B and the other way round; B killed with -9 makes A's I/O fail with
//! an error, never hang; bad input gives JSON-RPC errors.

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::{io_opc, Sqe};

const NQN_B: &str = "nqn.2016-06.io.tidemark:node-b";
const NQN_A: &str = "nqn.2016-06.io.tidemark:node-a";
const BS: usize = 512;
/// Blocks of node B's namespace (64 MiB).
const BLOCKS: u64 = 131072;

fn config(cores: &str) -> String {
    MINIMAL_CONFIG.replace("cores = [0]", &format!("cores = {cores}"))
}

fn export(d: &Daemon, nqn: &str, bdevs: &[&str]) -> SocketAddr {
    export_on(d, nqn, bdevs, free_port())
}

fn export_on(d: &Daemon, nqn: &str, bdevs: &[&str], port: u16) -> SocketAddr {
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": nqn, "serial_number": "SN-HOST-1", "allow_any_host": true}));
    for (i, b) in bdevs.iter().enumerate() {
        d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": b, "nsid": i + 1}}));
    }
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Node B: two malloc namespaces exported over NVMe/TCP.
fn node_b() -> (Daemon, SocketAddr) {
    let d = Daemon::start(&config("[0]"));
    let addr = setup_b(&d, free_port());
    (d, addr)
}

fn setup_b(d: &Daemon, port: u16) -> SocketAddr {
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": BLOCKS, "block_size": BS}));
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": BLOCKS, "block_size": BS}));
    export_on(d, NQN_B, &["m0", "m1"], port)
}

fn attach_params(name: &str, b: SocketAddr) -> Value {
    json!({"name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": b.port().to_string(), "subnqn": NQN_B})
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i / 512) as u8).wrapping_mul(7).wrapping_add(i as u8).wrapping_add(seed)).collect()
}

struct Host {
    _c: Controller,
    q: Qpair,
}

fn host(addr: SocketAddr, nqn: &str) -> Host {
    let o = QpairOptions { timeout: Duration::from_secs(20), ..QpairOptions::default() };
    let mut c = Controller::connect(addr, nqn, &o).expect("connect");
    let q = c.connect_io(1, 64).expect("io queue");
    Host { _c: c, q }
}

impl Host {
    fn write(&mut self, nsid: u32, slba: u64, data: &[u8]) {
        let nlb = (data.len() / BS) as u32;
        let (cqe, _) = self.q.execute(Qpair::rw_sqe(io_opc::WRITE, nsid, slba, nlb), Payload::Out(data)).expect("write completes");
        assert!(cqe.status().is_success(), "write {slba}+{nlb}: {}", cqe.status());
    }

    fn read(&mut self, nsid: u32, slba: u64, blocks: usize) -> Vec<u8> {
        let (cqe, data) = self.q.execute(Qpair::rw_sqe(io_opc::READ, nsid, slba, blocks as u32), Payload::In(blocks * BS)).expect("read completes");
        assert!(cqe.status().is_success(), "read {slba}+{blocks}: {}", cqe.status());
        data[..blocks * BS].to_vec()
    }
}

#[test]
fn a_remote_namespace_is_attached_read_written_saved_and_detached() {
    let (b, b_addr) = node_b();
    let a = Daemon::start(&config("[0, 1]"));
    let names = a.rpc("bdev_nvme_attach_controller", attach_params("rb", b_addr));
    assert_eq!(names, json!(["rbn1", "rbn2"]));
    // A second controller with header and data digests; A exports its namespace 2.
    let mut p = attach_params("rd", b_addr);
    p["hdgst"] = json!(true);
    p["ddgst"] = json!(true);
    assert_eq!(a.rpc("bdev_nvme_attach_controller", p), json!(["rdn1", "rdn2"]));

    let bd = a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}));
    assert_eq!(bd[0]["num_blocks"], json!(BLOCKS));
    assert_eq!(bd[0]["block_size"], json!(BS));
    let ctrls = a.rpc("bdev_nvme_get_controllers", json!({}));
    let rb = ctrls.as_array().unwrap().iter().find(|c| c["name"] == "rb").expect("rb listed");
    assert_eq!(rb["ctrlrs"][0]["state"], "enabled");
    assert_eq!(rb["ctrlrs"][0]["trid"]["trtype"], "TCP");
    assert_eq!(rb["ctrlrs"][0]["trid"]["subnqn"], NQN_B);
    assert_eq!(rb["ctrlrs"][0]["trid"]["trsvcid"], b_addr.port().to_string());

    let a_addr = export(&a, NQN_A, &["rbn1", "rdn2"]);
    let mut ha = host(a_addr, NQN_A);
    let mut hb = host(b_addr, NQN_B);

    // Through A (plain and digest controllers), back through B: small, in-capsule-sized and
    // large transfers (R2T, several C2HData PDUs).
    for (nsid, slba, blocks, seed) in [(1u32, 0u64, 1usize, 1u8), (1, 100, 8, 2), (1, 1000, 256, 3), (2, 5000, 64, 4), (2, 9000, 255, 5)] {
        let data = pattern(blocks * BS, seed);
        ha.write(nsid, slba, &data);
        assert!(hb.read(nsid, slba, blocks) == data, "B reads what A wrote at {slba}+{blocks} (ns {nsid})");
    }
    // Through B, back through A (nothing cached on A).
    let data = pattern(128 * BS, 9);
    hb.write(1, 20000, &data);
    hb.write(2, 20000, &data);
    assert!(ha.read(1, 20000, 128) == data, "A reads what B wrote");
    assert!(ha.read(2, 20000, 128) == data, "A reads what B wrote (digests)");

    // Write Zeroes and Dataset Management (deallocate) pass through.
    let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::WRITE_ZEROES, 1, 1000, 16), Payload::None).expect("write zeroes");
    assert!(cqe.status().is_success(), "write zeroes: {}", cqe.status());
    assert!(hb.read(1, 1000, 16).iter().all(|&x| x == 0), "zeroed on B");
    assert!(hb.read(1, 1016, 1) == pattern(256 * BS, 3)[16 * BS..17 * BS], "the block after is untouched");
    let mut dsm = Sqe::new(io_opc::DSM, 0, 1);
    dsm.set_cdw(10, 0);
    dsm.set_cdw(11, 1 << 2);
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&8u32.to_le_bytes());
    range[8..16].copy_from_slice(&100u64.to_le_bytes());
    let (cqe, _) = ha.q.execute(dsm, Payload::Out(&range)).expect("deallocate");
    assert!(cqe.status().is_success(), "deallocate: {}", cqe.status());
    let (cqe, _) = ha.q.execute(Sqe::new(io_opc::FLUSH, 0, 1), Payload::None).expect("flush");
    assert!(cqe.status().is_success(), "flush: {}", cqe.status());

    // The bdev layer's own statistics count the I/O on A.
    let st = a.rpc("bdev_get_iostat", json!({"name": "rbn1"}));
    assert!(st["bdevs"][0]["num_write_ops"].as_u64().unwrap_or(0) >= 3, "{st}");

    // save_config writes the attach call (bases before the subsystem that exports them).
    let cfg = a.dir.path().join("saved.toml");
    a.rpc("save_config", json!({"path": cfg.display().to_string()}));
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("bdev_nvme_attach_controller") && text.contains(NQN_B), "{text}");
    assert_eq!(text.matches("bdev_nvme_attach_controller").count(), 2, "one call per controller: {text}");

    // Metrics: the controller's state and counters.
    let m = a.metrics_text();
    check_openmetrics(&a.metrics()).expect("valid OpenMetrics");
    assert!(m.contains(r#"tidemark_nvme_tcp_controller_state{controller="rb",state="enabled"} 1"#), "{m}");
    assert!(m.contains(r#"tidemark_nvme_tcp_io_errors_total{controller="rb"} 0"#), "{m}");

    // Detach: in use by the subsystem, then freed.
    drop(ha);
    let e = a.try_rpc("bdev_nvme_detach_controller", json!({"name": "rb"})).unwrap_err();
    assert!(e.message.contains("in use"), "{e:?}");
    a.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN_A, "nsid": 1}));
    assert_eq!(a.rpc("bdev_nvme_detach_controller", json!({"name": "rb"})), json!(true));
    assert!(a.try_rpc("bdev_get_bdevs", json!({"name": "rbn1"})).is_err(), "rbn1 is gone");
    let ctrls = a.rpc("bdev_nvme_get_controllers", json!({}));
    assert!(ctrls.as_array().unwrap().iter().all(|c| c["name"] != "rb"), "{ctrls}");
    assert!(a.try_rpc("bdev_nvme_detach_controller", json!({"name": "rb"})).is_err());
    drop(b);
}

#[test]
fn bad_input_is_a_json_rpc_error() {
    let (b, b_addr) = node_b();
    let a = Daemon::start(&config("[0]"));
    let t0 = Instant::now();
    // Nothing listens on a port just freed.
    let mut p = attach_params("x", b_addr);
    p["trsvcid"] = json!(free_port().to_string());
    let e = a.try_rpc("bdev_nvme_attach_controller", p).unwrap_err();
    assert!(e.message.contains("cannot attach x"), "{e:?}");
    // Wrong subsystem NQN: the Connect is refused.
    let mut p = attach_params("x", b_addr);
    p["subnqn"] = json!("nqn.2016-06.io.tidemark:nobody");
    let e = a.try_rpc("bdev_nvme_attach_controller", p).unwrap_err();
    assert!(e.message.contains("cannot attach x"), "{e:?}");
    // No subnqn; unknown field; an unsupported option.
    let mut p = attach_params("x", b_addr);
    p.as_object_mut().unwrap().remove("subnqn");
    assert!(a.try_rpc("bdev_nvme_attach_controller", p).unwrap_err().message.contains("subnqn"));
    let mut p = attach_params("x", b_addr);
    p["bogus"] = json!(1);
    assert!(a.try_rpc("bdev_nvme_attach_controller", p).is_err());
    let mut p = attach_params("x", b_addr);
    p["psk"] = json!("key");
    assert!(a.try_rpc("bdev_nvme_attach_controller", p).unwrap_err().message.contains("psk"));
    assert!(t0.elapsed() < Duration::from_secs(30), "errors come quickly");
    // Twice the same name.
    a.rpc("bdev_nvme_attach_controller", attach_params("x", b_addr));
    assert_eq!(a.try_rpc("bdev_nvme_attach_controller", attach_params("x", b_addr)).unwrap_err().code, -17);
    // Nothing half-made: the daemon still answers and lists one controller.
    assert_eq!(a.rpc("bdev_nvme_get_controllers", json!({})).as_array().unwrap().len(), 1);
    drop(b);
}

#[test]
fn io_fails_with_an_error_when_the_remote_node_dies() {
    let (mut b, b_addr) = node_b();
    let a = Daemon::start(&config("[0]"));
    a.rpc("bdev_nvme_attach_controller", attach_params("rb", b_addr));
    let a_addr = export(&a, NQN_A, &["rbn1"]);
    let mut ha = host(a_addr, NQN_A);
    let data = pattern(64 * BS, 1);
    ha.write(1, 0, &data);
    b.kill9();
    // The next commands complete with an error status, quickly: nothing waits on a dead peer.
    let t0 = Instant::now();
    let mut failed = 0;
    for i in 0..4 {
        let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, i * 64, 64), Payload::Out(&data)).expect("A answers");
        if !cqe.status().is_success() {
            failed += 1;
        }
        let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::READ, 1, i * 64, 64), Payload::In(64 * BS)).expect("A answers");
        if !cqe.status().is_success() {
            failed += 1;
        }
    }
    assert!(failed >= 7, "I/O to the dead node fails ({failed} of 8 failed)");
    assert!(t0.elapsed() < Duration::from_secs(10), "failures come at once, took {:?}", t0.elapsed());
    // SPDK's defaults (ctrlr_loss_timeout_sec 0): one reconnect attempt, then the controller
    // is lost.
    let c = a.rpc("bdev_nvme_get_controllers", json!({"name": "rb"}));
    assert_eq!(c[0]["ctrlrs"][0]["state"], "lost", "{c}");
    let m = a.metrics_text();
    assert!(m.contains(r#"tidemark_nvme_tcp_controller_state{controller="rb",state="lost"} 1"#), "{m}");
    let errors = m.lines().find_map(|l| l.strip_prefix(r#"tidemark_nvme_tcp_io_errors_total{controller="rb"} "#)).expect("io_errors family");
    assert!(errors.parse::<u64>().unwrap() >= 7, "{m}");
    // A still serves RPCs and can detach the dead controller once the export lets go.
    drop(ha);
    a.rpc("nvmf_delete_subsystem", json!({"nqn": NQN_A}));
    assert_eq!(a.rpc("bdev_nvme_detach_controller", json!({"name": "rb"})), json!(true));
}

fn state(a: &Daemon) -> String {
    a.rpc("bdev_nvme_get_controllers", json!({"name": "rb"}))[0]["ctrlrs"][0]["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn io_waits_for_a_reconnect_and_fails_after_fast_io_fail() {
    let (mut b, b_addr) = node_b();
    let a = Daemon::start(&config("[0, 1]"));
    let mut p = attach_params("rb", b_addr);
    p["ctrlr_loss_timeout_sec"] = json!(60);
    p["reconnect_delay_sec"] = json!(1);
    p["fast_io_fail_timeout_sec"] = json!(4);
    a.rpc("bdev_nvme_attach_controller", p.clone());
    let a_addr = export(&a, NQN_A, &["rbn1"]);
    let mut ha = host(a_addr, NQN_A);
    let data = pattern(64 * BS, 1);
    ha.write(1, 0, &data);

    // B dies during I/O and comes back (same port, fresh malloc namespaces, the first twice
    // as large) 2 s later: the write issued meanwhile waits and succeeds.
    b.kill9();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        b.restart();
        b.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2 * BLOCKS, "block_size": BS}));
        b.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": BLOCKS, "block_size": BS}));
        export_on(&b, NQN_B, &["m0", "m1"], b_addr.port());
        b
    });
    let t0 = Instant::now();
    let data2 = pattern(64 * BS, 2);
    ha.write(1, 64, &data2);
    let waited = t0.elapsed();
    let b = restarter.join().unwrap();
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(4), "the write waited for the reconnect ({waited:?})");
    let mut hb = host(b_addr, NQN_B);
    assert!(hb.read(1, 64, 64) == data2, "the write that waited reached B");
    assert!(ha.read(1, 64, 64) == data2);
    assert_eq!(state(&a), "enabled");
    let c = a.rpc("bdev_nvme_get_controllers", json!({"name": "rb"}));
    assert_eq!(c[0]["ctrlrs"][0]["reconnects"], json!(1), "{c}");
    assert!(a.metrics_text().contains(r#"tidemark_nvme_tcp_reconnects_total{controller="rb"} 1"#));
    // The reconnect read the namespaces' sizes again, and the AER was sent on the new admin
    // queue: a namespace removed on B is reported (logged; its I/O then fails with B's status).
    wait_for("A to see the larger namespace", 10, || a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}))[0]["num_blocks"] == json!(2 * BLOCKS));
    b.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN_B, "nsid": 2}));
    wait_for("A to log the removed namespace", 10, || a.log_text().contains("namespace 2 is no longer active"));

    // B gone for good: I/O waits for fast_io_fail_timeout_sec (4 s), then fails; A keeps
    // reconnecting and keeps serving RPCs.
    drop(hb);
    drop(b);
    let t0 = Instant::now();
    let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 64), Payload::Out(&data)).expect("A answers");
    let waited = t0.elapsed();
    assert!(!cqe.status().is_success(), "the write fails once fast_io_fail passed");
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(8), "failed after fast_io_fail ({waited:?})");
    assert_eq!(state(&a), "failed");
    let t0 = Instant::now();
    let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::READ, 1, 0, 8), Payload::In(8 * BS)).expect("A answers");
    assert!(!cqe.status().is_success() && t0.elapsed() < Duration::from_secs(1), "new I/O fails at once");
    drop(ha);
    a.rpc("nvmf_delete_subsystem", json!({"nqn": NQN_A}));
    assert_eq!(a.rpc("bdev_nvme_detach_controller", json!({"name": "rb"})), json!(true));
    // Bad reconnect parameters are refused.
    p["reconnect_delay_sec"] = json!(0);
    assert!(a.try_rpc("bdev_nvme_attach_controller", p).unwrap_err().message.contains("reconnect_delay_sec"));
}

/// SPDK's nvmf_tgt, killed by PID when the test ends.
struct SpdkApp(std::process::Child);

impl Drop for SpdkApp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SPDK's nvmf_tgt from `SPDK_DIR` (None, printing SKIPPED, when it is not there), serving
/// subsystem `nqn` with `namespaces` RAM namespaces of 32768 blocks (nsid 1, 2, ...) on a free
/// port of 127.0.0.1.
fn spdk_nvmf_tgt(test: &str, nqn: &str, namespaces: u32) -> Option<(SpdkApp, tempfile::TempDir, SocketAddr)> {
    let Ok(dir) = std::env::var("SPDK_DIR") else {
        eprintln!("SKIPPED {test}: SPDK_DIR is not set (point it at SPDK v25.09's folder, e.g. ../shared/peers/spdk-v25.09)");
        return None;
    };
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&dir).join("bin/nvmf_tgt");
    if !bin.exists() {
        eprintln!("SKIPPED {test}: {} does not exist", bin.display());
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mallocs: Vec<Value> = (0..namespaces)
        .map(|i| json!({"method": "bdev_malloc_create", "params": {"name": format!("Malloc{i}"), "num_blocks": 32768, "block_size": 512}}))
        .collect();
    let mut nvmf = vec![
        json!({"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}),
        json!({"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": true, "serial_number": "SPDK0001"}}),
    ];
    for i in 0..namespaces {
        nvmf.push(json!({"method": "nvmf_subsystem_add_ns", "params": {"nqn": nqn, "namespace": {"bdev_name": format!("Malloc{i}"), "nsid": i + 1}}}));
    }
    nvmf.push(json!({"method": "nvmf_subsystem_add_listener", "params": {"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}}));
    let cfg = json!({"subsystems": [{"subsystem": "bdev", "config": mallocs}, {"subsystem": "nvmf", "config": nvmf}]});
    let cfg_path = tmp.path().join("nvmf_tgt.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let log = tmp.path().join("nvmf_tgt.log");
    let logf = std::fs::File::create(&log).expect("log");
    let child = std::process::Command::new(&bin)
        // No core lock: other SPDK apps on this machine (benchmarks, other tests) may run on
        // core 0 too, and a test target needs no exclusive core.
        .args(["-m", "0x1", "--no-huge", "-s", "1024", "--no-pci", "--disable-cpumask-locks", "-r"])
        .arg(tmp.path().join("spdk.sock"))
        .arg("--json")
        .arg(&cfg_path)
        .stdout(std::process::Stdio::from(logf.try_clone().expect("dup")))
        .stderr(std::process::Stdio::from(logf))
        .spawn()
        .expect("start nvmf_tgt");
    let mut app = SpdkApp(child);
    let s_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(s_addr).is_err() {
        if let Ok(Some(st)) = app.0.try_wait() {
            panic!("nvmf_tgt exited ({st}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "nvmf_tgt did not listen in 60 s:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    }
    Some((app, tmp, s_addr))
}

#[test]
fn attaches_spdk_nvmf_tgt() {
    const NQN_S: &str = "nqn.2016-06.io.spdk:cnode1";
    let Some((_app, _tmp, s_addr)) = spdk_nvmf_tgt("attaches_spdk_nvmf_tgt", NQN_S, 1) else { return };

    let a = Daemon::start(&config("[0, 1]"));
    let mut p = attach_params("spdk", s_addr);
    p["subnqn"] = json!(NQN_S);
    p["hdgst"] = json!(true);
    p["ddgst"] = json!(true);
    assert_eq!(a.rpc("bdev_nvme_attach_controller", p), json!(["spdkn1"]));
    let bd = a.rpc("bdev_get_bdevs", json!({"name": "spdkn1"}));
    assert_eq!(bd[0]["num_blocks"], json!(32768));
    let a_addr = export(&a, NQN_A, &["spdkn1"]);
    let mut ha = host(a_addr, NQN_A);
    let mut hs = host(s_addr, NQN_S);
    for (slba, blocks, seed) in [(0u64, 1usize, 1u8), (7, 64, 2), (4096, 256, 3)] {
        let data = pattern(blocks * BS, seed);
        ha.write(1, slba, &data);
        assert!(hs.read(1, slba, blocks) == data, "nvmf_tgt has what A wrote at {slba}+{blocks}");
        assert!(ha.read(1, slba, blocks) == data, "A reads it back at {slba}+{blocks}");
    }
    drop(ha);
    drop(hs);
    a.rpc("nvmf_delete_subsystem", json!({"nqn": NQN_A}));
    assert_eq!(a.rpc("bdev_nvme_detach_controller", json!({"name": "spdk"})), json!(true));
}

#[test]
fn check_config_connects_and_stands_in_for_the_remote_namespaces() {
    let (_b, b_addr) = node_b();
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |subnqn: &str| {
        // The attach call, then a subsystem exporting one of its bdevs: the stand-in must
        // exist for the export to check.
        let text = format!(
            "[daemon]\ndata_dir = \"{}\"\nbuffer_pool_mb = 8\n[reactor]\ncores = [0]\n[metrics]\nlisten = \"\"\n\
             [[bdev]]\nmethod = \"bdev_nvme_attach_controller\"\n\
             params = {{ name = \"rb\", trtype = \"tcp\", adrfam = \"ipv4\", traddr = \"127.0.0.1\", trsvcid = \"{}\", subnqn = \"{subnqn}\" }}\n\
             [[nvmf]]\nmethod = \"nvmf_create_transport\"\nparams = {{ trtype = \"TCP\" }}\n\
             [[nvmf]]\nmethod = \"nvmf_create_subsystem\"\nparams = {{ nqn = \"{NQN_A}\", allow_any_host = true }}\n\
             [[nvmf]]\nmethod = \"nvmf_subsystem_add_ns\"\nparams = {{ nqn = \"{NQN_A}\", namespace = {{ bdev_name = \"rbn2\" }} }}\n",
            dir.path().display(),
            b_addr.port()
        );
        let path = dir.path().join("t.toml");
        std::fs::write(&path, text).unwrap();
        let o = std::process::Command::new(TIDEMARKD).arg("--config").arg(&path).arg("--check-config").env_remove("RUST_LOG").output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    let (ok, out) = check(NQN_B);
    assert!(ok, "{out}");
    let (ok, out) = check("nqn.2016-06.io.tidemark:nobody");
    assert!(!ok && out.contains("bdev[0]") && out.contains("cannot attach rb"), "{out}");
}

fn raid(d: &Daemon, name: &str) -> Value {
    let all = d.rpc("bdev_raid_get_bdevs", json!({"category": "all"}));
    all.as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap_or_else(|| panic!("no raid {name} in {all}"))
}

fn leg_state(r: &Value, leg: &str) -> String {
    r["base_bdevs_list"].as_array().unwrap().iter().find(|b| b["name"] == leg).map(|b| b["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node B's leg: a file (it survives kill -9) with a fixed UUID, exported on `port`.
fn setup_b_file(d: &Daemon, port: u16) -> SocketAddr {
    d.rpc("bdev_uring_create", json!({"name": "u0", "filename": "leg.img", "size_mb": 64, "block_size": BS, "uuid": "5e1f0c2a-7d3b-4c1e-9a55-0123456789ab"}));
    export_on(d, NQN_B, &["u0"], port)
}

#[test]
fn a_mirror_with_a_remote_leg_survives_the_leg_node_dying_and_rejoins_it() {
    let mut b = Daemon::start(&config("[0]"));
    let b_port = free_port();
    let b_addr = setup_b_file(&b, b_port);
    let a = Daemon::start(&config("[0, 1]"));
    let mut p = attach_params("rb", b_addr);
    p["ctrlr_loss_timeout_sec"] = json!(60);
    p["reconnect_delay_sec"] = json!(1);
    p["fast_io_fail_timeout_sec"] = json!(2);
    a.rpc("bdev_nvme_attach_controller", p);
    // This test re-joins by RPC (tests/mirror_remote.rs has the leg come back by itself).
    a.rpc("bdev_raid_set_options", json!({"auto_rejoin": false}));
    a.rpc("bdev_malloc_create", json!({"name": "l0", "num_blocks": BLOCKS, "block_size": BS}));
    a.rpc("bdev_raid_create", json!({"name": "m0", "raid_level": "raid1", "base_bdevs": ["l0", "rbn1"]}));
    let r = raid(&a, "m0");
    assert_eq!(r["state"], "online", "{r}");
    let data_offset = r["base_bdevs_list"][1]["data_offset"].as_u64().unwrap();
    let a_addr = export(&a, NQN_A, &["m0"]);

    // A host writes 64 KiB pieces over the first 8 MiB, round after round, while B is killed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut h = host(a_addr, NQN_A);
        let (mut max, mut errors, mut round) = (Duration::ZERO, 0, 0u8);
        let mut expect = vec![0u8; 8 << 20];
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            for piece in 0..128u64 {
                let data = pattern(128 * BS, round.wrapping_mul(31).wrapping_add(piece as u8));
                let t0 = Instant::now();
                let (cqe, _) = h.q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, piece * 128, 128), Payload::Out(&data)).expect("A answers");
                max = max.max(t0.elapsed());
                if cqe.status().is_success() {
                    expect[(piece as usize) * 128 * BS..(piece as usize + 1) * 128 * BS].copy_from_slice(&data);
                } else {
                    errors += 1;
                }
            }
            round = round.wrapping_add(1);
        }
        (max, errors, expect, h)
    });
    std::thread::sleep(Duration::from_secs(1));
    b.kill9();
    wait_for("the mirror to drop the remote leg", 20, || leg_state(&raid(&a, "m0"), "rbn1") == "failed");
    std::thread::sleep(Duration::from_secs(1));
    b.restart();
    setup_b_file(&b, b_port);
    wait_for("the controller to reconnect", 20, || state(&a) == "enabled");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max, errors, expect, mut ha) = writer.join().unwrap();
    assert_eq!(errors, 0, "the host saw no error");
    assert!(max < Duration::from_secs(6), "host latency across the node loss is bounded by fast_io_fail_timeout_sec (2 s) plus slack: {max:?}");
    println!("max host write latency across the loss of B: {max:?}");

    // Re-join: only the regions written while B was away are copied.
    let added = a.rpc("bdev_raid_add_base_bdev", json!({"raid_bdev": "m0", "base_bdev": "rbn1"}));
    assert_eq!(added["returning"], true, "{added}");
    let r = raid(&a, "m0");
    let copy = added["regions_to_copy"].as_u64().unwrap_or(0);
    assert!(copy >= 1 && copy < r["num_regions"].as_u64().unwrap_or(0), "incremental: {added} {r}");
    println!("re-join copies {copy} of {} regions", r["num_regions"]);
    wait_for("the re-joined leg", 60, || leg_state(&raid(&a, "m0"), "rbn1") == "active");
    let mut hb = host(b_addr, NQN_B);
    for piece in 0..64u64 {
        let want = &expect[(piece as usize) * 256 * BS..(piece as usize + 1) * 256 * BS];
        assert!(ha.read(1, piece * 256, 256) == want, "the mirror has every acknowledged write (piece {piece})");
        assert!(hb.read(1, data_offset + piece * 256, 256) == want, "the remote leg has them too after the re-join (piece {piece})");
    }
}

#[test]
fn shutdown_does_not_wait_for_io_held_for_a_reconnect() {
    let (mut b, b_addr) = node_b();
    let mut a = Daemon::start(&config("[0]"));
    let mut p = attach_params("rb", b_addr);
    p["ctrlr_loss_timeout_sec"] = json!(-1);
    p["reconnect_delay_sec"] = json!(1);
    a.rpc("bdev_nvme_attach_controller", p);
    let a_addr = export(&a, NQN_A, &["rbn1"]);
    let mut ha = host(a_addr, NQN_A);
    ha.write(1, 0, &pattern(8 * BS, 1));
    b.kill9();
    // A write that waits forever for B (no fast_io_fail, reconnects forever).
    ha.q.submit(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 8), Payload::Out(&pattern(8 * BS, 2))).unwrap();
    ha.q.flush().unwrap();
    wait_for("the controller to notice", 10, || state(&a) == "resetting");
    let t0 = Instant::now();
    let st = a.terminate(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "tidemarkd stops cleanly with I/O held for a reconnect: {st:?}");
    // The NVMe/TCP front end gives its connections' commands up to 10 s to end; then this
    // module ends the held I/O (before, the reactors waited for it forever).
    assert!(t0.elapsed() < Duration::from_secs(13), "stopped in {:?}", t0.elapsed());
}

/// Waits (10 s at most) for the completion of admin command `cid`.
fn admin_completion(c: &mut Controller, cid: u16) -> tidemark::nvmf::initiator::Completion {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        c.admin.poll(&mut out).unwrap();
        if let Some(x) = out.iter().find(|x| x.cid == cid) {
            return *x;
        }
        assert!(Instant::now() < deadline, "admin command {cid} did not complete");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A host controller with namespace notices enabled and one AER outstanding.
fn aer_host(addr: SocketAddr, nqn: &str) -> (Controller, u16) {
    use tidemark::nvmf::spec::{self, admin_opc};
    let o = QpairOptions { timeout: Duration::from_secs(20), ..QpairOptions::default() };
    let mut c = Controller::connect(addr, nqn, &o).expect("connect");
    c.set_features(spec::feat::ASYNC_EVENT_CONFIG, 1 << 8).unwrap();
    let aer = c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    (c, aer)
}

#[test]
fn a_volume_grown_on_the_remote_node_is_seen_through_the_initiator_and_its_exports() {
    const OLD: u64 = 8 << 20 >> 9;
    const NEW: u64 = 16 << 20 >> 9;
    // B: a volume of a pool, exported over NVMe/TCP.
    let b = Daemon::start(&config("[0]"));
    b.rpc("bdev_malloc_create", json!({"name": "base", "num_blocks": BLOCKS, "block_size": BS}));
    b.rpc("bdev_lvol_create_lvstore", json!({"bdev_name": "base", "lvs_name": "lvs"}));
    b.rpc("bdev_lvol_create", json!({"lvol_name": "v", "size_in_mib": 8, "thin_provision": true, "lvs_name": "lvs"}));
    let b_addr = export(&b, NQN_B, &["lvs/v"]);
    // A: attaches it and exports the remote bdev again.
    let a = Daemon::start(&config("[0, 1]"));
    assert_eq!(a.rpc("bdev_nvme_attach_controller", attach_params("rb", b_addr)), json!(["rbn1"]));
    assert_eq!(a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}))[0]["num_blocks"], json!(OLD));
    let a_addr = export(&a, NQN_A, &["rbn1"]);
    // A exports it over iSCSI too; a session's first command collects the power-on attention.
    let iscsi_port = free_port();
    a.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": iscsi_port.to_string()}]}));
    a.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    a.rpc("iscsi_create_target_node", json!({"name": "iqn.2016-06.io.tidemark:rb", "luns": [{"bdev_name": "rbn1", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}));
    let iscsi_addr = SocketAddr::from(([127, 0, 0, 1], iscsi_port));
    let mut s =
        client::Session::login(iscsi_addr, &client::LoginOptions::normal("iqn.2024-01.test:resize", "iqn.2016-06.io.tidemark:rb")).expect("iSCSI login");
    let tur = [0u8; 6];
    let _ = s.scsi(0, &tur, 0, None).expect("test unit ready");
    assert_eq!(s.scsi(0, &tur, 0, None).expect("test unit ready").status, 0);
    // Hosts of both nodes wait for namespace notices.
    let (mut cb, aer_b) = aer_host(b_addr, NQN_B);
    let (mut ca, aer_a) = aer_host(a_addr, NQN_A);
    let mut ha = host(a_addr, NQN_A);
    // Past the old end: refused before the resize.
    let data = pattern(16 * BS, 11);
    let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, OLD + 100, 16), Payload::Out(&data)).unwrap();
    assert!(!cqe.status().is_success(), "a write past the end fails before the resize");

    b.rpc("bdev_lvol_resize", json!({"name": "lvs/v", "size_in_mib": 16}));
    // B's host gets the event at once.
    let ev = admin_completion(&mut cb, aer_b);
    assert_eq!(ev.cqe.dw0, 0x0004_0002, "B: namespace attribute changed");
    assert_eq!(cb.identify_namespace(1).unwrap().nsze, NEW);
    // A's initiator got it too, read the new size and set its bdev's: A's own host is told.
    wait_for("A's bdev to grow", 10, || a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}))[0]["num_blocks"] == json!(NEW));
    let ev = admin_completion(&mut ca, aer_a);
    assert_eq!(ev.cqe.dw0, 0x0004_0002, "A: namespace attribute changed, raised by the resize seen through the initiator");
    let log = ca.get_log_page(tidemark::nvmf::spec::log::CHANGED_NS, 0, 4096, 0, false).unwrap();
    assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 1);
    assert_eq!(ca.identify_namespace(1).unwrap().nsze, NEW);
    // A's iSCSI host: CAPACITY DATA HAS CHANGED, then READ CAPACITY (16) shows the new size.
    let r = s.scsi(0, &tur, 0, None).expect("test unit ready");
    assert_eq!((r.status, r.sense), (2, Some((0x06, 0x2a, 0x09))), "iSCSI: CAPACITY DATA HAS CHANGED");
    let r = s.scsi(0, &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], 32, None).expect("read capacity 16");
    assert_eq!(r.status, 0);
    assert_eq!(u64::from_be_bytes(r.data[0..8].try_into().unwrap()), NEW - 1, "last LBA");
    // A write past the old end through A lands on B's volume.
    ha.write(1, OLD + 100, &data);
    assert!(ha.read(1, OLD + 100, 16) == data, "read back through A");
    let mut hb = host(b_addr, NQN_B);
    assert!(hb.read(1, OLD + 100, 16) == data, "read on B");

    // A second resize: the initiator's AER was sent again.
    b.rpc("bdev_lvol_resize", json!({"name": "lvs/v", "size_in_mib": 24}));
    wait_for("A's bdev to grow again", 10, || a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}))[0]["num_blocks"] == json!(24u64 << 20 >> 9));
    drop((ha, hb, ca, cb, s));
    drop(a);
    drop(b);
}

#[test]
fn namespaces_added_and_removed_on_the_remote_node_come_and_go_as_bdevs() {
    let (b, b_addr) = node_b();
    let a = Daemon::start(&config("[0, 1]"));
    assert_eq!(a.rpc("bdev_nvme_attach_controller", attach_params("rb", b_addr)), json!(["rbn1", "rbn2"]));
    // B adds namespace 3: A's initiator hears the notice and makes rbn3, which works.
    b.rpc("bdev_malloc_create", json!({"name": "m2", "num_blocks": BLOCKS / 2, "block_size": BS}));
    b.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_B, "namespace": {"bdev_name": "m2", "nsid": 3}}));
    wait_for("rbn3 on A", 10, || a.try_rpc("bdev_get_bdevs", json!({"name": "rbn3"})).is_ok());
    assert_eq!(a.rpc("bdev_get_bdevs", json!({"name": "rbn3"}))[0]["num_blocks"], json!(BLOCKS / 2));
    let a_addr = export(&a, NQN_A, &["rbn3"]);
    let mut ha = host(a_addr, NQN_A);
    let data = pattern(16 * BS, 5);
    ha.write(1, 7, &data);
    let mut hb = host(b_addr, NQN_B);
    assert!(hb.read(3, 7, 16) == data, "written through A's new bdev, read on B");
    let c = a.rpc("bdev_nvme_get_controllers", json!({"name": "rb"}));
    assert_eq!(c[0]["ctrlrs"][0]["bdevs"], json!(["rbn1", "rbn2", "rbn3"]), "{c}");
    // B removes namespace 1 (nothing holds rbn1 on A): its bdev goes. Namespace 3 is exported
    // by A, so when B removes it too its bdev stays, and its I/O fails.
    b.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN_B, "nsid": 1}));
    wait_for("rbn1 deleted on A", 10, || a.try_rpc("bdev_get_bdevs", json!({"name": "rbn1"})).is_err());
    b.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN_B, "nsid": 3}));
    wait_for("A to log that rbn3 stays", 10, || a.log_text().contains("namespace 3 is gone but bdev rbn3 stays"));
    let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::READ, 1, 0, 8), Payload::In(8 * BS)).expect("A answers");
    assert!(!cqe.status().is_success(), "I/O to a namespace B removed fails");
    // save_config: the attach call is written once, by the lowest namespace left (rbn2).
    let saved = a.rpc("save_config", json!({}));
    let attaches = saved.to_string().matches("bdev_nvme_attach_controller").count();
    assert_eq!(attaches, 1, "{saved}");
    drop((ha, hb));
    a.rpc("nvmf_delete_subsystem", json!({"nqn": NQN_A}));
    assert_eq!(a.rpc("bdev_nvme_detach_controller", json!({"name": "rb"})), json!(true));
    assert!(a.try_rpc("bdev_get_bdevs", json!({"name": "rbn2"})).is_err());
}

#[test]
fn a_lost_controller_is_deleted_unless_its_bdev_is_held_and_reset_reconnects() {
    let (mut b, b_addr) = node_b();
    let a = Daemon::start(&config("[0]"));
    // Options first (a startup call: refused once a controller is attached).
    a.rpc("bdev_nvme_set_options", json!({"keep_alive_timeout_ms": 2000, "generate_uuids": true}));
    let e = a.try_rpc("bdev_nvme_set_options", json!({"timeout_admin_us": 100})).unwrap_err();
    assert!(e.message.contains("timeout_admin_us"), "SPDK's check: an admin timeout needs an I/O timeout: {}", e.message);
    a.rpc("bdev_nvme_attach_controller", attach_params("rb", b_addr));
    let e = a.try_rpc("bdev_nvme_set_options", json!({})).unwrap_err();
    assert_eq!(e.code, -1, "EPERM once a controller is attached: {}", e.message);
    let saved = a.rpc("save_config", json!({})).to_string();
    assert!(saved.contains("bdev_nvme_set_options") && saved.contains("\"keep_alive_timeout_ms\":2000"), "{saved}");
    // generate_uuids: B's malloc namespaces carry an NGUID, so theirs is kept; nothing to see
    // here beyond a stable UUID across a reset.
    let uuid = a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}))[0]["uuid"].clone();

    // Reset: I/O before and after works, the data stays.
    let a_addr = export(&a, NQN_A, &["rbn1"]);
    let mut ha = host(a_addr, NQN_A);
    let data = pattern(32 * BS, 9);
    ha.write(1, 100, &data);
    assert_eq!(a.rpc("bdev_nvme_reset_controller", json!({"name": "rb"})), json!(true));
    assert_eq!(state(&a), "enabled");
    assert!(ha.read(1, 100, 32) == data);
    assert_eq!(a.rpc("bdev_get_bdevs", json!({"name": "rbn1"}))[0]["uuid"], uuid);
    assert_eq!(a.try_rpc("bdev_nvme_reset_controller", json!({"name": "nope"})).unwrap_err().code, -19);

    // B dies: with SPDK's default ctrlr_loss_timeout_sec (0) the controller is lost after one
    // attempt. rbn1 is exported by A, so the controller stays (lost); rbn2 is not, but it
    // belongs to the same controller.
    b.kill9();
    wait_for("the keep-alive to notice", 15, || state(&a) == "lost");
    // The state turns before the line reaches the log file.
    wait_for("the log to say why the controller stays", 5, || a.log_text().contains("stays lost, not deleted"));
    // A reset of a lost controller is one more attempt; B is still down.
    assert_eq!(a.try_rpc("bdev_nvme_reset_controller", json!({"name": "rb"})).unwrap_err().code, -5);
    // B comes back; a reset brings the controller back.
    b.restart();
    setup_b(&b, b_addr.port());
    wait_for("state lost after the failed reset's recovery", 15, || state(&a) == "lost");
    assert_eq!(a.rpc("bdev_nvme_reset_controller", json!({"name": "rb"})), json!(true));
    assert_eq!(state(&a), "enabled");
    ha.write(1, 0, &data);
    // Now nothing holds its bdevs when B dies: the controller and its bdevs are deleted.
    drop(ha);
    a.rpc("nvmf_delete_subsystem", json!({"nqn": NQN_A}));
    b.kill9();
    wait_for("the controller to be deleted", 15, || a.rpc("bdev_nvme_get_controllers", json!({})) == json!([]));
    assert!(a.try_rpc("bdev_get_bdevs", json!({"name": "rbn1"})).is_err());
    assert!(a.log_text().contains("deleted with its bdevs after ctrlr_loss_timeout_sec"));
}

/// Fencing (issue #15 item 3) with SPDK's nvmf_tgt as the legs' target: head A holds the legs
/// (Write Exclusive, key 0xA); head D is refused without `preempt_key`, then preempts A and
/// reads what A wrote; A's next write is refused by SPDK (Reservation Conflict) and A is fenced.
#[test]
fn a_stale_head_is_fenced_on_spdk_nvmf_tgt_legs() {
    const NQN_S: &str = "nqn.2016-06.io.spdk:fence";
    const NQN_D: &str = "nqn.2016-06.io.tidemark:node-d";
    let Some((_app, _tmp, s_addr)) = spdk_nvmf_tgt("a_stale_head_is_fenced_on_spdk_nvmf_tgt_legs", NQN_S, 2) else { return };
    let attach = |d: &Daemon, hostnqn: &str| {
        let mut p = attach_params("spdk", s_addr);
        p["subnqn"] = json!(NQN_S);
        p["hostnqn"] = json!(hostnqn);
        assert_eq!(d.rpc("bdev_nvme_attach_controller", p), json!(["spdkn1", "spdkn2"]));
    };
    let a = Daemon::start(&config("[0]"));
    attach(&a, "nqn.2016-06.io.tidemark:head-a");
    a.rpc("bdev_raid_create", json!({"name": "m0", "raid_level": "raid1", "base_bdevs": ["spdkn1", "spdkn2"], "reservation_key": 0xA}));
    let uuid = raid(&a, "m0")["uuid"].as_str().unwrap().to_string();
    let a_addr = export(&a, NQN_A, &["m0"]);
    let mut ha = host(a_addr, NQN_A);
    let data = pattern(64 * BS, 5);
    ha.write(1, 0, &data);

    let d = Daemon::start(&config("[0]"));
    attach(&d, "nqn.2016-06.io.tidemark:head-d");
    let mut create = json!({"name": "m0", "raid_level": "raid1", "base_bdevs": ["spdkn1", "spdkn2"], "uuid": uuid, "reservation_key": 0xD});
    let e = d.try_rpc("bdev_raid_create", create.clone()).expect_err("the legs are A's");
    assert!(e.message.contains("spdkn1") && e.message.contains("preempt_key"), "{e:?}");
    create["preempt_key"] = json!(0xA);
    d.rpc("bdev_raid_create", create);
    let d_addr = export(&d, NQN_D, &["m0"]);
    let mut hd = host(d_addr, NQN_D);
    assert!(hd.read(1, 0, 64) == data, "D reads what A acknowledged");

    let (cqe, _) = ha.q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 64), Payload::Out(&pattern(64 * BS, 6))).expect("A answers");
    assert_eq!((cqe.status().sct, cqe.status().sc), (0, 0x83), "A's write is refused: {}", cqe.status());
    let r = raid(&a, "m0");
    assert_eq!(r["fenced"], true, "{r}");
    assert!(hd.read(1, 0, 64) == data, "A's refused write reached no leg");
}

/// A controller the configuration attaches whose node does not answer at startup: with a
/// reconnect policy the daemon starts anyway and keeps it `connecting` (a head restarting while
/// a leg's node is down must serve its volumes), `save_config` keeps it, a detach cancels it,
/// and it attaches by itself once the node answers; with SPDK's default policy (no reconnects)
/// the start fails as in SPDK. A client's attach to a node that does not answer fails at once.
#[test]
fn a_configured_controller_whose_node_is_down_keeps_connecting() {
    let port = free_port();
    let attach_call = |name: &str, policy: &str| {
        format!(
            "[[bdev]]\nmethod = \"bdev_nvme_attach_controller\"\n\
             params = {{ name = \"{name}\", trtype = \"tcp\", adrfam = \"ipv4\", traddr = \"127.0.0.1\", trsvcid = \"{port}\", subnqn = \"{NQN_B}\"{policy} }}\n"
        )
    };
    let policy = ", ctrlr_loss_timeout_sec = -1, reconnect_delay_sec = 1";
    let a = Daemon::start(&format!("{MINIMAL_CONFIG}{}{}", attach_call("rb", policy), attach_call("rc", policy)));
    let c = a.rpc("bdev_nvme_get_controllers", json!({}));
    let states: Vec<_> = c.as_array().unwrap().iter().map(|x| (x["name"].clone(), x["ctrlrs"][0]["state"].clone())).collect();
    assert_eq!(states, vec![(json!("rb"), json!("connecting")), (json!("rc"), json!("connecting"))], "{c}");
    assert!(c[0]["ctrlrs"][0]["last_error"].as_str().is_some_and(|e| e.contains("cannot attach rb")), "{c}");
    let m = a.metrics();
    assert!(m.contains(r#"tidemark_nvme_tcp_controller_state{controller="rb",state="connecting"} 1"#), "{m}");
    let e = a.try_rpc("bdev_nvme_attach_controller", attach_params("rb", format!("127.0.0.1:{port}").parse().unwrap())).unwrap_err();
    assert_eq!(e.code, -17, "the name is taken while it connects: {}", e.message);
    let saved = a.rpc("save_config", json!({})).to_string();
    assert_eq!(saved.matches("bdev_nvme_attach_controller").count(), 2, "both are saved: {saved}");
    // A detach cancels one.
    assert_eq!(a.rpc("bdev_nvme_detach_controller", json!({"name": "rc"})), json!(true));
    let c = a.rpc("bdev_nvme_get_controllers", json!({}));
    assert_eq!(c.as_array().map(|v| v.len()), Some(1), "{c}");
    assert!(a.try_rpc("bdev_nvme_get_controllers", json!({"name": "rc"})).is_err());
    // The node comes up on that port: rb attaches by itself and its bdev appears.
    let b = Daemon::start(MINIMAL_CONFIG);
    b.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 512}));
    export_on(&b, NQN_B, &["m0"], port);
    let t0 = Instant::now();
    while a.try_rpc("bdev_get_bdevs", json!({"name": "rbn1"})).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "rb did not attach: {}", a.rpc("bdev_nvme_get_controllers", json!({})));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(a.rpc("bdev_nvme_get_controllers", json!({"name": "rb"}))[0]["ctrlrs"][0]["state"], "enabled");
    let saved = a.rpc("save_config", json!({})).to_string();
    assert_eq!(saved.matches("bdev_nvme_attach_controller").count(), 1, "rb once (by its bdev), rc gone: {saved}");
    drop(b);
    // A client's attach fails at once; so does a start whose configuration attaches a node
    // that does not answer with SPDK's default policy.
    let dead = free_port();
    let e = a.try_rpc("bdev_nvme_attach_controller", attach_params("rd", format!("127.0.0.1:{dead}").parse().unwrap())).unwrap_err();
    assert_eq!(e.code, -5, "{}", e.message);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!("{MINIMAL_CONFIG}{}", attach_call("rd", "")).replace(&format!("trsvcid = \"{port}\""), &format!("trsvcid = \"{dead}\""));
    let path = dir.path().join("t.toml");
    std::fs::write(
        &path,
        text.replace("{socket}", &dir.path().join("s.sock").display().to_string())
            .replace("{data_dir}", &dir.path().display().to_string())
            .replace("{metrics}", ""),
    )
    .unwrap();
    // (Bounded: a daemon that wrongly started would otherwise run on.)
    let o = std::process::Command::new("timeout").args(["30", TIDEMARKD, "--config"]).arg(&path).env_remove("RUST_LOG").output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() && o.status.code() != Some(124) && out.contains("cannot attach rd"), "{out}");
}
