//! The NVMe/TCP and iSCSI data paths allocate nothing per I/O in steady state (issue #17 item 5).
//!
//! A target runs in this process (one reactor, a RAM namespace) and the in-tree host drives
//! it over loopback TCP from the test's thread. The library's allocator counts allocations on
//! the reactor thread only (`reactor::alloc`), so the host's own allocations are not counted.
//! After a warm-up (slots, buffer pool classes, vectors at their working capacity), 10,000
//! 4 KiB reads and writes are timed against the counter, twice: in-capsule writes without
//! digests, then R2T writes with header and data digests.
//!
//! The iSCSI data path is measured the same way (4 KiB READ(10)/WRITE(10), one at a time),
//! twice: writes with immediate data without digests, then writes whose data the target
//! solicits (R2T, Data-Out) with header and data digests.
//!
//! `ALLOC_TRACE=n` prints the backtraces of the first n allocations counted in the measured
//! window (to find what allocates).

#[path = "iscsi/client.rs"]
mod client;

use serde_json::json;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark::config::Config;
use tidemark::nvmf::initiator::{Completion, Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::io_opc;
use tidemark::reactor::{alloc, PollMode, ReactorOptions, Reactors};
use tidemark::target::Target;

const NQN: &str = "nqn.2016-06.io.tidemark:alloc";
const IQN: &str = "iqn.2016-06.io.tidemark:alloc";
const BS: usize = 512;
const BLOCKS: u64 = 65536; // 32 MiB
const IO: usize = 4096;
const MEASURED: usize = 10_000;
const WARM_UP: usize = 3_000;
const QD: usize = 16;

/// The counter is one for the process: the tests take turns.
static ONE: Mutex<()> = Mutex::new(());

/// Allocations per I/O the steady-state path may make: none. (Before the change: NVMe/TCP 1.10
/// in-capsule, 1.73 with R2T and digests: a task per command, a boxed R2T state, the writer's
/// iovec array per batch, the reactor's run queue growing by blocks. iSCSI 3.00, then 2.00: a
/// task per command, then an `Rc<Running>` per command, a boxed `WriteXfer` per write and an
/// `Rc<DataIn>` per read.)
const BOUND_PER_IO: f64 = 0.0;

/// Bytes charged to the buffer budget, all cores.
fn budget_used() -> u64 {
    tidemark::bdev::budget::budget_stats().0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Runs `n` 4 KiB I/Os at queue depth [`QD`], reads and writes alternating, over the first
/// half of the namespace in a fixed stride.
fn run(q: &mut Qpair, n: usize, seq: &mut u64) {
    let mut submitted = 0;
    let mut done = 0;
    let mut out: Vec<Completion> = Vec::with_capacity(QD * 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < n {
        while submitted < n && q.outstanding() < QD {
            *seq += 1;
            let slba = (*seq * 8 * 37) % (BLOCKS / 2);
            let nlb = (IO / BS) as u32;
            let r = if seq.is_multiple_of(2) {
                q.submit(Qpair::rw_sqe(io_opc::WRITE, 1, slba, nlb), Payload::OutScratch(IO))
            } else {
                q.submit(Qpair::rw_sqe(io_opc::READ, 1, slba, nlb), Payload::InDiscard(IO))
            };
            r.expect("submit");
            submitted += 1;
        }
        out.clear();
        q.poll(&mut out).expect("the queue pair answers");
        for c in &out {
            assert!(c.cqe.status().is_success(), "I/O failed: {}", c.cqe.status());
        }
        done += out.len();
        if out.is_empty() {
            let mut fds = libc::pollfd { fd: q.stream().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut fds, 1, 1) };
        }
        assert!(Instant::now() < deadline, "the I/O took over 60 s");
    }
}

/// Sends [`QD`] reads at once and waits for them: the target reads them in one go and runs
/// them all before any completes, so the connection makes all the workers it will ever need
/// (one per command running at once; a deeper burst later would make one more, twice an
/// allocation, once).
fn burst(q: &mut Qpair) {
    for i in 0..QD as u64 {
        q.submit(Qpair::rw_sqe(io_opc::READ, 1, i * 8, (IO / BS) as u32), Payload::InDiscard(IO)).expect("submit");
    }
    let mut done = 0;
    let mut out: Vec<Completion> = Vec::with_capacity(QD * 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while done < QD {
        out.clear();
        q.poll(&mut out).expect("the queue pair answers");
        assert!(out.iter().all(|c| c.cqe.status().is_success()), "a read failed");
        done += out.len();
        assert!(Instant::now() < deadline, "the burst took over 10 s");
    }
}

/// Warms up with [`WARM_UP`] I/Os of `io`, then returns the allocations per I/O of
/// [`MEASURED`] more.
fn measure(what: &str, mut io: impl FnMut(usize)) -> f64 {
    io(WARM_UP);
    if let Some(n) = std::env::var("ALLOC_TRACE").ok().and_then(|v| v.parse().ok()) {
        alloc::trace_next(n);
    }
    let before = alloc::counted();
    let t0 = Instant::now();
    io(MEASURED);
    let dt = t0.elapsed();
    let n = alloc::counted() - before;
    alloc::trace_next(0);
    let per_io = n as f64 / MEASURED as f64;
    println!("{what}: {n} allocations on the reactor across {MEASURED} 4 KiB I/Os (half reads, half writes) in {dt:?}: {per_io:.3} per I/O");
    per_io
}

/// A target in this process on one reactor, with RAM bdev `m0`, configured by `calls`.
fn start(calls: &[(&str, serde_json::Value)]) -> (tempfile::TempDir, Reactors, Arc<Target>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::parse(&format!("[daemon]\ndata_dir = {:?}\nbuffer_pool_mb = 64\n", dir.path().display().to_string())).expect("config");
    let reactors = Reactors::start(&ReactorOptions { cpus: vec![0], poll_mode: PollMode::Adaptive, idle_us: 200, pin: false }).expect("reactors");
    let target = Arc::new(Target::new(reactors.handle(), config));
    let m0 = ("bdev_malloc_create", json!({"name": "m0", "num_blocks": BLOCKS, "block_size": BS}));
    for (m, p) in std::iter::once(&m0).chain(calls) {
        if let Err(e) = target.call(m, Some(p.clone())) {
            panic!("{m}: {}", e.message);
        }
    }
    (dir, reactors, target)
}

#[test]
fn nvme_tcp_reads_and_writes_allocate_nothing_on_the_reactor_after_warm_up() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let calls = [
        ("nvmf_create_transport", json!({"trtype": "TCP"})),
        ("nvmf_create_subsystem", json!({"nqn": NQN, "allow_any_host": true})),
        ("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "m0", "nsid": 1}})),
        (
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
        ),
    ];
    let (_dir, reactors, target) = start(&calls);
    let h = reactors.handle();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    // Count on the reactor thread from now on; the host runs on this thread, uncounted.
    h.call(0, || alloc::count_this_thread(true)).expect("core 0 answers");

    // 1: in-capsule writes (4 KiB fits the default 8 KiB in-capsule size), reads whose
    // C2HData carries the completion (SQ flow control off), no digests.
    let o = QpairOptions { kato_ms: 0, ..QpairOptions::default() };
    let before_connect = budget_used();
    let mut c = Controller::connect(addr, NQN, &o).expect("connect");
    let mut q = c.connect_io(1, 32).expect("I/O queue");
    assert!(q.max_inline >= IO, "4 KiB writes go in the capsule");
    let mut seq = 0;
    let idle = budget_used();
    (0..3).for_each(|_| burst(&mut q));
    // The workers the bursts made are kept, and what they hold is charged to the buffer
    // budget (no command runs now: nothing else is charged once the reads' buffers are back).
    // A read's buffer goes back when the send that carried it returns, which can be after the
    // host has read the data: wait for that, a moment at most.
    let settle = Instant::now() + Duration::from_secs(10);
    while budget_used().saturating_sub(idle) > QD as u64 * 4096 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let workers = budget_used() - idle;
    assert!((QD as u64 * 1024..=QD as u64 * 4096).contains(&workers), "{QD} kept workers charge {workers} bytes");
    let plain = measure("NVMe/TCP, in-capsule writes, no digests", |n| run(&mut q, n, &mut seq));
    drop(q);
    drop(c);
    // Closed: the workers ended and gave their charge back with the connections' own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget_used() != before_connect {
        assert!(Instant::now() < deadline, "the budget is not back to {before_connect} after the close: {}", budget_used());
        std::thread::sleep(Duration::from_millis(10));
    }

    // 2: writes through R2T and H2CData, header and data digests, SQ flow control on (every
    // read gets a CapsuleResp after its data).
    let o = QpairOptions { kato_ms: 0, hdgst: true, ddgst: true, disable_sqflow: false, ..QpairOptions::default() };
    let mut c = Controller::connect(addr, NQN, &o).expect("connect");
    let mut q = c.connect_io(1, 32).expect("I/O queue");
    q.max_inline = 0;
    (0..3).for_each(|_| burst(&mut q));
    let r2t = measure("NVMe/TCP, R2T writes, digests", |n| run(&mut q, n, &mut seq));
    drop(q);
    drop(c);

    h.call(0, || alloc::count_this_thread(false)).expect("core 0 answers");
    drop(target);
    reactors.stop();
    assert!(plain <= BOUND_PER_IO, "{plain} allocations per I/O (in-capsule writes) on the reactor; at most {BOUND_PER_IO} allowed");
    assert!(r2t <= BOUND_PER_IO, "{r2t} allocations per I/O (R2T writes, digests) on the reactor; at most {BOUND_PER_IO} allowed");
}

#[test]
fn iscsi_reads_and_writes_allocate_nothing_on_the_reactor_after_warm_up() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let calls = [
        ("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]})),
        ("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]})),
        (
            "iscsi_create_target_node",
            json!({"name": IQN, "luns": [{"bdev_name": "m0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
        ),
    ];
    let (_dir, reactors, target) = start(&calls);
    let h = reactors.handle();
    h.call(0, || alloc::count_this_thread(true)).expect("core 0 answers");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let before_login = budget_used();
    let logged_out = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while budget_used() != before_login {
            assert!(Instant::now() < deadline, "the budget is not back to {before_login} after the logout: {}", budget_used());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let data = vec![0x5au8; IO];
    let nb = (IO / BS) as u16;
    let mut seq = 0u64;

    // 1: one command at a time (the raw client waits for each): 4 KiB writes as immediate
    // data, 4 KiB reads whose last Data-In carries the status, no digests.
    let mut s = client::Session::login(addr, &client::LoginOptions::normal("iqn.2016-06.io.tidemark:host", IQN)).expect("login");
    let logged_in = budget_used();
    let immediate = measure("iSCSI, immediate-data writes, no digests", |n| {
        for _ in 0..n {
            seq += 1;
            let lba = ((seq * 8 * 37) % (BLOCKS / 2)) as u32;
            let r = if seq.is_multiple_of(2) {
                s.scsi(0, &client::write10(lba, nb), IO as u32, Some(&data))
            } else {
                s.scsi(0, &client::read10(lba, nb), IO as u32, None)
            };
            let r = r.expect("the command completes");
            assert_eq!(r.status, 0, "SCSI status {:#x}, sense {:?}", r.status, r.sense);
        }
    });
    // Idle, one command at a time: the connection keeps a worker or two, a write transfer and
    // a Data-In or two, charged.
    let kept = budget_used() - logged_in;
    drop(s);
    logged_out();

    // 2: writes through R2T and Data-Out, header and data digests.
    let digests = client::LoginOptions { digests: true, ..client::LoginOptions::normal("iqn.2016-06.io.tidemark:host", IQN) };
    let mut s = client::Session::login(addr, &digests).expect("login");
    assert!(s.header_digest && s.data_digest, "digests negotiated");
    let solicited = measure("iSCSI, R2T writes, digests", |n| {
        for _ in 0..n {
            seq += 1;
            let lba = ((seq * 8 * 37) % (BLOCKS / 2)) as u32;
            if seq.is_multiple_of(2) {
                assert_eq!(s.write_solicited(0, &client::write10(lba, nb), &data).expect("the write completes"), 0, "a solicited write failed");
            } else {
                let r = s.scsi(0, &client::read10(lba, nb), IO as u32, None).expect("the read completes");
                assert_eq!(r.status, 0, "SCSI status {:#x}, sense {:?}", r.status, r.sense);
            }
        }
    });
    drop(s);
    logged_out();

    h.call(0, || alloc::count_this_thread(false)).expect("core 0 answers");
    drop(target);
    reactors.stop();
    assert!((1024..=4 * 4096).contains(&kept), "the kept workers and transfers charge {kept} bytes");
    assert!(immediate <= BOUND_PER_IO, "{immediate} allocations per iSCSI I/O (immediate data) on the reactor; at most {BOUND_PER_IO} allowed");
    assert!(solicited <= BOUND_PER_IO, "{solicited} allocations per iSCSI I/O (R2T writes, digests) on the reactor; at most {BOUND_PER_IO} allowed");
}
