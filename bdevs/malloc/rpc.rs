//! `bdev_malloc_create` / `bdev_malloc_delete`, with SPDK's parameters.

use super::MallocBdev;
use crate::rpc::{parse, Methods, RpcError};
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn register(m: &mut Methods) {
    m.add("bdev_malloc_create", create);
    m.add("bdev_malloc_delete", crate::bdevs::delete_handler::<MallocBdev>);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    #[serde(default)]
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

fn create(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    let name = p.name.unwrap_or_else(|| crate::bdevs::next_free_name(t, "Malloc"));
    t.bdevs.check_new_name(&name)?;
    let bdev = MallocBdev::new(&name, p.num_blocks, p.block_size, p.uuid).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(bdev))?;
    Ok(json!(name))
}
