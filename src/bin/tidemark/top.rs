//! `tidemark top`: a live view of one daemon for the on-call engineer, refreshed every second
//! from the same RPCs a script would call (framework_get_reactors, bdev_get_iostat,
//! nvmf_get_subsystems, iscsi_get_target_nodes, bdev_snapshot_get, backup_get). Rates and
//! latency percentiles are differences between two polls, so the first frame shows totals
//! only. Keys: `q`, Esc or Ctrl-C quit. When stdout is not a terminal (a pipe, `--once`), it
//! prints plain-text frames instead, and a closed pipe ends it quietly.

use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use serde_json::Value;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

type Call<'a> = dyn Fn(&str, Value) -> Result<Value, String> + 'a;

/// One poll of the daemon: the raw answers, kept to difference with the next poll.
struct Poll {
    at: Instant,
    reactors: Value,
    iostat: Value,
    subsystems: Value,
    targets: Value,
    snapshots: Value,
    backups: Value,
}

fn poll(call: &Call<'_>) -> Result<Poll, String> {
    // Optional subsystems (a daemon without iSCSI, say) answer with an error: show nothing.
    let or_empty = |m: &str| call(m, Value::Null).unwrap_or(Value::Array(vec![]));
    Ok(Poll {
        at: Instant::now(),
        reactors: call("framework_get_reactors", Value::Null)?,
        iostat: call("bdev_get_iostat", Value::Null)?,
        subsystems: or_empty("nvmf_get_subsystems"),
        targets: or_empty("iscsi_get_target_nodes"),
        snapshots: or_empty("bdev_snapshot_get"),
        backups: or_empty("backup_get"),
    })
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Per-bucket counts of a latency histogram (`[{le_us, count}]`, "+Inf" last) by upper bound.
fn buckets(h: &Value) -> Vec<(f64, f64)> {
    arr(h).iter().map(|b| (b["le_us"].as_f64().unwrap_or(f64::INFINITY), num(b, "count"))).collect()
}

/// The upper bound (µs) of the bucket holding quantile `q` of the I/Os between two polls.
fn quantile(now: &Value, before: Option<&Value>, q: f64) -> Option<f64> {
    let old: HashMap<u64, f64> = before.map(|b| buckets(b).into_iter().map(|(le, n)| (le.to_bits(), n)).collect()).unwrap_or_default();
    let mut diff: Vec<(f64, f64)> = buckets(now).into_iter().map(|(le, n)| (le, n - old.get(&le.to_bits()).copied().unwrap_or(0.0))).collect();
    diff.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = diff.iter().map(|d| d.1).sum();
    if total <= 0.0 {
        return None;
    }
    let mut seen = 0.0;
    diff.into_iter()
        .find(|(_, n)| {
            seen += n;
            seen >= q * total
        })
        .map(|(le, _)| le)
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.is_infinite() => ">1s".into(),
        Some(x) if x >= 1000.0 => format!("≤{:.0}ms", x / 1000.0),
        Some(x) => format!("≤{x:.0}µs"),
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// What one frame shows, as rows of text: the same for the terminal view and plain output.
struct Frame {
    reactors: Vec<Vec<String>>,
    bdevs: Vec<Vec<String>>,
    exports: Vec<Vec<String>>,
    activity: Vec<Vec<String>>,
}

const REACTOR_HEAD: [&str; 5] = ["core", "cpu", "busy %", "sleep %", "wakeups/s"];
const BDEV_HEAD: [&str; 9] = ["bdev", "r IOPS", "w IOPS", "r MB/s", "w MB/s", "r p50/p99", "w p50/p99", "QD", "errors"];
const EXPORT_HEAD: [&str; 4] = ["protocol", "export", "bdevs", "IOPS"];
const ACTIVITY_HEAD: [&str; 4] = ["kind", "name", "state", "progress"];

fn frame(now: &Poll, before: Option<&Poll>) -> Frame {
    let secs = before.map(|b| now.at.duration_since(b.at).as_secs_f64()).filter(|s| *s > 0.0);
    let find = |list: &[Value], key: &str, name: &str| -> Option<Value> { list.iter().find(|x| x[key] == name).cloned() };

    let old_reactors = before.map(|b| arr(&b.reactors["reactors"]).to_vec()).unwrap_or_default();
    let reactors = arr(&now.reactors["reactors"])
        .iter()
        .map(|r| {
            let o = old_reactors.iter().find(|o| o["core_index"] == r["core_index"]);
            let d = |k: &str| num(r, k) - o.map(|o| num(o, k)).unwrap_or(0.0);
            let (busy, idle, sleep) = (d("busy"), d("idle"), d("sleep"));
            let all = busy + idle;
            let pct = |x: f64| if all > 0.0 { format!("{:.1}", 100.0 * x / all) } else { "-".into() };
            vec![
                r["core_index"].to_string(),
                r["lcore"].to_string(),
                pct(busy),
                pct(sleep),
                secs.map(|s| fmt_rate(d("wakeups") / s)).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();

    // bdev_get_iostat: SPDK's shape {bdevs: [...]}, or a bare list.
    let stats = |v: &Value| -> Vec<Value> { v.get("bdevs").map(|b| arr(b).to_vec()).unwrap_or_else(|| arr(v).to_vec()) };
    let (cur, old) = (stats(&now.iostat), before.map(|b| stats(&b.iostat)).unwrap_or_default());
    let mut iops_of: HashMap<String, f64> = HashMap::new();
    let bdevs = cur
        .iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap_or("?").to_string();
            let o = find(&old, "name", &name);
            let rate = |k: &str| secs.map(|s| (num(b, k) - o.as_ref().map(|o| num(o, k)).unwrap_or(0.0)) / s);
            let (ri, wi) = (rate("num_read_ops"), rate("num_write_ops"));
            iops_of.insert(name.clone(), ri.unwrap_or(0.0) + wi.unwrap_or(0.0));
            let show = |x: Option<f64>, scale: f64| x.map(|x| fmt_rate(x / scale)).unwrap_or_else(|| "-".into());
            let lat = |k: &str| {
                let oh = o.as_ref().map(|o| &o[k]);
                format!("{}/{}", fmt_us(quantile(&b[k], oh, 0.5)), fmt_us(quantile(&b[k], oh, 0.99)))
            };
            vec![
                name,
                show(ri, 1.0),
                show(wi, 1.0),
                show(rate("bytes_read"), 1e6),
                show(rate("bytes_written"), 1e6),
                lat("read_latency_histogram"),
                lat("write_latency_histogram"),
                b["queue_depth"].as_u64().map(|q| q.to_string()).unwrap_or_else(|| "-".into()),
                format!("{}", num(b, "read_errors") + num(b, "write_errors")),
            ]
        })
        .collect();

    let mut exports = Vec::new();
    for s in arr(&now.subsystems).iter().filter(|s| s["subtype"] != "Discovery") {
        let names: Vec<String> = arr(&s["namespaces"]).iter().filter_map(|n| n["bdev_name"].as_str().map(str::to_string)).collect();
        let iops: f64 = names.iter().filter_map(|n| iops_of.get(n)).sum();
        exports.push(vec!["nvme/tcp".into(), s["nqn"].as_str().unwrap_or("?").into(), names.join(","), fmt_rate(iops)]);
    }
    for t in arr(&now.targets) {
        let names: Vec<String> = arr(&t["luns"]).iter().filter_map(|l| l["bdev_name"].as_str().map(str::to_string)).collect();
        let iops: f64 = names.iter().filter_map(|n| iops_of.get(n)).sum();
        exports.push(vec!["iscsi".into(), t["name"].as_str().unwrap_or("?").into(), names.join(","), fmt_rate(iops)]);
    }

    let mut activity = Vec::new();
    for s in arr(&now.snapshots).iter().filter(|s| s["state"] != "sealed") {
        activity.push(vec![
            "snapshot".into(),
            s["name"].as_str().unwrap_or("?").into(),
            s["state"].as_str().unwrap_or("?").into(),
            format!("{} old-epoch I/Os in flight", s["old_epoch_in_flight"]),
        ]);
    }
    for j in arr(&now.backups).iter().filter(|j| j["state"] == "in_progress") {
        let (done, total) = (num(j, "bytes_done"), num(j, "bytes_total"));
        let pct = if total > 0.0 { 100.0 * done / total } else { 0.0 };
        activity.push(vec![
            j["kind"].as_str().unwrap_or("backup").into(),
            format!("{} ({})", j["id"].as_str().unwrap_or("?"), j["source"].as_str().unwrap_or("?")),
            "in_progress".into(),
            format!("{pct:.1}% of {:.0} MB", total / 1e6),
        ]);
    }
    Frame { reactors, bdevs, exports, activity }
}

fn plain(title: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
    let mut out = format!("{title}\n{}\n", line(head.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

fn plain_frame(f: &Frame) -> String {
    [
        plain("reactors", &REACTOR_HEAD, &f.reactors),
        plain("bdevs", &BDEV_HEAD, &f.bdevs),
        plain("exports", &EXPORT_HEAD, &f.exports),
        plain("snapshots draining and jobs running", &ACTIVITY_HEAD, &f.activity),
    ]
    .join("\n")
}

fn table<'a>(title: &'a str, head: &'a [&'a str], rows: &'a [Vec<String>], widths: &'a [Constraint]) -> Table<'a> {
    Table::new(rows.iter().map(|r| Row::new(r.clone())), widths.to_vec())
        .header(Row::new(head.to_vec()).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(title))
}

/// Runs `tidemark top [--once] [--interval SECS]`; `call` makes one RPC.
pub fn main(args: &[String], socket: &str, call: &Call<'_>) {
    let once = args.iter().any(|a| a == "--once");
    let interval = args
        .iter()
        .position(|a| a == "--interval")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s >= 0.1)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(1));
    if once || !std::io::stdout().is_terminal() {
        let mut before: Option<Poll> = None;
        loop {
            let now = poll(call).unwrap_or_else(|e| super::fail(1, &e));
            if once && before.is_none() {
                // One frame with rates: two polls an interval apart.
                before = Some(now);
                std::thread::sleep(interval);
                continue;
            }
            println!("{}", plain_frame(&frame(&now, before.as_ref())));
            if once {
                return;
            }
            before = Some(now);
            std::thread::sleep(interval);
        }
    }
    let mut terminal = ratatui::init();
    let result = run(&mut terminal, socket, interval, call);
    ratatui::restore();
    if let Err(e) = result {
        super::fail(1, &e);
    }
}

fn run(terminal: &mut ratatui::DefaultTerminal, socket: &str, interval: Duration, call: &Call<'_>) -> Result<(), String> {
    let mut before: Option<Poll> = None;
    let mut now = poll(call)?;
    loop {
        let f = frame(&now, before.as_ref());
        let status = format!(" tidemark top: {socket}, every {:.1} s; q quits ", interval.as_secs_f64());
        terminal
            .draw(|ui| {
                let [head, r, b, e, a] = Layout::vertical([
                    Constraint::Length(1),
                    Constraint::Length(f.reactors.len() as u16 + 3),
                    Constraint::Min(4),
                    Constraint::Length(f.exports.len().min(8) as u16 + 3),
                    Constraint::Length(f.activity.len().min(8) as u16 + 3),
                ])
                .areas(ui.area());
                ui.render_widget(Paragraph::new(status.as_str()).style(Style::default().add_modifier(Modifier::REVERSED)), head);
                ui.render_widget(table("reactors", &REACTOR_HEAD, &f.reactors, &[Constraint::Length(6); 5]), r);
                let bw = [
                    Constraint::Min(12),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(15),
                    Constraint::Length(15),
                    Constraint::Length(5),
                    Constraint::Length(7),
                ];
                ui.render_widget(table("bdevs", &BDEV_HEAD, &f.bdevs, &bw), b);
                ui.render_widget(
                    table("exports", &EXPORT_HEAD, &f.exports, &[Constraint::Length(9), Constraint::Min(20), Constraint::Min(10), Constraint::Length(8)]),
                    e,
                );
                ui.render_widget(
                    table(
                        "snapshots draining, jobs running",
                        &ACTIVITY_HEAD,
                        &f.activity,
                        &[Constraint::Length(9), Constraint::Min(20), Constraint::Length(12), Constraint::Min(20)],
                    ),
                    a,
                );
            })
            .map_err(|e| format!("cannot draw: {e}"))?;
        // Wait out the interval, answering keys at once.
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if event::poll(left).map_err(|e| e.to_string())? {
                if let Event::Key(k) = event::read().map_err(|e| e.to_string())? {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
        before = Some(std::mem::replace(&mut now, poll(call)?));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantiles_come_from_the_ios_between_two_polls() {
        let before = json!([{"le_us": 10, "count": 100}]);
        let now = json!([{"le_us": 10, "count": 100}, {"le_us": 50, "count": 98}, {"le_us": 1000, "count": 2}]);
        // The 100 older I/Os do not count: of the 100 new ones, 98 took at most 50 µs.
        assert_eq!(quantile(&now, Some(&before), 0.5), Some(50.0));
        assert_eq!(quantile(&now, Some(&before), 0.99), Some(1000.0));
        assert_eq!(quantile(&before, Some(&before), 0.5), None, "no I/O between the polls");
    }
}
