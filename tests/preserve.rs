//! Preserve end to end: the real daemon, a CoW volume on uring files, real clients (QEMU's
//! iSCSI driver through qemu-io and qemu-img) writing while an RPC preserves; the sealed
//! snapshot read back through its own export; kill -9 and restart; bad input.
//!
//! Tools come from `tests/iscsi/deps.sh`; without them these tests fail, unless
//! TIDEMARK_SKIP_PRESERVE=1.

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The clients this test drives; false: skip (TIDEMARK_SKIP_PRESERVE=1).
fn tools(cmds: &[&str]) -> bool {
    require_tools(cmds, "TIDEMARK_SKIP_PRESERVE")
}

const MIB: u64 = 1 << 20;

/// A daemon with CoW volume `vol` (base `size_mb` MiB) exported as LUN 0 of iSCSI target
/// `iqn...:vol` on a free port.
fn daemon_with_volume(size_mb: u64) -> (Daemon, SocketAddr) {
    let d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_uring_create", json!({"name": "base", "filename": "vol.img", "size_mb": size_mb, "block_size": 512}));
    d.rpc("bdev_uring_create", json!({"name": "store", "filename": "vol.store", "size_mb": size_mb + 16, "block_size": 512}));
    d.rpc("bdev_cow_create", json!({"name": "vol", "base_bdev": "base", "store_bdev": "store", "grain_kb": 64}));
    let port = free_port();
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    export(&d, "vol");
    (d, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn node(bdev: &str) -> String {
    format!("iqn.2016-06.io.tidemark:{bdev}")
}

fn export(d: &Daemon, bdev: &str) {
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": node(bdev), "luns": [{"bdev_name": bdev, "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
}

fn url(addr: SocketAddr, bdev: &str) -> String {
    format!("iscsi://{addr}/{}/0", node(bdev))
}

fn qemu_io(u: &str, cmds: &[String]) -> (bool, String) {
    qemu_io_opts(u, cmds, &[])
}

fn qemu_io_opts(u: &str, cmds: &[String], opts: &[&str]) -> (bool, String) {
    run_qemu_io(u, opts, cmds)
}

/// The whole image behind `u`, through qemu-img.
fn dump(u: &str, dir: &Path, name: &str) -> Vec<u8> {
    let f = dir.join(name);
    let out = Command::new("timeout").args(["120", "qemu-img", "convert", "-f", "raw", "-O", "raw", u]).arg(&f).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img convert {u}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&f).expect("read dump")
}

fn wait_sealed(d: &Daemon, name: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let s = d.rpc("bdev_snapshot_get", json!({"name": name}));
        if s[0]["state"] == "sealed" {
            return s[0].clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "snapshot {name} did not seal: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_preserve_taken_while_qemu_io_writes_is_a_point_in_time_image() {
    if !tools(&["qemu-io", "qemu-img", "timeout"]) {
        return;
    }
    let (d, addr) = daemon_with_volume(32);
    // A known pattern first, so that the copy-on-write has something to preserve.
    let (ok, out) = qemu_io(&url(addr, "vol"), &["write -P 0x5a 0 32M".to_string()]);
    assert!(ok, "{out}");
    // Then a stream of sequential writes (qemu-io runs them one after the other), overwriting
    // regions several times; the preserve lands somewhere inside it.
    const REGIONS: u64 = 64;
    const WRITES: u64 = 600;
    let region = 32 * MIB / REGIONS;
    let plan: Vec<(u64, u8)> = (0..WRITES).map(|i| ((i * 37 % REGIONS) * region, (i % 200 + 1) as u8)).collect();
    let cmds: Vec<String> = plan.iter().map(|(off, p)| format!("write -P {p} {off} 65536")).collect();
    let script = d.dir.path().join("writes.txt");
    let mut child = Command::new("timeout")
        .args(["300", "qemu-io", "-f", "raw"])
        .args(cmds.iter().flat_map(|c| ["-c".to_string(), c.clone()]))
        .arg(url(addr, "vol"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io");
    std::thread::sleep(Duration::from_millis(300));
    let r = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "pit", "wait_sealed": true}));
    assert_eq!(r["state"], "sealed", "{r}");
    assert_eq!(r["origin"], "vol");
    assert_eq!(r["method"], "cow");
    let status = child.wait().expect("qemu-io");
    assert!(status.success(), "qemu-io failed");
    let _ = std::fs::remove_file(script);

    export(&d, "pit");
    let snap = dump(&url(addr, "pit"), d.dir.path(), "pit.raw");
    let live = dump(&url(addr, "vol"), d.dir.path(), "live.raw");
    assert_eq!(snap.len() as u64, 32 * MIB);
    // Expected images: the first k writes of the plan over the 0x5a pattern.
    let image_after = |k: usize| {
        let mut img = vec![0x5au8; (32 * MIB) as usize];
        for &(off, p) in &plan[..k] {
            img[off as usize..off as usize + 65536].fill(p);
        }
        img
    };
    assert!(live == image_after(plan.len()), "the live volume lost or reordered writes");
    // The snapshot is exactly one prefix of the (sequential) write stream.
    let k = (0..=plan.len()).find(|&k| image_after(k) == snap);
    let k = k.unwrap_or_else(|| panic!("the snapshot is not a point-in-time image of the write stream\n{}", d.log_text()));
    eprintln!("the preserve landed after write {k} of {}", plan.len());
    let info = d.rpc("bdev_snapshot_get", json!({"name": "pit"}));
    assert_eq!(info[0]["old_epoch_in_flight"], 0);
    assert!(info[0]["time_to_seal_ns"].as_u64().is_some_and(|n| n > 0), "{info}");

    // The snapshot is read-only through its export: QEMU sees a write-protected LUN, and a
    // raw WRITE(10) gets DATA PROTECT / WRITE PROTECTED (7/27/00); nothing changes.
    let (_, out) = qemu_io(&url(addr, "pit"), &["write -P 0x77 0 4096".to_string()]);
    assert!(!out.contains("wrote") && out.contains("write protected"), "{out}");
    let mut s = client::Session::login(addr, &client::LoginOptions::normal("iqn.2024-01.test:preserve", &node("pit"))).expect("login to the snapshot");
    let r = s.scsi(0, &client::write10(0, 1), 512, Some(&[0x77u8; 512])).expect("write to the snapshot");
    assert_eq!((r.status, r.sense), (2, Some((7, 0x27, 0))), "a write to the snapshot must be refused as write protected");
    drop(s);
    let again = dump(&url(addr, "pit"), d.dir.path(), "pit2.raw");
    assert!(again == snap, "the snapshot changed");

    // Deleting it while exported: a clear error, nothing changed.
    let e = d.try_rpc("bdev_snapshot_delete", json!({"name": "pit"})).unwrap_err();
    assert_eq!(e.code, -16, "{e:?}");
    assert!(e.message.contains("pit"), "{e:?}");
    assert_eq!(d.rpc("bdev_snapshot_get", json!({"name": "pit"}))[0]["state"], "sealed");
    d.rpc("iscsi_delete_target_node", json!({"name": node("pit")}));
    assert_eq!(d.rpc("bdev_snapshot_delete", json!({"name": "pit"})), json!(true));
    assert_eq!(d.try_rpc("bdev_snapshot_get", json!({"name": "pit"})).unwrap_err().code, -19);
    assert!(d.try_rpc("bdev_get_bdevs", json!({"name": "pit"})).is_err());

    // Metrics show the copies, the store in use and the locks.
    let m = d.metrics();
    for name in [
        "tidemark_preserve_grains_copied_total{bdev=\"vol\"}",
        "tidemark_preserve_copied_bytes_total{bdev=\"vol\"}",
        "tidemark_preserve_store_bytes_used{bdev=\"vol\"}",
        "tidemark_extent_lock_acquired_total{bdev=\"vol\"}",
        "tidemark_preserve_time_to_seal_seconds_count{bdev=\"vol\"} 1",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
}

#[test]
fn the_cow_volume_example_preserves_with_one_command_and_snapshots_survive_kill_9() {
    if !tools(&["qemu-io", "qemu-img", "timeout"]) {
        return;
    }
    let (nvmf, iscsi) = (free_port(), free_port());
    // The CoW volume the default configuration exported before it built a pool.
    let cfg = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/cow-volume.toml"))
        .expect("config/cow-volume.toml")
        .replace("\"/var/tmp/tidemark\"", "\"{data_dir}\"")
        .replace("\"/var/tmp/tidemark.sock\"", "\"{socket}\"")
        .replace("\"127.0.0.1:9464\"", "\"{metrics}\"")
        .replace("\"4420\"", &format!("\"{nvmf}\""))
        .replace("\"3260\"", &format!("\"{iscsi}\""));
    let mut d = Daemon::start(&cfg);
    // The RPC server answers once the configuration is applied.
    assert_eq!(d.rpc("bdev_get_bdevs", json!({"name": "vol0"}))[0]["product_name"], "CoW volume");
    let addr = SocketAddr::from(([127, 0, 0, 1], iscsi));
    let live = format!("iscsi://{addr}/iqn.2016-06.io.tidemark:vol0/0");
    let (ok, out) = qemu_io(&live, &["write -P 0x11 0 4M".to_string(), "write -P 0x22 100M 1M".to_string()]);
    assert!(ok, "{out}\n{}", d.log_text());
    // One command, through the CLI.
    let out = d.cli(&["bdev_snapshot_create", "--bdev_name", "vol0", "--snapshot_name", "snap1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["state"] == "draining" || v["state"] == "sealed", "{v}");
    wait_sealed(&d, "snap1");
    let (ok, out) = qemu_io(&live, &["write -P 0x33 0 1M".to_string(), "write -P 0x44 100M 64K".to_string()]);
    assert!(ok, "{out}");
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "iqn.2016-06.io.tidemark:snap1", "luns": [{"bdev_name": "snap1", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
    let snap = format!("iscsi://{addr}/iqn.2016-06.io.tidemark:snap1/0");
    let check_snap = |d: &Daemon| {
        let (ok, out) = qemu_io_opts(
            &snap,
            &["read -P 0x11 0 4M".to_string(), "read -P 0x22 100M 1M".to_string(), "read -P 0 4M 1M".to_string(), "read -P 0 200M 64K".to_string()],
            &["-r"],
        );
        assert!(ok && !out.contains("verification failed") && !out.contains("failed"), "{out}\n{}", d.log_text());
    };
    check_snap(&d);

    // kill -9 and restart: the snapshot comes back, sealed, with exactly its content.
    d.kill9();
    d.restart();
    d.rpc("framework_wait_init", json!(null));
    let s = d.rpc("bdev_snapshot_get", json!({"name": "snap1"}));
    assert_eq!(s[0]["state"], "sealed", "{s}");
    assert_eq!(s[0]["origin"], "vol0");
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "iqn.2016-06.io.tidemark:snap1", "luns": [{"bdev_name": "snap1", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
    check_snap(&d);
    let (ok, out) = qemu_io(&live, &["read -P 0x33 0 1M".to_string(), "read -P 0x11 1M 3M".to_string(), "read -P 0x44 100M 64K".to_string()]);
    assert!(ok && !out.contains("failed"), "{out}");
    // save_config carries the volume, not its snapshots (the volume recreates them).
    let cfg = d.rpc("save_config", json!(null));
    let bdevs = cfg["subsystems"].as_array().and_then(|a| a.iter().find(|s| s["subsystem"] == "bdev")).expect("bdev subsystem").to_string();
    assert!(bdevs.contains("bdev_cow_create") && !bdevs.contains("snap1"), "{bdevs}");
}

#[test]
fn bad_preserve_requests_get_clear_errors_and_change_nothing() {
    let d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 8192, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 40000, "block_size": 512}));
    // Not preservable.
    let e = d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "m0", "snapshot_name": "s"})).unwrap_err();
    assert_eq!(e.code, -22, "{e:?}");
    assert!(e.message.contains("cannot be preserved"), "{e:?}");
    assert_eq!(d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "nope", "snapshot_name": "s"})).unwrap_err().code, -19);
    // Bad volume parameters.
    assert_eq!(d.try_rpc("bdev_cow_create", json!({"name": "v", "base_bdev": "m0", "store_bdev": "m0"})).unwrap_err().code, -32602);
    let e = d.try_rpc("bdev_cow_create", json!({"name": "v", "base_bdev": "m0", "store_bdev": "m1", "grain_kb": 3})).unwrap_err();
    assert!(e.code == -32602 && e.message.contains("grain_kb"), "{e:?}");
    assert_eq!(d.try_rpc("bdev_cow_create", json!({"name": "v", "base_bdev": "m0", "store_bdev": "m1", "bogus": 1})).unwrap_err().code, -32602);
    // A store too small for one grain.
    d.rpc("bdev_malloc_create", json!({"name": "tiny", "num_blocks": 64, "block_size": 512}));
    let e = d.try_rpc("bdev_cow_create", json!({"name": "v", "base_bdev": "m0", "store_bdev": "tiny"})).unwrap_err();
    assert!(e.message.contains("small"), "{e:?}");
    // The failed attempts left no claims behind.
    d.rpc("bdev_cow_create", json!({"name": "v", "base_bdev": "m0", "store_bdev": "m1", "grain_kb": 4}));
    let b = d.rpc("bdev_get_bdevs", json!({"name": "m0"}));
    assert_eq!(b[0]["claimed_by"], "v");
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": "s1", "wait_sealed": true}));
    // Duplicate names: another snapshot's, or any bdev's.
    assert_eq!(d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": "s1"})).unwrap_err().code, -17);
    assert_eq!(d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": "m1"})).unwrap_err().code, -17);
    assert_eq!(d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": ""})).unwrap_err().code, -32602);
    assert_eq!(d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": "x", "method": "split"})).unwrap_err().code, -32602);
    assert_eq!(d.try_rpc("bdev_snapshot_delete", json!({"name": "zz"})).unwrap_err().code, -19);
    // A snapshot is not itself preservable, and cannot be written.
    assert_eq!(d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "s1", "snapshot_name": "s2"})).unwrap_err().code, -22);
    let all = d.rpc("bdev_snapshot_get", json!(null));
    assert_eq!(all.as_array().map(|a| a.len()), Some(1), "{all}");
    assert_eq!(d.rpc("bdev_get_bdevs", json!({"name": "s1"}))[0]["read_only"], true);
    // Up to 32 snapshots per volume, then a clear error.
    for i in 2..=32 {
        d.rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": format!("s{i}")}));
    }
    let e = d.try_rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": "s33"})).unwrap_err();
    assert_eq!(e.code, -16, "{e:?}");
    assert!(d.try_rpc("bdev_get_bdevs", json!({"name": "s33"})).is_err(), "a refused snapshot leaves no bdev");
    // Deleting in any order frees the names.
    for i in [5, 1, 32, 17] {
        wait_sealed(&d, &format!("s{i}"));
        assert_eq!(d.rpc("bdev_snapshot_delete", json!({"name": format!("s{i}")})), json!(true));
    }
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "v", "snapshot_name": "s1", "wait_sealed": true}));
    // The volume cannot go while a snapshot is exported... here nothing is: it goes with them.
    assert_eq!(d.rpc("bdev_cow_delete", json!({"name": "v"})), json!(true));
    assert!(d.try_rpc("bdev_get_bdevs", json!({"name": "s1"})).is_err());
    // And comes back with its snapshots over the same store.
    d.rpc("bdev_cow_create", json!({"name": "v", "base_bdev": "m0", "store_bdev": "m1"}));
    let all = d.rpc("bdev_snapshot_get", json!(null));
    assert_eq!(all.as_array().map(|a| a.len()), Some(29), "{all}");
}

/// Waits for backup job `id` to finish; returns its description.
fn backup_done(d: &Daemon, id: &Value) -> Value {
    let t0 = Instant::now();
    loop {
        let j = d.rpc("backup_get", json!({"id": id}));
        if j[0]["state"] != "in_progress" {
            assert_eq!(j[0]["state"], "complete", "{j}\n{}", d.log_text());
            return j[0].clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "backup {id} did not finish: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sealed_snapshot_backs_up_while_the_volume_writes_and_incrementals_read_only_what_changed() {
    if !tools(&["qemu-io", "qemu-img", "timeout"]) {
        return;
    }
    let (d, addr) = daemon_with_volume(32);
    let (ok, out) = qemu_io(&url(addr, "vol"), &["write -P 0x11 0 32M".to_string()]);
    assert!(ok, "{out}");
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "b1", "wait_sealed": true}));
    let (ok, out) = qemu_io(&url(addr, "vol"), &["write -P 0x22 1M 64K".to_string(), "write -P 0x33 20M 128K".to_string()]);
    assert!(ok, "{out}");
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "b2", "wait_sealed": true}));
    // The live volume keeps changing while the backups run.
    let (ok, out) = qemu_io(&url(addr, "vol"), &["write -P 0x44 0 4M".to_string()]);
    assert!(ok, "{out}");
    let full = d.rpc("backup_start", json!({"source": "b1", "path": "full.img"}));
    let full = backup_done(&d, &full["id"]);
    assert_eq!(full["bytes_done"], 32 * MIB);
    let inc = d.rpc("backup_start", json!({"source": "b2", "path": "inc.img", "incremental_from": "b1"}));
    let inc = backup_done(&d, &inc["id"]);
    // Only the grains written between the two preserves: 64 KiB + 128 KiB.
    assert_eq!(inc["bytes_total"], 192 * 1024, "{inc}");
    // Restoring the chain gives exactly snapshot b2.
    d.rpc("bdev_malloc_create", json!({"name": "restored", "num_blocks": 32 * MIB / 512, "block_size": 512}));
    d.rpc("backup_restore", json!({"path": "inc.img", "bdev": "restored"}));
    export(&d, "restored");
    export(&d, "b2");
    let want = dump(&url(addr, "b2"), d.dir.path(), "b2.raw");
    let got = dump(&url(addr, "restored"), d.dir.path(), "restored.raw");
    assert!(want == got, "the restored chain differs from the snapshot");
    assert_eq!(want[(MIB + 10) as usize], 0x22);
    assert_eq!(want[0], 0x11);
}

#[test]
fn a_snapshot_exported_as_an_nvme_namespace_reads_its_image_and_refuses_writes_as_write_protected() {
    use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
    use tidemark::nvmf::spec::{io_opc, sc};
    let d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_malloc_create", json!({"name": "b", "num_blocks": 8192, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "s", "num_blocks": 16384, "block_size": 512}));
    d.rpc("bdev_cow_create", json!({"name": "vol", "base_bdev": "b", "store_bdev": "s", "grain_kb": 4}));
    let port = free_port();
    let nqn = "nqn.2016-06.io.tidemark:preserve";
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": nqn, "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "vol", "nsid": 1}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let o = QpairOptions { hostnqn: "nqn.2014-08.org.nvmexpress:uuid:33333333-3333-4333-8333-333333333333".into(), ..QpairOptions::default() };
    let mut c = Controller::connect(addr, nqn, &o).expect("connect");
    let mut q = c.connect_io(1, 32).expect("io queue");
    let write = |q: &mut Qpair, nsid: u32, slba: u64, byte: u8| {
        q.execute(Qpair::rw_sqe(io_opc::WRITE, nsid, slba, 8), Payload::Out(&[byte; 4096])).expect("write").0.status()
    };
    assert!(write(&mut q, 1, 0, 0xAA).is_success());
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "snapn", "wait_sealed": true}));
    assert!(write(&mut q, 1, 0, 0xBB).is_success());
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "snapn", "nsid": 2}}));
    let (cqe, data) = q.execute(Qpair::rw_sqe(io_opc::READ, 2, 0, 8), Payload::In(4096)).expect("read");
    assert!(cqe.status().is_success());
    assert!(data.iter().all(|&b| b == 0xAA), "the snapshot reads its point in time");
    let st = write(&mut q, 2, 0, 0xCC);
    assert_eq!((st.sct, st.sc), (0, sc::NAMESPACE_WRITE_PROTECTED), "{st:?}");
    let (_, data) = q.execute(Qpair::rw_sqe(io_opc::READ, 1, 0, 8), Payload::In(4096)).expect("read");
    assert!(data.iter().all(|&b| b == 0xBB), "the live volume has the new data");
    // Exported, it cannot be deleted.
    assert_eq!(d.try_rpc("bdev_snapshot_delete", json!({"name": "snapn"})).unwrap_err().code, -16);
}
