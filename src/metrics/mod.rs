//! Prometheus metrics: an HTTP endpoint that, on each scrape, reads the target's counters
//! (per-core atomics, never a lock on the data path) and encodes them in the OpenMetrics text
//! format, which Prometheus reads natively.

use crate::bdev::{IoType, LATENCY_BUCKETS_US};
use crate::target::Target;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue};
use prometheus_client::metrics::MetricType;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;

pub type Labels = Vec<(&'static str, String)>;

/// A histogram sample: per-bucket counts (not cumulative) on [`LATENCY_BUCKETS_US`] plus the
/// overflow bucket, and the sum in nanoseconds.
pub struct LatencySample<'a> {
    pub buckets: &'a [u64; LATENCY_BUCKETS_US.len() + 1],
    pub sum_ns: u64,
}

/// What subsystems write their metrics through.
pub struct MetricsOut<'a> {
    enc: DescriptorEncoder<'a>,
    /// Families written so far: a name written twice makes Prometheus reject the whole scrape.
    seen: std::collections::HashSet<String>,
}

impl<'a> MetricsOut<'a> {
    pub fn new(enc: DescriptorEncoder<'a>) -> Self {
        MetricsOut { enc, seen: Default::default() }
    }

    /// Whether family `name` may be written (first time); a second one is a bug, logged and
    /// dropped so that the scrape stays valid.
    fn first(&mut self, name: &str) -> bool {
        let fresh = self.seen.insert(name.to_string());
        if !fresh {
            log::error!("metrics: family {name} written twice; the second one is dropped");
            debug_assert!(false, "metrics family {name} written twice");
        }
        fresh
    }

    /// A counter family; `name` without the `_total` suffix (the encoder adds it).
    pub fn counter<V: EncodeCounterValue>(&mut self, name: &str, help: &str, samples: &[(Labels, V)]) -> fmt::Result {
        if samples.is_empty() || !self.first(name) {
            return Ok(());
        }
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            m.encode_family(labels)?.encode_counter::<prometheus_client::encoding::NoLabelSet, V, u64>(v, None)?;
        }
        Ok(())
    }

    pub fn gauge(&mut self, name: &str, help: &str, samples: &[(Labels, f64)]) -> fmt::Result {
        if samples.is_empty() || !self.first(name) {
            return Ok(());
        }
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
        Ok(())
    }

    /// A latency histogram family in seconds.
    pub fn latency(&mut self, name: &str, help: &str, samples: &[(Labels, LatencySample<'_>)]) -> fmt::Result {
        if samples.is_empty() || !self.first(name) {
            return Ok(());
        }
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, s) in samples {
            // Per-bucket counts: the encoder makes them cumulative itself.
            let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BUCKETS_US.len() + 1);
            for (i, &b) in LATENCY_BUCKETS_US.iter().enumerate() {
                buckets.push((b as f64 / 1e6, s.buckets[i]));
            }
            buckets.push((f64::INFINITY, s.buckets[LATENCY_BUCKETS_US.len()]));
            let count = s.buckets.iter().sum();
            m.encode_family(labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(s.sum_ns as f64 / 1e9, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// Labels helper: `labels(&[("bdev", name)])`.
pub fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

struct TargetCollector(Arc<Target>);

impl fmt::Debug for TargetCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TargetCollector")
    }
}

impl prometheus_client::collector::Collector for TargetCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        let mut out = MetricsOut::new(enc);
        encode_target(&self.0, &mut out)
    }
}

fn encode_target(t: &Target, out: &mut MetricsOut<'_>) -> fmt::Result {
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

    for s in t.subsystems() {
        s.metrics(t, out)?;
    }
    Ok(())
}

/// Renders the target's metrics as OpenMetrics text.
pub fn render(target: &Arc<Target>) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(TargetCollector(target.clone())));
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &reg) {
        log::error!("metrics: encoding failed: {e}");
    }
    s
}

/// The HTTP endpoint.
/// The classic Prometheus text format (0.0.4) of an OpenMetrics scrape. The two differ only
/// where a counter is named: OpenMetrics names the family (`x`) in HELP and TYPE and the
/// sample `x_total`, the classic format names both `x_total`; and the classic format has no
/// `# UNIT` or `# EOF` lines. Parsers of the classic format (promtool, older scrapers) would
/// otherwise see counters without help text.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, target: Arc<Target>) -> Result<MetricsServer, String> {
        let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| format!("metrics: cannot listen on {addr}: {e}"))?);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    // Prometheus asks for OpenMetrics in its Accept header; everything else
                    // (curl, promtool, older scrapers) gets the classic text format.
                    let openmetrics = req.headers().iter().any(|h| h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text"));
                    let (body, ctype, code) = match req.url() {
                        "/metrics" if openmetrics => (render(&target), "application/openmetrics-text; version=1.0.0; charset=utf-8", 200),
                        "/metrics" => (classic_text(&render(&target)), "text/plain; version=0.0.4; charset=utf-8", 200),
                        "/" => ("<html><body><a href=\"/metrics\">/metrics</a></body></html>\n".to_string(), "text/html", 200),
                        _ => ("not found\n".to_string(), "text/plain", 404),
                    };
                    let header = tiny_http::Header::from_bytes("Content-Type", ctype).expect("static header is valid");
                    let _ = req.respond(tiny_http::Response::from_string(body).with_header(header).with_status_code(code));
                }
            })
            .map_err(|e| e.to_string())?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(MetricsServer { server, thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::classic_text;

    #[test]
    fn classic_text_names_counters_with_total_and_drops_openmetrics_only_lines() {
        let om = "# HELP a_ops Ops.\n# TYPE a_ops counter\na_ops_total{x=\"1\"} 3\n# HELP a_lat Latency.\n# TYPE a_lat histogram\n# UNIT a_lat seconds\na_lat_count 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        let text = classic_text(om);
        assert_eq!(
            text,
            "# HELP a_ops_total Ops.\n# TYPE a_ops_total counter\na_ops_total{x=\"1\"} 3\n# HELP a_lat Latency.\n# TYPE a_lat histogram\na_lat_count 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }
}
