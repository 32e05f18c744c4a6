//! The iSCSI target end to end: real initiators (libiscsi's tools, QEMU's iSCSI driver) and a
//! raw initiator that sends broken PDUs, against the real daemon.
//!
//! Tools come from `tests/iscsi/deps.sh`; without them these tests fail, unless
//! TIDEMARK_SKIP_ISCSI=1.

#[path = "iscsi/client.rs"]
mod client;
mod support;

use client::{read10, write10, LoginOptions, Session};
use serde_json::json;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const TARGET: &str = "iqn.2016-06.io.tidemark:t0";
const INITIATOR: &str = "iqn.2024-01.test:initiator";

/// The clients this test drives; false: skip (TIDEMARK_SKIP_ISCSI=1).
pub fn tools(cmds: &[&str]) -> bool {
    require_tools(cmds, "TIDEMARK_SKIP_ISCSI")
}

/// A daemon exporting a malloc bdev `m0` (`blocks` x 512) as LUN 0 of [`TARGET`].
fn daemon_with_target(blocks: u64, extra_node: serde_json::Value) -> (Daemon, SocketAddr) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": blocks, "block_size": 512}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    let mut node = json!({"name": TARGET, "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32});
    if let (Some(n), Some(e)) = (node.as_object_mut(), extra_node.as_object()) {
        for (k, v) in e {
            n.insert(k.clone(), v.clone());
        }
    }
    d.rpc("iscsi_create_target_node", node);
    (d, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn url(addr: SocketAddr, lun: u32) -> String {
    format!("iscsi://{addr}/{TARGET}/{lun}")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn qemu_io_patterns_read_back_and_qemu_img_convert_round_trips() {
    if !tools(&["qemu-io", "qemu-img", "timeout"]) {
        return;
    }
    let (d, addr) = daemon_with_target(65536, json!({}));
    let u = url(addr, 0);
    // Patterns at several offsets and sizes (some not multiples of a page), read back with -P.
    let writes = [("0xab", 0u64, 65536u64), ("0x5c", 1 << 20, 4096), ("0x17", 3 << 20, 1 << 20), ("0xe1", (8 << 20) + 3 * 512, 512)];
    for (pat, off, len) in writes {
        let (ok, out) = run(Command::new("timeout").args(["60", "qemu-io", "-f", "raw", "-c", &format!("write -P {pat} {off} {len}"), &u]));
        assert!(ok && out.contains("wrote"), "qemu-io write: {out}\n{}", d.log_text());
    }
    for (pat, off, len) in writes {
        let (ok, out) = run(Command::new("timeout").args(["60", "qemu-io", "-f", "raw", "-c", &format!("read -P {pat} {off} {len}"), &u]));
        assert!(ok && out.contains("read") && !out.contains("Pattern verification failed"), "qemu-io read -P {pat}: {out}");
    }
    // A wrong pattern must be noticed (the check can fail).
    let (_, out) = run(Command::new("timeout").args(["60", "qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4096", &u]));
    assert!(out.contains("Pattern verification failed"), "{out}");

    // A whole volume in and out: a pseudo-random image through qemu-img convert both ways.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut img = vec![0u8; 65536 * 512];
    let mut x = 0x1234_5678u32;
    for b in img.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&src, &img).unwrap();
    let (ok, out) = run(Command::new("timeout").args(["120", "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&u));
    assert!(ok, "qemu-img convert to iSCSI: {out}");
    let (ok, out) = run(Command::new("timeout").args(["120", "qemu-img", "convert", "-f", "raw", "-O", "raw"]).arg(&u).arg(&back));
    assert!(ok, "qemu-img convert from iSCSI: {out}");
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), img.len());
    assert!(got == img, "the volume read back differs from what was written");
    let (ok, out) = run(Command::new("timeout").args(["60", "qemu-img", "compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&u));
    assert!(ok, "qemu-img compare: {out}");
}

#[test]
fn chap_refuses_a_wrong_secret_and_accepts_the_right_one() {
    if !tools(&["iscsi-inq", "iscsi-ls", "timeout"]) {
        return;
    }
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 512}));
    d.rpc("iscsi_create_auth_group", json!({"tag": 1, "secrets": [{"user": "alice", "secret": "alicesecret12", "muser": "tgt", "msecret": "targetsecret34"}]}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["ANY"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "oneway", "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8, "require_chap": true, "chap_group": 1}),
    );
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 2048, "block_size": 512}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "mutual", "luns": [{"bdev_name": "m1", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8, "require_chap": true, "mutual_chap": true, "chap_group": 1}),
    );
    let base = "iqn.2016-06.io.tidemark";
    let inq = |creds: &str, target: &str, extra: &str| {
        run(Command::new("timeout").args(["20", "iscsi-inq", &format!("iscsi://{creds}127.0.0.1:{port}/{base}:{target}/0{extra}")]))
    };
    let (ok, out) = inq("alice%alicesecret12@", "oneway", "");
    assert!(ok && out.contains("Peripheral Device Type:DIRECT_ACCESS"), "right secret: {out}");
    let (ok, out) = inq("alice%wrongsecret99@", "oneway", "");
    assert!(!ok, "a wrong secret must be refused: {out}");
    let (ok, out) = inq("mallory%alicesecret12@", "oneway", "");
    assert!(!ok, "an unknown user must be refused: {out}");
    let (ok, out) = inq("", "oneway", "");
    assert!(!ok, "no CHAP at all must be refused when CHAP is required: {out}");
    // Mutual CHAP: the initiator also checks the target's answer.
    let (ok, out) = inq("alice%alicesecret12@", "mutual", "?target_user=tgt&target_password=targetsecret34");
    assert!(ok, "mutual CHAP with the right secrets: {out}");
    let (ok, out) = inq("alice%alicesecret12@", "mutual", "");
    assert!(!ok, "mutual CHAP is required: {out}");
    let (ok, out) = inq("alice%alicesecret12@", "mutual", "?target_user=tgt&target_password=notthesecret");
    assert!(!ok, "the initiator refuses a target that answers with another secret: {out}");
    assert!(d.metrics().contains("tidemark_iscsi_login_failures_total"));
}

#[test]
fn initiators_outside_the_group_see_nothing_and_cannot_log_in() {
    if !tools(&["iscsi-ls", "iscsi-inq", "timeout"]) {
        return;
    }
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 512}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["iqn.2024-01.test:allowed"], "netmasks": ["127.0.0.0/8"]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 2, "initiators": ["ANY"], "netmasks": ["10.9.9.0/24"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "guarded", "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8}),
    );
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 2048, "block_size": 512}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": "elsewhere", "luns": [{"bdev_name": "m1", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 2}], "queue_depth": 8}),
    );
    let portal = format!("iscsi://127.0.0.1:{port}");
    let (ok, out) = run(Command::new("timeout").args(["20", "iscsi-ls", "-i", "iqn.2024-01.test:allowed", &portal]));
    assert!(ok && out.contains("iqn.2016-06.io.tidemark:guarded"), "{out}");
    assert!(!out.contains("elsewhere"), "a target for another network must stay hidden: {out}");
    let (_, out) = run(Command::new("timeout").args(["20", "iscsi-ls", "-i", "iqn.2024-01.test:stranger", &portal]));
    assert!(!out.contains("guarded") && !out.contains("elsewhere"), "a stranger must see no target: {out}");
    let lun = format!("{portal}/iqn.2016-06.io.tidemark:guarded/0");
    let (ok, out) = run(Command::new("timeout").args(["20", "iscsi-inq", "-i", "iqn.2024-01.test:allowed", &lun]));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("timeout").args(["20", "iscsi-inq", "-i", "iqn.2024-01.test:stranger", &lun]));
    assert!(!ok, "a stranger must not log in: {out}");
    // The raw initiator sees the exact status: authorization failure (2/2).
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let r = Session::login(addr, &LoginOptions::normal("iqn.2024-01.test:stranger", "iqn.2016-06.io.tidemark:guarded"));
    assert_eq!(r.err(), Some((2, 2)));
    let r = Session::login(addr, &LoginOptions::normal("iqn.2024-01.test:allowed", "iqn.2016-06.io.tidemark:nosuch"));
    assert_eq!(r.err(), Some((2, 3)), "an unknown target is 'not found'");
}

#[test]
fn bad_pdus_get_the_protocols_errors_and_other_sessions_keep_working() {
    let (d, addr) = daemon_with_target(2048, json!({}));
    let mut good = Session::login(addr, &LoginOptions::normal(INITIATOR, TARGET)).expect("login");
    let check_good = |s: &mut Session| {
        let data = vec![0x3Cu8; 1024];
        let r = s.scsi(0, &write10(8, 2), 1024, Some(&data)).expect("write on the good session");
        assert_eq!(r.status, 0);
        let r = s.scsi(0, &read10(8, 2), 1024, None).expect("read on the good session");
        assert_eq!((r.status, r.data.as_slice()), (0, data.as_slice()));
    };
    check_good(&mut good);

    // Out-of-range LBA: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE.
    let r = good.scsi(0, &read10(2047, 2), 1024, None).unwrap();
    assert_eq!((r.status, r.sense), (2, Some((5, 0x21, 0))));
    let r = good.scsi(0, &write10(4000, 1), 512, Some(&[0u8; 512])).unwrap();
    assert_eq!((r.status, r.sense), (2, Some((5, 0x21, 0))));
    // Unknown opcode and a bad field: 20/00 and 24/00.
    let r = good.scsi(0, &[0xC7, 0, 0, 0, 0, 0], 0, None).unwrap();
    assert_eq!(r.sense, Some((5, 0x20, 0)));
    let r = good.scsi(0, &[0x12, 0, 0x80, 0, 0xFF, 0], 255, None).unwrap();
    assert_eq!(r.sense, Some((5, 0x24, 0)));
    // A LUN that does not exist: 25/00.
    let r = good.scsi(7, &[0, 0, 0, 0, 0, 0], 0, None).unwrap();
    assert_eq!(r.sense, Some((5, 0x25, 0)));

    // A data segment longer than the target's MaxRecvDataSegmentLength: Reject (protocol
    // error), then the connection closes.
    let mut s = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 0, 2], ..LoginOptions::normal(INITIATOR, TARGET) }).unwrap();
    let mut h = s.command_header(0, &write10(0, 1), 512, false, true);
    let big = s.target_mrdsl as u32 + 4096;
    h[5..8].copy_from_slice(&big.to_be_bytes()[1..]);
    s.s.write_all_raw(&h);
    let p = s.recv().expect("a Reject");
    assert_eq!((p.opcode(), p.bhs[2]), (0x3F, 0x04), "Reject with reason 'protocol error'");
    assert!(s.closed_within(Duration::from_secs(5)));

    // A truncated PDU: half a header, then the initiator goes away.
    let mut s = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 0, 3], ..LoginOptions::normal(INITIATOR, TARGET) }).unwrap();
    let h = s.command_header(0, &read10(0, 1), 512, true, false);
    s.s.write_all_raw(&h[..20]);
    drop(s);
    // A header that announces data that never fully arrives.
    let mut s = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 0, 4], ..LoginOptions::normal(INITIATOR, TARGET) }).unwrap();
    let mut h = s.command_header(0, &write10(0, 2), 1024, false, true);
    h[5..8].copy_from_slice(&1024u32.to_be_bytes()[1..]);
    s.s.write_all_raw(&h);
    s.s.write_all_raw(&[1u8; 100]);
    drop(s);

    // Digests: a wrong data digest gets Reject 'data digest error' and the session goes on;
    // a wrong header digest drops the connection (its lengths cannot be trusted).
    let mut s = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 0, 5], digests: true, ..LoginOptions::normal(INITIATOR, TARGET) }).unwrap();
    assert!(s.header_digest && s.data_digest, "digests negotiated: {:?}", s.login_keys);
    assert_eq!(s.ping(b"hello digests").unwrap(), b"hello digests");
    let mut h = [0u8; 48];
    h[0] = 0x40;
    h[1] = 0x80;
    h[16..20].copy_from_slice(&77u32.to_be_bytes());
    h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    h[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    h[5..8].copy_from_slice(&8u32.to_be_bytes()[1..]);
    let mut raw = h.to_vec();
    raw.extend_from_slice(&client::crc(&[&h]));
    raw.extend_from_slice(b"pingpong");
    raw.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    s.s.write_all_raw(&raw);
    let p = s.recv().expect("a Reject for the bad data digest");
    assert_eq!((p.opcode(), p.bhs[2]), (0x3F, 0x02));
    let r = s.scsi(0, &read10(8, 2), 1024, None).unwrap_or_else(|e| panic!("the session continues after a data digest error: {e}\n{}", d.log_text()));
    assert_eq!(r.status, 0);
    let mut raw = h.to_vec();
    raw.extend_from_slice(&[1, 2, 3, 4]);
    s.s.write_all_raw(&raw);
    assert!(s.closed_within(Duration::from_secs(5)), "a header digest error closes the connection");

    // Garbage instead of a login.
    let mut raw = Session::connect(addr);
    use std::io::Write;
    let _ = raw.write_all(&[0xFFu8; 48]);
    drop(raw);

    // Through all of this the first session kept working, and the daemon is alive.
    check_good(&mut good);
    assert!(d.try_rpc("iscsi_get_connections", json!(null)).is_ok());
}

trait WriteRaw {
    fn write_all_raw(&mut self, b: &[u8]);
}

impl WriteRaw for std::net::TcpStream {
    fn write_all_raw(&mut self, b: &[u8]) {
        use std::io::Write;
        self.write_all(b).expect("send raw bytes");
    }
}

#[test]
fn dead_initiators_are_dropped_after_an_unanswered_nop_in() {
    let (d, addr) = daemon_with_target(2048, json!({}));
    d.rpc("iscsi_set_options", json!({"nop_in_interval": 1, "nop_timeout": 1}));
    let mut s = Session::login(addr, &LoginOptions::normal(INITIATOR, TARGET)).unwrap();
    // The target pings after a second of silence.
    s.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let p = s.recv().expect("a NOP-In ping");
    assert_eq!(p.opcode(), 0x20);
    assert_eq!(p.itt(), u32::MAX);
    let ttt = p.u32(20);
    assert_ne!(ttt, u32::MAX);
    // Answer it: the connection stays.
    let mut h = [0u8; 48];
    h[0] = 0x40;
    h[1] = 0x80;
    h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    h[20..24].copy_from_slice(&ttt.to_be_bytes());
    h[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    s.send(h, &[]).unwrap();
    assert_eq!(d.rpc("iscsi_get_connections", json!(null)).as_array().unwrap().len(), 1);
    // Stop answering: dropped within interval + timeout (+ slack).
    let t0 = Instant::now();
    let mut closed = false;
    while t0.elapsed() < Duration::from_secs(10) {
        match s.recv() {
            Ok(p) => assert_eq!(p.opcode(), 0x20, "only pings while idle"),
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the target did not drop a silent initiator");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.rpc("iscsi_get_connections", json!(null)).as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the session is still listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.metrics().contains("tidemark_iscsi_nop_timeouts_total{} 1"), "{}", d.metrics());
}

#[test]
fn a_new_login_with_the_same_isid_reinstates_the_session() {
    let (d, addr) = daemon_with_target(2048, json!({}));
    let o = LoginOptions::normal(INITIATOR, TARGET);
    let mut first = Session::login(addr, &o).unwrap();
    first.ping(b"x").unwrap();
    let mut second = Session::login(addr, &o).expect("reinstatement login");
    assert!(first.closed_within(Duration::from_secs(5)), "the old connection is closed");
    second.ping(b"y").unwrap();
    let conns = d.rpc("iscsi_get_connections", json!(null));
    assert_eq!(conns.as_array().unwrap().len(), 1, "{conns}");
    // Another ISID is another session.
    let mut third = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 9, 9], ..LoginOptions::normal(INITIATOR, TARGET) }).unwrap();
    third.ping(b"z").unwrap();
    second.ping(b"w").unwrap();
    assert_eq!(d.rpc("iscsi_get_connections", json!(null)).as_array().unwrap().len(), 2);
}

#[test]
fn adding_a_lun_raises_reported_luns_data_has_changed() {
    let (d, addr) = daemon_with_target(2048, json!({}));
    let mut s = Session::login(addr, &LoginOptions::normal(INITIATOR, TARGET)).unwrap();
    assert_eq!(s.scsi(0, &[0, 0, 0, 0, 0, 0], 0, None).unwrap().status, 0);
    d.rpc("bdev_malloc_create", json!({"name": "m9", "num_blocks": 4096, "block_size": 4096}));
    d.rpc("iscsi_target_node_add_lun", json!({"name": TARGET, "bdev_name": "m9", "lun_id": 3}));
    let r = s.scsi(0, &[0, 0, 0, 0, 0, 0], 0, None).unwrap();
    assert_eq!((r.status, r.sense), (2, Some((6, 0x3F, 0x0E))), "UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED");
    assert_eq!(s.scsi(0, &[0, 0, 0, 0, 0, 0], 0, None).unwrap().status, 0, "reported once");
    let r = s.scsi(0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256, None).unwrap();
    assert_eq!(&r.data[..4], &16u32.to_be_bytes());
    assert_eq!(r.data[8 + 8 + 1], 3);
    // The new LUN works, with its own geometry.
    let r = s.scsi(3, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, None).unwrap();
    assert_eq!(&r.data[..], &[0, 0, 0x0F, 0xFF, 0, 0, 0x10, 0]);
    // A LUN reset on another session raises POWER ON/RESET on this one.
    let mut other = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 0, 7], ..LoginOptions::normal(INITIATOR, TARGET) }).unwrap();
    let mut h = [0u8; 48];
    h[0] = 0x42;
    h[1] = 0x80 | 5;
    h[16..20].copy_from_slice(&999u32.to_be_bytes());
    h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    h[24..28].copy_from_slice(&other.cmd_sn.to_be_bytes());
    other.send(h, &[]).unwrap();
    let p = other.recv().unwrap();
    assert_eq!((p.opcode(), p.bhs[2]), (0x22, 0), "LUN RESET: function complete");
    let r = s.scsi(0, &[0, 0, 0, 0, 0, 0], 0, None).unwrap();
    assert_eq!(r.sense, Some((6, 0x29, 0)));
    // The LUN's bdev cannot be deleted while exported; the node can, and then the bdev.
    assert_eq!(d.try_rpc("bdev_malloc_delete", json!({"name": "m9"})).unwrap_err().code, -16);
    d.rpc("iscsi_delete_target_node", json!({"name": TARGET}));
    assert!(s.closed_within(Duration::from_secs(5)), "deleting the node closes its sessions");
    d.rpc("bdev_malloc_delete", json!({"name": "m9"}));
}

#[test]
fn rpcs_validate_their_params_and_save_config_round_trips() {
    let (d, _addr) = daemon_with_target(2048, json!({"alias_name": "first", "header_digest": true}));
    let e = d
        .try_rpc("iscsi_create_target_node", json!({"name": "x", "luns": [{"bdev_name": "nope", "lun_id": 0}], "pg_ig_maps": [], "queue_depth": 8}))
        .unwrap_err();
    assert_eq!(e.code, -19, "{e:?}");
    let e = d.try_rpc("iscsi_create_target_node", json!({"name": "x", "luns": [], "pg_ig_maps": [], "queue_depth": 8})).unwrap_err();
    assert!(e.code == -32602 && e.message.contains("luns"), "{e:?}");
    let e = d
        .try_rpc(
            "iscsi_create_target_node",
            json!({"name": "x", "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 5, "ig_tag": 1}], "queue_depth": 8}),
        )
        .unwrap_err();
    assert!(e.message.contains("pg_tag"), "{e:?}");
    let e = d
        .try_rpc("iscsi_create_target_node", json!({"name": "Bad Name", "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [], "queue_depth": 8}))
        .unwrap_err();
    assert!(e.message.contains("name"), "{e:?}");
    let e = d.try_rpc("iscsi_create_portal_group", json!({"tag": 2, "portals": [{"host": "nohost", "port": "1"}]})).unwrap_err();
    assert!(e.message.contains("portals[0]"), "{e:?}");
    let e = d.try_rpc("iscsi_create_initiator_group", json!({"tag": 2, "initiators": ["ANY"], "netmasks": ["1.2.3.4/40"]})).unwrap_err();
    assert!(e.message.contains("netmasks[0]"), "{e:?}");
    let e = d
        .try_rpc(
            "iscsi_create_target_node",
            json!({"name": "y", "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [], "queue_depth": 8, "mutual_chap": true}),
        )
        .unwrap_err();
    assert!(e.message.contains("mutual_chap"), "{e:?}");
    assert_eq!(d.try_rpc("iscsi_delete_portal_group", json!({"tag": 1})).unwrap_err().code, -16, "in use by the node");
    assert_eq!(d.try_rpc("iscsi_set_options", json!({"max_connections_per_session": 4})).unwrap_err().code, -32602);
    let nodes = d.rpc("iscsi_get_target_nodes", json!(null));
    assert_eq!(nodes[0]["name"], TARGET);
    assert_eq!(nodes[0]["alias_name"], "first");
    assert_eq!(nodes[0]["luns"][0]["bdev_name"], "m0");
    assert_eq!(d.rpc("iscsi_get_portal_groups", json!(null))[0]["tag"], 1);
    assert_eq!(d.rpc("iscsi_get_initiator_groups", json!(null))[0]["initiators"][0], "ANY");

    let path = d.dir.path().join("saved.toml");
    d.rpc("save_config", json!({"path": path.display().to_string()}));
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(saved.contains("iscsi_create_target_node"), "{saved}");
    // The saved config starts a daemon with the same target (on the same port: stop us first).
    drop(d);
    let d2 = Daemon::start(&saved);
    let nodes = d2.rpc("iscsi_get_target_nodes", json!(null));
    assert_eq!(nodes[0]["name"], TARGET);
    assert_eq!(nodes[0]["header_digest"], true);
    let cfg = d2.rpc("framework_get_config", json!({"name": "iscsi"}));
    let methods: Vec<&str> = cfg.as_array().unwrap().iter().map(|c| c["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["iscsi_create_portal_group", "iscsi_create_initiator_group", "iscsi_create_target_node"]);
}

#[test]
fn metrics_report_per_lun_io_and_sessions() {
    let (d, addr) = daemon_with_target(2048, json!({}));
    let mut s = Session::login(addr, &LoginOptions::normal(INITIATOR, TARGET)).unwrap();
    for i in 0..10u32 {
        s.scsi(0, &write10(i, 1), 512, Some(&[i as u8; 512])).unwrap();
        s.scsi(0, &read10(i, 1), 512, None).unwrap();
    }
    let m = d.metrics();
    let line = |prefix: &str| m.lines().find(|l| l.starts_with(prefix)).map(str::to_string).unwrap_or_default();
    assert!(line("tidemark_iscsi_lun_ops_total{target=\"iqn.2016-06.io.tidemark:t0\",lun=\"0\",type=\"read\"}").ends_with(" 10"), "{m}");
    assert!(line("tidemark_iscsi_lun_bytes_total{target=\"iqn.2016-06.io.tidemark:t0\",lun=\"0\",type=\"write\"}").ends_with(" 5120"), "{m}");
    assert!(line("tidemark_iscsi_sessions{target=\"iqn.2016-06.io.tidemark:t0\"}").ends_with(" 1.0"), "{m}");
    assert!(m.contains("tidemark_iscsi_lun_read_latency_seconds_bucket{le=\"+Inf\",target=\"iqn.2016-06.io.tidemark:t0\",lun=\"0\"} 10"), "{m}");
    assert!(m.contains("tidemark_iscsi_lun_read_latency_seconds_count{target=\"iqn.2016-06.io.tidemark:t0\",lun=\"0\"} 10"), "{m}");
}

#[test]
fn buffered_write_data_is_bounded_per_connection() {
    // 16 MiB of buffers per connection (daemon.connection_buffer_mb): the third 8 MiB write
    // waits for none of its data and gets TASK SET FULL instead of another buffer.
    let (_d, addr) = daemon_with_target(1 << 17, json!({}));
    let mut s = Session::login(addr, &LoginOptions::normal(INITIATOR, TARGET)).unwrap();
    let mut itts = Vec::new();
    for _ in 0..3 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2A;
        cdb[7..9].copy_from_slice(&16384u16.to_be_bytes());
        let h = s.command_header(0, &cdb, 8 << 20, false, true);
        itts.push(s.itt);
        s.send(h, &[]).unwrap();
    }
    let last = *itts.last().unwrap();
    loop {
        let p = s.recv().expect("answers: R2Ts for the first two, a status for the third");
        match p.opcode() {
            0x31 => assert!(itts[..2].contains(&p.itt()), "R2T for an admitted write"),
            0x21 => {
                assert_eq!(p.itt(), last);
                assert_eq!(p.bhs[3], 0x28, "TASK SET FULL");
                break;
            }
            other => panic!("unexpected PDU {other:#x}"),
        }
    }
    // The connection still works.
    assert_eq!(s.ping(b"still here").unwrap(), b"still here");
}

#[test]
fn abort_task_drops_a_write_waiting_for_its_data_and_the_session_goes_on() {
    let (_d, addr) = daemon_with_target(4096, json!({}));
    let mut s = Session::login(addr, &LoginOptions::normal(INITIATOR, TARGET)).unwrap();
    // A write whose data the target solicits; the R2T comes, the data never does.
    let h = s.command_header(0, &write10(8, 8), 4096, false, true);
    let (itt, cmd_sn) = (s.itt, s.cmd_sn.wrapping_sub(1));
    s.send(h, &[]).unwrap();
    let p = s.recv().unwrap();
    assert_eq!((p.opcode(), p.itt()), (0x31, itt), "an R2T for the write");
    // ABORT TASK (immediate) for it.
    let mut t = [0u8; 48];
    t[0] = 0x42;
    t[1] = 0x80 | 1;
    t[16..20].copy_from_slice(&998u32.to_be_bytes());
    t[20..24].copy_from_slice(&itt.to_be_bytes());
    t[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    t[28..32].copy_from_slice(&s.exp_stat_sn.to_be_bytes());
    t[32..36].copy_from_slice(&cmd_sn.to_be_bytes());
    s.send(t, &[]).unwrap();
    let p = s.recv().unwrap();
    assert_eq!((p.opcode(), p.bhs[2]), (0x22, 0), "ABORT TASK: function complete");
    // The session goes on, its transfers' state reused or made anew: solicited and immediate
    // writes, each read back.
    for (i, solicited) in [(1u8, true), (2, false), (3, true)] {
        let data = vec![i; 4096];
        let status =
            if solicited { s.write_solicited(0, &write10(8, 8), &data).unwrap() } else { s.scsi(0, &write10(8, 8), 4096, Some(&data)).unwrap().status };
        assert_eq!(status, 0, "write {i}");
        let r = s.scsi(0, &read10(8, 8), 4096, None).unwrap();
        assert_eq!((r.status, r.data == data), (0, true), "read back {i}");
    }
}
