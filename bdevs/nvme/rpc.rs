//! `bdev_nvme_attach_controller {name, trtype: "pcie", traddr}` (SPDK's shape: one bdev per
//! namespace, `NAMEn<nsid>`), `bdev_nvme_detach_controller {name}`,
//! `bdev_nvme_passthru_create {name, filename}` and `bdev_nvme_passthru_delete {name}`.

use super::NvmeBdev;
use crate::rpc::{parse, Methods, RpcError};
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn register(m: &mut Methods) {
    m.add("bdev_nvme_attach_controller", attach);
    m.add("bdev_nvme_detach_controller", detach);
    m.add("bdev_nvme_passthru_create", create);
    m.add("bdev_nvme_passthru_delete", crate::bdevs::delete_handler::<NvmeBdev>);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    filename: String,
}

fn create(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    t.bdevs.check_new_name(&p.name)?;
    let path = t.data_path(&p.filename);
    let b = NvmeBdev::open(&p.name, &p.filename, &path, None).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(json!(p.name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    /// Accepted for SPDK compatibility; PCIe needs no address family.
    #[serde(default)]
    #[allow(dead_code)]
    adrfam: Option<String>,
}

fn attach(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Attach = parse(p)?;
    if !p.trtype.eq_ignore_ascii_case("pcie") {
        return Err(RpcError::invalid_params(format!("field `trtype`: {:?} is not supported (only \"pcie\"; NVMe/TCP initiator bdevs are planned)", p.trtype)));
    }
    let namespaces = super::controller_namespaces(&p.traddr).map_err(RpcError::no_device)?;
    let names: Vec<String> = namespaces.iter().map(|(nsid, _)| format!("{}n{nsid}", p.name)).collect();
    for n in &names {
        t.bdevs.check_new_name(n)?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Detach {
    name: String,
}

fn detach(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Detach = parse(p)?;
    let mine: Vec<String> = t
        .bdevs
        .list()
        .iter()
        .filter(|e| e.bdev().as_any().downcast_ref::<NvmeBdev>().is_some_and(|b| b.attached.as_ref().is_some_and(|a| a.0 == p.name)))
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
