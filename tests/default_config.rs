//! The README's first command: the daemon on the embedded default configuration. Run here on
//! private ports and paths (the same file with 4420/3260/9464 and the paths replaced), it must
//! come up with the thin pool volume `pool0/vol0` exported over NVMe/TCP and iSCSI,
//! preservable with one RPC, and small at idle; and the same file, replayed at every restart,
//! must open the pool and volume the first start made, with what hosts wrote to them.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use support::*;
use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::io_opc;

const NQN: &str = "nqn.2016-06.io.tidemark:vol0";
const VOL: &str = "pool0/vol0";
/// Where the NVMe/TCP client writes: 100 MiB into the volume (512-byte blocks), a cluster of
/// its own, away from what qemu-io writes at 0.
const NVME_LBA: u64 = 100 << 11;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
}

/// The default configuration with every fixed port and path replaced by this test's.
fn default_on_private_ports(nvmf_port: u16, iscsi_port: u16) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")).unwrap();
    assert_eq!(text, tidemark::config::DEFAULT_CONFIG, "the embedded default is config/default.toml");
    let cfg = text
        .replace("\"/var/tmp/tidemark\"", "\"{data_dir}\"")
        .replace("\"/var/tmp/tidemark.sock\"", "\"{socket}\"")
        .replace("\"127.0.0.1:9464\"", "\"{metrics}\"")
        .replace("\"4420\"", "\"{nvmf_port}\"")
        .replace("\"3260\"", "\"{iscsi_port}\"");
    // Checked before the ports go in: a free port may itself contain 4420 or 3260 (34420).
    let settings = cfg.lines().filter(|l| !l.trim_start().starts_with('#'));
    assert!(settings.clone().all(|l| !l.contains("4420") && !l.contains("3260") && !l.contains("/var/tmp")), "every fixed port and path was replaced");
    cfg.replace("{nvmf_port}", &nvmf_port.to_string()).replace("{iscsi_port}", &iscsi_port.to_string())
}

/// The pool's volume as `bdev_lvol_get_lvols` lists it.
fn lvol(d: &Daemon, name: &str) -> Value {
    let lvols = d.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool0"}));
    lvols.as_array().and_then(|a| a.iter().find(|l| l["name"] == name)).cloned().unwrap_or_else(|| panic!("no lvol {name}: {lvols}"))
}

fn pool(d: &Daemon) -> Value {
    let stores = d.rpc("bdev_lvol_get_lvstores", json!(null));
    assert_eq!(stores.as_array().map(Vec::len), Some(1), "one pool: {stores}");
    stores[0].clone()
}

/// A controller of the default subsystem (kept: its admin queue ends the association when
/// dropped) and an I/O queue.
fn nvme_queue(nvmf_port: u16) -> (Controller, Qpair) {
    let addr: SocketAddr = format!("127.0.0.1:{nvmf_port}").parse().expect("address");
    let mut c = Controller::connect(addr, NQN, &QpairOptions::default()).expect("connect to the default subsystem");
    let q = c.connect_io(1, 16).expect("I/O queue");
    (c, q)
}

fn pattern() -> Vec<u8> {
    (0..8192u32).map(|i| (i * 13 + 7) as u8).collect()
}

/// What the NVMe/TCP client reads at [`NVME_LBA`].
fn nvme_read(nvmf_port: u16) -> Vec<u8> {
    let (_c, mut q) = nvme_queue(nvmf_port);
    let (cqe, back) = q.execute(Qpair::rw_sqe(io_opc::READ, 1, NVME_LBA, 16), Payload::In(8192)).expect("read");
    assert!(cqe.status().is_success(), "read: {:?}", cqe.status());
    back
}

fn qemu_io(iscsi_port: u16, cmds: &[&str]) -> String {
    let url = format!("iscsi://127.0.0.1:{iscsi_port}/iqn.2016-06.io.tidemark:vol0/0");
    let mut args = vec!["60", "qemu-io", "-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&url);
    let w = Command::new("timeout").args(&args).output().expect("run qemu-io");
    let out = String::from_utf8_lossy(&w.stdout).to_string();
    assert!(w.status.success() && !out.contains("Pattern verification failed"), "qemu-io {cmds:?}: {out}{}", String::from_utf8_lossy(&w.stderr));
    out
}

#[test]
fn default_config_serves_the_pool_volume_on_both_front_ends_and_keeps_it_across_restarts() {
    let (nvmf_port, iscsi_port) = (free_port(), free_port());
    let mut d = Daemon::start(&default_on_private_ports(nvmf_port, iscsi_port));

    // First start: the pool on its file, the thin volume in it, nothing allocated yet.
    let p = pool(&d);
    assert_eq!((p["name"].as_str(), p["base_bdev"].as_str(), p["cluster_size"].as_u64()), (Some("pool0"), Some("pool0_base"), Some(1 << 20)), "{p}");
    let total = p["total_data_clusters"].as_u64().expect("total");
    assert!(total > 4000 && p["free_clusters"] == total, "a fresh 4 GiB pool: {p}");
    let v = lvol(&d, "vol0");
    assert_eq!(
        (v["is_thin_provisioned"].as_bool(), v["num_allocated_clusters"].as_u64(), v["num_clusters"].as_u64()),
        (Some(true), Some(0), Some(1024)),
        "{v}"
    );
    let b = d.rpc("bdev_get_bdevs", json!({"name": VOL}));
    assert_eq!(b[0]["num_blocks"].as_u64().unwrap() * b[0]["block_size"].as_u64().unwrap(), 1 << 30, "{b}");
    assert_eq!(b[0]["product_name"], "Logical Volume", "{b}");
    let subs = d.rpc("nvmf_get_subsystems", json!(null)).to_string();
    assert!(subs.contains(NQN) && subs.contains(&nvmf_port.to_string()), "{subs}");
    let nodes = d.rpc("iscsi_get_target_nodes", json!(null)).to_string();
    assert!(nodes.contains("iqn.2016-06.io.tidemark:vol0"), "{nodes}");
    let file = d.data_dir().join("pool0.img");
    assert_eq!(std::fs::metadata(&file).map(|m| m.len()).ok(), Some(4 << 30), "the pool's sparse file");

    // Small at idle, the pool being file-backed.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rss = rss_kib(d.pid());
    println!("idle RSS on the default config: {} KiB", rss);
    assert!(rss < 200 * 1024, "idle RSS {rss} KiB");

    // An RPC client still gets SPDK's errors for a pool or volume that exists: only the
    // configuration's own steps, replayed at a restart, open what they made.
    let e = d.try_rpc("bdev_lvol_create_lvstore", json!({"bdev_name": "pool0_base", "lvs_name": "pool0"})).unwrap_err();
    assert_eq!(e.code, -17, "{e:?}");
    let e = d.try_rpc("bdev_lvol_create", json!({"lvs_name": "pool0", "lvol_name": "vol0", "size_in_mib": 1024, "thin_provision": true})).unwrap_err();
    assert_eq!(e.code, -17, "{e:?}");

    // Hosts write: the NVMe/TCP client (always) and qemu-io over iSCSI (when installed).
    let data = pattern();
    let (c, mut q) = nvme_queue(nvmf_port);
    let (cqe, _) = q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, NVME_LBA, 16), Payload::Out(&data)).unwrap_or_else(|e| panic!("write: {e:?}\n{}", d.log_text()));
    assert!(cqe.status().is_success(), "write: {:?}", cqe.status());
    drop((q, c));
    let iscsi = have("qemu-io");
    if iscsi {
        qemu_io(iscsi_port, &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    }
    let allocated = if iscsi { 2 } else { 1 };
    assert_eq!(lvol(&d, "vol0")["num_allocated_clusters"].as_u64(), Some(allocated), "one cluster per region written");
    assert_eq!(pool(&d)["free_clusters"].as_u64(), Some(total - allocated));

    // One command preserves the volume; the snapshot is a read-only volume of the pool.
    let s = d.rpc("bdev_snapshot_create", json!({"bdev_name": VOL, "snapshot_name": "first", "wait_sealed": true}));
    assert_eq!(s["state"], "sealed", "{s}");
    let out = d.cli(&["bdev_snapshot_get", "--name", "pool0/first"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"origin\": \"pool0/vol0\""), "{}", String::from_utf8_lossy(&out.stdout));

    // A crash (SIGKILL by PID) and a clean stop: each restart on the same file opens the pool,
    // with the volume, its snapshot, what was written and the space it took.
    for crash in [true, false] {
        let pid = d.pid();
        if crash {
            d.kill9();
        } else {
            let status = d.terminate(std::time::Duration::from_secs(30));
            assert!(status.is_some_and(|s| s.success()), "SIGTERM stops the daemon cleanly: {status:?}");
        }
        d.restart();
        assert_ne!(d.pid(), pid, "a new process");
        d.rpc("framework_wait_init", json!(null));
        let log = d.log_text();
        assert!(log.contains("lvol store pool0") && log.contains("not created again"), "the restart says it opened the pool:\n{log}");
        let p = pool(&d);
        assert_eq!((p["total_data_clusters"].as_u64(), p["free_clusters"].as_u64()), (Some(total), Some(total - allocated)), "{p}");
        let v = lvol(&d, "vol0");
        assert_eq!((v["is_thin_provisioned"].as_bool(), v["num_allocated_clusters"].as_u64()), (Some(true), Some(allocated)), "{v}");
        assert_eq!(lvol(&d, "first")["is_snapshot"], true);
        assert_eq!(nvme_read(nvmf_port), data, "what the NVMe/TCP host wrote before the {} is there", if crash { "crash" } else { "stop" });
        if iscsi {
            qemu_io(iscsi_port, &["read -P 0x5a 0 1M"]);
        }
        let m = d.metrics_text();
        let gauge = m
            .lines()
            .find(|l| l.starts_with("tidemark_lvol_allocated_clusters{") && l.contains("lvol=\"vol0\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        assert_eq!(gauge, Some(allocated as f64), "allocated space in the metrics:\n{m}");
    }
}

/// A data directory whose pool does not match the configuration stops the start with an
/// error naming the conflict: the daemon never replaces a volume it did not make.
#[test]
fn a_restart_on_a_conflicting_volume_fails_and_names_it() {
    let (nvmf_port, iscsi_port) = (free_port(), free_port());
    let mut d = Daemon::start(&default_on_private_ports(nvmf_port, iscsi_port));
    d.rpc("framework_wait_init", json!(null));
    let status = d.terminate(std::time::Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let cfg = d.dir.path().join("tidemark.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    let thick = text.replace("thin_provision = true", "thin_provision = false");
    assert_ne!(thick, text);
    std::fs::write(&cfg, thick).expect("write config");
    // Under a timeout: a daemon that wrongly accepted the conflict would serve forever.
    let o = Command::new("timeout").args(["30", TIDEMARKD]).arg("--config").arg(&cfg).arg("--data-dir").arg(d.data_dir()).output().expect("run tidemarkd");
    let err = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("bdev_lvol_create") && err.contains("thin_provision") && err.contains("pool0/vol0 exists and is thin"), "{err}");
}
