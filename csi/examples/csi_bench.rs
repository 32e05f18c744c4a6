//! The CSI driver's cost over tidemark's own JSON-RPC (issue #16's benchmark): N CreateVolume,
//! N CreateSnapshot and N CreateVolume-from-snapshot (a clone) through `tidemark-csi --mode
//! controller`'s gRPC socket, then the same operations as the single JSON-RPC call that does the
//! work (`bdev_lvol_create`, `bdev_lvol_snapshot`, `bdev_lvol_clone`) straight to the same
//! tidemarkd, in the same run; p50/p99 of each and the ratio driver / direct, and the driver's
//! resident memory after the run. The driver's calls also look the name up first (idempotency:
//! the spec asks that a repeated call find what the first made) and check capacity; that is the
//! overhead measured.
//!
//!   cargo build --release --bins --examples -p tidemark -p tidemark-csi
//!   target/release/examples/csi_bench [N]      (bench/csi_bench.sh does both)

use bpfman_csi::v1::controller_client::ControllerClient;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use bpfman_csi::v1::volume_content_source::{SnapshotSource, Type as Source};
use bpfman_csi::v1::*;
use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: i64 = 1 << 20;

/// A child process killed by PID when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One JSON-RPC call to tidemarkd.
fn call(sock: &Path, method: &str, params: Value) -> Value {
    let s = UnixStream::connect(sock).expect("connect to tidemarkd");
    (&s).write_all(json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string().as_bytes()).expect("send");
    let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<Value>().next().expect("an answer").expect("JSON");
    assert!(resp.get("error").is_none(), "{method}: {resp}");
    resp["result"].clone()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability { access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }), access_type: Some(AccessType::Mount(MountVolume::default())) }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let bin_dir: PathBuf = std::env::current_exe().expect("own path").parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let (tidemarkd, csi) = (bin_dir.join("tidemarkd"), bin_dir.join("tidemark-csi"));
    for b in [&tidemarkd, &csi] {
        assert!(b.exists(), "{} is missing: cargo build --release --bins -p tidemark -p tidemark-csi", b.display());
    }
    let dir = tempfile::Builder::new().prefix("tidemark-csi-bench").tempdir().expect("temp dir");
    let rpc = dir.path().join("rpc.sock");
    let cfg = dir.path().join("tidemark.toml");
    let metrics = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\ndata_dir = \"{}\"\nbuffer_pool_mb = 16\n[reactor]\ncores = [0]\npoll_mode = \"adaptive\"\n[rpc]\nsocket = \"{}\"\n[metrics]\nlisten = \"{metrics}\"\n",
            dir.path().join("data").display(),
            rpc.display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.path().join("tidemarkd.log")).expect("log");
    let _daemon = Proc(Command::new(&tidemarkd).arg("--config").arg(&cfg).stdout(Stdio::from(log.try_clone().expect("log"))).stderr(Stdio::from(log)).spawn().expect("tidemarkd"));
    wait_for_socket(&rpc);
    call(&rpc, "bdev_malloc_create", json!({"name": "m0", "num_blocks": 1024 * 2048, "block_size": 512}));
    call(&rpc, "bdev_lvol_create_lvstore", json!({"bdev_name": "m0", "lvs_name": "pool"}));

    let csi_cfg = dir.path().join("csi.toml");
    std::fs::write(&csi_cfg, format!("default_pool = \"pool\"\n[[nodes]]\nname = \"n1\"\nrpc = \"{}\"\nnvmf_address = \"127.0.0.1\"\nnvmf_port = {}\n", rpc.display(), free_port()))
        .expect("csi config");
    let sock = dir.path().join("csi.sock");
    let driver = Proc(
        Command::new(&csi)
            .args(["--mode", "controller", "--endpoint"])
            .arg(format!("unix://{}", sock.display()))
            .arg("--config")
            .arg(&csi_cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tidemark-csi"),
    );
    wait_for_socket(&sock);
    let s2 = sock.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(s2.clone())))
        .await
        .expect("connect to the CSI socket");
    let mut c = ControllerClient::new(channel);
    let rss_before = rss_kib(driver.0.id());

    let (mut csi_vol, mut csi_snap, mut csi_clone) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let req = CreateVolumeRequest {
            name: format!("bench-v{i}"),
            capacity_range: Some(CapacityRange { required_bytes: 4 * MIB, limit_bytes: 0 }),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        };
        let t = Instant::now();
        let vol = c.create_volume(req).await.expect("CreateVolume").into_inner().volume.expect("volume");
        csi_vol.push(t.elapsed());
        let t = Instant::now();
        let snap = c
            .create_snapshot(CreateSnapshotRequest { source_volume_id: vol.volume_id.clone(), name: format!("bench-s{i}"), ..Default::default() })
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        csi_snap.push(t.elapsed());
        let req = CreateVolumeRequest {
            name: format!("bench-c{i}"),
            capacity_range: Some(CapacityRange { required_bytes: 4 * MIB, limit_bytes: 0 }),
            volume_capabilities: vec![mount_cap()],
            volume_content_source: Some(VolumeContentSource { r#type: Some(Source::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id })) }),
            ..Default::default()
        };
        let t = Instant::now();
        c.create_volume(req).await.expect("CreateVolume from a snapshot");
        csi_clone.push(t.elapsed());
    }
    let rss_after = rss_kib(driver.0.id());

    let (mut d_vol, mut d_snap, mut d_clone) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let t = Instant::now();
        call(&rpc, "bdev_lvol_create", json!({"lvol_name": format!("d{i}"), "size_in_mib": 4, "thin_provision": true, "lvs_name": "pool"}));
        d_vol.push(t.elapsed());
        let t = Instant::now();
        call(&rpc, "bdev_lvol_snapshot", json!({"lvol_name": format!("pool/d{i}"), "snapshot_name": format!("ds{i}")}));
        d_snap.push(t.elapsed());
        let t = Instant::now();
        call(&rpc, "bdev_lvol_clone", json!({"snapshot_name": format!("pool/ds{i}"), "clone_name": format!("dc{i}")}));
        d_clone.push(t.elapsed());
    }

    println!("tidemark-csi controller vs the JSON-RPC call that does the work, {n} calls each (same tidemarkd, same run)");
    println!("{:<34} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}", "operation", "csi p50", "csi p99", "rpc p50", "rpc p99", "p50 x", "p99 x");
    for (name, a, b) in [
        ("CreateVolume / bdev_lvol_create", &mut csi_vol, &mut d_vol),
        ("CreateSnapshot / bdev_lvol_snapshot", &mut csi_snap, &mut d_snap),
        ("CreateVolume(snapshot) / clone", &mut csi_clone, &mut d_clone),
    ] {
        let (a50, a99, b50, b99) = (pct(a, 0.5), pct(a, 0.99), pct(b, 0.5), pct(b, 0.99));
        println!(
            "{name:<34} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2} {:>8.2}",
            ms(a50),
            ms(a99),
            ms(b50),
            ms(b99),
            ms(a50) / ms(b50).max(1e-6),
            ms(a99) / ms(b99).max(1e-6)
        );
    }
    println!("tidemark-csi resident memory: {rss_before} KiB after start, {rss_after} KiB after {} calls", 3 * n);
}
