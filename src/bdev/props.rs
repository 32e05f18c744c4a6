//! What every bdev has, whatever its module (SPDK's `struct spdk_bdev`): name, product name,
//! block size, block count and UUID. A module builds one [`BdevProps`] when it creates the bdev
//! and returns it from [`Bdev::props`](super::Bdev::props); the trait's getters read it, so a
//! module implements behaviour only. Claims and statistics are the registry's (`BdevEntry`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use uuid::Uuid;

/// A bdev's size in blocks, readable from every core. Clones share the count: a resizable
/// bdev (an lvol) keeps a clone for its data path and control plane, a pass-through bdev
/// shares its base's, so a resize is seen everywhere at once.
///
/// A count registered with a [`BdevRegistry`](super::BdevRegistry) tells it when
/// [`set`](Self::set) changes it, and the registry tells its resize subscribers (the exports:
/// NVMe namespaces raise Namespace Attribute Changed) the name of every bdev sharing the count.
#[derive(Clone, Debug)]
pub struct BlockCount(Arc<Count>);

#[derive(Debug)]
struct Count {
    n: AtomicU64,
    /// The registry's resize notifier, once the bdev is registered.
    hub: Mutex<Weak<ResizeHub>>,
}

impl BlockCount {
    pub fn new(n: u64) -> BlockCount {
        BlockCount(Arc::new(Count { n: AtomicU64::new(n), hub: Mutex::new(Weak::new()) }))
    }

    /// The count now. Acquire: pairs with [`set`](Self::set), so an I/O that sees a new size
    /// sees what the resize published before it (an lvol's larger cluster map).
    pub fn get(&self) -> u64 {
        self.0.n.load(Ordering::Acquire)
    }

    /// Changes the count (a resize). Only modules whose bdevs can be resized call this. A
    /// change is reported to the registry's resize subscribers (on the calling thread, after
    /// the new count is visible); setting the same count again reports nothing.
    pub fn set(&self, n: u64) {
        let old = self.0.n.swap(n, Ordering::SeqCst);
        if old != n {
            let hub = self.0.hub.lock().unwrap_or_else(|e| e.into_inner()).upgrade();
            if let Some(h) = hub {
                h.changed(self, old, n);
            }
        }
    }

    /// Whether `self` and `other` are one count (a bdev and a pass-through bdev over it).
    pub fn same(&self, other: &BlockCount) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    fn attach(&self, hub: &Arc<ResizeHub>) {
        *self.0.hub.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(hub);
    }
}

/// A resize subscriber: called with the name of a bdev whose size changed.
pub type ResizeSubscriber = Arc<dyn Fn(&str) + Send + Sync>;

/// The registry's side of resize notifications: the counts of the registered bdevs, by bdev
/// name, and the subscribers.
#[derive(Default)]
pub(super) struct ResizeHub {
    counts: Mutex<Vec<(String, BlockCount)>>,
    subscribers: Mutex<Vec<ResizeSubscriber>>,
}

impl std::fmt::Debug for ResizeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResizeHub")
    }
}

impl ResizeHub {
    pub(super) fn track(self: &Arc<Self>, name: &str, count: &BlockCount) {
        count.attach(self);
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).push((name.to_string(), count.clone()));
    }

    pub(super) fn untrack(&self, name: &str) {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).retain(|(n, _)| n != name);
    }

    pub(super) fn subscribe(&self, s: ResizeSubscriber) {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    fn changed(&self, count: &BlockCount, old: u64, new: u64) {
        // No lock is held while subscribers run: they may look bdevs up.
        let names: Vec<String> = self.counts.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|(_, c)| c.same(count)).map(|(n, _)| n.clone()).collect();
        let subs: Vec<ResizeSubscriber> = self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for n in &names {
            log::info!("bdev {n}: resized from {old} to {new} blocks");
            for s in &subs {
                s(n);
            }
        }
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
