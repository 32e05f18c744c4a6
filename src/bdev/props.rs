//! What every bdev has, whatever its module (SPDK's `struct spdk_bdev`): name, product name,
//! block size, block count and UUID. A module builds one [`BdevProps`] when it creates the bdev
//! and returns it from [`Bdev::props`](super::Bdev::props); the trait's getters read it, so a
//! module implements behaviour only. Claims and statistics are the registry's (`BdevEntry`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use uuid::Uuid;

/// A bdev's size in blocks, readable from every core. Clones share the count: a resizable
/// bdev (an lvol) keeps a clone for its data path and control plane, a pass-through bdev
/// shares its base's, so a resize is seen everywhere at once.
#[derive(Clone, Debug)]
pub struct BlockCount(Arc<AtomicU64>);

impl BlockCount {
    pub fn new(n: u64) -> BlockCount {
        BlockCount(Arc::new(AtomicU64::new(n)))
    }

    /// The count now. Acquire: pairs with [`set`](Self::set), so an I/O that sees a new size
    /// sees what the resize published before it (an lvol's larger cluster map).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Changes the count (a resize). Only modules whose bdevs can be resized call this.
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::SeqCst)
    }
}

/// The generic data of one bdev.
#[derive(Debug)]
pub struct BdevProps {
    name: String,
    /// Module name as in SPDK's `product_name` ("Malloc disk", "URING bdev", ...).
    product_name: &'static str,
    block_size: u32,
    num_blocks: BlockCount,
    uuid: Uuid,
}

impl BdevProps {
    pub fn new(name: impl Into<String>, product_name: &'static str, block_size: u32, num_blocks: u64, uuid: Uuid) -> BdevProps {
        BdevProps::with_count(name, product_name, block_size, BlockCount::new(num_blocks), uuid)
    }

    /// Props whose block count is shared with the module (see [`BlockCount`]).
    pub fn with_count(name: impl Into<String>, product_name: &'static str, block_size: u32, num_blocks: BlockCount, uuid: Uuid) -> BdevProps {
        BdevProps { name: name.into(), product_name, block_size, num_blocks, uuid }
    }

    /// Props of a bdev stacked on `base` with the same geometry: block size and count are the
    /// base's (the count is shared: a base resized is seen through the bdev on top).
    pub fn over(base: &BdevProps, name: impl Into<String>, product_name: &'static str, uuid: Uuid) -> BdevProps {
        BdevProps::with_count(name, product_name, base.block_size, base.num_blocks.clone(), uuid)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn product_name(&self) -> &'static str {
        self.product_name
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.get()
    }

    /// The shared count, for a module that resizes its bdev or reads the size on its data path.
    pub fn block_count(&self) -> &BlockCount {
        &self.num_blocks
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bdev_over_a_base_follows_its_resize() {
        let base = BdevProps::new("base", "Malloc disk", 4096, 100, Uuid::nil());
        let top = BdevProps::over(&base, "top", "delay", Uuid::new_v4());
        assert_eq!((top.name(), top.product_name(), top.block_size(), top.num_blocks()), ("top", "delay", 4096, 100));
        base.block_count().set(250);
        assert_eq!(top.num_blocks(), 250);
    }
}
