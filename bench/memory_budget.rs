//! memory_budget: the daemon's peak resident memory (VmHWM) under many NVMe/TCP connections
//! at full queue depth with large reads, against its configured buffer budget.
//!
//!     cargo build --release --bin tidemarkd --bin memory_budget   (from the repository root)
//!     target/release/memory_budget                 # 1,000 connections, QD 128, 128 KiB reads
//!
//! It starts `tidemarkd` (next to this binary, or `--tidemarkd PATH`) on one core with a 1 GiB
//! null bdev exported over NVMe/TCP (reads produce zeros: the daemon's memory is its buffers),
//! opens the connections (controllers of one admin and up to 124 I/O queues), then: submits a
//! full queue of reads on every I/O queue and reads nothing back for `--hold-secs` (the worst
//! case: every host asks for queue depth x transfer size and leaves it in the target), then
//! reads and resubmits for `--run-secs`. It prints the peak RSS, the budget and their ratio;
//! the hosts asked for far more than the budget at once.

use clap::Parser;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidemark::nvmf::initiator::{Completion, Controller, Payload, Qpair, QpairOptions};
use tidemark::nvmf::spec::io_opc;

#[derive(Parser)]
#[command(name = "memory_budget", about = "tidemarkd's peak RSS under many connections of large reads, against its buffer budget")]
struct Args {
    /// TCP connections in all (admin and I/O queues).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Queue depth of every I/O queue (at most the transport's 128).
    #[arg(short = 'q', long, default_value_t = 128)]
    queue_depth: u16,
    /// Bytes per read.
    #[arg(short = 'o', long, default_value_t = 131072)]
    io_size: usize,
    /// The daemon's buffer_budget_mb.
    #[arg(long, default_value_t = 256)]
    budget_mb: u64,
    /// The daemon's connection_buffer_mb.
    #[arg(long, default_value_t = 16)]
    connection_mb: u64,
    /// Seconds every queue stays full with nothing read back.
    #[arg(long, default_value_t = 3)]
    hold_secs: u64,
    /// Seconds of reading and resubmitting after that.
    #[arg(long, default_value_t = 10)]
    run_secs: u64,
    /// CPU of the daemon's reactor (the client runs on the others).
    #[arg(long, default_value_t = 0)]
    cpu: usize,
    #[arg(long)]
    tidemarkd: Option<PathBuf>,
}

const NQN: &str = "nqn.2016-06.io.tidemark:membench";
const IO_QUEUES_PER_CTRLR: usize = 124;

fn fail(msg: &str) -> ! {
    eprintln!("memory_budget: {msg}");
    std::process::exit(1)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or_else(|e| fail(&format!("no free port: {e}")))
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn metric(addr: &str, name: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return f64::NAN };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            let k = k.trim_end_matches("{}");
            (k == name || k == format!("{name}_total")).then(|| v.trim().parse::<f64>().ok()).flatten()
        })
        .unwrap_or(f64::NAN)
}

/// A private directory under the temp dir, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("tidemark-membench-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| fail(&format!("{}: {e}", p.display())));
        TempDir(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let a = Args::parse();
    if a.queue_depth < 2 || a.queue_depth > 128 || a.connections < 2 || a.io_size % 512 != 0 || a.io_size > 131072 {
        fail("need --connections >= 2, -q 2..=128, -o a multiple of 512 up to 131072");
    }
    let exe = a.tidemarkd.clone().unwrap_or_else(|| std::env::current_exe().map(|p| p.with_file_name("tidemarkd")).unwrap_or_else(|e| fail(&e.to_string())));
    let dir = TempDir::new();
    let (nport, mport) = (free_port(), free_port());
    let socket = dir.path().join("rpc.sock");
    let metrics = format!("127.0.0.1:{mport}");
    let cfg = format!(
        r#"[daemon]
data_dir = "{data}"
buffer_pool_mb = 32
buffer_budget_mb = {budget}
connection_buffer_mb = {conn}
[reactor]
cores = [{cpu}]
poll_mode = "adaptive"
[rpc]
socket = "{socket}"
[metrics]
listen = "{metrics}"
[[bdev]]
method = "bdev_null_create"
params = {{ name = "n0", num_blocks = 2097152, block_size = 512 }}
[[nvmf]]
method = "nvmf_create_transport"
params = {{ trtype = "TCP", max_io_qpairs_per_ctrlr = {qpairs} }}
[[nvmf]]
method = "nvmf_create_subsystem"
params = {{ nqn = "{NQN}", allow_any_host = true }}
[[nvmf]]
method = "nvmf_subsystem_add_ns"
params = {{ nqn = "{NQN}", namespace = {{ bdev_name = "n0", nsid = 1 }} }}
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = {{ nqn = "{NQN}", listen_address = {{ trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "{nport}" }} }}
"#,
        data = dir.path().join("data").display(),
        budget = a.budget_mb,
        conn = a.connection_mb,
        cpu = a.cpu,
        socket = socket.display(),
        qpairs = IO_QUEUES_PER_CTRLR,
    );
    let cfg_path = dir.path().join("tidemark.toml");
    std::fs::write(&cfg_path, cfg).unwrap_or_else(|e| fail(&e.to_string()));
    let log = std::fs::File::create(dir.path().join("tidemarkd.log")).unwrap_or_else(|e| fail(&e.to_string()));
    let child = Command::new(&exe)
        .arg("--config")
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", exe.display())));
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            fail("tidemarkd did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client keeps off the daemon's CPU.
    if let Some(ids) = core_affinity::get_core_ids() {
        if let Some(other) = ids.into_iter().find(|c| c.id != a.cpu) {
            core_affinity::set_for_current(other);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let rest_kb = status_kb(pid, "VmRSS:");

    let addr: SocketAddr = format!("127.0.0.1:{nport}").parse().unwrap_or_else(|_| fail("address"));
    let o = QpairOptions { queue_size: a.queue_depth, timeout: Duration::from_secs(30), ..QpairOptions::default() };
    let mut admins = Vec::new();
    let mut queues: Vec<Qpair> = Vec::new();
    let mut left = a.connections;
    let t0 = Instant::now();
    while left >= 2 {
        let n = (left - 1).min(IO_QUEUES_PER_CTRLR);
        let mut c = Controller::connect(addr, NQN, &o).unwrap_or_else(|e| fail(&format!("connect: {e}")));
        c.set_queue_count(n as u16).unwrap_or_else(|e| fail(&format!("queue count: {e}")));
        for qid in 1..=n as u16 {
            queues.push(c.connect_io(qid, a.queue_depth).unwrap_or_else(|e| fail(&format!("I/O queue {qid}: {e}"))));
        }
        admins.push(c);
        left -= n + 1;
    }
    let conns = admins.len() + queues.len();
    eprintln!("{conns} connections ({} controllers, {} I/O queues) in {:.1} s", admins.len(), queues.len(), t0.elapsed().as_secs_f64());
    // Open and idle: what the connections hold of their own, charged and resident.
    std::thread::sleep(Duration::from_secs(1));
    let idle_kb = status_kb(pid, "VmRSS:");
    let state_charged = metric(&metrics, "tidemark_buffer_budget_used_bytes");

    let nlb = (a.io_size / 512) as u32;
    let span = 2097152 / nlb as u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_lba = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % span) * nlb as u64
    };
    let depth = a.queue_depth as usize;
    for q in queues.iter_mut() {
        for _ in 0..depth {
            q.submit(Qpair::rw_sqe(io_opc::READ, 1, next_lba(), nlb), Payload::InDiscard(a.io_size)).unwrap_or_else(|e| fail(&format!("submit: {e}")));
        }
        while !q.flush().unwrap_or_else(|e| fail(&format!("send: {e}"))) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Every queue full, nothing read back.
    std::thread::sleep(Duration::from_secs(a.hold_secs));
    let held_kb = status_kb(pid, "VmRSS:");
    // Read and resubmit.
    let t1 = Instant::now();
    let (mut ops, mut errors) = (0u64, 0u64);
    let mut out: Vec<Completion> = Vec::new();
    while t1.elapsed() < Duration::from_secs(a.run_secs) {
        for q in queues.iter_mut() {
            out.clear();
            q.poll(&mut out).unwrap_or_else(|e| fail(&format!("queue failed: {e}")));
            for c in &out {
                ops += 1;
                if !c.cqe.status().is_success() {
                    errors += 1;
                }
                q.submit(Qpair::rw_sqe(io_opc::READ, 1, next_lba(), nlb), Payload::InDiscard(a.io_size)).unwrap_or_else(|e| fail(&format!("submit: {e}")));
            }
        }
    }
    let secs = t1.elapsed().as_secs_f64();
    let hwm_kb = status_kb(pid, "VmHWM:");
    let budget = metric(&metrics, "tidemark_buffer_budget_bytes");
    let peak = metric(&metrics, "tidemark_buffer_budget_peak_bytes");
    let refusals = metric(&metrics, "tidemark_buffer_budget_refusals");
    let mib = |kb: u64| kb as f64 / 1024.0;
    let demand = queues.len() as f64 * depth as f64 * a.io_size as f64 / (1u64 << 20) as f64;
    let budget_mib = budget / (1u64 << 20) as f64;
    println!("tidemarkd, 1 reactor core, {conns} NVMe/TCP connections ({} I/O queues at QD {depth}, {} KiB reads)", queues.len(), a.io_size / 1024);
    println!("asked for at once:        {demand:.0} MiB of read data");
    println!("buffer budget:            {budget_mib:.0} MiB (connection limit {} MiB)", a.connection_mb);
    println!("charged at most:          {:.1} MiB ({:.2} of the budget), {refusals:.0} charges refused", peak / (1u64 << 20) as f64, peak / budget);
    println!("RSS at rest:              {:.1} MiB", mib(rest_kb));
    println!(
        "connections open, idle:   RSS +{:.1} MiB ({:.0} KiB each); charged to the budget {:.1} MiB ({:.0} KiB each)",
        mib(idle_kb.saturating_sub(rest_kb)),
        idle_kb.saturating_sub(rest_kb) as f64 / conns as f64,
        state_charged / (1u64 << 20) as f64,
        state_charged / 1024.0 / conns as f64
    );
    println!("RSS with queues full:     {:.1} MiB", mib(held_kb));
    println!("peak RSS (VmHWM):         {:.1} MiB", mib(hwm_kb));
    println!("VmHWM / budget:           {:.2}", mib(hwm_kb) / budget_mib);
    println!("(VmHWM - rest) / budget:  {:.2}", (mib(hwm_kb) - mib(rest_kb)) / budget_mib);
    println!(
        "reads while running:      {:.0} IOPS, {:.0} MiB/s, {errors} errors",
        ops as f64 / secs,
        ops as f64 * a.io_size as f64 / secs / (1u64 << 20) as f64
    );
    drop(queues);
    drop(admins);
    drop(daemon);
    drop(dir);
}
