//! Durability of what the daemon acknowledged, against the real daemon on uring files:
//! `kill -9` right after an acknowledged `bdev_snapshot_create` / `bdev_snapshot_delete`, a
//! file system that fills under the CoW store (root only: it mounts a small tmpfs), and a
//! bounded chaos test (qemu-io writing over iSCSI, snapshots created and deleted, `kill -9` at
//! a seeded random moment, restart, every acknowledged write and snapshot checked).
//!
//! The chaos test prints its seed; `TIDEMARK_CHAOS_SEED=n` replays it: the seed fixes the
//! writes, the delays and where each kill lands (after the k-th acknowledged write, or right
//! after the reply to a create or a delete); the daemon's own timing still varies. qemu-io comes from
//! `tests/iscsi/deps.sh`; without it the chaos test fails, unless TIDEMARK_SKIP_PRESERVE=1.

#[path = "iscsi/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Largest data segment the test client sends or asks for in one command.
const CHUNK: usize = 64 * KIB;

/// A daemon configuration with CoW volume `vol` over uring files (`files` is prepended to the
/// file names: "" for the data directory) exported as LUN 0 of `iqn...:vol` on `port`.
fn config(port: u16, files: &str, vol_mb: u64, store_mb: u64) -> String {
    format!(
        r#"
[daemon]
data_dir = "{{data_dir}}"
buffer_pool_mb = 16
[reactor]
cores = [0]
poll_mode = "adaptive"
[rpc]
socket = "{{socket}}"
[metrics]
listen = "{{metrics}}"

[[bdev]]
method = "bdev_uring_create"
params = {{ name = "base", filename = "{files}vol.img", size_mb = {vol_mb}, block_size = 512 }}
[[bdev]]
method = "bdev_uring_create"
params = {{ name = "store", filename = "{files}vol.store", size_mb = {store_mb}, block_size = 512 }}
[[bdev]]
method = "bdev_cow_create"
params = {{ name = "vol", base_bdev = "base", store_bdev = "store", grain_kb = 64 }}

[[iscsi]]
method = "iscsi_create_portal_group"
params = {{ tag = 1, portals = [{{ host = "127.0.0.1", port = "{port}" }}] }}
[[iscsi]]
method = "iscsi_create_initiator_group"
params = {{ tag = 1, initiators = ["ANY"], netmasks = ["127.0.0.1/32"] }}
[[iscsi]]
method = "iscsi_create_target_node"
params = {{ name = "iqn.2016-06.io.tidemark:vol", luns = [{{ bdev_name = "vol", lun_id = 0 }}], pg_ig_maps = [{{ pg_tag = 1, ig_tag = 1 }}], queue_depth = 32 }}
"#
    )
}

/// The RPC socket is bound before the configuration is applied: this returns once it is (the
/// server answers only then).
fn ready(d: &Daemon) {
    d.rpc("framework_wait_init", json!(null));
}

fn node(bdev: &str) -> String {
    format!("iqn.2016-06.io.tidemark:{bdev}")
}

fn login(addr: SocketAddr, bdev: &str) -> client::Session {
    client::Session::login(addr, &client::LoginOptions::normal("iqn.2024-01.test:durable", &node(bdev)))
        .unwrap_or_else(|e| panic!("login to {bdev} refused: {e:?}"))
}

/// Writes `data` at byte `off` (512-byte blocks) through the test client; the SCSI status of
/// each command (0: GOOD).
fn write_at(s: &mut client::Session, off: usize, data: &[u8]) -> Vec<u8> {
    data.chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            let lba = (off + i * CHUNK) / 512;
            s.scsi(0, &client::write10(lba as u32, (c.len() / 512) as u16), c.len() as u32, Some(c)).expect("write").status
        })
        .collect()
}

fn read_at(s: &mut client::Session, off: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = off;
    while pos < off + len {
        let n = CHUNK.min(off + len - pos);
        let r = s.scsi(0, &client::read10((pos / 512) as u32, (n / 512) as u16), n as u32, None).expect("read");
        assert_eq!(r.status, 0, "read at {pos} failed: {:?}", r.sense);
        assert_eq!(r.data.len(), n);
        out.extend_from_slice(&r.data);
        pos += n;
    }
    out
}

/// Exports `bdev` (a snapshot) and reads its whole image, then removes the export again.
fn read_image(d: &Daemon, addr: SocketAddr, bdev: &str, len: usize) -> Vec<u8> {
    d.rpc(
        "iscsi_create_target_node",
        json!({"name": node(bdev), "luns": [{"bdev_name": bdev, "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 8}),
    );
    let img = {
        let mut s = login(addr, bdev);
        read_at(&mut s, 0, len)
    };
    d.rpc("iscsi_delete_target_node", json!({"name": node(bdev)}));
    img
}

/// Where two images first differ, for messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}: {:#04x} instead of {:#04x}", a[i], b[i]),
        None if a.len() != b.len() => format!("lengths {} and {}", a.len(), b.len()),
        None => "identical".into(),
    }
}

/// The snapshots the daemon lists, by name, with their state.
fn listed(d: &Daemon) -> BTreeMap<String, String> {
    let all = d.rpc("bdev_snapshot_get", json!(null));
    all.as_array().expect("a list").iter().map(|s| (s["name"].as_str().unwrap_or("").to_string(), s["state"].as_str().unwrap_or("").to_string())).collect()
}

#[test]
fn an_acknowledged_snapshot_create_or_delete_survives_kill_9_right_after_the_reply() {
    const VOL: usize = 2 * MIB;
    let port = free_port();
    let mut d = Daemon::start(&config(port, "", 2, 4));
    ready(&d);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // What each round rewrites: a whole grain, one piece inside a grain, a range across two.
    let regions = [(0, 64 * KIB), (68 * KIB, 8 * KIB), (MIB - 32 * KIB, 96 * KIB)];
    let pattern = |round: usize, pos: usize| ((pos / 512) as u8).wrapping_mul(7) ^ (round as u8).wrapping_mul(31) ^ 0x5a;
    let mut live = vec![0u8; VOL];
    // Acknowledged snapshots and the image each must read; acknowledged deletions.
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut deleted: Vec<String> = Vec::new();
    let check = |d: &Daemon, snaps: &BTreeMap<String, Vec<u8>>, deleted: &[String], live: &[u8], what: &str| {
        let have = listed(d);
        for (name, want) in snaps {
            match have.get(name).map(String::as_str) {
                Some("sealed") => {}
                Some(st) => panic!("{what}: snapshot {name} came back {st}, not sealed"),
                None => panic!("{what}: snapshot {name} was acknowledged but is gone after kill -9 (snapshots: {have:?})\n{}", d.log_text()),
            }
            let img = read_image(d, addr, name, VOL);
            assert!(img == *want, "{what}: snapshot {name} does not read its point in time: {}", first_difference(&img, want));
        }
        for name in deleted {
            assert!(!have.contains_key(name), "{what}: snapshot {name} was deleted (acknowledged) but came back after kill -9");
            assert!(d.try_rpc("bdev_get_bdevs", json!({"name": name})).is_err(), "{what}: the bdev of deleted snapshot {name} came back");
        }
        let mut s = login(addr, "vol");
        let img = read_at(&mut s, 0, VOL);
        assert!(img == live, "{what}: the live volume lost acknowledged writes: {}", first_difference(&img, live));
    };
    for round in 0..10 {
        {
            let mut s = login(addr, "vol");
            for &(off, len) in &regions {
                let data: Vec<u8> = (off..off + len).map(|p| pattern(round, p)).collect();
                assert!(write_at(&mut s, off, &data).iter().all(|&st| st == 0), "round {round}: a write failed");
                live[off..off + len].copy_from_slice(&data);
            }
        }
        let name = format!("k{round}");
        let r = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": name}));
        d.kill9();
        assert!(r["state"] == "draining" || r["state"] == "sealed", "{r}");
        snaps.insert(name.clone(), live.clone());
        d.restart();
        ready(&d);
        check(&d, &snaps, &deleted, &live, &format!("round {round}, after creating {name}"));
        if round % 3 == 2 {
            let Some(old) = snaps.keys().next().cloned() else { continue };
            assert_eq!(d.rpc("bdev_snapshot_delete", json!({"name": old})), json!(true));
            d.kill9();
            snaps.remove(&old);
            deleted.push(old.clone());
            d.restart();
            ready(&d);
            check(&d, &snaps, &deleted, &live, &format!("round {round}, after deleting {old}"));
        }
    }
    // A volume made over RPC: its store is formatted for good when bdev_cow_create returns.
    let make = |d: &Daemon| {
        d.rpc("bdev_uring_create", json!({"name": "b2", "filename": "v2.img", "size_mb": 1, "block_size": 512}));
        d.rpc("bdev_uring_create", json!({"name": "s2", "filename": "v2.store", "size_mb": 2, "block_size": 512}));
        d.rpc("bdev_cow_create", json!({"name": "v2", "base_bdev": "b2", "store_bdev": "s2", "grain_kb": 64}));
        d.rpc("bdev_get_bdevs", json!({"name": "v2"}))[0]["uuid"].clone()
    };
    let uuid = make(&d);
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "v2", "snapshot_name": "v2s"}));
    d.kill9();
    d.restart();
    ready(&d);
    assert_eq!(make(&d), uuid, "the store of v2 was formatted again after kill -9: its format was not durable");
    assert_eq!(listed(&d).get("v2s").map(String::as_str), Some("sealed"), "snapshot v2s of the RPC-made volume is gone");
}

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tidemark-test"]).arg(at).output().expect("run mount");
        assert!(out.status.success(), "mount tmpfs on {}: {}", at.display(), String::from_utf8_lossy(&out.stderr));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // The kernel releases the files of a killed process's io_uring rings a moment after
        // it exits: retry a little, then detach the mount (it goes once the files close).
        for _ in 0..40 {
            if Command::new("umount").arg(&self.0).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_file_system_under_the_cow_store_fails_the_snapshot_and_never_a_host_write() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting the small file system this test fills needs root");
        return;
    }
    const VOL: usize = 16 * MIB;
    let mnt = tempfile::Builder::new().prefix("tidemark-fullfs").tempdir().expect("tempdir");
    let fs = Tmpfs::mount(mnt.path(), "64m");
    // The volume's file written whole before the daemon starts: its blocks are allocated, so
    // only copies into the (sparse) store need space. Then the file system is filled up to
    // 4 MiB: the store can take 64 grains of copies, not the 256 the overwrite needs.
    std::fs::write(fs.0.join("vol.img"), vec![0x11u8; VOL]).expect("write the volume file");
    let free = nix::sys::statvfs::statvfs(&fs.0).map(|s| s.blocks_available() * s.fragment_size()).expect("statvfs");
    let filler = std::fs::File::create(fs.0.join("filler")).expect("filler");
    let mut w = std::io::BufWriter::new(filler);
    let chunk = vec![0xEEu8; MIB];
    for _ in 0..(free as usize - 4 * MIB) / MIB {
        w.write_all(&chunk).expect("fill the file system");
    }
    w.flush().expect("flush the filler");
    drop(w);
    let port = free_port();
    let files = format!("{}/", fs.0.display());
    let d = Daemon::start(&config(port, &files, (VOL / MIB) as u64, 40));
    ready(&d);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let r = d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "s1", "wait_sealed": true}));
    assert_eq!(r["state"], "sealed", "{r}");
    // Overwrite every block: each first write of a grain needs a copy, and the file system
    // fills after about a quarter of them. Every host write must succeed.
    let mut s = login(addr, "vol");
    let statuses = write_at(&mut s, 0, &vec![0x22u8; VOL]);
    let failed = statuses.iter().filter(|&&st| st != 0).count();
    assert_eq!(failed, 0, "{failed} of {} host writes failed when the store's file system filled\n{}", statuses.len(), d.log_text());
    let img = read_at(&mut s, 0, VOL);
    assert!(img.iter().all(|&b| b == 0x22), "the live volume lost writes: {}", first_difference(&img, &vec![0x22u8; VOL]));
    drop(s);
    // At start, the daemon said: the store can grow by ~40 MiB on a file system with ~4 MiB free.
    let log = d.log_text();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("can grow by") && l.contains(&fs.0.display().to_string())), "no start-up warning:\n{log}");
    let m = d.metrics();
    let free_metric = format!("tidemark_filesystem_free_bytes{{path=\"{}\"}}", fs.0.display());
    assert!(m.contains(&free_metric), "{free_metric} missing:\n{m}");
    assert!(m.contains("tidemark_bdev_file_unallocated_bytes{bdev=\"store\"}"), "{m}");

    // The snapshot failed, at ERROR naming the volume, the snapshot and the reason.
    let st = d.rpc("bdev_snapshot_get", json!({"name": "s1"}));
    assert_eq!(st[0]["state"], "failed", "{st}");
    let log = d.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains("vol") && l.contains("snapshot s1 failed") && l.contains("file system is full")),
        "no ERROR line for the failed snapshot:\n{log}"
    );
    let m = d.metrics();
    for line in ["tidemark_preserve_snapshots{bdev=\"vol\",method=\"cow\",state=\"failed\"} 1", "tidemark_preserve_snapshot_failures_total{bdev=\"vol\"} 1"] {
        assert!(m.contains(line), "metrics lack {line}:\n{m}");
    }
    // A failed snapshot can be deleted, and the volume preserves again once there is room.
    assert_eq!(d.rpc("bdev_snapshot_delete", json!({"name": "s1"})), json!(true));
    std::fs::remove_file(fs.0.join("filler")).expect("remove the filler");
    d.rpc("bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": "s2", "wait_sealed": true}));
    let mut s = login(addr, "vol");
    assert_eq!(write_at(&mut s, 0, &vec![0x33u8; CHUNK]), [0]);
    drop(s);
    let img = read_image(&d, addr, "s2", CHUNK);
    assert!(img.iter().all(|&b| b == 0x22), "the new snapshot reads {}", first_difference(&img, &[0x22u8; CHUNK]));
    assert_eq!(d.rpc("bdev_snapshot_get", json!({"name": "s2"}))[0]["state"], "sealed");
    drop(d);
}

// ---- chaos ----

/// A JSON-RPC call on its own connection (from a thread other than the test's), Err when the
/// daemon answered with an error or went away before answering.
fn rpc_at(socket: &Path, method: &str, params: Value) -> Result<Value, String> {
    let s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    (&s).write_all(req.to_string().as_bytes()).map_err(|e| e.to_string())?;
    let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<Value>().next().ok_or("no answer")?.map_err(|e| e.to_string())?;
    match resp.get("error") {
        Some(e) => Err(e.to_string()),
        None => Ok(resp["result"].clone()),
    }
}

/// Bits of what the control thread got a reply to, in one cycle.
const REPLIED_CREATE: usize = 1;
const REPLIED_DELETE: usize = 2;

/// What the control thread of one cycle did.
#[derive(Debug, Default)]
struct Control {
    /// Snapshot created: name, writes acknowledged before the request was sent, and whether
    /// the reply came (acknowledged).
    created: Option<(String, usize, bool)>,
    /// Snapshots deleted: name, acknowledged.
    deleted: Vec<(String, bool)>,
}

/// The daemon's ERROR lines, for messages.
fn errors(d: &Daemon) -> String {
    d.log_text().lines().filter(|l| l.contains("ERROR")).collect::<Vec<_>>().join("\n")
}

/// The image after applying the first `k` writes of `plan` to `base`.
fn apply(base: &[u8], plan: &[(usize, usize, u8)], k: usize) -> Vec<u8> {
    let mut img = base.to_vec();
    for &(off, len, p) in &plan[..k] {
        img[off..off + len].fill(p);
    }
    img
}

/// The k in `lo..=hi` for which `img` is `base` after the first k writes, if any. Write
/// `torn` (the one in flight at the crash, not acknowledged) may also have reached the media
/// in part, block by block: then k is `torn`.
fn prefix_of(img: &[u8], base: &[u8], plan: &[(usize, usize, u8)], lo: usize, hi: usize, torn: usize) -> Option<usize> {
    let mut cur = apply(base, plan, lo);
    for k in lo..=hi.min(plan.len()) {
        if k > lo {
            let (off, len, p) = plan[k - 1];
            cur[off..off + len].fill(p);
        }
        if cur == img {
            return Some(k);
        }
    }
    if torn < lo || torn >= hi.min(plan.len()) {
        return None;
    }
    let before = apply(base, plan, torn);
    let (off, len, p) = plan[torn];
    let outside = img[..off] == before[..off] && img[off + len..] == before[off + len..];
    let inside = img[off..off + len].chunks(512).zip(before[off..off + len].chunks(512)).all(|(b, old)| b == old || b.iter().all(|&x| x == p));
    (outside && inside).then_some(torn)
}

#[test]
fn chaos_kill_9_at_random_moments_loses_no_acknowledged_write_or_snapshot() {
    if !require_tools(&["qemu-io", "stdbuf"], "TIDEMARK_SKIP_PRESERVE") {
        return;
    }
    const VOL: usize = 4 * MIB;
    const CYCLES: usize = 20;
    const WRITES: usize = 150;
    let seed: u64 = std::env::var("TIDEMARK_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("chaos seed {seed} (replay: TIDEMARK_CHAOS_SEED={seed} cargo test --test durable chaos -- --nocapture)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let port = free_port();
    // Room in the store for every grain of five snapshots: it never fills here.
    let mut d = Daemon::start(&config(port, "", (VOL / MIB) as u64, 24));
    ready(&d);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let url = format!("iscsi://{addr}/{}/0", node("vol"));
    let t0 = Instant::now();
    // The verified state: the live image and every snapshot's image.
    let mut live = vec![0u8; VOL];
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut gone: Vec<String> = Vec::new();
    let (mut kills_before_create_reply, mut kills_during_writes) = (0, 0);
    for cycle in 0..CYCLES {
        let why = |what: &str| format!("seed {seed}, cycle {cycle}: {what}");
        // Writes: whole grains, and single pieces (4 KiB), anywhere.
        let plan: Vec<(usize, usize, u8)> = (0..WRITES)
            .map(|_| {
                let len = if rng.random_bool(0.5) { 64 * KIB } else { 4 * KIB };
                (rng.random_range(0..VOL / len) * len, len, rng.random_range(1..=255u8))
            })
            .collect();
        let create_after = Duration::from_millis(rng.random_range(0..250));
        let delete_after = Duration::from_millis(rng.random_range(0..100));
        // The kill comes after a random number of acknowledged writes (past the end: after
        // qemu-io is done), plus a random few milliseconds, so it lands anywhere in the stream,
        // not mostly in qemu-io's start-up.
        // One cycle in four kills right after the reply to the create (or to a delete), where
        // a reply sent before the record is durable loses the snapshot.
        let kill_after = rng.random_range(0..WRITES + WRITES / 8);
        let kill_on_reply = match rng.random_range(0..8) {
            0 | 1 => REPLIED_CREATE,
            2 => REPLIED_DELETE,
            _ => 0,
        };
        let kill_delay = Duration::from_micros(rng.random_range(0..4000));
        // stdbuf execs qemu-io (same PID, so killing the child kills qemu-io) with its output
        // line-buffered, so each "wrote" line is seen as its write completes.
        let mut q = Command::new("stdbuf");
        q.args(["-oL", "qemu-io", "-f", "raw"]);
        for &(off, len, p) in &plan {
            q.arg("-c").arg(format!("write -P {p} {off} {len}"));
        }
        let mut child = q.arg(&url).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start qemu-io");
        let start = Instant::now();
        let acked = Arc::new(AtomicUsize::new(0));
        let out = child.stdout.take().expect("stdout");
        let reader = {
            let acked = acked.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.starts_with("wrote ") {
                        acked.fetch_add(1, SeqCst);
                    }
                }
            })
        };
        // Control: the oldest snapshots deleted down to two, then a snapshot of this cycle.
        let control = Arc::new(Mutex::new(Control::default()));
        let replied = Arc::new(AtomicUsize::new(0));
        let ctl = {
            let (control, acked, socket, replied) = (control.clone(), acked.clone(), d.socket.clone(), replied.clone());
            let oldest: Vec<String> = snaps.keys().take(snaps.len().saturating_sub(2)).cloned().collect();
            let name = format!("c{cycle:02}");
            // Deletes first: a kill during them leaves no new snapshot, so the store (room for
            // five snapshots' copies) never fills however many deletes the kills cut short.
            std::thread::spawn(move || {
                for old in oldest {
                    std::thread::sleep(delete_after);
                    control.lock().unwrap().deleted.push((old.clone(), false));
                    if rpc_at(&socket, "bdev_snapshot_delete", json!({"name": old})).is_err() {
                        return;
                    }
                    if let Some(last) = control.lock().unwrap().deleted.last_mut() {
                        last.1 = true;
                    }
                    replied.fetch_or(REPLIED_DELETE, SeqCst);
                }
                std::thread::sleep(create_after);
                let lo = acked.load(SeqCst);
                control.lock().unwrap().created = Some((name.clone(), lo, false));
                if rpc_at(&socket, "bdev_snapshot_create", json!({"bdev_name": "vol", "snapshot_name": name})).is_err() {
                    return;
                }
                control.lock().unwrap().created = Some((name, lo, true));
                replied.fetch_or(REPLIED_CREATE, SeqCst);
            })
        };
        if kill_on_reply != 0 {
            while replied.load(SeqCst) & kill_on_reply == 0 && !ctl.is_finished() && start.elapsed() < Duration::from_secs(10) {
                std::thread::yield_now();
            }
        } else {
            while acked.load(SeqCst) < kill_after && start.elapsed() < Duration::from_secs(10) && child.try_wait().is_ok_and(|s| s.is_none()) {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(kill_delay);
        }
        let kill_at = start.elapsed();
        d.kill9();
        // qemu-io is our child: stop it by PID (its iSCSI driver would retry forever).
        let _ = child.kill();
        let _ = child.wait();
        reader.join().expect("reader");
        ctl.join().expect("control thread");
        let printed = acked.load(SeqCst);
        if printed > 0 && printed < WRITES {
            kills_during_writes += 1;
        }
        let c = std::mem::take(&mut *control.lock().unwrap());
        if matches!(c.created, Some((_, _, false))) {
            kills_before_create_reply += 1;
        }
        eprintln!("cycle {cycle}: kill at {kill_at:?} after {printed} acknowledged writes; {c:?}");
        d.restart();
        ready(&d);
        // Writes 0..printed were acknowledged; the next one may have reached the volume (its
        // reply may have been on the way); none after it was sent.
        let hi = (printed + 1).min(WRITES);
        let img = {
            let mut s = login(addr, "vol");
            read_at(&mut s, 0, VOL)
        };
        let k = prefix_of(&img, &live, &plan, printed, hi, printed)
            .unwrap_or_else(|| panic!("{}\n{}", why(&format!("the live volume is not the image after {printed} (or {hi}) acknowledged writes")), d.log_text()));
        eprintln!("cycle {cycle}: the live volume holds the first {k} writes");
        // What was read is verified: the next cycle starts from it (a torn write included).
        let cycle_base = std::mem::replace(&mut live, img);
        let have = listed(&d);
        // Every acknowledged snapshot is there, sealed, with exactly its image.
        for (name, want) in &snaps {
            let deleted_ack = c.deleted.iter().any(|(n, ack)| n == name && *ack);
            let deleted_unacked = c.deleted.iter().any(|(n, ack)| n == name && !*ack);
            match (have.get(name).map(String::as_str), deleted_ack) {
                (None, true) => continue,
                (Some(_), true) => panic!("{}", why(&format!("snapshot {name} was deleted (acknowledged) but came back"))),
                (None, false) if deleted_unacked => continue,
                (None, false) => panic!("{}\n{}", why(&format!("sealed snapshot {name} is gone")), d.log_text()),
                (Some("sealed"), false) => {}
                (Some(st), false) => panic!("{}\n{}", why(&format!("snapshot {name} came back {st}")), errors(&d)),
            }
            let img = read_image(&d, addr, name, VOL);
            assert!(img == *want, "{}: {}", why(&format!("snapshot {name} changed")), first_difference(&img, want));
        }
        snaps.retain(|n, _| have.contains_key(n));
        for n in &gone {
            assert!(!have.contains_key(n), "{}", why(&format!("deleted snapshot {n} came back")));
        }
        gone.extend(c.deleted.iter().filter(|(_, ack)| *ack).map(|(n, _)| n.clone()));
        // This cycle's snapshot: there if acknowledged; either way, if there, a point-in-time
        // image of the write stream from the moment the request was sent.
        if let Some((name, lo, ack)) = &c.created {
            match have.get(name).map(String::as_str) {
                None if *ack => panic!("{}\n{}", why(&format!("snapshot {name} was acknowledged but is gone")), d.log_text()),
                None => {}
                Some(st) => {
                    assert_eq!(st, "sealed", "{}", why(&format!("snapshot {name} came back {st}")));
                    let img = read_image(&d, addr, name, VOL);
                    let j = prefix_of(&img, &cycle_base, &plan, *lo, hi, printed).unwrap_or_else(|| {
                        panic!(
                            "{}\n{}",
                            why(&format!("snapshot {name} is not a point-in-time image of the writes after the {lo} acknowledged before it was requested")),
                            d.log_text()
                        )
                    });
                    eprintln!("cycle {cycle}: snapshot {name} holds the first {j} writes");
                    snaps.insert(name.clone(), img);
                }
            }
        }
    }
    eprintln!(
        "chaos: {CYCLES} cycles in {:?}; {kills_during_writes} kills while qemu-io wrote, {kills_before_create_reply} before the reply to a snapshot create; {} snapshots at the end",
        t0.elapsed(),
        snaps.len()
    );
}

/// A mirror `m0` over four uring legs `l0`..`l3`, exported as LUN 0 of `iqn...:m0` on `port`.
fn mirror_config(port: u16) -> String {
    let mut c = String::from(
        r#"
[daemon]
data_dir = "{data_dir}"
buffer_pool_mb = 16
[reactor]
cores = [0]
poll_mode = "adaptive"
[rpc]
socket = "{socket}"
[metrics]
listen = "{metrics}"
"#,
    );
    for i in 0..4 {
        c += &format!("[[bdev]]\nmethod = \"bdev_uring_create\"\nparams = {{ name = \"l{i}\", filename = \"l{i}.img\", size_mb = 16, block_size = 512 }}\n");
    }
    c += &format!(
        r#"[[bdev]]
method = "bdev_raid_create"
params = {{ name = "m0", raid_level = "raid1", base_bdevs = ["l0", "l1", "l2", "l3"], region_size_kb = 256 }}
[[iscsi]]
method = "iscsi_create_portal_group"
params = {{ tag = 1, portals = [{{ host = "127.0.0.1", port = "{port}" }}] }}
[[iscsi]]
method = "iscsi_create_initiator_group"
params = {{ tag = 1, initiators = ["ANY"], netmasks = ["127.0.0.1/32"] }}
[[iscsi]]
method = "iscsi_create_target_node"
params = {{ name = "iqn.2016-06.io.tidemark:m0", luns = [{{ bdev_name = "m0", lun_id = 0 }}], pg_ig_maps = [{{ pg_tag = 1, ig_tag = 1 }}], queue_depth = 32 }}
"#
    );
    c
}

/// An acknowledged mirror split (`bdev_snapshot_create` on a mirror: the leg becomes the
/// image) survives `kill -9` right after the reply, three rounds in a row: after each restart
/// (from a configuration that lists every leg, split or not) the mirror keeps the leg out as
/// the split image, the image opens from its leg and reads exactly what the mirror held at the
/// split, earlier images are unchanged, and the mirror lost no acknowledged write.
#[test]
fn an_acknowledged_mirror_split_survives_kill_9_right_after_the_reply() {
    const SPAN: usize = 2 * MIB;
    let port = free_port();
    let mut d = Daemon::start(&mirror_config(port));
    ready(&d);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let regions = [(0, 64 * KIB), (300 * KIB, 8 * KIB), (MIB - 4 * KIB, 520 * KIB)];
    let pattern = |round: usize, pos: usize| ((pos / 512) as u8).wrapping_mul(13) ^ (round as u8).wrapping_mul(59) ^ 0xa5;
    let mut live = vec![0u8; SPAN];
    let mut images: Vec<(String, String, Vec<u8>)> = Vec::new();
    let raid = |d: &Daemon| d.rpc("bdev_raid_get_bdevs", json!({"category": "all"}))[0].clone();
    for round in 0..3 {
        // A split is refused while regions written at the last crash are resynchronised.
        let deadline = Instant::now() + Duration::from_secs(60);
        while raid(&d)["unsynced_regions"] != 0 {
            assert!(Instant::now() < deadline, "round {round}: resynchronisation never ended: {}", raid(&d));
            std::thread::sleep(Duration::from_millis(50));
        }
        {
            let mut s = login(addr, "m0");
            for &(off, len) in &regions {
                let data: Vec<u8> = (off..off + len).map(|p| pattern(round, p)).collect();
                assert!(write_at(&mut s, off, &data).iter().all(|&st| st == 0), "round {round}: a write failed");
                live[off..off + len].copy_from_slice(&data);
            }
        }
        let (leg, image) = (format!("l{}", 3 - round), format!("img{round}"));
        let r = d.rpc("bdev_snapshot_create", json!({"bdev_name": "m0", "snapshot_name": image, "base_bdev": leg}));
        d.kill9();
        assert!(r["state"] == "draining" || r["state"] == "sealed", "{r}");
        images.push((image.clone(), leg.clone(), live.clone()));
        d.restart();
        ready(&d);
        let what = format!("round {round}, after splitting {leg} off as {image}");
        let m = raid(&d);
        let have = listed(&d);
        for (name, leg, want) in &images {
            // The split leg is no member: the slot keeps the image's name, not the leg's.
            let slot = m["base_bdevs_list"].as_array().expect("legs").iter().find(|b| b["image"] == name.as_str()).cloned().unwrap_or_default();
            assert!(slot["state"] == "split", "{what}: no split slot holds image {name}: {m}\n{}", d.log_text());
            assert!(m["base_bdevs_list"].as_array().expect("legs").iter().all(|b| b["name"] != leg.as_str()), "{what}: {leg} re-joined the mirror: {m}");
            assert_eq!(have.get(name).map(String::as_str), Some("sealed"), "{what}: image {name} (snapshots: {have:?})");
            // The configuration names no image: open it from its leg, as an operator would.
            d.rpc("bdev_raid_open_split_image", json!({"name": name, "base_bdev": leg}));
            let img = read_image(&d, addr, name, SPAN);
            assert!(img == *want, "{what}: image {name} does not read the mirror at its split: {}", first_difference(&img, want));
        }
        assert_eq!(m["num_base_bdevs_operational"], 3 - round, "{what}: {m}");
        let mut s = login(addr, "m0");
        let img = read_at(&mut s, 0, SPAN);
        assert!(img == live, "{what}: the mirror lost acknowledged writes: {}", first_difference(&img, &live));
    }
}
