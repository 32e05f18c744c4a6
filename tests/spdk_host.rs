//! SPDK's own NVMe/TCP host against tidemark: `spdk_nvme_perf` (4 KiB random reads and writes
//! at queue depth 1, 32 and the deepest queue the target advertises, with and without header
//! and data digests) and `bdevperf` (a verify workload through `bdev_nvme_attach_controller`,
//! from a JSON config and over bdevperf's RPC, where it also sees namespaces come and go
//! through asynchronous events, resets the controller and detaches it).
//!
//! SPDK is found through `SPDK_DIR` (a folder with `bin/spdk_nvme_perf` and `bin/bdevperf`,
//! such as SPDK v25.09's build in `../shared/peers/spdk-v25.09`); without it those tests say
//! that they skipped. The first test needs no SPDK: it replays with our own initiator what
//! SPDK's host does that other hosts do not.

mod support;

use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use support::*;
use tidemark::nvmf::initiator::{Controller, Error, Payload, QpairOptions};
use tidemark::nvmf::pdu;
use tidemark::nvmf::spec::{self, admin_opc, prop, Cqe, Sqe};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
/// The queue size tidemark's TCP transport advertises by default (CAP.MQES + 1, MAXCMD).
const MAX_QUEUE_DEPTH: u32 = 128;

/// A daemon on core 0 exporting a 64 MiB RAM bdev with 4 KiB blocks as nsid 1 of `NQN`.
fn start(allow_any_host: bool) -> (Daemon, SocketAddr) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 16384, "block_size": 4096}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "serial_number": "SPDK0001", "allow_any_host": allow_any_host}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m0", "nsid": 1}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let tr = d.rpc("nvmf_get_transports", Value::Null);
    assert_eq!(tr[0]["max_queue_depth"], json!(MAX_QUEUE_DEPTH), "the test assumes the default queue depth");
    (d, format!("127.0.0.1:{port}").parse().unwrap())
}

#[test]
fn what_spdks_host_sends_is_accepted() {
    // SPDK's tools connect without a host NQN unless the user names one.
    let (d, addr) = start(true);
    let anonymous = QpairOptions { hostnqn: String::new(), ..QpairOptions::default() };
    let mut c = Controller::connect(addr, NQN, &anonymous).expect("a Connect without a host NQN is accepted");
    let ctrls = d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}));
    assert_eq!(ctrls[0]["hostnqn"], "");
    let mut q = c.connect_io(1, MAX_QUEUE_DEPTH as u16).expect("an I/O queue of the advertised size, same anonymous host");
    let (cqe, _) = q.execute(tidemark::nvmf::initiator::Qpair::rw_sqe(spec::io_opc::READ, 1, 0, 1), Payload::In(4096)).unwrap();
    assert!(cqe.status().is_success());

    // At shutdown SPDK's host completes its own AERs and reuses their command ids for
    // Property Get/Set CC: the new command replaces the AER instead of a CID conflict.
    c.set_features(spec::feat::ASYNC_EVENT_CONFIG, 1 << 8).unwrap();
    let aer = c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    c.admin.flush().unwrap();
    let mut get = Sqe::new(spec::FABRICS_OPC, aer, 0);
    get.0[4] = spec::fctype::PROPERTY_GET;
    get.0[spec::property::OFFSET..spec::property::OFFSET + 4].copy_from_slice(&prop::CC.to_le_bytes());
    get.set_sgl(0, 0, spec::sgl::TRANSPORT_DATA_BLOCK);
    c.admin.send_raw(pdu::capsule_cmd(&get, 0, false, false).as_slice()).unwrap();
    let resp = c.admin.recv_pdu().expect("a response to the reused id");
    assert_eq!(resp[0], pdu::pdu_type::CAPSULE_RESP);
    let cqe = Cqe::from_bytes(resp[pdu::CH_LEN..pdu::CH_LEN + 16].try_into().unwrap());
    assert_eq!(cqe.cid, aer);
    assert!(cqe.status().is_success(), "Property Get CC with an AER's id: {}", cqe.status());
    assert_eq!(cqe.dw0 & 1, 1, "CC.EN read back");
    // The AER is gone: a namespace event finds none outstanding and waits for the next one.
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 256, "block_size": 4096}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m1"}}));
    let aer2 = c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    c.admin.flush().unwrap();
    let resp = c.admin.recv_pdu().expect("the pending event");
    let cqe = Cqe::from_bytes(resp[pdu::CH_LEN..pdu::CH_LEN + 16].try_into().unwrap());
    assert_eq!((cqe.cid, cqe.dw0), (aer2, 0x0004_0002), "the event went to the new AER");
    drop(q);
    drop(c);

    // Where only listed hosts may connect, a host without an NQN is not one of them.
    let (_d2, addr2) = start(false);
    match Controller::connect(addr2, NQN, &anonymous) {
        Err(Error::Status(s)) => assert_eq!((s.sct, s.sc), (1, 0x84), "Connect Invalid Host"),
        other => panic!("expected Connect Invalid Host, got {:?}", other.map(|c| c.cntlid)),
    }
}

/// Starts `cmd` with its output in `log`.
fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).expect("log file");
    cmd.stdin(Stdio::null()).stdout(Stdio::from(f.try_clone().expect("dup"))).stderr(Stdio::from(f));
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Waits for `child` at most `timeout`; kills it (by its PID) when it takes longer.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion (at most `timeout`): its exit status and output.
fn run(cmd: Command, log: &Path, timeout: Duration) -> (Option<ExitStatus>, String) {
    let mut child = spawn_logged(cmd, log);
    let status = wait_or_kill(&mut child, timeout);
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

/// The numbers after the colon of the output's `Total` line (perf: IOPS, MiB/s, average, min
/// and max latency; bdevperf: IOPS, MiB/s, Fail/s, TO/s, latencies).
fn totals(out: &str) -> Vec<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with("Total")).unwrap_or_else(|| panic!("no Total line in:\n{out}"));
    line.split(':').nth(1).unwrap_or("").split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

#[test]
fn spdk_nvme_perf_runs_io_at_every_queue_depth_with_and_without_digests() {
    let Some(spdk) = spdk_dir(&["bin/spdk_nvme_perf", "bin/bdevperf"]) else { return };
    let (d, addr) = start(true);
    let trid = format!("trtype:TCP adrfam:IPv4 traddr:{} trsvcid:{} subnqn:{NQN}", addr.ip(), addr.port());
    let log = d.dir.path().join("spdk_nvme_perf.log");
    // (pattern, queue depth, I/O queue size): the smallest queue (2 entries) and the largest
    // the target advertises, whose size perf takes from CAP.MQES and MAXCMD by default.
    let mut runs: Vec<(&str, u32, Option<u32>)> = Vec::new();
    for qd in [1, 32] {
        for w in ["randread", "randwrite"] {
            runs.push((w, qd, None));
        }
    }
    runs.push(("randrw", MAX_QUEUE_DEPTH, None));
    runs.push(("randrw", 4, Some(2)));
    let mut report = String::new();
    for digests in [false, true] {
        for &(w, qd, qsize) in &runs {
            let mut cmd = Command::new(spdk.join("bin/spdk_nvme_perf"));
            cmd.args(["-c", client_mask(), "--no-huge", "-s", "1024", "-o", "4096", "-t", "2", "-w", w]).args(["-q", &qd.to_string()]).args(["-r", &trid]);
            if w == "randrw" {
                cmd.args(["-M", "50"]);
            }
            if let Some(n) = qsize {
                cmd.args(["--io-queue-size", &n.to_string()]);
            }
            if digests {
                cmd.args(["-H", "-I"]);
            }
            let what = format!(
                "{w} QD{qd}{} {}",
                qsize.map(|n| format!(" (I/O queue of {n})")).unwrap_or_default(),
                if digests { "with digests" } else { "without digests" }
            );
            let (status, out) = run(cmd, &log, Duration::from_secs(60));
            assert!(status.is_some_and(|s| s.success()), "spdk_nvme_perf {what}: {status:?}\n{out}\n--- tidemarkd:\n{}", d.log_text());
            // SPDK's host logs every failed command, a failed Connect and a failed shutdown.
            assert!(!out.contains("*ERROR*"), "spdk_nvme_perf {what} reported errors:\n{out}");
            let iops = totals(&out)[0];
            assert!(iops > 0.0, "spdk_nvme_perf {what}: no I/O\n{out}");
            report += &format!("  {what:<48} {iops:>10.0} IOPS\n");
        }
    }
    eprintln!("spdk_nvme_perf against tidemark (debug build, shared machine: not a benchmark):\n{report}");
    assert!(d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().unwrap().is_empty(), "every perf run disconnected");
}

/// Sends one JSON-RPC request to an SPDK application and returns its result.
fn spdk_rpc(socket: &Path, method: &str, params: Value) -> Result<Value, Value> {
    let s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("SPDK RPC socket {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    (&s).write_all(req.to_string().as_bytes()).expect("send");
    let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<Value>().next().expect("an answer").expect("JSON");
    match resp.get("error") {
        Some(e) => Err(e.clone()),
        None => Ok(resp["result"].clone()),
    }
}

fn bdev_names(socket: &Path) -> Vec<String> {
    let v = spdk_rpc(socket, "bdev_get_bdevs", Value::Null).expect("bdev_get_bdevs");
    v.as_array().into_iter().flatten().filter_map(|b| b["name"].as_str().map(String::from)).collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bdevperf_verifies_through_an_attached_tidemark_controller() {
    let Some(spdk) = spdk_dir(&["bin/spdk_nvme_perf", "bin/bdevperf"]) else { return };
    let (d, addr) = start(true);
    let attach = |name: &str, digests: bool| {
        json!({"name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": addr.ip().to_string(), "trsvcid": addr.port().to_string(),
               "subnqn": NQN, "hdgst": digests, "ddgst": digests})
    };

    // From a JSON config, as `bdevperf --json` users do.
    for digests in [false, true] {
        let cfg = d.dir.path().join("bdevperf.json");
        let conf = json!({"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_nvme_attach_controller", "params": attach("Nvme0", digests)}]}]});
        std::fs::write(&cfg, conf.to_string()).unwrap();
        let mut cmd = Command::new(spdk.join("bin/bdevperf"));
        cmd.args(["-m", client_mask(), "--no-huge", "-s", "1024", "-q", "32", "-o", "4096", "-w", "verify", "-t", "2", "--json"]).arg(&cfg);
        let (status, out) = run(cmd, &d.dir.path().join("bdevperf.log"), Duration::from_secs(90));
        assert!(status.is_some_and(|s| s.success()), "bdevperf verify (digests {digests}): {status:?}\n{out}\n--- tidemarkd:\n{}", d.log_text());
        let t = totals(&out);
        assert!(t[0] > 0.0, "bdevperf verify (digests {digests}): no I/O\n{out}");
        assert_eq!(t[2], 0.0, "bdevperf verify (digests {digests}): failed I/O\n{out}");
        eprintln!("bdevperf verify QD32 4 KiB, digests {digests}: {:.0} IOPS", t[0]);
    }

    // Over bdevperf's RPC: attach, follow namespace changes (AER, Changed Namespace List,
    // Identify), run the verify job on both namespaces, reset the controller, detach.
    let sock = d.dir.path().join("bdevperf.sock");
    let mut cmd = Command::new(spdk.join("bin/bdevperf"));
    cmd.args(["-m", client_mask(), "--no-huge", "-s", "1024", "-z", "-q", "32", "-o", "4096", "-w", "verify", "-t", "2", "-r"]).arg(&sock);
    let log = d.dir.path().join("bdevperf-rpc.log");
    let mut bp = spawn_logged(cmd, &log);
    let bp_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("bdevperf's RPC socket", Duration::from_secs(30), || UnixStream::connect(&sock).is_ok());
    let names = spdk_rpc(&sock, "bdev_nvme_attach_controller", attach("Nvme0", true)).unwrap_or_else(|e| panic!("attach: {e}\n{}", bp_log()));
    assert_eq!(names, json!(["Nvme0n1"]));
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 2048, "block_size": 4096}));
    assert_eq!(d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m1"}})), json!(2));
    wait_for("Nvme0n2 on SPDK's host", Duration::from_secs(20), || bdev_names(&sock).contains(&"Nvme0n2".to_string()));
    let res = spdk_rpc(&sock, "perform_tests", Value::Null).unwrap_or_else(|e| panic!("perform_tests: {e}\n{}", bp_log()));
    let jobs = res["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 2, "one job per namespace: {res}");
    for j in &jobs {
        assert_eq!(j["io_failed"], json!(0), "{j}");
        assert!(j["iops"].as_f64().unwrap_or(0.0) > 0.0, "{j}");
    }
    spdk_rpc(&sock, "bdev_nvme_reset_controller", json!({"name": "Nvme0"})).unwrap_or_else(|e| panic!("reset: {e}\n{}", bp_log()));
    let ctrls = spdk_rpc(&sock, "bdev_nvme_get_controllers", json!({"name": "Nvme0"})).unwrap();
    assert_eq!(ctrls[0]["ctrlrs"][0]["state"], "enabled", "{ctrls}");
    d.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 2}));
    wait_for("Nvme0n2 to go", Duration::from_secs(20), || !bdev_names(&sock).contains(&"Nvme0n2".to_string()));
    spdk_rpc(&sock, "bdev_nvme_detach_controller", json!({"name": "Nvme0"})).unwrap_or_else(|e| panic!("detach: {e}\n{}", bp_log()));
    wait_for("the controller to leave tidemark", Duration::from_secs(20), || {
        d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().is_some_and(|a| a.is_empty())
    });
    let _ = spdk_rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
    if wait_or_kill(&mut bp, Duration::from_secs(20)).is_none() {
        eprintln!("bdevperf did not stop on SIGTERM; killed");
    }
    // The only error SPDK's host logs here is its own socket closing during the reset
    // ("Failed to flush (9)"), which it logs against SPDK's nvmf_tgt as well.
    let errors: Vec<String> = bp_log().lines().filter(|l| l.contains("*ERROR*") && !l.contains("Failed to flush (9)")).map(String::from).collect();
    assert!(errors.is_empty(), "bdevperf reported errors:\n{}", errors.join("\n"));
}
