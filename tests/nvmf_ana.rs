//! ANA (Asymmetric Namespace Access) on the NVMe/TCP target, driven by our own initiator over
//! two listeners of one subsystem created with `ana_reporting`: the Identify fields a
//! multipath host needs, the ANA log page (groups, states, NSIDs, RGO, offsets), a listener
//! set inaccessible (its I/O gets the path-related status, the ANA change event and the change
//! count arrive, the other path keeps working), the RPC errors, the listeners' states in
//! `nvmf_subsystem_get_listeners` and the metrics, a removed listener dropping its hosts, and
//! the states surviving `save_config` and a restart.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tidemark::nvmf::initiator::{Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::{self, admin_opc, io_opc, Sqe, Status};

const NQN: &str = "nqn.2016-06.io.tidemark:ana";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:33333333-3333-4333-8333-333333333333";
/// AER dword 0: notice, ANA change, log page 0Ch.
const AEN_ANA: u32 = 0x000C_0302;
/// Async Event Configuration bit 11: ANA change notices.
const AEC_ANA: u32 = 1 << 11;
const INACCESSIBLE: Status = Status { sct: 3, sc: 2, dnr: false };

fn laddr(port: u16) -> Value {
    json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()})
}

/// A daemon with subsystem `NQN` (ana_reporting, max_namespaces 4): namespace 1 (group 1),
/// namespace 2 in group 3, listening on two ports.
fn start() -> (Daemon, u16, u16) {
    let d = Daemon::start(MINIMAL_CONFIG);
    let (p1, p2) = (free_port(), free_port());
    d.rpc("bdev_malloc_create", json!({"name": "m0", "num_blocks": 8192, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "m1", "num_blocks": 8192, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "allow_any_host": true, "ana_reporting": true, "max_namespaces": 4}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m0", "nsid": 1}}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m1", "nsid": 2, "anagrpid": 3}}));
    for p in [p1, p2] {
        d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": laddr(p)}));
    }
    (d, p1, p2)
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn host(port: u16) -> (Controller, Qpair) {
    let o = QpairOptions { hostnqn: HOST.to_string(), hostid: [0x33; 16], ..QpairOptions::default() };
    let mut c = Controller::connect(addr(port), NQN, &o).expect("connect");
    c.set_queue_count(1).unwrap();
    let q = c.connect_io(1, 32).unwrap();
    (c, q)
}

fn write(q: &mut Qpair, nsid: u32) -> Status {
    q.execute(Qpair::rw_sqe(io_opc::WRITE, nsid, 0, 1), Payload::Out(&[0x5A; 512])).unwrap().0.status()
}

fn read(q: &mut Qpair, nsid: u32) -> Status {
    q.execute(Qpair::rw_sqe(io_opc::READ, nsid, 0, 1), Payload::In(512)).unwrap().0.status()
}

/// Get Log Page ANA with Return Groups Only as asked, `len` bytes from `offset`.
fn ana_log(c: &mut Controller, len: usize, offset: u64, rgo: bool) -> Result<Vec<u8>, Status> {
    let numd = (len / 4) as u32 - 1;
    let mut sqe = Sqe::new(admin_opc::GET_LOG_PAGE, 0, spec::NSID_ALL);
    sqe.set_cdw(10, spec::log::ANA as u32 | if rgo { 1 << 8 } else { 0 } | (numd & 0xFFFF) << 16);
    sqe.set_cdw(11, numd >> 16);
    sqe.set_cdw(12, offset as u32);
    sqe.set_cdw(13, (offset >> 32) as u32);
    let (cqe, data) = c.admin.execute(sqe, Payload::In(len)).unwrap();
    if cqe.status().is_success() {
        Ok(data)
    } else {
        Err(cqe.status())
    }
}

/// The ANA log page parsed: (change count, [(group, change count, state, nsids)]).
type Ana = (u64, Vec<(u32, u64, u8, Vec<u32>)>);

fn parse_ana(p: &[u8]) -> Ana {
    let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
    let n = u16::from_le_bytes([p[8], p[9]]) as usize;
    let mut o = 16;
    let mut groups = Vec::new();
    for _ in 0..n {
        let nn = u32_at(o + 4) as usize;
        let nsids = (0..nn).map(|i| u32_at(o + 32 + 4 * i)).collect();
        groups.push((u32_at(o), u64_at(o + 8), p[o + 16], nsids));
        o += 32 + 4 * nn;
    }
    (u64_at(0), groups)
}

fn states(c: &mut Controller) -> Vec<(u32, u8)> {
    parse_ana(&ana_log(c, 4096, 0, false).unwrap()).1.into_iter().map(|g| (g.0, g.2)).collect()
}

fn set_state(d: &Daemon, port: u16, state: &str, grp: Option<u32>) {
    let mut p = json!({"nqn": NQN, "listen_address": laddr(port), "ana_state": state});
    if let Some(g) = grp {
        p["anagrpid"] = json!(g);
    }
    d.rpc("nvmf_subsystem_listener_set_ana_state", p);
}

fn listener_states(d: &Daemon, port: u16) -> Vec<(u64, String)> {
    let ls = d.rpc("nvmf_subsystem_get_listeners", json!({"nqn": NQN}));
    let l =
        ls.as_array().unwrap().iter().find(|l| l["address"]["trsvcid"].as_str().and_then(|p| p.parse::<u16>().ok()) == Some(port)).expect("listener listed");
    l["ana_states"].as_array().unwrap().iter().map(|s| (s["ana_group"].as_u64().unwrap(), s["ana_state"].as_str().unwrap().to_string())).collect()
}

#[test]
fn two_listeners_identify_log_page_inaccessible_path_event_and_errors() {
    let (d, p1, p2) = start();
    let (mut c1, mut q1) = host(p1);
    let (mut c2, mut q2) = host(p2);

    // Identify Controller: CMIC multi-controller + ANA, OAES ANA change, ANATT, ANACAP,
    // ANAGRPMAX and NANAGRPID = max_namespaces.
    let id = c1.identify(spec::cns::CONTROLLER, 0).unwrap();
    assert_eq!(id[76] & 0b1010, 0b1010, "CMIC");
    assert_ne!(u32::from_le_bytes(id[92..96].try_into().unwrap()) & (1 << 11), 0, "OAES: ANA change notices");
    assert!(id[342] > 0, "ANATT");
    assert_eq!(id[343] & 0x1F, 0x1F, "ANACAP: every state reported");
    assert_eq!(u32::from_le_bytes(id[344..348].try_into().unwrap()), 4, "ANAGRPMAX");
    assert_eq!(u32::from_le_bytes(id[348..352].try_into().unwrap()), 4, "NANAGRPID");
    assert_eq!(u32::from_le_bytes(id[540..544].try_into().unwrap()), 4, "MNAN");
    // Identify Namespace: ANAGRPID (nsid by default, or the one given) and NMIC shared.
    let ns1 = c1.identify(spec::cns::NAMESPACE, 1).unwrap();
    let ns2 = c1.identify(spec::cns::NAMESPACE, 2).unwrap();
    assert_eq!(u32::from_le_bytes(ns1[92..96].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(ns2[92..96].try_into().unwrap()), 3);
    assert_eq!(ns1[30] & 1, 1, "NMIC: shared");

    // The ANA log page: the groups with namespaces, optimized, with their NSIDs.
    let page = ana_log(&mut c1, 4096, 0, false).unwrap();
    assert_eq!(parse_ana(&page), (0, vec![(1, 0, 1, vec![1]), (3, 0, 1, vec![2])]));
    // Return Groups Only: the same descriptors without NSIDs.
    let rgo = ana_log(&mut c1, 4096, 0, true).unwrap();
    assert_eq!(parse_ana(&rgo), (0, vec![(1, 0, 1, vec![]), (3, 0, 1, vec![])]));
    // An offset reads the rest of the page: the second descriptor is at 16 + 32 + 4.
    let tail = ana_log(&mut c1, 36, 52, false).unwrap();
    assert_eq!(&tail[..], &page[52..88]);
    assert!(ana_log(&mut c1, 4, 4096 + 4, false).is_err(), "an offset past the page is an invalid field");

    // The host enables ANA change events on path 1 and waits for one.
    c1.set_features(0x0B, AEC_ANA | (1 << 8)).unwrap();
    let aer = c1.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    assert!(write(&mut q1, 1).is_success());

    set_state(&d, p1, "inaccessible", None);
    let ev = wait_completion(&mut c1.admin, aer);
    assert!(ev.cqe.status().is_success());
    assert_eq!(ev.cqe.dw0, AEN_ANA);
    // I/O through path 1 gets "asymmetric access inaccessible" (path-related, retryable), on
    // every namespace; path 2 is untouched.
    assert_eq!(write(&mut q1, 1), INACCESSIBLE);
    assert_eq!(read(&mut q1, 2), INACCESSIBLE);
    assert!(write(&mut q2, 1).is_success());
    assert!(read(&mut q2, 2).is_success());
    let (count, groups) = parse_ana(&ana_log(&mut c1, 4096, 0, false).unwrap());
    assert_eq!(count, 1, "one change");
    assert_eq!(groups, vec![(1, 1, 3, vec![1]), (3, 1, 3, vec![2])]);
    assert_eq!(states(&mut c2), vec![(1, 1), (3, 1)], "path 2 still optimized");
    // Admin commands still work on the inaccessible path.
    c1.keep_alive().unwrap();

    // One group back: non-optimized carries I/O again; the other group stays refused.
    let aer = c1.admin.submit(Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, 0, 0), Payload::None).unwrap();
    set_state(&d, p1, "non_optimized", Some(1));
    assert_eq!(wait_completion(&mut c1.admin, aer).cqe.dw0, AEN_ANA);
    assert!(write(&mut q1, 1).is_success());
    assert_eq!(read(&mut q1, 2), INACCESSIBLE);
    let (count, groups) = parse_ana(&ana_log(&mut c1, 4096, 0, false).unwrap());
    assert_eq!(count, 2);
    assert_eq!(groups, vec![(1, 2, 2, vec![1]), (3, 1, 3, vec![2])]);
    // The same state again changes nothing (no count, no event).
    set_state(&d, p1, "non_optimized", Some(1));
    assert_eq!(parse_ana(&ana_log(&mut c1, 4096, 0, false).unwrap()).0, 2);

    // get_listeners: SPDK's ana_states, every group 1..=max_namespaces.
    assert_eq!(listener_states(&d, p1), vec![(1, "non_optimized".into()), (2, "inaccessible".into()), (3, "inaccessible".into()), (4, "inaccessible".into())]);
    assert!(listener_states(&d, p2).iter().all(|(_, s)| s == "optimized"));
    let subs = d.rpc("nvmf_get_subsystems", json!({"nqn": NQN}));
    assert_eq!(subs[0]["ana_reporting"], true);
    assert_eq!(subs[0]["namespaces"][1]["anagrpid"], 3);
    let m = d.metrics_text();
    let row = format!("tidemark_nvmf_listener_ana_state{{nqn=\"{NQN}\",traddr=\"127.0.0.1\",trsvcid=\"{p1}\",ana_group=\"3\"}} 3");
    assert!(m.contains(&row), "metric row {row} in\n{m}");

    // Bad input: clear errors, nothing changed.
    let bad = |p: Value| d.try_rpc("nvmf_subsystem_listener_set_ana_state", p).unwrap_err();
    let e = bad(json!({"nqn": "nqn.2016-06.io.tidemark:none", "listen_address": laddr(p1), "ana_state": "optimized"}));
    assert_eq!(e.code, -32602);
    let e = bad(json!({"nqn": NQN, "listen_address": laddr(free_port()), "ana_state": "optimized"}));
    assert!(e.message.contains("does not listen"), "{e:?}");
    let e = bad(json!({"nqn": NQN, "listen_address": laddr(p1), "ana_state": "sleepy"}));
    assert!(e.message.contains("ana_state"), "{e:?}");
    for g in [0, 5] {
        let e = bad(json!({"nqn": NQN, "listen_address": laddr(p1), "ana_state": "optimized", "anagrpid": g}));
        assert!(e.message.contains("anagrpid"), "{e:?}");
    }
    d.rpc("nvmf_create_subsystem", json!({"nqn": "nqn.2016-06.io.tidemark:plain", "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": "nqn.2016-06.io.tidemark:plain", "listen_address": laddr(p2)}));
    let e = bad(json!({"nqn": "nqn.2016-06.io.tidemark:plain", "listen_address": laddr(p2), "ana_state": "inaccessible"}));
    assert!(e.message.contains("ana_reporting"), "{e:?}");
    let plain = d.rpc("nvmf_subsystem_get_listeners", json!({"nqn": "nqn.2016-06.io.tidemark:plain"}));
    assert_eq!(plain[0]["ana_state"], "optimized", "without ANA reporting: one state, as before");
    let e = d.try_rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m1", "nsid": 3, "anagrpid": 9}})).unwrap_err();
    assert!(e.message.contains("anagrpid"), "{e:?}");
    assert_eq!(listener_states(&d, p1)[0].1, "non_optimized", "nothing changed");
    assert!(write(&mut q1, 1).is_success());

    // Removing listener 1 disconnects the hosts that came through it; path 2 goes on.
    d.rpc("nvmf_subsystem_remove_listener", json!({"nqn": NQN, "listen_address": laddr(p1)}));
    assert!(q1.wait_closed(Duration::from_secs(5)), "the I/O queue of a removed listener is disconnected");
    assert!(write(&mut q2, 1).is_success());
}

#[test]
fn ana_states_survive_save_config_and_restart() {
    let (mut d, p1, p2) = start();
    set_state(&d, p1, "inaccessible", Some(3));
    set_state(&d, p2, "non_optimized", None);
    let saved = d.dir.path().join("tidemark.toml");
    d.rpc("save_config", json!({"path": saved.display().to_string()}));
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("ana_reporting") && text.contains("nvmf_subsystem_listener_set_ana_state") && text.contains("anagrpid"), "{text}");
    d.terminate(Duration::from_secs(10));
    d.restart();
    d.rpc("framework_wait_init", json!(null));
    let s1 = listener_states(&d, p1);
    assert_eq!(s1[2], (3, "inaccessible".into()));
    assert!(s1.iter().filter(|(g, _)| *g != 3).all(|(_, s)| s == "optimized"), "{s1:?}");
    assert!(listener_states(&d, p2).iter().all(|(_, s)| s == "non_optimized"));
    let (mut c1, mut q1) = host(p1);
    assert_eq!(states(&mut c1), vec![(1, 1), (3, 3)]);
    assert!(write(&mut q1, 1).is_success());
    assert_eq!(read(&mut q1, 2), INACCESSIBLE);
}
