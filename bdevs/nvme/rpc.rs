//! `bdev_nvme_attach_controller {name, trtype: "pcie", traddr}` (SPDK's shape: one bdev per
//! namespace, `NAMEn<nsid>`), `bdev_nvme_detach_controller {name}`,
//! `bdev_nvme_passthru_create {name, filename}` and `bdev_nvme_passthru_delete {name}`.

use super::NvmeBdev;
use crate::module::Ctx;
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

crate::register_module! {
    name: "nvme",
    order: 15,
    methods: [
        ("bdev_nvme_attach_controller", attach, Attach, "Connects to an NVMe/TCP controller and makes bdevs of its namespaces.", [&[
                (EEXIST, "a controller or a namespace bdev of that name exists"),
                (ENODEV, "no NVMe controller at traddr (PCIe), or the subsystem has no active namespace (TCP)"),
                (EIO, "the TCP connection or a command to the controller fails"),
                (INVALID_PARAMS, "a namespace's device cannot be opened (PCIe), or the address does not resolve (TCP)"),
            ]]),
        ("bdev_nvme_detach_controller", detach, Detach, "Disconnects an NVMe controller and deletes its bdevs.", [&[(ENODEV, "no controller has that name (and path)"), (EBUSY, "something holds one of its namespace bdevs")]]),
        ("bdev_nvme_passthru_create", create, Create, "Creates a pass-through bdev over a local NVMe device.", [crate::bdevs::NEW_NAME_ERRORS, &[(INVALID_PARAMS, "the file cannot be opened or is not an NVMe device")]]),
        ("bdev_nvme_passthru_delete", crate::bdevs::delete_handler::<NvmeBdev>, crate::bdevs::ByName, "Deletes an NVMe pass-through bdev.", [crate::bdevs::DELETE_ERRORS]),
    ],
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    filename: String,
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    t.bdevs.check_new_name(&p.name)?;
    let path = t.data_path(&p.filename);
    if crate::config::check::active() {
        return stand_in_device(t, &p.name, &path).map(|()| json!(p.name));
    }
    let b = NvmeBdev::open(&p.name, &p.filename, &path, None).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(json!(p.name))
}

/// SPDK's parameters. Only PCIe controllers are attached here, so the fabrics parameters
/// (address family, service id, host address, subsystem NQN, timeouts) have nothing to apply
/// to and are accepted; those that ask for something tidemark lacks are refused.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    #[serde(default)]
    adrfam: Option<String>,
    #[serde(default)]
    trsvcid: Option<String>,
    #[serde(default)]
    subnqn: Option<String>,
    #[serde(default)]
    hostnqn: Option<String>,
    #[serde(default)]
    hostaddr: Option<String>,
    #[serde(default)]
    hostsvcid: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    prchk_reftag: bool,
    #[serde(default)]
    prchk_guard: bool,
    #[serde(default)]
    hdgst: bool,
    #[serde(default)]
    ddgst: bool,
    #[serde(default)]
    allow_unrecognized_csi: bool,
    #[serde(default)]
    disable_sq_flow_control: bool,
    #[serde(default)]
    fabrics_connect_timeout_us: Option<u64>,
    #[serde(default)]
    multipath: Option<String>,
    #[serde(default)]
    multipath_opts: Option<Value>,
    #[serde(default)]
    num_io_queues: Option<u32>,
    #[serde(default)]
    ctrlr_loss_timeout_sec: Option<i64>,
    #[serde(default)]
    reconnect_delay_sec: Option<u32>,
    #[serde(default)]
    fast_io_fail_timeout_sec: Option<u32>,
    #[serde(default)]
    max_bdevs: Option<u32>,
    #[serde(default)]
    psk: Option<String>,
    #[serde(default)]
    dhchap_key: Option<String>,
    #[serde(default)]
    dhchap_ctrlr_key: Option<String>,
}

impl SpdkParams for Attach {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        const PI: &str = "protection information is not supported";
        const FABRICS: &str = "only PCIe controllers are attached (no NVMe-oF host bdevs)";
        vec![
            ("prchk_reftag", !self.prchk_reftag, PI),
            ("prchk_guard", !self.prchk_guard, PI),
            ("hdgst", !self.hdgst, FABRICS),
            ("ddgst", !self.ddgst, FABRICS),
            ("psk", self.psk.is_none(), FABRICS),
            ("dhchap_key", self.dhchap_key.is_none() && self.dhchap_ctrlr_key.is_none(), FABRICS),
            ("multipath", self.multipath.as_deref().is_none_or(|m| m == "disable"), "multipath is not supported"),
        ]
    }
}

fn attach(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    if super::tcp::rpc::is_tcp(&p) {
        return super::tcp::rpc::attach(t, p);
    }
    let p: Attach = parse_spdk(p)?;
    if !p.trtype.eq_ignore_ascii_case("pcie") {
        return Err(RpcError::invalid_params(format!("field `trtype`: {:?} is not supported (\"pcie\" or \"tcp\")", p.trtype)));
    }
    let namespaces = super::controller_namespaces(&p.traddr).map_err(RpcError::no_device)?;
    let names: Vec<String> = namespaces.iter().map(|(nsid, _)| format!("{}n{nsid}", p.name)).collect();
    for n in &names {
        t.bdevs.check_new_name(n)?;
    }
    if crate::config::check::active() {
        namespaces.iter().zip(&names).try_for_each(|((_, path), name)| stand_in_device(t, name, path))?;
        return Ok(json!(names));
    }
    let mut made = Vec::new();
    for ((_, path), name) in namespaces.iter().zip(&names) {
        let b = NvmeBdev::open(name, &path.display().to_string(), path, Some((p.name.clone(), p.traddr.clone())));
        match b.map_err(RpcError::invalid_params).and_then(|b| t.bdevs.register(Arc::new(b)).map_err(RpcError::from)) {
            Ok(_) => made.push(name.clone()),
            Err(e) => {
                // All or nothing: undo the namespaces already attached.
                for m in &made {
                    let _ = t.delete_bdev(m);
                }
                return Err(e);
            }
        }
    }
    Ok(json!(made))
}

/// SPDK's parameters: the path fields select one path of a multipath controller; a PCIe
/// controller has one path, so only `traddr` is checked (it must be the controller's).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Detach {
    name: String,
    #[serde(default)]
    trtype: Option<String>,
    #[serde(default)]
    traddr: Option<String>,
    #[serde(default)]
    adrfam: Option<String>,
    #[serde(default)]
    trsvcid: Option<String>,
    #[serde(default)]
    subnqn: Option<String>,
    #[serde(default)]
    hostaddr: Option<String>,
    #[serde(default)]
    hostsvcid: Option<String>,
}

fn detach(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    if super::tcp::rpc::owns(t, &p) {
        return super::tcp::rpc::detach(t, p);
    }
    let p: Detach = parse(p)?;
    if let Some(tt) = &p.trtype {
        if !tt.eq_ignore_ascii_case("pcie") {
            return Err(RpcError::invalid_params(format!("field `trtype`: {tt:?}: only PCIe controllers are attached")));
        }
    }
    let mine: Vec<String> = t
        .bdevs
        .list()
        .iter()
        .filter(|e| {
            e.bdev()
                .as_any()
                .downcast_ref::<NvmeBdev>()
                .is_some_and(|b| b.attached.as_ref().is_some_and(|a| a.0 == p.name && p.traddr.as_ref().is_none_or(|t| *t == a.1)))
        })
        .map(|e| e.name().to_string())
        .collect();
    if mine.is_empty() {
        return Err(RpcError::no_device(format!("no NVMe controller named {}", p.name)));
    }
    for n in &mine {
        if let Some(e) = t.bdevs.get(n) {
            if let Some(h) = e.holder_list().first() {
                return Err(RpcError::busy(format!("bdev {n} is in use by {}", h.by)));
            }
        }
    }
    for n in &mine {
        t.delete_bdev(n)?;
    }
    Ok(json!(true))
}

/// `--check-config`: an NVMe namespace (`bdev_nvme_passthru_create`, `bdev_nvme_attach_controller`) in the
/// scratch target: `path` must exist; a null bdev named `name` stands in for it, with the
/// device's size when sysfs has it.
fn stand_in_device(t: &Ctx, name: &str, path: &std::path::Path) -> Result<(), RpcError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| RpcError::invalid_params(format!("field `filename`: cannot open {}: {e}", path.display())))?;
    let bytes = if meta.file_type().is_block_device() {
        crate::config::check::block_device_bytes(&meta).unwrap_or(crate::config::check::UNKNOWN_DEVICE_BYTES)
    } else {
        crate::config::check::UNKNOWN_DEVICE_BYTES
    };
    if !(meta.file_type().is_block_device() || meta.file_type().is_char_device()) {
        return Err(RpcError::invalid_params(format!("field `filename`: {} is not an NVMe device", path.display())));
    }
    t.bdevs.check_new_name(name)?;
    let b = crate::bdevs::null::NullBdev::new(name, bytes / 512, 512, None).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(())
}
