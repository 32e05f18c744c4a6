//! The NVMe/TCP target driven by our own initiator: connect, identify, I/O through every data
//! path (in-capsule, R2T, C2H with and without SUCCESS, digests), discovery, access control,
//! asynchronous events, keep-alive teardown, RPCs, metrics, and bad input of every kind.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tidemark::nvmf::initiator::{Completion, Controller, Error, Payload, Qpair, QpairOptions};
use tidemark::nvmf::pdu::{self, Fes};
use tidemark::nvmf::spec::{self, admin_opc, io_opc, sc, sgl, Sqe, Status};

const NQN: &str = "nqn.2016-06.io.tidemark:test";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-1111-4111-8111-111111111111";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:22222222-2222-4222-8222-222222222222";

fn config(cores: &str) -> String {
    MINIMAL_CONFIG.replace("cores = [0]", &format!("cores = {cores}"))
}

/// A daemon exporting a 64 MiB malloc bdev (512-byte blocks) as nsid 1 of `NQN`.
fn start(cores: &str, allow_any_host: bool) -> (Daemon, SocketAddr) {
    let d = Daemon::start(&config(cores));
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 131072, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "serial_number": "SN-TEST-1", "model_number": "tidemark test", "allow_any_host": allow_any_host}));
    assert_eq!(d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m0", "nsid": 1}})), json!(1));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (d, format!("127.0.0.1:{port}").parse().unwrap())
}

fn opts(host: &str) -> QpairOptions {
    QpairOptions { hostnqn: host.to_string(), ..QpairOptions::default() }
}

fn status(sct: u8, sc: u8) -> Status {
    Status { sct, sc, dnr: true }
}

fn read(q: &mut Qpair, slba: u64, nlb: u32, bs: usize) -> (Status, Vec<u8>) {
    let (cqe, data) = q.execute(Qpair::rw_sqe(io_opc::READ, 1, slba, nlb), Payload::In(nlb as usize * bs)).expect("read completes");
    (cqe.status(), data)
}

fn write(q: &mut Qpair, slba: u64, data: &[u8], bs: usize) -> Status {
    let nlb = (data.len() / bs) as u32;
    q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, slba, nlb), Payload::Out(data)).expect("write completes").0.status()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn connect_identify_io_and_discovery() {
    let (d, addr) = start("[0, 1]", true);
    let mut c = Controller::connect(addr, NQN, &opts(HOST_A)).expect("connect");
    let id = &c.id;
    assert_eq!(id.subnqn, NQN);
    assert_eq!(id.sn, "SN-TEST-1");
    assert_eq!(id.mn, "tidemark test");
    assert_eq!(id.cntlid, c.cntlid);
    assert_eq!(id.ver, 0x0001_0400);
    assert_eq!(id.mdts, 5, "128 KiB transfers");
    assert_eq!(id.ioccsz, (64 + 8192) / 16);
    assert_eq!(id.iorcsz, 1);
    assert_eq!(id.icdoff, 0);
    assert_eq!(id.sgls & 0x3, 1, "SGLs supported");
    assert_ne!(id.sgls & (1 << 20), 0, "in-capsule offsets");
    assert_eq!(id.nn, 32);
    assert_eq!(id.oncs & 0b1101, 0b1101, "compare, DSM, write zeroes");
    assert_eq!(id.cntrltype, 1);
    assert!(id.maxcmd >= 128);
    assert_ne!(id.kas, 0);
    assert_eq!(c.property_get(spec::prop::VS).unwrap(), 0x0001_0400);
    let cap = c.property_get(spec::prop::CAP).unwrap();
    assert_eq!(cap & 0xFFFF, 127, "MQES");
    assert_ne!(cap & (1 << 37), 0, "NVM command set");

    assert_eq!(c.active_namespaces().unwrap(), vec![1]);
    let ns = c.identify_namespace(1).unwrap();
    assert_eq!((ns.nsze, ns.ncap, ns.nuse, ns.block_size), (131072, 131072, 131072, 512));
    let bdev = d.rpc("bdev_get_bdevs", json!({"name": "m0"}));
    let uuid = uuid::Uuid::parse_str(bdev[0]["uuid"].as_str().unwrap()).unwrap();
    assert_eq!(&ns.nguid, uuid.as_bytes(), "NGUID is the bdev UUID");
    let descs = c.identify(spec::cns::NS_DESCRIPTORS, 1).unwrap();
    let uuid_desc = descs.windows(4).position(|w| w[0] == 3 && w[1] == 16).expect("a UUID descriptor");
    assert_eq!(&descs[uuid_desc + 4..uuid_desc + 20], uuid.as_bytes());
    assert_eq!(c.identify_namespace(7).unwrap().nsze, 0, "an inactive namespace reads as zeros");
    assert!(matches!(c.identify(spec::cns::NAMESPACE, 0), Err(Error::Status(s)) if s.sc == sc::INVALID_NAMESPACE));

    assert_eq!(c.set_queue_count(4).unwrap(), 4);
    let mut q1 = c.connect_io(1, 128).unwrap();
    let mut q2 = c.connect_io(2, 64).unwrap();
    let bs = 512;

    // In-capsule write (4 KiB) and read back (C2HData with SUCCESS).
    let a = pattern(4096, 1);
    assert_eq!(write(&mut q1, 100, &a, bs), Status::SUCCESS);
    assert_eq!(read(&mut q2, 100, 8, bs), (Status::SUCCESS, a.clone()));
    // A write too big for the capsule goes through R2T/H2CData; 128 KiB is the MDTS.
    let b = pattern(128 * 1024, 7);
    assert_eq!(write(&mut q1, 1000, &b, bs), Status::SUCCESS);
    assert_eq!(read(&mut q1, 1000, 256, bs), (Status::SUCCESS, b.clone()));
    // Write Zeroes, Deallocate, Compare, Flush.
    let mut wz = Qpair::rw_sqe(io_opc::WRITE_ZEROES, 1, 1000, 16);
    wz.set_cdw(12, 15);
    assert!(q1.execute(wz, Payload::None).unwrap().0.status().is_success());
    let (st, z) = read(&mut q1, 1000, 17, bs);
    assert!(st.is_success());
    assert!(z[..16 * 512].iter().all(|&x| x == 0));
    assert_eq!(&z[16 * 512..], &b[16 * 512..17 * 512]);
    let mut range = vec![0u8; 16];
    range[4..8].copy_from_slice(&8u32.to_le_bytes());
    range[8..16].copy_from_slice(&1100u64.to_le_bytes());
    let mut dsm = Sqe::new(io_opc::DSM, 0, 1);
    dsm.set_cdw(10, 0);
    dsm.set_cdw(11, 1 << 2);
    assert!(q1.execute(dsm, Payload::Out(&range)).unwrap().0.status().is_success());
    let (_, dz) = read(&mut q1, 1100, 8, bs);
    assert!(dz.iter().all(|&x| x == 0), "malloc reads deallocated blocks as zeros");
    let cmp_ok = q2.execute(Qpair::rw_sqe(io_opc::COMPARE, 1, 100, 8), Payload::Out(&a)).unwrap().0.status();
    assert!(cmp_ok.is_success());
    let cmp_bad = q2.execute(Qpair::rw_sqe(io_opc::COMPARE, 1, 100, 8), Payload::Out(&b[..4096])).unwrap().0.status();
    assert_eq!((cmp_bad.sct, cmp_bad.sc), (2, 0x85));
    assert!(q2.execute(Sqe::new(io_opc::FLUSH, 0, 1), Payload::None).unwrap().0.status().is_success());

    // Many commands in flight on one queue.
    let mut done: Vec<Completion> = Vec::new();
    for i in 0..100u64 {
        q1.submit(Qpair::rw_sqe(io_opc::READ, 1, i * 8, 8), Payload::In(4096)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 100 && Instant::now() < deadline {
        q1.poll(&mut done).unwrap();
    }
    assert_eq!(done.len(), 100);
    assert!(done.iter().all(|c| c.cqe.status().is_success()));

    // 96 outstanding 128 KiB writes (12 MiB) need more R2T buffers than a connection may
    // hold at once (8 MiB): the rest wait for budget, and all complete with the right data.
    let mut done: Vec<Completion> = Vec::new();
    for i in 0..96u64 {
        q1.submit(Qpair::rw_sqe(io_opc::WRITE, 1, 8192 + i * 256, 256), Payload::Out(&pattern(128 * 1024, i as u8))).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.len() < 96 && Instant::now() < deadline {
        q1.poll(&mut done).unwrap();
    }
    assert_eq!(done.len(), 96);
    assert!(done.iter().all(|c| c.cqe.status().is_success()));
    for i in [0u64, 50, 95] {
        assert_eq!(read(&mut q1, 8192 + i * 256, 256, bs).1, pattern(128 * 1024, i as u8), "write {i}");
    }

    // SMART counts the I/O; features read back.
    let smart = c.get_log_page(spec::log::SMART, spec::NSID_ALL, 512, 0, false).unwrap();
    assert!(u64::from_le_bytes(smart[64..72].try_into().unwrap()) >= 103, "host read commands");
    assert_eq!(c.get_features(spec::feat::NUMBER_OF_QUEUES).unwrap(), 3 | 3 << 16);
    c.keep_alive().unwrap();

    // The control plane sees the controller and its queues.
    let ctrls = d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}));
    assert_eq!(ctrls.as_array().unwrap().len(), 1);
    assert_eq!(ctrls[0]["hostnqn"], HOST_A);
    assert_eq!(ctrls[0]["num_io_qpairs"], 2);
    let qps = d.rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}));
    assert_eq!(qps.as_array().unwrap().len(), 3);

    // Fabrics Disconnect deletes an I/O queue: answered, then closed.
    let mut disc_cmd = Sqe::new(spec::FABRICS_OPC, 0, 0);
    disc_cmd.0[4] = spec::fctype::DISCONNECT;
    assert!(q2.execute(disc_cmd, Payload::None).unwrap().0.status().is_success());
    assert!(q2.wait_closed(Duration::from_secs(10)));
    wait_until(|| d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))[0]["num_io_qpairs"] == 1, "I/O queue 2 deleted");

    // Discovery: the subsystem on its listener.
    let mut disc = Controller::connect(addr, spec::DISCOVERY_NQN, &opts(HOST_A)).expect("discovery connect");
    assert_eq!(disc.id.cntrltype, 2);
    let (_, entries) = disc.discovery_log().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].subnqn, NQN);
    assert_eq!(entries[0].traddr, "127.0.0.1");
    assert_eq!(entries[0].trsvcid, addr.port().to_string());
    assert_eq!((entries[0].trtype, entries[0].adrfam, entries[0].subtype), (3, 1, 2));

    // Orderly shutdown; closing the sockets removes the controller.
    c.shutdown().unwrap();
    drop((q1, q2, c, disc));
    wait_until(|| d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().unwrap().is_empty(), "controllers go away");
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn digests_cover_every_data_path() {
    let (_d, addr) = start("[0]", true);
    let o = QpairOptions { hdgst: true, ddgst: true, disable_sqflow: false, ..opts(HOST_A) };
    let mut c = Controller::connect(addr, NQN, &o).unwrap();
    let mut q = c.connect_io(1, 32).unwrap();
    assert!(q.hdgst && q.ddgst);
    let a = pattern(4096, 3);
    assert!(write(&mut q, 8, &a, 512).is_success());
    let big = pattern(64 * 1024, 9);
    assert!(write(&mut q, 4096, &big, 512).is_success());
    assert_eq!(read(&mut q, 8, 8, 512).1, a);
    assert_eq!(read(&mut q, 4096, 128, 512).1, big);

    // A corrupted data digest fails that command (retryably) and nothing else.
    let mut sqe = Qpair::rw_sqe(io_opc::WRITE, 1, 8, 8);
    sqe.set_cid(5);
    sqe.set_sgl(0, 4096, sgl::IN_CAPSULE);
    let mut raw = pdu::capsule_cmd(&sqe, 4096, true, true).as_slice().to_vec();
    raw.extend_from_slice(&pattern(4096, 99));
    raw.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    q.send_raw(&raw).unwrap();
    let resp = q.recv_pdu().unwrap();
    assert_eq!(resp[0], pdu::pdu_type::CAPSULE_RESP);
    let cqe = spec::Cqe::from_bytes(resp[8..24].try_into().unwrap());
    assert_eq!((cqe.cid, cqe.status().sc, cqe.status().dnr), (5, sc::TRANSIENT_TRANSPORT_ERROR, false));
    assert_eq!(read(&mut q, 8, 8, 512).1, a, "the corrupted write changed nothing");

    // A corrupted header digest is fatal for the connection.
    let mut sqe = Qpair::rw_sqe(io_opc::READ, 1, 0, 1);
    sqe.set_sgl(0, 512, sgl::TRANSPORT_DATA_BLOCK);
    let mut raw = pdu::capsule_cmd(&sqe, 0, true, true).as_slice().to_vec();
    raw[72] ^= 0xFF;
    q.send_raw(&raw).unwrap();
    expect_term(&mut q, Fes::HeaderDigestError);
    // The controller's other queues are unaffected.
    c.keep_alive().unwrap();
}

/// Reads PDUs until a C2HTermReq; checks its FES and that the connection then closes.
fn expect_term(q: &mut Qpair, fes: Fes) -> u32 {
    loop {
        let p = q.recv_pdu().expect("a C2HTermReq");
        if p[0] == pdu::pdu_type::C2H_TERM_REQ {
            let (f, fei) = pdu::parse_term_req(&p).unwrap();
            assert_eq!(f, fes as u16, "FES");
            assert!(q.wait_closed(Duration::from_secs(10)), "the target closes after a TermReq");
            return fei;
        }
    }
}

fn raw_conn(addr: SocketAddr) -> Qpair {
    let o = opts(HOST_B);
    let mut q = Qpair::connect(addr, &o).unwrap();
    q.fabric_connect(0, spec::CNTLID_DYNAMIC, NQN, &o).unwrap();
    q
}

#[test]
fn bad_input_gets_the_protocols_errors_and_others_keep_working() {
    let (d, addr) = start("[0]", true);
    let mut good = Controller::connect(addr, NQN, &opts(HOST_A)).unwrap();
    let mut gq = good.connect_io(1, 32).unwrap();
    let keep = pattern(4096, 42);
    assert!(write(&mut gq, 0, &keep, 512).is_success());
    let check_good = |gq: &mut Qpair| assert_eq!(read(gq, 0, 8, 512), (Status::SUCCESS, keep.clone()), "the well-behaved host keeps being served");

    // Command-level errors: NVMe status, connection stays.
    let mut bad = Controller::connect(addr, NQN, &opts(HOST_B)).unwrap();
    let mut q = bad.connect_io(1, 32).unwrap();
    let r = |q: &mut Qpair, sqe: Sqe, p: Payload| q.execute(sqe, p).unwrap().0.status();
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::READ, 1, 131072 - 4, 8), Payload::In(4096)), status(0, sc::LBA_OUT_OF_RANGE));
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::READ, 1, u64::MAX - 2, 8), Payload::In(4096)), status(0, sc::LBA_OUT_OF_RANGE));
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::WRITE, 1, 131072, 1), Payload::Out(&[0u8; 512])), status(0, sc::LBA_OUT_OF_RANGE));
    assert_eq!(r(&mut q, Sqe::new(0x7E, 0, 1), Payload::None), status(0, sc::INVALID_OPCODE));
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::READ, 9, 0, 8), Payload::In(4096)), status(0, sc::INVALID_NAMESPACE));
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::READ, 0, 0, 8), Payload::In(4096)), status(0, sc::INVALID_NAMESPACE));
    // More than MDTS (128 KiB): Invalid Field; NLB and SGL length disagreeing: SGL length.
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::READ, 1, 0, 512), Payload::In(256 * 1024)), status(0, sc::INVALID_FIELD));
    assert_eq!(r(&mut q, Qpair::rw_sqe(io_opc::READ, 1, 0, 16), Payload::In(4096)), status(0, sc::DATA_SGL_LENGTH_INVALID));
    let mut fused = Qpair::rw_sqe(io_opc::READ, 1, 0, 8);
    fused.0[1] |= 1;
    assert_eq!(r(&mut q, fused, Payload::In(4096)), status(0, sc::INVALID_FIELD));
    // The Error Information log lists the failures, newest first: the fused READ last.
    let log = bad.get_log_page(0x01, 0, 64 * 64, 0, false).expect("error log");
    let le16 = |o: usize| u16::from_le_bytes([log[o], log[o + 1]]);
    let count = |e: usize| u64::from_le_bytes(log[e * 64..e * 64 + 8].try_into().unwrap());
    assert_eq!(count(0), 9, "nine failed commands so far");
    assert_eq!((count(1), count(8), count(9)), (8, 1, 0), "newest first, unused entries zero");
    assert_eq!(le16(8), 1, "failed on I/O queue 1");
    assert_eq!(Status::from_field(le16(12)), status(0, sc::INVALID_FIELD));
    assert_eq!(Status::from_field(le16(8 * 64 + 12)), status(0, sc::LBA_OUT_OF_RANGE), "the oldest: the first out-of-range read");
    assert_eq!(log[29], 3, "transport type TCP");
    // Each entry names the command: opcode, namespace (FFFFFFFFh when it has none) and first
    // LBA (for commands that address blocks), so `nvme error-log` shows where it failed.
    let le32 = |o: usize| u32::from_le_bytes(log[o..o + 4].try_into().unwrap());
    let le64 = |o: usize| u64::from_le_bytes(log[o..o + 8].try_into().unwrap());
    let site = |e: usize| (log[e * 64 + 31], le32(e * 64 + 24), le64(e * 64 + 16));
    assert_eq!(site(8), (io_opc::READ, 1, 131072 - 4), "the first out-of-range read");
    assert_eq!(site(6), (io_opc::WRITE, 1, 131072), "the out-of-range write");
    assert_eq!(site(5), (0x7E, 1, 0), "an unknown opcode addresses no blocks");
    assert_eq!(site(4), (io_opc::READ, 9, 0), "a namespace that does not exist: named, no LBA");
    assert_eq!(site(3), (io_opc::READ, 0xFFFF_FFFF, 0), "NSID 0: no namespace");
    assert_eq!(log[63], 1, "log page version 1: opcode and command set are valid");
    // Admin errors.
    assert!(matches!(bad.get_log_page(0x42, 0, 512, 0, false), Err(Error::Status(s)) if (s.sct, s.sc) == (1, 0x09)));
    assert!(matches!(bad.identify(0x33, 0), Err(Error::Status(s)) if s.sc == sc::INVALID_FIELD));
    assert!(matches!(bad.set_features(0x55, 0), Err(Error::Status(s)) if s.sc == sc::INVALID_FIELD));
    check_good(&mut gq);
    drop((q, bad));

    // Transport-level errors: C2HTermReq, then the connection closes.
    // A capsule whose PLEN is shorter than its header.
    let mut q = raw_conn(addr);
    let mut h = pdu::capsule_cmd(&Sqe::new(admin_opc::KEEP_ALIVE, 1, 0), 0, false, false).as_slice().to_vec();
    h[4..8].copy_from_slice(&40u32.to_le_bytes());
    q.send_raw(&h).unwrap();
    assert_eq!(expect_term(&mut q, Fes::InvalidHeaderField), 4);
    // An unknown PDU type.
    let mut q = raw_conn(addr);
    q.send_raw(&[0x42, 0, 24, 0, 24, 0, 0, 0]).unwrap();
    q.send_raw(&[0u8; 16]).unwrap();
    assert_eq!(expect_term(&mut q, Fes::InvalidHeaderField), 0);
    // More in-capsule data than IOCCSZ allows.
    let mut q = raw_conn(addr);
    let mut sqe = Sqe::new(admin_opc::SET_FEATURES, 2, 0);
    sqe.set_sgl(0, 16384, sgl::IN_CAPSULE);
    let mut raw = pdu::capsule_cmd(&sqe, 16384, false, false).as_slice().to_vec();
    raw.extend_from_slice(&[0u8; 16384]);
    let _ = q.send_raw(&raw);
    expect_term(&mut q, Fes::DataLimitExceeded);
    // H2CData for a transfer tag that was never given out.
    let mut q = raw_conn(addr);
    let h2c = pdu::h2c_data(3, 77, 0, 512, true, false, false);
    let mut raw = h2c.as_slice().to_vec();
    raw.extend_from_slice(&[0u8; 512]);
    q.send_raw(&raw).unwrap();
    assert_eq!(expect_term(&mut q, Fes::InvalidHeaderField), 10);
    // H2CData at the wrong offset of a real R2T.
    let mut bad = Controller::connect(addr, NQN, &opts(HOST_B)).unwrap();
    let mut q = bad.connect_io(1, 32).unwrap();
    let mut w = Qpair::rw_sqe(io_opc::WRITE, 1, 0, 64);
    w.set_cid(9);
    w.set_sgl(0, 32768, sgl::TRANSPORT_DATA_BLOCK);
    q.send_raw(pdu::capsule_cmd(&w, 0, false, false).as_slice()).unwrap();
    let r2t = q.recv_pdu().unwrap();
    assert_eq!(r2t[0], pdu::pdu_type::R2T);
    let r2t = pdu::R2t::parse(&r2t).unwrap();
    assert_eq!((r2t.cccid, r2t.r2to, r2t.r2tl), (9, 0, 32768));
    let mut raw = pdu::h2c_data(9, r2t.ttag, 512, 1024, false, false, false).as_slice().to_vec();
    raw.extend_from_slice(&[0u8; 1024]);
    q.send_raw(&raw).unwrap();
    assert_eq!(expect_term(&mut q, Fes::DataOutOfRange), 12);
    drop(bad);
    // Bytes that are not an ICReq first.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    s.write_all(pdu::capsule_cmd(&Sqe::new(admin_opc::KEEP_ALIVE, 1, 0), 0, false, false).as_slice()).unwrap();
    let mut term = [0u8; 24];
    s.read_exact(&mut term).unwrap();
    assert_eq!(term[0], pdu::pdu_type::C2H_TERM_REQ);
    assert_eq!(pdu::parse_term_req(&term).unwrap().0, Fes::PduSequenceError as u16);
    // A truncated PDU and a vanished host: the target just closes.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&pdu::IcReq { pfv: 0, hpda: 0, dgst: 0, maxr2t: 0 }.to_bytes()[..60]).unwrap();
    drop(s);
    // Random garbage from many connections at once.
    let mut junk = Vec::new();
    for i in 0..16u32 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let bytes: Vec<u8> = (0..4096u32).map(|j| (j.wrapping_mul(2654435761).wrapping_add(i * 7919) >> 13) as u8).collect();
        let _ = s.write_all(&bytes);
        junk.push(s);
    }
    drop(junk);

    check_good(&mut gq);
    good.keep_alive().unwrap();
    // Nothing leaked: only the good host's controller remains.
    wait_until(|| d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().unwrap().len() == 1, "bad hosts' controllers go away");
}

#[test]
fn access_control_and_namespace_events() {
    let (d, addr) = start("[0, 1]", false);
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 2048, "block_size": 4096}));
    // Not on the allow-list: Connect Invalid Host, and discovery does not show the subsystem.
    match Controller::connect(addr, NQN, &opts(HOST_A)) {
        Err(Error::Status(s)) => assert_eq!((s.sct, s.sc), (1, 0x84)),
        other => panic!("expected Connect Invalid Host, got {:?}", other.map(|c| c.cntlid)),
    }
    let mut disc = Controller::connect(addr, spec::DISCOVERY_NQN, &opts(HOST_A)).unwrap();
    assert!(disc.discovery_log().unwrap().1.is_empty());
    d.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST_A}));
    let (_, entries) = disc.discovery_log().unwrap();
    assert_eq!(entries.len(), 1);
    // Host B is still refused; unknown subsystems are invalid parameters.
    assert!(matches!(Controller::connect(addr, NQN, &opts(HOST_B)), Err(Error::Status(s)) if s.sc == 0x84));
    assert!(matches!(Controller::connect(addr, "nqn.2016-06.io.tidemark:nope", &opts(HOST_A)), Err(Error::Status(s)) if s.sc == 0x82));

    let mut c = Controller::connect(addr, NQN, &opts(HOST_A)).unwrap();
    let mut q = c.connect_io(1, 16).unwrap();
    // An I/O queue naming another host's controller is refused.
    let mut intruder = Qpair::connect(addr, &opts(HOST_B)).unwrap();
    assert!(matches!(intruder.fabric_connect(1, c.cntlid, NQN, &opts(HOST_B)), Err(Error::Status(s)) if s.sc == 0x84));

    // Namespace attribute notices: enable, post an AER, add and remove a namespace.
    c.set_features(spec::feat::ASYNC_EVENT_CONFIG, 1 << 8).unwrap();
    let aer = c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    assert_eq!(d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m1"}})), json!(2));
    let ev = wait_completion(&mut c.admin, aer);
    assert!(ev.cqe.status().is_success());
    assert_eq!(ev.cqe.dw0, 0x0004_0002, "notice: namespace attribute changed, log page 04h");
    let log = c.get_log_page(spec::log::CHANGED_NS, 0, 4096, 0, false).unwrap();
    assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 2);
    assert_eq!(c.active_namespaces().unwrap(), vec![1, 2]);
    assert_eq!(c.identify_namespace(2).unwrap().block_size, 4096);
    let aer = c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    // The namespace is in use by a queue when it goes away.
    let mut io2 = Qpair::rw_sqe(io_opc::READ, 2, 0, 1);
    io2.set_cdw(12, 0);
    assert!(q.execute(io2, Payload::In(4096)).unwrap().0.status().is_success());
    d.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 2}));
    let ev = wait_completion(&mut c.admin, aer);
    assert_eq!(ev.cqe.dw0, 0x0004_0002);
    assert_eq!(c.active_namespaces().unwrap(), vec![1]);
    assert_eq!(q.execute(Qpair::rw_sqe(io_opc::READ, 2, 0, 1), Payload::In(4096)).unwrap().0.status().sc, sc::INVALID_NAMESPACE);
    // Released by the export: the bdev can go.
    d.rpc("bdev_malloc_delete", json!({"name": "m1"}));
    // Abort of an outstanding AER completes it with Abort Requested.
    let aer = c.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    let mut abort = Sqe::new(admin_opc::ABORT, 0, 0);
    abort.set_cdw(10, (aer as u32) << 16);
    let (cqe, _) = c.admin.execute(abort, Payload::None).unwrap();
    assert_eq!(cqe.dw0 & 1, 0, "aborted");
    let ev = wait_completion(&mut c.admin, aer);
    assert_eq!(ev.cqe.status().sc, sc::ABORT_REQUESTED);

    // Removing the host disconnects its controller.
    d.rpc("nvmf_subsystem_remove_host", json!({"nqn": NQN, "host": HOST_A}));
    assert!(q.wait_closed(Duration::from_secs(10)));
    wait_until(|| d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().unwrap().is_empty(), "controller removed");
}

#[test]
fn keep_alive_timeout_tears_the_controller_down_with_io_in_flight() {
    let (d, addr) = start("[0, 1]", true);
    // A slow bdev so that I/O is in flight when the controller dies.
    d.rpc("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 1}));
    d.rpc("bdev_delay_create", json!({"name": "slow", "base_bdev_name": "m0", "avg_read_latency": 300000, "p99_read_latency": 300000, "avg_write_latency": 300000, "p99_write_latency": 300000}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "slow", "nsid": 1}}));
    let o = QpairOptions { kato_ms: 1000, ..opts(HOST_A) };
    let mut c = Controller::connect(addr, NQN, &o).unwrap();
    let mut q = c.connect_io(1, 32).unwrap();
    let mut done = Vec::new();
    for i in 0..16 {
        q.submit(Qpair::rw_sqe(io_opc::READ, 1, i * 8, 8), Payload::In(4096)).unwrap();
    }
    q.flush().unwrap();
    let _ = q.poll(&mut done);
    // No keep-alive for well over KATO: the target gives up on the host.
    let t0 = Instant::now();
    assert!(q.wait_closed(Duration::from_secs(10)), "I/O queue closed by the target");
    assert!(c.admin.wait_closed(Duration::from_secs(5)), "admin queue closed by the target");
    assert!(t0.elapsed() >= Duration::from_millis(500));
    wait_until(|| d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().unwrap().is_empty(), "controller removed");
    // In-flight I/O finished; nothing holds the bdev once the export is gone.
    wait_until(|| d.rpc("bdev_get_iostat", json!({"name": "slow"}))["bdevs"][0]["queue_depth"] == 0, "bdev drained");
    d.rpc("nvmf_delete_subsystem", json!({"nqn": NQN}));
    d.rpc("bdev_delay_delete", json!({"name": "slow"}));
    d.rpc("bdev_malloc_delete", json!({"name": "m0"}));
}

#[test]
fn rpcs_validate_and_save_config_round_trips() {
    let (d, addr) = start("[0]", false);
    let e = |m: &str, p: Value| d.try_rpc(m, p).unwrap_err();
    assert!(e("nvmf_create_subsystem", json!({"nqn": "not-an-nqn"})).message.contains("nqn"));
    assert_eq!(e("nvmf_create_subsystem", json!({"nqn": NQN})).code, -17);
    assert!(e("nvmf_create_subsystem", json!({"nqn": "nqn.2016-06.io.x:a", "serial_number": "x".repeat(30)})).message.contains("serial_number"));
    assert!(e("nvmf_create_subsystem", json!({"nqn": "nqn.2016-06.io.x:a", "bogus": 1})).message.contains("bogus"));
    assert!(e("nvmf_create_transport", json!({"trtype": "RDMA"})).message.contains("trtype"));
    assert_eq!(e("nvmf_create_transport", json!({"trtype": "TCP"})).code, -17);
    assert!(e("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "nope"}})).message.contains("bdev_name"));
    assert!(e("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m0", "nsid": 1}})).message.contains("nsid"));
    assert!(e("nvmf_subsystem_add_ns", json!({"nqn": "nqn.2016-06.io.x:none", "namespace": {"bdev_name": "m0"}})).message.contains("nqn"));
    assert!(e("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "traddr": "nowhere", "trsvcid": "1"}}))
        .message
        .contains("traddr"));
    assert!(e("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": "bad host"})).message.contains("host"));
    assert!(e("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 5})).message.contains("nsid"));
    assert_eq!(e("bdev_malloc_delete", json!({"name": "m0"})).code, -16, "an exported bdev is busy");
    // A listener on a port in use is refused and leaves nothing behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = taken.local_addr().unwrap().port().to_string();
    let err = e("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": p}}));
    assert!(err.message.contains("listen"), "{err:?}");
    d.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST_A}));
    d.rpc("nvmf_subsystem_allow_any_host", json!({"nqn": NQN, "allow_any_host": false}));

    let subs = d.rpc("nvmf_get_subsystems", json!(null));
    assert_eq!(subs[0]["subtype"], "Discovery");
    assert_eq!(subs[1]["nqn"], NQN);
    assert_eq!(subs[1]["namespaces"][0]["bdev_name"], "m0");
    assert_eq!(subs[1]["hosts"][0]["nqn"], HOST_A);
    assert_eq!(subs[1]["listen_addresses"][0]["trsvcid"], addr.port().to_string());
    let tr = d.rpc("nvmf_get_transports", json!(null));
    assert_eq!(tr[0]["trtype"], "TCP");
    assert_eq!(tr[0]["max_io_size"], 131072);

    let path = d.dir.path().join("saved.toml");
    d.rpc("save_config", json!({"path": path.display().to_string()}));
    let saved = std::fs::read_to_string(&path).unwrap();
    // The same export in a fresh daemon (after this one lets go of the port).
    drop(d);
    let d2 = Daemon::start(&saved.replace("rpc.sock", "rpc2.sock"));
    let subs2 = d2.rpc("nvmf_get_subsystems", json!({"nqn": NQN}));
    assert_eq!(subs2[0]["hosts"][0]["nqn"], HOST_A);
    assert_eq!(subs2[0]["serial_number"], "SN-TEST-1");
    let mut c = Controller::connect(addr, NQN, &opts(HOST_A)).expect("the saved export works");
    assert_eq!(c.active_namespaces().unwrap(), vec![1]);
    d2.rpc("nvmf_delete_subsystem", json!({"nqn": NQN}));
    assert!(c.admin.wait_closed(Duration::from_secs(10)), "deleting the subsystem disconnects its hosts");
    d2.rpc("bdev_malloc_delete", json!({"name": "m0"}));
}

#[test]
fn metrics_per_subsystem_and_namespace() {
    let (d, addr) = start("[0]", true);
    let mut c = Controller::connect(addr, NQN, &opts(HOST_A)).unwrap();
    let mut q = c.connect_io(1, 16).unwrap();
    for i in 0..10 {
        assert!(write(&mut q, i * 8, &pattern(4096, i as u8), 512).is_success());
        assert!(read(&mut q, i * 8, 8, 512).0.is_success());
    }
    let m = d.metrics();
    let value = |prefix: &str, has: &str| -> f64 {
        let l = m.lines().find(|l| l.starts_with(prefix) && l.contains(has)).unwrap_or_else(|| panic!("no {prefix} with {has} in\n{m}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("tidemark_nvmf_controllers{", NQN), 1.0);
    assert_eq!(value("tidemark_nvmf_qpairs{", NQN), 2.0);
    assert_eq!(value("tidemark_nvmf_namespace_ops_total{", "type=\"read\""), 10.0);
    assert_eq!(value("tidemark_nvmf_namespace_bytes_total{", "type=\"write\""), 40960.0);
    assert!(m.contains("tidemark_nvmf_namespace_read_latency_seconds_bucket{"), "{m}");
}

/// Well-framed capsules with random command bytes (and random in-capsule data) on connected
/// admin and I/O queues: whatever the target answers, it must answer every command it
/// accepts, and keep serving a well-behaved host. A seeded generator keeps failures
/// reproducible.
#[test]
fn random_commands_on_live_queues() {
    let (d, addr) = start("[0, 1]", true);
    let mut good = Controller::connect(addr, NQN, &opts(HOST_A)).unwrap();
    let mut gq = good.connect_io(1, 32).unwrap();
    let keep = pattern(4096, 5);
    assert!(write(&mut gq, 64, &keep, 512).is_success());
    let mut seed = 0x5EED_u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut answered = 0;
    for round in 0..6 {
        let mut c = Controller::connect(addr, NQN, &opts(HOST_B)).unwrap();
        c.set_queue_count(2).unwrap();
        let mut q = c.connect_io(1, 64).unwrap();
        for i in 0..300 {
            let admin = i % 3 == 0;
            let mut sqe = Sqe::default();
            for b in sqe.0.iter_mut() {
                *b = rnd() as u8;
            }
            // Mostly real opcodes, namespace 1 and plausible ranges, so commands get deep.
            let opcodes: &[u8] = if admin { &[0x02, 0x06, 0x08, 0x09, 0x0A, 0x18, 0x7F, 0x0C] } else { &[0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x7F] };
            sqe.0[0] = opcodes[rnd() as usize % opcodes.len()];
            if sqe.0[0] == 0x0C {
                sqe.0[0] = 0x18; // no AERs: they would stay outstanding
            }
            if rnd() % 4 != 0 {
                sqe.0[1] = 0x40;
                sqe.0[4..8].copy_from_slice(&1u32.to_le_bytes());
                sqe.set_cdw(10, (rnd() % 131072) as u32);
                sqe.set_cdw(11, 0);
                sqe.set_cdw(12, (rnd() % 64) as u32);
            }
            let q = if admin { &mut c.admin } else { &mut q };
            let len = [0usize, 0, 512, 4096, 5000, 8192][rnd() as usize % 6];
            let data: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            // The data direction follows the opcode (fctype for Fabrics), as a host's would.
            let payload = match sqe.transfer() {
                spec::Transfer::HostToController if len > 0 => Payload::Out(&data),
                spec::Transfer::ControllerToHost => Payload::In(len.max(512)),
                _ => Payload::None,
            };
            match q.execute(sqe, payload) {
                Ok(_) => answered += 1,
                // A Connect with random bytes, a Disconnect, a reset or a fatal PDU error may
                // legitimately end the queue; the next round starts fresh.
                Err(Error::Closed) | Err(Error::TermReq { .. }) => break,
                Err(e) => panic!("round {round} command {i} ({:?}): {e}\n{}", sqe, d.log_text()),
            }
        }
        drop((q, c));
        assert_eq!(read(&mut gq, 64, 8, 512), (Status::SUCCESS, keep.clone()), "round {round}: the good host is still served");
    }
    assert!(answered > 300, "only {answered} random commands were answered");
    good.keep_alive().unwrap();
}
