//! deploy/kubernetes/ parses, and what it passes to tidemark-csi and between the containers
//! holds together: every flag given to tidemark-csi is one its `--help` lists, the sidecars
//! dial the socket the plugin serves, the registrar points kubelet at the node plugin's socket
//! on the host, the driver name is the one GetPluginInfo reports, and the ConfigMap's config
//! is one the controller accepts.

use serde_yaml::Value;
use std::path::Path;
use std::process::Command;

const CSI: &str = env!("CARGO_BIN_EXE_tidemark-csi");
const DRIVER: &str = "csi.tidemark.io";

fn documents() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("deploy/kubernetes").map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(v["apiVersion"].is_string() && v["kind"].is_string() && v["metadata"]["name"].is_string(), "{}: {v:?}", f.display());
            out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out
}

use serde::Deserialize;

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter().map(|(_, v)| v).filter(|v| v["kind"] == kind).collect()
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers")
}

fn args(c: &Value) -> Vec<String> {
    c["args"].as_sequence().map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn flag(c: &Value, name: &str) -> Option<String> {
    args(c).into_iter().find_map(|a| a.strip_prefix(&format!("{name}=")).map(String::from))
}

/// The container path `path` is under, as the host or another container sees it: the volume
/// it is mounted from.
fn volume_of<'a>(workload: &'a Value, c: &Value, path: &str) -> &'a Value {
    let m = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{path} is on no volume of {:?}", c["name"]));
    workload["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == m["name"]).expect("the mount's volume")
}

#[test]
fn the_manifests_parse_and_fit_the_binary() {
    let docs = documents();
    let help = Command::new(CSI).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("--mode") && help.contains("controller"), "{help}");

    assert_eq!(of_kind(&docs, "CSIDriver")[0]["metadata"]["name"], DRIVER);
    assert_eq!(of_kind(&docs, "CSIDriver")[0]["spec"]["attachRequired"], true, "ControllerPublishVolume does the export");
    assert_eq!(of_kind(&docs, "StorageClass")[0]["provisioner"], DRIVER);
    assert_eq!(of_kind(&docs, "StorageClass")[0]["allowVolumeExpansion"], true);
    assert_eq!(of_kind(&docs, "VolumeSnapshotClass")[0]["driver"], DRIVER);
    for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        assert!(!of_kind(&docs, k).is_empty(), "no {k}");
    }
    // The StorageClass parameters are ones CreateVolume takes.
    for (k, _) in of_kind(&docs, "StorageClass")[0]["parameters"].as_mapping().unwrap() {
        let k = k.as_str().unwrap();
        assert!(["pool", "thin"].contains(&k) || k.starts_with("csi.storage.k8s.io/"), "parameter {k}");
    }

    let workloads: Vec<&Value> = docs.iter().map(|(_, v)| v).filter(|v| v["kind"] == "Deployment" || v["kind"] == "DaemonSet").collect();
    let mut modes = Vec::new();
    for w in &workloads {
        let cs = containers(w);
        let plugin = cs.iter().find(|c| c["image"].as_str().unwrap().contains("tidemark-csi")).expect("a tidemark-csi container");
        for a in args(plugin) {
            let name = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")) || help.contains(&format!("{name} <")),
                "{name} is not in --help:\n{help}"
            );
        }
        let mode = flag(plugin, "--mode").expect("--mode");
        modes.push(mode.clone());
        let sock = flag(plugin, "--endpoint").expect("--endpoint").strip_prefix("unix://").expect("a unix:// endpoint").to_string();
        let served_on = volume_of(w, plugin, &sock);
        // Every sidecar dials the plugin's socket, through the same volume.
        for c in cs.iter().filter(|c| c["name"] != plugin["name"]) {
            let addr = flag(c, "--csi-address").unwrap_or_else(|| panic!("{:?} has no --csi-address", c["name"]));
            assert_eq!(addr, sock, "{:?}", c["name"]);
            assert_eq!(volume_of(w, c, &addr), served_on, "{:?} sees the socket through another volume", c["name"]);
        }
        let sidecars: Vec<&str> = cs.iter().filter_map(|c| c["image"].as_str()).filter_map(|i| i.rsplit('/').next()?.split(':').next()).collect();
        if mode == "controller" {
            for s in ["csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"] {
                assert!(sidecars.contains(&s), "{s} missing from the controller");
            }
            // The config the ConfigMap carries is one the controller loads.
            let path = flag(plugin, "--config").expect("--config");
            let vol = volume_of(w, plugin, &path);
            let cm = of_kind(&docs, "ConfigMap").into_iter().find(|m| m["metadata"]["name"] == vol["configMap"]["name"]).expect("the config's ConfigMap");
            let key = Path::new(&path).file_name().unwrap().to_str().unwrap();
            let text = cm["data"][key].as_str().expect("the config file in the ConfigMap");
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join(key);
            std::fs::write(&f, text).unwrap();
            // The controller starts on it (and is stopped at once): a bad config exits 2.
            let sock = dir.path().join("c.sock");
            let mut child = Command::new(CSI)
                .args(["--mode", "controller", "--config"])
                .arg(&f)
                .arg("--endpoint")
                .arg(format!("unix://{}", sock.display()))
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !sock.exists() {
                assert!(child.try_wait().unwrap().is_none(), "tidemark-csi refused the ConfigMap's config");
                assert!(std::time::Instant::now() < deadline);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        } else {
            assert!(sidecars.contains(&"csi-node-driver-registrar"), "registrar missing from the node plugin");
            let reg = cs.iter().find(|c| c["image"].as_str().unwrap().contains("node-driver-registrar")).unwrap();
            let host_path = served_on["hostPath"]["path"].as_str().expect("the node plugin's socket directory is on the host");
            let sock_name = Path::new(&sock).file_name().unwrap().to_str().unwrap();
            assert_eq!(flag(reg, "--kubelet-registration-path").unwrap(), format!("{host_path}/{sock_name}"), "kubelet dials the socket the plugin serves");
            assert_eq!(host_path, format!("/var/lib/kubelet/plugins/{DRIVER}"));
        }
    }
    modes.sort();
    assert_eq!(modes, ["controller", "node"]);
}

#[test]
fn a_flag_that_is_not_in_the_binary_is_caught() {
    // The check above must be able to fail: --help does not list made-up flags.
    let help = Command::new(CSI).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.contains("--drivername"));
    for f in ["--mode", "--endpoint", "--config", "--host-nqn", "--topology", "--max-volumes"] {
        assert!(help.contains(f), "{f}");
    }
}
