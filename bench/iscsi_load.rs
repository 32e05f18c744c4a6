//! iscsi-load: a small iSCSI load generator for `bench/iscsi_bench.sh`.
//!
//! libiscsi's `iscsi-perf` only reads, so writes (and, for a cross-check, reads) are measured
//! with this client: one connection, one thread, `--qd` commands kept in flight with 4 KiB
//! (or `--bs`) random reads or writes, write data sent as immediate data (or on R2T), replies
//! read through a large buffer and new commands sent in one write per batch. It prints one line:
//!
//!     rw=randread qd=32 bs=4096 iops=... mbps=... lat_avg_us=... lat_p50_us=... lat_p99_us=...

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Args {
    portal: String,
    target: String,
    lun: u8,
    write: bool,
    bs: u32,
    qd: u32,
    seconds: u64,
}

fn usage() -> ! {
    eprintln!("usage: iscsi-load --portal HOST:PORT --target IQN [--lun N] [--rw randread|randwrite] [--bs BYTES] [--qd N] [--time SECONDS]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args { portal: String::new(), target: String::new(), lun: 0, write: false, bs: 4096, qd: 32, seconds: 10 };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_else(|| usage());
        match v[i].as_str() {
            "--portal" => a.portal = val,
            "--target" => a.target = val,
            "--lun" => a.lun = val.parse().unwrap_or_else(|_| usage()),
            "--rw" => {
                a.write = match val.as_str() {
                    "randread" => false,
                    "randwrite" => true,
                    _ => usage(),
                }
            }
            "--bs" => a.bs = val.parse().unwrap_or_else(|_| usage()),
            "--qd" => a.qd = val.parse().unwrap_or_else(|_| usage()),
            "--time" => a.seconds = val.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
        i += 2;
    }
    if a.portal.is_empty() || a.target.is_empty() || a.qd == 0 || a.bs == 0 || a.bs % 512 != 0 {
        usage();
    }
    a
}

fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    max_send: usize,
}

impl Conn {
    fn read_pdu(&mut self) -> std::io::Result<([u8; 48], Vec<u8>)> {
        let mut h = [0u8; 48];
        self.r.read_exact(&mut h)?;
        let ahs = h[4] as usize * 4;
        let dsl = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut d = vec![0u8; ahs + dsl + pad(dsl)];
        self.r.read_exact(&mut d)?;
        d.drain(..ahs);
        d.truncate(dsl);
        let op = h[0] & 0x3F;
        if matches!(op, 0x21 | 0x25 | 0x31 | 0x20 | 0x22 | 0x24 | 0x26 | 0x3F) {
            let max = be32(&h, 32);
            if max.wrapping_sub(self.max_cmd_sn) < 0x8000_0000 {
                self.max_cmd_sn = max;
            }
        }
        if op == 0x21 || (op == 0x25 && h[1] & 1 != 0) {
            self.exp_stat_sn = be32(&h, 24).wrapping_add(1);
        }
        Ok((h, d))
    }
}

fn login(a: &Args) -> Conn {
    let s = TcpStream::connect(&a.portal).unwrap_or_else(|e| panic!("connect {}: {e}", a.portal));
    s.set_nodelay(true).unwrap();
    let keys: Vec<(&str, &str)> = vec![
        ("InitiatorName", "iqn.2024-01.io.tidemark:iscsi-load"),
        ("SessionType", "Normal"),
        ("TargetName", &a.target),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("ImmediateData", "Yes"),
        ("InitialR2T", "No"),
        ("FirstBurstLength", "65536"),
        ("MaxBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("ErrorRecoveryLevel", "0"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
    ];
    let mut data = Vec::new();
    for (k, v) in &keys {
        data.extend_from_slice(format!("{k}={v}").as_bytes());
        data.push(0);
    }
    let mut h = [0u8; 48];
    h[0] = 0x43;
    h[1] = 0x80 | (1 << 2) | 3;
    h[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    // A distinct ISID per process: two clients with one ISID would reinstate each other.
    let pid = std::process::id().to_be_bytes();
    h[8..14].copy_from_slice(&[0x80, 0x01, pid[0], pid[1], pid[2], pid[3]]);
    h[16..20].copy_from_slice(&1u32.to_be_bytes());
    h[24..28].copy_from_slice(&1u32.to_be_bytes());
    let mut w = s.try_clone().unwrap();
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    out.resize(out.len() + pad(data.len()), 0);
    w.write_all(&out).unwrap();
    let mut c = Conn { r: BufReader::with_capacity(1 << 20, s), w, cmd_sn: 1, max_cmd_sn: 1, exp_stat_sn: 0, max_send: 8192 };
    let (rh, rd) = c.read_pdu().expect("login response");
    assert_eq!((rh[36], rh[37]), (0, 0), "login refused");
    if rh[1] & 0x80 == 0 {
        panic!("the target wants more login steps than this tool does");
    }
    c.exp_stat_sn = be32(&rh, 24).wrapping_add(1);
    c.max_cmd_sn = be32(&rh, 32);
    for kv in rd.split(|&b| b == 0).filter(|x| !x.is_empty()) {
        let s = String::from_utf8_lossy(kv);
        if let Some(v) = s.strip_prefix("MaxRecvDataSegmentLength=") {
            c.max_send = v.parse().unwrap_or(8192);
        }
    }
    c
}

/// One command at a time (setup only): returns the status and the Data-In.
fn simple_command(c: &mut Conn, lun: u8, cdb: &[u8; 16], edtl: u32) -> (u8, Vec<u8>) {
    let mut h = [0u8; 48];
    h[0] = 0x01;
    h[1] = 0x80 | if edtl > 0 { 0x40 } else { 0 } | 0x01;
    h[9] = lun;
    h[16..20].copy_from_slice(&0xFFFF_FF00u32.to_be_bytes());
    h[20..24].copy_from_slice(&edtl.to_be_bytes());
    h[24..28].copy_from_slice(&c.cmd_sn.to_be_bytes());
    h[28..32].copy_from_slice(&c.exp_stat_sn.to_be_bytes());
    h[32..48].copy_from_slice(cdb);
    c.cmd_sn = c.cmd_sn.wrapping_add(1);
    c.w.write_all(&h).expect("send a setup command");
    let mut data = Vec::new();
    loop {
        let (rh, rd) = c.read_pdu().expect("setup command reply");
        match rh[0] & 0x3F {
            0x25 => {
                data.extend_from_slice(&rd);
                if rh[1] & 1 != 0 {
                    return (rh[3], data);
                }
            }
            0x21 => return (rh[3], data),
            _ => {}
        }
    }
}

fn cdb16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn main() {
    let a = parse_args();
    let mut c = login(&a);
    // Clear unit attentions (some targets report one to every new nexus), then read the
    // LUN's size with READ CAPACITY(16).
    let mut status = 2;
    for _ in 0..5 {
        status = simple_command(&mut c, a.lun, &[0u8; 16], 0).0;
        if status == 0 {
            break;
        }
    }
    assert_eq!(status, 0, "TEST UNIT READY keeps failing");
    let mut cap = [0u8; 16];
    cap[0] = 0x9E;
    cap[1] = 0x10;
    cap[13] = 32;
    let (status, rd) = simple_command(&mut c, a.lun, &cap, 32);
    assert!(status == 0 && rd.len() >= 12, "READ CAPACITY(16) failed with status {status}");
    let blocks = u64::from_be_bytes(rd[..8].try_into().unwrap()) + 1;
    let block_size = be32(&rd, 8);
    let io_blocks = a.bs / block_size;
    let slots = blocks / io_blocks as u64;
    assert!(io_blocks > 0 && slots > 0, "I/O size and LUN size do not fit");
    let payload = vec![0x5Au8; a.bs as usize];
    let immediate = (a.bs as usize) <= c.max_send.min(65536);

    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_lba = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % slots) * io_blocks as u64
    };
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut inflight: HashMap<u32, Instant> = HashMap::with_capacity(a.qd as usize * 2);
    let mut itt = 0u32;
    let mut done = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let mut out = Vec::with_capacity(a.qd as usize * (48 + a.bs as usize));
    let mut stopping = false;
    loop {
        // Fill every free slot the CmdSN window allows, in one write.
        out.clear();
        while !stopping && inflight.len() < a.qd as usize && c.cmd_sn.wrapping_sub(c.max_cmd_sn.wrapping_add(1)) >= 0x8000_0000 {
            itt = itt.wrapping_add(1) & 0x7FFF_FFFF;
            let mut h = [0u8; 48];
            h[0] = 0x01;
            h[1] = 0x80 | 0x01 | if a.write { 0x20 } else { 0x40 };
            h[9] = a.lun;
            h[16..20].copy_from_slice(&itt.to_be_bytes());
            h[20..24].copy_from_slice(&a.bs.to_be_bytes());
            h[24..28].copy_from_slice(&c.cmd_sn.to_be_bytes());
            h[28..32].copy_from_slice(&c.exp_stat_sn.to_be_bytes());
            h[32..48].copy_from_slice(&cdb16(if a.write { 0x8A } else { 0x88 }, next_lba(), io_blocks));
            c.cmd_sn = c.cmd_sn.wrapping_add(1);
            if a.write && immediate {
                h[5..8].copy_from_slice(&a.bs.to_be_bytes()[1..]);
                out.extend_from_slice(&h);
                out.extend_from_slice(&payload);
            } else {
                out.extend_from_slice(&h);
            }
            inflight.insert(itt, Instant::now());
        }
        if !out.is_empty() {
            c.w.write_all(&out).expect("send commands");
        }
        if inflight.is_empty() {
            break;
        }
        // One reply, then whatever else is already buffered.
        loop {
            let (rh, _rd) = c.read_pdu().expect("read replies");
            match rh[0] & 0x3F {
                0x21 | 0x25 => {
                    let finished = rh[0] & 0x3F == 0x21 || rh[1] & 1 != 0;
                    if finished {
                        let t = be32(&rh, 16);
                        if rh[3] != 0 {
                            panic!("command failed with status {:#x}", rh[3]);
                        }
                        if let Some(t0) = inflight.remove(&t) {
                            let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
                            done += 1;
                        }
                    }
                }
                0x31 => {
                    // R2T: send the requested data.
                    let ttt = be32(&rh, 20);
                    let off = be32(&rh, 40) as usize;
                    let len = be32(&rh, 44) as usize;
                    let mut sent = 0;
                    let mut sn = 0u32;
                    while sent < len {
                        let n = (len - sent).min(c.max_send);
                        let mut d = [0u8; 48];
                        d[0] = 0x05;
                        d[1] = if sent + n == len { 0x80 } else { 0 };
                        d[5..8].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
                        d[9] = a.lun;
                        d[16..20].copy_from_slice(&rh[16..20]);
                        d[20..24].copy_from_slice(&ttt.to_be_bytes());
                        d[28..32].copy_from_slice(&c.exp_stat_sn.to_be_bytes());
                        d[36..40].copy_from_slice(&sn.to_be_bytes());
                        d[40..44].copy_from_slice(&((off + sent) as u32).to_be_bytes());
                        c.w.write_all(&d).unwrap();
                        c.w.write_all(&payload[off + sent..off + sent + n]).unwrap();
                        sent += n;
                        sn += 1;
                    }
                }
                0x20 => {
                    // A target ping: answer it.
                    if be32(&rh, 20) != u32::MAX {
                        let mut d = [0u8; 48];
                        d[0] = 0x40;
                        d[1] = 0x80;
                        d[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                        d[20..24].copy_from_slice(&rh[20..24]);
                        d[24..28].copy_from_slice(&c.cmd_sn.to_be_bytes());
                        c.w.write_all(&d).unwrap();
                    }
                }
                op => panic!("unexpected PDU {op:#x}"),
            }
            if c.r.buffer().len() < 48 {
                break;
            }
        }
        if !stopping && Instant::now() >= end {
            stopping = true;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let iops = done as f64 / secs;
    println!(
        "rw={} qd={} bs={} iops={:.0} mbps={:.1} lat_avg_us={:.1} lat_p50_us={:.1} lat_p99_us={:.1}",
        if a.write { "randwrite" } else { "randread" },
        a.qd,
        a.bs,
        iops,
        iops * a.bs as f64 / 1e6,
        hist.mean() / 1000.0,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
}
