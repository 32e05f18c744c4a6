//! Prometheus metrics: an HTTP endpoint that, on each scrape, reads the target's counters
//! (per-core atomics, never a lock on the data path) and encodes them in the OpenMetrics text
//! format, which Prometheus reads natively.

use crate::bdev::LATENCY_BUCKETS_US;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue};
use prometheus_client::metrics::MetricType;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

pub type Labels = Vec<(&'static str, String)>;

/// A histogram sample: per-bucket counts (not cumulative) on [`LATENCY_BUCKETS_US`] plus the
/// overflow bucket, and the sum in nanoseconds.
pub struct LatencySample<'a> {
    pub buckets: &'a [u64; LATENCY_BUCKETS_US.len() + 1],
    pub sum_ns: u64,
}

/// What modules write their metrics through.
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

/// Writes every metric family of the target (the module layer's encoder,
/// [`crate::module::metrics::encode`]); this layer only formats and serves them.
pub type Encode = Arc<dyn Fn(&mut MetricsOut<'_>) -> fmt::Result + Send + Sync>;

struct TargetCollector(Encode);

impl fmt::Debug for TargetCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TargetCollector")
    }
}

impl prometheus_client::collector::Collector for TargetCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        let mut out = MetricsOut::new(enc);
        (self.0)(&mut out)
    }
}

/// Renders the target's metrics as OpenMetrics text.
pub fn render(encode: &Encode) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(TargetCollector(encode.clone())));
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
    pub fn start(addr: SocketAddr, encode: Encode) -> Result<MetricsServer, String> {
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
                        "/metrics" if openmetrics => (render(&encode), "application/openmetrics-text; version=1.0.0; charset=utf-8", 200),
                        "/metrics" => (classic_text(&render(&encode)), "text/plain; version=0.0.4; charset=utf-8", 200),
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
