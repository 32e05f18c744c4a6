//! `bdev_error_create`, `bdev_error_inject_error`, `bdev_error_delete` (SPDK's names).

use super::{ErrorBdev, ErrorType};
use crate::bdev::IoType;
use crate::module::Ctx;
use crate::rpc::{parse, parse_spdk, RpcError, SpdkParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

crate::register_module! {
    name: "error",
    order: 12,
    methods: [
        ("bdev_error_create", create, Create, "Creates an error-injection bdev over a base bdev.", [crate::bdevs::NEW_NAME_ERRORS, crate::bdevs::BASE_ERRORS]),
        ("bdev_error_inject_error", inject, Inject, "Makes an error bdev fail the next I/Os of a type.", [&[(ENODEV, "the bdev does not exist or is not an error bdev")]]),
        ("bdev_error_delete", crate::bdevs::delete_handler::<ErrorBdev>, crate::bdevs::ByName, "Deletes an error bdev.", [crate::bdevs::DELETE_ERRORS]),
    ],
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    base_name: String,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

fn create(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    let name = format!("EE_{}", p.base_name);
    t.bdevs.check_new_name(&name)?;
    let base = t.bdev(&p.base_name)?.claim(&name)?;
    t.bdevs.register(Arc::new(ErrorBdev::new(name.clone(), base, p.uuid)))?;
    Ok(json!(name))
}

#[derive(Deserialize, Clone, Copy, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
enum InjectType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    All,
    Clear,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Inject {
    name: String,
    io_type: InjectType,
    #[serde(default = "failure")]
    error_type: ErrorType,
    /// How many I/Os to fail; 0 = every one until cleared.
    #[serde(default = "one")]
    num: u64,
    /// SPDK: inject only once this many I/Os are outstanding.
    #[serde(default)]
    queue_depth: u64,
    /// SPDK's `corrupt_data` details: which byte, and the value XORed into it.
    #[serde(default)]
    corrupt_offset: u64,
    #[serde(default)]
    corrupt_value: u32,
    /// SPDK's `nvme` error type: the status to complete with.
    #[serde(default)]
    nvme_sct: Option<u32>,
    #[serde(default)]
    nvme_sc: Option<u32>,
}

impl SpdkParams for Inject {
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![
            ("queue_depth", self.queue_depth == 0, "injecting at a queue depth is not supported (errors apply to the next I/Os)"),
            ("corrupt_offset", self.corrupt_offset == 0, "tidemark's corrupt_data flips bits of its own choosing"),
            ("corrupt_value", self.corrupt_value == 0, "tidemark's corrupt_data flips bits of its own choosing"),
            (
                "nvme_sct",
                self.nvme_sct.is_none() && self.nvme_sc.is_none(),
                "NVMe status injection is not supported (error_type failure, nomem, pending or corrupt_data)",
            ),
        ]
    }
}

fn failure() -> ErrorType {
    ErrorType::Failure
}
fn one() -> u64 {
    1
}

fn inject(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Inject = parse_spdk(p)?;
    let e = t.bdev(&p.name)?;
    let b = e.bdev().as_any().downcast_ref::<ErrorBdev>().ok_or_else(|| RpcError::no_device(format!("bdev {} is not an error bdev", p.name)))?;
    let types: &[IoType] = match p.io_type {
        InjectType::Clear => {
            b.injections().clear();
            return Ok(json!(true));
        }
        InjectType::All => &IoType::ALL,
        InjectType::Read => &[IoType::Read],
        InjectType::Write => &[IoType::Write],
        InjectType::Flush => &[IoType::Flush],
        InjectType::Unmap => &[IoType::Unmap],
        InjectType::WriteZeroes => &[IoType::WriteZeroes],
    };
    for &ty in types {
        b.injections().set(ty, p.error_type, p.num);
    }
    Ok(json!(true))
}
