//! `bdev_null_create` / `bdev_null_delete`, with SPDK's parameters.

use super::NullBdev;
use crate::module::Ctx;
use crate::rpc::{parse_spdk, RpcError, SpdkParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

crate::register_module! {
    name: "null",
    order: 14,
    methods: [
        ("bdev_null_create", create, Create, "Creates a bdev that discards writes and reads zeroes.", [crate::bdevs::NEW_NAME_ERRORS]),
        ("bdev_null_delete", crate::bdevs::delete_handler::<NullBdev>, crate::bdevs::ByName, "Deletes a null bdev.", [crate::bdevs::DELETE_ERRORS]),
    ],
}

/// SPDK's parameters (v25.09 and the `spdk` Python package).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Create {
    name: String,
    num_blocks: u64,
    block_size: u32,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
    #[serde(default)]
    physical_block_size: Option<u32>,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    dif_type: u32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    dif_pi_format: u32,
    // Alignment and granularity hints SPDK reports to its bdev users; a sink has no
    // preference, so they are accepted and not reported.
    #[serde(default)]
    preferred_write_alignment: Option<u32>,
    #[serde(default)]
    preferred_write_granularity: Option<u32>,
    #[serde(default)]
    optimal_write_size: Option<u32>,
    #[serde(default)]
    preferred_unmap_alignment: Option<u32>,
    #[serde(default)]
    preferred_unmap_granularity: Option<u32>,
}

impl SpdkParams for Create {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        crate::bdevs::block_format_limits(
            self.block_size,
            self.physical_block_size,
            self.md_size,
            false,
            self.dif_type,
            self.dif_is_head_of_md,
            self.dif_pi_format,
        )
    }
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse_spdk(p)?;
    t.bdevs.check_new_name(&p.name)?;
    let b = NullBdev::new(&p.name, p.num_blocks, p.block_size, p.uuid).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(json!(p.name))
}
