//! Per-bdev I/O statistics, kept in one shard per core so that recording an I/O is a few
//! plain stores on a cache line no other core writes (`add_own`).

use super::IoType;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the latency buckets in microseconds: 1 µs to 1 s in a 1-2-5 series. The
/// last bucket (+Inf) is implicit.
pub const LATENCY_BUCKETS_US: [u64; 19] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000];

/// A latency histogram with Prometheus semantics (bucket i counts samples <= bound i; the
/// stored counts are per bucket and made cumulative when read).
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }
}

impl LatencyHistogram {
    pub fn record(&self, ns: u64) {
        let us = ns.div_ceil(1000);
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// [`Self::record`] for a histogram only the current thread writes (a shard of one core):
    /// plain stores instead of locked adds.
    pub fn record_own(&self, ns: u64) {
        let us = ns.div_ceil(1000);
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        add_own(&self.buckets[i], 1);
        add_own(&self.sum_ns, ns);
    }

    /// Adds this histogram's per-bucket counts and sum into `counts` / `sum_ns`.
    pub fn accumulate(&self, counts: &mut [u64; LATENCY_BUCKETS_US.len() + 1], sum_ns: &mut u64) {
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
            *c += b.load(Relaxed);
        }
        *sum_ns += self.sum_ns.load(Relaxed);
    }
}

#[derive(Default)]
pub struct StatShard {
    pub ops: [AtomicU64; 5],
    pub bytes: [AtomicU64; 5],
    pub errors: [AtomicU64; 5],
    pub in_flight: AtomicU64,
    pub read_latency: LatencyHistogram,
    pub write_latency: LatencyHistogram,
    /// Total latency by type, for SPDK's `*_latency_ticks`-style averages.
    pub latency_ns: [AtomicU64; 5],
}

/// Adds `v` to a counter that only the current thread writes: a load and a store, not a locked
/// read-modify-write (about twenty cycles each, and an I/O bumps ten of them per layer). A
/// shard belongs to one core and only that core's thread records into it; other threads only
/// read, and may see a value one I/O old. A second writer would lose counts, never memory.
#[inline]
fn add_own(a: &AtomicU64, v: u64) {
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

impl StatShard {
    /// An I/O of this shard's core is in flight (pair with [`Self::io_ended`], same core).
    pub fn io_started(&self) {
        add_own(&self.in_flight, 1);
    }

    pub fn io_ended(&self) {
        add_own(&self.in_flight, u64::MAX); // -1, wrapping
    }
}

/// Statistics of one bdev: one shard per core.
pub struct BdevStats {
    shards: Box<[CachePadded<StatShard>]>,
}

/// A sum over all shards.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IoStatSnapshot {
    pub ops: [u64; 5],
    pub bytes: [u64; 5],
    pub errors: [u64; 5],
    pub latency_ns: [u64; 5],
    pub in_flight: u64,
    pub read_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    pub read_sum_ns: u64,
    pub write_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    pub write_sum_ns: u64,
}

impl BdevStats {
    pub fn new(cores: usize) -> Self {
        BdevStats { shards: (0..cores.max(1)).map(|_| CachePadded::new(StatShard::default())).collect() }
    }

    /// The shard of `core`; call it on that core's thread (a shard has one writer).
    pub fn shard(&self, core: usize) -> &StatShard {
        // Cores beyond the count (never expected) share the last shard rather than panic; it
        // then has several writers and may lose counts.
        &self.shards[core.min(self.shards.len() - 1)]
    }

    /// Records a completed I/O in `core`'s shard, on that core's thread.
    pub fn record(&self, core: usize, t: IoType, bytes: u64, latency_ns: u64, ok: bool) {
        let s = self.shard(core);
        let i = t.index();
        if ok {
            add_own(&s.ops[i], 1);
            add_own(&s.bytes[i], bytes);
        } else {
            add_own(&s.errors[i], 1);
        }
        add_own(&s.latency_ns[i], latency_ns);
        match t {
            IoType::Read => s.read_latency.record_own(latency_ns),
            IoType::Write => s.write_latency.record_own(latency_ns),
            _ => {}
        }
    }

    pub fn snapshot(&self) -> IoStatSnapshot {
        let mut out = IoStatSnapshot::default();
        for s in self.shards.iter() {
            for i in 0..5 {
                out.ops[i] += s.ops[i].load(Relaxed);
                out.bytes[i] += s.bytes[i].load(Relaxed);
                out.errors[i] += s.errors[i].load(Relaxed);
                out.latency_ns[i] += s.latency_ns[i].load(Relaxed);
            }
            out.in_flight += s.in_flight.load(Relaxed);
            s.read_latency.accumulate(&mut out.read_buckets, &mut out.read_sum_ns);
            s.write_latency.accumulate(&mut out.write_buckets, &mut out.write_sum_ns);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let h = LatencyHistogram::default();
        h.record(1_000); // 1 us -> bucket le=1
        h.record(1_001); // just over 1 us -> le=2
        h.record(3_000_000_000); // 3 s -> +Inf
        let mut c = [0; LATENCY_BUCKETS_US.len() + 1];
        let mut sum = 0;
        h.accumulate(&mut c, &mut sum);
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 1);
        assert_eq!(c[LATENCY_BUCKETS_US.len()], 1);
        assert_eq!(sum, 3_000_002_001);
    }

    #[test]
    fn shards_sum() {
        let s = BdevStats::new(2);
        s.record(0, IoType::Read, 4096, 10_000, true);
        s.record(1, IoType::Read, 4096, 10_000, true);
        s.record(1, IoType::Write, 512, 10_000, false);
        let snap = s.snapshot();
        assert_eq!(snap.ops[0], 2);
        assert_eq!(snap.bytes[0], 8192);
        assert_eq!(snap.errors[1], 1);
        assert_eq!(snap.ops[1], 0);
    }
}
