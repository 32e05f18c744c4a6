//! `bdev_error_create`, `bdev_error_inject_error`, `bdev_error_delete` (SPDK's names).

use super::{ErrorBdev, ErrorType};
use crate::bdev::IoType;
use crate::rpc::{parse, Methods, RpcError};
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn register(m: &mut Methods) {
    m.add("bdev_error_create", create);
    m.add("bdev_error_inject_error", inject);
    m.add("bdev_error_delete", crate::bdevs::delete_handler::<ErrorBdev>);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    base_name: String,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

fn create(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Create = parse(p)?;
    let name = format!("EE_{}", p.base_name);
    t.bdevs.check_new_name(&name)?;
    let base = t.bdev(&p.base_name)?.claim(&name)?;
    t.bdevs.register(Arc::new(ErrorBdev::new(name.clone(), base, p.uuid)))?;
    Ok(json!(name))
}

#[derive(Deserialize, Clone, Copy)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Inject {
    name: String,
    io_type: InjectType,
    #[serde(default = "failure")]
    error_type: ErrorType,
    /// How many I/Os to fail; 0 = every one until cleared.
    #[serde(default = "one")]
    num: u64,
}

fn failure() -> ErrorType {
    ErrorType::Failure
}
fn one() -> u64 {
    1
}

fn inject(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: Inject = parse(p)?;
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
