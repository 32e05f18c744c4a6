//! A module is a folder: the throw-away bdev module of tests/modules/throwaway/, linked into a
//! test build of the daemon (the `tidemarkd-test-modules` example) and named by no list, is
//! served over RPC, listed by `rpc_get_methods`, written by `save_config` and scraped in
//! `/metrics`.

mod support;

use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use support::{check_openmetrics, Daemon, MINIMAL_CONFIG};

/// The test build of the daemon, built here if `cargo test --test modules` alone did not.
fn test_daemon() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/modules-<hash> -> target/<profile>/examples/
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let program = profile_dir.join("examples").join("tidemarkd-test-modules");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", "tidemarkd-test-modules"])
        .arg("--target-dir")
        .arg(profile_dir.parent().expect("target dir"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --example tidemarkd-test-modules");
    assert!(status.success(), "cannot build the tidemarkd-test-modules example");
    assert!(program.exists(), "{} was not built", program.display());
    program
}

#[test]
fn a_module_in_a_test_folder_is_reachable_listed_saved_and_scraped() {
    let d = Daemon::start_program(&test_daemon(), MINIMAL_CONFIG, &[], &[], |_| {});

    assert_eq!(d.rpc("bdev_throwaway_create", json!({"name": "tw0", "num_blocks": 2048})), json!("tw0"));
    let b = d.rpc("bdev_get_bdevs", json!({"name": "tw0"}));
    assert_eq!(b[0]["product_name"], "Throw-away disk");
    assert_eq!(b[0]["num_blocks"], 2048);

    let methods = d.rpc("rpc_get_methods", json!({}));
    let methods: Vec<&str> = methods.as_array().expect("a list").iter().filter_map(|m| m.as_str()).collect();
    for m in ["bdev_throwaway_create", "bdev_throwaway_delete", "bdev_malloc_create"] {
        assert!(methods.contains(&m), "{m} is not listed: {methods:?}");
    }

    let saved = d.rpc("save_config", json!({}));
    let bdev = saved["subsystems"].as_array().expect("subsystems").iter().find(|s| s["subsystem"] == "bdev").expect("the bdev section");
    let call = bdev["config"].as_array().expect("calls").iter().find(|c| c["method"] == "bdev_throwaway_create").expect("the throw-away bdev is saved");
    assert_eq!(call["params"], json!({"name": "tw0", "num_blocks": 2048}));

    let scrape = d.metrics();
    check_openmetrics(&scrape).unwrap_or_else(|e| panic!("invalid scrape: {e}\n{scrape}"));
    assert!(scrape.lines().any(|l| l.starts_with("tidemark_throwaway_bdevs") && l.ends_with(" 1.0")), "family missing:\n{scrape}");

    d.rpc("bdev_throwaway_delete", json!({"name": "tw0"}));
    assert!(d.try_rpc("bdev_get_bdevs", json!({"name": "tw0"})).is_err());
}

#[test]
fn the_product_daemon_has_no_test_module() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let methods = d.rpc("rpc_get_methods", json!({}));
    assert!(!methods.as_array().expect("a list").iter().any(|m| m == "bdev_throwaway_create"));
}
