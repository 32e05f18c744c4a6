//! Persistent reservations with real clients: in a QEMU guest (tests/guest/run.sh), the Linux
//! iSCSI initiator (open-iscsi) logs in to one tidemark LUN through two ifaces with two
//! initiator names, and sg3-utils' `sg_persist` registers, reserves, meets a conflict,
//! preempts, releases and clears across the two sessions (tests/iscsi/guest.sh). Half way,
//! the guest asks the host to restart tidemarkd: the APTPL keys and the reservation come back
//! from the data directory, and the reconnected sessions (same initiator ports) find them.
//!
//! Needs qemu-system-x86_64 and the guest image with open-iscsi and sg3-utils
//! (tests/guest/deps.sh, build.sh). Without qemu the test is skipped with a message, as it is
//! with TIDEMARK_SKIP_ISCSI_GUEST=1.
//!
//!     cargo test --test iscsi_guest -- --nocapture

mod support;

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const TARGET: &str = "guest-pr";
const IQN: &str = "iqn.2016-06.io.tidemark:guest-pr";
const HOST_A: &str = "iqn.2026-01.io.tidemark.test:guest-host-a";
const HOST_B: &str = "iqn.2026-01.io.tidemark.test:guest-host-b";

#[test]
fn sg_persist_from_two_open_iscsi_sessions_in_a_guest() {
    if std::env::var("TIDEMARK_SKIP_ISCSI_GUEST").as_deref() == Ok("1") {
        eprintln!("SKIPPED: TIDEMARK_SKIP_ISCSI_GUEST=1");
        return;
    }
    if !have("qemu-system-x86_64") {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (tests/guest/deps.sh installs it)");
        return;
    }
    let run_sh = tests_dir().join("guest/run.sh");
    let mut d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "pr0", "num_blocks": 16384, "block_size": 512}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    // The guest's connections arrive from 127.0.0.1 (QEMU user networking).
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": [HOST_A, HOST_B], "netmasks": ["127.0.0.1/32"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": TARGET, "luns": [{"bdev_name": "pr0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
    );
    let saved = d.dir.path().join("tidemark.toml");
    d.rpc("save_config", json!({"path": saved.display().to_string()}));

    let share = tempfile::Builder::new().prefix("tidemark-iscsi-guest").tempdir().unwrap();
    let logs = tempfile::Builder::new().prefix("tidemark-iscsi-guest-log").tempdir().unwrap();
    let (console_path, stderr_path) = (logs.path().join("console"), logs.path().join("stderr"));
    let t0 = Instant::now();
    let mut guest = Command::new(&run_sh)
        .arg(tests_dir().join("iscsi/guest.sh"))
        .env("TIDEMARK_GUEST_SHARE", share.path())
        .env("TIDEMARK_GUEST_VARS", "PORT IQN HOST_A HOST_B")
        .env("TIDEMARK_GUEST_TIMEOUT", std::env::var("TIDEMARK_GUEST_TIMEOUT").unwrap_or_else(|_| "600".into()))
        .env("PORT", port.to_string())
        .env("IQN", IQN)
        .env("HOST_A", HOST_A)
        .env("HOST_B", HOST_B)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("run tests/guest/run.sh");

    // Serve the guest's restart request while it runs.
    let request = share.path().join("restart.request");
    let mut restarted = false;
    let status = loop {
        if let Some(st) = guest.try_wait().expect("wait for the guest") {
            break st;
        }
        if !restarted && request.exists() {
            let stopped = d.terminate(Duration::from_secs(20)).is_some_and(|s| s.success());
            assert!(stopped, "tidemarkd did not stop cleanly:\n{}", d.log_text());
            assert!(d.data_dir().join("scsi-pr").join("pr0.json").exists(), "the APTPL state is on disk");
            d.restart();
            // Answered once the configuration (the portal) is in place.
            d.rpc("framework_wait_init", json!(null));
            std::fs::write(share.path().join("restart.done"), "ok").unwrap();
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    eprintln!("{console}\n{stderr}\n(guest run took {:?})", t0.elapsed());
    let failed: Vec<&str> = console.lines().filter(|l| l.contains("CHECK FAIL")).collect();
    assert!(failed.is_empty(), "guest checks failed: {failed:#?}\n{}", d.log_text());
    assert!(status.success(), "guest script failed ({status}); daemon log:\n{}", d.log_text());
    assert!(console.contains("iscsi-guest: ") && console.contains(" passed, 0 failed"), "the guest script did not finish");
    assert!(restarted, "the guest never asked for the restart");
    // CLEAR removed every registration: no APTPL state is left behind.
    assert!(!d.data_dir().join("scsi-pr").join("pr0.json").exists(), "the state file outlived the registrations");
}
