//! The control plane: JSON-RPC 2.0 over a Unix socket, with SPDK's method and parameter names.
//! Handlers run on the RPC threads; whatever touches data-path state goes to the reactors as
//! messages ([`crate::reactor::ReactorHandle`]). The methods themselves are declared by the
//! modules ([`crate::module`]); this layer is the protocol: errors, params and the server.

mod error;
mod params;
mod server;

pub use error::*;
pub use params::{non_empty, parse, parse_spdk, SpdkParams};
pub use server::{bind_socket, RpcServer};

use serde_json::Value;

/// What the server calls requests on (the target): keeps this layer below the modules whose
/// methods it serves.
pub trait Dispatch: Send + Sync + 'static {
    /// Calls `method` with `params`.
    fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError>;
}
