//! The keyring as an operator meets it: keys added from files only the daemon's user can read,
//! listed and saved by name and path, loaded again at restart, and their secrets nowhere.

mod support;

use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

/// A secret that can appear in no output by chance.
const SECRET: &str = "DHHC-1:00:S3CR3T-c0ffee-7e1d0f4a9b2c:";

fn key_file(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write key file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod key file");
    p
}

#[test]
fn keys_are_added_listed_refused_and_removed() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let good = key_file(d.dir.path(), "key0", &format!("{SECRET}\n"), 0o600);
    assert_eq!(d.rpc("keyring_file_add_key", json!({"name": "key0", "path": good})), json!(true));
    let keys = d.rpc("keyring_get_keys", json!(null));
    assert_eq!(keys, json!([{"name": "key0", "path": good, "removed": false, "probed": false, "refcnt": 0, "module": "keyring_file"}]));
    let e = d.try_rpc("keyring_file_add_key", json!({"name": "key0", "path": good})).unwrap_err();
    assert_eq!(e.code, -17, "{e:?}");

    // Readable by group and other: refused, naming the file and its mode.
    let open = key_file(d.dir.path(), "open", SECRET, 0o644);
    let e = d.try_rpc("keyring_file_add_key", json!({"name": "k1", "path": open})).unwrap_err();
    assert_eq!(e.code, -1, "{e:?}");
    assert!(e.message.contains(&open.display().to_string()) && e.message.contains("0644"), "{e:?}");
    // A symlink to a good file: refused, not followed.
    let link = d.dir.path().join("link");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    let e = d.try_rpc("keyring_file_add_key", json!({"name": "k2", "path": link})).unwrap_err();
    assert_eq!(e.code, -1, "{e:?}");
    assert!(e.message.contains(&link.display().to_string()) && e.message.contains("symbolic link"), "{e:?}");
    // SPDK's rule: absolute paths only. A missing file: its errno.
    let e = d.try_rpc("keyring_file_add_key", json!({"name": "k3", "path": "key0"})).unwrap_err();
    assert_eq!(e.code, -1, "{e:?}");
    let e = d.try_rpc("keyring_file_add_key", json!({"name": "k3", "path": d.dir.path().join("missing")})).unwrap_err();
    assert_eq!(e.code, -2, "{e:?}");
    assert_eq!(d.rpc("keyring_get_keys", json!(null)).as_array().map(Vec::len), Some(1), "refused keys are not added");

    assert_eq!(d.rpc("keyring_file_remove_key", json!({"name": "key0"})), json!(true));
    assert_eq!(d.rpc("keyring_get_keys", json!(null)), json!([]));
    let e = d.try_rpc("keyring_file_remove_key", json!({"name": "key0"})).unwrap_err();
    assert_eq!(e.code, -19, "{e:?}");
    assert!(e.message.contains("key0"), "{e:?}");
}

#[test]
fn saved_config_holds_name_and_path_and_a_restart_loads_the_key() {
    let mut d = Daemon::start_with_env(MINIMAL_CONFIG, &[], &[("RUST_LOG", "trace")]);
    let key = key_file(d.dir.path(), "key0", SECRET, 0o600);
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 512}));
    d.rpc("keyring_file_add_key", json!({"name": "key0", "path": key}));

    // save_config: the keyring's calls come first, with name and path only.
    let saved = d.rpc("save_config", json!(null));
    let subsystems = saved["subsystems"].as_array().expect("subsystems");
    assert_eq!(subsystems[0], json!({"subsystem": "keyring", "config": [{"method": "keyring_file_add_key", "params": {"name": "key0", "path": key}}]}));
    let spdk = d.rpc("save_config", json!({"format": "spdk"}));
    assert_eq!(spdk["subsystems"][0]["subsystem"], "keyring", "{spdk}");
    let cfg = d.dir.path().join("tidemark.toml");
    d.rpc("save_config", json!({"path": cfg}));
    let toml = std::fs::read_to_string(&cfg).expect("saved config");
    // TOML tables are written in name order; loading applies `[[keyring]]` before `[[bdev]]`
    // whatever the text order (`Config::sections`), so only presence is checked here.
    let parsed: toml::Table = toml.parse().expect("saved TOML parses");
    assert_eq!(parsed["keyring"][0]["params"]["name"].as_str(), Some("key0"), "{toml}");
    assert!(parsed["keyring"][0]["params"].get("secret").is_none(), "{toml}");
    let spdk_json = d.dir.path().join("spdk.json");
    d.rpc("save_config", json!({"path": spdk_json, "format": "spdk"}));

    // Nothing secret in any reply, the saved files, the metrics or the log.
    let metrics = d.metrics_text();
    let keys_gauge = metrics.lines().find_map(|l| l.strip_prefix("tidemark_keyring_keys")).and_then(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(keys_gauge, Some(1.0), "{metrics}");
    let outputs = [
        ("keyring_get_keys", d.rpc("keyring_get_keys", json!(null)).to_string()),
        ("framework_get_config", d.rpc("framework_get_config", json!({"name": "keyring"})).to_string()),
        ("save_config", saved.to_string()),
        ("save_config spdk", spdk.to_string()),
        ("saved TOML", toml.clone()),
        ("saved JSON", std::fs::read_to_string(&spdk_json).expect("saved json")),
        ("metrics", metrics),
        ("metrics (OpenMetrics)", d.metrics()),
    ];
    for (what, text) in &outputs {
        assert!(!text.contains("S3CR3T"), "the secret appears in {what}:\n{text}");
    }

    // Restart with the saved configuration: the key is read from its file again.
    assert!(d.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
    d.restart();
    let keys = d.rpc("keyring_get_keys", json!(null));
    assert_eq!(keys[0]["name"], "key0", "{keys}");
    assert_eq!(keys[0]["path"], json!(key), "{keys}");
    assert_eq!(d.rpc("bdev_get_bdevs", json!({"name": "m0"}))[0]["name"], "m0");
    assert!(d.terminate(Duration::from_secs(10)).is_some(), "the daemon stops on SIGTERM");
    let log = d.log_text();
    assert!(log.contains("key0"), "the log names the key:\n{log}");
    assert!(!log.contains("S3CR3T"), "the secret appears in the log:\n{log}");

    // The SPDK JSON form loads too (`tidemarkd --json`).
    let j = Daemon::start_with_args(MINIMAL_CONFIG, &["--json", spdk_json.to_str().expect("utf-8 path")]);
    assert_eq!(j.rpc("keyring_get_keys", json!(null))[0]["name"], "key0");
}

#[test]
fn a_saved_key_whose_file_became_readable_stops_the_start_naming_it() {
    let mut d = Daemon::start(MINIMAL_CONFIG);
    let key = key_file(d.dir.path(), "key0", SECRET, 0o600);
    d.rpc("keyring_file_add_key", json!({"name": "key0", "path": key}));
    d.rpc("save_config", json!({"path": d.dir.path().join("tidemark.toml")}));
    assert!(d.terminate(Duration::from_secs(10)).is_some());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = std::process::Command::new(TIDEMARKD)
        .args(["--config", &d.dir.path().join("tidemark.toml").display().to_string(), "--rpc-socket", &d.socket.display().to_string()])
        .args(["--data-dir", &d.data_dir().display().to_string(), "--metrics", ""])
        .output()
        .expect("run tidemarkd");
    let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("keyring[0]") && err.contains(&key.display().to_string()) && err.contains("0640"), "{err}");
    assert!(!err.contains("S3CR3T"), "{err}");
}
