//! libiscsi's conformance suite (`iscsi-test-cu`, the whole suite with destructive tests, and a
//! second path to the same LUN for the multipath tests) against tidemark and against tgtd, both
//! started here on this machine in the same run. Each test is PASS, FAIL or SKIP (it printed a
//! `[SKIPPED]` notice: CUnit counts those as passed, we do not). tidemark must PASS every test
//! that tgtd PASSes and FAIL none but `iSCSIDataSnInvalid`; the run prints the counts of both
//! targets and every test that fails or skips on tidemark, and keeps the suite's output under
//! `target/tmp/iscsi-conformance/`.
//!
//! Two suites need more than one writable LUN: the ReadOnly suite skips unless the LUN is
//! write-protected, so it runs a second time against a read-only LUN of each target (a sealed
//! snapshot on tidemark, `readonly=1` on tgtd) and that run decides its outcome; the Sanitize
//! suite runs only with `--allow-sanitize`, which tidemark gets and tgtd does not (tgtd hangs
//! in the second run of `Sanitize.BlockEraseReserved`), so on tgtd those tests are SKIPs.
//!
//!     cargo test --test iscsi_conformance -- --nocapture
//!
//! Tools come from `tests/iscsi/deps.sh`; without them the test fails, unless
//! TIDEMARK_SKIP_ISCSI=1.

mod support;
#[path = "iscsi/tgtd.rs"]
mod tgtd;

use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Size of the LUN under test on both targets.
const LUN_MB: u64 = 128;
/// Size of the read-only LUN of the ReadOnly suite.
const RO_LUN_MB: u64 = 8;
/// Bound on one whole suite run (a run takes under a minute on a 2-core machine).
const SUITE_TIMEOUT_S: u64 = 900;

/// The one test tidemark may fail, and why.
const ALLOWED_FAILURE: (&str, &str) = (
    "iSCSIdatasn.iSCSIDataSnInvalid",
    "the test expects each write with a wrong DataSN to fail and the next one to succeed after an automatic reconnect; at ErrorRecoveryLevel 0 tidemark drops the connection on the first bad DataSN (RFC 7143 §7.1.4.1), and libiscsi's reconnect does not complete inside the test's 3 s timeout",
);

/// What one test did. A test that skips itself (libiscsi prints a `[SKIPPED]` notice and
/// CUnit records a pass) is a skip here, not a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Pass,
    Skip,
    Fail,
}

#[derive(Debug, Default)]
struct Results {
    /// Test name (Suite.Test) -> outcome; a test run by several families (ALL, SCSI, iSCSI,
    /// LINUX) keeps its worst outcome.
    tests: BTreeMap<String, Outcome>,
    finished: bool,
}

impl Results {
    fn count(&self, o: Outcome) -> usize {
        self.tests.values().filter(|x| **x == o).count()
    }
    fn names(&self, o: Outcome) -> Vec<&str> {
        self.tests.iter().filter(|(_, x)| **x == o).map(|(n, _)| n.as_str()).collect()
    }
    fn summary(&self) -> String {
        format!(
            "{} PASS, {} FAIL, {} SKIP ({} distinct tests)",
            self.count(Outcome::Pass),
            self.count(Outcome::Fail),
            self.count(Outcome::Skip),
            self.tests.len()
        )
    }
}

/// Reads CUnit's verbose console output: `Suite: S` lines, then per test `  Test: T ...`,
/// what the test printed, and CUnit's verdict (`passed` or `FAILED`) right after the `...` or
/// at the start of a line. A `[SKIPPED]` notice between the start and the verdict makes the
/// test a skip. Text after the verdict (suite cleanup) belongs to no test.
fn parse_verbose(out: &str) -> BTreeMap<String, Outcome> {
    const TEST: &str = "  Test: ";
    let mut tests = BTreeMap::new();
    let mut suite = String::new();
    for (i, chunk) in out.split(TEST).enumerate() {
        // The text before the first test and the tail of each chunk may name the next suite.
        let rest = if i == 0 {
            chunk
        } else {
            let Some(dots) = chunk.find(" ...") else { continue };
            let name = chunk[..dots].trim();
            let body = &chunk[dots + 4..];
            let verdict = ["passed", "FAILED"]
                .iter()
                .flat_map(|v| {
                    let at_start = body.starts_with(v).then_some(0);
                    let at_line = body.match_indices(&format!("\n{v}")).map(|(p, _)| p + 1).next();
                    at_start.or(at_line).map(|p| (p, *v))
                })
                .min();
            let Some((at, v)) = verdict else { continue };
            let outcome = if v == "FAILED" {
                Outcome::Fail
            } else if body[..at].contains("[SKIPPED]") {
                Outcome::Skip
            } else {
                Outcome::Pass
            };
            let e = tests.entry(format!("{suite}.{name}")).or_insert(outcome);
            *e = (*e).max(outcome);
            &body[at..]
        };
        for line in rest.lines() {
            if let Some(s) = line.strip_prefix("Suite: ") {
                suite = s.trim().to_string();
            }
        }
    }
    tests
}

/// Runs the suite against `url`, with `url2` as the second path of the multipath tests (the
/// same LUN through a second session with the second initiator name), with `extra` options
/// (`--allow-sanitize`, `--test=...`).
fn run_suite(url: &str, url2: &str, extra: &[&str], dir: &Path) -> Results {
    std::fs::create_dir_all(dir).unwrap();
    let t0 = Instant::now();
    let log = dir.join("suite.out");
    let f = std::fs::File::create(&log).unwrap();
    let status = Command::new("timeout")
        .args(["-k", "10", &SUITE_TIMEOUT_S.to_string(), "iscsi-test-cu", "--dataloss", "--verbose"])
        .args(extra)
        .args([url, url2])
        .current_dir(dir)
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .status()
        .expect("run iscsi-test-cu");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).to_string();
    let tests = parse_verbose(&text);
    let finished = status.code() != Some(124) && status.code() != Some(137) && text.contains("Run Summary");
    eprintln!("  {url}: {} tests in {:.0} s (exit {:?}), output in {}", tests.len(), t0.elapsed().as_secs_f64(), status.code(), log.display());
    Results { tests, finished }
}

/// The suite that only runs against a write-protected LUN (it skips elsewhere).
const READONLY_SUITE: &str = "ReadOnly.";

/// Runs the ReadOnly suite against the read-only LUN `url` and lets that run decide the
/// suite's outcome in `main` (where it skipped: the LUN there is writable).
fn add_readonly_run(main: &mut Results, url: &str, dir: &Path) {
    let ro = run_suite(url, url, &["--test=ALL.ReadOnly"], dir);
    assert!(ro.finished, "the ReadOnly suite did not complete against {url}; see {}", dir.display());
    let mut ran = 0;
    for (n, o) in ro.tests.iter().filter(|(n, _)| n.starts_with(READONLY_SUITE)) {
        main.tests.insert(n.clone(), *o);
        ran += 1;
    }
    assert!(ran > 0, "no ReadOnly test ran against {url}; see {}", dir.display());
}

#[test]
fn iscsi_test_cu_passes_everything_tgtd_passes() {
    let need = ["iscsi-test-cu", "tgtd", "tgtadm", "timeout"];
    let missing: Vec<_> = need.iter().filter(|c| !have(c)).collect();
    if !missing.is_empty() {
        if std::env::var("TIDEMARK_SKIP_ISCSI").as_deref() == Ok("1") {
            eprintln!("SKIPPED: {missing:?} missing and TIDEMARK_SKIP_ISCSI=1");
            return;
        }
        panic!("{missing:?} not installed: run tests/iscsi/deps.sh (or set TIDEMARK_SKIP_ISCSI=1 to skip)");
    }
    let work = tempfile::Builder::new().prefix("tidemark-conformance").tempdir().unwrap();
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("iscsi-conformance");
    let _ = std::fs::remove_dir_all(&keep);

    // The peer first, alone on the machine.
    let mut tgt = tgtd::Tgtd::start(free_port(), tgtd::free_control_port(), LUN_MB, work.path());
    let mut peer = run_suite(&tgt.url(), &tgt.url(), &[], &keep.join("tgtd"));
    let ro_url = tgt.add_readonly_lun(2, RO_LUN_MB);
    add_readonly_run(&mut peer, &ro_url, &keep.join("tgtd-readonly"));
    tgt.stop();

    // Then tidemark with a RAM bdev of the same size (and a second LUN, a copy target).
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    for name in ["ram0", "ram1"] {
        d.rpc("bdev_malloc_create", json!({"name": name, "num_blocks": (LUN_MB << 20) / 512, "block_size": 512}));
    }
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "conformance", "luns": [{"bdev_name": "ram0", "lun_id": 0}, {"bdev_name": "ram1", "lun_id": 1}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 64}),
    );
    // A read-only LUN: a sealed snapshot of a copy-on-write volume.
    for (name, blocks) in [("robase", (RO_LUN_MB << 20) / 512), ("rostore", (RO_LUN_MB << 20) / 512 + 4096)] {
        d.rpc("bdev_malloc_create", json!({"name": name, "num_blocks": blocks, "block_size": 512}));
    }
    d.rpc("bdev_cow_create", json!({"name": "rovol", "base_bdev": "robase", "store_bdev": "rostore", "grain_kb": 64}));
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "rovol", "snapshot_name": "ro", "wait_sealed": true}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "conformance-ro", "luns": [{"bdev_name": "ro", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 64}),
    );
    let url = format!("iscsi://127.0.0.1:{port}/iqn.2016-06.io.tidemark:conformance/0");
    let mut ours = run_suite(&url, &url, &["--allow-sanitize"], &keep.join("tidemark"));
    add_readonly_run(&mut ours, &format!("iscsi://127.0.0.1:{port}/iqn.2016-06.io.tidemark:conformance-ro/0"), &keep.join("tidemark-readonly"));
    // The daemon survived the whole suite.
    assert!(d.try_rpc("iscsi_get_connections", json!(null)).is_ok(), "tidemarkd stopped answering:\n{}", d.log_text());
    std::thread::sleep(Duration::from_millis(100));

    let theirs = |n: &str| peer.tests.get(n).copied();
    // Every test tgtd passes (without skipping) passes here too.
    let regressions: Vec<(&String, Outcome)> = peer
        .tests
        .iter()
        .filter(|(_, o)| **o == Outcome::Pass)
        .filter_map(|(n, _)| match ours.tests.get(n) {
            Some(Outcome::Pass) => None,
            Some(o) => Some((n, *o)),
            None => Some((n, Outcome::Fail)),
        })
        .collect();
    let failures: Vec<&str> = ours.names(Outcome::Fail);
    let unexpected: Vec<&&str> = failures.iter().filter(|n| **n != ALLOWED_FAILURE.0).collect();

    let mut report = String::new();
    report += "iscsi-test-cu --dataloss (whole suite, two paths for MultipathIO), same machine, same run\n";
    report += "ReadOnly suite: its own run against a read-only LUN of each target; Sanitize suite: --allow-sanitize on tidemark only (tgtd hangs with it)\n";
    report += &format!("tgtd:     {}\n", peer.summary());
    report += &format!("tidemark: {}\n", ours.summary());
    report += "(a test that printed a [SKIPPED] notice is a SKIP: CUnit itself counts it as passed)\n";
    report += &format!("passing on tgtd but not on tidemark: {}\n", regressions.len());
    for (n, o) in &regressions {
        report += &format!("  REGRESSION {n}: {o:?} on tidemark\n");
    }
    report += &format!("failing on tidemark: {}\n", failures.len());
    for n in &failures {
        let why = if *n == ALLOWED_FAILURE.0 { ALLOWED_FAILURE.1 } else { "(unexpected)" };
        report += &format!("  FAIL {n} (tgtd: {:?}): {why}\n", theirs(n));
    }
    report += "skipped on tidemark:\n";
    for n in ours.names(Outcome::Skip) {
        report += &format!("  SKIP {n} (tgtd: {:?})\n", theirs(n));
    }
    let better: Vec<&str> = ours.names(Outcome::Pass).into_iter().filter(|n| theirs(n) != Some(Outcome::Pass)).collect();
    report += &format!("passing on tidemark but not on tgtd: {}\n", better.len());
    for n in &better {
        report += &format!("  {n} (tgtd: {:?})\n", theirs(n));
    }
    eprintln!("{report}");
    let _ = std::fs::write(keep.join("report.txt"), &report);
    // The plain closing lines CI reads.
    eprintln!("conformance tidemark: {}", ours.summary());
    eprintln!("conformance tgtd:     {}", peer.summary());

    assert!(peer.finished && peer.tests.len() > 200, "the suite did not complete against tgtd ({} tests); see {}", peer.tests.len(), keep.display());
    assert!(ours.finished, "the suite did not complete against tidemark (hang or crash):\n{}", d.log_text());
    assert!(regressions.is_empty(), "tidemark does not pass tests that tgtd passes: {regressions:?}\n{report}");
    assert!(unexpected.is_empty(), "tidemark fails {unexpected:?}\n{report}");
}

#[test]
fn verbose_output_parsing_tells_pass_fail_and_skip() {
    let out = "found matching LU\n\n     CUnit - A unit testing framework\n\nSuite: A\n  Test: x ...passed\n  Test: y ...    [FAILED] it said\nFAILED\n    1. f.c:45  - CU_ASSERT_EQUAL(a,b)\n\
               \n  Test: z ...    [SKIPPED] not implemented\npassed    [SKIPPED] cleanup says something\nSuite: B\n  Test: x ...    [FAILED] printed but allowed\npassed\n\
               \n  Test: w ...passed    [SKIPPED] from the suite cleanup\nSuite: A\n  Test: x ...FAILED\n    1. f.c:1 - no\n\nRun Summary:  Type Total\n";
    let r = parse_verbose(out);
    assert_eq!(r.len(), 5, "{r:?}");
    assert_eq!(r["A.x"], Outcome::Fail, "the worst of two runs");
    assert_eq!(r["A.y"], Outcome::Fail);
    assert_eq!(r["A.z"], Outcome::Skip);
    assert_eq!(r["B.x"], Outcome::Pass, "a [FAILED] notice in a passing test is the test's business");
    assert_eq!(r["B.w"], Outcome::Pass, "a notice after the verdict belongs to no test");
}
