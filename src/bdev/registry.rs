//! The registry of bdevs by name, with claims and opens.
//!
//! A virtual bdev *claims* its bases (at most one claim per bdev); an export or a backup
//! *opens* a bdev. A bdev that is claimed or open cannot be deleted, and a claimed bdev cannot
//! be opened for export (its owner writes it). All of this is control-plane state, touched by
//! the RPC thread, never on the data path.

use super::stats::BdevStats;
use super::{Bdev, CreateError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HolderKind {
    /// Exclusive use by a virtual bdev built on top.
    Claim,
    /// Use by an export (NVMe namespace, iSCSI LUN) or a job (backup).
    Open,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    pub kind: HolderKind,
    pub by: String,
    #[serde(skip)]
    id: u64,
}

pub struct BdevEntry {
    id: u64,
    bdev: Arc<dyn Bdev>,
    stats: BdevStats,
    /// Rate limits (`bdev_set_qos_limit`), read by every core's channel.
    qos: super::qos::Qos,
    holders: Mutex<Vec<Holder>>,
    /// Unregistered (under the holders lock): no new claim or open. Something that kept the
    /// entry of a bdev it let go (a mirror that may take a failed leg back by itself) must not
    /// get hold of a bdev that is being deleted.
    retired: AtomicBool,
}

static NEXT_HOLD: AtomicU64 = AtomicU64::new(1);

impl BdevEntry {
    /// Unique for the life of the process; keys per-core channel caches.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        self.bdev.name()
    }

    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn stats(&self) -> &BdevStats {
        &self.stats
    }

    pub fn qos(&self) -> &super::qos::Qos {
        &self.qos
    }

    fn holders(&self) -> MutexGuard<'_, Vec<Holder>> {
        // A poisoned lock only means a panic elsewhere; the list itself is always consistent.
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn holder_list(&self) -> Vec<Holder> {
        self.holders().clone()
    }

    /// The name of the claimant, if any.
    pub fn claimed_by(&self) -> Option<String> {
        self.holders().iter().find(|h| h.kind == HolderKind::Claim).map(|h| h.by.clone())
    }

    /// Claims the bdev for `by` (a virtual bdev's name). Fails if claimed or open already.
    pub fn claim(self: &Arc<Self>, by: &str) -> Result<HoldGuard, CreateError> {
        let mut h = self.holders();
        if self.retired.load(Ordering::SeqCst) {
            return Err(CreateError::NotFound(self.name().to_string()));
        }
        if let Some(other) = h.first() {
            return Err(CreateError::Busy { name: self.name().to_string(), by: other.by.clone() });
        }
        let id = NEXT_HOLD.fetch_add(1, Ordering::Relaxed);
        h.push(Holder { kind: HolderKind::Claim, by: by.to_string(), id });
        Ok(HoldGuard { entry: self.clone(), id })
    }

    /// Opens the bdev for `by` (an export or a job). Fails if a virtual bdev claims it.
    pub fn open(self: &Arc<Self>, by: &str) -> Result<HoldGuard, CreateError> {
        let mut h = self.holders();
        if self.retired.load(Ordering::SeqCst) {
            return Err(CreateError::NotFound(self.name().to_string()));
        }
        if let Some(c) = h.iter().find(|x| x.kind == HolderKind::Claim) {
            return Err(CreateError::Busy { name: self.name().to_string(), by: c.by.clone() });
        }
        let id = NEXT_HOLD.fetch_add(1, Ordering::Relaxed);
        h.push(Holder { kind: HolderKind::Open, by: by.to_string(), id });
        Ok(HoldGuard { entry: self.clone(), id })
    }
}

/// A claim or an open; released on drop.
pub struct HoldGuard {
    entry: Arc<BdevEntry>,
    id: u64,
}

impl HoldGuard {
    pub fn entry(&self) -> &Arc<BdevEntry> {
        &self.entry
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.entry.holders().retain(|h| h.id != self.id);
    }
}

impl std::fmt::Debug for HoldGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HoldGuard({})", self.entry.name())
    }
}

static NEXT_ENTRY: AtomicU64 = AtomicU64::new(1);

/// All bdevs of a target, by name.
pub struct BdevRegistry {
    cores: usize,
    by_name: Mutex<BTreeMap<String, Arc<BdevEntry>>>,
    /// Other names of a bdev (SPDK's aliases: an lvol is `lvs/lvol` and its UUID), alias to name.
    aliases: Mutex<BTreeMap<String, String>>,
    /// Resize notifications (see [`BlockCount`](super::BlockCount)).
    resize: Arc<super::props::ResizeHub>,
}

/// Longest bdev name accepted (SPDK has no limit; names end up in NQNs and metrics labels).
pub const MAX_NAME_LEN: usize = 255;

impl BdevRegistry {
    /// A registry whose bdevs keep statistics for `cores` cores.
    pub fn new(cores: usize) -> Self {
        BdevRegistry { cores, by_name: Mutex::new(BTreeMap::new()), aliases: Mutex::new(BTreeMap::new()), resize: Default::default() }
    }

    /// Calls `f` with a bdev's name whenever its size changes ([`BlockCount::set`](super::BlockCount::set)
    /// on the count of a registered bdev; every bdev sharing the count is named). The exports
    /// subscribe: an NVMe namespace raises Namespace Attribute Changed. `f` runs on the thread
    /// that resized (an RPC thread or a reactor core) and must not block.
    pub fn subscribe_resize(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        self.resize.subscribe(Arc::new(f));
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<BdevEntry>>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alias_map(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.aliases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives bdev `name` another name `alias` (which, unlike a name, may contain slashes:
    /// `lvs/lvol`). Lookups by the alias find the bdev.
    pub fn add_alias(&self, alias: &str, name: &str) -> Result<(), CreateError> {
        validate_alias(alias)?;
        if self.map().contains_key(alias) || self.alias_map().contains_key(alias) {
            return Err(CreateError::Exists(alias.to_string()));
        }
        self.alias_map().insert(alias.to_string(), name.to_string());
        Ok(())
    }

    pub fn remove_alias(&self, alias: &str) {
        self.alias_map().remove(alias);
    }

    /// The aliases of bdev `name`.
    pub fn aliases_of(&self, name: &str) -> Vec<String> {
        self.alias_map().iter().filter(|(_, n)| *n == name).map(|(a, _)| a.clone()).collect()
    }

    /// Checks that `name` is a usable, free bdev name.
    pub fn check_new_name(&self, name: &str) -> Result<(), CreateError> {
        validate_name(name)?;
        if self.map().contains_key(name) || self.alias_map().contains_key(name) {
            return Err(CreateError::Exists(name.to_string()));
        }
        Ok(())
    }

    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<Arc<BdevEntry>, CreateError> {
        let name = bdev.name().to_string();
        validate_name(&name)?;
        assert!(bdev.block_size() >= 1 && bdev.num_blocks() >= 1, "bdev {name} has no blocks");
        let mut m = self.map();
        if m.contains_key(&name) {
            return Err(CreateError::Exists(name));
        }
        let entry = Arc::new(BdevEntry {
            id: NEXT_ENTRY.fetch_add(1, Ordering::Relaxed),
            bdev,
            stats: BdevStats::new(self.cores),
            qos: Default::default(),
            holders: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        });
        self.resize.track(&name, entry.bdev().props().block_count());
        m.insert(name, entry.clone());
        Ok(entry)
    }

    pub fn get(&self, name: &str) -> Option<Arc<BdevEntry>> {
        if let Some(e) = self.map().get(name).cloned() {
            return Some(e);
        }
        let target = self.alias_map().get(name).cloned()?;
        self.map().get(&target).cloned()
    }

    pub fn lookup(&self, name: &str) -> Result<Arc<BdevEntry>, CreateError> {
        self.get(name).ok_or_else(|| CreateError::NotFound(name.to_string()))
    }

    /// Every bdev, in name order.
    pub fn list(&self) -> Vec<Arc<BdevEntry>> {
        self.map().values().cloned().collect()
    }

    /// Removes a bdev that nothing holds. The caller then evicts its channels from every core
    /// ([`super::Channel::evict`]) and calls [`super::Bdev::destroy`].
    pub fn unregister(&self, name: &str) -> Result<Arc<BdevEntry>, CreateError> {
        let mut m = self.map();
        let entry = m.get(name).ok_or_else(|| CreateError::NotFound(name.to_string()))?;
        {
            let holders = entry.holders();
            if let Some(h) = holders.first() {
                return Err(CreateError::Busy { name: name.to_string(), by: h.by.clone() });
            }
            entry.retired.store(true, Ordering::SeqCst);
        }
        let e = m.remove(name).expect("entry checked above");
        drop(m);
        self.resize.untrack(name);
        self.alias_map().retain(|_, n| n != name);
        Ok(e)
    }

    /// Bdevs in the order they must be recreated: every bdev after the bdevs it claims and the
    /// bdevs its configuration needs (`Bdev::config_needs`).
    pub fn in_creation_order(&self) -> Vec<Arc<BdevEntry>> {
        let all = self.list();
        let mut out: Vec<Arc<BdevEntry>> = Vec::new();
        let mut placed = std::collections::HashSet::new();
        // Bases first: a bdev is placed once every bdev it claims or needs is placed. Claims
        // and needs point down a stack (a bdev needs only bdevs that existed before it), so
        // they form no cycle and this terminates in at most `len` rounds; a bdev left over
        // anyway (a cycle would be a bug) is still written, last.
        for _ in 0..=all.len() {
            for e in &all {
                if placed.contains(&e.id) {
                    continue;
                }
                let needs = e.bdev().config_needs();
                let bases_placed =
                    all.iter().filter(|b| b.claimed_by().as_deref() == Some(e.name()) || needs.iter().any(|n| n == b.name())).all(|b| placed.contains(&b.id));
                if bases_placed {
                    placed.insert(e.id);
                    out.push(e.clone());
                }
            }
        }
        out.extend(all.into_iter().filter(|e| !placed.contains(&e.id)));
        out
    }
}

fn validate_alias(alias: &str) -> Result<(), CreateError> {
    if alias.is_empty() || alias.len() > MAX_NAME_LEN || alias.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err(CreateError::Invalid(format!("bdev alias {alias:?} is empty, too long, or contains a control character, quote or backslash")));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), CreateError> {
    if name.is_empty() {
        return Err(CreateError::Invalid("bdev name must not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(CreateError::Invalid(format!("bdev name is longer than {MAX_NAME_LEN} bytes")));
    }
    if name.chars().any(|c| c.is_control() || c == '"' || c == '\\' || c == '/') {
        return Err(CreateError::Invalid(format!("bdev name {name:?} contains a control character, quote, slash or backslash")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdevs::delay::DelayBdev;
    use crate::bdevs::malloc::MallocBdev;

    #[test]
    fn a_resize_names_every_bdev_on_the_count_to_every_subscriber_once_per_change() {
        let reg = BdevRegistry::new(1);
        let seen: Arc<Mutex<Vec<String>>> = Default::default();
        for tag in ["a", "b"] {
            let s = seen.clone();
            reg.subscribe_resize(move |n| s.lock().unwrap().push(format!("{tag}:{n}")));
        }
        let m = reg.register(Arc::new(MallocBdev::new("m", 64, 4096, None).unwrap())).unwrap();
        let other = reg.register(Arc::new(MallocBdev::new("other", 64, 4096, None).unwrap())).unwrap();
        let top = reg.register(Arc::new(DelayBdev::new("top".into(), m.claim("top").unwrap(), [0; 4], None))).unwrap();
        let count = m.bdev().props().block_count().clone();
        count.set(128);
        assert_eq!(top.bdev().num_blocks(), 128);
        let mut got = std::mem::take(&mut *seen.lock().unwrap());
        got.sort();
        assert_eq!(got, ["a:m", "a:top", "b:m", "b:top"], "both bdevs on the count, each subscriber; not `other`");
        count.set(128);
        assert!(seen.lock().unwrap().is_empty(), "the same size again is no change");
        other.bdev().props().block_count().set(65);
        assert_eq!(std::mem::take(&mut *seen.lock().unwrap()), ["a:other", "b:other"]);
        // An unregistered bdev is not named any more.
        drop(top);
        reg.unregister("top").unwrap();
        count.set(256);
        assert_eq!(std::mem::take(&mut *seen.lock().unwrap()), ["a:m", "b:m"]);
    }
}
