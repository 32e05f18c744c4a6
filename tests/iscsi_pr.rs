//! SCSI persistent reservations through the real daemon, with two iSCSI sessions (two
//! initiators): a reservation holds off the other initiator, and with APTPL the keys and the
//! reservation survive a restart of tidemarkd (the state file in the data directory), and go
//! away with the last registration. Uses the raw initiator of tests/iscsi/client.rs: no tools.

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use client::{read10, LoginOptions, Session};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use support::*;

const TARGET: &str = "iqn.2016-06.io.tidemark:pr";
const HOST_A: &str = "iqn.2024-01.test:node-a";
const HOST_B: &str = "iqn.2024-01.test:node-b";
const RESERVATION_CONFLICT: u8 = 0x18;

fn pr_out(sa: u8, rtype: u8, key: u64, sa_key: u64, aptpl: bool) -> ([u8; 10], Vec<u8>) {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    ([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0], p)
}

fn out(s: &mut Session, sa: u8, rtype: u8, key: u64, sa_key: u64, aptpl: bool) -> u8 {
    let (cdb, p) = pr_out(sa, rtype, key, sa_key, aptpl);
    s.scsi(0, &cdb, 24, Some(&p)).expect("PR OUT").status
}

/// READ KEYS: the keys; READ RESERVATION: (key, type) of the reservation.
fn keys(s: &mut Session) -> Vec<u64> {
    let r = s.scsi(0, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], 256, None).expect("PR IN");
    assert_eq!(r.status, 0, "READ KEYS: {:?}", r.sense);
    r.data[8..].chunks(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).collect()
}

fn reservation(s: &mut Session) -> Option<(u64, u8)> {
    let r = s.scsi(0, &[0x5E, 1, 0, 0, 0, 0, 0, 1, 0, 0], 256, None).expect("PR IN");
    assert_eq!(r.status, 0, "READ RESERVATION: {:?}", r.sense);
    (r.data[7] == 16).then(|| (u64::from_be_bytes(r.data[8..16].try_into().unwrap()), r.data[21] & 0x0F))
}

fn login(addr: SocketAddr, host: &str) -> Session {
    let mut s = Session::login(addr, &LoginOptions { isid: [0x80, 0, 0, 0, 0, 9], ..LoginOptions::normal(host, TARGET) }).expect("login");
    // The first command of a new nexus may report POWER ON / RESET: clear it.
    let _ = s.scsi(0, &[0, 0, 0, 0, 0, 0], 0, None);
    s
}

#[test]
fn aptpl_reservation_survives_a_restart_and_holds_off_the_other_host() {
    let mut d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "shared0", "num_blocks": 2048, "block_size": 512}));
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": TARGET, "luns": [{"bdev_name": "shared0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8}),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut a = login(addr, HOST_A);
    let mut b = login(addr, HOST_B);
    // A registers with APTPL and takes an exclusive-access reservation; B registers too.
    assert_eq!(out(&mut a, 6, 0, 0, 0xA11CE, true), 0);
    assert_eq!(out(&mut b, 6, 0, 0, 0xB0B, true), 0);
    assert_eq!(out(&mut a, 1, 3, 0xA11CE, 0, false), 0, "RESERVE exclusive access");
    assert_eq!(b.scsi(0, &read10(0, 1), 512, None).unwrap().status, RESERVATION_CONFLICT);
    assert_eq!(a.scsi(0, &read10(0, 1), 512, None).unwrap().status, 0);
    // RESERVE(6) conflicts while persistent reservations are in use.
    assert_eq!(b.scsi(0, &[0x16, 0, 0, 0, 0, 0], 0, None).unwrap().status, RESERVATION_CONFLICT);
    let file = d.data_dir().join("scsi-pr").join("shared0.json");
    assert!(file.exists(), "APTPL state written before the command completed");

    drop((a, b));
    let saved = d.dir.path().join("tidemark.toml");
    d.rpc("save_config", json!({"path": saved.display().to_string()}));
    assert!(d.terminate(Duration::from_secs(20)).is_some_and(|s| s.success()));
    d.restart();
    // The RPC socket is bound before the configuration is applied (and its portal listens);
    // an answered call means the configuration is in place.
    d.rpc("framework_wait_init", json!(null));

    let mut b = login(addr, HOST_B);
    assert_eq!(keys(&mut b), vec![0xA11CE, 0xB0B], "the keys survive the restart");
    assert_eq!(reservation(&mut b), Some((0xA11CE, 3)), "and so does the reservation");
    assert_eq!(b.scsi(0, &read10(0, 1), 512, None).unwrap().status, RESERVATION_CONFLICT, "B is still held off");
    let mut a = login(addr, HOST_A);
    assert_eq!(a.scsi(0, &read10(0, 1), 512, None).unwrap().status, 0, "A (same initiator port) still holds it");
    // B preempts A: A loses its registration and reports REGISTRATIONS PREEMPTED.
    assert_eq!(out(&mut b, 4, 3, 0xB0B, 0xA11CE, false), 0, "PREEMPT");
    let r = a.scsi(0, &[0, 0, 0, 0, 0, 0], 0, None).unwrap();
    assert_eq!(r.sense, Some((6, 0x2A, 0x05)), "UNIT ATTENTION, REGISTRATIONS PREEMPTED");
    assert_eq!(a.scsi(0, &read10(0, 1), 512, None).unwrap().status, RESERVATION_CONFLICT);
    assert_eq!(reservation(&mut a), Some((0xB0B, 3)));
    // B unregisters without APTPL: nothing is left, the state file goes.
    assert_eq!(out(&mut b, 0, 0, 0xB0B, 0, false), 0);
    assert_eq!(keys(&mut a), Vec::<u64>::new());
    assert_eq!(a.scsi(0, &read10(0, 1), 512, None).unwrap().status, 0);
    assert!(!file.exists(), "no APTPL state left: no file");
}
