//! The README's first command: the daemon on the embedded default configuration. Run here on
//! private ports and paths (the same file with 4420/3260/9464 and the paths replaced), it must
//! come up with the CoW volume `vol0` exported over NVMe/TCP and iSCSI, preservable with one
//! RPC, and small at idle.

mod support;

use serde_json::json;
use support::*;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
}

#[test]
fn default_config_serves_vol0_on_both_front_ends_and_preserves_it() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")).unwrap();
    assert_eq!(text, tidemark::config::DEFAULT_CONFIG, "the embedded default is config/default.toml");
    let (nvmf_port, iscsi_port) = (free_port(), free_port());
    let cfg = text
        .replace("\"/var/tmp/tidemark\"", "\"{data_dir}\"")
        .replace("\"/var/tmp/tidemark.sock\"", "\"{socket}\"")
        .replace("\"127.0.0.1:9464\"", "\"{metrics}\"")
        .replace("\"4420\"", &format!("\"{nvmf_port}\""))
        .replace("\"3260\"", &format!("\"{iscsi_port}\""));
    let settings = cfg.lines().filter(|l| !l.trim_start().starts_with('#'));
    assert!(settings.clone().all(|l| !l.contains("4420") && !l.contains("3260") && !l.contains("/var/tmp")), "every fixed port and path was replaced");
    let d = Daemon::start(&cfg);

    let b = d.rpc("bdev_get_bdevs", json!({"name": "vol0"}));
    assert_eq!(b[0]["num_blocks"].as_u64().unwrap() * b[0]["block_size"].as_u64().unwrap(), 1 << 30, "{b}");
    let subs = d.rpc("nvmf_get_subsystems", json!(null)).to_string();
    assert!(subs.contains("nqn.2016-06.io.tidemark:vol0") && subs.contains(&nvmf_port.to_string()), "{subs}");
    let nodes = d.rpc("iscsi_get_target_nodes", json!(null)).to_string();
    assert!(nodes.contains("iqn.2016-06.io.tidemark:vol0"), "{nodes}");

    // Small at idle, the volume being file-backed.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rss = rss_kib(d.pid());
    println!("idle RSS on the default config: {} KiB", rss);
    assert!(rss < 200 * 1024, "idle RSS {rss} KiB");

    // One command preserves the volume.
    let s = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol0", "snapshot_name": "first", "wait_sealed": true}));
    assert_eq!(s["state"], "sealed", "{s}");
    let out = d.cli(&["bdev_snapshot_get", "--name", "first"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"origin\": \"vol0\""), "{}", String::from_utf8_lossy(&out.stdout));

    if have("qemu-io") {
        let url = format!("iscsi://127.0.0.1:{iscsi_port}/iqn.2016-06.io.tidemark:vol0/0");
        let w = std::process::Command::new("timeout")
            .args(["60", "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", &url])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&w.stdout);
        assert!(w.status.success() && !out.contains("Pattern verification failed"), "{out}");
    }
}
