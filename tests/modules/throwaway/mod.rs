//! `throwaway`: a bdev module that exists only to show that a module is one folder. Its bdev
//! reads zeros and discards writes; the module serves two RPCs, writes its bdevs into
//! `save_config` (through `Bdev::config_call`) and one metric family. Nothing outside this
//! folder names it.

use serde::Deserialize;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::Arc;
use tidemark::bdev::{Bdev, BdevError, BdevProps, Io, IoChannel, IoFuture, IoType};
use tidemark::metrics::MetricsOut;
use tidemark::module::{Ctx, Module};
use tidemark::rpc::{parse, RpcError};

tidemark::register_module! {
    name: "throwaway",
    order: 19,
    construct: |_, _| Arc::new(Throwaway),
    methods: [
        ("bdev_throwaway_create", create, Create, "Creates a throw-away bdev (reads zeros, discards writes).", [tidemark::bdevs::NEW_NAME_ERRORS]),
        ("bdev_throwaway_delete", tidemark::bdevs::delete_handler::<ThrowawayBdev>, tidemark::bdevs::ByName, "Deletes a throw-away bdev.", [tidemark::bdevs::DELETE_ERRORS]),
    ],
}

/// The module's running state: only metrics.
struct Throwaway;

impl Module for Throwaway {
    fn name(&self) -> &'static str {
        "throwaway"
    }

    /// The bdevs come back through the bdev section (their `config_call`).
    fn config(&self, _ctx: &Ctx) -> Vec<tidemark::config::ConfigCall> {
        Vec::new()
    }

    fn metrics(&self, ctx: &Ctx, out: &mut MetricsOut<'_>) -> std::fmt::Result {
        let n = ctx.bdevs.list().iter().filter(|e| e.bdev().as_any().is::<ThrowawayBdev>()).count();
        out.gauge("tidemark_throwaway_bdevs", "Throw-away bdevs.", &[(vec![], n as f64)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub struct ThrowawayBdev {
    props: BdevProps,
}

struct Zeros;

impl IoChannel for Zeros {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        if let Io::Read { bufs, .. } = io {
            bufs.iter_mut().for_each(|b| b.fill(0));
        }
        IoFuture::ready(Ok(()))
    }
}

impl Bdev for ThrowawayBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, _io: IoType) -> bool {
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(Zeros))
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        Some(("bdev_throwaway_create", json!({ "name": self.name(), "num_blocks": self.num_blocks() })))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    num_blocks: u64,
}

fn create(ctx: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    if p.num_blocks == 0 {
        return Err(RpcError::invalid_params("num_blocks must be at least 1"));
    }
    ctx.bdevs.check_new_name(&p.name)?;
    ctx.bdevs.register(Arc::new(ThrowawayBdev { props: BdevProps::new(p.name.clone(), "Throw-away disk", 512, p.num_blocks, uuid::Uuid::new_v4()) }))?;
    Ok(json!(p.name))
}
