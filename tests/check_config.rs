//! `tidemarkd --check-config`: a configuration that would fail at start is rejected now, with
//! the key of the offending call named, and checking touches nothing: no file in the data
//! directory, no listener bound, no device opened.

mod support;

use std::process::Command;
use support::*;

/// A base every case builds on: settings that pass, then the case's calls.
fn config(data_dir: &std::path::Path, calls: &str) -> String {
    format!("[daemon]\ndata_dir = \"{}\"\nbuffer_pool_mb = 8\n[reactor]\ncores = [0]\n[metrics]\nlisten = \"\"\n{calls}", data_dir.display())
}

const MALLOC: &str = r#"
[[bdev]]
method = "bdev_malloc_create"
params = { name = "m0", num_blocks = 2048, block_size = 512 }
"#;

const SUBSYSTEM: &str = r#"
[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_create_subsystem"
params = { nqn = "nqn.2016-06.io.tidemark:c", allow_any_host = true }
"#;

/// Runs --check-config on `text`; returns (success, stdout + stderr).
fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    std::fs::write(&path, text).expect("write config");
    let o = Command::new(TIDEMARKD).arg("--config").arg(&path).arg("--check-config").env_remove("RUST_LOG").output().expect("run tidemarkd");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn bad_configurations_are_rejected_with_the_key_named() {
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path();
    // (what is wrong, the calls, what the message must name)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown method",
            r#"[[bdev]]
method = "bdev_malloc_creat"
params = { name = "m0", num_blocks = 8, block_size = 512 }"#
                .into(),
            vec!["bdev[0].method", "bdev_malloc_creat", "did you mean bdev_malloc_create"],
        ),
        (
            "block size out of range",
            r#"[[bdev]]
method = "bdev_malloc_create"
params = { name = "m0", num_blocks = 8, block_size = 100 }"#
                .into(),
            vec!["bdev[0]", "block_size"],
        ),
        (
            "misspelt parameter",
            r#"[[bdev]]
method = "bdev_malloc_create"
params = { name = "m0", num_block = 8, block_size = 512 }"#
                .into(),
            vec!["bdev[0]", "num_block"],
        ),
        (
            "parameter of the wrong type",
            r#"[[bdev]]
method = "bdev_null_create"
params = { name = "n0", num_blocks = "many", block_size = 512 }"#
                .into(),
            vec!["bdev[0]", "num_blocks"],
        ),
        ("the same bdev name twice", format!("{MALLOC}{MALLOC}"), vec!["bdev[1]", "m0"]),
        (
            "copy-on-write volume over a missing bdev",
            format!(
                r#"{MALLOC}
[[bdev]]
method = "bdev_cow_create"
params = {{ name = "v0", base_bdev = "m0", store_bdev = "no_such_store", grain_kb = 64 }}"#
            ),
            vec!["bdev[1]", "no_such_store"],
        ),
        (
            "file that does not exist and no size to create it",
            r#"[[bdev]]
method = "bdev_uring_create"
params = { name = "u0", filename = "/nonexistent/tidemark-check/vol.img" }"#
                .into(),
            vec!["bdev[0]", "filename", "/nonexistent/tidemark-check/vol.img"],
        ),
        (
            "namespace on a missing bdev",
            format!(
                r#"{SUBSYSTEM}
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = {{ nqn = "nqn.2016-06.io.tidemark:c", namespace = {{ bdev_name = "ghost" }} }}"#
            ),
            vec!["nvmf[2]", "ghost"],
        ),
        (
            "listener of a subsystem never created",
            r#"[[nvmf]]
method = "nvmf_create_transport"
params = { trtype = "TCP" }
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = { nqn = "nqn.2016-06.io.tidemark:nobody", listen_address = { trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "4420" } }"#
                .into(),
            vec!["nvmf[1]", "nqn.2016-06.io.tidemark:nobody"],
        ),
        (
            "bad listener address",
            format!(
                r#"{SUBSYSTEM}
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = {{ nqn = "nqn.2016-06.io.tidemark:c", listen_address = {{ trtype = "TCP", adrfam = "IPv4", traddr = "300.1.2.3", trsvcid = "4420" }} }}"#
            ),
            vec!["nvmf[2]", "traddr"],
        ),
        (
            "iSCSI portal on a port that cannot be",
            r#"[[iscsi]]
method = "iscsi_create_portal_group"
params = { tag = 1, portals = [{ host = "127.0.0.1", port = "99999" }] }"#
                .into(),
            vec!["iscsi[0]", "portals[0]"],
        ),
        (
            "target node mapped to a missing portal group",
            format!(
                r#"{MALLOC}
[[iscsi]]
method = "iscsi_create_initiator_group"
params = {{ tag = 1, initiators = ["ANY"], netmasks = ["127.0.0.1/32"] }}
[[iscsi]]
method = "iscsi_create_target_node"
params = {{ name = "iqn.2016-06.io.tidemark:c", alias_name = "c", luns = [{{ bdev_name = "m0", lun_id = 0 }}], pg_ig_maps = [{{ pg_tag = 7, ig_tag = 1 }}], queue_depth = 64 }}"#
            ),
            vec!["iscsi[1]", "7"],
        ),
        ("a setting out of range", "[rpc]\nmax_clients = 0\n".into(), vec!["rpc.max_clients"]),
    ];
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (what, calls, names) in &cases {
        let (ok, out) = check(&config(d, calls));
        if ok {
            failures.push(format!("{what}: accepted\n{out}"));
        } else if let Some(missing) = names.iter().find(|n| !out.contains(**n)) {
            failures.push(format!("{what}: the message does not name {missing:?}:\n{out}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // None of it reached the data directory.
    assert!(std::fs::read_dir(d).expect("data dir").next().is_none(), "--check-config wrote into the data directory");
}

#[test]
fn the_default_packaged_and_example_configs_are_accepted() {
    let o = Command::new(TIDEMARKD).arg("--check-config").output().expect("run tidemarkd");
    assert!(o.status.success(), "default: {}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("configuration is valid (10 calls checked"), "the default's every call is checked: {said}");
    let mut configs: Vec<std::path::PathBuf> = vec![format!("{}/packaging/tidemark.toml", env!("CARGO_MANIFEST_DIR")).into()];
    for e in std::fs::read_dir(format!("{}/config", env!("CARGO_MANIFEST_DIR"))).expect("config/") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            configs.push(path);
        }
    }
    assert!(configs.len() >= 3);
    for path in configs {
        let o = Command::new(TIDEMARKD).arg("--config").arg(&path).arg("--check-config").output().expect("run tidemarkd");
        assert!(o.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
    }
}

/// Checking a configuration while its daemon runs must work: the check binds none of the
/// ports (they are taken) and creates none of the files (they would be the daemon's).
#[test]
fn checking_touches_no_listener_and_no_file() {
    let data = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let calls = format!(
        r#"
[[bdev]]
method = "bdev_uring_create"
params = {{ name = "u0", filename = "vol.img", size_mb = 64, block_size = 512 }}
{SUBSYSTEM}
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = {{ nqn = "nqn.2016-06.io.tidemark:c", namespace = {{ bdev_name = "u0" }} }}
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = {{ nqn = "nqn.2016-06.io.tidemark:c", listen_address = {{ trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "{port}" }} }}
[[iscsi]]
method = "iscsi_create_portal_group"
params = {{ tag = 1, portals = [{{ host = "127.0.0.1", port = "{port}" }}] }}
"#
    );
    let (ok, out) = check(&config(data.path(), &calls));
    assert!(ok, "{out}");
    assert!(!data.path().join("vol.img").exists(), "--check-config created the volume's file");
    // An existing file is only looked at: its size stands in, its content is not touched.
    let img = data.path().join("vol.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).expect("file");
    let before = std::fs::metadata(&img).expect("meta").modified().expect("mtime");
    let (ok, out) = check(&config(data.path(), &calls.replace("size_mb = 64, ", "")));
    assert!(ok, "{out}");
    assert_eq!(std::fs::metadata(&img).expect("meta").modified().expect("mtime"), before);
    assert_eq!(std::fs::read(&img).expect("read"), vec![7u8; 1 << 20]);
}
