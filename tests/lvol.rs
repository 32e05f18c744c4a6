//! The volume pool (`bdev_lvol_*`) end to end: a store on a file-backed uring bdev, 100 thin
//! volumes, data over iSCSI with qemu-io, the full pool, kill -9 and restart, SPDK's own client,
//! and bad input.
//!
//! qemu-io comes from tests/iscsi/deps.sh (TIDEMARK_SKIP_ISCSI=1 skips), `spdk-rpc` from
//! tests/spdk/deps.sh (TIDEMARK_SKIP_SPDK=1 skips that part).

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use support::*;

const TARGET: &str = "iqn.2016-06.io.tidemark:pool";
const MIB: u64 = 1 << 20;

fn qemu_io(addr: SocketAddr, lun: u32, cmd: &str) -> (bool, String) {
    qemu_io_as(addr, lun, cmd, false)
}

/// `read_only`: opens with `-r` (qemu refuses to open a write-protected LUN read-write).
fn qemu_io_as(addr: SocketAddr, lun: u32, cmd: &str, read_only: bool) -> (bool, String) {
    let url = format!("iscsi://{addr}/{TARGET}/{lun}");
    let mut args = vec!["60", "qemu-io", "-f", "raw"];
    if read_only {
        args.push("-r");
    }
    let out = Command::new("timeout").args(args).args(["-c", cmd, &url]).output().expect("run qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // qemu-io exits 0 even when the command fails; its output says so.
    (out.status.success() && !text.contains("failed"), text)
}

/// Several read/write/discard commands on one LUN in one qemu-io session (one login): ok when
/// every one of them reports its "bytes at offset" line and none failed (a pattern mismatch
/// says "Pattern verification failed").
fn qemu_io_batch(addr: SocketAddr, lun: u32, cmds: &[String]) -> (bool, String) {
    let url = format!("iscsi://{addr}/{TARGET}/{lun}");
    let mut c = Command::new("timeout");
    c.args(["60", "qemu-io", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(&url).output().expect("run qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("failed") && text.matches("bytes at offset").count() == cmds.len(), text)
}

/// Runs `f(lun)` for every LUN of `luns` on four threads; panics listing the failures.
#[track_caller]
fn on_luns(luns: std::ops::Range<u32>, f: impl Fn(u32) -> Result<(), String> + Sync) {
    let next = std::sync::atomic::AtomicU32::new(luns.start);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let lun = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if lun >= luns.end {
                    break;
                }
                if let Err(e) = f(lun) {
                    failures.lock().unwrap().push(format!("LUN {lun}: {e}"));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} LUN(s) failed:\n{}", failures.len(), failures.join("\n"));
}

/// Volume `i` of the hundred: its pattern byte (distinct, never 0) and the offset of its 64 KiB
/// (distinct per volume, inside one 1 MiB cluster, never at the cluster's start).
fn pattern_of(i: u32) -> (u8, u64) {
    ((i + 1) as u8, u64::from(i % 32) * MIB + u64::from(1 + i / 32) * 64 * 1024)
}

/// A daemon with a 64 MiB file-backed bdev `u0` and an lvol store `pool` on it.
fn daemon_with_pool() -> (Daemon, PathBuf, String) {
    daemon_with_pool_of(64)
}

fn daemon_with_pool_of(mib: u64) -> (Daemon, PathBuf, String) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let file = d.dir.path().join("pool.img");
    std::fs::File::create(&file).unwrap().set_len(mib * MIB).unwrap();
    d.rpc("bdev_uring_create", json!({"name": "u0", "filename": file.display().to_string(), "block_size": 512}));
    let uuid = d.rpc("bdev_lvol_create_lvstore", json!({"bdev_name": "u0", "lvs_name": "pool"}));
    (d, file, uuid.as_str().unwrap().to_string())
}

fn export<S: AsRef<str>>(d: &Daemon, luns: &[S]) -> SocketAddr {
    let port = free_port();
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    let luns: Vec<Value> = luns.iter().enumerate().map(|(i, b)| json!({"bdev_name": b.as_ref(), "lun_id": i})).collect();
    d.rpc("iscsi_create_target_node", json!({"name": TARGET, "luns": luns, "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}));
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn store(d: &Daemon) -> Value {
    let s = d.rpc("bdev_lvol_get_lvstores", json!({"lvs_name": "pool"}));
    s[0].clone()
}

#[test]
fn a_pool_of_100_thin_volumes_over_iscsi_fills_frees_and_survives_kill9() {
    if !require_tools(&["qemu-io", "timeout"], "TIDEMARK_SKIP_ISCSI") {
        return;
    }
    // 160 MiB: the hundred volumes' clusters (96 of them kept) plus what the fill below needs
    // (about 64 clusters, so that the two 32 MiB volumes fill it).
    let (mut d, _file, uuid) = daemon_with_pool_of(160);
    let s = store(&d);
    assert_eq!(s["uuid"], uuid.as_str());
    assert_eq!((s["base_bdev"].as_str(), s["block_size"].as_u64(), s["cluster_size"].as_u64()), (Some("u0"), Some(512), Some(MIB)), "{s}");
    let total = s["total_data_clusters"].as_u64().unwrap();
    assert!(total >= 150 && s["free_clusters"] == total, "{s}");

    // 100 thin volumes of 32 MiB on a 160 MiB pool: overcommitted 20 times.
    let mut names = Vec::new();
    for i in 0..100 {
        let n = d.rpc("bdev_lvol_create", json!({"lvol_name": format!("v{i}"), "size_in_mib": 32, "thin_provision": true, "lvs_name": "pool"}));
        let n = n.as_str().unwrap().to_string();
        assert!(uuid::Uuid::parse_str(&n).is_ok(), "a volume's bdev name is its UUID, as in SPDK: {n}");
        names.push(n);
    }
    assert_eq!(d.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"})).as_array().unwrap().len(), 100);
    assert_eq!(store(&d)["free_clusters"], total, "thin volumes take no space until written");

    // All hundred exported as LUNs 0-99 of one target, by alias (lvs/lvol), LUN 1 by UUID.
    let luns: Vec<String> = (0..100).map(|i| if i == 1 { names[1].clone() } else { format!("pool/v{i}") }).collect();
    let addr = export(&d, &luns);
    // Each volume gets its own pattern at its own offset, read back in the same session with
    // the zeros before it in its cluster; one qemu-io (one login) per LUN, four at a time.
    let t0 = std::time::Instant::now();
    on_luns(0..100, |lun| {
        let (p, off) = pattern_of(lun);
        let cluster = off / MIB * MIB;
        let cmds = [format!("write -P {p} {off} 64k"), format!("read -P {p} {off} 64k"), format!("read -P 0 {cluster} {}", off - cluster)];
        let (ok, out) = qemu_io_batch(addr, lun, &cmds);
        ok.then_some(()).ok_or(out)
    });
    eprintln!("100 LUNs written and read back in {:?}", t0.elapsed());
    // Each took exactly one cluster (its own), and the pool counts a hundred.
    let lvols = d.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"}));
    for l in lvols.as_array().unwrap() {
        assert_eq!(l["num_allocated_clusters"], 1, "one 64 KiB write takes one cluster: {l}");
    }
    assert_eq!(store(&d)["free_clusters"], total - 100, "{}", store(&d));
    // v0-v3 serve the fill below: their clusters are given back (an unmap of the whole
    // cluster frees it) and read zeros again.
    on_luns(0..4, |lun| {
        let (_, off) = pattern_of(lun);
        let cluster = off / MIB * MIB;
        let (ok, out) = qemu_io_batch(addr, lun, &[format!("discard {cluster} 1M"), format!("read -P 0 {cluster} 1M")]);
        ok.then_some(()).ok_or(out)
    });
    let free0 = total - 96;
    assert_eq!(store(&d)["free_clusters"], free0, "{}", store(&d));
    assert!(free0 > 34 && free0 < 66, "the fill below needs 34 < free clusters < 66: {free0}");

    for (lun, pat) in [(0u32, "0x5a"), (1, "0xa5")] {
        let (ok, out) = qemu_io(addr, lun, &format!("write -P {pat} 1M 1M"));
        assert!(ok, "write LUN {lun}: {out}\n{}", d.log_text());
        let (ok, out) = qemu_io(addr, lun, &format!("read -P {pat} 1M 1M"));
        assert!(ok && !out.contains("Pattern verification failed"), "read LUN {lun}: {out}");
        let (ok, out) = qemu_io(addr, lun, "read -P 0 0 1M");
        assert!(ok && !out.contains("Pattern verification failed"), "unwritten space reads zeros: {out}");
    }
    assert_eq!(store(&d)["free_clusters"], free0 - 2);
    let m = d.metrics();
    assert!(m.contains("tidemark_lvol_store_clusters") && m.contains("tidemark_lvol_allocated_clusters"), "{m}");
    check_openmetrics(&m).unwrap_or_else(|e| panic!("{e}\n{m}"));

    // Fill the pool: v2 takes 32 clusters, v3 runs out part way.
    let (ok, out) = qemu_io(addr, 2, "write -P 0x22 0 32M");
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(addr, 3, "write -P 0x33 0 32M");
    assert!(!ok, "a write past the pool's space must fail: {out}");
    // SPACE ALLOCATION FAILED WRITE PROTECT: QEMU's iSCSI driver turns it into ENOSPC.
    assert!(out.contains("No space left on device"), "{out}");
    // A write that does not fit fails whole: it takes no cluster, and what is left still
    // serves the writes that fit, up to the last cluster (written on LUN 1, whose only
    // allocated cluster is its second).
    let free = store(&d)["free_clusters"].as_u64().expect("free_clusters");
    assert!(free > 0 && free <= free0 - 34, "{}", store(&d));
    let (ok, out) = qemu_io(addr, 1, &format!("write -P 0x11 {}M {free}M", 32 - free));
    assert!(ok, "the pool's last {free} clusters: {out}");
    assert_eq!(store(&d)["free_clusters"], 0);
    let (ok, out) = qemu_io(addr, 1, "write -P 0x11 0 1M");
    assert!(!ok && out.contains("No space left on device"), "a full pool: {out}");
    // Every other read and write goes on.
    let (ok, out) = qemu_io(addr, 0, "write -P 0x77 1M 4k");
    assert!(ok, "a write to an allocated cluster goes on in a full pool: {out}");
    let (ok, out) = qemu_io(addr, 2, "read -P 0x22 0 32M");
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
    // Freeing space (deleting an unexported volume's data: unmap of v2) makes writes succeed.
    let (ok, out) = qemu_io(addr, 2, "discard 0 32M");
    assert!(ok, "{out}");
    assert!(store(&d)["free_clusters"].as_u64().unwrap() >= 30, "unmap of whole clusters frees them: {}", store(&d));
    let (ok, out) = qemu_io(addr, 3, "write -P 0x33 0 16M");
    assert!(ok, "after freeing space writes succeed without a restart: {out}");

    // kill -9, restart from the saved configuration: the store is found on its bdev.
    d.rpc("save_config", json!({"path": d.dir.path().join("tidemark.toml").display().to_string()}));
    let before = d.rpc("bdev_lvol_get_lvols", json!({}));
    d.kill9();
    d.restart();
    assert_eq!(d.rpc("bdev_lvol_get_lvols", json!({})), before, "volumes and their allocation survive");
    assert!(d.log_text().contains("leak check"), "the open reports its leak check");
    for (lun, pat, off) in [(0u32, "0x77", "1M"), (1, "0xa5", "1M"), (3, "0x33", "0")] {
        let (ok, out) = qemu_io(addr, lun, &format!("read -P {pat} {off} 4k"));
        assert!(ok && !out.contains("Pattern verification failed"), "LUN {lun} after kill -9: {out}\n{}", d.log_text());
    }
    // The other 96 volumes still read their own pattern, and zeros before it.
    let t0 = std::time::Instant::now();
    on_luns(4..100, |lun| {
        let (p, off) = pattern_of(lun);
        let cluster = off / MIB * MIB;
        let (ok, out) = qemu_io_batch(addr, lun, &[format!("read -P {p} {off} 64k"), format!("read -P 0 {cluster} {}", off - cluster)]);
        ok.then_some(()).ok_or(out)
    });
    eprintln!("96 LUNs read back after kill -9 in {:?}", t0.elapsed());
}

#[test]
fn bad_input_gets_an_error_naming_the_field_and_changes_nothing() {
    let (d, _file, _) = daemon_with_pool();
    d.rpc("bdev_lvol_create", json!({"lvol_name": "a", "size_in_mib": 4, "lvs_name": "pool"}));
    let cases = [
        (json!({"lvol_name": "b", "size_in_mib": 4, "lvs_name": "nope"}), "lvs_name"),
        (json!({"lvol_name": "a", "size_in_mib": 4, "lvs_name": "pool"}), "lvol_name"),
        (json!({"lvol_name": "c", "size_in_mib": 0, "lvs_name": "pool"}), "size_in_mib"),
        (json!({"lvol_name": "c", "size_in_mib": 1000, "lvs_name": "pool"}), "size_in_mib"),
        (json!({"lvol_name": "c/d", "size_in_mib": 1, "lvs_name": "pool"}), "lvol_name"),
    ];
    for (p, field) in cases {
        let e = d.try_rpc("bdev_lvol_create", p.clone()).unwrap_err();
        assert!(e.message.contains(field), "{p}: {e:?}");
    }
    let e = d.try_rpc("bdev_lvol_create_lvstore", json!({"bdev_name": "u0", "lvs_name": "pool2"})).unwrap_err();
    assert!(e.message.contains("bdev_name") || e.message.contains("u0"), "{e:?}");
    let e = d.try_rpc("bdev_lvol_resize", json!({"name": "pool/nope", "size_in_mib": 8})).unwrap_err();
    assert!(e.message.contains("name"), "{e:?}");
    assert_eq!(d.rpc("bdev_lvol_get_lvols", json!({})).as_array().unwrap().len(), 1, "nothing changed");

    // Rename, resize, read-only: the alias follows, the size changes, writes are refused.
    d.rpc("bdev_lvol_rename", json!({"old_name": "pool/a", "new_name": "b"}));
    d.rpc("bdev_lvol_resize", json!({"name": "pool/b", "size_in_mib": 8}));
    let b = d.rpc("bdev_get_bdevs", json!({"name": "pool/b"}));
    assert_eq!(b[0]["num_blocks"], 8 * MIB / 512, "{b}");
    d.rpc("bdev_lvol_set_read_only", json!({"name": "pool/b"}));
    let l = d.rpc("bdev_lvol_get_lvols", json!({}));
    assert_eq!((l[0]["alias"].as_str(), l[0]["read_only"].as_bool()), (Some("pool/b"), Some(true)), "{l}");
    d.rpc("bdev_lvol_rename_lvstore", json!({"old_name": "pool", "new_name": "tank"}));
    assert!(d.try_rpc("bdev_get_bdevs", json!({"name": "tank/b"})).is_ok());
    d.rpc("bdev_lvol_delete", json!({"name": "tank/b"}));
    d.rpc("bdev_lvol_delete_lvstore", json!({"lvs_name": "tank"}));
    assert_eq!(d.rpc("bdev_lvol_get_lvstores", json!({})), json!([]));
}

/// SPDK's `spdk-rpc` (PyPI `spdk`), unchanged, creates and lists the store and its volumes.
#[test]
fn spdks_client_creates_and_lists_the_pool() {
    let Some(rpc) = require_spdk_rpc() else { return };
    let d = Daemon::start(MINIMAL_CONFIG);
    let run = |args: &[&str]| {
        let o = Command::new(&rpc).arg("-s").arg(&d.socket).args(args).output().expect("run spdk-rpc");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "spdk-rpc {args:?}: {out}{}\n{}", String::from_utf8_lossy(&o.stderr), d.log_text());
        out
    };
    run(&["bdev_malloc_create", "-b", "m0", "64", "512"]);
    let uuid = run(&["bdev_lvol_create_lvstore", "m0", "lvs0", "-c", "1048576"]);
    let name = run(&["bdev_lvol_create", "-l", "lvs0", "-t", "vol0", "16"]);
    run(&["bdev_lvol_create", "-u", uuid.trim(), "vol1", "8"]);
    let stores: Value = serde_json::from_str(&run(&["bdev_lvol_get_lvstores"])).unwrap();
    assert_eq!(stores[0]["name"], "lvs0", "{stores}");
    assert_eq!(stores[0]["uuid"], uuid.trim());
    let lvols: Value = serde_json::from_str(&run(&["bdev_lvol_get_lvols", "-l", "lvs0"])).unwrap();
    let aliases: Vec<&str> = lvols.as_array().unwrap().iter().filter_map(|l| l["alias"].as_str()).collect();
    assert_eq!(aliases.len(), 2, "{lvols}");
    assert!(aliases.contains(&"lvs0/vol0") && aliases.contains(&"lvs0/vol1"), "{lvols}");
    assert!(lvols.as_array().unwrap().iter().any(|l| l["uuid"] == name.trim().trim_matches('"')), "{name} {lvols}");
    // Snapshot and clone through SPDK's client: its parameters, its replies.
    let snap = run(&["bdev_lvol_snapshot", "lvs0/vol0", "snap0"]);
    run(&["bdev_lvol_clone", "lvs0/snap0", "clone0"]);
    let lvols: Value = serde_json::from_str(&run(&["bdev_lvol_get_lvols", "-l", "lvs0"])).unwrap();
    let clone = lvols.as_array().unwrap().iter().find(|l| l["name"] == "clone0").cloned().unwrap_or_default();
    assert_eq!((clone["is_clone"].clone(), clone["base_snapshot"].clone()), (json!(true), json!("snap0")), "{lvols}");
    assert!(lvols.as_array().unwrap().iter().any(|l| l["uuid"] == snap.trim().trim_matches('"') && l["is_snapshot"] == true), "{snap} {lvols}");
    run(&["bdev_lvol_delete", "lvs0/clone0"]);
    run(&["bdev_lvol_delete", "lvs0/snap0"]);
    run(&["bdev_lvol_delete", "lvs0/vol1"]);
    run(&["bdev_lvol_delete_lvstore", "-l", "lvs0"]);
}

/// A volume grown, then made read-only, while a host's session is open: the same session
/// (the same per-core channel) writes past the old end after the grow, after one CAPACITY
/// DATA HAS CHANGED unit attention, and its writes are refused once the volume is read-only.
/// Before channels read the size live, the write past the old end failed LBA OUT OF RANGE
/// until the host reconnected.
#[test]
fn a_volume_grown_or_made_read_only_while_exported_takes_effect_on_open_sessions() {
    let (d, _file, _uuid) = daemon_with_pool();
    d.rpc("bdev_lvol_create", json!({"lvol_name": "grow", "size_in_mib": 4, "thin_provision": true, "lvs_name": "pool"}));
    let addr = export(&d, &["pool/grow"]);
    let mut s = client::Session::login(addr, &client::LoginOptions::normal("iqn.2024-01.test:lvol", TARGET)).expect("login");
    let block = vec![0x5au8; 512];
    let write = |s: &mut client::Session, lba: u32| s.scsi(0, &client::write10(lba, 1), 512, Some(&block)).expect("write");
    // A first command collects the power-on unit attention, if any.
    let _ = write(&mut s, 0);
    assert_eq!(write(&mut s, 0).status, 0, "a write inside the volume");
    let past_old_end = (6 * MIB / 512) as u32;
    let r = write(&mut s, past_old_end);
    assert_eq!((r.status, r.sense.map(|x| (x.0, x.1))), (2, Some((0x05, 0x21))), "past the end: ILLEGAL REQUEST, LBA OUT OF RANGE");

    d.rpc("bdev_lvol_resize", json!({"name": "pool/grow", "size_in_mib": 8}));
    let mut r = write(&mut s, past_old_end);
    if r.status == 2 && r.sense == Some((0x06, 0x2a, 0x09)) {
        // CAPACITY DATA HAS CHANGED, once; the command is then retried as a host would.
        r = write(&mut s, past_old_end);
    }
    assert_eq!((r.status, r.sense), (0, None), "after the grow the open session writes past the old end");
    let back = s.scsi(0, &client::read10(past_old_end, 1), 512, None).expect("read");
    assert_eq!((back.status, back.data), (0, block.clone()));

    d.rpc("bdev_lvol_set_read_only", json!({"name": "pool/grow"}));
    let r = write(&mut s, 0);
    assert_eq!((r.status, r.sense.map(|x| x.0)), (2, Some(0x07)), "a read-only volume refuses the open session's write: DATA PROTECT");
    let back = s.scsi(0, &client::read10(0, 1), 512, None).expect("read");
    assert_eq!((back.status, back.data), (0, block));
}

/// `bdev_lvol_snapshot` under a running writer, read over iSCSI; a clone written beside it;
/// kill -9 right after an acknowledged snapshot; bad input refused with nothing changed.
#[test]
fn a_snapshot_under_a_writer_keeps_its_image_clones_write_privately_and_kill9_keeps_it() {
    let (mut d, _file, _) = daemon_with_pool();
    d.rpc("bdev_lvol_create", json!({"lvol_name": "vol", "size_in_mib": 16, "lvs_name": "pool", "thin_provision": true}));
    let addr = export(&d, &["pool/vol"]);
    let (ok, out) = qemu_io(addr, 0, "write -P 0x11 0 8M");
    assert!(ok, "{out}");
    // A writer on the second half runs while the snapshot is taken (the host is not paused).
    // 32 passes of 8 MiB in one session, so that the snapshot lands among them.
    let writer = std::thread::spawn(move || {
        let url = format!("iscsi://{addr}/{TARGET}/0");
        let mut c = Command::new("timeout");
        c.args(["120", "qemu-io", "-f", "raw"]);
        for _ in 0..32 {
            c.args(["-c", "write -P 0x22 8M 8M"]);
        }
        let out = c.arg(&url).output().expect("run qemu-io");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success() && !text.contains("failed") && text.matches("wrote").count() == 32, text)
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    let t0 = std::time::Instant::now();
    let snap = d.rpc("bdev_lvol_snapshot", json!({"lvol_name": "pool/vol", "snapshot_name": "snap"}));
    eprintln!("bdev_lvol_snapshot under the writer answered in {:?}", t0.elapsed());
    assert!(snap.as_str().is_some_and(|u| u.len() == 36), "the reply is the snapshot's UUID: {snap}");
    let snapped_at = std::time::Instant::now();
    let (ok, out) = writer.join().unwrap();
    assert!(ok, "the writer went on through the snapshot: {out}");
    eprintln!("the writer ran on {:?} after the snapshot's reply", snapped_at.elapsed());
    let (ok, out) = qemu_io(addr, 0, "write -P 0x33 0 1M");
    assert!(ok, "{out}");
    d.rpc("iscsi_target_node_add_lun", json!({"name": TARGET, "bdev_name": "pool/snap", "lun_id": 1}));
    let (ok, out) = qemu_io_as(addr, 1, "read -P 0x11 0 8M", true);
    assert!(ok, "the snapshot has the image written before it: {out}");
    for (pat, off, len) in [("0x33", "0", "1M"), ("0x11", "1M", "7M"), ("0x22", "8M", "8M")] {
        let (ok, out) = qemu_io(addr, 0, &format!("read -P {pat} {off} {len}"));
        assert!(ok, "the volume after the snapshot, {pat} at {off}: {out}");
    }
    let (ok, _) = qemu_io(addr, 1, "write -P 0x01 0 4k");
    assert!(!ok, "a snapshot is read-only");

    // A clone reads through its snapshot and writes its own clusters.
    d.rpc("bdev_lvol_clone", json!({"snapshot_name": "pool/snap", "clone_name": "c"}));
    d.rpc("iscsi_target_node_add_lun", json!({"name": TARGET, "bdev_name": "pool/c", "lun_id": 2}));
    let (ok, out) = qemu_io(addr, 2, "write -P 0x44 0 1M");
    assert!(ok, "{out}");
    for (lun, pat, off, len) in [(2, "0x44", "0", "1M"), (2, "0x11", "1M", "7M"), (1, "0x11", "0", "8M"), (0, "0x33", "0", "1M")] {
        let (ok, out) = qemu_io_as(addr, lun, &format!("read -P {pat} {off} {len}"), lun == 1);
        assert!(ok, "LUN {lun}, {pat} at {off}: {out}");
    }
    let lvols = d.rpc("bdev_lvol_get_lvols", json!({}));
    let by = |n: &str| lvols.as_array().unwrap().iter().find(|l| l["name"] == n).cloned().unwrap();
    let mut clones: Vec<String> = serde_json::from_value(by("snap")["clones"].clone()).unwrap();
    clones.sort();
    assert_eq!((by("snap")["is_snapshot"].clone(), clones), (json!(true), vec!["c".to_string(), "vol".to_string()]), "{lvols}");
    assert_eq!((by("c")["is_clone"].clone(), by("c")["base_snapshot"].clone()), (json!(true), json!("snap")), "{lvols}");

    // Bad input: an error naming the field, nothing changes.
    let cases = [
        ("bdev_lvol_snapshot", json!({"lvol_name": "pool/nope", "snapshot_name": "s2"}), "lvol_name", None),
        ("bdev_lvol_snapshot", json!({"lvol_name": "pool/vol", "snapshot_name": "snap"}), "snapshot_name", None),
        ("bdev_lvol_clone", json!({"snapshot_name": "pool/nope", "clone_name": "c2"}), "snapshot_name", None),
        ("bdev_lvol_clone", json!({"snapshot_name": "pool/vol", "clone_name": "c2"}), "snapshot_name", Some(-32602)),
        ("bdev_lvol_clone", json!({"snapshot_name": "pool/snap", "clone_name": "c"}), "clone_name", None),
        ("bdev_lvol_delete", json!({"name": "pool/snap"}), "name", Some(-16)),
    ];
    for (m, p, field, code) in cases {
        let e = d.try_rpc(m, p.clone()).unwrap_err();
        assert!(e.message.contains(field), "{m} {p}: {e:?}");
        if let Some(c) = code {
            assert_eq!(e.code, c, "{m} {p}: {e:?}");
        }
    }
    assert_eq!(d.rpc("bdev_lvol_get_lvols", json!({})), lvols, "nothing changed");

    // kill -9 right after an acknowledged snapshot: it is there after the restart, with its image.
    d.rpc("save_config", json!({"path": d.dir.path().join("tidemark.toml").display().to_string()}));
    d.rpc("bdev_lvol_snapshot", json!({"lvol_name": "pool/c", "snapshot_name": "snap2"}));
    d.kill9();
    d.restart();
    let lvols = d.rpc("bdev_lvol_get_lvols", json!({}));
    let snap2 = lvols.as_array().unwrap().iter().find(|l| l["name"] == "snap2").cloned();
    assert!(snap2.is_some_and(|s| s["is_snapshot"] == json!(true)), "{lvols}\n{}", d.log_text());
    d.rpc("iscsi_target_node_add_lun", json!({"name": TARGET, "bdev_name": "pool/snap2", "lun_id": 3}));
    for (lun, pat, off, len) in [(3, "0x44", "0", "1M"), (3, "0x11", "1M", "7M"), (1, "0x11", "0", "8M")] {
        let (ok, out) = qemu_io_as(addr, lun, &format!("read -P {pat} {off} {len}"), true);
        assert!(ok, "after kill -9, LUN {lun}, {pat} at {off}: {out}");
    }
}

fn wait_job(d: &Daemon, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let j = d.rpc("backup_get", json!({"id": id}))[0].clone();
        if j["state"] != "in_progress" {
            return j;
        }
        assert!(std::time::Instant::now() < deadline, "job {id} did not finish: {j}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `bdev_snapshot_create` on a pool volume (the generic preserve RPCs), full and incremental
/// backups of its snapshots, restores compared byte for byte with what was written; the
/// incremental moves only the clusters that changed.
#[test]
fn generic_snapshots_of_a_pool_volume_back_up_full_and_incremental_and_restore() {
    if !require_tools(&["qemu-io", "timeout"], "TIDEMARK_SKIP_ISCSI") {
        return;
    }
    let (d, _file, _) = daemon_with_pool();
    d.rpc("bdev_lvol_create", json!({"lvol_name": "vol", "size_in_mib": 16, "lvs_name": "pool", "thin_provision": true}));
    let addr = export(&d, &["pool/vol"]);
    let (ok, out) = qemu_io(addr, 0, "write -P 0x11 0 8M");
    assert!(ok, "{out}");
    // The name without `lvs/` is taken in the volume's store; the answer names `lvs/name`.
    let s1 = d.rpc("bdev_snapshot_create", json!({"bdev_name": "pool/vol", "snapshot_name": "s1", "wait_sealed": true}));
    assert_eq!(
        (s1["name"].as_str(), s1["origin"].as_str(), s1["state"].as_str(), s1["epoch"].as_u64()),
        (Some("pool/s1"), Some("pool/vol"), Some("sealed"), Some(1)),
        "{s1}"
    );
    assert!(s1["creation_time_ms"].as_u64().unwrap() > 0, "{s1}");
    // Pattern B on part of the volume: one cluster rewritten (copied), one first written.
    for cmd in ["write -P 0x22 2M 1M", "write -P 0x23 10M 64k"] {
        let (ok, out) = qemu_io(addr, 0, cmd);
        assert!(ok, "{out}");
    }
    let s2 = d.rpc("bdev_snapshot_create", json!({"bdev_name": "pool/vol", "snapshot_name": "pool/s2"}));
    assert_eq!((s2["name"].as_str(), s2["state"].as_str(), s2["epoch"].as_u64()), (Some("pool/s2"), Some("sealed"), Some(2)), "sealed at the reply: {s2}");
    // The volume moves on; neither image sees it.
    let (ok, out) = qemu_io(addr, 0, "write -P 0x33 0 1M");
    assert!(ok, "{out}");
    let all = d.rpc("bdev_snapshot_get", json!(null));
    let mut names: Vec<&str> = all.as_array().unwrap().iter().filter(|s| s["origin"] == "pool/vol").map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["pool/s1", "pool/s2"], "{all}");
    assert_eq!(d.rpc("bdev_snapshot_get", json!({"name": "pool/s1"}))[0]["state"], "sealed");
    // Bad input: a name taken, another store's name, freeze (a pool never stops I/O).
    for (p, code) in [
        (json!({"bdev_name": "pool/vol", "snapshot_name": "s1"}), -17),
        (json!({"bdev_name": "pool/vol", "snapshot_name": "other/s9"}), -32602),
        (json!({"bdev_name": "pool/vol", "snapshot_name": "s9", "freeze": true}), -22),
    ] {
        let e = d.try_rpc("bdev_snapshot_create", p.clone()).unwrap_err();
        assert_eq!(e.code, code, "{p}: {e:?}");
    }

    let dir = d.data_dir().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    let full = dir.join("full.img");
    let j = d.rpc("backup_start", json!({"source": "pool/s1", "path": full.display().to_string()}));
    let j = wait_job(&d, j["id"].as_str().unwrap());
    assert_eq!(j["state"], "complete", "{j}");
    let inc = dir.join("inc.img");
    let j = d.rpc("backup_start", json!({"source": "pool/s2", "path": inc.display().to_string(), "incremental_from": "pool/s1"}));
    let j = wait_job(&d, j["id"].as_str().unwrap());
    assert_eq!(j["state"], "complete", "{j}");
    // Changed since s1: the two clusters pattern B touched (1 MiB each), not the 16 MiB volume.
    assert_eq!(j["bytes_total"], 2 * MIB, "{j}");

    // The images, as written: s1 alone, and the chain (s2).
    let mut want1 = vec![0u8; 16 << 20];
    want1[..8 << 20].fill(0x11);
    let mut want2 = want1.clone();
    want2[2 << 20..3 << 20].fill(0x22);
    want2[10 << 20..(10 << 20) + (64 << 10)].fill(0x23);
    for (from, want, name) in [(&full, &want1, "r1.img"), (&inc, &want2, "r2.img")] {
        let to = dir.join(name);
        let out = d.cli(&["backup", "restore", from.to_str().unwrap(), "--to-file", to.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = std::fs::read(&to).unwrap();
        assert!(
            got == *want,
            "{name}: the restored image differs from what was written (first at byte {:?})",
            got.iter().zip(want.iter()).position(|(a, b)| a != b)
        );
    }
    // Restored through the daemon into a new pool volume, read over iSCSI.
    d.rpc("bdev_lvol_create", json!({"lvol_name": "r", "size_in_mib": 16, "lvs_name": "pool", "thin_provision": true}));
    let j = d.rpc("backup_restore", json!({"path": inc.display().to_string(), "bdev": "pool/r"}));
    assert_eq!(wait_job(&d, j["id"].as_str().unwrap())["state"], "complete");
    d.rpc("iscsi_target_node_add_lun", json!({"name": TARGET, "bdev_name": "pool/r", "lun_id": 1}));
    for (pat, off, len) in
        [("0x11", "0", "2M"), ("0x22", "2M", "1M"), ("0x11", "3M", "5M"), ("0x00", "8M", "2M"), ("0x23", "10M", "64k"), ("0x00", "10304k", "6080k")]
    {
        let (ok, out) = qemu_io(addr, 1, &format!("read -P {pat} {off} {len}"));
        assert!(ok, "restored volume, {pat} at {off}: {out}");
    }

    // Delete: refused (nothing changes) while a clone depends on the snapshot, done otherwise.
    d.rpc("bdev_lvol_clone", json!({"snapshot_name": "pool/s2", "clone_name": "c"}));
    let e = d.try_rpc("bdev_snapshot_delete", json!({"name": "pool/s2"})).unwrap_err();
    assert_eq!(e.code, -16, "{e:?}");
    assert_eq!(d.rpc("bdev_get_bdevs", json!({"name": "pool/s2"})).as_array().map(Vec::len), Some(1), "still registered");
    assert_eq!(d.rpc("bdev_snapshot_delete", json!({"name": "pool/s1"})), json!(true));
    let lvols = d.rpc("bdev_lvol_get_lvols", json!({}));
    assert!(!lvols.as_array().unwrap().iter().any(|l| l["name"] == "s1"), "{lvols}");
    assert!(d.try_rpc("bdev_get_bdevs", json!({"name": "pool/s1"})).is_err());
    let names: Vec<Value> = d.rpc("bdev_snapshot_get", json!(null)).as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, [json!("pool/s2")]);
}
