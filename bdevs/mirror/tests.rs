//! Mirror tests on hand-stepped cores with malloc, error and delay legs.

use super::layout::{SlotState, Superblock, SUPERBLOCK_BYTES};
use super::*;
use crate::bdev::{BdevEntry, BdevRegistry, Channel, IoResult};
use crate::bdevs::delay::DelayBdev;
use crate::bdevs::error::{ErrorBdev, ErrorType, Injections};
use crate::bdevs::malloc::MallocBdev;
use crate::reactor::ManualCores;
use std::cell::RefCell;
use std::future::Future;

const BS: u32 = 512;
/// 8 MiB legs: 1 MiB of metadata, 7 MiB of data in 112 regions of 64 KiB.
const LEG_BLOCKS: u64 = 16384;
const REGION: u64 = 64 << 10;
const REGION_BLOCKS: u64 = REGION / BS as u64;

fn options() -> MirrorOptions {
    MirrorOptions {
        region_bytes: REGION,
        clean_interval_ns: 10_000_000,
        process: Some(Arc::new(ProcessOptions::new())),
        rejoin_interval_ns: 1_000_000_000,
        fencing: None,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Rig {
    cores: ManualCores,
    reg: BdevRegistry,
}

impl Rig {
    fn new(cores: usize) -> Rig {
        Rig { cores: ManualCores::new(cores), reg: BdevRegistry::new(cores) }
    }

    /// Runs `f` on `core` to completion, moving simulated time to the next timer whenever the
    /// cores are idle.
    fn run_on<T: 'static>(&self, core: usize, f: impl Future<Output = T> + 'static) -> T {
        self.cores.block_on(core, f)
    }

    fn run<T: 'static>(&self, f: impl Future<Output = T> + 'static) -> T {
        self.run_on(0, f)
    }

    /// Lets background work (rebuilds, cleaner) run for `ns` of simulated time.
    fn idle(&self, ns: u64) {
        let end = self.cores.now_ns() + ns;
        loop {
            self.cores.run_until_idle();
            match self.cores.next_timer() {
                Some(t) if t <= end => self.cores.advance_to(t.max(self.cores.now_ns())),
                _ => break,
            }
        }
        self.cores.advance_to(end);
        self.cores.run_until_idle();
    }

    fn malloc(&self, name: &str, blocks: u64) -> Arc<BdevEntry> {
        self.reg.register(Arc::new(MallocBdev::new(name, blocks, BS, None).unwrap())).unwrap()
    }

    /// A malloc leg under an error bdev: returns the error bdev's name and its injections.
    fn error_leg(&self, name: &str) -> (String, Arc<Injections>) {
        let base = self.malloc(name, LEG_BLOCKS).claim(&format!("EE_{name}")).unwrap();
        let e = ErrorBdev::new(format!("EE_{name}"), base, None);
        let inj = e.injections().clone();
        self.reg.register(Arc::new(e)).unwrap();
        (format!("EE_{name}"), inj)
    }

    /// A malloc leg under a delay bdev (write latency `us`).
    fn delay_leg(&self, name: &str, us: u64) -> String {
        let base = self.malloc(name, LEG_BLOCKS).claim(&format!("D_{name}")).unwrap();
        self.reg.register(Arc::new(DelayBdev::new(format!("D_{name}"), base, [us, us, us, us], None))).unwrap();
        format!("D_{name}")
    }

    fn try_mirror(&self, name: &str, legs: &[&str]) -> Result<Arc<MirrorBdev>, MirrorError> {
        let guards: Vec<HoldGuard> = legs.iter().map(|l| self.reg.get(l).unwrap().claim(name).unwrap()).collect();
        let n = name.to_string();
        let m = self.run(async move { MirrorBdev::assemble(&n, guards, Vec::new(), None, options()).await })?;
        self.reg.register(m.clone() as Arc<dyn Bdev>).unwrap();
        Ok(m)
    }

    fn mirror(&self, name: &str, legs: &[&str]) -> Arc<MirrorBdev> {
        self.try_mirror(name, legs).unwrap()
    }

    fn write(&self, bdev: &str, offset: u64, data: Vec<u8>) -> IoResult {
        let e = self.reg.get(bdev).unwrap();
        self.run(async move { Channel::get(&e).unwrap().write_buf(offset, &data).await })
    }

    fn read(&self, bdev: &str, offset: u64, len: usize) -> Result<Vec<u8>, BdevError> {
        let e = self.reg.get(bdev).unwrap();
        self.run(async move {
            let mut buf = vec![0u8; len];
            Channel::get(&e).unwrap().read_buf(offset, &mut buf).await.map(|_| buf)
        })
    }

    /// The data area of a leg (read from the bottom bdev, past any error/delay bdev).
    fn leg_data(&self, leg: &str, g: &Geometry) -> Vec<u8> {
        self.read(leg, g.data_offset, (g.data_blocks * BS as u64) as usize).unwrap()
    }

    fn superblock(&self, leg: &str) -> Option<Superblock> {
        let a = self.read(leg, 0, 4096).unwrap();
        let b = self.read(leg, 8, 4096).unwrap();
        Superblock::newest(Superblock::decode(&a[..SUPERBLOCK_BYTES]), Superblock::decode(&b[..SUPERBLOCK_BYTES]))
    }

    fn state_of(&self, m: &MirrorBdev, leg: &str) -> &'static str {
        m.status().slots.iter().find(|s| s.name == leg).map(|s| s.state).unwrap_or("absent")
    }
}

#[test]
fn writes_reach_every_leg_and_reads_come_back() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS + 100);
    let m = rig.mirror("m", &["a", "b"]);
    let g = m.geometry();
    assert_eq!(g.data_offset, 2048);
    assert_eq!(m.num_blocks(), LEG_BLOCKS - 2048, "the smallest leg sets the size");
    assert_eq!(g.num_regions, (LEG_BLOCKS - 2048) / REGION_BLOCKS);
    // Within a region, across a region boundary, and at the very end.
    let d1 = pattern(1, 4096);
    rig.write("m", 10, d1.clone()).unwrap();
    let d2 = pattern(2, 3 * 512);
    rig.write("m", REGION_BLOCKS - 1, d2.clone()).unwrap();
    let d3 = pattern(3, 512);
    rig.write("m", m.num_blocks() - 1, d3.clone()).unwrap();
    assert_eq!(rig.read("m", 10, 4096).unwrap(), d1);
    assert_eq!(rig.read("m", REGION_BLOCKS - 1, 1536).unwrap(), d2);
    assert_eq!(rig.read("m", m.num_blocks() - 1, 512).unwrap(), d3);
    assert!(matches!(rig.write("m", m.num_blocks(), vec![0; 512]), Err(BdevError::OutOfRange { .. })));
    // Unmap is write-zeroes on every leg.
    let e = rig.reg.get("m").unwrap();
    rig.run(async move { Channel::get(&e).unwrap().unmap(11, 2).await }).unwrap();
    let back = rig.read("m", 10, 4096).unwrap();
    assert_eq!(&back[..512], &d1[..512]);
    assert!(back[512..1536].iter().all(|&x| x == 0));
    assert_eq!(&back[1536..], &d1[1536..]);
    assert_eq!(rig.leg_data("a", &g), rig.leg_data("b", &g), "legs are identical");
    // Both legs carry the same superblock table; the first write to each clean region set a
    // write-intent bit.
    let (sa, sb) = (rig.superblock("a").unwrap(), rig.superblock("b").unwrap());
    assert_eq!(sa.name, "m");
    assert_eq!(sa.mirror_uuid, m.uuid());
    assert_eq!(sa.slots, sb.slots);
    assert_ne!(sa.leg_uuid, sb.leg_uuid);
    assert_eq!(m.status().dirty_regions, 3);
    assert!(m.status().active_legs() == 2 && !m.status().degraded());
    // The cleaner clears quiet regions' bits after one to two intervals.
    rig.idle(50_000_000);
    assert_eq!(m.status().dirty_regions, 0);
    assert!(m.shared().counters.regions_cleared.load(Relaxed) >= 3);
}

#[test]
fn a_failed_write_drops_the_leg_and_the_mirror_keeps_serving() {
    let rig = Rig::new(1);
    let (a, ia) = rig.error_leg("a");
    let (b, _) = rig.error_leg("b");
    let m = rig.mirror("m", &[&a, &b]);
    let g = m.geometry();
    rig.write("m", 0, pattern(1, 4096)).unwrap();
    ia.set(IoType::Write, ErrorType::Failure, 1);
    let d = pattern(2, 4096);
    rig.write("m", 5 * REGION_BLOCKS, d.clone()).expect("the write succeeds on the other leg");
    assert_eq!(rig.state_of(&m, &a), "failed");
    assert!(m.status().degraded());
    assert_eq!(m.status().active_legs(), 1);
    // The failure is durable on the surviving leg before the write completed.
    let sb = rig.superblock("b").unwrap();
    assert_eq!(sb.slots[0].state, SlotState::Failed);
    // The failed leg is released: its bdev is no longer claimed once in-flight I/O ended.
    rig.idle(2_000_000);
    assert_eq!(rig.reg.get(&a).unwrap().claimed_by(), None);
    // Reads and writes keep working, from and to the surviving leg only.
    assert_eq!(rig.read("m", 5 * REGION_BLOCKS, 4096).unwrap(), d);
    let d3 = pattern(3, 512);
    rig.write("m", 9 * REGION_BLOCKS, d3.clone()).unwrap();
    assert_eq!(rig.read("m", 9 * REGION_BLOCKS, 512).unwrap(), d3);
    let s = m.status();
    let failed = s.slots.iter().find(|x| x.name == a).unwrap();
    assert!(failed.stale_regions >= 2, "regions written since the leg left are recorded: {failed:?}");
    assert_eq!(rig.leg_data("b", &g)[(9 * REGION) as usize..(9 * REGION) as usize + 512], d3[..]);
}

#[test]
fn the_last_in_sync_leg_is_never_dropped_and_its_errors_reach_the_host() {
    let rig = Rig::new(1);
    let (a, ia) = rig.error_leg("a");
    let (b, ib) = rig.error_leg("b");
    let m = rig.mirror("m", &[&a, &b]);
    ib.set(IoType::Write, ErrorType::Failure, 1);
    rig.write("m", 0, pattern(1, 512)).unwrap();
    assert_eq!(rig.state_of(&m, &b), "failed");
    ia.set(IoType::Write, ErrorType::Failure, 1);
    assert_eq!(rig.write("m", 0, pattern(2, 512)), Err(BdevError::Media));
    assert_eq!(rig.state_of(&m, &a), "active");
    // The next write works again.
    rig.write("m", 0, pattern(3, 512)).unwrap();
    assert_eq!(rig.read("m", 0, 512).unwrap(), pattern(3, 512));
}

#[test]
fn a_read_error_is_retried_on_another_leg_and_repaired() {
    let rig = Rig::new(1);
    let (a, ia) = rig.error_leg("a");
    let (b, ib) = rig.error_leg("b");
    let (c, _) = rig.error_leg("c");
    let m = rig.mirror("m", &[&a, &b, &c]);
    let g = m.geometry();
    let d = pattern(7, 8192);
    rig.write("m", 100, d.clone()).unwrap();
    // Damage the data on a, and make its read fail: the read comes from another leg and a gets
    // the good data back.
    rig.write("a", g.data_offset + 100, vec![0xEE; 8192]).unwrap();
    ia.set(IoType::Read, ErrorType::Failure, 1);
    assert_eq!(rig.read("m", 100, 8192).unwrap(), d);
    assert_eq!(rig.read("a", g.data_offset + 100, 8192).unwrap(), d, "a was repaired");
    assert_eq!(m.shared().counters.read_repairs.load(Relaxed), 1);
    // Two legs fail the read: the third serves it, both get repaired.
    rig.write("a", g.data_offset + 100, vec![0xEE; 8192]).unwrap();
    rig.write("b", g.data_offset + 100, vec![0xDD; 8192]).unwrap();
    ia.set(IoType::Read, ErrorType::Failure, 1);
    ib.set(IoType::Read, ErrorType::Failure, 1);
    assert_eq!(rig.read("m", 100, 8192).unwrap(), d);
    assert_eq!(rig.read("a", g.data_offset + 100, 8192).unwrap(), d);
    assert_eq!(rig.read("b", g.data_offset + 100, 8192).unwrap(), d);
    assert_eq!(m.shared().counters.read_repairs.load(Relaxed), 3);
    assert_eq!(m.status().active_legs(), 3, "a repaired read error does not drop a leg");
    // A leg whose write-back fails is dropped.
    ia.set(IoType::Read, ErrorType::Failure, 1);
    ia.set(IoType::Write, ErrorType::Failure, 1);
    assert_eq!(rig.read("m", 100, 8192).unwrap(), d);
    assert_eq!(rig.state_of(&m, &a), "failed");
    // Every leg failing the read: the host gets the error.
    ib.set(IoType::Read, ErrorType::Failure, 1);
    let (_, ic) = (c.clone(), rig.reg.get(&c).unwrap());
    let _ = ic;
    assert_eq!(rig.state_of(&m, &b), "active");
}

/// Registers the bdevs behind `names` of `from` in a fresh registry on fresh cores, as if the
/// process had restarted on the same devices (the old mirror is abandoned: a crash).
fn restart(from: &Rig, names: &[&str]) -> Rig {
    let rig = Rig::new(from.cores.count());
    for n in names {
        let b = from.reg.get(n).unwrap().bdev().clone();
        rig.reg.register(b).unwrap();
    }
    rig
}

#[test]
fn a_cleanly_stopped_mirror_reassembles_from_its_legs() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    let d = pattern(4, 65536);
    rig.write("m", 3 * REGION_BLOCKS, d.clone()).unwrap();
    let m2 = m.clone();
    rig.run(async move { m2.shutdown().await });
    assert!(m.status().shut_down);
    assert_eq!(rig.write("m", 0, vec![0; 512]), Err(BdevError::Offline));
    assert_eq!(rig.reg.get("a").unwrap().claimed_by(), None, "legs are released");
    let gen = rig.superblock("a").unwrap().generation;

    let rig2 = restart(&rig, &["a", "b"]);
    let m = rig2.mirror("m", &["a", "b"]);
    assert_eq!(m.uuid(), rig.superblock("a").unwrap().mirror_uuid);
    let s = m.status();
    assert_eq!((s.dirty_regions, s.unsynced_regions, s.active_legs()), (0, 0, 2), "{s:?}");
    assert!(s.generation > gen);
    assert_eq!(rig2.read("m", 3 * REGION_BLOCKS, 65536).unwrap(), d);
}

/// Assembles mirror `name` on `legs` and reads its status in the same poll, before anything
/// else (the control task) has run: what an RPC sees right after `bdev_raid_create` replies.
fn status_when_assembled(rig: &Rig, name: &str, legs: &[&str]) -> (Arc<MirrorBdev>, MirrorStatus) {
    let guards: Vec<HoldGuard> = legs.iter().map(|l| rig.reg.get(l).unwrap().claim(name).unwrap()).collect();
    let n = name.to_string();
    rig.run(async move {
        let m = MirrorBdev::assemble(&n, guards, Vec::new(), None, options()).await.unwrap();
        let status = m.status();
        (m, status)
    })
}

/// The status lists the legs as soon as `assemble` returns, for a new mirror and for one
/// reassembled after a stop: `bdev_raid_get_bdevs` and `save_config` read it right after the
/// create replies, before the control task first runs. It used to be filled by the control
/// task only: a restart under load came back with `num_base_bdevs_operational` 0, and a
/// `save_config` then would have written the mirror without its legs.
#[test]
fn the_status_lists_the_legs_as_soon_as_assemble_returns() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let (m, s) = status_when_assembled(&rig, "m", &["a", "b"]);
    let legs = |s: &MirrorStatus| s.slots.iter().map(|x| (x.name.clone(), x.state)).collect::<Vec<_>>();
    assert_eq!(legs(&s), [("a".to_string(), "active"), ("b".to_string(), "active")], "{s:?}");
    assert_eq!(s.generation, 1);
    let m2 = m.clone();
    rig.run(async move { m2.shutdown().await });
    let rig2 = restart(&rig, &["a", "b"]);
    let (m, s) = status_when_assembled(&rig2, "m", &["a", "b"]);
    assert_eq!(legs(&s), [("a".to_string(), "active"), ("b".to_string(), "active")], "{s:?}");
    assert!(s.generation > 1 && s.active_legs() == 2, "{s:?}");
    assert_eq!(m.status().slots.len(), 2);
}

/// Assembles mirror `name` from `legs` with `missing` named by the configuration but absent.
fn mirror_missing(rig: &Rig, name: &str, legs: &[&str], missing: &[&str]) -> Arc<MirrorBdev> {
    let guards: Vec<HoldGuard> = legs.iter().map(|l| rig.reg.get(l).unwrap().claim(name).unwrap()).collect();
    let (n, missing) = (name.to_string(), missing.iter().map(|m| m.to_string()).collect());
    let m = rig.run(async move { MirrorBdev::assemble(&n, guards, missing, None, options()).await }).unwrap();
    rig.reg.register(m.clone() as Arc<dyn Bdev>).unwrap();
    m
}

fn saved_legs(m: &MirrorBdev) -> serde_json::Value {
    m.config_call().map(|(_, p)| p["base_bdevs"].clone()).unwrap_or_default()
}

/// A leg missing when the mirror is reassembled (its node down at a head restart) keeps the
/// name the configuration gave it: `bdev_raid_get_bdevs` shows it failed under that name and
/// `save_config` still lists it in slot order, so a restart from the saved configuration
/// looks for it again; when it exists again it returns to its slot with only what it missed.
/// It used to be left out of the saved configuration: the next restart forgot it for good.
#[test]
fn a_leg_missing_at_reassembly_keeps_its_name_in_the_saved_configuration() {
    let rig = Rig::new(1);
    for l in ["a", "b", "c"] {
        rig.malloc(l, LEG_BLOCKS);
    }
    let m = rig.mirror("m", &["a", "b", "c"]);
    let g = m.geometry();
    rig.write("m", 0, pattern(1, 4096)).unwrap();
    let m2 = m.clone();
    rig.run(async move { m2.shutdown().await });

    // Restart without b; the configuration names it.
    let rig2 = restart(&rig, &["a", "c"]);
    let m = mirror_missing(&rig2, "m", &["a", "c"], &["b"]);
    assert_eq!(rig2.state_of(&m, "b"), "failed", "{:?}", m.status());
    assert_eq!(saved_legs(&m), serde_json::json!(["a", "b", "c"]), "slot order, the missing leg included");
    let b_slot = describe(&m)["base_bdevs_list"].as_array().unwrap().iter().find(|x| x["name"] == "b").cloned().unwrap_or_default();
    assert_eq!((&b_slot["state"], &b_slot["is_configured"], &b_slot["slot"]), (&serde_json::json!("failed"), &serde_json::json!(false), &serde_json::json!(1)));
    rig2.write("m", 5 * REGION_BLOCKS, pattern(5, 4096)).unwrap();
    let m2 = m.clone();
    rig2.run(async move { m2.shutdown().await });

    // Restarted again from that configuration, b still away: still named.
    let rig3 = restart(&rig2, &["a", "c"]);
    let m = mirror_missing(&rig3, "m", &["a", "c"], &["b"]);
    assert_eq!(saved_legs(&m), serde_json::json!(["a", "b", "c"]));
    rig3.write("m", 9 * REGION_BLOCKS, pattern(9, 4096)).unwrap();
    // A name the superblocks have no missing leg for is not made a leg.
    let m2 = m.clone();
    rig3.run(async move { m2.shutdown().await });
    let rig4 = restart(&rig3, &["a", "c"]);
    let m = mirror_missing(&rig4, "m", &["a", "c"], &["b", "x"]);
    assert_eq!(saved_legs(&m), serde_json::json!(["a", "b", "c"]));

    // b is back: it returns to its slot and gets the two regions written without it.
    let b = rig.reg.get("b").unwrap().bdev().clone();
    rig4.reg.register(b).unwrap();
    let guard = rig4.reg.get("b").unwrap().claim("m").unwrap();
    let m2 = m.clone();
    let added = rig4.run(async move { m2.add_leg(guard).await }).unwrap();
    assert_eq!(added, AddedLeg { slot: 1, returning: true, regions_to_copy: 2 });
    rig4.idle(100_000_000);
    assert_eq!(rig4.state_of(&m, "b"), "active");
    assert_eq!(rig4.leg_data("a", &g), rig4.leg_data("b", &g));
    assert_eq!(saved_legs(&m), serde_json::json!(["a", "b", "c"]));
}

#[test]
fn after_a_crash_regions_in_flight_are_read_from_one_leg_then_resynchronised() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    let g = m.geometry();
    let d = pattern(5, 4096);
    rig.write("m", 3 * REGION_BLOCKS, d.clone()).unwrap();
    rig.write("m", 8 * REGION_BLOCKS, pattern(6, 512)).unwrap();
    assert_eq!(m.status().dirty_regions, 2);
    // The crash left a write on b only (it was never acknowledged).
    rig.write("b", g.data_offset + 3 * REGION_BLOCKS, pattern(99, 4096)).unwrap();

    let rig2 = restart(&rig, &["a", "b"]);
    let m = rig2.mirror("m", &["a", "b"]);
    // Reassembly starts the resync at once; before it ran, reads of the region agree.
    let s = m.status();
    assert_eq!(s.dirty_regions, 2, "{s:?}");
    let first = rig2.read("m", 3 * REGION_BLOCKS, 4096).unwrap();
    for _ in 0..4 {
        assert_eq!(rig2.read("m", 3 * REGION_BLOCKS, 4096).unwrap(), first, "reads of an unsynced region come from one leg");
    }
    rig2.idle(100_000_000);
    let s = m.status();
    assert_eq!(s.unsynced_regions, 0, "{s:?}");
    assert_eq!(rig2.leg_data("a", &g), rig2.leg_data("b", &g), "legs are identical after the resync");
    assert_eq!(rig2.read("m", 3 * REGION_BLOCKS, 4096).unwrap(), first);
    assert!(s.process.is_none());
}

#[test]
fn a_returning_leg_gets_only_what_it_missed_and_a_new_leg_everything() {
    let rig = Rig::new(1);
    let (a, _) = rig.error_leg("a");
    let (b, ib) = rig.error_leg("b");
    let m = rig.mirror("m", &[&a, &b]);
    let g = m.geometry();
    for r in 0..10 {
        rig.write("m", r * REGION_BLOCKS, pattern(r, 4096)).unwrap();
    }
    rig.idle(50_000_000);
    assert_eq!(m.status().dirty_regions, 0);
    ib.set(IoType::Write, ErrorType::Failure, 1);
    rig.write("m", 20 * REGION_BLOCKS, pattern(20, 4096)).unwrap();
    rig.write("m", 30 * REGION_BLOCKS, pattern(30, 4096)).unwrap();
    rig.write("m", 31 * REGION_BLOCKS + 5, pattern(31, 512)).unwrap();
    assert_eq!(rig.state_of(&m, &b), "failed");
    rig.idle(2_000_000);
    let guard = rig.reg.get(&b).unwrap().claim("m").unwrap();
    let m2 = m.clone();
    let added = rig.run(async move { m2.add_leg(guard).await }).unwrap();
    assert_eq!(added, AddedLeg { slot: 1, returning: true, regions_to_copy: 3 });
    rig.idle(100_000_000);
    assert_eq!(rig.state_of(&m, &b), "active");
    assert_eq!(rig.leg_data("a", &g), rig.leg_data("b", &g));
    assert_eq!(m.shared().counters.rebuilt_regions.load(Relaxed), 3);

    // A blank leg is copied in full.
    rig.malloc("c", LEG_BLOCKS);
    let guard = rig.reg.get("c").unwrap().claim("m").unwrap();
    let m2 = m.clone();
    let added = rig.run(async move { m2.add_leg(guard).await }).unwrap();
    assert_eq!(added, AddedLeg { slot: 2, returning: false, regions_to_copy: g.num_regions });
    rig.idle(200_000_000);
    assert_eq!(rig.state_of(&m, "c"), "active");
    assert!(!m.status().degraded());
    assert_eq!(rig.leg_data("a", &g), rig.leg_data("c", &g));
    let sb = rig.superblock("c").unwrap();
    assert_eq!(sb.slots[2].state, SlotState::Active);
}

#[test]
fn host_writes_during_a_rebuild_end_up_on_every_leg() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    let g = m.geometry();
    for r in 0..g.num_regions {
        rig.write("m", r * REGION_BLOCKS + 7, pattern(r, 1024)).unwrap();
    }
    // Slow the copy down (7 MiB at 20 MiB/s) so that it runs alongside the host.
    m.shared().process_options().max_bandwidth_mb_sec.store(20, Relaxed);
    rig.malloc("c", LEG_BLOCKS);
    let guard = rig.reg.get("c").unwrap().claim("m").unwrap();
    let m2 = m.clone();
    rig.run(async move { m2.add_leg(guard).await }).unwrap();
    assert_eq!(rig.state_of(&m, "c"), "rebuilding");
    // A writer keeps writing all over the volume while the copy runs.
    let e = rig.reg.get("m").unwrap();
    let n = g.num_regions;
    let during = Rc::new(std::cell::Cell::new(0u32));
    let (d2, m3) = (during.clone(), m.clone());
    rig.cores.enter(0, || {
        crate::reactor::spawn_detached(async move {
            let ch = Channel::get(&e).unwrap();
            for i in 0..400u64 {
                let r = (i * 37) % n;
                ch.write_buf(r * REGION_BLOCKS + (i % 64), &pattern(1000 + i, 2048)).await.unwrap();
                if m3.status().process.is_some() {
                    d2.set(d2.get() + 1);
                }
                crate::reactor::sleep(std::time::Duration::from_micros(500)).await;
            }
        })
    });
    rig.idle(1_000_000_000);
    assert!(during.get() > 300, "only {} writes ran during the rebuild", during.get());
    assert_eq!(rig.state_of(&m, "c"), "active");
    let a = rig.leg_data("a", &g);
    assert_eq!(a, rig.leg_data("b", &g));
    assert_eq!(a, rig.leg_data("c", &g));
}

#[test]
fn the_rebuild_rate_limit_holds() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    let g = m.geometry();
    rig.malloc("c", LEG_BLOCKS);
    let guard = rig.reg.get("c").unwrap().claim("m").unwrap();
    m.shared().process_options().max_bandwidth_mb_sec.store(7, Relaxed);
    let m2 = m.clone();
    let t0 = rig.cores.now_ns();
    rig.run(async move { m2.add_leg(guard).await }).unwrap();
    // 7 MiB at 7 MiB/s: about a second of simulated time.
    rig.idle(500_000_000);
    assert_eq!(rig.state_of(&m, "c"), "rebuilding");
    let p = m.status().process.unwrap();
    assert!(p.done_regions > 0 && p.done_regions < g.num_regions, "{p:?}");
    rig.idle(700_000_000);
    assert_eq!(rig.state_of(&m, "c"), "active", "took {} ms", (rig.cores.now_ns() - t0) / 1_000_000);
}

#[test]
fn a_removed_leg_comes_back_incrementally() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    let g = m.geometry();
    rig.write("m", 0, pattern(1, 4096)).unwrap();
    rig.idle(50_000_000);
    let m2 = m.clone();
    rig.run(async move { m2.remove_leg("b").await }).unwrap();
    assert_eq!(rig.state_of(&m, "b"), "removed");
    let m2 = m.clone();
    assert!(matches!(rig.run(async move { m2.remove_leg("a").await }), Err(MirrorError::Busy(_))), "the last in-sync leg stays");
    rig.idle(2_000_000);
    assert_eq!(rig.reg.get("b").unwrap().claimed_by(), None);
    rig.write("m", 9 * REGION_BLOCKS, pattern(9, 512)).unwrap();
    let guard = rig.reg.get("b").unwrap().claim("m").unwrap();
    let m2 = m.clone();
    let added = rig.run(async move { m2.add_leg(guard).await }).unwrap();
    assert_eq!(added, AddedLeg { slot: 1, returning: true, regions_to_copy: 1 });
    rig.idle(50_000_000);
    assert_eq!(rig.leg_data("a", &g), rig.leg_data("b", &g));
}

#[test]
fn adding_a_bad_leg_changes_nothing() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    rig.malloc("small", LEG_BLOCKS - 1);
    let m = rig.mirror("m", &["a", "b"]);
    let before = m.status();
    let guard = rig.reg.get("small").unwrap().claim("m").unwrap();
    let m2 = m.clone();
    let e = rig.run(async move { m2.add_leg(guard).await }).unwrap_err();
    assert!(matches!(&e, MirrorError::Invalid(msg) if msg.contains("too small")), "{e:?}");
    assert_eq!(rig.reg.get("small").unwrap().claimed_by(), None);
    assert_eq!(m.status().slots.len(), before.slots.len());
    assert_eq!(m.status().generation, before.generation);
    // A new mirror needs two legs that exist; a leg cannot be in two mirrors.
    assert!(rig.try_mirror("m1", &["small"]).is_err());
    assert!(rig.reg.get("a").unwrap().claim("m2").is_err());
}

#[test]
fn a_leg_written_by_another_format_version_is_refused_not_overwritten() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    let m2 = m.clone();
    rig.run(async move { m2.shutdown().await });
    // Leg "a" as a later tidemark would leave it: both copies of another version, intact.
    for copy in [0u64, 8] {
        let mut sb = rig.read("a", copy, 4096).unwrap();
        sb[8..12].copy_from_slice(&(super::layout::VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&sb[..SUPERBLOCK_BYTES - 4]);
        sb[SUPERBLOCK_BYTES - 4..SUPERBLOCK_BYTES].copy_from_slice(&crc.to_le_bytes());
        rig.write("a", copy, sb).unwrap();
    }
    let before = rig.read("a", 0, 8192).unwrap();
    let rig2 = restart(&rig, &["a", "b"]);
    let Err(e) = rig2.try_mirror("m", &["a", "b"]) else { panic!("assembled on a leg of another format version") };
    assert!(matches!(&e, MirrorError::Invalid(msg) if msg.contains("a holds a mirror superblock of format version 2")), "{e:?}");
    assert_eq!(rig2.read("a", 0, 8192).unwrap(), before, "the foreign superblock is left as it was");
    // Also as a new mirror's leg: no assemble overwrites it.
    assert!(rig2.try_mirror("other", &["a", "b"]).is_err());
    assert_eq!(rig2.read("a", 0, 8192).unwrap(), before);
}

/// Splits `leg` off `m` as image `image` and registers the image.
fn split(rig: &Rig, m: &Arc<MirrorBdev>, leg: &str, image: &str) -> Result<(), MirrorError> {
    let (m2, l, i) = (m.clone(), leg.to_string(), image.to_string());
    let sealed = rig.run(async move { m2.split(&l, &i).await })?;
    let img = SplitImageBdev::from_sealed(image, sealed, m.uuid())?;
    rig.reg.register(Arc::new(img)).unwrap();
    Ok(())
}

#[test]
fn a_split_leg_is_sealed_as_an_image_and_rejoins_incrementally() {
    let rig = Rig::new(1);
    for l in ["a", "b", "c"] {
        rig.malloc(l, LEG_BLOCKS);
    }
    let m = rig.mirror("m", &["a", "b", "c"]);
    let g = m.geometry();
    let (p2, p5) = (pattern(2, 4096), pattern(5, 4096));
    rig.write("m", 2 * REGION_BLOCKS, p2.clone()).unwrap();
    rig.write("m", 5 * REGION_BLOCKS, p5.clone()).unwrap();
    split(&rig, &m, "c", "snap").unwrap();
    let s = m.status();
    assert_eq!(rig.state_of(&m, "c"), "split");
    assert_eq!(s.active_legs(), 2);
    assert!(!s.degraded(), "three legs minus a split one stay redundant");
    assert_eq!(rig.reg.get("c").unwrap().claimed_by().as_deref(), Some("snap"));
    // New writes go to the mirror only.
    let q5 = pattern(55, 4096);
    rig.write("m", 5 * REGION_BLOCKS, q5.clone()).unwrap();
    rig.write("m", 7 * REGION_BLOCKS, pattern(7, 512)).unwrap();
    assert_eq!(rig.read("snap", 2 * REGION_BLOCKS, 4096).unwrap(), p2);
    assert_eq!(rig.read("snap", 5 * REGION_BLOCKS, 4096).unwrap(), p5);
    assert_eq!(rig.read("snap", 7 * REGION_BLOCKS, 512).unwrap(), vec![0; 512]);
    assert_eq!(rig.read("m", 5 * REGION_BLOCKS, 4096).unwrap(), q5);
    assert_eq!(rig.write("snap", 0, vec![1; 512]), Err(BdevError::ReadOnly));
    // To copy back at re-join: the regions written while split (5, 7), and region 2, whose
    // write-intent bit was still set at the split (the split closes no region, so it starts the
    // leg's list from the bitmap: a write may enter such a region without asking).
    assert_eq!(m.status().slots.iter().find(|x| x.name == "c").unwrap().stale_regions, 3);
    // The image's own superblock says what it is.
    let sb = rig.superblock("c").unwrap();
    assert_ne!(sb.flags & super::layout::FLAG_SEALED_SPLIT, 0);
    assert_eq!(sb.slots[2].image, "snap");
    // Re-join: the image goes, the leg gets those three regions (not the whole leg).
    let img = rig.reg.unregister("snap").unwrap();
    drop(img);
    let guard = rig.reg.get("c").unwrap().claim("m").unwrap();
    let m2 = m.clone();
    let added = rig.run(async move { m2.add_leg(guard).await }).unwrap();
    assert_eq!(added, AddedLeg { slot: 2, returning: true, regions_to_copy: 3 });
    rig.idle(50_000_000);
    assert_eq!(rig.state_of(&m, "c"), "active");
    assert_eq!(rig.leg_data("a", &g), rig.leg_data("c", &g));
}

#[test]
fn writes_in_flight_at_the_split_are_in_the_image_and_later_ones_are_not() {
    let rig = Rig::new(1);
    let legs: Vec<String> = ["a", "b", "c"].iter().map(|l| rig.delay_leg(l, 10)).collect();
    let names: Vec<&str> = legs.iter().map(|s| s.as_str()).collect();
    let m = rig.mirror("m", &names);
    let slow = |us: u64| {
        for l in &legs {
            let e = rig.reg.get(l).unwrap();
            let d = e.bdev().as_any().downcast_ref::<DelayBdev>().unwrap();
            d.latencies().0[crate::bdevs::delay::AVG_WRITE].store(us, Relaxed);
            d.latencies().0[crate::bdevs::delay::P99_WRITE].store(us, Relaxed);
        }
    };
    // W1: a slow write in flight across the split (its region is dirty already, so it goes
    // straight to the legs).
    rig.write("m", 4 * REGION_BLOCKS + 100, pattern(9, 512)).unwrap();
    slow(2000);
    let w1 = pattern(1, 4096);
    let e = rig.reg.get("m").unwrap();
    let done1 = Rc::new(std::cell::Cell::new(false));
    let (d1, e1, w1c) = (done1.clone(), e.clone(), w1.clone());
    rig.cores.enter(0, || {
        crate::reactor::spawn_detached(async move {
            Channel::get(&e1).unwrap().write_buf(4 * REGION_BLOCKS, &w1c).await.unwrap();
            d1.set(true);
        })
    });
    rig.cores.run_until_idle();
    slow(10);
    // The split starts; W2, submitted after it, completes long before W1.
    let (m2, out) = (m.clone(), Rc::new(RefCell::new(None)));
    let o = out.clone();
    rig.cores.enter(0, || crate::reactor::spawn_detached(async move { *o.borrow_mut() = Some(m2.split(&"D_c".to_string(), "snap").await) }));
    // Until the split's epoch started, the leg takes every write; run until it has.
    loop {
        rig.cores.run_until_idle();
        if m.shared().slots[2].mode() == LegMode::OldEpoch {
            break;
        }
        rig.cores.advance_to(rig.cores.next_timer().unwrap());
    }
    let w2 = pattern(2, 512);
    rig.write("m", 4 * REGION_BLOCKS + 64, w2.clone()).unwrap();
    assert!(!done1.get(), "W1 is still in flight");
    assert!(out.borrow().is_none(), "not sealed while W1 is in flight");
    rig.idle(5_000_000);
    assert!(done1.get());
    let sealed = out.borrow_mut().take().expect("sealed once W1 completed").unwrap();
    rig.reg.register(Arc::new(SplitImageBdev::from_sealed("snap", sealed, m.uuid()).unwrap())).unwrap();
    assert_eq!(rig.read("snap", 4 * REGION_BLOCKS, 4096).unwrap(), w1, "the old-epoch write is in the image");
    assert_eq!(rig.read("snap", 4 * REGION_BLOCKS + 64, 512).unwrap(), vec![0; 512], "the new-epoch write is not");
    assert_eq!(rig.read("m", 4 * REGION_BLOCKS + 64, 512).unwrap(), w2);
    assert_eq!(rig.read("m", 4 * REGION_BLOCKS, 4096).unwrap(), w1);
}

#[test]
fn splitting_the_last_in_sync_leg_or_twice_is_refused() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.mirror("m", &["a", "b"]);
    split(&rig, &m, "b", "s1").unwrap();
    let gen = m.status().generation;
    assert!(matches!(split(&rig, &m, "a", "s2"), Err(MirrorError::Invalid(msg)) if msg.contains("last in-sync")));
    assert!(matches!(split(&rig, &m, "b", "s2"), Err(MirrorError::Invalid(_))), "b is no longer a leg");
    assert!(matches!(split(&rig, &m, "zz", "s2"), Err(MirrorError::Invalid(_))));
    assert_eq!(m.status().generation, gen, "nothing changed");
    assert_eq!(rig.state_of(&m, "a"), "active");
    // Writes still work on the single leg left.
    rig.write("m", 0, pattern(1, 512)).unwrap();
}

#[test]
fn a_sealed_image_opens_again_after_a_restart() {
    let rig = Rig::new(1);
    for l in ["a", "b", "c"] {
        rig.malloc(l, LEG_BLOCKS);
    }
    let m = rig.mirror("m", &["a", "b", "c"]);
    let d = pattern(3, 4096);
    rig.write("m", 0, d.clone()).unwrap();
    split(&rig, &m, "c", "snap").unwrap();
    rig.write("m", 0, pattern(4, 4096)).unwrap();
    let rig2 = restart(&rig, &["a", "b", "c"]);
    // Giving the split leg to the mirror does not re-join it.
    let m = rig2.mirror("m", &["a", "b", "c"]);
    assert_eq!(rig2.state_of(&m, "c"), "absent");
    assert_eq!(m.status().slots.iter().find(|s| s.state == "split").map(|s| s.image.clone()), Some("snap".to_string()));
    assert_eq!(rig2.reg.get("c").unwrap().claimed_by(), None);
    let guard = rig2.reg.get("c").unwrap().claim("snap").unwrap();
    let img = rig2.run(async move { SplitImageBdev::open("snap", guard).await }).unwrap();
    rig2.reg.register(Arc::new(img)).unwrap();
    assert_eq!(rig2.read("snap", 0, 4096).unwrap(), d);
    assert_eq!(rig2.read("m", 0, 4096).unwrap(), pattern(4, 4096));
    // A leg that is not an image does not open as one.
    let guard = rig2.reg.get("a").unwrap();
    assert!(guard.claim("x").is_err(), "a is claimed by the mirror");
}

#[test]
fn writes_from_another_core_go_through_the_home_core() {
    let rig = Rig::new(2);
    let (a, ia) = rig.error_leg("a");
    let (b, _) = rig.error_leg("b");
    let m = rig.mirror("m", &[&a, &b]);
    assert_eq!(m.home_core(), 0);
    let g = m.geometry();
    let e = rig.reg.get("m").unwrap();
    let d = pattern(8, 4096);
    let (e1, d1) = (e.clone(), d.clone());
    rig.run_on(1, async move { Channel::get(&e1).unwrap().write_buf(REGION_BLOCKS * 3, &d1).await }).unwrap();
    ia.set(IoType::Write, ErrorType::Failure, 1);
    let e1 = e.clone();
    rig.run_on(1, async move { Channel::get(&e1).unwrap().write_buf(REGION_BLOCKS * 4, &[7u8; 512]).await }).unwrap();
    assert_eq!(rig.state_of(&m, &a), "failed");
    let e1 = e.clone();
    let back = rig.run_on(1, async move {
        let mut buf = vec![0u8; 4096];
        Channel::get(&e1).unwrap().read_buf(REGION_BLOCKS * 3, &mut buf).await.map(|_| buf)
    });
    assert_eq!(back.unwrap(), d);
    assert_eq!(rig.leg_data("b", &g)[(3 * REGION) as usize..(3 * REGION) as usize + 4096], d[..]);
}

#[test]
fn a_failed_leg_rejoins_by_itself_once_it_answers_again_and_only_then() {
    let rig = Rig::new(1);
    let (a, _) = rig.error_leg("a");
    let (b, ib) = rig.error_leg("b");
    let m = rig.mirror("m", &[&a, &b]);
    let g = m.geometry();
    for r in 0..10 {
        rig.write("m", r * REGION_BLOCKS, pattern(r, 4096)).unwrap();
    }
    rig.idle(50_000_000);
    // b fails every write: it is dropped, and attempts to take it back fail (its metadata
    // cannot be written), backing off.
    ib.set(IoType::Write, ErrorType::Failure, 0);
    rig.write("m", 20 * REGION_BLOCKS, pattern(20, 4096)).unwrap();
    rig.write("m", 30 * REGION_BLOCKS, pattern(30, 4096)).unwrap();
    assert_eq!(rig.state_of(&m, &b), "failed");
    rig.idle(5_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "failed", "a leg that still fails writes stays out");
    // Healed: it comes back by itself, with only what it missed.
    ib.clear();
    rig.idle(10_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "active");
    let s = m.status().slots.into_iter().find(|s| s.name == b).unwrap();
    assert_eq!((s.rejoins_auto, s.rejoins_rpc), (1, 0));
    assert_eq!(s.last_rejoin, Some(("auto", 2)), "only the two regions written while it was out");
    assert_eq!(rig.leg_data(&a, &g), rig.leg_data(&b, &g));

    // Removed by the operator: never taken back by itself.
    let m2 = m.clone();
    let b2 = b.clone();
    rig.run(async move { m2.remove_leg(&b2).await }).unwrap();
    rig.idle(5_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "removed");
    let guard = rig.reg.get(&b).unwrap().claim("m").unwrap();
    let m2 = m.clone();
    assert!(rig.run(async move { m2.add_leg(guard).await }).unwrap().returning);
    rig.idle(1_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "active");

    // With auto_rejoin off, a failed leg stays out until it is added.
    m.shared().process_options().auto_rejoin.store(false, Relaxed);
    ib.set(IoType::Write, ErrorType::Failure, 1);
    rig.write("m", 40 * REGION_BLOCKS, pattern(40, 4096)).unwrap();
    assert_eq!(rig.state_of(&m, &b), "failed");
    rig.idle(5_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "failed");
    // Held by someone else meanwhile: not taken even when the option is back on.
    let held = rig.reg.get(&b).unwrap().open("export").unwrap();
    m.shared().process_options().auto_rejoin.store(true, Relaxed);
    rig.idle(10_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "failed");
    drop(held);
    rig.idle(10_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "active");
    let s = m.status().slots.into_iter().find(|s| s.name == b).unwrap();
    assert_eq!((s.rejoins_auto, s.rejoins_rpc), (2, 1));
    assert_eq!(rig.leg_data(&a, &g), rig.leg_data(&b, &g));
}

#[test]
fn a_failed_leg_whose_superblock_is_newer_than_the_mirror_is_not_taken_back_by_itself() {
    let rig = Rig::new(1);
    let (a, _) = rig.error_leg("a");
    let (b, ib) = rig.error_leg("b");
    let m = rig.mirror("m", &[&a, &b]);
    let g = m.geometry();
    m.shared().process_options().auto_rejoin.store(false, Relaxed);
    ib.set(IoType::Write, ErrorType::Failure, 1);
    rig.write("m", 0, pattern(1, 4096)).unwrap();
    assert_eq!(rig.state_of(&m, &b), "failed");
    rig.idle(2_000_000_000);
    // Meanwhile the leg was written by another assembly of the mirror (a newer generation):
    // it is not this mirror's to take back without the operator.
    let mut sb = rig.superblock(&b).unwrap();
    sb.generation = m.status().generation + 10;
    let mut page = vec![0u8; g.page_bytes as usize];
    sb.encode(&mut page[..SUPERBLOCK_BYTES]);
    for copy in 0..2 {
        rig.write("b", g.superblock_block(copy), page.clone()).unwrap();
    }
    m.shared().process_options().auto_rejoin.store(true, Relaxed);
    rig.idle(20_000_000_000);
    assert_eq!(rig.state_of(&m, &b), "failed");
    assert_eq!(rig.reg.get(&b).unwrap().claimed_by(), None, "the attempts let go of the bdev");
}

impl Rig {
    /// Head `head`'s view (host identifier `head`) of shared disk `disk`, named `{disk}_{head}`.
    fn resv_leg(&self, disk: &Arc<dyn Bdev>, state: &Arc<crate::nvmf::reservation::Reservations>, head: u8) -> String {
        self.resv_leg_named(disk, state, head, &format!("{}_{head}", disk.name()))
    }

    fn resv_leg_named(&self, disk: &Arc<dyn Bdev>, state: &Arc<crate::nvmf::reservation::Reservations>, head: u8, name: &str) -> String {
        self.reg.register(Arc::new(crate::sim::resv_leg::ResvLeg::new(name, disk.clone(), state.clone(), [head; 16]))).unwrap();
        name.to_string()
    }

    fn try_fenced_mirror(&self, name: &str, legs: &[String], uuid: Option<Uuid>, f: fence::Fencing) -> Result<Arc<MirrorBdev>, MirrorError> {
        let guards: Vec<HoldGuard> = legs.iter().map(|l| self.reg.get(l).unwrap().claim(name).unwrap()).collect();
        let n = name.to_string();
        let m = self.run(async move { MirrorBdev::assemble(&n, guards, Vec::new(), uuid, MirrorOptions { fencing: Some(f), ..options() }).await })?;
        self.reg.register(m.clone() as Arc<dyn Bdev>).unwrap();
        Ok(m)
    }
}

#[test]
fn a_new_head_preempts_the_old_one_which_is_fenced_and_acknowledges_no_write() {
    let rig = Rig::new(1);
    let disks: Vec<Arc<dyn Bdev>> = ["d0", "d1"].iter().map(|n| Arc::new(MallocBdev::new(n, LEG_BLOCKS, BS, None).unwrap()) as Arc<dyn Bdev>).collect();
    let states: Vec<_> = disks.iter().map(|_| crate::sim::resv_leg::ResvLeg::new_state()).collect();
    let (k1, k2) = (0x1111, 0x2222);
    // Head 1 serves the mirror; its writes reach both legs.
    let legs1: Vec<String> = disks.iter().zip(&states).map(|(d, s)| rig.resv_leg(d, s, 1)).collect();
    let m1 = rig.try_fenced_mirror("m1", &legs1, None, fence::Fencing { key: k1, preempt: None }).unwrap();
    let d = pattern(21, 8192);
    rig.write("m1", 2 * REGION_BLOCKS, d.clone()).unwrap();
    let generation = m1.status().generation;

    // Head 2 without a preempt is refused, naming the leg; nothing changed.
    let legs2: Vec<String> = disks.iter().zip(&states).map(|(d, s)| rig.resv_leg(d, s, 2)).collect();
    let e = rig.try_fenced_mirror("m2", &legs2, Some(m1.uuid()), fence::Fencing { key: k2, preempt: None }).err().expect("refused");
    assert!(matches!(&e, MirrorError::Busy(m) if m.contains(&legs2[0]) && m.contains("preempt_key")), "{e:?}");
    rig.write("m1", 3 * REGION_BLOCKS, d.clone()).expect("head 1 still serves");
    // A head with head 1's host identity (the same hostnqn) cannot fence it: refused, saying so.
    let legs_same: Vec<String> = disks.iter().zip(&states).map(|(d, s)| rig.resv_leg_named(d, s, 1, &format!("{}_same", d.name()))).collect();
    let e = rig.try_fenced_mirror("m3", &legs_same, Some(m1.uuid()), fence::Fencing { key: 0x3333, preempt: Some(k1) }).err().expect("refused");
    assert!(matches!(&e, MirrorError::Invalid(m) if m.contains("same hostnqn")), "{e:?}");
    // Nor without a preempt: replacing the holder's key would leave two writers of one identity.
    let e = rig.try_fenced_mirror("m3", &legs_same, Some(m1.uuid()), fence::Fencing { key: 0x3333, preempt: None }).err().expect("refused");
    assert!(matches!(&e, MirrorError::Busy(m) if m.contains("same hostnqn") && m.contains("already holds")), "{e:?}");
    rig.write("m1", 3 * REGION_BLOCKS, d.clone()).expect("head 1 still serves");

    // Head 2 preempts head 1's key: it assembles the same mirror and reads what head 1 wrote.
    let m2 = rig.try_fenced_mirror("m2", &legs2, Some(m1.uuid()), fence::Fencing { key: k2, preempt: Some(k1) }).unwrap();
    assert_eq!(m2.uuid(), m1.uuid());
    assert!(m2.status().generation > generation);
    assert_eq!(rig.read("m2", 2 * REGION_BLOCKS, 8192).unwrap(), d);

    // Head 1 is fenced: its write fails with Reservation Conflict, drops no leg, reaches no
    // leg; every later write fails at once; reads still work (Write Exclusive).
    let conflict = Err(BdevError::Nvme { sct: 0, sc: crate::nvmf::reservation::SC_RESERVATION_CONFLICT });
    assert_eq!(rig.write("m1", 2 * REGION_BLOCKS, pattern(22, 4096)), conflict);
    assert!(m1.shared().fenced.load(SeqCst));
    assert_eq!(m1.status().active_legs(), 2, "a fenced head drops no leg");
    assert_eq!(rig.write("m1", 50 * REGION_BLOCKS, pattern(23, 512)), conflict);
    assert_eq!(rig.read("m1", 2 * REGION_BLOCKS, 8192).unwrap(), d);
    let v = describe(&m1);
    assert_eq!(v["fenced"], true, "{v}");
    assert_eq!(v["fenced_by"], legs1[0], "{v}");
    assert_eq!(v["reservation_key"], k1, "{v}");
    // Head 2 serves.
    let d2 = pattern(24, 4096);
    rig.write("m2", 2 * REGION_BLOCKS, d2.clone()).unwrap();
    assert_eq!(rig.read("m2", 2 * REGION_BLOCKS, 4096).unwrap(), d2);
    assert_eq!(describe(&m2)["fenced"], false);
    // The saved configuration keeps the key, not the preempt.
    let (_, p) = m2.config_call().unwrap();
    assert_eq!(p["reservation_key"], k2);
    assert!(p.get("preempt_key").is_none());
}

#[test]
fn fencing_leaves_local_legs_alone() {
    let rig = Rig::new(1);
    rig.malloc("a", LEG_BLOCKS);
    rig.malloc("b", LEG_BLOCKS);
    let m = rig.try_fenced_mirror("m", &["a".into(), "b".into()], None, fence::Fencing { key: 7, preempt: None }).unwrap();
    rig.write("m", 0, pattern(25, 4096)).unwrap();
    assert_eq!(describe(&m)["fenced"], false);
}

#[test]
fn a_lost_reservation_is_renewed_and_a_quiet_head_learns_it_was_fenced() {
    use crate::nvmf::reservation::{Access, ResvState};
    let rig = Rig::new(1);
    let disks: Vec<Arc<dyn Bdev>> = ["e0", "e1"].iter().map(|n| Arc::new(MallocBdev::new(n, LEG_BLOCKS, BS, None).unwrap()) as Arc<dyn Bdev>).collect();
    let states: Vec<_> = disks.iter().map(|_| crate::sim::resv_leg::ResvLeg::new_state()).collect();
    let legs1: Vec<String> = disks.iter().zip(&states).map(|(d, s)| rig.resv_leg(d, s, 1)).collect();
    let m1 = rig.try_fenced_mirror("m1", &legs1, None, fence::Fencing { key: 1, preempt: None }).unwrap();
    let other: crate::nvmf::reservation::HostId = [9; 16];
    assert!(states[0].lock().conflicts(&other, Access::Write));
    // The leg's target restarts without persistence: the reservation is gone, with no I/O
    // error for the mirror to notice. The periodic check reserves it again.
    *states[0].lock() = ResvState::default();
    assert!(!states[0].lock().conflicts(&other, Access::Write));
    rig.idle(3_000_000_000);
    assert!(states[0].lock().conflicts(&other, Access::Write), "reserved again");
    assert!(!m1.shared().fenced.load(SeqCst));
    // Another head takes over while head 1 writes nothing: head 1 learns it by its check.
    let legs2: Vec<String> = disks.iter().zip(&states).map(|(d, s)| rig.resv_leg(d, s, 2)).collect();
    rig.try_fenced_mirror("m2", &legs2, Some(m1.uuid()), fence::Fencing { key: 2, preempt: Some(1) }).unwrap();
    rig.idle(3_000_000_000);
    assert!(m1.shared().fenced.load(SeqCst), "a quiet head learns it was fenced");
    assert_eq!(m1.status().active_legs(), 2);
}
