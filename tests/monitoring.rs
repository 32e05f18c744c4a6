//! The Grafana dashboard and the Prometheus alert rules in `config/monitoring/` use only metrics
//! the daemon exports, with the labels it puts on them: checked against a real scrape of a
//! daemon with every subsystem busy. A renamed metric breaks this test, not an on-call
//! engineer's dashboard.

mod support;

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use support::*;

fn read(name: &str) -> String {
    let path = format!("{}/config/monitoring/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

type Families = HashMap<String, (String, BTreeSet<String>)>;

/// Every `tidemark_*` series a PromQL text names, as (family, the text after it up to the
/// expression's end) so that label matchers can be checked too.
fn series(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tidemark_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push((tail[..end].to_string(), tail[end..].to_string()));
        rest = &tail[end..];
    }
    out
}

/// Checks one PromQL expression against the scrape; returns the problems found.
fn check_expr(expr: &str, fams: &Families) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, after) in series(expr) {
        // Counter samples end in _total; histogram samples in _bucket/_sum/_count.
        let (family, wanted) = [("_total", "counter"), ("_bucket", "histogram"), ("_sum", "histogram"), ("_count", "histogram")]
            .iter()
            .find_map(|(suffix, ty)| name.strip_suffix(suffix).filter(|f| fams.get(*f).is_some_and(|x| x.0 == *ty)).map(|f| (f.to_string(), Some(*ty))))
            .unwrap_or((name.clone(), None));
        let Some((ty, labels)) = fams.get(&family) else {
            problems.push(format!("{name}: no such metric in the scrape"));
            continue;
        };
        if wanted.is_none() && (ty == "counter" || ty == "histogram") {
            problems.push(format!("{name}: a {ty} family is only exported with its suffixes"));
        }
        // Label matchers right after the name: {a="x",b=~"y"}.
        if let Some(m) = after.strip_prefix('{') {
            let body = &m[..m.find('}').unwrap_or(0)];
            for matcher in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let key: String = matcher.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if key != "instance" && key != "job" && !labels.contains(&key) {
                    problems.push(format!("{name}: label {key} not on its samples ({labels:?})"));
                }
            }
        }
    }
    problems
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics_and_labels() {
    let d = start_with_every_subsystem();
    let scrape = d.metrics();
    let fams = check_openmetrics(&scrape).unwrap_or_else(|e| panic!("{e}")).families;
    let mut problems = Vec::new();

    // The dashboard: valid JSON, every panel inside the 24-column grid, every query checked.
    let dash: Value = serde_json::from_str(&read("grafana-dashboard.json")).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut queries = 0;
    for p in panels {
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        assert!(x + w <= 24, "panel {} leaves the grid", p["title"]);
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            queries += 1;
            problems.extend(check_expr(expr, &fams).into_iter().map(|e| format!("dashboard {:?}: {e}", p["title"])));
        }
    }
    assert!(queries >= 30, "{queries} queries");

    // The alert rules: every `expr:` line checked; each rule has a name and a severity.
    let rules = read("prometheus-alerts.yml");
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let exprs: Vec<&str> = rules.lines().filter_map(|l| l.trim_start().strip_prefix("expr:")).collect();
    let severities = rules.lines().filter(|l| l.contains("severity:")).count();
    assert!(alerts >= 10 && alerts == exprs.len() && alerts == severities, "{alerts} alerts, {} exprs, {severities} severities", exprs.len());
    for e in exprs {
        problems.extend(check_expr(e, &fams).into_iter().map(|p| format!("alert rule: {p}")));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_catches_a_renamed_metric_and_a_wrong_label() {
    let scrape = "# TYPE tidemark_bdev_ops counter\ntidemark_bdev_ops_total{bdev=\"a\",type=\"read\"} 1\n# EOF\n";
    let fams = check_openmetrics(scrape).expect("valid scrape").families;
    assert!(check_expr("rate(tidemark_bdev_ops_total{bdev=\"a\"}[1m])", &fams).is_empty());
    assert_eq!(check_expr("rate(tidemark_bdev_op_total[1m])", &fams).len(), 1);
    assert_eq!(check_expr("rate(tidemark_bdev_ops_total{volume=\"a\"}[1m])", &fams).len(), 1);
    assert_eq!(check_expr("tidemark_bdev_ops", &fams).len(), 1, "a counter without _total matches nothing");
}

/// Runs `promtool ARGS` with `input` on stdin; (success, everything it printed).
fn promtool(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is not installed: run tests/monitoring/deps.sh");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// What Prometheus itself makes of the scrape: `promtool check metrics` (the exposition
/// parser and the naming lint Prometheus ships) finds nothing to say, no family carries a label
/// that a scrape's target labels would overwrite (`job`, `instance`: Prometheus renames ours
/// to `exported_job` and every dashboard grouping by it merges series), and the alert rules
/// load (`promtool check rules`).
#[test]
fn prometheus_own_tools_accept_the_scrape_and_the_rules() {
    let d = start_with_every_subsystem();
    // `curl .../metrics | promtool check metrics`, as an operator would run it.
    let (ok, said) = promtool(&["check", "metrics"], &d.metrics_text());
    assert!(ok && said.trim().is_empty(), "promtool check metrics:\n{said}");
    let scrape = d.metrics();
    let fams = check_openmetrics(&scrape).unwrap_or_else(|e| panic!("{e}")).families;
    for (name, (_, labels)) in &fams {
        for reserved in ["job", "instance"] {
            assert!(!labels.contains(reserved), "{name} carries a `{reserved}` label, which Prometheus renames on ingestion");
        }
    }
    let rules = format!("{}/config/monitoring/prometheus-alerts.yml", env!("CARGO_MANIFEST_DIR"));
    let (ok, said) = promtool(&["check", "rules", &rules], "");
    assert!(ok, "promtool check rules:\n{said}");
}
