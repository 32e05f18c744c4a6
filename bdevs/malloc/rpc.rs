//! `bdev_malloc_create` / `bdev_malloc_delete`, with SPDK's parameters.

use super::MallocBdev;
use crate::module::Ctx;
use crate::rpc::{parse_spdk, RpcError, SpdkParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

crate::register_module! {
    name: "malloc",
    order: 13,
    methods: [
        ("bdev_malloc_create", create, Create, "Creates a bdev in memory.", [crate::bdevs::NEW_NAME_ERRORS]),
        ("bdev_malloc_delete", crate::bdevs::delete_handler::<MallocBdev>, crate::bdevs::ByName, "Deletes a malloc bdev.", [crate::bdevs::DELETE_ERRORS]),
    ],
}

/// SPDK's parameters (v25.09 and the `spdk` Python package).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    #[serde(default)]
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
    #[serde(default)]
    physical_block_size: Option<u32>,
    /// A splitting hint (blocks); RAM has no boundary worth splitting on, so any value is
    /// accepted and I/O is not split.
    #[serde(default)]
    #[allow(dead_code)]
    optimal_io_boundary: u32,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    md_interleave: bool,
    #[serde(default)]
    dif_type: u32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    dif_pi_format: u32,
    /// NUMA node of the memory (-1: any); accepted, the memory comes from the allocator.
    #[serde(default)]
    #[allow(dead_code)]
    numa_id: Option<i32>,
}

impl SpdkParams for Create {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        crate::bdevs::block_format_limits(
            self.block_size,
            self.physical_block_size,
            self.md_size,
            self.md_interleave,
            self.dif_type,
            self.dif_is_head_of_md,
            self.dif_pi_format,
        )
    }
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse_spdk(p)?;
    let name = p.name.unwrap_or_else(|| crate::bdevs::next_free_name(t, "Malloc"));
    t.bdevs.check_new_name(&name)?;
    let bdev = MallocBdev::new(&name, p.num_blocks, p.block_size, p.uuid).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(bdev))?;
    Ok(json!(name))
}
