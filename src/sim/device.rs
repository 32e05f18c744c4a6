//! The simulated block device: in-memory blocks, a completion time per I/O drawn from the seed
//! (so completions come back reordered), and a volatile write cache with a crash model.
//!
//! Crash model (documented choice, like a disk with a volatile cache or a file through the
//! page cache): a write's data is visible to reads from its completion on; it is *durable* only
//! once a flush submitted after its completion has completed. At a crash, each block holds its
//! durable value or the value of any write to it that was not yet durable (completed or still
//! in flight), chosen independently per block by the seed: writes may be torn and may reach
//! media in any order, exactly the freedom a real cache has. The unit a crash keeps or tears is
//! a 512-byte sector, whatever block size the device reports, or a smaller unit when asked
//! (a stricter model than real media, for formats that rely only on smaller atomic records).

use crate::bdev::{Bdev, BdevError, BdevProps, Io, IoChannel, IoFuture, IoType};
use crate::reactor;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The sector: the default block size, and the unit of the crash model.
pub const SIM_BLOCK: u32 = 512;

struct Pending {
    seq: u64,
    /// In sectors.
    offset: u64,
    data: Vec<u8>,
    /// Order of completion (u64::MAX while in flight).
    completed: u64,
}

struct DevState {
    rng: ChaCha8Rng,
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    next_seq: u64,
    next_completion: u64,
    dead: bool,
}

/// Latency of one simulated I/O: mostly `min..max`, one in fifty ten times longer.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub min_ns: u64,
    pub max_ns: u64,
}

pub struct SimDevice {
    props: BdevProps,
    /// Bytes a crash keeps or loses as one (a divisor of the sector).
    tear: usize,
    latency: Latency,
    /// Writes touching these bytes take this much longer: (start, end, extra ns).
    slow: Option<(u64, u64, u64)>,
    /// One write in `.0` stalls `.1` ns longer (a device or path that hangs now and then).
    stall: Option<(u32, u64)>,
    /// One write-zeroes in this many fails with a media error, writing nothing.
    zero_failures: Option<u32>,
    state: Arc<Mutex<DevState>>,
    /// I/Os submitted (the harness picks crash points from it).
    pub submitted: Arc<AtomicU64>,
}

const PRODUCT_NAME: &str = "simulated device";

impl SimDevice {
    pub fn new(name: &str, image: Vec<u8>, seed: u64, latency: Latency) -> SimDevice {
        assert!(!image.is_empty() && image.len() % SIM_BLOCK as usize == 0);
        let num_blocks = (image.len() / SIM_BLOCK as usize) as u64;
        SimDevice {
            props: BdevProps::new(name, PRODUCT_NAME, SIM_BLOCK, num_blocks, Uuid::nil()),
            tear: SIM_BLOCK as usize,
            latency,
            slow: None,
            stall: None,
            zero_failures: None,
            state: Arc::new(Mutex::new(DevState {
                rng: ChaCha8Rng::seed_from_u64(seed),
                current: image.clone(),
                durable: image,
                pending: Vec::new(),
                next_seq: 0,
                next_completion: 0,
                dead: false,
            })),
            submitted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same device reporting blocks of `bs` bytes (a multiple of the sector).
    pub fn with_block_size(mut self, bs: u32) -> SimDevice {
        let bytes = self.num_blocks() * self.block_size() as u64;
        assert!(bs % SIM_BLOCK == 0 && bytes % bs as u64 == 0, "{bs}-byte blocks on a {bytes}-byte device");
        self.props = BdevProps::new(self.name(), PRODUCT_NAME, bs, bytes / bs as u64, Uuid::nil());
        self
    }

    /// The same device with writes that touch bytes `range` taking `extra_ns` longer (the
    /// simulation makes preserve metadata slow, so that a host write waiting for it shows).
    pub fn with_slow_writes(mut self, range: std::ops::Range<u64>, extra_ns: u64) -> SimDevice {
        self.slow = Some((range.start, range.end, extra_ns));
        self
    }

    /// The same device with one write in `one_in` (drawn from the seed) taking `extra_ns`
    /// longer: a write that stalls while later ones pass it.
    pub fn with_stalls(mut self, one_in: u32, extra_ns: u64) -> SimDevice {
        self.stall = Some((one_in.max(1), extra_ns));
        self
    }

    /// The same device failing one write-zeroes in `one_in` (drawn from the seed) with a media
    /// error that writes nothing: the pool simulation's failed fills of first writes (the pool
    /// zeroes a new cluster with write-zeroes, and uses it for nothing else). Without it the
    /// device draws nothing more from its seed, so other simulations keep their schedules.
    pub fn with_zero_failures(mut self, one_in: u32) -> SimDevice {
        self.zero_failures = Some(one_in.max(1));
        self
    }

    /// The same device torn by a crash in units of `bytes` (a divisor of the sector).
    pub fn with_tear_bytes(mut self, bytes: usize) -> SimDevice {
        assert!(bytes > 0 && SIM_BLOCK as usize % bytes == 0, "tear unit {bytes}");
        self.tear = bytes;
        self
    }

    fn st(&self) -> std::sync::MutexGuard<'_, DevState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Crashes the device: returns what its media holds now, and fails every I/O from now on.
    pub fn crash(&self) -> Vec<u8> {
        let unit = self.tear;
        let sector = SIM_BLOCK as usize;
        let mut st = self.st();
        st.dead = true;
        let mut img = st.durable.clone();
        let mut order: Vec<usize> = (0..st.pending.len()).collect();
        order.sort_by_key(|&i| (st.pending[i].completed, st.pending[i].seq));
        // Per unit of media that writes not yet durable cover: those writes, in completion order.
        let mut cover: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &i in &order {
            let p = &st.pending[i];
            let start = p.offset as usize * sector;
            for u in (start / unit)..((start + p.data.len()) / unit) {
                cover.entry(u).or_default().push(i);
            }
        }
        for (u, cands) in cover {
            let pick = st.rng.random_range(0..=cands.len());
            if pick == cands.len() {
                continue; // the durable value
            }
            let p = &st.pending[cands[pick]];
            let o = u * unit - p.offset as usize * sector;
            img[u * unit..(u + 1) * unit].copy_from_slice(&p.data[o..o + unit]);
        }
        img
    }

    /// The content reads see now (for checks outside the simulated I/O path).
    pub fn current_image(&self) -> Vec<u8> {
        self.st().current.clone()
    }
}

struct SimChannel {
    dev: Arc<SimDeviceShared>,
}

/// What channels share of the device (the bdev itself is not `Clone`).
struct SimDeviceShared {
    state: Arc<Mutex<DevState>>,
    block_size: u32,
    latency: Latency,
    slow: Option<(u64, u64, u64)>,
    stall: Option<(u32, u64)>,
    zero_failures: Option<u32>,
    submitted: Arc<AtomicU64>,
}

impl SimDeviceShared {
    fn st(&self) -> std::sync::MutexGuard<'_, DevState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn latency(&self) -> u64 {
        let mut st = self.st();
        let l = st.rng.random_range(self.latency.min_ns..=self.latency.max_ns);
        if st.rng.random_ratio(1, 50) {
            l * 10
        } else {
            l
        }
    }

    /// Extra latency of a write of `bytes` at byte `at`.
    fn slow_extra(&self, at: u64, bytes: u64) -> u64 {
        let stall = match self.stall {
            Some((one_in, extra)) if self.st().rng.random_ratio(1, one_in) => extra,
            _ => 0,
        };
        stall
            + match self.slow {
                Some((a, b, extra)) if at < b && a < at + bytes => extra,
                _ => 0,
            }
    }

    /// Whether this write-zeroes fails (see [`SimDevice::with_zero_failures`]).
    fn zero_fails(&self) -> bool {
        self.zero_failures.is_some_and(|one_in| self.st().rng.random_ratio(1, one_in))
    }

    fn begin_write(&self, offset: u64, data: Vec<u8>) -> u64 {
        let mut st = self.st();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.push(Pending { seq, offset, data, completed: u64::MAX });
        seq
    }

    fn complete_write(&self, seq: u64) -> Result<(), BdevError> {
        let mut st = self.st();
        if st.dead {
            return Err(BdevError::Offline);
        }
        let c = st.next_completion;
        st.next_completion += 1;
        let bs = SIM_BLOCK as usize;
        let DevState { pending, current, .. } = &mut *st;
        let p = pending.iter_mut().find(|p| p.seq == seq).expect("pending write");
        p.completed = c;
        let o = p.offset as usize * bs;
        current[o..o + p.data.len()].copy_from_slice(&p.data);
        Ok(())
    }
}

impl IoChannel for SimChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        let d = &self.dev;
        d.submitted.fetch_add(1, Relaxed);
        let done_at = reactor::now_ns() + d.latency();
        let bs = d.block_size as usize;
        let sector = |block: u64| block * (d.block_size / SIM_BLOCK) as u64;
        match io {
            Io::Read { offset_blocks, bufs, .. } => IoFuture::boxed(async move {
                reactor::sleep_until(done_at).await;
                let st = d.st();
                if st.dead {
                    return Err(BdevError::Offline);
                }
                let mut pos = offset_blocks as usize * bs;
                for b in bufs.iter_mut() {
                    let n = b.len();
                    b.copy_from_slice(&st.current[pos..pos + n]);
                    pos += n;
                }
                Ok(())
            }),
            Io::Write { offset_blocks, bufs, .. } => {
                let mut data = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
                for b in bufs {
                    data.extend_from_slice(b);
                }
                let done_at = done_at + d.slow_extra(offset_blocks * bs as u64, data.len() as u64);
                let seq = d.begin_write(sector(offset_blocks), data);
                IoFuture::boxed(async move {
                    reactor::sleep_until(done_at).await;
                    d.complete_write(seq)
                })
            }
            Io::WriteZeroes { .. } if d.zero_fails() => IoFuture::boxed(async move {
                reactor::sleep_until(done_at).await;
                Err(if d.st().dead { BdevError::Offline } else { BdevError::Media })
            }),
            Io::Unmap { offset_blocks, num_blocks } | Io::WriteZeroes { offset_blocks, num_blocks } => {
                let done_at = done_at + d.slow_extra(offset_blocks * bs as u64, num_blocks * bs as u64);
                let seq = d.begin_write(sector(offset_blocks), vec![0u8; num_blocks as usize * bs]);
                IoFuture::boxed(async move {
                    reactor::sleep_until(done_at).await;
                    d.complete_write(seq)
                })
            }
            Io::Flush => {
                // Covers the writes completed before the flush was submitted.
                let covered: Vec<u64> = d.st().pending.iter().filter(|p| p.completed != u64::MAX).map(|p| p.seq).collect();
                IoFuture::boxed(async move {
                    reactor::sleep_until(done_at).await;
                    let mut st = d.st();
                    if st.dead {
                        return Err(BdevError::Offline);
                    }
                    let DevState { pending, durable, .. } = &mut *st;
                    let mut done: Vec<&Pending> = pending.iter().filter(|p| covered.contains(&p.seq)).collect();
                    done.sort_by_key(|p| p.completed);
                    for p in done {
                        let o = p.offset as usize * SIM_BLOCK as usize;
                        durable[o..o + p.data.len()].copy_from_slice(&p.data);
                    }
                    pending.retain(|p| !covered.contains(&p.seq));
                    Ok(())
                })
            }
        }
    }
}

impl Bdev for SimDevice {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, _io: IoType) -> bool {
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(SimChannel {
            dev: Arc::new(SimDeviceShared {
                state: self.state.clone(),
                block_size: self.block_size(),
                latency: self.latency,
                slow: self.slow,
                stall: self.stall,
                zero_failures: self.zero_failures,
                submitted: self.submitted.clone(),
            }),
        }))
    }
    fn config_call(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
