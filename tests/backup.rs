//! Backup of preserved images while the live volume serves, end to end: qemu-io writes a CoW
//! volume over iSCSI, preserves are taken over RPC, backups run, and qemu-img compares the
//! backups (and restored chains) with the snapshots read back through their own exports.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const VOL: &str = "iqn.2016-06.io.tidemark:vol0";

/// The clients this test drives; false: skip (TIDEMARK_SKIP_ISCSI=1).
fn tools() -> bool {
    require_tools(&["qemu-io", "qemu-img", "timeout"], "TIDEMARK_SKIP_ISCSI")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout").arg("120").args(args).output().expect("run tool");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A daemon with a 64 MiB CoW volume `vol0` (file-backed base and store) exported over iSCSI.
fn daemon() -> (Daemon, SocketAddr) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_uring_create", json!({"name": "base", "filename": "base.img", "size_mb": 64}));
    d.rpc("bdev_uring_create", json!({"name": "store", "filename": "store.img", "size_mb": 64}));
    d.rpc("bdev_cow_create", json!({"name": "vol0", "base_bdev": "base", "store_bdev": "store", "grain_kb": 64}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    export(&d, VOL, "vol0");
    (d, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn export(d: &Daemon, iqn: &str, bdev: &str) {
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": iqn, "luns": [{"bdev_name": bdev, "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
}

/// The default backup root, `<data_dir>/backups` (created here so a test can place files in it).
fn backup_root(d: &Daemon) -> std::path::PathBuf {
    let dir = d.data_dir().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn url(addr: SocketAddr, iqn: &str) -> String {
    format!("iscsi://{addr}/{iqn}/0")
}

fn write(addr: SocketAddr, pattern: u8, off: u64, len: u64) {
    let (ok, out) = run(&["qemu-io", "-f", "raw", "-c", &format!("write -P {pattern:#x} {off} {len}"), &url(addr, VOL)]);
    assert!(ok && out.contains("wrote"), "qemu-io write: {out}");
}

fn wait_job(d: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = d.rpc("backup_get", json!({"id": id}))[0].clone();
        if j["state"] != "in_progress" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn compare(a: &str, b: &str) -> (bool, String) {
    run(&["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])
}

/// Bytes a sparse file really holds.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn full_and_incremental_backups_equal_their_snapshots_and_restore() {
    if !tools() {
        return;
    }
    let (d, addr) = daemon();
    let dir = backup_root(&d);
    write(addr, 0x11, 0, 8 << 20);
    write(addr, 0x12, 20 << 20, 1 << 20);
    let s = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "s1", "wait_sealed": true}));
    assert_eq!(s["state"], "sealed", "{s}");
    // The live volume moves on while s1 stays as it was.
    write(addr, 0x21, 1 << 20, 1 << 20);
    export(&d, "iqn.2016-06.io.tidemark:s1", "s1");

    let full = dir.join("full.img");
    let j = d.rpc("backup_start", json!({"source": "s1", "path": full.display().to_string()}));
    let j = wait_job(&d, j["id"].as_str().unwrap());
    assert_eq!(j["state"], "complete", "{j}");
    let (info_ok, info) = run(&["qemu-img", "info", "-f", "raw", full.to_str().unwrap()]);
    assert!(info_ok && info.contains("67108864"), "{info}");
    let (same, out) = compare(full.to_str().unwrap(), &url(addr, "iqn.2016-06.io.tidemark:s1"));
    assert!(same, "full backup differs from snapshot s1: {out}");
    // The hole-y full backup is sparse: the 9 MiB written, not 64 MiB.
    assert!(allocated(&full) < 16 << 20, "full backup holds {} bytes", allocated(&full));

    // Second preserve, incremental backup of what changed since s1.
    write(addr, 0x31, 30 << 20, 2 << 20);
    let s = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "s2", "wait_sealed": true}));
    assert_eq!(s["state"], "sealed", "{s}");
    write(addr, 0x41, 0, 64 << 10);
    export(&d, "iqn.2016-06.io.tidemark:s2", "s2");
    let inc = dir.join("inc.img");
    let j = d.rpc("backup_start", json!({"source": "s2", "path": inc.display().to_string(), "incremental_from": "s1"}));
    let j = wait_job(&d, j["id"].as_str().unwrap());
    assert_eq!(j["state"], "complete", "{j}");
    // Changed since s1: 1 MiB at 1 MiB and 2 MiB at 30 MiB (grain-aligned already).
    assert_eq!(j["bytes_total"], 3 << 20, "{j}");
    assert!(allocated(&inc) <= (3 << 20) + (256 << 10), "incremental holds {} bytes", allocated(&inc));

    // Verify the chain, restore it, and compare with s2 as exported.
    let out = d.cli(&["backup", "verify", inc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = dir.join("restored.img");
    let out = d.cli(&["backup", "restore", inc.to_str().unwrap(), "--to-file", restored.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // It reports the restored image (the 64 MiB volume), not the chain's sum.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("restored a 67108864-byte image into") && said.contains("from a chain of 2 backups"), "{said}");
    let (same, out) = compare(restored.to_str().unwrap(), &url(addr, "iqn.2016-06.io.tidemark:s2"));
    assert!(same, "restored chain differs from snapshot s2: {out}");
    let (same, _) = compare(restored.to_str().unwrap(), &url(addr, VOL));
    assert!(!same, "the live volume moved on after s2; the comparison must see it");

    // Restore into a bdev through the daemon, then compare that bdev with s2.
    d.rpc("bdev_malloc_create", json!({"name": "r0", "num_blocks": 131072, "block_size": 512}));
    let r = d.rpc("backup_restore", json!({"path": inc.display().to_string(), "bdev": "r0"}));
    let j = wait_job(&d, r["id"].as_str().unwrap());
    assert_eq!(j["state"], "complete", "{j}");
    export(&d, "iqn.2016-06.io.tidemark:r0", "r0");
    let (same, out) = compare(&url(addr, "iqn.2016-06.io.tidemark:r0"), &url(addr, "iqn.2016-06.io.tidemark:s2"));
    assert!(same, "bdev restored from the chain differs from s2: {out}");

    // A corrupted byte fails verify, naming the extent.
    let f = std::fs::OpenOptions::new().write(true).open(&full).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff], (20 << 20) + 7).unwrap();
    let out = d.cli(&["backup", "verify", inc.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("offset 20971520"), "{err}");
}

#[test]
fn bad_backup_requests_get_clear_errors_and_write_nothing() {
    if !tools() {
        return;
    }
    let (d, addr) = daemon();
    let dir = backup_root(&d);
    write(addr, 0x11, 0, 1 << 20);
    // Not a preserved image.
    let e = d.try_rpc("backup_start", json!({"source": "vol0", "path": dir.join("a.img").display().to_string()})).unwrap_err();
    assert!(e.message.contains("not a preserved image"), "{e:?}");
    assert!(!dir.join("a.img").exists());
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "s1", "wait_sealed": true}));
    // A directory that cannot be made.
    std::fs::write(dir.join("file"), b"").unwrap();
    let e = d.try_rpc("backup_start", json!({"source": "s1", "path": "file/x.img"})).unwrap_err();
    assert_eq!(e.code, -32602, "{e:?}");
    // Never overwrites.
    std::fs::write(dir.join("b.img"), b"keep").unwrap();
    let e = d.try_rpc("backup_start", json!({"source": "s1", "path": dir.join("b.img").display().to_string()})).unwrap_err();
    assert_eq!(e.code, -17, "{e:?}");
    assert_eq!(std::fs::read(dir.join("b.img")).unwrap(), b"keep");
    // An incremental base from another volume.
    d.rpc("bdev_malloc_create", json!({"name": "b2", "num_blocks": 131072, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "st2", "num_blocks": 131072, "block_size": 512}));
    d.rpc("bdev_cow_create", json!({"name": "vol2", "base_bdev": "b2", "store_bdev": "st2"}));
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol2", "snapshot_name": "o1", "wait_sealed": true}));
    let e = d.try_rpc("backup_start", json!({"source": "s1", "path": dir.join("c.img").display().to_string(), "incremental_from": "o1"})).unwrap_err();
    assert!(e.message.contains("preserves volume"), "{e:?}");
    assert!(!dir.join("c.img").exists());
    // Unknown job, bad parameter.
    assert_eq!(d.try_rpc("backup_cancel", json!({"id": "job99"})).unwrap_err().code, -19);
    assert_eq!(d.try_rpc("backup_start", json!({"source": "s1"})).unwrap_err().code, -32602);
}

#[test]
fn a_snapshot_under_backup_cannot_be_deleted_and_a_crash_fails_the_job() {
    if !tools() {
        return;
    }
    let (mut d, addr) = daemon();
    let dir = backup_root(&d);
    write(addr, 0x11, 0, 32 << 20);
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "s1", "wait_sealed": true}));
    // 1 MiB/s: 64 MiB takes a minute, long enough to try things while it runs.
    let slow = dir.join("slow.img");
    let j = d.rpc("backup_start", json!({"source": "s1", "path": slow.display().to_string(), "max_bandwidth_mb_sec": 1}));
    let id = j["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let e = d.try_rpc("bdev_snapshot_delete", json!({"name": "s1"})).unwrap_err();
    assert_eq!(e.code, -16, "{e:?}");
    let st = d.rpc("backup_get", json!({"id": id}))[0].clone();
    assert_eq!(st["state"], "in_progress", "{st}");
    assert!(st["bytes_done"].as_u64().unwrap() < 8 << 20, "the cap holds: {st}");

    // kill -9 mid-job: after the restart the job reads failed, never complete. (The running
    // configuration is saved first, as an operator would, so the restart rebuilds the volume.)
    d.rpc("save_config", json!({"path": d.dir.path().join("tidemark.toml").display().to_string()}));
    d.kill9();
    d.restart();
    let st = d.rpc("backup_get", json!({"id": id}))[0].clone();
    assert_eq!(st["state"], "failed", "{st}");
    let out = d.cli(&["backup", "verify", slow.to_str().unwrap()]);
    assert!(!out.status.success(), "a partial backup must not verify");
    // The snapshot came back with the volume; a new backup succeeds.
    let again = dir.join("again.img");
    let j = d.rpc("backup_start", json!({"source": "s1", "path": again.display().to_string()}));
    let j = wait_job(&d, j["id"].as_str().unwrap());
    assert_eq!(j["state"], "complete", "{j}");
    export(&d, "iqn.2016-06.io.tidemark:s1", "s1");
    let (same, out) = compare(again.to_str().unwrap(), &url(addr, "iqn.2016-06.io.tidemark:s1"));
    assert!(same, "{out}");
    // Cancel works and leaves the job cancelled.
    let j = d.rpc("backup_start", json!({"source": "s1", "path": dir.join("c.img").display().to_string(), "max_bandwidth_mb_sec": 1}));
    let id = j["id"].as_str().unwrap().to_string();
    d.rpc("backup_cancel", json!({"id": id}));
    assert_eq!(d.rpc("backup_get", json!({"id": id}))[0]["state"], "cancelled");
    // Exported, it is still held; unexported and with no job on it, it can be deleted.
    assert_eq!(d.try_rpc("bdev_snapshot_delete", json!({"name": "s1"})).unwrap_err().code, -16);
    d.rpc("iscsi_delete_target_node", json!({"name": "iqn.2016-06.io.tidemark:s1"}));
    d.rpc("bdev_snapshot_delete", json!({"name": "s1"}));
}

#[test]
fn restore_into_an_exported_or_claimed_bdev_is_refused_unless_forced() {
    // vol0 is exported over iSCSI, its base and store are claimed by it.
    let (d, _) = daemon();
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "s1", "wait_sealed": true}));
    let j = d.rpc("backup_start", json!({"source": "s1", "path": "s1.img"}));
    assert_eq!(wait_job(&d, j["id"].as_str().unwrap())["state"], "complete");
    // Restoring vol0 copies nothing into the store once the snapshot is gone.
    d.rpc("bdev_snapshot_delete", json!({"name": "s1"}));

    let e = d.try_rpc("backup_restore", json!({"path": "s1.img", "bdev": "vol0"})).unwrap_err();
    assert_eq!(e.code, -16, "{e:?}");
    assert!(e.message.contains(&format!("iscsi:{VOL}")) && e.message.contains("force"), "names the export: {e:?}");
    // A claim is never overridden: the CoW volume owns its base.
    let e = d.try_rpc("backup_restore", json!({"path": "s1.img", "bdev": "base", "force": true})).unwrap_err();
    assert_eq!(e.code, -16, "{e:?}");
    assert!(e.message.contains("claimed by vol0"), "{e:?}");
    // An NVMe/TCP namespace alike.
    let nqn = "nqn.2016-06.io.tidemark:r0";
    d.rpc("bdev_malloc_create", json!({"name": "r0", "num_blocks": 131072, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": nqn, "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "r0", "nsid": 1}}));
    let e = d.try_rpc("backup_restore", json!({"path": "s1.img", "bdev": "r0"})).unwrap_err();
    assert!(e.code == -16 && e.message.contains(nqn), "names the namespace: {e:?}");
    assert!(d.rpc("backup_get", json!(null)).as_array().unwrap().iter().all(|j| j["kind"] != "restore"), "no restore job was started");

    // Forced, it runs.
    let r = d.rpc("backup_restore", json!({"path": "s1.img", "bdev": "vol0", "force": true}));
    assert_eq!(wait_job(&d, r["id"].as_str().unwrap())["state"], "complete");
}

#[test]
fn backups_stay_under_the_backup_root_and_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let allowed = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!("{MINIMAL_CONFIG}\n[backup]\nrestore_allowed_dirs = [\"{}\"]\n", allowed.path().display()));
    for (name, blocks) in [("base", 16384), ("store", 20480), ("r0", 16384)] {
        d.rpc("bdev_malloc_create", json!({"name": name, "num_blocks": blocks, "block_size": 512}));
    }
    d.rpc("bdev_cow_create", json!({"name": "vol", "base_bdev": "base", "store_bdev": "store"}));
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "s1", "wait_sealed": true}));
    // Out of the root: absolute elsewhere, `..`, a symlink out. Nothing is written.
    let out_abs = elsewhere.path().join("a.img").display().to_string();
    let root = d.data_dir().join("backups");
    for path in [out_abs.as_str(), "/etc/tm_probe.img", "../../../tmp/x.img", "sub/../../x.img", "link/a.img"] {
        if path == "link/a.img" {
            // The daemon made the root (0700) at the first call.
            std::os::unix::fs::symlink(elsewhere.path(), root.join("link")).unwrap();
        }
        let e = d.try_rpc("backup_start", json!({"source": "s1", "path": path})).unwrap_err();
        assert_eq!(e.code, -1, "{path}: {e:?}");
        assert!(e.message.contains("outside the backup root"), "{path}: {e:?}");
    }
    assert!(!std::path::Path::new("/etc/tm_probe.img").exists());
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0, "nothing written outside the root");

    // Inside: relative (a new directory is made) or absolute under the root; owner-only.
    let j = d.rpc("backup_start", json!({"source": "s1", "path": "vol/full.img"}));
    assert_eq!(wait_job(&d, j["id"].as_str().unwrap())["state"], "complete");
    let img = root.join("vol/full.img");
    let manifest = root.join("vol/full.img.manifest.json");
    assert_eq!(mode(&img), 0o600, "image mode");
    assert_eq!(mode(&manifest), 0o600, "manifest mode");
    assert_eq!(mode(&root.join("vol")), 0o700, "directory mode");
    assert_eq!(mode(&root), 0o700, "root mode");
    let j = d.rpc("backup_start", json!({"source": "s1", "path": root.join("abs.img").display().to_string()}));
    assert_eq!(wait_job(&d, j["id"].as_str().unwrap())["state"], "complete");

    // Restore reads under the root (relative or absolute), or from an allowed directory.
    for path in ["vol/full.img".to_string(), img.display().to_string()] {
        let r = d.rpc("backup_restore", json!({"path": path, "bdev": "r0"}));
        assert_eq!(wait_job(&d, r["id"].as_str().unwrap())["state"], "complete");
    }
    for dir in [allowed.path(), elsewhere.path()] {
        std::fs::copy(&img, dir.join("full.img")).unwrap();
        std::fs::copy(&manifest, dir.join("full.img.manifest.json")).unwrap();
    }
    let r = d.rpc("backup_restore", json!({"path": allowed.path().join("full.img").display().to_string(), "bdev": "r0"}));
    assert_eq!(wait_job(&d, r["id"].as_str().unwrap())["state"], "complete");
    let refused = [elsewhere.path().join("full.img").display().to_string(), "link/full.img".into(), "../../../../etc/passwd".into()];
    for path in refused {
        let e = d.try_rpc("backup_restore", json!({"path": path, "bdev": "r0"})).unwrap_err();
        assert_eq!(e.code, -1, "{path}: {e:?}");
        assert!(e.message.contains("outside the backup root"), "{path}: {e:?}");
    }
}
