//! tidemark as a drop-in for SPDK's tools: SPDK's own JSON-RPC clients drive every method
//! tidemark shares with SPDK with SPDK's default arguments, and SPDK's JSON configuration
//! loads into tidemarkd and is written by it (and started by SPDK's nvmf_tgt).
//!
//! Clients: `spdk-rpc` and `spdk-cli` from the PyPI package `spdk` (tests/spdk/deps.sh
//! installs them; `TIDEMARK_SKIP_SPDK=1` skips these tests on purpose), and SPDK v25.09's
//! `scripts/rpc.py` and `nvmf_tgt` when `SPDK_DIR` points at a build of it (skipped, saying so,
//! otherwise).

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, Daemon, MINIMAL_CONFIG, TIDEMARKD};

/// One of SPDK's JSON-RPC clients, as a command line.
struct Client {
    label: &'static str,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// `nvmf_subsystem_allow_any_host` flags (enable, disable): the two versions differ.
    allow_any: [&'static str; 2],
}

impl Client {
    fn run(&self, d: &Daemon, args: &[&str]) -> Output {
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..]).arg("-s").arg(&d.socket).args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.output().expect("run SPDK's client")
    }

    /// Runs `args`; panics with the client's output and the daemon's log on failure.
    fn ok(&self, d: &Daemon, args: &[&str]) -> String {
        let o = self.run(d, args);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{} {args:?} failed ({}):\n{out}\n{}\n--- tidemarkd log:\n{}",
            self.label,
            o.status,
            String::from_utf8_lossy(&o.stderr),
            d.log_text()
        );
        out
    }

    /// Runs `args`, which must fail; returns what the client printed.
    fn fails(&self, d: &Daemon, args: &[&str]) -> String {
        let o = self.run(d, args);
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!o.status.success(), "{} {args:?} succeeded but should fail:\n{text}", self.label);
        text
    }

    /// The methods this client knows (its `--help` lists them, four spaces in).
    fn methods(&self) -> BTreeSet<String> {
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..]).arg("--help");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let o = c.output().expect("client --help");
        let text = String::from_utf8_lossy(&o.stdout);
        let names: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("    "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.len() > 3 && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map(str::to_string)
            .collect();
        assert!(names.contains("bdev_malloc_create") && names.len() > 100, "{}: cannot read its method list from --help:\n{text}", self.label);
        names
    }
}

/// `spdk-rpc` from the `spdk` package ([`support::require_spdk_rpc`]).
fn pip_client() -> Option<Client> {
    let rpc = support::require_spdk_rpc()?;
    Some(Client { label: "spdk-rpc", argv: vec![rpc.display().to_string()], env: vec![], allow_any: ["--allow-any-host", "--no-allow-any-host"] })
}

/// SPDK v25.09's folder (`SPDK_DIR`, relative to the repository), or None after saying why.
fn spdk_dir(test: &str) -> Option<PathBuf> {
    let Ok(dir) = std::env::var("SPDK_DIR") else {
        eprintln!("SKIPPED {test}: SPDK_DIR is not set (point it at SPDK v25.09's folder, e.g. ../shared/peers/spdk-v25.09)");
        return None;
    };
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(&dir);
    if !p.join("scripts/rpc.py").exists() {
        eprintln!("SKIPPED {test}: SPDK_DIR={dir} has no scripts/rpc.py");
        return None;
    }
    Some(p)
}

fn v25_client(dir: &Path) -> Client {
    Client {
        label: "SPDK v25.09 rpc.py",
        argv: vec!["python3".into(), dir.join("scripts/rpc.py").display().to_string()],
        env: vec![("PYTHONPATH".into(), dir.join("python").display().to_string())],
        allow_any: ["-e", "-d"],
    }
}

/// Drives every method tidemark shares with `c` through `c`, with SPDK's default arguments,
/// checking the results scripts read; fails if a shared method was not exercised.
fn drive_every_shared_method(c: &Client) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let called = std::cell::RefCell::new(BTreeSet::new());
    let ok = |args: &[&str]| -> String {
        called.borrow_mut().insert(args[0].to_string());
        c.ok(&d, args)
    };
    let js = |args: &[&str]| -> Value {
        let out = ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{} {args:?}: not JSON ({e}):\n{out}", c.label))
    };

    // Framework.
    let methods: Value = serde_json::from_str(&ok(&["rpc_get_methods"])).expect("method list");
    let version: Value = serde_json::from_str(&ok(&["spdk_get_version"])).expect("version");
    assert!(version["version"].as_str().is_some_and(|v| v.contains("tidemark")), "{version}");
    ok(&["framework_wait_init"]);
    ok(&["framework_get_reactors"]);
    ok(&["framework_get_subsystems"]);

    // Keys: listed by name and path, never by content.
    let key = d.dir.path().join("key0");
    std::fs::write(&key, "DHHC-1:00:c3Bkay1ycGMta2V5:\n").expect("key file");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key file");
    ok(&["keyring_file_add_key", "key0", key.to_str().expect("utf-8 path")]);
    let keys = js(&["keyring_get_keys"]);
    assert_eq!((keys[0]["name"].as_str(), keys[0]["path"].as_str()), (Some("key0"), key.to_str()), "{keys}");
    assert!(!keys.to_string().contains("c3Bkay1ycGMta2V5"), "{keys}");
    ok(&["keyring_file_remove_key", "key0"]);

    // Bdevs, SPDK's sizes in MiB.
    assert_eq!(ok(&["bdev_malloc_create", "-b", "m0", "64", "512"]).trim(), "m0");
    assert_eq!(ok(&["bdev_malloc_create", "8", "4096"]).trim(), "Malloc0");
    for (name, mb) in [("a", "8"), ("b", "8"), ("m1", "8"), ("m2", "8")] {
        ok(&["bdev_malloc_create", "-b", name, mb, "512"]);
    }
    assert_eq!(ok(&["bdev_null_create", "n0", "64", "512"]).trim(), "n0");
    let img = d.dir.path().join("u0.img");
    std::fs::File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("uring file");
    assert_eq!(ok(&["bdev_uring_create", img.to_str().expect("utf-8 path"), "u0", "512"]).trim(), "u0");
    let m0 = js(&["bdev_get_bdevs", "-b", "m0"]);
    assert_eq!(m0[0]["name"], "m0");
    assert_eq!(m0[0]["num_blocks"], 131072);
    assert_eq!(m0[0]["block_size"], 512);
    for key in ["aliases", "product_name", "uuid", "claimed", "supported_io_types", "driver_specific", "assigned_rate_limits", "zoned"] {
        assert!(m0[0].get(key).is_some(), "bdev_get_bdevs has no {key}: {m0}");
    }
    let all: Value = serde_json::from_str(&ok(&["bdev_get_bdevs"])).expect("bdevs");
    assert!(all.as_array().is_some_and(|a| a.len() >= 8), "{all}");
    let iostat: Value = serde_json::from_str(&ok(&["bdev_get_iostat"])).expect("iostat");
    assert_eq!(iostat["tick_rate"], 1_000_000_000u64);
    assert!(iostat["ticks"].is_u64(), "{iostat}");
    let first = &iostat["bdevs"][0];
    for key in ["name", "bytes_read", "num_read_ops", "bytes_written", "num_write_ops", "read_latency_ticks", "write_latency_ticks", "queue_depth", "io_time"] {
        assert!(first.get(key).is_some(), "bdev_get_iostat has no {key}: {first}");
    }
    ok(&["bdev_error_create", "m1"]);
    ok(&["bdev_error_inject_error", "EE_m1", "read", "failure", "-n", "1"]);
    ok(&["bdev_error_delete", "EE_m1"]);
    assert_eq!(ok(&["bdev_delay_create", "-b", "m2", "-d", "d0", "-r", "10", "-t", "20", "-w", "10", "-n", "20"]).trim(), "d0");
    ok(&["bdev_delay_update_latency", "d0", "avg_read", "5"]);
    ok(&["bdev_delay_delete", "d0"]);
    ok(&["bdev_raid_set_options", "-w", "1024"]);
    ok(&["bdev_raid_create", "-n", "r0", "-r", "raid1", "-b", "a b"]);
    let raids = js(&["bdev_raid_get_bdevs", "all"]);
    assert_eq!(raids[0]["name"], "r0");
    assert_eq!(raids[0]["raid_level"], "raid1");
    ok(&["bdev_raid_remove_base_bdev", "b"]);
    ok(&["bdev_raid_add_base_bdev", "r0", "b"]);
    ok(&["bdev_raid_delete", "r0"]);
    // PCIe attach: the parameters are accepted; there is no such controller here.
    called.borrow_mut().insert("bdev_nvme_attach_controller".into());
    let e = c.fails(&d, &["bdev_nvme_attach_controller", "-b", "nvme0", "-t", "pcie", "-a", "0000:ff:1f.7"]);
    assert!(!e.contains("-32602"), "attach refused its parameters:\n{e}");
    called.borrow_mut().insert("bdev_nvme_detach_controller".into());
    let e = c.fails(&d, &["bdev_nvme_detach_controller", "nvme0"]);
    assert!(e.contains("-19"), "{e}");
    assert_eq!(js(&["bdev_nvme_get_controllers"]), json!([]), "no NVMe/TCP controller attached");
    called.borrow_mut().insert("bdev_nvme_reset_controller".into());
    let e = c.fails(&d, &["bdev_nvme_reset_controller", "nvme0"]);
    assert!(e.contains("-19"), "{e}");
    // A startup call: allowed while no controller is attached (rpc.py sends its defaults).
    ok(&["bdev_nvme_set_options"]);
    // What tidemark lacks is refused naming the parameter and why.
    let e = c.fails(&d, &["bdev_malloc_create", "-b", "md", "1", "512", "-m", "8"]);
    assert!(e.contains("-32602") && e.contains("md_size") && e.contains("metadata"), "{e}");
    let e = c.fails(&d, &["bdev_raid_create", "-n", "r5", "-r", "raid0", "-z", "64", "-b", "m1 m2"]);
    assert!(e.contains("-32602") && e.contains("raid_level"), "{e}");

    // NVMe/TCP.
    let nqn = "nqn.2016-06.io.spdk:cnode1";
    let port = free_port().to_string();
    ok(&["nvmf_set_config", "--dhchap-digests", "sha384,sha512", "--dhchap-dhgroups", "null,ffdhe2048"]);
    ok(&["nvmf_create_transport", "-t", "TCP"]);
    let tr = js(&["nvmf_get_transports"]);
    assert_eq!(tr[0]["trtype"], "TCP");
    ok(&["nvmf_create_subsystem", nqn, "-a", "-s", "SPDK0001"]);
    ok(&["nvmf_subsystem_add_ns", nqn, "m0"]);
    ok(&["nvmf_subsystem_add_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    ok(&["nvmf_subsystem_add_host", nqn, "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"]);
    ok(&["nvmf_subsystem_allow_any_host", nqn, c.allow_any[1]]);
    ok(&["nvmf_subsystem_allow_any_host", nqn, c.allow_any[0]]);
    let subs = js(&["nvmf_get_subsystems", nqn]);
    let s = &subs[0];
    assert_eq!(s["nqn"], nqn);
    assert_eq!(s["subtype"], "NVMe");
    assert_eq!(s["serial_number"], "SPDK0001");
    assert_eq!(s["allow_any_host"], true);
    assert_eq!(s["listen_addresses"][0], json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port}));
    assert_eq!(s["hosts"][0]["nqn"], "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6");
    assert_eq!(s["namespaces"][0]["nsid"], 1);
    assert_eq!(s["namespaces"][0]["bdev_name"], "m0");
    ok(&["nvmf_get_subsystems"]);
    let l = js(&["nvmf_subsystem_get_listeners", nqn]);
    assert_eq!(l[0]["address"]["trsvcid"], port);
    // ANA: a subsystem with ana_reporting (-r) on the same listener, group 1 made
    // inaccessible there; get_listeners shows SPDK's per-group `ana_states`.
    let ana = "nqn.2016-06.io.spdk:ana1";
    ok(&["nvmf_create_subsystem", ana, "-a", "-r", "-m", "2"]);
    ok(&["nvmf_subsystem_add_listener", ana, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    ok(&["nvmf_subsystem_listener_set_ana_state", ana, "-t", "tcp", "-a", "127.0.0.1", "-s", &port, "-n", "inaccessible", "-g", "1"]);
    let l = js(&["nvmf_subsystem_get_listeners", ana]);
    assert_eq!(l[0]["ana_states"], json!([{"ana_group": 1, "ana_state": "inaccessible"}, {"ana_group": 2, "ana_state": "optimized"}]), "{l}");
    let e = c.fails(&d, &["nvmf_subsystem_listener_set_ana_state", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", &port, "-n", "optimized"]);
    assert!(e.contains("-32602") && e.contains("ana_reporting"), "{e}");
    ok(&["nvmf_delete_subsystem", ana]);
    ok(&["nvmf_subsystem_get_controllers", nqn]);
    ok(&["nvmf_subsystem_get_qpairs", nqn]);

    // iSCSI.
    let iport = free_port().to_string();
    ok(&["iscsi_set_options"]);
    let o = js(&["iscsi_get_options"]);
    assert!(o.get("node_base").is_some(), "{o}");
    ok(&["iscsi_set_discovery_auth"]);
    ok(&["iscsi_create_auth_group", "1", "-c", "user:u1 secret:s1"]);
    let ag = js(&["iscsi_get_auth_groups"]);
    assert_eq!(ag[0]["secrets"][0]["user"], "u1");
    ok(&["iscsi_create_portal_group", "1", &format!("127.0.0.1:{iport}")]);
    let pg = js(&["iscsi_get_portal_groups"]);
    assert_eq!(pg[0], json!({"tag": 1, "private": false, "portals": [{"host": "127.0.0.1", "port": iport}]}));
    ok(&["iscsi_create_initiator_group", "1", "ANY", "127.0.0.1/32"]);
    let ig = js(&["iscsi_get_initiator_groups"]);
    assert_eq!(ig[0], json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    ok(&["iscsi_create_target_node", "disk1", "Data Disk1", "n0:0", "1:1", "64", "-d"]);
    ok(&["iscsi_target_node_add_lun", "iqn.2016-06.io.tidemark:disk1", "u0", "-i", "1"]);
    let nodes = js(&["iscsi_get_target_nodes"]);
    let n = &nodes[0];
    assert_eq!(n["name"], "iqn.2016-06.io.tidemark:disk1");
    assert_eq!(n["alias_name"], "Data Disk1");
    assert_eq!(n["pg_ig_maps"], json!([{"pg_tag": 1, "ig_tag": 1}]));
    assert_eq!(n["luns"], json!([{"bdev_name": "n0", "lun_id": 0}, {"bdev_name": "u0", "lun_id": 1}]));
    assert_eq!(n["queue_depth"], 64);
    assert_eq!(n["disable_chap"], true);
    ok(&["iscsi_get_connections"]);
    let devs = js(&["scsi_get_devices"]);
    assert_eq!(devs, json!([{"id": 0, "device_name": "iqn.2016-06.io.tidemark:disk1"}]));

    // Configuration, as SPDK's client builds it (framework_get_config per subsystem).
    ok(&["framework_get_config", "bdev"]);
    let saved: Value = serde_json::from_str(&ok(&["save_config"])).expect("save_config JSON");
    let names: Vec<&str> = saved["subsystems"].as_array().expect("subsystems").iter().filter_map(|s| s["subsystem"].as_str()).collect();
    assert!(names.contains(&"bdev") && names.contains(&"nvmf") && names.contains(&"iscsi"), "{saved}");

    // spdkcli (the `spdk` package only) reads the populated tree.
    if c.label == "spdk-rpc" {
        let cli = support::spdk_tool("spdk-cli").expect("spdk-cli is installed with spdk-rpc (tests/spdk/deps.sh)");
        let o = Command::new(cli).arg("-s").arg(&d.socket).arg("ls").output().expect("spdk-cli");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "spdk-cli ls failed:\n{text}\n{}", String::from_utf8_lossy(&o.stderr));
        for want in ["m0", "n0", nqn, "iqn.2016-06.io.tidemark:disk1", "127.0.0.1:", "Malloc0"] {
            assert!(text.contains(want), "spdk-cli ls does not show {want}:\n{text}");
        }
        println!("spdk-cli ls:\n{text}");
    }

    // Tear down with the delete methods.
    ok(&["iscsi_delete_target_node", "iqn.2016-06.io.tidemark:disk1"]);
    ok(&["iscsi_delete_initiator_group", "1"]);
    ok(&["iscsi_delete_portal_group", "1"]);
    ok(&["iscsi_delete_auth_group", "1"]);
    ok(&["nvmf_subsystem_remove_host", nqn, "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"]);
    ok(&["nvmf_subsystem_remove_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    ok(&["nvmf_subsystem_remove_ns", nqn, "1"]);
    ok(&["nvmf_delete_subsystem", nqn]);
    // The volume pool, on a bdev of its own.
    ok(&["bdev_malloc_create", "-b", "lvbase", "32", "512"]);
    ok(&["bdev_lvol_create_lvstore", "lvbase", "lvs0"]);
    ok(&["bdev_lvol_get_lvstores"]);
    ok(&["bdev_lvol_rename_lvstore", "lvs0", "lvs1"]);
    ok(&["bdev_lvol_create", "-l", "lvs1", "-t", "v0", "4"]);
    ok(&["bdev_lvol_get_lvols"]);
    ok(&["bdev_lvol_rename", "lvs1/v0", "v1"]);
    ok(&["bdev_lvol_resize", "lvs1/v1", "8"]);
    ok(&["bdev_lvol_snapshot", "lvs1/v1", "s1"]);
    ok(&["bdev_lvol_clone", "lvs1/s1", "c1"]);
    ok(&["bdev_lvol_inflate", "lvs1/c1"]);
    ok(&["bdev_lvol_decouple_parent", "lvs1/v1"]);
    ok(&["bdev_lvol_delete", "lvs1/c1"]);
    ok(&["bdev_lvol_delete", "lvs1/s1"]);
    // The PyPI client spells the option with dashes, SPDK v25.09's rpc.py with underscores.
    let qos_flag = if c.label == "spdk-rpc" { "--rw-ios-per-sec" } else { "--rw_ios_per_sec" };
    ok(&["bdev_set_qos_limit", "lvs1/v1", qos_flag, "1000"]);
    ok(&["bdev_lvol_set_read_only", "lvs1/v1"]);
    ok(&["bdev_lvol_delete", "lvs1/v1"]);
    ok(&["bdev_lvol_delete_lvstore", "-l", "lvs1"]);
    ok(&["bdev_malloc_delete", "lvbase"]);
    ok(&["bdev_uring_delete", "u0"]);
    ok(&["bdev_null_delete", "n0"]);
    ok(&["bdev_malloc_delete", "m0"]);

    // Every method tidemark has that this client also has was called above.
    let theirs = c.methods();
    let shared: BTreeSet<String> =
        methods.as_array().expect("method list").iter().filter_map(Value::as_str).filter(|m| theirs.contains(*m)).map(str::to_string).collect();
    called.borrow_mut().insert("spdk_kill_instance".into());
    let called = called.into_inner();
    let missed: Vec<&String> = shared.difference(&called).collect();
    assert!(missed.is_empty(), "{}: methods shared with tidemark not exercised by this test: {missed:?}", c.label);
    println!("{}: {} methods shared with tidemark, all called with SPDK's default arguments", c.label, shared.len());

    c.ok(&d, &["spdk_kill_instance", "SIGTERM"]);
    let mut d = d;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&d.socket).is_ok() {
        assert!(Instant::now() < deadline, "tidemarkd still answers 20 s after spdk_kill_instance");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = d.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "tidemarkd did not exit cleanly after spdk_kill_instance: {status:?}");
}

#[test]
fn spdk_rpc_drives_every_shared_method() {
    let Some(c) = pip_client() else { return };
    drive_every_shared_method(&c);
}

#[test]
fn spdk_v25_rpc_py_drives_every_shared_method() {
    let Some(dir) = spdk_dir("spdk_v25_rpc_py_drives_every_shared_method") else { return };
    drive_every_shared_method(&v25_client(&dir));
}

/// A configuration in SPDK's documented format, as SPDK's save_config writes it for nvmf_tgt
/// and iscsi_tgt (tuning subsystems included), with ports and names of this test.
fn handwritten_spdk_config(nvmf_port: u16, iscsi_port: u16) -> Value {
    json!({"subsystems": [
        {"subsystem": "keyring", "config": []},
        {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options", "params": {"small_pool_count": 8192, "large_pool_count": 1024, "small_bufsize": 8192, "large_bufsize": 135168}}]},
        {"subsystem": "sock", "config": [
            {"method": "sock_set_default_impl", "params": {"impl_name": "posix"}},
            {"method": "sock_impl_set_options", "params": {"impl_name": "posix", "recv_buf_size": 2097152, "send_buf_size": 2097152, "enable_recv_pipe": true, "enable_quickack": false, "enable_placement_id": 0, "enable_zerocopy_send_server": true, "enable_zerocopy_send_client": false, "zerocopy_threshold": 0, "tls_version": 0, "enable_ktls": false}}
        ]},
        {"subsystem": "accel", "config": [{"method": "accel_set_options", "params": {"small_cache_size": 128, "large_cache_size": 16, "task_count": 2048, "sequence_count": 2048, "buf_count": 2048}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256, "bdev_auto_examine": true, "iobuf_small_cache_size": 128, "iobuf_large_cache_size": 16}},
            {"method": "bdev_raid_set_options", "params": {"process_window_size_kb": 1024, "process_max_bandwidth_mb_sec": 0}},
            {"method": "bdev_nvme_set_options", "params": {"action_on_timeout": "none", "timeout_us": 0, "keep_alive_timeout_ms": 10000, "bdev_retry_count": 3}},
            {"method": "bdev_nvme_set_hotplug", "params": {"period_us": 100000, "enable": false}},
            {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8192, "block_size": 512, "physical_block_size": 512, "uuid": "2b3e1e4a-7d1c-4f3e-9d51-3a1c2b4d5e6f", "optimal_io_boundary": 0, "md_size": 0, "dif_type": 0, "dif_is_head_of_md": false, "dif_pi_format": 0}},
            {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 16384, "block_size": 512, "physical_block_size": 512, "uuid": "6c1f3a2b-9e8d-4c7b-a6f5-e4d3c2b1a098", "md_size": 0, "dif_type": 0, "dif_is_head_of_md": false, "dif_pi_format": 0}},
            {"method": "bdev_wait_for_examine"}
        ]},
        {"subsystem": "scsi", "config": null},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_set_config", "params": {"discovery_filter": "match_any", "admin_cmd_passthru": {"identify_ctrlr": false}}},
            {"method": "nvmf_set_max_subsystems", "params": {"max_subsystems": 1024}},
            {"method": "nvmf_set_crdt", "params": {"crdt1": 0, "crdt2": 0, "crdt3": 0}},
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP", "max_queue_depth": 128, "max_io_qpairs_per_ctrlr": 127, "in_capsule_data_size": 4096, "max_io_size": 131072, "io_unit_size": 131072, "max_aq_depth": 128, "num_shared_buffers": 511, "buf_cache_size": 4294967295u64, "dif_insert_or_strip": false, "zcopy": false, "c2h_success": true, "sock_priority": 0, "abort_timeout_sec": 1, "ack_timeout": 0, "data_wr_pool_size": 0}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": "nqn.2016-06.io.spdk:cnode1", "allow_any_host": true, "serial_number": "SPDK00000000000001", "model_number": "SPDK bdev Controller", "max_namespaces": 32, "min_cntlid": 1, "max_cntlid": 65519, "ana_reporting": false}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "nqn.2016-06.io.spdk:cnode1", "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": nvmf_port.to_string()}, "secure_channel": false}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "nqn.2016-06.io.spdk:cnode1", "namespace": {"nsid": 1, "bdev_name": "Malloc0", "nguid": "2B3E1E4A7D1C4F3E9D513A1C2B4D5E6F", "uuid": "2b3e1e4a-7d1c-4f3e-9d51-3a1c2b4d5e6f", "no_auto_visible": false}}}
        ]},
        {"subsystem": "iscsi", "config": [
            {"method": "iscsi_create_portal_group", "params": {"tag": 1, "portals": [{"host": "127.0.0.1", "port": iscsi_port.to_string()}], "private": false, "wait": false}},
            {"method": "iscsi_create_initiator_group", "params": {"tag": 2, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}},
            {"method": "iscsi_create_target_node", "params": {"name": "iqn.2016-06.io.spdk:disk1", "alias_name": "Data Disk1", "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 2}], "luns": [{"bdev_name": "Null0", "lun_id": 0}], "queue_depth": 64, "disable_chap": false, "require_chap": false, "mutual_chap": false, "chap_group": 0, "header_digest": false, "data_digest": false}}
        ]}
    ]})
}

fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).expect("JSON")).expect("write config");
    p
}

/// The state a configuration builds, for comparing two daemons.
fn state(d: &Daemon) -> Value {
    let bdevs: Vec<Value> = d
        .rpc("bdev_get_bdevs", Value::Null)
        .as_array()
        .expect("bdevs")
        .iter()
        .map(|b| json!([b["name"], b["uuid"], b["num_blocks"], b["block_size"], b["product_name"]]))
        .collect();
    json!({
        "bdevs": bdevs,
        "nvmf": d.rpc("nvmf_get_subsystems", Value::Null),
        "transports": d.rpc("nvmf_get_transports", Value::Null),
        "iscsi": d.rpc("iscsi_get_target_nodes", Value::Null),
        "portal_groups": d.rpc("iscsi_get_portal_groups", Value::Null),
        "initiator_groups": d.rpc("iscsi_get_initiator_groups", Value::Null),
    })
}

#[test]
fn spdk_json_config_loads_and_round_trips() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_json(tmp.path(), "spdk.json", &handwritten_spdk_config(free_port(), free_port()));
    let mut d = Daemon::start_with_args(MINIMAL_CONFIG, &["--json", cfg.to_str().expect("utf-8")]);
    let m = d.rpc("bdev_get_bdevs", json!({"name": "Malloc0"}));
    assert_eq!(m[0]["uuid"], "2b3e1e4a-7d1c-4f3e-9d51-3a1c2b4d5e6f");
    assert_eq!(m[0]["num_blocks"], 8192);
    assert_eq!(d.rpc("bdev_get_bdevs", json!({"name": "Null0"}))[0]["num_blocks"], 16384);
    let s = d.rpc("nvmf_get_subsystems", json!({"nqn": "nqn.2016-06.io.spdk:cnode1"}));
    assert_eq!(s[0]["serial_number"], "SPDK00000000000001");
    assert_eq!(s[0]["namespaces"][0]["bdev_name"], "Malloc0");
    assert_eq!(s[0]["namespaces"][0]["nguid"], "2B3E1E4A7D1C4F3E9D513A1C2B4D5E6F");
    assert_eq!(d.rpc("iscsi_get_target_nodes", Value::Null)[0]["luns"], json!([{"bdev_name": "Null0", "lun_id": 0}]));
    let log = d.log_text();
    for skipped in ["bdev_set_options", "iobuf_set_options", "sock_impl_set_options", "bdev_wait_for_examine"] {
        assert!(log.contains(&format!("skipping {skipped}")), "no log line for skipped {skipped}:\n{log}");
    }

    // Add what only a running target has (a file-backed bdev with a relative name, a raid1 of
    // two files), save as SPDK's JSON, and start a second daemon from it.
    for (name, file) in [("u0", "u0.img"), ("l0", "l0.img"), ("l1", "l1.img")] {
        d.rpc("bdev_uring_create", json!({"name": name, "filename": file, "size_mb": 8, "block_size": 512}));
    }
    d.rpc("bdev_raid_create", json!({"name": "r0", "raid_level": "raid1", "base_bdevs": ["l0", "l1"]}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": "nqn.2016-06.io.spdk:cnode1", "namespace": {"bdev_name": "r0"}}));
    let saved_path = tmp.path().join("saved.json");
    let saved = d.rpc("save_config", json!({"format": "spdk", "path": saved_path.to_str().expect("utf-8")}));
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&saved_path).expect("saved file")).expect("saved JSON");
    assert_eq!(saved, on_disk);
    let uring = on_disk["subsystems"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["subsystem"] == "bdev"))
        .and_then(|b| b["config"].as_array())
        .and_then(|c| c.iter().find(|c| c["method"] == "bdev_uring_create" && c["params"]["name"] == "u0"))
        .cloned()
        .expect("bdev_uring_create u0 in the saved config");
    assert!(uring["params"]["filename"].as_str().is_some_and(|f| f.starts_with('/')), "SPDK has no data dir: {uring}");
    assert!(uring["params"].get("size_mb").is_none(), "size_mb is tidemark's: {uring}");
    let before = state(&d);
    d.terminate(Duration::from_secs(20));
    let d2 = Daemon::start_with_args(MINIMAL_CONFIG, &["--json", saved_path.to_str().expect("utf-8")]);
    assert_eq!(state(&d2), before, "the SPDK JSON written by save_config does not rebuild the same target");
    drop(d2);
    drop(d);

    // What tidemark cannot build fails the load, naming the method.
    let bad = write_json(
        tmp.path(),
        "bad.json",
        &json!({"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_aio_create", "params": {"name": "a0", "filename": "/dev/null"}}]}]}),
    );
    let o = Command::new(TIDEMARKD).arg("--json").arg(&bad).arg("--check-config").output().expect("tidemarkd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("bdev_aio_create"), "{err}");
}

/// SPDK's nvmf_tgt, killed by PID when the test ends.
struct SpdkApp(Child);

impl Drop for SpdkApp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn spdk_nvmf_tgt_starts_from_tidemark_config() {
    let Some(dir) = spdk_dir("spdk_nvmf_tgt_starts_from_tidemark_config") else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let nqn = "nqn.2016-06.io.tidemark:spdk";
    let port = free_port().to_string();
    let mut d = Daemon::start(MINIMAL_CONFIG);
    d.rpc("bdev_malloc_create", json!({"name": "Malloc0", "num_blocks": 16384, "block_size": 512}));
    d.rpc("bdev_null_create", json!({"name": "Null0", "num_blocks": 16384, "block_size": 4096}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP", "max_queue_depth": 64}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": nqn, "serial_number": "TM0001", "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "Malloc0"}}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "Null0", "nsid": 5}}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port}}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": free_port().to_string()}]}));
    let cfg = tmp.path().join("tidemark-spdk.json");
    d.rpc("save_config", json!({"format": "spdk", "path": cfg.to_str().expect("utf-8")}));
    let ours = d.rpc("nvmf_get_subsystems", json!({"nqn": nqn}));
    d.terminate(Duration::from_secs(20));

    let sock = tmp.path().join("spdk.sock");
    let log = tmp.path().join("nvmf_tgt.log");
    let logf = std::fs::File::create(&log).expect("log");
    let child = Command::new(dir.join("bin/nvmf_tgt"))
        .args(["-m", "0x1", "--no-huge", "-s", "1024", "--no-pci", "-r"])
        .arg(&sock)
        .arg("--json")
        .arg(&cfg)
        .stdout(Stdio::from(logf.try_clone().expect("dup")))
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("start nvmf_tgt");
    let mut app = SpdkApp(child);
    let c = v25_client(&dir);
    let rpc = |args: &[&str]| -> Output {
        let mut cmd = Command::new(&c.argv[0]);
        cmd.args(&c.argv[1..]).arg("-s").arg(&sock).args(args);
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        cmd.output().expect("rpc.py")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = app.0.try_wait() {
            panic!(
                "nvmf_tgt exited ({status}) on tidemark's config:\n{}\n--- config:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(&cfg).unwrap_or_default()
            );
        }
        if sock.exists() && rpc(&["framework_wait_init"]).status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "nvmf_tgt did not come up in 60 s:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = rpc(&["nvmf_get_subsystems"]);
    let subs: Value = serde_json::from_slice(&out.stdout).expect("nvmf_get_subsystems JSON from nvmf_tgt");
    let s = subs.as_array().and_then(|a| a.iter().find(|s| s["nqn"] == nqn)).cloned().unwrap_or_else(|| panic!("nvmf_tgt has no {nqn}: {subs}"));
    assert_eq!(s["serial_number"], "TM0001");
    assert_eq!(s["listen_addresses"][0]["trsvcid"], port);
    let ns: Vec<(Value, Value, Value)> =
        s["namespaces"].as_array().expect("namespaces").iter().map(|n| (n["nsid"].clone(), n["bdev_name"].clone(), n["uuid"].clone())).collect();
    let want: Vec<(Value, Value, Value)> =
        ours[0]["namespaces"].as_array().expect("namespaces").iter().map(|n| (n["nsid"].clone(), n["bdev_name"].clone(), n["uuid"].clone())).collect();
    assert_eq!(ns, want, "nvmf_tgt's namespaces differ from tidemark's");
    let bdevs: Value = serde_json::from_slice(&rpc(&["bdev_get_bdevs", "-b", "Null0"]).stdout).expect("bdev_get_bdevs");
    assert_eq!(bdevs[0]["block_size"], 4096);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("*ERROR*"), "nvmf_tgt logged errors on tidemark's config:\n{text}");
    println!("SPDK nvmf_tgt started from tidemark's save_config --format spdk:\n{text}");
    let _ = rpc(&["spdk_kill_instance", "SIGTERM"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}
