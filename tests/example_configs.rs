//! The example configurations in `config/` run as their comments say: each is started on the
//! real daemon (listener ports moved to free ones, data in a private directory) and checked for
//! what it promises to a user who copies it.

mod support;

use serde_json::json;
use std::process::Command;
use support::*;
use tidemark::nvmf::initiator::{Controller, Error, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::io_opc;

const ALLOWED_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000002";

fn example(name: &str) -> String {
    let path = format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The clients this test drives; false: skip (TIDEMARK_SKIP_ISCSI=1).
fn tools(cmds: &[&str]) -> bool {
    require_tools(cmds, "TIDEMARK_SKIP_ISCSI")
}

#[test]
fn the_mirrored_export_example_runs_and_enforces_its_access_rules() {
    let (nvmf_port, iscsi_port) = (free_port(), free_port());
    let text = example("mirrored-export.toml")
        .replace("trsvcid = \"4420\"", &format!("trsvcid = \"{nvmf_port}\""))
        .replace("port = \"3260\"", &format!("port = \"{iscsi_port}\""));
    assert!(text.contains(&nvmf_port.to_string()) && text.contains(&iscsi_port.to_string()), "the example's listeners moved");
    let mut d = Daemon::start(&text);
    d.rpc("framework_wait_init", json!(null));

    // The stack: a CoW volume over a two-leg mirror, both legs in sync.
    let raids = d.rpc("bdev_raid_get_bdevs", json!({"category": "all"}));
    for name in ["mirror1", "store1"] {
        let r = raids.as_array().and_then(|a| a.iter().find(|r| r["name"] == name)).unwrap_or_else(|| panic!("{name} missing: {raids}"));
        assert_eq!(r["state"], "online", "{r}");
        assert_eq!(r["num_base_bdevs_operational"], 2, "{r}");
    }
    let vol = d.rpc("bdev_get_bdevs", json!({"name": "vol1"}));
    assert_eq!(vol[0]["block_size"], 4096);

    // NVMe/TCP: the listed host reads what it wrote; any other host is refused.
    let addr = format!("127.0.0.1:{nvmf_port}").parse().expect("address");
    let nqn = "nqn.2016-06.io.tidemark:vol1";
    let opts = |h: &str| QpairOptions { hostnqn: h.to_string(), ..QpairOptions::default() };
    match Controller::connect(addr, nqn, &opts(OTHER_HOST)) {
        Err(Error::Status(s)) => assert_eq!((s.sct, s.sc), (1, 0x84), "Connect Invalid Host"),
        other => panic!("a host not on the allow-list connected: {:?}", other.map(|c| c.cntlid)),
    }
    let mut c = Controller::connect(addr, nqn, &opts(ALLOWED_HOST)).expect("the listed host connects");
    let mut q = c.connect_io(1, 16).expect("I/O queue");
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    let (cqe, _) = q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 100, 2), Payload::Out(&data)).expect("write");
    assert!(cqe.status().is_success());
    let (cqe, back) = q.execute(Qpair::rw_sqe(io_opc::READ, 1, 100, 2), Payload::In(8192)).expect("read");
    assert!(cqe.status().is_success());
    assert_eq!(back, data);

    // Preserve works on it out of the box.
    let snap = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol1", "snapshot_name": "s1", "wait_sealed": true}));
    assert_eq!(snap["state"], "sealed", "{snap}");

    // iSCSI: mutual CHAP for the one initiator; without the secrets, or as another
    // initiator, no login.
    if tools(&["iscsi-inq", "timeout"]) {
        let lun = |creds: &str, extra: &str| format!("iscsi://{creds}127.0.0.1:{iscsi_port}/iqn.2016-06.io.tidemark:vol1/0{extra}");
        let inq = |initiator: &str, url: String| {
            let o = Command::new("timeout").args(["20", "iscsi-inq", "-i", initiator, &url]).output().expect("run iscsi-inq");
            (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        };
        let good = "?target_user=tidemark&target_password=change-this-secret-2";
        let (ok, out) = inq("iqn.2016-06.io.example:host1", lun("host1%change-this-secret-1@", good));
        assert!(ok && out.contains("DIRECT_ACCESS"), "the configured initiator with both secrets: {out}");
        let (ok, out) = inq("iqn.2016-06.io.example:host1", lun("", ""));
        assert!(!ok, "no CHAP must be refused: {out}");
        let (ok, out) = inq("iqn.2016-06.io.example:host1", lun("host1%wrong-secret-here@", good));
        assert!(!ok, "a wrong secret must be refused: {out}");
        let (ok, out) = inq("iqn.2016-06.io.example:stranger", lun("host1%change-this-secret-1@", good));
        assert!(!ok, "an initiator outside the group must be refused: {out}");
    }
    let status = d.terminate(std::time::Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "SIGTERM stops the daemon cleanly: {status:?}");
}

#[test]
fn every_example_passes_check_config() {
    let dir = format!("{}/config", env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).expect("config/") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            let o = Command::new(TIDEMARKD).arg("--config").arg(&path).arg("--check-config").output().expect("run tidemarkd");
            assert!(o.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 2, "the default and at least one example");
}

#[test]
fn the_cow_volume_example_serves_and_keeps_its_volume() {
    let (nvmf_port, iscsi_port) = (free_port(), free_port());
    let text = example("cow-volume.toml")
        .replace("trsvcid = \"4420\"", &format!("trsvcid = \"{nvmf_port}\""))
        .replace("port = \"3260\"", &format!("port = \"{iscsi_port}\""));
    assert!(text.contains(&nvmf_port.to_string()) && text.contains(&iscsi_port.to_string()), "the example's listeners moved");
    let mut d = Daemon::start(&text);
    d.rpc("framework_wait_init", json!(null));
    let vol = d.rpc("bdev_get_bdevs", json!({"name": "vol0"}));
    assert_eq!((vol[0]["product_name"].as_str(), vol[0]["num_blocks"].as_u64()), (Some("CoW volume"), Some(2 << 20)), "{vol}");
    assert!(d.data_dir().join("vol0.img").exists() && d.data_dir().join("vol0.store").exists(), "the files the old default made");

    let addr = format!("127.0.0.1:{nvmf_port}").parse().expect("address");
    let write_read = |data: Option<&[u8]>| {
        let mut c = Controller::connect(addr, "nqn.2016-06.io.tidemark:vol0", &QpairOptions::default()).expect("connect");
        let mut q = c.connect_io(1, 16).expect("I/O queue");
        if let Some(data) = data {
            let (cqe, _) = q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 64, 8), Payload::Out(data)).expect("write");
            assert!(cqe.status().is_success());
        }
        let (cqe, back) = q.execute(Qpair::rw_sqe(io_opc::READ, 1, 64, 8), Payload::In(4096)).expect("read");
        assert!(cqe.status().is_success());
        back
    };
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 5 + 1) as u8).collect();
    assert_eq!(write_read(Some(&data)), data);
    let snap = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "s1", "wait_sealed": true}));
    assert_eq!(snap["state"], "sealed", "{snap}");

    // The same file at a restart opens the volume and its store, snapshot included.
    let status = d.terminate(std::time::Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    d.restart();
    d.rpc("framework_wait_init", json!(null));
    assert_eq!(write_read(None), data);
    let snaps = d.rpc("bdev_snapshot_get", json!({"name": "s1"}));
    assert_eq!(snaps[0]["origin"], "vol0", "{snaps}");
}
