//! The composition root: the target one daemon serves. It builds the [`Ctx`] with every module
//! linked into the program (they register themselves, see [`crate::module`]) and is used only
//! by what starts a target: the daemon, the binaries, the fuzz harness and the simulation.
//! Modules never import it; they receive the [`Ctx`].

use crate::config::Config;
use crate::module::Ctx;
use crate::reactor::ReactorHandle;
use crate::rpc::{Dispatch, RpcError};
use serde_json::Value;
use std::ops::Deref;

pub struct Target {
    ctx: Ctx,
}

impl Target {
    pub fn new(reactors: ReactorHandle, config: Config) -> Target {
        Target { ctx: Ctx::new(reactors, config) }
    }

    /// What modules see of the target.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }
}

impl Deref for Target {
    type Target = Ctx;

    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

/// The RPC server calls the target's methods.
impl Dispatch for Target {
    fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        self.ctx.call(method, params)
    }
}
