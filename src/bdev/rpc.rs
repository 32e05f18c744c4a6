//! RPCs of the bdev layer itself (module RPCs live beside each module in `bdevs/`).

use super::{BdevEntry, IoType, LATENCY_BUCKETS_US};
use crate::config::ConfigCall;
use crate::rpc::{parse, Methods, RpcError};
use crate::target::{Subsystem, Target};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn register(m: &mut Methods) {
    m.add("bdev_get_bdevs", bdev_get_bdevs);
    m.add("bdev_get_iostat", bdev_get_iostat);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameFilter {
    #[serde(default)]
    name: Option<String>,
    /// Accepted for SPDK compatibility: we never wait for bdevs to appear.
    #[serde(default)]
    #[allow(dead_code)]
    timeout: Option<u64>,
}

fn selected(t: &Target, name: Option<String>) -> Result<Vec<Arc<BdevEntry>>, RpcError> {
    match name {
        Some(n) => Ok(vec![t.bdev(&n)?]),
        None => Ok(t.bdevs.list()),
    }
}

/// The `bdev_get_bdevs` description of one bdev, in SPDK's shape.
pub fn describe(e: &BdevEntry) -> Value {
    let b = e.bdev();
    let supported: serde_json::Map<String, Value> = IoType::ALL.iter().map(|t| (t.name().to_string(), json!(b.supports(*t)))).collect();
    let claim = e.claimed_by();
    json!({
        "name": b.name(),
        "aliases": [],
        "product_name": b.product_name(),
        "block_size": b.block_size(),
        "num_blocks": b.num_blocks(),
        "uuid": b.uuid().to_string(),
        "claimed": claim.is_some(),
        "claimed_by": claim,
        "holders": e.holder_list(),
        "read_only": b.read_only(),
        "supported_io_types": supported,
        "driver_specific": b.driver_specific(),
    })
}

fn bdev_get_bdevs(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: NameFilter = parse(p)?;
    Ok(Value::Array(selected(t, p.name)?.iter().map(|e| describe(e)).collect()))
}

fn bdev_get_iostat(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: NameFilter = parse(p)?;
    let bdevs: Vec<Value> = selected(t, p.name)?
        .iter()
        .map(|e| {
            let s = e.stats().snapshot();
            let r = IoType::Read.index();
            let w = IoType::Write.index();
            let avg = |i: usize| if s.ops[i] + s.errors[i] > 0 { s.latency_ns[i] / (s.ops[i] + s.errors[i]) } else { 0 };
            json!({
                "name": e.name(),
                "bytes_read": s.bytes[r],
                "num_read_ops": s.ops[r],
                "bytes_written": s.bytes[w],
                "num_write_ops": s.ops[w],
                "bytes_unmapped": s.bytes[IoType::Unmap.index()],
                "num_unmap_ops": s.ops[IoType::Unmap.index()],
                "num_write_zeroes_ops": s.ops[IoType::WriteZeroes.index()],
                "num_flush_ops": s.ops[IoType::Flush.index()],
                "read_errors": s.errors[r],
                "write_errors": s.errors[w],
                "avg_read_latency_ns": avg(r),
                "avg_write_latency_ns": avg(w),
                "queue_depth": s.in_flight,
                "read_latency_histogram": histogram_json(&s.read_buckets),
                "write_latency_histogram": histogram_json(&s.write_buckets),
            })
        })
        .collect();
    Ok(json!({ "tick_rate": 1_000_000_000u64, "uptime_ns": t.started.elapsed().as_nanos() as u64, "bdevs": bdevs }))
}

fn histogram_json(b: &[u64; LATENCY_BUCKETS_US.len() + 1]) -> Value {
    let mut out: Vec<Value> = LATENCY_BUCKETS_US.iter().zip(b.iter()).filter(|(_, n)| **n > 0).map(|(le, n)| json!({"le_us": le, "count": n})).collect();
    if b[LATENCY_BUCKETS_US.len()] > 0 {
        out.push(json!({"le_us": "+Inf", "count": b[LATENCY_BUCKETS_US.len()]}));
    }
    Value::Array(out)
}

/// The bdev subsystem: its configuration is the creation call of every bdev, bases first.
pub struct BdevSubsystem;

impl Subsystem for BdevSubsystem {
    fn name(&self) -> &'static str {
        "bdev"
    }

    fn config(&self, t: &Target) -> Vec<ConfigCall> {
        // Module options first: they apply to the bdevs created after them.
        let options = crate::bdevs::mirror::options_call().map(|(m, p)| ConfigCall::new(m, p));
        options.into_iter().chain(t.bdevs.in_creation_order().iter().filter_map(|e| e.bdev().config_call()).map(|(m, p)| ConfigCall::new(m, p))).collect()
    }

    fn metrics(&self, t: &Target, out: &mut crate::metrics::MetricsOut<'_>) -> std::fmt::Result {
        crate::bdevs::uring::space::metrics(t, out)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
