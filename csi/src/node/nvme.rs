//! The kernel NVMe/TCP initiator: what is connected (sysfs: /sys/class/nvme, nvme-subsystem,
//! block), connecting and disconnecting with nvme-cli, rescanning namespaces. Everything is
//! looked up from sysfs each time, so a restarted plugin knows what its predecessor did.

use super::run;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Status;

const NVME_TIMEOUT: Duration = Duration::from_secs(60);

/// One controller: /sys/class/nvme/nvmeX.
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    pub name: String,
    pub subsysnqn: String,
    pub transport: String,
    /// `traddr=...,trsvcid=...,src_addr=...` as key/value pairs.
    pub address: BTreeMap<String, String>,
    pub state: String,
}

impl Controller {
    /// Connected or on its way back (a reconnect): not being torn down.
    pub fn alive(&self) -> bool {
        !matches!(self.state.as_str(), "deleting" | "deleting (no IO)" | "dead")
    }
}

pub fn parse_address(s: &str) -> BTreeMap<String, String> {
    s.trim().split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

/// A namespace block device name: nvmeXnY, not a hidden multipath path nvmeXcZnY.
fn is_namespace(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else { return false };
    let Some((c, n)) = rest.split_once('n') else { return false };
    !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
}

/// sysfs and /dev under `root` (`/` on a node; a fake tree in tests).
#[derive(Debug, Clone)]
pub struct Sys {
    pub root: PathBuf,
}

impl Sys {
    pub fn new(root: impl Into<PathBuf>) -> Sys {
        Sys { root: root.into() }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn read(&self, p: &Path) -> Option<String> {
        std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
    }

    fn entries(&self, dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
        v.sort_by_key(|n| (n.len(), n.clone()));
        v
    }

    pub fn controllers(&self) -> Vec<Controller> {
        let class = self.path("/sys/class/nvme");
        self.entries(&class)
            .into_iter()
            .filter_map(|name| {
                let d = class.join(&name);
                Some(Controller {
                    subsysnqn: self.read(&d.join("subsysnqn"))?,
                    transport: self.read(&d.join("transport")).unwrap_or_default(),
                    address: parse_address(&self.read(&d.join("address")).unwrap_or_default()),
                    state: self.read(&d.join("state")).unwrap_or_default(),
                    name,
                })
            })
            .collect()
    }

    pub fn controllers_of(&self, nqn: &str) -> Vec<Controller> {
        self.controllers().into_iter().filter(|c| c.subsysnqn == nqn).collect()
    }

    /// A live-or-reconnecting TCP controller of `nqn` at `traddr`:`trsvcid`.
    pub fn connected(&self, nqn: &str, traddr: &str, trsvcid: &str) -> Option<Controller> {
        self.controllers_of(nqn).into_iter().find(|c| {
            c.alive()
                && c.transport == "tcp"
                && c.address.get("traddr").map(String::as_str) == Some(traddr)
                && c.address.get("trsvcid").map(String::as_str) == Some(trsvcid)
        })
    }

    /// The namespace block devices (nvmeXnY) of subsystem `nqn`, by namespace: the multipath
    /// heads under /sys/class/nvme-subsystem, or without native multipath the namespaces under
    /// the controllers.
    pub fn namespaces(&self, nqn: &str) -> Vec<String> {
        let mut out = Vec::new();
        let subsys = self.path("/sys/class/nvme-subsystem");
        let ctrl = self.path("/sys/class/nvme");
        let dirs = self
            .entries(&subsys)
            .into_iter()
            .map(|s| subsys.join(s))
            .chain(self.controllers_of(nqn).into_iter().map(|c| ctrl.join(c.name)))
            .filter(|d| self.read(&d.join("subsysnqn")).as_deref() == Some(nqn));
        for d in dirs {
            for n in self.entries(&d) {
                if is_namespace(&n) && !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// /dev/NAME, when it is there (a block device node; any file in a fake tree).
    pub fn dev_node(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let p = self.path(&format!("/dev/{name}"));
        let fake = self.root != Path::new("/");
        std::fs::metadata(&p).ok().filter(|m| m.file_type().is_block_device() || fake).map(|_| p)
    }

    /// The size of block device NAME in bytes.
    pub fn size(&self, name: &str) -> Option<u64> {
        self.read(&self.path(&format!("/sys/class/block/{name}/size")))?.parse::<u64>().ok().map(|s| s * 512)
    }

    /// The (major, minor) of block device NAME.
    pub fn dev_numbers(&self, name: &str) -> Option<(u32, u32)> {
        let s = self.read(&self.path(&format!("/sys/class/block/{name}/dev")))?;
        let (a, b) = s.split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// The name of the block device with numbers `dev`, if it exists.
    pub fn block_name(&self, dev: (u32, u32)) -> Option<String> {
        let p = self.path(&format!("/sys/dev/block/{}:{}", dev.0, dev.1));
        let target = std::fs::read_link(&p).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// The subsystem NQN of NVMe block device NAME (its parent is the subsystem for a
    /// multipath head, the controller otherwise; both have `subsysnqn`).
    pub fn nqn_of(&self, name: &str) -> Option<String> {
        self.read(&self.path(&format!("/sys/class/block/{name}/device/subsysnqn")))
    }

    /// Waits up to `timeout` for the first namespace of `nqn` to have its /dev node.
    pub fn wait_namespace(&self, nqn: &str, timeout: Duration) -> Result<String, Status> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(n) = self.namespaces(nqn).into_iter().find(|n| self.dev_node(n).is_some()) {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                let states: Vec<String> = self.controllers_of(nqn).iter().map(|c| format!("{} {}", c.name, c.state)).collect();
                return Err(Status::deadline_exceeded(format!(
                    "no block device of {nqn} appeared in {} s (controllers: {})",
                    timeout.as_secs(),
                    if states.is_empty() { "none".into() } else { states.join(", ") }
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The publish context of ControllerPublishVolume: where the volume's subsystem listens.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
}

impl Target {
    pub fn from_context(ctx: &std::collections::HashMap<String, String>) -> Result<Target, Status> {
        let get = |k: &str| ctx.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let trtype = get("trtype").unwrap_or_else(|| "tcp".into());
        if !trtype.eq_ignore_ascii_case("tcp") {
            return Err(Status::invalid_argument(format!("publish_context: trtype {trtype:?} is not supported (tcp)")));
        }
        let missing = |k: &str| Status::invalid_argument(format!("publish_context: {k} is missing (was the volume published with ControllerPublishVolume?)"));
        let t = Target {
            traddr: get("traddr").ok_or_else(|| missing("traddr"))?,
            trsvcid: get("trsvcid").unwrap_or_else(|| "4420".into()),
            subnqn: get("subnqn").ok_or_else(|| missing("subnqn"))?,
        };
        if t.trsvcid.parse::<u16>().is_err() {
            return Err(Status::invalid_argument(format!("publish_context: trsvcid {:?} is not a port", t.trsvcid)));
        }
        // They become nvme-cli arguments: no option look-alikes, no separators.
        let bad = |s: &str| s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c == ',' || c.is_control());
        if bad(&t.traddr) || bad(&t.subnqn) {
            return Err(Status::invalid_argument("publish_context: traddr or subnqn is malformed"));
        }
        Ok(t)
    }
}

/// Connects to `t` as `host_nqn` unless a controller for it is already there.
pub fn connect(sys: &Sys, t: &Target, host_nqn: &str) -> Result<(), Status> {
    if sys.connected(&t.subnqn, &t.traddr, &t.trsvcid).is_some() {
        return Ok(());
    }
    // The initiator may not be loaded yet on a fresh node (the container needs /lib/modules).
    if !sys.root.join("sys/module/nvme_tcp").exists() && sys.root == Path::new("/") {
        match run::run("modprobe", &["nvme-tcp"], NVME_TIMEOUT) {
            Ok(o) if o.ok() => {}
            Ok(o) => log::warn!("{}", run::failure("modprobe", &["nvme-tcp"], &o)),
            Err(e) => log::warn!("modprobe nvme-tcp: {}", e.message()),
        }
    }
    let args = ["connect", "-t", "tcp", "-a", &t.traddr, "-s", &t.trsvcid, "-n", &t.subnqn, "--hostnqn", host_nqn];
    let o = run::run("nvme", &args, NVME_TIMEOUT)?;
    // nvme-cli 2 refuses a second connect of the same path ("already connected"): fine.
    if o.ok() || sys.connected(&t.subnqn, &t.traddr, &t.trsvcid).is_some() {
        return Ok(());
    }
    Err(Status::unavailable(run::failure("nvme", &args, &o)))
}

/// Disconnects every controller of `nqn` and waits (bounded) until they are gone.
pub fn disconnect(sys: &Sys, nqn: &str) -> Result<(), Status> {
    if sys.controllers_of(nqn).is_empty() {
        return Ok(());
    }
    let o = run::run("nvme", &["disconnect", "-n", nqn], NVME_TIMEOUT)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sys.controllers_of(nqn).is_empty() {
        if Instant::now() >= deadline {
            return Err(Status::internal(format!("controllers of {nqn} are still there 30 s after {}", run::failure("nvme", &["disconnect", "-n", nqn], &o))));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Asks every live controller of `nqn` to rescan its namespaces (a grown size is seen at
/// once; the target's Namespace Attribute Changed event does the same, later).
pub fn rescan(sys: &Sys, nqn: &str) {
    for c in sys.controllers_of(nqn).into_iter().filter(|c| c.state == "live") {
        let dev = sys.root.join("dev").join(&c.name);
        match run::run("nvme", &["ns-rescan", &dev.to_string_lossy()], NVME_TIMEOUT) {
            Ok(o) if o.ok() => {}
            Ok(o) => log::warn!("{}", run::failure("nvme", &["ns-rescan", &dev.to_string_lossy()], &o)),
            Err(e) => log::warn!("nvme ns-rescan {}: {}", dev.display(), e.message()),
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A fake sysfs: `ctrls` (name, nqn, address, state), multipath subsystems with their
    /// namespaces.
    pub fn fake(root: &Path, ctrls: &[(&str, &str, &str, &str)], subsystems: &[(&str, &str, &[&str])]) {
        for (name, nqn, addr, state) in ctrls {
            let d = root.join("sys/class/nvme").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
            std::fs::write(d.join("transport"), "tcp\n").unwrap();
            std::fs::write(d.join("address"), format!("{addr}\n")).unwrap();
            std::fs::write(d.join("state"), format!("{state}\n")).unwrap();
        }
        for (name, nqn, nss) in subsystems {
            let d = root.join("sys/class/nvme-subsystem").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
            for ns in *nss {
                std::fs::create_dir_all(d.join(ns)).unwrap();
                std::fs::create_dir_all(root.join("dev")).unwrap();
                std::fs::write(root.join("dev").join(ns), "").unwrap();
                let b = root.join("sys/class/block").join(ns);
                std::fs::create_dir_all(&b).unwrap();
                std::fs::write(b.join("size"), "131072\n").unwrap();
                std::fs::write(b.join("dev"), "259:3\n").unwrap();
            }
        }
    }

    #[test]
    fn sysfs_lookups_in_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let a = "nqn.2016-06.io.tidemark:csi-v-a";
        let b = "nqn.2016-06.io.tidemark:csi-v-b";
        fake(
            dir.path(),
            &[
                ("nvme0", a, "traddr=10.0.2.2,trsvcid=4420,src_addr=10.0.2.15", "live"),
                ("nvme1", b, "traddr=10.0.2.2,trsvcid=4420", "deleting"),
                ("nvme2", a, "traddr=10.0.3.2,trsvcid=4420", "connecting"),
            ],
            &[("nvme-subsys0", a, &["nvme0n1", "nvme0c0n1", "nvme0c2n1"]), ("nvme-subsys1", b, &[])],
        );
        let s = Sys::new(dir.path());
        assert_eq!(s.controllers().len(), 3);
        assert_eq!(s.connected(a, "10.0.2.2", "4420").map(|c| c.name), Some("nvme0".into()));
        assert_eq!(s.connected(a, "10.0.3.2", "4420").map(|c| c.name), Some("nvme2".into()), "reconnecting counts");
        assert!(s.connected(a, "10.0.2.2", "4421").is_none());
        assert!(s.connected(b, "10.0.2.2", "4420").is_none(), "a controller being deleted does not count");
        assert_eq!(s.namespaces(a), ["nvme0n1"], "hidden paths nvmeXcYnZ are skipped");
        assert!(s.namespaces(b).is_empty());
        assert_eq!(s.wait_namespace(a, Duration::from_secs(1)).unwrap(), "nvme0n1");
        let t = Instant::now();
        assert_eq!(s.wait_namespace(b, Duration::from_millis(300)).unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(s.size("nvme0n1"), Some(64 << 20));
        assert_eq!(s.dev_numbers("nvme0n1"), Some((259, 3)));
        assert_eq!(parse_address("traddr=::1,trsvcid=4420")["traddr"], "::1");
        assert!(is_namespace("nvme12n3") && !is_namespace("nvme1c2n3") && !is_namespace("nvme1") && !is_namespace("nvme-subsys1"));
    }

    #[test]
    fn publish_context_is_checked() {
        let ctx = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        let t = Target::from_context(&ctx(&[("trtype", "tcp"), ("traddr", "10.0.0.1"), ("trsvcid", "4421"), ("subnqn", "nqn.x:y")])).unwrap();
        assert_eq!(t, Target { traddr: "10.0.0.1".into(), trsvcid: "4421".into(), subnqn: "nqn.x:y".into() });
        assert_eq!(Target::from_context(&ctx(&[("traddr", "a"), ("subnqn", "n")])).unwrap().trsvcid, "4420");
        for bad in [
            ctx(&[("traddr", "a")]),
            ctx(&[("subnqn", "n")]),
            ctx(&[("trtype", "rdma"), ("traddr", "a"), ("subnqn", "n")]),
            ctx(&[("traddr", "a"), ("subnqn", "n"), ("trsvcid", "x")]),
            ctx(&[("traddr", "-a"), ("subnqn", "n")]),
            ctx(&[("traddr", "a b"), ("subnqn", "n")]),
        ] {
            assert_eq!(Target::from_context(&bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
