//! `bdev_delay_create`, `bdev_delay_update_latency`, `bdev_delay_delete` (SPDK's names;
//! latencies in microseconds).

use super::{DelayBdev, AVG_READ, AVG_WRITE, P99_READ, P99_WRITE};
use crate::module::Ctx;
use crate::rpc::{parse, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

crate::register_module! {
    name: "delay",
    order: 11,
    methods: [
        ("bdev_delay_create", create, Create, "Creates a bdev that delays each I/O to its base bdev.", [crate::bdevs::NEW_NAME_ERRORS, crate::bdevs::BASE_ERRORS]),
        ("bdev_delay_update_latency", update, Update, "Changes one latency of a delay bdev.", [&[(ENODEV, "the bdev does not exist or is not a delay bdev")]]),
        ("bdev_delay_delete", crate::bdevs::delete_handler::<DelayBdev>, crate::bdevs::ByName, "Deletes a delay bdev.", [crate::bdevs::DELETE_ERRORS]),
    ],
}

/// Longest latency accepted (60 s): anything above is a typo, and hosts would time out.
const MAX_LATENCY_US: u64 = 60_000_000;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    base_bdev_name: String,
    avg_read_latency: u64,
    p99_read_latency: u64,
    avg_write_latency: u64,
    p99_write_latency: u64,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

fn check(field: &str, v: u64) -> Result<u64, RpcError> {
    if v > MAX_LATENCY_US {
        return Err(RpcError::invalid_params(format!("field `{field}`: {v} us is over the limit of {MAX_LATENCY_US} us")));
    }
    Ok(v)
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    let lat = [
        check("avg_read_latency", p.avg_read_latency)?,
        check("p99_read_latency", p.p99_read_latency)?,
        check("avg_write_latency", p.avg_write_latency)?,
        check("p99_write_latency", p.p99_write_latency)?,
    ];
    t.bdevs.check_new_name(&p.name)?;
    let base = t.bdev(&p.base_bdev_name)?.claim(&p.name)?;
    t.bdevs.register(Arc::new(DelayBdev::new(p.name.clone(), base, lat, p.uuid)))?;
    Ok(json!(p.name))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Update {
    delay_bdev_name: String,
    latency_type: String,
    latency_us: u64,
}

fn update(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Update = parse(p)?;
    let idx = match p.latency_type.as_str() {
        "avg_read" => AVG_READ,
        "p99_read" => P99_READ,
        "avg_write" => AVG_WRITE,
        "p99_write" => P99_WRITE,
        other => return Err(RpcError::invalid_params(format!("field `latency_type`: {other:?} is not one of avg_read, p99_read, avg_write, p99_write"))),
    };
    let v = check("latency_us", p.latency_us)?;
    let e = t.bdev(&p.delay_bdev_name)?;
    let b = e.bdev().as_any().downcast_ref::<DelayBdev>().ok_or_else(|| RpcError::no_device(format!("bdev {} is not a delay bdev", p.delay_bdev_name)))?;
    b.latencies().0[idx].store(v, Ordering::Relaxed);
    Ok(json!(true))
}
