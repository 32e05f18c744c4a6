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
    MirrorOptions { region_bytes: REGION, clean_interval_ns: 10_000_000 }
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
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        self.cores.enter(core, || crate::reactor::spawn_detached(async move { *o.borrow_mut() = Some(f.await) }));
        for _ in 0..1_000_000 {
            self.cores.run_until_idle();
            if let Some(v) = out.borrow_mut().take() {
                return v;
            }
            let next = self.cores.next_timer().expect("the future waits for nothing: deadlock");
            self.cores.advance_to(next.max(self.cores.now_ns()));
        }
        panic!("the future did not finish");
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
