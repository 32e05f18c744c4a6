//! `bdev_null_create` / `bdev_null_delete`, with SPDK's parameters.

use super::NullBdev;
use crate::rpc::{parse, Methods, RpcError};
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn register(m: &mut Methods) {
    m.add("bdev_null_create", create);
    m.add("bdev_null_delete", crate::bdevs::delete_handler::<NullBdev>);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    num_blocks: u64,
    block_size: u32,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

fn create(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    t.bdevs.check_new_name(&p.name)?;
    let b = NullBdev::new(&p.name, p.num_blocks, p.block_size, p.uuid).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(json!(p.name))
}
