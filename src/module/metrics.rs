//! The target's metric families: the framework's own (build, uptime, buffers, connections,
//! reactors, bdev I/O), then each module's, in module order.

use super::Ctx;
use crate::bdev::IoType;
use crate::metrics::{labels, Labels, LatencySample, MetricsOut};
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;

/// Writes every family of the target.
pub fn encode(t: &Ctx, out: &mut MetricsOut<'_>) -> fmt::Result {
    let info = labels(&[("version", env!("CARGO_PKG_VERSION")), ("commit", env!("TIDEMARK_GIT_COMMIT"))]);
    out.gauge("tidemark_build_info", "Build of the running target (value 1).", &[(info, 1.0)])?;
    out.gauge("tidemark_uptime_seconds", "Seconds since the daemon started.", &[(vec![], t.started.elapsed().as_secs_f64())])?;
    let (huge, pool) = crate::bdev::buffer_pool_info();
    out.gauge("tidemark_buffer_pool_hugepages", "1 when I/O buffers live on 2 MiB hugepages, 0 on ordinary pages.", &[(vec![], if huge { 1.0 } else { 0.0 })])?;
    out.gauge("tidemark_buffer_pool_bytes_per_core", "Bytes reserved for I/O buffers on each core.", &[(vec![], pool as f64)])?;
    let (total, per_conn) = crate::bdev::budget::buffer_budget();
    let (used, peak, refused, _) = crate::bdev::budget::budget_stats();
    out.gauge("tidemark_buffer_budget_bytes", "Most bytes of I/O buffers hosts' commands may hold, all connections together.", &[(vec![], total as f64)])?;
    out.gauge("tidemark_buffer_budget_connection_bytes", "Most bytes of I/O buffers one connection's commands may hold.", &[(vec![], per_conn as f64)])?;
    out.gauge("tidemark_buffer_budget_used_bytes", "Bytes of I/O buffers hosts' commands hold now.", &[(vec![], used as f64)])?;
    out.gauge(
        "tidemark_buffer_budget_peak_bytes",
        "Most bytes of I/O buffers hosts' commands held at once (sum of the cores' peaks).",
        &[(vec![], peak as f64)],
    )?;
    out.counter("tidemark_buffer_budget_refusals", "Buffer charges that did not fit: commands held back, TASK SET FULL, R2Ts delayed.", &[(vec![], refused)])?;
    let conns_refused = crate::bdev::budget::connections_refused();
    out.counter(
        "tidemark_buffer_budget_connections_refused",
        "Host connections refused at accept: their own state did not fit the buffer budget.",
        &[(vec![], conns_refused)],
    )?;
    let (open, shed) = crate::reactor::connection_stats();
    out.gauge("tidemark_host_connections", "Host connections open (NVMe/TCP and iSCSI).", &[(vec![], open as f64)])?;
    out.gauge(
        "tidemark_host_connections_max",
        "Most host connections at once (RLIMIT_NOFILE minus the reserve).",
        &[(vec![], crate::reactor::connection_cap() as f64)],
    )?;
    out.counter("tidemark_host_connections_shed", "Connections closed at accept: over the limit or out of file descriptors.", &[(vec![], shed)])?;

    // Reactors.
    let mut busy = Vec::new();
    let mut idle = Vec::new();
    let mut sleep = Vec::new();
    let mut wake = Vec::new();
    for c in 0..t.reactors.core_count() {
        let mb = t.reactors.mailbox(c);
        let l = labels(&[("core", &c.to_string()), ("cpu", &mb.cpu().map(|x| x.to_string()).unwrap_or_default())]);
        let k = &mb.counters;
        busy.push((l.clone(), k.busy_ns.load(Relaxed)));
        idle.push((l.clone(), k.idle_ns.load(Relaxed)));
        sleep.push((l.clone(), k.sleep_ns.load(Relaxed)));
        wake.push((l, k.wakeups.load(Relaxed)));
    }
    let secs = |v: Vec<(Labels, u64)>| -> Vec<(Labels, f64)> { v.into_iter().map(|(l, n)| (l, n as f64 / 1e9)).collect() };
    out.counter("tidemark_reactor_busy_seconds", "Time each reactor spent in loop iterations that did work.", &secs(busy))?;
    out.counter("tidemark_reactor_idle_seconds", "Time each reactor spent finding nothing to do, polling or asleep.", &secs(idle))?;
    out.counter("tidemark_reactor_sleep_seconds", "Of the idle time, time each reactor slept in the kernel.", &secs(sleep))?;
    out.counter("tidemark_reactor_wakeups", "Times a sleeping reactor was woken by another thread.", &wake)?;

    // Bdevs.
    let bdevs = t.bdevs.list();
    let snaps: Vec<_> = bdevs.iter().map(|e| (e.name().to_string(), e.stats().snapshot())).collect();
    let mut ops = Vec::new();
    let mut bytes = Vec::new();
    let mut errors = Vec::new();
    let mut qd = Vec::new();
    for (name, s) in &snaps {
        for t in IoType::ALL {
            let l = labels(&[("bdev", name), ("type", t.name())]);
            ops.push((l.clone(), s.ops[t.index()]));
            bytes.push((l.clone(), s.bytes[t.index()]));
            errors.push((l, s.errors[t.index()]));
        }
        qd.push((labels(&[("bdev", name)]), s.in_flight as f64));
    }
    out.counter("tidemark_bdev_ops", "Completed I/O operations per bdev and type.", &ops)?;
    out.counter("tidemark_bdev_bytes", "Bytes transferred per bdev and type.", &bytes)?;
    out.counter("tidemark_bdev_errors", "Failed I/O operations per bdev and type.", &errors)?;
    out.gauge("tidemark_bdev_queue_depth", "I/O operations in flight per bdev.", &qd)?;
    let reads: Vec<_> = snaps.iter().map(|(n, s)| (labels(&[("bdev", n)]), LatencySample { buckets: &s.read_buckets, sum_ns: s.read_sum_ns })).collect();
    out.latency("tidemark_bdev_read_latency_seconds", "Read latency per bdev, submission to completion.", &reads)?;
    let writes: Vec<_> = snaps.iter().map(|(n, s)| (labels(&[("bdev", n)]), LatencySample { buckets: &s.write_buckets, sum_ns: s.write_sum_ns })).collect();
    out.latency("tidemark_bdev_write_latency_seconds", "Write latency per bdev, submission to completion.", &writes)?;

    for s in t.modules() {
        s.metrics(t, out)?;
    }
    Ok(())
}
