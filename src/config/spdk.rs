//! SPDK's JSON configuration (`{"subsystems": [{"subsystem": "bdev", "config": [{"method": ...,
//! "params": ...}]}]}`, what SPDK's `save_config` writes and `--json` loads), both ways:
//! [`calls_from_spdk`] turns one into tidemark's per-subsystem calls (`tidemarkd --json`), and
//! [`to_spdk`] writes tidemark's running configuration in it (`save_config {format: "spdk"}`).
//!
//! Loading decides per method:
//! - a method tidemark has is called, in file order, with its params (and refused, naming the
//!   field, if it asks for something tidemark lacks);
//! - a method in [`SKIPPED`] tunes a part of SPDK that tidemark does not have or sizes itself
//!   (memory pools, sockets, accel, the NVMe host driver, schedulers): it is skipped with a log
//!   line saying why, as SPDK skips the methods of subsystems it has not linked;
//! - any other method would create something tidemark cannot (an aio or lvol bdev, a vhost
//!   controller, ...): loading fails naming it, rather than start without it.

use super::ConfigCall;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

/// SPDK methods skipped when loading, with the reason logged.
pub const SKIPPED: &[(&str, &str)] = &[
    ("bdev_set_options", "bdev_io pools and caches: tidemark sizes its own"),
    ("bdev_wait_for_examine", "a tidemark bdev is ready when its create call returns"),
    ("bdev_examine", "tidemark has no examine step"),
    ("bdev_nvme_set_options", "options of SPDK's NVMe host driver; tidemark's nvme bdev uses the kernel driver"),
    ("bdev_nvme_set_hotplug", "PCIe hot plug is the kernel's"),
    ("bdev_iscsi_set_options", "tidemark has no iSCSI initiator bdev"),
    ("iobuf_set_options", "I/O buffers: [daemon] buffer_pool_mb sizes tidemark's pool"),
    ("accel_set_options", "no accel framework: CRC32C and copies run on the CPU"),
    ("accel_assign_opc", "no accel framework: CRC32C and copies run on the CPU"),
    ("sock_set_default_impl", "sockets are the kernel's (posix)"),
    ("sock_impl_set_options", "sockets are the kernel's (posix)"),
    ("nvmf_set_max_subsystems", "tidemark has no fixed subsystem table"),
    ("nvmf_set_crdt", "tidemark reports no command retry delay"),
    ("framework_set_scheduler", "reactors follow [reactor] poll_mode"),
    ("scheduler_set_options", "reactors follow [reactor] poll_mode"),
    ("vmd_enable", "no Intel VMD support; PCIe devices come from the kernel"),
    ("enable_vmd", "no Intel VMD support; PCIe devices come from the kernel"),
    ("keyring_set_options", "options of SPDK's keyring modules: tidemark has the file keyring only"),
];

/// The SPDK subsystems whose methods tidemark runs, and the section each goes to.
const SECTIONS: [&str; 4] = ["keyring", "bdev", "nvmf", "iscsi"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpdkConfig {
    subsystems: Vec<SpdkSubsystem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpdkSubsystem {
    subsystem: String,
    /// SPDK writes `null` for a subsystem without configuration.
    #[serde(default)]
    config: Option<Vec<SpdkCall>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpdkCall {
    method: String,
    #[serde(default)]
    params: Value,
}

/// Why `method` is skipped when loading an SPDK configuration, if it is.
pub fn skip_reason(method: &str) -> Option<&'static str> {
    SKIPPED.iter().find(|(m, _)| *m == method).map(|(_, why)| *why)
}

/// The calls of an SPDK JSON configuration, per tidemark section (`bdev`, `nvmf`, `iscsi`),
/// in file order. `has_method` says whether tidemark has a method; skipped methods are logged.
pub fn calls_from_spdk(text: &str, has_method: impl Fn(&str) -> bool) -> Result<[Vec<ConfigCall>; 4], String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let cfg: SpdkConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        format!("key `{path}`: {}", e.into_inner())
    })?;
    let mut out: [Vec<ConfigCall>; 4] = Default::default();
    for (i, s) in cfg.subsystems.iter().enumerate() {
        let section = SECTIONS.iter().position(|n| *n == s.subsystem);
        for (j, c) in s.config.iter().flatten().enumerate() {
            let at = format!("subsystems[{i}] ({}) config[{j}]", s.subsystem);
            if !matches!(c.params, Value::Null | Value::Object(_)) {
                return Err(format!("{at}: params of {} must be an object", c.method));
            }
            if let Some(why) = skip_reason(&c.method) {
                log::info!("SPDK config: skipping {} ({why})", c.method);
                continue;
            }
            if !has_method(&c.method) {
                return Err(format!("{at}: method {} is not supported by tidemark (see rpc_get_methods)", c.method));
            }
            match section {
                Some(k) => out[k].push(ConfigCall::new(&c.method, c.params.clone())),
                None => return Err(format!("{at}: method {} belongs to no subsystem tidemark has (keyring, bdev, nvmf, iscsi)", c.method)),
            }
        }
    }
    Ok(out)
}

/// The running configuration's calls as an SPDK JSON configuration. Parameters that only
/// tidemark knows are dropped where SPDK's decoders would refuse them and the call means the
/// same without them; relative file names become absolute (under `data_dir`), as SPDK has no
/// data directory. Methods only tidemark has (bdev_cow_create, ...) are written as they are:
/// tidemark loads them back, SPDK refuses them.
pub fn to_spdk(sections: &[(&str, &Vec<ConfigCall>)], data_dir: &Path) -> Value {
    let subsystems: Vec<Value> = sections
        .iter()
        .map(|(name, calls)| {
            let config: Vec<Value> = calls.iter().map(|c| json!({ "method": c.method, "params": spdk_params(&c.method, &c.params, data_dir) })).collect();
            json!({ "subsystem": name, "config": config })
        })
        .collect();
    json!({ "subsystems": subsystems })
}

/// One call's params as SPDK's method takes them.
fn spdk_params(method: &str, params: &Value, data_dir: &Path) -> Value {
    let mut p = params.clone();
    let Some(m) = p.as_object_mut() else { return p };
    match method {
        // SPDK opens an existing file; tidemark's size_mb (create it sparse) is not SPDK's.
        "bdev_uring_create" => {
            m.remove("size_mb");
            if let Some(f) = m.get("filename").and_then(Value::as_str) {
                if !Path::new(f).is_absolute() {
                    let abs = data_dir.join(f).display().to_string();
                    m.insert("filename".into(), json!(abs));
                }
            }
        }
        // The region size lives in the mirror's superblock; SPDK has no such parameter.
        "bdev_raid_create" => {
            m.remove("region_size_kb");
        }
        // SPDK fixes these two iSCSI limits; tidemark lets them be set.
        "iscsi_set_options" => {
            m.remove("max_burst_length");
            m.remove("max_recv_data_segment_length");
        }
        _ => {}
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(m: &str) -> bool {
        matches!(m, "bdev_malloc_create" | "nvmf_create_transport" | "iscsi_create_portal_group")
    }

    #[test]
    fn loads_sections_and_skips_tuning_methods() {
        let text = r#"{"subsystems": [
            {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options", "params": {"small_pool_count": 8192}}]},
            {"subsystem": "scsi", "config": null},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
                {"method": "bdev_malloc_create", "params": {"name": "m0", "num_blocks": 2048, "block_size": 512}},
                {"method": "bdev_wait_for_examine"}]},
            {"subsystem": "nvmf", "config": [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}]}
        ]}"#;
        let [_, bdev, nvmf, iscsi] = calls_from_spdk(text, ours).unwrap();
        assert_eq!(bdev.len(), 1);
        assert_eq!(bdev[0].method, "bdev_malloc_create");
        assert_eq!(bdev[0].params["name"], "m0");
        assert_eq!(nvmf.len(), 1);
        assert!(iscsi.is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_build_naming_it() {
        let e = calls_from_spdk(r#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_aio_create", "params": {}}]}]}"#, ours).unwrap_err();
        assert!(e.contains("bdev_aio_create") && e.contains("config[0]"), "{e}");
        let e = calls_from_spdk(r#"{"subsystems": [{"subsystem": "bdev", "confg": []}]}"#, ours).unwrap_err();
        assert!(e.contains("confg"), "{e}");
        let e = calls_from_spdk(r#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": [1]}]}]}"#, ours).unwrap_err();
        assert!(e.contains("must be an object"), "{e}");
    }

    #[test]
    fn writes_spdk_params() {
        let bdev = vec![
            ConfigCall::new("bdev_uring_create", json!({"name": "u", "filename": "u.img", "size_mb": 4, "block_size": 512})),
            ConfigCall::new("bdev_raid_create", json!({"name": "r", "raid_level": "raid1", "base_bdevs": ["a", "b"], "region_size_kb": 1024})),
        ];
        let v = to_spdk(&[("bdev", &bdev)], Path::new("/data"));
        let c = &v["subsystems"][0]["config"];
        assert_eq!(v["subsystems"][0]["subsystem"], "bdev");
        assert_eq!(c[0]["params"], json!({"name": "u", "filename": "/data/u.img", "block_size": 512}));
        assert!(c[1]["params"].get("region_size_kb").is_none());
        // Back through the loader: the same calls.
        let [_, b, _, _] = calls_from_spdk(&v.to_string(), |m| m.starts_with("bdev_")).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].params["filename"], "/data/u.img");
    }
}
