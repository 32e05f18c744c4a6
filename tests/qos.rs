//! QoS end to end (`bdev_set_qos_limit`): the real tidemarkd on two cores, a malloc bdev
//! exported over iSCSI, load from several sessions (the project's own iSCSI client, so no
//! external tool is needed), limits held, cleared, refused, saved and restored; SPDK's own
//! `spdk-rpc` sets one (tests/spdk/deps.sh installs it; missing fails unless TIDEMARK_SKIP_SPDK=1).

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use client::{read10, LoginOptions, Session};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const TARGET: &str = "iqn.2016-06.io.tidemark:qos";

fn daemon() -> (Daemon, SocketAddr) {
    // Two cores, so the limit is shared by connections on both.
    let d = Daemon::start(&MINIMAL_CONFIG.replace("cores = [0]", "cores = [0, 1]"));
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 65536, "block_size": 512}));
    let port = free_port();
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": TARGET, "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
    (d, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Reads of `blocks` 512-byte blocks from `sessions` sessions at once (each at queue depth 1)
/// for `secs` seconds; returns (I/Os per second, MiB per second) achieved.
fn load(addr: SocketAddr, sessions: usize, blocks: u16, secs: f64) -> (f64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || {
                let initiator = format!("iqn.2016-06.io.test:qos{i}");
                let mut o = LoginOptions::normal(&initiator, TARGET);
                o.isid = [0x80, 0, 0x12, 0x34, 0, i as u8 + 1];
                let mut s: Session = Session::login(addr, &o).expect("login");
                s.s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut lba = 0u32;
                while !stop.load(Relaxed) {
                    let r = s.scsi(0, &read10(lba, blocks), blocks as u32 * 512, None).expect("read");
                    assert_eq!(r.status, 0, "read failed: {:?}", r.sense);
                    done.fetch_add(1, Relaxed);
                    lba = (lba + blocks as u32) % (65536 - blocks as u32);
                }
            })
        })
        .collect();
    // Warm-up (logins, first timeslices) is not measured.
    std::thread::sleep(Duration::from_millis(300));
    let n0 = done.load(Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Relaxed) - n0;
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let iops = n as f64 / dt;
    (iops, iops * blocks as f64 * 512.0 / (1 << 20) as f64)
}

fn limits(d: &Daemon) -> Value {
    d.rpc("bdev_get_bdevs", json!({"name": "m0"}))[0]["assigned_rate_limits"].clone()
}

#[test]
fn limits_are_held_cleared_refused_saved_and_restored() {
    let (mut d, addr) = daemon();
    assert_eq!(limits(&d), json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}));

    // Unlimited first: the machine must be able to exceed the limit for the test to mean much.
    let (free_iops, _) = load(addr, 4, 8, 2.0);
    eprintln!("unlimited: {free_iops:.0} IOPS (4 KiB reads, 4 sessions)");

    // An I/O limit.
    let limit = 2000.0;
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 2000}));
    assert_eq!(limits(&d)["rw_ios_per_sec"], 2000);
    let (iops, _) = load(addr, 4, 8, 4.0);
    eprintln!("rw_ios_per_sec 2000: achieved {iops:.0} IOPS = {:.3} x limit", iops / limit);
    assert!(iops <= limit * 1.05, "{iops} IOPS over a {limit} limit");
    assert!(iops > limit * 0.5, "{iops} IOPS, far under a {limit} limit");
    assert!(free_iops > limit * 1.2 || free_iops < limit, "sanity: {free_iops}");

    // Cleared: the rate rises again.
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 0}));
    let (cleared, _) = load(addr, 4, 8, 2.0);
    eprintln!("cleared: {cleared:.0} IOPS");
    if free_iops > limit * 1.2 {
        assert!(cleared > limit * 1.1, "{cleared} IOPS after clearing the limit");
    }

    // A bytes limit with 64 KiB reads.
    let (free_mib, _) = (load(addr, 4, 128, 2.0).1, ());
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_mbytes_per_sec": 10}));
    let (_, mib) = load(addr, 4, 128, 4.0);
    eprintln!("rw_mbytes_per_sec 10: unlimited {free_mib:.1} MiB/s, limited {mib:.2} MiB/s = {:.3} x limit", mib / 10.0);
    assert!(mib <= 10.0 * 1.05 && mib > 5.0, "{mib} MiB/s under a 10 MiB/s limit");
    // A read-only limit on top, lower: it governs reads.
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "r_mbytes_per_sec": 5}));
    let (_, mib) = load(addr, 4, 128, 3.0);
    eprintln!("r_mbytes_per_sec 5: {mib:.2} MiB/s");
    assert!(mib <= 5.0 * 1.05 && mib > 2.5, "{mib} MiB/s under a 5 MiB/s read limit");
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "r_mbytes_per_sec": 0}));

    // Metrics: throttled time and the limits.
    let m = d.metrics_text();
    let throttled =
        m.lines().find(|l| l.starts_with("tidemark_bdev_qos_throttled_seconds_total{bdev=\"m0\"}")).unwrap_or_else(|| panic!("no throttled time in {m}"));
    let secs: f64 = throttled.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(secs > 0.0, "{throttled}");
    assert!(m.contains("tidemark_bdev_qos_limit{bdev=\"m0\",limit=\"rw_mbytes_per_sec\"} 10"), "{m}");

    // Bad input: SPDK's codes, the field named, nothing changed.
    let before = limits(&d);
    for (params, code, word) in [
        (json!({"name": "nope", "rw_ios_per_sec": 1000}), -19, ""),
        (json!({"name": "m0", "rw_ios_per_sec": 1500}), -32603, "rw_ios_per_sec"),
        (json!({"name": "m0", "rw_ios_per_sec": -1000}), -32602, "rw_ios_per_sec"),
        (json!({"name": "m0", "w_mbytes_per_sec": 1.5}), -32602, "w_mbytes_per_sec"),
        (json!({"name": "m0", "rw_mbytes_per_sec": "ten"}), -32602, "rw_mbytes_per_sec"),
        (json!({"name": "m0"}), -32602, "No rate limits"),
        (json!({"name": "m0", "rw_ios_per_sec": 1000, "bogus": 1}), -32602, "bogus"),
    ] {
        let e = d.try_rpc("bdev_set_qos_limit", params.clone()).expect_err("refused");
        assert_eq!(e.code, code, "{params}: {e:?}");
        assert!(e.message.contains(word), "{params}: {e:?}");
        assert_eq!(limits(&d), before, "{params} changed the limits");
    }

    // save_config writes the call after the bdev; a restart keeps the limit.
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 3000}));
    let saved = d.rpc("save_config", json!({"path": d.dir.path().join("tidemark.toml").display().to_string()}));
    let bdev = saved["subsystems"].as_array().and_then(|s| s.iter().find(|s| s["subsystem"] == "bdev")).cloned().unwrap_or_default();
    let methods: Vec<&str> = bdev["config"].as_array().map(|c| c.iter().filter_map(|c| c["method"].as_str()).collect()).unwrap_or_default();
    let create = methods.iter().position(|m| *m == "bdev_malloc_create");
    let qos = methods.iter().position(|m| *m == "bdev_set_qos_limit");
    assert!(create.is_some() && qos > create, "{methods:?}");
    d.terminate(Duration::from_secs(10));
    d.restart();
    assert_eq!(limits(&d), json!({"rw_ios_per_sec": 3000, "rw_mbytes_per_sec": 10, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}));
}

/// Queued I/O is not left hanging when its connection goes: a session killed while its
/// commands wait for tokens, then the limit cleared; the bdev still serves and can be deleted
/// once unexported.
#[test]
fn waiting_io_survives_a_dropped_connection_and_shutdown() {
    let (mut d, addr) = daemon();
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 1000, "rw_mbytes_per_sec": 1}));
    // 4 sessions of 64 KiB reads at 1 MiB/s: most of them wait.
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let initiator = format!("iqn.2016-06.io.test:drop{i}");
                let mut o = LoginOptions::normal(&initiator, TARGET);
                o.isid = [0x80, 0, 0x12, 0x34, 1, i as u8 + 1];
                let Ok(mut s) = Session::login(addr, &o) else { return };
                // Send a command and walk away without reading its answer.
                let h = s.command_header(0, &read10(0, 128), 65536, true, false);
                let _ = s.send(h, &[]);
                while !stop.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                drop(s);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    for t in threads {
        t.join().expect("thread");
    }
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0}));
    let (iops, _) = load(addr, 1, 8, 0.5);
    assert!(iops > 100.0, "{iops}");
    // Shutdown with I/O waiting: the daemon stops (SIGTERM) in time.
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 1000}));
    let t = std::thread::spawn(move || {
        let mut o = LoginOptions::normal("iqn.2016-06.io.test:last", TARGET);
        o.isid = [0x80, 0, 0x12, 0x34, 2, 1];
        if let Ok(mut s) = Session::login(addr, &o) {
            for k in 0..64u32 {
                let h = s.command_header(0, &read10(k, 1), 512, true, false);
                if s.send(h, &[]).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.terminate(Duration::from_secs(10)).is_some(), "tidemarkd hung on shutdown with queued I/O\n{}", d.log_text());
    let _ = t.join();
}

/// SPDK's `spdk-rpc` (PyPI `spdk`), unchanged, sets a limit.
#[test]
fn spdks_client_sets_a_limit() {
    let Some(rpc) = require_spdk_rpc() else { return };
    let (d, _) = daemon();
    let o = Command::new(&rpc)
        .arg("-s")
        .arg(&d.socket)
        .args(["bdev_set_qos_limit", "m0", "--rw-ios-per-sec", "5000", "--w-mbytes-per-sec", "20"])
        .output()
        .expect("run spdk-rpc");
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(limits(&d), json!({"rw_ios_per_sec": 5000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 20}));
    let o = Command::new(&rpc).arg("-s").arg(&d.socket).args(["bdev_set_qos_limit", "m0", "--rw-ios-per-sec", "1234"]).output().expect("run spdk-rpc");
    assert!(!o.status.success(), "a limit that is not a multiple of 1000 is refused");
}

/// The benchmark goal: QoS held within 5% at 10k IOPS and at 100 MB/s (figures
/// printed; bench/qos_bench.sh runs this test alone).
#[test]
fn benchmark_goal_10k_iops_and_100_mbytes() {
    let (d, addr) = daemon();
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 10000}));
    let (iops, _) = load(addr, 4, 8, 3.0);
    eprintln!("QOS rw_ios_per_sec 10000: achieved {iops:.0} IOPS = {:.3} x limit", iops / 10000.0);
    assert!(iops <= 10000.0 * 1.05 && iops > 5000.0, "{iops}");
    d.rpc("bdev_set_qos_limit", json!({"name": "m0", "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 100}));
    let (_, mib) = load(addr, 4, 128, 3.0);
    eprintln!("QOS rw_mbytes_per_sec 100: achieved {mib:.1} MiB/s = {:.3} x limit", mib / 100.0);
    assert!(mib <= 100.0 * 1.05 && mib > 50.0, "{mib}");
}
