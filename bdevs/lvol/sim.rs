//! The pool's operations for the deterministic simulation (`src/sim/lvol.rs`), which lives
//! outside this module: the RPC layer (`rpc`) reaches the store's private operations as a
//! child module, and so does this thin facade; nothing here changes what they do. Also the
//! accounting check the simulation runs after every step (the one `tests.rs` asserts).

use super::*;

/// A volume's bdev as the RPC layer registers it (named by its UUID).
pub fn bdev(store: &Arc<Store>, uuid: Uuid) -> Option<LvolBdev> {
    let st = store.st();
    let v = st.vols.get(&uuid)?;
    Some(LvolBdev::new(uuid.to_string(), uuid, store.clone(), v.live.clone(), v.rec.thin))
}

/// From now on this thread's new stores and volumes get UUIDs drawn from `seed` (`None`:
/// random ones again), so that a seed of the simulation replays exactly.
pub fn seed_uuids(seed: Option<u64>) {
    use rand::SeedableRng;
    SEEDED_UUIDS.with(|s| *s.borrow_mut() = seed.map(rand_chacha::ChaCha8Rng::seed_from_u64));
}

fn ch(store: &Store) -> Result<Channel, LvolError> {
    Ok(Channel::get(&store.base)?)
}

pub async fn create_volume(store: &Store, name: &str, size_bytes: u64, thin: bool) -> Result<Uuid, LvolError> {
    Ok(store.create_volume(&ch(store)?, name, size_bytes, thin, 1).await?.0)
}

/// The snapshot's state changes (clusters shared, epoch closed) in the first poll of the
/// returned future: the simulation takes its instant of the snapshot in the same poll.
pub async fn snapshot(store: &Store, uuid: Uuid, name: &str) -> Result<Uuid, LvolError> {
    let ch = ch(store)?;
    Ok(store.snapshot(&ch, uuid, name).await?.0)
}

pub async fn clone_volume(store: &Store, snap: Uuid, name: &str) -> Result<Uuid, LvolError> {
    Ok(store.clone_volume(&ch(store)?, snap, "snapshot", name).await?.0)
}

pub async fn delete_volume(store: &Store, uuid: Uuid) -> Result<(), LvolError> {
    store.delete_volume(&ch(store)?, uuid).await
}

pub async fn revert(store: &Store, uuid: Uuid, snap: Uuid) -> Result<(), LvolError> {
    store.revert(&ch(store)?, uuid, snap).await
}

pub async fn inflate(store: &Store, uuid: Uuid) -> Result<(), LvolError> {
    store.inflate(&ch(store)?, uuid).await
}

pub async fn decouple(store: &Store, uuid: Uuid) -> Result<(), LvolError> {
    store.decouple(&ch(store)?, uuid, "name").await
}

pub async fn resize(store: &Store, uuid: Uuid, size_bytes: u64, force: bool) -> Result<(), LvolError> {
    store.resize(&ch(store)?, uuid, size_bytes, force).await
}

/// Space accounting: each cluster's reference count is the number of maps naming it (plus
/// pending entries and clusters in limbo), the free count is the clusters with none, and the
/// thick reservations fit in it. `Err` says what disagrees.
pub fn check_accounting(store: &Store) -> Result<(), String> {
    let st = store.st();
    let mut refs = vec![0u32; store.total_clusters as usize];
    for v in st.vols.values() {
        for &p in v.map.values() {
            *refs.get_mut(p as usize).ok_or_else(|| format!("cluster {p} past the end"))? += 1;
        }
    }
    for p in st.pending.values() {
        if !st.vols.values().any(|v| v.map.values().any(|q| *q == p.phys)) {
            refs[p.phys as usize] += 1;
        }
    }
    for &l in &st.limbo {
        refs[l as usize] += 1;
    }
    if refs != st.refs {
        let diff: Vec<(usize, u32, u32)> = refs.iter().zip(&st.refs).enumerate().filter(|(_, (a, b))| a != b).map(|(i, (a, b))| (i, *a, *b)).take(8).collect();
        return Err(format!("reference counts do not follow the maps: (cluster, from maps, counted) {diff:?}"));
    }
    // What the open checks of a record: no cluster twice in one map, none past the volume's end.
    for v in st.vols.values() {
        let mut seen = std::collections::HashSet::new();
        for (&l, &p) in &v.map {
            if !seen.insert(p) || l as u64 >= clusters_for(v.rec.size_bytes, store.cluster_size) {
                return Err(format!("volume {}: cluster {p} at {l} is mapped twice or past the end ({} bytes): {:?}", v.rec.name, v.rec.size_bytes, v.map));
            }
        }
    }
    let free = refs.iter().filter(|r| **r == 0).count() as u64;
    if st.free_count != free {
        return Err(format!("free count {} but {free} clusters are unreferenced", st.free_count));
    }
    let reserved: u64 = st.vols.values().map(|v| v.reserved).sum();
    if reserved != st.reserved {
        return Err(format!("reservations: {} by volumes, {} counted, {} free", reserved, st.reserved, st.free_count));
    }
    Ok(())
}

/// Whether thick volumes reserve more clusters than are free (then `free_clusters` would
/// underflow). The open cuts reservations to the free count (seeds 5793, 6574).
pub fn overcommitted(store: &Store) -> bool {
    let st = store.st();
    st.reserved > st.free_count
}

/// Whether nothing is in flight in the store's metadata (no pending entry, no limbo): then
/// every referenced cluster is in a map.
pub fn is_settled(store: &Store) -> bool {
    let st = store.st();
    st.pending.is_empty() && !st.committing
}

/// Clusters referenced by the maps (each counted once).
pub fn mapped_clusters(store: &Store) -> u64 {
    let st = store.st();
    let mut seen = vec![false; store.total_clusters as usize];
    for v in st.vols.values() {
        for &p in v.map.values() {
            if let Some(s) = seen.get_mut(p as usize) {
                *s = true;
            }
        }
    }
    seen.iter().filter(|s| **s).count() as u64
}

/// The open's check of the maps (no cluster twice in one map, none past the volume's end), on
/// the state in memory: what the next commit would write.
pub fn check_maps(store: &Store) -> Result<(), String> {
    let st = store.st();
    for v in st.vols.values() {
        let mut seen = std::collections::HashSet::new();
        for (&l, &p) in &v.map {
            if !seen.insert(p) || l as u64 >= clusters_for(v.rec.size_bytes, store.cluster_size) {
                return Err(format!("volume {}: cluster {p} at {l} is mapped twice or past the end ({} bytes): {:?}", v.rec.name, v.rec.size_bytes, v.map));
            }
        }
    }
    Ok(())
}

/// The UUID of volume `name`, once the store has it (a snapshot has from its first poll on).
pub fn uuid_named(store: &Store, name: &str) -> Option<Uuid> {
    store.st().vols.values().find(|v| v.rec.name == name).map(|v| v.rec.uuid)
}
