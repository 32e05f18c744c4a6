//! NVMe reservations on the NVMe/TCP target, driven by our own initiator as two hosts with
//! different Host Identifiers: register, acquire, the access each type leaves the other host,
//! preempt-and-abort fencing the holder (its writes refused, its registration gone, a
//! notification log entry and an async event), report, release and clear, and the state
//! surviving a kill -9 of tidemarkd with `ptpl_file` (and not without it).

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;

use support::*;
use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::{self, admin_opc, io_opc, Sqe, Status};

const NQN: &str = "nqn.2016-06.io.tidemark:resv";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-1111-4111-8111-111111111111";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:22222222-2222-4222-8222-222222222222";
const ID_A: [u8; 16] = [0x11; 16];
const ID_B: [u8; 16] = [0x22; 16];

const CONFLICT: u8 = 0x83;
const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 2;
const WRITE_EXCLUSIVE_RO: u8 = 3;
/// AER dword 0: I/O command specific status, reservation log page available, log 80h.
const AEN_RESERVATION: u32 = 0x0080_0006;

fn opts(host: &str, id: [u8; 16]) -> QpairOptions {
    QpairOptions { hostnqn: host.to_string(), hostid: id, ..QpairOptions::default() }
}

/// A daemon with malloc bdevs m0 and m1 exported as namespaces 1 and 2 of `NQN` (with the
/// extra fields of `ns1`), and its address.
fn start(ns1: Value) -> (Daemon, SocketAddr) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 8192, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 8192, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "allow_any_host": true}));
    let mut ns = json!({"bdev_name": "m0", "nsid": 1});
    for (k, v) in ns1.as_object().unwrap() {
        ns[k] = v.clone();
    }
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": ns}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m1", "nsid": 2}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (d, format!("127.0.0.1:{port}").parse().unwrap())
}

fn host(addr: SocketAddr, nqn: &str, id: [u8; 16]) -> (Controller, Qpair) {
    let mut c = Controller::connect(addr, NQN, &opts(nqn, id)).expect("connect");
    c.set_queue_count(1).unwrap();
    let q = c.connect_io(1, 32).unwrap();
    (c, q)
}

fn keys(a: u64, b: u64) -> Vec<u8> {
    [a.to_le_bytes(), b.to_le_bytes()].concat()
}

fn cmd(q: &mut Qpair, opc: u8, nsid: u32, cdw10: u32, data: &[u8]) -> Status {
    let mut sqe = Sqe::new(opc, 0, nsid);
    sqe.set_cdw(10, cdw10);
    q.execute(sqe, Payload::Out(data)).expect("completes").0.status()
}

fn register(q: &mut Qpair, nsid: u32, action: u32, cptpl: u32, crkey: u64, nrkey: u64) -> Status {
    cmd(q, io_opc::RESERVATION_REGISTER, nsid, action | cptpl << 30, &keys(crkey, nrkey))
}

fn acquire(q: &mut Qpair, nsid: u32, action: u32, rtype: u8, crkey: u64, prkey: u64) -> Status {
    cmd(q, io_opc::RESERVATION_ACQUIRE, nsid, action | (rtype as u32) << 8, &keys(crkey, prkey))
}

fn release(q: &mut Qpair, nsid: u32, action: u32, rtype: u8, crkey: u64) -> Status {
    cmd(q, io_opc::RESERVATION_RELEASE, nsid, action | (rtype as u32) << 8, &crkey.to_le_bytes())
}

/// Reservation Report: (generation, type, PTPLS, [(cntlid, holder, key, host id)]).
type Report = (u32, u8, u8, Vec<(u16, bool, u64, [u8; 16])>);

fn report(q: &mut Qpair, nsid: u32, eds: bool) -> Result<Report, Status> {
    let mut sqe = Sqe::new(io_opc::RESERVATION_REPORT, 0, nsid);
    sqe.set_cdw(10, 4096 / 4 - 1);
    sqe.set_cdw(11, eds as u32);
    let (cqe, d) = q.execute(sqe, Payload::In(4096)).expect("completes");
    if !cqe.status().is_success() {
        return Err(cqe.status());
    }
    let n = u16::from_le_bytes([d[5], d[6]]) as usize;
    let regs = (0..n)
        .map(|i| {
            let e = &d[64 + i * 64..128 + i * 64];
            (u16::from_le_bytes([e[0], e[1]]), e[2] & 1 != 0, u64::from_le_bytes(e[8..16].try_into().unwrap()), e[16..32].try_into().unwrap())
        })
        .collect();
    Ok((u32::from_le_bytes(d[0..4].try_into().unwrap()), d[4], d[9], regs))
}

fn write(q: &mut Qpair, nsid: u32) -> Status {
    q.execute(Qpair::rw_sqe(io_opc::WRITE, nsid, 0, 1), Payload::Out(&[0x5A; 512])).unwrap().0.status()
}

fn read(q: &mut Qpair, nsid: u32) -> Status {
    q.execute(Qpair::rw_sqe(io_opc::READ, nsid, 0, 1), Payload::In(512)).unwrap().0.status()
}

fn conflict() -> Status {
    Status { sct: 0, sc: CONFLICT, dnr: true }
}

/// The next Reservation Notification log entry: (count, type, available, nsid).
fn notice(c: &mut Controller) -> (u64, u8, u8, u32) {
    let p = c.get_log_page(spec::log::RESERVATION_NOTIFICATION, 0, 64, 0, false).unwrap();
    (u64::from_le_bytes(p[0..8].try_into().unwrap()), p[8], p[9], u32::from_le_bytes(p[12..16].try_into().unwrap()))
}

#[test]
fn two_hosts_register_acquire_preempt_release_and_clear() {
    let (d, addr) = start(json!({}));
    let (mut ca, mut qa) = host(addr, HOST_A, ID_A);
    let (mut cb, mut qb) = host(addr, HOST_B, ID_B);
    assert_ne!(ca.id.oncs & (1 << 5), 0, "ONCS: reservations");
    let ns = ca.identify(spec::cns::NAMESPACE, 1).unwrap();
    assert_eq!((ns[30], ns[31]), (1, 0xFE), "NMIC shared; RESCAP every type and IEKEY, no PTPL without ptpl_file");

    // Nobody registered: everybody has access.
    assert!(write(&mut qb, 1).is_success());
    assert!(register(&mut qa, 1, 0, 0, 0, 0xA).is_success());
    assert!(register(&mut qb, 1, 0, 0, 0, 0xB).is_success());
    assert_eq!(register(&mut qb, 1, 0, 0, 0, 0xBB), conflict(), "registered already with another key");
    assert_eq!(acquire(&mut qa, 1, 0, WRITE_EXCLUSIVE, 0xB, 0), conflict(), "wrong key");
    assert!(acquire(&mut qa, 1, 0, WRITE_EXCLUSIVE, 0xA, 0).is_success());
    assert_eq!(acquire(&mut qb, 1, 0, WRITE_EXCLUSIVE, 0xB, 0), conflict(), "held by A");

    // Write Exclusive: B reads but does not write; A does both.
    assert_eq!(write(&mut qb, 1), conflict());
    assert!(read(&mut qb, 1).is_success());
    assert!(write(&mut qa, 1).is_success());
    assert!(write(&mut qb, 2).is_success(), "namespace 2 has no reservation");

    let (generation, rtype, ptpls, regs) = report(&mut qb, 1, true).unwrap();
    assert_eq!((generation, rtype, ptpls), (2, WRITE_EXCLUSIVE, 0));
    assert_eq!(regs, vec![(ca.cntlid, true, 0xA, ID_A), (cb.cntlid, false, 0xB, ID_B)]);
    assert_eq!(report(&mut qb, 1, false).unwrap_err().sc, 0x18, "128-bit host ids need the extended structure");

    // B preempts and aborts A: A is fenced, unregistered, and told (log entry and AER).
    let aer = ca.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    assert!(acquire(&mut qb, 1, 2, EXCLUSIVE_ACCESS, 0xB, 0xA).is_success());
    let ev = wait_completion(&mut ca.admin, aer);
    assert!(ev.cqe.status().is_success());
    assert_eq!(ev.cqe.dw0, AEN_RESERVATION);
    assert_eq!(notice(&mut ca), (1, 1, 0, 1), "registration preempted on namespace 1");
    assert_eq!(notice(&mut ca), (0, 0, 0, 0), "nothing more");
    assert_eq!(write(&mut qa, 1), conflict(), "the fenced host cannot write");
    assert_eq!(read(&mut qa, 1), conflict(), "nor read (exclusive access)");
    // The refused I/O is counted per namespace (B's write, A's write and read so far).
    let m = d.metrics_text();
    let conflicts: f64 = m
        .lines()
        .find(|l| l.starts_with("tidemark_nvmf_namespace_reservation_conflicts_total{") && l.contains("nsid=\"1\""))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no conflicts metric for namespace 1:\n{m}"));
    assert!(conflicts >= 3.0, "conflicts counted: {conflicts}");
    assert!(write(&mut qb, 1).is_success());
    assert_eq!(release(&mut qa, 1, 0, EXCLUSIVE_ACCESS, 0xA), conflict(), "A is not registered any more");
    let (generation, rtype, _, regs) = report(&mut qa, 1, true).unwrap();
    assert_eq!((generation, rtype), (3, EXCLUSIVE_ACCESS));
    assert_eq!(regs, vec![(cb.cntlid, true, 0xB, ID_B)]);

    // Release with the wrong type is refused; with the right one the namespace is open again.
    assert_eq!(release(&mut qb, 1, 0, WRITE_EXCLUSIVE, 0xB).sc, spec::sc::INVALID_FIELD);
    assert!(release(&mut qb, 1, 0, EXCLUSIVE_ACCESS, 0xB).is_success());
    assert!(write(&mut qa, 1).is_success());

    // Registrants only: the registrant B writes; A's release tells B.
    assert!(register(&mut qa, 1, 0, 0, 0, 0xA2).is_success());
    assert!(acquire(&mut qa, 1, 0, WRITE_EXCLUSIVE_RO, 0xA2, 0).is_success());
    assert!(write(&mut qb, 1).is_success());
    assert!(release(&mut qa, 1, 0, WRITE_EXCLUSIVE_RO, 0xA2).is_success());
    let (count, kind, _, nsid) = notice(&mut cb);
    assert_eq!((count, kind, nsid), (1, 2, 1), "reservation released");

    // Replace a key, then clear: everything goes, A hears it was preempted.
    assert!(register(&mut qb, 1, 2, 0, 0xB, 0xB2).is_success());
    assert!(acquire(&mut qb, 1, 0, EXCLUSIVE_ACCESS, 0xB2, 0).is_success());
    assert_eq!(read(&mut qa, 1), conflict(), "A is a registrant but not the holder");
    assert!(release(&mut qb, 1, 1, 0, 0xB2).is_success());
    assert_eq!(notice(&mut ca).1, 3, "reservation preempted");
    let (_, rtype, _, regs) = report(&mut qa, 1, true).unwrap();
    assert_eq!((rtype, regs.len()), (0, 0));
    assert!(write(&mut qa, 1).is_success());

    // A masked notification is neither logged nor raised.
    let mut mask = Sqe::new(admin_opc::SET_FEATURES, 0, 1);
    mask.set_cdw(10, spec::feat::RESERVATION_NOTIFICATION_MASK as u32);
    mask.set_cdw(11, 1 << 1);
    assert!(ca.admin.execute(mask, Payload::None).unwrap().0.status().is_success());
    assert!(register(&mut qa, 1, 0, 0, 0, 0xA).is_success());
    assert!(register(&mut qb, 1, 0, 0, 0, 0xB).is_success());
    assert!(acquire(&mut qb, 1, 0, WRITE_EXCLUSIVE, 0xB, 0).is_success());
    assert!(acquire(&mut qb, 1, 1, WRITE_EXCLUSIVE, 0xB, 0xA).is_success(), "preempt A's registration");
    assert_eq!(notice(&mut ca).1, 0, "masked");
    assert_eq!(write(&mut qa, 1), conflict());
    assert!(read(&mut qa, 1).is_success());
    // Unregister.
    assert!(register(&mut qb, 1, 1, 0, 0xB, 0).is_success());
    assert!(write(&mut qa, 1).is_success());
}

fn get_ptpl(c: &mut Controller, nsid: u32) -> u32 {
    let mut sqe = Sqe::new(admin_opc::GET_FEATURES, 0, nsid);
    sqe.set_cdw(10, spec::feat::RESERVATION_PERSISTENCE as u32);
    let (cqe, _) = c.admin.execute(sqe, Payload::None).unwrap();
    assert!(cqe.status().is_success());
    cqe.dw0
}

#[test]
fn ptpl_state_survives_a_kill_and_restart_and_without_ptpl_file_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ns1-resv.json");
    let (mut d, addr) = start(json!({"ptpl_file": file.display().to_string()}));
    let saved = d.dir.path().join("tidemark.toml");
    d.rpc("save_config", json!({"path": saved.display().to_string()}));
    assert!(std::fs::read_to_string(&saved).unwrap().contains("ptpl_file"), "save_config keeps ptpl_file");

    let (mut ca, mut qa) = host(addr, HOST_A, ID_A);
    assert_eq!(ca.identify(spec::cns::NAMESPACE, 1).unwrap()[31], 0xFF, "RESCAP: PTPL with a ptpl_file");
    assert_eq!(register(&mut qa, 2, 0, 3, 0, 0xA2).sc, spec::sc::INVALID_FIELD, "no ptpl_file, no PTPL");
    assert!(register(&mut qa, 1, 0, 3, 0, 0xA).is_success(), "register and activate PTPL");
    assert!(acquire(&mut qa, 1, 0, EXCLUSIVE_ACCESS, 0xA, 0).is_success());
    assert!(register(&mut qa, 2, 0, 0, 0, 0xA2).is_success());
    assert!(acquire(&mut qa, 2, 0, EXCLUSIVE_ACCESS, 0xA2, 0).is_success());
    assert_eq!(get_ptpl(&mut ca, 1), 1);
    assert_eq!(get_ptpl(&mut ca, 2), 0);
    assert!(file.exists(), "written before the command completed");
    drop((qa, ca));

    d.kill9();
    d.restart();
    d.rpc("framework_wait_init", json!(null));
    let (mut cb, mut qb) = host(addr, HOST_B, ID_B);
    assert_eq!(read(&mut qb, 1), conflict(), "A's reservation survived");
    let (generation, rtype, ptpls, regs) = report(&mut qb, 1, true).unwrap();
    assert_eq!((generation, rtype, ptpls), (1, EXCLUSIVE_ACCESS, 1));
    assert_eq!(regs, vec![(0xFFFF, true, 0xA, ID_A)], "A's key and host id, no controller of A connected");
    assert!(read(&mut qb, 2).is_success(), "namespace 2 (no ptpl_file) forgot");
    assert_eq!(report(&mut qb, 2, true).unwrap().3.len(), 0);
    assert_eq!(get_ptpl(&mut cb, 1), 1);

    // A comes back and still holds it; turning PTPL off removes the file.
    let (mut ca, mut qa) = host(addr, HOST_A, ID_A);
    assert!(write(&mut qa, 1).is_success());
    let mut off = Sqe::new(admin_opc::SET_FEATURES, 0, 1);
    off.set_cdw(10, spec::feat::RESERVATION_PERSISTENCE as u32);
    off.set_cdw(11, 0);
    assert!(ca.admin.execute(off, Payload::None).unwrap().0.status().is_success());
    assert!(!file.exists());
    assert_eq!(report(&mut qb, 1, true).unwrap().2, 0);
}

/// Preempt and Abort (and plain Preempt) completes only after the preempted host's commands
/// already at the bdev completed: A's write sits in a delay bdev for 1.5 s when B preempts A;
/// B's Acquire must not complete before A's write does (a stale head's write landing after
/// the new head's first write would overwrite it). A's write, admitted before the preempt,
/// succeeds; A's next write is refused; B's write after the Acquire reads back as B's. Then
/// the same for a Release with Clear by B.
const SLOW_US: u64 = 1_500_000;

/// A daemon exporting a delay bdev (writes take SLOW_US) as namespace 1 of NQN.
fn slow_target() -> (Daemon, SocketAddr) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 8192, "block_size": 512}));
    d.rpc(
        "bdev_delay_create",
        json!({"name": "slow", "base_bdev_name": "m0", "avg_read_latency": 0, "p99_read_latency": 0, "avg_write_latency": SLOW_US, "p99_write_latency": SLOW_US}),
    );
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "slow", "nsid": 1}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (d, format!("127.0.0.1:{port}").parse().unwrap())
}

fn fast_writes(d: &Daemon, us: u64) {
    for t in ["avg_write", "p99_write"] {
        d.rpc("bdev_delay_update_latency", json!({"delay_bdev_name": "slow", "latency_type": t, "latency_us": us}));
    }
}

/// A's write of 0xAA to block 0 on its own thread (the delay bdev holds it SLOW_US), and, once
/// it has reached the bdev, later writes made fast (the delay bdev fixes a write's latency at
/// submission): without the wait another host's write would land first. When it was sent, and
/// the thread giving back (status, latency, A's queue).
fn slow_write_in_flight(d: &Daemon, mut qa: Qpair) -> (std::time::Instant, std::thread::JoinHandle<(Status, std::time::Duration, Qpair)>) {
    let a_sent = std::time::Instant::now();
    let a_write = std::thread::spawn(move || {
        let st = qa.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 1), Payload::Out(&[0xAA; 512])).unwrap().0.status();
        (st, a_sent.elapsed(), qa)
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    fast_writes(d, 0);
    (a_sent, a_write)
}

/// A host whose connection broke sends its unanswered writes again on a new association. The
/// target answers that association's Connect only once the host's earlier commands have left
/// the bdev, so that the earlier copy of a write cannot land after the re-sent one or after a
/// newer write (the mirror simulation's late-execution case, `SIM_CONN_LATE=1 SEED=7843`: a
/// mirror leg silently holding older data). Another host's Connect does not wait.
#[test]
fn a_new_association_waits_for_the_hosts_earlier_commands_at_the_bdev() {
    let (d, addr) = slow_target();
    let (ca, mut qa) = host(addr, HOST_A, ID_A);
    let sent = std::time::Instant::now();
    qa.submit(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 1), Payload::Out(&[0xA1; 512])).unwrap();
    while !qa.flush().unwrap() {}
    // A's write reaches the bdev (1.5 s there), later writes are fast; then A's connections
    // break with the write unanswered.
    std::thread::sleep(std::time::Duration::from_millis(200));
    fast_writes(&d, 0);
    drop((qa, ca));
    let t = std::time::Instant::now();
    let (_cb, mut qb) = host(addr, HOST_B, ID_B);
    assert!(t.elapsed() < std::time::Duration::from_millis(1000), "B has nothing in flight: its Connect took {:?}", t.elapsed());
    let (_ca, mut qa) = host(addr, HOST_A, ID_A);
    let connected = sent.elapsed();
    assert!(
        connected >= std::time::Duration::from_micros(SLOW_US - 100_000),
        "A's new association answered at {connected:?}, before its earlier write left the bdev"
    );
    // A writes again (what a host re-sends, newer data here); the earlier copy cannot follow.
    assert!(qa.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 1), Payload::Out(&[0xA2; 512])).unwrap().0.status().is_success());
    std::thread::sleep(std::time::Duration::from_micros(SLOW_US).saturating_sub(sent.elapsed()) + std::time::Duration::from_millis(300));
    let (cqe, data) = qb.execute(Qpair::rw_sqe(io_opc::READ, 1, 0, 1), Payload::In(512)).unwrap();
    assert!(cqe.status().is_success());
    assert_eq!(&data[..512], &[0xA2; 512][..], "the newer write stands");
}

#[test]
fn preempt_waits_for_the_preempted_hosts_writes_at_the_bdev() {
    let (d, addr) = slow_target();
    let (_ca, mut qa) = host(addr, HOST_A, ID_A);
    let (_cb, mut qb) = host(addr, HOST_B, ID_B);
    assert!(register(&mut qa, 1, 0, 0, 0, 0xA).is_success());
    assert!(register(&mut qb, 1, 0, 0, 0, 0xB).is_success());
    assert!(acquire(&mut qa, 1, 0, WRITE_EXCLUSIVE, 0xA, 0).is_success());

    for action in [2u32, 1] {
        // Each round: A holds, writes slowly, B preempts (round 1 Preempt and Abort, round 2
        // Preempt), then hands the namespace back to A for the next round.
        let (a_sent, a_write) = slow_write_in_flight(&d, qa);
        assert!(acquire(&mut qb, 1, action, WRITE_EXCLUSIVE, 0xB, 0xA).is_success(), "action {action}");
        let b_done = a_sent.elapsed();
        let (st, a_done, q) = a_write.join().unwrap();
        qa = q;
        assert!(st.is_success(), "A's write was admitted before the preempt: {st:?}");
        // The target completes A's write before B's Acquire; the two client threads see them
        // a scheduling delay apart, so the check is that B waited for A's write latency.
        assert!(b_done >= std::time::Duration::from_micros(SLOW_US), "action {action}: B's Acquire at {b_done:?} did not wait for A's write (at {a_done:?})");
        assert_eq!(write(&mut qa, 1), conflict(), "the preempted host's later writes are refused");
        let st = qb.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 1), Payload::Out(&[0xBB; 512])).unwrap().0.status();
        assert!(st.is_success());
        let (cqe, data) = qb.execute(Qpair::rw_sqe(io_opc::READ, 1, 0, 1), Payload::In(512)).unwrap();
        assert!(cqe.status().is_success());
        assert_eq!(&data[..512], &[0xBB; 512][..], "B's write stands");
        // Back to A for the next round, slow writes again.
        assert!(register(&mut qa, 1, 0, 0, 0, 0xA).is_success());
        assert!(acquire(&mut qa, 1, 2, WRITE_EXCLUSIVE, 0xA, 0xB).is_success());
        assert!(register(&mut qb, 1, 0, 0, 0, 0xB).is_success());
        fast_writes(&d, SLOW_US);
    }

    // Release with Clear drains too: it unregisters A without A's asking, and B's next write
    // must not be overwritten by A's slow one, although nothing refuses A's writes afterwards
    // (no reservation is left).
    let (a_sent, a_write) = slow_write_in_flight(&d, qa);
    assert!(release(&mut qb, 1, 1, 0, 0xB).is_success(), "Clear");
    let b_done = a_sent.elapsed();
    let (st, a_done, mut qa) = a_write.join().unwrap();
    assert!(st.is_success(), "A's write was admitted before the Clear: {st:?}");
    assert!(b_done >= std::time::Duration::from_micros(SLOW_US), "Clear at {b_done:?} did not wait for A's write (at {a_done:?})");
    assert!(report(&mut qb, 1, true).unwrap().3.is_empty(), "nobody is registered");
    let st = qb.execute(Qpair::rw_sqe(io_opc::WRITE, 1, 0, 1), Payload::Out(&[0xBB; 512])).unwrap().0.status();
    assert!(st.is_success());
    let (cqe, data) = qb.execute(Qpair::rw_sqe(io_opc::READ, 1, 0, 1), Payload::In(512)).unwrap();
    assert!(cqe.status().is_success());
    assert_eq!(&data[..512], &[0xBB; 512][..], "B's write after the Clear stands");
    assert!(write(&mut qa, 1).is_success(), "after a Clear nothing fences A");
}
