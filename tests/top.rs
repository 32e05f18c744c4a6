//! `tidemark top` as the on-call engineer meets it: in a real terminal (tmux) against a daemon
//! under load from a real client (libiscsi's iscsi-perf), it shows the bdev's IOPS and
//! latency, and `q` ends it cleanly; piped, it prints plain frames.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn busy_daemon() -> (Daemon, Child) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", serde_json::json!({"name": "ram0", "num_blocks": 131072, "block_size": 512}));
    d.rpc("iscsi_create_portal_group", serde_json::json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", serde_json::json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    d.rpc(
        "iscsi_create_target_node",
        serde_json::json!({"name": "iqn.2016-06.io.tidemark:top", "luns": [{"bdev_name": "ram0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
    let load = Command::new("iscsi-perf")
        .args(["-r", "-m", "8", "-t", "30"])
        .arg(format!("iscsi://127.0.0.1:{port}/iqn.2016-06.io.tidemark:top/0"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iscsi-perf (tests/iscsi/deps.sh installs it)");
    (d, load)
}

fn stop(mut load: Child) {
    let _ = load.kill();
    let _ = load.wait();
}

/// The number in the bdev table's `r IOPS` column for `bdev` (first number after its name).
fn read_iops(screen: &str, bdev: &str) -> Option<f64> {
    let line = screen.lines().find(|l| l.split(|c: char| c.is_whitespace() || c == '│').any(|w| w == bdev))?;
    let after = &line[line.find(bdev)? + bdev.len()..];
    let word = after.split(|c: char| c.is_whitespace() || c == '│').find(|w| !w.is_empty())?;
    let (n, scale) = match word.strip_suffix('K') {
        Some(n) => (n, 1e3),
        None => match word.strip_suffix('M') {
            Some(n) => (n, 1e6),
            None => (word, 1.0),
        },
    };
    n.parse::<f64>().ok().map(|x| x * scale)
}

#[test]
fn top_in_a_terminal_shows_iops_and_quits_on_q() {
    if !require_tools(&["iscsi-perf", "tmux"], "TIDEMARK_SKIP_ISCSI") {
        return;
    }
    let (d, load) = busy_daemon();
    let session = format!("tidemark-top-{}", std::process::id());
    let cmd = format!("'{TIDEMARK}' -s '{}' top --interval 0.5", d.socket.display());
    let ok = Command::new("tmux").args(["new-session", "-d", "-s", &session, "-x", "150", "-y", "45", &cmd]).status().expect("tmux");
    assert!(ok.success());
    let capture = || {
        let out = Command::new("tmux").args(["capture-pane", "-p", "-t", &session]).output().expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut screen = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        screen = capture();
        if read_iops(&screen, "ram0").is_some_and(|x| x > 0.0) {
            break;
        }
    }
    let iops = read_iops(&screen, "ram0");
    assert!(iops.is_some_and(|x| x > 0.0), "no read IOPS for ram0 on the screen:\n{screen}");
    assert!(screen.contains("reactors") && screen.contains("iqn.2016-06.io.tidemark:top"), "{screen}");

    Command::new("tmux").args(["send-keys", "-t", &session, "q"]).status().expect("send-keys");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut gone = false;
    while Instant::now() < deadline && !gone {
        std::thread::sleep(Duration::from_millis(100));
        gone = !Command::new("tmux").args(["has-session", "-t", &session]).stderr(Stdio::null()).status().expect("tmux").success();
    }
    if !gone {
        let _ = Command::new("tmux").args(["kill-session", "-t", &session]).status();
    }
    stop(load);
    assert!(gone, "tidemark top did not quit on q");
}

#[test]
fn top_piped_prints_plain_frames() {
    if !require_tools(&["iscsi-perf"], "TIDEMARK_SKIP_ISCSI") {
        return;
    }
    let (d, load) = busy_daemon();
    std::thread::sleep(Duration::from_millis(500));
    let out = d.cli(&["top", "--once", "--interval", "0.5"]);
    stop(load);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("r IOPS") && read_iops(&text, "ram0").is_some_and(|x| x > 0.0), "{text}");
}
