//! `keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys` (SPDK's names and
//! parameters). Replies carry names and paths, never key material.

use super::keyring;
use crate::rpc::{non_empty, parse, Methods, RpcError};
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

pub fn register(m: &mut Methods) {
    m.add("keyring_file_add_key", add_key);
    m.add("keyring_file_remove_key", remove_key);
    m.add("keyring_get_keys", get_keys);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddKey {
    name: String,
    path: String,
}

fn add_key(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: AddKey = parse(p)?;
    non_empty("path", &p.path)?;
    keyring(t)?.add_file_key(&p.name, Path::new(&p.path))?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveKey {
    name: String,
}

fn remove_key(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let p: RemoveKey = parse(p)?;
    keyring(t)?.remove(&p.name)?;
    Ok(json!(true))
}

/// SPDK's shape: name, removed, probed, refcnt, module and path. A removed key is gone at once
/// here (one with users cannot be removed), and no key is probed (made on first use by a
/// keyring module), so both flags are always false; they are kept for SPDK's clients.
fn get_keys(t: &Target, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let keys: Vec<Value> = keyring(t)?
        .list()
        .iter()
        .map(|k| json!({ "name": k.name(), "removed": false, "probed": false, "refcnt": k.refcnt(), "module": "keyring_file", "path": k.path() }))
        .collect();
    Ok(Value::Array(keys))
}
