//! tidemark-csi's controller over its real gRPC socket against a real tidemarkd: the cases of the
//! Kubernetes csi-sanity suite (which cannot be installed here) for the identity and controller
//! services. Each test starts its own tidemarkd (a malloc bdev with an lvol store `pool`) and its
//! own `tidemark-csi --mode controller`, on private sockets, and stops both by PID.

use bpfman_csi::v1::controller_client::ControllerClient;
use bpfman_csi::v1::identity_client::IdentityClient;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use bpfman_csi::v1::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

mod support;

use support::{free_port, tidemarkd, try_call as call, wait_for_socket, Proc, CSI};

const MIB: i64 = 1 << 20;
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:5e1c0a2e-0000-4000-8000-000000000001";

/// A tidemarkd with a `pool_mib` MiB malloc bdev and an lvol store `pool` on it, and a
/// tidemark-csi controller pointed at it.
struct Rig {
    dir: tempfile::TempDir,
    daemon: Proc,
    csi: Proc,
    rpc: PathBuf,
    nvmf_port: u16,
    channel: Channel,
}

impl Rig {
    async fn start(pool_mib: u64) -> Rig {
        let dir = tempfile::Builder::new().prefix("tidemark-csi-test").tempdir().unwrap();
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
        let daemon = Proc(Some(child));
        call(&rpc, "bdev_malloc_create", json!({"name": "m0", "num_blocks": pool_mib * 2048, "block_size": 512})).unwrap();
        call(&rpc, "bdev_lvol_create_lvstore", json!({"bdev_name": "m0", "lvs_name": "pool"})).unwrap();

        let nvmf_port = free_port();
        let csi_cfg = dir.path().join("csi.toml");
        std::fs::write(
            &csi_cfg,
            format!(
                "default_pool = \"pool\"\n[[nodes]]\nname = \"n1\"\nrpc = \"{}\"\nnvmf_address = \"127.0.0.1\"\nnvmf_port = {nvmf_port}\ntopology = {{ \"topology.tidemark.io/node\" = \"n1\" }}\n",
                rpc.display()
            ),
        )
        .unwrap();
        let sock = dir.path().join("csi.sock");
        let log = dir.path().join("csi.log");
        let f = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(CSI)
            .args(["--mode", "controller", "--endpoint"])
            .arg(format!("unix://{}", sock.display()))
            .arg("--config")
            .arg(&csi_cfg)
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .expect("spawn tidemark-csi");
        wait_for_socket(&sock, &mut child, &log);
        let csi = Proc(Some(child));
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(sock.clone())))
            .await
            .expect("connect to the CSI socket");
        Rig { dir, daemon, csi, rpc, nvmf_port, channel }
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn rpc(&self, method: &str, params: Value) -> Value {
        call(&self.rpc, method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    fn logs(&self) -> String {
        let r = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("--- tidemarkd\n{}\n--- tidemark-csi\n{}", r("tidemarkd.log"), r("csi.log"))
    }
}

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability { access_mode: Some(AccessMode { mode: mode as i32 }), access_type: Some(AccessType::Mount(MountVolume::default())) }
}

fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability { access_mode: Some(AccessMode { mode: mode as i32 }), access_type: Some(AccessType::Block(BlockVolume {})) }
}

fn create_req(name: &str, required: i64, limit: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: limit }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

async fn create(c: &mut ControllerClient<Channel>, req: CreateVolumeRequest) -> Volume {
    c.create_volume(req).await.expect("CreateVolume").into_inner().volume.expect("a volume")
}

#[tokio::test]
async fn identity_reports_the_plugin_and_probe_follows_tidemarkd() {
    let mut rig = Rig::start(64).await;
    let mut id = rig.identity();
    let info = id.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.tidemark.io");
    assert!(!info.vendor_version.is_empty());
    let caps = id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner().capabilities;
    use plugin_capability::{Service, Type, VolumeExpansion};
    let want = [Type::Service(Service { r#type: 1 }), Type::Service(Service { r#type: 2 }), Type::VolumeExpansion(VolumeExpansion { r#type: 1 })];
    let got: Vec<Type> = caps.into_iter().filter_map(|c| c.r#type).collect();
    assert_eq!(got, want, "controller service, accessibility constraints, online expansion");
    assert_eq!(id.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));

    // tidemarkd gone: not ready, and the controller says UNAVAILABLE rather than inventing answers.
    rig.daemon.stop();
    assert_eq!(id.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(false), "{}", rig.logs());
    assert_eq!(code(rig.controller().list_volumes(ListVolumesRequest::default()).await), Code::Unavailable);
    assert_eq!(code(rig.controller().create_volume(create_req("v", MIB, 0)).await), Code::Unavailable);
    rig.csi.stop();
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name_and_checks_its_arguments() {
    let rig = Rig::start(64).await;
    let mut c = rig.controller();
    let v = create(&mut c, create_req("pvc-1", 3 * MIB + 5, 0)).await;
    assert_eq!(v.capacity_bytes, 4 * MIB, "rounded up to the 1 MiB cluster");
    assert!(v.volume_id.starts_with("n1/pool/v-"), "{}", v.volume_id);
    assert_eq!(v.accessible_topology[0].segments["topology.tidemark.io/node"], "n1");
    let lvols = rig.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"}));
    assert_eq!(lvols.as_array().unwrap().len(), 1);
    assert_eq!(lvols[0]["is_thin_provisioned"], false, "thick unless the StorageClass says thin");

    // The same name and a compatible range: the same volume.
    let again = create(&mut c, create_req("pvc-1", 2 * MIB, 8 * MIB)).await;
    assert_eq!((again.volume_id.as_str(), again.capacity_bytes), (v.volume_id.as_str(), v.capacity_bytes));
    assert_eq!(rig.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"})).as_array().unwrap().len(), 1);
    // The same name with a size it does not have.
    assert_eq!(code(c.create_volume(create_req("pvc-1", 16 * MIB, 0)).await), Code::AlreadyExists);
    assert_eq!(code(c.create_volume(create_req("pvc-1", MIB, 2 * MIB)).await), Code::AlreadyExists);

    // Missing and malformed arguments.
    assert_eq!(code(c.create_volume(create_req("", MIB, 0)).await), Code::InvalidArgument);
    let mut no_caps = create_req("pvc-2", MIB, 0);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let mut shared_fs = create_req("pvc-2", MIB, 0);
    shared_fs.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    assert_eq!(code(c.create_volume(shared_fs).await), Code::InvalidArgument);
    assert_eq!(code(c.create_volume(create_req("pvc-2", -1, 0)).await), Code::InvalidArgument);
    assert_eq!(code(c.create_volume(create_req("pvc-2", 8 * MIB, 4 * MIB)).await), Code::OutOfRange);
    assert_eq!(code(c.create_volume(create_req("pvc-2", MIB + 1, MIB + 2)).await), Code::OutOfRange, "no whole cluster fits the range");
    let mut bad = create_req("pvc-2", MIB, 0);
    bad.parameters = HashMap::from([("thin".into(), "maybe".into())]);
    assert_eq!(code(c.create_volume(bad).await), Code::InvalidArgument);
    let mut bad = create_req("pvc-2", MIB, 0);
    bad.parameters = HashMap::from([("pool".into(), "nosuchpool".into())]);
    assert_eq!(code(c.create_volume(bad).await), Code::InvalidArgument);
    let mut bad = create_req("pvc-2", MIB, 0);
    bad.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: "n1/pool/s-nosuch".into() })),
    });
    assert_eq!(code(c.create_volume(bad).await), Code::NotFound);
    let mut bad = create_req("pvc-2", MIB, 0);
    bad.volume_content_source =
        Some(VolumeContentSource { r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: "nosuch".into() })) });
    assert_eq!(code(c.create_volume(bad).await), Code::NotFound);
    let mut elsewhere = create_req("pvc-2", MIB, 0);
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology { segments: HashMap::from([("topology.tidemark.io/node".into(), "n9".into())]) }],
        preferred: vec![],
    });
    assert_eq!(code(c.create_volume(elsewhere).await), Code::ResourceExhausted);
    assert_eq!(rig.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"})).as_array().unwrap().len(), 1, "failed calls left nothing behind");

    // Thin, in a named pool, with topology, a default size.
    let mut thin = create_req("pvc-3", 0, 0);
    thin.parameters = HashMap::from([("thin".into(), "true".into()), ("pool".into(), "pool".into()), ("csi.storage.k8s.io/pvc/name".into(), "x".into())]);
    thin.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![],
        preferred: vec![Topology { segments: HashMap::from([("topology.tidemark.io/node".into(), "n1".into())]) }],
    });
    let t = create(&mut c, thin).await;
    assert_eq!(t.capacity_bytes, 1 << 30, "1 GiB by default, thin on a 64 MiB pool");

    // Deleting: twice is fine, unknown and foreign ids are fine, a missing id is not.
    c.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    c.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    c.delete_volume(DeleteVolumeRequest { volume_id: "some-volume".into(), ..Default::default() }).await.unwrap();
    c.delete_volume(DeleteVolumeRequest { volume_id: "n1/pool/v-000000".into(), ..Default::default() }).await.unwrap();
    assert_eq!(code(c.delete_volume(DeleteVolumeRequest::default()).await), Code::InvalidArgument);
    let left = rig.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"}));
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    // A new volume of the deleted name is a new volume.
    let v2 = create(&mut c, create_req("pvc-1", 16 * MIB, 0)).await;
    assert_eq!(v2.capacity_bytes, 16 * MIB);
}

#[tokio::test]
async fn a_restarted_controller_answers_the_same() {
    let mut rig = Rig::start(64).await;
    let v = create(&mut rig.controller(), create_req("pvc-keep", 2 * MIB, 0)).await;
    let stopping = Instant::now();
    rig.csi.stop();
    let sock = rig.dir.path().join("csi.sock");
    assert!(stopping.elapsed() < Duration::from_secs(5) && !sock.exists(), "SIGTERM stops the plugin at once, removing its socket");
    // Another controller process on the same config: it finds the volume by name.
    let child = Command::new(CSI)
        .args(["--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--config")
        .arg(rig.dir.path().join("csi.toml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rig.csi = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn({
                let sock = sock.clone();
                move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(sock.clone())
            }))
            .await;
        if let Ok(ch) = ch {
            break create(&mut ControllerClient::new(ch), create_req("pvc-keep", 2 * MIB, 0)).await;
        }
        assert!(Instant::now() < deadline, "the restarted controller does not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((again.volume_id, again.capacity_bytes), (v.volume_id, v.capacity_bytes));
}

#[tokio::test]
async fn list_volumes_pages_and_validate_and_capacity_report() {
    let rig = Rig::start(64).await;
    let mut c = rig.controller();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&mut c, create_req(&format!("pvc-{i}"), MIB, 0)).await.volume_id);
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c.list_volumes(ListVolumesRequest { max_entries: 2, starting_token: token.clone() }).await.unwrap().into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(r.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!((seen, pages), (ids.clone(), 3), "every volume once, in pages of two");
    let all = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!((all.entries.len(), all.next_token.as_str()), (5, ""));
    assert_eq!(all.entries[0].volume.as_ref().unwrap().capacity_bytes, MIB);
    assert_eq!(code(c.list_volumes(ListVolumesRequest { max_entries: 2, starting_token: "bogus".into() }).await), Code::Aborted);
    assert_eq!(code(c.list_volumes(ListVolumesRequest { max_entries: -1, starting_token: String::new() }).await), Code::InvalidArgument);

    // ValidateVolumeCapabilities.
    let ok = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: ids[0].clone(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: ids[0].clone(),
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    let block = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: ids[0].clone(),
            volume_capabilities: vec![block_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(block.confirmed.is_some(), "a raw block volume may be shared");
    assert_eq!(
        code(
            c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "n1/pool/v-0".into(),
                volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest { volume_id: ids[0].clone(), ..Default::default() }).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // GetCapacity follows the pool's free space, per topology segment.
    let cap = |segment: Option<&str>| GetCapacityRequest {
        accessible_topology: segment.map(|s| Topology { segments: HashMap::from([("topology.tidemark.io/node".into(), s.into())]) }),
        ..Default::default()
    };
    let store = rig.rpc("bdev_lvol_get_lvstores", json!({"lvs_name": "pool"}));
    let free = store[0]["free_clusters"].as_i64().unwrap() * store[0]["cluster_size"].as_i64().unwrap();
    let before = c.get_capacity(cap(None)).await.unwrap().into_inner();
    assert_eq!(before.available_capacity, free);
    assert_eq!(c.get_capacity(cap(Some("n1"))).await.unwrap().into_inner().available_capacity, free);
    assert_eq!(c.get_capacity(cap(Some("n9"))).await.unwrap().into_inner().available_capacity, 0, "no node in that segment");
    create(&mut c, create_req("pvc-big", 8 * MIB, 0)).await;
    assert_eq!(c.get_capacity(cap(None)).await.unwrap().into_inner().available_capacity, free - 8 * MIB);

    // ControllerGetCapabilities names what is implemented.
    let caps = c.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner().capabilities;
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            None => None,
        })
        .collect();
    for want in [1, 2, 3, 4, 5, 6, 7, 9] {
        assert!(rpcs.contains(&want), "capability {want} missing: {rpcs:?}");
    }
}

#[tokio::test]
async fn a_full_pool_is_resource_exhausted_and_expansion_grows_volumes() {
    let rig = Rig::start(32).await;
    let mut c = rig.controller();
    let store = rig.rpc("bdev_lvol_get_lvstores", json!({"lvs_name": "pool"}));
    let free = store[0]["free_clusters"].as_i64().unwrap() * MIB;
    let v = create(&mut c, create_req("pvc-a", free - 4 * MIB, 0)).await;
    assert_eq!(code(c.create_volume(create_req("pvc-b", 8 * MIB, 0)).await), Code::ResourceExhausted, "{}", rig.logs());
    assert_eq!(c.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner().available_capacity, 4 * MIB);

    // Expansion: grows, rounds to clusters, never shrinks, is idempotent.
    let grow = |id: &str, bytes: i64, block: bool| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capability: Some(if block { block_cap(Mode::SingleNodeWriter) } else { mount_cap(Mode::SingleNodeWriter) }),
        ..Default::default()
    };
    let r = c.controller_expand_volume(grow(&v.volume_id, free - 2 * MIB - 1, false)).await.unwrap().into_inner();
    assert_eq!((r.capacity_bytes, r.node_expansion_required), (free - 2 * MIB, true));
    let r = c.controller_expand_volume(grow(&v.volume_id, MIB, true)).await.unwrap().into_inner();
    assert_eq!((r.capacity_bytes, r.node_expansion_required), (free - 2 * MIB, false), "never shrunk; block needs no node step");
    let listed = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries[0].volume.as_ref().unwrap().capacity_bytes, free - 2 * MIB, "the node holds the new size");
    assert_eq!(code(c.controller_expand_volume(grow(&v.volume_id, 4 * free, false)).await), Code::ResourceExhausted, "past the pool");
    assert_eq!(code(c.controller_expand_volume(grow("n1/pool/v-nosuch", MIB, false)).await), Code::NotFound);
    assert_eq!(code(c.controller_expand_volume(grow("", MIB, false)).await), Code::InvalidArgument);
    let mut no_range = grow(&v.volume_id, MIB, false);
    no_range.capacity_range = None;
    assert_eq!(code(c.controller_expand_volume(no_range).await), Code::InvalidArgument);
    // The space comes back when the volume goes.
    c.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    create(&mut c, create_req("pvc-b", 8 * MIB, 0)).await;
}

#[tokio::test]
async fn publish_exports_the_volume_to_the_node_over_nvme_tcp() {
    let rig = Rig::start(64).await;
    let mut c = rig.controller();
    let v = create(&mut c, create_req("pvc-pub", 4 * MIB, 0)).await;
    let publish = |vol: &str, node: &str| ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    let ctx = c.controller_publish_volume(publish(&v.volume_id, HOST)).await.unwrap_or_else(|e| panic!("{e}\n{}", rig.logs())).into_inner().publish_context;
    assert_eq!(ctx["traddr"], "127.0.0.1");
    assert_eq!(ctx["trsvcid"], rig.nvmf_port.to_string());
    let nqn = ctx["subnqn"].clone();
    let sub = rig.rpc("nvmf_get_subsystems", json!({"nqn": nqn}));
    assert_eq!(sub[0]["allow_any_host"], false);
    assert_eq!(sub[0]["hosts"], json!([{"nqn": HOST}]));
    assert_eq!(sub[0]["namespaces"].as_array().unwrap().len(), 1);
    assert_eq!(sub[0]["listen_addresses"][0]["trsvcid"], rig.nvmf_port.to_string());
    // The target listens where the context says.
    assert!(std::net::TcpStream::connect(("127.0.0.1", rig.nvmf_port)).is_ok());
    // Again: the same answer, nothing added.
    assert_eq!(c.controller_publish_volume(publish(&v.volume_id, HOST)).await.unwrap().into_inner().publish_context, ctx);
    assert_eq!(rig.rpc("nvmf_get_subsystems", json!({"nqn": nqn})), sub);
    // A second node for a single-node volume.
    let other = "nqn.2014-08.org.nvmexpress:uuid:5e1c0a2e-0000-4000-8000-000000000002";
    assert_eq!(code(c.controller_publish_volume(publish(&v.volume_id, other)).await), Code::FailedPrecondition);
    // Unknown volume, a node id that is no NQN, missing fields.
    assert_eq!(code(c.controller_publish_volume(publish("n1/pool/v-nosuch", HOST)).await), Code::NotFound);
    assert_eq!(code(c.controller_publish_volume(publish(&v.volume_id, "some-node")).await), Code::NotFound);
    assert_eq!(code(c.controller_publish_volume(publish("", HOST)).await), Code::InvalidArgument);
    assert_eq!(code(c.controller_publish_volume(publish(&v.volume_id, "")).await), Code::InvalidArgument);
    let mut no_cap = publish(&v.volume_id, HOST);
    no_cap.volume_capability = None;
    assert_eq!(code(c.controller_publish_volume(no_cap).await), Code::InvalidArgument);

    // Unpublish: the host leaves, the subsystem with it; twice is fine.
    let unpublish = |vol: &str| ControllerUnpublishVolumeRequest { volume_id: vol.into(), node_id: HOST.into(), ..Default::default() };
    c.controller_unpublish_volume(unpublish(&v.volume_id)).await.unwrap();
    assert!(call(&rig.rpc, "nvmf_get_subsystems", json!({"nqn": nqn})).is_err(), "the subsystem is gone");
    c.controller_unpublish_volume(unpublish(&v.volume_id)).await.unwrap();
    c.controller_unpublish_volume(unpublish("n1/pool/v-nosuch")).await.unwrap();
    assert_eq!(code(c.controller_unpublish_volume(unpublish("")).await), Code::InvalidArgument);
    // Published volumes can be deleted (the export goes first).
    c.controller_publish_volume(publish(&v.volume_id, HOST)).await.unwrap();
    c.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    assert!(call(&rig.rpc, "nvmf_get_subsystems", json!({"nqn": nqn})).is_err());
    assert_eq!(rig.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "pool"})), json!([]));
}

#[tokio::test]
async fn snapshots_list_page_restore_and_clone() {
    snapshot_cases(Rig::start(64).await).await;
}

async fn snapshot_cases(rig: Rig) {
    let mut c = rig.controller();
    // Argument checks need no snapshot support.
    let snap = |name: &str, src: &str| CreateSnapshotRequest { name: name.into(), source_volume_id: src.into(), ..Default::default() };
    assert_eq!(code(c.create_snapshot(snap("", "n1/pool/v-1")).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap("s", "")).await), Code::InvalidArgument);
    assert_eq!(code(c.delete_snapshot(DeleteSnapshotRequest::default()).await), Code::InvalidArgument);
    c.delete_snapshot(DeleteSnapshotRequest { snapshot_id: "n1/pool/s-nosuch".into(), ..Default::default() }).await.unwrap();
    let none = c.list_snapshots(ListSnapshotsRequest { snapshot_id: "bogus".into(), ..Default::default() }).await.unwrap().into_inner();
    assert!(none.entries.is_empty(), "an unknown snapshot id lists nothing");
    assert_eq!(code(c.create_snapshot(snap("s", "n1/pool/v-nosuch")).await), Code::NotFound);
    let a = create(&mut c, create_req("pvc-a", 4 * MIB, 0)).await;
    let b = create(&mut c, create_req("pvc-b", 2 * MIB, 0)).await;
    let s1 = c.create_snapshot(snap("snap-1", &a.volume_id)).await.unwrap_or_else(|e| panic!("{e}\n{}", rig.logs())).into_inner().snapshot.unwrap();
    assert!(s1.ready_to_use && s1.creation_time.is_some());
    assert_eq!((s1.source_volume_id.as_str(), s1.size_bytes), (a.volume_id.as_str(), 4 * MIB));
    // Idempotent by name; the same name of another volume conflicts.
    let again = c.create_snapshot(snap("snap-1", &a.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(again, s1);
    assert_eq!(code(c.create_snapshot(snap("snap-1", &b.volume_id)).await), Code::AlreadyExists);
    let s2 = c.create_snapshot(snap("snap-2", &a.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    let s3 = c.create_snapshot(snap("snap-3", &b.volume_id)).await.unwrap().into_inner().snapshot.unwrap();

    // Listing: all, paged, by id, by source volume.
    let mut all = vec![s1.snapshot_id.clone(), s2.snapshot_id.clone(), s3.snapshot_id.clone()];
    all.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = c.list_snapshots(ListSnapshotsRequest { max_entries: 2, starting_token: token.clone(), ..Default::default() }).await.unwrap().into_inner();
        seen.extend(r.entries.iter().map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(seen, all);
    let by_id = c.list_snapshots(ListSnapshotsRequest { snapshot_id: s2.snapshot_id.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(by_id.entries[0].snapshot.as_ref().unwrap(), &s2);
    let of_a = c.list_snapshots(ListSnapshotsRequest { source_volume_id: a.volume_id.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(of_a.entries.len(), 2);
    let of_none = c.list_snapshots(ListSnapshotsRequest { source_volume_id: "n1/pool/v-nosuch".into(), ..Default::default() }).await.unwrap().into_inner();
    assert!(of_none.entries.is_empty());
    assert_eq!(code(c.list_snapshots(ListSnapshotsRequest { starting_token: "bogus".into(), ..Default::default() }).await), Code::Aborted);
    // Snapshots are not volumes.
    assert_eq!(c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.len(), 2);

    // A volume from a snapshot, larger than it; one smaller is out of range.
    let mut from_snap = create_req("pvc-restored", 8 * MIB, 0);
    from_snap.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: s1.snapshot_id.clone() })),
    });
    let r = create(&mut c, from_snap.clone()).await;
    assert_eq!(r.capacity_bytes, 8 * MIB);
    assert_eq!(r.content_source, from_snap.volume_content_source);
    assert_eq!(create(&mut c, from_snap).await.volume_id, r.volume_id, "idempotent");
    let mut too_small = create_req("pvc-small", MIB, 2 * MIB);
    too_small.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: s1.snapshot_id.clone() })),
    });
    assert_eq!(code(c.create_volume(too_small).await), Code::OutOfRange);

    // A volume from a volume.
    let mut from_vol = create_req("pvc-clone", 0, 0);
    from_vol.volume_content_source =
        Some(VolumeContentSource { r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: b.volume_id.clone() })) });
    let cl = create(&mut c, from_vol).await;
    assert_eq!(cl.capacity_bytes, 2 * MIB);
    assert_eq!(c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.len(), 4);
    assert_eq!(c.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries.len(), 3, "the clone's base snapshot is hidden");

    // Deleting: the clone and its hidden base, then snapshots, twice.
    c.delete_volume(DeleteVolumeRequest { volume_id: cl.volume_id.clone(), ..Default::default() }).await.unwrap();
    assert!(!rig.rpc("bdev_lvol_get_lvols", json!({})).to_string().contains("\"c-"), "the clone's base went with it");
    c.delete_snapshot(DeleteSnapshotRequest { snapshot_id: s3.snapshot_id.clone(), ..Default::default() }).await.unwrap();
    c.delete_snapshot(DeleteSnapshotRequest { snapshot_id: s3.snapshot_id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(c.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries.len(), 2);
}
