//! The store on a RAM bdev under simulated cores: allocation, free, full pool, reload, torn
//! metadata.

use super::*;
use crate::bdev::BdevRegistry;
use crate::bdevs::malloc::MallocBdev;
use crate::preserve::PreserveError;
use crate::reactor::ManualCores;

const BS: u32 = 512;
const CL: u64 = 64 * 1024;

struct Fix {
    cores: ManualCores,
    reg: BdevRegistry,
    base: Arc<BdevEntry>,
}

fn fixture(base_bytes: u64) -> Fix {
    let cores = ManualCores::new(2);
    let reg = BdevRegistry::new(2);
    let base = reg.register(Arc::new(MallocBdev::new("m", base_bytes / BS as u64, BS, None).unwrap())).unwrap();
    Fix { cores, reg, base }
}

impl Fix {
    fn create(&self) -> Arc<Store> {
        let g = self.base.claim("lvs").unwrap();
        self.cores.block_on(0, async move { Store::create(g, "lvs0", CL, 2).await.unwrap() })
    }

    fn load(&self) -> Result<Arc<Store>, LvolError> {
        let g = self.base.claim("lvs").unwrap();
        self.cores.block_on(0, async move { Store::load(g, 2).await })
    }

    fn vol(&self, s: &Arc<Store>, name: &str, mib: u64, thin: bool) -> Arc<BdevEntry> {
        let (s2, n) = (s.clone(), name.to_string());
        let r = self.cores.block_on(0, async move {
            let ch = Channel::get(&s2.base).unwrap();
            s2.create_volume(&ch, &n, mib << 20, thin, 1).await
        });
        let (uuid, live) = r.unwrap();
        self.reg.register(Arc::new(LvolBdev::new(uuid.to_string(), uuid, s.clone(), live, thin))).unwrap()
    }

    fn write(&self, v: &Arc<BdevEntry>, block: u64, byte: u8, blocks: usize) -> IoResult {
        let v = v.clone();
        self.cores.block_on(1, async move { Channel::get(&v)?.write_buf(block, &vec![byte; blocks * BS as usize]).await })
    }

    fn read(&self, v: &Arc<BdevEntry>, block: u64, blocks: usize) -> Vec<u8> {
        let v = v.clone();
        self.cores.block_on(1, async move {
            let mut b = vec![0xEEu8; blocks * BS as usize];
            Channel::get(&v).unwrap().read_buf(block, &mut b).await.unwrap();
            b
        })
    }

    fn unmap(&self, v: &Arc<BdevEntry>, block: u64, blocks: u64) -> IoResult {
        let v = v.clone();
        self.cores.block_on(1, async move { Channel::get(&v)?.unmap(block, blocks).await })
    }

    fn close(&self, s: Arc<Store>, vols: Vec<Arc<BdevEntry>>) {
        for v in vols {
            let name = v.name().to_string();
            drop(v);
            self.reg.unregister(&name).unwrap();
        }
        s.release_base();
    }
}

fn lvol(e: &Arc<BdevEntry>) -> &LvolBdev {
    e.bdev().as_any().downcast_ref::<LvolBdev>().unwrap()
}

#[test]
fn thin_clusters_are_allocated_on_first_write_and_freed_by_unmap() {
    let f = fixture(8 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let v = f.vol(&s, "a", 4, true);
    assert_eq!(s.free_clusters(), total, "a thin volume takes no space at creation");
    assert_eq!(f.read(&v, 0, 4), vec![0u8; 4 * BS as usize], "unwritten blocks read as zeros");
    // A write straddling two clusters allocates both; the rest of each reads zeros.
    let bpc = CL / BS as u64;
    f.write(&v, bpc - 1, 0xAB, 2).unwrap();
    assert_eq!(lvol(&v).allocated_clusters(), 2);
    assert_eq!(s.free_clusters(), total - 2);
    assert_eq!(f.read(&v, bpc - 1, 2), vec![0xAB; 2 * BS as usize]);
    assert_eq!(f.read(&v, bpc + 1, 1), vec![0u8; BS as usize], "a new cluster is zeroed");
    // Unmap of part of a cluster zeroes it and keeps it; of a whole cluster frees it.
    f.unmap(&v, bpc - 1, 1).unwrap();
    assert_eq!(lvol(&v).allocated_clusters(), 2);
    assert_eq!(f.read(&v, bpc - 1, 1), vec![0u8; BS as usize]);
    f.unmap(&v, 0, bpc).unwrap();
    assert_eq!(lvol(&v).allocated_clusters(), 1);
    assert_eq!(s.free_clusters(), total - 1);
    assert_eq!(f.read(&v, bpc, 1), vec![0xAB; BS as usize], "the other cluster keeps its data");
}

#[test]
fn a_full_pool_fails_only_writes_that_need_space_until_space_is_freed() {
    let f = fixture(4 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let bpc = CL / BS as u64;
    // Two thin volumes, each larger than the pool: overcommitted.
    let a = f.vol(&s, "a", 8, true);
    let b = f.vol(&s, "b", 8, true);
    for c in 0..total {
        f.write(&a, c * bpc, c as u8, 1).unwrap();
    }
    assert_eq!(s.free_clusters(), 0);
    assert_eq!(f.write(&b, 0, 1, 1), Err(BdevError::NoSpace), "a write that needs a cluster fails");
    assert_eq!(f.write(&a, total * bpc, 1, 1), Err(BdevError::NoSpace));
    // Everything else goes on.
    f.write(&a, 3 * bpc + 5, 0x77, 1).unwrap();
    assert_eq!(f.read(&a, 3 * bpc + 5, 1), vec![0x77; BS as usize]);
    assert_eq!(f.read(&b, 0, 1), vec![0u8; BS as usize]);
    // Freeing space makes the failed write succeed.
    f.unmap(&a, 0, bpc).unwrap();
    f.write(&b, 0, 1, 1).unwrap();
    assert_eq!(f.read(&b, 0, 1), vec![1u8; BS as usize]);
    assert_eq!(f.read(&a, 0, 1), vec![0u8; BS as usize]);
}

#[test]
fn thick_volumes_reserve_their_clusters() {
    let f = fixture(4 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let t = f.vol(&s, "thick", 1, false);
    let per = (1 << 20) / CL;
    assert_eq!(s.free_clusters(), total - per);
    let thin = f.vol(&s, "thin", 64, true);
    for c in 0..(total - per) {
        f.write(&thin, c * (CL / BS as u64), 9, 1).unwrap();
    }
    assert_eq!(f.write(&thin, (total - per) * (CL / BS as u64), 9, 1), Err(BdevError::NoSpace));
    // The thick volume still gets every cluster it reserved.
    for c in 0..per {
        f.write(&t, c * (CL / BS as u64), 3, 1).unwrap();
    }
    let (s2, ch) = (s.clone(), ());
    let _ = ch;
    let r = f.cores.block_on(0, async move {
        let ch = Channel::get(&s2.base).unwrap();
        s2.create_volume(&ch, "big", 64 << 20, false, 1).await.map(|_| ())
    });
    assert!(matches!(r, Err(LvolError::NoSpace(_))), "a thick volume past the free space is refused");
}

#[test]
fn a_reopened_store_has_every_acknowledged_write() {
    let f = fixture(8 << 20);
    let s = f.create();
    let a = f.vol(&s, "a", 2, true);
    let b = f.vol(&s, "b", 1, false);
    f.write(&a, 10, 0x5A, 3).unwrap();
    f.write(&b, 100, 0xA5, 1).unwrap();
    let (ua, ub) = (lvol(&a).lvol_uuid(), lvol(&b).lvol_uuid());
    let free = s.free_clusters();
    f.close(s, vec![a, b]);
    let s = f.load().unwrap();
    assert_eq!(s.name(), "lvs0");
    assert_eq!(s.free_clusters(), free, "space accounting survives");
    let vols = s.volumes();
    assert_eq!(vols.len(), 2);
    let a = f.reg.register(Arc::new(LvolBdev::new(ua.to_string(), ua, s.clone(), s.live(ua).unwrap(), true))).unwrap();
    let b = f.reg.register(Arc::new(LvolBdev::new(ub.to_string(), ub, s.clone(), s.live(ub).unwrap(), false))).unwrap();
    assert_eq!(f.read(&a, 10, 3), vec![0x5A; 3 * BS as usize]);
    assert_eq!(f.read(&a, 13, 1), vec![0u8; BS as usize]);
    assert_eq!(f.read(&b, 100, 1), vec![0xA5; BS as usize]);
}

#[test]
fn a_torn_metadata_write_reopens_the_previous_state() {
    let f = fixture(8 << 20);
    let s = f.create();
    let a = f.vol(&s, "a", 2, true);
    let (cur, at) = {
        let st = s.st();
        (st.cur_slot, st.log_at)
    };
    f.write(&a, 0, 1, 1).unwrap();
    let ua = lvol(&a).lvol_uuid();
    // The last commit (the allocation) changed a map only: a log record after the current
    // record, in the same slot. Tear it: its CRC no longer matches.
    let after = {
        let st = s.st();
        (st.cur_slot, st.log_at > at)
    };
    assert_eq!(after, (cur, true), "a first write's commit is a log record");
    let slot_blocks = s.slot_bytes / BS as u64;
    f.close(s, vec![a]);
    let base = f.base.clone();
    f.cores.block_on(0, async move {
        let ch = Channel::get(&base).unwrap();
        ch.write_buf(cur as u64 * slot_blocks + at / BS as u64, &[0u8; BS as usize]).await.unwrap();
    });
    let s = f.load().unwrap();
    // The previous record: the volume exists, its first write was not committed.
    let vols = s.volumes();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].0.uuid, ua);
    assert_eq!(vols[0].1, 0, "the torn commit's allocation is not there");
    assert_eq!(s.free_clusters(), s.total_clusters(), "and its cluster is free again");
}

/// A record torn by a crash, in the slot not chosen at open, must not be made whole by the
/// next commit's record torn by the next crash: the two list the same volumes up to where they
/// differ, so the blocks the second one wrote can be the very bytes the first one lacked.
/// Found by seed 8592 of the pool simulation (a deleted volume's record came back after the
/// volume had been written to); fixed by `void_slot`. Without it this test reads 5 volumes.
#[test]
fn a_torn_record_is_not_completed_by_the_next_commits_torn_record() {
    let f = fixture(8 << 20);
    let s = f.create();
    // Long names: the record spans two blocks.
    let vols: Vec<_> = (0..6).map(|i| f.vol(&s, &format!("a-volume-with-a-name-long-enough-{i:030}"), 1, true)).collect();
    let (other, slot_blocks) = (1 - s.st().cur_slot, s.slot_bytes / BS as u64);
    f.close(s, vols);
    let base = f.base.clone();
    let (torn, next) = f.cores.block_on(0, async move {
        let ch = Channel::get(&base).unwrap();
        let (_, r, _) = read_record(&ch, BS, slot_blocks * BS as u64).await.unwrap();
        // The record a commit deleting the last volume (in UUID order) writes, and the one
        // a commit after the open writes with the same sequence number, a volume added.
        let mut deleted = StoreRecord { seq: r.seq + 1, ..r.clone() };
        deleted.volumes.pop();
        let mut added = StoreRecord { seq: r.seq + 1, ..r };
        let mut z = added.volumes[0].clone();
        (z.uuid, z.name) = (Uuid::max(), "z".into());
        added.volumes.push(z);
        (deleted.encode(), added.encode())
    });
    let b = BS as usize;
    assert!(torn.len() > b && torn.len() <= 2 * b && next.len() >= torn.len(), "two blocks each: {} and {}", torn.len(), next.len());
    assert_eq!(torn[b..], next[b..torn.len()], "the second block of the torn record is a prefix of the next one's");
    let write_block = |block: u64, bytes: &[u8]| {
        let (base, mut buf) = (f.base.clone(), bytes.to_vec());
        buf.resize(b, 0);
        f.cores.block_on(0, async move { Channel::get(&base).unwrap().write_buf(other as u64 * slot_blocks + block, &buf).await.unwrap() });
    };
    // Crash 1: only the first block of the delete's record reached the media; the second
    // holds older bytes (not the previous record's: that one may be this record's prefix).
    write_block(0, &torn[..b]);
    write_block(1, &[0xFF; 512]);
    let s = f.load().unwrap();
    assert_eq!(s.volumes().len(), 6, "the torn record is not read");
    f.close(s, Vec::new());
    // Crash 2: only the second block of the next commit's record reached the media.
    write_block(1, &next[b..]);
    let s = f.load().unwrap();
    assert_eq!(s.volumes().len(), 6, "the delete, never acknowledged, came back");
}

#[test]
fn first_writes_and_unmaps_commit_as_log_records_replayed_at_open() {
    let f = fixture(16 << 20);
    let s = f.create();
    let a = f.vol(&s, "a", 4, true);
    let ua = lvol(&a).lvol_uuid();
    let cl = CL / BS as u64;
    let (cur, commits) = (s.st().cur_slot, s.commits());
    // Three first writes, an unmap of one of them, a write to it again: all in the log.
    for (i, byte) in [(0u64, 1u8), (1, 2), (3, 3)] {
        f.write(&a, i * cl, byte, 2).unwrap();
    }
    f.unmap(&a, cl, cl).unwrap();
    f.write(&a, cl + 5, 4, 1).unwrap();
    assert_eq!(s.commits() - commits, 5);
    assert_eq!(s.st().cur_slot, cur, "no whole record was written for map changes");
    let free = s.free_clusters();
    f.close(s, vec![a]);
    let s = f.load().unwrap();
    assert_eq!(s.volumes()[0].1, 3);
    assert_eq!(s.free_clusters(), free);
    let a = f.reg.register(Arc::new(LvolBdev::new(ua.to_string(), ua, s.clone(), s.live(ua).unwrap(), true))).unwrap();
    assert_eq!(f.read(&a, 0, 2), vec![1; 2 * BS as usize]);
    assert_eq!(f.read(&a, cl, 6), [vec![0; 5 * BS as usize], vec![4; BS as usize]].concat(), "unmapped, then written again");
    assert_eq!(f.read(&a, 3 * cl, 2), vec![3; 2 * BS as usize]);
    // The first commit after an open writes a whole record (into the other slot).
    let slot = s.st().cur_slot;
    f.write(&a, 2 * cl, 5, 1).unwrap();
    assert_ne!(s.st().cur_slot, slot);
}

#[test]
fn a_store_created_again_on_the_bdev_does_not_replay_the_old_ones_log() {
    let f = fixture(16 << 20);
    let s = f.create();
    let a = f.vol(&s, "a", 4, true);
    for i in 0..3u64 {
        f.write(&a, i * (CL / BS as u64), 7, 1).unwrap();
    }
    let s2 = s.clone();
    f.cores.block_on(0, async move { s2.destroy_on_media().await.unwrap() });
    f.close(s, vec![a]);
    // The new store's record is as long as the old one's was: its log would start where the
    // old log records are, with the sequence numbers the new store uses next.
    let s = f.create();
    let b = f.vol(&s, "a", 4, true);
    f.close(s, vec![b]);
    let s = f.load().unwrap();
    assert_eq!(s.volumes()[0].1, 0, "nothing of the old store's log is replayed");
    assert_eq!(s.free_clusters(), s.total_clusters());
}

#[test]
fn create_refuses_a_bdev_that_holds_a_store() {
    let f = fixture(4 << 20);
    let s = f.create();
    s.release_base();
    let g = f.base.claim("lvs").unwrap();
    let r = f.cores.block_on(0, async move { Store::create(g, "again", CL, 2).await.map(|_| ()) });
    assert!(matches!(r, Err(LvolError::Exists(_))), "{:?}", r.err());
}

/// What a configuration replayed at a restart relies on: the same creation opens the store it
/// made, with its volumes and data; another name or cluster size is still refused.
#[test]
fn create_or_open_opens_only_the_same_store() {
    let f = fixture(4 << 20);
    let s = f.create();
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, 3, 0x5A, 1).unwrap();
    let (uuid, total) = (s.uuid, s.total_clusters());
    f.close(s, vec![v]);
    let attempt = |name: &'static str, cluster: u64, open_same: bool| {
        let g = f.base.claim("lvs").unwrap();
        f.cores.block_on(0, async move { Store::create_or_open(g, name, cluster, 2, open_same).await })
    };
    for (name, cluster, open_same) in [("lvs0", CL, false), ("other", CL, true), ("lvs0", 2 * CL, true)] {
        let r = attempt(name, cluster, open_same);
        assert!(matches!(r, Err(LvolError::Exists(_))), "{name} {cluster} {open_same}: {:?}", r.map(|(s, created)| (s.uuid, created)));
    }
    let (s, created) = attempt("lvs0", CL, true).unwrap();
    assert!(!created, "opened, not created");
    assert_eq!((s.uuid, s.total_clusters()), (uuid, total));
    let vols = s.volumes();
    assert_eq!((vols.len(), vols[0].0.name.as_str(), vols[0].1), (1, "a", 1), "the volume and its allocated cluster");
    let live = s.live(vols[0].0.uuid).unwrap();
    let v = f.reg.register(Arc::new(LvolBdev::new(vols[0].0.uuid.to_string(), vols[0].0.uuid, s.clone(), live, true))).unwrap();
    assert_eq!(f.read(&v, 3, 1), vec![0x5A; BS as usize], "its data");
}

#[test]
fn concurrent_first_writes_share_commits_and_clusters() {
    let f = fixture(8 << 20);
    let s = f.create();
    let v = f.vol(&s, "a", 4, true);
    let bpc = CL / BS as u64;
    let before = s.commits();
    // 16 first writes on two cores at once: 8 clusters, each written twice (different blocks).
    let done = Rc::new(std::cell::Cell::new(0));
    for i in 0..16u64 {
        let (v, done) = (v.clone(), done.clone());
        f.cores.enter((i % 2) as usize, || {
            crate::reactor::spawn_detached(async move {
                let ch = Channel::get(&v).unwrap();
                ch.write_buf((i / 2) * bpc + (i % 2), &vec![i as u8 + 1; BS as usize]).await.unwrap();
                done.set(done.get() + 1);
            })
        });
    }
    f.cores.run_until_idle();
    while done.get() < 16 {
        let t = f.cores.next_timer().expect("the writes wait for nothing");
        f.cores.advance_to(t);
        f.cores.run_until_idle();
    }
    assert_eq!(lvol(&v).allocated_clusters(), 8, "one cluster per logical cluster, however many first writes race");
    assert!(s.commits() - before < 16, "group commit: {} commits for 16 first writes", s.commits() - before);
    for i in 0..16u64 {
        assert_eq!(f.read(&v, (i / 2) * bpc + (i % 2), 1), vec![i as u8 + 1; BS as usize], "write {i}");
    }
}

#[test]
fn resize_grows_and_refuses_to_shrink_below_allocated_unless_forced() {
    let f = fixture(8 << 20);
    let s = f.create();
    let v = f.vol(&s, "a", 1, true);
    let bpc = CL / BS as u64;
    let u = lvol(&v).lvol_uuid();
    f.write(&v, 15 * bpc, 7, 1).unwrap();
    let rs = |size: u64, force: bool| {
        let s2 = s.clone();
        f.cores.block_on(0, async move {
            let ch = Channel::get(&s2.base).unwrap();
            s2.resize(&ch, u, size, force).await
        })
    };
    rs(2 << 20, false).unwrap();
    assert_eq!(v.bdev().num_blocks(), (2 << 20) / BS as u64);
    // A channel opened after the resize writes past the old end.
    let v2 = v.clone();
    f.cores.block_on(0, async move { Channel::get(&v2).unwrap().write_buf(31 * bpc, &vec![8u8; BS as usize]).await.unwrap() });
    assert_eq!(f.read(&v, 15 * bpc, 1), vec![7u8; BS as usize], "data kept across the map swap");
    assert!(matches!(rs(CL, false), Err(LvolError::Invalid(_))), "shrink below allocated data is refused");
    assert_eq!(lvol(&v).allocated_clusters(), 2, "and changes nothing");
    rs(CL, true).unwrap();
    assert_eq!(lvol(&v).allocated_clusters(), 0);
    assert_eq!(s.free_clusters(), s.total_clusters());
}

#[test]
fn a_pool_holds_1024_volumes_and_reopens_them() {
    let f = fixture(64 << 20);
    let s = f.create();
    let t0 = std::time::Instant::now();
    for i in 0..layout::MAX_VOLUMES {
        let s2 = s.clone();
        f.cores.block_on(0, async move {
            let ch = Channel::get(&s2.base).unwrap();
            s2.create_volume(&ch, &format!("v{i}"), 1 << 30, true, 1).await.unwrap();
        });
    }
    eprintln!("{} volumes created in {:?}", layout::MAX_VOLUMES, t0.elapsed());
    let s2 = s.clone();
    let r = f.cores.block_on(0, async move {
        let ch = Channel::get(&s2.base).unwrap();
        s2.create_volume(&ch, "one-more", 1 << 20, true, 1).await.map(|_| ())
    });
    assert!(matches!(r, Err(LvolError::NoSpace(_))), "past the most volumes a store holds: refused");
    s.release_base();
    drop(s);
    let s = f.load().unwrap();
    assert_eq!(s.volume_count(), layout::MAX_VOLUMES);
}

// ---- snapshots, clones (the second slice) ----

impl Fix {
    fn bdev(&self, s: &Arc<Store>, uuid: Uuid) -> Arc<BdevEntry> {
        let live = s.live(uuid).unwrap();
        self.reg.register(Arc::new(LvolBdev::new(uuid.to_string(), uuid, s.clone(), live, true))).unwrap()
    }

    fn snapshot(&self, s: &Arc<Store>, v: &Arc<BdevEntry>, name: &str) -> Result<Arc<BdevEntry>, LvolError> {
        let (s2, n, u) = (s.clone(), name.to_string(), lvol(v).lvol_uuid());
        let (snap, _) = self.cores.block_on(0, async move { s2.snapshot(&Channel::get(&s2.base).unwrap(), u, &n).await })?;
        Ok(self.bdev(s, snap))
    }

    fn clone_of(&self, s: &Arc<Store>, snap: &Arc<BdevEntry>, name: &str) -> Result<Arc<BdevEntry>, LvolError> {
        let (s2, n, u) = (s.clone(), name.to_string(), lvol(snap).lvol_uuid());
        let (c, _) = self.cores.block_on(0, async move { s2.clone_volume(&Channel::get(&s2.base).unwrap(), u, "snap", &n).await })?;
        Ok(self.bdev(s, c))
    }

    fn delete(&self, s: &Arc<Store>, v: Arc<BdevEntry>) -> Result<(), LvolError> {
        let u = lvol(&v).lvol_uuid();
        s.check_delete(u, "name")?;
        drop(v);
        self.reg.unregister(&u.to_string()).unwrap();
        let s2 = s.clone();
        self.cores.block_on(0, async move { s2.delete_volume(&Channel::get(&s2.base).unwrap(), u).await })
    }

    /// Closes the store and opens it again: the volumes by name.
    fn reopen(&self, s: Arc<Store>, vols: Vec<Arc<BdevEntry>>) -> (Arc<Store>, BTreeMap<String, Arc<BdevEntry>>) {
        self.close(s, vols);
        let s = self.load().unwrap();
        let vols = s.volumes().into_iter().map(|(r, _)| (r.name.clone(), self.bdev(&s, r.uuid))).collect();
        (s, vols)
    }
}

/// The store's reference counts and free count agree with its maps.
fn check_refs(s: &Store) {
    let st = s.st();
    let mut refs = vec![0u32; s.total_clusters as usize];
    for v in st.vols.values() {
        for &p in v.map.values() {
            refs[p as usize] += 1;
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
    assert_eq!(refs, st.refs, "reference counts follow the maps");
    assert_eq!(st.free_count, refs.iter().filter(|r| **r == 0).count() as u64);
}

#[test]
fn a_snapshot_shares_clusters_and_the_next_write_copies_one() {
    let f = fixture(8 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, 0, 0xA1, bpc as usize).unwrap();
    f.write(&v, bpc, 0xA2, 1).unwrap();
    let snap = f.snapshot(&s, &v, "snap").unwrap();
    assert_eq!(s.free_clusters(), total - 2, "nothing is copied at snapshot time");
    assert!(lvol(&snap).read_only());
    assert_eq!(f.write(&snap, 0, 1, 1), Err(BdevError::ReadOnly));
    // A write to a shared cluster copies it: the rest of the cluster keeps the old data.
    f.write(&v, 3, 0xB1, 1).unwrap();
    assert_eq!(s.free_clusters(), total - 3);
    assert_eq!(f.read(&v, 2, 3), [vec![0xA1; BS as usize], vec![0xB1; BS as usize], vec![0xA1; BS as usize]].concat());
    assert_eq!(f.read(&snap, 0, bpc as usize), vec![0xA1; CL as usize], "the snapshot keeps the image");
    // The second write to that cluster goes in place (no new cluster).
    f.write(&v, 4, 0xB2, 1).unwrap();
    assert_eq!(s.free_clusters(), total - 3);
    check_refs(&s);
    let (s, vols) = f.reopen(s, vec![v, snap]);
    check_refs(&s);
    assert_eq!(s.free_clusters(), total - 3, "the leak check counts a shared cluster once");
    assert_eq!(f.read(&vols["snap"], 3, 1), vec![0xA1; BS as usize]);
    assert_eq!(f.read(&vols["a"], 3, 2), [vec![0xB1; BS as usize], vec![0xB2; BS as usize]].concat());
    assert_eq!(f.read(&vols["a"], bpc, 1), vec![0xA2; BS as usize], "an unwritten shared cluster reads through");
}

#[test]
fn clones_read_through_write_privately_and_hold_their_snapshot() {
    let f = fixture(8 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, 0, 0x11, 4).unwrap();
    let snap = f.snapshot(&s, &v, "snap").unwrap();
    assert!(matches!(f.clone_of(&s, &v, "bad"), Err(LvolError::Invalid(m)) if m.contains("snapshot_name")), "a writable volume is not cloned");
    assert!(matches!(f.snapshot(&s, &snap, "bad"), Err(LvolError::Invalid(m)) if m.contains("lvol_name")), "a snapshot is not snapshotted");
    let c = f.clone_of(&s, &snap, "c").unwrap();
    assert!(matches!(f.clone_of(&s, &snap, "c"), Err(LvolError::Exists(_))));
    assert_eq!(f.read(&c, 0, 4), vec![0x11; 4 * BS as usize]);
    f.write(&c, 1, 0x22, 1).unwrap();
    assert_eq!(f.read(&c, 0, 2), [vec![0x11; BS as usize], vec![0x22; BS as usize]].concat());
    assert_eq!(f.read(&snap, 1, 1), vec![0x11; BS as usize]);
    assert_eq!(f.read(&v, 1, 1), vec![0x11; BS as usize]);
    // A clone of a clone's snapshot.
    let snap2 = f.snapshot(&s, &c, "snap2").unwrap();
    let c2 = f.clone_of(&s, &snap2, "c2").unwrap();
    assert_eq!(f.read(&c2, 0, 2), [vec![0x11; BS as usize], vec![0x22; BS as usize]].concat());
    // `snap` has two clones (a, c): its deletion is refused and changes nothing.
    assert!(matches!(f.delete(&s, snap.clone()), Err(LvolError::Busy(m)) if m.contains("a") && m.contains("c")));
    assert_eq!(f.read(&snap, 0, 1), vec![0x11; BS as usize]);
    for x in [c2, snap2, c] {
        f.delete(&s, x).unwrap();
    }
    // One clone left: the snapshot goes, the volume keeps the data it shared.
    f.delete(&s, snap).unwrap();
    assert_eq!(f.read(&v, 0, 4), vec![0x11; 4 * BS as usize]);
    assert_eq!(s.free_clusters(), total - 1);
    check_refs(&s);
    // The last reference gone, its writes go in place again.
    f.write(&v, 0, 0x33, 1).unwrap();
    assert_eq!(s.free_clusters(), total - 1);
    f.delete(&s, v).unwrap();
    assert_eq!(s.free_clusters(), total);
    check_refs(&s);
}

#[test]
fn revert_inflate_and_decouple() {
    let f = fixture(8 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, 0, 0x11, 1).unwrap();
    let snap = f.snapshot(&s, &v, "snap").unwrap();
    f.write(&v, 0, 0x22, 1).unwrap();
    assert_eq!(s.free_clusters(), total - 2);
    let (s2, u, su) = (s.clone(), lvol(&v).lvol_uuid(), lvol(&snap).lvol_uuid());
    f.cores.block_on(0, async move { s2.revert(&Channel::get(&s2.base).unwrap(), u, su).await }).unwrap();
    assert_eq!(f.read(&v, 0, 1), vec![0x11; BS as usize], "the volume has the snapshot's content");
    assert_eq!(s.free_clusters(), total - 1, "its own copy is freed");
    check_refs(&s);
    // Inflate: the volume owns every cluster; the snapshot can go.
    let c = f.clone_of(&s, &snap, "c").unwrap();
    let (s2, cu) = (s.clone(), lvol(&c).lvol_uuid());
    f.cores.block_on(0, async move { s2.inflate(&Channel::get(&s2.base).unwrap(), cu).await }).unwrap();
    let per = (1 << 20) / CL;
    assert_eq!(s.free_clusters(), total - 1 - per, "inflated: every cluster of the clone is its own");
    assert_eq!(f.read(&c, 0, 1), vec![0x11; BS as usize]);
    // Decouple: `a` no longer names the snapshot as parent.
    let s2 = s.clone();
    f.cores.block_on(0, async move { s2.decouple(&Channel::get(&s2.base).unwrap(), u, "name").await }).unwrap();
    f.delete(&s, snap).unwrap();
    assert_eq!(f.read(&v, 0, 1), vec![0x11; BS as usize]);
    check_refs(&s);
    let (s, vols) = f.reopen(s, vec![v, c]);
    assert_eq!(f.read(&vols["a"], 0, 1), vec![0x11; BS as usize]);
    assert_eq!(s.free_clusters(), total - 1 - per);
}

#[derive(Debug, Clone)]
enum Op {
    Write { vol: usize, cluster: u64, byte: u8 },
    Snapshot { vol: usize },
    Clone { vol: usize },
    Delete { vol: usize },
    Reopen,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0usize..8, 0u64..16, 1u8..255).prop_map(|(vol, cluster, byte)| Op::Write { vol, cluster, byte }),
        2 => (0usize..8).prop_map(|vol| Op::Snapshot { vol }),
        2 => (0usize..8).prop_map(|vol| Op::Clone { vol }),
        1 => (0usize..8).prop_map(|vol| Op::Delete { vol }),
        1 => Just(Op::Reopen),
    ]
}

/// A volume of the model: its name, whether it is a snapshot, its parent (by name), and the
/// first byte of each of its 16 clusters.
#[derive(Debug, Clone)]
struct ModelVol {
    name: String,
    snapshot: bool,
    parent: Option<String>,
    content: Vec<u8>,
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Random writes, snapshots, clones, deletes and reopens against a model: every volume
    /// reads what the model says, reference counts follow the maps, and once everything is
    /// deleted the whole pool is free.
    #[test]
    fn volumes_snapshots_and_clones_follow_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let f = fixture(16 << 20);
        let mut s = f.create();
        let total = s.total_clusters();
        let bpc = CL / BS as u64;
        let mut model = vec![ModelVol { name: "v0".into(), snapshot: false, parent: None, content: vec![0; 16] }];
        let mut vols: BTreeMap<String, Arc<BdevEntry>> = BTreeMap::new();
        vols.insert("v0".into(), f.vol(&s, "v0", 1, true));
        let mut n = 0;
        for op in ops {
            n += 1;
            match op {
                Op::Write { vol, cluster, byte } => {
                    let i = vol % model.len();
                    let m = &mut model[i];
                    let r = f.write(&vols[&m.name], cluster * bpc, byte, 1);
                    match (m.snapshot, r) {
                        (true, r) => proptest::prop_assert_eq!(r, Err(BdevError::ReadOnly)),
                        (false, Ok(())) => m.content[cluster as usize] = byte,
                        (false, r) => proptest::prop_assert_eq!(r, Err(BdevError::NoSpace)),
                    }
                }
                Op::Snapshot { vol } => {
                    let i = vol % model.len();
                    let name = format!("s{n}");
                    if model.len() >= 16 {
                        continue;
                    }
                    let r = f.snapshot(&s, &vols[&model[i].name], &name);
                    if model[i].snapshot {
                        proptest::prop_assert!(matches!(r, Err(LvolError::Invalid(_))));
                        continue;
                    }
                    let e = r.unwrap();
                    let m = ModelVol { name: name.clone(), snapshot: true, parent: model[i].parent.clone(), content: model[i].content.clone() };
                    model[i].parent = Some(name.clone());
                    model.push(m);
                    vols.insert(name, e);
                }
                Op::Clone { vol } => {
                    let i = vol % model.len();
                    let name = format!("c{n}");
                    if model.len() >= 16 {
                        continue;
                    }
                    let r = f.clone_of(&s, &vols[&model[i].name], &name);
                    if !model[i].snapshot {
                        proptest::prop_assert!(matches!(r, Err(LvolError::Invalid(_))));
                        continue;
                    }
                    let m = ModelVol { name: name.clone(), snapshot: false, parent: Some(model[i].name.clone()), content: model[i].content.clone() };
                    model.push(m);
                    vols.insert(name, r.unwrap());
                }
                Op::Delete { vol } => {
                    let i = vol % model.len();
                    let name = model[i].name.clone();
                    let clones = model.iter().filter(|m| m.parent.as_deref() == Some(&name)).count();
                    let e = vols.remove(&name).unwrap();
                    if clones > 1 {
                        proptest::prop_assert!(matches!(f.delete(&s, e.clone()), Err(LvolError::Busy(_))));
                        vols.insert(name, e);
                        continue;
                    }
                    f.delete(&s, e).unwrap();
                    let gone = model.remove(i);
                    for m in model.iter_mut().filter(|m| m.parent.as_deref() == Some(&name)) {
                        m.parent = gone.parent.clone();
                    }
                    if model.is_empty() {
                        model.push(ModelVol { name: format!("v{n}"), snapshot: false, parent: None, content: vec![0; 16] });
                        vols.insert(format!("v{n}"), f.vol(&s, &format!("v{n}"), 1, true));
                    }
                }
                Op::Reopen => {
                    let (s2, v2) = f.reopen(s, std::mem::take(&mut vols).into_values().collect());
                    s = s2;
                    vols = v2;
                }
            }
            check_refs(&s);
            for m in &model {
                for c in 0..16u64 {
                    proptest::prop_assert_eq!(f.read(&vols[&m.name], c * bpc, 1)[0], m.content[c as usize], "{} cluster {}", m.name, c);
                }
            }
        }
        // Everything deleted, newest first (a snapshot then has at most the volume it was taken of).
        for m in model.iter().rev() {
            f.delete(&s, vols.remove(&m.name).unwrap()).unwrap();
        }
        proptest::prop_assert_eq!(s.free_clusters(), total);
        check_refs(&s);
    }
}

/// Snapshots map shared clusters again, and the metadata slot holds one entry per cluster plus
/// the volume records: a snapshot whose record would not fit is refused before anything changes,
/// and first writes fail as on a full pool (though clusters are free) until a delete makes room.
/// On the old code the seventh snapshot's record was larger than its slot and overwrote the
/// other slot.
#[test]
fn metadata_that_would_outgrow_its_slot_refuses_snapshots_and_first_writes_until_room_is_made() {
    let f = fixture(64 << 20);
    let g = f.base.claim("lvs").unwrap();
    // Small clusters: many references for little data.
    let s = f.cores.block_on(0, async move { Store::create(g, "lvs0", 4096, 2).await.unwrap() });
    let v = f.vol(&s, "a", 16, true);
    for mib in 0..16u64 {
        f.write(&v, mib * 2048, mib as u8 + 1, 2048).unwrap();
    }
    let mut snaps = Vec::new();
    let refused = loop {
        match f.snapshot(&s, &v, &format!("s{}", snaps.len())) {
            Ok(e) => snaps.push(e),
            Err(e) => break e,
        }
        assert!(snaps.len() < 8, "eight snapshots of 4,096 clusters each do not fit the slot, and none was refused");
    };
    assert!(matches!(&refused, LvolError::NoSpace(m) if m.contains("snapshot_name") && m.contains("metadata")), "{refused:?}");
    let n = snaps.len();
    assert!(n >= 1, "the first snapshot fits");
    assert_eq!(s.volume_count(), 1 + n, "the refused snapshot left nothing behind");
    check_refs(&s);

    // The record is nearly full: first writes to a new volume fail as on a full pool while
    // the pool still has free clusters; writes to allocated clusters go on.
    let b = f.vol(&s, "b", 16, true);
    let mut written = 0u64;
    let err = loop {
        match f.write(&b, written * 8, 0xB0, 8) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 4096, "the record never filled");
    };
    assert_eq!(err, BdevError::NoSpace);
    assert!(s.free_clusters() > 1000, "clusters are free: {}", s.free_clusters());
    f.write(&b, 0, 0xB1, 8).unwrap();
    check_refs(&s);

    let mut vols = vec![v, b];
    vols.extend(snaps);
    let (s, vols) = f.reopen(s, vols);
    assert_eq!(vols.len(), 2 + n);
    assert_eq!(f.read(&vols["a"], 15 * 2048, 1), vec![16u8; BS as usize]);
    assert_eq!(f.read(&vols["s0"], 0, 1), vec![1u8; BS as usize]);
    assert_eq!(f.read(&vols["b"], 0, 1), vec![0xB1; BS as usize]);
    // Deleting a snapshot makes room again.
    let (s0, b) = (vols["s0"].clone(), vols["b"].clone());
    drop(vols);
    f.delete(&s, s0).unwrap();
    f.write(&b, written * 8, 0xB2, 8).unwrap();
}

#[test]
fn a_grown_volume_still_copies_its_shared_clusters() {
    let f = fixture(8 << 20);
    let s = f.create();
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, 0, 0x11, 1).unwrap();
    let snap = f.snapshot(&s, &v, "snap").unwrap();
    let (s2, u) = (s.clone(), lvol(&v).lvol_uuid());
    f.cores.block_on(0, async move { s2.resize(&Channel::get(&s2.base).unwrap(), u, 2 << 20, false).await }).unwrap();
    f.write(&v, 0, 0x22, 1).unwrap();
    assert_eq!(f.read(&snap, 0, 1), vec![0x11; BS as usize], "the larger map kept the shared bit");
    assert_eq!(f.read(&v, 0, 1), vec![0x22; BS as usize]);
    check_refs(&s);
}

/// The pool simulation's seeds that found the four bugs fixed with it (`src/sim/lvol.rs`;
/// each fails on the code before its fix): 199, a writer whose entry another writer published
/// marked a new copy-on-write entry under the same key for commit (a panic, and a published
/// cluster not yet copied); 880, an unmap of a whole cluster racing a copy-on-write came back
/// with the unmapped data; 2699, inflate after a shrink mapped clusters past the end and the
/// store no longer opened; 9331, a snapshot recorded by another writer's commit before its
/// captured clusters were written read a reused cluster's old data after a crash; 5793 and
/// 6574, a crash during a thick volume's delete reopened with reservations above the free count.
#[test]
fn pool_simulation_seeds_that_found_bugs_pass() {
    for seed in [199, 880, 2699, 3213, 3312, 9331, 5793, 6574] {
        // Their schedule when they found the bugs (before the failed fills and the clones of
        // unsealed snapshots drew from the streams).
        if let Err(e) = crate::sim::lvol::run(seed, &crate::sim::lvol::Config::classic(seed)) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Seeds that found the session-32 bugs once the simulation failed zeroings and cloned
/// snapshots before their reply (each with its fix taken out, the rest kept): 12, 1589, 2262,
/// 3155 and 3285 (16 of 10,000), a snapshot kept the never-zeroed cluster of a captured first
/// write whose zeroing failed and read another write's old data (at its reply, or a volume
/// read through it later); 1029, 1031, 1138, 1179 and 1204 (191 of 10,000), a clone made of a
/// snapshot before its seal read, at its reply, what the snapshot's image was not (data still
/// landing, or a cluster not yet zeroed).
#[test]
fn pool_simulation_seeds_that_found_fill_and_clone_bugs_pass() {
    for seed in [12, 1589, 2262, 3155, 3285, 1029, 1031, 1138, 1179, 1204] {
        // Their schedule when they found the bugs (before deletes met writes in flight).
        let cfg = crate::sim::lvol::Config { delete_mid_write: false, ..crate::sim::lvol::Config::from_seed(seed) };
        if let Err(e) = crate::sim::lvol::run(seed, &cfg) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Seeds that found the session-34 bugs once deletes met writes in flight
/// ([`crate::sim::lvol::Config::delete_mid_write`]; 108 of the first 1,000 seeds failed): 0,
/// 125 and 134, a first write or copy pending at the delete was published into the volume that
/// was gone, its cluster never freed; 18 and 152, that publish went into a log record naming
/// the deleted volume, and the store no longer opened after a crash.
#[test]
fn pool_simulation_seeds_that_found_delete_bugs_pass() {
    for seed in [0, 18, 125, 134, 152] {
        let cfg = crate::sim::lvol::Config::from_seed(seed);
        assert!(cfg.delete_mid_write, "seed {seed} deletes with writes in flight");
        if let Err(e) = crate::sim::lvol::run(seed, &cfg) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Seeds that broke the strict snapshot rule (a write submitted before `bdev_lvol_snapshot` is
/// in its image whole) before a write took one epoch ticket and settled all its clusters at
/// submission: 1136, 1206, 1229, 1257 and 1273, a write over two clusters was half in the image
/// (its second cluster was looked up after the snapshot); 2110 and 4082, an unmap in flight
/// at the snapshot left its clusters in the image; 8738, two writes each waiting for the
/// other's cluster (found while making the fix: fills now come before a write's waits).
#[test]
fn writes_in_flight_at_a_snapshot_are_in_its_image_whole() {
    for seed in [1136, 1206, 1229, 1257, 1273, 2110, 4082, 8738] {
        let cfg = crate::sim::lvol::Config { strict_snapshots: true, ..crate::sim::lvol::Config::classic(seed) };
        if let Err(e) = crate::sim::lvol::run(seed, &cfg) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Seed 6527 (session 34, once deletes met writes in flight) broke the strict rule another
/// way: a write over two mapped clusters took the fast path, which looked its second cluster
/// up only at that piece's turn; a snapshot came, then an unmap of that cluster (submitted
/// after the snapshot), and the piece went to a new cluster, not the one the snapshot shares.
#[test]
fn a_write_over_mapped_clusters_settles_them_at_submission() {
    let cfg = crate::sim::lvol::Config { strict_snapshots: true, ..crate::sim::lvol::Config::from_seed(6527) };
    if let Err(e) = crate::sim::lvol::run(6527, &cfg) {
        panic!("seed 6527: {e}");
    }
}

// ---- the generic preserve interface (bdev_snapshot_*, backups) ----

/// What changed between two snapshots of one chain comes from their cluster maps: a cluster
/// rewritten (copied), first written or unmapped in between changed; one untouched did not.
#[test]
fn changed_ranges_come_from_the_cluster_maps() {
    use crate::preserve::Preservable;
    let f = fixture(8 << 20);
    let s = f.create();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    for c in 0..3 {
        f.write(&v, c * bpc, 0xA0 + c as u8, bpc as usize).unwrap();
    }
    let s1 = f.snapshot(&s, &v, "s1").unwrap();
    f.write(&v, bpc + 3, 0xB1, 1).unwrap(); // cluster 1: copied
    f.unmap(&v, 2 * bpc, bpc).unwrap(); // cluster 2: unmapped
    f.write(&v, 5 * bpc, 0xB5, 1).unwrap(); // cluster 5: first write
    let s2 = f.snapshot(&s, &v, "s2").unwrap();
    let (u1, u2) = (lvol(&s1).lvol_uuid(), lvol(&s2).lvol_uuid());
    let want = vec![(CL, 2 * CL), (5 * CL, CL)];
    assert_eq!(s.changed_ranges(u1, u2).unwrap(), want);
    assert!(matches!(s.changed_ranges(u2, u1), Err(LvolError::Invalid(_))), "the older one first");
    assert!(matches!(s.changed_ranges(u1, lvol(&v).lvol_uuid()), Err(LvolError::Invalid(_))), "snapshots only");
    // Through the trait, by name (`lvs/name` or `name`): the volume's snapshots, oldest epoch 1.
    let infos = lvol(&v).snapshots();
    let names: Vec<(String, u64, SnapshotState)> = infos.iter().map(|i| (i.name.clone(), i.epoch, i.state)).collect();
    assert_eq!(names, vec![("lvs0/s2".into(), 2, SnapshotState::Sealed), ("lvs0/s1".into(), 1, SnapshotState::Sealed)]);
    assert!(infos.iter().all(|i| i.creation_time_ms > 0 && i.time_to_seal_ns.is_some() && i.origin == "lvs0/a"));
    assert_eq!(lvol(&v).changed_ranges("lvs0/s1", "s2").unwrap(), want);
    assert_eq!(lvol(&v).seal_signal("s1").map(|s| s.get()), Some(SnapshotState::Sealed));
    // A snapshot of a clone is in another chain: no ranges against it.
    let c = f.clone_of(&s, &s1, "c").unwrap();
    f.write(&c, 0, 0xC0, 1).unwrap();
    let s3 = f.snapshot(&s, &c, "s3").unwrap();
    assert!(matches!(s.changed_ranges(lvol(&s2).lvol_uuid(), lvol(&s3).lvol_uuid()), Err(LvolError::Invalid(_))));
    assert_eq!(s.changed_ranges(u1, lvol(&s3).lvol_uuid()).unwrap(), vec![(0, CL)], "the clone's chain has s1");
    // s1 is in both chains but listed once, by the volume it was taken of.
    let listed = |vols: &[&Arc<BdevEntry>]| {
        let mut n: Vec<String> = vols.iter().flat_map(|v| lvol(v).snapshots()).map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(lvol(&c).snapshots().iter().map(|i| i.name.clone()).collect::<Vec<_>>(), vec!["lvs0/s3".to_string()]);
    assert_eq!(listed(&[&v, &c, &s1, &s2, &s3]), vec!["lvs0/s1", "lvs0/s2", "lvs0/s3"]);
    // Grown after s2: the new end changed too.
    let (s_, u) = (s.clone(), lvol(&v).lvol_uuid());
    f.cores.block_on(0, async move { s_.resize(&Channel::get(&s_.base).unwrap(), u, 2 << 20, false).await }).unwrap();
    let s4 = f.snapshot(&s, &v, "s4").unwrap();
    assert_eq!(s.changed_ranges(u2, lvol(&s4).lvol_uuid()).unwrap(), vec![(1 << 20, 1 << 20)]);
    check_refs(&s);
    // After a restart: the same ranges and order from the record alone, each snapshot listed
    // once (no origin known: s1 goes to one of the two chains that hold it), no creation time.
    let (s, vols) = f.reopen(s, vec![v, c, s1, s2, s3, s4]);
    let (u1, u2) = (lvol(&vols["s1"]).lvol_uuid(), lvol(&vols["s2"]).lvol_uuid());
    assert_eq!(s.changed_ranges(u1, u2).unwrap(), want);
    let all: Vec<&Arc<BdevEntry>> = vols.values().collect();
    assert_eq!(listed(&all), vec!["lvs0/s1", "lvs0/s2", "lvs0/s3", "lvs0/s4"]);
    let a = lvol(&vols["a"]).snapshots();
    assert_eq!(a.iter().find(|i| i.name == "lvs0/s4").map(|i| (i.epoch, i.creation_time_ms)), Some((3, 0)));
}

/// The pool's delete, through the trait: refused while clones depend on the snapshot.
#[test]
fn deleting_a_snapshot_with_clones_is_refused_by_the_trait_check() {
    use crate::preserve::Preservable;
    let f = fixture(8 << 20);
    let s = f.create();
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, 0, 1, 1).unwrap();
    let s1 = f.snapshot(&s, &v, "s1").unwrap();
    let _c = f.clone_of(&s, &s1, "c").unwrap();
    assert!(matches!(lvol(&v).check_delete("lvs0/s1"), Err(PreserveError::Busy(m)) if m.contains("clones")));
    assert!(matches!(lvol(&v).check_delete("lvs0/nope"), Err(PreserveError::NotFound(_))));
    let s2 = f.snapshot(&s, &v, "s2").unwrap();
    assert!(lvol(&v).check_delete("s2").is_ok(), "one clone (the volume) takes the snapshot's parent");
    drop(s2);
}

/// Whether `op` made the store write a whole record (into the other slot) rather than a log
/// record; `op` commits once.
fn wrote_whole_record(s: &Store, op: impl FnOnce()) -> bool {
    let (slot, commits) = (s.st().cur_slot, s.commits());
    op();
    assert_eq!(s.commits(), commits + 1, "the operation commits once");
    s.st().cur_slot != slot
}

#[test]
fn every_change_of_a_volume_record_writes_a_whole_record_and_writes_only_log_records() {
    let f = fixture(16 << 20);
    let s = f.create();
    let cl = CL / BS as u64;
    // Runs a store operation to its end.
    fn run<F: std::future::Future<Output = Result<(), LvolError>> + 'static>(f: &Fix, s: &Arc<Store>, op: impl FnOnce(Arc<Store>, Channel) -> F + 'static) {
        let s = s.clone();
        f.cores.block_on(0, async move { op(s.clone(), Channel::get(&s.base).unwrap()).await }).unwrap()
    }
    let mut a = None;
    assert!(wrote_whole_record(&s, || a = Some(f.vol(&s, "a", 1, true))), "create");
    let a = a.unwrap();
    let ua = lvol(&a).lvol_uuid();
    let mut next = 0u64;
    // A first write after each change: only a map changed, a log record says it.
    let mut first_write = || {
        assert!(!wrote_whole_record(&s, || f.write(&a, next * cl, 1, 1).unwrap()), "a first write after cluster {next}");
        next += 1;
    };
    first_write();
    let rename = move |s: Arc<Store>, ch: Channel| async move {
        s.update_volume(&ch, ua, |r, _| {
            r.name = "a2".into();
            Ok(())
        })
        .await
    };
    assert!(wrote_whole_record(&s, || run(&f, &s, rename)), "volume rename");
    first_write();
    assert!(wrote_whole_record(&s, || run(&f, &s, move |s, ch| async move { s.resize(&ch, ua, 2 << 20, false).await })), "resize");
    first_write();
    let mut snap = None;
    assert!(wrote_whole_record(&s, || snap = Some(f.snapshot(&s, &a, "snap").unwrap())), "snapshot");
    let snap = snap.unwrap();
    first_write();
    let mut c = None;
    assert!(wrote_whole_record(&s, || c = Some(f.clone_of(&s, &snap, "c").unwrap())), "clone");
    let c = c.unwrap();
    let uc = lvol(&c).lvol_uuid();
    first_write();
    assert!(wrote_whole_record(&s, || run(&f, &s, move |s, ch| async move { s.decouple(&ch, uc, "name").await })), "decouple");
    first_write();
    let us = lvol(&snap).lvol_uuid();
    assert!(wrote_whole_record(&s, || run(&f, &s, move |s, ch| async move { s.revert(&ch, ua, us).await })), "revert");
    first_write();
    assert!(wrote_whole_record(&s, || run(&f, &s, move |s, ch| async move { s.rename(&ch, "lvs1").await })), "store rename");
    first_write();
    let mut d = None;
    assert!(wrote_whole_record(&s, || d = Some(f.vol(&s, "d", 1, true))), "create");
    first_write();
    assert!(wrote_whole_record(&s, || f.delete(&s, d.take().unwrap()).unwrap()), "delete of an empty volume");
    first_write();
    let read_only = move |s: Arc<Store>, ch: Channel| async move {
        s.update_volume(&ch, us, |r, l| {
            r.read_only = true;
            l.read_only.store(true, Relaxed);
            Ok(())
        })
        .await
    };
    assert!(wrote_whole_record(&s, || run(&f, &s, read_only)), "set read-only");
    first_write();
    // What was committed is what opens.
    let before = s.volumes();
    let (s, _vols) = f.reopen(s, vec![a, snap, c]);
    assert_eq!(s.volumes(), before);
    assert_eq!(s.name(), "lvs1");
}

/// The check behind the records' generation: a record changed without moving it is caught at
/// the next commit that would have written a log record (instead of being lost from the
/// media until the next whole record).
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "a volume record changed without moving the records' generation")]
fn a_record_change_that_does_not_move_the_generation_is_caught() {
    let f = fixture(16 << 20);
    let s = f.create();
    let a = f.vol(&s, "a", 1, true);
    let ua = lvol(&a).lvol_uuid();
    f.write(&a, 0, 1, 1).unwrap();
    s.st().vols.rec_mut_uncounted(&ua).unwrap().name = "b".into();
    let _ = f.write(&a, CL / BS as u64, 1, 1);
}

/// Issue #14's goal of at most 64 bytes of metadata memory per allocated MiB, counted from
/// the structures (`Store::memory`) for the default 1 MiB clusters: a pool on a null bdev
/// (8 GiB, 8192 clusters) half filled by one thin volume written one block per cluster, in
/// order (the B-tree's worst usual fill), plus 100 empty thin volumes.
#[test]
fn metadata_memory_per_allocated_mib_is_within_the_goal() {
    const MIB: u64 = 1 << 20;
    let cores = ManualCores::new(2);
    let reg = BdevRegistry::new(2);
    let base = reg.register(Arc::new(crate::bdevs::null::NullBdev::new("n", ((8 << 30) + (4 << 20)) / BS as u64, BS, None).unwrap())).unwrap();
    let g = base.claim("lvs").unwrap();
    let s = cores.block_on(0, async move { Store::create(g, "lvs0", MIB, 2).await.unwrap() });
    let f = Fix { cores, reg, base };
    let empty = s.memory();
    let v = f.vol(&s, "v", 4096, true);
    let n = 4096;
    for c in 0..n {
        f.write(&v, c * (MIB / BS as u64), 1, 1).unwrap();
    }
    assert_eq!(s.volumes()[0].1, n);
    let fill = n as f64 / s.total_clusters() as f64;
    assert!((0.45..=0.55).contains(&fill), "the pool is half full: {n} of {} clusters", s.total_clusters());
    let full = s.memory();
    let per_mib = full.total() as f64 / n as f64;
    let marginal = (full.total() - empty.total()) as f64 / n as f64;
    let before_vols = full.total();
    let vols: Vec<_> = (0..100).map(|i| f.vol(&s, &format!("e{i}"), 1024, true)).collect();
    let per_vol = (s.memory().total() - before_vols) as f64 / vols.len() as f64;
    println!(
        "metadata memory: empty pool {empty:?}; with {n} allocated 1 MiB clusters of {} {full:?}: {per_mib:.1} bytes per allocated MiB \
         ({marginal:.1} without the empty pool's); {per_vol:.0} bytes per empty 1 GiB thin volume",
        s.total_clusters()
    );
    assert!(per_mib <= 64.0, "{per_mib:.1} bytes of metadata per allocated MiB (goal <= 64): {full:?}");
    // Dense maps: a live map chunk per 4096 clusters, 4 bytes an entry.
    assert!(full.live_maps - empty.live_maps <= n * 4 + 4096, "one 16 KiB chunk per 4096 clusters");
}

// ---- fills that fail under a snapshot, clones of a snapshot not yet sealed ----

/// What a data cluster holds before the store first writes it (see [`stale_fixture`]).
const STALE: u8 = 0xAB;

/// A store's base: an error bdev (`EE_m`) over a RAM bdev `m` whose every byte is [`STALE`]
/// before the store is made on it, as a freed cluster holds another volume's old data: a
/// cluster mapped without being zeroed, copied into or written reads it.
fn stale_fixture(base_bytes: u64) -> (Fix, Arc<crate::bdevs::error::Injections>, Arc<BdevEntry>) {
    let cores = ManualCores::new(2);
    let reg = BdevRegistry::new(2);
    let m = reg.register(Arc::new(MallocBdev::new("m", base_bytes / BS as u64, BS, None).unwrap())).unwrap();
    let m2 = m.clone();
    cores.block_on(0, async move { Channel::get(&m2).unwrap().write_buf(0, &vec![STALE; base_bytes as usize]).await.unwrap() });
    let e = crate::bdevs::error::ErrorBdev::new("EE_m".into(), m.claim("EE_m").unwrap(), None);
    let inj = e.injections().clone();
    let base = reg.register(Arc::new(e)).unwrap();
    (Fix { cores, reg, base }, inj, m)
}

/// What the RAM bdev holds now: what a restart would find (a RAM bdev has no volatile cache,
/// so this is the crash image at this instant).
async fn image_of(m: &Arc<BdevEntry>) -> Vec<u8> {
    let mut img = vec![0u8; (m.bdev().num_blocks() * BS as u64) as usize];
    Channel::get(m).unwrap().read_buf(0, &mut img).await.unwrap();
    img
}

/// The store a restart from `image` opens, and each volume's whole content by name.
fn open_image(image: Vec<u8>) -> BTreeMap<String, Vec<u8>> {
    let f = fixture(image.len() as u64);
    let base = f.base.clone();
    f.cores.block_on(0, async move { Channel::get(&base).unwrap().write_buf(0, &image).await.unwrap() });
    let s = f.load().unwrap();
    check_refs(&s);
    s.volumes()
        .into_iter()
        .map(|(r, _)| {
            let e = f.bdev(&s, r.uuid);
            let blocks = e.bdev().num_blocks() as usize;
            (r.name.clone(), f.read(&e, 0, blocks))
        })
        .collect()
}

/// The uuid of volume `name` (a snapshot not yet acknowledged has no bdev).
fn uuid_named(s: &Store, name: &str) -> Uuid {
    s.st().vols.values().find(|v| v.rec.name == name).map(|v| v.rec.uuid).unwrap()
}

/// A write in flight at a snapshot is captured by it (its clusters join the snapshot's map
/// before their fill); when the fill then fails, the snapshot must not keep a cluster that was
/// never zeroed or copied into: it would read another volume's old data, at once and, once
/// its record is durable, after a restart. Its image is what the volume held before the write
/// that failed: zeroes for a first write, the shared cluster for a copy-on-write. Before the
/// fix the snapshot read [`STALE`] at both.
#[test]
fn a_captured_write_whose_fill_fails_leaves_the_snapshot_its_image() {
    let (f, inj, _m) = stale_fixture(8 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    // Cluster 1 holds 0x22 and is shared with `s1`: a write to it copies it first.
    f.write(&v, bpc, 0x22, bpc as usize).unwrap();
    let s1 = f.snapshot(&s, &v, "s1").unwrap();
    let (s2, v2, ua) = (s.clone(), v.clone(), lvol(&v).lvol_uuid());
    let (w, snap) = f.cores.block_on(0, async move {
        // The write's first fill (zeroing cluster 0) hangs until cleared, then fails; the copy
        // of cluster 1 is planned but not begun (fills go one after the other).
        inj.set(IoType::WriteZeroes, crate::bdevs::error::ErrorType::Pending, 1);
        let w = crate::reactor::spawn(async move { Channel::get(&v2)?.write_buf(0, &vec![0x11; 2 * CL as usize]).await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        let s3 = s2.clone();
        let snap = crate::reactor::spawn(async move { s3.snapshot(&Channel::get(&s3.base).unwrap(), ua, "s2").await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        assert!(!snap.is_finished(), "the snapshot waits for the write it captured");
        assert_eq!(s2.st().pending.values().filter(|p| p.captured).count(), 2, "both clusters of the write are captured");
        inj.clear();
        (w.await, snap.await.map(|(u, _)| u))
    });
    assert!(w.is_err(), "the write whose fill failed fails");
    let snap = f.bdev(&s, snap.unwrap());
    let image = [vec![0u8; CL as usize], vec![0x22; CL as usize]].concat();
    assert_eq!(f.read(&snap, 0, 2 * bpc as usize), image, "the snapshot reads the volume's image before the failed write");
    assert_eq!(f.read(&v, 0, 2 * bpc as usize), image, "the volume too");
    check_refs(&s);
    assert_eq!(s.free_clusters(), total - 1, "the clusters of the failed fills are free again");
    let (s, vols) = f.reopen(s, vec![v, s1, snap]);
    check_refs(&s);
    assert_eq!(s.free_clusters(), total - 1);
    for name in ["a", "s2"] {
        assert_eq!(f.read(&vols[name], 0, 2 * bpc as usize), image, "{name} after a restart");
    }
    // A later write to the volume still works (its entries were given back whole).
    f.write(&vols["a"], 0, 0x33, 1).unwrap();
    assert_eq!(f.read(&vols["s2"], 0, 1), vec![0u8; BS as usize]);
    check_refs(&s);
}

/// `bdev_lvol_clone` of a snapshot whose captured first write is still filling: the clone
/// waits for the snapshot's image (what SPDK users expect: a clone made right after the
/// snapshot call holds the snapshot's image), and neither in memory nor after a crash at any
/// point does any volume read a cluster that was never zeroed. Before the fix the clone was
/// made and committed at once with the captured cluster in its map: it read [`STALE`], and so
/// did the store restarted from the crash image taken then (the clone, unlike its snapshot,
/// is not left out of the records).
#[test]
fn a_clone_of_a_snapshot_not_yet_sealed_waits_for_its_image() {
    let (f, inj, m) = stale_fixture(8 << 20);
    let s = f.create();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    let (s2, v2, ua) = (s.clone(), v.clone(), lvol(&v).lvol_uuid());
    let (w, snap, clone, crash, clone_waited) = f.cores.block_on(0, async move {
        inj.set(IoType::WriteZeroes, crate::bdevs::error::ErrorType::Pending, 1);
        let w = crate::reactor::spawn(async move { Channel::get(&v2)?.write_buf(0, &vec![0x11; CL as usize]).await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        let s3 = s2.clone();
        let snap = crate::reactor::spawn(async move { s3.snapshot(&Channel::get(&s3.base).unwrap(), ua, "snap").await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        let su = uuid_named(&s2, "snap");
        let s3 = s2.clone();
        let clone = crate::reactor::spawn(async move { s3.clone_volume(&Channel::get(&s3.base).unwrap(), su, "snap", "c").await });
        crate::reactor::sleep(std::time::Duration::from_millis(5)).await;
        // A crash now: what a restart finds.
        let crash = image_of(&m).await;
        let clone_waited = !clone.is_finished();
        inj.clear();
        (w.await, snap.await.map(|(u, _)| u), clone.await.map(|(u, _)| u), crash, clone_waited)
    });
    assert!(w.is_err(), "the write whose fill failed fails");
    let snap = f.bdev(&s, snap.unwrap());
    let c = f.bdev(&s, clone.unwrap());
    for (name, e) in [("snapshot", &snap), ("clone", &c), ("volume", &v)] {
        assert_eq!(f.read(e, 0, bpc as usize), vec![0u8; CL as usize], "the {name} reads zeroes where the failed first write was");
    }
    check_refs(&s);
    for (name, data) in open_image(crash) {
        assert!(!data.contains(&STALE), "after a crash while the clone was under way, {name} reads a cluster never zeroed");
    }
    assert!(clone_waited, "the clone waits for its snapshot's seal");
    let (s, vols) = f.reopen(s, vec![v, snap, c]);
    check_refs(&s);
    for (name, e) in &vols {
        assert_eq!(f.read(e, 0, bpc as usize), vec![0u8; CL as usize], "{name} after a restart");
    }
}

/// Issue #14, a leftover: a volume deleted while one of its writes is pending. The write (two
/// clusters: a first write to cluster 0, a copy-on-write of cluster 1, which snapshot `s1`
/// shares) is in flight at snapshot `s2`, which captures both clusters; then the volume is
/// deleted (as after `bdev_lvol_delete` unregistered its bdev: the write keeps its channel),
/// and the write's fill fails. `s2`'s image is what the volume held before the write: zeroes
/// at cluster 0, the copy-on-write's source (0x22) at cluster 1. Before the fix the delete
/// took cluster 1 out of the volume's map at once, so `abandon` found nothing there to set the
/// capturing snapshot back to and unmapped it: `s2` read zeroes at cluster 1, also after a
/// restart. Now a delete refuses new first writes to the volume and waits for its pending ones
/// to end (published or given back) before it drops its clusters.
#[test]
fn a_volume_deleted_while_a_captured_write_is_pending_leaves_the_snapshot_its_image() {
    let (f, inj, _m) = stale_fixture(8 << 20);
    let s = f.create();
    let total = s.total_clusters();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    f.write(&v, bpc, 0x22, bpc as usize).unwrap();
    let s1 = f.snapshot(&s, &v, "s1").unwrap();
    let (s2, v2, ua) = (s.clone(), v.clone(), lvol(&v).lvol_uuid());
    let (w, snap, del) = f.cores.block_on(0, async move {
        // The write's zeroing of cluster 0 hangs until cleared, then fails; the copy of
        // cluster 1 is planned (pending) and given back when that fill fails.
        inj.set(IoType::WriteZeroes, crate::bdevs::error::ErrorType::Pending, 1);
        let w = crate::reactor::spawn(async move { Channel::get(&v2)?.write_buf(0, &vec![0x11; 2 * CL as usize]).await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        let s3 = s2.clone();
        let snap = crate::reactor::spawn(async move { s3.snapshot(&Channel::get(&s3.base).unwrap(), ua, "s2").await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        assert_eq!(s2.st().pending.values().filter(|p| p.captured).count(), 2, "both clusters of the write are captured");
        let s3 = s2.clone();
        let del = crate::reactor::spawn(async move { s3.delete_volume(&Channel::get(&s3.base).unwrap(), ua).await });
        crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        inj.clear();
        (w.await, snap.await.map(|(u, _)| u), del.await)
    });
    assert!(w.is_err(), "the write whose fill failed fails");
    del.unwrap();
    let snap = f.bdev(&s, snap.unwrap());
    let image = [vec![0u8; CL as usize], vec![0x22; CL as usize]].concat();
    assert_eq!(f.read(&snap, 0, 2 * bpc as usize), image, "the snapshot reads the deleted volume's image before the failed write");
    check_refs(&s);
    assert_eq!(s.free_clusters(), total - 1, "only the copy-on-write's source is allocated (s1 and s2 share it)");
    drop(v);
    f.reg.unregister(&ua.to_string()).unwrap();
    let (s, vols) = f.reopen(s, vec![s1, snap]);
    check_refs(&s);
    assert_eq!(s.free_clusters(), total - 1);
    assert_eq!(f.read(&vols["s2"], 0, 2 * bpc as usize), image, "s2 after a restart");
}

/// Runs every core until idle with no simulated time passing, and returns the one timer set
/// then, which must be the injected hang's own 1 ms retry (`bdevs/error`): nothing in the pool
/// waits by timer (before, its waits re-checked on 50 µs to 1 ms sleeps).
fn idle_with_only_the_hang_timer(f: &Fix) -> u64 {
    f.cores.run_until_idle();
    let now = f.cores.now_ns();
    let t = f.cores.next_timer().expect("the injected hang retries on a timer");
    assert!(t >= now + 1_000_000, "a timer due in {} ns: a wait of the pool polls by timer", t - now);
    t
}

/// Ends the injected hang (its I/O fails) by firing its one timer, and runs every core until
/// idle: whatever waited for the hung I/O must be done by then, woken by events alone.
fn end_the_hang(f: &Fix, inj: &crate::bdevs::error::Injections, t: u64) {
    inj.clear();
    f.cores.advance_to(t);
    f.cores.run_until_idle();
    assert_eq!(f.cores.next_timer(), None, "no timer left once everything ended");
}

/// The pool's waits end at the event they wait for, arming no timer: a snapshot that captured
/// a first write whose fill hangs, a clone of that snapshot (`wait_sealed`) and a second write
/// to the captured cluster (`WaitPublish` with no generation yet); then a copy-on-write whose
/// source's snapshot epoch has a write in flight (`copy_cluster`); then a delete of a volume
/// with a first write pending. Each time the only timer is the injected hang's, and once that
/// one fires (the hung I/O fails) everything completes without time passing.
#[test]
fn waits_of_the_pool_end_at_their_events_not_by_timer() {
    use crate::bdevs::error::ErrorType;
    let (f, inj, _m) = stale_fixture(8 << 20);
    let s = f.create();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    let ua = lvol(&v).lvol_uuid();
    let write = |block: u64, byte: u8| {
        let v = v.clone();
        f.cores.enter(1, || crate::reactor::spawn(async move { Channel::get(&v)?.write_buf(block, &vec![byte; BS as usize]).await }))
    };

    // 1. A first write to cluster 0 hangs in its zeroing; a snapshot captures it.
    inj.set(IoType::WriteZeroes, ErrorType::Pending, 1);
    let w1 = write(0, 0x11);
    f.cores.run_until_idle();
    let s2 = s.clone();
    let snap = f.cores.enter(0, || crate::reactor::spawn(async move { s2.snapshot(&Channel::get(&s2.base).unwrap(), ua, "snap").await }));
    f.cores.run_until_idle();
    let su = uuid_named(&s, "snap");
    let s2 = s.clone();
    let clone = f.cores.enter(0, || crate::reactor::spawn(async move { s2.clone_volume(&Channel::get(&s2.base).unwrap(), su, "snap", "c").await }));
    let w2 = write(1, 0x22);
    let t = idle_with_only_the_hang_timer(&f);
    assert!(!snap.is_finished() && !clone.is_finished() && !w2.is_finished(), "all wait for the hung fill");
    end_the_hang(&f, &inj, t);
    assert!(w1.is_finished() && snap.is_finished() && clone.is_finished() && w2.is_finished(), "woken by the fill's end, not by a timer");
    let w1 = f.cores.block_on(0, w1);
    assert!(w1.is_err(), "the hung first write failed");
    let (snap, _) = f.cores.block_on(0, snap).unwrap();
    let (cu, _) = f.cores.block_on(0, clone).unwrap();
    f.cores.block_on(0, w2).unwrap();
    let (snap, c) = (f.bdev(&s, snap), f.bdev(&s, cu));
    assert_eq!(f.read(&snap, 0, 2), vec![0u8; 2 * BS as usize], "the snapshot holds the image before the failed write");
    assert_eq!(f.read(&c, 0, 2), vec![0u8; 2 * BS as usize], "the clone holds the snapshot's image");
    assert_eq!(f.read(&v, 1, 1), vec![0x22; BS as usize], "the second write landed");
    check_refs(&s);

    // 2. A write in place to cluster 0 hangs, holding its epoch; snapshot `snap2` closes that
    // epoch and shares the cluster; a write to it copies it once the epoch sealed.
    inj.set(IoType::Write, ErrorType::Pending, 1);
    let w3 = write(2, 0x33);
    f.cores.run_until_idle();
    let s2 = s.clone();
    let snap2 = f.cores.enter(0, || crate::reactor::spawn(async move { s2.snapshot(&Channel::get(&s2.base).unwrap(), ua, "snap2").await }));
    f.cores.run_until_idle();
    let w4 = write(3, 0x44);
    let t = idle_with_only_the_hang_timer(&f);
    assert!(!snap2.is_finished() && !w4.is_finished(), "the snapshot and the copy wait for the epoch's seal");
    assert_eq!(s.st().pending.len(), 1, "the copy-on-write is pending");
    end_the_hang(&f, &inj, t);
    assert!(w3.is_finished() && snap2.is_finished() && w4.is_finished(), "woken by the seal, not by a timer");
    assert!(f.cores.block_on(0, w3).is_err(), "the hung write failed");
    let (snap2, _) = f.cores.block_on(0, snap2).unwrap();
    f.cores.block_on(0, w4).unwrap();
    assert_eq!(s.st().vols.get(&ua).map(|x| x.live.copies.load(Relaxed)), Some(1), "cluster 0 was copied");
    let snap2 = f.bdev(&s, snap2);
    assert_eq!(f.read(&snap2, 1, 1), vec![0x22; BS as usize], "the copy's source is the snapshot's");
    assert_eq!(f.read(&v, 1, 3), [vec![0x22; BS as usize], vec![0u8; BS as usize], vec![0x44; BS as usize]].concat(), "the copy holds the volume");
    check_refs(&s);

    // 3. A first write to cluster 2 hangs; the volume's delete waits for it to end.
    inj.set(IoType::WriteZeroes, ErrorType::Pending, 1);
    let w5 = write(2 * bpc, 0x55);
    f.cores.run_until_idle();
    let s2 = s.clone();
    let del = f.cores.enter(0, || crate::reactor::spawn(async move { s2.delete_volume(&Channel::get(&s2.base).unwrap(), ua).await }));
    let t = idle_with_only_the_hang_timer(&f);
    assert!(!del.is_finished(), "the delete waits for the volume's pending first write");
    end_the_hang(&f, &inj, t);
    assert!(w5.is_finished() && del.is_finished(), "woken by the entry's end, not by a timer");
    assert!(f.cores.block_on(0, w5).is_err(), "the hung first write failed");
    f.cores.block_on(0, del).unwrap();
    assert!(s.live(ua).is_none(), "the volume is gone");
    check_refs(&s);
}

/// Writes and reads of clusters the volume holds alone allocate nothing, also across cluster
/// boundaries (the pieces' roles and buffer slices are inline, `Plan` and `Slices`): counted
/// by the process's allocator on this thread, which runs the simulated cores. The channel is
/// driven directly, as the bdev layer's per-I/O future is not the pool's to save.
#[test]
fn io_to_allocated_clusters_allocates_nothing_also_across_cluster_boundaries() {
    use crate::reactor::alloc;
    let f = fixture(8 << 20);
    let s = f.create();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 1, true);
    let u = lvol(&v).lvol_uuid();
    f.write(&v, 0, 0x11, 4 * bpc as usize).unwrap();
    let (s2, live) = (s.clone(), s.live(u).unwrap());
    let (counted, last) = f.cores.block_on(1, async move {
        let ch = LvolChannel { base: Channel::get(&s2.base).unwrap(), store: s2.clone(), live, uuid: u };
        // Two clusters (the last block of 0, the first of 1) and three (0's last, all of 1,
        // 2's first); the data in two slices, as a host's scattered buffers may come.
        let data: Vec<u8> = (0..(bpc + 2) * BS as u64).map(|i| (i / BS as u64) as u8).collect();
        let mut back = vec![0u8; data.len()];
        // Warm-up: the cores' run queues at their working size.
        for _ in 0..8 {
            io_across(&ch, &data, &mut back, 2).await;
            io_across(&ch, &data, &mut back, bpc + 2).await;
        }
        alloc::count_this_thread(true);
        let before = alloc::counted();
        for _ in 0..100 {
            io_across(&ch, &data, &mut back, 2).await;
            io_across(&ch, &data, &mut back, bpc + 2).await;
        }
        let n = alloc::counted() - before;
        alloc::count_this_thread(false);
        (n, back == data)
    });
    assert!(last, "the reads return what was written");
    assert_eq!(counted, 0, "allocations in 200 writes and 200 reads of mapped clusters across cluster boundaries");
}

/// A read or write within one mapped cluster, sent through the bdev layer as a target's command
/// is, allocates nothing: the volume passes it to the base in place (`LvolChannel::submit`),
/// with no future of its own. Also after a snapshot, for the reads of the now shared clusters.
#[test]
fn io_within_a_mapped_cluster_allocates_nothing_through_the_bdev_layer() {
    use crate::reactor::alloc;
    let f = fixture(8 << 20);
    let s = f.create();
    let bpc = CL / BS as u64;
    let v = f.vol(&s, "a", 2, true);
    f.write(&v, 0, 0x11, 2 * bpc as usize).unwrap();
    let v2 = v.clone();
    let io = move |write: bool| {
        let v = v2.clone();
        async move {
            let ch = Channel::get(&v).unwrap();
            let data = vec![0x5au8; BS as usize];
            let mut back = vec![0u8; BS as usize];
            let blocks = (0..400u64).map(|i| (i * 37) % (2 * bpc));
            for b in blocks.clone().take(16) {
                if write {
                    ch.write_buf(b, &data).await.unwrap();
                }
                ch.read_buf(b, &mut back).await.unwrap();
            }
            alloc::count_this_thread(true);
            let before = alloc::counted();
            let mut same = true;
            for b in blocks {
                if write {
                    ch.write_buf(b, &data).await.unwrap();
                }
                ch.read_buf(b, &mut back).await.unwrap();
                same &= back == data;
            }
            let n = alloc::counted() - before;
            alloc::count_this_thread(false);
            (n, same)
        }
    };
    let (counted, same) = f.cores.block_on(1, io(true));
    assert!(same, "each read returns the block just written");
    assert_eq!(counted, 0, "allocations in 400 writes and 400 reads within mapped clusters");
    f.snapshot(&s, &v, "s").unwrap();
    let (counted, same) = f.cores.block_on(1, io(false));
    assert!(same, "the shared clusters read what was written before the snapshot");
    assert_eq!(counted, 0, "allocations in 400 reads of clusters shared with a snapshot");
}

/// Writes the first `n` blocks of `data` from the last block of cluster 0 on (two clusters for
/// 2, three for a cluster and 2), then reads them back into `back`; in two slices each, as a
/// host's scattered buffers may come.
async fn io_across(ch: &LvolChannel, data: &[u8], back: &mut [u8], n: u64) {
    let (bpc, len) = (CL / BS as u64, (n * BS as u64) as usize);
    let (a, b) = data[..len].split_at(BS as usize);
    ch.write(bpc - 1, n, &[IoSlice::new(a), IoSlice::new(b)]).await.unwrap();
    let (x, y) = back[..len].split_at_mut(BS as usize);
    ch.read(bpc - 1, n, &mut [IoSliceMut::new(x), IoSliceMut::new(y)]).await.unwrap();
}
