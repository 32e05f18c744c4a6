//! The daemon as a user meets it: start, RPC through the CLI, bad input, metrics, shutdown.

mod support;

use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn cli_creates_and_lists_a_malloc_bdev_and_bad_params_name_the_field() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let out = d.cli(&["bdev_malloc_create", "--name", "m0", "--num_blocks", "2048", "--block_size", "512"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"m0\"");
    let out = d.cli(&["bdev_get_bdevs", "--name", "m0"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["num_blocks"], 2048);
    assert_eq!(v[0]["block_size"], 512);
    assert_eq!(v[0]["product_name"], "Malloc disk");

    let out = d.cli(&["bdev_malloc_create", "--name", "m1", "--num_blocks", "lots", "--block_size", "512"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("num_blocks") && err.contains("-32602"), "{err}");

    // The daemon keeps serving after bad input, and nothing changed.
    let all = d.rpc("bdev_get_bdevs", json!(null));
    assert_eq!(all.as_array().unwrap().len(), 1);
}

#[test]
fn cli_survives_a_closed_pipe_and_backup_has_help() {
    let d = Daemon::start(MINIMAL_CONFIG);
    // Enough bdevs that the listing outgrows a pipe's 64 KiB buffer.
    for i in 0..300 {
        d.rpc("bdev_null_create", json!({"name": format!("n{i}"), "num_blocks": 1024, "block_size": 512}));
    }
    // `tidemark bdev_get_iostat | head -1`: the reader goes away after one line; the CLI must
    // end quietly, not panic with exit 101 on the broken pipe.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{TIDEMARK}' -s '{}' bdev_get_bdevs | head -c 1 >/dev/null", d.socket.display()))
        .output()
        .expect("sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "the CLI panicked on a closed pipe: {err}");

    let out = Command::new(TIDEMARK).args(["backup", "--help"]).output().expect("run tidemark");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("backup start") && help.contains("backup restore"), "{help}");
}

#[test]
fn json_rpc_errors_follow_the_spec_and_spdk() {
    let d = Daemon::start(MINIMAL_CONFIG);
    assert_eq!(d.try_rpc("no_such_method", json!(null)).unwrap_err().code, -32601);
    assert_eq!(d.try_rpc("bdev_malloc_create", json!({"name": "a", "num_blocks": 8})).unwrap_err().code, -32602);
    assert_eq!(d.try_rpc("bdev_malloc_create", json!({"name": "a", "num_blocks": 8, "block_size": 500})).unwrap_err().code, -32602);
    d.rpc("bdev_malloc_create", json!({"name": "a", "num_blocks": 8, "block_size": 512}));
    assert_eq!(d.try_rpc("bdev_malloc_create", json!({"name": "a", "num_blocks": 8, "block_size": 512})).unwrap_err().code, -17);
    assert_eq!(d.try_rpc("bdev_malloc_delete", json!({"name": "zz"})).unwrap_err().code, -19);
    d.rpc("bdev_error_create", json!({"base_name": "a"}));
    let busy = d.try_rpc("bdev_malloc_delete", json!({"name": "a"})).unwrap_err();
    assert_eq!(busy.code, -16, "{busy:?}");
    assert!(busy.message.contains("EE_a"), "{busy:?}");
    assert_eq!(d.try_rpc("bdev_error_create", json!({"base_name": "a"})).unwrap_err().code, -17);
    d.rpc("bdev_error_delete", json!({"name": "EE_a"}));
    d.rpc("bdev_malloc_delete", json!({"name": "a"}));

    // Raw protocol errors: not JSON, not an object, wrong version.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"rpc_get_methods"}[1]{"jsonrpc":"1.0","id":2,"method":"x"}{bad"#).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains("\"result\""), "{out}");
    assert!(out.contains("-32600"), "{out}");
    assert!(out.contains("-32700"), "{out}");
    assert!(d.rpc("rpc_get_methods", json!(null)).as_array().unwrap().iter().any(|m| m == "bdev_get_iostat"));
}

#[test]
fn socket_is_owner_only_and_sigterm_exits_zero_quickly() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start(MINIMAL_CONFIG);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let t = Instant::now();
    let st = d.terminate(Duration::from_secs(5)).expect("exited");
    assert!(st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    assert!(!d.socket.exists(), "the socket is removed at exit");
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let out = std::process::Command::new(TIDEMARKD)
        .arg("--rpc-socket")
        .arg(&d.socket)
        .arg("--metrics")
        .arg("")
        .arg("--data-dir")
        .arg(d.dir.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another daemon"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.try_rpc("bdev_get_bdevs", json!(null)).is_ok());
}

#[test]
fn bad_configs_exit_1_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[reactor]\ncores = [4096]\n", "reactor.cores"),
        ("[reactor]\npoll_mode = \"sometimes\"\n", "reactor.poll_mode"),
        ("[metrics]\nlisten = 9464\n", "metrics.listen"),
        ("[bogus]\n", "bogus"),
        ("[[bdev]]\nmethod = \"bdev_malloc_create\"\nparams = { name = \"m\", num_blocks = 0, block_size = 512 }\n", "bdev[0]"),
        ("[[bdev]]\nmethod = \"bdev_nope\"\n", "bdev_nope"),
    ] {
        let p = dir.path().join("c.toml");
        let sock = dir.path().join("s.sock");
        std::fs::write(&p, format!("[rpc]\nsocket = \"{}\"\n{text}", sock.display())).unwrap();
        let out = std::process::Command::new(TIDEMARKD)
            .arg("--config")
            .arg(&p)
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .arg("--metrics")
            .arg("")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(err.contains(key), "{key} not named: {err}");
        assert!(!sock.exists(), "a failed start leaves no socket behind");
    }
}

#[test]
fn metrics_carry_latency_histograms_after_io() {
    let d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 512}));
    let m = d.metrics();
    assert!(m.contains("# TYPE tidemark_bdev_read_latency_seconds histogram"), "{m}");
    let bucket = m.lines().find(|l| l.starts_with("tidemark_bdev_read_latency_seconds_bucket{") && l.contains("bdev=\"m0\"") && l.contains("le=\"+Inf\""));
    assert!(bucket.is_some(), "{m}");
    assert!(m.contains("tidemark_build_info"), "{m}");
    assert!(m.contains("tidemark_reactor_busy_seconds_total"), "{m}");
    assert!(m.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    check_openmetrics(&m).unwrap_or_else(|e| panic!("{e}\n{m}"));
}

#[test]
fn idle_adaptive_daemon_uses_little_cpu() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let ticks = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(300));
    let a = ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let b = ticks(d.pid());
    let hz = 100.0; // USER_HZ
    let cpu = (b - a) as f64 / hz / 2.0;
    assert!(cpu < 0.10, "idle daemon used {:.1}% of a core", cpu * 100.0);
}

#[test]
fn save_config_round_trips_into_a_new_daemon() {
    let d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 4096}));
    d.rpc(
        "bdev_delay_create",
        json!({"name": "d0", "base_bdev_name": "m0", "avg_read_latency": 10, "p99_read_latency": 50, "avg_write_latency": 20, "p99_write_latency": 90}),
    );
    let path = d.dir.path().join("saved.toml");
    d.rpc("save_config", json!({"path": path.display().to_string()}));
    let saved = std::fs::read_to_string(&path).unwrap();
    let d2 = Daemon::start(&saved.replace(&d.socket.display().to_string(), "{socket}"));
    let b = d2.rpc("bdev_get_bdevs", json!({"name": "d0"}));
    assert_eq!(b[0]["driver_specific"]["delay"]["p99_write_latency"], 90);
    assert_eq!(b[0]["block_size"], 4096);
    let cfg = d2.rpc("framework_get_config", json!({"name": "bdev"}));
    assert_eq!(cfg.as_array().unwrap().len(), 2);
    assert_eq!(cfg[0]["method"], "bdev_malloc_create", "bases come before the bdevs that claim them");
}

#[test]
fn metrics_of_every_subsystem_form_one_valid_scrape() {
    let d = start_with_every_subsystem();
    let m = d.metrics();
    let samples = check_openmetrics(&m).unwrap_or_else(|e| panic!("{e}\n{m}")).samples;
    assert!(samples > 100, "{samples} samples");
    for family in [
        "tidemark_bdev_write_latency_seconds",
        "tidemark_preserve_snapshots",
        "tidemark_mirror_leg_state",
        "tidemark_nvmf_namespace_read_latency_seconds",
        "tidemark_iscsi_lun_write_latency_seconds",
        "tidemark_backup_jobs_running",
    ] {
        assert!(m.contains(&format!("# TYPE {family} ")), "{family} missing:\n{m}");
    }
    // One subsystem listed once: framework_get_subsystems is what SPDK tools read.
    let subs = d.rpc("framework_get_subsystems", json!(null));
    let names: Vec<&str> = subs.as_array().unwrap().iter().filter_map(|s| s["subsystem"].as_str()).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a subsystem is listed twice: {names:?}");
}
