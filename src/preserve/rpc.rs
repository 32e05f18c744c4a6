//! `bdev_snapshot_create`, `bdev_snapshot_get`, `bdev_snapshot_delete`: generic over every
//! [`Preservable`] bdev.

use super::{all_snapshots, preservable, PreserveRequest, SnapshotState};
use crate::module::Ctx;
use crate::rpc::{non_empty, parse, RpcError, EBUSY, EINVAL, ENODEV};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

crate::register_module! {
    name: "preserve",
    order: 30,
    construct: |_, _| std::sync::Arc::new(super::PreserveSubsystem),
    methods: [
        ("bdev_snapshot_create", create, Create, "Takes a point-in-time image of a preservable bdev without pausing I/O.", [
            crate::bdev::NEW_NAME_ERRORS,
            &[
                (ENODEV, "the bdev does not exist"),
                (EINVAL, "the bdev cannot be preserved (only CoW volumes, mirrors and pool volumes can)"),
                (EBUSY, "the bdev is busy: a snapshot still draining, a split in progress"),
                (ENOSPC, "the store has no room for another snapshot"),
                (EIO, "the snapshot's metadata cannot be written"),
            ],
        ]),
        ("bdev_snapshot_get", get, Get, "Describes snapshots: state, epoch, space used.", [&[(ENODEV, "no snapshot has that name")]]),
        ("bdev_snapshot_delete", delete, Delete, "Deletes a snapshot.", [&[(ENODEV, "no snapshot has that name"), (EBUSY, "it is still draining, an export or a backup holds it, or it is a pool snapshot with clones"), (EIO, "the store cannot be updated")]]),
    ],
}

/// Default and longest wait of `wait_sealed`.
const DEFAULT_WAIT_MS: u64 = 10_000;
const MAX_WAIT_MS: u64 = 300_000;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    bdev_name: String,
    snapshot_name: String,
    /// Return only once sealed (or after `timeout_ms`).
    #[serde(default)]
    wait_sealed: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// "cow" (CoW volumes) or "split" (mirrors); default: the bdev's own method.
    #[serde(default)]
    method: Option<String>,
    /// For `split`: the mirror leg that becomes the image.
    #[serde(default)]
    base_bdev: Option<String>,
    /// Preserve the classic way (stop, drain, switch, resume): for comparison only.
    #[serde(default)]
    freeze: bool,
}

fn snapshot_json(origin: &str, name: &str, t: &Ctx) -> Result<Value, RpcError> {
    let e = t.bdev(origin)?;
    let p = preservable(e.bdev().as_ref()).ok_or_else(|| RpcError::no_device(format!("bdev {origin} is gone")))?;
    let info = p.snapshots().into_iter().find(|s| s.name == name).ok_or_else(|| RpcError::no_device(format!("snapshot {name} is gone")))?;
    serde_json::to_value(info).map_err(RpcError::internal)
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    non_empty("bdev_name", &p.bdev_name)?;
    non_empty("snapshot_name", &p.snapshot_name)?;
    let timeout = p.timeout_ms.unwrap_or(DEFAULT_WAIT_MS);
    if timeout > MAX_WAIT_MS {
        return Err(RpcError::invalid_params(format!("field `timeout_ms`: {timeout} is over the limit of {MAX_WAIT_MS}")));
    }
    let e = t.bdev(&p.bdev_name)?;
    let pres = preservable(e.bdev().as_ref()).ok_or_else(|| {
        RpcError::new(EINVAL, format!("bdev {} ({}) cannot be preserved: only CoW volumes, mirrors and pool volumes can", p.bdev_name, e.bdev().product_name()))
    })?;
    if let Some(m) = &p.method {
        if m != pres.method() {
            return Err(RpcError::invalid_params(format!("field `method`: bdev {} preserves by {:?}, not {m:?}", p.bdev_name, pres.method())));
        }
    }
    if p.base_bdev.is_some() && pres.method() != "split" {
        return Err(RpcError::invalid_params("field `base_bdev`: only the split method takes a base bdev"));
    }
    // A pool volume's snapshot is named `lvs/name` (`snapshot_name` may omit the `lvs/`).
    let image = pres.image_name(t, &p.snapshot_name)?;
    let req = PreserveRequest { snapshot_name: image.clone(), freeze: p.freeze, base_bdev: p.base_bdev };
    let signal = pres.preserve(t, &req)?;
    drop(e);
    let mut out = snapshot_json(&p.bdev_name, &image, t)?;
    if p.wait_sealed {
        let st = signal.wait_sealed(Duration::from_millis(timeout));
        out = snapshot_json(&p.bdev_name, &image, t)?;
        out["wait_timed_out"] = json!(st == SnapshotState::Draining);
    }
    Ok(out)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Get {
    #[serde(default)]
    name: Option<String>,
}

fn get(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Get = parse(p)?;
    let all = all_snapshots(t);
    let list: Vec<Value> = all
        .into_iter()
        .filter(|(_, s)| p.name.as_ref().is_none_or(|n| *n == s.name))
        .map(|(_, s)| serde_json::to_value(s).map_err(RpcError::internal))
        .collect::<Result<_, _>>()?;
    if let Some(n) = &p.name {
        if list.is_empty() {
            return Err(RpcError::new(ENODEV, format!("snapshot {n} does not exist")));
        }
    }
    Ok(Value::Array(list))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
}

fn delete(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Delete = parse(p)?;
    let (origin, info) =
        all_snapshots(t).into_iter().find(|(_, s)| s.name == p.name).ok_or_else(|| RpcError::new(ENODEV, format!("snapshot {} does not exist", p.name)))?;
    if info.state == SnapshotState::Draining {
        return Err(RpcError::new(EBUSY, format!("snapshot {} is still draining; delete it once sealed", p.name)));
    }
    let o = t.bdev(&origin)?;
    let pres = preservable(o.bdev().as_ref()).ok_or_else(|| RpcError::no_device(format!("bdev {origin} is gone")))?;
    // The volume's own refusal (a pool snapshot with clones) comes before anything changes.
    pres.check_delete(&p.name)?;
    // Unregistering fails (and changes nothing) while an export or a backup holds the bdev.
    // By the bdev's own name: `p.name` may be an alias (`lvs/name` of a pool snapshot).
    if let Some(e) = t.bdevs.get(&p.name) {
        if let Some(h) = e.holder_list().first() {
            return Err(RpcError::new(EBUSY, format!("snapshot {} is in use by {} ({:?}); remove that first", p.name, h.by, h.kind)));
        }
        let own = e.name().to_string();
        drop(e);
        t.delete_bdev(&own)?;
    }
    pres.delete_snapshot(t, &p.name)?;
    Ok(json!(true))
}
