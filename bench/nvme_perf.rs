//! nvme_perf: drives an NVMe/TCP namespace with our initiator, in the style of spdk_nvme_perf,
//! and prints IOPS, MiB/s and latency percentiles.
//!
//!     nvme_perf -r 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn...' \
//!               -q 32 -o 4096 -w randread -t 10 -c 0x2
//!
//! One thread per core of the mask, each pinned, each with its own I/O queue pair, busy
//! polling its socket (as SPDK's perf polls its sockets).

use clap::Parser;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use tidemark::nvmf::initiator::{Completion, Controller, Payload, Qpair, QpairOptions, TransportId};
use tidemark::nvmf::spec::io_opc;

#[path = "workload.rs"]
mod workload;

#[derive(Parser)]
#[command(name = "nvme_perf", about = "NVMe/TCP benchmark with tidemark's initiator")]
struct Args {
    /// Transport ID: 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:NQN'.
    #[arg(short = 'r', long = "transport-id")]
    trid: String,
    #[command(flatten)]
    w: workload::Workload,
    /// Core mask of the initiator threads (one queue pair each).
    #[arg(short = 'c', long, default_value = "0x1")]
    cpumask: String,
    /// Namespace to drive.
    #[arg(short = 'n', long, default_value_t = 1)]
    nsid: u32,
    /// Negotiate header digests.
    #[arg(long)]
    hdgst: bool,
    /// Negotiate data digests.
    #[arg(long)]
    ddgst: bool,
    /// Keep SQ flow control on (the controller then sends a CapsuleResp after every read).
    #[arg(long)]
    sq_flow_control: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Sequential workloads: bytes from one I/O's offset to the next (default: the I/O size).
    /// `-o 4096 --stride 1048576` writes the first 4 KiB of every MiB.
    #[arg(long)]
    stride: Option<usize>,
    /// Sequential workloads: one pass over the namespace, then stop (before `-t` if it is
    /// shorter); one core only.
    #[arg(long)]
    once: bool,
    /// Write every completion as "ns_since_start latency_ns" to this file, print "started" on
    /// stdout when the I/O begins and the start time (unix ns) in the JSON.
    #[arg(long)]
    lat_log: Option<std::path::PathBuf>,
}

struct ThreadResult {
    ops: u64,
    errors: u64,
    hist: Histogram<u64>,
    log: Vec<(u64, u64)>,
}

/// What a worker does besides the workload: the stride of sequential offsets, one pass, and
/// the completion log.
#[derive(Clone, Copy)]
struct Pass {
    stride_lbas: u64,
    once: bool,
    log: bool,
    start: Instant,
}

fn fail(msg: &str) -> ! {
    eprintln!("nvme_perf: {msg}");
    std::process::exit(1)
}

/// xorshift64*: cheap per-thread offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn main() {
    let a = Args::parse();
    let trid = TransportId::parse(&a.trid).unwrap_or_else(|e| fail(&format!("-r: {e}")));
    let addr = trid.socket_addr().unwrap_or_else(|e| fail(&e));
    let (random, read_pct) = a.w.mix().unwrap_or_else(|| fail(&format!("unknown workload {}", a.w.workload)));
    if a.w.queue_depth == 0 || a.w.queue_depth > 4095 {
        fail("-q must be between 1 and 4095");
    }
    let cpus = tidemark::reactor::parse_cpumask(&a.cpumask).unwrap_or_else(|e| fail(&e));
    let mut opts = QpairOptions { hdgst: a.hdgst, ddgst: a.ddgst, disable_sqflow: !a.sq_flow_control, ..QpairOptions::default() };
    if let Some(h) = &trid.hostnqn {
        opts.hostnqn = h.clone();
    }
    let mut ctrl = Controller::connect(addr, &trid.subnqn, &opts).unwrap_or_else(|e| fail(&format!("connect {addr} {}: {e}", trid.subnqn)));
    let ns = ctrl.identify_namespace(a.nsid).unwrap_or_else(|e| fail(&format!("identify namespace {}: {e}", a.nsid)));
    if ns.nsze == 0 || ns.block_size == 0 {
        fail(&format!("namespace {} is not active", a.nsid));
    }
    let bs = ns.block_size as usize;
    if a.w.io_size == 0 || a.w.io_size % bs != 0 {
        fail(&format!("-o must be a multiple of the block size {bs}"));
    }
    let max = (1usize << (12 + ctrl.id.mdts as u32)).min(1 << 20);
    if ctrl.id.mdts != 0 && a.w.io_size > max {
        fail(&format!("-o is above the controller's transfer limit of {max} bytes"));
    }
    let granted = ctrl.set_queue_count(cpus.len() as u16).unwrap_or_else(|e| fail(&format!("set number of queues: {e}")));
    if (granted as usize) < cpus.len() {
        fail(&format!("the controller granted {granted} I/O queues for {} cores", cpus.len()));
    }
    // A queue of N entries holds at most N - 1 commands, and the controller allows at most
    // MQES + 1 entries (CAP.MQES is 0's based). Asking for more fails the Connect, so a queue
    // depth above the controller's limit is capped, said on stderr and in the JSON, as SPDK's
    // perf does (there the excess waits in the driver; here it is not issued).
    let cap = ctrl.property_get(tidemark::nvmf::spec::prop::CAP).unwrap_or_else(|e| fail(&format!("read CAP: {e}")));
    let max_entries = (cap & 0xFFFF) as usize + 1;
    let queue_depth = a.w.queue_depth.min(max_entries - 1).max(1);
    if queue_depth < a.w.queue_depth {
        eprintln!("nvme_perf: queue depth {} capped at {queue_depth}: the controller allows {max_entries} entries per queue (CAP.MQES)", a.w.queue_depth);
    }
    let qsize = (queue_depth + 1).max(2) as u16;
    let nlb = (a.w.io_size / bs) as u32;
    let stride = a.stride.unwrap_or(a.w.io_size);
    if stride < a.w.io_size || stride % bs != 0 {
        fail(&format!("--stride must be a multiple of the block size {bs} and at least -o"));
    }
    if a.once && (random || cpus.len() > 1) {
        fail("--once needs a sequential workload (read, write) on one core");
    }
    let stride_lbas = (stride / bs) as u64;
    let slots = (ns.nsze - nlb as u64) / stride_lbas + 1;
    let mut queues = Vec::new();
    for i in 0..cpus.len() {
        queues.push(ctrl.connect_io(i as u16 + 1, qsize).unwrap_or_else(|e| fail(&format!("connect I/O queue {}: {e}", i + 1))));
    }
    let dur = Duration::from_secs(a.w.time);
    let start_unix_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let start = Instant::now();
    let pass = Pass { stride_lbas, once: a.once, log: a.lat_log.is_some(), start };
    if pass.log {
        println!("started");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let handles: Vec<_> = queues
        .into_iter()
        .zip(cpus.iter().copied())
        .enumerate()
        .map(|(i, (q, cpu))| {
            let (qd, io_size, nsid) = (queue_depth, a.w.io_size, a.nsid);
            std::thread::spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    eprintln!("nvme_perf: could not pin to CPU {cpu}");
                }
                run(q, qd, io_size, nlb, nsid, slots, random, read_pct, dur, 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1) * 0x1000_0001, pass)
            })
        })
        .collect();
    let results: Vec<ThreadResult> = handles.into_iter().map(|h| h.join().unwrap_or_else(|_| fail("a worker thread panicked"))).collect();
    let secs = start.elapsed().as_secs_f64().min(a.w.time as f64).max(1e-9);
    let _ = ctrl.shutdown();
    if let Some(path) = &a.lat_log {
        use std::io::Write;
        let f = std::fs::File::create(path).unwrap_or_else(|e| fail(&format!("--lat-log {}: {e}", path.display())));
        let mut w = std::io::BufWriter::new(f);
        for r in &results {
            for (t, l) in &r.log {
                let _ = writeln!(w, "{t} {l}");
            }
        }
        w.flush().unwrap_or_else(|e| fail(&format!("--lat-log {}: {e}", path.display())));
    }

    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let (mut ops, mut errors) = (0u64, 0u64);
    for r in &results {
        ops += r.ops;
        errors += r.errors;
        hist.add(&r.hist).expect("same histogram bounds");
    }
    let iops = ops as f64 / secs;
    let mibs = iops * a.w.io_size as f64 / (1 << 20) as f64;
    let us = |v: u64| v as f64 / 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": a.w.workload, "queue_depth": queue_depth, "queue_depth_asked": a.w.queue_depth, "io_size": a.w.io_size, "cores": cpus.len(),
                "iops": iops, "mib_s": mibs, "errors": errors,
                "avg_us": hist.mean() / 1000.0, "min_us": us(hist.min()), "max_us": us(hist.max()),
                "p50_us": us(hist.value_at_quantile(0.5)), "p99_us": us(hist.value_at_quantile(0.99)), "p999_us": us(hist.value_at_quantile(0.999)),
                "ops": ops, "secs": secs, "start_unix_ns": start_unix_ns,
            })
        );
    } else {
        println!("{} qd {} io {} on {} core(s), {:.1}s, {}", a.w.workload, queue_depth, a.w.io_size, cpus.len(), secs, trid.subnqn);
        println!("{:<12} {:>12} {:>10} {:>10} {:>10} {:>10}", "", "IOPS", "MiB/s", "avg us", "min us", "max us");
        for (i, r) in results.iter().enumerate() {
            let ri = r.ops as f64 / secs;
            println!(
                "{:<12} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                format!("core {}", cpus[i]),
                ri,
                ri * a.w.io_size as f64 / (1 << 20) as f64,
                r.hist.mean() / 1000.0,
                us(r.hist.min()),
                us(r.hist.max())
            );
        }
        println!("{:<12} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>10.2}", "Total", iops, mibs, hist.mean() / 1000.0, us(hist.min()), us(hist.max()));
        println!(
            "latency: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us; errors {errors}",
            us(hist.value_at_quantile(0.5)),
            us(hist.value_at_quantile(0.99)),
            us(hist.value_at_quantile(0.999))
        );
    }
    if errors > 0 {
        std::process::exit(2);
    }
}

#[allow(clippy::too_many_arguments)]
fn run(mut q: Qpair, qd: usize, io_size: usize, nlb: u32, nsid: u32, slots: u64, random: bool, read_pct: u32, dur: Duration, seed: u64, pass: Pass) -> ThreadResult {
    let mut log = Vec::new();
    let submitted = std::cell::Cell::new(0u64);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let mut rng = Rng(seed | 1);
    let mut seq = 0u64;
    let (mut ops, mut errors) = (0u64, 0u64);
    let mut done: Vec<Completion> = Vec::with_capacity(qd);
    let mut submit = |q: &mut Qpair, rng: &mut Rng| {
        if pass.once && submitted.get() >= slots {
            return;
        }
        submitted.set(submitted.get() + 1);
        let slot = if random {
            rng.next() % slots
        } else if pass.once {
            submitted.get() - 1
        } else {
            seq = (seq + 1) % slots;
            seq
        };
        let read = read_pct == 100 || (read_pct > 0 && (rng.next() % 100) < read_pct as u64);
        let lba = slot * pass.stride_lbas;
        let r = if read {
            q.submit(Qpair::rw_sqe(io_opc::READ, nsid, lba, nlb), Payload::In(io_size))
        } else {
            q.submit(Qpair::rw_sqe(io_opc::WRITE, nsid, lba, nlb), Payload::OutScratch(io_size))
        };
        if let Err(e) = r {
            fail(&format!("submit: {e}"));
        }
    };
    for _ in 0..qd {
        submit(&mut q, &mut rng);
    }
    let end = Instant::now() + dur;
    loop {
        done.clear();
        if let Err(e) = q.poll(&mut done) {
            fail(&format!("poll: {e}"));
        }
        if done.is_empty() {
            if Instant::now() >= end {
                break;
            }
            continue;
        }
        let now = Instant::now();
        let running = now < end;
        for c in &done {
            if c.cqe.status().is_success() {
                ops += 1;
            } else {
                errors += 1;
            }
            let lat = now.duration_since(c.submitted).as_nanos().max(1) as u64;
            let _ = hist.record(lat);
            if pass.log {
                log.push((now.duration_since(pass.start).as_nanos() as u64, lat));
            }
            if running {
                submit(&mut q, &mut rng);
            }
        }
        if (!running || (pass.once && submitted.get() >= slots)) && q.outstanding() == 0 {
            break;
        }
    }
    // Let what is in flight finish so the controller shuts down cleanly.
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.outstanding() > 0 && Instant::now() < deadline {
        done.clear();
        if q.poll(&mut done).is_err() {
            break;
        }
    }
    ThreadResult { ops, errors, hist, log }
}
