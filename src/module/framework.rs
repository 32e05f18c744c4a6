//! Framework RPCs: method list, version, configuration, reactors, shutdown.

use super::Ctx;
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams, EIO, ENODEV};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;

crate::register_module! {
    name: "framework",
    order: 0,
    methods: [
        ("rpc_get_methods", rpc_get_methods, GetMethods, "Lists every RPC method the target serves.", []),
        ("spdk_get_version", spdk_get_version, serde_json::Map<String, Value>, "The target's version and git commit.", []),
        ("framework_get_config", framework_get_config, GetConfig, "One subsystem's running configuration as RPC calls.", [&[(ENODEV, "no subsystem has that name")]]),
        ("framework_get_subsystems", framework_get_subsystems, serde_json::Map<String, Value>, "Lists the subsystems.", []),
        ("framework_get_reactors", framework_get_reactors, serde_json::Map<String, Value>, "Each reactor's core and busy, idle and sleep time.", []),
        ("framework_wait_init", |_, _| Ok(json!(true)), serde_json::Map<String, Value>, "Returns once the target is initialized (it always is).", []),
        ("save_config", save_config, SaveConfig, "The running configuration, optionally written to a file.", [&[(EIO, "the file at `path` cannot be written")]]),
        ("spdk_kill_instance", spdk_kill_instance, Kill, "Shuts the daemon down.", []),
    ],
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    /// SPDK: list only methods usable in the current state; every method is always usable here.
    #[serde(default)]
    #[allow(dead_code)]
    current: bool,
    #[serde(default)]
    #[allow(dead_code)]
    include_aliases: bool,
    /// tidemark: objects with each method's module, summary and params' JSON Schema instead of
    /// names (what docs/rpc.md is made from).
    #[serde(default)]
    detailed: bool,
}

fn rpc_get_methods(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetMethods = parse(p)?;
    if p.detailed {
        return Ok(Value::Array(t.methods().map(super::reference::detailed).collect()));
    }
    Ok(json!(t.methods().map(|m| m.name).collect::<Vec<_>>()))
}

fn spdk_get_version(_: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.').map(|x| x.parse::<u64>().unwrap_or(0));
    Ok(json!({
        "version": format!("tidemark v{v} git {}", env!("TIDEMARK_GIT_COMMIT")),
        "fields": { "major": parts.next(), "minor": parts.next(), "patch": parts.next(), "suffix": "", "commit": env!("TIDEMARK_GIT_COMMIT") }
    }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    /// SPDK: group calls into JSON-RPC batches.
    #[serde(default)]
    with_batches: bool,
}

impl SpdkParams for GetConfig {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![("with_batches", !self.with_batches, "batched configuration is not supported")]
    }
}

fn framework_get_config(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: GetConfig = parse_spdk(p)?;
    let s = t.modules().iter().find(|s| s.name() == p.name).ok_or_else(|| RpcError::new(ENODEV, format!("no subsystem named {}", p.name)))?;
    Ok(serde_json::to_value(s.config(t)).map_err(RpcError::internal)?)
}

fn framework_get_subsystems(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    Ok(Value::Array(t.modules().iter().map(|s| json!({ "subsystem": s.name(), "depends_on": [] })).collect()))
}

fn framework_get_reactors(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let reactors: Vec<Value> = (0..t.reactors.core_count())
        .map(|c| {
            let mb = t.reactors.mailbox(c);
            let k = &mb.counters;
            json!({
                "lcore": mb.cpu(),
                "core_index": c,
                "busy": k.busy_ns.load(Relaxed),
                "idle": k.idle_ns.load(Relaxed),
                "sleep": k.sleep_ns.load(Relaxed),
                "loops": k.loops.load(Relaxed),
                "wakeups": k.wakeups.load(Relaxed),
                "in_interrupt": t.config.reactor.poll_mode == crate::reactor::PollMode::Adaptive,
            })
        })
        .collect();
    Ok(json!({ "tick_rate": 1_000_000_000u64, "poll_mode": t.config.reactor.poll_mode, "reactors": reactors }))
}

/// The running configuration: the daemon's settings as started, and every module's
/// current state as RPC calls.
pub fn running_config(t: &Ctx) -> crate::config::Config {
    let mut c = t.config.clone();
    for s in t.modules() {
        if let Some(sec) = c.section_mut(s.name()) {
            *sec = s.config(t);
        }
    }
    c
}

/// What `save_config` writes to `path`.
#[derive(Deserialize, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
enum SaveFormat {
    /// tidemark's TOML (settings and calls; `tidemarkd --config`).
    #[default]
    Toml,
    /// SPDK's JSON configuration (calls only; `tidemarkd --json`, SPDK's `--json`).
    Spdk,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SaveConfig {
    /// Also write the configuration to this file.
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    format: SaveFormat,
}

/// The running configuration: the result is always in SPDK's shape (`{"subsystems": [...]}`);
/// with `format: "spdk"` its params are SPDK's too (see [`crate::config::spdk::to_spdk`]).
fn save_config(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: SaveConfig = parse(p)?;
    let c = running_config(t);
    let spdk = c.to_spdk_json();
    if let Some(path) = &p.path {
        let text = match p.format {
            SaveFormat::Toml => c.to_toml().map_err(RpcError::internal)?,
            SaveFormat::Spdk => serde_json::to_string_pretty(&spdk).map_err(RpcError::internal)? + "\n",
        };
        std::fs::write(path, text).map_err(|e| RpcError::new(EIO, format!("cannot write {path}: {e}")))?;
    }
    if p.format == SaveFormat::Spdk {
        return Ok(spdk);
    }
    let subsystems: Vec<Value> = t.modules().iter().map(|s| json!({ "subsystem": s.name(), "config": s.config(t) })).collect();
    Ok(json!({ "subsystems": subsystems }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Kill {
    #[serde(default)]
    sig_name: Option<String>,
}

fn spdk_kill_instance(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Kill = parse(p)?;
    match p.sig_name.as_deref() {
        None | Some("SIGTERM") | Some("SIGINT") | Some("SIGKILL") => {}
        Some(other) => return Err(RpcError::invalid_params(format!("field `sig_name`: unsupported signal {other}"))),
    }
    t.request_shutdown();
    Ok(json!(true))
}
