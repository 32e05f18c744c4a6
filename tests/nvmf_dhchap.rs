//! NVMe in-band authentication (DH-HMAC-CHAP) end to end, with SPDK's host (`bdevperf` and
//! `bdev_nvme_attach_controller --dhchap-key/--dhchap-ctrlr-key` through keyring file keys)
//! against tidemark: the right keys connect and verify data; a wrong key, a missing key and a
//! wrong controller key are refused, counted and logged without the key; tidemark keeps
//! serving. SPDK is found through `SPDK_DIR` (see tests/spdk_host.rs); without it the SPDK
//! test says it skipped. The RPC test needs no SPDK.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;
use tidemark::nvmf::auth::{Digest, Secret};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:5b2d1f5e-7a2e-4bb1-9d6b-3f0e2a1c9d01";

/// A daemon exporting a 64 MiB RAM bdev on `NQN`, where `HOST` must authenticate with key0
/// (and the controller with ckey0).
fn start(dir: &Path) -> (Daemon, u16, String, String) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let (k0, c0) = (Secret::encode(Some(Digest::Sha256), &[0x11; 32]), Secret::encode(None, &[0x22; 48]));
    d.rpc("keyring_file_add_key", json!({"name": "key0", "path": key_file(dir, "t-key0", &k0)}));
    d.rpc("keyring_file_add_key", json!({"name": "ckey0", "path": key_file(dir, "t-ckey0", &c0)}));
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 16384, "block_size": 4096}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "serial_number": "SPDK0001", "allow_any_host": false}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m0", "nsid": 1}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    d.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"}));
    (d, port, k0, c0)
}

#[test]
fn rpcs_take_key_names_and_save_config_keeps_names_only() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _, k0, c0) = start(dir.path());
    let subs = d.rpc("nvmf_get_subsystems", Value::Null);
    let s = subs.as_array().unwrap().iter().find(|s| s["nqn"] == NQN).unwrap();
    assert_eq!(s["hosts"], json!([{"nqn": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"}]));
    // Unknown key, a key that is not a DHHC-1 secret, a controller key alone, bad names.
    let other = "nqn.2014-08.org.nvmexpress:uuid:other";
    assert!(d.try_rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": other, "dhchap_key": "nokey"})).is_err());
    d.rpc("keyring_file_add_key", json!({"name": "junk", "path": key_file(dir.path(), "junk", "not a secret")}));
    let e = d.try_rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": other, "dhchap_key": "junk"})).unwrap_err();
    assert!(!format!("{e:?}").contains("not a secret"), "the key's content leaked: {e:?}");
    assert!(d.try_rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": other, "dhchap_ctrlr_key": "ckey0"})).is_err());
    // A key in use cannot be removed.
    assert!(d.try_rpc("keyring_file_remove_key", json!({"name": "key0"})).is_err());
    d.rpc("nvmf_set_config", json!({"dhchap_digests": ["sha384", "sha512"], "dhchap_dhgroups": ["null", "ffdhe2048"]}));
    assert!(d.try_rpc("nvmf_set_config", json!({"dhchap_digests": ["md5"]})).is_err());
    assert!(d.try_rpc("nvmf_set_config", json!({"dhchap_dhgroups": ["ffdhe1024"]})).is_err());
    let cfg = d.rpc("save_config", Value::Null).to_string();
    assert!(cfg.contains(r#""dhchap_key":"key0""#) && cfg.contains(r#""dhchap_ctrlr_key":"ckey0""#), "{cfg}");
    assert!(cfg.contains(r#""dhchap_digests":["sha384","sha512"]"#) && cfg.contains(r#""dhchap_dhgroups":["null","ffdhe2048"]"#), "{cfg}");
    for secret in [&k0, &c0] {
        assert!(!cfg.contains(&secret[10..30]), "a secret reached save_config");
        assert!(!d.log_text().contains(&secret[10..30]), "a secret reached the log");
    }
}

/// Runs bdevperf's verify job for 2 s against the daemon as `HOST` with `keys` (SPDK keyring
/// names and secrets, host key first): whether it passed with I/O done and none failed, and its output.
fn bdevperf(spdk: &Path, dir: &Path, port: u16, keys: &[(&str, &str)], run: &str) -> (bool, String) {
    let mut keyring = vec![];
    for (name, secret) in keys {
        let path = key_file(dir, &format!("{run}-{name}"), secret);
        keyring.push(json!({"method": "keyring_file_add_key", "params": {"name": name, "path": path}}));
    }
    let mut attach = json!({"name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": port.to_string(),
                            "subnqn": NQN, "hostnqn": HOST});
    if let Some((k, _)) = keys.first() {
        attach["dhchap_key"] = json!(k);
    }
    if let Some((c, _)) = keys.get(1) {
        attach["dhchap_ctrlr_key"] = json!(c);
    }
    let conf = json!({"subsystems": [
        {"subsystem": "keyring", "config": keyring},
        {"subsystem": "bdev", "config": [{"method": "bdev_nvme_attach_controller", "params": attach}]},
    ]});
    let cfg = dir.join(format!("{run}.json"));
    std::fs::write(&cfg, conf.to_string()).unwrap();
    let log = dir.join(format!("{run}.log"));
    let f = std::fs::File::create(&log).unwrap();
    let mask = if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) > 1 { "0x2" } else { "0x1" };
    let mut child = Command::new(spdk.join("bin/bdevperf"))
        .args(["-m", mask, "--no-huge", "-s", "1024", "-q", "32", "-o", "4096", "-w", "verify", "-t", "2", "--json"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let totals: Vec<f64> = out
        .lines()
        .find(|l| l.trim_start().starts_with("Total"))
        .map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace().filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default();
    let ok = status.is_some_and(|s| s.success()) && totals.first().is_some_and(|&iops| iops > 0.0) && totals.get(2) == Some(&0.0);
    (ok, out)
}

#[test]
fn spdk_host_authenticates_and_wrong_or_missing_keys_are_refused() {
    let Some(spdk) = spdk_dir(&["bin/bdevperf"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (d, port, k0, c0) = start(dir.path());
    let wrong = Secret::encode(Some(Digest::Sha256), &[0x33; 32]);
    assert_eq!(d.metric("tidemark_nvmf_auth_failures_total"), 0.0);

    // Bidirectional, then unidirectional (SPDK offers every digest and group: the strongest wins).
    let (ok, out) = bdevperf(&spdk, dir.path(), port, &[("key0", &k0), ("ckey0", &c0)], "bidi");
    assert!(ok, "bdevperf with the right keys failed:\n{out}\n--- tidemarkd:\n{}", d.log_text());
    let (ok, out) = bdevperf(&spdk, dir.path(), port, &[("key0", &k0)], "uni");
    assert!(ok, "bdevperf with the host key only failed:\n{out}\n--- tidemarkd:\n{}", d.log_text());
    assert_eq!(d.metric("tidemark_nvmf_auth_failures_total"), 0.0);

    for (run, keys) in [("wrong", vec![("key0", wrong.as_str())]), ("missing", vec![]), ("wrongctrl", vec![("key0", k0.as_str()), ("ckey0", wrong.as_str())])] {
        let before = d.metric("tidemark_nvmf_auth_failures_total");
        let (ok, out) = bdevperf(&spdk, dir.path(), port, &keys, run);
        assert!(!ok, "bdevperf {run} got through:\n{out}");
        if run != "missing" {
            // A host without a key never starts a transaction: its commands are refused.
            assert!(d.metric("tidemark_nvmf_auth_failures_total") > before, "{run}: not counted\n{}", d.log_text());
        }
    }
    let log = d.log_text();
    assert!(log.contains(&format!("host {HOST} (127.0.0.1:")) && log.contains("failed DH-HMAC-CHAP"), "{log}");
    for secret in [&k0, &c0, &wrong] {
        assert!(!log.contains(&secret[10..30]), "a secret reached the log");
    }
    // The target kept serving.
    let (ok, out) = bdevperf(&spdk, dir.path(), port, &[("key0", &k0), ("ckey0", &c0)], "after");
    assert!(ok, "bdevperf after the refusals failed:\n{out}\n--- tidemarkd:\n{}", d.log_text());
}

/// AUTH_Send (`data`) or AUTH_Receive (`data` empty: 4 KiB) on `q`: the completion and data.
fn auth_cmd(q: &mut tidemark::nvmf::initiator::Qpair, data: &[u8]) -> (tidemark::nvmf::spec::Cqe, Vec<u8>) {
    use tidemark::nvmf::initiator::Payload;
    use tidemark::nvmf::spec::{fctype, Sqe, FABRICS_OPC};
    let mut sqe = Sqe::new(FABRICS_OPC, 0, 0);
    sqe.0[4] = if data.is_empty() { fctype::AUTH_RECEIVE } else { fctype::AUTH_SEND };
    sqe.0[41] = 1;
    sqe.0[42] = 1;
    sqe.0[43] = 0xE9;
    let len = if data.is_empty() { 4096 } else { data.len() as u32 };
    sqe.0[44..48].copy_from_slice(&len.to_le_bytes());
    let payload = if data.is_empty() { Payload::In(4096) } else { Payload::Out(data) };
    q.execute(sqe, payload).unwrap()
}

#[test]
fn an_unauthenticated_queue_refuses_commands_and_a_failure_is_counted() {
    use tidemark::nvmf::auth::msg::{id, Message};
    use tidemark::nvmf::initiator::{Qpair, QpairOptions};
    use tidemark::nvmf::spec::{admin_opc, Sqe};
    let dir = tempfile::tempdir().unwrap();
    let (d, port, k0, _) = start(dir.path());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let o = QpairOptions { hostnqn: HOST.to_string(), ..QpairOptions::default() };
    let mut q = Qpair::connect(addr, &o).unwrap();
    q.fabric_connect(0, 0xFFFF, NQN, &o).expect("Connect succeeds; authentication follows");
    // Identify before authenticating: Authentication Required (SCT 1, SC 0x91).
    let mut identify = Sqe::new(admin_opc::IDENTIFY, 0, 0);
    identify.0[40] = 1;
    let (cqe, _) = q.execute(identify, tidemark::nvmf::initiator::Payload::In(4096)).unwrap();
    assert_eq!((cqe.status().sct, cqe.status().sc), (1, 0x91), "{}", cqe.status());
    // Nothing to receive before a Negotiate.
    assert!(!auth_cmd(&mut q, &[]).0.status().is_success());
    // A Negotiate, then a Reply with a wrong response: Failure1, counted, logged.
    let n = Message::Negotiate { tid: 1, sc_c: 0, hashes: vec![1], dhgroups: vec![0] }.encode();
    assert!(auth_cmd(&mut q, &n).0.status().is_success());
    let (cqe, data) = auth_cmd(&mut q, &[]);
    assert!(cqe.status().is_success());
    let Ok(Message::Challenge { .. }) = Message::decode(&data) else { panic!("no challenge: {data:?}") };
    let before = d.metric("tidemark_nvmf_auth_failures_total");
    let reply = Message::Reply { tid: 1, response: vec![0; 32], challenge: None, seqnum: 0, dh: vec![] }.encode();
    assert!(auth_cmd(&mut q, &reply).0.status().is_success());
    let (_, data) = auth_cmd(&mut q, &[]);
    assert_eq!(data.get(1), Some(&id::FAILURE1));
    assert_eq!(d.metric("tidemark_nvmf_auth_failures_total"), before + 1.0);
    let (cqe, _) = q.execute(identify, tidemark::nvmf::initiator::Payload::In(4096)).unwrap();
    assert_eq!(cqe.status().sc, 0x91);
    assert!(d.log_text().contains("wrong response"));
    assert!(!d.log_text().contains(&k0[10..30]));
}
