//! [`BdevCtx`]: the reactors and the bdev registry, what a bdev needs of the target to make or
//! delete bdevs (a preserve registers its image as a bdev).

use super::{BdevEntry, BdevRegistry, Channel};
use crate::reactor::ReactorHandle;
use crate::rpc::RpcError;
use std::sync::Arc;

pub struct BdevCtx {
    pub reactors: ReactorHandle,
    /// Shared so that a module's background work (an initiator making the bdev of a namespace
    /// that appeared on its controller) can keep a weak link to it.
    pub bdevs: Arc<BdevRegistry>,
}

impl BdevCtx {
    pub fn new(reactors: ReactorHandle) -> BdevCtx {
        BdevCtx { bdevs: Arc::new(BdevRegistry::new(reactors.core_count())), reactors }
    }

    /// Deletes a bdev nothing holds: unregisters it, drops every core's channel, destroys it.
    pub fn delete_bdev(&self, name: &str) -> Result<(), RpcError> {
        let entry = self.bdevs.unregister(name)?;
        let id = entry.id();
        self.reactors.call_all(move || Channel::evict(id))?;
        entry.bdev().destroy();
        Ok(())
    }

    /// Looks a bdev up for an RPC, with SPDK's error for a missing one.
    pub fn bdev(&self, name: &str) -> Result<Arc<BdevEntry>, RpcError> {
        self.bdevs.lookup(name).map_err(RpcError::from)
    }
}
