//! `bdev_cow_create` / `bdev_cow_delete`.
//!
//! `bdev_cow_create` formats a blank store or reopens an existing one (the restart path: every
//! snapshot in the store comes back as a read-only bdev). `bdev_cow_delete` closes the volume
//! and its snapshot bdevs; the store keeps everything, so creating the volume again over the
//! same store brings it all back.

use super::{CowVolume, OpenParams};
use crate::bdev::Bdev;
use crate::module::Ctx;
use crate::rpc::{non_empty, parse, RpcError, EBUSY};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

crate::register_module! {
    name: "cow",
    order: 17,
    methods: [
        ("bdev_cow_create", create, Create, "Creates a copy-on-write preservable volume over a base bdev and a store.", [crate::bdevs::NEW_NAME_ERRORS, crate::bdevs::BASE_ERRORS, &[(INVALID_PARAMS, "the store cannot be formatted or opened (too small, another volume's store, unreadable)")]]),
        ("bdev_cow_delete", delete, Delete, "Deletes a CoW volume (and its snapshots).", [&[(ENODEV, "the bdev does not exist or is not a CoW volume"), (EBUSY, "something holds the volume or one of its snapshots")]]),
    ],
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    base_bdev: String,
    store_bdev: String,
    #[serde(default)]
    grain_kb: Option<u32>,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

/// The home core of a new volume: spread volumes over the cores by name.
fn home_core(name: &str, cores: usize) -> usize {
    (crc32c::crc32c(name.as_bytes()) as usize) % cores.max(1)
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    non_empty("name", &p.name)?;
    t.bdevs.check_new_name(&p.name)?;
    if p.base_bdev == p.store_bdev {
        return Err(RpcError::invalid_params("field `store_bdev`: the store must be another bdev than the base"));
    }
    if let Some(kb) = p.grain_kb {
        if !kb.is_power_of_two() || !(4..=1024).contains(&kb) {
            return Err(RpcError::invalid_params(format!("field `grain_kb`: {kb} must be a power of two from 4 to 1024")));
        }
    }
    let base = t.bdev(&p.base_bdev)?.claim(&p.name)?;
    let store = t.bdev(&p.store_bdev)?.claim(&p.name)?;
    let cores = t.reactors.core_count();
    let params = OpenParams { name: p.name.clone(), uuid: p.uuid, base, store, grain_kb: p.grain_kb, cores, lock_region_grains: None };
    let home = home_core(&p.name, cores);
    let (vol, snaps) = t
        .reactors
        .call_async(home, Duration::from_secs(120), move || async move { CowVolume::open(params).await.map_err(|e| e.to_string()) })?
        .map_err(RpcError::invalid_params)?;
    let vol = Arc::new(vol);
    t.bdevs.register(vol.clone())?;
    for s in snaps {
        let n = s.name().to_string();
        if let Err(e) = t.bdevs.register(Arc::new(s)) {
            log::error!("{}: snapshot {n} cannot be exposed as a bdev: {e}", p.name);
        }
    }
    Ok(json!(p.name))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
}

fn delete(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Delete = parse(p)?;
    let e = t.bdev(&p.name)?;
    let vol = e
        .bdev()
        .as_any()
        .downcast_ref::<CowVolume>()
        .ok_or_else(|| RpcError::no_device(format!("bdev {} is a {}, not a CoW volume", p.name, e.bdev().product_name())))?;
    if let Some(h) = e.holder_list().first() {
        return Err(RpcError::new(EBUSY, format!("bdev {} is in use by {}", p.name, h.by)));
    }
    let snaps: Vec<String> = vol.snapshot_infos().into_iter().map(|s| s.name).collect();
    for s in &snaps {
        if let Some(se) = t.bdevs.get(s) {
            if let Some(h) = se.holder_list().first() {
                return Err(RpcError::new(EBUSY, format!("snapshot {s} of {} is in use by {}", p.name, h.by)));
            }
        }
    }
    drop(e);
    for s in &snaps {
        if t.bdevs.get(s).is_some() {
            t.delete_bdev(s)?;
        }
    }
    t.delete_bdev(&p.name)?;
    Ok(json!(true))
}
