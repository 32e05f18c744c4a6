//! The CSI node service end to end, with the Linux kernel NVMe/TCP initiator, nvme-cli and real
//! file systems in a QEMU guest (tests/guest/run.sh). The host runs tidemarkd (a pool) and
//! `tidemark-csi --mode controller`; the guest runs `tidemark-csi --mode node` on TCP, reached
//! through a QEMU port forward (csi/tests/node_guest.sh), and runs the shell commands this test
//! gives it. The test plays the container orchestrator:
//!
//! - a new volume is staged (ext4 made and mounted) and published, twice each (idempotent);
//!   a file is written through the published path; stats report bytes and inodes;
//! - a snapshot is taken through the controller while a writer runs in the file system; a
//!   volume created from it is staged (no mkfs: the file system is found) and holds the file;
//! - the first volume is grown by ControllerExpandVolume and NodeExpandVolume, and `df` sees
//!   the file system grow;
//! - a raw block volume is staged and published as a device file, written and read back;
//! - an xfs volume is refused with FAILED_PRECONDITION naming mkfs.xfs (the guest has no
//!   xfsprogs), or staged when it has;
//! - a read-only publish refuses writes; unstaging a volume still published is refused;
//! - the plugin is killed (SIGKILL) and restarted, and the new one picks up where calls were
//!   cut short: a subsystem connected by hand is staged without a second controller, an
//!   unpublish and an unstage interrupted after their umount complete;
//! - everything is unpublished and unstaged (twice: idempotent) and no NVMe controller is
//!   left in the guest, nor on the target.
//!
//! Needs qemu-system-x86_64 and the guest image (tests/guest/deps.sh, build.sh; tests/run
//! builds them). Skipped with TIDEMARK_SKIP_GUEST=1 or TIDEMARK_SKIP_NVMF_GUEST=1.

use bpfman_csi::v1::controller_client::ControllerClient;
use bpfman_csi::v1::node_client::NodeClient;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use bpfman_csi::v1::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

mod support;

use support::{call, free_port, tidemarkd, wait_for_socket, Proc, CSI};

const MIB: i64 = 1 << 20;
/// The node plugin's port inside the guest.
const GUEST_PORT: u16 = 10000;

fn skip() -> Option<&'static str> {
    ["TIDEMARK_SKIP_GUEST", "TIDEMARK_SKIP_NVMF_GUEST"].into_iter().find(|v| std::env::var(v).as_deref() == Ok("1"))
}

fn have(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// The guest's side: shell commands through the share (see node_guest.sh).
struct Guest {
    share: PathBuf,
    next: u32,
}

impl Guest {
    /// Runs `script` in the guest: (status, output).
    async fn run(&mut self, script: &str) -> (i32, String) {
        let n = self.next;
        self.next += 1;
        let tmp = self.share.join(format!("cmd.{n}.tmp"));
        std::fs::write(&tmp, script).unwrap();
        std::fs::rename(&tmp, self.share.join(format!("cmd.{n}"))).unwrap();
        if script == "exit" {
            return (0, String::new());
        }
        let rc = self.share.join(format!("rc.{n}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !rc.exists() {
            assert!(Instant::now() < deadline, "the guest did not run command {n} in 120 s: {script}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let code = std::fs::read_to_string(&rc).unwrap().trim().parse().unwrap_or(-1);
        let out = std::fs::read_to_string(self.share.join(format!("out.{n}"))).unwrap_or_default();
        (code, out)
    }

    /// Runs `script` and expects it to succeed; its output.
    async fn ok(&mut self, what: &str, script: &str) -> String {
        let (rc, out) = self.run(script).await;
        assert_eq!(rc, 0, "guest: {what} failed ({rc}):\n{out}\n--- node plugin log\n{}", self.log());
        eprintln!("guest: {what}: ok");
        out
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.share.join("node.log")).unwrap_or_default()
    }
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), mount_flags: vec!["noatime".into()], ..Default::default() })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability { access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }), access_type: Some(AccessType::Block(BlockVolume {})) }
}

fn staging(name: &str) -> String {
    format!("/var/lib/kubelet/plugins/kubernetes.io/csi/csi.tidemark.io/{name}/globalmount")
}

fn target(pod: &str, name: &str) -> String {
    format!("/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~csi/{name}/mount")
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

struct Vol {
    id: String,
    stage: String,
    cap: VolumeCapability,
}

async fn create(c: &mut ControllerClient<Channel>, name: &str, size: i64, cap: &VolumeCapability, source: Option<VolumeContentSource>) -> String {
    let req = CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![cap.clone()],
        volume_content_source: source,
        ..Default::default()
    };
    c.create_volume(req).await.expect("CreateVolume").into_inner().volume.unwrap().volume_id
}

/// ControllerPublishVolume to the guest, then NodeStageVolume twice (the second finds it done).
/// With `crashed`, the guest first connects the subsystem itself, as a stage cut short by a
/// crash of the plugin leaves it: staging goes on from there, without a second controller.
async fn attach(c: &mut ControllerClient<Channel>, n: &mut NodeClient<Channel>, node_id: &str, v: &Vol, g: &mut Guest, crashed: bool) {
    let req = ControllerPublishVolumeRequest { volume_id: v.id.clone(), node_id: node_id.into(), volume_capability: Some(v.cap.clone()), ..Default::default() };
    let ctx = c.controller_publish_volume(req).await.expect("ControllerPublishVolume").into_inner().publish_context;
    assert_eq!(ctx["traddr"], "10.0.2.2", "the address hosts use (nvmf_host_address), not the listener's: {ctx:?}");
    let one_controller = format!("test \"$(grep -lx '{}' /sys/class/nvme/nvme*/subsysnqn | wc -l)\" -eq 1", ctx["subnqn"]);
    if crashed {
        let connect = format!("nvme connect -t tcp -a {} -s {} -n {} --hostnqn {node_id} && {one_controller}", ctx["traddr"], ctx["trsvcid"], ctx["subnqn"]);
        g.ok("connected by hand, as a crashed stage leaves it", &connect).await;
    }
    for _ in 0..2 {
        let t = Instant::now();
        let req = NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            publish_context: ctx.clone(),
            staging_target_path: v.stage.clone(),
            volume_capability: Some(v.cap.clone()),
            ..Default::default()
        };
        n.node_stage_volume(req).await.unwrap_or_else(|e| panic!("NodeStageVolume {}: {e:?}", v.id));
        eprintln!("NodeStageVolume {} took {:?}", v.id, t.elapsed());
    }
    g.ok("one controller of the volume's subsystem", &one_controller).await;
}

async fn publish(n: &mut NodeClient<Channel>, v: &Vol, target: &str, readonly: bool) {
    for _ in 0..2 {
        let req = NodePublishVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: v.stage.clone(),
            target_path: target.into(),
            volume_capability: Some(v.cap.clone()),
            readonly,
            ..Default::default()
        };
        n.node_publish_volume(req).await.unwrap_or_else(|e| panic!("NodePublishVolume {} at {target}: {e:?}", v.id));
    }
}

async fn unpublish(n: &mut NodeClient<Channel>, v: &Vol, target: &str) {
    for _ in 0..2 {
        let req = NodeUnpublishVolumeRequest { volume_id: v.id.clone(), target_path: target.into() };
        n.node_unpublish_volume(req).await.unwrap_or_else(|e| panic!("NodeUnpublishVolume {} at {target}: {e:?}", v.id));
    }
}

async fn unstage(n: &mut NodeClient<Channel>, v: &Vol) {
    for _ in 0..2 {
        let req = NodeUnstageVolumeRequest { volume_id: v.id.clone(), staging_target_path: v.stage.clone() };
        n.node_unstage_volume(req).await.unwrap_or_else(|e| panic!("NodeUnstageVolume {}: {e:?}", v.id));
    }
}

async fn stats(n: &mut NodeClient<Channel>, v: &Vol, path: &str) -> NodeGetVolumeStatsResponse {
    let req = NodeGetVolumeStatsRequest { volume_id: v.id.clone(), volume_path: path.into(), ..Default::default() };
    n.node_get_volume_stats(req).await.unwrap_or_else(|e| panic!("NodeGetVolumeStats {path}: {e:?}")).into_inner()
}

fn bytes(s: &NodeGetVolumeStatsResponse) -> &VolumeUsage {
    s.usage.iter().find(|u| u.unit == volume_usage::Unit::Bytes as i32).expect("a BYTES usage")
}

async fn connect_node(port: u16) -> NodeClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(150))
        .connect()
        .await
        .expect("connect to the node plugin in the guest");
    NodeClient::new(ch)
}

#[tokio::test]
async fn node_service_end_to_end_in_a_guest() {
    if let Some(v) = skip() {
        eprintln!("skipped: {v}=1");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run_sh = root.join("tests/guest/run.sh");
    assert!(have("qemu-system-x86_64"), "qemu-system-x86_64 is not installed: run tests/guest/deps.sh (or set TIDEMARK_SKIP_GUEST=1 to skip this test)");
    let t0 = Instant::now();

    // tidemarkd with a 256 MiB pool, and the controller plugin.
    let dir = tempfile::Builder::new().prefix("tidemark-csi-node").tempdir().unwrap();
    let rpc = dir.path().join("rpc.sock");
    let data = dir.path().join("data");
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("tidemark.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\ndata_dir = \"{}\"\nbuffer_pool_mb = 16\n[reactor]\ncores = [0]\npoll_mode = \"adaptive\"\n[rpc]\nsocket = \"{}\"\n[metrics]\nlisten = \"{metrics}\"\n",
            data.display(),
            rpc.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("tidemarkd.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(tidemarkd())
        .arg("--config")
        .arg(&cfg)
        .arg("--rpc-socket")
        .arg(&rpc)
        .arg("--data-dir")
        .arg(&data)
        .arg("--metrics")
        .arg(&metrics)
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .expect("spawn tidemarkd");
    wait_for_socket(&rpc, &mut child, &log);
    let _daemon = Proc(Some(child));
    call(&rpc, "bdev_malloc_create", json!({"name": "m0", "num_blocks": 256 * 2048, "block_size": 512}));
    call(&rpc, "bdev_lvol_create_lvstore", json!({"bdev_name": "m0", "lvs_name": "pool"}));

    // The listener is on the host's loopback; the guest reaches it as 10.0.2.2.
    let nvmf_port = free_port();
    let csi_cfg = dir.path().join("csi.toml");
    std::fs::write(
        &csi_cfg,
        format!(
            "default_pool = \"pool\"\n[[nodes]]\nname = \"n1\"\nrpc = \"{}\"\nnvmf_address = \"127.0.0.1\"\nnvmf_host_address = \"10.0.2.2\"\nnvmf_port = {nvmf_port}\n",
            rpc.display()
        ),
    )
    .unwrap();
    let sock = dir.path().join("csi.sock");
    let clog = dir.path().join("csi.log");
    let f = std::fs::File::create(&clog).unwrap();
    let mut child = Command::new(CSI)
        .args(["--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--config")
        .arg(&csi_cfg)
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .expect("spawn tidemark-csi");
    wait_for_socket(&sock, &mut child, &clog);
    let _controller = Proc(Some(child));
    let s2 = sock.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(s2.clone())))
        .await
        .expect("connect to the controller");
    let mut ctl = ControllerClient::new(channel);

    // The guest, with the node plugin from the share.
    let share = tempfile::Builder::new().prefix("tidemark-csi-guest").tempdir().unwrap();
    std::fs::copy(CSI, share.path().join("tidemark-csi")).unwrap();
    let host_port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node_guest.sh");
    let mut qemu = Command::new(&run_sh)
        .arg(&script)
        .env("TIDEMARK_GUEST_SHARE", share.path())
        .env("TIDEMARK_GUEST_NETDEV_OPTS", format!("hostfwd=tcp:127.0.0.1:{host_port}-:{GUEST_PORT}"))
        .env("TIDEMARK_GUEST_VARS", "CSI_PORT GUEST_SECS")
        .env("TIDEMARK_GUEST_TIMEOUT", "360")
        .env("CSI_PORT", GUEST_PORT.to_string())
        .env("GUEST_SECS", "300")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tests/guest/run.sh");
    let out = qemu.stdout.take().unwrap();
    let err = qemu.stderr.take().unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (out, err) = (read(Box::new(out)), read(Box::new(err)));
    let mut qemu = Proc(Some(qemu));
    let ready = share.path().join("ready");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ready.exists() {
        if Instant::now() > deadline || qemu.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            drop(qemu);
            panic!("the guest's node plugin did not come up:\n{}\n{}", out.join().unwrap(), err.join().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let guest_nqn = std::fs::read_to_string(&ready).unwrap().trim().to_string();
    eprintln!("guest up after {:?}, host NQN {guest_nqn}", t0.elapsed());
    let mut g = Guest { share: share.path().to_path_buf(), next: 1 };
    let mut node = connect_node(host_port).await;

    // Who the node is and what it can do.
    let info = node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, guest_nqn);
    assert_eq!(info.max_volumes_per_node, 8);
    assert_eq!(info.accessible_topology.unwrap().segments["topology.tidemark.io/node"], "guest");
    let caps: Vec<i32> = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type {
            Some(node_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    use node_service_capability::rpc::Type as Cap;
    for c in [Cap::StageUnstageVolume, Cap::GetVolumeStats, Cap::ExpandVolume, Cap::VolumeCondition] {
        assert!(caps.contains(&(c as i32)), "{c:?} in {caps:?}");
    }

    // A new volume: ext4 made and mounted at staging, bound into a pod, a file written.
    let a = Vol { id: create(&mut ctl, "pvc-a", 64 * MIB, &mount_cap(), None).await, stage: staging("pvc-a"), cap: mount_cap() };
    attach(&mut ctl, &mut node, &guest_nqn, &a, &mut g, false).await;
    g.ok("ext4 mounted at the staging path", &format!("grep -q ' {} ext4 ' /proc/mounts && grep ' {} ' /proc/mounts", a.stage, a.stage)).await;
    let ta = target("pod-1", "pvc-a");
    publish(&mut node, &a, &ta, false).await;
    g.ok(
        "a file written through the published path",
        &format!("set -e; dd if=/dev/urandom of=/tmp/data bs=64k count=32 2>/dev/null; cp /tmp/data {ta}/data; sync; md5sum /tmp/data > /tmp/data.md5; cat /tmp/data.md5"),
    )
    .await;
    let st = stats(&mut node, &a, &ta).await;
    let b0 = bytes(&st).clone();
    assert!(b0.total > 40 * MIB && b0.used >= 2 * MIB && b0.available > 0, "{st:?}");
    assert!(st.usage.iter().any(|u| u.unit == volume_usage::Unit::Inodes as i32 && u.total > 0 && u.used > 0), "{st:?}");
    assert_eq!(st.volume_condition.as_ref().map(|c| c.abnormal), Some(false), "{st:?}");
    let req = NodeGetVolumeStatsRequest { volume_id: a.id.clone(), volume_path: "/var/lib/kubelet/pods/none".into(), ..Default::default() };
    assert_eq!(code(node.node_get_volume_stats(req).await), Code::NotFound);

    // A snapshot while a writer runs in the file system, a volume from it, staged: the file is there.
    g.ok(
        "a writer started",
        &format!("(fio --name=w --directory={ta} --rw=randwrite --bs=4k --size=8m --ioengine=psync --fsync=32 --time_based --runtime=6 >/tmp/w.out 2>&1; echo $? > /tmp/w.rc) >/dev/null 2>&1 &\nsleep 2; test ! -e /tmp/w.rc"),
    )
    .await;
    let t = Instant::now();
    let snap = ctl
        .create_snapshot(CreateSnapshotRequest { name: "snap-a".into(), source_volume_id: a.id.clone(), ..Default::default() })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap();
    eprintln!("CreateSnapshot under the guest's writer took {:?}", t.elapsed());
    let writer = g
        .ok(
            "the writer finished without error",
            "for i in $(seq 300); do [ -e /tmp/w.rc ] && break; sleep 0.1; done; cat /tmp/w.rc; grep -E 'IOPS=|err=' /tmp/w.out; exit $(cat /tmp/w.rc)",
        )
        .await;
    eprintln!("{writer}");
    let src = VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: snap.snapshot_id.clone() })),
    };
    let b = Vol { id: create(&mut ctl, "pvc-b", 64 * MIB, &mount_cap(), Some(src)).await, stage: staging("pvc-b"), cap: mount_cap() };
    attach(&mut ctl, &mut node, &guest_nqn, &b, &mut g, false).await;
    let tb = target("pod-2", "pvc-b");
    publish(&mut node, &b, &tb, false).await;
    g.ok("the volume from the snapshot holds the file", &format!("cd {tb} && sed 's#/tmp/data#data#' /tmp/data.md5 | md5sum -c")).await;

    // Grown: the controller grows the volume, the node its file system.
    let kib = |s: &str| s.trim().lines().last().unwrap_or("0").trim().parse::<u64>().unwrap_or(0);
    let df = format!("df -k {ta} | awk 'NR == 2 {{print $2}}'");
    let k0 = kib(&g.ok("df before", &df).await);
    let req = ControllerExpandVolumeRequest {
        volume_id: a.id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        volume_capability: Some(a.cap.clone()),
        ..Default::default()
    };
    let e = ctl.controller_expand_volume(req).await.expect("ControllerExpandVolume").into_inner();
    assert!(e.node_expansion_required && e.capacity_bytes >= 128 * MIB, "{e:?}");
    for _ in 0..2 {
        let req = NodeExpandVolumeRequest {
            volume_id: a.id.clone(),
            volume_path: ta.clone(),
            capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            staging_target_path: a.stage.clone(),
            volume_capability: Some(a.cap.clone()),
            ..Default::default()
        };
        let r = node.node_expand_volume(req).await.unwrap_or_else(|e| panic!("NodeExpandVolume: {e:?}\n{}", g.log())).into_inner();
        assert!(r.capacity_bytes >= 128 * MIB, "{r:?}");
    }
    let k1 = kib(&g.ok("df after", &df).await);
    eprintln!("ext4 of {}: {k0} KiB, grown to {k1} KiB", a.id);
    assert!(k1 > k0 * 3 / 2, "df: {k0} KiB, then {k1} KiB");
    let st = stats(&mut node, &a, &ta).await;
    assert!(bytes(&st).total > b0.total * 3 / 2, "{st:?}");
    g.ok("the file is intact after the growth", &format!("cd {ta} && sed 's#/tmp/data#data#' /tmp/data.md5 | md5sum -c")).await;

    // Read-only publishing of the same volume at a second path.
    let ta_ro = target("pod-3", "pvc-a");
    publish(&mut node, &a, &ta_ro, true).await;
    g.ok("a read-only publish refuses writes and reads the file", &format!("! touch {ta_ro}/x 2>/dev/null && cmp {ta_ro}/data /tmp/data")).await;

    // A raw block volume: a device file in the pod's directory.
    let c = Vol { id: create(&mut ctl, "pvc-c", 16 * MIB, &block_cap(), None).await, stage: staging("pvc-c"), cap: block_cap() };
    attach(&mut ctl, &mut node, &guest_nqn, &c, &mut g, true).await;
    let tc = "/var/lib/kubelet/pods/pod-4/volumeDevices/kubernetes.io~csi/pvc-c".to_string();
    publish(&mut node, &c, &tc, false).await;
    g.ok(
        "the block volume is a device written and read back",
        &format!("set -e; test -b {tc}; dd if=/dev/urandom of=/tmp/b bs=4k count=64 2>/dev/null; dd if=/tmp/b of={tc} bs=4k oflag=direct 2>/dev/null; dd if={tc} of=/tmp/b2 bs=4k count=64 iflag=direct 2>/dev/null; cmp /tmp/b /tmp/b2"),
    )
    .await;
    let st = stats(&mut node, &c, &tc).await;
    assert_eq!(bytes(&st).total, 16 * MIB, "{st:?}");
    assert_eq!(st.volume_condition.as_ref().map(|c| c.abnormal), Some(false), "{st:?}");

    // xfs: made when mkfs.xfs is there; the guest has no xfsprogs, and staging says so.
    let xfs_cap = VolumeCapability { access_type: Some(AccessType::Mount(MountVolume { fs_type: "xfs".into(), ..Default::default() })), ..mount_cap() };
    let d = Vol { id: create(&mut ctl, "pvc-d", 32 * MIB, &xfs_cap, None).await, stage: staging("pvc-d"), cap: xfs_cap };
    let has_xfs = g.run("command -v mkfs.xfs").await.0 == 0;
    let req =
        ControllerPublishVolumeRequest { volume_id: d.id.clone(), node_id: guest_nqn.clone(), volume_capability: Some(d.cap.clone()), ..Default::default() };
    let ctx = ctl.controller_publish_volume(req).await.expect("ControllerPublishVolume").into_inner().publish_context;
    let req = NodeStageVolumeRequest {
        volume_id: d.id.clone(),
        publish_context: ctx,
        staging_target_path: d.stage.clone(),
        volume_capability: Some(d.cap.clone()),
        ..Default::default()
    };
    match node.node_stage_volume(req).await {
        Ok(_) => assert!(has_xfs, "staged as xfs without mkfs.xfs?"),
        Err(e) => {
            assert!(!has_xfs, "xfs staging failed with mkfs.xfs there: {e:?}");
            assert!(e.code() == Code::FailedPrecondition && e.message().contains("mkfs.xfs"), "{e:?}");
        }
    }
    unstage(&mut node, &d).await;

    // Unstaging a volume that is still published is refused: its device stays.
    let req = NodeUnstageVolumeRequest { volume_id: a.id.clone(), staging_target_path: a.stage.clone() };
    assert_eq!(code(node.node_unstage_volume(req).await), Code::FailedPrecondition);

    // The plugin crashes (SIGKILL) and a new one starts with nothing but the node to go by:
    // staging again finds everything done; calls cut short are completed.
    g.ok("the node plugin killed and restarted", "kill -9 $(cat /tmp/csi.pid); sleep 0.5; /tmp/start-node.sh").await;
    let mut node = connect_node(host_port).await;
    attach(&mut ctl, &mut node, &guest_nqn, &a, &mut g, false).await;
    g.ok("an unpublish and an unstage cut short after their umount", &format!("umount {tb} && umount {}", b.stage)).await;

    // Everything away, each call twice; no controller left.
    unpublish(&mut node, &a, &ta).await;
    unpublish(&mut node, &a, &ta_ro).await;
    unpublish(&mut node, &b, &tb).await;
    unpublish(&mut node, &c, &tc).await;
    for v in [&a, &b, &c] {
        unstage(&mut node, v).await;
    }
    g.ok(
        "no NVMe controller and no mount left",
        "ls /sys/class/nvme/; for c in /sys/class/nvme/nvme*; do [ -e \"$c\" ] && { echo \"left: $c\"; exit 1; }; done; ! grep kubelet /proc/mounts",
    )
    .await;
    g.ok("the published paths are gone", &format!("test ! -e {ta} && test ! -e {ta_ro} && test ! -e {tb} && test ! -e {tc}")).await;
    for v in [&a, &b, &c, &d] {
        let nqn = format!("nqn.2016-06.io.tidemark:csi-{}", v.id.rsplit('/').next().unwrap());
        let ctrls = call(&rpc, "nvmf_subsystem_get_controllers", json!({"nqn": nqn}));
        assert_eq!(ctrls, json!([]), "{nqn} has controllers left on the target");
        let req = ControllerUnpublishVolumeRequest { volume_id: v.id.clone(), node_id: guest_nqn.clone(), ..Default::default() };
        ctl.controller_unpublish_volume(req).await.expect("ControllerUnpublishVolume");
    }
    // Stats of an unstaged volume: not found.
    let req = NodeGetVolumeStatsRequest { volume_id: a.id.clone(), volume_path: ta.clone(), ..Default::default() };
    assert_eq!(code(node.node_get_volume_stats(req).await), Code::NotFound);

    g.run("exit").await;
    let status = {
        let c = qemu.0.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the guest did not power off");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    qemu.0 = None;
    let (console, stderr) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "guest: {status}\n{console}\n{stderr}\n--- node plugin log\n{}", g.log());
    eprintln!("--- node plugin log\n{}", g.log());
    eprintln!("node service end to end: {:?} in all", t0.elapsed());
}
