//! The store's volumes, and the generation of their records.
//!
//! A commit writes a log record (map changes only) when the store's name and every volume
//! record (maps left out) are what the last durable whole record holds, else a whole record.
//! Comparing the records themselves cost a copy of every record (names included) per group
//! commit, under the state lock, on the path of first writes: O(volumes) allocations per
//! commit. Instead [`Vols`] counts changes of the records: the count moves with every insert,
//! remove and [`Vols::rec_mut`], and a record cannot be changed another way (a [`Head`] hands
//! out no `&mut`), so a change that forgot to count is a compile error rather than a log
//! record silently dropping it. Debug builds still compare the records (see
//! `Store::next_record`) in case a future change finds a way around this.

use super::{VolLive, VolumeRecord};
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;
use uuid::Uuid;

/// A volume's record without its map, read-only except through [`Vols::rec_mut`].
pub(super) struct Head(VolumeRecord);

impl Head {
    pub(super) fn new(rec: VolumeRecord) -> Head {
        debug_assert!(rec.map.is_empty(), "a volume's map lives in VolState::map, not in its record");
        Head(rec)
    }
}

impl Deref for Head {
    type Target = VolumeRecord;
    fn deref(&self) -> &VolumeRecord {
        &self.0
    }
}

/// A volume as the store's record holds it.
pub(super) struct VolState {
    pub(super) rec: Head,
    pub(super) map: BTreeMap<u32, u32>,
    pub(super) live: Arc<VolLive>,
    /// Clusters a thick volume still has reserved (not yet allocated).
    pub(super) reserved: u64,
}

/// Heap bytes per entry of a `BTreeMap<u32, u32>` (a volume's committed map), from the node
/// layout of std's B-tree (capacity 11): a leaf is a parent pointer, two u16 and 11 keys and
/// values (104 bytes), an internal node that and 12 edges (200); glibc adds 8 bytes to each
/// and rounds to 16. Counted for entries inserted in ascending order, the worst of the usual
/// patterns (first writes of a sequential fill): a full leaf split by an append keeps 6 of
/// its 11, so each leaf holds 6 entries and its parent one more, one internal node per 7
/// leaves. Random inserts fill nodes further (about 16 bytes per entry).
pub(super) const MAP_ENTRY_BYTES: u64 = {
    const fn malloc(n: u64) -> u64 {
        (n + 8).div_ceil(16) * 16
    }
    let kv = std::mem::size_of::<(u32, u32)>() as u64;
    let leaf = malloc((8 + 2 + 2 + 11 * kv).div_ceil(8) * 8);
    let internal = malloc((8 + 2 + 2 + 11 * kv).div_ceil(8) * 8 + 12 * 8);
    (7 * leaf + internal).div_ceil(49)
};

/// The store's volumes by UUID, with the generation of their records and the count of
/// their map entries.
pub(super) struct Vols {
    map: BTreeMap<Uuid, VolState>,
    gen: u64,
    /// Entries of all the volumes' maps: what `Store::record_fits` checks on every first
    /// write, kept here rather than summed over every volume under the lock. Maps change
    /// through `map_insert`, `map_remove` and `set_map`; debug builds check the count.
    mapped: u64,
}

impl Vols {
    pub(super) fn new(map: BTreeMap<Uuid, VolState>) -> Vols {
        let mapped = map.values().map(|v| v.map.len() as u64).sum();
        Vols { map, gen: 0, mapped }
    }

    /// Entries of all the volumes' maps (a shared cluster counts once per volume).
    pub(super) fn mapped(&self) -> u64 {
        debug_assert_eq!(self.mapped, self.map.values().map(|v| v.map.len() as u64).sum::<u64>(), "a map changed outside Vols' methods");
        self.mapped
    }

    /// Maps `logical` of volume `uuid` to `phys`; the entry it replaces, if any.
    pub(super) fn map_insert(&mut self, uuid: &Uuid, logical: u32, phys: u32) -> Option<u32> {
        let old = self.map.get_mut(uuid)?.map.insert(logical, phys);
        if old.is_none() {
            self.mapped += 1;
        }
        old
    }

    /// Unmaps `logical` of volume `uuid`; the cluster it mapped, if any.
    pub(super) fn map_remove(&mut self, uuid: &Uuid, logical: u32) -> Option<u32> {
        let p = self.map.get_mut(uuid)?.map.remove(&logical)?;
        self.mapped -= 1;
        Some(p)
    }

    /// Replaces volume `uuid`'s whole map (a revert).
    pub(super) fn set_map(&mut self, uuid: &Uuid, map: BTreeMap<u32, u32>) {
        if let Some(v) = self.map.get_mut(uuid) {
            self.mapped = self.mapped - v.map.len() as u64 + map.len() as u64;
            v.map = map;
        }
    }

    /// Moves with every change of a record, the set of volumes included (never backwards).
    pub(super) fn gen(&self) -> u64 {
        self.gen
    }

    pub(super) fn insert(&mut self, v: VolState) {
        self.gen += 1;
        self.mapped += v.map.len() as u64;
        let old = self.map.insert(v.rec.uuid, v);
        debug_assert!(old.is_none(), "a new volume has a new UUID");
    }

    pub(super) fn remove(&mut self, uuid: &Uuid) -> Option<VolState> {
        let v = self.map.remove(uuid)?;
        self.gen += 1;
        self.mapped -= v.map.len() as u64;
        Some(v)
    }

    /// Volume `uuid`'s record to change (counted as changed whether or not the caller does).
    pub(super) fn rec_mut(&mut self, uuid: &Uuid) -> Option<&mut VolumeRecord> {
        let v = self.map.get_mut(uuid)?;
        self.gen += 1;
        Some(&mut v.rec.0)
    }

    /// A record changed the way a missed count would: for the test that shows the debug
    /// check of `Store::next_record` catches it.
    #[cfg(all(test, debug_assertions))]
    pub(super) fn rec_mut_uncounted(&mut self, uuid: &Uuid) -> Option<&mut VolumeRecord> {
        Some(&mut self.map.get_mut(uuid)?.rec.0)
    }

    /// A volume's live state and reservation to change; its record stays as it is, and its
    /// map is changed through the methods above (which count its entries).
    pub(super) fn get_mut(&mut self, uuid: &Uuid) -> Option<&mut VolState> {
        self.map.get_mut(uuid)
    }
}

impl Deref for Vols {
    type Target = BTreeMap<Uuid, VolState>;
    fn deref(&self) -> &BTreeMap<Uuid, VolState> {
        &self.map
    }
}
