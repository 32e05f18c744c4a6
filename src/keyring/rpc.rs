//! `keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys` (SPDK's names and
//! parameters). Replies carry names and paths, never key material.

use super::keyring;
use crate::module::Ctx;
use crate::rpc::{non_empty, parse, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

// Before the bdevs (order 10): the calls after the keyring's in `save_config` find their keys,
// and at shutdown keys go last, after every user of a key has stopped.
crate::register_module! {
    name: "keyring",
    order: 5,
    construct: |_, _| std::sync::Arc::new(super::Keyring::default()),
    methods: [
        ("keyring_file_add_key", add_key, AddKey, "Adds a key read from a file (regular, the daemon's user's, no group or other access).", [&[
            (EEXIST, "a key of that name exists"),
            (EPERM, "the path is not absolute, is a symlink, is not a regular file, has group or other access or another owner"),
            (ENOENT, "the file does not exist"),
            (EACCES, "the daemon may not open the file"),
            (EINVAL, "the file is empty or larger than a key may be"),
            (EIO, "the file cannot be read"),
        ]]),
        ("keyring_file_remove_key", remove_key, RemoveKey, "Removes a key nothing uses.", [&[(ENODEV, "no key has that name"), (EBUSY, "a subsystem host uses the key")]]),
        ("keyring_get_keys", get_keys, serde_json::Map<String, Value>, "Lists the keys: names and paths, never key material.", []),
    ],
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddKey {
    name: String,
    path: String,
}

fn add_key(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: AddKey = parse(p)?;
    non_empty("path", &p.path)?;
    keyring(t)?.add_file_key(&p.name, Path::new(&p.path))?;
    Ok(json!(true))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RemoveKey {
    name: String,
}

fn remove_key(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let p: RemoveKey = parse(p)?;
    keyring(t)?.remove(&p.name)?;
    Ok(json!(true))
}

/// SPDK's shape: name, removed, probed, refcnt, module and path. A removed key is gone at once
/// here (one with users cannot be removed), and no key is probed (made on first use by a
/// keyring module), so both flags are always false; they are kept for SPDK's clients.
fn get_keys(t: &Ctx, p: Option<Value>) -> Result<Value, RpcError> {
    let _: serde_json::Map<String, Value> = parse(p)?;
    let keys: Vec<Value> = keyring(t)?
        .list()
        .iter()
        .map(|k| json!({ "name": k.name(), "removed": false, "probed": false, "refcnt": k.refcnt(), "module": "keyring_file", "path": k.path() }))
        .collect();
    Ok(Value::Array(keys))
}
