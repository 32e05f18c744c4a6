//! The fuzz corpora as regression tests on stable Rust: every file under `fuzz/corpus/<target>/`
//! goes to the function its fuzz target runs (`tidemark::fuzz::<target>`), which must neither
//! panic nor hang. Every target in `fuzz/fuzz_targets/` must have a corpus here. A crash the
//! fuzzer finds is fixed and its input committed to the target's corpus.
//!
//! The connection seeds (`nvmf_pdu`, `iscsi_conn`) are recorded, client to target, from our
//! initiators talking to the fuzz harness through a recording proxy:
//! `cargo test --test fuzz_corpus -- --ignored record_connection_seeds`.

mod support;

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::io_opc;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.expect("dir entry").path()).collect();
    v.sort();
    assert!(!v.is_empty(), "{} has no seed", dir.display());
    v
}

/// The PDU types in an NVMe/TCP byte stream (PLEN at bytes 4..8 of each common header).
fn nvme_pdu_types(mut b: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while b.len() >= 8 {
        let plen = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        types.push(b[0]);
        if plen < 8 || plen > b.len() {
            break;
        }
        b = &b[plen..];
    }
    types
}

#[test]
fn every_fuzz_target_has_a_corpus_and_every_corpus_file_passes() {
    let targets: [(&str, fn(&[u8])); 8] = [
        ("nvmf_pdu", |d| drop(tidemark::fuzz::nvmf_pdu(d))),
        ("iscsi_conn", |d| drop(tidemark::fuzz::iscsi_conn(d))),
        ("nvmf_capsule", tidemark::fuzz::nvmf_capsule),
        ("iscsi_login", tidemark::fuzz::iscsi_login),
        ("iscsi_text", tidemark::fuzz::iscsi_text),
        ("scsi_cdb", tidemark::fuzz::scsi_cdb),
        ("nvmf_auth", tidemark::fuzz::nvmf_auth),
        ("nvmf_tls", |d| drop(tidemark::fuzz::nvmf_tls(d))),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for e in std::fs::read_dir(&dir).expect("fuzz/fuzz_targets") {
        let p = e.expect("dir entry").path();
        let name = p.file_stem().and_then(|s| s.to_str()).expect("a target name").to_string();
        assert!(targets.iter().any(|(t, _)| *t == name), "fuzz target {name} has no corpus regression here");
    }
    for (name, run) in targets {
        for f in files(name) {
            let data = std::fs::read(&f).expect("read a seed");
            eprintln!("{name}: {}", f.display());
            run(&data);
        }
    }
}

/// The recorded sessions still reach what they were recorded for: the I/O path answers reads
/// with data (C2HData), the iSCSI session gets SCSI responses.
#[test]
fn the_connection_seeds_reach_the_io_path() {
    for f in files("nvmf_pdu") {
        let data = std::fs::read(&f).expect("read a seed");
        let types = nvme_pdu_types(&tidemark::fuzz::nvmf_pdu(&data));
        assert_eq!(types.first(), Some(&0x01), "{}: an ICResp first: {types:x?}", f.display());
        if f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("io")) {
            assert!(types.contains(&0x07), "{}: reads answered with C2HData: {types:x?}", f.display());
        }
    }
    // Over TLS, with records cut at every byte, at 1/7/333 bytes and whole: the admin session
    // (the recorded one, as the TLS host) connects and is answered as over plain TCP.
    for f in files("nvmf_tls").into_iter().filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tls_"))) {
        let data = std::fs::read(&f).expect("read a seed");
        let answer = tidemark::fuzz::nvmf_tls(&data);
        let types = nvme_pdu_types(&answer);
        assert_eq!(types.first(), Some(&0x01), "{}: an ICResp first: {types:x?}", f.display());
        // The first CapsuleResp answers the Connect: success (status bits of CQE dword 3).
        let icresp_len = u32::from_le_bytes(answer[4..8].try_into().unwrap()) as usize;
        let resp = &answer[icresp_len..];
        assert_eq!(resp[0], 0x05, "{}: a CapsuleResp after the ICResp", f.display());
        let status = u16::from_le_bytes([resp[8 + 14], resp[8 + 15]]) >> 1;
        assert_eq!(status, 0, "{}: the TLS host's Connect failed", f.display());
        assert!(types.iter().filter(|&&t| t == 0x05).count() > 2, "{}: admin commands answered: {types:x?}", f.display());
    }
    for f in files("iscsi_conn") {
        let data = std::fs::read(&f).expect("read a seed");
        let answer = tidemark::fuzz::iscsi_conn(&data);
        // Login Response (0x23) first; SCSI Response (0x21) or Data-In (0x25) later.
        assert_eq!(answer.first().map(|b| b & 0x3f), Some(0x23), "{}", f.display());
        assert!(answer.chunks(48).any(|h| matches!(h[0] & 0x3f, 0x21 | 0x25)) || answer.len() > 48 * 3, "{}", f.display());
    }
}

/// A host that half-closes its connection right after sending commands (as the fuzz inputs
/// do) still gets their answers: the target keeps its sending side open until they are out.
/// The namespace answers after 200 ms, long after the target has seen the host's FIN.
#[test]
fn answers_still_go_out_after_the_host_half_closes() {
    use serde_json::json;
    let d = support::Daemon::start(support::MINIMAL_CONFIG);
    let port = support::free_port();
    let nqn = "nqn.2016-06.io.tidemark:halfclose";
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 2048, "block_size": 512}));
    d.rpc(
        "bdev_delay_create",
        json!({"name": "slow", "base_bdev_name": "m0", "avg_read_latency": 200000, "p99_read_latency": 200000, "avg_write_latency": 200000, "p99_write_latency": 200000}),
    );
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": nqn, "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": nqn, "namespace": {"bdev_name": "slow", "nsid": 1}}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Controller::connect(addr, nqn, &QpairOptions::default()).expect("connect");
    let mut q = c.connect_io(1, 8).expect("I/O queue");
    for lba in [0u64, 8, 16] {
        q.submit(Qpair::rw_sqe(io_opc::READ, 1, lba, 8), Payload::InDiscard(4096)).expect("submit");
    }
    while !q.flush().expect("send") {}
    q.stream().shutdown(Shutdown::Write).expect("half-close");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < 3 && std::time::Instant::now() < deadline {
        if q.poll(&mut done).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(done.len(), 3, "NVMe/TCP: the reads sent before the half-close were not all answered");
    assert!(done.iter().all(|c| c.cqe.status().is_success()));

    // iSCSI, the same: a READ(10) sent, the sending side shut, the data and status arrive.
    let iport = support::free_port();
    let target = "iqn.2016-06.io.tidemark:halfclose";
    d.rpc("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": iport.to_string()}]}));
    d.rpc("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["ANY"]}));
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": target, "luns": [{"bdev_name": "slow", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8}),
    );
    let iaddr: SocketAddr = format!("127.0.0.1:{iport}").parse().unwrap();
    let mut s = client::Session::login(iaddr, &client::LoginOptions::normal("iqn.2016-06.io.test:halfclose", target)).expect("iSCSI login");
    let h = s.command_header(0, &client::read10(0, 8), 4096, true, false);
    s.send(h, &[]).expect("send READ(10)");
    s.s.shutdown(Shutdown::Write).expect("half-close");
    s.s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut status = None;
    while status.is_none() {
        let Ok(p) = s.recv() else { break };
        match p.opcode() {
            // SCSI Response, or Data-In carrying the status (S bit).
            0x21 => status = Some(p.bhs[3]),
            0x25 if p.bhs[1] & 0x01 != 0 => status = Some(p.bhs[3]),
            _ => {}
        }
    }
    assert_eq!(status, Some(0), "iSCSI: the READ sent before the half-close was not answered with GOOD");
}

/// Connects to `target` through a proxy, runs `client` against the proxy and returns the bytes
/// the client sent.
fn record(target: SocketAddr, client: impl FnOnce(SocketAddr)) -> Vec<u8> {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let addr = l.local_addr().expect("proxy address");
    let proxy = std::thread::spawn(move || {
        let (c, _) = l.accept().expect("accept the client");
        let t = TcpStream::connect(target).expect("connect to the target");
        let (c2, t2) = (c.try_clone().expect("dup"), t.try_clone().expect("dup"));
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut &t2, &mut &c2);
            let _ = c2.shutdown(Shutdown::Write);
        });
        let mut log = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match (&c).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    log.extend_from_slice(&buf[..n]);
                    if (&t).write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = t.shutdown(Shutdown::Write);
        let _ = back.join();
        log
    });
    client(addr);
    proxy.join().expect("proxy thread")
}

/// Gives every capsule of a recorded NVMe/TCP stream its own command id (H2CData follows the
/// last capsule): the initiator ran one command at a time and reused ids, a replay sends them
/// all at once, where a reused id is a conflict. Header digests are recomputed.
fn unique_cids(stream: &[u8]) -> Vec<u8> {
    let mut out = stream.to_vec();
    let (mut off, mut cid) = (0usize, 0u16);
    while off + 8 <= out.len() {
        let (ty, flags, hlen) = (out[off], out[off + 1], out[off + 2] as usize);
        let plen = u32::from_le_bytes([out[off + 4], out[off + 5], out[off + 6], out[off + 7]]) as usize;
        match ty {
            0x04 => {
                cid += 1;
                out[off + 10..off + 12].copy_from_slice(&cid.to_le_bytes());
            }
            0x06 => out[off + 8..off + 10].copy_from_slice(&cid.to_le_bytes()),
            _ => {}
        }
        if flags & 0x01 != 0 && ty != 0x00 {
            let d = tidemark::nvmf::pdu::digest(&out[off..off + hlen]);
            out[off + hlen..off + hlen + 4].copy_from_slice(&d.to_le_bytes());
        }
        off += plen.max(8);
    }
    out
}

#[test]
#[ignore = "writes the recorded seeds into fuzz/corpus; run by hand"]
fn record_connection_seeds() {
    let h = tidemark::fuzz::harness();
    let cntlid = h.admin.lock().expect("admin controller").cntlid;
    let nqn = tidemark::fuzz::NVMF_NQN;
    let write = |target: &str, name: &str, bytes: Vec<u8>| {
        std::fs::create_dir_all(corpus_dir(target)).expect("corpus dir");
        std::fs::write(corpus_dir(target).join(name), bytes).expect("write seed");
    };
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 13 + 1) as u8).collect();
    write(
        "nvmf_pdu",
        "admin",
        unique_cids(&record(h.nvmf_addr, |a| {
            let mut c = Controller::connect(a, nqn, &QpairOptions::default()).expect("admin connect");
            c.identify(1, 0).expect("identify controller");
            c.identify_namespace(1).expect("identify namespace");
            c.active_namespaces().expect("active namespaces");
            c.get_log_page(0x02, 0xFFFF_FFFF, 512, 0, false).expect("SMART log");
            c.set_queue_count(2).expect("queue count");
            c.keep_alive().expect("keep alive");
        })),
    );
    for (name, hdgst, ddgst) in [("io", false, false), ("io_digests", true, true)] {
        write(
            "nvmf_pdu",
            name,
            unique_cids(&record(h.nvmf_addr, |a| {
                let o = QpairOptions { hdgst, ddgst, queue_size: 8, ..QpairOptions::default() };
                let mut q = Qpair::connect(a, &o).expect("I/O queue");
                q.fabric_connect(1, cntlid, nqn, &o).expect("I/O connect");
                // The write that needs an R2T first: its transfer tag (the command's slot) is then
                // the same when the seed replays all at once.
                for (lba, len) in [(16u64, 16384usize), (0, 4096), (200, 512)] {
                    let (cqe, _) = q.execute(Qpair::rw_sqe(io_opc::WRITE, 1, lba, (len / 512) as u32), Payload::Out(&data[..len])).expect("write");
                    assert!(cqe.status().is_success());
                    let (cqe, back) = q.execute(Qpair::rw_sqe(io_opc::READ, 1, lba, (len / 512) as u32), Payload::In(len)).expect("read");
                    assert!(cqe.status().is_success() && back == data[..len]);
                }
                let (cqe, _) = q.execute(tidemark::nvmf::spec::Sqe::new(io_opc::FLUSH, 0, 1), Payload::None).expect("flush");
                assert!(cqe.status().is_success());
            })),
        );
    }
    write(
        "iscsi_conn",
        "session",
        record(h.iscsi_addr, |a| {
            let mut s =
                client::Session::login(a, &client::LoginOptions::normal("iqn.2016-06.io.tidemark:fuzz-init", tidemark::fuzz::ISCSI_TARGET)).expect("login");
            s.scsi(0, &[0x12, 0, 0, 0, 36, 0], 36, None).expect("inquiry");
            s.scsi(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, None).expect("read capacity");
            s.scsi(0, &client::write10(8, 8), 4096, Some(&data[..4096])).expect("write");
            s.scsi(0, &client::read10(8, 8), 4096, None).expect("read");
            s.ping(b"ping").expect("nop");
        }),
    );
}
