//! The control plane: JSON-RPC 2.0 over a Unix socket, with SPDK's method and parameter names.
//! Handlers run on the RPC threads; whatever touches data-path state goes to the reactors as
//! messages ([`crate::reactor::ReactorHandle`]).

mod error;
mod framework;
mod params;
mod server;

pub use error::*;
pub use params::{non_empty, parse, parse_spdk, SpdkParams};
pub use server::{bind_socket, RpcServer};

use crate::target::Target;
use serde_json::Value;
use std::collections::BTreeMap;

pub type Handler = fn(&Target, Option<Value>) -> Result<Value, RpcError>;

/// The method table.
#[derive(Default)]
pub struct Methods {
    map: BTreeMap<&'static str, Handler>,
}

impl Methods {
    pub fn add(&mut self, name: &'static str, h: Handler) {
        let fresh = self.map.insert(name, h).is_none();
        assert!(fresh, "RPC method {name} registered twice");
    }

    pub fn get(&self, name: &str) -> Option<Handler> {
        self.map.get(name).copied()
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.map.keys().copied()
    }

    /// Every method of the target: one line per module.
    pub fn all() -> Methods {
        let mut m = Methods::default();
        framework::register(&mut m);
        crate::bdev::rpc::register(&mut m);
        crate::bdevs::register(&mut m);
        crate::preserve::rpc::register(&mut m);
        crate::nvmf::rpc::register(&mut m);
        crate::iscsi::rpc::register(&mut m);
        crate::backup::rpc::register(&mut m);
        crate::keyring::rpc::register(&mut m);
        crate::daemon::register_test_hooks(&mut m);
        m
    }
}

/// Calls `method` with `params` on `target`.
pub fn call(target: &Target, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let h = target.methods.get(method).ok_or_else(|| RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {method}")))?;
    h(target, params)
}
