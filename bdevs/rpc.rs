//! The bdev subsystem: RPCs of the bdev layer itself (`bdev_get_bdevs`, `bdev_get_iostat`;
//! each module's RPCs live beside it), its configuration and metrics. It sits here, above the
//! generic layer (`crate::bdev`), because it is a module like the others: the generic layer
//! knows no module and no [`Ctx`].

use crate::bdev::{BdevEntry, IoType, QosError, QosLimits, LATENCY_BUCKETS_US};
use crate::config::ConfigCall;
use crate::module::{Ctx, Module};
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

crate::register_module! {
    name: "bdev",
    order: 10,
    construct: |_, _| Arc::new(BdevSubsystem),
    methods: [
        ("bdev_get_bdevs", bdev_get_bdevs, GetBdevs, "Describes one bdev or every bdev.", [&[(ENODEV, "the named bdev does not exist")]]),
        ("bdev_get_iostat", bdev_get_iostat, GetIostat, "I/O statistics of one bdev or every bdev.", [&[(ENODEV, "a named bdev does not exist")]]),
        (
            "bdev_set_qos_limit",
            bdev_set_qos_limit,
            SetQosLimit,
            "Sets a bdev's rate limits (I/Os per second, MiB per second; 0 = unlimited), held across all cores; I/O over a limit waits.",
            [&[
                (ENODEV, "the bdev does not exist"),
                (INTERNAL_ERROR, "a limit is refused: rw_ios_per_sec not a multiple of 1000, or a limit too large (SPDK's code)"),
            ]]
        ),
    ],
}

/// `bdev_get_bdevs` (SPDK's parameters).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    #[serde(default)]
    name: Option<String>,
    /// SPDK waits up to this many ms for the bdev to appear; bdevs here appear only by RPC or
    /// configuration, both finished before the next call, so there is nothing to wait for.
    #[serde(default)]
    #[allow(dead_code)]
    timeout: Option<u64>,
}

/// `bdev_get_iostat` (SPDK's parameters: v25.09 sends `name`, the `spdk` package `names`).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: bool,
    #[serde(default)]
    reset_mode: Option<String>,
}

impl SpdkParams for GetIostat {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![
            ("per_channel", !self.per_channel, "per-channel statistics are not kept (counters are per bdev, summed over the cores)"),
            (
                "reset_mode",
                self.reset_mode.as_deref().is_none_or(|m| m == "none"),
                "resetting statistics is not supported (counters only grow; Prometheus takes rates)",
            ),
            ("names", self.name.is_none() || self.names.is_none(), "give either name or names"),
        ]
    }
}

/// `bdev_set_qos_limit` (SPDK's parameters). A limit left out keeps its current value; at least
/// one must be given.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetQosLimit {
    /// The bdev (name or alias).
    name: String,
    /// Read and write I/Os per second, a multiple of 1000; 0 = unlimited.
    #[serde(default)]
    rw_ios_per_sec: Option<u64>,
    /// Read and write MiB per second; 0 = unlimited.
    #[serde(default)]
    rw_mbytes_per_sec: Option<u64>,
    /// Read MiB per second; 0 = unlimited.
    #[serde(default)]
    r_mbytes_per_sec: Option<u64>,
    /// Write MiB per second (writes, unmaps, write zeroes); 0 = unlimited.
    #[serde(default)]
    w_mbytes_per_sec: Option<u64>,
}

fn bdev_set_qos_limit(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: SetQosLimit = parse(p)?;
    if p.rw_ios_per_sec.is_none() && p.rw_mbytes_per_sec.is_none() && p.r_mbytes_per_sec.is_none() && p.w_mbytes_per_sec.is_none() {
        // SPDK's words and code.
        return Err(RpcError::invalid_params("No rate limits specified"));
    }
    let e = t.bdev(&p.name)?;
    let cur = e.qos().limits();
    let new = QosLimits {
        rw_ios_per_sec: p.rw_ios_per_sec.unwrap_or(cur.rw_ios_per_sec),
        rw_mbytes_per_sec: p.rw_mbytes_per_sec.unwrap_or(cur.rw_mbytes_per_sec),
        r_mbytes_per_sec: p.r_mbytes_per_sec.unwrap_or(cur.r_mbytes_per_sec),
        w_mbytes_per_sec: p.w_mbytes_per_sec.unwrap_or(cur.w_mbytes_per_sec),
    };
    e.qos().set(&new).map_err(|err| {
        // SPDK answers a refused limit with -32603 "Failed to configure rate limit: Invalid
        // argument"; the message here also names the field.
        let field = match &err {
            QosError::NotMultiple(_) => "rw_ios_per_sec",
            QosError::TooLarge(f, _) => f,
        };
        RpcError::new(crate::rpc::INTERNAL_ERROR, format!("Failed to configure rate limit: field `{field}`: {err} (Invalid argument)"))
    })?;
    log::info!("bdev {}: QoS limits {:?}", e.name(), new);
    Ok(json!(true))
}

/// The `bdev_set_qos_limit` call that restores a bdev's limits, if it has any.
fn qos_call(e: &BdevEntry) -> Option<ConfigCall> {
    let l = e.qos().limits();
    if l.is_unlimited() {
        return None;
    }
    Some(ConfigCall::new(
        "bdev_set_qos_limit",
        json!({
            "name": e.name(),
            "rw_ios_per_sec": l.rw_ios_per_sec,
            "rw_mbytes_per_sec": l.rw_mbytes_per_sec,
            "r_mbytes_per_sec": l.r_mbytes_per_sec,
            "w_mbytes_per_sec": l.w_mbytes_per_sec,
        }),
    ))
}

fn selected(t: &Ctx, name: Option<String>) -> Result<Vec<Arc<BdevEntry>>, RpcError> {
    match name {
        Some(n) => Ok(vec![t.bdev(&n)?]),
        None => Ok(t.bdevs.list()),
    }
}

/// The `bdev_get_bdevs` description of one bdev, in SPDK's shape (plus `claimed_by`,
/// `holders` and `read_only`).
pub fn describe(e: &BdevEntry) -> Value {
    let b = e.bdev();
    let supported: serde_json::Map<String, Value> = IoType::ALL.iter().map(|t| (t.name().to_string(), json!(b.supports(*t)))).collect();
    let claim = e.claimed_by();
    let mut v = json!({
        "name": b.name(),
        "aliases": [],
        "product_name": b.product_name(),
        "block_size": b.block_size(),
        "num_blocks": b.num_blocks(),
        "uuid": b.uuid().to_string(),
        "assigned_rate_limits": e.qos().limits(),
        "claimed": claim.is_some(),
        "zoned": false,
        "supported_io_types": supported,
        "memory_domains": [],
        "driver_specific": b.driver_specific(),
        "claimed_by": claim,
        "holders": e.holder_list(),
        "read_only": b.read_only(),
    });
    if claim.is_some() {
        // SPDK's name for a claim by a virtual bdev that writes through it.
        v["claim_type"] = json!("exclusive_write");
    }
    v
}

fn bdev_get_bdevs(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetBdevs = parse(p)?;
    // An lvol is named by its UUID and found by `lvs/lvol` too (SPDK's aliases).
    let with_aliases = |e: &Arc<BdevEntry>| {
        let mut v = describe(e);
        v["aliases"] = json!(t.bdevs.aliases_of(e.bdev().name()));
        v
    };
    Ok(Value::Array(selected(t, p.name)?.iter().map(with_aliases).collect()))
}

fn bdev_get_iostat(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetIostat = parse_spdk(p)?;
    let entries = match (p.name, p.names) {
        (_, Some(names)) => names.iter().map(|n| t.bdev(n)).collect::<Result<Vec<_>, _>>()?,
        (name, None) => selected(t, name)?,
    };
    let bdevs: Vec<Value> = entries
        .iter()
        .map(|e| {
            let s = e.stats().snapshot();
            let r = IoType::Read.index();
            let w = IoType::Write.index();
            let u = IoType::Unmap.index();
            let avg = |i: usize| if s.ops[i] + s.errors[i] > 0 { s.latency_ns[i] / (s.ops[i] + s.errors[i]) } else { 0 };
            // SPDK's fields (ticks are nanoseconds: tick_rate is 1e9), then tidemark's.
            json!({
                "name": e.name(),
                "bytes_read": s.bytes[r],
                "num_read_ops": s.ops[r],
                "bytes_written": s.bytes[w],
                "num_write_ops": s.ops[w],
                "bytes_unmapped": s.bytes[u],
                "num_unmap_ops": s.ops[u],
                "bytes_copied": 0,
                "num_copy_ops": 0,
                "read_latency_ticks": s.latency_ns[r],
                "max_read_latency_ticks": bucket_max_ns(&s.read_buckets),
                "min_read_latency_ticks": bucket_min_ns(&s.read_buckets),
                "write_latency_ticks": s.latency_ns[w],
                "max_write_latency_ticks": bucket_max_ns(&s.write_buckets),
                "min_write_latency_ticks": bucket_min_ns(&s.write_buckets),
                "unmap_latency_ticks": s.latency_ns[u],
                "max_unmap_latency_ticks": 0,
                "min_unmap_latency_ticks": 0,
                "copy_latency_ticks": 0,
                "max_copy_latency_ticks": 0,
                "min_copy_latency_ticks": 0,
                "io_error": {},
                "queue_depth_polling_period": 0,
                "queue_depth": s.in_flight,
                "io_time": 0,
                "weighted_io_time": 0,
                "num_write_zeroes_ops": s.ops[IoType::WriteZeroes.index()],
                "num_flush_ops": s.ops[IoType::Flush.index()],
                "read_errors": s.errors[r],
                "write_errors": s.errors[w],
                "avg_read_latency_ns": avg(r),
                "avg_write_latency_ns": avg(w),
                "read_latency_histogram": histogram_json(&s.read_buckets),
                "write_latency_histogram": histogram_json(&s.write_buckets),
            })
        })
        .collect();
    let uptime = t.started.elapsed().as_nanos() as u64;
    Ok(json!({ "tick_rate": 1_000_000_000u64, "ticks": uptime, "uptime_ns": uptime, "bdevs": bdevs }))
}

/// Upper bound (ns) of the highest non-empty latency bucket: the histogram keeps no exact
/// maximum, so SPDK's `max_*_latency_ticks` is the bucket bound (0 without I/O; the last bound
/// when the overflow bucket is used).
fn bucket_max_ns(b: &[u64; LATENCY_BUCKETS_US.len() + 1]) -> u64 {
    match b.iter().rposition(|n| *n > 0) {
        Some(i) => LATENCY_BUCKETS_US[i.min(LATENCY_BUCKETS_US.len() - 1)] * 1000,
        None => 0,
    }
}

/// Lower bound (ns) of the lowest non-empty latency bucket (0 without I/O).
fn bucket_min_ns(b: &[u64; LATENCY_BUCKETS_US.len() + 1]) -> u64 {
    match b.iter().position(|n| *n > 0) {
        Some(0) | None => 0,
        Some(i) => LATENCY_BUCKETS_US[i - 1] * 1000,
    }
}

fn histogram_json(b: &[u64; LATENCY_BUCKETS_US.len() + 1]) -> Value {
    let mut out: Vec<Value> = LATENCY_BUCKETS_US.iter().zip(b.iter()).filter(|(_, n)| **n > 0).map(|(le, n)| json!({"le_us": le, "count": n})).collect();
    if b[LATENCY_BUCKETS_US.len()] > 0 {
        out.push(json!({"le_us": "+Inf", "count": b[LATENCY_BUCKETS_US.len()]}));
    }
    Value::Array(out)
}

/// QoS families: throttled time per bdev and the limits as gauges (bdevs with a limit only,
/// plus throttled time of any bdev that was ever throttled, so the counter never vanishes).
fn qos_metrics(t: &Ctx, out: &mut crate::metrics::MetricsOut<'_>) -> std::fmt::Result {
    use crate::metrics::labels;
    let mut throttled = Vec::new();
    let mut waited = Vec::new();
    let mut limits = Vec::new();
    for e in t.bdevs.list() {
        let q = e.qos();
        let l = q.limits();
        if l.is_unlimited() && q.throttled_ios() == 0 {
            continue;
        }
        throttled.push((labels(&[("bdev", e.name())]), q.throttled_ns() as f64 / 1e9));
        waited.push((labels(&[("bdev", e.name())]), q.throttled_ios()));
        for (name, v) in [
            ("rw_ios_per_sec", l.rw_ios_per_sec),
            ("rw_mbytes_per_sec", l.rw_mbytes_per_sec),
            ("r_mbytes_per_sec", l.r_mbytes_per_sec),
            ("w_mbytes_per_sec", l.w_mbytes_per_sec),
        ] {
            limits.push((labels(&[("bdev", e.name()), ("limit", name)]), v as f64));
        }
    }
    out.counter("tidemark_bdev_qos_throttled_seconds", "Time I/Os of each bdev waited for its QoS limits (summed over the waiting I/Os).", &throttled)?;
    out.counter("tidemark_bdev_qos_throttled_ios", "I/Os of each bdev that waited for its QoS limits.", &waited)?;
    out.gauge("tidemark_bdev_qos_limit", "QoS limit of each bdev (bdev_set_qos_limit; 0 = unlimited).", &limits)
}

/// The bdev subsystem: its configuration is the creation call of every bdev, bases first.
pub struct BdevSubsystem;

impl Module for BdevSubsystem {
    fn name(&self) -> &'static str {
        "bdev"
    }

    fn config(&self, t: &Ctx) -> Vec<ConfigCall> {
        // Module options first: they apply to the bdevs created after them.
        let options = crate::bdevs::mirror::options_call().into_iter().chain(crate::bdevs::nvme::tcp::rpc::module_calls(t)).map(|(m, p)| ConfigCall::new(m, p));
        let order = t.bdevs.in_creation_order();
        let creates = order.iter().filter_map(|e| e.bdev().config_call()).map(|(m, p)| ConfigCall::new(m, p));
        // Limits last: every bdev, whichever module makes it, exists by then.
        let limits = order.iter().filter_map(|e| qos_call(e));
        options.into_iter().chain(creates).chain(limits).collect()
    }

    fn metrics(&self, t: &Ctx, out: &mut crate::metrics::MetricsOut<'_>) -> std::fmt::Result {
        crate::bdevs::uring::space::metrics(t, out)?;
        qos_metrics(t, out)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
