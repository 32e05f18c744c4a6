//! Bdev modules, one folder each (SPDK's `module/bdev/<name>/`): the module's bdev in `mod.rs`
//! and its RPCs in `rpc.rs` beside it, where `register_module!` declares the module (no list
//! here or elsewhere names it; see docs/how-to-add-a-module.md). `rpc.rs` in this folder is
//! the bdev subsystem itself (`bdev_get_bdevs`, save_config's bdev section). The stack, bottom up: raw devices (malloc, null, uring),
//! fault injection (error, delay), then the preserve layers (snapshot, mirror).

pub mod delay;
pub mod error;
pub mod lvol;
pub mod malloc;
pub mod mirror;
pub mod null;
pub mod nvme;
pub mod rpc;
pub mod snapshot;
pub mod uring;

use crate::bdev::Bdev;
use crate::module::Ctx;
use crate::rpc::{parse, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};

/// SPDK's block format parameters of `bdev_malloc_create` and `bdev_null_create` (metadata,
/// protection information, physical block size): tidemark's bdevs have plain blocks, so only
/// SPDK's defaults are accepted. One list for both modules, so they refuse alike.
pub fn block_format_limits(
    block_size: u32,
    physical_block_size: Option<u32>,
    md_size: u32,
    md_interleave: bool,
    dif_type: u32,
    dif_is_head_of_md: bool,
    dif_pi_format: u32,
) -> Vec<(&'static str, bool, &'static str)> {
    const NO_MD: &str = "metadata is not supported (tidemark's bdevs have plain blocks)";
    const NO_PI: &str = "protection information (DIF/DIX) is not supported";
    vec![
        (
            "physical_block_size",
            physical_block_size.is_none_or(|p| p == 0 || p == block_size),
            "must equal block_size: tidemark has no separate physical block size",
        ),
        ("md_size", md_size == 0, NO_MD),
        ("md_interleave", !md_interleave, NO_MD),
        ("dif_type", dif_type == 0, NO_PI),
        ("dif_is_head_of_md", !dif_is_head_of_md, NO_PI),
        ("dif_pi_format", dif_pi_format == 0, NO_PI),
    ]
}

/// Errors of every `bdev_*_delete` method ([`delete_handler`]).
pub const DELETE_ERRORS: &[crate::module::ErrorDoc] = &[
    (crate::rpc::ENODEV, "the bdev does not exist, or another module made it"),
    (crate::rpc::EBUSY, "something holds the bdev: a virtual bdev built on it, an export or a job"),
];

pub use crate::bdev::NEW_NAME_ERRORS;

/// Errors of a method that claims base bdevs it is given by name.
pub const BASE_ERRORS: &[crate::module::ErrorDoc] =
    &[(crate::rpc::ENODEV, "a base bdev does not exist"), (crate::rpc::EBUSY, "something holds a base bdev already: a virtual bdev, an export or a job")];

/// Parameters of every `bdev_*_delete` method.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ByName {
    pub name: String,
}

/// The `bdev_*_delete` handler of module `B`: deletes bdev `name` if module `B` made it and
/// nothing holds it.
pub fn delete_handler<B: Bdev>(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: ByName = parse(p)?;
    let e = t.bdev(&p.name)?;
    if e.bdev().as_any().downcast_ref::<B>().is_none() {
        return Err(RpcError::no_device(format!("bdev {} is a {}, not made by this module", p.name, e.bdev().product_name())));
    }
    drop(e);
    t.delete_bdev(&p.name)?;
    Ok(json!(true))
}

/// First free name of the form `{prefix}{n}` (SPDK names unnamed bdevs Malloc0, Malloc1, ...).
pub fn next_free_name(t: &Ctx, prefix: &str) -> String {
    (0..).map(|i| format!("{prefix}{i}")).find(|n| t.bdevs.get(n).is_none()).expect("an unbounded range has a free name")
}
