//! `bdev_uring_create` / `bdev_uring_delete`, with SPDK's parameters plus `size_mb` (create the
//! file, sparse, if it does not exist). Relative filenames live in the data directory.

use super::UringBdev;
use crate::module::Ctx;
use crate::rpc::{parse, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

crate::register_module! {
    name: "uring",
    order: 16,
    methods: [
        ("bdev_uring_create", create, Create, "Creates a bdev on a file or block device through io_uring.", [crate::bdevs::NEW_NAME_ERRORS, &[(INVALID_PARAMS, "the file cannot be opened or created, or its size or block size does not fit")]]),
        ("bdev_uring_delete", crate::bdevs::delete_handler::<UringBdev>, crate::bdevs::ByName, "Deletes a uring bdev.", [crate::bdevs::DELETE_ERRORS]),
    ],
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    filename: String,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    size_mb: Option<u64>,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    t.bdevs.check_new_name(&p.name)?;
    crate::rpc::non_empty("filename", &p.filename)?;
    // --check-config: the file is only checked to exist; a stand-in of its size is opened.
    let path = if crate::config::check::active() {
        crate::config::check::stand_in_file(&p.filename, p.size_mb).map_err(RpcError::invalid_params)?
    } else {
        t.data_path(&p.filename)
    };
    let b = UringBdev::open(&p.name, &p.filename, &path, p.block_size, p.size_mb, p.uuid).map_err(RpcError::invalid_params)?;
    t.bdevs.register(Arc::new(b))?;
    Ok(json!(p.name))
}
